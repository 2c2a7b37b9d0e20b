//! IPv4 and IPv6: iptables and ip6tables keep separate tables, programmed by
//! separate binaries, which an environment variable can replace (for example with
//! `iptables-legacy`).

use std::fmt;
use std::net::IpAddr;

/// Names the IPv4 `iptables` binary (default `iptables`); `-restore` is appended
/// for the restore tool.
pub const ENV_IPTABLES: &str = "MESH_IPTABLES";
/// Names the IPv6 `ip6tables` binary (default `ip6tables`); `-restore` is
/// appended for the restore tool.
pub const ENV_IP6TABLES: &str = "MESH_IP6TABLES";

/// An address family; iptables and ip6tables keep separate tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4, programmed with `iptables`.
    V4,
    /// IPv6, programmed with `ip6tables`.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The loopback range, in the form `iptables-save` prints it. Traffic to it
    /// never leaves the host, so it is never redirected.
    pub const fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// The variable that names this family's binary.
    pub(super) const fn env_var(self) -> &'static str {
        match self {
            Family::V4 => ENV_IPTABLES,
            Family::V6 => ENV_IP6TABLES,
        }
    }

    const fn default_binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The `iptables` binary for `family`: [`ENV_IPTABLES`] / [`ENV_IP6TABLES`] if
/// set, else `iptables` / `ip6tables`. The restore tool is this with
/// `-restore` appended.
pub fn binary(family: Family) -> String {
    std::env::var(family.env_var())
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| family.default_binary().to_owned())
}

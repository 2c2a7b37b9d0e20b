//! iptables interception: NAT `REDIRECT` rules that send workload TCP traffic to
//! the agent's local listeners.
//!
//! This is the fallback for kernels or privileges that rule out the eBPF mode,
//! and the pod-level mode an init container sets up. Both modes end in the same
//! place for the agent: the listener reads the original destination with
//! `getsockopt(SO_ORIGINAL_DST)`.
//!
//! Everything this module adds lives in the `nat` table, in two chains of its
//! own, [`OUTPUT_CHAIN`] and [`INBOUND_CHAIN`], plus one jump to each from the
//! built-in `OUTPUT` and `PREROUTING` chains:
//!
//! ```text
//! -I OUTPUT -p tcp -j MESH_OUTPUT
//! -I PREROUTING -p tcp -j MESH_INBOUND
//! -A MESH_OUTPUT -m mark --mark 0x539 -j RETURN            agent's own sockets
//! -A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN       optional
//! -A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN                  (IPv6: ::1/128)
//! -A MESH_OUTPUT -o lo -j RETURN
//! -A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN        per excluded port
//! -A MESH_OUTPUT -d 10.1.0.0/16 -j RETURN                  per excluded CIDR
//! -A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001
//!      (one redirect per cgroup x included CIDR x group of 15 included ports,
//!       each match only when configured)
//! -A MESH_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006
//! ```
//!
//! Rules are written in the exact form `iptables-save` prints them, so what
//! [`render`] returns can be compared line by line with the live table.
//!
//! [`install`] replaces the contents of both chains in one
//! `iptables-restore --noflush` transaction (declaring a chain in a restore file
//! creates it or flushes it), so a workload never sees a half-written chain and
//! re-running it with another config converges on that config. The jumps are
//! added in the same transaction, and only when `iptables -C` says they are
//! missing, so repeated installs never duplicate them. Both chains and both
//! jumps are always present after an install, even with no inbound ports, so
//! every install leaves the same shape behind whatever the previous config was.
//!
//! [`uninstall`] removes the jumps (all of them, including duplicates and
//! variants left by older versions), then flushes and deletes the two chains,
//! and touches nothing else; after it the `nat` table is exactly as it was
//! before the first install.
//!
//! The jumps are inserted at the top of `OUTPUT` and `PREROUTING` rather than
//! appended: on a node where kube-proxy DNATs service VIPs in those chains, the
//! agent must see the VIP the workload dialled, not the endpoint kube-proxy
//! picked.
//!
//! The binaries are `iptables`/`ip6tables` unless [`ENV_IPTABLES`] /
//! [`ENV_IP6TABLES`] name others (for example `iptables-legacy`); the restore
//! tool is that name with `-restore` appended. Commands run synchronously: this
//! happens at start, at stop and when the enrolled cgroups change, and callers
//! on an async runtime wrap the calls in `spawn_blocking`.
//!
//! CIDRs are the crate's shared [`Cidr`] (host bits rejected at parse time).

use std::fmt;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::process::{Command, ExitStatus, Output, Stdio};

use tracing::{debug, info, warn};

use crate::cidr::Cidr;

/// Our chain in the `nat` table for locally generated (outbound) traffic.
pub const OUTPUT_CHAIN: &str = "MESH_OUTPUT";
/// Our chain in the `nat` table for traffic arriving from the network (inbound).
pub const INBOUND_CHAIN: &str = "MESH_INBOUND";
/// The agent's outbound listener port unless configured otherwise.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound listener port unless configured otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Names the IPv4 `iptables` binary (default `iptables`); `-restore` is appended
/// for the restore tool.
pub const ENV_IPTABLES: &str = "MESH_IPTABLES";
/// Names the IPv6 `ip6tables` binary (default `ip6tables`); `-restore` is
/// appended for the restore tool.
pub const ENV_IP6TABLES: &str = "MESH_IP6TABLES";

/// `-m multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;
/// How long to wait for the xtables lock (held by kube-proxy and friends with the
/// legacy backend; the nft backend ignores it). Bounded so start-up cannot hang.
const LOCK_WAIT_SECS: &str = "10";
/// Upper bound on jump deletions per hook: a `-D` that reports success without
/// removing anything must not spin forever.
const MAX_JUMP_DELETES: usize = 256;
/// `xt_cgroup` keeps the path in a `PATH_MAX` buffer, terminating NUL included.
const MAX_CGROUP_PATH: usize = 4095;

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

    const fn env_var(self) -> &'static str {
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

/// What to intercept and where to send it.
///
/// One config drives both families; CIDRs are sorted into the table of their
/// family when the rules are rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesConfig {
    /// The agent's outbound listener (on `127.0.0.1` and `::1`, where `REDIRECT`
    /// sends locally generated traffic).
    pub outbound_port: u16,
    /// The agent's inbound listener (on the receiving interface's address, where
    /// `REDIRECT` sends traffic arriving from the network).
    pub inbound_port: u16,
    /// Destination ports whose inbound traffic is sent to `inbound_port`; empty
    /// means no inbound redirection (the chain stays, empty).
    pub inbound_ports: Vec<u16>,
    /// `SO_MARK` on the agent's own sockets. Matched exactly (all 32 bits) and
    /// first, so the agent's upstream connections are never sent back to
    /// itself. Must not be 0, which would match every unmarked socket.
    pub mark: u32,
    /// A uid whose sockets are also left alone (Istio-style: the sidecar's uid),
    /// for agents that cannot mark every socket they open.
    pub exclude_uid: Option<u32>,
    /// If non-empty, only these outbound destination ports are redirected (as
    /// the eBPF mode's include-only port list).
    pub include_ports: Vec<u16>,
    /// Outbound destination ports left alone; checked before the includes.
    pub exclude_ports: Vec<u16>,
    /// If non-empty, only these destinations are redirected outbound. A family
    /// with no entry here is then not redirected at all (an IPv4-only include
    /// list must not turn into "redirect all IPv6").
    pub include_cidrs: Vec<Cidr>,
    /// Outbound destinations left alone; checked before the includes.
    pub exclude_cidrs: Vec<Cidr>,
    /// cgroup v2 paths relative to the cgroup2 root (such as `/mesh/wl1`). If
    /// non-empty, only sockets of these cgroups are redirected outbound (node
    /// mode); empty means the whole network namespace (pod mode). Each cgroup
    /// must exist when the rules are installed: the kernel resolves the path
    /// then, and a cgroup that is removed and re-created needs a re-install.
    pub cgroups: Vec<String>,
    /// Also program the IPv6 table with `ip6tables`.
    pub ipv6: bool,
}

impl IptablesConfig {
    /// Default ports, nothing excluded beyond `mark`, nothing inbound, the whole
    /// network namespace, IPv4 and IPv6.
    pub fn new(mark: u32) -> Self {
        IptablesConfig {
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            inbound_ports: Vec::new(),
            mark,
            exclude_uid: None,
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            cgroups: Vec::new(),
            ipv6: true,
        }
    }

    /// Checks what the type system cannot: ports and mark non-zero, and cgroup
    /// paths that are absolute and safe to place in a restore file (no
    /// whitespace, control characters, quotes or backslashes, which could
    /// otherwise split one rule into several).
    pub fn validate(&self) -> Result<(), IptablesError> {
        fn invalid(field: &'static str, value: impl fmt::Debug, reason: &'static str) -> IptablesError {
            IptablesError::InvalidConfig { field, value: format!("{value:?}"), reason }
        }
        if self.outbound_port == 0 {
            return Err(invalid("outbound_port", 0, "port 0 cannot be listened on"));
        }
        if self.mark == 0 {
            return Err(invalid(
                "mark",
                0,
                "mark 0 matches every unmarked socket, so nothing would be redirected",
            ));
        }
        if !self.inbound_ports.is_empty() && self.inbound_port == 0 {
            return Err(invalid("inbound_port", 0, "port 0 cannot be listened on"));
        }
        if self.inbound_ports.contains(&0) {
            return Err(invalid("inbound_ports", &self.inbound_ports, "port 0 is not a destination port"));
        }
        if self.include_ports.contains(&0) {
            return Err(invalid("include_ports", &self.include_ports, "port 0 is not a destination port"));
        }
        if self.exclude_ports.contains(&0) {
            return Err(invalid("exclude_ports", &self.exclude_ports, "port 0 is not a destination port"));
        }
        for cgroup in &self.cgroups {
            if !cgroup.starts_with('/') {
                return Err(invalid("cgroups", cgroup, "must be absolute (relative to the cgroup2 root)"));
            }
            if cgroup.len() > MAX_CGROUP_PATH {
                return Err(invalid("cgroups", cgroup, "longer than the kernel's 4095-byte limit"));
            }
            if cgroup.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\') {
                return Err(invalid(
                    "cgroups",
                    cgroup,
                    "contains whitespace, a control character, a quote or a backslash",
                ));
            }
        }
        Ok(())
    }
}

/// Why iptables could not be programmed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The config failed [`IptablesConfig::validate`].
    #[error("invalid iptables config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The binary does not exist.
    #[error(
        "`{binary}` not found: install the iptables package (Debian/Ubuntu: \
         `apt-get install iptables`), or set {env_var} to the binary to use"
    )]
    NotInstalled {
        /// The binary looked for.
        binary: String,
        /// The variable that overrides it.
        env_var: &'static str,
    },
    /// The kernel refused: the process lacks `CAP_NET_ADMIN`.
    #[error(
        "`{command}` was denied: changing iptables rules needs CAP_NET_ADMIN in the \
         network namespace; run the agent as root or grant the capability (Kubernetes: \
         securityContext.capabilities.add: [\"NET_ADMIN\"]); stderr: {stderr}"
    )]
    PermissionDenied {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}{context}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
        /// For restores: the input line the tool complained about, and a hint.
        context: String,
    },
    /// Deleting a jump kept succeeding without the jump going away.
    #[error("`{command}` succeeded {attempts} times but the jump is still there")]
    JumpNotRemoved {
        /// The delete command line.
        command: String,
        /// How many deletions were tried.
        attempts: usize,
    },
    /// The command could not be started or talked to.
    #[error("could not run `{command}`: {source}")]
    Io {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Renders the `iptables-restore` input that installs `cfg` for `family` into
/// an untouched table: our two chains with their rules, and the jumps to them.
///
/// [`install`] feeds the same text, except that it leaves out each jump that is
/// already in place. Rules are in `iptables-save` form, one per line. The
/// config should have passed [`IptablesConfig::validate`]; this function never
/// fails, so the check lives in one place.
pub fn render(cfg: &IptablesConfig, family: Family) -> String {
    render_restore(cfg, family, Jumps { output: true, prerouting: true })
}

/// Which jumps a restore should add.
#[derive(Debug, Clone, Copy)]
struct Jumps {
    output: bool,
    prerouting: bool,
}

fn render_restore(cfg: &IptablesConfig, family: Family, jumps: Jumps) -> String {
    let mut lines =
        vec!["*nat".to_owned(), format!(":{OUTPUT_CHAIN} - [0:0]"), format!(":{INBOUND_CHAIN} - [0:0]")];
    lines.extend(output_rules(cfg, family).into_iter().map(|r| format!("-A {OUTPUT_CHAIN} {r}")));
    lines.extend(inbound_rules(cfg).into_iter().map(|r| format!("-A {INBOUND_CHAIN} {r}")));
    if jumps.output {
        lines.push(format!("-I {}", jump_spec("OUTPUT", OUTPUT_CHAIN).join(" ")));
    }
    if jumps.prerouting {
        lines.push(format!("-I {}", jump_spec("PREROUTING", INBOUND_CHAIN).join(" ")));
    }
    lines.push("COMMIT".to_owned());
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The rule, after the chain name, that jumps from a built-in chain to ours.
fn jump_spec<'a>(hook: &'a str, chain: &'a str) -> [&'a str; 5] {
    [hook, "-p", "tcp", "-j", chain]
}

/// [`OUTPUT_CHAIN`]'s rules, without the `-A CHAIN` prefix: every exclusion
/// first, then the redirects.
fn output_rules(cfg: &IptablesConfig, family: Family) -> Vec<String> {
    let mut rules = vec![format!("-m mark --mark {:#x} -j RETURN", cfg.mark)];
    if let Some(uid) = cfg.exclude_uid {
        rules.push(format!("-m owner --uid-owner {uid} -j RETURN"));
    }
    rules.push(format!("-d {} -j RETURN", family.loopback()));
    rules.push("-o lo -j RETURN".to_owned());
    rules.extend(cfg.exclude_ports.iter().map(|p| format!("-p tcp -m tcp --dport {p} -j RETURN")));
    rules.extend(
        cfg.exclude_cidrs
            .iter()
            .filter(|c| Family::of(&c.addr()) == family)
            .map(|c| format!("-d {c} -j RETURN")),
    );

    // An include list without this family's prefixes redirects nothing here.
    let destinations: Vec<Option<&Cidr>> = if cfg.include_cidrs.is_empty() {
        vec![None]
    } else {
        cfg.include_cidrs.iter().filter(|c| Family::of(&c.addr()) == family).map(Some).collect()
    };
    let cgroups: Vec<Option<&str>> = if cfg.cgroups.is_empty() {
        vec![None]
    } else {
        cfg.cgroups.iter().map(|c| Some(c.as_str())).collect()
    };
    let port_sets: Vec<Option<String>> = if cfg.include_ports.is_empty() {
        vec![None]
    } else {
        cfg.include_ports
            .chunks(MULTIPORT_MAX)
            .map(|chunk| {
                let ports: Vec<String> = chunk.iter().map(u16::to_string).collect();
                Some(ports.join(","))
            })
            .collect()
    };
    for cgroup in &cgroups {
        for destination in &destinations {
            for ports in &port_sets {
                let mut rule = String::new();
                if let Some(cidr) = destination {
                    rule.push_str(&format!("-d {cidr} "));
                }
                rule.push_str("-p tcp ");
                if let Some(path) = cgroup {
                    rule.push_str(&format!("-m cgroup --path \"{path}\" "));
                }
                if let Some(ports) = ports {
                    rule.push_str(&format!("-m multiport --dports {ports} "));
                }
                rule.push_str(&format!("-j REDIRECT --to-ports {}", cfg.outbound_port));
                rules.push(rule);
            }
        }
    }
    rules
}

/// [`INBOUND_CHAIN`]'s rules, without the `-A CHAIN` prefix.
fn inbound_rules(cfg: &IptablesConfig) -> Vec<String> {
    cfg.inbound_ports
        .iter()
        .map(|p| format!("-p tcp -m tcp --dport {p} -j REDIRECT --to-ports {}", cfg.inbound_port))
        .collect()
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

/// Installs (or replaces) the interception rules for IPv4 and, if `cfg.ipv6`,
/// IPv6. Idempotent: running it again with the same config changes nothing,
/// with another config leaves exactly that config's rules.
///
/// With `cfg.ipv6` off, rules a previous install left in the IPv6 table are
/// removed (best effort: a host without `ip6tables` is fine). If IPv6 fails
/// after IPv4 succeeded, the IPv4 rules stay; [`uninstall`] removes both.
pub fn install(cfg: &IptablesConfig) -> Result<(), IptablesError> {
    cfg.validate()?;
    Tables::from_env(Family::V4).install(cfg)?;
    let v6 = Tables::from_env(Family::V6);
    if cfg.ipv6 {
        v6.install(cfg)?;
    } else {
        match v6.uninstall() {
            Ok(()) => {}
            Err(IptablesError::NotInstalled { binary, .. }) => {
                debug!(%binary, "IPv6 interception disabled and ip6tables absent: nothing to remove");
            }
            Err(error) => {
                warn!(%error, "IPv6 interception disabled; could not check for stale IPv6 rules")
            }
        }
    }
    Ok(())
}

/// Removes every rule this module added: the jumps to our chains from `OUTPUT`
/// and `PREROUTING` (duplicates included), then the chains. Anything missing is
/// skipped, so it is idempotent and safe after a failed or partial install.
/// Both families are attempted even if the first fails; the first error wins.
pub fn uninstall(ipv6: bool) -> Result<(), IptablesError> {
    let v4 = Tables::from_env(Family::V4).uninstall();
    let v6 = if ipv6 { Tables::from_env(Family::V6).uninstall() } else { Ok(()) };
    v4.and(v6)
}

/// Whether our chains exist in `family`'s `nat` table.
pub fn is_installed(family: Family) -> Result<bool, IptablesError> {
    let tables = Tables::from_env(family);
    Ok(tables.chain_exists(OUTPUT_CHAIN)? && tables.chain_exists(INBOUND_CHAIN)?)
}

/// The binaries that program one family's tables.
#[derive(Debug, Clone)]
struct Tables {
    family: Family,
    iptables: String,
    restore: String,
}

impl Tables {
    fn from_env(family: Family) -> Self {
        Tables::new(family, binary(family))
    }

    fn new(family: Family, iptables: String) -> Self {
        let restore = format!("{iptables}-restore");
        Tables { family, iptables, restore }
    }

    fn install(&self, cfg: &IptablesConfig) -> Result<(), IptablesError> {
        let jumps = Jumps {
            output: !self.jump_exists("OUTPUT", OUTPUT_CHAIN)?,
            prerouting: !self.jump_exists("PREROUTING", INBOUND_CHAIN)?,
        };
        let text = render_restore(cfg, self.family, jumps);
        self.restore(&text)?;
        let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("-A ")).collect();
        info!(
            family = %self.family,
            outbound_port = cfg.outbound_port,
            inbound_port = cfg.inbound_port,
            added_output_jump = jumps.output,
            added_prerouting_jump = jumps.prerouting,
            rules = ?rules,
            "installed iptables interception rules"
        );
        Ok(())
    }

    fn uninstall(&self) -> Result<(), IptablesError> {
        let mut jumps = 0;
        for (hook, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
            jumps += self.delete_jumps(hook, chain)?;
        }
        let mut chains = Vec::new();
        for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
            if self.chain_exists(chain)? {
                self.iptables_ok(&["-t", "nat", "-F", chain])?;
                self.iptables_ok(&["-t", "nat", "-X", chain])?;
                chains.push(chain);
            }
        }
        if jumps == 0 && chains.is_empty() {
            debug!(family = %self.family, "no iptables interception rules to remove");
            return Ok(());
        }
        info!(
            family = %self.family,
            removed_jumps = jumps,
            removed_chains = ?chains,
            "removed iptables interception rules"
        );
        Ok(())
    }

    /// Deletes the canonical jump while `-C` finds it, then any other rule in
    /// `hook` that jumps to `chain` (forms older versions may have used).
    fn delete_jumps(&self, hook: &str, chain: &str) -> Result<usize, IptablesError> {
        let spec = jump_spec(hook, chain);
        let mut deleted = 0;
        while self.jump_exists(hook, chain)? {
            if deleted == MAX_JUMP_DELETES {
                return Err(IptablesError::JumpNotRemoved {
                    command: self.command_line(&self.iptables, &with_op("-D", &spec)),
                    attempts: deleted,
                });
            }
            self.iptables_ok(&with_op("-D", &spec))?;
            deleted += 1;
        }

        let listing = self.iptables_ok(&["-t", "nat", "-S", hook])?;
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let jumps_to_us = matches!(
                tokens.as_slice(),
                ["-A", h, .., "-j" | "-g", target] if *h == hook && *target == chain
            );
            if !jumps_to_us {
                continue;
            }
            if line.contains('"') || line.contains('\'') {
                // Splitting on whitespace would mangle a quoted argument, and a
                // wrong -D could delete somebody else's rule.
                warn!(family = %self.family, rule = line, "leaving a quoted jump to our chain; delete it by hand");
                continue;
            }
            self.iptables_ok(&with_op("-D", &tokens[1..]))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn jump_exists(&self, hook: &str, chain: &str) -> Result<bool, IptablesError> {
        let args = with_op("-C", &jump_spec(hook, chain));
        let out = self.run(&self.iptables, &args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Ok(true),
            // 1: no such rule (or, legacy, no such chain).
            Some(1) if !is_permission_denied(&stderr) => Ok(false),
            // 2: the jump target does not exist, so no rule can jump to it.
            Some(2) if target_missing(&stderr) => Ok(false),
            _ => Err(self.failure(&self.iptables, &args, &out, String::new())),
        }
    }

    fn chain_exists(&self, chain: &str) -> Result<bool, IptablesError> {
        let args = ["-t", "nat", "-S", chain];
        let out = self.run(&self.iptables, &args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) if !is_permission_denied(&stderr) => Ok(false),
            _ => Err(self.failure(&self.iptables, &args, &out, String::new())),
        }
    }

    fn restore(&self, text: &str) -> Result<(), IptablesError> {
        let args = ["--noflush"];
        let out = self.run(&self.restore, &args, Some(text))?;
        if out.status.success() {
            return Ok(());
        }
        let context = restore_context(&String::from_utf8_lossy(&out.stderr), text);
        Err(self.failure(&self.restore, &args, &out, context))
    }

    fn iptables_ok(&self, args: &[&str]) -> Result<Output, IptablesError> {
        let out = self.run(&self.iptables, args, None)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failure(&self.iptables, args, &out, String::new()))
        }
    }

    /// Runs `program -w <secs> args...`, feeding `stdin` if given; a non-zero
    /// exit is returned, not judged.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, IptablesError> {
        let mut command = Command::new(program);
        command
            .args(["-w", LOCK_WAIT_SECS])
            .args(args)
            // Messages are matched below; keep them untranslated.
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let io_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                IptablesError::NotInstalled { binary: program.to_owned(), env_var: self.family.env_var() }
            } else {
                IptablesError::Io { command: self.command_line(program, args), source }
            }
        };
        let mut child = command.spawn().map_err(io_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits early closes the pipe; its exit status and
            // stderr then say more than EPIPE does.
            if let Err(e) = pipe.write_all(text.as_bytes())
                && e.kind() != io::ErrorKind::BrokenPipe
            {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io_error(e));
            }
        }
        let out = child.wait_with_output().map_err(io_error)?;
        debug!(
            command = %self.command_line(program, args),
            status = %out.status,
            "ran iptables command"
        );
        Ok(out)
    }

    fn failure(&self, program: &str, args: &[&str], out: &Output, context: String) -> IptablesError {
        let command = self.command_line(program, args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if is_permission_denied(&stderr) {
            return IptablesError::PermissionDenied { command, stderr };
        }
        IptablesError::Command {
            command,
            status: out.status,
            stderr: if stderr.is_empty() { "(no output)".to_owned() } else { stderr },
            context,
        }
    }

    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut line = format!("{program} -w {LOCK_WAIT_SECS}");
        for arg in args {
            line.push(' ');
            line.push_str(arg);
        }
        line
    }
}

/// `-t nat <op> <spec...>`.
fn with_op<'a>(op: &'a str, spec: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-t", "nat", op];
    args.extend_from_slice(spec);
    args
}

/// Whether a tool's stderr says the kernel (or the xtables lock file) refused
/// us for lack of privilege, in the words of the nft and legacy backends.
fn is_permission_denied(stderr: &str) -> bool {
    stderr.contains("Permission denied")
        || stderr.contains("Operation not permitted")
        || stderr.contains("you must be root")
}

/// Whether `-C` failed because the jump target chain does not exist (nft:
/// "Chain 'X' does not exist"; legacy: "Couldn't load target `X'").
fn target_missing(stderr: &str) -> bool {
    stderr.contains("does not exist")
        || stderr.contains("Couldn't load target")
        || stderr.contains("No chain/target/match by that name")
}

/// The restore input line that `iptables-restore` names in `stderr` ("line 4
/// failed", "line 4: RULE_APPEND failed"), with a hint for the usual cause.
fn restore_context(stderr: &str, input: &str) -> String {
    let line_no = stderr.match_indices("line ").find_map(|(i, m)| {
        let digits: String = stderr[i + m.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok()
    });
    let Some(line) = line_no.and_then(|n| Some((n, input.lines().nth(n.checked_sub(1)?)?))) else {
        return String::new();
    };
    let mut context = format!("; restore input line {}: `{}`", line.0, line.1);
    if line.1.contains("-m cgroup") {
        context.push_str(
            " (the cgroup must exist under the cgroup2 root, and the kernel needs \
             xt_cgroup with cgroup2 socket matching)",
        );
    } else if line.1.contains("REDIRECT") {
        context.push_str(" (the kernel needs the nat table and the REDIRECT target)");
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn sample() -> IptablesConfig {
        IptablesConfig {
            outbound_port: 15001,
            inbound_port: 15006,
            inbound_ports: vec![8080, 9090],
            mark: 0x539,
            exclude_uid: Some(1337),
            include_ports: vec![],
            exclude_ports: vec![22, 15020],
            include_cidrs: vec![cidr("10.0.0.0/8"), cidr("fd00::/64")],
            exclude_cidrs: vec![cidr("10.1.0.0/16"), cidr("fd00::1")],
            cgroups: vec![],
            ipv6: true,
        }
    }

    fn rules_of<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        text.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    #[test]
    fn render_v4_golden() {
        let expected = "\
*nat
:MESH_OUTPUT - [0:0]
:MESH_INBOUND - [0:0]
-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN
-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN
-A MESH_OUTPUT -o lo -j RETURN
-A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN
-A MESH_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN
-A MESH_OUTPUT -d 10.1.0.0/16 -j RETURN
-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 15001
-A MESH_INBOUND -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 15006
-A MESH_INBOUND -p tcp -m tcp --dport 9090 -j REDIRECT --to-ports 15006
-I OUTPUT -p tcp -j MESH_OUTPUT
-I PREROUTING -p tcp -j MESH_INBOUND
COMMIT
";
        assert_eq!(render(&sample(), Family::V4), expected);
    }

    #[test]
    fn render_v6_uses_v6_loopback_and_only_v6_cidrs() {
        let text = render(&sample(), Family::V6);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN",
                "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A MESH_OUTPUT -d ::1/128 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN",
                "-A MESH_OUTPUT -p tcp -m tcp --dport 15020 -j RETURN",
                "-A MESH_OUTPUT -d fd00::1/128 -j RETURN",
                "-A MESH_OUTPUT -d fd00::/64 -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        assert!(!text.contains("10."), "IPv4 prefix in the IPv6 table:\n{text}");
        assert!(!text.contains("127.0.0.0/8"));
        let v4 = render(&sample(), Family::V4);
        assert!(!v4.contains("fd00"), "IPv6 prefix in the IPv4 table:\n{v4}");
        assert!(!v4.contains("::1"));
    }

    #[test]
    fn exclusions_come_before_every_redirect() {
        let mut cfg = sample();
        cfg.cgroups = vec!["/a".into(), "/b".into()];
        for family in [Family::V4, Family::V6] {
            let text = render(&cfg, family);
            let rules = rules_of(&text, OUTPUT_CHAIN);
            let first_redirect = rules.iter().position(|r| r.contains("REDIRECT")).unwrap();
            assert!(rules[..first_redirect].iter().all(|r| r.ends_with("-j RETURN")));
            assert!(rules[first_redirect..].iter().all(|r| r.contains("-j REDIRECT --to-ports 15001")));
            // The agent's own traffic is matched before anything else.
            assert_eq!(rules[0], "-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN");
        }
    }

    #[test]
    fn minimal_config_redirects_everything_but_the_agent_and_loopback() {
        let mut cfg = IptablesConfig::new(7);
        cfg.inbound_ports.clear();
        let text = render(&cfg, Family::V4);
        assert_eq!(
            rules_of(&text, OUTPUT_CHAIN),
            [
                "-A MESH_OUTPUT -m mark --mark 0x7 -j RETURN",
                "-A MESH_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A MESH_OUTPUT -o lo -j RETURN",
                "-A MESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001",
            ]
        );
        assert!(!text.contains("--uid-owner"));
        // The inbound chain and both jumps exist even with nothing inbound.
        assert!(text.contains(":MESH_INBOUND - [0:0]\n"));
        assert!(rules_of(&text, INBOUND_CHAIN).is_empty());
        assert!(text.contains("\n-I OUTPUT -p tcp -j MESH_OUTPUT\n"));
        assert!(text.contains("\n-I PREROUTING -p tcp -j MESH_INBOUND\n"));
        assert!(text.starts_with("*nat\n") && text.ends_with("\nCOMMIT\n"));
    }

    #[test]
    fn cgroup_by_include_cidr_matrix() {
        let mut cfg = IptablesConfig::new(0x539);
        cfg.cgroups = vec!["/mesh/wl1".into(), "/mesh/wl2".into()];
        cfg.include_cidrs = vec![cidr("10.0.0.0/8"), cidr("fd00::/8"), cidr("192.168.0.0/16")];
        let text = render(&cfg, Family::V4);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                r#"-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001"#,
                r#"-A MESH_OUTPUT -d 192.168.0.0/16 -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001"#,
                r#"-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001"#,
                r#"-A MESH_OUTPUT -d 192.168.0.0/16 -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001"#,
            ]
        );

        // Cgroups without includes: one redirect per cgroup, no -d.
        cfg.include_cidrs.clear();
        let text = render(&cfg, Family::V6);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                r#"-A MESH_OUTPUT -p tcp -m cgroup --path "/mesh/wl1" -j REDIRECT --to-ports 15001"#,
                r#"-A MESH_OUTPUT -p tcp -m cgroup --path "/mesh/wl2" -j REDIRECT --to-ports 15001"#,
            ]
        );
    }

    #[test]
    fn include_list_without_the_family_redirects_nothing_in_it() {
        let mut cfg = IptablesConfig::new(1);
        cfg.include_cidrs = vec![cidr("10.0.0.0/8")];
        let v6 = render(&cfg, Family::V6);
        assert!(!v6.contains("REDIRECT"), "an IPv4-only include list redirected IPv6:\n{v6}");
        // The exclusions are still there, harmless.
        assert!(v6.contains("-A MESH_OUTPUT -d ::1/128 -j RETURN"));
        assert!(render(&cfg, Family::V4).contains("-d 10.0.0.0/8 -p tcp -j REDIRECT"));
    }

    #[test]
    fn inbound_ports_redirect_to_the_inbound_listener() {
        let mut cfg = IptablesConfig::new(1);
        cfg.inbound_port = 16000;
        cfg.inbound_ports = vec![80, 443];
        for family in [Family::V4, Family::V6] {
            let text = render(&cfg, family);
            assert_eq!(
                rules_of(&text, INBOUND_CHAIN),
                [
                    "-A MESH_INBOUND -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 16000",
                    "-A MESH_INBOUND -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 16000",
                ]
            );
        }
    }

    #[test]
    fn include_ports_go_into_every_redirect_fifteen_at_a_time() {
        let mut cfg = IptablesConfig::new(1);
        cfg.include_cidrs = vec![cidr("10.0.0.0/8")];
        cfg.include_ports = (1..=16).collect();
        let text = render(&cfg, Family::V4);
        let redirects: Vec<_> =
            rules_of(&text, OUTPUT_CHAIN).into_iter().filter(|r| r.contains("REDIRECT")).collect();
        assert_eq!(
            redirects,
            [
                "-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports \
                 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j REDIRECT --to-ports 15001",
                "-A MESH_OUTPUT -d 10.0.0.0/8 -p tcp -m multiport --dports 16 -j REDIRECT --to-ports 15001",
            ]
        );
    }

    #[test]
    fn restore_without_missing_jumps_only_rewrites_our_chains() {
        let text = render_restore(&sample(), Family::V4, Jumps { output: false, prerouting: true });
        assert!(!text.contains("-I OUTPUT"));
        assert!(text.contains("-I PREROUTING -p tcp -j MESH_INBOUND"));
        let text = render_restore(&sample(), Family::V4, Jumps { output: false, prerouting: false });
        assert!(!text.contains("-I "));
        // Nothing outside our chains is ever appended to.
        for line in text.lines().filter(|l| l.starts_with('-')) {
            assert!(line.starts_with("-A MESH_"), "{line}");
        }
    }

    #[test]
    fn validate_rejects_with_the_field_and_value() {
        let ok = sample();
        ok.validate().unwrap();
        let cases: Vec<(IptablesConfig, &str)> = vec![
            (IptablesConfig { mark: 0, ..ok.clone() }, "mark = 0"),
            (IptablesConfig { outbound_port: 0, ..ok.clone() }, "outbound_port = 0"),
            (IptablesConfig { inbound_port: 0, ..ok.clone() }, "inbound_port = 0"),
            (IptablesConfig { inbound_ports: vec![80, 0], ..ok.clone() }, "inbound_ports = [80, 0]"),
            (IptablesConfig { exclude_ports: vec![0], ..ok.clone() }, "exclude_ports = [0]"),
            (IptablesConfig { cgroups: vec!["mesh/wl".into()], ..ok.clone() }, r#"cgroups = "mesh/wl""#),
            (
                IptablesConfig { cgroups: vec!["/a\n-A OUTPUT -j DROP".into()], ..ok.clone() },
                r#"cgroups = "/a\n-A OUTPUT -j DROP""#,
            ),
            (IptablesConfig { cgroups: vec!["/a b".into()], ..ok.clone() }, r#"cgroups = "/a b""#),
            (IptablesConfig { cgroups: vec!["/a\"b".into()], ..ok.clone() }, r#"cgroups = "/a\"b""#),
            (IptablesConfig { cgroups: vec![format!("/{}", "x".repeat(5000))], ..ok.clone() }, "cgroups = "),
        ];
        for (cfg, needle) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, IptablesError::InvalidConfig { .. }));
            let msg = err.to_string();
            assert!(msg.contains(needle), "{msg:?} does not name {needle:?}");
        }
        // An unused inbound port may be 0.
        IptablesConfig { inbound_port: 0, inbound_ports: vec![], ..ok }.validate().unwrap();
    }

    #[test]
    fn install_rejects_a_bad_config_before_running_anything() {
        let err = install(&IptablesConfig::new(0)).unwrap_err();
        assert!(matches!(err, IptablesError::InvalidConfig { field: "mark", .. }), "{err}");
    }

    fn any_cidr() -> impl Strategy<Value = Cidr> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Cidr::new_truncating(IpAddr::V4(a.into()), p)),
            (any::<u128>(), 0u8..=128).prop_map(|(a, p)| Cidr::new_truncating(IpAddr::V6(a.into()), p)),
        ]
    }

    fn any_config() -> impl Strategy<Value = IptablesConfig> {
        let ports = || proptest::collection::vec(1u16.., 0..20);
        let cidrs = || proptest::collection::vec(any_cidr(), 0..4);
        (
            (1u16.., 1u16.., ports(), 1u32.., proptest::option::of(any::<u32>())),
            (ports(), ports(), cidrs(), cidrs()),
            (proptest::collection::vec("/[a-z0-9._@-]{0,12}(/[a-z0-9._-]{1,8}){0,2}", 0..3), any::<bool>()),
        )
            .prop_map(
                |(
                    (outbound_port, inbound_port, inbound_ports, mark, exclude_uid),
                    (include_ports, exclude_ports, include_cidrs, exclude_cidrs),
                    (cgroups, ipv6),
                )| IptablesConfig {
                    outbound_port,
                    inbound_port,
                    inbound_ports,
                    mark,
                    exclude_uid,
                    include_ports,
                    exclude_ports,
                    include_cidrs,
                    exclude_cidrs,
                    cgroups,
                    ipv6,
                },
            )
    }

    proptest! {
        /// Whatever the config: valid, every exclusion before every redirect,
        /// only the family's addresses, and one redirect per combination.
        #[test]
        fn render_invariants(cfg in any_config()) {
            prop_assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
            for family in [Family::V4, Family::V6] {
                let text = render(&cfg, family);
                let rules = rules_of(&text, OUTPUT_CHAIN);
                let first_redirect = rules.iter().position(|r| r.contains("REDIRECT")).unwrap_or(rules.len());
                prop_assert!(rules[..first_redirect].iter().all(|r| r.ends_with("-j RETURN")));
                let redirect = format!("-j REDIRECT --to-ports {}", cfg.outbound_port);
                prop_assert!(rules[first_redirect..].iter().all(|r| r.ends_with(&redirect)));
                prop_assert_eq!(rules[0], format!("-A MESH_OUTPUT -m mark --mark {:#x} -j RETURN", cfg.mark));

                let in_family = |c: &&Cidr| Family::of(&c.addr()) == family;
                let destinations = if cfg.include_cidrs.is_empty() { 1 } else { cfg.include_cidrs.iter().filter(in_family).count() };
                let cgroups = cfg.cgroups.len().max(1);
                let port_sets = cfg.include_ports.len().div_ceil(MULTIPORT_MAX).max(1);
                prop_assert_eq!(rules.len() - first_redirect, cgroups * destinations * port_sets);

                for rule in &rules {
                    let tokens: Vec<&str> = rule.split(' ').collect();
                    for pair in tokens.windows(2).filter(|w| w[0] == "-d") {
                        let c: Cidr = pair[1].parse().unwrap();
                        prop_assert_eq!(Family::of(&c.addr()), family, "{}", rule);
                    }
                }
                prop_assert_eq!(rules_of(&text, INBOUND_CHAIN).len(), cfg.inbound_ports.len());
                prop_assert_eq!(text.lines().filter(|l| l.starts_with("-I ")).count(), 2);
                prop_assert_eq!(text.lines().filter(|l| l.starts_with('*')).count(), 1);
            }
        }
    }

    #[test]
    fn restore_context_names_the_failing_line() {
        let input =
            "*nat\n:MESH_OUTPUT - [0:0]\n-A MESH_OUTPUT -p tcp -m cgroup --path \"/x\" -j RETURN\nCOMMIT\n";
        let nft = "iptables-restore v1.8.9 (nf_tables): \nline 3: RULE_APPEND failed (Invalid argument): rule in chain MESH_OUTPUT";
        let ctx = restore_context(nft, input);
        assert!(ctx.contains("line 3: `-A MESH_OUTPUT -p tcp -m cgroup"), "{ctx}");
        assert!(ctx.contains("cgroup must exist"), "{ctx}");
        let legacy = "iptables-restore: line 3 failed";
        assert!(restore_context(legacy, input).contains("line 3:"));
        assert_eq!(restore_context("line 99 failed", input), "");
        assert_eq!(restore_context("line 0 failed", input), "");
        assert_eq!(restore_context("something else", input), "");
    }

    #[test]
    fn stderr_classification() {
        for denied in [
            "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)",
            "iptables v1.8.9 (legacy): can't initialize iptables table `nat': Permission denied (you must be root)",
            "Fatal: can't open lock file /run/xtables.lock: Permission denied",
            "iptables: Operation not permitted.",
        ] {
            assert!(is_permission_denied(denied), "{denied}");
        }
        assert!(!is_permission_denied("iptables: Bad rule (does a matching rule exist in that chain?)."));
        assert!(target_missing("iptables v1.8.9 (nf_tables): Chain 'MESH_OUTPUT' does not exist"));
        assert!(target_missing(
            "iptables v1.8.9 (legacy): Couldn't load target `MESH_OUTPUT':No such file or directory"
        ));
        assert!(!target_missing("iptables v1.8.9 (nf_tables): unknown option \"--bogus\""));
    }

    /// Fake binaries: error paths without root or a real iptables.
    mod fake {
        use super::*;
        use std::os::unix::fs::PermissionsExt;
        use std::path::PathBuf;
        use std::sync::atomic::{AtomicUsize, Ordering};

        struct TempDir(PathBuf);

        impl TempDir {
            fn new() -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let dir = std::env::temp_dir().join(format!(
                    "mesh-iptables-fake-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&dir).unwrap();
                TempDir(dir)
            }

            /// Writes `iptables` and `iptables-restore` scripts with these bodies.
            fn tables(&self, iptables: &str, restore: &str) -> Tables {
                let bin = self.0.join("iptables");
                for (path, body) in [(bin.clone(), iptables), (self.0.join("iptables-restore"), restore)] {
                    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
                }
                Tables::new(Family::V4, bin.to_string_lossy().into_owned())
            }
        }

        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }

        #[test]
        fn missing_binary_says_to_install_iptables() {
            let tables = Tables::new(Family::V6, "/nonexistent/mesh-test/ip6tables".into());
            let err = tables.install(&sample()).unwrap_err();
            assert!(matches!(err, IptablesError::NotInstalled { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("/nonexistent/mesh-test/ip6tables"), "{msg}");
            assert!(msg.contains("install the iptables package"), "{msg}");
            assert!(msg.contains(ENV_IP6TABLES), "{msg}");
            assert!(matches!(tables.uninstall(), Err(IptablesError::NotInstalled { .. })));
        }

        #[test]
        fn permission_denied_names_cap_net_admin() {
            let dir = TempDir::new();
            let tables = dir.tables(
                "echo 'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)' >&2; exit 4",
                "exit 0",
            );
            for err in [tables.install(&sample()).unwrap_err(), tables.uninstall().unwrap_err()] {
                assert!(matches!(err, IptablesError::PermissionDenied { .. }), "{err:?}");
                let msg = err.to_string();
                assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
                assert!(msg.contains(r#"capabilities.add: ["NET_ADMIN"]"#), "{msg}");
                assert!(msg.contains(" -C OUTPUT -p tcp -j MESH_OUTPUT"), "{msg}");
            }
        }

        #[test]
        fn restore_failure_names_command_status_stderr_and_line() {
            let dir = TempDir::new();
            // -C: the chain does not exist yet, as nft reports it.
            let tables = dir.tables(
                "echo \"iptables v1.8.9 (nf_tables): Chain 'MESH_OUTPUT' does not exist\" >&2; exit 2",
                "cat >/dev/null; echo 'iptables-restore v1.8.9 (nf_tables): ' >&2; \
                 echo 'line 4: RULE_APPEND failed (Invalid argument): rule in chain MESH_OUTPUT' >&2; exit 1",
            );
            let err = tables.install(&sample()).unwrap_err();
            let IptablesError::Command { command, status, stderr, context } = &err else {
                panic!("{err:?}");
            };
            assert!(command.ends_with("iptables-restore -w 10 --noflush"), "{command}");
            assert_eq!(status.code(), Some(1));
            assert!(stderr.contains("RULE_APPEND failed"), "{stderr}");
            assert!(context.contains("`-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN`"), "{context}");
            let msg = err.to_string();
            assert!(msg.contains("exit status: 1"), "{msg}");
        }

        #[test]
        fn unexpected_check_failure_is_an_error_not_absence() {
            let dir = TempDir::new();
            let tables = dir.tables("echo 'iptables: unknown option \"-w\"' >&2; exit 2", "exit 0");
            let err = tables.install(&sample()).unwrap_err();
            assert!(matches!(err, IptablesError::Command { .. }), "{err:?}");
        }

        #[test]
        fn restore_exiting_early_reports_its_error_not_epipe() {
            let dir = TempDir::new();
            let tables = dir.tables("exit 1", "echo 'restore broke' >&2; exit 3");
            let big = IptablesConfig { exclude_ports: (1..=u16::MAX).collect(), ..sample() };
            let err = tables.install(&big).unwrap_err();
            assert!(err.to_string().contains("restore broke"), "{err}");
        }
    }

    /// Tests against the real kernel, each in a network namespace of its own.
    mod root {
        use super::*;
        use nix::sys::socket::{
            self, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, sockopt,
        };
        use nix::sys::time::TimeVal;
        use std::io::{Read, Write};
        use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream};
        use std::os::fd::{AsRawFd, OwnedFd};
        use std::os::unix::fs::MetadataExt;
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::time::{Duration, Instant};

        /// Root, or a skip (panic under CI, where skipping would hide the tests).
        fn have_root(test: &str) -> bool {
            if nix::unistd::geteuid().is_root() {
                return true;
            }
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
            if ci {
                panic!(
                    "{test} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for network namespaces); CI must run the tests as root"
                );
            }
            eprintln!("\n*** SKIPPED: {test} needs root (network namespaces and iptables) ***\n");
            false
        }

        /// `cmd args...` must succeed.
        fn sh(cmd: &str, args: &[&str]) -> String {
            let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(
                out.status.success(),
                "{cmd} {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// A named network namespace, deleted on drop (also when a test panics).
        struct NetNs {
            name: String,
        }

        impl NetNs {
            fn new() -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let name = format!("mesh-ipt-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
                sh("ip", &["netns", "add", &name]);
                let ns = NetNs { name };
                sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
                ns
            }

            fn path(&self) -> PathBuf {
                Path::new("/var/run/netns").join(&self.name)
            }

            /// Runs `f` on a thread that has entered this namespace. Child
            /// processes it starts (iptables, ip) and sockets it creates belong
            /// to the namespace; sockets keep it when handed to other threads.
            fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
                std::thread::scope(|s| {
                    let handle = s.spawn(|| {
                        let file = std::fs::File::open(self.path()).unwrap();
                        let inode = file.metadata().unwrap().ino();
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                        // Child processes take the calling thread's namespace, not
                        // the process's: check rather than trust it.
                        let seen = sh("readlink", &["/proc/self/ns/net"]);
                        assert_eq!(seen.trim(), format!("net:[{inode}]"), "child not in {}", self.name);
                        f()
                    });
                    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
            }
        }

        impl Drop for NetNs {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
            }
        }

        /// `iptables-save -t nat` without its timestamps and counters.
        fn save(family: Family) -> Vec<String> {
            let tables = Tables::from_env(family);
            let out = sh(&format!("{}-save", tables.iptables), &["-t", "nat"]);
            out.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                    (true, Some(i)) => format!("{} [0:0]", &l[..i]),
                    _ => l.to_owned(),
                })
                .collect()
        }

        fn ipt(family: Family, args: &[&str]) {
            sh(&Tables::from_env(family).iptables, args);
        }

        /// Rules somebody else owns, which must survive everything we do.
        fn add_foreign_rules(family: Family) {
            ipt(family, &["-t", "nat", "-N", "OTHER"]);
            ipt(family, &["-t", "nat", "-A", "OTHER", "-p", "udp", "-j", "RETURN"]);
            ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "OTHER"]);
            ipt(family, &["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "7", "-j", "OTHER"]);
            ipt(family, &["-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN"]);
        }

        /// The live table must be `before` plus exactly `cfg`'s rules, with one
        /// jump to each of our chains, at the top.
        fn assert_installed(family: Family, before: &[String], cfg: &IptablesConfig) {
            let now = save(family);
            let rendered = render(cfg, family);
            for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
                let live: Vec<&str> = now
                    .iter()
                    .map(String::as_str)
                    .filter(|l| l.starts_with(&format!("-A {chain} ")))
                    .collect();
                assert_eq!(live, rules_of(&rendered, chain), "{family} {chain}");
                assert!(now.iter().any(|l| l.starts_with(&format!(":{chain} "))));
            }
            for (hook, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
                let hook_rules: Vec<&String> =
                    now.iter().filter(|l| l.starts_with(&format!("-A {hook} "))).collect();
                let jumps = hook_rules.iter().filter(|l| l.ends_with(&format!("-j {chain}"))).count();
                assert_eq!(jumps, 1, "{family}: jumps from {hook}: {hook_rules:#?}");
                assert_eq!(
                    hook_rules[0],
                    &format!("-A {hook} -p tcp -j {chain}"),
                    "{family}: jump not first"
                );
            }
            let others: Vec<&String> = now.iter().filter(|l| !l.contains("MESH_")).collect();
            let others_before: Vec<&String> = before.iter().filter(|l| !l.contains("MESH_")).collect();
            assert_eq!(others, others_before, "{family}: a rule that is not ours changed");
            assert!(is_installed(family).unwrap());
        }

        #[test]
        fn install_replace_uninstall_restores_the_table_exactly() {
            if !have_root("install_replace_uninstall_restores_the_table_exactly") {
                return;
            }
            let ns = NetNs::new();
            ns.run(|| {
                let families = [Family::V4, Family::V6];
                for family in families {
                    add_foreign_rules(family);
                    assert!(!is_installed(family).unwrap());
                }
                let before: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();

                let a = sample();
                install(&a).unwrap();
                for (family, before) in families.iter().zip(&before) {
                    assert_installed(*family, before, &a);
                }
                let after_first: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();

                // Again: nothing changes, in particular no second jump.
                install(&a).unwrap();
                let after_second: Vec<Vec<String>> = families.iter().map(|f| save(*f)).collect();
                assert_eq!(after_first, after_second);

                // Another config replaces the rules.
                let b = IptablesConfig {
                    outbound_port: 16001,
                    inbound_port: 16006,
                    inbound_ports: vec![],
                    mark: 0x2a,
                    exclude_uid: None,
                    // More than one multiport rule's worth.
                    include_ports: (8000..8020).collect(),
                    exclude_ports: vec![53],
                    include_cidrs: vec![],
                    exclude_cidrs: vec![cidr("172.16.0.0/12"), cidr("fd12::/16")],
                    cgroups: vec![],
                    ipv6: true,
                };
                install(&b).unwrap();
                for (family, before) in families.iter().zip(&before) {
                    assert_installed(*family, before, &b);
                    assert!(!save(*family).iter().any(|l| l.contains("15001") || l.contains("0x539")));
                }

                uninstall(true).unwrap();
                for (family, before) in families.iter().zip(&before) {
                    assert_eq!(&save(*family), before, "{family}: table not restored");
                    assert!(!is_installed(*family).unwrap());
                }
                uninstall(true).unwrap();
                for (family, before) in families.iter().zip(&before) {
                    assert_eq!(&save(*family), before, "{family}: second uninstall changed the table");
                }
            });
        }

        #[test]
        fn ipv6_off_removes_stale_ipv6_rules_and_leaves_v6_alone_otherwise() {
            if !have_root("ipv6_off_removes_stale_ipv6_rules_and_leaves_v6_alone_otherwise") {
                return;
            }
            let ns = NetNs::new();
            ns.run(|| {
                let before_v6 = save(Family::V6);
                let before_v4 = save(Family::V4);
                install(&sample()).unwrap();
                assert!(is_installed(Family::V6).unwrap());
                let v4_only = IptablesConfig { ipv6: false, ..sample() };
                install(&v4_only).unwrap();
                assert_eq!(save(Family::V6), before_v6);
                assert_installed(Family::V4, &before_v4, &v4_only);
                uninstall(false).unwrap();
                assert_eq!(save(Family::V4), before_v4);
            });
        }

        #[test]
        fn uninstall_removes_duplicate_and_legacy_jumps_and_partial_installs() {
            if !have_root("uninstall_removes_duplicate_and_legacy_jumps_and_partial_installs") {
                return;
            }
            let ns = NetNs::new();
            ns.run(|| {
                for family in [Family::V4, Family::V6] {
                    add_foreign_rules(family);
                }
                let before = [save(Family::V4), save(Family::V6)];
                install(&sample()).unwrap();
                for family in [Family::V4, Family::V6] {
                    // What older or racing installers may have left.
                    ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
                    ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
                    ipt(family, &["-t", "nat", "-A", "OUTPUT", "-j", OUTPUT_CHAIN]);
                    ipt(
                        family,
                        &[
                            "-t",
                            "nat",
                            "-I",
                            "PREROUTING",
                            "2",
                            "-p",
                            "tcp",
                            "--dport",
                            "80",
                            "-j",
                            INBOUND_CHAIN,
                        ],
                    );
                }
                // A re-install does not add another jump on top of those.
                install(&sample()).unwrap();
                let jumps = save(Family::V4)
                    .iter()
                    .filter(|l| l.starts_with("-A OUTPUT -p tcp -j MESH_OUTPUT"))
                    .count();
                assert_eq!(jumps, 3);
                uninstall(true).unwrap();
                assert_eq!(save(Family::V4), before[0]);
                assert_eq!(save(Family::V6), before[1]);

                // A partial install: only the outbound chain and its jump.
                for family in [Family::V4, Family::V6] {
                    ipt(family, &["-t", "nat", "-N", OUTPUT_CHAIN]);
                    ipt(family, &["-t", "nat", "-A", OUTPUT_CHAIN, "-o", "lo", "-j", "RETURN"]);
                    ipt(family, &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
                    assert!(!is_installed(family).unwrap());
                }
                uninstall(true).unwrap();
                assert_eq!(save(Family::V4), before[0]);
                assert_eq!(save(Family::V6), before[1]);
            });
        }

        /// Waits up to `patience` for a connection on `listener`.
        fn accept_within(listener: &TcpListener, patience: Duration) -> Option<(TcpStream, SocketAddr)> {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + patience;
            loop {
                match listener.accept() {
                    Ok(conn) => return Some(conn),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) => panic!("accept: {e}"),
                }
            }
        }

        /// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` of an accepted socket.
        fn original_dst(stream: &TcpStream) -> SocketAddr {
            let fd = stream.as_raw_fd();
            if stream.local_addr().unwrap().is_ipv4() {
                let mut sa = libc::sockaddr_in {
                    sin_family: 0,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: 0 },
                    sin_zero: [0; 8],
                };
                let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                // SAFETY: `fd` is an open socket borrowed from `stream`; `sa` and
                // `len` are valid for writes and `len` is `sa`'s size.
                let rc = unsafe {
                    libc::getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len)
                };
                assert_eq!(rc, 0, "SO_ORIGINAL_DST: {}", io::Error::last_os_error());
                assert_eq!(i32::from(sa.sin_family), libc::AF_INET);
                SocketAddr::V4(SocketAddrV4::new(
                    u32::from_be(sa.sin_addr.s_addr).into(),
                    u16::from_be(sa.sin_port),
                ))
            } else {
                let mut sa = libc::sockaddr_in6 {
                    sin6_family: 0,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
                    sin6_scope_id: 0,
                };
                let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
                // SAFETY: as above, for a `sockaddr_in6`.
                let rc = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_IPV6,
                        libc::IP6T_SO_ORIGINAL_DST,
                        (&raw mut sa).cast(),
                        &mut len,
                    )
                };
                assert_eq!(rc, 0, "IP6T_SO_ORIGINAL_DST: {}", io::Error::last_os_error());
                assert_eq!(i32::from(sa.sin6_family), libc::AF_INET6);
                SocketAddr::V6(SocketAddrV6::new(
                    sa.sin6_addr.s6_addr.into(),
                    u16::from_be(sa.sin6_port),
                    0,
                    0,
                ))
            }
        }

        /// Connects with `SO_MARK` set, as the agent's own sockets do.
        fn connect_marked(dst: SocketAddr, mark: u32) -> io::Result<TcpStream> {
            let family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            let fd: OwnedFd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
            socket::setsockopt(&fd, sockopt::Mark, &mark)?;
            // Bounds a connect that is never answered.
            socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0))?;
            match dst {
                SocketAddr::V4(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn::from(a))?,
                SocketAddr::V6(a) => socket::connect(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
            }
            Ok(TcpStream::from(fd))
        }

        /// An IPv6-only listener, so it can share a port with an IPv4 one.
        fn listen_v6only(addr: SocketAddrV6) -> TcpListener {
            let fd =
                socket::socket(AddressFamily::Inet6, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true).unwrap();
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(addr)).unwrap();
            socket::listen(&fd, Backlog::new(16).unwrap()).unwrap();
            TcpListener::from(fd)
        }

        /// Agent namespace `a` (10.99.0.1, fd99::1) and a peer `b` (10.99.0.2,
        /// fd99::2) joined by a veth pair.
        fn two_hosts() -> (NetNs, NetNs) {
            let (a, b) = (NetNs::new(), NetNs::new());
            sh(
                "ip",
                &[
                    "link", "add", "va", "netns", &a.name, "type", "veth", "peer", "name", "vb", "netns",
                    &b.name,
                ],
            );
            for (ns, dev, v4, v6) in
                [(&a, "va", "10.99.0.1/24", "fd99::1/64"), (&b, "vb", "10.99.0.2/24", "fd99::2/64")]
            {
                sh("ip", &["-n", &ns.name, "addr", "add", v4, "dev", dev]);
                sh("ip", &["-n", &ns.name, "addr", "add", v6, "dev", dev, "nodad"]);
                sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
            }
            (a, b)
        }

        #[test]
        fn redirect_works_end_to_end_and_spares_marked_sockets() {
            if !have_root("redirect_works_end_to_end_and_spares_marked_sockets") {
                return;
            }
            let (a, b) = two_hosts();
            let cfg = IptablesConfig {
                outbound_port: 15101,
                inbound_port: 15106,
                inbound_ports: vec![8080],
                ..IptablesConfig::new(0x539)
            };
            let patience = Duration::from_secs(3);

            // The real destinations, in b.
            let (real4, real6) = b.run(|| {
                (TcpListener::bind("10.99.0.2:80").unwrap(), TcpListener::bind("[fd99::2]:80").unwrap())
            });
            let (out4, out6, in4, in6) = a.run(|| {
                install(&cfg).unwrap();
                (
                    TcpListener::bind(("127.0.0.1", cfg.outbound_port)).unwrap(),
                    TcpListener::bind(("::1", cfg.outbound_port)).unwrap(),
                    TcpListener::bind(("0.0.0.0", cfg.inbound_port)).unwrap(),
                    listen_v6only(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, cfg.inbound_port, 0, 0)),
                )
            });

            for (dst, outbound, real) in [
                ("10.99.0.2:80".parse::<SocketAddr>().unwrap(), &out4, &real4),
                ("[fd99::2]:80".parse().unwrap(), &out6, &real6),
            ] {
                // A workload socket lands on the agent, which learns where it was going.
                let mut client = a.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
                let (mut accepted, peer) =
                    accept_within(outbound, patience).unwrap_or_else(|| panic!("{dst}: not redirected"));
                assert_eq!(peer, client.local_addr().unwrap());
                assert_eq!(original_dst(&accepted), dst);
                client.write_all(b"ping").unwrap();
                let mut buf = [0; 4];
                accepted.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"ping");
                assert!(
                    accept_within(real, Duration::from_millis(100)).is_none(),
                    "{dst}: reached the real destination"
                );

                // The agent's own (marked) socket goes where it asked to.
                let _marked = a.run(|| connect_marked(dst, cfg.mark)).unwrap();
                assert!(accept_within(real, patience).is_some(), "{dst}: marked connection did not arrive");
                assert!(
                    accept_within(outbound, Duration::from_millis(100)).is_none(),
                    "{dst}: marked connection was redirected"
                );
            }

            // Inbound: b connects to a's port 8080, a's inbound listener takes it.
            for (dst, inbound) in [
                ("10.99.0.1:8080".parse::<SocketAddr>().unwrap(), &in4),
                ("[fd99::1]:8080".parse().unwrap(), &in6),
            ] {
                let _client = b.run(|| TcpStream::connect_timeout(&dst, patience)).unwrap();
                let (accepted, _) = accept_within(inbound, patience)
                    .unwrap_or_else(|| panic!("{dst}: not redirected inbound"));
                assert_eq!(original_dst(&accepted), dst);
            }
            // Ports not listed inbound are untouched: nothing listens on 8081.
            let refused = b.run(|| TcpStream::connect_timeout(&"10.99.0.1:8081".parse().unwrap(), patience));
            assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);

            a.run(|| uninstall(true)).unwrap();
            // With the rules gone, a workload connection reaches the destination.
            let _direct =
                a.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
            assert!(accept_within(&real4, patience).is_some());
        }

        /// The cgroup2 mount point, if cgroup2 is mounted at its root.
        fn cgroup2_root() -> Option<PathBuf> {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            mountinfo.lines().find_map(|line| {
                let (pre, post) = line.split_once(" - ")?;
                let fields: Vec<&str> = pre.split(' ').collect();
                let at_root = post.split(' ').next() == Some("cgroup2") && fields.get(3) == Some(&"/");
                at_root.then(|| fields.get(4).map(PathBuf::from)).flatten()
            })
        }

        /// A cgroup, removed on drop.
        struct Cgroup(PathBuf);

        impl Drop for Cgroup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(&self.0);
            }
        }

        #[test]
        fn cgroup_mode_redirects_only_the_listed_cgroup() {
            if !have_root("cgroup_mode_redirects_only_the_listed_cgroup") {
                return;
            }
            let Some(root) = cgroup2_root() else {
                eprintln!(
                    "\n*** SKIPPED: cgroup_mode_redirects_only_the_listed_cgroup: no cgroup2 mount ***\n"
                );
                return;
            };
            let name = format!("/mesh-ipt-test-{}", std::process::id());
            let cgroup = Cgroup(root.join(&name[1..]));
            std::fs::create_dir(&cgroup.0).unwrap();

            let (a, b) = two_hosts();
            let cfg = IptablesConfig {
                outbound_port: 15201,
                cgroups: vec![name.clone()],
                include_cidrs: vec![cidr("10.99.0.0/24")],
                ipv6: false,
                ..IptablesConfig::new(0x539)
            };
            let patience = Duration::from_secs(3);
            let real = b.run(|| TcpListener::bind("10.99.0.2:80").unwrap());
            let outbound = a.run(|| {
                install(&cfg).unwrap();
                let live = save(Family::V4);
                let want = format!(
                    "-A MESH_OUTPUT -d 10.99.0.0/24 -p tcp -m cgroup --path \"{name}\" -j REDIRECT --to-ports 15201"
                );
                assert!(live.contains(&want), "{live:#?}");
                TcpListener::bind("127.0.0.1:15201").unwrap()
            });

            // This process is not in the cgroup: not redirected.
            let _direct =
                a.run(|| TcpStream::connect_timeout(&"10.99.0.2:80".parse().unwrap(), patience)).unwrap();
            assert!(accept_within(&real, patience).is_some());
            assert!(accept_within(&outbound, Duration::from_millis(100)).is_none());

            // A process that joins the cgroup before connecting is redirected.
            let procs = cgroup.0.join("cgroup.procs");
            let script = format!(
                "echo $$ > {} && exec 3<>/dev/tcp/10.99.0.2/80 && read -r line <&3 && echo \"$line\"",
                procs.display()
            );
            let mut child =
                a.run(|| Command::new("bash").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap());
            let accepted = accept_within(&outbound, patience);
            let Some((mut accepted, _)) = accepted else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("connection from the cgroup was not redirected");
            };
            assert_eq!(original_dst(&accepted), "10.99.0.2:80".parse().unwrap());
            accepted.write_all(b"bye\n").unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            assert_eq!(String::from_utf8_lossy(&out.stdout), "bye\n");

            a.run(|| uninstall(false)).unwrap();
        }
    }
}

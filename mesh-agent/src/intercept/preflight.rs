//! What each interception mode needs from the kernel and the process, checked before
//! anything is changed, so a missing piece gives one error naming it and how to grant it.

use std::{fmt, path::Path};

use caps::{CapSet, Capability};

/// Missing prerequisites of a mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub mode: &'static str,
    pub capabilities: Vec<Capability>,
    pub other: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mode cannot start:", self.mode)?;
        if !self.capabilities.is_empty() {
            let names: Vec<String> = self.capabilities.iter().map(|c| c.to_string()).collect();
            let k8s: Vec<String> = self
                .capabilities
                .iter()
                .map(|c| format!("\"{}\"", c.to_string().trim_start_matches("CAP_")))
                .collect();
            write!(
                f,
                " missing capability {} (grant it: Kubernetes `securityContext.capabilities.add: [{}]`, \
                 docker `--cap-add {}`, or run as root);",
                names.join(", "),
                k8s.join(", "),
                k8s.iter().map(|s| s.trim_matches('"')).collect::<Vec<_>>().join(" --cap-add ")
            )?;
        }
        for o in &self.other {
            write!(f, " {o};")?;
        }
        if self.mode == "ebpf" {
            write!(f, " or use --mode iptables")?;
        }
        Ok(())
    }
}

impl Missing {
    fn into_result(self) -> Result<(), Self> {
        if self.capabilities.is_empty() && self.other.is_empty() { Ok(()) } else { Err(self) }
    }
}

fn missing_caps(needed: &[Capability]) -> Vec<Capability> {
    needed
        .iter()
        .copied()
        // If the effective set cannot be read, let the syscalls themselves fail later
        // with their own error rather than guess.
        .filter(|c| !caps::has_cap(None, CapSet::Effective, *c).unwrap_or(true))
        .collect()
}

/// The oldest kernel eBPF mode runs on (`meshctl check` states the same floor): the
/// newest kernel feature the programs use is `bpf_get_netns_cookie` in
/// `cgroup/getsockopt` (5.17), which keys original destinations by network namespace
/// so pods' identical 4-tuples never collide; before it came the same helper in
/// sockops (5.15), `SO_NETNS_COOKIE` (5.14) and `sk_lookup` (5.9).
pub const MIN_KERNEL: (u32, u32) = (5, 17);

/// `Some(release)` when `release` (`6.1.0-13-amd64`) is older than `floor`; `None` when
/// it is as new or cannot be read (the loader then says what fails).
fn kernel_below(release: &str, floor: (u32, u32)) -> Option<String> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    ((major, minor) < floor).then(|| release.to_owned())
}

/// eBPF mode: CAP_BPF to load, CAP_NET_ADMIN to attach cgroup socket programs, a
/// mounted cgroup v2 hierarchy, and a kernel from [`MIN_KERNEL`] on.
pub fn ebpf() -> Result<(), Missing> {
    let mut other = Vec::new();
    if let Err(e) = crate::cgroup::cgroup2_mount() {
        other.push(e.to_string());
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Some(found) = kernel_below(release.trim(), MIN_KERNEL) {
        other.push(format!(
            "kernel {found} is older than {}.{}, the oldest with everything eBPF mode uses (netns cookies in \
             sockops 5.15, SO_NETNS_COOKIE 5.14, sk_lookup's ingress interface 5.17)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ));
    }
    Missing {
        mode: "ebpf",
        capabilities: missing_caps(&[Capability::CAP_BPF, Capability::CAP_NET_ADMIN]),
        other,
    }
    .into_result()
}

/// iptables mode: CAP_NET_ADMIN and the iptables binaries.
pub fn iptables(ipv6: bool) -> Result<(), Missing> {
    let mut other = Vec::new();
    let mut bins = vec![super::iptables::binary(super::iptables::Family::V4)];
    if ipv6 {
        bins.push(super::iptables::binary(super::iptables::Family::V6));
    }
    for bin in bins {
        let restore = format!("{bin}-restore");
        for b in [bin.clone(), restore] {
            if which(&b).is_none() {
                other.push(format!("`{b}` not found in PATH (install the iptables package)"));
            }
        }
    }
    Missing { mode: "iptables", capabilities: missing_caps(&[Capability::CAP_NET_ADMIN]), other }
        .into_result()
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    if bin.contains('/') {
        return Path::new(bin).exists().then(|| bin.into());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_capability_and_grant() {
        let m = Missing { mode: "ebpf", capabilities: vec![Capability::CAP_BPF], other: vec![] };
        let s = m.to_string();
        assert!(s.contains("CAP_BPF"), "{s}");
        assert!(s.contains("capabilities.add: [\"BPF\"]"), "{s}");
        assert!(s.contains("--cap-add BPF"), "{s}");
        assert!(s.contains("--mode iptables"), "{s}");
        assert!(Missing { mode: "ebpf", capabilities: vec![], other: vec![] }.into_result().is_ok());
    }

    #[test]
    fn kernels_below_the_floor_are_named() {
        assert_eq!(kernel_below("5.15.0-91-generic", (5, 17)), Some("5.15.0-91-generic".into()));
        assert_eq!(kernel_below("4.19.0", (5, 17)), Some("4.19.0".into()));
        assert_eq!(kernel_below("5.17.0", (5, 17)), None);
        assert_eq!(kernel_below("6.18.44-fc-v1147", (5, 17)), None);
        assert_eq!(kernel_below("garbage", (5, 17)), None);
    }
}

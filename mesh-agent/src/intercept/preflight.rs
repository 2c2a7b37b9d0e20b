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

/// eBPF mode: CAP_BPF to load, CAP_NET_ADMIN to attach cgroup socket programs, and a
/// mounted cgroup v2 hierarchy.
pub fn ebpf() -> Result<(), Missing> {
    let mut other = Vec::new();
    if let Err(e) = crate::cgroup::cgroup2_mount() {
        other.push(e.to_string());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        // Not needed by our programs today; reported because the kernel is then likely
        // too old for netns cookies in sockops (5.15+).
        tracing::debug!("kernel has no BTF (/sys/kernel/btf/vmlinux)");
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
}

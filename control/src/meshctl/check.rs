//! `meshctl check`: will the agent's interception work on this machine, and if eBPF
//! mode will not, why. Reads only local facts (kernel release, BTF, cgroup v2,
//! this process's capabilities, the iptables binary and its backend); run it where
//! the agent will run, with the privileges it will have.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// Oldest kernel with everything eBPF mode uses: cgroup connect4/6 and getsockopt
/// programs, netns cookies in sockops (5.15), `SO_NETNS_COOKIE` (5.14) and
/// `sk_lookup`'s ingress interface (5.17, how inbound capture tells the agent's own
/// loopback connections apart). The agent checks the same floor.
pub const MIN_EBPF_KERNEL: (u32, u32) = (5, 17);

/// One fact and whether it satisfies what the agent needs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Fact {
    pub name: String,
    pub value: String,
    pub ok: bool,
    /// What to do when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The local machine's readiness for each interception mode.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub facts: Vec<Fact>,
    /// Whether `--mode ebpf` (and `auto`'s first choice) will work.
    pub ebpf: bool,
    /// Whether `--mode iptables` will work.
    pub iptables: bool,
    /// What `--mode auto` will pick, or `none`.
    pub auto_picks: &'static str,
}

/// Raw inputs, separated from the gathering so the verdict is testable.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub kernel_release: String,
    pub btf: bool,
    pub cgroup2_mount: Option<String>,
    pub cap_bpf: bool,
    pub cap_net_admin: bool,
    /// `iptables -V` output, if the binary runs.
    pub iptables_version: Option<String>,
}

impl Inputs {
    /// Reads this machine and process.
    pub fn gather() -> Self {
        let cap = |c| caps::has_cap(None, caps::CapSet::Effective, c).unwrap_or(false);
        Inputs {
            kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            cgroup2_mount: std::fs::read_to_string("/proc/self/mounts").ok().and_then(|m| {
                m.lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>())
                    .find(|f| f.get(2) == Some(&"cgroup2"))
                    .and_then(|f| f.get(1).map(|s| (*s).to_owned()))
            }),
            cap_bpf: cap(caps::Capability::CAP_BPF),
            cap_net_admin: cap(caps::Capability::CAP_NET_ADMIN),
            iptables_version: Command::new("iptables")
                .arg("-V")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        }
    }
}

fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let a: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let b: u32 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (a, b) >= (major, minor)
}

/// The verdict on `inputs`.
pub fn check(inputs: &Inputs) -> CheckReport {
    let fact = |name: &str, value: String, ok: bool, fix: &str| Fact {
        name: name.to_owned(),
        value,
        ok,
        fix: (!ok).then(|| fix.to_owned()),
    };
    let kernel_ok = kernel_at_least(&inputs.kernel_release, MIN_EBPF_KERNEL);
    let backend = inputs.iptables_version.as_deref().map(|v| {
        if v.contains("nf_tables") {
            "nf_tables"
        } else if v.contains("legacy") {
            "legacy"
        } else {
            "unknown"
        }
    });
    let facts = vec![
        fact(
            "kernel",
            inputs.kernel_release.clone(),
            kernel_ok,
            &format!("eBPF mode needs Linux {}.{} or newer", MIN_EBPF_KERNEL.0, MIN_EBPF_KERNEL.1),
        ),
        fact(
            "btf",
            if inputs.btf { "/sys/kernel/btf/vmlinux".into() } else { "absent".into() },
            inputs.btf,
            "eBPF mode needs a kernel built with CONFIG_DEBUG_INFO_BTF",
        ),
        fact(
            "cgroup2",
            inputs.cgroup2_mount.clone().unwrap_or_else(|| "not mounted".into()),
            inputs.cgroup2_mount.is_some(),
            "mount it: mount -t cgroup2 none /sys/fs/cgroup (eBPF mode attaches to cgroups)",
        ),
        fact(
            "CAP_BPF",
            if inputs.cap_bpf { "effective".into() } else { "missing".into() },
            inputs.cap_bpf,
            "run as root or add CAP_BPF (Kubernetes: securityContext.capabilities.add: [\"BPF\"])",
        ),
        fact(
            "CAP_NET_ADMIN",
            if inputs.cap_net_admin { "effective".into() } else { "missing".into() },
            inputs.cap_net_admin,
            "run as root or add CAP_NET_ADMIN (both modes need it)",
        ),
        fact(
            "iptables",
            inputs.iptables_version.clone().unwrap_or_else(|| "not found".into()),
            inputs.iptables_version.is_some(),
            "install iptables (Debian: apt-get install iptables) for the fallback mode",
        ),
        fact(
            "iptables backend",
            backend.unwrap_or("-").to_owned(),
            backend.is_some(),
            "the agent writes its chains with whichever backend `iptables` uses",
        ),
    ];
    let ebpf =
        kernel_ok && inputs.btf && inputs.cgroup2_mount.is_some() && inputs.cap_bpf && inputs.cap_net_admin;
    let iptables = inputs.iptables_version.is_some() && inputs.cap_net_admin;
    let auto_picks = if ebpf {
        "ebpf"
    } else if iptables {
        "iptables"
    } else {
        "none"
    };
    CheckReport { facts, ebpf, iptables, auto_picks }
}

/// Aligned text: one line per fact, then the verdict and, when eBPF mode will not
/// work, the reasons.
pub fn render(report: &CheckReport) -> String {
    let width = report.facts.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for f in &report.facts {
        let mark = if f.ok { "ok  " } else { "FAIL" };
        out.push_str(&format!("{mark} {:<width$}  {}\n", f.name, f.value));
    }
    out.push('\n');
    let yes_no = |b: bool| if b { "will work" } else { "will not work" };
    out.push_str(&format!("eBPF mode:     {}\n", yes_no(report.ebpf)));
    out.push_str(&format!("iptables mode: {}\n", yes_no(report.iptables)));
    out.push_str(&format!("--mode auto picks: {}\n", report.auto_picks));
    let fixes: Vec<&Fact> = report.facts.iter().filter(|f| !f.ok).collect();
    if !fixes.is_empty() {
        out.push_str("\nto fix:\n");
        for f in fixes {
            out.push_str(&format!("  {}: {}\n", f.name, f.fix.as_deref().unwrap_or_default()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Inputs {
        Inputs {
            kernel_release: "6.18.44-fc".into(),
            btf: true,
            cgroup2_mount: Some("/sys/fs/cgroup".into()),
            cap_bpf: true,
            cap_net_admin: true,
            iptables_version: Some("iptables v1.8.9 (nf_tables)".into()),
        }
    }

    #[test]
    fn a_capable_machine_runs_ebpf_mode() {
        let r = check(&ready());
        assert!(r.ebpf && r.iptables);
        assert_eq!(r.auto_picks, "ebpf");
        assert!(r.facts.iter().all(|f| f.ok));
        assert!(render(&r).contains("iptables backend  nf_tables"));
    }

    #[test]
    fn without_cap_bpf_auto_falls_back_and_says_why() {
        let r = check(&Inputs { cap_bpf: false, ..ready() });
        assert!(!r.ebpf && r.iptables);
        assert_eq!(r.auto_picks, "iptables");
        let text = render(&r);
        assert!(text.contains("FAIL CAP_BPF"), "{text}");
        assert!(text.contains("CAP_BPF: run as root or add CAP_BPF"), "{text}");
    }

    #[test]
    fn an_old_kernel_or_missing_btf_rules_out_ebpf() {
        assert!(!check(&Inputs { kernel_release: "5.4.0-150-generic".into(), ..ready() }).ebpf);
        assert!(!check(&Inputs { kernel_release: "5.15.0-91-generic".into(), ..ready() }).ebpf);
        assert!(check(&Inputs { kernel_release: "5.17.0".into(), ..ready() }).ebpf);
        assert!(!check(&Inputs { btf: false, ..ready() }).ebpf);
        assert!(!check(&Inputs { cgroup2_mount: None, ..ready() }).ebpf);
    }

    #[test]
    fn nothing_works_without_cap_net_admin() {
        let r = check(&Inputs { cap_net_admin: false, ..ready() });
        assert_eq!((r.ebpf, r.iptables, r.auto_picks), (false, false, "none"));
    }

    #[test]
    fn the_iptables_backend_is_read_from_its_version() {
        let legacy = check(&Inputs { iptables_version: Some("iptables v1.8.7 (legacy)".into()), ..ready() });
        assert!(render(&legacy).contains("legacy"));
        let none = check(&Inputs { iptables_version: None, ..ready() });
        assert!(!none.iptables && none.ebpf);
    }
}

//! Privileged tests never skip silently: without root they fail under CI and say
//! loudly that they did not run otherwise.

/// Returns true when the test may run. Under `CI=true` a missing privilege is a
/// failure, so a CI machine that lost root cannot turn the suite green by skipping.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg =
        format!("{test} needs root (network namespaces, cgroups, BPF, iptables); run the suite as root");
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{msg} (CI=true: privileged tests must run)");
    }
    eprintln!("SKIPPED (not root): {msg}");
    false
}

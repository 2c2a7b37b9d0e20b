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

/// The path of `program` on `PATH`, or `None` (with the skip reported) when it is
/// missing outside CI; under `CI=true` a missing tool fails the test, as a missing
/// privilege does. `package` names the Debian package that provides it.
pub fn require_tool(program: &str, package: &str, test: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|p| p.is_file()));
    if found.is_none() {
        let msg = format!("{test} needs `{program}` (Debian package {package}; `.ci/run` installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg} (CI=true: the test must run)");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

//! The crate's kit for tests that need more than memory: network namespaces joined
//! by veth pairs, sockets with the agent's options, cgroups, and stand-in binaries.
//! Compiled only for tests (as ztunnel keeps `src/test_helpers/`).
//!
//! Everything created is owned by a guard that removes it on drop, panics
//! included, and every name carries the test process id so parallel tests never
//! collide. Tests that need root call [`have_root`] first: without root they
//! report the skip, and under `CI` they fail instead of skipping.

pub(crate) mod cgroup;
pub(crate) mod fake_bin;
pub(crate) mod netns;
pub(crate) mod sockets;

use std::process::Command;

/// Root, or a skip (panic under CI, where skipping would hide the tests).
pub(crate) fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if under_ci() {
        panic!(
            "{test} needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for network namespaces); CI must run the tests as root"
        );
    }
    eprintln!("\n*** SKIPPED: {test} needs root (network namespaces and iptables) ***\n");
    false
}

/// Whether the tests run under CI (`CI` set, and not to `false` or `0`), where
/// a test that cannot run must fail rather than skip.
pub(crate) fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `cmd args...` must succeed; returns its stdout.
pub(crate) fn sh(cmd: &str, args: &[&str]) -> String {
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

/// Awaits `cond` (checked every 10 ms) until it holds; panics when `patience` runs
/// out first. For effects that happen on another task, in place of a fixed sleep.
pub(crate) async fn eventually(patience: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {patience:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

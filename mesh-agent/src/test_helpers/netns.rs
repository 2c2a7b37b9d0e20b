//! Network namespaces for tests: a named namespace deleted on drop, a way to run
//! code inside one, and two of them joined by a veth pair.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::sh;

/// A named network namespace (`ip netns`), deleted on drop (also when a test
/// panics).
pub(crate) struct NetNs {
    pub(crate) name: String,
}

impl NetNs {
    /// A fresh namespace with its loopback up.
    pub(crate) fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("mesh-ipt-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        sh("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Its bind mount, which `setns` opens.
    pub(crate) fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that has entered this namespace. Child processes it
    /// starts (iptables, ip) and sockets it creates belong to the namespace;
    /// sockets keep it when handed to other threads.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let handle = s.spawn(|| {
                let file = std::fs::File::open(self.path()).unwrap();
                let inode = file.metadata().unwrap().ino();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                // Child processes take the calling thread's namespace, not the
                // process's: check rather than trust it.
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

/// Agent namespace `a` (10.99.0.1, fd99::1) and a peer `b` (10.99.0.2, fd99::2)
/// joined by a veth pair.
pub(crate) fn two_hosts() -> (NetNs, NetNs) {
    let (a, b) = (NetNs::new(), NetNs::new());
    sh(
        "ip",
        &["link", "add", "va", "netns", &a.name, "type", "veth", "peer", "name", "vb", "netns", &b.name],
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

//! Test hosts: one network namespace per host, all joined to a bridge that lives in a
//! "switch" namespace of its own, so nothing touches the machine's root namespace.
//!
//! Host `i` (1-based) of a lab has `eth0` with `10.77.0.i/24` and `fd77::i/64`.
//! Labs are isolated from each other, so every lab uses the same addresses.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);
static NEXT_NETNS: AtomicUsize = AtomicUsize::new(0);
/// Prefix of every namespace the tests create: `mt<pid>-<lab>-<host>`.
const PREFIX: &str = "mt";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Removes namespaces left by test processes that no longer exist (a killed run).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A namespace of its own, as a container runtime makes one for a pod sandbox
    /// (loopback up), named `mt<pid>-<label><n>` so a killed run's are removed later.
    pub fn new(label: &str) -> Result<Self> {
        remove_stale();
        let n = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        Self::create(format!("{PREFIX}{}-{label}{n}", std::process::id()))
    }

    fn create(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `ip ...` inside the namespace.
    pub fn exec_ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A command that runs inside the network namespace at `ns_path` (a host's, a
/// pod's), optionally inside `cgroup`. The namespace switch happens in the child
/// between fork and exec, so threads of the test process never change namespace.
pub fn command_in(
    ns_path: &str,
    program: impl AsRef<std::ffi::OsStr>,
    cgroup: Option<&Path>,
) -> Result<Command> {
    let ns = File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
    let procs = match cgroup {
        Some(cg) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .context("opening cgroup.procs")?,
        ),
        None => None,
    };
    let mut cmd = Command::new(program);
    // SAFETY: between fork and exec only async-signal-safe calls are made: setns(2)
    // and write(2) on descriptors opened beforehand; the closure captures them by
    // move and they stay open until the child execs (then O_CLOEXEC closes them).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // Writing "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// One test host.
pub struct Host {
    pub name: String,
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    /// `addr:port` on this host's IPv4 address.
    pub fn v4_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4), port)
    }

    /// `[addr]:port` on this host's IPv6 address.
    pub fn v6_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.v6), port)
    }

    /// A command that runs inside this host's namespace, optionally inside `cgroup`.
    /// The namespace switch happens in the child between fork and exec, so threads of
    /// the test process never change namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, cgroup: Option<&Path>) -> Result<Command> {
        command_in(&self.ns.path(), program, cgroup)
    }

    /// Runs `f` on a new thread that lives in this host's namespace (sockets it creates
    /// belong to the host). Used for in-process servers and admin requests.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<T>> {
        let ns = File::open(self.ns.path())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET);
            let ok = entered.is_ok();
            let _ = tx.send(entered.map_err(|e| e.to_string()));
            assert!(ok, "setns failed");
            f()
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => bail!("setns into {}: {e}", self.ns.name()),
            Err(_) => bail!("namespace thread died"),
        }
    }

    /// Runs `f` in this host's namespace and returns its result.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn_in(f)?.join().map_err(|_| anyhow::anyhow!("namespace thread panicked"))
    }

    /// A plain HTTP/1.0 request from inside the host (for the agent's admin endpoint).
    pub fn http(&self, method: &'static str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        self.run_in(move || -> Result<(u16, String)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "{method} {path} HTTP/1.0\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let status = resp
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status in response")?;
            let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            Ok((status, body))
        })?
    }

    /// Runs `ip ...` inside the host.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.ns.exec_ip(args)
    }

    /// The host's IPv4 and IPv6 `nat` tables (`iptables-save -t nat`, then
    /// `ip6tables-save -t nat`), without the comment lines, which carry a
    /// timestamp: two calls return the same text when nothing changed.
    pub fn nat_tables(&self) -> Result<String> {
        let mut all = String::new();
        for bin in ["iptables-save", "ip6tables-save"] {
            let out = self
                .command(bin, None)?
                .args(["-t", "nat"])
                .output()
                .with_context(|| format!("running {bin}"))?;
            ensure!(out.status.success(), "{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
            for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with('#')) {
                all.push_str(line);
                all.push('\n');
            }
        }
        Ok(all)
    }
}

/// A set of hosts on one bridge.
pub struct Lab {
    pub hosts: Vec<Host>,
    _switch: Netns,
}

impl Lab {
    /// Creates `names.len()` hosts.
    pub fn new(names: &[&str]) -> Result<Self> {
        remove_stale();
        let lab = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let base = format!("{PREFIX}{}-{lab}", std::process::id());
        let switch = Netns::create(format!("{base}-sw"))?;
        switch.exec_ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.exec_ip(&["link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let n = i + 1;
            let ns = Netns::create(format!("{base}-{name}"))?;
            let port = format!("p{n}");
            ip(&[
                "link",
                "add",
                "eth0",
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                switch.name(),
            ])?;
            switch.exec_ip(&["link", "set", &port, "master", "br0", "up"])?;
            let v4 = Ipv4Addr::new(10, 77, 0, n as u8);
            let v6: Ipv6Addr = format!("fd77::{n}").parse()?;
            ns.exec_ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.exec_ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ns.exec_ip(&["link", "set", "eth0", "up"])?;
            // Service VIPs (10.96.0.0/16, fd96::/64) are routed onto the bridge, as a
            // cluster routes its service range, so a workload's connect() to a VIP
            // gets past the routing decision in iptables mode (eBPF rewrites earlier).
            ns.exec_ip(&["route", "add", "10.96.0.0/16", "dev", "eth0"])?;
            // So are the VIPs the control plane allocates for hostnames without one
            // (--dns-vip-range's default).
            ns.exec_ip(&["route", "add", "240.240.0.0/16", "dev", "eth0"])?;
            ns.exec_ip(&["-6", "route", "add", "fd96::/64", "dev", "eth0"])?;
            hosts.push(Host { name: (*name).to_owned(), ns, v4, v6 });
        }
        Ok(Self { hosts, _switch: switch })
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }
}

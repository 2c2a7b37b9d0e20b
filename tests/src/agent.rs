//! The real `mesh-agent` binary, running inside a test host in a cgroup of its own,
//! with its JSON log captured line by line.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde_json::Value;

pub use crate::process::message;
use crate::{bins, cgroup::Cgroup, netns::Host, process::LoggedChild};

/// Where an agent pins its eBPF interception (`--bpffs-dir`): one directory per test
/// agent, removed (which detaches everything pinned there) when the last holder drops
/// it. Interception outlives the agent process on purpose (it fails closed); a test
/// that restarts an agent passes the same `Pins` to the new one, which adopts them.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
}

/// bpffs directories of test agents: `<BPFFS>/mt<pid>-<n>`.
const BPFFS: &str = "/sys/fs/bpf";
static NEXT_PINS: AtomicUsize = AtomicUsize::new(0);

impl Pins {
    pub fn new() -> Arc<Self> {
        remove_stale_pins();
        let n = NEXT_PINS.fetch_add(1, Ordering::Relaxed);
        Arc::new(Self { dir: Path::new(BPFFS).join(format!("mt{}-{n}", std::process::id())) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes pins left by test processes that no longer exist (a killed run), so their
/// programs stop running on every connect of the machine.
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir(BPFFS) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("mt").and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// How to start an agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// `ebpf`, `iptables` or `auto`.
    pub mode: String,
    /// Workload cgroups to enroll with `--cgroup`.
    pub cgroups: Vec<String>,
    /// Extra flags.
    pub args: Vec<String>,
    /// Run the agent inside this cgroup instead of a fresh one (to test that the
    /// agent's own connections are never intercepted even when it is enrolled).
    pub in_cgroup: Option<String>,
    /// Log filter (`--log`); default `info,mesh_agent=debug`.
    pub log: Option<String>,
    /// Run the agent under this command (e.g. `setpriv` dropping capabilities).
    pub wrapper: Option<Vec<String>>,
    /// Where its eBPF interception is pinned (a fresh directory when `None`).
    pub pins: Option<Arc<Pins>>,
}

impl AgentOptions {
    pub fn new(mode: &str) -> Self {
        Self { mode: mode.to_owned(), ..Default::default() }
    }

    pub fn cgroup(mut self, cg: &Cgroup) -> Self {
        self.cgroups.push(cg.relative().to_owned());
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Pins interception where an earlier agent did (a restart adopting it).
    pub fn pins(mut self, pins: &Arc<Pins>) -> Self {
        self.pins = Some(pins.clone());
        self
    }
}

/// A running agent; terminated gracefully (SIGTERM, bounded wait) on drop.
pub struct Agent {
    process: LoggedChild,
    /// The read-only admin port (in the agent's host).
    pub admin: SocketAddr,
    /// The admin socket, where requests that change the agent go ([`Agent::post`]).
    pub admin_socket: PathBuf,
    // Dropped after the process is gone (fields drop in declaration order).
    pins: Arc<Pins>,
    _socket_dir: SocketDir,
    _cgroup: Option<Cgroup>,
}

/// Where the harness's agents put their admin sockets: one directory per agent
/// (the agent creates it, mode 0700), since tests run agents side by side.
const SOCKET_ROOT: &str = "/run/mesh-tests";

/// An agent's socket directory, removed (with anything left in it) on drop.
struct SocketDir(PathBuf);

impl SocketDir {
    fn new() -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::fs::create_dir_all(SOCKET_ROOT).with_context(|| format!("creating {SOCKET_ROOT}"))?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(SOCKET_ROOT).join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(Self(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    /// Starts an agent in `host` and waits until it logs "agent ready" (or fails).
    pub fn start(host: &Host, opts: AgentOptions) -> Result<Self> {
        let (own, cgroup_dir) = match &opts.in_cgroup {
            Some(rel) => (None, crate::cgroup::mount()?.join(rel.trim_start_matches('/'))),
            None => {
                let cg = Cgroup::new("agent")?;
                let dir = cg.absolute().to_path_buf();
                (Some(cg), dir)
            }
        };
        let mut cmd = match &opts.wrapper {
            Some(w) => {
                let mut c = host.command(&w[0], Some(&cgroup_dir))?;
                c.args(&w[1..]).arg(bins::agent());
                c
            }
            None => host.command(bins::agent(), Some(&cgroup_dir))?,
        };
        let pins = opts.pins.clone().unwrap_or_else(Pins::new);
        let socket_dir = SocketDir::new()?;
        let admin_socket = socket_dir.0.join("agent.sock");
        cmd.arg("run").args(["--mode", &opts.mode, "--log-format", "json"]);
        cmd.arg("--bpffs-dir").arg(pins.path());
        cmd.arg("--admin-socket").arg(&admin_socket);
        cmd.args(["--log", opts.log.as_deref().unwrap_or("info,mesh_agent=debug")]);
        for cg in &opts.cgroups {
            cmd.args(["--cgroup", cg]);
        }
        cmd.args(&opts.args);
        let mut process = LoggedChild::spawn("mesh-agent", cmd)?;
        process.wait_ready("agent ready", Duration::from_secs(30))?;
        Ok(Self {
            process,
            admin: "127.0.0.1:15000".parse().expect("valid"),
            admin_socket,
            pins,
            _socket_dir: socket_dir,
            _cgroup: own,
        })
    }

    /// POSTs `path` (with its query) on the agent's admin socket, as root does with
    /// `meshctl agent`; returns the status and body.
    pub fn post(&self, path: &str) -> Result<(u16, String)> {
        self.socket_request("POST", path)
    }

    /// `method path` on the admin socket; the status and body.
    pub fn socket_request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        let mut s = UnixStream::connect(&self.admin_socket)
            .with_context(|| format!("connecting to {}", self.admin_socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "{method} {path} HTTP/1.0\r\nHost: agent\r\nContent-Length: 0\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status =
            resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("no status in response")?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }

    /// Everything the agent printed so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The first JSON log line matching `pred`.
    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.process.find(pred)
    }

    /// All JSON log lines matching `pred`.
    pub fn find_all(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.process.find_all(pred)
    }

    /// Waits until the agent holds its workload certificate and has applied its first
    /// discovery snapshot: from then on it carries meshed traffic.
    pub fn wait_enrolled(&self) {
        self.wait_log("workload certificate", |v| message(v) == "workload certificate issued");
        self.wait_log("first discovery snapshot", |v| message(v) == "snapshot applied");
    }

    /// Waits for a log line matching `pred`; on timeout the panic shows the agent's log.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.process.wait_log(what, pred)
    }

    /// Waits for the "connection closed" record of a connection to `orig_dst`.
    pub fn wait_conn(&self, orig_dst: SocketAddr) -> Value {
        let want = orig_dst.to_string();
        self.wait_log(&format!("connection record for {want}"), |v| {
            message(v) == "connection closed" && v["orig_dst"] == want.as_str()
        })
    }

    /// "connection closed" records so far.
    pub fn connections(&self) -> Vec<Value> {
        self.find_all(|v| message(v) == "connection closed")
    }

    /// The mode the agent chose.
    pub fn mode(&self) -> String {
        self.find(|v| message(v) == "interception mode selected")
            .and_then(|v| v["mode"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Where the agent pins its eBPF interception (pass to a restarted agent with
    /// [`AgentOptions::pins`]).
    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        self.process.stop(Signal::SIGTERM)
    }

    /// Sends SIGTERM, waits (bounded) for a clean exit, and returns every JSON line
    /// the agent printed (the access log's last lines included).
    pub fn terminate_with_log(mut self) -> Result<(ExitStatus, Vec<Value>)> {
        let status = self.process.stop(Signal::SIGTERM)?;
        Ok((status, self.process.find_all(|_| true)))
    }

    /// SIGKILL: nothing runs after this, like an OOM kill.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.process.stop(Signal::SIGKILL)
    }
}

//! The real `mesh-agent` binary, running inside a test host in a cgroup of its own,
//! with its JSON log captured line by line.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{bins, cgroup::Cgroup, netns::Host, wait::eventually};

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
}

/// A running agent; terminated gracefully (SIGTERM, bounded wait, then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    pub admin: SocketAddr,
    // Dropped after the process is gone (fields drop after `Drop::drop`).
    _cgroup: Option<Cgroup>,
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
        cmd.arg("run").args(["--mode", &opts.mode, "--log-format", "json"]);
        cmd.args(["--log", opts.log.as_deref().unwrap_or("info,mesh_agent=debug")]);
        for cg in &opts.cgroups {
            cmd.args(["--cgroup", cg]);
        }
        cmd.args(&opts.args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning mesh-agent")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (lines, raw) = (lines.clone(), raw.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("MESH_TEST_VERBOSE").is_some() {
                        eprintln!("agent| {line}");
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        lines.lock().unwrap().push(v);
                    }
                    raw.lock().unwrap().push(line);
                }
            }));
        }
        let mut agent = Self {
            child: Some(child),
            lines,
            raw,
            readers,
            admin: "127.0.0.1:15000".parse().expect("valid"),
            _cgroup: own,
        };
        let ready = Duration::from_secs(30);
        let start = std::time::Instant::now();
        loop {
            if agent.find(|v| message(v) == "agent ready").is_some() {
                break;
            }
            if let Some(status) = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Let the reader threads drain what the process printed.
                std::thread::sleep(Duration::from_millis(50));
                bail!("mesh-agent exited with {status} before ready:\n{}", agent.log_text());
            }
            if start.elapsed() > ready {
                bail!("mesh-agent not ready after {ready:?}:\n{}", agent.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(agent)
    }

    /// Everything the agent printed so far.
    pub fn log_text(&self) -> String {
        self.raw.lock().unwrap().join("\n")
    }

    /// The first JSON log line matching `pred`.
    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.lines.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// All JSON log lines matching `pred`.
    pub fn find_all(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.lines.lock().unwrap().iter().filter(|v| pred(v)).cloned().collect()
    }

    /// Waits for a log line matching `pred`; on timeout the panic shows the agent's log.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            if std::time::Instant::now() >= deadline {
                panic!("timed out waiting for {what}; agent log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        self.stop(nix::sys::signal::Signal::SIGTERM)
    }

    /// SIGKILL: nothing runs after this, like an OOM kill.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.stop(nix::sys::signal::Signal::SIGKILL)
    }

    fn stop(&mut self, sig: nix::sys::signal::Signal) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
        let status = eventually(Duration::from_secs(20), "agent exit", || child.try_wait().ok().flatten());
        // The log readers end when the pipes close with the process.
        eventually(Duration::from_secs(5), "agent log drained", || {
            self.readers.iter().all(|r| r.is_finished()).then_some(())
        });
        Ok(status)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The `message` field of a JSON log line.
pub fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

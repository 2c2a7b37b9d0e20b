//! A running `mesh-control` in a test host, with its JSON log captured.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Host, agent::message, bins, eventually};

/// The gRPC port the tests' control planes listen on.
pub const GRPC_PORT: u16 = 15010;
/// The admin port (loopback of the control plane's host).
pub const ADMIN_PORT: u16 = 15011;

/// A control-plane process; SIGTERM on drop.
pub struct Control {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Where agents reach it: `http://<host v4>:15010`.
    pub url: String,
    pub admin: SocketAddr,
}

impl Control {
    /// Starts `mesh-control --registry <registry>` in `host` and waits until it serves.
    pub fn start(host: &Host, registry: &Path, args: &[&str]) -> Result<Self> {
        let mut cmd = host.command(bins::control(), None)?;
        cmd.args(["--registry"])
            .arg(registry)
            .args([
                "--listen",
                &format!("0.0.0.0:{GRPC_PORT}"),
                "--admin-addr",
                &format!("127.0.0.1:{ADMIN_PORT}"),
            ])
            .args(["--log-json", "--log", "info,control=debug"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning mesh-control")?;
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
                        eprintln!("control| {line}");
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        lines.lock().unwrap().push(v);
                    }
                    raw.lock().unwrap().push(line);
                }
            }));
        }
        let mut control = Self {
            child: Some(child),
            lines,
            raw,
            readers,
            url: format!("http://{}:{GRPC_PORT}", host.v4),
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
        };
        let start = std::time::Instant::now();
        loop {
            if control.find(|v| message(v) == "control plane serving").is_some() {
                return Ok(control);
            }
            if let Some(status) = control.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                std::thread::sleep(Duration::from_millis(50));
                bail!("mesh-control exited with {status} before serving:\n{}", control.log_text());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("mesh-control not serving after 30s:\n{}", control.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        self.raw.lock().unwrap().join("\n")
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.lines.lock().unwrap().iter().find(|v| pred(v)).cloned()
    }

    /// Waits (15 s at most) for a log line; the panic shows the log.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            if std::time::Instant::now() >= deadline {
                panic!("timed out waiting for {what}; control plane log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and a bounded wait for the exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        self.stop()
    }

    fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status =
            eventually(Duration::from_secs(20), "control plane exit", || child.try_wait().ok().flatten());
        eventually(Duration::from_secs(5), "control log drained", || {
            self.readers.iter().all(|r| r.is_finished()).then_some(())
        });
        Ok(status)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

//! A child process of the suite (agent, control plane) whose stdout and stderr are
//! captured line by line, JSON lines parsed when a caller first looks for them, and
//! which is stopped with a signal and a bounded wait.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::wait::eventually;

/// The `message` field of a JSON log line.
pub fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap_or_default()
}

/// A running child with its output captured.
pub struct LoggedChild {
    name: &'static str,
    child: Option<Child>,
    log: Arc<Mutex<Log>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// A child's output: every line as printed, and the JSON ones parsed.
///
/// Lines are parsed when a caller first searches, not as they arrive: an agent logs
/// one line per connection it closes, and parsing thousands a second into `Value`s
/// as they came cost the benchmarks' harness a tenth of the machine's CPU, beside
/// the agents it was measuring (`perf` of `bench peers` under `Connection: close`).
#[derive(Default)]
struct Log {
    raw: Vec<String>,
    /// `parsed[i]` is line `i` if it is JSON; only the first `parsed.len()` lines have
    /// been looked at.
    parsed: Vec<Option<Value>>,
}

impl Log {
    /// The JSON lines, parsing those not seen yet.
    fn json(&mut self) -> impl Iterator<Item = &Value> {
        for line in &self.raw[self.parsed.len()..] {
            self.parsed.push(line.starts_with('{').then(|| serde_json::from_str(line).ok()).flatten());
        }
        self.parsed.iter().flatten()
    }
}

impl LoggedChild {
    /// Spawns `cmd` with piped output; `name` prefixes echoed lines
    /// (`MESH_TEST_VERBOSE`) and error messages.
    pub fn spawn(name: &'static str, mut cmd: Command) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let mut readers = Vec::new();
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if std::env::var_os("MESH_TEST_VERBOSE").is_some() {
                        eprintln!("{name}| {line}");
                    }
                    log.lock().unwrap().raw.push(line);
                }
            }));
        }
        Ok(Self { name, child: Some(child), log, readers })
    }

    /// Waits until a log line has `message == ready` (or fails with the log when the
    /// process exits first or `within` passes).
    pub fn wait_ready(&mut self, ready: &str, within: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.find(|v| message(v) == ready).is_some() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                // Let the readers drain what the process printed before it exited.
                eventually(Duration::from_secs(5), "output drained", || {
                    self.readers.iter().all(|r| r.is_finished()).then_some(())
                });
                bail!("{} exited with {status} before {ready:?}:\n{}", self.name, self.log_text());
            }
            if start.elapsed() > within {
                bail!("{} not {ready:?} after {within:?}:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything printed so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().raw.join("\n")
    }

    /// The first JSON line matching `pred`.
    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.log.lock().unwrap().json().find(|v| pred(v)).cloned()
    }

    /// All JSON lines matching `pred`.
    pub fn find_all(&self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.log.lock().unwrap().json().filter(|v| pred(v)).cloned().collect()
    }

    /// Waits (15 s at most) for a JSON line; the panic shows the log.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(v) = self.find(&pred) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}; {} log:\n{}", self.name, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `sig`, waits (bounded) for the exit and for the output to drain.
    pub fn stop(&mut self, sig: Signal) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let status = eventually(Duration::from_secs(20), &format!("{} exit", self.name), || {
            child.try_wait().ok().flatten()
        });
        eventually(Duration::from_secs(5), "output drained", || {
            self.readers.iter().all(|r| r.is_finished()).then_some(())
        });
        Ok(status)
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop(Signal::SIGTERM);
        }
    }
}

/// Memory of a running process, from `/proc/PID/status`: resident now (`VmRSS`) and
/// the most it has been resident since it started (`VmHWM`), in KiB.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

impl Memory {
    /// Reads `pid`'s figures; `None` once the process is gone.
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Some(Self { rss_kib: field("VmRSS:")?, peak_kib: field("VmHWM:")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_found_whenever_they_arrive_and_other_lines_are_skipped() {
        let mut log = Log::default();
        log.raw.push(r#"{"message":"first"}"#.into());
        log.raw.push("plain text from a panic".into());
        assert_eq!(log.json().map(message).collect::<Vec<_>>(), ["first"]);
        log.raw.push(r#"{"message":"second"}"#.into());
        log.raw.push("{ not json".into());
        assert_eq!(log.json().map(message).collect::<Vec<_>>(), ["first", "second"]);
        assert_eq!(log.parsed.len(), 4, "every line looked at once");
    }
}

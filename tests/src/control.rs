//! A running `mesh-control` in a test host, with its JSON log captured.

use std::{net::SocketAddr, path::Path, process::ExitStatus, time::Duration};

use anyhow::Result;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{Host, bins, process::LoggedChild};

/// The gRPC port the tests' control planes listen on.
pub const GRPC_PORT: u16 = 15010;
/// The admin port (loopback of the control plane's host).
pub const ADMIN_PORT: u16 = 15011;

/// A control-plane process; SIGTERM on drop.
pub struct Control {
    process: LoggedChild,
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
            .args(args);
        let mut process = LoggedChild::spawn("mesh-control", cmd)?;
        process.wait_ready("control plane serving", Duration::from_secs(30))?;
        Ok(Self {
            process,
            url: format!("http://{}:{GRPC_PORT}", host.v4),
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
        })
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        self.process.find(pred)
    }

    /// Waits (15 s at most) for a log line; the panic shows the log.
    pub fn wait_log(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.process.wait_log(what, pred)
    }

    /// SIGTERM and a bounded wait for the exit.
    pub fn terminate(mut self) -> Result<ExitStatus> {
        self.process.stop(Signal::SIGTERM)
    }
}

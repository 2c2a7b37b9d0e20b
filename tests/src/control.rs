//! A running `mesh-control` in a test host, with its JSON log captured.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use anyhow::Result;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{AgentOptions, Host, bins, process::LoggedChild};

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
    /// Where [`Control::start_with_ca`] wrote each node's bootstrap token.
    tokens: Option<PathBuf>,
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
            tokens: None,
        })
    }

    /// [`Control::start`] with the control plane's CA in `dir/ca` and one bootstrap
    /// token per node of `nodes`, each also written to `dir/<node>.token` for that
    /// node's agent (see [`Control::agent_options`]); `args` are further flags.
    pub fn start_with_ca(
        host: &Host,
        registry: &Path,
        dir: &Path,
        nodes: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let table: String = nodes.iter().map(|n| format!("tok-{n} {n}\n")).collect();
        std::fs::write(dir.join("tokens"), table)?;
        for n in nodes {
            std::fs::write(dir.join(format!("{n}.token")), format!("tok-{n}\n"))?;
        }
        let (tokens, ca) = (dir.join("tokens").display().to_string(), dir.join("ca").display().to_string());
        let mut all = vec!["--bootstrap-tokens", &tokens, "--ca-dir", &ca];
        all.extend_from_slice(args);
        let mut control = Self::start(host, registry, &all)?;
        control.tokens = Some(dir.to_owned());
        Ok(control)
    }

    /// Options for an agent on `node` with `identity` (`namespace/service-account`),
    /// enrolled with this control plane through the node's bootstrap token.
    ///
    /// # Panics
    /// If the control plane was not started with [`Control::start_with_ca`].
    pub fn agent_options(&self, mode: &str, node: &str, identity: &str) -> AgentOptions {
        let tokens = self.tokens.as_ref().expect("agent_options needs a control plane from start_with_ca");
        AgentOptions::new(mode)
            .arg("--control-plane")
            .arg(self.url.clone())
            .arg("--node")
            .arg(node)
            .arg("--identity")
            .arg(identity)
            .arg("--bootstrap-token-file")
            .arg(tokens.join(format!("{node}.token")).display().to_string())
    }

    /// Options for an agent on `node` enrolled with this control plane through the
    /// node's bootstrap token, with no static workload identity: one that serves pods
    /// (their identities come from the control plane).
    ///
    /// # Panics
    /// If the control plane was not started with [`Control::start_with_ca`].
    pub fn node_options(&self, mode: &str, node: &str) -> AgentOptions {
        let tokens = self.tokens.as_ref().expect("node_options needs a control plane from start_with_ca");
        AgentOptions::new(mode)
            .arg("--control-plane")
            .arg(self.url.clone())
            .arg("--node")
            .arg(node)
            .arg("--bootstrap-token-file")
            .arg(tokens.join(format!("{node}.token")).display().to_string())
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

//! A running `mesh-control` in a test host, with its JSON log captured.
//!
//! As in production, agents reach it over TLS (`https://`), verify it against the
//! CA's root it wrote (their `--control-plane-ca`), and authenticate with their
//! node's bootstrap token, which [`Control`] writes on demand for each node an
//! agent is started for.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use anyhow::{Context, Result};
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
    /// Where agents reach it: `https://<host v4>:15010`.
    pub url: String,
    pub admin: SocketAddr,
    /// Its CA's root: the agents' trust anchor (`--control-plane-ca`).
    pub ca_pem: PathBuf,
    /// The tokens file, the CA's directory (`ca/`) and each node's token file.
    dir: PathBuf,
    /// Owned when [`Control::start`] made the directory itself.
    _own_dir: Option<tempfile::TempDir>,
}

impl Control {
    /// Starts `mesh-control --registry <registry>` in `host` with its CA and bootstrap
    /// tokens in a fresh temporary directory, and waits until it serves; `args` are
    /// further flags.
    pub fn start(host: &Host, registry: &Path, args: &[&str]) -> Result<Self> {
        let own = tempfile::tempdir()?;
        let mut control = Self::start_with_ca(host, registry, own.path(), &[], args)?;
        control._own_dir = Some(own);
        Ok(control)
    }

    /// [`Control::start`] with the CA in `dir/ca` and the tokens in `dir/tokens`, each
    /// node's also in `dir/<node>.token` (written for `nodes` now, for other nodes when
    /// an agent is started for them). A later start in the same `dir` is the same
    /// control plane restarted: same root, same tokens.
    pub fn start_with_ca(
        host: &Host,
        registry: &Path,
        dir: &Path,
        nodes: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let tokens = dir.join("tokens");
        if !tokens.exists() {
            std::fs::write(&tokens, "")?;
        }
        for n in nodes {
            add_token(dir, n)?;
        }
        let ca = dir.join("ca");
        let mut cmd = host.command(bins::control(), None)?;
        cmd.args(["--registry"])
            .arg(registry)
            .arg("--bootstrap-tokens")
            .arg(&tokens)
            .arg("--ca-dir")
            .arg(&ca)
            .args([
                "--listen",
                &format!("0.0.0.0:{GRPC_PORT}"),
                "--admin-addr",
                &format!("127.0.0.1:{ADMIN_PORT}"),
            ])
            .args(["--log-format", "json", "--log", "info,control=debug"])
            .args(args);
        let mut process = LoggedChild::spawn("mesh-control", cmd)?;
        process.wait_ready("control plane serving", Duration::from_secs(30))?;
        Ok(Self {
            process,
            url: format!("https://{}:{GRPC_PORT}", host.v4),
            admin: SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)),
            ca_pem: ca.join("ca.pem"),
            dir: dir.to_owned(),
            _own_dir: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The directory of the CA and the tokens.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file holding `node`'s bootstrap token (made, and known to the control plane,
    /// on first use).
    ///
    /// # Panics
    /// If the files cannot be written.
    pub fn token_file(&self, node: &str) -> PathBuf {
        add_token(&self.dir, node).expect("write the node's bootstrap token")
    }

    /// Options for an agent on `node` subscribed to this control plane (TLS, the CA's
    /// root as anchor, the node's token), without a workload identity.
    pub fn discovery_options(&self, mode: &str, node: &str) -> AgentOptions {
        AgentOptions::new(mode)
            .arg("--control-plane")
            .arg(self.url.clone())
            .arg("--control-plane-ca")
            .arg(self.ca_pem.display().to_string())
            .arg("--node")
            .arg(node)
            .arg("--bootstrap-token-file")
            .arg(self.token_file(node).display().to_string())
    }

    /// Options for an agent on `node` with `identity` (`namespace/service-account`),
    /// enrolled with this control plane through the node's bootstrap token.
    pub fn agent_options(&self, mode: &str, node: &str, identity: &str) -> AgentOptions {
        self.discovery_options(mode, node).arg("--identity").arg(identity)
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

/// Makes sure `dir/tokens` lists `node` (as `tok-<node> <node>`) and `dir/<node>.token`
/// holds its token; returns the latter. The control plane re-reads the list on every
/// call, so a node added while it runs is known at once.
fn add_token(dir: &Path, node: &str) -> Result<PathBuf> {
    let tokens = dir.join("tokens");
    let line = format!("tok-{node} {node}");
    let known = std::fs::read_to_string(&tokens).unwrap_or_default();
    if !known.lines().any(|l| l.trim() == line) {
        use std::io::Write as _;
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&tokens).context("tokens file")?;
        writeln!(f, "{line}")?;
    }
    let file = dir.join(format!("{node}.token"));
    if !file.exists() {
        std::fs::write(&file, format!("tok-{node}\n"))?;
    }
    Ok(file)
}

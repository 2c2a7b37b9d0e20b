//! Calling CNI plugins exactly as a container runtime does, for tests and labs that
//! wire pods with the real plugins (Debian's `containernetworking-plugins`:
//! `/usr/lib/cni/bridge`, `host-local`) and `mesh-cni` chained after them.
//!
//! [`CniChain`] runs a conflist's plugins in order for ADD and CHECK and in reverse
//! for DEL, each as its own process with the `CNI_*` environment and its network
//! configuration on stdin (`name` and `cniVersion` from the list, `prevResult`
//! threaded from one plugin to the next on ADD, the ADD's result on CHECK and DEL),
//! inside the node's network namespace. A pod's network namespace is a
//! [`Netns`](crate::netns::Netns), as a runtime makes one before calling ADD.

use std::{
    fs::File,
    io::Write,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where Debian's package puts the reference plugins.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// One pod sandbox as the runtime names it to the plugins.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; `None` leaves the variable unset.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`, e.g. from [`Sandbox::k8s`].
    pub args: String,
}

impl Sandbox {
    /// A Kubernetes pod's sandbox, with the `CNI_ARGS` the kubelet's runtimes pass.
    pub fn k8s(container_id: &str, netns: &str, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            netns: Some(netns.to_owned()),
            ifname: "eth0".to_owned(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
                 K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
            ),
        }
    }
}

/// One plugin process: what it was given and what it printed.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub plugin: String,
    pub stdin: Value,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: Option<i32>,
    /// From spawning the plugin to its exit (for the pods benchmark).
    pub elapsed: std::time::Duration,
}

impl PluginRun {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// stdout as JSON (a result, an error result, or `Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// The CNI error code of a failed call.
    pub fn code(&self) -> Option<u64> {
        self.json()["code"].as_u64()
    }

    /// The CNI error message of a failed call.
    pub fn msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_owned()
    }
}

/// A chain run: every plugin called, in call order; the last is the one that failed,
/// if any.
#[derive(Debug, Clone)]
pub struct ChainRun {
    pub runs: Vec<PluginRun>,
}

impl ChainRun {
    pub fn succeeded(&self) -> bool {
        self.runs.iter().all(PluginRun::succeeded)
    }

    /// The failed call, if any.
    pub fn failure(&self) -> Option<&PluginRun> {
        self.runs.iter().find(|r| !r.succeeded())
    }

    /// The chain's result: the last plugin's output on a successful ADD.
    pub fn result(&self) -> Value {
        self.runs.last().map(PluginRun::json).unwrap_or(Value::Null)
    }

    /// The run of plugin `kind`.
    pub fn of(&self, kind: &str) -> Option<&PluginRun> {
        self.runs.iter().find(|r| r.plugin == kind)
    }
}

/// A conflist and where its plugins are, run from a node's network namespace.
#[derive(Debug, Clone)]
pub struct CniChain {
    pub conflist: Value,
    /// `CNI_PATH`: directories searched for each plugin's `type`.
    pub cni_path: Vec<PathBuf>,
    /// The node's network namespace (path); `None` runs in the caller's.
    pub node_netns: Option<String>,
}

impl CniChain {
    pub fn new(conflist: Value, cni_path: Vec<PathBuf>, node_netns: Option<String>) -> Self {
        Self { conflist, cni_path, node_netns }
    }

    /// The plugins of the list.
    pub fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().cloned().unwrap_or_default()
    }

    fn find(&self, kind: &str) -> Result<PathBuf> {
        self.cni_path
            .iter()
            .map(|d| d.join(kind))
            .find(|p| p.is_file())
            .with_context(|| format!("plugin {kind} not in CNI_PATH {:?}", self.cni_path))
    }

    /// A plugin's configuration as the runtime hands it over: the list's `name` and
    /// `cniVersion`, and `prevResult` when given.
    pub fn plugin_config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// Runs one plugin for `command` with `stdin` (raw bytes, to send malformed
    /// configurations too) and the sandbox's environment.
    pub fn exec_raw(&self, kind: &str, command: &str, sandbox: &Sandbox, stdin: &[u8]) -> Result<PluginRun> {
        let program = self.find(kind)?;
        let path = std::env::join_paths(&self.cni_path)?;
        let mut cmd = Command::new(&program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_IFNAME", &sandbox.ifname)
            .env("CNI_ARGS", &sandbox.args)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &sandbox.netns {
            cmd.env("CNI_NETNS", netns);
        }
        if let Some(node) = &self.node_netns {
            let ns = File::open(node).with_context(|| format!("opening {node}"))?;
            // SAFETY: only setns(2) on a descriptor opened before fork runs between
            // fork and exec; the descriptor is closed at exec (O_CLOEXEC).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let started = std::time::Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("running {}", program.display()))?;
        child.stdin.take().context("stdin")?.write_all(stdin)?;
        let out = child.wait_with_output()?;
        Ok(PluginRun {
            plugin: kind.to_owned(),
            stdin: serde_json::from_slice(stdin).unwrap_or(Value::Null),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit_code: out.status.code(),
            elapsed: started.elapsed(),
        })
    }

    /// Runs one plugin of the list (by `type`) with its configuration from the list.
    pub fn exec(
        &self,
        kind: &str,
        command: &str,
        sandbox: &Sandbox,
        prev: Option<&Value>,
    ) -> Result<PluginRun> {
        let plugin = self
            .plugins()
            .into_iter()
            .find(|p| p["type"] == kind)
            .with_context(|| format!("no plugin {kind} in the conflist"))?;
        let conf = self.plugin_config(&plugin, prev);
        self.exec_raw(kind, command, sandbox, conf.to_string().as_bytes())
    }

    /// ADD: each plugin in order, each one's result the next one's `prevResult`;
    /// stops at the first failure (the runtime then calls [`CniChain::del`]).
    pub fn add(&self, sandbox: &Sandbox) -> Result<ChainRun> {
        let mut runs = Vec::new();
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let kind = plugin["type"].as_str().context("plugin without type")?.to_owned();
            let conf = self.plugin_config(&plugin, prev.as_ref());
            let run = self.exec_raw(&kind, "ADD", sandbox, conf.to_string().as_bytes())?;
            let ok = run.succeeded();
            prev = Some(run.json());
            runs.push(run);
            if !ok {
                break;
            }
        }
        Ok(ChainRun { runs })
    }

    /// CHECK: each plugin in order, with the ADD's result as `prevResult`.
    pub fn check(&self, sandbox: &Sandbox, added: &Value) -> Result<ChainRun> {
        self.each("CHECK", sandbox, Some(added), false)
    }

    /// DEL: each plugin in reverse order, with the ADD's result when there is one.
    pub fn del(&self, sandbox: &Sandbox, added: Option<&Value>) -> Result<ChainRun> {
        self.each("DEL", sandbox, added, true)
    }

    fn each(
        &self,
        command: &str,
        sandbox: &Sandbox,
        prev: Option<&Value>,
        reverse: bool,
    ) -> Result<ChainRun> {
        let mut plugins = self.plugins();
        if reverse {
            plugins.reverse();
        }
        let mut runs = Vec::new();
        for plugin in plugins {
            let kind = plugin["type"].as_str().context("plugin without type")?.to_owned();
            let conf = self.plugin_config(&plugin, prev);
            let run = self.exec_raw(&kind, command, sandbox, conf.to_string().as_bytes())?;
            let ok = run.succeeded();
            runs.push(run);
            if !ok {
                break;
            }
        }
        Ok(ChainRun { runs })
    }
}

/// A conflist of the reference `bridge` plugin (bridge `bridge` in the node's
/// namespace, the pod's gateway on it, no masquerading) with `host-local` addresses
/// from `subnet`, keeping its leases in `data_dir`, followed by `extra` plugins.
pub fn bridge_conflist(name: &str, bridge: &str, subnet: &str, data_dir: &Path, extra: &[Value]) -> Value {
    let mut plugins = vec![serde_json::json!({
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipMasq": false,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": subnet }]],
            "dataDir": data_dir,
        },
    })];
    plugins.extend(extra.iter().cloned());
    serde_json::json!({ "cniVersion": "1.0.0", "name": name, "plugins": plugins })
}

/// Fails unless Debian's reference plugins are installed (`.ci/run` installs them).
pub fn require_debian_plugins() -> Result<()> {
    for p in ["bridge", "host-local"] {
        if !Path::new(DEBIAN_PLUGINS).join(p).is_file() {
            bail!("{DEBIAN_PLUGINS}/{p} missing: apt-get install containernetworking-plugins");
        }
    }
    Ok(())
}

//! The lab most end-to-end scenarios need, built in one place: a control plane on
//! `control` (10.77.0.1) serving a YAML registry with its CA, an agent on `client`
//! (10.77.0.2) intercepting the workload cgroup, an agent on `server` (10.77.0.3)
//! for the destination's cgroup, and any further hosts (10.77.0.4 onwards) with no
//! agent, such as an outsider.
//!
//! A scenario states only what differs (its registry, identities, flags, extra
//! hosts) and starts its own servers on `server`; the lab owns everything else and
//! removes it on drop.
//!
//! ```no_run
//! # use mesh_tests::mesh::MeshLab;
//! let m = MeshLab::builder("ebpf", "services: []\n").hosts(&["outsider"]).agent_arg("--detect-timeout=1s").start();
//! let out = m.workload_command("curl").args(["-fsS", "http://10.96.0.40/"]).output().unwrap();
//! ```

use std::process::Command;

use crate::{Agent, Cgroup, Control, Host, Lab};

/// A running two-agent mesh.
pub struct MeshLab {
    pub lab: Lab,
    /// Holds the registry (`registry.yaml`), the CA and the tokens.
    pub dir: tempfile::TempDir,
    pub control: Control,
    /// The agent on `client`, intercepting [`MeshLab::workload`].
    pub client: Agent,
    /// The agent on `server`, serving [`MeshLab::server_workload`].
    pub server: Agent,
    /// The calling workload's cgroup (on `client`).
    pub workload: Cgroup,
    /// The destination workload's cgroup (on `server`).
    pub server_workload: Cgroup,
}

/// What a scenario sets before the lab starts.
pub struct MeshLabBuilder {
    mode: String,
    registry: String,
    extra_hosts: Vec<String>,
    client_identity: String,
    server_identity: String,
    both_args: Vec<String>,
    client_args: Vec<String>,
    server_args: Vec<String>,
    control_args: Vec<String>,
}

impl MeshLab {
    /// A lab in interception `mode` serving `registry` (YAML). Identities default to
    /// `shop/frontend` (client) and `shop/api` (server).
    pub fn builder(mode: &str, registry: impl Into<String>) -> MeshLabBuilder {
        MeshLabBuilder {
            mode: mode.to_owned(),
            registry: registry.into(),
            extra_hosts: Vec::new(),
            client_identity: "shop/frontend".into(),
            server_identity: "shop/api".into(),
            both_args: Vec::new(),
            client_args: Vec::new(),
            server_args: Vec::new(),
            control_args: Vec::new(),
        }
    }

    pub fn host(&self, name: &str) -> &Host {
        self.lab.host(name)
    }

    /// Replaces the registry; the control plane picks the edit up by itself.
    pub fn set_registry(&self, yaml: &str) {
        std::fs::write(self.registry_path(), yaml).expect("write the registry");
    }

    pub fn registry_path(&self) -> std::path::PathBuf {
        self.dir.path().join("registry.yaml")
    }

    /// `program` run on `client` inside the workload cgroup, so the client agent
    /// intercepts its connections.
    pub fn workload_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.host("client").command(program, Some(self.workload.absolute())).expect("a command on client")
    }

    /// The agents, for checks that apply to both.
    pub fn agents(&self) -> [(&'static str, &Agent); 2] {
        [("client", &self.client), ("server", &self.server)]
    }
}

impl MeshLabBuilder {
    /// Further hosts, with no agent, after `control`, `client` and `server`.
    pub fn hosts(mut self, names: &[&str]) -> Self {
        self.extra_hosts.extend(names.iter().map(|n| (*n).to_owned()));
        self
    }

    /// The workload identities (`namespace/service-account`) of the two agents.
    pub fn identities(mut self, client: &str, server: &str) -> Self {
        self.client_identity = client.to_owned();
        self.server_identity = server.to_owned();
        self
    }

    /// A flag for both agents.
    pub fn agent_arg(mut self, arg: impl Into<String>) -> Self {
        self.both_args.push(arg.into());
        self
    }

    /// A flag for the client agent only.
    pub fn client_arg(mut self, arg: impl Into<String>) -> Self {
        self.client_args.push(arg.into());
        self
    }

    /// A flag for the server agent only.
    pub fn server_arg(mut self, arg: impl Into<String>) -> Self {
        self.server_args.push(arg.into());
        self
    }

    /// A flag for the control plane.
    pub fn control_arg(mut self, arg: impl Into<String>) -> Self {
        self.control_args.push(arg.into());
        self
    }

    /// Creates the hosts, writes the registry, starts the control plane and both
    /// agents, and waits until each has enrolled its workload.
    ///
    /// # Panics
    /// When any part fails to start, with that part's error.
    pub fn start(self) -> MeshLab {
        let mut names = vec!["control", "client", "server"];
        names.extend(self.extra_hosts.iter().map(String::as_str));
        let lab = Lab::new(&names).expect("lab");
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("registry.yaml"), &self.registry).expect("write the registry");
        let control_args: Vec<&str> = self.control_args.iter().map(String::as_str).collect();
        let control = Control::start_with_ca(
            lab.host("control"),
            &dir.path().join("registry.yaml"),
            dir.path(),
            &["client", "server"],
            &control_args,
        )
        .expect("control plane");
        let workload = Cgroup::new("wl").expect("workload cgroup");
        let server_workload = Cgroup::new("srv").expect("server cgroup");
        let client =
            self.agent(&lab, &control, "client", &self.client_identity, &workload, &self.client_args);
        let server =
            self.agent(&lab, &control, "server", &self.server_identity, &server_workload, &self.server_args);
        MeshLab { lab, dir, control, client, server, workload, server_workload }
    }

    fn agent(
        &self,
        lab: &Lab,
        control: &Control,
        host: &str,
        identity: &str,
        cg: &Cgroup,
        own: &[String],
    ) -> Agent {
        let mut opts = control.agent_options(&self.mode, host, identity).cgroup(cg);
        for a in self.both_args.iter().chain(own) {
            opts = opts.arg(a.clone());
        }
        let agent =
            Agent::start(lab.host(host), opts).unwrap_or_else(|e| panic!("agent on {host} starts: {e:#}"));
        agent.wait_enrolled();
        agent
    }
}

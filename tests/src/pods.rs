//! A node that serves pods, as a Kubernetes node does: pod sandboxes are network
//! namespaces of their own, wired by the real CNI plugins (`bridge` with `host-local`
//! addresses, from Debian's containernetworking-plugins) with `mesh-cni` chained after
//! them, exactly as a container runtime calls them, in the node host's namespace.
//!
//! Pods get addresses from `10.88.0.10` up, in the order they are added (host-local
//! hands them out in order from `rangeStart`, with its leases in a fresh directory),
//! so a registry written before the pods exist can already list them.

use std::{net::IpAddr, path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    bins,
    cni::{ChainRun, CniChain, DEBIAN_PLUGINS, Sandbox, require_debian_plugins},
    netns::{Host, Netns, command_in},
};

/// The pods' subnet on every test node, and the first address handed out.
pub const POD_SUBNET: &str = "10.88.0.0/24";
pub const FIRST_POD_IP: [u8; 4] = [10, 88, 0, 10];

/// The address the `n`-th pod added to a node gets (0-based).
pub fn pod_ip(n: u8) -> IpAddr {
    IpAddr::from([FIRST_POD_IP[0], FIRST_POD_IP[1], FIRST_POD_IP[2], FIRST_POD_IP[3] + n])
}

/// A node host's CNI set-up: the plugin chain and its IPAM leases.
pub struct PodNode {
    pub chain: CniChain,
    _leases: tempfile::TempDir,
}

impl PodNode {
    /// Wires `node` for pods: forwarding on, a chain of `bridge` (gateway on `cni0`,
    /// masquerading pods' traffic to other hosts behind the node's address) then
    /// `mesh-cni` talking to the agent's socket `agent_socket`.
    pub fn new(node: &Host, agent_socket: &Path) -> Result<Self> {
        let node = Self::wire(node)?;
        let mut node = node;
        node.point_at(agent_socket);
        Ok(node)
    }

    /// `mesh-cni` talks to the agent at `agent_socket` from now on (a restarted agent).
    pub fn point_at(&mut self, agent_socket: &Path) {
        if let Some(plugins) = self.chain.conflist["plugins"].as_array_mut()
            && let Some(mesh) = plugins.iter_mut().find(|p| p["type"] == "mesh-cni")
        {
            mesh["agentSocket"] = json!(agent_socket);
        }
    }

    fn wire(node: &Host) -> Result<Self> {
        require_debian_plugins()?;
        let out = node.command("sysctl", None)?.args(["-qw", "net.ipv4.ip_forward=1"]).output()?;
        if !out.status.success() {
            bail!("enabling forwarding on {}: {}", node.name, String::from_utf8_lossy(&out.stderr));
        }
        let leases = tempfile::tempdir()?;
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "mesh-test-pods",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": POD_SUBNET,
                            "rangeStart": IpAddr::from(FIRST_POD_IP).to_string(),
                        }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": leases.path(),
                    },
                },
                { "type": "mesh-cni", "agentSocket": "", "timeoutSeconds": 30 },
            ],
        });
        let mesh_cni_dir = bins::cni().parent().context("mesh-cni has a directory")?.to_path_buf();
        let chain = CniChain::new(conflist, vec![DEBIAN_PLUGINS.into(), mesh_cni_dir], Some(node.ns.path()));
        Ok(Self { chain, _leases: leases })
    }

    /// Makes a pod sandbox and runs the chain's ADD for it, as a runtime does; on a
    /// failed ADD the runtime's DEL runs too and the failed run is returned.
    pub fn add(&self, namespace: &str, name: &str) -> Result<std::result::Result<Pod, ChainRun>> {
        Ok(self.add_timed(namespace, name)?.0)
    }

    /// [`PodNode::add`], with the ADD's chain run (each plugin's time in it).
    pub fn add_timed(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(std::result::Result<Pod, ChainRun>, ChainRun)> {
        let netns = Netns::new("pod")?;
        let id = format!("{}{}", netns.name(), "-sandbox");
        let sandbox = Sandbox::k8s(&id, &netns.path(), namespace, name, &format!("uid-{name}"));
        let run = self.chain.add(&sandbox)?;
        if !run.succeeded() {
            let _ = self.chain.del(&sandbox, None);
            return Ok((Err(run.clone()), run));
        }
        let added = run.result();
        let ip = added["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in the chain's result {added}"))?;
        Ok((Ok(Pod { namespace: namespace.into(), name: name.into(), netns, sandbox, added, ip }), run))
    }

    /// DEL for `pod`, then its namespace goes.
    pub fn remove(&self, pod: Pod) -> Result<ChainRun> {
        let run = self.chain.del(&pod.sandbox, Some(&pod.added))?;
        drop(pod);
        Ok(run)
    }
}

/// A pod sandbox served by the node's agent.
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub netns: Netns,
    pub sandbox: Sandbox,
    /// The chain's ADD result.
    pub added: Value,
    pub ip: IpAddr,
}

impl Pod {
    /// A command run inside the pod's network namespace (as its containers run).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        command_in(&self.netns.path(), program, None)
    }
}

//! The agent's configuration: flags with environment fallbacks, parsed by clap and
//! validated once at start into typed settings. Every error names the flag and its
//! environment variable.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::{
    cidr::Cidr,
    intercept::{
        Mode, Settings,
        iptables::{AgentSockets, IptablesError, pod::PodRules},
    },
};

/// Default outbound listener port (workload connections are redirected here).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default inbound listener port (iptables mode PREROUTING redirect target).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default tunnel listener port (peers' agents dial it, over mTLS).
pub const DEFAULT_TUNNEL_PORT: u16 = crate::intercept::iptables::pod::DEFAULT_TUNNEL_PORT;
/// Default admin port.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
/// Default admin socket (requests that change the agent).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/mesh/agent.sock";
/// Default mark on the agent's own sockets ("ME" in ASCII): the one exclusion both
/// interception modes key on.
pub const DEFAULT_MARK: u32 = 0x4d45;
/// Server-first protocols (FTP, SSH, SMTP, POP3, IMAP, submission, MySQL): the client
/// waits for the server to speak, so sniffing would only add the detection timeout.
pub const DEFAULT_OPAQUE_PORTS: &str = "21,22,25,110,143,587,3306";

/// Flags that shape interception, shared by `run` and `iptables install`.
#[derive(Args, Clone, Debug)]
pub struct InterceptArgs {
    /// Port of the outbound listener on 127.0.0.1 and [::1].
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Port of the inbound listener (iptables mode).
    #[arg(long, env = "MESH_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// Destination ports whose incoming connections are redirected to the inbound
    /// listener (iptables mode), comma-separated.
    #[arg(long, env = "MESH_INBOUND_PORTS", value_delimiter = ',')]
    pub inbound_ports: Vec<u16>,

    /// SO_MARK carried by the agent's own sockets; marked sockets are never redirected.
    #[arg(long, env = "MESH_MARK", default_value = "0x4d45", value_parser = parse_u32)]
    pub mark: u32,

    #[command(flatten)]
    pub owner: AgentOwnerArgs,

    /// Also exclude connections of this uid from redirection (iptables mode).
    #[arg(long, env = "MESH_EXCLUDE_UID")]
    pub exclude_uid: Option<u32>,

    /// Only redirect connections to these destination ports (default: all ports).
    #[arg(long, env = "MESH_INCLUDE_PORTS", value_delimiter = ',')]
    pub include_ports: Vec<u16>,

    /// Never redirect connections to these destination ports.
    #[arg(long, env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Only redirect connections to these destination CIDRs (default: all).
    #[arg(long, env = "MESH_INCLUDE_CIDRS", value_delimiter = ',')]
    pub include_cidrs: Vec<Cidr>,

    /// Never redirect connections to these destination CIDRs (wins over includes).
    #[arg(long, env = "MESH_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub exclude_cidrs: Vec<Cidr>,

    /// Do not intercept IPv6 (no [::1] listener, no ip6tables rules).
    #[arg(long, env = "MESH_NO_IPV6")]
    pub no_ipv6: bool,

    /// Port of the agent's DNS listener (UDP and TCP on 127.0.0.1 and [::1] of each
    /// workload's namespace), where workloads' DNS queries (to port 53, any address)
    /// are sent; 0 turns the agent's DNS and its interception off.
    #[arg(long, env = "MESH_DNS_PORT", default_value_t = crate::dns::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
}

/// Who the agent runs as, for iptables rules that someone else installs (a pod's
/// init container): a workload can put the agent's mark on its sockets, but not
/// the agent's uid or gid.
#[derive(Args, Clone, Debug, Default)]
pub struct AgentOwnerArgs {
    /// iptables mode: the uid the agent runs as; its sockets are recognised by the
    /// mark together with this uid (`-m owner --uid-owner`).
    #[arg(long, env = "MESH_AGENT_UID")]
    pub agent_uid: Option<u32>,

    /// iptables mode: the gid the agent runs as; its sockets are recognised by the
    /// mark together with this gid (`-m owner --gid-owner`).
    #[arg(long, env = "MESH_AGENT_GID")]
    pub agent_gid: Option<u32>,
}

/// Flags of `mesh-agent iptables pod install|check`: the rules of a pod's own
/// network namespace, where the agent serves the pod (outbound, inbound and
/// tunnel listeners inside it).
#[derive(Args, Clone, Debug)]
pub struct PodRulesArgs {
    /// The agent's outbound listener in the pod.
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// The agent's inbound listener in the pod: every inbound TCP port but the
    /// agent's own and --inbound-exclude-ports is redirected to it.
    #[arg(long, env = "MESH_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// The agent's tunnel listener in the pod, which peers' agents dial directly.
    #[arg(long, env = "MESH_TUNNEL_PORT", default_value_t = DEFAULT_TUNNEL_PORT)]
    pub tunnel_port: u16,

    /// Other ports of the agent in the pod (admin, health) that inbound
    /// redirection leaves alone, comma-separated.
    #[arg(long, env = "MESH_AGENT_PORTS", value_delimiter = ',', default_value = "15000")]
    pub agent_ports: Vec<u16>,

    /// Inbound destination ports that reach the pod's app directly, comma-separated.
    #[arg(long, env = "MESH_INBOUND_EXCLUDE_PORTS", value_delimiter = ',')]
    pub inbound_exclude_ports: Vec<u16>,

    /// Outbound destination ports never redirected.
    #[arg(long, env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Outbound destination CIDRs never redirected.
    #[arg(long, env = "MESH_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub exclude_cidrs: Vec<Cidr>,

    /// SO_MARK carried by the agent's own sockets.
    #[arg(long, env = "MESH_MARK", default_value = "0x4d45", value_parser = parse_u32)]
    pub mark: u32,

    /// cgroup the agent runs in, relative to the cgroup2 root (repeatable): its
    /// sockets are recognised by the mark together with it (`-m cgroup --path`).
    #[arg(long = "agent-cgroup", env = "MESH_AGENT_CGROUP", value_delimiter = ',')]
    pub agent_cgroups: Vec<String>,

    #[command(flatten)]
    pub owner: AgentOwnerArgs,

    /// Do not intercept IPv6 (no ip6tables rules).
    #[arg(long, env = "MESH_NO_IPV6")]
    pub no_ipv6: bool,

    /// The agent's DNS listener in the pod: the pod's DNS (UDP and TCP to port 53)
    /// is redirected to it; 0 leaves the pod's DNS alone.
    #[arg(long, env = "MESH_DNS_PORT", default_value_t = crate::dns::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
}

impl PodRulesArgs {
    /// The validated pod rules. [`PodRules::config`] checks them; its errors are
    /// given here with the flag and variable of the field at fault.
    pub fn rules(&self) -> Result<PodRules, ConfigError> {
        if self.no_ipv6
            && let Some(c) = self.exclude_cidrs.iter().find(|c| !c.is_ipv4())
        {
            return Err(err(
                "--exclude-cidrs",
                "MESH_EXCLUDE_CIDRS",
                format!("{c} is IPv6 but --no-ipv6 is set"),
            ));
        }
        let rules = PodRules {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            tunnel_port: self.tunnel_port,
            agent_ports: dedup(&self.agent_ports),
            inbound_exclude_ports: dedup(&self.inbound_exclude_ports),
            exclude_ports: dedup(&self.exclude_ports),
            exclude_cidrs: dedup(&self.exclude_cidrs),
            agent: AgentSockets {
                mark: self.mark,
                cgroups: dedup(&self.agent_cgroups),
                uid: self.owner.agent_uid,
                gid: self.owner.agent_gid,
            },
            ipv6: !self.no_ipv6,
            dns_port: (self.dns_port != 0).then_some(self.dns_port),
        };
        match rules.config() {
            Ok(_) => Ok(rules),
            Err(e) => {
                let (flag, env) = match &e {
                    IptablesError::InvalidConfig { field, .. } => pod_flag(field),
                    _ => ("pod rules", "-"),
                };
                Err(err(flag, env, e.to_string()))
            }
        }
    }
}

/// The flag and variable of a [`PodRules`] field.
fn pod_flag(field: &str) -> (&'static str, &'static str) {
    match field {
        "outbound_port" => ("--outbound-port", "MESH_OUTBOUND_PORT"),
        "inbound_port" => ("--inbound-port", "MESH_INBOUND_PORT"),
        "tunnel_port" => ("--tunnel-port", "MESH_TUNNEL_PORT"),
        "outbound_port/inbound_port/tunnel_port" => (
            "--outbound-port/--inbound-port/--tunnel-port",
            "MESH_OUTBOUND_PORT/MESH_INBOUND_PORT/MESH_TUNNEL_PORT",
        ),
        "agent_ports" => ("--agent-ports", "MESH_AGENT_PORTS"),
        "inbound_exclude_ports" => ("--inbound-exclude-ports", "MESH_INBOUND_EXCLUDE_PORTS"),
        "exclude_ports" => ("--exclude-ports", "MESH_EXCLUDE_PORTS"),
        "mark" => ("--mark", "MESH_MARK"),
        "agent_cgroups" => ("--agent-cgroup", "MESH_AGENT_CGROUP"),
        "dns_port" => ("--dns-port", "MESH_DNS_PORT"),
        _ => ("pod rules", "-"),
    }
}

/// Where eBPF interception is pinned by default (bpffs is mounted there if nothing is).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/mesh";

/// Output format of the agent's logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// An on/off switch flag (`--metrics on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

/// Flags of `mesh-agent run`.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Interception mode: auto picks eBPF when the kernel and capabilities allow it.
    #[arg(long, env = "MESH_MODE", value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,

    /// Workload cgroup to enroll (repeatable): a path under the cgroup2 mount or
    /// relative to its root. In iptables mode without any, the whole network namespace
    /// is intercepted (pod-level mode).
    #[arg(long = "cgroup", env = "MESH_CGROUPS", value_delimiter = ',')]
    pub cgroups: Vec<String>,

    /// iptables mode: redirect every process of this network namespace, not only
    /// enrolled cgroups (an agent alone in a pod's namespace, such as the pod-level
    /// sidecar whose rules are not installed by an init container). Without it, and
    /// without `--cgroup`, nothing of the agent's own namespace is intercepted: a node
    /// agent serves pods in their own namespaces.
    #[arg(long, env = "MESH_INTERCEPT_ALL")]
    pub intercept_all: bool,

    /// A workload of this node's own network namespace with its own identity,
    /// `CGROUP=NAMESPACE/SERVICE_ACCOUNT` (repeatable): its connections land on a
    /// listener of its own and carry its identity. Needs --control-plane and a token.
    #[arg(long = "workload", env = "MESH_WORKLOADS", value_delimiter = ',')]
    pub workloads: Vec<String>,

    /// The agent's own cgroup, where the getsockopt program attaches (default: read
    /// from /proc/self/cgroup). Connections made from it are never intercepted.
    #[arg(long, env = "MESH_AGENT_CGROUP")]
    pub agent_cgroup: Option<String>,

    /// eBPF mode: the cgroup the connect programs attach to; workloads are enrolled
    /// below it by map entries (default: the cgroup2 root).
    #[arg(long, env = "MESH_CGROUP_ROOT", default_value = "/")]
    pub cgroup_root: String,

    /// eBPF mode: bpffs directory of this agent's pinned maps and links. Interception
    /// stays pinned there when the agent stops (connections fail closed) until a new
    /// agent adopts it or `mesh-agent cleanup --bpffs-dir DIR` removes it.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: std::path::PathBuf,

    #[command(flatten)]
    pub intercept: InterceptArgs,

    /// The node's resolver(s) that DNS queries for names outside the registry are
    /// forwarded to, `IP` or `IP:PORT`, comma-separated, tried in order (default: the
    /// `nameserver` lines of the agent's /etc/resolv.conf).
    #[arg(long, env = "MESH_DNS_UPSTREAM", value_delimiter = ',', value_parser = parse_upstream)]
    pub dns_upstream: Vec<SocketAddr>,

    /// DNS queries being forwarded to the node's resolver at once, in the whole agent;
    /// more are dropped (counted in mesh_dns_dropped_total{reason="forwards"}).
    #[arg(long, env = "MESH_DNS_MAX_FORWARDS", default_value_t = 256)]
    pub dns_max_forwards: usize,

    /// DNS queries one source address may have forwarded per second (bursts of twice
    /// as many); more are dropped. Registry names are answered whatever the rate.
    #[arg(long, env = "MESH_DNS_FORWARD_RATE", default_value_t = 500)]
    pub dns_forward_rate: u32,

    /// How long the node's resolver may take to answer a forwarded query before the
    /// next one is tried (the workload gets SERVFAIL when none answered).
    #[arg(long, env = "MESH_DNS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub dns_timeout: Duration,

    /// Destination ports that skip protocol detection (server-first protocols).
    #[arg(long, env = "MESH_OPAQUE_PORTS", value_delimiter = ',', default_value = DEFAULT_OPAQUE_PORTS)]
    pub opaque_ports: Vec<u16>,

    /// How long to wait for the client's first bytes before treating the connection
    /// as opaque TCP.
    #[arg(long, env = "MESH_DETECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,

    /// Upstream connect timeout.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Where the access log goes (one JSON line per HTTP request or TCP connection
    /// the L7 proxy handles): `stdout`, `off`, or a file path (appended to).
    #[arg(long, env = "MESH_ACCESS_LOG", default_value = "stdout")]
    pub access_log: String,

    /// OpenTelemetry collector (OTLP/gRPC, `http://host:4317`) that receives a span
    /// per proxied HTTP request of a sampled trace. Unset: no spans are exported.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share (0 to 1) of the traces the agent starts itself (requests arriving
    /// without `traceparent`) that are sampled; with `--otlp-endpoint` only.
    /// Traces that arrive with a context keep their own sampling decision.
    #[arg(long, env = "MESH_OTLP_SAMPLE_RATIO", default_value_t = 1.0)]
    pub otlp_sample_ratio: f64,

    /// This node's region, for services whose balancer prefers nearby endpoints.
    #[arg(long, env = "MESH_REGION", default_value = "")]
    pub region: String,

    /// This node's zone within `--region`.
    #[arg(long, env = "MESH_ZONE", default_value = "")]
    pub zone: String,

    /// Prometheus metrics: `off` installs no recorder, so recording costs nothing and
    /// `/metrics` is empty (for measuring the metrics' own overhead).
    #[arg(long, env = "MESH_METRICS", value_enum, default_value_t = Switch::On)]
    pub metrics: Switch,

    /// A metric series not updated for this long leaves `/metrics`, so the series of
    /// endpoints, workloads and identities that are gone do not pile up; gauges of
    /// what still exists never expire. `off` or 0 keeps every series.
    #[arg(long, env = "MESH_METRICS_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration_or_off)]
    pub metrics_idle_timeout: Duration,

    /// Idle time after which a pooled upstream HTTP connection is closed.
    #[arg(long, env = "MESH_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Time after which an HTTP connection from a workload (or a peer agent's HTTP
    /// tunnel stream) with no request in flight is closed; `off` or 0 never closes it.
    #[arg(long, env = "MESH_DOWNSTREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration_or_off)]
    pub downstream_idle_timeout: Duration,

    /// Time an HTTP/1 request head may take from its first byte to its end: a client
    /// sending its headers byte by byte (slowloris) is dropped after it.
    #[arg(long, env = "MESH_REQUEST_HEADER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_header_timeout: Duration,

    /// Time after which a relayed opaque or TLS connection that moved no byte in
    /// either direction is closed (both sides); `off` or 0 never closes it.
    #[arg(long, env = "MESH_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration_or_off)]
    pub tcp_idle_timeout: Duration,

    /// Plaintext relays move a bulk direction with splice(2), socket to pipe to
    /// socket, without copying it through the agent; `off` copies every byte through
    /// a userspace buffer (for A/B measurements, or a kernel whose splice misbehaves).
    #[arg(long, env = "MESH_SPLICE", value_enum, default_value_t = Switch::On)]
    pub splice: Switch,

    /// Experimental, eBPF mode: a workload's connection to the agent on loopback skips
    /// the TCP stack, each send queued straight on the other socket (sockmap and
    /// sk_msg). Off by default, because on kernel 6.18 a workload that blocks in
    /// recv() on one thread while another writes and half-closes can wait for ever
    /// for bytes already delivered; one that writes faster than the agent reads gets
    /// ENOMEM instead of waiting; one that reads with splice(2) would not see the
    /// bytes at all; and plaintext relays stop splicing while it is on.
    #[arg(long, env = "MESH_SOCKMAP", value_enum, default_value_t = Switch::Off)]
    pub sockmap: Switch,

    /// On SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Read-only admin HTTP endpoint (/live, /ready, /stats, /metrics, /config_dump,
    /// GET /logging): workloads on the node can reach it, so it changes nothing.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// Also serve GET /metrics, /ready and /live (and nothing else) on this address,
    /// for a cluster's Prometheus: the node's IP, or 0.0.0.0:15020 with host
    /// networking. Off unless set.
    #[arg(long, env = "MESH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Unix socket of the admin requests that change the agent (enroll, unenroll,
    /// quitquitquit, POST /logging), reachable only by the agent's user: its
    /// directory is created with mode 0700 (an existing one must already be private to
    /// that user) and the socket is mode 0600; removed when the agent stops.
    #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: std::path::PathBuf,

    /// Where the pods the CNI plugin handed the agent are recorded, so a restarted
    /// agent serves them again without any CNI call.
    #[arg(long, env = "MESH_POD_STATE", default_value = crate::workload::store::DEFAULT_PATH)]
    pub pod_state: std::path::PathBuf,

    /// Most pods served at once (the CNI refuses more, naming the limit).
    #[arg(long, env = "MESH_MAX_PODS", default_value_t = 1024)]
    pub max_pods: usize,

    /// How long a CNI ADD waits for the control plane to list a new pod before it is
    /// refused as unknown (the runtime retries).
    #[arg(long, env = "MESH_POD_IDENTITY_PATIENCE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub pod_identity_patience: Duration,

    /// iptables mode: the rules were installed by `mesh-agent iptables install` (init
    /// container); neither install nor remove them.
    #[arg(long, env = "MESH_IPTABLES_EXTERNAL")]
    pub iptables_external: bool,

    /// Control plane gRPC address (`https://host:port`), verified against
    /// --control-plane-ca. Without it the agent forwards every connection to its
    /// original destination.
    #[arg(long, env = "MESH_CONTROL_PLANE")]
    pub control_plane: Option<String>,

    /// PEM file of the mesh CA's root(s), given out of band (on Kubernetes the
    /// ConfigMap the control plane publishes): the control plane's certificate must
    /// chain to it, and a trust bundle from the control plane is accepted only when
    /// it vouches for every root in it. Re-read at every bundle check.
    #[arg(long, env = "MESH_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<std::path::PathBuf>,

    /// Allow an `http://` (plaintext) --control-plane: the node credential and routing
    /// data then travel in clear, and without --control-plane-ca the first trust
    /// bundle is taken as it comes. For tests and debugging only.
    #[arg(long, env = "MESH_INSECURE_CONTROL_PLANE")]
    pub insecure_control_plane: bool,

    /// This node's name as the control plane knows it (default: the host name).
    #[arg(long, env = "MESH_NODE")]
    pub node: Option<String>,

    /// The workload identity of this node's enrolled workloads, `NAMESPACE/SERVICE_ACCOUNT`:
    /// the agent obtains (and renews) its certificate from the control plane's CA.
    #[arg(long, env = "MESH_IDENTITY", requires = "bootstrap_token_file")]
    pub identity: Option<String>,

    /// File holding this node's credential for the control plane: a bootstrap token,
    /// or on Kubernetes a projected service-account token. Sent on every call
    /// (discovery and certificates), over TLS only; re-read every time.
    #[arg(long, env = "MESH_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<std::path::PathBuf>,

    /// Port of the mTLS tunnel listener peers' agents connect to (with --identity).
    #[arg(long, env = "MESH_TUNNEL_PORT", default_value_t = DEFAULT_TUNNEL_PORT)]
    pub tunnel_port: u16,

    /// Connections the agent's listeners (outbound, inbound, tunnel) hold open
    /// together; more are reset at once. Lowered at start if the file-descriptor
    /// limit cannot hold this many proxied connections (two descriptors each; with
    /// `--splice on`, an eighth of the limit is then kept for pipes).
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = crate::limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Connections one source address may hold open on the agent's listeners. On a
    /// node whose workloads share its network namespace, they share this budget.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_SOURCE", default_value_t = crate::limits::DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    pub max_connections_per_source: usize,

    /// TLS handshakes under way at once on the tunnel port (more wait for a slot within
    /// their deadline); one peer address may have at most 32.
    #[arg(long, env = "MESH_MAX_TUNNEL_HANDSHAKES", default_value_t = crate::limits::DEFAULT_MAX_HANDSHAKES)]
    pub max_tunnel_handshakes: usize,

    /// Deadline of a tunnel connection's TLS and HTTP/2 handshakes, from accept.
    #[arg(long, env = "MESH_TUNNEL_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tunnel_handshake_timeout: Duration,

    /// Threads that run the tunnel port's TLS handshakes, away from the worker that
    /// carries established traffic; 0 runs them on that worker.
    #[arg(long, env = "MESH_TUNNEL_HANDSHAKE_THREADS", default_value_t = 1)]
    pub tunnel_handshake_threads: usize,

    /// How much lower the handshake threads' CPU priority is than the agent's, in nice
    /// steps (0 to 19): when the node's CPU is busy, a
    /// flood of handshakes yields it to established traffic instead of sharing it
    /// equally; on an idle CPU handshakes run at full speed all the same.
    #[arg(long, env = "MESH_TUNNEL_HANDSHAKE_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub tunnel_handshake_nice: i32,

    /// Lifetime to request for workload certificates (default: the CA's).
    #[arg(long, env = "MESH_CERT_TTL", value_parser = humantime::parse_duration)]
    pub cert_ttl: Option<Duration>,

    /// Renew certificates when this fraction of their lifetime has passed.
    #[arg(long, env = "MESH_CERT_RENEW_FRACTION", default_value_t = 0.8)]
    pub cert_renew_fraction: f64,

    /// Refuse (NACK) snapshots with more endpoints than this, bounding the agent's memory.
    #[arg(long, env = "MESH_MAX_ENDPOINTS", default_value_t = 100_000)]
    pub max_endpoints: usize,

    /// Longest wait between reconnects to the control plane (jittered exponential
    /// backoff from 100 ms up to this).
    #[arg(long, env = "MESH_DISCOVERY_BACKOFF_MAX", default_value = "3s", value_parser = humantime::parse_duration)]
    pub discovery_backoff_max: Duration,

    /// How often the agent sends the control plane its traffic per edge and its
    /// breakers, ejections and certificates, for the dashboard; 0 sends none.
    #[arg(long, env = "MESH_EDGE_REPORT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub edge_report_interval: Duration,

    /// HTTP/2 keepalive interval (and timeout) on the control-plane stream: how fast a
    /// dead control plane is noticed.
    #[arg(long, env = "MESH_DISCOVERY_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub discovery_keepalive: Duration,

    /// Forward the eBPF programs' debug records to the log (costs a ring-buffer write
    /// per intercepted connect).
    #[arg(long, env = "MESH_EBPF_LOG")]
    pub ebpf_log: bool,

    /// Runtime worker threads. One is the default: on the benchmark machine it added
    /// ~40 us less per new connection than two (fewer cross-thread wake-ups) at equal
    /// throughput; raise it on nodes whose traffic needs more than one core.
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: u16,

    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `mesh_agent=debug`.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,
}

/// An invalid setting, naming the flag and environment variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {flag} ({env}): {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub reason: String,
}

fn err(flag: &'static str, env: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError { flag, env, reason: reason.into() }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a number (decimal or 0x-prefixed hex)"))
}

/// A DNS upstream: `IP:PORT`, `[IPv6]:PORT` or an address alone (port 53).
fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is neither IP nor IP:PORT"))
}

/// A duration, or `off` (read as 0: disabled).
fn parse_duration_or_off(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is neither a duration nor `off`: {e}"))
}

impl InterceptArgs {
    /// Validated interception settings.
    pub fn settings(
        &self,
        agent_cgroup: Option<String>,
        ebpf_log: bool,
        iptables_external: bool,
    ) -> Result<Settings, ConfigError> {
        self.settings_with(agent_cgroup, ebpf_log, iptables_external, Placement::default())
    }

    /// [`InterceptArgs::settings`] with where eBPF interception lives and the tunnel port.
    pub fn settings_with(
        &self,
        agent_cgroup: Option<String>,
        ebpf_log: bool,
        iptables_external: bool,
        placement: Placement,
    ) -> Result<Settings, ConfigError> {
        if self.outbound_port == 0 {
            return Err(err("--outbound-port", "MESH_OUTBOUND_PORT", "must not be 0"));
        }
        if self.inbound_port == 0 {
            return Err(err("--inbound-port", "MESH_INBOUND_PORT", "must not be 0"));
        }
        // The outbound listener takes a range: iptables mode's REDIRECT picks from it.
        let outbound = crate::intercept::iptables::outbound_ports(self.outbound_port);
        let outbound_range = format!("{}-{}", outbound.start(), outbound.end());
        if outbound.contains(&self.inbound_port) {
            return Err(err(
                "--inbound-port",
                "MESH_INBOUND_PORT",
                format!(
                    "must be outside the outbound listener's ports ({outbound_range}, from --outbound-port)"
                ),
            ));
        }
        if self.mark == 0 {
            return Err(err("--mark", "MESH_MARK", "must not be 0 (0 is every unmarked socket)"));
        }
        if self.dns_port != 0 && (outbound.contains(&self.dns_port) || self.inbound_port == self.dns_port) {
            return Err(err(
                "--dns-port",
                "MESH_DNS_PORT",
                format!("{} is one of the agent's TCP listener ports", self.dns_port),
            ));
        }
        for (flag, env, ports) in [
            ("--inbound-ports", "MESH_INBOUND_PORTS", &self.inbound_ports),
            ("--include-ports", "MESH_INCLUDE_PORTS", &self.include_ports),
            ("--exclude-ports", "MESH_EXCLUDE_PORTS", &self.exclude_ports),
        ] {
            if ports.contains(&0) {
                return Err(err(flag, env, "port 0 is not a destination port"));
            }
        }
        if let Some(p) = self.include_ports.iter().find(|p| self.exclude_ports.contains(p)) {
            return Err(err(
                "--include-ports",
                "MESH_INCLUDE_PORTS",
                format!("port {p} is also in --exclude-ports"),
            ));
        }
        if let Some(p) = self.inbound_ports.iter().find(|p| outbound.contains(p) || self.inbound_port == **p)
        {
            return Err(err(
                "--inbound-ports",
                "MESH_INBOUND_PORTS",
                format!("port {p} is one of the agent's own listener ports"),
            ));
        }
        let ipv6 = !self.no_ipv6;
        if !ipv6 && let Some(c) = self.include_cidrs.iter().chain(&self.exclude_cidrs).find(|c| !c.is_ipv4())
        {
            return Err(err(
                "--include-cidrs/--exclude-cidrs",
                "MESH_INCLUDE_CIDRS/MESH_EXCLUDE_CIDRS",
                format!("{c} is IPv6 but --no-ipv6 is set"),
            ));
        }
        Ok(Settings {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            inbound_ports: dedup(&self.inbound_ports),
            mark: self.mark,
            agent_uid: self.owner.agent_uid,
            agent_gid: self.owner.agent_gid,
            exclude_uid: self.exclude_uid,
            include_ports: dedup(&self.include_ports),
            exclude_ports: dedup(&self.exclude_ports),
            include_cidrs: dedup(&self.include_cidrs),
            exclude_cidrs: dedup(&self.exclude_cidrs),
            ipv6,
            ebpf_log,
            agent_cgroup,
            iptables_external,
            bpffs_dir: placement.bpffs_dir,
            cgroup_root: placement.cgroup_root,
            tunnel_port: placement.tunnel_port,
            dns_port: (self.dns_port != 0).then_some(self.dns_port),
            sockmap: false,
        })
    }
}

/// Where eBPF interception attaches and is pinned, and the tunnel port inbound capture
/// leaves alone.
#[derive(Clone, Debug)]
pub struct Placement {
    pub bpffs_dir: std::path::PathBuf,
    pub cgroup_root: String,
    pub tunnel_port: u16,
}

impl Default for Placement {
    fn default() -> Self {
        Self { bpffs_dir: DEFAULT_BPFFS_DIR.into(), cgroup_root: "/".into(), tunnel_port: 15008 }
    }
}

fn dedup<T: Ord + Clone>(v: &[T]) -> Vec<T> {
    let mut v = v.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Settings of the running agent beyond interception.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub opaque_ports: HashSet<u16>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    /// Idle time that closes a served HTTP connection; `None`: never.
    pub downstream_idle_timeout: Option<Duration>,
    /// Time an HTTP/1 request head may take from its first byte.
    pub request_header_timeout: Duration,
    /// Time without a byte that closes an opaque relay; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
    /// Whether plaintext relays may splice bulk directions (`--splice`).
    pub splice: bool,
}

impl RunArgs {
    /// The agent's DNS, `None` with `--dns-port 0`. Without `--dns-upstream`, the
    /// upstreams are read from `resolv_conf` (the agent's own /etc/resolv.conf).
    pub fn dns_settings(&self, resolv_conf: &str) -> Option<crate::dns::DnsSettings> {
        if self.intercept.dns_port == 0 {
            return None;
        }
        let upstreams = if self.dns_upstream.is_empty() {
            crate::dns::resolv::nameservers(resolv_conf)
        } else {
            self.dns_upstream.clone()
        };
        Some(crate::dns::DnsSettings {
            port: self.intercept.dns_port,
            upstreams,
            max_forwards: self.dns_max_forwards,
            forward_rate: self.dns_forward_rate,
            timeout: self.dns_timeout,
            ..Default::default()
        })
    }

    /// TLS unless plaintext is explicitly allowed, an anchor for TLS, a credential.
    fn validate_control_plane(&self, cp: &str) -> Result<(), ConfigError> {
        if cp.starts_with("https://") {
            if self.control_plane_ca.is_none() {
                return Err(err(
                    "--control-plane-ca",
                    "MESH_CONTROL_PLANE_CA",
                    format!(
                        "missing: the PEM root the control plane {cp} must prove itself against (the mesh \
                         CA's root, given out of band)"
                    ),
                ));
            }
        } else if cp.starts_with("http://") {
            if !self.insecure_control_plane {
                return Err(err(
                    "--control-plane",
                    "MESH_CONTROL_PLANE",
                    format!(
                        "{cp:?} is plaintext: the node credential and routing data would travel in clear, \
                         and anyone on the path could answer; use https:// with --control-plane-ca, or pass \
                         --insecure-control-plane to accept it"
                    ),
                ));
            }
        } else {
            return Err(err(
                "--control-plane",
                "MESH_CONTROL_PLANE",
                format!("{cp:?} must be a URL like https://10.0.0.1:15010"),
            ));
        }
        if self.bootstrap_token_file.is_none() {
            return Err(err(
                "--bootstrap-token-file",
                "MESH_BOOTSTRAP_TOKEN_FILE",
                "missing: the control plane answers only calls carrying the node's credential",
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(Settings, ProxySettings), ConfigError> {
        if self.tunnel_port == 0 {
            return Err(err("--tunnel-port", "MESH_TUNNEL_PORT", "must not be 0"));
        }
        let placement = Placement {
            bpffs_dir: self.bpffs_dir.clone(),
            cgroup_root: self.cgroup_root.clone(),
            tunnel_port: self.tunnel_port,
        };
        let mut settings = self.intercept.settings_with(
            self.agent_cgroup.clone(),
            self.ebpf_log,
            self.iptables_external,
            placement,
        )?;
        if self.sockmap == Switch::On && self.mode == Mode::Iptables {
            return Err(err(
                "--sockmap",
                "MESH_SOCKMAP",
                "needs eBPF interception (--mode ebpf or auto); iptables mode has no sockhash to put sockets in",
            ));
        }
        settings.sockmap = self.sockmap == Switch::On;
        if self.detect_timeout.is_zero() {
            return Err(err("--detect-timeout", "MESH_DETECT_TIMEOUT", "must be more than 0"));
        }
        if self.connect_timeout.is_zero() {
            return Err(err("--connect-timeout", "MESH_CONNECT_TIMEOUT", "must be more than 0"));
        }
        if self.request_header_timeout.is_zero() {
            return Err(err(
                "--request-header-timeout",
                "MESH_REQUEST_HEADER_TIMEOUT",
                "must be more than 0",
            ));
        }
        if let Some(cp) = &self.control_plane {
            self.validate_control_plane(cp)?;
        } else if self.control_plane_ca.is_some() {
            return Err(err("--control-plane-ca", "MESH_CONTROL_PLANE_CA", "needs --control-plane"));
        }
        if let Some(id) = &self.identity {
            if self.control_plane.is_none() {
                return Err(err("--identity", "MESH_IDENTITY", "needs --control-plane (the CA signs it)"));
            }
            match id.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {}
                _ => {
                    return Err(err(
                        "--identity",
                        "MESH_IDENTITY",
                        format!("{id:?} is not NAMESPACE/SERVICE_ACCOUNT"),
                    ));
                }
            }
        }
        for spec in &self.workloads {
            let Some((cgroup, account)) = spec.split_once('=') else {
                return Err(err(
                    "--workload",
                    "MESH_WORKLOADS",
                    format!("{spec:?} is not CGROUP=NAMESPACE/SERVICE_ACCOUNT"),
                ));
            };
            if cgroup.is_empty() {
                return Err(err("--workload", "MESH_WORKLOADS", format!("{spec:?} names no cgroup")));
            }
            crate::workload::ServiceAccount::parse(account)
                .map_err(|e| err("--workload", "MESH_WORKLOADS", e))?;
            if self.control_plane.is_none() || self.bootstrap_token_file.is_none() {
                return Err(err(
                    "--workload",
                    "MESH_WORKLOADS",
                    "needs --control-plane and --bootstrap-token-file (the CA signs its identity)",
                ));
            }
        }
        if !(self.cert_renew_fraction > 0.0 && self.cert_renew_fraction <= 1.0) {
            return Err(err("--cert-renew-fraction", "MESH_CERT_RENEW_FRACTION", "must be in (0, 1]"));
        }
        if !self.edge_report_interval.is_zero() && self.edge_report_interval < Duration::from_millis(100) {
            return Err(err(
                "--edge-report-interval",
                "MESH_EDGE_REPORT_INTERVAL",
                "must be 0 (off) or at least 100ms",
            ));
        }
        if self.discovery_backoff_max < Duration::from_millis(100) {
            return Err(err(
                "--discovery-backoff-max",
                "MESH_DISCOVERY_BACKOFF_MAX",
                "must be at least 100ms",
            ));
        }
        for (flag, env, value) in [
            ("--max-connections", "MESH_MAX_CONNECTIONS", self.max_connections),
            (
                "--max-connections-per-source",
                "MESH_MAX_CONNECTIONS_PER_SOURCE",
                self.max_connections_per_source,
            ),
            ("--max-tunnel-handshakes", "MESH_MAX_TUNNEL_HANDSHAKES", self.max_tunnel_handshakes),
        ] {
            if value == 0 {
                return Err(err(flag, env, "must be at least 1"));
            }
        }
        if self.tunnel_handshake_timeout.is_zero() {
            return Err(err(
                "--tunnel-handshake-timeout",
                "MESH_TUNNEL_HANDSHAKE_TIMEOUT",
                "must be more than 0",
            ));
        }
        if self.discovery_keepalive < Duration::from_secs(1) {
            return Err(err("--discovery-keepalive", "MESH_DISCOVERY_KEEPALIVE", "must be at least 1s"));
        }
        if self.dns_max_forwards == 0 {
            return Err(err("--dns-max-forwards", "MESH_DNS_MAX_FORWARDS", "must be at least 1"));
        }
        if self.dns_forward_rate == 0 {
            return Err(err("--dns-forward-rate", "MESH_DNS_FORWARD_RATE", "must be at least 1"));
        }
        if self.dns_timeout.is_zero() {
            return Err(err("--dns-timeout", "MESH_DNS_TIMEOUT", "must be more than 0"));
        }
        if !self.metrics_idle_timeout.is_zero() && self.metrics_idle_timeout < Duration::from_secs(1) {
            return Err(err(
                "--metrics-idle-timeout",
                "MESH_METRICS_IDLE_TIMEOUT",
                "must be at least 1s (or `off`)",
            ));
        }
        if self.iptables_external && self.mode != Mode::Iptables {
            return Err(err(
                "--iptables-external",
                "MESH_IPTABLES_EXTERNAL",
                "only makes sense with --mode iptables",
            ));
        }
        Ok((
            settings,
            ProxySettings {
                opaque_ports: self.opaque_ports.iter().copied().collect(),
                detect_timeout: self.detect_timeout,
                connect_timeout: self.connect_timeout,
                drain_timeout: self.drain_timeout,
                downstream_idle_timeout: (!self.downstream_idle_timeout.is_zero())
                    .then_some(self.downstream_idle_timeout),
                request_header_timeout: self.request_header_timeout,
                tcp_idle_timeout: (!self.tcp_idle_timeout.is_zero()).then_some(self.tcp_idle_timeout),
                // Spliced reads never see bytes sk_msg redirected (a kernel limitation).
                splice: self.splice == Switch::On && self.sockmap == Switch::Off,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<(Settings, ProxySettings), ConfigError> {
        let mut argv = vec!["mesh-agent"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("flags parse").run.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let (s, p) = parse(&[]).unwrap();
        assert_eq!(s.outbound_port, 15001);
        assert_eq!(s.mark, DEFAULT_MARK);
        assert!(s.ipv6);
        assert!(p.opaque_ports.contains(&3306));
        assert_eq!(p.detect_timeout, Duration::from_secs(3));
        assert_eq!(p.downstream_idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(p.tcp_idle_timeout, Some(Duration::from_secs(3600)));
        assert!(p.splice, "splice is on by default");
    }

    #[test]
    fn sockmap_is_off_by_default_needs_ebpf_and_turns_splice_off() {
        let (s, p) = parse(&[]).unwrap();
        assert!(!s.sockmap);
        assert!(p.splice);
        let (s, p) = parse(&["--sockmap", "on"]).unwrap();
        assert!(s.sockmap);
        assert!(!p.splice, "spliced reads would miss redirected bytes");
        let e = parse(&["--sockmap", "on", "--mode", "iptables"]).unwrap_err().to_string();
        assert!(e.contains("--sockmap") && e.contains("eBPF"), "{e}");
    }

    #[test]
    fn splice_can_be_turned_off() {
        assert!(!parse(&["--splice", "off"]).unwrap().1.splice);
        assert!(parse(&["--splice", "on"]).unwrap().1.splice);
        let e = Cli::try_parse_from(["x", "--splice", "maybe"]).err().unwrap().to_string();
        assert!(e.contains("--splice"), "{e}");
    }

    #[test]
    fn tcp_idle_timeout_can_be_turned_off() {
        for off in ["off", "OFF", "0", "0s"] {
            let p = parse(&["--tcp-idle-timeout", off]).unwrap().1;
            assert_eq!(p.tcp_idle_timeout, None, "{off}");
        }
        let p = parse(&["--tcp-idle-timeout", "90s"]).unwrap().1;
        assert_eq!(p.tcp_idle_timeout, Some(Duration::from_secs(90)));
        let e = Cli::try_parse_from(["x", "--tcp-idle-timeout", "later"]).err().unwrap().to_string();
        assert!(e.contains("--tcp-idle-timeout"), "{e}");
    }

    #[test]
    fn downstream_idle_timeout_can_be_turned_off() {
        for off in ["off", "0", "0s"] {
            let p = parse(&["--downstream-idle-timeout", off]).unwrap().1;
            assert_eq!(p.downstream_idle_timeout, None, "{off}");
        }
        let p = parse(&["--downstream-idle-timeout", "5m"]).unwrap().1;
        assert_eq!(p.downstream_idle_timeout, Some(Duration::from_secs(300)));
        let e = Cli::try_parse_from(["x", "--downstream-idle-timeout", "soon"]).err().unwrap().to_string();
        assert!(e.contains("--downstream-idle-timeout"), "{e}");
    }

    #[test]
    fn request_header_timeout_defaults_to_30s_and_refuses_zero() {
        assert_eq!(parse(&[]).unwrap().1.request_header_timeout, Duration::from_secs(30));
        assert_eq!(
            parse(&["--request-header-timeout", "2s"]).unwrap().1.request_header_timeout,
            Duration::from_secs(2)
        );
        let e = parse(&["--request-header-timeout", "0s"]).unwrap_err().to_string();
        assert!(e.contains("--request-header-timeout"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(&["--outbound-port", "0"]).unwrap_err();
        assert_eq!(e.flag, "--outbound-port");
        assert!(e.to_string().contains("MESH_OUTBOUND_PORT"));
        let e = parse(&["--inbound-port", "15001"]).unwrap_err();
        assert_eq!(e.flag, "--inbound-port");
        let e = parse(&["--include-ports", "80,443", "--exclude-ports", "443"]).unwrap_err();
        assert!(e.to_string().contains("port 443"), "{e}");
        let e = parse(&["--mark", "0"]).unwrap_err();
        assert_eq!(e.flag, "--mark");
        let e = parse(&["--no-ipv6", "--exclude-cidrs", "fd00::/8"]).unwrap_err();
        assert!(e.to_string().contains("fd00::/8"), "{e}");
        let e = parse(&["--detect-timeout", "0s"]).unwrap_err();
        assert_eq!(e.flag, "--detect-timeout");
        let e = parse(&["--max-connections-per-source", "0"]).unwrap_err();
        assert_eq!(e.flag, "--max-connections-per-source");
        let e = parse(&["--tunnel-handshake-timeout", "0s"]).unwrap_err();
        assert_eq!(e.flag, "--tunnel-handshake-timeout");
    }

    #[test]
    fn the_control_plane_is_tls_with_an_anchor_and_a_credential_unless_insecure_is_explicit() {
        let tls = ["--control-plane", "https://cp:15010", "--bootstrap-token-file", "/t"];
        let e = parse(&tls).unwrap_err();
        assert_eq!(e.flag, "--control-plane-ca", "{e}");
        assert!(e.to_string().contains("MESH_CONTROL_PLANE_CA"), "{e}");
        parse(&[&tls[..], &["--control-plane-ca", "/ca.pem"]].concat()).expect("TLS with an anchor");

        let plain = ["--control-plane", "http://cp:15010", "--bootstrap-token-file", "/t"];
        let e = parse(&plain).unwrap_err();
        assert_eq!(e.flag, "--control-plane");
        assert!(e.to_string().contains("--insecure-control-plane"), "{e}");
        parse(&[&plain[..], &["--insecure-control-plane"]].concat()).expect("plaintext only when explicit");

        let e = parse(&["--control-plane", "https://cp:15010", "--control-plane-ca", "/ca.pem"]).unwrap_err();
        assert_eq!(e.flag, "--bootstrap-token-file", "{e}");
        let e = parse(&["--control-plane", "cp:15010", "--bootstrap-token-file", "/t"]).unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        let e = parse(&["--control-plane-ca", "/ca.pem"]).unwrap_err();
        assert_eq!(e.flag, "--control-plane-ca");
    }

    #[test]
    fn dns_flags() {
        let cli = |args: &[&str]| {
            let mut argv = vec!["mesh-agent"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).expect("flags parse").run
        };
        let resolv = "nameserver 10.0.0.53\nnameserver 10.0.0.54\n";
        let d = cli(&[]).dns_settings(resolv).unwrap();
        assert_eq!(d.port, 15053);
        assert_eq!(d.upstreams, ["10.0.0.53:53".parse().unwrap(), "10.0.0.54:53".parse().unwrap()]);
        let d = cli(&["--dns-upstream", "10.77.0.4,[fd00::1]:5353"]).dns_settings(resolv).unwrap();
        assert_eq!(d.upstreams, ["10.77.0.4:53".parse().unwrap(), "[fd00::1]:5353".parse().unwrap()]);
        assert!(cli(&["--dns-port", "0"]).dns_settings(resolv).is_none());
        assert_eq!(parse(&["--dns-port", "0"]).unwrap().0.dns_port, None);
        assert_eq!(parse(&[]).unwrap().0.dns_port, Some(15053));
        let e = parse(&["--dns-port", "15001"]).unwrap_err();
        assert_eq!(e.flag, "--dns-port");
        let e = parse(&["--dns-max-forwards", "0"]).unwrap_err();
        assert_eq!(e.flag, "--dns-max-forwards");
        let e = Cli::try_parse_from(["x", "--dns-upstream", "resolver"]).err().unwrap().to_string();
        assert!(e.contains("--dns-upstream"), "{e}");
    }

    #[test]
    fn parse_errors_name_the_flag() {
        let e = Cli::try_parse_from(["x", "--exclude-cidrs", "10.0.0.1/8"]).err().unwrap().to_string();
        assert!(e.contains("--exclude-cidrs") && e.contains("10.0.0.0/8"), "{e}");
        let e = Cli::try_parse_from(["x", "--mark", "zz"]).err().unwrap().to_string();
        assert!(e.contains("--mark"), "{e}");
        assert_eq!(parse_u32("0x10"), Ok(16));
    }

    #[derive(Parser)]
    struct PodCli {
        #[command(flatten)]
        pod: PodRulesArgs,
    }

    fn pod(args: &[&str]) -> Result<PodRules, ConfigError> {
        let mut argv = vec!["mesh-agent"];
        argv.extend_from_slice(args);
        PodCli::try_parse_from(argv).expect("flags parse").pod.rules()
    }

    #[test]
    fn pod_rules_defaults_and_owner() {
        let r = pod(&[]).unwrap();
        assert_eq!((r.outbound_port, r.inbound_port, r.tunnel_port), (15001, 15006, 15008));
        assert_eq!(r.inbound_exceptions(), [15008, 15006, 15001, 15000]);
        assert_eq!(r.agent, AgentSockets::mark_only(DEFAULT_MARK));
        let r =
            pod(&["--agent-gid", "1337", "--agent-cgroup", "/a,/b", "--inbound-exclude-ports", "9090,9090"])
                .unwrap();
        assert_eq!(r.agent.gid, Some(1337));
        assert_eq!(r.agent.cgroups, ["/a", "/b"]);
        assert_eq!(r.inbound_exclude_ports, [9090]);
        let (s, _) = parse(&["--agent-uid", "7"]).unwrap();
        assert_eq!(
            s.agent_sockets(None),
            AgentSockets { uid: Some(7), ..AgentSockets::mark_only(DEFAULT_MARK) }
        );
    }

    #[test]
    fn pod_rules_errors_name_the_flag() {
        for (args, flag) in [
            (&["--outbound-port", "0"][..], "--outbound-port"),
            (&["--inbound-port", "0"], "--inbound-port"),
            (&["--tunnel-port", "0"], "--tunnel-port"),
            (&["--tunnel-port", "15006"], "--outbound-port/--inbound-port/--tunnel-port"),
            (&["--agent-ports", "15000,0"], "--agent-ports"),
            (&["--inbound-exclude-ports", "0"], "--inbound-exclude-ports"),
            (&["--exclude-ports", "22,0"], "--exclude-ports"),
            (&["--mark", "0"], "--mark"),
            (&["--agent-cgroup", "agent"], "--agent-cgroup"),
            (&["--agent-cgroup", "/a b"], "--agent-cgroup"),
            (&["--no-ipv6", "--exclude-cidrs", "fd00::/8"], "--exclude-cidrs"),
        ] {
            let e = pod(args).unwrap_err();
            assert_eq!(e.flag, flag, "{args:?}: {e}");
            assert!(e.env.starts_with("MESH_"), "{args:?}: {e}");
        }
    }
}

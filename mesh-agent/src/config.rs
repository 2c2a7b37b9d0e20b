//! The agent's configuration: flags with environment fallbacks, parsed by clap and
//! validated once at start into typed settings. Every error names the flag and its
//! environment variable.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::{
    cidr::Cidr,
    intercept::{Mode, Settings},
};

/// Default outbound listener port (workload connections are redirected here).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default inbound listener port (iptables mode PREROUTING redirect target).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default admin port.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
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
}

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

    /// The agent's own cgroup, where the getsockopt program attaches (default: read
    /// from /proc/self/cgroup).
    #[arg(long, env = "MESH_AGENT_CGROUP")]
    pub agent_cgroup: Option<String>,

    #[command(flatten)]
    pub intercept: InterceptArgs,

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

    /// Idle time after which a pooled upstream HTTP connection is closed.
    #[arg(long, env = "MESH_UPSTREAM_IDLE_TIMEOUT", default_value = "90s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Time after which an HTTP connection from a workload (or a peer agent's HTTP
    /// tunnel stream) with no request in flight is closed; `off` or 0 never closes it.
    #[arg(long, env = "MESH_DOWNSTREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration_or_off)]
    pub downstream_idle_timeout: Duration,

    /// Time after which a relayed opaque or TLS connection that moved no byte in
    /// either direction is closed (both sides); `off` or 0 never closes it.
    #[arg(long, env = "MESH_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration_or_off)]
    pub tcp_idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long open connections may take to finish.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Admin HTTP endpoint (/live, /ready, /stats, /config_dump, /enroll, /unenroll).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

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
    #[arg(long, env = "MESH_TUNNEL_PORT", default_value_t = 15008)]
    pub tunnel_port: u16,

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
        if self.outbound_port == 0 {
            return Err(err("--outbound-port", "MESH_OUTBOUND_PORT", "must not be 0"));
        }
        if self.inbound_port == 0 {
            return Err(err("--inbound-port", "MESH_INBOUND_PORT", "must not be 0"));
        }
        if self.inbound_port == self.outbound_port {
            return Err(err(
                "--inbound-port",
                "MESH_INBOUND_PORT",
                format!("must differ from --outbound-port ({})", self.outbound_port),
            ));
        }
        if self.mark == 0 {
            return Err(err("--mark", "MESH_MARK", "must not be 0 (0 is every unmarked socket)"));
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
        if let Some(p) =
            self.inbound_ports.iter().find(|p| [self.outbound_port, self.inbound_port].contains(p))
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
            exclude_uid: self.exclude_uid,
            include_ports: dedup(&self.include_ports),
            exclude_ports: dedup(&self.exclude_ports),
            include_cidrs: dedup(&self.include_cidrs),
            exclude_cidrs: dedup(&self.exclude_cidrs),
            ipv6,
            ebpf_log,
            agent_cgroup,
            iptables_external,
        })
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
    /// Time without a byte that closes an opaque relay; `None`: never.
    pub tcp_idle_timeout: Option<Duration>,
}

impl RunArgs {
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
        let settings =
            self.intercept.settings(self.agent_cgroup.clone(), self.ebpf_log, self.iptables_external)?;
        if self.detect_timeout.is_zero() {
            return Err(err("--detect-timeout", "MESH_DETECT_TIMEOUT", "must be more than 0"));
        }
        if self.connect_timeout.is_zero() {
            return Err(err("--connect-timeout", "MESH_CONNECT_TIMEOUT", "must be more than 0"));
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
        if !(self.cert_renew_fraction > 0.0 && self.cert_renew_fraction <= 1.0) {
            return Err(err("--cert-renew-fraction", "MESH_CERT_RENEW_FRACTION", "must be in (0, 1]"));
        }
        if self.discovery_backoff_max < Duration::from_millis(100) {
            return Err(err(
                "--discovery-backoff-max",
                "MESH_DISCOVERY_BACKOFF_MAX",
                "must be at least 100ms",
            ));
        }
        if self.discovery_keepalive < Duration::from_secs(1) {
            return Err(err("--discovery-keepalive", "MESH_DISCOVERY_KEEPALIVE", "must be at least 1s"));
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
                tcp_idle_timeout: (!self.tcp_idle_timeout.is_zero()).then_some(self.tcp_idle_timeout),
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
    fn parse_errors_name_the_flag() {
        let e = Cli::try_parse_from(["x", "--exclude-cidrs", "10.0.0.1/8"]).err().unwrap().to_string();
        assert!(e.contains("--exclude-cidrs") && e.contains("10.0.0.0/8"), "{e}");
        let e = Cli::try_parse_from(["x", "--mark", "zz"]).err().unwrap().to_string();
        assert!(e.contains("--mark"), "{e}");
        assert_eq!(parse_u32("0x10"), Ok(16));
    }
}

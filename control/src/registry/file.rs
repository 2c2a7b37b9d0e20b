//! The YAML file registry: the embedded default source. Services with their
//! endpoints and policy, and (`workloads:`, see [`workloads`]) which workloads run
//! on which node.
//!
//! The file is re-read when its contents change (checked every
//! [`FileSource::POLL`]; polling the contents rather than relying on inotify also
//! catches editors that replace the file and files on bind mounts). An invalid
//! edit is rejected with an error naming the file, the entry and the field, and the
//! last good view stays published.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_api as api;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceView};

pub mod routes;
pub mod workloads;

/// Why a registry file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {entry}: {field}: {message}")]
    Invalid { file: String, entry: String, field: String, message: String },
}

/// The registry file's top level.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
    #[serde(default)]
    pub workloads: Vec<workloads::WorkloadEntry>,
}

/// A valid registry file's contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    pub services: Vec<api::Service>,
    /// Sorted by namespace then name.
    pub workloads: Vec<api::Workload>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub vips: Vec<String>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub ports: Vec<PortEntry>,
    #[serde(default)]
    pub policy: Option<PolicyEntry>,
    #[serde(default)]
    pub endpoints: Vec<EndpointEntry>,
    /// Active TCP checks by the control plane.
    #[serde(default)]
    pub health_check: Option<HealthCheckEntry>,
    /// HTTP routes, in order (see [`routes`]).
    #[serde(default)]
    pub routes: Vec<routes::RouteEntry>,
    /// Offered to federated clusters (`mesh-control --federation`): their control
    /// planes receive it with its meshed endpoints, without policy or routes.
    #[serde(default)]
    pub export: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckEntry {
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub unhealthy_threshold: u32,
    #[serde(default)]
    pub healthy_threshold: u32,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortEntry {
    pub port: u32,
    #[serde(default)]
    pub target_port: u32,
    #[serde(default)]
    pub name: String,
    /// detect (default), tcp, http, http2, grpc, tls.
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    pub address: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub weight: Option<u32>,
    /// healthy (default) or unhealthy.
    #[serde(default)]
    pub health: Option<String>,
    #[serde(default)]
    pub health_reason: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub region: String,
    /// Service account of the workload; with the namespace it forms the identity.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node: String,
    /// The node agent's inbound address (host:port); absent: outside the mesh.
    #[serde(default)]
    pub agent_address: String,
    #[serde(default)]
    pub workload: String,
    /// The workload's labels; route subsets select endpoints by them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerEntry>,
    #[serde(default)]
    pub retries: Option<RetryEntry>,
    #[serde(default)]
    pub timeouts: Option<TimeoutsEntry>,
    #[serde(default)]
    pub circuit_breaker: Option<BreakerEntry>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierEntry>,
    #[serde(default)]
    pub authorization: Vec<AuthzEntry>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitEntry>,
    /// `strict` or `permissive`; absent: the mesh-wide default (`--mtls-default`).
    #[serde(default)]
    pub mtls: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerEntry {
    #[serde(default)]
    pub algorithm: Option<String>,
    #[serde(default)]
    pub hash_header: Option<String>,
    #[serde(default)]
    pub hash_cookie: Option<String>,
    #[serde(default)]
    pub hash_source_address: bool,
    #[serde(default)]
    pub virtual_nodes: u32,
    #[serde(default, with = "humantime_serde")]
    pub slow_start: Option<Duration>,
    #[serde(default)]
    pub locality_aware: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryEntry {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retry_on: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    pub backoff_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
    #[serde(default)]
    pub budget_ratio: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsEntry {
    #[serde(default, with = "humantime_serde")]
    pub connect: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BreakerEntry {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub failure_rate: Option<f64>,
    #[serde(default)]
    pub window: u32,
    #[serde(default, with = "humantime_serde")]
    pub reset_timeout: Option<Duration>,
    #[serde(default)]
    pub half_open_probes: u32,
    #[serde(default)]
    pub close_after_successes: u32,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutlierEntry {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default, with = "humantime_serde")]
    pub base_ejection: Option<Duration>,
    #[serde(default)]
    pub max_ejection_ratio: Option<f64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthzEntry {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimitEntry {
    pub requests_per_second: u32,
    #[serde(default)]
    pub burst: u32,
}

/// Turns the file's text into services and workloads, or says exactly what is wrong.
pub fn parse(file: &str, text: &str, trust_domain: &str) -> Result<Registry, FileError> {
    let raw: RegistryFile = if text.trim().is_empty() {
        RegistryFile::default()
    } else {
        serde_yaml_ng::from_str(text)
            .map_err(|e| FileError::Syntax { file: file.to_string(), message: e.to_string() })?
    };
    let mut seen = HashSet::new();
    let mut vips_seen: BTreeMap<(IpAddr, u32), String> = BTreeMap::new();
    let mut out = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        let entry = format!("services[{i}] ({}/{})", s.namespace, s.name);
        let invalid = |field: &str, message: String| FileError::Invalid {
            file: file.to_string(),
            entry: entry.clone(),
            field: field.to_string(),
            message,
        };
        if !is_dns_label(&s.name) {
            return Err(invalid(
                "name",
                format!("{:?} is not a DNS label (lowercase a-z, 0-9, '-')", s.name),
            ));
        }
        if !is_dns_label(&s.namespace) {
            return Err(invalid("namespace", format!("{:?} is not a DNS label", s.namespace)));
        }
        if !seen.insert((s.namespace.clone(), s.name.clone())) {
            return Err(invalid("name", "a service with this namespace/name is already defined".into()));
        }
        if s.ports.is_empty() {
            return Err(invalid("ports", "at least one port is required".into()));
        }
        let mut ports = Vec::with_capacity(s.ports.len());
        for (j, p) in s.ports.iter().enumerate() {
            if !(1..=65535).contains(&p.port) {
                return Err(invalid(
                    &format!("ports[{j}].port"),
                    format!("{} is not a port (1-65535)", p.port),
                ));
            }
            if p.target_port > 65535 {
                return Err(invalid(
                    &format!("ports[{j}].target_port"),
                    format!("{} is not a port (1-65535)", p.target_port),
                ));
            }
            let protocol = match p.protocol.as_deref() {
                None | Some("detect") => api::Protocol::Unspecified,
                Some("tcp") => api::Protocol::Tcp,
                Some("http") | Some("http1") => api::Protocol::Http1,
                Some("http2") | Some("h2c") => api::Protocol::Http2,
                Some("grpc") => api::Protocol::Grpc,
                Some("tls") => api::Protocol::Tls,
                Some(other) => {
                    return Err(invalid(
                        &format!("ports[{j}].protocol"),
                        format!("{other:?} is not one of detect, tcp, http, http2, grpc, tls"),
                    ));
                }
            };
            ports.push(api::ServicePort {
                name: p.name.clone(),
                port: p.port,
                target_port: p.target_port,
                protocol: protocol as i32,
            });
        }
        let mut vips = Vec::with_capacity(s.vips.len());
        for (j, v) in s.vips.iter().enumerate() {
            let ip: IpAddr = v
                .parse()
                .map_err(|_| invalid(&format!("vips[{j}]"), format!("{v:?} is not an IP address")))?;
            for p in &ports {
                if let Some(other) = vips_seen.insert((ip, p.port), entry.clone()) {
                    return Err(invalid(
                        &format!("vips[{j}]"),
                        format!("{ip} port {} is already used by {other}", p.port),
                    ));
                }
            }
            vips.push(ip.to_string());
        }
        for (j, h) in s.hostnames.iter().enumerate() {
            if h.is_empty() || !h.split('.').all(is_dns_label) {
                return Err(invalid(&format!("hostnames[{j}]"), format!("{h:?} is not a DNS name")));
            }
        }
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for (j, e) in s.endpoints.iter().enumerate() {
            let field = |f: &str| format!("endpoints[{j}].{f}");
            let address: IpAddr = e
                .address
                .parse()
                .map_err(|_| invalid(&field("address"), format!("{:?} is not an IP address", e.address)))?;
            if e.port > 65535 {
                return Err(invalid(&field("port"), format!("{} is not a port (1-65535)", e.port)));
            }
            let health = match e.health.as_deref() {
                None | Some("healthy") => api::Health::Healthy,
                Some("unhealthy") => api::Health::Unhealthy,
                Some(other) => {
                    return Err(invalid(&field("health"), format!("{other:?} is not healthy or unhealthy")));
                }
            };
            if !e.agent_address.is_empty() && e.agent_address.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    &field("agent_address"),
                    format!("{:?} is not an address:port", e.agent_address),
                ));
            }
            let identity = match &e.service_account {
                Some(sa) if !is_dns_label(sa) => {
                    return Err(invalid(&field("service_account"), format!("{sa:?} is not a DNS label")));
                }
                Some(sa) => format!("spiffe://{trust_domain}/ns/{}/sa/{sa}", s.namespace),
                // Behind an agent, the endpoint is reached only over mutual TLS as its
                // identity: without one, agents would have nothing to check.
                None if !e.agent_address.is_empty() => {
                    return Err(invalid(
                        &field("service_account"),
                        "missing: an endpoint with an agent_address is meshed and needs an identity".into(),
                    ));
                }
                None => String::new(),
            };
            endpoints.push(api::Endpoint {
                address: address.to_string(),
                port: e.port,
                named_ports: Default::default(),
                weight: e.weight.unwrap_or(1),
                health: health as i32,
                health_reason: if health == api::Health::Unhealthy && e.health_reason.is_empty() {
                    "marked unhealthy in the registry".into()
                } else {
                    e.health_reason.clone()
                },
                locality: (!e.zone.is_empty() || !e.region.is_empty())
                    .then(|| api::Locality { region: e.region.clone(), zone: e.zone.clone() }),
                identity,
                node: e.node.clone(),
                agent_address: e.agent_address.clone(),
                workload: e.workload.clone(),
                labels: e.labels.clone().into_iter().collect(),
            });
        }
        let policy = match &s.policy {
            Some(p) => Some(policy(p).map_err(|(f, m)| invalid(&format!("policy.{f}"), m))?),
            None => None,
        };
        let health_check = match &s.health_check {
            None => None,
            Some(h) => {
                if h.interval.is_some_and(|d| d < Duration::from_millis(100)) {
                    return Err(invalid("health_check.interval", "must be at least 100ms".into()));
                }
                if h.timeout.is_some_and(|d| d.is_zero()) {
                    return Err(invalid("health_check.timeout", "must be more than 0".into()));
                }
                Some(api::HealthCheck {
                    interval_ms: ms(h.interval),
                    timeout_ms: ms(h.timeout),
                    unhealthy_threshold: h.unhealthy_threshold,
                    healthy_threshold: h.healthy_threshold,
                })
            }
        };
        let routes = routes::parse(&s.routes, &ports).map_err(|(f, m)| invalid(&f, m))?;
        out.push(api::Service {
            routes,
            health_check,
            name: s.name,
            namespace: s.namespace,
            vips,
            allocated_vips: Vec::new(),
            // A file entry with hostnames and no VIP wants one allocated: its names
            // have no other resolver to answer them.
            headless: false,
            hostnames: s.hostnames,
            ports,
            policy,
            endpoints,
            exported: s.export,
            // The file names this cluster's own services only.
            cluster: String::new(),
        });
    }
    let workloads = workloads::parse(&raw.workloads).map_err(|(entry, field, message)| {
        FileError::Invalid { file: file.to_string(), entry, field, message }
    })?;
    Ok(Registry { services: out, workloads })
}

fn ms(d: Option<Duration>) -> u32 {
    d.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)).unwrap_or(0)
}

fn ratio(field: &str, v: Option<f64>) -> Result<f64, (String, String)> {
    match v {
        None => Ok(0.0),
        Some(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Some(r) => Err((field.to_string(), format!("{r} is not a ratio between 0 and 1"))),
    }
}

fn policy(p: &PolicyEntry) -> Result<api::Policy, (String, String)> {
    let load_balancer = match &p.load_balancer {
        None => None,
        Some(lb) => {
            let algorithm = match lb.algorithm.as_deref() {
                None | Some("round-robin") => api::Algorithm::RoundRobin,
                Some("least-request") => api::Algorithm::LeastRequest,
                Some("weighted-round-robin") => api::Algorithm::WeightedRoundRobin,
                Some("ring-hash") => api::Algorithm::RingHash,
                Some("maglev") => api::Algorithm::Maglev,
                Some("random") => api::Algorithm::Random,
                Some(other) => {
                    return Err((
                        "load_balancer.algorithm".into(),
                        format!(
                            "{other:?} is not one of round-robin, least-request, weighted-round-robin, \
                             ring-hash, maglev, random"
                        ),
                    ));
                }
            };
            if lb.virtual_nodes > api::limits::MAX_VIRTUAL_NODES {
                return Err((
                    "load_balancer.virtual_nodes".into(),
                    format!(
                        "{} is more than {} virtual nodes per endpoint",
                        lb.virtual_nodes,
                        api::limits::MAX_VIRTUAL_NODES
                    ),
                ));
            }
            let sources = [lb.hash_header.is_some(), lb.hash_cookie.is_some(), lb.hash_source_address];
            if sources.iter().filter(|s| **s).count() > 1 {
                return Err((
                    "load_balancer".into(),
                    "set only one of hash_header, hash_cookie, hash_source_address".into(),
                ));
            }
            let hash_source = if let Some(h) = &lb.hash_header {
                Some(api::hash_key::Source::Header(h.clone()))
            } else if let Some(c) = &lb.hash_cookie {
                Some(api::hash_key::Source::Cookie(c.clone()))
            } else if lb.hash_source_address {
                Some(api::hash_key::Source::SourceAddress(true))
            } else {
                None
            };
            Some(api::LoadBalancer {
                algorithm: algorithm as i32,
                hash_key: hash_source.map(|s| api::HashKey { source: Some(s) }),
                virtual_nodes: lb.virtual_nodes,
                slow_start_ms: ms(lb.slow_start),
                locality_aware: lb.locality_aware,
            })
        }
    };
    let retries = p.retries.as_ref().map(|r| retries(r, "retries")).transpose()?;
    let timeouts = p.timeouts.as_ref().map(|t| api::Timeouts {
        connect_ms: ms(t.connect),
        request_ms: ms(t.request),
        idle_ms: ms(t.idle),
    });
    let circuit_breaker = match &p.circuit_breaker {
        None => None,
        Some(b) => Some(api::CircuitBreaker {
            enabled: b.enabled,
            failure_rate: ratio("circuit_breaker.failure_rate", b.failure_rate)?,
            window: b.window,
            reset_timeout_ms: ms(b.reset_timeout),
            half_open_probes: b.half_open_probes,
            close_after_successes: b.close_after_successes,
        }),
    };
    let outlier_detection = match &p.outlier_detection {
        None => None,
        Some(o) => Some(api::OutlierDetection {
            enabled: o.enabled,
            consecutive_failures: o.consecutive_failures,
            base_ejection_ms: ms(o.base_ejection),
            max_ejection_ratio: ratio("outlier_detection.max_ejection_ratio", o.max_ejection_ratio)?,
        }),
    };
    let mut authorization = Vec::with_capacity(p.authorization.len());
    for (k, a) in p.authorization.iter().enumerate() {
        for (m, pr) in a.principals.iter().enumerate() {
            if !pr.starts_with("spiffe://") && pr != "*" {
                return Err((
                    format!("authorization[{k}].principals[{m}]"),
                    format!("{pr:?} is not a SPIFFE ID (spiffe://trust-domain/ns/N/sa/SA) or \"*\""),
                ));
            }
        }
        for (m, prefix) in a.path_prefixes.iter().enumerate() {
            if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
                return Err((
                    format!("authorization[{k}].path_prefixes[{m}]"),
                    format!("{prefix:?} is not a path (it starts with \"/\" and has no query or fragment)"),
                ));
            }
        }
        authorization.push(api::AuthorizationRule {
            principals: a.principals.clone(),
            methods: a.methods.clone(),
            path_prefixes: a.path_prefixes.clone(),
        });
    }
    let rate_limit = p
        .rate_limit
        .as_ref()
        .map(|r| api::RateLimit { requests_per_second: r.requests_per_second, burst: r.burst });
    Ok(api::Policy {
        load_balancer,
        retries,
        timeouts,
        circuit_breaker,
        outlier_detection,
        authorization,
        rate_limit,
        mtls: mtls_mode(p.mtls.as_deref())? as i32,
    })
}

/// A `retries:` block (a service's policy, or a route's), checked; `at` prefixes the
/// field names of errors.
fn retries(r: &RetryEntry, at: &str) -> Result<api::RetryPolicy, (String, String)> {
    for (k, cond) in r.retry_on.iter().enumerate() {
        if !api::routes::RETRY_ON.contains(&cond.as_str()) {
            return Err((
                format!("{at}.retry_on[{k}]"),
                format!("{cond:?} is not one of {}", api::routes::RETRY_ON.join(", ")),
            ));
        }
    }
    Ok(api::RetryPolicy {
        attempts: r.attempts,
        per_try_timeout_ms: ms(r.per_try_timeout),
        retry_on: r.retry_on.clone(),
        backoff_base_ms: ms(r.backoff_base),
        backoff_max_ms: ms(r.backoff_max),
        budget_ratio: ratio(&format!("{at}.budget_ratio"), r.budget_ratio)?,
    })
}

/// A service's `mtls` field.
fn mtls_mode(v: Option<&str>) -> Result<api::MtlsMode, (String, String)> {
    match v {
        None => Ok(api::MtlsMode::Unspecified),
        Some("strict") => Ok(api::MtlsMode::Strict),
        Some("permissive") => Ok(api::MtlsMode::Permissive),
        Some(other) => Err(("mtls".into(), format!("{other:?} is not strict or permissive"))),
    }
}

/// A DNS label as Kubernetes names namespaces and service accounts: what every
/// registry source checks names against.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Dot-separated DNS labels, 253 characters at most (Kubernetes object and node names).
fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Watches one YAML registry file.
pub struct FileSource {
    path: PathBuf,
    trust_domain: String,
    poll: Duration,
}

impl FileSource {
    /// How often the file's contents are compared with the last read.
    pub const POLL: Duration = Duration::from_millis(200);

    pub fn new(path: impl Into<PathBuf>, trust_domain: impl Into<String>) -> Self {
        Self { path: path.into(), trust_domain: trust_domain.into(), poll: Self::POLL }
    }

    /// Reads and validates the file once (used at start-up so a bad file fails fast).
    pub fn load(path: &Path, trust_domain: &str) -> Result<Registry, FileError> {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| FileError::Read { file: file.clone(), source })?;
        parse(&file, &text, trust_domain)
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        "file"
    }

    fn run(
        self: Box<Self>,
        tx: watch::Sender<SourceView>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let file = self.path.display().to_string();
            let mut last_text: Option<String> = None;
            let mut tick = tokio::time::interval(self.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let text = match tokio::fs::read_to_string(&self.path).await {
                    Ok(t) => t,
                    Err(source) => {
                        let err = FileError::Read { file: file.clone(), source }.to_string();
                        publish_error(&tx, err);
                        last_text = None;
                        continue;
                    }
                };
                if last_text.as_deref() == Some(text.as_str()) {
                    continue;
                }
                match parse(&file, &text, &self.trust_domain) {
                    Ok(registry) => {
                        tracing::info!(file = %file, services = registry.services.len(),
                            workloads = registry.workloads.len(), "registry file loaded");
                        tx.send_replace(SourceView {
                            services: Arc::new(registry.services),
                            workloads: Arc::new(registry.workloads),
                            ready: true,
                            last_error: None,
                            ..Default::default()
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "registry file rejected; keeping the last good state");
                        crate::metrics::registry_error("file");
                        publish_error(&tx, e.to_string());
                    }
                }
                last_text = Some(text);
            }
        })
    }
}

fn publish_error(tx: &watch::Sender<SourceView>, err: String) {
    tx.send_if_modified(|v| {
        if v.last_error.as_deref() == Some(err.as_str()) {
            return false;
        }
        v.last_error = Some(err);
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: echo
    vips: [10.96.0.10, "fd96::10"]
    hostnames: [echo.default.svc.cluster.local]
    ports: [{port: 80, target_port: 8080, protocol: http}]
    policy:
      load_balancer: {algorithm: least-request}
      retries: {attempts: 3, retry_on: [connect-failure, "503"], per_try_timeout: 500ms}
      mtls: strict
      authorization: [{principals: ["*"], path_prefixes: [/api]}]
    endpoints:
      - {address: 10.77.0.3, service_account: echo, agent_address: "10.77.0.3:15008", zone: a}
      - {address: 10.77.0.4, health: unhealthy, weight: 2}
"#;

    #[test]
    fn export_marks_a_service_for_federated_clusters() {
        let text = "services:\n  - {name: a, ports: [{port: 80}], export: true}\n  - {name: b, ports: [{port: 80}]}\n";
        let s = parse("r.yaml", text, "td").unwrap().services;
        assert!(s[0].exported && !s[1].exported);
        assert!(s.iter().all(|s| s.cluster.is_empty()), "the file's services are this cluster's");
        let e = parse("r.yaml", "services:\n  - {name: a, ports: [{port: 80}], export: yes}\n", "td")
            .unwrap_err();
        assert!(e.to_string().contains("export"), "{e}");
    }

    #[test]
    fn parses_services_endpoints_and_policy() {
        let s = parse("r.yaml", GOOD, "cluster.local").unwrap().services;
        assert_eq!(s.len(), 1);
        let svc = &s[0];
        assert_eq!(svc.namespace, "default");
        assert_eq!(svc.vips, ["10.96.0.10", "fd96::10"]);
        assert_eq!(svc.ports[0].target_port, 8080);
        assert_eq!(svc.ports[0].protocol, api::Protocol::Http1 as i32);
        let e = &svc.endpoints;
        assert_eq!(e[0].identity, "spiffe://cluster.local/ns/default/sa/echo");
        assert_eq!(e[0].health, api::Health::Healthy as i32);
        assert_eq!(e[1].health, api::Health::Unhealthy as i32);
        assert_eq!(e[1].health_reason, "marked unhealthy in the registry");
        assert_eq!(e[1].weight, 2);
        let p = svc.policy.as_ref().unwrap();
        assert_eq!(p.load_balancer.as_ref().unwrap().algorithm, api::Algorithm::LeastRequest as i32);
        assert_eq!(p.retries.as_ref().unwrap().per_try_timeout_ms, 500);
        assert_eq!(p.mtls(), api::MtlsMode::Strict);
        assert_eq!(p.authorization[0].principals, ["*"]);
        let unset =
            parse("r.yaml", "services:\n  - {name: a, ports: [{port: 80}], policy: {}}\n", "td").unwrap();
        assert_eq!(
            unset.services[0].policy.as_ref().unwrap().mtls(),
            api::MtlsMode::Unspecified,
            "the mesh default"
        );
    }

    fn err(text: &str) -> String {
        parse("reg.yaml", text, "cluster.local").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_entry_and_field() {
        let e = err(
            "services:\n  - name: echo\n    ports: [{port: 80}]\n    endpoints: [{address: 10.0.0.300}]\n",
        );
        assert_eq!(
            e,
            "reg.yaml: services[0] (default/echo): endpoints[0].address: \"10.0.0.300\" is not an IP address"
        );
        let e = err(
            "services:\n  - name: echo\n    ports: [{port: 80}]\n    endpoints: [{address: 10.0.0.3, agent_address: \"10.0.0.3:15008\"}]\n",
        );
        assert!(
            e.contains(
                "(default/echo): endpoints[0].service_account: missing: an endpoint with an agent_address"
            ),
            "{e}"
        );
        let e = err("services:\n  - name: echo\n    ports: [{port: 70000}]\n");
        assert!(e.contains("services[0] (default/echo): ports[0].port: 70000"), "{e}");
        let e = err("services:\n  - name: echo\n    ports: [{port: 80, protocol: htp}]\n");
        assert!(e.contains("ports[0].protocol: \"htp\" is not one of"), "{e}");
        let e = err(
            "services:\n  - name: echo\n    ports: [{port: 80}]\n    policy: {load_balancer: {algorithm: fastest}}\n",
        );
        assert!(e.contains("policy.load_balancer.algorithm: \"fastest\""), "{e}");
        let e = err(
            "services:\n  - name: echo\n    ports: [{port: 80}]\n    policy: {load_balancer: {algorithm: ring-hash, virtual_nodes: 100000}}\n",
        );
        assert!(e.contains("policy.load_balancer.virtual_nodes: 100000 is more than 4096"), "{e}");
        let e = err("services:\n  - name: Echo\n    ports: [{port: 80}]\n");
        assert!(e.contains("services[0] (default/Echo): name:"), "{e}");
        let e = err("services:\n  - name: echo\n    ports: [{port: 80}]\n    policy: {mtls: STRICT}\n");
        assert!(e.contains("(default/echo): policy.mtls: \"STRICT\" is not strict or permissive"), "{e}");
        let e = err(
            "services:\n  - name: echo\n    ports: [{port: 80}]\n    policy: {authorization: [{path_prefixes: [/a, api]}]}\n",
        );
        assert!(e.contains("policy.authorization[0].path_prefixes[1]: \"api\" is not a path"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_yaml_are_named() {
        let e = err("services:\n  - name: echo\n    ports: [{port: 80}]\n    endpionts: []\n");
        assert!(e.starts_with("reg.yaml: services[0]: unknown field `endpionts`"), "{e}");
        let e = err("services: [\n");
        assert!(e.starts_with("reg.yaml: "), "{e}");
    }

    #[test]
    fn conflicting_vips_and_duplicate_services_are_refused() {
        let e = err(
            "services:\n  - {name: a, vips: [10.96.0.1], ports: [{port: 80}]}\n  - {name: b, vips: [10.96.0.1], ports: [{port: 80}]}\n",
        );
        assert!(
            e.contains("services[1] (default/b): vips[0]: 10.96.0.1 port 80 is already used by services[0]"),
            "{e}"
        );
        let e = err("services:\n  - {name: a, ports: [{port: 80}]}\n  - {name: a, ports: [{port: 81}]}\n");
        assert!(e.contains("services[1] (default/a): name: a service with this namespace/name"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_registry() {
        assert_eq!(parse("r.yaml", "", "td").unwrap(), Registry::default());
        assert_eq!(parse("r.yaml", "services: []\nworkloads: []", "td").unwrap(), Registry::default());
    }

    #[tokio::test(start_paused = true)]
    async fn bad_edit_keeps_last_good_view_and_reports_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (tx, mut rx) = watch::channel(SourceView::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(Box::new(FileSource::new(&path, "cluster.local")).run(tx, stop.clone()));
        rx.wait_for(|v| v.ready).await.unwrap();
        let good = rx.borrow().services.clone();
        assert_eq!(good.len(), 1);

        std::fs::write(&path, "services:\n  - name: echo\n    ports: [{port: 0}]\n").unwrap();
        let view = rx.wait_for(|v| v.last_error.is_some()).await.unwrap().clone();
        assert!(view.last_error.unwrap().contains("ports[0].port: 0 is not a port"));
        assert_eq!(view.services, good, "the last good services stay published");

        std::fs::write(&path, GOOD.replace("10.77.0.4", "10.77.0.5")).unwrap();
        let view = rx.wait_for(|v| v.last_error.is_none()).await.unwrap().clone();
        assert_eq!(view.services[0].endpoints[1].address, "10.77.0.5");
        stop.cancel();
        task.await.unwrap();
    }
}

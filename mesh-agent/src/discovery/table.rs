//! The agent's routing table, built from one discovery snapshot.
//!
//! Built once per snapshot (validation happens here, so a snapshot the agent cannot
//! use is refused as a whole and NACKed) and then only read: lookups are hash-map
//! hits on the intercepted original destination (VIP:port) or on a hostname, and
//! round robin is one atomic increment over a precomputed list of healthy endpoints.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_api as api;
use prost::Message as _;
use serde::Serialize;

use crate::{authz::MtlsMode, balance::service::ServicePolicy, identity::SpiffeId};

/// Why a snapshot cannot be used (sent back as the NACK reason).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TableError {
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    #[error("service {service}: {field}: {message}")]
    Invalid { service: String, field: String, message: String },
    #[error("service {service}: {error}")]
    Route { service: String, error: mesh_api::routes::RouteError },
    #[error("service {service}: VIP {vip} is also claimed by service {other}")]
    Conflict { service: String, vip: SocketAddr, other: String },
    #[error("snapshot has {count} endpoints, over this agent's limit of {limit} (--max-endpoints)")]
    TooManyEndpoints { count: usize, limit: usize },
}

/// One endpoint as the data path needs it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointTarget {
    pub addr: SocketAddr,
    pub healthy: bool,
    pub health_reason: String,
    pub weight: u32,
    pub identity: String,
    /// `identity` parsed once when the table is built, so that a request dialing
    /// the endpoint only clones an `Arc`; `None` when `identity` is empty.
    #[serde(skip)]
    pub spiffe_id: Option<Arc<SpiffeId>>,
    /// `addr` as a header value, made once (it names the endpoint in
    /// `x-mesh-target` and in responses' `x-mesh-endpoint`).
    #[serde(skip)]
    pub addr_header: http::HeaderValue,
    pub node: String,
    /// The destination node's agent; `None` when the endpoint is outside the mesh.
    pub agent_address: Option<SocketAddr>,
    pub zone: String,
    pub region: String,
    /// The workload's labels: route subsets select endpoints by them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A service port: what a VIP:port or hostname:port resolves to.
#[derive(Debug, Serialize)]
pub struct Route {
    /// `namespace/name`.
    pub service: Arc<str>,
    pub port: u16,
    pub protocol: &'static str,
    pub endpoints: Vec<EndpointTarget>,
    #[serde(skip)]
    pub policy: Option<api::Policy>,
    /// `policy`, validated and with defaults filled in.
    #[serde(skip)]
    pub service_policy: Arc<ServicePolicy>,
    /// Whether the service accepts plaintext at its workloads (the policy's `mtls`,
    /// else the snapshot's default).
    pub mtls: MtlsMode,
    /// The service's HTTP routes that apply to this port, compiled, in order.
    #[serde(skip)]
    pub http_routes: Arc<[Arc<crate::routing::HttpRoute>]>,
    /// Where each address first appears in `endpoints`: a picked endpoint's details
    /// are looked up on every request, and a service may have thousands.
    #[serde(skip)]
    by_endpoint: HashMap<SocketAddr, usize>,
}

impl Route {
    /// The endpoint listed at `addr` (the first, if listed twice).
    pub fn endpoint(&self, addr: SocketAddr) -> Option<&EndpointTarget> {
        self.by_endpoint.get(&addr).map(|&i| &self.endpoints[i])
    }
}

/// `addr` as a header value (it names an endpoint in `x-mesh-target` and
/// `x-mesh-endpoint`), formatted on the stack: one allocation, not two.
pub fn addr_header(addr: SocketAddr) -> http::HeaderValue {
    use std::io::Write as _;
    // The longest socket address: `[` IPv6 with a scope id `]:65535`.
    let mut buf = [0u8; 64];
    let mut w = &mut buf[..];
    let _ = write!(w, "{addr}");
    let len = 64 - w.len();
    http::HeaderValue::from_bytes(&buf[..len]).expect("a socket address is a valid header value")
}

/// `addr` with a v4-mapped IPv6 address (dual-stack sockets) as IPv4.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The routing table of one snapshot version.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub version: u64,
    pub trust_domain: String,
    by_addr: HashMap<SocketAddr, Arc<Route>>,
    by_host: HashMap<(String, u16), Arc<Route>>,
    /// `namespace/name` and port -> the service port: what route backends name.
    by_service: HashMap<(Arc<str>, u16), Arc<Route>>,
    /// Endpoint address (and target port) -> every service port listing it, by
    /// service name: the services selecting a workload port.
    by_endpoint: HashMap<SocketAddr, Vec<(Arc<Route>, usize)>>,
    routes: Vec<Arc<Route>>,
    endpoint_count: usize,
    /// Addresses tunnel connections from other agents come from: endpoints placed on
    /// a node or behind an agent (an agent dials from its workload's address) and
    /// the agents' own.
    peer_ips: std::collections::HashSet<IpAddr>,
    /// Registry hostname (lower case, no root dot) -> its service's VIPs (allocated
    /// ones included): what the agent's DNS answers (`crate::dns`).
    by_name: HashMap<String, Vec<IpAddr>>,
    /// The federated clusters (`Snapshot.federated`), in the snapshot's order.
    pub federated: Vec<FederatedCluster>,
    /// Agents serving an exported service's endpoints: where an east-west gateway
    /// may forward federated clusters' connections (`crate::gateway`).
    exported_agents: std::collections::HashSet<SocketAddr>,
}

/// A federated cluster: whose roots to trust for its trust domain, and through
/// which gateways its agents are reached.
#[derive(Debug, Clone, Serialize)]
pub struct FederatedCluster {
    pub cluster: String,
    pub trust_domain: String,
    #[serde(skip)]
    pub roots_pem: Vec<String>,
    pub gateways: Vec<SocketAddr>,
}

fn protocol_name(p: api::Protocol) -> &'static str {
    match p {
        api::Protocol::Unspecified => "detect",
        api::Protocol::Tcp => "tcp",
        api::Protocol::Http1 => "http1",
        api::Protocol::Http2 => "http2",
        api::Protocol::Grpc => "grpc",
        api::Protocol::Tls => "tls",
    }
}

fn port(service: &str, field: String, v: u32) -> Result<u16, TableError> {
    u16::try_from(v).ok().filter(|p| *p != 0).ok_or_else(|| TableError::Invalid {
        service: service.into(),
        field,
        message: format!("{v} is not a port"),
    })
}

impl RouteTable {
    /// Decodes a snapshot as it arrives on the discovery stream and builds its table:
    /// the one way from the control plane's bytes to what the data path reads, so a
    /// snapshot that does not decode is refused like one that does not validate.
    pub fn decode(version: u64, encoded: impl bytes::Buf, max_endpoints: usize) -> Result<Self, TableError> {
        let snapshot = api::Snapshot::decode(encoded).map_err(|e| TableError::Decode(e.to_string()))?;
        Self::build(version, &snapshot, max_endpoints)
    }

    /// Builds and validates the table for `version`; `max_endpoints` bounds memory.
    pub fn build(version: u64, snapshot: &api::Snapshot, max_endpoints: usize) -> Result<Self, TableError> {
        let count: usize = snapshot.services.iter().map(|s| s.endpoints.len()).sum();
        if count > max_endpoints {
            return Err(TableError::TooManyEndpoints { count, limit: max_endpoints });
        }
        let default_mtls = MtlsMode::from_api(snapshot.default_mtls(), MtlsMode::Permissive);
        let mut table = RouteTable {
            version,
            trust_domain: snapshot.trust_domain.clone(),
            endpoint_count: count,
            ..Default::default()
        };
        for (fi, f) in snapshot.federated.iter().enumerate() {
            let mut gateways = Vec::with_capacity(f.gateways.len());
            for (gi, g) in f.gateways.iter().enumerate() {
                gateways.push(g.parse::<SocketAddr>().map_err(|_| TableError::Invalid {
                    service: format!("federated cluster {}", f.cluster),
                    field: format!("federated[{fi}].gateways[{gi}]"),
                    message: format!("{g:?} is not an address:port"),
                })?);
            }
            table.federated.push(FederatedCluster {
                cluster: f.cluster.clone(),
                trust_domain: f.trust_domain.clone(),
                roots_pem: f.roots_pem.clone(),
                gateways,
            });
        }
        for s in &snapshot.services {
            // A service imported from a federated cluster: its endpoints are that
            // cluster's workloads, never a workload port or a peer of this one.
            let imported = !s.cluster.is_empty();
            let name: Arc<str> = format!("{}/{}", s.namespace, s.name).into();
            let invalid = |field: String, message: String| TableError::Invalid {
                service: name.to_string(),
                field,
                message,
            };
            let mut vips = Vec::with_capacity(s.vips.len() + s.allocated_vips.len());
            // Allocated VIPs (DNS auto-allocation) route exactly like registry ones.
            for (i, v) in s.vips.iter().chain(&s.allocated_vips).enumerate() {
                let ip: IpAddr = v
                    .parse()
                    .map_err(|_| invalid(format!("vips[{i}]"), format!("{v:?} is not an IP address")))?;
                // An IPv4-mapped VIP is its IPv4 address: intercepted destinations are
                // looked up in that form, so kept mapped it would match nothing (and
                // could shadow another service's VIP unnoticed).
                let ip = ip.to_canonical();
                if ip.is_loopback() || ip.is_unspecified() {
                    return Err(invalid(format!("vips[{i}]"), format!("{ip} cannot be a service address")));
                }
                vips.push(ip);
            }
            // A name with no address (a headless service, or a range too full to
            // allocate from) is left to the node's resolver rather than answered
            // with nothing.
            for h in s.hostnames.iter().filter(|_| !vips.is_empty()) {
                let names = table.by_name.entry(h.trim_end_matches('.').to_ascii_lowercase()).or_default();
                names.extend(vips.iter().filter(|ip| !names.contains(ip)).copied().collect::<Vec<_>>());
            }
            let mtls = MtlsMode::from_api(
                s.policy.as_ref().map_or(api::MtlsMode::Unspecified, |p| p.mtls()),
                default_mtls,
            );
            let service_policy = Arc::new(
                ServicePolicy::from_api(s.policy.as_ref())
                    .map_err(|message| invalid("policy".into(), message))?,
            );
            for (pi, p) in s.ports.iter().enumerate() {
                let svc_port = port(&name, format!("ports[{pi}].port"), p.port)?;
                let target_default = if p.target_port == 0 {
                    svc_port
                } else {
                    port(&name, format!("ports[{pi}].target_port"), p.target_port)?
                };
                let mut endpoints = Vec::with_capacity(s.endpoints.len());
                for (ei, e) in s.endpoints.iter().enumerate() {
                    let ip: IpAddr = e.address.parse().map_err(|_| {
                        invalid(
                            format!("endpoints[{ei}].address"),
                            format!("{:?} is not an IP address", e.address),
                        )
                    })?;
                    let target = match e.named_ports.get(&p.name) {
                        Some(n) if !p.name.is_empty() => {
                            port(&name, format!("endpoints[{ei}].named_ports"), *n)?
                        }
                        _ if e.port != 0 => port(&name, format!("endpoints[{ei}].port"), e.port)?,
                        _ => target_default,
                    };
                    let agent_address: Option<SocketAddr> = if e.agent_address.is_empty() {
                        None
                    } else {
                        Some(e.agent_address.parse().map_err(|_| {
                            invalid(
                                format!("endpoints[{ei}].agent_address"),
                                format!("{:?} is not an address:port", e.agent_address),
                            )
                        })?)
                    };
                    // A meshed endpoint is reached only as this identity: one that
                    // does not parse refuses the snapshot rather than leaving the
                    // endpoint to be dialed without mutual TLS.
                    let spiffe_id = if e.identity.is_empty() {
                        if let Some(agent) = agent_address {
                            return Err(invalid(
                                format!("endpoints[{ei}].identity"),
                                format!(
                                    "empty, but the endpoint is behind agent {agent}: a meshed endpoint needs an identity to check"
                                ),
                            ));
                        }
                        None
                    } else {
                        Some(Arc::new(e.identity.parse::<SpiffeId>().map_err(|err| {
                            invalid(format!("endpoints[{ei}].identity"), format!("{:?}: {err}", e.identity))
                        })?))
                    };
                    let addr = SocketAddr::new(ip, target);
                    // Workloads on the cluster's nodes: their agents dial from them.
                    if !imported && (agent_address.is_some() || !e.node.is_empty()) {
                        table.peer_ips.insert(ip.to_canonical());
                    }
                    if let Some(agent) = agent_address.filter(|_| !imported) {
                        table.peer_ips.insert(agent.ip().to_canonical());
                        if s.exported {
                            table.exported_agents.insert(agent);
                        }
                    }
                    let locality = e.locality.clone().unwrap_or_default();
                    endpoints.push(EndpointTarget {
                        addr,
                        healthy: e.health() != api::Health::Unhealthy,
                        health_reason: e.health_reason.clone(),
                        weight: e.weight,
                        identity: e.identity.clone(),
                        spiffe_id,
                        addr_header: addr_header(addr),
                        node: e.node.clone(),
                        agent_address,
                        zone: locality.zone,
                        region: locality.region,
                        labels: e.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    });
                }
                let mut by_endpoint = HashMap::with_capacity(endpoints.len());
                for (i, e) in endpoints.iter().enumerate() {
                    by_endpoint.entry(e.addr).or_insert(i);
                }
                let http_routes = crate::routing::compile(&s.routes, &s.ports, svc_port)
                    .map_err(|error| TableError::Route { service: name.to_string(), error })?;
                let route = Arc::new(Route {
                    service: name.clone(),
                    port: svc_port,
                    protocol: protocol_name(p.protocol()),
                    endpoints,
                    policy: s.policy.clone(),
                    service_policy: service_policy.clone(),
                    mtls,
                    http_routes,
                    by_endpoint,
                });
                table.by_service.insert((name.clone(), svc_port), route.clone());
                for (&addr, &i) in route.by_endpoint.iter().filter(|_| !imported) {
                    table.by_endpoint.entry(addr).or_default().push((route.clone(), i));
                }
                for ip in &vips {
                    let addr = SocketAddr::new(*ip, svc_port);
                    if let Some(other) = table.by_addr.insert(addr, route.clone()) {
                        return Err(TableError::Conflict {
                            service: name.to_string(),
                            vip: addr,
                            other: other.service.to_string(),
                        });
                    }
                }
                for h in &s.hostnames {
                    // As `by_host` reads names: case-insensitive, without the root's dot.
                    let host = h.trim_end_matches('.').to_ascii_lowercase();
                    table.by_host.insert((host, svc_port), route.clone());
                }
                table.routes.push(route);
            }
        }
        for selecting in table.by_endpoint.values_mut() {
            selecting.sort_by(|(a, _), (b, _)| a.service.cmp(&b.service).then(a.port.cmp(&b.port)));
        }
        Ok(table)
    }

    /// Whether `ip` is where a peer agent's tunnel connections come from (an endpoint
    /// on a node or behind an agent, or an agent): the tunnel port keeps handshake
    /// slots for these.
    pub fn is_mesh_peer(&self, ip: IpAddr) -> bool {
        self.peer_ips.contains(&ip.to_canonical())
    }

    /// Whether `agent` serves an endpoint of an exported service of this cluster.
    pub fn exports_agent(&self, agent: SocketAddr) -> bool {
        self.exported_agents.contains(&agent)
    }

    /// How many agents serve exported services.
    pub fn exported_agent_count(&self) -> usize {
        self.exported_agents.len()
    }

    /// The port `port` of service `service` (`namespace/name`).
    pub fn service_port(&self, service: &str, port: u16) -> Option<&Arc<Route>> {
        self.by_service.get(&(Arc::<str>::from(service), port))
    }

    /// The service port an intercepted connection to `dst` was meant for.
    pub fn by_addr(&self, dst: SocketAddr) -> Option<&Arc<Route>> {
        self.by_addr.get(&unmapped(dst))
    }

    /// Every service port listing `endpoint` (an address and target port) among its
    /// endpoints, with that entry, in service name order: the services that select
    /// the workload port.
    pub fn selecting(&self, endpoint: SocketAddr) -> impl Iterator<Item = (&Arc<Route>, &EndpointTarget)> {
        self.by_endpoint
            .get(&unmapped(endpoint))
            .into_iter()
            .flatten()
            .map(|(route, i)| (route, &route.endpoints[*i]))
    }

    /// A meshed endpoint called by its own address (a pod or host IP and target
    /// port, not a VIP): the first service port listing it behind an agent, and its
    /// entry. The connection then goes to exactly that endpoint, through its agent.
    pub fn meshed_endpoint(&self, addr: SocketAddr) -> Option<(&Arc<Route>, &EndpointTarget)> {
        self.selecting(addr).find(|(_, ep)| ep.agent_address.is_some())
    }

    /// The service port a hostname (SNI, Host header) and port name.
    pub fn by_host(&self, host: &str, port: u16) -> Option<&Arc<Route>> {
        let host = host.trim_end_matches('.');
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&(host.to_ascii_lowercase(), port))
        } else {
            self.by_host.get(&(host.to_string(), port))
        }
    }

    /// The addresses the agent's DNS answers for a registry hostname (`name` in
    /// lower case, without the root's dot); `None` for a name no service has.
    pub fn name_addresses(&self, name: &str) -> Option<&[IpAddr]> {
        self.by_name.get(name).map(Vec::as_slice)
    }

    /// Every service port, for the admin dump.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoint_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, health: api::Health) -> api::Endpoint {
        api::Endpoint { address: addr.into(), weight: 1, health: health as i32, ..Default::default() }
    }

    fn snapshot() -> api::Snapshot {
        api::Snapshot {
            default_mtls: 0,
            trust_domain: "cluster.local".into(),
            services: vec![api::Service {
                health_check: None,
                routes: Vec::new(),
                allocated_vips: Vec::new(),
                headless: false,
                exported: false,
                cluster: String::new(),
                name: "echo".into(),
                namespace: "default".into(),
                vips: vec!["10.96.0.10".into(), "fd96::10".into()],
                hostnames: vec!["echo.default.svc.cluster.local".into()],
                ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
                policy: None,
                endpoints: vec![
                    ep("10.77.0.3", api::Health::Healthy),
                    ep("10.77.0.4", api::Health::Unspecified),
                    ep("10.77.0.5", api::Health::Unhealthy),
                ],
            }],
            federated: Vec::new(),
        }
    }

    #[test]
    fn lookups_by_vip_v4_mapped_v6_and_hostname() {
        let t = RouteTable::build(1, &snapshot(), 100).unwrap();
        assert!(t.by_addr("[::ffff:10.96.0.10]:80".parse().unwrap()).is_some());
        assert!(t.by_addr("[fd96::10]:80".parse().unwrap()).is_some());
        assert!(t.by_addr("10.96.0.10:81".parse().unwrap()).is_none());
        assert!(t.by_host("Echo.default.svc.cluster.local.", 80).is_some());
        assert!(t.by_host("other", 80).is_none());
    }

    #[test]
    fn mesh_peers_are_meshed_endpoints_and_their_agents() {
        let mut s = snapshot();
        s.services[0].endpoints[0].agent_address = "10.88.0.3:15008".into();
        s.services[0].endpoints[0].identity = "spiffe://cluster.local/ns/default/sa/echo".into();
        s.services[0].endpoints[1].node = "client".into();
        let t = RouteTable::build(1, &s, 100).unwrap();
        assert!(t.is_mesh_peer("10.77.0.3".parse().unwrap()), "the meshed endpoint");
        assert!(t.is_mesh_peer("::ffff:10.88.0.3".parse().unwrap()), "its agent, in any form");
        assert!(t.is_mesh_peer("10.77.0.4".parse().unwrap()), "a workload placed on a node");
        assert!(!t.is_mesh_peer("10.77.0.5".parse().unwrap()), "an endpoint outside the cluster's nodes");
        assert!(!t.is_mesh_peer("10.99.0.1".parse().unwrap()), "a stranger");
    }

    #[test]
    fn unusable_snapshots_are_refused_with_a_reason() {
        let mut s = snapshot();
        s.services[0].endpoints[1].address = "nope".into();
        assert_eq!(
            RouteTable::build(1, &s, 100).unwrap_err().to_string(),
            "service default/echo: endpoints[1].address: \"nope\" is not an IP address"
        );
        let mut s = snapshot();
        s.services[0].vips[0] = "127.0.0.1".into();
        assert!(
            RouteTable::build(1, &s, 100).unwrap_err().to_string().contains("cannot be a service address")
        );
        let mut s = snapshot();
        s.services.push(api::Service { name: "other".into(), ..s.services[0].clone() });
        assert!(matches!(RouteTable::build(1, &s, 100), Err(TableError::Conflict { .. })));
        assert_eq!(
            RouteTable::build(1, &snapshot(), 2).unwrap_err(),
            TableError::TooManyEndpoints { count: 3, limit: 2 }
        );
        let mut s = snapshot();
        s.services[0].ports[0].port = 70000;
        assert!(RouteTable::build(1, &s, 100).unwrap_err().to_string().contains("ports[0].port: 70000"));
    }

    #[test]
    fn addr_header_holds_the_longest_socket_address() {
        for a in ["10.77.0.5:8080", "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%4294967295]:65535"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(addr_header(addr), addr.to_string().as_str());
        }
    }

    /// A meshed endpoint whose identity does not parse must not be dialed at all
    /// (it used to fall back to plaintext on the HTTP path): the snapshot is refused
    /// naming the field. A valid identity is parsed once, for every request.
    #[test]
    fn endpoint_identities_are_parsed_once_or_the_snapshot_is_refused() {
        let mut s = snapshot();
        s.services[0].endpoints[2].agent_address = "10.77.0.5:15008".into();
        s.services[0].endpoints[2].identity = "api".into();
        let err = RouteTable::build(1, &s, 100).unwrap_err().to_string();
        assert!(err.starts_with("service default/echo: endpoints[2].identity: \"api\""), "{err}");
        s.services[0].endpoints[2].identity = String::new();
        let err = RouteTable::build(1, &s, 100).unwrap_err().to_string();
        assert!(
            err.contains("endpoints[2].identity: empty, but the endpoint is behind agent 10.77.0.5:15008"),
            "{err}"
        );

        s.services[0].endpoints[2].identity = "spiffe://cluster.local/ns/default/sa/api".into();
        let t = RouteTable::build(1, &s, 100).unwrap();
        let route = t.by_addr("10.96.0.10:80".parse().unwrap()).unwrap();
        let meshed = route.endpoint("10.77.0.5:8080".parse().unwrap()).expect("looked up by address");
        assert!(std::ptr::eq(meshed, &route.endpoints[2]));
        assert!(route.endpoint("10.77.0.9:8080".parse().unwrap()).is_none());
        assert_eq!(
            meshed.spiffe_id.as_deref().map(ToString::to_string).as_deref(),
            Some(meshed.identity.as_str())
        );
        assert_eq!(meshed.addr_header, "10.77.0.5:8080");
        assert!(route.endpoints[0].spiffe_id.is_none(), "no identity: not meshed");
    }

    /// Found by the `snapshot_table` fuzz target: a VIP written IPv4-mapped
    /// (`::ffff:10.96.0.10`) was stored in that form, which no lookup ever uses, so its
    /// service was unreachable and the same VIP could be claimed twice unnoticed.
    #[test]
    fn an_ipv4_mapped_vip_is_its_ipv4_address() {
        let mut s = snapshot();
        s.services[0].vips = vec!["::ffff:10.96.0.10".into()];
        let t = RouteTable::build(1, &s, 100).unwrap();
        assert!(t.by_addr("10.96.0.10:80".parse().unwrap()).is_some());
        assert!(t.by_addr("[::ffff:10.96.0.10]:80".parse().unwrap()).is_some());

        s.services.push(api::Service {
            name: "other".into(),
            vips: vec!["10.96.0.10".into()],
            ..s.services[0].clone()
        });
        assert!(matches!(RouteTable::build(1, &s, 100), Err(TableError::Conflict { .. })));
        let mut s = snapshot();
        s.services[0].vips = vec!["::ffff:127.0.0.1".into()];
        let err = RouteTable::build(1, &s, 100).unwrap_err().to_string();
        assert!(err.contains("vips[0]: 127.0.0.1 cannot be a service address"), "{err}");
    }

    /// A hostname is stored as lookups read names (lower case, no trailing dot), so one
    /// sent as `Echo.default.` is found too (the `snapshot_table` target's hostname
    /// check).
    #[test]
    fn hostnames_are_stored_as_they_are_looked_up() {
        let mut s = snapshot();
        s.services[0].hostnames = vec!["Echo.default.".into()];
        let t = RouteTable::build(1, &s, 100).unwrap();
        assert!(t.by_host("echo.default", 80).is_some());
        assert!(t.by_host("Echo.default.", 80).is_some());
    }

    /// A service imported from a federated cluster routes like any other, but its
    /// endpoints are that cluster's: never a workload port or a tunnel peer here, even
    /// when an address is the same as a local endpoint's. Exported services' agents
    /// are what a gateway may forward to.
    #[test]
    fn imported_services_route_but_select_nothing_here() {
        let meshed = |addr: &str, agent: &str| api::Endpoint {
            address: addr.into(),
            weight: 1,
            node: "n1".into(),
            agent_address: agent.into(),
            identity: "spiffe://east.example/ns/shop/sa/web".into(),
            ..Default::default()
        };
        let mut s = snapshot();
        s.services[0].exported = true;
        s.services[0].endpoints = vec![meshed("10.77.0.3", "10.77.0.3:15008")];
        s.services.push(api::Service {
            name: "web.east".into(),
            namespace: "shop".into(),
            cluster: "east".into(),
            allocated_vips: vec!["240.240.0.9".into()],
            ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
            endpoints: vec![meshed("10.77.0.9", "10.77.0.9:15008")],
            ..Default::default()
        });
        s.federated = vec![api::FederatedDomain {
            cluster: "east".into(),
            trust_domain: "east.example".into(),
            roots_pem: vec![],
            gateways: vec!["10.77.0.5:15443".into()],
        }];
        let t = RouteTable::build(1, &s, 100).unwrap();
        let imported = t.by_addr("240.240.0.9:80".parse().unwrap()).expect("the imported VIP routes");
        assert_eq!(imported.endpoints[0].agent_address, Some("10.77.0.9:15008".parse().unwrap()));
        assert_eq!(t.selecting("10.77.0.9:8080".parse().unwrap()).count(), 0);
        assert!(!t.is_mesh_peer("10.77.0.9".parse().unwrap()));
        assert!(t.exports_agent("10.77.0.3:15008".parse().unwrap()));
        assert!(!t.exports_agent("10.77.0.9:15008".parse().unwrap()));
        assert_eq!(t.federated[0].gateways, vec!["10.77.0.5:15443".parse::<SocketAddr>().unwrap()]);

        s.federated[0].gateways = vec!["gateway.east:15443".into()];
        let err = RouteTable::build(2, &s, 100).unwrap_err().to_string();
        assert!(err.contains("federated[0].gateways[0]"), "{err}");
    }
}

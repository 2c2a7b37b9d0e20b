//! Consul's catalog as mesh services: one service per Consul service name, its
//! healthy and unhealthy instances as endpoints.
//!
//! | Consul | mesh |
//! |---|---|
//! | service `web` | `NAMESPACE/web` (`--consul-namespace`, default `consul`), hostnames `web.service.consul` and `web.service.DC.consul`; no VIP (one is allocated from `--dns-vip-range`) |
//! | instance `Service.Address` (else `Node.Address`), `Service.Port` | endpoint address; the port most instances share is the service port, others override it |
//! | checks: all passing / any warning / any critical | healthy / healthy at `Weights.Warning` / unhealthy with the check's name and output |
//! | tag `k=v`, plain tag `t`, `Service.Meta` | endpoint labels `k: v`, `t: ""`, meta as is (route subsets select on them) |
//! | meta `mesh-protocol` (`http`, `http2`, `grpc`, `tcp`, `tls`) | the service port's protocol (else detected) |
//! | meta `mesh-agent-address` + `mesh-service-account` | a meshed endpoint: reached over mutual TLS through that agent, as `spiffe://TD/ns/NAMESPACE/sa/ACCOUNT` |
//! | `Node.Node`, `Node.Datacenter` | endpoint node, locality region |

use std::collections::BTreeMap;

use mesh_api as api;
use serde::Deserialize;

use crate::registry::file::is_dns_label;

/// Meta key naming the service port's protocol.
pub const META_PROTOCOL: &str = "mesh-protocol";
/// Meta key of a meshed instance's agent (`host:port` of its tunnel listener).
pub const META_AGENT_ADDRESS: &str = "mesh-agent-address";
/// Meta key of a meshed instance's service account (its identity's last part).
pub const META_SERVICE_ACCOUNT: &str = "mesh-service-account";
/// Longest check output kept in a health reason.
const MAX_REASON: usize = 200;

/// One entry of `/v1/health/service/NAME`: an instance, its node and its checks.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthEntry {
    pub node: Node,
    pub service: Instance,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    pub node: String,
    pub address: String,
    pub datacenter: String,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Instance {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Option<Vec<String>>,
    pub address: String,
    pub port: u32,
    pub meta: Option<BTreeMap<String, String>>,
    pub weights: Option<Weights>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase", default)]
pub struct Check {
    pub name: String,
    pub status: String,
    pub output: String,
}

/// What mapping needs besides the catalog.
#[derive(Debug, Clone)]
pub struct MappingConfig {
    pub namespace: String,
    pub trust_domain: String,
    pub datacenter: Option<String>,
}

/// `name`'s instances as a mesh service, and one message per instance left out
/// (with why).
pub fn service(name: &str, entries: &[HealthEntry], config: &MappingConfig) -> (api::Service, Vec<String>) {
    let mut skipped = Vec::new();
    let port = service_port(entries);
    let protocol = entries
        .iter()
        .find_map(|e| e.service.meta.as_ref().and_then(|m| m.get(META_PROTOCOL)))
        .map_or(api::Protocol::Unspecified, |p| protocol(p));
    let mut endpoints = Vec::new();
    for e in entries {
        match endpoint(e, port, config) {
            Ok(ep) => endpoints.push(ep),
            Err(why) => skipped.push(format!("service {name}, instance {:?}: {why}", e.service.id)),
        }
    }
    endpoints.sort_by(|a, b| (&a.address, a.port, &a.workload).cmp(&(&b.address, b.port, &b.workload)));
    let mut hostnames = vec![format!("{name}.service.consul")];
    if let Some(dc) = &config.datacenter {
        hostnames.push(format!("{name}.service.{dc}.consul"));
    }
    let service = api::Service {
        name: name.to_owned(),
        namespace: config.namespace.clone(),
        hostnames,
        ports: vec![api::ServicePort {
            name: "consul".into(),
            port,
            target_port: 0,
            protocol: protocol as i32,
        }],
        endpoints,
        ..Default::default()
    };
    (service, skipped)
}

/// The port most instances listen on (the lowest of equals), 0 with no instance.
fn service_port(entries: &[HealthEntry]) -> u32 {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| (1..=65535).contains(&e.service.port)) {
        *counts.entry(e.service.port).or_default() += 1;
    }
    // Ascending ports, so `max_by_key` keeping the last maximum would pick the
    // highest: reverse to keep the lowest.
    counts.into_iter().rev().max_by_key(|(_, n)| *n).map_or(0, |(p, _)| p)
}

fn protocol(name: &str) -> api::Protocol {
    match name.trim().to_ascii_lowercase().as_str() {
        "http" | "http1" => api::Protocol::Http1,
        "http2" => api::Protocol::Http2,
        "grpc" => api::Protocol::Grpc,
        "tcp" => api::Protocol::Tcp,
        "tls" => api::Protocol::Tls,
        _ => api::Protocol::Unspecified,
    }
}

fn endpoint(e: &HealthEntry, service_port: u32, config: &MappingConfig) -> Result<api::Endpoint, String> {
    let raw = if e.service.address.is_empty() { &e.node.address } else { &e.service.address };
    let address: std::net::IpAddr =
        raw.parse().map_err(|_| format!("address {raw:?} is not an IP address (names are not resolved)"))?;
    if !(1..=65535).contains(&e.service.port) {
        return Err(format!("port {} is out of range", e.service.port));
    }
    let meta = e.service.meta.clone().unwrap_or_default();
    let agent_address = meta.get(META_AGENT_ADDRESS).cloned().unwrap_or_default();
    if !agent_address.is_empty() && agent_address.parse::<std::net::SocketAddr>().is_err() {
        return Err(format!("meta {META_AGENT_ADDRESS} {agent_address:?} is not an address:port"));
    }
    let identity = match meta.get(META_SERVICE_ACCOUNT) {
        Some(sa) if !is_dns_label(sa) => {
            return Err(format!("meta {META_SERVICE_ACCOUNT} {sa:?} is not a DNS label"));
        }
        Some(sa) => format!("spiffe://{}/ns/{}/sa/{sa}", config.trust_domain, config.namespace),
        None if !agent_address.is_empty() => {
            return Err(format!(
                "meta {META_AGENT_ADDRESS} without {META_SERVICE_ACCOUNT}: a meshed endpoint needs an identity"
            ));
        }
        None => String::new(),
    };
    let weights = e.service.weights.unwrap_or(Weights { passing: 1, warning: 1 });
    let critical = e.checks.iter().find(|c| c.status == "critical");
    let warning = e.checks.iter().find(|c| c.status == "warning");
    let (health, reason, weight) = match (critical, warning) {
        (Some(c), _) => (api::Health::Unhealthy, check_reason(c), weights.passing),
        (None, Some(c)) => (api::Health::Healthy, check_reason(c), weights.warning),
        (None, None) => (api::Health::Healthy, String::new(), weights.passing),
    };
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for tag in e.service.tags.iter().flatten() {
        match tag.split_once('=') {
            Some((k, v)) => labels.insert(k.to_owned(), v.to_owned()),
            None => labels.insert(tag.clone(), String::new()),
        };
    }
    labels.extend(meta.into_iter().filter(|(k, _)| !k.starts_with("mesh-")));
    Ok(api::Endpoint {
        address: address.to_string(),
        port: if e.service.port == service_port { 0 } else { e.service.port },
        weight,
        health: health as i32,
        health_reason: reason,
        locality: (!e.node.datacenter.is_empty())
            .then(|| api::Locality { region: e.node.datacenter.clone(), zone: String::new() }),
        identity,
        node: e.node.node.clone(),
        agent_address,
        workload: e.service.id.clone(),
        labels: labels.into_iter().collect(),
        ..Default::default()
    })
}

fn check_reason(c: &Check) -> String {
    let output: String = c.output.trim().chars().take(MAX_REASON).collect();
    if output.is_empty() {
        format!("consul check {:?}: {}", c.name, c.status)
    } else {
        format!("consul check {:?}: {}: {output}", c.name, c.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MappingConfig {
        MappingConfig {
            namespace: "consul".into(),
            trust_domain: "cluster.local".into(),
            datacenter: Some("dc1".into()),
        }
    }

    fn entry(id: &str, addr: &str, port: u32, checks: &[(&str, &str)]) -> HealthEntry {
        HealthEntry {
            node: Node { node: format!("node-{id}"), address: "10.0.0.99".into(), datacenter: "dc1".into() },
            service: Instance {
                id: id.into(),
                service: "web".into(),
                address: addr.into(),
                port,
                ..Default::default()
            },
            checks: checks
                .iter()
                .map(|(name, status)| Check {
                    name: (*name).into(),
                    status: (*status).into(),
                    output: "HTTP 500".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn instances_become_endpoints_with_health_weights_and_port_overrides() {
        let mut warn = entry("b", "10.0.0.2", 8080, &[("serf", "passing"), ("http", "warning")]);
        warn.service.weights = Some(Weights { passing: 10, warning: 1 });
        let entries = vec![
            entry("a", "10.0.0.1", 8080, &[("serf", "passing")]),
            warn,
            entry("c", "", 9090, &[("http", "critical")]),
        ];
        let (s, skipped) = service("web", &entries, &config());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!((s.namespace.as_str(), s.name.as_str()), ("consul", "web"));
        assert_eq!(s.hostnames, ["web.service.consul", "web.service.dc1.consul"]);
        assert!(s.vips.is_empty());
        assert_eq!(s.ports[0].port, 8080, "the port most instances share");
        let e: Vec<_> =
            s.endpoints.iter().map(|e| (e.address.as_str(), e.port, e.health(), e.weight)).collect();
        assert_eq!(
            e,
            [
                ("10.0.0.1", 0, api::Health::Healthy, 1),
                ("10.0.0.2", 0, api::Health::Healthy, 1),
                // No service address: the node's; another port: an override.
                ("10.0.0.99", 9090, api::Health::Unhealthy, 1),
            ]
        );
        assert_eq!(s.endpoints[1].health_reason, "consul check \"http\": warning: HTTP 500");
        assert_eq!(s.endpoints[2].health_reason, "consul check \"http\": critical: HTTP 500");
        assert_eq!(s.endpoints[2].node, "node-c");
        assert_eq!(s.endpoints[2].locality.as_ref().unwrap().region, "dc1");
    }

    #[test]
    fn tags_and_meta_become_labels_and_mesh_meta_makes_a_meshed_endpoint() {
        let mut e = entry("a", "10.0.0.1", 8080, &[]);
        e.service.tags = Some(vec!["version=v2".into(), "canary".into()]);
        e.service.meta = Some(BTreeMap::from([
            ("team".to_owned(), "shop".to_owned()),
            (META_PROTOCOL.to_owned(), "grpc".to_owned()),
            (META_AGENT_ADDRESS.to_owned(), "10.0.0.1:15008".to_owned()),
            (META_SERVICE_ACCOUNT.to_owned(), "web".to_owned()),
        ]));
        let (s, skipped) = service("web", &[e], &config());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(s.ports[0].protocol(), api::Protocol::Grpc);
        let ep = &s.endpoints[0];
        let labels: BTreeMap<_, _> = ep.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, BTreeMap::from([("canary", ""), ("team", "shop"), ("version", "v2")]));
        assert_eq!(ep.identity, "spiffe://cluster.local/ns/consul/sa/web");
        assert_eq!(ep.agent_address, "10.0.0.1:15008");
    }

    #[test]
    fn instances_that_cannot_be_endpoints_are_left_out_and_named() {
        let bad_addr = entry("name", "web-1.internal", 8080, &[]);
        let bad_port = entry("port", "10.0.0.2", 70000, &[]);
        let mut no_identity = entry("meshed", "10.0.0.3", 8080, &[]);
        no_identity.service.meta =
            Some(BTreeMap::from([(META_AGENT_ADDRESS.to_owned(), "10.0.0.3:15008".to_owned())]));
        let good = entry("good", "10.0.0.4", 8080, &[]);
        let (s, skipped) = service("web", &[bad_addr, bad_port, no_identity, good], &config());
        assert_eq!(s.endpoints.len(), 1);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped[0].contains("\"name\"") && skipped[0].contains("not an IP address"),
            "{}",
            skipped[0]
        );
        assert!(skipped[1].contains("out of range"), "{}", skipped[1]);
        assert!(skipped[2].contains("needs an identity"), "{}", skipped[2]);
    }
}

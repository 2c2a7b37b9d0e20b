//! A peer's answer made into this cluster's services and the peer's
//! `FederatedDomain`.
//!
//! Service `web` of namespace `shop` in cluster `west` becomes `shop/web.west`,
//! named `web.shop.svc.west.global` (the snapshot builder gives it a VIP from the
//! DNS range, as any service with hostnames and no VIP), with the peer's ports and
//! those endpoints that are meshed workloads of the peer's trust domain: a peer
//! vouches for its own identities only, and its agents are reached through its
//! gateways, so an endpoint without an agent address could not be reached at all.
//! Dropped endpoints and services are reported; the rest is kept. Policy is this
//! cluster's business: imported services get none (the defaults apply).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use mesh_api as api;

use super::{MAX_ENDPOINTS, MAX_SERVICES, config::PeerConfig, roots};
use crate::registry::file::is_dns_label;

/// A usable answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Imported {
    /// Sorted by namespace then name.
    pub services: Vec<api::Service>,
    /// The peer as agents need it: its roots and gateways.
    pub domain: api::FederatedDomain,
    /// What was left out, and why (the first few).
    pub problems: Vec<String>,
}

/// Problems kept in a report: enough to see the pattern.
const MAX_PROBLEMS: usize = 8;

/// Why an answer was not used at all (the last good import stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("the peer answered for trust domain {got:?}, configured as {want:?}")]
    TrustDomain { got: String, want: String },
    #[error("the peer's roots: {0}")]
    Roots(String),
    #[error("the peer's gateways: {0}")]
    Gateways(String),
}

/// Converts `response` from `peer`.
pub fn convert(peer: &PeerConfig, response: api::ExportsResponse) -> Result<Imported, ImportError> {
    if response.trust_domain != peer.trust_domain {
        return Err(ImportError::TrustDomain { got: response.trust_domain, want: peer.trust_domain.clone() });
    }
    let roots = roots::all_certificates(&response.roots_pem).map_err(ImportError::Roots)?;
    if response.gateways.len() > super::config::MAX_GATEWAYS {
        return Err(ImportError::Gateways(format!(
            "{} gateways, more than {}",
            response.gateways.len(),
            super::config::MAX_GATEWAYS
        )));
    }
    for g in &response.gateways {
        super::config::check_gateway(g).map_err(ImportError::Gateways)?;
    }
    let mut problems = Problems::default();
    if response.cluster != peer.name {
        problems.push(format!("the peer calls itself {:?}, configured as {:?}", response.cluster, peer.name));
    }
    if response.services.len() > MAX_SERVICES {
        problems.push(format!(
            "{} services, more than {MAX_SERVICES}: the rest left out",
            response.services.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut endpoints_left = MAX_ENDPOINTS;
    let mut services = Vec::new();
    for s in response.services.into_iter().take(MAX_SERVICES) {
        let Some(service) = service(peer, s, &mut endpoints_left, &mut problems) else { continue };
        if !seen.insert((service.namespace.clone(), service.name.clone())) {
            problems.push(format!(
                "service {}/{} sent twice: the second left out",
                service.namespace, service.name
            ));
            continue;
        }
        services.push(service);
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(Imported {
        services,
        domain: api::FederatedDomain {
            cluster: peer.name.clone(),
            trust_domain: peer.trust_domain.clone(),
            roots_pem: roots,
            gateways: response.gateways,
        },
        problems: problems.0,
    })
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, p: String) {
        if self.0.len() < MAX_PROBLEMS {
            self.0.push(p);
        }
    }
}

/// One exported service as this cluster's, or `None` (reported) when unusable.
fn service(
    peer: &PeerConfig,
    s: api::Service,
    endpoints_left: &mut usize,
    problems: &mut Problems,
) -> Option<api::Service> {
    let shown = |v: &str| v.chars().take(64).collect::<String>();
    if !is_dns_label(&s.name) || !is_dns_label(&s.namespace) {
        problems.push(format!(
            "service {:?}/{:?}: not DNS labels: left out",
            shown(&s.namespace),
            shown(&s.name)
        ));
        return None;
    }
    let object = format!("service {}/{}", s.namespace, s.name);
    if s.ports.is_empty() || s.ports.len() > 64 {
        problems.push(format!("{object}: {} ports (1 to 64 expected): left out", s.ports.len()));
        return None;
    }
    if let Some(p) = s.ports.iter().find(|p| !(1..=65535).contains(&p.port) || p.target_port > 65535) {
        problems.push(format!(
            "{object}: port {} or target port {} out of range: left out",
            p.port, p.target_port
        ));
        return None;
    }
    let ports = s
        .ports
        .into_iter()
        .map(|p| api::ServicePort {
            name: shown(&p.name),
            port: p.port,
            target_port: p.target_port,
            protocol: p.protocol,
        })
        .collect();
    let mut endpoints = Vec::new();
    let mut dropped = 0usize;
    for e in s.endpoints {
        if *endpoints_left == 0 {
            problems.push(format!("{object}: more than {MAX_ENDPOINTS} endpoints in all: the rest left out"));
            break;
        }
        match endpoint(peer, e) {
            Ok(e) => {
                endpoints.push(e);
                *endpoints_left -= 1;
            }
            Err(why) => {
                if dropped == 0 {
                    problems.push(format!("{object}: endpoint left out: {why}"));
                }
                dropped += 1;
            }
        }
    }
    if dropped > 1 {
        problems.push(format!("{object}: {dropped} endpoints left out in all"));
    }
    Some(api::Service {
        name: format!("{}.{}", s.name, peer.name),
        hostnames: vec![format!("{}.{}.svc.{}.global", s.name, s.namespace, peer.name)],
        namespace: s.namespace,
        ports,
        endpoints,
        cluster: peer.name.clone(),
        ..Default::default()
    })
}

/// One endpoint, kept only as a meshed workload of the peer's trust domain.
fn endpoint(peer: &PeerConfig, e: api::Endpoint) -> Result<api::Endpoint, String> {
    let id: api::spiffe::SpiffeId = e.identity.parse().map_err(|err| format!("identity: {err}"))?;
    if id.trust_domain() != peer.trust_domain {
        return Err(format!("identity {id} is not of the peer's trust domain {}", peer.trust_domain));
    }
    let agent: SocketAddr = e.agent_address.parse().map_err(|_| {
        format!("agent address {:?} is not IP:port", e.agent_address.chars().take(64).collect::<String>())
    })?;
    let address: IpAddr = e.address.parse().map_err(|_| {
        format!("address {:?} is not an IP address", e.address.chars().take(64).collect::<String>())
    })?;
    if e.port > 65535 {
        return Err(format!("port {} out of range", e.port));
    }
    let health =
        if e.health == api::Health::Unhealthy as i32 { api::Health::Unhealthy } else { api::Health::Healthy };
    Ok(api::Endpoint {
        address: address.to_string(),
        port: e.port,
        named_ports: e
            .named_ports
            .into_iter()
            .filter(|(k, v)| k.len() <= 64 && *v <= 65535)
            .take(64)
            .collect(),
        weight: e.weight,
        health: health as i32,
        health_reason: e.health_reason.chars().take(256).collect(),
        locality: e.locality.map(|l| api::Locality {
            region: l.region.chars().take(64).collect(),
            zone: l.zone.chars().take(64).collect(),
        }),
        identity: id.to_string(),
        agent_address: agent.to_string(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn peer() -> PeerConfig {
        PeerConfig {
            name: "west".into(),
            trust_domain: "west.local".into(),
            url: "https://10.77.0.1:15010".into(),
            host: "10.77.0.1".into(),
            port: 15010,
            bundle_file: "/b".into(),
            token_file: "/t".into(),
        }
    }

    fn root() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["root".into()]).unwrap().self_signed(&key).unwrap().pem()
    }

    fn meshed(address: &str, identity: &str) -> api::Endpoint {
        api::Endpoint {
            address: address.into(),
            identity: identity.into(),
            agent_address: "192.168.1.1:15008".into(),
            node: "west-node-1".into(),
            weight: 1,
            health: api::Health::Healthy as i32,
            ..Default::default()
        }
    }

    fn response() -> api::ExportsResponse {
        let port = api::ServicePort {
            name: "http".into(),
            port: 8080,
            target_port: 0,
            protocol: api::Protocol::Http1 as i32,
        };
        api::ExportsResponse {
            cluster: "west".into(),
            trust_domain: "west.local".into(),
            roots_pem: vec![root()],
            gateways: vec!["10.77.0.9:15443".into()],
            services: vec![api::Service {
                name: "web".into(),
                namespace: "shop".into(),
                ports: vec![port],
                policy: Some(api::Policy { mtls: api::MtlsMode::Strict as i32, ..Default::default() }),
                vips: vec!["10.96.0.1".into()],
                hostnames: vec!["web.shop.svc.cluster.local".into()],
                exported: true,
                endpoints: vec![
                    meshed("10.1.0.5", "spiffe://west.local/ns/shop/sa/web"),
                    meshed("10.1.0.6", "spiffe://east.local/ns/shop/sa/web"),
                    api::Endpoint {
                        agent_address: String::new(),
                        ..meshed("10.1.0.7", "spiffe://west.local/ns/shop/sa/web")
                    },
                ],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn an_exported_service_becomes_a_local_one_named_after_the_peer() {
        let imported = convert(&peer(), response()).unwrap();
        let s = &imported.services[0];
        assert_eq!((s.namespace.as_str(), s.name.as_str()), ("shop", "web.west"));
        assert_eq!(s.hostnames, ["web.shop.svc.west.global"]);
        assert!(s.vips.is_empty() && s.allocated_vips.is_empty(), "the DNS range allocates one");
        assert_eq!(s.policy, None, "the peer's policy is not ours");
        assert!(!s.exported, "never exported on");
        assert_eq!(s.cluster, "west");
        assert_eq!(s.ports[0].port, 8080);
        let addrs: Vec<&str> = s.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(addrs, ["10.1.0.5"], "the foreign identity and the unmeshed endpoint are dropped");
        assert_eq!(s.endpoints[0].node, "", "nodes are the peer's business");
        assert!(
            imported
                .problems
                .iter()
                .any(|p| p.contains("spiffe://east.local/ns/shop/sa/web is not of the peer's trust domain")),
            "{:?}",
            imported.problems
        );
        assert!(
            imported.problems.iter().any(|p| p.contains("2 endpoints left out")),
            "{:?}",
            imported.problems
        );
        assert_eq!(imported.domain.cluster, "west");
        assert_eq!(imported.domain.trust_domain, "west.local");
        assert_eq!(imported.domain.roots_pem.len(), 1);
        assert_eq!(imported.domain.gateways, ["10.77.0.9:15443"]);
    }

    #[test]
    fn a_wrong_trust_domain_or_bad_roots_refuse_the_whole_answer() {
        let wrong = api::ExportsResponse { trust_domain: "east.local".into(), ..response() };
        assert!(matches!(convert(&peer(), wrong), Err(ImportError::TrustDomain { .. })));
        let no_roots = api::ExportsResponse { roots_pem: vec![], ..response() };
        assert!(matches!(convert(&peer(), no_roots), Err(ImportError::Roots(_))));
        let bad_gateway = api::ExportsResponse { gateways: vec!["gw:1".into()], ..response() };
        assert!(matches!(convert(&peer(), bad_gateway), Err(ImportError::Gateways(_))));
    }

    #[test]
    fn unusable_names_and_duplicates_are_left_out_and_reported() {
        let mut r = response();
        let good = r.services[0].clone();
        r.services.push(good.clone());
        r.services.push(api::Service { name: "Bad.Name".into(), ..good });
        let imported = convert(&peer(), r).unwrap();
        assert_eq!(imported.services.len(), 1);
        assert!(imported.problems.iter().any(|p| p.contains("sent twice")));
        assert!(imported.problems.iter().any(|p| p.contains("not DNS labels")));
    }
}

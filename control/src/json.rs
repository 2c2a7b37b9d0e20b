//! JSON views of API messages for admin endpoints and tools (the protobuf types
//! do not derive serde; these views also name enums instead of numbering them).

use mesh_api as api;
use serde_json::{Value, json};

/// An agent's status.
pub fn agent(a: &api::AgentStatus) -> Value {
    json!({
        "node": a.node,
        "agent_address": a.agent_address,
        "mode": a.mode,
        "connected": a.connected,
        "sent_version": a.sent_version,
        "acked_version": a.acked_version,
        "nacked_version": a.nacked_version,
        "nack_reason": a.nack_reason,
        "connected_at": a.connected_at,
        "last_seen": a.last_seen,
        "workloads": a.workloads.iter().map(|w| json!({"namespace": w.namespace, "name": w.name, "service_account": w.service_account})).collect::<Vec<_>>(),
    })
}

/// A workload placed on a node.
pub fn workload(w: &api::Workload) -> Value {
    let labels: std::collections::BTreeMap<_, _> = w.labels.iter().collect();
    json!({
        "namespace": w.namespace,
        "name": w.name,
        "service_account": w.service_account,
        "addresses": w.addresses,
        "node": w.node,
        "labels": labels,
    })
}

/// A snapshot: services with ports, policy summary and endpoints.
pub fn snapshot(s: &api::Snapshot) -> Value {
    json!({
        "trust_domain": s.trust_domain,
        "services": s.services.iter().map(service).collect::<Vec<_>>(),
    })
}

fn service(s: &api::Service) -> Value {
    let algorithm = s
        .policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .map_or(api::Algorithm::RoundRobin, |lb| lb.algorithm());
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "vips": s.vips,
        "hostnames": s.hostnames,
        "ports": s.ports.iter().map(|p| json!({"name": p.name, "port": p.port, "target_port": p.target_port, "protocol": p.protocol().as_str_name()})).collect::<Vec<_>>(),
        "load_balancer": algorithm.as_str_name(),
        // Allow rules (empty: allow all), for `meshctl explain`.
        "authorization": s.policy.as_ref().map(|p| p.authorization.iter().map(|r| json!({
            "principals": r.principals,
            "methods": r.methods,
            "path_prefixes": r.path_prefixes,
        })).collect::<Vec<_>>()).unwrap_or_default(),
        "endpoints": s.endpoints.iter().map(|e| json!({
            "address": e.address,
            "port": e.port,
            "weight": e.weight,
            "health": e.health().as_str_name(),
            "health_reason": e.health_reason,
            "zone": e.locality.as_ref().map(|l| l.zone.clone()),
            "identity": e.identity,
            "node": e.node,
            "agent_address": e.agent_address,
        })).collect::<Vec<_>>(),
    })
}

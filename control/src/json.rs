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
        "version": a.agent_version,
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
        // Federated clusters as agents receive them (roots counted, not shown).
        "federated": s.federated.iter().map(|d| json!({
            "cluster": d.cluster,
            "trust_domain": d.trust_domain,
            "roots": d.roots_pem.len(),
            "gateways": d.gateways,
        })).collect::<Vec<_>>(),
    })
}

pub fn service(s: &api::Service) -> Value {
    let algorithm = s
        .policy
        .as_ref()
        .and_then(|p| p.load_balancer.as_ref())
        .map_or(api::Algorithm::RoundRobin, |lb| lb.algorithm());
    json!({
        "name": s.name,
        "namespace": s.namespace,
        "vips": s.vips,
        "allocated_vips": s.allocated_vips,
        "headless": s.headless,
        "exported": s.exported,
        // The federated cluster it was imported from; empty: this cluster's own.
        "cluster": s.cluster,
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
            "labels": e.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
        // HTTP routes, for `meshctl routes`.
        "routes": s.routes.iter().map(route).collect::<Vec<_>>(),
    })
}

fn route(r: &api::HttpRoute) -> Value {
    let backend = |b: &api::RouteBackend| {
        json!({
            "service": b.service,
            "port": b.port,
            "subset": b.subset.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "weight": b.weight,
        })
    };
    json!({
        "name": r.name,
        "ports": r.ports,
        "matches": r.matches.iter().map(route_match).collect::<Vec<_>>(),
        "backends": r.backends.iter().map(backend).collect::<Vec<_>>(),
        "timeout_ms": r.timeout_ms,
        "retry_attempts": r.retries.as_ref().map(|x| x.attempts),
        "fault": r.fault.as_ref().map(|f| json!({
            "delay_ms": f.delay_ms,
            "delay_percent": f.delay_percent,
            "abort_http_status": f.abort_http_status,
            "abort_grpc_status": f.abort_grpc_status,
            "abort_percent": f.abort_percent,
        })),
        "mirror": r.mirror.as_ref().map(|m| json!({
            "backend": m.backend.as_ref().map(backend),
            "percent": m.percent,
        })),
    })
}

/// A match as one readable condition list (`path prefix /api`, `header x-canary = 1`).
fn route_match(m: &api::RouteMatch) -> Value {
    fn value(v: Option<&api::StringMatch>) -> String {
        use api::string_match::Kind;
        match v.and_then(|v| v.kind.as_ref()) {
            None => "present".into(),
            Some(Kind::Exact(s)) => format!("= {s}"),
            Some(Kind::Prefix(s)) => format!("prefix {s}"),
            Some(Kind::Regex(s)) => format!("~ {s}"),
        }
    }
    let mut conditions = Vec::new();
    if let Some(p) = &m.path {
        conditions.push(format!("path {}", value(Some(p))));
    }
    if !m.method.is_empty() {
        conditions.push(format!("method {}", m.method));
    }
    for h in &m.headers {
        conditions.push(format!("header {} {}", h.name, value(h.value.as_ref())));
    }
    for q in &m.query_params {
        conditions.push(format!("query {} {}", q.name, value(q.value.as_ref())));
    }
    json!(conditions)
}

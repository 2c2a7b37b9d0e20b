//! The dashboard's JSON: the service graph (`graph.json`) and one service's page
//! (`service.json`), computed from the [`Board`] and the current snapshot.
//!
//! An edge is drawn from the caller's side: the calling workload's agent reports
//! `workload -> service` with rates, errors, latency and whether it went over
//! mutual TLS. Denials happen at the destination, whose agent knows the caller only
//! by its principal; each agent lists its workloads' identities, so a denial of
//! principal P is added to the edge of a workload running as P. Callers no agent
//! vouches for (plaintext, or unknown identities) get an edge of their own from
//! their principal.

use std::collections::{BTreeMap, BTreeSet};

use mesh_api::{self as api, edges as shape};
use serde_json::{Value, json};

use super::board::{Board, HISTORY_MS, Sum};

/// The graph shows rates over this much of the recent past.
pub const GRAPH_SPAN_MS: u64 = 10_000;

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

fn edge_json(source: &str, target: &str, s: &Sum) -> Value {
    json!({
        "id": format!("{source}->{target}"),
        "source": source,
        "target": target,
        "protocol": if s.http { "http" } else { "tcp" },
        "mtls": s.mtls,
        "requests": s.requests,
        "errors": s.errors,
        "denials": s.denials,
        "denials_per_s": round(s.denials_per_s, 2),
        "bytes": s.bytes,
        "rps": round(s.rps, 2),
        "error_percent": round(s.error_percent(), 1),
        "p50_ms": shape::quantile_ms(&s.latency, 0.5).map(|v| round(v, 2)),
        "p99_ms": shape::quantile_ms(&s.latency, 0.99).map(|v| round(v, 2)),
    })
}

/// `graph.json`: nodes (workloads left, services right) and edges with their rates
/// over [`GRAPH_SPAN_MS`].
pub fn graph(board: &Board, snapshot: &api::Snapshot, now_ms: u64) -> Value {
    let sums = board.edges(now_ms, GRAPH_SPAN_MS);
    let workloads = board.workloads(now_ms);
    let by_identity = |principal: &str| -> Vec<String> {
        let mut ws: Vec<String> = workloads
            .iter()
            .filter(|(_, w)| !w.identity.is_empty() && w.identity == principal)
            .map(|(_, w)| w.workload.clone())
            .collect();
        ws.sort();
        ws.dedup();
        ws
    };

    let mut edges: BTreeMap<(String, String), Sum> = BTreeMap::new();
    for ((inbound, source, service), s) in &sums {
        if !inbound {
            edges.entry((source.clone(), service.clone())).or_default().merge(s);
        }
    }
    let mut principals = BTreeSet::new();
    for ((inbound, principal, service), s) in &sums {
        if !inbound {
            continue;
        }
        let callers = by_identity(principal);
        let seen = callers.iter().find(|w| edges.contains_key(&((*w).clone(), service.clone())));
        match seen {
            Some(w) => {
                if let Some(e) = edges.get_mut(&(w.clone(), service.clone())) {
                    e.denials = e.denials.saturating_add(s.denials);
                    e.denials_per_s += s.denials_per_s;
                }
            }
            None => {
                let caller = match callers.as_slice() {
                    [one] => one.clone(),
                    _ => {
                        principals.insert(principal.clone());
                        principal.clone()
                    }
                };
                edges.entry((caller, service.clone())).or_default().merge(s);
            }
        }
    }

    let breakers = board.breakers(now_ms);
    let ejections = board.ejections(now_ms, GRAPH_SPAN_MS);
    let now_s = now_ms / 1000;
    let mut workload_nodes: BTreeMap<String, Value> = BTreeMap::new();
    for (node, w) in &workloads {
        workload_nodes.insert(
            w.workload.clone(),
            json!({
                "id": w.workload, "kind": "workload", "node": node, "identity": w.identity,
                "cert_not_after": (w.not_after > 0).then_some(w.not_after),
                "cert_expires_in_s": (w.not_after > 0).then(|| w.not_after as i64 - now_s as i64),
            }),
        );
    }
    let mut service_ids: BTreeSet<String> =
        snapshot.services.iter().map(|s| format!("{}/{}", s.namespace, s.name)).collect();
    for (source, target) in edges.keys() {
        service_ids.insert(target.clone());
        if !workload_nodes.contains_key(source) {
            let kind = if principals.contains(source) { "caller" } else { "workload" };
            workload_nodes.insert(source.clone(), json!({"id": source, "kind": kind}));
        }
    }
    let services: Vec<Value> = service_ids
        .iter()
        .map(|id| {
            let open: Vec<Value> = breakers
                .get(id)
                .map(|bs| {
                    bs.iter()
                        .map(|(endpoint, state, node)| json!({"endpoint": endpoint, "state": state, "node": node}))
                        .collect()
                })
                .unwrap_or_default();
            let ejected: u64 = ejections.get(id).map_or(0, |m| m.values().sum());
            json!({"id": id, "kind": "service", "breakers": open, "ejections": ejected})
        })
        .collect();
    let mut nodes: Vec<Value> = workload_nodes.into_values().collect();
    nodes.extend(services);
    json!({
        "generated_ms": now_ms,
        "span_ms": GRAPH_SPAN_MS,
        "nodes": nodes,
        "edges": edges.iter().map(|((s, t), sum)| edge_json(s, t, sum)).collect::<Vec<_>>(),
        "agents": board.nodes(now_ms),
        "dropped_edges": board.dropped_edges(),
    })
}

/// `service.json?name=ns/name`: the RED series per second over the history, the
/// service's endpoints (health from the snapshot, breakers and ejections from the
/// agents) and its routes. `None` for a service neither the snapshot nor any
/// report knows.
pub fn service(board: &Board, snapshot: &api::Snapshot, name: &str, now_ms: u64) -> Option<Value> {
    let found = snapshot.services.iter().find(|s| format!("{}/{}", s.namespace, s.name) == name);
    let series = board.service_series(name, now_ms);
    if found.is_none() && series.is_empty() {
        return None;
    }
    let points: Vec<Value> = series
        .iter()
        .map(|(t, s)| {
            json!({
                "t": t,
                "rps": round(s.rps, 2),
                "error_percent": round(s.error_percent(), 1),
                "p50_ms": shape::quantile_ms(&s.latency, 0.5).map(|v| round(v, 2)),
                "p99_ms": shape::quantile_ms(&s.latency, 0.99).map(|v| round(v, 2)),
                "denials": s.denials,
            })
        })
        .collect();
    let breakers = board.breakers(now_ms).remove(name).unwrap_or_default();
    let ejections = board.ejections(now_ms, HISTORY_MS).remove(name).unwrap_or_default();
    let endpoints: Vec<Value> = found
        .map(|s| {
            s.endpoints
                .iter()
                .map(|e| {
                    let port = if e.port != 0 {
                        e.port
                    } else {
                        s.ports.first().map_or(0, |p| p.target_port.max(p.port))
                    };
                    let addr = endpoint_addr(&e.address, port);
                    let breaker: Vec<Value> = breakers
                        .iter()
                        .filter(|(ep, _, _)| *ep == addr)
                        .map(|(_, state, node)| json!({"state": state, "node": node}))
                        .collect();
                    json!({
                        "address": addr,
                        "workload": e.workload,
                        "node": e.node,
                        "identity": e.identity,
                        "meshed": !e.agent_address.is_empty(),
                        "health": e.health().as_str_name(),
                        "health_reason": e.health_reason,
                        "breakers": breaker,
                        "ejections": ejections.get(&addr).copied().unwrap_or(0),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let routes = found.map(|s| crate::json::service(s)["routes"].clone()).unwrap_or_else(|| json!([]));
    Some(json!({
        "name": name,
        "known": found.is_some(),
        "history_ms": HISTORY_MS,
        "series": points,
        "endpoints": endpoints,
        "routes": routes,
    }))
}

/// `ip:port` as agents name endpoints (`[v6]:port` for IPv6).
fn endpoint_addr(address: &str, port: u32) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

//! The YAML registry parser (`control::registry::file::parse`).
//!
//! Input: the registry file's text.
//!
//! Asserts, beyond "no panic": a refusal names the file; what the control plane
//! accepts, every agent accepts (the services, as a snapshot, build an agent's route
//! table, and each VIP:port finds its service there), since a file that agents refuse
//! would freeze every agent's routes; and the accepted services, printed back as a
//! registry file, parse to the same services and workloads.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mesh_agent::discovery::table::RouteTable;
use mesh_api as api;
use serde_json::{Map, Value, json};

const FILE: &str = "fuzz.yaml";
const TRUST_DOMAIN: &str = "cluster.local";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let registry = match control::registry::file::parse(FILE, text, TRUST_DOMAIN) {
        Ok(registry) => registry,
        Err(e) => {
            assert!(e.to_string().starts_with(&format!("{FILE}: ")), "{e}");
            return;
        }
    };

    let services = &registry.services;
    let snapshot =
        api::Snapshot { services: services.clone(), trust_domain: TRUST_DOMAIN.into(), ..Default::default() };
    let table = RouteTable::build(1, &snapshot, usize::MAX)
        .unwrap_or_else(|e| panic!("the control plane accepted a registry agents refuse: {e}"));
    for s in services {
        for vip in &s.vips {
            let ip: IpAddr = vip.parse().expect("a VIP the agent accepted");
            for p in &s.ports {
                let port = u16::try_from(p.port).expect("a port the agent accepted");
                let route = table.by_addr(SocketAddr::new(ip, port)).unwrap_or_else(|| {
                    panic!("{}/{}: {vip} port {port} leads nowhere in the agent's table", s.namespace, s.name)
                });
                assert_eq!(&*route.service, format!("{}/{}", s.namespace, s.name));
            }
        }
    }

    let printed = serde_yaml_ng::to_string(&render(services, &registry.workloads)).expect("printing YAML");
    let reparsed = control::registry::file::parse(FILE, &printed, TRUST_DOMAIN)
        .unwrap_or_else(|e| panic!("the printed registry is refused: {e}\n{printed}"));
    assert_eq!(reparsed.services, registry.services, "printed and parsed again, the services differ:\n{printed}");
    assert_eq!(reparsed.workloads, registry.workloads, "printed and parsed again, the workloads differ:\n{printed}");
});

/// The registry file that says what `services` and `workloads` say.
fn render(services: &[api::Service], workloads: &[api::Workload]) -> Value {
    let workloads: Vec<Value> = workloads
        .iter()
        .map(|w| {
            json!({"name": w.name, "namespace": w.namespace, "service_account": w.service_account,
                "node": w.node, "addresses": w.addresses, "labels": w.labels})
        })
        .collect();
    json!({ "services": services.iter().map(service).collect::<Vec<_>>(), "workloads": workloads })
}

fn service(s: &api::Service) -> Value {
    let mut out = Map::new();
    out.insert("name".into(), json!(s.name));
    out.insert("namespace".into(), json!(s.namespace));
    out.insert("vips".into(), json!(s.vips));
    out.insert("hostnames".into(), json!(s.hostnames));
    let protocol = |p: &api::ServicePort| match p.protocol() {
        api::Protocol::Unspecified => "detect",
        api::Protocol::Tcp => "tcp",
        api::Protocol::Http1 => "http",
        api::Protocol::Http2 => "http2",
        api::Protocol::Grpc => "grpc",
        api::Protocol::Tls => "tls",
    };
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"port": p.port, "target_port": p.target_port, "name": p.name, "protocol": protocol(p)}))
        .collect();
    out.insert("ports".into(), ports.into());
    out.insert("endpoints".into(), s.endpoints.iter().map(|e| endpoint(s, e)).collect::<Vec<_>>().into());
    if let Some(p) = &s.policy {
        out.insert("policy".into(), policy(p));
    }
    if let Some(h) = &s.health_check {
        let mut check = Map::new();
        duration(&mut check, "interval", h.interval_ms);
        duration(&mut check, "timeout", h.timeout_ms);
        check.insert("unhealthy_threshold".into(), json!(h.unhealthy_threshold));
        check.insert("healthy_threshold".into(), json!(h.healthy_threshold));
        out.insert("health_check".into(), check.into());
    }
    out.into()
}

fn endpoint(s: &api::Service, e: &api::Endpoint) -> Value {
    let mut out = Map::new();
    out.insert("address".into(), json!(e.address));
    out.insert("port".into(), json!(e.port));
    out.insert("weight".into(), json!(e.weight));
    let health = if e.health() == api::Health::Unhealthy { "unhealthy" } else { "healthy" };
    out.insert("health".into(), json!(health));
    out.insert("health_reason".into(), json!(e.health_reason));
    if let Some(l) = &e.locality {
        out.insert("zone".into(), json!(l.zone));
        out.insert("region".into(), json!(l.region));
    }
    if !e.identity.is_empty() {
        let prefix = format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/", s.namespace);
        let sa = e.identity.strip_prefix(&prefix).expect("identities are made from namespace and account");
        out.insert("service_account".into(), json!(sa));
    }
    out.insert("node".into(), json!(e.node));
    out.insert("agent_address".into(), json!(e.agent_address));
    out.insert("workload".into(), json!(e.workload));
    out.into()
}

/// Writes `ms` as a duration field, or leaves the field out for 0 (its default).
fn duration(out: &mut Map<String, Value>, field: &str, ms: u32) {
    if ms != 0 {
        out.insert(field.into(), json!(format!("{ms}ms")));
    }
}

fn policy(p: &api::Policy) -> Value {
    let mut out = Map::new();
    if let Some(lb) = &p.load_balancer {
        let algorithm = match lb.algorithm() {
            api::Algorithm::RoundRobin => "round-robin",
            api::Algorithm::LeastRequest => "least-request",
            api::Algorithm::WeightedRoundRobin => "weighted-round-robin",
            api::Algorithm::RingHash => "ring-hash",
            api::Algorithm::Maglev => "maglev",
            api::Algorithm::Random => "random",
        };
        let mut m = Map::new();
        m.insert("algorithm".into(), json!(algorithm));
        match lb.hash_key.as_ref().and_then(|k| k.source.as_ref()) {
            Some(api::hash_key::Source::Header(h)) => m.insert("hash_header".into(), json!(h)),
            Some(api::hash_key::Source::Cookie(c)) => m.insert("hash_cookie".into(), json!(c)),
            Some(api::hash_key::Source::SourceAddress(b)) => m.insert("hash_source_address".into(), json!(b)),
            None => None,
        };
        m.insert("virtual_nodes".into(), json!(lb.virtual_nodes));
        duration(&mut m, "slow_start", lb.slow_start_ms);
        m.insert("locality_aware".into(), json!(lb.locality_aware));
        out.insert("load_balancer".into(), m.into());
    }
    if let Some(r) = &p.retries {
        let mut m = Map::new();
        m.insert("attempts".into(), json!(r.attempts));
        duration(&mut m, "per_try_timeout", r.per_try_timeout_ms);
        m.insert("retry_on".into(), json!(r.retry_on));
        duration(&mut m, "backoff_base", r.backoff_base_ms);
        duration(&mut m, "backoff_max", r.backoff_max_ms);
        m.insert("budget_ratio".into(), json!(r.budget_ratio));
        out.insert("retries".into(), m.into());
    }
    if let Some(t) = &p.timeouts {
        let mut m = Map::new();
        duration(&mut m, "connect", t.connect_ms);
        duration(&mut m, "request", t.request_ms);
        duration(&mut m, "idle", t.idle_ms);
        out.insert("timeouts".into(), m.into());
    }
    if let Some(b) = &p.circuit_breaker {
        let mut m = Map::new();
        m.insert("enabled".into(), json!(b.enabled));
        m.insert("failure_rate".into(), json!(b.failure_rate));
        m.insert("window".into(), json!(b.window));
        duration(&mut m, "reset_timeout", b.reset_timeout_ms);
        m.insert("half_open_probes".into(), json!(b.half_open_probes));
        m.insert("close_after_successes".into(), json!(b.close_after_successes));
        out.insert("circuit_breaker".into(), m.into());
    }
    if let Some(o) = &p.outlier_detection {
        let mut m = Map::new();
        m.insert("enabled".into(), json!(o.enabled));
        m.insert("consecutive_failures".into(), json!(o.consecutive_failures));
        duration(&mut m, "base_ejection", o.base_ejection_ms);
        m.insert("max_ejection_ratio".into(), json!(o.max_ejection_ratio));
        out.insert("outlier_detection".into(), m.into());
    }
    let rules: Vec<Value> = p
        .authorization
        .iter()
        .map(|a| json!({"principals": a.principals, "methods": a.methods, "path_prefixes": a.path_prefixes}))
        .collect();
    out.insert("authorization".into(), rules.into());
    match p.mtls() {
        api::MtlsMode::Unspecified => {}
        api::MtlsMode::Strict => {
            out.insert("mtls".into(), json!("strict"));
        }
        api::MtlsMode::Permissive => {
            out.insert("mtls".into(), json!("permissive"));
        }
    }
    if let Some(r) = &p.rate_limit {
        out.insert(
            "rate_limit".into(),
            json!({"requests_per_second": r.requests_per_second, "burst": r.burst}),
        );
    }
    out.into()
}

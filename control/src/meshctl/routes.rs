//! `meshctl routes [SERVICE]`: each service's HTTP routes in the order agents try
//! them, with what each matches, where its requests go (each backend's share and
//! how many usable endpoints its subset selects, so a subset selecting nothing
//! stands out), its timeout, retries, faults and mirror, and last where requests
//! no route takes go.

use serde::Serialize;

use super::{
    error::MeshctlError,
    services::select_services,
    table::Table,
    views::{BackendView, ControlDump, ServiceView},
};

/// The routes of the services asked for.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesReport {
    pub version: u64,
    pub services: Vec<ServiceRoutes>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceRoutes {
    pub service: String,
    /// In the order a request is matched against them; the last entry is the
    /// service itself, for requests no route takes.
    pub routes: Vec<EffectiveRoute>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EffectiveRoute {
    /// `None` for the service's own (default) entry.
    pub name: Option<String>,
    /// Empty: every HTTP port of the service.
    pub ports: Vec<u32>,
    /// Each match as its conditions joined by "and"; empty: every request.
    pub matches: Vec<String>,
    pub backends: Vec<EffectiveBackend>,
    pub timeout_ms: Option<u32>,
    pub retry_attempts: Option<u32>,
    pub fault: Option<String>,
    pub mirror: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EffectiveBackend {
    /// `namespace/name[:port]{label=value,...}`.
    pub target: String,
    /// Share of the route's requests.
    pub percent: f64,
    /// Usable (healthy, non-zero weight) endpoints the backend selects; `None` when
    /// the named service is not in the snapshot (its requests get 500).
    pub endpoints: Option<usize>,
}

/// The routes of the services `filter` selects (every service with routes when
/// there is no filter).
pub fn gather(dump: &ControlDump, filter: Option<&str>) -> Result<RoutesReport, MeshctlError> {
    let services = select_services(dump, filter)?;
    let services = services
        .into_iter()
        .filter(|s| filter.is_some() || !s.routes.is_empty())
        .map(|s| ServiceRoutes { service: s.key(), routes: effective(dump, s) })
        .collect();
    Ok(RoutesReport { version: dump.version, services })
}

fn effective(dump: &ControlDump, s: &ServiceView) -> Vec<EffectiveRoute> {
    let mut out: Vec<EffectiveRoute> = s
        .routes
        .iter()
        .map(|r| {
            let backends = if r.backends.is_empty() {
                vec![backend(dump, s, &BackendView { weight: 1, ..Default::default() }, 1)]
            } else {
                let total: u64 = r.backends.iter().map(|b| u64::from(b.weight)).sum();
                r.backends.iter().map(|b| backend(dump, s, b, total)).collect()
            };
            let fault = r.fault.as_ref().and_then(|f| {
                let mut parts = Vec::new();
                if f.delay_percent > 0.0 {
                    parts.push(format!("delay {}ms to {}%", f.delay_ms, f.delay_percent));
                }
                if f.abort_percent > 0.0 {
                    let grpc = if f.abort_grpc_status != 0 {
                        format!(" (gRPC {})", f.abort_grpc_status)
                    } else {
                        String::new()
                    };
                    parts.push(format!("abort {}{grpc} to {}%", f.abort_http_status, f.abort_percent));
                }
                (!parts.is_empty()).then(|| parts.join(", "))
            });
            let mirror = r.mirror.as_ref().map(|m| {
                let target = m.backend.as_ref().map_or_else(|| s.key(), |b| target(s, b));
                format!("{target} {}%", m.percent)
            });
            EffectiveRoute {
                name: Some(r.name.clone()),
                ports: r.ports.clone(),
                matches: r.matches.iter().map(|m| m.join(" and ")).collect(),
                backends,
                timeout_ms: (r.timeout_ms != 0).then_some(r.timeout_ms),
                retry_attempts: r.retry_attempts,
                fault,
                mirror,
            }
        })
        .collect();
    out.push(EffectiveRoute {
        name: None,
        ports: Vec::new(),
        matches: vec![if s.routes.is_empty() {
            "every request".into()
        } else {
            "requests no route takes".into()
        }],
        backends: vec![backend(dump, s, &BackendView { weight: 1, ..Default::default() }, 1)],
        timeout_ms: None,
        retry_attempts: None,
        fault: None,
        mirror: None,
    });
    out
}

fn target(own: &ServiceView, b: &BackendView) -> String {
    let mut t = if b.service.is_empty() { own.key() } else { b.service.clone() };
    if b.port != 0 {
        t.push_str(&format!(":{}", b.port));
    }
    if !b.subset.is_empty() {
        let labels: Vec<String> = b.subset.iter().map(|(k, v)| format!("{k}={v}")).collect();
        t.push_str(&format!("{{{}}}", labels.join(",")));
    }
    t
}

fn backend(dump: &ControlDump, own: &ServiceView, b: &BackendView, total: u64) -> EffectiveBackend {
    let service =
        if b.service.is_empty() { Some(own) } else { dump.services().iter().find(|s| s.key() == b.service) };
    let endpoints = service.map(|s| {
        s.endpoints
            .iter()
            .filter(|e| e.healthy() && e.weight > 0)
            .filter(|e| b.subset.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            .count()
    });
    let percent = if total == 0 { 0.0 } else { f64::from(b.weight) * 100.0 / total as f64 };
    EffectiveBackend { target: target(own, b), percent, endpoints }
}

/// The human view: one table per service.
pub fn render(report: &RoutesReport) -> String {
    if report.services.is_empty() {
        return format!("No service has routes (version {}).\n", report.version);
    }
    let mut out = String::new();
    for s in &report.services {
        out.push_str(&format!("{}\n", s.service));
        let mut t =
            Table::new(["ROUTE", "PORTS", "MATCH", "BACKENDS", "TIMEOUT", "RETRIES", "FAULT", "MIRROR"]);
        for r in &s.routes {
            let ports = if r.ports.is_empty() {
                "all".to_owned()
            } else {
                r.ports.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            };
            let matches =
                if r.matches.is_empty() { "every request".to_owned() } else { r.matches.join(" | ") };
            let backends: Vec<String> = r
                .backends
                .iter()
                .map(|b| match b.endpoints {
                    Some(n) => format!(
                        "{} {}% ({n} endpoint{})",
                        b.target,
                        round(b.percent),
                        if n == 1 { "" } else { "s" }
                    ),
                    None => format!("{} {}% (unknown service)", b.target, round(b.percent)),
                })
                .collect();
            t.row(vec![
                r.name.clone().unwrap_or_else(|| "(service)".into()),
                ports,
                matches,
                backends.join(", "),
                r.timeout_ms.map_or_else(|| "-".into(), |ms| format!("{ms}ms")),
                r.retry_attempts.map_or_else(|| "-".into(), |n| format!("{n} attempts")),
                r.fault.clone().unwrap_or_else(|| "-".into()),
                r.mirror.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        for line in t.render().lines() {
            out.push_str(&format!("  {line}\n"));
        }
        out.push('\n');
    }
    out.push_str(&format!("version {}\n", report.version));
    out
}

/// `90`, `33.3`.
fn round(p: f64) -> String {
    let r = (p * 10.0).round() / 10.0;
    if r.fract() == 0.0 { format!("{r:.0}") } else { format!("{r:.1}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dump() -> ControlDump {
        serde_json::from_value(json!({
            "version": 7,
            "ready": true,
            "snapshot": {"services": [
                {"name": "web", "namespace": "shop", "endpoints": [
                    {"address": "10.0.0.1", "weight": 1, "health": "HEALTH_HEALTHY", "labels": {"version": "v1"}},
                    {"address": "10.0.0.2", "weight": 1, "health": "HEALTH_HEALTHY", "labels": {"version": "v2"}},
                    {"address": "10.0.0.3", "weight": 1, "health": "HEALTH_UNHEALTHY", "labels": {"version": "v2"}}
                ], "routes": [
                    {"name": "canary", "matches": [["header x-canary = 1"]], "backends": [{"subset": {"version": "v2"}, "weight": 1}]},
                    {"name": "split", "backends": [
                        {"subset": {"version": "v1"}, "weight": 90},
                        {"subset": {"version": "v3"}, "weight": 10}
                    ], "timeout_ms": 2000, "fault": {"delay_ms": 100, "delay_percent": 5.0}},
                    {"name": "gone", "matches": [["path prefix /old"]], "backends": [{"service": "shop/old", "weight": 1}],
                     "mirror": {"backend": {"service": "shop/shadow"}, "percent": 100.0}}
                ]},
                {"name": "db", "namespace": "shop", "endpoints": []}
            ]}
        }))
        .expect("fixture")
    }

    #[test]
    fn shares_endpoint_counts_and_the_default_are_reported() {
        let report = gather(&dump(), None).expect("routes");
        assert_eq!(report.services.len(), 1, "only services with routes without a filter");
        let routes = &report.services[0].routes;
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].matches, vec!["header x-canary = 1"]);
        assert_eq!(routes[0].backends[0].endpoints, Some(1), "the unhealthy v2 endpoint is not usable");
        assert_eq!(routes[1].backends[0].percent, 90.0);
        assert_eq!(routes[1].backends[1].endpoints, Some(0), "a subset selecting nothing shows 0");
        assert_eq!(routes[2].backends[0].endpoints, None, "an unknown service");
        assert_eq!(routes[3].name, None);
        let text = render(&report);
        assert!(
            text.contains("shop/web{version=v1} 90% (1 endpoint), shop/web{version=v3} 10% (0 endpoints)"),
            "{text}"
        );
        assert!(text.contains("shop/old 100% (unknown service)"), "{text}");
        assert!(text.contains("delay 100ms to 5%"), "{text}");
        assert!(text.contains("shop/shadow 100%"), "{text}");
        assert!(text.contains("(service)") && text.contains("requests no route takes"), "{text}");
    }

    #[test]
    fn a_service_without_routes_says_where_its_requests_go() {
        let report = gather(&dump(), Some("db")).expect("routes");
        let text = render(&report);
        assert!(text.contains("shop/db") && text.contains("every request"), "{text}");
        assert!(gather(&dump(), Some("nope")).is_err());
    }
}

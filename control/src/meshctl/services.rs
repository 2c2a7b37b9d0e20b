//! `meshctl services` (the control plane's catalogue) and `meshctl endpoints`
//! (what each agent's data path will actually pick from, or the control plane's view).

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    error::MeshctlError,
    table::{Table, or_dash},
    views::{ControlDump, RouteView, ServiceView},
};

/// `ALGORITHM_ROUND_ROBIN` -> `round-robin`.
pub fn balancer_name(algorithm: &str) -> String {
    let name = algorithm.strip_prefix("ALGORITHM_").unwrap_or(algorithm);
    if name.is_empty() { "round-robin".into() } else { name.to_ascii_lowercase().replace('_', "-") }
}

/// `PROTOCOL_HTTP1` -> `http1`, `PROTOCOL_UNSPECIFIED` -> `detect`.
pub fn protocol_name(protocol: &str) -> String {
    match protocol.strip_prefix("PROTOCOL_").unwrap_or(protocol) {
        "" | "UNSPECIFIED" => "detect".into(),
        p => p.to_ascii_lowercase(),
    }
}

/// Whether `filter` (`namespace/name` or a bare name) selects `key` (`namespace/name`).
pub fn selects(filter: &str, key: &str) -> bool {
    if filter.contains('/') { filter == key } else { key.rsplit('/').next() == Some(filter) }
}

/// The human `services` table.
pub fn render_services(dump: &ControlDump) -> String {
    let services = dump.services();
    if services.is_empty() {
        return format!(
            "No services in the control plane's snapshot (version {}{}).\n",
            dump.version,
            if dump.ready { "" } else { ", registry not loaded yet" }
        );
    }
    let mut t = Table::new(["SERVICE", "VIPS", "HOSTNAMES", "PORTS", "BALANCER", "ENDPOINTS", "AUTHZ"]);
    for s in services {
        let hostnames = match s.hostnames.as_slice() {
            [] => "-".into(),
            [one] => one.clone(),
            [first, rest @ ..] => format!("{first} (+{})", rest.len()),
        };
        let ports: Vec<String> =
            s.ports.iter().map(|p| format!("{}/{}", p.port, protocol_name(&p.protocol))).collect();
        let healthy = s.endpoints.iter().filter(|e| e.healthy() && e.weight > 0).count();
        let authz = match &s.authorization {
            None => "-".into(),
            Some(rules) if rules.is_empty() => "allow all".into(),
            Some(rules) => format!("{} rule{}", rules.len(), if rules.len() == 1 { "" } else { "s" }),
        };
        t.row(vec![
            s.key(),
            or_dash(&s.vips.join(",")),
            hostnames,
            or_dash(&ports.join(",")),
            balancer_name(&s.load_balancer),
            format!("{healthy}/{} usable", s.endpoints.len()),
            authz,
        ]);
    }
    let mut out = t.render();
    let _ = writeln!(out, "\nversion {}: {} services", dump.version, services.len());
    out
}

/// The services `filter` selects, or an error naming the choices.
pub fn select_services<'a>(
    dump: &'a ControlDump,
    filter: Option<&str>,
) -> Result<Vec<&'a ServiceView>, MeshctlError> {
    let selected: Vec<_> =
        dump.services().iter().filter(|s| filter.is_none_or(|f| selects(f, &s.key()))).collect();
    match filter {
        Some(f) if selected.is_empty() => Err(no_such_service(f)),
        _ => Ok(selected),
    }
}

fn no_such_service(filter: &str) -> MeshctlError {
    MeshctlError::Usage(format!(
        "no service matches {filter:?}: give namespace/name or a name; `meshctl services` lists them"
    ))
}

/// One agent's routes (service ports), as `endpoints` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRoutes {
    pub agent: String,
    pub applied_version: Option<u64>,
    pub error: Option<String>,
    pub routes: Vec<RouteView>,
}

/// Keeps the routes `filter` selects; fails when a filter matches no route of any reachable agent.
pub fn filter_routes(
    mut views: Vec<AgentRoutes>,
    filter: Option<&str>,
) -> Result<Vec<AgentRoutes>, MeshctlError> {
    let Some(f) = filter else { return Ok(views) };
    for v in &mut views {
        v.routes.retain(|r| selects(f, &r.service));
    }
    let any_reached = views.iter().any(|v| v.error.is_none());
    if any_reached && views.iter().all(|v| v.routes.is_empty()) {
        return Err(no_such_service(f));
    }
    Ok(views)
}

/// The human `endpoints` tables, one per agent.
pub fn render_agent_endpoints(views: &[AgentRoutes]) -> String {
    let mut out = String::new();
    let breaker_reported =
        views.iter().flat_map(|v| &v.routes).flat_map(|r| &r.endpoints).any(|e| e.breaker.is_some());
    for (i, v) in views.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let version = v.applied_version.map(|n| format!(", applied version {n}")).unwrap_or_default();
        let _ = writeln!(out, "agent {}{version}", v.agent);
        if let Some(e) = &v.error {
            let _ = writeln!(out, "  ! {e}");
            continue;
        }
        if v.routes.is_empty() {
            out.push_str("  no routes (no snapshot applied, or no service matches)\n");
            continue;
        }
        let mut t = if breaker_reported {
            Table::new([
                "SERVICE", "PORT", "ENDPOINT", "HEALTH", "WEIGHT", "BREAKER", "IDENTITY", "NODE", "ZONE",
            ])
        } else {
            Table::new(["SERVICE", "PORT", "ENDPOINT", "HEALTH", "WEIGHT", "IDENTITY", "NODE", "ZONE"])
        };
        for r in &v.routes {
            if r.endpoints.is_empty() {
                t.row(vec![r.service.clone(), format!("{}/{}", r.port, r.protocol), "(none)".into()]);
            }
            for e in &r.endpoints {
                let health = match e.eligible() {
                    Ok(()) => "healthy".into(),
                    Err(why) if e.healthy => format!("skipped: {why}"),
                    Err(why) => why,
                };
                let mut row = vec![
                    r.service.clone(),
                    format!("{}/{}", r.port, r.protocol),
                    e.addr.clone(),
                    health,
                    e.weight.to_string(),
                ];
                if breaker_reported {
                    row.push(e.breaker.clone().unwrap_or_else(|| "-".into()));
                }
                row.extend([or_dash(&e.identity), or_dash(&e.node), or_dash(&e.zone)]);
                t.row(row);
            }
        }
        out.push_str(&t.render());
    }
    if !breaker_reported {
        out.push_str("\n(circuit-breaker and outlier-ejection state: not reported by these agents)\n");
    }
    out
}

/// The human `endpoints --from control` table.
pub fn render_control_endpoints(dump: &ControlDump, services: &[&ServiceView]) -> String {
    let mut t = Table::new(["SERVICE", "ENDPOINT", "HEALTH", "WEIGHT", "IDENTITY", "NODE", "ZONE", "AGENT"]);
    for s in services {
        for e in &s.endpoints {
            let addr = if e.port == 0 { e.address.clone() } else { join_host_port(&e.address, e.port) };
            let health = if e.healthy() {
                "healthy".into()
            } else if e.health_reason.is_empty() {
                "unhealthy".into()
            } else {
                format!("unhealthy: {}", e.health_reason)
            };
            t.row(vec![
                s.key(),
                addr,
                health,
                e.weight.to_string(),
                or_dash(&e.identity),
                or_dash(&e.node),
                or_dash(e.zone.as_deref().unwrap_or_default()),
                if e.agent_address.is_empty() { "outside mesh".into() } else { e.agent_address.clone() },
            ]);
        }
    }
    let mut out = format!("control plane, version {}\n", dump.version);
    if t.is_empty() {
        out.push_str("  no endpoints\n");
    } else {
        out.push_str(&t.render());
    }
    out
}

/// `host:port` with IPv6 literals bracketed.
pub fn join_host_port(host: &str, port: u32) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshctl::fixtures;

    #[test]
    fn services_table_summarises_each_service() {
        let text = render_services(&fixtures::control_dump());
        let expected = "\
SERVICE              VIPS        HOSTNAMES                          PORTS                 BALANCER       ENDPOINTS   AUTHZ
default/reviews      10.96.0.10  reviews.default.svc.cluster.local  9080/http1            least-request  1/3 usable  1 rule
default/db           10.96.0.20  db.default.svc.cluster.local (+1)  5432/tcp,9187/detect  round-robin    1/1 usable  allow all
default/productpage  -           -                                  -                     round-robin    1/1 usable  -

version 42: 3 services
";
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_catalogue_says_why() {
        let dump = ControlDump { version: 3, ready: false, ..Default::default() };
        assert_eq!(
            render_services(&dump),
            "No services in the control plane's snapshot (version 3, registry not loaded yet).\n"
        );
    }

    #[test]
    fn service_filter_accepts_names_and_keys_and_rejects_unknown_ones() {
        let dump = fixtures::control_dump();
        assert_eq!(select_services(&dump, Some("reviews")).unwrap()[0].key(), "default/reviews");
        assert_eq!(select_services(&dump, Some("default/db")).unwrap().len(), 1);
        assert_eq!(select_services(&dump, None).unwrap().len(), 3);
        let e = select_services(&dump, Some("other/reviews")).unwrap_err().to_string();
        assert!(e.contains("`meshctl services` lists them"), "{e}");
    }

    #[test]
    fn agent_endpoints_show_health_weight_and_why_skipped() {
        let views = vec![AgentRoutes {
            agent: "http://node-a:15000".into(),
            applied_version: Some(42),
            error: None,
            routes: fixtures::agent_dump().routes,
        }];
        let views = filter_routes(views, Some("reviews")).unwrap();
        let text = render_agent_endpoints(&views);
        let expected = "\
agent http://node-a:15000, applied version 42
SERVICE          PORT        ENDPOINT       HEALTH                WEIGHT  IDENTITY                                      NODE    ZONE
default/reviews  9080/http1  10.1.0.5:9080  healthy               1       spiffe://cluster.local/ns/default/sa/reviews  node-a  z1
default/reviews  9080/http1  10.1.0.6:9080  unhealthy: not ready  1       spiffe://cluster.local/ns/default/sa/reviews  node-b  z2
default/reviews  9080/http1  10.1.0.7:9080  skipped: weight 0     0       -                                             -       -

(circuit-breaker and outlier-ejection state: not reported by these agents)
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn breaker_column_appears_when_agents_report_it() {
        let mut routes = fixtures::agent_dump().routes;
        routes[0].endpoints[0].breaker = Some("open".into());
        let views = vec![AgentRoutes { agent: "a".into(), applied_version: None, error: None, routes }];
        let text = render_agent_endpoints(&views);
        assert!(text.lines().nth(1).unwrap().contains("BREAKER"), "{text}");
        assert!(text.contains("skipped: circuit breaker open  1       open"), "{text}");
    }

    #[test]
    fn control_endpoints_mark_endpoints_outside_the_mesh() {
        let dump = fixtures::control_dump();
        let db = select_services(&dump, Some("db")).unwrap();
        let text = render_control_endpoints(&dump, &db);
        assert!(text.starts_with("control plane, version 42\nSERVICE"), "{text}");
        assert!(text.contains("10.2.0.9:5432") && text.trim_end().ends_with("outside mesh"), "{text}");
    }
}

//! A service's `routes:` in the registry file: where shares of its HTTP requests
//! go (weighted backends over label subsets or other services), on which matches,
//! with what timeout, retries, injected faults and mirror.
//!
//! ```yaml
//! routes:
//!   - name: canary
//!     match:
//!       - path: {prefix: /api}
//!         method: GET
//!         headers: [{name: x-canary, exact: "1"}]
//!     backends:
//!       - {subset: {version: v1}, weight: 90}
//!       - {subset: {version: v2}, weight: 10}
//!     timeout: 2s
//!     fault: {delay: {duration: 100ms, percent: 5}, abort: {status: 503, percent: 1}}
//!     mirror: {service: shop/shadow, percent: 100}
//! ```
//!
//! The entries become `mesh.v1.HttpRoute`s and are checked by
//! `mesh_api::routes::validate`, the check agents apply too, so a file the control
//! plane accepts is never refused by an agent.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api as api;
use serde::Deserialize;

use super::{RetryEntry, ms};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    pub name: String,
    /// The service ports the route applies to; absent: every HTTP port.
    #[serde(default)]
    pub ports: Vec<u32>,
    /// Any one of these selects the route; absent: every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<MatchEntry>,
    /// Absent: the service's own endpoints.
    #[serde(default)]
    pub backends: Vec<BackendEntry>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<RetryEntry>,
    #[serde(default)]
    pub fault: Option<FaultEntry>,
    #[serde(default)]
    pub mirror: Option<MirrorEntry>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchEntry {
    #[serde(default)]
    pub path: Option<StringEntry>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<NamedEntry>,
    #[serde(default)]
    pub query: Vec<NamedEntry>,
}

/// One of `exact`, `prefix`, `regex`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StringEntry {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

/// A header or query parameter; without `exact`, `prefix` or `regex` it only has
/// to be present.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedEntry {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    /// `namespace/name`; absent: this service.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    /// Absent: 1.
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FaultEntry {
    #[serde(default)]
    pub delay: Option<DelayEntry>,
    #[serde(default)]
    pub abort: Option<AbortEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelayEntry {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Absent: 100.
    #[serde(default)]
    pub percent: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortEntry {
    /// The HTTP status aborted requests get.
    pub status: u32,
    /// For gRPC requests: the gRPC status code they get instead.
    #[serde(default)]
    pub grpc_status: u32,
    /// Absent: 100.
    #[serde(default)]
    pub percent: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MirrorEntry {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    /// Absent: 100.
    #[serde(default)]
    pub percent: Option<f64>,
}

/// The entries as API routes, checked; an error names the field
/// (`routes[0].match[1].path`) and what is wrong.
pub fn parse(
    entries: &[RouteEntry],
    ports: &[api::ServicePort],
) -> Result<Vec<api::HttpRoute>, (String, String)> {
    let mut routes = Vec::with_capacity(entries.len());
    for (i, r) in entries.iter().enumerate() {
        let at = format!("routes[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            matches.push(api::RouteMatch {
                path: m.path.as_ref().map(|p| string(&format!("{at}.path"), p)).transpose()?,
                method: m.method.clone().unwrap_or_default(),
                headers: named(&format!("{at}.headers"), &m.headers)?,
                query_params: named(&format!("{at}.query"), &m.query)?,
            });
        }
        let retries = r.retries.as_ref().map(|x| super::retries(x, &format!("{at}.retries"))).transpose()?;
        let fault = r.fault.as_ref().map(|f| api::FaultInjection {
            delay_ms: f.delay.as_ref().map_or(0, |d| ms(Some(d.duration))),
            delay_percent: f.delay.as_ref().map_or(0.0, |d| d.percent.unwrap_or(100.0)),
            abort_http_status: f.abort.as_ref().map_or(0, |a| a.status),
            abort_grpc_status: f.abort.as_ref().map_or(0, |a| a.grpc_status),
            abort_percent: f.abort.as_ref().map_or(0.0, |a| a.percent.unwrap_or(100.0)),
        });
        let mirror = r.mirror.as_ref().map(|m| api::RouteMirror {
            backend: Some(api::RouteBackend {
                service: m.service.clone().unwrap_or_default(),
                port: m.port,
                subset: m.subset.clone().into_iter().collect(),
                weight: 1,
            }),
            percent: m.percent.unwrap_or(100.0),
        });
        routes.push(api::HttpRoute {
            name: r.name.clone(),
            matches,
            backends: r
                .backends
                .iter()
                .map(|b| api::RouteBackend {
                    service: b.service.clone().unwrap_or_default(),
                    port: b.port,
                    subset: b.subset.clone().into_iter().collect(),
                    weight: b.weight.unwrap_or(1),
                })
                .collect(),
            timeout_ms: ms(r.timeout),
            retries,
            fault,
            mirror,
            ports: r.ports.clone(),
        });
    }
    api::routes::validate(&routes, ports).map_err(|e| (file_field(&e.field), e.message))?;
    Ok(routes)
}

/// The API's field name as the file spells it (`matches` is `match`,
/// `query_params` is `query`, fault and mirror fields sit in their blocks).
fn file_field(api_field: &str) -> String {
    api_field
        .replace(".matches", ".match")
        .replace(".query_params", ".query")
        .replace(".value.regex", ".regex")
        .replace(".fault.delay_ms", ".fault.delay.duration")
        .replace(".fault.delay_percent", ".fault.delay.percent")
        .replace(".fault.abort_http_status", ".fault.abort.status")
        .replace(".fault.abort_grpc_status", ".fault.abort.grpc_status")
        .replace(".fault.abort_percent", ".fault.abort.percent")
        .replace(".mirror.backend", ".mirror")
}

fn string(at: &str, e: &StringEntry) -> Result<api::StringMatch, (String, String)> {
    one_of(at, e.exact.as_ref(), e.prefix.as_ref(), e.regex.as_ref())?
        .ok_or_else(|| (at.to_owned(), "set one of exact, prefix, regex".to_owned()))
}

fn named(at: &str, list: &[NamedEntry]) -> Result<Vec<api::NamedMatch>, (String, String)> {
    list.iter()
        .enumerate()
        .map(|(k, n)| {
            Ok(api::NamedMatch {
                name: n.name.clone(),
                value: one_of(&format!("{at}[{k}]"), n.exact.as_ref(), n.prefix.as_ref(), n.regex.as_ref())?,
            })
        })
        .collect()
}

fn one_of(
    at: &str,
    exact: Option<&String>,
    prefix: Option<&String>,
    regex: Option<&String>,
) -> Result<Option<api::StringMatch>, (String, String)> {
    use api::string_match::Kind;
    let kind = match (exact, prefix, regex) {
        (None, None, None) => return Ok(None),
        (Some(e), None, None) => Kind::Exact(e.clone()),
        (None, Some(p), None) => Kind::Prefix(p.clone()),
        (None, None, Some(r)) => Kind::Regex(r.clone()),
        _ => return Err((at.to_owned(), "set only one of exact, prefix, regex".to_owned())),
    };
    Ok(Some(api::StringMatch { kind: Some(kind) }))
}

#[cfg(test)]
mod tests {
    use super::super::parse as parse_file;

    const SERVICE: &str = "services:\n  - name: web\n    namespace: shop\n    vips: [10.96.0.1]\n    ports: [{port: 80, protocol: http}]\n    endpoints:\n      - {address: 10.0.0.1, labels: {version: v1}}\n      - {address: 10.0.0.2, labels: {version: v2}}\n";

    fn with_routes(routes: &str) -> Result<crate::registry::file::Registry, String> {
        parse_file("reg.yaml", &format!("{SERVICE}    routes:\n{routes}"), "td").map_err(|e| e.to_string())
    }

    #[test]
    fn every_route_feature_parses_into_the_api() {
        let reg = with_routes(
            "      - name: canary\n        match:\n          - path: {prefix: /api}\n            method: GET\n            headers: [{name: x-canary, exact: \"1\"}, {name: x-debug}]\n            query: [{name: tier, regex: \"gold|silver\"}]\n        backends:\n          - {subset: {version: v1}, weight: 90}\n          - {subset: {version: v2}, weight: 10}\n        timeout: 2s\n        retries: {attempts: 3, retry_on: [\"503\"]}\n        fault:\n          delay: {duration: 100ms, percent: 5}\n          abort: {status: 503, grpc_status: 14, percent: 1}\n        mirror: {service: shop/shadow, percent: 50}\n",
        )
        .expect("valid");
        let s = &reg.services[0];
        assert_eq!(s.endpoints[1].labels["version"], "v2");
        let r = &s.routes[0];
        assert_eq!(r.name, "canary");
        assert_eq!(r.matches[0].method, "GET");
        assert_eq!(r.matches[0].headers.len(), 2);
        assert!(r.matches[0].headers[1].value.is_none());
        assert_eq!(r.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), vec![90, 10]);
        assert_eq!(r.timeout_ms, 2000);
        assert_eq!(r.retries.as_ref().map(|x| x.attempts), Some(3));
        let f = r.fault.as_ref().expect("fault");
        assert_eq!(
            (f.delay_ms, f.delay_percent, f.abort_http_status, f.abort_grpc_status),
            (100, 5.0, 503, 14)
        );
        let m = r.mirror.as_ref().expect("mirror");
        assert_eq!((m.backend.as_ref().map(|b| b.service.as_str()), m.percent), (Some("shop/shadow"), 50.0));
    }

    #[test]
    fn a_bad_route_is_refused_naming_file_entry_and_field() {
        let err =
            with_routes("      - name: r\n        match: [{path: {regex: \"(\"}}]\n").expect_err("bad regex");
        assert!(err.starts_with("reg.yaml: services[0] (shop/web): routes[0].match[0].path.regex:"), "{err}");
        let err = with_routes("      - name: r\n        match: [{path: {exact: /a, prefix: /b}}]\n")
            .expect_err("two kinds");
        assert!(err.contains("routes[0].match[0].path: set only one"), "{err}");
        let err =
            with_routes("      - name: r\n        fault: {abort: {status: 99}}\n").expect_err("bad status");
        assert!(err.contains("routes[0].fault.abort.status"), "{err}");
        let err = with_routes("      - name: r\n        backends: [{subset: {version: v1}, weight: 0}]\n")
            .expect_err("nowhere");
        assert!(err.contains("routes[0].backends: every backend has weight 0"), "{err}");
        let err =
            with_routes("      - name: r\n        retries: {retry_on: [sometimes]}\n").expect_err("retry_on");
        assert!(err.contains("routes[0].retries.retry_on[0]"), "{err}");
        let err = with_routes("      - name: r\n        weight: 3\n").expect_err("unknown field");
        assert!(err.contains("unknown field `weight`"), "{err}");
    }
}

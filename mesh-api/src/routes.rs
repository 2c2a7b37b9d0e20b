//! What makes a service's HTTP routes valid. The control plane checks routes here
//! before it publishes them, naming the file entry or Kubernetes object and the
//! field; agents check them again before applying a snapshot, refusing it with the
//! same words. One definition on both sides means nothing one side accepts is
//! refused by the other.
//!
//! Every list a route holds is bounded, and regular expressions are compiled with a
//! size limit by a linear-time engine, so a route cannot be turned into a way to
//! exhaust an agent.

use std::collections::HashSet;

use crate::v1::{HttpRoute, NamedMatch, RouteBackend, ServicePort, StringMatch, string_match};

/// Routes per service, at most.
pub const MAX_ROUTES: usize = 64;
/// Matches per route, and header or query conditions per match, at most.
pub const MAX_MATCHES: usize = 16;
/// Backends per route, at most.
pub const MAX_BACKENDS: usize = 16;
/// Length of one regular expression, at most (bytes).
pub const MAX_REGEX_LEN: usize = 1024;
/// Memory one compiled regular expression may take (bytes).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Why a route is refused: the field (`routes[1].matches[0].path.regex`) and what
/// is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RouteError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> RouteError {
    RouteError { field: field.into(), message: message.into() }
}

/// Compiles `pattern` as a route match does: against the whole value (anchored at
/// both ends), within [`MAX_REGEX_LEN`] and [`REGEX_SIZE_LIMIT`].
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(format!("longer than {MAX_REGEX_LEN} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            // The parser's message spans lines (the pattern with a caret); its last
            // line says what is wrong, which is what one-line errors need.
            let text = e.to_string();
            let why = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
            format!(
                "{pattern:?} is not a valid regular expression: {}",
                why.trim().trim_start_matches("error: ")
            )
        })
}

/// Checks a service's routes against its ports.
pub fn validate(routes: &[HttpRoute], ports: &[ServicePort]) -> Result<(), RouteError> {
    if routes.len() > MAX_ROUTES {
        return Err(err("routes", format!("{} routes, more than {MAX_ROUTES}", routes.len())));
    }
    let mut names = HashSet::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if !is_route_name(&route.name) {
            return Err(err(
                format!("{at}.name"),
                format!("{:?} is not a route name (1-253 of a-z, 0-9, '-', '.')", route.name),
            ));
        }
        if !names.insert(route.name.as_str()) {
            return Err(err(format!("{at}.name"), format!("{:?} names another route too", route.name)));
        }
        validate_route(&at, route, ports)?;
    }
    Ok(())
}

fn validate_route(at: &str, route: &HttpRoute, ports: &[ServicePort]) -> Result<(), RouteError> {
    for (k, port) in route.ports.iter().enumerate() {
        if !ports.iter().any(|p| p.port == *port) {
            return Err(err(format!("{at}.ports[{k}]"), format!("{port} is not a port of the service")));
        }
    }
    if route.matches.len() > MAX_MATCHES {
        return Err(err(format!("{at}.matches"), format!("more than {MAX_MATCHES} matches")));
    }
    for (j, m) in route.matches.iter().enumerate() {
        let at = format!("{at}.matches[{j}]");
        if let Some(path) = &m.path {
            string_match(&format!("{at}.path"), path, true)?;
        }
        if !m.method.is_empty() && !m.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(err(
                format!("{at}.method"),
                format!("{:?} is not a method in upper case (GET, POST, ...)", m.method),
            ));
        }
        named_matches(&format!("{at}.headers"), &m.headers, true)?;
        named_matches(&format!("{at}.query_params"), &m.query_params, false)?;
    }
    if route.backends.len() > MAX_BACKENDS {
        return Err(err(format!("{at}.backends"), format!("more than {MAX_BACKENDS} backends")));
    }
    for (k, b) in route.backends.iter().enumerate() {
        backend(&format!("{at}.backends[{k}]"), b)?;
    }
    if !route.backends.is_empty() && route.backends.iter().all(|b| b.weight == 0) {
        return Err(err(
            format!("{at}.backends"),
            "every backend has weight 0: the route would send its requests nowhere",
        ));
    }
    if let Some(r) = &route.retries {
        for (k, cond) in r.retry_on.iter().enumerate() {
            if !RETRY_ON.contains(&cond.as_str()) {
                return Err(err(
                    format!("{at}.retries.retry_on[{k}]"),
                    format!("{cond:?} is not one of {}", RETRY_ON.join(", ")),
                ));
            }
        }
        if !(0.0..=1.0).contains(&r.budget_ratio) {
            return Err(err(format!("{at}.retries.budget_ratio"), "must be between 0 and 1"));
        }
    }
    if let Some(f) = &route.fault {
        let at = format!("{at}.fault");
        percent(&format!("{at}.delay_percent"), f.delay_percent)?;
        percent(&format!("{at}.abort_percent"), f.abort_percent)?;
        if f.delay_percent > 0.0 && f.delay_ms == 0 {
            return Err(err(format!("{at}.delay_ms"), "a delay of 0 for a share of requests delays nothing"));
        }
        if f.abort_http_status != 0 && !(200..=599).contains(&f.abort_http_status) {
            return Err(err(
                format!("{at}.abort_http_status"),
                format!("{} is not an HTTP status (200-599)", f.abort_http_status),
            ));
        }
        if f.abort_grpc_status > 16 {
            return Err(err(
                format!("{at}.abort_grpc_status"),
                format!("{} is not a gRPC status code (0-16)", f.abort_grpc_status),
            ));
        }
        if f.abort_percent > 0.0 && f.abort_http_status == 0 {
            return Err(err(
                format!("{at}.abort_http_status"),
                "aborting a share of requests needs the HTTP status to answer with",
            ));
        }
    }
    if let Some(m) = &route.mirror {
        let at = format!("{at}.mirror");
        match &m.backend {
            Some(b) => backend(&format!("{at}.backend"), b)?,
            None => return Err(err(format!("{at}.backend"), "missing: where to send the copies")),
        }
        percent(&format!("{at}.percent"), m.percent)?;
    }
    Ok(())
}

/// The retry conditions a route or service may name.
pub const RETRY_ON: [&str; 4] = ["connect-failure", "reset", "503", "unavailable"];

fn percent(field: &str, v: f64) -> Result<(), RouteError> {
    if v.is_finite() && (0.0..=100.0).contains(&v) {
        Ok(())
    } else {
        Err(err(field, format!("{v} is not a percentage (0 to 100)")))
    }
}

fn string_match(field: &str, m: &StringMatch, path: bool) -> Result<(), RouteError> {
    match &m.kind {
        None => Err(err(field, "set one of exact, prefix, regex")),
        Some(string_match::Kind::Regex(r)) => {
            compile_regex(r).map_err(|e| err(format!("{field}.regex"), e)).map(drop)
        }
        Some(string_match::Kind::Exact(s)) if path => is_path(&format!("{field}.exact"), s),
        Some(string_match::Kind::Prefix(s)) if path => is_path(&format!("{field}.prefix"), s),
        Some(_) => Ok(()),
    }
}

fn is_path(field: &str, p: &str) -> Result<(), RouteError> {
    if p.starts_with('/') && !p.contains(['?', '#']) {
        Ok(())
    } else {
        Err(err(field, format!("{p:?} is not a path (it starts with \"/\" and has no query or fragment)")))
    }
}

fn named_matches(at: &str, list: &[NamedMatch], header: bool) -> Result<(), RouteError> {
    if list.len() > MAX_MATCHES {
        return Err(err(at, format!("more than {MAX_MATCHES} conditions")));
    }
    for (k, m) in list.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let name_ok = if header {
            !m.name.is_empty() && m.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        } else {
            !m.name.is_empty()
        };
        if !name_ok {
            return Err(err(format!("{at}.name"), format!("{:?} is not a {} name", m.name, kind(header))));
        }
        if let Some(v) = &m.value {
            string_match(&format!("{at}.value"), v, false)?;
        }
    }
    Ok(())
}

fn kind(header: bool) -> &'static str {
    if header { "header" } else { "query parameter" }
}

fn backend(at: &str, b: &RouteBackend) -> Result<(), RouteError> {
    if !b.service.is_empty() {
        let ok = b.service.split_once('/').is_some_and(|(ns, name)| is_label(ns) && is_label(name));
        if !ok {
            return Err(err(format!("{at}.service"), format!("{:?} is not namespace/name", b.service)));
        }
    }
    if b.port > 65535 {
        return Err(err(format!("{at}.port"), format!("{} is not a port (1-65535)", b.port)));
    }
    for key in b.subset.keys() {
        if key.is_empty() {
            return Err(err(format!("{at}.subset"), "a label name is empty"));
        }
    }
    Ok(())
}

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_route_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{FaultInjection, RouteMatch, RouteMirror};

    fn ports() -> Vec<ServicePort> {
        vec![ServicePort { name: "http".into(), port: 80, target_port: 8080, protocol: 2 }]
    }

    fn route(name: &str) -> HttpRoute {
        HttpRoute { name: name.into(), ..Default::default() }
    }

    fn field_of(routes: &[HttpRoute]) -> String {
        validate(routes, &ports()).expect_err("refused").field
    }

    #[test]
    fn a_full_route_is_accepted() {
        let r = HttpRoute {
            name: "canary".into(),
            matches: vec![RouteMatch {
                path: Some(StringMatch { kind: Some(string_match::Kind::Regex("/api/v[0-9]+/.*".into())) }),
                method: "GET".into(),
                headers: vec![NamedMatch {
                    name: "x-canary".into(),
                    value: Some(StringMatch { kind: Some(string_match::Kind::Exact("1".into())) }),
                }],
                query_params: vec![NamedMatch { name: "debug".into(), value: None }],
            }],
            backends: vec![
                RouteBackend {
                    weight: 90,
                    subset: [("version".into(), "v1".into())].into(),
                    ..Default::default()
                },
                RouteBackend { weight: 10, service: "shop/web-v2".into(), port: 80, ..Default::default() },
            ],
            fault: Some(FaultInjection { delay_ms: 100, delay_percent: 50.0, ..Default::default() }),
            mirror: Some(RouteMirror { backend: Some(RouteBackend::default()), percent: 100.0 }),
            ports: vec![80],
            ..Default::default()
        };
        validate(&[r], &ports()).expect("valid");
    }

    #[test]
    fn each_mistake_is_named_by_its_field() {
        assert_eq!(field_of(&[route("")]), "routes[0].name");
        assert_eq!(field_of(&[route("a"), route("a")]), "routes[1].name");
        let mut r = route("a");
        r.ports = vec![81];
        assert_eq!(field_of(&[r]), "routes[0].ports[0]");
        let mut r = route("a");
        r.matches = vec![RouteMatch {
            path: Some(StringMatch { kind: Some(string_match::Kind::Regex("(".into())) }),
            ..Default::default()
        }];
        assert_eq!(field_of(&[r]), "routes[0].matches[0].path.regex");
        let mut r = route("a");
        r.matches = vec![RouteMatch {
            path: Some(StringMatch { kind: Some(string_match::Kind::Prefix("api".into())) }),
            ..Default::default()
        }];
        assert_eq!(field_of(&[r]), "routes[0].matches[0].path.prefix");
        let mut r = route("a");
        r.matches = vec![RouteMatch { method: "get".into(), ..Default::default() }];
        assert_eq!(field_of(&[r]), "routes[0].matches[0].method");
        let mut r = route("a");
        r.matches = vec![RouteMatch {
            headers: vec![NamedMatch { name: "bad header".into(), value: None }],
            ..Default::default()
        }];
        assert_eq!(field_of(&[r]), "routes[0].matches[0].headers[0].name");
        let mut r = route("a");
        r.backends = vec![RouteBackend { service: "nope".into(), weight: 1, ..Default::default() }];
        assert_eq!(field_of(&[r]), "routes[0].backends[0].service");
        let mut r = route("a");
        r.backends = vec![RouteBackend::default(), RouteBackend::default()];
        assert_eq!(field_of(&[r]), "routes[0].backends");
        let mut r = route("a");
        r.fault = Some(FaultInjection { abort_percent: 10.0, ..Default::default() });
        assert_eq!(field_of(&[r]), "routes[0].fault.abort_http_status");
        let mut r = route("a");
        r.fault = Some(FaultInjection { delay_ms: 5, delay_percent: 101.0, ..Default::default() });
        assert_eq!(field_of(&[r]), "routes[0].fault.delay_percent");
        let mut r = route("a");
        r.fault = Some(FaultInjection { delay_ms: 5, delay_percent: f64::NAN, ..Default::default() });
        assert_eq!(field_of(&[r]), "routes[0].fault.delay_percent");
        let mut r = route("a");
        r.mirror = Some(RouteMirror { backend: None, percent: 100.0 });
        assert_eq!(field_of(&[r]), "routes[0].mirror.backend");
    }

    #[test]
    fn lists_are_bounded() {
        let many: Vec<HttpRoute> = (0..=MAX_ROUTES).map(|i| route(&format!("r{i}"))).collect();
        assert_eq!(field_of(&many), "routes");
        assert!(compile_regex(&"a".repeat(MAX_REGEX_LEN + 1)).is_err());
        // A pattern whose compiled form is huge is refused, not built.
        assert!(compile_regex("(?:[a-z]{100}){100}").is_err());
    }

    #[test]
    fn a_regex_matches_the_whole_value() {
        let re = compile_regex("/api/v[0-9]+").expect("compiles");
        assert!(re.is_match("/api/v2"));
        assert!(!re.is_match("/api/v2/x"));
        assert!(!re.is_match("/x/api/v2"));
    }
}

//! Gateway API HTTPRoutes (gateway.networking.k8s.io/v1) attached to Services, as
//! the GAMMA convention has meshes read them, turned into mesh routes.
//!
//! What is read:
//! - `parentRefs` of kind `Service` (core group) in the route's own namespace (a
//!   "producer" route, applying to every caller); `port` narrows it to one port.
//!   Routes attached to Gateways are not the mesh's and are skipped silently;
//!   consumer routes (another namespace's Service) are reported as not supported.
//! - Each rule's `matches` (path `Exact`, `PathPrefix`, `RegularExpression`;
//!   headers and query parameters `Exact` or `RegularExpression`; `method`), its
//!   `backendRefs` (Services of the route's namespace, with port and weight; none:
//!   the parent Service itself), `timeouts.request`, and a `RequestMirror` filter.
//!   A rule with any other filter is skipped and reported: forwarding without a
//!   rewrite or redirect the route asked for would be worse than not routing.
//!
//! Gateway API orders matches across all routes of a parent, not route by route:
//! an exact path first, then the longest prefix, then regular expressions, then
//! the most header and query conditions; ties go to the oldest route, then by
//! namespace/name. Each (rule, match) pair becomes one mesh route, sorted so, since
//! agents take the first mesh route that matches.
//!
//! A route that does not validate (a regular expression that does not compile, a
//! weight out of range) is reported naming the object and field; its last version
//! that did validate stays in force (see [`Memory`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_api as api;
use serde::{Deserialize, Serialize};

use super::annotations::Problems;

/// An HTTPRoute, with the fields the mesh reads (others are ignored).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Spec,
}

impl kube::Resource for HttpRoute {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "HTTPRoute".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "httproutes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Spec {
    pub parent_refs: Vec<ParentRef>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Match {
    pub path: Option<ValueMatch>,
    pub headers: Vec<NamedMatch>,
    pub query_params: Vec<NamedMatch>,
    pub method: Option<String>,
}

/// A path: `type` Exact, PathPrefix (the default) or RegularExpression.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ValueMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

/// A header or query parameter: `type` Exact (the default) or RegularExpression.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct NamedMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_mirror: Option<Mirror>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Mirror {
    pub backend_ref: BackendRef,
    pub percent: Option<i32>,
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Fraction {
    pub numerator: i32,
    pub denominator: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub weight: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Timeouts {
    pub request: Option<String>,
}

/// A service's mesh routes from one HTTPRoute, each with its precedence.
type Attached = Vec<(Precedence, api::HttpRoute)>;

/// The last valid mesh routes of each HTTPRoute, by namespace/name and then by
/// parent service, so a bad edit of a route keeps its previous version in force.
#[derive(Debug, Default)]
pub struct Memory(HashMap<(String, String), BTreeMap<(String, String), Attached>>);

/// Gateway API's order of matches: earlier sorts first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// 0 exact, 1 prefix, 2 regular expression.
    path_kind: u8,
    /// Longer prefixes first.
    path_len: std::cmp::Reverse<usize>,
    method: std::cmp::Reverse<bool>,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    /// RFC 3339 timestamps sort in time order as text.
    created: String,
    route: (String, String),
    rule: usize,
    matched: usize,
}

/// Adds the routes of `routes` to the `services` they attach to, in precedence
/// order, reporting problems per route; `memory` keeps each route's last valid form.
pub fn attach(
    services: &mut [api::Service],
    routes: &[Arc<HttpRoute>],
    memory: &mut Memory,
    problems: &mut Problems,
) {
    let index: HashMap<(String, String), usize> =
        services.iter().enumerate().map(|(i, s)| ((s.namespace.clone(), s.name.clone()), i)).collect();
    let mut per_service: BTreeMap<usize, Attached> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for route in routes {
        let ns = route.metadata.namespace.clone().unwrap_or_default();
        let name = route.metadata.name.clone().unwrap_or_default();
        let object = format!("httproute {ns}/{name}");
        seen.insert((ns.clone(), name.clone()));
        let mapped = map_route(route, &ns, &name, services, &index, problems);
        let parents = match mapped {
            Ok(parents) => {
                memory.0.insert((ns.clone(), name.clone()), parents.clone());
                parents
            }
            Err(why) => {
                let kept = memory.0.get(&(ns.clone(), name.clone()));
                let suffix =
                    if kept.is_some() { "; its last valid version stays in force" } else { "; not applied" };
                problems.other(&object, format!("{why}{suffix}"));
                kept.cloned().unwrap_or_default()
            }
        };
        for (parent, entries) in parents {
            if let Some(&i) = index.get(&parent) {
                per_service.entry(i).or_default().extend(entries);
            }
        }
    }
    memory.0.retain(|k, _| seen.contains(k));
    for (i, mut entries) in per_service {
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let service = &mut services[i];
        let room = api::routes::MAX_ROUTES.saturating_sub(service.routes.len());
        if entries.len() > room {
            problems.other(
                &format!("service {}/{}", service.namespace, service.name),
                format!(
                    "{} route matches from HTTPRoutes, more than the {} a service may have; the last {} in precedence order are not applied",
                    entries.len(),
                    api::routes::MAX_ROUTES,
                    entries.len() - room
                ),
            );
            entries.truncate(room);
        }
        service.routes.extend(entries.into_iter().map(|(_, r)| r));
    }
}

/// One HTTPRoute's mesh routes per parent service, or why the route is invalid.
fn map_route(
    route: &HttpRoute,
    ns: &str,
    name: &str,
    services: &[api::Service],
    index: &HashMap<(String, String), usize>,
    problems: &mut Problems,
) -> Result<BTreeMap<(String, String), Attached>, String> {
    let object = format!("httproute {ns}/{name}");
    let created = route.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (p, parent) in route.spec.parent_refs.iter().enumerate() {
        let is_service = parent.kind.as_deref() == Some("Service")
            && matches!(parent.group.as_deref(), None | Some("") | Some("core"));
        if !is_service {
            continue;
        }
        let parent_ns = parent.namespace.clone().unwrap_or_else(|| ns.to_owned());
        if parent_ns != ns {
            problems.other(
                &object,
                format!(
                    "spec.parentRefs[{p}]: service {parent_ns}/{}: consumer routes (to a Service of another namespace) are not supported; skipped",
                    parent.name
                ),
            );
            continue;
        }
        let key = (parent_ns.clone(), parent.name.clone());
        let Some(&si) = index.get(&key) else {
            // The Service may arrive later; the route attaches then.
            continue;
        };
        let port = match parent.port {
            None => None,
            Some(p) => {
                Some(u32::try_from(p).map_err(|_| format!("spec.parentRefs[{p}].port: {p} is not a port"))?)
            }
        };
        let mut entries = Vec::new();
        let mut origins = Vec::new();
        for (ri, rule) in route.spec.rules.iter().enumerate() {
            let at = format!("spec.rules[{ri}]");
            if let Some(f) = rule.filters.iter().find(|f| f.kind != "RequestMirror") {
                problems.other(
                    &object,
                    format!("{at}: filter {:?} is not supported; the rule is skipped", f.kind),
                );
                continue;
            }
            let common = rule_common(&at, rule, ns)?;
            let matches: Vec<Match> =
                if rule.matches.is_empty() { vec![Match::default()] } else { rule.matches.clone() };
            for (mi, m) in matches.iter().enumerate() {
                let (mesh_match, precedence) = map_match(&format!("{at}.matches[{mi}]"), m)?;
                let mut r = common.clone();
                r.name = format!("{ns}.{name}.{ri}.{mi}").to_ascii_lowercase();
                r.matches = vec![mesh_match];
                r.ports = port.into_iter().collect();
                entries.push((
                    Precedence {
                        created: created.clone(),
                        route: (ns.to_owned(), name.to_owned()),
                        rule: ri,
                        matched: mi,
                        ..precedence
                    },
                    r,
                ));
                origins.push(format!("{at}.matches[{mi}]"));
            }
        }
        let mesh: Vec<api::HttpRoute> = entries.iter().map(|(_, r)| r.clone()).collect();
        if let Err(e) = api::routes::validate(&mesh, &services[si].ports) {
            // `routes[k].x` -> the rule and match it came from.
            let (k, rest) = e
                .field
                .strip_prefix("routes[")
                .and_then(|f| f.split_once(']'))
                .and_then(|(k, rest)| Some((k.parse::<usize>().ok()?, rest)))
                .unwrap_or((usize::MAX, e.field.as_str()));
            let origin = origins.get(k).map_or("spec", String::as_str);
            return Err(format!("{origin}{}: {}", httproute_field(rest), e.message));
        }
        out.insert(key, entries);
    }
    Ok(out)
}

/// A mesh route's field (after `routes[k]`) as the HTTPRoute names it: each mesh
/// route holds one match, and the API's names differ in places.
fn httproute_field(rest: &str) -> String {
    let rest = rest.strip_prefix(".matches[0]").unwrap_or(rest);
    let rest = rest.replace(".query_params", ".queryParams");
    for suffix in [".regex", ".exact", ".prefix"] {
        if let Some(base) = rest.strip_suffix(suffix) {
            return if base.ends_with(".path") { format!("{base}.value") } else { base.to_owned() };
        }
    }
    rest
}

/// What every match of a rule shares: backends, timeout, mirror.
fn rule_common(at: &str, rule: &Rule, ns: &str) -> Result<api::HttpRoute, String> {
    let mut backends = Vec::with_capacity(rule.backend_refs.len());
    for (k, b) in rule.backend_refs.iter().enumerate() {
        backends.push(backend(&format!("{at}.backendRefs[{k}]"), b, ns)?);
    }
    let timeout_ms = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
        None => 0,
        Some(d) => {
            let parsed = humantime::parse_duration(d)
                .map_err(|e| format!("{at}.timeouts.request: {d:?} is not a duration: {e}"))?;
            u32::try_from(parsed.as_millis()).unwrap_or(u32::MAX)
        }
    };
    let mut mirror = None;
    for (k, f) in rule.filters.iter().enumerate() {
        let Some(m) = &f.request_mirror else {
            return Err(format!("{at}.filters[{k}].requestMirror: missing"));
        };
        let percent = match (&m.fraction, m.percent) {
            (Some(fr), _) => {
                let den = fr.denominator.unwrap_or(100);
                if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                    return Err(format!("{at}.filters[{k}].requestMirror.fraction: not a fraction of 1"));
                }
                f64::from(fr.numerator) * 100.0 / f64::from(den)
            }
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        };
        mirror = Some(api::RouteMirror {
            backend: Some(backend(
                &format!("{at}.filters[{k}].requestMirror.backendRef"),
                &m.backend_ref,
                ns,
            )?),
            percent,
        });
    }
    Ok(api::HttpRoute { backends, timeout_ms, mirror, ..Default::default() })
}

fn backend(at: &str, b: &BackendRef, ns: &str) -> Result<api::RouteBackend, String> {
    if !matches!(b.kind.as_deref(), None | Some("Service"))
        || !matches!(b.group.as_deref(), None | Some("") | Some("core"))
    {
        return Err(format!("{at}: only Services can be backends"));
    }
    let backend_ns = b.namespace.as_deref().unwrap_or(ns);
    if backend_ns != ns {
        return Err(format!(
            "{at}: a Service of another namespace ({backend_ns}) needs a ReferenceGrant, which is not supported"
        ));
    }
    let port = match b.port {
        Some(p) => u32::try_from(p)
            .ok()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| format!("{at}.port: {p} is not a port"))?,
        None => return Err(format!("{at}.port: required for a Service backend")),
    };
    let weight =
        u32::try_from(b.weight.unwrap_or(1)).map_err(|_| format!("{at}.weight: must not be negative"))?;
    Ok(api::RouteBackend {
        service: format!("{backend_ns}/{}", b.name),
        port,
        subset: Default::default(),
        weight,
    })
}

fn map_match(at: &str, m: &Match) -> Result<(api::RouteMatch, Precedence), String> {
    use api::string_match::Kind;
    let (path, path_kind, path_len) = match &m.path {
        None => (None, 1, 1),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let len = value.len();
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => (Some(Kind::Exact(value)), 0, len),
                "PathPrefix" => (Some(Kind::Prefix(value)), 1, len),
                "RegularExpression" => (Some(Kind::Regex(value)), 2, len),
                other => {
                    return Err(format!(
                        "{at}.path.type: {other:?} is not Exact, PathPrefix or RegularExpression"
                    ));
                }
            }
        }
    };
    let named = |field: &str, list: &[NamedMatch], header: bool| -> Result<Vec<api::NamedMatch>, String> {
        list.iter()
            .enumerate()
            .map(|(k, n)| {
                let value = match n.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => Kind::Exact(n.value.clone()),
                    "RegularExpression" => Kind::Regex(n.value.clone()),
                    other => {
                        return Err(format!(
                            "{at}.{field}[{k}].type: {other:?} is not Exact or RegularExpression"
                        ));
                    }
                };
                let name = if header { n.name.to_ascii_lowercase() } else { n.name.clone() };
                Ok(api::NamedMatch { name, value: Some(api::StringMatch { kind: Some(value) }) })
            })
            .collect()
    };
    let headers = named("headers", &m.headers, true)?;
    let query_params = named("queryParams", &m.query_params, false)?;
    let precedence = Precedence {
        path_kind,
        path_len: std::cmp::Reverse(path_len),
        method: std::cmp::Reverse(m.method.is_some()),
        headers: std::cmp::Reverse(headers.len()),
        query: std::cmp::Reverse(query_params.len()),
        created: String::new(),
        route: Default::default(),
        rule: 0,
        matched: 0,
    };
    let mesh = api::RouteMatch {
        path: path.map(|kind| api::StringMatch { kind: Some(kind) }),
        method: m.method.clone().unwrap_or_default(),
        headers,
        query_params,
    };
    Ok((mesh, precedence))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(name: &str) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "shop".into(),
            ports: vec![api::ServicePort { name: "http".into(), port: 80, ..Default::default() }],
            ..Default::default()
        }
    }

    fn route(name: &str, created: &str, spec: serde_json::Value) -> Arc<HttpRoute> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "creationTimestamp": created},
                "spec": spec,
            }))
            .expect("route"),
        )
    }

    fn parent() -> serde_json::Value {
        json!([{"group": "", "kind": "Service", "name": "web", "port": 80}])
    }

    #[test]
    fn a_canary_route_becomes_a_weighted_split_between_services() {
        let mut services = vec![service("web"), service("web-v1"), service("web-v2")];
        let r = route(
            "canary",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{
                "backendRefs": [{"name": "web-v1", "port": 80, "weight": 90}, {"name": "web-v2", "port": 80, "weight": 10}],
                "timeouts": {"request": "2s"},
                "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web-v2", "port": 80}, "fraction": {"numerator": 1, "denominator": 4}}}],
            }]}),
        );
        let mut problems = Problems::default();
        attach(&mut services, &[r], &mut Memory::default(), &mut problems);
        assert!(problems.is_empty(), "{:?}", problems.into_vec());
        let routes = &services[0].routes;
        assert_eq!(routes.len(), 1);
        let mesh = &routes[0];
        assert_eq!(mesh.name, "shop.canary.0.0");
        assert_eq!(mesh.ports, vec![80]);
        assert_eq!(
            mesh.backends.iter().map(|b| (b.service.as_str(), b.weight)).collect::<Vec<_>>(),
            vec![("shop/web-v1", 90), ("shop/web-v2", 10)]
        );
        assert_eq!(mesh.timeout_ms, 2000);
        assert_eq!(mesh.mirror.as_ref().map(|m| m.percent), Some(25.0));
        assert!(services[1].routes.is_empty(), "backends are not parents");
    }

    #[test]
    fn matches_across_routes_are_ordered_as_gateway_api_says() {
        let mut services = vec![service("web"), service("web-v2")];
        let backend = json!([{"name": "web-v2", "port": 80}]);
        let old = route(
            "old",
            "2025-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{"matches": [
                {"path": {"type": "PathPrefix", "value": "/api"}},
                {"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}},
            ], "backendRefs": backend}]}),
        );
        let new = route(
            "new",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{"matches": [
                {"path": {"type": "PathPrefix", "value": "/api/orders"}},
                {"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-Canary", "value": "1"}]},
                {"path": {"type": "Exact", "value": "/health"}},
            ], "backendRefs": backend}]}),
        );
        let mut problems = Problems::default();
        attach(&mut services, &[old, new], &mut Memory::default(), &mut problems);
        let names: Vec<&str> = services[0].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["shop.new.0.2", "shop.new.0.0", "shop.new.0.1", "shop.old.0.0", "shop.old.0.1"],
            "exact, longest prefix, more headers, then the older route, regexes last"
        );
        assert_eq!(services[0].routes[2].matches[0].headers[0].name, "x-canary");
    }

    #[test]
    fn a_bad_edit_is_reported_by_field_and_the_last_valid_version_stays() {
        let mut memory = Memory::default();
        let good = route(
            "r",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a.*"}}]}]}),
        );
        let mut services = vec![service("web")];
        let mut problems = Problems::default();
        attach(&mut services, &[good], &mut memory, &mut problems);
        assert_eq!(services[0].routes.len(), 1);
        let bad = route(
            "r",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a("}}]}]}),
        );
        let mut services = vec![service("web")];
        let mut problems = Problems::default();
        attach(&mut services, std::slice::from_ref(&bad), &mut memory, &mut problems);
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("httproute shop/r: spec.rules[0].matches[0].path.value: \"/a(\" is not a valid regular expression: unclosed group")
                && problems[0].ends_with("its last valid version stays in force"),
            "{problems:?}"
        );
        assert_eq!(services[0].routes[0].matches[0].path, good_path("/a.*"), "the last valid version");
        // Without a valid version to fall back on, nothing is applied.
        let mut services = vec![service("web")];
        let mut problems = Problems::default();
        attach(&mut services, &[bad], &mut Memory::default(), &mut problems);
        assert!(services[0].routes.is_empty());
    }

    fn good_path(re: &str) -> Option<api::StringMatch> {
        Some(api::StringMatch { kind: Some(api::string_match::Kind::Regex(re.into())) })
    }

    #[test]
    fn gateway_routes_are_not_the_meshs_and_unsupported_parts_are_reported() {
        let mut services = vec![service("web")];
        let gateway = route(
            "gw",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"name": "public-gateway"}], "rules": [{}]}),
        );
        let rewrite = route(
            "rw",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": parent(), "rules": [{"filters": [{"type": "URLRewrite"}]}, {}]}),
        );
        let consumer = route(
            "consumer",
            "2026-01-01T00:00:00Z",
            json!({"parentRefs": [{"kind": "Service", "namespace": "other", "name": "web"}], "rules": [{}]}),
        );
        let mut problems = Problems::default();
        attach(&mut services, &[gateway, rewrite, consumer], &mut Memory::default(), &mut problems);
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("httproute shop/rw: spec.rules[0]: filter \"URLRewrite\""))
        );
        assert!(problems.iter().any(|p| p.contains("consumer routes")));
        let names: Vec<&str> = services[0].routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["shop.rw.1.0"], "the rewrite rule skipped, the plain one kept");
    }
}

//! Authorization on the receiving agent: the destination service's allow rules,
//! checked once per tunnel stream (may this peer reach this workload at all, and
//! as raw TCP?) and, for HTTP, once per request (method and path).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::RouteStore;
use crate::identity::SpiffeId;

/// One allow rule of the destination service, as the proxy checks it per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpRule {
    pub principals: Vec<String>,
    pub methods: Vec<String>,
    pub path_prefixes: Vec<String>,
}

impl HttpRule {
    pub fn from_api(r: &mesh_api::AuthorizationRule) -> Self {
        HttpRule {
            principals: r.principals.clone(),
            methods: r.methods.clone(),
            path_prefixes: r.path_prefixes.clone(),
        }
    }

    /// Whether the rule allows `peer` to send `method` to `path`.
    pub fn allows(&self, peer: &str, method: &str, path: &str) -> bool {
        (self.principals.is_empty() || self.principals.iter().any(|p| p == "*" || p == peer))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (self.path_prefixes.is_empty()
                || self.path_prefixes.iter().any(|p| path.starts_with(p.as_str())))
    }
}

/// Whether any rule allows the request; no rules allow everything.
pub fn allowed(rules: &[HttpRule], peer: &str, method: &str, path: &str) -> bool {
    rules.is_empty() || rules.iter().any(|r| r.allows(peer, method, path))
}

/// What the destination service's rules say about one peer and target.
#[derive(Debug, Clone)]
pub struct Decision {
    pub service: Arc<str>,
    /// A rule without methods or paths admits the peer: raw TCP is allowed.
    pub tcp_allowed: bool,
    /// Some rule names the peer (or none restricts principals): its HTTP requests
    /// are checked one by one.
    pub http_possible: bool,
    /// The service's rules (empty: allow all).
    pub rules: Vec<HttpRule>,
}

/// The receiving side's view of one CONNECT: the target must be a workload of this
/// node; the service's authorization rules say what the peer may do.
pub fn decide(
    routes: &RouteStore,
    node: &str,
    peer: &SpiffeId,
    target: SocketAddr,
) -> Result<Decision, String> {
    let table = routes.table();
    for route in table.routes() {
        let Some(ep) = route.endpoints.iter().find(|e| e.addr == target) else { continue };
        if ep.node != node {
            continue;
        }
        let rules: Vec<HttpRule> = route
            .policy
            .as_ref()
            .map(|p| p.authorization.iter().map(HttpRule::from_api).collect())
            .unwrap_or_default();
        let peer_s = peer.to_string();
        let names =
            |r: &HttpRule| r.principals.is_empty() || r.principals.iter().any(|p| p == "*" || *p == peer_s);
        let tcp_allowed = rules.is_empty()
            || rules.iter().any(|r| r.methods.is_empty() && r.path_prefixes.is_empty() && names(r));
        let http_possible = rules.is_empty() || rules.iter().any(names);
        return Ok(Decision { service: route.service.clone(), tcp_allowed, http_possible, rules });
    }
    Err(format!("{target} is not a workload on node {node}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_check_principal_method_and_path_together() {
        let rules = vec![HttpRule {
            principals: vec!["spiffe://td/ns/a/sa/web".into()],
            methods: vec!["GET".into()],
            path_prefixes: vec!["/api/".into()],
        }];
        assert!(allowed(&rules, "spiffe://td/ns/a/sa/web", "get", "/api/items"));
        assert!(!allowed(&rules, "spiffe://td/ns/a/sa/web", "POST", "/api/items"));
        assert!(!allowed(&rules, "spiffe://td/ns/a/sa/web", "GET", "/admin"));
        assert!(!allowed(&rules, "spiffe://td/ns/a/sa/other", "GET", "/api/items"));
        assert!(allowed(&[], "anyone", "DELETE", "/"));
    }
}

//! Authorization on the receiving agent: may this caller reach this workload port
//! at all, as raw TCP, and (for HTTP) with this method and path?
//!
//! **Policy is bound to the workload, not to a service.** A workload port (an
//! endpoint's address and target port, registered on this node) may be listed by
//! several services; then *every* service that lists it must allow the caller (the
//! rules of each service are ORed, the services ANDed). A second service that lists a
//! protected workload with an allow-all policy therefore opens nothing, and which
//! service sorts first does not matter. Likewise the strictest `mtls` mode of the
//! selecting services applies ([`MtlsMode`]).
//!
//! **Principals.** A caller over mutual TLS is its proven SPIFFE ID; a plaintext
//! caller (accepted under `mtls: permissive`) is [`Principal::Unauthenticated`]. A
//! rule with `principals` matches only authenticated callers it names, `*` naming
//! any authenticated caller; a rule without `principals` matches every caller,
//! unauthenticated included. A service without rules allows everything.
//!
//! **Federated callers** (a SPIFFE ID of another trust domain, proven against that
//! domain's roots) are admitted only where a rule names them: by their exact ID, or
//! by `spiffe://<their trust domain>/*`. Neither `*`, nor a rule without
//! `principals`, nor a service without rules lets another cluster in: federating
//! with a cluster opens nothing until a policy says so.
//!
//! Paths are matched after [`path::normalize`], prefixes by whole segments
//! ([`path::prefix_matches`]).

pub mod path;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::discovery::RouteStore;

/// Who is calling, as rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal<'a> {
    /// A peer that proved this SPIFFE ID over mutual TLS.
    Authenticated(&'a str),
    /// A plaintext caller: matched only by rules without `principals`.
    Unauthenticated,
}

impl Principal<'_> {
    /// How it appears in logs and access records.
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Authenticated(id) => id,
            Principal::Unauthenticated => UNAUTHENTICATED,
        }
    }
}

/// The name logs and records give a plaintext caller.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Whether a workload port accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Plaintext is accepted and authorized as [`Principal::Unauthenticated`] (the
    /// mesh default, as Istio's).
    #[default]
    Permissive,
    /// Plaintext is refused: only callers over mutual TLS reach the workload.
    Strict,
}

impl MtlsMode {
    /// The mode a service's policy asks for; unspecified takes `default`.
    pub fn from_api(mode: mesh_api::MtlsMode, default: MtlsMode) -> Self {
        match mode {
            mesh_api::MtlsMode::Unspecified => default,
            mesh_api::MtlsMode::Permissive => MtlsMode::Permissive,
            mesh_api::MtlsMode::Strict => MtlsMode::Strict,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Permissive => "permissive",
            MtlsMode::Strict => "strict",
        }
    }
}

/// One allow rule, as the receiving agent checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpRule {
    pub principals: Vec<String>,
    pub methods: Vec<String>,
    /// Normalised when the rule is built, so they compare with normalised paths.
    pub path_prefixes: Vec<String>,
}

impl HttpRule {
    pub fn from_api(r: &mesh_api::AuthorizationRule) -> Self {
        HttpRule {
            principals: r.principals.clone(),
            methods: r.methods.clone(),
            // A prefix that does not normalise (say, with `%2F`) is kept as written:
            // no normalised path contains it, so the rule matches nothing (fails closed).
            path_prefixes: r
                .path_prefixes
                .iter()
                .map(|p| path::normalize(p).unwrap_or_else(|_| p.clone()))
                .collect(),
        }
    }

    /// Whether the rule names `caller`, where `local` is this mesh's trust domain
    /// (see the module documentation).
    pub fn names(&self, caller: Principal<'_>, local: &str) -> bool {
        match caller {
            Principal::Authenticated(id) => match foreign_domain(id, local) {
                None => self.principals.is_empty() || self.principals.iter().any(|p| p == "*" || p == id),
                Some(domain) => self.principals.iter().any(|p| p == id || names_domain(p, domain)),
            },
            Principal::Unauthenticated => self.principals.is_empty(),
        }
    }

    /// Whether the rule allows `caller` to send `method` to the normalised `path`.
    pub fn allows(&self, caller: Principal<'_>, local: &str, method: &str, path: &str) -> bool {
        self.names(caller, local)
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && (self.path_prefixes.is_empty()
                || self.path_prefixes.iter().any(|p| path::prefix_matches(p, path)))
    }

    /// Whether the rule admits a connection whatever is sent on it: it names the
    /// caller and restricts neither methods nor paths.
    fn allows_tcp(&self, caller: Principal<'_>, local: &str) -> bool {
        self.methods.is_empty() && self.path_prefixes.is_empty() && self.names(caller, local)
    }
}

/// The trust domain of `id` when it is not `local` (a federated caller), else `None`.
/// An ID that does not parse as `spiffe://<domain>/...` counts as foreign with no
/// domain any rule can name, so only its exact ID could admit it.
fn foreign_domain<'a>(id: &'a str, local: &str) -> Option<&'a str> {
    let rest = id.strip_prefix("spiffe://").unwrap_or("");
    match rest.split_once('/') {
        Some((domain, _)) if domain == local => None,
        Some((domain, _)) => Some(domain),
        None => Some(""),
    }
}

/// Whether the rule principal `p` is `spiffe://<domain>/*`, naming every workload of
/// the federated trust `domain`.
fn names_domain(p: &str, domain: &str) -> bool {
    !domain.is_empty()
        && p.strip_prefix("spiffe://").and_then(|r| r.strip_suffix("/*")).is_some_and(|d| d == domain)
}

/// Whether `caller` belongs to another trust domain than `local`.
fn is_foreign(caller: Principal<'_>, local: &str) -> bool {
    matches!(caller, Principal::Authenticated(id) if foreign_domain(id, local).is_some())
}

/// One selecting service's rules (empty: the service allows everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    pub service: Arc<str>,
    pub rules: Vec<HttpRule>,
}

impl ServiceRules {
    /// No rules allow every caller of this trust domain, and no federated one.
    fn open_to(&self, caller: Principal<'_>, local: &str) -> bool {
        self.rules.is_empty() && !is_foreign(caller, local)
    }

    fn allows(&self, caller: Principal<'_>, local: &str, method: &str, path: &str) -> bool {
        self.open_to(caller, local) || self.rules.iter().any(|r| r.allows(caller, local, method, path))
    }

    fn allows_tcp(&self, caller: Principal<'_>, local: &str) -> bool {
        self.open_to(caller, local) || self.rules.iter().any(|r| r.allows_tcp(caller, local))
    }

    fn may_allow_http(&self, caller: Principal<'_>, local: &str) -> bool {
        self.open_to(caller, local) || self.rules.iter().any(|r| r.names(caller, local))
    }
}

/// What the rules of every service selecting one workload port say about one caller.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The selecting service logs and metrics name: the first by name.
    pub service: Arc<str>,
    /// Every selecting service's rules, by service name; all must allow.
    pub policies: Vec<ServiceRules>,
    /// This mesh's trust domain: callers of any other are federated.
    pub local_domain: Arc<str>,
    /// The strictest mode of the selecting services.
    pub mtls: MtlsMode,
    /// Raw TCP is allowed: every service has a rule without methods or paths that
    /// names the caller (or no rules).
    pub tcp_allowed: bool,
    /// Every service has a rule naming the caller (or no rules): its HTTP requests
    /// may be allowed, and are checked one by one.
    pub http_possible: bool,
}

impl Decision {
    /// Whether every selecting service allows the request; `path` is normalised.
    pub fn allows(&self, caller: Principal<'_>, method: &str, path: &str) -> bool {
        self.policies.iter().all(|p| p.allows(caller, &self.local_domain, method, path))
    }

    /// Whether the caller may reach the workload at all (as TCP, or with some request).
    pub fn admits(&self) -> bool {
        self.tcp_allowed || self.http_possible
    }

    /// The selecting services' names, comma-separated, for log lines.
    pub fn services(&self) -> String {
        let names: Vec<&str> = self.policies.iter().map(|p| &*p.service).collect();
        names.join(",")
    }
}

/// The receiving side's view of a caller and a target: the target must be a
/// workload port of this node (an endpoint some service lists with this node);
/// the rules of every service listing it decide.
pub fn decide(
    routes: &RouteStore,
    node: &str,
    caller: Principal<'_>,
    target: SocketAddr,
) -> Result<Decision, String> {
    let table = routes.table();
    let mut selecting: BTreeMap<Arc<str>, (Vec<HttpRule>, MtlsMode)> = BTreeMap::new();
    for (route, _) in table.selecting(target).filter(|(_, ep)| ep.node == node) {
        selecting.entry(route.service.clone()).or_insert_with(|| {
            let rules = route
                .policy
                .as_ref()
                .map(|p| p.authorization.iter().map(HttpRule::from_api).collect())
                .unwrap_or_default();
            (rules, route.mtls)
        });
    }
    let Some(service) = selecting.keys().next().cloned() else {
        return Err(format!("{target} is not a workload on node {node}"));
    };
    let mtls = selecting.values().map(|(_, m)| *m).max().unwrap_or_default();
    let policies: Vec<ServiceRules> =
        selecting.into_iter().map(|(service, (rules, _))| ServiceRules { service, rules }).collect();
    let local = table.trust_domain.as_str();
    let tcp_allowed = policies.iter().all(|p| p.allows_tcp(caller, local));
    let http_possible = policies.iter().all(|p| p.may_allow_http(caller, local));
    Ok(Decision { service, policies, local_domain: local.into(), mtls, tcp_allowed, http_possible })
}

#[cfg(test)]
mod tests;

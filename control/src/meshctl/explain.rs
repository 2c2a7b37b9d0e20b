//! `meshctl explain <source> <destination>`: what the source node's agent would do
//! with a connection, step by step, and what meshctl cannot know from outside.
//!
//! The service lookup uses the control plane's snapshot (VIPs and hostnames; the
//! agents do not report them), the endpoint choice uses the agent's applied routes
//! (what its data path really uses), falling back to the control plane's view.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::{
    error::MeshctlError,
    services::{balancer_name, join_host_port, protocol_name},
    table::{Table, or_dash},
    views::{AgentDump, AgentEndpoint, AuthorizationRule, ControlDump, ServiceView},
};

/// Where the connection goes, as the user gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An IP and port (what an intercepted connect carries).
    Addr(SocketAddr),
    /// A hostname and port (as in SNI or a Host header).
    Host(String, u16),
}

impl Destination {
    /// Parses `ip:port`, `[v6]:port` or `host:port`.
    pub fn parse(s: &str) -> Result<Self, MeshctlError> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let bad = || {
            MeshctlError::Usage(format!(
                "destination {s:?} must be ip:port, [ipv6]:port or host:port (e.g. 10.96.0.10:80 or \
                 reviews.default.svc.cluster.local:9080)"
            ))
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(':') || port == 0 {
            return Err(bad());
        }
        Ok(Self::Host(host.trim_end_matches('.').to_ascii_lowercase(), port))
    }

    fn port(&self) -> u16 {
        match self {
            Self::Addr(a) => a.port(),
            Self::Host(_, p) => *p,
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// What the agent would do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A service port: one of the candidates is picked.
    Balanced,
    /// No healthy endpoint: the agent resets the connection.
    Refused,
    /// Not a service address: forwarded to the original destination unchanged.
    Passthrough,
    /// meshctl lacks the data to say.
    Unknown,
}

impl Outcome {
    /// The lowercase word the human output uses.
    pub fn word(self) -> &'static str {
        match self {
            Self::Balanced => "balanced",
            Self::Refused => "refused",
            Self::Passthrough => "passthrough",
            Self::Unknown => "unknown",
        }
    }
}

/// One endpoint and whether the balancer may pick it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointVerdict {
    pub addr: String,
    pub candidate: bool,
    /// Why it is not a candidate.
    pub excluded_because: Option<String>,
    pub identity: String,
    pub node: String,
    /// The destination node's agent (mTLS), or `None` for endpoints outside the mesh.
    pub agent_address: Option<String>,
}

/// The authorization step.
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizationVerdict {
    /// "allowed", "denied", "conditional" or "unknown".
    pub decision: &'static str,
    pub reason: String,
    pub rules: Vec<AuthorizationRule>,
}

/// The whole explanation (`-o json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub source: IpAddr,
    pub destination: String,
    /// The agent whose routes were used (the source's node agent).
    pub agent: String,
    pub agent_version: Option<u64>,
    pub control_version: Option<u64>,
    /// The registry identity of the source IP, when it is a known endpoint.
    pub source_identity: Option<String>,
    pub source_service: Option<String>,
    /// `namespace/name` of the destination service.
    pub service: Option<String>,
    pub matched_by: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    pub outcome: Outcome,
    pub summary: String,
    /// Balancer the service's policy names.
    pub balancer: Option<String>,
    /// Where the endpoint list came from: "agent" or "control plane".
    pub endpoints_from: Option<&'static str>,
    pub endpoints: Vec<EndpointVerdict>,
    pub candidates: Vec<String>,
    pub authorization: Option<AuthorizationVerdict>,
    /// What meshctl cannot know from the admin data.
    pub unknowns: Vec<String>,
}

/// Normalises v4-mapped IPv6 to IPv4, as the agent does before its lookup.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn find_service<'a>(
    services: &'a [ServiceView],
    dst: &Destination,
) -> Option<(&'a ServiceView, String, Option<&'a super::views::PortView>)> {
    let port = dst.port();
    services.iter().find_map(|s| {
        let by = match dst {
            Destination::Addr(a) => {
                let ip = canonical(a.ip());
                let is = |v: &String| v.parse::<IpAddr>().is_ok_and(|v| canonical(v) == ip);
                let addr = join_host_port(&ip.to_string(), u32::from(port));
                if s.vips.iter().any(is) {
                    format!("VIP {addr}")
                } else if s.allocated_vips.iter().any(is) {
                    format!("VIP {addr} (allocated for its hostnames)")
                } else {
                    return None;
                }
            }
            // A workload resolves the name through its agent's DNS, which answers the
            // service's VIPs, and connects to one: the connection is routed by VIP.
            Destination::Host(h, _) => {
                s.hostnames.iter().any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(h)).then(
                    || match s.vips.first().or(s.allocated_vips.first()) {
                        Some(vip) => format!(
                            "hostname {h}, which the agent's DNS answers with VIP {}",
                            join_host_port(vip, u32::from(port))
                        ),
                        None => format!("hostname {h}"),
                    },
                )?
            }
        };
        Some((s, by, s.ports.iter().find(|p| p.port == u32::from(port))))
    })
}

/// The service whose endpoint has address `ip`, and that endpoint's identity.
fn owner_of(services: &[ServiceView], ip: IpAddr) -> Option<(String, String)> {
    let ip = canonical(ip);
    services.iter().find_map(|s| {
        s.endpoints
            .iter()
            .find(|e| e.address.parse::<IpAddr>().is_ok_and(|a| canonical(a) == ip))
            .map(|e| (s.key(), e.identity.clone()))
    })
}

/// The service with an endpoint at exactly `addr`: its IP, and its port (an endpoint
/// without one serves the service's target ports).
fn endpoint_at(services: &[ServiceView], addr: SocketAddr) -> Option<String> {
    let (ip, port) = (canonical(addr.ip()), u32::from(addr.port()));
    services.iter().find_map(|s| {
        s.endpoints
            .iter()
            .filter(|e| e.address.parse::<IpAddr>().is_ok_and(|a| canonical(a) == ip))
            .any(|e| {
                if e.port != 0 {
                    e.port == port
                } else {
                    s.ports.iter().any(|p| if p.target_port != 0 { p.target_port } else { p.port } == port)
                }
            })
            .then(|| s.key())
    })
}

fn agent_verdict(e: &AgentEndpoint) -> EndpointVerdict {
    let eligible = e.eligible();
    EndpointVerdict {
        addr: e.addr.clone(),
        candidate: eligible.is_ok(),
        excluded_because: eligible.err(),
        identity: e.identity.clone(),
        node: e.node.clone(),
        agent_address: e.agent_address.clone().filter(|a| !a.is_empty()),
    }
}

fn control_verdicts(s: &ServiceView, port: &super::views::PortView) -> Vec<EndpointVerdict> {
    let target = if port.target_port != 0 { port.target_port } else { port.port };
    s.endpoints
        .iter()
        .map(|e| {
            let excluded = if !e.healthy() {
                Some(if e.health_reason.is_empty() {
                    "unhealthy".into()
                } else {
                    format!("unhealthy: {}", e.health_reason)
                })
            } else if e.weight == 0 {
                Some("weight 0".into())
            } else {
                None
            };
            EndpointVerdict {
                addr: join_host_port(&e.address, if e.port != 0 { e.port } else { target }),
                candidate: excluded.is_none(),
                excluded_because: excluded,
                identity: e.identity.clone(),
                node: e.node.clone(),
                agent_address: (!e.agent_address.is_empty()).then(|| e.agent_address.clone()),
            }
        })
        .collect()
}

/// As the agent matches: no principals is any caller, `*` any authenticated one.
fn principal_matches(rule: &AuthorizationRule, identity: &str) -> bool {
    rule.principals.is_empty() || rule.principals.iter().any(|p| p == "*" || p == identity)
}

/// Decides the authorization step for a caller with `identity` (if known).
pub fn authorize(rules: Option<&[AuthorizationRule]>, identity: Option<&str>) -> AuthorizationVerdict {
    let verdict = |decision, reason: String, rules: &[AuthorizationRule]| AuthorizationVerdict {
        decision,
        reason,
        rules: rules.to_vec(),
    };
    let Some(rules) = rules else {
        return verdict(
            "unknown",
            "the control plane does not report this service's authorization rules".into(),
            &[],
        );
    };
    if rules.is_empty() {
        return verdict(
            "allowed",
            "the service has no authorization rules: any peer is allowed".into(),
            rules,
        );
    }
    let Some(identity) = identity.filter(|i| !i.is_empty()) else {
        return verdict(
            "unknown",
            "the service has allow rules and the source's identity is unknown (its IP is not a registered \
             endpoint with an identity)"
                .into(),
            rules,
        );
    };
    let mut conditional = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if !principal_matches(r, identity) {
            continue;
        }
        if r.methods.is_empty() && r.path_prefixes.is_empty() {
            let who = match r.principals.as_slice() {
                [] => "any caller",
                p if p.iter().any(|p| p == "*") => "any authenticated peer",
                _ => identity,
            };
            return verdict("allowed", format!("rule {} allows {who}", i + 1), rules);
        }
        let mut cond = Vec::new();
        if !r.methods.is_empty() {
            cond.push(format!("methods {}", r.methods.join(",")));
        }
        if !r.path_prefixes.is_empty() {
            cond.push(format!("paths under {}", r.path_prefixes.join(",")));
        }
        conditional.push(format!("rule {}: {}", i + 1, cond.join(" and ")));
    }
    if conditional.is_empty() {
        verdict("denied", format!("no rule allows {identity}"), rules)
    } else {
        verdict(
            "conditional",
            format!("{identity} is allowed only for HTTP requests matching {}", conditional.join("; ")),
            rules,
        )
    }
}

/// Explains a connection from `source` to `dst` with what could be fetched; the
/// errors say why a view is missing.
pub fn explain(
    source: IpAddr,
    dst: &Destination,
    agent_url: &str,
    agent: Result<&AgentDump, String>,
    control: Result<&ControlDump, String>,
) -> Explanation {
    let mut x = Explanation {
        source,
        destination: dst.to_string(),
        agent: agent_url.to_owned(),
        agent_version: agent.as_ref().ok().map(|a| a.discovery.applied_version),
        control_version: control.as_ref().ok().map(|c| c.version),
        source_identity: None,
        source_service: None,
        service: None,
        matched_by: None,
        port: None,
        protocol: None,
        outcome: Outcome::Unknown,
        summary: String::new(),
        balancer: None,
        endpoints_from: None,
        endpoints: Vec::new(),
        candidates: Vec::new(),
        authorization: None,
        unknowns: Vec::new(),
    };
    if let Err(e) = &agent {
        x.unknowns.push(format!("the agent's applied routes (using the control plane's view instead): {e}"));
    }
    let services = match &control {
        Ok(c) => c.services(),
        Err(e) => {
            x.unknowns.push(format!(
                "which service {dst} belongs to: that needs the control plane's VIPs and hostnames: {e}"
            ));
            x.summary = "cannot map the destination to a service without the control plane".into();
            return x;
        }
    };
    if let Some((svc, identity)) = owner_of(services, source) {
        x.source_service = Some(svc);
        x.source_identity = (!identity.is_empty()).then_some(identity);
    }
    let Some((service, by, port)) = find_service(services, dst) else {
        x.outcome = Outcome::Passthrough;
        x.summary = match dst {
            Destination::Addr(a) => match (endpoint_at(services, *a), owner_of(services, a.ip())) {
                (Some(svc), _) => format!(
                    "{a} is an endpoint of {svc} addressed directly, not a service address: the agent \
                     forwards it to that address unchanged, without balancing"
                ),
                (None, Some((svc, _))) => format!(
                    "{a} is on the address of an endpoint of {svc}, but port {} is not one it serves: \
                     not a service address, the agent forwards it unchanged",
                    a.port()
                ),
                (None, None) => {
                    format!("{a} is not a service address in the mesh: the agent forwards it unchanged")
                }
            },
            Destination::Host(h, _) => format!(
                "no service has the hostname {h}: the agent's DNS forwards the query to the node's resolver, \
                 and a connection to the address it answers is forwarded unchanged (unless that address is a \
                 service's)"
            ),
        };
        return x;
    };
    x.service = Some(service.key());
    x.matched_by = Some(by);
    if matches!(dst, Destination::Host(..)) && service.vips.is_empty() && service.allocated_vips.is_empty() {
        (x.outcome, x.summary) = if service.headless {
            (
                Outcome::Unknown,
                format!(
                    "{} is headless: the agent's DNS leaves the name to the node's resolver, which answers with \
                     the endpoints' own addresses; a connection to one of them goes to that endpoint (explain \
                     ADDRESS:PORT for one)",
                    service.key()
                ),
            )
        } else {
            (
                Outcome::Refused,
                format!(
                    "{} has the hostname but no VIP (none in the registry, and --dns-vip-range is off or full): \
                     the agent's DNS leaves the name to the node's resolver, which has no address of the \
                     service's for it",
                    service.key()
                ),
            )
        };
        return x;
    }
    x.balancer = Some(balancer_name(&service.load_balancer));
    let Some(port) = port else {
        let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
        x.outcome = Outcome::Passthrough;
        x.summary = format!(
            "{} has no port {} (ports: {}): the agent forwards the connection unchanged",
            service.key(),
            dst.port(),
            or_dash(&ports.join(", "))
        );
        return x;
    };
    x.port = Some(dst.port());
    x.protocol = Some(protocol_name(&port.protocol));
    let agent_route = agent
        .as_ref()
        .ok()
        .and_then(|a| a.routes.iter().find(|r| r.service == service.key() && r.port == dst.port()));
    match (&agent, agent_route) {
        (Ok(_), Some(route)) => {
            x.endpoints_from = Some("agent");
            x.endpoints = route.endpoints.iter().map(agent_verdict).collect();
        }
        (Ok(a), None) => {
            x.outcome = Outcome::Passthrough;
            x.summary = format!(
                "the agent has no route for {}:{} yet (it applied version {}, the control plane holds {}): it \
                 forwards the connection unchanged until it applies a snapshot with it",
                service.key(),
                dst.port(),
                a.discovery.applied_version,
                x.control_version.unwrap_or_default()
            );
            return x;
        }
        (Err(_), _) => {
            x.endpoints_from = Some("control plane");
            x.endpoints = control_verdicts(service, port);
        }
    }
    x.candidates = x.endpoints.iter().filter(|e| e.candidate).map(|e| e.addr.clone()).collect();
    let balancer = x.balancer.clone().unwrap_or_default();
    if x.candidates.is_empty() {
        x.outcome = Outcome::Refused;
        x.summary = format!(
            "{} has no usable endpoint ({} listed): the agent resets the connection",
            service.key(),
            x.endpoints.len()
        );
    } else {
        x.outcome = Outcome::Balanced;
        x.summary = format!(
            "{} picks one of {} candidate{} ({balancer})",
            service.key(),
            x.candidates.len(),
            if x.candidates.len() == 1 { "" } else { "s" }
        );
        x.unknowns.push(format!(
            "which candidate the next connection gets: that is the {balancer} balancer's state inside the agent"
        ));
    }
    if !x.endpoints.iter().any(|e| e.agent_address.is_some() && e.candidate) && x.outcome == Outcome::Balanced
    {
        x.unknowns
            .push("nothing about identity: every candidate is outside the mesh (plain TCP, no mTLS)".into());
    }
    let agent_routes_have_authz = agent_route.and_then(|r| r.authorization.as_deref());
    let rules = agent_routes_have_authz.or(service.authorization.as_deref());
    x.authorization = Some(authorize(rules, x.source_identity.as_deref()));
    if x.source_identity.is_some() {
        x.unknowns.push(
            "the source's identity is the registry's for that IP, not checked against a certificate".into(),
        );
    }
    x.unknowns.push(
        "whether the source is intercepted at all: only enrolled cgroups (eBPF) or pods with the rules \
         (iptables) are; meshctl cannot map an IP to a cgroup"
            .into(),
    );
    if !agent.as_ref().is_ok_and(|a| a.routes.iter().flat_map(|r| &r.endpoints).any(|e| e.breaker.is_some()))
    {
        x.unknowns.push("circuit-breaker and outlier-ejection state: not reported by the agent".into());
    }
    x
}

/// The human form.
pub fn render(x: &Explanation) -> String {
    let mut out = String::new();
    let versions = match (x.agent_version, x.control_version) {
        (Some(a), Some(c)) if a == c => format!("version {a}"),
        (Some(a), Some(c)) => format!("agent at version {a}, control plane at {c}"),
        (Some(a), None) => format!("agent at version {a}"),
        (None, Some(c)) => format!("control plane at version {c}"),
        (None, None) => "no versions known".into(),
    };
    let _ = writeln!(out, "{} -> {}  (agent {}, {versions})\n", x.source, x.destination, x.agent);
    let source = match (&x.source_service, &x.source_identity) {
        (Some(s), Some(id)) => format!("endpoint of {s}, identity {id}"),
        (Some(s), None) => format!("endpoint of {s}, no identity registered"),
        _ => "not a registered endpoint: identity unknown".into(),
    };
    let _ = writeln!(out, "source       {source}");
    if let (Some(s), Some(by)) = (&x.service, &x.matched_by) {
        let port = x.port.map(|p| format!(" port {p}")).unwrap_or_default();
        let proto = x.protocol.as_ref().map(|p| format!(" ({p})")).unwrap_or_default();
        let _ = writeln!(out, "service      {s}{port}{proto}, matched by {by}");
    }
    let _ = writeln!(out, "outcome      {}: {}", x.outcome.word(), x.summary);
    if !x.endpoints.is_empty() {
        let _ = writeln!(out, "\nendpoints (from the {}):", x.endpoints_from.unwrap_or("agent"));
        let mut t = Table::new(["ENDPOINT", "CANDIDATE", "IDENTITY", "NODE", "TRANSPORT"]);
        for e in &x.endpoints {
            t.row(vec![
                e.addr.clone(),
                match &e.excluded_because {
                    None => "yes".into(),
                    Some(why) => format!("no: {why}"),
                },
                or_dash(&e.identity),
                or_dash(&e.node),
                match &e.agent_address {
                    Some(a) => format!("mTLS via agent {a}"),
                    None => "plain TCP (outside the mesh)".into(),
                },
            ]);
        }
        out.push_str(&t.render());
    }
    if let Some(a) = &x.authorization {
        let _ = writeln!(out, "\nauthorization  {}: {}", a.decision, a.reason);
        for (i, r) in a.rules.iter().enumerate() {
            let list = |v: &[String], any: &str| if v.is_empty() { any.to_owned() } else { v.join(",") };
            let _ = writeln!(
                out,
                "  rule {}: principals {}; methods {}; paths {}",
                i + 1,
                list(&r.principals, "any caller"),
                list(&r.methods, "any"),
                list(&r.path_prefixes, "any")
            );
        }
    }
    if !x.unknowns.is_empty() {
        out.push_str("\nmeshctl cannot know:\n");
        for u in &x.unknowns {
            let _ = writeln!(out, "  - {u}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshctl::fixtures;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn run(src: &str, dst: &str) -> Explanation {
        let (a, c) = (fixtures::agent_dump(), fixtures::control_dump());
        explain(ip(src), &Destination::parse(dst).unwrap(), "http://node-a:15000", Ok(&a), Ok(&c))
    }

    #[test]
    fn destinations_parse_or_say_the_expected_form() {
        assert_eq!(
            Destination::parse("10.0.0.1:80").unwrap(),
            Destination::Addr("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            Destination::parse("Reviews.Default.svc.cluster.local.:9080").unwrap(),
            Destination::Host("reviews.default.svc.cluster.local".into(), 9080)
        );
        for bad in ["10.0.0.1", "host:", "host:99999", "::1:80"] {
            let e = Destination::parse(bad).unwrap_err().to_string();
            assert!(e.contains("must be ip:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn vip_destination_is_balanced_over_healthy_weighted_endpoints_and_authorized() {
        let x = run("10.1.0.9", "10.96.0.10:9080");
        assert_eq!(x.service.as_deref(), Some("default/reviews"));
        assert_eq!(x.matched_by.as_deref(), Some("VIP 10.96.0.10:9080"));
        assert_eq!(x.outcome, Outcome::Balanced);
        assert_eq!(x.candidates, vec!["10.1.0.5:9080"]);
        assert_eq!(x.endpoints[1].excluded_because.as_deref(), Some("unhealthy: not ready"));
        assert_eq!(x.endpoints[2].excluded_because.as_deref(), Some("weight 0"));
        assert_eq!(x.source_identity.as_deref(), Some("spiffe://cluster.local/ns/default/sa/productpage"));
        let authz = x.authorization.unwrap();
        assert_eq!(
            (authz.decision, authz.reason.as_str()),
            ("allowed", "rule 1 allows spiffe://cluster.local/ns/default/sa/productpage")
        );
    }

    #[test]
    fn unknown_source_cannot_be_authorized_against_allow_rules() {
        let x = run("10.9.9.9", "reviews.default.svc.cluster.local:9080");
        assert_eq!(
            x.matched_by.as_deref(),
            Some(
                "hostname reviews.default.svc.cluster.local, which the agent's DNS answers with VIP 10.96.0.10:9080"
            )
        );
        assert_eq!(x.authorization.unwrap().decision, "unknown");
    }

    /// A hostname is explained as the data path serves it: the agent's DNS answers a
    /// VIP (the registry's, else the allocated one) and the connection is routed by it.
    #[test]
    fn hostnames_explain_the_vip_the_agents_dns_answers() {
        let a = fixtures::agent_dump();
        let mut c = fixtures::control_dump();
        let reviews = &mut c.snapshot.as_mut().unwrap().services[0];
        reviews.vips.clear();
        reviews.allocated_vips = vec!["240.240.7.9".into()];
        let by_name = explain(
            ip("10.1.0.9"),
            &Destination::parse("reviews.default.svc.cluster.local:9080").unwrap(),
            "a",
            Ok(&a),
            Ok(&c),
        );
        assert_eq!(by_name.outcome, Outcome::Balanced);
        assert!(by_name.matched_by.as_deref().unwrap().ends_with("answers with VIP 240.240.7.9:9080"));
        let by_vip =
            explain(ip("10.1.0.9"), &Destination::parse("240.240.7.9:9080").unwrap(), "a", Ok(&a), Ok(&c));
        assert_eq!(by_vip.outcome, Outcome::Balanced);
        assert_eq!(by_vip.matched_by.as_deref(), Some("VIP 240.240.7.9:9080 (allocated for its hostnames)"));
        assert_eq!(by_vip.candidates, by_name.candidates);

        let reviews = &mut c.snapshot.as_mut().unwrap().services[0];
        reviews.allocated_vips.clear();
        let x = explain(
            ip("10.1.0.9"),
            &Destination::parse("reviews.default.svc.cluster.local:9080").unwrap(),
            "a",
            Ok(&a),
            Ok(&c),
        );
        assert_eq!(x.outcome, Outcome::Refused);
        assert!(x.summary.contains("no VIP"), "{}", x.summary);
        c.snapshot.as_mut().unwrap().services[0].headless = true;
        let x = explain(
            ip("10.1.0.9"),
            &Destination::parse("reviews.default.svc.cluster.local:9080").unwrap(),
            "a",
            Ok(&a),
            Ok(&c),
        );
        assert_eq!(x.outcome, Outcome::Unknown);
        assert!(
            x.summary.contains("headless") && x.summary.contains("endpoints' own addresses"),
            "{}",
            x.summary
        );
        let unknown = run("10.1.0.9", "elsewhere.example.com:443");
        assert!(unknown.summary.contains("forwards the query to the node's resolver"), "{}", unknown.summary);
    }

    #[test]
    fn non_service_addresses_pass_through() {
        assert_eq!(run("10.1.0.9", "10.1.0.5:9080").outcome, Outcome::Passthrough);
        assert!(
            run("10.1.0.9", "10.1.0.5:9080")
                .summary
                .contains("endpoint of default/reviews addressed directly")
        );
        // The endpoint's IP on a port it does not serve is not that endpoint.
        let other_port = run("10.1.0.9", "10.1.0.5:9999");
        assert_eq!(other_port.outcome, Outcome::Passthrough);
        assert!(
            other_port
                .summary
                .contains("address of an endpoint of default/reviews, but port 9999 is not one"),
            "{}",
            other_port.summary
        );
        assert!(run("10.1.0.9", "10.96.0.10:81").summary.contains("has no port 81 (ports: 9080)"));
        assert!(run("10.1.0.9", "8.8.8.8:53").summary.contains("not a service address"));
    }

    #[test]
    fn no_usable_endpoint_means_refused() {
        let mut a = fixtures::agent_dump();
        a.routes[0].endpoints[0].healthy = false;
        let c = fixtures::control_dump();
        let x = explain(ip("10.1.0.9"), &Destination::parse("10.96.0.10:9080").unwrap(), "a", Ok(&a), Ok(&c));
        assert_eq!(x.outcome, Outcome::Refused);
        assert!(x.summary.contains("resets the connection"), "{}", x.summary);
    }

    #[test]
    fn missing_agent_route_is_reported_with_both_versions() {
        let mut a = fixtures::agent_dump();
        a.routes.retain(|r| r.service != "default/reviews");
        a.discovery.applied_version = 41;
        let c = fixtures::control_dump();
        let x = explain(ip("10.1.0.9"), &Destination::parse("10.96.0.10:9080").unwrap(), "a", Ok(&a), Ok(&c));
        assert_eq!(x.outcome, Outcome::Passthrough);
        assert!(x.summary.contains("applied version 41, the control plane holds 42"), "{}", x.summary);
    }

    #[test]
    fn without_the_agent_the_control_plane_view_is_used_and_said_so() {
        let c = fixtures::control_dump();
        let x = explain(
            ip("10.1.0.9"),
            &Destination::parse("10.96.0.10:9080").unwrap(),
            "a",
            Err("refused".into()),
            Ok(&c),
        );
        assert_eq!(x.endpoints_from, Some("control plane"));
        assert_eq!(x.candidates, vec!["10.1.0.5:9080"]);
        assert!(x.unknowns[0].contains("the agent's applied routes"), "{:?}", x.unknowns);
    }

    #[test]
    fn without_the_control_plane_the_service_is_unknown() {
        let a = fixtures::agent_dump();
        let x = explain(
            ip("10.1.0.9"),
            &Destination::parse("10.96.0.10:9080").unwrap(),
            "a",
            Ok(&a),
            Err("connection refused".into()),
        );
        assert_eq!(x.outcome, Outcome::Unknown);
        assert!(x.unknowns[0].contains("needs the control plane's VIPs"), "{:?}", x.unknowns);
    }

    #[test]
    fn authorization_decisions() {
        let rule = |p: &[&str], m: &[&str]| AuthorizationRule {
            principals: p.iter().map(|s| s.to_string()).collect(),
            methods: m.iter().map(|s| s.to_string()).collect(),
            path_prefixes: vec![],
        };
        assert_eq!(authorize(None, Some("id")).decision, "unknown");
        assert_eq!(authorize(Some(&[]), None).decision, "allowed");
        assert_eq!(authorize(Some(&[rule(&["other"], &[])]), Some("id")).decision, "denied");
        let cond = authorize(Some(&[rule(&["id"], &["GET"])]), Some("id"));
        assert_eq!(
            (cond.decision, cond.reason.as_str()),
            ("conditional", "id is allowed only for HTTP requests matching rule 1: methods GET")
        );
        assert_eq!(authorize(Some(&[rule(&[], &[])]), Some("id")).reason, "rule 1 allows any caller");
        assert_eq!(
            authorize(Some(&[rule(&["*"], &[])]), Some("id")).reason,
            "rule 1 allows any authenticated peer"
        );
    }

    #[test]
    fn human_explanation_reads_top_to_bottom() {
        let text = render(&run("10.1.0.9", "10.96.0.10:9080"));
        let expected_start = "\
10.1.0.9 -> 10.96.0.10:9080  (agent http://node-a:15000, version 42)

source       endpoint of default/productpage, identity spiffe://cluster.local/ns/default/sa/productpage
service      default/reviews port 9080 (http1), matched by VIP 10.96.0.10:9080
outcome      balanced: default/reviews picks one of 1 candidate (least-request)

endpoints (from the agent):
ENDPOINT       CANDIDATE                 IDENTITY                                      NODE    TRANSPORT
10.1.0.5:9080  yes                       spiffe://cluster.local/ns/default/sa/reviews  node-a  mTLS via agent 192.168.0.1:15008
10.1.0.6:9080  no: unhealthy: not ready  spiffe://cluster.local/ns/default/sa/reviews  node-b  mTLS via agent 192.168.0.2:15008
10.1.0.7:9080  no: weight 0              -                                             -       plain TCP (outside the mesh)

authorization  allowed: rule 1 allows spiffe://cluster.local/ns/default/sa/productpage
  rule 1: principals spiffe://cluster.local/ns/default/sa/productpage; methods any; paths any

meshctl cannot know:
";
        assert!(text.starts_with(expected_start), "\n{text}");
        assert!(text.contains("  - which candidate the next connection gets"), "{text}");
    }
}

use mesh_api as api;

use super::*;
use crate::discovery::table::RouteTable;

const FRONTEND: &str = "spiffe://td/ns/shop/sa/frontend";
const OTHER: &str = "spiffe://td/ns/shop/sa/other";

fn rule(principals: &[&str], methods: &[&str], path_prefixes: &[&str]) -> api::AuthorizationRule {
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
    api::AuthorizationRule {
        principals: strings(principals),
        methods: strings(methods),
        path_prefixes: strings(path_prefixes),
    }
}

/// A service `name` listing `address:8080` on node `server`, with these rules.
fn service(name: &str, address: &str, rules: Vec<api::AuthorizationRule>) -> api::Service {
    api::Service {
        name: name.into(),
        namespace: "shop".into(),
        ports: vec![api::ServicePort { port: 80, target_port: 8080, ..Default::default() }],
        policy: (!rules.is_empty()).then(|| api::Policy { authorization: rules, ..Default::default() }),
        endpoints: vec![api::Endpoint {
            address: address.into(),
            node: "server".into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn store(services: Vec<api::Service>) -> RouteStore {
    let routes = RouteStore::new(true);
    let snapshot = api::Snapshot { services, trust_domain: "td".into(), ..Default::default() };
    routes.apply(RouteTable::build(1, &snapshot, 100).unwrap());
    routes
}

fn target() -> SocketAddr {
    "10.77.0.3:8080".parse().unwrap()
}

#[test]
fn rules_check_principal_method_and_path_together() {
    let routes = store(vec![service("api", "10.77.0.3", vec![rule(&[FRONTEND], &["GET"], &["/api/"])])]);
    let d = decide(&routes, "server", Principal::Authenticated(FRONTEND), target()).unwrap();
    let frontend = Principal::Authenticated(FRONTEND);
    assert!(d.allows(frontend, "get", "/api/items"));
    assert!(!d.allows(frontend, "POST", "/api/items"));
    assert!(!d.allows(frontend, "GET", "/admin"));
    assert!(!d.allows(Principal::Authenticated(OTHER), "GET", "/api/items"));
    assert!(!d.tcp_allowed, "a rule with methods or paths admits only HTTP");
    assert!(d.http_possible);
    let d = decide(&routes, "server", Principal::Authenticated(OTHER), target()).unwrap();
    assert!(!d.admits(), "a peer no rule names is refused outright");
}

/// A second service listing the protected workload with an allow-all policy opens
/// nothing: both services' rules must allow, whatever their names' order.
#[test]
fn every_service_selecting_a_workload_must_allow() {
    for shadow_name in ["aaa-shadow", "zzz-shadow"] {
        let routes = store(vec![
            service("api", "10.77.0.3", vec![rule(&[FRONTEND], &[], &["/public/"])]),
            service(shadow_name, "10.77.0.3", vec![]),
        ]);
        let other = Principal::Authenticated(OTHER);
        let d = decide(&routes, "server", other, target()).unwrap();
        assert!(!d.admits(), "{shadow_name}: the shadow service opened the workload to {OTHER}");
        assert!(!d.allows(other, "GET", "/public/x"));
        let want = if shadow_name < "api" { "shop/aaa-shadow,shop/api" } else { "shop/api,shop/zzz-shadow" };
        assert_eq!(d.services(), want);

        let frontend = Principal::Authenticated(FRONTEND);
        let d = decide(&routes, "server", frontend, target()).unwrap();
        assert!(d.allows(frontend, "GET", "/public/x"));
        assert!(!d.allows(frontend, "GET", "/secret"), "{shadow_name}: the shadow widened the paths");
        assert!(!d.tcp_allowed);
    }
    // Two restrictive services: only what both allow.
    let routes = store(vec![
        service("a", "10.77.0.3", vec![rule(&[FRONTEND, OTHER], &[], &["/x"])]),
        service("b", "10.77.0.3", vec![rule(&[FRONTEND], &[], &[])]),
    ]);
    let d = decide(&routes, "server", Principal::Authenticated(OTHER), target()).unwrap();
    assert!(!d.allows(Principal::Authenticated(OTHER), "GET", "/x"));
    let d = decide(&routes, "server", Principal::Authenticated(FRONTEND), target()).unwrap();
    assert!(d.allows(Principal::Authenticated(FRONTEND), "GET", "/x"));
    assert!(!d.allows(Principal::Authenticated(FRONTEND), "GET", "/y"));
}

#[test]
fn unauthenticated_callers_match_only_rules_without_principals() {
    let plain = Principal::Unauthenticated;
    for (rules, admitted) in [
        (vec![], true),
        (vec![rule(&[], &[], &[])], true),
        (vec![rule(&["*"], &[], &[])], false),
        (vec![rule(&[FRONTEND], &[], &[])], false),
        (vec![rule(&["*"], &[], &[]), rule(&[], &["GET"], &[])], true),
    ] {
        let routes = store(vec![service("api", "10.77.0.3", rules.clone())]);
        let d = decide(&routes, "server", plain, target()).unwrap();
        assert_eq!(d.allows(plain, "GET", "/"), admitted, "{rules:?}");
        // "*" still means any authenticated peer.
        let peer = Principal::Authenticated(OTHER);
        let d = decide(&routes, "server", peer, target()).unwrap();
        let star = rules.iter().any(|r| r.principals == ["*"]);
        if star {
            assert!(d.allows(peer, "GET", "/"), "{rules:?}");
        }
    }
}

#[test]
fn only_workload_ports_of_this_node_are_targets() {
    let routes = store(vec![service("api", "10.77.0.3", vec![])]);
    let peer = Principal::Authenticated(FRONTEND);
    assert!(decide(&routes, "server", peer, target()).is_ok());
    assert!(decide(&routes, "other-node", peer, target()).is_err(), "registered on another node");
    assert!(decide(&routes, "server", peer, "10.77.0.3:22".parse().unwrap()).is_err(), "not a listed port");
    assert!(decide(&routes, "server", peer, "10.77.0.9:8080".parse().unwrap()).is_err());
}

#[test]
fn prefixes_in_rules_match_normalised_paths_by_whole_segments() {
    let routes = store(vec![service("api", "10.77.0.3", vec![rule(&[], &[], &["/api", "/static//files/"])])]);
    let p = Principal::Unauthenticated;
    let d = decide(&routes, "server", p, target()).unwrap();
    assert!(d.allows(p, "GET", "/api"));
    assert!(d.allows(p, "GET", "/api/v1"));
    assert!(!d.allows(p, "GET", "/api-internal"));
    // The rule's prefix is normalised too.
    assert!(d.allows(p, "GET", "/static/files/a.css"));
}

#[test]
fn the_strictest_mtls_mode_of_the_selecting_services_applies() {
    let strict = |mut s: api::Service| {
        s.policy.get_or_insert_with(Default::default).mtls = api::MtlsMode::Strict as i32;
        s
    };
    let p = Principal::Unauthenticated;
    let routes = store(vec![service("api", "10.77.0.3", vec![])]);
    assert_eq!(decide(&routes, "server", p, target()).unwrap().mtls, MtlsMode::Permissive, "the default");
    let routes = store(vec![service("api", "10.77.0.3", vec![]), strict(service("b", "10.77.0.3", vec![]))]);
    assert_eq!(decide(&routes, "server", p, target()).unwrap().mtls, MtlsMode::Strict);
    // The snapshot's mesh-wide default applies where a service does not say.
    let routes = RouteStore::new(true);
    let snapshot = api::Snapshot {
        services: vec![service("api", "10.77.0.3", vec![])],
        default_mtls: api::MtlsMode::Strict as i32,
        ..Default::default()
    };
    routes.apply(RouteTable::build(1, &snapshot, 100).unwrap());
    assert_eq!(decide(&routes, "server", p, target()).unwrap().mtls, MtlsMode::Strict);
}

/// A caller of a federated trust domain gets in only where a rule names it, by ID or
/// by `spiffe://<its domain>/*`: an open service, `*` and rules without principals
/// admit this mesh's callers, not another cluster's.
#[test]
fn federated_callers_are_admitted_only_by_rules_naming_them() {
    const REMOTE: &str = "spiffe://east.example/ns/shop/sa/frontend";
    let remote = Principal::Authenticated(REMOTE);
    let local = Principal::Authenticated(FRONTEND);
    for (rules, admitted) in [
        (vec![], false),
        (vec![rule(&[], &[], &[])], false),
        (vec![rule(&["*"], &[], &[])], false),
        (vec![rule(&[FRONTEND], &[], &[])], false),
        (vec![rule(&["spiffe://east.example/ns/shop/sa/other"], &[], &[])], false),
        (vec![rule(&["spiffe://west.example/*"], &[], &[])], false),
        // A domain wildcard is only `spiffe://<domain>/*`, not a prefix of the ID.
        (vec![rule(&["spiffe://east.example/ns/*"], &[], &[])], false),
        (vec![rule(&["spiffe://east/*"], &[], &[])], false),
        (vec![rule(&[REMOTE], &[], &[])], true),
        (vec![rule(&["spiffe://east.example/*"], &[], &[])], true),
        (vec![rule(&["*"], &[], &[]), rule(&[REMOTE], &[], &[])], true),
    ] {
        let routes = store(vec![service("api", "10.77.0.3", rules.clone())]);
        let d = decide(&routes, "server", remote, target()).unwrap();
        assert_eq!(d.admits(), admitted, "{rules:?}");
        assert_eq!(d.allows(remote, "GET", "/"), admitted, "{rules:?}");
        // This mesh's callers are unaffected by the federation rules.
        let d = decide(&routes, "server", local, target()).unwrap();
        let names_local = rules.is_empty()
            || rules
                .iter()
                .any(|r| r.principals.is_empty() || r.principals.iter().any(|p| p == "*" || p == FRONTEND));
        assert_eq!(d.admits(), names_local, "{rules:?}");
    }
    // A remote ID naming the local trust domain's wildcard is not a federated
    // caller's key to anything either.
    let routes = store(vec![service("api", "10.77.0.3", vec![rule(&["spiffe://td/*"], &[], &[])])]);
    assert!(!decide(&routes, "server", remote, target()).unwrap().admits());
    // With two services on the port, each must name the federated caller.
    let routes = store(vec![
        service("api", "10.77.0.3", vec![rule(&[REMOTE], &[], &[])]),
        service("api-shadow", "10.77.0.3", vec![]),
    ]);
    assert!(!decide(&routes, "server", remote, target()).unwrap().admits());
}

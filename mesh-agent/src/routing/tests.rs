//! Backend draws by weight, and the all-or-nothing weights of a blue-green switch.

use mesh_api as api;

use super::*;
use crate::discovery::table::RouteTable;
use crate::resilience::random::SeededRandom;

fn table(routes: Vec<api::HttpRoute>) -> RouteTable {
    let snapshot = api::Snapshot {
        services: vec![api::Service {
            name: "web".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.1".into()],
            ports: vec![api::ServicePort { name: "http".into(), port: 80, ..Default::default() }],
            endpoints: vec![api::Endpoint { address: "10.0.0.1".into(), weight: 1, ..Default::default() }],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    };
    RouteTable::build(1, &snapshot, 10).expect("valid")
}

fn weights(ws: &[u32]) -> api::HttpRoute {
    api::HttpRoute {
        name: "split".into(),
        backends: ws
            .iter()
            .enumerate()
            .map(|(i, w)| api::RouteBackend {
                subset: [("v".to_owned(), i.to_string())].into(),
                weight: *w,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Resolves every backend to an "unknown" stand-in carrying its subset's label, so
/// draws can be told apart without balancers.
fn resolved(ws: &[u32]) -> Routes {
    let t = table(vec![weights(ws)]);
    let route = t.routes()[0].clone();
    let own = Backend::unknown("own".into(), 1);
    resolve(&route, &own, &|b: &BackendRef| Backend::unknown(b.subset["v"].clone(), b.weight))
}

fn draws(routes: &Routes, n: usize) -> Vec<usize> {
    let random = SeededRandom::new(7);
    let state = routes.iter().next().expect("one route");
    let mut counts = vec![0; state.backends.len()];
    for _ in 0..n {
        let b = state.backend(&*random);
        let i: usize = b.target.as_ref().expect_err("stand-in").parse().expect("index");
        counts[i] += 1;
    }
    counts
}

#[test]
fn backends_are_drawn_in_proportion_to_their_weight() {
    let counts = draws(&resolved(&[90, 10]), 10_000);
    assert!((900..=1_100).contains(&counts[1]), "{counts:?}");
    let counts = draws(&resolved(&[1, 1, 2]), 8_000);
    assert!(counts.iter().all(|c| *c > 1_700), "{counts:?}");
    assert!((3_700..=4_300).contains(&counts[2]), "{counts:?}");
}

#[test]
fn a_zero_weight_backend_gets_nothing() {
    assert_eq!(draws(&resolved(&[0, 100]), 1_000), vec![0, 1_000]);
    assert_eq!(draws(&resolved(&[100, 0]), 1_000), vec![1_000, 0]);
}

#[test]
fn a_route_without_backends_goes_to_the_service_and_ports_limit_where_a_route_applies() {
    let mut only_81 = weights(&[1]);
    only_81.name = "only-81".into();
    only_81.ports = vec![81];
    let mut snapshot = api::Snapshot {
        services: vec![api::Service {
            name: "web".into(),
            namespace: "shop".into(),
            ports: vec![
                api::ServicePort { name: "a".into(), port: 80, ..Default::default() },
                api::ServicePort { name: "b".into(), port: 81, ..Default::default() },
            ],
            routes: vec![api::HttpRoute { name: "all".into(), ..Default::default() }, only_81],
            ..Default::default()
        }],
        ..Default::default()
    };
    let t = RouteTable::build(1, &snapshot, 10).expect("valid");
    let on = |port| t.service_port("shop/web", port).expect("port").http_routes.len();
    assert_eq!((on(80), on(81)), (1, 2));
    let own = Backend::unknown("own".into(), 1);
    let routes =
        resolve(t.service_port("shop/web", 80).expect("port"), &own, &|_| panic!("only the service itself"));
    let first = routes.iter().next().expect("route");
    assert_eq!(first.backend(&*SeededRandom::new(1)).target.as_ref().expect_err("own").as_ref(), "own");
    // A route naming a port the service does not have refuses the snapshot.
    snapshot.services[0].routes[1].ports = vec![82];
    let err = RouteTable::build(2, &snapshot, 10).expect_err("refused").to_string();
    assert!(err.contains("routes[1].ports[0]"), "{err}");
}

//! Behaviour every algorithm shares: availability, locality, guards, state across
//! updates.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::test_support::{addr, set_with, set_with_config, spec};
use super::*;
use crate::resilience::breaker::{BreakerConfig, BreakerState};
use crate::resilience::clock::Clock;
use crate::resilience::outcome::{FailureKind, Outcome};
use crate::resilience::outlier::OutlierConfig;

const ALL: [Algorithm; 6] = [
    Algorithm::RoundRobin,
    Algorithm::LeastRequest,
    Algorithm::WeightedRoundRobin,
    Algorithm::RingHash,
    Algorithm::Maglev,
    Algorithm::Random,
];

fn config(algorithm: Algorithm) -> LbConfig {
    // A small Maglev table keeps these tests fast; the algorithm is the same.
    LbConfig { maglev_table_size: 1009, ..LbConfig::with_algorithm(algorithm) }
}

fn pick_addr(b: &dyn Balancer, ctx: &PickContext<'_>) -> Option<SocketAddr> {
    b.pick(ctx).map(|g| g.addr())
}

fn counts(b: &dyn Balancer, picks: u64) -> HashMap<SocketAddr, u64> {
    let mut counts = HashMap::new();
    for key in 0..picks {
        let ctx = PickContext { hash_key: Some(key), locality: None };
        if let Some(a) = pick_addr(b, &ctx) {
            *counts.entry(a).or_default() += 1;
        }
    }
    counts
}

#[test]
fn every_algorithm_skips_unhealthy_endpoints_and_returns_none_when_all_are() {
    for algorithm in ALL {
        let (_clock, mut set) = set_with((0..4).map(|n| spec(n, 1)).collect());
        set.endpoints()[1].set_healthy(false);
        set.endpoints()[3].set_healthy(false);
        let b = build(&config(algorithm), &set);
        let seen = counts(&*b, 400);
        assert_eq!(seen.keys().copied().collect::<std::collections::HashSet<_>>(), [addr(0), addr(2)].into());
        for e in set.endpoints() {
            e.set_healthy(false);
        }
        assert!(b.pick(&PickContext::default()).is_none(), "{algorithm:?}");
        // An empty set gives None too.
        set.update(Vec::new());
        assert!(build(&config(algorithm), &set).pick(&PickContext::default()).is_none());
    }
}

#[test]
fn every_algorithm_skips_weight_zero_unless_all_are_zero() {
    for algorithm in ALL {
        let (_clock, set) = set_with(vec![spec(0, 0), spec(1, 1), spec(2, 0), spec(3, 2)]);
        let b = build(&config(algorithm), &set);
        let seen = counts(&*b, 400);
        assert!(!seen.contains_key(&addr(0)) && !seen.contains_key(&addr(2)), "{algorithm:?}: {seen:?}");
        let (_clock, set) = set_with((0..3).map(|n| spec(n, 0)).collect());
        let b = build(&config(algorithm), &set);
        assert_eq!(counts(&*b, 600).len(), 3, "{algorithm:?}: all-zero weights count equally");
    }
}

#[test]
fn every_algorithm_skips_ejected_and_circuit_open_endpoints() {
    for algorithm in ALL {
        let (_clock, set) = set_with((0..4).map(|n| spec(n, 1)).collect());
        let b = build(&config(algorithm), &set);
        // Endpoint 0: 20 failures open its breaker (and its 5 consecutive failures
        // eject it first, so feed the breaker directly too).
        for _ in 0..20 {
            let breaker = set.endpoints()[0].breaker();
            let admission = breaker.try_acquire().expect("closed");
            breaker.record(admission, true);
        }
        assert_eq!(set.endpoints()[0].breaker().state(), BreakerState::Open);
        // Endpoint 1: ejected through real reports.
        let mut reported = 0;
        for key in 0u64.. {
            if reported == 5 {
                break;
            }
            let guard = b.pick(&PickContext { hash_key: Some(key), locality: None });
            let guard = guard.expect("some endpoint available");
            if guard.addr() == addr(1) {
                guard.report(Outcome::Failure(FailureKind::ConnectFailure));
                reported += 1;
            }
        }
        assert!(set.endpoints()[1].is_ejected());
        let seen = counts(&*b, 400);
        assert!(!seen.contains_key(&addr(0)), "{algorithm:?} picked an open breaker: {seen:?}");
        assert!(!seen.contains_key(&addr(1)), "{algorithm:?} picked an ejected endpoint: {seen:?}");
        assert_eq!(seen.len(), 2);
    }
}

#[test]
fn breaker_reopens_traffic_with_probes_after_reset_timeout() {
    let (clock, set) = set_with(vec![spec(0, 1)]);
    let b = build(&config(Algorithm::RoundRobin), &set);
    for _ in 0..20 {
        b.pick(&PickContext::default()).expect("closed").report(Outcome::from_http_status(502));
    }
    assert!(b.pick(&PickContext::default()).is_none(), "open breaker: nothing to pick");
    clock.advance(Duration::from_secs(11));
    let probes: Vec<PickGuard> = (0..3).filter_map(|_| b.pick(&PickContext::default())).collect();
    assert_eq!(probes.len(), 3, "three half-open probes");
    assert!(probes.iter().all(PickGuard::is_probe));
    assert!(b.pick(&PickContext::default()).is_none(), "no fourth probe");
    for probe in probes {
        probe.report(Outcome::Success);
    }
    assert_eq!(set.endpoints()[0].breaker().state(), BreakerState::Closed);
}

#[test]
fn outlier_ejection_never_takes_more_than_half_the_set() {
    let breaker = BreakerConfig::disabled();
    let (_clock, set) =
        set_with_config((0..4).map(|n| spec(n, 1)).collect(), breaker, OutlierConfig::default());
    let b = build(&config(Algorithm::RoundRobin), &set);
    // Every endpoint fails everything.
    for _ in 0..200 {
        if let Some(g) = b.pick(&PickContext::default()) {
            g.report(Outcome::from_http_status(503));
        }
    }
    let ejected = set.endpoints().iter().filter(|e| e.is_ejected()).count();
    assert_eq!(ejected, 2);
    assert_eq!(set.outlier_detector().stats().ejected_now, 2);
    assert!(b.pick(&PickContext::default()).is_some(), "the rest still serve");
}

#[test]
fn guard_holds_in_flight_until_dropped_on_every_path() {
    let (_clock, set) = set_with(vec![spec(0, 1)]);
    let b = build(&config(Algorithm::LeastRequest), &set);
    let endpoint = set.endpoints()[0].clone();

    let g1 = b.pick(&PickContext::default()).expect("pick");
    let g2 = b.pick(&PickContext::default()).expect("pick");
    assert_eq!(endpoint.in_flight(), 2);
    g1.report(Outcome::Success);
    assert_eq!(endpoint.in_flight(), 1);
    drop(g2); // No report: e.g. the caller bailed out with `?`.
    assert_eq!(endpoint.in_flight(), 0);

    // A request future cancelled while awaiting: the guard goes with it.
    let guard = b.pick(&PickContext::default()).expect("pick");
    let mut request = Box::pin(async move {
        let _guard = guard;
        std::future::pending::<()>().await;
    });
    let mut cx = Context::from_waker(Waker::noop());
    assert_eq!(request.as_mut().poll(&mut cx), Poll::Pending);
    assert_eq!(endpoint.in_flight(), 1);
    drop(request);
    assert_eq!(endpoint.in_flight(), 0);

    // A panic unwinding through the holder also gives the count back.
    let guard = b.pick(&PickContext::default()).expect("pick");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _guard = guard;
        panic!("handler failed");
    }));
    assert!(result.is_err());
    assert_eq!(endpoint.in_flight(), 0);
}

#[test]
fn locality_prefers_zone_then_region_then_anywhere() {
    let placed = |n: u32, region: &str, zone: &str| EndpointSpec {
        locality: Locality::new(region, zone),
        ..spec(n, 1)
    };
    for algorithm in ALL {
        let (_clock, set) = set_with(vec![
            placed(0, "eu", "eu-a"),
            placed(1, "eu", "eu-b"),
            placed(2, "us", "us-a"),
            placed(3, "us", "us-b"),
        ]);
        let lb = LbConfig { locality_aware: true, ..config(algorithm) };
        let b = build(&lb, &set);
        let me = Locality::new("eu", "eu-a");
        let at = |b: &dyn Balancer, key| {
            pick_addr(b, &PickContext { hash_key: Some(key), locality: Some(&me) }).expect("pick")
        };
        assert!((0..50).all(|k| at(&*b, k) == addr(0)), "{algorithm:?}: same zone first");
        set.endpoints()[0].set_healthy(false);
        assert!((0..50).all(|k| at(&*b, k) == addr(1)), "{algorithm:?}: then same region");
        set.endpoints()[1].set_healthy(false);
        let elsewhere: std::collections::HashSet<_> = (0..200).map(|k| at(&*b, k)).collect();
        assert_eq!(elsewhere, [addr(2), addr(3)].into(), "{algorithm:?}: then anywhere");

        // Without a caller locality, or without locality awareness, all endpoints serve.
        for e in set.endpoints() {
            e.set_healthy(true);
        }
        assert_eq!(counts(&*b, 400).len(), 4, "{algorithm:?}");
        let plain = build(&config(algorithm), &set);
        let spread: std::collections::HashSet<_> = (0..400)
            .filter_map(|k| pick_addr(&*plain, &PickContext { hash_key: Some(k), locality: Some(&me) }))
            .collect();
        assert_eq!(spread.len(), 4, "{algorithm:?}: locality ignored when not locality-aware");
    }
}

#[test]
fn set_update_keeps_state_and_ramps_newcomers() {
    let (clock, mut set) = set_with(vec![spec(0, 1), spec(1, 1)]);
    assert!(set.endpoints().iter().all(|e| e.ramping_since().is_none()), "first list is steady state");
    let b = build(&config(Algorithm::LeastRequest), &set);
    let held = b.pick(&PickContext::default()).expect("pick");
    let held_addr = held.addr();
    for _ in 0..20 {
        let breaker = set.endpoints()[0].breaker();
        let admission = breaker.try_acquire().expect("closed");
        breaker.record(admission, true);
    }

    clock.advance(Duration::from_secs(1));
    set.update(vec![spec(1, 5), spec(0, 1), spec(2, 1)]);
    let by_addr = |a: SocketAddr| set.endpoints().iter().find(|e| e.addr() == a).expect("present").clone();
    assert_eq!(by_addr(held_addr).in_flight(), 1, "in-flight count survives the update");
    assert_eq!(by_addr(addr(0)).breaker().state(), BreakerState::Open, "breaker survives");
    assert_eq!(by_addr(addr(1)).weight(), 5, "weight updated in place");
    assert_eq!(by_addr(addr(2)).ramping_since(), Some(clock.now()), "newcomer ramps");
    drop(held);
    assert_eq!(by_addr(held_addr).in_flight(), 0);

    // Recovering health restarts the ramp.
    let e1 = by_addr(addr(1));
    e1.set_healthy(false);
    clock.advance(Duration::from_secs(1));
    e1.set_healthy(true);
    assert_eq!(e1.ramping_since(), Some(clock.now()));
}

#[test]
fn endpoint_spec_from_api_resolves_ports() {
    let service_port =
        mesh_api::ServicePort { name: "http".into(), port: 80, target_port: 8080, protocol: 0 };
    let mut ep = mesh_api::Endpoint {
        address: "10.1.2.3".into(),
        weight: 2,
        health: mesh_api::Health::Unhealthy as i32,
        locality: Some(mesh_api::Locality { region: "eu".into(), zone: "eu-a".into() }),
        ..Default::default()
    };
    let s = EndpointSpec::from_api(&ep, &service_port).expect("valid");
    assert_eq!(s.addr, "10.1.2.3:8080".parse().expect("addr"));
    assert!(!s.healthy);
    assert_eq!(s.locality, Locality::new("eu", "eu-a"));
    ep.port = 9000;
    assert_eq!(EndpointSpec::from_api(&ep, &service_port).expect("valid").addr.port(), 9000);
    ep.named_ports.insert("http".into(), 9100);
    assert_eq!(EndpointSpec::from_api(&ep, &service_port).expect("valid").addr.port(), 9100);
    ep.named_ports.insert("http".into(), 70_000);
    assert_eq!(EndpointSpec::from_api(&ep, &service_port), Err(Error::InvalidPort(70_000)));
    ep.address = "reviews".into();
    assert!(matches!(EndpointSpec::from_api(&ep, &service_port), Err(Error::InvalidAddress(_))));
}

#[test]
fn lb_config_from_api() {
    let api = mesh_api::LoadBalancer {
        algorithm: mesh_api::Algorithm::Maglev as i32,
        hash_key: Some(mesh_api::HashKey {
            source: Some(mesh_api::hash_key::Source::Header("x-user".into())),
        }),
        virtual_nodes: 0,
        slow_start_ms: 30_000,
        locality_aware: true,
    };
    let c = LbConfig::from_api(&api).expect("valid");
    assert_eq!(c.algorithm, Algorithm::Maglev);
    assert_eq!(c.hash_key, Some(HashKeySource::Header("x-user".into())));
    assert_eq!(c.virtual_nodes, DEFAULT_VIRTUAL_NODES);
    assert_eq!(c.slow_start, Duration::from_secs(30));
    assert!(c.locality_aware);
    let bad = mesh_api::LoadBalancer { algorithm: 99, ..Default::default() };
    assert_eq!(LbConfig::from_api(&bad), Err(Error::UnknownAlgorithm(99)));
    let huge = mesh_api::LoadBalancer { virtual_nodes: u32::MAX, ..api.clone() };
    assert_eq!(LbConfig::from_api(&huge), Err(Error::TooManyVirtualNodes(u32::MAX)));
    let most = mesh_api::LoadBalancer { virtual_nodes: mesh_api::limits::MAX_VIRTUAL_NODES, ..api.clone() };
    assert_eq!(
        LbConfig::from_api(&most).expect("at the limit").virtual_nodes,
        mesh_api::limits::MAX_VIRTUAL_NODES
    );
    assert_eq!(LbConfig::from_api(&mesh_api::LoadBalancer::default()), Ok(LbConfig::default()));
}

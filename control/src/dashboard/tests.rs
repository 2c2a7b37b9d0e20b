//! The board's merge across agents and windows, and the graph built from it.

use mesh_api::{self as api, edges as shape};

use super::{
    board::{Board, GRACE_MS, HISTORY_MS},
    graph,
};

fn edge(source: &str, service: &str, inbound: bool, requests: u64, latency_ms: f64) -> api::EdgeSummary {
    let mut buckets = vec![0u64; shape::LATENCY_BUCKET_COUNT];
    if !inbound {
        buckets[shape::latency_bucket(latency_ms)] = requests;
    }
    api::EdgeSummary {
        source: source.into(),
        destination_service: service.into(),
        inbound,
        protocol: "http".into(),
        mtls: true,
        requests,
        errors: 0,
        denials: 0,
        bytes: 10 * requests,
        latency_buckets: buckets,
    }
}

fn report(edges: Vec<api::EdgeSummary>, workloads: &[(&str, &str)]) -> api::EdgeReport {
    api::EdgeReport {
        window_ms: 1000,
        edges,
        workloads: workloads
            .iter()
            .map(|(w, id)| api::WorkloadCertificate {
                workload: (*w).into(),
                identity: (*id).into(),
                not_after: 2_000_000,
            })
            .collect(),
        ..Default::default()
    }
}

const FRONTEND_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const T0: u64 = 1_000_000_000;

#[test]
fn two_agents_reports_merge_into_one_edge_with_summed_rates_and_buckets() {
    let board = Board::new();
    for i in 0..5 {
        let now = T0 + i * 1000;
        board.record("a", report(vec![edge("shop/frontend", "shop/api", false, 10, 2.0)], &[]), now);
        board.record("b", report(vec![edge("shop/frontend", "shop/api", false, 30, 200.0)], &[]), now);
    }
    let sums = board.edges(T0 + 4000, 10_000);
    let s = &sums[&(false, "shop/frontend".to_owned(), "shop/api".to_owned())];
    assert_eq!(s.requests, 200);
    assert!((s.rps - 40.0).abs() < 1e-9, "10/s from one agent and 30/s from the other: {}", s.rps);
    // Idle windows are not sent, but they are time: one agent silent for 5 s
    // halves its rate over the last 10 s.
    let later = board.edges(T0 + 9000, 10_000);
    let s = &later[&(false, "shop/frontend".to_owned(), "shop/api".to_owned())];
    assert!((s.rps - 20.0).abs() < 1e-9, "{}", s.rps);
    // A quarter of the requests took ~2 ms, the rest ~200 ms: the merged buckets
    // put p50 among the slow ones and p99 too, which no average of the agents' own
    // percentiles could say.
    let p50 = shape::quantile_ms(&s.latency, 0.5).unwrap();
    assert!(p50 > 100.0 && p50 <= 250.0, "{p50}");
    let p10 = shape::quantile_ms(&s.latency, 0.1).unwrap();
    assert!(p10 <= 2.5, "{p10}");
    // Only the last 2 s: 2 windows of each agent, the same rate.
    let recent = board.edges(T0 + 4000, 2_000);
    let s = &recent[&(false, "shop/frontend".to_owned(), "shop/api".to_owned())];
    assert_eq!(s.requests, 80);
    assert!((s.rps - 40.0).abs() < 1e-9);
}

#[test]
fn denials_join_the_callers_workload_edge_and_unknown_callers_get_their_own() {
    let board = Board::new();
    board.record(
        "client",
        report(vec![edge("shop/frontend", "shop/api", false, 20, 1.0)], &[("shop/frontend", FRONTEND_ID)]),
        T0,
    );
    let mut denied = edge(FRONTEND_ID, "shop/api", true, 20, 0.0);
    denied.denials = 5;
    let mut outsider = edge("unauthenticated", "shop/api", true, 3, 0.0);
    outsider.mtls = false;
    outsider.denials = 3;
    board.record(
        "server",
        report(vec![denied, outsider], &[("shop/api", "spiffe://cluster.local/ns/shop/sa/api")]),
        T0,
    );
    let g = graph::graph(&board, &api::Snapshot::default(), T0 + 500);
    let edges = g["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2, "{g:#}");
    let by_id = |id: &str| edges.iter().find(|e| e["id"] == id).unwrap_or_else(|| panic!("{id}: {g:#}"));
    let e = by_id("shop/frontend->shop/api");
    assert_eq!((e["requests"].as_u64(), e["denials"].as_u64()), (Some(20), Some(5)));
    assert_eq!(e["mtls"], true);
    let u = by_id("unauthenticated->shop/api");
    assert_eq!((u["denials"].as_u64(), u["mtls"].as_bool()), (Some(3), Some(false)));
    let nodes = g["nodes"].as_array().unwrap();
    let has = |id: &str, kind: &str| nodes.iter().any(|n| n["id"] == id && n["kind"] == kind);
    assert!(has("shop/frontend", "workload"), "{g:#}");
    assert!(has("unauthenticated", "caller"), "{g:#}");
    // A workload and a service may share a name: both are shown, told apart by kind.
    assert!(has("shop/api", "service") && has("shop/api", "workload"), "{g:#}");
}

#[test]
fn an_agents_data_goes_after_its_stream_ends_and_the_grace_passes() {
    let board = Board::new();
    board.record("a", report(vec![edge("shop/frontend", "shop/api", false, 1, 1.0)], &[]), T0);
    board.stream_ended("a", T0 + 1);
    assert_eq!(board.nodes(T0 + GRACE_MS - 1), vec!["a".to_owned()], "kept during the grace");
    // A reconnect within the grace keeps the history.
    board.record("a", report(vec![], &[]), T0 + 2);
    assert_eq!(board.nodes(T0 + GRACE_MS + 10), vec!["a".to_owned()]);
    board.stream_ended("a", T0 + 20);
    assert!(board.nodes(T0 + 20 + GRACE_MS).is_empty());
}

#[test]
fn the_service_page_plots_per_second_over_the_history_only() {
    let board = Board::new();
    let old = T0;
    board.record("a", report(vec![edge("shop/frontend", "shop/api", false, 7, 1.0)], &[]), old);
    let now = old + HISTORY_MS + 5_000;
    for i in 0..3 {
        let mut e = edge("shop/frontend", "shop/api", false, 10, 1.0);
        e.errors = 1;
        board.record("a", report(vec![e], &[]), now - 2_000 + i * 1000);
    }
    let snapshot = api::Snapshot {
        services: vec![api::Service {
            name: "api".into(),
            namespace: "shop".into(),
            endpoints: vec![api::Endpoint {
                address: "10.0.0.3".into(),
                port: 8080,
                agent_address: "10.0.0.3:15008".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let page = graph::service(&board, &snapshot, "shop/api", now).unwrap();
    let series = page["series"].as_array().unwrap();
    assert_eq!(series.len(), 3, "the window past the history is gone: {page:#}");
    assert_eq!(series[0]["rps"], 10.0);
    assert_eq!(series[0]["error_percent"], 10.0);
    assert_eq!(page["endpoints"][0]["address"], "10.0.0.3:8080");
    assert_eq!(page["endpoints"][0]["meshed"], true);
    assert!(graph::service(&board, &snapshot, "shop/nothing", now).is_none());
}

#[test]
fn a_report_is_bounded_whatever_an_agent_sends() {
    let board = Board::new();
    let edges = (0..shape::MAX_EDGES_PER_REPORT + 50)
        .map(|i| edge(&format!("shop/w{i}"), "shop/api", false, 1, 1.0))
        .collect();
    board.record("a", api::EdgeReport { window_ms: u32::MAX, ..report(edges, &[]) }, T0);
    let sums = board.edges(T0, 10_000);
    assert_eq!(sums.len(), shape::MAX_EDGES_PER_REPORT);
    // Names longer than any the mesh gives are not kept; extra buckets fold into
    // the last.
    let mut long = edge(&"x".repeat(300), "shop/api", false, 1, 1.0);
    long.latency_buckets = vec![1; shape::LATENCY_BUCKET_COUNT + 5];
    let mut fine = edge("shop/new", "shop/api", false, 1, 1.0);
    fine.latency_buckets = vec![1; shape::LATENCY_BUCKET_COUNT + 5];
    board.record("b", report(vec![long, fine], &[]), T0);
    let sums = board.edges(T0, 10_000);
    assert!(!sums.keys().any(|(_, s, _)| s.len() > 253));
    let fine = &sums[&(false, "shop/new".to_owned(), "shop/api".to_owned())];
    assert_eq!(fine.latency[shape::LATENCY_BUCKET_COUNT - 1], 6);
    // The window's length is clamped to the history: no rate from a bogus length.
    let any = sums.values().next().unwrap();
    assert!(any.rps > 0.0 && any.rps <= 1.0);
}

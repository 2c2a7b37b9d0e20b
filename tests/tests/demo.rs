//! `cargo xtask demo`, bounded: the demo runs for 20 s in each interception mode and
//! must show traffic on every path, with mTLS wherever the destination is meshed, and
//! leave nothing behind.

use std::{path::Path, process::Command, time::Duration};

use mesh_tests::{
    demo::{self, BACKEND_ID, FRONTEND_ID, Summary},
    require_root,
};

/// One demo at a time: the teardown check looks for any cgroup or BPF attachment
/// this test process left under `mesh-test/`, so a second demo running concurrently
/// in the same process would be reported as the first one's leftovers (it was, in
/// CI, where the test harness runs tests in parallel).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_demo(mode: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("summary.json");
    let result = demo::run(&demo::Options {
        mode: mode.to_owned(),
        duration: Some(Duration::from_secs(20)),
        summary_json: Some(path.clone()),
        ..Default::default()
    });
    // The summary is written even when the run fails, so the failure shows its numbers.
    let json: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| panic!("no summary written; run: {result:?}"));
    let summary: Summary = result.unwrap_or_else(|e| panic!("demo failed: {e:#}\nsummary: {json:#}"));
    assert_eq!(json["rows"].as_array().map(Vec::len), Some(summary.rows.len()));
    assert_eq!(json["frontend_mode"], mode, "{json:#}");
    assert_eq!(json["backend_mode"], mode, "{json:#}");

    let row = |service: Option<&str>, workload: Option<&str>| {
        summary
            .rows
            .iter()
            .find(|r| r.service.as_deref() == service && r.workload.as_deref() == workload)
            .unwrap_or_else(|| panic!("no row for {service:?} {workload:?}: {json:#}"))
    };
    let meshed = [
        ("shop/catalog", "catalog-v1", "http", "http1"),
        ("shop/catalog", "catalog-v2", "http", "http1"),
        ("shop/reviews", "reviews-v1", "http", "http2"),
        ("shop/echo", "echo-v1", "tcp", "opaque"),
    ];
    for (service, workload, kind, protocol) in meshed {
        let r = row(Some(service), Some(workload));
        assert!(r.requests > 0, "no traffic on {service} {workload}: {json:#}");
        assert_eq!(r.errors, 0, "errors on {service} {workload}: {json:#}");
        assert_eq!((r.kind.as_str(), r.protocol.as_str()), (kind, protocol), "{json:#}");
        // Every request went over mTLS to the backend's agent, as the frontend.
        assert_eq!(r.mtls, r.requests, "{service} {workload} not all over mTLS: {json:#}");
        assert_eq!(r.destination_identity.as_deref(), Some(BACKEND_ID), "{json:#}");
        assert_eq!(r.source_identity.as_deref(), Some(FRONTEND_ID), "{json:#}");
    }
    // The canary shift: 90/10, 50/50, 0/100 by registry edits while traffic flows.
    // Edits reach the agent within a fraction of a step, so the first step is mostly
    // v1 and the last all but the first requests v2.
    let steps = &summary.canary;
    assert_eq!(
        steps.iter().map(|s| (s.v1_weight, s.v2_weight)).collect::<Vec<_>>(),
        demo::CANARY_STEPS.to_vec(),
        "{json:#}"
    );
    let share_v1 =
        |s: &demo::CanaryStep| s.v1_requests as f64 / (s.v1_requests + s.v2_requests).max(1) as f64;
    assert!(steps.iter().all(|s| s.v1_requests + s.v2_requests >= 10), "too few catalog requests: {json:#}");
    assert!(share_v1(&steps[0]) >= 0.6, "90/10 step: {json:#}");
    assert!(share_v1(&steps[2]) <= 0.2, "0/100 step: {json:#}");
    // The backend's agent admitted them as the frontend's identity.
    let http_requests: u64 = summary.rows.iter().filter(|r| r.kind == "http").map(|r| r.requests).sum();
    assert!(summary.inbound_mtls_requests >= http_requests / 2, "{json:#}");
    // Passthrough: TLS to an address the registry does not know, untouched.
    let tls = row(None, None);
    assert!(tls.error_samples.is_empty(), "{json:#}");
    assert!(tls.endpoint.ends_with(":8443"), "{json:#}");
    assert!(tls.requests > 0 && tls.errors == 0, "{json:#}");
    assert!(tls.protocol.starts_with("tls sni=legacy.demo"), "{json:#}");
    assert_eq!((tls.mtls, tls.destination_identity.as_ref()), (0, None), "{json:#}");
    assert_eq!(summary.rows.len(), 5, "unexpected paths: {json:#}");

    // Teardown, as the demo saw it and as the system tools see it now.
    assert!(summary.leftovers.is_empty(), "{json:#}");
    let ours = format!("mt{}-", std::process::id());
    let netns = cmd("ip", &["netns", "list"]);
    assert!(!netns.contains(&ours), "namespaces left behind:\n{netns}");
    for tool in ["iptables-save", "ip6tables-save"] {
        let rules = cmd(tool, &[]);
        assert!(!rules.contains("MESH_"), "{tool} shows mesh chains:\n{rules}");
    }
    let tree = cmd("bpftool", &["cgroup", "tree"]);
    let cgroup = format!("/mesh-test/{}-", std::process::id());
    assert!(!tree.contains(&cgroup), "BPF programs left on the demo's cgroups:\n{tree}");
    let mount = mesh_tests::cgroup::mount().unwrap().join("mesh-test");
    let left: Vec<String> = std::fs::read_dir(&mount)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{}-", std::process::id())))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "cgroups left behind under {}: {left:?}", mount.display());
    assert!(!Path::new(&format!("/var/run/netns/{ours}")).exists());
}

fn cmd(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn demo_runs_every_path_over_mtls_and_cleans_up_ebpf() {
    if require_root("demo_runs_every_path_over_mtls_and_cleans_up_ebpf") {
        run_demo("ebpf");
    }
}

#[test]
fn demo_runs_every_path_over_mtls_and_cleans_up_iptables() {
    if require_root("demo_runs_every_path_over_mtls_and_cleans_up_iptables") {
        run_demo("iptables");
    }
}

//! End to end: two host workloads on one node, each its own cgroup and its own
//! identity (`--workload CGROUP=NS/SA`), call a service whose policy admits only one
//! of them. The server's agent tells them apart by the certificate each presented:
//! 200 for `frontend`, 403 for `batch`. The client agent's access log and metrics
//! name each call's source workload.

use std::time::Duration;

use mesh_tests::{Agent, Cgroup, Control, Lab, agent::message, eventually, servers};

const VIP: &str = "10.96.0.60";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";

fn registry() -> String {
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    policy:
      authorization: [{{principals: [\"{FRONTEND}\"]}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}}
workloads:
  - {{name: frontend-1, namespace: shop, service_account: frontend, node: client}}
  - {{name: batch-1, namespace: shop, service_account: batch, node: client}}
"
    )
}

/// Status of `GET http://VIP/path` from a process in `cg` on the client host.
fn get(lab: &Lab, cg: &Cgroup, path: &str) -> Result<u16, String> {
    let out = lab
        .host("client")
        .command("curl", Some(cg.absolute()))
        .map_err(|e| e.to_string())?
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://{VIP}{path}"))
        .output()
        .map_err(|e| e.to_string())?;
    let code = String::from_utf8_lossy(&out.stdout);
    match code.trim().parse::<u16>() {
        Ok(c) if c != 0 => Ok(c),
        _ => Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr))),
    }
}

fn static_workloads_carry_their_own_identities(mode: &str) {
    let lab = Lab::new(&["control", "client", "server"]).expect("lab");
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("registry.yaml");
    std::fs::write(&reg, registry()).unwrap();
    let control = Control::start_with_ca(lab.host("control"), &reg, dir.path(), &["client", "server"], &[])
        .expect("control plane");
    let _api = servers::http(lab.host("server"), 8080, "api").unwrap();
    let server_cg = Cgroup::new("srv").unwrap();
    let server = Agent::start(
        lab.host("server"),
        control.agent_options(mode, "server", "shop/api").cgroup(&server_cg),
    )
    .expect("server agent");
    server.wait_enrolled();

    let (frontend, batch) = (Cgroup::new("frontend").unwrap(), Cgroup::new("batch").unwrap());
    let client = Agent::start(
        lab.host("client"),
        control
            .discovery_options(mode, "client")
            .arg("--workload")
            .arg(format!("{}=shop/frontend", frontend.relative()))
            .arg("--workload")
            .arg(format!("{}=shop/batch", batch.relative())),
    )
    .expect("client agent");

    // Each workload's certificate is requested when it is first served; until both are
    // in, a call may fail, but never succeed as the wrong identity.
    eventually(Duration::from_secs(15), "frontend admitted", || {
        (get(&lab, &frontend, "/f") == Ok(200)).then_some(())
    });
    eventually(Duration::from_secs(15), "batch refused by policy", || {
        (get(&lab, &batch, "/b") == Ok(403)).then_some(())
    });
    assert_eq!(get(&lab, &frontend, "/f2"), Ok(200), "frontend still admitted after batch's refusal");

    let admitted =
        server.wait_log("frontend's request at the server", |v| v["kind"] == "http" && v["path"] == "/f2");
    assert_eq!(admitted["source_identity"], FRONTEND, "{admitted}");
    let refused =
        server.wait_log("batch's request at the server", |v| v["kind"] == "http" && v["path"] == "/b");
    assert_eq!(refused["source_identity"], BATCH, "{refused}");

    for (path, workload, identity) in [("/f2", "shop/frontend", FRONTEND), ("/b", "shop/batch", BATCH)] {
        let sent = client.wait_log("the client agent's record", |v| {
            v["kind"] == "http" && v["direction"] == "outbound" && v["path"] == path
        });
        assert_eq!(sent["source_workload"], workload, "{sent}");
        assert_eq!(sent["source_identity"], identity, "{sent}");
    }
    let (status, metrics) = lab.host("client").http("GET", client.admin, "/metrics").expect("client metrics");
    assert_eq!(status, 200);
    for workload in ["shop/frontend", "shop/batch"] {
        assert!(
            metrics.lines().any(|l| l.starts_with("mesh_requests_total")
                && l.contains(&format!("source_workload=\"{workload}\""))),
            "no request series for {workload}:\n{metrics}"
        );
    }
    assert!(
        client.find(|v| message(v).contains("panicked")).is_none(),
        "client agent:\n{}",
        client.log_text()
    );
}

mesh_tests::both_modes!(static_workloads_carry_their_own_identities);

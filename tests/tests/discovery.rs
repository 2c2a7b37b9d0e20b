//! End to end: a control plane serving the YAML registry on host `control`, an agent
//! on host `client` routing a workload's connections to a service VIP over the
//! endpoints the control plane announces (backends on hosts `b1`..`b3`).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_tests::{Agent, Cgroup, Control, Lab, agent::message, eventually, servers};
use serde_json::Value;

const VIP: &str = "10.96.0.10";
const PORT: u16 = 8080;
/// The time the issue allows for a registry edit or a control-plane restart to reach
/// the agent's routing.
const PROPAGATION: Duration = Duration::from_secs(5);

struct Mesh {
    /// Service fields added to every registry the test writes.
    service_extra: String,
    lab: Lab,
    workload: Cgroup,
    registry: PathBuf,
    _dir: tempfile::TempDir,
    control: Option<Control>,
    agent: Agent,
    _servers: Vec<servers::Server>,
}

fn endpoint(host: &str, extra: &str) -> String {
    let n = match host {
        "b1" => 3,
        "b2" => 4,
        "b3" => 5,
        other => panic!("no backend {other}"),
    };
    format!("      - {{address: 10.77.0.{n}, workload: {host}{extra}}}\n")
}

fn registry(endpoints: &[String]) -> String {
    registry_with(endpoints, "")
}

fn registry_with(endpoints: &[String], service_extra: &str) -> String {
    format!(
        "services:\n  - name: web\n    namespace: shop\n    vips: [{VIP}]\n    hostnames: [web.shop.svc.cluster.local]\n    ports: [{{port: 80, target_port: {PORT}, protocol: http}}]\n{service_extra}    endpoints:\n{}",
        endpoints.concat()
    )
}

impl Mesh {
    fn new(mode: &str, endpoints: &[String], agent_args: &[&str]) -> Self {
        Self::with_service(mode, endpoints, agent_args, "")
    }

    fn with_service(mode: &str, endpoints: &[String], agent_args: &[&str], service_extra: &str) -> Self {
        let lab = Lab::new(&["control", "client", "b1", "b2", "b3"]).expect("lab");
        let servers =
            ["b1", "b2", "b3"].iter().map(|b| servers::http(lab.host(b), PORT, b).expect("server")).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("registry.yaml");
        std::fs::write(&registry, registry_with(endpoints, service_extra)).expect("write registry");
        let control = Control::start_with_ca(lab.host("control"), &registry, dir.path(), &[], &[])
            .expect("control plane starts");
        let workload = Cgroup::new("wl").expect("cgroup");
        let mut opts = control.discovery_options(mode, "client").cgroup(&workload);
        for a in agent_args {
            opts = opts.arg(*a);
        }
        let agent = Agent::start(lab.host("client"), opts).expect("agent starts");
        agent.wait_log("first snapshot", |v| message(v) == "snapshot applied");
        Self {
            service_extra: service_extra.to_owned(),
            lab,
            workload,
            registry,
            _dir: dir,
            control: Some(control),
            agent,
            _servers: servers,
        }
    }

    fn write_registry(&self, endpoints: &[String]) {
        // Write then rename, as a config-management tool would: never a half file.
        let tmp = self.registry.with_extension("tmp");
        std::fs::write(&tmp, registry_with(endpoints, &self.service_extra)).expect("write");
        std::fs::rename(&tmp, &self.registry).expect("rename");
    }

    /// One HTTP request from the workload to the VIP; the backend's name, or the error.
    fn request(&self) -> Result<String, String> {
        let out = self
            .lab
            .host("client")
            .command("curl", Some(self.workload.absolute()))
            .expect("command")
            .args(["-sS", "--max-time", "5", &format!("http://{VIP}/")])
            .output()
            .expect("curl runs");
        let body = String::from_utf8_lossy(&out.stdout);
        match body.strip_prefix("server=").and_then(|r| r.split_whitespace().next()) {
            Some(name) if out.status.success() => Ok(name.to_owned()),
            _ => Err(format!("curl {}: {}{}", out.status, body, String::from_utf8_lossy(&out.stderr))),
        }
    }

    /// `n` requests; backend name -> count. Panics on a failed request.
    fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let name = self
                .request()
                .unwrap_or_else(|e| panic!("request {i} failed: {e}\nagent log:\n{}", self.agent.log_text()));
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    }

    /// Waits (at most [`PROPAGATION`]) until `n` requests in a row hit exactly `want`.
    fn wait_for_backends(&self, want: &[&str], what: &str) -> Duration {
        let start = Instant::now();
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        eventually(PROPAGATION, what, || {
            let seen = self.spread(want.len() * 2);
            (seen.keys().cloned().collect::<Vec<_>>() == want).then_some(())
        });
        start.elapsed()
    }

    fn agent_stats(&self) -> Value {
        let (code, body) = self.lab.host("client").http("GET", self.agent.admin, "/stats").expect("admin");
        assert_eq!(code, 200);
        serde_json::from_str(&body).expect("stats JSON")
    }

    fn control_agents(&self) -> Value {
        let control = self.control.as_ref().expect("control plane running");
        let (code, body) = self.lab.host("control").http("GET", control.admin, "/agents").expect("admin");
        assert_eq!(code, 200);
        serde_json::from_str(&body).expect("agents JSON")
    }

    fn applied_version(&self) -> u64 {
        self.agent_stats()["discovery"]["applied_version"].as_u64().expect("applied_version")
    }
}

fn vip_reaches_every_backend_and_follows_registry_edits(mode: &str) {
    let m = Mesh::new(mode, &[endpoint("b1", ""), endpoint("b2", "")], &[]);
    // Round robin over two healthy endpoints: 10 requests, 5 each.
    let seen = m.spread(10);
    assert_eq!(
        seen,
        BTreeMap::from([("b1".into(), 5), ("b2".into(), 5)]),
        "round robin over the VIP's endpoints"
    );
    // HTTP is proxied per request: one access record each, naming the service.
    let rec = m.agent.wait_log("access record with service", |v| {
        v["kind"] == "http" && v["destination_service"] == "shop/web"
    });
    assert_eq!(rec["original_destination"], format!("{VIP}:80"));
    assert!(rec["destination_endpoint"].as_str().unwrap().ends_with(&format!(":{PORT}")), "{rec}");

    m.write_registry(&[endpoint("b1", ""), endpoint("b2", ""), endpoint("b3", "")]);
    let t = m.wait_for_backends(&["b1", "b2", "b3"], "added endpoint b3 receives traffic");
    eprintln!("added endpoint routed after {t:?}");

    m.write_registry(&[endpoint("b1", ", health: unhealthy"), endpoint("b2", ""), endpoint("b3", "")]);
    let t = m.wait_for_backends(&["b2", "b3"], "unhealthy b1 receives no traffic");
    eprintln!("unhealthy endpoint dropped after {t:?}");

    m.write_registry(&[endpoint("b1", ", health: unhealthy"), endpoint("b3", "")]);
    let t = m.wait_for_backends(&["b3"], "removed b2 receives no traffic");
    eprintln!("removed endpoint dropped after {t:?}");

    // The unhealthy endpoint is still known (marked, not silently removed).
    let (_, dump) = m.lab.host("client").http("GET", m.agent.admin, "/config_dump").unwrap();
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let eps = &dump["routes"][0]["endpoints"];
    assert_eq!(eps.as_array().map(Vec::len), Some(2), "{dump}");
    assert_eq!(eps[0]["healthy"], false);
    assert_eq!(eps[0]["health_reason"], "marked unhealthy in the registry");
}

fn agent_keeps_routing_while_control_plane_is_down_and_catches_up_after(mode: &str) {
    let mut m = Mesh::new(mode, &[endpoint("b1", ""), endpoint("b2", "")], &[]);
    let before = m.applied_version();
    m.control.take().expect("running").terminate().expect("control plane stops");
    m.agent.wait_log("agent notices the lost stream", |v| message(v).starts_with("lost the control plane"));

    // 60 s without a control plane: a request every 2 s, every one must succeed on
    // the last-known endpoints.
    let down = Instant::now();
    let mut requests = 0;
    while down.elapsed() < Duration::from_secs(60) {
        let tick = Instant::now();
        let seen = m.spread(2);
        assert!(seen.keys().all(|k| k == "b1" || k == "b2"), "{seen:?}");
        requests += 2;
        std::thread::sleep(Duration::from_secs(2).saturating_sub(tick.elapsed()));
    }
    let stale = m.agent_stats()["discovery"]["staleness_seconds"].as_f64().unwrap();
    assert!(stale >= 55.0, "staleness reported while the control plane is away: {stale}");
    eprintln!("{requests} requests succeeded during 60 s without a control plane; staleness {stale:.1}s");

    // Restart with a changed registry: the agent reconnects and applies it within 5 s.
    m.write_registry(&[endpoint("b2", ""), endpoint("b3", "")]);
    let restarted = Instant::now();
    // The same control plane restarted: same CA (the agent's anchor) and tokens.
    let control = Control::start_with_ca(m.lab.host("control"), &m.registry, m._dir.path(), &[], &[])
        .expect("control plane restarts");
    m.control = Some(control);
    eventually(
        PROPAGATION.saturating_sub(restarted.elapsed()),
        "agent applies the restarted control plane's snapshot",
        || (m.applied_version() > before).then_some(()),
    );
    eprintln!("agent refreshed {:?} after the control plane restarted", restarted.elapsed());
    let seen = m.spread(4);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b2", "b3"]);
    assert_eq!(m.agent_stats()["discovery"]["staleness_seconds"].as_f64(), Some(0.0));
    // A starting control plane never pushed a partial (not yet loaded) view.
    let empty = m.agent.find(|v| message(v) == "snapshot applied" && v["routes"] == 0);
    assert!(empty.is_none(), "agent was sent an empty snapshot: {empty:?}");
}

fn refused_update_leaves_agent_on_last_good_version(mode: &str) {
    // This agent accepts at most 2 endpoints: a third makes the snapshot one it must NACK.
    let m = Mesh::new(mode, &[endpoint("b1", ""), endpoint("b2", "")], &["--max-endpoints", "2"]);
    let good = m.applied_version();
    eventually(PROPAGATION, "control plane records the ACK", || {
        (m.control_agents()["agents"][0]["acked_version"].as_u64() == Some(good)).then_some(())
    });

    m.write_registry(&[endpoint("b1", ""), endpoint("b2", ""), endpoint("b3", "")]);
    let agents = eventually(PROPAGATION, "control plane records the NACK", || {
        let a = m.control_agents();
        (a["agents"][0]["nacked_version"].as_u64().unwrap_or(0) > good).then_some(a)
    });
    let status = &agents["agents"][0];
    assert_eq!(status["node"], "client");
    assert_eq!(status["acked_version"].as_u64(), Some(good), "{agents}");
    let reason = status["nack_reason"].as_str().unwrap();
    assert!(reason.contains("3 endpoints") && reason.contains("--max-endpoints"), "{reason}");
    assert_eq!(m.applied_version(), good, "agent stays on its last good version");
    let seen = m.spread(6);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b1", "b2"], "routing from the last good snapshot");

    // An invalid registry edit is refused by the control plane itself, naming the
    // file, entry and field; agents keep the last good state.
    std::fs::write(&m.registry, registry(&["      - {address: 10.77.0.300}\n".to_string()])).unwrap();
    let control = m.control.as_ref().unwrap();
    let line = control.wait_log("registry rejected", |v| message(v).starts_with("registry file rejected"));
    let err = line["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("registry.yaml: services[0] (shop/web): endpoints[0].address: \"10.77.0.300\" is not an IP address"),
        "{line}"
    );
    assert_eq!(m.applied_version(), good);
    assert_eq!(m.spread(2).len(), 2);
}

fn control_plane_health_checks_mark_a_dead_endpoint_unhealthy(mode: &str) {
    let extra =
        "    health_check: {interval: 200ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 1}\n";
    let mut m = Mesh::with_service(mode, &[endpoint("b1", ""), endpoint("b2", "")], &[], extra);
    assert_eq!(m.spread(4).len(), 2, "both endpoints pass their checks and take traffic");
    // b2's server goes away: the control plane's checks fail and it announces b2 as
    // unhealthy, with the reason, instead of removing it.
    m._servers.remove(1);
    let dump = eventually(PROPAGATION, "agent learns that b2 failed its health checks", || {
        let (_, body) = m.lab.host("client").http("GET", m.agent.admin, "/config_dump").ok()?;
        let dump: Value = serde_json::from_str(&body).ok()?;
        (dump["routes"][0]["endpoints"][1]["healthy"] == false).then_some(dump)
    });
    let reason = dump["routes"][0]["endpoints"][1]["health_reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.starts_with("failed 2 health checks"), "{reason}");
    assert_eq!(m.spread(4).keys().collect::<Vec<_>>(), ["b1"]);
    // Back up: healthy again after one passing check.
    m._servers.insert(1, servers::http(m.lab.host("b2"), PORT, "b2").expect("server"));
    m.wait_for_backends(&["b1", "b2"], "b2 takes traffic again after passing its check");
}

mesh_tests::both_modes!(
    vip_reaches_every_backend_and_follows_registry_edits,
    refused_update_leaves_agent_on_last_good_version,
    control_plane_health_checks_mark_a_dead_endpoint_unhealthy,
    agent_keeps_routing_while_control_plane_is_down_and_catches_up_after
);

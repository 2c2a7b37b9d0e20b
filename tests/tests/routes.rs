//! End to end, service routes as users drive them: a 90/10 canary split and a
//! blue-green switch under load, header, path, method and gRPC-method matches,
//! injected delays and aborts, mirrored traffic, a refused route edit, and
//! `meshctl routes`.
//!
//! Lab ([`MeshLab`]): the workload and its agent on `client`; version `v1` of
//! service `shop/web` is nginx behind the agent on `server` (10.77.0.3, meshed),
//! version `v2` is nginx on host `v2` (10.77.0.4, outside the mesh); `shadow`
//! (10.77.0.5) takes mirrored copies. Clients are real: curl, h2load and the
//! Python grpcio client.

use std::process::{Output, Stdio};
use std::time::Duration;

use mesh_tests::{MeshLab, bins, eventually, nginx::Nginx, process::LoggedChild, servers};

const VIP: &str = "10.96.0.70";
const GRPC_VIP: &str = "10.96.0.71";
/// How soon a registry edit must reach the data path (the issue asks for 5 s).
const SWITCH: Duration = Duration::from_secs(5);

/// `shop/web` (v1 meshed on `server`, v2 plain on `v2`) with `routes` (YAML lines
/// indented for the `routes:` key), `shop/rpc` (gRPC, the same two versions) with
/// `rpc_routes`, and `shop/shadow`.
fn registry(routes: &str, rpc_routes: &str) -> String {
    let section = |r: &str| if r.is_empty() { String::new() } else { format!("    routes:\n{r}") };
    format!(
        "services:
  - name: web
    namespace: shop
    vips: [{VIP}]
    ports: [{{name: http, port: 80, target_port: 8080, protocol: http}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\", labels: {{version: v1}}}}
      - {{address: 10.77.0.4, labels: {{version: v2}}}}
{web}  - name: rpc
    namespace: shop
    vips: [{GRPC_VIP}]
    ports: [{{name: grpc, port: 80, target_port: 50051, protocol: grpc}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\", labels: {{version: v1}}}}
      - {{address: 10.77.0.4, labels: {{version: v2}}}}
{rpc}  - name: shadow
    namespace: shop
    ports: [{{name: http, port: 80, target_port: 8080, protocol: http}}]
    endpoints:
      - {{address: 10.77.0.5}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
",
        web = section(routes),
        rpc = section(rpc_routes),
    )
}

/// 90/10 between the versions.
const CANARY: &str = "      - name: canary
        backends:
          - {subset: {version: v1}, weight: 90}
          - {subset: {version: v2}, weight: 10}
";

/// The lab with nginx answering `v1` on `server` and `v2` on `v2`. nginx comes
/// first so it stops before the lab removes the directory holding its files.
struct Lab {
    v1: Nginx,
    v2: Nginx,
    m: MeshLab,
}

impl Lab {
    fn new(mode: &str, routes: &str) -> Self {
        Self::with(mode, routes, "")
    }

    fn with(mode: &str, routes: &str, rpc_routes: &str) -> Self {
        let m = MeshLab::builder(mode, registry(routes, rpc_routes)).hosts(&["v2", "shadow"]).start();
        let nginx = |host: &str, name: &str| {
            let dir = m.dir.path().join(format!("nginx-{name}"));
            std::fs::create_dir_all(&dir).expect("nginx dir");
            Nginx::start(m.host(host), &dir, 8080, &format!("location / {{ return 200 \"{name}\"; }}"))
                .expect("nginx")
        };
        let (v1, v2) = (nginx("server", "v1"), nginx("v2", "v2"));
        Lab { v1, v2, m }
    }

    /// curl from the workload; `-w` after each response.
    fn curl(&self, args: &[&str]) -> Output {
        self.m
            .workload_command("curl")
            .args(["-sS", "--max-time", "30"])
            .args(args)
            .output()
            .expect("curl runs")
    }

    /// `count` requests on one kept-alive connection (curl's URL glob), each reply
    /// as `(body, status, seconds)`.
    fn requests(&self, path: &str, count: usize, extra: &[&str]) -> Vec<(String, u16, f64)> {
        let url = format!("http://{VIP}{path}[1-{count}]");
        let mut args = vec!["-w", " %{http_code} %{time_total}\n"];
        args.extend_from_slice(extra);
        args.push(&url);
        let out = self.curl(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let replies: Vec<(String, u16, f64)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.rsplitn(3, ' ');
                let secs = f.next()?.parse().ok()?;
                let code = f.next()?.parse().ok()?;
                Some((f.next().unwrap_or_default().to_owned(), code, secs))
            })
            .collect();
        assert_eq!(
            replies.len(),
            count,
            "curl {args:?}: {} replies of {count} ({}):\n{text}\nstderr: {}\nagent log:\n{}",
            replies.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.m.client.log_text()
        );
        replies
    }

    /// Which versions answered `path` (each reply must be a 200).
    fn versions(&self, path: &str, count: usize, extra: &[&str]) -> Vec<String> {
        self.requests(path, count, extra)
            .into_iter()
            .map(|(body, code, _)| {
                assert_eq!(code, 200, "{path}: {body}");
                body
            })
            .collect()
    }

    fn metrics(&self) -> String {
        let (_, body) =
            self.m.host("client").http("GET", self.m.client.admin, "/metrics").expect("agent metrics");
        body
    }
}

fn share(versions: &[String], of: &str) -> f64 {
    versions.iter().filter(|v| *v == of).count() as f64 / versions.len() as f64
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

// 1. A 90/10 canary lands within three points of 10 % over 2,000 requests;
//    `meshctl routes` shows it; switching to 0/100 under a steady h2load moves every
//    request within 5 s and fails none.
fn canary_split_and_blue_green_switch_under_load(mode: &str) {
    let lab = Lab::new(mode, CANARY);
    let got = lab.versions("/split/", 2000, &[]);
    let v2 = share(&got, "v2");
    eprintln!("{mode}: 90/10 canary over 2,000 requests: v2 took {:.1} %", v2 * 100.0);
    assert!((0.07..=0.13).contains(&v2), "v2 got {v2} of 2,000 requests; the route gives it 10 %");
    assert_eq!(share(&got, "v1") + v2, 1.0);

    let out = lab
        .m
        .host("control")
        .command(bins::meshctl(), None)
        .expect("meshctl")
        .args(["--control-admin", &format!("http://{}", lab.m.control.admin), "routes", "web"])
        .output()
        .expect("meshctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "meshctl routes: {text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("shop/web{version=v1} 90% (1 endpoint), shop/web{version=v2} 10% (1 endpoint)"),
        "{text}"
    );

    // Steady load for 8 s; the switch happens in the middle of it.
    let v1_before = lab.v1.requests().len();
    let load = lab
        .m
        .workload_command("h2load")
        .args(["--h1", "-c", "4", "-D", "8", &format!("http://{VIP}/load")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("h2load runs (install nghttp2-client)");
    eventually(SWITCH, "the load reaches v1", || (lab.v1.requests().len() > v1_before + 50).then_some(()));
    let before_v2 = lab.v2.requests().len();
    let edited = std::time::Instant::now();
    lab.m.set_registry(&registry(
        "      - name: canary\n        backends:\n          - {subset: {version: v1}, weight: 0}\n          - {subset: {version: v2}, weight: 100}\n",
        "",
    ));
    eventually(SWITCH, "every request goes to v2", || {
        let got = lab.versions("/after/", 20, &[]);
        got.iter().all(|v| v == "v2").then_some(())
    });
    eprintln!("{mode}: registry edit to every request on v2: {:?}", edited.elapsed());
    let out = load.wait_with_output().expect("h2load ends");
    let report = String::from_utf8_lossy(&out.stdout);
    let field = |line: &str, name: &str| -> u64 {
        let l =
            report.lines().find(|l| l.trim_start().starts_with(line)).unwrap_or_else(|| panic!("{report}"));
        l.split(',')
            .find_map(|p| p.trim().strip_suffix(name).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {l:?}"))
    };
    let done = field("requests:", "done");
    eprintln!(
        "{mode}: h2load across the 0/100 switch: {done} requests done, {} failed",
        field("requests:", "failed")
    );
    assert!(done > 100, "h2load made too few requests to say anything:\n{report}");
    assert_eq!((field("requests:", "failed"), field("requests:", "errored")), (0, 0), "{report}");
    assert_eq!(field("status codes:", "2xx"), done, "every request of the load got a 200:\n{report}");
    assert!(lab.v2.requests().len() > before_v2 + 100, "the load moved to v2 after the switch");
}

// 2. A header sends `x-canary: 1` to v2 only; a path regex with a method; a path
//    prefix; the rest goes to either version; a gRPC method route (real grpcio).
fn header_path_method_and_grpc_matches(mode: &str) {
    let routes = "      - name: by-header
        match: [{headers: [{name: x-canary, exact: \"1\"}]}]
        backends: [{subset: {version: v2}}]
      - name: orders-v2
        match: [{path: {regex: \"/api/v2/orders/[0-9]+\"}, method: POST}]
        backends: [{subset: {version: v2}}]
      - name: api
        match: [{path: {prefix: /api}}]
        backends: [{subset: {version: v1}}]
";
    let rpc = "      - name: say-v2
        match: [{path: {exact: /mesh.test.Echo/Say}}]
        backends: [{subset: {version: v2}}]
";
    let lab = Lab::with(mode, routes, rpc);
    assert!(lab.versions("/x/", 20, &["-H", "x-canary: 1"]).iter().all(|v| v == "v2"));
    assert!(lab.versions("/api/v2/orders/", 10, &["-X", "POST"]).iter().all(|v| v == "v2"));
    assert!(lab.versions("/api/v2/orders/", 10, &[]).iter().all(|v| v == "v1"), "GET is not the POST route");
    assert!(lab.versions("/api/other/", 10, &["-H", "x-canary: 0"]).iter().all(|v| v == "v1"));
    let rest = lab.versions("/x/", 20, &[]);
    assert!(share(&rest, "v1") > 0.0 && share(&rest, "v2") > 0.0, "no route: both versions serve: {rest:?}");

    let Some(python) = mesh_tests::grpc::python() else { return };
    let script = lab.m.dir.path().join("grpc_echo.py");
    std::fs::write(&script, mesh_tests::grpc::ECHO_SCRIPT).expect("script");
    let _servers: Vec<LoggedChild> = [("server", "v1"), ("v2", "v2")]
        .iter()
        .map(|(host, name)| {
            let mut cmd = lab.m.host(host).command(&python, None).expect("command");
            cmd.arg(&script).args(["server", "50051", name]);
            let mut p = LoggedChild::spawn("grpc-server", cmd).expect("grpc server");
            p.wait_ready("grpc server ready", Duration::from_secs(30)).expect("grpc server ready");
            p
        })
        .collect();
    let out = lab
        .m
        .workload_command(&python)
        .arg(&script)
        .args(["client", &format!("{GRPC_VIP}:80"), "10", "4"])
        .output()
        .expect("grpc client runs");
    assert!(out.status.success(), "grpc client: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client prints JSON");
    for reply in v["unary"].as_array().expect("unary") {
        assert!(reply.as_str().unwrap_or_default().starts_with("server=v2 "), "Say goes to v2: {v}");
    }
    assert_eq!(v["stream"].as_array().map(Vec::len), Some(4), "Count still works: {v}");
}

// 3. An abort answers its share with the configured status (never reaching the
//    service); a delay adds its time (within 10 %) to its share.
fn faults_abort_and_delay_their_share(mode: &str) {
    let routes = "      - name: flaky
        match: [{path: {prefix: /abort}}]
        fault: {abort: {status: 503, percent: 50}}
      - name: slow
        match: [{path: {prefix: /delay}}]
        fault: {delay: {duration: 300ms, percent: 50}}
";
    let lab = Lab::new(mode, routes);
    let served_before = lab.v1.requests().len() + lab.v2.requests().len();
    let replies = lab.requests("/abort/", 400, &[]);
    let aborted = replies.iter().filter(|(_, code, _)| *code == 503).count();
    let ok = replies.iter().filter(|(_, code, _)| *code == 200).count();
    assert_eq!(aborted + ok, 400, "only 200 and the injected 503: {replies:?}");
    assert!((140..=260).contains(&aborted), "{aborted} of 400 aborted; the route aborts 50 %");
    eprintln!("{mode}: abort 503 to 50 %: {aborted} of 400");
    eventually(Duration::from_secs(5), "nginx logged every request that was sent", || {
        (lab.v1.requests().len() + lab.v2.requests().len() == served_before + ok).then_some(())
    });

    let replies = lab.requests("/delay/", 40, &[]);
    let (slow, fast): (Vec<f64>, Vec<f64>) =
        replies.iter().map(|(_, _, secs)| *secs).partition(|secs| *secs >= 0.25);
    assert!(
        (8..=32).contains(&slow.len()),
        "{} of 40 delayed; the route delays 50 %: {replies:?}",
        slow.len()
    );
    let slow_count = slow.len();
    let (s, f) = (median(slow), median(fast));
    eprintln!("{mode}: delay 300 ms to 50 %: {slow_count} of 40 delayed, median {s:.3} s; others {f:.3} s");
    assert!((0.3..=0.33).contains(&s), "a delayed request took {s}s; the delay is 300 ms (±10 %)");
    assert!(f < 0.1, "an undelayed request took {f}s");
    let metrics = lab.metrics();
    assert!(
        metrics.contains("mesh_faults_injected_total{") && metrics.contains("kind=\"abort\""),
        "{metrics}"
    );
}

// 4. The mirror gets a copy of every request; with the mirror down, or accepting
//    and never answering, the caller's latency stays as it was.
fn mirror_gets_copies_and_a_dead_or_hung_mirror_costs_nothing(mode: &str) {
    let routes = "      - name: mirrored
        mirror: {service: shop/shadow, percent: 100}
";
    let lab = Lab::new(mode, routes);
    let shadow = servers::http(lab.m.host("shadow"), 8080, "shadow").expect("shadow server");
    let timed = |what: &str| -> f64 {
        let replies = lab.requests(&format!("/{what}/"), 30, &[]);
        assert!(replies.iter().all(|(_, code, _)| *code == 200), "{what}: {replies:?}");
        median(replies.iter().map(|r| r.2).collect())
    };
    let healthy = timed("healthy");
    eventually(Duration::from_secs(5), "the shadow got every copy", || {
        (shadow.seen().len() == 30).then_some(())
    });
    drop(shadow);
    let down = timed("down");
    let hung = servers::recorder(lab.m.host("shadow"), 8080).expect("a server that never answers");
    let hanging = timed("hung");
    eprintln!(
        "{mode}: median request with the mirror healthy {healthy:.4} s, down {down:.4} s, hung {hanging:.4} s"
    );
    for (what, secs) in [("down", down), ("hung", hanging)] {
        assert!(
            secs <= healthy * 2.0 + 0.02,
            "with the mirror {what}, a request's median is {secs}s against {healthy}s with it healthy"
        );
    }
    eventually(Duration::from_secs(5), "copies to the dead mirror are counted as failed", || {
        let m = lab.metrics();
        m.lines()
            .any(|l| l.starts_with("mesh_mirrored_requests_total{") && l.contains("outcome=\"failed\""))
            .then_some(())
    });
    drop(hung);
}

// 5. A route that does not compile is refused by the control plane, naming the file,
//    entry and field; the routes in force stay.
fn an_invalid_route_is_refused_and_the_last_good_routes_stay(mode: &str) {
    let good = "      - name: by-header
        match: [{headers: [{name: x-canary, exact: \"1\"}]}]
        backends: [{subset: {version: v2}}]
";
    let lab = Lab::new(mode, good);
    assert!(lab.versions("/x/", 5, &["-H", "x-canary: 1"]).iter().all(|v| v == "v2"));
    lab.m.set_registry(&registry(
        "      - name: by-header\n        match: [{path: {regex: \"/api/(\"}}]\n        backends: [{subset: {version: v1}}]\n",
        "",
    ));
    let line = lab.m.control.wait_log("registry rejected", |v| {
        v["message"].as_str().is_some_and(|m| m.starts_with("registry file rejected"))
    });
    let err = line["error"].as_str().unwrap_or_default();
    assert!(err.contains("services[0] (shop/web): routes[0].match[0].path.regex:"), "{line}");
    assert!(lab.versions("/x/", 5, &["-H", "x-canary: 1"]).iter().all(|v| v == "v2"), "the last good route");
}

mesh_tests::both_modes!(
    canary_split_and_blue_green_switch_under_load,
    header_path_method_and_grpc_matches,
    faults_abort_and_delay_their_share,
    mirror_gets_copies_and_a_dead_or_hung_mirror_costs_nothing,
    an_invalid_route_is_refused_and_the_last_good_routes_stay,
);

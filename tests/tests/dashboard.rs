//! End to end, `meshctl dashboard` in a real browser: while a workload calls three
//! services through the mesh (one healthy, one answering 503, one whose policy
//! denies the caller), the agents' edge reports reach the control plane, whose
//! admin port serves the live graph. Headless Chromium loads the page from the
//! control plane's host; the test reads the expected nodes and edges, with
//! non-zero rates, errors and denials, from the DOM, loads a service's page, and
//! checks that a screenshot of the graph decodes and is not blank.
//!
//! Set `MESH_DASHBOARD_SCREENSHOT=PATH` to keep the screenshot (the README's
//! `docs/dashboard.png` comes from such a run).

use std::{
    collections::HashSet,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_tests::{MeshLab, bins, control::ADMIN_PORT, eventually, servers};
use serde_json::Value;

const API_VIP: &str = "10.96.0.40";
const FLAKY_VIP: &str = "10.96.0.42";
const ADMIN_VIP: &str = "10.96.0.43";

/// `api` answers, `flaky` answers 503, `admin` admits nobody the mesh runs; all
/// three on the server's workload, on ports of their own (a workload port's
/// services must all allow a request).
fn registry() -> String {
    let endpoint =
        "{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}";
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{API_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints: [{endpoint}]
  - name: flaky
    namespace: shop
    vips: [{FLAKY_VIP}]
    ports: [{{port: 80, target_port: 8081, protocol: http}}]
    endpoints: [{endpoint}]
  - name: admin
    namespace: shop
    vips: [{ADMIN_VIP}]
    ports: [{{port: 80, target_port: 8082, protocol: http}}]
    policy: {{authorization: [{{principals: [\"spiffe://cluster.local/ns/shop/sa/nobody\"]}}]}}
    endpoints: [{endpoint}]
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
"
    )
}

/// The workload's traffic: a bounded loop of requests to the three services,
/// stopped when the test ends.
struct Traffic(Child);

impl Traffic {
    fn start(m: &MeshLab) -> Self {
        let script = format!(
            "end=$(($(date +%s) + 120)); while [ $(date +%s) -lt $end ]; do \
             for vip in {API_VIP} {API_VIP} {FLAKY_VIP} {ADMIN_VIP}; do \
             curl -s -o /dev/null --max-time 2 http://$vip/dashboard; done; done"
        );
        let child = m
            .workload_command("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the traffic loop starts");
        Self(child)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin_url(path: &str) -> String {
    format!("http://127.0.0.1:{ADMIN_PORT}{path}")
}

/// GET on the control plane's admin port, from its host.
fn admin_get(m: &MeshLab, path: &str) -> Option<String> {
    let out = m.host("control").command("curl", None).ok()?.args(["-fsS", &admin_url(path)]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn edge<'a>(graph: &'a Value, id: &str) -> Option<&'a Value> {
    graph["edges"].as_array()?.iter().find(|e| e["id"] == id)
}

/// Headless Chromium on the control plane's host (where the admin port listens),
/// with `args` before the URL. Its stdout.
fn chromium(m: &MeshLab, browser: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut cmd: Command = m.host("control").command(browser, None).expect("chromium in the control host");
    cmd.args(["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--virtual-time-budget=5000", "--window-size=1280,800"])
        .args(args)
        .arg(url);
    let out = cmd.output().expect("chromium runs");
    assert!(out.status.success(), "chromium {args:?} {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The start tags in `dom` that carry `attr="value"` (as Chromium serialises them:
/// `>` in a value is `&gt;`, so a tag ends at the first `>`).
fn tags_with<'a>(dom: &'a str, attr: &str, value: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=\"{}\"", value.replace('&', "&amp;").replace('>', "&gt;"));
    dom.match_indices(&needle)
        .filter_map(|(at, _)| {
            let start = dom[..at].rfind('<')?;
            let end = at + dom[at..].find('>')?;
            Some(&dom[start..=end])
        })
        .collect()
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(&tag[at..at + tag[at..].find('"')?])
}

fn number(tag: &str, name: &str) -> f64 {
    attr(tag, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {name} in {tag}"))
}

/// The screenshot decodes, has the window's size, and is no blank page: a graph
/// with nodes, edges and text has many colours.
fn check_screenshot(path: &Path) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a frame size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!((info.width, info.height), (1280, 800), "the window's size");
    let channels = info.color_type.samples();
    let colours: HashSet<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    assert!(colours.len() > 50, "a blank page has few colours; this one has {}", colours.len());
}

fn dashboard_shows_the_live_graph_in_a_browser(mode: &str) {
    let test = "dashboard_shows_the_live_graph_in_a_browser";
    let Some(browser) = mesh_tests::require_tool("chromium", "chromium", test) else { return };
    let m = MeshLab::builder(mode, registry()).start();
    let server = m.host("server");
    let _api = servers::http(server, 8080, "api").expect("api server");
    let _flaky = servers::http_echo_headers(server, 8081, "flaky", 503).expect("flaky server");
    let _admin = servers::http(server, 8082, "admin").expect("admin server");
    let _traffic = Traffic::start(&m);

    // The reports arrive every second: wait for all three edges to show traffic.
    let graph: Value = eventually(Duration::from_secs(45), "the three edges in graph.json", || {
        let g: Value = serde_json::from_str(&admin_get(&m, "/dashboard/graph.json")?).ok()?;
        let api = edge(&g, "shop/frontend->shop/api")?;
        let flaky = edge(&g, "shop/frontend->shop/flaky")?;
        let admin = edge(&g, "shop/frontend->shop/admin")?;
        let ok = api["rps"].as_f64()? > 0.0
            && flaky["error_percent"].as_f64()? > 0.0
            && admin["denials"].as_u64()? > 0;
        ok.then_some(g)
    });
    let api = edge(&graph, "shop/frontend->shop/api").unwrap();
    assert_eq!(api["mtls"], true, "{graph:#}");
    assert_eq!(api["error_percent"], 0.0, "{graph:#}");
    assert!(api["p50_ms"].as_f64().is_some() && api["p99_ms"].as_f64().is_some(), "{graph:#}");
    assert_eq!(edge(&graph, "shop/frontend->shop/flaky").unwrap()["error_percent"], 100.0, "{graph:#}");

    // meshctl prints the URL once the page answers.
    let out = m
        .host("control")
        .command(bins::meshctl(), None)
        .unwrap()
        .args(["dashboard", "--control-admin", &admin_url("")])
        .output()
        .unwrap();
    assert!(out.status.success(), "meshctl dashboard: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), admin_url("/dashboard"));

    // The browser: nodes and edges as the page drew them.
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(&m, &browser, profile.path(), &["--dump-dom"], &admin_url("/dashboard"));
    let node = |id: &str, kind: &str| {
        tags_with(&dom, "data-node", id).into_iter().any(|t| attr(t, "data-kind") == Some(kind))
    };
    assert!(node("shop/frontend", "workload"), "no workload node shop/frontend in\n{dom}");
    for service in ["shop/api", "shop/flaky", "shop/admin"] {
        assert!(node(service, "service"), "no service node {service} in\n{dom}");
    }
    let drawn = |id: &str| {
        let tags = tags_with(&dom, "data-edge", id);
        assert_eq!(tags.len(), 1, "edge {id} drawn once in\n{dom}");
        tags[0]
    };
    let api = drawn("shop/frontend->shop/api");
    assert!(number(api, "data-rps") > 0.0, "{api}");
    assert_eq!(attr(api, "data-mtls"), Some("true"), "{api}");
    assert!(number(drawn("shop/frontend->shop/flaky"), "data-error-percent") > 0.0);
    assert!(number(drawn("shop/frontend->shop/admin"), "data-denials") > 0.0);

    // A service's page: its endpoint and the plots.
    let page =
        chromium(&m, &browser, profile.path(), &["--dump-dom"], &admin_url("/dashboard?service=shop/api"));
    assert!(!tags_with(&page, "data-service", "shop/api").is_empty(), "{page}");
    assert!(!tags_with(&page, "data-endpoint", "10.77.0.3:8080").is_empty(), "{page}");
    assert!(!tags_with(&page, "data-plot", "requests/s").is_empty(), "{page}");

    // The screenshot, written by Chromium in the control host (same filesystem).
    let shot = profile.path().join("dashboard.png");
    let arg = format!("--screenshot={}", shot.display());
    chromium(&m, &browser, profile.path(), &[&arg], &admin_url("/dashboard"));
    check_screenshot(&shot);
    if let Some(keep) = std::env::var_os("MESH_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, &keep).expect("copy the screenshot");
    }
}

mesh_tests::both_modes!(dashboard_shows_the_live_graph_in_a_browser);

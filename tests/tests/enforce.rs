//! End to end, enforcement where the workload is, tried as an attacker would: a
//! real nginx behind the server agent serves distinct bodies for `/public/...` and
//! `/secret...`, and every way around the policy must fail.
//!
//! - plaintext from a host outside the mesh to the endpoint's `IP:port`: refused
//!   under `mtls: strict`, 403 under permissive when the rule names principals,
//!   identity headers stripped when a rule admits it (needs inbound capture: iptables
//!   `--inbound-ports`; eBPF mode waits for `sk_lookup` capture);
//! - a workload dialling the endpoint's IP instead of the VIP: still mutual TLS, the
//!   server sees the caller's identity, no plaintext on the wire;
//! - a shadow service listing the protected workload with an allow-all policy;
//! - tricky paths (dot segments, escapes, `//`, `;`, `?`, `#`, absolute form, `*`)
//!   against a `/public/` prefix rule: the agent refuses them or nginx serves a public
//!   resource, never the secret;
//! - forged identity headers on every path: direct HTTP between agents, a CONNECT
//!   stream marked HTTP (upgrade), a stream relayed as bytes (a port declared `tcp`),
//!   and a client whose first byte comes after the sending agent's detection window.
//!
//! Lab: control plane on `control` (10.77.0.1), workload `frontend` and its agent on
//! `client` (10.77.0.2), nginx (`web`) and its agent on `server` (10.77.0.3), and
//! `outsider` (10.77.0.4), a host with no agent.

use std::{process::Output, time::Duration};

use mesh_tests::{
    MeshLab,
    agent::message,
    capture::{Capture, contains},
    eventually,
    nginx::Nginx,
};

const VIP: &str = "10.96.0.70";
const SHADOW_VIP: &str = "10.96.0.71";
/// The nginx endpoint: the server host's address and the target port.
const ENDPOINT: &str = "10.77.0.3:8080";
const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// What a client forges: an identity the mesh never proved.
const FORGED_XFCC: &str =
    "By=spiffe://cluster.local/ns/shop/sa/web;URI=spiffe://cluster.local/ns/shop/sa/admin";
const FORGED_ID: &str = "spiffe://cluster.local/ns/shop/sa/admin";

/// nginx: `/public/...` says so with the identity headers it got; `/secret...` is the
/// body no path trick may reach.
const LOCATIONS: &str = r#"
    location /public/ { return 200 "public uri=$uri xfcc=[$http_x_forwarded_client_cert] xfci=[$http_x_forwarded_client_identity]\n"; }
    location /secret { return 200 "SECRET-BODY uri=$uri\n"; }
    location / { return 404 "nothing at $uri\n"; }
"#;

/// Service `web` (VIP:80 HTTP, VIP:81 declared TCP, both to nginx) with `policy`
/// (YAML flow mapping), `frontend`, and `extra` services appended.
fn registry(policy: &str, extra: &str) -> String {
    format!(
        "services:
  - name: web
    namespace: shop
    vips: [{VIP}]
    ports: [{{name: http, port: 80, target_port: 8080, protocol: http}}, {{name: raw, port: 81, target_port: 8080, protocol: tcp}}]
    policy: {policy}
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: web, agent_address: \"10.77.0.3:15008\"}}
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
{extra}"
    )
}

/// A policy allowing any authenticated caller below `/public/` (and nothing else).
const PUBLIC_ONLY: &str = "{authorization: [{principals: [\"*\"], path_prefixes: [/public/]}]}";

/// The lab with nginx (`web`) behind the server agent. nginx comes first so it
/// stops before the lab removes the directory holding its files.
struct Mesh {
    nginx: Nginx,
    lab: MeshLab,
}

impl std::ops::Deref for Mesh {
    type Target = MeshLab;
    fn deref(&self) -> &MeshLab {
        &self.lab
    }
}

/// What one HTTP exchange gave.
#[derive(Debug)]
struct Reply {
    /// 0 when no response came (refused, reset).
    status: u16,
    /// Whether the agent answered itself (`x-mesh-error: agent`).
    by_agent: bool,
    body: String,
    /// curl's exit status and stderr when it failed.
    error: Option<String>,
}

fn reply(out: &Output) -> Reply {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or(("", &text));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let by_agent = head.lines().any(|l| l.eq_ignore_ascii_case("x-mesh-error: agent"));
    let error = (!out.status.success())
        .then(|| format!("{} {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    Reply { status, by_agent, body: body.to_owned(), error }
}

impl Mesh {
    fn new(mode: &str, registry_yaml: &str, server_args: &[&str]) -> Self {
        // A short detection window, so the late-first-byte case outwaits it quickly.
        let lab = server_args
            .iter()
            .fold(
                MeshLab::builder(mode, registry_yaml)
                    .hosts(&["outsider"])
                    .identities("shop/frontend", "shop/web")
                    .agent_arg("--detect-timeout")
                    .agent_arg("1s"),
                |b, a| b.server_arg(*a),
            )
            .start();
        let nginx = Nginx::start(lab.host("server"), lab.dir.path(), 8080, LOCATIONS).expect("nginx");
        Self { nginx, lab }
    }

    /// curl from the workload (through both agents) with `args`; `-i` so the head
    /// comes back too.
    fn curl(&self, args: &[&str]) -> Reply {
        let out = self
            .workload_command("curl")
            .args(["-sS", "-i", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        reply(&out)
    }

    /// curl from the outsider host, which has no agent: plaintext straight to `url`.
    fn outsider_curl(&self, args: &[&str]) -> Reply {
        let out = self
            .host("outsider")
            .command("curl", None)
            .unwrap()
            .args(["-sS", "-i", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap();
        reply(&out)
    }

    fn logs(&self) -> String {
        format!(
            "client agent:\n{}\nserver agent:\n{}\nnginx saw:\n{}",
            self.client.log_text(),
            self.server.log_text(),
            self.nginx.requests().join("\n")
        )
    }

    /// The server agent's Prometheus exposition.
    fn server_metrics(&self) -> String {
        self.host("server").http("GET", self.server.admin, "/metrics").unwrap().1
    }
}

/// The identity headers nginx reports for a call from `frontend` over mTLS.
fn proven() -> String {
    format!("xfcc=[By={WEB};URI={FRONTEND}] xfci=[{FRONTEND}]")
}

fn forged_headers() -> [String; 4] {
    [
        "-H".into(),
        format!("x-forwarded-client-cert: {FORGED_XFCC}"),
        "-H".into(),
        format!("x-forwarded-client-identity: {FORGED_ID}"),
    ]
}

fn plaintext_from_outside_is_refused_under_strict_and_unauthenticated_under_permissive(mode: &str) {
    let strict = "{mtls: strict, authorization: [{principals: [\"*\"], path_prefixes: [/public/]}]}";
    let m = Mesh::new(mode, &registry(strict, ""), &["--inbound-ports", "8080"]);
    let url = format!("http://{ENDPOINT}/public/from-outside");

    // Strict: the outsider's plaintext is refused before nginx; meshed callers are not.
    let r = m.outsider_curl(&[&url]);
    if r.status != 0 {
        panic!("strict mode answered plaintext from outside the mesh: {r:?}\n{}", m.logs());
    }
    let refused = m.server.wait_log("the strict refusal", |v| {
        message(v) == "plaintext inbound connection refused" && v["reason"] == "strict"
    });
    assert_eq!(refused["src"].as_str().map(|s| s.starts_with("10.77.0.4:")), Some(true), "{refused}");
    assert!(
        m.server_metrics().lines().any(|l| l.starts_with("mesh_inbound_refused_total")
            && l.contains("reason=\"strict\"")
            && l.contains("service=\"shop/web\"")),
        "the refusal is counted"
    );
    let meshed = m.curl(&[&format!("http://{VIP}/public/meshed")]);
    assert_eq!(meshed.status, 200, "strict does not touch callers over mutual TLS: {meshed:?}\n{}", m.logs());
    assert!(meshed.body.starts_with("public uri=/public/meshed"), "{meshed:?}");
    assert!(
        !m.nginx.requests().iter().any(|l| l.contains("from-outside")),
        "nginx never saw the outsider's request: {:?}",
        m.nginx.requests()
    );

    // Permissive, the rule names principals ("*" = any authenticated caller): the
    // outsider is the principal unauthenticated, which it never matches.
    let permissive = "{mtls: permissive, authorization: [{principals: [\"*\"], path_prefixes: [/public/]}]}";
    m.set_registry(&registry(permissive, ""));
    let r = eventually(Duration::from_secs(10), "permissive takes effect", || {
        let r = m.outsider_curl(&[&url]);
        (r.status != 0).then_some(r)
    });
    assert_eq!((r.status, r.by_agent), (403, true), "{r:?}");

    // A rule without principals admits the outsider: its forged identity headers are
    // removed and none set (no certificate was shown); paths are still normalised.
    let open = "{mtls: permissive, authorization: [{path_prefixes: [/public/]}]}";
    m.set_registry(&registry(open, ""));
    let forged = forged_headers();
    let mut args: Vec<&str> = forged.iter().map(String::as_str).collect();
    args.push(&url);
    let r = eventually(Duration::from_secs(10), "the open rule takes effect", || {
        let r = m.outsider_curl(&args);
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.body.trim(), "public uri=/public/from-outside xfcc=[] xfci=[]", "{r:?}");
    for path in ["/secret", "/public/../secret", "/public/%2e%2e/secret"] {
        let r = m.outsider_curl(&["--path-as-is", &format!("http://{ENDPOINT}{path}")]);
        assert_eq!((r.status, r.by_agent), (403, true), "{path}: {r:?}\n{}", m.logs());
    }
    let r = m.outsider_curl(&[&format!("http://{ENDPOINT}/public/..%2Fsecret")]);
    assert_eq!((r.status, r.by_agent), (400, true), "{r:?}");
}

fn a_meshed_endpoint_called_by_ip_goes_over_mtls(mode: &str) {
    let m = Mesh::new(mode, &registry(PUBLIC_ONLY, ""), &[]);
    let marker = "/public/by-ip-marker-5d1e";
    let cap = Capture::start(m.host("server")).expect("capture");
    let r = m.curl(&[&format!("http://{ENDPOINT}{marker}")]);
    let wire = cap.stop();
    if r.status != 200 {
        panic!("calling the endpoint by IP: {r:?}\n{}", m.logs());
    }
    // The server saw the caller's proven identity: it came through both agents.
    assert_eq!(r.body.trim(), format!("public uri={marker} {}", proven()), "{r:?}");
    let out = m.client.wait_log("outbound access record", |v| {
        v["kind"] == "http" && v["direction"] == "outbound" && v["path"] == marker
    });
    assert_eq!(out["destination_identity"], WEB, "{out}");
    assert_eq!(out["destination_endpoint"], ENDPOINT, "{out}");
    assert!(contains(&wire, &15008u16.to_be_bytes()), "no traffic to the tunnel port ({} bytes)", wire.len());
    assert!(!contains(&wire, marker.as_bytes()), "the request crossed the wire in plaintext");
    assert!(!contains(&wire, b"public uri="), "the response crossed the wire in plaintext");
    // The endpoint's policy holds there too, and the denial is counted for alerts.
    let r = m.curl(&[&format!("http://{ENDPOINT}/secret")]);
    assert_eq!((r.status, r.by_agent), (403, true), "{r:?}");
    let metrics = m.server_metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("mesh_authorization_denied_total{")
            && l.contains("service=\"shop/web\"")
            && l.contains("layer=\"request\"")),
        "the denial is not counted:\n{metrics}"
    );
    // Raw TCP to the endpoint's IP is tunnelled as well; the receiving agent finds the
    // HTTP in it and applies the same rules.
    let out = m.workload_command("bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/10.77.0.3/8080 && printf 'GET /secret HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 5 cat <&3",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
}

fn a_shadow_service_does_not_open_a_protected_workload(mode: &str) {
    // web allows only `payments`; the shadow service lists the same endpoint with no
    // rules at all, over HTTP on one port and declared TCP on another.
    let only_payments = "{authorization: [{principals: [\"spiffe://cluster.local/ns/shop/sa/payments\"]}]}";
    let shadow = format!(
        "  - name: aaa-shadow
    namespace: shop
    vips: [{SHADOW_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}, {{port: 81, target_port: 8080, protocol: tcp}}]
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: web, agent_address: \"10.77.0.3:15008\"}}
"
    );
    let m = Mesh::new(mode, &registry(only_payments, &shadow), &[]);
    for url in [
        format!("http://{SHADOW_VIP}/public/a"),
        format!("http://{SHADOW_VIP}:81/public/a"),
        format!("http://{VIP}/public/a"),
    ] {
        let r = m.curl(&[&url]);
        assert!(
            r.status == 403 || (r.status == 0 && r.error.is_some()),
            "{url}: the shadow service opened the workload: {r:?}\n{}",
            m.logs()
        );
        assert!(!r.body.contains("public uri="), "{url}: {r:?}");
    }
    let denied = m.server.wait_log("the denial naming both services", |v| {
        message(v) == "request denied by authorization policy"
    });
    assert_eq!(denied["services"], "shop/aaa-shadow,shop/web", "{denied}");

    // Now web allows frontend below /public/: through the shadow, exactly that.
    m.set_registry(&registry(PUBLIC_ONLY, &shadow));
    let r = eventually(Duration::from_secs(10), "the new rule takes effect", || {
        let r = m.curl(&[&format!("http://{SHADOW_VIP}/public/a")]);
        (r.status == 200).then_some(r)
    });
    assert!(r.body.starts_with("public uri=/public/a"), "{r:?}");
    for url in [format!("http://{SHADOW_VIP}/secret"), format!("http://{SHADOW_VIP}:81/secret")] {
        let r = m.curl(&[&url]);
        assert_eq!((r.status, r.by_agent), (403, true), "{url}: {r:?}");
    }
    assert!(!m.nginx.requests().iter().any(|l| l.contains("/secret")), "{:?}", m.nginx.requests());
}

/// What the agent must make of a request target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// nginx serves the public resource at this normalised path.
    Public(&'static str),
    /// The agent refuses it with this status.
    Agent(u16),
}

/// Tricky request targets, sent byte for byte (`curl --request-target`), and what
/// must come of them under a `/public/` prefix rule. The agent's own table is
/// `mesh-agent/src/authz/path.rs`.
const PATHS: &[(&str, Want)] = &[
    ("/public/plain", Want::Public("/public/plain")),
    ("/public/../secret", Want::Agent(403)),
    ("/public/./../secret", Want::Agent(403)),
    ("/public/%2e%2e/secret", Want::Agent(403)),
    ("/public/%2E%2e/secret", Want::Agent(403)),
    ("/public/.%2e/secret", Want::Agent(403)),
    ("/public/%2e/%2e%2e/secret", Want::Agent(403)),
    ("//secret", Want::Agent(403)),
    ("/public//..//secret", Want::Agent(403)),
    ("/public/..%2fsecret", Want::Agent(400)),
    ("/public/..%2Fsecret", Want::Agent(400)),
    ("/public%2F..%2Fsecret", Want::Agent(400)),
    ("/public/..%5csecret", Want::Agent(400)),
    ("/public/..\\secret", Want::Agent(400)),
    ("/public/..;/secret", Want::Agent(400)),
    ("/public;x/../secret", Want::Agent(403)),
    ("/public/x;/../../secret", Want::Agent(403)),
    ("/public/%252e%252e/secret", Want::Public("/public/%2e%2e/secret")),
    ("/%70ublic/decoded", Want::Public("/public/decoded")),
    ("/public/q?next=/../secret", Want::Public("/public/q")),
    ("/public/f#/../../secret", Want::Public("/public/f")),
    ("/public/%c0%ae%c0%ae/secret", Want::Agent(400)),
    ("/public/%ff", Want::Agent(400)),
    ("/public/%", Want::Agent(400)),
    ("/public/%00", Want::Agent(400)),
    ("/secret", Want::Agent(403)),
    ("/public", Want::Agent(403)),
    ("/publicity/../secret", Want::Agent(403)),
    ("/SECRET", Want::Agent(403)),
    ("http://web/public/../secret", Want::Agent(403)),
    ("http://web/public/absolute", Want::Public("/public/absolute")),
];

fn paths_are_normalised_before_matching_against_real_nginx(mode: &str) {
    let m = Mesh::new(mode, &registry(PUBLIC_ONLY, ""), &[]);
    let url = format!("http://{VIP}/");
    let mut wrong = Vec::new();
    for &(target, want) in PATHS {
        let r = m.curl(&["--path-as-is", "--request-target", target, &url]);
        // Never a secret, whatever else happens.
        assert!(!r.body.contains("SECRET-BODY"), "{target}: nginx served the secret: {r:?}\n{}", m.logs());
        let ok = match want {
            Want::Public(path) => r.status == 200 && r.body.starts_with(&format!("public uri={path} ")),
            Want::Agent(status) => r.status == status && r.by_agent,
        };
        if !ok {
            wrong.push(format!("{target}: want {want:?}, got {r:?}"));
        }
    }
    // OPTIONS * matches no path prefix.
    let r = m.curl(&["-X", "OPTIONS", "--request-target", "*", &url]);
    assert!(!r.body.contains("SECRET-BODY") && r.status == 403 && r.by_agent, "OPTIONS *: {r:?}");
    assert!(
        wrong.is_empty(),
        "{} of {} paths:\n{}\n{}",
        wrong.len(),
        PATHS.len(),
        wrong.join("\n"),
        m.logs()
    );
    // nginx itself never resolved a request to the secret.
    let seen = m.nginx.requests();
    assert!(
        !seen.iter().any(|l| l.split(' ').nth(1).is_some_and(|uri| uri.starts_with("/secret"))),
        "{seen:?}"
    );
}

fn forged_identity_headers_never_reach_the_app(mode: &str) {
    let m = Mesh::new(mode, &registry(PUBLIC_ONLY, ""), &[]);
    let forged = forged_headers();
    let with_forged = |extra: &[&str], url: String| {
        let mut args: Vec<&str> = forged.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        args.push(&url);
        m.curl(&args)
    };
    let want = |path: &str| format!("public uri={path} {}", proven());

    // Direct HTTP between the agents (ALPN mesh-http/1).
    let r = with_forged(&[], format!("http://{VIP}/public/direct"));
    assert_eq!(r.body.trim(), want("/public/direct"), "direct: {r:?}\n{}", m.logs());

    // A CONNECT stream the sending agent marks HTTP (protocol upgrades ride those).
    let r = with_forged(
        &["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"],
        format!("http://{VIP}/public/upgrade"),
    );
    assert_eq!(r.body.trim(), want("/public/upgrade"), "CONNECT stream: {r:?}\n{}", m.logs());

    // A port declared TCP: the sending agent relays bytes; the receiving one finds HTTP.
    let r = with_forged(&[], format!("http://{VIP}:81/public/raw"));
    assert_eq!(r.body.trim(), want("/public/raw"), "relayed as bytes: {r:?}\n{}", m.logs());

    // A client whose first byte comes after the sending agent's detection window
    // (--detect-timeout 1s): sent as bytes, still served per request on arrival.
    let request = format!(
        "GET /public/late HTTP/1.1\\r\\nHost: web\\r\\nx-forwarded-client-cert: {FORGED_XFCC}\\r\\n\
         x-forwarded-client-identity: {FORGED_ID}\\r\\nConnection: close\\r\\n\\r\\n"
    );
    let script =
        format!("exec 3<>/dev/tcp/{VIP}/80 && sleep 1.5 && printf '{request}' >&3 && timeout 10 cat <&3");
    let out = m.workload_command("bash").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 200"), "late first byte: {text}\n{}", m.logs());
    assert!(text.trim_end().ends_with(&want("/public/late")), "late first byte: {text}");
    m.client.wait_log("the late client's connection sent as bytes", |v| {
        message(v) == "connection closed" && v["direction"] == "outbound" && v["protocol"] == "opaque"
    });
    // And the rules held on that path too.
    let script = format!(
        "exec 3<>/dev/tcp/{VIP}/80 && sleep 1.5 && printf 'GET /secret HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 10 cat <&3"
    );
    let out = m.workload_command("bash").args(["-c", &script]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 403"), "{out:?}");
    assert!(!m.nginx.requests().iter().any(|l| l.contains("/secret")));
}

mesh_tests::both_modes!(
    plaintext_from_outside_is_refused_under_strict_and_unauthenticated_under_permissive,
    a_meshed_endpoint_called_by_ip_goes_over_mtls,
    a_shadow_service_does_not_open_a_protected_workload,
    paths_are_normalised_before_matching_against_real_nginx,
    forged_identity_headers_never_reach_the_app,
);

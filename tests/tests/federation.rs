//! End to end, two federated clusters: a workload of cluster `west` calls a service
//! that cluster `east` exports, through east's east-west gateway, with mutual TLS
//! from west's agent to east's agent and each side seeing the other's identity.
//!
//! Lab (one bridge, separate network namespaces and control planes):
//! - west, trust domain `cluster.local`: control plane on `control` (10.77.0.1), the
//!   workload `frontend` and its agent on `client` (10.77.0.2);
//! - east, trust domain `east.example`: nginx (`web`, exported) and its agent on
//!   `server` (10.77.0.3), control plane on `control-b` (10.77.0.4), the gateway on
//!   `gateway` (10.77.0.5:15443);
//! - `outsider` (10.77.0.6), no agent.
//!
//! Each control plane is given the other's name, trust domain, URL, initial root
//! and the link's shared token (`--federation`). West imports `web` as
//! `web.east` (`web.shop.svc.east.global`, a VIP from its DNS range); each
//! cluster's agents trust the other's root from their own control plane.
//!
//! What is asserted, as an attacker would try it:
//! - the call works and nginx sees both identities in the forwarded client cert;
//! - `meshctl status` on west shows the link to east;
//! - the gateway passed the connection through (it holds no certificate);
//! - east's policy admits west's workload only by name: `*` does not;
//! - a stranger at the gateway reaches nothing: a server name for a host that is
//!   not an exported service's agent is refused, and one for the agent ends at its
//!   mutual TLS without a client certificate.

use std::{process::Output, time::Duration};

use mesh_tests::{
    Agent, Cgroup, Control, Lab, agent::message, bins, eventually, nginx::Nginx, process::LoggedChild,
};
use serde_json::Value;

const WEST_FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const EAST_WEB: &str = "spiffe://east.example/ns/shop/sa/web";
const GATEWAY: &str = "10.77.0.5:15443";
const LINK_TOKEN: &str = "link-west-east-3f9a1c\n";

/// nginx answers with the identity headers the east agent forwarded.
const LOCATIONS: &str = r#"
    location / { return 200 "east web uri=$uri xfcc=[$http_x_forwarded_client_cert]\n"; }
"#;

fn west_registry() -> &'static str {
    "services:
  - name: frontend
    namespace: shop
    ports: [{port: 80}]
    endpoints:
      - {address: 10.77.0.2, node: client, service_account: frontend}
"
}

/// East's `web`, exported, admitting the callers `principals` names (YAML list).
fn east_registry(principals: &str) -> String {
    format!(
        "services:
  - name: web
    namespace: shop
    export: true
    vips: [10.96.0.90]
    ports: [{{name: http, port: 80, target_port: 8080, protocol: http}}]
    policy: {{authorization: [{{principals: {principals}}}]}}
    endpoints:
      - {{address: 10.77.0.3, node: server, service_account: web, agent_address: \"10.77.0.3:15008\"}}
"
    )
}

/// One side's `--federation` file naming the other as its only peer.
fn federation(
    cluster: &str,
    gateways: &str,
    peer: &str,
    peer_td: &str,
    peer_url: &str,
    peer_dir: &std::path::Path,
    own_dir: &std::path::Path,
) -> std::path::PathBuf {
    let token = own_dir.join("link.token");
    std::fs::write(&token, LINK_TOKEN).unwrap();
    let path = own_dir.join("federation.yaml");
    std::fs::write(
        &path,
        format!(
            "cluster: {cluster}
gateways: {gateways}
refresh: 200ms
peers:
  - name: {peer}
    trust_domain: {peer_td}
    url: {peer_url}
    bundle_file: {bundle}
    token_file: {token}
",
            bundle = peer_dir.join("ca").join("ca.pem").display(),
            token = token.display(),
        ),
    )
    .unwrap();
    path
}

struct Clusters {
    // Processes first: they stop before the directories go.
    nginx: Nginx,
    gateway: LoggedChild,
    client: Agent,
    server: Agent,
    west: Control,
    east: Control,
    east_dir: tempfile::TempDir,
    _west_dir: tempfile::TempDir,
    _cgroups: (Cgroup, Cgroup),
    lab: Lab,
}

impl Clusters {
    fn start(mode: &str, principals: &str) -> Self {
        let lab =
            Lab::new(&["control", "client", "server", "control-b", "gateway", "outsider"]).expect("lab");
        let (west_dir, east_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(west_dir.path().join("registry.yaml"), west_registry()).unwrap();
        std::fs::write(east_dir.path().join("registry.yaml"), east_registry(principals)).unwrap();
        let west_fed = federation(
            "west",
            "[]",
            "east",
            "east.example",
            "https://10.77.0.4:15010",
            east_dir.path(),
            west_dir.path(),
        );
        let east_fed = federation(
            "east",
            &format!("[\"{GATEWAY}\"]"),
            "west",
            "cluster.local",
            "https://10.77.0.1:15010",
            west_dir.path(),
            east_dir.path(),
        );
        let fed = |f: &std::path::Path| f.display().to_string();
        let west = Control::start_with_ca(
            lab.host("control"),
            &west_dir.path().join("registry.yaml"),
            west_dir.path(),
            &["client"],
            &["--federation", &fed(&west_fed)],
        )
        .expect("west control plane");
        let east = Control::start_with_ca(
            lab.host("control-b"),
            &east_dir.path().join("registry.yaml"),
            east_dir.path(),
            &["server", "gateway"],
            &["--trust-domain", "east.example", "--federation", &fed(&east_fed)],
        )
        .expect("east control plane");
        let (workload, server_workload) = (Cgroup::new("fed-wl").unwrap(), Cgroup::new("fed-srv").unwrap());
        let client = Agent::start(
            lab.host("client"),
            west.agent_options(mode, "client", "shop/frontend").cgroup(&workload),
        )
        .expect("west agent");
        let server = Agent::start(
            lab.host("server"),
            east.agent_options(mode, "server", "shop/web").cgroup(&server_workload),
        )
        .expect("east agent");
        client.wait_enrolled();
        server.wait_enrolled();
        let mut cmd = lab.host("gateway").command(bins::agent(), None).unwrap();
        cmd.args(["gateway", "--listen", GATEWAY, "--control-plane", &east.url, "--node", "gateway"])
            .arg("--control-plane-ca")
            .arg(&east.ca_pem)
            .arg("--bootstrap-token-file")
            .arg(east.token_file("gateway"))
            .args(["--log-format", "json"]);
        let mut gateway = LoggedChild::spawn("gateway", cmd).expect("gateway");
        gateway.wait_ready("gateway ready", Duration::from_secs(15)).expect("gateway ready");
        let nginx = Nginx::start(lab.host("server"), east_dir.path(), 8080, LOCATIONS).expect("nginx");
        Clusters {
            nginx,
            gateway,
            client,
            server,
            west,
            east,
            east_dir,
            _west_dir: west_dir,
            _cgroups: (workload, server_workload),
            lab,
        }
    }

    /// The VIP west allocated for the imported `web.east`, once west imported it.
    fn imported_vip(&self) -> String {
        eventually(Duration::from_secs(20), "west to import web from east", || {
            let (status, body) =
                self.lab.host("control").http("GET", self.west.admin, "/config_dump").ok()?;
            let dump: Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
            let services = dump["snapshot"]["services"].as_array()?;
            let web = services.iter().find(|s| s["name"] == "web.east")?;
            web["allocated_vips"][0].as_str().map(str::to_owned)
        })
    }

    fn curl(&self, url: &str) -> Output {
        let cg = self._cgroups.0.absolute().to_owned();
        self.lab
            .host("client")
            .command("curl", Some(&cg))
            .unwrap()
            .args(["-sS", "-i", "--max-time", "5", url])
            .output()
            .unwrap()
    }

    fn logs(&self) -> String {
        format!(
            "west control:\n{}\neast control:\n{}\nwest agent:\n{}\neast agent:\n{}\ngateway:\n{}\nnginx saw:\n{}",
            self.west.log_text(),
            self.east.log_text(),
            self.client.log_text(),
            self.server.log_text(),
            self.gateway.log_text(),
            self.nginx.requests().join("\n")
        )
    }
}

fn a_workload_calls_a_service_another_cluster_exports_through_its_gateway(mode: &str) {
    let c = Clusters::start(mode, &format!("[\"{WEST_FRONTEND}\"]"));
    let vip = c.imported_vip();
    let url = format!("http://{vip}/hello");
    let body = eventually(Duration::from_secs(20), "the call to east's web to succeed", || {
        let out = c.curl(&url);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.starts_with("HTTP/1.1 200")).then_some(text)
    });
    // East's agent proved itself as east's web, and forwarded west's frontend as the
    // caller it verified against west's root.
    assert!(body.contains(&format!("xfcc=[By={EAST_WEB};URI={WEST_FRONTEND}]")), "{body}\n{}", c.logs());
    // Through the gateway, which passed the bytes to east's agent.
    let passed = c.gateway.wait_log("the gateway's pass-through record", |v| message(v) == "passing through");
    assert_eq!(passed["agent"], "10.77.0.3:15008", "{passed}");
    assert!(passed["peer"].as_str().is_some_and(|p| p.starts_with("10.77.0.2:")), "{passed}");

    // West's operator sees the link: east, its trust domain, one imported service.
    let out = c
        .lab
        .host("control")
        .command(bins::meshctl(), None)
        .unwrap()
        .env_remove("MESHCTL_CONTROL_ADMIN")
        .env_remove("MESHCTL_AGENTS")
        .args(["status", "--control-admin", &format!("http://{}", c.west.admin)])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.starts_with(&["east", "east.example", "ok", "1"])
        }),
        "meshctl status does not show the federated cluster east:\n{status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A stranger at the gateway: a server name for a host that serves no exported
    // service is refused by the gateway itself...
    let stranger = |name: &str| {
        c.lab
            .host("outsider")
            .command("curl", None)
            .unwrap()
            .args(["-sS", "-k", "--max-time", "5", "--resolve", &format!("{name}:15443:10.77.0.5")])
            .arg(format!("https://{name}:15443/"))
            .output()
            .unwrap()
    };
    let out = stranger("ip4-10-77-0-4.p15010.east.example");
    assert!(!out.status.success(), "the gateway forwarded to east's control plane: {out:?}");
    c.gateway.wait_log("the gateway's refusal", |v| {
        message(v) == "refused a connection"
            && v["reason"].as_str().is_some_and(|r| r.contains("not an agent serving an exported service"))
    });
    // ...and one for the exported agent ends at that agent's mutual TLS.
    let out = stranger("ip4-10-77-0-3.p15008.east.example");
    assert!(!out.status.success(), "a caller without a certificate got through: {out:?}");
    assert_eq!(c.nginx.requests().len(), 1, "nginx saw more than the one federated call: {}", c.logs());

    // East's policy stops naming west's frontend: `*` means any caller of east's own
    // trust domain, so west is refused at east's agent.
    std::fs::write(c.east_dir.path().join("registry.yaml"), east_registry("[\"*\"]")).unwrap();
    eventually(Duration::from_secs(20), "east's agent to refuse west's caller", || {
        let out = c.curl(&format!("http://{vip}/while-the-policy-changes"));
        (!String::from_utf8_lossy(&out.stdout).starts_with("HTTP/1.1 200")).then_some(())
    });
    let out = c.curl(&format!("http://{vip}/after"));
    let denied = String::from_utf8_lossy(&out.stdout);
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}\n{}", c.logs());
    c.server.wait_log("east's denial", |v| {
        message(v).contains("denied") && v.to_string().contains(WEST_FRONTEND)
    });
    assert!(
        !c.nginx.requests().iter().any(|r| r.starts_with("/after")),
        "nginx served a call east's policy refuses: {}",
        c.logs()
    );
}

mesh_tests::both_modes!(a_workload_calls_a_service_another_cluster_exports_through_its_gateway);

//! End to end: the control plane's CA issues the node's workload certificate over
//! the certificate service, authenticated by the node's bootstrap token, only for
//! identities the registry places on that node, and the agent renews it.

use std::time::Duration;

use mesh_tests::{Agent, AgentOptions, Cgroup, Control, Lab, agent::message, eventually, require_root};
use serde_json::Value;

const REGISTRY: &str = "services:
  - name: web
    namespace: shop
    vips: [10.96.0.10]
    ports: [{port: 80, target_port: 8080}]
    endpoints:
      - {address: 10.77.0.2, node: client, service_account: frontend}
";

struct Setup {
    lab: Lab,
    _dir: tempfile::TempDir,
    control: Control,
    token_file: std::path::PathBuf,
    workload: Cgroup,
}

impl Setup {
    fn new(control_args: &[&str]) -> Self {
        let lab = Lab::new(&["control", "client"]).expect("lab");
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("registry.yaml");
        std::fs::write(&registry, REGISTRY).unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "s3cret-client client\n").unwrap();
        let token_file = dir.path().join("client.token");
        std::fs::write(&token_file, "s3cret-client\n").unwrap();
        let ca_dir = dir.path().join("ca");
        let mut args = vec![
            "--bootstrap-tokens".to_owned(),
            tokens.display().to_string(),
            "--ca-dir".to_owned(),
            ca_dir.display().to_string(),
        ];
        args.extend(control_args.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let control = Control::start(lab.host("control"), &registry, &args).expect("control plane");
        let workload = Cgroup::new("wl").expect("cgroup");
        Self { lab, _dir: dir, control, token_file, workload }
    }

    fn agent(&self, identity: &str, extra: &[&str]) -> Agent {
        let mut opts = AgentOptions::new("ebpf")
            .cgroup(&self.workload)
            .arg("--control-plane")
            .arg(self.control.url.clone())
            .arg("--node")
            .arg("client")
            .arg("--identity")
            .arg(identity)
            .arg("--bootstrap-token-file")
            .arg(self.token_file.display().to_string());
        for a in extra {
            opts = opts.arg(*a);
        }
        Agent::start(self.lab.host("client"), opts).expect("agent starts")
    }

    fn certificates(&self, agent: &Agent) -> Value {
        let (_, body) = self.lab.host("client").http("GET", agent.admin, "/config_dump").expect("admin");
        serde_json::from_str::<Value>(&body).expect("json")["certificates"].clone()
    }
}

#[test]
fn agent_gets_its_workload_certificate_and_renews_it() {
    if !require_root("agent_gets_its_workload_certificate_and_renews_it") {
        return;
    }
    let s = Setup::new(&[]);
    // 30 s certificates renewed at 80%: a renewal every ~24 s.
    let agent = s.agent("shop/frontend", &["--cert-ttl", "30s"]);
    let issued = agent.wait_log("certificate issued", |v| message(v) == "workload certificate issued");
    assert_eq!(issued["identity"], "spiffe://cluster.local/ns/shop/sa/frontend");
    let certs = s.certificates(&agent);
    assert_eq!(certs[0]["identity"], "spiffe://cluster.local/ns/shop/sa/frontend", "{certs}");
    let expires = certs[0]["expires_in_seconds"].as_i64().unwrap();
    assert!((20..=31).contains(&expires), "30 s lifetime requested: {certs}");
    let first_not_after = certs[0]["not_after"].as_u64().unwrap();

    // Renewed before expiry: a newer certificate replaces it.
    let renewed = eventually(Duration::from_secs(40), "certificate renewed", || {
        let c = s.certificates(&agent);
        (c[0]["not_after"].as_u64()? > first_not_after).then_some(c)
    });
    assert!(renewed[0]["expires_in_seconds"].as_i64().unwrap() > 20, "{renewed}");
}

#[test]
fn identities_not_hosted_on_the_node_or_bad_tokens_are_refused() {
    if !require_root("identities_not_hosted_on_the_node_or_bad_tokens_are_refused") {
        return;
    }
    let s = Setup::new(&[]);
    // The registry places shop/frontend on node `client`, not shop/payments.
    let agent = s.agent("shop/payments", &[]);
    let line = agent.wait_log("refusal", |v| {
        message(v).contains("Sign") || v["error"].as_str().is_some_and(|e| e.contains("PermissionDenied"))
    });
    assert!(
        line.to_string().contains("PermissionDenied") || line.to_string().contains("permission"),
        "{line}"
    );
    assert_eq!(s.certificates(&agent), Value::Array(vec![]), "nothing issued");
    drop(agent);

    std::fs::write(&s.token_file, "wrong-token\n").unwrap();
    let agent = s.agent("shop/frontend", &[]);
    let line = agent.wait_log("token refusal", |v| message(v) == "cannot fetch the CA trust bundle");
    assert!(line["error"].as_str().unwrap_or_default().contains("Unauthenticated"), "{line}");
    assert_eq!(s.certificates(&agent), Value::Array(vec![]));

    // The token file is re-read: fixing it lets the agent in without a restart.
    std::fs::write(&s.token_file, "s3cret-client\n").unwrap();
    agent.wait_log("certificate issued after the token is fixed", |v| {
        message(v) == "workload certificate issued"
    });
}

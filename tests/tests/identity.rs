//! End to end: the control plane's CA issues the node's workload certificate over
//! the certificate service, authenticated by the node's bootstrap token, only for
//! identities the registry places on that node, and the agent renews it.

use std::time::Duration;

use mesh_tests::{Agent, Cgroup, Control, Lab, agent::message, eventually};
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
    mode: &'static str,
    lab: Lab,
    _dir: tempfile::TempDir,
    control: Control,
    token_file: std::path::PathBuf,
    workload: Cgroup,
}

impl Setup {
    fn new(mode: &'static str) -> Self {
        let lab = Lab::new(&["control", "client"]).expect("lab");
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("registry.yaml");
        std::fs::write(&registry, REGISTRY).unwrap();
        let control = Control::start(lab.host("control"), &registry, &[]).expect("control plane");
        let token_file = control.token_file("client");
        let workload = Cgroup::new("wl").expect("cgroup");
        Self { mode, lab, _dir: dir, control, token_file, workload }
    }

    fn agent(&self, identity: &str, extra: &[&str]) -> Agent {
        let mut opts = self.control.agent_options(self.mode, "client", identity).cgroup(&self.workload);
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

fn agent_gets_its_workload_certificate_and_renews_it(mode: &'static str) {
    let s = Setup::new(mode);
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

fn identities_not_hosted_on_the_node_or_bad_tokens_are_refused(mode: &'static str) {
    let s = Setup::new(mode);
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
    std::fs::write(&s.token_file, "tok-client\n").unwrap();
    agent.wait_log("certificate issued after the token is fixed", |v| {
        message(v) == "workload certificate issued"
    });
}

mesh_tests::both_modes!(
    agent_gets_its_workload_certificate_and_renews_it,
    identities_not_hosted_on_the_node_or_bad_tokens_are_refused
);

//! The plugin's commands against a scripted agent on a temporary unix socket.

use std::{
    collections::HashMap,
    io::{Read, Write},
    os::unix::net::UnixListener,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};

use super::*;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"},{"name":"eth0","sandbox":"NETNS"}],"ips":[{"address":"10.88.0.7/24","gateway":"10.88.0.1","interface":1}],"dns":{}}"#;

/// A scripted agent: answers every request with `status` and `body`, records them.
struct FakeAgent {
    dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<(String, Value)>>>,
}

impl FakeAgent {
    fn start(status: u16, reply: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("agent.sock")).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then Content-Length bytes of body.
                let (head, body) = loop {
                    let n = s.read(&mut chunk).unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .unwrap()
                            .parse()
                            .unwrap();
                        if body.len() >= len {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                };
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                seen.lock().unwrap().push((path, serde_json::from_str(&body).unwrap()));
                let reason = if status == 200 { "OK" } else { "Refused" };
                let _ =
                    write!(s, "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n\r\n{reply}", reply.len());
            }
        });
        Self { dir, requests }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().unwrap().clone()
    }
}

/// A pod netns stand-in (the plugin only checks that the path exists).
fn netns() -> (tempfile::NamedTempFile, String) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let p = f.path().to_string_lossy().into_owned();
    (f, p)
}

fn env_for(command: &str, netns: &str) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<&str, String> = HashMap::from([
        ("CNI_COMMAND", command.to_owned()),
        ("CNI_CONTAINERID", "c0ffee".to_owned()),
        ("CNI_NETNS", netns.to_owned()),
        ("CNI_IFNAME", "eth0".to_owned()),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u-1".to_owned()),
        ("CNI_PATH", "/opt/cni/bin".to_owned()),
    ]);
    move |k| map.get(k).cloned()
}

fn conf(socket: &std::path::Path, extra: &str, prev: Option<&str>) -> Vec<u8> {
    let prev = prev.map(|p| format!(r#","prevResult":{p}"#)).unwrap_or_default();
    format!(
        r#"{{"cniVersion":"1.0.0","name":"pods","type":"mesh-cni","agentSocket":"{}","timeoutSeconds":2{extra}{prev}}}"#,
        socket.display()
    )
    .into_bytes()
}

fn error_of(o: &Outcome) -> Value {
    assert_ne!(o.exit_code, 0, "expected a failure: {o:?}");
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    v
}

#[test]
fn add_hands_the_pod_to_the_agent_and_prints_prev_result_unchanged() {
    let agent = FakeAgent::start(200, r#"{"identity":"spiffe://cluster.local/ns/shop/sa/web"}"#);
    let (_f, ns) = netns();
    let prev = PREV.replace("NETNS", &ns);
    let out = run(&env_for("ADD", &ns), &conf(&agent.socket(), "", Some(&prev)));
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(out.stdout, prev, "a chained plugin passes prevResult through byte for byte");
    assert!(
        out.stderr.contains("pod shop/web-0 served as spiffe://cluster.local/ns/shop/sa/web"),
        "{}",
        out.stderr
    );
    let reqs = agent.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0, ADD_PATH);
    assert_eq!(
        reqs[0].1,
        json!({"container_id":"c0ffee","netns":ns,"ifname":"eth0",
               "pod":{"namespace":"shop","name":"web-0","uid":"u-1"},"ips":["10.88.0.7"]})
    );
}

#[test]
fn add_relays_the_agents_refusal() {
    let agent =
        FakeAgent::start(422, r#"{"code":100,"msg":"pod shop/web-0 is unknown to the control plane"}"#);
    let (_f, ns) = netns();
    let out = run(&env_for("ADD", &ns), &conf(&agent.socket(), "", Some(&PREV.replace("NETNS", &ns))));
    let e = error_of(&out);
    assert_eq!(e["code"], 100);
    assert_eq!(e["msg"], "pod shop/web-0 is unknown to the control plane");
}

#[test]
fn add_needs_prev_result_an_existing_netns_and_a_live_agent() {
    let agent = FakeAgent::start(200, "{}");
    let (_f, ns) = netns();
    let e = error_of(&run(&env_for("ADD", &ns), &conf(&agent.socket(), "", None)));
    assert_eq!(e["code"], code::INVALID_CONFIG);
    assert!(e["msg"].as_str().unwrap().contains("prevResult: missing on ADD"), "{e}");

    let gone = "/var/run/netns/mesh-cni-test-does-not-exist";
    let e = error_of(&run(&env_for("ADD", gone), &conf(&agent.socket(), "", Some(PREV))));
    assert_eq!(e["code"], code::INVALID_ENV);
    assert_eq!(e["msg"], format!("CNI_NETNS: {gone} does not exist"));

    let no_ips = r#"{"cniVersion":"1.0.0","ips":[]}"#;
    let e = error_of(&run(&env_for("ADD", &ns), &conf(&agent.socket(), "", Some(no_ips))));
    assert!(e["msg"].as_str().unwrap().starts_with("prevResult.ips: empty"), "{e}");
    assert!(agent.requests().is_empty(), "nothing invalid reaches the agent");

    let dir = tempfile::tempdir().unwrap();
    let e = error_of(&run(&env_for("ADD", &ns), &conf(&dir.path().join("no.sock"), "", Some(PREV))));
    assert_eq!(e["code"], code::TRY_AGAIN_LATER);
    assert!(e["msg"].as_str().unwrap().contains("unreachable"), "{e}");
}

#[test]
fn excluded_namespaces_pass_through_without_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (_f, ns) = netns();
    let out = run(
        &env_for("ADD", &ns),
        &conf(&dir.path().join("no.sock"), r#","excludeNamespaces":["shop"]"#, Some(PREV)),
    );
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, PREV));
}

#[test]
fn del_succeeds_when_the_agent_is_gone_and_relays_its_answer_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&env_for("DEL", ""), &conf(&dir.path().join("no.sock"), "", None));
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""), "{out:?}");

    let agent = FakeAgent::start(200, "{}");
    let out = run(&env_for("DEL", ""), &conf(&agent.socket(), "", Some(PREV)));
    assert_eq!(out.exit_code, 0, "{out:?}");
    assert_eq!(
        agent.requests()[0],
        (
            DEL_PATH.to_owned(),
            json!({"container_id":"c0ffee","netns":null,"ifname":"eth0","pod":{"namespace":"shop","name":"web-0","uid":"u-1"}})
        )
    );

    let agent = FakeAgent::start(500, r#"{"code":103,"msg":"closing listeners failed"}"#);
    let e = error_of(&run(&env_for("DEL", ""), &conf(&agent.socket(), "", None)));
    assert_eq!(e["code"], 103);
}

#[test]
fn check_asks_the_agent_and_needs_a_version_that_has_check() {
    let agent = FakeAgent::start(200, "{}");
    let (_f, ns) = netns();
    let out = run(&env_for("CHECK", &ns), &conf(&agent.socket(), "", Some(PREV)));
    assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""), "{out:?}");
    assert_eq!(agent.requests()[0].0, CHECK_PATH);

    let old = String::from_utf8(conf(&agent.socket(), "", Some(PREV))).unwrap().replace("1.0.0", "0.3.1");
    let out = run(&env_for("CHECK", &ns), old.as_bytes());
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((v["code"].as_u64(), v["cniVersion"].as_str()), (Some(1), Some("0.3.1")));
}

#[test]
fn agent_answers_it_cannot_parse_are_protocol_errors() {
    let agent = FakeAgent::start(502, "<html>bad gateway</html>");
    let (_f, ns) = netns();
    let e = error_of(&run(&env_for("ADD", &ns), &conf(&agent.socket(), "", Some(PREV))));
    assert_eq!(e["code"], code::AGENT_PROTOCOL);
    assert!(e["msg"].as_str().unwrap().contains("answered 502 <html>"), "{e}");
}

#[test]
fn version_and_bad_input_before_any_config() {
    let get = |k: &str| (k == "CNI_COMMAND").then(|| "VERSION".to_owned());
    let out = run(&get, br#"{"cniVersion":"0.4.0"}"#);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((out.exit_code, v["cniVersion"].as_str()), (0, Some("0.4.0")));
    assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("1.0.0")));

    let (_f, ns) = netns();
    let e = error_of(&run(&env_for("ADD", &ns), b"{\"cniVersion\":"));
    assert_eq!(e["code"], code::DECODE);
    let e = error_of(&run(&|_: &str| None, b"{}"));
    assert_eq!(e["code"], code::INVALID_ENV);
}

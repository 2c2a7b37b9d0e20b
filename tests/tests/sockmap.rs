//! Same-node acceleration (`--sockmap on`, off by default): the loopback leg between
//! a workload and its agent skips the TCP stack through sk_msg. For clients that
//! wait on readiness (epoll/poll, as curl, nginx and event loops do) it must change
//! nothing they can see: every byte arrives in order, a half-close is still a
//! half-close, a reset still ends the connection, a real server writing with
//! sendfile(2) still delivers its file, and the agents serve the next connection.
//! The counters prove the leg was in fact accelerated, so none of this passes by
//! going through TCP instead.
//!
//! Not asserted here, because they fail, which is why the flag stays off (README,
//! "Same-node acceleration", has the reproductions): a client that blocks in
//! `recv()` on one thread while another thread writes and half-closes can wait for
//! ever for bytes already delivered (6 of 7 tries on kernel 6.18, even with no send
//! redirected: the socket being in the sockhash is enough), and a sender faster than
//! the agent reads (iperf3) gets ENOMEM from `write()` instead of waiting.
//!
//! iptables mode has no sockhash: there, the flag is refused by name at start.

use std::{process::Command, time::Duration};

use mesh_tests::{Agent, MeshLab, bins, both_modes, eventually, nginx::Nginx, servers};
use serde_json::Value;

const HTTP_VIP: &str = "10.96.0.40";
const ECHO: &str = "10.96.0.41:7000";

fn registry() -> String {
    let endpoint =
        "{address: 10.77.0.3, node: server, service_account: api, agent_address: \"10.77.0.3:15008\"}";
    format!(
        "services:
  - name: api
    namespace: shop
    vips: [{HTTP_VIP}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints: [{endpoint}]
  - name: echo
    namespace: shop
    vips: [10.96.0.41]
    ports: [{{port: 7000, protocol: tcp}}]
    endpoints: [{endpoint}]
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints:
      - {{address: 10.77.0.2, node: client, service_account: frontend}}
"
    )
}

/// The agent's acceleration counters (`/stats` → `ebpf.sockmap`).
fn accel(agent: &Agent) -> Value {
    let (status, body) = agent.socket_request("GET", "/stats").expect("agent /stats");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("/stats is JSON");
    v["ebpf"]["sockmap"].clone()
}

fn counter(v: &Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or_else(|| panic!("no {name} in {v}"))
}

/// An event-driven echo client (poll, then non-blocking reads and writes): sends
/// `bytes` pseudo-random bytes from one thread, half-closes, and reads the echo on
/// another until EOF. Prints `ok N`, `MISMATCH N` or `ERR ...`.
const POLLING_ECHO: &str = r#"
import socket, sys, threading
n = int(sys.argv[1])
s = socket.create_connection(("10.96.0.41", 7000), timeout=20)
data = bytes((i * 7 + i // 251) % 256 for i in range(n))
def write():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=write)
t.start()
got = bytearray()
try:
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    t.join()
    print("ok" if got == data else "MISMATCH", len(got))
except Exception as e:
    print("ERR", e, len(got))
"#;

fn polling_echo(m: &MeshLab, bytes: usize) {
    let out = m
        .workload_command("python3")
        .args(["-c", POLLING_ECHO, &bytes.to_string()])
        .output()
        .expect("running python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        format!("ok {bytes}"),
        "echo of {bytes} bytes: {}\nclient agent:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.client.log_text()
    );
}

fn probe(m: &MeshLab, args: &[&str]) -> Value {
    let out = m
        .workload_command(bins::probe())
        .args(["--connect", ECHO, "--timeout", "20s"])
        .args(args)
        .output()
        .expect("running mesh-probe");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "mesh-probe {args:?}: {} {text} {}\nclient agent:\n{}\nserver agent:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            m.client.log_text(),
            m.server.log_text()
        )
    })
}

fn accelerated_legs_keep_every_byte_and_every_close(mode: &str) {
    if mode == "iptables" {
        // Refused before anything is set up, naming the flag and what it needs.
        let out = Command::new("timeout")
            .arg("30")
            .arg(bins::agent())
            .args(["run", "--mode", "iptables", "--sockmap", "on"])
            .output()
            .expect("running mesh-agent");
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success() && out.status.code() != Some(124), "{}: {said}", out.status);
        assert!(said.contains("invalid --sockmap") && said.contains("eBPF"), "{said}");
        return;
    }

    let m = MeshLab::builder(mode, registry()).agent_arg("--sockmap=on").start();
    let _echo = servers::echo(m.host("server"), 7000).unwrap();
    let site = tempfile::tempdir().unwrap();
    // 16 MiB that nginx sends with sendfile(2): large writes from a real server.
    let big: Vec<u8> = mesh_tests::attacker::pseudo_random(16 << 20, 7);
    std::fs::create_dir(site.path().join("files")).unwrap();
    std::fs::write(site.path().join("files/big"), &big).unwrap();
    let locations = format!("sendfile on; location /files/ {{ root {}; }}", site.path().display());
    let _nginx = Nginx::start(m.host("server"), site.path(), 8080, &locations).unwrap();
    let before = accel(&m.client);

    // 16 MiB each way through the accelerated leg while the writer half-closes at
    // the end: every byte back, in order, and the echo's own close arrives as EOF.
    // Then a short exchange, where the half-close follows the first bytes at once.
    polling_echo(&m, 16 << 20);
    polling_echo(&m, 5);

    // The leg was accelerated: the client's agent put both ends of each connection in
    // the map and handed sends across it, both ways (a handed-over send carries at
    // most about half a MiB, so 32 MiB takes more than 32). The server's agent
    // delivers to its workload over TCP: only a workload's redirected connect is
    // accelerated, so nothing is added there.
    let after = accel(&m.client);
    assert!(counter(&after, "sockets_added") >= counter(&before, "sockets_added") + 4, "{before} -> {after}");
    assert!(
        counter(&after, "sends_redirected") > counter(&before, "sends_redirected") + 32,
        "32 MiB took 32 handed-over sends or fewer: {before} -> {after}"
    );
    assert_eq!(counter(&accel(&m.server), "sockets_added"), 0, "the server side has no redirected connect");

    // A real server's large sendfile(2) writes, through the L7 path and the
    // accelerated leg to curl: the file arrives whole.
    let got = site.path().join("got");
    let out = m
        .workload_command("curl")
        .args(["-fsS", "--max-time", "20", "-o"])
        .arg(&got)
        .arg(format!("http://{HTTP_VIP}/files/big"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&got).unwrap() == big, "the file arrived altered");

    // Resets: clients that reset right after sending. Each ends its connection in
    // both agents (none left open), and the agents serve the next one.
    for _ in 0..10 {
        probe(&m, &["send", "--hex", "474554202f", "--reset"]);
    }
    for (side, agent) in m.agents() {
        eventually(Duration::from_secs(15), &format!("{side} agent holds no connection"), || {
            let (_, body) = agent.socket_request("GET", "/stats").ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            (v["connections"]["active"].as_u64() == Some(0)).then_some(())
        });
    }
    polling_echo(&m, 65536);
    for (side, agent) in m.agents() {
        assert!(agent.find(|v| v["level"] == "ERROR").is_none(), "{side}: {}", agent.log_text());
    }
}

both_modes!(accelerated_legs_keep_every_byte_and_every_close);

//! End to end, names that route: a workload resolves registry hostnames through its
//! agent's DNS and reaches the service by name, in both interception modes.
//!
//! - `getent hosts catalog.shop.svc.cluster.local` gives the service's VIP, and
//!   `curl http://catalog.shop.svc.cluster.local/` reaches nginx behind the server
//!   agent; a service with a hostname and no VIP gets one from the control plane
//!   (240.240.0.0/16) and is reached by name the same way;
//! - other names go to the node's resolver, here a fake one the test runs on
//!   `outsider` (the client agent's `--dns-upstream`), answering over UDP and TCP: a
//!   name whose UDP answer is truncated is still resolved (glibc retries over TCP,
//!   through the agent); a DNS-over-TCP client is answered too;
//! - a flood of a few thousand queries as fast as one socket sends them does not
//!   stall the agent: a registry name answers promptly during it, a forwarded one
//!   after it, the drops are counted, the agent stays ready.
//!
//! The workload's resolver is its own /etc/resolv.conf, bind-mounted in a mount
//! namespace of its own to name 10.77.0.53, an address nothing answers on: every
//! answer it gets came through the agent, and no query leaves the lab.
//!
//! Lab: control plane on `control` (10.77.0.1), the workload and its agent on
//! `client` (10.77.0.2), nginx and its agent on `server` (10.77.0.3), the fake
//! resolver on `outsider` (10.77.0.4).

use std::{
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    path::PathBuf,
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{MeshLab, eventually, nginx::Nginx};

const VIP: &str = "10.96.0.80";
const CATALOG: &str = "catalog.shop.svc.cluster.local";
const LEGACY: &str = "legacy.shop.example";
/// What the fake resolver answers for any other name.
const ELSEWHERE: &str = "192.0.2.77";
/// A name whose UDP answer is truncated; over TCP it is this.
const BIG: &str = "big.example.test";
const BIG_ADDR: &str = "192.0.2.99";
/// Longer than the workload's resolver takes to ask a second time (`timeout:2`),
/// shorter than a third.
const RETRIED_ONCE: Duration = Duration::from_millis(3500);

fn registry() -> String {
    let endpoint =
        r#"{address: 10.77.0.3, node: server, service_account: api, agent_address: "10.77.0.3:15008"}"#;
    format!(
        "services:
  - name: catalog
    namespace: shop
    vips: [{VIP}]
    hostnames: [{CATALOG}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints: [{endpoint}]
  - name: legacy
    namespace: shop
    hostnames: [{LEGACY}]
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints: [{endpoint}]
  - name: frontend
    namespace: shop
    ports: [{{port: 80}}]
    endpoints: [{{address: 10.77.0.2, node: client, service_account: frontend}}]
"
    )
}

/// The lab, nginx behind the server agent, the fake resolver, and the workload's
/// resolv.conf. nginx first so it stops before the lab removes its directory.
struct Dns {
    nginx: Nginx,
    resolver: FakeResolver,
    resolv_conf: PathBuf,
    lab: MeshLab,
}

impl std::ops::Deref for Dns {
    type Target = MeshLab;
    fn deref(&self) -> &MeshLab {
        &self.lab
    }
}

impl Dns {
    fn start(mode: &str) -> Self {
        Self::start_with(mode, &[])
    }

    /// The lab with `client_args` added to the client agent's command line.
    fn start_with(mode: &str, client_args: &[&str]) -> Self {
        let mut builder = MeshLab::builder(mode, registry())
            .hosts(&["outsider"])
            .client_arg("--dns-upstream")
            .client_arg("10.77.0.4");
        for arg in client_args {
            builder = builder.client_arg(*arg);
        }
        let lab = builder.start();
        let nginx = Nginx::start(
            lab.host("server"),
            lab.dir.path(),
            8080,
            r#"location / { return 200 "served $host$uri\n"; }"#,
        )
        .expect("nginx");
        let resolver = FakeResolver::start(&lab);
        let resolv_conf = lab.dir.path().join("resolv.conf");
        std::fs::write(&resolv_conf, "nameserver 10.77.0.53\noptions timeout:2 attempts:2\n").unwrap();
        let dns = Self { nginx, resolver, resolv_conf, lab };
        // The snapshot with both services is applied once the name answers with its
        // allocated VIP (before, the query would have been forwarded).
        eventually(Duration::from_secs(15), "the agent answers the registry's names", || {
            String::from_utf8_lossy(&dns.getent(LEGACY).stdout).starts_with("240.240.").then_some(())
        });
        dns.resolver.reset();
        dns
    }

    /// `program args` in the workload, with the workload's resolv.conf in place.
    fn workload(&self, program: &str, args: &[&str]) -> Output {
        self.workload_command("unshare")
            .args(["--mount", "sh", "-c", r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#])
            .arg(&self.resolv_conf)
            .arg(program)
            .args(args)
            .output()
            .unwrap()
    }

    fn getent(&self, name: &str) -> Output {
        self.workload("getent", &["hosts", name])
    }

    /// The address `getent hosts` gives for `name`, with how long it took.
    fn resolve(&self, name: &str) -> (String, Duration) {
        let started = Instant::now();
        let out = self.getent(name);
        let took = started.elapsed();
        assert!(out.status.success(), "getent hosts {name}: {out:?}\n{}", self.logs());
        let text = String::from_utf8_lossy(&out.stdout);
        (text.split_whitespace().next().unwrap_or_default().to_owned(), took)
    }

    fn curl(&self, url: &str) -> String {
        let out = self.workload("curl", &["-sS", "--max-time", "10", url]);
        assert!(out.status.success(), "curl {url}: {out:?}\n{}", self.logs());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn client_metrics(&self) -> String {
        self.host("client").http("GET", self.client.admin, "/metrics").unwrap().1
    }

    fn logs(&self) -> String {
        format!("client agent:\n{}\nnginx saw:\n{}", self.client.log_text(), self.nginx.requests().join("\n"))
    }
}

/// The sum of a counter's series whose labels contain `labels`.
fn counter(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn registry_names_resolve_to_their_vips_and_reach_the_service(mode: &str) {
    let m = Dns::start(mode);
    let (addr, _) = m.resolve(CATALOG);
    assert_eq!(addr, VIP);
    assert_eq!(m.curl(&format!("http://{CATALOG}/")), format!("served {CATALOG}/\n"));

    // No VIP in the registry: the control plane allocated one, and it routes.
    let (allocated, _) = m.resolve(LEGACY);
    let ip: std::net::Ipv4Addr = allocated.parse().unwrap();
    assert_eq!(ip.octets()[..2], [240, 240], "{allocated}");
    assert_eq!(m.curl(&format!("http://{LEGACY}/hello")), format!("served {LEGACY}/hello\n"));
    assert_eq!(m.resolver.queries(), 0, "registry names never reach the node's resolver");
    let metrics = m.client_metrics();
    assert!(counter(&metrics, "mesh_dns_queries_total", "answer=\"registry\"") >= 2.0, "{metrics}");
}

fn other_names_go_to_the_nodes_resolver_over_udp_and_tcp(mode: &str) {
    let m = Dns::start(mode);
    let (addr, _) = m.resolve("elsewhere.example.test");
    assert_eq!(addr, ELSEWHERE);
    assert!(m.resolver.queries() > 0);
    // Truncated over UDP: glibc asks again over TCP, through the agent.
    let (addr, _) = m.resolve(BIG);
    assert_eq!(addr, BIG_ADDR);
    assert!(m.resolver.tcp_queries() > 0, "the retry came over TCP");
    // A DNS-over-TCP client: a registry name and a forwarded one on one connection.
    let out = m.workload("python3", &["-c", TCP_CLIENT, CATALOG, "elsewhere.example.test"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{CATALOG} {VIP}\nelsewhere.example.test {ELSEWHERE}\n")
    );
}

fn a_query_flood_does_not_stall_the_agent(mode: &str) {
    // How many of the flood's packets reach the agent depends on how fast it drains
    // its socket (a few hundred of 3,000 on a busy machine, in iptables mode): a
    // source budget of 100/s (bursts of 200) is surely spent whatever the count.
    let m = Dns::start_with(mode, &["--dns-forward-rate", "100"]);
    // Forwarded names as fast as one socket sends them, in the background.
    let flood = m.workload_command("python3").args(["-c", FLOOD, "3000"]).spawn().unwrap();
    // The workload's resolver waits 2 s before asking again: a name answered within
    // one retry was answered while the flood was on. A query that arrives while the
    // socket is full is lost in the kernel, and one behind the flood's backlog may
    // find the source's budget spent; the retry then finds it answered.
    let (addr, took) = m.resolve(CATALOG);
    assert_eq!(addr, VIP);
    assert!(took < RETRIED_ONCE, "a registry name took {took:?} during the flood");
    let out = flood.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (addr, took) = m.resolve("after.example.test");
    assert_eq!(addr, ELSEWHERE);
    assert!(took < RETRIED_ONCE, "a forwarded name took {took:?} after the flood");
    let metrics = m.client_metrics();
    // What did not fit (the forwarding slots, or the source's rate) was dropped and
    // counted; what did not reach the agent was dropped by the socket's bounded buffer.
    assert!(counter(&metrics, "mesh_dns_dropped_total", "reason=\"forward") > 0.0, "{metrics}");
    assert!(counter(&metrics, "mesh_limit_hits_total", "limit=\"dns_forward") > 0.0, "{metrics}");
    assert_eq!(m.host("client").http("GET", m.client.admin, "/ready").unwrap().0, 200);
    assert!(!m.client.log_text().contains("panicked"), "{}", m.logs());
}

mesh_tests::both_modes!(
    registry_names_resolve_to_their_vips_and_reach_the_service,
    other_names_go_to_the_nodes_resolver_over_udp_and_tcp,
    a_query_flood_does_not_stall_the_agent,
);

/// `python3 -c FLOOD N`: N queries for distinct names outside the registry, sent
/// from one unconnected UDP socket without waiting for answers (a bounded loop).
const FLOOD: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[1])):
    name = b"".join(bytes([len(l)]) + l for l in (b"flood%d" % i, b"example", b"test")) + b"\0"
    s.sendto(struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1), ("10.77.0.53", 53))
"#;

/// `python3 -c TCP_CLIENT NAME...`: A queries over one DNS-over-TCP connection;
/// prints each name with its first address (or `-`).
const TCP_CLIENT: &str = r#"
import socket, struct, sys
def recv(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
s = socket.create_connection(("10.77.0.53", 53), timeout=5)
for i, name in enumerate(sys.argv[1:]):
    q = struct.pack(">HHHHHH", i + 1, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s.sendall(struct.pack(">H", len(q)) + q)
    r = recv(s, struct.unpack(">H", recv(s, 2))[0])
    answers = struct.unpack(">H", r[6:8])[0]
    print(name, socket.inet_ntoa(r[-4:]) if answers else "-")
"#;

/// The node's resolver as far as the client agent knows: on `outsider` port 53, UDP
/// and TCP, answering every A question with [`ELSEWHERE`] (or [`BIG_ADDR`] for
/// [`BIG`] over TCP, whose UDP answer is truncated) and other types with no answer.
struct FakeResolver {
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FakeResolver {
    fn start(lab: &MeshLab) -> Self {
        let (udp, tcp): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let host = lab.host("outsider");
        let (count, halt) = (Arc::clone(&udp), Arc::clone(&stop));
        let udp_thread = host
            .spawn_in(move || {
                let socket = UdpSocket::bind("0.0.0.0:53").expect("bind udp/53");
                socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut buf = [0u8; 1500];
                while !halt.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
                    count.fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = answer(&buf[..n], false) {
                        let _ = socket.send_to(&reply, from);
                    }
                }
            })
            .unwrap();
        let (count, halt) = (Arc::clone(&tcp), Arc::clone(&stop));
        let tcp_thread = host
            .spawn_in(move || {
                let listener = TcpListener::bind("0.0.0.0:53").expect("bind tcp/53");
                listener.set_nonblocking(true).unwrap();
                while !halt.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut len = [0u8; 2];
                    while s.read_exact(&mut len).is_ok() {
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if s.read_exact(&mut q).is_err() {
                            break;
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                        let Some(reply) = answer(&q, true) else { break };
                        let mut frame = (reply.len() as u16).to_be_bytes().to_vec();
                        frame.extend_from_slice(&reply);
                        if s.write_all(&frame).is_err() {
                            break;
                        }
                    }
                }
            })
            .unwrap();
        // Both sockets are bound before the agent needs them.
        std::thread::sleep(Duration::from_millis(100));
        Self { udp, tcp, stop, threads: vec![udp_thread, tcp_thread] }
    }

    fn queries(&self) -> usize {
        self.udp.load(Ordering::Relaxed) + self.tcp.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.udp.store(0, Ordering::Relaxed);
        self.tcp.store(0, Ordering::Relaxed);
    }

    fn tcp_queries(&self) -> usize {
        self.tcp.load(Ordering::Relaxed)
    }
}

impl Drop for FakeResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The fake resolver's answer to `query` (`None` for what is not a query).
fn answer(query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(i)?);
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
        i += 1 + len;
    }
    let question_end = i + 5;
    let qtype = u16::from_be_bytes([*query.get(i + 1)?, *query.get(i + 2)?]);
    let name = labels.join(".");
    let truncated = name == BIG && !tcp;
    let addr: std::net::Ipv4Addr = if name == BIG { BIG_ADDR } else { ELSEWHERE }.parse().unwrap();
    let answers = u16::from(qtype == 1 && !truncated);
    let flags: u16 = 0x8180 | if truncated { 0x0200 } else { 0 };
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]);
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&answers.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..question_end)?);
    if answers == 1 {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&addr.octets());
    }
    Some(r)
}

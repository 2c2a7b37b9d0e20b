//! The DNS service over real loopback sockets, without interception: registry
//! answers over UDP and TCP, forwarding, FORMERR, and a flood that must not keep a
//! registry name from being answered.

use std::time::Duration;

use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use mesh_api as api;

use super::*;
use crate::discovery::table::RouteTable;

fn routes() -> Arc<RouteStore> {
    let snapshot = api::Snapshot {
        services: vec![api::Service {
            name: "catalog".into(),
            namespace: "shop".into(),
            vips: vec!["10.96.0.20".into()],
            hostnames: vec!["catalog.shop.svc.cluster.local".into()],
            ports: vec![api::ServicePort { port: 80, ..Default::default() }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let store = RouteStore::new(true);
    store.apply(RouteTable::build(1, &snapshot, 10).unwrap());
    Arc::new(store)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// A fake upstream resolver: answers every query with 192.0.2.1 unless `silent`.
async fn upstream(silent: bool) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if silent {
                continue;
            }
            let mut m = Message::from_vec(&buf[..n]).unwrap();
            m.metadata.message_type = MessageType::Response;
            let name = m.queries[0].name().clone();
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                name,
                5,
                RData::A(hickory_proto::rr::rdata::A([192, 0, 2, 1].into())),
            ));
            let _ = socket.send_to(&m.to_vec().unwrap(), from).await;
        }
    });
    addr
}

fn start(settings: DnsSettings) -> (Arc<Dns>, SocketAddr, SocketAddr, CancellationToken) {
    let dns = Dns::new(DnsSettings { port: 0, ..settings }, routes(), SocketFactory::new(0));
    let listeners = dns.bind(&SocketFactory::new(0), false).unwrap();
    let udp = listeners.udp[0].local_addr().unwrap();
    let tcp = listeners.tcp[0].local_addr().unwrap();
    let stop = CancellationToken::new();
    dns.spawn(listeners, &stop);
    (dns, udp, tcp, stop)
}

async fn ask_udp(server: SocketAddr, packet: &[u8]) -> Option<Message> {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf)).await.ok()?.unwrap();
    Some(Message::from_vec(&buf[..n]).unwrap())
}

fn first_a(m: &Message) -> Option<std::net::Ipv4Addr> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

#[tokio::test]
async fn registry_names_over_udp_and_tcp_others_forwarded() {
    let up = upstream(false).await;
    let (_dns, udp, tcp, stop) = start(DnsSettings { upstreams: vec![up], ..Default::default() });

    let m = ask_udp(udp, &query(1, "catalog.shop.svc.cluster.local.")).await.unwrap();
    assert_eq!(first_a(&m), Some([10, 96, 0, 20].into()));
    let m = ask_udp(udp, &query(2, "elsewhere.example.")).await.unwrap();
    assert_eq!((m.metadata.id, first_a(&m)), (2, Some([192, 0, 2, 1].into())));

    let mut s = TcpStream::connect(tcp).await.unwrap();
    forward::write_frame(&mut s, &query(3, "catalog.shop.svc.cluster.local.")).await.unwrap();
    let m = Message::from_vec(&forward::read_frame(&mut s).await.unwrap().unwrap()).unwrap();
    assert_eq!((m.metadata.id, first_a(&m)), (3, Some([10, 96, 0, 20].into())));
    stop.cancel();
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_nothing_and_the_server_goes_on() {
    let (_dns, udp, _tcp, stop) = start(DnsSettings::default());
    let mut cut = query(5, "catalog.shop.svc.cluster.local.");
    cut.truncate(17);
    let m = ask_udp(udp, &cut).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(ask_udp(udp, &[0xff; 5]).await.is_none(), "no answer to five bytes");
    let m = ask_udp(udp, &query(6, "catalog.shop.svc.cluster.local.")).await.unwrap();
    assert_eq!(first_a(&m), Some([10, 96, 0, 20].into()));
    stop.cancel();
}

#[tokio::test]
async fn a_forward_flood_is_bounded_and_registry_names_still_answer() {
    // The upstream never answers: every forward holds its slot until the timeout.
    let up = upstream(true).await;
    let settings = DnsSettings {
        upstreams: vec![up],
        max_forwards: 8,
        forward_rate: 1_000_000,
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let (dns, udp, _tcp, stop) = start(settings);
    let flooder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..2000u16 {
        flooder.send_to(&query(i, &format!("flood-{i}.example.")), udp).await.unwrap();
    }
    let started = Instant::now();
    let m = ask_udp(udp, &query(9999, "catalog.shop.svc.cluster.local."))
        .await
        .expect("answered during the flood");
    assert_eq!(first_a(&m), Some([10, 96, 0, 20].into()));
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(dns.forwards.available_permits(), 0, "every slot taken, no more");
    stop.cancel();
}

#[tokio::test]
async fn a_source_over_its_rate_is_dropped() {
    let up = upstream(false).await;
    let settings = DnsSettings { upstreams: vec![up], forward_rate: 2, ..Default::default() };
    let (_dns, udp, _tcp, stop) = start(settings);
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..10u16 {
        client.send_to(&query(i, "elsewhere.example."), udp).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 1024];
    while tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await.is_ok() {
        answered += 1;
    }
    // A burst of twice the rate, then whatever the rate adds meanwhile.
    assert!((4..=6).contains(&answered), "{answered} answered");
    stop.cancel();
}

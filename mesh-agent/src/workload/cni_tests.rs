//! [`CniPods`] and its HTTP routes against a recording sink.

use std::{collections::BTreeSet, sync::Mutex, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::*;
use crate::workload::{cni_http, store::WorkloadStore};

/// A sink that serves pods the "control plane" knows (namespace `shop`), records
/// every call, and can be made slow or failing.
#[derive(Debug, Default)]
struct Sink {
    calls: Mutex<Vec<String>>,
    serving: Mutex<BTreeSet<String>>,
    add_delay: Option<Duration>,
    fail_restore: bool,
}

impl Sink {
    fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }
    fn serving(&self) -> Vec<String> {
        lock(&self.serving).iter().cloned().collect()
    }
    fn record(&self, call: String) {
        lock(&self.calls).push(call);
    }
}

impl PodSink for Sink {
    async fn add(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        self.record(format!("add {}", pod.container_id));
        if let Some(d) = self.add_delay {
            tokio::time::sleep(d).await;
        }
        match &pod.pod {
            Some(p) if p.namespace == "shop" => {
                lock(&self.serving).insert(pod.container_id.clone());
                Ok(PodServed {
                    identity: Some(format!("spiffe://cluster.local/ns/shop/sa/{}", p.name)),
                    detail: String::new(),
                })
            }
            _ => Err(CniError::pod_unknown(pod)),
        }
    }

    async fn restore(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        self.record(format!("restore {}", pod.container_id));
        if self.fail_restore {
            return Err(CniError::new(code::AGENT_FAILED, "listeners failed"));
        }
        lock(&self.serving).insert(pod.container_id.clone());
        Ok(PodServed::default())
    }

    async fn remove(&self, pod: &PodAnnounce) -> Result<(), CniError> {
        self.record(format!("remove {}", pod.container_id));
        lock(&self.serving).remove(&pod.container_id);
        Ok(())
    }

    async fn check(&self, pod: &PodAnnounce) -> Result<PodServed, CniError> {
        self.record(format!("check {}", pod.container_id));
        if lock(&self.serving).contains(&pod.container_id) {
            Ok(PodServed::default())
        } else {
            Err(CniError::new(code::NOT_SERVED, "listeners are gone"))
        }
    }
}

fn pod(id: &str, ns: &str, name: &str) -> PodAnnounce {
    PodAnnounce {
        container_id: id.into(),
        netns: format!("/var/run/netns/cni-{id}"),
        ifname: "eth0".into(),
        pod: Some(PodRef { namespace: ns.into(), name: name.into(), uid: None }),
        ips: vec![format!("10.88.0.{}", id.len() + 1).parse().unwrap()],
    }
}

fn release(id: &str) -> PodRelease {
    PodRelease { container_id: id.into(), netns: None, ifname: "eth0".into(), pod: None }
}

fn pods(sink: Sink) -> CniPods<Sink> {
    CniPods::new(sink, None, CniLimits::default())
}

#[tokio::test]
async fn a_repeated_add_answers_as_the_first_without_serving_twice() {
    let p = pods(Sink::default());
    let first = p.add(pod("a", "shop", "web")).await.unwrap();
    assert_eq!(first.identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/web"));
    let mut again = pod("a", "shop", "web");
    again.ips.reverse();
    assert_eq!(p.add(again).await.unwrap(), first);
    assert_eq!(p.sink().calls(), ["add a"]);
}

#[tokio::test]
async fn a_different_add_for_a_served_container_is_refused_and_changes_nothing() {
    let p = pods(Sink::default());
    p.add(pod("a", "shop", "web")).await.unwrap();
    let mut other = pod("a", "shop", "api");
    other.netns = "/var/run/netns/elsewhere".into();
    let e = p.add(other).await.unwrap_err();
    assert_eq!(e.code, code::CONFLICT);
    assert!(e.msg.contains("already served as pod shop/web with a different netns, pod"), "{}", e.msg);
    assert_eq!(p.pods(), [pod("a", "shop", "web")]);
    assert_eq!(p.sink().calls(), ["add a"]);
}

#[tokio::test]
async fn another_container_in_a_served_netns_is_refused() {
    let p = pods(Sink::default());
    p.add(pod("a", "shop", "web")).await.unwrap();
    let mut b = pod("b", "shop", "web");
    b.netns = pod("a", "shop", "web").netns;
    let e = p.add(b).await.unwrap_err();
    assert_eq!(e.code, code::CONFLICT);
    assert!(e.msg.contains("already served for container a"), "{}", e.msg);
    assert_eq!(p.sink().serving(), ["a"]);
}

#[tokio::test]
async fn del_is_repeatable_and_touches_only_its_pod() {
    let p = pods(Sink::default());
    p.add(pod("a", "shop", "web")).await.unwrap();
    p.add(pod("bb", "shop", "api")).await.unwrap();
    p.remove(release("a")).await.unwrap();
    p.remove(release("a")).await.unwrap();
    p.remove(release("never-added")).await.unwrap();
    assert_eq!(p.sink().calls(), ["add a", "add bb", "remove a"]);
    assert_eq!(p.sink().serving(), ["bb"]);
    assert_eq!(p.pods(), [pod("bb", "shop", "api")]);
    p.check(pod("bb", "shop", "api")).await.unwrap();
    // Released containers leave no slot behind.
    assert_eq!(lock(&p.slots).len(), 1);
    // The netns is free again for a new sandbox.
    let mut again = pod("c", "shop", "web");
    again.netns = pod("a", "shop", "web").netns;
    p.add(again).await.unwrap();
}

#[tokio::test]
async fn a_refused_add_leaves_no_trace_and_the_others_served() {
    let p = pods(Sink::default());
    p.add(pod("a", "shop", "web")).await.unwrap();
    let e = p.add(pod("bb", "elsewhere", "x")).await.unwrap_err();
    assert_eq!(e, CniError::pod_unknown(&pod("bb", "elsewhere", "x")));
    assert_eq!(p.pods(), [pod("a", "shop", "web")]);
    assert_eq!(lock(&p.slots).len(), 1);
    assert_eq!(lock(&p.index).netns.len(), 1);
    let e = p.check(pod("bb", "elsewhere", "x")).await.unwrap_err();
    assert_eq!(e.code, code::NOT_SERVED);
    p.check(pod("a", "shop", "web")).await.unwrap();
}

#[tokio::test]
async fn invalid_announcements_never_reach_the_sink() {
    let p = pods(Sink::default());
    let mut bad = pod("a", "shop", "web");
    bad.netns = "relative".into();
    let e = p.add(bad).await.unwrap_err();
    assert_eq!(e.code, code::INVALID_CONFIG);
    assert!(e.msg.starts_with("netns:"), "{}", e.msg);
    let e = p.remove(release("../etc")).await.unwrap_err();
    assert!(e.msg.starts_with("container_id:"), "{}", e.msg);
    assert!(p.sink().calls().is_empty());
}

#[tokio::test]
async fn check_compares_with_what_was_added_and_asks_the_sink() {
    let p = pods(Sink::default());
    p.add(pod("a", "shop", "web")).await.unwrap();
    p.check(pod("a", "shop", "web")).await.unwrap();
    let mut moved = pod("a", "shop", "web");
    moved.ips = vec!["10.88.0.99".parse().unwrap()];
    let e = p.check(moved).await.unwrap_err();
    assert_eq!(e.code, code::NOT_SERVED);
    assert!(e.msg.contains("different ips"), "{}", e.msg);
    lock(&p.sink().serving).clear();
    assert_eq!(p.check(pod("a", "shop", "web")).await.unwrap_err().msg, "listeners are gone");
}

#[tokio::test(start_paused = true)]
async fn calls_for_one_container_wait_for_each_other_and_others_do_not() {
    let p = Arc::new(pods(Sink { add_delay: Some(Duration::from_secs(2)), ..Sink::default() }));
    let (a1, a2, b) = (p.clone(), p.clone(), p.clone());
    let first = tokio::spawn(async move { a1.add(pod("a", "shop", "web")).await });
    let second = tokio::spawn(async move { a2.add(pod("a", "shop", "web")).await });
    let other = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        b.add(pod("bb", "shop", "api")).await.unwrap();
        start.elapsed()
    });
    let del = {
        let p = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            p.remove(release("a")).await
        })
    };
    assert_eq!(first.await.unwrap(), second.await.unwrap());
    // bb's add ran beside a's, not after it.
    assert!(other.await.unwrap() < Duration::from_secs(3));
    del.await.unwrap().unwrap();
    let calls = p.sink().calls();
    assert_eq!(calls.iter().filter(|c| *c == "add a").count(), 1, "{calls:?}");
    assert_eq!(calls.last().map(String::as_str), Some("remove a"), "DEL waited for the ADD: {calls:?}");
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_hangs_is_cut_off_and_undone() {
    let limits = CniLimits { sink_timeout: Duration::from_secs(5), ..CniLimits::default() };
    let p = CniPods::new(Sink { add_delay: Some(Duration::from_secs(60)), ..Sink::default() }, None, limits);
    let e = p.add(pod("a", "shop", "web")).await.unwrap_err();
    assert_eq!(e.code, code::TRY_AGAIN_LATER);
    assert!(e.msg.contains("longer than 5s to serve pod shop/web"), "{}", e.msg);
    assert_eq!(p.sink().calls(), ["add a", "remove a"]);
    assert!(p.pods().is_empty());
}

#[tokio::test]
async fn the_pod_limit_is_enforced_and_freed_by_del() {
    let limits = CniLimits { max_pods: 2, ..CniLimits::default() };
    let p = CniPods::new(Sink::default(), None, limits);
    p.add(pod("a", "shop", "web")).await.unwrap();
    p.add(pod("bb", "shop", "api")).await.unwrap();
    let e = p.add(pod("ccc", "shop", "db")).await.unwrap_err();
    assert_eq!(e.code, code::LIMIT);
    p.remove(release("a")).await.unwrap();
    p.add(pod("ccc", "shop", "db")).await.unwrap();
}

fn netns_alive(path: &str) -> bool {
    !path.contains("gone")
}

#[tokio::test]
async fn a_restarted_agent_serves_its_cni_pods_again_without_the_cni() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workloads.json");
    let before = CniPods::new(Sink::default(), Some(WorkloadStore::new(&path, 16)), CniLimits::default());
    before.add(pod("a", "shop", "web")).await.unwrap();
    before.add(pod("bb", "shop", "api")).await.unwrap();
    before.add(pod("gone", "shop", "db")).await.unwrap();
    before.add(pod("ccc", "shop", "old")).await.unwrap();
    before.remove(release("ccc")).await.unwrap();
    drop(before);

    let after = CniPods::new(Sink::default(), Some(WorkloadStore::new(&path, 16)), CniLimits::default());
    let report = after.restore(netns_alive).await;
    assert_eq!(report.restored, ["a", "bb"]);
    assert!(report.failed.is_empty() && report.error.is_none());
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].container_id.as_deref(), Some("gone"));
    assert_eq!(after.sink().calls(), ["restore a", "restore bb"]);
    // Served as if added: a repeated ADD is answered, CHECK passes, DEL releases.
    after.add(pod("a", "shop", "web")).await.unwrap();
    after.check(pod("bb", "shop", "api")).await.unwrap();
    after.remove(release("bb")).await.unwrap();
    // The file now holds exactly what is served.
    let left = WorkloadStore::new(&path, 16).load(|_| true).unwrap();
    assert_eq!(left.pods, [pod("a", "shop", "web")]);
}

#[tokio::test]
async fn a_pod_that_cannot_be_served_again_is_kept_for_check_and_del() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workloads.json");
    WorkloadStore::new(&path, 16).save(&[pod("a", "shop", "web")]).unwrap();
    let p = CniPods::new(
        Sink { fail_restore: true, ..Sink::default() },
        Some(WorkloadStore::new(&path, 16)),
        CniLimits::default(),
    );
    let report = p.restore(|_| true).await;
    assert_eq!(report.failed.len(), 1);
    let e = p.check(pod("a", "shop", "web")).await.unwrap_err();
    assert!(e.msg.contains("was not served again after the agent restarted"), "{}", e.msg);
    // An identical ADD tries again (the sink's add serves shop pods).
    p.add(pod("a", "shop", "web")).await.unwrap();
    p.check(pod("a", "shop", "web")).await.unwrap();
    p.remove(release("a")).await.unwrap();
    assert!(WorkloadStore::new(&path, 16).load(|_| true).unwrap().pods.is_empty());
}

#[tokio::test]
async fn an_add_that_cannot_be_recorded_is_refused_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    // The state directory is a file: every write fails.
    let blocker = dir.path().join("state");
    std::fs::write(&blocker, b"").unwrap();
    let p = CniPods::new(
        Sink::default(),
        Some(WorkloadStore::new(blocker.join("w.json"), 16)),
        CniLimits::default(),
    );
    let e = p.add(pod("a", "shop", "web")).await.unwrap_err();
    assert_eq!(e.code, code::AGENT_FAILED);
    assert!(e.msg.contains("recording pod shop/web failed"), "{}", e.msg);
    assert_eq!(p.sink().calls(), ["add a", "remove a"]);
    assert!(p.sink().serving().is_empty() && p.pods().is_empty());
}

async fn call(p: &CniPods<Sink>, method: &str, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let req = http::Request::builder().method(method).uri(path).body(Full::new(body.into())).unwrap();
    let resp = cni_http::handle(p, req).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn http_routes_map_calls_and_refusals() {
    let p = pods(Sink::default());
    let body = serde_json::to_vec(&pod("a", "shop", "web")).unwrap();
    let (status, v) = call(&p, "POST", ADD_PATH, body.clone()).await;
    assert_eq!((status, v["identity"].as_str()), (200, Some("spiffe://cluster.local/ns/shop/sa/web")));
    assert_eq!(call(&p, "POST", CHECK_PATH, body.clone()).await.0, 200);

    let conflict = serde_json::to_vec(&pod("a", "shop", "api")).unwrap();
    let (status, v) = call(&p, "POST", ADD_PATH, conflict).await;
    assert_eq!((status, v["code"].as_u64()), (409, Some(code::CONFLICT as u64)));

    let unknown = serde_json::to_vec(&pod("bb", "other", "x")).unwrap();
    let (status, v) = call(&p, "POST", ADD_PATH, unknown).await;
    assert_eq!((status, v["code"].as_u64()), (422, Some(code::POD_UNKNOWN as u64)));
    assert_eq!(v["msg"], "pod other/x is unknown to the control plane");

    let (status, v) = call(&p, "POST", ADD_PATH, "{\"container_id\":").await;
    assert_eq!((status, v["code"].as_u64()), (400, Some(code::DECODE as u64)));
    let (status, v) = call(&p, "POST", ADD_PATH, vec![b' '; MAX_BODY_BYTES + 1]).await;
    assert_eq!((status, v["code"].as_u64()), (400, Some(code::DECODE as u64)));
    assert!(v["msg"].as_str().unwrap().contains("at most 65536 bytes"), "{v}");
    let (status, v) = call(&p, "POST", "/cni/v2/add", body.clone()).await;
    assert_eq!((status, v["code"].as_u64()), (404, Some(code::AGENT_PROTOCOL as u64)));
    let (status, _) = call(&p, "GET", ADD_PATH, "").await;
    assert_eq!(status, 405);

    let del = json!({"container_id": "a", "netns": null, "ifname": "eth0"}).to_string();
    assert_eq!(call(&p, "POST", DEL_PATH, del.clone()).await, (200, json!({})));
    assert_eq!(call(&p, "POST", DEL_PATH, del).await, (200, json!({})));
    let (status, v) = call(&p, "POST", CHECK_PATH, body).await;
    assert_eq!((status, v["code"].as_u64()), (404, Some(code::NOT_SERVED as u64)));
    assert_eq!(p.sink().calls(), ["add a", "check a", "add bb", "remove a"]);
}

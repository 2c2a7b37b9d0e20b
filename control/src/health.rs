//! Active health checks: the control plane connects to endpoints of services that
//! ask for it and announces the ones that fail as unhealthy (with the reason), so
//! every agent stops sending them traffic without each agent probing every
//! endpoint itself. Endpoints are never removed for failing a check.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpStream, sync::watch, task::AbortHandle};
use tokio_util::sync::CancellationToken;

/// How one endpoint is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckSpec {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl CheckSpec {
    /// From the API message, with defaults for zero fields (5 s, 1 s, 3, 2).
    pub fn from_api(h: &mesh_api::HealthCheck) -> Self {
        let ms = |v: u32, d: u64| Duration::from_millis(if v == 0 { d } else { u64::from(v) });
        Self {
            interval: ms(h.interval_ms, 5000),
            timeout: ms(h.timeout_ms, 1000),
            unhealthy_threshold: if h.unhealthy_threshold == 0 { 3 } else { h.unhealthy_threshold },
            healthy_threshold: if h.healthy_threshold == 0 { 2 } else { h.healthy_threshold },
        }
    }
}

/// Endpoints to check: address -> how.
pub type Targets = BTreeMap<SocketAddr, CheckSpec>;

/// Endpoints currently failing their checks: address -> reason.
pub type Failing = Arc<HashMap<SocketAddr, String>>;

/// Checks the current targets until `shutdown`, publishing the failing set.
pub async fn run(
    mut targets: watch::Receiver<Targets>,
    tx: watch::Sender<Failing>,
    shutdown: CancellationToken,
) {
    let mut running: HashMap<SocketAddr, (CheckSpec, AbortHandle)> = HashMap::new();
    let state = Arc::new(std::sync::Mutex::new(HashMap::<SocketAddr, String>::new()));
    loop {
        let wanted = targets.borrow_and_update().clone();
        running.retain(|addr, (spec, handle)| {
            let keep = wanted.get(addr) == Some(spec);
            if !keep {
                handle.abort();
            }
            keep
        });
        // Forget results of endpoints no longer checked.
        {
            let mut failing = state.lock().unwrap_or_else(|e| e.into_inner());
            let before = failing.len();
            failing.retain(|a, _| wanted.contains_key(a));
            if failing.len() != before {
                tx.send_replace(Arc::new(failing.clone()));
            }
        }
        for (addr, spec) in &wanted {
            if running.contains_key(addr) {
                continue;
            }
            let handle = tokio::spawn(check_loop(*addr, *spec, state.clone(), tx.clone())).abort_handle();
            running.insert(*addr, (*spec, handle));
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            r = targets.changed() => if r.is_err() { break },
        }
    }
    for (_, (_, h)) in running {
        h.abort();
    }
}

async fn check_loop(
    addr: SocketAddr,
    spec: CheckSpec,
    state: Arc<std::sync::Mutex<HashMap<SocketAddr, String>>>,
    tx: watch::Sender<Failing>,
) {
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut fails, mut oks, mut healthy) = (0u32, 0u32, true);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(spec.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
        };
        let change = match result {
            Ok(()) => {
                fails = 0;
                oks += 1;
                (!healthy && oks >= spec.healthy_threshold).then_some(None)
            }
            Err(e) => {
                oks = 0;
                fails += 1;
                (healthy && fails >= spec.unhealthy_threshold)
                    .then(|| Some(format!("failed {fails} health checks: {e}")))
            }
        };
        if let Some(reason) = change {
            healthy = reason.is_none();
            let mut failing = state.lock().unwrap_or_else(|e| e.into_inner());
            match &reason {
                Some(r) => {
                    tracing::warn!(endpoint = %addr, reason = %r, "endpoint unhealthy");
                    failing.insert(addr, r.clone());
                }
                None => {
                    tracing::info!(endpoint = %addr, "endpoint healthy again");
                    failing.remove(&addr);
                }
            }
            tx.send_replace(Arc::new(failing.clone()));
        }
    }
}

/// The address an endpoint of `service` is checked on: its first port's target.
pub fn check_address(service: &mesh_api::Service, endpoint: &mesh_api::Endpoint) -> Option<SocketAddr> {
    let ip: std::net::IpAddr = endpoint.address.parse().ok()?;
    let port = service.ports.first()?;
    let target = match endpoint.named_ports.get(&port.name) {
        Some(p) if !port.name.is_empty() => *p,
        _ if endpoint.port != 0 => endpoint.port,
        _ if port.target_port != 0 => port.target_port,
        _ => port.port,
    };
    Some(SocketAddr::new(ip, u16::try_from(target).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoint_is_failing_after_threshold_and_recovers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spec = CheckSpec {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        };
        let (targets_tx, targets_rx) = watch::channel(Targets::from([(addr, spec)]));
        let (tx, mut rx) = watch::channel(Failing::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(targets_rx, tx, stop.clone()));
        let within = Duration::from_secs(5);

        drop(listener);
        let failing = tokio::time::timeout(within, rx.wait_for(|f| f.contains_key(&addr)))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(failing[&addr].starts_with("failed 2 health checks"), "{:?}", failing[&addr]);

        let _listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::time::timeout(within, rx.wait_for(|f| f.is_empty())).await.unwrap().unwrap();

        // An endpoint no longer checked is forgotten.
        drop(_listener);
        tokio::time::timeout(within, rx.wait_for(|f| f.contains_key(&addr))).await.unwrap().unwrap();
        targets_tx.send_replace(Targets::new());
        tokio::time::timeout(within, rx.wait_for(|f| f.is_empty())).await.unwrap().unwrap();
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn defaults_fill_zero_fields() {
        let s = CheckSpec::from_api(&mesh_api::HealthCheck::default());
        assert_eq!(
            (s.interval, s.timeout, s.unhealthy_threshold, s.healthy_threshold),
            (Duration::from_secs(5), Duration::from_secs(1), 3, 2)
        );
        let s = CheckSpec::from_api(&mesh_api::HealthCheck { unhealthy_threshold: 7, ..Default::default() });
        assert_eq!(s.unhealthy_threshold, 7);
    }
}

//! Expiry of idle series (`--metrics-idle-timeout`): the series of endpoints,
//! workloads and identities that are gone leave `/metrics` instead of piling up for
//! the agent's lifetime.
//!
//! The exporter drops a series once two renders at least the timeout apart see no
//! update to it. Two things would make that drop live series, and both are handled
//! here:
//!
//! - **Gauges that hold a value without changing** (the active connections, the
//!   interception mode, limits in use): [`touch_gauges`] bumps each of them before
//!   every render, so they never look idle. Gauges of things that can go (a
//!   breaker's state per endpoint, a certificate's expiry per identity) are set
//!   again before every render for what exists now, and only those of what is gone
//!   expire.
//! - **Handles a connection keeps** (its byte counters, its request series): a
//!   dropped series is gone from the registry, but a handle taken before still points
//!   at it, and whatever it counts afterwards would never be shown (metrics-rs issue
//!   372). A handle is therefore only trusted within one [`epoch`]: the epoch
//!   advances every half timeout, and a handle from an earlier epoch is registered
//!   again (which revives its series) before it is used. A series cannot be
//!   dropped sooner than a whole timeout after its last update, and a handle is
//!   always used within one epoch of being registered and touched.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{limits, metrics};
use crate::{intercept::ActiveMode, listener::Direction};

static EPOCH: AtomicU64 = AtomicU64::new(0);

/// The current epoch: handles registered in an earlier one are registered again
/// before use. Stays 0 while series never expire.
pub fn epoch() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// Starts a new epoch (every half `--metrics-idle-timeout`).
pub fn advance() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// Advances the epoch every half `idle_timeout` and lets the exporter fold
/// histogram samples meanwhile, until `shutdown`.
pub fn spawn(
    handle: PrometheusHandle,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let period = (idle_timeout / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    advance();
                    handle.run_upkeep();
                }
            }
        }
    })
}

/// Marks every process-wide gauge as current, without changing its value, so none
/// of them expires while it still means something. Called before every render.
pub fn touch_gauges(mode: Option<ActiveMode>) {
    for direction in [Direction::Inbound, Direction::Outbound] {
        ::metrics::gauge!(metrics::ACTIVE_CONNECTIONS, "direction" => direction.as_str()).increment(0.0);
    }
    if let Some(mode) = mode {
        metrics::set_interception_mode(mode);
    }
    for name in [limits::TUNNEL_HANDSHAKES_IN_PROGRESS, limits::RETRY_BUFFER_BYTES] {
        ::metrics::gauge!(name).increment(0.0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::observe::{
        labels::MeshName,
        metrics::{
            BreakerState, ConnectionMetrics, RequestLabels, RequestMetrics, RequestOutcome, build,
            set_circuit_breaker_state,
        },
    };

    /// Short enough for a test; the agent's default is ten minutes.
    const IDLE: Duration = Duration::from_millis(200);

    /// Two scrapes more than the timeout apart: the first sees each series' latest
    /// update, the second drops those that did not change in between. `before`
    /// runs just before the second, as the agent refreshes before every render.
    fn scrape_twice(handle: &PrometheusHandle, before: impl Fn()) -> String {
        handle.render();
        std::thread::sleep(IDLE + Duration::from_millis(100));
        before();
        handle.render()
    }

    fn labels(workload: &str) -> RequestLabels {
        RequestLabels {
            direction: Direction::Outbound,
            source_workload: MeshName::known(workload),
            source_identity: MeshName::unknown(),
            destination_service: MeshName::known("shop/api"),
            mtls: true,
        }
    }

    fn ok() -> RequestOutcome {
        RequestOutcome {
            method: "GET",
            status: Some(200),
            grpc_status: None,
            duration: Duration::from_millis(3),
            request_bytes: 0,
            response_bytes: 5,
        }
    }

    #[test]
    fn series_of_what_is_gone_expire_and_the_rest_stay() {
        let (recorder, handle) = build(Some(IDLE)).expect("recorder");
        ::metrics::with_local_recorder(&recorder, || {
            let service = MeshName::known("shop/api");
            let (live, gone) = (MeshName::known("10.0.0.1:80"), MeshName::known("10.0.0.2:80"));
            set_circuit_breaker_state(&service, &live, BreakerState::Open);
            set_circuit_breaker_state(&service, &gone, BreakerState::Closed);
            RequestMetrics::new(labels("shop/gone")).record(&ok());
            let text = scrape_twice(&handle, || {
                // What the agent does before a render: what exists is set again.
                set_circuit_breaker_state(&service, &live, BreakerState::Open);
                touch_gauges(Some(ActiveMode::Ebpf));
            });
            assert!(text.contains("endpoint=\"10.0.0.1:80\""), "{text}");
            assert!(!text.contains("10.0.0.2:80"), "the gone endpoint's breaker stayed: {text}");
            assert!(!text.contains("shop/gone"), "the gone workload's requests stayed: {text}");
            assert!(text.contains("mesh_active_connections{direction=\"inbound\"} 0"), "{text}");
            assert!(text.contains("mesh_interception_mode{mode=\"ebpf\"} 1"), "{text}");
        });
    }

    #[test]
    fn a_connection_idle_past_the_timeout_still_counts() {
        let (recorder, handle) = build(Some(IDLE)).expect("recorder");
        ::metrics::with_local_recorder(&recorder, || {
            let workload = MeshName::known("shop/idle");
            let mut conn =
                ConnectionMetrics::open(Direction::Outbound, &workload, &MeshName::known("shop/db"), false);
            let requests = RequestMetrics::new(labels("shop/idle"));
            requests.record(&ok());
            let text = scrape_twice(&handle, || {});
            assert!(!text.contains("shop/idle"), "the idle series should have expired: {text}");

            // Half a timeout later, as the agent's expiry task does: handles taken
            // before are registered again when next used, so nothing counted after
            // the expiry is lost (metrics-rs issue 372).
            advance();
            conn.add_sent(1234);
            conn.close(Duration::from_secs(1));
            requests.record(&ok());
            let text = handle.render();
            let line = |name: &str| {
                text.lines().find(|l| l.starts_with(name) && l.contains("shop/idle")).map(str::to_owned)
            };
            assert_eq!(
                line("mesh_tcp_sent_bytes_total").as_deref().and_then(|l| l.rsplit(' ').next()),
                Some("1234"),
                "{text}"
            );
            assert!(line("mesh_tcp_connections_closed_total").is_some_and(|l| l.ends_with(" 1")), "{text}");
            assert!(line("mesh_requests_total").is_some_and(|l| l.ends_with(" 1")), "{text}");
        });
    }
}

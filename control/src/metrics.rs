//! The control plane's Prometheus metrics: names, help texts, the recorder, and
//! typed recording functions.
//!
//! The same arrangement as the agent's (`mesh_agent::observe::metrics`): the
//! `metrics` facade's global recorder backed by `metrics-exporter-prometheus`
//! without a listener, rendered by whatever HTTP endpoint the control plane serves
//! (`PrometheusHandle::render`). Label values are fixed sets or registry source
//! names, so cardinality does not grow with traffic or agents.

use std::sync::Mutex;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// Agents currently subscribed to the discovery stream.
pub const AGENTS_CONNECTED: &str = "mesh_control_agents_connected";
/// Version of the newest snapshot built from the registry.
pub const SNAPSHOT_VERSION: &str = "mesh_control_snapshot_version";
/// Snapshots or updates sent to agents.
pub const SNAPSHOTS_SENT_TOTAL: &str = "mesh_control_snapshots_sent_total";
/// Agents' answers to what they were sent, by `result` (`ack`, `nack`).
pub const SNAPSHOT_RESPONSES_TOTAL: &str = "mesh_control_snapshot_responses_total";
/// Certificate signing requests handled, by `result` (`signed`, `rejected`).
pub const CERTIFICATES_TOTAL: &str = "mesh_control_certificate_requests_total";
/// Errors reported by registry sources, by `source`.
pub const REGISTRY_ERRORS_TOTAL: &str = "mesh_control_registry_errors_total";
/// Services in each registry source's current view, by `source`.
pub const REGISTRY_SERVICES: &str = "mesh_control_registry_services";
/// Discovery calls refused: no or a bad credential, or a Subscribe for another node.
pub const DISCOVERY_REFUSED_TOTAL: &str = "mesh_control_discovery_refused_total";
/// Renewals of the control plane's TLS serving certificate, by `result` (`ok`, `failed`).
pub const SERVING_CERT_RENEWALS_TOTAL: &str = "mesh_control_serving_certificate_renewals_total";
/// TLS handshakes on the gRPC listener that failed or timed out, or that were turned
/// away because too many were already in progress.
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "mesh_control_tls_handshake_failures_total";

/// Federation calls refused, by `reason` (`missing`, `unknown_cluster`,
/// `wrong_token`, `token_file`).
pub const FEDERATION_REFUSED_TOTAL: &str = "mesh_control_federation_refused_total";

/// Times a resource limit refused or closed something, by `limit` (a fixed set).
pub const LIMIT_HITS_TOTAL: &str = "mesh_control_limit_hits_total";

/// The `Content-Type` of [`PrometheusHandle::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the recorder could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("another metrics recorder is already installed in this process")]
    OtherRecorderInstalled,
}

/// A recorder and its handle, not installed: for tests (`metrics::with_local_recorder`).
pub fn build() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the recorder process-wide and describes every metric. Idempotent: later
/// calls return the first handle. Fails only if another recorder was installed first.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let (recorder, handle) = build();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::OtherRecorderInstalled)?;
    describe();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Registers help text and units for every metric with the current recorder.
pub fn describe() {
    describe_gauge!(AGENTS_CONNECTED, Unit::Count, "Agents subscribed to the discovery stream.");
    describe_gauge!(SNAPSHOT_VERSION, "Version of the newest configuration snapshot.");
    describe_counter!(SNAPSHOTS_SENT_TOTAL, Unit::Count, "Snapshots and updates sent to agents.");
    describe_counter!(SNAPSHOT_RESPONSES_TOTAL, Unit::Count, "Agent ACKs and NACKs of what they were sent.");
    describe_counter!(CERTIFICATES_TOTAL, Unit::Count, "Certificate signing requests handled.");
    describe_counter!(REGISTRY_ERRORS_TOTAL, Unit::Count, "Errors reported by registry sources.");
    describe_gauge!(REGISTRY_SERVICES, Unit::Count, "Services in each registry source's view.");
    describe_counter!(LIMIT_HITS_TOTAL, Unit::Count, "Times a resource limit refused or closed something.");
    describe_counter!(DISCOVERY_REFUSED_TOTAL, Unit::Count, "Discovery calls refused (credential, node).");
    describe_counter!(
        FEDERATION_REFUSED_TOTAL,
        Unit::Count,
        "Federation Exports calls refused (token, cluster)."
    );
    describe_counter!(SERVING_CERT_RENEWALS_TOTAL, Unit::Count, "Renewals of the gRPC serving certificate.");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        Unit::Count,
        "TLS handshakes on the gRPC listener that failed, timed out or were turned away."
    );
}

/// Counts a hit of `limit` and logs `detail` at warn, at most once per 10 s per
/// limit (a flood hits a limit in a loop).
pub fn limit_hit(limit: &'static str, detail: std::fmt::Arguments<'_>) {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};
    static LOGGED: Mutex<Option<HashMap<&'static str, (Instant, u64)>>> = Mutex::new(None);
    counter!(LIMIT_HITS_TOTAL, "limit" => limit).increment(1);
    let now = Instant::now();
    let mut logged = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    let entry = logged.get_or_insert_with(HashMap::new).entry(limit).or_insert((now, 0));
    if entry.1 == 0 || now.duration_since(entry.0) >= Duration::from_secs(10) {
        let silenced = entry.1.saturating_sub(1);
        *entry = (now, 1);
        tracing::warn!(limit, silenced_since_last_log = silenced, "limit reached: {detail}");
    } else {
        entry.1 += 1;
    }
}

/// Publishes the number of subscribed agents.
pub fn set_agents_connected(agents: usize) {
    gauge!(AGENTS_CONNECTED).set(agents as f64);
}

/// Publishes the newest snapshot version.
pub fn set_snapshot_version(version: u64) {
    // Exact up to 2^53, far beyond any snapshot counter.
    gauge!(SNAPSHOT_VERSION).set(version as f64);
}

/// Counts a snapshot or update sent to an agent.
pub fn snapshot_sent() {
    counter!(SNAPSHOTS_SENT_TOTAL).increment(1);
}

/// Counts an agent's answer: `applied` for an ACK, false for a NACK.
pub fn snapshot_response(applied: bool) {
    counter!(SNAPSHOT_RESPONSES_TOTAL, "result" => if applied { "ack" } else { "nack" }).increment(1);
}

/// Counts a certificate signing request: `signed`, or rejected (unauthenticated,
/// bad CSR, identity not allowed).
pub fn certificate_request(signed: bool) {
    counter!(CERTIFICATES_TOTAL, "result" => if signed { "signed" } else { "rejected" }).increment(1);
}

/// Counts an error of a registry source (`Source::name`, a fixed set).
pub fn registry_error(source: &str) {
    counter!(REGISTRY_ERRORS_TOTAL, "source" => source.to_owned()).increment(1);
}

/// Publishes how many services a registry source currently has.
pub fn set_registry_services(source: &str, services: usize) {
    gauge!(REGISTRY_SERVICES, "source" => source.to_owned()).set(services as f64);
}

/// Counts a refused discovery call.
pub fn discovery_refused() {
    counter!(DISCOVERY_REFUSED_TOTAL).increment(1);
}

/// Counts a refused federation call; `reason` is one of a fixed set.
pub fn federation_refused(reason: &'static str) {
    counter!(FEDERATION_REFUSED_TOTAL, "reason" => reason).increment(1);
}

/// Counts a renewal of the serving certificate, successful or not.
pub fn serving_cert_renewal(ok: bool) {
    counter!(SERVING_CERT_RENEWALS_TOTAL, "result" => if ok { "ok" } else { "failed" }).increment(1);
}

/// Counts a failed, timed-out or turned-away TLS handshake on the gRPC listener.
pub fn tls_handshake_failed() {
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_render_as_prometheus_text() {
        let (recorder, handle) = build();
        metrics::with_local_recorder(&recorder, || {
            describe();
            set_agents_connected(3);
            set_snapshot_version(17);
            snapshot_sent();
            snapshot_sent();
            snapshot_response(true);
            snapshot_response(false);
            certificate_request(true);
            certificate_request(false);
            certificate_request(false);
            registry_error("file");
            set_registry_services("kubernetes", 12);
        });
        let text = handle.render();
        for line in [
            "# HELP mesh_control_agents_connected Agents subscribed to the discovery stream.\n",
            "mesh_control_agents_connected 3\n",
            "mesh_control_snapshot_version 17\n",
            "mesh_control_snapshots_sent_total 2\n",
            "mesh_control_snapshot_responses_total{result=\"ack\"} 1\n",
            "mesh_control_snapshot_responses_total{result=\"nack\"} 1\n",
            "mesh_control_certificate_requests_total{result=\"signed\"} 1\n",
            "mesh_control_certificate_requests_total{result=\"rejected\"} 2\n",
            "mesh_control_registry_errors_total{source=\"file\"} 1\n",
            "mesh_control_registry_services{source=\"kubernetes\"} 12\n",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn install_is_idempotent() {
        let first = install().expect("install");
        let second = install().expect("second install returns the same recorder");
        snapshot_sent();
        assert!(first.render().contains("mesh_control_snapshots_sent_total"));
        assert!(second.render().contains("mesh_control_snapshots_sent_total"));
    }
}

//! The Consul catalog as a registry source (`--consul URL`).
//!
//! One blocking query follows the catalog's service list
//! (`/v1/catalog/services`), and one per service follows its instances with their
//! health (`/v1/health/service/NAME`); each answer rebuilds the whole view (see
//! `mapping.rs` for how Consul's entries become services and endpoints). Blocking
//! queries follow Consul's rules: the next query carries the answer's
//! `X-Consul-Index`; an index that goes backwards (a restored or re-elected server)
//! starts again from 0, which answers at once; an answer without one is not
//! blocking, so it is repeated no faster than every [`MIN_INTERVAL`]. A failed call
//! (the agent down, a 5xx, a refused ACL token) keeps the last good view, reports
//! the error in `last_error`, and is retried with jittered exponential backoff.

pub mod client;
#[cfg(test)]
pub(crate) mod fake;
pub mod mapping;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Source, SourceView, file::is_dns_label};
use client::{CallError, ConsulClient};
use mapping::{HealthEntry, MappingConfig};

/// Shortest time between two queries of one watch.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failing call.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Changes closer together than this are published as one.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// How to reach Consul and name what it holds.
#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT` of a Consul agent.
    pub url: String,
    /// CA certificates (PEM) verifying an `https` agent.
    pub ca: Option<PathBuf>,
    /// File holding the ACL token, re-read on every call.
    pub token_file: Option<PathBuf>,
    /// Datacenter to read (the agent's own when unset).
    pub datacenter: Option<String>,
    /// Mesh namespace of Consul's services.
    pub namespace: String,
    pub trust_domain: String,
    /// How long a blocking query may wait for a change.
    pub wait: Duration,
    /// Services followed at most; more are left out and reported.
    pub max_services: usize,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8500".into(),
            ca: None,
            token_file: None,
            datacenter: None,
            namespace: "consul".into(),
            trust_domain: mesh_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            wait: Duration::from_secs(30),
            max_services: 5000,
        }
    }
}

/// The Consul source.
pub struct ConsulSource {
    client: ConsulClient,
    config: ConsulConfig,
}

impl ConsulSource {
    /// Checks the URL, CA and namespace; calls nothing yet.
    pub fn new(config: ConsulConfig) -> Result<Self, CallError> {
        if !is_dns_label(&config.namespace) {
            return Err(CallError::Config(format!(
                "--consul-namespace {:?} is not a DNS label",
                config.namespace
            )));
        }
        let client = ConsulClient::new(
            &config.url,
            config.ca.as_deref(),
            config.token_file.clone(),
            config.datacenter.clone(),
        )?;
        Ok(Self { client, config })
    }
}

/// What the watches know, shared with the publisher.
#[derive(Default)]
struct State {
    catalog_loaded: bool,
    catalog_error: Option<String>,
    /// Services left out of the catalog (name not usable, over the bound).
    catalog_skipped: Vec<String>,
    services: BTreeMap<String, Followed>,
}

struct Followed {
    /// `None` until the first answer.
    entries: Option<Arc<Vec<HealthEntry>>>,
    error: Option<String>,
    stop: CancellationToken,
}

struct Shared {
    client: ConsulClient,
    config: ConsulConfig,
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_one();
    }

    /// The view from what the watches know.
    fn view(&self) -> SourceView {
        let mapping = MappingConfig {
            namespace: self.config.namespace.clone(),
            trust_domain: self.config.trust_domain.clone(),
            datacenter: self.config.datacenter.clone(),
        };
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut services = Vec::new();
        let mut problems: Vec<String> = state.catalog_error.iter().cloned().collect();
        problems.extend(state.catalog_skipped.iter().cloned());
        let mut ready = state.catalog_loaded;
        for (name, followed) in &state.services {
            problems.extend(followed.error.iter().map(|e| format!("service {name}: {e}")));
            match &followed.entries {
                Some(entries) => {
                    let (service, skipped) = mapping::service(name, entries, &mapping);
                    problems.extend(skipped);
                    services.push(service);
                }
                // Ready once every service answered or failed at least once.
                None => ready &= followed.error.is_some(),
            }
        }
        SourceView {
            services: Arc::new(services),
            workloads: Arc::new(Vec::new()),
            ready,
            last_error: problems.into_iter().next().map(|p| format!("consul {}: {p}", self.client.url)),
            ..Default::default()
        }
    }
}

impl Source for ConsulSource {
    fn name(&self) -> &str {
        "consul"
    }

    fn run(
        self: Box<Self>,
        tx: watch::Sender<SourceView>,
        shutdown: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async move {
            let shared = Arc::new(Shared {
                client: self.client,
                config: self.config,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            });
            tracing::info!(consul = %shared.client.url, namespace = %shared.config.namespace,
                datacenter = ?shared.config.datacenter, "following the Consul catalog");
            tokio::spawn(follow_catalog(shared.clone(), shutdown.clone()));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = shared.changed.notified() => {}
                }
                tokio::time::sleep(DEBOUNCE).await;
                let view = shared.view();
                tx.send_if_modified(|current| {
                    if *current == view {
                        return false;
                    }
                    *current = view;
                    true
                });
            }
            let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            for followed in state.services.values() {
                followed.stop.cancel();
            }
        })
    }
}

/// A blocking query's position.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    index: u64,
}

impl Position {
    /// `path` with the blocking parameters for the next query.
    pub fn query(&self, path: &str, wait: Duration) -> String {
        if self.index == 0 {
            path.to_owned()
        } else {
            let sep = if path.contains('?') { '&' } else { '?' };
            format!("{path}{sep}index={}&wait={}ms", self.index, wait.as_millis())
        }
    }

    /// Takes an answer's `X-Consul-Index`: absent, or gone backwards, starts over
    /// from 0 (the next query answers at once); never 0 after an answer with one.
    pub fn advance(&mut self, answered: Option<u64>) {
        self.index = match answered {
            None => 0,
            Some(i) if i < self.index => 0,
            Some(i) => i.max(1),
        };
    }
}

/// Retry delays: doubling from 100 ms to [`MAX_BACKOFF`], with jitter.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        d.mul_f64(0.5 + fastrand::f64())
    }
    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// One blocking watch of `path`: calls `handle` with each answer's body, until
/// `stop`. Failures go to `failed` and are retried with backoff.
async fn watch_path(
    shared: &Shared,
    path: &str,
    stop: &CancellationToken,
    mut handle: impl FnMut(&[u8]) -> Result<(), String>,
    mut failed: impl FnMut(String),
) {
    let mut position = Position::default();
    let mut backoff = Backoff::new();
    let wait = shared.config.wait;
    // Consul adds up to wait/16 of jitter to a blocking query.
    let timeout = wait + wait / 16 + Duration::from_secs(10);
    loop {
        let started = Instant::now();
        let query = position.query(path, wait);
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            a = shared.client.get(&query, timeout) => a,
        };
        let delay = match answer.map_err(|e| e.to_string()).and_then(|a| {
            handle(&a.body)?;
            Ok(a.index)
        }) {
            Ok(index) => {
                backoff.reset();
                position.advance(index);
                MIN_INTERVAL.saturating_sub(started.elapsed())
            }
            Err(e) => {
                tracing::warn!(consul = %shared.client.url, path, error = %e, "Consul query failed; keeping the last view");
                failed(e);
                position = Position::default();
                backoff.next()
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn follow_catalog(shared: Arc<Shared>, stop: CancellationToken) {
    let handle = |body: &[u8]| {
        let catalog: BTreeMap<String, serde_json::Value> = serde_json::from_slice(body)
            .map_err(|e| format!("/v1/catalog/services: not a service map: {e}"))?;
        let mut skipped = Vec::new();
        let mut names = BTreeSet::new();
        for name in catalog.into_keys() {
            if name == "consul" {
                continue; // Consul's own servers.
            }
            if !usable_name(&name) {
                skipped.push(format!(
                    "service {name:?} left out: a name of letters, digits, '-', '_' and '.' only"
                ));
            } else if names.len() >= shared.config.max_services {
                skipped
                    .push(format!("service {name:?} left out: over {} services", shared.config.max_services));
            } else {
                names.insert(name);
            }
        }
        let mut added = Vec::new();
        shared.update(|state| {
            state.catalog_loaded = true;
            state.catalog_error = None;
            state.catalog_skipped = skipped;
            state.services.retain(|name, followed| {
                let keep = names.contains(name);
                if !keep {
                    followed.stop.cancel();
                }
                keep
            });
            for name in names {
                if !state.services.contains_key(&name) {
                    let token = stop.child_token();
                    state
                        .services
                        .insert(name.clone(), Followed { entries: None, error: None, stop: token.clone() });
                    added.push((name, token));
                }
            }
        });
        for (name, token) in added {
            tokio::spawn(follow_service(shared.clone(), name, token));
        }
        Ok(())
    };
    let failed = |e: String| shared.update(|state| state.catalog_error = Some(e));
    watch_path(&shared, "/v1/catalog/services", &stop, handle, failed).await;
}

async fn follow_service(shared: Arc<Shared>, name: String, stop: CancellationToken) {
    let path = format!("/v1/health/service/{name}");
    let handle = |body: &[u8]| {
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(body).map_err(|e| format!("{path}: not a list of health entries: {e}"))?;
        shared.update(|state| {
            if let Some(f) = state.services.get_mut(&name) {
                f.entries = Some(Arc::new(entries));
                f.error = None;
            }
        });
        Ok(())
    };
    let failed = |e: String| {
        shared.update(|state| {
            if let Some(f) = state.services.get_mut(&name) {
                f.error = Some(e);
            }
        })
    };
    watch_path(&shared, &path, &stop, handle, failed).await;
}

/// Names safe in a URL path and a DNS name.
fn usable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

//! A fake Consul agent for tests: the two endpoints the source reads, with
//! Consul's blocking-query behaviour (an `index` at or past the current one holds
//! the answer until something changes or `wait` runs out), `X-Consul-Index` on
//! every answer, ACL tokens, injected 5xx answers and an index reset. Consul is not
//! packaged for this machine; this follows its documented HTTP API.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::watch;

#[derive(Default)]
struct Inner {
    index: u64,
    /// Health entries by service name (tags kept in the entries).
    services: BTreeMap<String, Vec<Value>>,
    fail_next: usize,
    token: Option<String>,
    requests: Vec<String>,
}

/// A running fake; stops when dropped.
pub struct FakeConsul {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    changed: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One instance's health entry as Consul answers it.
pub fn entry(
    node: &str,
    id: &str,
    address: &str,
    port: u16,
    tags: &[&str],
    meta: &[(&str, &str)],
    status: &str,
) -> Value {
    let meta: BTreeMap<&str, &str> = meta.iter().copied().collect();
    json!({
        "Node": {"Node": node, "Address": "192.0.2.1", "Datacenter": "dc1"},
        "Service": {"ID": id, "Service": id.split('-').next().unwrap_or(id), "Tags": tags, "Address": address,
                    "Port": port, "Meta": meta, "Weights": {"Passing": 1, "Warning": 1}},
        "Checks": [
            {"Name": "Serf Health Status", "Status": "passing", "Output": "Agent alive"},
            {"Name": "http", "Status": status, "Output": if status == "passing" { "HTTP 200" } else { "HTTP 503" }},
        ],
    })
}

/// A CA (PEM) and a server configuration with a certificate it issued for 127.0.0.1.
pub fn tls_material() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    (ca.pem(), Arc::new(config))
}

impl FakeConsul {
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// Serves HTTPS with `config` (see [`tls_material`]).
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(config))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner { index: 10, ..Default::default() }));
        let (changed, _) = watch::channel(10);
        let (state, notify) = (inner.clone(), changed.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (state, notify, tls) = (state.clone(), notify.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(state.clone(), notify.subscribe(), req));
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Self { addr, inner, changed, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn change(&self, f: impl FnOnce(&mut Inner)) {
        let index = {
            let mut inner = self.inner.lock().unwrap();
            f(&mut inner);
            inner.index
        };
        self.changed.send_replace(index);
    }

    /// Registers `name` with these health entries (replacing its instances).
    pub fn set_service(&self, name: &str, entries: Vec<Value>) {
        self.change(|i| {
            i.index += 1;
            i.services.insert(name.to_owned(), entries);
        });
    }

    pub fn remove_service(&self, name: &str) {
        self.change(|i| {
            i.index += 1;
            i.services.remove(name);
        });
    }

    /// The next `n` requests answer 500.
    pub fn fail(&self, n: usize) {
        self.change(|i| i.fail_next = n);
    }

    /// Requires this ACL token from now on.
    pub fn require_token(&self, token: &str) {
        self.change(|i| i.token = Some(token.to_owned()));
    }

    /// Applies `f` and sets the index back to `index` (a restored server).
    pub fn reset_index(&self, index: u64, f: impl FnOnce(&Self)) {
        f(self);
        self.change(|i| i.index = index);
    }

    /// Paths and queries asked so far.
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().unwrap().requests.clone()
    }
}

fn param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

async fn answer(
    inner: Arc<Mutex<Inner>>,
    mut changed: watch::Receiver<u64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let token = req.headers().get("x-consul-token").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let refuse = |status: StatusCode, body: &str| {
        Ok(Response::builder().status(status).body(Full::from(body.to_owned())).unwrap())
    };
    let waited_for = {
        let mut i = inner.lock().unwrap();
        i.requests.push(format!("{path}?{query}"));
        if i.token.is_some() && i.token != token {
            return refuse(StatusCode::FORBIDDEN, "ACL not found");
        }
        if i.fail_next > 0 {
            i.fail_next -= 1;
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "rpc error making call: No cluster leader");
        }
        param(&query, "index").and_then(|v| v.parse::<u64>().ok()).filter(|&want| want >= i.index)
    };
    if let Some(want) = waited_for {
        let wait = param(&query, "wait")
            .and_then(|w| humantime::parse_duration(w).ok())
            .unwrap_or(Duration::from_secs(300));
        // As Consul: held until the index passes the one asked for, or `wait` ends
        // (so after an index reset, until `wait` ends).
        let _ = tokio::time::timeout(wait, changed.wait_for(|&i| i > want)).await;
    }
    let i = inner.lock().unwrap();
    let body = if path == "/v1/catalog/services" {
        let names: BTreeMap<&String, Vec<Value>> = i.services.keys().map(|k| (k, vec![])).collect();
        json!(names)
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        json!(i.services.get(name).cloned().unwrap_or_default())
    } else {
        return refuse(StatusCode::NOT_FOUND, "no such endpoint");
    };
    Ok(Response::builder()
        .header("x-consul-index", i.index.to_string())
        .header("content-type", "application/json")
        .body(Full::from(body.to_string()))
        .unwrap())
}

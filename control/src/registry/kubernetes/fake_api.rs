//! A fake Kubernetes API server for the source's tests.
//!
//! It speaks the real list/watch protocol over plain HTTP/1.1: lists carry
//! `metadata.resourceVersion`, `?watch=true&resourceVersion=N` streams
//! newline-delimited events (ADDED, MODIFIED, DELETED, BOOKMARK) in a chunked
//! body, replaying what happened after N. Tests can cut every open watch in the
//! middle of its body, and expire history so that a watch from an old version
//! is refused with 410 Gone (as an ERROR event, as the real apiserver does, or
//! as an HTTP 410 response).
//!
//! For the CA it also serves Secrets (get, create, replace with resource-version
//! conflicts, and a lost create race on demand), ConfigMaps (the same calls, for
//! the published roots) and TokenReviews (answered from statuses the test
//! registers per token).
//!
//! For `meshctl check --pre` it answers what a cluster says about itself: `/version`,
//! Nodes, a Namespace, CustomResourceDefinitions by name and
//! SelfSubjectAccessReviews (allowed unless the test denies that verb and resource).
//!
//! For `meshctl install --apply` it does server-side apply on the object paths of
//! the kinds install renders (see [`apply`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

// An explicit path, so that the integration tests can include this file too.
#[path = "fake_api/apply.rs"]
mod apply;

/// The kinds the source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    HttpRoute,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::HttpRoute => "gateway.networking.k8s.io/v1",
            Kind::Service | Kind::Pod => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::HttpRoute => "HTTPRoute",
        }
    }

    fn from_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/api/v1/pods" => Some(Kind::Pod),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/apis/gateway.networking.k8s.io/v1/httproutes" => Some(Kind::HttpRoute),
            _ => None,
        }
    }
}

/// How an expired resource version is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// HTTP 200, then one `{"type":"ERROR","object":<Status 410>}` event.
    Event,
    /// An HTTP 410 response with a Status body.
    Http,
}

#[derive(Debug, Clone)]
struct Logged {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    log: Vec<Logged>,
    /// Watches from a version below this are refused with 410.
    compacted: u64,
    gone: Gone,
    /// Cancelled to cut every open watch; replaced afterwards.
    cut: CancellationToken,
    lists: HashMap<Kind, usize>,
    watches: HashMap<Kind, usize>,
    refuse_lists: HashMap<Kind, u16>,
    rv_tx: watch::Sender<u64>,
    /// Secrets by (namespace, name).
    secrets: BTreeMap<(String, String), Value>,
    /// ConfigMaps by (namespace, name).
    configmaps: BTreeMap<(String, String), Value>,
    /// "GET ns/name", "POST ns/name", "PUT ns/name", in order.
    secret_calls: Vec<String>,
    /// Stored just before the next create of the same Secret, which then fails with 409.
    secret_races: HashMap<(String, String), Value>,
    refuse_secrets: Option<u16>,
    /// TokenReview status by token; unknown tokens are unauthenticated.
    token_statuses: HashMap<String, Value>,
    /// The specs of the TokenReviews received.
    reviews: Vec<Value>,
    cluster: Cluster,
    /// Objects applied server-side.
    apply: apply::Store,
}

/// What the cluster says about itself (see [`FakeApi::set_cluster`]).
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// `/version`'s `gitVersion` (`major`/`minor` derived from it).
    pub version: String,
    /// Nodes as the API returns them.
    pub nodes: Vec<Value>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Value>,
    /// Names of the installed CustomResourceDefinitions.
    pub crds: Vec<String>,
    /// `(group, resource, verb)` a SelfSubjectAccessReview is denied.
    pub denied: Vec<(String, String, String)>,
}

/// A running fake API server (clones share it); dropped with the test's runtime.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
}

impl FakeApi {
    /// Starts the server on 127.0.0.1 with an ephemeral port.
    pub async fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake api");
        let addr = listener.local_addr().expect("fake api address");
        let (rv_tx, _) = watch::channel(1);
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            objects: BTreeMap::new(),
            log: Vec::new(),
            compacted: 0,
            gone: Gone::Event,
            cut: CancellationToken::new(),
            lists: HashMap::new(),
            watches: HashMap::new(),
            refuse_lists: HashMap::new(),
            rv_tx,
            secrets: BTreeMap::new(),
            configmaps: BTreeMap::new(),
            secret_calls: Vec::new(),
            secret_races: HashMap::new(),
            refuse_secrets: None,
            token_statuses: HashMap::new(),
            reviews: Vec::new(),
            cluster: Cluster { version: "v1.31.2".into(), ..Default::default() },
            apply: apply::Store::default(),
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(state.clone(), req));
                    // Cut watches end in an error by design.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApi { state, addr }
    }

    /// The server's URL (`http://127.0.0.1:PORT`), for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this server.
    pub fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().expect("fake api url");
        kube::Client::try_from(kube::Config::new(url)).expect("kube client for fake api")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, kind: Kind, object: Value) {
        self.lock().apply(kind, object);
    }

    /// Applies several objects `gap` apart, as a rollout spreads its changes.
    pub async fn apply_paced(&self, objects: Vec<(Kind, Value)>, gap: std::time::Duration) {
        for (n, (kind, object)) in objects.into_iter().enumerate() {
            if n > 0 {
                tokio::time::sleep(gap).await;
            }
            self.apply(kind, object);
        }
    }

    /// Deletes an object (DELETED to watchers).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.lock().delete(kind, namespace, name);
    }

    /// Cuts every open watch in the middle of its chunked body.
    pub fn cut_watches(&self) {
        self.lock().cut_watches();
    }

    /// Applies `changes`, then forgets all history up to and including them and
    /// cuts the open watches: the client can learn of the changes only by
    /// relisting after being told 410 Gone in the `gone` style.
    pub fn expire_with(&self, gone: Gone, changes: Vec<(Kind, Value)>) {
        let mut state = self.lock();
        for (kind, object) in changes {
            state.apply(kind, object);
        }
        state.compacted = state.rv;
        state.gone = gone;
        state.cut_watches();
    }

    /// Makes lists of `kind` fail with `code` (None: succeed again).
    pub fn refuse_lists(&self, kind: Kind, code: Option<u16>) {
        let mut state = self.lock();
        match code {
            Some(code) => state.refuse_lists.insert(kind, code),
            None => state.refuse_lists.remove(&kind),
        };
    }

    /// How many lists of `kind` were answered.
    pub fn lists(&self, kind: Kind) -> usize {
        self.lock().lists.get(&kind).copied().unwrap_or(0)
    }

    /// How many watches of `kind` were opened.
    pub fn watches(&self, kind: Kind) -> usize {
        self.lock().watches.get(&kind).copied().unwrap_or(0)
    }
}

/// What the cluster says about itself, for `meshctl check --pre`.
impl FakeApi {
    pub fn set_cluster(&self, cluster: Cluster) {
        self.lock().cluster = cluster;
    }
}

/// A node as the API lists it.
pub fn node(name: &str, kernel: &str, os: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "status": {"nodeInfo": {"kernelVersion": kernel, "operatingSystem": os, "osImage": "Debian GNU/Linux 13",
            "architecture": "amd64", "containerRuntimeVersion": "containerd://2.0.0", "kubeletVersion": "v1.31.2",
            "bootID": "", "machineID": "", "systemUUID": "", "kubeProxyVersion": ""}}})
}

async fn handle_cluster(
    state: &Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Request<Incoming>> {
    let path = req.uri().path().to_owned();
    let cluster = state.lock().unwrap_or_else(|e| e.into_inner()).cluster.clone();
    let not_found =
        |what: &str| full(StatusCode::NOT_FOUND, status(404, "NotFound", &format!("{what} not found")));
    if path == "/version" {
        let v = cluster.version.trim_start_matches('v');
        let mut parts = v.split('.');
        let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
        return Ok(full(
            StatusCode::OK,
            json!({"major": major, "minor": minor, "gitVersion": cluster.version,
            "gitCommit": "", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
            "compiler": "gc", "platform": "linux/amd64"}),
        ));
    }
    if path == "/api/v1/nodes" {
        return Ok(full(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": cluster.nodes}),
        ));
    }
    if let Some(name) = path.strip_prefix("/api/v1/namespaces/").filter(|n| !n.contains('/')) {
        return Ok(match cluster.namespaces.get(name) {
            Some(ns) => full(StatusCode::OK, ns.clone()),
            None => not_found(&format!("namespaces \"{name}\"")),
        });
    }
    if let Some(name) = path.strip_prefix("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/") {
        return Ok(if cluster.crds.iter().any(|c| c == name) {
            full(
                StatusCode::OK,
                json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": name}, "spec": {"group": "gateway.networking.k8s.io", "names": {"plural": "httproutes", "kind": "HTTPRoute"},
                "scope": "Namespaced", "versions": []}}),
            )
        } else {
            not_found(&format!("customresourcedefinitions.apiextensions.k8s.io \"{name}\""))
        });
    }
    if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" && req.method() == hyper::Method::POST
    {
        let mut review = body_json(req).await;
        let attrs = &review["spec"]["resourceAttributes"];
        let key = (
            attrs["group"].as_str().unwrap_or_default().to_owned(),
            attrs["resource"].as_str().unwrap_or_default().to_owned(),
            attrs["verb"].as_str().unwrap_or_default().to_owned(),
        );
        let allowed = !cluster.denied.contains(&key);
        review["status"] = json!({"allowed": allowed});
        return Ok(full(StatusCode::CREATED, review));
    }
    Err(req)
}

/// Secrets and TokenReviews, for the CA's tests.
impl FakeApi {
    /// Stores a Secret as if created (`metadata.namespace` and `metadata.name` set).
    pub fn put_secret(&self, secret: Value) {
        self.lock().store_secret(secret);
    }

    /// The stored Secret `namespace/name`.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock().secrets.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Makes the next create of this Secret lose a race: `winner` is stored just before
    /// and the create is answered 409 AlreadyExists, as when another replica was faster.
    pub fn race_secret_create(&self, winner: Value) {
        let key = secret_key(&winner);
        self.lock().secret_races.insert(key, winner);
    }

    /// Makes every Secret request fail with `code` (None: succeed again).
    pub fn refuse_secrets(&self, code: Option<u16>) {
        self.lock().refuse_secrets = code;
    }

    /// The Secret requests so far: "GET ns/name", "POST ns/name", "PUT ns/name".
    pub fn secret_calls(&self) -> Vec<String> {
        self.lock().secret_calls.clone()
    }

    /// The stored ConfigMap `namespace/name`.
    pub fn configmap(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock().configmaps.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Answers TokenReviews of `token` with `status` (a TokenReviewStatus).
    pub fn review_token(&self, token: &str, status: Value) {
        self.lock().token_statuses.insert(token.to_owned(), status);
    }

    /// The specs of the TokenReviews received so far.
    pub fn token_reviews(&self) -> Vec<Value> {
        self.lock().reviews.clone()
    }
}

fn secret_key(secret: &Value) -> (String, String) {
    let text = |field: &str| secret["metadata"][field].as_str().unwrap_or_default().to_owned();
    (text("namespace"), text("name"))
}

impl State {
    fn store_secret(&mut self, secret: Value) -> Value {
        self.store(Resource::Secrets, secret)
    }

    fn objects(&mut self, resource: Resource) -> &mut BTreeMap<(String, String), Value> {
        match resource {
            Resource::Secrets => &mut self.secrets,
            Resource::ConfigMaps => &mut self.configmaps,
        }
    }

    fn store(&mut self, resource: Resource, mut object: Value) -> Value {
        self.rv += 1;
        object["apiVersion"] = json!("v1");
        object["kind"] = json!(resource.kind());
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects(resource).insert(secret_key(&object), object.clone());
        object
    }

    fn apply(&mut self, kind: Kind, mut object: Value) {
        self.rv += 1;
        let key = key(kind, &object);
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.name());
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let kind_of_event =
            if self.objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        self.log.push(Logged { rv: self.rv, kind, kind_of_event, object });
        self.rv_tx.send_replace(self.rv);
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) {
        let Some(mut object) = self.objects.remove(&(kind, namespace.to_owned(), name.to_owned())) else {
            return;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log.push(Logged { rv: self.rv, kind, kind_of_event: "DELETED", object });
        self.rv_tx.send_replace(self.rv);
    }

    fn cut_watches(&mut self) {
        self.cut.cancel();
        self.cut = CancellationToken::new();
    }
}

fn key(kind: Kind, object: &Value) -> (Kind, String, String) {
    let text = |field: &str| object["metadata"][field].as_str().unwrap_or_default().to_owned();
    (kind, text("namespace"), text("name"))
}

type Body = BoxBody<Bytes, io::Error>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let mut response = Response::new(Full::new(bytes).map_err(|never: Infallible| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert("content-type", "application/json".parse().expect("header value"));
    response
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// The namespaced core objects the fake stores whole (no watches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Secrets,
    ConfigMaps,
}

impl Resource {
    fn kind(self) -> &'static str {
        match self {
            Resource::Secrets => "Secret",
            Resource::ConfigMaps => "ConfigMap",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Resource::Secrets => "secrets",
            Resource::ConfigMaps => "configmaps",
        }
    }
}

/// Secret and ConfigMap paths: `(resource, namespace, Some(name))` for one object,
/// `(resource, namespace, None)` for the collection.
fn object_path(path: &str) -> Option<(Resource, String, Option<String>)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let (resource, rest) = [Resource::Secrets, Resource::ConfigMaps]
        .into_iter()
        .find_map(|r| rest.strip_prefix(r.plural()).map(|rest| (r, rest)))?;
    match rest {
        "" => Some((resource, namespace.to_owned(), None)),
        name => Some((resource, namespace.to_owned(), Some(name.strip_prefix('/')?.to_owned()))),
    }
}

async fn body_json(req: Request<Incoming>) -> Value {
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

async fn handle_object(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
    resource: Resource,
    namespace: String,
    name: Option<String>,
) -> Response<Body> {
    let method = req.method().clone();
    let body = if method == hyper::Method::GET { Value::Null } else { body_json(req).await };
    let name = name.unwrap_or_else(|| body["metadata"]["name"].as_str().unwrap_or_default().to_owned());
    let key = (namespace.clone(), name.clone());
    let plural = resource.plural();
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    if resource == Resource::Secrets {
        state.secret_calls.push(format!("{method} {namespace}/{name}"));
        if let Some(code) = state.refuse_secrets {
            let message = format!("secrets \"{name}\" is forbidden by the test");
            return full(
                StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN),
                status(code, "Forbidden", &message),
            );
        }
    }
    let not_found =
        || full(StatusCode::NOT_FOUND, status(404, "NotFound", &format!("{plural} \"{name}\" not found")));
    match method {
        hyper::Method::GET => match state.objects(resource).get(&key) {
            Some(object) => full(StatusCode::OK, object.clone()),
            None => not_found(),
        },
        hyper::Method::POST => {
            if resource == Resource::Secrets
                && let Some(winner) = state.secret_races.remove(&key)
            {
                state.store_secret(winner);
            }
            if state.objects(resource).contains_key(&key) {
                let message = format!("{plural} \"{name}\" already exists");
                return full(StatusCode::CONFLICT, status(409, "AlreadyExists", &message));
            }
            let mut object = body;
            object["metadata"]["namespace"] = json!(namespace);
            full(StatusCode::CREATED, state.store(resource, object))
        }
        hyper::Method::PUT => {
            let Some(current) = state.objects(resource).get(&key) else { return not_found() };
            let sent = &body["metadata"]["resourceVersion"];
            if !sent.is_null() && *sent != current["metadata"]["resourceVersion"] {
                let message = format!("the object has been modified; {plural} \"{name}\"");
                return full(StatusCode::CONFLICT, status(409, "Conflict", &message));
            }
            full(StatusCode::OK, state.store(resource, body))
        }
        _ => full(StatusCode::METHOD_NOT_ALLOWED, status(405, "MethodNotAllowed", "not served by the fake")),
    }
}

async fn handle_token_review(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let mut review = body_json(req).await;
    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
    state.reviews.push(review["spec"].clone());
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let answer = state.token_statuses.get(token).cloned().unwrap_or_else(
        || json!({"authenticated": false, "error": "[invalid bearer token, token lookup failed]"}),
    );
    review["status"] = answer;
    full(StatusCode::CREATED, review)
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let req = match apply::handle(&state, req).await {
        Ok(answered) => return Ok(answered),
        Err(req) => req,
    };
    let req = match handle_cluster(&state, req).await {
        Ok(answered) => return Ok(answered),
        Err(req) => req,
    };
    if let Some((resource, namespace, name)) = object_path(req.uri().path()) {
        return Ok(handle_object(state, req, resource, namespace, name).await);
    }
    if req.uri().path() == "/apis/authentication.k8s.io/v1/tokenreviews"
        && req.method() == hyper::Method::POST
    {
        return Ok(handle_token_review(state, req).await);
    }
    let Some(kind) = Kind::from_path(req.uri().path()) else {
        return Ok(full(StatusCode::NOT_FOUND, status(404, "NotFound", "no such path")));
    };
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    if query.get("watch").map(String::as_str) == Some("true") {
        let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
        *guard.watches.entry(kind).or_default() += 1;
        if from < guard.compacted {
            let message = format!("too old resource version: {from} ({})", guard.compacted);
            let gone = status(410, "Expired", &message);
            return Ok(match guard.gone {
                Gone::Http => full(StatusCode::GONE, gone),
                Gone::Event => {
                    let line = json!({"type": "ERROR", "object": gone});
                    let (tx, rx) = mpsc::channel(4);
                    let _ = tx.try_send(Ok(Frame::data(Bytes::from(format!("{line}\n")))));
                    streaming(rx)
                }
            });
        }
        let (tx, rx) = mpsc::channel(64);
        let cut = guard.cut.clone();
        let rv_rx = guard.rv_tx.subscribe();
        drop(guard);
        tokio::spawn(stream_events(state, kind, from, bookmarks, cut, rv_rx, tx));
        return Ok(streaming(rx));
    }
    if let Some(&code) = guard.refuse_lists.get(&kind) {
        let message = format!("{} is forbidden by the test", kind.name());
        return Ok(full(
            StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN),
            status(code, "Forbidden", &message),
        ));
    }
    *guard.lists.entry(kind).or_default() += 1;
    let items: Vec<Value> =
        guard.objects.iter().filter(|((k, _, _), _)| *k == kind).map(|(_, o)| o.clone()).collect();
    let list = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.name()),
        "metadata": {"resourceVersion": guard.rv.to_string()},
        "items": items,
    });
    Ok(full(StatusCode::OK, list))
}

type Chunk = Result<Frame<Bytes>, io::Error>;

fn streaming(rx: mpsc::Receiver<Chunk>) -> Response<Body> {
    let chunks = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut response = Response::new(StreamBody::new(chunks).boxed());
    response.headers_mut().insert("content-type", "application/json".parse().expect("header value"));
    response
}

/// Feeds one watch: history after `from`, a bookmark, then live events, until
/// the client goes away or the test cuts it (an error mid-body makes hyper drop
/// the connection without the final chunk).
async fn stream_events(
    state: Arc<Mutex<State>>,
    kind: Kind,
    mut from: u64,
    bookmarks: bool,
    cut: CancellationToken,
    mut rv_rx: watch::Receiver<u64>,
    tx: mpsc::Sender<Chunk>,
) {
    let mut bookmark_sent = false;
    loop {
        let (lines, now) = {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            rv_rx.borrow_and_update();
            let lines: Vec<String> = state
                .log
                .iter()
                .filter(|e| e.kind == kind && e.rv > from)
                .map(|e| json!({"type": e.kind_of_event, "object": e.object}).to_string())
                .collect();
            (lines, state.rv)
        };
        from = now;
        for line in lines {
            if tx.send(Ok(Frame::data(Bytes::from(format!("{line}\n"))))).await.is_err() {
                return;
            }
        }
        if bookmarks && !bookmark_sent {
            bookmark_sent = true;
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "apiVersion": kind.api_version(), "kind": kind.name(),
                "metadata": {"resourceVersion": now.to_string()},
            }});
            if tx.send(Ok(Frame::data(Bytes::from(format!("{bookmark}\n"))))).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = cut.cancelled() => {
                let _ = tx.send(Err(io::Error::other("watch cut by the test"))).await;
                return;
            }
            () = tx.closed() => return,
            changed = rv_rx.changed() => if changed.is_err() { return },
        }
    }
}

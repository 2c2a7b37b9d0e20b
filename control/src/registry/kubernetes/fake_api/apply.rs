//! Server-side apply in the fake API server, for `meshctl install --apply`.
//!
//! It answers `PATCH` with `Content-Type: application/apply-patch+yaml` (a JSON body
//! is YAML too, and is what kube sends) on the object paths of the kinds install
//! renders, as the real apiserver does: `fieldManager` is required, `force` and
//! `dryRun=All` are honoured, created objects get `uid`, `creationTimestamp` and a
//! `resourceVersion` from the server's one counter, 201 on create and 200 on
//! update, and an apply that changes nothing leaves the resource version alone.
//! `GET` of the same paths answers the stored object or a 404 Status.
//!
//! One simplification: there is a single owner of every field, so an apply
//! replaces the object's content (what the real server does when only one field
//! manager applies, which is the case meshctl is tested for). Tests can make a
//! resource forbidden (a 403 Status worded as RBAC's) or invalid (a 422 Status).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::{Body, FakeApi, State, full, status};

/// A resource the fake applies: `(group, version, plural, kind, namespaced)`.
type ResourceRow = (&'static str, &'static str, &'static str, &'static str, bool);

const RESOURCES: &[ResourceRow] = &[
    ("", "v1", "namespaces", "Namespace", false),
    ("", "v1", "serviceaccounts", "ServiceAccount", true),
    ("", "v1", "services", "Service", true),
    ("apps", "v1", "deployments", "Deployment", true),
    ("apps", "v1", "daemonsets", "DaemonSet", true),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", true),
];

/// One apply request as received (for tests to check the parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyCall {
    /// `deployments.apps`, `namespaces`, ...
    pub resource: String,
    pub namespace: Option<String>,
    pub name: String,
    pub content_type: String,
    pub field_manager: Option<String>,
    pub force: bool,
    pub dry_run: bool,
}

/// `(resource, namespace or "", name)`.
type Key = (String, String, String);

/// The applied objects and what the test made fail.
#[derive(Default)]
pub(super) struct Store {
    objects: BTreeMap<Key, Value>,
    /// Keys in the order they were first created.
    created: Vec<Key>,
    calls: Vec<ApplyCall>,
    /// `(resource, name)` every request for is forbidden.
    forbidden: Vec<(String, String)>,
    /// The field error an apply of `(resource, name)` is refused with.
    invalid: HashMap<(String, String), String>,
    uids: u64,
}

/// An object path the store serves.
struct Target {
    row: ResourceRow,
    namespace: Option<String>,
    name: String,
}

impl Target {
    fn resource(&self) -> String {
        match self.row.0 {
            "" => self.row.2.to_owned(),
            group => format!("{}.{group}", self.row.2),
        }
    }

    fn api_version(&self) -> String {
        match self.row.0 {
            "" => self.row.1.to_owned(),
            group => format!("{group}/{}", self.row.1),
        }
    }

    fn key(&self) -> Key {
        (self.resource(), self.namespace.clone().unwrap_or_default(), self.name.clone())
    }
}

/// `/api/v1/namespaces/{name}`, `/api/v1/namespaces/{ns}/{plural}/{name}`,
/// `/apis/{group}/{version}/[namespaces/{ns}/]{plural}/{name}`.
fn parse(path: &str) -> Option<Target> {
    let (group, version, rest) = match path.strip_prefix("/api/v1/") {
        Some(rest) => ("", "v1", rest),
        None => {
            let (group, rest) = path.strip_prefix("/apis/")?.split_once('/')?;
            let (version, rest) = rest.split_once('/')?;
            (group, version, rest)
        }
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (namespace, plural, name) = match segments.as_slice() {
        ["namespaces", ns, plural, name] => (Some((*ns).to_owned()), *plural, *name),
        [plural, name] => (None, *plural, *name),
        _ => return None,
    };
    let row = *RESOURCES
        .iter()
        .find(|r| r.0 == group && r.1 == version && r.2 == plural && r.4 == namespace.is_some())?;
    (!name.is_empty()).then(|| Target { row, namespace, name: name.to_owned() })
}

/// Answers the requests of the store's paths; hands back any other request.
pub(super) async fn handle(
    state: &Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Request<Incoming>> {
    let Some(target) = parse(req.uri().path()) else { return Err(req) };
    let verb = match *req.method() {
        Method::GET => "get",
        Method::PATCH => "patch",
        _ => return Err(req),
    };
    if verb == "patch" {
        return Ok(patch(state, req, target).await);
    }
    let state = state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(refused) = forbidden(&state.apply, &target, verb) {
        return Ok(refused);
    }
    match state.apply.objects.get(&target.key()) {
        Some(object) => Ok(full(StatusCode::OK, object.clone())),
        // Namespaces the test set up through `Cluster` answer as before.
        None if target.row.2 == "namespaces" => Err(req),
        None => Ok(not_found(&target)),
    }
}

fn not_found(target: &Target) -> Response<Body> {
    let message = format!("{} \"{}\" not found", target.resource(), target.name);
    full(StatusCode::NOT_FOUND, status(404, "NotFound", &message))
}

/// A 403 worded as RBAC's, when the test forbade this object.
fn forbidden(store: &Store, target: &Target, verb: &str) -> Option<Response<Body>> {
    let resource = target.resource();
    if !store.forbidden.iter().any(|(r, n)| *r == resource && *n == target.name) {
        return None;
    }
    let scope = match &target.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let message = format!(
        "{resource} \"{}\" is forbidden: User \"meshctl-test\" cannot {verb} resource \"{}\" in API group \"{}\" {scope}",
        target.name, target.row.2, target.row.0
    );
    Some(full(StatusCode::FORBIDDEN, status(403, "Forbidden", &message)))
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn bad_request(message: &str) -> Response<Body> {
    full(StatusCode::BAD_REQUEST, status(400, "BadRequest", message))
}

/// Server-set metadata and status: what an apply does not say and so cannot change.
fn content(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"] {
            meta.remove(field);
        }
    }
    if let Some(object) = object.as_object_mut() {
        object.remove("status");
    }
    object
}

async fn patch(state: &Arc<Mutex<State>>, req: Request<Incoming>, target: Target) -> Response<Body> {
    let query = query(&req);
    let content_type =
        req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let call = ApplyCall {
        resource: target.resource(),
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        content_type: content_type.clone(),
        field_manager: query.get("fieldManager").cloned(),
        force: query.get("force").is_some_and(|f| f == "true"),
        dry_run: query.get("dryRun").is_some_and(|d| d == "All"),
    };
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    let state = &mut *guard;
    state.apply.calls.push(call.clone());
    if let Some(refused) = forbidden(&state.apply, &target, "patch") {
        return refused;
    }
    if content_type.split(';').next().map(str::trim) != Some("application/apply-patch+yaml") {
        let message = format!("the fake serves only server-side apply, not {content_type:?} patches");
        return full(StatusCode::UNSUPPORTED_MEDIA_TYPE, status(415, "UnsupportedMediaType", &message));
    }
    let Some(manager) = call.field_manager.clone() else {
        let message = "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch";
        return full(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", message));
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => match serde_yaml_ng::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return bad_request(&format!("error decoding YAML: {e}")),
        },
    };
    let kind = target.row.3;
    if !body.is_object() || body["kind"] != kind || body["apiVersion"] != target.api_version().as_str() {
        return bad_request(&format!(
            "the object is not a {kind} of {}: apiVersion {} kind {}",
            target.api_version(),
            body["apiVersion"],
            body["kind"]
        ));
    }
    if body["metadata"]["name"] != target.name.as_str() {
        return bad_request(&format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            body["metadata"]["name"].as_str().unwrap_or_default(),
            target.name
        ));
    }
    let sent_namespace = &body["metadata"]["namespace"];
    if let Some(ns) = &target.namespace
        && !sent_namespace.is_null()
        && sent_namespace != ns.as_str()
    {
        return bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    if let Some(field_error) = state.apply.invalid.get(&(target.resource(), target.name.clone())) {
        let group = if target.row.0.is_empty() { String::new() } else { format!(".{}", target.row.0) };
        let message = format!("{kind}{group} \"{}\" is invalid: {field_error}", target.name);
        return full(StatusCode::UNPROCESSABLE_ENTITY, status(422, "Invalid", &message));
    }

    let key = target.key();
    let existing = state.apply.objects.get(&key).cloned();
    let mut object = body;
    if let Some(ns) = &target.namespace {
        object["metadata"]["namespace"] = json!(ns);
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let entry = json!({"manager": manager, "operation": "Apply", "apiVersion": target.api_version(),
        "time": now, "fieldsType": "FieldsV1"});
    let code = match &existing {
        Some(current) => {
            let managers = current["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
            let managed = managers.iter().any(|m| m["manager"] == manager.as_str());
            if managed && content(current) == content(&object) {
                return full(StatusCode::OK, current.clone());
            }
            for field in ["uid", "creationTimestamp", "resourceVersion", "generation"] {
                object["metadata"][field] = current["metadata"][field].clone();
            }
            let mut managers: Vec<Value> =
                managers.into_iter().filter(|m| m["manager"] != manager.as_str()).collect();
            managers.push(entry);
            object["metadata"]["managedFields"] = json!(managers);
            object["metadata"]["generation"] =
                json!(current["metadata"]["generation"].as_u64().unwrap_or(1) + 1);
            if !current["status"].is_null() {
                object["status"] = current["status"].clone();
            }
            StatusCode::OK
        }
        None => {
            state.apply.uids += 1;
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", state.apply.uids));
            object["metadata"]["creationTimestamp"] = json!(now);
            object["metadata"]["generation"] = json!(1);
            object["metadata"]["managedFields"] = json!([entry]);
            if kind == "Namespace" {
                object["status"] = json!({"phase": "Active"});
            }
            StatusCode::CREATED
        }
    };
    if call.dry_run {
        return full(code, object);
    }
    state.rv += 1;
    object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
    if existing.is_none() {
        state.apply.created.push(key.clone());
    }
    state.apply.objects.insert(key, object.clone());
    full(code, object)
}

/// Server-side apply, for `meshctl install --apply`.
impl FakeApi {
    /// The applied object `resource` (`deployments.apps`, `namespaces`) `namespace/name`
    /// (namespace "" for cluster-scoped ones).
    pub fn applied(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        self.lock().apply.objects.get(&key).cloned()
    }

    /// Every applied object, in the order they were created.
    pub fn applied_objects(&self) -> Vec<Value> {
        let state = self.lock();
        state.apply.created.iter().filter_map(|k| state.apply.objects.get(k).cloned()).collect()
    }

    /// The apply requests so far, refused ones included.
    pub fn apply_calls(&self) -> Vec<ApplyCall> {
        self.lock().apply.calls.clone()
    }

    /// Makes every request for `resource` (`clusterroles.rbac.authorization.k8s.io`)
    /// `name` fail with 403, as when RBAC does not grant it.
    pub fn forbid(&self, resource: &str, name: &str) {
        self.lock().apply.forbidden.push((resource.to_owned(), name.to_owned()));
    }

    /// Makes applies of `resource` `name` fail with 422 and `field_error`
    /// (`spec.replicas: Invalid value: -1: must be greater than or equal to 0`).
    pub fn reject_as_invalid(&self, resource: &str, name: &str, field_error: &str) {
        self.lock().apply.invalid.insert((resource.to_owned(), name.to_owned()), field_error.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One raw HTTP/1.1 request: the status code and the JSON body.
    async fn call(api: &FakeApi, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(api.addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: fake\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        let code = answer[9..12].parse().unwrap();
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        (code, serde_json::from_str(body).unwrap())
    }

    const APPLY: &str = "application/apply-patch+yaml";
    const SA: &str = "/api/v1/namespaces/mesh-system/serviceaccounts/mesh-agent";

    fn sa(label: &str) -> String {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "mesh-agent", "labels": {"l": label}}})
        .to_string()
    }

    #[tokio::test]
    async fn apply_creates_then_updates_and_get_reads_it_back() {
        let api = FakeApi::start().await;
        let (code, absent) = call(&api, "GET", SA, "", "").await;
        assert_eq!(
            (code, absent["kind"].as_str(), absent["reason"].as_str()),
            (404, Some("Status"), Some("NotFound"))
        );

        let path = format!("{SA}?fieldManager=meshctl&force=true");
        let (code, created) = call(&api, "PATCH", &path, APPLY, &sa("a")).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["metadata"]["namespace"], "mesh-system");
        let rv = created["metadata"]["resourceVersion"].clone();
        assert!(rv.is_string() && created["metadata"]["uid"].is_string());

        let (code, same) = call(&api, "PATCH", &path, APPLY, &sa("a")).await;
        assert_eq!((code, &same), (200, &created), "a no-op apply changes nothing");
        let (code, updated) = call(&api, "PATCH", &path, APPLY, &sa("b")).await;
        assert_eq!((code, &updated["metadata"]["labels"]["l"]), (200, &json!("b")));
        assert_ne!(updated["metadata"]["resourceVersion"], rv);
        assert_eq!(updated["metadata"]["uid"], created["metadata"]["uid"]);
        assert_eq!(call(&api, "GET", SA, "", "").await, (200, updated));
    }

    #[tokio::test]
    async fn a_yaml_body_and_a_dry_run_and_what_the_server_refuses() {
        let api = FakeApi::start().await;
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mesh-system\n";
        let (code, dry) =
            call(&api, "PATCH", "/api/v1/namespaces/mesh-system?fieldManager=m&dryRun=All", APPLY, ns).await;
        assert_eq!((code, &dry["status"]["phase"]), (201, &json!("Active")));
        assert!(api.applied("namespaces", "", "mesh-system").is_none(), "a dry run stores nothing");
        assert_eq!(call(&api, "GET", "/api/v1/namespaces/mesh-system", "", "").await.0, 404);

        let (code, e) = call(&api, "PATCH", "/api/v1/namespaces/mesh-system", APPLY, ns).await;
        assert_eq!((code, e["reason"].as_str()), (422, Some("Invalid")), "no field manager");
        let (code, _) = call(
            &api,
            "PATCH",
            "/api/v1/namespaces/mesh-system?fieldManager=m",
            "application/merge-patch+json",
            ns,
        )
        .await;
        assert_eq!(code, 415);
        let (code, e) = call(&api, "PATCH", "/api/v1/namespaces/other?fieldManager=m", APPLY, ns).await;
        assert_eq!(code, 400, "{e}");
        let (code, e) =
            call(&api, "PATCH", "/api/v1/namespaces/mesh-system?fieldManager=m", APPLY, "{[").await;
        assert_eq!(code, 400, "{e}");

        api.forbid("namespaces", "mesh-system");
        let (code, e) = call(&api, "PATCH", "/api/v1/namespaces/mesh-system?fieldManager=m", APPLY, ns).await;
        assert_eq!((code, e["reason"].as_str()), (403, Some("Forbidden")));
        assert!(
            e["message"].as_str().unwrap().contains("cannot patch resource \"namespaces\" in API group \"\"")
        );
        assert_eq!(api.apply_calls().len(), 6);
    }
}

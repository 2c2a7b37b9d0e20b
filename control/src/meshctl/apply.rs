//! `meshctl install --apply`: the rendered objects sent to the cluster by
//! server-side apply, in the rendered order (the namespace first), as
//! `kubectl apply --server-side --force-conflicts --field-manager meshctl` would.
//!
//! Server-side apply makes a re-run converge rather than fail on existing objects,
//! and `force` takes over fields another manager (an earlier `kubectl apply`) holds,
//! since meshctl's manifests are the source of truth for what it installs. Objects
//! are addressed through a fixed table of the kinds install renders instead of API
//! discovery: one round trip less per run, and a kind missing from the table is a
//! meshctl bug that should fail loudly before anything is sent.

use std::fmt::Write as _;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::Value;

use super::error::{MeshctlError, connect_reason};
use super::kubeconfig::Cluster;

/// The field manager meshctl's changes are recorded under.
pub const FIELD_MANAGER: &str = "meshctl";

/// A kind install renders: `(apiVersion, kind, plural, namespaced)`.
type KindRow = (&'static str, &'static str, &'static str, bool);

/// Every kind install renders, and how the API addresses it.
pub const KINDS: &[KindRow] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "Service", "services", true),
    ("apps/v1", "Deployment", "deployments", true),
    ("apps/v1", "DaemonSet", "daemonsets", true),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", false),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", false),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", true),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", true),
];

/// One object, resolved to where the API keeps it.
struct Target {
    resource: ApiResource,
    namespace: Option<String>,
    name: String,
}

impl Target {
    /// `clusterroles.rbac.authorization.k8s.io/mesh-control`, as RBAC names it.
    fn resource_name(&self) -> String {
        match self.resource.group.as_str() {
            "" => format!("{}/{}", self.resource.plural, self.name),
            group => format!("{}.{group}/{}", self.resource.plural, self.name),
        }
    }

    /// `clusterrole.rbac.authorization.k8s.io/mesh-control`, as kubectl prints it.
    fn display_name(&self) -> String {
        let kind = self.resource.kind.to_ascii_lowercase();
        match self.resource.group.as_str() {
            "" => format!("{kind}/{}", self.name),
            group => format!("{kind}.{group}/{}", self.name),
        }
    }
}

/// Where `doc` goes, or which of its fields stops meshctl from knowing.
fn resolve(doc: &Value) -> Result<Target, MeshctlError> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let Some(&(_, _, plural, namespaced)) = KINDS.iter().find(|(v, k, _, _)| *v == api_version && *k == kind)
    else {
        return Err(MeshctlError::Usage(format!(
            "install rendered a {kind} ({api_version}) {name:?} that --apply does not know how to address; \
             print the manifests without --apply and use kubectl apply -f -"
        )));
    };
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let namespace = doc["metadata"]["namespace"].as_str().map(str::to_owned);
    if name.is_empty() || (namespaced && namespace.is_none()) {
        return Err(MeshctlError::Usage(format!("install rendered a {kind} without a name or namespace")));
    }
    Ok(Target {
        resource: ApiResource::from_gvk_with_plural(&gvk, plural),
        namespace: namespaced.then(|| namespace.unwrap_or_default()),
        name: name.to_owned(),
    })
}

/// Applies `objects` in order; stops at the first the API refuses. With `dry_run`
/// the server checks everything (admission, validation) and persists nothing.
/// Returns one line per object and a summary.
pub async fn apply(cluster: &Cluster, objects: &[Value], dry_run: bool) -> Result<String, MeshctlError> {
    let targets = objects.iter().map(resolve).collect::<Result<Vec<_>, _>>()?;
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    if dry_run {
        params = params.dry_run();
    }
    let mut out = String::new();
    for (applied, (target, doc)) in targets.iter().zip(objects).enumerate() {
        let api: Api<DynamicObject> = match &target.namespace {
            Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &target.resource),
            None => Api::all_with(cluster.client.clone(), &target.resource),
        };
        if let Err(e) = api.patch(&target.name, &params, &Patch::Apply(doc)).await {
            return Err(MeshctlError::Apply {
                object: target.resource_name(),
                reason: failure(e, &cluster.server),
                applied,
                total: objects.len(),
            });
        }
        let _ = writeln!(
            out,
            "{} {}",
            target.display_name(),
            if dry_run { "applied (server dry run)" } else { "applied" }
        );
    }
    let _ = if dry_run {
        writeln!(
            out,
            "{} objects would be applied to {} (server dry run: nothing was changed)",
            objects.len(),
            cluster.server
        )
    } else {
        writeln!(
            out,
            "{} objects applied to {} as field manager {FIELD_MANAGER}",
            objects.len(),
            cluster.server
        )
    };
    Ok(out)
}

/// What went wrong, in a user's terms, from the API's answer (or the lack of one).
fn failure(e: kube::Error, server: &str) -> String {
    match e {
        kube::Error::Api(status) => {
            let message =
                if status.message.is_empty() { status.reason.clone() } else { status.message.clone() };
            match status.code {
                403 => format!(
                    "403 Forbidden: {message} — install creates the mesh-system namespace and \
                     cluster-scoped RBAC (ClusterRoles, ClusterRoleBindings), which needs cluster-admin \
                     or equivalent; `meshctl check --pre` lists each missing permission"
                ),
                401 => format!(
                    "401 Unauthorized: {message} — the kubeconfig's credentials were refused (expired?)"
                ),
                422 => format!("422 Invalid: {message}"),
                code => format!("{code} {}: {message}", status.reason),
            }
        }
        kube::Error::SerdeError(e) => {
            format!("the API server at {server} answered in a form meshctl cannot read: {e}")
        }
        other => format!(
            "cannot reach the Kubernetes API server at {server}: {} — is the cluster up, and the \
             kubeconfig's server address reachable from here?",
            connect_reason(&other)
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::meshctl::install::{Profile, objects};
    use crate::registry::kubernetes::fake_api::FakeApi;

    fn cluster_at(url: &str) -> Cluster {
        Cluster::from_config(kube::Config::new(url.parse().unwrap()), "test").unwrap()
    }

    fn sets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `(kind, name)` of each object.
    fn names(docs: &[Value]) -> Vec<(String, String)> {
        docs.iter()
            .map(|d| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (text(&d["kind"]), text(&d["metadata"]["name"]))
            })
            .collect()
    }

    #[test]
    fn every_rendered_kind_is_addressable_and_checked_by_check_pre() {
        for profile in [Profile::Minimal, Profile::Production] {
            for doc in objects(profile, &[]).unwrap() {
                resolve(&doc).unwrap_or_else(|e| panic!("{doc}: {e}"));
            }
        }
        let table: BTreeSet<(String, String, bool)> = KINDS
            .iter()
            .map(|(v, _, plural, ns)| {
                let group = v.rsplit_once('/').map_or("", |(g, _)| g);
                (group.to_owned(), (*plural).to_owned(), *ns)
            })
            .collect();
        let asked: BTreeSet<(String, String, bool)> = super::super::precheck::CREATES
            .iter()
            .map(|(g, r, ns)| ((*g).to_owned(), (*r).to_owned(), *ns))
            .collect();
        assert_eq!(table, asked, "check --pre asks permission for exactly what --apply creates");
    }

    #[test]
    fn an_unknown_kind_is_refused_by_name_before_anything_is_sent() {
        let job =
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", "namespace": "m"}});
        let e = resolve(&job).err().unwrap().to_string();
        assert!(e.contains("a Job (batch/v1) \"x\""), "{e}");
    }

    #[tokio::test]
    async fn production_with_overrides_is_applied_in_order_by_meshctl() {
        let api = FakeApi::start().await;
        let docs =
            objects(Profile::Production, &sets(&["controlPlane.replicas=3", "image.tag=1.2.3"])).unwrap();
        let out = apply(&cluster_at(&api.url()), &docs, false).await.unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "namespace/mesh-system applied", "{out}");
        assert!(out.contains("\ndeployment.apps/mesh-control applied\n"), "{out}");
        assert!(out.contains("clusterrole.rbac.authorization.k8s.io/mesh-control applied"), "{out}");
        assert_eq!(lines.len(), docs.len() + 1);
        assert!(lines[docs.len()].starts_with(&format!("{} objects applied to {}", docs.len(), api.url())));

        let stored = api.applied_objects();
        assert_eq!(names(&stored), names(&docs), "all of them, in the rendered order");
        for (sent, kept) in docs.iter().zip(&stored) {
            assert_eq!(kept["metadata"]["managedFields"][0]["manager"], FIELD_MANAGER, "{kept}");
            assert!(kept["metadata"]["uid"].is_string() && kept["metadata"]["creationTimestamp"].is_string());
            assert_eq!(kept["spec"], sent["spec"]);
        }
        let control = api.applied("deployments.apps", "mesh-system", "mesh-control").unwrap();
        assert_eq!(control["spec"]["replicas"], 3);
        let image = control["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap();
        assert_eq!(image, "mesh-control:1.2.3");
        assert!(api.applied("poddisruptionbudgets.policy", "mesh-system", "mesh-control").is_some());
        assert!(api.applied("namespaces", "", "mesh-system").is_some());
        for call in api.apply_calls() {
            assert_eq!(call.field_manager.as_deref(), Some(FIELD_MANAGER));
            assert!(call.force && !call.dry_run, "{call:?}");
            assert_eq!(call.content_type, "application/apply-patch+yaml");
        }
    }

    #[tokio::test]
    async fn applying_again_converges_and_a_change_moves_only_its_object() {
        let api = FakeApi::start().await;
        let cluster = cluster_at(&api.url());
        let docs = objects(Profile::Production, &[]).unwrap();
        apply(&cluster, &docs, false).await.unwrap();
        let first = api.applied_objects();
        apply(&cluster, &docs, false).await.unwrap();
        assert_eq!(api.applied_objects(), first, "an unchanged apply keeps every resourceVersion");
        assert_eq!(api.apply_calls().len(), 2 * docs.len());

        let changed = objects(Profile::Production, &sets(&["controlPlane.replicas=4"])).unwrap();
        apply(&cluster, &changed, false).await.unwrap();
        let rv = |docs: &[Value], name: &str| {
            let d = docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == name).unwrap();
            d["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>().unwrap()
        };
        let now = api.applied_objects();
        assert!(rv(&now, "mesh-control") > rv(&first, "mesh-control"));
        let control = api.applied("deployments.apps", "mesh-system", "mesh-control").unwrap();
        assert_eq!(
            (control["spec"]["replicas"].as_u64(), control["metadata"]["generation"].as_u64()),
            (Some(4), Some(2))
        );
        assert_eq!(
            control["metadata"]["uid"],
            first.iter().find(|d| d["kind"] == "Deployment").unwrap()["metadata"]["uid"]
        );
        let others = |docs: &[Value]| -> Vec<Value> {
            docs.iter().filter(|d| d["kind"] != "Deployment").cloned().collect()
        };
        assert_eq!(others(&now), others(&first));
    }

    #[tokio::test]
    async fn a_dry_run_stores_nothing_and_says_so() {
        let api = FakeApi::start().await;
        let docs = objects(Profile::Minimal, &[]).unwrap();
        let out = apply(&cluster_at(&api.url()), &docs, true).await.unwrap();
        assert!(out.starts_with("namespace/mesh-system applied (server dry run)\n"), "{out}");
        assert!(out.ends_with("(server dry run: nothing was changed)\n"), "{out}");
        assert!(api.applied_objects().is_empty());
        let calls = api.apply_calls();
        assert_eq!(calls.len(), docs.len());
        assert!(calls.iter().all(|c| c.dry_run && c.force));
    }

    #[tokio::test]
    async fn a_forbidden_cluster_role_stops_the_run_where_it_is() {
        let api = FakeApi::start().await;
        api.forbid("clusterroles.rbac.authorization.k8s.io", "mesh-control");
        let docs = objects(Profile::Production, &[]).unwrap();
        let at = docs.iter().position(|d| d["kind"] == "ClusterRole").unwrap();
        let e = apply(&cluster_at(&api.url()), &docs, false).await.unwrap_err().to_string();
        assert!(
            e.starts_with("patch clusterroles.rbac.authorization.k8s.io/mesh-control: 403 Forbidden: "),
            "{e}"
        );
        assert!(e.contains("cannot patch resource \"clusterroles\"") && e.contains("cluster-admin"), "{e}");
        assert!(e.ends_with(&format!("({at} of {} objects were applied before it)", docs.len())), "{e}");
        assert_eq!(names(&api.applied_objects()), names(&docs[..at]), "those before it, none after");
        assert_eq!(api.apply_calls().len(), at + 1);
    }

    #[tokio::test]
    async fn an_invalid_object_carries_the_servers_message() {
        let api = FakeApi::start().await;
        api.reject_as_invalid(
            "deployments.apps",
            "mesh-control",
            "spec.replicas: Invalid value: -1: must be greater than or equal to 0",
        );
        let docs = objects(Profile::Minimal, &[]).unwrap();
        let e = apply(&cluster_at(&api.url()), &docs, false).await.unwrap_err().to_string();
        assert!(
            e.starts_with(
                "patch deployments.apps/mesh-control: 422 Invalid: Deployment.apps \"mesh-control\" is invalid: \
                 spec.replicas: Invalid value: -1"
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let docs = objects(Profile::Minimal, &[]).unwrap();
        let e = apply(&cluster_at(&url), &docs, false).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "patch namespaces/mesh-system: cannot reach the Kubernetes API server at {url}: connection refused"
            )),
            "{e}"
        );
        assert!(e.ends_with(&format!("(0 of {} objects were applied before it)", docs.len())), "{e}");
    }

    #[tokio::test]
    async fn a_malformed_answer_is_an_error_not_a_panic() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 8192];
                let _ = s.read(&mut buf).await;
                let body = "{\"kind\": 7, \"metadata\": [";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let docs = objects(Profile::Minimal, &[]).unwrap();
        let e = apply(&cluster_at(&url), &docs, false).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!("the API server at {url} answered in a form meshctl cannot read")),
            "{e}"
        );
    }
}

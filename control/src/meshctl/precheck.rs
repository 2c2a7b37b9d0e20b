//! `meshctl check --pre`: whether a cluster can take the mesh, asked through the
//! kubeconfig before `meshctl install`: the Kubernetes version, each node's kernel
//! (eBPF mode or the iptables fallback), permission to create what install creates,
//! the Gateway API's HTTPRoute, and the `mesh-system` namespace's pod security.

use std::fmt::Write as _;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde::Serialize;

use super::table::Table;

/// Oldest Kubernetes the mesh supports: pod-bound service-account tokens name the
/// node (1.30), which is how the control plane tells agents apart.
pub const MIN_KUBERNETES: (u64, u64) = (1, 30);
/// Oldest kernel of eBPF mode (see the agent's preflight); older nodes use iptables.
pub const MIN_EBPF_KERNEL: (u64, u64) = (5, 17);
/// The CRD HTTPRoutes come from.
pub const HTTPROUTE_CRD: &str = "httproutes.gateway.networking.k8s.io";
const NAMESPACE: &str = "mesh-system";

/// What `meshctl install` creates: `(group, resource, namespaced)`.
pub const CREATES: &[(&str, &str, bool)] = &[
    ("", "namespaces", false),
    ("", "serviceaccounts", true),
    ("", "services", true),
    ("apps", "deployments", true),
    ("apps", "daemonsets", true),
    ("rbac.authorization.k8s.io", "clusterroles", false),
    ("rbac.authorization.k8s.io", "clusterrolebindings", false),
    ("rbac.authorization.k8s.io", "roles", true),
    ("rbac.authorization.k8s.io", "rolebindings", true),
    ("policy", "poddisruptionbudgets", true),
];

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Warning,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub check: String,
    pub outcome: Outcome,
    pub detail: String,
}

/// Every check, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreReport {
    pub items: Vec<Item>,
}

impl PreReport {
    /// No check failed (warnings allowed).
    pub fn passes(&self) -> bool {
        self.items.iter().all(|i| i.outcome != Outcome::Fail)
    }
}

fn item(check: impl Into<String>, outcome: Outcome, detail: impl Into<String>) -> Item {
    Item { check: check.into(), outcome, detail: detail.into() }
}

/// `major.minor` of a version string such as `v1.31.2-gke.1` or `6.8.0-45-generic`.
fn major_minor(v: &str) -> Option<(u64, u64)> {
    let mut parts = v.trim().trim_start_matches('v').split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts.next()?.chars().take_while(char::is_ascii_digit).collect();
    Some((major, minor.parse().ok()?))
}

/// Asks the cluster behind `client`.
pub async fn inspect(client: Client) -> PreReport {
    let mut items = Vec::new();
    items.push(match client.apiserver_version().await {
        Ok(info) => match major_minor(&info.git_version) {
            Some(v) if v >= MIN_KUBERNETES => item("kubernetes", Outcome::Ok, info.git_version),
            Some(_) => item(
                "kubernetes",
                Outcome::Fail,
                format!(
                    "{} is older than {}.{}: the control plane identifies agents by pod-bound service-account tokens",
                    info.git_version, MIN_KUBERNETES.0, MIN_KUBERNETES.1
                ),
            ),
            None => item("kubernetes", Outcome::Warning, format!("version {:?} not understood", info.git_version)),
        },
        Err(e) => item("kubernetes", Outcome::Fail, format!("the API server did not answer: {e}")),
    });

    match Api::<Node>::all(client.clone()).list(&ListParams::default()).await {
        Ok(nodes) if nodes.items.is_empty() => items.push(item("nodes", Outcome::Warning, "none registered")),
        Ok(nodes) => {
            for node in nodes.items {
                let name = node.metadata.name.clone().unwrap_or_default();
                let info = node.status.and_then(|s| s.node_info).unwrap_or_default();
                let check = format!("node {name}");
                items.push(if info.operating_system != "linux" {
                    item(check, Outcome::Warning, format!("{}: no agent runs there", info.operating_system))
                } else {
                    match major_minor(&info.kernel_version) {
                        Some(v) if v >= MIN_EBPF_KERNEL => {
                            item(check, Outcome::Ok, format!("kernel {}: eBPF mode", info.kernel_version))
                        }
                        _ => item(
                            check,
                            Outcome::Warning,
                            format!(
                                "kernel {} is below {}.{}: the agent falls back to iptables there",
                                info.kernel_version, MIN_EBPF_KERNEL.0, MIN_EBPF_KERNEL.1
                            ),
                        ),
                    }
                });
            }
        }
        Err(e) => items.push(item("nodes", Outcome::Warning, format!("cannot list nodes: {e}"))),
    }

    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    for (group, resource, namespaced) in CREATES {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some((*group).to_owned()),
                    resource: Some((*resource).to_owned()),
                    verb: Some("create".to_owned()),
                    namespace: namespaced.then(|| NAMESPACE.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let what = if group.is_empty() { (*resource).to_owned() } else { format!("{resource}.{group}") };
        let check = format!("create {what}");
        items.push(match reviews.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => item(check, Outcome::Ok, "allowed"),
            Ok(r) => item(
                check,
                Outcome::Fail,
                format!(
                    "denied{}: install needs it",
                    r.status.and_then(|s| s.reason).map(|r| format!(" ({r})")).unwrap_or_default()
                ),
            ),
            Err(e) => item(check, Outcome::Warning, format!("could not ask: {e}")),
        });
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    items.push(match crds.get_opt(HTTPROUTE_CRD).await {
        Ok(Some(_)) => item("gateway api", Outcome::Ok, "HTTPRoute installed: routes attached to Services apply"),
        Ok(None) => item(
            "gateway api",
            Outcome::Warning,
            "HTTPRoute not installed: no routes from HTTPRoutes until it is (the control plane picks it up then)",
        ),
        Err(e) => item("gateway api", Outcome::Warning, format!("cannot tell: {e}")),
    });

    let namespaces: Api<Namespace> = Api::all(client);
    let check = format!("namespace {NAMESPACE}");
    items.push(match namespaces.get_opt(NAMESPACE).await {
        Ok(None) => item(check, Outcome::Ok, "absent: install creates it"),
        Ok(Some(ns)) => {
            let enforce = ns
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pod-security.kubernetes.io/enforce"))
                .cloned();
            match enforce.as_deref() {
                None | Some("privileged") => item(check, Outcome::Ok, "present; pod security allows the agent"),
                Some(level) => item(
                    check,
                    Outcome::Fail,
                    format!(
                        "pod security enforces {level:?}: the agent needs \"privileged\" (host network, BPF and NET_ADMIN)"
                    ),
                ),
            }
        }
        Err(e) => item(check, Outcome::Warning, format!("cannot read it: {e}")),
    });
    PreReport { items }
}

/// The human table.
pub fn render(r: &PreReport) -> String {
    let mut t = Table::new(["CHECK", "RESULT", "DETAIL"]);
    for i in &r.items {
        let outcome = match i.outcome {
            Outcome::Ok => "ok",
            Outcome::Warning => "warning",
            Outcome::Fail => "FAIL",
        };
        t.row(vec![i.check.clone(), outcome.into(), i.detail.clone()]);
    }
    let mut out = t.render();
    let _ = writeln!(
        out,
        "{}",
        if r.passes() { "the cluster can take the mesh" } else { "fix the failed checks before installing" }
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::registry::kubernetes::fake_api::{Cluster, FakeApi, node};

    fn outcome<'a>(r: &'a PreReport, check: &str) -> &'a Item {
        r.items.iter().find(|i| i.check == check).unwrap_or_else(|| panic!("no {check}: {r:#?}"))
    }

    #[tokio::test]
    async fn a_ready_cluster_passes_with_old_kernels_as_warnings() {
        let api = FakeApi::start().await;
        api.set_cluster(Cluster {
            version: "v1.31.2".into(),
            nodes: vec![node("a", "6.8.0-45-generic", "linux"), node("b", "5.15.0-91-generic", "linux")],
            crds: vec![HTTPROUTE_CRD.into()],
            ..Default::default()
        });
        let r = inspect(api.client()).await;
        assert!(r.passes(), "{r:#?}");
        assert_eq!(outcome(&r, "node a").outcome, Outcome::Ok);
        let b = outcome(&r, "node b");
        assert_eq!(b.outcome, Outcome::Warning);
        assert!(b.detail.contains("falls back to iptables"), "{b:?}");
        assert_eq!(outcome(&r, "create daemonsets.apps").outcome, Outcome::Ok);
        assert_eq!(outcome(&r, "namespace mesh-system").detail, "absent: install creates it");
        assert!(render(&r).ends_with("the cluster can take the mesh\n"));
    }

    #[tokio::test]
    async fn an_old_cluster_a_denied_permission_and_a_restricted_namespace_fail_by_name() {
        let api = FakeApi::start().await;
        let ns = json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "mesh-system", "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}});
        api.set_cluster(Cluster {
            version: "v1.28.9".into(),
            nodes: vec![node("w", "10.0.20348", "windows")],
            namespaces: BTreeMap::from([("mesh-system".to_owned(), ns)]),
            denied: vec![("rbac.authorization.k8s.io".into(), "clusterroles".into(), "create".into())],
            ..Default::default()
        });
        let r = inspect(api.client()).await;
        assert!(!r.passes());
        let failed: Vec<&str> =
            r.items.iter().filter(|i| i.outcome == Outcome::Fail).map(|i| i.check.as_str()).collect();
        assert_eq!(
            failed,
            ["kubernetes", "create clusterroles.rbac.authorization.k8s.io", "namespace mesh-system"]
        );
        assert!(outcome(&r, "namespace mesh-system").detail.contains("\"baseline\""));
        assert!(outcome(&r, "node w").detail.contains("no agent runs there"));
        assert_eq!(outcome(&r, "gateway api").outcome, Outcome::Warning);
        assert!(render(&r).contains("FAIL"));
    }

    #[test]
    fn versions_are_read_as_major_minor() {
        assert_eq!(major_minor("v1.31.2-gke.1200"), Some((1, 31)));
        assert_eq!(major_minor("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(major_minor("5.17"), Some((5, 17)));
        assert_eq!(major_minor("1.29+"), Some((1, 29)));
        assert_eq!(major_minor("garbage"), None);
    }
}

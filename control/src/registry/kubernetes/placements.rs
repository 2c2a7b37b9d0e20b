//! Pods as placements: which workload runs on which node, and as whom.
//!
//! Every scheduled, meshed pod with its own network namespace is a workload of its
//! node: its node's agent serves it under the pod's service account, and the CA
//! grants that node the pod's identity. Host-network pods share the node's network
//! namespace and are not served per pod; pods opted out with `mesh.dev/inject:
//! "false"` are not meshed at all.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use mesh_api as api;

use super::annotations::{self, Problems};

/// The workloads and the annotation problems met while reading them.
#[derive(Debug, Default)]
pub struct Placed {
    /// Sorted by namespace then name.
    pub workloads: Vec<api::Workload>,
    pub problems: Vec<String>,
}

/// The workload of every pod that is one (see the module documentation).
pub fn map_workloads(pods: &[Arc<Pod>]) -> Placed {
    let mut problems = Problems::default();
    let mut workloads: Vec<api::Workload> = pods.iter().filter_map(|p| workload(p, &mut problems)).collect();
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Placed { workloads, problems: problems.into_vec() }
}

fn workload(pod: &Pod, problems: &mut Problems) -> Option<api::Workload> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    if spec.host_network == Some(true) {
        return None;
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone()?;
    let object = format!("pod {namespace}/{name}");
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    if !annotations::pod_settings(&object, &annotations, problems).meshed {
        return None;
    }
    let service_account =
        spec.service_account_name.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into());
    let status = pod.status.as_ref();
    let mut addresses: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
        .unwrap_or_default();
    if addresses.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.clone())
    {
        addresses.push(ip);
    }
    // Canonical text, and nothing that is not an address.
    let addresses =
        addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()).map(|ip| ip.to_string()).collect();
    Some(api::Workload {
        namespace,
        name,
        service_account,
        addresses,
        node: node.to_owned(),
        labels: pod.metadata.labels.clone().unwrap_or_default().into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(name: &str, node: Option<&str>, ips: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([("app".to_owned(), "cart".to_owned())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                service_account_name: Some("cart".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ips.first().map(|s| (*s).to_owned()),
                pod_ips: Some(ips.iter().map(|ip| PodIP { ip: (*ip).to_owned() }).collect()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn scheduled_meshed_pods_are_their_node_s_workloads() {
        let mut host = pod("host-net", Some("node-a"), &["192.168.1.5"]);
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut opted_out = pod("plain", Some("node-a"), &["10.1.0.8"]);
        opted_out.metadata.annotations =
            Some(BTreeMap::from([("mesh.dev/inject".to_owned(), "false".to_owned())]));
        let mut no_sa = pod("b-default-sa", Some("node-b"), &[]);
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        let pods = [
            pod("cart-2", Some("node-b"), &["10.1.0.6", "fd01::6"]),
            pod("cart-1", Some("node-a"), &["10.1.0.5"]),
            pod("pending", None, &[]),
            host,
            opted_out,
            no_sa,
        ]
        .map(Arc::new);
        let placed = map_workloads(&pods);
        let names: Vec<_> = placed.workloads.iter().map(|w| format!("{}@{}", w.name, w.node)).collect();
        assert_eq!(names, ["b-default-sa@node-b", "cart-1@node-a", "cart-2@node-b"]);
        let cart2 = &placed.workloads[2];
        assert_eq!(cart2.namespace, "shop");
        assert_eq!(cart2.service_account, "cart");
        assert_eq!(cart2.addresses, ["10.1.0.6", "fd01::6"]);
        assert_eq!(cart2.labels.get("app").map(String::as_str), Some("cart"));
        assert_eq!(placed.workloads[0].service_account, "default");
        assert!(placed.workloads[0].addresses.is_empty(), "placed before it has an address");
        assert!(placed.problems.is_empty());
    }

    #[test]
    fn a_bad_inject_annotation_is_reported_and_the_pod_stays_meshed() {
        let mut p = pod("cart-1", Some("node-a"), &["10.1.0.5"]);
        p.metadata.annotations = Some(BTreeMap::from([("mesh.dev/inject".to_owned(), "maybe".to_owned())]));
        let placed = map_workloads(&[Arc::new(p)]);
        assert_eq!(placed.workloads.len(), 1);
        assert!(
            placed.problems[0].contains("pod shop/cart-1: annotation mesh.dev/inject"),
            "{:?}",
            placed.problems
        );
    }
}

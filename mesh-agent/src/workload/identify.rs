//! Which identity a pod runs as: the control plane says, never the pod.
//!
//! Two things in the snapshot can say it, in this order:
//! - the workloads placed on this node (on Kubernetes, its Pods): the one with the
//!   pod's namespace and name (from the runtime's `CNI_ARGS`; at CNI ADD the API
//!   server does not know the pod's IP yet), else one holding one of its addresses;
//! - an endpoint of a service on this node whose address is one of the pod's (a
//!   registry that lists endpoints but no workloads).

use std::{net::IpAddr, sync::Arc, time::Duration};

use mesh_api::Workload;

use super::ServiceAccount;
use crate::discovery::{RouteStore, table::RouteTable};

/// The pod to find: its node, its `namespace/name` if the runtime gave them, and its
/// addresses.
#[derive(Debug, Clone, Copy)]
pub struct PodLookup<'a> {
    pub node: &'a str,
    pub pod: Option<(&'a str, &'a str)>,
    pub addresses: &'a [IpAddr],
}

/// The service account of the pod, as the snapshot says; `None` when nothing in it
/// names the pod. Two accounts for one pod (a registry error) give `Err`.
pub fn account_of(
    table: &RouteTable,
    placements: &[Workload],
    lookup: PodLookup<'_>,
) -> Result<Option<ServiceAccount>, String> {
    if let Some(found) = placed(placements, lookup)? {
        return Ok(Some(found));
    }
    listed_as_endpoint(table, lookup)
}

fn placed(placements: &[Workload], lookup: PodLookup<'_>) -> Result<Option<ServiceAccount>, String> {
    let account_of = |w: &Workload| {
        (!w.service_account.is_empty())
            .then(|| ServiceAccount { namespace: w.namespace.clone(), name: w.service_account.clone() })
    };
    if let Some((namespace, name)) = lookup.pod
        && let Some(w) = placements.iter().find(|w| w.namespace == namespace && w.name == name)
    {
        return Ok(account_of(w));
    }
    let mut found: Option<(ServiceAccount, &str)> = None;
    for w in placements {
        let holds = w
            .addresses
            .iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .any(|a| lookup.addresses.contains(&a.to_canonical()));
        let Some(account) = holds.then(|| account_of(w)).flatten() else { continue };
        match &found {
            Some((f, other)) if *f != account => {
                return Err(format!(
                    "the control plane places two workloads with this pod's addresses: {other} as {f}, {}/{} as {account}",
                    w.namespace, w.name
                ));
            }
            Some(_) => {}
            None => found = Some((account, &w.name)),
        }
    }
    Ok(found.map(|(a, _)| a))
}

fn listed_as_endpoint(table: &RouteTable, lookup: PodLookup<'_>) -> Result<Option<ServiceAccount>, String> {
    let mut found: Option<ServiceAccount> = None;
    for route in table.routes() {
        for ep in &route.endpoints {
            if ep.node != lookup.node || !lookup.addresses.contains(&ep.addr.ip().to_canonical()) {
                continue;
            }
            let Some(id) = &ep.spiffe_id else { continue };
            let account = ServiceAccount {
                namespace: id.namespace().to_owned(),
                name: id.service_account().to_owned(),
            };
            match &found {
                Some(f) if *f != account => {
                    return Err(format!("the control plane lists {} as {f} and as {account}", ep.addr.ip()));
                }
                _ => found = Some(account),
            }
        }
    }
    Ok(found)
}

/// The account the current snapshot gives the pod.
pub fn account_now(routes: &RouteStore, lookup: PodLookup<'_>) -> Result<Option<ServiceAccount>, String> {
    let placements = routes.placements().borrow().clone();
    account_of(&routes.table(), &placements, lookup)
}

/// Waits up to `patience` for the control plane to name the pod, then gives its
/// account (`None` if it never did).
pub async fn wait_for_account(
    routes: &Arc<RouteStore>,
    lookup: PodLookup<'_>,
    patience: Duration,
) -> Result<Option<ServiceAccount>, String> {
    let mut tables = routes.subscribe();
    let mut placements = routes.placements();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let now = placements.borrow_and_update().clone();
        if let Some(account) = account_of(&routes.table(), &now, lookup)? {
            return Ok(Some(account));
        }
        let changed = async {
            tokio::select! {
                r = tables.changed() => r.is_ok(),
                r = placements.changed() => r.is_ok(),
            }
        };
        match tokio::time::timeout_at(deadline, changed).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed_pod(name: &str, sa: &str, addresses: &[&str]) -> Workload {
        Workload {
            namespace: "shop".into(),
            name: name.into(),
            service_account: sa.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            node: "node-1".into(),
            ..Default::default()
        }
    }

    fn lookup<'a>(pod: Option<(&'a str, &'a str)>, addresses: &'a [IpAddr]) -> PodLookup<'a> {
        PodLookup { node: "node-1", pod, addresses }
    }

    #[test]
    fn a_pod_is_found_by_name_before_the_api_server_knows_its_address() {
        let placements = [placed_pod("web-1", "web", &[])];
        let ips = ["10.88.0.7".parse().unwrap()];
        let found = account_of(&RouteTable::default(), &placements, lookup(Some(("shop", "web-1")), &ips));
        assert_eq!(found.unwrap().unwrap().to_string(), "shop/web");
        let found = account_of(&RouteTable::default(), &placements, lookup(Some(("shop", "web-2")), &ips));
        assert_eq!(found.unwrap(), None, "another pod's name gets nothing");
    }

    #[test]
    fn by_address_two_accounts_for_one_pod_are_an_error_not_a_choice() {
        let placements = [placed_pod("a", "web", &["10.88.0.7"]), placed_pod("b", "db", &["10.88.0.7"])];
        let ips = ["10.88.0.7".parse().unwrap()];
        let e = account_of(&RouteTable::default(), &placements, lookup(None, &ips)).unwrap_err();
        assert!(e.contains("shop/web") && e.contains("shop/db"), "{e}");
    }
}

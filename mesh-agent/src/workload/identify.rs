//! Which identity a pod runs as: the control plane says, never the pod. The snapshot
//! lists the pod as an endpoint of the services that select it, on this node, with
//! the service account it runs as; an endpoint on this node whose address is one of
//! the pod's is the pod.

use std::{net::IpAddr, sync::Arc, time::Duration};

use super::ServiceAccount;
use crate::discovery::{RouteStore, table::RouteTable};

/// The service account of the pod with `addresses` on `node`, as `table` says; `None`
/// when no endpoint of this node has one of them. Two endpoints naming different
/// accounts for one pod (a registry error) give `Err`.
pub fn account_of(
    table: &RouteTable,
    node: &str,
    addresses: &[IpAddr],
) -> Result<Option<ServiceAccount>, String> {
    let mut found: Option<ServiceAccount> = None;
    for route in table.routes() {
        for ep in &route.endpoints {
            if ep.node != node || !addresses.contains(&ep.addr.ip().to_canonical()) {
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

/// Waits up to `patience` for the control plane to list the pod, then gives its
/// account (`None` if it never did).
pub async fn wait_for_account(
    routes: &Arc<RouteStore>,
    node: &str,
    addresses: &[IpAddr],
    patience: Duration,
) -> Result<Option<ServiceAccount>, String> {
    let mut updates = routes.subscribe();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(account) = account_of(&routes.table(), node, addresses)? {
            return Ok(Some(account));
        }
        match tokio::time::timeout_at(deadline, updates.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Ok(None),
        }
    }
}

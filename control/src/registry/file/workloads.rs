//! The registry file's `workloads:` section: which workload runs where, as whom.
//!
//! On hosts there is no Pod object to say which workloads a node runs, so the file
//! says it: each entry places a workload (name, namespace, service account, node,
//! addresses) on a node. The node's agent receives its own node's entries, and the
//! CA grants that node the entries' identities. Every error names the entry and the
//! field.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use mesh_api as api;
use serde::Deserialize;

use super::{is_dns_label, is_dns_name};

/// One `workloads:` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub name: String,
    #[serde(default = "super::default_namespace")]
    pub namespace: String,
    /// With the namespace, the workload's identity.
    #[serde(default)]
    pub service_account: String,
    /// The node it runs on (the agent's `--node`).
    #[serde(default)]
    pub node: String,
    /// Its IP addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A refused entry: `(entry, field, message)`.
pub type Invalid = (String, String, String);

/// The entries as API workloads, sorted by namespace then name, or the first problem.
pub fn parse(entries: &[WorkloadEntry]) -> Result<Vec<api::Workload>, Invalid> {
    let mut out: BTreeMap<(String, String), api::Workload> = BTreeMap::new();
    // Which entry holds each address: an address names one workload, or the agent
    // could not tell whose connection it serves.
    let mut owners: HashMap<IpAddr, String> = HashMap::new();
    for (i, w) in entries.iter().enumerate() {
        let entry = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
        let invalid = |field: &str, message: String| (entry.clone(), field.to_owned(), message);
        if !is_dns_name(&w.name) {
            return Err(invalid(
                "name",
                format!("{:?} is not a DNS name (lowercase a-z, 0-9, '-', '.')", w.name),
            ));
        }
        if !is_dns_label(&w.namespace) {
            return Err(invalid("namespace", format!("{:?} is not a DNS label", w.namespace)));
        }
        if w.service_account.is_empty() {
            return Err(invalid("service_account", "missing: a workload runs as a service account".into()));
        }
        if !is_dns_label(&w.service_account) {
            return Err(invalid("service_account", format!("{:?} is not a DNS label", w.service_account)));
        }
        if w.node.is_empty() {
            return Err(invalid("node", "missing: the node (agent --node) the workload runs on".into()));
        }
        if !is_dns_name(&w.node) {
            return Err(invalid("node", format!("{:?} is not a DNS name", w.node)));
        }
        let mut addresses = Vec::with_capacity(w.addresses.len());
        for (j, a) in w.addresses.iter().enumerate() {
            let field = format!("addresses[{j}]");
            let ip: IpAddr = a.parse().map_err(|_| invalid(&field, format!("{a:?} is not an IP address")))?;
            if let Some(other) = owners.insert(ip, entry.clone()) {
                let whose = if other == entry { "this entry".to_owned() } else { other };
                return Err(invalid(&field, format!("{ip} is already the address of {whose}")));
            }
            addresses.push(ip.to_string());
        }
        if let Some(k) = w.labels.keys().find(|k| k.is_empty()) {
            return Err(invalid("labels", format!("{k:?} is not a label key")));
        }
        let key = (w.namespace.clone(), w.name.clone());
        if out.contains_key(&key) {
            return Err(invalid("name", "a workload with this namespace/name is already defined".into()));
        }
        let workload = api::Workload {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            service_account: w.service_account.clone(),
            addresses,
            node: w.node.clone(),
            labels: w.labels.clone().into_iter().collect(),
        };
        out.insert(key, workload);
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::super::parse as parse_file;

    fn err(text: &str) -> String {
        parse_file("reg.yaml", text, "cluster.local").unwrap_err().to_string()
    }

    #[test]
    fn workloads_are_placed_on_their_nodes_sorted() {
        let text = "workloads:
  - {name: web-2, namespace: shop, service_account: web, node: node-b, addresses: [10.1.0.6]}
  - {name: web-1, namespace: shop, service_account: web, node: node-a, addresses: [10.1.0.5, \"fd01::5\"], labels: {app: web}}
  - {name: batch, service_account: jobs, node: node-a}
";
        let parsed = parse_file("reg.yaml", text, "cluster.local").unwrap();
        let names: Vec<_> =
            parsed.workloads.iter().map(|w| format!("{}/{}@{}", w.namespace, w.name, w.node)).collect();
        assert_eq!(names, ["default/batch@node-a", "shop/web-1@node-a", "shop/web-2@node-b"]);
        let web1 = &parsed.workloads[1];
        assert_eq!(web1.service_account, "web");
        assert_eq!(web1.addresses, ["10.1.0.5", "fd01::5"]);
        assert_eq!(web1.labels.get("app").map(String::as_str), Some("web"));
        assert!(parsed.workloads[0].addresses.is_empty(), "addresses are optional");
    }

    #[test]
    fn errors_name_file_entry_and_field() {
        let e = err("workloads:\n  - {name: web-1, namespace: shop, node: node-a}\n");
        assert_eq!(
            e,
            "reg.yaml: workloads[0] (shop/web-1): service_account: missing: a workload runs as a service account"
        );
        let e = err("workloads:\n  - {name: web-1, service_account: web}\n");
        assert!(e.starts_with("reg.yaml: workloads[0] (default/web-1): node: missing"), "{e}");
        let e =
            err("workloads:\n  - {name: web-1, service_account: web, node: a, addresses: [10.1.0.300]}\n");
        assert_eq!(
            e,
            "reg.yaml: workloads[0] (default/web-1): addresses[0]: \"10.1.0.300\" is not an IP address"
        );
        let e = err("workloads:\n  - {name: Web, service_account: web, node: a}\n");
        assert!(e.contains("workloads[0] (default/Web): name: \"Web\" is not a DNS name"), "{e}");
        let e = err("workloads:\n  - {name: w, service_account: Web_1, node: a}\n");
        assert!(e.contains("workloads[0] (default/w): service_account: \"Web_1\""), "{e}");
        let e = err("workloads:\n  - {name: w, service_account: web, node: \"node a\"}\n");
        assert!(e.contains("workloads[0] (default/w): node: \"node a\" is not a DNS name"), "{e}");
        let e = err("workloads:\n  - {name: w, service_account: web, node: a, labels: {\"\": x}}\n");
        assert!(e.contains("workloads[0] (default/w): labels:"), "{e}");
        let e = err("workloads:\n  - {name: w, service_account: web, node: a, nodes: b}\n");
        assert!(e.contains("workloads[0]: unknown field `nodes`"), "{e}");
    }

    #[test]
    fn a_name_or_an_address_belongs_to_one_workload() {
        let e = err("workloads:
  - {name: w, service_account: web, node: a}
  - {name: w, service_account: api, node: b}
");
        assert!(e.contains("workloads[1] (default/w): name: a workload with this namespace/name"), "{e}");
        let e = err("workloads:
  - {name: w1, service_account: web, node: a, addresses: [10.1.0.5]}
  - {name: w2, service_account: web, node: a, addresses: [10.1.0.5]}
");
        assert!(
            e.contains("workloads[1] (default/w2): addresses[0]: 10.1.0.5 is already the address of workloads[0] (default/w1)"),
            "{e}"
        );
        let e = err(
            "workloads:\n  - {name: w1, service_account: web, node: a, addresses: [10.1.0.5, 10.1.0.5]}\n",
        );
        assert!(e.contains("addresses[1]: 10.1.0.5 is already the address of this entry"), "{e}");
    }
}

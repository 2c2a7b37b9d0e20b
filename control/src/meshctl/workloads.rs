//! `meshctl workloads`: per node agent, each workload it serves, with its network
//! namespace, identity, certificate expiry and interception mode, read from the
//! agent's `GET /workloads` (a JSON array of [`WorkloadView`]).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::table::{Table, or_dash, short_duration};

/// The agent's admin path for its workloads.
pub const PATH: &str = "/workloads";

/// One workload as the agent serves it. Every field defaults when absent, so a
/// newer or older agent still reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct WorkloadView {
    pub name: String,
    pub namespace: String,
    /// `None` while the control plane has not named the pod's service account.
    pub service_account: Option<String>,
    /// SPIFFE ID; `None` until the control plane names the pod's service account.
    pub identity: Option<String>,
    /// A pod's network namespace path, or `host` for the agent's own.
    pub netns: String,
    pub cgroup: Option<String>,
    pub addresses: Vec<String>,
    /// `ebpf` or `iptables`.
    pub mode: String,
    /// Unix seconds; `None` while no certificate is held.
    pub certificate_not_after: Option<u64>,
    /// `cni` or `static`.
    pub source: String,
}

/// A workload with its certificate's remaining life.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRow {
    #[serde(flatten)]
    pub workload: WorkloadView,
    /// Seconds until the certificate expires (negative once expired).
    pub certificate_expires_in_seconds: Option<i64>,
}

/// One agent's workloads, or why they could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct AgentWorkloads {
    pub agent: String,
    pub error: Option<String>,
    pub workloads: Vec<WorkloadRow>,
}

/// Rows for `views`, ordered by namespace and name, dated against `now` (Unix seconds).
pub fn from_views(agent: &str, mut views: Vec<WorkloadView>, now: u64) -> AgentWorkloads {
    views.sort_by(|a, b| (&a.namespace, &a.name, &a.netns).cmp(&(&b.namespace, &b.name, &b.netns)));
    let workloads = views
        .into_iter()
        .map(|w| WorkloadRow {
            certificate_expires_in_seconds: w.certificate_not_after.map(|t| t as i64 - now as i64),
            workload: w,
        })
        .collect();
    AgentWorkloads { agent: agent.to_owned(), error: None, workloads }
}

fn expiry(row: &WorkloadRow) -> String {
    match row.certificate_expires_in_seconds {
        Some(s) if s < 0 => format!("EXPIRED {} ago", short_duration(s.unsigned_abs())),
        Some(s) => format!("in {}", short_duration(s as u64)),
        None if row.workload.identity.is_some() => "no certificate yet".into(),
        None => "-".into(),
    }
}

/// The human form: a line per agent that failed or serves nothing, then one table.
pub fn render(agents: &[AgentWorkloads]) -> String {
    let mut out = String::new();
    let mut t =
        Table::new(["AGENT", "WORKLOAD", "IDENTITY", "NETNS", "MODE", "CERT EXPIRES", "ADDRESSES", "SOURCE"]);
    for a in agents {
        if let Some(e) = &a.error {
            let _ = writeln!(out, "{}: ! {e}", a.agent);
            continue;
        }
        if a.workloads.is_empty() {
            let _ = writeln!(out, "{}: no workloads", a.agent);
            continue;
        }
        for row in &a.workloads {
            let w = &row.workload;
            let workload = match (w.namespace.is_empty(), w.name.is_empty()) {
                (false, false) => format!("{}/{}", w.namespace, w.name),
                (true, false) => w.name.clone(),
                _ => or_dash(&w.namespace),
            };
            t.row(vec![
                a.agent.clone(),
                workload,
                w.identity.clone().unwrap_or_else(|| "(none yet)".into()),
                or_dash(&w.netns),
                or_dash(&w.mode),
                expiry(row),
                or_dash(&w.addresses.join(",")),
                or_dash(&w.source),
            ]);
        }
    }
    if !t.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshctl::fixtures;

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn rows_are_ordered_and_expiry_is_relative_to_now() {
        let a = from_views("http://node-a:15000", fixtures::workloads(), NOW);
        let names: Vec<String> =
            a.workloads.iter().map(|r| format!("{}/{}", r.workload.namespace, r.workload.name)).collect();
        assert_eq!(names, ["kube-system/coredns-7d", "shop/api-0", "shop/web-0", "shop/web-0"]);
        let web = &a.workloads[2];
        assert_eq!(web.certificate_expires_in_seconds, Some(3_600 * 20));
    }

    #[test]
    fn the_table_shows_netns_identity_expiry_and_mode() {
        let a = from_views("http://node-a:15000", fixtures::workloads(), NOW);
        let b = AgentWorkloads {
            agent: "http://node-b:15000".into(),
            error: Some("cannot reach the agent".into()),
            workloads: vec![],
        };
        let c = from_views("http://node-c:15000", vec![], NOW);
        let text = render(&[a, b, c]);
        let expected = "\
http://node-b:15000: ! cannot reach the agent
http://node-c:15000: no workloads

AGENT                WORKLOAD                IDENTITY                               NETNS                                                    MODE      CERT EXPIRES        ADDRESSES          SOURCE
http://node-a:15000  kube-system/coredns-7d  (none yet)                             /var/run/netns/cni-0c1d                                  iptables  -                   10.88.0.4          cni
http://node-a:15000  shop/api-0              spiffe://cluster.local/ns/shop/sa/api  /var/run/netns/cni-7f3e                                  ebpf      EXPIRED 10m ago     10.88.0.3          cni
http://node-a:15000  shop/web-0              spiffe://cluster.local/ns/shop/sa/web  /var/run/netns/cni-4a9b2c7e-1f0d-4f7e-9a43-0e7c2b1d5f60  ebpf      in 20h              10.88.0.2,fd88::2  cni
http://node-a:15000  shop/web-0              spiffe://cluster.local/ns/shop/sa/web  host                                                     ebpf      no certificate yet  10.77.0.1          static
";
        assert_eq!(text, expected);
    }

    #[test]
    fn json_keeps_every_field_the_agent_sent_and_adds_the_remaining_life() {
        let a = from_views("http://node-a:15000", fixtures::workloads(), NOW);
        let v = serde_json::to_value(&a).unwrap();
        let web = &v["workloads"][2];
        assert_eq!(web["netns"], "/var/run/netns/cni-4a9b2c7e-1f0d-4f7e-9a43-0e7c2b1d5f60");
        assert_eq!(web["cgroup"], serde_json::Value::Null);
        assert_eq!(web["addresses"], serde_json::json!(["10.88.0.2", "fd88::2"]));
        assert_eq!(web["certificate_not_after"], NOW + 72_000);
        assert_eq!(web["certificate_expires_in_seconds"], 72_000);
        assert_eq!(v["workloads"][3]["cgroup"], "/sys/fs/cgroup/mesh/web");
    }

    #[test]
    fn missing_fields_default() {
        let v: Vec<WorkloadView> = serde_json::from_str(r#"[{"name":"x"},{}]"#).unwrap();
        assert_eq!(v[0].name, "x");
        assert_eq!(v[1], WorkloadView::default());
        let text = render(&[from_views("a", v, NOW)]);
        assert!(
            text.contains("a      x         (none yet)  -      -     -             -          -"),
            "{text}"
        );
    }
}

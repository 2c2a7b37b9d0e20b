//! `meshctl status`: the control plane, the agents it has seen, and what each agent
//! reports about itself (mode, readiness, applied version, staleness).

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    client::Targets,
    table::{Table, or_dash, short_duration, yes_no},
    views::{AgentRecord, DiscoveryView, FederationView, SourceError},
};

/// Everything `status` found.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub control_plane: ControlStatus,
    pub agents: Vec<AgentHealth>,
}

/// The control plane, from its admin endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlStatus {
    pub admin: String,
    /// Why the admin `/agents` call failed.
    pub agents_error: Option<String>,
    /// Why the admin `/config_dump` call failed.
    pub admin_error: Option<String>,
    pub ready: Option<bool>,
    pub current_version: Option<u64>,
    pub services: Option<usize>,
    pub source_errors: Vec<SourceError>,
    pub agents: Vec<AgentRow>,
    /// Federated clusters (`/federation`); `None` when not configured or not reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationView>,
    /// Why the admin `/federation` call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federation_error: Option<String>,
}

/// An agent as the control plane sees it, with a one-word verdict.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    #[serde(flatten)]
    pub record: AgentRecord,
    /// "in sync", "disconnected", "refused vN: reason", ...
    pub state: String,
}

/// One agent's own view, from its admin endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AgentHealth {
    pub admin: String,
    /// False for the default local agent nobody asked for explicitly.
    pub named: bool,
    pub error: Option<String>,
    pub mode: Option<String>,
    pub ready: Option<bool>,
    pub discovery: Option<DiscoveryView>,
}

impl StatusReport {
    /// Whether everything asked about answered: the control plane (both calls) and
    /// every agent named with `--agent`.
    pub fn all_reachable(&self) -> bool {
        self.control_plane.agents_error.is_none()
            && self.control_plane.admin_error.is_none()
            && self.agents.iter().all(|a| a.error.is_none() || !a.named)
    }
}

/// The verdict for one agent against the control plane's newest version.
pub fn agent_state(a: &AgentRecord, current_version: u64) -> String {
    if a.nacked_version != 0 && a.nacked_version >= a.acked_version {
        return format!("refused v{}: {}", a.nacked_version, a.nack_reason);
    }
    if !a.connected {
        return "disconnected".into();
    }
    if a.acked_version == current_version {
        "in sync".into()
    } else if a.acked_version < a.sent_version {
        format!("applying v{}", a.sent_version)
    } else {
        format!("behind (v{} of v{current_version})", a.acked_version)
    }
}

/// Queries every component at once.
pub async fn gather(targets: &Targets) -> StatusReport {
    let agents = futures::future::join_all(targets.agents.iter().map(|agent| async move {
        let mut health =
            AgentHealth { admin: agent.url.clone(), named: targets.agents_named, ..Default::default() };
        match targets.agent_stats(agent).await {
            Ok((stats, ready)) => {
                health.mode = Some(stats.mode);
                health.ready = Some(ready);
                health.discovery = Some(stats.discovery);
            }
            Err(e) => health.error = Some(e.to_string()),
        }
        health
    }));
    let (listed, dump, federation, agents) =
        tokio::join!(targets.control_agents(), targets.control_dump(), targets.control_federation(), agents);
    let mut control = ControlStatus { admin: targets.control_admin.url.clone(), ..Default::default() };
    match dump {
        Ok(d) => {
            control.ready = Some(d.ready);
            control.current_version = Some(d.version);
            control.services = Some(d.services().len());
            control.source_errors = d.source_errors;
        }
        Err(e) => control.admin_error = Some(e.to_string()),
    }
    match federation {
        Ok(f) => control.federation = f.filter(|f| f.cluster.is_some()),
        // The same endpoint as /config_dump: reported once.
        Err(e) if control.admin_error.as_deref() == Some(&e.to_string()) => {}
        Err(e) => control.federation_error = Some(e.to_string()),
    }
    match listed {
        Ok((current, records)) => {
            control.current_version = Some(current);
            control.agents = records
                .into_iter()
                .map(|record| AgentRow { state: agent_state(&record, current), record })
                .collect();
        }
        // The same endpoint as /config_dump: one unreachable endpoint is one line.
        Err(e) if control.admin_error.as_deref() == Some(&e.to_string()) => {
            control.agents_error = Some("(see above)".into())
        }
        Err(e) => control.agents_error = Some(e.to_string()),
    }
    StatusReport { control_plane: control, agents }
}

/// The human form; `now` is Unix seconds (for "last message 3s ago").
pub fn render(report: &StatusReport, now: i64) -> String {
    let c = &report.control_plane;
    let mut out = String::new();
    let _ = writeln!(out, "CONTROL PLANE  {}", c.admin);
    if let Some(ready) = c.ready {
        let _ = writeln!(out, "  ready        {}", if ready { "yes" } else { "no: registry not loaded yet" });
    }
    if let Some(v) = c.current_version {
        let _ = writeln!(out, "  version      {v}");
    }
    if let Some(n) = c.services {
        let _ = writeln!(out, "  services     {n}");
    }
    for e in &c.source_errors {
        let _ = writeln!(out, "  source error {}: {} (serving its last good state)", e.source, e.error);
    }
    for e in c.admin_error.iter().chain(c.agents_error.iter().filter(|e| !e.starts_with('('))) {
        let _ = writeln!(out, "  ! {e}");
    }
    if let Some(e) = &c.federation_error {
        let _ = writeln!(out, "  ! federation: {e}");
    }
    if let Some(f) = &c.federation {
        render_federation(&mut out, f, now);
    }
    if c.agents_error.is_none() {
        out.push('\n');
        if c.agents.is_empty() {
            out.push_str("No agent has connected to this control plane.\n");
        } else {
            let mut t = Table::new(["NODE", "MODE", "CONNECTED", "SENT", "ACKED", "LAST MESSAGE", "STATE"]);
            for a in &c.agents {
                let r = &a.record;
                let seen = if r.last_seen > 0 {
                    format!("{} ago", short_duration(now.saturating_sub(r.last_seen).max(0) as u64))
                } else {
                    "-".into()
                };
                t.row(vec![
                    r.node.clone(),
                    or_dash(&r.mode),
                    yes_no(r.connected),
                    version(r.sent_version),
                    version(r.acked_version),
                    seen,
                    a.state.clone(),
                ]);
            }
            out.push_str(&t.render());
        }
    }
    out.push('\n');
    let mut t =
        Table::new(["AGENT ADMIN", "MODE", "READY", "CONTROL PLANE", "STREAM", "APPLIED", "STALE FOR"]);
    let mut errors = Vec::new();
    for a in &report.agents {
        match (&a.error, &a.discovery) {
            (None, Some(d)) => t.row(vec![
                a.admin.clone(),
                a.mode.clone().unwrap_or_default(),
                a.ready.map(yes_no).unwrap_or_default(),
                d.control_plane.clone().unwrap_or_else(|| "none (passthrough only)".into()),
                if d.control_plane.is_none() {
                    "-".into()
                } else if d.connected {
                    "connected".into()
                } else {
                    "disconnected".into()
                },
                version(d.applied_version),
                if d.connected || d.control_plane.is_none() {
                    "-".into()
                } else {
                    short_duration(d.staleness_seconds.max(0.0) as u64)
                },
            ]),
            _ => {
                t.row(vec![a.admin.clone(), "?".into()]);
                if let Some(e) = &a.error {
                    errors.push(if a.named {
                        format!("  ! {e}")
                    } else {
                        format!("  no agent at the default {} (pass --agent to query agents)", a.admin)
                    });
                }
            }
        }
    }
    out.push_str(&t.render());
    for e in errors {
        out.push_str(&e);
        out.push('\n');
    }
    out
}

/// This cluster's name and gateways, then one row per federated cluster.
fn render_federation(out: &mut String, f: &FederationView, now: i64) {
    let gateways = if f.gateways.is_empty() { "none".to_owned() } else { f.gateways.join(", ") };
    let _ = writeln!(
        out,
        "  federation   cluster {} (trust domain {}), gateways {gateways}",
        f.cluster.as_deref().unwrap_or("-"),
        f.trust_domain.as_deref().unwrap_or("-"),
    );
    out.push('\n');
    if f.peers.is_empty() {
        out.push_str("No federated cluster configured.\n");
        return;
    }
    let mut t = Table::new([
        "FEDERATED CLUSTER",
        "TRUST DOMAIN",
        "STATE",
        "IMPORTED",
        "ROOTS",
        "LAST SUCCESS",
        "LAST ERROR",
    ]);
    for p in &f.peers {
        let success = match p.last_success_unix {
            Some(at) => format!("{} ago", short_duration(now.saturating_sub(at).max(0) as u64)),
            None => "never".into(),
        };
        t.row(vec![
            p.name.clone(),
            p.trust_domain.clone(),
            or_dash(&p.state),
            p.imported_services.to_string(),
            p.roots.to_string(),
            success,
            or_dash(p.last_error.as_deref().unwrap_or_default()),
        ]);
    }
    out.push_str(&t.render());
}

fn version(v: u64) -> String {
    if v == 0 { "-".into() } else { v.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str) -> AgentRecord {
        AgentRecord {
            node: node.into(),
            mode: "ebpf".into(),
            connected: true,
            sent_version: 7,
            acked_version: 7,
            last_seen: 990,
            ..Default::default()
        }
    }

    #[test]
    fn agent_state_names_the_problem() {
        assert_eq!(agent_state(&record("a"), 7), "in sync");
        assert_eq!(agent_state(&AgentRecord { connected: false, ..record("a") }, 7), "disconnected");
        assert_eq!(agent_state(&AgentRecord { sent_version: 8, ..record("a") }, 8), "applying v8");
        let refused = AgentRecord { nacked_version: 8, nack_reason: "bad VIP".into(), ..record("a") };
        assert_eq!(agent_state(&refused, 8), "refused v8: bad VIP");
        // A later ACK supersedes an older refusal.
        let recovered = AgentRecord { nacked_version: 6, nack_reason: "x".into(), ..record("a") };
        assert_eq!(agent_state(&recovered, 7), "in sync");
    }

    fn report() -> StatusReport {
        let rows = vec![
            AgentRow { state: "in sync".into(), record: record("node-a") },
            AgentRow {
                state: "disconnected".into(),
                record: AgentRecord { connected: false, mode: "iptables".into(), ..record("node-bb") },
            },
        ];
        StatusReport {
            control_plane: ControlStatus {
                admin: "http://cp:15011".into(),
                ready: Some(true),
                current_version: Some(7),
                services: Some(2),
                agents: rows,
                ..Default::default()
            },
            agents: vec![
                AgentHealth {
                    admin: "http://node-a:15000".into(),
                    named: true,
                    mode: Some("ebpf".into()),
                    ready: Some(true),
                    discovery: Some(DiscoveryView {
                        control_plane: Some("http://cp:15010".into()),
                        connected: false,
                        applied_version: 7,
                        staleness_seconds: 75.2,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                AgentHealth {
                    admin: "http://node-b:15000".into(),
                    named: true,
                    error: Some("cannot reach the agent at http://node-b:15000: connection refused".into()),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn human_status_shows_versions_modes_and_staleness_aligned() {
        let text = render(&report(), 1000);
        let expected = "\
CONTROL PLANE  http://cp:15011
  ready        yes
  version      7
  services     2

NODE     MODE      CONNECTED  SENT  ACKED  LAST MESSAGE  STATE
node-a   ebpf      yes        7     7      10s ago       in sync
node-bb  iptables  no         7     7      10s ago       disconnected

AGENT ADMIN          MODE  READY  CONTROL PLANE    STREAM        APPLIED  STALE FOR
http://node-a:15000  ebpf  yes    http://cp:15010  disconnected  7        1m15s
http://node-b:15000  ?
  ! cannot reach the agent at http://node-b:15000: connection refused
";
        assert_eq!(text, expected);
    }

    #[test]
    fn federated_clusters_are_listed_under_the_control_plane() {
        let mut r = report();
        r.control_plane.federation = Some(crate::meshctl::fixtures::federation());
        let text = render(&r, 1000);
        let expected = "\
CONTROL PLANE  http://cp:15011
  ready        yes
  version      7
  services     2
  federation   cluster east (trust domain east.local), gateways 10.77.0.5:15443

FEDERATED CLUSTER  TRUST DOMAIN  STATE    IMPORTED  ROOTS  LAST SUCCESS  LAST ERROR
west               west.local    ok       3         2      4s ago        -
north              north.local   error    0         1      never         https://10.78.0.1:15010 answered Unauthenticated: not a federated cluster, or not its token
south              south.local   pending  0         0      never         -

NODE  ";
        assert!(text.starts_with(expected), "{text}");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["control_plane"]["federation"]["peers"][1]["state"], "error");

        // Configured without peers; and not configured (nothing shown).
        r.control_plane.federation =
            Some(FederationView { peers: vec![], ..crate::meshctl::fixtures::federation() });
        assert!(render(&r, 1000).contains("gateways 10.77.0.5:15443\n\nNo federated cluster configured.\n"));
        r.control_plane.federation = None;
        assert!(!render(&r, 1000).contains("federation"));
        assert!(serde_json::to_value(&r).unwrap()["control_plane"].get("federation").is_none());
    }

    #[test]
    fn the_admin_federation_json_reads_as_meshctl_s_view() {
        let dir = std::path::Path::new("/nonexistent");
        let text = format!(
            "cluster: east\ngateways: [\"10.77.0.5:15443\"]\npeers:\n  - {{name: west, trust_domain: west.local, \
             url: \"https://10.77.0.1:15010\", bundle_file: {0}/b, token_file: {0}/t}}\n",
            dir.display()
        );
        let config = crate::federation::config::parse("fed.yaml", &text, "east.local").unwrap();
        let board = crate::federation::Board::new(&config);
        board.update("west", |p| p.imported_services = 4);
        let json = crate::admin::federation_json(Some(&board)).to_string();
        let view: FederationView = serde_json::from_str(&json).unwrap();
        assert_eq!(view.cluster.as_deref(), Some("east"));
        assert_eq!(view.trust_domain.as_deref(), Some("east.local"));
        assert_eq!(view.peers[0].state, "pending");
        assert_eq!(view.peers[0].imported_services, 4);
        assert_eq!(view.peers[0].last_success_unix, None);
        let off: FederationView = serde_json::from_value(crate::admin::federation_json(None)).unwrap();
        assert!(off.cluster.is_none() && off.peers.is_empty());
    }

    #[test]
    fn unreachable_named_agent_fails_the_command_but_the_default_one_does_not() {
        let mut r = report();
        assert!(!r.all_reachable());
        for a in &mut r.agents {
            a.named = false;
        }
        assert!(r.all_reachable());
        let text = render(&r, 1000);
        assert!(text.contains("no agent at the default http://node-b:15000 (pass --agent"), "{text}");
    }

    #[test]
    fn json_status_flattens_agent_records() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["control_plane"]["agents"][0]["node"], "node-a");
        assert_eq!(v["control_plane"]["agents"][0]["state"], "in sync");
        assert_eq!(v["agents"][0]["discovery"]["staleness_seconds"], 75.2);
        assert!(v["agents"][1]["error"].as_str().unwrap().contains("connection refused"));
    }
}

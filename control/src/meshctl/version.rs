//! `meshctl version`: the release of meshctl, of the control plane and of every
//! agent, and a warning for each pair further apart than the mesh supports.
//!
//! The policy, as Kubernetes has it for its kubelets: an agent may run the control
//! plane's minor version or the one before it, never a newer one (upgrade the control
//! plane first, then the agents), and meshctl is within one minor version of the
//! control plane either way. Different major versions are never supported.

use std::fmt::Write as _;

use serde::Serialize;

use super::{
    client::Targets,
    table::Table,
    views::{AgentDump, AgentsDump},
};

/// This meshctl's release.
pub const CLIENT: &str = env!("CARGO_PKG_VERSION");

/// What `meshctl version` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionReport {
    pub client: String,
    /// `None` when the control plane did not answer (see `control_error`).
    pub control_plane: Option<String>,
    pub control_error: Option<String>,
    pub agents: Vec<AgentVersion>,
    /// One line per unsupported pair, or version not reported.
    pub warnings: Vec<String>,
}

/// One agent's release, from the control plane's list or the agent itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentVersion {
    /// The node name (from the control plane) or the admin URL (asked directly).
    pub agent: String,
    /// Empty when the agent did not say (an older agent), or did not answer.
    pub version: String,
    pub connected: bool,
    pub error: Option<String>,
}

/// A release as `major.minor.patch` (pre-release and build suffixes ignored).
fn parse(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.trim().split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

/// Why `agent` at `version` is unsupported beside a control plane at `control`.
fn agent_skew(agent: &str, version: &str, control: &str) -> Option<String> {
    let (Some(a), Some(c)) = (parse(version), parse(control)) else {
        return Some(if version.is_empty() {
            format!("agent {agent} did not report its version (older than this control plane's {control}?)")
        } else {
            format!("agent {agent} reports {version:?}, not a version meshctl can compare")
        });
    };
    if a.0 != c.0 {
        return Some(format!(
            "agent {agent} runs {version}, another major version than the control plane's {control}"
        ));
    }
    if a.1 > c.1 {
        return Some(format!(
            "agent {agent} runs {version}, newer than the control plane's {control}: upgrade the control plane first"
        ));
    }
    (c.1 - a.1 > 1).then(|| {
        format!(
            "agent {agent} runs {version}, more than one minor version behind the control plane's {control}"
        )
    })
}

/// Why meshctl at `client` is unsupported against a control plane at `control`.
fn client_skew(client: &str, control: &str) -> Option<String> {
    let (Some(m), Some(c)) = (parse(client), parse(control)) else {
        return Some(format!("the control plane reports {control:?}, not a version meshctl can compare"));
    };
    (m.0 != c.0 || m.1.abs_diff(c.1) > 1).then(|| {
        format!("meshctl {client} is more than one minor version from the control plane's {control}")
    })
}

/// The report from the control plane's `/agents` (or why it failed) and the named
/// agents' own dumps.
pub fn report(
    client: &str,
    control: Result<&AgentsDump, String>,
    asked: &[(String, Result<AgentDump, String>)],
) -> VersionReport {
    let mut agents = Vec::new();
    let (control_plane, control_error) = match control {
        Ok(dump) => {
            agents.extend(dump.agents.iter().map(|a| AgentVersion {
                agent: a.node.clone(),
                version: a.version.clone(),
                connected: a.connected,
                error: None,
            }));
            (Some(dump.control_version.clone()), None)
        }
        Err(e) => (None, Some(e)),
    };
    for (url, dump) in asked {
        agents.push(match dump {
            Ok(d) => {
                AgentVersion { agent: url.clone(), version: d.version.clone(), connected: true, error: None }
            }
            Err(e) => AgentVersion {
                agent: url.clone(),
                version: String::new(),
                connected: false,
                error: Some(e.clone()),
            },
        });
    }
    let mut warnings = Vec::new();
    if let Some(control) = control_plane.as_deref() {
        if control.is_empty() {
            warnings
                .push("the control plane did not report its version (older than this meshctl?)".to_owned());
        } else {
            warnings.extend(client_skew(client, control));
            warnings.extend(
                agents
                    .iter()
                    .filter(|a| a.error.is_none())
                    .filter_map(|a| agent_skew(&a.agent, &a.version, control)),
            );
        }
    }
    VersionReport { client: client.to_owned(), control_plane, control_error, agents, warnings }
}

/// Asks the control plane and the agents named with `--agent` (the default local
/// agent only when named: the control plane lists every agent it has seen).
pub async fn gather(targets: &Targets) -> VersionReport {
    let control = targets.agents_dump().await.map_err(|e| e.to_string());
    let mut asked = Vec::new();
    if targets.agents_named {
        for a in &targets.agents {
            asked.push((a.url.clone(), targets.agent_dump(a).await.map_err(|e| e.to_string())));
        }
    }
    report(CLIENT, control.as_ref().map_err(Clone::clone), &asked)
}

/// The human table, then the warnings.
pub fn render(r: &VersionReport) -> String {
    let mut t = Table::new(["COMPONENT", "VERSION", "NOTE"]);
    t.row(vec!["meshctl".into(), r.client.clone(), String::new()]);
    t.row(match (&r.control_plane, &r.control_error) {
        (Some(v), _) => vec!["control plane".into(), or_unknown(v), String::new()],
        (None, e) => vec!["control plane".into(), "?".into(), e.clone().unwrap_or_default()],
    });
    for a in &r.agents {
        let note = match (&a.error, a.connected) {
            (Some(e), _) => e.clone(),
            (None, false) => "disconnected (last reported)".into(),
            (None, true) => String::new(),
        };
        t.row(vec![format!("agent {}", a.agent), or_unknown(&a.version), note]);
    }
    let mut out = t.render();
    for w in &r.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn or_unknown(v: &str) -> String {
    if v.is_empty() { "unknown".into() } else { v.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meshctl::views::AgentRecord;

    fn control(version: &str, agents: &[(&str, &str)]) -> AgentsDump {
        AgentsDump {
            control_version: version.into(),
            agents: agents
                .iter()
                .map(|(node, v)| AgentRecord {
                    node: (*node).into(),
                    version: (*v).into(),
                    connected: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn agents_one_minor_behind_pass_and_every_other_skew_is_named() {
        let dump = control(
            "1.4.2",
            &[
                ("same", "1.4.0"),
                ("behind", "1.3.9"),
                ("far", "1.2.0"),
                ("newer", "1.5.0"),
                ("major", "2.4.0"),
                ("old", ""),
            ],
        );
        let r = report("1.4.0", Ok(&dump), &[]);
        assert_eq!(r.control_plane.as_deref(), Some("1.4.2"));
        let named: Vec<&str> =
            r.warnings.iter().map(|w| w.split_whitespace().nth(1).unwrap_or_default()).collect();
        assert_eq!(named, ["far", "newer", "major", "old"], "{:#?}", r.warnings);
        assert!(r.warnings[1].contains("upgrade the control plane first"), "{}", r.warnings[1]);
        assert!(r.warnings[3].contains("did not report"), "{}", r.warnings[3]);
    }

    #[test]
    fn meshctl_may_be_one_minor_either_side() {
        let dump = control("1.4.0", &[]);
        for (client, warns) in
            [("1.4.9", false), ("1.3.0", false), ("1.5.0", false), ("1.6.0", true), ("0.4.0", true)]
        {
            let r = report(client, Ok(&dump), &[]);
            assert_eq!(!r.warnings.is_empty(), warns, "{client}: {:?}", r.warnings);
        }
        assert_eq!(parse("0.1.0-rc.1+abc"), Some((0, 1, 0)));
        assert_eq!(parse("1.2"), Some((1, 2, 0)));
        assert_eq!(parse("x.1"), None);
    }

    #[test]
    fn an_absent_control_plane_and_agents_asked_directly_are_shown() {
        let asked = vec![
            ("http://a:15000".to_owned(), Ok(AgentDump { version: "0.1.0".into(), ..Default::default() })),
            ("http://b:15000".to_owned(), Err("connection refused".to_owned())),
        ];
        let r = report("0.1.0", Err("control plane unreachable".into()), &asked);
        assert_eq!(r.control_plane, None);
        assert!(r.warnings.is_empty(), "no control plane to compare with: {:?}", r.warnings);
        let text = render(&r);
        let row = |first: &str| {
            text.lines()
                .find(|l| l.starts_with(first))
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| panic!("no row {first}: {text}"))
        };
        assert_eq!(row("control plane"), "control plane ? control plane unreachable");
        assert_eq!(row("agent http://a"), "agent http://a:15000 0.1.0");
        assert_eq!(row("agent http://b"), "agent http://b:15000 unknown connection refused");
    }
}

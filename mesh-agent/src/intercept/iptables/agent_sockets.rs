//! How the rules recognise the agent's own sockets, which are never redirected.
//!
//! Every socket the agent opens carries its mark (`SO_MARK`), but a mark alone
//! proves nothing: a workload running as root with `CAP_NET_ADMIN` or
//! `CAP_NET_RAW` can set the same mark on its own sockets and so escape
//! interception. The rules therefore ask, with the mark, for something a
//! workload cannot choose:
//!
//! - the agent's cgroup (`-m cgroup --path`), when the agent installs the rules
//!   itself and knows where it runs. A socket belongs to the cgroup of the process
//!   that created it, whatever network namespace it was created in, so this also
//!   covers the sockets the agent opens inside a pod's namespace. The match takes
//!   descendants too, so a workload in (or below) the agent's cgroup is not told
//!   apart; [`AgentSockets::weakness`] says when that is the case. The path is
//!   the one `/proc/self/cgroup` shows, which recent kernels resolve in the
//!   cgroup namespace of the process installing the rule, as they print it.
//! - the agent's uid and/or gid (`-m owner`), for rules installed by someone else
//!   (a pod's init container) where the agent runs as a known user or group. The
//!   kernel takes them from the credentials the socket was created with.
//!
//! Each alternative is one `RETURN` rule at the top of the outbound chain: the
//! mark and the cgroup, or the mark and the owner. With neither configured the
//! mark alone is matched, as before, and an install says so in the log.

use std::fmt;

use super::IptablesError;
use crate::cgroup::CgroupError;

/// `xt_cgroup` keeps the path in a `PATH_MAX` buffer, terminating NUL included.
pub(super) const MAX_CGROUP_PATH: usize = 4095;

/// What the agent's own sockets have that a workload's do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSockets {
    /// `SO_MARK` on every socket the agent opens. Matched exactly (all 32 bits).
    /// Must not be 0, which would match every unmarked socket.
    pub mark: u32,
    /// cgroup v2 paths, relative to the cgroup2 root, of the agent process (its
    /// own; during an upgrade also the other agent's). Each must exist when the
    /// rules are installed: the kernel resolves the path then, so an agent that
    /// restarts in another cgroup installs again.
    pub cgroups: Vec<String>,
    /// The uid the agent runs as (`-m owner --uid-owner`).
    pub uid: Option<u32>,
    /// The gid the agent runs as (`-m owner --gid-owner`).
    pub gid: Option<u32>,
}

impl AgentSockets {
    /// The mark alone: what a workload can forge. Add a cgroup or an owner.
    pub fn mark_only(mark: u32) -> Self {
        AgentSockets { mark, cgroups: Vec::new(), uid: None, gid: None }
    }

    /// The mark and the cgroup the calling process runs in (from
    /// `/proc/self/cgroup`): for an agent that installs the rules itself.
    pub fn this_process(mark: u32) -> Result<Self, CgroupError> {
        Ok(AgentSockets { cgroups: vec![crate::cgroup::own_cgroup()?], ..AgentSockets::mark_only(mark) })
    }

    /// Whether an owner match is configured.
    pub(super) fn has_owner(&self) -> bool {
        self.uid.is_some() || self.gid.is_some()
    }

    /// Why a workload could still pass for the agent, if it could: only the
    /// mark is matched, or an agent cgroup is the root or contains one of the
    /// `workload_cgroups` (the cgroup match takes descendants) and no owner
    /// match narrows it. `None` when the agent's sockets are told apart by
    /// something a workload cannot set.
    pub fn weakness(&self, workload_cgroups: &[String]) -> Option<String> {
        if self.has_owner() {
            return None;
        }
        if self.cgroups.is_empty() {
            return Some(
                "only the mark tells the agent's sockets apart: a root workload with CAP_NET_ADMIN \
                 or CAP_NET_RAW can set it and escape interception; give the agent's uid or gid \
                 (--agent-uid, --agent-gid) or let the agent install the rules itself"
                    .to_owned(),
            );
        }
        let contains = |agent: &str, workload: &str| {
            agent == "/" || workload == agent || workload.starts_with(&format!("{agent}/"))
        };
        for agent in &self.cgroups {
            if agent == "/" {
                return Some(
                    "the agent's cgroup reads as the root (/): unless the agent has a cgroup \
                     namespace of its own (a container) on a kernel that resolves the path in it, \
                     every socket matches and only the mark tells the agent's apart; run the agent \
                     in a cgroup of its own"
                        .to_owned(),
                );
            }
            if let Some(workload) = workload_cgroups.iter().find(|w| contains(agent, w)) {
                return Some(format!(
                    "workload cgroup {workload} is inside the agent's cgroup {agent}: only the mark \
                     tells the agent's sockets apart from that workload's"
                ));
            }
        }
        None
    }

    /// Checks the mark and each cgroup path (see [`check_cgroup_path`]).
    pub(super) fn validate(&self) -> Result<(), IptablesError> {
        if self.mark == 0 {
            return Err(invalid(
                "mark",
                0,
                "mark 0 matches every unmarked socket, so nothing would be redirected",
            ));
        }
        for cgroup in &self.cgroups {
            check_cgroup_path("agent_cgroups", cgroup)?;
        }
        Ok(())
    }
}

/// An [`IptablesError::InvalidConfig`] naming the field and its value.
pub(super) fn invalid(field: &'static str, value: impl fmt::Debug, reason: &'static str) -> IptablesError {
    IptablesError::InvalidConfig { field, value: format!("{value:?}"), reason }
}

/// A cgroup path must be absolute and safe to place in a restore file (no
/// whitespace, control characters, quotes or backslashes, which could otherwise
/// split one rule into several).
pub(super) fn check_cgroup_path(field: &'static str, cgroup: &str) -> Result<(), IptablesError> {
    if !cgroup.starts_with('/') {
        return Err(invalid(field, cgroup, "must be absolute (relative to the cgroup2 root)"));
    }
    if cgroup.len() > MAX_CGROUP_PATH {
        return Err(invalid(field, cgroup, "longer than the kernel's 4095-byte limit"));
    }
    if cgroup.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\\') {
        return Err(invalid(
            field,
            cgroup,
            "contains whitespace, a control character, a quote or a backslash",
        ));
    }
    Ok(())
}

/// The cgroups of other agents that `existing` rules (the outbound chain, `-S` form)
/// let through by `agent`'s mark, which still hold processes: during an upgrade the
/// old agent drains its connections, and its upstream sockets must not be redirected
/// to the new agent's listener (nor, by `SO_REUSEPORT`, back to its own) while it
/// does. An agent that has exited leaves an empty or removed cgroup and is dropped.
pub fn running_predecessors(existing: &[String], agent: &AgentSockets) -> Vec<String> {
    let Ok(mount) = crate::cgroup::cgroup2_mount() else { return Vec::new() };
    let mark = format!("--mark 0x{:x}", agent.mark);
    let mut out: Vec<String> = Vec::new();
    for rule in existing.iter().filter(|r| r.ends_with("-j RETURN") && r.contains(&mark)) {
        let Some(path) = cgroup_path_of(rule) else { continue };
        if agent.cgroups.iter().any(|c| c == path) || out.iter().any(|c| c == path) {
            continue;
        }
        if check_cgroup_path("agent_cgroups", path).is_err() {
            continue;
        }
        let procs = mount.join(path.trim_start_matches('/')).join("cgroup.procs");
        let running = std::fs::read_to_string(&procs).is_ok_and(|p| !p.trim().is_empty());
        if running {
            out.push(path.to_owned());
        }
    }
    out
}

/// The `--path` of a `-m cgroup` match, quoted or not.
fn cgroup_path_of(rule: &str) -> Option<&str> {
    let rest = rule.split_once("--path ")?.1;
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').map(|(p, _)| p),
        None => rest.split_whitespace().next(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cgroups(cgroups: &[&str]) -> AgentSockets {
        AgentSockets {
            cgroups: cgroups.iter().map(|c| (*c).to_owned()).collect(),
            ..AgentSockets::mark_only(7)
        }
    }

    #[test]
    fn weakness_says_when_a_workload_could_pass_for_the_agent() {
        let workloads = ["/mesh/wl1".to_owned(), "/pods/a/b".to_owned()];
        let mark_only = AgentSockets::mark_only(7).weakness(&workloads).unwrap();
        assert!(mark_only.contains("only the mark") && mark_only.contains("--agent-uid"), "{mark_only}");
        assert!(with_cgroups(&["/"]).weakness(&workloads).unwrap().contains("reads as the root"));
        // The agent's cgroup holds a workload (the cgroup match takes descendants).
        for agent in ["/mesh/wl1", "/mesh", "/pods/a"] {
            let why = with_cgroups(&[agent]).weakness(&workloads).unwrap();
            assert!(why.contains(agent), "{why}");
        }
        // A sibling with a common prefix is not inside it.
        assert_eq!(with_cgroups(&["/mesh/wl"]).weakness(&workloads), None);
        assert_eq!(with_cgroups(&["/system/mesh-agent"]).weakness(&workloads), None);
        assert_eq!(with_cgroups(&["/system/mesh-agent"]).weakness(&[]), None);
        // An owner match tells the agent apart whatever its cgroup.
        let owner = AgentSockets { gid: Some(1337), ..with_cgroups(&["/"]) };
        assert_eq!(owner.weakness(&workloads), None);
        assert_eq!(AgentSockets { uid: Some(1337), ..AgentSockets::mark_only(7) }.weakness(&workloads), None);
    }

    #[test]
    fn a_rules_cgroup_path_is_read_quoted_or_not() {
        let quoted = r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/a b/agent" -j RETURN"#;
        assert_eq!(cgroup_path_of(quoted), Some("/a b/agent"));
        let bare = "-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path /kubepods/agent -j RETURN";
        assert_eq!(cgroup_path_of(bare), Some("/kubepods/agent"));
        assert_eq!(cgroup_path_of("-A MESH_OUTPUT -m mark --mark 0x4d45 -j RETURN"), None);
    }

    #[test]
    fn an_agent_whose_cgroup_is_gone_is_not_kept() {
        let agent =
            AgentSockets { cgroups: vec!["/mesh/new-agent".into()], ..AgentSockets::mark_only(0x4d45) };
        let existing = [
            r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/mesh/new-agent" -j RETURN"#.to_owned(),
            r#"-A MESH_OUTPUT -m mark --mark 0x4d45 -m cgroup --path "/no/such/cgroup-7f3a" -j RETURN"#
                .to_owned(),
        ];
        assert!(running_predecessors(&existing, &agent).is_empty());
    }
}

//! Checking, without changing anything, whether a namespace's tables hold what
//! an install would leave: for a CNI `CHECK`, for an agent that adopts the pods
//! it served before a restart, and for an operator wondering why a pod is (not)
//! intercepted.

use super::command::Tables;
use super::rules::{render, rules_of};
use super::{INBOUND_CHAIN, IptablesConfig, IptablesError, OUTPUT_CHAIN};

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Exactly the rules an install would leave, in every family.
    Installed,
    /// Nothing of ours, in any family: no chain, no jump.
    Absent,
    /// Something in between; each entry names the family and what differs.
    Differs(Vec<String>),
}

impl Check {
    /// Whether the rules are in place as configured.
    pub fn is_installed(&self) -> bool {
        matches!(self, Check::Installed)
    }

    /// The verdict over every family's findings.
    pub(super) fn of(families: impl IntoIterator<Item = FamilyCheck>) -> Check {
        let (mut present, mut differences) = (false, Vec::new());
        for family in families {
            present |= family.present;
            differences.extend(family.differences);
        }
        match (present, differences.is_empty()) {
            (_, true) => Check::Installed,
            (false, false) => Check::Absent,
            (true, false) => Check::Differs(differences),
        }
    }
}

/// One family's findings.
#[derive(Debug, Default)]
pub(super) struct FamilyCheck {
    /// Whether any chain or jump of ours exists.
    present: bool,
    /// What differs from the expected state, naming the family.
    differences: Vec<String>,
}

impl Tables {
    /// Compares this family's table with what installing `cfg` would leave, or,
    /// with `None`, with a table holding nothing of ours.
    pub(super) fn check(&self, cfg: Option<&IptablesConfig>) -> Result<FamilyCheck, IptablesError> {
        let family = self.family;
        let rendered = cfg.map(|cfg| render(cfg, family));
        let mut found = FamilyCheck::default();
        let mut differ = |what: String| found.differences.push(format!("{family}: {what}"));
        let mut present = false;
        for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
            let want: Option<Vec<String>> = rendered
                .as_deref()
                .map(|text| rules_of(text, chain).into_iter().map(str::to_owned).collect());
            match (self.chain_rules(chain)?, want) {
                (None, None) => {}
                (None, Some(_)) => differ(format!("chain {chain} is missing")),
                (Some(_), None) => {
                    present = true;
                    differ(format!("chain {chain} exists though {family} is not intercepted"));
                }
                (Some(live), Some(want)) => {
                    present = true;
                    if live != want {
                        let missing: Vec<&String> = want.iter().filter(|r| !live.contains(r)).collect();
                        let unexpected: Vec<&String> = live.iter().filter(|r| !want.contains(r)).collect();
                        for rule in &missing {
                            differ(format!("missing `{rule}`"));
                        }
                        for rule in &unexpected {
                            differ(format!("unexpected `{rule}`"));
                        }
                        if missing.is_empty() && unexpected.is_empty() {
                            differ(format!(
                                "chain {chain} holds the expected rules in another order or count"
                            ));
                        }
                    }
                }
            }
        }
        for (hook, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
            let jumps = self.jumps_to(hook, chain)?;
            present |= !jumps.is_empty();
            let canonical = format!("-A {}", super::rules::jump_spec(hook, chain).join(" "));
            match (jumps.as_slice(), cfg.is_some()) {
                ([], false) => {}
                ([], true) => differ(format!("no jump from {hook} to {chain}")),
                ([jump], true) if *jump == canonical => {}
                ([jump], true) => differ(format!("the jump from {hook} is `{jump}`, not `{canonical}`")),
                (jumps, true) => differ(format!("{} jumps from {hook} to {chain}", jumps.len())),
                (jumps, false) => differ(format!(
                    "{} jump(s) from {hook} to {chain} though {family} is not intercepted",
                    jumps.len()
                )),
            }
        }
        found.present = present;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(present: bool, differences: &[&str]) -> FamilyCheck {
        FamilyCheck { present, differences: differences.iter().map(|d| (*d).to_owned()).collect() }
    }

    #[test]
    fn verdict_over_families() {
        assert_eq!(Check::of([family(true, &[]), family(true, &[])]), Check::Installed);
        // IPv6 off: nothing expected there, nothing found.
        assert_eq!(Check::of([family(true, &[]), family(false, &[])]), Check::Installed);
        assert_eq!(Check::of([family(false, &["IPv4: a"]), family(false, &["IPv6: b"])]), Check::Absent);
        assert_eq!(
            Check::of([family(true, &[]), family(false, &["IPv6: chain MESH_OUTPUT is missing"])]),
            Check::Differs(vec!["IPv6: chain MESH_OUTPUT is missing".into()])
        );
        assert!(!Check::Absent.is_installed());
        assert!(Check::Installed.is_installed());
    }
}

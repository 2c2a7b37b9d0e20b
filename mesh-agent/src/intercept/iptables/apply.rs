//! The install transaction and its inverse, for one family's `nat` table.
//!
//! Install replaces the contents of both chains in one `iptables-restore
//! --noflush` run (declaring a chain in a restore file creates it or flushes it),
//! so a workload never sees a half-written chain and re-running it with another
//! config converges on that config. The jumps are added in the same transaction,
//! and only when `iptables -C` says they are missing, so repeated installs never
//! duplicate them.
//!
//! Uninstall removes the jumps (all of them, including duplicates and variants
//! left by older versions), then flushes and deletes the two chains, and touches
//! nothing else.

use tracing::{debug, info, warn};

use super::command::{Tables, is_permission_denied, target_missing};
use super::rules::{Jumps, jump_spec, render_restore};
use super::{INBOUND_CHAIN, IptablesConfig, IptablesError, OUTPUT_CHAIN};

/// Upper bound on jump deletions per hook: a `-D` that reports success without
/// removing anything must not spin forever.
const MAX_JUMP_DELETES: usize = 256;

impl Tables {
    /// Writes `cfg`'s chains and any missing jump in one restore.
    pub(super) fn install(&self, cfg: &IptablesConfig) -> Result<(), IptablesError> {
        let jumps = Jumps {
            output: !self.jump_exists("OUTPUT", OUTPUT_CHAIN)?,
            prerouting: !self.jump_exists("PREROUTING", INBOUND_CHAIN)?,
        };
        let mut cfg = cfg.clone();
        if !cfg.agent.cgroups.is_empty() {
            let existing = self.chain_rules(OUTPUT_CHAIN)?.unwrap_or_default();
            for cgroup in super::agent_sockets::running_predecessors(&existing, &cfg.agent) {
                info!(family = %self.family, cgroup = %cgroup,
                    "the agent these rules were installed for still runs (an upgrade): its sockets stay unredirected too");
                cfg.agent.cgroups.push(cgroup);
            }
        }
        let cfg = &cfg;
        let text = render_restore(cfg, self.family, jumps);
        self.restore(&text)?;
        if jumps.output {
            self.replace_old_output_jumps()?;
        }
        let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("-A ")).collect();
        info!(
            family = %self.family,
            outbound_port = cfg.outbound_port,
            inbound_port = cfg.inbound_port,
            added_output_jump = jumps.output,
            added_prerouting_jump = jumps.prerouting,
            rules = ?rules,
            "installed iptables interception rules"
        );
        Ok(())
    }

    /// Removes the jumps to our outbound chain in another form than this version's:
    /// older agents jumped for TCP only, and with DNS intercepted over UDP too that
    /// jump would send TCP through the chain twice and leave UDP out.
    fn replace_old_output_jumps(&self) -> Result<(), IptablesError> {
        let canonical = format!("-A {}", jump_spec("OUTPUT", OUTPUT_CHAIN).join(" "));
        for line in self.jumps_to("OUTPUT", OUTPUT_CHAIN)? {
            if line == canonical || line.contains('"') || line.contains('\'') {
                continue;
            }
            let tokens: Vec<&str> = line.split_whitespace().collect();
            self.iptables_ok(&with_op("-D", &tokens[1..]))?;
            info!(family = %self.family, rule = %line, "replaced an older jump to our outbound chain");
        }
        Ok(())
    }

    /// Removes our jumps and chains; absent ones are skipped.
    pub(super) fn uninstall(&self) -> Result<(), IptablesError> {
        let mut jumps = 0;
        for (hook, chain) in [("OUTPUT", OUTPUT_CHAIN), ("PREROUTING", INBOUND_CHAIN)] {
            jumps += self.delete_jumps(hook, chain)?;
        }
        let mut chains = Vec::new();
        for chain in [OUTPUT_CHAIN, INBOUND_CHAIN] {
            if self.chain_exists(chain)? {
                self.iptables_ok(&["-t", "nat", "-F", chain])?;
                self.iptables_ok(&["-t", "nat", "-X", chain])?;
                chains.push(chain);
            }
        }
        if jumps == 0 && chains.is_empty() {
            debug!(family = %self.family, "no iptables interception rules to remove");
            return Ok(());
        }
        info!(
            family = %self.family,
            removed_jumps = jumps,
            removed_chains = ?chains,
            "removed iptables interception rules"
        );
        Ok(())
    }

    /// Deletes the canonical jump while `-C` finds it, then any other rule in
    /// `hook` that jumps to `chain` (forms older versions may have used).
    fn delete_jumps(&self, hook: &str, chain: &str) -> Result<usize, IptablesError> {
        let spec = jump_spec(hook, chain);
        let mut deleted = 0;
        while self.jump_exists(hook, chain)? {
            if deleted == MAX_JUMP_DELETES {
                return Err(IptablesError::JumpNotRemoved {
                    command: self.command_line(&self.iptables, &with_op("-D", &spec)),
                    attempts: deleted,
                });
            }
            self.iptables_ok(&with_op("-D", &spec))?;
            deleted += 1;
        }

        for line in self.jumps_to(hook, chain)? {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            if line.contains('"') || line.contains('\'') {
                // Splitting on whitespace would mangle a quoted argument, and a
                // wrong -D could delete somebody else's rule.
                warn!(family = %self.family, rule = %line, "leaving a quoted jump to our chain; delete it by hand");
                continue;
            }
            self.iptables_ok(&with_op("-D", &tokens[1..]))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Whether `hook` jumps to `chain` in the canonical form.
    fn jump_exists(&self, hook: &str, chain: &str) -> Result<bool, IptablesError> {
        let args = with_op("-C", &jump_spec(hook, chain));
        let out = self.run(&self.iptables, &args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Ok(true),
            // 1: no such rule (or, legacy, no such chain).
            Some(1) if !is_permission_denied(&stderr) => Ok(false),
            // 2: the jump target does not exist, so no rule can jump to it.
            Some(2) if target_missing(&stderr) => Ok(false),
            _ => Err(self.failure(&self.iptables, &args, &out, String::new())),
        }
    }

    /// Every rule of `hook` that jumps (or goes) to `chain`, in `-S` form.
    pub(super) fn jumps_to(&self, hook: &str, chain: &str) -> Result<Vec<String>, IptablesError> {
        let listing = self.iptables_ok(&["-t", "nat", "-S", hook])?;
        Ok(String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter(|line| {
                let tokens: Vec<&str> = line.split_whitespace().collect();
                matches!(
                    tokens.as_slice(),
                    ["-A", h, .., "-j" | "-g", target] if *h == hook && *target == chain
                )
            })
            .map(str::to_owned)
            .collect())
    }

    /// Whether `chain` exists in the `nat` table.
    pub(super) fn chain_exists(&self, chain: &str) -> Result<bool, IptablesError> {
        Ok(self.chain_rules(chain)?.is_some())
    }

    /// `chain`'s rules in `-S` form (`-A CHAIN ...`), or `None` when it does not
    /// exist.
    pub(super) fn chain_rules(&self, chain: &str) -> Result<Option<Vec<String>>, IptablesError> {
        let args = ["-t", "nat", "-S", chain];
        let out = self.run(&self.iptables, &args, None)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {
                let prefix = format!("-A {chain} ");
                let rules = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with(&prefix))
                    .map(str::to_owned)
                    .collect();
                Ok(Some(rules))
            }
            Some(1) if !is_permission_denied(&stderr) => Ok(None),
            _ => Err(self.failure(&self.iptables, &args, &out, String::new())),
        }
    }
}

/// `-t nat <op> <spec...>`.
fn with_op<'a>(op: &'a str, spec: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-t", "nat", op];
    args.extend_from_slice(spec);
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::iptables::fixtures::sample;

    /// Fake binaries: error paths without root or a real iptables.
    mod fake {
        use super::*;
        use crate::intercept::iptables::{ENV_IP6TABLES, Family, IptablesConfig};
        use crate::test_helpers::fake_bin::TempDir;

        /// `iptables` and `iptables-restore` scripts with these bodies.
        fn tables(dir: &TempDir, iptables: &str, restore: &str) -> Tables {
            let bin = dir.script("iptables", iptables);
            dir.script("iptables-restore", restore);
            Tables::new(Family::V4, bin.to_string_lossy().into_owned())
        }

        #[test]
        fn missing_binary_says_to_install_iptables() {
            let tables = Tables::new(Family::V6, "/nonexistent/mesh-test/ip6tables".into());
            let err = tables.install(&sample()).unwrap_err();
            assert!(matches!(err, IptablesError::NotInstalled { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("/nonexistent/mesh-test/ip6tables"), "{msg}");
            assert!(msg.contains("install the iptables package"), "{msg}");
            assert!(msg.contains(ENV_IP6TABLES), "{msg}");
            assert!(matches!(tables.uninstall(), Err(IptablesError::NotInstalled { .. })));
        }

        #[test]
        fn permission_denied_names_cap_net_admin() {
            let dir = TempDir::new();
            let tables = tables(
                &dir,
                "echo 'iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)' >&2; exit 4",
                "exit 0",
            );
            for err in [tables.install(&sample()).unwrap_err(), tables.uninstall().unwrap_err()] {
                assert!(matches!(err, IptablesError::PermissionDenied { .. }), "{err:?}");
                let msg = err.to_string();
                assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
                assert!(msg.contains(r#"capabilities.add: ["NET_ADMIN"]"#), "{msg}");
                assert!(msg.contains(" -C OUTPUT -j MESH_OUTPUT"), "{msg}");
            }
        }

        #[test]
        fn restore_failure_names_command_status_stderr_and_line() {
            let dir = TempDir::new();
            // -C: the chain does not exist yet, as nft reports it.
            let tables = tables(
                &dir,
                "echo \"iptables v1.8.9 (nf_tables): Chain 'MESH_OUTPUT' does not exist\" >&2; exit 2",
                "cat >/dev/null; echo 'iptables-restore v1.8.9 (nf_tables): ' >&2; \
                 echo 'line 4: RULE_APPEND failed (Invalid argument): rule in chain MESH_OUTPUT' >&2; exit 1",
            );
            let err = tables.install(&sample()).unwrap_err();
            let IptablesError::Command { command, status, stderr, context } = &err else {
                panic!("{err:?}");
            };
            assert!(command.ends_with("iptables-restore -w 10 --noflush"), "{command}");
            assert_eq!(status.code(), Some(1));
            assert!(stderr.contains("RULE_APPEND failed"), "{stderr}");
            assert!(context.contains("`-A MESH_OUTPUT -m mark --mark 0x539 -j RETURN`"), "{context}");
            let msg = err.to_string();
            assert!(msg.contains("exit status: 1"), "{msg}");
        }

        #[test]
        fn unexpected_check_failure_is_an_error_not_absence() {
            let dir = TempDir::new();
            let tables = tables(&dir, "echo 'iptables: unknown option \"-w\"' >&2; exit 2", "exit 0");
            let err = tables.install(&sample()).unwrap_err();
            assert!(matches!(err, IptablesError::Command { .. }), "{err:?}");
        }

        #[test]
        fn restore_exiting_early_reports_its_error_not_epipe() {
            let dir = TempDir::new();
            let tables = tables(&dir, "exit 1", "echo 'restore broke' >&2; exit 3");
            let big = IptablesConfig { exclude_ports: (1..=u16::MAX).collect(), ..sample() };
            let err = tables.install(&big).unwrap_err();
            assert!(err.to_string().contains("restore broke"), "{err}");
        }
    }
}

//! Running the iptables tools for one family, in the caller's network namespace
//! or another one: the lock wait, untranslated messages, stdin for restores, and
//! errors that name the command and say what its output means (missing binary,
//! missing privilege, the restore line at fault).

use std::io::{self, Write as _};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use tracing::debug;

use super::netns::NetnsFile;
use super::{Family, IptablesError, binary};

/// How long to wait for the xtables lock (held by kube-proxy and friends with the
/// legacy backend; the nft backend ignores it). Bounded so start-up cannot hang.
const LOCK_WAIT_SECS: &str = "10";

/// The binaries that program one family's `nat` table. The transaction on top of
/// them (install, uninstall, check) is in [`super::apply`].
#[derive(Debug, Clone)]
pub(super) struct Tables {
    pub(super) family: Family,
    pub(super) iptables: String,
    restore: String,
    /// Where the tools run: `None` for the caller's own namespace.
    netns: Option<Arc<NetnsFile>>,
}

impl Tables {
    /// The binaries named by the environment (see [`binary`]), in the caller's
    /// namespace.
    pub(super) fn from_env(family: Family) -> Self {
        Tables::new(family, binary(family))
    }

    /// `iptables` and `iptables`-restore for `family`, in the caller's namespace.
    pub(super) fn new(family: Family, iptables: String) -> Self {
        let restore = format!("{iptables}-restore");
        Tables { family, iptables, restore, netns: None }
    }

    /// The same tools, run in `netns` (`None`: the caller's own).
    pub(super) fn in_netns(self, netns: Option<Arc<NetnsFile>>) -> Self {
        Tables { netns, ..self }
    }

    /// Feeds `text` to `iptables-restore --noflush`.
    pub(super) fn restore(&self, text: &str) -> Result<(), IptablesError> {
        let args = ["--noflush"];
        let out = self.run(&self.restore, &args, Some(text))?;
        if out.status.success() {
            return Ok(());
        }
        let context = restore_context(&String::from_utf8_lossy(&out.stderr), text);
        Err(self.failure(&self.restore, &args, &out, context))
    }

    /// Runs `iptables args...`, which must succeed.
    pub(super) fn iptables_ok(&self, args: &[&str]) -> Result<Output, IptablesError> {
        let out = self.run(&self.iptables, args, None)?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failure(&self.iptables, args, &out, String::new()))
        }
    }

    /// Runs `program -w <secs> args...`, feeding `stdin` if given; a non-zero
    /// exit is returned, not judged.
    pub(super) fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, IptablesError> {
        let mut command = Command::new(program);
        command
            .args(["-w", LOCK_WAIT_SECS])
            .args(args)
            // Messages are matched below; keep them untranslated.
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &self.netns {
            netns.enter_in_child(&mut command);
        }
        let io_error = |source: io::Error| match (source.kind(), &self.netns) {
            (io::ErrorKind::NotFound, _) => {
                IptablesError::NotInstalled { binary: program.to_owned(), env_var: self.family.env_var() }
            }
            // setns(2) in the child is what fails without the privilege.
            (io::ErrorKind::PermissionDenied, Some(netns)) => IptablesError::Netns {
                path: netns.path().to_owned(),
                reason: format!(
                    "entering it to run `{}` was refused ({source}): that needs CAP_SYS_ADMIN",
                    self.command_line(program, args)
                ),
            },
            _ => IptablesError::Io { command: self.command_line(program, args), source },
        };
        let mut child = command.spawn().map_err(io_error)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits early closes the pipe; its exit status and
            // stderr then say more than EPIPE does.
            if let Err(e) = pipe.write_all(text.as_bytes())
                && e.kind() != io::ErrorKind::BrokenPipe
            {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io_error(e));
            }
        }
        let out = child.wait_with_output().map_err(io_error)?;
        debug!(
            command = %self.command_line(program, args),
            status = %out.status,
            "ran iptables command"
        );
        Ok(out)
    }

    /// The error for a command that ran and failed.
    pub(super) fn failure(
        &self,
        program: &str,
        args: &[&str],
        out: &Output,
        context: String,
    ) -> IptablesError {
        let command = self.command_line(program, args);
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if is_permission_denied(&stderr) {
            return IptablesError::PermissionDenied { command, stderr };
        }
        IptablesError::Command {
            command,
            status: out.status,
            stderr: if stderr.is_empty() { "(no output)".to_owned() } else { stderr },
            context,
        }
    }

    /// The command line as run, for errors and logs, naming the namespace when
    /// it is not the caller's.
    pub(super) fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut line = format!("{program} -w {LOCK_WAIT_SECS}");
        for arg in args {
            line.push(' ');
            line.push_str(arg);
        }
        if let Some(netns) = &self.netns {
            line.push_str(&format!(" (in network namespace {})", netns.path().display()));
        }
        line
    }
}

/// Whether a tool's stderr says the kernel (or the xtables lock file) refused
/// us for lack of privilege, in the words of the nft and legacy backends.
pub(super) fn is_permission_denied(stderr: &str) -> bool {
    stderr.contains("Permission denied")
        || stderr.contains("Operation not permitted")
        || stderr.contains("you must be root")
}

/// Whether `-C` failed because the jump target chain does not exist (nft:
/// "Chain 'X' does not exist"; legacy: "Couldn't load target `X'").
pub(super) fn target_missing(stderr: &str) -> bool {
    stderr.contains("does not exist")
        || stderr.contains("Couldn't load target")
        || stderr.contains("No chain/target/match by that name")
}

/// The restore input line that `iptables-restore` names in `stderr` ("line 4
/// failed", "line 4: RULE_APPEND failed"), with a hint for the usual cause.
fn restore_context(stderr: &str, input: &str) -> String {
    let line_no = stderr.match_indices("line ").find_map(|(i, m)| {
        let digits: String = stderr[i + m.len()..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<usize>().ok()
    });
    let Some(line) = line_no.and_then(|n| Some((n, input.lines().nth(n.checked_sub(1)?)?))) else {
        return String::new();
    };
    let mut context = format!("; restore input line {}: `{}`", line.0, line.1);
    if line.1.contains("-m cgroup") {
        context.push_str(
            " (the cgroup must exist under the cgroup2 root, and the kernel needs \
             xt_cgroup with cgroup2 socket matching)",
        );
    } else if line.1.contains("REDIRECT") {
        context.push_str(" (the kernel needs the nat table and the REDIRECT target)");
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_context_names_the_failing_line() {
        let input =
            "*nat\n:MESH_OUTPUT - [0:0]\n-A MESH_OUTPUT -p tcp -m cgroup --path \"/x\" -j RETURN\nCOMMIT\n";
        let nft = "iptables-restore v1.8.9 (nf_tables): \nline 3: RULE_APPEND failed (Invalid argument): rule in chain MESH_OUTPUT";
        let ctx = restore_context(nft, input);
        assert!(ctx.contains("line 3: `-A MESH_OUTPUT -p tcp -m cgroup"), "{ctx}");
        assert!(ctx.contains("cgroup must exist"), "{ctx}");
        let legacy = "iptables-restore: line 3 failed";
        assert!(restore_context(legacy, input).contains("line 3:"));
        assert_eq!(restore_context("line 99 failed", input), "");
        assert_eq!(restore_context("line 0 failed", input), "");
        assert_eq!(restore_context("something else", input), "");
    }

    #[test]
    fn stderr_classification() {
        for denied in [
            "iptables v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)",
            "iptables v1.8.9 (legacy): can't initialize iptables table `nat': Permission denied (you must be root)",
            "Fatal: can't open lock file /run/xtables.lock: Permission denied",
            "iptables: Operation not permitted.",
        ] {
            assert!(is_permission_denied(denied), "{denied}");
        }
        assert!(!is_permission_denied("iptables: Bad rule (does a matching rule exist in that chain?)."));
        assert!(target_missing("iptables v1.8.9 (nf_tables): Chain 'MESH_OUTPUT' does not exist"));
        assert!(target_missing(
            "iptables v1.8.9 (legacy): Couldn't load target `MESH_OUTPUT':No such file or directory"
        ));
        assert!(!target_missing("iptables v1.8.9 (nf_tables): unknown option \"--bogus\""));
    }
}

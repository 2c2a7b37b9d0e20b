//! Why iptables could not be programmed, each error naming the command, the
//! binary or the field at fault and how to fix it.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why iptables could not be programmed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// The config failed [`IptablesConfig::validate`].
    #[error("invalid iptables config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The network namespace path names nothing (any more): for a pod, the pod
    /// is gone, and its rules with it.
    #[error("network namespace {} does not exist (is the pod gone?)", path.display())]
    NetnsGone {
        /// The path given.
        path: PathBuf,
    },
    /// The network namespace path cannot be used.
    #[error("network namespace {}: {reason}", path.display())]
    Netns {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The binary does not exist.
    #[error(
        "`{binary}` not found: install the iptables package (Debian/Ubuntu: \
         `apt-get install iptables`), or set {env_var} to the binary to use"
    )]
    NotInstalled {
        /// The binary looked for.
        binary: String,
        /// The variable that overrides it.
        env_var: &'static str,
    },
    /// The kernel refused: the process lacks `CAP_NET_ADMIN`.
    #[error(
        "`{command}` was denied: changing iptables rules needs CAP_NET_ADMIN in the \
         network namespace; run the agent as root or grant the capability (Kubernetes: \
         securityContext.capabilities.add: [\"NET_ADMIN\"]); stderr: {stderr}"
    )]
    PermissionDenied {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}{context}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed.
        stderr: String,
        /// For restores: the input line the tool complained about, and a hint.
        context: String,
    },
    /// Deleting a jump kept succeeding without the jump going away.
    #[error("`{command}` succeeded {attempts} times but the jump is still there")]
    JumpNotRemoved {
        /// The delete command line.
        command: String,
        /// How many deletions were tried.
        attempts: usize,
    },
    /// The command could not be started or talked to.
    #[error("could not run `{command}`: {source}")]
    Io {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

//! `mesh-agent`: the mesh's node agent. See the crate docs of `mesh_agent`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent,
    config::{InterceptArgs, LogFormat, PodRulesArgs},
    intercept::iptables::{
        self, Check, Netns,
        pod::{self, Cleaned},
    },
};
use tracing_subscriber::{EnvFilter, Registry, fmt, layer::SubscriberExt, reload, util::SubscriberInitExt};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "Service mesh node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Intercept enrolled workloads and proxy their connections.
    Run(Box<agent_args::Run>),
    /// Serve as the cluster's east-west gateway: pass federated clusters' mutual-TLS
    /// connections through to the agent their server name asks for, unopened.
    Gateway(Box<mesh_agent::gateway::GatewayArgs>),
    /// Install or remove the iptables rules alone (for a pod's init container:
    /// needs CAP_NET_ADMIN only).
    Iptables {
        #[command(subcommand)]
        action: IptablesAction,
    },
    /// Remove the interception an agent leaves in place on purpose when it stops (so
    /// workloads fail closed): iptables chains and jumps, in this network namespace
    /// and in each pod namespace given with --netns, and the eBPF programs, links and
    /// maps pinned in bpffs. Workloads' connections then go direct again.
    Cleanup {
        /// Leave ip6tables alone.
        #[arg(long)]
        no_ipv6: bool,
        /// A pod's network namespace (/var/run/netns/NAME or /proc/PID/ns/net)
        /// whose rules to remove too; repeatable. One that no longer exists is
        /// reported and counts as cleaned.
        #[arg(long = "netns")]
        netns: Vec<PathBuf>,
        /// The agent's bpffs directory (`--bpffs-dir` of `mesh-agent run`).
        #[arg(long, env = "MESH_BPFFS_DIR", default_value = mesh_agent::config::DEFAULT_BPFFS_DIR)]
        bpffs_dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum IptablesAction {
    /// Install the REDIRECT rules for this network namespace (idempotent).
    Install {
        #[command(flatten)]
        intercept: InterceptArgs,
    },
    /// Remove exactly the rules `install` added (idempotent).
    Uninstall {
        /// Leave ip6tables alone.
        #[arg(long)]
        no_ipv6: bool,
    },
    /// The rules of a pod's own network namespace, where the agent serves the pod
    /// (every outbound TCP connection to 15001, every inbound one but the agent's
    /// own ports to 15006): run from the node with --netns, or from inside the pod
    /// (an init container).
    Pod {
        #[command(subcommand)]
        action: PodAction,
    },
}

#[derive(Subcommand)]
enum PodAction {
    /// Install (or replace) the pod rules (idempotent).
    Install {
        /// The pod's network namespace (/var/run/netns/NAME or /proc/PID/ns/net);
        /// default: this process's own.
        #[arg(long)]
        netns: Option<PathBuf>,
        #[command(flatten)]
        rules: PodRulesArgs,
    },
    /// Exit 0 if the namespace holds exactly these rules; otherwise print what
    /// differs and exit 1. Changes nothing.
    Check {
        /// As for `install`.
        #[arg(long)]
        netns: Option<PathBuf>,
        #[command(flatten)]
        rules: PodRulesArgs,
    },
    /// Remove exactly what `install` added (idempotent).
    Uninstall {
        /// As for `install`.
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Leave ip6tables alone.
        #[arg(long)]
        no_ipv6: bool,
    },
}

fn netns(path: Option<PathBuf>) -> Netns {
    path.map_or(Netns::Current, Netns::Path)
}

mod agent_args {
    /// `run` flags.
    pub type Run = mesh_agent::config::RunArgs;
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid --log (MESH_LOG) filter {filter:?}"))?;
    // The filter sits behind a reload layer so `POST /logging?level=...` on the admin
    // endpoint can change it at run time.
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(std::io::stdout)).init(),
        LogFormat::Json => registry
            .with(
                fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stdout),
            )
            .init(),
    }
    mesh_agent::admin::set_log_filter_control(Box::new(move |new: Option<&str>| {
        if let Some(new) = new {
            let filter = EnvFilter::try_new(new).map_err(|e| format!("invalid filter {new:?}: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())?;
        }
        handle.with_current(ToString::to_string).map_err(|e| e.to_string())
    }));
    Ok(())
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `errno` of [`mesh_agent::memory::keep_small`] when it ran before `main`; 0 if it
/// succeeded.
static KEEP_SMALL_ERRNO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Runs `keep_small` as a constructor, before anything in the process allocates
/// (by `main`, the allocator's first pages would already be huge).
#[used]
#[unsafe(link_section = ".init_array")]
static KEEP_SMALL: extern "C" fn() = {
    extern "C" fn keep_small() {
        KEEP_SMALL_ERRNO.store(mesh_agent::memory::keep_small(), std::sync::atomic::Ordering::Relaxed);
    }
    keep_small
};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging(args.log_format, &args.log)?;
            match KEEP_SMALL_ERRNO.load(std::sync::atomic::Ordering::Relaxed) {
                0 => {}
                errno => tracing::warn!(
                    error = %std::io::Error::from_raw_os_error(errno),
                    "transparent huge pages stay on for the agent (a few MiB more resident)"
                ),
            }
            // One worker: the current-thread scheduler, which wakes tasks without the
            // work-stealing machinery (atomics, cross-thread notifications) a single
            // worker never uses. Blocking work still goes to the blocking pool.
            let mut builder = if args.worker_threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(usize::from(args.worker_threads));
                b
            };
            let rt = builder
                .thread_name("mesh-agent")
                .on_thread_park(mesh_agent::memory::on_park)
                .enable_all()
                .build()?;
            rt.spawn(mesh_agent::memory::wake_periodically());
            let result = rt.block_on(agent::run(*args));
            // Do not wait for connection tasks past the drain deadline.
            rt.shutdown_background();
            if let Err(e) = result {
                // One line, in the configured log format, naming what went wrong.
                tracing::error!("{e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Gateway(args) => {
            init_logging(args.log_format, &args.log)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .thread_name("mesh-gateway")
                .enable_all()
                .build()?;
            if let Err(e) = rt.block_on(mesh_agent::gateway::run(*args)) {
                tracing::error!("{e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Iptables { action } => {
            init_logging(LogFormat::Text, "info")?;
            match action {
                IptablesAction::Install { intercept } => {
                    let settings = intercept.settings(None, false, false)?;
                    // Run by an init container: the agent's cgroup is not this one.
                    iptables::install(&settings.iptables_config(&[], None))?;
                }
                IptablesAction::Uninstall { no_ipv6 } => iptables::uninstall(!no_ipv6)?,
                IptablesAction::Pod { action } => pod_action(action)?,
            }
            Ok(())
        }
        Command::Cleanup { no_ipv6, netns, bpffs_dir } => {
            init_logging(LogFormat::Text, "info")?;
            iptables::uninstall(!no_ipv6)?;
            let mut failed = 0;
            for (path, result) in pod::cleanup(&netns, !no_ipv6) {
                match result {
                    Ok(Cleaned::Removed) => println!("cleanup: {}: pod rules removed", path.display()),
                    Ok(Cleaned::Gone) => {
                        println!("cleanup: {}: namespace gone, its rules with it", path.display())
                    }
                    Err(e) => {
                        eprintln!("cleanup: {}: {e}", path.display());
                        failed += 1;
                    }
                }
            }
            anyhow::ensure!(failed == 0, "cleanup failed in {failed} pod namespace(s)");
            let removed = mesh_agent::intercept::ebpf::pins::remove_all(&bpffs_dir).with_context(|| {
                format!("removing pinned eBPF interception under {}", bpffs_dir.display())
            })?;
            // Programs still loaded belong to a running agent (its own getsockopt link).
            let live: Vec<String> = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .filter_map(|p| p.name_as_str().map(str::to_owned))
                .filter(|n| n.starts_with("mesh_"))
                .collect();
            println!(
                "cleanup: iptables rules removed; {} pinned eBPF object(s) removed from {}{}",
                removed.len(),
                bpffs_dir.display(),
                if live.is_empty() {
                    String::new()
                } else {
                    format!("; mesh eBPF programs still loaded by a running agent: {}", live.join(", "))
                }
            );
            Ok(())
        }
    }
}

/// `mesh-agent iptables pod ...`.
fn pod_action(action: PodAction) -> anyhow::Result<()> {
    match action {
        PodAction::Install { netns: path, rules } => pod::install(&netns(path), &rules.rules()?)?,
        PodAction::Check { netns: path, rules } => match pod::check(&netns(path), &rules.rules()?)? {
            Check::Installed => println!("installed"),
            Check::Absent => {
                println!("absent: no pod rules");
                std::process::exit(1);
            }
            Check::Differs(differences) => {
                println!("differs:");
                for d in differences {
                    println!("  {d}");
                }
                std::process::exit(1);
            }
        },
        PodAction::Uninstall { netns: path, no_ipv6 } => pod::uninstall(&netns(path), !no_ipv6)?,
    }
    Ok(())
}

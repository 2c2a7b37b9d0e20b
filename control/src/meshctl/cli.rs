//! meshctl's command line and the dispatch from commands to reports.

use std::{net::IpAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use super::{
    agent_socket::{self, AgentCommand},
    certs,
    client::Targets,
    error::MeshctlError,
    explain::{self, Destination},
    services::{self, AgentRoutes},
    status, workloads,
};

/// Inspect a running mesh: control plane, agents, services, endpoints, identities.
#[derive(Parser, Debug)]
#[command(name = "meshctl", version)]
pub struct Cli {
    /// Control plane admin endpoint (mesh-control --admin-addr): its snapshot and the
    /// agents it has seen.
    #[arg(long, env = "MESHCTL_CONTROL_ADMIN", default_value = "http://127.0.0.1:15011", global = true)]
    pub control_admin: String,

    /// Agent admin endpoint (mesh-agent --admin-addr); repeatable, or comma-separated in
    /// the environment. Default: the local agent, http://127.0.0.1:15000.
    #[arg(long = "agent", env = "MESHCTL_AGENTS", value_delimiter = ',', global = true)]
    pub agents: Vec<String>,

    /// Output format: aligned text for people, JSON for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// How long to wait for each component.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

/// meshctl's commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Control plane readiness and version, every agent it has seen (mode, applied
    /// version, refusals) and each queried agent's own view (stream, staleness).
    Status,
    /// Services in the control plane's snapshot with ports, balancer and endpoint counts.
    Services,
    /// Endpoints with health and weight, as the agents' data path sees them.
    Endpoints {
        /// Only this service (namespace/name, or a name in any namespace).
        service: Option<String>,
        /// Read the agents' applied routes, or the control plane's snapshot.
        #[arg(long, value_enum, default_value_t = EndpointSource::Agent)]
        from: EndpointSource,
    },
    /// HTTP routes per service, in the order agents try them: matches, backends with
    /// their shares and usable endpoints, timeouts, retries, faults and mirrors.
    Routes {
        /// Only this service (namespace/name, or a name in any namespace).
        service: Option<String>,
    },
    /// The raw configuration of the control plane, the agents, or both (JSON).
    ConfigDump {
        /// Which component; both when omitted.
        #[arg(value_enum)]
        component: Option<Component>,
    },
    /// Which service and endpoints a connection would reach, and which policy applies.
    Explain {
        /// Source workload IP.
        source: IpAddr,
        /// Destination: ip:port, [ipv6]:port or host:port.
        destination: String,
    },
    /// Workload certificates the agents hold, and when they expire.
    Certs,
    /// The URL of the live service graph on the control plane's admin endpoint
    /// (requests/s, errors, latency, mTLS and denials per edge), once it answers.
    Dashboard {
        /// Also open it in the desktop's browser (xdg-open).
        #[arg(long)]
        open: bool,
    },
    /// Per agent, the workloads it serves: network namespace, identity, certificate
    /// expiry, interception mode, addresses, and whether the CNI or a flag added them.
    Workloads,
    /// The Kubernetes manifests of this release for a profile, printed for `kubectl
    /// apply -f -`, or applied with --apply: `minimal` is deploy/ as it is;
    /// `production` adds a second control-plane replica spread over nodes, a
    /// PodDisruptionBudget, priority and larger resource requests.
    Install {
        #[arg(long, value_enum, default_value_t = super::install::Profile::Minimal)]
        profile: super::install::Profile,
        /// KEY=VALUE, repeatable: image.registry, image.tag, controlPlane.replicas,
        /// agent.mode, trustDomain, clusterDomain, mtlsDefault.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Apply the objects to the cluster of the kubeconfig (KUBECONFIG,
        /// ~/.kube/config, or in-cluster credentials) by server-side apply, field
        /// manager `meshctl`, taking over conflicting fields; the namespace first,
        /// stopping at the first object refused. Needs cluster-admin or equivalent:
        /// it creates the mesh-system namespace and cluster-scoped RBAC.
        #[arg(long)]
        apply: bool,
        /// With --apply: a server-side dry run (validation and admission, nothing
        /// persisted), printing what would be applied.
        #[arg(long, requires = "apply")]
        dry_run: bool,
    },
    /// Releases of meshctl, the control plane and every agent it has seen (and those
    /// named with --agent), with a warning for each unsupported skew: agents at most
    /// one minor version behind the control plane and never ahead of it.
    Version,
    /// Pre-flight on this machine: kernel, BTF, cgroup v2, capabilities, iptables
    /// backend; whether eBPF mode will work and why not, and what `auto` will pick.
    /// With --pre, the cluster of the kubeconfig instead, before `meshctl install`.
    Check {
        /// Inspect the cluster (kubeconfig, or in-cluster credentials): Kubernetes
        /// version, each node's kernel, permission to create what install creates, the
        /// Gateway API's HTTPRoute, and the mesh-system namespace's pod security.
        #[arg(long)]
        pre: bool,
    },
    /// Change this node's agent (enrol a cgroup, set the log level, drain) through its
    /// root-only admin socket; the agent's TCP admin port only reads.
    Agent {
        /// The agent's admin socket (mesh-agent --admin-socket).
        #[arg(long, env = "MESHCTL_AGENT_SOCKET", default_value = agent_socket::DEFAULT_SOCKET)]
        agent_socket: std::path::PathBuf,
        #[command(subcommand)]
        command: AgentCommand,
    },
}

/// Where `endpoints` reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointSource {
    Agent,
    Control,
}

/// A component for `config-dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Component {
    Control,
    Agent,
}

/// A command's result: what to print, and whether everything asked for answered.
#[derive(Debug)]
pub struct Rendered {
    pub text: String,
    pub complete: bool,
}

fn emit<T: Serialize>(output: Output, value: &T, human: impl FnOnce(&T) -> String) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(value)
            .map_or_else(|e| format!("{{\"error\":\"{e}\"}}"), |s| s + "\n"),
        Output::Human => human(value),
    }
}

/// Runs a command; `now` (Unix seconds) dates "ago" and "expires in" figures.
pub async fn run(cli: &Cli, now: u64) -> Result<Rendered, MeshctlError> {
    match &cli.command {
        Command::Check { pre: false } => return Ok(preflight(cli.output)),
        Command::Check { pre: true } => return cluster_precheck(cli.output).await,
        Command::Install { profile, sets, apply, dry_run } => {
            return install(*profile, sets, *apply, *dry_run).await;
        }
        // None of these needs the control plane's or agents' URLs.
        Command::Agent { agent_socket, command } => return agent(cli, agent_socket, command).await,
        _ => {}
    }
    let targets = Targets::new(&cli.control_admin, &cli.agents, cli.timeout)?;
    let out = cli.output;
    match &cli.command {
        Command::Status => {
            let report = status::gather(&targets).await;
            Ok(Rendered {
                complete: report.all_reachable(),
                text: emit(out, &report, |r| status::render(r, now as i64)),
            })
        }
        Command::Services => {
            let dump = targets.control_dump().await?;
            let text = match out {
                Output::Json => emit(
                    out,
                    &serde_json::json!({"version": dump.version, "services": dump.services()}),
                    |_| String::new(),
                ),
                Output::Human => services::render_services(&dump),
            };
            Ok(Rendered { text, complete: true })
        }
        Command::Routes { service } => {
            let dump = targets.control_dump().await?;
            let report = super::routes::gather(&dump, service.as_deref())?;
            Ok(Rendered { text: emit(out, &report, super::routes::render), complete: true })
        }
        Command::Endpoints { service, from: EndpointSource::Control } => {
            let dump = targets.control_dump().await?;
            let selected = services::select_services(&dump, service.as_deref())?;
            let text = match out {
                Output::Json => {
                    emit(out, &serde_json::json!({"version": dump.version, "services": selected}), |_| {
                        String::new()
                    })
                }
                Output::Human => services::render_control_endpoints(&dump, &selected),
            };
            Ok(Rendered { text, complete: true })
        }
        Command::Endpoints { service, from: EndpointSource::Agent } => {
            let views = futures::future::join_all(targets.agents.iter().map(|a| async {
                match targets.agent_dump(a).await {
                    Ok(d) => AgentRoutes {
                        agent: a.url.clone(),
                        applied_version: Some(d.discovery.applied_version),
                        error: None,
                        routes: d.routes,
                    },
                    Err(e) => AgentRoutes {
                        agent: a.url.clone(),
                        applied_version: None,
                        error: Some(e.to_string()),
                        routes: vec![],
                    },
                }
            }))
            .await;
            all_failed(views.iter().map(|v| v.error.as_deref()))?;
            let complete = views.iter().all(|v| v.error.is_none());
            let views = services::filter_routes(views, service.as_deref())?;
            Ok(Rendered { text: emit(out, &views, |v| services::render_agent_endpoints(v)), complete })
        }
        Command::ConfigDump { component } => {
            let mut dump = serde_json::Map::new();
            let mut complete = true;
            if component.is_none_or(|c| c == Component::Control) {
                match targets.control_dump_raw().await {
                    Ok(v) => {
                        dump.insert("control".into(), v);
                    }
                    Err(e) if component.is_some() => return Err(e),
                    Err(e) => {
                        complete = false;
                        dump.insert("control".into(), serde_json::json!({"error": e.to_string()}));
                    }
                }
            }
            if component.is_none_or(|c| c == Component::Agent) {
                let mut agents = serde_json::Map::new();
                for a in &targets.agents {
                    let v = match targets.agent_dump_raw(a).await {
                        Ok(v) => v,
                        Err(e) if component.is_some() && targets.agents.len() == 1 => return Err(e),
                        Err(e) => {
                            complete = false;
                            serde_json::json!({"error": e.to_string()})
                        }
                    };
                    agents.insert(a.url.clone(), v);
                }
                dump.insert("agents".into(), agents.into());
            }
            // A dump is JSON either way; -o json keeps it on one line for pipes.
            let value = serde_json::Value::Object(dump);
            let text = match out {
                Output::Json => value.to_string() + "\n",
                Output::Human => serde_json::to_string_pretty(&value).unwrap_or_default() + "\n",
            };
            Ok(Rendered { text, complete })
        }
        Command::Explain { source, destination } => {
            let dst = Destination::parse(destination)?;
            let agent_url = targets.agents.first().map(|a| a.url.clone()).unwrap_or_default();
            let agent = match targets.agents.first() {
                Some(a) => targets.agent_dump(a).await.map_err(|e| e.to_string()),
                None => Err("no agent given".into()),
            };
            let control = targets.control_dump().await.map_err(|e| e.to_string());
            if let (Err(a), Err(c)) = (&agent, &control) {
                return Err(MeshctlError::Usage(format!(
                    "explain needs the agent or the control plane:\n  {a}\n  {c}"
                )));
            }
            let x = explain::explain(
                *source,
                &dst,
                &agent_url,
                agent.as_ref().map_err(Clone::clone),
                control.as_ref().map_err(Clone::clone),
            );
            let complete = agent.is_ok() && control.is_ok();
            Ok(Rendered { text: emit(out, &x, explain::render), complete })
        }
        Command::Certs => {
            let rows = futures::future::join_all(targets.agents.iter().map(|a| async {
                match targets.agent_dump(a).await {
                    Ok(d) => certs::from_dump(&a.url, &d, now),
                    Err(e) => certs::AgentCerts {
                        agent: a.url.clone(),
                        error: Some(e.to_string()),
                        certificates: None,
                    },
                }
            }))
            .await;
            all_failed(rows.iter().map(|r| r.error.as_deref()))?;
            let complete = rows.iter().all(|r| r.error.is_none());
            Ok(Rendered { text: emit(out, &rows, |r| certs::render(r)), complete })
        }
        Command::Workloads => {
            let agents = futures::future::join_all(targets.agents.iter().map(|a| async {
                match targets.agent_workloads(a).await {
                    Ok(views) => workloads::from_views(&a.url, views, now),
                    Err(e) => workloads::AgentWorkloads {
                        agent: a.url.clone(),
                        error: Some(e.to_string()),
                        workloads: vec![],
                    },
                }
            }))
            .await;
            all_failed(agents.iter().map(|a| a.error.as_deref()))?;
            let complete = agents.iter().all(|a| a.error.is_none());
            Ok(Rendered { text: emit(out, &agents, |a| workloads::render(a)), complete })
        }
        Command::Dashboard { open } => {
            let d = super::dashboard::gather(&targets.control_admin, targets.timeout, *open).await?;
            Ok(Rendered { text: emit(out, &d, super::dashboard::render), complete: true })
        }
        Command::Version => {
            let report = super::version::gather(&targets).await;
            let complete = report.control_error.is_none() && report.agents.iter().all(|a| a.error.is_none());
            Ok(Rendered { complete, text: emit(out, &report, super::version::render) })
        }
        Command::Check { pre: false } => Ok(preflight(out)),
        Command::Check { pre: true } => cluster_precheck(out).await,
        Command::Install { profile, sets, apply, dry_run } => install(*profile, sets, *apply, *dry_run).await,
        Command::Agent { agent_socket, command } => agent(cli, agent_socket, command).await,
    }
}

/// `agent ...`: one request on the local agent's admin socket.
async fn agent(
    cli: &Cli,
    socket: &std::path::PathBuf,
    command: &AgentCommand,
) -> Result<Rendered, MeshctlError> {
    let answer = agent_socket::send(socket, command, cli.timeout).await?;
    Ok(Rendered { text: emit(cli.output, &answer, agent_socket::render), complete: true })
}

/// `install`: the manifests printed, or with `apply` sent to the kubeconfig's cluster.
async fn install(
    profile: super::install::Profile,
    sets: &[String],
    apply: bool,
    dry_run: bool,
) -> Result<Rendered, MeshctlError> {
    if !apply {
        return Ok(Rendered { text: super::install::render(profile, sets)?, complete: true });
    }
    let objects = super::install::objects(profile, sets)?;
    let cluster = super::kubeconfig::Cluster::infer("install --apply").await?;
    Ok(Rendered { text: super::apply::apply(&cluster, &objects, dry_run).await?, complete: true })
}

/// `check`: local facts only, no control plane or agent is contacted. Incomplete
/// (non-zero exit) when neither interception mode can work here.
async fn cluster_precheck(out: Output) -> Result<Rendered, MeshctlError> {
    let cluster = super::kubeconfig::Cluster::infer("check --pre").await?;
    let report = super::precheck::inspect(cluster.client).await;
    Ok(Rendered { complete: report.passes(), text: emit(out, &report, super::precheck::render) })
}

fn preflight(out: Output) -> Rendered {
    let report = super::check::check(&super::check::Inputs::gather());
    let complete = report.auto_picks != "none";
    Rendered { text: emit(out, &report, super::check::render), complete }
}

/// When no agent answered, their errors (each with its hint) are the command's error.
fn all_failed<'a>(errors: impl Iterator<Item = Option<&'a str>>) -> Result<(), MeshctlError> {
    let mut all = Vec::new();
    for e in errors {
        match e {
            Some(e) => all.push(e),
            None => return Ok(()),
        }
    }
    Err(MeshctlError::Usage(match all.as_slice() {
        [one] => (*one).to_owned(),
        many => format!("no agent answered:\n  {}", many.join("\n  ")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "status",
            "-o",
            "json",
            "--agent",
            "http://a:1",
            "--agent",
            "http://b:2",
        ])
        .unwrap();
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.agents, vec!["http://a:1", "http://b:2"]);
        assert!(matches!(cli.command, Command::Status));
    }

    /// Serves `body` as every answer of a one-route HTTP/1 server on loopback.
    async fn serve(status: &'static str, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let (status, body) =
                    if req.starts_with("GET /workloads ") { (status, body) } else { ("404 Not Found", "") };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn workloads_reads_each_agent_and_reports_the_ones_that_fail() {
        let good = serve("200 OK", super::super::fixtures::WORKLOADS).await;
        let old = serve("404 Not Found", "not found").await;
        let cli =
            Cli::try_parse_from(["meshctl", "workloads", "-o", "json", "--agent", &good, "--agent", &old])
                .unwrap();
        let r = run(&cli, 1_700_000_000).await.unwrap();
        assert!(!r.complete, "one agent failed: the exit status says so");
        let v: serde_json::Value = serde_json::from_str(&r.text).unwrap();
        assert_eq!(v[0]["agent"], good.as_str());
        assert_eq!(v[0]["workloads"].as_array().unwrap().len(), 4);
        assert_eq!(v[0]["workloads"][0]["name"], "coredns-7d");
        assert!(v[1]["error"].as_str().unwrap().contains("answered /workloads with 404"), "{v}");

        let cli = Cli::try_parse_from(["meshctl", "workloads", "--agent", &good]).unwrap();
        let r = run(&cli, 1_700_000_000).await.unwrap();
        assert!(r.complete);
        assert!(r.text.starts_with("AGENT ") && r.text.contains("shop/web-0"), "{}", r.text);

        let cli = Cli::try_parse_from(["meshctl", "workloads", "--agent", &old]).unwrap();
        let e = run(&cli, 0).await.unwrap_err();
        assert!(e.to_string().contains("/workloads with 404"), "{e}");
    }

    #[test]
    fn agent_commands_take_the_socket_and_their_arguments() {
        let cli = Cli::try_parse_from([
            "meshctl",
            "agent",
            "--agent-socket",
            "/x/a.sock",
            "enroll",
            "/mesh/web",
            "--create",
        ])
        .unwrap();
        let Command::Agent { agent_socket, command } = cli.command else { panic!("not agent") };
        assert_eq!(agent_socket, std::path::PathBuf::from("/x/a.sock"));
        assert_eq!(command, AgentCommand::Enroll { cgroup: "/mesh/web".into(), create: true });
        let cli = Cli::try_parse_from(["meshctl", "agent", "log-level"]).unwrap();
        let Command::Agent { agent_socket, command } = cli.command else { panic!("not agent") };
        assert_eq!(agent_socket, std::path::PathBuf::from(agent_socket::DEFAULT_SOCKET));
        assert_eq!(command, AgentCommand::LogLevel { filter: None });
    }

    #[test]
    fn install_dry_run_needs_apply() {
        let e = Cli::try_parse_from(["meshctl", "install", "--dry-run"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from(["meshctl", "install", "--apply", "--dry-run"]).unwrap();
        assert!(matches!(cli.command, Command::Install { apply: true, dry_run: true, .. }));
    }

    #[test]
    fn explain_rejects_a_source_that_is_not_an_ip() {
        let e = Cli::try_parse_from(["meshctl", "explain", "web", "10.0.0.1:80"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
    }
}

//! The plugin's four commands. ADD hands the pod to the node agent and, once the
//! agent serves it, prints `prevResult` unchanged (a chained plugin passes the pod
//! network's result on); DEL tells the agent to let the pod go and succeeds when the
//! agent or the pod is already gone; CHECK asks the agent whether the pod is served
//! as announced; VERSION lists the spec versions. Every failure is a CNI error result
//! on stdout and a non-zero exit.

use std::path::Path;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::{
    client::{self, ClientError},
    contract::{ADD_PATH, CHECK_PATH, CniError, DEL_PATH, PodAnnounce, PodRelease, PodServed, code},
    env::{self, CniEnv, Command},
    spec::{self, DEFAULT_VERSION, NetConf, PluginConfig},
};

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    /// Notes for the runtime's log (the spec leaves stderr free-form).
    pub stderr: String,
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String, stderr: String) -> Self {
        Self { stdout, stderr, exit_code: 0 }
    }

    fn error(cni_version: &str, e: &CniError) -> Self {
        Self { stdout: spec::error_result(cni_version, e), stderr: format!("mesh-cni: {e}\n"), exit_code: 1 }
    }
}

/// Runs one plugin call: `get` reads the environment, `stdin` is the network configuration.
pub fn run(get: &impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let command = match env::command(get) {
        Ok(c) => c,
        Err(e) => return Outcome::error(DEFAULT_VERSION, &e),
    };
    if command == Command::Version {
        #[derive(serde::Deserialize)]
        struct Asked {
            #[serde(rename = "cniVersion")]
            cni_version: Option<String>,
        }
        let asked = serde_json::from_slice::<Asked>(stdin).ok().and_then(|a| a.cni_version);
        return Outcome::ok(spec::version_result(asked.as_deref()), String::new());
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return Outcome::error(DEFAULT_VERSION, &e),
    };
    let result = env::read(command, get).and_then(|env| match command {
        Command::Add => add(&conf, &env),
        Command::Del => del(&conf.plugin, &env),
        Command::Check => check(&conf, &env),
        Command::Version => unreachable!("answered above"),
    });
    match result {
        Ok((stdout, stderr)) => Outcome::ok(stdout, stderr),
        Err(e) => Outcome::error(&conf.cni_version, &e),
    }
}

fn excluded(plugin: &PluginConfig, env: &CniEnv) -> bool {
    env.pod.as_ref().is_some_and(|p| plugin.exclude_namespaces.contains(&p.namespace))
}

/// The announcement from the environment and `prevResult`, checked before it is sent.
fn announce<'c>(
    conf: &'c NetConf,
    env: &CniEnv,
    command: Command,
) -> Result<(PodAnnounce, &'c RawValue), CniError> {
    let prev = conf.prev_result.as_deref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            format!(
                "network configuration field prevResult: missing on {}; mesh-cni must be chained after the \
                 pod network's plugins (last in the conflist's plugins)",
                command.name()
            ),
        )
    })?;
    let netns = env.netns.clone().unwrap_or_default();
    if !Path::new(&netns).exists() {
        return Err(CniError::new(code::INVALID_ENV, format!("CNI_NETNS: {netns} does not exist")));
    }
    let pod = PodAnnounce {
        container_id: env.container_id.clone(),
        netns,
        ifname: env.ifname.clone(),
        pod: env.pod.clone(),
        ips: spec::pod_ips(prev)?,
    };
    pod.check().map_err(|e| {
        let field = if e.field == "ips" { "prevResult.ips" } else { e.field };
        CniError::new(code::INVALID_CONFIG, format!("{field}: {}", e.reason))
    })?;
    Ok((pod, prev))
}

fn add(conf: &NetConf, env: &CniEnv) -> Result<(String, String), CniError> {
    if excluded(&conf.plugin, env) {
        let passed = conf.prev_result.as_ref().map_or_else(
            || serde_json::json!({ "cniVersion": conf.cni_version }).to_string(),
            |p| p.get().to_owned(),
        );
        let ns = env.pod.as_ref().map(|p| p.namespace.as_str()).unwrap_or_default();
        return Ok((passed, format!("mesh-cni: namespace {ns} is excluded; not meshed\n")));
    }
    let (pod, prev) = announce(conf, env, Command::Add)?;
    let served: PodServed = call(&conf.plugin, ADD_PATH, &pod)?;
    let note = format!(
        "mesh-cni: {} served{}\n",
        pod.describe(),
        served.identity.map(|i| format!(" as {i}")).unwrap_or_default()
    );
    Ok((prev.get().to_owned(), note))
}

fn check(conf: &NetConf, env: &CniEnv) -> Result<(String, String), CniError> {
    if !conf.supports_check() {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK needs cniVersion 0.4.0 or later, the configuration has {}", conf.cni_version),
        ));
    }
    if excluded(&conf.plugin, env) {
        return Ok((String::new(), String::new()));
    }
    let (pod, _) = announce(conf, env, Command::Check)?;
    let _: PodServed = call(&conf.plugin, CHECK_PATH, &pod)?;
    Ok((String::new(), String::new()))
}

fn del(plugin: &PluginConfig, env: &CniEnv) -> Result<(String, String), CniError> {
    let release = PodRelease {
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        pod: env.pod.clone(),
    };
    // Excluded namespaces are released too: the exclusion list may have changed since ADD.
    match call::<_, serde_json::Value>(plugin, DEL_PATH, &release) {
        Ok(_) => Ok((String::new(), String::new())),
        // Nothing listening holds no state for the pod: DEL has nothing left to undo.
        Err(Failure::Client(e)) if e.is_unreachable() => {
            Ok((String::new(), format!("mesh-cni: DEL: {e}; nothing to release\n")))
        }
        Err(f) => Err(f.into()),
    }
}

/// A call that did not succeed: no answer, or the agent's refusal.
enum Failure {
    Client(ClientError),
    Refused(CniError),
}

impl From<Failure> for CniError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Refused(e) => e,
            Failure::Client(e @ (ClientError::Unreachable { .. } | ClientError::Timeout { .. })) => {
                CniError::new(code::TRY_AGAIN_LATER, e.to_string())
            }
            Failure::Client(e @ ClientError::Io { .. }) => CniError::new(code::IO, e.to_string()),
            Failure::Client(e @ ClientError::Protocol { .. }) => {
                CniError::new(code::AGENT_PROTOCOL, e.to_string())
            }
        }
    }
}

fn call<T: Serialize, R: serde::de::DeserializeOwned>(
    plugin: &PluginConfig,
    path: &str,
    body: &T,
) -> Result<R, Failure> {
    let body =
        serde_json::to_vec(body).map_err(|e| Failure::Refused(CniError::new(code::IO, e.to_string())))?;
    let answer = client::post(&plugin.agent_socket, path, &body, plugin.timeout).map_err(Failure::Client)?;
    let protocol = |what: String| {
        Failure::Refused(CniError::new(
            code::AGENT_PROTOCOL,
            format!("node agent at {}: {what}", plugin.agent_socket.display()),
        ))
    };
    if (200..300).contains(&answer.status) {
        return serde_json::from_slice(&answer.body)
            .map_err(|e| protocol(format!("undecodable answer to {path}: {e}")));
    }
    match serde_json::from_slice::<CniError>(&answer.body) {
        Ok(refusal) => Err(Failure::Refused(refusal)),
        Err(_) => Err(protocol(format!(
            "{path} answered {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).trim()
        ))),
    }
}

#[cfg(test)]
mod tests;

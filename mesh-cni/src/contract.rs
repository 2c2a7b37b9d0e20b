//! The contract between the `mesh-cni` plugin and the node agent: what the plugin
//! sends over the agent's root-only unix socket, what the agent answers, and the
//! checks both sides run on it. Both binaries compile this one module, so they
//! cannot drift apart; the agent re-exports it from `mesh_agent::workload::cni`.
//!
//! | method | path | body | success |
//! |---|---|---|---|
//! | POST | [`ADD_PATH`] | [`PodAnnounce`] | 200 [`PodServed`] |
//! | POST | [`CHECK_PATH`] | [`PodAnnounce`] | 200 [`PodServed`] |
//! | POST | [`DEL_PATH`] | [`PodRelease`] | 200 `{}` |
//!
//! A refusal is a non-2xx status whose body is a [`CniError`]: the plugin relays its
//! code and message to the container runtime as the CNI error result.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Every route of the contract starts with this, so the agent mounts one prefix.
pub const PATH_PREFIX: &str = "/cni/v1/";
/// Start serving a pod (CNI ADD).
pub const ADD_PATH: &str = "/cni/v1/add";
/// Stop serving a pod (CNI DEL).
pub const DEL_PATH: &str = "/cni/v1/del";
/// Is the pod served as announced (CNI CHECK)?
pub const CHECK_PATH: &str = "/cni/v1/check";

/// Largest request or answer body either side accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most addresses one pod may announce (a dual-stack pod has two).
pub const MAX_IPS: usize = 16;

/// CNI error codes: 1-11 are the spec's well-known codes, 100 and up are the mesh's.
pub mod code {
    /// The network configuration's `cniVersion` is not supported.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A required environment variable (`CNI_*`) is missing or invalid; the message names it.
    pub const INVALID_ENV: u32 = 4;
    /// Reading or writing failed (stdin, the agent socket).
    pub const IO: u32 = 5;
    /// The network configuration or a request is not valid JSON.
    pub const DECODE: u32 = 6;
    /// A field of the network configuration or of a request is invalid; the message names it.
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient: the agent is unreachable, did not answer in time, or is busy.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The control plane does not know this pod, so the agent has no identity for it.
    pub const POD_UNKNOWN: u32 = 100;
    /// The container is already served with a different announcement, or another
    /// container holds the same network namespace.
    pub const CONFLICT: u32 = 101;
    /// CHECK: the agent does not serve this container (or serves it differently).
    pub const NOT_SERVED: u32 = 102;
    /// The agent could not serve the pod (listeners, interception, state file).
    pub const AGENT_FAILED: u32 = 103;
    /// The agent's answer could not be understood (a version mismatch or a bug).
    pub const AGENT_PROTOCOL: u32 = 104;
    /// The node already serves the most pods the agent accepts.
    pub const LIMIT: u32 = 105;
}

/// A pod as Kubernetes names it (from `CNI_ARGS`: `K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`, `K8S_POD_UID`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Absent when the runtime does not pass `K8S_POD_UID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// CNI ADD and CHECK: the pod the runtime just wired to the pod network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAnnounce {
    /// `CNI_CONTAINERID`: the sandbox, unique on the node; the key of everything.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace (`/var/run/netns/cni-...`).
    pub netns: String,
    /// `CNI_IFNAME`: the pod's interface the pod network plugins created.
    pub ifname: String,
    /// From `CNI_ARGS`; absent for containers a runtime starts outside Kubernetes.
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// The pod's addresses from the chain's `prevResult`.
    pub ips: Vec<IpAddr>,
}

/// CNI DEL: the container to stop serving. Only `container_id` is needed; the rest
/// is what the runtime still had (CNI_NETNS may be empty on DEL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRelease {
    pub container_id: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub pod: Option<PodRef>,
}

/// The agent's answer to ADD and CHECK.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodServed {
    /// The SPIFFE ID the pod's connections carry, when the agent knows it yet.
    #[serde(default)]
    pub identity: Option<String>,
    /// Free text for logs (interception mode, listeners).
    #[serde(default)]
    pub detail: String,
}

/// A refusal, in the shape of the CNI error result (without `cniVersion`, which the
/// plugin adds from the network configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The control plane does not know `pod` (no identity to give it).
    pub fn pod_unknown(pod: &PodAnnounce) -> Self {
        Self::new(code::POD_UNKNOWN, format!("{} is unknown to the control plane", pod.describe()))
    }
}

impl From<InvalidField> for CniError {
    fn from(e: InvalidField) -> Self {
        Self::new(code::INVALID_CONFIG, e.to_string())
    }
}

/// A field that fails the contract's checks, by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidField {
    InvalidField { field, reason: reason.into() }
}

/// `CNI_CONTAINERID` as the spec allows it: alphanumerics, `_`, `.`, `-`, starting
/// with an alphanumeric; at most 256 bytes here.
pub fn check_container_id(id: &str) -> Result<(), InvalidField> {
    const FIELD: &str = "container_id";
    if id.is_empty() {
        return Err(invalid(FIELD, "empty"));
    }
    if id.len() > 256 {
        return Err(invalid(FIELD, format!("{} bytes, at most 256", id.len())));
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric()
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(invalid(
            FIELD,
            format!("{id:?} is not alphanumerics, '_', '.', '-' starting alphanumeric"),
        ));
    }
    Ok(())
}

/// A network namespace path: absolute, without `..`, NUL or newline, at most 4096 bytes.
pub fn check_netns(field: &'static str, path: &str) -> Result<(), InvalidField> {
    if path.is_empty() {
        return Err(invalid(field, "empty"));
    }
    if path.len() > 4096 {
        return Err(invalid(field, "longer than 4096 bytes"));
    }
    if !path.starts_with('/') {
        return Err(invalid(field, format!("{path:?} is not an absolute path")));
    }
    if path.bytes().any(|b| b == 0 || b == b'\n') || path.split('/').any(|c| c == "..") {
        return Err(invalid(field, format!("{path:?} has a NUL, newline or '..'")));
    }
    Ok(())
}

/// A Linux interface name: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn check_ifname(name: &str) -> Result<(), InvalidField> {
    const FIELD: &str = "ifname";
    if name.is_empty() || name.len() > 15 {
        return Err(invalid(FIELD, format!("{name:?} must be 1 to 15 bytes")));
    }
    if name == "." || name == ".." || name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(invalid(FIELD, format!("{name:?} is not an interface name")));
    }
    Ok(())
}

/// Kubernetes object names: lowercase alphanumerics, `-` and `.`, at most 253 bytes.
fn check_k8s_name(field: &'static str, value: &str) -> Result<(), InvalidField> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(invalid(field, format!("{value:?} is not a Kubernetes name"))) }
}

impl PodRef {
    /// Namespace and name are Kubernetes names; the uid is at most 128 alphanumerics or `-`.
    pub fn check(&self) -> Result<(), InvalidField> {
        check_k8s_name("pod.namespace", &self.namespace)?;
        check_k8s_name("pod.name", &self.name)?;
        if let Some(uid) = &self.uid
            && (uid.is_empty()
                || uid.len() > 128
                || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(invalid("pod.uid", format!("{uid:?} is not a pod UID")));
        }
        Ok(())
    }
}

impl PodAnnounce {
    /// Everything the agent relies on: the checks above, 1 to [`MAX_IPS`] distinct addresses.
    pub fn check(&self) -> Result<(), InvalidField> {
        check_container_id(&self.container_id)?;
        check_netns("netns", &self.netns)?;
        check_ifname(&self.ifname)?;
        if let Some(pod) = &self.pod {
            pod.check()?;
        }
        if self.ips.is_empty() {
            return Err(invalid(
                "ips",
                "empty: the pod network's result (prevResult) gave the pod no address",
            ));
        }
        if self.ips.len() > MAX_IPS {
            return Err(invalid("ips", format!("{} addresses, at most {MAX_IPS}", self.ips.len())));
        }
        if self.ips.iter().collect::<BTreeSet<_>>().len() != self.ips.len() {
            return Err(invalid("ips", "an address is repeated"));
        }
        Ok(())
    }

    /// The fields in which `other` differs from `self` (addresses compared as sets).
    /// Empty means a repeated ADD of the same pod, which the agent answers as the first.
    pub fn differences(&self, other: &PodAnnounce) -> Vec<&'static str> {
        self.differences_shown(other).into_iter().map(|(field, _)| field).collect()
    }

    /// [`Self::differences`], each with both values (`self`'s first), for error
    /// messages that say what differs, not only where.
    pub fn differences_shown(&self, other: &PodAnnounce) -> Vec<(&'static str, String)> {
        let shown = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?} vs {b:?}");
        let mut out = Vec::new();
        if self.container_id != other.container_id {
            out.push(("container_id", shown(&self.container_id, &other.container_id)));
        }
        if self.netns != other.netns {
            out.push(("netns", shown(&self.netns, &other.netns)));
        }
        if self.ifname != other.ifname {
            out.push(("ifname", shown(&self.ifname, &other.ifname)));
        }
        if self.pod != other.pod {
            let name = |p: &Option<PodRef>| p.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
            out.push(("pod", format!("{} vs {}", name(&self.pod), name(&other.pod))));
        }
        let (mine, theirs): (BTreeSet<_>, BTreeSet<_>) =
            (self.ips.iter().collect(), other.ips.iter().collect());
        if mine != theirs {
            let list =
                |ips: &BTreeSet<&IpAddr>| ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            out.push(("ips", format!("{} vs {}", list(&mine), list(&theirs))));
        }
        out
    }

    /// `namespace/name`, or the container id for a container outside Kubernetes.
    pub fn describe(&self) -> String {
        self.pod.as_ref().map_or_else(|| format!("container {}", self.container_id), |p| format!("pod {p}"))
    }
}

impl PodRelease {
    pub fn check(&self) -> Result<(), InvalidField> {
        check_container_id(&self.container_id)?;
        if let Some(netns) = &self.netns {
            check_netns("netns", netns)?;
        }
        if let Some(pod) = &self.pod {
            pod.check()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodAnnounce {
        PodAnnounce {
            container_id: "0f3c9a".into(),
            netns: "/var/run/netns/cni-1234".into(),
            ifname: "eth0".into(),
            pod: Some(PodRef { namespace: "shop".into(), name: "web-0".into(), uid: Some("a-1".into()) }),
            ips: vec!["10.88.0.5".parse().unwrap(), "fd88::5".parse().unwrap()],
        }
    }

    #[test]
    fn a_runtime_announcement_passes() {
        pod().check().unwrap();
        let mut p = pod();
        p.pod = None;
        p.check().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut PodAnnounce)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("container_id", Box::new(|p| p.container_id = String::new())),
            ("container_id", Box::new(|p| p.container_id = "-abc".into())),
            ("container_id", Box::new(|p| p.container_id = "a/b".into())),
            ("container_id", Box::new(|p| p.container_id = "a".repeat(257))),
            ("netns", Box::new(|p| p.netns = "netns/x".into())),
            ("netns", Box::new(|p| p.netns = "/var/run/netns/../../etc".into())),
            ("netns", Box::new(|p| p.netns = String::new())),
            ("ifname", Box::new(|p| p.ifname = "a-very-long-ifname".into())),
            ("ifname", Box::new(|p| p.ifname = "eth 0".into())),
            ("pod.namespace", Box::new(|p| p.pod.as_mut().unwrap().namespace = "Shop".into())),
            ("pod.name", Box::new(|p| p.pod.as_mut().unwrap().name = String::new())),
            ("pod.uid", Box::new(|p| p.pod.as_mut().unwrap().uid = Some("x;y".into()))),
            ("ips", Box::new(|p| p.ips.clear())),
            ("ips", Box::new(|p| p.ips.push("10.88.0.5".parse().unwrap()))),
            ("ips", Box::new(|p| p.ips = (1..=17u8).map(|i| IpAddr::from([10, 0, 0, i])).collect())),
        ];
        for (field, mutate) in cases {
            let mut p = pod();
            mutate(&mut p);
            let e = p.check().unwrap_err();
            assert_eq!(e.field, field, "{e}");
            let cni: CniError = e.into();
            assert_eq!(cni.code, code::INVALID_CONFIG);
            assert!(cni.msg.starts_with(field), "{}", cni.msg);
        }
    }

    #[test]
    fn a_repeated_announcement_differs_in_nothing_even_with_addresses_reordered() {
        let a = pod();
        let mut b = pod();
        b.ips.reverse();
        assert!(a.differences(&b).is_empty());
        b.netns = "/var/run/netns/other".into();
        b.ips.pop();
        assert_eq!(a.differences(&b), ["netns", "ips"]);
    }

    #[test]
    fn wire_shape_is_stable() {
        let v = serde_json::to_value(pod()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "container_id": "0f3c9a", "netns": "/var/run/netns/cni-1234", "ifname": "eth0",
                "pod": {"namespace": "shop", "name": "web-0", "uid": "a-1"},
                "ips": ["10.88.0.5", "fd88::5"]
            })
        );
        let e: CniError = serde_json::from_str(r#"{"code":100,"msg":"m"}"#).unwrap();
        assert_eq!(e.to_string(), "m");
        assert_eq!(e.with_details("d").to_string(), "m: d");
    }
}

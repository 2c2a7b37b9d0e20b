//! The CNI specification as far as a chained plugin needs it: the network
//! configuration on stdin (with `mesh-cni`'s own fields checked by name), the
//! `prevResult` it passes through, the pod addresses in it, and the version and
//! error results it prints.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde_json::{Value, value::RawValue};

use crate::contract::{CniError, check_netns, code};

/// The `type` of the plugin in a conflist, and the binary's name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "mesh-cni";
/// Spec versions whose configuration and results this plugin understands. A chained
/// plugin that passes `prevResult` through needs nothing version-specific besides
/// reading the addresses, whose shape is the same from 0.3.0 on.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version used for answers before the configuration's own is known.
pub const DEFAULT_VERSION: &str = "1.0.0";

/// Where the node agent listens for CNI requests unless `agentSocket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/mesh/agent.sock";
/// How long the plugin waits for the agent unless `timeoutSeconds` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `timeoutSeconds` accepted: the runtime has its own deadline for the
/// whole sandbox (2 minutes in the kubelet), and a stuck agent must not use it up.
pub const MAX_TIMEOUT_SECONDS: f64 = 60.0;
/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `mesh-cni`'s own fields of the network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// `agentSocket`: the agent's root-only unix socket.
    pub agent_socket: PathBuf,
    /// `timeoutSeconds`: how long to wait for the agent's answer.
    pub timeout: Duration,
    /// `excludeNamespaces`: pods in these namespaces are passed through without the
    /// agent (the mesh's own namespace, kube-system: they must start while the mesh
    /// is not up yet).
    pub exclude_namespaces: Vec<String>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            agent_socket: PathBuf::from(DEFAULT_AGENT_SOCKET),
            timeout: DEFAULT_TIMEOUT,
            exclude_namespaces: Vec::new(),
        }
    }
}

/// The network configuration a runtime hands a plugin on stdin.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The previous plugin's result, byte for byte, to print unchanged.
    pub prev_result: Option<Box<RawValue>>,
    pub plugin: PluginConfig,
}

fn config_error(field: &str, reason: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_CONFIG, format!("network configuration field {field}: {reason}"))
}

impl NetConf {
    /// Parses and checks stdin. Unknown fields are ignored (the runtime adds some, and
    /// `args` may carry anything); `mesh-cni`'s own are checked and named when wrong.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        #[derive(serde::Deserialize)]
        struct Raw<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: Option<Value>,
            name: Option<Value>,
            #[serde(rename = "prevResult", borrow)]
            prev_result: Option<&'a RawValue>,
            #[serde(rename = "agentSocket")]
            agent_socket: Option<Value>,
            #[serde(rename = "timeoutSeconds")]
            timeout_seconds: Option<Value>,
            #[serde(rename = "excludeNamespaces")]
            exclude_namespaces: Option<Value>,
        }
        let raw: Raw<'_> = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(code::DECODE, "the network configuration on stdin is not a JSON object")
                .with_details(e.to_string())
        })?;
        let cni_version = match raw.cni_version {
            Some(Value::String(v)) => v,
            Some(other) => return Err(config_error("cniVersion", format!("{other} is not a string"))),
            None => return Err(config_error("cniVersion", "missing")),
        };
        check_version(&cni_version)?;
        let name = match raw.name {
            Some(Value::String(n)) if !n.is_empty() => n,
            Some(other) => return Err(config_error("name", format!("{other} is not a network name"))),
            None => return Err(config_error("name", "missing")),
        };
        let prev_result = match raw.prev_result {
            Some(r) if r.get().trim() == "null" => None,
            Some(r) if !r.get().trim_start().starts_with('{') => {
                return Err(config_error("prevResult", "is not an object"));
            }
            Some(r) => Some(r.to_owned()),
            None => None,
        };
        let plugin =
            PluginConfig::from_fields(raw.agent_socket, raw.timeout_seconds, raw.exclude_namespaces)?;
        Ok(Self { cni_version, name, prev_result, plugin })
    }

    /// Whether this configuration's version knows CHECK (0.4.0 and later).
    pub fn supports_check(&self) -> bool {
        !matches!(self.cni_version.as_str(), "0.3.0" | "0.3.1")
    }
}

impl PluginConfig {
    /// Builds the plugin's fields from their JSON values, naming the first bad one.
    pub fn from_fields(
        agent_socket: Option<Value>,
        timeout_seconds: Option<Value>,
        exclude_namespaces: Option<Value>,
    ) -> Result<Self, CniError> {
        let mut c = Self::default();
        if let Some(v) = agent_socket {
            let Value::String(path) = v else {
                return Err(config_error("agentSocket", format!("{v} is not a string")));
            };
            check_netns("agentSocket", &path).map_err(|e| config_error("agentSocket", e.reason))?;
            if path.len() > MAX_SOCKET_PATH {
                return Err(config_error(
                    "agentSocket",
                    format!("{} bytes, a unix socket path has at most {MAX_SOCKET_PATH}", path.len()),
                ));
            }
            c.agent_socket = PathBuf::from(path);
        }
        if let Some(v) = timeout_seconds {
            let secs = v.as_f64().filter(|s| *s > 0.0 && *s <= MAX_TIMEOUT_SECONDS).ok_or_else(|| {
                config_error(
                    "timeoutSeconds",
                    format!("{v} must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS}"),
                )
            })?;
            c.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(v) = exclude_namespaces {
            let Value::Array(items) = &v else {
                return Err(config_error("excludeNamespaces", format!("{v} is not a list of namespaces")));
            };
            for (i, item) in items.iter().enumerate() {
                let ns = item.as_str().filter(|s| is_namespace(s)).ok_or_else(|| {
                    config_error(
                        &format!("excludeNamespaces[{i}]"),
                        format!("{item} is not a namespace name"),
                    )
                })?;
                c.exclude_namespaces.push(ns.to_owned());
            }
        }
        Ok(c)
    }

    /// This configuration as the fields of a conflist entry (what the installer writes).
    pub fn to_entry(&self) -> Value {
        let mut entry = serde_json::json!({
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket.to_string_lossy(),
            "timeoutSeconds": self.timeout.as_secs_f64(),
        });
        if !self.exclude_namespaces.is_empty() {
            entry["excludeNamespaces"] = self.exclude_namespaces.clone().into();
        }
        entry
    }
}

/// A DNS label, as Kubernetes namespaces are: 1-63 lowercase alphanumerics or `-`.
fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Error code 1 for a version this plugin does not speak.
pub fn check_version(v: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&v) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {v:?} is not supported (supported: {})", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// The pod's addresses in a result: `ips[].address` without the prefix length,
/// skipping addresses bound to an interface outside the sandbox (a host-side one).
pub fn pod_ips(result: &RawValue) -> Result<Vec<IpAddr>, CniError> {
    let v: Value = serde_json::from_str(result.get())
        .map_err(|e| CniError::new(code::DECODE, "prevResult is not JSON").with_details(e.to_string()))?;
    let interfaces = v["interfaces"].as_array();
    let Some(ips) = v.get("ips") else { return Ok(Vec::new()) };
    let Some(ips) = ips.as_array() else {
        return Err(config_error("prevResult.ips", "is not a list"));
    };
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = format!("prevResult.ips[{i}].address");
        let address = ip["address"].as_str().ok_or_else(|| config_error(&field, "missing"))?;
        let bare = address.split_once('/').map_or(address, |(a, _)| a);
        let addr: IpAddr =
            bare.parse().map_err(|_| config_error(&field, format!("{address:?} is not an IP/prefix")))?;
        if let (Some(idx), Some(interfaces)) = (ip["interface"].as_u64(), interfaces) {
            let sandbox =
                interfaces.get(idx as usize).and_then(|i| i["sandbox"].as_str()).unwrap_or_default();
            if sandbox.is_empty() {
                continue;
            }
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// The CNI error result: `{"cniVersion", "code", "msg", "details"}`.
pub fn error_result(cni_version: &str, e: &CniError) -> String {
    let mut v = serde_json::json!({ "cniVersion": cni_version, "code": e.code, "msg": e.msg });
    if !e.details.is_empty() {
        v["details"] = e.details.clone().into();
    }
    v.to_string()
}

/// The VERSION result, in the version asked for when this plugin speaks it.
pub fn version_result(asked: Option<&str>) -> String {
    let v = asked.filter(|v| SUPPORTED_VERSIONS.contains(v)).unwrap_or(DEFAULT_VERSION);
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Vec<u8> {
        format!(r#"{{"cniVersion":"1.0.0","name":"pods","type":"mesh-cni"{extra}}}"#).into_bytes()
    }

    #[test]
    fn defaults_without_plugin_fields() {
        let c = NetConf::parse(&conf("")).unwrap();
        assert_eq!((c.cni_version.as_str(), c.name.as_str()), ("1.0.0", "pods"));
        assert_eq!(c.plugin, PluginConfig::default());
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn plugin_fields_are_read() {
        let c = NetConf::parse(&conf(
            r#","agentSocket":"/tmp/a.sock","timeoutSeconds":2.5,"excludeNamespaces":["kube-system","mesh-system"],"args":{"x":1}"#,
        ))
        .unwrap();
        assert_eq!(c.plugin.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.plugin.timeout, Duration::from_millis(2500));
        assert_eq!(c.plugin.exclude_namespaces, ["kube-system", "mesh-system"]);
        // The installer writes what the plugin reads back.
        let entry = c.plugin.to_entry();
        let again = PluginConfig::from_fields(
            entry.get("agentSocket").cloned(),
            entry.get("timeoutSeconds").cloned(),
            entry.get("excludeNamespaces").cloned(),
        )
        .unwrap();
        assert_eq!(again, c.plugin);
    }

    #[test]
    fn bad_fields_are_named_with_code_7() {
        for (extra, field) in [
            (r#","agentSocket":"run/agent.sock""#, "agentSocket"),
            (r#","agentSocket":42"#, "agentSocket"),
            (&format!(r#","agentSocket":"/{}""#, "a".repeat(120)), "agentSocket"),
            (r#","timeoutSeconds":0"#, "timeoutSeconds"),
            (r#","timeoutSeconds":"5s""#, "timeoutSeconds"),
            (r#","timeoutSeconds":600"#, "timeoutSeconds"),
            (r#","excludeNamespaces":"kube-system""#, "excludeNamespaces"),
            (r#","excludeNamespaces":["ok","Not_OK"]"#, "excludeNamespaces[1]"),
            (r#","prevResult":[1]"#, "prevResult"),
        ] {
            let e = NetConf::parse(&conf(extra)).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG, "{extra}: {e}");
            assert!(e.msg.contains(&format!("field {field}:")), "{extra}: {}", e.msg);
        }
    }

    #[test]
    fn malformed_json_and_versions_have_their_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"").unwrap_err().code, code::DECODE);
        let e = NetConf::parse(br#"{"cniVersion":"2.0.0","name":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("\"2.0.0\"") && e.msg.contains("1.0.0"), "{}", e.msg);
        let e = NetConf::parse(br#"{"name":"x"}"#).unwrap_err();
        assert!(e.msg.contains("cniVersion: missing"), "{}", e.msg);
        assert!(!NetConf::parse(br#"{"cniVersion":"0.3.1","name":"x"}"#).unwrap().supports_check());
    }

    #[test]
    fn prev_result_is_kept_byte_for_byte() {
        let prev = r#"{"cniVersion":"1.0.0", "zz":1, "ips":[{"address":"10.88.0.2/24","interface":2}]}"#;
        let c = NetConf::parse(&conf(&format!(r#","prevResult":{prev}"#))).unwrap();
        assert_eq!(c.prev_result.unwrap().get(), prev);
    }

    #[test]
    fn pod_ips_come_from_sandbox_interfaces_only() {
        let result: Box<RawValue> = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
                "ips":[{"address":"10.88.0.2/24","gateway":"10.88.0.1","interface":2},
                       {"address":"fd88::2/64","interface":2},
                       {"address":"10.88.0.1/24","interface":0},
                       {"address":"10.99.0.7/32"}]}"#,
        )
        .unwrap();
        let ips: Vec<String> = pod_ips(&result).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.88.0.2", "fd88::2", "10.99.0.7"]);
        let bad: Box<RawValue> = serde_json::from_str(r#"{"ips":[{"address":"banana"}]}"#).unwrap();
        let e = pod_ips(&bad).unwrap_err();
        assert!(e.msg.contains("prevResult.ips[0].address"), "{}", e.msg);
    }

    #[test]
    fn results_have_the_spec_shape() {
        let e = CniError::new(100, "pod x is unknown").with_details("more");
        let v: Value = serde_json::from_str(&error_result("0.4.0", &e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"0.4.0","code":100,"msg":"pod x is unknown","details":"more"})
        );
        let v: Value = serde_json::from_str(&version_result(Some("0.4.0"))).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"], serde_json::json!(SUPPORTED_VERSIONS));
        let v: Value = serde_json::from_str(&version_result(Some("9.9.9"))).unwrap();
        assert_eq!(v["cniVersion"], DEFAULT_VERSION);
    }
}

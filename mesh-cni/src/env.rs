//! The `CNI_*` environment a runtime sets for each plugin call, read through a
//! lookup function (the process environment, or a map in tests) and checked with
//! errors (code 4) that name the variable.

use std::path::PathBuf;

use crate::contract::{CniError, InvalidField, PodRef, check_container_id, check_ifname, check_netns, code};

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
        }
    }
}

/// The call's environment (everything but `CNI_COMMAND=VERSION` needs it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    /// `CNI_NETNS`; may be absent on DEL (the namespace can be gone already).
    pub netns: Option<String>,
    pub ifname: String,
    /// `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID` from `CNI_ARGS`.
    pub pod: Option<PodRef>,
    /// `CNI_PATH`: where the runtime looks for plugins (mesh-cni delegates to none).
    pub path: Vec<PathBuf>,
}

fn env_error(var: &str, reason: impl std::fmt::Display) -> CniError {
    CniError::new(code::INVALID_ENV, format!("{var}: {reason}"))
}

fn named(var: &'static str) -> impl Fn(InvalidField) -> CniError {
    move |e| env_error(var, e.reason)
}

/// Reads `CNI_COMMAND`.
pub fn command(get: &impl Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("VERSION") => Ok(Command::Version),
        Some(other) => Err(env_error(
            "CNI_COMMAND",
            format!("{other:?} is not a command of CNI 1.0.0 (ADD, DEL, CHECK, VERSION)"),
        )),
        None => Err(env_error("CNI_COMMAND", "not set (this binary is a CNI plugin; see `mesh-cni --help`)")),
    }
}

/// Reads the rest of the environment for `command` (not VERSION).
pub fn read(command: Command, get: &impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
    let required = |var: &'static str| {
        get(var)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| env_error(var, format!("not set; {} needs it", command.name())))
    };
    let container_id = required("CNI_CONTAINERID")?;
    check_container_id(&container_id).map_err(named("CNI_CONTAINERID"))?;
    let netns = match command {
        Command::Del => get("CNI_NETNS").filter(|v| !v.is_empty()),
        _ => Some(required("CNI_NETNS").map_err(|e| CniError {
            msg: format!("{}: the pod's network namespace is missing", e.msg),
            ..e
        })?),
    };
    if let Some(netns) = &netns {
        check_netns("netns", netns).map_err(named("CNI_NETNS"))?;
    }
    let ifname = required("CNI_IFNAME")?;
    check_ifname(&ifname).map_err(named("CNI_IFNAME"))?;
    let pod = pod_from_args(get("CNI_ARGS").as_deref().unwrap_or_default())?;
    let path =
        get("CNI_PATH").unwrap_or_default().split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect();
    Ok(CniEnv { container_id, netns, ifname, pod, path })
}

/// `CNI_ARGS` is `KEY=VALUE;KEY=VALUE`; the pod is named by the `K8S_POD_*` keys the
/// kubelet's runtimes pass. Other keys are ignored.
pub fn pod_from_args(args: &str) -> Result<Option<PodRef>, CniError> {
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(env_error("CNI_ARGS", format!("{pair:?} is not KEY=VALUE")));
        };
        match k {
            "K8S_POD_NAMESPACE" => namespace = Some(v.to_owned()),
            "K8S_POD_NAME" => name = Some(v.to_owned()),
            "K8S_POD_UID" => uid = Some(v.to_owned()).filter(|u| !u.is_empty()),
            _ => {}
        }
    }
    let pod = match (namespace, name) {
        (None, None) => return Ok(None),
        (Some(namespace), Some(name)) => PodRef { namespace, name, uid },
        (Some(_), None) => return Err(env_error("CNI_ARGS", "K8S_POD_NAMESPACE without K8S_POD_NAME")),
        (None, Some(_)) => return Err(env_error("CNI_ARGS", "K8S_POD_NAME without K8S_POD_NAMESPACE")),
    };
    pod.check().map_err(|e| {
        let key = match e.field {
            "pod.namespace" => "K8S_POD_NAMESPACE",
            "pod.name" => "K8S_POD_NAME",
            _ => "K8S_POD_UID",
        };
        env_error("CNI_ARGS", format!("{key}: {}", e.reason))
    })?;
    Ok(Some(pod))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
        ),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];

    #[test]
    fn a_kubelet_call_is_read() {
        let get = lookup(ADD);
        assert_eq!(command(&get).unwrap(), Command::Add);
        let env = read(Command::Add, &get).unwrap();
        assert_eq!(env.container_id, "abc123");
        assert_eq!(env.netns.as_deref(), Some("/var/run/netns/cni-1"));
        assert_eq!(env.pod.as_ref().unwrap().to_string(), "shop/web-0");
        assert_eq!(env.pod.unwrap().uid.as_deref(), Some("u-1"));
        assert_eq!(env.path, [PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]);
    }

    #[test]
    fn missing_or_bad_variables_are_named_with_code_4() {
        let without =
            |var: &str| -> Vec<(&str, &str)> { ADD.iter().copied().filter(|(k, _)| *k != var).collect() };
        let with = |var: &'static str, value: &'static str| -> Vec<(&'static str, &'static str)> {
            ADD.iter().map(|&(k, v)| if k == var { (k, value) } else { (k, v) }).collect()
        };
        let cases = vec![
            (
                without("CNI_NETNS"),
                "CNI_NETNS: not set; ADD needs it: the pod's network namespace is missing",
            ),
            (without("CNI_CONTAINERID"), "CNI_CONTAINERID: not set"),
            (without("CNI_IFNAME"), "CNI_IFNAME: not set"),
            (with("CNI_NETNS", "netns/x"), "CNI_NETNS: \"netns/x\" is not an absolute path"),
            (with("CNI_CONTAINERID", "../x"), "CNI_CONTAINERID:"),
            (with("CNI_IFNAME", "eth0:1"), "CNI_IFNAME:"),
            (with("CNI_ARGS", "K8S_POD_NAME=web"), "CNI_ARGS: K8S_POD_NAME without K8S_POD_NAMESPACE"),
            (with("CNI_ARGS", "K8S_POD_NAMESPACE=Shop;K8S_POD_NAME=w"), "CNI_ARGS: K8S_POD_NAMESPACE:"),
            (with("CNI_ARGS", "garbage"), "CNI_ARGS: \"garbage\" is not KEY=VALUE"),
        ];
        for (vars, want) in cases {
            let e = read(Command::Add, &lookup(&vars)).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(e.msg.starts_with(want), "want {want:?}, got {:?}", e.msg);
        }
        let e = command(&lookup(&[("CNI_COMMAND", "GC")])).unwrap_err();
        assert!(e.msg.starts_with("CNI_COMMAND: \"GC\""), "{}", e.msg);
        assert!(command(&lookup(&[])).unwrap_err().msg.starts_with("CNI_COMMAND: not set"));
    }

    #[test]
    fn del_works_without_netns_or_pod() {
        let vars = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")];
        let env = read(Command::Del, &lookup(&vars)).unwrap();
        assert_eq!((env.netns, env.pod), (None, None));
    }
}

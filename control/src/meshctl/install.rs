//! `meshctl install`: the manifests of `deploy/` (embedded when meshctl is built, so
//! they match its release), shaped by a profile and `--set` overrides, printed as
//! one YAML stream for `kubectl apply -f -`.
//!
//! It does what `deploy/kustomization.yaml` does (namespace, the `part-of` label,
//! image tags pinned to the release), so both ways install the same objects, then:
//!
//! - `minimal`: as `deploy/` is: one control-plane replica, the agent DaemonSet with
//!   its CNI installer;
//! - `production`: two control-plane replicas spread over nodes, a
//!   PodDisruptionBudget keeping one up through node drains, the control plane at
//!   `system-cluster-critical` priority, and larger resource requests.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::error::MeshctlError;

/// The manifests, in the order `deploy/kustomization.yaml` lists them.
const MANIFESTS: &[(&str, &str)] = &[
    ("namespace.yaml", include_str!("../../../deploy/namespace.yaml")),
    ("control-plane/serviceaccount.yaml", include_str!("../../../deploy/control-plane/serviceaccount.yaml")),
    ("control-plane/rbac.yaml", include_str!("../../../deploy/control-plane/rbac.yaml")),
    ("control-plane/deployment.yaml", include_str!("../../../deploy/control-plane/deployment.yaml")),
    ("control-plane/service.yaml", include_str!("../../../deploy/control-plane/service.yaml")),
    ("agent/serviceaccount.yaml", include_str!("../../../deploy/agent/serviceaccount.yaml")),
    ("agent/daemonset.yaml", include_str!("../../../deploy/agent/daemonset.yaml")),
];

/// The kustomization the list above must follow (checked by a test).
#[cfg(test)]
const KUSTOMIZATION: &str = include_str!("../../../deploy/kustomization.yaml");

const NAMESPACE: &str = "mesh-system";
const RELEASE: &str = env!("CARGO_PKG_VERSION");

/// An installation profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Minimal,
    Production,
}

/// What `--set` may change, with the values it takes (shown in errors and help).
pub const SETTABLE: &[(&str, &str)] = &[
    ("image.registry", "a registry prefix for both images, e.g. ghcr.io/acme"),
    ("image.tag", "the images' tag (default: this meshctl's release)"),
    ("controlPlane.replicas", "a number from 1"),
    ("agent.mode", "auto, ebpf or iptables"),
    ("trustDomain", "the mesh's SPIFFE trust domain"),
    ("clusterDomain", "the cluster's DNS domain"),
    ("mtlsDefault", "permissive or strict"),
];

/// The overrides, checked.
#[derive(Debug, Default, Clone)]
struct Overrides(BTreeMap<String, String>);

impl Overrides {
    fn parse(sets: &[String]) -> Result<Self, MeshctlError> {
        let mut out = BTreeMap::new();
        for set in sets {
            let (key, value) =
                set.split_once('=').ok_or_else(|| usage(format!("--set {set:?}: expected KEY=VALUE")))?;
            let (key, value) = (key.trim(), value.trim());
            let Some((_, what)) = SETTABLE.iter().find(|(k, _)| *k == key) else {
                let known: Vec<&str> = SETTABLE.iter().map(|(k, _)| *k).collect();
                return Err(usage(format!("--set {key}: unknown key; known: {}", known.join(", "))));
            };
            let ok = match key {
                "controlPlane.replicas" => value.parse::<u32>().is_ok_and(|n| n >= 1),
                "agent.mode" => matches!(value, "auto" | "ebpf" | "iptables"),
                "mtlsDefault" => matches!(value, "permissive" | "strict"),
                "image.tag" => {
                    !value.is_empty()
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                }
                "image.registry" => {
                    !value.is_empty() && !value.contains(char::is_whitespace) && !value.ends_with('/')
                }
                _ => {
                    !value.is_empty()
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
                }
            };
            if !ok {
                return Err(usage(format!("--set {key}={value:?}: expected {what}")));
            }
            out.insert(key.to_owned(), value.to_owned());
        }
        Ok(Self(out))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

fn usage(msg: String) -> MeshctlError {
    MeshctlError::Usage(msg)
}

/// The manifests for `profile` with `sets` applied, as one YAML stream.
pub fn render(profile: Profile, sets: &[String]) -> Result<String, MeshctlError> {
    let docs = objects(profile, sets)?;
    let mut out = format!(
        "# meshctl {RELEASE} install --profile {}: apply with `kubectl apply -f -`\n",
        match profile {
            Profile::Minimal => "minimal",
            Profile::Production => "production",
        }
    );
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc).map_err(|e| usage(format!("rendering: {e}")))?);
    }
    Ok(out)
}

/// The objects, before printing.
pub fn objects(profile: Profile, sets: &[String]) -> Result<Vec<Value>, MeshctlError> {
    let overrides = Overrides::parse(sets)?;
    let mut docs = Vec::new();
    for (file, text) in MANIFESTS {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let value = serde::Deserialize::deserialize(doc)
                .map_err(|e| usage(format!("embedded deploy/{file} does not parse: {e}")))?;
            if value != Value::Null {
                docs.push(value);
            }
        }
    }
    if profile == Profile::Production {
        docs.push(disruption_budget());
    }
    for doc in &mut docs {
        kustomize(doc);
        if profile == Profile::Production {
            production(doc);
        }
        apply(doc, &overrides);
    }
    Ok(docs)
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

/// What the kustomization does: the namespace, the `part-of` label, pinned tags.
fn kustomize(doc: &mut Value) {
    if !matches!(kind(doc), "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
        doc["metadata"]["namespace"] = json!(NAMESPACE);
    }
    doc["metadata"]["labels"]["app.kubernetes.io/part-of"] = json!("mesh");
    for c in containers_mut(doc) {
        if let Some(image) = c["image"].as_str()
            && matches!(image, "mesh-agent" | "mesh-control")
        {
            c["image"] = json!(format!("{image}:{RELEASE}"));
        }
    }
}

fn disruption_budget() -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "mesh-control", "labels": {"app.kubernetes.io/name": "mesh-control"}},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app.kubernetes.io/name": "mesh-control"}}},
    })
}

fn production(doc: &mut Value) {
    match (kind(doc), name(doc)) {
        ("Deployment", "mesh-control") => {
            doc["spec"]["replicas"] = json!(2);
            let pod = &mut doc["spec"]["template"]["spec"];
            pod["priorityClassName"] = json!("system-cluster-critical");
            pod["affinity"] = json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mesh-control"}},
                },
            }]}});
            for c in containers_mut(doc) {
                if c["name"] == "mesh-control" {
                    c["resources"]["requests"] = json!({"cpu": "500m", "memory": "256Mi"});
                    c["resources"]["limits"]["memory"] = json!("1Gi");
                }
            }
        }
        ("DaemonSet", "mesh-agent") => {
            for c in containers_mut(doc) {
                if c["name"] == "mesh-agent" {
                    c["resources"]["requests"] = json!({"cpu": "250m", "memory": "128Mi"});
                    c["resources"]["limits"]["memory"] = json!("512Mi");
                }
            }
        }
        _ => {}
    }
}

fn apply(doc: &mut Value, o: &Overrides) {
    if let Some(n) = o.get("controlPlane.replicas")
        && kind(doc) == "Deployment"
        && name(doc) == "mesh-control"
    {
        doc["spec"]["replicas"] = json!(n.parse::<u32>().unwrap_or(1));
    }
    let (registry, tag) = (o.get("image.registry"), o.get("image.tag"));
    for c in containers_mut(doc) {
        let Some(image) = c["image"].as_str().map(str::to_owned) else { continue };
        let Some((repo, current)) = image.split_once(':') else { continue };
        if !matches!(repo, "mesh-agent" | "mesh-control") {
            continue;
        }
        let repo = registry.map_or(repo.to_owned(), |r| format!("{r}/{repo}"));
        c["image"] = json!(format!("{repo}:{}", tag.unwrap_or(current)));
        let flags: &[(&str, &str)] = match c["name"].as_str().unwrap_or_default() {
            "mesh-agent" => &[("agent.mode", "--mode")],
            "mesh-control" => &[
                ("trustDomain", "--trust-domain"),
                ("clusterDomain", "--cluster-domain"),
                ("mtlsDefault", "--mtls-default"),
            ],
            _ => &[],
        };
        for (key, flag) in flags {
            if let Some(value) = o.get(key) {
                set_flag(c, flag, value);
            }
        }
    }
}

/// Replaces `--flag=...` in the container's args, or appends it.
fn set_flag(container: &mut Value, flag: &str, value: &str) {
    let arg = json!(format!("{flag}={value}"));
    let Some(args) = container["args"].as_array_mut() else {
        container["args"] = json!([arg]);
        return;
    };
    let prefix = format!("{flag}=");
    match args.iter_mut().find(|a| a.as_str().is_some_and(|s| s.starts_with(&prefix))) {
        Some(existing) => *existing = arg,
        None => args.push(arg),
    }
}

/// The containers of a workload's pod template; none for other kinds (looked up
/// without indexing, which would add the missing keys).
fn containers_mut(doc: &mut Value) -> Vec<&mut Value> {
    let pod = doc.get_mut("spec").and_then(|s| s.get_mut("template")).and_then(|t| t.get_mut("spec"));
    let mut out = Vec::new();
    if let Some(Value::Object(pod)) = pod {
        for (key, list) in pod.iter_mut() {
            if key == "containers" || key == "initContainers" {
                out.extend(list.as_array_mut().into_iter().flatten());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(docs: &'a [Value], kind_: &str, name_: &str) -> &'a Value {
        docs.iter()
            .find(|d| kind(d) == kind_ && name(d) == name_)
            .unwrap_or_else(|| panic!("no {kind_}/{name_}"))
    }

    fn container<'a>(doc: &'a Value, name_: &str) -> &'a Value {
        doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name_)
            .unwrap()
    }

    fn args(c: &Value) -> Vec<&str> {
        c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect()
    }

    #[test]
    fn the_embedded_list_is_the_kustomizations() {
        let k: Value = serde_yaml_ng::from_str(KUSTOMIZATION).unwrap();
        let listed: Vec<&str> = k["resources"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        let embedded: Vec<&str> = MANIFESTS.iter().map(|(f, _)| *f).collect();
        assert_eq!(embedded, listed);
        for image in k["images"].as_array().unwrap() {
            assert_eq!(image["newTag"], RELEASE, "{image}");
        }
    }

    #[test]
    fn minimal_is_the_kustomization_and_fits_the_kubernetes_schema() {
        let docs = objects(Profile::Minimal, &[]).unwrap();
        assert!(docs.iter().all(|d| d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mesh"));
        let control = find(&docs, "Deployment", "mesh-control");
        assert_eq!(
            (control["spec"]["replicas"].as_u64(), control["metadata"]["namespace"].as_str()),
            (Some(1), Some(NAMESPACE))
        );
        assert_eq!(container(control, "mesh-control")["image"], format!("mesh-control:{RELEASE}"));
        assert!(docs.iter().all(|d| kind(d) != "PodDisruptionBudget"));
        fits_schema(&docs);
    }

    #[test]
    fn production_adds_replicas_a_budget_spread_and_resources() {
        let docs = objects(Profile::Production, &[]).unwrap();
        let control = find(&docs, "Deployment", "mesh-control");
        assert_eq!(control["spec"]["replicas"], 2);
        let pdb = find(&docs, "PodDisruptionBudget", "mesh-control");
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"], control["spec"]["template"]["metadata"]["labels"],
            "the budget selects the control plane's pods"
        );
        assert_eq!(pdb["metadata"]["namespace"], NAMESPACE);
        assert_eq!(control["spec"]["template"]["spec"]["priorityClassName"], "system-cluster-critical");
        let agent = find(&docs, "DaemonSet", "mesh-agent");
        assert_eq!(container(agent, "mesh-agent")["resources"]["requests"]["cpu"], "250m");
        assert!(
            agent["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "mesh-cni-install")
        );
        fits_schema(&docs);
    }

    #[test]
    fn set_overrides_images_replicas_and_flags() {
        let sets: Vec<String> = [
            "image.registry=ghcr.io/acme",
            "image.tag=1.2.3",
            "controlPlane.replicas=3",
            "agent.mode=iptables",
            "trustDomain=prod.example",
            "mtlsDefault=strict",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let docs = objects(Profile::Production, &sets).unwrap();
        let control = find(&docs, "Deployment", "mesh-control");
        assert_eq!(control["spec"]["replicas"], 3, "--set wins over the profile");
        let c = container(control, "mesh-control");
        assert_eq!(c["image"], "ghcr.io/acme/mesh-control:1.2.3");
        let a = args(c);
        assert!(
            a.contains(&"--trust-domain=prod.example") && !a.contains(&"--trust-domain=cluster.local"),
            "{a:?}"
        );
        assert!(a.contains(&"--mtls-default=strict"), "{a:?}");
        let agent = find(&docs, "DaemonSet", "mesh-agent");
        let c = container(agent, "mesh-agent");
        assert_eq!(c["image"], "ghcr.io/acme/mesh-agent:1.2.3");
        assert!(args(c).contains(&"--mode=iptables") && !args(c).contains(&"--mode=auto"), "{:?}", args(c));
        let text = render(Profile::Production, &sets).unwrap();
        assert!(
            text.contains("ghcr.io/acme/mesh-agent:1.2.3") && text.matches("\n---\n").count() >= 8,
            "{text}"
        );
    }

    #[test]
    fn bad_sets_name_the_key_and_what_it_takes() {
        for (set, want) in [
            ("replicas=2", "unknown key; known: image.registry"),
            ("controlPlane.replicas=0", "controlPlane.replicas=\"0\": expected a number from 1"),
            ("agent.mode=kernel", "expected auto, ebpf or iptables"),
            ("image.tag=", "expected the images' tag"),
            ("novalue", "expected KEY=VALUE"),
        ] {
            let err = objects(Profile::Minimal, &[set.to_owned()]).unwrap_err().to_string();
            assert!(err.contains(want), "{set}: {err}");
        }
    }

    /// Every object deserializes into its Kubernetes type without losing a field.
    fn fits_schema(docs: &[Value]) {
        use k8s_openapi::api::{
            apps::v1::{DaemonSet, Deployment},
            core::v1::{Namespace, Service, ServiceAccount},
            policy::v1::PodDisruptionBudget,
            rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
        };
        fn same<T: serde::de::DeserializeOwned + serde::Serialize>(d: &Value) {
            let typed: T = serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{}: {e}", name(d)));
            let back = serde_json::to_value(typed).unwrap();
            assert_eq!(strip_nulls(d.clone()), strip_nulls(back), "{} {} lost fields", kind(d), name(d));
        }
        for d in docs {
            match kind(d) {
                "Namespace" => same::<Namespace>(d),
                "ServiceAccount" => same::<ServiceAccount>(d),
                "Service" => same::<Service>(d),
                "ClusterRole" => same::<ClusterRole>(d),
                "ClusterRoleBinding" => same::<ClusterRoleBinding>(d),
                "Role" => same::<Role>(d),
                "RoleBinding" => same::<RoleBinding>(d),
                "Deployment" => same::<Deployment>(d),
                "DaemonSet" => same::<DaemonSet>(d),
                "PodDisruptionBudget" => same::<PodDisruptionBudget>(d),
                other => panic!("no schema for {other}"),
            }
        }
    }

    fn strip_nulls(v: Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, strip_nulls(v))).collect(),
            ),
            Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
            other => other,
        }
    }
}

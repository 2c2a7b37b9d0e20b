//! Validates `deploy/`: every manifest parses and carries the fields its kind needs,
//! privileges are exactly the documented ones, every `--flag` a container passes to a
//! mesh binary exists in that binary's `--help`, the kustomizations list every file,
//! and the Dockerfiles build the binaries the manifests run. Needs no root and no
//! cluster; builds `mesh-agent`, `mesh-control` and `mesh-cni` to ask them for their flags.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde::Deserialize;
use serde_json::Value;

/// Capabilities each container may add, by `Kind/name` and container name: the one
/// place they are documented for the test (reasons in the manifests' comments). A
/// container not listed may add none, and every mesh container drops ALL.
const CAPABILITIES: &[(&str, &str, &[&str])] = &[
    // BPF: load programs and maps; NET_ADMIN: attach cgroup socket and sk_lookup
    // programs, pods' iptables rules, SO_MARK; SYS_ADMIN: setns into pods' namespaces.
    ("DaemonSet/mesh-agent", "mesh-agent", &["BPF", "NET_ADMIN", "SYS_ADMIN"]),
    // Installs the pod's iptables rules, then exits.
    ("Deployment/echo", "mesh-iptables", &["NET_ADMIN"]),
    // SO_MARK on the sidecar's own sockets (CAP_NET_ADMIN before Linux 5.17).
    ("Deployment/echo", "mesh-agent", &["NET_ADMIN"]),
];

/// Host paths each workload may mount: the cgroup tree, bpffs (pinned interception),
/// the agent's socket and state dir, the pods' network namespaces, and the CNI dirs the
/// installer writes.
const HOST_PATHS: &[(&str, &[&str])] = &[(
    "DaemonSet/mesh-agent",
    &["/sys/fs/cgroup", "/sys/fs/bpf", "/run/mesh", "/run/netns", "/opt/cni/bin", "/etc/cni/net.d"],
)];

/// Workloads that share the node's network namespace.
const HOST_NETWORK: &[&str] = &["DaemonSet/mesh-agent"];

/// Mesh images: the Dockerfile's package and the binary its ENTRYPOINT runs.
const IMAGES: &[(&str, &str)] = &[("mesh-agent", "mesh-agent"), ("mesh-control", "control")];

/// Other binaries an image carries, run through `command`: (image, binary, package).
const EXTRA_BINARIES: &[(&str, &str, &str)] = &[("mesh-agent", "mesh-cni", "mesh-cni")];

/// The one API call outside get/list/watch the control plane may make.
const TOKEN_REVIEW: (&str, &str, &str) = ("authentication.k8s.io", "tokenreviews", "create");

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

/// Prometheus's own files (alerting rules and their unit tests), not Kubernetes
/// manifests: checked by [`alert_rules_pass_promtool_and_each_alert_has_a_firing_test`].
fn prometheus_dir() -> PathBuf {
    deploy_dir().join("prometheus")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path == prometheus_dir() {
            continue;
        }
        if path.is_dir() {
            walk(&path, out);
        } else if is_yaml(&path) {
            out.push(path);
        }
    }
}

/// Every YAML file under deploy/, sorted.
fn yaml_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    files.sort();
    files
}

/// A parsed document, with the file it came from.
#[derive(Debug, Clone)]
struct Doc {
    file: PathBuf,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
    fn rel(&self) -> String {
        self.file.strip_prefix(deploy_dir()).unwrap_or(&self.file).display().to_string()
    }
    /// The pod template spec of a workload.
    fn pod(&self) -> Option<&Value> {
        matches!(self.kind(), "Deployment" | "DaemonSet" | "StatefulSet" | "Job")
            .then(|| &self.value["spec"]["template"]["spec"])
    }
}

fn parse_all(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, d)| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Every manifest document (kustomization files excluded).
fn docs() -> &'static [Doc] {
    static DOCS: OnceLock<Vec<Doc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        yaml_files()
            .into_iter()
            .filter(|f| !is_kustomization(f))
            .flat_map(|file| parse_all(&file).into_iter().map(move |value| Doc { file: file.clone(), value }))
            .collect()
    })
}

fn doc(id: &str) -> &'static Doc {
    docs().iter().find(|d| d.id() == id).unwrap_or_else(|| panic!("no {id} in deploy/"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Containers and init containers of a pod spec, with their kind of slot.
fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"].iter().flat_map(|k| pod[*k].as_array().into_iter().flatten()).collect()
}

/// The image's repository basename: `reg.io/x/mesh-agent:1.0` -> `mesh-agent`.
fn image_name(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(['@', ':']).next().unwrap_or(last)
}

/// The mesh image a container runs, by its entrypoint binary's name.
fn mesh_image(container: &Value) -> Option<&'static str> {
    let image = image_name(container["image"].as_str()?);
    IMAGES.iter().map(|(bin, _)| *bin).find(|b| *b == image)
}

/// The mesh binary a container runs: one its `command` names among those its image
/// carries, else the image's entrypoint.
fn mesh_binary(container: &Value) -> Option<&'static str> {
    let image = mesh_image(container)?;
    let command = strs(&container["command"]);
    let named = command.first().map(|c| c.rsplit('/').next().unwrap_or(c).to_owned());
    let extra = EXTRA_BINARIES
        .iter()
        .filter(|(i, ..)| *i == image)
        .map(|(_, bin, _)| *bin)
        .find(|b| named.as_deref() == Some(*b));
    Some(extra.unwrap_or(image))
}

/// `--name=value` or `--name value` -> (name, value).
fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => match args.get(i + 1).filter(|a| !a.starts_with('-')) {
                    Some(v) => {
                        i += 1;
                        (flag.to_owned(), v.clone())
                    }
                    None => (flag.to_owned(), String::new()),
                },
            };
            out.insert(name, value);
        }
        i += 1;
    }
    out
}

/// Flags and env variables a binary's `--help` lists for a subcommand path.
#[derive(Debug)]
struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

fn help(binary: &str, subcommands: &[String]) -> &'static Help {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<String, &'static Help>>> = OnceLock::new();
    let key = format!("{binary} {}", subcommands.join(" "));
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap();
    if let Some(h) = cache.get(&key) {
        return h;
    }
    let path = match binary {
        "mesh-agent" => mesh_tests::bins::agent(),
        "mesh-control" => mesh_tests::bins::control(),
        "mesh-cni" => mesh_tests::bins::cni(),
        other => panic!("no binary {other}"),
    };
    let out = Command::new(path).args(subcommands).arg("--help").output().expect("run --help");
    assert!(
        out.status.success(),
        "`{key} --help` failed (is that a real subcommand?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut h = Help { flags: BTreeSet::new(), env: BTreeSet::new() };
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('-') {
            // "-o, --output <OUTPUT>  ..." / "--mode <MODE>": the first --word is the flag.
            if let Some(word) = t.split([' ', ',', '=']).find(|w| w.starts_with("--")) {
                h.flags.insert(word.trim_start_matches("--").to_owned());
            }
        }
        let mut rest = line;
        while let Some(i) = rest.find("[env: ") {
            rest = &rest[i + 6..];
            if let Some(end) = rest.find('=') {
                h.env.insert(rest[..end].to_owned());
            }
        }
    }
    assert!(!h.flags.is_empty(), "no flags found in `{key} --help`:\n{text}");
    let leaked: &'static Help = Box::leak(Box::new(h));
    cache.insert(key, leaked);
    leaked
}

/// Every container that runs a mesh binary, with its workload.
fn mesh_containers() -> Vec<(&'static Doc, &'static Value, &'static str)> {
    docs()
        .iter()
        .filter_map(|d| d.pod().map(|p| (d, p)))
        .flat_map(|(d, pod)| {
            containers(pod).into_iter().filter_map(move |c| mesh_binary(c).map(|b| (d, c, b)))
        })
        .collect()
}

fn container<'a>(d: &'a Doc, name: &str) -> &'a Value {
    let pod = d.pod().unwrap_or_else(|| panic!("{} has no pod template", d.id()));
    containers(pod)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{}: no container {name}", d.id()))
}

fn args_of(c: &Value) -> Vec<String> {
    strs(&c["args"])
}

#[test]
fn every_document_parses_and_names_itself() {
    assert!(docs().len() >= 8, "expected the mesh's manifests, found {}", docs().len());
    let mut seen = BTreeSet::new();
    for d in docs() {
        let v = &d.value;
        for field in ["apiVersion", "kind"] {
            assert!(v[field].as_str().is_some_and(|s| !s.is_empty()), "{}: {field} missing", d.rel());
        }
        assert!(!d.name().is_empty(), "{}: {} without metadata.name", d.rel(), d.kind());
        let ns = v["metadata"]["namespace"].as_str().unwrap_or_default();
        assert!(seen.insert((d.id(), ns.to_owned())), "{}: {} declared twice", d.rel(), d.id());
    }
}

/// Paths in `original` that `round_trip` lacks or changes (a field the schema does not know).
fn lost_fields(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        _ => out.push(format!("{path}: {original} became {round_trip}")),
    }
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(d: &Doc) -> Value {
    let typed: T = serde_json::from_value(d.value.clone())
        .unwrap_or_else(|e| panic!("{}: {} does not fit the Kubernetes schema: {e}", d.rel(), d.id()));
    serde_json::to_value(typed).unwrap()
}

#[test]
fn every_field_is_known_to_the_kubernetes_schema() {
    use k8s_openapi::api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Namespace, Secret, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    };
    for d in docs() {
        let typed = match d.kind() {
            "Namespace" => round_trip::<Namespace>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "Secret" => round_trip::<Secret>(d),
            "Service" => round_trip::<Service>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "Role" => round_trip::<Role>(d),
            "RoleBinding" => round_trip::<RoleBinding>(d),
            "Deployment" => round_trip::<Deployment>(d),
            "DaemonSet" => round_trip::<DaemonSet>(d),
            other => panic!("{}: add {other} to this test's schema table", d.rel()),
        };
        let mut lost = Vec::new();
        lost_fields(&d.value, &typed, "", &mut lost);
        assert!(lost.is_empty(), "{}: {} has fields Kubernetes would ignore: {lost:?}", d.rel(), d.id());
    }
}

#[test]
fn workloads_select_their_pods_and_size_every_container() {
    let workloads: Vec<_> = docs().iter().filter(|d| d.pod().is_some()).collect();
    assert!(workloads.len() >= 3, "control plane, agent and fallback example expected");
    for d in workloads {
        let selector = d.value["spec"]["selector"]["matchLabels"].as_object();
        let selector =
            selector.filter(|s| !s.is_empty()).unwrap_or_else(|| panic!("{}: no selector", d.id()));
        let labels = &d.value["spec"]["template"]["metadata"]["labels"];
        for (k, v) in selector {
            assert_eq!(
                &labels[k],
                v,
                "{}: selector {k}={v} does not match the pod template's labels",
                d.id()
            );
        }
        let pod = d.pod().unwrap();
        let all = containers(pod);
        assert!(!pod["containers"].as_array().is_none_or(|c| c.is_empty()), "{}: no containers", d.id());
        let mut names = BTreeSet::new();
        for c in all {
            let name = c["name"].as_str().unwrap_or_default();
            assert!(names.insert(name), "{}: container name {name:?} repeated", d.id());
            assert!(c["image"].as_str().is_some_and(|i| !i.is_empty()), "{}/{name}: no image", d.id());
            let r = &c["resources"];
            for (section, key) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
                assert!(!r[section][key].is_null(), "{}/{name}: resources.{section}.{key} missing", d.id());
            }
        }
    }
}

#[test]
fn control_plane_probes_and_service_match_its_listeners() {
    let d = doc("Deployment/mesh-control");
    let c = container(d, "mesh-control");
    let args = flags(&args_of(c));
    let port_of = |addr: &str| addr.rsplit_once(':').map(|(_, p)| p.parse::<u64>().unwrap()).unwrap();
    let named_port = |name: &str| {
        c["ports"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("mesh-control: no container port named {name}"))
    };
    let admin = &args["admin-addr"];
    assert!(!admin.starts_with("127.") && !admin.starts_with("[::1]"), "kubelet probes cannot reach {admin}");
    assert_eq!(named_port("admin"), port_of(admin));
    assert_eq!(named_port("grpc"), port_of(&args["listen"]));
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        let port = match &get["port"] {
            Value::String(name) => named_port(name),
            other => other.as_u64().unwrap(),
        };
        assert_eq!(port, port_of(admin), "{probe} must hit the admin port");
    }
    let svc = doc("Service/mesh-control");
    let grpc = svc.value["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc["targetPort"], "grpc");
    let selector = svc.value["spec"]["selector"].as_object().expect("the Service has a selector");
    let labels = &d.value["spec"]["template"]["metadata"]["labels"];
    assert!(
        selector.iter().all(|(k, v)| labels[k] == *v),
        "the Service must select the control plane's pods"
    );

    // Every agent dials the Service's gRPC port by its cluster DNS name, over TLS; the
    // control plane's serving certificate names it (the Service's default names, in
    // the namespace the Deployment tells it).
    let namespace = svc.value["metadata"]["namespace"].as_str().unwrap();
    assert_eq!(svc.name(), control::tls::names::SERVICE_NAME, "the name the serving certificate covers");
    assert_eq!(d.value["metadata"]["namespace"], namespace);
    let env = c["env"].as_array().expect("mesh-control env");
    assert!(
        env.iter().any(|e| e["name"] == "POD_NAMESPACE"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"),
        "mesh-control learns its namespace (POD_NAMESPACE) for its certificate's names"
    );
    for (w, c, _) in mesh_containers() {
        let Some(url) = flags(&args_of(c)).get("control-plane").cloned() else { continue };
        let want = format!("https://{}.{namespace}.svc:{}", svc.name(), grpc["port"]);
        assert_eq!(url, want, "{}/{}", w.id(), c["name"]);
    }
}

/// The Role letting the control plane publish its roots (--ca-configmap).
const CA_ROOT_ROLE: &str = "Role/mesh-control-ca-root";

#[test]
fn agents_anchor_on_the_roots_the_control_plane_publishes() {
    let control = flags(&args_of(container(doc("Deployment/mesh-control"), "mesh-control")));
    let published =
        control.get("ca-configmap").expect("the control plane publishes its roots (--ca-configmap)");
    let (namespace, name) = published.split_once('/').expect("--ca-configmap NAMESPACE/NAME");
    // Written by the control plane, never declared: applying the manifests must not
    // blank the anchor every agent mounts.
    assert!(
        !docs().iter().any(|x| x.kind() == "ConfigMap" && x.name() == name),
        "ConfigMap/{name} must not be in the manifests"
    );
    let role = doc(CA_ROOT_ROLE);
    assert_eq!(role.value["metadata"]["namespace"], namespace);
    let mut grants = BTreeSet::new();
    for rule in role.value["rules"].as_array().unwrap() {
        assert_eq!(strs(&rule["apiGroups"]), [""]);
        assert_eq!(strs(&rule["resources"]), ["configmaps"]);
        let names = strs(&rule["resourceNames"]);
        for verb in strs(&rule["verbs"]) {
            if verb == "create" {
                assert!(names.is_empty(), "create with resourceNames never matches");
            } else {
                assert_eq!(names, [name], "{verb} is limited to the published ConfigMap");
            }
            grants.insert(verb);
        }
    }
    assert_eq!(grants, BTreeSet::from(["create".into(), "get".into(), "update".into()]));
    let binding = doc("RoleBinding/mesh-control-ca-root");
    assert_eq!(binding.value["roleRef"]["name"], role.name());
    assert_eq!(binding.value["metadata"]["namespace"], namespace);
    assert_eq!(
        binding.value["subjects"][0]["name"],
        doc("Deployment/mesh-control").pod().unwrap()["serviceAccountName"]
    );

    // Every agent that talks to the control plane reads its anchor from that
    // ConfigMap's key, mounted read-only, and a credential from a mounted file.
    let mut agents = 0;
    for (d, c, _) in mesh_containers() {
        let args = flags(&args_of(c));
        if !args.contains_key("control-plane") {
            continue;
        }
        agents += 1;
        let id = format!("{}/{}", d.id(), c["name"].as_str().unwrap_or_default());
        let mounted = |flag: &str| {
            let path = args.get(flag).unwrap_or_else(|| panic!("{id}: --{flag} missing"));
            let (dir, file) = path.rsplit_once('/').unwrap();
            let mount = c["volumeMounts"].as_array().into_iter().flatten().find(|m| m["mountPath"] == dir);
            let mount = mount.unwrap_or_else(|| panic!("{id}: {dir} (--{flag}) is not mounted"));
            assert_eq!(mount["readOnly"], true, "{id}: {dir} read-only");
            let volume =
                d.pod().unwrap()["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]);
            (volume.unwrap_or_else(|| panic!("{id}: no volume {}", mount["name"])).clone(), file.to_owned())
        };
        let (volume, file) = mounted("control-plane-ca");
        assert_eq!(volume["configMap"]["name"], name, "{id}: the anchor is the published ConfigMap");
        let item = volume["configMap"]["items"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["path"] == file.as_str()));
        let key = item.map_or(file.as_str(), |i| i["key"].as_str().unwrap());
        assert_eq!(key, control::ca::publish::BUNDLE_KEY, "{id}: the key the control plane writes");
        mounted("bootstrap-token-file");
    }
    assert!(agents >= 2, "the DaemonSet and the pod-level sidecar talk to the control plane");
}

/// The Role letting the control plane keep its CA root in a Secret (--ca-secret).
const CA_SECRET_ROLE: &str = "Role/mesh-control-ca";

#[test]
fn control_plane_keeps_its_ca_in_one_secret_it_may_create() {
    let d = doc("Deployment/mesh-control");
    let c = container(d, "mesh-control");
    let args = flags(&args_of(c));
    assert!(!args.contains_key("ca-dir"), "--ca-dir and --ca-secret exclude each other");
    let secret = args.get("ca-secret").expect("the control plane keeps its CA in a Secret (--ca-secret)");
    let (namespace, name) = secret.split_once('/').expect("--ca-secret NAMESPACE/NAME");
    // Created by the control plane, never declared: `kubectl delete -k` must keep the root.
    assert!(
        !docs().iter().any(|x| x.kind() == "Secret" && x.name() == name),
        "Secret/{name} must not be in the manifests"
    );
    let role = doc(CA_SECRET_ROLE);
    assert_eq!(role.value["metadata"]["namespace"], namespace);
    let mut grants = BTreeSet::new();
    for rule in role.value["rules"].as_array().unwrap() {
        assert_eq!(strs(&rule["apiGroups"]), [""]);
        assert_eq!(strs(&rule["resources"]), ["secrets"]);
        let names = strs(&rule["resourceNames"]);
        for verb in strs(&rule["verbs"]) {
            // Kubernetes cannot restrict create by name; everything else is this one Secret.
            if verb == "create" {
                assert!(names.is_empty(), "create with resourceNames never matches");
            } else {
                assert_eq!(names, [name], "{verb} is limited to the CA Secret");
            }
            grants.insert(verb);
        }
    }
    assert_eq!(grants, BTreeSet::from(["create".into(), "get".into(), "update".into()]));
    let binding = doc("RoleBinding/mesh-control-ca");
    assert_eq!(binding.value["metadata"]["namespace"], namespace);
    assert_eq!(binding.value["roleRef"]["kind"], "Role");
    assert_eq!(binding.value["roleRef"]["name"], role.name());
    let subject = &binding.value["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    assert_eq!(d.pod().unwrap()["serviceAccountName"], subject["name"]);
    assert_eq!(subject["namespace"], d.value["metadata"]["namespace"]);
}

#[test]
fn agents_present_a_projected_token_the_control_plane_reviews() {
    let control = flags(&args_of(container(doc("Deployment/mesh-control"), "mesh-control")));
    assert!(control.contains_key("token-review"), "the control plane authenticates agents by TokenReview");
    let audience = control.get("token-review-audience").map_or("mesh-control", String::as_str);
    let d = doc("DaemonSet/mesh-agent");
    let c = container(d, "mesh-agent");
    let sa = control.get("agent-service-account").map_or("mesh-system/mesh-agent", String::as_str);
    assert_eq!(
        format!(
            "{}/{}",
            d.value["metadata"]["namespace"].as_str().unwrap(),
            d.pod().unwrap()["serviceAccountName"].as_str().unwrap()
        ),
        sa,
        "--agent-service-account is the DaemonSet's"
    );
    let token_file = flags(&args_of(c))["bootstrap-token-file"].clone();
    let (dir, file) = token_file.rsplit_once('/').unwrap();
    let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == dir);
    let mount = mount.unwrap_or_else(|| panic!("{dir} is mounted"));
    let volume =
        d.pod().unwrap()["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    let token = volume["projected"]["sources"]
        .as_array()
        .expect("a projected volume")
        .iter()
        .find_map(|s| s.get("serviceAccountToken"))
        .expect("a projected service-account token");
    assert_eq!(token["path"], file);
    assert_eq!(token["audience"], audience);
}

#[test]
fn agent_probes_reach_its_loopback_admin_endpoint() {
    let d = doc("DaemonSet/mesh-agent");
    let c = container(d, "mesh-agent");
    let admin = flags(&args_of(c))["admin-addr"].clone();
    let (host, port) = admin.rsplit_once(':').unwrap();
    assert_eq!(d.pod().unwrap()["hostNetwork"], true, "a loopback probe needs the node's network namespace");
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        let get = &c[probe]["httpGet"];
        assert_eq!((get["host"].as_str(), get["path"].as_str()), (Some(host), Some(path)), "{probe}");
        assert_eq!(get["port"].as_u64(), Some(port.parse().unwrap()), "{probe}");
    }
}

fn rule_set(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules.as_array().expect("rules") {
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                for verb in strs(&r["verbs"]) {
                    out.insert((g.clone(), res.clone(), verb));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_reads_and_token_reviews_only() {
    // The CA's Roles are checked by control_plane_keeps_its_ca_in_one_secret_it_may_create
    // and agents_anchor_on_the_roots_the_control_plane_publishes.
    let roles: Vec<_> = docs()
        .iter()
        .filter(|d| {
            matches!(d.kind(), "Role" | "ClusterRole") && d.id() != CA_SECRET_ROLE && d.id() != CA_ROOT_ROLE
        })
        .collect();
    assert!(!roles.is_empty());
    let token_review = (TOKEN_REVIEW.0.to_owned(), TOKEN_REVIEW.1.to_owned(), TOKEN_REVIEW.2.to_owned());
    for d in &roles {
        for grant in rule_set(&d.value["rules"]) {
            assert!(
                matches!(grant.2.as_str(), "get" | "list" | "watch") || grant == token_review,
                "{}: {grant:?} is more than read access",
                d.id()
            );
        }
    }
    // Exactly what the Kubernetes source declares it needs, plus TokenReview.
    let source: Value = serde_yaml_ng::from_str(control::registry::kubernetes::RBAC_RULES).unwrap();
    let mut want = rule_set(&source["rules"]);
    want.insert(token_review);
    assert_eq!(rule_set(&doc("ClusterRole/mesh-control").value["rules"]), want);
    let binding = doc("ClusterRoleBinding/mesh-control");
    assert_eq!(binding.value["roleRef"]["name"], "mesh-control");
    let subject = &binding.value["subjects"][0];
    let sa = doc(&format!("ServiceAccount/{}", subject["name"].as_str().unwrap()));
    assert_eq!(subject["namespace"], sa.value["metadata"]["namespace"]);
    assert_eq!(doc("Deployment/mesh-control").pod().unwrap()["serviceAccountName"], sa.name());
}

#[test]
fn privileges_are_exactly_the_documented_ones() {
    let mut documented: BTreeSet<(String, String)> =
        CAPABILITIES.iter().map(|(w, c, _)| (w.to_string(), c.to_string())).collect();
    for d in docs() {
        let Some(pod) = d.pod() else { continue };
        let host_network = pod["hostNetwork"].as_bool().unwrap_or(false);
        assert_eq!(host_network, HOST_NETWORK.contains(&d.id().as_str()), "{}: hostNetwork", d.id());
        assert!(!pod["hostPID"].as_bool().unwrap_or(false), "{}: hostPID is not needed", d.id());
        assert!(!pod["hostIPC"].as_bool().unwrap_or(false), "{}: hostIPC is not needed", d.id());
        let host_paths: BTreeSet<&str> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        let allowed: BTreeSet<&str> =
            HOST_PATHS.iter().filter(|(w, _)| *w == d.id()).flat_map(|(_, p)| p.iter().copied()).collect();
        assert_eq!(host_paths, allowed, "{}: hostPath volumes", d.id());
        for c in containers(pod) {
            let name = c["name"].as_str().unwrap_or_default();
            let sc = &c["securityContext"];
            assert!(!sc["privileged"].as_bool().unwrap_or(false), "{}/{name}: privileged", d.id());
            let added: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().collect();
            let want: BTreeSet<String> = CAPABILITIES
                .iter()
                .find(|(w, cn, _)| *w == d.id() && *cn == name)
                .map(|(_, _, caps)| caps.iter().map(|c| c.to_string()).collect())
                .unwrap_or_default();
            assert_eq!(added, want, "{}/{name}: capabilities.add", d.id());
            documented.remove(&(d.id(), name.to_owned()));
            if mesh_binary(c).is_some() {
                assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"], "{}/{name}: drop ALL", d.id());
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{}/{name}", d.id());
            }
        }
    }
    assert!(documented.is_empty(), "documented containers missing from deploy/: {documented:?}");
}

#[test]
fn container_flags_exist_in_the_binaries() {
    let mut checked = 0;
    for (d, c, binary) in mesh_containers() {
        let name = format!("{}/{}", d.id(), c["name"].as_str().unwrap_or_default());
        if let Some(cmd) = strs(&c["command"]).first() {
            assert!(cmd.ends_with(binary), "{name}: command {cmd} is not {binary}");
        }
        let args = args_of(c);
        let subcommands: Vec<String> = args.iter().take_while(|a| !a.starts_with('-')).cloned().collect();
        let h = help(binary, &subcommands);
        for flag in flags(&args).keys() {
            assert!(
                h.flags.contains(flag),
                "{name}: `{binary} {}` has no --{flag} (see its --help)",
                subcommands.join(" ")
            );
            checked += 1;
        }
        // Kubernetes expands $(VAR) only for variables the container defines.
        let env_names: BTreeSet<String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect();
        for arg in &args {
            let mut rest = arg.as_str();
            while let Some(i) = rest.find("$(") {
                rest = &rest[i + 2..];
                let var = &rest[..rest.find(')').unwrap_or(rest.len())];
                assert!(
                    env_names.contains(var),
                    "{name}: {arg} uses $({var}), which the container does not define"
                );
            }
        }
        for var in env_names.iter().filter(|v| v.starts_with("MESH_")) {
            assert!(
                h.env.contains(var),
                "{name}: env {var} is not read by `{binary} {}`",
                subcommands.join(" ")
            );
        }
    }
    assert!(checked >= 15, "only {checked} flags checked: are the mesh containers found?");
}

/// Flags the manifests leave in `# TODO(ca)` comments until the binary has them:
/// once `--help` lists one, the comment must become a real argument.
#[test]
fn todo_flags_are_enabled_once_the_binary_has_them() {
    for file in yaml_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut in_todo = false;
        for line in text.lines() {
            let t = line.trim_start();
            if !t.starts_with('#') {
                in_todo = false;
                continue;
            }
            in_todo |= t.contains("TODO(");
            if !in_todo {
                continue;
            }
            for word in t.split_whitespace().filter(|w| w.starts_with("--")) {
                let flag =
                    word.trim_start_matches('-').split(['=', ')', ',', '`']).next().unwrap_or_default();
                if flag == "help" {
                    continue;
                }
                // Flags in a TODO block are named for mesh-control or mesh-agent run.
                let present = help("mesh-control", &[]).flags.contains(flag)
                    || help("mesh-agent", &["run".into()]).flags.contains(flag);
                assert!(
                    !present,
                    "{}: --{flag} exists now; move it from the TODO comment into the container args",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn pod_fallback_init_container_and_sidecar_agree() {
    let d = doc("Deployment/echo");
    let init = flags(&args_of(container(d, "mesh-iptables")));
    let sidecar_c = container(d, "mesh-agent");
    let sidecar = flags(&args_of(sidecar_c));
    assert_eq!(args_of(container(d, "mesh-iptables"))[..2], ["iptables", "install"]);
    assert_eq!(sidecar_c["restartPolicy"], "Always", "the agent is a native sidecar, started before the app");
    assert!(
        sidecar.contains_key("iptables-external"),
        "the sidecar must not touch the init container's rules"
    );
    assert_eq!(sidecar.get("mode").map(String::as_str), Some("iptables"));
    for flag in ["outbound-port", "inbound-port", "mark"] {
        assert_eq!(init.get(flag), sidecar.get(flag), "--{flag} differs between the rules and the agent");
    }
    // The mark alone can be forged by a root workload: the rules also match the
    // agent's group, which must be the one the sidecar runs as.
    let agent_gid: u64 = init.get("agent-gid").expect("init container sets --agent-gid").parse().unwrap();
    assert_eq!(
        sidecar_c["securityContext"]["runAsGroup"].as_u64(),
        Some(agent_gid),
        "--agent-gid must be the sidecar's runAsGroup"
    );
    let redirected: BTreeSet<u64> =
        init["inbound-ports"].split(',').map(|p| p.trim().parse().unwrap()).collect();
    let app_ports: BTreeSet<u64> = d.pod().unwrap()["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(redirected, app_ports, "inbound redirection must cover the app's ports");
    // The init container is the first to run, before the sidecar starts.
    assert_eq!(d.pod().unwrap()["initContainers"][0]["name"], "mesh-iptables");
}

#[test]
fn kustomizations_list_every_manifest_and_pin_the_image_tags() {
    let all: BTreeSet<PathBuf> = yaml_files().into_iter().filter(|f| !is_kustomization(f)).collect();
    let mut listed = BTreeSet::new();
    let kustomizations: Vec<_> = yaml_files().into_iter().filter(|f| is_kustomization(f)).collect();
    assert!(
        kustomizations.iter().any(|k| k.parent() == Some(deploy_dir().as_path())),
        "deploy/kustomization.yaml"
    );
    for k in &kustomizations {
        let v = &parse_all(k)[0];
        let dir = k.parent().unwrap();
        let mut images_used = BTreeSet::new();
        for r in strs(&v["resources"]) {
            let path = dir.join(&r);
            assert!(path.is_file(), "{}: resource {r} does not exist", k.display());
            let path = path.canonicalize().unwrap();
            assert!(listed.insert(path.clone()), "{} listed twice", path.display());
            for d in docs().iter().filter(|d| d.file.canonicalize().unwrap() == path) {
                if let Some(pod) = d.pod() {
                    images_used.extend(containers(pod).into_iter().filter_map(mesh_image));
                }
            }
        }
        let pinned: BTreeMap<String, String> = v["images"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                (i["name"].as_str().unwrap().to_owned(), i["newTag"].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        for image in images_used {
            assert_eq!(
                pinned.get(image).map(String::as_str),
                Some(env!("CARGO_PKG_VERSION")),
                "{}: image {image} must be pinned to the workspace version",
                k.display()
            );
        }
    }
    let all: BTreeSet<PathBuf> = all.iter().map(|p| p.canonicalize().unwrap()).collect();
    let unlisted: Vec<_> = all.difference(&listed).collect();
    assert!(unlisted.is_empty(), "manifests no kustomization.yaml lists: {unlisted:?}");
}

#[test]
fn dockerfiles_build_the_binaries_the_manifests_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("rust-version in the workspace");
    let used: BTreeSet<&str> = mesh_containers().into_iter().filter_map(|(_, c, _)| mesh_image(c)).collect();
    assert_eq!(used, IMAGES.iter().map(|(b, _)| *b).collect(), "both images are used");
    for (image, binary, package) in EXTRA_BINARIES {
        let text = std::fs::read_to_string(deploy_dir().join(format!("docker/{image}.Dockerfile"))).unwrap();
        assert!(text.contains(&format!("-p {package} --bin {binary}")), "{image} image builds {binary}");
        let runtime = text.rsplit("\nFROM ").next().unwrap();
        assert!(runtime.contains(&format!("/usr/local/bin/{binary}")), "{image} image carries {binary}");
    }
    for (binary, package) in IMAGES {
        let path = deploy_dir().join(format!("docker/{binary}.Dockerfile"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert!(froms.len() >= 2, "{binary}: multi-stage build expected");
        assert!(froms[0].starts_with(&format!("FROM rust:{rust_version}")), "{binary}: builder {}", froms[0]);
        assert!(
            text.contains(&format!("cargo build --release --locked -p {package} --bin {binary}")),
            "{binary}"
        );
        assert!(text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]")), "{binary}: entrypoint");
        let package_dir = if *package == "control" { "control" } else { package };
        assert!(root.join(package_dir).join("Cargo.toml").is_file());
        assert!(deploy_dir().join(format!("docker/{binary}.Dockerfile.dockerignore")).is_file());
    }
    let agent = std::fs::read_to_string(deploy_dir().join("docker/mesh-agent.Dockerfile")).unwrap();
    let runtime = agent.rsplit("\nFROM ").next().unwrap();
    assert!(runtime.contains("install -y --no-install-recommends iptables"), "agent runtime needs iptables");
}

fn volume_mount<'a>(c: &'a Value, path: &str) -> Option<&'a Value> {
    c["volumeMounts"].as_array()?.iter().find(|m| m["mountPath"] == path)
}

/// The hostPath behind a container's mount at `path`.
fn host_path_at(d: &Doc, c: &Value, path: &str) -> Option<String> {
    let mount = volume_mount(c, path)?;
    let volume = d.pod()?["volumes"].as_array()?.iter().find(|v| v["name"] == mount["name"])?;
    volume["hostPath"]["path"].as_str().map(str::to_owned)
}

#[test]
fn the_cni_installer_chains_the_plugin_to_the_agents_socket() {
    let d = doc("DaemonSet/mesh-agent");
    let installer = container(d, "mesh-cni-install");
    assert_eq!(mesh_binary(installer), Some("mesh-cni"));
    let args = args_of(installer);
    assert_eq!(
        args[0], "install",
        "a long-running install: it keeps the conflist chained and cleans up on exit"
    );
    let flags = flags(&args);
    for (flag, host) in [("bin-dir", "/opt/cni/bin"), ("conf-dir", "/etc/cni/net.d")] {
        let dir = &flags[flag];
        assert_eq!(host_path_at(d, installer, dir).as_deref(), Some(host), "--{flag} is the host's {host}");
        assert_ne!(volume_mount(installer, dir).unwrap()["readOnly"], true, "--{flag} is written");
    }
    // The plugin runs on the host and dials the socket the agent makes in its
    // /run/mesh mount, which is the host's /run/mesh.
    let socket = &flags["agent-socket"];
    assert_eq!(socket, mesh_cni::spec::DEFAULT_AGENT_SOCKET);
    let (socket_dir, _) = socket.rsplit_once('/').unwrap();
    let agent = container(d, "mesh-agent");
    assert_eq!(
        host_path_at(d, agent, socket_dir).as_deref(),
        Some(socket_dir),
        "the agent's socket dir is the host's"
    );
    // Pods that must start before any agent serves: the mesh's own and the cluster's.
    let excluded: BTreeSet<&str> = flags["exclude-namespaces"].split(',').collect();
    let own = d.value["metadata"]["namespace"].as_str().unwrap();
    assert!(excluded.contains(own) && excluded.contains("kube-system"), "{excluded:?}");
    // The pods' network namespaces reach the agent as the runtime mounts them later.
    let netns = volume_mount(agent, "/run/netns").expect("the agent sees the pods' network namespaces");
    assert_eq!(
        (netns["readOnly"].as_bool(), netns["mountPropagation"].as_str()),
        (Some(true), Some("HostToContainer"))
    );
    assert_eq!(host_path_at(d, agent, "/run/netns").as_deref(), Some("/run/netns"));
    // Only the installer may write the node's CNI configuration.
    for c in containers(d.pod().unwrap()).into_iter().filter(|c| c["name"] != "mesh-cni-install") {
        for dir in ["/opt/cni/bin", "/etc/cni/net.d"] {
            let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
            assert!(
                !mounts
                    .iter()
                    .any(|m| host_path_at(d, c, m["mountPath"].as_str().unwrap()).as_deref() == Some(dir)),
                "{} must not mount {dir}",
                c["name"]
            );
        }
    }
}

/// The alerting rules load (`promtool check rules`), their unit tests pass (`promtool
/// test rules`), and every alert has a test case where it fires, so none ships that
/// was never seen to fire.
#[test]
fn alert_rules_pass_promtool_and_each_alert_has_a_firing_test() {
    let Some(promtool) = mesh_tests::require_tool(
        "promtool",
        "prometheus",
        "alert_rules_pass_promtool_and_each_alert_has_a_firing_test",
    ) else {
        return;
    };
    let dir = prometheus_dir();
    for args in [["check", "rules", "mesh-alerts.rules.yml"], ["test", "rules", "mesh-alerts.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = &parse_all(&dir.join("mesh-alerts.rules.yml"))[0];
    let alerts: BTreeSet<String> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    let tests = &parse_all(&dir.join("mesh-alerts.test.yml"))[0];
    let fired: BTreeSet<String> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|c| c["alertname"].as_str().map(str::to_owned))
        .collect();
    let untested: Vec<_> = alerts.difference(&fired).collect();
    assert!(untested.is_empty(), "alerts no promtool test sees firing: {untested:?}");
}

/// Each scrape target is consistent three ways: the example PodMonitors select the
/// mesh's pods by their labels and name a port their container declares, with the
/// job names the alerting rules expect; the pods' `prometheus.io/*` annotations
/// point at the same port; and that port is the one the binary serves `/metrics` on
/// (the agent's `--metrics-addr`, the control plane's `--admin-addr`), not the
/// agent's loopback admin endpoint.
#[test]
fn scrape_annotations_and_pod_monitors_point_at_the_metrics_ports() {
    let monitors = parse_all(&prometheus_dir().join("podmonitor.yaml"));
    let mut jobs = BTreeSet::new();
    for (workload, container_name, flag) in [
        ("DaemonSet/mesh-agent", "mesh-agent", "metrics-addr"),
        ("Deployment/mesh-control", "mesh-control", "admin-addr"),
    ] {
        let d = doc(workload);
        let c = container(d, container_name);
        let addr = flags(&args_of(c)).get(flag).cloned().unwrap_or_else(|| panic!("{workload}: no --{flag}"));
        let (host, port) = addr.rsplit_once(':').unwrap();
        assert_eq!(host, "0.0.0.0", "{workload}: --{flag} must be reachable from Prometheus, not loopback");
        let port: u64 = port.parse().unwrap();

        let annotations = &d.value["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{workload}");
        assert_eq!(annotations["prometheus.io/port"].as_str(), Some(port.to_string().as_str()), "{workload}");
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{workload}");

        let labels = &d.value["spec"]["template"]["metadata"]["labels"];
        let monitor = monitors
            .iter()
            .find(|m| {
                m["kind"] == "PodMonitor"
                    && m["spec"]["selector"]["matchLabels"]
                        .as_object()
                        .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
            })
            .unwrap_or_else(|| panic!("no PodMonitor selects {workload}'s pods"));
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], "/metrics", "{workload}");
        let port_name = endpoint["port"].as_str().unwrap();
        let declared = c["ports"].as_array().into_iter().flatten().find(|p| p["name"] == port_name);
        let declared = declared.unwrap_or_else(|| panic!("{workload}: no container port named {port_name}"));
        assert_eq!(declared["containerPort"].as_u64(), Some(port), "{workload}: port {port_name}");
        let job_label = monitor["spec"]["jobLabel"].as_str().unwrap();
        jobs.insert(labels[job_label].as_str().unwrap().to_owned());
    }
    // The alerting rules select these jobs.
    let rules = std::fs::read_to_string(prometheus_dir().join("mesh-alerts.rules.yml")).unwrap();
    for job in &jobs {
        assert!(rules.contains(&format!("job=\"{job}\"")), "the alerting rules never name job {job}");
    }
    assert_eq!(jobs.len(), 2, "{jobs:?}");
}

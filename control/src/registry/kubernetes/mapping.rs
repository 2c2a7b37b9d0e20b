//! Turns Kubernetes Services, EndpointSlices and Pods into mesh services.
//!
//! Pure functions over the reflector stores' contents, so the mapping is tested
//! without a cluster and the output depends only on the objects (sorted, so the
//! same state always compares equal and no spurious update reaches agents).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_api as api;

use super::KubernetesConfig;
use super::annotations::{self, Problems};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The mesh services and the problems met while building them.
#[derive(Debug, Default)]
pub struct Mapped {
    /// Sorted by namespace then name; endpoints sorted by address.
    pub services: Vec<api::Service>,
    /// Sorted, one line per problem, each naming the object.
    pub problems: Vec<String>,
}

/// Maps every Service (except ExternalName ones, which have no endpoints to
/// balance) with the endpoints of its EndpointSlices; `pod` looks a Pod up by
/// namespace and name.
pub fn map_services(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    pod: &dyn Fn(&str, &str) -> Option<Arc<Pod>>,
    config: &KubernetesConfig,
) -> Mapped {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(svc) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            by_service.entry((ns, svc.as_str())).or_default().push(slice);
        }
    }
    // Store order is arbitrary; a fixed slice order makes duplicate handling
    // (below) and so the whole output deterministic.
    for group in by_service.values_mut() {
        group.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let mut problems = Problems::default();
    let mut out: Vec<api::Service> = services
        .iter()
        .filter_map(|svc| {
            let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
            let name = svc.metadata.name.as_deref().unwrap_or_default();
            let slices = by_service.get(&(ns, name)).map(Vec::as_slice).unwrap_or_default();
            map_service(svc, slices, pod, config, &mut problems)
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Mapped { services: out, problems: problems.into_vec() }
}

fn map_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    pod: &dyn Fn(&str, &str) -> Option<Arc<Pod>>,
    config: &KubernetesConfig,
    problems: &mut Problems,
) -> Option<api::Service> {
    let name = svc.metadata.name.clone()?;
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return None;
    }
    let object = format!("service {namespace}/{name}");

    let vips = match spec.and_then(|s| s.cluster_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.and_then(|s| s.cluster_ip.clone()).into_iter().collect(),
    }
    .into_iter()
    .filter(|ip| ip.parse::<IpAddr>().is_ok())
    .collect();

    // No VIP on purpose: cluster DNS answers its names with the endpoints' addresses.
    let headless = spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None");

    let hostnames = vec![
        format!("{name}.{namespace}.svc.{}", config.cluster_domain),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}"),
    ];

    // The mesh carries TCP only; UDP and SCTP ports keep their plain path.
    let k8s_ports: Vec<&ServicePort> = spec
        .and_then(|s| s.ports.as_ref())
        .map(|p| p.iter().filter(|p| is_tcp(p.protocol.as_deref())).collect())
        .unwrap_or_default();
    let ports: Vec<api::ServicePort> = k8s_ports.iter().map(|p| map_port(p)).collect();

    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let policy = annotations::service_policy(&object, &annotations, problems);
    let exported = annotations::exported(&object, &annotations, problems);

    let mut endpoints: BTreeMap<String, api::Endpoint> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let slice_ports: HashMap<&str, i32> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| Some((p.name.as_deref().unwrap_or_default(), p.port?)))
            .collect();
        let named_ports = named_ports(&k8s_ports, &slice_ports);
        for ep in &slice.endpoints {
            let Some(mapped) = map_endpoint(ep, &namespace, &named_ports, pod, config, problems) else {
                continue;
            };
            // An endpoint can sit in two slices while the controller moves it;
            // keep one copy, the healthy one if either is.
            match endpoints.get(&mapped.address) {
                Some(existing) if rank(existing) >= rank(&mapped) => {}
                _ => {
                    endpoints.insert(mapped.address.clone(), mapped);
                }
            }
        }
    }

    Some(api::Service {
        // Kubelet probes already feed readiness into the EndpointSlices.
        health_check: None,
        name,
        namespace,
        vips,
        allocated_vips: Vec::new(),
        headless,
        hostnames,
        ports,
        policy,
        endpoints: endpoints.into_values().collect(),
        // HTTPRoutes naming the Service are added by the source (see `http_routes`).
        routes: Vec::new(),
        exported,
        cluster: String::new(),
    })
}

fn rank(e: &api::Endpoint) -> u8 {
    u8::from(e.health != api::Health::Unhealthy as i32)
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

fn map_port(p: &ServicePort) -> api::ServicePort {
    let name = p.name.clone().unwrap_or_default();
    let target_port = match &p.target_port {
        Some(IntOrString::Int(n)) => u32::try_from(*n).unwrap_or(0),
        // Named target ports differ per pod; endpoints carry them in `named_ports`.
        Some(IntOrString::String(_)) | None => 0,
    };
    api::ServicePort {
        protocol: protocol_hint(p.app_protocol.as_deref(), &name) as i32,
        name,
        port: u32::try_from(p.port).unwrap_or(0),
        target_port,
    }
}

/// The protocol a port declares: `appProtocol` first, then the port name's
/// prefix (`http-web`, `grpc`, ...); unknown means "detect".
pub fn protocol_hint(app_protocol: Option<&str>, port_name: &str) -> api::Protocol {
    if let Some(hint) = app_protocol.and_then(protocol_of) {
        return hint;
    }
    let prefix = port_name.split_once('-').map_or(port_name, |(p, _)| p);
    if port_name == "grpc-web" || port_name.starts_with("grpc-web-") {
        return api::Protocol::Http1;
    }
    protocol_of(prefix).unwrap_or(api::Protocol::Unspecified)
}

fn protocol_of(word: &str) -> Option<api::Protocol> {
    Some(match word.to_ascii_lowercase().as_str() {
        "http" | "kubernetes.io/ws" | "grpc-web" => api::Protocol::Http1,
        "http2" | "h2c" | "kubernetes.io/h2c" => api::Protocol::Http2,
        "grpc" => api::Protocol::Grpc,
        "tls" | "https" | "kubernetes.io/wss" => api::Protocol::Tls,
        // Server-first protocols must not wait for the sniffer.
        "tcp" | "mysql" | "mongo" | "redis" => api::Protocol::Tcp,
        _ => return None,
    })
}

/// Target ports by service port name, where the endpoint's port cannot be read
/// from the service: named target ports, and slices whose port differs from the
/// service's (as kube-proxy does, the slice wins).
fn named_ports(service_ports: &[&ServicePort], slice_ports: &HashMap<&str, i32>) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for sp in service_ports {
        let name = sp.name.as_deref().unwrap_or_default();
        let Some(&actual) = slice_ports.get(name) else { continue };
        let Ok(actual) = u32::try_from(actual) else { continue };
        let needed = match &sp.target_port {
            Some(IntOrString::String(_)) => true,
            Some(IntOrString::Int(n)) => i64::from(*n) != i64::from(actual),
            None => i64::from(sp.port) != i64::from(actual),
        };
        if needed {
            out.insert(name.to_owned(), actual);
        }
    }
    out
}

fn map_endpoint(
    ep: &Endpoint,
    namespace: &str,
    named_ports: &HashMap<String, u32>,
    pod: &dyn Fn(&str, &str) -> Option<Arc<Pod>>,
    config: &KubernetesConfig,
    problems: &mut Problems,
) -> Option<api::Endpoint> {
    // Kubernetes declares an endpoint's addresses interchangeable; counting each
    // would multiply the pod's share of traffic.
    let address = ep.addresses.first()?.parse::<IpAddr>().ok()?.to_string();
    let conditions = ep.conditions.as_ref();
    let (mut health, mut reason) = if conditions.and_then(|c| c.terminating) == Some(true) {
        (api::Health::Unhealthy, "terminating")
    } else if conditions.and_then(|c| c.ready) == Some(false) {
        (api::Health::Unhealthy, "not ready")
    } else {
        // A missing `ready` means ready, per the EndpointSlice API.
        (api::Health::Healthy, "")
    };

    let mut out = api::Endpoint {
        address,
        named_ports: named_ports.clone(),
        weight: 1,
        locality: ep.zone.as_ref().map(|zone| api::Locality { region: String::new(), zone: zone.clone() }),
        node: ep.node_name.clone().unwrap_or_default(),
        ..Default::default()
    };

    let target = ep.target_ref.as_ref().filter(|t| t.kind.as_deref() == Some("Pod"));
    if let Some(target) = target {
        let pod_ns = target.namespace.as_deref().unwrap_or(namespace);
        let pod_name = target.name.as_deref().unwrap_or_default();
        out.workload = pod_name.to_owned();
        match pod(pod_ns, pod_name) {
            Some(p) => {
                let object = format!("pod {pod_ns}/{pod_name}");
                let annotations = p.metadata.annotations.clone().unwrap_or_default();
                let settings = annotations::pod_settings(&object, &annotations, problems);
                out.weight = settings.weight;
                // Route subsets (an HTTPRoute's backend Services are themselves
                // label selections; the registry file's subsets read these).
                out.labels = p.metadata.labels.clone().unwrap_or_default().into_iter().collect();
                let spec = p.spec.as_ref();
                if out.node.is_empty() {
                    out.node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
                }
                if settings.meshed {
                    let sa = spec
                        .and_then(|s| s.service_account_name.as_deref())
                        .filter(|s| !s.is_empty())
                        .unwrap_or("default");
                    out.identity = format!("spiffe://{}/ns/{pod_ns}/sa/{sa}", config.trust_domain);
                    let host_ip = p.status.as_ref().and_then(|s| s.host_ip.as_deref());
                    match host_ip.and_then(|ip| ip.parse::<IpAddr>().ok()) {
                        Some(ip) => {
                            out.agent_address = SocketAddr::new(ip, config.agent_inbound_port).to_string()
                        }
                        None if health == api::Health::Healthy => {
                            // Meshed but not yet placed: its agent cannot be reached.
                            (health, reason) = (api::Health::Unhealthy, "node agent address unknown");
                        }
                        None => {}
                    }
                }
            }
            None if health == api::Health::Healthy => {
                // Without the pod we do not know whether it is meshed or who it is;
                // sending it plain traffic could bypass its policy, so hold it back
                // until the pod arrives (normally within the same debounce window).
                (health, reason) = (api::Health::Unhealthy, "pod not yet known");
            }
            None => {}
        }
    }
    out.health = health as i32;
    out.health_reason = reason.to_owned();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, PodSpec, PodStatus, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta { namespace: Some(ns.into()), name: Some(name.into()), ..Default::default() }
    }

    fn service(ports: Vec<ServicePort>) -> Arc<Service> {
        Arc::new(Service {
            metadata: meta("shop", "cart"),
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.7".into()),
                cluster_ips: Some(vec!["10.96.0.7".into(), "fd00::7".into()]),
                ports: Some(ports),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn port(name: &str, port: i32, target: Option<IntOrString>) -> ServicePort {
        ServicePort { name: Some(name.into()), port, target_port: target, ..Default::default() }
    }

    fn slice(endpoints: Vec<Endpoint>, ports: &[(&str, i32)]) -> Arc<EndpointSlice> {
        let mut metadata = meta("shop", "cart-abc");
        metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), "cart".to_string())].into());
        Arc::new(EndpointSlice {
            metadata,
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
        })
    }

    fn endpoint(ip: &str, pod: &str, ready: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions { ready, serving: ready, terminating }),
            node_name: Some("node-1".into()),
            zone: Some("z1".into()),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(name: &str, annotations: &[(&str, &str)]) -> Arc<Pod> {
        let mut metadata = meta("shop", name);
        metadata.annotations =
            Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        Arc::new(Pod {
            metadata,
            spec: Some(PodSpec { service_account_name: Some("cart-sa".into()), ..Default::default() }),
            status: Some(PodStatus { host_ip: Some("192.168.1.5".into()), ..Default::default() }),
        })
    }

    fn run(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>], pods: &[Arc<Pod>]) -> Mapped {
        let pods: Vec<Arc<Pod>> = pods.to_vec();
        let lookup = move |ns: &str, name: &str| {
            pods.iter()
                .find(|p| {
                    p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        };
        map_services(services, slices, &lookup, &KubernetesConfig::default())
    }

    #[test]
    fn protocol_hints_from_app_protocol_then_name() {
        use api::Protocol::*;
        for (app, name, want) in [
            (Some("http"), "", Http1),
            (Some("kubernetes.io/h2c"), "", Http2),
            (Some("h2c"), "web", Http2),
            (Some("grpc"), "tcp-x", Grpc),
            (Some("TLS"), "", Tls),
            (Some("tcp"), "http", Tcp),
            (Some("example.com/custom"), "http-api", Http1),
            (None, "http", Http1),
            (None, "http2-x", Http2),
            (None, "grpc-api", Grpc),
            (None, "grpc-web", Http1),
            (None, "https-admin", Tls),
            (None, "tcp-db", Tcp),
            (None, "mysql", Tcp),
            (None, "web", Unspecified),
            (None, "httpx", Unspecified),
            (None, "", Unspecified),
        ] {
            assert_eq!(protocol_hint(app, name), want, "{app:?} {name:?}");
        }
    }

    #[test]
    fn named_and_numeric_target_ports() {
        let svc = service(vec![
            port("http", 80, Some(IntOrString::String("web".into()))),
            port("grpc", 9090, Some(IntOrString::Int(9091))),
            port("metrics", 9100, None),
        ]);
        let slices = [slice(
            vec![endpoint("10.0.0.1", "cart-1", Some(true), None)],
            &[("http", 8080), ("grpc", 9091), ("metrics", 9100)],
        )];
        let m = run(&[svc], &slices, &[pod("cart-1", &[])]);
        let s = &m.services[0];
        assert_eq!(
            s.ports.iter().map(|p| (p.port, p.target_port)).collect::<Vec<_>>(),
            [(80, 0), (9090, 9091), (9100, 0)]
        );
        assert_eq!(s.endpoints[0].named_ports, HashMap::from([("http".to_string(), 8080)]));
    }

    #[test]
    fn health_from_conditions_keeps_unready_endpoints() {
        let svc = service(vec![port("http", 80, None)]);
        let slices = [slice(
            vec![
                endpoint("10.0.0.1", "a", Some(true), Some(false)),
                endpoint("10.0.0.2", "b", Some(false), Some(false)),
                endpoint("10.0.0.3", "c", Some(false), Some(true)),
                endpoint("10.0.0.4", "d", None, None),
            ],
            &[("http", 80)],
        )];
        let pods = ["a", "b", "c", "d"].map(|n| pod(n, &[]));
        let m = run(&[svc], &slices, &pods);
        let got: Vec<_> = m.services[0]
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.health, e.health_reason.as_str()))
            .collect();
        let (h, u) = (api::Health::Healthy as i32, api::Health::Unhealthy as i32);
        assert_eq!(
            got,
            [
                ("10.0.0.1", h, ""),
                ("10.0.0.2", u, "not ready"),
                ("10.0.0.3", u, "terminating"),
                ("10.0.0.4", h, "")
            ]
        );
    }

    #[test]
    fn unmeshed_weighted_and_unknown_pods() {
        let svc = service(vec![port("http", 80, None)]);
        let slices = [slice(
            vec![
                endpoint("10.0.0.1", "meshed", Some(true), None),
                endpoint("10.0.0.2", "plain", Some(true), None),
                endpoint("10.0.0.3", "missing", Some(true), None),
            ],
            &[("http", 80)],
        )];
        let pods =
            [pod("meshed", &[("mesh.dev/weight", "3")]), pod("plain", &[("mesh.dev/inject", "false")])];
        let m = run(&[svc], &slices, &pods);
        let e = &m.services[0].endpoints;
        assert_eq!(e[0].identity, "spiffe://cluster.local/ns/shop/sa/cart-sa");
        assert_eq!(e[0].agent_address, "192.168.1.5:15008");
        assert_eq!((e[0].weight, e[0].workload.as_str(), e[0].node.as_str()), (3, "meshed", "node-1"));
        assert_eq!(e[0].locality.as_ref().map(|l| l.zone.as_str()), Some("z1"));
        assert_eq!((e[1].agent_address.as_str(), e[1].identity.as_str()), ("", ""));
        assert_eq!(e[1].health, api::Health::Healthy as i32);
        assert_eq!(
            (e[2].health, e[2].health_reason.as_str()),
            (api::Health::Unhealthy as i32, "pod not yet known")
        );
        assert!(m.problems.is_empty(), "{:?}", m.problems);
    }

    #[test]
    fn vips_hostnames_and_skipped_kinds() {
        let headless = Arc::new(Service {
            metadata: meta("shop", "db"),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                cluster_ips: Some(vec!["None".into()]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let external = Arc::new(Service {
            metadata: meta("shop", "ext"),
            spec: Some(ServiceSpec {
                type_: Some("ExternalName".into()),
                external_name: Some("example.com".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let m = run(&[service(vec![]), headless, external], &[], &[]);
        let names: Vec<_> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["cart", "db"], "sorted, ExternalName skipped");
        assert_eq!(m.services[0].vips, ["10.96.0.7", "fd00::7"]);
        assert_eq!(m.services[0].hostnames, ["cart.shop.svc.cluster.local", "cart.shop.svc", "cart.shop"]);
        assert!(m.services[1].vips.is_empty(), "headless has no VIP");
        assert!(m.services[1].headless && !m.services[0].headless);
    }

    #[test]
    fn duplicate_endpoint_across_slices_kept_once_preferring_healthy() {
        let svc = service(vec![port("http", 80, None)]);
        let mut other = (*slice(vec![endpoint("10.0.0.1", "a", Some(true), None)], &[("http", 80)])).clone();
        other.metadata.name = Some("cart-def".into());
        let slices =
            [slice(vec![endpoint("10.0.0.1", "a", Some(false), None)], &[("http", 80)]), Arc::new(other)];
        let m = run(&[svc], &slices, &[pod("a", &[])]);
        assert_eq!(m.services[0].endpoints.len(), 1);
        assert_eq!(m.services[0].endpoints[0].health, api::Health::Healthy as i32);
    }
}

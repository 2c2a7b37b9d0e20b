//! Consul's `/v1/health/service/NAME` answers as mesh services
//! (`control::registry::consul::mapping`): what a Consul agent, or anything that
//! answers in its place, sends the control plane.
//!
//! Input: the answer's body (JSON).
//!
//! Asserts, beyond "no panic": every instance is either an endpoint or named in a
//! problem; every endpoint has an IP address and a port in range; an endpoint is
//! unhealthy exactly when one of its checks is critical; a meshed endpoint has an
//! identity of the mesh's namespace; the service encodes and decodes as agents read it.
#![no_main]

use control::registry::consul::mapping::{self, HealthEntry, MappingConfig};
use libfuzzer_sys::fuzz_target;
use mesh_api as api;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = serde_json::from_slice::<Vec<HealthEntry>>(data) else { return };
    let config = MappingConfig {
        namespace: "consul".into(),
        trust_domain: "cluster.local".into(),
        datacenter: Some("dc1".into()),
    };
    let (service, skipped) = mapping::service("web", &entries, &config);
    assert_eq!(service.endpoints.len() + skipped.len(), entries.len(), "{skipped:?}");
    for p in &skipped {
        assert!(p.starts_with("service web, instance "), "{p}");
    }
    let port = service.ports[0].port;
    for e in &service.endpoints {
        assert!(e.address.parse::<std::net::IpAddr>().is_ok(), "{e:?}");
        let effective = if e.port == 0 { port } else { e.port };
        assert!((1..=65535).contains(&effective), "{e:?}");
        // Instance ids may repeat in the input: check health where one is unique.
        let same: Vec<&HealthEntry> = entries.iter().filter(|x| x.service.id == e.workload).collect();
        if let [entry] = same.as_slice() {
            let critical = entry.checks.iter().any(|c| c.status == "critical");
            assert_eq!(e.health() == api::Health::Unhealthy, critical, "{e:?}");
        }
        if !e.agent_address.is_empty() {
            assert!(e.identity.starts_with("spiffe://cluster.local/ns/consul/sa/"), "{e:?}");
        }
    }
    let decoded = api::Service::decode(service.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(decoded, service);
});

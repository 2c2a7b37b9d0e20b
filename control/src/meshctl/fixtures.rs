//! Admin JSON as the current control plane and agent serve it, for rendering tests.

use super::views::{AgentDump, ControlDump, FederationView};

/// Shaped like `control::admin` `/config_dump` (with `control::json::snapshot`).
pub const CONTROL_DUMP: &str = r#"{
  "version": 42,
  "ready": true,
  "source_errors": [],
  "connected_agents": 2,
  "snapshot": {
    "trust_domain": "cluster.local",
    "services": [
      {
        "name": "reviews", "namespace": "default",
        "vips": ["10.96.0.10"], "hostnames": ["reviews.default.svc.cluster.local"],
        "ports": [{"name": "http", "port": 9080, "target_port": 0, "protocol": "PROTOCOL_HTTP1"}],
        "load_balancer": "ALGORITHM_LEAST_REQUEST",
        "authorization": [
          {"principals": ["spiffe://cluster.local/ns/default/sa/productpage"], "methods": [], "path_prefixes": []}
        ],
        "endpoints": [
          {"address": "10.1.0.5", "port": 0, "weight": 1, "health": "HEALTH_HEALTHY", "health_reason": "",
           "zone": "z1", "identity": "spiffe://cluster.local/ns/default/sa/reviews", "node": "node-a",
           "agent_address": "192.168.0.1:15008"},
          {"address": "10.1.0.6", "port": 0, "weight": 1, "health": "HEALTH_UNHEALTHY", "health_reason": "not ready",
           "zone": "z2", "identity": "spiffe://cluster.local/ns/default/sa/reviews", "node": "node-b",
           "agent_address": "192.168.0.2:15008"},
          {"address": "10.1.0.7", "port": 0, "weight": 0, "health": "HEALTH_UNSPECIFIED", "health_reason": "",
           "zone": null, "identity": "", "node": "", "agent_address": ""}
        ]
      },
      {
        "name": "db", "namespace": "default",
        "vips": ["10.96.0.20"], "hostnames": ["db.default.svc.cluster.local", "db.default"],
        "ports": [{"name": "pg", "port": 5432, "target_port": 0, "protocol": "PROTOCOL_TCP"},
                  {"name": "metrics", "port": 9187, "target_port": 0, "protocol": "PROTOCOL_UNSPECIFIED"}],
        "load_balancer": "ALGORITHM_ROUND_ROBIN",
        "authorization": [],
        "endpoints": [
          {"address": "10.2.0.9", "port": 5432, "weight": 1, "health": "HEALTH_HEALTHY", "health_reason": "",
           "zone": null, "identity": "", "node": "", "agent_address": ""}
        ]
      },
      {
        "name": "productpage", "namespace": "default",
        "vips": [], "hostnames": [], "ports": [], "load_balancer": "ALGORITHM_ROUND_ROBIN",
        "endpoints": [
          {"address": "10.1.0.9", "port": 0, "weight": 1, "health": "HEALTH_HEALTHY", "health_reason": "",
           "zone": "z1", "identity": "spiffe://cluster.local/ns/default/sa/productpage", "node": "node-a",
           "agent_address": "192.168.0.1:15008"}
        ]
      }
    ]
  }
}"#;

/// Shaped like `mesh_agent::agent::ConfigDump` as `/config_dump` serves it.
pub const AGENT_DUMP: &str = r#"{
  "mode": "ebpf", "mode_reason": "auto: capabilities present", "ready": true,
  "outbound_port": 15001, "inbound_port": 15006, "inbound_ports": [], "mark": "0x4d45",
  "include_ports": [], "exclude_ports": [], "include_cidrs": [], "exclude_cidrs": [], "ipv6": true,
  "enrolled": ["/mesh/productpage"], "opaque_ports": [22], "detect_timeout_ms": 3000,
  "discovery": {"control_plane": "http://mesh-control:15010", "connected": true, "applied_version": 42,
                "staleness_seconds": 0.0, "seconds_since_update": 12.5, "services": 3, "endpoints": 4},
  "routes": [
    {"service": "default/reviews", "port": 9080, "protocol": "http1", "endpoints": [
      {"addr": "10.1.0.5:9080", "healthy": true, "health_reason": "", "weight": 1,
       "identity": "spiffe://cluster.local/ns/default/sa/reviews", "node": "node-a",
       "agent_address": "192.168.0.1:15008", "zone": "z1", "region": ""},
      {"addr": "10.1.0.6:9080", "healthy": false, "health_reason": "not ready", "weight": 1,
       "identity": "spiffe://cluster.local/ns/default/sa/reviews", "node": "node-b",
       "agent_address": "192.168.0.2:15008", "zone": "z2", "region": ""},
      {"addr": "10.1.0.7:9080", "healthy": true, "health_reason": "", "weight": 0,
       "identity": "", "node": "", "agent_address": null, "zone": "", "region": ""}
    ]},
    {"service": "default/db", "port": 5432, "protocol": "tcp", "endpoints": [
      {"addr": "10.2.0.9:5432", "healthy": true, "health_reason": "", "weight": 1,
       "identity": "", "node": "", "agent_address": null, "zone": "", "region": ""}
    ]},
    {"service": "default/db", "port": 9187, "protocol": "detect", "endpoints": [
      {"addr": "10.2.0.9:5432", "healthy": true, "health_reason": "", "weight": 1,
       "identity": "", "node": "", "agent_address": null, "zone": "", "region": ""}
    ]}
  ]
}"#;

/// Shaped like the agent's `GET /workloads` (`mesh_agent::agent::WorkloadDump`): pods
/// from the CNI in both modes (one expired certificate, one without a service account
/// yet) and a static host workload.
pub const WORKLOADS: &str = r#"[
  {"name": "web-0", "namespace": "shop", "service_account": "web",
   "identity": "spiffe://cluster.local/ns/shop/sa/web",
   "netns": "/var/run/netns/cni-4a9b2c7e-1f0d-4f7e-9a43-0e7c2b1d5f60", "cgroup": null,
   "addresses": ["10.88.0.2", "fd88::2"], "mode": "ebpf", "certificate_not_after": 1700072000, "source": "cni"},
  {"key": "0c1d55", "name": "coredns-7d", "namespace": "kube-system", "service_account": null, "identity": null,
   "netns": "/var/run/netns/cni-0c1d", "cgroup": null, "addresses": ["10.88.0.4"], "mode": "iptables",
   "certificate_not_after": null, "source": "cni", "listeners": ["127.0.0.1:15001"]},
  {"name": "web-0", "namespace": "shop", "service_account": "web",
   "identity": "spiffe://cluster.local/ns/shop/sa/web", "netns": "host", "cgroup": "/sys/fs/cgroup/mesh/web",
   "addresses": ["10.77.0.1"], "mode": "ebpf", "certificate_not_after": null, "source": "static"},
  {"name": "api-0", "namespace": "shop", "service_account": "api",
   "identity": "spiffe://cluster.local/ns/shop/sa/api", "netns": "/var/run/netns/cni-7f3e", "cgroup": null,
   "addresses": ["10.88.0.3"], "mode": "ebpf", "certificate_not_after": 1699999400, "source": "cni"}
]"#;

pub fn workloads() -> Vec<super::workloads::WorkloadView> {
    serde_json::from_str(WORKLOADS).expect("workloads fixture")
}

pub fn control_dump() -> ControlDump {
    serde_json::from_str(CONTROL_DUMP).expect("control fixture")
}

pub fn agent_dump() -> AgentDump {
    serde_json::from_str(AGENT_DUMP).expect("agent fixture")
}

/// Shaped like `control::admin` `/federation` (`control::federation::FederationStatus`):
/// one link working, one refused, one not yet called.
pub const FEDERATION: &str = r#"{
  "cluster": "east", "trust_domain": "east.local", "gateways": ["10.77.0.5:15443"],
  "peers": [
    {"name": "west", "trust_domain": "west.local", "url": "https://10.77.0.1:15010", "state": "ok",
     "last_success_unix": 996, "last_error": null, "imported_services": 3, "roots": 2,
     "gateways": ["10.77.0.9:15443"]},
    {"name": "north", "trust_domain": "north.local", "url": "https://10.78.0.1:15010", "state": "error",
     "last_success_unix": null,
     "last_error": "https://10.78.0.1:15010 answered Unauthenticated: not a federated cluster, or not its token",
     "imported_services": 0, "roots": 1, "gateways": []},
    {"name": "south", "trust_domain": "south.local", "url": "https://10.79.0.1:15010", "state": "pending",
     "last_success_unix": null, "last_error": null, "imported_services": 0, "roots": 0, "gateways": []}
  ]
}"#;

pub fn federation() -> FederationView {
    serde_json::from_str(FEDERATION).expect("federation fixture")
}

//! The names and addresses the serving certificate is issued for.
//!
//! An agent checks that the certificate names what it dialled, so the certificate
//! must cover every way agents reach the control plane: the host name, the listen
//! address when it is a specific one (every address of the host's interfaces when
//! it listens on all of them), in a cluster the Service's DNS names, and whatever
//! `--tls-san` adds (a load balancer's name, a NAT address).

use std::net::{IpAddr, SocketAddr};

use crate::ca::serving::ServingNames;

/// The Service agents reach the control plane through in a cluster (deploy/).
pub const SERVICE_NAME: &str = "mesh-control";

/// Where the control plane runs in a cluster, for the Service's DNS names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InCluster {
    /// The control plane's namespace.
    pub namespace: String,
    /// The cluster DNS suffix ("cluster.local").
    pub cluster_domain: String,
}

impl InCluster {
    /// The namespace from `POD_NAMESPACE`, else the mounted service account's, else
    /// `mesh-system` (the manifests' namespace).
    pub fn from_environment(cluster_domain: &str) -> InCluster {
        let namespace = std::env::var("POD_NAMESPACE")
            .ok()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok()
            })
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "mesh-system".to_owned());
        InCluster { namespace, cluster_domain: cluster_domain.to_owned() }
    }
}

/// A `--tls-san` value: an IP address or a DNS name.
pub fn parse_san(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.parse::<IpAddr>().is_ok() || is_dns_name(value) {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is neither an IP address nor a DNS name"))
    }
}

fn is_dns_name(s: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(label)
}

/// Everything the certificate must name: `extra` (checked [`parse_san`] values), the
/// host name, the listen address or the interfaces' addresses, and the Service's names.
pub fn serving_names(
    listen: SocketAddr,
    extra: &[String],
    host_name: Option<String>,
    interfaces: &[IpAddr],
    cluster: Option<&InCluster>,
) -> ServingNames {
    let mut names = ServingNames::default();
    let mut add = |value: &str| match value.parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            if !names.ips.contains(&ip) {
                names.ips.push(ip);
            }
        }
        Err(_) => {
            let dns = value.to_ascii_lowercase();
            if !names.dns.contains(&dns) {
                names.dns.push(dns);
            }
        }
    };
    for e in extra {
        add(e);
    }
    if let Some(host) = host_name.filter(|h| is_dns_name(h)) {
        add(&host);
    }
    add("localhost");
    if listen.ip().is_unspecified() {
        // Link-local addresses need a scope that cannot be dialled by name; skip them.
        for ip in interfaces.iter().filter(|ip| !is_link_local(ip)) {
            add(&ip.to_string());
        }
    } else {
        add(&listen.ip().to_string());
    }
    if let Some(c) = cluster {
        let ns = &c.namespace;
        for name in [
            SERVICE_NAME.to_owned(),
            format!("{SERVICE_NAME}.{ns}"),
            format!("{SERVICE_NAME}.{ns}.svc"),
            format!("{SERVICE_NAME}.{ns}.svc.{}", c.cluster_domain),
        ] {
            add(&name);
        }
    }
    names
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// This host's name, if it has one.
pub fn host_name() -> Option<String> {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok())
}

/// The addresses of this host's interfaces (empty when they cannot be read).
pub fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_specific_listen_address_is_named_alone_with_the_host_and_extras() {
        let names = serving_names(
            "10.77.0.1:15010".parse().unwrap(),
            &["cp.example.com".into(), "192.0.2.7".into()],
            Some("Node-1".into()),
            &["10.77.0.1".parse().unwrap(), "172.17.0.1".parse().unwrap()],
            None,
        );
        assert_eq!(names.dns, ["cp.example.com", "node-1", "localhost"]);
        assert_eq!(names.ips, ["192.0.2.7".parse::<IpAddr>().unwrap(), "10.77.0.1".parse().unwrap()]);
    }

    #[test]
    fn listening_everywhere_names_every_interface_but_link_local_ones() {
        let interfaces: Vec<IpAddr> = ["127.0.0.1", "10.77.0.1", "fe80::1", "fd77::1", "::ffff:10.77.0.1"]
            .map(|s| s.parse().unwrap())
            .to_vec();
        let names = serving_names("0.0.0.0:15010".parse().unwrap(), &[], None, &interfaces, None);
        let ips: Vec<String> = names.ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["127.0.0.1", "10.77.0.1", "fd77::1"]);
    }

    #[test]
    fn in_a_cluster_the_service_names_are_covered() {
        let cluster = InCluster { namespace: "mesh-system".into(), cluster_domain: "cluster.local".into() };
        let names = serving_names("0.0.0.0:15010".parse().unwrap(), &[], None, &[], Some(&cluster));
        assert_eq!(
            names.dns,
            [
                "localhost",
                "mesh-control",
                "mesh-control.mesh-system",
                "mesh-control.mesh-system.svc",
                "mesh-control.mesh-system.svc.cluster.local"
            ]
        );
    }

    #[test]
    fn sans_are_addresses_or_dns_names() {
        assert_eq!(parse_san(" 10.0.0.1 ").unwrap(), "10.0.0.1");
        assert_eq!(parse_san("fd00::1").unwrap(), "fd00::1");
        assert_eq!(parse_san("cp.example.com").unwrap(), "cp.example.com");
        for bad in ["", "*.example.com", "a b", "-cp.example", "http://cp"] {
            assert!(parse_san(bad).is_err(), "{bad:?}");
        }
    }
}

//! The federation file (`mesh-control --federation FILE`): this cluster's name and
//! gateways, and the clusters it federates with.
//!
//! Read once at start and refused whole, naming the field (`peers[1].url: ...`), when
//! anything in it is wrong: a link half configured is worse than none. The files it
//! points to are not read here: a peer's bundle may appear later, and tokens are
//! re-read on every call so they can be rotated without a restart.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tonic::transport::Uri;

use crate::registry::file::is_dns_label;

/// How often each peer is asked when the file does not say.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5);
/// The shortest `refresh`: a peer is another cluster's control plane, not ours to
/// load in a loop.
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
/// Peers one control plane federates with, at most.
pub const MAX_PEERS: usize = 64;
/// Gateways of one cluster, at most (ours in the file, a peer's in its answer).
pub const MAX_GATEWAYS: usize = 16;

/// Why the federation file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid { file: String, field: String, message: String },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: String,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    refresh: Option<Duration>,
    #[serde(default)]
    peers: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    trust_domain: String,
    url: String,
    bundle_file: PathBuf,
    token_file: PathBuf,
}

/// A valid federation file, with this cluster's trust domain (`--trust-domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// This cluster's name, as its peers' files name it.
    pub cluster: String,
    /// This cluster's trust domain (from `--trust-domain`, not the file).
    pub trust_domain: String,
    /// Where peers' agents reach this cluster's agents (`IP:port`).
    pub gateways: Vec<String>,
    /// How often each peer is asked for its exports.
    pub refresh: Duration,
    pub peers: Vec<PeerConfig>,
}

/// One federated cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its name: the suffix of the services imported from it and of their hostnames.
    pub name: String,
    pub trust_domain: String,
    /// Its control plane's gRPC endpoint (`https://host:port`).
    pub url: String,
    /// The URL's host, the name its serving certificate is checked for.
    pub host: String,
    pub port: u16,
    /// Its initial roots (PEM), trusted until it sends its own.
    pub bundle_file: PathBuf,
    /// The link's shared secret: the same content on both sides.
    pub token_file: PathBuf,
}

impl FederationConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path, trust_domain: &str) -> Result<FederationConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        parse(&file, &text, trust_domain)
    }

    /// The peer called `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }
}

/// Checks the file's text; `file` names it in errors.
pub fn parse(file: &str, text: &str, trust_domain: &str) -> Result<FederationConfig, ConfigError> {
    let raw: RawFile = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigError::Syntax { file: file.to_owned(), message: e.to_string() })?;
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        file: file.to_owned(),
        field: field.to_owned(),
        message,
    };
    if !is_dns_label(&raw.cluster) {
        return Err(invalid(
            "cluster",
            format!("{:?} is not a DNS label (lowercase a-z, 0-9, '-')", raw.cluster),
        ));
    }
    if raw.gateways.len() > MAX_GATEWAYS {
        return Err(invalid(
            "gateways",
            format!("{} gateways, more than {MAX_GATEWAYS}", raw.gateways.len()),
        ));
    }
    for (i, g) in raw.gateways.iter().enumerate() {
        check_gateway(g).map_err(|m| invalid(&format!("gateways[{i}]"), m))?;
    }
    let refresh = raw.refresh.unwrap_or(DEFAULT_REFRESH);
    if refresh < MIN_REFRESH {
        return Err(invalid(
            "refresh",
            format!("{} is shorter than 100ms", humantime::format_duration(refresh)),
        ));
    }
    if raw.peers.len() > MAX_PEERS {
        return Err(invalid("peers", format!("{} peers, more than {MAX_PEERS}", raw.peers.len())));
    }
    let (mut names, mut domains) = (HashSet::new(), HashSet::new());
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.into_iter().enumerate() {
        let field = |f: &str| format!("peers[{i}].{f}");
        if !is_dns_label(&p.name) {
            return Err(invalid(
                &field("name"),
                format!("{:?} is not a DNS label (lowercase a-z, 0-9, '-')", p.name),
            ));
        }
        if p.name == raw.cluster {
            return Err(invalid(&field("name"), format!("{:?} is this cluster's own name", p.name)));
        }
        if !names.insert(p.name.clone()) {
            return Err(invalid(&field("name"), format!("{:?} names another peer already", p.name)));
        }
        mesh_api::spiffe::validate_trust_domain(&p.trust_domain)
            .map_err(|e| invalid(&field("trust_domain"), e.to_string()))?;
        if p.trust_domain == trust_domain {
            return Err(invalid(
                &field("trust_domain"),
                format!(
                    "{:?} is this cluster's own --trust-domain: federated clusters need their own",
                    p.trust_domain
                ),
            ));
        }
        if !domains.insert(p.trust_domain.clone()) {
            return Err(invalid(
                &field("trust_domain"),
                format!("{:?} is another peer's already", p.trust_domain),
            ));
        }
        let (host, port) = check_url(&p.url).map_err(|m| invalid(&field("url"), m))?;
        for (f, path) in [("bundle_file", &p.bundle_file), ("token_file", &p.token_file)] {
            if path.as_os_str().is_empty() {
                return Err(invalid(&field(f), "missing: a file path is required".into()));
            }
        }
        peers.push(PeerConfig {
            name: p.name,
            trust_domain: p.trust_domain,
            url: p.url,
            host,
            port,
            bundle_file: p.bundle_file,
            token_file: p.token_file,
        });
    }
    Ok(FederationConfig {
        cluster: raw.cluster,
        trust_domain: trust_domain.to_owned(),
        gateways: raw.gateways,
        refresh,
        peers,
    })
}

/// A gateway as peers dial it: an IP address and a port (peers' agents do not
/// resolve names of another cluster).
pub fn check_gateway(g: &str) -> Result<(), String> {
    match g.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(()),
        Ok(_) => Err(format!("{g:?}: port 0 cannot be dialled")),
        Err(_) => Err(format!("{g:?} is not IP:port (an IPv6 address in brackets)")),
    }
}

/// The host and port of a peer's `https://host[:port]` URL.
fn check_url(url: &str) -> Result<(String, u16), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{url:?}: only https:// (the token must not travel in clear)"));
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{url:?}: no path or query, only https://host:port"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
cluster: east
gateways: [\"10.77.0.5:15443\"]
refresh: 2s
peers:
  - name: west
    trust_domain: west.local
    url: https://10.77.0.1:15010
    bundle_file: /etc/mesh/west-root.pem
    token_file: /etc/mesh/west.token
";

    #[test]
    fn a_good_file_is_read_with_defaults() {
        let c = parse("fed.yaml", GOOD, "east.local").unwrap();
        assert_eq!((c.cluster.as_str(), c.trust_domain.as_str()), ("east", "east.local"));
        assert_eq!(c.refresh, Duration::from_secs(2));
        let p = &c.peers[0];
        assert_eq!((p.host.as_str(), p.port), ("10.77.0.1", 15010));
        assert_eq!(c.peer("west"), Some(p));
        let minimal = parse("fed.yaml", "cluster: east\n", "east.local").unwrap();
        assert_eq!(minimal.refresh, DEFAULT_REFRESH);
        assert!(minimal.peers.is_empty() && minimal.gateways.is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        let second = |peer: &str| {
            format!(
                "cluster: east\npeers:\n  - {{name: west, trust_domain: west.local, url: \"https://w:1\", \
                 bundle_file: /b, token_file: /t}}\n  - {peer}\n"
            )
        };
        let peer = |name: &str, td: &str, url: &str| {
            format!("{{name: {name}, trust_domain: {td}, url: \"{url}\", bundle_file: /b, token_file: /t}}")
        };
        let cases = [
            ("cluster: East\n".to_owned(), "cluster: \"East\" is not a DNS label"),
            ("cluster: east\ngateways: [\"gw:15443\"]\n".into(), "gateways[0]: \"gw:15443\" is not IP:port"),
            ("cluster: east\nrefresh: 10ms\n".into(), "refresh: 10ms is shorter than 100ms"),
            ("cluster: east\nrefresh: soon\n".into(), "refresh"),
            ("cluster: east\nextra: 1\n".into(), "unknown field `extra`"),
            (second(&peer("west", "w2.local", "https://w:1")), "peers[1].name: \"west\" names another peer"),
            (
                second(&peer("east", "w2.local", "https://w:1")),
                "peers[1].name: \"east\" is this cluster's own",
            ),
            (
                second(&peer("north", "west.local", "https://w:1")),
                "peers[1].trust_domain: \"west.local\" is another",
            ),
            (
                second(&peer("north", "east.local", "https://w:1")),
                "peers[1].trust_domain: \"east.local\" is this",
            ),
            (second(&peer("north", "North", "https://w:1")), "peers[1].trust_domain: invalid trust domain"),
            (second(&peer("north", "n.local", "http://n:1")), "peers[1].url: \"http://n:1\": only https://"),
            (second(&peer("north", "n.local", "https://n:1/x")), "peers[1].url: \"https://n:1/x\": no path"),
            (second(&peer("north", "n.local", "not a url")), "peers[1].url: \"not a url\" is not a URL"),
            (
                second(
                    "{name: north, trust_domain: n.local, url: \"https://n:1\", bundle_file: \"\", token_file: /t}",
                ),
                "peers[1].bundle_file: missing",
            ),
            (
                second("{name: north, trust_domain: n.local, url: \"https://n:1\", bundle_file: /b}"),
                "missing field `token_file`",
            ),
        ];
        for (text, want) in cases {
            let e = parse("fed.yaml", &text, "east.local").unwrap_err().to_string();
            assert!(e.starts_with("fed.yaml: ") && e.contains(want), "{text}\n-> {e}\nwant {want}");
        }
    }
}

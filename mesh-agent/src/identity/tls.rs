//! rustls configurations for agent-to-agent mTLS: TLS 1.3 only, ALPN `h2` (the
//! CONNECT tunnel) or [`ALPN_MESH_HTTP`] (HTTP requests carried directly), SPIFFE
//! identities on both sides.
//!
//! Configurations read the workload's certificate and the trust bundle at each
//! handshake, so they can be built once per identity (server) or per
//! destination (client) and still follow renewals and root rotations. Session
//! resumption is off: every connection proves its identity with a full
//! handshake against the current bundle.

use std::sync::Arc;

use mesh_api::spiffe::SpiffeId;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};

use super::cert::WorkloadIdentity;
use super::clock::{Clock, RustlsTime};
use super::error::IdentityError;
use super::trust::TrustBundle;
use super::verify::{ClientIdentityVerifier, ServerIdentityVerifier};

/// The ALPN protocol agents speak over mTLS (the HTTP/2 CONNECT tunnel).
pub const ALPN_H2: &[u8] = b"h2";

/// The ALPN protocol of a connection carrying proxied HTTP requests themselves as
/// HTTP/2 streams, each naming its target in a header, instead of CONNECT streams
/// with HTTP inside: one framing layer and one parse fewer per request on both
/// agents. A server that does not offer it (an older agent) answers `h2`, and the
/// client falls back to the tunnel.
pub const ALPN_MESH_HTTP: &[u8] = b"mesh-http/1";

/// The ring provider with AES-128-GCM first among the TLS 1.3 suites.
///
/// rustls puts AES-256-GCM first, whose key schedule runs on SHA-384 (SHA-512's
/// compression, without the SHA-NI instructions SHA-256 gets) and whose cipher takes
/// 14 rounds per block to AES-128's 10. Between agents the 128-bit suite matches
/// the P-256 keys' strength, and it is what BoringSSL and therefore Envoy prefer.
/// Both suites stay offered, so an agent with rustls' order still agrees with this
/// one; a client's order decides what the pair uses.
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// Builds mTLS configurations over one trust bundle and clock.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    bundle: Arc<TrustBundle>,
    clock: Arc<dyn Clock>,
    provider: Arc<CryptoProvider>,
}

impl TlsConfigs {
    /// Configurations verifying against `bundle` at `clock`'s time.
    pub fn new(bundle: Arc<TrustBundle>, clock: Arc<dyn Clock>) -> TlsConfigs {
        TlsConfigs { bundle, clock, provider: Arc::new(provider()) }
    }

    /// The trust bundle the verifiers read.
    pub fn trust_bundle(&self) -> &Arc<TrustBundle> {
        &self.bundle
    }

    /// A client configuration presenting `source`'s current certificate and accepting
    /// only a server that proves `expected`. The server name passed to `connect` is
    /// not checked (and SNI is not sent): pass the peer's IP address.
    pub fn client_config(
        &self,
        source: Arc<WorkloadIdentity>,
        expected: SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let verifier = Arc::new(ServerIdentityVerifier { bundle: self.bundle.clone(), expected });
        let mut config = ClientConfig::builder_with_details(self.provider.clone(), self.time())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(source);
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A server configuration presenting `identity`'s current certificate and requiring
    /// a client certificate of the local trust domain. Read the client's identity after
    /// the handshake with [`super::peer_identity`].
    pub fn server_config(&self, identity: Arc<WorkloadIdentity>) -> Result<Arc<ServerConfig>, IdentityError> {
        let verifier = Arc::new(ClientIdentityVerifier { bundle: self.bundle.clone() });
        let mut config = ServerConfig::builder_with_details(self.provider.clone(), self.time())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(identity);
        // The server's order decides: a client offering both gets direct HTTP.
        config.alpn_protocols = vec![ALPN_MESH_HTTP.to_vec(), ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    fn time(&self) -> Arc<RustlsTime> {
        Arc::new(RustlsTime(self.clock.clone()))
    }
}

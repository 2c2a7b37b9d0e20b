//! The agent's [`CertificateSigner`]: `Certificates.Sign` on the control plane,
//! over the control channel (TLS, the node's credential read on every call).
//! Every trust bundle the CA sends, with a certificate or on its own, must be
//! vouched for by the agent's [`TrustAnchor`](super::TrustAnchor) before it is used.

use std::sync::Arc;

use mesh_api as api;
use mesh_api::certificates_client::CertificatesClient;
use rustls::pki_types::CertificateDer;
use tonic::transport::Channel;

use super::{CertificateRequest, CertificateSigner, SignFuture, SignedCertificate, SignerError};
use crate::control_channel::ControlPlane;

/// Signs through the control plane's CA.
#[derive(Clone)]
pub struct GrpcSigner {
    channel: Channel,
    control: Arc<ControlPlane>,
    node: String,
}

fn err(msg: String) -> SignerError {
    SignerError(msg.into())
}

/// Back to PEM, as the identity code takes roots.
fn to_pem(roots: &[CertificateDer<'_>]) -> Vec<String> {
    roots.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).collect()
}

impl GrpcSigner {
    pub fn new(channel: Channel, control: Arc<ControlPlane>, node: String) -> Self {
        Self { channel, control, node }
    }

    fn authorize<T>(&self, msg: T) -> Result<tonic::Request<T>, SignerError> {
        self.control.authorize(msg).map_err(|e| err(e.to_string()))
    }

    /// The CA's current roots (the trust bundle), once the trust anchor vouched for
    /// them: the trust domain and the accepted roots (PEM).
    pub async fn trust_bundle(&self) -> Result<(String, Vec<String>), SignerError> {
        let req = self.authorize(api::TrustBundleRequest {})?;
        let resp = CertificatesClient::new(self.channel.clone())
            .trust_bundle(req)
            .await
            .map_err(|s| err(format!("TrustBundle: {:?}: {}", s.code(), s.message())))?
            .into_inner();
        let roots = self.vouched(&resp.trust_domain, &resp.roots_pem, &resp.cross_signed_pem)?;
        Ok((resp.trust_domain, roots))
    }

    /// `roots` as PEM once the anchor vouched for them; a refusal is logged (naming
    /// the anchor) and returned.
    fn vouched(
        &self,
        trust_domain: &str,
        roots: &[String],
        cross: &[String],
    ) -> Result<Vec<String>, SignerError> {
        match self.control.anchor().accept(trust_domain, roots, cross) {
            Ok(accepted) => Ok(to_pem(&accepted)),
            Err(e) => {
                tracing::error!(error = %e, control_plane = %self.control.url(), "refused the CA's trust bundle");
                Err(err(e.to_string()))
            }
        }
    }
}

impl CertificateSigner for GrpcSigner {
    fn sign(&self, request: CertificateRequest) -> SignFuture<'_> {
        Box::pin(async move {
            let msg = api::SignRequest {
                csr_pem: request.csr_pem,
                namespace: request.id.namespace().to_owned(),
                service_account: request.id.service_account().to_owned(),
                ttl_seconds: request.ttl.map_or(0, |t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
                node: self.node.clone(),
            };
            let req = self.authorize(msg)?;
            let resp = CertificatesClient::new(self.channel.clone())
                .sign(req)
                .await
                .map_err(|s| err(format!("Sign {}: {:?}: {}", request.id, s.code(), s.message())))?
                .into_inner();
            // A certificate comes with the CA's roots: they replace the trust bundle
            // only when the anchor vouches for them, or nothing is taken.
            let trust_bundle_pem = if resp.trust_bundle_pem.is_empty() {
                Vec::new()
            } else {
                self.vouched(request.id.trust_domain(), &resp.trust_bundle_pem, &resp.cross_signed_pem)?
            };
            Ok(SignedCertificate { chain_pem: resp.cert_chain_pem, trust_bundle_pem })
        })
    }
}

/// For `Arc<dyn CertificateSigner>` call sites.
pub fn shared(s: GrpcSigner) -> Arc<dyn CertificateSigner> {
    Arc::new(s)
}

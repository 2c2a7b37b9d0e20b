//! The agent's [`CertificateSigner`]: `Certificates.Sign` on the control plane,
//! authenticated with the node's bootstrap token (read from its file on every
//! call, so a rotated token is picked up without a restart).

use std::{path::PathBuf, sync::Arc};

use mesh_api as api;
use mesh_api::certificates_client::CertificatesClient;
use tonic::transport::Channel;

use super::{CertificateRequest, CertificateSigner, SignFuture, SignedCertificate, SignerError};

/// Signs through the control plane's CA.
#[derive(Clone)]
pub struct GrpcSigner {
    channel: Channel,
    node: String,
    token_file: PathBuf,
}

fn err(msg: String) -> SignerError {
    SignerError(msg.into())
}

impl GrpcSigner {
    pub fn new(channel: Channel, node: String, token_file: PathBuf) -> Self {
        Self { channel, node, token_file }
    }

    fn authorize<T>(&self, msg: T) -> Result<tonic::Request<T>, SignerError> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| err(format!("reading the bootstrap token {}: {e}", self.token_file.display())))?;
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| err(format!("{}: the token is not valid header text", self.token_file.display())))?;
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }

    /// The CA's current roots (the trust bundle), to start verifying peers.
    pub async fn trust_bundle(&self) -> Result<(String, Vec<String>), SignerError> {
        let req = self.authorize(api::TrustBundleRequest {})?;
        let resp = CertificatesClient::new(self.channel.clone())
            .trust_bundle(req)
            .await
            .map_err(|s| err(format!("TrustBundle: {:?}: {}", s.code(), s.message())))?
            .into_inner();
        Ok((resp.trust_domain, resp.roots_pem))
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
            Ok(SignedCertificate { chain_pem: resp.cert_chain_pem, trust_bundle_pem: resp.trust_bundle_pem })
        })
    }
}

/// For `Arc<dyn CertificateSigner>` call sites.
pub fn shared(s: GrpcSigner) -> Arc<dyn CertificateSigner> {
    Arc::new(s)
}

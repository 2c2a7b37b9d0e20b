//! A peer's roots as PEM text: from its bundle file or its answer, checked to be
//! X.509 certificates and split one per entry, as `FederatedDomain.roots_pem` and
//! the TLS verifier take them.

use rustls::pki_types::CertificateDer;

/// Roots one peer may have at once (a rotation keeps the old beside the new).
pub const MAX_ROOTS: usize = 16;
/// Bytes of PEM one root may take, and a bundle file at most.
pub const MAX_ROOT_PEM_BYTES: usize = 16 * 1024;
pub const MAX_BUNDLE_BYTES: usize = MAX_ROOTS * MAX_ROOT_PEM_BYTES;

/// Every certificate in `text`, one PEM string each; an error when there is none,
/// too many, or a block that is not an X.509 certificate.
pub fn certificates(text: &str) -> Result<Vec<String>, String> {
    if text.len() > MAX_BUNDLE_BYTES {
        return Err(format!("{} bytes of PEM, more than {MAX_BUNDLE_BYTES}", text.len()));
    }
    let blocks = pem::parse_many(text).map_err(|e| format!("not PEM: {e}"))?;
    let mut out = Vec::with_capacity(blocks.len());
    for block in blocks {
        if block.tag() != "CERTIFICATE" {
            return Err(format!("a {:?} block where only certificates belong", block.tag()));
        }
        x509_parser::parse_x509_certificate(block.contents())
            .map_err(|e| format!("a CERTIFICATE block that is not an X.509 certificate: {e}"))?;
        if out.len() == MAX_ROOTS {
            return Err(format!("more than {MAX_ROOTS} certificates"));
        }
        // LF line endings, as the CA writes its own roots.
        out.push(pem::encode_config(&block, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF)));
    }
    if out.is_empty() {
        return Err("no certificate".into());
    }
    Ok(out)
}

/// The certificates of each of `entries` (each one or more PEM blocks).
pub fn all_certificates(entries: &[String]) -> Result<Vec<String>, String> {
    if entries.iter().any(|e| e.len() > MAX_BUNDLE_BYTES) {
        return Err(format!("a root of more than {MAX_BUNDLE_BYTES} bytes"));
    }
    let mut out = Vec::new();
    for e in entries {
        out.extend(certificates(e)?);
        if out.len() > MAX_ROOTS {
            return Err(format!("more than {MAX_ROOTS} certificates"));
        }
    }
    if out.is_empty() {
        return Err("no certificate".into());
    }
    Ok(out)
}

/// `roots` (checked PEM) as DER for a verifier's root store.
pub fn der(roots: &[String]) -> Vec<CertificateDer<'static>> {
    roots.iter().filter_map(|r| pem::parse(r).ok()).map(|p| CertificateDer::from(p.into_contents())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(vec!["root".into()]).unwrap().self_signed(&key).unwrap().pem()
    }

    #[test]
    fn bundles_are_split_and_checked() {
        let (a, b) = (cert(), cert());
        let both = certificates(&format!("{a}\n{b}")).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(der(&both).len(), 2);
        assert!(certificates("").unwrap_err().contains("no certificate"));
        assert!(
            certificates("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .contains("PRIVATE KEY")
        );
        assert!(
            certificates("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .unwrap_err()
                .contains("not an X.509")
        );
        assert!(all_certificates(&vec![a; MAX_ROOTS + 1]).unwrap_err().contains("more than"));
    }
}

//! Checking a PKCS#10 request before anything is signed.
//!
//! The CA takes only the public key from a request; everything else in the
//! issued certificate is the CA's choice. The request still has to prove
//! possession of the key (its signature), use the one key type the mesh issues
//! for, and name exactly the identity the requester was authorized for.

use mesh_api::spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, Oid};
use x509_parser::prelude::FromDer;

use super::error::SignError;

/// The largest PEM request accepted. A P-256 request with one SAN is well under 1 KiB.
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// A request that passed every check: its public key, ready to be certified.
#[derive(Debug)]
pub(crate) struct CheckedCsr {
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub spki_der: Vec<u8>,
}

/// Parses `csr_pem` and checks size, form, key type, signature and identity, in that order.
pub(crate) fn check(csr_pem: &str, expected: &SpiffeId) -> Result<CheckedCsr, SignError> {
    if csr_pem.len() > MAX_CSR_PEM_LEN {
        return Err(SignError::TooLarge { len: csr_pem.len(), max: MAX_CSR_PEM_LEN });
    }
    let (rest, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| SignError::MalformedPem(e.to_string()))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(SignError::MalformedPem(format!("found a {:?} block", pem.label)));
    }
    if !rest.trim_ascii().is_empty() {
        return Err(SignError::MalformedPem("more than one block".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|e| SignError::MalformedCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SignError::MalformedCsr("trailing bytes after the request".into()));
    }

    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
    let point = &spki.subject_public_key.data;
    let is_p256 = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve.as_ref() == Some(&OID_EC_P256)
        // An uncompressed point: 0x04 || X || Y, as certificate verifiers expect.
        && point.len() == 65
        && point.first() == Some(&0x04);
    if !is_p256 {
        let mut key = describe_key(&spki.algorithm.algorithm, curve.as_ref());
        if curve.as_ref() == Some(&OID_EC_P256) {
            key.push_str(" with a compressed or malformed point");
        }
        return Err(SignError::UnsupportedKey(key));
    }

    // The key is certified exactly as the signature check read it, in the one DER form
    // a P-256 key has: a request that encodes it any other way (x509-parser reads some
    // wrong tags leniently) is refused rather than re-read by another parser.
    let spki_der = p256_spki(point);
    if spki.raw != spki_der.as_slice() {
        return Err(SignError::MalformedCsr("the public key is not in DER form".into()));
    }
    csr.verify_signature().map_err(|_| SignError::BadSignature)?;

    let mut found = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                found.extend(san.general_names.iter().map(describe_name));
            }
            ParsedExtension::ParseError { error } => {
                return Err(SignError::MalformedCsr(format!("requested extension: {error}")));
            }
            // Key usages, basic constraints and the rest are the CA's to decide: ignored.
            _ => {}
        }
    }
    let wanted = format!("URI:{expected}");
    if found != [wanted] {
        return Err(SignError::IdentityMismatch { expected: expected.to_string(), found });
    }
    Ok(CheckedCsr { spki_der })
}

/// DER `SubjectPublicKeyInfo` of the P-256 key with uncompressed point `point`
/// (RFC 5480): id-ecPublicKey, the prime256v1 curve, then the point as a BIT STRING.
fn p256_spki(point: &[u8]) -> Vec<u8> {
    const PREFIX: [u8; 26] = [
        0x30, 0x59, // SEQUENCE, 89 bytes
        0x30, 0x13, // AlgorithmIdentifier
        0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, // prime256v1
        0x03, 0x42, 0x00, // BIT STRING, 66 bytes, no unused bits
    ];
    let mut der = Vec::with_capacity(PREFIX.len() + point.len());
    der.extend_from_slice(&PREFIX);
    der.extend_from_slice(point);
    der
}

/// Names a general name the way `openssl` prints it, so refusals are easy to read.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI:{uri}"),
        GeneralName::DNSName(dns) => format!("DNS:{dns}"),
        GeneralName::RFC822Name(mail) => format!("email:{mail}"),
        other => other.to_string(),
    }
}

fn describe_key(algorithm: &Oid<'_>, curve: Option<&Oid<'_>>) -> String {
    let name = |oid: &Oid<'_>| match oid.to_id_string().as_str() {
        "1.2.840.113549.1.1.1" => "RSA".to_owned(),
        "1.2.840.10045.2.1" => "EC".to_owned(),
        "1.2.840.10045.3.1.7" => "P-256".to_owned(),
        "1.3.132.0.34" => "P-384".to_owned(),
        "1.3.132.0.35" => "P-521".to_owned(),
        "1.3.101.112" => "Ed25519".to_owned(),
        other => other.to_owned(),
    };
    match curve {
        Some(curve) => format!("{} {}", name(algorithm), name(curve)),
        None => name(algorithm),
    }
}

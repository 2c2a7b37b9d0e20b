//! CSR handling in the CA (`control::ca::Ca::sign_at`, which checks the request in
//! `ca/csr.rs` and then signs).
//!
//! Input: a mode byte, a lifetime byte, then
//! - mode 0: the PEM text an agent sends;
//! - mode 1: the DER of a request, which the target wraps in PEM;
//! - mode 2: the DER of a `CertificationRequestInfo` (what a request signs), which
//!   the target signs with a fixed P-256 key and wraps: requests with a valid
//!   signature, so the fuzzer gets past the signature check to the extensions and
//!   names behind it.
//!
//! Asserts, beyond "no panic": a request is signed only when it is, read on its own
//! with x509-parser, a P-256 request whose signature verifies and whose subject
//! alternative names are exactly the identity asked for; and what is signed is a leaf
//! (not a CA) for that one identity, for the request's key, under the CA's root,
//! within the lifetime asked for. A refused request produces no certificate (by type)
//! and an error that says why.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use control::ca::{Ca, CaConfig, FileStore, SpiffeId};
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The key mode 2 signs with (PKCS#8). Seeds in mode 2 carry its public half.
const FUZZ_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgEMnYcnlWKs5NVynG
2GGX7b4lFYyobwknUBO1Xu93xRChRANCAARQiY2lV4Br6z/79EbHRMNwvsFHF91O
aD8Blq6JtroamgZTtkBC9FkxWYk8zDDrPQLaO+PsGzuaYUudkHEVm+TJ
-----END PRIVATE KEY-----
";

/// `AlgorithmIdentifier` of ecdsa-with-SHA256.
const ECDSA_SHA256: [u8; 12] = [0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

/// When every request is signed: certificates' times are then the same on every run.
const NOW: Duration = Duration::from_secs(1_800_000_000);

struct Fixture {
    ca: Ca,
    root: Vec<u8>,
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-ca-{}", std::process::id()));
        let ca = mesh_fuzz::block_on(Ca::open(CaConfig::default(), &FileStore::new(&dir))).expect("a CA");
        // The key is in memory now; nothing needs the directory any more.
        let _ = std::fs::remove_dir_all(&dir);
        let root = pem_contents(&ca.trust_bundle_pem()[0]);
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pem_contents(FUZZ_KEY), &rng)
            .expect("the fuzz key");
        Fixture { ca, root, key, rng }
    })
}

fn pem_contents(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM").1.contents
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der))
}

/// A DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend(&bytes[skip..]);
    }
    out.extend(content);
    out
}

/// A request around `info`, signed with the fuzz key.
fn signed_request(f: &Fixture, info: &[u8]) -> Vec<u8> {
    let signature = f.key.sign(&f.rng, info).expect("signing");
    let mut bits = vec![0];
    bits.extend(signature.as_ref());
    let mut body = info.to_vec();
    body.extend(ECDSA_SHA256);
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// What the CA must have checked, read independently: `None` unless the request
/// is a P-256 request whose signature verifies and whose names are exactly `wanted`.
fn acceptable(csr_pem: &str, wanted: &str) -> Option<Vec<u8>> {
    let (_, block) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).ok()?;
    let (_, csr) = X509CertificationRequest::from_der(&block.contents).ok()?;
    csr.verify_signature().ok()?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != OID_EC_P256 {
        return None;
    }
    let mut names = Vec::new();
    for ext in csr.requested_extensions()? {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter().map(|n| match n {
                GeneralName::URI(uri) => format!("URI:{uri}"),
                other => format!("{other:?}"),
            }));
        }
    }
    (names == [format!("URI:{wanted}")]).then(|| spki.raw.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let [mode, ttl, ref rest @ ..] = *data else { return };
    let f = fixture();
    let csr_pem = match mode % 3 {
        0 => match std::str::from_utf8(rest) {
            Ok(text) => text.to_owned(),
            Err(_) => return,
        },
        1 => pem("CERTIFICATE REQUEST", rest),
        _ => pem("CERTIFICATE REQUEST", &signed_request(f, rest)),
    };
    let id = SpiffeId::new("cluster.local", "shop", "cart").expect("an identity");
    let wanted = id.to_string();
    let ttl = Duration::from_secs(u64::from(ttl) * 3600);
    let now = UNIX_EPOCH + NOW;

    let Ok(issued) = f.ca.sign_at(&csr_pem, &id, Some(ttl), now) else { return };

    let key = acceptable(&csr_pem, &wanted)
        .unwrap_or_else(|| panic!("signed a request that is not a P-256 request for exactly {wanted}"));
    assert_eq!(issued.chain_pem.len(), 1, "root mode sends the leaf alone");
    let der = pem_contents(&issued.chain_pem[0]);
    let (rest, leaf) = X509Certificate::from_der(&der).expect("the CA issues parseable certificates");
    assert!(rest.is_empty());
    let (_, root) = X509Certificate::from_der(&f.root).expect("the root");
    leaf.verify_signature(Some(root.public_key())).expect("the leaf is signed by the root");
    assert_eq!(leaf.public_key().raw, &key[..], "the leaf certifies another key than the request's");
    assert!(!leaf.is_ca(), "a CA certificate was issued");
    let san = leaf.subject_alternative_name().expect("one SAN extension").expect("a SAN");
    let names: Vec<&GeneralName<'_>> = san.value.general_names.iter().collect();
    assert!(matches!(names[..], [GeneralName::URI(uri)] if *uri == wanted.as_str()), "{names:?}");
    let not_after = UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp() as u64);
    let asked = if ttl.is_zero() { control::ca::DEFAULT_TTL } else { ttl.min(control::ca::DEFAULT_MAX_TTL) };
    assert!(not_after <= now + asked, "valid past the lifetime asked for");
    assert_eq!(issued.not_after, not_after);
});

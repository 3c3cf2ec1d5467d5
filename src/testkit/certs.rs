//! Test PKI: an ECDSA P-256 CA and the certificates it issues (gateway and
//! devices), plus self-signed device certificates, written as PEM files.

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};
use std::path::{Path, PathBuf};

pub struct Pki {
    pub cert: X509,
    pub key: PKey<Private>,
}

pub fn p256_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("EC key")).expect("pkey")
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().expect("name");
    n.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
    n.build()
}

fn builder(cn: &str, key: &PKey<Private>) -> openssl::x509::X509Builder {
    let mut b = X509::builder().expect("x509");
    b.set_version(2).expect("v3");
    let mut serial = BigNum::new().expect("bn");
    serial.rand(64, MsbOption::MAYBE_ZERO, false).expect("rand");
    b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
        .expect("serial");
    b.set_subject_name(&name(cn)).expect("subject");
    b.set_pubkey(key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
        .expect("nb");
    b.set_not_after(&Asn1Time::days_from_now(3650).expect("time"))
        .expect("na");
    b
}

impl Pki {
    /// A self-signed CA.
    pub fn new(cn: &str) -> Pki {
        let key = p256_key();
        let mut b = builder(cn, &key);
        b.set_issuer_name(&name(cn)).expect("issuer");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc"))
            .expect("ext");
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .expect("ku"),
        )
        .expect("ext");
        b.sign(&key, MessageDigest::sha256()).expect("sign");
        Pki {
            cert: b.build(),
            key,
        }
    }

    /// A certificate for `cn` (and SANs: IP addresses, URIs such as
    /// `urn:imei:1`, else DNS names) signed by this CA.
    pub fn issue(&self, cn: &str, sans: &[&str]) -> (X509, PKey<Private>) {
        let key = p256_key();
        let mut b = builder(cn, &key);
        b.set_issuer_name(self.cert.subject_name()).expect("issuer");
        if !sans.is_empty() {
            let mut s = SubjectAlternativeName::new();
            for n in sans {
                if n.parse::<std::net::IpAddr>().is_ok() {
                    s.ip(n);
                } else if n.contains(':') {
                    s.uri(n);
                } else {
                    s.dns(n);
                }
            }
            let ext = s
                .build(&b.x509v3_context(Some(&self.cert), None))
                .expect("san");
            b.append_extension(ext).expect("ext");
        }
        b.sign(&self.key, MessageDigest::sha256()).expect("sign");
        (b.build(), key)
    }
}

/// A self-signed end-entity certificate (devices pinned by fingerprint).
pub fn self_signed(cn: &str) -> (X509, PKey<Private>) {
    let key = p256_key();
    let mut b = builder(cn, &key);
    b.set_issuer_name(&name(cn)).expect("issuer");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    (b.build(), key)
}

/// SHA-256 fingerprint, lowercase hex.
pub fn fingerprint_hex(cert: &X509) -> String {
    cert.digest(MessageDigest::sha256())
        .expect("digest")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `name.crt` / `name.key` (PEM) into `dir`.
pub fn write_pem(dir: &Path, name: &str, cert: &X509, key: &PKey<Private>) -> (PathBuf, PathBuf) {
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert.to_pem().expect("pem")).expect("write cert");
    std::fs::write(&k, key.private_key_to_pem_pkcs8().expect("pem")).expect("write key");
    (c, k)
}

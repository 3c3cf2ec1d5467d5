//! Who a device is: its provisioned [`EndpointEntry`] (from the control
//! plane's directory), the [`Identity`] its transport established, and the
//! [`Authorizer`] that decides whether an uplink request may proceed.
//!
//! Modelled on Leshan's `Authorizer`: a request is turned into a typed
//! [`Uplink`] plus the sender's identity before any state changes, and the
//! authorizer answers yes or no. The default policy ([`DefaultAuthorizer`])
//! follows LwM2M TS 1.1 Transport §5.2.1 / §7.1: a device provisioned with
//! credentials must present them (a PSK identity equal to the provisioned
//! one, or a certificate whose subject CN is the endpoint name); a device
//! provisioned without credentials may use plain CoAP (NoSec mode).

use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One provisioned device.
///
/// Credentials (LwM2M TS 1.1 Core §E.1, Security object modes):
/// * PSK: `psk_identity` (text) or `psk_identity_hex` (bytes), and
///   `psk_key_hex`. The key is a [`Secret`]: never logged, never returned
///   by the admin API.
/// * X.509: `x509 = true` binds a CA-verified certificate whose subject CN
///   (or a DNS/URI SAN) is the endpoint name; `x509_sha256` binds one
///   certificate by its SHA-256 fingerprint (self-signed device
///   certificates).
///
/// An entry with none of these is NoSec: plain CoAP, or DTLS with a
/// CA-verified certificate naming the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub device_id: String,
    pub tenant_id: String,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// DTLS-PSK identity, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    /// DTLS-PSK identity, hex-encoded (identities that are not text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity_hex: Option<String>,
    /// DTLS-PSK key, hex-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key_hex: Option<Secret>,
    /// The device authenticates with a certificate naming the endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x509: bool,
    /// SHA-256 fingerprint (hex, colons allowed) of the device certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_sha256: Option<String>,
    /// What the bootstrap server writes to this device, and the
    /// credentials it bootstraps with (absent: the gateway's defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<Box<super::bootstrap::BootstrapSettings>>,
}

/// A secret string: serialized as is (snapshots, the WAL), but `Debug`
/// and `Display` print `<redacted>`, so it never reaches a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn default_profile() -> String {
    "default".to_string()
}

/// Lower-case hex of `b`.
pub fn encode_hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Decodes hex (whitespace and colons ignored).
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    if digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks(2)
        .map(|c| {
            let h = (c[0] as char).to_digit(16)?;
            let l = (c[1] as char).to_digit(16)?;
            Some((h * 16 + l) as u8)
        })
        .collect()
}

impl EndpointEntry {
    /// An entry without credentials.
    pub fn new(device_id: &str, tenant_id: &str, profile: &str) -> EndpointEntry {
        EndpointEntry {
            device_id: device_id.to_string(),
            tenant_id: tenant_id.to_string(),
            profile: profile.to_string(),
            psk_identity: None,
            psk_identity_hex: None,
            psk_key_hex: None,
            x509: false,
            x509_sha256: None,
            bootstrap: None,
        }
    }

    /// True when the device is provisioned with DTLS credentials.
    pub fn has_credentials(&self) -> bool {
        self.psk_identity.is_some()
            || self.psk_identity_hex.is_some()
            || self.x509
            || self.x509_sha256.is_some()
    }

    /// The PSK identity as bytes (text or decoded hex).
    pub fn psk_identity_bytes(&self) -> Option<Vec<u8>> {
        match (&self.psk_identity, &self.psk_identity_hex) {
            (Some(t), _) => Some(t.as_bytes().to_vec()),
            (None, Some(h)) => decode_hex(h),
            _ => None,
        }
    }

    /// The PSK key bytes.
    pub fn psk_key(&self) -> Option<Vec<u8>> {
        self.psk_key_hex.as_ref().and_then(|k| decode_hex(&k.0))
    }

    /// The pinned certificate fingerprint.
    pub fn x509_fingerprint(&self) -> Option<[u8; 32]> {
        self.x509_sha256
            .as_deref()
            .and_then(decode_hex)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
    }

    /// Checks the credential fields: a PSK needs an identity and a key of
    /// 1..=64 bytes (RFC 4279 §5.3: at least 64 bytes supported), a
    /// fingerprint is 32 bytes.
    pub fn validate_credentials(&self) -> Result<(), &'static str> {
        let id = self.psk_identity.is_some() || self.psk_identity_hex.is_some();
        if self.psk_identity.is_some() && self.psk_identity_hex.is_some() {
            return Err("set psk_identity or psk_identity_hex, not both");
        }
        if id != self.psk_key_hex.is_some() {
            return Err("a PSK needs both an identity and psk_key_hex");
        }
        if let Some(h) = &self.psk_identity_hex {
            match decode_hex(h) {
                Some(v) if !v.is_empty() && v.len() <= 128 => {}
                _ => return Err("psk_identity_hex must be 1..=128 bytes of hex"),
            }
        }
        if let Some(t) = &self.psk_identity {
            if t.is_empty() || t.len() > 128 {
                return Err("psk_identity must be 1..=128 bytes");
            }
        }
        if self.psk_key_hex.is_some() {
            match self.psk_key() {
                Some(k) if !k.is_empty() && k.len() <= 64 => {}
                _ => return Err("psk_key_hex must be 1..=64 bytes of hex"),
            }
        }
        if self.x509_sha256.is_some() && self.x509_fingerprint().is_none() {
            return Err("x509_sha256 must be a SHA-256 fingerprint (64 hex digits)");
        }
        Ok(())
    }

    /// The entry as the admin API shows it: the key replaced by
    /// `"psk_key": "set"`.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            if o.remove("psk_key_hex").is_some() {
                o.insert("psk_key".into(), "set".into());
            }
            if let Some(b) = o.get_mut("bootstrap") {
                super::bootstrap::config::redact(b);
            }
        }
        v
    }

    /// True when `other` authenticates differently (a session established
    /// under this entry's credentials must end).
    pub fn credentials_differ(&self, other: &EndpointEntry) -> bool {
        self.psk_identity_bytes() != other.psk_identity_bytes()
            || self.psk_key() != other.psk_key()
            || self.x509 != other.x509
            || self.x509_fingerprint() != other.x509_fingerprint()
    }
}

/// A snapshot of the directory: endpoint name → entry.
/// Persistent (structurally shared): the directory swaps in a changed copy
/// in O(log n) without copying the other entries.
pub type EndpointMap = imbl::GenericHashMap<
    String,
    Arc<EndpointEntry>,
    crate::proto::FastHasher,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// The identity a secure transport established for a peer (RFC 7252 §9.1).
/// Plain UDP peers have none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Identity {
    /// DTLS-PSK: the PSK identity of the handshake (RFC 4279: opaque bytes,
    /// usually UTF-8).
    Psk(Vec<u8>),
    /// DTLS with a certificate the handshake verified.
    X509 {
        subject_cn: String,
        /// DNS and URI subject alternative names.
        sans: Vec<String>,
        /// SHA-256 of the DER certificate.
        sha256: [u8; 32],
    },
}

impl Identity {
    /// For logs: the PSK identity (lossy text) or the subject CN.
    pub fn describe(&self) -> String {
        match self {
            Identity::Psk(id) => format!("psk:{}", String::from_utf8_lossy(id)),
            Identity::X509 { subject_cn, .. } => format!("x509:{subject_cn}"),
        }
    }
}

/// An uplink LwM2M request, as the authorizer sees it.
#[derive(Debug, Clone, Copy)]
pub enum Uplink<'a> {
    Register { endpoint: &'a str },
    Update { endpoint: &'a str },
    Deregister { endpoint: &'a str },
    Send { endpoint: &'a str },
}

impl Uplink<'_> {
    pub fn endpoint(&self) -> &str {
        match self {
            Uplink::Register { endpoint }
            | Uplink::Update { endpoint }
            | Uplink::Deregister { endpoint }
            | Uplink::Send { endpoint } => endpoint,
        }
    }
}

/// Why a request was refused (answered 4.03 Forbidden, TS 1.1 Transport
/// §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the device is provisioned with credentials and used an unsecured transport")]
    Unsecured,
    #[error("the transport identity does not match the provisioned one")]
    WrongIdentity,
}

pub trait Authorizer: Send {
    fn authorize(
        &self,
        req: Uplink<'_>,
        entry: &EndpointEntry,
        identity: Option<&Identity>,
    ) -> Result<(), Denied>;
}

/// The default policy (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultAuthorizer {
    /// Let a device provisioned with credentials use plain CoAP anyway
    /// (`dtls.allow_plain_with_credentials`; off by default: 4.03).
    pub allow_plain_with_credentials: bool,
}

impl Authorizer for DefaultAuthorizer {
    fn authorize(
        &self,
        req: Uplink<'_>,
        entry: &EndpointEntry,
        identity: Option<&Identity>,
    ) -> Result<(), Denied> {
        let names_endpoint = |cn: &str, sans: &[String]| {
            cn == req.endpoint() || sans.iter().any(|s| s == req.endpoint())
        };
        match identity {
            None if entry.has_credentials() && !self.allow_plain_with_credentials => {
                Err(Denied::Unsecured)
            }
            None => Ok(()),
            Some(Identity::Psk(id)) => match entry.psk_identity_bytes() {
                Some(p) if &p == id => Ok(()),
                _ => Err(Denied::WrongIdentity),
            },
            Some(Identity::X509 {
                subject_cn,
                sans,
                sha256,
            }) => {
                if entry.psk_identity_bytes().is_some() {
                    return Err(Denied::WrongIdentity);
                }
                match entry.x509_fingerprint() {
                    Some(f) if crate::proto::dtls::crypto::ct_eq(&f, sha256) => Ok(()),
                    Some(_) => Err(Denied::WrongIdentity),
                    None if names_endpoint(subject_cn, sans) => Ok(()),
                    None => Err(Denied::WrongIdentity),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(psk: Option<&str>) -> EndpointEntry {
        let mut e = EndpointEntry::new("d", "t", "default");
        e.psk_identity = psk.map(str::to_string);
        e.psk_key_hex = psk.map(|_| Secret("00".to_string()));
        e
    }

    fn cert(cn: &str, fp: u8) -> Identity {
        Identity::X509 {
            subject_cn: cn.into(),
            sans: vec!["urn:imei:9".into()],
            sha256: [fp; 32],
        }
    }

    #[test]
    fn default_policy() {
        let a = DefaultAuthorizer::default();
        let lax = DefaultAuthorizer {
            allow_plain_with_credentials: true,
        };
        let reg = Uplink::Register {
            endpoint: "urn:imei:1",
        };
        assert_eq!(a.authorize(reg, &entry(None), None), Ok(()));
        assert_eq!(
            a.authorize(reg, &entry(Some("id1")), None),
            Err(Denied::Unsecured)
        );
        assert_eq!(lax.authorize(reg, &entry(Some("id1")), None), Ok(()));
        let psk = Identity::Psk(b"id1".to_vec());
        assert_eq!(a.authorize(reg, &entry(Some("id1")), Some(&psk)), Ok(()));
        assert_eq!(
            a.authorize(reg, &entry(Some("id2")), Some(&psk)),
            Err(Denied::WrongIdentity)
        );
        assert_eq!(
            a.authorize(reg, &entry(None), Some(&psk)),
            Err(Denied::WrongIdentity)
        );
        // Hex identities compare as bytes.
        let mut hexe = entry(None);
        hexe.psk_identity_hex = Some("69:64:31".into());
        hexe.psk_key_hex = Some(Secret("0102".into()));
        assert_eq!(a.authorize(reg, &hexe, Some(&psk)), Ok(()));
        // Certificates: CN or SAN naming the endpoint; a PSK-provisioned
        // device may not switch to a certificate.
        assert_eq!(
            a.authorize(reg, &entry(None), Some(&cert("urn:imei:1", 1))),
            Ok(())
        );
        let by_san = Uplink::Register {
            endpoint: "urn:imei:9",
        };
        assert_eq!(
            a.authorize(by_san, &entry(None), Some(&cert("x", 1))),
            Ok(())
        );
        let other = Uplink::Update {
            endpoint: "urn:imei:2",
        };
        assert_eq!(
            a.authorize(other, &entry(None), Some(&cert("urn:imei:1", 1))),
            Err(Denied::WrongIdentity)
        );
        assert_eq!(
            a.authorize(reg, &entry(Some("id1")), Some(&cert("urn:imei:1", 1))),
            Err(Denied::WrongIdentity)
        );
        // A pinned fingerprint is the binding, whatever the CN.
        let mut pinned = entry(None);
        pinned.x509_sha256 = Some("02".repeat(32));
        assert!(pinned.has_credentials());
        assert_eq!(
            a.authorize(reg, &pinned, Some(&cert("anything", 2))),
            Ok(())
        );
        assert_eq!(
            a.authorize(reg, &pinned, Some(&cert("urn:imei:1", 3))),
            Err(Denied::WrongIdentity)
        );
        assert_eq!(a.authorize(reg, &pinned, None), Err(Denied::Unsecured));
    }

    #[test]
    fn keys_are_redacted() {
        let e = entry(Some("id1"));
        assert!(!format!("{e:?}").contains("\"00\""));
        let j = e.redacted_json();
        assert!(j.get("psk_key_hex").is_none());
        assert_eq!(j["psk_key"], "set");
        // Serialization (snapshots) keeps the key.
        assert!(serde_json::to_string(&e).unwrap().contains("psk_key_hex"));
        assert_eq!(e.validate_credentials(), Ok(()));
        let mut bad = e.clone();
        bad.psk_key_hex = None;
        assert!(bad.validate_credentials().is_err());
        let mut bad = e.clone();
        bad.psk_key_hex = Some(Secret("zz".into()));
        assert!(bad.validate_credentials().is_err());
        let mut changed = e.clone();
        changed.psk_key_hex = Some(Secret("01".into()));
        assert!(e.credentials_differ(&changed) && !e.credentials_differ(&e.clone()));
    }
}

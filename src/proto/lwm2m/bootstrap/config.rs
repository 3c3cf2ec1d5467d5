//! What the bootstrap server writes to a device: the endpoint's
//! [`BootstrapSettings`] (directory) over the gateway's [`BootstrapDefaults`]
//! (`[bootstrap]`), resolved into a [`Plan`] of Security (`/0`), Server
//! (`/1`) and Access Control (`/2`) instances.
//!
//! Object and resource numbers: LwM2M TS 1.1 Core Appendix E.1 (Security),
//! E.2 (Server), E.3 (Access Control).

use super::super::content::ResourcePath;
use super::super::encode::{WriteEntry, WriteValue};
use super::super::endpoint::{decode_hex, encode_hex, EndpointEntry, Secret};
use serde::{Deserialize, Serialize};

/// Security Mode (TS 1.1 Core §E.1, resource /0/x/2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecurityMode {
    /// 0: Pre-Shared Key (DTLS-PSK).
    Psk,
    /// 2: Certificate (DTLS with X.509).
    X509,
    /// 3: NoSec (plain CoAP).
    NoSec,
}

impl SecurityMode {
    /// The value of resource /0/x/2.
    pub fn resource_value(self) -> i64 {
        match self {
            SecurityMode::Psk => 0,
            SecurityMode::X509 => 2,
            SecurityMode::NoSec => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SecurityMode::Psk => "psk",
            SecurityMode::X509 => "x509",
            SecurityMode::NoSec => "nosec",
        }
    }
}

/// One LwM2M server the device gets: a Security instance and a Server
/// instance with the same Short Server ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerAccount {
    /// LwM2M Server URI (/0/x/0), `coap://` or `coaps://`.
    pub uri: String,
    /// Short Server ID (/0/x/10, /1/x/0), 1..=65534.
    #[serde(default = "default_ssid")]
    pub short_server_id: u16,
    /// Registration lifetime (/1/x/1); the gateway default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime_s: Option<u32>,
    /// Binding (/1/x/7): `U`, `UQ`, ...; the gateway default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// Security mode; absent: `psk` for `coaps://`, `nosec` for `coap://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecurityMode>,
    /// This account is the gateway: a fresh PSK is generated at every
    /// bootstrap, written to the device and recorded as the endpoint's
    /// DTLS credentials before Bootstrap-Finish.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generate_psk: bool,
    /// PSK identity / key to write (another server's). Absent with
    /// `security = "psk"` and no `generate_psk`: the endpoint's own DTLS
    /// credentials (this gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key_hex: Option<Secret>,
    /// X.509 mode: the device's certificate (DER, hex) for /0/x/3...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_hex: Option<String>,
    /// ...its private key (DER, hex) for /0/x/5...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_hex: Option<Secret>,
    /// ...and the server's certificate (DER, hex) for /0/x/4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_certificate_hex: Option<String>,
    /// Default Minimum / Maximum Period (/1/x/2, /1/x/3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_min_period_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_period_s: Option<u32>,
    /// Notification Storing When Disabled or Offline (/1/x/6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_storing: Option<bool>,
}

fn default_ssid() -> u16 {
    1
}

/// One Access Control instance (/2/x, TS 1.1 Core §E.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclEntry {
    pub object: u16,
    pub instance: u16,
    /// Short Server ID → access bits (1 Read/Observe/Discover/Write-Attr,
    /// 2 Write, 4 Execute, 8 Delete, 16 Create); key 0 is the default for
    /// servers not listed.
    pub access: std::collections::BTreeMap<u16, u8>,
    /// Access Control Owner (a Short Server ID).
    pub owner: u16,
}

/// An endpoint's bootstrap configuration (directory, admin API
/// `PUT /v1/endpoints/{ep}/bootstrap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSettings {
    /// Credentials the device presents to the bootstrap server (DTLS on the
    /// bootstrap port), as for the endpoint's own credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key_hex: Option<Secret>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x509: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_sha256: Option<String>,
    /// LwM2M servers to write; empty: the gateway's defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ServerAccount>,
    /// Access Control instances to write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclEntry>,
}

impl BootstrapSettings {
    /// The bootstrap credentials as an entry (same rules, same checks as
    /// the endpoint's own credentials).
    pub fn credential_entry(&self) -> EndpointEntry {
        let mut e = EndpointEntry::new("", "", "");
        e.psk_identity = self.psk_identity.clone();
        e.psk_identity_hex = self.psk_identity_hex.clone();
        e.psk_key_hex = self.psk_key_hex.clone();
        e.x509 = self.x509;
        e.x509_sha256 = self.x509_sha256.clone();
        e
    }

    /// Checks what can be checked without the gateway defaults.
    pub fn validate(&self) -> Result<(), String> {
        self.credential_entry()
            .validate_credentials()
            .map_err(|e| format!("bootstrap credentials: {e}"))?;
        if self.servers.len() > 8 {
            return Err("at most 8 bootstrap servers".into());
        }
        if self.acl.len() > 64 {
            return Err("at most 64 ACL entries".into());
        }
        let mut ssids = std::collections::BTreeSet::new();
        let mut own = 0;
        for s in &self.servers {
            s.validate()?;
            if !ssids.insert(s.short_server_id) {
                return Err(format!("short_server_id {} twice", s.short_server_id));
            }
            if s.generate_psk || s.uses_endpoint_psk() {
                own += 1;
            }
        }
        if own > 1 {
            return Err("only one server may use the endpoint's own or a generated PSK".into());
        }
        Ok(())
    }

    /// The redacted form (admin API).
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        redact(&mut v);
        v
    }
}

/// Replaces every `*_key_hex` string by `"set"`.
pub fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if (k == "psk_key_hex" || k == "private_key_hex") && x.is_string() {
                    *x = "set".into();
                } else {
                    redact(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

impl ServerAccount {
    /// An account for `uri` with `short_server_id`, everything else unset
    /// (the security mode follows the scheme, the rest the gateway defaults).
    pub fn new(uri: &str, short_server_id: u16) -> ServerAccount {
        ServerAccount {
            uri: uri.to_string(),
            short_server_id,
            lifetime_s: None,
            binding: None,
            security: None,
            generate_psk: false,
            psk_identity: None,
            psk_key_hex: None,
            certificate_hex: None,
            private_key_hex: None,
            server_certificate_hex: None,
            default_min_period_s: None,
            default_max_period_s: None,
            notification_storing: None,
        }
    }

    pub fn mode(&self) -> SecurityMode {
        self.security
            .unwrap_or(if self.uri.starts_with("coaps://") {
                SecurityMode::Psk
            } else {
                SecurityMode::NoSec
            })
    }

    /// PSK mode with neither a key of its own nor a generated one: the
    /// endpoint's DTLS credentials.
    pub fn uses_endpoint_psk(&self) -> bool {
        self.mode() == SecurityMode::Psk && !self.generate_psk && self.psk_key_hex.is_none()
    }

    pub fn validate(&self) -> Result<(), String> {
        let scheme_ok = self.uri.starts_with("coap://") || self.uri.starts_with("coaps://");
        if !scheme_ok || self.uri.len() > 255 {
            return Err(format!(
                "server uri {:?}: coap:// or coaps://, at most 255 bytes",
                self.uri.chars().take(64).collect::<String>()
            ));
        }
        if self.short_server_id == 0 || self.short_server_id == 65535 {
            return Err("short_server_id must be 1..=65534".into());
        }
        let secure = self.uri.starts_with("coaps://");
        match self.mode() {
            SecurityMode::NoSec if secure => {
                return Err("security nosec needs a coap:// uri".into());
            }
            SecurityMode::Psk | SecurityMode::X509 if !secure => {
                return Err("security psk / x509 needs a coaps:// uri".into());
            }
            _ => {}
        }
        if self.generate_psk && self.mode() != SecurityMode::Psk {
            return Err("generate_psk needs security psk".into());
        }
        if self.psk_identity.is_some() != self.psk_key_hex.is_some() {
            return Err("psk_identity and psk_key_hex go together".into());
        }
        if let Some(k) = &self.psk_key_hex {
            match decode_hex(&k.0) {
                Some(k) if !k.is_empty() && k.len() <= 64 => {}
                _ => return Err("psk_key_hex must be 1..=64 bytes of hex".into()),
            }
        }
        if self.mode() == SecurityMode::X509 {
            for (name, v) in [
                ("certificate_hex", self.certificate_hex.as_deref()),
                (
                    "private_key_hex",
                    self.private_key_hex.as_ref().map(|s| s.0.as_str()),
                ),
            ] {
                match v.and_then(decode_hex) {
                    Some(b) if !b.is_empty() && b.len() <= 4096 => {}
                    _ => return Err(format!("x509 needs {name} (DER as hex, at most 4 KiB)")),
                }
            }
        }
        if let Some(b) = &self.binding {
            if b.is_empty() || b.len() > 8 || !b.bytes().all(|c| b"UQSNT".contains(&c)) {
                return Err("binding must be letters of UQSNT".into());
            }
        }
        Ok(())
    }
}

/// The gateway's defaults (`[bootstrap]`): the server written to endpoints
/// whose settings name none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapDefaults {
    /// `coaps://` URI of this gateway, for devices with a PSK.
    pub server_uri: Option<String>,
    /// `coap://` URI of this gateway, for NoSec devices.
    pub server_uri_plain: Option<String>,
    pub short_server_id: u16,
    pub lifetime_s: u32,
    pub binding: String,
    /// Generate a PSK for devices without their own settings.
    pub generate_psk: bool,
}

impl Default for BootstrapDefaults {
    fn default() -> Self {
        BootstrapDefaults {
            server_uri: None,
            server_uri_plain: None,
            short_server_id: 1,
            lifetime_s: 86_400,
            binding: "U".into(),
            generate_psk: false,
        }
    }
}

/// A PSK generated for the endpoint, recorded before Bootstrap-Finish.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedPsk {
    /// The identity (the endpoint's existing one, or its name).
    pub identity: Vec<u8>,
    /// Identity given as hex in the directory (kept as it was).
    pub identity_is_hex: bool,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for GeneratedPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedPsk")
            .field("identity", &String::from_utf8_lossy(&self.identity))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl GeneratedPsk {
    /// `entry` with this PSK as its DTLS credentials.
    pub fn apply(&self, entry: &EndpointEntry) -> EndpointEntry {
        let mut e = entry.clone();
        let key_hex = encode_hex(&self.key);
        if self.identity_is_hex {
            e.psk_identity = None;
            e.psk_identity_hex = Some(encode_hex(&self.identity));
        } else {
            e.psk_identity = Some(String::from_utf8_lossy(&self.identity).into_owned());
            e.psk_identity_hex = None;
        }
        e.psk_key_hex = Some(Secret(key_hex));
        e.x509 = false;
        e.x509_sha256 = None;
        e
    }
}

/// One server account, resolved: what goes into its /0 and /1 instances.
#[derive(Clone, PartialEq, Eq)]
pub struct ResolvedAccount {
    pub uri: String,
    pub ssid: u16,
    pub mode: SecurityMode,
    pub lifetime_s: u32,
    pub binding: String,
    /// /0/x/3: PSK identity or the device certificate.
    pub public: Vec<u8>,
    /// /0/x/4: the server's certificate.
    pub server_public: Vec<u8>,
    /// /0/x/5: PSK key or the device's private key.
    pub secret: Vec<u8>,
    pub pmin: Option<u32>,
    pub pmax: Option<u32>,
    pub storing: bool,
}

impl std::fmt::Debug for ResolvedAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedAccount")
            .field("uri", &self.uri)
            .field("ssid", &self.ssid)
            .field("mode", &self.mode)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Everything one bootstrap session writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub accounts: Vec<ResolvedAccount>,
    pub acl: Vec<AclEntry>,
    pub generated: Option<GeneratedPsk>,
}

impl Plan {
    /// True when the plan carries key material (PSK keys, private keys):
    /// it goes to the device only over DTLS.
    pub fn has_secrets(&self) -> bool {
        self.accounts.iter().any(|a| !a.secret.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no LwM2M server configured for this endpoint (set its bootstrap servers or [bootstrap] server_uri / server_uri_plain)")]
    NoServer,
    #[error("server {0}: PSK mode but the endpoint has no PSK (set psk_identity/psk_key_hex or generate_psk)")]
    NoPsk(u16),
    #[error("server {0}: {1}")]
    Invalid(u16, String),
}

/// Resolves what to write to `endpoint` (`entry` from the directory).
/// `key` supplies fresh key bytes when a PSK is generated.
pub fn plan(
    endpoint: &str,
    entry: &EndpointEntry,
    defaults: &BootstrapDefaults,
    key: &mut dyn FnMut() -> [u8; 16],
) -> Result<Plan, PlanError> {
    let settings = entry.bootstrap.as_deref();
    let mut servers: Vec<ServerAccount> = settings.map(|s| s.servers.clone()).unwrap_or_default();
    if servers.is_empty() {
        let secure = defaults.generate_psk || entry.psk_key().is_some();
        let uri = if secure {
            defaults.server_uri.clone()
        } else {
            defaults.server_uri_plain.clone()
        };
        let Some(uri) = uri else {
            return Err(PlanError::NoServer);
        };
        servers.push(ServerAccount {
            security: Some(if secure {
                SecurityMode::Psk
            } else {
                SecurityMode::NoSec
            }),
            generate_psk: defaults.generate_psk,
            ..ServerAccount::new(&uri, defaults.short_server_id)
        });
    }
    let mut generated = None;
    let mut accounts = Vec::with_capacity(servers.len());
    for s in &servers {
        s.validate()
            .map_err(|e| PlanError::Invalid(s.short_server_id, e))?;
        let mode = s.mode();
        let (public, server_public, secret) = match mode {
            SecurityMode::NoSec => (Vec::new(), Vec::new(), Vec::new()),
            SecurityMode::Psk if s.generate_psk => {
                let (identity, identity_is_hex) =
                    match (&entry.psk_identity, &entry.psk_identity_hex) {
                        (Some(t), _) => (t.as_bytes().to_vec(), false),
                        (None, Some(h)) => (decode_hex(h).unwrap_or_default(), true),
                        _ => (endpoint.as_bytes().to_vec(), false),
                    };
                let k = key().to_vec();
                generated = Some(GeneratedPsk {
                    identity: identity.clone(),
                    identity_is_hex,
                    key: k.clone(),
                });
                (identity, Vec::new(), k)
            }
            SecurityMode::Psk => match (&s.psk_identity, &s.psk_key_hex) {
                (Some(i), Some(k)) => (
                    i.as_bytes().to_vec(),
                    Vec::new(),
                    decode_hex(&k.0).unwrap_or_default(),
                ),
                _ => match (entry.psk_identity_bytes(), entry.psk_key()) {
                    (Some(i), Some(k)) => (i, Vec::new(), k),
                    _ => return Err(PlanError::NoPsk(s.short_server_id)),
                },
            },
            SecurityMode::X509 => (
                s.certificate_hex
                    .as_deref()
                    .and_then(decode_hex)
                    .unwrap_or_default(),
                s.server_certificate_hex
                    .as_deref()
                    .and_then(decode_hex)
                    .unwrap_or_default(),
                s.private_key_hex
                    .as_ref()
                    .and_then(|k| decode_hex(&k.0))
                    .unwrap_or_default(),
            ),
        };
        accounts.push(ResolvedAccount {
            uri: s.uri.clone(),
            ssid: s.short_server_id,
            mode,
            lifetime_s: s.lifetime_s.unwrap_or(defaults.lifetime_s),
            binding: s
                .binding
                .clone()
                .unwrap_or_else(|| defaults.binding.clone()),
            public,
            server_public,
            secret,
            pmin: s.default_min_period_s,
            pmax: s.default_max_period_s,
            storing: s.notification_storing.unwrap_or(false),
        });
    }
    Ok(Plan {
        accounts,
        acl: settings.map(|s| s.acl.clone()).unwrap_or_default(),
        generated,
    })
}

/// The Security instance /0/`instance` of `a` (TS 1.1 Core §E.1).
pub fn security_entries(a: &ResolvedAccount, instance: u16) -> Vec<WriteEntry> {
    let r = |res: u16, value: WriteValue| WriteEntry {
        path: ResourcePath::resource(0, instance, res),
        value,
    };
    vec![
        r(0, WriteValue::Str(a.uri.clone())),
        r(1, WriteValue::Bool(false)),
        r(2, WriteValue::Int(a.mode.resource_value())),
        r(3, WriteValue::Opaque(a.public.clone())),
        r(4, WriteValue::Opaque(a.server_public.clone())),
        r(5, WriteValue::Opaque(a.secret.clone())),
        r(10, WriteValue::Int(a.ssid as i64)),
    ]
}

/// The Server instance /1/`instance` of `a` (TS 1.1 Core §E.2).
pub fn server_entries(a: &ResolvedAccount, instance: u16) -> Vec<WriteEntry> {
    let r = |res: u16, value: WriteValue| WriteEntry {
        path: ResourcePath::resource(1, instance, res),
        value,
    };
    let mut v = vec![
        r(0, WriteValue::Int(a.ssid as i64)),
        r(1, WriteValue::Int(a.lifetime_s as i64)),
    ];
    if let Some(p) = a.pmin {
        v.push(r(2, WriteValue::Int(p as i64)));
    }
    if let Some(p) = a.pmax {
        v.push(r(3, WriteValue::Int(p as i64)));
    }
    v.push(r(6, WriteValue::Bool(a.storing)));
    v.push(r(7, WriteValue::Str(a.binding.clone())));
    v
}

/// The Access Control instance /2/`instance` (TS 1.1 Core §E.3).
pub fn acl_entries(acl: &AclEntry, instance: u16) -> Vec<WriteEntry> {
    let mut v = vec![
        WriteEntry {
            path: ResourcePath::resource(2, instance, 0),
            value: WriteValue::Int(acl.object as i64),
        },
        WriteEntry {
            path: ResourcePath::resource(2, instance, 1),
            value: WriteValue::Int(acl.instance as i64),
        },
    ];
    for (ssid, bits) in &acl.access {
        v.push(WriteEntry {
            path: ResourcePath {
                object: 2,
                instance: Some(instance),
                resource: Some(2),
                resource_instance: Some(*ssid),
            },
            value: WriteValue::Int(*bits as i64),
        });
    }
    v.push(WriteEntry {
        path: ResourcePath::resource(2, instance, 3),
        value: WriteValue::Int(acl.owner as i64),
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> BootstrapDefaults {
        BootstrapDefaults {
            server_uri: Some("coaps://gw:5684".into()),
            server_uri_plain: Some("coap://gw:5683".into()),
            lifetime_s: 300,
            ..BootstrapDefaults::default()
        }
    }

    fn key() -> impl FnMut() -> [u8; 16] {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 16]
        }
    }

    #[test]
    fn defaults_follow_the_endpoints_credentials() {
        let plain = EndpointEntry::new("d1", "t", "default");
        let p = plan("ep1", &plain, &defaults(), &mut key()).unwrap();
        assert_eq!(p.accounts.len(), 1);
        assert_eq!(p.accounts[0].uri, "coap://gw:5683");
        assert_eq!(p.accounts[0].mode, SecurityMode::NoSec);
        assert!(!p.has_secrets() && p.generated.is_none());
        let mut psk = plain.clone();
        psk.psk_identity = Some("id1".into());
        psk.psk_key_hex = Some(Secret("0102".into()));
        let p = plan("ep1", &psk, &defaults(), &mut key()).unwrap();
        assert_eq!(p.accounts[0].uri, "coaps://gw:5684");
        assert_eq!(p.accounts[0].public, b"id1");
        assert_eq!(p.accounts[0].secret, [1, 2]);
        assert!(p.has_secrets());
        // Generated: identity kept (or the endpoint name), fresh key.
        let d = BootstrapDefaults {
            generate_psk: true,
            ..defaults()
        };
        let mut k = key();
        let p = plan("ep1", &plain, &d, &mut k).unwrap();
        let g = p.generated.clone().unwrap();
        assert_eq!(g.identity, b"ep1");
        assert_eq!(g.key, [1; 16]);
        assert_eq!(p.accounts[0].secret, [1; 16]);
        let p2 = plan("ep1", &psk, &d, &mut k).unwrap();
        assert_eq!(p2.generated.as_ref().unwrap().identity, b"id1");
        assert_eq!(p2.generated.as_ref().unwrap().key, [2; 16]);
        let applied = g.apply(&plain);
        assert_eq!(applied.psk_identity.as_deref(), Some("ep1"));
        assert_eq!(applied.psk_key(), Some(vec![1; 16]));
        assert!(!format!("{g:?}").contains("01010101"));
        // Nothing configured.
        let none = BootstrapDefaults::default();
        assert_eq!(
            plan("ep1", &plain, &none, &mut key()),
            Err(PlanError::NoServer)
        );
    }

    #[test]
    fn explicit_servers_and_validation() {
        let mut e = EndpointEntry::new("d1", "t", "default");
        let acc = |uri: &str, ssid: u16| ServerAccount {
            lifetime_s: Some(60),
            binding: Some("UQ".into()),
            default_min_period_s: Some(5),
            notification_storing: Some(true),
            ..ServerAccount::new(uri, ssid)
        };
        let mut other = acc("coaps://other:5684", 2);
        other.psk_identity = Some("x".into());
        other.psk_key_hex = Some(Secret("aa".into()));
        e.bootstrap = Some(Box::new(BootstrapSettings {
            servers: vec![acc("coap://gw:5683", 1), other],
            ..BootstrapSettings::default()
        }));
        assert_eq!(e.bootstrap.as_ref().unwrap().validate(), Ok(()));
        let p = plan("ep", &e, &defaults(), &mut key()).unwrap();
        assert_eq!(p.accounts.len(), 2);
        assert_eq!(p.accounts[1].secret, [0xaa]);
        let s = server_entries(&p.accounts[0], 0);
        assert!(s.contains(&WriteEntry {
            path: ResourcePath::resource(1, 0, 7),
            value: WriteValue::Str("UQ".into())
        }));
        assert!(s.iter().any(|w| w.path == ResourcePath::resource(1, 0, 2)));
        let sec = security_entries(&p.accounts[1], 3);
        assert_eq!(sec[2].value, WriteValue::Int(0));
        assert_eq!(sec[6].value, WriteValue::Int(2));
        // PSK server without any PSK.
        let mut bad = e.clone();
        bad.bootstrap.as_mut().unwrap().servers = vec![acc("coaps://gw:5684", 1)];
        assert_eq!(
            plan("ep", &bad, &defaults(), &mut key()),
            Err(PlanError::NoPsk(1))
        );
        // Validation.
        let mut s = BootstrapSettings {
            servers: vec![acc("http://x", 1)],
            ..BootstrapSettings::default()
        };
        assert!(s.validate().is_err());
        s.servers = vec![acc("coap://x", 1), acc("coap://y", 1)];
        assert!(s.validate().unwrap_err().contains("twice"));
        let mut g = acc("coap://x", 1);
        g.generate_psk = true;
        s.servers = vec![g];
        assert!(s.validate().is_err());
        let mut x = acc("coaps://x", 1);
        x.security = Some(SecurityMode::X509);
        s.servers = vec![x];
        assert!(s.validate().unwrap_err().contains("certificate_hex"));
        s.servers = vec![];
        s.psk_identity = Some("bs".into());
        assert!(s.validate().is_err());
        s.psk_key_hex = Some(Secret("0011".into()));
        assert_eq!(s.validate(), Ok(()));
        let j = s.redacted_json();
        assert_eq!(j["psk_key_hex"], "set");
    }

    #[test]
    fn acl_instance() {
        let a = AclEntry {
            object: 3,
            instance: 0,
            access: [(1u16, 7u8), (0, 1)].into_iter().collect(),
            owner: 1,
        };
        let v = acl_entries(&a, 4);
        assert_eq!(v.len(), 5);
        assert_eq!(v[2].path.resource_instance, Some(0));
        assert_eq!(v[4].value, WriteValue::Int(1));
    }
}

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

use crate::proto::FastMap;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One provisioned device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub device_id: String,
    pub tenant_id: String,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// DTLS-PSK identity, when the device uses PSK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    /// DTLS-PSK key, hex-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key_hex: Option<String>,
}

fn default_profile() -> String {
    "default".to_string()
}

impl EndpointEntry {
    /// True when the device is provisioned with DTLS credentials.
    pub fn has_credentials(&self) -> bool {
        self.psk_identity.is_some()
    }
}

/// A snapshot of the directory: endpoint name → entry.
pub type EndpointMap = FastMap<String, Arc<EndpointEntry>>;

/// The identity a secure transport established for a peer (RFC 7252 §9.1).
/// Plain UDP peers have none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Identity {
    /// DTLS-PSK: the PSK identity of the handshake.
    Psk(String),
    /// DTLS with a certificate: the subject common name.
    X509 { subject_cn: String },
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
pub struct DefaultAuthorizer;

impl Authorizer for DefaultAuthorizer {
    fn authorize(
        &self,
        req: Uplink<'_>,
        entry: &EndpointEntry,
        identity: Option<&Identity>,
    ) -> Result<(), Denied> {
        match identity {
            None if entry.has_credentials() => Err(Denied::Unsecured),
            None => Ok(()),
            Some(Identity::Psk(id)) => match &entry.psk_identity {
                Some(p) if p == id => Ok(()),
                _ => Err(Denied::WrongIdentity),
            },
            Some(Identity::X509 { subject_cn }) if subject_cn == req.endpoint() => Ok(()),
            Some(Identity::X509 { .. }) => Err(Denied::WrongIdentity),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(psk: Option<&str>) -> EndpointEntry {
        EndpointEntry {
            device_id: "d".into(),
            tenant_id: "t".into(),
            profile: "default".into(),
            psk_identity: psk.map(str::to_string),
            psk_key_hex: psk.map(|_| "00".to_string()),
        }
    }

    #[test]
    fn default_policy() {
        let a = DefaultAuthorizer;
        let reg = Uplink::Register {
            endpoint: "urn:imei:1",
        };
        assert_eq!(a.authorize(reg, &entry(None), None), Ok(()));
        assert_eq!(
            a.authorize(reg, &entry(Some("id1")), None),
            Err(Denied::Unsecured)
        );
        let psk = Identity::Psk("id1".into());
        assert_eq!(a.authorize(reg, &entry(Some("id1")), Some(&psk)), Ok(()));
        assert_eq!(
            a.authorize(reg, &entry(Some("id2")), Some(&psk)),
            Err(Denied::WrongIdentity)
        );
        assert_eq!(
            a.authorize(reg, &entry(None), Some(&psk)),
            Err(Denied::WrongIdentity)
        );
        let cert = Identity::X509 {
            subject_cn: "urn:imei:1".into(),
        };
        assert_eq!(a.authorize(reg, &entry(None), Some(&cert)), Ok(()));
        let other = Uplink::Update {
            endpoint: "urn:imei:2",
        };
        assert_eq!(
            a.authorize(other, &entry(None), Some(&cert)),
            Err(Denied::WrongIdentity)
        );
    }
}

//! LwM2M 1.1 Send (TS 1.1 Core §6.4 "Send", Transport §6.4): the client
//! pushes values with `POST /dp`, in SenML JSON (110) or SenML CBOR (112).
//! Without a Content-Format the payload is taken as SenML CBOR, the format
//! TS 1.1 Core §7.4 makes mandatory for Send.

use super::content::{self, ResourcePath};
use crate::proto::coap::{Code, Message};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Send carries SenML only (4.15 Unsupported Content-Format).
    #[error("Send takes SenML JSON or CBOR")]
    UnsupportedFormat,
    /// The SenML did not decode (4.00 Bad Request).
    #[error("undecodable SenML payload")]
    Undecodable,
}

impl SendError {
    pub fn code(&self) -> Code {
        match self {
            SendError::UnsupportedFormat => Code::UNSUPPORTED_CONTENT_FORMAT,
            SendError::Undecodable => Code::BAD_REQUEST,
        }
    }
}

/// The root path values of a Send are resolved against (SenML names are
/// absolute LwM2M paths).
pub const ROOT: ResourcePath = ResourcePath {
    object: 0,
    instance: None,
    resource: None,
    resource_instance: None,
};

/// The content format of a Send request, if it is one Send accepts.
pub fn content_format(msg: &Message<'_>) -> Result<u16, SendError> {
    let cf = msg.content_format().unwrap_or(content::CF_SENML_CBOR);
    if matches!(cf, content::CF_SENML_JSON | content::CF_SENML_CBOR) {
        Ok(cf)
    } else {
        Err(SendError::UnsupportedFormat)
    }
}

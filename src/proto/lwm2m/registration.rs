//! LwM2M Registration interface parameters (LwM2M TS 1.1 Core §5.3, Transport
//! §6.2.1 Table 6.2.1-1 / TS 1.2 Transport §6.2.1).
//!
//! `POST /rd?ep={Endpoint}&lt={Lifetime}&lwm2m={Version}&b={Binding}&Q&sms=..`
//! registers; `POST /rd/{location}?lt=..&b=..` updates; `DELETE /rd/{location}`
//! de-registers. This module parses and validates the Uri-Query parameters; the
//! registration state lives in the shard engine.

/// Default lifetime when `lt` is absent (TS Core §E.2, Server object resource 1
/// default: 86400 s).
pub const DEFAULT_LIFETIME_S: u32 = 86_400;
/// Maximum endpoint name length we accept; longer names are rejected with 4.00.
pub const MAX_ENDPOINT_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegisterParams {
    pub endpoint: String,
    pub lifetime_s: u32,
    pub version: String,
    pub binding: String,
    /// Queue mode (`Q` parameter, LwM2M 1.1).
    pub queue_mode: bool,
    pub sms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateParams {
    pub lifetime_s: Option<u32>,
    pub binding: Option<String>,
    pub sms: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("missing mandatory parameter {0}")]
    Missing(&'static str),
    #[error("invalid value for parameter {0}")]
    Invalid(&'static str),
    #[error("query parameter is not UTF-8")]
    NotUtf8,
    #[error("unsupported LwM2M version {0}")]
    UnsupportedVersion(String),
}

fn split(q: &[u8]) -> Result<(&str, Option<&str>), ParamError> {
    let s = std::str::from_utf8(q).map_err(|_| ParamError::NotUtf8)?;
    Ok(match s.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (s, None),
    })
}

fn lifetime(v: Option<&str>) -> Result<u32, ParamError> {
    v.and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v > 0)
        .ok_or(ParamError::Invalid("lt"))
}

fn binding(v: Option<&str>) -> Result<String, ParamError> {
    // TS 1.1 Transport §6.2.1.1: binding modes U, S, N, T (and LwM2M 1.0's
    // UQ/SQ/UQS queue-mode variants).
    let v = v.ok_or(ParamError::Invalid("b"))?;
    if v.is_empty() || v.len() > 8 || !v.chars().all(|c| "USNTQ".contains(c)) {
        return Err(ParamError::Invalid("b"));
    }
    Ok(v.to_string())
}

/// Parses the Register request's Uri-Query options.
pub fn parse_register<'a>(
    queries: impl Iterator<Item = &'a [u8]>,
) -> Result<RegisterParams, ParamError> {
    let mut p = RegisterParams {
        lifetime_s: DEFAULT_LIFETIME_S,
        version: "1.0".to_string(),
        binding: "U".to_string(),
        ..Default::default()
    };
    let mut have_ep = false;
    for q in queries {
        let (k, v) = split(q)?;
        match k {
            "ep" => {
                let v = v.ok_or(ParamError::Invalid("ep"))?;
                if v.is_empty() || v.len() > MAX_ENDPOINT_LEN || v.chars().any(|c| c.is_control()) {
                    return Err(ParamError::Invalid("ep"));
                }
                p.endpoint = v.to_string();
                have_ep = true;
            }
            "lt" => p.lifetime_s = lifetime(v)?,
            "lwm2m" => {
                let v = v.ok_or(ParamError::Invalid("lwm2m"))?;
                if !matches!(v, "1.0" | "1.1" | "1.2") {
                    return Err(ParamError::UnsupportedVersion(v.chars().take(16).collect()));
                }
                p.version = v.to_string();
            }
            "b" => {
                let b = binding(v)?;
                if b.contains('Q') {
                    p.queue_mode = true;
                }
                p.binding = b;
            }
            "Q" => p.queue_mode = true,
            "sms" => p.sms = v.map(str::to_string),
            // Unknown parameters are ignored for forward compatibility.
            _ => {}
        }
    }
    if !have_ep {
        // TS 1.1: the endpoint name is mandatory unless it is learned from the
        // DTLS identity; over plain CoAP it must be present.
        return Err(ParamError::Missing("ep"));
    }
    Ok(p)
}

/// Parses the Update request's Uri-Query options.
pub fn parse_update<'a>(
    queries: impl Iterator<Item = &'a [u8]>,
) -> Result<UpdateParams, ParamError> {
    let mut p = UpdateParams::default();
    for q in queries {
        let (k, v) = split(q)?;
        match k {
            "lt" => p.lifetime_s = Some(lifetime(v)?),
            "b" => p.binding = Some(binding(v)?),
            "sms" => p.sms = v.map(str::to_string),
            _ => {}
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(items: &[&str]) -> Vec<Vec<u8>> {
        items.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn register_params() {
        let v = q(&["ep=urn:imei:123", "lt=300", "lwm2m=1.1", "b=U"]);
        let p = parse_register(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.endpoint, "urn:imei:123");
        assert_eq!(p.lifetime_s, 300);
        assert_eq!(p.version, "1.1");
        assert!(!p.queue_mode);
        let v = q(&["ep=a", "Q"]);
        let p = parse_register(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.lifetime_s, DEFAULT_LIFETIME_S);
        assert!(p.queue_mode);
    }

    #[test]
    fn register_errors() {
        for bad in [
            vec!["lt=30"],
            vec!["ep="],
            vec!["ep=a", "lt=x"],
            vec!["ep=a", "lt=0"],
            vec!["ep=a", "b=XYZ"],
            vec!["ep=a", "lwm2m=9.9"],
        ] {
            let v = q(&bad);
            assert!(
                parse_register(v.iter().map(|x| x.as_slice())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn update_params() {
        let v = q(&["lt=60", "b=UQ"]);
        let p = parse_update(v.iter().map(|x| x.as_slice())).unwrap();
        assert_eq!(p.lifetime_s, Some(60));
        assert_eq!(p.binding.as_deref(), Some("UQ"));
        assert!(parse_update(q(&["lt=-1"]).iter().map(|x| x.as_slice())).is_err());
    }
}

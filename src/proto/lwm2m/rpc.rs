//! Platform RPCs, protocol-agnostic at the edge (`../shared/docs/design.md`
//! wire contracts): the request `{rpc_id, tenant_id, device_id, method,
//! params, timeout_ms}` validated field by field, its status lifecycle, and
//! the method → LwM2M [`Op`] resolution through the device's profile.
//!
//! Methods: the profile's own (`reboot` → Execute /3/0/4 and
//! `factory_reset` → Execute /3/0/5 in the built-in profile; any Execute /
//! Write / Read ... with fixed or `{param}`-templated arguments), then the
//! generic ones that take a path: `read`, `write`, `execute`, `discover`,
//! `create`, `delete`, `write_attributes`, `observe`, `cancel_observe`,
//! `read_composite`, `write_composite`, `observe_composite`,
//! `cancel_observe_composite`. An unknown method or bad params is refused
//! with a reason before anything is sent.

use super::content::{DataType, ResourcePath};
use super::dm::Op;
use super::encode::{WriteEntry, WriteValue};
use super::profile::{builtin_type, Profile};
use serde::{Deserialize, Serialize};
use serde_json::Value as J;
use std::sync::Arc;

/// Field limits (the request comes from the network; Kafka or HTTP).
pub const MAX_RPC_ID: usize = 128;
pub const MAX_TENANT: usize = 64;
pub const MAX_DEVICE_ID: usize = 256;
pub const MAX_METHOD: usize = 64;
/// Bytes of `params` once serialized.
pub const MAX_PARAMS: usize = 64 * 1024;
/// Longest `timeout_ms` accepted: 7 days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// An RPC as it arrives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcRequest {
    #[serde(default)]
    pub rpc_id: String,
    #[serde(default)]
    pub tenant_id: String,
    #[serde(default)]
    pub device_id: String,
    pub method: String,
    #[serde(default)]
    pub params: J,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Where an RPC is in its life (the `status` field of its events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcStatus {
    Queued,
    Sent,
    /// A firmware update: the device is downloading the package.
    Downloading,
    /// A firmware update: the package is on the device (State 2).
    Downloaded,
    /// A firmware update: Update executed, waiting for its result.
    Updating,
    Succeeded,
    Failed,
    TimedOut,
    Expired,
}

impl RpcStatus {
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            RpcStatus::Queued
                | RpcStatus::Sent
                | RpcStatus::Downloading
                | RpcStatus::Downloaded
                | RpcStatus::Updating
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RpcStatus::Queued => "queued",
            RpcStatus::Sent => "sent",
            RpcStatus::Downloading => "downloading",
            RpcStatus::Downloaded => "downloaded",
            RpcStatus::Updating => "updating",
            RpcStatus::Succeeded => "succeeded",
            RpcStatus::Failed => "failed",
            RpcStatus::TimedOut => "timed_out",
            RpcStatus::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("not a JSON RPC request: {0}")]
    Json(String),
    #[error("{field} {why}")]
    Field {
        field: &'static str,
        why: &'static str,
    },
}

fn check_id(field: &'static str, s: &str, max: usize) -> Result<(), RpcError> {
    if s.is_empty() {
        return Err(RpcError::Field {
            field,
            why: "is missing or empty",
        });
    }
    if s.len() > max {
        return Err(RpcError::Field {
            field,
            why: "is too long",
        });
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(RpcError::Field {
            field,
            why: "contains control characters",
        });
    }
    Ok(())
}

impl RpcRequest {
    /// Parses and validates a request (Kafka record value or HTTP body).
    pub fn parse(bytes: &[u8]) -> Result<RpcRequest, RpcError> {
        if bytes.len() > MAX_PARAMS + 4096 {
            return Err(RpcError::Field {
                field: "request",
                why: "is larger than 68 KiB",
            });
        }
        let r: RpcRequest =
            serde_json::from_slice(bytes).map_err(|e| RpcError::Json(e.to_string()))?;
        Ok(r)
    }

    /// Field checks: ids present, bounded, no control characters; the
    /// tenant names a Kafka topic (`[A-Za-z0-9._-]`); params bounded.
    pub fn validate(&self) -> Result<(), RpcError> {
        check_id("rpc_id", &self.rpc_id, MAX_RPC_ID)?;
        check_id("tenant_id", &self.tenant_id, MAX_TENANT)?;
        if !self
            .tenant_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(RpcError::Field {
                field: "tenant_id",
                why: "must be [A-Za-z0-9._-]",
            });
        }
        check_id("device_id", &self.device_id, MAX_DEVICE_ID)?;
        check_id("method", &self.method, MAX_METHOD)?;
        if serde_json::to_vec(&self.params).map_or(0, |v| v.len()) > MAX_PARAMS {
            return Err(RpcError::Field {
                field: "params",
                why: "is larger than 64 KiB",
            });
        }
        if !(self.params.is_null() || self.params.is_object()) {
            return Err(RpcError::Field {
                field: "params",
                why: "must be a JSON object",
            });
        }
        if self
            .timeout_ms
            .is_some_and(|t| t == 0 || t > MAX_TIMEOUT_MS)
        {
            return Err(RpcError::Field {
                field: "timeout_ms",
                why: "must be 1..=604800000",
            });
        }
        Ok(())
    }
}

/// An RPC handed to the shard that holds the device's registration, to
/// send now (the control plane recorded it as `sent` first).
#[derive(Debug, Clone)]
pub struct RpcExec {
    pub rpc_id: std::sync::Arc<str>,
    pub endpoint: std::sync::Arc<str>,
    pub op: Op,
    /// Wall-clock epoch ms after which it ends `timed_out`.
    pub deadline_ms: i64,
    /// One operation of a multi-step RPC (a firmware update): the
    /// notifications of an observation it establishes go to the control
    /// plane ([`RpcEvent::Notified`]), a Block1 write reports its progress
    /// ([`RpcEvent::Progress`]).
    pub job: bool,
}

/// How an RPC ended on the shard.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcOutcome {
    pub status: RpcStatus,
    /// The device's CoAP response code (`"2.04"`).
    pub code: Option<String>,
    /// The decoded response (`{path: value}`, Discover links, Create location).
    pub response: Option<J>,
    pub reason: Option<String>,
}

impl RpcOutcome {
    pub fn failed(reason: impl Into<String>) -> RpcOutcome {
        RpcOutcome {
            status: RpcStatus::Failed,
            code: None,
            response: None,
            reason: Some(reason.into()),
        }
    }
}

/// Orders presence reports of one device across shards: a newer
/// registration (epoch) or a later move wins; reports from one shard arrive
/// in order.
pub type PresenceOrder = (u64, u16, u32);

/// What the control plane knows of a device's registration (routing of
/// RPCs, the device API).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Presence {
    pub device_id: String,
    pub tenant_id: String,
    /// The registration's own name (shared, not copied).
    #[serde(serialize_with = "ser_arc_str")]
    pub endpoint: Arc<str>,
    pub shard: u16,
    #[serde(skip)]
    pub order: PresenceOrder,
    /// Registered (somewhere).
    pub online: bool,
    /// Requests can be sent now (false for a queue-mode device asleep).
    pub reachable: bool,
    pub registration_id: String,
    pub address: String,
    pub lwm2m_version: &'static str,
    pub binding: String,
    pub lifetime_s: u32,
    pub queue_mode: bool,
    pub registered_at: i64,
    pub last_seen: i64,
    /// Why it went offline (`deregistered`, `expired`, ...).
    pub reason: Option<&'static str>,
}

/// What the RPC book keeps of a device's latest [`Presence`]: what routes
/// RPCs and what the device list shows (online, last_seen). The rest of a
/// report describes the registration, which its shard holds and describes
/// on demand; keeping it here too would cost hundreds of bytes per device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceState {
    #[serde(serialize_with = "ser_arc_str")]
    pub endpoint: Arc<str>,
    pub shard: u16,
    #[serde(skip)]
    pub order: PresenceOrder,
    pub online: bool,
    pub reachable: bool,
    pub registration_id: Box<str>,
    /// Over a DTLS session.
    pub dtls: bool,
    pub last_seen: i64,
    pub reason: Option<&'static str>,
}

fn ser_arc_str<S: serde::Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

impl From<Presence> for PresenceState {
    fn from(p: Presence) -> PresenceState {
        PresenceState {
            dtls: p.address.starts_with("coaps://"),
            endpoint: p.endpoint,
            shard: p.shard,
            order: p.order,
            online: p.online,
            reachable: p.reachable,
            registration_id: p.registration_id.into_boxed_str(),
            last_seen: p.last_seen,
            reason: p.reason,
        }
    }
}

/// What a shard reports to the RPC control plane.
#[derive(Debug, Clone)]
pub enum RpcEvent {
    /// A device's registration here changed state.
    Presence(Presence),
    /// The RPC was not sent (no registration here, or the device is not
    /// reachable): it goes back to the device's queue.
    Returned { rpc_id: std::sync::Arc<str> },
    /// The RPC ended (for a multi-step RPC: its current operation did).
    Done {
        rpc_id: std::sync::Arc<str>,
        outcome: RpcOutcome,
    },
    /// A notification of an observation a multi-step RPC established
    /// (`{path: value}`).
    Notified {
        rpc_id: std::sync::Arc<str>,
        values: J,
    },
    /// Bytes of a package transferred: a Block1 write of RPC `rpc_id`
    /// (acknowledged so far), or a device downloading image `image` from
    /// this shard (end of the highest block served).
    Progress {
        device_id: String,
        rpc_id: Option<std::sync::Arc<str>>,
        image: Option<std::sync::Arc<str>>,
        bytes: u64,
    },
}

/// Replaces `{name}` by `lookup(name)`; `Err(name)` for a missing one.
pub fn fill_template(t: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let Some(j) = after.find('}') else {
            out.push_str(&rest[i..]);
            return Ok(out);
        };
        let name = &after[..j];
        out.push_str(&lookup(name).ok_or_else(|| name.to_string())?);
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn param_text(params: &J, name: &str) -> Option<String> {
    match params.get(name)? {
        J::String(s) => Some(s.clone()),
        J::Null => None,
        other => Some(other.to_string()),
    }
}

/// The declared type of `p`: the profile's mapping, else the built-in model.
pub fn type_of(profile: Option<&Profile>, p: &ResourcePath) -> Option<DataType> {
    profile
        .and_then(|pr| pr.mapping(p))
        .and_then(|m| m.data_type)
        .or_else(|| builtin_type(&p.without_resource_instance()))
}

fn path_param(params: &J, key: &'static str) -> Result<ResourcePath, String> {
    let s = params
        .get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("params.{key} is required (an LwM2M path such as /3/0/9)"))?;
    ResourcePath::parse(s).ok_or_else(|| format!("params.{key} {s:?} is not an LwM2M path"))
}

fn paths_param(params: &J) -> Result<Vec<ResourcePath>, String> {
    let arr = params
        .get("paths")
        .and_then(|v| v.as_array())
        .ok_or("params.paths is required (a list of LwM2M paths)")?;
    if arr.is_empty() || arr.len() > 256 {
        return Err("params.paths takes 1..=256 paths".into());
    }
    arr.iter()
        .map(|v| {
            v.as_str()
                .and_then(ResourcePath::parse)
                .ok_or_else(|| format!("params.paths: {v} is not an LwM2M path"))
        })
        .collect()
}

fn format_param(params: &J) -> Result<Option<u16>, String> {
    use super::content::*;
    match params.get("format") {
        None | Some(J::Null) => Ok(None),
        Some(J::Number(n)) => n
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| "params.format is not a content format number".into()),
        Some(J::String(s)) => Ok(Some(match s.as_str() {
            "text" => CF_TEXT,
            "opaque" => CF_OPAQUE,
            "cbor" => CF_CBOR,
            "tlv" => CF_TLV,
            "senml_json" | "senml+json" => CF_SENML_JSON,
            "senml_cbor" | "senml+cbor" => CF_SENML_CBOR,
            "lwm2m_json" | "json" => CF_LWM2M_JSON,
            _ => {
                return Err(format!(
                    "params.format {s:?}: text, opaque, cbor, tlv, senml_json, senml_cbor or lwm2m_json"
                ))
            }
        })),
        Some(_) => Err("params.format is a name or a number".into()),
    }
}

/// `{"value": v}` at `path`, or `{"values": {path: v, ..}}` below it.
fn entries_param(
    params: &J,
    base: Option<ResourcePath>,
    profile: Option<&Profile>,
) -> Result<Vec<WriteEntry>, String> {
    let one = |path: ResourcePath, v: &J| -> Result<WriteEntry, String> {
        if path.resource.is_none() {
            return Err(format!("{path}: values go to resources"));
        }
        let value = WriteValue::from_json(v, type_of(profile, &path))
            .map_err(|e| format!("value for {path}: {e}"))?;
        Ok(WriteEntry { path, value })
    };
    if let Some(v) = params.get("value") {
        let path = base.ok_or("params.value needs params.path")?;
        return Ok(vec![one(path, v)?]);
    }
    let m = params
        .get("values")
        .and_then(|v| v.as_object())
        .ok_or("params.value or params.values ({path: value}) is required")?;
    if m.is_empty() || m.len() > 4096 {
        return Err("params.values takes 1..=4096 values".into());
    }
    m.iter()
        .map(|(k, v)| {
            let mut path =
                ResourcePath::parse(k).ok_or_else(|| format!("{k:?} is not an LwM2M path"))?;
            // Relative names ("1": ..) are below the base path.
            if !k.starts_with('/') {
                if let Some(b) = base {
                    let full = format!("{b}/{}", k.trim_start_matches('/'));
                    path = ResourcePath::parse(&full)
                        .ok_or_else(|| format!("{full:?} is not an LwM2M path"))?;
                }
            }
            one(path, v)
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|mut v| {
            v.sort_by_key(|e| e.path);
            v
        })
}

/// Execute arguments: a string (TS Core §5.4.5 syntax) or `{"0": "text",
/// "1": null}`.
fn args_param(params: &J) -> Result<Option<String>, String> {
    match params.get("args") {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) => Ok(Some(s.clone())),
        Some(J::Object(m)) => {
            let mut parts = Vec::new();
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                if k.len() != 1 || !k.as_bytes()[0].is_ascii_digit() {
                    return Err(format!(
                        "params.args: argument names are digits 0-9, not {k:?}"
                    ));
                }
                match &m[k] {
                    J::Null => parts.push(k.clone()),
                    J::String(v) => parts.push(format!("{k}='{v}'")),
                    other => parts.push(format!("{k}='{other}'")),
                }
            }
            Ok(Some(parts.join(",")))
        }
        Some(_) => Err("params.args is a string or an object".into()),
    }
}

/// Write-Attributes (TS 1.1 Core §5.1.2): `{"attributes": {"pmin": 10,
/// "gt": 3.5, "pmax": null}}` (null removes one).
fn attributes_param(params: &J) -> Result<Vec<String>, String> {
    let m = params
        .get("attributes")
        .and_then(|v| v.as_object())
        .ok_or("params.attributes is required ({pmin, pmax, gt, lt, st, epmin, epmax})")?;
    let mut out = Vec::new();
    for (k, v) in m {
        if ![
            "pmin", "pmax", "gt", "lt", "st", "epmin", "epmax", "edge", "con", "hqmax",
        ]
        .contains(&k.as_str())
        {
            return Err(format!("params.attributes: unknown attribute {k:?}"));
        }
        match v {
            J::Null => out.push(k.clone()),
            J::Number(n) => out.push(format!("{k}={n}")),
            _ => return Err(format!("params.attributes.{k} must be a number or null")),
        }
    }
    if out.is_empty() {
        return Err("params.attributes is empty".into());
    }
    Ok(out)
}

/// The operation `method` with `params` means for a device of `profile`.
pub fn resolve(method: &str, params: &J, profile: Option<&Profile>) -> Result<Op, String> {
    if let Some(m) = profile.and_then(|p| p.rpc.get(method)) {
        let lookup = |name: &str| param_text(params, name);
        let args = match &m.args {
            Some(t) => {
                Some(fill_template(t, &lookup).map_err(|n| format!("params.{n} is required"))?)
            }
            None => args_param(params)?,
        };
        let path = m.path;
        let op = match m.operation.as_str() {
            "execute" => Op::Execute { path, args },
            "read" => Op::Read {
                path,
                format: m.format,
            },
            "discover" => Op::Discover { path },
            "observe" => Op::Observe {
                path,
                format: m.format,
            },
            "cancel_observe" => Op::CancelObserve { path },
            "delete" => Op::Delete { path },
            "write" | "create" => {
                let entries = match &m.value {
                    Some(v) => {
                        let filled = match v {
                            J::String(t) => J::String(
                                fill_template(t, &lookup)
                                    .map_err(|n| format!("params.{n} is required"))?,
                            ),
                            other => other.clone(),
                        };
                        let value = WriteValue::from_json(&filled, type_of(profile, &path))
                            .map_err(|e| format!("value for {path}: {e}"))?;
                        vec![WriteEntry { path, value }]
                    }
                    None => entries_param(params, Some(path), profile)?,
                };
                if m.operation == "write" {
                    Op::Write {
                        path,
                        entries,
                        replace: path.resource.is_some(),
                        format: m.format,
                    }
                } else {
                    Op::Create {
                        object: path,
                        entries,
                        format: m.format,
                    }
                }
            }
            "write_attributes" => Op::WriteAttributes {
                path,
                attributes: attributes_param(params)?,
            },
            other => {
                return Err(format!(
                    "profile method {method}: operation {other} unknown"
                ))
            }
        };
        op.validate().map_err(|e| e.to_string())?;
        return Ok(op);
    }
    let op = match method {
        // The Device object's own actions (TS 1.1 Core Appendix E.4:
        // /3/0/4 Reboot, /3/0/5 Factory Reset) for every device; a profile
        // may map these names to something else.
        "reboot" | "factory_reset" => Op::Execute {
            path: ResourcePath {
                object: 3,
                instance: Some(0),
                resource: Some(if method == "reboot" { 4 } else { 5 }),
                resource_instance: None,
            },
            args: args_param(params)?,
        },
        // Server-initiated bootstrap (TS 1.1 Core §E.2: /1/x/9 Bootstrap-
        // Request Trigger): the device goes back to its bootstrap server.
        // `params.instance` picks the Server instance (default 0, the one
        // our bootstrap server writes first).
        "rebootstrap" => {
            let instance = match params.get("instance") {
                None | Some(J::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .filter(|i| *i < 65535)
                    .ok_or("params.instance must be a Server object instance id (0..65534)")?
                    as u16,
            };
            Op::Execute {
                path: ResourcePath::resource(1, instance, 9),
                args: None,
            }
        }
        "read" => Op::Read {
            path: path_param(params, "path")?,
            format: format_param(params)?,
        },
        "discover" => Op::Discover {
            path: path_param(params, "path")?,
        },
        "observe" => Op::Observe {
            path: path_param(params, "path")?,
            format: format_param(params)?,
        },
        "cancel_observe" => Op::CancelObserve {
            path: path_param(params, "path")?,
        },
        "execute" => Op::Execute {
            path: path_param(params, "path")?,
            args: args_param(params)?,
        },
        "delete" => Op::Delete {
            path: path_param(params, "path")?,
        },
        "write" => {
            let path = path_param(params, "path")?;
            let replace = match params.get("mode").and_then(|m| m.as_str()) {
                None => path.resource.is_some(),
                Some("replace") => true,
                Some("update") | Some("partial") => false,
                Some(m) => return Err(format!("params.mode {m:?}: replace or update")),
            };
            Op::Write {
                path,
                entries: entries_param(params, Some(path), profile)?,
                replace,
                format: format_param(params)?,
            }
        }
        "create" => {
            let object = path_param(params, "path")?;
            let mut base = object;
            if let Some(i) = params.get("instance") {
                let i = i
                    .as_u64()
                    .and_then(|i| u16::try_from(i).ok())
                    .filter(|i| *i < u16::MAX)
                    .ok_or("params.instance is an instance id 0..65534")?;
                base.instance = Some(i);
            }
            let entries = entries_param(params, Some(base), profile)?;
            Op::Create {
                object,
                entries,
                format: format_param(params)?,
            }
        }
        "write_attributes" => Op::WriteAttributes {
            path: path_param(params, "path")?,
            attributes: attributes_param(params)?,
        },
        "read_composite" => Op::ReadComposite {
            paths: paths_param(params)?,
            format: format_param(params)?,
        },
        "observe_composite" => Op::ObserveComposite {
            paths: paths_param(params)?,
            format: format_param(params)?,
        },
        "cancel_observe_composite" => Op::CancelObserveComposite {
            paths: paths_param(params)?,
        },
        "write_composite" => Op::WriteComposite {
            entries: entries_param(params, None, profile)?,
            format: format_param(params)?,
        },
        other => return Err(format!("unknown method {other:?}")),
    };
    op.validate().map_err(|e| e.to_string())?;
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::profiles::Profile as P;
    use serde_json::json;

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    #[test]
    fn request_fields_are_checked() {
        let ok = br#"{"rpc_id":"r1","tenant_id":"acme","device_id":"d1","method":"reboot","timeout_ms":5000}"#;
        let r = RpcRequest::parse(ok).unwrap();
        r.validate().unwrap();
        assert_eq!(r.timeout_ms, Some(5000));
        for (body, field) in [
            (
                json!({"rpc_id":"","tenant_id":"a","device_id":"d","method":"m"}),
                "rpc_id",
            ),
            (
                json!({"rpc_id":"r","tenant_id":"a b","device_id":"d","method":"m"}),
                "tenant_id",
            ),
            (
                json!({"rpc_id":"r","tenant_id":"a".repeat(300),"device_id":"d","method":"m"}),
                "tenant_id",
            ),
            (
                json!({"rpc_id":"r","tenant_id":"a","device_id":"d".repeat(5000),"method":"m"}),
                "device_id",
            ),
            (
                json!({"rpc_id":"r","tenant_id":"a","device_id":"d","method":"m","params":[1]}),
                "params",
            ),
            (
                json!({"rpc_id":"r","tenant_id":"a","device_id":"d","method":"m","timeout_ms":0}),
                "timeout_ms",
            ),
        ] {
            let r = RpcRequest::parse(body.to_string().as_bytes()).unwrap();
            match r.validate() {
                Err(RpcError::Field { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(RpcRequest::parse(b"{not json").is_err());
        assert!(RpcRequest::parse(&vec![b' '; 100_000]).is_err());
    }

    #[test]
    fn profile_methods_and_generic_ones() {
        let prof = P::builtin_default();
        assert_eq!(
            resolve("reboot", &J::Null, Some(&prof)).unwrap(),
            Op::Execute {
                path: p("/3/0/4"),
                args: None
            }
        );
        assert_eq!(
            resolve("factory_reset", &J::Null, Some(&prof)).unwrap(),
            Op::Execute {
                path: p("/3/0/5"),
                args: None
            }
        );
        // Without a profile mapping, reboot and factory_reset are the
        // Device object's Executes all the same.
        assert_eq!(
            resolve("reboot", &J::Null, None).unwrap(),
            Op::Execute {
                path: p("/3/0/4"),
                args: None
            }
        );
        assert_eq!(
            resolve("factory_reset", &json!({"args": "0"}), None).unwrap(),
            Op::Execute {
                path: p("/3/0/5"),
                args: Some("0".into())
            }
        );
        assert_eq!(
            resolve("rebootstrap", &J::Null, None).unwrap(),
            Op::Execute {
                path: p("/1/0/9"),
                args: None
            }
        );
        assert_eq!(
            resolve("rebootstrap", &json!({"instance": 2}), None).unwrap(),
            Op::Execute {
                path: p("/1/2/9"),
                args: None
            }
        );
        assert!(resolve("rebootstrap", &json!({"instance": "x"}), None).is_err());
        let op = resolve(
            "write",
            &json!({"path": "/3/0/13", "value": 1700000000}),
            Some(&prof),
        )
        .unwrap();
        assert!(matches!(op, Op::Write { replace: true, ref entries, .. }
            if entries[0].value == WriteValue::Time(1700000000)));
        let op = resolve(
            "write",
            &json!({"path": "/1/0", "values": {"1": 300, "/1/0/3": 60}}),
            None,
        )
        .unwrap();
        match op {
            Op::Write {
                replace, entries, ..
            } => {
                assert!(!replace, "instance writes default to partial update");
                assert_eq!(entries[0].path, p("/1/0/1"));
                assert_eq!(entries[1].path, p("/1/0/3"));
            }
            other => panic!("{other:?}"),
        }
        let op = resolve(
            "execute",
            &json!({"path": "/3/0/4", "args": {"0": "x", "1": null}}),
            None,
        )
        .unwrap();
        assert_eq!(
            op,
            Op::Execute {
                path: p("/3/0/4"),
                args: Some("0='x',1".into())
            }
        );
        let op = resolve(
            "write_attributes",
            &json!({"path": "/3303/0/5700", "attributes": {"pmin": 5, "pmax": null}}),
            None,
        )
        .unwrap();
        assert!(matches!(op, Op::WriteAttributes { ref attributes, .. } if attributes.len() == 2));
        // Refusals with reasons.
        for (m, params) in [
            ("launch", json!({})),
            ("read", json!({})),
            ("read", json!({"path": "/x"})),
            ("execute", json!({"path": "/3/0"})),
            ("write", json!({"path": "/3/0/13", "value": "soon"})),
            (
                "write_attributes",
                json!({"path": "/3/0", "attributes": {"color": 1}}),
            ),
            ("read_composite", json!({"paths": []})),
            ("read", json!({"path": "/3/0/9", "format": "xml"})),
        ] {
            let e = resolve(m, &params, Some(&prof)).unwrap_err();
            assert!(!e.is_empty(), "{m} {params}");
        }
    }

    #[test]
    fn templated_profile_methods() {
        let prof = P::from_toml(
            "t",
            r#"
[rpc.set_interval]
operation = "write"
path = "/1/0/3"
value = "{seconds}"
[rpc.update_with]
operation = "execute"
path = "/5/0/2"
args = "0='{mode}'"
"#,
            "t",
        )
        .unwrap();
        let op = resolve("set_interval", &json!({"seconds": 30}), Some(&prof)).unwrap();
        assert!(
            matches!(op, Op::Write { ref entries, .. } if entries[0].value == WriteValue::Int(30))
        );
        let op = resolve("update_with", &json!({"mode": "fast"}), Some(&prof)).unwrap();
        assert_eq!(
            op,
            Op::Execute {
                path: p("/5/0/2"),
                args: Some("0='fast'".into())
            }
        );
        assert_eq!(
            resolve("update_with", &json!({}), Some(&prof)).unwrap_err(),
            "params.mode is required"
        );
        assert!(fill_template("a{b", &|_| None).is_ok());
    }
}

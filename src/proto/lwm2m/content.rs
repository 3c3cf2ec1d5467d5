//! LwM2M content formats (LwM2M TS 1.1 Core §7.4; TS 1.2 Core §7.4) decoded
//! into resource values.
//!
//! Supported: text/plain (0), opaque (42), CBOR (60), SenML JSON (110, RFC 8428),
//! SenML CBOR (112, RFC 8428 §6), OMA TLV (11542) and OMA LwM2M JSON (11543),
//! for single-resource payloads and for object / object-instance payloads.
//!
//! TLV and opaque carry untyped bytes; they are kept as [`Value::Raw`] and
//! interpreted later with the resource's declared data type (see
//! [`Value::to_number`]). Decoding is total: malformed input yields a
//! [`ContentError`], never a panic, and the number of values is bounded.

use crate::proto::cbor::{self, Cbor};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::fmt;

pub const CF_TEXT: u16 = 0;
pub const CF_LINK: u16 = 40;
pub const CF_OPAQUE: u16 = 42;
pub const CF_CBOR: u16 = 60;
pub const CF_SENML_JSON: u16 = 110;
pub const CF_SENML_CBOR: u16 = 112;
pub const CF_TLV: u16 = 11542;
pub const CF_LWM2M_JSON: u16 = 11543;
/// Pre-registration TLV / JSON numbers used by LwM2M 1.0 era clients.
pub const CF_TLV_OLD: u16 = 1542;
pub const CF_LWM2M_JSON_OLD: u16 = 1543;

/// Upper bound on values in one payload.
pub const MAX_VALUES: usize = 4096;

/// `/object/instance/resource[/resource-instance]` (LwM2M TS Core §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourcePath {
    pub object: u16,
    pub instance: Option<u16>,
    pub resource: Option<u16>,
    pub resource_instance: Option<u16>,
}

impl ResourcePath {
    pub const fn resource(object: u16, instance: u16, resource: u16) -> ResourcePath {
        ResourcePath {
            object,
            instance: Some(instance),
            resource: Some(resource),
            resource_instance: None,
        }
    }
    pub const fn instance(object: u16, instance: u16) -> ResourcePath {
        ResourcePath {
            object,
            instance: Some(instance),
            resource: None,
            resource_instance: None,
        }
    }
    pub fn depth(&self) -> usize {
        1 + self.instance.is_some() as usize
            + self.resource.is_some() as usize
            + self.resource_instance.is_some() as usize
    }
    /// Parses `/3303/0/5700` (leading slash optional).
    pub fn parse(s: &str) -> Option<ResourcePath> {
        let mut ids = [None; 4];
        let mut n = 0;
        for seg in s.trim_start_matches('/').split('/') {
            if seg.is_empty() {
                continue;
            }
            if n == 4 {
                return None;
            }
            ids[n] = Some(seg.parse::<u16>().ok()?);
            n += 1;
        }
        Some(ResourcePath {
            object: ids[0]?,
            instance: ids[1],
            resource: ids[2],
            resource_instance: ids[3],
        })
    }
    fn child(&self, id: u16) -> Option<ResourcePath> {
        let mut p = *self;
        if p.instance.is_none() {
            p.instance = Some(id);
        } else if p.resource.is_none() {
            p.resource = Some(id);
        } else if p.resource_instance.is_none() {
            p.resource_instance = Some(id);
        } else {
            return None;
        }
        Some(p)
    }
    /// The same path without its resource instance, used to look up mappings.
    pub fn without_resource_instance(&self) -> ResourcePath {
        ResourcePath {
            resource_instance: None,
            ..*self
        }
    }
}

/// A [`ResourcePath`] as text, on the stack (`/65535/65535/65535/65535` is 24
/// bytes).
#[derive(Clone, Copy)]
pub struct PathText {
    buf: [u8; 24],
    len: u8,
}

impl PathText {
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and slashes are ever written.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl ResourcePath {
    /// The path as text without allocating.
    pub fn text(&self) -> PathText {
        let mut t = PathText {
            buf: [0; 24],
            len: 0,
        };
        for id in [
            Some(self.object),
            self.instance,
            self.resource,
            self.resource_instance,
        ]
        .into_iter()
        .flatten()
        {
            let mut digits = [0u8; 5];
            let mut n = 0;
            let mut v = id;
            loop {
                digits[n] = b'0' + (v % 10) as u8;
                n += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            t.buf[t.len as usize] = b'/';
            t.len += 1;
            for d in digits[..n].iter().rev() {
                t.buf[t.len as usize] = *d;
                t.len += 1;
            }
        }
        t
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.object)?;
        for id in [self.instance, self.resource, self.resource_instance]
            .into_iter()
            .flatten()
        {
            write!(f, "/{id}")?;
        }
        Ok(())
    }
}

/// LwM2M resource data types (TS Core Appendix C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Integer,
    Unsigned,
    Float,
    Boolean,
    String,
    Opaque,
    Time,
}

/// A number as the device sent it: integers stay integers (they are
/// published as JSON integers), floats stay floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
    pub fn is_finite(self) -> bool {
        match self {
            Num::Int(_) => true,
            Num::Float(f) => f.is_finite(),
        }
    }
    /// The number in the representation a resource's declared type asks for:
    /// Integer / Unsigned / Time resources are integers when the value is
    /// integral, Float resources are floats; undeclared types keep the form
    /// the device used.
    fn typed(self, ty: Option<DataType>) -> Num {
        match (self, ty) {
            (Num::Int(i), Some(DataType::Float)) => Num::Float(i as f64),
            (Num::Float(f), Some(DataType::Integer | DataType::Unsigned | DataType::Time))
                if f.fract() == 0.0 && f.abs() < 9.0e15 =>
            {
                Num::Int(f as i64)
            }
            (n, _) => n,
        }
    }
}

impl serde::Serialize for Num {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Num::Int(i) => s.serialize_i64(*i),
            Num::Float(f) => s.serialize_f64(*f),
        }
    }
}

/// A decoded resource value. Text and bytes borrow from the payload where the
/// format allows (text, opaque, TLV); JSON-based formats own theirs.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Cow<'a, str>),
    /// Untyped bytes (TLV value, opaque payload, SenML `vd`).
    Raw(Cow<'a, [u8]>),
}

impl Value<'_> {
    /// Numeric interpretation. Raw bytes follow TS Core §7.4.3 (TLV): integers
    /// are 1/2/4/8-byte two's complement big-endian, floats 4/8-byte IEEE 754,
    /// booleans one byte. Without a declared type, 1/2-byte values are read as
    /// integers and 4/8-byte values as floats. Text is an integer when it has
    /// no fraction or exponent.
    pub fn to_number(&self, ty: Option<DataType>) -> Option<Num> {
        let n = match self {
            Value::Int(i) => Num::Int(*i),
            Value::Float(f) => Num::Float(*f),
            Value::Bool(b) => Num::Int(*b as i64),
            Value::Str(s) => parse_number(s)?,
            Value::Raw(b) => raw_number(b, ty)?,
        };
        Some(n.typed(ty))
    }
    pub fn to_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Int(n) => Some(*n != 0),
            Value::Float(n) => Some(*n != 0.0),
            Value::Str(s) => match s.trim() {
                "1" | "true" => Some(true),
                "0" | "false" => Some(false),
                _ => None,
            },
            Value::Raw(b) if b.len() == 1 && b[0] <= 1 => Some(b[0] == 1),
            Value::Raw(_) => None,
        }
    }
    pub fn to_string_value(&self) -> String {
        match self {
            Value::Int(n) => n.to_string(),
            Value::Float(n) => format_number(*n),
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => s.to_string(),
            Value::Raw(b) => match std::str::from_utf8(b) {
                Ok(s) => s.to_string(),
                Err(_) => b.iter().map(|x| format!("{x:02x}")).collect(),
            },
        }
    }
}

fn parse_number(s: &str) -> Option<Num> {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Some(Num::Int(i));
    }
    t.parse::<f64>().ok().map(Num::Float)
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn be_int(b: &[u8]) -> Option<i64> {
    Some(match b.len() {
        1 => b[0] as i8 as i64,
        2 => i16::from_be_bytes([b[0], b[1]]) as i64,
        4 => i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64,
        8 => i64::from_be_bytes(b.try_into().ok()?),
        _ => return None,
    })
}

fn be_uint(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 8 {
        return None;
    }
    Some(b.iter().fold(0u64, |a, x| (a << 8) | *x as u64))
}

fn be_float(b: &[u8]) -> Option<f64> {
    match b.len() {
        4 => Some(f32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f64),
        8 => Some(f64::from_be_bytes(b.try_into().ok()?)),
        _ => None,
    }
}

fn raw_number(b: &[u8], ty: Option<DataType>) -> Option<Num> {
    match ty {
        Some(DataType::Integer) | Some(DataType::Time) => be_int(b).map(Num::Int),
        Some(DataType::Unsigned) => be_uint(b).and_then(|v| i64::try_from(v).ok()).map(Num::Int),
        Some(DataType::Float) => be_float(b).map(Num::Float),
        Some(DataType::Boolean) => (b.len() == 1 && b[0] <= 1).then(|| Num::Int(b[0] as i64)),
        Some(DataType::String) => parse_number(std::str::from_utf8(b).ok()?),
        Some(DataType::Opaque) => None,
        None => match b.len() {
            1 | 2 => be_int(b).map(Num::Int),
            4 | 8 => be_float(b).map(Num::Float),
            _ => None,
        },
    }
}

/// One value at a path, with the SenML time (epoch ms) when the device gave one.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceValue<'a> {
    pub path: ResourcePath,
    pub value: Value<'a>,
    pub time_ms: Option<i64>,
}

/// The values of one payload; one value (the common notification) needs no
/// allocation.
pub type Values<'a> = SmallVec<[ResourceValue<'a>; 2]>;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ContentError {
    #[error("unsupported content format {0}")]
    Unsupported(u16),
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("malformed {format} payload: {reason}")]
    Malformed {
        format: &'static str,
        reason: String,
    },
    #[error("too many values in payload (limit {MAX_VALUES})")]
    TooMany,
    #[error("a single-resource format was used for {0}, which is not a resource")]
    NotAResource(ResourcePath),
}

fn malformed(format: &'static str, reason: impl fmt::Display) -> ContentError {
    ContentError::Malformed {
        format,
        reason: reason.to_string(),
    }
}

/// Decodes `payload` of content format `cf`, sent for the request path `base`.
/// `now_ms` resolves SenML relative times (RFC 8428 §4.5.3).
pub fn decode<'a>(
    cf: u16,
    base: ResourcePath,
    payload: &'a [u8],
    now_ms: i64,
) -> Result<Values<'a>, ContentError> {
    let single = |value: Value<'a>| -> Result<Values<'a>, ContentError> {
        if base.resource.is_none() {
            return Err(ContentError::NotAResource(base));
        }
        let mut v = Values::new();
        v.push(ResourceValue {
            path: base,
            value,
            time_ms: None,
        });
        Ok(v)
    };
    match cf {
        CF_TEXT => {
            let s = std::str::from_utf8(payload).map_err(|_| ContentError::NotUtf8)?;
            single(Value::Str(Cow::Borrowed(s)))
        }
        CF_OPAQUE => single(Value::Raw(Cow::Borrowed(payload))),
        CF_CBOR => {
            let v = cbor::decode(payload).map_err(|e| malformed("CBOR", e))?;
            single(cbor_scalar(v).ok_or_else(|| malformed("CBOR", "not a scalar"))?)
        }
        CF_TLV | CF_TLV_OLD => decode_tlv(base, payload),
        CF_SENML_JSON => decode_senml_json(payload, now_ms),
        CF_SENML_CBOR => decode_senml_cbor(payload, now_ms),
        CF_LWM2M_JSON | CF_LWM2M_JSON_OLD => decode_lwm2m_json(base, payload, now_ms),
        other => Err(ContentError::Unsupported(other)),
    }
}

fn cbor_scalar(v: Cbor) -> Option<Value<'static>> {
    Some(match v {
        Cbor::Uint(_) | Cbor::Nint(_) => match v.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(v.as_f64()?),
        },
        Cbor::Float(f) => Value::Float(f),
        Cbor::Bool(b) => Value::Bool(b),
        Cbor::Text(s) => Value::Str(Cow::Owned(s)),
        Cbor::Bytes(b) => Value::Raw(Cow::Owned(b)),
        _ => return None,
    })
}

// ---------------------------------------------------------------- TLV

/// TLV identifier types (TS Core §7.4.3, Table 7.4.3-1 bits 7-6).
const TLV_OBJECT_INSTANCE: u8 = 0;
const TLV_RESOURCE_INSTANCE: u8 = 1;
const TLV_MULTIPLE_RESOURCE: u8 = 2;
const TLV_RESOURCE: u8 = 3;

struct Tlv<'a> {
    kind: u8,
    id: u16,
    value: &'a [u8],
}

fn tlv_next(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), ContentError> {
    let e = |r: &str| malformed("TLV", r);
    let t = *buf.first().ok_or_else(|| e("empty"))?;
    let kind = t >> 6;
    let mut pos = 1;
    let id = if t & 0x20 != 0 {
        let b = buf.get(1..3).ok_or_else(|| e("truncated identifier"))?;
        pos += 2;
        u16::from_be_bytes([b[0], b[1]])
    } else {
        let b = *buf.get(1).ok_or_else(|| e("truncated identifier"))?;
        pos += 1;
        b as u16
    };
    let len_bytes = ((t >> 3) & 3) as usize;
    let len = if len_bytes == 0 {
        (t & 7) as usize
    } else {
        let b = buf
            .get(pos..pos + len_bytes)
            .ok_or_else(|| e("truncated length"))?;
        pos += len_bytes;
        b.iter().fold(0usize, |a, x| (a << 8) | *x as usize)
    };
    let value = buf
        .get(pos..pos + len)
        .ok_or_else(|| e("value runs past the end"))?;
    Ok((Tlv { kind, id, value }, &buf[pos + len..]))
}

fn decode_tlv(base: ResourcePath, payload: &[u8]) -> Result<Values<'_>, ContentError> {
    let mut out = Values::new();
    tlv_level(base, payload, &mut out, 0)?;
    Ok(out)
}

fn tlv_level<'a>(
    base: ResourcePath,
    mut buf: &'a [u8],
    out: &mut Values<'a>,
    depth: usize,
) -> Result<(), ContentError> {
    if depth > 3 {
        return Err(malformed("TLV", "nested too deep"));
    }
    while !buf.is_empty() {
        let (tlv, rest) = tlv_next(buf)?;
        buf = rest;
        // The TLV identifier names the child of `base` unless `base` already
        // names this very entry (single resource or resource instance read,
        // or an instance read answered inside its Object Instance TLV, as
        // npm coap-node / lwm2m-codec do).
        let path = match (tlv.kind, base.resource, base.resource_instance) {
            (TLV_OBJECT_INSTANCE, None, _) if base.instance == Some(tlv.id) => base,
            (TLV_RESOURCE | TLV_MULTIPLE_RESOURCE, Some(r), _) if r == tlv.id => base,
            (TLV_RESOURCE_INSTANCE, Some(_), Some(ri)) if ri == tlv.id => base,
            _ => base
                .child(tlv.id)
                .ok_or_else(|| malformed("TLV", "identifier deeper than a resource instance"))?,
        };
        match tlv.kind {
            TLV_OBJECT_INSTANCE | TLV_MULTIPLE_RESOURCE => {
                tlv_level(path, tlv.value, out, depth + 1)?
            }
            TLV_RESOURCE | TLV_RESOURCE_INSTANCE => {
                if out.len() >= MAX_VALUES {
                    return Err(ContentError::TooMany);
                }
                out.push(ResourceValue {
                    path,
                    value: Value::Raw(Cow::Borrowed(tlv.value)),
                    time_ms: None,
                });
            }
            _ => unreachable_kind()?,
        }
    }
    Ok(())
}

fn unreachable_kind() -> Result<(), ContentError> {
    Err(malformed("TLV", "bad identifier type"))
}

/// TLV encoder for tests, the load generator and benches.
pub fn encode_tlv_resource(out: &mut Vec<u8>, kind: u8, id: u16, value: &[u8]) {
    let mut t = kind << 6;
    let wide = id > 0xff;
    if wide {
        t |= 0x20;
    }
    let len = value.len();
    let len_bytes: usize = if len < 8 {
        t |= len as u8;
        0
    } else if len <= 0xff {
        1
    } else if len <= 0xffff {
        2
    } else {
        3
    };
    t |= (len_bytes as u8) << 3;
    out.push(t);
    if wide {
        out.extend_from_slice(&id.to_be_bytes());
    } else {
        out.push(id as u8);
    }
    let lb = (len as u32).to_be_bytes();
    out.extend_from_slice(&lb[4 - len_bytes..]);
    out.extend_from_slice(value);
}

pub mod tlv_kind {
    pub const OBJECT_INSTANCE: u8 = super::TLV_OBJECT_INSTANCE;
    pub const RESOURCE_INSTANCE: u8 = super::TLV_RESOURCE_INSTANCE;
    pub const MULTIPLE_RESOURCE: u8 = super::TLV_MULTIPLE_RESOURCE;
    pub const RESOURCE: u8 = super::TLV_RESOURCE;
}

// ---------------------------------------------------------------- SenML

/// One SenML record with labels resolved but base values not yet applied.
#[derive(Default)]
struct SenmlRecord {
    bn: Option<String>,
    bt: Option<f64>,
    bv: Option<f64>,
    n: Option<String>,
    t: Option<f64>,
    value: Option<Value<'static>>,
}

/// RFC 8428 §4.5.3: times below 2^28 are relative to now.
fn resolve_time(t: f64, now_ms: i64) -> i64 {
    if t.abs() < (1u64 << 28) as f64 {
        now_ms + (t * 1000.0) as i64
    } else {
        (t * 1000.0) as i64
    }
}

/// Applies base fields record by record (RFC 8428 §4.6 resolution).
fn resolve_senml<'a>(
    records: Vec<SenmlRecord>,
    now_ms: i64,
    format: &'static str,
) -> Result<Values<'a>, ContentError> {
    let mut bn = String::new();
    let mut bt = 0.0;
    let mut bv = 0.0;
    let mut out = Values::new();
    for r in records {
        if let Some(b) = r.bn {
            bn = b;
        }
        if let Some(b) = r.bt {
            bt = b;
        }
        if let Some(b) = r.bv {
            bv = b;
        }
        let Some(value) = r.value else {
            // A record without a value (e.g. only base fields, or a read-only
            // name) carries nothing to publish.
            continue;
        };
        // RFC 8428 §4.6: the base value is added to the value.
        let value = match value {
            Value::Int(n) if bv == 0.0 => Value::Int(n),
            Value::Int(n) if bv.fract() == 0.0 && bv.abs() < 9.0e15 => {
                Value::Int(n.saturating_add(bv as i64))
            }
            Value::Int(n) => Value::Float(n as f64 + bv),
            Value::Float(n) => Value::Float(n + bv),
            v => v,
        };
        let name = format!("{}{}", bn, r.n.as_deref().unwrap_or(""));
        let path = ResourcePath::parse(&name)
            .ok_or_else(|| malformed(format, format!("name {name:?} is not an LwM2M path")))?;
        let has_time = r.t.is_some() || bt != 0.0;
        let time_ms = has_time.then(|| resolve_time(bt + r.t.unwrap_or(0.0), now_ms));
        if out.len() >= MAX_VALUES {
            return Err(ContentError::TooMany);
        }
        out.push(ResourceValue {
            path,
            value,
            time_ms,
        });
    }
    Ok(out)
}

fn decode_senml_json<'a>(payload: &[u8], now_ms: i64) -> Result<Values<'a>, ContentError> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| malformed("SenML JSON", e))?;
    let arr = v
        .as_array()
        .ok_or_else(|| malformed("SenML JSON", "top level is not an array"))?;
    if arr.len() > MAX_VALUES {
        return Err(ContentError::TooMany);
    }
    let mut recs = Vec::with_capacity(arr.len());
    for item in arr {
        let o = item
            .as_object()
            .ok_or_else(|| malformed("SenML JSON", "record is not an object"))?;
        let mut r = SenmlRecord::default();
        for (k, v) in o {
            let num = || {
                v.as_f64()
                    .ok_or_else(|| malformed("SenML JSON", format!("{k} is not a number")))
            };
            let text = || {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| malformed("SenML JSON", format!("{k} is not a string")))
            };
            match k.as_str() {
                "bn" => r.bn = Some(text()?),
                "bt" => r.bt = Some(num()?),
                "bv" => r.bv = Some(num()?),
                "n" => r.n = Some(text()?),
                "t" => r.t = Some(num()?),
                "v" => {
                    r.value = Some(
                        json_number(v)
                            .ok_or_else(|| malformed("SenML JSON", "v is not a number"))?,
                    )
                }
                "vs" => r.value = Some(Value::Str(Cow::Owned(text()?))),
                "vlo" => r.value = Some(Value::Str(Cow::Owned(text()?))),
                "vb" => {
                    r.value =
                        Some(Value::Bool(v.as_bool().ok_or_else(|| {
                            malformed("SenML JSON", "vb is not a boolean")
                        })?))
                }
                "vd" => r.value = Some(Value::Raw(Cow::Owned(base64url_decode(&text()?)?))),
                _ => {}
            }
        }
        recs.push(r);
    }
    resolve_senml(recs, now_ms, "SenML JSON")
}

/// RFC 8428 §6 label integers for SenML CBOR.
fn decode_senml_cbor<'a>(payload: &[u8], now_ms: i64) -> Result<Values<'a>, ContentError> {
    let v = cbor::decode(payload).map_err(|e| malformed("SenML CBOR", e))?;
    let Cbor::Array(items) = v else {
        return Err(malformed("SenML CBOR", "top level is not an array"));
    };
    let mut recs = Vec::with_capacity(items.len());
    for item in items {
        let Cbor::Map(fields) = item else {
            return Err(malformed("SenML CBOR", "record is not a map"));
        };
        let mut r = SenmlRecord::default();
        for (k, v) in fields {
            let key: i64 = match &k {
                Cbor::Text(s) if s == "vlo" => {
                    if let Cbor::Text(s) = v {
                        r.value = Some(Value::Str(Cow::Owned(s)));
                    }
                    continue;
                }
                other => match other.as_i64() {
                    Some(k) => k,
                    None => continue,
                },
            };
            let num = || {
                v.as_f64()
                    .ok_or_else(|| malformed("SenML CBOR", format!("label {key} is not a number")))
            };
            let text = || match &v {
                Cbor::Text(s) => Ok(s.clone()),
                _ => Err(malformed(
                    "SenML CBOR",
                    format!("label {key} is not a string"),
                )),
            };
            match key {
                -2 => r.bn = Some(text()?),
                -3 => r.bt = Some(num()?),
                -5 => r.bv = Some(num()?),
                0 => r.n = Some(text()?),
                6 => r.t = Some(num()?),
                2 => {
                    r.value = Some(match v.as_i64() {
                        Some(i) => Value::Int(i),
                        None => Value::Float(num()?),
                    })
                }
                3 => r.value = Some(Value::Str(Cow::Owned(text()?))),
                4 => match v {
                    Cbor::Bool(b) => r.value = Some(Value::Bool(b)),
                    _ => return Err(malformed("SenML CBOR", "vb is not a boolean")),
                },
                8 => match v {
                    Cbor::Bytes(b) => r.value = Some(Value::Raw(Cow::Owned(b))),
                    _ => return Err(malformed("SenML CBOR", "vd is not a byte string")),
                },
                _ => {}
            }
        }
        recs.push(r);
    }
    resolve_senml(recs, now_ms, "SenML CBOR")
}

/// A JSON number as an integer when it was written as one.
fn json_number(v: &serde_json::Value) -> Option<Value<'static>> {
    if let Some(i) = v.as_i64() {
        return Some(Value::Int(i));
    }
    v.as_f64().map(Value::Float)
}

fn base64url_decode(s: &str) -> Result<Vec<u8>, ContentError> {
    super::encode::decode_base64(s).ok_or_else(|| malformed("SenML JSON", "vd is not base64url"))
}

// ---------------------------------------------------------------- LwM2M JSON

/// OMA LwM2M JSON (TS 1.0/1.1 Core §7.4.4): `{"bn":..,"bt":..,"e":[{"n","v"|"sv"|"bv"|"ov","t"}]}`.
fn decode_lwm2m_json<'a>(
    base: ResourcePath,
    payload: &[u8],
    now_ms: i64,
) -> Result<Values<'a>, ContentError> {
    const F: &str = "LwM2M JSON";
    let v: serde_json::Value = serde_json::from_slice(payload).map_err(|e| malformed(F, e))?;
    let o = v
        .as_object()
        .ok_or_else(|| malformed(F, "top level is not an object"))?;
    let bn = match o.get("bn") {
        Some(b) => b
            .as_str()
            .ok_or_else(|| malformed(F, "bn is not a string"))?
            .to_string(),
        None => format!("{base}/"),
    };
    let bt = o.get("bt").and_then(|t| t.as_f64());
    let e = o
        .get("e")
        .and_then(|e| e.as_array())
        .ok_or_else(|| malformed(F, "missing e array"))?;
    if e.len() > MAX_VALUES {
        return Err(ContentError::TooMany);
    }
    let mut recs = Vec::with_capacity(e.len() + 1);
    recs.push(SenmlRecord {
        bn: Some(bn),
        bt,
        ..Default::default()
    });
    for item in e {
        let it = item
            .as_object()
            .ok_or_else(|| malformed(F, "entry is not an object"))?;
        let mut r = SenmlRecord {
            n: it.get("n").and_then(|n| n.as_str()).map(str::to_string),
            t: it.get("t").and_then(|t| t.as_f64()),
            ..Default::default()
        };
        r.value = if let Some(v) = it.get("v") {
            Some(json_number(v).ok_or_else(|| malformed(F, "v is not a number"))?)
        } else if let Some(v) = it.get("sv") {
            Some(Value::Str(Cow::Owned(
                v.as_str()
                    .ok_or_else(|| malformed(F, "sv is not a string"))?
                    .to_string(),
            )))
        } else if let Some(v) = it.get("bv") {
            Some(Value::Bool(
                v.as_bool()
                    .ok_or_else(|| malformed(F, "bv is not a boolean"))?,
            ))
        } else {
            it.get("ov")
                .and_then(|v| v.as_str())
                .map(|s| Value::Str(Cow::Owned(s.to_string())))
        };
        recs.push(r);
    }
    resolve_senml(recs, now_ms, F)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::cbor::enc;

    const NOW: i64 = 1_700_000_000_000;

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    #[test]
    fn paths() {
        assert_eq!(p("/3303/0/5700").to_string(), "/3303/0/5700");
        for s in [
            "/0",
            "/3/0/9",
            "/65535/65535/65535/65535",
            "/3303/0/5700/10",
        ] {
            assert_eq!(p(s).text().as_str(), s);
        }
        assert_eq!(p("3/0").depth(), 2);
        assert!(ResourcePath::parse("/a").is_none());
        assert!(ResourcePath::parse("/1/2/3/4/5").is_none());
        assert!(ResourcePath::parse("/70000").is_none());
    }

    #[test]
    fn text_and_opaque_and_cbor() {
        let v = decode(CF_TEXT, p("/3303/0/5700"), b"22.5", NOW).unwrap();
        assert_eq!(v[0].value.to_number(None), Some(Num::Float(22.5)));
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert!(decode(CF_TEXT, p("/3303/0"), b"1", NOW).is_err());
        let bytes = 22.5f64.to_be_bytes();
        let v = decode(CF_OPAQUE, p("/3303/0/5700"), &bytes, NOW).unwrap();
        assert_eq!(
            v[0].value.to_number(Some(DataType::Float)),
            Some(Num::Float(22.5))
        );
        let mut c = Vec::new();
        enc::f64(&mut c, 22.5);
        let v = decode(CF_CBOR, p("/3303/0/5700"), &c, NOW).unwrap();
        assert_eq!(v[0].value, Value::Float(22.5));
        assert!(decode(9999, p("/1/0/1"), b"", NOW).is_err());
    }

    #[test]
    fn tlv_instance_with_multiple_resources() {
        // /3303/0 with 5700 = 22.5 (float64), 5701 = "Cel", and /3/0/9-like int.
        let mut t = Vec::new();
        encode_tlv_resource(&mut t, tlv_kind::RESOURCE, 5700, &22.5f64.to_be_bytes());
        encode_tlv_resource(&mut t, tlv_kind::RESOURCE, 5701, b"Cel");
        let v = decode(CF_TLV, p("/3303/0"), &t, NOW).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert_eq!(v[0].value.to_number(None), Some(Num::Float(22.5)));
        assert_eq!(v[1].value.to_string_value(), "Cel");

        // Object level: two instances wrapped in object-instance TLVs.
        let mut obj = Vec::new();
        encode_tlv_resource(&mut obj, tlv_kind::OBJECT_INSTANCE, 0, &t);
        let mut t1 = Vec::new();
        encode_tlv_resource(&mut t1, tlv_kind::RESOURCE, 5700, &(-4.0f32).to_be_bytes());
        encode_tlv_resource(&mut obj, tlv_kind::OBJECT_INSTANCE, 1, &t1);
        let v = decode(CF_TLV, p("/3303"), &obj, NOW).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[2].path, p("/3303/1/5700"));
        assert_eq!(
            v[2].value.to_number(Some(DataType::Float)),
            Some(Num::Float(-4.0))
        );

        // An instance read answered inside its own Object Instance TLV
        // (npm coap-node does this): the same paths.
        let mut wrapped = Vec::new();
        encode_tlv_resource(&mut wrapped, tlv_kind::OBJECT_INSTANCE, 0, &t);
        let v = decode(CF_TLV, p("/3303/0"), &wrapped, NOW).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert_eq!(v[1].path, p("/3303/0/5701"));
        // ...but another instance's TLV under it is a child, as before.
        let mut other = Vec::new();
        encode_tlv_resource(&mut other, tlv_kind::OBJECT_INSTANCE, 1, &t);
        assert!(decode(CF_TLV, p("/3303/0"), &other, NOW)
            .map(|v| v.iter().all(|x| x.path != p("/3303/0/5700")))
            .unwrap_or(true));

        // Single resource read: the TLV id repeats the resource id.
        let mut one = Vec::new();
        encode_tlv_resource(&mut one, tlv_kind::RESOURCE, 9, &[87]);
        let v = decode(CF_TLV, p("/3/0/9"), &one, NOW).unwrap();
        assert_eq!(v[0].path, p("/3/0/9"));
        assert_eq!(
            v[0].value.to_number(Some(DataType::Integer)),
            Some(Num::Int(87))
        );

        // Multiple resource with instances.
        let mut inner = Vec::new();
        encode_tlv_resource(&mut inner, tlv_kind::RESOURCE_INSTANCE, 0, &[1]);
        encode_tlv_resource(&mut inner, tlv_kind::RESOURCE_INSTANCE, 1, &[5]);
        let mut mr = Vec::new();
        encode_tlv_resource(&mut mr, tlv_kind::MULTIPLE_RESOURCE, 6, &inner);
        let v = decode(CF_TLV, p("/3/0"), &mr, NOW).unwrap();
        assert_eq!(v[1].path, p("/3/0/6/1"));

        // A 300-byte value uses the two-byte length form.
        let mut big = Vec::new();
        encode_tlv_resource(&mut big, tlv_kind::RESOURCE, 1, &[b'a'; 300]);
        assert_eq!(decode(CF_TLV, p("/3/0"), &big, NOW).unwrap().len(), 1);
        assert!(decode(CF_TLV, p("/3/0"), &big[..100], NOW).is_err());
    }

    #[test]
    fn senml_json_base_name_and_time() {
        let j = br#"[{"bn":"/3303/0/","bt":1700000000,"n":"5700","v":22.5},
                    {"n":"5700","t":60,"v":23},{"n":"5701","vs":"Cel"},
                    {"bn":"/3/0/","n":"9","v":80}]"#;
        let v = decode(CF_SENML_JSON, p("/0"), j, NOW).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert_eq!(v[0].time_ms, Some(1_700_000_000_000));
        assert_eq!(v[1].time_ms, Some(1_700_000_060_000));
        assert_eq!(v[2].value, Value::Str("Cel".into()));
        assert_eq!(v[1].value, Value::Int(23));
        assert_eq!(v[3].path, p("/3/0/9"));
        // Relative time (RFC 8428 §4.5.3).
        let v = decode(
            CF_SENML_JSON,
            p("/0"),
            br#"[{"n":"/3/0/9","v":1,"t":-5}]"#,
            NOW,
        )
        .unwrap();
        assert_eq!(v[0].time_ms, Some(NOW - 5000));
        // No time given: none reported.
        let v = decode(CF_SENML_JSON, p("/0"), br#"[{"n":"/3/0/9","v":1}]"#, NOW).unwrap();
        assert_eq!(v[0].time_ms, None);
        assert!(decode(CF_SENML_JSON, p("/0"), br#"[{"n":"x","v":1}]"#, NOW).is_err());
        assert!(decode(CF_SENML_JSON, p("/0"), br#"{"n":"x"}"#, NOW).is_err());
    }

    #[test]
    fn senml_cbor() {
        let mut c = Vec::new();
        enc::array(&mut c, 2);
        enc::map(&mut c, 4);
        enc::int(&mut c, -2);
        enc::text(&mut c, "/3303/0/");
        enc::int(&mut c, -3);
        enc::int(&mut c, 1_700_000_000);
        enc::int(&mut c, 0);
        enc::text(&mut c, "5700");
        enc::int(&mut c, 2);
        enc::f64(&mut c, 22.5);
        enc::map(&mut c, 2);
        enc::int(&mut c, 0);
        enc::text(&mut c, "5850");
        enc::int(&mut c, 4);
        enc::bool(&mut c, true);
        let v = decode(CF_SENML_CBOR, p("/0"), &c, NOW).unwrap();
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert_eq!(v[0].value, Value::Float(22.5));
        assert_eq!(v[0].time_ms, Some(1_700_000_000_000));
        assert_eq!(v[1].path, p("/3303/0/5850"));
        assert_eq!(v[1].value, Value::Bool(true));
    }

    #[test]
    fn lwm2m_json() {
        let j = br#"{"bn":"/3303/0/","e":[{"n":"5700","v":22.5},{"n":"5701","sv":"Cel"}]}"#;
        let v = decode(CF_LWM2M_JSON, p("/3303/0"), j, NOW).unwrap();
        assert_eq!(v[0].path, p("/3303/0/5700"));
        assert_eq!(v[0].value, Value::Float(22.5));
        let j = br#"{"e":[{"n":"","v":21}]}"#;
        let v = decode(CF_LWM2M_JSON, p("/3303/0/5700"), j, NOW).unwrap();
        assert_eq!(v[0].path, p("/3303/0/5700"));
    }

    #[test]
    fn integers_stay_integers() {
        let bat = p("/3/0/9");
        let v = decode(CF_TEXT, bat, b"100", NOW).unwrap();
        assert_eq!(v[0].value.to_number(None), Some(Num::Int(100)));
        assert_eq!(
            v[0].value.to_number(Some(DataType::Integer)),
            Some(Num::Int(100))
        );
        // A float resource stays a float even when the text has no fraction.
        assert_eq!(
            v[0].value.to_number(Some(DataType::Float)),
            Some(Num::Float(100.0))
        );
        let v = decode(CF_TEXT, bat, b"22.5", NOW).unwrap();
        assert_eq!(v[0].value.to_number(None), Some(Num::Float(22.5)));
        let mut t = Vec::new();
        encode_tlv_resource(&mut t, tlv_kind::RESOURCE, 9, &[100]);
        let v = decode(CF_TLV, bat, &t, NOW).unwrap();
        assert_eq!(
            v[0].value.to_number(Some(DataType::Integer)),
            Some(Num::Int(100))
        );
        let mut c = Vec::new();
        enc::int(&mut c, 100);
        let v = decode(CF_CBOR, bat, &c, NOW).unwrap();
        assert_eq!(
            v[0].value.to_number(Some(DataType::Integer)),
            Some(Num::Int(100))
        );
        let v = decode(
            CF_SENML_JSON,
            p("/0"),
            br#"[{"n":"/3/0/9","v":100},{"n":"/3/0/10","v":100.0}]"#,
            NOW,
        )
        .unwrap();
        assert_eq!(v[0].value, Value::Int(100));
        assert_eq!(v[1].value, Value::Float(100.0));
        assert_eq!(
            serde_json::to_string(&[Num::Int(100), Num::Float(100.0), Num::Float(22.5)]).unwrap(),
            "[100,100.0,22.5]"
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(cf in proptest::sample::select(vec![0u16, 42, 60, 110, 112, 11542, 11543]),
                                data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode(cf, p("/3303/0"), &data, NOW);
            let _ = decode(cf, p("/3303/0/5700"), &data, NOW);
        }
    }
}

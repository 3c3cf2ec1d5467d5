//! LwM2M content encoders (LwM2M TS 1.1 Core §7.4): the payloads of Write,
//! Write-Composite, Create and the path lists of Read-Composite /
//! Observe-Composite, and the choice of format for a device.
//!
//! Formats: text/plain (0) and opaque (42) and CBOR (60) for one resource;
//! OMA TLV (11542, §7.4.3), SenML JSON (110, RFC 8428 §5) and SenML CBOR
//! (112, RFC 8428 §6), OMA LwM2M JSON (11543, TS 1.0 §6.4.4) for any depth.
//! The decoders live in [`super::content`]; every encoder here round-trips
//! through them (tests below).
//!
//! [`preferred_format`] follows TS 1.1 Core §7.4: a 1.0 client must support
//! TLV (and may not know SenML), a 1.1+ client must support SenML CBOR or
//! SenML JSON and announces what it prefers with `ct=` in its registration;
//! a single resource goes as text (or opaque for bytes) unless the request
//! overrides it. Values are typed by [`WriteValue`]; the resource's declared
//! data type (profile or the built-in model) converts a JSON parameter into
//! one ([`WriteValue::from_json`]).

use super::content::{encode_tlv_resource, tlv_kind};
use super::content::{
    DataType, ResourcePath, ResourceValue, Value, CF_CBOR, CF_LWM2M_JSON, CF_OPAQUE, CF_SENML_CBOR,
    CF_SENML_JSON, CF_TEXT, CF_TLV,
};
use super::registration::Version;
use crate::proto::cbor::enc;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A value to write to a resource (TS Core Appendix C data types).
#[derive(Debug, Clone, PartialEq)]
pub enum WriteValue {
    Int(i64),
    /// Unsigned integers above `i64::MAX` (TS 1.1 data type Unsigned Integer).
    Unsigned(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Opaque(Vec<u8>),
    /// Seconds since the epoch.
    Time(i64),
    /// Object Link `object:instance` (TS 1.1 Core §C).
    ObjLink(u16, u16),
}

/// One value at a path.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteEntry {
    pub path: ResourcePath,
    pub value: WriteValue,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("content format {0} cannot carry this payload")]
    Unsupported(u16),
    #[error("{0} is not below the request path")]
    OutsideBase(ResourcePath),
    #[error("a single-resource format needs exactly one value at a resource path")]
    NotSingle,
    #[error("value for {path}: {reason}")]
    BadValue {
        path: ResourcePath,
        reason: &'static str,
    },
}

/// True when `p` is `base` or below it.
pub fn is_within(base: &ResourcePath, p: &ResourcePath) -> bool {
    let b = [
        Some(base.object),
        base.instance,
        base.resource,
        base.resource_instance,
    ];
    let q = [Some(p.object), p.instance, p.resource, p.resource_instance];
    b.iter().zip(q.iter()).all(|(x, y)| x.is_none() || x == y)
}

/// The content format for a payload to `path` of a device of `version`
/// that announced `ct` (its preferred format, TS 1.1 Transport §6.2.1 `ct`
/// link attribute on `</>`), `override_cf` set by the request.
pub fn preferred_format(
    version: Version,
    announced: Option<u16>,
    path: &ResourcePath,
    single: Option<&WriteValue>,
    override_cf: Option<u16>,
) -> u16 {
    if let Some(cf) = override_cf {
        return cf;
    }
    if path.resource.is_some() && path.resource_instance.is_none() || path.depth() == 4 {
        if let Some(v) = single {
            return match v {
                WriteValue::Opaque(_) => CF_OPAQUE,
                _ => CF_TEXT,
            };
        }
    }
    match version {
        Version::V1_0 => CF_TLV,
        _ => match announced {
            Some(cf @ (CF_SENML_CBOR | CF_SENML_JSON | CF_TLV | CF_LWM2M_JSON)) => cf,
            _ => CF_SENML_CBOR,
        },
    }
}

/// The format to ask for (Accept) when reading `path` from a device of
/// `version`: `None` for a single resource (the device chooses, text or
/// opaque typically); TLV for 1.0; the announced or SenML CBOR for 1.1+.
pub fn read_accept(
    version: Version,
    announced: Option<u16>,
    path: &ResourcePath,
    override_cf: Option<u16>,
) -> Option<u16> {
    if override_cf.is_some() {
        return override_cf;
    }
    if path.resource.is_some() {
        return None;
    }
    Some(preferred_format(version, announced, path, None, None))
}

/// Encodes `entries` (all at or below `base`) in format `cf`.
pub fn encode(
    cf: u16,
    base: ResourcePath,
    entries: &[WriteEntry],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    for e in entries {
        if !is_within(&base, &e.path) {
            return Err(EncodeError::OutsideBase(e.path));
        }
        if e.path.resource.is_none() {
            return Err(EncodeError::BadValue {
                path: e.path,
                reason: "values go to resources",
            });
        }
    }
    match cf {
        CF_TEXT | CF_OPAQUE | CF_CBOR => {
            let [e] = entries else {
                return Err(EncodeError::NotSingle);
            };
            if e.path != base {
                return Err(EncodeError::NotSingle);
            }
            match cf {
                CF_TEXT => out.extend_from_slice(text_of(&e.value).as_bytes()),
                CF_OPAQUE => match &e.value {
                    WriteValue::Opaque(b) => out.extend_from_slice(b),
                    WriteValue::Str(s) => out.extend_from_slice(s.as_bytes()),
                    _ => return Err(EncodeError::Unsupported(cf)),
                },
                _ => cbor_value(out, &e.value),
            }
            Ok(())
        }
        CF_TLV => encode_tlv(base, entries, out),
        CF_SENML_JSON => {
            encode_senml_json(entries.iter().map(|e| (e.path, Some(&e.value))), out);
            Ok(())
        }
        CF_SENML_CBOR => {
            encode_senml_cbor(entries.iter().map(|e| (e.path, Some(&e.value))), out);
            Ok(())
        }
        CF_LWM2M_JSON => {
            encode_lwm2m_json(base, entries, out);
            Ok(())
        }
        other => Err(EncodeError::Unsupported(other)),
    }
}

/// The payload of a Write-Composite (TS 1.1 Core §5.4.3.2): SenML records
/// with absolute names, values at resources or resource instances.
pub fn encode_composite(
    cf: u16,
    entries: &[WriteEntry],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if let Some(e) = entries.iter().find(|e| e.path.resource.is_none()) {
        return Err(EncodeError::BadValue {
            path: e.path,
            reason: "values go to resources",
        });
    }
    match cf {
        CF_SENML_JSON => encode_senml_json(entries.iter().map(|e| (e.path, Some(&e.value))), out),
        CF_SENML_CBOR => encode_senml_cbor(entries.iter().map(|e| (e.path, Some(&e.value))), out),
        other => return Err(EncodeError::Unsupported(other)),
    }
    Ok(())
}

/// The path list of a Read-Composite / Observe-Composite request (TS 1.1
/// Core §5.4.1, §5.5.1: SenML records with a name and no value).
pub fn encode_paths(cf: u16, paths: &[ResourcePath], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match cf {
        CF_SENML_JSON => encode_senml_json(paths.iter().map(|p| (*p, None)), out),
        CF_SENML_CBOR => encode_senml_cbor(paths.iter().map(|p| (*p, None)), out),
        other => return Err(EncodeError::Unsupported(other)),
    }
    Ok(())
}

fn text_of(v: &WriteValue) -> String {
    match v {
        WriteValue::Int(i) | WriteValue::Time(i) => i.to_string(),
        WriteValue::Unsigned(u) => u.to_string(),
        WriteValue::Float(f) => format_float(*f),
        WriteValue::Bool(b) => if *b { "1" } else { "0" }.to_string(),
        WriteValue::Str(s) => s.clone(),
        WriteValue::Opaque(b) => base64(b),
        WriteValue::ObjLink(o, i) => format!("{o}:{i}"),
    }
}

fn format_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn cbor_value(out: &mut Vec<u8>, v: &WriteValue) {
    match v {
        WriteValue::Int(i) | WriteValue::Time(i) => enc::int(out, *i),
        WriteValue::Unsigned(u) => {
            out.push(0x1b);
            out.extend_from_slice(&u.to_be_bytes());
        }
        WriteValue::Float(f) => enc::f64(out, *f),
        WriteValue::Bool(b) => enc::bool(out, *b),
        WriteValue::Str(s) => enc::text(out, s),
        WriteValue::Opaque(b) => enc::bytes(out, b),
        WriteValue::ObjLink(o, i) => enc::text(out, &format!("{o}:{i}")),
    }
}

// ---------------------------------------------------------------- TLV

/// TS 1.1 Core §7.4.3.2: integers in the smallest of 1, 2, 4, 8 bytes.
fn tlv_int(v: i64) -> Vec<u8> {
    if let Ok(x) = i8::try_from(v) {
        x.to_be_bytes().to_vec()
    } else if let Ok(x) = i16::try_from(v) {
        x.to_be_bytes().to_vec()
    } else if let Ok(x) = i32::try_from(v) {
        x.to_be_bytes().to_vec()
    } else {
        v.to_be_bytes().to_vec()
    }
}

fn tlv_bytes(v: &WriteValue) -> Vec<u8> {
    match v {
        WriteValue::Int(i) | WriteValue::Time(i) => tlv_int(*i),
        WriteValue::Unsigned(u) => {
            // Unsigned: 1, 2, 4 or 8 bytes, big-endian, no sign.
            if *u <= 0xff {
                vec![*u as u8]
            } else if *u <= 0xffff {
                (*u as u16).to_be_bytes().to_vec()
            } else if *u <= 0xffff_ffff {
                (*u as u32).to_be_bytes().to_vec()
            } else {
                u.to_be_bytes().to_vec()
            }
        }
        WriteValue::Float(f) => {
            let narrow = *f as f32;
            if narrow as f64 == *f {
                narrow.to_be_bytes().to_vec()
            } else {
                f.to_be_bytes().to_vec()
            }
        }
        WriteValue::Bool(b) => vec![*b as u8],
        WriteValue::Str(s) => s.as_bytes().to_vec(),
        WriteValue::Opaque(b) => b.clone(),
        WriteValue::ObjLink(o, i) => {
            let mut b = o.to_be_bytes().to_vec();
            b.extend_from_slice(&i.to_be_bytes());
            b
        }
    }
}

/// Nested TLV: object instances → resources → resource instances, relative
/// to `base` (TS 1.1 Core §7.4.3: a payload for `/o` holds Object Instance
/// TLVs, for `/o/i` Resource TLVs, for `/o/i/r` the resource itself).
fn encode_tlv(
    base: ResourcePath,
    entries: &[WriteEntry],
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    // instance → resource → (single value | resource instances)
    type Res<'a> = BTreeMap<u16, (Option<&'a WriteValue>, BTreeMap<u16, &'a WriteValue>)>;
    let mut tree: BTreeMap<u16, Res<'_>> = BTreeMap::new();
    for e in entries {
        let (Some(i), Some(r)) = (e.path.instance, e.path.resource) else {
            return Err(EncodeError::BadValue {
                path: e.path,
                reason: "values go to resources",
            });
        };
        let slot = tree.entry(i).or_default().entry(r).or_default();
        match e.path.resource_instance {
            Some(ri) => {
                slot.1.insert(ri, &e.value);
            }
            None => slot.0 = Some(&e.value),
        }
    }
    let resource_tlvs = |res: &Res<'_>, out: &mut Vec<u8>| -> Result<(), EncodeError> {
        for (r, (single, multi)) in res {
            if multi.is_empty() {
                if let Some(v) = single {
                    encode_tlv_resource(out, tlv_kind::RESOURCE, *r, &tlv_bytes(v));
                }
            } else {
                if single.is_some() {
                    return Err(EncodeError::BadValue {
                        path: ResourcePath::resource(base.object, 0, *r),
                        reason: "both a value and resource instances",
                    });
                }
                let mut inner = Vec::new();
                for (ri, v) in multi {
                    encode_tlv_resource(
                        &mut inner,
                        tlv_kind::RESOURCE_INSTANCE,
                        *ri,
                        &tlv_bytes(v),
                    );
                }
                encode_tlv_resource(out, tlv_kind::MULTIPLE_RESOURCE, *r, &inner);
            }
        }
        Ok(())
    };
    if base.resource_instance.is_some() {
        // A single resource instance: its Resource Instance TLV.
        let [e] = entries else {
            return Err(EncodeError::NotSingle);
        };
        let ri = base.resource_instance.unwrap_or(0);
        encode_tlv_resource(out, tlv_kind::RESOURCE_INSTANCE, ri, &tlv_bytes(&e.value));
        return Ok(());
    }
    if base.instance.is_some() {
        for res in tree.values() {
            resource_tlvs(res, out)?;
        }
        return Ok(());
    }
    for (i, res) in &tree {
        let mut inner = Vec::new();
        resource_tlvs(res, &mut inner)?;
        encode_tlv_resource(out, tlv_kind::OBJECT_INSTANCE, *i, &inner);
    }
    Ok(())
}

// ---------------------------------------------------------------- SenML

fn base64(b: &[u8]) -> String {
    // RFC 8428 §5: vd is base64url without padding (RFC 4648 §5).
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |a, (k, x)| a | (*x as u32) << (16 - 8 * k));
        let chars = chunk.len() + 1;
        for k in 0..chars {
            s.push(A[((n >> (18 - 6 * k)) & 63) as usize] as char);
        }
    }
    s
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly what JSON needs.
    out.extend_from_slice(
        serde_json::to_string(s)
            .unwrap_or_else(|_| "\"\"".into())
            .as_bytes(),
    );
}

fn json_f64(out: &mut Vec<u8>, f: f64) {
    let s = if f.is_finite() {
        serde_json::Number::from_f64(f)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "0".into())
    } else {
        "null".into()
    };
    out.extend_from_slice(s.as_bytes());
}

/// RFC 8428 §5: one record per value, the name the full path (no base
/// name: every receiver resolves it the same way).
fn encode_senml_json<'a>(
    items: impl Iterator<Item = (ResourcePath, Option<&'a WriteValue>)>,
    out: &mut Vec<u8>,
) {
    out.push(b'[');
    for (k, (path, v)) in items.enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"n\":");
        json_str(out, path.text().as_str());
        if let Some(v) = v {
            json_value_field(out, v, SENML_LABELS);
        }
        out.push(b'}');
    }
    out.push(b']');
}

/// RFC 8428 §6: SenML CBOR with integer labels (n = 0, v = 2, vs = 3,
/// vb = 4, vd = 8); `vlo` (TS 1.1 Core §7.4.5) keeps its text label.
fn encode_senml_cbor<'a>(
    items: impl Iterator<Item = (ResourcePath, Option<&'a WriteValue>)>,
    out: &mut Vec<u8>,
) {
    let items: Vec<_> = items.collect();
    enc::array(out, items.len());
    for (path, v) in items {
        enc::map(out, 1 + v.is_some() as usize);
        enc::int(out, 0);
        enc::text(out, path.text().as_str());
        if let Some(v) = v {
            match v {
                WriteValue::Int(_)
                | WriteValue::Time(_)
                | WriteValue::Unsigned(_)
                | WriteValue::Float(_) => {
                    enc::int(out, 2);
                    cbor_value(out, v);
                }
                WriteValue::Bool(b) => {
                    enc::int(out, 4);
                    enc::bool(out, *b);
                }
                WriteValue::Str(s) => {
                    enc::int(out, 3);
                    enc::text(out, s);
                }
                WriteValue::Opaque(b) => {
                    enc::int(out, 8);
                    enc::bytes(out, b);
                }
                WriteValue::ObjLink(o, i) => {
                    enc::text(out, "vlo");
                    enc::text(out, &format!("{o}:{i}"));
                }
            }
        }
    }
}

/// OMA LwM2M JSON (TS 1.0 Core §6.4.4): `{"bn":"/3/0/","e":[{"n":"1","v":..}]}`,
/// names relative to the base name; opaque as base64 in `sv`.
fn encode_lwm2m_json(base: ResourcePath, entries: &[WriteEntry], out: &mut Vec<u8>) {
    let bn = base.text();
    let bn = bn.as_str();
    out.extend_from_slice(b"{\"bn\":");
    json_str(out, &format!("{bn}/"));
    out.extend_from_slice(b",\"e\":[");
    for (k, e) in entries.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        let full = e.path.text();
        let rel = full.as_str()[bn.len()..].trim_start_matches('/');
        out.extend_from_slice(b"{\"n\":");
        json_str(out, rel);
        json_value_field(out, &e.value, LWM2M_JSON_LABELS);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

/// JSON labels of a value by kind: number, string, boolean, bytes, object
/// link; bytes are base64(url) in the bytes label.
type Labels = [&'static str; 5];
/// RFC 8428 §5 (`vlo`: TS 1.1 Core §7.4.7).
const SENML_LABELS: Labels = ["v", "vs", "vb", "vd", "vlo"];
/// TS 1.0 Core §6.4.4: opaque goes in `sv` as base64.
const LWM2M_JSON_LABELS: Labels = ["v", "sv", "bv", "sv", "ov"];

/// `,"label":value` for `v`.
fn json_value_field(out: &mut Vec<u8>, v: &WriteValue, l: Labels) {
    let [num, text, boolean, bytes, link] = l;
    match v {
        WriteValue::Int(i) | WriteValue::Time(i) => {
            let _ = write!(Bytes(out), ",\"{num}\":{i}");
        }
        WriteValue::Unsigned(u) => {
            let _ = write!(Bytes(out), ",\"{num}\":{u}");
        }
        WriteValue::Float(f) => {
            let _ = write!(Bytes(out), ",\"{num}\":");
            json_f64(out, *f);
        }
        WriteValue::Bool(b) => {
            let _ = write!(Bytes(out), ",\"{boolean}\":{b}");
        }
        WriteValue::Str(s) => {
            let _ = write!(Bytes(out), ",\"{text}\":");
            json_str(out, s);
        }
        WriteValue::Opaque(b) => {
            let _ = write!(Bytes(out), ",\"{bytes}\":");
            json_str(out, &base64(b));
        }
        WriteValue::ObjLink(o, i) => {
            let _ = write!(Bytes(out), ",\"{link}\":\"{o}:{i}\"");
        }
    }
}

/// `fmt::Write` into a byte buffer.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

// ---------------------------------------------------------------- JSON in / out

impl WriteValue {
    /// A JSON parameter as the value of a resource of type `ty` (declared by
    /// the profile or the built-in model; `None`: inferred from the JSON).
    /// Opaque values are given as `{"base64": ".."}` or `{"hex": ".."}`;
    /// object links as `"3:0"` for an Objlnk resource.
    pub fn from_json(v: &serde_json::Value, ty: Option<DataType>) -> Result<WriteValue, String> {
        use serde_json::Value as J;
        if let J::Object(o) = v {
            if let Some(h) = o.get("hex").and_then(|h| h.as_str()) {
                return super::endpoint::decode_hex(h)
                    .map(WriteValue::Opaque)
                    .ok_or_else(|| "hex is not hexadecimal".into());
            }
            if let Some(b) = o.get("base64").and_then(|h| h.as_str()) {
                return decode_base64(b)
                    .map(WriteValue::Opaque)
                    .ok_or_else(|| "base64 is not base64".into());
            }
            return Err(
                "a value is a number, string, boolean, {\"hex\":..} or {\"base64\":..}".into(),
            );
        }
        match ty {
            Some(DataType::Integer) => match v {
                J::Number(n) => n
                    .as_i64()
                    .map(WriteValue::Int)
                    .ok_or_else(|| "not an integer".into()),
                J::String(s) => s
                    .trim()
                    .parse()
                    .map(WriteValue::Int)
                    .map_err(|_| "not an integer".into()),
                _ => Err("not an integer".into()),
            },
            Some(DataType::Unsigned) => match v {
                J::Number(n) => n
                    .as_u64()
                    .map(WriteValue::Unsigned)
                    .ok_or_else(|| "not an unsigned integer".into()),
                _ => Err("not an unsigned integer".into()),
            },
            Some(DataType::Time) => match v {
                J::Number(n) => n
                    .as_i64()
                    .map(WriteValue::Time)
                    .ok_or_else(|| "not a time (epoch seconds)".into()),
                _ => Err("not a time (epoch seconds)".into()),
            },
            Some(DataType::Float) => match v {
                J::Number(n) => n
                    .as_f64()
                    .map(WriteValue::Float)
                    .ok_or_else(|| "not a number".into()),
                J::String(s) => s
                    .trim()
                    .parse()
                    .map(WriteValue::Float)
                    .map_err(|_| "not a number".into()),
                _ => Err("not a number".into()),
            },
            Some(DataType::Boolean) => match v {
                J::Bool(b) => Ok(WriteValue::Bool(*b)),
                J::Number(n) if n.as_u64() == Some(0) || n.as_u64() == Some(1) => {
                    Ok(WriteValue::Bool(n.as_u64() == Some(1)))
                }
                _ => Err("not a boolean".into()),
            },
            Some(DataType::String) => match v {
                J::String(s) => Ok(WriteValue::Str(s.clone())),
                J::Number(n) => Ok(WriteValue::Str(n.to_string())),
                J::Bool(b) => Ok(WriteValue::Str(b.to_string())),
                _ => Err("not a string".into()),
            },
            Some(DataType::Opaque) => match v {
                J::String(s) => Ok(WriteValue::Opaque(s.as_bytes().to_vec())),
                _ => Err("opaque values are {\"hex\":..}, {\"base64\":..} or a string".into()),
            },
            None => match v {
                J::Bool(b) => Ok(WriteValue::Bool(*b)),
                J::Number(n) => Ok(match n.as_i64() {
                    Some(i) => WriteValue::Int(i),
                    None => match n.as_u64() {
                        Some(u) => WriteValue::Unsigned(u),
                        None => WriteValue::Float(n.as_f64().unwrap_or(0.0)),
                    },
                }),
                J::String(s) => Ok(WriteValue::Str(s.clone())),
                _ => Err("a value is a number, string or boolean".into()),
            },
        }
    }
}

/// Standard or URL-safe base64, padding optional.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A decoded value as JSON for an RPC result: numbers, strings, booleans as
/// themselves; TLV / opaque bytes typed by `ty` (the resource's declared
/// type), else as text when they are printable UTF-8, else `{"hex": ..}`.
pub fn value_json(v: &Value<'_>, ty: Option<DataType>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or(J::Null),
        Value::Bool(b) => J::Bool(*b),
        Value::Str(s) => match ty {
            Some(DataType::Integer | DataType::Float | DataType::Unsigned | DataType::Time) => v
                .to_number(ty)
                .map(num_json)
                .unwrap_or_else(|| J::String(s.to_string())),
            Some(DataType::Boolean) => v
                .to_bool()
                .map(J::Bool)
                .unwrap_or_else(|| J::String(s.to_string())),
            _ => J::String(s.to_string()),
        },
        Value::Raw(b) => match ty {
            Some(DataType::Opaque) => hex_json(b),
            Some(DataType::String) => match std::str::from_utf8(b) {
                Ok(s) => J::String(s.to_string()),
                Err(_) => hex_json(b),
            },
            Some(DataType::Boolean) => v.to_bool().map(J::Bool).unwrap_or_else(|| hex_json(b)),
            Some(_) => v.to_number(ty).map(num_json).unwrap_or_else(|| hex_json(b)),
            None => match std::str::from_utf8(b) {
                Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control()) => {
                    J::String(s.to_string())
                }
                _ if b.is_empty() => J::String(String::new()),
                _ => hex_json(b),
            },
        },
    }
}

fn num_json(n: super::content::Num) -> serde_json::Value {
    match n {
        super::content::Num::Int(i) => serde_json::Value::from(i),
        super::content::Num::Float(f) => serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
    }
}

fn hex_json(b: &[u8]) -> serde_json::Value {
    serde_json::json!({ "hex": super::endpoint::encode_hex(b) })
}

/// Decoded values as `{path: value}` (an RPC's decoded response).
pub fn values_json(
    values: &[ResourceValue<'_>],
    ty: impl Fn(&ResourcePath) -> Option<DataType>,
) -> serde_json::Map<String, serde_json::Value> {
    values
        .iter()
        .map(|v| (v.path.to_string(), value_json(&v.value, ty(&v.path))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::content;

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    fn entries() -> Vec<WriteEntry> {
        vec![
            WriteEntry {
                path: p("/3/0/1"),
                value: WriteValue::Str("model-x".into()),
            },
            WriteEntry {
                path: p("/3/0/9"),
                value: WriteValue::Int(87),
            },
            WriteEntry {
                path: p("/3/0/6/0"),
                value: WriteValue::Int(1),
            },
            WriteEntry {
                path: p("/3/0/6/1"),
                value: WriteValue::Int(5),
            },
            WriteEntry {
                path: p("/3/0/13"),
                value: WriteValue::Time(1_700_000_000),
            },
        ]
    }

    fn roundtrip(cf: u16, base: ResourcePath, es: &[WriteEntry]) -> Vec<(ResourcePath, String)> {
        let mut out = Vec::new();
        encode(cf, base, es, &mut out).unwrap();
        let vals = content::decode(cf, base, &out, 0).unwrap();
        let mut got: Vec<(ResourcePath, String)> = vals
            .iter()
            .map(|v| {
                let ty = super::super::profile::builtin_type(&v.path).or(
                    if v.path.resource == Some(1) {
                        Some(DataType::String)
                    } else {
                        Some(DataType::Integer)
                    },
                );
                (v.path, value_json(&v.value, ty).to_string())
            })
            .collect();
        got.sort_by_key(|a| a.0);
        got
    }

    #[test]
    fn every_multi_value_format_round_trips() {
        let want: Vec<(ResourcePath, String)> = {
            let mut w = vec![
                (p("/3/0/1"), "\"model-x\"".to_string()),
                (p("/3/0/9"), "87".into()),
                (p("/3/0/6/0"), "1".into()),
                (p("/3/0/6/1"), "5".into()),
                (p("/3/0/13"), "1700000000".into()),
            ];
            w.sort_by_key(|a| a.0);
            w
        };
        for cf in [CF_TLV, CF_SENML_JSON, CF_SENML_CBOR, CF_LWM2M_JSON] {
            assert_eq!(roundtrip(cf, p("/3/0"), &entries()), want, "cf {cf}");
            assert_eq!(roundtrip(cf, p("/3"), &entries()), want, "cf {cf} at /3");
        }
    }

    #[test]
    fn single_resource_formats() {
        let e = |v| {
            vec![WriteEntry {
                path: p("/1/0/1"),
                value: v,
            }]
        };
        let mut out = Vec::new();
        encode(CF_TEXT, p("/1/0/1"), &e(WriteValue::Int(300)), &mut out).unwrap();
        assert_eq!(out, b"300");
        out.clear();
        encode(CF_TEXT, p("/1/0/1"), &e(WriteValue::Bool(true)), &mut out).unwrap();
        assert_eq!(out, b"1");
        out.clear();
        encode(CF_CBOR, p("/1/0/1"), &e(WriteValue::Int(300)), &mut out).unwrap();
        assert_eq!(
            content::decode(CF_CBOR, p("/1/0/1"), &out, 0).unwrap()[0].value,
            Value::Int(300)
        );
        out.clear();
        encode(
            CF_OPAQUE,
            p("/1/0/1"),
            &e(WriteValue::Opaque(vec![0, 1, 2])),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0, 1, 2]);
        // A single-resource format refuses several values or another path.
        assert_eq!(
            encode(CF_TEXT, p("/3/0"), &entries(), &mut Vec::new()),
            Err(EncodeError::NotSingle)
        );
        // Outside the base path.
        assert!(matches!(
            encode(CF_TLV, p("/4/0"), &entries(), &mut Vec::new()),
            Err(EncodeError::OutsideBase(_))
        ));
    }

    #[test]
    fn tlv_single_resource_and_instance() {
        // Write /3/0/9 in TLV: one Resource TLV, id 9, 1-byte integer.
        let mut out = Vec::new();
        encode(
            CF_TLV,
            p("/3/0/9"),
            &[WriteEntry {
                path: p("/3/0/9"),
                value: WriteValue::Int(87),
            }],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, [0xc1, 9, 87]);
        // A multiple-instance resource under its own path.
        out.clear();
        encode(CF_TLV, p("/3/0/6"), &entries()[2..4], &mut out).unwrap();
        let v = content::decode(CF_TLV, p("/3/0/6"), &out, 0).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].path, p("/3/0/6/1"));
    }

    #[test]
    fn composite_path_lists() {
        let paths = [p("/3/0/9"), p("/3303/0")];
        let mut out = Vec::new();
        encode_paths(CF_SENML_JSON, &paths, &mut out).unwrap();
        assert_eq!(out, br#"[{"n":"/3/0/9"},{"n":"/3303/0"}]"#);
        out.clear();
        encode_paths(CF_SENML_CBOR, &paths, &mut out).unwrap();
        let v = crate::proto::cbor::decode(&out).unwrap();
        assert!(matches!(v, crate::proto::cbor::Cbor::Array(a) if a.len() == 2));
        assert!(encode_paths(CF_TLV, &paths, &mut Vec::new()).is_err());
    }

    #[test]
    fn format_choice_follows_version_and_ct() {
        let obj = p("/3/0");
        assert_eq!(
            preferred_format(Version::V1_0, None, &obj, None, None),
            CF_TLV
        );
        assert_eq!(
            preferred_format(Version::V1_1, None, &obj, None, None),
            CF_SENML_CBOR
        );
        assert_eq!(
            preferred_format(Version::V1_1, Some(CF_SENML_JSON), &obj, None, None),
            CF_SENML_JSON
        );
        let one = WriteValue::Int(1);
        assert_eq!(
            preferred_format(Version::V1_1, None, &p("/3/0/9"), Some(&one), None),
            CF_TEXT
        );
        assert_eq!(
            preferred_format(Version::V1_1, None, &obj, None, Some(CF_TLV)),
            CF_TLV
        );
        assert_eq!(read_accept(Version::V1_0, None, &p("/3/0/9"), None), None);
        assert_eq!(read_accept(Version::V1_0, None, &obj, None), Some(CF_TLV));
    }

    #[test]
    fn json_parameters_take_the_declared_type() {
        use serde_json::json;
        assert_eq!(
            WriteValue::from_json(&json!(300), Some(DataType::Integer)),
            Ok(WriteValue::Int(300))
        );
        assert_eq!(
            WriteValue::from_json(&json!("300"), Some(DataType::Integer)),
            Ok(WriteValue::Int(300))
        );
        assert!(WriteValue::from_json(&json!("x"), Some(DataType::Integer)).is_err());
        assert_eq!(
            WriteValue::from_json(&json!(1), Some(DataType::Boolean)),
            Ok(WriteValue::Bool(true))
        );
        assert_eq!(
            WriteValue::from_json(&json!({"hex": "00ff"}), None),
            Ok(WriteValue::Opaque(vec![0, 255]))
        );
        assert_eq!(
            WriteValue::from_json(&json!({"base64": "AP8="}), None),
            Ok(WriteValue::Opaque(vec![0, 255]))
        );
        assert_eq!(
            WriteValue::from_json(&json!(2.5), None),
            Ok(WriteValue::Float(2.5))
        );
        assert!(WriteValue::from_json(&json!([1]), None).is_err());
    }

    #[test]
    fn base64_round_trip() {
        for n in 0..20usize {
            let b: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37)).collect();
            assert_eq!(decode_base64(&base64(&b)).unwrap(), b);
        }
    }

    #[test]
    fn decoded_values_as_json() {
        let v = Value::Raw(std::borrow::Cow::Borrowed(b"Open Mobile Alliance"));
        assert_eq!(
            value_json(&v, None),
            serde_json::json!("Open Mobile Alliance")
        );
        let v = Value::Raw(std::borrow::Cow::Borrowed(&[0, 0x57]));
        assert_eq!(
            value_json(&v, Some(DataType::Integer)),
            serde_json::json!(87)
        );
        assert_eq!(value_json(&v, None), serde_json::json!({"hex": "0057"}));
    }
}

//! The Device Management and Information Reporting operations the server
//! initiates (LwM2M TS 1.1 Core §5.4, §5.5; Transport §6.3, §6.4), as typed
//! values: what each one is on the wire ([`Op::request`]) and what the
//! device's answer means ([`interpret`]).
//!
//! CoAP mapping (TS 1.1 Transport Table 6.3-1, 6.4-1):
//!
//! | operation | method | notes |
//! |---|---|---|
//! | Read | GET | Accept by the device's format |
//! | Discover | GET | Accept: 40 (link-format) |
//! | Write (replace) | PUT | payload |
//! | Write (partial update) | POST | payload, object instance |
//! | Write-Attributes | PUT | Uri-Query `pmin`.., no payload |
//! | Execute | POST | optional arguments (text, Core §5.4.5) |
//! | Create | POST | to the object, payload |
//! | Delete | DELETE | object instance |
//! | Observe / Cancel | GET | Observe 0 / 1 (RFC 7641 §3.1, §3.6) |
//! | Read-Composite | FETCH | SenML path list |
//! | Observe-Composite | FETCH | Observe 0 |
//! | Write-Composite | iPATCH | SenML values |

use super::content::{self, DataType, ResourcePath, CF_LINK, CF_SENML_CBOR, CF_SENML_JSON};
use super::encode::{self, WriteEntry};
use super::registration::Version;
use crate::proto::coap::Code;
use serde_json::{json, Map, Value as J};

/// An operation on a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Read {
        path: ResourcePath,
        format: Option<u16>,
    },
    Discover {
        path: ResourcePath,
    },
    Write {
        path: ResourcePath,
        entries: Vec<WriteEntry>,
        /// Replace (PUT) or partial update (POST, object instances only).
        replace: bool,
        format: Option<u16>,
    },
    WriteAttributes {
        path: ResourcePath,
        /// `pmin=10`, `gt=3.5`, or a bare name to remove the attribute.
        attributes: Vec<String>,
    },
    Execute {
        path: ResourcePath,
        args: Option<String>,
    },
    Create {
        object: ResourcePath,
        entries: Vec<WriteEntry>,
        format: Option<u16>,
    },
    Delete {
        path: ResourcePath,
    },
    Observe {
        path: ResourcePath,
        format: Option<u16>,
    },
    CancelObserve {
        path: ResourcePath,
    },
    ReadComposite {
        paths: Vec<ResourcePath>,
        format: Option<u16>,
    },
    ObserveComposite {
        paths: Vec<ResourcePath>,
        format: Option<u16>,
    },
    CancelObserveComposite {
        paths: Vec<ResourcePath>,
    },
    WriteComposite {
        entries: Vec<WriteEntry>,
        format: Option<u16>,
    },
    /// Write of an Opaque resource with a shared body (a firmware package,
    /// TS 1.1 Core E.6 /5/0/0), sent as application/octet-stream; a large
    /// one goes in Block1 blocks without being copied.
    WritePackage {
        path: ResourcePath,
        package: Package,
    },
}

/// A shared opaque body (shown by its length only).
#[derive(Clone)]
pub struct Package(pub std::sync::Arc<[u8]>);

impl std::fmt::Debug for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Package({} bytes)", self.0.len())
    }
}

impl PartialEq for Package {
    fn eq(&self, o: &Package) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &o.0) || self.0 == o.0
    }
}

/// The wire form of an operation, before token and Message ID.
#[derive(Debug, Clone, PartialEq)]
pub struct OpRequest {
    pub code: Code,
    /// Uri-Path ids below the device's root path (empty for composite).
    pub path: Vec<u16>,
    pub queries: Vec<String>,
    pub observe: Option<u32>,
    pub content_format: Option<u16>,
    pub accept: Option<u16>,
    pub payload: Vec<u8>,
    /// A shared body sent instead of `payload` ([`Op::WritePackage`]).
    pub shared: Option<std::sync::Arc<[u8]>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("{op} needs {want}, got {path}")]
    Path {
        op: &'static str,
        want: &'static str,
        path: ResourcePath,
    },
    #[error("{0}")]
    Encode(#[from] encode::EncodeError),
    #[error("{0} needs LwM2M 1.1 or later (the device registered with 1.0)")]
    Version(&'static str),
    #[error("composite operations take SenML JSON (110) or SenML CBOR (112)")]
    CompositeFormat,
    #[error("execute arguments {0:?} do not follow TS Core §5.4.5 (0='text',1)")]
    Arguments(String),
    #[error("{0} takes at least one path")]
    Empty(&'static str),
}

fn ids(p: &ResourcePath) -> Vec<u16> {
    super::registration::path_ids(p).collect()
}

/// TS 1.1 Core §5.4.5: `arg *( "," arg )`, `arg = DIGIT [ "=" "'" *CHAR "'" ]`,
/// the value without `'`.
pub fn valid_execute_args(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        if i >= b.len() || !b[i].is_ascii_digit() {
            return false;
        }
        i += 1;
        if i < b.len() && b[i] == b'=' {
            i += 1;
            if i >= b.len() || b[i] != b'\'' {
                return false;
            }
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                // Printable ASCII except the quote (0x21, 0x23-0x26, 0x28-0x7E, space).
                if !(b[i] == b' ' || (0x21..=0x7e).contains(&b[i])) {
                    return false;
                }
                i += 1;
            }
            if i >= b.len() {
                return false;
            }
            i += 1;
        }
        if i == b.len() {
            return true;
        }
        if b[i] != b',' {
            return false;
        }
        i += 1;
    }
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Discover { .. } => "discover",
            Op::Write { .. } => "write",
            Op::WriteAttributes { .. } => "write_attributes",
            Op::Execute { .. } => "execute",
            Op::Create { .. } => "create",
            Op::Delete { .. } => "delete",
            Op::Observe { .. } => "observe",
            Op::CancelObserve { .. } => "cancel_observe",
            Op::ReadComposite { .. } => "read_composite",
            Op::ObserveComposite { .. } => "observe_composite",
            Op::CancelObserveComposite { .. } => "cancel_observe_composite",
            Op::WriteComposite { .. } => "write_composite",
            Op::WritePackage { .. } => "write_package",
        }
    }

    /// The path the operation addresses (the first one for composites).
    pub fn path(&self) -> Option<ResourcePath> {
        match self {
            Op::Read { path, .. }
            | Op::Discover { path }
            | Op::Write { path, .. }
            | Op::WriteAttributes { path, .. }
            | Op::Execute { path, .. }
            | Op::Delete { path }
            | Op::Observe { path, .. }
            | Op::CancelObserve { path }
            | Op::WritePackage { path, .. } => Some(*path),
            Op::Create { object, .. } => Some(*object),
            Op::ReadComposite { paths, .. }
            | Op::ObserveComposite { paths, .. }
            | Op::CancelObserveComposite { paths } => paths.first().copied(),
            Op::WriteComposite { entries, .. } => entries.first().map(|e| e.path),
        }
    }

    /// Checks the operation's shape (path depth, arguments) before anything
    /// is sent (TS 1.1 Core §5.4: Execute on a resource, Create on an
    /// object, Delete on an object instance).
    pub fn validate(&self) -> Result<(), OpError> {
        let need = |ok: bool, op, want, path: &ResourcePath| {
            if ok {
                Ok(())
            } else {
                Err(OpError::Path {
                    op,
                    want,
                    path: *path,
                })
            }
        };
        match self {
            Op::Execute { path, args } => {
                need(
                    path.resource.is_some() && path.resource_instance.is_none(),
                    "execute",
                    "a resource path /o/i/r",
                    path,
                )?;
                match args {
                    Some(a) if !valid_execute_args(a) => Err(OpError::Arguments(a.clone())),
                    _ => Ok(()),
                }
            }
            Op::Create { object, .. } => need(
                object.instance.is_none(),
                "create",
                "an object path /o",
                object,
            ),
            Op::Delete { path } => need(
                path.instance.is_some() && path.resource.is_none(),
                "delete",
                "an object instance path /o/i",
                path,
            ),
            Op::WritePackage { path, .. } => need(
                path.resource.is_some() && path.resource_instance.is_none(),
                "write_package",
                "a resource path /o/i/r",
                path,
            ),
            Op::Write { path, replace, .. } => {
                need(
                    path.instance.is_some(),
                    "write",
                    "an object instance or resource path",
                    path,
                )?;
                need(
                    *replace || path.resource.is_none(),
                    "write (partial update)",
                    "an object instance path /o/i",
                    path,
                )
            }
            Op::ReadComposite { paths, .. }
            | Op::ObserveComposite { paths, .. }
            | Op::CancelObserveComposite { paths } => {
                if paths.is_empty() {
                    Err(OpError::Empty(self.name()))
                } else {
                    Ok(())
                }
            }
            Op::WriteComposite { entries, .. } => {
                if entries.is_empty() {
                    Err(OpError::Empty("write_composite"))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// The CoAP request for a device of `version` that announced `ct`.
    pub fn request(&self, version: Version, ct: Option<u16>) -> Result<OpRequest, OpError> {
        self.validate()?;
        let mut r = OpRequest {
            code: Code::GET,
            path: Vec::new(),
            queries: Vec::new(),
            observe: None,
            content_format: None,
            accept: None,
            payload: Vec::new(),
            shared: None,
        };
        let composite_cf = |f: Option<u16>| -> Result<u16, OpError> {
            if version == Version::V1_0 {
                return Err(OpError::Version("composite operations"));
            }
            // Asked for: it must be SenML. Not asked for: the device's
            // announced SenML format, else SenML CBOR.
            match (f, ct) {
                (Some(cf @ (CF_SENML_JSON | CF_SENML_CBOR)), _) => Ok(cf),
                (Some(_), _) => Err(OpError::CompositeFormat),
                (None, Some(cf @ (CF_SENML_JSON | CF_SENML_CBOR))) => Ok(cf),
                (None, _) => Ok(CF_SENML_CBOR),
            }
        };
        match self {
            Op::Read { path, format } => {
                r.path = ids(path);
                r.accept = encode::read_accept(version, ct, path, *format);
            }
            Op::Discover { path } => {
                r.path = ids(path);
                r.accept = Some(CF_LINK);
            }
            Op::Observe { path, format } => {
                r.path = ids(path);
                r.observe = Some(0);
                r.accept = encode::read_accept(version, ct, path, *format);
            }
            Op::CancelObserve { path } => {
                r.path = ids(path);
                r.observe = Some(1);
            }
            Op::Write {
                path,
                entries,
                replace,
                format,
            } => {
                r.code = if *replace { Code::PUT } else { Code::POST };
                r.path = ids(path);
                let single = match entries.as_slice() {
                    [e] if e.path == *path => Some(&e.value),
                    _ => None,
                };
                let cf = encode::preferred_format(version, ct, path, single, *format);
                encode::encode(cf, *path, entries, &mut r.payload)?;
                r.content_format = Some(cf);
            }
            Op::WriteAttributes { path, attributes } => {
                r.code = Code::PUT;
                r.path = ids(path);
                r.queries = attributes.clone();
            }
            Op::Execute { path, args } => {
                r.code = Code::POST;
                r.path = ids(path);
                if let Some(a) = args.as_ref().filter(|a| !a.is_empty()) {
                    r.payload = a.as_bytes().to_vec();
                    r.content_format = Some(content::CF_TEXT);
                }
            }
            Op::Create {
                object,
                entries,
                format,
            } => {
                r.code = Code::POST;
                r.path = ids(object);
                let cf = encode::preferred_format(version, ct, object, None, *format);
                encode::encode(cf, *object, entries, &mut r.payload)?;
                r.content_format = Some(cf);
            }
            Op::Delete { path } => {
                r.code = Code::DELETE;
                r.path = ids(path);
            }
            Op::ReadComposite { paths, format } | Op::ObserveComposite { paths, format } => {
                let cf = composite_cf(*format)?;
                r.code = Code::FETCH;
                encode::encode_paths(cf, paths, &mut r.payload)?;
                r.content_format = Some(cf);
                r.accept = Some(cf);
                if matches!(self, Op::ObserveComposite { .. }) {
                    r.observe = Some(0);
                }
            }
            Op::CancelObserveComposite { paths } => {
                let cf = composite_cf(None)?;
                r.code = Code::FETCH;
                encode::encode_paths(cf, paths, &mut r.payload)?;
                r.content_format = Some(cf);
                r.accept = Some(cf);
                r.observe = Some(1);
            }
            Op::WriteComposite { entries, format } => {
                let cf = composite_cf(*format)?;
                r.code = Code::IPATCH;
                encode::encode_composite(cf, entries, &mut r.payload)?;
                r.content_format = Some(cf);
            }
            Op::WritePackage { path, package } => {
                r.code = Code::PUT;
                r.path = ids(path);
                r.content_format = Some(content::CF_OPAQUE);
                r.shared = Some(package.0.clone());
            }
        }
        Ok(r)
    }

    /// True when a success answer establishes an observation.
    pub fn observes(&self) -> bool {
        matches!(self, Op::Observe { .. } | Op::ObserveComposite { .. })
    }
}

/// The device's answer to an operation as JSON: `{path: value}` for Read and
/// Observe (and composites), the links for Discover, the new instance's
/// location for Create, nothing for the others. `location` is the
/// Location-Path of a 2.01.
pub fn interpret(
    op: &Op,
    code: Code,
    cf: Option<u16>,
    payload: &[u8],
    location: &[&[u8]],
    now_ms: i64,
    types: &dyn Fn(&ResourcePath) -> Option<DataType>,
) -> Result<Option<J>, String> {
    if !code.is_success() {
        return Ok((!payload.is_empty())
            .then(|| J::String(String::from_utf8_lossy(payload).chars().take(256).collect())));
    }
    match op {
        Op::Read { path, .. } | Op::Observe { path, .. } => {
            decode_values(*path, cf, payload, now_ms, types).map(Some)
        }
        Op::ReadComposite { paths, .. } | Op::ObserveComposite { paths, .. } => {
            let base = paths.first().copied().unwrap_or(ResourcePath {
                object: 0,
                instance: None,
                resource: None,
                resource_instance: None,
            });
            decode_values(base, cf.or(Some(CF_SENML_CBOR)), payload, now_ms, types).map(Some)
        }
        Op::Discover { .. } => {
            let s = std::str::from_utf8(payload).map_err(|_| "discover payload is not UTF-8")?;
            let links: Vec<J> = split_links(s).into_iter().map(J::String).collect();
            Ok(Some(J::Array(links)))
        }
        Op::Create { .. } => {
            if location.is_empty() {
                return Ok(None);
            }
            let loc: Vec<String> = location
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            Ok(Some(json!({ "location": format!("/{}", loc.join("/")) })))
        }
        _ => Ok(None),
    }
}

fn decode_values(
    base: ResourcePath,
    cf: Option<u16>,
    payload: &[u8],
    now_ms: i64,
    types: &dyn Fn(&ResourcePath) -> Option<DataType>,
) -> Result<J, String> {
    let cf = cf.unwrap_or(if base.resource.is_some() {
        content::CF_TEXT
    } else {
        content::CF_TLV
    });
    let values = content::decode(cf, base, payload, now_ms).map_err(|e| e.to_string())?;
    let map: Map<String, J> = encode::values_json(&values, types);
    Ok(J::Object(map))
}

/// Links of a link-format payload, split on commas outside quotes.
fn split_links(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut q = false;
    for c in s.chars() {
        match c {
            '"' => {
                q = !q;
                cur.push(c)
            }
            ',' if !q => {
                if !cur.trim().is_empty() {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::encode::WriteValue;

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap()
    }

    #[test]
    fn execute_arguments_grammar() {
        for ok in ["", "0", "0,1", "0='abc'", "1='a b',2", "5=''"] {
            assert!(valid_execute_args(ok), "{ok}");
        }
        for bad in ["a", "0=abc", "0='abc", "0,,1", "10", "0='x'y", ",0"] {
            assert!(!valid_execute_args(bad), "{bad}");
        }
    }

    #[test]
    fn wire_forms() {
        let v = Version::V1_1;
        let r = Op::Execute {
            path: p("/3/0/4"),
            args: None,
        }
        .request(v, None)
        .unwrap();
        assert_eq!(
            (r.code, r.path.clone(), r.payload.len()),
            (Code::POST, vec![3, 0, 4], 0)
        );
        let r = Op::Read {
            path: p("/3/0"),
            format: None,
        }
        .request(Version::V1_0, None)
        .unwrap();
        assert_eq!(r.accept, Some(content::CF_TLV));
        let r = Op::Write {
            path: p("/1/0/1"),
            entries: vec![WriteEntry {
                path: p("/1/0/1"),
                value: WriteValue::Int(60),
            }],
            replace: true,
            format: None,
        }
        .request(v, None)
        .unwrap();
        assert_eq!(
            (r.code, r.content_format, r.payload.as_slice()),
            (Code::PUT, Some(content::CF_TEXT), &b"60"[..])
        );
        let r = Op::WriteAttributes {
            path: p("/3303/0/5700"),
            attributes: vec!["pmin=5".into(), "pmax=60".into()],
        }
        .request(v, None)
        .unwrap();
        assert_eq!((r.code, r.queries.len()), (Code::PUT, 2));
        let r = Op::ReadComposite {
            paths: vec![p("/3/0/9"), p("/3303/0/5700")],
            format: None,
        }
        .request(v, Some(CF_SENML_JSON))
        .unwrap();
        assert_eq!((r.code, r.accept), (Code::FETCH, Some(CF_SENML_JSON)));
        assert!(r.path.is_empty());
        let r = Op::WriteComposite {
            entries: vec![WriteEntry {
                path: p("/1/0/1"),
                value: WriteValue::Int(60),
            }],
            format: Some(CF_SENML_JSON),
        }
        .request(v, None)
        .unwrap();
        assert_eq!(r.code, Code::IPATCH);
        assert_eq!(r.payload, br#"[{"n":"/1/0/1","v":60}]"#);
        // Refusals before anything is sent.
        assert!(Op::Execute {
            path: p("/3/0"),
            args: None
        }
        .request(v, None)
        .is_err());
        assert!(Op::Delete { path: p("/3") }.request(v, None).is_err());
        assert!(Op::ReadComposite {
            paths: vec![p("/3/0/9")],
            format: None
        }
        .request(Version::V1_0, None)
        .is_err());
        assert!(Op::Execute {
            path: p("/3/0/4"),
            args: Some("x".into())
        }
        .request(v, None)
        .is_err());
    }

    #[test]
    fn answers() {
        let types = |_: &ResourcePath| None;
        let op = Op::Read {
            path: p("/3/0/0"),
            format: None,
        };
        let r = interpret(&op, Code::CONTENT, Some(0), b"ACME", &[], 0, &types).unwrap();
        assert_eq!(r, Some(json!({"/3/0/0": "ACME"})));
        let op = Op::Discover { path: p("/3/0") };
        let r = interpret(
            &op,
            Code::CONTENT,
            Some(40),
            b"</3/0>;pmin=10,</3/0/1>,</3/0/4>",
            &[],
            0,
            &types,
        )
        .unwrap();
        assert_eq!(r, Some(json!(["</3/0>;pmin=10", "</3/0/1>", "</3/0/4>"])));
        let op = Op::Create {
            object: p("/1"),
            entries: vec![],
            format: None,
        };
        let r = interpret(&op, Code::CREATED, None, b"", &[b"1", b"7"], 0, &types).unwrap();
        assert_eq!(r, Some(json!({"location": "/1/7"})));
        let r = interpret(&op, Code::METHOD_NOT_ALLOWED, None, b"no", &[], 0, &types).unwrap();
        assert_eq!(r, Some(json!("no")));
    }
}

//! JSON encoding of the records (wire contracts in
//! `../shared/docs/design.md`).
//!
//! [`encode_point`] is hand-written for the hot path: one pass into a reused
//! buffer, numbers with `itoa` / `zmij` (the formatters serde_json uses, so the
//! text is the same: integers without a fraction, floats always with one),
//! strings escaped per RFC 8259 §7. Status events are rarer and go through
//! serde.

use crate::proto::lwm2m::content::Num;
use crate::proto::lwm2m::output::{StatusEvent, TelemetryPoint};

/// Appends `s` as a JSON string (RFC 8259 §7: `"` `\` and control characters
/// escaped; everything else is UTF-8 as is).
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Fast path: nothing to escape (ids, endpoint names, metric names). The
    // check is branch-free so it vectorises.
    let special = bytes.iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !special {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn num(out: &mut Vec<u8>, n: Num) {
    match n {
        Num::Int(i) => int(out, i),
        // Non-finite values never reach a point (telemetry mapping).
        Num::Float(f) if f.is_finite() => {
            out.extend_from_slice(zmij::Buffer::new().format_finite(f).as_bytes())
        }
        Num::Float(_) => out.extend_from_slice(b"null"),
    }
}

fn key(out: &mut Vec<u8>, k: &str) {
    string(out, k);
    out.push(b':');
}

/// Appends the TelemetryPoint JSON object.
pub fn encode_point(p: &TelemetryPoint<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"tenant_id\":");
    string(out, p.tenant_id);
    out.extend_from_slice(b",\"device_id\":");
    string(out, p.device_id);
    out.extend_from_slice(b",\"endpoint\":");
    string(out, p.endpoint);
    out.extend_from_slice(b",\"ts\":");
    int(out, p.ts);
    out.extend_from_slice(b",\"received_at\":");
    int(out, p.received_at);
    out.extend_from_slice(b",\"numeric_values\":{");
    for (i, (k, v)) in p.numeric_values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        key(out, k);
        num(out, *v);
    }
    out.extend_from_slice(b"},\"string_values\":{");
    for (i, (k, v)) in p.string_values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        key(out, k);
        string(out, v);
    }
    out.push(b'}');
    if !p.bool_values.is_empty() {
        out.extend_from_slice(b",\"bool_values\":{");
        for (i, (k, v)) in p.bool_values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            key(out, k);
            out.extend_from_slice(if *v { b"true" } else { b"false" });
        }
        out.push(b'}');
    }
    let s = &p.source;
    out.extend_from_slice(b",\"source\":{\"protocol\":");
    string(out, s.protocol);
    out.extend_from_slice(b",\"operation\":");
    string(out, s.operation);
    out.extend_from_slice(b",\"path\":");
    string(out, s.path);
    out.extend_from_slice(b",\"content_format\":");
    int(out, s.content_format as i64);
    if let Some(seq) = s.observe_seq {
        out.extend_from_slice(b",\"observe_seq\":");
        int(out, seq as i64);
    }
    out.extend_from_slice(b",\"shard\":");
    int(out, s.shard as i64);
    out.extend_from_slice(b",\"registration_id\":");
    string(out, s.registration_id);
    out.extend_from_slice(b"}}");
}

/// Appends the device.status JSON object.
pub fn encode_status(e: &StatusEvent<'_>, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    serde_json::to_writer(out, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::output::PointSource;
    use proptest::prelude::*;

    fn point<'a>(
        n: &'a [(&'a str, Num)],
        s: &'a [(&'a str, String)],
        b: &'a [(&'a str, bool)],
        endpoint: &'a str,
    ) -> TelemetryPoint<'a> {
        TelemetryPoint {
            tenant_id: "acme",
            device_id: "d7b1c0e2",
            endpoint,
            ts: 1_795_608_634_287,
            received_at: 1_795_608_634_288,
            numeric_values: n,
            string_values: s,
            bool_values: b,
            source: PointSource {
                protocol: "lwm2m",
                operation: "notify",
                path: "/3303/0/5700",
                content_format: 0,
                observe_seq: Some(12),
                shard: 1,
                registration_id: "07eb3e554bfdee5f",
            },
        }
    }

    #[test]
    fn wire_form() {
        let n = [
            ("battery_level", Num::Int(100)),
            ("temperature", Num::Float(22.5)),
            ("x", Num::Float(3.0)),
        ];
        let s = [("units", "C\"el\n".to_string())];
        let b = [("on", true)];
        let mut out = Vec::new();
        encode_point(&point(&n, &s, &b, "urn:imei:123"), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tenant_id":"acme","device_id":"d7b1c0e2","endpoint":"urn:imei:123",
                "ts":1795608634287i64,"received_at":1795608634288i64,
                "numeric_values":{"battery_level":100,"temperature":22.5,"x":3.0},
                "string_values":{"units":"C\"el\n"},"bool_values":{"on":true},
                "source":{"protocol":"lwm2m","operation":"notify","path":"/3303/0/5700","content_format":0,
                          "observe_seq":12,"shard":1,"registration_id":"07eb3e554bfdee5f"}})
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"battery_level\":100,"), "{text}");
        assert!(text.contains("\"x\":3.0}"), "{text}");
        let mut out = Vec::new();
        encode_point(&point(&[], &[], &[], "e"), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("bool_values").is_none());
    }

    proptest! {
        #[test]
        fn strings_roundtrip(s in "\\PC*", c in proptest::collection::vec(0u8..0x20, 0..4)) {
            let mut s = s;
            for b in c { s.push(b as char); }
            let mut out = Vec::new();
            string(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        #[test]
        fn numbers_match_serde(i: i64, f in proptest::num::f64::NORMAL | proptest::num::f64::ZERO) {
            let mut out = Vec::new();
            num(&mut out, Num::Int(i));
            prop_assert_eq!(String::from_utf8(out.clone()).unwrap(), serde_json::to_string(&i).unwrap());
            out.clear();
            num(&mut out, Num::Float(f));
            prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&f).unwrap());
        }
    }
}

//! CSV (RFC 4180: quoted fields, doubled quotes, CRLF or LF) to the admin
//! API's bulk provisioning JSON: the header row names the fields
//! (`endpoint`, `device_id`, `tenant_id`, `profile`, `psk_identity`,
//! `psk_identity_hex`, `psk_key_hex`, `x509_sha256`); empty cells are left
//! out.

use serde_json::{Map, Value};

/// Splits CSV text into records of fields.
pub fn parse(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut at_start = true;
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            '"' => return Err(format!("line {line}: a quote inside an unquoted field")),
            ',' => {
                row.push(std::mem::take(&mut field));
                at_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                at_start = true;
                line += 1;
            }
            _ => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err(format!("line {line}: unterminated quoted field"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows.retain(|r| !(r.len() == 1 && r[0].trim().is_empty()));
    Ok(rows)
}

/// The endpoints of a provisioning CSV as a JSON array for
/// `POST /v1/endpoints`.
pub fn endpoints(text: &str) -> Result<Value, String> {
    let rows = parse(text)?;
    let Some((head, body)) = rows.split_first() else {
        return Err("empty file".into());
    };
    let head: Vec<String> = head.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    for need in ["endpoint", "device_id", "tenant_id"] {
        if !head.iter().any(|h| h == need) {
            return Err(format!("the header row has no {need:?} column"));
        }
    }
    let mut out = Vec::with_capacity(body.len());
    for (i, r) in body.iter().enumerate() {
        if r.len() != head.len() {
            return Err(format!(
                "record {}: {} fields, the header has {}",
                i + 2,
                r.len(),
                head.len()
            ));
        }
        let mut m = Map::new();
        for (k, v) in head.iter().zip(r) {
            let v = v.trim();
            if !v.is_empty() {
                m.insert(k.clone(), Value::String(v.to_string()));
            }
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_and_line_endings() {
        let r = parse("a,b,c\r\n\"x,1\",\"say \"\"hi\"\"\",\n\"multi\nline\",2,3").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[1], vec!["x,1", "say \"hi\"", ""]);
        assert_eq!(r[2], vec!["multi\nline", "2", "3"]);
        assert!(parse("a,\"b").is_err());
        assert!(parse("a,b\"c").is_err());
    }

    #[test]
    fn endpoints_from_csv() {
        let v = endpoints(
            "endpoint,device_id,tenant_id,profile,psk_identity,psk_key_hex\n\
             urn:imei:1,dev-1,acme,,id-1,000102\n\
             urn:imei:2,dev-2,acme,environment,,\n",
        )
        .unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0]["psk_identity"], "id-1");
        assert!(a[0].get("profile").is_none());
        assert_eq!(a[1]["profile"], "environment");
        assert!(endpoints("endpoint,tenant_id\nx,y\n").is_err());
        assert!(endpoints("endpoint,device_id,tenant_id\nx,y\n").is_err());
    }
}

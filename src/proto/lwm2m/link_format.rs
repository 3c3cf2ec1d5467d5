//! CoRE Link Format (RFC 6690) as used by the LwM2M Register and Update
//! payloads (LwM2M TS 1.1 Transport §6.2.1 / Core §6.2.1).
//!
//! The registration payload lists the client's object instances as links
//! (`</3/0>,</3303/0>;ver=1.1`), optionally preceded by a root link
//! `</lwm2m>;rt="oma.lwm2m"` giving an alternate path. Parsing is total: any
//! byte string yields either links or a [`LinkFormatError`], never a panic.

/// A link to an LwM2M object, object instance or resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectLink {
    pub object: u16,
    pub instance: Option<u16>,
    /// `ver` attribute (object version), when given.
    pub version: Option<String>,
}

/// The parsed registration payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistrationLinks {
    /// Alternate path from a `rt="oma.lwm2m"` link, e.g. `/lwm2m`; empty if none.
    pub root_path: String,
    /// Content formats the client declared on the root link (`ct=` attribute).
    pub content_formats: Vec<u16>,
    pub objects: Vec<ObjectLink>,
}

impl RegistrationLinks {
    /// True when the client declared `/object` or `/object/instance`.
    pub fn has(&self, object: u16, instance: Option<u16>) -> bool {
        self.objects.iter().any(|l| {
            l.object == object
                && match (instance, l.instance) {
                    (None, _) => true,
                    (Some(_), None) => true,
                    (Some(i), Some(j)) => i == j,
                }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkFormatError {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("link {0:?} is not of the form <uri>")]
    BadLink(String),
    #[error("too many links (limit {0})")]
    TooMany(usize),
}

/// Upper bound on links in one payload, so a hostile client cannot make us
/// allocate without bound.
pub const MAX_LINKS: usize = 4096;

/// Splits on `sep` outside double-quoted strings.
fn split_unquoted(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    for (i, c) in s.char_indices() {
        if c == '"' {
            in_quotes = !in_quotes;
        } else if c == sep && !in_quotes {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

pub fn parse_registration(payload: &[u8]) -> Result<RegistrationLinks, LinkFormatError> {
    let s = std::str::from_utf8(payload).map_err(|_| LinkFormatError::NotUtf8)?;
    let mut out = RegistrationLinks::default();
    for (n, link) in split_unquoted(s, ',').enumerate() {
        if n >= MAX_LINKS {
            return Err(LinkFormatError::TooMany(MAX_LINKS));
        }
        let link = link.trim();
        if link.is_empty() {
            continue;
        }
        let mut parts = split_unquoted(link, ';');
        let target = parts.next().unwrap_or("").trim();
        let uri = target
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .ok_or_else(|| LinkFormatError::BadLink(truncate(link)))?;
        let mut rt_lwm2m = false;
        let mut ver = None;
        let mut cts = Vec::new();
        for attr in parts {
            let (k, v) = match attr.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (attr.trim(), ""),
            };
            let v = v.trim_matches('"');
            match k {
                "rt" => rt_lwm2m = v.split(' ').any(|t| t == "oma.lwm2m"),
                "ver" => ver = Some(v.to_string()),
                "ct" => cts.extend(v.split(' ').filter_map(|c| c.parse::<u16>().ok())),
                _ => {}
            }
        }
        if rt_lwm2m {
            out.root_path = uri.trim_end_matches('/').to_string();
            out.content_formats = cts;
            continue;
        }
        // Strip the alternate path, then read /object[/instance].
        let rel = uri
            .strip_prefix(out.root_path.as_str())
            .unwrap_or(uri)
            .trim_start_matches('/');
        let mut segs = rel.split('/').filter(|s| !s.is_empty());
        let Some(obj) = segs.next().and_then(|s| s.parse::<u16>().ok()) else {
            // Links that are not objects (e.g. "</>") are legal; skip them.
            continue;
        };
        let instance = segs.next().and_then(|s| s.parse::<u16>().ok());
        out.objects.push(ObjectLink {
            object: obj,
            instance,
            version: ver,
        });
    }
    Ok(out)
}

/// One link of a Bootstrap-Discover answer (TS 1.1 Core §5.2.7.1):
/// `</0/1>;ssid=101;uri="coaps://…"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredInstance {
    pub object: u16,
    pub instance: Option<u16>,
    /// Short Server ID (absent on the Bootstrap-Server's Security instance).
    pub ssid: Option<u16>,
    pub uri: Option<String>,
}

/// A parsed Bootstrap-Discover answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootstrapDiscover {
    /// The `lwm2m="1.1"` element that leads the answer (1.1 clients).
    pub version: Option<String>,
    pub links: Vec<DiscoveredInstance>,
}

/// Parses a Bootstrap-Discover answer: `lwm2m="1.1",</0/0>,</0/1>;ssid=101,</1/0>;ssid=101`.
pub fn parse_bootstrap_discover(payload: &[u8]) -> Result<BootstrapDiscover, LinkFormatError> {
    let s = std::str::from_utf8(payload).map_err(|_| LinkFormatError::NotUtf8)?;
    let mut out = BootstrapDiscover::default();
    for (n, item) in split_unquoted(s, ',').enumerate() {
        if n >= MAX_LINKS {
            return Err(LinkFormatError::TooMany(MAX_LINKS));
        }
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        if let Some(v) = item.strip_prefix("lwm2m=") {
            out.version = Some(v.trim().trim_matches('"').chars().take(16).collect());
            continue;
        }
        let mut parts = split_unquoted(item, ';');
        let target = parts.next().unwrap_or("").trim();
        let uri = target
            .strip_prefix('<')
            .and_then(|t| t.strip_suffix('>'))
            .ok_or_else(|| LinkFormatError::BadLink(truncate(item)))?;
        let mut segs = uri.split('/').filter(|s| !s.is_empty());
        let Some(object) = segs.next().and_then(|s| s.parse::<u16>().ok()) else {
            continue;
        };
        let instance = segs.next().and_then(|s| s.parse::<u16>().ok());
        let (mut ssid, mut server_uri) = (None, None);
        for attr in parts {
            let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "ssid" => ssid = v.parse::<u16>().ok(),
                "uri" => server_uri = Some(v.chars().take(256).collect()),
                _ => {}
            }
        }
        out.links.push(DiscoveredInstance {
            object,
            instance,
            ssid,
            uri: server_uri,
        });
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_typical_registration() {
        let p = br#"</>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>;ver=1.1,</3303/0>,</3303/1>,</3304>"#;
        let l = parse_registration(p).unwrap();
        assert_eq!(l.root_path, "");
        assert_eq!(l.content_formats, vec![11543]);
        assert_eq!(l.objects.len(), 5);
        assert_eq!(l.objects[1].version.as_deref(), Some("1.1"));
        assert!(l.has(3303, Some(1)));
        assert!(l.has(3304, Some(0)));
        assert!(!l.has(3323, Some(0)));
    }

    #[test]
    fn alternate_path() {
        let l = parse_registration(br#"</lwm2m>;rt="oma.lwm2m",</lwm2m/3/0>"#).unwrap();
        assert_eq!(l.root_path, "/lwm2m");
        assert!(l.has(3, Some(0)));
    }

    #[test]
    fn bootstrap_discover_answer() {
        let d = parse_bootstrap_discover(
            br#"lwm2m="1.1",</0/0>;uri="coaps://bs.example:5784",</0/1>;ssid=101,</1/0>;ssid=101,</3/0>,</5>"#,
        )
        .unwrap();
        assert_eq!(d.version.as_deref(), Some("1.1"));
        assert_eq!(d.links.len(), 5);
        assert_eq!(d.links[0].ssid, None);
        assert_eq!(d.links[0].uri.as_deref(), Some("coaps://bs.example:5784"));
        assert_eq!(
            (d.links[1].object, d.links[1].instance, d.links[1].ssid),
            (0, Some(1), Some(101))
        );
        assert_eq!(d.links[4].instance, None);
        // 1.0-style answers have no version element.
        let d = parse_bootstrap_discover(b"</0/0>,</1/0>;ssid=1").unwrap();
        assert_eq!(d.version, None);
        assert!(parse_bootstrap_discover(b"0/0").is_err());
        assert!(parse_bootstrap_discover(&[0xc3, 0x28]).is_err());
    }

    #[test]
    fn quoted_commas_and_errors() {
        let l = parse_registration(br#"</3/0>;title="a,b;c",</4/0>"#).unwrap();
        assert_eq!(l.objects.len(), 2);
        assert!(parse_registration(b"3/0").is_err());
        assert!(parse_registration(&[0xff, 0xfe]).is_err());
        assert_eq!(parse_registration(b"").unwrap().objects.len(), 0);
    }
}

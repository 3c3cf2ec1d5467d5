//! A simulated LwM2M client (device), sans-IO.
//!
//! Used by the demo's simulated devices, the load generator, the engine's
//! in-memory harness and the loopback integration tests. It speaks the client
//! side of the Registration and Information Reporting interfaces: builds
//! Register / Update / De-register / Send requests, answers the server's
//! Write-Attributes, Observe, Read and Execute, and produces notifications in a
//! chosen content format (text, opaque, CBOR, TLV, SenML JSON/CBOR, LwM2M JSON).

use crate::proto::cbor::enc;
use crate::proto::coap::{Code, Message, MessageBuilder, MsgType};
use crate::proto::lwm2m::content::{self, tlv_kind, ResourcePath};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct SimObservation {
    pub token: Vec<u8>,
    pub path: ResourcePath,
    pub seq: u32,
}

/// What the device did with a server message.
#[derive(Debug, Default)]
pub struct SimEvents {
    /// Datagrams to send back.
    pub replies: Vec<Vec<u8>>,
    pub registered: bool,
    pub deregistered: bool,
    /// The response code of a request of ours that was answered.
    pub response: Option<(u16, Code)>,
    pub executed: Vec<ResourcePath>,
    pub observed: Vec<ResourcePath>,
}

pub struct SimDevice {
    pub endpoint: String,
    pub lifetime_s: u32,
    pub lwm2m_version: &'static str,
    /// Object instance links, e.g. "/3/0", "/3303/0".
    pub objects: Vec<String>,
    pub values: BTreeMap<ResourcePath, f64>,
    /// Content format for notifications.
    pub format: u16,
    pub location: Option<String>,
    pub observations: Vec<SimObservation>,
    next_mid: u16,
    next_token: u32,
    /// MID of the outstanding Register / Update / De-register / Send request.
    pub outstanding: Option<u16>,
    /// The last server requests answered (MID → replies): a duplicate gets
    /// the same replies and is not processed again (RFC 7252 §4.5).
    recent: std::collections::VecDeque<(u16, Vec<Vec<u8>>)>,
}

fn p(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap_or(ResourcePath {
        object: 0,
        instance: None,
        resource: None,
        resource_instance: None,
    })
}

impl SimDevice {
    pub fn new(endpoint: &str, seed: u16) -> SimDevice {
        let mut values = BTreeMap::new();
        values.insert(p("/3303/0/5700"), 22.5);
        values.insert(p("/3304/0/5700"), 40.0);
        values.insert(p("/3323/0/5700"), 1013.25);
        values.insert(p("/3/0/9"), 87.0);
        SimDevice {
            endpoint: endpoint.to_string(),
            lifetime_s: 300,
            lwm2m_version: "1.1",
            objects: ["/1/0", "/3/0", "/3303/0", "/3304/0", "/3323/0"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            values,
            format: content::CF_TEXT,
            location: None,
            observations: Vec::new(),
            next_mid: seed.wrapping_mul(7919),
            next_token: seed as u32,
            outstanding: None,
            recent: std::collections::VecDeque::new(),
        }
    }

    fn mid(&mut self) -> u16 {
        self.next_mid = self.next_mid.wrapping_add(1);
        self.next_mid
    }

    /// Allocates a message ID from the device's counter (for messages built
    /// outside this type, e.g. by the load generator).
    pub fn next_mid(&mut self) -> u16 {
        self.mid()
    }

    fn token(&mut self) -> [u8; 4] {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token.to_be_bytes()
    }

    fn request(
        &mut self,
        code: Code,
        path: &[&str],
        queries: &[String],
        cf: Option<u16>,
        payload: &[u8],
        con: bool,
    ) -> Vec<u8> {
        let mid = self.mid();
        self.outstanding = Some(mid);
        let tok = self.token();
        let mut m = MessageBuilder::request(code, con)
            .mid(mid)
            .token(&tok)
            .payload(payload);
        for s in path {
            m = m.path_segment(s.as_bytes());
        }
        for q in queries {
            m = m.query(q);
        }
        if let Some(c) = cf {
            m = m.content_format(c);
        }
        m.to_vec()
    }

    pub fn links(&self) -> String {
        let mut s = String::from("</>;rt=\"oma.lwm2m\";ct=\"60 110 112 11542 11543\"");
        for o in &self.objects {
            s.push_str(&format!(",<{o}>"));
        }
        s
    }

    /// `POST /rd?ep=..&lt=..&lwm2m=..&b=U` with the object links.
    pub fn register(&mut self) -> Vec<u8> {
        let q = vec![
            format!("ep={}", self.endpoint),
            format!("lt={}", self.lifetime_s),
            format!("lwm2m={}", self.lwm2m_version),
            "b=U".to_string(),
        ];
        let links = self.links();
        self.request(
            Code::POST,
            &["rd"],
            &q,
            Some(content::CF_LINK),
            links.as_bytes(),
            true,
        )
    }

    /// `POST /rd/{location}` (optionally with a new lifetime).
    pub fn update(&mut self, lifetime: Option<u32>, with_links: bool) -> Vec<u8> {
        let loc = self.location.clone().unwrap_or_default();
        let q: Vec<String> = lifetime.map(|l| format!("lt={l}")).into_iter().collect();
        let links = if with_links {
            self.links()
        } else {
            String::new()
        };
        let cf = with_links.then_some(content::CF_LINK);
        self.request(Code::POST, &["rd", &loc], &q, cf, links.as_bytes(), true)
    }

    pub fn deregister(&mut self) -> Vec<u8> {
        let loc = self.location.clone().unwrap_or_default();
        self.request(Code::DELETE, &["rd", &loc], &[], None, &[], true)
    }

    /// LwM2M 1.1 Send (`POST /dp`) of the given paths as SenML (JSON or CBOR),
    /// with an explicit SenML time (seconds).
    pub fn send(&mut self, paths: &[&str], time_s: Option<f64>, cbor: bool) -> Vec<u8> {
        let vals: Vec<(ResourcePath, f64)> = paths
            .iter()
            .map(|s| p(s))
            .map(|rp| (rp, self.values.get(&rp).copied().unwrap_or(0.0)))
            .collect();
        let (cf, body) = if cbor {
            (content::CF_SENML_CBOR, senml_cbor(&vals, time_s))
        } else {
            (
                content::CF_SENML_JSON,
                senml_json(&vals, time_s).into_bytes(),
            )
        };
        self.request(Code::POST, &["dp"], &[], Some(cf), &body, true)
    }

    /// Encodes the current value(s) under `path` in the device's format.
    pub fn encode_values(&self, path: ResourcePath) -> (u16, Vec<u8>) {
        let vals: Vec<(ResourcePath, f64)> = self
            .values
            .iter()
            .filter(|(k, _)| {
                k.object == path.object
                    && (path.instance.is_none() || k.instance == path.instance)
                    && (path.resource.is_none() || k.resource == path.resource)
            })
            .map(|(k, v)| (*k, *v))
            .collect();
        let single = path.resource.is_some();
        let first = vals.first().map(|v| v.1).unwrap_or(0.0);
        match self.format {
            content::CF_TEXT if single => (content::CF_TEXT, fmt_num(first).into_bytes()),
            content::CF_OPAQUE if single => (content::CF_OPAQUE, tlv_value(path, first)),
            content::CF_CBOR if single => {
                let mut b = Vec::new();
                enc::f64(&mut b, first);
                (content::CF_CBOR, b)
            }
            content::CF_SENML_JSON => {
                (content::CF_SENML_JSON, senml_json(&vals, None).into_bytes())
            }
            content::CF_SENML_CBOR => (content::CF_SENML_CBOR, senml_cbor(&vals, None)),
            content::CF_LWM2M_JSON => {
                let e: Vec<String> = vals
                    .iter()
                    .map(|(k, v)| {
                        format!("{{\"n\":\"{}\",\"v\":{}}}", rel_name(path, *k), fmt_num(*v))
                    })
                    .collect();
                (
                    content::CF_LWM2M_JSON,
                    format!("{{\"bn\":\"{path}/\",\"e\":[{}]}}", e.join(",")).into_bytes(),
                )
            }
            // TLV, and the fallback for single-value formats on instances.
            _ => {
                let mut b = Vec::new();
                for (k, v) in &vals {
                    let bytes = tlv_value(*k, *v);
                    encode_tlv_at(&mut b, path, *k, &bytes);
                }
                (content::CF_TLV, b)
            }
        }
    }

    /// Handles a datagram from the server; returns what to send back.
    pub fn handle(&mut self, data: &[u8]) -> SimEvents {
        let mut ev = SimEvents::default();
        let Ok(m) = Message::decode(data) else {
            return ev;
        };
        if m.code.is_response() || (m.code.is_empty() && m.mtype != MsgType::Con) {
            if m.mtype == MsgType::Ack && Some(m.message_id) == self.outstanding {
                self.outstanding = None;
                ev.response = Some((m.message_id, m.code));
                if m.code == Code::CREATED {
                    let segs: Vec<&[u8]> = m.location_path().collect();
                    if let Some(id) = segs.get(1) {
                        self.location = Some(String::from_utf8_lossy(id).into_owned());
                        ev.registered = true;
                    }
                }
                if m.code == Code::DELETED {
                    ev.deregistered = true;
                    self.location = None;
                    self.observations.clear();
                }
            }
            return ev;
        }
        if !m.code.is_request() {
            return ev;
        }
        if let Some((_, r)) = self.recent.iter().find(|(mid, _)| *mid == m.message_id) {
            ev.replies = r.clone();
            return ev;
        }
        let segs: Vec<String> = m
            .uri_path()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let path = p(&segs.join("/"));
        let mut reply = |code: Code, obs: Option<u32>, cf: Option<u16>, payload: &[u8]| {
            let mut r = MessageBuilder::response_to(m.mtype, m.message_id, code)
                .token(m.token)
                .payload(payload);
            if let Some(o) = obs {
                r = r.observe(o);
            }
            if let Some(c) = cf {
                r = r.content_format(c);
            }
            ev.replies.push(r.to_vec());
        };
        match m.code {
            Code::GET => {
                let (cf, body) = self.encode_values(path);
                match m.observe() {
                    Some(0) => {
                        // RFC 7641 §4.1: the same token again refreshes the
                        // observation (its numbering goes on).
                        let seq = match self.observations.iter().find(|o| o.token == m.token) {
                            Some(o) => o.seq,
                            None => {
                                self.observations.retain(|o| o.path != path);
                                self.observations.push(SimObservation {
                                    token: m.token.to_vec(),
                                    path,
                                    seq: 1,
                                });
                                1
                            }
                        };
                        reply(Code::CONTENT, Some(seq), Some(cf), &body);
                        ev.observed.push(path);
                    }
                    Some(1) => {
                        self.observations.retain(|o| o.token != m.token);
                        reply(Code::CONTENT, None, Some(cf), &body);
                    }
                    _ => reply(Code::CONTENT, None, Some(cf), &body),
                }
            }
            Code::PUT => reply(Code::CHANGED, None, None, &[]),
            Code::POST => {
                ev.executed.push(path);
                reply(Code::CHANGED, None, None, &[]);
            }
            _ => reply(Code::METHOD_NOT_ALLOWED, None, None, &[]),
        }
        self.recent.push_back((m.message_id, ev.replies.clone()));
        if self.recent.len() > 16 {
            self.recent.pop_front();
        }
        ev
    }

    /// Builds a notification for the observation of `path` (CON or NON), with
    /// the next Observe sequence number. `None` when `path` is not observed.
    pub fn notify(&mut self, path: &str, con: bool) -> Option<(u16, Vec<u8>)> {
        let rp = p(path);
        let idx = self.observations.iter().position(|o| o.path == rp)?;
        let (cf, body) = self.encode_values(rp);
        let mid = self.mid();
        let o = &mut self.observations[idx];
        o.seq = (o.seq + 1) & 0xff_ffff;
        let out = MessageBuilder::request(Code::CONTENT, con)
            .mid(mid)
            .token(&o.token)
            .observe(o.seq)
            .content_format(cf)
            .payload(&body)
            .to_vec();
        Some((mid, out))
    }

    pub fn is_observed(&self, path: &str) -> bool {
        let rp = p(path);
        self.observations.iter().any(|o| o.path == rp)
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn rel_name(base: ResourcePath, k: ResourcePath) -> String {
    let full = k.to_string();
    let b = base.to_string();
    full.strip_prefix(&b)
        .map(|s| s.trim_start_matches('/').to_string())
        .unwrap_or(full)
}

fn senml_json(vals: &[(ResourcePath, f64)], time_s: Option<f64>) -> String {
    let recs: Vec<String> = vals
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let bt = match (i, time_s) {
                (0, Some(t)) => format!("\"bt\":{t},"),
                _ => String::new(),
            };
            format!("{{{bt}\"n\":\"{k}\",\"v\":{}}}", fmt_num(*v))
        })
        .collect();
    format!("[{}]", recs.join(","))
}

fn senml_cbor(vals: &[(ResourcePath, f64)], time_s: Option<f64>) -> Vec<u8> {
    let mut b = Vec::new();
    enc::array(&mut b, vals.len());
    for (i, (k, v)) in vals.iter().enumerate() {
        let with_t = i == 0 && time_s.is_some();
        enc::map(&mut b, if with_t { 3 } else { 2 });
        if let (true, Some(t)) = (with_t, time_s) {
            enc::int(&mut b, -3);
            enc::f64(&mut b, t);
        }
        enc::int(&mut b, 0);
        enc::text(&mut b, &k.to_string());
        enc::int(&mut b, 2);
        enc::f64(&mut b, *v);
    }
    b
}

/// TLV bytes for a value: integers for integer-typed resources, else float64.
fn tlv_value(k: ResourcePath, v: f64) -> Vec<u8> {
    match crate::control::profiles::builtin_type(&k) {
        Some(content::DataType::Integer) => (v as i64).to_be_bytes().to_vec(),
        _ => v.to_be_bytes().to_vec(),
    }
}

/// Writes a resource TLV under `base` (wrapping in an object-instance TLV when
/// the base is an object).
fn encode_tlv_at(out: &mut Vec<u8>, base: ResourcePath, k: ResourcePath, value: &[u8]) {
    let res = k.resource.unwrap_or(0);
    if base.instance.is_none() {
        let mut inner = Vec::new();
        content::encode_tlv_resource(&mut inner, tlv_kind::RESOURCE, res, value);
        content::encode_tlv_resource(
            out,
            tlv_kind::OBJECT_INSTANCE,
            k.instance.unwrap_or(0),
            &inner,
        );
    } else {
        content::encode_tlv_resource(out, tlv_kind::RESOURCE, res, value);
    }
}

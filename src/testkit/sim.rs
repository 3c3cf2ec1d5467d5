//! A simulated LwM2M client (device), sans-IO.
//!
//! Used by the demo's simulated devices, the load generator, the engine's
//! in-memory harness and the loopback integration tests. It speaks the client
//! side of the Registration and Information Reporting interfaces: builds
//! Register / Update / De-register / Send requests, answers the server's
//! Write-Attributes, Observe, Read and Execute, and produces notifications in a
//! chosen content format (text, opaque, CBOR, TLV, SenML JSON/CBOR, LwM2M JSON).

use crate::proto::cbor::enc;
use crate::proto::coap::block;
use crate::proto::coap::{Code, Message, MessageBuilder, MsgType};
use crate::proto::lwm2m::content::{self, tlv_kind, ResourcePath, Value};
use crate::proto::lwm2m::encode::{self, WriteEntry, WriteValue};
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
    /// The bootstrap server sent Bootstrap-Finish (and it was accepted).
    pub bootstrap_finished: bool,
}

/// The LwM2M server account a bootstrap wrote (Security + Server
/// instances with the same Short Server ID).
#[derive(Debug, Clone, PartialEq)]
pub struct SimServerAccount {
    pub uri: String,
    pub mode: i64,
    pub identity: Vec<u8>,
    pub key: Vec<u8>,
    pub ssid: i64,
    pub lifetime: Option<i64>,
    pub binding: Option<String>,
}

pub struct SimDevice {
    pub endpoint: String,
    pub lifetime_s: u32,
    pub lwm2m_version: &'static str,
    /// The binding announced at Register (`UQ`: queue mode, TS 1.1
    /// Transport §6.5).
    pub binding: &'static str,
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
    /// Non-numeric resources (strings, opaque, written values), beside the
    /// numeric `values`.
    pub store: BTreeMap<ResourcePath, WriteValue>,
    /// Write-Attributes received, by path.
    pub attributes: BTreeMap<ResourcePath, Vec<String>>,
    /// Answer requests with (method code, path) with this code instead.
    pub fail: BTreeMap<(u8, ResourcePath), Code>,
    /// Ignore every server request (a device that went quiet).
    pub silent: bool,
    /// Largest block this device sends or accepts (RFC 7959 SZX).
    pub block_szx: u8,
    /// Answer a Block1 block larger than `block_szx` with 4.13 (instead of
    /// accepting it and asking for smaller blocks, RFC 7959 §2.3).
    pub block1_refuse_large: bool,
    /// Execute arguments received, in order.
    pub executed_args: Vec<(ResourcePath, String)>,
    block1_body: Vec<u8>,
    /// Content formats accepted for writes (`None`: all); others get 4.15
    /// (a 1.0 client with TLV only).
    pub accept_formats: Option<Vec<u16>>,
    /// Answer Bootstrap-Finish with this code and diagnostic instead.
    pub fail_finish: Option<(Code, String)>,
    /// The content formats of the writes received, in order.
    pub write_formats: Vec<u16>,
    /// Bootstrap-Finish requests accepted so far.
    pub bootstraps_finished: u32,
    /// The Firmware Update object (object 5), when the device has one.
    pub fw: Option<super::sim_fw::SimFirmware>,
}

const FW_PACKAGE: ResourcePath = ResourcePath::resource(5, 0, 0);
const FW_URI: ResourcePath = ResourcePath::resource(5, 0, 1);
const FW_UPDATE: ResourcePath = ResourcePath::resource(5, 0, 2);

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
            binding: "U",
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
            store: [
                (p("/3/0/0"), WriteValue::Str("CORE-M sim".into())),
                (p("/3/0/1"), WriteValue::Str("lwm2m-devsim".into())),
                (p("/3/0/3"), WriteValue::Str("1.0.0".into())),
                (p("/3/0/6/0"), WriteValue::Int(1)),
                (p("/3/0/6/1"), WriteValue::Int(5)),
                (p("/1/0/0"), WriteValue::Int(1)),
                (p("/1/0/1"), WriteValue::Int(300)),
                (p("/1/0/7"), WriteValue::Str("U".into())),
            ]
            .into_iter()
            .collect(),
            attributes: BTreeMap::new(),
            fail: BTreeMap::new(),
            silent: false,
            block_szx: 6,
            block1_refuse_large: false,
            executed_args: Vec::new(),
            block1_body: Vec::new(),
            accept_formats: None,
            fail_finish: None,
            write_formats: Vec::new(),
            bootstraps_finished: 0,
            fw: None,
        }
    }

    /// Gives the device its factory Bootstrap-Server Account at /0/`inst`
    /// (TS 1.1 Core §E.1: resource 1 true) and nothing else in /0 and /1.
    pub fn set_bootstrap_account(&mut self, uri: &str, inst: u16, identity: &[u8], key: &[u8]) {
        self.store.retain(|k, _| k.object != 0 && k.object != 1);
        self.objects
            .retain(|o| !o.starts_with("/0/") && !o.starts_with("/1/"));
        let r = |res| ResourcePath::resource(0, inst, res);
        self.store.insert(r(0), WriteValue::Str(uri.into()));
        self.store.insert(r(1), WriteValue::Bool(true));
        let mode = if identity.is_empty() { 3 } else { 0 };
        self.store.insert(r(2), WriteValue::Int(mode));
        self.store
            .insert(r(3), WriteValue::Opaque(identity.to_vec()));
        self.store.insert(r(5), WriteValue::Opaque(key.to_vec()));
        self.objects.push(format!("/0/{inst}"));
    }

    /// `POST /bs?ep=..[&pct=..]` (TS 1.1 Transport §6.1, Bootstrap-Request).
    pub fn bootstrap_request(&mut self, pct: Option<u16>) -> Vec<u8> {
        let mut q = vec![format!("ep={}", self.endpoint)];
        if let Some(c) = pct {
            q.push(format!("pct={c}"));
        }
        self.request(Code::POST, &["bs"], &q, None, &[], true)
    }

    fn stored_int(&self, path: ResourcePath) -> Option<i64> {
        match self.store.get(&path)? {
            WriteValue::Int(i) => Some(*i),
            WriteValue::Str(s) => s.parse().ok(),
            _ => self.values.get(&path).map(|v| *v as i64),
        }
    }

    /// The (first) LwM2M server account written by a bootstrap: a Security
    /// instance that is not the Bootstrap-Server Account and the Server
    /// instance with its Short Server ID.
    pub fn server_account(&self) -> Option<SimServerAccount> {
        let insts: std::collections::BTreeSet<u16> = self
            .store
            .keys()
            .filter(|k| k.object == 0)
            .filter_map(|k| k.instance)
            .collect();
        for i in insts {
            let r = |res| ResourcePath::resource(0, i, res);
            if matches!(self.store.get(&r(1)), Some(WriteValue::Bool(true))) {
                continue;
            }
            let uri = match self.store.get(&r(0)) {
                Some(WriteValue::Str(s)) => s.clone(),
                _ => continue,
            };
            let bytes = |res| match self.store.get(&r(res)) {
                Some(WriteValue::Opaque(b)) => b.clone(),
                Some(WriteValue::Str(s)) => s.as_bytes().to_vec(),
                _ => Vec::new(),
            };
            let ssid = self.stored_int(r(10)).unwrap_or(0);
            let server = self
                .store
                .keys()
                .filter(|k| k.object == 1 && k.resource == Some(0))
                .find(|k| self.stored_int(**k) == Some(ssid))
                .and_then(|k| k.instance);
            let (lifetime, binding) = match server {
                Some(s) => (
                    self.stored_int(ResourcePath::resource(1, s, 1)),
                    match self.store.get(&ResourcePath::resource(1, s, 7)) {
                        Some(WriteValue::Str(b)) => Some(b.clone()),
                        _ => None,
                    },
                ),
                None => (None, None),
            };
            return Some(SimServerAccount {
                uri,
                mode: self.stored_int(r(2)).unwrap_or(-1),
                identity: bytes(3),
                key: bytes(5),
                ssid,
                lifetime,
                binding,
            });
        }
        None
    }

    /// Bootstrap-Discover answer (TS 1.1 Core §5.2.7.1): the version, then
    /// every object instance, Security and Server instances with their
    /// Short Server ID (none on the Bootstrap-Server Account).
    fn bootstrap_discover(&self) -> String {
        let mut links = vec![format!("lwm2m=\"{}\"", self.lwm2m_version)];
        let mut seen = std::collections::BTreeSet::new();
        for k in self.store.keys().chain(self.values.keys()) {
            if let Some(i) = k.instance {
                seen.insert((k.object, i));
            }
        }
        for (o, i) in seen {
            let mut l = format!("</{o}/{i}>");
            let ssid = match o {
                0 if !matches!(
                    self.store.get(&ResourcePath::resource(0, i, 1)),
                    Some(WriteValue::Bool(true))
                ) =>
                {
                    self.stored_int(ResourcePath::resource(0, i, 10))
                }
                1 => self.stored_int(ResourcePath::resource(1, i, 0)),
                _ => None,
            };
            if let Some(s) = ssid {
                l.push_str(&format!(";ssid={s}"));
            }
            links.push(l);
        }
        links.join(",")
    }

    /// Every resource value under `path` (numeric and stored), typed.
    pub fn entries_under(&self, path: ResourcePath) -> Vec<WriteEntry> {
        let mut out: BTreeMap<ResourcePath, WriteValue> = BTreeMap::new();
        for (k, v) in &self.values {
            if encode::is_within(&path, k) {
                let wv = match crate::control::profiles::builtin_type(k) {
                    Some(content::DataType::Integer) => WriteValue::Int(*v as i64),
                    _ => WriteValue::Float(*v),
                };
                out.insert(*k, wv);
            }
        }
        for (k, v) in &self.store {
            if encode::is_within(&path, k) {
                out.insert(*k, v.clone());
            }
        }
        out.into_iter()
            .map(|(path, value)| WriteEntry { path, value })
            .collect()
    }

    /// Stores a written value (numeric resources stay numeric).
    pub fn put_value(&mut self, path: ResourcePath, v: WriteValue) {
        match (&v, self.values.contains_key(&path)) {
            (WriteValue::Int(i), true) => {
                self.values.insert(path, *i as f64);
            }
            (WriteValue::Float(f), true) => {
                self.values.insert(path, *f);
            }
            _ => {
                self.store.insert(path, v);
            }
        }
    }

    /// The stored bytes of an opaque (or string) resource.
    pub fn bytes_of(&self, path: &str) -> Option<Vec<u8>> {
        match self.store.get(&p(path))? {
            WriteValue::Opaque(b) => Some(b.clone()),
            WriteValue::Str(s) => Some(s.as_bytes().to_vec()),
            _ => None,
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
        // The Security object is never announced (TS 1.1 Core §6.2.1).
        for o in self.objects.iter().filter(|o| !o.starts_with("/0/")) {
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
            format!("b={}", self.binding),
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
        if m.code.is_response() && self.fw_response(&m, &mut ev.replies) {
            return ev;
        }
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
        if self.silent {
            return ev;
        }
        let seg_count = segs.iter().filter(|s| !s.is_empty()).count();
        let v1_0 = self.lwm2m_version == "1.0";
        if seg_count == 0 && m.code == Code::GET && m.accept() == Some(content::CF_LINK) && !v1_0 {
            let links = self.bootstrap_discover();
            ev.replies.push(reply_to(
                &m,
                Code::CONTENT,
                None,
                Some(content::CF_LINK),
                links.as_bytes(),
                &[],
            ));
        } else if segs == ["bs"] && m.code == Code::POST {
            // Bootstrap-Finish (TS 1.1 Core §5.2.7.6).
            match &self.fail_finish {
                Some((code, diag)) => {
                    ev.replies
                        .push(reply_to(&m, *code, None, None, diag.as_bytes(), &[]))
                }
                None => {
                    ev.bootstrap_finished = true;
                    self.bootstraps_finished += 1;
                    ev.replies
                        .push(reply_to(&m, Code::CHANGED, None, None, &[], &[]));
                }
            }
        } else if seg_count == 0 && m.code != Code::FETCH && m.code != Code::IPATCH {
            ev.replies
                .push(reply_to(&m, Code::BAD_REQUEST, None, None, &[], &[]));
        } else if let Some(code) = self.fail.get(&(m.code.0, path)).copied() {
            ev.replies
                .push(reply_to(&m, code, None, None, b"refused", &[]));
        } else {
            self.serve(&m, path, &mut ev);
        }
        self.recent.push_back((m.message_id, ev.replies.clone()));
        if self.recent.len() > 16 {
            self.recent.pop_front();
        }
        ev
    }

    /// Answers one server request (TS 1.1 Transport §6.3, §6.4) from the
    /// device's object store.
    fn serve(&mut self, m: &Message<'_>, path: ResourcePath, ev: &mut SimEvents) {
        let reply_with = |code: Code,
                          obs: Option<u32>,
                          cf: Option<u16>,
                          payload: &[u8],
                          opts: &[(u16, u32)],
                          ev: &mut SimEvents| {
            ev.replies.push(reply_to(m, code, obs, cf, payload, opts));
        };
        // Block1 (RFC 7959 §2.3): collect, then handle the whole body.
        let mut whole = None;
        if let Some(b1) = m.block1() {
            if b1.szx > self.block_szx && self.block1_refuse_large {
                if let (true, Some(fw)) = (path == FW_PACKAGE, self.fw.as_mut()) {
                    fw.refused_large += 1;
                }
                {
                    let hint = crate::proto::coap::Block {
                        num: 0,
                        more: false,
                        szx: self.block_szx,
                    };
                    return reply_with(
                        Code::REQUEST_ENTITY_TOO_LARGE,
                        None,
                        None,
                        &[],
                        &[(crate::proto::coap::opt::BLOCK1, hint.encode())],
                        ev,
                    );
                }
            }
            if path == FW_PACKAGE {
                if let Some(fw) = self.fw.as_mut() {
                    if b1.num != 0
                        && fw
                            .push_stall_at
                            .is_some_and(|n| self.block1_body.len() >= n)
                    {
                        // Gone mid-push: nothing answers.
                        return;
                    }
                    if b1.num == 0 {
                        fw.pushes_started += 1;
                    }
                }
            }
            if b1.num == 0 {
                self.block1_body.clear();
                if path == FW_PACKAGE && self.fw.is_some() {
                    // E.6: a push started: Downloading.
                    self.fw_set(1, 0, &mut ev.replies);
                }
            }
            if b1.num as usize * b1.size() != self.block1_body.len() {
                return reply_with(Code::REQUEST_ENTITY_INCOMPLETE, None, None, &[], &[], ev);
            }
            self.block1_body.extend_from_slice(m.payload);
            if let (true, Some(fw)) = (path == FW_PACKAGE, self.fw.as_mut()) {
                fw.push_szx.push(b1.szx);
            }
            if b1.more {
                let szx = b1.szx.min(self.block_szx);
                let ack = crate::proto::coap::Block {
                    num: b1.num,
                    more: true,
                    szx,
                };
                return reply_with(
                    Code::CONTINUE,
                    None,
                    None,
                    &[],
                    &[(crate::proto::coap::opt::BLOCK1, ack.encode())],
                    ev,
                );
            }
            whole = Some(std::mem::take(&mut self.block1_body));
        }
        let body: &[u8] = whole.as_deref().unwrap_or(m.payload);
        if self.fw.is_some() {
            // Object 5 (TS 1.1 Core E.6): the package, its URI, Update.
            let mut notes = Vec::new();
            let code = match m.code {
                Code::PUT if path == FW_PACKAGE => {
                    if body.is_empty() {
                        self.fw_set(0, 0, &mut notes);
                    } else {
                        if whole.is_none() {
                            self.fw_set(1, 0, &mut notes);
                        }
                        self.fw_package_complete(body.to_vec(), &mut notes);
                    }
                    Some(Code::CHANGED)
                }
                Code::PUT if path == FW_URI => {
                    let c = self.write(path, m.content_format(), body, true);
                    if c == Code::CHANGED {
                        self.fw_uri_written(&mut notes);
                    }
                    Some(c)
                }
                Code::POST if path == FW_UPDATE => {
                    ev.executed.push(path);
                    Some(self.fw_update(&mut notes))
                }
                _ => None,
            };
            if let Some(code) = code {
                reply_with(code, None, None, &[], &[], ev);
                ev.replies.extend(notes);
                return;
            }
        }
        match m.code {
            Code::GET if m.accept() == Some(content::CF_LINK) => {
                // Discover (TS 1.1 Core §5.4.2): the resources under the path.
                let mut links = vec![format!("<{path}>")];
                for e in self.entries_under(path) {
                    links.push(format!("<{}>", e.path.without_resource_instance()));
                }
                links.dedup();
                reply_with(
                    Code::CONTENT,
                    None,
                    Some(content::CF_LINK),
                    links.join(",").as_bytes(),
                    &[],
                    ev,
                );
            }
            Code::GET => {
                let observe = m.observe();
                let custom = m.accept().is_some()
                    || self.store.keys().any(|k| encode::is_within(&path, k))
                    || m.block2().is_some();
                let (cf, body) = if self.entries_under(path).is_empty() {
                    return reply_with(Code::NOT_FOUND, None, None, &[], &[], ev);
                } else if custom {
                    match self.read(path, m.accept()) {
                        Ok(x) => x,
                        Err(code) => return reply_with(code, None, None, &[], &[], ev),
                    }
                } else {
                    self.encode_values(path)
                };
                let seq = match observe {
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
                        ev.observed.push(path);
                        Some(seq)
                    }
                    Some(1) => {
                        self.observations.retain(|o| o.token != m.token);
                        None
                    }
                    _ => None,
                };
                let limit = block::block_size(self.block_szx);
                if body.len() > limit || m.block2().is_some() {
                    // Block2 (RFC 7959 §2.4): the block asked for, at most
                    // our size.
                    let Some((r, b2)) = block::block2_slice(body.len(), m.block2(), self.block_szx)
                    else {
                        return reply_with(Code::BAD_OPTION, None, None, &[], &[], ev);
                    };
                    return reply_with(
                        Code::CONTENT,
                        seq,
                        Some(cf),
                        &body[r],
                        &[(crate::proto::coap::opt::BLOCK2, b2.encode())],
                        ev,
                    );
                }
                reply_with(Code::CONTENT, seq, Some(cf), &body, &[], ev);
            }
            Code::PUT if body.is_empty() && m.uri_query().next().is_some() => {
                // Write-Attributes (TS 1.1 Core §5.4.4).
                let q: Vec<String> = m
                    .uri_query()
                    .map(|q| String::from_utf8_lossy(q).into_owned())
                    .collect();
                self.attributes.insert(path, q);
                reply_with(Code::CHANGED, None, None, &[], &[], ev);
            }
            Code::PUT | Code::IPATCH => {
                if let (Some(ok), Some(cf)) = (&self.accept_formats, m.content_format()) {
                    if !ok.contains(&cf) {
                        return reply_with(
                            Code::UNSUPPORTED_CONTENT_FORMAT,
                            None,
                            None,
                            &[],
                            &[],
                            ev,
                        );
                    }
                }
                if let Some(cf) = m.content_format() {
                    self.write_formats.push(cf);
                }
                if path.instance.is_some() && path.resource.is_none() {
                    // Replacing an instance (Bootstrap-Write, TS 1.1 Core
                    // §5.2.7.4): its old resources go.
                    self.store.retain(|k, _| !encode::is_within(&path, k));
                }
                let code = self.write(path, m.content_format(), body, true);
                if code == Code::CHANGED && path.resource.is_none() {
                    let link = path.to_string();
                    if !self.objects.contains(&link) {
                        self.objects.push(link);
                    }
                }
                reply_with(code, None, None, &[], &[], ev);
            }
            Code::POST if path.resource.is_some() => {
                // Execute (TS 1.1 Core §5.4.5).
                ev.executed.push(path);
                self.executed_args
                    .push((path, String::from_utf8_lossy(body).into_owned()));
                reply_with(Code::CHANGED, None, None, &[], &[], ev);
            }
            Code::POST if path.instance.is_some() => {
                let code = self.write(path, m.content_format(), body, false);
                reply_with(code, None, None, &[], &[], ev);
            }
            Code::POST => {
                // Create (TS 1.1 Core §5.4.6): the instance id from the
                // payload, else the next free one.
                let next = (0..u16::MAX)
                    .find(|i| {
                        !self.objects.contains(&format!("/{}/{i}", path.object))
                            && self
                                .entries_under(ResourcePath {
                                    instance: Some(*i),
                                    ..path
                                })
                                .is_empty()
                    })
                    .unwrap_or(0);
                let cf = m.content_format().unwrap_or(content::CF_TLV);
                let vals = match content::decode(cf, path, body, 0) {
                    Ok(v) => v,
                    Err(_) => return reply_with(Code::BAD_REQUEST, None, None, &[], &[], ev),
                };
                let mut inst = None;
                for v in vals.iter() {
                    inst = inst.or(v.path.instance);
                }
                let i = inst.unwrap_or(next);
                for v in vals.iter() {
                    let mut vp = v.path;
                    vp.instance = Some(i);
                    self.put_value(vp, to_write_value(&vp, &v.value));
                }
                self.objects.push(format!("/{}/{i}", path.object));
                let (o, i) = (path.object.to_string(), i.to_string());
                let r = MessageBuilder::response_to(m.mtype, m.message_id, Code::CREATED)
                    .token(m.token)
                    .location_segment(o.as_bytes())
                    .location_segment(i.as_bytes());
                ev.replies.push(r.to_vec());
            }
            Code::DELETE if path.instance.is_none() => {
                // Bootstrap-Delete of an object (TS 1.1 Core §5.2.7.5): all
                // its instances but the Bootstrap-Server Account.
                let bs: Vec<u16> = self
                    .store
                    .iter()
                    .filter(|(k, v)| {
                        k.object == 0 && k.resource == Some(1) && **v == WriteValue::Bool(true)
                    })
                    .filter_map(|(k, _)| k.instance)
                    .collect();
                let keep = |k: &ResourcePath| {
                    k.object != path.object
                        || (k.object == 0 && bs.contains(&k.instance.unwrap_or(u16::MAX)))
                };
                self.store.retain(|k, _| keep(k));
                self.values.retain(|k, _| keep(k));
                let prefix = format!("/{}/", path.object);
                self.objects.retain(|o| {
                    !o.starts_with(&prefix)
                        || bs
                            .iter()
                            .any(|i| *o == format!("/0/{i}") && path.object == 0)
                });
                reply_with(Code::DELETED, None, None, &[], &[], ev);
            }
            Code::DELETE => {
                let link = path.to_string();
                let before = self.objects.len();
                self.objects.retain(|o| *o != link);
                self.store.retain(|k, _| !encode::is_within(&path, k));
                self.values.retain(|k, _| !encode::is_within(&path, k));
                let code = if before != self.objects.len() {
                    Code::DELETED
                } else {
                    Code::NOT_FOUND
                };
                reply_with(code, None, None, &[], &[], ev);
            }
            Code::FETCH => {
                // Read-Composite (TS 1.1 Core §5.4.1): SenML path list.
                let cf = m.content_format().unwrap_or(content::CF_SENML_CBOR);
                let names = composite_names(cf, body);
                let mut entries = Vec::new();
                for n in names {
                    entries.extend(self.entries_under(n));
                }
                let accept = m.accept().unwrap_or(cf);
                let mut out = Vec::new();
                if encode::encode_composite(accept, &entries, &mut out).is_err() {
                    return reply_with(Code::NOT_ACCEPTABLE, None, None, &[], &[], ev);
                }
                let seq = (m.observe() == Some(0)).then_some(1);
                reply_with(Code::CONTENT, seq, Some(accept), &out, &[], ev);
            }
            _ => reply_with(Code::METHOD_NOT_ALLOWED, None, None, &[], &[], ev),
        }
    }

    /// The values under `path` in the format asked for (or the device's).
    fn read(&self, path: ResourcePath, accept: Option<u16>) -> Result<(u16, Vec<u8>), Code> {
        let entries = self.entries_under(path);
        if entries.is_empty() {
            return Err(Code::NOT_FOUND);
        }
        let cf = match accept {
            Some(cf) => cf,
            None if path.resource.is_some() && entries.len() == 1 => match entries[0].value {
                WriteValue::Opaque(_) => content::CF_OPAQUE,
                _ => content::CF_TEXT,
            },
            None => match self.format {
                f @ (content::CF_SENML_JSON | content::CF_SENML_CBOR | content::CF_LWM2M_JSON) => f,
                _ => content::CF_TLV,
            },
        };
        let mut out = Vec::new();
        encode::encode(cf, path, &entries, &mut out).map_err(|_| Code::NOT_ACCEPTABLE)?;
        Ok((cf, out))
    }

    /// Write (replace or partial update) of `body` at `path`.
    fn write(&mut self, path: ResourcePath, cf: Option<u16>, body: &[u8], replace: bool) -> Code {
        let cf = cf.unwrap_or(if path.resource.is_some() {
            content::CF_TEXT
        } else {
            content::CF_TLV
        });
        let vals = match content::decode(cf, path, body, 0) {
            Ok(v) => v,
            Err(_) => return Code::BAD_REQUEST,
        };
        if replace && path.resource.is_some() && path.resource_instance.is_none() {
            // Replacing a resource drops its old instances (TS Core §5.4.3).
            self.store.retain(|k, _| {
                !(k.without_resource_instance() == path && k.resource_instance.is_some())
            });
        }
        for v in vals.iter() {
            let wv = match (&v.value, self.store.get(&v.path)) {
                // Bytes for an opaque resource stay bytes.
                (Value::Raw(b), Some(WriteValue::Opaque(_))) => WriteValue::Opaque(b.to_vec()),
                _ => to_write_value(&v.path, &v.value),
            };
            self.put_value(v.path, wv);
        }
        Code::CHANGED
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

/// The device's response to request `m` (piggybacked for a CON).
fn reply_to(
    m: &Message<'_>,
    code: Code,
    obs: Option<u32>,
    cf: Option<u16>,
    payload: &[u8],
    opts: &[(u16, u32)],
) -> Vec<u8> {
    let mut r = MessageBuilder::response_to(m.mtype, m.message_id, code)
        .token(m.token)
        .payload(payload);
    if let Some(o) = obs {
        r = r.observe(o);
    }
    if let Some(c) = cf {
        r = r.content_format(c);
    }
    for (n, v) in opts {
        r = r.uint_option(*n, *v);
    }
    r.to_vec()
}

/// A decoded value as the device stores it, typed by the built-in model.
fn to_write_value(path: &ResourcePath, v: &Value<'_>) -> WriteValue {
    use content::DataType as T;
    let ty = crate::control::profiles::builtin_type(&path.without_resource_instance());
    match v {
        Value::Int(i) => WriteValue::Int(*i),
        Value::Float(f) => WriteValue::Float(*f),
        Value::Bool(b) => WriteValue::Bool(*b),
        Value::Str(s) => match ty {
            Some(T::Integer) | Some(T::Time) => s
                .trim()
                .parse()
                .map(WriteValue::Int)
                .unwrap_or_else(|_| WriteValue::Str(s.to_string())),
            _ => WriteValue::Str(s.to_string()),
        },
        Value::Raw(b) => match ty {
            Some(T::Opaque) => WriteValue::Opaque(b.to_vec()),
            Some(T::String) => WriteValue::Str(String::from_utf8_lossy(b).into_owned()),
            Some(T::Integer) | Some(T::Time) => v
                .to_number(ty)
                .map(|n| WriteValue::Int(n.as_f64() as i64))
                .unwrap_or(WriteValue::Opaque(b.to_vec())),
            Some(T::Float) => v
                .to_number(ty)
                .map(|n| WriteValue::Float(n.as_f64()))
                .unwrap_or(WriteValue::Opaque(b.to_vec())),
            Some(T::Boolean) => WriteValue::Bool(b.first() == Some(&1)),
            _ => match std::str::from_utf8(b) {
                Ok(s) if !s.is_empty() && s.chars().all(|c| !c.is_control()) => {
                    WriteValue::Str(s.to_string())
                }
                _ => WriteValue::Opaque(b.to_vec()),
            },
        },
    }
}

/// The names of a composite request's SenML path list (records without
/// values, which the value decoder skips).
fn composite_names(cf: u16, body: &[u8]) -> Vec<ResourcePath> {
    let mut out = Vec::new();
    if cf == content::CF_SENML_JSON {
        if let Ok(serde_json::Value::Array(a)) = serde_json::from_slice::<serde_json::Value>(body) {
            for r in a {
                if let Some(n) = r
                    .get("n")
                    .and_then(|n| n.as_str())
                    .and_then(ResourcePath::parse)
                {
                    out.push(n);
                }
            }
        }
    } else if let Ok(crate::proto::cbor::Cbor::Array(a)) = crate::proto::cbor::decode(body) {
        for r in a {
            if let crate::proto::cbor::Cbor::Map(fields) = r {
                for (k, v) in fields {
                    if let (Some(0), crate::proto::cbor::Cbor::Text(t)) = (k.as_i64(), v) {
                        if let Some(n) = ResourcePath::parse(&t) {
                            out.push(n);
                        }
                    }
                }
            }
        }
    }
    out
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

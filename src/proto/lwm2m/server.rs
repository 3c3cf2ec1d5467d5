//! The LwM2M server engine of one shard, sans-IO.
//!
//! Inputs: [`Engine::handle_datagram`] (a datagram from a peer, with the current
//! time), [`Engine::handle_timeout`] (timers: retransmission, lifetime expiry,
//! dedup sweep) and [`Engine::handle_control`] (messages from other shards).
//! Outputs: datagrams to send ([`Engine::transmits`]), records published
//! through the [`Sink`] passed in, and messages for other shards
//! ([`Engine::poll_broadcast`]). No sockets, no clock reads: everything is
//! driven by the caller, so the same code runs under glommio and in tests with
//! fake time.
//!
//! Behaviour follows RFC 7252 (CoAP messaging, dedup, retransmission), RFC
//! 7641 (Observe) and the LwM2M TS 1.1 Registration and Information Reporting
//! interfaces. Invariants:
//! * nothing in here panics on network input;
//! * a CON notification or Send is acknowledged only after its TelemetryPoint
//!   was accepted by the sink; when the sink is full, Send gets 5.03 with
//!   Max-Age and CON notifications are left unacknowledged (the device's CoAP
//!   layer retransmits them, RFC 7252 §4.2), and neither is recorded as a
//!   duplicate, so the retry is processed;
//! * each (peer, MID) is processed at most once within EXCHANGE_LIFETIME.

use crate::config::CoapConfig;
use crate::control::directory::{Directory, EndpointEntry};
use crate::control::profiles::{MetricKind, Profile, Profiles};
use crate::metrics::ShardMetrics;
use crate::proto::coap::dedup::{Cached, Dedup};
use crate::proto::coap::{self, Code, Message, MessageBuilder, MsgType};
use crate::proto::lwm2m::content::{self, ResourcePath, ResourceValue};
use crate::proto::lwm2m::link_format::{self, RegistrationLinks};
use crate::proto::lwm2m::observe::ObserveOrder;
use crate::proto::lwm2m::registration;
use crate::sink::{PointSource, RegistrationInfo, Sink, SinkError, StatusEvent, TelemetryPoint};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The caller's clock: a monotonic instant for timers and wall-clock epoch ms
/// for timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall_ms: i64,
}

/// Messages between shards (explicit channels, never shared state).
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// `endpoint` registered on `shard`: any other shard holding a registration
    /// for it drops it silently (the device moved, e.g. NAT rebinding).
    Takeover { endpoint: Arc<str>, shard: usize },
}

type RegId = u64;
type TokenId = u64;

struct Registration {
    location: Box<str>,
    endpoint: Arc<str>,
    entry: Arc<EndpointEntry>,
    peer: SocketAddr,
    lifetime_s: u32,
    binding: Box<str>,
    version: &'static str,
    queue_mode: bool,
    root_path: Box<str>,
    objects: Vec<(u16, Option<u16>)>,
    registered_at_ms: i64,
    last_seen_ms: i64,
    expires_at: Instant,
    /// Tokens of this registration's observations (established or requested).
    observations: Vec<TokenId>,
    next_mid: u16,
}

impl Registration {
    fn has_object(&self, object: u16, instance: Option<u16>) -> bool {
        self.objects.iter().any(|(o, i)| {
            *o == object
                && match (instance, i) {
                    (None, _) | (Some(_), None) => true,
                    (Some(a), Some(b)) => a == *b,
                }
        })
    }
}

struct Observation {
    reg: RegId,
    path: ResourcePath,
    order: ObserveOrder,
}

#[derive(Debug, Clone, Copy)]
enum Purpose {
    WriteAttributes,
    Observe(ResourcePath),
}

struct Pending {
    reg: RegId,
    peer: SocketAddr,
    mid: u16,
    bytes: Box<[u8]>,
    retransmits: u32,
    timeout: Duration,
    next_at: Instant,
    /// An empty ACK arrived: stop retransmitting, wait for the separate response.
    acked: bool,
    purpose: Purpose,
}

struct DeferredStatus {
    endpoint: Arc<str>,
    entry: Arc<EndpointEntry>,
    info: OwnedInfo,
    status: &'static str,
    reason: &'static str,
    last_seen: i64,
}

struct OwnedInfo {
    registration_id: String,
    lifetime_s: u32,
    binding: String,
    version: &'static str,
    queue_mode: bool,
    address: String,
    objects: Vec<String>,
}

/// A reply to a request, encoded by the dispatcher.
struct Reply {
    code: Code,
    location: Option<Box<str>>,
    max_age: Option<u32>,
    diagnostic: &'static str,
    /// Registration whose observations start after this reply is sent.
    then_observe: Option<RegId>,
}

impl Reply {
    fn code(code: Code) -> Reply {
        Reply {
            code,
            location: None,
            max_age: None,
            diagnostic: "",
            then_observe: None,
        }
    }
    fn error(code: Code, diagnostic: &'static str) -> Reply {
        Reply {
            diagnostic,
            ..Reply::code(code)
        }
    }
}

/// Which LwM2M operation carried the values being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    /// An Observe notification (or the initial Observe response).
    Notify,
    /// LwM2M 1.1 Send (`POST /dp`).
    Send,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Notify => "notify",
            Operation::Send => "send",
        }
    }
}

enum NotifyOutcome {
    /// Processed (or deliberately discarded): ACK a CON.
    Ack,
    /// Sink full: leave a CON unacknowledged so it is retransmitted.
    Defer,
    /// Reject (RST).
    Reject,
}

pub struct Engine {
    shard: usize,
    shards: usize,
    cfg: CoapConfig,
    directory: Arc<Directory>,
    profiles: Arc<Profiles>,
    metrics: Arc<ShardMetrics>,
    rng: SmallRng,
    regs: HashMap<RegId, Registration>,
    by_endpoint: HashMap<Arc<str>, RegId>,
    by_location: HashMap<Box<str>, RegId>,
    by_peer: HashMap<SocketAddr, RegId>,
    observations: HashMap<TokenId, Observation>,
    pending: HashMap<TokenId, Pending>,
    pending_by_mid: HashMap<(SocketAddr, u16), TokenId>,
    retx: BinaryHeap<Reverse<(Instant, TokenId)>>,
    expiry: BinaryHeap<Reverse<(Instant, RegId)>>,
    dedup: Dedup,
    next_sweep: Option<Instant>,
    deferred: VecDeque<DeferredStatus>,
    out: Vec<u8>,
    out_meta: Vec<(SocketAddr, usize, usize)>,
    broadcast: Vec<ShardMsg>,
    /// Reused for the `source.path` of published points.
    path_buf: String,
}

fn token_id(token: &[u8]) -> Option<TokenId> {
    <[u8; 8]>::try_from(token).ok().map(u64::from_be_bytes)
}

impl Engine {
    pub fn new(
        shard: usize,
        shards: usize,
        cfg: CoapConfig,
        directory: Arc<Directory>,
        profiles: Arc<Profiles>,
        metrics: Arc<ShardMetrics>,
    ) -> Engine {
        let lifetime = Duration::from_secs(cfg.exchange_lifetime_s);
        Engine {
            shard,
            shards,
            cfg,
            directory,
            profiles,
            metrics,
            rng: SmallRng::from_entropy(),
            regs: HashMap::new(),
            by_endpoint: HashMap::new(),
            by_location: HashMap::new(),
            by_peer: HashMap::new(),
            observations: HashMap::new(),
            pending: HashMap::new(),
            pending_by_mid: HashMap::new(),
            retx: BinaryHeap::new(),
            expiry: BinaryHeap::new(),
            dedup: Dedup::new(lifetime),
            next_sweep: None,
            deferred: VecDeque::new(),
            out: Vec::with_capacity(64 * 1024),
            out_meta: Vec::with_capacity(256),
            broadcast: Vec::new(),
            path_buf: String::with_capacity(32),
        }
    }

    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }

    pub fn registration_count(&self) -> usize {
        self.regs.len()
    }

    pub fn observation_count(&self) -> usize {
        self.observations.len()
    }

    /// Datagrams to send: (destination, bytes). Call [`Engine::clear_transmits`]
    /// once they are sent.
    pub fn transmits(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.out_meta
            .iter()
            .map(|(a, s, l)| (*a, &self.out[*s..*s + *l]))
    }

    pub fn has_transmits(&self) -> bool {
        !self.out_meta.is_empty()
    }

    pub fn clear_transmits(&mut self) {
        self.out.clear();
        self.out_meta.clear();
    }

    pub fn poll_broadcast(&mut self) -> Option<ShardMsg> {
        self.broadcast.pop()
    }

    fn push_out(&mut self, peer: SocketAddr, f: impl FnOnce(&mut Vec<u8>)) -> (usize, usize) {
        let start = self.out.len();
        f(&mut self.out);
        let len = self.out.len() - start;
        self.out_meta.push((peer, start, len));
        (start, len)
    }

    fn send_empty(&mut self, peer: SocketAddr, t: MsgType, mid: u16) {
        if t == MsgType::Rst {
            ShardMetrics::inc(&self.metrics.rst_sent);
        }
        self.push_out(peer, |o| MessageBuilder::empty(t, mid).encode(o));
    }

    // ------------------------------------------------------------ input

    /// One datagram from `peer`.
    pub fn handle_datagram(
        &mut self,
        now: Now,
        peer: SocketAddr,
        data: &[u8],
        sink: &mut dyn Sink,
    ) {
        ShardMetrics::inc(&self.metrics.datagrams_rx);
        ShardMetrics::add(&self.metrics.bytes_rx, data.len() as u64);
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.malformed);
                tracing::trace!(%peer, error = %e, "malformed datagram dropped");
                // RFC 7252 §4.2: a CON with a message format error is rejected
                // with a RST; other types are silently ignored (§4.3). Version
                // mismatches are silently ignored (§3).
                if let Some(h) = coap::Header::peek(data) {
                    if h.version == coap::VERSION && h.mtype == MsgType::Con {
                        self.send_empty(peer, MsgType::Rst, h.message_id);
                    }
                }
                return;
            }
        };
        if msg.code.is_empty() {
            self.handle_empty(now, peer, &msg);
        } else if msg.code.is_request() {
            self.handle_request_msg(now, peer, &msg, sink);
        } else if msg.code.is_response() {
            self.handle_response_msg(now, peer, &msg, sink);
        } else {
            // Reserved classes 1, 3, 6, 7 (RFC 7252 §12.1): reject a CON.
            ShardMetrics::inc(&self.metrics.malformed);
            if msg.mtype == MsgType::Con {
                self.send_empty(peer, MsgType::Rst, msg.message_id);
            }
        }
    }

    fn handle_empty(&mut self, now: Now, peer: SocketAddr, msg: &Message<'_>) {
        match msg.mtype {
            // RFC 7252 §4.3: an empty CON is a "CoAP ping", answered with RST.
            MsgType::Con => self.send_empty(peer, MsgType::Rst, msg.message_id),
            MsgType::Non => {}
            MsgType::Ack => {
                if let Some(tok) = self.pending_by_mid.remove(&(peer, msg.message_id)) {
                    if let Some(p) = self.pending.get_mut(&tok) {
                        // Separate response follows (RFC 7252 §5.2.2); keep
                        // waiting up to EXCHANGE_LIFETIME.
                        p.acked = true;
                        p.next_at = now.instant + Duration::from_secs(self.cfg.exchange_lifetime_s);
                        self.retx.push(Reverse((p.next_at, tok)));
                    }
                }
            }
            MsgType::Rst => {
                if let Some(tok) = self.pending_by_mid.remove(&(peer, msg.message_id)) {
                    if let Some(p) = self.pending.remove(&tok) {
                        tracing::debug!(%peer, purpose = ?p.purpose, "request rejected with RST");
                        self.fail_pending(tok, &p);
                    }
                }
            }
        }
    }

    fn handle_request_msg(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) {
        if msg.mtype == MsgType::Ack || msg.mtype == MsgType::Rst {
            // A request must be CON or NON (RFC 7252 §4.2/§4.3).
            ShardMetrics::inc(&self.metrics.malformed);
            return;
        }
        let con = msg.mtype == MsgType::Con;
        if let Some(c) = self.dedup.check(now.instant, &peer, msg.message_id) {
            ShardMetrics::inc(&self.metrics.duplicates);
            if con {
                match c.clone() {
                    Cached::Response(bytes) => self.push_out(peer, |o| o.extend_from_slice(&bytes)),
                    Cached::EmptyAck | Cached::Seen => self.push_out(peer, |o| {
                        MessageBuilder::empty(MsgType::Ack, msg.message_id).encode(o)
                    }),
                };
            }
            return;
        }
        let reply = if let Some(n) = msg.unknown_critical_option() {
            ShardMetrics::inc(&self.metrics.bad_option);
            tracing::debug!(%peer, option = n, "unknown critical option");
            Reply::error(Code::BAD_OPTION, "unknown critical option")
        } else {
            self.route(now, peer, msg, sink)
        };
        let then_observe = reply.then_observe;
        let busy = reply.code == Code::SERVICE_UNAVAILABLE;
        let (start, len) = self.push_out(peer, |o| encode_reply(msg, &reply, o));
        if con {
            let bytes: Box<[u8]> = self.out[start..start + len].into();
            if !busy {
                self.dedup
                    .insert(now.instant, peer, msg.message_id, Cached::Response(bytes));
            }
        } else if !busy {
            self.dedup
                .insert(now.instant, peer, msg.message_id, Cached::Seen);
        }
        if let Some(reg) = then_observe {
            self.start_observations(now, reg, None);
        }
    }

    fn route(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> Reply {
        let mut path = msg.uri_path();
        let first = path.next();
        let second = path.next();
        let third = path.next();
        match (first, second, third, msg.code) {
            (Some(b"rd"), None, None, Code::POST) => self.handle_register(now, peer, msg, sink),
            (Some(b"rd"), Some(id), None, Code::POST) => {
                self.handle_update(now, peer, id, msg, sink)
            }
            (Some(b"rd"), Some(id), None, Code::DELETE) => self.handle_deregister(now, id, sink),
            (Some(b"rd"), _, None, _) => {
                Reply::error(Code::METHOD_NOT_ALLOWED, "method not allowed")
            }
            (Some(b"dp"), None, None, Code::POST) => self.handle_send(now, peer, msg, sink),
            (Some(b"dp"), None, None, _) => {
                Reply::error(Code::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => {
                ShardMetrics::inc(&self.metrics.requests_not_found);
                Reply::error(Code::NOT_FOUND, "no such resource")
            }
        }
    }

    // ------------------------------------------------------------ registration

    fn busy(&mut self) -> Reply {
        ShardMetrics::inc(&self.metrics.busy_responses);
        Reply {
            max_age: Some(self.cfg.busy_max_age_s),
            ..Reply::error(
                Code::SERVICE_UNAVAILABLE,
                "telemetry pipeline busy, retry later",
            )
        }
    }

    /// LwM2M TS 1.1 Transport §6.2.1 Register: `POST /rd?ep=..` → 2.01 Created
    /// with Location-Path `rd/{id}`.
    fn handle_register(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> Reply {
        let params = match registration::parse_register(msg.uri_query()) {
            Ok(p) => p,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                tracing::debug!(%peer, error = %e, "register: bad parameters");
                return Reply::error(Code::BAD_REQUEST, "invalid registration parameters");
            }
        };
        if let Some(cf) = msg.content_format() {
            if cf != content::CF_LINK {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                return Reply::error(
                    Code::BAD_REQUEST,
                    "registration payload must be link-format",
                );
            }
        }
        let links = match link_format::parse_registration(msg.payload) {
            Ok(l) => l,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                tracing::debug!(%peer, error = %e, "register: bad link-format payload");
                return Reply::error(Code::BAD_REQUEST, "invalid link-format payload");
            }
        };
        let Some(entry) = self.directory.get(&params.endpoint) else {
            ShardMetrics::inc(&self.metrics.register_rejected_unknown_endpoint);
            tracing::info!(%peer, endpoint = %params.endpoint, "register refused: endpoint not provisioned (4.03)");
            return Reply::error(Code::FORBIDDEN, "endpoint not provisioned");
        };
        if !sink.has_capacity(1) {
            return self.busy();
        }
        let endpoint: Arc<str> = Arc::from(params.endpoint.as_str());
        if let Some(old) = self.by_endpoint.get(&endpoint).copied() {
            ShardMetrics::inc(&self.metrics.registrations_replaced);
            self.remove_registration(old);
        }
        if let Some(old) = self.by_peer.get(&peer).copied() {
            // Another endpoint used this address before: it is gone from here.
            self.remove_registration(old);
        }
        let id = loop {
            let id: u64 = self.rng.gen();
            if id != 0 && !self.regs.contains_key(&id) {
                break id;
            }
        };
        let location: Box<str> = format!("{id:016x}").into_boxed_str();
        let lifetime_s = params.lifetime_s.max(self.cfg.min_lifetime_s);
        let expires_at = self.expiry_for(now, lifetime_s);
        let RegistrationLinks {
            root_path, objects, ..
        } = links;
        let reg = Registration {
            location: location.clone(),
            endpoint: endpoint.clone(),
            entry,
            peer,
            lifetime_s,
            binding: params.binding.into_boxed_str(),
            version: match params.version.as_str() {
                "1.2" => "1.2",
                "1.1" => "1.1",
                _ => "1.0",
            },
            queue_mode: params.queue_mode,
            root_path: root_path.into_boxed_str(),
            objects: objects.iter().map(|o| (o.object, o.instance)).collect(),
            registered_at_ms: now.wall_ms,
            last_seen_ms: now.wall_ms,
            expires_at,
            observations: Vec::new(),
            next_mid: self.rng.gen(),
        };
        if let Err(e) = publish_status(sink, &reg, "online", "registered") {
            return if e == SinkError::Full {
                self.busy()
            } else {
                Reply::error(Code::INTERNAL_SERVER_ERROR, "status publish failed")
            };
        }
        ShardMetrics::inc(&self.metrics.status_published);
        ShardMetrics::inc(&self.metrics.registrations);
        tracing::debug!(%peer, endpoint = %endpoint, device_id = %reg.entry.device_id, location = %location, "registered");
        self.regs.insert(id, reg);
        self.by_endpoint.insert(endpoint.clone(), id);
        self.by_location.insert(location.clone(), id);
        self.by_peer.insert(peer, id);
        self.expiry.push(Reverse((expires_at, id)));
        if self.shards > 1 {
            self.broadcast.push(ShardMsg::Takeover {
                endpoint,
                shard: self.shard,
            });
        }
        Reply {
            location: Some(location),
            then_observe: Some(id),
            ..Reply::code(Code::CREATED)
        }
    }

    fn expiry_for(&self, now: Now, lifetime_s: u32) -> Instant {
        now.instant + Duration::from_secs(lifetime_s as u64 + self.cfg.lifetime_grace_s)
    }

    /// LwM2M TS 1.1 Transport §6.2.2 Update: `POST /rd/{id}?lt=..&b=..`.
    fn handle_update(
        &mut self,
        now: Now,
        peer: SocketAddr,
        id: &[u8],
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> Reply {
        let Some(reg_id) = self.lookup_location(id) else {
            // Unknown here (expired, or registered on another shard before the
            // device's address moved): 4.04 makes the client register again
            // (LwM2M TS 1.1 Core §6.2.2 / §8.2.2 client behaviour).
            ShardMetrics::inc(&self.metrics.update_unknown);
            return Reply::error(Code::NOT_FOUND, "unknown registration");
        };
        let params = match registration::parse_update(msg.uri_query()) {
            Ok(p) => p,
            Err(_) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                return Reply::error(Code::BAD_REQUEST, "invalid update parameters");
            }
        };
        let links = if msg.payload.is_empty() {
            None
        } else {
            match link_format::parse_registration(msg.payload) {
                Ok(l) => Some(l),
                Err(_) => {
                    ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                    return Reply::error(Code::BAD_REQUEST, "invalid link-format payload");
                }
            }
        };
        let endpoint = self.regs.get(&reg_id).map(|r| r.endpoint.clone());
        let Some(endpoint) = endpoint else {
            return Reply::error(Code::NOT_FOUND, "unknown registration");
        };
        let Some(entry) = self.directory.get(&endpoint) else {
            // De-provisioned while registered: drop it, the device is told to
            // re-register (and will get 4.03).
            if let Some(reg) = self.regs.get(&reg_id) {
                if publish_status(sink, reg, "offline", "deprovisioned").is_err() {
                    return self.busy();
                }
                ShardMetrics::inc(&self.metrics.status_published);
            }
            self.remove_registration(reg_id);
            return Reply::error(Code::NOT_FOUND, "endpoint no longer provisioned");
        };
        if !sink.has_capacity(1) {
            return self.busy();
        }
        let expires_at;
        let mut new_objects = false;
        {
            let Some(reg) = self.regs.get_mut(&reg_id) else {
                return Reply::error(Code::NOT_FOUND, "unknown registration");
            };
            if let Some(lt) = params.lifetime_s {
                reg.lifetime_s = lt.max(self.cfg.min_lifetime_s);
            }
            if let Some(b) = params.binding {
                reg.queue_mode = b.contains('Q');
                reg.binding = b.into_boxed_str();
            }
            if let Some(l) = links {
                reg.root_path = l.root_path.into_boxed_str();
                reg.objects = l.objects.iter().map(|o| (o.object, o.instance)).collect();
                new_objects = true;
            }
            reg.entry = entry;
            reg.last_seen_ms = now.wall_ms;
            if reg.peer != peer {
                tracing::debug!(old = %reg.peer, new = %peer, endpoint = %reg.endpoint, "device address changed");
                self.by_peer.remove(&reg.peer);
                reg.peer = peer;
                self.by_peer.insert(peer, reg_id);
            }
            reg.expires_at = now.instant
                + Duration::from_secs(reg.lifetime_s as u64 + self.cfg.lifetime_grace_s);
            expires_at = reg.expires_at;
        }
        self.expiry.push(Reverse((expires_at, reg_id)));
        if let Some(reg) = self.regs.get(&reg_id) {
            if publish_status(sink, reg, "online", "updated").is_ok() {
                ShardMetrics::inc(&self.metrics.status_published);
            }
        }
        ShardMetrics::inc(&self.metrics.updates);
        Reply {
            then_observe: new_objects.then_some(reg_id),
            ..Reply::code(Code::CHANGED)
        }
    }

    /// The registration behind a `/rd/{location}` path segment.
    fn lookup_location(&self, id: &[u8]) -> Option<RegId> {
        std::str::from_utf8(id)
            .ok()
            .and_then(|s| self.by_location.get(s).copied())
    }

    /// LwM2M TS 1.1 Transport §6.2.3 De-register: `DELETE /rd/{id}` → 2.02.
    fn handle_deregister(&mut self, _now: Now, id: &[u8], sink: &mut dyn Sink) -> Reply {
        let Some(reg_id) = self.lookup_location(id) else {
            ShardMetrics::inc(&self.metrics.update_unknown);
            return Reply::error(Code::NOT_FOUND, "unknown registration");
        };
        if let Some(reg) = self.regs.get(&reg_id) {
            match publish_status(sink, reg, "offline", "deregistered") {
                Ok(()) => ShardMetrics::inc(&self.metrics.status_published),
                Err(_) => return self.busy(),
            }
        }
        self.remove_registration(reg_id);
        ShardMetrics::inc(&self.metrics.deregistrations);
        Reply::code(Code::DELETED)
    }

    /// Forgets a registration, its observations and pending requests. A later
    /// notification on a forgotten token is answered with RST, which cancels
    /// the observation on the device (RFC 7641 §3.6).
    fn remove_registration(&mut self, id: RegId) -> Option<Registration> {
        let reg = self.regs.remove(&id)?;
        self.by_endpoint.remove(&reg.endpoint);
        self.by_location.remove(&reg.location);
        if self.by_peer.get(&reg.peer) == Some(&id) {
            self.by_peer.remove(&reg.peer);
        }
        for t in &reg.observations {
            self.observations.remove(t);
            if let Some(p) = self.pending.remove(t) {
                self.pending_by_mid.remove(&(p.peer, p.mid));
            }
        }
        Some(reg)
    }

    // ------------------------------------------------------------ observe

    /// Sends Write-Attributes (when the profile asks) and Observe for each
    /// profile path the device declared and that is not observed yet.
    fn start_observations(&mut self, now: Now, reg_id: RegId, _only: Option<ResourcePath>) {
        let Some(reg) = self.regs.get(&reg_id) else {
            return;
        };
        let Some(profile) = self
            .profiles
            .get(&reg.entry.profile)
            .or_else(|| self.profiles.get("default"))
        else {
            return;
        };
        let already: Vec<ResourcePath> = reg
            .observations
            .iter()
            .filter_map(|t| {
                self.observations.get(t).map(|o| o.path).or_else(|| {
                    match self.pending.get(t).map(|p| p.purpose) {
                        Some(Purpose::Observe(p)) => Some(p),
                        _ => None,
                    }
                })
            })
            .collect();
        let todo: Vec<_> = profile
            .observe
            .iter()
            .filter(|(p, _, _)| reg.has_object(p.object, p.instance) && !already.contains(p))
            .cloned()
            .collect();
        for (path, pmin, pmax) in todo {
            if pmin.is_some() || pmax.is_some() {
                // LwM2M TS 1.1 Core §5.4.4 Write-Attributes: PUT with the
                // notification attributes as Uri-Query.
                let mut q = Vec::new();
                if let Some(v) = pmin {
                    q.push(format!("pmin={v}"));
                }
                if let Some(v) = pmax {
                    q.push(format!("pmax={v}"));
                }
                self.send_request(
                    now,
                    reg_id,
                    Code::PUT,
                    path,
                    &q,
                    None,
                    Purpose::WriteAttributes,
                );
            }
            // RFC 7641 §3.1 / LwM2M Information Reporting Observe: GET with Observe=0.
            if let Some(tok) = self.send_request(
                now,
                reg_id,
                Code::GET,
                path,
                &[],
                Some(0),
                Purpose::Observe(path),
            ) {
                if let Some(reg) = self.regs.get_mut(&reg_id) {
                    reg.observations.push(tok);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_request(
        &mut self,
        now: Now,
        reg_id: RegId,
        code: Code,
        path: ResourcePath,
        queries: &[String],
        observe: Option<u32>,
        purpose: Purpose,
    ) -> Option<TokenId> {
        let token: TokenId = loop {
            let t: u64 = self.rng.gen();
            if !self.pending.contains_key(&t) && !self.observations.contains_key(&t) {
                break t;
            }
        };
        let reg = self.regs.get_mut(&reg_id)?;
        let mid = reg.next_mid;
        reg.next_mid = reg.next_mid.wrapping_add(1);
        let peer = reg.peer;
        let mut segs: Vec<String> = reg
            .root_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        segs.push(path.object.to_string());
        for id in [path.instance, path.resource, path.resource_instance]
            .into_iter()
            .flatten()
        {
            segs.push(id.to_string());
        }
        let tok = token.to_be_bytes();
        let mut m = MessageBuilder::request(code, true).mid(mid).token(&tok);
        for seg in &segs {
            m = m.path_segment(seg.as_bytes());
        }
        for q in queries {
            m = m.query(q);
        }
        if let Some(o) = observe {
            m = m.observe(o);
        }
        let bytes = m.to_vec();
        self.push_out(peer, |o| o.extend_from_slice(&bytes));
        ShardMetrics::inc(&self.metrics.requests_sent);
        // RFC 7252 §4.2: initial timeout random in [ACK_TIMEOUT, ACK_TIMEOUT*ACK_RANDOM_FACTOR].
        let base = self.cfg.ack_timeout_ms as f64;
        let factor = self.cfg.ack_random_factor.max(1.0);
        let timeout = Duration::from_millis(self.rng.gen_range(base..=base * factor) as u64);
        let next_at = now.instant + timeout;
        self.pending.insert(
            token,
            Pending {
                reg: reg_id,
                peer,
                mid,
                bytes: bytes.into_boxed_slice(),
                retransmits: 0,
                timeout,
                next_at,
                acked: false,
                purpose,
            },
        );
        self.pending_by_mid.insert((peer, mid), token);
        self.retx.push(Reverse((next_at, token)));
        Some(token)
    }

    fn fail_pending(&mut self, token: TokenId, p: &Pending) {
        if let Purpose::Observe(path) = p.purpose {
            ShardMetrics::inc(&self.metrics.observe_failed);
            if let Some(reg) = self.regs.get_mut(&p.reg) {
                reg.observations.retain(|t| *t != token);
                tracing::debug!(endpoint = %reg.endpoint, %path, "observe request failed");
            }
        }
    }

    fn handle_response_msg(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) {
        let tok = token_id(msg.token);
        // A response to one of our requests (piggybacked in an ACK, or separate).
        let pending_tok = match msg.mtype {
            MsgType::Ack => self
                .pending_by_mid
                .get(&(peer, msg.message_id))
                .copied()
                .filter(|t| Some(*t) == tok),
            _ => tok.filter(|t| self.pending.contains_key(t)),
        };
        if let Some(t) = pending_tok {
            if msg.mtype == MsgType::Con
                && self
                    .dedup
                    .check(now.instant, &peer, msg.message_id)
                    .is_some()
            {
                ShardMetrics::inc(&self.metrics.duplicates);
                self.send_empty(peer, MsgType::Ack, msg.message_id);
                return;
            }
            let Some(p) = self.pending.remove(&t) else {
                return;
            };
            self.pending_by_mid.remove(&(p.peer, p.mid));
            let outcome = self.complete_pending(now, peer, t, p, msg, sink);
            self.answer_notification(now, peer, msg, outcome);
            return;
        }
        if msg.mtype == MsgType::Ack {
            // A late or unknown piggybacked response: nothing to do.
            return;
        }
        // CON/NON response: a notification?
        if self
            .dedup
            .check(now.instant, &peer, msg.message_id)
            .is_some()
        {
            ShardMetrics::inc(&self.metrics.duplicates);
            if msg.mtype == MsgType::Con {
                self.send_empty(peer, MsgType::Ack, msg.message_id);
            }
            return;
        }
        let outcome = match tok.filter(|t| self.observations.contains_key(t)) {
            Some(t) => {
                ShardMetrics::inc(&self.metrics.notifications_rx);
                self.handle_notification(now, peer, t, msg, sink)
            }
            None => {
                ShardMetrics::inc(&self.metrics.notifications_unknown);
                NotifyOutcome::Reject
            }
        };
        self.answer_notification(now, peer, msg, outcome);
    }

    fn answer_notification(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        outcome: NotifyOutcome,
    ) {
        match (outcome, msg.mtype) {
            (NotifyOutcome::Ack, MsgType::Con) => {
                self.send_empty(peer, MsgType::Ack, msg.message_id);
                self.dedup
                    .insert(now.instant, peer, msg.message_id, Cached::EmptyAck);
            }
            (NotifyOutcome::Ack, MsgType::Non) => {
                self.dedup
                    .insert(now.instant, peer, msg.message_id, Cached::Seen);
            }
            // RFC 7641 §3.6: a notification we have no interest in is rejected
            // with RST, which removes the observer on the device.
            (NotifyOutcome::Reject, MsgType::Con | MsgType::Non) => {
                self.send_empty(peer, MsgType::Rst, msg.message_id)
            }
            _ => {}
        }
    }

    fn complete_pending(
        &mut self,
        now: Now,
        peer: SocketAddr,
        token: TokenId,
        p: Pending,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> NotifyOutcome {
        match p.purpose {
            Purpose::WriteAttributes => {
                if !msg.code.is_success() {
                    tracing::debug!(%peer, code = %msg.code, "write-attributes refused");
                }
                NotifyOutcome::Ack
            }
            Purpose::Observe(path) => {
                if !msg.code.is_success() {
                    self.fail_pending(token, &p);
                    return NotifyOutcome::Ack;
                }
                let observing = msg.observe().is_some();
                if observing {
                    ShardMetrics::inc(&self.metrics.observe_established);
                    self.observations.insert(
                        token,
                        Observation {
                            reg: p.reg,
                            path,
                            order: ObserveOrder::default(),
                        },
                    );
                } else if let Some(reg) = self.regs.get_mut(&p.reg) {
                    // RFC 7641 §3.2: no Observe option means not observed;
                    // we still publish the value we got.
                    reg.observations.retain(|t| *t != token);
                }
                let out = self.publish_payload(now, p.reg, path, msg, Operation::Notify, sink);
                if matches!(out, NotifyOutcome::Defer) {
                    // The initial value could not be queued; the next
                    // notification will carry a fresh one. The response itself
                    // cannot be withheld (the exchange is complete).
                    ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                    return NotifyOutcome::Ack;
                }
                out
            }
        }
    }

    fn handle_notification(
        &mut self,
        now: Now,
        peer: SocketAddr,
        token: TokenId,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> NotifyOutcome {
        let Some(obs) = self.observations.get(&token) else {
            return NotifyOutcome::Reject;
        };
        let (reg_id, path) = (obs.reg, obs.path);
        if let Some(n) = msg.unknown_critical_option() {
            // RFC 7252 §5.4.1: an unrecognised critical option in a CON
            // response rejects it.
            tracing::debug!(%peer, option = n, "notification with unknown critical option");
            return NotifyOutcome::Reject;
        }
        if !msg.code.is_success() {
            // RFC 7641 §3.2: a non-2.xx notification ends the observation.
            self.observations.remove(&token);
            if let Some(reg) = self.regs.get_mut(&reg_id) {
                reg.observations.retain(|t| *t != token);
            }
            return NotifyOutcome::Ack;
        }
        if let Some(seq) = msg.observe() {
            let fresh = self
                .observations
                .get(&token)
                .map(|o| {
                    let mut probe = o.order;
                    probe.handle_notification(now.instant, seq)
                })
                .unwrap_or(false);
            if !fresh {
                ShardMetrics::inc(&self.metrics.notifications_stale);
                return NotifyOutcome::Ack;
            }
        }
        if let Some(reg) = self.regs.get_mut(&reg_id) {
            reg.last_seen_ms = now.wall_ms;
        }
        let outcome = self.publish_payload(now, reg_id, path, msg, Operation::Notify, sink);
        match outcome {
            NotifyOutcome::Ack => {
                if let (Some(seq), Some(o)) = (msg.observe(), self.observations.get_mut(&token)) {
                    o.order.handle_notification(now.instant, seq);
                }
                NotifyOutcome::Ack
            }
            NotifyOutcome::Defer => {
                if msg.mtype == MsgType::Con {
                    ShardMetrics::inc(&self.metrics.notifications_deferred_busy);
                    NotifyOutcome::Defer
                } else {
                    ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                    NotifyOutcome::Ack
                }
            }
            NotifyOutcome::Reject => NotifyOutcome::Reject,
        }
    }

    /// LwM2M 1.1 Send (TS 1.1 Transport §6.4.? "Send", `POST /dp`, SenML).
    fn handle_send(
        &mut self,
        now: Now,
        peer: SocketAddr,
        msg: &Message<'_>,
        sink: &mut dyn Sink,
    ) -> Reply {
        ShardMetrics::inc(&self.metrics.send_rx);
        let Some(reg_id) = self.by_peer.get(&peer).copied() else {
            return Reply::error(Code::NOT_FOUND, "not registered");
        };
        let cf = msg.content_format().unwrap_or(content::CF_SENML_CBOR);
        if !matches!(cf, content::CF_SENML_JSON | content::CF_SENML_CBOR) {
            return Reply::error(
                Code::UNSUPPORTED_CONTENT_FORMAT,
                "Send takes SenML JSON or CBOR",
            );
        }
        let root = ResourcePath {
            object: 0,
            instance: None,
            resource: None,
            resource_instance: None,
        };
        if let Some(reg) = self.regs.get_mut(&reg_id) {
            reg.last_seen_ms = now.wall_ms;
        }
        match self.publish_payload(now, reg_id, root, msg, Operation::Send, sink) {
            NotifyOutcome::Ack => Reply::code(Code::CHANGED),
            NotifyOutcome::Defer => self.busy(),
            NotifyOutcome::Reject => Reply::error(Code::BAD_REQUEST, "undecodable payload"),
        }
    }

    /// Decodes a payload, maps it through the device profile and publishes the
    /// resulting TelemetryPoints (one per distinct timestamp), all or nothing.
    fn publish_payload(
        &mut self,
        now: Now,
        reg_id: RegId,
        base: ResourcePath,
        msg: &Message<'_>,
        operation: Operation,
        sink: &mut dyn Sink,
    ) -> NotifyOutcome {
        let Some(reg) = self.regs.get(&reg_id) else {
            return NotifyOutcome::Reject;
        };
        let cf = msg.content_format().unwrap_or(if base.resource.is_some() {
            content::CF_TEXT
        } else {
            content::CF_TLV
        });
        let values = match content::decode(cf, base, msg.payload, now.wall_ms) {
            Ok(v) => v,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.decode_errors);
                tracing::debug!(endpoint = %reg.endpoint, error = %e, "payload decode failed");
                // A notification is acknowledged (retrying the same bytes
                // cannot succeed); a Send request gets 4.00.
                return match operation {
                    Operation::Send => NotifyOutcome::Reject,
                    Operation::Notify => NotifyOutcome::Ack,
                };
            }
        };
        let Some(profile) = self
            .profiles
            .get(&reg.entry.profile)
            .or_else(|| self.profiles.get("default"))
        else {
            return NotifyOutcome::Ack;
        };
        let (points, unmapped, bad) = build_points(&profile, &values, now.wall_ms);
        ShardMetrics::add(&self.metrics.unmapped_values, unmapped as u64);
        ShardMetrics::add(&self.metrics.decode_errors, bad as u64);
        if points.is_empty() {
            return NotifyOutcome::Ack;
        }
        if !sink.has_capacity(points.len()) {
            return NotifyOutcome::Defer;
        }
        // Source path, formatted into a reused buffer (no allocation).
        self.path_buf.clear();
        match operation {
            Operation::Send => self.path_buf.push_str("/dp"),
            Operation::Notify => {
                let _ = write!(self.path_buf, "{base}");
            }
        }
        let seq = msg.observe();
        for (ts, p) in &points {
            let tp = TelemetryPoint {
                tenant_id: &reg.entry.tenant_id,
                device_id: &reg.entry.device_id,
                endpoint: &reg.endpoint,
                ts: *ts,
                received_at: now.wall_ms,
                numeric_values: &p.numeric,
                string_values: &p.string,
                bool_values: &p.boolean,
                source: PointSource {
                    protocol: "lwm2m",
                    operation: operation.as_str(),
                    path: &self.path_buf,
                    content_format: cf,
                    observe_seq: seq,
                    shard: self.shard,
                    registration_id: &reg.location,
                },
            };
            match sink.publish_telemetry(&tp) {
                Ok(()) => ShardMetrics::inc(&self.metrics.points_published),
                Err(SinkError::Full) => return NotifyOutcome::Defer,
                Err(SinkError::Rejected) => {}
            }
        }
        NotifyOutcome::Ack
    }

    // ------------------------------------------------------------ timers

    /// Runs due timers. Call every few milliseconds.
    pub fn handle_timeout(&mut self, now: Now, sink: &mut dyn Sink) {
        // Retransmissions (RFC 7252 §4.2: timeout doubles, MAX_RETRANSMIT).
        while let Some(Reverse((at, tok))) = self.retx.peek().copied() {
            if at > now.instant {
                break;
            }
            self.retx.pop();
            let Some(p) = self.pending.get_mut(&tok) else {
                continue;
            };
            if p.next_at != at {
                continue;
            }
            if !p.acked && p.retransmits < self.cfg.max_retransmit {
                p.retransmits += 1;
                p.timeout *= 2;
                p.next_at = now.instant + p.timeout;
                let (peer, next_at) = (p.peer, p.next_at);
                let bytes = p.bytes.clone();
                self.retx.push(Reverse((next_at, tok)));
                ShardMetrics::inc(&self.metrics.retransmissions);
                self.push_out(peer, |o| o.extend_from_slice(&bytes));
            } else if let Some(p) = self.pending.remove(&tok) {
                self.pending_by_mid.remove(&(p.peer, p.mid));
                ShardMetrics::inc(&self.metrics.request_timeouts);
                self.fail_pending(tok, &p);
            }
        }
        // Lifetime expiry (LwM2M TS 1.1 Core §6.2.1: the registration is
        // removed when its lifetime passes without an Update).
        while let Some(Reverse((at, id))) = self.expiry.peek().copied() {
            if at > now.instant {
                break;
            }
            self.expiry.pop();
            let due = self
                .regs
                .get(&id)
                .is_some_and(|r| r.expires_at <= now.instant);
            if !due {
                continue;
            }
            if let Some(reg) = self.remove_registration(id) {
                ShardMetrics::inc(&self.metrics.expirations);
                tracing::debug!(endpoint = %reg.endpoint, "registration expired");
                self.deferred
                    .push_back(deferred(&reg, "offline", "expired"));
            }
        }
        while let Some(d) = self.deferred.front() {
            let ev = StatusEvent {
                tenant_id: &d.entry.tenant_id,
                device_id: &d.entry.device_id,
                endpoint: &d.endpoint,
                status: d.status,
                reason: d.reason,
                last_seen: d.last_seen,
                ts: now.wall_ms,
                registration: RegistrationInfo {
                    registration_id: &d.info.registration_id,
                    lifetime_s: d.info.lifetime_s,
                    binding: &d.info.binding,
                    lwm2m_version: d.info.version,
                    queue_mode: d.info.queue_mode,
                    address: d.info.address.clone(),
                    objects: d.info.objects.clone(),
                },
            };
            match sink.publish_status(&ev) {
                Ok(()) => {
                    ShardMetrics::inc(&self.metrics.status_published);
                    self.deferred.pop_front();
                }
                Err(SinkError::Full) => break,
                Err(SinkError::Rejected) => {
                    self.deferred.pop_front();
                }
            }
        }
        let sweep_due = self.next_sweep.is_none_or(|t| t <= now.instant);
        if sweep_due {
            self.dedup.sweep(now.instant);
            self.next_sweep = Some(now.instant + Duration::from_secs(5));
        }
        ShardMetrics::set(&self.metrics.registrations_active, self.regs.len() as i64);
        ShardMetrics::set(
            &self.metrics.observations_active,
            self.observations.len() as i64,
        );
        ShardMetrics::set(&self.metrics.pending_requests, self.pending.len() as i64);
    }

    /// A message from another shard.
    pub fn handle_control(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Takeover { endpoint, shard } => {
                if shard == self.shard {
                    return;
                }
                if let Some(id) = self.by_endpoint.get(&endpoint).copied() {
                    ShardMetrics::inc(&self.metrics.takeovers);
                    tracing::debug!(%endpoint, to_shard = shard, "registration moved to another shard");
                    self.remove_registration(id);
                }
            }
        }
    }

    /// Time of the next timer, so the caller can sleep until then.
    pub fn next_timeout(&self) -> Option<Instant> {
        let a = self.retx.peek().map(|r| r.0 .0);
        let b = self.expiry.peek().map(|r| r.0 .0);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn info(reg: &Registration) -> RegistrationInfo<'_> {
    RegistrationInfo {
        registration_id: &reg.location,
        lifetime_s: reg.lifetime_s,
        binding: &reg.binding,
        lwm2m_version: reg.version,
        queue_mode: reg.queue_mode,
        address: reg.peer.to_string(),
        objects: reg
            .objects
            .iter()
            .map(|(o, i)| match i {
                Some(i) => format!("/{o}/{i}"),
                None => format!("/{o}"),
            })
            .collect(),
    }
}

fn deferred(reg: &Registration, status: &'static str, reason: &'static str) -> DeferredStatus {
    let i = info(reg);
    DeferredStatus {
        endpoint: reg.endpoint.clone(),
        entry: reg.entry.clone(),
        info: OwnedInfo {
            registration_id: i.registration_id.to_string(),
            lifetime_s: i.lifetime_s,
            binding: i.binding.to_string(),
            version: reg.version,
            queue_mode: i.queue_mode,
            address: i.address,
            objects: i.objects,
        },
        status,
        reason,
        last_seen: reg.last_seen_ms,
    }
}

fn publish_status(
    sink: &mut dyn Sink,
    reg: &Registration,
    status: &'static str,
    reason: &'static str,
) -> Result<(), SinkError> {
    sink.publish_status(&StatusEvent {
        tenant_id: &reg.entry.tenant_id,
        device_id: &reg.entry.device_id,
        endpoint: &reg.endpoint,
        status,
        reason,
        last_seen: reg.last_seen_ms,
        ts: reg.last_seen_ms.max(reg.registered_at_ms),
        registration: info(reg),
    })
}

#[derive(Default)]
struct PointValues<'p> {
    numeric: BTreeMap<&'p str, f64>,
    string: BTreeMap<&'p str, String>,
    boolean: BTreeMap<&'p str, bool>,
}

/// Maps values to metrics; groups them by timestamp. Returns the points, the
/// number of unmapped values and the number of values that did not convert to
/// the metric's kind.
fn build_points<'p>(
    profile: &'p Profile,
    values: &[ResourceValue],
    now_ms: i64,
) -> (Vec<(i64, PointValues<'p>)>, usize, usize) {
    let mut points: Vec<(i64, PointValues<'p>)> = Vec::new();
    let (mut unmapped, mut bad) = (0, 0);
    for v in values {
        let Some(m) = profile.mapping(&v.path) else {
            unmapped += 1;
            continue;
        };
        let ts = v.time_ms.unwrap_or(now_ms);
        let idx = match points.iter().position(|(t, _)| *t == ts) {
            Some(i) => i,
            None => {
                points.push((ts, PointValues::default()));
                points.len() - 1
            }
        };
        let pv = &mut points[idx].1;
        let metric: &'p str = &m.metric;
        match m.kind {
            MetricKind::Numeric => match v.value.to_number(m.data_type) {
                Some(n) if n.is_finite() => {
                    pv.numeric.insert(metric, n);
                }
                _ => bad += 1,
            },
            MetricKind::String => {
                pv.string.insert(metric, v.value.to_string_value());
            }
            MetricKind::Bool => match v.value.to_bool() {
                Some(b) => {
                    pv.boolean.insert(metric, b);
                }
                None => bad += 1,
            },
        }
    }
    points.retain(|(_, p)| !(p.numeric.is_empty() && p.string.is_empty() && p.boolean.is_empty()));
    (points, unmapped, bad)
}

/// Encodes the reply to `req`: piggybacked in an ACK for a CON (RFC 7252
/// §5.2.1), a NON response for a NON (§5.2.3).
fn encode_reply(req: &Message<'_>, r: &Reply, out: &mut Vec<u8>) {
    let mid = match req.mtype {
        MsgType::Con => req.message_id,
        _ => req.message_id.wrapping_add(0x8000),
    };
    let mut m = MessageBuilder::response_to(req.mtype, mid, r.code)
        .token(req.token)
        // RFC 7252 §5.5.2: diagnostic payload on error responses.
        .payload(r.diagnostic.as_bytes());
    if let Some(loc) = &r.location {
        m = m.location_segment(b"rd").location_segment(loc.as_bytes());
    }
    if let Some(a) = r.max_age {
        m = m.max_age(a);
    }
    m.encode(out);
}

#[cfg(test)]
mod tests;

//! The LwM2M server of one shard, sans-IO: the CoAP [`Exchanges`] layer, the
//! [`Registry`], the observation table and the telemetry mapping, composed.
//!
//! Inputs, each with the current time ([`Now`]) and, where the answer needs
//! the directory, the profiles or the sink, a [`Ctx`] taken once per batch:
//! * [`Server::handle_datagram`] / [`Server::handle_oversized`]: a datagram
//!   from a peer;
//! * [`Server::handle_timeout`]: when [`Server::poll_timeout`] is due;
//! * [`Server::handle_delivery`]: the broker's verdict on a tagged record;
//! * [`Server::handle_shard_msg`]: a message from another shard;
//! * [`Server::handle_control`]: a control-plane change (directory,
//!   profiles).
//!
//! Outputs: datagrams ([`Server::transmits`], then
//! [`Server::clear_transmits`]), records through the [`Sink`] in the
//! context, messages for other shards ([`Server::poll_shard_msg`]), and the
//! next deadline ([`Server::poll_timeout`]). Call order after any input:
//! drain `poll_shard_msg`, send `transmits`, sleep until `poll_timeout`.
//!
//! Behaviour follows RFC 7252 (messaging, via the exchange layer), RFC 7641
//! (Observe) and the LwM2M TS 1.1 Registration and Information Reporting
//! interfaces. Invariants:
//! * nothing here panics on network input, reads a clock or does I/O;
//! * a CON notification or Send is acknowledged only after its records were
//!   accepted by the sink, and by default ([`AckPolicy::Delivered`]) only
//!   after the broker confirmed them; when the sink is full, Send gets 5.03
//!   with Max-Age and CON notifications stay unacknowledged (the device
//!   retransmits, RFC 7252 §4.2);
//! * each notification sample is published at most once (MID
//!   deduplication plus the Observe window, `observe`), and exactly once
//!   when it was acknowledged;
//! * a registration lives on exactly one shard; the one with the newest
//!   [`Epoch`] survives when an endpoint registers on several at once;
//! * replies to peers without a registration carry no diagnostic payload
//!   and are never larger than the request (no amplification).

use super::content::{self, ResourcePath};
use super::endpoint::{
    Authorizer, DefaultAuthorizer, EndpointEntry, EndpointMap, Identity, Uplink,
};
use super::observe::{Freshness, Observation, ObservationState, ObserveWindow};
use super::output::{
    AckPolicy, DeliveryTag, PointSource, RegistrationInfo, Sink, SinkError, StatusEvent,
    TelemetryPoint,
};
use super::profile::{Profile, ProfileMap};
use super::registration::{
    self, home_shard, make_id, parse_location, path_ids, root_segments, Epoch, RegId, Registration,
    RegistrationState, Registry, Version,
};
use super::send;
use super::telemetry::build_points;
use crate::metrics::ShardMetrics;
use crate::proto::coap::exchange::{token_of, ExchangeConfig, Exchanges, Inbound, Token};
use crate::proto::coap::{self, Code, Message, MessageBuilder, MsgType, PeerId};
use crate::proto::FastMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The caller's clock: a monotonic instant for timers and wall-clock epoch ms
/// for timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub wall_ms: i64,
}

/// What the server reads and writes while handling one batch of input: the
/// directory and profile snapshots (taken once per batch, not per datagram)
/// and the sink.
pub struct Ctx<'a> {
    pub endpoints: &'a EndpointMap,
    pub profiles: &'a ProfileMap,
    pub sink: &'a mut dyn Sink,
}

/// Server behaviour (the CoAP and LwM2M parts of the gateway configuration).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shard: u16,
    pub shards: u16,
    pub exchange: ExchangeConfig,
    /// Max-Age sent with 5.03 when the sink is full.
    pub busy_max_age_s: u32,
    /// Seconds added to a registration's lifetime before it expires.
    pub lifetime_grace_s: u64,
    /// Smallest lifetime accepted; smaller values are raised to it.
    pub min_lifetime_s: u32,
    /// Largest datagram accepted (Size1 of a 4.13).
    pub max_datagram: usize,
    pub ack_policy: AckPolicy,
    /// Seed of the server's CSPRNG (registration ids, tokens, MIDs).
    pub seed: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shard: 0,
            shards: 1,
            exchange: ExchangeConfig::default(),
            busy_max_age_s: 5,
            lifetime_grace_s: 0,
            min_lifetime_s: 1,
            max_datagram: 2048,
            ack_policy: AckPolicy::Delivered,
            seed: 0,
        }
    }
}

/// A datagram handed to another shard.
#[derive(Debug, Clone)]
pub struct Datagram {
    pub peer: PeerId,
    pub identity: Option<Identity>,
    pub bytes: Box<[u8]>,
}

/// Messages between shards (explicit channels, never shared state).
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// `endpoint` registered with `epoch`: an older registration of it
    /// elsewhere is dropped silently (it is online here).
    Takeover { endpoint: Arc<str>, epoch: Epoch },
    /// Shard `from` received `request` for registration `id`: whoever holds
    /// it hands it over with [`ShardMsg::Adopt`].
    Claim {
        id: RegId,
        from: u16,
        request: Datagram,
        hops: u8,
    },
    /// The answer to a claim: the registration (or `None`), and the request
    /// to run on it.
    Adopt {
        id: RegId,
        state: Option<Box<RegistrationState>>,
        deprovisioned: bool,
        request: Datagram,
    },
    /// To the home shard: registration `id` now lives on `owner`.
    Homed { id: RegId, owner: u16, moves: u32 },
    /// To the home shard: registration `id` ended.
    Unhomed { id: RegId, moves: u32 },
}

/// Where a [`ShardMsg`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    Shard(u16),
    /// Every shard but this one.
    Others,
}

/// Control-plane changes the shards apply to their registrations.
#[derive(Debug, Clone)]
pub enum ControlMsg {
    /// These endpoints were provisioned, changed or removed.
    Endpoints(Arc<[String]>),
    /// Profiles were reloaded: observation sets follow.
    ProfilesChanged,
}

/// A shard's registrations as plain data (crash-safe snapshot contents).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardSnapshot {
    pub shard: u16,
    pub saved_at_ms: i64,
    pub lamport: u64,
    pub registrations: Vec<RegistrationState>,
    /// (id, owner, moves) of registrations homed here that live elsewhere.
    pub homed: Vec<(RegId, u16, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WriteAttributes,
    Observe,
    CancelObserve,
}

/// What one of our outstanding requests is for.
#[derive(Debug, Clone, Copy)]
struct Purpose {
    reg: RegId,
    path: ResourcePath,
    kind: Kind,
}

/// The answer to a message, held until the broker confirmed its records.
enum HeldReply {
    /// Empty ACK to a notification; its Observe number is recorded once the
    /// records are delivered (a failed delivery leaves it unrecorded, so the
    /// retransmission is published).
    EmptyAck { observed: Option<(Token, u32)> },
    /// 2.04 to a Send.
    Changed { token: SmallVec<[u8; 8]> },
}

struct PendingAck {
    peer: PeerId,
    mtype: MsgType,
    mid: u16,
    reply: HeldReply,
    remaining: u32,
    failed: bool,
}

/// A status event that could not be queued yet (sink full), kept as owned
/// data and retried.
struct OwnedStatus {
    endpoint: Arc<str>,
    entry: Arc<EndpointEntry>,
    status: &'static str,
    reason: &'static str,
    last_seen: i64,
    registration_id: String,
    lifetime_s: u32,
    binding: String,
    version: Version,
    queue_mode: bool,
    address: String,
    objects: Vec<String>,
    seq: u64,
}

/// Which LwM2M operation carried the values being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Notify,
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

enum Published {
    /// Nothing to publish (unmapped, or no profile).
    Nothing,
    /// The sink is full.
    Busy,
    /// `n` records queued.
    Queued(u32),
    /// The payload did not decode.
    Undecodable,
}

/// A path to observe with its pmin / pmax (Write-Attributes).
type ObserveSpec = (ResourcePath, Option<u32>, Option<u32>);

/// Request routing state: a request runs fresh, or after a claim came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Fresh,
    Claimed { deprovisioned: bool },
}

/// Why a registration ends (for the log and the status event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Deregistered,
    Expired,
    Deprovisioned,
    /// Replaced by a newer registration (here or on another shard): silent.
    Replaced,
    /// Handed to another shard: silent, no home bookkeeping.
    Moved,
}

/// At most `BURST` lines per kind every 10 s; the rest are counted.
struct LogLimiter {
    window: Option<Instant>,
    lines: u32,
    suppressed: u32,
}

const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            window: None,
            lines: 0,
            suppressed: 0,
        }
    }
    fn allow(&mut self, now: Instant, metrics: &ShardMetrics, shard: u16) -> bool {
        if self.window.is_none_or(|w| now >= w + LOG_WINDOW) {
            if self.suppressed > 0 {
                tracing::info!(
                    shard,
                    suppressed = self.suppressed,
                    "similar log lines suppressed in the last 10 s (see metrics)"
                );
            }
            self.window = Some(now);
            self.lines = 0;
            self.suppressed = 0;
        }
        if self.lines < LOG_BURST {
            self.lines += 1;
            true
        } else {
            self.suppressed += 1;
            ShardMetrics::inc(&metrics.log_lines_suppressed);
            false
        }
    }
}

pub struct Server {
    cfg: ServerConfig,
    metrics: Arc<ShardMetrics>,
    rng: StdRng,
    authorizer: Box<dyn Authorizer>,
    ex: Exchanges,
    regs: Registry,
    obs: FastMap<Token, Observation>,
    requests: FastMap<Token, Purpose>,
    acks: FastMap<DeliveryTag, PendingAck>,
    next_tag: DeliveryTag,
    backlog: VecDeque<OwnedStatus>,
    backlog_retry: Option<Instant>,
    shard_out: VecDeque<(Dest, ShardMsg)>,
    /// Registrations created here that live on another shard now:
    /// id → (owner, moves).
    homed: FastMap<RegId, (u16, u32)>,
    /// De-provisioned registrations: requests on them get 4.03 until then.
    tombstones: FastMap<RegId, Instant>,
    lamport: u64,
    refusals: LogLimiter,
    /// Registration state changed since the last snapshot.
    dirty: bool,
}

impl Server {
    pub fn new(cfg: ServerConfig, metrics: Arc<ShardMetrics>) -> Server {
        let mut rng = StdRng::seed_from_u64(
            cfg.seed ^ (cfg.shard as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let ex = Exchanges::new(cfg.exchange.clone(), rng.gen(), metrics.clone());
        Server {
            cfg,
            metrics,
            rng,
            authorizer: Box::new(DefaultAuthorizer),
            ex,
            regs: Registry::default(),
            obs: FastMap::default(),
            requests: FastMap::default(),
            acks: FastMap::default(),
            next_tag: 1,
            backlog: VecDeque::new(),
            backlog_retry: None,
            shard_out: VecDeque::new(),
            homed: FastMap::default(),
            tombstones: FastMap::default(),
            lamport: 0,
            refusals: LogLimiter::new(),
            dirty: false,
        }
    }

    /// Replaces the default authorizer.
    pub fn set_authorizer(&mut self, a: Box<dyn Authorizer>) {
        self.authorizer = a;
    }

    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }

    pub fn shard(&self) -> u16 {
        self.cfg.shard
    }

    pub fn registration_count(&self) -> usize {
        self.regs.len()
    }

    pub fn observation_count(&self) -> usize {
        self.obs.len()
    }

    /// The registration of `endpoint` held here: (location, address).
    pub fn registration_of(&self, endpoint: &str) -> Option<(String, PeerId)> {
        let r = self.regs.get(self.regs.by_endpoint(endpoint)?)?;
        Some((loc_string(r.id), r.peer))
    }

    /// Registrations created here that live on another shard now.
    pub fn homed_count(&self) -> usize {
        self.homed.len()
    }

    /// Records waiting for the broker before their message is acknowledged.
    pub fn awaiting_delivery(&self) -> usize {
        self.acks.len()
    }

    /// True once since the last call when registration state changed.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    // ------------------------------------------------------------ output

    pub fn transmits(&self) -> impl Iterator<Item = (PeerId, &[u8])> {
        self.ex.transmits()
    }

    pub fn has_transmits(&self) -> bool {
        self.ex.has_transmits()
    }

    pub fn clear_transmits(&mut self) {
        self.ex.clear_transmits()
    }

    pub fn poll_shard_msg(&mut self) -> Option<(Dest, ShardMsg)> {
        self.shard_out.pop_front()
    }

    fn send_to_shard(&mut self, shard: u16, msg: ShardMsg) {
        self.shard_out.push_back((Dest::Shard(shard), msg));
    }

    /// The earliest time [`Server::handle_timeout`] has work.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [
            self.ex.poll_timeout(),
            self.regs.next_expiry(),
            self.backlog_retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ------------------------------------------------------------ input

    /// One datagram from `peer`; `identity` is what its transport
    /// established (`None` on plain UDP).
    pub fn handle_datagram(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        data: &[u8],
    ) {
        ShardMetrics::inc(&self.metrics.datagrams_rx);
        ShardMetrics::add(&self.metrics.bytes_rx, data.len() as u64);
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.malformed);
                tracing::trace!(%peer, error = %e, "malformed datagram dropped");
                // RFC 7252 §4.2: a CON with a message format error is rejected
                // with RST; other types are silently ignored (§4.3); version
                // mismatches are silently ignored (§3). The RST (4 bytes) is
                // never larger than what came in.
                if let Some(h) = coap::Header::peek(data) {
                    if h.version == coap::VERSION && h.mtype == MsgType::Con {
                        self.ex.reset_stateless(peer, h.message_id);
                    }
                }
                return;
            }
        };
        match self.ex.handle(now.instant, peer, &msg) {
            Inbound::Consumed => {}
            Inbound::Request => self.on_request(now, ctx, peer, identity, &msg, data, Route::Fresh),
            Inbound::Response {
                token, separate, ..
            } => self.on_response(now, ctx, peer, &msg, token, separate),
            Inbound::Unsolicited => self.on_notification(now, ctx, peer, &msg),
        }
        self.drain_failures();
    }

    /// A datagram larger than `max_datagram` arrived; `prefix` is what fit.
    /// It is dropped and counted; a CON request whose header and options
    /// survived gets 4.13 Request Entity Too Large with Size1 = the limit
    /// (RFC 7252 §5.9.2.9, RFC 7959 §2.9.3).
    pub fn handle_oversized(&mut self, now: Now, peer: PeerId, prefix: &[u8]) {
        ShardMetrics::inc(&self.metrics.datagrams_rx);
        ShardMetrics::inc(&self.metrics.oversized);
        let Ok(msg) = Message::decode(prefix) else {
            return;
        };
        if msg.mtype == MsgType::Con && msg.code.is_request() {
            let reply = MessageBuilder::new(MsgType::Ack, Code::REQUEST_ENTITY_TOO_LARGE)
                .token(msg.token)
                .size1(self.cfg.max_datagram as u32);
            let protected = self.regs.by_peer(&peer).is_some();
            self.ex
                .respond(now.instant, peer, &msg, reply, false, protected);
        }
    }

    // ------------------------------------------------------------ requests

    #[allow(clippy::too_many_arguments)]
    fn on_request(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        raw: &[u8],
        route: Route,
    ) {
        let protected = self.regs.by_peer(&peer).is_some();
        if let Some(n) = msg.unknown_critical_option() {
            // RFC 7252 §5.4.1.
            ShardMetrics::inc(&self.metrics.bad_option);
            tracing::debug!(%peer, option = n, "unknown critical option");
            return self.reply_error(
                now,
                peer,
                msg,
                Code::BAD_OPTION,
                "unknown critical option",
                protected,
            );
        }
        let mut path = msg.uri_path();
        let first = path.next();
        let second = path.next();
        let third = path.next();
        match (first, second, third, msg.code) {
            (Some(b"rd"), None, None, Code::POST) => {
                self.register(now, ctx, peer, identity, msg, protected)
            }
            (Some(b"rd"), Some(loc), None, Code::POST | Code::DELETE) => {
                let Some(id) = parse_location(loc) else {
                    ShardMetrics::inc(&self.metrics.update_unknown);
                    return self.reply_error(
                        now,
                        peer,
                        msg,
                        Code::NOT_FOUND,
                        "unknown registration",
                        protected,
                    );
                };
                if !self.regs.contains(id) {
                    return self
                        .route_elsewhere(now, peer, identity, msg, raw, id, route, protected);
                }
                if msg.code == Code::POST {
                    self.update(now, ctx, peer, identity, msg, id)
                } else {
                    self.deregister(now, ctx, peer, identity, msg, id)
                }
            }
            (Some(b"rd"), _, None, _) => self.reply_error(
                now,
                peer,
                msg,
                Code::METHOD_NOT_ALLOWED,
                "method not allowed",
                protected,
            ),
            (Some(b"dp"), None, None, Code::POST) => self.send(now, ctx, peer, identity, msg),
            (Some(b"dp"), None, None, _) => self.reply_error(
                now,
                peer,
                msg,
                Code::METHOD_NOT_ALLOWED,
                "method not allowed",
                protected,
            ),
            _ => {
                ShardMetrics::inc(&self.metrics.requests_not_found);
                self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::NOT_FOUND,
                    "no such resource",
                    protected,
                )
            }
        }
    }

    /// Replies with an error code. RFC 7252 §5.5.2 allows a diagnostic
    /// payload; it goes only to registered peers, so a spoofed request never
    /// gets a larger answer than it was.
    fn reply_error(
        &mut self,
        now: Now,
        peer: PeerId,
        msg: &Message<'_>,
        code: Code,
        diagnostic: &'static str,
        protected: bool,
    ) {
        let mut b = MessageBuilder::new(MsgType::Ack, code).token(msg.token);
        if protected {
            b = b.payload(diagnostic.as_bytes());
        }
        self.ex.respond(now.instant, peer, msg, b, true, protected);
    }

    /// 5.03 with Max-Age (RFC 7252 §5.9.3.4), not cached: the retry after
    /// Max-Age is processed anew.
    fn reply_busy(&mut self, now: Now, peer: PeerId, msg: &Message<'_>, protected: bool) {
        ShardMetrics::inc(&self.metrics.busy_responses);
        let b = MessageBuilder::new(MsgType::Ack, Code::SERVICE_UNAVAILABLE)
            .token(msg.token)
            .max_age(self.cfg.busy_max_age_s);
        self.ex.respond(now.instant, peer, msg, b, false, protected);
    }

    fn refused(&mut self, now: Now) -> bool {
        self.refusals
            .allow(now.instant, &self.metrics, self.cfg.shard)
    }

    /// A request for a registration this shard does not hold: ask the shard
    /// that does (the home shard named by the id, or where the home shard's
    /// pointer says it went). The request is held meanwhile, so the device's
    /// retransmissions are dropped until the answer is decided.
    #[allow(clippy::too_many_arguments)]
    fn route_elsewhere(
        &mut self,
        now: Now,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        raw: &[u8],
        id: RegId,
        route: Route,
        protected: bool,
    ) {
        let deprovisioned = match route {
            Route::Claimed { deprovisioned } => deprovisioned,
            Route::Fresh => false,
        };
        if deprovisioned || self.tombstones.contains_key(&id) {
            ShardMetrics::inc(&self.metrics.update_unknown);
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint no longer provisioned",
                protected,
            );
        }
        let home = self.home_of(id);
        let target = if home == self.cfg.shard {
            self.homed.get(&id).map(|(owner, _)| *owner)
        } else {
            Some(home)
        };
        match (route, target) {
            (Route::Fresh, Some(t)) if t != self.cfg.shard => {
                self.ex.hold(now.instant, peer, msg.message_id, protected);
                ShardMetrics::inc(&self.metrics.claims_sent);
                self.send_to_shard(
                    t,
                    ShardMsg::Claim {
                        id,
                        from: self.cfg.shard,
                        request: Datagram {
                            peer,
                            identity: identity.cloned(),
                            bytes: raw.into(),
                        },
                        hops: 0,
                    },
                );
            }
            _ => {
                // Unknown here and everywhere we can ask (expired, replaced):
                // 4.04 makes the client register again (TS 1.1 Transport
                // §6.2.2).
                ShardMetrics::inc(&self.metrics.update_unknown);
                self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::NOT_FOUND,
                    "unknown registration",
                    protected,
                )
            }
        }
    }

    /// The home shard of `id`, folded onto the current shard count (ids from
    /// a snapshot written with more shards).
    fn home_of(&self, id: RegId) -> u16 {
        home_shard(id) % self.cfg.shards.max(1)
    }

    fn next_epoch(&mut self, now: Now) -> Epoch {
        self.lamport = (self.lamport + 1).max(now.wall_ms.max(0) as u64 * 1000);
        Epoch {
            counter: self.lamport,
            shard: self.cfg.shard,
        }
    }

    /// LwM2M TS 1.1 Transport §6.2.1 Register: `POST /rd?ep=..` → 2.01
    /// Created with Location-Path `rd/{id}`.
    fn register(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        protected: bool,
    ) {
        let req = match registration::parse_register_request(msg) {
            Ok(r) => r,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                tracing::debug!(%peer, error = %e, "register refused");
                return self.reply_error(now, peer, msg, e.code(), e.diagnostic(), protected);
            }
        };
        let endpoint = req.params.endpoint.as_str();
        let Some(entry) = ctx.endpoints.get(endpoint).cloned() else {
            ShardMetrics::inc(&self.metrics.register_rejected_unknown_endpoint);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint, "register refused: endpoint not provisioned (4.03)");
            }
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint not provisioned",
                protected,
            );
        };
        if let Err(d) = self
            .authorizer
            .authorize(Uplink::Register { endpoint }, &entry, identity)
        {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint, reason = %d, "register refused (4.03)");
            }
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", protected);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, protected);
        }
        let endpoint: Arc<str> = Arc::from(endpoint);
        if let Some(old) = self.regs.by_endpoint(&endpoint) {
            ShardMetrics::inc(&self.metrics.registrations_replaced);
            self.end_registration(now, ctx, old, End::Replaced);
        }
        if let Some(old) = self.regs.by_peer(&peer) {
            // Another endpoint used this address before: it is gone from here.
            self.end_registration(now, ctx, old, End::Replaced);
        }
        let id = loop {
            let id = make_id(self.cfg.shard, self.rng.gen());
            if !self.regs.contains(id) && !self.homed.contains_key(&id) {
                break id;
            }
        };
        let lifetime_s = req.params.lifetime_s.max(self.cfg.min_lifetime_s);
        let epoch = self.next_epoch(now);
        let mut reg = Registration {
            id,
            endpoint: endpoint.clone(),
            entry,
            peer,
            lifetime_s,
            binding: req.params.binding.into_boxed_str(),
            version: Version::parse(&req.params.version),
            queue_mode: req.params.queue_mode,
            root_path: req.links.root_path.into_boxed_str(),
            objects: req
                .links
                .objects
                .iter()
                .map(|o| (o.object, o.instance))
                .collect(),
            registered_at_ms: now.wall_ms,
            last_seen_ms: now.wall_ms,
            expires_at: self.expiry_for(now, lifetime_s),
            epoch,
            moves: 0,
            status_seq: 0,
            observations: SmallVec::new(),
        };
        match publish_status(ctx.sink, &mut reg, "online", "registered", now.wall_ms) {
            Ok(()) => ShardMetrics::inc(&self.metrics.status_published),
            Err(SinkError::Full) => return self.reply_busy(now, peer, msg, protected),
            Err(SinkError::Rejected) => {
                return self.reply_error(
                    now,
                    peer,
                    msg,
                    Code::INTERNAL_SERVER_ERROR,
                    "status publish failed",
                    protected,
                )
            }
        }
        ShardMetrics::inc(&self.metrics.registrations);
        tracing::info!(
            shard = self.cfg.shard,
            endpoint = %endpoint,
            device_id = %reg.entry.device_id,
            location = %loc_string(id),
            %peer,
            lifetime_s,
            "registered"
        );
        self.regs.insert(reg);
        self.dirty = true;
        self.update_gauges();
        let loc = registration::location(id);
        let b = MessageBuilder::new(MsgType::Ack, Code::CREATED)
            .token(msg.token)
            .location_segment(b"rd")
            .location_segment(&loc);
        self.ex.respond(now.instant, peer, msg, b, true, true);
        if self.cfg.shards > 1 {
            self.shard_out
                .push_back((Dest::Others, ShardMsg::Takeover { endpoint, epoch }));
        }
        self.plan_observations(now, ctx, id);
    }

    fn expiry_for(&self, now: Now, lifetime_s: u32) -> Instant {
        now.instant + Duration::from_secs(lifetime_s as u64 + self.cfg.lifetime_grace_s)
    }

    /// LwM2M TS 1.1 Transport §6.2.2 Update: `POST /rd/{id}?lt=..&b=..`. An
    /// Update from a new address moves the registration there (TS 1.1
    /// Transport §6.5: a client whose address may have changed starts with
    /// an Update).
    fn update(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        id: RegId,
    ) {
        let protected = true;
        let req = match registration::parse_update_request(msg) {
            Ok(r) => r,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.register_rejected_bad_request);
                return self.reply_error(now, peer, msg, e.code(), e.diagnostic(), protected);
            }
        };
        let Some(endpoint) = self.regs.get(id).map(|r| r.endpoint.clone()) else {
            return self.reply_error(
                now,
                peer,
                msg,
                Code::NOT_FOUND,
                "unknown registration",
                protected,
            );
        };
        let Some(entry) = ctx.endpoints.get(&*endpoint).cloned() else {
            // De-provisioned while the control message is still on its way.
            self.deprovision(now, ctx, id);
            return self.reply_error(
                now,
                peer,
                msg,
                Code::FORBIDDEN,
                "endpoint no longer provisioned",
                protected,
            );
        };
        if let Err(d) = self.authorizer.authorize(
            Uplink::Update {
                endpoint: &endpoint,
            },
            &entry,
            identity,
        ) {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, endpoint = %endpoint, reason = %d, "update refused (4.03)");
            }
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", false);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, protected);
        }
        let min_lt = self.cfg.min_lifetime_s;
        let grace = self.cfg.lifetime_grace_s;
        let old_peer = {
            let Some(reg) = self.regs.get_mut(id) else {
                return;
            };
            if let Some(lt) = req.params.lifetime_s {
                reg.lifetime_s = lt.max(min_lt);
            }
            if let Some(b) = req.params.binding {
                reg.queue_mode = b.contains('Q');
                reg.binding = b.into_boxed_str();
            }
            if let Some(l) = req.links {
                reg.root_path = l.root_path.into_boxed_str();
                reg.objects = l.objects.iter().map(|o| (o.object, o.instance)).collect();
            }
            reg.entry = entry;
            reg.last_seen_ms = now.wall_ms;
            reg.peer
        };
        if old_peer != peer {
            if let Some(other) = self.regs.by_peer(&peer).filter(|o| *o != id) {
                // The address belonged to another registration: that device
                // is gone from it.
                self.end_registration(now, ctx, other, End::Replaced);
            }
            tracing::info!(shard = self.cfg.shard, endpoint = %endpoint, old = %old_peer, new = %peer, "device address changed");
            ShardMetrics::inc(&self.metrics.address_changes);
            self.regs.rebind(id, peer);
            self.ex.rebind_peer(old_peer, peer);
        }
        let lifetime_s = self.regs.get(id).map(|r| r.lifetime_s).unwrap_or(0);
        self.regs.set_expiry(
            id,
            now.instant + Duration::from_secs(lifetime_s as u64 + grace),
        );
        if let Some(reg) = self.regs.get_mut(id) {
            if publish_status(ctx.sink, reg, "online", "updated", now.wall_ms).is_ok() {
                ShardMetrics::inc(&self.metrics.status_published);
            }
        }
        ShardMetrics::inc(&self.metrics.updates);
        self.dirty = true;
        let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(msg.token);
        self.ex.respond(now.instant, peer, msg, b, true, true);
        // New objects, a changed profile, an observation that failed or was
        // lost on the way from another shard: catch up now.
        self.plan_observations(now, ctx, id);
    }

    /// LwM2M TS 1.1 Transport §6.2.3 De-register: `DELETE /rd/{id}` → 2.02.
    fn deregister(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
        id: RegId,
    ) {
        let Some(reg) = self.regs.get(id) else {
            return self.reply_error(
                now,
                peer,
                msg,
                Code::NOT_FOUND,
                "unknown registration",
                false,
            );
        };
        if self
            .authorizer
            .authorize(
                Uplink::Deregister {
                    endpoint: &reg.endpoint,
                },
                &reg.entry,
                identity,
            )
            .is_err()
        {
            ShardMetrics::inc(&self.metrics.register_rejected_unauthorized);
            return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", false);
        }
        if !ctx.sink.has_capacity(1) {
            return self.reply_busy(now, peer, msg, true);
        }
        self.end_registration(now, ctx, id, End::Deregistered);
        ShardMetrics::inc(&self.metrics.deregistrations);
        let b = MessageBuilder::new(MsgType::Ack, Code::DELETED).token(msg.token);
        self.ex.respond(now.instant, peer, msg, b, true, true);
    }

    /// Ends a registration here: its observations and requests go, a status
    /// event says why (except for replacements and moves), the home shard
    /// forgets its pointer.
    fn end_registration(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        id: RegId,
        why: End,
    ) -> Option<Registration> {
        let mut reg = self.regs.remove(id)?;
        for t in &reg.observations {
            self.obs.remove(t);
        }
        for (tok, _) in self.ex.pending_for(&reg.peer) {
            self.requests.remove(&tok);
        }
        self.ex.forget_peer(&reg.peer);
        self.dirty = true;
        let (status, reason) = match why {
            End::Deregistered => ("offline", "deregistered"),
            End::Expired => ("offline", "expired"),
            End::Deprovisioned => ("offline", "deprovisioned"),
            End::Replaced | End::Moved => ("", ""),
        };
        if !status.is_empty() {
            match publish_status(ctx.sink, &mut reg, status, reason, now.wall_ms) {
                Ok(()) => ShardMetrics::inc(&self.metrics.status_published),
                Err(SinkError::Full) => self.defer_status(now, &reg, status, reason),
                Err(SinkError::Rejected) => {}
            }
            tracing::info!(
                shard = self.cfg.shard,
                endpoint = %reg.endpoint,
                device_id = %reg.entry.device_id,
                location = %loc_string(id),
                reason,
                "registration ended"
            );
        }
        if why != End::Moved && self.home_of(id) != self.cfg.shard {
            self.send_to_shard(
                self.home_of(id),
                ShardMsg::Unhomed {
                    id,
                    moves: reg.moves,
                },
            );
        }
        if why != End::Moved && self.home_of(id) == self.cfg.shard {
            self.homed.remove(&id);
        }
        self.update_gauges();
        Some(reg)
    }

    fn deprovision(&mut self, now: Now, ctx: &mut Ctx<'_>, id: RegId) {
        if let Some(reg) = self.end_registration(now, ctx, id, End::Deprovisioned) {
            ShardMetrics::inc(&self.metrics.deprovisioned);
            let until = now.instant
                + Duration::from_secs(reg.lifetime_s as u64 + self.cfg.lifetime_grace_s);
            self.tombstones.insert(id, until);
        }
    }

    fn defer_status(
        &mut self,
        now: Now,
        reg: &Registration,
        status: &'static str,
        reason: &'static str,
    ) {
        self.backlog.push_back(OwnedStatus {
            endpoint: reg.endpoint.clone(),
            entry: reg.entry.clone(),
            status,
            reason,
            last_seen: reg.last_seen_ms,
            registration_id: loc_string(reg.id),
            lifetime_s: reg.lifetime_s,
            binding: reg.binding.to_string(),
            version: reg.version,
            queue_mode: reg.queue_mode,
            address: reg.peer.to_string(),
            objects: reg.object_links(),
            seq: reg.status_seq,
        });
        self.backlog_retry = Some(now.instant + Duration::from_millis(100));
    }

    /// LwM2M 1.1 Send (`POST /dp`, SenML).
    fn send(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
    ) {
        ShardMetrics::inc(&self.metrics.send_rx);
        let Some(id) = self.regs.by_peer(&peer) else {
            return self.reply_error(now, peer, msg, Code::NOT_FOUND, "not registered", false);
        };
        if let Some(reg) = self.regs.get(id) {
            if self
                .authorizer
                .authorize(
                    Uplink::Send {
                        endpoint: &reg.endpoint,
                    },
                    &reg.entry,
                    identity,
                )
                .is_err()
            {
                return self.reply_error(now, peer, msg, Code::FORBIDDEN, "not authorized", true);
            }
        }
        if let Err(e) = send::content_format(msg) {
            return self.reply_error(
                now,
                peer,
                msg,
                e.code(),
                "Send takes SenML JSON or CBOR",
                true,
            );
        }
        if let Some(reg) = self.regs.get_mut(id) {
            reg.last_seen_ms = now.wall_ms;
        }
        let tag = self.tag_for(msg.mtype);
        match self.publish(now, ctx, id, send::ROOT, msg, Operation::Send, tag) {
            Published::Busy => self.reply_busy(now, peer, msg, true),
            Published::Undecodable => self.reply_error(
                now,
                peer,
                msg,
                Code::BAD_REQUEST,
                "undecodable payload",
                true,
            ),
            Published::Queued(n) if tag.is_some() => {
                self.ex.hold(now.instant, peer, msg.message_id, true);
                self.await_delivery(
                    tag,
                    n,
                    peer,
                    msg,
                    HeldReply::Changed {
                        token: SmallVec::from_slice(msg.token),
                    },
                );
            }
            Published::Queued(_) | Published::Nothing => {
                let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(msg.token);
                self.ex.respond(now.instant, peer, msg, b, true, true);
            }
        }
    }

    /// A delivery tag when this message's answer waits for the broker.
    fn tag_for(&mut self, mtype: MsgType) -> Option<DeliveryTag> {
        if self.cfg.ack_policy == AckPolicy::Delivered && mtype == MsgType::Con {
            let t = self.next_tag;
            self.next_tag += 1;
            Some(t)
        } else {
            None
        }
    }

    fn await_delivery(
        &mut self,
        tag: Option<DeliveryTag>,
        n: u32,
        peer: PeerId,
        msg: &Message<'_>,
        reply: HeldReply,
    ) {
        let Some(tag) = tag else { return };
        self.acks.insert(
            tag,
            PendingAck {
                peer,
                mtype: msg.mtype,
                mid: msg.message_id,
                reply,
                remaining: n,
                failed: false,
            },
        );
        ShardMetrics::set(&self.metrics.acks_awaiting_delivery, self.acks.len() as i64);
    }

    /// The broker's verdict on a record tagged `tag`. When every record of a
    /// held message is delivered, the message is acknowledged; when one
    /// failed, it is released unanswered so the device's retransmission is
    /// processed again (RFC 7252 §4.2).
    pub fn handle_delivery(&mut self, now: Now, tag: DeliveryTag, ok: bool) {
        let Some(p) = self.acks.get_mut(&tag) else {
            return;
        };
        p.remaining = p.remaining.saturating_sub(1);
        p.failed |= !ok;
        if p.remaining > 0 {
            return;
        }
        let Some(p) = self.acks.remove(&tag) else {
            return;
        };
        ShardMetrics::set(&self.metrics.acks_awaiting_delivery, self.acks.len() as i64);
        if p.failed {
            ShardMetrics::inc(&self.metrics.acks_withheld_delivery_failed);
            self.ex.release(p.peer, p.mid);
            return;
        }
        let protected = self.regs.by_peer(&p.peer).is_some();
        match p.reply {
            HeldReply::EmptyAck { observed } => {
                if let Some((tok, seq)) = observed {
                    if let Some(o) = self.obs.get_mut(&tok) {
                        o.window.record(now.instant, seq);
                    }
                }
                self.ex.ack(now.instant, p.peer, p.mtype, p.mid, protected)
            }
            HeldReply::Changed { token } => {
                let b = MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(&token);
                self.ex
                    .respond_to(now.instant, p.peer, p.mtype, p.mid, b, true, protected);
            }
        }
    }

    // ------------------------------------------------------------ observe

    /// Brings the observations of `id` in line with its profile and objects:
    /// Write-Attributes (when the profile asks) and Observe for each wanted
    /// path not observed or requested yet (TS 1.1 Core §5.4.4, §5.5.1; RFC
    /// 7641 §3.1), and a cancel (GET with Observe = 1 on the same token, RFC
    /// 7641 §3.6) for each observed path no longer wanted. The exchange layer
    /// sends them one at a time (NSTART).
    fn plan_observations(&mut self, now: Now, ctx: &mut Ctx<'_>, id: RegId) {
        let Some(reg) = self.regs.get(id) else { return };
        let Some(profile) = Profile::lookup(ctx.profiles, &reg.entry.profile) else {
            return;
        };
        let established: SmallVec<[(ResourcePath, Token); 8]> = reg
            .observations
            .iter()
            .filter_map(|t| self.obs.get(t).map(|o| (o.path, *t)))
            .collect();
        let requested: SmallVec<[ResourcePath; 8]> = self
            .ex
            .pending_for(&reg.peer)
            .iter()
            .filter_map(|(t, _)| self.requests.get(t))
            .filter(|p| p.reg == id && p.kind == Kind::Observe)
            .map(|p| p.path)
            .collect();
        let wanted: SmallVec<[ObserveSpec; 8]> = profile
            .observe
            .iter()
            .filter(|(p, _, _)| reg.has_object(p.object, p.instance))
            .copied()
            .collect();
        for (path, pmin, pmax) in &wanted {
            if established.iter().any(|(p, _)| p == path) || requested.contains(path) {
                continue;
            }
            if pmin.is_some() || pmax.is_some() {
                let mut q: SmallVec<[String; 2]> = SmallVec::new();
                if let Some(v) = pmin {
                    q.push(format!("pmin={v}"));
                }
                if let Some(v) = pmax {
                    q.push(format!("pmax={v}"));
                }
                self.send_request(
                    now,
                    id,
                    Code::PUT,
                    *path,
                    &q,
                    None,
                    Kind::WriteAttributes,
                    None,
                );
            }
            self.send_request(now, id, Code::GET, *path, &[], Some(0), Kind::Observe, None);
        }
        for (path, tok) in established {
            if wanted.iter().any(|(p, _, _)| *p == path) {
                continue;
            }
            self.obs.remove(&tok);
            if let Some(r) = self.regs.get_mut(id) {
                r.observations.retain(|t| *t != tok);
            }
            ShardMetrics::inc(&self.metrics.observe_cancelled);
            self.dirty = true;
            self.send_request(
                now,
                id,
                Code::GET,
                path,
                &[],
                Some(1),
                Kind::CancelObserve,
                Some(tok),
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_request(
        &mut self,
        now: Now,
        id: RegId,
        code: Code,
        path: ResourcePath,
        queries: &[String],
        observe: Option<u32>,
        kind: Kind,
        token: Option<Token>,
    ) {
        let Some(reg) = self.regs.get(id) else { return };
        let peer = reg.peer;
        let root = reg.root_path.clone();
        let token = token.unwrap_or_else(|| {
            let obs = &self.obs;
            self.ex.alloc_token(|t| obs.contains_key(&t))
        });
        let tb = token.to_be_bytes();
        let mut b = MessageBuilder::request(code, true).token(&tb);
        for seg in root_segments(&root) {
            b = b.path_segment(seg.as_bytes());
        }
        for i in path_ids(&path) {
            b = b.path_id(i);
        }
        for q in queries {
            b = b.query(q);
        }
        if let Some(o) = observe {
            b = b.observe(o);
        }
        self.ex.request(now.instant, peer, token, b, token);
        self.requests.insert(
            token,
            Purpose {
                reg: id,
                path,
                kind,
            },
        );
    }

    fn drain_failures(&mut self) {
        while let Some(f) = self.ex.poll_failed() {
            if let Some(p) = self.requests.remove(&f.token) {
                if p.kind == Kind::Observe {
                    ShardMetrics::inc(&self.metrics.observe_failed);
                    tracing::debug!(peer = %f.peer, path = %p.path, reason = ?f.reason, "observe request failed");
                }
            }
        }
    }

    /// The response to one of our requests.
    fn on_response(
        &mut self,
        now: Now,
        ctx: &mut Ctx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
        token: Token,
        separate: bool,
    ) {
        let Some(p) = self.requests.remove(&token) else {
            if separate {
                self.ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, false);
            }
            return;
        };
        match p.kind {
            Kind::WriteAttributes | Kind::CancelObserve => {
                if !msg.code.is_success() {
                    tracing::debug!(%peer, code = %msg.code, kind = ?p.kind, "request refused by the device");
                }
                if separate {
                    self.ex
                        .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                }
            }
            Kind::Observe => {
                if !msg.code.is_success() || !self.regs.contains(p.reg) {
                    if !msg.code.is_success() {
                        ShardMetrics::inc(&self.metrics.observe_failed);
                    }
                    if separate {
                        self.ex
                            .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                    }
                    return;
                }
                let mut window = ObserveWindow::default();
                if let Some(seq) = msg.observe() {
                    // RFC 7641 §3.2: an Observe option in the response means
                    // the observation is established.
                    window.record(now.instant, seq);
                    ShardMetrics::inc(&self.metrics.observe_established);
                    self.obs.insert(
                        token,
                        Observation {
                            reg: p.reg,
                            path: p.path,
                            window,
                        },
                    );
                    if let Some(r) = self.regs.get_mut(p.reg) {
                        r.observations.push(token);
                    }
                    self.dirty = true;
                }
                // The response carries the current value: publish it too.
                let tag = if separate {
                    self.tag_for(msg.mtype)
                } else {
                    None
                };
                match self.publish(now, ctx, p.reg, p.path, msg, Operation::Notify, tag) {
                    Published::Queued(n) if tag.is_some() => {
                        self.ex.hold(now.instant, peer, msg.message_id, true);
                        self.await_delivery(
                            tag,
                            n,
                            peer,
                            msg,
                            HeldReply::EmptyAck { observed: None },
                        );
                    }
                    Published::Busy if separate && msg.mtype == MsgType::Con => {
                        ShardMetrics::inc(&self.metrics.notifications_deferred_busy);
                        self.ex.ignore(peer, msg.message_id);
                    }
                    other => {
                        if matches!(other, Published::Busy) {
                            // A piggybacked response cannot be withheld; the
                            // next notification carries a fresh value.
                            ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                        }
                        if separate {
                            self.ex
                                .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                        }
                    }
                }
            }
        }
    }

    /// An Observe notification (RFC 7641 §4.2), matched by token *and* peer
    /// (RFC 7252 §5.3.2): a token from another peer is not this device's.
    fn on_notification(&mut self, now: Now, ctx: &mut Ctx<'_>, peer: PeerId, msg: &Message<'_>) {
        // One lookup of the observation: its registration, path and what
        // the Observe number means for it.
        let seq = msg.observe();
        let Some((token, reg_id, path, fresh)) = token_of(msg.token).and_then(|t| {
            self.obs.get(&t).map(|o| {
                let f = seq.map_or(Freshness::Fresh, |s| o.window.check(now.instant, s));
                (t, o.reg, o.path, f)
            })
        }) else {
            // RFC 7641 §3.6: a notification we have no interest in is
            // rejected with RST, which removes the observer on the device.
            ShardMetrics::inc(&self.metrics.notifications_unknown);
            let protected = self.regs.by_peer(&peer).is_some();
            if protected {
                self.ex.reset(now.instant, peer, msg.message_id, true);
            } else {
                self.ex.reset_stateless(peer, msg.message_id);
            }
            return;
        };
        let Some(reg) = self.regs.get_mut(reg_id) else {
            self.obs.remove(&token);
            self.ex.reset_stateless(peer, msg.message_id);
            return;
        };
        if reg.peer != peer {
            let reg_peer = reg.peer;
            ShardMetrics::inc(&self.metrics.notifications_wrong_peer);
            if self.refused(now) {
                tracing::info!(shard = self.cfg.shard, %peer, device = %reg_peer, "notification with a known token from another address rejected (RST)");
            }
            self.ex.reset_stateless(peer, msg.message_id);
            return;
        }
        ShardMetrics::inc(&self.metrics.notifications_rx);
        if msg.unknown_critical_option().is_some() {
            // RFC 7252 §5.4.1: an unrecognised critical option in a CON or
            // NON response rejects it.
            self.ex.reset(now.instant, peer, msg.message_id, true);
            return;
        }
        if !msg.code.is_success() {
            // RFC 7641 §3.2: a non-2.xx notification ends the observation.
            reg.observations.retain(|t| *t != token);
            self.obs.remove(&token);
            self.dirty = true;
            self.ex
                .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            return;
        }
        match fresh {
            Freshness::Duplicate => {
                ShardMetrics::inc(&self.metrics.notifications_duplicate);
                return self
                    .ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
            Freshness::Stale => {
                ShardMetrics::inc(&self.metrics.notifications_stale);
                return self
                    .ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
            Freshness::Reordered => ShardMetrics::inc(&self.metrics.notifications_reordered),
            Freshness::Fresh => {}
        }
        reg.last_seen_ms = now.wall_ms;
        let tag = self.tag_for(msg.mtype);
        let outcome = self.publish(now, ctx, reg_id, path, msg, Operation::Notify, tag);
        let record = |s: &mut Server| {
            if let (Some(seq), Some(o)) = (seq, s.obs.get_mut(&token)) {
                o.window.record(now.instant, seq);
            }
        };
        match outcome {
            Published::Busy => {
                if msg.mtype == MsgType::Con {
                    // Not acknowledged, not recorded: the device retransmits
                    // and the retry is processed.
                    ShardMetrics::inc(&self.metrics.notifications_deferred_busy);
                    self.ex.ignore(peer, msg.message_id);
                } else {
                    ShardMetrics::inc(&self.metrics.notifications_dropped_busy);
                    record(self);
                    self.ex
                        .ack(now.instant, peer, msg.mtype, msg.message_id, true);
                }
            }
            Published::Queued(n) if tag.is_some() => {
                self.ex.hold(now.instant, peer, msg.message_id, true);
                let observed = seq.map(|s| (token, s));
                self.await_delivery(tag, n, peer, msg, HeldReply::EmptyAck { observed });
            }
            Published::Queued(_) | Published::Nothing | Published::Undecodable => {
                // Undecodable: acknowledged, since retrying the same bytes
                // cannot succeed (counted in decode_errors).
                record(self);
                self.ex
                    .ack(now.instant, peer, msg.mtype, msg.message_id, true);
            }
        }
    }

    /// Decodes a payload, maps it through the device profile and publishes
    /// the resulting TelemetryPoints (one per distinct timestamp).
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        now: Now,
        ctx: &mut Ctx<'_>,
        id: RegId,
        base: ResourcePath,
        msg: &Message<'_>,
        op: Operation,
        tag: Option<DeliveryTag>,
    ) -> Published {
        let Some(reg) = self.regs.get(id) else {
            return Published::Nothing;
        };
        let cf = msg.content_format().unwrap_or(if op == Operation::Send {
            content::CF_SENML_CBOR
        } else if base.resource.is_some() {
            content::CF_TEXT
        } else {
            content::CF_TLV
        });
        let values = match content::decode(cf, base, msg.payload, now.wall_ms) {
            Ok(v) => v,
            Err(e) => {
                ShardMetrics::inc(&self.metrics.decode_errors);
                tracing::debug!(endpoint = %reg.endpoint, error = %e, "payload decode failed");
                return Published::Undecodable;
            }
        };
        let Some(profile) = Profile::lookup(ctx.profiles, &reg.entry.profile) else {
            return Published::Nothing;
        };
        let pts = build_points(profile, &values, now.wall_ms);
        ShardMetrics::add(&self.metrics.unmapped_values, pts.unmapped as u64);
        ShardMetrics::add(&self.metrics.decode_errors, pts.bad as u64);
        if pts.points.is_empty() {
            return Published::Nothing;
        }
        if !ctx.sink.has_capacity(pts.points.len()) {
            return Published::Busy;
        }
        let text = base.text();
        let path = match op {
            Operation::Send => "/dp",
            Operation::Notify => text.as_str(),
        };
        let loc = registration::location(id);
        let loc = std::str::from_utf8(&loc).unwrap_or("");
        let mut queued = 0u32;
        for (ts, p) in &pts.points {
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
                    operation: op.as_str(),
                    path,
                    content_format: cf,
                    observe_seq: msg.observe(),
                    shard: self.cfg.shard as usize,
                    registration_id: loc,
                },
            };
            match ctx.sink.publish_telemetry(&tp, tag) {
                Ok(()) => {
                    ShardMetrics::inc(&self.metrics.points_published);
                    queued += 1;
                }
                Err(SinkError::Full) if queued == 0 => return Published::Busy,
                Err(_) => ShardMetrics::inc(&self.metrics.kafka_enqueue_failed),
            }
        }
        if queued == 0 {
            Published::Nothing
        } else {
            Published::Queued(queued)
        }
    }

    // ------------------------------------------------------------ timers

    /// Retransmissions, request timeouts, lifetime expiry, status retries.
    pub fn handle_timeout(&mut self, now: Now, ctx: &mut Ctx<'_>) {
        self.ex.handle_timeout(now.instant);
        self.drain_failures();
        // LwM2M TS 1.1 Core §6.2.1: the registration is removed when its
        // lifetime passes without an Update.
        while let Some(id) = self.regs.next_expired(now.instant) {
            if self.end_registration(now, ctx, id, End::Expired).is_some() {
                ShardMetrics::inc(&self.metrics.expirations);
            }
        }
        self.tombstones.retain(|_, until| *until > now.instant);
        self.flush_backlog(now, ctx);
        self.update_gauges();
    }

    fn flush_backlog(&mut self, now: Now, ctx: &mut Ctx<'_>) {
        while let Some(d) = self.backlog.front() {
            let ev = StatusEvent {
                tenant_id: &d.entry.tenant_id,
                device_id: &d.entry.device_id,
                endpoint: &d.endpoint,
                status: d.status,
                reason: d.reason,
                last_seen: d.last_seen,
                ts: now.wall_ms,
                registration: RegistrationInfo {
                    registration_id: &d.registration_id,
                    lifetime_s: d.lifetime_s,
                    binding: &d.binding,
                    lwm2m_version: d.version.as_str(),
                    queue_mode: d.queue_mode,
                    address: d.address.clone(),
                    objects: d.objects.clone(),
                    seq: d.seq,
                },
            };
            match ctx.sink.publish_status(&ev) {
                Ok(()) => {
                    ShardMetrics::inc(&self.metrics.status_published);
                    self.backlog.pop_front();
                }
                Err(SinkError::Full) => break,
                Err(SinkError::Rejected) => {
                    self.backlog.pop_front();
                }
            }
        }
        self.backlog_retry =
            (!self.backlog.is_empty()).then(|| now.instant + Duration::from_millis(100));
    }

    fn update_gauges(&self) {
        ShardMetrics::set(&self.metrics.registrations_active, self.regs.len() as i64);
        ShardMetrics::set(&self.metrics.observations_active, self.obs.len() as i64);
        ShardMetrics::set(&self.metrics.acks_awaiting_delivery, self.acks.len() as i64);
        ShardMetrics::store(&self.metrics.dedup_evicted, self.ex.dedup_evicted());
    }

    // ------------------------------------------------------------ shards

    /// A message from another shard.
    pub fn handle_shard_msg(&mut self, now: Now, ctx: &mut Ctx<'_>, msg: ShardMsg) {
        match msg {
            ShardMsg::Takeover { endpoint, epoch } => {
                self.lamport = self.lamport.max(epoch.counter);
                if let Some(id) = self.regs.by_endpoint(&endpoint) {
                    let mine = self.regs.get(id).map(|r| r.epoch);
                    if mine.is_some_and(|e| e < epoch) {
                        ShardMetrics::inc(&self.metrics.takeovers);
                        tracing::debug!(%endpoint, to_shard = epoch.shard, "registration taken over by a newer one on another shard");
                        self.end_registration(now, ctx, id, End::Replaced);
                    }
                }
            }
            ShardMsg::Claim {
                id,
                from,
                request,
                hops,
            } => {
                if self.regs.contains(id) {
                    let state = self.export(now, ctx, id);
                    ShardMetrics::inc(&self.metrics.registrations_moved_out);
                    if self.home_of(id) == self.cfg.shard {
                        let moves = state.as_ref().map(|s| s.moves).unwrap_or(0);
                        self.homed.insert(id, (from, moves));
                    }
                    self.send_to_shard(
                        from,
                        ShardMsg::Adopt {
                            id,
                            state: state.map(Box::new),
                            deprovisioned: false,
                            request,
                        },
                    );
                    return;
                }
                let forward = (self.home_of(id) == self.cfg.shard)
                    .then(|| self.homed.get(&id).map(|(o, _)| *o))
                    .flatten()
                    .filter(|o| *o != from && *o != self.cfg.shard);
                match forward {
                    Some(owner) if hops < 4 => self.send_to_shard(
                        owner,
                        ShardMsg::Claim {
                            id,
                            from,
                            request,
                            hops: hops + 1,
                        },
                    ),
                    _ => {
                        let deprovisioned = self.tombstones.contains_key(&id);
                        self.send_to_shard(
                            from,
                            ShardMsg::Adopt {
                                id,
                                state: None,
                                deprovisioned,
                                request,
                            },
                        )
                    }
                }
            }
            ShardMsg::Adopt {
                id,
                state,
                deprovisioned,
                request,
            } => {
                if let Some(st) = state {
                    if self.import(now, ctx, &st).is_some() {
                        ShardMetrics::inc(&self.metrics.registrations_moved_in);
                        let home = self.home_of(id);
                        if home == self.cfg.shard {
                            self.homed.remove(&id);
                        } else {
                            self.send_to_shard(
                                home,
                                ShardMsg::Homed {
                                    id,
                                    owner: self.cfg.shard,
                                    moves: st.moves,
                                },
                            );
                        }
                    }
                }
                // Run the held request now that the registration is here (or
                // known to be gone).
                // (The bytes decoded on the shard that received them.)
                if let Ok(msg) = Message::decode(&request.bytes) {
                    self.on_request(
                        now,
                        ctx,
                        request.peer,
                        request.identity.as_ref(),
                        &msg,
                        &request.bytes,
                        Route::Claimed { deprovisioned },
                    );
                }
                self.drain_failures();
            }
            ShardMsg::Homed { id, owner, moves } => {
                if self.home_of(id) == self.cfg.shard {
                    if owner == self.cfg.shard {
                        self.homed.remove(&id);
                    } else if self.homed.get(&id).is_none_or(|(_, m)| *m <= moves) {
                        self.homed.insert(id, (owner, moves));
                    }
                }
            }
            ShardMsg::Unhomed { id, moves } => {
                if self.homed.get(&id).is_some_and(|(_, m)| *m <= moves) {
                    self.homed.remove(&id);
                }
            }
        }
    }

    /// Removes `id` from this shard and returns it as plain data.
    fn export(&mut self, now: Now, ctx: &mut Ctx<'_>, id: RegId) -> Option<RegistrationState> {
        let observations = self.observation_states(now, id);
        let reg = self.end_registration(now, ctx, id, End::Moved)?;
        let mut st = reg.to_state(now.instant, observations);
        st.moves += 1;
        Some(st)
    }

    fn observation_states(&self, now: Now, id: RegId) -> Vec<ObservationState> {
        let Some(reg) = self.regs.get(id) else {
            return Vec::new();
        };
        reg.observations
            .iter()
            .filter_map(|t| {
                self.obs.get(t).map(|o| ObservationState {
                    token: *t,
                    path: o.path.to_string(),
                    window: o.window.to_state(now.instant),
                })
            })
            .collect()
    }

    /// Installs a registration from plain data (moved here, or from a
    /// snapshot). Refused when its endpoint is no longer provisioned, or when
    /// a newer registration of the endpoint is already here.
    fn import(&mut self, now: Now, ctx: &mut Ctx<'_>, st: &RegistrationState) -> Option<RegId> {
        let Some(entry) = ctx.endpoints.get(&st.endpoint).cloned() else {
            tracing::info!(shard = self.cfg.shard, endpoint = %st.endpoint, "registration of a de-provisioned endpoint dropped");
            return None;
        };
        self.lamport = self.lamport.max(st.epoch.counter);
        if let Some(local) = self.regs.by_endpoint(&st.endpoint) {
            if self.regs.get(local).is_some_and(|r| r.epoch > st.epoch) {
                return None;
            }
            self.end_registration(now, ctx, local, End::Replaced);
        }
        let mut reg = Registration::from_state(st, entry, now.instant);
        if let Some(other) = self.regs.by_peer(&reg.peer) {
            self.end_registration(now, ctx, other, End::Replaced);
        }
        for o in &st.observations {
            let Some(path) = ResourcePath::parse(&o.path) else {
                continue;
            };
            if self.obs.contains_key(&o.token) {
                continue;
            }
            self.obs.insert(
                o.token,
                Observation {
                    reg: st.id,
                    path,
                    window: ObserveWindow::from_state(&o.window, now.instant),
                },
            );
            reg.observations.push(o.token);
        }
        let id = reg.id;
        self.regs.insert(reg);
        self.dirty = true;
        self.update_gauges();
        Some(id)
    }

    // ------------------------------------------------------------ control

    /// A control-plane change.
    pub fn handle_control(&mut self, now: Now, ctx: &mut Ctx<'_>, msg: ControlMsg) {
        match msg {
            ControlMsg::Endpoints(names) => {
                for name in names.iter() {
                    let Some(id) = self.regs.by_endpoint(name) else {
                        continue;
                    };
                    match ctx.endpoints.get(name.as_str()).cloned() {
                        None => {
                            // De-provisioning takes effect at once: offline
                            // with reason `deprovisioned`, observations
                            // dropped (late notifications get RST), requests
                            // on the location 4.03.
                            self.deprovision(now, ctx, id);
                        }
                        Some(entry) => {
                            let changed = self.regs.get(id).is_some_and(|r| *r.entry != *entry);
                            if changed {
                                if let Some(r) = self.regs.get_mut(id) {
                                    r.entry = entry;
                                }
                                self.dirty = true;
                                self.plan_observations(now, ctx, id);
                            }
                        }
                    }
                }
            }
            ControlMsg::ProfilesChanged => {
                for id in self.regs.ids() {
                    self.plan_observations(now, ctx, id);
                }
            }
        }
        self.drain_failures();
        self.update_gauges();
    }

    // ------------------------------------------------------------ snapshots

    /// This shard's registrations as plain data.
    pub fn export_snapshot(&self, now: Now) -> ShardSnapshot {
        ShardSnapshot {
            shard: self.cfg.shard,
            saved_at_ms: now.wall_ms,
            lamport: self.lamport,
            registrations: self
                .regs
                .iter()
                .map(|r| r.to_state(now.instant, self.observation_states(now, r.id)))
                .collect(),
            homed: self
                .homed
                .iter()
                .map(|(id, (o, m))| (*id, *o, *m))
                .collect(),
        }
    }

    /// Restores registrations from a snapshot taken `now.wall_ms -
    /// saved_at_ms` ago: lifetimes keep running across the restart; expired
    /// and de-provisioned ones are dropped. Returns how many were restored.
    pub fn import_snapshot(&mut self, now: Now, ctx: &mut Ctx<'_>, snap: &ShardSnapshot) -> usize {
        let elapsed = (now.wall_ms - snap.saved_at_ms).max(0) as u64;
        self.lamport = self.lamport.max(snap.lamport);
        let mut n = 0;
        for st in &snap.registrations {
            if st.expires_in_ms <= elapsed {
                continue;
            }
            let mut st = st.clone();
            st.expires_in_ms -= elapsed;
            for o in &mut st.observations {
                o.window.age_ms = o.window.age_ms.map(|a| a + elapsed);
            }
            if self.import(now, ctx, &st).is_some() {
                n += 1;
            }
        }
        let shards = self.cfg.shards.max(1);
        for (id, owner, moves) in &snap.homed {
            if !self.regs.contains(*id) {
                self.homed.insert(*id, (owner % shards, *moves));
            }
        }
        self.update_gauges();
        n
    }
}

fn loc_string(id: RegId) -> String {
    String::from_utf8_lossy(&registration::location(id)).into_owned()
}

/// Publishes a status event for `reg` (and counts it in its sequence).
fn publish_status(
    sink: &mut dyn Sink,
    reg: &mut Registration,
    status: &'static str,
    reason: &'static str,
    now_ms: i64,
) -> Result<(), SinkError> {
    let loc = registration::location(reg.id);
    sink.publish_status(&StatusEvent {
        tenant_id: &reg.entry.tenant_id,
        device_id: &reg.entry.device_id,
        endpoint: &reg.endpoint,
        status,
        reason,
        last_seen: reg.last_seen_ms,
        ts: now_ms,
        registration: RegistrationInfo {
            registration_id: std::str::from_utf8(&loc).unwrap_or(""),
            lifetime_s: reg.lifetime_s,
            binding: &reg.binding,
            lwm2m_version: reg.version.as_str(),
            queue_mode: reg.queue_mode,
            address: reg.peer.to_string(),
            objects: reg.object_links(),
            seq: reg.status_seq,
        },
    })
    .inspect(|()| reg.status_seq += 1)
}

#[cfg(test)]
mod tests;

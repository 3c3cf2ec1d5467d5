//! The LwM2M Bootstrap Interface, server side, sans-IO (LwM2M TS 1.1 Core
//! §6.1 and §5.2; Transport §6.1).
//!
//! A device that knows only its bootstrap server sends Bootstrap-Request
//! (`POST /bs?ep={name}[&pct={format}]`). The [`BootstrapServer`] answers
//! 2.04 and then drives the sequence, one CON request at a time:
//!
//! 1. Bootstrap-Discover `GET /` (Accept: link-format, TS Core §5.2.7.1),
//!    when enabled: the client's version and which Security instance is its
//!    Bootstrap-Server Account. A 1.0 client answers an error or RST (the
//!    operation is new in 1.1): the sequence goes on without it.
//! 2. Bootstrap-Delete `/0` and `/1` (and `/2` when ACLs are written); the
//!    client keeps its Bootstrap-Server Account (TS Core §5.2.7.5).
//! 3. Bootstrap-Write of each Security instance `/0/x`, Server instance
//!    `/1/x` and ACL `/2/x` (TS Core §5.2.7.4), in TLV unless the client's
//!    `pct` asked for another format; large instances go in Block1 blocks.
//! 4. A generated PSK is recorded in the directory ([`StoreRequest`], answered
//!    with [`BootstrapServer::handle_stored`]) so the device's next DTLS
//!    handshake with the gateway succeeds.
//! 5. Bootstrap-Finish `POST /bs` (TS Core §5.2.7.6); a 4.06 / 5.00 with a
//!    diagnostic payload ends the session as failed.
//!
//! Any error (a 4.xx/5.xx, a timeout, a reset, the session deadline) ends
//! the session: nothing more is sent and a `bootstrap_failed` status event
//! names the step, the path and the code.
//!
//! Inputs: [`BootstrapServer::handle_datagram`], [`BootstrapServer::handle_timeout`],
//! [`BootstrapServer::handle_stored`]. Outputs: [`BootstrapServer::transmits`],
//! [`BootstrapServer::poll_store`], status events through the sink, and
//! [`BootstrapServer::poll_timeout`]. Nothing here reads a clock, does I/O or
//! panics on network input.

pub mod config;

pub use config::{
    plan, AclEntry, BootstrapDefaults, BootstrapSettings, GeneratedPsk, Plan, PlanError,
    SecurityMode, ServerAccount,
};

use super::content::{ResourcePath, CF_LINK, CF_LWM2M_JSON, CF_SENML_CBOR, CF_SENML_JSON, CF_TLV};
use super::encode;
use super::endpoint::{
    Authorizer, DefaultAuthorizer, EndpointEntry, EndpointMap, Identity, Uplink,
};
use super::link_format::parse_bootstrap_discover;
use super::output::{BootstrapEvent, BootstrapInfo, Sink};
use super::server::{LogLimiter, Now};
use crate::metrics::ShardMetrics;
use crate::proto::coap::block::{Block1Upload, MAX_SZX};
use crate::proto::coap::exchange::{ExchangeConfig, Exchanges, FailReason, Inbound, Token};
use crate::proto::coap::{Code, Message, MessageBuilder, MsgType, PeerId};
use crate::proto::FastMap;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bootstrap server behaviour (`[bootstrap]`).
#[derive(Debug, Clone)]
pub struct BootstrapConfig {
    pub shard: u16,
    pub exchange: ExchangeConfig,
    pub defaults: BootstrapDefaults,
    /// Send Bootstrap-Discover first (1.1 clients).
    pub discover: bool,
    /// One Bootstrap-Delete of `/` (everything but the Bootstrap-Server
    /// Account and the Device object, TS 1.1 Core §5.2.7.5) instead of
    /// `/0` and `/1`: for clients that accept only that.
    pub delete_root: bool,
    /// A session not finished within this time fails.
    pub session_timeout: Duration,
    /// Sessions at once on this shard; more get 5.03.
    pub max_sessions: usize,
    /// Write keys (PSK, private keys) over plain CoAP (off: 4.03).
    pub allow_plain_secrets: bool,
    /// Block size for large writes (SZX, 6 = 1024 bytes).
    pub block_szx: u8,
    /// Max-Age of the 5.03 when the shard is at `max_sessions`.
    pub busy_max_age_s: u32,
    /// Seed of the message ids and tokens.
    pub seed: u64,
    /// Seed of generated keys (from the OS CSPRNG in the gateway).
    pub key_seed: [u8; 32],
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        BootstrapConfig {
            shard: 0,
            exchange: ExchangeConfig::default(),
            defaults: BootstrapDefaults::default(),
            discover: true,
            delete_root: false,
            session_timeout: Duration::from_secs(120),
            max_sessions: 10_000,
            allow_plain_secrets: false,
            block_szx: 6,
            busy_max_age_s: 5,
            seed: 0,
            key_seed: [0; 32],
        }
    }
}

/// What the bootstrap context reads and writes per batch.
pub struct BsCtx<'a> {
    pub endpoints: &'a EndpointMap,
    pub sink: &'a mut dyn Sink,
}

/// A generated PSK to record as `endpoint`'s DTLS credentials before
/// Bootstrap-Finish; answer with [`BootstrapServer::handle_stored`].
#[derive(Debug, Clone)]
pub struct StoreRequest {
    pub session: u64,
    pub endpoint: String,
    pub psk: GeneratedPsk,
}

/// One step of the sequence (for status events, logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Request,
    Discover,
    /// Bootstrap-Delete of an object, or of `/` (`None`).
    Delete(Option<u16>),
    /// Object, instance, index of the account (or ACL) written.
    Write(u16, u16, u16),
    Store,
    Finish,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Request => "request",
            Step::Discover => "discover",
            Step::Delete(_) => "delete",
            Step::Write(..) => "write",
            Step::Store => "store",
            Step::Finish => "finish",
        }
    }

    fn path(self) -> Option<String> {
        match self {
            Step::Discover => Some("/".into()),
            Step::Delete(Some(o)) => Some(format!("/{o}")),
            Step::Delete(None) => Some("/".into()),
            Step::Write(o, i, _) => Some(format!("/{o}/{i}")),
            Step::Finish => Some("/bs".into()),
            Step::Request | Step::Store => None,
        }
    }
}

/// How a session ended badly.
#[derive(Debug, Clone)]
struct Failure {
    step: Step,
    code: String,
    diagnostic: Option<String>,
}

struct Session {
    id: u64,
    endpoint: Arc<str>,
    entry: Arc<EndpointEntry>,
    plan: Plan,
    /// `pct` of the request.
    pct: Option<u16>,
    version: Option<String>,
    steps: VecDeque<Step>,
    current: Option<(Step, Token)>,
    /// Body of the write in progress (Block1 when larger than a block).
    upload: Option<Block1Upload>,
    started: Instant,
    deadline: Instant,
    waiting_store: bool,
}

impl Session {
    fn format(&self) -> u16 {
        self.pct.unwrap_or(CF_TLV)
    }
}

/// A status event that could not be queued yet (sink full).
struct OwnedEvent {
    entry: Arc<EndpointEntry>,
    endpoint: Arc<str>,
    reason: &'static str,
    ts: i64,
    address: String,
    secure: bool,
    servers: Vec<String>,
    version: Option<String>,
    format: Option<u16>,
    failure: Option<Failure>,
    psk_generated: bool,
    duration_ms: Option<u64>,
}

const MAX_BACKLOG: usize = 4096;

pub struct BootstrapServer {
    cfg: BootstrapConfig,
    metrics: Arc<ShardMetrics>,
    keys: StdRng,
    ex: Exchanges,
    sessions: FastMap<PeerId, Session>,
    by_token: FastMap<Token, PeerId>,
    by_id: FastMap<u64, PeerId>,
    by_endpoint: FastMap<Arc<str>, PeerId>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    stores: VecDeque<StoreRequest>,
    backlog: VecDeque<OwnedEvent>,
    next_id: u64,
    refusals: LogLimiter,
    authorizer: DefaultAuthorizer,
}

impl BootstrapServer {
    pub fn new(cfg: BootstrapConfig, metrics: Arc<ShardMetrics>) -> BootstrapServer {
        let mut rng = StdRng::seed_from_u64(
            cfg.seed ^ (cfg.shard as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xb007,
        );
        let ex = Exchanges::new(cfg.exchange.clone(), rng.gen(), metrics.clone());
        BootstrapServer {
            keys: StdRng::from_seed(cfg.key_seed),
            cfg,
            metrics,
            ex,
            sessions: FastMap::default(),
            by_token: FastMap::default(),
            by_id: FastMap::default(),
            by_endpoint: FastMap::default(),
            deadlines: BinaryHeap::new(),
            stores: VecDeque::new(),
            backlog: VecDeque::new(),
            next_id: 1,
            refusals: LogLimiter::new(),
            authorizer: DefaultAuthorizer {
                allow_plain_with_credentials: false,
            },
        }
    }

    pub fn config(&self) -> &BootstrapConfig {
        &self.cfg
    }

    /// Sessions in progress.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn transmits(&self) -> impl Iterator<Item = (PeerId, &[u8])> {
        self.ex.transmits()
    }

    pub fn has_transmits(&self) -> bool {
        self.ex.has_transmits()
    }

    pub fn clear_transmits(&mut self) {
        self.ex.clear_transmits();
    }

    /// The next generated PSK to record.
    pub fn poll_store(&mut self) -> Option<StoreRequest> {
        self.stores.pop_front()
    }

    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut t = self.ex.poll_timeout();
        if let Some(Reverse((d, _))) = self.deadlines.peek() {
            t = Some(t.map_or(*d, |x| x.min(*d)));
        }
        t
    }

    // ------------------------------------------------------------ inputs

    /// One CoAP message from `peer` (`identity`: what its DTLS session
    /// authenticated, `None` on plain CoAP).
    pub fn handle_datagram(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        data: &[u8],
    ) {
        ShardMetrics::inc(&self.metrics.datagrams_rx);
        ShardMetrics::add(&self.metrics.bytes_rx, data.len() as u64);
        let msg = match Message::decode(data) {
            Ok(m) => m,
            Err(_) => {
                ShardMetrics::inc(&self.metrics.malformed);
                self.ex.reject_malformed(peer, data);
                return;
            }
        };
        match self.ex.handle(now.instant, peer, &msg) {
            Inbound::Consumed => {}
            Inbound::Request => self.on_request(now, ctx, peer, identity, &msg),
            Inbound::Response { token, .. } => self.on_response(now, ctx, peer, &msg, token),
            Inbound::Unsolicited => {
                if msg.mtype == MsgType::Con {
                    self.ex.reset(now.instant, peer, msg.message_id, false);
                }
            }
        }
        self.drain_failures(now, ctx);
    }

    /// Retransmissions, request failures, session deadlines, event retries.
    pub fn handle_timeout(&mut self, now: Now, ctx: &mut BsCtx<'_>) {
        self.ex.handle_timeout(now.instant);
        self.drain_failures(now, ctx);
        while let Some(Reverse((d, id))) = self.deadlines.peek().copied() {
            if d > now.instant {
                break;
            }
            self.deadlines.pop();
            let Some(peer) = self.by_id.get(&id).copied() else {
                continue;
            };
            let step = self
                .sessions
                .get(&peer)
                .and_then(|s| s.current.map(|c| c.0))
                .unwrap_or(Step::Store);
            ShardMetrics::inc(&self.metrics.bootstrap_timeouts);
            self.fail(
                now,
                ctx,
                peer,
                Failure {
                    step,
                    code: "timeout".into(),
                    diagnostic: Some(
                        "the bootstrap session took longer than bootstrap.session_timeout_s".into(),
                    ),
                },
            );
        }
        self.retry_backlog(ctx);
    }

    /// The control plane recorded (or could not record) the PSK of
    /// session `session`.
    pub fn handle_stored(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        session: u64,
        result: Result<(), String>,
    ) {
        let Some(peer) = self.by_id.get(&session).copied() else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if !s.waiting_store {
            return;
        }
        s.waiting_store = false;
        match result {
            Ok(()) => {
                ShardMetrics::inc(&self.metrics.bootstrap_psk_generated);
                self.next_step(now, ctx, peer);
            }
            Err(e) => self.fail(
                now,
                ctx,
                peer,
                Failure {
                    step: Step::Store,
                    code: "5.00".into(),
                    diagnostic: Some(e),
                },
            ),
        }
    }

    // ------------------------------------------------------------ requests

    fn reply(&mut self, now: Now, peer: PeerId, msg: &Message<'_>, code: Code, diag: Option<&str>) {
        let mut b = MessageBuilder::new(MsgType::Ack, code).token(msg.token);
        if let Some(d) = diag {
            b = b.payload(d.as_bytes());
        }
        self.ex.respond(now.instant, peer, msg, b, true, false);
    }

    fn refuse_log(&mut self, now: Now, peer: PeerId, endpoint: &str, why: &str) {
        if self
            .refusals
            .allow(now.instant, &self.metrics, self.cfg.shard)
        {
            tracing::info!(shard = self.cfg.shard, %peer, endpoint, why, "Bootstrap-Request refused");
        }
    }

    fn on_request(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        peer: PeerId,
        identity: Option<&Identity>,
        msg: &Message<'_>,
    ) {
        if msg.unknown_critical_option().is_some() {
            ShardMetrics::inc(&self.metrics.bad_option);
            return self.reply(now, peer, msg, Code::BAD_OPTION, None);
        }
        let mut path = msg.uri_path();
        let is_bs = path.next() == Some(b"bs".as_slice()) && path.next().is_none();
        if !is_bs {
            ShardMetrics::inc(&self.metrics.requests_not_found);
            return self.reply(now, peer, msg, Code::NOT_FOUND, None);
        }
        if msg.code != Code::POST {
            return self.reply(now, peer, msg, Code::METHOD_NOT_ALLOWED, None);
        }
        ShardMetrics::inc(&self.metrics.bootstrap_requests);
        // TS 1.1 Transport §6.1, Table 6.1-1: `ep` (mandatory), `pct`.
        let mut ep = None;
        let mut pct = None;
        let mut bad = false;
        for q in msg.uri_query() {
            let Ok(q) = std::str::from_utf8(q) else {
                bad = true;
                continue;
            };
            match q.split_once('=') {
                Some(("ep", v)) if !v.is_empty() && v.len() <= 256 => ep = Some(v.to_string()),
                Some(("pct", v)) => match v.parse::<u16>() {
                    Ok(v) => pct = Some(v),
                    Err(_) => bad = true,
                },
                Some(("ep", _)) => bad = true,
                _ => {}
            }
        }
        let Some(ep) = ep.filter(|_| !bad) else {
            ShardMetrics::inc(&self.metrics.bootstrap_refused);
            return self.reply(now, peer, msg, Code::BAD_REQUEST, None);
        };
        let Some(entry) = ctx.endpoints.get(ep.as_str()).cloned() else {
            ShardMetrics::inc(&self.metrics.bootstrap_refused);
            self.refuse_log(now, peer, &ep, "unknown endpoint");
            return self.reply(now, peer, msg, Code::FORBIDDEN, None);
        };
        // Same identity rules as registration (TS 1.1 Transport §5.2.1):
        // a device with bootstrap credentials must present them, and an
        // identity bootstraps only its own endpoint.
        let creds = entry
            .bootstrap
            .as_ref()
            .map(|b| b.credential_entry())
            .unwrap_or_else(|| EndpointEntry::new("", "", ""));
        if let Err(d) = self.authorizer.authorize(
            Uplink::Register {
                endpoint: ep.as_str(),
            },
            &creds,
            identity,
        ) {
            ShardMetrics::inc(&self.metrics.bootstrap_refused);
            self.refuse_log(now, peer, &ep, &d.to_string());
            return self.reply(now, peer, msg, Code::FORBIDDEN, None);
        }
        let endpoint: Arc<str> = Arc::from(ep.as_str());
        if let Some(cf) = pct {
            if ![CF_TLV, CF_SENML_CBOR, CF_SENML_JSON, CF_LWM2M_JSON].contains(&cf) {
                ShardMetrics::inc(&self.metrics.bootstrap_refused);
                return self.reply(
                    now,
                    peer,
                    msg,
                    Code::UNSUPPORTED_CONTENT_FORMAT,
                    Some("pct: TLV, SenML CBOR/JSON or LwM2M JSON"),
                );
            }
        }
        // A new request from a peer or endpoint with a session in progress
        // starts over (the device restarted its bootstrap).
        if let Some(old) = self.sessions.get(&peer).map(|s| s.id) {
            self.drop_session(now, old);
            ShardMetrics::inc(&self.metrics.bootstrap_restarted);
        }
        if let Some(old) = self
            .by_endpoint
            .get(&endpoint)
            .and_then(|p| self.sessions.get(p))
            .map(|s| s.id)
        {
            self.drop_session(now, old);
            ShardMetrics::inc(&self.metrics.bootstrap_restarted);
        }
        if self.sessions.len() >= self.cfg.max_sessions {
            ShardMetrics::inc(&self.metrics.busy_responses);
            let b = MessageBuilder::new(MsgType::Ack, Code::SERVICE_UNAVAILABLE)
                .token(msg.token)
                .max_age(self.cfg.busy_max_age_s);
            return self.ex.respond(now.instant, peer, msg, b, false, false);
        }
        let keys = &mut self.keys;
        let mut gen = || {
            let mut k = [0u8; 16];
            keys.fill_bytes(&mut k);
            k
        };
        let plan = match plan(&ep, &entry, &self.cfg.defaults, &mut gen) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(shard = self.cfg.shard, endpoint = %ep, error = %e, "cannot bootstrap");
                let f = (Code::INTERNAL_SERVER_ERROR, e.to_string());
                return self.refuse_authorized(now, ctx, peer, msg, &entry, &endpoint, f);
            }
        };
        if identity.is_none() && plan.has_secrets() && !self.cfg.allow_plain_secrets {
            self.refuse_log(now, peer, &ep, "keys are written only over DTLS");
            let why = "the configuration carries keys: bootstrap over DTLS (or set bootstrap.allow_plain_secrets)";
            let f = (Code::FORBIDDEN, why.to_string());
            return self.refuse_authorized(now, ctx, peer, msg, &entry, &endpoint, f);
        }
        // TS 1.1 Transport §6.1: 2.04 Changed, then the server's requests.
        self.reply(now, peer, msg, Code::CHANGED, None);
        let id = self.next_id;
        self.next_id += 1;
        let mut steps = VecDeque::new();
        if self.cfg.discover {
            steps.push_back(Step::Discover);
        }
        let s = Session {
            id,
            endpoint: endpoint.clone(),
            entry: entry.clone(),
            plan,
            pct,
            version: None,
            steps,
            current: None,
            upload: None,
            started: now.instant,
            deadline: now.instant + self.cfg.session_timeout,
            waiting_store: false,
        };
        let ev = self.event_for(now, &entry, &endpoint, peer, "bootstrapping", Some(&s));
        self.emit(ctx, ev);
        self.deadlines.push(Reverse((s.deadline, id)));
        self.by_id.insert(id, peer);
        self.by_endpoint.insert(endpoint, peer);
        let discover = self.cfg.discover;
        self.sessions.insert(peer, s);
        if !discover {
            self.plan_writes(peer, None);
        }
        ShardMetrics::set(&self.metrics.bootstrap_sessions, self.sessions.len() as i64);
        self.next_step(now, ctx, peer);
    }

    /// Refuses a Bootstrap-Request that passed the authorizer (so the
    /// device is who it says): `code` to the device, and a
    /// `bootstrap_failed` event at step `request` with the reason.
    #[allow(clippy::too_many_arguments)]
    fn refuse_authorized(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
        entry: &Arc<EndpointEntry>,
        endpoint: &Arc<str>,
        (code, why): (Code, String),
    ) {
        ShardMetrics::inc(&self.metrics.bootstrap_refused);
        self.reply(now, peer, msg, code, None);
        let mut ev = self.event_for(now, entry, endpoint, peer, "bootstrap_failed", None);
        ev.failure = Some(Failure {
            step: Step::Request,
            code: code.to_string(),
            diagnostic: Some(why),
        });
        self.emit(ctx, ev);
    }

    /// The Delete / Write / Store / Finish steps, once the Bootstrap-Server
    /// Account's instance is known (or assumed to be /0/0).
    fn plan_writes(&mut self, peer: PeerId, bs_instance: Option<u16>) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        if self.cfg.delete_root {
            s.steps.push_back(Step::Delete(None));
        } else {
            s.steps.push_back(Step::Delete(Some(0)));
            s.steps.push_back(Step::Delete(Some(1)));
            if !s.plan.acl.is_empty() {
                s.steps.push_back(Step::Delete(Some(2)));
            }
        }
        // Security instance ids avoid the Bootstrap-Server Account's
        // (assumed 0 when Discover told nothing).
        let skip = bs_instance.unwrap_or(0);
        let mut next = 0u16;
        for k in 0..s.plan.accounts.len() as u16 {
            if next == skip {
                next += 1;
            }
            s.steps.push_back(Step::Write(0, next, k));
            next += 1;
        }
        for k in 0..s.plan.accounts.len() as u16 {
            s.steps.push_back(Step::Write(1, k, k));
        }
        for k in 0..s.plan.acl.len() as u16 {
            s.steps.push_back(Step::Write(2, k, k));
        }
        if s.plan.generated.is_some() {
            s.steps.push_back(Step::Store);
        }
        s.steps.push_back(Step::Finish);
    }

    /// Sends the next request of `peer`'s session (or finishes it).
    fn next_step(&mut self, now: Now, ctx: &mut BsCtx<'_>, peer: PeerId) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some(step) = s.steps.pop_front() else {
            return self.succeed(now, ctx, peer);
        };
        match step {
            Step::Store => {
                let Some(psk) = s.plan.generated.clone() else {
                    return self.next_step(now, ctx, peer);
                };
                s.waiting_store = true;
                s.current = Some((Step::Store, 0));
                self.stores.push_back(StoreRequest {
                    session: s.id,
                    endpoint: s.endpoint.to_string(),
                    psk,
                });
            }
            Step::Write(o, i, k) => {
                let k = k as usize;
                let entries = match o {
                    0 => s
                        .plan
                        .accounts
                        .get(k)
                        .map(|a| config::security_entries(a, i)),
                    1 => s.plan.accounts.get(k).map(|a| config::server_entries(a, i)),
                    _ => s.plan.acl.get(k).map(|a| config::acl_entries(a, i)),
                };
                let Some(entries) = entries else {
                    return self.next_step(now, ctx, peer);
                };
                let base = ResourcePath {
                    object: o,
                    instance: Some(i),
                    resource: None,
                    resource_instance: None,
                };
                let cf = s.format();
                let mut body = Vec::new();
                if let Err(e) = encode::encode(cf, base, &entries, &mut body) {
                    return self.fail(
                        now,
                        ctx,
                        peer,
                        Failure {
                            step,
                            code: "5.00".into(),
                            diagnostic: Some(format!("encoding: {e}")),
                        },
                    );
                }
                s.upload = Some(Block1Upload::new(
                    body.into(),
                    self.cfg.block_szx.min(MAX_SZX),
                ));
                self.send_current(now, peer, step);
            }
            other => self.send_current(now, peer, other),
        }
    }

    /// Sends (or re-sends, for the next block) the request of `step`.
    fn send_current(&mut self, now: Now, peer: PeerId, step: Step) {
        let Some(s) = self.sessions.get_mut(&peer) else {
            return;
        };
        let sessions_tokens = &self.by_token;
        let token = self.ex.alloc_token(|t| sessions_tokens.contains_key(&t));
        let tb = token.to_be_bytes();
        let ids;
        let b = match step {
            Step::Discover => MessageBuilder::request(Code::GET, true)
                .token(&tb)
                .accept(CF_LINK),
            Step::Delete(Some(o)) => MessageBuilder::request(Code::DELETE, true)
                .token(&tb)
                .path_id(o),
            Step::Delete(None) => MessageBuilder::request(Code::DELETE, true).token(&tb),
            Step::Write(o, i, _) => {
                ids = (o, i);
                let cf = s.format();
                let Some(up) = s.upload.as_ref() else {
                    return;
                };
                let whole = up.sent_bytes() == 0 && Block1Upload::fits(up.total(), up.szx());
                let (blk, bytes) = up.current();
                let mut b = MessageBuilder::request(Code::PUT, true)
                    .token(&tb)
                    .path_id(ids.0)
                    .path_id(ids.1)
                    .content_format(cf)
                    .payload(bytes);
                if !whole {
                    b = b.block1(blk);
                    if blk.num == 0 {
                        b = b.size1(up.total() as u32);
                    }
                }
                b
            }
            Step::Finish => MessageBuilder::request(Code::POST, true)
                .token(&tb)
                .path("bs"),
            Step::Request | Step::Store => return,
        };
        match step {
            Step::Discover => ShardMetrics::inc(&self.metrics.bootstrap_discovers),
            Step::Delete(_) => ShardMetrics::inc(&self.metrics.bootstrap_deletes),
            Step::Write(..) => ShardMetrics::inc(&self.metrics.bootstrap_writes),
            _ => {}
        }
        s.current = Some((step, token));
        self.ex.request(now.instant, peer, token, b, s.id);
        self.by_token.insert(token, peer);
    }

    fn on_response(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        peer: PeerId,
        msg: &Message<'_>,
        token: Token,
    ) {
        if msg.mtype == MsgType::Con {
            // A separate response (RFC 7252 §5.2.2).
            self.ex
                .ack(now.instant, peer, MsgType::Con, msg.message_id, false);
        }
        let Some(p) = self.by_token.remove(&token) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&p) else {
            return;
        };
        let Some((step, tok)) = s.current else {
            return;
        };
        if tok != token {
            return;
        }
        s.current = None;
        let code = msg.code;
        match step {
            Step::Discover => {
                if code == Code::CONTENT {
                    let d = parse_bootstrap_discover(msg.payload).unwrap_or_default();
                    s.version = d.version.clone();
                    let bs = d
                        .links
                        .iter()
                        .find(|l| l.object == 0 && l.instance.is_some() && l.ssid.is_none())
                        .and_then(|l| l.instance);
                    self.plan_writes(p, bs);
                    self.next_step(now, ctx, p)
                } else {
                    // A 1.0 client has no Bootstrap-Discover (TS 1.0
                    // §5.2.7): whatever error it answers (4.04, 4.05, even
                    // 5.00 from npm coap-node), carry on without it.
                    s.version = Some("1.0".into());
                    self.plan_writes(p, None);
                    self.next_step(now, ctx, p)
                }
            }
            Step::Delete(_) => {
                // 4.04: nothing to delete.
                if code == Code::DELETED || code == Code::NOT_FOUND {
                    self.next_step(now, ctx, p)
                } else {
                    self.fail_code(now, ctx, p, step, code, msg.payload)
                }
            }
            Step::Write(..) => {
                let Some(up) = s.upload.as_mut() else {
                    return;
                };
                if code == Code::CONTINUE {
                    match up.on_continue(msg.block1()) {
                        Ok(false) => return self.send_current(now, p, step),
                        Ok(true) | Err(_) => {
                            return self.fail_code(now, ctx, p, step, code, b"unexpected 2.31")
                        }
                    }
                }
                if code == Code::REQUEST_ENTITY_TOO_LARGE {
                    // RFC 7959 §2.9.3: again, in the blocks it asked for.
                    if up.restarts < 4 && up.on_too_large(msg.block1(), msg.size1()).is_ok() {
                        return self.send_current(now, p, step);
                    }
                    return self.fail_code(now, ctx, p, step, code, msg.payload);
                }
                if code == Code::CHANGED || code == Code::CREATED {
                    s.upload = None;
                    self.next_step(now, ctx, p)
                } else {
                    self.fail_code(now, ctx, p, step, code, msg.payload)
                }
            }
            Step::Finish => {
                if code == Code::CHANGED {
                    self.next_step(now, ctx, p)
                } else {
                    self.fail_code(now, ctx, p, step, code, msg.payload)
                }
            }
            Step::Request | Step::Store => {}
        }
    }

    fn drain_failures(&mut self, now: Now, ctx: &mut BsCtx<'_>) {
        while let Some(f) = self.ex.poll_failed() {
            let Some(peer) = self.by_token.remove(&f.token) else {
                continue;
            };
            let Some(step) = self
                .sessions
                .get(&peer)
                .and_then(|s| s.current)
                .filter(|c| c.1 == f.token)
                .map(|c| c.0)
            else {
                continue;
            };
            if step == Step::Discover && f.reason == FailReason::Reset {
                // A client without Bootstrap-Discover (TS 1.0) may reject it
                // with RST: carry on as with a 4.xx.
                if let Some(s) = self.sessions.get_mut(&peer) {
                    s.current = None;
                    s.version = Some("1.0".into());
                }
                self.plan_writes(peer, None);
                self.next_step(now, ctx, peer);
                continue;
            }
            let code = match f.reason {
                FailReason::Timeout => "timeout",
                FailReason::Reset => "reset",
            };
            self.fail(
                now,
                ctx,
                peer,
                Failure {
                    step,
                    code: code.into(),
                    diagnostic: None,
                },
            );
        }
    }

    fn fail_code(
        &mut self,
        now: Now,
        ctx: &mut BsCtx<'_>,
        peer: PeerId,
        step: Step,
        code: Code,
        payload: &[u8],
    ) {
        let diagnostic = (!payload.is_empty()).then(|| {
            String::from_utf8_lossy(&payload[..payload.len().min(256)])
                .chars()
                .filter(|c| !c.is_control())
                .collect()
        });
        self.fail(
            now,
            ctx,
            peer,
            Failure {
                step,
                code: code.to_string(),
                diagnostic,
            },
        );
    }

    // ------------------------------------------------------------ endings

    /// Removes a session: its pending request cancelled, its indexes gone.
    fn drop_session(&mut self, now: Now, id: u64) -> Option<Session> {
        let peer = self.by_id.remove(&id)?;
        let s = self.sessions.remove(&peer)?;
        if let Some((_, tok)) = s.current {
            self.by_token.remove(&tok);
            self.ex.cancel(now.instant, tok);
        }
        if self.by_endpoint.get(&s.endpoint) == Some(&peer) {
            self.by_endpoint.remove(&s.endpoint);
        }
        ShardMetrics::set(&self.metrics.bootstrap_sessions, self.sessions.len() as i64);
        Some(s)
    }

    fn fail(&mut self, now: Now, ctx: &mut BsCtx<'_>, peer: PeerId, f: Failure) {
        let Some(id) = self.sessions.get(&peer).map(|s| s.id) else {
            return;
        };
        let Some(s) = self.drop_session(now, id) else {
            return;
        };
        let c = match f.step {
            Step::Request => &self.metrics.bootstrap_refused,
            Step::Discover => &self.metrics.bootstrap_failed_discover,
            Step::Delete(_) => &self.metrics.bootstrap_failed_delete,
            Step::Write(..) => &self.metrics.bootstrap_failed_write,
            Step::Store => &self.metrics.bootstrap_failed_store,
            Step::Finish => &self.metrics.bootstrap_failed_finish,
        };
        ShardMetrics::inc(c);
        tracing::info!(
            shard = self.cfg.shard,
            %peer,
            endpoint = %s.endpoint,
            step = f.step.name(),
            path = f.step.path().as_deref().unwrap_or(""),
            code = %f.code,
            diagnostic = f.diagnostic.as_deref().unwrap_or(""),
            "bootstrap failed"
        );
        let mut ev = self.event_for(
            now,
            &s.entry,
            &s.endpoint,
            peer,
            "bootstrap_failed",
            Some(&s),
        );
        ev.failure = Some(f);
        ev.duration_ms = Some(now.instant.duration_since(s.started).as_millis() as u64);
        self.emit(ctx, ev);
    }

    fn succeed(&mut self, now: Now, ctx: &mut BsCtx<'_>, peer: PeerId) {
        let Some(id) = self.sessions.get(&peer).map(|s| s.id) else {
            return;
        };
        let Some(s) = self.drop_session(now, id) else {
            return;
        };
        ShardMetrics::inc(&self.metrics.bootstrap_finished);
        tracing::debug!(shard = self.cfg.shard, %peer, endpoint = %s.endpoint, "bootstrapped");
        let mut ev = self.event_for(now, &s.entry, &s.endpoint, peer, "bootstrapped", Some(&s));
        ev.duration_ms = Some(now.instant.duration_since(s.started).as_millis() as u64);
        self.emit(ctx, ev);
    }

    fn event_for(
        &self,
        now: Now,
        entry: &Arc<EndpointEntry>,
        endpoint: &Arc<str>,
        peer: PeerId,
        reason: &'static str,
        s: Option<&Session>,
    ) -> OwnedEvent {
        OwnedEvent {
            entry: entry.clone(),
            endpoint: endpoint.clone(),
            reason,
            ts: now.wall_ms,
            address: peer.addr().to_string(),
            secure: peer.is_dtls(),
            servers: s
                .map(|s| s.plan.accounts.iter().map(|a| a.uri.clone()).collect())
                .unwrap_or_default(),
            version: s.and_then(|s| s.version.clone()),
            format: s.map(|s| s.format()),
            failure: None,
            psk_generated: s.is_some_and(|s| s.plan.generated.is_some()),
            duration_ms: None,
        }
    }

    fn emit(&mut self, ctx: &mut BsCtx<'_>, ev: OwnedEvent) {
        if !self.backlog.is_empty() || publish(ctx.sink, &ev).is_err() {
            if self.backlog.len() >= MAX_BACKLOG {
                ShardMetrics::inc(&self.metrics.status_dropped);
                return;
            }
            self.backlog.push_back(ev);
            self.retry_backlog(ctx);
        }
    }

    fn retry_backlog(&mut self, ctx: &mut BsCtx<'_>) {
        while let Some(ev) = self.backlog.front() {
            if publish(ctx.sink, ev).is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }
}

fn publish(sink: &mut dyn Sink, ev: &OwnedEvent) -> Result<(), super::output::SinkError> {
    let f = ev.failure.as_ref();
    sink.publish_bootstrap(&BootstrapEvent {
        tenant_id: &ev.entry.tenant_id,
        device_id: &ev.entry.device_id,
        endpoint: &ev.endpoint,
        status: "bootstrap",
        reason: ev.reason,
        ts: ev.ts,
        bootstrap: BootstrapInfo {
            address: &ev.address,
            transport: if ev.secure { "coaps" } else { "coap" },
            servers: &ev.servers,
            lwm2m_version: ev.version.as_deref(),
            content_format: ev.format,
            psk_generated: ev.psk_generated,
            duration_ms: ev.duration_ms,
            step: f.map(|f| f.step.name()),
            path: f.and_then(|f| f.step.path()),
            code: f.map(|f| f.code.as_str()),
            diagnostic: f.and_then(|f| f.diagnostic.as_deref()),
        },
    })
}

#[cfg(test)]
mod tests;

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
//!
//! Where things are: this file holds the state, the inputs' dispatch and the
//! timers; `requests.rs` routes uplink requests; `register.rs` is the
//! Registration interface; `report.rs` is Information Reporting (Send,
//! Observe, notifications, publishing, acknowledgements after delivery);
//! `shards.rs` is cross-shard traffic; `control.rs` applies control-plane
//! changes and snapshots.

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
use super::rpc::{Presence, RpcEvent, RpcExec, RpcOutcome, RpcStatus};
use super::send;
use super::telemetry::{build_points, unmapped_names};
use crate::metrics::ShardMetrics;
use crate::proto::coap::block::{Block1Limits, Block1Step, Block1Table};
use crate::proto::coap::exchange::{token_of, ExchangeConfig, Exchanges, Inbound, Token};
use crate::proto::coap::{Code, Message, MessageBuilder, MsgType, PeerId};
use crate::proto::FastMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
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
    /// How long a queue-mode device listens after it sent something (TS
    /// 1.1 Transport §6.5; CoAP MAX_TRANSMIT_WAIT, 93 s, by default).
    pub queue_awake: Duration,
    /// Block size for our Block1 writes and Block2 reads (RFC 7959 SZX,
    /// 6 = 1024 bytes); the device's smaller size wins.
    pub block_szx: u8,
    /// Largest body reassembled from blocks: a device's Block2 response,
    /// or a Block1 request (Register, Send) to us (4.13 with Size1 above).
    pub max_body: usize,
    /// Block1 bodies being received at once.
    pub max_block1_assemblies: usize,
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
            queue_awake: Duration::from_secs(93),
            block_szx: 6,
            max_body: 64 * 1024,
            max_block1_assemblies: 1024,
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
    /// Serve (or, with `None`, stop serving) a firmware image at
    /// `/fw/{name}`.
    Firmware {
        name: Arc<str>,
        image: Option<FwImage>,
    },
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
    /// A request of the registration's RPC in flight.
    Rpc,
}

/// What one of our outstanding requests is for.
#[derive(Debug, Clone, Copy)]
struct Purpose {
    reg: RegId,
    path: ResourcePath,
    kind: Kind,
    /// When the request was handed to the exchange layer.
    sent_at: Instant,
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
    /// When the message arrived (its acknowledgement waits from then).
    since: Instant,
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
    /// The endpoint's credentials changed: its session ends with it.
    CredentialsChanged,
    /// Replaced by a newer registration (here or on another shard): silent.
    Replaced,
    /// Handed to another shard: silent, no home bookkeeping.
    Moved,
}

/// At most `BURST` lines per kind every 10 s; the rest are counted.
pub(crate) struct LogLimiter {
    window: Option<Instant>,
    lines: u32,
    suppressed: u32,
}

const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

impl LogLimiter {
    pub(crate) fn new() -> LogLimiter {
        LogLimiter {
            window: None,
            lines: 0,
            suppressed: 0,
        }
    }
    pub(crate) fn allow(&mut self, now: Instant, metrics: &ShardMetrics, shard: u16) -> bool {
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
    /// Registrations whose profile observations are still being set up:
    /// when the Register arrived, Observe requests not answered yet
    /// (`registration_setup_seconds`).
    setups: FastMap<RegId, (Instant, u16)>,
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
    /// What the DTLS layer must do with sessions, in order.
    session_cmds: Vec<SessionCmd>,
    /// The RPC in flight per registration (one at a time: per-device order).
    rpcs: FastMap<RegId, dm::InFlight>,
    /// RPC deadlines and queue-mode wake windows (lazy: stale entries are
    /// skipped when they come up).
    rpc_timers: BinaryHeap<Reverse<(Instant, RegId)>>,
    awake_timers: BinaryHeap<Reverse<(Instant, RegId)>>,
    /// Reports for the RPC control plane.
    rpc_events: VecDeque<RpcEvent>,
    /// The paths of composite observations, by token.
    composite: FastMap<Token, Box<[ResourcePath]>>,
    /// Block1 request bodies being received (Register, Send).
    blocks_in: Block1Table,
    /// Firmware images served at `/fw/{name}`.
    images: FastMap<Arc<str>, FwImage>,
    /// Downloads of those images in progress, by registration (progress
    /// reports for the firmware update RPC).
    downloads: FastMap<RegId, firmware::Download>,
    /// Trailing download progress reports (lazy, like `rpc_timers`).
    download_timers: BinaryHeap<Reverse<(Instant, RegId)>>,
}

/// The server's decisions about DTLS sessions, for the DTLS layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCmd {
    /// End it with close_notify: the credentials it authenticated with no
    /// longer hold (changed, endpoint removed).
    Revoke(PeerId),
    /// Drop it silently: no registration uses it any more (the device's
    /// datagrams come from another address or shard now).
    Retire(PeerId),
    /// It carries a registration: keep it this many seconds idle (the
    /// lifetime plus grace).
    IdleTimeout(PeerId, u32),
}

impl Server {
    pub fn new(cfg: ServerConfig, metrics: Arc<ShardMetrics>) -> Server {
        let mut rng = StdRng::seed_from_u64(
            cfg.seed ^ (cfg.shard as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let ex = Exchanges::new(cfg.exchange.clone(), rng.gen(), metrics.clone());
        let blocks_in = Block1Table::new(Block1Limits {
            max_body: cfg.max_body,
            max_assemblies: cfg.max_block1_assemblies,
            lifetime: cfg.exchange.exchange_lifetime.min(Duration::from_secs(120)),
        });
        Server {
            cfg,
            metrics,
            rng,
            authorizer: Box::new(DefaultAuthorizer::default()),
            ex,
            regs: Registry::default(),
            obs: FastMap::default(),
            requests: FastMap::default(),
            setups: FastMap::default(),
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
            session_cmds: Vec::new(),
            rpcs: FastMap::default(),
            rpc_timers: BinaryHeap::new(),
            awake_timers: BinaryHeap::new(),
            rpc_events: VecDeque::new(),
            composite: FastMap::default(),
            blocks_in,
            images: FastMap::default(),
            downloads: FastMap::default(),
            download_timers: BinaryHeap::new(),
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

    /// Approximate heap bytes of this shard's protocol state, by structure
    /// (tables at their capacity: what a burst grew stays until shrunk).
    /// `benches/memory.rs` prints it per device.
    pub fn heap_estimate(&self) -> Vec<(&'static str, usize)> {
        use crate::proto::heap;
        let mut out = Vec::new();
        self.regs.heap_estimate(&mut out);
        out.push(("observations", heap::map(&self.obs)));
        out.push((
            "server requests",
            heap::map(&self.requests) + heap::map(&self.setups),
        ));
        out.push(("acks awaiting delivery", heap::map(&self.acks)));
        out.push((
            "homed + tombstones",
            heap::map(&self.homed) + heap::map(&self.tombstones),
        ));
        out.push((
            "rpc in flight + timers",
            heap::map(&self.rpcs)
                + heap::buf::<Reverse<(Instant, RegId)>>(
                    self.rpc_timers.capacity() + self.awake_timers.capacity(),
                ),
        ));
        out.push((
            "queues (backlog, shard out, rpc events)",
            heap::buf::<OwnedStatus>(self.backlog.capacity())
                + heap::buf::<(Dest, ShardMsg)>(self.shard_out.capacity())
                + heap::buf::<RpcEvent>(self.rpc_events.capacity()),
        ));
        self.ex.heap_estimate(&mut out);
        out
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

    /// The next report for the RPC control plane.
    pub fn poll_rpc_event(&mut self) -> Option<RpcEvent> {
        self.rpc_events.pop_front()
    }

    /// Session commands for the DTLS layer since the last call.
    pub fn take_session_cmds(&mut self) -> Vec<SessionCmd> {
        std::mem::take(&mut self.session_cmds)
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
        let rpc = self.next_rpc_timer();
        [
            self.ex.poll_timeout(),
            self.regs.next_expiry(),
            self.backlog_retry,
            rpc,
            self.blocks_in.poll_timeout(),
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
                self.ex.reject_malformed(peer, data);
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
        self.drain_failures(now);
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

    // ------------------------------------------------------------ timers

    /// Retransmissions, request timeouts, lifetime expiry, status retries.
    pub fn handle_timeout(&mut self, now: Now, ctx: &mut Ctx<'_>) {
        self.ex.handle_timeout(now.instant);
        self.drain_failures(now);
        // LwM2M TS 1.1 Core §6.2.1: the registration is removed when its
        // lifetime passes without an Update.
        while let Some(id) = self.regs.next_expired(now.instant) {
            if self.end_registration(now, ctx, id, End::Expired).is_some() {
                ShardMetrics::inc(&self.metrics.expirations);
            }
        }
        self.tombstones.retain(|_, until| *until > now.instant);
        self.rpc_timeouts(now);
        if self
            .blocks_in
            .poll_timeout()
            .is_some_and(|t| t <= now.instant)
        {
            let n = self.blocks_in.sweep(now.instant);
            ShardMetrics::add(&self.metrics.block1_expired, n as u64);
        }
        self.flush_backlog(now, ctx);
        crate::proto::heap::shrink_map(&mut self.requests);
        crate::proto::heap::shrink_map(&mut self.setups);
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
        ShardMetrics::set(&self.metrics.block1_assemblies, self.blocks_in.len() as i64);
    }
}

fn loc_string(id: RegId) -> String {
    String::from_utf8_lossy(&registration::location(id)).into_owned()
}

pub use crate::proto::lwm2m::firmware::FwImage;

mod control;
mod dm;
mod firmware;
mod query;
mod register;
mod report;
mod requests;
mod shards;
pub use query::{DeviceView, ObservationView};
#[cfg(test)]
mod tests;

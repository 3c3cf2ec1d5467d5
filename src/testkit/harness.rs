//! A deterministic in-memory world, in the spirit of quinn's `Pair`: the
//! gateway's shards ([`Gateway`]: several [`Server`]s with in-memory sinks,
//! the cross-shard messages between them, and a reuseport "kernel" that maps
//! each source address to a shard), simulated devices with a real CoAP
//! client's reliability ([`SimClient`]: one CON at a time, RFC 7252 §4.2
//! retransmission), and a network ([`World`]) with per-direction loss,
//! duplication and latency jitter (which reorders), all on fake time that
//! jumps to the next event. Same seed, same run.

use crate::control::profiles::Profiles;
use crate::metrics::ShardMetrics;
use crate::proto::coap::{Code, Message, MsgType, PeerId};
use crate::proto::lwm2m::content::ResourcePath;
use crate::proto::lwm2m::endpoint::{EndpointEntry, EndpointMap};
use crate::proto::lwm2m::profile::ProfileMap;
use crate::proto::lwm2m::rpc::{RpcEvent, RpcExec};
use crate::proto::lwm2m::server::{ControlMsg, Ctx, Dest, Now, Server, ServerConfig, ShardMsg};
use crate::testkit::memory_sink::MemorySink;
use crate::testkit::sim::SimDevice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Epoch ms of the harness's time zero.
pub const WALL0: i64 = 1_800_000_000_000;

/// The shard the kernel's reuseport hash would pick for `addr` (any fixed
/// function of the 4-tuple does; this one spreads ports).
pub fn default_route(addr: SocketAddr, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in addr.to_string().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

pub fn entry(device_id: &str, tenant: &str) -> EndpointEntry {
    EndpointEntry::new(device_id, tenant, "default")
}

/// The gateway's shards in memory.
pub struct Gateway {
    pub shards: Vec<Server>,
    pub sinks: Vec<MemorySink>,
    pub endpoints: EndpointMap,
    pub profiles: ProfileMap,
    /// Source address → shard (the kernel's reuseport hash).
    pub router: Box<dyn Fn(SocketAddr) -> usize>,
    /// Confirm every record as soon as it is queued (the broker is fast).
    pub auto_deliver: bool,
    /// What the shards reported to the RPC control plane, in order.
    pub rpc_events: Vec<(usize, RpcEvent)>,
}

pub type Out = Vec<(SocketAddr, Vec<u8>)>;

impl Gateway {
    pub fn new(shards: usize, cfg: ServerConfig) -> Gateway {
        let servers = (0..shards)
            .map(|i| {
                let c = ServerConfig {
                    shard: i as u16,
                    shards: shards as u16,
                    seed: cfg.seed.wrapping_add(i as u64 * 7919),
                    ..cfg.clone()
                };
                Server::new(c, Arc::new(ShardMetrics::default()))
            })
            .collect();
        let n = shards;
        let clock = std::rc::Rc::new(std::cell::Cell::new(0));
        Gateway {
            shards: servers,
            sinks: (0..shards)
                .map(|_| MemorySink {
                    clock: Some(clock.clone()),
                    ..MemorySink::default()
                })
                .collect(),
            endpoints: EndpointMap::default(),
            profiles: (*Profiles::from_profiles(vec![]).snapshot()).clone(),
            router: Box::new(move |a| default_route(a, n)),
            auto_deliver: true,
            rpc_events: Vec::new(),
        }
    }

    pub fn provision(&mut self, endpoint: &str, device_id: &str) {
        self.endpoints
            .insert(endpoint.into(), Arc::new(entry(device_id, "acme")));
    }

    pub fn shard_of(&self, addr: SocketAddr) -> usize {
        (self.router)(addr)
    }

    fn with_ctx(&mut self, i: usize, f: impl FnOnce(&mut Server, &mut Ctx<'_>)) {
        let Gateway {
            shards,
            sinks,
            endpoints,
            profiles,
            ..
        } = self;
        let mut ctx = Ctx {
            endpoints,
            profiles,
            sink: &mut sinks[i],
        };
        f(&mut shards[i], &mut ctx);
    }

    /// A datagram from `from`, to whichever shard the kernel picks.
    pub fn datagram(&mut self, now: Now, from: SocketAddr, data: &[u8]) -> Out {
        let i = self.shard_of(from);
        self.with_ctx(i, |s, ctx| {
            s.handle_datagram(now, ctx, PeerId::udp(from), None, data)
        });
        self.pump(now)
    }

    pub fn oversized(&mut self, now: Now, from: SocketAddr, prefix: &[u8]) -> Out {
        let i = self.shard_of(from);
        self.shards[i].handle_oversized(now, PeerId::udp(from), prefix);
        self.pump(now)
    }

    pub fn timeout(&mut self, now: Now) -> Out {
        for i in 0..self.shards.len() {
            self.with_ctx(i, |s, ctx| s.handle_timeout(now, ctx));
        }
        self.pump(now)
    }

    /// An RPC handed to shard `i`.
    pub fn exec(&mut self, now: Now, i: usize, exec: RpcExec) -> Out {
        self.shards[i].handle_rpc_exec(now, exec);
        self.pump(now)
    }

    /// The shard whose latest presence report for `device_id` says online.
    pub fn shard_holding(&self, device_id: &str) -> Option<usize> {
        self.rpc_events
            .iter()
            .rev()
            .find_map(|(i, e)| match e {
                RpcEvent::Presence(p) if p.device_id == device_id => Some((*i, p.online)),
                _ => None,
            })
            .and_then(|(i, online)| online.then_some(i))
    }

    pub fn control(&mut self, now: Now, msg: ControlMsg) -> Out {
        for i in 0..self.shards.len() {
            let m = msg.clone();
            self.with_ctx(i, |s, ctx| s.handle_control(now, ctx, m));
        }
        self.pump(now)
    }

    /// Confirms every record in flight.
    pub fn deliver(&mut self, now: Now) -> Out {
        for i in 0..self.shards.len() {
            for tag in self.sinks[i].deliver_all() {
                self.shards[i].handle_delivery(now, tag, true);
            }
        }
        self.pump(now)
    }

    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.shards
            .iter_mut()
            .filter_map(|s| s.poll_timeout())
            .min()
    }

    /// Runs shard messages and deliveries to quiescence; returns the
    /// datagrams sent meanwhile.
    pub fn pump(&mut self, now: Now) -> Out {
        let mut out = Out::new();
        loop {
            let mut msgs: VecDeque<(usize, Dest, ShardMsg)> = VecDeque::new();
            let mut events = Vec::new();
            for (i, s) in self.shards.iter_mut().enumerate() {
                out.extend(s.transmits().map(|(p, d)| (p.addr(), d.to_vec())));
                s.clear_transmits();
                while let Some(e) = s.poll_rpc_event() {
                    events.push((i, e));
                }
                while let Some((d, m)) = s.poll_shard_msg() {
                    msgs.push_back((i, d, m));
                }
            }
            self.rpc_events.extend(events);
            let mut delivered = false;
            if self.auto_deliver {
                for i in 0..self.shards.len() {
                    for tag in self.sinks[i].deliver_all() {
                        self.shards[i].handle_delivery(now, tag, true);
                        delivered = true;
                    }
                }
            }
            if msgs.is_empty() && !delivered {
                for s in self.shards.iter_mut() {
                    out.extend(s.transmits().map(|(p, d)| (p.addr(), d.to_vec())));
                    s.clear_transmits();
                }
                return out;
            }
            for (from, dest, m) in msgs {
                let targets: Vec<usize> = match dest {
                    Dest::Shard(j) => vec![j as usize],
                    Dest::Others => (0..self.shards.len()).filter(|j| *j != from).collect(),
                };
                for j in targets {
                    if j < self.shards.len() {
                        let m = m.clone();
                        self.with_ctx(j, |s, ctx| s.handle_shard_msg(now, ctx, m));
                    }
                }
            }
        }
    }

    /// Telemetry records of all shards, in the order they were published.
    pub fn telemetry(&self) -> Vec<&serde_json::Value> {
        let mut v: Vec<(u64, &serde_json::Value)> = self
            .sinks
            .iter()
            .flat_map(|s| s.telemetry_order.iter().copied().zip(s.telemetry.iter()))
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    }

    /// Status events of all shards, in the order they were published.
    pub fn status(&self) -> Vec<&serde_json::Value> {
        let mut v: Vec<(u64, &serde_json::Value)> = self
            .sinks
            .iter()
            .flat_map(|s| s.status_order.iter().copied().zip(s.status.iter()))
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    }

    pub fn registrations(&self) -> usize {
        self.shards.iter().map(|s| s.registration_count()).sum()
    }

    pub fn observations(&self) -> usize {
        self.shards.iter().map(|s| s.observation_count()).sum()
    }

    /// Where `endpoint` is registered: (shard, location, address), for every
    /// shard that holds it.
    pub fn where_is(&self, endpoint: &str) -> Vec<(usize, String, PeerId)> {
        self.shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.registration_of(endpoint).map(|(l, p)| (i, l, p)))
            .collect()
    }

    /// Sum of a metric over shards.
    pub fn metric(&self, name: &str) -> i64 {
        self.shards
            .iter()
            .map(|s| {
                s.metrics()
                    .values()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v)
                    .unwrap_or(0)
            })
            .sum()
    }
}

// ---------------------------------------------------------------- clients

/// What a client is waiting for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pending {
    Register,
    Update,
    Deregister,
    Notify(f64),
}

struct Outstanding {
    kind: Pending,
    mid: u16,
    bytes: Vec<u8>,
    tries: u32,
    timeout: Duration,
    next_at: Duration,
}

/// A simulated device with a CoAP client's reliability: its CON messages go
/// one at a time (NSTART = 1) and are retransmitted with RFC 7252 §4.2
/// back-off until acknowledged or MAX_RETRANSMIT is exhausted.
pub struct SimClient {
    pub dev: SimDevice,
    pub addr: SocketAddr,
    queue: VecDeque<(Pending, u16, Vec<u8>)>,
    current: Option<Outstanding>,
    /// Notification values the gateway acknowledged.
    pub acked: Vec<f64>,
    /// Notification values given up on (no ACK after MAX_RETRANSMIT) or
    /// rejected with RST.
    pub unacked: Vec<f64>,
    pub registered: bool,
    /// Registers again at this time (after a failed Register or a 4.04).
    pub retry_register_at: Option<Duration>,
    rng: StdRng,
}

const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;

impl SimClient {
    pub fn new(endpoint: &str, addr: SocketAddr, seed: u64) -> SimClient {
        SimClient {
            dev: SimDevice::new(endpoint, seed as u16),
            addr,
            queue: VecDeque::new(),
            current: None,
            acked: Vec::new(),
            unacked: Vec::new(),
            registered: false,
            retry_register_at: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn register(&mut self) {
        let r = self.dev.register();
        let mid = self.dev.outstanding.unwrap_or(0);
        self.queue.push_back((Pending::Register, mid, r));
    }

    pub fn update(&mut self) {
        let r = self.dev.update(None, false);
        let mid = self.dev.outstanding.unwrap_or(0);
        self.queue.push_back((Pending::Update, mid, r));
    }

    pub fn deregister(&mut self) {
        let r = self.dev.deregister();
        let mid = self.dev.outstanding.unwrap_or(0);
        self.queue.push_back((Pending::Deregister, mid, r));
    }

    /// Queues a CON notification of `value` on `path`; false when the path
    /// is not observed.
    pub fn notify(&mut self, path: &str, value: f64) -> bool {
        let Some(rp) = ResourcePath::parse(path) else {
            return false;
        };
        self.dev.values.insert(rp, value);
        match self.dev.notify(path, true) {
            Some((mid, bytes)) => {
                self.queue.push_back((Pending::Notify(value), mid, bytes));
                true
            }
            None => false,
        }
    }

    pub fn idle(&self) -> bool {
        self.current.is_none() && self.queue.is_empty()
    }

    pub fn deadline(&self) -> Option<Duration> {
        let a = self.current.as_ref().map(|c| c.next_at);
        let b = (self.current.is_none() && !self.queue.is_empty()).then_some(Duration::ZERO);
        [a, b, self.retry_register_at].into_iter().flatten().min()
    }

    /// Sends, retransmits, gives up; returns datagrams to send.
    pub fn tick(&mut self, now: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if self.retry_register_at.is_some_and(|t| t <= now) {
            self.retry_register_at = None;
            if !self.queue.iter().any(|q| q.0 == Pending::Register) {
                self.register();
            }
        }
        if let Some(c) = &mut self.current {
            if c.next_at <= now {
                if c.tries < MAX_RETRANSMIT {
                    c.tries += 1;
                    c.timeout *= 2;
                    c.next_at = now + c.timeout;
                    out.push(c.bytes.clone());
                } else {
                    let kind = c.kind;
                    self.current = None;
                    self.failed(kind, now);
                }
            }
        }
        if self.current.is_none() {
            if let Some((kind, mid, bytes)) = self.queue.pop_front() {
                let f = self.rng.gen_range(1.0..1.5);
                let timeout = ACK_TIMEOUT.mul_f64(f);
                out.push(bytes.clone());
                self.current = Some(Outstanding {
                    kind,
                    mid,
                    bytes,
                    tries: 0,
                    timeout,
                    next_at: now + timeout,
                });
            }
        }
        out
    }

    fn failed(&mut self, kind: Pending, now: Duration) {
        match kind {
            Pending::Notify(v) => self.unacked.push(v),
            Pending::Register | Pending::Update => {
                self.registered = false;
                self.retry_register_at = Some(now + Duration::from_secs(10));
            }
            Pending::Deregister => self.registered = false,
        }
    }

    /// A datagram from the gateway; returns datagrams to send.
    pub fn on_datagram(&mut self, now: Duration, data: &[u8]) -> Vec<Vec<u8>> {
        let Ok(m) = Message::decode(data) else {
            return Vec::new();
        };
        let done = self.current.as_ref().is_some_and(|c| {
            c.mid == m.message_id && matches!(m.mtype, MsgType::Ack | MsgType::Rst)
        });
        let ev = self.dev.handle(data);
        if done {
            let c = self.current.take().map(|c| c.kind);
            match c {
                Some(Pending::Notify(v)) => {
                    if m.mtype == MsgType::Ack {
                        self.acked.push(v)
                    } else {
                        self.unacked.push(v)
                    }
                }
                Some(Pending::Register) => {
                    if m.code == Code::CREATED {
                        self.registered = true;
                    } else {
                        self.retry_register_at = Some(now + Duration::from_secs(5));
                    }
                }
                Some(Pending::Update) if m.code == Code::NOT_FOUND => {
                    self.registered = false;
                    self.retry_register_at = Some(now);
                }
                Some(Pending::Update) => {}
                Some(Pending::Deregister) => self.registered = false,
                None => {}
            }
        }
        let mut out = ev.replies;
        out.extend(self.tick(now));
        out
    }
}

// ---------------------------------------------------------------- world

/// One direction of the network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    pub loss: f64,
    pub duplicate: f64,
    pub latency: Duration,
    /// Extra delay, uniform in [0, jitter]: datagrams overtake each other.
    pub jitter: Duration,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Hop {
    Up(SocketAddr),
    Down(SocketAddr),
}

/// A datagram on the wire: arrival time, order of sending, where, bytes.
type InFlight = (Duration, u64, Hop, Vec<u8>);

pub struct World {
    pub gw: Gateway,
    pub clients: Vec<SimClient>,
    pub up: Link,
    pub down: Link,
    pub t0: Instant,
    pub now: Duration,
    rng: StdRng,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
}

impl World {
    pub fn new(gw: Gateway, seed: u64) -> World {
        World {
            gw,
            clients: Vec::new(),
            up: Link::default(),
            down: Link::default(),
            t0: Instant::now(),
            now: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            in_flight: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn clock(&self) -> Now {
        Now {
            instant: self.t0 + self.now,
            wall_ms: WALL0 + self.now.as_millis() as i64,
        }
    }

    fn transmit(&mut self, hop: Hop, data: Vec<u8>) {
        let link = match hop {
            Hop::Up(_) => self.up,
            Hop::Down(_) => self.down,
        };
        if self.rng.gen_bool(link.loss.clamp(0.0, 1.0)) {
            return;
        }
        let copies = if self.rng.gen_bool(link.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let j = if link.jitter.is_zero() {
                Duration::ZERO
            } else {
                link.jitter.mul_f64(self.rng.gen_range(0.0..1.0))
            };
            self.seq += 1;
            let at = self.now + link.latency + j;
            let hop = match &hop {
                Hop::Up(a) => Hop::Up(*a),
                Hop::Down(a) => Hop::Down(*a),
            };
            self.in_flight
                .push(Reverse((at, self.seq, hop, data.clone())));
        }
    }

    fn route_out(&mut self, out: Out) {
        for (to, d) in out {
            self.transmit(Hop::Down(to), d);
        }
    }

    /// Sends what the clients have ready.
    fn tick_clients(&mut self) {
        for i in 0..self.clients.len() {
            if self.clients[i].deadline().is_some_and(|d| d <= self.now) {
                let addr = self.clients[i].addr;
                for d in self.clients[i].tick(self.now) {
                    self.transmit(Hop::Up(addr), d);
                }
            }
        }
    }

    /// Runs events until `now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.tick_clients();
            let net = self.in_flight.peek().map(|r| r.0 .0);
            let gw = self
                .gw
                .poll_timeout()
                .map(|t| t.saturating_duration_since(self.t0));
            let cl = self.clients.iter().filter_map(|c| c.deadline()).min();
            let Some(next) = [net, gw, cl].into_iter().flatten().min() else {
                self.now = end;
                return;
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            let now = self.clock();
            while let Some(Reverse((at, _, _, _))) = self.in_flight.peek() {
                if *at > self.now {
                    break;
                }
                let Some(Reverse((_, _, hop, data))) = self.in_flight.pop() else {
                    break;
                };
                match hop {
                    Hop::Up(from) => {
                        let out = self.gw.datagram(now, from, &data);
                        self.route_out(out);
                    }
                    Hop::Down(to) => {
                        if let Some(i) = self.clients.iter().position(|c| c.addr == to) {
                            let replies = self.clients[i].on_datagram(self.now, &data);
                            for r in replies {
                                self.transmit(Hop::Up(to), r);
                            }
                        }
                    }
                }
            }
            if gw.is_some_and(|t| t <= self.now) {
                let out = self.gw.timeout(now);
                self.route_out(out);
            }
        }
    }
}

//! The CoAP exchange layer (RFC 7252 §4, §5.2, §5.3), sans-IO, for any number
//! of peers of one shard.
//!
//! Inbound, [`Exchanges::handle`] classifies a decoded message: duplicates
//! (§4.5) are answered from the [`Dedup`] cache here, pings (§4.3) get RST,
//! empty ACKs and RSTs complete the message layer of our own requests, and
//! what is left goes up as a new request, a response to one of our requests
//! (matched by peer *and* token, §5.3.2; piggybacked ones also by MID), or an
//! unsolicited response (an Observe notification, RFC 7641, for the layer
//! above to match). The layer above answers with [`Exchanges::respond`],
//! [`Exchanges::ack`], [`Exchanges::reset`], or [`Exchanges::hold`] when the
//! answer must wait (Kafka delivery, another shard); every answer is cached
//! for duplicates.
//!
//! Outbound, [`Exchanges::request`] queues a CON request per peer and sends at
//! most NSTART of them at a time (§4.7; an interaction stops counting once it
//! is acknowledged). Message IDs are sequential per peer from a random start
//! (§4.4); tokens come from a CSPRNG (§5.3.1: "SHOULD be ... random"). CON
//! requests are retransmitted after a random initial timeout in
//! [ACK_TIMEOUT, ACK_TIMEOUT × ACK_RANDOM_FACTOR], doubling, at most
//! MAX_RETRANSMIT times (§4.2, §4.8); after an empty ACK the separate
//! response is awaited up to EXCHANGE_LIFETIME (§5.2.2). Failures (timeout,
//! RST) come out of [`Exchanges::poll_failed`].
//!
//! Call order for the owner: `handle` for each datagram (and answer it),
//! `handle_timeout` when `poll_timeout` is due, then send `transmits` and
//! `clear_transmits`. Nothing here reads a clock or touches a socket.

use super::builder::MessageBuilder;
use super::codec::{Block, Message, MsgType};
use super::dedup::{Cached, Dedup};
use super::peer::PeerId;
use crate::metrics::ShardMetrics;
use crate::proto::heap;
use crate::proto::FastMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Transmission parameters (RFC 7252 §4.8) and the dedup bound.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub ack_timeout: Duration,
    pub ack_random_factor: f64,
    pub max_retransmit: u32,
    pub exchange_lifetime: Duration,
    /// Outstanding interactions per peer (§4.7 NSTART, default 1).
    pub nstart: usize,
    /// Peers remembered by duplicate detection (see [`Dedup`]).
    pub dedup_max_peers: usize,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        ExchangeConfig {
            ack_timeout: Duration::from_secs(2),
            ack_random_factor: 1.5,
            max_retransmit: 4,
            exchange_lifetime: Duration::from_secs(247),
            nstart: 1,
            dedup_max_peers: 262_144,
        }
    }
}

/// Our tokens: 8 random bytes, handled as a number.
pub type Token = u64;
/// Opaque value the layer above attaches to a request and gets back with its
/// response or failure.
pub type RequestTag = u64;

/// What an inbound message is, once the message layer has dealt with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Fully handled here (duplicate, ping, empty ACK/RST, late response).
    Consumed,
    /// A new request: answer it (or `hold` it).
    Request,
    /// The response to our request `tag`. `separate` responses came in their
    /// own CON/NON message: a CON one must be answered with `ack` / `reset`.
    Response {
        tag: RequestTag,
        token: Token,
        separate: bool,
    },
    /// A CON/NON response matching none of our requests: an Observe
    /// notification, or garbage. Answer a CON with `ack` or `reset`.
    Unsolicited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// No ACK after MAX_RETRANSMIT, or no separate response within
    /// EXCHANGE_LIFETIME.
    Timeout,
    /// The peer rejected the request with RST.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    pub tag: RequestTag,
    pub token: Token,
    pub peer: PeerId,
    pub reason: FailReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for an NSTART slot.
    Queued,
    /// Sent, no ACK yet: counts against NSTART, retransmitted.
    Sent,
    /// Empty ACK received: waiting for the separate response.
    Acked,
}

struct Pending {
    peer: PeerId,
    tag: RequestTag,
    bytes: Box<[u8]>,
    mid: u16,
    state: State,
    retransmits: u32,
    timeout: Duration,
    deadline: Instant,
}

struct PeerOut {
    next_mid: u16,
    in_flight: usize,
    queue: VecDeque<Token>,
    tokens: SmallVec<[Token; 4]>,
}

pub struct Exchanges {
    cfg: ExchangeConfig,
    rng: StdRng,
    metrics: Arc<ShardMetrics>,
    dedup: Dedup,
    next_sweep: Option<Instant>,
    pending: FastMap<Token, Pending>,
    by_mid: FastMap<(PeerId, u16), Token>,
    peers: FastMap<PeerId, PeerOut>,
    /// The next MID of peers whose state was dropped (the registration
    /// ended, the device registers again from the same address), kept for
    /// EXCHANGE_LIFETIME: RFC 7252 §4.4 forbids reusing a MID towards the
    /// same endpoint within it, and a fresh random start could (the device
    /// would answer a new request with an old cached response).
    retired: FastMap<PeerId, (u16, Instant)>,
    retired_fifo: VecDeque<(Instant, PeerId)>,
    timers: BinaryHeap<Reverse<(Instant, Token)>>,
    failed: VecDeque<Failed>,
    /// MIDs for NON responses to peers we keep no state for.
    spare_mid: u16,
    out: Vec<u8>,
    out_meta: Vec<(PeerId, u32, u32)>,
    /// Block1 options to echo on the answer to (peer, MID): the final block
    /// of a block-wise request (RFC 7959 §2.3).
    echo: SmallVec<[(PeerId, u16, Block); 2]>,
}

/// Peers whose next MID is remembered after their state went (bounded
/// memory under registration churn; the oldest go first).
const MAX_RETIRED: usize = 262_144;

/// Dedup sweep period.
const SWEEP: Duration = Duration::from_secs(5);

pub fn token_of(bytes: &[u8]) -> Option<Token> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

impl Exchanges {
    pub fn new(cfg: ExchangeConfig, seed: u64, metrics: Arc<ShardMetrics>) -> Exchanges {
        let mut rng = StdRng::seed_from_u64(seed);
        let spare_mid = rng.gen();
        Exchanges {
            dedup: Dedup::new(cfg.exchange_lifetime, cfg.dedup_max_peers),
            cfg,
            rng,
            metrics,
            next_sweep: None,
            pending: FastMap::default(),
            by_mid: FastMap::default(),
            peers: FastMap::default(),
            retired: FastMap::default(),
            retired_fifo: VecDeque::new(),
            timers: BinaryHeap::new(),
            failed: VecDeque::new(),
            spare_mid,
            out: Vec::with_capacity(64 * 1024),
            out_meta: Vec::with_capacity(256),
            echo: SmallVec::new(),
        }
    }

    pub fn config(&self) -> &ExchangeConfig {
        &self.cfg
    }

    /// Approximate heap bytes of the exchange state, by structure.
    pub fn heap_estimate(&self, out: &mut Vec<(&'static str, usize)>) {
        out.push(("exchange: dedup", self.dedup.heap_estimate()));
        out.push(("exchange: pending", heap::map(&self.pending)));
        out.push(("exchange: by_mid", heap::map(&self.by_mid)));
        let queues: usize = self
            .peers
            .values()
            .map(|p| {
                heap::buf::<Token>(p.queue.capacity())
                    + if p.tokens.spilled() {
                        heap::buf::<Token>(p.tokens.capacity())
                    } else {
                        0
                    }
            })
            .sum();
        out.push(("exchange: peers", heap::map(&self.peers) + queues));
        out.push((
            "exchange: retired MIDs",
            heap::map(&self.retired) + heap::buf::<(Instant, PeerId)>(self.retired_fifo.capacity()),
        ));
        out.push((
            "exchange: timers",
            heap::buf::<Reverse<(Instant, Token)>>(self.timers.capacity()),
        ));
        out.push((
            "exchange: output buffers",
            self.out.capacity() + heap::buf::<(PeerId, u32, u32)>(self.out_meta.capacity()),
        ));
    }

    // ------------------------------------------------------------ output

    /// Datagrams to send, in order.
    pub fn transmits(&self) -> impl Iterator<Item = (PeerId, &[u8])> {
        self.out_meta
            .iter()
            .map(|(p, s, l)| (*p, &self.out[*s as usize..(*s + *l) as usize]))
    }

    pub fn has_transmits(&self) -> bool {
        !self.out_meta.is_empty()
    }

    pub fn clear_transmits(&mut self) {
        self.out.clear();
        self.out_meta.clear();
    }

    fn push(&mut self, peer: PeerId, f: impl FnOnce(&mut Vec<u8>)) -> (usize, usize) {
        let start = self.out.len();
        f(&mut self.out);
        let len = self.out.len() - start;
        self.out_meta.push((peer, start as u32, len as u32));
        (start, len)
    }

    fn send_empty(&mut self, peer: PeerId, t: MsgType, mid: u16) {
        if t == MsgType::Rst {
            ShardMetrics::inc(&self.metrics.rst_sent);
        }
        self.push(peer, |o| MessageBuilder::empty(t, mid).encode(o));
    }

    /// A request that failed (timeout or RST), oldest first.
    pub fn poll_failed(&mut self) -> Option<Failed> {
        self.failed.pop_front()
    }

    // ------------------------------------------------------------ inbound

    /// Classifies `msg` from `peer` and does the message-layer work.
    pub fn handle(&mut self, now: Instant, peer: PeerId, msg: &Message<'_>) -> Inbound {
        self.schedule_sweep(now);
        let mid = msg.message_id;
        if msg.code.is_empty() {
            match msg.mtype {
                // §4.3: an empty CON is a "CoAP ping", answered with RST.
                MsgType::Con => self.send_empty(peer, MsgType::Rst, mid),
                MsgType::Non => {}
                MsgType::Ack => {
                    if let Some(tok) = self.by_mid.get(&(peer, mid)).copied() {
                        self.on_empty_ack(now, tok);
                    }
                }
                MsgType::Rst => {
                    if let Some(tok) = self.by_mid.get(&(peer, mid)).copied() {
                        if let Some(p) = self.finish(now, tok) {
                            self.failed.push_back(Failed {
                                tag: p.tag,
                                token: tok,
                                peer,
                                reason: FailReason::Reset,
                            });
                        }
                    }
                }
            }
            return Inbound::Consumed;
        }
        if msg.code.is_request() {
            if matches!(msg.mtype, MsgType::Ack | MsgType::Rst) {
                // A request is CON or NON (§4.2, §4.3).
                ShardMetrics::inc(&self.metrics.malformed);
                return Inbound::Consumed;
            }
            if self.answer_duplicate(now, peer, msg) {
                return Inbound::Consumed;
            }
            return Inbound::Request;
        }
        if msg.code.is_response() {
            let token = token_of(msg.token);
            match msg.mtype {
                MsgType::Ack => {
                    // Piggybacked (§5.2.1): same MID and same token.
                    let t = self.by_mid.get(&(peer, mid)).copied();
                    if let Some(t) = t.filter(|t| Some(*t) == token) {
                        if let Some(p) = self.finish(now, t) {
                            return Inbound::Response {
                                tag: p.tag,
                                token: t,
                                separate: false,
                            };
                        }
                    }
                    // Late (already completed or timed out) or unknown.
                    return Inbound::Consumed;
                }
                MsgType::Rst => {
                    ShardMetrics::inc(&self.metrics.malformed);
                    return Inbound::Consumed;
                }
                MsgType::Con | MsgType::Non => {
                    if self.answer_duplicate(now, peer, msg) {
                        return Inbound::Consumed;
                    }
                    // Separate response (§5.2.2): matched by peer and token.
                    if let Some(t) = token.filter(|t| {
                        self.pending
                            .get(t)
                            .is_some_and(|p| p.peer == peer && p.state != State::Queued)
                    }) {
                        if let Some(p) = self.finish(now, t) {
                            return Inbound::Response {
                                tag: p.tag,
                                token: t,
                                separate: true,
                            };
                        }
                    }
                    return Inbound::Unsolicited;
                }
            }
        }
        // Reserved classes 1, 3, 6, 7 (§12.1): a CON is rejected.
        ShardMetrics::inc(&self.metrics.malformed);
        if msg.mtype == MsgType::Con {
            self.send_empty(peer, MsgType::Rst, mid);
        }
        Inbound::Consumed
    }

    /// Answers a duplicate from the cache; true when `msg` was one.
    fn answer_duplicate(&mut self, now: Instant, peer: PeerId, msg: &Message<'_>) -> bool {
        let Some(c) = self.dedup.check(now, &peer, msg.message_id) else {
            return false;
        };
        ShardMetrics::inc(&self.metrics.duplicates);
        if msg.mtype != MsgType::Con {
            return true;
        }
        let start = self.out.len();
        match c {
            Cached::Response(b) => self.out.extend_from_slice(b),
            Cached::EmptyAck => {
                MessageBuilder::empty(MsgType::Ack, msg.message_id).encode(&mut self.out)
            }
            Cached::Rst => {
                MessageBuilder::empty(MsgType::Rst, msg.message_id).encode(&mut self.out)
            }
            Cached::Seen | Cached::InProgress => return true,
        }
        let len = self.out.len() - start;
        self.out_meta.push((peer, start as u32, len as u32));
        true
    }

    fn schedule_sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP);
        }
    }

    /// Sends the reply to request `req` from `peer`: piggybacked in an ACK
    /// for a CON (§5.2.1), as a NON with a fresh MID for a NON (§5.2.3).
    /// `reply` carries code, token, options and payload; its type and MID are
    /// set here. `cache` = false for answers a retransmission must not get
    /// (5.03 back-pressure: the retry is processed anew).
    pub fn respond(
        &mut self,
        now: Instant,
        peer: PeerId,
        req: &Message<'_>,
        reply: MessageBuilder<'_>,
        cache: bool,
        protected: bool,
    ) {
        self.respond_to(
            now,
            peer,
            req.mtype,
            req.message_id,
            reply,
            cache,
            protected,
        )
    }

    /// [`Exchanges::respond`] for a request known by type and MID (one that
    /// was held and is answered later).
    #[allow(clippy::too_many_arguments)]
    pub fn respond_to(
        &mut self,
        now: Instant,
        peer: PeerId,
        req_type: MsgType,
        req_mid: u16,
        reply: MessageBuilder<'_>,
        cache: bool,
        protected: bool,
    ) {
        self.schedule_sweep(now);
        let reply = match self
            .echo
            .iter()
            .position(|(p, m, _)| *p == peer && *m == req_mid)
        {
            Some(i) => {
                let (_, _, b) = self.echo.swap_remove(i);
                reply.block1(b)
            }
            None => reply,
        };
        let reply = if req_type == MsgType::Con {
            reply.mtype(MsgType::Ack).mid(req_mid)
        } else {
            let mid = self.next_mid(peer);
            reply.mtype(MsgType::Non).mid(mid)
        };
        let (start, len) = self.push(peer, |o| reply.encode(o));
        if cache {
            let entry = if req_type == MsgType::Con {
                Cached::Response(self.out[start..start + len].into())
            } else {
                Cached::Seen
            };
            self.dedup.insert(now, peer, req_mid, entry, protected);
        } else {
            self.dedup.remove(&peer, req_mid);
        }
    }

    /// The answer to `(peer, mid)`, whenever it is sent, carries Block1
    /// option `b` (the last block of a block-wise request, RFC 7959 §2.3).
    pub fn echo_block1(&mut self, peer: PeerId, mid: u16, b: Block) {
        if self.echo.len() >= 64 {
            self.echo.remove(0);
        }
        self.echo.push((peer, mid, b));
    }

    /// Acknowledges a CON (notification or separate response) with an empty
    /// ACK; a NON is only recorded as seen.
    pub fn ack(&mut self, now: Instant, peer: PeerId, mtype: MsgType, mid: u16, protected: bool) {
        self.schedule_sweep(now);
        if mtype == MsgType::Con {
            self.send_empty(peer, MsgType::Ack, mid);
            self.dedup
                .insert(now, peer, mid, Cached::EmptyAck, protected);
        } else {
            self.dedup.insert(now, peer, mid, Cached::Seen, protected);
        }
    }

    /// Rejects a message with RST (§4.2, §4.3; RFC 7641 §3.6 for unwanted
    /// notifications), remembered so a retransmission gets RST again.
    pub fn reset(&mut self, now: Instant, peer: PeerId, mid: u16, protected: bool) {
        self.schedule_sweep(now);
        self.send_empty(peer, MsgType::Rst, mid);
        self.dedup.insert(now, peer, mid, Cached::Rst, protected);
    }

    /// RST without remembering anything (malformed input from anyone).
    pub fn reset_stateless(&mut self, peer: PeerId, mid: u16) {
        self.send_empty(peer, MsgType::Rst, mid);
    }

    /// `data` did not decode as a message. RFC 7252 §4.2: a CON with a
    /// message format error is rejected with RST; other types are silently
    /// ignored (§4.3); version mismatches are silently ignored (§3). The RST
    /// (4 bytes) is never larger than what came in.
    pub fn reject_malformed(&mut self, peer: PeerId, data: &[u8]) {
        if let Some(h) = super::codec::Header::peek(data) {
            if h.version == super::codec::VERSION && h.mtype == MsgType::Con {
                self.reset_stateless(peer, h.message_id);
            }
        }
    }

    /// Marks (peer, mid) as being processed: retransmissions are dropped
    /// silently until `respond_to` / `ack` answers or `release` gives up.
    pub fn hold(&mut self, now: Instant, peer: PeerId, mid: u16, protected: bool) {
        self.schedule_sweep(now);
        self.dedup
            .insert(now, peer, mid, Cached::InProgress, protected);
    }

    /// Gives up a held message: its next retransmission is processed anew.
    pub fn release(&mut self, peer: PeerId, mid: u16) {
        self.dedup.remove(&peer, mid);
    }

    /// Leaves a message unanswered and unrecorded (a CON notification the
    /// sink could not take: the device retransmits it, §4.2).
    pub fn ignore(&mut self, peer: PeerId, mid: u16) {
        self.dedup.remove(&peer, mid);
    }

    pub fn dedup_peers(&self) -> usize {
        self.dedup.peers()
    }

    pub fn dedup_evicted(&self) -> u64 {
        self.dedup.evicted()
    }

    // ------------------------------------------------------------ outbound

    fn peer_out(&mut self, peer: PeerId) -> &mut PeerOut {
        let rng = &mut self.rng;
        let retired = &mut self.retired;
        self.peers.entry(peer).or_insert_with(|| PeerOut {
            next_mid: retired.remove(&peer).map_or_else(|| rng.gen(), |(m, _)| m),
            in_flight: 0,
            queue: VecDeque::new(),
            tokens: SmallVec::new(),
        })
    }

    fn next_mid(&mut self, peer: PeerId) -> u16 {
        match self.peers.get_mut(&peer) {
            Some(p) => {
                let m = p.next_mid;
                p.next_mid = m.wrapping_add(1);
                m
            }
            // An idle peer continues its retired sequence (§4.4).
            None => match self.retired.get_mut(&peer) {
                Some((m, _)) => {
                    let r = *m;
                    *m = r.wrapping_add(1);
                    r
                }
                None => {
                    let m = self.spare_mid;
                    self.spare_mid = m.wrapping_add(1);
                    m
                }
            },
        }
    }

    /// A fresh random token that is neither pending here nor `taken` above.
    pub fn alloc_token(&mut self, taken: impl Fn(Token) -> bool) -> Token {
        loop {
            let t: u64 = self.rng.gen();
            if t != 0 && !self.pending.contains_key(&t) && !taken(t) {
                return t;
            }
        }
    }

    /// Queues the CON request `msg` (its token must be `token`'s bytes; type
    /// and MID are set here) for `peer`. It is sent when an NSTART slot is
    /// free.
    pub fn request(
        &mut self,
        now: Instant,
        peer: PeerId,
        token: Token,
        msg: MessageBuilder<'_>,
        tag: RequestTag,
    ) {
        let bytes = msg.mtype(MsgType::Con).mid(0).to_vec().into_boxed_slice();
        let p = self.peer_out(peer);
        p.queue.push_back(token);
        p.tokens.push(token);
        let queued = p.in_flight >= self.cfg.nstart.max(1);
        self.pending.insert(
            token,
            Pending {
                peer,
                tag,
                bytes,
                mid: 0,
                state: State::Queued,
                retransmits: 0,
                timeout: Duration::ZERO,
                deadline: now,
            },
        );
        if queued {
            ShardMetrics::inc(&self.metrics.requests_queued);
        }
        self.dispatch(now, peer);
    }

    /// Sends queued requests while NSTART allows.
    fn dispatch(&mut self, now: Instant, peer: PeerId) {
        let nstart = self.cfg.nstart.max(1);
        loop {
            let Some(po) = self.peers.get_mut(&peer) else {
                return;
            };
            if po.in_flight >= nstart {
                return;
            }
            let Some(tok) = po.queue.pop_front() else {
                return;
            };
            let Some(p) = self.pending.get_mut(&tok) else {
                continue;
            };
            let mid = po.next_mid;
            po.next_mid = mid.wrapping_add(1);
            po.in_flight += 1;
            p.mid = mid;
            p.bytes[2..4].copy_from_slice(&mid.to_be_bytes());
            p.state = State::Sent;
            let base = self.cfg.ack_timeout.as_secs_f64();
            let factor = self.cfg.ack_random_factor.max(1.0);
            p.timeout = Duration::from_secs_f64(self.rng.gen_range(base..=base * factor));
            p.deadline = now + p.timeout;
            let deadline = p.deadline;
            let start = self.out.len();
            self.out.extend_from_slice(&p.bytes);
            self.out_meta
                .push((peer, start as u32, p.bytes.len() as u32));
            self.by_mid.insert((peer, mid), tok);
            self.timers.push(Reverse((deadline, tok)));
            ShardMetrics::inc(&self.metrics.requests_sent);
        }
    }

    fn on_empty_ack(&mut self, now: Instant, tok: Token) {
        let Some(p) = self.pending.get_mut(&tok) else {
            return;
        };
        if p.state != State::Sent {
            return;
        }
        // §5.2.2: the separate response follows; §4.7: the interaction no
        // longer counts against NSTART.
        p.state = State::Acked;
        p.deadline = now + self.cfg.exchange_lifetime;
        let (peer, deadline) = (p.peer, p.deadline);
        self.timers.push(Reverse((deadline, tok)));
        if let Some(po) = self.peers.get_mut(&peer) {
            po.in_flight = po.in_flight.saturating_sub(1);
        }
        self.dispatch(now, peer);
    }

    /// Removes a pending request (answered, failed or cancelled), frees its
    /// NSTART slot and sends the next queued one.
    fn finish(&mut self, now: Instant, tok: Token) -> Option<Pending> {
        let p = self.pending.remove(&tok)?;
        if p.state != State::Queued {
            self.by_mid.remove(&(p.peer, p.mid));
        }
        if let Some(po) = self.peers.get_mut(&p.peer) {
            po.tokens.retain(|t| *t != tok);
            match p.state {
                State::Sent => po.in_flight = po.in_flight.saturating_sub(1),
                State::Queued => po.queue.retain(|t| *t != tok),
                State::Acked => {}
            }
            if po.tokens.is_empty() && po.queue.is_empty() && po.in_flight == 0 {
                // Nothing outstanding: an idle device costs no outbound
                // state; only its next MID is remembered, for
                // EXCHANGE_LIFETIME (RFC 7252 §4.4).
                let next_mid = po.next_mid;
                self.peers.remove(&p.peer);
                self.retire(now, p.peer, next_mid);
                return Some(p);
            }
        }
        self.dispatch(now, p.peer);
        Some(p)
    }

    /// Cancels one request silently (no failure reported).
    pub fn cancel(&mut self, now: Instant, tok: Token) -> Option<RequestTag> {
        self.finish(now, tok).map(|p| p.tag)
    }

    /// Tags of the requests pending for `peer` (queued or sent).
    pub fn pending_for(&self, peer: &PeerId) -> Vec<(Token, RequestTag)> {
        self.peers
            .get(peer)
            .map(|po| {
                po.tokens
                    .iter()
                    .filter_map(|t| self.pending.get(t).map(|p| (*t, p.tag)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops every request and the outbound state of `peer` (it moved to
    /// another shard or went away). Nothing is reported.
    pub fn forget_peer(&mut self, now: Instant, peer: &PeerId) {
        self.prune_retired(now);
        if let Some(po) = self.peers.remove(peer) {
            self.retire(now, *peer, po.next_mid);
            for t in po.tokens {
                if let Some(p) = self.pending.remove(&t) {
                    if p.state != State::Queued {
                        self.by_mid.remove(&(p.peer, p.mid));
                    }
                }
            }
        }
    }

    /// Remembers the next MID of a peer whose outbound state went.
    fn retire(&mut self, now: Instant, peer: PeerId, next_mid: u16) {
        self.prune_retired(now);
        self.retired.insert(peer, (next_mid, now));
        self.retired_fifo.push_back((now, peer));
        self.schedule_sweep(now);
    }

    /// Retired MIDs older than EXCHANGE_LIFETIME may be used again (and the
    /// oldest go first past the cap: `MAX_RETIRED`, or the dedup cap when an
    /// operator sized that for a bigger fleet, since every device whose
    /// exchanges finished within EXCHANGE_LIFETIME is retired, a whole
    /// registration storm at once).
    fn prune_retired(&mut self, now: Instant) {
        let life = self.cfg.exchange_lifetime;
        let cap = MAX_RETIRED.max(self.cfg.dedup_max_peers);
        while let Some((at, p)) = self.retired_fifo.front().copied() {
            if at + life > now && self.retired_fifo.len() < cap {
                break;
            }
            self.retired_fifo.pop_front();
            if self.retired.get(&p).is_some_and(|(_, t)| *t == at) {
                self.retired.remove(&p);
            }
        }
    }

    /// The device behind `old` now talks from `new` (address change on
    /// Update): its requests in flight and queued follow it.
    pub fn rebind_peer(&mut self, old: PeerId, new: PeerId) {
        if old == new {
            return;
        }
        let Some(po) = self.peers.remove(&old) else {
            return;
        };
        for t in &po.tokens {
            if let Some(p) = self.pending.get_mut(t) {
                if p.state != State::Queued {
                    self.by_mid.remove(&(old, p.mid));
                    self.by_mid.insert((new, p.mid), *t);
                }
                p.peer = new;
            }
        }
        match self.peers.get_mut(&new) {
            Some(existing) => {
                existing.in_flight += po.in_flight;
                existing.queue.extend(po.queue);
                existing.tokens.extend(po.tokens);
            }
            None => {
                self.peers.insert(new, po);
            }
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    // ------------------------------------------------------------ timers

    /// The earliest time `handle_timeout` has work to do.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Drop timers of requests that completed or were rescheduled.
        while let Some(Reverse((at, tok))) = self.timers.peek().copied() {
            match self.pending.get(&tok) {
                Some(p) if p.deadline == at && p.state != State::Queued => break,
                _ => {
                    self.timers.pop();
                }
            }
        }
        let t = self.timers.peek().map(|r| r.0 .0);
        match (t, self.next_sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Retransmits, times out, sweeps duplicate detection.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, tok))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.pending.get_mut(&tok) else {
                continue;
            };
            if p.deadline != at || p.state == State::Queued {
                continue;
            }
            if p.state == State::Sent && p.retransmits < self.cfg.max_retransmit {
                p.retransmits += 1;
                p.timeout *= 2;
                p.deadline = now + p.timeout;
                let (peer, deadline) = (p.peer, p.deadline);
                let start = self.out.len();
                self.out.extend_from_slice(&p.bytes);
                self.out_meta
                    .push((peer, start as u32, p.bytes.len() as u32));
                self.timers.push(Reverse((deadline, tok)));
                ShardMetrics::inc(&self.metrics.retransmissions);
            } else if let Some(p) = self.finish(now, tok) {
                ShardMetrics::inc(&self.metrics.request_timeouts);
                self.failed.push_back(Failed {
                    tag: p.tag,
                    token: tok,
                    peer: p.peer,
                    reason: FailReason::Timeout,
                });
            }
        }
        if self.next_sweep.is_some_and(|t| t <= now) {
            let before = self.dedup.evicted();
            self.dedup.sweep(now);
            debug_assert_eq!(before, self.dedup.evicted());
            self.prune_retired(now);
            // Tables a burst grew give their memory back once idle.
            heap::shrink_map(&mut self.retired);
            heap::shrink_deque(&mut self.retired_fifo);
            heap::shrink_map(&mut self.pending);
            heap::shrink_map(&mut self.by_mid);
            heap::shrink_map(&mut self.peers);
            heap::shrink_heap(&mut self.timers);
            self.next_sweep =
                (self.dedup.peers() > 0 || !self.retired.is_empty()).then_some(now + SWEEP);
        }
        ShardMetrics::set(&self.metrics.dedup_peers, self.dedup.peers() as i64);
        ShardMetrics::set(&self.metrics.pending_requests, self.pending.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::coap::Code;

    fn ex() -> Exchanges {
        Exchanges::new(
            ExchangeConfig::default(),
            7,
            Arc::new(ShardMetrics::default()),
        )
    }

    fn peer(port: u16) -> PeerId {
        PeerId::udp(([10, 0, 0, 1], port).into())
    }

    fn sent(e: &mut Exchanges) -> Vec<(PeerId, Vec<u8>)> {
        let v = e.transmits().map(|(p, d)| (p, d.to_vec())).collect();
        e.clear_transmits();
        v
    }

    fn get(e: &mut Exchanges, now: Instant, p: PeerId, tag: u64) -> Token {
        let t = e.alloc_token(|_| false);
        let tb = t.to_be_bytes();
        e.request(
            now,
            p,
            t,
            MessageBuilder::request(Code::GET, true)
                .token(&tb)
                .path("/3/0/9"),
            tag,
        );
        t
    }

    #[test]
    fn nstart_one_queues_and_releases_on_ack() {
        let t0 = Instant::now();
        let mut e = ex();
        let p = peer(1);
        let a = get(&mut e, t0, p, 1);
        let _b = get(&mut e, t0, p, 2);
        let out = sent(&mut e);
        assert_eq!(out.len(), 1, "NSTART = 1: one request on the wire");
        let m = Message::decode(&out[0].1).unwrap();
        assert_eq!(token_of(m.token), Some(a));
        // Empty ACK: the interaction is over for NSTART; the next one goes.
        let ack = MessageBuilder::empty(MsgType::Ack, m.message_id).to_vec();
        let ackm = Message::decode(&ack).unwrap();
        assert_eq!(e.handle(t0, p, &ackm), Inbound::Consumed);
        let out2 = sent(&mut e);
        assert_eq!(out2.len(), 1);
        let m2 = Message::decode(&out2[0].1).unwrap();
        assert_eq!(m2.message_id, m.message_id.wrapping_add(1));
        // The separate CON response to the first, matched by peer and token.
        let tb = a.to_be_bytes();
        let sep = MessageBuilder::request(Code::CONTENT, true)
            .mid(77)
            .token(&tb)
            .to_vec();
        let sepm = Message::decode(&sep).unwrap();
        assert_eq!(
            e.handle(t0, peer(2), &sepm),
            Inbound::Unsolicited,
            "same token from another peer is not our response"
        );
        assert_eq!(
            e.handle(t0, p, &sepm),
            Inbound::Response {
                tag: 1,
                token: a,
                separate: true
            }
        );
    }

    /// RFC 7252 §4.4: a peer whose state was dropped (its registration
    /// ended, it registered again from the same address) gets the MIDs
    /// after its last ones, not a fresh random start that could repeat a
    /// recent one; after EXCHANGE_LIFETIME anything goes.
    #[test]
    fn mids_continue_after_the_peer_state_is_dropped() {
        let t0 = Instant::now();
        let mut e = ex();
        let p = peer(1);
        get(&mut e, t0, p, 1);
        let m1 = Message::decode(&sent(&mut e)[0].1).unwrap().message_id;
        e.forget_peer(t0, &p);
        get(&mut e, t0, p, 2);
        let m2 = Message::decode(&sent(&mut e)[0].1).unwrap().message_id;
        assert_eq!(m2, m1.wrapping_add(1));
        // Another peer's retirement long after sweeps this one out.
        e.forget_peer(t0, &p);
        e.forget_peer(t0 + Duration::from_secs(300), &peer(2));
        assert!(!e.retired.contains_key(&p));
        assert!(e.retired.len() <= 1);
    }

    #[test]
    fn retransmits_with_backoff_then_fails() {
        let t0 = Instant::now();
        let mut e = ex();
        let p = peer(1);
        get(&mut e, t0, p, 9);
        assert_eq!(sent(&mut e).len(), 1);
        let mut times = Vec::new();
        let mut failed = None;
        while let Some(t) = e.poll_timeout() {
            if t > t0 + Duration::from_secs(400) {
                break;
            }
            e.handle_timeout(t);
            if !sent(&mut e).is_empty() {
                times.push((t - t0).as_secs_f64());
            }
            if failed.is_none() {
                failed = e.poll_failed().map(|f| (f, t));
            }
        }
        assert_eq!(times.len(), 4, "MAX_RETRANSMIT = 4");
        // Initial timeout in [2, 3] s, then doubling: the last retransmission
        // lands between 30 and 45 s (MAX_TRANSMIT_SPAN, §4.8.2).
        assert!(times[0] >= 2.0 && times[0] <= 3.0, "{times:?}");
        assert!(times[3] >= 30.0 && times[3] <= 45.0, "{times:?}");
        let (f, at) = failed.unwrap();
        assert_eq!((f.tag, f.reason), (9, FailReason::Timeout));
        assert!(at - t0 <= Duration::from_secs(93), "MAX_TRANSMIT_WAIT");
        // The failed peer's outbound state is gone; its next MID is kept
        // for EXCHANGE_LIFETIME only (§4.4), then the sweeps stop.
        assert!(e.peers.is_empty());
        assert!(e.retired.is_empty() && e.poll_timeout().is_none());
    }

    #[test]
    fn duplicates_get_the_cached_answer() {
        let t0 = Instant::now();
        let mut e = ex();
        let p = peer(1);
        let req = MessageBuilder::request(Code::POST, true)
            .mid(5)
            .token(&[1])
            .path("rd")
            .to_vec();
        let m = Message::decode(&req).unwrap();
        assert_eq!(e.handle(t0, p, &m), Inbound::Request);
        e.respond(
            t0,
            p,
            &m,
            MessageBuilder::new(MsgType::Ack, Code::CREATED).token(m.token),
            true,
            false,
        );
        let first = sent(&mut e);
        assert_eq!(e.handle(t0, p, &m), Inbound::Consumed);
        assert_eq!(sent(&mut e), first);
        // Held: duplicates are silent until answered.
        let req2 = MessageBuilder::request(Code::POST, true)
            .mid(6)
            .token(&[2])
            .path("dp")
            .to_vec();
        let m2 = Message::decode(&req2).unwrap();
        assert_eq!(e.handle(t0, p, &m2), Inbound::Request);
        e.hold(t0, p, 6, false);
        assert_eq!(e.handle(t0, p, &m2), Inbound::Consumed);
        assert!(sent(&mut e).is_empty());
        e.respond_to(
            t0,
            p,
            MsgType::Con,
            6,
            MessageBuilder::new(MsgType::Ack, Code::CHANGED).token(&[2]),
            true,
            false,
        );
        assert_eq!(sent(&mut e).len(), 1);
        assert_eq!(e.handle(t0, p, &m2), Inbound::Consumed);
        assert_eq!(sent(&mut e).len(), 1);
    }

    #[test]
    fn rebind_moves_requests_to_the_new_address() {
        let t0 = Instant::now();
        let mut e = ex();
        let (old, new) = (peer(1), peer(2));
        let a = get(&mut e, t0, old, 1);
        let out = sent(&mut e);
        let mid = Message::decode(&out[0].1).unwrap().message_id;
        e.rebind_peer(old, new);
        let tb = a.to_be_bytes();
        let resp = MessageBuilder::new(MsgType::Ack, Code::CONTENT)
            .mid(mid)
            .token(&tb)
            .to_vec();
        let m = Message::decode(&resp).unwrap();
        assert_eq!(e.handle(t0, old, &m), Inbound::Consumed);
        assert_eq!(
            e.handle(t0, new, &m),
            Inbound::Response {
                tag: 1,
                token: a,
                separate: false
            }
        );
    }

    /// An answered peer keeps no outbound state (memory per idle device),
    /// but its next request continues the MID sequence (RFC 7252 §4.4).
    #[test]
    fn idle_peers_are_retired_and_continue_their_mids() {
        let t0 = Instant::now();
        let mut e = ex();
        let p = peer(1);
        let a = get(&mut e, t0, p, 1);
        let m1 = Message::decode(&sent(&mut e)[0].1).unwrap().message_id;
        assert_eq!(e.peers.len(), 1);
        let tb = a.to_be_bytes();
        let resp = MessageBuilder::new(MsgType::Ack, Code::CONTENT)
            .mid(m1)
            .token(&tb)
            .to_vec();
        let m = Message::decode(&resp).unwrap();
        assert!(matches!(e.handle(t0, p, &m), Inbound::Response { .. }));
        assert!(e.peers.is_empty(), "no outbound state once answered");
        assert_eq!(e.retired.get(&p).map(|r| r.0), Some(m1.wrapping_add(1)));
        get(&mut e, t0 + Duration::from_secs(1), p, 2);
        let m2 = Message::decode(&sent(&mut e)[0].1).unwrap().message_id;
        assert_eq!(m2, m1.wrapping_add(1));
    }
}

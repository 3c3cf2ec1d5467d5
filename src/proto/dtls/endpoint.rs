//! The per-shard DTLS endpoint (RFC 6347), sans-IO.
//!
//! Input: datagrams from the shard's DTLS socket (`handle_datagram(now,
//! peer, buf)`, decrypted in place) and timers (`handle_timeout`). Output:
//! plaintext CoAP messages handed to a callback as slices of the receive
//! buffer, and datagrams to send (`transmits`). CoAP responses and
//! requests to a DTLS peer go through [`DtlsEndpoint::seal`].
//!
//! A datagram from an address without a session or handshake must start
//! with a ClientHello. Without a valid cookie it is answered with a
//! HelloVerifyRequest and forgotten (RFC 6347 §4.2.1). With one, and within
//! the caps, the [`Acceptor`] starts a handshake (OpenSSL in production).
//! When it completes, the endpoint keeps only a [`Session`] and drops the
//! handshake object; from then on it protects records itself.

use super::cipher::{Keys, RecordCipher, Side};
use super::cookie::CookieJar;
use super::handshake::{self, msg_type};
use super::record::{self, content_type, HEADER_LEN};
use super::session::{pack_flight, CloseReason, ReplayWindow, Session};
use crate::metrics::ShardMetrics;
use crate::proto::lwm2m::endpoint::Identity;
use crate::proto::lwm2m::server::Now;
use crate::proto::FastMap;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Caps and timers (the `[dtls]` configuration section).
#[derive(Debug, Clone)]
pub struct DtlsConfig {
    /// Handshakes in progress per shard; a verified ClientHello over the
    /// cap is dropped (the client retransmits it).
    pub max_handshakes: usize,
    /// Established sessions per shard.
    pub max_sessions: usize,
    /// Handshakes a source address may start per second (0: no limit).
    pub handshakes_per_ip_per_s: u32,
    /// A handshake not done by then is abandoned.
    pub handshake_timeout: Duration,
    /// A session with no authenticated record for this long is dropped.
    pub idle_timeout: Duration,
    /// Cookie secret lifetime.
    pub cookie_rotate: Duration,
}

impl Default for DtlsConfig {
    fn default() -> Self {
        DtlsConfig {
            max_handshakes: 2048,
            max_sessions: 1_000_000,
            handshakes_per_ip_per_s: 0,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(86_400 + 7_200),
            cookie_rotate: Duration::from_secs(60),
        }
    }
}

/// What a handshake says after an input.
pub enum HandshakeStatus {
    InProgress,
    Done(Box<Established>),
    Failed(String),
}

/// The result of a completed handshake.
pub struct Established {
    pub keys: Keys,
    pub identity: Identity,
    /// Which credentials the handshake used ([`credential_tag`] of a PSK
    /// key; 0 for certificates): a session whose credentials changed in
    /// the directory is ended.
    pub cred_tag: u64,
}

/// A short, one-way tag of a PSK key (the first 8 bytes of its SHA-256).
pub fn credential_tag(key: &[u8]) -> u64 {
    let d = openssl::sha::sha256(key);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// One server-side handshake in progress.
pub trait Handshake {
    /// One datagram from the peer.
    fn handle_datagram(&mut self, datagram: &[u8]);
    /// The next datagram the handshake wants sent.
    fn poll_transmit(&mut self) -> Option<Vec<u8>>;
    /// Time until the flight retransmission timer fires (RFC 6347 §4.2.4).
    fn timeout(&mut self) -> Option<Duration>;
    /// The retransmission timer fired.
    fn handle_timeout(&mut self);
    fn status(&mut self) -> HandshakeStatus;
}

/// Starts handshakes.
pub trait Acceptor {
    type H: Handshake;
    /// A handshake from the ClientHello datagram `hello`, whose cookie the
    /// endpoint verified.
    fn accept(&mut self, peer: SocketAddr, hello: &[u8]) -> Result<Self::H, String>;
}

struct Pending<H> {
    h: H,
    deadline: Instant,
    /// When the handshake's own timer fires.
    timer: Option<Instant>,
    /// Datagrams sent since the last input: after the client's final
    /// flight, the server's final flight.
    flight: Vec<Vec<u8>>,
    /// Next epoch-1 sequence number the handshake did not use.
    server_next: u64,
    /// Epoch-1 records the client sent (its Finished).
    client_epoch1: ReplayWindow,
    hello_tag: u64,
    /// The ServerHello agreed to encrypt-then-MAC (RFC 7366).
    etm: bool,
}

fn hello_tag(random: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&random[..8]);
    u64::from_be_bytes(b)
}

pub struct DtlsEndpoint<A: Acceptor> {
    cfg: DtlsConfig,
    acceptor: A,
    cookies: CookieJar,
    rng: StdRng,
    cipher: RecordCipher,
    handshakes: FastMap<SocketAddr, Pending<A::H>>,
    sessions: FastMap<SocketAddr, (Session, u64)>,
    /// PSK identity → the peers with a session on it (credential changes
    /// re-check those sessions only).
    by_psk: FastMap<Vec<u8>, smallvec::SmallVec<[SocketAddr; 1]>>,
    rate: FastMap<IpAddr, u32>,
    rate_window: Option<Instant>,
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    next_sweep: Instant,
    tx: Vec<u8>,
    tx_list: Vec<(SocketAddr, Range<usize>)>,
    closed: Vec<(SocketAddr, Identity, CloseReason)>,
    metrics: Arc<ShardMetrics>,
}

impl<A: Acceptor> DtlsEndpoint<A> {
    /// `seed` seeds the cookie secrets (pass OS entropy).
    pub fn new(
        now: Instant,
        cfg: DtlsConfig,
        acceptor: A,
        seed: [u8; 32],
        metrics: Arc<ShardMetrics>,
    ) -> Result<Self, String> {
        let mut rng = StdRng::from_seed(seed);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let sweep = cfg
            .idle_timeout
            .min(Duration::from_secs(10))
            .max(Duration::from_millis(100));
        Ok(DtlsEndpoint {
            cookies: CookieJar::new(now, secret, cfg.cookie_rotate),
            next_sweep: now + sweep,
            cfg,
            acceptor,
            rng,
            cipher: RecordCipher::new().map_err(|e| e.to_string())?,
            handshakes: FastMap::default(),
            sessions: FastMap::default(),
            by_psk: FastMap::default(),
            rate: FastMap::default(),
            rate_window: None,
            timers: BinaryHeap::new(),
            tx: Vec::new(),
            tx_list: Vec::new(),
            closed: Vec::new(),
            metrics,
        })
    }

    pub fn config(&self) -> &DtlsConfig {
        &self.cfg
    }

    pub fn acceptor_mut(&mut self) -> &mut A {
        &mut self.acceptor
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    pub fn session(&self, peer: &SocketAddr) -> Option<&Session> {
        self.sessions.get(peer).map(|(s, _)| s)
    }

    /// Datagrams to send.
    pub fn transmits(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.tx_list.iter().map(|(a, r)| (*a, &self.tx[r.clone()]))
    }

    pub fn has_transmits(&self) -> bool {
        !self.tx_list.is_empty()
    }

    pub fn clear_transmits(&mut self) {
        self.tx.clear();
        self.tx_list.clear();
    }

    /// Sessions that ended since the last call.
    pub fn take_closed(&mut self) -> Vec<(SocketAddr, Identity, CloseReason)> {
        std::mem::take(&mut self.closed)
    }

    fn push_tx(&mut self, peer: SocketAddr, d: &[u8]) {
        let s = self.tx.len();
        self.tx.extend_from_slice(d);
        self.tx_list.push((peer, s..self.tx.len()));
    }

    fn gauges(&self) {
        ShardMetrics::set(&self.metrics.dtls_sessions, self.sessions.len() as i64);
        ShardMetrics::set(&self.metrics.dtls_handshakes, self.handshakes.len() as i64);
    }

    /// One datagram from `peer`. Application data is decrypted in place
    /// and handed to `app` with the session's identity.
    pub fn handle_datagram(
        &mut self,
        now: Now,
        peer: SocketAddr,
        buf: &mut [u8],
        mut app: impl FnMut(&Identity, &[u8]),
    ) {
        if !record::looks_like_dtls(buf) {
            ShardMetrics::inc(&self.metrics.dtls_dropped_malformed);
            return;
        }
        // While a new handshake from a peer with a session runs (RFC 6347
        // §4.2.8), its handshake records go to the handshake and
        // application data to the old session.
        let to_handshake =
            self.handshakes.contains_key(&peer) && buf[0] != content_type::APPLICATION_DATA;
        if !to_handshake
            && self.sessions.contains_key(&peer)
            && !self.session_datagram(now, peer, buf, &mut app)
        {
            // The record path: gauges move only when a session ends (end()).
            return;
        }
        if let Some(p) = self.handshakes.get_mut(&peer) {
            p.flight.clear();
            for r in record::records(buf).flatten() {
                if r.epoch == 1 {
                    p.client_epoch1.mark(r.seq);
                }
            }
            p.h.handle_datagram(buf);
            self.drive(now, peer);
            self.gauges();
            return;
        }
        self.hello(now, peer, buf);
        self.gauges();
    }

    /// Records for an established session. Returns true when the datagram
    /// is a new ClientHello (a new handshake from this address, RFC 6347
    /// §4.2.8), which the caller handles as from an unknown peer.
    fn session_datagram(
        &mut self,
        now: Now,
        peer: SocketAddr,
        buf: &mut [u8],
        app: &mut impl FnMut(&Identity, &[u8]),
    ) -> bool {
        let mut off = 0;
        while off < buf.len() {
            let (len, ct, epoch, seq) = match record::parse(&buf[off..]) {
                Ok((r, _)) => (
                    HEADER_LEN + r.fragment.len(),
                    r.content_type,
                    r.epoch,
                    r.seq,
                ),
                Err(_) => {
                    ShardMetrics::inc(&self.metrics.dtls_dropped_malformed);
                    return false;
                }
            };
            let Some((s, tag)) = self.sessions.get_mut(&peer) else {
                return false;
            };
            let (head, frag) = buf[off..off + len].split_at_mut(HEADER_LEN);
            let frag_len = frag.len();
            off += len;
            if epoch == s.epoch
                && (ct == content_type::APPLICATION_DATA || ct == content_type::ALERT)
            {
                if !s.replay.check(seq) {
                    ShardMetrics::inc(&self.metrics.dtls_records_replayed);
                    continue;
                }
                let mut header = [0u8; HEADER_LEN];
                header.copy_from_slice(head);
                let r = match self.cipher.open(&s.keys, Side::Client, &header, frag) {
                    Ok(r) => r,
                    Err(_) => {
                        ShardMetrics::inc(&self.metrics.dtls_records_bad);
                        continue;
                    }
                };
                s.replay.mark(seq);
                s.last_rx_ms = now.wall_ms;
                if ct == content_type::APPLICATION_DATA {
                    s.final_flight = None;
                    app(&s.identity, &frag[r]);
                    continue;
                }
                // Alert (RFC 5246 §7.2): level, description.
                ShardMetrics::inc(&self.metrics.dtls_alerts_rx);
                let a = &frag[r];
                if a.len() == 2 && (a[1] == 0 || a[0] == 2) {
                    let reason = if a[1] == 0 {
                        CloseReason::CloseNotify
                    } else {
                        CloseReason::FatalAlert(a[1])
                    };
                    self.end(peer, reason);
                    return false;
                }
                continue;
            }
            if epoch == 0 && ct == content_type::HANDSHAKE {
                if let Ok(h) = handshake::parse_header(frag) {
                    if h.msg_type == msg_type::CLIENT_HELLO {
                        // The ClientHello of the handshake that made this
                        // session, retransmitted: answer with the final
                        // flight if kept; a new one: a new handshake.
                        let start = off - len;
                        let same = handshake::client_hello(&buf[start..])
                            .map(|ch| hello_tag(ch.random) == *tag)
                            .unwrap_or(false);
                        if !same {
                            return true;
                        }
                    }
                }
            }
            if epoch == 0
                && (ct == content_type::HANDSHAKE || ct == content_type::CHANGE_CIPHER_SPEC)
            {
                // The first records of a retransmitted final flight; its
                // Finished (below) triggers the answer.
                continue;
            }
            if epoch == s.epoch && ct == content_type::HANDSHAKE {
                // The client retransmitted its final flight: our Finished
                // was lost (RFC 6347 §4.2.4). Answer it again, once per
                // flight (on its Finished, the flight's last record). A
                // record too short to be an encrypted Finished (12-byte
                // header + 12-byte verify_data + AEAD or CBC overhead)
                // does not trigger it: no amplification by spoofed records.
                if s.final_flight.is_some() && frag_len >= 24 + 16 {
                    let flight: Vec<Vec<u8>> = s.final_flight().map(|d| d.to_vec()).collect();
                    for d in flight {
                        self.push_tx(peer, &d);
                    }
                    ShardMetrics::inc(&self.metrics.dtls_final_flight_resent);
                }
                return false;
            }
            ShardMetrics::inc(&self.metrics.dtls_dropped_malformed);
        }
        false
    }

    fn rate_ok(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.cfg.handshakes_per_ip_per_s == 0 {
            return true;
        }
        if self
            .rate_window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.rate.clear();
            self.rate_window = Some(now);
        }
        let n = self.rate.entry(ip).or_insert(0);
        *n += 1;
        *n <= self.cfg.handshakes_per_ip_per_s
    }

    fn hello(&mut self, now: Now, peer: SocketAddr, buf: &[u8]) {
        let hello = match handshake::client_hello(buf) {
            Ok(h) => h,
            Err(_) => {
                ShardMetrics::inc(&self.metrics.dtls_records_no_session);
                return;
            }
        };
        if hello.cookie.is_empty() || !self.cookies.verify(peer, &hello) {
            // RFC 6347 §4.2.1: answer statelessly, never larger than the
            // hello (no amplification).
            let cookie = self.cookies.cookie(peer, &hello);
            let start = self.tx.len();
            handshake::write_hello_verify_request(&mut self.tx, &hello, &cookie);
            if self.tx.len() - start > buf.len() {
                self.tx.truncate(start);
                return;
            }
            self.tx_list.push((peer, start..self.tx.len()));
            ShardMetrics::inc(&self.metrics.dtls_hello_verify_sent);
            return;
        }
        if self.handshakes.len() >= self.cfg.max_handshakes {
            ShardMetrics::inc(&self.metrics.dtls_dropped_handshake_cap);
            return;
        }
        if !self.sessions.contains_key(&peer) && self.sessions.len() >= self.cfg.max_sessions {
            ShardMetrics::inc(&self.metrics.dtls_dropped_session_cap);
            return;
        }
        if !self.rate_ok(now.instant, peer.ip()) {
            ShardMetrics::inc(&self.metrics.dtls_dropped_rate);
            return;
        }
        let tag = hello_tag(hello.random);
        match self.acceptor.accept(peer, buf) {
            Ok(h) => {
                ShardMetrics::inc(&self.metrics.dtls_handshakes_started);
                let deadline = now.instant + self.cfg.handshake_timeout;
                self.handshakes.insert(
                    peer,
                    Pending {
                        h,
                        deadline,
                        timer: None,
                        flight: Vec::new(),
                        server_next: 0,
                        client_epoch1: ReplayWindow::default(),
                        hello_tag: tag,
                        etm: false,
                    },
                );
                self.timers.push(Reverse((deadline, peer)));
                self.drive(now, peer);
            }
            Err(e) => {
                ShardMetrics::inc(&self.metrics.dtls_handshakes_failed);
                tracing::debug!(%peer, error = %e, "DTLS handshake could not start");
            }
        }
    }

    /// Sends what the handshake wrote and acts on its status.
    fn drive(&mut self, now: Now, peer: SocketAddr) {
        let Some(p) = self.handshakes.get_mut(&peer) else {
            return;
        };
        while let Some(d) = p.h.poll_transmit() {
            for r in record::records(&d).flatten() {
                if r.epoch == 1 {
                    p.server_next = p.server_next.max(r.seq + 1);
                }
            }
            if let Some(exts) = handshake::server_hello_extensions(&d) {
                p.etm = handshake::has_extension(exts, handshake::EXT_ENCRYPT_THEN_MAC);
            }
            let s = self.tx.len();
            self.tx.extend_from_slice(&d);
            self.tx_list.push((peer, s..self.tx.len()));
            p.flight.push(d);
        }
        match p.h.status() {
            HandshakeStatus::InProgress => {
                p.timer = p.h.timeout().map(|d| now.instant + d);
                if let Some(t) = p.timer {
                    self.timers.push(Reverse((t.min(p.deadline), peer)));
                }
            }
            HandshakeStatus::Done(est) => {
                let Some(p) = self.handshakes.remove(&peer) else {
                    return;
                };
                let session = Session {
                    keys: est.keys.with_encrypt_then_mac(p.etm),
                    identity: est.identity,
                    epoch: 1,
                    write_seq: p.server_next,
                    replay: p.client_epoch1,
                    last_rx_ms: now.wall_ms,
                    final_flight: Some(pack_flight(p.flight.iter().map(|d| d.as_slice()))),
                    cred_tag: est.cred_tag,
                    idle_s: 0,
                };
                tracing::debug!(%peer, identity = %session.identity.describe(), suite = ?session.keys.suite, "DTLS session established");
                ShardMetrics::inc(&self.metrics.dtls_handshakes_completed);
                if let Some(started) = p.deadline.checked_sub(self.cfg.handshake_timeout) {
                    self.metrics
                        .dtls_handshake_seconds
                        .observe(now.instant.saturating_duration_since(started));
                }
                self.index(peer, &session.identity, true);
                if let Some((old, _)) = self.sessions.insert(peer, (session, p.hello_tag)) {
                    ShardMetrics::inc(&self.metrics.dtls_sessions_replaced);
                    self.unindex_replaced(peer, &old.identity);
                    self.closed
                        .push((peer, old.identity, CloseReason::Replaced));
                }
            }
            HandshakeStatus::Failed(why) => {
                self.handshakes.remove(&peer);
                ShardMetrics::inc(&self.metrics.dtls_handshakes_failed);
                tracing::debug!(%peer, reason = %why, "DTLS handshake failed");
            }
        }
    }

    /// Encrypts one CoAP message for `peer`'s session and queues it.
    /// False (and counted) when the peer has no session.
    pub fn seal(&mut self, peer: SocketAddr, plaintext: &[u8]) -> bool {
        let Some((s, _)) = self.sessions.get_mut(&peer) else {
            ShardMetrics::inc(&self.metrics.dtls_tx_no_session);
            return false;
        };
        let start = self.tx.len();
        match self.cipher.seal(
            &s.keys,
            Side::Server,
            content_type::APPLICATION_DATA,
            s.epoch,
            s.write_seq,
            plaintext,
            &mut self.tx,
        ) {
            Ok(()) => {
                s.write_seq += 1;
                self.tx_list.push((peer, start..self.tx.len()));
                true
            }
            Err(_) => false,
        }
    }

    /// Ends a session (the gateway's decision: credentials changed): a
    /// close_notify alert goes out, the keys are dropped.
    pub fn close(&mut self, peer: SocketAddr, reason: CloseReason) -> bool {
        let Some((s, _)) = self.sessions.get_mut(&peer) else {
            return false;
        };
        let start = self.tx.len();
        if self
            .cipher
            .seal(
                &s.keys,
                Side::Server,
                content_type::ALERT,
                s.epoch,
                s.write_seq,
                &[1, 0],
                &mut self.tx,
            )
            .is_ok()
        {
            s.write_seq += 1;
            self.tx_list.push((peer, start..self.tx.len()));
        }
        self.end(peer, reason);
        self.gauges();
        true
    }

    /// Sets a session's idle timeout (its registration's lifetime + grace).
    pub fn set_idle_timeout(&mut self, peer: SocketAddr, secs: u32) {
        if let Some((s, _)) = self.sessions.get_mut(&peer) {
            s.idle_s = secs;
        }
    }

    /// Drops a session silently (no registration uses it any more).
    pub fn forget(&mut self, peer: SocketAddr) {
        self.end(peer, CloseReason::Retired);
        self.gauges();
    }

    /// Ends every session `f` selects (identity, credential tag).
    pub fn close_where(
        &mut self,
        reason: CloseReason,
        mut f: impl FnMut(&Identity, u64) -> bool,
    ) -> usize {
        let peers: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(_, (s, _))| f(&s.identity, s.cred_tag))
            .map(|(a, _)| *a)
            .collect();
        for p in &peers {
            self.close(*p, reason);
        }
        peers.len()
    }

    /// Ends the PSK sessions of `identities` that `f` selects (identity,
    /// credential tag): a credential change costs the sessions it concerns,
    /// not a walk over every session.
    pub fn close_psk_where<'a>(
        &mut self,
        reason: CloseReason,
        identities: impl IntoIterator<Item = &'a [u8]>,
        mut f: impl FnMut(&[u8], u64) -> bool,
    ) -> usize {
        let mut peers: Vec<SocketAddr> = Vec::new();
        for id in identities {
            for p in self.by_psk.get(id).into_iter().flatten() {
                if let Some((s, _)) = self.sessions.get(p) {
                    if matches!(&s.identity, Identity::Psk(i) if i == id) && f(id, s.cred_tag) {
                        peers.push(*p);
                    }
                }
            }
        }
        peers.sort_unstable();
        peers.dedup();
        for p in &peers {
            self.close(*p, reason);
        }
        peers.len()
    }

    /// Adds (or removes) `peer` under its PSK identity in `by_psk`.
    fn index(&mut self, peer: SocketAddr, identity: &Identity, add: bool) {
        let Identity::Psk(id) = identity else {
            return;
        };
        if add {
            let v = self.by_psk.entry(id.clone()).or_default();
            if !v.contains(&peer) {
                v.push(peer);
            }
        } else if let Some(v) = self.by_psk.get_mut(id.as_slice()) {
            v.retain(|p| *p != peer);
            if v.is_empty() {
                self.by_psk.remove(id.as_slice());
            }
        }
    }

    /// A session replaced at `peer`: its identity's entry goes unless the
    /// new session has the same identity.
    fn unindex_replaced(&mut self, peer: SocketAddr, old: &Identity) {
        let same = self
            .sessions
            .get(&peer)
            .is_some_and(|(s, _)| s.identity == *old);
        if !same {
            self.index(peer, old, false);
        }
    }

    fn end(&mut self, peer: SocketAddr, reason: CloseReason) {
        if let Some((s, _)) = self.sessions.remove(&peer) {
            self.index(peer, &s.identity, false);
            ShardMetrics::set(&self.metrics.dtls_sessions, self.sessions.len() as i64);
            ShardMetrics::inc(&self.metrics.dtls_sessions_closed);
            tracing::debug!(%peer, identity = %s.identity.describe(), reason = reason.as_str(), "DTLS session ended");
            self.closed.push((peer, s.identity, reason));
        }
    }

    /// The earliest timer: a handshake's retransmission or deadline, the
    /// cookie rotation, the idle sweep.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.cookies.rotation_due().min(self.next_sweep);
        if let Some(Reverse((h, _))) = self.timers.peek() {
            t = t.min(*h);
        }
        Some(t)
    }

    pub fn handle_timeout(&mut self, now: Now) {
        let t = now.instant;
        while let Some(Reverse((at, peer))) = self.timers.peek().copied() {
            if at > t {
                break;
            }
            self.timers.pop();
            let Some(p) = self.handshakes.get_mut(&peer) else {
                continue;
            };
            if t >= p.deadline {
                self.handshakes.remove(&peer);
                ShardMetrics::inc(&self.metrics.dtls_handshake_timeouts);
                tracing::debug!(%peer, "DTLS handshake timed out");
                continue;
            }
            if p.timer.is_some_and(|x| x <= t) {
                p.flight.clear();
                p.h.handle_timeout();
                self.drive(now, peer);
            }
        }
        if t >= self.cookies.rotation_due() {
            let mut secret = [0u8; 32];
            self.rng.fill_bytes(&mut secret);
            self.cookies.rotate(t, secret);
        }
        if t >= self.next_sweep {
            let sweep = self
                .cfg
                .idle_timeout
                .min(Duration::from_secs(10))
                .max(Duration::from_millis(100));
            self.next_sweep = t + sweep;
            let default_ms = self.cfg.idle_timeout.as_millis() as i64;
            let expired: Vec<SocketAddr> = self
                .sessions
                .iter()
                .filter(|(_, (s, _))| {
                    let idle_ms = if s.idle_s > 0 {
                        s.idle_s as i64 * 1000
                    } else {
                        default_ms
                    };
                    now.wall_ms - s.last_rx_ms >= idle_ms
                })
                .map(|(a, _)| *a)
                .collect();
            for p in expired {
                self.end(p, CloseReason::Idle);
            }
        }
        self.gauges();
    }

    /// The established sessions, for the shutdown snapshot.
    pub fn export_sessions(&self) -> Vec<(SocketAddr, Session)> {
        self.sessions
            .iter()
            .map(|(a, (s, _))| (*a, s.clone()))
            .collect()
    }

    /// Restores a session saved by [`Self::export_sessions`]. The write
    /// sequence moves forward a little: a number the old process might have
    /// used after its export is never reused.
    pub fn import_session(&mut self, peer: SocketAddr, mut s: Session) {
        s.write_seq += 64;
        s.final_flight = None;
        self.index(peer, &s.identity, true);
        if let Some((old, _)) = self.sessions.insert(peer, (s, 0)) {
            self.unindex_replaced(peer, &old.identity);
        }
        ShardMetrics::inc(&self.metrics.dtls_sessions_restored);
        self.gauges();
    }
}

#[cfg(test)]
mod tests {
    use super::super::cipher::Suite;
    use super::super::handshake::testing;
    use super::*;
    use std::collections::VecDeque;

    /// A scripted handshake: completes after `rounds` inputs, replying one
    /// epoch-1 record per input.
    struct Fake {
        rounds: usize,
        out: VecDeque<Vec<u8>>,
        fail: bool,
    }

    impl Handshake for Fake {
        fn handle_datagram(&mut self, _d: &[u8]) {
            self.rounds = self.rounds.saturating_sub(1);
            let mut r = Vec::new();
            record::write_header(&mut r, content_type::HANDSHAKE, record::DTLS1_2, 1, 3, 1);
            r.push(0);
            self.out.push_back(r);
        }
        fn poll_transmit(&mut self) -> Option<Vec<u8>> {
            self.out.pop_front()
        }
        fn timeout(&mut self) -> Option<Duration> {
            Some(Duration::from_secs(1))
        }
        fn handle_timeout(&mut self) {
            self.out.push_back(b"\x16retransmit".to_vec());
        }
        fn status(&mut self) -> HandshakeStatus {
            if self.fail {
                HandshakeStatus::Failed("bad".into())
            } else if self.rounds == 0 {
                HandshakeStatus::Done(Box::new(Established {
                    keys: Keys::derive(Suite::PskAes128Ccm8, &[1; 48], &[2; 32], &[3; 32]),
                    identity: Identity::Psk(b"dev".to_vec()),
                    cred_tag: 0,
                }))
            } else {
                HandshakeStatus::InProgress
            }
        }
    }

    struct FakeAcceptor {
        accepted: usize,
    }

    impl Acceptor for FakeAcceptor {
        type H = Fake;
        fn accept(&mut self, _peer: SocketAddr, _hello: &[u8]) -> Result<Fake, String> {
            self.accepted += 1;
            let mut f = Fake {
                rounds: 2,
                out: VecDeque::new(),
                fail: false,
            };
            f.handle_datagram(&[]);
            Ok(f)
        }
    }

    fn at(t: Instant, ms: u64) -> Now {
        Now {
            instant: t + Duration::from_millis(ms),
            wall_ms: 1_000_000 + ms as i64,
        }
    }

    fn endpoint(cfg: DtlsConfig) -> (DtlsEndpoint<FakeAcceptor>, Arc<ShardMetrics>, Instant) {
        let m = Arc::new(ShardMetrics::default());
        let t = Instant::now();
        let e =
            DtlsEndpoint::new(t, cfg, FakeAcceptor { accepted: 0 }, [9; 32], m.clone()).unwrap();
        (e, m, t)
    }

    /// Runs the cookie exchange and returns the verified second hello.
    fn second_hello(e: &mut DtlsEndpoint<FakeAcceptor>, now: Now, peer: SocketAddr) -> Vec<u8> {
        second_hello_with(e, now, peer, 7)
    }

    fn second_hello_with(
        e: &mut DtlsEndpoint<FakeAcceptor>,
        now: Now,
        peer: SocketAddr,
        random: u8,
    ) -> Vec<u8> {
        e.clear_transmits();
        let mut first = testing::client_hello_with(random, 0, 0, &[], &[0xc0a8]);
        let n = first.len();
        e.handle_datagram(now, peer, &mut first, |_, _| panic!("no app data"));
        let hvr: Vec<u8> = e.transmits().next().unwrap().1.to_vec();
        assert!(hvr.len() <= n);
        e.clear_transmits();
        let (rec, _) = record::parse(&hvr).unwrap();
        let h = handshake::parse_header(rec.fragment).unwrap();
        let cookie = &h.fragment[3..];
        testing::client_hello_with(random, 1, 1, cookie, &[0xc0a8])
    }

    /// `close_psk_where` looks only at the sessions of the identities it is
    /// given; the identity index follows sessions that end.
    #[test]
    fn credential_changes_close_the_sessions_of_their_identities() {
        let (mut e, _m, _t) = endpoint(DtlsConfig::default());
        let mut s = Session {
            keys: Keys::derive(Suite::PskAes128Ccm8, &[1; 48], &[2; 32], &[3; 32]),
            identity: Identity::Psk(Vec::new()),
            epoch: 1,
            write_seq: 1,
            replay: ReplayWindow::default(),
            last_rx_ms: 0,
            final_flight: None,
            cred_tag: 0,
            idle_s: 0,
        };
        let peers: Vec<SocketAddr> = (0..4)
            .map(|i| SocketAddr::from(([10, 0, 0, 9], 4000 + i)))
            .collect();
        for (i, p) in peers.iter().enumerate() {
            s.identity = Identity::Psk(if i < 2 { b"a".to_vec() } else { b"b".to_vec() });
            s.cred_tag = i as u64;
            e.import_session(*p, s.clone());
        }
        let mut looked = Vec::new();
        let n = e.close_psk_where(CloseReason::Revoked, [b"a".as_slice()], |id, tag| {
            looked.push((id.to_vec(), tag));
            tag == 1
        });
        assert_eq!(n, 1);
        looked.sort();
        assert_eq!(looked, vec![(b"a".to_vec(), 0), (b"a".to_vec(), 1)]);
        assert_eq!(e.session_count(), 3);
        // The ended session left the index; unknown identities cost nothing.
        let n = e.close_psk_where(CloseReason::Revoked, [b"a".as_slice(), b"zz"], |_, _| true);
        assert_eq!(n, 1);
        assert_eq!(
            e.close_psk_where(CloseReason::Revoked, [b"a".as_slice()], |_, _| true),
            0
        );
        // A session replaced at the same address with another identity moves
        // in the index.
        s.identity = Identity::Psk(b"c".to_vec());
        e.import_session(peers[2], s.clone());
        assert_eq!(
            e.close_psk_where(CloseReason::Revoked, [b"b".as_slice()], |_, _| true),
            1
        );
        assert_eq!(
            e.close_psk_where(CloseReason::Revoked, [b"c".as_slice()], |_, _| true),
            1
        );
        assert_eq!(e.session_count(), 0);
    }

    #[test]
    fn hello_without_cookie_keeps_no_state() {
        let (mut e, m, t) = endpoint(DtlsConfig::default());
        for port in 0..1000u16 {
            let mut d = testing::client_hello(0, 0, &[], &[0xc0a8]);
            e.handle_datagram(
                at(t, 0),
                SocketAddr::from(([10, 0, 0, 1], 1000 + port)),
                &mut d,
                |_, _| {},
            );
        }
        assert_eq!((e.handshake_count(), e.session_count()), (0, 0));
        assert_eq!(ShardMetrics::get(&m.dtls_hello_verify_sent), 1000);
        assert_eq!(e.acceptor.accepted, 0);
        // A forged cookie: another HelloVerifyRequest, no state.
        e.clear_transmits();
        let mut forged = testing::client_hello(1, 1, &[7; 32], &[0xc0a8]);
        e.handle_datagram(
            at(t, 0),
            "10.0.0.1:1".parse().unwrap(),
            &mut forged,
            |_, _| {},
        );
        assert_eq!((e.handshake_count(), e.acceptor.accepted), (0, 0));
        assert_eq!(e.transmits().count(), 1);
    }

    #[test]
    fn handshake_then_records_replay_and_final_flight() {
        let (mut e, m, t) = endpoint(DtlsConfig::default());
        let peer: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let mut h2 = second_hello(&mut e, at(t, 0), peer);
        e.handle_datagram(at(t, 1), peer, &mut h2, |_, _| {});
        assert_eq!((e.handshake_count(), e.acceptor.accepted), (1, 1));
        assert_eq!(e.transmits().count(), 1);
        e.clear_transmits();
        // The client's final flight (epoch 0 + epoch 1 records).
        let mut fin = Vec::new();
        record::write_header(
            &mut fin,
            content_type::CHANGE_CIPHER_SPEC,
            record::DTLS1_2,
            0,
            2,
            1,
        );
        fin.push(1);
        record::write_header(&mut fin, content_type::HANDSHAKE, record::DTLS1_2, 1, 0, 40);
        fin.extend_from_slice(&[0; 40]);
        e.handle_datagram(at(t, 2), peer, &mut fin.clone(), |_, _| {});
        assert_eq!((e.handshake_count(), e.session_count()), (0, 1));
        assert_eq!(ShardMetrics::get(&m.dtls_handshakes_completed), 1);
        let final_flight: Vec<u8> = e.transmits().next().unwrap().1.to_vec();
        e.clear_transmits();
        let s = e.session(&peer).unwrap();
        // The handshake used epoch-1 sequence 3; ours continue at 4.
        assert_eq!(s.write_seq, 4);
        // The client retransmits its final flight: ours goes out again.
        e.handle_datagram(at(t, 3), peer, &mut fin.clone(), |_, _| {});
        assert_eq!(e.transmits().next().unwrap().1, &final_flight[..]);
        e.clear_transmits();
        // Application data both ways, with the client's keys.
        let keys = e.session(&peer).unwrap().keys.clone();
        let mut c = RecordCipher::new().unwrap();
        let mut rec = Vec::new();
        c.seal(
            &keys,
            Side::Client,
            content_type::APPLICATION_DATA,
            1,
            1,
            b"coap!",
            &mut rec,
        )
        .unwrap();
        let mut got = Vec::new();
        e.handle_datagram(at(t, 4), peer, &mut rec.clone(), |id, pt| {
            got.push((id.clone(), pt.to_vec()))
        });
        assert_eq!(
            got,
            vec![(Identity::Psk(b"dev".to_vec()), b"coap!".to_vec())]
        );
        // The same record again: a replay, dropped and counted.
        e.handle_datagram(at(t, 5), peer, &mut rec.clone(), |_, _| panic!("replayed"));
        assert_eq!(ShardMetrics::get(&m.dtls_records_replayed), 1);
        // A tampered record: dropped, counted, the window does not move.
        let mut bad = Vec::new();
        c.seal(
            &keys,
            Side::Client,
            content_type::APPLICATION_DATA,
            1,
            2,
            b"x",
            &mut bad,
        )
        .unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        e.handle_datagram(at(t, 6), peer, &mut bad, |_, _| panic!("forged"));
        assert_eq!(ShardMetrics::get(&m.dtls_records_bad), 1);
        // After application data the final flight is no longer resent.
        e.handle_datagram(at(t, 7), peer, &mut fin.clone(), |_, _| {});
        assert!(!e.has_transmits());
        // Our records open with the server keys, sequence continuing.
        assert!(e.seal(peer, b"reply"));
        let out: Vec<u8> = e.transmits().next().unwrap().1.to_vec();
        let (r, _) = record::parse(&out).unwrap();
        assert_eq!((r.epoch, r.seq), (1, 4));
        let header: [u8; 13] = out[..13].try_into().unwrap();
        let mut frag = out[13..].to_vec();
        let range = c.open(&keys, Side::Server, &header, &mut frag).unwrap();
        assert_eq!(&frag[range], b"reply");
        // close_notify from the client ends the session.
        let mut alert = Vec::new();
        c.seal(
            &keys,
            Side::Client,
            content_type::ALERT,
            1,
            9,
            &[1, 0],
            &mut alert,
        )
        .unwrap();
        e.handle_datagram(at(t, 8), peer, &mut alert, |_, _| {});
        assert_eq!(e.session_count(), 0);
        assert_eq!(e.take_closed()[0].2, CloseReason::CloseNotify);
        assert!(!e.seal(peer, b"gone"));
    }

    #[test]
    fn caps_and_timeouts() {
        let cfg = DtlsConfig {
            max_handshakes: 2,
            handshakes_per_ip_per_s: 3,
            handshake_timeout: Duration::from_secs(5),
            ..DtlsConfig::default()
        };
        let (mut e, m, t) = endpoint(cfg);
        for port in 1..=4u16 {
            let peer = SocketAddr::from(([10, 0, 0, 3], port));
            let mut h = second_hello(&mut e, at(t, 0), peer);
            e.handle_datagram(at(t, 0), peer, &mut h, |_, _| {});
        }
        assert_eq!(e.handshake_count(), 2);
        assert_eq!(ShardMetrics::get(&m.dtls_dropped_handshake_cap), 2);
        // Retransmission timer fires the handshake's own retransmit.
        e.clear_transmits();
        e.handle_timeout(at(t, 1001));
        assert_eq!(e.transmits().count(), 2);
        // The deadline abandons both.
        e.handle_timeout(at(t, 6000));
        assert_eq!(e.handshake_count(), 0);
        assert_eq!(ShardMetrics::get(&m.dtls_handshake_timeouts), 2);
        // Per-address rate: 3 per second from one address.
        let (mut e, m, t) = endpoint(DtlsConfig {
            handshakes_per_ip_per_s: 3,
            ..DtlsConfig::default()
        });
        for port in 10..=13u16 {
            let peer = SocketAddr::from(([10, 0, 0, 3], port));
            let mut h = second_hello(&mut e, at(t, 0), peer);
            e.handle_datagram(at(t, 0), peer, &mut h, |_, _| {});
        }
        assert_eq!(e.handshake_count(), 3);
        assert_eq!(ShardMetrics::get(&m.dtls_dropped_rate), 1);
    }

    #[test]
    fn new_handshake_replaces_session_only_when_done() {
        let (mut e, m, t) = endpoint(DtlsConfig::default());
        let peer: SocketAddr = "10.0.0.4:5000".parse().unwrap();
        let mut h2 = second_hello(&mut e, at(t, 0), peer);
        e.handle_datagram(at(t, 1), peer, &mut h2, |_, _| {});
        e.handle_datagram(
            at(t, 2),
            peer,
            &mut [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0],
            |_, _| {},
        );
        assert_eq!(e.session_count(), 1);
        // The device rebooted: a fresh ClientHello from the same address
        // gets a cookie; the old session stays until the new one is done.
        let mut h3 = second_hello_with(&mut e, at(t, 3), peer, 8);
        assert_eq!(e.session_count(), 1);
        e.handle_datagram(at(t, 4), peer, &mut h3, |_, _| {});
        assert_eq!((e.session_count(), e.handshake_count()), (1, 1));
        e.handle_datagram(
            at(t, 5),
            peer,
            &mut [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0],
            |_, _| {},
        );
        assert_eq!((e.session_count(), e.handshake_count()), (1, 0));
        assert_eq!(ShardMetrics::get(&m.dtls_sessions_replaced), 1);
    }

    proptest::proptest! {
        /// Random datagrams, and mutations of real ones, from a peer with
        /// and without a session: never a panic, never a session.
        #[test]
        fn never_panics_on_random_datagrams(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            flip in 0usize..400,
        ) {
            let (mut e, _m, t) = endpoint(DtlsConfig::default());
            let peer: SocketAddr = "10.9.0.1:1".parse().unwrap();
            let mut d = data.clone();
            e.handle_datagram(at(t, 0), peer, &mut d, |_, _| {});
            let mut h = testing::client_hello(0, 0, &[], &[0xc0a8]);
            h.extend_from_slice(&data);
            if !h.is_empty() {
                let i = flip % h.len();
                h[i] ^= 0x5a;
            }
            e.handle_datagram(at(t, 1), peer, &mut h, |_, _| {});
            proptest::prop_assert_eq!(e.session_count(), 0);
        }
    }

    #[test]
    fn a_registration_sets_its_session_idle_timeout() {
        let (mut e, _m, t) = endpoint(DtlsConfig::default());
        let peer: SocketAddr = "10.0.0.6:5000".parse().unwrap();
        let mut h2 = second_hello(&mut e, at(t, 0), peer);
        e.handle_datagram(at(t, 1), peer, &mut h2, |_, _| {});
        e.handle_datagram(
            at(t, 2),
            peer,
            &mut [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0],
            |_, _| {},
        );
        // Default 26 h; the registration says 30 s. The sweep at 12 s keeps
        // it, the one at 40 s ends it (the default would keep it a day).
        e.set_idle_timeout(peer, 30);
        e.handle_timeout(at(t, 12_000));
        assert_eq!(e.session_count(), 1);
        e.handle_timeout(at(t, 40_000));
        assert_eq!(e.session_count(), 0);
        assert_eq!(e.take_closed()[0].2, CloseReason::Idle);
    }

    #[test]
    fn idle_sessions_expire() {
        let cfg = DtlsConfig {
            idle_timeout: Duration::from_secs(2),
            ..DtlsConfig::default()
        };
        let (mut e, _m, t) = endpoint(cfg);
        let peer: SocketAddr = "10.0.0.5:5000".parse().unwrap();
        let mut h2 = second_hello(&mut e, at(t, 0), peer);
        e.handle_datagram(at(t, 1), peer, &mut h2, |_, _| {});
        e.handle_datagram(
            at(t, 2),
            peer,
            &mut [22u8, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0],
            |_, _| {},
        );
        assert_eq!(e.session_count(), 1);
        e.handle_timeout(at(t, 1000));
        assert_eq!(e.session_count(), 1);
        e.handle_timeout(at(t, 5000));
        assert_eq!(e.session_count(), 0);
        assert_eq!(e.take_closed()[0].2, CloseReason::Idle);
    }
}

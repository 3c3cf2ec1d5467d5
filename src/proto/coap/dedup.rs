//! Message deduplication (RFC 7252 §4.5), with bounded memory.
//!
//! A recipient "SHOULD process any duplicate Confirmable message only once"
//! within EXCHANGE_LIFETIME and answer each copy with the same response; NON
//! duplicates are ignored within NON_LIFETIME. Entries are keyed by
//! ([`PeerId`], Message ID).
//!
//! Memory is bounded twice:
//! * per peer, a ring of the [`RING`] most recent message IDs (devices use
//!   sequential MIDs and NSTART = 1, so a retransmission is always among the
//!   last few), two of them inline;
//! * per shard, at most `max_peers` peers. When a new peer would exceed the
//!   cap, a peer that is not *protected* (not registered) is evicted first,
//!   oldest first; only when every peer is protected is the oldest protected
//!   one evicted. Evictions are counted so an operator sees a spoofed flood.
//!
//! Expired entries are swept periodically; a peer whose entries all expired
//! costs nothing afterwards. Rings keep their capacity between sweeps (no
//! shrink/grow churn).

use super::peer::PeerId;
use crate::proto::FastMap;
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Entries remembered per peer.
pub const RING: usize = 8;

/// What was answered to a message, so a duplicate gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Seen, nothing to resend (NON).
    Seen,
    /// A CON answered with an empty ACK.
    EmptyAck,
    /// A CON or NON answered with RST.
    Rst,
    /// The exact bytes of the response sent.
    Response(Box<[u8]>),
    /// Being processed: the answer is not decided yet (waiting for the broker
    /// to confirm a record, or for another shard). Duplicates are dropped
    /// silently until it is.
    InProgress,
}

#[derive(Debug)]
struct Entry {
    mid: u16,
    expires: Instant,
    reply: Cached,
}

#[derive(Debug, Default)]
struct Ring {
    entries: SmallVec<[Entry; 2]>,
    protected: bool,
}

#[derive(Debug)]
pub struct Dedup {
    peers: FastMap<PeerId, Ring>,
    lifetime: Duration,
    max_peers: usize,
    /// Peers in order of first insertion: unprotected ones, and all. Entries
    /// go stale (peer removed, protection changed) and are skipped lazily.
    fifo_unprotected: VecDeque<PeerId>,
    fifo_all: VecDeque<PeerId>,
    evicted: u64,
}

impl Dedup {
    pub fn new(lifetime: Duration, max_peers: usize) -> Dedup {
        Dedup {
            peers: FastMap::default(),
            lifetime,
            max_peers: max_peers.max(1),
            fifo_unprotected: VecDeque::new(),
            fifo_all: VecDeque::new(),
            evicted: 0,
        }
    }

    /// The cached answer when (peer, mid) was already seen.
    pub fn check(&self, now: Instant, peer: &PeerId, mid: u16) -> Option<&Cached> {
        self.peers
            .get(peer)?
            .entries
            .iter()
            .find(|e| e.mid == mid && e.expires > now)
            .map(|e| &e.reply)
    }

    /// Records the answer to (peer, mid). `protected` marks a registered peer
    /// (evicted last).
    pub fn insert(&mut self, now: Instant, peer: PeerId, mid: u16, reply: Cached, protected: bool) {
        if !self.peers.contains_key(&peer) {
            if self.peers.len() >= self.max_peers {
                self.evict_one();
            }
            self.fifo_all.push_back(peer);
            if !protected {
                self.fifo_unprotected.push_back(peer);
            }
        }
        let expires = now + self.lifetime;
        let ring = self.peers.entry(peer).or_default();
        if ring.protected != protected && !protected {
            self.fifo_unprotected.push_back(peer);
        }
        ring.protected = protected;
        if let Some(e) = ring.entries.iter_mut().find(|e| e.mid == mid) {
            e.expires = expires;
            e.reply = reply;
            return;
        }
        if ring.entries.len() < RING {
            ring.entries.push(Entry {
                mid,
                expires,
                reply,
            });
        } else if let Some(oldest) = ring.entries.iter_mut().min_by_key(|e| e.expires) {
            *oldest = Entry {
                mid,
                expires,
                reply,
            };
        }
    }

    /// Forgets (peer, mid): an answer that was in progress was abandoned, so a
    /// retransmission is processed again.
    pub fn remove(&mut self, peer: &PeerId, mid: u16) {
        if let Some(r) = self.peers.get_mut(peer) {
            r.entries.retain(|e| e.mid != mid);
        }
    }

    fn evict_one(&mut self) {
        while let Some(p) = self.fifo_unprotected.pop_front() {
            if self.peers.get(&p).is_some_and(|r| !r.protected) {
                self.peers.remove(&p);
                self.evicted += 1;
                return;
            }
        }
        while let Some(p) = self.fifo_all.pop_front() {
            if self.peers.remove(&p).is_some() {
                self.evicted += 1;
                return;
            }
        }
    }

    /// Drops expired entries and empty peers; compacts the eviction queues
    /// when stale entries dominate them.
    pub fn sweep(&mut self, now: Instant) {
        self.peers.retain(|_, ring| {
            ring.entries.retain(|e| e.expires > now);
            !ring.entries.is_empty()
        });
        if self.fifo_all.len() > 2 * self.peers.len() + 1024 {
            let peers = &self.peers;
            self.fifo_all.retain(|p| peers.contains_key(p));
            self.fifo_unprotected
                .retain(|p| peers.get(p).is_some_and(|r| !r.protected));
        }
        // A registration storm leaves a table sized for the whole fleet.
        crate::proto::heap::shrink_map(&mut self.peers);
        crate::proto::heap::shrink_deque(&mut self.fifo_all);
        crate::proto::heap::shrink_deque(&mut self.fifo_unprotected);
    }

    /// Approximate heap bytes held (the peer table, spilled rings, queues).
    pub fn heap_estimate(&self) -> usize {
        use crate::proto::heap;
        heap::map(&self.peers)
            + self
                .peers
                .values()
                .filter(|r| r.entries.spilled())
                .map(|r| heap::buf::<Entry>(r.entries.capacity()))
                .sum::<usize>()
            + heap::buf::<PeerId>(self.fifo_all.capacity() + self.fifo_unprotected.capacity())
    }

    /// Peers with at least one live entry.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Peers evicted because of the cap, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(port: u16) -> PeerId {
        PeerId::udp(([127, 0, 0, 1], port).into())
    }

    #[test]
    fn remembers_and_expires() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(10), 100);
        assert!(d.check(t, &p(1), 1).is_none());
        d.insert(t, p(1), 1, Cached::Response(Box::new([1, 2])), false);
        assert_eq!(
            d.check(t, &p(1), 1),
            Some(&Cached::Response(Box::new([1, 2])))
        );
        assert!(d.check(t + Duration::from_secs(11), &p(1), 1).is_none());
        for m in 2..20 {
            d.insert(t, p(1), m, Cached::Seen, false);
        }
        assert!(d.check(t, &p(1), 19).is_some());
        d.remove(&p(1), 19);
        assert!(d.check(t, &p(1), 19).is_none());
        d.sweep(t + Duration::from_secs(11));
        assert_eq!(d.peers(), 0);
    }

    #[test]
    fn cap_evicts_unprotected_peers_first() {
        let t = Instant::now();
        let mut d = Dedup::new(Duration::from_secs(100), 10);
        for i in 0..5 {
            d.insert(t, p(i), 1, Cached::EmptyAck, true);
        }
        // A flood from 1,000 spoofed sources: the five registered peers stay.
        for i in 100..1100 {
            d.insert(t, p(i), 1, Cached::Rst, false);
        }
        assert_eq!(d.peers(), 10);
        assert_eq!(d.evicted(), 995);
        for i in 0..5 {
            assert!(d.check(t, &p(i), 1).is_some(), "registered peer {i} kept");
        }
        // Only protected peers left at the cap: the oldest goes.
        let mut d = Dedup::new(Duration::from_secs(100), 3);
        for i in 0..4 {
            d.insert(t, p(i), 1, Cached::EmptyAck, true);
        }
        assert!(d.check(t, &p(0), 1).is_none());
        assert!(d.check(t, &p(3), 1).is_some());
    }
}

//! Message deduplication (RFC 7252 §4.5).
//!
//! A recipient "SHOULD process any duplicate Confirmable message only once"
//! within EXCHANGE_LIFETIME and answer each copy with the same response; NON
//! duplicates are ignored within NON_LIFETIME. We key on (peer, Message ID).
//!
//! Memory is bounded per peer: a small ring of the most recent message IDs
//! (devices send sequential MIDs, so a retransmission is always among the last
//! few), swept for expiry periodically. Idle peers cost nothing after a sweep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Entries remembered per peer.
pub const RING: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// NON message, or a CON whose answer was an empty ACK.
    EmptyAck,
    /// Seen, nothing to resend (NON).
    Seen,
    /// The exact bytes of the response sent.
    Response(Box<[u8]>),
}

#[derive(Debug)]
struct Entry {
    mid: u16,
    expires: Instant,
    reply: Cached,
}

#[derive(Default)]
pub struct Dedup {
    peers: HashMap<SocketAddr, Vec<Entry>>,
    lifetime: Duration,
}

impl Dedup {
    pub fn new(lifetime: Duration) -> Dedup {
        Dedup {
            peers: HashMap::new(),
            lifetime,
        }
    }

    /// The cached answer when (peer, mid) was already processed.
    pub fn check(&self, now: Instant, peer: &SocketAddr, mid: u16) -> Option<&Cached> {
        self.peers
            .get(peer)?
            .iter()
            .find(|e| e.mid == mid && e.expires > now)
            .map(|e| &e.reply)
    }

    pub fn insert(&mut self, now: Instant, peer: SocketAddr, mid: u16, reply: Cached) {
        let ring = self.peers.entry(peer).or_default();
        let expires = now + self.lifetime;
        if let Some(e) = ring.iter_mut().find(|e| e.mid == mid) {
            e.expires = expires;
            e.reply = reply;
            return;
        }
        if ring.len() < RING {
            ring.push(Entry {
                mid,
                expires,
                reply,
            });
        } else if let Some(oldest) = ring.iter_mut().min_by_key(|e| e.expires) {
            *oldest = Entry {
                mid,
                expires,
                reply,
            };
        }
    }

    /// Drops expired entries and empty peers.
    pub fn sweep(&mut self, now: Instant) {
        self.peers.retain(|_, ring| {
            ring.retain(|e| e.expires > now);
            if ring.is_empty() {
                false
            } else {
                ring.shrink_to_fit();
                true
            }
        });
    }

    pub fn peers(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_expires() {
        let t = Instant::now();
        let p: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut d = Dedup::new(Duration::from_secs(10));
        assert!(d.check(t, &p, 1).is_none());
        d.insert(t, p, 1, Cached::Response(Box::new([1, 2])));
        assert_eq!(d.check(t, &p, 1), Some(&Cached::Response(Box::new([1, 2]))));
        assert!(d.check(t + Duration::from_secs(11), &p, 1).is_none());
        for m in 2..20 {
            d.insert(t, p, m, Cached::Seen);
        }
        assert!(d.check(t, &p, 19).is_some());
        d.sweep(t + Duration::from_secs(11));
        assert_eq!(d.peers(), 0);
    }
}

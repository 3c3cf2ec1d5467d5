//! Sans-IO protocol layers. No sockets, no async, no clock reads, no globals:
//! every input carries the current time, every output is returned to the
//! caller.
//!
//! * [`coap`]: the CoAP codec (RFC 7252 §3), the one message builder, and the
//!   exchange layer (deduplication, message IDs and tokens, retransmission,
//!   separate responses, NSTART) keyed by a [`coap::PeerId`].
//! * [`lwm2m`]: the LwM2M server: registration, observe, send, content
//!   formats and the telemetry mapping, composed into one per-shard
//!   [`lwm2m::server::Server`].
//! * [`cbor`]: the CBOR subset the content formats need (RFC 8949).

pub mod cbor;
pub mod coap;
pub mod dtls;
pub mod lwm2m;

/// Hash maps of the protocol state. foldhash: fast on small keys (peer
/// addresses, tokens, ids) and seeded per process, so keys a sender chooses
/// cannot be aimed at one bucket.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The hasher of [`FastMap`].
pub type FastHasher = foldhash::fast::RandomState;

/// Approximate heap bytes of collections, for the memory accounting of the
/// protocol state (`Server::heap_estimate`, `benches/memory.rs`).
pub mod heap {
    use std::collections::HashMap;
    use std::mem::size_of;

    /// A hash map's table: hashbrown keeps `(K, V)` buckets plus one control
    /// byte each, at most 7/8 full, in a power-of-two number of buckets.
    pub fn map<K, V, S>(m: &HashMap<K, V, S>) -> usize {
        if m.capacity() == 0 {
            return 0;
        }
        let buckets = (m.capacity() * 8 / 7).next_power_of_two();
        buckets * (size_of::<(K, V)>() + 1)
    }

    /// A contiguous buffer (Vec, VecDeque, BinaryHeap) of `cap` `T`s.
    pub fn buf<T>(cap: usize) -> usize {
        cap * size_of::<T>()
    }

    /// Whether a table of `cap` holding `len` should give memory back: a
    /// burst (a registration storm) grows the exchange tables to the whole
    /// fleet and idle they hold a few entries. Shrinks to twice the length
    /// below a quarter full, so a steady load does not oscillate.
    fn shrink_due(len: usize, cap: usize) -> Option<usize> {
        (cap > 256 && len < cap / 4).then_some(len * 2)
    }

    pub fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
        m: &mut HashMap<K, V, S>,
    ) {
        if let Some(to) = shrink_due(m.len(), m.capacity()) {
            m.shrink_to(to);
        }
    }

    pub fn shrink_deque<T>(d: &mut std::collections::VecDeque<T>) {
        if let Some(to) = shrink_due(d.len(), d.capacity()) {
            d.shrink_to(to);
        }
    }

    pub fn shrink_heap<T: Ord>(h: &mut std::collections::BinaryHeap<T>) {
        if let Some(to) = shrink_due(h.len(), h.capacity()) {
            h.shrink_to(to);
        }
    }
}

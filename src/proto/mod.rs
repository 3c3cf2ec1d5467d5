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

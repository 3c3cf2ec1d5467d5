//! CoAP (RFC 7252), sans-IO.
//!
//! * [`codec`]: zero-copy decoding of a datagram into a [`Message`] view,
//!   with the options scanned once.
//! * [`block`]: block-wise transfers (RFC 7959) in both directions.
//! * [`builder`]: [`MessageBuilder`], the one way messages are written.
//! * [`dedup`]: duplicate detection (§4.5) with bounded memory.
//! * [`exchange`]: the message and request/response layer (§4, §5) for
//!   all peers of a shard.
//! * [`peer`]: [`PeerId`], the opaque per-shard peer handle.

pub mod block;
pub mod builder;
pub mod codec;
pub mod dedup;
pub mod exchange;
pub mod peer;

pub use builder::{MessageBuilder, OptValue};
pub use codec::*;
pub use peer::PeerId;

//! DTLS 1.2 (RFC 6347) on the shard, sans-IO.
//!
//! * [`record`] and [`handshake`]: record and handshake-header views over
//!   the receive buffer; the ClientHello the shard reads itself.
//! * [`cookie`]: the stateless HelloVerifyRequest exchange (§4.2.1).
//! * [`crypto`], [`cipher`]: HMAC-SHA256, the TLS 1.2 PRF and key block
//!   (RFC 5246 §5, §6.3), the record ciphers (CCM-8, CCM, GCM, CBC-SHA256)
//!   applied in place.
//! * [`session`]: an established session (keys, sequence state, replay
//!   window, identity).
//! * [`endpoint`]: the per-shard DTLS endpoint composing them. The
//!   handshake itself is delegated to an [`endpoint::Acceptor`] (OpenSSL,
//!   in `io::dtls`); once it completes, the endpoint holds the keys and
//!   protects application records itself, and the handshake object is
//!   dropped.

pub mod cipher;
pub mod cookie;
pub mod crypto;
pub mod endpoint;
pub mod handshake;
pub mod record;
pub mod session;

pub use endpoint::{Acceptor, DtlsConfig, DtlsEndpoint, Established, Handshake, HandshakeStatus};

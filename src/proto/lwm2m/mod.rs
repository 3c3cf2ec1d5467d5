//! LwM2M (OMA LwM2M TS 1.1/1.2 Core and Transport), server side, sans-IO.
//!
//! * [`registration`]: Register / Update / De-register parameters (Transport
//!   §6.2).
//! * [`observe`]: Observe ordering (RFC 7641 §3.4).
//! * [`content`]: content formats (Core §7.4) decoded into resource values.
//! * [`link_format`]: the registration payload (RFC 6690 links).
//! * [`server`]: the per-shard server state machine.

pub mod content;
pub mod link_format;
pub mod observe;
pub mod registration;
pub mod server;

//! Sans-IO protocol layer: CoAP, CBOR, link-format, LwM2M content formats,
//! registration parameters and Observe ordering. No sockets, no async, no
//! clock reads: time is always passed in.

pub mod cbor;
pub mod coap;
pub mod content;
pub mod link_format;
pub mod observe;
pub mod registration;

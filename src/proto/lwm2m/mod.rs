//! LwM2M (OMA LwM2M TS 1.1/1.2 Core and Transport), server side, sans-IO.
//!
//! * [`registration`]: Register / Update / De-register (Transport §6.2),
//!   registration ids that name their home shard, the shard's registry.
//! * [`observe`]: observations and notification ordering (RFC 7641).
//! * [`send`]: LwM2M 1.1 Send.
//! * [`content`]: content formats (Core §7.4) decoded into resource values.
//! * [`dm`]: server-initiated operations (Read, Write, Execute, ...) on the
//!   wire and their answers.
//! * [`encode`]: content encoders (Write, Create, composite path lists)
//!   and the choice of format per device.
//! * [`link_format`]: the registration payload (RFC 6690 links).
//! * [`telemetry`]: values + profile → TelemetryPoints.
//! * [`endpoint`]: provisioned entries, transport identities, the authorizer.
//! * [`profile`]: resolved device profiles.
//! * [`rpc`]: platform RPC requests, their status lifecycle, method →
//!   operation resolution through the profile.
//! * [`output`]: the records produced and the [`output::Sink`] they go to.
//! * [`bootstrap`]: the Bootstrap Interface (TS 1.1 Core §6.1): what an
//!   endpoint gets written, and the per-shard bootstrap server.
//! * [`server`]: the per-shard server state machine composing all of it.

pub mod bootstrap;
pub mod content;
pub mod dm;
pub mod encode;
pub mod endpoint;
pub mod firmware;
pub mod link_format;
pub mod observe;
pub mod output;
pub mod profile;
pub mod registration;
pub mod rpc;
pub mod send;
pub mod server;
pub mod telemetry;

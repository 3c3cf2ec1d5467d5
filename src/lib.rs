//! corem-lwm2m: the LwM2M adapter of the CORE-M IoT platform.
//!
//! Layers, one direction (see `../shared/docs/design.md`):
//! * [`proto`]: sans-IO codecs and protocol rules (CoAP, link-format, content
//!   formats, registration parameters, Observe ordering).
//! * [`shard`]: the per-core LwM2M server engine (sans-IO) and its glommio
//!   wiring.
//! * [`io`]: sockets (SO_REUSEPORT, buffers, batched receive/send).
//! * [`sink`]: TelemetryPoint / status records and the Kafka producer.
//! * [`control`]: endpoint directory, device profiles, metrics, admin HTTP.

pub mod config;
pub mod control;
pub mod io;
pub mod proto;
pub mod shard;
pub mod sim;
pub mod sink;

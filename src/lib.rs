//! corem-lwm2m: the LwM2M adapter of the CORE-M IoT platform.
//!
//! Layers, one direction (see `../shared/docs/design.md`):
//! * [`proto`]: sans-IO protocol logic (CoAP codec, builder and exchange
//!   layer; the LwM2M server state machine).
//! * [`io`]: sockets (SO_REUSEPORT, buffers, batched receive/send).
//! * [`shard`]: per-core wiring (glommio executor, socket, server, producer,
//!   timers).
//! * [`sink`]: Kafka producer and record encoding.
//! * [`control`]: endpoint directory, device profiles, admin HTTP.
//! * [`metrics`]: per-shard counters, written by the data plane, read by the
//!   admin server.
//! * [`testkit`], [`tools`]: simulated devices and topic reading for tests
//!   and tools.

pub mod config;
pub mod control;
pub mod ctl;
pub mod io;
pub mod metrics;
pub mod proto;
pub mod shard;
pub mod sink;
pub mod testkit;
pub mod tools;

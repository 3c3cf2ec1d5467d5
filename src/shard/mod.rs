//! Per-core data plane: the sans-IO [`engine::Engine`] and the glommio
//! executor wiring in [`runtime`] (one pinned executor per shard, its own
//! SO_REUSEPORT socket, engine, producer and timers).

pub mod dedup;
pub mod engine;
pub mod runtime;

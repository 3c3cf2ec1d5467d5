//! Per-core wiring of the data plane: [`runtime`] starts one pinned glommio
//! executor per shard with its own SO_REUSEPORT socket, LwM2M server, Kafka
//! producer and timers.

pub mod runtime;

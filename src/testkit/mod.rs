//! Test and tooling support shared by the unit tests, the integration tests,
//! `lwm2m-devsim`, `lwm2m-loadgen`, the benches and the fuzz targets:
//! [`sim::SimDevice`] (a sans-IO LwM2M client), [`memory_sink::MemorySink`],
//! and [`harness`] (gateway shards + simulated devices + fake time + a lossy
//! network, all in memory).

pub mod certs;
pub mod dtls_client;
pub mod harness;
pub mod memory_sink;
pub mod sim;
pub mod sim_fw;

//! Test and tooling support shared by the unit tests, the integration tests,
//! `lwm2m-devsim`, `lwm2m-loadgen`, the benches and the fuzz targets:
//! [`sim::SimDevice`], a sans-IO LwM2M client.

pub mod sim;

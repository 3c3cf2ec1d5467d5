//! Control plane: the endpoint directory and its snapshots, device profiles,
//! and the admin HTTP server. Runs off the data-plane cores; shards only read
//! its state lock-free.

pub mod admin;
pub mod directory;
pub mod profiles;
pub mod topics;

//! Control plane: the endpoint directory (with its write-ahead log and
//! snapshots), device profiles, the RPC book (accepted RPCs, per-device
//! queues, presence), the per-shard registration snapshots, topic
//! creation and the admin HTTP server. Runs off the data-plane cores; shards
//! only read its state lock-free and hear of changes by message.

pub mod admin;
pub mod bootstrap;
pub mod campaign;
pub mod directory;
pub mod firmware;
pub mod profiles;
pub mod registrations;
pub mod reload;
pub mod rpc;
pub mod rpc_book;
pub mod rpc_log;
pub mod sessions;
pub mod snapshot;
pub mod systemd;
pub mod topics;

//! Operator and test tools that are not part of the data path:
//! [`topic_reader`] reads records back from the broker (`corem-topic-tail`,
//! integration tests); [`rpc_load`] is the load generator's RPC phase.

pub mod rpc_load;
pub mod topic_reader;

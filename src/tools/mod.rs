//! Operator and test tools that are not part of the data path:
//! [`topic_reader`] reads records back from the broker (`corem-topic-tail`,
//! integration tests).

pub mod topic_reader;

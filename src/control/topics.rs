//! Topic provisioning: creates `telemetry.raw.{tenant}` and
//! `device.status.{tenant}` for every tenant in the directory, at start and
//! whenever the admin API adds a tenant, so producers never depend on the
//! broker's auto-create setting. Existing topics are fine.

use crate::config::KafkaConfig;
use crate::sink::kafka_log::GatewayContext;
use crate::sink::topic_for;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

pub struct TopicManager {
    admin: AdminClient<GatewayContext>,
    cfg: KafkaConfig,
    known: Mutex<HashSet<String>>,
}

impl TopicManager {
    pub fn new(cfg: &KafkaConfig) -> Result<TopicManager, rdkafka::error::KafkaError> {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers);
        crate::sink::kafka::apply_security(cfg, &mut c)
            .map_err(|e| rdkafka::error::KafkaError::ClientCreation(e.to_string()))?;
        for (k, v) in &cfg.extra {
            if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") {
                c.set(k, v);
            }
        }
        Ok(TopicManager {
            admin: c.create_with_context(GatewayContext { client: "topics" })?,
            cfg: cfg.clone(),
            known: Mutex::new(HashSet::new()),
        })
    }

    /// Ensures both topics of each tenant exist; returns true when they all do.
    /// Errors are logged, not fatal: the producer retries until the topic
    /// appears or the message times out.
    pub fn ensure(&self, tenants: &[String]) -> bool {
        let mut names = Vec::new();
        {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            for t in tenants {
                for tpl in [
                    &self.cfg.telemetry_topic,
                    &self.cfg.status_topic,
                    &self.cfg.rpc_status_topic,
                    // Not a template: the same name for every tenant.
                    &self.cfg.rpc_request_topic,
                ] {
                    let n = topic_for(tpl, t);
                    if !known.contains(&n) && !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        }
        if names.is_empty() {
            return true;
        }
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    self.cfg.topic_partitions.max(1),
                    TopicReplication::Fixed(1),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        match futures_executor::block_on(self.admin.create_topics(&topics, &opts)) {
            Ok(results) => {
                let mut ok = true;
                let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
                for r in results {
                    match r {
                        Ok(t) => {
                            tracing::info!(topic = %t, "topic created");
                            known.insert(t);
                        }
                        Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            known.insert(t);
                        }
                        Err((t, e)) => {
                            ok = false;
                            tracing::warn!(topic = %t, error = %e, "topic creation failed");
                        }
                    }
                }
                ok
            }
            Err(e) => {
                tracing::warn!(error = %e, "topic creation request failed (broker down?); will retry");
                false
            }
        }
    }
}

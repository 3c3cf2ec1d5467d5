//! The per-shard Kafka producer.
//!
//! One `rdkafka` `BaseProducer` per shard, polled from that shard's executor,
//! so delivery callbacks run on the shard thread and touch only its metrics.
//! Idempotence on and `acks=all` by default: a record accepted into the queue
//! is delivered exactly once as long as the broker returns within
//! `message.timeout.ms`. The queue bound (`queue.buffering.max.messages`) is the
//! back-pressure signal the engine turns into 5.03 / withheld ACKs.

use super::{topic_for, Sink, SinkError, StatusEvent, TelemetryPoint};
use crate::config::KafkaConfig;
use crate::metrics::ShardMetrics;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub struct ShardContext {
    metrics: Arc<ShardMetrics>,
    shard: usize,
}

impl ClientContext for ShardContext {
    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka logs transport failures itself; surface only the state
        // an operator acts on (no broker reachable) at warn level.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            tracing::warn!(
                shard = self.shard,
                reason,
                "kafka: all brokers down; records stay queued until message.timeout.ms"
            );
        } else {
            tracing::debug!(shard = self.shard, %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for ShardContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(_) => ShardMetrics::inc(&self.metrics.kafka_delivered),
            Err((e, m)) => {
                ShardMetrics::inc(&self.metrics.kafka_delivery_failed);
                use rdkafka::Message;
                tracing::error!(shard = self.shard, error = %e, topic = m.topic(),
                    "kafka delivery failed; record lost after message.timeout.ms");
            }
        }
    }
}

/// Builds the librdkafka configuration from ours.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("enable.idempotence", k.idempotence.to_string())
        .set("acks", &k.acks)
        .set("linger.ms", k.linger_ms.to_string())
        .set("batch.num.messages", k.batch_num_messages.to_string())
        .set("compression.type", &k.compression)
        .set("message.timeout.ms", k.message_timeout_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            k.queue_max_messages.to_string(),
        )
        .set("client.id", &k.client_id);
    for (key, v) in &k.extra {
        c.set(key, v);
    }
    c
}

pub struct KafkaSink {
    producer: BaseProducer<ShardContext>,
    telemetry_template: String,
    status_template: String,
    topics: HashMap<String, (String, String)>,
    buf: Vec<u8>,
    queue_max: usize,
    metrics: Arc<ShardMetrics>,
}

impl KafkaSink {
    pub fn new(
        k: &KafkaConfig,
        shard: usize,
        metrics: Arc<ShardMetrics>,
    ) -> anyhow::Result<KafkaSink> {
        let mut cfg = client_config(k);
        cfg.set("client.id", format!("{}-shard{shard}", k.client_id));
        let producer = cfg.create_with_context(ShardContext {
            metrics: metrics.clone(),
            shard,
        })?;
        Ok(KafkaSink {
            producer,
            telemetry_template: k.telemetry_topic.clone(),
            status_template: k.status_topic.clone(),
            topics: HashMap::new(),
            buf: Vec::with_capacity(1024),
            queue_max: k.queue_max_messages as usize,
            metrics,
        })
    }

    /// Queues `self.buf` on the tenant's telemetry or status topic. Topic
    /// names are built once per tenant; no allocation per record.
    fn send(&mut self, telemetry: bool, tenant: &str, key: &str) -> Result<(), SinkError> {
        if !self.topics.contains_key(tenant) {
            let t = (
                topic_for(&self.telemetry_template, tenant),
                topic_for(&self.status_template, tenant),
            );
            self.topics.insert(tenant.to_string(), t);
        }
        let (t, s) = &self.topics[tenant];
        let topic: &str = if telemetry { t } else { s };
        let rec = BaseRecord::to(topic).key(key).payload(&self.buf[..]);
        match self.producer.send(rec) {
            Ok(()) => Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SinkError::Full)
            }
            Err((e, _)) => {
                ShardMetrics::inc(&self.metrics.kafka_enqueue_failed);
                tracing::error!(%e, topic, "kafka producer refused a record");
                Err(SinkError::Rejected)
            }
        }
    }

    /// Serves delivery callbacks; call often from the shard.
    pub fn poll(&self) {
        self.producer.poll(Duration::ZERO);
        ShardMetrics::set(
            &self.metrics.kafka_queue,
            self.producer.in_flight_count() as i64,
        );
    }

    /// Waits (bounded) for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) -> bool {
        match self.producer.flush(timeout) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%e, remaining = self.producer.in_flight_count(), "kafka flush did not complete");
                false
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.producer.in_flight_count().max(0) as usize
    }
}

impl Sink for KafkaSink {
    fn has_capacity(&self, n: usize) -> bool {
        self.in_flight() + n <= self.queue_max
    }
    fn publish_telemetry(&mut self, p: &TelemetryPoint<'_>) -> Result<(), SinkError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, p).map_err(|_| SinkError::Rejected)?;
        self.send(true, p.tenant_id, p.device_id)
    }
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, e).map_err(|_| SinkError::Rejected)?;
        self.send(false, e.tenant_id, e.device_id)
    }
}

//! The per-shard Kafka producer.
//!
//! One `rdkafka` `BaseProducer` per shard, polled from that shard's executor,
//! so delivery callbacks run on the shard thread and touch only its metrics.
//! Idempotence on and `acks=all` by default: a record accepted into the queue
//! is delivered exactly once as long as the broker returns within
//! `message.timeout.ms`. The queue bound (`queue.buffering.max.messages`) is the
//! back-pressure signal the server turns into 5.03 / withheld ACKs.
//!
//! A record may carry a delivery tag (librdkafka's per-message opaque): its
//! delivery report, served by [`KafkaSink::poll`] on the shard thread, is
//! handed back through [`KafkaSink::drain_deliveries`], so the server
//! acknowledges a CON notification or a Send once the broker has the record.

use super::{json, topic_for, DeliveryTag, Sink, SinkError, StatusEvent, TelemetryPoint};
use crate::config::KafkaConfig;
use crate::metrics::ShardMetrics;
use crate::proto::lwm2m::output::BootstrapEvent;
use crate::proto::FastMap;
use crossbeam_channel::{Receiver, Sender};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::sync::Arc;
use std::time::Duration;

pub struct ShardContext {
    metrics: Arc<ShardMetrics>,
    shard: usize,
    /// "shard{i}", for log lines.
    client: String,
    /// (tag, delivered) of tagged records. The callback runs inside
    /// `poll` on the shard thread; the channel never blocks.
    deliveries: Sender<(DeliveryTag, bool)>,
}

impl ClientContext for ShardContext {
    // One outage log for every client of the process (super::kafka_log):
    // librdkafka repeats itself per client and per reconnect attempt.
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        super::kafka_log::client_log(&self.client, level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        super::kafka_log::client_error(&self.client, &error, reason);
    }
}

impl ProducerContext for ShardContext {
    /// The delivery tag, 0 for untagged records.
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, tag: usize) {
        let ok = match r {
            Ok(m) => {
                ShardMetrics::inc(&self.metrics.kafka_delivered);
                super::kafka_log::broker_answered(&self.client);
                // librdkafka stamps each record with its production time
                // (CreateTime, ms) when we give none.
                use rdkafka::Message;
                if let Some(ms) = m.timestamp().to_millis() {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(ms);
                    self.metrics
                        .kafka_delivery_seconds
                        .observe_us(now.saturating_sub(ms).max(0) as u64 * 1000);
                }
                true
            }
            Err((e, m)) => {
                ShardMetrics::inc(&self.metrics.kafka_delivery_failed);
                use rdkafka::Message;
                tracing::error!(shard = self.shard, error = %e, topic = m.topic(),
                    "kafka delivery failed after message.timeout.ms; an acknowledged-on-queue record is lost, a delivery-tagged one was never acknowledged");
                false
            }
        };
        if tag != 0 {
            let _ = self.deliveries.send((tag as DeliveryTag, ok));
        }
    }
}

/// Why the broker security settings cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("kafka.sasl: {0}")]
    Sasl(String),
}

/// Sets `security.protocol` and the TLS / SASL properties from
/// `[kafka.tls]` / `[kafka.sasl]` (librdkafka CONFIGURATION.md names). The
/// SASL password is read here from its file or variable; it goes only into
/// librdkafka's configuration, never into a log line.
pub fn apply_security(k: &KafkaConfig, c: &mut ClientConfig) -> Result<(), SecurityError> {
    let protocol = match (&k.tls, &k.sasl) {
        (None, None) => return Ok(()),
        (Some(_), None) => "ssl",
        (Some(_), Some(_)) => "sasl_ssl",
        (None, Some(_)) => "sasl_plaintext",
    };
    c.set("security.protocol", protocol);
    if let Some(t) = &k.tls {
        if let Some(ca) = &t.ca_file {
            c.set("ssl.ca.location", ca.to_string_lossy());
        }
        if let Some(cert) = &t.cert_file {
            c.set("ssl.certificate.location", cert.to_string_lossy());
        }
        if let Some(key) = &t.key_file {
            c.set("ssl.key.location", key.to_string_lossy());
        }
        let verify = t.verify_hostname.unwrap_or(true);
        c.set(
            "ssl.endpoint.identification.algorithm",
            if verify { "https" } else { "none" },
        );
    }
    if let Some(s) = &k.sasl {
        let mech = s.mechanism.to_ascii_uppercase();
        if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mech.as_str()) {
            return Err(SecurityError::Sasl(format!(
                "mechanism {:?}: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                s.mechanism
            )));
        }
        let password = match (&s.password_env, &s.password_file) {
            (Some(var), _) => std::env::var(var)
                .map_err(|_| SecurityError::Sasl(format!("password_env {var} is not set")))?,
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| SecurityError::Sasl(format!("password_file {}: {e}", f.display())))?
                .trim_end_matches(['\r', '\n'])
                .to_string(),
            (None, None) => {
                return Err(SecurityError::Sasl(
                    "password_file or password_env is required".into(),
                ))
            }
        };
        c.set("sasl.mechanisms", mech)
            .set("sasl.username", &s.username)
            .set("sasl.password", password);
    }
    Ok(())
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
    /// Telemetry and status topic of each tenant seen (foldhash instead of
    /// SipHash: the tenant is hashed for every record).
    topics: FastMap<String, (String, String)>,
    buf: Vec<u8>,
    queue_max: usize,
    metrics: Arc<ShardMetrics>,
    deliveries: Receiver<(DeliveryTag, bool)>,
    /// Live telemetry of watched devices (`GET /v1/devices/{id}/telemetry`).
    tap: Option<Arc<super::tap::Tap>>,
}

impl KafkaSink {
    pub fn new(
        k: &KafkaConfig,
        shard: usize,
        metrics: Arc<ShardMetrics>,
    ) -> Result<KafkaSink, KafkaError> {
        let mut cfg = client_config(k);
        cfg.set("client.id", format!("{}-shard{shard}", k.client_id));
        apply_security(k, &mut cfg).map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let producer = cfg.create_with_context(ShardContext {
            metrics: metrics.clone(),
            shard,
            client: format!("shard{shard}"),
            deliveries: tx,
        })?;
        Ok(KafkaSink {
            producer,
            telemetry_template: k.telemetry_topic.clone(),
            status_template: k.status_topic.clone(),
            topics: FastMap::default(),
            buf: Vec::with_capacity(1024),
            queue_max: k.queue_max_messages as usize,
            metrics,
            deliveries: rx,
            tap: None,
        })
    }

    /// Points published for watched devices also go to `tap`.
    pub fn set_tap(&mut self, tap: Arc<super::tap::Tap>) {
        self.tap = Some(tap);
    }

    /// Delivery reports of tagged records served by the last `poll`s.
    pub fn drain_deliveries(&self, mut f: impl FnMut(DeliveryTag, bool)) {
        while let Ok((t, ok)) = self.deliveries.try_recv() {
            f(t, ok);
        }
    }

    /// Queues `self.buf` on the tenant's telemetry or status topic. Topic
    /// names are built once per tenant; no allocation per record.
    fn send(
        &mut self,
        telemetry: bool,
        tenant: &str,
        key: &str,
        tag: usize,
    ) -> Result<(), SinkError> {
        if !self.topics.contains_key(tenant) {
            let t = (
                topic_for(&self.telemetry_template, tenant),
                topic_for(&self.status_template, tenant),
            );
            self.topics.insert(tenant.to_string(), t);
        }
        let (t, s) = &self.topics[tenant];
        let topic: &str = if telemetry { t } else { s };
        let rec = BaseRecord::with_opaque_to(topic, tag)
            .key(key)
            .payload(&self.buf[..]);
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
    fn publish_telemetry(
        &mut self,
        p: &TelemetryPoint<'_>,
        tag: Option<DeliveryTag>,
    ) -> Result<(), SinkError> {
        self.buf.clear();
        json::encode_point(p, &mut self.buf);
        self.send(true, p.tenant_id, p.device_id, tag.unwrap_or(0) as usize)?;
        if let Some(t) = &self.tap {
            if t.active() {
                t.offer(p.device_id, &self.buf);
            }
        }
        Ok(())
    }
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError> {
        self.buf.clear();
        json::encode_status(e, &mut self.buf).map_err(|_| SinkError::Rejected)?;
        self.send(false, e.tenant_id, e.device_id, 0)
    }

    fn publish_bootstrap(&mut self, e: &BootstrapEvent<'_>) -> Result<(), SinkError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, e).map_err(|_| SinkError::Rejected)?;
        self.send(false, e.tenant_id, e.device_id, 0)
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;
    use crate::config::{KafkaSasl, KafkaTls};

    #[test]
    fn tls_and_sasl_map_to_librdkafka_properties() {
        let mut k = KafkaConfig::default();
        let mut c = ClientConfig::new();
        apply_security(&k, &mut c).unwrap();
        assert_eq!(c.get("security.protocol"), None);
        k.tls = Some(KafkaTls {
            ca_file: Some("/etc/ca.crt".into()),
            cert_file: Some("/etc/client.crt".into()),
            key_file: Some("/etc/client.key".into()),
            verify_hostname: None,
        });
        let mut c = ClientConfig::new();
        apply_security(&k, &mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/ca.crt"));
        assert_eq!(c.get("ssl.certificate.location"), Some("/etc/client.crt"));
        assert_eq!(c.get("ssl.key.location"), Some("/etc/client.key"));
        assert_eq!(
            c.get("ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        std::env::set_var("COREM_TEST_SASL_PW", "s3cret");
        k.sasl = Some(KafkaSasl {
            mechanism: "scram-sha-512".into(),
            username: "gw".into(),
            password_file: None,
            password_env: Some("COREM_TEST_SASL_PW".into()),
        });
        let mut c = ClientConfig::new();
        apply_security(&k, &mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("gw"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        // The config's Debug (what a log line could show) has no password.
        assert!(!format!("{k:?}").contains("s3cret"));
        // From a file, trailing newline dropped; without TLS: SASL_PLAINTEXT.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "filepw\n").unwrap();
        k.tls = None;
        k.sasl = Some(KafkaSasl {
            mechanism: "PLAIN".into(),
            username: "gw".into(),
            password_file: Some(f),
            password_env: None,
        });
        let mut c = ClientConfig::new();
        apply_security(&k, &mut c).unwrap();
        assert_eq!(c.get("security.protocol"), Some("sasl_plaintext"));
        assert_eq!(c.get("sasl.password"), Some("filepw"));
        // Refusals.
        k.sasl.as_mut().unwrap().mechanism = "GSSAPI".into();
        assert!(apply_security(&k, &mut ClientConfig::new()).is_err());
        k.sasl.as_mut().unwrap().mechanism = "PLAIN".into();
        k.sasl.as_mut().unwrap().password_file = None;
        assert!(apply_security(&k, &mut ClientConfig::new()).is_err());
    }
}

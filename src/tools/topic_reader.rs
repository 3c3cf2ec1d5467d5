//! Reading records back from the broker: used by `corem-topic-tail` (the demo's
//! window onto the topics) and by the integration tests, which check every
//! published record field by field.
//!
//! Uses manual partition assignment from the beginning of each topic (no
//! consumer group), so it reads everything, repeatably.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: serde_json::Value,
}

pub struct TopicReader {
    consumer: BaseConsumer,
}

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} did not appear within {1:?}")]
    NoTopic(String, Duration),
}

impl TopicReader {
    /// Assigns every partition of `topics` from the beginning. Topics that do
    /// not exist yet are retried until `wait`.
    pub fn new(
        brokers: &str,
        topics: &[String],
        wait: Duration,
    ) -> Result<TopicReader, ReaderError> {
        Self::with_config(brokers, topics, wait, &[])
    }

    /// The same, with extra librdkafka properties (TLS to the broker).
    pub fn with_config(
        brokers: &str,
        topics: &[String],
        wait: Duration,
        extra: &[(&str, &str)],
    ) -> Result<TopicReader, ReaderError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("group.id", "corem-lwm2m-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest");
        for (k, v) in extra {
            cfg.set(*k, *v);
        }
        let consumer: BaseConsumer = cfg.create()?;
        let deadline = Instant::now() + wait;
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            let parts = loop {
                match consumer.fetch_metadata(Some(t), Duration::from_secs(5)) {
                    Ok(md) => {
                        let n = md
                            .topics()
                            .iter()
                            .find(|x| x.name() == t && x.error().is_none())
                            .map(|x| x.partitions().len())
                            .unwrap_or(0);
                        if n > 0 {
                            break n;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "metadata"),
                }
                if Instant::now() > deadline {
                    return Err(ReaderError::NoTopic(t.clone(), wait));
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            for p in 0..parts as i32 {
                tpl.add_partition_offset(t, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(TopicReader { consumer })
    }

    /// Reads until `want` records arrived or `timeout` passed.
    pub fn read(&self, want: usize, timeout: Duration) -> Vec<Record> {
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while out.len() < want && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let value = m
                        .payload()
                        .and_then(|p| serde_json::from_slice(p).ok())
                        .unwrap_or(serde_json::Value::Null);
                    out.push(Record {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        value,
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "consume"),
                None => {}
            }
        }
        out
    }
}

//! Output side: the records other CORE-M services consume (TelemetryPoint,
//! device.status), their JSON encoding, topic naming, and the [`Sink`] trait
//! the sans-IO engine publishes through. [`kafka::KafkaSink`] is the real
//! implementation (one rdkafka producer per shard); tests use [`MemorySink`].

pub mod kafka;

use serde::Serialize;
use std::collections::BTreeMap;

/// One telemetry record on `telemetry.raw.{tenant_id}` (key = device_id).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TelemetryPoint<'a> {
    pub tenant_id: &'a str,
    pub device_id: &'a str,
    pub endpoint: &'a str,
    /// Epoch ms: the SenML time when the device gave one, else receive time.
    pub ts: i64,
    pub received_at: i64,
    pub numeric_values: &'a BTreeMap<&'a str, f64>,
    pub string_values: &'a BTreeMap<&'a str, String>,
    #[serde(skip_serializing_if = "is_empty")]
    pub bool_values: &'a BTreeMap<&'a str, bool>,
    pub source: PointSource<'a>,
}

fn is_empty<K, V>(m: &&BTreeMap<K, V>) -> bool {
    m.is_empty()
}

/// Where the point came from, for tracing a value back to the device.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PointSource<'a> {
    pub protocol: &'static str,
    /// `notify` (Observe) or `send` (LwM2M 1.1 Send) or `read`.
    pub operation: &'static str,
    pub path: &'a str,
    pub content_format: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observe_seq: Option<u32>,
    pub shard: usize,
    pub registration_id: &'a str,
}

/// Registration details carried on status events.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RegistrationInfo<'a> {
    pub registration_id: &'a str,
    pub lifetime_s: u32,
    pub binding: &'a str,
    pub lwm2m_version: &'a str,
    pub queue_mode: bool,
    pub address: String,
    pub objects: Vec<String>,
}

/// One record on `device.status.{tenant_id}` (key = device_id).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusEvent<'a> {
    pub tenant_id: &'a str,
    pub device_id: &'a str,
    pub endpoint: &'a str,
    /// `online` or `offline`.
    pub status: &'static str,
    /// `registered`, `updated`, `deregistered`, `expired`, `replaced`.
    pub reason: &'static str,
    pub last_seen: i64,
    pub ts: i64,
    pub registration: RegistrationInfo<'a>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The producer queue is full (broker slow or away): back-pressure.
    #[error("producer queue full")]
    Full,
    /// The record could not be queued for another reason (logged, counted).
    #[error("record rejected by the producer")]
    Rejected,
}

/// Where the engine publishes. Accepting a record means the producer queued it
/// and will deliver it (idempotently) unless the message timeout passes.
pub trait Sink {
    /// True when `n` more records fit in the queue right now.
    fn has_capacity(&self, n: usize) -> bool;
    fn publish_telemetry(&mut self, p: &TelemetryPoint<'_>) -> Result<(), SinkError>;
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError>;
}

/// Expands `{tenant_id}` in a topic template.
pub fn topic_for(template: &str, tenant_id: &str) -> String {
    template.replace("{tenant_id}", tenant_id)
}

/// An in-memory sink for tests and the deterministic harness: records the
/// JSON, and can be made "full" to exercise back-pressure.
#[derive(Default)]
pub struct MemorySink {
    pub telemetry: Vec<serde_json::Value>,
    pub status: Vec<serde_json::Value>,
    pub capacity: Option<usize>,
}

impl MemorySink {
    fn room(&self) -> usize {
        self.capacity.unwrap_or(usize::MAX)
    }
}

impl Sink for MemorySink {
    fn has_capacity(&self, n: usize) -> bool {
        n <= self.room()
    }
    fn publish_telemetry(&mut self, p: &TelemetryPoint<'_>) -> Result<(), SinkError> {
        if self.room() == 0 {
            return Err(SinkError::Full);
        }
        if let Some(c) = &mut self.capacity {
            *c -= 1;
        }
        self.telemetry
            .push(serde_json::to_value(p).map_err(|_| SinkError::Rejected)?);
        Ok(())
    }
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError> {
        if self.room() == 0 {
            return Err(SinkError::Full);
        }
        if let Some(c) = &mut self.capacity {
            *c -= 1;
        }
        self.status
            .push(serde_json::to_value(e).map_err(|_| SinkError::Rejected)?);
        Ok(())
    }
}

//! What the LwM2M server produces for the rest of CORE-M, and the one
//! interface it hands it to: the [`Sink`].
//!
//! Records are views borrowing the server's state ([`TelemetryPoint`],
//! [`StatusEvent`]); the sink encodes and queues them. A telemetry record may
//! carry a [`DeliveryTag`]: the sink reports the broker's verdict for it
//! later (the shard feeds it back with `Server::handle_delivery`), which is
//! how a CON notification or a Send is acknowledged only once the record is
//! durable. Wire contracts: `../shared/docs/design.md`.

use super::content::Num;
use serde::Serialize;

/// Identifies one record whose delivery the server waits for.
pub type DeliveryTag = u64;

/// One telemetry record on `telemetry.raw.{tenant_id}` (key = device_id).
/// Value lists are sorted by metric name, each name once.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryPoint<'a> {
    pub tenant_id: &'a str,
    pub device_id: &'a str,
    pub endpoint: &'a str,
    /// Epoch ms: the SenML time when the device gave one, else receive time.
    pub ts: i64,
    pub received_at: i64,
    pub numeric_values: &'a [(&'a str, Num)],
    pub string_values: &'a [(&'a str, String)],
    pub bool_values: &'a [(&'a str, bool)],
    pub source: PointSource<'a>,
}

/// Where the point came from, for tracing a value back to the device.
#[derive(Debug, Clone, PartialEq)]
pub struct PointSource<'a> {
    pub protocol: &'static str,
    /// `notify` (Observe) or `send` (LwM2M 1.1 Send).
    pub operation: &'static str,
    pub path: &'a str,
    pub content_format: u16,
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
    /// Per-registration sequence number of its status events (0 for
    /// `registered`): orders them when a registration that moved between
    /// shards had events queued on two producers.
    pub seq: u64,
}

/// One record on `device.status.{tenant_id}` (key = device_id).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusEvent<'a> {
    pub tenant_id: &'a str,
    pub device_id: &'a str,
    pub endpoint: &'a str,
    /// `online` or `offline`.
    pub status: &'static str,
    /// `registered`, `updated`, `deregistered`, `expired`, `deprovisioned`.
    pub reason: &'static str,
    pub last_seen: i64,
    pub ts: i64,
    pub registration: RegistrationInfo<'a>,
}

/// A bootstrap status record on `device.status.{tenant_id}` (key =
/// device_id): `status` is `bootstrap` (it does not change the device's
/// online state), `reason` is `bootstrapping`, `bootstrapped` or
/// `bootstrap_failed`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BootstrapEvent<'a> {
    pub tenant_id: &'a str,
    pub device_id: &'a str,
    pub endpoint: &'a str,
    pub status: &'static str,
    pub reason: &'static str,
    pub ts: i64,
    pub bootstrap: BootstrapInfo<'a>,
}

/// Details of a bootstrap session.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BootstrapInfo<'a> {
    pub address: &'a str,
    /// `coap` or `coaps` (the bootstrap listener the device used).
    pub transport: &'static str,
    /// The LwM2M Server URIs written (or to be written).
    pub servers: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lwm2m_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_format: Option<u16>,
    pub psk_generated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// On failure: the step (`request`, `discover`, `delete`, `write`,
    /// `store`, `finish`), its path, the device's CoAP code (or `timeout`,
    /// `reset`) and its diagnostic payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<&'a str>,
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

/// Where the server publishes. Accepting a record means the producer queued
/// it and will deliver it (idempotently) unless its message timeout passes;
/// a tagged record's outcome is reported back through the shard.
pub trait Sink {
    /// True when `n` more records fit in the queue right now.
    fn has_capacity(&self, n: usize) -> bool;
    fn publish_telemetry(
        &mut self,
        p: &TelemetryPoint<'_>,
        tag: Option<DeliveryTag>,
    ) -> Result<(), SinkError>;
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError>;
    /// A bootstrap status record (same topic as [`Sink::publish_status`]).
    fn publish_bootstrap(&mut self, e: &BootstrapEvent<'_>) -> Result<(), SinkError>;
}

/// When a CON notification or a Send is acknowledged to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckPolicy {
    /// After the broker confirmed the record (idempotent producer, acks=all):
    /// an acknowledged value survives a gateway crash.
    #[default]
    Delivered,
    /// As soon as the producer queued the record (lower latency; a crash
    /// loses what was queued).
    Queued,
}

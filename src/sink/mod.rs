//! Output side: the Kafka producer of each shard ([`kafka::KafkaSink`]),
//! record encoding ([`json`]) and topic naming. The records and the
//! [`Sink`] interface are the LwM2M server's ([`crate::proto::lwm2m::output`]);
//! this layer knows nothing of the control plane.

pub mod json;
pub mod kafka;
pub mod kafka_log;
pub mod tap;

pub use crate::proto::lwm2m::output::{
    AckPolicy, DeliveryTag, PointSource, RegistrationInfo, Sink, SinkError, StatusEvent,
    TelemetryPoint,
};

/// Expands `{tenant_id}` in a topic template.
pub fn topic_for(template: &str, tenant_id: &str) -> String {
    template.replace("{tenant_id}", tenant_id)
}

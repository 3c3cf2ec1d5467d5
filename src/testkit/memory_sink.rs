//! An in-memory [`Sink`] for tests, benches and the deterministic harness:
//! it encodes records with the real encoder ([`crate::sink::json`]) and
//! keeps them parsed, can be made "full" to exercise back-pressure, and holds
//! the delivery tags of tagged records until the test delivers them (as the
//! broker's confirmation would).

use crate::proto::lwm2m::output::{
    BootstrapEvent, DeliveryTag, Sink, SinkError, StatusEvent, TelemetryPoint,
};
use crate::sink::json;
use std::cell::Cell;
use std::rc::Rc;

#[derive(Default)]
pub struct MemorySink {
    pub telemetry: Vec<serde_json::Value>,
    pub status: Vec<serde_json::Value>,
    /// A counter shared by several sinks, stamped on every record, so the
    /// records of several shards can be put back in order.
    pub clock: Option<Rc<Cell<u64>>>,
    pub telemetry_order: Vec<u64>,
    pub status_order: Vec<u64>,
    /// Records that still fit; `None` = unbounded.
    pub capacity: Option<usize>,
    /// Tags of records the "broker" has not confirmed yet.
    pub in_flight: Vec<DeliveryTag>,
    pub buf: Vec<u8>,
}

impl MemorySink {
    fn room(&self) -> usize {
        self.capacity.unwrap_or(usize::MAX)
    }

    fn take_room(&mut self) -> Result<(), SinkError> {
        if self.room() == 0 {
            return Err(SinkError::Full);
        }
        if let Some(c) = &mut self.capacity {
            *c -= 1;
        }
        Ok(())
    }

    fn stamp(&self) -> u64 {
        match &self.clock {
            Some(c) => {
                let v = c.get();
                c.set(v + 1);
                v
            }
            None => 0,
        }
    }

    /// Confirms every record in flight; returns their tags (feed them to
    /// `Server::handle_delivery`).
    pub fn deliver_all(&mut self) -> Vec<DeliveryTag> {
        std::mem::take(&mut self.in_flight)
    }
}

impl Sink for MemorySink {
    fn has_capacity(&self, n: usize) -> bool {
        n <= self.room()
    }
    fn publish_telemetry(
        &mut self,
        p: &TelemetryPoint<'_>,
        tag: Option<DeliveryTag>,
    ) -> Result<(), SinkError> {
        self.take_room()?;
        self.buf.clear();
        json::encode_point(p, &mut self.buf);
        let v = serde_json::from_slice(&self.buf).map_err(|_| SinkError::Rejected)?;
        self.telemetry.push(v);
        let t = self.stamp();
        self.telemetry_order.push(t);
        if let Some(t) = tag {
            self.in_flight.push(t);
        }
        Ok(())
    }
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError> {
        self.take_room()?;
        self.status
            .push(serde_json::to_value(e).map_err(|_| SinkError::Rejected)?);
        let t = self.stamp();
        self.status_order.push(t);
        Ok(())
    }
    fn publish_bootstrap(&mut self, e: &BootstrapEvent<'_>) -> Result<(), SinkError> {
        self.take_room()?;
        self.status
            .push(serde_json::to_value(e).map_err(|_| SinkError::Rejected)?);
        let t = self.stamp();
        self.status_order.push(t);
        Ok(())
    }
}

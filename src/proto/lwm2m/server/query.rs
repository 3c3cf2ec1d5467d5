//! Read-only queries from the control plane: what this shard knows of one
//! registration (`GET /v1/devices/{device_id}`). Plain data out, nothing
//! changes; the admin API asks the shard the RPC book last saw holding the
//! device, through the same explicit per-shard channel as RPCs.

use super::*;
use serde::Serialize;

/// A registration as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub shard: u16,
    pub endpoint: String,
    pub registration_id: String,
    pub address: String,
    /// Registered over a DTLS session.
    pub dtls: bool,
    pub lwm2m_version: &'static str,
    pub binding: String,
    pub lifetime_s: u32,
    /// Seconds until the registration expires without an Update.
    pub expires_in_s: u64,
    pub queue_mode: bool,
    /// A request can be sent now (always, unless queue mode and asleep;
    /// TS 1.1 Transport §6.5).
    pub awake: bool,
    pub registered_at: i64,
    pub last_seen: i64,
    /// Alternate path (TS 1.1 Core §6.2.1), `/` by default.
    pub root_path: String,
    /// The object links of the last Register / Update (`/3/0`, `/5`).
    pub objects: Vec<String>,
    pub content_format: Option<u16>,
    pub observations: Vec<ObservationView>,
    /// The RPC being carried out on the device now.
    pub rpc_in_flight: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObservationView {
    pub token: String,
    /// The observed path (the first one of a composite observation).
    pub path: String,
    /// Observe-Composite (TS 1.1 Core §5.4.4): every path it covers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub composite: Vec<String>,
    /// `profile` (set up for the device's profile) or `rpc`.
    pub origin: &'static str,
    /// The Observe number of the newest notification (RFC 7641 §3.4).
    pub last_seq: Option<u32>,
    /// How long ago that notification arrived.
    pub last_notification_ms_ago: Option<u64>,
}

impl Server {
    /// What this shard holds of `endpoint`'s registration (None: not here).
    pub fn describe(&self, now: Now, endpoint: &str) -> Option<DeviceView> {
        let id = self.regs.by_endpoint(endpoint)?;
        let r = self.regs.get(id)?;
        let observations = self
            .observation_states(now, id)
            .into_iter()
            .map(|o| ObservationView {
                token: format!("{:016x}", o.token),
                path: o.path,
                composite: o.composite,
                origin: if o.rpc { "rpc" } else { "profile" },
                last_seq: o.window.last,
                last_notification_ms_ago: o.window.age_ms,
            })
            .collect();
        Some(DeviceView {
            shard: self.cfg.shard,
            endpoint: r.endpoint.to_string(),
            registration_id: loc_string(r.id),
            address: r.peer.addr().to_string(),
            dtls: r.peer.is_dtls(),
            lwm2m_version: r.version.as_str(),
            binding: r.binding.to_string(),
            lifetime_s: r.lifetime_s,
            expires_in_s: r
                .expires_at
                .saturating_duration_since(now.instant)
                .as_secs(),
            queue_mode: r.queue_mode,
            awake: r.reachable(now.instant),
            registered_at: r.registered_at_ms,
            last_seen: r.last_seen_ms,
            root_path: r.root_path.to_string(),
            objects: r.object_links(),
            content_format: r.preferred_cf,
            observations,
            rpc_in_flight: self.rpcs.get(&id).map(|f| f.rpc_id().to_string()),
        })
    }
}

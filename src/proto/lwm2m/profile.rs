//! Device profiles, resolved: which LwM2M resources become which CORE-M
//! metrics (and of which kind), which paths the gateway observes with which
//! notification attributes, and how platform RPC methods map to LwM2M
//! operations. The control plane parses and reloads profile files
//! (`control::profiles`); the LwM2M server reads a [`ProfileMap`] snapshot.

use super::content::{DataType, ResourcePath};
use crate::proto::FastMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// How a value is published on the TelemetryPoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    Numeric,
    String,
    Bool,
}

/// A resolved, validated profile.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    /// Mapping by resource path (no resource instance).
    pub resources: FastMap<ResourcePath, Mapping>,
    pub observe: Vec<(ResourcePath, Option<u32>, Option<u32>)>,
    pub rpc: HashMap<String, RpcMethod>,
    /// Values of paths no mapping covers (observations set up by RPC):
    /// published with the path as the metric name, or only counted.
    pub publish_unmapped: bool,
}

/// A profile's RPC method: an operation on a path, with fixed or
/// templated (`{param}`) Execute arguments or Write value.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcMethod {
    pub operation: String,
    pub path: ResourcePath,
    pub args: Option<String>,
    pub value: Option<serde_json::Value>,
    pub format: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub metric: Arc<str>,
    pub kind: MetricKind,
    pub data_type: Option<DataType>,
}

/// Known data types of common resources (OMA object registry), used when a
/// profile does not say.
pub fn builtin_type(p: &ResourcePath) -> Option<DataType> {
    let r = p.resource?;
    match (p.object, r) {
        // IPSO sensor value, min/max measured, min/max range (Float).
        (_, 5700) | (_, 5601..=5604) => Some(DataType::Float),
        // Device: battery level, memory free, error code, battery status, memory total.
        (3, 6..=11) | (3, 20) | (3, 21) => Some(DataType::Integer),
        (3, 13) => Some(DataType::Time),
        // Device: manufacturer, model, serial, firmware version, time zone,
        // device type, hardware / software version, binding modes.
        (3, 0..=3) | (3, 14..=19) => Some(DataType::String),
        // Security (TS 1.1 Core §E.1): URI, bootstrap flag, mode, keys,
        // short server id, hold-off, bootstrap account timeout.
        (0, 0) => Some(DataType::String),
        (0, 1) => Some(DataType::Boolean),
        (0, 2) | (0, 10..=12) => Some(DataType::Integer),
        (0, 3..=5) => Some(DataType::Opaque),
        // Access Control (§E.3): object, instance, ACL, owner.
        (2, 0..=3) => Some(DataType::Integer),
        // Server: short server id, lifetime, pmin, pmax, disable timeout,
        // notification storing (bool), binding.
        (1, 0..=3) | (1, 5) => Some(DataType::Integer),
        (1, 6) => Some(DataType::Boolean),
        (1, 7) => Some(DataType::String),
        // Firmware update: package URI, state, update result, name, version.
        (5, 1) | (5, 6) | (5, 7) => Some(DataType::String),
        (5, 3) | (5, 5) | (5, 9) => Some(DataType::Integer),
        (5, 0) => Some(DataType::Opaque),
        // Connectivity monitoring: radio signal strength, link quality, cell id...
        (4, 2..=3) | (4, 8..=12) => Some(DataType::Integer),
        // Location: latitude, longitude, altitude, radius, speed.
        (6, 0..=3) | (6, 6) => Some(DataType::Float),
        (6, 5) => Some(DataType::Time),
        // Application type / units (String).
        (_, 5701) | (_, 5750) => Some(DataType::String),
        // On/off, digital input state.
        (_, 5850) | (_, 5500) => Some(DataType::Boolean),
        _ => None,
    }
}

impl Profile {
    /// Mapping for a value path (resource instances map through their resource).
    pub fn mapping(&self, p: &ResourcePath) -> Option<&Mapping> {
        self.resources
            .get(p)
            .or_else(|| self.resources.get(&p.without_resource_instance()))
    }
}

/// A snapshot of the profile set; always holds `default`.
pub type ProfileMap = FastMap<String, Arc<Profile>>;

impl Profile {
    /// The profile named `name`, or `default` when there is none by that name.
    pub fn lookup<'m>(map: &'m ProfileMap, name: &str) -> Option<&'m Arc<Profile>> {
        map.get(name).or_else(|| map.get("default"))
    }
}

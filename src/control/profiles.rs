//! Device profiles: which LwM2M resources become which CORE-M metrics, which
//! paths the gateway observes (and with which Write-Attributes), and how
//! platform RPC methods map to LwM2M operations.
//!
//! Profiles are TOML files in the profile directory (one profile per file,
//! named by `name` or the file stem) plus the built-in `default` profile with
//! the product brief's mappings. The set is swapped atomically (`arc_swap`):
//! shards read it lock-free on every notification, so a reload (SIGHUP or
//! `POST /v1/profiles/reload`) takes effect without a restart. Observation
//! sets of existing registrations change at their next Register.

use crate::proto::lwm2m::content::{DataType, ResourcePath};
pub use crate::proto::lwm2m::profile::{
    builtin_type, Mapping, MetricKind, Profile, ProfileMap, RpcMethod,
};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceMapping {
    pub path: String,
    pub metric: String,
    #[serde(default = "numeric")]
    pub kind: MetricKind,
    /// LwM2M data type, used to interpret TLV / opaque bytes.
    #[serde(default, rename = "type")]
    pub data_type: Option<DataType>,
    /// Observe this resource after Register.
    #[serde(default)]
    pub observe: bool,
    #[serde(default)]
    pub pmin: Option<u32>,
    #[serde(default)]
    pub pmax: Option<u32>,
}

fn numeric() -> MetricKind {
    MetricKind::Numeric
}

/// An observation the gateway establishes (object, instance or resource path).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObserveSpec {
    pub path: String,
    #[serde(default)]
    pub pmin: Option<u32>,
    #[serde(default)]
    pub pmax: Option<u32>,
}

/// LwM2M operation an RPC method maps to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcMapping {
    pub operation: String,
    pub path: String,
    /// Execute arguments (TS Core §5.4.5), `{param}` filled from the RPC's
    /// params.
    #[serde(default)]
    pub args: Option<String>,
    /// Write value; strings may hold `{param}` placeholders.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Content format to use instead of the device's preferred one.
    #[serde(default)]
    pub format: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProfileFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "resource")]
    resources: Vec<ResourceMapping>,
    #[serde(default)]
    observe: Vec<ObserveSpec>,
    #[serde(default)]
    rpc: HashMap<String, RpcMapping>,
    /// Publish values of unmapped paths under their path (default: count
    /// them only).
    #[serde(default)]
    publish_unmapped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile {file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("reading profiles from {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The built-in default profile: the product brief's mappings.
pub const DEFAULT_PROFILE_TOML: &str = r#"
name = "default"

[[resource]]
path = "/3303/0/5700"
metric = "temperature"
kind = "numeric"
type = "float"
observe = true

[[resource]]
path = "/3304/0/5700"
metric = "humidity"
kind = "numeric"
type = "float"
observe = true

[[resource]]
path = "/3323/0/5700"
metric = "pressure"
kind = "numeric"
type = "float"
observe = true

[[resource]]
path = "/3/0/9"
metric = "battery_level"
kind = "numeric"
type = "integer"
observe = true

[rpc.reboot]
operation = "execute"
path = "/3/0/4"

[rpc.factory_reset]
operation = "execute"
path = "/3/0/5"
"#;

impl Profile {
    pub fn from_toml(file: &str, text: &str, fallback_name: &str) -> Result<Profile, ProfileError> {
        let inv = |reason: String| ProfileError::Invalid {
            file: file.to_string(),
            reason,
        };
        let pf: ProfileFile = toml::from_str(text).map_err(|e| inv(e.to_string()))?;
        let name = pf.name.unwrap_or_else(|| fallback_name.to_string());
        let mut resources = crate::proto::FastMap::default();
        let mut observe = Vec::new();
        for r in pf.resources {
            let p = ResourcePath::parse(&r.path)
                .filter(|p| p.resource.is_some() && p.resource_instance.is_none())
                .ok_or_else(|| inv(format!("{:?} is not a resource path /o/i/r", r.path)))?;
            if r.metric.is_empty() {
                return Err(inv(format!("empty metric name for {}", r.path)));
            }
            if r.observe {
                observe.push((p, r.pmin, r.pmax));
            }
            resources.insert(
                p,
                Mapping {
                    metric: Arc::from(r.metric.as_str()),
                    kind: r.kind,
                    data_type: r.data_type.or_else(|| builtin_type(&p)),
                },
            );
        }
        for o in pf.observe {
            let p = ResourcePath::parse(&o.path)
                .ok_or_else(|| inv(format!("{:?} is not an LwM2M path", o.path)))?;
            observe.push((p, o.pmin, o.pmax));
        }
        let mut rpc = HashMap::new();
        for (method, m) in pf.rpc {
            let p = ResourcePath::parse(&m.path)
                .ok_or_else(|| inv(format!("rpc {method}: bad path {:?}", m.path)))?;
            if !matches!(
                m.operation.as_str(),
                "execute"
                    | "read"
                    | "write"
                    | "discover"
                    | "observe"
                    | "cancel_observe"
                    | "delete"
                    | "create"
                    | "write_attributes"
            ) {
                return Err(inv(format!(
                    "rpc {method}: unknown operation {}",
                    m.operation
                )));
            }
            if let Some(a) = &m.args {
                // Placeholders are checked when the RPC arrives; the fixed
                // parts must already be valid arguments.
                let probe = crate::proto::lwm2m::rpc::fill_template(a, &|_| Some("0".into()))
                    .unwrap_or_default();
                if !crate::proto::lwm2m::dm::valid_execute_args(&probe) {
                    return Err(inv(format!("rpc {method}: bad execute args {a:?}")));
                }
            }
            rpc.insert(
                method,
                RpcMethod {
                    operation: m.operation,
                    path: p,
                    args: m.args,
                    value: m.value,
                    format: m.format,
                },
            );
        }
        Ok(Profile {
            name,
            resources,
            observe,
            rpc,
            publish_unmapped: pf.publish_unmapped,
        })
    }

    pub fn builtin_default() -> Profile {
        Profile::from_toml("<builtin>", DEFAULT_PROFILE_TOML, "default")
            .unwrap_or_else(|e| panic!("built-in default profile is invalid: {e}"))
    }
}

/// The live profile set.
pub struct Profiles {
    set: ArcSwap<ProfileMap>,
    dir: Option<PathBuf>,
}

impl Profiles {
    /// Loads the built-in default plus every `*.toml` in `dir`.
    pub fn load(dir: Option<&Path>) -> Result<Profiles, ProfileError> {
        let map = Self::read(dir)?;
        Ok(Profiles {
            set: ArcSwap::from_pointee(map),
            dir: dir.map(Path::to_path_buf),
        })
    }

    fn read(dir: Option<&Path>) -> Result<ProfileMap, ProfileError> {
        let mut map = ProfileMap::default();
        map.insert("default".into(), Arc::new(Profile::builtin_default()));
        let Some(dir) = dir else { return Ok(map) };
        let rd = std::fs::read_dir(dir).map_err(|e| ProfileError::Io(dir.to_path_buf(), e))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| ProfileError::Io(f.clone(), e))?;
            let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("profile");
            let p = Profile::from_toml(&f.display().to_string(), &text, stem)?;
            map.insert(p.name.clone(), Arc::new(p));
        }
        Ok(map)
    }

    /// Re-reads the directory; on error the current set stays in force.
    pub fn reload(&self) -> Result<usize, ProfileError> {
        let map = Self::read(self.dir.as_deref())?;
        let n = map.len();
        self.set.store(Arc::new(map));
        Ok(n)
    }

    /// The current set, for the shards to read once per batch.
    pub fn snapshot(&self) -> Arc<ProfileMap> {
        self.set.load_full()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Profile>> {
        self.set.load().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.set.load().keys().cloned().collect();
        v.sort();
        v
    }

    /// For tests: a set from explicit profiles.
    pub fn from_profiles(ps: Vec<Profile>) -> Profiles {
        let mut map = ProfileMap::default();
        map.insert("default".into(), Arc::new(Profile::builtin_default()));
        for p in ps {
            map.insert(p.name.clone(), Arc::new(p));
        }
        Profiles {
            set: ArcSwap::from_pointee(map),
            dir: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_has_brief_mappings() {
        let p = Profile::builtin_default();
        let m = p
            .mapping(&ResourcePath::parse("/3303/0/5700").unwrap())
            .unwrap();
        assert_eq!(&*m.metric, "temperature");
        assert_eq!(p.observe.len(), 4);
        assert_eq!(p.rpc["reboot"].path.to_string(), "/3/0/4");
        assert_eq!(
            &*p.mapping(&ResourcePath::parse("/3/0/9").unwrap())
                .unwrap()
                .metric,
            "battery_level"
        );
    }

    #[test]
    fn reload_from_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let ps = Profiles::load(Some(tmp.path())).unwrap();
        assert!(ps.get("thermo").is_none());
        std::fs::write(
            tmp.path().join("thermo.toml"),
            "[[resource]]\npath='/3303/0/5700'\nmetric='t'\n[[observe]]\npath='/3303/0'\npmin=5\n",
        )
        .unwrap();
        assert_eq!(ps.reload().unwrap(), 2);
        let t = ps.get("thermo").unwrap();
        assert_eq!(t.observe[0].1, Some(5));
        std::fs::write(
            tmp.path().join("bad.toml"),
            "[[resource]]\npath='/x'\nmetric='a'\n",
        )
        .unwrap();
        assert!(ps.reload().is_err());
        assert!(
            ps.get("thermo").is_some(),
            "a failed reload keeps the old set"
        );
    }
}

//! Endpoint directory: LwM2M endpoint name → {device_id, tenant_id, profile,
//! credentials}.
//!
//! Readers (every shard, per Register) call [`Directory::get`], which loads an
//! immutable snapshot through `arc_swap` — no lock, no contention. Writers (the
//! control plane: admin API, provisioning file) serialise on a mutex, build a
//! new map and swap it in atomically, so a reader sees either the old or the
//! new map, never a torn one.
//!
//! Persistence: [`Directory::write_snapshot`] writes the whole map crash-safely
//! (temp file, fsync, rename, fsync of the directory) with a CRC-32 over the
//! body, keeping the previous generation as `directory.snap.prev`.
//! [`Directory::load_snapshot`] verifies the checksum and falls back to the
//! previous generation when the newest is torn or corrupted.

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One provisioned device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub device_id: String,
    pub tenant_id: String,
    #[serde(default = "default_profile")]
    pub profile: String,
    /// DTLS-PSK identity, when the device uses PSK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_identity: Option<String>,
    /// DTLS-PSK key, hex-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_key_hex: Option<String>,
}

fn default_profile() -> String {
    "default".to_string()
}

pub type EndpointMap = HashMap<String, Arc<EndpointEntry>>;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {0} is corrupted: {1}")]
    Corrupt(PathBuf, String),
    #[error("provisioning file {0}: {1}")]
    Provisioning(PathBuf, String),
    #[error("invalid entry for {0:?}: {1}")]
    Invalid(String, &'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DirectoryError + '_ {
    move |source| DirectoryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const SNAPSHOT_MAGIC: &str = "CLWM2M-DIRECTORY v1";
pub const SNAPSHOT_FILE: &str = "directory.snap";
pub const SNAPSHOT_PREV: &str = "directory.snap.prev";

#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    version: u64,
    endpoints: HashMap<String, EndpointEntry>,
}

/// Provisioning file format (TOML):
///
/// ```toml
/// [[endpoint]]
/// endpoint = "urn:imei:123"
/// device_id = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33"
/// tenant_id = "acme"
/// profile = "default"        # optional
/// ```
///
/// JSON files (`.json`) hold an array of the same objects.
#[derive(Deserialize)]
struct ProvisioningFile {
    #[serde(default)]
    endpoint: Vec<ProvisionedEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionedEndpoint {
    pub endpoint: String,
    #[serde(flatten)]
    pub entry: EndpointEntry,
}

pub struct Directory {
    map: ArcSwap<EndpointMap>,
    write_lock: Mutex<()>,
    /// Incremented on every change; the snapshotter writes when it moved.
    version: AtomicU64,
    persisted_version: AtomicU64,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new(EndpointMap::new())
    }
}

impl Directory {
    pub fn new(map: EndpointMap) -> Directory {
        Directory {
            map: ArcSwap::from_pointee(map),
            write_lock: Mutex::new(()),
            version: AtomicU64::new(0),
            persisted_version: AtomicU64::new(0),
        }
    }

    /// Lock-free lookup.
    pub fn get(&self, endpoint: &str) -> Option<Arc<EndpointEntry>> {
        self.map.load().get(endpoint).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Arc<EndpointMap> {
        self.map.load_full()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn validate(endpoint: &str, e: &EndpointEntry) -> Result<(), DirectoryError> {
        let bad = |why| Err(DirectoryError::Invalid(endpoint.to_string(), why));
        if endpoint.is_empty()
            || endpoint.len() > crate::proto::lwm2m::registration::MAX_ENDPOINT_LEN
        {
            return bad("endpoint name must be 1..=256 bytes");
        }
        if e.device_id.is_empty() {
            return bad("device_id is empty");
        }
        if e.tenant_id.is_empty()
            || !e
                .tenant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad("tenant_id must be non-empty [A-Za-z0-9._-] (it names Kafka topics)");
        }
        Ok(())
    }

    fn modify(&self, f: impl FnOnce(&mut EndpointMap)) {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = EndpointMap::clone(&self.map.load());
        f(&mut next);
        self.map.store(Arc::new(next));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Inserts or replaces one endpoint; returns true when it existed.
    pub fn upsert(&self, endpoint: &str, entry: EndpointEntry) -> Result<bool, DirectoryError> {
        Self::validate(endpoint, &entry)?;
        let mut existed = false;
        self.modify(|m| existed = m.insert(endpoint.to_string(), Arc::new(entry)).is_some());
        Ok(existed)
    }

    /// Inserts or replaces many endpoints in one swap. All are validated first;
    /// if any is invalid nothing changes.
    pub fn upsert_many(&self, items: Vec<ProvisionedEndpoint>) -> Result<usize, DirectoryError> {
        for p in &items {
            Self::validate(&p.endpoint, &p.entry)?;
        }
        let n = items.len();
        self.modify(|m| {
            for p in items {
                m.insert(p.endpoint, Arc::new(p.entry));
            }
        });
        Ok(n)
    }

    pub fn remove(&self, endpoint: &str) -> bool {
        if self.get(endpoint).is_none() {
            return false;
        }
        let mut existed = false;
        self.modify(|m| existed = m.remove(endpoint).is_some());
        existed
    }

    /// Reads a provisioning file (TOML, or JSON by extension).
    pub fn read_provisioning(path: &Path) -> Result<Vec<ProvisionedEndpoint>, DirectoryError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let perr = |e: String| DirectoryError::Provisioning(path.to_path_buf(), e);
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str::<Vec<ProvisionedEndpoint>>(&text).map_err(|e| perr(e.to_string()))
        } else {
            toml::from_str::<ProvisioningFile>(&text)
                .map(|f| f.endpoint)
                .map_err(|e| perr(e.to_string()))
        }
    }

    /// Writes the snapshot if the directory changed since the last write.
    /// Returns whether a file was written.
    pub fn snapshot_if_changed(&self, dir: &Path) -> Result<bool, DirectoryError> {
        let v = self.version();
        if v == self.persisted_version.load(Ordering::Acquire) && dir.join(SNAPSHOT_FILE).exists() {
            return Ok(false);
        }
        self.write_snapshot(dir)?;
        Ok(true)
    }

    /// Crash-safe snapshot: write `directory.snap.tmp`, fsync it, move the
    /// current snapshot to `.prev`, rename the temp file into place, fsync the
    /// directory so both renames are durable.
    pub fn write_snapshot(&self, dir: &Path) -> Result<(), DirectoryError> {
        let _g = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let version = self.version();
        let map = self.map.load_full();
        let body = SnapshotBody {
            version,
            endpoints: map
                .iter()
                .map(|(k, v)| (k.clone(), (**v).clone()))
                .collect(),
        };
        let body = serde_json::to_vec(&body).map_err(|e| DirectoryError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let crc = crc32fast::hash(&body);
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join("directory.snap.tmp");
        {
            let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
            write!(f, "{SNAPSHOT_MAGIC}\ncrc32={crc:08x}\nlen={}\n", body.len())
                .map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        let cur = dir.join(SNAPSHOT_FILE);
        if cur.exists() {
            let prev = dir.join(SNAPSHOT_PREV);
            fs::rename(&cur, &prev).map_err(io_err(&prev))?;
        }
        fs::rename(&tmp, &cur).map_err(io_err(&cur))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        self.persisted_version.store(version, Ordering::Release);
        Ok(())
    }

    fn read_snapshot_file(path: &Path) -> Result<EndpointMap, DirectoryError> {
        let data = fs::read(path).map_err(io_err(path))?;
        let corrupt = |why: &str| DirectoryError::Corrupt(path.to_path_buf(), why.to_string());
        let mut lines = data.splitn(4, |b| *b == b'\n');
        if lines.next() != Some(SNAPSHOT_MAGIC.as_bytes()) {
            return Err(corrupt("bad magic line"));
        }
        let crc_line = lines.next().ok_or_else(|| corrupt("missing crc line"))?;
        let len_line = lines.next().ok_or_else(|| corrupt("missing len line"))?;
        let body = lines.next().ok_or_else(|| corrupt("missing body"))?;
        let crc = std::str::from_utf8(crc_line)
            .ok()
            .and_then(|s| s.strip_prefix("crc32="))
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or_else(|| corrupt("unreadable crc"))?;
        let len = std::str::from_utf8(len_line)
            .ok()
            .and_then(|s| s.strip_prefix("len="))
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| corrupt("unreadable len"))?;
        if body.len() != len {
            return Err(corrupt(&format!(
                "truncated: {} of {len} body bytes",
                body.len()
            )));
        }
        if crc32fast::hash(body) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let b: SnapshotBody =
            serde_json::from_slice(body).map_err(|e| corrupt(&format!("body: {e}")))?;
        Ok(b.endpoints
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect())
    }

    /// Loads the newest valid snapshot from `dir`: the current file, or the
    /// previous generation when the current one is missing or corrupted.
    /// `Ok(None)` when there is no snapshot at all.
    pub fn load_snapshot(dir: &Path) -> Result<Option<(EndpointMap, PathBuf)>, DirectoryError> {
        let cur = dir.join(SNAPSHOT_FILE);
        let prev = dir.join(SNAPSHOT_PREV);
        let mut first_err = None;
        for path in [cur, prev] {
            if !path.exists() {
                continue;
            }
            match Self::read_snapshot_file(&path) {
                Ok(m) => {
                    if let Some(e) = &first_err {
                        tracing::error!(
                            error = %e,
                            fallback = %path.display(),
                            "directory snapshot is corrupted; loaded the previous snapshot instead"
                        );
                    }
                    return Ok(Some((m, path)));
                }
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    } else {
                        tracing::error!(error = %e, "previous directory snapshot is corrupted too");
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Marks the current content as persisted (after loading it from a snapshot).
    pub fn mark_persisted(&self) {
        self.persisted_version
            .store(self.version(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(d: &str) -> EndpointEntry {
        EndpointEntry {
            device_id: d.into(),
            tenant_id: "acme".into(),
            profile: "default".into(),
            psk_identity: None,
            psk_key_hex: None,
        }
    }

    #[test]
    fn upsert_get_remove() {
        let d = Directory::default();
        assert!(!d.upsert("urn:imei:1", entry("d1")).unwrap());
        assert!(d.upsert("urn:imei:1", entry("d2")).unwrap());
        assert_eq!(d.get("urn:imei:1").unwrap().device_id, "d2");
        assert!(d.remove("urn:imei:1"));
        assert!(!d.remove("urn:imei:1"));
        let mut bad = entry("d");
        bad.tenant_id = "a/b".into();
        assert!(d.upsert("x", bad).is_err());
    }

    #[test]
    fn snapshot_roundtrip_and_fallback() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Directory::default();
        d.upsert("a", entry("d1")).unwrap();
        d.write_snapshot(tmp.path()).unwrap();
        d.upsert("b", entry("d2")).unwrap();
        assert!(d.snapshot_if_changed(tmp.path()).unwrap());
        assert!(!d.snapshot_if_changed(tmp.path()).unwrap());
        let (m, _) = Directory::load_snapshot(tmp.path()).unwrap().unwrap();
        assert_eq!(m.len(), 2);

        // Flip one body byte in the newest: the previous generation is used.
        let cur = tmp.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&cur).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x20;
        fs::write(&cur, &bytes).unwrap();
        let (m, from) = Directory::load_snapshot(tmp.path()).unwrap().unwrap();
        assert_eq!(m.len(), 1);
        assert!(from.ends_with(SNAPSHOT_PREV));

        // Truncated too: both bad is an error, not an empty directory.
        fs::write(
            tmp.path().join(SNAPSHOT_PREV),
            b"CLWM2M-DIRECTORY v1\ncrc32=0\n",
        )
        .unwrap();
        assert!(Directory::load_snapshot(tmp.path()).is_err());
        assert!(Directory::load_snapshot(&tmp.path().join("none"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn provisioning_files() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("p.toml");
        fs::write(
            &t,
            "[[endpoint]]\nendpoint='urn:imei:123'\ndevice_id='d7'\ntenant_id='acme'\n",
        )
        .unwrap();
        let v = Directory::read_provisioning(&t).unwrap();
        assert_eq!(v[0].endpoint, "urn:imei:123");
        assert_eq!(v[0].entry.profile, "default");
        let j = tmp.path().join("p.json");
        fs::write(&j, r#"[{"endpoint":"e","device_id":"d","tenant_id":"t"}]"#).unwrap();
        assert_eq!(Directory::read_provisioning(&j).unwrap().len(), 1);
    }
}

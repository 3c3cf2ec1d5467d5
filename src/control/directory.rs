//! Endpoint directory: LwM2M endpoint name → {device_id, tenant_id, profile,
//! credentials}.
//!
//! Readers (every shard, once per batch of datagrams) call
//! [`Directory::snapshot`], which loads an immutable map through `arc_swap`:
//! no lock, no contention. Writers (the control plane: admin API,
//! provisioning file) serialise on a mutex, build a new map and swap it in
//! atomically, so a reader sees either the old or the new map, never a torn
//! one. The map and its credential index are persistent (structurally
//! shared, `imbl`) maps: a change costs O(log n) and what it touched, not a
//! copy of a million-entry directory (a bootstrap storm records thousands
//! of generated PSKs a second).
//!
//! **Durability.** With persistence on ([`Directory::open`]), every change is
//! appended to a write-ahead log (`directory.wal`, one CRC-checked JSON line
//! per change, fsynced) *before* it is applied and answered, so an admin
//! write that was answered survives a crash. [`Directory::write_snapshot`]
//! writes the whole map crash-safely (see [`super::snapshot`]) and then
//! starts a new log, keeping the previous one (`directory.wal.prev`) beside
//! the previous snapshot generation. Loading takes the newest valid snapshot
//! and replays both logs past its version; a torn last log line (crash
//! mid-append, never answered) is ignored.

use super::snapshot::{self, SnapshotError};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::proto::lwm2m::endpoint::{EndpointEntry, EndpointMap};

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot {0} is corrupted: {1}")]
    Corrupt(PathBuf, String),
    #[error("provisioning file {0}: {1}")]
    Provisioning(PathBuf, String),
    #[error("invalid entry for {0:?}: {1}")]
    Invalid(String, std::borrow::Cow<'static, str>),
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
pub const WAL_FILE: &str = "directory.wal";
pub const WAL_PREV: &str = "directory.wal.prev";

#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    version: u64,
    endpoints: HashMap<String, EndpointEntry>,
}

/// One logged change.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum WalOp {
    Upsert { items: Vec<ProvisionedEndpoint> },
    Remove { endpoint: String },
}

#[derive(Serialize, Deserialize)]
struct WalRecord {
    v: u64,
    #[serde(flatten)]
    op: WalOp,
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

struct Writer {
    /// Snapshot directory and the open log, when persistence is on.
    persist: Option<(PathBuf, fs::File)>,
}

/// A persistent hash map (cheap to clone, O(log n) to change).
pub type PMap<K, V> =
    imbl::GenericHashMap<K, V, crate::proto::FastHasher, imbl::shared_ptr::DefaultSharedPtr>;

/// The directory's credentials indexed the way a handshake asks for them.
#[derive(Default, Clone)]
pub struct CredentialIndex {
    /// PSK identity → (endpoint, entry).
    pub psk: PMap<Vec<u8>, (String, Arc<EndpointEntry>)>,
    /// Pinned certificate fingerprints → endpoint.
    pub fingerprints: PMap<[u8; 32], String>,
    /// Bootstrap PSK identity → (endpoint, entry) (the bootstrap listener).
    pub bs_psk: PMap<Vec<u8>, (String, Arc<EndpointEntry>)>,
    /// Pinned bootstrap certificate fingerprints → endpoint.
    pub bs_fingerprints: PMap<[u8; 32], String>,
    /// Platform device_id → (endpoint, entry): RPCs address devices; in
    /// order, so the admin API pages through it by device_id.
    pub devices: imbl::OrdMap<String, (String, Arc<EndpointEntry>)>,
}

/// A provisioned device: (device_id, endpoint, entry).
pub type DeviceRow = (String, String, Arc<EndpointEntry>);

/// The PSK identities (DTLS and bootstrap) an entry holds.
fn psk_identities(e: &EndpointEntry) -> impl Iterator<Item = Vec<u8>> {
    let bs = e
        .bootstrap
        .as_ref()
        .and_then(|b| b.credential_entry().psk_identity_bytes());
    e.psk_identity_bytes().into_iter().chain(bs)
}

impl CredentialIndex {
    pub fn build(map: &EndpointMap) -> CredentialIndex {
        let mut ix = CredentialIndex::default();
        for (ep, e) in map {
            ix.add(ep, e);
        }
        ix
    }

    /// Indexes `ep`'s entry.
    fn add(&mut self, ep: &str, e: &Arc<EndpointEntry>) {
        if let Some(id) = e.psk_identity_bytes() {
            self.psk.insert(id, (ep.to_string(), e.clone()));
        }
        if let Some(f) = e.x509_fingerprint() {
            self.fingerprints.insert(f, ep.to_string());
        }
        if let Some(b) = &e.bootstrap {
            let c = b.credential_entry();
            if let Some(id) = c.psk_identity_bytes() {
                self.bs_psk.insert(id, (ep.to_string(), e.clone()));
            }
            if let Some(f) = c.x509_fingerprint() {
                self.bs_fingerprints.insert(f, ep.to_string());
            }
        }
        self.devices
            .insert(e.device_id.clone(), (ep.to_string(), e.clone()));
    }

    /// Drops what [`CredentialIndex::add`] indexed for `ep`'s (previous)
    /// entry, where it still points at `ep`.
    fn remove(&mut self, ep: &str, e: &EndpointEntry) {
        fn drop_if<K: std::hash::Hash + Eq + Clone, V: Clone>(
            m: &mut PMap<K, V>,
            k: Option<K>,
            owner: impl Fn(&V) -> bool,
        ) {
            if let Some(k) = k {
                if m.get(&k).is_some_and(&owner) {
                    m.remove(&k);
                }
            }
        }
        drop_if(&mut self.psk, e.psk_identity_bytes(), |(o, _)| o == ep);
        drop_if(&mut self.fingerprints, e.x509_fingerprint(), |o| o == ep);
        if let Some(b) = &e.bootstrap {
            let c = b.credential_entry();
            drop_if(&mut self.bs_psk, c.psk_identity_bytes(), |(o, _)| o == ep);
            drop_if(&mut self.bs_fingerprints, c.x509_fingerprint(), |o| o == ep);
        }
        if self.devices.get(&e.device_id).is_some_and(|(o, _)| o == ep) {
            self.devices.remove(&e.device_id);
        }
    }

    /// The PSK key for an identity.
    pub fn psk_key(&self, identity: &[u8]) -> Option<Vec<u8>> {
        self.psk.get(identity).and_then(|(_, e)| e.psk_key())
    }

    /// The bootstrap PSK key for an identity.
    pub fn bs_psk_key(&self, identity: &[u8]) -> Option<Vec<u8>> {
        self.bs_psk
            .get(identity)
            .and_then(|(_, e)| e.bootstrap.as_ref()?.credential_entry().psk_key())
    }
}

/// The PSK identities whose credentials changed, by directory version, so a
/// shard re-checks the DTLS sessions of those identities only. Bounded: a
/// shard that fell further behind than the log reaches re-checks them all.
struct PskChangeLog {
    entries: VecDeque<(u64, Vec<u8>)>,
    /// Changes at or below this version are no longer all in `entries`.
    floor: u64,
}

/// Identities remembered for [`Directory::psk_changes_since`].
const PSK_CHANGE_LOG: usize = 1 << 16;

/// The bootstrap listener's DTLS credential lookups: the endpoints'
/// bootstrap credentials, not their DTLS ones (lock-free).
pub struct BootstrapCredentials(pub Arc<Directory>);

impl crate::io::dtls::Credentials for BootstrapCredentials {
    fn psk_key(&self, identity: &[u8]) -> Option<Vec<u8>> {
        self.0.creds.load().bs_psk_key(identity)
    }
    fn pinned(&self, sha256: &[u8; 32]) -> bool {
        self.0.creds.load().bs_fingerprints.contains_key(sha256)
    }
}

pub struct Directory {
    map: ArcSwap<EndpointMap>,
    creds: ArcSwap<CredentialIndex>,
    writer: Mutex<Writer>,
    /// Incremented on every change; the snapshotter writes when it moved.
    version: AtomicU64,
    persisted_version: AtomicU64,
    /// The current snapshot file was corrupted at load: the next snapshot
    /// must not rotate it into the previous generation.
    current_corrupt: AtomicBool,
    psk_changes: Mutex<PskChangeLog>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new(EndpointMap::default())
    }
}

/// Where a directory came from at [`Directory::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A snapshot (and the logs past it).
    Snapshot {
        path: PathBuf,
        fell_back: bool,
        replayed: usize,
    },
    /// Only logged changes (no snapshot written yet).
    Log { replayed: usize },
    /// Nothing on disk.
    Empty,
}

/// The DTLS handshake's credential lookups (lock-free).
impl crate::io::dtls::Credentials for Directory {
    fn psk_key(&self, identity: &[u8]) -> Option<Vec<u8>> {
        self.creds.load().psk_key(identity)
    }
    fn pinned(&self, sha256: &[u8; 32]) -> bool {
        self.creds.load().fingerprints.contains_key(sha256)
    }
}

impl Directory {
    /// An in-memory directory (no persistence).
    pub fn new(map: EndpointMap) -> Directory {
        Directory {
            creds: ArcSwap::from_pointee(CredentialIndex::build(&map)),
            map: ArcSwap::from_pointee(map),
            writer: Mutex::new(Writer { persist: None }),
            version: AtomicU64::new(0),
            persisted_version: AtomicU64::new(0),
            current_corrupt: AtomicBool::new(false),
            psk_changes: Mutex::new(PskChangeLog {
                entries: VecDeque::new(),
                floor: 0,
            }),
        }
    }

    /// The persistent directory in `dir`: newest valid snapshot plus the
    /// logged changes past it. From here on every change is logged before
    /// it is applied. `Err` when every snapshot generation is unreadable:
    /// starting on an empty directory silently would forget the fleet.
    pub fn open(dir: &Path) -> Result<(Directory, Origin), DirectoryError> {
        let mut map = EndpointMap::default();
        let mut version = 0;
        let mut origin = Origin::Empty;
        let mut fell_back = false;
        if let Some((body, path, fb)) =
            snapshot::load(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, "directory")?
        {
            let b: SnapshotBody = serde_json::from_slice(&body)
                .map_err(|e| DirectoryError::Corrupt(path.clone(), format!("body: {e}")))?;
            version = b.version;
            map = b
                .endpoints
                .into_iter()
                .map(|(k, v)| (k, Arc::new(v)))
                .collect();
            fell_back = fb;
            origin = Origin::Snapshot {
                path,
                fell_back: fb,
                replayed: 0,
            };
        }
        let mut replayed = 0;
        for wal in [WAL_PREV, WAL_FILE] {
            let path = dir.join(wal);
            let Ok(f) = fs::File::open(&path) else {
                continue;
            };
            for line in std::io::BufReader::new(f).split(b'\n') {
                let Ok(line) = line else { break };
                let Some(rec) = parse_wal_line(&line) else {
                    // A torn tail (crash mid-append): the change was never
                    // answered. Nothing valid follows it.
                    tracing::warn!(file = %path.display(), "directory log: torn record ignored");
                    break;
                };
                if rec.v <= version {
                    continue;
                }
                version = rec.v;
                apply(&mut map, rec.op);
                replayed += 1;
            }
        }
        origin = match origin {
            Origin::Snapshot {
                path, fell_back, ..
            } => Origin::Snapshot {
                path,
                fell_back,
                replayed,
            },
            _ if replayed > 0 => Origin::Log { replayed },
            o => o,
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let wal_path = dir.join(WAL_FILE);
        let wal = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal_path)
            .map_err(io_err(&wal_path))?;
        let d = Directory {
            creds: ArcSwap::from_pointee(CredentialIndex::build(&map)),
            map: ArcSwap::from_pointee(map),
            writer: Mutex::new(Writer {
                persist: Some((dir.to_path_buf(), wal)),
            }),
            version: AtomicU64::new(version),
            persisted_version: AtomicU64::new(if replayed == 0 && !fell_back {
                version
            } else {
                u64::MAX
            }),
            current_corrupt: AtomicBool::new(fell_back),
            psk_changes: Mutex::new(PskChangeLog {
                entries: VecDeque::new(),
                floor: version,
            }),
        };
        Ok((d, origin))
    }

    /// Lock-free lookup.
    pub fn get(&self, endpoint: &str) -> Option<Arc<EndpointEntry>> {
        self.map.load().get(endpoint).cloned()
    }

    /// The current map, for the shards to read once per batch.
    pub fn snapshot(&self) -> Arc<EndpointMap> {
        self.map.load_full()
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
        let bad =
            |why: &'static str| Err(DirectoryError::Invalid(endpoint.to_string(), why.into()));
        if endpoint.is_empty()
            || endpoint.len() > crate::proto::lwm2m::registration::MAX_ENDPOINT_LEN
        {
            return bad("endpoint name must be 1..=256 bytes");
        }
        use crate::proto::lwm2m::rpc::{MAX_DEVICE_ID, MAX_TENANT};
        if e.device_id.is_empty()
            || e.device_id.len() > MAX_DEVICE_ID
            || e.device_id.chars().any(char::is_control)
        {
            return bad("device_id must be 1..=256 bytes without control characters");
        }
        if e.profile.len() > 128 {
            return bad("profile name longer than 128 bytes");
        }
        if e.tenant_id.is_empty()
            || e.tenant_id.len() > MAX_TENANT
            || !e
                .tenant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad("tenant_id must be 1..=64 of [A-Za-z0-9._-] (it names Kafka topics)");
        }
        e.validate_credentials().or_else(bad)?;
        if let Some(b) = &e.bootstrap {
            b.validate()
                .map_err(|m| DirectoryError::Invalid(endpoint.to_string(), m.into()))?;
        }
        Ok(())
    }

    /// A PSK identity may name one endpoint only (the handshake finds the
    /// key by identity, RFC 4279 §5.1).
    fn check_unique_psk<'a>(
        &self,
        items: impl Iterator<Item = (&'a str, &'a EndpointEntry)>,
    ) -> Result<(), DirectoryError> {
        let creds = self.creds.load();
        let mut seen: HashMap<Vec<u8>, &str> = HashMap::new();
        let mut seen_bs: HashMap<Vec<u8>, &str> = HashMap::new();
        for (ep, e) in items {
            let bs = e
                .bootstrap
                .as_ref()
                .and_then(|b| b.credential_entry().psk_identity_bytes());
            for (id, index, seen, what) in [
                (
                    e.psk_identity_bytes(),
                    &creds.psk,
                    &mut seen,
                    "psk identity",
                ),
                (bs, &creds.bs_psk, &mut seen_bs, "bootstrap psk identity"),
            ] {
                let Some(id) = id else {
                    continue;
                };
                let clash = match index.get(&id) {
                    Some((other, _)) if other != ep => Some(other.clone()),
                    _ => seen.get(&id).filter(|o| **o != ep).map(|o| o.to_string()),
                };
                if let Some(other) = clash {
                    return Err(DirectoryError::Invalid(
                        ep.to_string(),
                        format!("{what} already provisioned for {other}").into(),
                    ));
                }
                seen.insert(id, ep);
            }
        }
        Ok(())
    }

    /// The endpoint provisioned for platform device `device_id`.
    pub fn by_device(&self, device_id: &str) -> Option<(String, Arc<EndpointEntry>)> {
        self.creds.load().devices.get(device_id).cloned()
    }

    /// Up to `limit` provisioned devices after `cursor` (exclusive) in
    /// device_id order, of `tenant` when given, that `keep` accepts; looks
    /// at no more than `scan` entries. Returns them and the cursor of the
    /// next page (`None`: the end was reached).
    pub fn devices_page(
        &self,
        cursor: Option<&str>,
        tenant: Option<&str>,
        limit: usize,
        scan: usize,
        mut keep: impl FnMut(&[DeviceRow]) -> Vec<bool>,
    ) -> (Vec<DeviceRow>, Option<String>) {
        use std::ops::Bound;
        let creds = self.creds.load();
        let lower = match cursor {
            Some(c) => Bound::Excluded(c.to_string()),
            None => Bound::Unbounded,
        };
        let mut it = creds
            .devices
            .range::<_, String>((lower, Bound::Unbounded))
            .filter(|(_, (_, e))| tenant.is_none_or(|t| e.tenant_id == t));
        let (mut out, mut scanned) = (Vec::new(), 0);
        let mut last: Option<String> = None;
        // In chunks, so `keep` can look many up at once.
        loop {
            let want = (limit - out.len()).clamp(1, 512);
            let chunk: Vec<DeviceRow> = it
                .by_ref()
                .take(want.min(scan - scanned))
                .map(|(d, (ep, e))| (d.clone(), ep.clone(), e.clone()))
                .collect();
            if chunk.is_empty() {
                return (out, None);
            }
            scanned += chunk.len();
            let verdicts = keep(&chunk);
            for (item, k) in chunk.into_iter().zip(verdicts) {
                last = Some(item.0.clone());
                if k {
                    out.push(item);
                }
            }
            if out.len() >= limit || scanned >= scan {
                return (out, last);
            }
        }
    }

    /// Lock-free credential lookups for the DTLS handshake.
    pub fn credentials(&self) -> Arc<CredentialIndex> {
        self.creds.load_full()
    }

    /// Logs (when persistent) and applies one change.
    fn commit(&self, op: WalOp) -> Result<(), DirectoryError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.commit_locked(&mut w, op)
    }

    fn commit_locked(&self, w: &mut Writer, op: WalOp) -> Result<(), DirectoryError> {
        let v = self.version() + 1;
        let rec = WalRecord { v, op };
        if let Some((dir, wal)) = &mut w.persist {
            let json = serde_json::to_vec(&rec).map_err(|e| DirectoryError::Io {
                path: dir.clone(),
                source: std::io::Error::other(e),
            })?;
            let mut line = format!("{:08x} ", crc32fast::hash(&json)).into_bytes();
            line.extend_from_slice(&json);
            line.push(b'\n');
            let path = dir.join(WAL_FILE);
            wal.write_all(&line).map_err(io_err(&path))?;
            wal.sync_data().map_err(io_err(&path))?;
        }
        // Both clones share structure: O(1); each change is O(log n).
        let mut next = EndpointMap::clone(&self.map.load());
        let mut ix = CredentialIndex::clone(&self.creds.load());
        let mut changed: Vec<Vec<u8>> = Vec::new();
        let mut replace = |ep: String, new: Option<Arc<EndpointEntry>>| {
            let old = match &new {
                Some(e) => next.insert(ep.clone(), e.clone()),
                None => next.remove(&ep),
            };
            if let Some(o) = &old {
                ix.remove(&ep, o);
            }
            if let Some(e) = &new {
                ix.add(&ep, e);
            }
            let before = old
                .as_deref()
                .map(|o| (psk_identities(o).collect::<Vec<_>>(), o));
            let after = new
                .as_deref()
                .map(|e| (psk_identities(e).collect::<Vec<_>>(), e));
            let same = match (&before, &after) {
                (Some((a, o)), Some((b, e))) => {
                    a == b && !o.credentials_differ(e) && {
                        let key = |x: &EndpointEntry| {
                            x.bootstrap.as_ref().map(|b| b.credential_entry().psk_key())
                        };
                        key(o) == key(e)
                    }
                }
                (None, None) => true,
                _ => false,
            };
            if !same {
                for (ids, _) in before.into_iter().chain(after) {
                    changed.extend(ids);
                }
            }
        };
        match rec.op {
            WalOp::Upsert { items } => {
                for p in items {
                    replace(p.endpoint, Some(Arc::new(p.entry)));
                }
            }
            WalOp::Remove { endpoint } => replace(endpoint, None),
        }
        changed.sort_unstable();
        changed.dedup();
        // The index before the change log: a shard that reads the log and
        // then the index sees every logged change in the index.
        self.creds.store(Arc::new(ix));
        self.map.store(Arc::new(next));
        {
            let mut log = self.psk_changes.lock().unwrap_or_else(|p| p.into_inner());
            for id in changed {
                log.entries.push_back((v, id));
            }
            while log.entries.len() > PSK_CHANGE_LOG {
                if let Some((ver, _)) = log.entries.pop_front() {
                    log.floor = log.floor.max(ver);
                }
            }
        }
        self.version.store(v, Ordering::Release);
        Ok(())
    }

    /// The PSK identities (DTLS and bootstrap) whose credentials changed
    /// after version `seen`, and the version they bring the caller to;
    /// `None` when the log no longer reaches back that far (check every
    /// session).
    pub fn psk_changes_since(&self, seen: u64) -> (u64, Option<Vec<Vec<u8>>>) {
        let log = self.psk_changes.lock().unwrap_or_else(|p| p.into_inner());
        // A version visible here had its entries logged before it was
        // stored; entries past it may be logged already too.
        let latest = log
            .entries
            .back()
            .map_or(log.floor, |(v, _)| *v)
            .max(self.version());
        if seen < log.floor {
            return (latest.max(log.floor), None);
        }
        let ids = log
            .entries
            .iter()
            .rev()
            .take_while(|(v, _)| *v > seen)
            .map(|(_, id)| id.clone())
            .collect();
        (latest.max(seen), Some(ids))
    }

    /// Read-modify-write of existing endpoints, atomic with respect to
    /// every other change: `f` gets each endpoint's current entry and returns
    /// its replacement. All are validated first; if any is invalid (or
    /// gone) nothing changes. Durable when it returns.
    pub fn modify(
        &self,
        endpoints: &[String],
        mut f: impl FnMut(&str, &EndpointEntry) -> EndpointEntry,
    ) -> Result<(), DirectoryError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let map = self.map.load();
        let mut items = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            let Some(cur) = map.get(ep.as_str()) else {
                return Err(DirectoryError::Invalid(
                    ep.clone(),
                    "no such endpoint".into(),
                ));
            };
            let entry = f(ep, cur);
            Self::validate(ep, &entry)?;
            items.push(ProvisionedEndpoint {
                endpoint: ep.clone(),
                entry,
            });
        }
        self.check_unique_psk(items.iter().map(|p| (p.endpoint.as_str(), &p.entry)))?;
        self.commit_locked(&mut w, WalOp::Upsert { items })
    }

    /// Inserts or replaces one endpoint; returns true when it existed. Durable
    /// when it returns (persistent directories).
    pub fn upsert(&self, endpoint: &str, entry: EndpointEntry) -> Result<bool, DirectoryError> {
        Self::validate(endpoint, &entry)?;
        self.check_unique_psk(std::iter::once((endpoint, &entry)))?;
        let existed = self.get(endpoint).is_some();
        self.commit(WalOp::Upsert {
            items: vec![ProvisionedEndpoint {
                endpoint: endpoint.to_string(),
                entry,
            }],
        })?;
        Ok(existed)
    }

    /// Inserts or replaces many endpoints in one swap. All are validated first;
    /// if any is invalid nothing changes.
    pub fn upsert_many(&self, items: Vec<ProvisionedEndpoint>) -> Result<usize, DirectoryError> {
        for p in &items {
            Self::validate(&p.endpoint, &p.entry)?;
        }
        self.check_unique_psk(items.iter().map(|p| (p.endpoint.as_str(), &p.entry)))?;
        let n = items.len();
        self.commit(WalOp::Upsert { items })?;
        Ok(n)
    }

    /// Removes an endpoint; `Ok(false)` when there was none.
    pub fn remove(&self, endpoint: &str) -> Result<bool, DirectoryError> {
        if self.get(endpoint).is_none() {
            return Ok(false);
        }
        self.commit(WalOp::Remove {
            endpoint: endpoint.to_string(),
        })?;
        Ok(true)
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

    /// Crash-safe snapshot of the whole map, then a fresh log (the old one is
    /// kept as the previous generation's).
    pub fn write_snapshot(&self, dir: &Path) -> Result<(), DirectoryError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
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
        let rotate = !self.current_corrupt.load(Ordering::Acquire);
        snapshot::write(dir, SNAPSHOT_FILE, SNAPSHOT_MAGIC, &body, rotate)?;
        self.current_corrupt.store(false, Ordering::Release);
        if let Some((pdir, wal)) = &mut w.persist {
            if pdir.as_path() == dir {
                // After a fallback start the previous generation stays the
                // old one, so its log must stay too: keep appending.
                if rotate {
                    let cur = dir.join(WAL_FILE);
                    let prev = dir.join(WAL_PREV);
                    fs::rename(&cur, &prev).map_err(io_err(&prev))?;
                    *wal = fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&cur)
                        .map_err(io_err(&cur))?;
                    fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io_err(dir))?;
                }
            }
        }
        self.persisted_version.store(version, Ordering::Release);
        Ok(())
    }

    /// Marks the current content as persisted.
    pub fn mark_persisted(&self) {
        self.persisted_version
            .store(self.version(), Ordering::Release);
    }
}

fn apply(map: &mut EndpointMap, op: WalOp) {
    match op {
        WalOp::Upsert { items } => {
            for p in items {
                map.insert(p.endpoint, Arc::new(p.entry));
            }
        }
        WalOp::Remove { endpoint } => {
            map.remove(&endpoint);
        }
    }
}

fn parse_wal_line(line: &[u8]) -> Option<WalRecord> {
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if line.get(8) != Some(&b' ') || crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(d: &str) -> EndpointEntry {
        EndpointEntry::new(d, "acme", "default")
    }

    #[test]
    fn bootstrap_credentials_are_indexed_unique_and_modified_atomically() {
        use crate::io::dtls::Credentials as _;
        use crate::proto::lwm2m::bootstrap::BootstrapSettings;
        use crate::proto::lwm2m::endpoint::Secret;
        let d = Arc::new(Directory::default());
        let with_bs = |dev: &str, id: &str| {
            let mut e = entry(dev);
            e.bootstrap = Some(Box::new(BootstrapSettings {
                psk_identity: Some(id.into()),
                psk_key_hex: Some(Secret("0a0b".into())),
                ..BootstrapSettings::default()
            }));
            e
        };
        d.upsert("ep1", with_bs("d1", "bs-1")).unwrap();
        // The bootstrap listener finds the bootstrap key, the registration
        // listener does not.
        let bs = BootstrapCredentials(d.clone());
        assert_eq!(bs.psk_key(b"bs-1"), Some(vec![0x0a, 0x0b]));
        assert_eq!(d.psk_key(b"bs-1"), None);
        // One endpoint per bootstrap identity.
        let err = d.upsert("ep2", with_bs("d2", "bs-1")).unwrap_err();
        assert!(err.to_string().contains("bootstrap psk identity"), "{err}");
        // Invalid bootstrap settings are refused.
        let mut bad = entry("d3");
        bad.bootstrap = Some(Box::new(BootstrapSettings {
            psk_identity: Some("x".into()),
            ..BootstrapSettings::default()
        }));
        assert!(d.upsert("ep3", bad).is_err());
        // modify: all or nothing, existing endpoints only.
        d.upsert("ep2", entry("d2")).unwrap();
        let names = ["ep1".to_string(), "ep2".to_string()];
        d.modify(&names, |ep, e| {
            let mut n = e.clone();
            n.psk_identity = Some(format!("id-{ep}"));
            n.psk_key_hex = Some(Secret("01".into()));
            n
        })
        .unwrap();
        assert_eq!(d.psk_key(b"id-ep2"), Some(vec![1]));
        let clash = d.modify(&names, |_, e| {
            let mut n = e.clone();
            n.psk_identity = Some("same".into());
            n
        });
        assert!(clash.is_err());
        assert_eq!(d.psk_key(b"id-ep1"), Some(vec![1]), "nothing changed");
        assert!(d.modify(&["nope".to_string()], |_, e| e.clone()).is_err());
    }

    /// The index kept up to date change by change equals one built from
    /// scratch, and the change log names exactly the identities whose
    /// credentials changed (old and new).
    #[test]
    fn incremental_index_and_psk_change_log() {
        use crate::io::dtls::Credentials as _;
        use crate::proto::lwm2m::endpoint::Secret;
        let d = Directory::default();
        let with_psk = |dev: &str, id: &str, key: &str| {
            let mut e = entry(dev);
            e.psk_identity = Some(id.into());
            e.psk_key_hex = Some(Secret(key.into()));
            e
        };
        let (v0, c) = d.psk_changes_since(0);
        assert_eq!((v0, c), (0, Some(vec![])));
        d.upsert("ep1", with_psk("d1", "id-1", "01")).unwrap();
        d.upsert("ep2", with_psk("d2", "id-2", "02")).unwrap();
        let (v, c) = d.psk_changes_since(0);
        assert_eq!(v, 2);
        let mut c = c.unwrap();
        c.sort();
        assert_eq!(c, vec![b"id-1".to_vec(), b"id-2".to_vec()]);
        // A change that leaves the credentials alone logs nothing.
        let mut same = with_psk("d1", "id-1", "01");
        same.profile = "other".into();
        d.upsert("ep1", same).unwrap();
        assert_eq!(d.psk_changes_since(2), (3, Some(vec![])));
        // A new identity: the old and the new one are both re-checked.
        d.upsert("ep1", with_psk("d1", "id-1b", "01")).unwrap();
        let mut c = d.psk_changes_since(3).1.unwrap();
        c.sort();
        assert_eq!(c, vec![b"id-1".to_vec(), b"id-1b".to_vec()]);
        // A new key for the same identity.
        d.upsert("ep2", with_psk("d2", "id-2", "03")).unwrap();
        assert_eq!(d.psk_changes_since(4), (5, Some(vec![b"id-2".to_vec()])));
        d.remove("ep2").unwrap();
        assert_eq!(d.psk_changes_since(5), (6, Some(vec![b"id-2".to_vec()])));
        // The index: the old identity is gone, the new one maps to ep1, the
        // removed endpoint left nothing behind.
        let ix = d.credentials();
        assert_eq!(d.psk_key(b"id-1"), None);
        assert_eq!(d.psk_key(b"id-1b"), Some(vec![1]));
        assert_eq!(d.psk_key(b"id-2"), None);
        assert!(d.by_device("d2").is_none());
        assert_eq!(d.by_device("d1").unwrap().0, "ep1");
        let rebuilt = CredentialIndex::build(&d.all());
        let keys = |m: &PMap<Vec<u8>, (String, Arc<EndpointEntry>)>| {
            let mut v: Vec<(Vec<u8>, String)> = m
                .iter()
                .map(|(k, (ep, _))| (k.clone(), ep.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(keys(&ix.psk), keys(&rebuilt.psk));
        assert_eq!(
            ix.devices.keys().collect::<Vec<_>>(),
            rebuilt.devices.keys().collect::<Vec<_>>()
        );
        // A reader further behind than the log reaches: check everything.
        {
            let mut log = d.psk_changes.lock().unwrap();
            log.floor = 4;
        }
        assert_eq!(d.psk_changes_since(3), (6, None));
    }

    #[test]
    fn upsert_get_remove() {
        let d = Directory::default();
        assert!(!d.upsert("urn:imei:1", entry("d1")).unwrap());
        assert!(d.upsert("urn:imei:1", entry("d2")).unwrap());
        assert_eq!(d.get("urn:imei:1").unwrap().device_id, "d2");
        assert!(d.remove("urn:imei:1").unwrap());
        assert!(!d.remove("urn:imei:1").unwrap());
        let mut bad = entry("d");
        bad.tenant_id = "a/b".into();
        assert!(d.upsert("x", bad).is_err());
    }

    #[test]
    fn every_answered_change_survives_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (d, o) = Directory::open(tmp.path()).unwrap();
            assert_eq!(o, Origin::Empty);
            d.upsert("a", entry("d1")).unwrap();
            d.write_snapshot(tmp.path()).unwrap();
            d.upsert("b", entry("d2")).unwrap();
            d.remove("a").unwrap();
            // Dropped without a snapshot: a SIGKILL.
        }
        let (d, o) = Directory::open(tmp.path()).unwrap();
        assert!(
            matches!(
                o,
                Origin::Snapshot {
                    replayed: 2,
                    fell_back: false,
                    ..
                }
            ),
            "{o:?}"
        );
        assert!(d.get("a").is_none());
        assert_eq!(d.get("b").unwrap().device_id, "d2");
        // A torn last record (crash mid-append) is ignored, earlier ones kept.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(tmp.path().join(WAL_FILE))
            .unwrap();
        f.write_all(b"0000beef {\"v\":99,\"op\":\"rem").unwrap();
        drop(f);
        drop(d);
        let (d, _) = Directory::open(tmp.path()).unwrap();
        assert_eq!(d.get("b").unwrap().device_id, "d2");
    }

    #[test]
    fn fallback_keeps_the_good_generation_and_its_log() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (d, _) = Directory::open(dir).unwrap();
            d.upsert("a", entry("d1")).unwrap();
            d.write_snapshot(dir).unwrap();
            d.upsert("b", entry("d2")).unwrap();
            d.write_snapshot(dir).unwrap();
            d.upsert("c", entry("d3")).unwrap();
        }
        // Flip one body byte in the newest snapshot.
        let cur = dir.join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&cur).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x20;
        fs::write(&cur, &bytes).unwrap();
        let (d, o) = Directory::open(dir).unwrap();
        assert!(
            matches!(
                o,
                Origin::Snapshot {
                    fell_back: true,
                    ..
                }
            ),
            "{o:?}"
        );
        // The previous generation plus both logs: nothing lost.
        for (e, id) in [("a", "d1"), ("b", "d2"), ("c", "d3")] {
            assert_eq!(d.get(e).unwrap().device_id, id, "{e}");
        }
        // The next snapshot must not demote the corrupted file to .prev.
        d.write_snapshot(dir).unwrap();
        assert!(snapshot::read(&dir.join(SNAPSHOT_PREV), SNAPSHOT_MAGIC).is_ok());
        assert!(dir.join("directory.snap.corrupt").exists());
        drop(d);
        let (d, o) = Directory::open(dir).unwrap();
        assert!(matches!(
            o,
            Origin::Snapshot {
                fell_back: false,
                ..
            }
        ));
        assert_eq!(d.len(), 3);
        // Both generations unreadable is an error, not an empty directory.
        fs::write(dir.join(SNAPSHOT_FILE), b"CLWM2M-DIRECTORY v1\ncrc32=0\n").unwrap();
        fs::write(dir.join(SNAPSHOT_PREV), b"CLWM2M-DIRECTORY v1\ncrc32=0\n").unwrap();
        assert!(Directory::open(dir).is_err());
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

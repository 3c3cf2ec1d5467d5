//! Per-shard registration snapshots: what makes a gateway restart invisible
//! to devices.
//!
//! Each shard's registrations and observations (tokens, Observe windows,
//! lifetimes) are written as `registrations-{shard}.snap` in the snapshot
//! directory, crash-safely with a previous generation (see
//! [`super::snapshot`]): periodically when they changed (by a writer thread,
//! off the shard), and at shutdown (synchronously, after the Kafka flush).
//! At start each shard loads its own file, and the files of shards that no
//! longer exist (the shard count went down) are merged into shard
//! `index % shards`, rewritten there and removed. After SIGTERM + start,
//! Updates get 2.04 and notifications on existing tokens keep flowing; after
//! SIGKILL, at most what changed since the last snapshot is redone (devices
//! whose registration is newer get 4.04 on Update and register again).

use super::snapshot;
use crate::proto::lwm2m::server::ShardSnapshot;
use crossbeam_channel::Sender;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &str = "CLWM2M-REGISTRATIONS v1";

fn file_name(shard: usize) -> String {
    format!("registrations-{shard}.snap")
}

pub struct RegistrationStore {
    dir: PathBuf,
    tx: Sender<(usize, ShardSnapshot)>,
}

impl RegistrationStore {
    pub fn new(dir: &Path) -> Arc<RegistrationStore> {
        let (tx, rx) = crossbeam_channel::unbounded::<(usize, ShardSnapshot)>();
        let d = dir.to_path_buf();
        let _ = std::thread::Builder::new()
            .name("registration-snapshots".into())
            .spawn(move || {
                while let Ok((shard, mut snap)) = rx.recv() {
                    // Only the newest queued snapshot of a shard matters.
                    while let Ok((s2, n2)) = rx.try_recv() {
                        if s2 == shard {
                            snap = n2;
                        } else if let Err(e) = write(&d, s2, &n2) {
                            tracing::error!(shard = s2, error = %e, "registration snapshot failed");
                        }
                    }
                    if let Err(e) = write(&d, shard, &snap) {
                        tracing::error!(shard, error = %e, "registration snapshot failed");
                    }
                }
            });
        Arc::new(RegistrationStore {
            dir: dir.to_path_buf(),
            tx,
        })
    }

    /// The snapshots shard `shard` of `shards` takes over at start: its own
    /// and those of shards past the current count that fold onto it.
    pub fn load(&self, shard: usize, shards: usize) -> Vec<ShardSnapshot> {
        let mut out = Vec::new();
        let mut foreign = Vec::new();
        for idx in self.files() {
            if idx % shards.max(1) != shard {
                continue;
            }
            match snapshot::load(&self.dir, &file_name(idx), MAGIC, "registration") {
                Ok(Some((body, path, _))) => match serde_json::from_slice::<ShardSnapshot>(&body) {
                    Ok(s) => {
                        out.push(s);
                        if idx != shard {
                            foreign.push(idx);
                        }
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "unreadable registration snapshot ignored")
                    }
                },
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "registration snapshot ignored"),
            }
        }
        // Merged into this shard: remove them once this shard saved its own.
        if !foreign.is_empty() {
            let merged = ShardSnapshot {
                shard: shard as u16,
                saved_at_ms: out.iter().map(|s| s.saved_at_ms).min().unwrap_or(0),
                lamport: out.iter().map(|s| s.lamport).max().unwrap_or(0),
                registrations: out.iter().flat_map(|s| s.registrations.clone()).collect(),
                homed: out.iter().flat_map(|s| s.homed.clone()).collect(),
            };
            if write(&self.dir, shard, &merged).is_ok() {
                for idx in foreign {
                    for f in [file_name(idx), snapshot::prev_name(&file_name(idx))] {
                        let _ = std::fs::remove_file(self.dir.join(f));
                    }
                }
            }
            return vec![merged];
        }
        out
    }

    fn files(&self) -> Vec<usize> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<usize> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let idx = name.strip_prefix("registrations-")?.strip_suffix(".snap")?;
                idx.parse().ok()
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Writes shard `shard`'s snapshot now.
    pub fn save(&self, shard: usize, snap: &ShardSnapshot) -> Result<(), snapshot::SnapshotError> {
        write(&self.dir, shard, snap)
    }

    /// Queues shard `shard`'s snapshot for the writer thread.
    pub fn save_async(&self, shard: usize, snap: ShardSnapshot) {
        let _ = self.tx.send((shard, snap));
    }
}

fn write(dir: &Path, shard: usize, snap: &ShardSnapshot) -> Result<(), snapshot::SnapshotError> {
    let body = serde_json::to_vec(snap).map_err(|e| snapshot::SnapshotError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    snapshot::write(dir, &file_name(shard), MAGIC, &body, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fewer_shards_fold_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let st = RegistrationStore::new(tmp.path());
        for s in 0..4 {
            let snap = ShardSnapshot {
                shard: s,
                saved_at_ms: 1000 + s as i64,
                lamport: s as u64,
                ..Default::default()
            };
            st.save(s as usize, &snap).unwrap();
        }
        // Two shards now: shard 1 takes 1 and 3.
        let got = st.load(1, 2);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].lamport, 3);
        assert!(!tmp.path().join("registrations-3.snap").exists());
        assert_eq!(st.load(1, 2).len(), 1);
        assert_eq!(st.load(0, 2).len(), 1);
    }
}

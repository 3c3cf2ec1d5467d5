//! Encrypted DTLS session snapshots: what makes a restart invisible to DTLS
//! devices (no handshake storm), as Californium's graceful restart does.
//!
//! At SIGTERM each shard's established sessions (key block, sequence state,
//! replay window, identity) are written as `dtls-sessions-{shard}.snap`,
//! sealed with AES-256-GCM under the configured session key (random nonce;
//! the file name and shard are the additional data), through the
//! crash-safe snapshot writer. At start each shard restores its file and
//! deletes it (a session must never be restored twice: its write sequence
//! would repeat). A missing, wrong or unreadable key drops the sessions
//! with a log line; devices handshake again. The key is never logged.

use super::snapshot;
use crate::proto::dtls::session::Session;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const MAGIC: &str = "CLWM2M-DTLS-SESSIONS v1";

fn file_name(shard: usize) -> String {
    format!("dtls-sessions-{shard}.snap")
}

/// Sessions saved by one shard: (saved at, wall-clock ms; the sessions).
pub type SavedSessions = (i64, Vec<(SocketAddr, Session)>);

#[derive(Serialize, Deserialize)]
struct Body {
    saved_at_ms: i64,
    sessions: Vec<(SocketAddr, Session)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionStoreError {
    #[error("DTLS session key: {0}")]
    Key(String),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("DTLS session snapshot {0}: cannot be decrypted (wrong session key?)")]
    Decrypt(PathBuf),
    #[error("DTLS session snapshot {0}: {1}")]
    Format(PathBuf, String),
}

pub struct SessionStore {
    dir: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionStore({}, key <redacted>)", self.dir.display())
    }
}

impl SessionStore {
    /// The store in `dir` with a key of 64 hex digits.
    pub fn new(dir: &Path, key_hex: &str) -> Result<SessionStore, SessionStoreError> {
        let k = crate::proto::lwm2m::endpoint::decode_hex(key_hex.trim())
            .ok_or_else(|| SessionStoreError::Key("not hex".into()))?;
        let key = <[u8; 32]>::try_from(k)
            .map_err(|v| SessionStoreError::Key(format!("{} bytes, need 32", v.len())))?;
        Ok(SessionStore {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// Saves one shard's sessions.
    pub fn save(
        &self,
        shard: usize,
        now_ms: i64,
        sessions: Vec<(SocketAddr, Session)>,
    ) -> Result<usize, SessionStoreError> {
        let n = sessions.len();
        let body = Body {
            saved_at_ms: now_ms,
            sessions,
        };
        let plain = serde_json::to_vec(&body)
            .map_err(|e| SessionStoreError::Format(self.dir.clone(), e.to_string()))?;
        let mut nonce = [0u8; 12];
        openssl::rand::rand_bytes(&mut nonce).map_err(|e| SessionStoreError::Key(e.to_string()))?;
        let mut tag = [0u8; 16];
        let aad = file_name(shard);
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(&nonce),
            aad.as_bytes(),
            &plain,
            &mut tag,
        )
        .map_err(|e| SessionStoreError::Key(e.to_string()))?;
        let mut out = Vec::with_capacity(12 + ct.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        snapshot::write(&self.dir, &file_name(shard), MAGIC, &out, true)?;
        Ok(n)
    }

    /// Loads and removes one shard's saved sessions (with the time they
    /// were saved). `Ok(None)` when there is no file.
    pub fn take(&self, shard: usize) -> Result<Option<SavedSessions>, SessionStoreError> {
        let name = file_name(shard);
        let path = self.dir.join(&name);
        if !path.exists() {
            return Ok(None);
        }
        let data = snapshot::read(&path, MAGIC);
        // Whatever happens below, the file is used at most once.
        for p in [path.clone(), self.dir.join(snapshot::prev_name(&name))] {
            let _ = std::fs::remove_file(p);
        }
        let data = data?;
        if data.len() < 28 {
            return Err(SessionStoreError::Format(path, "too short".into()));
        }
        let (nonce, rest) = data.split_at(12);
        let (ct, tag) = rest.split_at(rest.len() - 16);
        let plain = decrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(nonce),
            name.as_bytes(),
            ct,
            tag,
        )
        .map_err(|_| SessionStoreError::Decrypt(path.clone()))?;
        let body: Body = serde_json::from_slice(&plain)
            .map_err(|e| SessionStoreError::Format(path, e.to_string()))?;
        Ok(Some((body.saved_at_ms, body.sessions)))
    }

    /// Shards with a saved file.
    pub fn shards_saved(&self) -> Vec<usize> {
        let mut v: Vec<usize> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("dtls-sessions-")?
                    .strip_suffix(".snap")?
                    .parse()
                    .ok()
            })
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::dtls::cipher::{Keys, Suite};
    use crate::proto::dtls::session::ReplayWindow;
    use crate::proto::lwm2m::endpoint::Identity;

    fn session() -> Session {
        Session {
            keys: Keys::derive(Suite::PskAes128Ccm8, &[1; 48], &[2; 32], &[3; 32]),
            identity: Identity::Psk(b"dev".to_vec()),
            epoch: 1,
            write_seq: 7,
            replay: ReplayWindow::default(),
            last_rx_ms: 5,
            final_flight: None,
            cred_tag: 9,
            idle_s: 0,
        }
    }

    #[test]
    fn round_trip_once_and_wrong_key_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = "11".repeat(32);
        let s = SessionStore::new(dir.path(), &key).unwrap();
        let a: SocketAddr = "10.0.0.1:5".parse().unwrap();
        assert_eq!(s.save(0, 100, vec![(a, session())]).unwrap(), 1);
        // The file holds no key bytes in the clear.
        let raw = std::fs::read(dir.path().join("dtls-sessions-0.snap")).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("PskAes128Ccm8"));
        assert_eq!(s.shards_saved(), vec![0]);
        let (at, got) = s.take(0).unwrap().unwrap();
        assert_eq!(at, 100);
        assert_eq!(got[0].0, a);
        assert_eq!(got[0].1.write_seq, 7);
        assert_eq!(got[0].1.keys, session().keys);
        // Taken once.
        assert!(s.take(0).unwrap().is_none());
        // Another key: a clear error, never a panic, and the file is gone.
        s.save(1, 100, vec![(a, session())]).unwrap();
        let other = SessionStore::new(dir.path(), &"22".repeat(32)).unwrap();
        assert!(matches!(other.take(1), Err(SessionStoreError::Decrypt(_))));
        assert!(s.take(1).unwrap().is_none());
        assert!(SessionStore::new(dir.path(), "abc").is_err());
        assert!(!format!("{s:?}").contains("1111"));
    }
}

//! The RPC write-ahead log: what the [`RpcBook`](super::rpc_book::RpcBook)
//! emits, and the Kafka request-topic offsets consumed, appended as
//! CRC-checked JSON lines (the directory log's format: `crc32-hex json\n`)
//! and fsynced once per batch (group commit) before any status is
//! published or any execution leaves for a shard.
//!
//! Storing the consumer offsets in the same log as the acceptance makes the
//! Kafka intake exactly-once: after a crash the consumer resumes after the
//! last request whose acceptance is durable, and nothing accepted is read
//! twice. A torn last line (a crash mid-append) is ignored: nothing that
//! depended on it was acted on. The log is compacted (rewritten from the
//! book's state, atomically by rename) once it grows past a bound.

use super::rpc_book::LogRecord;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

pub const RPC_LOG: &str = "rpc.log";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalLine {
    #[serde(rename = "r")]
    Rpc(LogRecord),
    /// The next offset to consume from a partition of the request topic.
    #[serde(rename = "o")]
    Offset { partition: i32, next: i64 },
}

pub struct RpcLog {
    dir: PathBuf,
    file: fs::File,
    /// Bytes appended since the last compaction.
    grown: u64,
    buf: Vec<u8>,
}

fn encode(line: &WalLine, out: &mut Vec<u8>) {
    let json = serde_json::to_vec(line).unwrap_or_default();
    out.extend_from_slice(format!("{:08x} ", crc32fast::hash(&json)).as_bytes());
    out.extend_from_slice(&json);
    out.push(b'\n');
}

fn decode(line: &[u8]) -> Option<WalLine> {
    let (crc, json) = (line.get(..8)?, line.get(9..)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if line.get(8) != Some(&b' ') || crc32fast::hash(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

impl RpcLog {
    /// Opens (creating) the log in `dir` and returns what it holds.
    pub fn open(dir: &Path) -> std::io::Result<(RpcLog, Vec<WalLine>)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(RPC_LOG);
        let mut lines = Vec::new();
        let mut good_len = 0u64;
        if let Ok(f) = fs::File::open(&path) {
            for line in std::io::BufReader::new(f).split(b'\n') {
                let Ok(line) = line else { break };
                match decode(&line) {
                    Some(l) => {
                        good_len += line.len() as u64 + 1;
                        lines.push(l);
                    }
                    None => {
                        tracing::warn!(file = %path.display(), "rpc log: torn record ignored");
                        break;
                    }
                }
            }
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        // Cut a torn tail so later appends follow the last good line.
        if file.metadata()?.len() > good_len {
            file.set_len(good_len)?;
        }
        Ok((
            RpcLog {
                dir: dir.to_path_buf(),
                file,
                grown: good_len,
                buf: Vec::with_capacity(64 * 1024),
            },
            lines,
        ))
    }

    /// Appends `lines` and makes them durable (one fsync for the batch).
    pub fn append(&mut self, lines: &[WalLine]) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        for l in lines {
            encode(l, &mut self.buf);
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.grown += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes appended since the last compaction.
    pub fn grown(&self) -> u64 {
        self.grown
    }

    /// Replaces the log by `lines` (the book's compacted state plus the
    /// offsets), atomically: written to a temporary file, fsynced, renamed.
    pub fn compact(&mut self, lines: &[WalLine]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{RPC_LOG}.tmp"));
        let mut buf = Vec::new();
        for l in lines {
            encode(l, &mut buf);
        }
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        let path = self.dir.join(RPC_LOG);
        fs::rename(&tmp, &path)?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.file = fs::OpenOptions::new().append(true).open(&path)?;
        self.grown = buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::lwm2m::rpc::RpcStatus;

    fn sent(id: &str) -> WalLine {
        WalLine::Rpc(LogRecord::Sent {
            rpc_id: id.into(),
            at: 5,
        })
    }

    #[test]
    fn append_reopen_torn_tail_and_compact() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, lines) = RpcLog::open(tmp.path()).unwrap();
        assert!(lines.is_empty());
        log.append(&[
            sent("a"),
            WalLine::Offset {
                partition: 0,
                next: 7,
            },
        ])
        .unwrap();
        log.append(&[WalLine::Rpc(LogRecord::Finished {
            rpc_id: "a".into(),
            status: RpcStatus::Succeeded,
            code: Some("2.04".into()),
            response: None,
            reason: None,
            at: 9,
        })])
        .unwrap();
        drop(log);
        // A crash mid-append leaves half a line.
        let p = tmp.path().join(RPC_LOG);
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"deadbeef {\"r\":{\"t\":\"se").unwrap();
        drop(f);
        let (mut log, lines) = RpcLog::open(tmp.path()).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], sent("a"));
        // Appends after the torn tail are readable.
        log.append(&[sent("b")]).unwrap();
        drop(log);
        let (mut log, lines) = RpcLog::open(tmp.path()).unwrap();
        assert_eq!(lines.len(), 4);
        log.compact(&[sent("b")]).unwrap();
        log.append(&[sent("c")]).unwrap();
        drop(log);
        let (_, lines) = RpcLog::open(tmp.path()).unwrap();
        assert_eq!(lines, vec![sent("b"), sent("c")]);
    }
}

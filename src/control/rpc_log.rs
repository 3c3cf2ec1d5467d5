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
//! depended on it was acted on.
//!
//! **Segments and compaction.** Appends go to the current segment
//! `rpc.log.{gen}`. Compaction rotates: the next appends go to segment
//! `gen + 1` at once, and a background thread writes the state as it was at
//! the rotation (the book's compacted records plus the offsets) to
//! `rpc.snap` (temporary file, fsync, rename; its first line names the last
//! segment it covers), then deletes the segments it covers. The RPC thread
//! never waits for a compaction. Opening reads `rpc.snap`, then the
//! segments after the one it covers, in order: a crash at any point of a
//! compaction replays the same state.
//!
//! A compaction is due once what was appended since the last one is at
//! least `rpc.log_compact_bytes` and at least the size of the last
//! snapshot: rewriting costs O(live state), so it comes after as many
//! appended bytes (amortised O(1) per append).

use super::rpc_book::LogRecord;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

pub const RPC_LOG: &str = "rpc.log";
pub const RPC_SNAP: &str = "rpc.snap";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalLine {
    #[serde(rename = "r")]
    Rpc(LogRecord),
    /// The next offset to consume from a partition of the request topic.
    #[serde(rename = "o")]
    Offset { partition: i32, next: i64 },
    /// First line of a snapshot: the last segment it covers.
    #[serde(rename = "s")]
    Covers { segment: u64 },
}

pub struct RpcLog {
    dir: PathBuf,
    file: fs::File,
    /// The current segment.
    gen: u64,
    /// Bytes appended since the last compaction (or the open).
    appended: u64,
    /// Size of the last snapshot (or of what was read at the open).
    live: u64,
    buf: Vec<u8>,
    /// The compaction being written: (its thread, the segments it covers).
    compacting: Option<JoinHandle<std::io::Result<u64>>>,
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

fn segment_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("{RPC_LOG}.{gen:010}"))
}

/// The segments in `dir`, oldest first.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let prefix = format!("{RPC_LOG}.");
    let mut v: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix(&prefix)?.parse().ok()
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Reads the good lines of `path`: (lines, bytes of good lines, torn).
fn read_lines(path: &Path) -> (Vec<WalLine>, u64, bool) {
    let mut lines = Vec::new();
    let mut good = 0u64;
    let Ok(f) = fs::File::open(path) else {
        return (lines, 0, false);
    };
    for line in std::io::BufReader::new(f).split(b'\n') {
        let Ok(line) = line else {
            return (lines, good, true);
        };
        match decode(&line) {
            Some(l) => {
                good += line.len() as u64 + 1;
                lines.push(l);
            }
            None => return (lines, good, true),
        }
    }
    (lines, good, false)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

impl RpcLog {
    /// Opens (creating) the log in `dir` and returns what it holds: the
    /// snapshot's lines, then every later segment's.
    pub fn open(dir: &Path) -> std::io::Result<(RpcLog, Vec<WalLine>)> {
        fs::create_dir_all(dir)?;
        let _ = fs::remove_file(dir.join(format!("{RPC_SNAP}.tmp")));
        let (mut snap, snap_len, torn) = read_lines(&dir.join(RPC_SNAP));
        let covers = match snap.first() {
            Some(WalLine::Covers { segment }) if !torn => Some(*segment),
            None if !torn => None,
            // A snapshot is renamed into place only once complete.
            _ => {
                return Err(std::io::Error::other(format!(
                    "{} is damaged",
                    dir.join(RPC_SNAP).display()
                )))
            }
        };
        if covers.is_some() {
            snap.remove(0);
        }
        let mut lines = snap;
        let mut live = snap_len;
        let segs = segments(dir)?;
        let mut gen = 0;
        for s in &segs {
            if covers.is_some_and(|c| *s <= c) {
                // Covered by the snapshot (a compaction that ended before
                // it deleted them).
                let _ = fs::remove_file(segment_path(dir, *s));
                continue;
            }
            let path = segment_path(dir, *s);
            let (l, good, torn) = read_lines(&path);
            if torn {
                tracing::warn!(file = %path.display(), "rpc log: torn record ignored");
                // Cut it so later appends follow the last good line (only
                // the last segment can be torn: the others were closed).
                if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                    let _ = f.set_len(good);
                }
            }
            lines.extend(l);
            live += good;
            gen = *s;
        }
        let gen = gen.max(covers.map_or(0, |c| c + 1));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, gen))?;
        Ok((
            RpcLog {
                dir: dir.to_path_buf(),
                file,
                gen,
                appended: 0,
                live,
                buf: Vec::with_capacity(64 * 1024),
                compacting: None,
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
        self.appended += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes appended since the last compaction.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// True when a compaction is due: none is running, and at least `min`
    /// bytes and at least the last snapshot's size were appended since.
    pub fn needs_compaction(&mut self, min: u64) -> bool {
        self.reap();
        self.compacting.is_none() && self.appended >= min.max(self.live)
    }

    /// True while a compaction is being written.
    pub fn compacting(&mut self) -> bool {
        self.reap();
        self.compacting.is_some()
    }

    /// Collects a finished compaction.
    fn reap(&mut self) {
        if !self.compacting.as_ref().is_some_and(|h| h.is_finished()) {
            return;
        }
        match self.compacting.take().map(|h| h.join()) {
            Some(Ok(Ok(size))) => self.live = size,
            Some(Ok(Err(e))) => {
                tracing::error!(error = %e, "rpc log compaction failed; the segments stay")
            }
            Some(Err(_)) => tracing::error!("rpc log compaction thread panicked"),
            None => {}
        }
    }

    /// Starts a compaction to `state` (the book's compacted records and the
    /// offsets as they are now, after everything appended so far): appends
    /// go to a new segment from here on, a background thread writes the
    /// snapshot and removes the segments it covers.
    pub fn compact(&mut self, state: Vec<WalLine>) -> std::io::Result<()> {
        self.reap();
        if self.compacting.is_some() {
            return Ok(());
        }
        let covers = self.gen;
        let next = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, covers + 1))?;
        sync_dir(&self.dir);
        self.file = next;
        self.gen = covers + 1;
        self.appended = 0;
        let dir = self.dir.clone();
        let h = std::thread::Builder::new()
            .name("rpc-compact".into())
            .spawn(move || write_snapshot(&dir, covers, &state))?;
        self.compacting = Some(h);
        Ok(())
    }

    /// Waits for a compaction in progress (tests, shutdown).
    pub fn wait_compaction(&mut self) {
        if let Some(h) = self.compacting.take() {
            match h.join() {
                Ok(Ok(size)) => self.live = size,
                Ok(Err(e)) => tracing::error!(error = %e, "rpc log compaction failed"),
                Err(_) => tracing::error!("rpc log compaction thread panicked"),
            }
        }
    }
}

/// Writes `rpc.snap` covering segments up to `covers`, then removes them.
/// Returns the snapshot's size.
fn write_snapshot(dir: &Path, covers: u64, state: &[WalLine]) -> std::io::Result<u64> {
    let tmp = dir.join(format!("{RPC_SNAP}.tmp"));
    let mut size = 0u64;
    {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
        let mut buf = Vec::with_capacity(64 * 1024);
        encode(&WalLine::Covers { segment: covers }, &mut buf);
        for l in state {
            encode(l, &mut buf);
            if buf.len() >= 60 * 1024 {
                f.write_all(&buf)?;
                size += buf.len() as u64;
                buf.clear();
            }
        }
        f.write_all(&buf)?;
        size += buf.len() as u64;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    fs::rename(&tmp, dir.join(RPC_SNAP))?;
    sync_dir(dir);
    for s in segments(dir)? {
        if s <= covers {
            fs::remove_file(segment_path(dir, s))?;
        }
    }
    Ok(size)
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

    fn current_segment(dir: &Path) -> PathBuf {
        segment_path(dir, *segments(dir).unwrap().last().unwrap())
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
        let p = current_segment(tmp.path());
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
        log.compact(vec![sent("b")]).unwrap();
        // Appends made while the snapshot is written land after it.
        log.append(&[sent("c")]).unwrap();
        log.wait_compaction();
        log.append(&[sent("d")]).unwrap();
        drop(log);
        let (_, lines) = RpcLog::open(tmp.path()).unwrap();
        assert_eq!(lines, vec![sent("b"), sent("c"), sent("d")]);
        assert_eq!(segments(tmp.path()).unwrap().len(), 1, "covered ones gone");
    }

    /// A crash at each point of a compaction replays the same state.
    #[test]
    fn a_compaction_cut_short_replays_the_same_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (mut log, _) = RpcLog::open(dir).unwrap();
        log.append(&[sent("a"), sent("b")]).unwrap();
        // A completed compaction: the snapshot, then the new segment.
        log.compact(vec![sent("b")]).unwrap();
        log.wait_compaction();
        log.append(&[sent("c")]).unwrap();
        drop(log);
        let want = vec![sent("b"), sent("c")];
        assert_eq!(RpcLog::open(dir).unwrap().1, want);
        // The snapshot written but the covered segment not yet deleted:
        // it is skipped (and removed), not replayed twice.
        let covered = segment_path(dir, 0);
        fs::write(&covered, {
            let mut b = Vec::new();
            encode(&sent("a"), &mut b);
            encode(&sent("b"), &mut b);
            b
        })
        .unwrap();
        assert_eq!(RpcLog::open(dir).unwrap().1, want);
        assert!(!covered.exists());
        // A half-written temporary snapshot is ignored.
        fs::write(dir.join(format!("{RPC_SNAP}.tmp")), b"0000 garbage").unwrap();
        assert_eq!(RpcLog::open(dir).unwrap().1, want);
        // No snapshot at all yet (crash right after the rotation of the
        // first compaction): both segments in order.
        let tmp2 = tempfile::tempdir().unwrap();
        let (mut log, _) = RpcLog::open(tmp2.path()).unwrap();
        log.append(&[sent("x")]).unwrap();
        log.gen += 1;
        log.file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(tmp2.path(), log.gen))
            .unwrap();
        log.append(&[sent("y")]).unwrap();
        drop(log);
        assert_eq!(
            RpcLog::open(tmp2.path()).unwrap().1,
            vec![sent("x"), sent("y")]
        );
    }

    /// A snapshot larger than the minimum must not make every append
    /// compact (it did: the counter started at the compacted size).
    #[test]
    fn compaction_waits_for_as_many_bytes_as_the_live_state() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut log, _) = RpcLog::open(tmp.path()).unwrap();
        let big: Vec<WalLine> = (0..1000).map(|i| sent(&format!("rpc-{i:04}"))).collect();
        log.compact(big).unwrap();
        assert!(log.compacting() || log.live > 0);
        log.wait_compaction();
        let live = log.live;
        assert!(live > 10_000);
        assert!(!log.needs_compaction(1000), "just compacted");
        while log.appended() < live - 100 {
            log.append(&[sent("x")]).unwrap();
            assert!(!log.needs_compaction(1000));
        }
        while log.appended() < live {
            log.append(&[sent("x")]).unwrap();
        }
        assert!(log.needs_compaction(1000));
        // A small state compacts after the minimum.
        log.compact(vec![sent("b")]).unwrap();
        log.wait_compaction();
        assert!(!log.needs_compaction(1000));
        while log.appended() < 1000 {
            log.append(&[sent("x")]).unwrap();
        }
        assert!(log.needs_compaction(1000));
    }
}

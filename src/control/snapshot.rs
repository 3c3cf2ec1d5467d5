//! Crash-safe snapshot files, shared by the directory and the per-shard
//! registration snapshots.
//!
//! Format: a magic line, `crc32=<hex>`, `len=<bytes>`, then the body. A write
//! goes to `<name>.tmp`, is fsynced, the current file becomes `<name>.prev`
//! (the previous generation), the temp file is renamed into place and the
//! directory fsynced, so a crash at any point leaves a complete current or
//! previous generation. A reader verifies length and checksum.
//!
//! When the current file is corrupted and the previous generation was used
//! instead, the next write must not demote the corrupted file to `.prev`
//! (it would replace the only good generation): [`write()`] with
//! `rotate = false` moves it aside as `<name>.corrupt` and keeps `.prev`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {0} is corrupted: {1}")]
    Corrupt(PathBuf, String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn prev_name(name: &str) -> String {
    format!("{name}.prev")
}

/// Writes `body` as `dir/name` crash-safely. `rotate`: keep the current file
/// as the previous generation (false: it is known corrupted; move it aside).
pub fn write(
    dir: &Path,
    name: &str,
    magic: &str,
    body: &[u8],
    rotate: bool,
) -> Result<(), SnapshotError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let crc = crc32fast::hash(body);
        write!(f, "{magic}\ncrc32={crc:08x}\nlen={}\n", body.len()).map_err(io_err(&tmp))?;
        f.write_all(body).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    let cur = dir.join(name);
    if cur.exists() {
        let aside = if rotate {
            dir.join(prev_name(name))
        } else {
            dir.join(format!("{name}.corrupt"))
        };
        fs::rename(&cur, &aside).map_err(io_err(&aside))?;
    }
    fs::rename(&tmp, &cur).map_err(io_err(&cur))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Reads and verifies one snapshot file; returns its body.
pub fn read(path: &Path, magic: &str) -> Result<Vec<u8>, SnapshotError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let corrupt = |why: &str| SnapshotError::Corrupt(path.to_path_buf(), why.to_string());
    let mut lines = data.splitn(4, |b| *b == b'\n');
    if lines.next() != Some(magic.as_bytes()) {
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
    Ok(body.to_vec())
}

/// The newest valid generation of `dir/name`: (body, path, current file was
/// corrupted). `Ok(None)` when neither file exists.
/// `kind` names the snapshot in the log ("directory", "registration").
pub fn load(
    dir: &Path,
    name: &str,
    magic: &str,
    kind: &str,
) -> Result<Option<(Vec<u8>, PathBuf, bool)>, SnapshotError> {
    let cur = dir.join(name);
    let prev = dir.join(prev_name(name));
    let mut first_err = None;
    for path in [cur, prev] {
        if !path.exists() {
            continue;
        }
        match read(&path, magic) {
            Ok(b) => {
                let fell_back = first_err.is_some();
                if let Some(e) = &first_err {
                    tracing::error!(
                        error = %e,
                        fallback = %path.display(),
                        "{kind} snapshot is corrupted; loaded the previous snapshot instead"
                    );
                }
                return Ok(Some((b, path, fell_back)));
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                } else {
                    tracing::error!(error = %e, "previous {kind} snapshot is corrupted too");
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_and_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "x.snap", "M1", b"one", true).unwrap();
        write(d, "x.snap", "M1", b"two", true).unwrap();
        let (b, _, fell) = load(d, "x.snap", "M1", "test").unwrap().unwrap();
        assert_eq!((b.as_slice(), fell), (&b"two"[..], false));
        // Corrupt the current generation: the previous one is used.
        let cur = d.join("x.snap");
        let mut bytes = fs::read(&cur).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        fs::write(&cur, &bytes).unwrap();
        let (b, _, fell) = load(d, "x.snap", "M1", "test").unwrap().unwrap();
        assert_eq!((b.as_slice(), fell), (&b"one"[..], true));
        // The next write after a fallback keeps the good generation.
        write(d, "x.snap", "M1", b"three", false).unwrap();
        assert_eq!(read(&d.join("x.snap.prev"), "M1").unwrap(), b"one");
        assert!(d.join("x.snap.corrupt").exists());
        assert!(read(&d.join("x.snap"), "M2").is_err());
        assert!(load(&d.join("none"), "x.snap", "M1", "test")
            .unwrap()
            .is_none());
    }
}

//! Firmware images for LwM2M object 5 updates (TS 1.1 Core §E.6): a
//! directory of images, each with its metadata (name, version, size,
//! SHA-256), uploaded through the admin API (`PUT /v1/firmware/{name}`) and
//! served to devices by the shards (Block2 for pull, Block1 for push).
//!
//! On disk, in `firmware.dir`: `{name}.bin` (the image) and `{name}.json`
//! (its [`ImageMeta`]). An upload streams into `.{name}.{n}.part` while
//! hashing, is fsynced, checked against the size limit and the expected
//! SHA-256 (when the uploader gave one), then renamed over `{name}.bin`
//! after its metadata is written the same way, and the directory is
//! fsynced: a crash leaves either the old image or the new one, never a
//! torn one (a `.part` left behind is removed at the next start). An image
//! whose metadata is missing or disagrees with the file's size is not
//! listed (logged).
//!
//! Images are read into memory on first use (`Arc<[u8]>`, shared by every
//! shard) and kept while the total stays under `cache_bytes`; the least
//! recently used go first.

use openssl::sha::Sha256;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Longest image name.
pub const MAX_NAME: usize = 128;

/// What the store knows of one image (and what `GET /v1/firmware` lists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub name: String,
    /// The version the uploader declared (free text, may be empty).
    #[serde(default)]
    pub version: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    pub uploaded_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("image name {0:?}: 1 to 128 characters [A-Za-z0-9._-], not starting with '.'")]
    BadName(String),
    #[error("version: at most 64 printable characters")]
    BadVersion,
    #[error("expected sha256 {0:?} is not 64 hex digits")]
    BadChecksum(String),
    #[error("the image is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the image is empty")]
    Empty,
    #[error("checksum mismatch: expected {expected}, the upload has {actual}")]
    Mismatch { expected: String, actual: String },
    #[error("no image {0:?}")]
    NotFound(String),
    #[error("firmware store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FirmwareError + '_ {
    move |source| FirmwareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `[A-Za-z0-9._-]{1,128}`, not starting with a dot (no hidden or
/// temporary names, no path separators).
pub fn valid_name(name: &str) -> bool {
    // `campaigns` names the campaigns API under /v1/firmware/.
    !name.is_empty()
        && name != "campaigns"
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn hex(b: &[u8]) -> String {
    crate::proto::lwm2m::endpoint::encode_hex(b)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct Cached {
    bytes: Arc<[u8]>,
    sha256: String,
    used: u64,
}

struct Inner {
    images: BTreeMap<String, ImageMeta>,
    cache: BTreeMap<String, Cached>,
    cached_bytes: usize,
}

pub struct FirmwareStore {
    dir: PathBuf,
    max_bytes: u64,
    cache_bytes: usize,
    inner: Mutex<Inner>,
    clock: AtomicU64,
    part: AtomicU64,
}

/// An upload in progress: bytes go to a temporary file and a running
/// SHA-256; [`Upload::finish`] makes it the image.
pub struct Upload<'a> {
    store: &'a FirmwareStore,
    name: String,
    version: String,
    expected: Option<String>,
    file: Option<fs::File>,
    path: PathBuf,
    hash: Sha256,
    size: u64,
}

impl FirmwareStore {
    /// Opens (creating) the store in `dir`: lists the images whose metadata
    /// matches their file, removes unfinished uploads.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        cache_bytes: usize,
    ) -> Result<FirmwareStore, FirmwareError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut images = BTreeMap::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let fname = e.file_name().to_string_lossy().to_string();
            if fname.starts_with('.') && fname.ends_with(".part") {
                let _ = fs::remove_file(e.path());
                continue;
            }
            let Some(name) = fname.strip_suffix(".json") else {
                continue;
            };
            let meta: Option<ImageMeta> = fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let on_disk = fs::metadata(dir.join(format!("{name}.bin"))).map(|m| m.len());
            match (meta, on_disk) {
                (Some(m), Ok(len)) if m.name == name && m.size == len && valid_name(name) => {
                    images.insert(m.name.clone(), m);
                }
                _ => tracing::warn!(
                    image = name,
                    dir = %dir.display(),
                    "firmware image skipped: its metadata is unreadable or does not match the file"
                ),
            }
        }
        Ok(FirmwareStore {
            dir: dir.to_path_buf(),
            max_bytes,
            cache_bytes,
            inner: Mutex::new(Inner {
                images,
                cache: BTreeMap::new(),
                cached_bytes: 0,
            }),
            clock: AtomicU64::new(0),
            part: AtomicU64::new(0),
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every image, by name.
    pub fn list(&self) -> Vec<ImageMeta> {
        self.lock().images.values().cloned().collect()
    }

    pub fn meta(&self, name: &str) -> Option<ImageMeta> {
        self.lock().images.get(name).cloned()
    }

    /// Starts an upload of `name`. `expected_sha256` (hex), when given, must
    /// match what arrives.
    pub fn begin(
        &self,
        name: &str,
        version: &str,
        expected_sha256: Option<&str>,
    ) -> Result<Upload<'_>, FirmwareError> {
        if !valid_name(name) {
            return Err(FirmwareError::BadName(name.into()));
        }
        if version.len() > 64 || version.chars().any(|c| c.is_control()) {
            return Err(FirmwareError::BadVersion);
        }
        let expected = match expected_sha256 {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(h.to_ascii_lowercase())
            }
            Some(h) => return Err(FirmwareError::BadChecksum(h.into())),
            None => None,
        };
        let n = self.part.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!(".{name}.{}.{n}.part", std::process::id()));
        let file = fs::File::create(&path).map_err(io_err(&path))?;
        Ok(Upload {
            store: self,
            name: name.into(),
            version: version.into(),
            expected,
            file: Some(file),
            path,
            hash: Sha256::new(),
            size: 0,
        })
    }

    /// The image's bytes (read on first use, then shared) and its SHA-256.
    pub fn bytes(&self, name: &str) -> Result<(Arc<[u8]>, String), FirmwareError> {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        let meta = {
            let mut g = self.lock();
            if let Some(c) = g.cache.get_mut(name) {
                c.used = tick;
                return Ok((c.bytes.clone(), c.sha256.clone()));
            }
            g.images
                .get(name)
                .cloned()
                .ok_or_else(|| FirmwareError::NotFound(name.into()))?
        };
        let path = self.dir.join(format!("{name}.bin"));
        let bytes: Arc<[u8]> = fs::read(&path).map_err(io_err(&path))?.into();
        let actual = hex(&openssl::sha::sha256(&bytes));
        if actual != meta.sha256 {
            return Err(FirmwareError::Mismatch {
                expected: meta.sha256,
                actual,
            });
        }
        let mut g = self.lock();
        // Another reader may have loaded it meanwhile; the image may have
        // been replaced (then this copy is still what was asked for).
        if g.images.get(name).is_some_and(|m| m.sha256 == actual) && !g.cache.contains_key(name) {
            g.cached_bytes += bytes.len();
            g.cache.insert(
                name.into(),
                Cached {
                    bytes: bytes.clone(),
                    sha256: actual.clone(),
                    used: tick,
                },
            );
            evict(&mut g, self.cache_bytes, name);
        }
        Ok((bytes, actual))
    }

    /// Removes an image (transfers holding its bytes keep them).
    pub fn remove(&self, name: &str) -> Result<bool, FirmwareError> {
        let mut g = self.lock();
        if g.images.remove(name).is_none() {
            return Ok(false);
        }
        if let Some(c) = g.cache.remove(name) {
            g.cached_bytes -= c.bytes.len();
        }
        for f in [format!("{name}.json"), format!("{name}.bin")] {
            let p = self.dir.join(f);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FirmwareError::Io { path: p, source: e }),
            }
        }
        sync_dir(&self.dir)?;
        Ok(true)
    }
}

/// Drops the least recently used images (never `keep`) until the cache
/// fits `budget`.
fn evict(g: &mut Inner, budget: usize, keep: &str) {
    while g.cached_bytes > budget {
        let Some(victim) = g
            .cache
            .iter()
            .filter(|(n, _)| n.as_str() != keep)
            .min_by_key(|(_, c)| c.used)
            .map(|(n, _)| n.clone())
        else {
            return;
        };
        if let Some(c) = g.cache.remove(&victim) {
            g.cached_bytes -= c.bytes.len();
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), FirmwareError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Upload<'_> {
    /// The next chunk of the image.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), FirmwareError> {
        self.size += chunk.len() as u64;
        if self.size > self.store.max_bytes {
            return Err(FirmwareError::TooLarge(self.store.max_bytes));
        }
        self.hash.update(chunk);
        let file = self.file.as_mut().ok_or(FirmwareError::Empty)?;
        file.write_all(chunk).map_err(io_err(&self.path))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks and installs the image; the temporary file is gone either way.
    pub fn finish(mut self) -> Result<ImageMeta, FirmwareError> {
        let file = self.file.take().ok_or(FirmwareError::Empty)?;
        if self.size == 0 {
            return Err(FirmwareError::Empty);
        }
        file.sync_all().map_err(io_err(&self.path))?;
        drop(file);
        let actual = hex(&std::mem::replace(&mut self.hash, Sha256::new()).finish());
        if let Some(expected) = &self.expected {
            if *expected != actual {
                return Err(FirmwareError::Mismatch {
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let meta = ImageMeta {
            name: self.name.clone(),
            version: self.version.clone(),
            size: self.size,
            sha256: actual,
            uploaded_at: now_ms(),
        };
        let dir = &self.store.dir;
        // Under the lock: two uploads of one name install one after the
        // other, metadata and file of the same upload.
        let mut g = self.store.lock();
        let meta_tmp = self.path.with_extension("json.part");
        let meta_bytes = serde_json::to_vec_pretty(&meta).map_err(|e| FirmwareError::Io {
            path: meta_tmp.clone(),
            source: std::io::Error::other(e),
        })?;
        let written = fs::File::create(&meta_tmp)
            .and_then(|mut f| f.write_all(&meta_bytes).and_then(|_| f.sync_all()));
        if let Err(e) = written {
            let _ = fs::remove_file(&meta_tmp);
            return Err(FirmwareError::Io {
                path: meta_tmp,
                source: e,
            });
        }
        let bin = dir.join(format!("{}.bin", self.name));
        let json = dir.join(format!("{}.json", self.name));
        // The image first: between the renames the old metadata names a
        // file of another size, which a restart skips rather than serving a
        // mismatch.
        fs::rename(&self.path, &bin).map_err(io_err(&bin))?;
        fs::rename(&meta_tmp, &json).map_err(io_err(&json))?;
        sync_dir(dir)?;
        if let Some(c) = g.cache.remove(&self.name) {
            g.cached_bytes -= c.bytes.len();
        }
        g.images.insert(self.name.clone(), meta.clone());
        Ok(meta)
    }
}

impl Drop for Upload<'_> {
    fn drop(&mut self) {
        // Unfinished or refused: nothing of it stays.
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(self.path.with_extension("json.part"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> FirmwareStore {
        FirmwareStore::open(dir, 1 << 20, 3000).unwrap()
    }

    fn image(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    #[test]
    fn upload_list_read_replace_remove_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let img = image(2000, 1);
        let sum = hex(&openssl::sha::sha256(&img));
        let mut u = s.begin("fw-a", "1.0.0", Some(&sum.to_uppercase())).unwrap();
        for c in img.chunks(300) {
            u.write(c).unwrap();
        }
        let m = u.finish().unwrap();
        assert_eq!(
            (m.size, m.sha256.as_str(), m.version.as_str()),
            (2000, sum.as_str(), "1.0.0")
        );
        assert_eq!(s.list(), vec![m.clone()]);
        let (b, h) = s.bytes("fw-a").unwrap();
        assert_eq!((&b[..], h.as_str()), (&img[..], sum.as_str()));
        // Replaced: readers get the new bytes.
        let img2 = image(1500, 2);
        let mut u = s.begin("fw-a", "1.0.1", None).unwrap();
        u.write(&img2).unwrap();
        u.finish().unwrap();
        assert_eq!(&s.bytes("fw-a").unwrap().0[..], &img2[..]);
        // Nothing temporary left; a reopened store lists the same.
        let names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
        let again = store(tmp.path());
        assert_eq!(again.list(), s.list());
        assert_eq!(again.meta("fw-a").unwrap().version, "1.0.1");
        assert!(again.remove("fw-a").unwrap());
        assert!(!again.remove("fw-a").unwrap());
        assert!(matches!(
            again.bytes("fw-a"),
            Err(FirmwareError::NotFound(_))
        ));
        assert!(store(tmp.path()).list().is_empty());
    }

    #[test]
    fn refusals_leave_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for bad in ["", ".hidden", "a/b", "../x", &"n".repeat(129), "sp ace"] {
            assert!(
                matches!(s.begin(bad, "", None), Err(FirmwareError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            s.begin("x", "", Some("abc")),
            Err(FirmwareError::BadChecksum(_))
        ));
        assert!(matches!(
            s.begin("x", "v\n1", None),
            Err(FirmwareError::BadVersion)
        ));
        // Wrong checksum.
        let mut u = s.begin("x", "", Some(&"0".repeat(64))).unwrap();
        u.write(b"data").unwrap();
        assert!(matches!(u.finish(), Err(FirmwareError::Mismatch { .. })));
        // Too large (1 MiB limit).
        let mut u = s.begin("big", "", None).unwrap();
        u.write(&vec![0; 1 << 20]).unwrap();
        assert!(matches!(u.write(&[0]), Err(FirmwareError::TooLarge(_))));
        drop(u);
        // Empty.
        assert!(matches!(
            s.begin("e", "", None).unwrap().finish(),
            Err(FirmwareError::Empty)
        ));
        // Abandoned mid-way.
        let mut u = s.begin("half", "", None).unwrap();
        u.write(b"abc").unwrap();
        drop(u);
        assert!(s.list().is_empty());
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn torn_or_foreign_files_are_skipped_and_the_cache_is_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for (i, n) in ["a", "b", "c"].iter().enumerate() {
            let mut u = s.begin(n, "", None).unwrap();
            u.write(&image(1200, i as u8)).unwrap();
            u.finish().unwrap();
        }
        // 3 x 1200 bytes over a 3000-byte cache: the least recently used
        // leaves, the others stay shared.
        let a = s.bytes("a").unwrap().0;
        let _ = s.bytes("b").unwrap();
        let _ = s.bytes("a").unwrap();
        let _ = s.bytes("c").unwrap();
        {
            let g = s.lock();
            assert!(g.cached_bytes <= 3000);
            assert!(g.cache.contains_key("a") && g.cache.contains_key("c"));
            assert!(!g.cache.contains_key("b"));
        }
        assert!(Arc::ptr_eq(&a, &s.bytes("a").unwrap().0));
        // A torn file (size differs from its metadata), a leftover part,
        // garbage metadata: skipped or removed at open.
        fs::write(tmp.path().join("b.bin"), b"short").unwrap();
        fs::write(tmp.path().join(".c.1.2.part"), b"x").unwrap();
        fs::write(tmp.path().join("d.json"), b"{").unwrap();
        let again = store(tmp.path());
        let names: Vec<String> = again.list().into_iter().map(|m| m.name).collect();
        assert_eq!(names, vec!["a", "c"]);
        assert!(!tmp.path().join(".c.1.2.part").exists());
        // A file changed under the store is refused, not served.
        fs::write(tmp.path().join("c.bin"), image(1200, 9)).unwrap();
        assert!(matches!(
            again.bytes("c"),
            Err(FirmwareError::Mismatch { .. })
        ));
    }
}

//! [`StatCache`]: `(device, inode) -> (size, mtime, ctime, digest)`, so that unchanged
//! files (external datasets and weights, and the store's own objects) are never rehashed.
//!
//! Soundness rules:
//! - A record is used only if size, mtime and ctime (all in nanoseconds) still match.
//!   ctime cannot be set by user space, so `touch -d` tricks or tools that restore mtimes
//!   after editing do not fool it.
//! - A file whose mtime or ctime is within the *racy window* (default 2 s) of the moment it
//!   was hashed is not recorded: file timestamps come from a coarse clock, so a write in
//!   the same tick right after we hashed would leave them unchanged (git's "racy clean"
//!   problem). Such files are simply hashed again next time.
//! - The file is stat'ed before and after hashing; if it changed meanwhile it is hashed again.
//! - mtimes only ever *skip* work; they never enter a key or a digest.
//! - `paranoid` bypasses lookups (everything is rehashed), but still records.
//!
//! On disk it is one compact binary file (`<root>/v1/statcache.bin`): an 8-byte magic, a
//! u64 count and 72-byte little-endian records (dev, ino, size, mtime_ns, ctime_ns,
//! digest). It is loaded once and saved atomically (write to temp + rename), merged with
//! whatever another process saved meanwhile. A missing, truncated or foreign file is an
//! empty cache: losing it costs only rehashing.

use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foldhash::{HashMap, HashMapExt};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash::{self, Tree};

const MAGIC: &[u8; 8] = b"PLSTAT01";
const RECORD: usize = 72;
/// Records kept on save; beyond this, records not used by this process are dropped.
const MAX_RECORDS: usize = 500_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    digest: Digest,
}

/// A file identity plus the fields that must not have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    /// From raw `statx` fields: the device number, the inode, the size and `(seconds,
    /// nanoseconds)` of mtime and ctime.
    pub(crate) fn from_parts(
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, u32),
        ctime: (i64, u32),
    ) -> Stamp {
        Stamp {
            dev,
            ino,
            size,
            mtime_ns: mtime.0 * 1_000_000_000 + i64::from(mtime.1),
            ctime_ns: ctime.0 * 1_000_000_000 + i64::from(ctime.1),
        }
    }

    /// The file size it records.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn of(m: &Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// The stat cache. Cheap to share between threads.
#[derive(Debug)]
pub struct StatCache {
    file: Option<PathBuf>,
    /// Records and whether this process used them (read-locked on the hot path).
    map: RwLock<HashMap<(u64, u64), (Rec, AtomicBool)>>,
    dirty: AtomicBool,
    paranoid: bool,
    racy_window_ns: i64,
    hashed: AtomicU64,
    hits: AtomicU64,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl StatCache {
    /// A cache that lives only in memory.
    #[must_use]
    pub fn in_memory() -> StatCache {
        StatCache {
            file: None,
            map: RwLock::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            paranoid: false,
            racy_window_ns: 2_000_000_000,
            hashed: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// Loads the cache persisted at `file` (an unreadable or malformed file gives an empty
    /// cache); [`StatCache::save`] writes it back.
    #[must_use]
    pub fn load(file: &Path) -> StatCache {
        let mut c = StatCache::in_memory();
        c.file = Some(file.to_path_buf());
        let loaded = read_records(file);
        c.map = RwLock::new(
            loaded
                .into_iter()
                .map(|(k, r)| (k, (r, AtomicBool::new(false))))
                .collect(),
        );
        c
    }

    /// Bypass lookups: every file is hashed again (records are still written).
    pub fn set_paranoid(&mut self, paranoid: bool) {
        self.paranoid = paranoid;
    }

    /// Files modified less than `window` before they were hashed are not recorded (see the
    /// module docs). Tests shorten it; `Duration::ZERO` disables the guard.
    pub fn set_racy_window(&mut self, window: Duration) {
        self.racy_window_ns = window.as_nanos() as i64;
    }

    /// How many files this cache has hashed (misses).
    #[must_use]
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// How many lookups were answered without hashing.
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The recorded digest of a file with this metadata, if still valid.
    pub(crate) fn get(&self, meta: &Metadata) -> Option<Digest> {
        self.get_stamp(&Stamp::of(meta))
    }

    /// [`StatCache::get`] for a stamp taken by other means ([`crate::rel`]).
    pub(crate) fn get_stamp(&self, s: &Stamp) -> Option<Digest> {
        if self.paranoid {
            return None;
        }
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        let (rec, used) = map.get(&(s.dev, s.ino))?;
        if rec.size == s.size && rec.mtime_ns == s.mtime_ns && rec.ctime_ns == s.ctime_ns {
            used.store(true, Ordering::Relaxed);
            self.hits.fetch_add(1, Ordering::Relaxed);
            Some(rec.digest)
        } else {
            None
        }
    }

    /// Records `digest` for a file whose metadata was `meta` when hashing started at
    /// `hashed_at_ns` (unless it is racy).
    pub(crate) fn put(&self, meta: &Metadata, digest: Digest, hashed_at_ns: i64) {
        let s = Stamp::of(meta);
        if s.mtime_ns.max(s.ctime_ns) > hashed_at_ns - self.racy_window_ns {
            return;
        }
        let rec = Rec {
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
            digest,
        };
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        map.insert((s.dev, s.ino), (rec, AtomicBool::new(true)));
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Digest and size of a file, through the cache.
    ///
    /// # Errors
    /// The file cannot be read, or it kept changing while being hashed.
    pub fn file_digest(&self, path: &Path) -> Result<(Digest, u64)> {
        let stat = |p: &Path| {
            fs::metadata(p).map_err(|e| Error::Io {
                what: "cannot stat",
                path: p.to_path_buf(),
                source: e,
            })
        };
        let mut before = stat(path)?;
        if let Some(d) = self.get(&before) {
            return Ok((d, before.size()));
        }
        // A file being written while we hash it is retried a few times, then reported:
        // a digest of a half-written file must never be recorded.
        for _ in 0..3 {
            let started = now_ns();
            let (digest, size) = hash::hash_file(path)?;
            self.hashed.fetch_add(1, Ordering::Relaxed);
            let after = stat(path)?;
            if Stamp::of(&before) == Stamp::of(&after) && size == after.size() {
                self.put(&after, digest, started);
                return Ok((digest, size));
            }
            before = after;
        }
        Err(Error::Io {
            what: "file kept changing while it was hashed:",
            path: path.to_path_buf(),
            source: std::io::Error::other("concurrent modification"),
        })
    }

    /// Digest of a file (its content digest) or a directory (its tree digest, see
    /// [`crate::hash`]), following symlinks: this is how external inputs are keyed, and a
    /// stage reads what links point to.
    ///
    /// # Errors
    /// Unreadable paths, special files, non-UTF-8 names.
    pub fn digest_path(&self, path: &Path) -> Result<Digest> {
        let meta = fs::metadata(path).map_err(|e| Error::Io {
            what: "cannot read",
            path: path.to_path_buf(),
            source: e,
        })?;
        if meta.is_dir() {
            Ok(self.tree(path)?.digest)
        } else {
            Ok(self.file_digest(path)?.0)
        }
    }

    /// Hashes a directory tree through the cache, following symlinks.
    ///
    /// # Errors
    /// As [`StatCache::digest_path`].
    pub fn tree(&self, dir: &Path) -> Result<Tree> {
        hash::hash_tree_with(dir, Some(self), true)
    }

    /// Writes the cache back (if anything changed), merged with the file's current content.
    ///
    /// # Errors
    /// The cache file cannot be written.
    pub fn save(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return Ok(());
        }
        let ours: Vec<((u64, u64), (Rec, bool))> = {
            let map = self.map.read().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .map(|(k, (r, used))| (*k, (*r, used.load(Ordering::Relaxed))))
                .collect()
        };
        let mut merged: HashMap<(u64, u64), (Rec, bool)> = read_records(file)
            .into_iter()
            .map(|(k, r)| (k, (r, false)))
            .collect();
        merged.extend(ours);
        if merged.len() > MAX_RECORDS {
            merged.retain(|_, (_, used)| *used);
        }
        let mut buf = Vec::with_capacity(16 + merged.len() * RECORD);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(merged.len() as u64).to_le_bytes());
        for ((dev, ino), (r, _)) in &merged {
            buf.extend_from_slice(&dev.to_le_bytes());
            buf.extend_from_slice(&ino.to_le_bytes());
            buf.extend_from_slice(&r.size.to_le_bytes());
            buf.extend_from_slice(&r.mtime_ns.to_le_bytes());
            buf.extend_from_slice(&r.ctime_ns.to_le_bytes());
            buf.extend_from_slice(r.digest.as_bytes());
        }
        let root = file.parent().unwrap_or(file);
        fsutil::write_atomic(root, file, &buf, false)
    }
}

impl Drop for StatCache {
    fn drop(&mut self) {
        // Best effort: a failed save only costs rehashing next time.
        let _ = self.save();
    }
}

fn read_records(file: &Path) -> Vec<((u64, u64), Rec)> {
    let Ok(bytes) = fs::read(file) else {
        return Vec::new();
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Vec::new();
    }
    let n = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let body = &bytes[16..];
    if body.len() != n.saturating_mul(RECORD) {
        return Vec::new();
    }
    let u = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    body.chunks_exact(RECORD)
        .map(|r| {
            let digest = Digest(r[40..72].try_into().expect("32 bytes"));
            let rec = Rec {
                size: u(&r[16..24]),
                mtime_ns: u(&r[24..32]) as i64,
                ctime_ns: u(&r[32..40]) as i64,
                digest,
            };
            ((u(&r[0..8]), u(&r[8..16])), rec)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_avoids_rehash_and_change_is_seen() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"one").unwrap();
        let mut c = StatCache::in_memory();
        c.set_racy_window(Duration::ZERO);
        assert_eq!(c.file_digest(&f).unwrap().0, Digest::of_bytes(b"one"));
        assert_eq!(c.file_digest(&f).unwrap().0, Digest::of_bytes(b"one"));
        assert_eq!((c.hashed(), c.hits()), (1, 1));
        fs::write(&f, b"two").unwrap();
        assert_eq!(c.file_digest(&f).unwrap().0, Digest::of_bytes(b"two"));
        assert_eq!(c.hashed(), 2);
        c.set_paranoid(true);
        c.file_digest(&f).unwrap();
        assert_eq!(c.hashed(), 3);
    }

    #[test]
    fn racy_files_are_not_recorded() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"fresh").unwrap();
        let c = StatCache::in_memory(); // default 2 s window: the file was just written
        c.file_digest(&f).unwrap();
        c.file_digest(&f).unwrap();
        assert_eq!(c.hashed(), 2);
    }

    #[test]
    fn persists_across_loads_and_ignores_garbage() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"data").unwrap();
        let db = t.path().join("stat.bin");
        {
            let mut c = StatCache::load(&db);
            c.set_racy_window(Duration::ZERO);
            c.file_digest(&f).unwrap();
            c.save().unwrap();
        }
        let c = StatCache::load(&db);
        c.file_digest(&f).unwrap();
        assert_eq!((c.hashed(), c.hits()), (0, 1));
        fs::write(&db, b"PLSTAT01garbage").unwrap();
        let c = StatCache::load(&db);
        c.file_digest(&f).unwrap();
        assert_eq!(c.hashed(), 1);
    }
}

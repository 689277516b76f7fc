//! [`Cache`]: opening the store, lookups, and materializing output trees.
//!
//! Verification policy (cheap but sound):
//! - `lookup` reads one manifest and `stat`s every object it lists: a missing object or a
//!   wrong size is a miss (the entry is removed). No content is hashed, so a no-op rerun of
//!   1000 stages costs 1000 small reads plus stats.
//! - `materialize` checks content. Building a tree directory verifies every object's
//!   blake3 against the manifest before linking it. An existing tree directory is checked
//!   the first time a process uses it: sizes always, content through the stat cache (a file
//!   written to after it was recorded has a new ctime and is rehashed) — so any modification
//!   through the filesystem is caught; media bit rot under unchanged metadata is caught only
//!   with `paranoid` (which rehashes everything every time).
//! - A mismatch is [`Error::Corrupt`]: the bad object, the tree built from it and the entry
//!   are removed, and the engine reruns the stage. Bad data is never handed to a stage.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use foldhash::{HashSet, HashSetExt};
use rayon::prelude::*;

use crate::digest::{Digest, Key};
use crate::error::{Error, MISSING, Result};
use crate::fsutil;
use crate::hash::{self, NodeKind, Tree};
use crate::manifest::{Entry, Lookup, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, MissReason};
use crate::rel::{DirFd, Parsed};
use crate::stat_cache::StatCache;

/// Name of the versioned layout directory; bump on any incompatible layout change (old
/// layouts are then simply ignored, as uv does with its bucket versions).
pub const LAYOUT_VERSION: &str = "v1";

/// Options of [`Cache::open_with`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Rehash everything: bypass the stat cache and re-verify trees on every materialize.
    pub paranoid: bool,
    /// fsync objects, the manifest and its directory on commit, for durability across a
    /// power loss or kernel crash. Off by default: see "Durability" in the crate docs; the
    /// default is on when the environment sets `PIPELINE_FSYNC=1` ([`FSYNC_ENV`]).
    pub fsync: bool,
    /// How often a lock holder refreshes its heartbeat.
    pub heartbeat: Duration,
    /// A lock whose heartbeat is older than `stale_after × heartbeat` is broken.
    pub stale_after: u32,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            paranoid: false,
            fsync: fsync_from_env(),
            heartbeat: Duration::from_secs(5),
            stale_after: 6,
        }
    }
}

/// The environment variable that turns fsync on for [`CacheOptions::default`]: `1`, `true`,
/// `yes` or `on` (any case) mean on, anything else (or unset) off.
pub const FSYNC_ENV: &str = "PIPELINE_FSYNC";

fn fsync_from_env() -> bool {
    std::env::var(FSYNC_ENV).is_ok_and(|v| parse_flag(&v))
}

fn parse_flag(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The content-addressed store. `Sync`: share one per process across threads.
#[derive(Debug)]
pub struct Cache {
    pub(crate) root: PathBuf,
    pub(crate) v: PathBuf,
    pub(crate) opts: CacheOptions,
    pub(crate) stat: StatCache,
    pub(crate) host: String,
    /// Trees whose content this process has verified.
    verified_trees: Mutex<HashSet<Digest>>,
    /// Objects whose content this process hashed itself (committed or verified).
    pub(crate) verified_objects: Mutex<HashSet<Digest>>,
    /// The process's shared gc flock and the number of threads using it.
    gc_lock: Mutex<(Option<File>, usize)>,
    /// Removes emptied staging directories in the background (see [`fsutil::Reaper`]).
    pub(crate) reaper: fsutil::Reaper,
    /// Empty directories recycled between stages (see [`fsutil::Spares`]).
    pub(crate) spares: fsutil::Spares,
    /// The heartbeat thread of this process's leases.
    pub(crate) beats: crate::lock::Heartbeats,
    /// `v1/`, open, for the lookups' relative reads and stats ([`crate::rel`]).
    pub(crate) vfd: DirFd,
}

/// A hold on the shared gc lock; the last one in the process releases the flock.
pub(crate) struct GcShared<'a>(&'a Mutex<(Option<File>, usize)>);

impl Drop for GcShared<'_> {
    fn drop(&mut self) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.1 -= 1;
        if g.1 == 0 {
            // Closing the file releases the flock.
            g.0 = None;
        }
    }
}

const SUBDIRS: [&str; 7] = [
    "objects",
    "entries",
    "refs",
    "tmp",
    "locks",
    "checkpoints",
    "trees",
];

impl Cache {
    /// Opens (creating if needed) the store at `root` with default options.
    ///
    /// # Errors
    /// The directory cannot be created or written ("cache directory `...` is not writable").
    pub fn open(root: &Path) -> Result<Cache> {
        Cache::open_with(root, CacheOptions::default())
    }

    /// Opens the store with options.
    ///
    /// # Errors
    /// As [`Cache::open`].
    pub fn open_with(root: &Path, opts: CacheOptions) -> Result<Cache> {
        let root =
            std::path::absolute(root).map_err(|e| Error::io(root, root, "cannot resolve", e))?;
        let v = root.join(LAYOUT_VERSION);
        for d in SUBDIRS {
            fsutil::mkdirs(&root, &v.join(d))?;
        }
        // Existing directories can still be read-only: probe once so the error comes now,
        // with a clear message, rather than in the middle of a commit.
        let probe = v.join("tmp").join(fsutil::unique_name(".probe"));
        File::create(&probe).map_err(|e| Error::io(&root, &probe, "cannot write", e))?;
        let _ = fs::remove_file(&probe);
        let vfd = DirFd::open(&v).map_err(|e| Error::io(&root, &v, "cannot open", e))?;
        let mut stat = StatCache::load(&v.join("statcache.bin"));
        stat.set_paranoid(opts.paranoid);
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        Ok(Cache {
            root,
            v,
            opts,
            stat,
            host,
            verified_trees: Mutex::new(HashSet::new()),
            verified_objects: Mutex::new(HashSet::new()),
            gc_lock: Mutex::new((None, 0)),
            reaper: fsutil::Reaper::default(),
            spares: fsutil::Spares::default(),
            beats: crate::lock::Heartbeats::default(),
            vfd,
        })
    }

    /// The root given to `open` (absolute).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The stat cache (for external inputs).
    #[must_use]
    pub fn stat_cache(&self) -> &StatCache {
        &self.stat
    }

    /// Mutable access to the stat cache (e.g. to change its racy window in tests).
    pub fn stat_cache_mut(&mut self) -> &mut StatCache {
        &mut self.stat
    }

    /// Content digest of an external file or directory, through the stat cache.
    ///
    /// # Errors
    /// Unreadable path.
    pub fn digest_path(&self, path: &Path) -> Result<Digest> {
        self.stat.digest_path(path)
    }

    /// Digest and size of a file through the stat cache, like
    /// [`StatCache::file_digest`], with files inside the store (`<root>/v1/...`) `stat`ed
    /// relative to it ([`crate::rel`]): what a kind's restore uses to compare a materialized
    /// output with its copy in the recipe directory.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn file_digest(&self, path: &Path) -> Result<(Digest, u64)> {
        if let Some(rel) = self.in_store(path)
            && let Ok(stamp) = self.vfd.stamp(rel)
            && let Some(d) = self.stat.get_stamp(&stamp)
        {
            return Ok((d, stamp.size()));
        }
        self.stat.file_digest(path)
    }

    /// [`Cache::file_digest`] for the file `rel` in the open directory `dir` (whose path
    /// joined with `rel` is `path`, used if the stat cache must hash the file): the `stat`
    /// is relative to `dir`, so the kernel does not walk `path` from the root (the restore
    /// of a hit's outputs into the recipe directory makes one per output file).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn file_digest_at(&self, dir: &DirFd, rel: &Path, path: &Path) -> Result<(Digest, u64)> {
        if let Ok(stamp) = dir.stamp(rel)
            && let Some(d) = self.stat.get_stamp(&stamp)
        {
            return Ok((d, stamp.size()));
        }
        self.stat.file_digest(path)
    }

    /// Persists the stat cache now (also done on drop).
    ///
    /// # Errors
    /// The stat cache file cannot be written.
    pub fn save_stat_cache(&self) -> Result<()> {
        self.stat.save()
    }

    pub(crate) fn object_path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.under(&["objects", &hex[..2], &hex])
    }

    /// `objects/<aa>/<digest>`, relative to `v1/` (for [`DirFd`]'s calls).
    pub(crate) fn object_rel(d: &Digest) -> PathBuf {
        let hex = d.hex();
        let mut s = String::with_capacity(8 + 3 + hex.len());
        for part in ["objects/", &hex[..2], "/", &hex] {
            s.push_str(part);
        }
        PathBuf::from(s)
    }

    pub(crate) fn entry_dir(&self, key: &Key) -> PathBuf {
        self.under(&["entries", &key.hex()])
    }

    pub(crate) fn tree_dir(&self, d: &Digest) -> PathBuf {
        self.under(&["trees", &d.hex()])
    }

    /// `<root>/v1/<parts...>`, built in one allocation: these paths are made several times
    /// per stage on a no-op rerun, where `join` chains (each a new buffer, grown) showed up
    /// in profiles.
    fn under(&self, parts: &[&str]) -> PathBuf {
        let v = self.v.as_os_str();
        let len = v.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        let mut s = std::ffi::OsString::with_capacity(len);
        s.push(v);
        for p in parts {
            s.push("/");
            s.push(p);
        }
        PathBuf::from(s)
    }

    /// `path` relative to `v1/`, if it lies under it, for [`DirFd`]'s calls. A byte prefix
    /// test: `Path::strip_prefix` parses both paths into components, which cost more than
    /// the kernel's path walk it is meant to save. The relative path names the same file
    /// as `path` (even with `..` or symlinks after the prefix, which resolve the same way
    /// from the directory).
    pub(crate) fn in_store<'p>(&self, path: &'p Path) -> Option<&'p Path> {
        use std::os::unix::ffi::OsStrExt;
        let rest = path
            .as_os_str()
            .as_bytes()
            .strip_prefix(self.v.as_os_str().as_bytes())?
            .strip_prefix(b"/")?;
        (!rest.is_empty()).then(|| Path::new(std::ffi::OsStr::from_bytes(rest)))
    }

    pub(crate) fn io(&self, path: &Path, what: &'static str, e: std::io::Error) -> Error {
        Error::io(&self.root, path, what, e)
    }

    /// Takes the shared side of the gc lock: commits and tree builds hold it so that a
    /// concurrent `gc` never deletes objects that a manifest is about to reference. The
    /// flock is taken once per process and reference-counted across threads (an `open` +
    /// `flock` per commit is measurable on a slow filesystem); `gc` uses its own file
    /// description, so it conflicts with this one even inside the same process.
    pub(crate) fn gc_shared(&self) -> Result<GcShared<'_>> {
        let mut g = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 == 0 {
            let p = self.v.join("gc.lock");
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(|e| self.io(&p, "cannot open", e))?;
            f.lock_shared().map_err(|e| self.io(&p, "cannot lock", e))?;
            g.0 = Some(f);
        }
        g.1 += 1;
        Ok(GcShared(&self.gc_lock))
    }

    /// Looks up a committed entry: `Some` only if its manifest parses and every object
    /// exists with the right size. A bad entry is removed and reported as `None`; use
    /// [`Cache::probe`] to learn why.
    ///
    /// # Errors
    /// Only environment failures while removing a bad entry.
    pub fn lookup(&self, key: &Key) -> Result<Option<Entry>> {
        Ok(match self.probe(key)? {
            Lookup::Hit(e) => Some(*e),
            Lookup::Miss(_) => None,
        })
    }

    /// Like [`Cache::lookup`], with the reason for a miss.
    ///
    /// # Errors
    /// Only environment failures while removing a bad entry.
    pub fn probe(&self, key: &Key) -> Result<Lookup> {
        self.probe_with(key, true, true)
    }

    /// Like [`Cache::probe`], for callers that only use a hit's outputs and timings (a
    /// run's or a plan's lookups): the manifest's `inputs` record is skipped, not parsed,
    /// and is `Null` in the returned entry. Building that JSON value and dropping it again
    /// was about a third of the instructions of a no-op rerun of 1000 stages.
    ///
    /// # Errors
    /// As [`Cache::probe`].
    pub fn probe_outputs(&self, key: &Key) -> Result<Lookup> {
        self.probe_with(key, false, true)
    }

    /// Like [`Cache::probe_outputs`], without the object checks: for a caller that
    /// [`Cache::materialize`]s every output of a hit before anything uses it (a run's hits,
    /// which restore their outputs). `materialize` checks every file it hands out against
    /// the manifest (size and, through the stat cache, content) and rebuilds a bad tree from
    /// verified objects, so a missing or corrupt object still ends as [`Error::Corrupt`] and
    /// a rerun, and the object `stat`s here would repeat its work (two syscalls of every
    /// hit of a no-op rerun of one-file stages).
    ///
    /// # Errors
    /// As [`Cache::probe`].
    pub fn probe_to_materialize(&self, key: &Key) -> Result<Lookup> {
        self.probe_with(key, false, false)
    }

    fn probe_with(&self, key: &Key, inputs: bool, objects: bool) -> Result<Lookup> {
        let hex = key.hex();
        let dir = self.under(&["entries", &hex]);
        let mpath = || dir.join(MANIFEST_FILE);
        let mut rel = String::with_capacity(8 + hex.len() + 1 + MANIFEST_FILE.len());
        for part in ["entries/", &hex, "/", MANIFEST_FILE] {
            rel.push_str(part);
        }
        let parse = |bytes: &[u8]| Manifest::decode(bytes, inputs);
        let read = self
            .vfd
            .read_parsed(Path::new(&rel), |bytes| parse(bytes).ok());
        let parsed = match read {
            Ok(Parsed::Value(m)) => Ok(m),
            Ok(Parsed::Bytes(bytes)) => parse(&bytes),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                return Ok(Lookup::Miss(MissReason::NotFound));
            }
            Err(e) => {
                // Unreadable (permissions, I/O error): degrade to a rerun, keep the entry.
                return Ok(Lookup::Miss(MissReason::BadManifest {
                    path: mpath(),
                    detail: e.to_string(),
                }));
            }
        };
        let manifest: Manifest = match parsed {
            Ok(m) => m,
            Err(detail) => {
                return self.reject(
                    key,
                    MissReason::BadManifest {
                        path: mpath(),
                        detail,
                    },
                );
            }
        };
        if manifest.key != *key || manifest.format != MANIFEST_FORMAT {
            let detail = format!("records key {} format {}", manifest.key, manifest.format);
            return self.reject(
                key,
                MissReason::BadManifest {
                    path: mpath(),
                    detail,
                },
            );
        }
        if !objects {
            return Ok(Lookup::Hit(Box::new(Entry {
                key: *key,
                dir,
                manifest,
            })));
        }
        let files: Vec<(Digest, u64)> = manifest
            .outputs
            .values()
            .flat_map(Tree::files)
            .filter_map(|e| Some((e.digest?, e.size)))
            .collect();
        let check = |(d, size): &(Digest, u64)| -> Option<MissReason> {
            match self.vfd.size(&Self::object_rel(d)) {
                Ok(n) if n == *size => None,
                Ok(n) => Some(MissReason::Corrupt {
                    detail: format!("size {n} but manifest says {size}"),
                    path: self.object_path(d),
                }),
                Err(_) => Some(MissReason::MissingObject {
                    path: self.object_path(d),
                }),
            }
        };
        // Stats are cheap; parallelism only pays for big listings.
        let bad = if files.len() > 256 {
            files.par_iter().find_map_any(check)
        } else {
            files.iter().find_map(check)
        };
        if let Some(reason) = bad {
            if let MissReason::Corrupt { path, .. } = &reason {
                let _ = fs::remove_file(path);
            }
            return self.reject(key, reason);
        }
        Ok(Lookup::Hit(Box::new(Entry {
            key: *key,
            dir,
            manifest,
        })))
    }

    fn reject(&self, key: &Key, reason: MissReason) -> Result<Lookup> {
        self.remove_entry(key)?;
        Ok(Lookup::Miss(reason))
    }

    /// Removes an entry (its manifest first, so a half-removed entry is never a hit).
    ///
    /// # Errors
    /// The entry directory cannot be removed.
    pub fn remove_entry(&self, key: &Key) -> Result<()> {
        let dir = self.entry_dir(key);
        match fs::remove_file(dir.join(MANIFEST_FILE)) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {}
            Err(e) => return Err(self.io(&dir, "cannot remove", e)),
        }
        fsutil::remove_tree(&self.root, &dir)
    }

    /// The scratch directory where a running stage keeps its checkpoints; it survives
    /// interruption (so a rerun resumes) and is removed when the key commits.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn checkpoint_dir(&self, key: &Key) -> Result<PathBuf> {
        let d = self.v.join("checkpoints").join(key.to_hex());
        // A spare can only land on a missing or empty directory, so a previous attempt's
        // checkpoints are never replaced.
        if !self.spares.take(&d) {
            fsutil::mkdirs(&self.root, &d)?;
        }
        Ok(d)
    }

    /// A read-only directory holding output `output` of `entry`:
    /// `<root>/v1/trees/<tree-digest>/`, built atomically from the objects (hardlinks where
    /// possible) and verified as described in the module docs.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if an object is missing or has the wrong content (the entry is
    /// removed: treat it as a miss); environment failures.
    pub fn materialize(&self, entry: &Entry, output: &str) -> Result<PathBuf> {
        let tree = entry
            .manifest
            .outputs
            .get(output)
            .ok_or_else(|| Error::NoSuchOutput {
                key: entry.key,
                output: output.to_owned(),
            })?;
        let dir = self.tree_dir(&tree.digest);
        let known = self
            .verified_trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&tree.digest);
        // A tree that lists files is checked file by file, and a missing directory shows
        // as a missing file (then it is built like a bad one): no separate `stat` of the
        // directory, which was one of the syscalls of every hit.
        let has_files = tree.files().next().is_some();
        let res = if !has_files && !dir.is_dir() {
            self.build_tree(&dir, tree)
        } else {
            match self.verify_tree(&dir, tree, known && !self.opts.paranoid) {
                // A bad tree file may be a stale link to an object that a later commit has
                // since replaced (a corrupt object is rewritten by the rerun of its stage,
                // under a new inode): rebuild the tree from the objects, which verifies
                // them, instead of condemning a good entry.
                Err(Error::Corrupt { .. }) => {
                    fsutil::remove_tree(&self.root, &dir)?;
                    self.build_tree(&dir, tree)
                }
                other => other,
            }
        };
        match res {
            Ok(()) => {
                self.verified_trees
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(tree.digest);
                Ok(dir)
            }
            Err(e @ Error::Corrupt { .. }) => {
                self.verified_trees
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&tree.digest);
                fsutil::remove_tree(&self.root, &dir)?;
                self.remove_entry(&entry.key)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Records that this process has verified (or itself written) tree `digest`.
    pub(crate) fn mark_tree_verified(&self, digest: Digest) {
        self.verified_trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
    }

    /// Checks a file against its recorded digest: stat cache, or this process's own hash,
    /// or a fresh hash. On mismatch the file is removed and `Corrupt` returned.
    fn verify_file(&self, path: &Path, want: &Digest, size: u64, object: &Path) -> Result<()> {
        let corrupt = |detail: String| {
            let _ = fs::remove_file(object);
            Err(Error::Corrupt {
                path: object.to_path_buf(),
                detail,
            })
        };
        let known = !self.opts.paranoid
            && self
                .verified_objects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(want);
        // Store files are `stat`ed relative to `v1/` ([`crate::rel`]).
        let rel = self.in_store(path);
        if known {
            let len = match rel {
                Some(rel) => self.vfd.size(rel),
                None => fs::metadata(path).map(|m| m.len()),
            };
            return match len {
                Ok(n) if n == size => Ok(()),
                Ok(n) => corrupt(format!("size {n} but manifest says {size}")),
                Err(e) if e.kind() == ErrorKind::NotFound => corrupt(MISSING.into()),
                Err(e) => Err(self.io(path, "cannot stat", e)),
            };
        }
        // One `stat`, and a hash only when the stat cache's record is stale; the size is
        // that stat's (or the hashed length), so no second `stat`.
        let recorded = match rel.map(|rel| self.vfd.stamp(rel)) {
            Some(Ok(stamp)) => self.stat.get_stamp(&stamp).map(|d| (d, stamp.size())),
            Some(Err(e)) if e.kind() == ErrorKind::NotFound => return corrupt(MISSING.into()),
            Some(Err(e)) => return Err(self.io(path, "cannot stat", e)),
            None => None,
        };
        let found = match recorded {
            Some(found) => Ok(found),
            None => self.stat.file_digest(path),
        };
        let (got, got_size) = match found {
            Ok(d) => d,
            Err(Error::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                return corrupt(MISSING.into());
            }
            Err(e) => return Err(e),
        };
        if got_size != size {
            return corrupt(format!("size {got_size} but manifest says {size}"));
        }
        if got != *want {
            return corrupt(format!("content hash {got} but manifest says {want}"));
        }
        self.verified_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*want);
        Ok(())
    }

    fn verify_tree(&self, dir: &Path, tree: &Tree, sizes_only: bool) -> Result<()> {
        let files: Vec<_> = tree.files().collect();
        fsutil::try_each(&files, |e| {
            let want = e.digest.unwrap_or(Digest([0; 32]));
            let p = dir.join(&e.path);
            if sizes_only {
                match fs::metadata(&p) {
                    Ok(m) if m.len() == e.size => Ok(()),
                    _ => Err(Error::Corrupt {
                        path: p,
                        detail: "missing or wrong size".into(),
                    }),
                }
            } else {
                // Only the tree file is condemned here: it may be a stale link to an object
                // that has since been replaced. `materialize` then rebuilds the tree from the
                // objects, and that verifies (and removes) a bad object.
                self.verify_file(&p, &want, e.size, &p)
            }
        })
    }

    fn build_tree(&self, dest: &Path, tree: &Tree) -> Result<()> {
        let _gc = self.gc_shared()?;
        let tmp = self.v.join("tmp").join(fsutil::unique_name(&format!(
            "tree-{}",
            tree.digest.to_hex()
        )));
        let res = self
            .fill_tree(&tmp, tree)
            .and_then(|()| match fs::rename(&tmp, dest) {
                Ok(()) => Ok(()),
                // Another thread or process built the same tree first: theirs is as good.
                Err(e)
                    if dest.is_dir()
                        || matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) =>
                {
                    fsutil::remove_tree(&self.root, &tmp)
                }
                Err(e) => Err(self.io(dest, "cannot rename into", e)),
            });
        if res.is_err() {
            let _ = fsutil::remove_tree(&self.root, &tmp);
        }
        res?;
        let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o555));
        Ok(())
    }

    fn fill_tree(&self, tmp: &Path, tree: &Tree) -> Result<()> {
        fsutil::mkdirs(&self.root, tmp)?;
        for e in tree.entries.iter().filter(|e| e.kind == NodeKind::Dir) {
            fsutil::mkdirs(&self.root, &tmp.join(&e.path))?;
        }
        fsutil::try_each(&tree.entries, |e| -> Result<()> {
            let dst = tmp.join(&e.path);
            match e.kind {
                NodeKind::Dir => Ok(()),
                NodeKind::Symlink => {
                    let target = e.target.as_deref().unwrap_or("");
                    std::os::unix::fs::symlink(target, &dst)
                        .map_err(|err| self.io(&dst, "cannot create symlink", err))
                }
                NodeKind::File => {
                    let want = e.digest.unwrap_or(Digest([0; 32]));
                    let obj = self.object_path(&want);
                    self.verify_file(&obj, &want, e.size, &obj)?;
                    // Objects are stored read-only and without the exec bit; an executable
                    // file gets its own copy so the shared object keeps its mode.
                    if !e.is_exec() && fs::hard_link(&obj, &dst).is_ok() {
                        return Ok(());
                    }
                    fs::copy(&obj, &dst).map_err(|err| self.io(&dst, "cannot copy to", err))?;
                    let mode = if e.is_exec() { 0o555 } else { 0o444 };
                    fs::set_permissions(&dst, fs::Permissions::from_mode(mode))
                        .map_err(|err| self.io(&dst, "cannot chmod", err))
                }
            }
        })?;
        // Read-only directories, deepest first (the root is done after the rename, which
        // needs it writable).
        let mut dirs: Vec<&str> = tree
            .entries
            .iter()
            .filter(|e| e.kind == NodeKind::Dir)
            .map(|e| e.path.as_str())
            .collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for d in dirs {
            let p = tmp.join(d);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o555))
                .map_err(|err| self.io(&p, "cannot chmod", err))?;
        }
        Ok(())
    }

    /// Hashes a directory tree with the store's stat cache (symlinks as link text, as for
    /// outputs).
    ///
    /// # Errors
    /// As [`hash::hash_tree`].
    pub fn hash_output_tree(&self, dir: &Path) -> Result<Tree> {
        hash::hash_tree_with(dir, Some(&self.stat), false)
    }
}

#[cfg(test)]
mod fsync_flag_tests {
    use super::parse_flag;

    #[test]
    fn fsync_flag_values() {
        for on in ["1", "true", "YES", " on "] {
            assert!(parse_flag(on), "{on:?}");
        }
        for off in ["", "0", "false", "no", "off", "2"] {
            assert!(!parse_flag(off), "{off:?}");
        }
    }
}

#[cfg(test)]
mod in_store_tests {
    use super::*;

    #[test]
    fn only_paths_under_v1_are_made_relative() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(t.path()).unwrap();
        let v = c.root().join(LAYOUT_VERSION);
        let obj = v.join("objects/ab/cd");
        assert_eq!(c.in_store(&obj), Some(Path::new("objects/ab/cd")));
        assert_eq!(c.in_store(&v), None);
        let sibling = c.root().join("v1x/objects");
        assert_eq!(c.in_store(&sibling), None);
        assert_eq!(c.in_store(Path::new("/elsewhere/v1/objects")), None);
        // What a relative path names is what the absolute one names.
        std::fs::write(v.join("tmp/f"), b"abc").unwrap();
        let f = v.join("tmp/f");
        let rel = c.in_store(&f).unwrap();
        let rel = rel.to_str().unwrap();
        assert_eq!(crate::rel::tests::read_all(&c.vfd, rel).unwrap(), b"abc");
    }
}

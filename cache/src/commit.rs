//! The commit protocol: [`Staging`] directories and [`Cache::commit`].
//!
//! 1. `stage_dir(key, outputs)` makes `tmp/stage-<key>.<pid>.<n>/` with `out/<name>/` per
//!    output; the stage writes there (and its log to `log.txt` beside `out/`).
//! 2. `commit` takes the shared gc lock and hashes every output file (rayon for many files).
//! 3. Each file becomes its object `objects/<aa>/<digest>` by a hard link (same filesystem
//!    by construction), after it is made read-only (and fsync'ed, when
//!    `CacheOptions::fsync` is on), so an object that exists is complete. An object that
//!    already exists with the right size is not touched (dedup).
//! 4. Each staged output directory, its subdirectories made read-only, is renamed to its
//!    tree `trees/<tree-digest>/`: the tree is the staged directory itself, its files the
//!    objects' inodes, exactly what `materialize` would build from the objects, without
//!    building it. If the tree exists already, the staged copy is discarded.
//! 5. `manifest.msgpack` is written into the staging directory, which (holding the log and
//!    the manifest, `out/` moved away) is renamed to `entries/<key>/`. That rename is the
//!    commit: a crash at any earlier point leaves no `entries/<key>/manifest.msgpack`, hence no
//!    entry; what it leaves (objects and trees nothing references, a staging dir) is garbage
//!    for `gc`, never wrong data. With fsync on, the manifest and the staging directory
//!    are synced before the rename and `entries/` after it. If `entries/<key>/` exists
//!    already (debris of an older attempt, or a concurrent commit of the same key after a
//!    broken lease), the manifest replaces the one there atomically (temp + rename), and
//!    the log moves in beside it.
//! 6. The (empty) checkpoint directory and the emptied `out/` are kept as spare
//!    directories for the next stage (see `fsutil::Spares`).
//!
//! Why this shape: on a journaled filesystem every directory or file *created* (and every
//! one removed) is a metadata transaction, and on a busy VM disk each costs 0.1-0.5 ms,
//! while renames and hard links of existing inodes are several times cheaper. A trivial
//! stage used to create and remove about twenty inodes (staging skeleton, a tree built
//! next to it from the objects, an entry directory, temp files); this protocol reuses the
//! staged inodes for the tree and the entry and recycles the transient directories.
//!
//! fsync is off by default (see "Durability" in the crate docs): crash (SIGKILL) safety
//! rests on the steps' order and the atomic renames, not on fsync. Even with fsync on,
//! object links are not followed by an fsync of `objects/<aa>/`: if a power loss undoes
//! one, `lookup` finds the object missing and reports a miss, which is sound.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::Key;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash::{self, NodeKind, Tree};
use crate::manifest::{CommitMeta, Entry, MANIFEST_FILE, MANIFEST_FORMAT, Manifest};
use crate::store::Cache;

/// A staging area for one attempt at a key. Dropping it without committing removes it.
#[derive(Debug)]
pub struct Staging {
    key: Key,
    dir: PathBuf,
    outputs: Vec<String>,
    keep: bool,
}

impl Staging {
    /// The key being computed.
    #[must_use]
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The directory the stage writes output `name` into.
    ///
    /// # Panics
    /// Never for a name passed to `stage_dir`; other names are a caller bug.
    #[must_use]
    pub fn output(&self, name: &str) -> PathBuf {
        assert!(
            self.outputs.iter().any(|o| o == name),
            "BUG: output `{name}` was not declared to stage_dir"
        );
        self.dir.join("out").join(name)
    }

    /// Output names, as declared.
    #[must_use]
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Where the stage's log goes; it is kept in the entry as `log.txt`.
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log.txt")
    }

    /// The staging directory itself.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            // Best effort: leftovers are collected by gc.
            let _ = fsutil::remove_tree(Path::new("/"), &self.dir);
        }
    }
}

/// A point in [`Cache::commit`] where a test can simulate a crash.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After hashing, before any object is moved.
    AfterHash,
    /// After objects are in place, before the entry directory exists.
    AfterObjects,
    /// After the outputs became trees, before the manifest is written (the name is from
    /// an older protocol that moved the log at this point).
    AfterLog,
    /// After the manifest is written into the staging directory, before the rename that
    /// makes it the entry.
    BeforeManifestRename,
}

impl Cache {
    /// Creates a staging directory for `key` with one empty directory per output.
    ///
    /// # Errors
    /// Invalid output names; the cache is not writable.
    pub fn stage_dir(&self, key: &Key, outputs: &[&str]) -> Result<Staging> {
        let dir = self
            .v
            .join("tmp")
            .join(fsutil::unique_name(&format!("stage-{}", key.to_hex())));
        let mut staging = Staging {
            key: *key,
            dir,
            outputs: Vec::new(),
            keep: false,
        };
        // Plain `create_dir` calls in order: `create_dir_all` probes from the leaf down,
        // which costs failed syscalls on every call.
        let mkdir =
            |p: &Path| fs::create_dir(p).map_err(|e| self.io(p, "cannot create directory", e));
        mkdir(&staging.dir)?;
        let out = staging.dir.join("out");
        if !self.spares.take(&out) {
            mkdir(&out)?;
        }
        for name in outputs {
            let dir = fsutil::safe_join(&out, "output", name, false)?;
            mkdir(&dir)?;
            staging.outputs.push((*name).to_owned());
        }
        Ok(staging)
    }

    /// Commits a staging directory as the entry for its key (see the module docs).
    ///
    /// # Errors
    /// Unreadable outputs, special files or non-UTF-8 names in an output; a cache that is
    /// not writable or a full disk. On error no entry exists.
    pub fn commit(&self, staging: Staging, meta: CommitMeta) -> Result<Entry> {
        self.commit_until(staging, meta, None)
    }

    /// [`Cache::commit`], stopping (as if the process died) at `crash`. For tests.
    #[doc(hidden)]
    pub fn commit_until(
        &self,
        mut staging: Staging,
        meta: CommitMeta,
        crash: Option<CrashPoint>,
    ) -> Result<Entry> {
        let finished = SystemTime::now();
        let _gc = self.gc_shared()?;
        let key = staging.key;

        // 1. Hash every output file, in parallel across all outputs.
        let mut walked = Vec::new();
        for name in &staging.outputs {
            let dir = staging.dir.join("out").join(name);
            walked.push((name.clone(), hash::walk(&dir, false)?));
        }
        let counts: Vec<usize> = walked.iter().map(|(_, w)| w.len()).collect();
        let all: Vec<hash::Walked> = walked.into_iter().flat_map(|(_, w)| w).collect();
        let all = hash::hash_walked(all, None)?;
        if crash == Some(CrashPoint::AfterHash) {
            staging.keep = true;
            return Err(simulated());
        }

        // 2. Objects: hard links to the staged files.
        let files: Vec<&hash::Walked> = all
            .iter()
            .filter(|w| w.entry.kind == NodeKind::File)
            .collect();
        fsutil::try_each(&files, |w| self.store_object(w))?;
        if crash == Some(CrashPoint::AfterObjects) {
            staging.keep = true;
            return Err(simulated());
        }

        let mut outputs = std::collections::BTreeMap::new();
        let mut it = all.into_iter();
        for (name, n) in staging.outputs.iter().zip(counts) {
            let entries = it.by_ref().take(n).map(|w| w.entry).collect();
            outputs.insert(name.clone(), Tree::from_entries(entries));
        }

        // 3. Trees: each staged output directory becomes its tree.
        let out = staging.dir.join("out");
        for (name, tree) in &outputs {
            self.adopt_tree(&out.join(name), tree)?;
        }
        let tmp = self.v.join("tmp");
        if !self.spares.give(&tmp, &out) {
            // Not empty: the stage left files beside its declared outputs.
            fsutil::remove_tree(&self.root, &out)?;
        }
        if crash == Some(CrashPoint::AfterLog) {
            staging.keep = true;
            return Err(simulated());
        }

        // 4. The manifest, then the staging directory becomes the entry.
        let ms = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            key,
            kind: meta.kind,
            stage: meta.stage,
            experiment: meta.experiment,
            inputs: meta.inputs,
            outputs,
            started_ms: ms(meta.started),
            finished_ms: ms(finished),
            duration_ms: ms(finished).saturating_sub(ms(meta.started)),
            host: self.host.clone(),
        };
        let edir = self.entry_dir(&key);
        let bytes = manifest.encode().map_err(|source| Error::Parse {
            path: edir.join(MANIFEST_FILE),
            source,
        })?;
        let staged_manifest = staging.dir.join(MANIFEST_FILE);
        fsutil::write_new(&self.root, &staged_manifest, &bytes, self.opts.fsync)?;
        if crash == Some(CrashPoint::BeforeManifestRename) {
            staging.keep = true;
            return Err(simulated());
        }
        if self.opts.fsync {
            fsutil::sync_dir(&self.root, &staging.dir)?;
        }
        match fs::rename(&staging.dir, &edir) {
            Ok(()) => {
                staging.keep = true;
                if self.opts.fsync {
                    fsutil::sync_dir(&self.root, &self.v.join("entries"))?;
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
                self.commit_into_existing(&staging, &edir, &bytes)?;
                let trash = tmp.join(fsutil::unique_name("trash"));
                if fs::rename(&staging.dir, &trash).is_ok() {
                    staging.keep = true;
                    self.reaper.remove_later(trash);
                }
            }
            Err(e) => return Err(self.io(&edir, "cannot rename into", e)),
        }
        drop(staging);

        // 5. The checkpoint dir is named by the key alone and a new attempt at the key could
        // recreate it, so it goes now; empty (the usual case), it is kept as a spare.
        let ckpt = self.v.join("checkpoints").join(key.to_hex());
        if !self.spares.give(&tmp, &ckpt) && fs::remove_dir(&ckpt).is_err() {
            let _ = fsutil::remove_tree(&self.root, &ckpt);
        }
        Ok(Entry {
            key,
            dir: edir,
            manifest,
        })
    }

    /// The commit when `entries/<key>/` already exists: the log moves in and the manifest
    /// replaces any there atomically (commits of one key are idempotent).
    fn commit_into_existing(&self, staging: &Staging, edir: &Path, bytes: &[u8]) -> Result<()> {
        let log = staging.log_path();
        if log.exists() {
            let dst = edir.join("log.txt");
            fs::rename(&log, &dst).map_err(|e| self.io(&dst, "cannot move log to", e))?;
        }
        fsutil::write_atomic(
            &self.root,
            &edir.join(MANIFEST_FILE),
            bytes,
            self.opts.fsync,
        )
    }

    /// Turns the staged output directory `staged` (already hashed into `tree`, its files
    /// stored as objects) into `trees/<digest>/` by a rename, read-only like a tree built by
    /// `materialize`. If that tree exists already, the staged copy is discarded.
    fn adopt_tree(&self, staged: &Path, tree: &Tree) -> Result<()> {
        let dest = self.tree_dir(&tree.digest);
        let discard = |dir: &Path| {
            let trash = self.v.join("tmp").join(fsutil::unique_name("trash"));
            match fs::rename(dir, &trash) {
                Ok(()) => {
                    self.reaper.remove_later(trash);
                    Ok(())
                }
                Err(_) => fsutil::remove_tree(&self.root, dir),
            }
        };
        if dest.is_dir() {
            return discard(staged);
        }
        // Subdirectories read-only, deepest first; the root after the rename, which needs it
        // writable (moving a directory rewrites its `..`).
        let mut dirs: Vec<&str> = tree
            .entries
            .iter()
            .filter(|e| e.kind == NodeKind::Dir)
            .map(|e| e.path.as_str())
            .collect();
        dirs.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for d in dirs {
            let p = staged.join(d);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o555))
                .map_err(|e| self.io(&p, "cannot chmod", e))?;
        }
        match fs::rename(staged, &dest) {
            Ok(()) => {
                let _ = fs::set_permissions(&dest, fs::Permissions::from_mode(0o555));
                // Every file in it was hashed by this commit.
                self.mark_tree_verified(tree.digest);
                Ok(())
            }
            // Another thread or process made the same tree first: theirs is as good.
            Err(e)
                if dest.is_dir()
                    || matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) =>
            {
                discard(staged)
            }
            Err(e) => Err(self.io(&dest, "cannot rename into", e)),
        }
    }

    /// Makes the staged file `w` available as its object. The staged file stays in the
    /// staged tree (which becomes the output's tree); normally it *is* the object (a hard
    /// link), read-only.
    fn store_object(&self, w: &hash::Walked) -> Result<()> {
        let digest = w.entry.digest.expect("hash_walked fills file digests");
        let obj = self.object_path(&digest);
        let exists = match fs::metadata(&obj) {
            Ok(m) if m.len() == w.entry.size => true,
            Ok(_) => {
                // A wrong-size object is corrupt; replace it.
                let _ = fs::remove_file(&obj);
                false
            }
            Err(_) => false,
        };
        // Objects never carry the exec bit; an executable output keeps its own inode in the
        // tree and its object is a copy.
        let exec = w.entry.is_exec();
        let mode = fs::Permissions::from_mode(if exec { 0o555 } else { 0o444 });
        // A staged file with other hard links (e.g. a shell stage that ran `ln data out/`)
        // shares its inode with a file outside the cache: chmod'ing it or linking it into
        // the store would let the user's later edits corrupt the object and the tree. It is
        // replaced by a copy first, re-hashed, since the original may have changed.
        if w.meta.as_ref().is_some_and(|m| m.nlink() > 1) {
            let own = self.v.join("tmp").join(fsutil::unique_name("own"));
            fs::copy(&w.abs, &own).map_err(|e| self.io(&own, "cannot copy to", e))?;
            if hash::hash_file(&own)?.0 != digest {
                let _ = fs::remove_file(&own);
                return Err(changed_while_committing(&w.abs));
            }
            fs::rename(&own, &w.abs).map_err(|e| {
                let _ = fs::remove_file(&own);
                self.io(&w.abs, "cannot rename into", e)
            })?;
        }
        fs::set_permissions(&w.abs, mode).map_err(|e| self.io(&w.abs, "cannot chmod", e))?;
        // An existing object of the right size is left alone (dedup); the tree keeps the
        // staged bytes, which this commit hashed.
        if !exists {
            if exec {
                self.copy_to_object(&w.abs, &digest, &obj)?;
            } else {
                if self.opts.fsync {
                    fs::File::open(&w.abs)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| self.io(&w.abs, "cannot sync", e))?;
                }
                self.link_object(&w.abs, &obj)?;
            }
        }
        // We hashed these bytes ourselves a moment ago: materializing them in this process
        // needs no second hash.
        self.verified_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
        Ok(())
    }

    /// `obj` becomes a hard link to `src`, creating its fan-out directory if needed. An
    /// object that appeared meanwhile (another committer) is as good as ours.
    fn link_object(&self, src: &Path, obj: &Path) -> Result<()> {
        let link = || match fs::hard_link(src, obj) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        };
        if let Err(e) = link() {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(self.io(obj, "cannot link object to", e));
            }
            let parent = obj.parent().expect("objects have a fan-out parent");
            fsutil::mkdirs(&self.root, parent)?;
            link().map_err(|e| self.io(obj, "cannot link object to", e))?;
        }
        Ok(())
    }

    /// Stores a read-only copy of `src` as object `obj`, re-hashing the copy.
    fn copy_to_object(&self, src: &Path, digest: &crate::Digest, obj: &Path) -> Result<()> {
        let copy = self.v.join("tmp").join(fsutil::unique_name("obj"));
        let res = (|| {
            fs::copy(src, &copy).map_err(|e| self.io(&copy, "cannot copy to", e))?;
            if hash::hash_file(&copy)?.0 != *digest {
                return Err(changed_while_committing(src));
            }
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o444))
                .map_err(|e| self.io(&copy, "cannot chmod", e))?;
            if self.opts.fsync {
                fs::File::open(&copy)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| self.io(&copy, "cannot sync", e))?;
            }
            self.link_object(&copy, obj)
        })();
        let _ = fs::remove_file(&copy);
        res
    }
}

fn changed_while_committing(path: &Path) -> Error {
    Error::Io {
        what: "output file changed while it was being committed:",
        path: path.to_path_buf(),
        source: std::io::Error::other("content differs from its hash"),
    }
}

fn simulated() -> Error {
    Error::Io {
        what: "simulated crash in",
        path: PathBuf::from("commit"),
        source: std::io::Error::other("crash point"),
    }
}

//! The commit protocol: [`Staging`] directories and [`Cache::commit`].
//!
//! 1. `stage_dir(key, outputs)` makes `tmp/stage-<key>.<pid>.<n>/` with `out/<name>/` per
//!    output; the stage writes there (and its log to `log.txt`).
//! 2. `commit` takes the shared gc lock, hashes every output file (rayon; through the stat
//!    cache), then moves each file into `objects/<aa>/<digest>` by `rename` (same
//!    filesystem by construction), skipping objects that already exist with the right size
//!    (dedup). New objects are made read-only (and fsync'ed, when `CacheOptions::fsync` is
//!    on) before the rename, so an object that exists is complete.
//! 3. The log moves into `entries/<key>/`, and `manifest.json` is written *last* (temp +
//!    rename, with an fsync of the file and of the directory when fsync is on). It is the
//!    commit marker: a crash at any earlier point leaves no manifest, hence no entry; what
//!    it leaves (objects without a manifest, a staging dir) is garbage for `gc`, never
//!    wrong data.
//! 4. The checkpoint directory is removed; the staging directory (by then only empty
//!    directories and deduplicated copies) is renamed to `tmp/trash.*` and removed on a
//!    background thread.
//!
//! fsync is off by default (see "Durability" in the crate docs): crash (SIGKILL) safety
//! rests on the steps' order and the atomic renames, not on fsync. Even with fsync on,
//! object renames are not followed by an fsync of `objects/<aa>/`: if a power loss undoes
//! one, `lookup` finds the object missing and reports a miss, which is sound.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::Key;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash::{self, NodeKind, Tree};
use crate::manifest::{CommitMeta, Entry, MANIFEST_FORMAT, Manifest};
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
    /// After the log moved into the entry directory, before the manifest.
    AfterLog,
    /// After the manifest temp file is written, before the rename.
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
        mkdir(&staging.dir.join("out"))?;
        for name in outputs {
            let out = fsutil::safe_join(&staging.dir.join("out"), "output", name, false)?;
            mkdir(&out)?;
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

        // 2. Move files into objects.
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

        // 3. Entry directory, log, then the manifest last.
        let edir = self.entry_dir(&key);
        fsutil::mkdirs(&self.root, &edir)?;
        let log = staging.log_path();
        if log.exists() {
            let dst = edir.join("log.txt");
            fs::rename(&log, &dst).map_err(|e| self.io(&dst, "cannot move log to", e))?;
        }
        if crash == Some(CrashPoint::AfterLog) {
            staging.keep = true;
            return Err(simulated());
        }
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
        let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Parse {
            path: edir.join("manifest.json"),
            source: e,
        })?;
        if crash == Some(CrashPoint::BeforeManifestRename) {
            let tmp = edir.join(fsutil::unique_name(".manifest.json.tmp"));
            fs::write(&tmp, &bytes).map_err(|e| self.io(&tmp, "cannot write", e))?;
            staging.keep = true;
            return Err(simulated());
        }
        fsutil::write_atomic(
            &self.root,
            &edir.join("manifest.json"),
            &bytes,
            self.opts.fsync,
        )?;

        // 4. Clean up; failures here leave garbage for gc, not a bad entry. The staging dir
        // leaves its place with one rename and the removal of its (emptied) tree goes to
        // the background reaper: several rmdirs off the critical path. The checkpoint dir
        // is named by the key alone and a new attempt at the key could recreate it, so it
        // goes now: usually empty, a single rmdir.
        let trash = self.v.join("tmp").join(fsutil::unique_name("trash"));
        if fs::rename(&staging.dir, &trash).is_ok() {
            staging.keep = true;
            self.reaper.remove_later(trash);
        }
        drop(staging); // removes it in place if the rename failed
        let ckpt = self.v.join("checkpoints").join(key.to_hex());
        if fs::remove_dir(&ckpt).is_err() {
            let _ = fsutil::remove_tree(&self.root, &ckpt);
        }
        Ok(Entry {
            key,
            dir: edir,
            manifest,
        })
    }

    fn store_object(&self, w: &hash::Walked) -> Result<()> {
        let digest = w.entry.digest.expect("hash_walked fills file digests");
        let obj = self.object_path(&digest);
        if let Ok(m) = fs::metadata(&obj) {
            if m.len() == w.entry.size {
                return Ok(()); // dedup: the staged copy goes away with the staging dir
            }
            // A wrong-size object is corrupt; replace it.
            let _ = fs::remove_file(&obj);
        }
        // A staged file with other hard links (e.g. a shell stage that ran `ln data out/`)
        // shares its inode with a file outside the cache: moving and chmod'ing it would
        // change the user's file, and the user's later edits would corrupt the object. It
        // is copied instead, and the copy re-hashed, since the original may have changed.
        let shared = w.meta.as_ref().is_some_and(|m| m.nlink() > 1);
        let src = if shared {
            let copy = self.v.join("tmp").join(fsutil::unique_name("obj"));
            fs::copy(&w.abs, &copy).map_err(|e| self.io(&copy, "cannot copy to", e))?;
            if hash::hash_file(&copy)?.0 != digest {
                let _ = fs::remove_file(&copy);
                return Err(Error::Io {
                    what: "output file changed while it was being committed:",
                    path: w.abs.clone(),
                    source: std::io::Error::other("content differs from its hash"),
                });
            }
            copy
        } else {
            w.abs.clone()
        };
        fs::set_permissions(&src, fs::Permissions::from_mode(0o444))
            .map_err(|e| self.io(&src, "cannot chmod", e))?;
        if self.opts.fsync {
            fs::File::open(&src)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.io(&src, "cannot sync", e))?;
        }
        let parent = obj.parent().expect("objects have a fan-out parent");
        if let Err(e) = fs::rename(&src, &obj) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(self.io(&obj, "cannot move object to", e));
            }
            fsutil::mkdirs(&self.root, parent)?;
            fs::rename(&src, &obj).map_err(|e| self.io(&obj, "cannot move object to", e))?;
        }
        // We hashed these bytes ourselves a moment ago: materializing them in this process
        // needs no second hash.
        self.verified_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
        Ok(())
    }
}

fn simulated() -> Error {
    Error::Io {
        what: "simulated crash in",
        path: PathBuf::from("commit"),
        source: std::io::Error::other("crash point"),
    }
}

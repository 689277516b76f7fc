//! Garbage collection: everything not reachable from a kept key goes.
//!
//! `gc(keep)` takes the gc lock exclusively (commits and tree builds hold it shared, so no
//! object is collected between being stored and being referenced by its manifest), then:
//! 0. removes the run memos (module `memo`: they vouch for entries this may remove);
//! 1. removes entries whose key is not kept and not locked (a locked key is being
//!    recomputed: its entry and references stay);
//! 2. removes objects and trees no remaining manifest references;
//! 3. removes checkpoint directories of keys neither kept nor locked;
//! 4. removes `tmp/` leftovers (staging dirs of keys not locked; any tree build, since none
//!    can be in flight while we hold the gc lock) and lock files nobody holds.
//!
//! Unparseable kept entries are removed too: they would be misses anyway.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::path::Path;

use crate::digest::{Digest, Key};
use crate::error::Result;
use crate::fsutil;
use crate::manifest::{MANIFEST_FILE, Manifest};
use crate::store::Cache;

/// What a gc removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Entries removed.
    pub entries: u64,
    /// Objects removed.
    pub objects: u64,
    /// Materialized trees removed.
    pub trees: u64,
    /// Checkpoint directories removed.
    pub checkpoints: u64,
    /// Temp leftovers removed.
    pub tmp: u64,
    /// Bytes freed (objects, checkpoints and temp files; trees share objects' inodes).
    pub bytes: u64,
    /// Entries, checkpoints or staging dirs skipped because their key was locked.
    pub skipped_locked: u64,
}

fn key_of(name: &str) -> Option<Key> {
    name.get(..64)?.parse().ok()
}

fn list(dir: &Path) -> Vec<(String, std::path::PathBuf)> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

impl Cache {
    /// Removes everything not reachable from `keep` (see the module docs).
    ///
    /// # Errors
    /// The cache is not writable.
    pub fn gc(&self, keep: &HashSet<Key>) -> Result<GcStats> {
        // This process's queued staging removals first, so they are not counted as debris.
        self.reaper.flush();
        let lock_path = self.v.join("gc.lock");
        let gc_lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(&lock_path, "cannot open", e))?;
        gc_lock
            .lock()
            .map_err(|e| self.io(&lock_path, "cannot lock", e))?;
        self.drop_all_memos()?;
        let mut stats = GcStats::default();
        let mut live_objects: HashSet<Digest> = HashSet::new();
        let mut live_trees: HashSet<Digest> = HashSet::new();

        for (name, path) in list(&self.v.join("entries")) {
            let Some(key) = key_of(&name) else {
                fsutil::remove_tree(&self.root, &path)?;
                continue;
            };
            let manifest: Option<Manifest> = fs::read(path.join(MANIFEST_FILE))
                .ok()
                .and_then(|b| Manifest::decode(&b, false).ok());
            // Hold the key's lock (if free) while deciding, so nobody commits it meanwhile.
            let hold = if keep.contains(&key) {
                Some(None)
            } else {
                self.try_hold(&key)
            };
            let live = match (&hold, keep.contains(&key)) {
                (None, _) => {
                    stats.skipped_locked += 1;
                    true
                }
                (Some(_), kept) => kept && manifest.is_some(),
            };
            match (&manifest, live) {
                (Some(m), true) => {
                    for t in m.outputs.values() {
                        live_trees.insert(t.digest);
                        live_objects.extend(t.files().filter_map(|e| e.digest));
                    }
                }
                (None, true) => {}
                (_, false) => {
                    self.remove_entry(&key)?;
                    stats.entries += 1;
                }
            }
        }

        for (_, fan) in list(&self.v.join("objects")) {
            for (name, path) in list(&fan) {
                if name
                    .parse::<Digest>()
                    .is_ok_and(|d| live_objects.contains(&d))
                {
                    continue;
                }
                stats.bytes += fs::symlink_metadata(&path).map_or(0, |m| m.len());
                fsutil::remove_tree(&self.root, &path)?;
                stats.objects += 1;
            }
        }

        for (name, path) in list(&self.v.join("trees")) {
            if name
                .parse::<Digest>()
                .is_ok_and(|d| live_trees.contains(&d))
            {
                continue;
            }
            fsutil::remove_tree(&self.root, &path)?;
            stats.trees += 1;
        }

        for (name, path) in list(&self.v.join("checkpoints")) {
            let key = key_of(&name);
            if key.is_some_and(|k| keep.contains(&k)) {
                continue;
            }
            if key.is_some_and(|k| self.try_hold(&k).is_none()) {
                stats.skipped_locked += 1;
                continue;
            }
            stats.bytes += fsutil::du(&path);
            fsutil::remove_tree(&self.root, &path)?;
            stats.checkpoints += 1;
        }

        for (name, path) in list(&self.v.join("tmp")) {
            let staged_key = name.strip_prefix("stage-").and_then(key_of);
            let _hold = match staged_key {
                Some(k) => match self.try_hold(&k) {
                    Some(h) => h,
                    None => {
                        stats.skipped_locked += 1;
                        continue;
                    }
                },
                None => None,
            };
            stats.bytes += fsutil::du(&path);
            fsutil::remove_tree(&self.root, &path)?;
            stats.tmp += 1;
        }

        // Lock files nobody holds (left by processes killed before they could unlink).
        for (name, _) in list(&self.v.join("locks")) {
            if let Some(k) = name.strip_suffix(".lock").and_then(key_of)
                && let Some(Some(_held)) = self.try_hold(&k)
            {
                let _ = fs::remove_file(self.v.join("locks").join(&name));
            }
        }
        Ok(stats)
    }
}

//! Refs (`refs/<experiment>/<stage>.json` → the last committed key, so `explain` can diff a
//! miss against the previous run) and the user-facing `runs/<experiment>/<stage>/<output>`
//! symlinks into materialized trees. Both are replaced atomically (temp + rename), so a
//! reader never sees a half-written ref or a missing link.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::digest::Key;
use crate::error::{Error, Result};
use crate::fsutil::{self, now_ms};
use crate::rel::Parsed;
use crate::store::Cache;

#[derive(serde::Serialize, serde::Deserialize)]
struct RefFile {
    key: Key,
    updated_ms: u64,
}

impl Cache {
    fn ref_path(&self, experiment: &str, stage: &str) -> Result<PathBuf> {
        let dir = fsutil::safe_join(&self.v.join("refs"), "experiment", experiment, false)?;
        let p = fsutil::safe_join(&dir, "stage", stage, true)?;
        // `<stage>.json`: appending to the joined path's last component.
        let mut s = p.into_os_string();
        s.push(".json");
        Ok(PathBuf::from(s))
    }

    /// Records `key` as the last committed key of `stage` in `experiment`.
    ///
    /// # Errors
    /// Unsafe names (empty, `..`, `/` in the experiment); the cache is not writable.
    pub fn set_ref(&self, experiment: &str, stage: &str, key: &Key) -> Result<()> {
        let p = self.ref_path(experiment, stage)?;
        fsutil::mkdirs(&self.root, p.parent().expect("ref paths have a parent"))?;
        let bytes = serde_json::to_vec(&RefFile {
            key: *key,
            updated_ms: now_ms(),
        })
        .map_err(|e| Error::Parse {
            path: p.clone(),
            source: e,
        })?;
        fsutil::write_atomic(&self.root, &p, &bytes, false)
    }

    /// Whether any stage of `experiment` has a ref: `false` lets a planner skip one
    /// [`Cache::get_ref`] per stage on a cache that never ran the experiment. Unsafe names
    /// have no refs.
    #[must_use]
    pub fn has_refs(&self, experiment: &str) -> bool {
        fsutil::safe_join(&self.v.join("refs"), "experiment", experiment, false)
            .is_ok_and(|dir| dir.is_dir())
    }

    /// The last committed key of `stage` in `experiment`, if any. An unreadable ref is
    /// treated as absent (it only feeds explanations).
    ///
    /// # Errors
    /// Unsafe names.
    pub fn get_ref(&self, experiment: &str, stage: &str) -> Result<Option<Key>> {
        // Relative to `v1/` ([`crate::rel`]); the names are checked as for `ref_path`.
        let dir = fsutil::safe_join(Path::new("refs"), "experiment", experiment, false)?;
        let mut rel = fsutil::safe_join(&dir, "stage", stage, true)?.into_os_string();
        rel.push(".json");
        let parse = |b: &[u8]| serde_json::from_slice::<RefFile>(b).ok().map(|r| r.key);
        Ok(match self.vfd.read_parsed(Path::new(&rel), parse) {
            Ok(Parsed::Value(key)) => Some(key),
            Ok(Parsed::Bytes(bytes)) => parse(&bytes),
            Err(_) => None,
        })
    }

    /// Points `<runs_root>/<experiment>/<stage>/<output>` at `target` (a materialized tree)
    /// with a symlink, replacing an older link atomically. Returns the link path.
    ///
    /// # Errors
    /// Unsafe names; the location holds a real file or directory (never clobbered); the
    /// runs directory is not writable.
    pub fn link_run(
        &self,
        runs_root: &Path,
        experiment: &str,
        stage: &str,
        output: &str,
        target: &Path,
    ) -> Result<PathBuf> {
        let dir = fsutil::safe_join(runs_root, "experiment", experiment, false)?;
        let dir = fsutil::safe_join(&dir, "stage", stage, true)?;
        let link = fsutil::safe_join(&dir, "output", output, false)?;
        match fs::symlink_metadata(&link) {
            Ok(m) if !m.file_type().is_symlink() => return Err(Error::LinkOccupied { path: link }),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::io_in(
                    "runs directory",
                    runs_root,
                    &link,
                    "cannot stat",
                    e,
                ));
            }
        }
        fs::create_dir_all(&dir).map_err(|e| {
            Error::io_in(
                "runs directory",
                runs_root,
                &dir,
                "cannot create directory",
                e,
            )
        })?;
        let tmp = dir.join(fsutil::unique_name(&format!(".{output}.link")));
        std::os::unix::fs::symlink(target, &tmp).map_err(|e| {
            Error::io_in(
                "runs directory",
                runs_root,
                &tmp,
                "cannot create symlink",
                e,
            )
        })?;
        fs::rename(&tmp, &link).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io_in("runs directory", runs_root, &link, "cannot rename into", e)
        })?;
        Ok(link)
    }
}

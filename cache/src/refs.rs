//! Refs (`refs/<experiment>/<stage>.key` → the last committed key, so `explain` can diff a
//! miss against the previous run) and the user-facing `runs/<experiment>/<stage>/<output>`
//! symlinks into materialized trees. Both are replaced atomically (temp + rename), so a
//! reader never sees a half-written ref or a missing link.
//!
//! A ref is a symbolic link whose text is the key (it points nowhere): reading it is one
//! `readlink`, where a file took an `open`, a `read` and a `close`, and every hit of a run
//! reads its stage's ref to see whether it must be moved. The key is written in URL-safe
//! base64 (43 characters), not hex (64): ext4 keeps a link text under 60 bytes inside the
//! inode, so the `readlink` reads no data block (about a third of its cost). (Refs of the
//! JSON format before, `<stage>.json`, are not read: such a stage explains its next miss as
//! never run.)

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::digest::{Digest, Key};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::store::Cache;

/// The suffix of a ref's name: `task.key` cannot collide with the directory `task/` that
/// holds the refs of the expansions `task/GQA`.
const REF_SUFFIX: &str = ".key";

impl Cache {
    /// `refs/<experiment>/<stage>.key` under `base` (`v1/`).
    fn ref_path(base: &Path, experiment: &str, stage: &str) -> Result<PathBuf> {
        let dir = fsutil::safe_join(&base.join("refs"), "experiment", experiment, false)?;
        let p = fsutil::safe_join(&dir, "stage", stage, true)?;
        // Appending to the joined path's last component.
        let mut s = p.into_os_string();
        s.push(REF_SUFFIX);
        Ok(PathBuf::from(s))
    }

    /// Records `key` as the last committed key of `stage` in `experiment`.
    ///
    /// # Errors
    /// Unsafe names (empty, `..`, `/` in the experiment); the cache is not writable.
    pub fn set_ref(&self, experiment: &str, stage: &str, key: &Key) -> Result<()> {
        let p = Self::ref_path(&self.v, experiment, stage)?;
        let dir = p.parent().expect("ref paths have a parent");
        fsutil::mkdirs(&self.root, dir)?;
        let tmp = dir.join(fsutil::unique_name(".ref.tmp"));
        std::os::unix::fs::symlink(URL_SAFE_NO_PAD.encode(key.as_bytes()), &tmp)
            .map_err(|e| self.io(&tmp, "cannot create symlink", e))?;
        fs::rename(&tmp, &p).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io(&p, "cannot rename into", e)
        })
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
        // Relative to `v1/` ([`crate::rel`]), the path built in one piece (the names checked
        // as for `set_ref`): this runs for every hit.
        fsutil::check_name("experiment", experiment, false)?;
        fsutil::check_name("stage", stage, true)?;
        let mut rel = String::with_capacity(6 + experiment.len() + stage.len() + REF_SUFFIX.len());
        for part in ["refs/", experiment, "/", stage, REF_SUFFIX] {
            rel.push_str(part);
        }
        let Ok(text) = self.vfd.read_link(Path::new(&rel)) else {
            return Ok(None);
        };
        // Room for any text that decodes to 32 bytes or a little more (then rejected).
        let mut buf = [0u8; 48];
        Ok(match URL_SAFE_NO_PAD.decode_slice(&text, &mut buf) {
            Ok(32) => buf[..32].try_into().ok().map(Digest),
            _ => None,
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

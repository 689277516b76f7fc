//! Small filesystem helpers shared by the store: atomic writes, unique temp names, fsync of
//! directories, and removal of read-only trees.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Below this many items we iterate sequentially: waking rayon's workers costs tens of
/// microseconds on an idle machine and milliseconds on a loaded one, more than a few small
/// file operations take (measured: a tiny commit went from ~10 ms to well under 1 ms on a
/// busy 2-core box).
pub(crate) const PAR_MIN: usize = 16;

/// `try_for_each` over `items`, in parallel only when there are at least [`PAR_MIN`].
pub(crate) fn try_each<T: Sync, E: Send>(
    items: &[T],
    f: impl Fn(&T) -> std::result::Result<(), E> + Sync + Send,
) -> std::result::Result<(), E> {
    use rayon::prelude::*;
    if items.len() < PAR_MIN {
        items.iter().try_for_each(f)
    } else {
        items.par_iter().try_for_each(f)
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique across processes and threads: `<prefix>.<pid>.<counter>.<nanos>`.
pub(crate) fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}.{}.{n}.{t}", std::process::id())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, optionally
/// fsync'ed, then renamed over `path`. Readers see the old or the new content, never a
/// prefix (the DVC failure mode of an empty lock file after SIGTERM).
pub(crate) fn write_atomic(root: &Path, path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(unique_name(&format!(".{name}.tmp")));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(root, &tmp, "cannot write", e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(root, path, "cannot rename into", e));
    }
    if sync {
        sync_dir(root, dir)?;
    }
    Ok(())
}

/// Writes `bytes` to a new file `path` (which must not exist), optionally fsync'ed. For
/// files inside a directory nobody else sees yet (a staging directory), where a temp file
/// and a rename would only cost one more inode.
pub(crate) fn write_new(root: &Path, path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(path);
        Error::io(root, path, "cannot write", e)
    })
}

/// fsyncs a directory so that renames into it survive a power loss.
pub(crate) fn sync_dir(root: &Path, dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(root, dir, "cannot sync", e))
}

/// `create_dir_all` with a classified error.
pub(crate) fn mkdirs(root: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(root, dir, "cannot create directory", e))
}

/// Removes a file or directory tree, first making read-only directories writable (trees in
/// the store are read-only; as a non-root user `remove_dir_all` fails on them). A path that
/// does not exist is not an error.
pub(crate) fn remove_tree(root: &Path, path: &Path) -> Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(root, path, "cannot stat", e)),
    };
    if !meta.is_dir() {
        return match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(root, path, "cannot remove", e))
            }
            _ => Ok(()),
        };
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            for d in walkdir::WalkDir::new(path).into_iter().flatten() {
                if d.file_type().is_dir() {
                    let _ = fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755));
                }
            }
            fs::remove_dir_all(path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(Error::io(root, path, "cannot remove", e))
                }
            })
        }
    }
}

/// Removes directory trees on a background thread, off the caller's critical path.
///
/// Removing a commit's emptied staging directory takes several directory removals, each a
/// journaled metadata operation: on a busy disk that is milliseconds per stage, paid while
/// the next stage waits. Nothing depends on the removal being done (a leftover is garbage
/// that `gc` collects), so it is handed to this thread. The thread starts on first use;
/// [`Reaper::flush`] waits for everything queued (gc calls it first, and dropping the
/// [`crate::Cache`] does, so a process's debris is gone by the time it exits normally).
#[derive(Debug, Default)]
pub(crate) struct Reaper {
    worker: std::sync::Mutex<Option<ReaperWorker>>,
}

#[derive(Debug)]
struct ReaperWorker {
    tx: std::sync::mpsc::Sender<PathBuf>,
    thread: std::thread::JoinHandle<()>,
}

impl Reaper {
    /// Queues `path` for removal (best effort, like the synchronous removal it replaces);
    /// removes it right away if no thread can be started.
    pub(crate) fn remove_later(&self, path: PathBuf) {
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
            let spawned = std::thread::Builder::new()
                .name("cache-reaper".into())
                .spawn(move || {
                    for p in rx {
                        let _ = remove_tree(Path::new("/"), &p);
                    }
                });
            match spawned {
                Ok(thread) => *worker = Some(ReaperWorker { tx, thread }),
                Err(_) => {
                    let _ = remove_tree(Path::new("/"), &path);
                    return;
                }
            }
        }
        if let Some(w) = worker.as_ref()
            && let Err(std::sync::mpsc::SendError(p)) = w.tx.send(path)
        {
            let _ = remove_tree(Path::new("/"), &p);
        }
    }

    /// Waits until every queued removal is done.
    pub(crate) fn flush(&self) {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(ReaperWorker { tx, thread }) = worker {
            drop(tx); // ends the thread's loop once the queue is drained
            let _ = thread.join();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Empty directories kept for reuse by this process.
///
/// Creating a directory and removing it are journaled metadata transactions (0.1-0.5 ms
/// each on a busy VM disk); renaming one is several times cheaper. Every stage needs two
/// short-lived directories (its checkpoint directory and its staging `out/`): instead of
/// `rmdir` after the commit and `mkdir` for the next stage, the empty directory is renamed
/// to `tmp/spare.*` and renamed into its next place. A spare that vanished (a concurrent
/// `gc` collects `tmp/`) is simply skipped; the caller then creates the directory as before.
/// Spares left by a killed process are ordinary `tmp/` garbage.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    dirs: std::sync::Mutex<Vec<PathBuf>>,
}

impl Spares {
    /// At most this many spares per process (a few per running stage is all that is reused).
    const MAX: usize = 32;

    /// Moves a spare directory to `dest`; `false` if there was none (or none usable), in
    /// which case the caller creates `dest` itself.
    pub(crate) fn take(&self, dest: &Path) -> bool {
        loop {
            let Some(spare) = self.dirs.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                return false;
            };
            match fs::rename(&spare, dest) {
                Ok(()) => return true,
                // Collected by a gc: forget it and try the next one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => {
                    // `dest` is in the way (an existing non-empty directory): keep the spare.
                    self.dirs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(spare);
                    return false;
                }
            }
        }
    }

    /// Keeps `dir` as a spare if it is an empty directory (moving it into `tmp`); `false`
    /// if it was not kept and is still there for the caller to remove.
    pub(crate) fn give(&self, tmp: &Path, dir: &Path) -> bool {
        if self.dirs.lock().unwrap_or_else(|p| p.into_inner()).len() >= Self::MAX {
            return false;
        }
        if !fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none()) {
            return false;
        }
        let spare = tmp.join(unique_name("spare"));
        if fs::rename(dir, &spare).is_err() {
            return false;
        }
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(spare);
        true
    }
}

impl Drop for Spares {
    fn drop(&mut self) {
        for d in self
            .dirs
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = fs::remove_dir(&d);
        }
    }
}

/// Total size of the files under `path` (for gc accounting); errors count as 0.
pub(crate) fn du(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Checks that `name` is one plain path component, or (`allow_slash`) several joined by
/// `/`: never empty, `.`, `..` or absolute, so that joining it stays under the base.
pub(crate) fn check_name(what: &'static str, name: &str, allow_slash: bool) -> Result<()> {
    let bad = |why| {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('\0') {
        return bad("it contains a NUL byte");
    }
    if !allow_slash && name.contains('/') {
        return bad("it contains `/`");
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return bad("it has an empty, `.` or `..` path component");
    }
    Ok(())
}

/// `path` relative-joined to `base` after checking each component is a plain name.
pub(crate) fn safe_join(
    base: &Path,
    what: &'static str,
    name: &str,
    allow_slash: bool,
) -> Result<PathBuf> {
    check_name(what, name, allow_slash)?;
    // One allocation, parts appended as `PathBuf::push` would append these plain names
    // (it was several reallocations per ref read of a no-op rerun).
    let mut out = base.as_os_str().to_owned();
    out.reserve(name.len() + 1);
    for part in name.split('/') {
        if !out.is_empty() && !out.as_encoded_bytes().ends_with(b"/") {
            out.push("/");
        }
        out.push(part);
    }
    Ok(PathBuf::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("m.json");
        write_atomic(t.path(), &p, b"one", true).unwrap();
        write_atomic(t.path(), &p, b"two", false).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn full_device_is_reported_as_no_space() {
        // /dev/full fails every write with ENOSPC: a real kernel error through our path.
        let Ok(mut f) = OpenOptions::new().write(true).open("/dev/full") else {
            return;
        };
        let e = f
            .write_all(&[0u8; 4096])
            .and_then(|()| f.flush())
            .unwrap_err();
        let err = Error::io(Path::new("/c"), Path::new("/dev/full"), "cannot write", e);
        assert_eq!(
            err.to_string(),
            "no space left on device while writing `/dev/full`"
        );
    }

    #[test]
    fn reaper_removes_queued_trees_by_flush() {
        let t = tempfile::tempdir().unwrap();
        let r = Reaper::default();
        let dirs: Vec<PathBuf> = (0..3).map(|i| t.path().join(format!("d{i}"))).collect();
        for d in &dirs {
            fs::create_dir_all(d.join("a/b")).unwrap();
            fs::write(d.join("a/f"), b"x").unwrap();
            r.remove_later(d.clone());
        }
        r.flush();
        assert!(dirs.iter().all(|d| !d.exists()));
        // Usable again after a flush (a new thread starts).
        fs::create_dir(t.path().join("again")).unwrap();
        r.remove_later(t.path().join("again"));
        drop(r);
        assert!(!t.path().join("again").exists());
    }

    #[test]
    fn safe_join_rejects_escapes() {
        let b = Path::new("/r");
        assert_eq!(
            safe_join(b, "stage", "a/b", true).unwrap(),
            Path::new("/r/a/b")
        );
        assert!(safe_join(b, "stage", "a/../b", true).is_err());
        assert!(safe_join(b, "experiment", "a/b", false).is_err());
        assert!(safe_join(b, "stage", "", true).is_err());
        assert!(safe_join(b, "stage", "/abs", true).is_err());
        // What `PathBuf::push` of each part gives, whatever the base.
        for base in ["", "/", "/r", "/r/", "rel", "rel/x/"] {
            let mut want = Path::new(base).to_path_buf();
            want.push("a");
            want.push("b.c");
            let got = safe_join(Path::new(base), "stage", "a/b.c", true).unwrap();
            assert_eq!(got.as_os_str(), want.as_os_str(), "base {base:?}");
        }
    }
}

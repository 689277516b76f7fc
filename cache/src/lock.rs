//! Per-key leases: two processes never compute the same key at once.
//!
//! `locks/<key>.lock` is both a `flock` and a record `{pid, host, heartbeat_ms}`:
//! - Mutual exclusion is the `flock` (the kernel drops it when the holder dies, so a killed
//!   run on this host never leaves a lock behind; fds are close-on-exec, so child processes
//!   of a stage cannot inherit it).
//! - The holder rewrites the record every `heartbeat`; one background thread per [`Cache`]
//!   does it for every lease the process holds (a thread per lease cost a spawn and a join
//!   on the critical path of every stage). A waiter
//!   that finds the flock held still breaks the lease if the record says the holder is dead
//!   (same host, `kill(pid, 0)` fails with `ESRCH`) or its heartbeat is older than
//!   `stale_after × heartbeat` (any host: covers hung NFS clients whose flock lingers).
//!   Breaking unlinks the file under a global `locks/.break` flock after re-checking that
//!   the same inode is still stale, so two breakers cannot remove a fresh lease.
//! - After taking the flock the holder checks the path still names its inode (it may have
//!   been unlinked by a release or a break in between) and retries otherwise.
//! - Release unlinks the file, then drops the flock.
//! - The waiter re-checks for a committed entry each poll, and once more after acquiring:
//!   the usual outcome for a second process is [`LockOutcome::Hit`].
//!
//! Breaking a live lease (e.g. a stopped process) at worst makes a key computed twice;
//! commits of the same key are idempotent, so that costs time, never correctness.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::digest::Key;
use crate::error::{Error, Result};
use crate::fsutil::now_ms;
use crate::manifest::Entry;
use crate::store::Cache;

/// The record inside a lock file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockHolder {
    /// Holder's process id.
    pub pid: u32,
    /// Holder's host name.
    pub host: String,
    /// Last heartbeat, ms since the Unix epoch.
    pub heartbeat_ms: u64,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on {}", self.pid, self.host)
    }
}

/// The result of [`Cache::lock`].
#[derive(Debug)]
pub enum LockOutcome {
    /// We hold the lease: compute, commit, then drop the guard.
    Acquired(LockGuard),
    /// Someone committed the key (possibly while we waited): use it.
    Hit(Box<Entry>),
}

/// A held lease; dropping it releases the lock.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    path: PathBuf,
    ino: u64,
    /// The heartbeat registry this lease is in, and its id there.
    beats: Arc<BeatShared>,
    id: u64,
    lost: Arc<AtomicBool>,
    broke: Option<LockHolder>,
}

impl LockGuard {
    /// Whether another process broke our lease (we stopped heartbeating for too long).
    /// Committing is still safe; it only means the key may be computed twice.
    #[must_use]
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// The stale holder whose lease we broke to get this one, if any.
    #[must_use]
    pub fn broke_stale(&self) -> Option<&LockHolder> {
        self.broke.as_ref()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Out of the registry first: the heartbeat thread writes only under its lock, so no
        // record is written after this.
        self.beats.lock().leases.remove(&self.id);
        // Unlink only if the path is still ours (a breaker may have replaced it).
        if fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
        let _ = self.file.unlock();
    }
}

/// The heartbeats of every lease a [`Cache`] holds, refreshed by one thread that starts
/// with the first lease and stops when the cache is dropped.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    shared: Arc<BeatShared>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Default)]
pub(crate) struct BeatShared {
    state: std::sync::Mutex<BeatState>,
    wake: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct BeatState {
    leases: std::collections::HashMap<u64, Beat>,
    next_id: u64,
    stop: bool,
}

/// One lease as the heartbeat thread sees it.
#[derive(Debug)]
struct Beat {
    file: File,
    path: PathBuf,
    ino: u64,
    lost: Arc<AtomicBool>,
}

impl BeatShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, BeatState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Heartbeats {
    /// Registers a lease. The thread (started by the first lease, with its `interval` and
    /// `record`, which are the same for every lease of one cache) rewrites the record of
    /// every registered lease each interval.
    fn add(
        &self,
        beat: Beat,
        interval: Duration,
        record: impl Fn() -> String + Send + 'static,
    ) -> std::io::Result<u64> {
        let id = {
            let mut st = self.shared.lock();
            st.next_id += 1;
            let id = st.next_id;
            st.leases.insert(id, beat);
            id
        };
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if thread.is_none() {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name("cache-heartbeat".into())
                .spawn(move || beat_loop(&shared, interval, &record));
            match spawned {
                Ok(t) => *thread = Some(t),
                Err(e) => {
                    self.shared.lock().leases.remove(&id);
                    return Err(e);
                }
            }
        }
        Ok(id)
    }
}

fn beat_loop(shared: &BeatShared, interval: Duration, record: &dyn Fn() -> String) {
    let mut st = shared.lock();
    loop {
        let deadline = Instant::now() + interval;
        // Sleep a full interval (spurious wake-ups included), unless told to stop.
        while !st.stop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = shared
                .wake
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if st.stop {
            return;
        }
        let now = record();
        for beat in st.leases.values() {
            let _ = write_record(&beat.file, &now);
            if !fs::metadata(&beat.path).is_ok_and(|m| m.ino() == beat.ino) {
                beat.lost.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

/// Overwrites the record in place. Only shrinks the file if a previous holder's record was
/// longer (a long host name).
fn write_record(f: &File, s: &str) -> std::io::Result<()> {
    f.write_all_at(s.as_bytes(), 0)?;
    if f.metadata()?.len() > s.len() as u64 {
        f.set_len(s.len() as u64)?;
    }
    Ok(())
}

/// Width of the lock record (padded with spaces).
const RECORD_WIDTH: usize = 256;

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks existence and permission; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    serde_json::from_str(s.trim_end_matches('\0').trim()).ok()
}

/// What a waiter is told each poll.
#[derive(Debug, Clone)]
pub struct Waiting<'a> {
    /// The key.
    pub key: &'a Key,
    /// The current holder, if its record was readable.
    pub holder: Option<&'a LockHolder>,
    /// How long we have waited so far.
    pub waited: Duration,
}

impl Cache {
    fn lock_path(&self, key: &Key) -> PathBuf {
        self.v.join("locks").join(format!("{}.lock", key.to_hex()))
    }

    /// Waits for the lease on `key` (no timeout, no progress report).
    ///
    /// # Errors
    /// The lock directory is not writable.
    pub fn lock(&self, key: &Key) -> Result<LockOutcome> {
        self.lock_with(key, None, &mut |_| {})
    }

    /// Waits for the lease on `key`, calling `on_wait` each poll while another process holds
    /// it, and failing with [`Error::LockTimeout`] after `timeout`.
    ///
    /// # Errors
    /// Timeout; the lock directory is not writable.
    pub fn lock_with(
        &self,
        key: &Key,
        timeout: Option<Duration>,
        on_wait: &mut dyn FnMut(&Waiting<'_>),
    ) -> Result<LockOutcome> {
        let path = self.lock_path(key);
        let start = Instant::now();
        let mut poll = Duration::from_millis(5);
        // The holder whose lease we broke, reported on the guard we then get.
        let mut broken: Option<LockHolder> = None;
        loop {
            if let Some(e) = self.lookup(key)? {
                return Ok(LockOutcome::Hit(Box::new(e)));
            }
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| self.io(&path, "cannot open lock", e))?;
            match file.try_lock() {
                Ok(()) => {
                    let ino = file
                        .metadata()
                        .map_err(|e| self.io(&path, "cannot stat", e))?
                        .ino();
                    if !fs::metadata(&path).is_ok_and(|m| m.ino() == ino) {
                        continue; // unlinked between our open and flock: retry on the new file
                    }
                    // A record left in an unlocked file is a holder that died without
                    // releasing (or a leaked lease we were told to break).
                    let broke = read_holder(&mut file).or(broken.take());
                    let guard = self.start_lease(file, path.clone(), ino, broke)?;
                    if let Some(e) = self.lookup(key)? {
                        return Ok(LockOutcome::Hit(Box::new(e)));
                    }
                    return Ok(LockOutcome::Acquired(guard));
                }
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(self.io(&path, "cannot lock", e)),
            }
            let holder = read_holder(&mut file);
            let mtime_ms = file
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            if self.is_stale(holder.as_ref(), mtime_ms) && self.break_lease(&path, &file)? {
                broken = holder;
                continue;
            }
            let waited = start.elapsed();
            on_wait(&Waiting {
                key,
                holder: holder.as_ref(),
                waited,
            });
            if let Some(t) = timeout
                && waited >= t
            {
                let holder =
                    holder.map_or_else(|| "an unknown process".to_owned(), |h| h.to_string());
                return Err(Error::LockTimeout {
                    key: *key,
                    holder,
                    waited_s: waited.as_secs_f64(),
                });
            }
            drop(file);
            std::thread::sleep(poll);
            poll = (poll * 2).min(Duration::from_millis(200));
        }
    }

    fn stale_ms(&self) -> u64 {
        (self.opts.heartbeat * self.opts.stale_after).as_millis() as u64
    }

    fn is_stale(&self, holder: Option<&LockHolder>, mtime_ms: u64) -> bool {
        let now = now_ms();
        match holder {
            Some(h) if h.host == self.host && !pid_alive(h.pid) => true,
            Some(h) => now.saturating_sub(h.heartbeat_ms) > self.stale_ms(),
            // Unreadable record (being written, or a holder that never wrote one): judge by
            // the file's mtime, which every heartbeat refreshes.
            None => now.saturating_sub(mtime_ms) > self.stale_ms(),
        }
    }

    /// Unlinks a stale lock file under the global break lock, after re-checking that the
    /// path still names the same inode and that it is still stale. Returns whether it did.
    fn break_lease(&self, path: &Path, seen: &File) -> Result<bool> {
        let guard_path = self.v.join("locks").join(".break");
        let guard = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&guard_path)
            .map_err(|e| self.io(&guard_path, "cannot open", e))?;
        guard
            .lock()
            .map_err(|e| self.io(&guard_path, "cannot lock", e))?;
        let seen_ino = seen
            .metadata()
            .map_err(|e| self.io(path, "cannot stat", e))?
            .ino();
        let Ok(mut now) = File::open(path) else {
            return Ok(true);
        };
        let m = now
            .metadata()
            .map_err(|e| self.io(path, "cannot stat", e))?;
        if m.ino() != seen_ino {
            return Ok(true); // someone else already broke or released it: just retry
        }
        let mtime_ms = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        if !self.is_stale(read_holder(&mut now).as_ref(), mtime_ms) {
            return Ok(false);
        }
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(self.io(path, "cannot remove stale lock", e)),
        }
    }

    fn start_lease(
        &self,
        file: File,
        path: PathBuf,
        ino: u64,
        broke: Option<LockHolder>,
    ) -> Result<LockGuard> {
        let record = {
            let pid = std::process::id();
            let host = self.host.clone();
            move || {
                let mut s = serde_json::to_string(&LockHolder {
                    pid,
                    host: host.clone(),
                    heartbeat_ms: now_ms(),
                })
                .unwrap_or_default();
                // Fixed width (JSON allows trailing spaces): each heartbeat overwrites the
                // whole previous record in place, so no reader sees a stale tail.
                while s.len() < RECORD_WIDTH - 1 {
                    s.push(' ');
                }
                s.push('\n');
                s
            }
        };
        write_record(&file, &record()).map_err(|e| self.io(&path, "cannot write lock", e))?;
        let lost = Arc::new(AtomicBool::new(false));
        let beat = Beat {
            file: file
                .try_clone()
                .map_err(|e| self.io(&path, "cannot clone lock handle", e))?,
            path: path.clone(),
            ino,
            lost: lost.clone(),
        };
        let id = self
            .beats
            .add(beat, self.opts.heartbeat, record)
            .map_err(|e| self.io(&path, "cannot start heartbeat thread for", e))?;
        Ok(LockGuard {
            file,
            path,
            ino,
            beats: self.beats.shared.clone(),
            id,
            lost,
            broke,
        })
    }

    /// Whether some process (or thread) currently holds the lease on `key`, without
    /// waiting. Used by gc; racy by nature, so callers hold [`Cache::try_hold`] instead when
    /// they act on the answer.
    pub(crate) fn try_hold(&self, key: &Key) -> Option<Option<File>> {
        let path = self.lock_path(key);
        let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
            return Some(None); // no lock file: nobody holds it
        };
        match file.try_lock() {
            Ok(()) => Some(Some(file)),
            Err(_) => None,
        }
    }
}

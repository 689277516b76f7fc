//! Running one stage on this machine: lease, staging, [`StageCtx`], commit, and the
//! bookkeeping shared with hits (ref, runs links, restore).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cache::{Cache, CommitMeta, DirFd, Entry, Key, LockOutcome, MissReason};

use super::keys;
use crate::events::{Event, Reporter};
use crate::key::{KeyManifest, RerunReason};
use crate::recipe::{Recipe, StageNode};
use crate::stage::{FileDigests, Progress, Resources, StageCtx, StageError, StageKind};

/// A stage the scheduler decided to compute.
pub(super) struct Job {
    pub idx: usize,
    pub kind: Arc<dyn StageKind>,
    pub key: Key,
    pub manifest: KeyManifest,
    /// The committed entry of each input, in `node.inputs` order.
    pub upstream: Vec<Arc<Entry>>,
    pub resources: Resources,
    /// Why it runs.
    pub reasons: Vec<RerunReason>,
    /// `--force`: recompute even though an entry exists.
    pub forced: bool,
}

/// How a job ended.
pub(super) enum Outcome {
    /// Computed and committed.
    Ran(Arc<Entry>),
    /// Another process committed the key while we waited for its lease.
    Hit(Arc<Entry>),
    /// Failed (no entry left) after this long; the message is one line.
    Failed(String, Duration),
    /// Stopped by the cancel flag (no entry left; checkpoints kept).
    Cancelled,
}

/// Where a job runs: everything shared by all jobs of a run.
pub(super) struct Env<'a> {
    pub recipe: &'a Recipe,
    pub cache: &'a Cache,
    pub reporter: &'a dyn Reporter,
    pub cancel: &'a Arc<AtomicBool>,
    pub runs_dir: Option<&'a Path>,
    pub dirs: Arc<OpenDirs>,
    pub memo: Arc<RunMemo>,
}

/// The experiment's run memo (`cache`'s `memo` module) as this run found it: hits whose
/// key it records skip their manifest read and their ref check. The file is removed the
/// first time this run moves a ref, and written anew when the run ends.
#[derive(Debug)]
pub(super) struct RunMemo {
    pub loaded: cache::Memo,
    dropped: AtomicBool,
}

impl RunMemo {
    pub fn new(loaded: cache::Memo) -> Self {
        Self {
            loaded,
            dropped: AtomicBool::new(false),
        }
    }

    /// Called before a ref of `experiment` moves: the memo may vouch for the old one.
    fn before_ref_moves(&self, cache: &Cache, experiment: &str) {
        if !self
            .dropped
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            cache.drop_memo(experiment);
        }
    }
}

/// Directories a hit touches a file in, open once per run, so that those calls are
/// relative to them instead of making the kernel walk the whole path every time (for a
/// no-op rerun, the path walk was the largest kernel cost; see `cache`'s `rel` module).
/// Either is `None` when it could not be opened (it does not exist yet): then the calls
/// use the full path.
#[derive(Debug, Default)]
pub(super) struct OpenDirs {
    /// The recipe directory, where a kind restores outputs.
    pub recipe: Option<DirFd>,
    /// `<runs>/<experiment>/`, holding the `runs/` links.
    pub runs: Option<DirFd>,
}

impl OpenDirs {
    pub fn open(recipe: &Recipe, runs_dir: Option<&Path>) -> Self {
        Self {
            recipe: DirFd::open(&recipe.dir).ok(),
            runs: runs_dir.and_then(|r| DirFd::open(&r.join(&recipe.experiment)).ok()),
        }
    }
}

/// [`run_job`], with a panicking kind turned into an ordinary stage failure: the scheduler
/// waits for every job's report and must not wait forever.
pub(super) fn run_job_caught(env: &Env<'_>, job: &Job) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(env, job))).unwrap_or_else(
        |panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Outcome::Failed(format!("BUG: the stage panicked: {msg}"), Duration::ZERO)
        },
    )
}

pub(super) fn run_job(env: &Env<'_>, job: &Job) -> Outcome {
    let node = &env.recipe.stages[job.idx];
    let started = Instant::now();
    let mut outcome = run_job_inner(env, node, job);
    if matches!(outcome, Err(Retry::StaleTree(_))) {
        // A tree materialized before an object went bad can outlive the bad entry; the
        // failed verification has removed it now, so one more attempt builds it afresh.
        outcome = run_job_inner(env, node, job);
    }
    match outcome {
        Ok(o) => o,
        Err(Retry::Stage(StageError::Cancelled)) => Outcome::Cancelled,
        Err(Retry::Stage(e)) => Outcome::Failed(e.to_string(), started.elapsed()),
        Err(Retry::StaleTree(msg)) => Outcome::Failed(msg, started.elapsed()),
    }
}

/// A job error, or a freshly committed output that failed verification.
enum Retry {
    Stage(StageError),
    StaleTree(String),
}

impl From<StageError> for Retry {
    fn from(e: StageError) -> Self {
        Self::Stage(e)
    }
}

/// A stage failure is one line: the cache's error and its causes down to the OS reason
/// (`cannot create directory `…`: No space left on device`).
fn cache_err(doing: &str, e: cache::Error) -> StageError {
    let mut msg = format!("{doing}: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    StageError::Other(msg)
}

fn run_job_inner(env: &Env<'_>, node: &StageNode, job: &Job) -> Result<Outcome, Retry> {
    if job.forced {
        // Otherwise the lease would report the existing entry as a hit.
        env.cache
            .remove_entry(&job.key)
            .map_err(|e| cache_err("cannot remove the forced stage's entry", e))?;
    }
    // The lease makes two processes never compute one key at once; the loser usually hits.
    let _guard = match env
        .cache
        .lock(&job.key)
        .map_err(|e| cache_err("cannot lock the stage key", e))?
    {
        LockOutcome::Hit(entry) => {
            let entry = Arc::new(*entry);
            finish(env, node, job.kind.as_ref(), &entry).map_err(FinishError::into_stage_error)?;
            return Ok(Outcome::Hit(entry));
        }
        LockOutcome::Acquired(guard) => guard,
    };
    let mut dirs = Vec::with_capacity(job.upstream.len());
    for (input, entry) in node.inputs.iter().zip(&job.upstream) {
        let dir = env
            .cache
            .materialize(entry, &input.output)
            .map_err(|e| cache_err(&format!("cannot read input `{}`", input.param), e))?;
        dirs.push(dir);
    }
    let (params, inputs) = keys::run_params(node, &dirs);
    let outputs: Vec<&str> = node.outputs.iter().map(|o| o.name).collect();
    let staging = env
        .cache
        .stage_dir(&job.key, &outputs)
        .map_err(|e| cache_err("cannot create the staging directory", e))?;
    let checkpoint_dir = env
        .cache
        .checkpoint_dir(&job.key)
        .map_err(|e| cache_err("cannot create the checkpoint directory", e))?;
    let log_path = staging.log_path();
    let mut log = LazyLog::new(log_path.clone());
    let out_dir = staging.dir().join("out");
    let progress = Reported::new(env.reporter, &node.name);
    let started = SystemTime::now();
    {
        let mut ctx = StageCtx {
            name: &node.name,
            recipe_dir: &env.recipe.dir,
            params: &params,
            inputs: &inputs,
            out_dir: &out_dir,
            checkpoint_dir: &checkpoint_dir,
            seed: job.manifest.seed,
            cancel: env.cancel.clone(),
            progress: &progress,
            log: &mut log,
            resources: job.resources,
        };
        if let Err(e) = job.kind.run(&mut ctx) {
            return Err(Retry::Stage(match e {
                StageError::Cancelled => e,
                e => match keep_failed_log(env, node, &log_path) {
                    Some(kept) => StageError::Other(format!("{e} (log: {})", kept.display())),
                    None => e,
                },
            }));
        }
    }
    if env.cancel.load(std::sync::atomic::Ordering::Relaxed) {
        // A stage that returned Ok after the cancel may have cut corners; never commit it.
        return Err(Retry::Stage(StageError::Cancelled));
    }
    drop(log);
    let meta = CommitMeta {
        kind: node.kind.clone(),
        stage: node.name.clone(),
        experiment: env.recipe.experiment.clone(),
        inputs: serde_json::to_value(&job.manifest)
            .map_err(|e| StageError::Other(format!("BUG: manifest: {e}")))?,
        started,
    };
    let entry = Arc::new(
        env.cache
            .commit(staging, meta)
            .map_err(|e| cache_err("cannot commit the outputs", e))?,
    );
    match finish(env, node, job.kind.as_ref(), &entry) {
        Ok(()) => Ok(Outcome::Ran(entry)),
        Err(FinishError::Corrupt(msg, _)) => Err(Retry::StaleTree(msg)),
        Err(FinishError::Other(e)) => Err(Retry::Stage(e)),
    }
}

/// The stage log, created on the first write. Most trivial stages print nothing, and an
/// empty file costs an inode creation (a journaled metadata write) per stage; without
/// one the entry simply has no `log.txt`.
struct LazyLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl LazyLog {
    fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }
}

impl std::io::Write for LazyLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let file = match &mut self.file {
            Some(f) => f,
            None => self.file.insert(std::fs::File::create(&self.path)?),
        };
        file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map_or(Ok(()), std::io::Write::flush)
    }
}

/// A failed stage leaves no entry, so its log would vanish with the staging directory; keep
/// it as `runs/<experiment>/<stage>/failed.log` (replaced by the next failure, left alone
/// by successes so the last failure stays inspectable). `None` if there is nothing to keep.
fn keep_failed_log(env: &Env<'_>, node: &StageNode, log: &Path) -> Option<PathBuf> {
    let runs = env.runs_dir?;
    if std::fs::metadata(log).map_or(true, |m| m.len() == 0) {
        return None;
    }
    let dir = runs.join(&env.recipe.experiment).join(&node.name);
    std::fs::create_dir_all(&dir).ok()?;
    let kept = dir.join("failed.log");
    std::fs::copy(log, &kept).ok()?;
    Some(kept)
}

/// Why [`finish`] failed.
pub(super) enum FinishError {
    /// An output failed verification; the cache removed the entry, so it is now a miss
    /// (the error's message, and the miss it stands for).
    Corrupt(String, MissReason),
    /// Anything else.
    Other(StageError),
}

impl From<StageError> for FinishError {
    fn from(e: StageError) -> Self {
        Self::Other(e)
    }
}

impl FinishError {
    fn into_stage_error(self) -> StageError {
        match self {
            Self::Corrupt(msg, _) => StageError::Other(msg),
            Self::Other(e) => e,
        }
    }
}

/// After a hit or a commit: point the ref at the key, link `runs/`, and let the kind restore
/// files it keeps outside the cache.
pub(super) fn finish(
    env: &Env<'_>,
    node: &StageNode,
    kind: &dyn StageKind,
    entry: &Entry,
) -> Result<(), FinishError> {
    let exp = &env.recipe.experiment;
    // Refs only feed explanations; skip the write when it is already right (no-op reruns),
    // and the read too when the memo records this key (then it is the ref).
    if env.memo.loaded.key(&node.name) != Some(entry.key)
        && env.cache.get_ref(exp, &node.name).ok().flatten() != Some(entry.key)
    {
        env.memo.before_ref_moves(env.cache, exp);
        env.cache
            .set_ref(exp, &node.name, &entry.key)
            .map_err(|e| cache_err("cannot record the stage's ref", e))?;
    }
    let mut outputs = BTreeMap::new();
    for name in entry.outputs() {
        let dir = env.cache.materialize(entry, name).map_err(|e| {
            if e.is_corrupt() {
                let reason = match e.missing_file() {
                    // Reported like a missing object at lookup (`outputs missing`).
                    Some(path) => MissReason::MissingObject {
                        path: path.to_owned(),
                    },
                    None => MissReason::Corrupt {
                        path: PathBuf::new(),
                        detail: e.to_string(),
                    },
                };
                FinishError::Corrupt(e.to_string(), reason)
            } else {
                FinishError::Other(cache_err(&format!("cannot read output `{name}`"), e))
            }
        })?;
        if let Some(runs) = env.runs_dir {
            link_if_changed(env, runs, &node.name, name, &dir)?;
        }
        outputs.insert(name.to_owned(), dir);
    }
    kind.restore_with(
        &env.recipe.dir,
        &node.params,
        &outputs,
        &StatDigests {
            cache: env.cache,
            entry,
            outputs: &outputs,
            recipe_dir: env
                .dirs
                .recipe
                .as_ref()
                .map(|fd| (env.recipe.dir.as_path(), fd)),
        },
    )?;
    Ok(())
}

/// [`FileDigests`] for a restore: a file of one of the entry's materialized outputs has
/// the digest its manifest lists (`materialize` has just verified the tree against it), so
/// it needs no `stat`; any other file goes through the cache's stat cache.
struct StatDigests<'a> {
    cache: &'a Cache,
    entry: &'a Entry,
    /// Output name -> its materialized directory.
    outputs: &'a BTreeMap<String, PathBuf>,
    /// The recipe directory and its open descriptor: files under it are `stat`ed relative
    /// to it.
    recipe_dir: Option<(&'a Path, &'a DirFd)>,
}

impl StatDigests<'_> {
    fn listed(&self, path: &Path) -> Option<([u8; 32], u64)> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        self.outputs.iter().find_map(|(name, dir)| {
            let rel = bytes
                .strip_prefix(dir.as_os_str().as_bytes())?
                .strip_prefix(b"/")?;
            let tree = self.entry.manifest.outputs.get(name)?;
            // Tree listings are sorted by path, bytewise.
            let i = tree
                .entries
                .binary_search_by(|e| e.path.as_bytes().cmp(rel))
                .ok()?;
            let e = &tree.entries[i];
            (e.kind == cache::hash::NodeKind::File)
                .then_some(())
                .and(e.digest)
                .map(|d| (d.0, e.size))
        })
    }
}

impl FileDigests for StatDigests<'_> {
    fn file_digest(&self, path: &Path) -> Option<([u8; 32], u64)> {
        if let Some(found) = self.listed(path) {
            return Some(found);
        }
        use std::os::unix::ffi::OsStrExt;
        let rel = self.recipe_dir.and_then(|(dir, fd)| {
            let rest = path
                .as_os_str()
                .as_bytes()
                .strip_prefix(dir.as_os_str().as_bytes())?
                .strip_prefix(b"/")?;
            Some((Path::new(std::ffi::OsStr::from_bytes(rest)), fd))
        });
        let (digest, size) = match rel {
            Some((rel, fd)) if !rel.as_os_str().is_empty() => {
                self.cache.file_digest_at(fd, rel, path).ok()?
            }
            _ => self.cache.file_digest(path).ok()?,
        };
        Some((digest.0, size))
    }
}

fn link_if_changed(
    env: &Env<'_>,
    runs: &Path,
    stage: &str,
    output: &str,
    target: &Path,
) -> Result<(), StageError> {
    let exp = &env.recipe.experiment;
    // The link is read relative to the open `<runs>/<experiment>/` when there is one, and
    // compared as bytes (it is written with `target`'s bytes): `join`s and `Path`'s
    // component-wise `==` were visible in a no-op rerun too.
    let current = match &env.dirs.runs {
        Some(dir) => {
            let mut rel = String::with_capacity(stage.len() + output.len() + 1);
            for part in [stage, "/", output] {
                rel.push_str(part);
            }
            dir.read_link(Path::new(&rel)).ok()
        }
        None => std::fs::read_link(runs.join(exp).join(stage).join(output))
            .ok()
            .map(|t| t.into_os_string().into_encoded_bytes()),
    };
    if current.is_some_and(|t| t == target.as_os_str().as_encoded_bytes()) {
        return Ok(());
    }
    env.cache
        .link_run(runs, exp, stage, output, target)
        .map(|_| ())
        .map_err(|e| cache_err("cannot link the run directory", e))
}

/// Forwards a stage's progress as events, at most every 100 ms (and always the last step).
struct Reported<'a> {
    reporter: &'a dyn Reporter,
    stage: &'a str,
    last: Mutex<Option<Instant>>,
}

impl<'a> Reported<'a> {
    fn new(reporter: &'a dyn Reporter, stage: &'a str) -> Self {
        Self {
            reporter,
            stage,
            last: Mutex::new(None),
        }
    }
}

impl Progress for Reported<'_> {
    fn progress(&self, done: u64, total: u64, msg: &str) {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100))
            || done >= total;
        if due {
            *last = Some(now);
            drop(last);
            self.reporter.event(&Event::StageProgress {
                stage: self.stage.to_owned(),
                done,
                total,
                message: msg.to_owned(),
            });
        }
    }
}

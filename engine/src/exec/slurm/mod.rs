//! The Slurm executor: every stage that is not a cache hit runs as a Slurm batch job,
//! `pipeline exec <recipe> <stage>`, against the same cache.
//!
//! # Design: submit ahead with `afterok`, keys computed twice
//!
//! A stage's key needs the output digests of its inputs, which exist only once the upstream
//! stages have committed. Two designs are possible: submit each stage only when its inputs are
//! committed (the driver polls and submits level by level), or submit the remaining DAG at
//! once with `--dependency=afterok:<upstream jobs>` and let `pipeline exec` on the node
//! compute the key itself when the job starts. This executor does the second:
//!
//! - Slurm sees the whole DAG, so a job starts on the scheduler's next pass after its
//!   upstream job ends (≈1 s) instead of after the driver's next poll plus a fresh queue
//!   wait behind other users' jobs (on a busy cluster, minutes per level of the DAG);
//! - the driver can die or lose its network and the submitted DAG still finishes; a rerun
//!   then finds hits;
//! - correctness does not depend on the driver's key: the node recomputes it with the same
//!   code ([`super::keys`]) from the committed upstream entries, takes the cache lease and
//!   commits with the same protocol as the local executor. A stage whose upstream reran but
//!   produced identical bytes (early cutoff) is then a hit on the node: the job ends in
//!   about a second without computing anything.
//!
//! The driver still resolves everything it can locally first, with exactly the local
//! executor's lookups: stages whose inputs are committed get their key at once, and hits are
//! never submitted (a fully cached recipe submits nothing). Jobs are submitted in
//! topological order: a stage is submitted once each upstream stage is either committed or
//! has a job in this run. Stages that wait on purpose are not submitted ahead: `--force`d
//! stages (the driver removes the old entry once the key is known, so the node recomputes),
//! stages outside the selection (they must be hits), and stages that run locally in a mixed
//! recipe (`executor = "local"`); their dependents are submitted once they are done.
//!
//! # Following the jobs
//!
//! One `squeue --states=all` per poll covers every job of the run (finished jobs stay
//! visible for the controller's `MinJobAge`; `sacct` needs the accounting daemon and is not
//! used). A job seen running is reported as started (with the key and the rerun reasons,
//! computed by the driver once the upstream jobs are done); state changes are reported as
//! progress. When a job completes, the driver looks its key up in the cache: the entry the
//! node committed is then finished locally like any hit (ref, `runs/` links, restored
//! outputs). A job that ends in any other state fails its stage, naming the job, its state
//! and exit code, the stage's own error (read from the job's `--json` events) and the job's
//! log; its dependents are cancelled (they also carry `--kill-on-invalid-dep=yes`, so Slurm
//! cancels them even if the driver is gone). A job pending for a reason that never clears
//! (`DependencyNeverSatisfied`, an invalid account...) is cancelled and fails its stage.
//!
//! # Logs
//!
//! A job's stdout and stderr (the `--json` events of `pipeline exec` and any error it
//! prints) go to `<cache>/slurm/<experiment>/<stage>/<job id>.log`: the cache directory is
//! the one place every node is known to share. The stage's own output goes where the local
//! executor puts it: the entry's `log.txt` on success, `runs/<experiment>/<stage>/failed.log`
//! on failure.
//!
//! # Interruption and failure
//!
//! Ctrl-C cancels every job of the run (`scancel`, which sends SIGTERM: `pipeline exec`
//! stops its stage, commits nothing and keeps the checkpoint directory) and waits for them to
//! end. A rerun after a failed, cancelled, timed-out or preempted job resubmits only what is
//! not committed; training stages resume from their checkpoints. Missing Slurm tools, a
//! rejected submission or a controller that cannot be reached for a minute are environment
//! errors ([`ExecError::Slurm`], exit code 3): jobs already submitted by the run are cancelled
//! (when the controller answers) and nothing committed is lost.
//!
//! # Several runs, one cache
//!
//! Two runs (two users, one shared filesystem) may submit jobs for the same stage. Their
//! `pipeline exec` processes take the cache's per-key lease: one computes, the other waits
//! and then finds the entry, so a key is never computed twice and entries are committed
//! atomically. The cache directory must be on a filesystem shared by all nodes, with atomic
//! `rename` and working `flock` (NFSv4, Lustre, GPFS, BeeGFS; not NFSv3 without lockd).

mod cli;
mod follow;
mod submit;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cache::{Cache, Entry, Key, Lookup, MissReason};

use self::cli::JobId;
use self::submit::{Paths, absolute_paths, check_tools};
use super::keys;
use super::local::previous_manifest;
use super::stage_run::{self, FinishError, Job, Outcome};
use super::{ExecError, RunOptions, RunSummary};
use crate::events::{Event, Reporter};
use crate::key::{self, RerunReason};
use crate::recipe::Recipe;
use crate::stage::{Registry, StageKind};

/// How to submit jobs, beyond the [`RunOptions`] shared with the local executor.
#[derive(Debug, Clone)]
pub struct SlurmOptions {
    /// The `pipeline` binary the jobs run: the driver's own (`std::env::current_exe()`), on
    /// a path every node sees.
    pub program: PathBuf,
    /// The recipe file, as the jobs load it.
    pub recipe: PathBuf,
    /// `--set` overrides, passed on to every job so that it loads the same recipe.
    pub overrides: Vec<String>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// More `sbatch` options, passed as given (`--qos=high`, `--constraint=a100`).
    pub sbatch_args: Vec<String>,
    /// Which stages run on Slurm (by index; see [`on_slurm`]); the others run in this
    /// process like the local executor runs them.
    pub on_slurm: Vec<bool>,
    /// How often the jobs' states are polled.
    pub poll: Duration,
}

impl SlurmOptions {
    /// Options for running every stage of `recipe` (loaded from `recipe_path`) on Slurm.
    #[must_use]
    pub fn new(program: PathBuf, recipe_path: PathBuf, recipe: &Recipe) -> Self {
        Self {
            program,
            recipe: recipe_path,
            overrides: Vec::new(),
            partition: None,
            account: None,
            sbatch_args: Vec::new(),
            on_slurm: vec![true; recipe.stages.len()],
            poll: Duration::from_millis(500),
        }
    }
}

/// Which stages run on Slurm. An executor named on the command line (`--executor`) applies
/// to every stage, so that a recipe written for a cluster also runs on a laptop; without one,
/// each stage's `executor` key decides, and stages without it run locally.
#[must_use]
pub fn on_slurm(recipe: &Recipe, command_line: Option<&str>) -> Vec<bool> {
    recipe
        .stages
        .iter()
        .map(|s| command_line.or(s.executor.as_deref()) == Some("slurm"))
        .collect()
}

/// Where a stage stands.
enum State {
    /// Waiting for upstream stages.
    Waiting,
    /// Submitted to Slurm.
    Submitted(Box<SlurmJob>),
    /// A local miss waiting for a job slot.
    Queued(Box<Job>),
    /// Running in this process.
    Running,
    /// Hit or committed: downstream stages read this entry.
    Done(Arc<Entry>),
    /// Failed, skipped, or unavailable.
    Dead,
}

/// One submitted job.
struct SlurmJob {
    id: JobId,
    log: PathBuf,
    /// The key and why the stage runs, once its upstream stages are done.
    key: Option<(Key, Vec<RerunReason>)>,
    /// `stage-started` was reported.
    announced: bool,
    /// The last state reported as progress.
    shown: String,
    submitted: Instant,
}

/// Run the selected stages of `recipe`, the ones marked in `slurm.on_slurm` as Slurm jobs.
/// Stage failures are in the summary; Slurm being unusable is an error.
///
/// # Errors
/// [`ExecError::Slurm`] when Slurm's tools are missing, a submission is rejected or the
/// controller stops answering; [`ExecError::BadSelection`] for out-of-range indices.
pub fn run(
    recipe: &Recipe,
    registry: &Registry,
    cache: &Cache,
    reporter: &dyn Reporter,
    opts: &RunOptions,
    slurm: &SlurmOptions,
) -> Result<RunSummary, ExecError> {
    let started = Instant::now();
    let n = recipe.stages.len();
    if let Some(i) = opts
        .selected
        .iter()
        .flatten()
        .chain(&opts.force)
        .find(|&&i| i >= n)
    {
        return Err(ExecError::BadSelection(*i));
    }
    let selected: Vec<bool> = (0..n)
        .map(|i| opts.selected.as_ref().is_none_or(|s| s.contains(&i)))
        .collect();
    let mut relevant = vec![false; n];
    for i in (0..n).rev() {
        relevant[i] |= selected[i];
        if relevant[i] {
            for input in &recipe.stages[i].inputs {
                relevant[input.stage] = true;
            }
        }
    }
    let mut upstream: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in recipe.stages.iter().enumerate() {
        if !relevant[i] {
            continue;
        }
        upstream[i].extend(node.inputs.iter().map(|inp| inp.stage));
        if selected[i] {
            upstream[i].extend(node.after.iter().copied().filter(|&a| selected[a]));
        }
        for &u in &upstream[i] {
            downstream[u].push(i);
        }
    }
    let on_slurm = |i: usize| slurm.on_slurm.get(i).copied().unwrap_or(false);
    if (0..n).any(|i| relevant[i] && selected[i] && on_slurm(i)) {
        check_tools()?;
    }
    let paths = absolute_paths(cache, opts, slurm)?;
    let total = (0..n).filter(|&i| relevant[i] && selected[i]).count();
    reporter.event(&Event::RunStarted {
        experiment: recipe.experiment.clone(),
        stages: total,
        jobs: opts.jobs,
    });
    let has_refs = cache.has_refs(&recipe.experiment);
    let old_refs: Vec<Option<Key>> = (0..n)
        .map(|i| {
            let name = &recipe.stages[i].name;
            (relevant[i] && has_refs)
                .then(|| cache.get_ref(&recipe.experiment, name).ok().flatten())
                .flatten()
        })
        .collect();
    let mut sched = Scheduler {
        recipe,
        cache,
        reporter,
        opts,
        slurm,
        paths,
        kinds: recipe
            .stages
            .iter()
            .map(|s| registry.get(&s.kind).cloned())
            .collect(),
        states: (0..n).map(|_| State::Waiting).collect(),
        upstream,
        downstream,
        selected,
        relevant,
        ran_here: vec![false; n],
        keys: vec![None; n],
        summary: RunSummary::default(),
        queue: BTreeSet::new(),
        old_refs,
        unreachable_since: None,
    };
    let env = stage_run::Env {
        recipe,
        cache,
        reporter,
        cancel: &opts.cancel,
        runs_dir: opts.runs_dir.as_deref(),
    };
    let mut fatal: Option<ExecError> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        let mut local_running = 0usize;
        let mut cancelled_jobs = false;
        loop {
            let stop = opts.cancel.load(Ordering::Relaxed) || fatal.is_some();
            if stop {
                if !cancelled_jobs {
                    sched.cancel_all_jobs();
                    cancelled_jobs = true;
                }
                if local_running == 0 {
                    break;
                }
            } else {
                if let Err(e) = sched.advance(&env) {
                    fatal = Some(e);
                    // Local stages stop through the cancel flag, like on Ctrl-C.
                    opts.cancel.store(true, Ordering::Relaxed);
                    continue;
                }
                while local_running < opts.jobs {
                    let Some(i) = sched.queue.pop_first() else {
                        break;
                    };
                    let State::Queued(job) =
                        std::mem::replace(&mut sched.states[i], State::Running)
                    else {
                        continue;
                    };
                    sched.started(i, job.key, job.reasons.clone());
                    local_running += 1;
                    let tx = tx.clone();
                    let env = &env;
                    scope.spawn(move || {
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                stage_run::run_job(env, &job)
                            }))
                            .unwrap_or_else(|_| {
                                Outcome::Failed("BUG: the stage panicked".into(), Duration::ZERO)
                            });
                        let _ = tx.send((i, outcome));
                    });
                }
                if local_running == 0 && !sched.has_jobs() && sched.queue.is_empty() {
                    // `advance` has just resolved or submitted every stage it can (after the
                    // last poll's results); with nothing in flight, nothing more can happen.
                    break;
                }
                if let Err(e) = sched.poll() {
                    fatal = Some(e);
                    opts.cancel.store(true, Ordering::Relaxed);
                    continue;
                }
            }
            let wait = if sched.has_jobs() {
                slurm.poll
            } else {
                Duration::from_millis(50)
            };
            let mut next = rx.recv_timeout(wait).ok();
            while let Some((i, outcome)) = next {
                local_running -= 1;
                sched.finished_locally(i, outcome);
                next = rx.try_recv().ok();
            }
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }
    let interrupted = opts.cancel.load(Ordering::Relaxed);
    for i in 0..n {
        if sched.selected[i]
            && sched.relevant[i]
            && matches!(
                sched.states[i],
                State::Waiting | State::Queued(_) | State::Submitted(_)
            )
        {
            sched.summary.skipped.push(recipe.stages[i].name.clone());
        }
    }
    sched.summary.interrupted = interrupted;
    sched.summary.elapsed = started.elapsed();
    let s = &sched.summary;
    reporter.event(&Event::RunFinished {
        ran: s.ran.len(),
        cached: s.cached.len(),
        failed: s.failed.len(),
        skipped: s.skipped.clone(),
        interrupted,
        elapsed_ms: ms(s.elapsed),
    });
    Ok(sched.summary)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn slurm_error(message: String, help: &str) -> ExecError {
    ExecError::Slurm {
        message,
        help: help.to_owned(),
    }
}

struct Scheduler<'a> {
    recipe: &'a Recipe,
    cache: &'a Cache,
    reporter: &'a dyn Reporter,
    opts: &'a RunOptions,
    slurm: &'a SlurmOptions,
    paths: Paths,
    kinds: Vec<Option<Arc<dyn StageKind>>>,
    states: Vec<State>,
    /// Data inputs, and `after` edges between selected stages.
    upstream: Vec<BTreeSet<usize>>,
    downstream: Vec<Vec<usize>>,
    selected: Vec<bool>,
    relevant: Vec<bool>,
    /// Stages computed in this run (for cascade reasons).
    ran_here: Vec<bool>,
    /// Keys of started stages (so a failure can name its key).
    keys: Vec<Option<Key>>,
    summary: RunSummary,
    /// Local misses waiting for a slot, in topological order.
    queue: BTreeSet<usize>,
    /// Each relevant stage's ref when the run began (the key its reasons are diffed against).
    old_refs: Vec<Option<Key>>,
    /// When `squeue` started failing, if it is failing.
    unreachable_since: Option<Instant>,
}

impl Scheduler<'_> {
    fn has_jobs(&self) -> bool {
        self.states.iter().any(|s| matches!(s, State::Submitted(_)))
    }

    fn job_ids(&self) -> Vec<JobId> {
        self.states
            .iter()
            .filter_map(|s| match s {
                State::Submitted(j) => Some(j.id),
                _ => None,
            })
            .collect()
    }

    fn ups_done(&self, i: usize) -> bool {
        self.upstream[i]
            .iter()
            .all(|&u| matches!(self.states[u], State::Done(_)))
    }

    /// Resolve every stage whose inputs are committed, and submit every Slurm stage whose
    /// upstream stages are committed or submitted; repeated until nothing changes (a hit
    /// makes its dependents resolvable at once).
    fn advance(&mut self, env: &stage_run::Env<'_>) -> Result<(), ExecError> {
        loop {
            let mut changed = false;
            for i in 0..self.states.len() {
                if !self.relevant[i] || self.opts.cancel.load(Ordering::Relaxed) {
                    continue;
                }
                match &self.states[i] {
                    State::Waiting if self.ups_done(i) => {
                        self.resolve(i, env)?;
                        changed = true;
                    }
                    State::Waiting if self.submittable(i) => {
                        self.submit(i, None)?;
                        changed = true;
                    }
                    State::Submitted(j) if j.key.is_none() && self.ups_done(i) => {
                        // The node will compute this key now; the driver computes it too,
                        // before the job can have committed, to explain why it runs.
                        if let Some(known) = self.key_and_reasons(i)
                            && let State::Submitted(j) = &mut self.states[i]
                        {
                            j.key = Some(known);
                        }
                    }
                    _ => {}
                }
            }
            if !changed {
                return Ok(());
            }
        }
    }

    /// A Slurm stage can be submitted ahead once every upstream stage is committed or is a
    /// job of this run (`afterok` then orders them).
    fn submittable(&self, i: usize) -> bool {
        self.slurm.on_slurm.get(i).copied().unwrap_or(false)
            && self.selected[i]
            && !self.opts.force.contains(&i)
            && self.upstream[i]
                .iter()
                .all(|&u| matches!(self.states[u], State::Done(_) | State::Submitted(_)))
    }

    /// The committed entries of `i`'s inputs, in `node.inputs` order.
    fn input_entries(&self, i: usize) -> Option<Vec<Arc<Entry>>> {
        self.recipe.stages[i]
            .inputs
            .iter()
            .map(|inp| match &self.states[inp.stage] {
                State::Done(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    fn manifest(
        &self,
        i: usize,
        upstream: &[Arc<Entry>],
    ) -> Result<crate::key::KeyManifest, String> {
        let node = &self.recipe.stages[i];
        let kind = self.kinds[i]
            .as_ref()
            .ok_or_else(|| format!("BUG: kind `{}` is not registered", node.kind))?;
        let digest = |inp: &crate::recipe::Input| {
            let pos = node.inputs.iter().position(|x| x == inp).unwrap_or(0);
            keys::input_digest(self.recipe, inp, &upstream[pos]).map(Some)
        };
        keys::manifest(
            self.recipe,
            node,
            kind.as_ref(),
            self.cache,
            &self.opts.env,
            digest,
        )
        .map(|(m, _)| m)
        .map_err(|e| e.to_string())
    }

    /// Why `i` runs, diffed against its ref as it was when the run began: a job may commit
    /// (and move the ref) before the driver gets to compute the reasons.
    fn reasons(
        &self,
        i: usize,
        key: &Key,
        manifest: &crate::key::KeyManifest,
        miss: Option<&MissReason>,
    ) -> Vec<RerunReason> {
        if self.opts.force.contains(&i) {
            return vec![RerunReason::Forced];
        }
        let node = &self.recipe.stages[i];
        let names: Vec<(&str, usize)> = node
            .inputs
            .iter()
            .map(|inp| (self.recipe.stages[inp.stage].name.as_str(), inp.stage))
            .collect();
        let reran = |up: &str| names.iter().any(|(n, s)| *n == up && self.ran_here[*s]);
        let mut reasons = match self.old_refs[i] {
            None => vec![RerunReason::NeverRun],
            Some(old) if old == *key => vec![match miss {
                Some(
                    MissReason::Corrupt { detail, .. } | MissReason::BadManifest { detail, .. },
                ) => RerunReason::CacheCorrupt {
                    detail: detail.clone(),
                },
                _ => RerunReason::OutputsMissing,
            }],
            Some(old) => previous_manifest(self.cache, &old).map_or_else(
                || vec![RerunReason::OutputsMissing],
                |prev| key::diff(&prev, manifest, &reran),
            ),
        };
        if reasons.is_empty() {
            reasons.push(RerunReason::OutputsMissing);
        }
        let ckpt = self.cache.root().join("v1/checkpoints").join(key.to_hex());
        if std::fs::read_dir(&ckpt).is_ok_and(|mut d| d.next().is_some()) {
            reasons.push(RerunReason::PreviousAttemptIncomplete);
        }
        reasons
    }

    fn key_and_reasons(&self, i: usize) -> Option<(Key, Vec<RerunReason>)> {
        let upstream = self.input_entries(i)?;
        let manifest = self.manifest(i, &upstream).ok()?;
        let key = manifest.key();
        let reasons = self.reasons(i, &key, &manifest, None);
        Some((key, reasons))
    }

    /// Every input of `i` is committed: look its key up; a hit is finished here, a miss is
    /// submitted (Slurm stages) or queued (local ones).
    fn resolve(&mut self, i: usize, env: &stage_run::Env<'_>) -> Result<(), ExecError> {
        let node = &self.recipe.stages[i];
        let Some(kind) = self.kinds[i].clone() else {
            let msg = format!("BUG: kind `{}` is not registered", node.kind);
            self.fail(i, None, msg, Duration::ZERO);
            return Ok(());
        };
        let Some(upstream) = self.input_entries(i) else {
            let msg = "BUG: resolved before its inputs were committed".to_owned();
            self.fail(i, None, msg, Duration::ZERO);
            return Ok(());
        };
        let manifest = match self.manifest(i, &upstream) {
            Ok(m) => m,
            Err(e) => {
                self.fail(i, None, e, Duration::ZERO);
                return Ok(());
            }
        };
        let key = manifest.key();
        let forced = self.opts.force.contains(&i);
        let mut miss = None;
        if !forced {
            match self.cache.probe(&key) {
                Ok(Lookup::Hit(entry)) => {
                    let entry = Arc::new(*entry);
                    match stage_run::finish(env, node, kind.as_ref(), &entry) {
                        Ok(()) => {
                            self.hit(i, entry);
                            return Ok(());
                        }
                        Err(FinishError::Corrupt(detail)) => {
                            miss = Some(MissReason::Corrupt {
                                path: PathBuf::new(),
                                detail,
                            });
                        }
                        Err(FinishError::Other(e)) => {
                            self.fail(i, Some(key), e.to_string(), Duration::ZERO);
                            return Ok(());
                        }
                    }
                }
                Ok(Lookup::Miss(reason)) => miss = Some(reason),
                Err(e) => {
                    let msg = format!("cache lookup failed: {e}");
                    self.fail(i, Some(key), msg, Duration::ZERO);
                    return Ok(());
                }
            }
        }
        if !self.selected[i] {
            let msg = format!(
                "`{}` is not cached and not selected; include it in the selection to run it",
                node.name
            );
            self.fail(i, Some(key), msg, Duration::ZERO);
            return Ok(());
        }
        let reasons = self.reasons(i, &key, &manifest, miss.as_ref());
        if self.slurm.on_slurm.get(i).copied().unwrap_or(false) {
            if forced {
                // `pipeline exec` would find the old entry; without it the node recomputes.
                if let Err(e) = self.cache.remove_entry(&key) {
                    let msg = format!("cannot remove the forced stage's entry: {e}");
                    self.fail(i, Some(key), msg, Duration::ZERO);
                    return Ok(());
                }
            }
            return self.submit(i, Some((key, reasons)));
        }
        self.states[i] = State::Queued(Box::new(Job {
            idx: i,
            resources: node.resources,
            kind,
            key,
            manifest,
            upstream,
            reasons,
            forced,
        }));
        self.queue.insert(i);
        Ok(())
    }

    fn started(&mut self, i: usize, key: Key, reasons: Vec<RerunReason>) {
        self.keys[i] = Some(key);
        self.reporter.event(&Event::StageStarted {
            stage: self.recipe.stages[i].name.clone(),
            key: key.to_hex(),
            cascade: key::is_cascade(&reasons),
            reasons,
        });
    }

    fn hit(&mut self, i: usize, entry: Arc<Entry>) {
        let name = self.recipe.stages[i].name.clone();
        if self.selected[i] {
            self.reporter.event(&Event::StageCached {
                stage: name.clone(),
                key: entry.key.to_hex(),
                time_saved_ms: entry.manifest.duration_ms,
                log: entry.dir.join("log.txt"),
            });
            self.summary.cached.push(name);
        }
        self.states[i] = State::Done(entry);
    }

    fn finished_locally(&mut self, i: usize, outcome: Outcome) {
        let name = self.recipe.stages[i].name.clone();
        match outcome {
            Outcome::Ran(entry) => {
                self.reporter.event(&Event::StageFinished {
                    stage: name.clone(),
                    key: entry.key.to_hex(),
                    elapsed_ms: entry.manifest.duration_ms,
                    log: entry.dir.join("log.txt"),
                });
                self.summary.ran.push(name);
                self.ran_here[i] = true;
                self.states[i] = State::Done(entry);
            }
            Outcome::Hit(entry) => self.hit(i, entry),
            Outcome::Failed(error, elapsed) => self.fail(i, None, error, elapsed),
            Outcome::Cancelled => {
                self.states[i] = State::Dead;
                self.summary.skipped.push(name);
            }
        }
    }

    /// Mark `i` failed and everything downstream skipped; cancel their jobs.
    fn fail(&mut self, i: usize, key: Option<Key>, error: String, elapsed: Duration) {
        let name = self.recipe.stages[i].name.clone();
        let key = key.or(self.keys[i]);
        self.queue.remove(&i);
        self.states[i] = State::Dead;
        self.reporter.event(&Event::StageFailed {
            stage: name.clone(),
            key: key.map(|k| k.to_hex()),
            error: error.clone(),
            elapsed_ms: ms(elapsed),
        });
        self.summary.failed.push((name, error));
        let mut cancel = Vec::new();
        let mut stack = self.downstream[i].clone();
        while let Some(d) = stack.pop() {
            if matches!(self.states[d], State::Dead) {
                continue;
            }
            self.queue.remove(&d);
            if let State::Submitted(j) = &self.states[d] {
                cancel.push(j.id);
            }
            self.states[d] = State::Dead;
            if self.selected[d] {
                self.summary
                    .skipped
                    .push(self.recipe.stages[d].name.clone());
            }
            stack.extend(self.downstream[d].iter().copied());
        }
        // `--kill-on-invalid-dep` would cancel them too, but only at the controller's next
        // pass; the failure is known now. An error here leaves that to Slurm.
        let _ = cli::scancel(&cancel);
    }
}

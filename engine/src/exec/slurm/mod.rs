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

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cache::{Cache, Key};

use self::cli::JobId;
use self::submit::{Paths, absolute_paths, check_tools};
use super::run_state::{RunState, Slot};
use super::stage_run::{self, Outcome};
use super::{ExecError, RunOptions, RunSummary};
use crate::events::Reporter;
use crate::key::RerunReason;
use crate::recipe::Recipe;
use crate::stage::Registry;

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
    let mut run = RunState::new(recipe, registry, cache, reporter, opts)?;
    let on_slurm = |i: usize| slurm.on_slurm.get(i).copied().unwrap_or(false);
    if (0..recipe.stages.len()).any(|i| run.relevant[i] && run.selected[i] && on_slurm(i)) {
        check_tools()?;
    }
    let paths = absolute_paths(cache, opts, slurm)?;
    run.announce();
    run.snapshot_refs();
    let env = run.env();
    let mut sched = Scheduler {
        run,
        slurm,
        paths,
        unreachable_since: None,
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
                if let Err(e) = sched.advance() {
                    fatal = Some(e);
                    // Local stages stop through the cancel flag, like on Ctrl-C.
                    opts.cancel.store(true, Ordering::Relaxed);
                    continue;
                }
                while local_running < opts.jobs {
                    let Some(&i) = sched.run.queue.first() else {
                        break;
                    };
                    let Some(job) = sched.run.take_queued(i) else {
                        continue;
                    };
                    sched.run.started(i, job.key, job.reasons.clone());
                    local_running += 1;
                    let tx = tx.clone();
                    let env = &env;
                    scope.spawn(move || {
                        let _ = tx.send((i, stage_run::run_job_caught(env, &job)));
                    });
                }
                if local_running == 0 && !sched.has_jobs() && sched.run.queue.is_empty() {
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
                let jobs = sched.run.finished(i, outcome);
                cancel_jobs(&jobs);
                next = rx.try_recv().ok();
            }
        }
    });
    if let Some(e) = fatal {
        return Err(e);
    }
    Ok(sched.run.finish())
}

fn slurm_error(message: String, help: &str) -> ExecError {
    ExecError::Slurm {
        message,
        help: help.to_owned(),
    }
}

struct Scheduler<'a> {
    run: RunState<'a, Box<SlurmJob>>,
    slurm: &'a SlurmOptions,
    paths: Paths,
    /// When `squeue` started failing, if it is failing.
    unreachable_since: Option<Instant>,
}

/// Cancel the jobs of stages that will not run after all. `--kill-on-invalid-dep` would
/// cancel them too, but only at the controller's next pass; the failure is known now. An
/// error here leaves that to Slurm.
fn cancel_jobs(jobs: &[Box<SlurmJob>]) {
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let _ = cli::scancel(&ids);
}

impl Scheduler<'_> {
    fn on_slurm(&self, i: usize) -> bool {
        self.slurm.on_slurm.get(i).copied().unwrap_or(false)
    }

    fn has_jobs(&self) -> bool {
        self.run.slots.iter().any(|s| matches!(s, Slot::Remote(_)))
    }

    fn job_ids(&self) -> Vec<JobId> {
        self.run
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Remote(j) => Some(j.id),
                _ => None,
            })
            .collect()
    }

    /// Resolve every stage whose inputs are committed, and submit every Slurm stage whose
    /// upstream stages are committed or submitted; repeated until nothing changes (a hit
    /// makes its dependents resolvable at once).
    fn advance(&mut self) -> Result<(), ExecError> {
        loop {
            let mut changed = false;
            for i in 0..self.run.slots.len() {
                if !self.run.relevant[i] || self.run.opts.cancel.load(Ordering::Relaxed) {
                    continue;
                }
                match &self.run.slots[i] {
                    Slot::Waiting(_) if self.run.ups_done(i) => {
                        self.resolve(i)?;
                        changed = true;
                    }
                    Slot::Waiting(_) if self.submittable(i) => {
                        self.submit(i, None)?;
                        changed = true;
                    }
                    Slot::Remote(j) if j.key.is_none() && self.run.ups_done(i) => {
                        // The node will compute this key now; the driver computes it too,
                        // before the job can have committed, to explain why it runs.
                        if let Some(known) = self.run.key_and_reasons(i)
                            && let Slot::Remote(j) = &mut self.run.slots[i]
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
        self.on_slurm(i)
            && self.run.selected[i]
            && !self.run.opts.force.contains(&i)
            && self.run.upstream[i]
                .iter()
                .all(|&u| matches!(self.run.slots[u], Slot::Done(_) | Slot::Remote(_)))
    }

    /// Every input of `i` is committed: look its key up; a hit is finished here, a miss is
    /// submitted (Slurm stages) or queued (local ones).
    fn resolve(&mut self, i: usize) -> Result<(), ExecError> {
        let job = match self.run.resolve(i) {
            Ok(Some(job)) => job,
            Ok(None) => return Ok(()),
            Err((key, error)) => {
                self.fail(i, key, error, Duration::ZERO);
                return Ok(());
            }
        };
        if !self.on_slurm(i) {
            self.run.enqueue(job);
            return Ok(());
        }
        if job.forced {
            // `pipeline exec` would find the old entry; without it the node recomputes.
            if let Err(e) = self.run.cache.remove_entry(&job.key) {
                let msg = format!("cannot remove the forced stage's entry: {e}");
                self.fail(i, Some(job.key), msg, Duration::ZERO);
                return Ok(());
            }
        }
        self.submit(i, Some((job.key, job.reasons)))
    }

    /// Mark `i` failed and everything downstream skipped; cancel their jobs.
    fn fail(&mut self, i: usize, key: Option<Key>, error: String, elapsed: Duration) {
        let jobs = self.run.fail(i, key, error, elapsed);
        cancel_jobs(&jobs);
    }
}

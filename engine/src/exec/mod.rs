//! Executors: turning a loaded recipe into committed cache entries.
//!
//! # Flow of one stage
//!
//! ```text
//! inputs known ──► manifest ──► key ──► lookup ──hit──► restore + ref + runs link ──► stage-cached
//!                                         │
//!                                        miss ──► reasons (diff vs refs/) ──► queue
//!                                                                              │
//!                 lease (per-key lock; a waiter usually ends in a hit) ◄───────┘
//!                   └► staging dir + checkpoint dir ──► StageKind::run ──► commit (manifest last)
//!                        └► ref + runs link + restore ──► stage-finished
//! ```
//!
//! Keys are computed *lazily*: a stage's key needs the output digests of its inputs, which
//! exist only once the upstream stage is a hit or has committed. Each key is computed once
//! per run. Hits cost one manifest read plus stats ([`cache::Cache::probe`]); the previous
//! run's manifest is loaded (through the ref) only on a miss, to explain it. Stages whose
//! inputs are all committed are looked up a ready batch at a time, on rayon's threads when
//! the batch is big (a no-op rerun of a wide recipe), and what each lookup found is applied
//! to the run in index order, so the events and the summary do not depend on the threads.
//!
//! # Scheduling ([`local`])
//!
//! One scheduler thread owns all state; each running stage gets its own thread and reports
//! back over a channel. A queued stage starts when fewer than `jobs` stages run and its
//! resources fit: the sums of running stages' `cpus`, `gpus` and `memory_mb` stay within the
//! machine's (a stage asking for more than the machine has is clamped, so it runs alone
//! rather than never). Stages start in topological order, so runs are reproducible.
//!
//! The Slurm executor ([`slurm`]) runs misses as batch jobs instead. What a hit, a commit or
//! a failure means for a stage, its dependents, the events and the summary is written once
//! (module `run_state`) and shared by both executors.
//!
//! # Failure and interruption
//!
//! A failed stage leaves no entry; stages depending on it (transitively) are skipped;
//! independent stages keep running, so one broken evaluation does not stop a training run
//! in another branch. Ctrl-C sets the cancel flag: nothing new starts, running stages see
//! `StageCtx::cancel` (shell children are killed), and nothing is committed for them; their
//! checkpoint directories stay so that the next run resumes.
//!
//! # Selection
//!
//! Stages outside the selection (`--only`, `--from`, `--until`, `exec`) that feed selected
//! ones are never run: they must be cache hits, otherwise their dependents fail with a
//! message saying which stage to include.

pub mod keys;
pub mod local;
mod run_state;
pub mod slurm;
mod stage_run;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use keys::{KeyEnv, KeyError};
pub use local::run;

use crate::stage::Resources;

/// What `run` is asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Maximum number of stages running at once.
    pub jobs: usize,
    /// Indices of the stages to run; `None` means all.
    pub selected: Option<BTreeSet<usize>>,
    /// Indices of stages to rerun even on a hit (`--force`).
    pub force: BTreeSet<usize>,
    /// Keyed environment.
    pub env: KeyEnv,
    /// Where `runs/<experiment>/<stage>/<output>` links go; `None` disables them.
    pub runs_dir: Option<PathBuf>,
    /// Set to stop the run (Ctrl-C).
    pub cancel: Arc<AtomicBool>,
    /// What the machine offers to stages.
    pub capacity: Resources,
}

impl RunOptions {
    /// Options for running every stage with `jobs` parallel jobs on this machine.
    #[must_use]
    pub fn new(jobs: usize) -> Self {
        Self {
            jobs: jobs.max(1),
            selected: None,
            force: BTreeSet::new(),
            env: KeyEnv::default(),
            runs_dir: None,
            cancel: Arc::new(AtomicBool::new(false)),
            capacity: machine_capacity(),
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Names of stages computed and committed.
    pub ran: Vec<String>,
    /// Names of stages that were hits.
    pub cached: Vec<String>,
    /// Failed stages with their error.
    pub failed: Vec<(String, String)>,
    /// Stages not run because an upstream failed or the run was interrupted.
    pub skipped: Vec<String>,
    /// Whether the run was interrupted.
    pub interrupted: bool,
    /// Wall time.
    pub elapsed: Duration,
}

impl RunSummary {
    /// The process exit code for this outcome: 130 interrupted, 1 a stage failed, 0 ok.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        if self.interrupted {
            130
        } else if !self.failed.is_empty() || !self.skipped.is_empty() {
            1
        } else {
            0
        }
    }
}

/// An environment failure that stops the whole run (exit code 3): the cache is unwritable,
/// the disk is full. Stage failures are not errors; they are in [`RunSummary::failed`].
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ExecError {
    /// The cache failed.
    #[error("cache error while {doing}: {source}")]
    #[diagnostic(code(pipeline::exec::cache))]
    Cache {
        /// What the engine was doing.
        doing: String,
        /// The cache's error.
        #[source]
        source: cache::Error,
    },
    /// Slurm cannot be used: its tools are missing, a submission was rejected, or the
    /// controller stopped answering ([`slurm`]).
    #[error("{message}")]
    #[diagnostic(code(pipeline::exec::slurm))]
    Slurm {
        /// What went wrong, naming the stage or jobs concerned.
        message: String,
        /// What to do about it.
        #[help]
        help: String,
    },
    /// The selection names stages that do not exist.
    #[error("BUG: stage index {0} out of range")]
    #[diagnostic(code(pipeline::exec::internal))]
    BadSelection(usize),
}

/// CPUs (available parallelism), memory (from `/proc/meminfo`) and GPUs (none unless the
/// `cuda` build reports them; the engine does not probe devices itself).
#[must_use]
pub fn machine_capacity() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|kb| kb.parse::<u64>().ok())
                })
        })
        .map_or(u64::MAX, |kb| kb / 1024);
    Resources {
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        memory_mb,
        gpus: 0,
        time_s: 0,
    }
}

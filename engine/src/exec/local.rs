//! The local executor: the scheduler loop (see the module docs of [`super`]).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cache::{Cache, Entry, Key, Lookup, MissReason};

use super::keys;
use super::stage_run::{self, FinishError, Job, Outcome};
use super::{ExecError, RunOptions, RunSummary};
use crate::events::{Event, Reporter};
use crate::key::{self, KeyManifest, RerunReason};
use crate::recipe::Recipe;
use crate::stage::{Registry, Resources, StageKind};

/// Where a stage stands.
enum State {
    /// Waiting for `n` upstream stages.
    Waiting(usize),
    /// A miss, queued to run.
    Queued(Box<Job>),
    /// Running on a worker thread.
    Running,
    /// Hit or committed: downstream stages read this entry.
    Done(Arc<Entry>),
    /// Failed, skipped, or unavailable (not selected and not cached).
    Dead,
}

/// The reasons a stage with key `key` is not a hit, diffing against the previous run.
pub(crate) fn miss_reasons(
    cache: &Cache,
    experiment: &str,
    stage: &str,
    key: &Key,
    manifest: &KeyManifest,
    miss: Option<&MissReason>,
    reran: &dyn Fn(&str) -> bool,
) -> Vec<RerunReason> {
    let mut reasons = Vec::new();
    match cache.get_ref(experiment, stage).ok().flatten() {
        None => reasons.push(RerunReason::NeverRun),
        Some(old) if old == *key => reasons.push(match miss {
            Some(MissReason::Corrupt { detail, .. } | MissReason::BadManifest { detail, .. }) => {
                RerunReason::CacheCorrupt {
                    detail: detail.clone(),
                }
            }
            _ => RerunReason::OutputsMissing,
        }),
        Some(old) => match previous_manifest(cache, &old) {
            Some(prev) => reasons.extend(key::diff(&prev, manifest, reran)),
            // The previous entry is gone (gc, corruption): all we know is that it ran once.
            None => reasons.push(RerunReason::OutputsMissing),
        },
    }
    if reasons.is_empty() {
        // Equal manifests with different keys cannot happen unless the key schema changed.
        reasons.push(RerunReason::OutputsMissing);
    }
    let ckpt = cache
        .root()
        .join("v1")
        .join("checkpoints")
        .join(key.to_hex());
    if std::fs::read_dir(&ckpt).is_ok_and(|mut d| d.next().is_some()) {
        reasons.push(RerunReason::PreviousAttemptIncomplete);
    }
    reasons
}

/// The manifest of a committed key, if its entry is still there.
pub(crate) fn previous_manifest(cache: &Cache, key: &Key) -> Option<KeyManifest> {
    let entry = cache.lookup(key).ok().flatten()?;
    serde_json::from_value(entry.manifest.inputs).ok()
}

/// Run the selected stages of `recipe`. Stage failures are reported in the summary (and as
/// events); only environment failures are errors.
///
/// # Errors
/// [`ExecError`] when the cache itself fails outside of any one stage.
pub fn run(
    recipe: &Recipe,
    registry: &Registry,
    cache: &Cache,
    reporter: &dyn Reporter,
    opts: &RunOptions,
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
    let selected = |i: usize| opts.selected.as_ref().is_none_or(|s| s.contains(&i));
    // Relevant: selected stages and everything they read (which must then be hits).
    let mut relevant = vec![false; n];
    for i in (0..n).rev() {
        if selected(i) {
            relevant[i] = true;
        }
        if relevant[i] {
            for input in &recipe.stages[i].inputs {
                relevant[input.stage] = true;
            }
        }
    }
    // Upstream edges among relevant stages: data inputs, and `after` between selected ones.
    let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut states: Vec<State> = Vec::with_capacity(n);
    for (i, node) in recipe.stages.iter().enumerate() {
        let mut ups: BTreeSet<usize> = BTreeSet::new();
        if relevant[i] {
            ups.extend(node.inputs.iter().map(|inp| inp.stage));
            if selected(i) {
                ups.extend(node.after.iter().copied().filter(|&a| selected(a)));
            }
        }
        for &u in &ups {
            downstream[u].push(i);
        }
        states.push(State::Waiting(ups.len()));
    }
    let kinds: Vec<Option<Arc<dyn StageKind>>> = recipe
        .stages
        .iter()
        .map(|s| registry.get(&s.kind).cloned())
        .collect();
    let total = relevant
        .iter()
        .enumerate()
        .filter(|&(i, &r)| r && selected(i))
        .count();
    reporter.event(&Event::RunStarted {
        experiment: recipe.experiment.clone(),
        stages: total,
        jobs: opts.jobs,
    });

    let mut sched = Scheduler {
        recipe,
        cache,
        reporter,
        opts,
        kinds,
        states,
        downstream,
        selected: (0..n).map(selected).collect(),
        relevant,
        ran_here: vec![false; n],
        keys: vec![None; n],
        summary: RunSummary::default(),
        ready: BTreeSet::new(),
        queue: BTreeSet::new(),
    };
    sched.ready.extend(
        (0..n).filter(|&i| sched.relevant[i] && matches!(sched.states[i], State::Waiting(0))),
    );
    let env = stage_run::Env {
        recipe,
        cache,
        reporter,
        cancel: &opts.cancel,
        runs_dir: opts.runs_dir.as_deref(),
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        let mut running: Vec<(usize, Resources)> = Vec::new();
        loop {
            let cancelled = opts.cancel.load(Ordering::Relaxed);
            if !cancelled {
                sched.resolve_ready(&env);
                // Start queued stages in topological order while jobs and resources allow.
                let queued: Vec<usize> = sched.queue.iter().copied().collect();
                for i in queued {
                    if running.len() >= opts.jobs {
                        break;
                    }
                    let State::Queued(job) = &sched.states[i] else {
                        continue;
                    };
                    let need = clamp(job.resources, opts.capacity);
                    if !fits(&running, need, opts.capacity) {
                        continue;
                    }
                    let State::Queued(job) =
                        std::mem::replace(&mut sched.states[i], State::Running)
                    else {
                        continue;
                    };
                    sched.queue.remove(&i);
                    sched.started(i, &job);
                    running.push((i, need));
                    let tx = tx.clone();
                    let env = &env;
                    scope.spawn(move || {
                        // A panicking kind must not leave the scheduler waiting forever for its
                        // report: it becomes an ordinary stage failure.
                        let outcome =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                stage_run::run_job(env, &job)
                            }))
                            .unwrap_or_else(|panic| {
                                let msg = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| (*s).to_owned())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_default();
                                Outcome::Failed(
                                    format!("BUG: the stage panicked: {msg}"),
                                    Duration::ZERO,
                                )
                            });
                        let _ = tx.send((i, outcome));
                    });
                }
            }
            if running.is_empty() && (cancelled || sched.ready.is_empty() && sched.queue.is_empty())
            {
                break;
            }
            if running.is_empty() && sched.ready.is_empty() {
                // Queued stages that cannot start with nothing running would wait forever;
                // `clamp` makes that impossible, so this is a bug.
                let stuck: Vec<usize> = sched.queue.iter().copied().collect();
                for i in stuck {
                    sched.fail(
                        i,
                        None,
                        "BUG: the scheduler could not start this stage".into(),
                        Duration::ZERO,
                    );
                }
                continue;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((i, outcome)) => {
                    running.retain(|(r, _)| *r != i);
                    sched.finished(i, outcome);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    let interrupted = opts.cancel.load(Ordering::Relaxed);
    for i in 0..n {
        if sched.selected[i]
            && sched.relevant[i]
            && matches!(sched.states[i], State::Waiting(_) | State::Queued(_))
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

/// A stage never asks for more than the machine has (it would never start).
fn clamp(r: Resources, cap: Resources) -> Resources {
    Resources {
        cpus: r.cpus.min(cap.cpus),
        memory_mb: r.memory_mb.min(cap.memory_mb),
        gpus: r.gpus.min(cap.gpus),
        time_s: r.time_s,
    }
}

fn fits(running: &[(usize, Resources)], need: Resources, cap: Resources) -> bool {
    let (cpus, mem, gpus) = running
        .iter()
        .fold((0u64, 0u64, 0u64), |(c, m, g), (_, r)| {
            (
                c + u64::from(r.cpus),
                m.saturating_add(r.memory_mb),
                g + u64::from(r.gpus),
            )
        });
    cpus + u64::from(need.cpus) <= u64::from(cap.cpus)
        && mem.saturating_add(need.memory_mb) <= cap.memory_mb
        && gpus + u64::from(need.gpus) <= u64::from(cap.gpus)
}

struct Scheduler<'a> {
    recipe: &'a Recipe,
    cache: &'a Cache,
    reporter: &'a dyn Reporter,
    opts: &'a RunOptions,
    kinds: Vec<Option<Arc<dyn StageKind>>>,
    states: Vec<State>,
    downstream: Vec<Vec<usize>>,
    selected: Vec<bool>,
    relevant: Vec<bool>,
    /// Stages computed in this run (for cascade classification).
    ran_here: Vec<bool>,
    /// Keys of stages that started (so a failure event can name its key).
    keys: Vec<Option<Key>>,
    summary: RunSummary,
    /// Stages whose upstream stages are all done: their key can be computed.
    ready: BTreeSet<usize>,
    /// Misses waiting for a job slot, in topological order.
    queue: BTreeSet<usize>,
}

impl Scheduler<'_> {
    /// Compute keys of ready stages and look them up, until no stage is ready (a hit makes
    /// its dependents ready at once, so a fully cached recipe resolves in this one call).
    fn resolve_ready(&mut self, env: &stage_run::Env<'_>) {
        while let Some(i) = self.ready.pop_first() {
            if self.opts.cancel.load(Ordering::Relaxed) {
                self.ready.insert(i);
                return;
            }
            self.resolve(i, env);
        }
    }

    fn resolve(&mut self, i: usize, env: &stage_run::Env<'_>) {
        let node = &self.recipe.stages[i];
        let Some(kind) = self.kinds[i].clone() else {
            self.fail(
                i,
                None,
                format!("BUG: kind `{}` is not registered", node.kind),
                Duration::ZERO,
            );
            return;
        };
        let mut upstream = Vec::with_capacity(node.inputs.len());
        for input in &node.inputs {
            match &self.states[input.stage] {
                State::Done(e) => upstream.push(e.clone()),
                _ => {
                    self.fail(
                        i,
                        None,
                        format!("BUG: input `{}` resolved before its upstream", input.param),
                        Duration::ZERO,
                    );
                    return;
                }
            }
        }
        let by_stage = |inp: &crate::recipe::Input| {
            let pos = node
                .inputs
                .iter()
                .position(|x| x.stage == inp.stage)
                .unwrap_or(0);
            keys::input_digest(self.recipe, inp, &upstream[pos]).map(Some)
        };
        let manifest = match keys::manifest(
            self.recipe,
            node,
            kind.as_ref(),
            self.cache,
            &self.opts.env,
            by_stage,
        ) {
            Ok((m, _)) => m,
            Err(e) => {
                self.fail(i, None, e.to_string(), Duration::ZERO);
                return;
            }
        };
        let key = manifest.key();
        let forced = self.opts.force.contains(&i);
        let miss = if forced {
            None
        } else {
            match self.cache.probe_outputs(&key) {
                Ok(Lookup::Hit(entry)) => {
                    let entry = Arc::new(*entry);
                    match stage_run::finish(env, node, kind.as_ref(), &entry) {
                        Ok(()) => {
                            self.hit(i, entry);
                            return;
                        }
                        // The cache dropped the bad entry: recompute it like any miss.
                        Err(FinishError::Corrupt(detail)) => Some(MissReason::Corrupt {
                            path: PathBuf::new(),
                            detail,
                        }),
                        Err(FinishError::Other(e)) => {
                            self.fail(i, Some(key), e.to_string(), Duration::ZERO);
                            return;
                        }
                    }
                }
                Ok(Lookup::Miss(reason)) => Some(reason),
                Err(e) => {
                    self.fail(
                        i,
                        Some(key),
                        format!("cache lookup failed: {e}"),
                        Duration::ZERO,
                    );
                    return;
                }
            }
        };
        if !self.selected[i] {
            self.fail(
                i,
                Some(key),
                format!(
                    "`{}` is not cached and not selected; include it in the selection to run it",
                    node.name
                ),
                Duration::ZERO,
            );
            return;
        }
        let ran_here = &self.ran_here;
        let names: Vec<(&str, usize)> = node
            .inputs
            .iter()
            .map(|inp| (self.recipe.stages[inp.stage].name.as_str(), inp.stage))
            .collect();
        let reran = |up: &str| names.iter().any(|(n, s)| *n == up && ran_here[*s]);
        let reasons = if forced {
            vec![RerunReason::Forced]
        } else {
            miss_reasons(
                self.cache,
                &self.recipe.experiment,
                &node.name,
                &key,
                &manifest,
                miss.as_ref(),
                &reran,
            )
        };
        let job = Job {
            idx: i,
            resources: node.resources,
            kind,
            key,
            manifest,
            upstream,
            reasons,
            forced,
        };
        self.states[i] = State::Queued(Box::new(job));
        self.queue.insert(i);
    }

    fn started(&mut self, i: usize, job: &Job) {
        self.keys[i] = Some(job.key);
        self.reporter.event(&Event::StageStarted {
            stage: self.recipe.stages[i].name.clone(),
            key: job.key.to_hex(),
            reasons: job.reasons.clone(),
            cascade: key::is_cascade(&job.reasons),
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
        self.done(i, entry);
    }

    fn done(&mut self, i: usize, entry: Arc<Entry>) {
        self.states[i] = State::Done(entry);
        for d in self.downstream[i].clone() {
            if let State::Waiting(k) = &mut self.states[d] {
                *k -= 1;
                if *k == 0 {
                    self.ready.insert(d);
                }
            }
        }
    }

    fn finished(&mut self, i: usize, outcome: Outcome) {
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
                self.done(i, entry);
            }
            Outcome::Hit(entry) => self.hit(i, entry),
            Outcome::Failed(error, elapsed) => self.fail(i, None, error, elapsed),
            Outcome::Cancelled => {
                self.states[i] = State::Dead;
                self.summary.skipped.push(name);
            }
        }
    }

    /// Mark `i` failed and every stage downstream of it skipped.
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
        let mut stack = self.downstream[i].clone();
        while let Some(d) = stack.pop() {
            if matches!(self.states[d], State::Dead) {
                continue;
            }
            self.ready.remove(&d);
            self.queue.remove(&d);
            self.states[d] = State::Dead;
            if self.selected[d] {
                self.summary
                    .skipped
                    .push(self.recipe.stages[d].name.clone());
            }
            stack.extend(self.downstream[d].iter().copied());
        }
    }
}

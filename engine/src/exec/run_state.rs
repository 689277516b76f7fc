//! The bookkeeping both executors share: where each stage stands, what a hit, a commit or a
//! failure means for it and for its dependents, the events that report it and the summary.
//!
//! The executors differ only in *how* a stage that must run is run: the local one starts a
//! thread ([`super::local`]); the Slurm one submits a job ([`super::slurm`]), which is the
//! one state only it uses ([`Slot::Remote`], generic so that this module knows nothing of
//! Slurm). Everything else — selection, the upstream/downstream graph, key and lookup of a
//! stage whose inputs are committed, rerun reasons, skipping the dependents of a failure,
//! the summary counts and the events — is written once here, so that both executors report
//! the same run the same way.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::{Cache, Entry, Key, Lookup, MissReason};

use super::keys;
use super::stage_run::{self, FinishError, Job, Outcome};
use super::{ExecError, RunOptions, RunSummary};
use crate::events::{Event, Reporter};
use crate::key::{self, KeyManifest, RerunReason};
use crate::recipe::{Input, Recipe};
use crate::stage::{Registry, StageKind};

/// Where a stage stands; `R` is the executor's own "running elsewhere" state.
pub(super) enum Slot<R> {
    /// Waiting for this many upstream stages to be done.
    Waiting(usize),
    /// A miss, queued to run in this process.
    Queued(Box<Job>),
    /// Running in this process.
    Running,
    /// Handed to another system (a Slurm job).
    Remote(R),
    /// Hit or committed: downstream stages read this entry.
    Done(Arc<Entry>),
    /// Failed, skipped, or unavailable (not selected and not cached).
    Dead,
}

/// Why a stage cannot run: the key, when known, and a one-line message.
pub(super) type Failure = (Option<Key>, String);

/// The state of one run, shared by the executors.
pub(super) struct RunState<'a, R> {
    pub recipe: &'a Recipe,
    pub cache: &'a Cache,
    pub reporter: &'a dyn Reporter,
    pub opts: &'a RunOptions,
    pub kinds: Vec<Option<Arc<dyn StageKind>>>,
    pub slots: Vec<Slot<R>>,
    /// Data inputs, and `after` edges between selected stages, of relevant stages.
    pub upstream: Vec<BTreeSet<usize>>,
    pub downstream: Vec<Vec<usize>>,
    pub selected: Vec<bool>,
    /// Selected stages and everything they read (which must then be hits).
    pub relevant: Vec<bool>,
    /// Relevant stages whose upstream stages are all done: their key can be computed.
    pub ready: BTreeSet<usize>,
    /// Misses waiting for a job slot in this process, in topological order.
    pub queue: BTreeSet<usize>,
    /// Each relevant stage's ref when the run began, when the executor took that snapshot
    /// ([`RunState::snapshot_refs`]); otherwise refs are read when reasons are needed.
    old_refs: Option<Vec<Option<Key>>>,
    /// Stages computed in this run (for cascade reasons).
    ran_here: Vec<bool>,
    /// Keys of started stages (so a failure can name its key).
    keys: Vec<Option<Key>>,
    summary: RunSummary,
    started: Instant,
    /// Directories that hits touch files in, open for the whole run.
    dirs: Arc<stage_run::OpenDirs>,
    /// The experiment's run memo.
    memo: Arc<stage_run::RunMemo>,
}

impl<'a, R> RunState<'a, R> {
    /// The graph of the selected stages and what they read.
    ///
    /// # Errors
    /// [`ExecError::BadSelection`] for out-of-range indices.
    pub fn new(
        recipe: &'a Recipe,
        registry: &Registry,
        cache: &'a Cache,
        reporter: &'a dyn Reporter,
        opts: &'a RunOptions,
    ) -> Result<Self, ExecError> {
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
        let slots = upstream.iter().map(|u| Slot::Waiting(u.len())).collect();
        let ready = (0..n)
            .filter(|&i| relevant[i] && upstream[i].is_empty())
            .collect();
        Ok(Self {
            recipe,
            cache,
            reporter,
            opts,
            kinds: recipe
                .stages
                .iter()
                .map(|s| registry.get(&s.kind).cloned())
                .collect(),
            slots,
            upstream,
            downstream,
            selected,
            relevant,
            ready,
            queue: BTreeSet::new(),
            old_refs: None,
            ran_here: vec![false; n],
            keys: vec![None; n],
            summary: RunSummary::default(),
            started,
            dirs: Arc::new(stage_run::OpenDirs::open(recipe, opts.runs_dir.as_deref())),
            memo: Arc::new(stage_run::RunMemo::new(cache.load_memo(&recipe.experiment))),
        })
    }

    /// Diff rerun reasons against each relevant stage's ref as it is now, not as it is when
    /// the reasons are computed: a remote job may commit (and move the ref) first.
    pub fn snapshot_refs(&mut self) {
        let (recipe, cache) = (self.recipe, self.cache);
        let has_refs = cache.has_refs(&recipe.experiment);
        self.old_refs = Some(
            (0..recipe.stages.len())
                .map(|i| {
                    (self.relevant[i] && has_refs)
                        .then(|| {
                            let name = &recipe.stages[i].name;
                            cache.get_ref(&recipe.experiment, name).ok().flatten()
                        })
                        .flatten()
                })
                .collect(),
        );
    }

    /// Report the start of the run (the number of selected stages it concerns).
    pub fn announce(&self) {
        let total = (0..self.slots.len())
            .filter(|&i| self.relevant[i] && self.selected[i])
            .count();
        self.reporter.event(&Event::RunStarted {
            experiment: self.recipe.experiment.clone(),
            stages: total,
            jobs: self.opts.jobs,
        });
    }

    /// What every stage run in this process is given.
    pub fn env(&self) -> stage_run::Env<'a> {
        stage_run::Env {
            recipe: self.recipe,
            cache: self.cache,
            reporter: self.reporter,
            cancel: &self.opts.cancel,
            runs_dir: self.opts.runs_dir.as_deref(),
            dirs: self.dirs.clone(),
            memo: self.memo.clone(),
        }
    }

    /// Whether every upstream stage of `i` is done.
    pub fn ups_done(&self, i: usize) -> bool {
        self.upstream[i]
            .iter()
            .all(|&u| matches!(self.slots[u], Slot::Done(_)))
    }

    /// The committed entries of `i`'s inputs, in `node.inputs` order.
    pub fn input_entries(&self, i: usize) -> Option<Vec<Arc<Entry>>> {
        self.recipe.stages[i]
            .inputs
            .iter()
            .map(|inp| match &self.slots[inp.stage] {
                Slot::Done(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// The key manifest of `i` over its inputs' entries (`upstream`, in `node.inputs` order).
    pub fn manifest(&self, i: usize, upstream: &[Arc<Entry>]) -> Result<KeyManifest, String> {
        let node = &self.recipe.stages[i];
        let kind = self.kinds[i]
            .as_ref()
            .ok_or_else(|| format!("BUG: kind `{}` is not registered", node.kind))?;
        manifest_over(
            self.recipe,
            self.cache,
            &self.opts.env,
            i,
            kind.as_ref(),
            upstream,
        )
    }

    /// Why `i` runs (with key `key`, after lookup result `miss`).
    pub fn reasons(
        &self,
        i: usize,
        key: &Key,
        manifest: &KeyManifest,
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
        match &self.old_refs {
            Some(refs) => reasons_since(self.cache, refs[i], key, manifest, miss, &reran),
            None => miss_reasons(
                self.cache,
                &self.recipe.experiment,
                &node.name,
                key,
                manifest,
                miss,
                &reran,
            ),
        }
    }

    /// The key of `i` and why it runs, once its inputs are committed.
    pub fn key_and_reasons(&self, i: usize) -> Option<(Key, Vec<RerunReason>)> {
        let upstream = self.input_entries(i)?;
        let manifest = self.manifest(i, &upstream).ok()?;
        let key = manifest.key();
        let reasons = self.reasons(i, &key, &manifest, None);
        Some((key, reasons))
    }

    /// Every input of `i` is committed: compute its key and look it up. A hit is finished
    /// and recorded here (`Ok(None)`); a miss comes back as the job that computes it; a stage
    /// that cannot run comes back as the failure for the executor to record
    /// ([`RunState::fail`]).
    pub fn resolve(&mut self, i: usize) -> Result<Option<Job>, Failure> {
        let looked = match self.lookup_input(i) {
            Ok(input) => look(&self.look_env(), input),
            Err(failure) => Looked::Failed(failure),
        };
        self.apply(looked)
    }

    /// [`RunState::resolve`] for every stage of `batch` (ready stages, ascending), with the
    /// per-stage work — key, manifest read, object stats, ref, restore — spread over rayon's
    /// threads when the batch is big enough to pay for waking them. What each stage's
    /// lookup means for the run is then applied in `batch` order, so events, the summary and
    /// the queue come out the same whatever thread did the work.
    pub fn resolve_batch(&mut self, batch: &[usize]) -> Vec<(usize, Result<Option<Job>, Failure>)> {
        use rayon::prelude::*;
        let inputs: Vec<Result<LookupInput, (usize, Failure)>> = batch
            .iter()
            .map(|&i| self.lookup_input(i).map_err(|f| (i, f)))
            .collect();
        let env = self.look_env();
        let looked: Vec<(usize, Looked)> = if batch.len() >= PAR_BATCH {
            inputs
                .into_par_iter()
                .map(|r| match r {
                    Ok(input) => (input.idx, look(&env, input)),
                    Err((i, f)) => (i, Looked::Failed(f)),
                })
                .collect()
        } else {
            inputs
                .into_iter()
                .map(|r| match r {
                    Ok(input) => (input.idx, look(&env, input)),
                    Err((i, f)) => (i, Looked::Failed(f)),
                })
                .collect()
        };
        looked
            .into_iter()
            .map(|(i, l)| (i, self.apply(l)))
            .collect()
    }

    /// What the lookup of `i` needs from the run's state.
    fn lookup_input(&self, i: usize) -> Result<LookupInput, Failure> {
        let node = &self.recipe.stages[i];
        let Some(kind) = self.kinds[i].clone() else {
            return Err((None, format!("BUG: kind `{}` is not registered", node.kind)));
        };
        let Some(upstream) = self.input_entries(i) else {
            return Err((
                None,
                "BUG: resolved before its inputs were committed".into(),
            ));
        };
        Ok(LookupInput {
            idx: i,
            kind,
            upstream,
            forced: self.opts.force.contains(&i),
        })
    }

    fn look_env(&self) -> LookEnv<'a> {
        LookEnv {
            stage: self.env(),
            key_env: &self.opts.env,
        }
    }

    /// Record what a lookup found: a hit is done, a miss of a selected stage becomes a job
    /// (with its rerun reasons), anything else a failure for the executor to record.
    fn apply(&mut self, looked: Looked) -> Result<Option<Job>, Failure> {
        match looked {
            Looked::Hit(i, entry) => {
                self.hit(i, entry);
                Ok(None)
            }
            Looked::Failed(failure) => Err(failure),
            Looked::Miss(input, key, manifest, miss) => {
                let i = input.idx;
                let node = &self.recipe.stages[i];
                if !self.selected[i] {
                    let msg = format!(
                        "`{}` is not cached and not selected; include it in the selection to run it",
                        node.name
                    );
                    return Err((Some(key), msg));
                }
                let reasons = self.reasons(i, &key, &manifest, miss.as_ref());
                Ok(Some(Job {
                    idx: i,
                    resources: node.resources,
                    kind: input.kind,
                    key,
                    manifest: *manifest,
                    upstream: input.upstream,
                    reasons,
                    forced: input.forced,
                }))
            }
        }
    }

    /// Queue `job` to run in this process.
    pub fn enqueue(&mut self, job: Job) {
        let i = job.idx;
        self.slots[i] = Slot::Queued(Box::new(job));
        self.queue.insert(i);
    }

    /// Take queued stage `i` out of the queue to run it now (it is then `Running`).
    /// `None` (and `i` leaves the queue all the same) when `i` is not queued.
    pub fn take_queued(&mut self, i: usize) -> Option<Box<Job>> {
        self.queue.remove(&i);
        if !matches!(self.slots[i], Slot::Queued(_)) {
            return None;
        }
        match std::mem::replace(&mut self.slots[i], Slot::Running) {
            Slot::Queued(job) => Some(job),
            _ => None,
        }
    }

    /// `stage-started` for `i`, computing as `key` for `reasons`.
    pub fn started(&mut self, i: usize, key: Key, reasons: Vec<RerunReason>) {
        self.keys[i] = Some(key);
        self.reporter.event(&Event::StageStarted {
            stage: self.recipe.stages[i].name.clone(),
            key: key.to_hex(),
            cascade: key::is_cascade(&reasons),
            reasons,
        });
    }

    /// `i` was found committed.
    pub fn hit(&mut self, i: usize, entry: Arc<Entry>) {
        if self.selected[i] {
            let name = self.recipe.stages[i].name.clone();
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

    /// `i` was computed and committed by this run.
    pub fn ran(&mut self, i: usize, entry: Arc<Entry>) {
        let name = self.recipe.stages[i].name.clone();
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

    fn done(&mut self, i: usize, entry: Arc<Entry>) {
        self.slots[i] = Slot::Done(entry);
        for &d in &self.downstream[i] {
            if let Slot::Waiting(k) = &mut self.slots[d] {
                *k -= 1;
                if *k == 0 {
                    self.ready.insert(d);
                }
            }
        }
    }

    /// A stage run in this process ended; returns what [`RunState::fail`] returns.
    pub fn finished(&mut self, i: usize, outcome: Outcome) -> Vec<R> {
        match outcome {
            Outcome::Ran(entry) => self.ran(i, entry),
            Outcome::Hit(entry) => self.hit(i, entry),
            Outcome::Failed(error, elapsed) => return self.fail(i, None, error, elapsed),
            Outcome::Cancelled => {
                self.slots[i] = Slot::Dead;
                let name = self.recipe.stages[i].name.clone();
                self.summary.skipped.push(name);
            }
        }
        Vec::new()
    }

    /// Mark `i` failed and every stage downstream of it skipped. Returns the remote states
    /// of the skipped stages, for the executor to stop them.
    pub fn fail(&mut self, i: usize, key: Option<Key>, error: String, elapsed: Duration) -> Vec<R> {
        let name = self.recipe.stages[i].name.clone();
        let key = key.or(self.keys[i]);
        self.queue.remove(&i);
        self.slots[i] = Slot::Dead;
        self.reporter.event(&Event::StageFailed {
            stage: name.clone(),
            key: key.map(|k| k.to_hex()),
            error: error.clone(),
            elapsed_ms: ms(elapsed),
        });
        self.summary.failed.push((name, error));
        let mut remote = Vec::new();
        let mut stack = self.downstream[i].clone();
        while let Some(d) = stack.pop() {
            if matches!(self.slots[d], Slot::Dead) {
                continue;
            }
            self.ready.remove(&d);
            self.queue.remove(&d);
            if let Slot::Remote(r) = std::mem::replace(&mut self.slots[d], Slot::Dead) {
                remote.push(r);
            }
            if self.selected[d] {
                self.summary
                    .skipped
                    .push(self.recipe.stages[d].name.clone());
            }
            stack.extend(self.downstream[d].iter().copied());
        }
        remote
    }

    /// The summary (selected stages that never got to run count as skipped), reported as
    /// `run-finished`.
    pub fn finish(mut self) -> RunSummary {
        let interrupted = self.opts.cancel.load(std::sync::atomic::Ordering::Relaxed);
        for i in 0..self.slots.len() {
            if self.selected[i]
                && self.relevant[i]
                && matches!(
                    self.slots[i],
                    Slot::Waiting(_) | Slot::Queued(_) | Slot::Remote(_)
                )
            {
                self.summary
                    .skipped
                    .push(self.recipe.stages[i].name.clone());
            }
        }
        self.save_memo();
        self.summary.interrupted = interrupted;
        self.summary.elapsed = self.started.elapsed();
        let s = &self.summary;
        self.reporter.event(&Event::RunFinished {
            ran: s.ran.len(),
            cached: s.cached.len(),
            failed: s.failed.len(),
            skipped: s.skipped.clone(),
            interrupted,
            elapsed_ms: ms(s.elapsed),
        });
        self.summary
    }
}

impl<R> RunState<'_, R> {
    /// Rewrites the experiment's memo with every stage done in this run, unless it
    /// already records each of them at its key. A memo that cannot be written only costs
    /// the next run its manifest reads.
    fn save_memo(&self) {
        let done: Vec<(&str, &Entry)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Done(e) => Some((self.recipe.stages[i].name.as_str(), &**e)),
                _ => None,
            })
            .collect();
        let memo = &self.memo.loaded;
        if done.iter().any(|(name, e)| memo.key(name) != Some(e.key)) {
            let _ = self.cache.save_memo(&self.recipe.experiment, memo, done);
        }
    }
}

/// Ready batches at least this big are looked up on rayon's threads: below it, waking the
/// workers costs more than the few stages' lookups (tens of microseconds each).
const PAR_BATCH: usize = 8;

/// What a stage's lookup needs, taken from the run's state before the lookup starts.
pub(super) struct LookupInput {
    idx: usize,
    kind: Arc<dyn StageKind>,
    /// The committed entries of the stage's inputs, in `node.inputs` order.
    upstream: Vec<Arc<Entry>>,
    forced: bool,
}

/// Everything a lookup reads; shared by the threads of a batch.
struct LookEnv<'a> {
    stage: stage_run::Env<'a>,
    key_env: &'a keys::KeyEnv,
}

/// What a lookup found.
enum Looked {
    /// A hit, finished (ref, links, restore).
    Hit(usize, Arc<Entry>),
    /// Not usable: must be computed (the miss reason when the cache gave one).
    Miss(LookupInput, Key, Box<KeyManifest>, Option<MissReason>),
    /// Cannot run.
    Failed(Failure),
}

/// The key manifest of stage `i` over its inputs' entries (`upstream`, in `node.inputs`
/// order).
fn manifest_over(
    recipe: &Recipe,
    cache: &Cache,
    env: &keys::KeyEnv,
    i: usize,
    kind: &dyn StageKind,
    upstream: &[Arc<Entry>],
) -> Result<KeyManifest, String> {
    let node = &recipe.stages[i];
    // By index: finding each input's position in the list made the join of a wide fan
    // quadratic (16M instructions for 998 inputs).
    let digest = |n: usize, inp: &Input| keys::input_digest(recipe, inp, &upstream[n]).map(Some);
    keys::manifest(recipe, node, kind, cache, env, digest)
        .map(|(m, _)| m)
        .map_err(|e| e.to_string())
}

/// Key, lookup and, on a hit, [`stage_run::finish`] of one stage whose inputs are
/// committed. Touches only the cache and the stage's own files, never the run's state, so
/// the stages of a ready batch can be looked up on several threads at once.
fn look(env: &LookEnv<'_>, input: LookupInput) -> Looked {
    let i = input.idx;
    let (recipe, cache) = (env.stage.recipe, env.stage.cache);
    let node = &recipe.stages[i];
    // The key alone: the manifest is built only for a miss, which records and explains it.
    let digest = |n: usize, inp: &Input| keys::input_digest(recipe, inp, &input.upstream[n]);
    let key = match keys::key(
        recipe,
        node,
        input.kind.as_ref(),
        cache,
        env.key_env,
        digest,
    ) {
        Ok(k) => k,
        Err(e) => return Looked::Failed((None, e.to_string())),
    };
    let mut miss = None;
    if !input.forced {
        // `finish` materializes every output of a hit, which checks each file it uses.
        let memo = env.stage.memo.loaded.entry(cache, &node.name, &key);
        let found = match memo {
            Some(entry) => Ok(Lookup::Hit(Box::new(entry))),
            None => cache.probe_to_materialize(&key),
        };
        match found {
            Ok(Lookup::Hit(entry)) => {
                let entry = Arc::new(*entry);
                match stage_run::finish(&env.stage, node, input.kind.as_ref(), &entry) {
                    Ok(()) => return Looked::Hit(i, entry),
                    // The cache dropped the bad entry: recompute it like any miss.
                    Err(FinishError::Corrupt(_, reason)) => miss = Some(reason),
                    Err(FinishError::Other(e)) => {
                        return Looked::Failed((Some(key), e.to_string()));
                    }
                }
            }
            Ok(Lookup::Miss(reason)) => miss = Some(reason),
            Err(e) => return Looked::Failed((Some(key), format!("cache lookup failed: {e}"))),
        }
    }
    let manifest = match manifest_over(
        recipe,
        cache,
        env.key_env,
        i,
        input.kind.as_ref(),
        &input.upstream,
    ) {
        Ok(m) => m,
        Err(e) => return Looked::Failed((Some(key), e)),
    };
    debug_assert_eq!(
        manifest.key(),
        key,
        "the key of `{}` computed two ways",
        node.name
    );
    Looked::Miss(input, key, Box::new(manifest), miss)
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The reasons a stage with key `key` is not a hit, diffing against the previous run (the
/// stage's ref as it is now).
pub(crate) fn miss_reasons(
    cache: &Cache,
    experiment: &str,
    stage: &str,
    key: &Key,
    manifest: &KeyManifest,
    miss: Option<&MissReason>,
    reran: &dyn Fn(&str) -> bool,
) -> Vec<RerunReason> {
    let old = cache.get_ref(experiment, stage).ok().flatten();
    reasons_since(cache, old, key, manifest, miss, reran)
}

/// The reasons a stage with key `key` is not a hit, diffing against the stage's previous
/// key `old` (its ref).
fn reasons_since(
    cache: &Cache,
    old: Option<Key>,
    key: &Key,
    manifest: &KeyManifest,
    miss: Option<&MissReason>,
    reran: &dyn Fn(&str) -> bool,
) -> Vec<RerunReason> {
    let mut reasons = match old {
        None => vec![RerunReason::NeverRun],
        Some(old) if old == *key => vec![match miss {
            Some(MissReason::Corrupt { detail, .. } | MissReason::BadManifest { detail, .. }) => {
                RerunReason::CacheCorrupt {
                    detail: detail.clone(),
                }
            }
            _ => RerunReason::OutputsMissing,
        }],
        Some(old) => match previous_manifest(cache, &old) {
            Some(prev) => key::diff(&prev, manifest, reran),
            // The previous entry is gone (gc, corruption): all we know is that it ran once.
            None => vec![RerunReason::OutputsMissing],
        },
    };
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

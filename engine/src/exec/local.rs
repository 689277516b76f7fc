//! The local executor: the scheduler loop (see the module docs of [`super`]). What a
//! stage's outcome means for the run is [`super::run_state`]'s, shared with the Slurm
//! executor; this module decides only when a queued stage starts.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use cache::Cache;

use super::run_state::{RunState, Slot};
use super::stage_run::{self, Outcome};
use super::{ExecError, RunOptions, RunSummary};
use crate::events::Reporter;
use crate::recipe::Recipe;
use crate::stage::{Registry, Resources};

pub(crate) use super::run_state::{miss_reasons, previous_manifest};

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
    // Nothing runs elsewhere: the remote state cannot occur.
    let mut run = RunState::<Infallible>::new(recipe, registry, cache, reporter, opts)?;
    run.announce();
    let env = run.env();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        let mut running: Vec<(usize, Resources)> = Vec::new();
        loop {
            let cancelled = opts.cancel.load(Ordering::Relaxed);
            if !cancelled {
                resolve_ready(&mut run);
                // Start queued stages in topological order while jobs and resources allow.
                let queued: Vec<usize> = run.queue.iter().copied().collect();
                for i in queued {
                    if running.len() >= opts.jobs {
                        break;
                    }
                    let Slot::Queued(job) = &run.slots[i] else {
                        continue;
                    };
                    let need = clamp(job.resources, opts.capacity);
                    if !fits(&running, need, opts.capacity) {
                        continue;
                    }
                    let Some(job) = run.take_queued(i) else {
                        continue;
                    };
                    run.started(i, job.key, job.reasons.clone());
                    running.push((i, need));
                    let tx = tx.clone();
                    let env = &env;
                    scope.spawn(move || {
                        let _ = tx.send((i, stage_run::run_job_caught(env, &job)));
                    });
                }
            }
            if running.is_empty() && (cancelled || run.ready.is_empty() && run.queue.is_empty()) {
                break;
            }
            if running.is_empty() && run.ready.is_empty() {
                // Queued stages that cannot start with nothing running would wait forever;
                // `clamp` makes that impossible, so this is a bug.
                let stuck: Vec<usize> = run.queue.iter().copied().collect();
                for i in stuck {
                    let msg = "BUG: the scheduler could not start this stage".into();
                    run.fail(i, None, msg, Duration::ZERO);
                }
                continue;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((i, outcome)) => {
                    running.retain(|(r, _)| *r != i);
                    run.finished(i, outcome);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    Ok(run.finish())
}

/// Compute keys of ready stages and look them up, until no stage is ready (a hit makes its
/// dependents ready at once, so a fully cached recipe resolves in this one call).
///
/// Stages are taken a ready batch at a time (all ready stages, ascending): a batch is
/// looked up in parallel ([`RunState::resolve_batch`]), and its hits make the next batch
/// ready. On a no-op rerun of a wide recipe that spreads the per-stage work (key, manifest
/// read, stats, restore) over the machine's cores.
fn resolve_ready(run: &mut RunState<'_, Infallible>) {
    while !run.ready.is_empty() {
        if run.opts.cancel.load(Ordering::Relaxed) {
            return;
        }
        let batch: Vec<usize> = std::mem::take(&mut run.ready).into_iter().collect();
        for (i, resolved) in run.resolve_batch(&batch) {
            match resolved {
                Ok(Some(job)) => run.enqueue(job),
                Ok(None) => {}
                Err((key, error)) => {
                    run.fail(i, key, error, Duration::ZERO);
                }
            }
        }
    }
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

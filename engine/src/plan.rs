//! `plan` and `explain`: what a run would do, and why, without running anything.
//!
//! The plan walks the stages in topological order, exactly like the executor, but never
//! runs one. A stage whose inputs are all hits gets its real key and is a `hit` or a `run`.
//! A stage downstream of a `run` cannot have a key yet (its input digests do not exist):
//! it is `maybe` (the upstream may reproduce identical bytes, and then it stays cached), or
//! `run` when it has a reason of its own (a changed param, file, version...). Its reasons
//! come from diffing against the previous run's manifest with the unknown inputs taken from
//! that manifest, plus one `input-changed (upstream reran)` per unknown input.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use cache::{Cache, Entry, Key, Lookup};
use serde::Serialize;

use crate::exec::keys::{self, KeyEnv};
use crate::exec::local::{miss_reasons, previous_manifest};
use crate::key::{self, KeyManifest, RerunReason};
use crate::recipe::Recipe;
use crate::stage::Registry;

/// The plan's verdict on one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Cached: the run will reuse it.
    Hit,
    /// Will run.
    Run,
    /// Runs only if an upstream stage that reruns produces different bytes.
    Maybe,
    /// Cannot run (a missing external file, a failing upstream...).
    Error,
}

impl Status {
    /// Lower-case name, as shown in the plan table.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Run => "run",
            Self::Maybe => "maybe",
            Self::Error => "error",
        }
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    /// Stage name.
    pub stage: String,
    /// Verdict.
    pub status: Status,
    /// The key, when it is known.
    pub key: Option<Key>,
    /// Every reason for `run`/`maybe`.
    pub reasons: Vec<RerunReason>,
    /// The error, for `error`.
    pub error: Option<String>,
    /// What a hit saves (the committed run's duration).
    pub time_saved_ms: Option<u64>,
}

impl PlanRow {
    /// Whether every reason is an upstream rerun (printed after roots).
    #[must_use]
    pub fn is_cascade(&self) -> bool {
        key::is_cascade(&self.reasons)
    }
}

/// A whole plan, in topological order.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// One row per stage.
    pub rows: Vec<PlanRow>,
}

/// What is known about a stage while planning.
enum Known {
    Hit(Arc<Entry>),
    Run,
    Maybe,
    Error,
}

/// Plan every stage of `recipe`; `force` lists stage indices to treat as forced.
#[must_use]
pub fn plan(
    recipe: &Recipe,
    registry: &Registry,
    cache: &Cache,
    env: &KeyEnv,
    force: &BTreeSet<usize>,
) -> Plan {
    plan_with_manifests(recipe, registry, cache, env, force, false).0
}

/// The plan plus, when `keep` is set, each stage's current manifest (complete when its key
/// is known). A plain plan keeps none: holding (and freeing) 10,000 manifests was a tenth of
/// the time of a large plan.
fn plan_with_manifests(
    recipe: &Recipe,
    registry: &Registry,
    cache: &Cache,
    env: &KeyEnv,
    force: &BTreeSet<usize>,
    keep: bool,
) -> (Plan, Vec<Option<KeyManifest>>) {
    // A cache that has never committed a stage of this experiment has no previous manifests:
    // skip the per-stage ref lookups (one failing `open` each) of a cold plan.
    let any_refs = cache.has_refs(&recipe.experiment);
    let mut known: Vec<Known> = Vec::with_capacity(recipe.stages.len());
    let mut rows = Vec::with_capacity(recipe.stages.len());
    let mut manifests = Vec::with_capacity(recipe.stages.len());
    for (i, node) in recipe.stages.iter().enumerate() {
        let mut row = PlanRow {
            stage: node.name.clone(),
            status: Status::Error,
            key: None,
            reasons: Vec::new(),
            error: None,
            time_saved_ms: None,
        };
        let Some(kind) = registry.get(&node.kind) else {
            row.error = Some(format!("BUG: kind `{}` is not registered", node.kind));
            rows.push(row);
            known.push(Known::Error);
            manifests.push(None);
            continue;
        };
        if let Some(bad) = node
            .inputs
            .iter()
            .find(|inp| matches!(known[inp.stage], Known::Error))
        {
            // Its own missing files are named too, so one `plan` lists everything a recipe
            // lacks (data and weights), not only the first stage that lacks something.
            let mut msg = format!("upstream `{}` cannot run", recipe.stages[bad.stage].name);
            if let Err(e) = keys::check_externals(recipe, node, cache) {
                msg = format!("{e}; {msg}");
            }
            row.error = Some(msg);
            rows.push(row);
            known.push(Known::Error);
            manifests.push(None);
            continue;
        }
        if !any_refs
            && !keep
            && node
                .inputs
                .iter()
                .any(|inp| !matches!(known[inp.stage], Known::Hit(_)))
        {
            // Never ran and an input is not known yet: the answer is `never run` whatever the
            // manifest says, so it is not built (most of a cold plan's own time). Unreadable
            // external files are still errors.
            if let Err(e) = keys::check_externals(recipe, node, cache) {
                row.error = Some(e.to_string());
                rows.push(row);
                known.push(Known::Error);
                manifests.push(None);
                continue;
            }
            row.reasons = vec![RerunReason::NeverRun];
            if force.contains(&i) {
                row.reasons.insert(0, RerunReason::Forced);
            }
            row.status = Status::Run;
            rows.push(row);
            known.push(Known::Run);
            manifests.push(None);
            continue;
        }
        let digest = |_: usize, inp: &crate::recipe::Input| match &known[inp.stage] {
            Known::Hit(e) => keys::input_digest(recipe, inp, e).map(Some),
            _ => Ok(None),
        };
        let (manifest, unknown) =
            match keys::manifest(recipe, node, kind.as_ref(), cache, env, digest) {
                Ok(m) => m,
                Err(e) => {
                    row.error = Some(e.to_string());
                    rows.push(row);
                    known.push(Known::Error);
                    manifests.push(None);
                    continue;
                }
            };
        let forced = force.contains(&i);
        let state = if unknown.is_empty() {
            let k = manifest.key();
            row.key = Some(k);
            let miss = if forced {
                None
            } else {
                match cache.probe_outputs(&k) {
                    Ok(Lookup::Hit(entry)) => {
                        row.status = Status::Hit;
                        row.time_saved_ms = Some(entry.manifest.duration_ms);
                        rows.push(row);
                        known.push(Known::Hit(Arc::new(*entry)));
                        manifests.push(keep.then_some(manifest));
                        continue;
                    }
                    Ok(Lookup::Miss(m)) => Some(m),
                    Err(e) => {
                        row.error = Some(format!("cache lookup failed: {e}"));
                        rows.push(row);
                        known.push(Known::Error);
                        manifests.push(keep.then_some(manifest));
                        continue;
                    }
                }
            };
            row.reasons = if forced {
                vec![RerunReason::Forced]
            } else {
                miss_reasons(
                    cache,
                    &recipe.experiment,
                    &node.name,
                    &k,
                    &manifest,
                    miss.as_ref(),
                    &|_| false,
                )
            };
            row.status = Status::Run;
            Known::Run
        } else {
            row.reasons = if any_refs {
                maybe_reasons(recipe, cache, i, &manifest, &unknown)
            } else {
                vec![RerunReason::NeverRun]
            };
            if forced {
                row.reasons.insert(0, RerunReason::Forced);
            }
            let root = row.reasons.iter().any(|r| !r.is_cascade());
            row.status = if root { Status::Run } else { Status::Maybe };
            if root { Known::Run } else { Known::Maybe }
        };
        rows.push(row);
        known.push(state);
        manifests.push(keep.then_some(manifest));
    }
    (Plan { rows }, manifests)
}

/// Reasons of a stage with unknown inputs: the previous manifest's digests stand in for the
/// unknown ones, and each unknown input is reported as changed by its rerunning upstream.
fn maybe_reasons(
    recipe: &Recipe,
    cache: &Cache,
    i: usize,
    manifest: &KeyManifest,
    unknown: &[usize],
) -> Vec<RerunReason> {
    let node = &recipe.stages[i];
    let prev = cache
        .get_ref(&recipe.experiment, &node.name)
        .ok()
        .flatten()
        .and_then(|k| previous_manifest(cache, &k));
    let Some(prev) = prev else {
        return vec![RerunReason::NeverRun];
    };
    // Both input lists are sorted by `(param, position)`: look up, never scan (a fan-in
    // stage has thousands of inputs).
    let pos = |inputs: &[crate::key::InputDigest], inp: &crate::recipe::Input| {
        inputs
            .binary_search_by(|d| {
                (d.param.as_str(), d.position).cmp(&(inp.param.as_str(), inp.position))
            })
            .ok()
    };
    let mut guess = manifest.clone();
    for &n in unknown {
        let inp = &node.inputs[n];
        if let (Some(o), Some(g)) = (pos(&prev.inputs, inp), pos(&guess.inputs, inp)) {
            guess.inputs[g].digest = prev.inputs[o].digest;
        }
    }
    let mut reasons = key::diff(&prev, &guess, &|_| false);
    // One `input-changed (upstream reran)` per (param, upstream) pair of the unknown inputs,
    // replacing whatever the diff said about that pair.
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut cascade = Vec::new();
    for &n in unknown {
        let inp = &node.inputs[n];
        let up = recipe.stages[inp.stage].name.as_str();
        if seen.insert((inp.param.as_str(), up)) {
            cascade.push(RerunReason::InputChanged {
                input: inp.param.clone(),
                upstream: up.to_owned(),
                reran: true,
            });
        }
    }
    reasons.retain(|r| !matches!(r, RerunReason::InputChanged { input, upstream, .. } if seen.contains(&(input.as_str(), upstream.as_str()))));
    reasons.extend(cascade);
    reasons
}

/// Everything `explain` says about one stage.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The stage's plan row.
    pub row: PlanRow,
    /// The key of the stage's last committed run, if any.
    pub previous_key: Option<Key>,
    /// Every difference between the current manifest and the last committed one (empty if
    /// they are the same run).
    pub differences: Vec<RerunReason>,
    /// The current manifest (input digests of upstream stages that would rerun are zero).
    pub manifest: Option<KeyManifest>,
}

/// Explain stage `idx`: its plan row and its full diff against the last committed run.
#[must_use]
pub fn explain(
    recipe: &Recipe,
    registry: &Registry,
    cache: &Cache,
    env: &KeyEnv,
    idx: usize,
) -> Explanation {
    let (plan, mut manifests) =
        plan_with_manifests(recipe, registry, cache, env, &BTreeSet::new(), true);
    let row = plan.rows[idx].clone();
    let manifest = manifests.swap_remove(idx);
    let previous_key = cache
        .get_ref(&recipe.experiment, &recipe.stages[idx].name)
        .ok()
        .flatten();
    let differences = match (&row.status, &manifest, &previous_key) {
        // The ref may point at another key than the hit (a reverted edit): still diff it.
        (Status::Hit, Some(m), Some(prev)) if Some(*prev) != row.key => {
            previous_manifest(cache, prev)
                .map(|p| key::diff(&p, m, &|_| false))
                .unwrap_or_default()
        }
        (Status::Hit, ..) => Vec::new(),
        _ => row.reasons.clone(),
    };
    Explanation {
        row,
        previous_key,
        differences,
        manifest,
    }
}

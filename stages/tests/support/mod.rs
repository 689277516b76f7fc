//! Running a stage kind in a test the way the engine runs it, without the engine: outputs
//! in `work/out/<name>`, checkpoints in `work/ckpt`, the kind's parameter defaults filled
//! in as the recipe layer fills them, and each input's paths given as a parameter. Shared by
//! the kind tests (`mod support;`) so that they all build contexts the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::stage::{NoProgress, Progress, Resources, StageCtx, StageError, StageKind};
use serde_json::{Value, json};

/// Cancels the run once `at` progress units are done (a simulated kill).
struct StopAt {
    at: u64,
    flag: Arc<AtomicBool>,
}

impl Progress for StopAt {
    fn progress(&self, done: u64, _: u64, _: &str) {
        if done >= self.at {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// How a stage is run, beyond its kind, parameters and inputs.
#[derive(Clone, Copy)]
pub(crate) struct How<'a> {
    /// `StageCtx::name`.
    pub name: &'a str,
    pub seed: u64,
    /// Cancel the run once this many progress units are done.
    pub stop_at: Option<u64>,
    /// Inputs given as a list even with one path (gathers such as `@eval/*`); any other
    /// input with one path is given as a string.
    pub lists: &'a [&'a str],
}

/// Runs `kind` in `work`; returns the first output's directory and the stage's log.
///
/// # Errors
/// The kind's own error.
pub(crate) fn run_kind(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, Vec<PathBuf>)],
    how: How<'_>,
) -> Result<(PathBuf, String), StageError> {
    let out_dir = work.join("out");
    let ckpt = work.join("ckpt");
    for o in kind.outputs(&params) {
        std::fs::create_dir_all(out_dir.join(o.name)).unwrap();
    }
    std::fs::create_dir_all(&ckpt).unwrap();
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, p)| ((*k).to_string(), p.clone()))
        .collect();
    let mut full = serde_json::Map::new();
    for s in kind.params() {
        if let Some(d) = s.default {
            full.insert(s.name.to_string(), d);
        }
    }
    for (k, v) in params.as_object().unwrap() {
        full.insert(k.clone(), v.clone());
    }
    for (k, p) in &inputs {
        let v = if p.len() == 1 && !how.lists.contains(&k.as_str()) {
            json!(p[0].to_str().unwrap())
        } else {
            json!(p.iter().map(|x| x.to_str().unwrap()).collect::<Vec<_>>())
        };
        full.insert(k.clone(), v);
    }
    let params = Value::Object(full);
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = how.stop_at.map(|at| StopAt {
        at,
        flag: cancel.clone(),
    });
    let mut log = Vec::new();
    let mut ctx = StageCtx {
        name: how.name,
        recipe_dir: work,
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        checkpoint_dir: &ckpt,
        seed: how.seed,
        cancel,
        progress: stop.as_ref().map_or(&NoProgress as &dyn Progress, |s| s),
        log: &mut log,
        resources: Resources::default(),
    };
    kind.run(&mut ctx)?;
    let first = kind.outputs(&params)[0].name;
    Ok((out_dir.join(first), String::from_utf8(log).unwrap()))
}

/// Inputs with one path each, as [`run_kind`] takes them.
#[must_use]
pub(crate) fn single<'a>(inputs: &[(&'a str, &Path)]) -> Vec<(&'a str, Vec<PathBuf>)> {
    inputs
        .iter()
        .map(|(k, p)| (*k, vec![p.to_path_buf()]))
        .collect()
}

/// Every file under `dir`, by path relative to it, with its bytes.
#[must_use]
pub(crate) fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

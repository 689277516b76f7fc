//! Training checkpoints: everything needed to resume a run so that it ends bit-identical to an
//! uninterrupted one (on the CPU, where every op is deterministic).
//!
//! ## On disk
//!
//! ```text
//! <dir>/
//!   latest                    name of the newest complete checkpoint (written last, atomically)
//!   step-00000040/
//!     trainable.safetensors   every trainable parameter, by model name, in its own dtype
//!     optimizer.safetensors   `m.<name>`, `v.<name>`: AdamW moments (f32)
//!     state.json              step, data position, seed, and a fingerprint of the run's settings
//! ```
//!
//! The frozen base is not saved: it is an input of the run and is reloaded from where it came
//! from. The random state is not a generator snapshot either: every source of randomness in a
//! run is derived from `(seed, step, micro-batch)` or `(seed, epoch)` (see `trainer`), so the
//! step counter *is* the RNG state and resuming cannot drift.
//!
//! A checkpoint is written into `tmp-<step>/`, renamed into place, and only then named in
//! `latest` (itself replaced by rename). A run killed at any instant therefore leaves either the
//! previous checkpoint or the new one as `latest`, never a torn one. Older checkpoints beyond
//! `keep` are removed after the new one is committed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::TrainError;

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the next example to draw.
    pub epoch: u64,
    /// Offset of the next example inside that epoch's order.
    pub offset: u64,
    /// The run's seed (every random stream derives from it and the counters above).
    pub seed: u64,
    /// Fingerprint of the settings that must not change across a resume.
    pub fingerprint: String,
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// Counters and seed.
    pub state: TrainState,
    /// Trainable parameters by name.
    pub params: BTreeMap<String, Tensor>,
    /// AdamW moments `(m, v)` by parameter name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// The checkpoint directory it came from.
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes a checkpoint for `state.step` under `dir` and makes it `latest`; keeps the newest
/// `keep` checkpoints (at least one).
pub fn save(
    dir: &Path,
    state: &TrainState,
    params: &[(String, Tensor)],
    moments: &BTreeMap<String, (Tensor, Tensor)>,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!("tmp-{:08}", state.step));
    let fin = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let file = tmp.join("trainable.safetensors");
    let params: Vec<(String, Tensor)> = params.to_vec();
    candle_core::safetensors::save(&params.into_iter().collect(), &file)
        .map_err(|e| TrainError::Checkpoint(format!("cannot write `{}`: {e}", file.display())))?;
    let mut opt = std::collections::HashMap::new();
    for (k, (m, v)) in moments {
        opt.insert(format!("m.{k}"), m.clone());
        opt.insert(format!("v.{k}"), v.clone());
    }
    let file = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&opt, &file)
        .map_err(|e| TrainError::Checkpoint(format!("cannot write `{}`: {e}", file.display())))?;
    let file = tmp.join("state.json");
    let json =
        serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    std::fs::write(&file, json).map_err(io(&file))?;
    if fin.exists() {
        // A previous attempt reached this step and was killed before naming it `latest`.
        std::fs::remove_dir_all(&fin).map_err(io(&fin))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
    let latest_tmp = dir.join("latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(io(&latest_tmp))?;
    std::fs::rename(&latest_tmp, dir.join("latest")).map_err(io(dir))?;
    prune(dir, &name, keep.max(1))?;
    Ok(fin)
}

/// Removes all but the newest `keep` `step-*` checkpoints (never `current`).
fn prune(dir: &Path, current: &str, keep: usize) -> Result<(), TrainError> {
    let mut steps: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for old in steps.into_iter().take(excess).filter(|n| n != current) {
        let p = dir.join(old);
        std::fs::remove_dir_all(&p).map_err(io(&p))?;
    }
    Ok(())
}

/// Loads the checkpoint named in `<dir>/latest`, or `None` if there is none yet.
pub fn load_latest(dir: &Path, device: &Device) -> Result<Option<Checkpoint>, TrainError> {
    let latest = dir.join("latest");
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(TrainError::Io {
                path: latest,
                source: e,
            });
        }
    };
    let ck = dir.join(&name);
    let bad = |msg: String| TrainError::Checkpoint(format!("`{}`: {msg}", ck.display()));
    let state_file = ck.join("state.json");
    let text = std::fs::read_to_string(&state_file).map_err(io(&state_file))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let params: BTreeMap<String, Tensor> =
        candle_core::safetensors::load(ck.join("trainable.safetensors"), device)
            .map_err(|e| bad(format!("trainable.safetensors: {e}")))?
            .into_iter()
            .collect();
    let mut opt = candle_core::safetensors::load(ck.join("optimizer.safetensors"), device)
        .map_err(|e| bad(format!("optimizer.safetensors: {e}")))?;
    let mut moments = BTreeMap::new();
    for name in params.keys() {
        let m = opt.remove(&format!("m.{name}"));
        let v = opt.remove(&format!("v.{name}"));
        match (m, v) {
            (Some(m), Some(v)) => {
                moments.insert(name.clone(), (m, v));
            }
            _ => {
                return Err(bad(format!(
                    "optimizer.safetensors lacks moments for `{name}`"
                )));
            }
        }
    }
    Ok(Some(Checkpoint {
        state,
        params,
        moments,
        dir: ck,
    }))
}

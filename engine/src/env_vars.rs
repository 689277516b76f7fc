//! Every environment variable `pipeline` reads, in one place.
//!
//! The engine never calls `std::env::var` for a value that can change results outside this
//! module: such values are listed in [`KEYED`], captured once per run by [`keyed_env`] and
//! hashed into every stage key, so a stage can never silently depend on the environment.

use std::collections::BTreeMap;

/// Default cache directory (`--cache-dir`).
pub const PIPELINE_CACHE_DIR: &str = "PIPELINE_CACHE_DIR";
/// Default runs directory (`--runs-dir`).
pub const PIPELINE_RUNS_DIR: &str = "PIPELINE_RUNS_DIR";
/// Device class the ML stages compute on (`cpu`, `cuda`); changes numerics, so it is keyed.
pub const PIPELINE_DEVICE: &str = "PIPELINE_DEVICE";
/// A free salt mixed into every key: set it to force a fresh cache namespace without
/// deleting the cache.
pub const PIPELINE_KEY_SALT: &str = "PIPELINE_KEY_SALT";
/// Set by the engine for `shell` children: the stage's derived seed.
pub const PIPELINE_SEED: &str = "PIPELINE_SEED";
/// Set by the engine for `shell` children: the stage's name.
pub const PIPELINE_STAGE: &str = "PIPELINE_STAGE";
/// Set by the engine for `shell` children: the stage's checkpoint directory.
pub const PIPELINE_CHECKPOINT_DIR: &str = "PIPELINE_CHECKPOINT_DIR";

/// Variables whose values go into every stage key.
pub const KEYED: &[&str] = &[PIPELINE_DEVICE, PIPELINE_KEY_SALT];

/// The keyed variables that are set in this process (unset ones are left out, so that
/// setting one later is reported as `unset → value`).
#[must_use]
pub fn keyed_env() -> BTreeMap<String, String> {
    KEYED
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|v| ((*name).to_owned(), v)))
        .collect()
}

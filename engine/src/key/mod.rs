//! Stage keys: what makes two runs of a stage "the same".
//!
//! A stage key is blake3 (in derive-key mode, domain `pipeline 2026-11 stage key`) over the
//! canonical encoding ([`hasher`]) of a [`KeyManifest`]. The manifest is stored with the
//! cache entry, so a miss can be explained by diffing it against the manifest of the stage's
//! last committed run ([`reason::diff`]).
//!
//! # What is in the key, and what is not
//!
//! | component | in key | why |
//! |---|---|---|
//! | [`KEY_SCHEMA`] | yes | a change of this encoding must never alias old entries |
//! | stage kind name | yes | two kinds with equal params compute different things |
//! | kind `VERSION` | yes | bumped when a kind's outputs change for the same inputs |
//! | canonical params (sorted keys, fixed floats, defaults filled) | yes | they are what the user controls; defaults filled so that spelling a default out does not rerun |
//! | reference strings (`"@asd/GQA"`) | no: replaced by `"@input"` | renaming an upstream stage must not rerun its dependents; the content is keyed instead |
//! | each input's upstream *output tree digest* | yes | content, not the upstream key: a rerun producing identical bytes leaves dependents cached (early cutoff) |
//! | upstream stage and output names | recorded only | for `explain` |
//! | external files' content digests (through the stat cache) | yes | datasets, weights and tokenizers are identified by bytes, not by path |
//! | external paths as written (relative to the recipe) | yes, as params | it is the recipe's spelling; the absolute location is not |
//! | derived seed (`derive_key(experiment seed, stage name)`) | yes | sampling and training results depend on it |
//! | allowlisted env values ([`crate::env_vars::KEYED`]) | yes | only those that change numerics (device class, key salt) |
//! | absolute paths, cache/runs dirs | no | moving a checkout must not rerun anything |
//! | mtimes, inode numbers | no | the stat cache uses them only to *skip* rehashing |
//! | hostname, user, thread counts (`--jobs`, `RAYON_NUM_THREADS`) | no | results do not depend on them |
//! | `resources` (cpus, memory, gpus, time), executor | no | where and how wide a stage runs does not change its bytes |
//! | GPU indices (`CUDA_VISIBLE_DEVICES`), log levels, `-v`/`-q`/`--json` | no | presentation and placement only |
//! | `after = [...]` ordering edges | no | they order work; they carry no data |
//!
//! A key is computed only once every input digest is known, that is once the upstream stage
//! is a hit or has committed in this run. Until then `plan` reports the stage as `maybe`.

pub mod hasher;
pub mod manifest;
pub mod reason;

pub use hasher::{StableHash, StableHasher};
pub use manifest::{
    ExternalDigest, InputDigest, KeyManifest, REF_PLACEHOLDER, derive_seed, mask_refs,
};
pub use reason::{RerunReason, diff, is_cascade};

/// Version of the key encoding. Bump it with any change to [`hasher`] or to the fields of
/// [`KeyManifest::key`]; every key then changes and reruns report `key-schema-changed`.
pub const KEY_SCHEMA: u32 = 1;

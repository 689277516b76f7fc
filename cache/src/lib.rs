//! The content-addressed store of `pipeline`: objects, stage entries, refs, leases, gc.
//!
//! The engine computes a stage's key; this crate stores and finds the stage's outputs under
//! it. Nothing here knows about recipes, stages' semantics or candle.
//!
//! # On-disk layout
//!
//! ```text
//! <root>/                         (e.g. `.pipeline/`)
//! └── v1/                         layout version; a new layout gets a new directory
//!     ├── objects/<aa>/<blake3>   file contents, content-addressed, read-only
//!     ├── entries/<key>/
//!     │   ├── manifest.json       the commit marker, written last (see `Manifest`)
//!     │   └── log.txt             the stage's captured log
//!     ├── trees/<tree-digest>/    materialized outputs: read-only dirs of hardlinks into
//!     │                           objects, built atomically (what stages and `runs/` see)
//!     ├── refs/<experiment>/<stage>.json   last committed key (for "diff against last run")
//!     ├── checkpoints/<key>/      stage scratch that survives interruption; removed on commit
//!     ├── locks/<key>.lock        per-key leases (flock + pid/host/heartbeat record)
//!     ├── tmp/                    staging dirs and tree builds (same filesystem: renames)
//!     ├── gc.lock                 commits hold it shared, `gc` exclusive
//!     └── statcache.bin           (dev, inode, size, mtime, ctime) -> digest
//! ```
//!
//! # Using it (the engine's view)
//!
//! ```no_run
//! # use cache::*;
//! # fn main() -> Result<()> {
//! # let key = Digest::of_bytes(b"key"); let inputs = serde_json::json!({});
//! let cache = Cache::open(std::path::Path::new(".pipeline"))?;
//! let entry = match cache.lookup(&key)? {
//!     Some(hit) => hit,
//!     None => match cache.lock(&key)? {
//!         LockOutcome::Hit(entry) => *entry, // another process computed it while we waited
//!         LockOutcome::Acquired(_lease) => {
//!             let staging = cache.stage_dir(&key, &["model"])?;
//!             // ... run the stage, writing into staging.output("model") ...
//!             let meta = CommitMeta {
//!                 kind: "train.lora".into(), stage: "train".into(), experiment: "exp".into(),
//!                 inputs, started: std::time::SystemTime::now(),
//!             };
//!             cache.commit(staging, meta)? // `_lease` is released after the commit
//!         }
//!     },
//! };
//! let model_dir = cache.materialize(&entry, "model")?; // Err(Corrupt) => rerun
//! let downstream_input_digest = entry.output_digest("model");
//! # Ok(()) }
//! ```
//!
//! Modules: [`digest`] (the `Digest` type), [`hash`] (file and tree hashing), [`stat_cache`],
//! `store` (open, lookup, materialize: the verification policy), `commit` (the commit
//! protocol), `lock` (leases), `refs` (refs and `runs/` links), `gc`.

pub mod digest;
pub mod error;
pub mod hash;
pub mod manifest;
pub mod stat_cache;

mod commit;
mod fsutil;
mod gc;
mod lock;
mod refs;
mod store;

pub use commit::{CrashPoint, Staging};
pub use digest::{Digest, Key, ParseDigestError};
pub use error::{Error, Result};
pub use gc::GcStats;
pub use hash::{NodeKind, Tree, TreeEntry, hash_file, hash_tree};
pub use lock::{LockGuard, LockHolder, LockOutcome, Waiting};
pub use manifest::{CommitMeta, Entry, Lookup, Manifest, MissReason};
pub use stat_cache::StatCache;
pub use store::{Cache, CacheOptions, LAYOUT_VERSION};

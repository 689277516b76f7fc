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
//!     │   ├── manifest.msgpack    the commit marker, written last (see `Manifest`)
//!     │   └── log.txt             the stage's captured log
//!     ├── trees/<tree-digest>/    materialized outputs: read-only dirs of hardlinks into
//!     │                           objects (the staged output itself, renamed at commit, or
//!     │                           built atomically from the objects): what stages and
//!     │                           `runs/` see
//!     ├── refs/<experiment>/<stage>.key    last committed key (for "diff against last
//!     │                           run"): a symlink whose text is the key in base64
//!     ├── memo/<experiment>.bin   run memos: each stage's manifest as the last run left
//!     │                           it, so a no-op rerun reads one file (module `memo`)
//!     ├── checkpoints/<key>/      stage scratch that survives interruption; removed on commit
//!     ├── locks/<key>.lock        per-key leases (flock + pid/host/heartbeat record)
//!     ├── tmp/                    staging dirs, tree builds, spare empty dirs (same
//!     │                           filesystem: renames)
//!     ├── gc.lock                 commits hold it shared, `gc` exclusive
//!     ├── statcache.bin           (dev, inode, size, mtime, ctime) -> digest
//!     └── recipes/                the engine's resolved-recipe cache (not this crate's)
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
//! # Durability: crash-safe always, power-loss-safe on request
//!
//! The commit protocol (see `commit`) orders its steps so that an entry exists only once
//! everything it names is in place: objects are linked in first, then the output trees;
//! the manifest is written into the staging directory, and renaming that directory to
//! `entries/<key>/` is the commit. That ordering alone makes the store safe
//! against the process dying at any instant (SIGKILL, OOM, a panic): finished writes live
//! in the kernel's page cache, which outlives the process, and `rename` is atomic. The
//! SIGKILL-anywhere tests exercise exactly this guarantee, with fsync off.
//!
//! fsync only adds durability across a power loss or kernel crash. It costs ~2-3 ms per
//! call on a typical VM disk, and a commit made several (each object, the manifest, its
//! directory): that alone was most of the budget of a trivial stage (target: < 5 ms of
//! engine overhead per stage). So [`CacheOptions::fsync`] is **off by default**, the choice
//! DVC and Snakemake also make (neither fsyncs its cache), and on with
//! `PIPELINE_FSYNC=1` ([`FSYNC_ENV`]) for caches whose entries are expensive to recompute
//! on a machine that may lose power. With fsync off, a power loss can lose recently
//! committed entries, or leave a manifest whose objects were not yet written back; such an
//! object is missing or has the wrong size, which `lookup` reports as a miss (or corrupt
//! entry) and the stage reruns. A same-size object with lost content is only caught by the
//! hash verification of `materialize` (always on first use of a tree per process, and on
//! every use with `paranoid`). With fsync on, objects and the manifest (and its directory)
//! are synced before the manifest's rename is made durable, so a committed entry survives.
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
mod memo;
mod refs;
mod rel;
mod store;

pub use commit::{CrashPoint, Staging};
pub use digest::{Digest, Key, ParseDigestError};
pub use error::{Error, Result};
pub use gc::GcStats;
pub use hash::{NodeKind, Tree, TreeEntry, hash_file, hash_tree};
pub use lock::{LockGuard, LockHolder, LockOutcome, Waiting};
pub use manifest::{CommitMeta, Entry, Lookup, Manifest, MissReason};
pub use memo::Memo;
pub use rel::DirFd;
pub use stat_cache::StatCache;
pub use store::{Cache, CacheOptions, FSYNC_ENV, LAYOUT_VERSION};

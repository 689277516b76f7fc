//! The entry manifest: the commit marker of a stage entry and its record.
//!
//! `entries/<key>/manifest.json` is written last, atomically; its presence *is* the commit.
//! It holds everything `explain` needs to diff against a previous run (the key-input record
//! the engine gave us, opaque here) and everything `lookup` needs to check the entry without
//! rehashing (every output file's digest and size).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::{Digest, Key};
use crate::hash::Tree;

/// Version of the manifest format (inside the `v1` layout).
pub const MANIFEST_FORMAT: u32 = 1;

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The stage key this entry is stored under.
    pub key: Key,
    /// Stage kind (e.g. `train.lora`).
    pub kind: String,
    /// Stage name in the recipe.
    pub stage: String,
    /// Experiment name.
    pub experiment: String,
    /// The key-input record the engine computed the key from (opaque to the cache; the
    /// engine diffs two of them for `explain`).
    pub inputs: serde_json::Value,
    /// Outputs by name: each is a hashed tree (digest + listing).
    pub outputs: BTreeMap<String, Tree>,
    /// When the stage started (ms since the Unix epoch).
    pub started_ms: u64,
    /// When it finished (ms since the Unix epoch).
    pub finished_ms: u64,
    /// `finished_ms - started_ms`: what a later hit saves.
    pub duration_ms: u64,
    /// Host that ran it (provenance only; never part of a key).
    pub host: String,
}

/// A [`Manifest`] read without its `inputs` record (skipped by the parser, never built):
/// what [`crate::Cache::probe_outputs`] parses.
#[derive(serde::Deserialize)]
pub(crate) struct ManifestSansInputs {
    format: u32,
    key: Key,
    kind: String,
    stage: String,
    experiment: String,
    #[serde(default, rename = "inputs")]
    _inputs: serde::de::IgnoredAny,
    outputs: BTreeMap<String, Tree>,
    started_ms: u64,
    finished_ms: u64,
    duration_ms: u64,
    host: String,
}

impl From<ManifestSansInputs> for Manifest {
    fn from(m: ManifestSansInputs) -> Self {
        Manifest {
            format: m.format,
            key: m.key,
            kind: m.kind,
            stage: m.stage,
            experiment: m.experiment,
            inputs: serde_json::Value::Null,
            outputs: m.outputs,
            started_ms: m.started_ms,
            finished_ms: m.finished_ms,
            duration_ms: m.duration_ms,
            host: m.host,
        }
    }
}

/// What the engine tells [`crate::Cache::commit`] about a finished stage.
#[derive(Debug, Clone)]
pub struct CommitMeta {
    /// Stage kind.
    pub kind: String,
    /// Stage name.
    pub stage: String,
    /// Experiment name.
    pub experiment: String,
    /// The key-input record (stored verbatim in the manifest).
    pub inputs: serde_json::Value,
    /// When the stage started running.
    pub started: SystemTime,
}

/// A committed, checked cache entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key.
    pub key: Key,
    /// `entries/<key>/`.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
}

impl Entry {
    /// The tree digest of an output (what downstream keys hash).
    #[must_use]
    pub fn output_digest(&self, output: &str) -> Option<Digest> {
        self.manifest.outputs.get(output).map(|t| t.digest)
    }

    /// Output names.
    pub fn outputs(&self) -> impl Iterator<Item = &str> {
        self.manifest.outputs.keys().map(String::as_str)
    }

    /// The captured stage log (`log.txt`), if the stage wrote one.
    #[must_use]
    pub fn log_path(&self) -> Option<PathBuf> {
        let p = self.dir.join("log.txt");
        p.exists().then_some(p)
    }

    /// The manifest file.
    #[must_use]
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.json")
    }
}

/// Why a lookup missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissReason {
    /// No manifest: never committed (or an attempt that did not finish).
    NotFound,
    /// The manifest could not be read or parsed, or names another key; entry removed.
    BadManifest {
        /// The manifest path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// An object the manifest lists is missing; entry removed.
    MissingObject {
        /// The object path.
        path: PathBuf,
    },
    /// An object has the wrong size or content; entry (and object) removed.
    Corrupt {
        /// The bad object.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

impl std::fmt::Display for MissReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = |p: &Path| p.display().to_string();
        match self {
            MissReason::NotFound => f.write_str("never run"),
            MissReason::BadManifest { path, detail } => {
                write!(f, "unreadable manifest `{}`: {detail}", d(path))
            }
            MissReason::MissingObject { path } => write!(f, "cached file `{}` is missing", d(path)),
            MissReason::Corrupt { path, detail } => {
                write!(f, "cached file `{}` is corrupt: {detail}", d(path))
            }
        }
    }
}

/// The result of [`crate::Cache::probe`].
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A committed, checked entry.
    Hit(Box<Entry>),
    /// No usable entry, and why.
    Miss(MissReason),
}

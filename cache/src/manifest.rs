//! The entry manifest: the commit marker of a stage entry and its record.
//!
//! `entries/<key>/manifest.msgpack` is written last, atomically; its presence *is* the
//! commit.
//! It holds everything `explain` needs to diff against a previous run (the key-input record
//! the engine gave us, opaque here) and everything `lookup` needs to check the entry without
//! rehashing (every output file's digest and size).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::{Digest, Key};
use crate::hash::Tree;

/// Version of the manifest format (inside the `v1` layout): 1 was `manifest.json`.
pub const MANIFEST_FORMAT: u32 = 2;

/// The contents of an entry's manifest ([`MANIFEST_FILE`]).
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

/// The manifest's file in an entry directory.
pub const MANIFEST_FILE: &str = "manifest.msgpack";

/// The manifest as stored: MessagePack, each struct as an array of its fields in
/// declaration order (no field names to read and match), digests as raw bytes, and the
/// `inputs` record as JSON text in a `bin`, which a lookup that does not need it skips by
/// its length instead of parsing (or UTF-8-checking) it. A manifest of another layout fails
/// to decode or has another `format`: either way a miss. Decoding this was about a quarter
/// of parsing the same manifest as JSON (a fifth of a no-op rerun's instructions before).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored<K, S, I, O> {
    format: u32,
    key: K,
    kind: S,
    stage: S,
    experiment: S,
    inputs: I,
    outputs: O,
    started_ms: u64,
    finished_ms: u64,
    duration_ms: u64,
    host: S,
}

/// A stored manifest, decoded: [`Manifest`] without its `inputs`, which `I` decodes or skips.
type Decoded<I> = Stored<Key, String, I, BTreeMap<String, Tree>>;

/// Bytes that serialize as MessagePack `bin` (a `&[u8]` alone would be an array of numbers).
struct Bin<'a>(&'a [u8]);

impl serde::Serialize for Bin<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Manifest {
    /// The stored bytes of this manifest.
    ///
    /// # Errors
    /// Never in practice (every field encodes); the encoder's error otherwise.
    pub fn encode(&self) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        let inputs = serde_json::to_vec(&self.inputs)?;
        let stored = Stored {
            format: self.format,
            key: &self.key,
            kind: self.kind.as_str(),
            stage: self.stage.as_str(),
            experiment: self.experiment.as_str(),
            inputs: Bin(&inputs),
            outputs: &self.outputs,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            duration_ms: self.duration_ms,
            host: self.host.as_str(),
        };
        Ok(rmp_serde::to_vec(&stored)?)
    }

    /// Decodes stored bytes; without `inputs` the record is skipped, and is `Null` in the
    /// result (what a run's or a plan's lookups need).
    ///
    /// # Errors
    /// Bytes that are not a stored manifest (the decoder's message).
    pub fn decode(bytes: &[u8], inputs: bool) -> Result<Manifest, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        if inputs {
            let d: Decoded<&[u8]> = rmp_serde::from_slice(bytes).map_err(|e| err(&e))?;
            let record = serde_json::from_slice(d.inputs).map_err(|e| err(&e))?;
            Ok(d.into_manifest(record))
        } else {
            let d: Decoded<serde::de::IgnoredAny> =
                rmp_serde::from_slice(bytes).map_err(|e| err(&e))?;
            Ok(d.into_manifest(serde_json::Value::Null))
        }
    }
}

impl<I> Decoded<I> {
    fn into_manifest(self, inputs: serde_json::Value) -> Manifest {
        Manifest {
            format: self.format,
            key: self.key,
            kind: self.kind,
            stage: self.stage,
            experiment: self.experiment,
            inputs,
            outputs: self.outputs,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            duration_ms: self.duration_ms,
            host: self.host,
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
        self.dir.join(MANIFEST_FILE)
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

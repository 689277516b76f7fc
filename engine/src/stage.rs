//! The stage API: what a stage kind declares and what it gets when it runs.
//!
//! A kind is a value implementing [`StageKind`], registered in a [`Registry`]. The recipe
//! layer validates a stage's `params` table against [`StageKind::params`] (defaults filled
//! in, unknown keys and mistyped values rejected) before anything runs; parameters typed
//! [`ParamType::Ref`] are references to other stages' outputs (`"@stage"`, `"@stage/item"`,
//! `"@stage.output"`, `"@stage/*"`) and become graph edges; parameters typed
//! [`ParamType::Path`] name external files whose *content* goes into the key.
//!
//! Every output of a stage is one directory: `StageCtx::output(name)`. The engine hashes
//! and stores them after `run` returns `Ok`; a stage never writes into the cache itself.
//!
//! Parameters are passed to `run` as canonical JSON (`serde_json::Value`, defaults filled,
//! references replaced by the input's artifact directories); stages deserialize them into
//! their own typed structs with [`StageCtx::params`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;

/// The type of an artifact flowing between stages. A reference to an output of the wrong
/// type is a recipe error caught before anything runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactType {
    /// Any artifact (e.g. the outputs of a `shell` stage).
    Files,
    /// A dataset in one of the project's typed dataset layouts.
    Dataset,
    /// A model directory in Hugging Face layout.
    Model,
    /// A LoRA adapter in PEFT layout.
    Adapter,
    /// Generated samples.
    Samples,
    /// Preference pairs.
    Pairs,
    /// Metrics JSON.
    Metrics,
    /// A rendered report.
    Report,
    /// A tokenizer.
    Tokenizer,
}

impl ArtifactType {
    /// Whether an output of type `self` may feed an input declared as `want`.
    #[must_use]
    pub fn fits(self, want: ArtifactType) -> bool {
        self == want || want == ArtifactType::Files
    }
}

/// The declared type of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    /// `true`/`false`.
    Bool,
    /// A TOML integer.
    Int,
    /// A TOML float (integers are accepted and widened).
    Float,
    /// A string.
    Str,
    /// One of a fixed set of strings.
    Enum(&'static [&'static str]),
    /// A path to an external file or directory, relative to the recipe; its content is hashed
    /// into the key.
    Path,
    /// A reference to another stage's output of the given type (`"@stage"` etc.).
    Ref(ArtifactType),
    /// A list of values of one type.
    List(Box<ParamType>),
    /// A free-form table (hashed canonically).
    Table,
    /// Either a reference or a path (the `shell` kind's `deps`).
    RefOrPath,
}

/// One parameter of a kind's schema.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Parameter name (a key of the stage's TOML table).
    pub name: &'static str,
    /// Its type.
    pub ty: ParamType,
    /// Its default; `None` makes it required.
    pub default: Option<serde_json::Value>,
    /// One line of documentation for `pipeline kinds`.
    pub doc: &'static str,
}

/// One named output of a kind.
#[derive(Debug, Clone)]
pub struct OutputSpec {
    /// Output name; the first output is the default one (`@stage`).
    pub name: &'static str,
    /// Artifact type.
    pub ty: ArtifactType,
    /// One line of documentation.
    pub doc: &'static str,
}

/// Resources a stage needs; the local executor never oversubscribes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// CPU cores.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// GPUs.
    pub gpus: u32,
    /// Wall-clock limit in seconds (Slurm `--time`); `0` means none.
    pub time_s: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory_mb: 512,
            gpus: 0,
            time_s: 0,
        }
    }
}

/// Errors a stage returns from `run`.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The stage saw the cancel flag and stopped; its checkpoint directory is kept.
    #[error("cancelled")]
    Cancelled,
    /// A feature needed at run time is not compiled in.
    #[error("this build lacks the `{feature}` feature")]
    FeatureDisabled {
        /// The cargo feature.
        feature: &'static str,
    },
    /// Bad user input (data files, weights...), with the file named in the message.
    #[error("{0}")]
    Input(String),
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl StageError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Receives progress from a running stage (`done` of `total`, with a short message).
pub trait Progress: Send + Sync {
    /// Report progress.
    fn progress(&self, done: u64, total: u64, msg: &str);
}

/// A progress sink that drops everything.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {
    fn progress(&self, _: u64, _: u64, _: &str) {}
}

/// The stage's only window onto the world while it runs.
pub struct StageCtx<'a> {
    /// The stage's name in the recipe (`task/GQA`).
    pub name: &'a str,
    /// The directory of the recipe file; relative paths and `shell` commands resolve here.
    pub recipe_dir: &'a Path,
    /// Canonical parameters, defaults filled in. References are replaced by the path (or,
    /// for gathers and lists, the list of paths) of the referenced artifact directory.
    pub params: &'a serde_json::Value,
    /// The artifact directories of each reference, by parameter name.
    pub inputs: &'a BTreeMap<String, Vec<PathBuf>>,
    /// Where the outputs go: one subdirectory per declared output, already created.
    pub out_dir: &'a Path,
    /// Scratch directory keyed by the stage key; survives interruptions and is removed after
    /// the stage commits. Long stages write checkpoints here and resume from them.
    pub checkpoint_dir: &'a Path,
    /// Seed derived from the experiment seed and the stage's key-relevant identity.
    pub seed: u64,
    /// Set when the run is being stopped (Ctrl-C, a failed sibling with fail-fast).
    pub cancel: Arc<AtomicBool>,
    /// Progress reporter.
    pub progress: &'a dyn Progress,
    /// The stage's log (stdout/stderr of children go here too).
    pub log: &'a mut dyn std::io::Write,
    /// Resources granted (a stage uses `cpus` for its thread pool).
    pub resources: Resources,
}

impl StageCtx<'_> {
    /// Deserialize the parameters into the stage's typed struct.
    ///
    /// # Errors
    /// A `StageError::Other` naming the field, which means the recipe layer and the kind's
    /// schema disagree (a bug in the kind).
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.params.clone()).map_err(|e| {
            StageError::Other(format!(
                "BUG: params of `{}` do not match its schema: {e}",
                self.name
            ))
        })
    }

    /// The directory of the output `name`.
    #[must_use]
    pub fn output(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// The single input directory of parameter `name`.
    ///
    /// # Errors
    /// If the parameter has no input or several.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        match self.inputs.get(name).map(Vec::as_slice) {
            Some([one]) => Ok(one),
            _ => Err(StageError::Other(format!(
                "BUG: input `{name}` of `{}` is not a single reference",
                self.name
            ))),
        }
    }

    /// Whether the run is being cancelled; long loops check this between steps.
    #[must_use]
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// A stage kind: declared schema plus the code that runs it.
pub trait StageKind: Send + Sync + 'static {
    /// Kind name as written in recipes (`train.lora`, `shell`).
    fn kind(&self) -> &'static str;
    /// Bumped whenever the kind's semantics (its outputs for the same inputs) change.
    fn version(&self) -> u32;
    /// One paragraph for `pipeline kinds`.
    fn doc(&self) -> &'static str;
    /// The parameter schema.
    fn params(&self) -> Vec<ParamSpec>;
    /// The outputs; may depend on the parameters (validated, defaults filled).
    fn outputs(&self, params: &serde_json::Value) -> Vec<OutputSpec>;
    /// Default resources (a recipe's `resources` table overrides them).
    fn resources(&self, _params: &serde_json::Value) -> Resources {
        Resources::default()
    }
    /// Run the stage.
    ///
    /// # Errors
    /// Whatever went wrong; the stage leaves no cache entry.
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError>;
    /// Called after a cache hit (and after a successful run) with the committed output
    /// directories, so that kinds which also materialize files in the recipe directory (the
    /// `shell` kind's `outs`) can restore them. Default: nothing.
    ///
    /// # Errors
    /// I/O errors while restoring.
    fn restore(
        &self,
        _recipe_dir: &Path,
        _params: &serde_json::Value,
        _outputs: &BTreeMap<String, PathBuf>,
    ) -> Result<(), StageError> {
        Ok(())
    }
    /// [`StageKind::restore`] with `digests`, which tells a file's content digest without
    /// reading it when the file is unchanged since it was last hashed: the engine calls this
    /// one, so that a kind can check that a restored file is already right with a `stat`
    /// instead of reading it and its cached copy on every cache hit. Default: `restore`.
    ///
    /// # Errors
    /// As [`StageKind::restore`].
    fn restore_with(
        &self,
        recipe_dir: &Path,
        params: &serde_json::Value,
        outputs: &BTreeMap<String, PathBuf>,
        _digests: &dyn FileDigests,
    ) -> Result<(), StageError> {
        self.restore(recipe_dir, params, outputs)
    }
}

/// Content digests of files, for [`StageKind::restore_with`]. The engine answers through the
/// cache's stat cache: a file whose device, inode, size, mtime and ctime match the record of
/// its last hashing is not read again (the rules of `cache::stat_cache`).
pub trait FileDigests: Sync {
    /// The blake3 digest and size of the regular file at `path` (symlinks followed), or
    /// `None` when it is missing or cannot be read.
    fn file_digest(&self, path: &Path) -> Option<([u8; 32], u64)>;
}

/// All known kinds, by name.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a kind (a later registration of the same name replaces the earlier one).
    pub fn register(&mut self, kind: impl StageKind) {
        self.kinds.insert(kind.kind(), Arc::new(kind));
    }

    /// Look up a kind.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    /// All kinds, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }

    /// The names of all kinds (for did-you-mean suggestions).
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

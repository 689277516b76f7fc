//! LLaVA-1.5 in candle, with Hugging Face transformers' `LlavaForConditionalGeneration`
//! semantics and weight names, and PEFT-compatible LoRA.
//!
//! ## Layout
//!
//! | file | what it decides |
//! |---|---|
//! | [`config`] | `config.json` exactly as transformers reads it, and the presets |
//! | [`weights`] | reading single-file or sharded safetensors in any of the three LLaVA name layouts, and saving in transformers-5 names |
//! | [`linear`] | the one linear layer every block uses; it carries the LoRA adapters attached to it |
//! | [`clip`] | the CLIP vision tower (pre-LN ViT) and the `mlp2x_gelu` projector |
//! | [`llama`] | the LLaMA decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, masks |
//! | [`kv_cache`] | [`KvCache`]: preallocated keys/values, and the weights packed for decoding steps |
//! | [`llava`] | [`Llava`]: image-token merge, forward, load/save, trainable-variable selection |
//! | [`lora`] | adapter configs, PEFT read/write, target matching, merging, seeded dropout |
//! | [`preset`] | the built-in `llava-tiny` and `llava-1.5-7b` configs |
//! | [`files`] | one forward on tensors read from a safetensors file (`pipeline model forward`) |
//!
//! ## Design
//!
//! Parameters are plain candle [`Tensor`](candle_core::Tensor)s held in typed structs, each
//! reachable by its canonical (transformers-5 save) name through one visitor
//! (`Llava::visit_params`). Loading, saving, merging and the training-variable selection are
//! all written against that visitor, so a block's forward code and its weight names cannot
//! drift apart. A parameter becomes a candle [`Var`](candle_core::Var) only when
//! `Llava::trainable_vars` selects it; frozen weights stay plain tensors, so backward never
//! allocates gradients for them (for a 7B base under LoRA that is the difference between
//! fitting in memory and not).
//!
//! Every tensor op comes from [`crate::ops`], whose functions all have a backward pass:
//! candle's own fused norms/softmax/rope silently drop gradients and are never used here.
//!
//! Errors that come from user input (a config field, a checkpoint tensor, an adapter, an
//! input batch) are [`ModelError`]s naming the file and the field or tensor.

pub mod bench;
pub mod chat;
pub mod clip;
pub mod config;
pub mod files;
pub mod generate;
pub mod image;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod llava;
pub mod lora;
pub mod preset;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

#[cfg(test)]
mod fused_tests;

use std::path::PathBuf;

pub use config::{ClipVisionConfig, FeatureSelect, LlamaConfig, LlavaConfig};
pub use kv_cache::KvCache;
pub use llava::{Llava, TrainMode};
pub use lora::LoraConfig;

/// Everything that can go wrong building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A config field is missing, mistyped or unsupported.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Config {
        /// The config file (`config.json`, `adapter_config.json`, or `<preset>`).
        path: PathBuf,
        /// Dotted path of the field, e.g. `text_config.hidden_size`.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A checkpoint lacks a tensor the config requires.
    #[error("{}: missing tensor `{name}`{}", path.display(), hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    MissingTensor {
        /// The checkpoint file (or index) that was searched.
        path: PathBuf,
        /// The tensor name, in transformers-5 save layout.
        name: String,
        /// Extra context (e.g. a close name that is present).
        hint: Option<String>,
    },
    /// A checkpoint tensor has the wrong shape for the config.
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?} from the config", path.display())]
    Shape {
        /// The checkpoint file holding the tensor.
        path: PathBuf,
        /// The tensor name as stored in the file.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A checkpoint or adapter file is malformed (bad header, unsupported dtype, bad index).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A model input (ids, mask, pixels, positions) does not fit the model.
    #[error("invalid model input: {0}")]
    Input(String),
    /// An adapter operation that does not apply (unknown name, nothing targeted, ...).
    #[error("adapter: {0}")]
    Adapter(String),
    /// A tensor operation failed (a bug or an out-of-memory, not bad input).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<ModelError> for candle_core::Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Candle(e) => e,
            other => candle_core::Error::wrap(other),
        }
    }
}

/// Result alias for model code.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Sets candle/rayon and glibc malloc up for a shared CPU box, once per process; call it
/// first thing in `main`, before other threads start.
///
/// candle's gemm pool defaults to one thread per physical core and its elementwise pool
/// *spins*; on a 2-core machine shared with other jobs two spinning pools fight and a
/// training step gets 3x slower (measured: research/rust-stack.md §2 "Threads"). So unless
/// the user set `RAYON_NUM_THREADS` we run one thread. candle also allocates a fresh buffer
/// per op; glibc serves large ones with mmap and returns them on free, so every op pays page
/// faults. Raising the mmap and trim thresholds keeps freed buffers in the heap (about 25%
/// faster training steps, sys time down 10x in the same measurement).
pub fn configure_cpu_runtime() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // Ignore the error: it only means a global pool already exists (someone else chose).
            let _ = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build_global();
            // SAFETY: callers run this at process start (the CLI does, first thing), before
            // any other thread exists that could read the environment concurrently. candle
            // reads the variable to size its gemm parallelism and elementwise pool.
            unsafe {
                std::env::set_var("RAYON_NUM_THREADS", "1");
            }
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only tunes glibc's allocator thresholds; it is thread-safe.
        unsafe {
            // 32 MiB is glibc's ceiling for this threshold on 64-bit (larger values are refused).
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 1 << 28);
        }
    });
}

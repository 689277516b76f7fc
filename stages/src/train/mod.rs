//! Training: AdamW with parameter groups, LR schedules, gradient clipping and accumulation,
//! token-level masked cross-entropy with pluggable extra terms, and checkpoint/resume.
//!
//! ## Layout
//!
//! | file | what it decides |
//! |---|---|
//! | [`optim`] | the AdamW update (PyTorch's formula), parameter groups (projector vs LoRA lr), global-norm clipping |
//! | [`schedule`] | cosine / constant LR with warmup, as HF's `get_*_schedule_with_warmup` |
//! | [`loss`] | shifted masked CE (HF causal-LM convention), per-sequence log-probs (DPO), the [`LossHook`] trait |
//! | [`checkpoint`] | the on-disk checkpoint (weights, moments, counters) and its atomic commit |
//! | [`trainer`] | the loop: data order, accumulation, step, checkpoints, bit-identical resume |
//!
//! ## Design
//!
//! Numerics follow PyTorch + transformers exactly where a user would compare runs: the AdamW
//! update, `clip_grad_norm_`, the LR lambdas, and the loss normalization (mean over all labelled
//! targets of an optimizer step, across accumulation). The parity test
//! (`stages/tests/train_parity.rs`) reproduces the `llava-tiny` fixture's two LoRA steps: loss,
//! gradients and AdamW-updated parameters; `stages/tests/train_resume.rs` kills a LoRA run on
//! the real model and checks that the resumed run ends byte-identical.
//!
//! Gradients come from candle's autograd. Only the trainable parameters are `Var`s; the
//! optimizer asks the gradient store for each of them and fails with
//! [`TrainError::NoGradient`] if one is missing, because a missing gradient means the graph was
//! cut (candle's fused norm/softmax/rope ops have no backward and cut it silently) and the
//! parameter would never train.
//!
//! The loop is model-agnostic: a stage implements [`trainer::Objective`] (indices → loss) and
//! the trainer owns data order, stepping and checkpoints. Randomness derives from the seed and
//! the step counters, so a checkpoint needs no generator snapshot to resume exactly.

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod reglora;
pub mod schedule;
pub mod trainer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use loss::{
    HookCtx, LossHook, MicroLoss, masked_cross_entropy, sequence_logprobs, sft_micro_loss,
    sft_micro_loss_hidden, shifted_nll_sum_hidden,
};
pub use optim::{AdamW, AdamWConfig, Grads, ParamGroup, clip_grad_norm, global_grad_norm};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{Flow, MicroBatch, Objective, StepReport, TrainConfig, Trainer};

/// Errors from training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Inconsistent training settings.
    #[error("invalid training settings: {0}")]
    Config(String),
    /// Bad training data (labels out of range, no targets).
    #[error("invalid training data: {0}")]
    Data(String),
    /// A trainable parameter received no gradient.
    #[error(
        "parameter `{0}` received no gradient: the loss does not depend on it (a frozen path or an op without backward)"
    )]
    NoGradient(String),
    /// Loss or gradient became NaN/inf.
    #[error("step {step}: {what} is not finite")]
    NonFinite {
        /// The step (1-based) that produced it.
        step: u64,
        /// What went non-finite.
        what: String,
    },
    /// A checkpoint is missing pieces or does not match this run.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// File system error.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An error from the objective's own code (model forward, batch building, ...).
    #[error(transparent)]
    Objective(Box<dyn std::error::Error + Send + Sync>),
    /// A tensor op failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

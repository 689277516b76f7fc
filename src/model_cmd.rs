//! `pipeline model …`: direct access to the LLaVA model outside recipes, for parity checks
//! against Hugging Face transformers and for benchmarks.
//!
//! - `forward --model DIR [--adapter DIR]... [--merge] --inputs IN.safetensors --out OUT.safetensors`
//!   runs one forward (see `stages::model::files` for the tensor conventions) and writes
//!   `logits` f32 `[b, s, vocab]`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use stages::model::files::{ForwardFiles, forward_files, parse_dtype};

/// `pipeline model`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

/// The `model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Run one forward pass on tensors from a safetensors file and write the logits.
    Forward(ForwardArgs),
}

/// `pipeline model forward`.
#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// Model directory: config.json + model.safetensors (or a sharded index).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory (repeat to stack several, applied in order).
    #[arg(long, value_name = "DIR")]
    pub adapter: Vec<PathBuf>,
    /// Merge the adapters into the base weights before running.
    #[arg(long, requires = "adapter")]
    pub merge: bool,
    /// Inputs: input_ids [b, s]; optional attention_mask, pixel_values, position_ids.
    #[arg(long, value_name = "IN.safetensors")]
    pub inputs: PathBuf,
    /// Output file; receives `logits` (f32 [b, s, vocab]).
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Parameter dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
}

/// Runs a `model` subcommand.
pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    stages::model::configure_cpu_runtime();
    match args.command {
        ModelCommand::Forward(a) => {
            let dtype =
                parse_dtype(&a.dtype).with_context(|| format!("unknown dtype `{}`", a.dtype))?;
            let job = ForwardFiles {
                model: a.model,
                adapters: a.adapter,
                merge: a.merge,
                inputs: a.inputs,
                out: a.out,
                dtype,
            };
            let sum = forward_files(&job)
                .with_context(|| format!("model forward ({})", job.model.display()))?;
            #[allow(clippy::print_stderr)]
            {
                eprintln!(
                    "wrote logits [{}, {}, {}] ({} image(s)) to {}",
                    sum.batch,
                    sum.seq,
                    sum.vocab,
                    sum.images,
                    job.out.display()
                );
            }
            Ok(())
        }
    }
}

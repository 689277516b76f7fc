//! `pipeline model …`: direct access to the LLaVA model outside recipes, for parity checks
//! against Hugging Face transformers and for benchmarks.
//!
//! - `forward --model DIR [--adapter DIR]... [--merge] --inputs IN.safetensors --out OUT.safetensors`
//!   runs one forward (see `stages::model::files` for the tensor conventions) and writes
//!   `logits` f32 `[b, s, vocab]`.
//! - `bench --model DIR|--preset NAME [--batch B] [--text-len T] [--lora-rank R] [--steps N]
//!   [--new-tokens G]` times forward, a LoRA step, a full step and greedy generation at
//!   batch 1 and 16 (see `stages::model::bench`) and prints one JSON object on stdout.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use stages::model::bench::{BenchOptions, ModelSource};
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
    /// Time forward, LoRA/full training steps and greedy generation; print one JSON object.
    Bench(BenchArgs),
}

/// `pipeline model bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model directory: config.json + model.safetensors (or a sharded index).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "preset",
        required_unless_present = "preset"
    )]
    pub model: Option<PathBuf>,
    /// A built-in config with seeded random weights (llava-tiny, llava-1.5-7b).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Batch size of the forward and training steps.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Text tokens per sequence (after one image's tokens).
    #[arg(long, default_value_t = 32)]
    pub text_len: usize,
    /// LoRA rank (every language-model projection).
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Timed repetitions per measurement (after one warm-up); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Tokens generated per sequence in the generation measurement.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
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
        ModelCommand::Bench(a) => {
            let src = match (a.model, a.preset) {
                (Some(dir), _) => ModelSource::Dir(dir),
                (None, Some(name)) => ModelSource::Preset(name),
                (None, None) => anyhow::bail!("model bench: give --model DIR or --preset NAME"),
            };
            let opts = BenchOptions {
                batch: a.batch,
                text_len: a.text_len,
                lora_rank: a.lora_rank,
                steps: a.steps,
                new_tokens: a.new_tokens,
            };
            let report = stages::model::bench::run(&src, &opts).context("model bench")?;
            #[allow(clippy::print_stdout)]
            {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(())
        }
    }
}

//! `pipeline model bench`: times the model's hot paths on synthetic inputs.
//!
//! Measured, each as the median over `steps` runs after one warm-up:
//! - `forward_ms`: one no-grad forward of a batch `[batch, image tokens + text_len]`;
//! - `lora_step_ms`: forward (LM head at the text positions only, see
//!   [`super::generate::sequence_logprobs`]) + masked cross-entropy over them + backward +
//!   AdamW on the LoRA factors (rank `lora_rank` on every language-model projection, the
//!   usual LLaVA LoRA), base frozen;
//! - `full_step_ms`: the same with LLaVA-1.5 full fine-tuning (language model + projector
//!   trainable, vision tower frozen), on a fresh copy of the model;
//! - `generate_tok_s_b{1,16}`: greedy generation of `new_tokens` tokens after a prompt of
//!   one image plus `text_len` text tokens, at batch 1 and 16, counted as new tokens per
//!   second including the prefill.
//!
//! Inputs are seeded random tokens (never the image or pad id) and random pixels, so the
//! numbers depend only on the shapes. `scripts/bench_model.py` runs the same shapes in
//! PyTorch / transformers for comparison.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};

use super::generate::{GenPrompt, GenerateOptions, generate, sequence_logprobs};
use super::{Llava, LoraConfig, ModelError, Result, TrainMode};

/// Where the benchmarked model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A saved model directory (config.json + safetensors).
    Dir(PathBuf),
    /// A built-in preset with seeded random weights.
    Preset(String),
}

/// Benchmark shapes.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Training / forward batch size.
    pub batch: usize,
    /// Text tokens after the image tokens.
    pub text_len: usize,
    /// LoRA rank for the LoRA step.
    pub lora_rank: usize,
    /// Timed repetitions (after one warm-up).
    pub steps: usize,
    /// Tokens generated per sequence in the generation benchmark.
    pub new_tokens: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            batch: 16,
            text_len: 32,
            lora_rank: 8,
            steps: 5,
            new_tokens: 32,
        }
    }
}

/// The benchmark's result, printed as one JSON object.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Model directory or preset name.
    pub model: String,
    /// Training / forward batch.
    pub batch: usize,
    /// Image tokens per sequence.
    pub image_tokens: usize,
    /// Text tokens per sequence.
    pub text_len: usize,
    /// LoRA rank.
    pub lora_rank: usize,
    /// Timed repetitions.
    pub steps: usize,
    /// Generated tokens per sequence.
    pub new_tokens: usize,
    /// rayon threads (gemm) in use.
    pub threads: usize,
    /// Model parameters.
    pub params: usize,
    /// Trainable LoRA parameters.
    pub lora_params: usize,
    /// Median forward time.
    pub forward_ms: f64,
    /// Median LoRA training step.
    pub lora_step_ms: f64,
    /// Median full training step.
    pub full_step_ms: f64,
    /// Greedy generation throughput at batch 1.
    pub generate_tok_s_b1: f64,
    /// Greedy generation throughput at batch 16.
    pub generate_tok_s_b16: f64,
    /// The same five measurements in process CPU time (ms, or new tokens per CPU second):
    /// robust to other jobs on the machine when running single-threaded.
    pub cpu: CpuTimes,
}

/// CPU-time versions of the report's measurements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuTimes {
    /// Forward, CPU ms.
    pub forward_ms: f64,
    /// LoRA step, CPU ms.
    pub lora_step_ms: f64,
    /// Full step, CPU ms.
    pub full_step_ms: f64,
    /// Generation at batch 1, tokens per CPU second.
    pub generate_tok_s_b1: f64,
    /// Generation at batch 16, tokens per CPU second.
    pub generate_tok_s_b16: f64,
}

fn load(src: &ModelSource) -> Result<Llava> {
    match src {
        ModelSource::Dir(d) => Llava::load(d, DType::F32, &Device::Cpu),
        ModelSource::Preset(p) => {
            Llava::from_config_random(super::preset::preset(p)?, 0, DType::F32, &Device::Cpu)
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Process CPU time in milliseconds (all threads). On a shared machine wall time depends
/// on the neighbours; CPU time of a single-threaded run does not, so both are reported.
fn cpu_now_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Medians of wall and CPU milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
}

/// Times `f` once for warm-up and `steps` more times.
fn time_ms(steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Timing> {
    f()?;
    let (mut wall, mut cpu) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        let (t, c) = (Instant::now(), cpu_now_ms());
        f()?;
        wall.push(t.elapsed().as_secs_f64() * 1e3);
        cpu.push(cpu_now_ms() - c);
    }
    Ok(Timing {
        wall: median(wall),
        cpu: median(cpu),
    })
}

/// A synthetic batch: ids `[b, image + text]` (image tokens first), pixels, loss mask.
struct Batch {
    ids: Tensor,
    pixels: Tensor,
    text_mask: Tensor,
    prompts: Vec<GenPrompt>,
}

fn batch(model: &Llava, b: usize, text_len: usize, seed: u64) -> Result<Batch> {
    let cfg = model.config();
    let n_img = cfg.image_tokens_per_image();
    let img = cfg.image_token_index;
    let vocab = cfg.text.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::with_capacity(b * (n_img + text_len));
    let mut prompts = Vec::with_capacity(b);
    let side = cfg.vision.image_size;
    let px: Vec<f32> = (0..b * 3 * side * side)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let pixels = Tensor::from_vec(px, (b, 3, side, side), &Device::Cpu)?;
    for r in 0..b {
        let mut row = vec![img; n_img];
        while row.len() < n_img + text_len {
            let t = rng.random_range(3..vocab);
            if t != img && cfg.text.pad_token_id != Some(t) {
                row.push(t);
            }
        }
        ids.extend_from_slice(&row);
        prompts.push(GenPrompt {
            input_ids: row,
            pixel_values: Some(pixels.narrow(0, r, 1)?),
        });
    }
    let s = n_img + text_len;
    let mask: Vec<f32> = (0..b * s)
        .map(|i| if i % s >= n_img { 1.0 } else { 0.0 })
        .collect();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, s), &Device::Cpu)?,
        pixels,
        text_mask: Tensor::from_vec(mask, (b, s), &Device::Cpu)?,
        prompts,
    })
}

/// One training step: masked next-token CE on the text, backward, AdamW.
fn train_step(model: &Llava, data: &Batch, opt: &mut AdamW) -> Result<()> {
    // The LM head runs only at the scored (text) positions (see `sequence_logprobs`).
    let lp = sequence_logprobs(
        model,
        &data.ids,
        Some(&data.pixels),
        None,
        None,
        &data.text_mask,
    )?;
    let loss = (lp.sum.sum_all()?.neg()? / lp.count.sum_all()?.to_scalar::<f32>()? as f64)?;
    opt.backward_step(&loss)?;
    Ok(())
}

fn adamw(vars: Vec<(String, candle_core::Var)>) -> Result<AdamW> {
    let params = ParamsAdamW {
        lr: 1e-4,
        weight_decay: 0.0,
        ..ParamsAdamW::default()
    };
    Ok(AdamW::new(
        vars.into_iter().map(|(_, v)| v).collect(),
        params,
    )?)
}

/// New tokens per wall second and per CPU second.
fn gen_tok_s(model: &Llava, text_len: usize, b: usize, opts: &BenchOptions) -> Result<(f64, f64)> {
    let data = batch(model, b, text_len, 7)?;
    let g = GenerateOptions {
        max_new_tokens: opts.new_tokens,
        batch_size: b,
        pad_token_id: 0,
        ..GenerateOptions::default()
    };
    let t = time_ms(opts.steps.clamp(1, 3), || {
        generate(model, &data.prompts, &g, None).map(|_| ())
    })?;
    let n = (b * opts.new_tokens) as f64;
    Ok((n / (t.wall / 1e3), n / (t.cpu / 1e3)))
}

/// One measurement of [`run`] alone, for profiling a single path (`--only` of
/// `cargo bench --bench model`): callgrind or perf then see only that phase plus the
/// model's setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `forward_ms`.
    Forward,
    /// `lora_step_ms`.
    Lora,
    /// `full_step_ms`.
    Full,
    /// `generate_tok_s_b1`.
    Gen1,
    /// `generate_tok_s_b16`.
    Gen16,
    /// The prefill of `generate_tok_s_b16` alone (its prompts into a fresh KV cache, the
    /// last position's hidden state), in ms.
    Prefill16,
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "forward" => Self::Forward,
            "lora" => Self::Lora,
            "full" => Self::Full,
            "gen1" => Self::Gen1,
            "gen16" => Self::Gen16,
            "prefill16" => Self::Prefill16,
            _ => {
                return Err(format!(
                    "unknown phase `{s}` (forward, lora, full, gen1, gen16, prefill16)"
                ));
            }
        })
    }
}

/// Runs one phase; returns its (wall, CPU) value in the report's unit (ms or tok/s).
pub fn run_phase(src: &ModelSource, opts: &BenchOptions, phase: Phase) -> Result<(f64, f64)> {
    let mut model = load(src)?;
    let data = batch(&model, opts.batch, opts.text_len, 1)?;
    let t = match phase {
        Phase::Gen1 => return gen_tok_s(&model, opts.text_len, 1, opts),
        Phase::Gen16 => return gen_tok_s(&model, opts.text_len, 16, opts),
        Phase::Prefill16 => {
            let d = batch(&model, 16, opts.text_len, 7)?;
            let len = d.ids.dim(1)?;
            time_ms(opts.steps, || {
                let mut cache = super::KvCache::with_capacity(len + opts.new_tokens);
                model
                    .forward_hidden_from(
                        &d.ids,
                        Some(&d.pixels),
                        None,
                        None,
                        Some(&mut cache),
                        len - 1,
                    )
                    .map(|_| ())
            })?
        }
        Phase::Forward => forward_timing(&model, &data, opts.steps)?,
        Phase::Lora => step_timing(&mut model, TrainMode::LORA, opts, &data)?.0,
        Phase::Full => step_timing(&mut model, TrainMode::FULL, opts, &data)?.0,
    };
    Ok((t.wall, t.cpu))
}

fn forward_timing(model: &Llava, data: &Batch, steps: usize) -> Result<Timing> {
    time_ms(steps, || {
        model
            .forward(&data.ids, Some(&data.pixels), None, None, None)
            .map(|_| ())
    })
}

/// Times training steps of `mode` (LoRA: a fresh rank-`lora_rank` adapter on every
/// language-model projection); also returns the number of trainable parameters.
fn step_timing(
    model: &mut Llava,
    mode: TrainMode,
    opts: &BenchOptions,
    data: &Batch,
) -> Result<(Timing, usize)> {
    if mode == TrainMode::LORA {
        let r = opts.lora_rank;
        model.add_adapter("bench", LoraConfig::language_model(r, 2.0 * r as f64), 0)?;
    }
    let vars = model.trainable_vars(mode)?;
    let n = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = adamw(vars)?;
    let model = &*model;
    Ok((
        time_ms(opts.steps, || train_step(model, data, &mut opt))?,
        n,
    ))
}

/// Runs every measurement.
pub fn run(src: &ModelSource, opts: &BenchOptions) -> Result<BenchReport> {
    let sizes = [
        opts.batch,
        opts.text_len,
        opts.steps,
        opts.lora_rank,
        opts.new_tokens,
    ];
    if sizes.contains(&0) {
        // text_len 0 would leave the loss with no tokens (0/0).
        return Err(ModelError::Input(
            "bench: --batch, --text-len, --steps, --lora-rank and --new-tokens must be at least 1"
                .into(),
        ));
    }
    let mut model = load(src)?;
    let params = model
        .params()
        .ids()
        .map(|id| model.params().get(id).elem_count())
        .sum();
    let data = batch(&model, opts.batch, opts.text_len, 1)?;
    let forward = forward_timing(&model, &data, opts.steps)?;
    let gen_b1 = gen_tok_s(&model, opts.text_len, 1, opts)?;
    let gen_b16 = gen_tok_s(&model, opts.text_len, 16, opts)?;
    let (lora, lora_params) = step_timing(&mut model, TrainMode::LORA, opts, &data)?;
    drop(model);
    let mut full = load(src)?;
    let (full_step, _) = step_timing(&mut full, TrainMode::FULL, opts, &data)?;

    let model_name = match src {
        ModelSource::Dir(d) => d.display().to_string(),
        ModelSource::Preset(p) => p.clone(),
    };
    Ok(BenchReport {
        model: model_name,
        batch: opts.batch,
        image_tokens: full.config().image_tokens_per_image(),
        text_len: opts.text_len,
        lora_rank: opts.lora_rank,
        steps: opts.steps,
        new_tokens: opts.new_tokens,
        threads: rayon::current_num_threads(),
        params,
        lora_params,
        forward_ms: forward.wall,
        lora_step_ms: lora.wall,
        full_step_ms: full_step.wall,
        generate_tok_s_b1: gen_b1.0,
        generate_tok_s_b16: gen_b16.0,
        cpu: CpuTimes {
            forward_ms: forward.cpu,
            lora_step_ms: lora.cpu,
            full_step_ms: full_step.cpu,
            generate_tok_s_b1: gen_b1.1,
            generate_tok_s_b16: gen_b16.1,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_runs_on_the_tiny_preset_and_reports_positive_numbers() {
        let opts = BenchOptions {
            batch: 2,
            text_len: 4,
            lora_rank: 2,
            steps: 1,
            new_tokens: 2,
        };
        let r = run(&ModelSource::Preset("llava-tiny".into()), &opts).unwrap();
        assert_eq!((r.batch, r.image_tokens, r.text_len), (2, 64, 4));
        assert!(r.params > 4_000_000 && r.lora_params > 0);
        for v in [
            r.forward_ms,
            r.lora_step_ms,
            r.full_step_ms,
            r.generate_tok_s_b1,
            r.generate_tok_s_b16,
            r.cpu.forward_ms,
            r.cpu.generate_tok_s_b16,
        ] {
            assert!(v.is_finite() && v > 0.0);
        }
        let err = run(&ModelSource::Preset("nope".into()), &opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}

//! What the training kinds share: CoIN records -> tokenized examples, the supervised
//! objective the [`Trainer`] drives, the loop around it (progress, cancel, resumable loss log),
//! and writing a self-contained model directory.
//!
//! ## Resume
//!
//! The trainer checkpoints into `ctx.checkpoint_dir/trainer`; the per-step losses go to
//! `ctx.checkpoint_dir/losses.jsonl` as they happen. After a restart, lines past the restored
//! step (written after the last checkpoint, before the kill) are dropped, so the `train_log.json`
//! in the output is the same bytes as an uninterrupted run's.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use engine::stage::{StageCtx, StageError};
use serde::{Deserialize, Serialize};

use crate::data::coin::{DatasetInfo, TrainRecord, read_train};
use crate::model::chat::{Batch, ChatTemplate, Example, Turn, count_images};
use crate::model::image::ImageProcessorConfig;
use crate::model::tokenizer::LlavaTokenizer;
use crate::model::{Llava, ModelError};
use crate::train::{
    AdamWConfig, LossHook, MicroBatch, MicroLoss, Objective, ParamGroup, Schedule, ScheduleKind,
    TrainConfig, TrainError, Trainer, sft_micro_loss_hidden,
};

/// The conversation template every training and evaluation kind uses (LLaVA-1.5's).
#[must_use]
pub fn template(model: &Llava) -> ChatTemplate {
    ChatTemplate::vicuna_v1(model.config().image_tokens_per_image())
}

/// Tokenized training examples and their image files.
pub struct SftSet {
    /// One per record.
    pub examples: Vec<Example>,
    /// The record's image, if it has one.
    pub images: Vec<Option<PathBuf>>,
}

/// Tokenize the records of `file` (a dataset-relative annotation file) for `model`.
///
/// # Errors
/// Unreadable file, malformed conversation, image-marker mismatch or an over-long record, each
/// naming the file and record.
pub fn load_records(
    data_dir: &Path,
    info: &DatasetInfo,
    file: &str,
    tok: &LlavaTokenizer,
    tpl: &ChatTemplate,
    max_len: usize,
    set: &mut SftSet,
) -> Result<(), StageError> {
    let path = data_dir.join(file);
    let records = read_train(&path)?;
    for (i, rec) in records.iter().enumerate() {
        let at = || format!("{}: record {i} (id {})", path.display(), rec.id);
        let turns = chat_turns(rec).map_err(|m| StageError::Input(format!("{}: {m}", at())))?;
        let want = usize::from(rec.image.is_some());
        if count_images(&turns) != want {
            return Err(StageError::Input(format!(
                "{}: has {} `<image>` markers but {want} image",
                at(),
                count_images(&turns)
            )));
        }
        let ex = tpl
            .encode_training(tok, &turns)
            .map_err(|e| StageError::Input(format!("{}: {e}", at())))?;
        if ex.input_ids.len() > max_len {
            return Err(StageError::Input(format!(
                "{}: {} tokens (images expanded) exceed the model's max_position_embeddings {max_len}",
                at(),
                ex.input_ids.len()
            )));
        }
        set.examples.push(ex);
        set.images
            .push(rec.image.as_ref().map(|r| info.image_path(data_dir, r)));
    }
    Ok(())
}

/// A record's alternating human/gpt turns as chat turns.
fn chat_turns(rec: &TrainRecord) -> Result<Vec<Turn>, String> {
    let c = &rec.conversations;
    if c.is_empty() || !c.len().is_multiple_of(2) {
        return Err(format!(
            "`conversations` has {} turns; expected human/gpt pairs",
            c.len()
        ));
    }
    c.chunks(2)
        .enumerate()
        .map(|(j, p)| {
            if p[0].from != "human" || p[1].from != "gpt" {
                return Err(format!(
                    "conversations[{}..{}] are `{}`/`{}`, expected `human`/`gpt`",
                    2 * j,
                    2 * j + 2,
                    p[0].from,
                    p[1].from
                ));
            }
            Ok(Turn::qa(p[0].value.clone(), p[1].value.clone()))
        })
        .collect()
}

fn obj_err(e: impl std::error::Error + Send + Sync + 'static) -> TrainError {
    TrainError::Objective(Box::new(e))
}

/// Supervised fine-tuning of a [`Llava`] on an [`SftSet`], with optional loss hooks.
pub struct Sft {
    /// The model being trained (its trainable parameters are the trainer's vars).
    pub model: Llava,
    /// The data.
    pub set: SftSet,
    /// The records' preprocessed images.
    pub pixels: PixelCache,
    /// Padding id.
    pub pad: u32,
    /// Extra loss terms (RegLoRA).
    pub hooks: Vec<Box<dyn LossHook>>,
}

/// Upper bound on the memory the preprocessed-image cache may take.
pub const PIXEL_CACHE_BYTES: usize = 512 << 20;

/// Preprocessed images by example index, filled on first use when the whole set fits in
/// [`PIXEL_CACHE_BYTES`]: small runs decode and resize each image once instead of once per
/// epoch, while a real-size dataset streams from disk.
pub struct PixelCache {
    proc: ImageProcessorConfig,
    slots: Vec<Option<Tensor>>,
}

impl PixelCache {
    /// A cache for `n` examples' images, preprocessed by `proc`.
    #[must_use]
    pub fn new(proc: ImageProcessorConfig, n: usize) -> Self {
        let (h, w) = proc.crop_size;
        let per_image = 3 * h as usize * w as usize * std::mem::size_of::<f32>();
        let keep = per_image.saturating_mul(n) <= PIXEL_CACHE_BYTES;
        Self {
            proc,
            slots: vec![None; if keep { n } else { 0 }],
        }
    }

    /// Example `i`'s image, read from `path` unless it is cached: `[3, H, W]`.
    ///
    /// # Errors
    /// An unreadable or undecodable image, named.
    pub fn get(&mut self, i: usize, path: &Path) -> Result<Tensor, TrainError> {
        if let Some(t) = self.slots.get(i).and_then(Option::as_ref) {
            return Ok(t.clone());
        }
        let t = self
            .proc
            .preprocess_file(path, &Device::Cpu)
            .map_err(obj_err)?;
        if let Some(slot) = self.slots.get_mut(i) {
            *slot = Some(t.clone());
        }
        Ok(t)
    }
}

impl Sft {
    fn images(&mut self, indices: &[usize]) -> Result<Option<Tensor>, TrainError> {
        let with = indices
            .iter()
            .filter(|&&i| self.set.images[i].is_some())
            .count();
        if with == 0 {
            return Ok(None);
        }
        if with != indices.len() {
            return Err(TrainError::Data(
                "a micro-batch mixes image and text-only records; use batch_size = 1 for such data"
                    .into(),
            ));
        }
        let mut imgs = Vec::with_capacity(indices.len());
        for &i in indices {
            if let Some(p) = self.set.images[i].as_ref() {
                imgs.push(self.pixels.get(i, p)?);
            }
        }
        Ok(Some(Tensor::stack(&imgs, 0)?))
    }

    fn batch(&self, indices: &[usize]) -> Result<Batch, TrainError> {
        let ex: Vec<Example> = indices
            .iter()
            .map(|&i| self.set.examples[i].clone())
            .collect();
        Batch::right_padded(&ex, self.pad).map_err(obj_err)
    }
}

impl Objective for Sft {
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError> {
        Ok(self.batch(indices)?.target_count())
    }

    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        vars: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError> {
        let t = self
            .batch(&mb.indices)?
            .tensors(&Device::Cpu)
            .map_err(obj_err)?;
        let pixels = self.images(&mb.indices)?;
        self.model.set_dropout_seed(Some(mb.seed));
        let hidden = self
            .model
            .forward_hidden(
                &t.input_ids,
                pixels.as_ref(),
                Some(&t.attention_mask),
                None,
                None,
            )
            .map_err(obj_err)?;
        let labels = t
            .labels
            .as_ref()
            .ok_or_else(|| TrainError::Data("BUG: training batch without labels".into()))?;
        // The LM head runs only at labelled positions unless a hook needs every logit.
        let model = &self.model;
        let head = |h: &Tensor| model.lm_head(h).map_err(obj_err);
        sft_micro_loss_hidden(
            &hidden,
            &head,
            model.config().text.vocab_size,
            labels,
            mb.window_targets,
            &mut self.hooks,
            mb.step,
            mb.micro,
            vars,
        )
    }
}

/// The optimization parameters both training kinds take.
#[derive(Debug, Clone, Deserialize)]
pub struct LoopParams {
    /// Optimizer steps; 0 derives them from `epochs`.
    pub steps: i64,
    /// Passes over the data when `steps` is 0.
    pub epochs: f64,
    /// Examples per micro-batch.
    pub batch_size: i64,
    /// Micro-batches per step.
    pub grad_accum: i64,
    /// Warmup as a fraction of the steps.
    pub warmup_ratio: f64,
    /// Global-norm clipping (0 = off).
    pub max_grad_norm: f64,
    /// Checkpoint period in steps (0 = never).
    pub checkpoint_every: i64,
}

fn positive(name: &str, v: i64) -> Result<usize, StageError> {
    usize::try_from(v)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| StageError::Input(format!("parameter `{name}` = {v} must be at least 1")))
}

impl LoopParams {
    /// The trainer settings for `n` examples.
    ///
    /// # Errors
    /// Out-of-range parameters, named.
    pub fn config(&self, n: usize, seed: u64) -> Result<TrainConfig, StageError> {
        let mbs = positive("batch_size", self.batch_size)?;
        let accum = positive("grad_accum", self.grad_accum)?;
        let steps = if self.steps > 0 {
            self.steps as u64
        } else if self.steps == 0 && self.epochs > 0.0 {
            ((self.epochs * n as f64) / (mbs * accum) as f64)
                .ceil()
                .max(1.0) as u64
        } else {
            return Err(StageError::Input(format!(
                "parameters `steps` = {} and `epochs` = {}: set steps >= 1, or steps = 0 and epochs > 0",
                self.steps, self.epochs
            )));
        };
        let schedule = Schedule::with_warmup_ratio(ScheduleKind::Cosine, self.warmup_ratio, steps)
            .map_err(|e| StageError::Input(format!("parameter `warmup_ratio`: {e}")))?;
        Ok(TrainConfig {
            total_steps: steps,
            micro_batch_size: mbs,
            grad_accum: accum,
            adam: AdamWConfig::default(),
            schedule,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            checkpoint_every: u64::try_from(self.checkpoint_every).ok().filter(|&n| n > 0),
            keep_checkpoints: 1,
            seed,
            shuffle: true,
        })
    }
}

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Step (1-based).
    pub step: u64,
    /// Mean task loss.
    pub loss: f64,
    /// Hook terms.
    pub extras: Vec<(String, f64)>,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

pub(crate) fn train_err(e: TrainError) -> StageError {
    match e {
        TrainError::Objective(inner) => match inner.downcast::<ModelError>() {
            Ok(m) => StageError::Input(m.to_string()),
            Err(other) => StageError::Other(other.to_string()),
        },
        TrainError::Data(m) => StageError::Input(format!("training data: {m}")),
        other => StageError::Other(other.to_string()),
    }
}

/// Runs `obj` over `n` examples to completion with checkpoints in `ctx.checkpoint_dir`,
/// reporting progress and honouring cancellation. Returns the full per-step log (identical
/// after a resume).
///
/// # Errors
/// Training errors; [`StageError::Cancelled`] when stopped.
pub fn run_training<O: Objective>(
    ctx: &mut StageCtx<'_>,
    obj: &mut O,
    n: usize,
    groups: Vec<ParamGroup>,
    cfg: TrainConfig,
) -> Result<Vec<LogLine>, StageError> {
    let total = cfg.total_steps;
    let mut trainer = Trainer::new(cfg, groups, n).map_err(train_err)?;
    let ck = ctx.checkpoint_dir.join("trainer");
    std::fs::create_dir_all(&ck).map_err(|e| StageError::io(&ck, e))?;
    trainer.resume(&ck).map_err(train_err)?;
    let done = trainer.state().step;
    let log_path = ctx.checkpoint_dir.join("losses.jsonl");
    let mut log: Vec<LogLine> = match std::fs::read_to_string(&log_path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
            .filter(|l| l.step <= done)
            .collect(),
        Err(_) => Vec::new(),
    };
    if log.len() as u64 != done {
        return Err(StageError::Other(format!(
            "{}: has {} steps for a checkpoint at step {done}; delete the checkpoint directory to restart",
            log_path.display(),
            log.len()
        )));
    }
    let mut file = std::fs::File::create(&log_path).map_err(|e| StageError::io(&log_path, e))?;
    for l in &log {
        let line = serde_json::to_string(l).unwrap_or_default();
        writeln!(file, "{line}").map_err(|e| StageError::io(&log_path, e))?;
    }
    let _ = writeln!(
        ctx.log,
        "training {n} examples for {total} steps (resuming at {done})"
    );
    while trainer.state().step < total {
        if ctx.cancelled() {
            return Err(StageError::Cancelled);
        }
        let r = trainer.train_step(obj, Some(&ck)).map_err(train_err)?;
        let line = LogLine {
            step: r.step,
            loss: r.loss,
            extras: r.extras.clone(),
            grad_norm: r.grad_norm,
        };
        let text = serde_json::to_string(&line).unwrap_or_default();
        writeln!(file, "{text}").map_err(|e| StageError::io(&log_path, e))?;
        let extra: String = r
            .extras
            .iter()
            .map(|(k, v)| format!(" {k} {v:.4}"))
            .collect();
        ctx.progress
            .progress(r.step, total, &format!("loss {:.4}{extra}", r.loss));
        let _ = writeln!(ctx.log, "step {} loss {:.5}{extra}", r.step, r.loss);
        log.push(line);
    }
    Ok(log)
}

/// `preprocessor_config.json` for a square CLIP input of `size` pixels.
#[must_use]
pub fn preprocessor_json(size: usize) -> serde_json::Value {
    serde_json::json!({
        "crop_size": {"height": size, "width": size},
        "do_center_crop": true,
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": crate::model::image::CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": crate::model::image::CLIP_STD,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": size},
    })
}

/// Write a model directory: weights + config, `tokenizer.json`, `preprocessor_config.json`,
/// and the training log.
///
/// # Errors
/// I/O errors, named.
pub fn write_model_dir(
    dir: &Path,
    model: &Llava,
    tok: &LlavaTokenizer,
    log: &[LogLine],
) -> Result<(), StageError> {
    write_model_files(dir, model, tok)?;
    let lp = dir.join("train_log.json");
    let text = serde_json::to_string_pretty(log).unwrap_or_default();
    std::fs::write(&lp, text).map_err(|e| StageError::io(&lp, e))
}

/// The self-contained model files every model output has: weights + config,
/// `tokenizer.json` and `preprocessor_config.json` (no training log).
///
/// # Errors
/// I/O errors, named.
pub fn write_model_files(
    dir: &Path,
    model: &Llava,
    tok: &LlavaTokenizer,
) -> Result<(), StageError> {
    model
        .save(dir)
        .map_err(|e| StageError::Other(e.to_string()))?;
    let tp = dir.join("tokenizer.json");
    tok.save(&tp)
        .map_err(|e| StageError::Other(format!("{}: {e}", tp.display())))?;
    let pp = dir.join("preprocessor_config.json");
    let text = serde_json::to_string_pretty(&preprocessor_json(model.config().vision.image_size))
        .unwrap_or_default();
    std::fs::write(&pp, text).map_err(|e| StageError::io(&pp, e))
}

//! `train.vision`: pretrain the CLIP vision tower on its own, from captions.
//!
//! Real LLaVA starts from a CLIP ViT that contrastive pretraining on hundreds of millions of
//! image-text pairs has already taught to see; only the projector and the language model
//! learn in LLaVA's own stages. The tiny preset's tower starts from random weights, and the
//! caption loss of `train.pretrain` reaches it only through the language model: measured on
//! CoIN-mini, a tower trained that way reads colours and large drawings but not shapes,
//! counts or positions of small objects (shape-word loss with the true image and with a
//! shuffled one about equal), which caps every task that asks about them.
//!
//! This kind is the stand-in for CLIP's pretraining: the tower learns to predict which words
//! a caption contains (a bag of words, each word a binary label) from its selected feature
//! layer, with each patch scoring every word and the image's score the maximum over patches.
//! The maximum makes it a multiple-instance objective: the patches of a red circle in the top
//! left must themselves say `red`, `circle`, `top`, `left`, so the features the projector
//! later hands the language model are local and name what they show. A direct,
//! per-image signal needs no language model in the loop, so one step costs a few percent of
//! a LLaVA step and the tower can see many more images than the caption stage.
//!
//! Words are the captions' lower-cased alphanumeric runs without digits, sorted (the vocabulary is a function
//! of the data); the head (`[words, hidden]` plus a bias started at each word's log-odds, so
//! the first steps learn to discriminate rather than the prior) is trained with the tower and
//! dropped. The last `holdout` captions are not trained on: the output's `vision_log.json`
//! gives per-word precision and recall on them (what the tower learned to see), and the
//! per-step losses. Resumable like every training kind.
//!
//! `train.pretrain` takes the output through its `vision` parameter and starts from this
//! tower instead of random vision weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::common::{cpu_resources, loop_specs, model_preset, other, spec, split_file};
use super::sft::{LogLine, LoopParams, PixelCache, run_training, train_err};
use crate::data::coin::{DatasetInfo, read_train};
use crate::model::image::ImageProcessorConfig;
use crate::model::weights::save_safetensors;
use crate::model::{Llava, LlavaConfig, TrainMode, preset};
use crate::train::{MicroBatch, MicroLoss, Objective, ParamGroup, TrainError};

/// The tower's weights inside the output (canonical `vision_tower.*` names).
pub const VISION_WEIGHTS_FILE: &str = "vision_tower.safetensors";
/// The LLaVA config the tower was built from (its `vision_config` must match the model that
/// loads the tower).
pub const VISION_CONFIG_FILE: &str = "config.json";
/// Training log and held-out per-word scores.
pub const VISION_LOG_FILE: &str = "vision_log.json";

/// Register `train.vision`.
pub fn register(registry: &mut Registry) {
    registry.register(VisionTrain);
}

/// `train.vision`.
#[derive(Debug, Clone, Copy)]
pub struct VisionTrain;

#[derive(Deserialize)]
struct VisionParams {
    data: String,
    model: serde_json::Map<String, Value>,
    split: String,
    holdout: i64,
    lr: f64,
    weight_decay: f64,
    #[serde(flatten)]
    lp: LoopParams,
}

/// A caption's words: lower-cased alphanumeric runs without digits (numerals are box
/// coordinates: a patch cannot show "0.37", and as labels they only add noise).
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !w.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_lowercase)
}

/// Which vocabulary words each caption contains.
struct Labels {
    vocab: Vec<String>,
    /// Per example: sorted word indices.
    present: Vec<Vec<usize>>,
}

impl Labels {
    /// Vocabulary from `train` captions; labels for `captions` (words outside it dropped).
    fn new(train: &[String], captions: &[String]) -> Self {
        let mut set = std::collections::BTreeSet::new();
        for c in train {
            set.extend(words(c));
        }
        let vocab: Vec<String> = set.into_iter().collect();
        let index: BTreeMap<&str, usize> = vocab
            .iter()
            .enumerate()
            .map(|(i, w)| (w.as_str(), i))
            .collect();
        let present = captions
            .iter()
            .map(|c| {
                let mut v: Vec<usize> = words(c)
                    .filter_map(|w| index.get(w.as_str()).copied())
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect();
        Self { vocab, present }
    }

    /// `[n, words]` 0/1 targets of `indices`.
    fn targets(&self, indices: &[usize]) -> candle_core::Result<Tensor> {
        let w = self.vocab.len();
        let mut t = vec![0f32; indices.len() * w];
        for (row, &i) in indices.iter().enumerate() {
            for &k in &self.present[i] {
                t[row * w + k] = 1.0;
            }
        }
        Tensor::from_vec(t, (indices.len(), w), &Device::Cpu)
    }
}

/// Mean over rows of the summed binary cross-entropy with logits: `max(x,0) - x·y +
/// log(1 + e^-|x|)`, the numerically stable form.
fn bce_with_logits_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let l = ((logits.relu()? - (logits * targets)?)? + soft)?;
    l.sum_all()
}

/// The bag-of-words objective over one image set.
struct VisionBow {
    model: Llava,
    images: Vec<PathBuf>,
    labels: Labels,
    pixels: PixelCache,
    head_w: Tensor,
    head_b: Tensor,
}

impl VisionBow {
    /// Per-image word logits `[n, words]`: every patch scores every word, the image takes
    /// the maximum.
    fn logits(&mut self, indices: &[usize]) -> Result<Tensor, TrainError> {
        let px = indices
            .iter()
            .map(|&i| self.pixels.get(i, &self.images[i]))
            .collect::<Result<Vec<_>, _>>()?;
        let px = Tensor::stack(&px, 0)?;
        let feats = self
            .model
            .vision_features(&px)
            .map_err(|e| TrainError::Objective(Box::new(e)))?;
        let per_patch = feats
            .broadcast_matmul(&self.head_w.t()?)?
            .broadcast_add(&self.head_b)?;
        Ok(per_patch.max(1)?)
    }
}

impl Objective for VisionBow {
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError> {
        Ok(indices.len())
    }

    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        _: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError> {
        let logits = self.logits(&mb.indices)?;
        let y = self.labels.targets(&mb.indices)?;
        let total = (bce_with_logits_sum(&logits, &y)? / mb.window_targets as f64)?;
        let task = f64::from(total.to_scalar::<f32>()?);
        Ok(MicroLoss {
            total,
            task,
            extras: Vec::new(),
        })
    }
}

/// Held-out score of one word.
#[derive(Debug, Serialize, PartialEq)]
struct WordScore {
    word: String,
    /// Held-out captions containing it.
    support: usize,
    precision: f64,
    recall: f64,
}

#[derive(Serialize)]
struct VisionLog<'a> {
    /// Captions trained on / held out.
    train_captions: usize,
    holdout_captions: usize,
    /// Mean over words with support of the held-out F1 (each word's F1 from its precision
    /// and recall at logit 0).
    holdout_macro_f1: f64,
    words: Vec<WordScore>,
    steps: &'a [LogLine],
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Per-word precision and recall of `obj` on the examples `indices` (batched).
fn holdout_scores(obj: &mut VisionBow, indices: &[usize]) -> Result<Vec<WordScore>, TrainError> {
    let w = obj.labels.vocab.len();
    let (mut tp, mut pred, mut sup) = (vec![0usize; w], vec![0usize; w], vec![0usize; w]);
    for chunk in indices.chunks(64) {
        let logits: Vec<Vec<f32>> = obj.logits(chunk)?.detach().to_vec2()?;
        for (row, &i) in logits.iter().zip(chunk) {
            let present = &obj.labels.present[i];
            for (k, &x) in row.iter().enumerate() {
                let is = present.binary_search(&k).is_ok();
                let says = x > 0.0;
                sup[k] += usize::from(is);
                pred[k] += usize::from(says);
                tp[k] += usize::from(is && says);
            }
        }
    }
    Ok((0..w)
        .map(|k| WordScore {
            word: obj.labels.vocab[k].clone(),
            support: sup[k],
            precision: ratio(tp[k], pred[k]),
            recall: ratio(tp[k], sup[k]),
        })
        .collect())
}

fn macro_f1(scores: &[WordScore]) -> f64 {
    let f: Vec<f64> = scores
        .iter()
        .filter(|s| s.support > 0)
        .map(|s| {
            let d = s.precision + s.recall;
            if d == 0.0 {
                0.0
            } else {
                2.0 * s.precision * s.recall / d
            }
        })
        .collect();
    if f.is_empty() {
        0.0
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

/// `n` values uniform in `[-a, a]` from `rng`.
fn uniform(rng: &mut StdRng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-a..=a)).collect()
}

impl StageKind for VisionTrain {
    fn kind(&self) -> &'static str {
        "train.vision"
    }
    fn version(&self) -> u32 {
        // 2: numerals are not words.
        2
    }
    fn doc(&self) -> &'static str {
        "Pretrain a preset's CLIP vision tower (random init, seeded) on a captioning split by \
         predicting which words each caption contains, every patch scoring every word and the \
         image taking the maximum: the stand-in for CLIP's pretraining. Writes the tower's \
         weights for `train.pretrain`'s `vision` parameter and per-word held-out precision and \
         recall. Resumable."
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut v = vec![
            spec(
                "data",
                ParamType::Ref(ArtifactType::Dataset),
                None,
                "CoIN dataset artifact",
            ),
            spec(
                "model",
                ParamType::Table,
                Some(json!({"preset": "llava-tiny"})),
                "architecture: { preset = \"llava-tiny\" } (only its vision tower is trained)",
            ),
            spec(
                "split",
                ParamType::Str,
                Some(json!("pretrain")),
                "the captioning split (`pretrain`) or a task name; the gpt turns are the captions",
            ),
            spec(
                "holdout",
                ParamType::Int,
                Some(json!(256)),
                "last captions kept out of training and scored per word",
            ),
            spec(
                "lr",
                ParamType::Float,
                Some(json!(1e-3)),
                "peak learning rate",
            ),
        ];
        v.extend(loop_specs(0, 32, 50));
        v
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "vision",
            ty: ArtifactType::Files,
            doc: "vision_tower.safetensors, config.json (the LLaVA config it belongs to), vision_log.json",
        }]
    }
    fn resources(&self, _: &Value) -> Resources {
        cpu_resources()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        crate::model::configure_cpu_runtime();
        let p: VisionParams = ctx.params()?;
        let data = PathBuf::from(&p.data);
        let info = DatasetInfo::load(&data)?;
        let file = data.join(split_file(&data, &info, &p.split)?);
        let records = read_train(&file)?;
        let mut images = Vec::with_capacity(records.len());
        let mut captions = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            let Some(img) = &r.image else {
                return Err(StageError::Input(format!(
                    "{}: record {i} (id {}) has no image",
                    file.display(),
                    r.id
                )));
            };
            images.push(info.image_path(&data, img));
            let caption: Vec<&str> = r
                .conversations
                .iter()
                .filter(|t| t.from == "gpt")
                .map(|t| t.value.as_str())
                .collect();
            captions.push(caption.join(" "));
        }
        let holdout = usize::try_from(p.holdout).map_err(|_| {
            StageError::Input(format!("parameter `holdout` = {} must be >= 0", p.holdout))
        })?;
        if holdout >= records.len() {
            return Err(StageError::Input(format!(
                "parameter `holdout` = {holdout}: {} has only {} records",
                file.display(),
                records.len()
            )));
        }
        let n_train = records.len() - holdout;
        let labels = Labels::new(&captions[..n_train], &captions);

        let cfg = preset::preset(&model_preset(&p.model)?).map_err(other)?;
        let mut model =
            Llava::from_config_random(cfg, ctx.seed, DType::F32, &Device::Cpu).map_err(other)?;
        let mut vars = model
            .trainable_vars(TrainMode {
                vision: true,
                ..TrainMode::default()
            })
            .map_err(other)?;
        let (w, d) = (labels.vocab.len(), model.config().vision.hidden_size);
        // nn.Linear's init for the weight; the bias at each word's training log-odds.
        let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x5eed_b0a5);
        let bound = 1.0 / (d as f32).sqrt();
        let head_w =
            Var::from_vec(uniform(&mut rng, w * d, bound), (w, d), &Device::Cpu).map_err(other)?;
        let mut freq = vec![0usize; w];
        for ex in &labels.present[..n_train] {
            ex.iter().for_each(|&k| freq[k] += 1);
        }
        let bias: Vec<f32> = freq
            .iter()
            .map(|&f| {
                let q = (f as f64 + 0.5) / (n_train as f64 + 1.0);
                (q / (1.0 - q)).ln() as f32
            })
            .collect();
        let head_b = Var::from_vec(bias, w, &Device::Cpu).map_err(other)?;
        vars.push(("bow_head.weight".into(), head_w.clone()));
        vars.push(("bow_head.bias".into(), head_b.clone()));
        let groups = vec![ParamGroup {
            name: "vision".into(),
            lr: p.lr,
            weight_decay: p.weight_decay,
            vars,
        }];
        let tcfg = p.lp.config(n_train, ctx.seed)?;
        let proc = ImageProcessorConfig::clip(model.config().vision.image_size as u32);
        let pixels = PixelCache::new(proc, images.len());
        let _ = std::io::Write::write_fmt(
            ctx.log,
            format_args!(
                "{} captions ({n_train} trained, {holdout} held out), {w} words\n",
                records.len()
            ),
        );
        let mut obj = VisionBow {
            model,
            images,
            labels,
            pixels,
            head_w: head_w.as_tensor().clone(),
            head_b: head_b.as_tensor().clone(),
        };
        let log = run_training(ctx, &mut obj, n_train, groups, tcfg)?;
        let held: Vec<usize> = (n_train..records.len()).collect();
        let scores = holdout_scores(&mut obj, &held).map_err(train_err)?;
        let f1 = macro_f1(&scores);
        let _ = std::io::Write::write_fmt(
            ctx.log,
            format_args!("held-out macro F1 over words: {f1:.3}\n"),
        );
        write_vision_dir(
            &ctx.output("vision"),
            &obj.model,
            &VisionLog {
                train_captions: n_train,
                holdout_captions: holdout,
                holdout_macro_f1: f1,
                words: scores,
                steps: &log,
            },
        )
    }
}

fn write_vision_dir(dir: &Path, model: &Llava, log: &VisionLog<'_>) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = model
        .params()
        .iter()
        .filter(|(n, _)| n.starts_with("vision_tower."))
        .map(|(n, t)| (n.to_owned(), t.clone()))
        .collect();
    let wp = dir.join(VISION_WEIGHTS_FILE);
    save_safetensors(&tensors, DType::F32, &wp)
        .map_err(|e| StageError::Other(format!("{}: {e}", wp.display())))?;
    let cp = dir.join(VISION_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&model.config().to_json()).unwrap_or_default();
    std::fs::write(&cp, text).map_err(|e| StageError::io(&cp, e))?;
    let lp = dir.join(VISION_LOG_FILE);
    let text = serde_json::to_string_pretty(log).unwrap_or_default();
    std::fs::write(&lp, text).map_err(|e| StageError::io(&lp, e))
}

/// Puts the tower of a `train.vision` output into `model`, after checking that it was built
/// for the same vision config. Returns the number of tensors set.
///
/// # Errors
/// A missing or unreadable file, a different vision config or a tensor that does not fit,
/// each naming the file.
pub fn load_vision(model: &mut Llava, dir: &Path) -> Result<usize, StageError> {
    let cp = dir.join(VISION_CONFIG_FILE);
    let saved = LlavaConfig::from_file(&cp).map_err(other)?;
    let (want, have) = (model.config().to_json(), saved.to_json());
    for key in [
        "vision_config",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    ] {
        if want.get(key) != have.get(key) {
            return Err(StageError::Input(format!(
                "{}: `{key}` differs from the model's ({} vs {}); train the tower with the same preset",
                cp.display(),
                have.get(key).cloned().unwrap_or(Value::Null),
                want.get(key).cloned().unwrap_or(Value::Null),
            )));
        }
    }
    let wp = dir.join(VISION_WEIGHTS_FILE);
    if !wp.is_file() {
        return Err(StageError::Input(format!(
            "{} does not exist (expected a `train.vision` output)",
            wp.display()
        )));
    }
    super::merge_kinds::set_params_from_file(model, &wp)
}

#[cfg(test)]
#[path = "vision_kind_tests.rs"]
mod tests;

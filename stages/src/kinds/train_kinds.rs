//! Model-building and training kinds: `train.pretrain`, `train.lora` (and the registration of
//! `tokenizer.train`, which lives in [`super::tokenizer_kind`]).
//!
//! - `train.pretrain` builds a model from a preset with random weights seeded by `ctx.seed`
//!   (vocabulary and special ids taken from the tokenizer) and trains every parameter (vision
//!   tower, projector, decoder) on the dataset's captioning split and optionally task splits.
//!   With `vision` it starts from a `train.vision` tower ([`super::vision_kind`]) instead of
//!   random vision weights, and `freeze_vision` keeps that tower fixed, as LLaVA keeps CLIP.
//! - `train.lora` attaches a fresh LoRA to a base model, trains it (plus the projector in its
//!   own lr group, as SEFE does) on one task's training file and saves the adapter in PEFT
//!   layout, next to the trained projector (`non_lora_trainables.safetensors`, LLaVA's name for
//!   the weights a LoRA run trains outside the LoRA) and the `train_log.json`. With `reglora`
//!   (λ) > 0 it adds RegLoRA's penalty ([`crate::train::reglora`]) at the key elements of the
//!   earlier tasks.
//!
//!   Two ways to wire a task sequence. The SEFE recipes set `merge = false` and give the
//!   key elements as a parameter: the merge (`model.merge`) and the key-element selection
//!   (`reglora.key-elements`) are then stages of their own ([`super::merge_kinds`]), chained
//!   with `chain = { base = "merge", key_elements = "keys" }`, so each is cached and rerun on
//!   its own. With `merge = true` (the default, kept for recipes that chain one stage with
//!   `chain = "base"`) the stage also writes the merged model; the key elements then travel
//!   inside it as `reglora_key_elements.safetensors` (read from the base when `key_elements`
//!   is not given; this task's top entries, then the earlier ones, written into the merged
//!   model and into the `key_elements` output).
//!
//! Every model output is self-contained (weights, `config.json`, `tokenizer.json`,
//! `preprocessor_config.json`) and carries `train_log.json`, the per-step losses. Training
//! resumes from `ctx.checkpoint_dir` after an interruption with identical output bytes.

use std::path::Path;

use candle_core::{DType, Device};
use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use serde::Deserialize;
use serde_json::{Value, json};

pub use super::tokenizer_kind::TokenizerTrain;

use super::common::{cpu_resources, loop_specs, model_preset, other, spec, split_file};
use super::sft::{
    LoopParams, PixelCache, Sft, SftSet, load_records, run_training, template, train_err,
    write_model_dir,
};
use crate::data::coin::DatasetInfo;
use crate::model::chat::ChatTemplate;
use crate::model::image::ImageProcessorConfig;
use crate::model::lora::TargetModules;
use crate::model::tokenizer::LlavaTokenizer;
use crate::model::{Llava, LoraConfig, TrainMode, preset};
use crate::train::ParamGroup;
use crate::train::reglora::{KeyElements, RegLoraPenalty};

/// File name of the accumulated RegLoRA key elements inside a model directory.
pub const KEY_ELEMENTS_FILE: &str = "reglora_key_elements.safetensors";

/// File of an adapter directory holding the parameters trained outside the LoRA (the
/// projector), full tensors under their model names; `model.merge` puts them into the base.
pub const NON_LORA_FILE: &str = "non_lora_trainables.safetensors";

/// The training log inside a model or adapter directory (per-step losses).
pub const TRAIN_LOG_FILE: &str = "train_log.json";

/// Register the training kinds.
pub fn register(registry: &mut Registry) {
    registry.register(TokenizerTrain);
    registry.register(Pretrain);
    registry.register(LoraTrain);
}

/// `train.pretrain`.
#[derive(Debug, Clone, Copy)]
pub struct Pretrain;

#[derive(Deserialize)]
struct PretrainParams {
    data: String,
    tokenizer: String,
    model: serde_json::Map<String, Value>,
    splits: Vec<String>,
    freeze_vision: bool,
    template: String,
    lr: f64,
    weight_decay: f64,
    #[serde(flatten)]
    lp: LoopParams,
}

impl StageKind for Pretrain {
    fn kind(&self) -> &'static str {
        "train.pretrain"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Build a model from a preset with random weights (seeded), sized to the tokenizer, and train \
         every parameter (vision tower, projector, decoder) with AdamW and a warmup+cosine schedule on \
         the dataset's splits; writes a Hugging Face model directory. Resumable."
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
                "tokenizer",
                ParamType::Ref(ArtifactType::Tokenizer),
                None,
                "tokenizer (from `tokenizer.train`)",
            ),
            spec(
                "model",
                ParamType::Table,
                Some(json!({"preset": "llava-tiny"})),
                "architecture: { preset = \"llava-tiny\" }",
            ),
            spec(
                "splits",
                ParamType::List(Box::new(ParamType::Str)),
                Some(json!(["pretrain"])),
                "training splits: `pretrain` (captions) and/or task names",
            ),
            spec(
                "vision",
                ParamType::Ref(ArtifactType::Files),
                Some(json!("")),
                "a `train.vision` output: start from its pretrained vision tower instead of random \
                 vision weights (unset: random, trained here with the rest)",
            ),
            spec(
                "freeze_vision",
                ParamType::Bool,
                Some(json!(false)),
                "keep the vision tower fixed (as LLaVA keeps CLIP); train projector and decoder only",
            ),
            spec(
                "template",
                ParamType::Enum(&["vicuna_v1", "plain"]),
                Some(json!("vicuna_v1")),
                "text format: `vicuna_v1` (system prompt, USER/ASSISTANT, the caption prompt) or \
                 `plain` (LLaVA's stage-1 format: image, caption, `</s>`; a third fewer tokens)",
            ),
            spec(
                "lr",
                ParamType::Float,
                Some(json!(1e-3)),
                "peak learning rate",
            ),
        ];
        v.extend(loop_specs(0, 8, 20));
        v
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: ArtifactType::Model,
            doc: "HF model dir: config.json, model.safetensors, tokenizer.json, preprocessor_config.json, train_log.json",
        }]
    }
    fn resources(&self, _: &Value) -> Resources {
        cpu_resources()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        crate::model::configure_cpu_runtime();
        let p: PretrainParams = ctx.params()?;
        let (data, tok_dir) = (
            Path::new(&p.data).to_path_buf(),
            Path::new(&p.tokenizer).to_path_buf(),
        );
        let info = DatasetInfo::load(&data)?;
        let tok = LlavaTokenizer::load(&tok_dir).map_err(other)?;
        let name = model_preset(&p.model)?;
        let mut cfg = preset::preset(&name).map_err(other)?;
        cfg.text.vocab_size = tok.vocab_size();
        cfg.image_token_index = tok.image_id;
        cfg.text.bos_token_id = Some(tok.bos_id);
        cfg.text.eos_token_id = Some(tok.eos_id);
        cfg.text.pad_token_id = Some(tok.pad_id);
        let mut model =
            Llava::from_config_random(cfg, ctx.seed, DType::F32, &Device::Cpu).map_err(other)?;
        if ctx.inputs.contains_key("vision") {
            let dir = ctx.input("vision")?.to_path_buf();
            let n = super::vision_kind::load_vision(&mut model, &dir)?;
            let _ = writeln!(ctx.log, "vision tower: {n} tensors from {}", dir.display());
        }
        let tpl = if p.template == "plain" {
            ChatTemplate::plain(model.config().image_tokens_per_image())
        } else {
            template(&model)
        };
        let max_len = model.config().text.max_position_embeddings;
        let mut set = SftSet {
            examples: Vec::new(),
            images: Vec::new(),
        };
        for s in &p.splits {
            let file = split_file(&data, &info, s)?;
            load_records(&data, &info, &file, &tok, &tpl, max_len, &mut set)?;
        }
        let mode = if p.freeze_vision {
            TrainMode::FULL
        } else {
            TrainMode::ALL
        };
        let vars = model.trainable_vars(mode).map_err(other)?;
        let groups = vec![ParamGroup {
            name: "all".into(),
            lr: p.lr,
            weight_decay: p.weight_decay,
            vars,
        }];
        let tcfg = p.lp.config(set.examples.len(), ctx.seed)?;
        let proc = ImageProcessorConfig::clip(model.config().vision.image_size as u32);
        let pixels = PixelCache::new(proc, set.images.len());
        let mut obj = Sft {
            model,
            set,
            pixels,
            pad: tok.pad_id,
            hooks: Vec::new(),
        };
        let n = obj.set.examples.len();
        let log = run_training(ctx, &mut obj, n, groups, tcfg)?;
        write_model_dir(&ctx.output("model"), &obj.model, &tok, &log)
    }
}

/// `train.lora`.
#[derive(Debug, Clone, Copy)]
pub struct LoraTrain;

#[derive(Deserialize)]
struct LoraParams {
    base: String,
    data: String,
    task: String,
    rank: i64,
    alpha: f64,
    dropout: f64,
    targets: String,
    lr: f64,
    projector_lr: f64,
    weight_decay: f64,
    reglora: f64,
    reglora_top: f64,
    merge: bool,
    #[serde(flatten)]
    lp: LoopParams,
}

/// Whether a `train.lora` parameter table asks for the merged model (`merge`, default true).
fn merges(params: &Value) -> bool {
    params.get("merge").and_then(Value::as_bool).unwrap_or(true)
}

/// `reglora` (the penalty weight λ; 0 turns RegLoRA off) and `reglora_top` (the percent of
/// entries of each ΔW kept as key elements). Flat numbers rather than a table so that a
/// recipe can sweep RegLoRA on and off with a matrix dimension named `reglora`.
fn reglora_params(lambda: f64, top: f64) -> Result<Option<(f64, f64)>, StageError> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(StageError::Input(format!(
            "parameter `reglora` = {lambda} must be a finite number >= 0 (0 turns RegLoRA off)"
        )));
    }
    if !(top > 0.0 && top <= 100.0) {
        return Err(StageError::Input(format!(
            "parameter `reglora_top` = {top} must be a percentage in (0, 100]"
        )));
    }
    Ok((lambda > 0.0).then_some((top, lambda)))
}

const DEFAULT_TARGETS: &str = "language_model";

impl StageKind for LoraTrain {
    fn kind(&self) -> &'static str {
        "train.lora"
    }
    fn version(&self) -> u32 {
        // 2: the adapter output also holds the trained projector and train_log.json;
        // `key_elements` and `merge` parameters.
        2
    }
    fn doc(&self) -> &'static str {
        "Fine-tune a base model on one task's training file with a fresh LoRA (and the projector at its \
         own lr), optionally with RegLoRA's penalty at the key elements of earlier tasks (`key_elements`, \
         or those the base carries); writes the PEFT adapter (plus the trained projector and \
         train_log.json) and, with `merge` (default), the merged model and the accumulated key elements. \
         Resumable; with `merge = false` chain it through `model.merge` and `reglora.key-elements` \
         (`chain = { base = \"merge\", key_elements = \"keys\" }`)."
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut v = vec![
            spec(
                "base",
                ParamType::RefOrPath,
                None,
                "model to start from: a model stage (the previous task's merged model) or a Hugging Face LLaVA directory",
            ),
            spec(
                "data",
                ParamType::Ref(ArtifactType::Dataset),
                None,
                "CoIN dataset artifact",
            ),
            spec(
                "task",
                ParamType::Str,
                None,
                "task whose training file to use; `*` = every task's, mixed (joint training)",
            ),
            spec("rank", ParamType::Int, Some(json!(8)), "LoRA rank r"),
            spec(
                "alpha",
                ParamType::Float,
                Some(json!(16.0)),
                "LoRA alpha (scale alpha/r)",
            ),
            spec(
                "dropout",
                ParamType::Float,
                Some(json!(0.0)),
                "LoRA dropout",
            ),
            spec(
                "targets",
                ParamType::Str,
                Some(json!(DEFAULT_TARGETS)),
                "`language_model` (all decoder projections) or a PEFT regex over module names",
            ),
            spec(
                "lr",
                ParamType::Float,
                Some(json!(2e-4)),
                "LoRA learning rate",
            ),
            spec(
                "projector_lr",
                ParamType::Float,
                Some(json!(2e-5)),
                "projector learning rate (0: frozen)",
            ),
            spec(
                "reglora",
                ParamType::Float,
                Some(json!(0.0)),
                "RegLoRA penalty weight lambda (the paper: 2.5e3); 0 = off",
            ),
            spec(
                "reglora_top",
                ParamType::Float,
                Some(json!(2.0)),
                "RegLoRA: percent of each update's entries kept as key elements (with `merge`)",
            ),
            spec(
                "key_elements",
                ParamType::Ref(ArtifactType::Files),
                Some(json!("")),
                "RegLoRA: accumulated key elements of the earlier tasks (a `reglora.key-elements` \
                 output); unset: those the base model carries, if any",
            ),
            spec(
                "merge",
                ParamType::Bool,
                Some(json!(true)),
                "also write the merged model and the accumulated key elements (false: the adapter only)",
            ),
        ];
        v.extend(loop_specs(0, 8, 20));
        v
    }
    fn outputs(&self, params: &Value) -> Vec<OutputSpec> {
        let adapter = OutputSpec {
            name: "adapter",
            ty: ArtifactType::Adapter,
            doc: "the task's LoRA in PEFT layout, the trained projector (non_lora_trainables.safetensors) and train_log.json",
        };
        if !merges(params) {
            return vec![adapter];
        }
        vec![
            OutputSpec {
                name: "model",
                ty: ArtifactType::Model,
                doc: "merged model dir (plus reglora_key_elements.safetensors with reglora)",
            },
            adapter,
            OutputSpec {
                name: "key_elements",
                ty: ArtifactType::Files,
                doc: "accumulated RegLoRA key elements (module -> I64 [K, 2]); empty without reglora",
            },
        ]
    }
    fn resources(&self, _: &Value) -> Resources {
        cpu_resources()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        crate::model::configure_cpu_runtime();
        let p: LoraParams = ctx.params()?;
        let reg = reglora_params(p.reglora, p.reglora_top)?;
        let (base, data) = (
            ctx.recipe_dir.join(&p.base),
            Path::new(&p.data).to_path_buf(),
        );
        let info = DatasetInfo::load(&data)?;
        // `*` trains on the union of every task (the joint-training upper bound of
        // continual learning); the trainer shuffles across files.
        let files: Vec<String> = if p.task == "*" {
            info.tasks.iter().map(|t| t.train.clone()).collect()
        } else {
            let file = info.task(&p.task).map(|t| t.train.clone()).ok_or_else(|| {
                let names: Vec<&str> = info.tasks.iter().map(|t| t.name.as_str()).collect();
                StageError::Input(format!(
                    "parameter `task`: `{}` is not a task of {} (have {names:?}, or `*` for all)",
                    p.task,
                    data.display()
                ))
            })?;
            vec![file]
        };
        let tok = LlavaTokenizer::load(&base).map_err(other)?;
        let proc =
            ImageProcessorConfig::load(&base.join("preprocessor_config.json")).map_err(other)?;
        let mut model = Llava::load(&base, DType::F32, &Device::Cpu).map_err(other)?;
        let mcfg = model.config().clone();
        tok.check_model_vocab(
            &base.join("config.json"),
            mcfg.text.vocab_size,
            mcfg.image_token_index,
        )
        .map_err(other)?;
        let rank = usize::try_from(p.rank)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                StageError::Input(format!("parameter `rank` = {} must be at least 1", p.rank))
            })?;
        if !(0.0..1.0).contains(&p.dropout) {
            return Err(StageError::Input(format!(
                "parameter `dropout` = {} must be in [0, 1)",
                p.dropout
            )));
        }
        let mut lora = LoraConfig::language_model(rank, p.alpha);
        lora.dropout = p.dropout;
        if p.targets != DEFAULT_TARGETS {
            lora.target_modules = TargetModules::Regex(p.targets.clone());
        }
        // The adapter's init is seeded by the stage seed, like everything else.
        model
            .add_adapter("task", lora, ctx.seed)
            .map_err(|e| StageError::Input(format!("parameter `targets`: {e}")))?;
        let mut set = SftSet {
            examples: Vec::new(),
            images: Vec::new(),
        };
        for file in &files {
            load_records(
                &data,
                &info,
                file,
                &tok,
                &template(&model),
                mcfg.text.max_position_embeddings,
                &mut set,
            )?;
        }
        let mode = TrainMode {
            lora: true,
            projector: p.projector_lr > 0.0,
            ..TrainMode::default()
        };
        let vars = model.trainable_vars(mode).map_err(other)?;
        let (proj, lora_vars): (Vec<_>, Vec<_>) = vars
            .iter()
            .cloned()
            .partition(|(n, _)| n.starts_with("multi_modal_projector."));
        let mut groups = vec![ParamGroup {
            name: "lora".into(),
            lr: p.lr,
            weight_decay: p.weight_decay,
            vars: lora_vars,
        }];
        if !proj.is_empty() {
            groups.push(ParamGroup {
                name: "projector".into(),
                lr: p.projector_lr,
                weight_decay: p.weight_decay,
                vars: proj,
            });
        }
        let prev = previous_keys(ctx, &base, reg.is_some())?;
        let mut hooks: Vec<Box<dyn crate::train::LossHook>> = Vec::new();
        if let Some((_, lambda)) = reg
            && !prev.is_empty()
        {
            let hook = RegLoraPenalty::new(&prev, &vars, lambda).map_err(train_err)?;
            let _ = writeln!(
                ctx.log,
                "reglora: {} key elements over {} matrices, lambda {lambda}",
                prev.len(),
                hook.matrices()
            );
            hooks.push(Box::new(hook));
        }
        let tcfg = p.lp.config(set.examples.len(), ctx.seed)?;
        let pixels = PixelCache::new(proc, set.images.len());
        let mut obj = Sft {
            model,
            set,
            pixels,
            pad: tok.pad_id,
            hooks,
        };
        let n = obj.set.examples.len();
        let log = run_training(ctx, &mut obj, n, groups, tcfg)?;
        let mut model = obj.model;
        model.set_dropout_seed(None);
        let adapter = ctx.output("adapter");
        model
            .save_adapter("task", &adapter)
            .map_err(|e| StageError::Other(e.to_string()))?;
        // Var tensors are views of the trained values; the projector ones are the only
        // trained parameters outside the LoRA.
        let trained_proj: Vec<_> = vars
            .iter()
            .filter(|(n, _)| n.starts_with("multi_modal_projector."))
            .cloned()
            .collect();
        save_non_lora(&adapter.join(NON_LORA_FILE), &trained_proj)?;
        write_log(&adapter.join(TRAIN_LOG_FILE), &log)?;
        if !p.merge {
            return Ok(());
        }
        let keys_out = ctx.output("key_elements");
        let model_dir = ctx.output("model");
        if let Some((top, _)) = reg {
            let keys = KeyElements::select(&vars, top)
                .map_err(train_err)?
                .accumulate(&prev);
            keys.save(&keys_out.join(KEY_ELEMENTS_FILE))
                .map_err(train_err)?;
            keys.save(&model_dir.join(KEY_ELEMENTS_FILE))
                .map_err(train_err)?;
            let _ = writeln!(ctx.log, "reglora: {} accumulated key elements", keys.len());
        }
        model
            .merge_adapter("task")
            .map_err(|e| StageError::Other(e.to_string()))?;
        write_model_dir(&model_dir, &model, &tok, &log)
    }
}

/// The key elements RegLoRA penalizes: the `key_elements` input when given, else the set the
/// base model directory carries (the `merge = true` chain), else none. Not read at all with
/// RegLoRA off, so a recipe may wire the same chain for every method.
fn previous_keys(
    ctx: &mut StageCtx<'_>,
    base: &Path,
    reglora: bool,
) -> Result<KeyElements, StageError> {
    let given = ctx.inputs.contains_key("key_elements");
    if !reglora {
        if given {
            let _ = writeln!(ctx.log, "reglora off: `key_elements` not used");
        }
        return Ok(KeyElements::default());
    }
    let file = if given {
        let f = ctx.input("key_elements")?.join(KEY_ELEMENTS_FILE);
        if !f.is_file() {
            return Err(StageError::Input(format!(
                "parameter `key_elements`: {} does not exist (expected the output of a \
                 `reglora.key-elements` stage)",
                f.display()
            )));
        }
        f
    } else {
        base.join(KEY_ELEMENTS_FILE)
    };
    if file.is_file() {
        KeyElements::load(&file).map_err(train_err)
    } else {
        Ok(KeyElements::default())
    }
}

/// Writes the projector parameters a LoRA run trained (none: no file).
fn save_non_lora(path: &Path, vars: &[(String, candle_core::Var)]) -> Result<(), StageError> {
    if vars.is_empty() {
        return Ok(());
    }
    let tensors: Vec<(String, candle_core::Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    crate::model::weights::save_safetensors(&tensors, DType::F32, path)
        .map_err(|e| StageError::Other(format!("{}: {e}", path.display())))
}

fn write_log(path: &Path, log: &[super::sft::LogLine]) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(log).unwrap_or_default();
    std::fs::write(path, text).map_err(|e| StageError::io(path, e))
}

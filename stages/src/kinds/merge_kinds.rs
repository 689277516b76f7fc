//! The kinds that consume a trained adapter: `model.merge` and `reglora.key-elements`.
//!
//! SEFE's per-task loop is train -> select key elements -> merge -> next task. Keeping the
//! last two out of `train.lora` (which runs them with `merge = false`) makes each a cached
//! stage of its own: a recipe chains `task i` to `merge i-1` and `keys i-1`
//! (`chain = { base = "merge", key_elements = "keys" }`), `merge i` reads `task i`'s adapter
//! on the same base `task i` trained on, and `keys i` reads `task i`'s adapter plus `keys i-1`.
//!
//! - `model.merge` folds a PEFT adapter into a base model (`W += α/r · B·A` in f32, PEFT's
//!   `merge_and_unload`) after putting in the parameters the LoRA run trained outside the LoRA
//!   (the projector, [`NON_LORA_FILE`]). The output is the same directory `train.lora` with
//!   `merge = true` writes, byte for byte: weights, `config.json`, `tokenizer.json`,
//!   `preprocessor_config.json`, and the adapter's `train_log.json` (so `eval.cl-metrics`
//!   finds the loss curves through the merged models).
//! - `reglora.key-elements` takes the raw update `ΔW = B·A` (no `α/r`) of every regularized
//!   matrix of an adapter, keeps the top `top` % entries by `|ΔW|` and puts them before the
//!   `previous` set (concatenated, duplicates kept; [`crate::train::reglora`]). The output is
//!   one `reglora_key_elements.safetensors` (module -> `I64 [K, 2]`), what `train.lora` reads
//!   through its `key_elements` parameter.

use std::path::Path;

use candle_core::{DType, Device, Var};
use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::sft::{train_err, write_model_files};
use super::train_kinds::{KEY_ELEMENTS_FILE, NON_LORA_FILE, TRAIN_LOG_FILE};
use crate::model::Llava;
use crate::model::tokenizer::LlavaTokenizer;
use crate::train::reglora::KeyElements;

/// PEFT's weight file inside an adapter directory.
const ADAPTER_FILE: &str = "adapter_model.safetensors";

/// Register `model.merge` and `reglora.key-elements`.
pub fn register(registry: &mut Registry) {
    registry.register(ModelMerge);
    registry.register(KeyElementsKind);
}

fn input_err(e: impl std::fmt::Display) -> StageError {
    StageError::Input(e.to_string())
}

/// `model.merge`.
#[derive(Debug, Clone, Copy)]
pub struct ModelMerge;

#[derive(Deserialize)]
struct MergeParams {
    base: String,
    adapter: String,
}

/// Writes a merged model directory: the files `train.lora` writes with `merge = true`, the
/// training log copied from the adapter when it has one.
fn write_merged(
    dir: &Path,
    model: &Llava,
    tok: &LlavaTokenizer,
    adapter: &Path,
) -> Result<(), StageError> {
    write_model_files(dir, model, tok)?;
    let log = adapter.join(TRAIN_LOG_FILE);
    if log.is_file() {
        let to = dir.join(TRAIN_LOG_FILE);
        std::fs::copy(&log, &to).map_err(|e| StageError::io(&to, e))?;
    }
    Ok(())
}

/// Puts every tensor of a safetensors file into `model` under its (canonical) name: an
/// adapter's non-LoRA trained parameters (the projector), a `train.vision` tower. A missing
/// file sets nothing. Returns the number of tensors set.
pub(super) fn set_params_from_file(model: &mut Llava, file: &Path) -> Result<usize, StageError> {
    if !file.is_file() {
        return Ok(0);
    }
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| {
        StageError::Input(format!(
            "{}: not a readable safetensors file: {e}",
            file.display()
        ))
    })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in &names {
        model
            .set_param(name, &tensors[*name])
            .map_err(|e| StageError::Input(format!("{}: {e}", file.display())))?;
    }
    Ok(names.len())
}

impl StageKind for ModelMerge {
    fn kind(&self) -> &'static str {
        "model.merge"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Merge a LoRA adapter (a `train.lora` adapter output or a PEFT directory) into a base model \
         (W += alpha/r * B*A, as PEFT's merge_and_unload), with the projector the LoRA run trained; \
         writes a Hugging Face model dir with the adapter's train_log.json."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "base",
                ty: ParamType::RefOrPath,
                default: None,
                doc: "the model the adapter was trained on: a model stage or a Hugging Face LLaVA directory",
            },
            ParamSpec {
                name: "adapter",
                ty: ParamType::RefOrPath,
                default: None,
                doc: "the adapter: `@<train.lora stage>.adapter` or a PEFT directory",
            },
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "model",
            ty: ArtifactType::Model,
            doc: "merged model dir: config.json, model.safetensors, tokenizer.json, preprocessor_config.json, train_log.json",
        }]
    }
    fn resources(&self, _: &Value) -> Resources {
        super::common::cpu_resources()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        crate::model::configure_cpu_runtime();
        let p: MergeParams = ctx.params()?;
        let (base, adapter) = (
            ctx.recipe_dir.join(&p.base),
            ctx.recipe_dir.join(&p.adapter),
        );
        if !adapter.join(ADAPTER_FILE).is_file() {
            return Err(StageError::Input(format!(
                "parameter `adapter`: {} is not a PEFT adapter directory (no {ADAPTER_FILE})",
                adapter.display()
            )));
        }
        let tok = LlavaTokenizer::load(&base).map_err(input_err)?;
        let mut model = Llava::load(&base, DType::F32, &Device::Cpu).map_err(input_err)?;
        let cfg = model.config().clone();
        tok.check_model_vocab(
            &base.join("config.json"),
            cfg.text.vocab_size,
            cfg.image_token_index,
        )
        .map_err(input_err)?;
        let extra = set_params_from_file(&mut model, &adapter.join(NON_LORA_FILE))?;
        model
            .load_adapter(&adapter, "task", false)
            .map_err(input_err)?;
        let layers = model.adapter("task").map_err(input_err)?.num_layers();
        model
            .merge_adapter("task")
            .map_err(|e| StageError::Other(e.to_string()))?;
        let _ = writeln!(
            ctx.log,
            "merged {layers} LoRA layers and {extra} non-LoRA tensors of {} into {}",
            adapter.display(),
            base.display()
        );
        write_merged(&ctx.output("model"), &model, &tok, &adapter)
    }
}

/// `reglora.key-elements`.
#[derive(Debug, Clone, Copy)]
pub struct KeyElementsKind;

#[derive(Deserialize)]
struct KeyParams {
    top: f64,
}

/// The LoRA factors of a PEFT adapter directory, by their PEFT names (the names
/// [`KeyElements::select`] pairs and the trainer's variables carry).
fn adapter_factors(dir: &Path) -> Result<Vec<(String, Var)>, StageError> {
    let file = dir.join(ADAPTER_FILE);
    if !file.is_file() {
        return Err(StageError::Input(format!(
            "parameter `adapter`: {} is not a PEFT adapter directory (no {ADAPTER_FILE})",
            dir.display()
        )));
    }
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
        StageError::Input(format!(
            "{}: not a readable safetensors file: {e}",
            file.display()
        ))
    })?;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v = Var::from_tensor(&t)
            .map_err(|e| StageError::Input(format!("{}: `{name}`: {e}", file.display())))?;
        out.push((name, v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

impl StageKind for KeyElementsKind {
    fn kind(&self) -> &'static str {
        "reglora.key-elements"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "RegLoRA key elements after a task (SEFE): the top `top` % entries of |B*A| of every \
         regularized matrix of the adapter (decoder linears; no alpha/r), followed by the `previous` \
         task's accumulated set (concatenated, duplicates kept); feeds `train.lora`'s `key_elements`."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "adapter",
                ty: ParamType::Ref(ArtifactType::Adapter),
                default: None,
                doc: "the finished task's adapter (`@<train.lora stage>.adapter`)",
            },
            ParamSpec {
                name: "previous",
                ty: ParamType::Ref(ArtifactType::Files),
                default: Some(json!("")),
                doc: "the previous task's key elements (a `reglora.key-elements` output); unset: the first task",
            },
            ParamSpec {
                name: "top",
                ty: ParamType::Float,
                default: Some(json!(2.0)),
                doc: "percent of each update's entries kept (the paper: 2)",
            },
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "key_elements",
            ty: ArtifactType::Files,
            doc: "reglora_key_elements.safetensors: module -> I64 [K, 2] (row, col), this task's first",
        }]
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: KeyParams = ctx.params()?;
        if !(p.top > 0.0 && p.top <= 100.0) {
            return Err(StageError::Input(format!(
                "parameter `top` = {} must be a percentage in (0, 100]",
                p.top
            )));
        }
        let adapter = ctx.input("adapter")?.to_path_buf();
        let factors = adapter_factors(&adapter)?;
        let own = KeyElements::select(&factors, p.top).map_err(|e| {
            StageError::Input(format!(
                "{}: {}",
                adapter.join(ADAPTER_FILE).display(),
                train_err(e)
            ))
        })?;
        if own.sets.is_empty() {
            return Err(StageError::Input(format!(
                "{}: no LoRA pair on a decoder linear (RegLoRA regularizes the language model's \
                 projections only)",
                adapter.join(ADAPTER_FILE).display()
            )));
        }
        let previous = if ctx.inputs.contains_key("previous") {
            let f = ctx.input("previous")?.join(KEY_ELEMENTS_FILE);
            KeyElements::load(&f).map_err(|e| StageError::Input(train_err(e).to_string()))?
        } else {
            KeyElements::default()
        };
        let (new, old) = (own.len(), previous.len());
        let all = own.accumulate(&previous);
        let out = ctx.output("key_elements").join(KEY_ELEMENTS_FILE);
        all.save(&out).map_err(train_err)?;
        let _ = writeln!(
            ctx.log,
            "{new} key elements over {} matrices, after {old} earlier ones: {} in all",
            all.sets.len(),
            all.len()
        );
        Ok(())
    }
}

#[cfg(test)]
#[path = "merge_kinds_tests.rs"]
mod tests;

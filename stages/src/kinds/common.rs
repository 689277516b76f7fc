//! Helpers every model-building kind shares: parameter specs, the training-loop parameters
//! with per-kind defaults, the one-CPU resource request, model presets and dataset splits.

use std::path::Path;

use engine::stage::{ParamSpec, ParamType, Resources, StageError};
use serde_json::{Value, json};

use crate::data::coin::DatasetInfo;
use crate::model::preset;

pub(crate) fn spec(
    name: &'static str,
    ty: ParamType,
    default: Option<Value>,
    doc: &'static str,
) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        default,
        doc,
    }
}

pub(crate) fn other(e: impl std::fmt::Display) -> StageError {
    StageError::Input(e.to_string())
}

/// The optimization parameters shared by both training kinds, with per-kind defaults.
pub(crate) fn loop_specs(steps: i64, batch: i64, every: i64) -> Vec<ParamSpec> {
    vec![
        spec(
            "steps",
            ParamType::Int,
            Some(json!(steps)),
            "optimizer steps (0: derive from `epochs`)",
        ),
        spec(
            "epochs",
            ParamType::Float,
            Some(json!(1.0)),
            "passes over the data when `steps` = 0",
        ),
        spec(
            "batch_size",
            ParamType::Int,
            Some(json!(batch)),
            "examples per micro-batch",
        ),
        spec(
            "grad_accum",
            ParamType::Int,
            Some(json!(1)),
            "micro-batches per optimizer step",
        ),
        spec(
            "warmup_ratio",
            ParamType::Float,
            Some(json!(0.03)),
            "linear warmup fraction before the cosine decay",
        ),
        spec(
            "weight_decay",
            ParamType::Float,
            Some(json!(0.0)),
            "AdamW weight decay",
        ),
        spec(
            "max_grad_norm",
            ParamType::Float,
            Some(json!(1.0)),
            "global gradient-norm clip (0: off)",
        ),
        spec(
            "checkpoint_every",
            ParamType::Int,
            Some(json!(every)),
            "checkpoint period in steps, for resume (0: never)",
        ),
    ]
}

pub(crate) fn cpu_resources() -> Resources {
    Resources {
        cpus: 1,
        memory_mb: 2048,
        ..Resources::default()
    }
}

pub(crate) fn model_preset(table: &serde_json::Map<String, Value>) -> Result<String, StageError> {
    for k in table.keys() {
        if k != "preset" {
            return Err(StageError::Input(format!(
                "parameter `model`: unknown key `{k}` (expected `preset`, one of {:?})",
                preset::PRESETS
            )));
        }
    }
    match table.get("preset") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(StageError::Input(format!(
            "parameter `model`: expected {{ preset = \"...\" }} with one of {:?}",
            preset::PRESETS
        ))),
    }
}

/// The annotation file of split `name`: `pretrain` or a task name.
pub(crate) fn split_file(dir: &Path, info: &DatasetInfo, name: &str) -> Result<String, StageError> {
    if name == "pretrain" {
        return info
            .pretrain
            .as_ref()
            .map(|p| p.file.clone())
            .ok_or_else(|| {
                StageError::Input(format!(
                    "{}: the dataset has no `pretrain` split",
                    dir.join("dataset.json").display()
                ))
            });
    }
    info.task(name).map(|t| t.train.clone()).ok_or_else(|| {
        let names: Vec<&str> = info.tasks.iter().map(|t| t.name.as_str()).collect();
        StageError::Input(format!(
            "{}: no split `{name}` (have `pretrain` and tasks {names:?})",
            dir.join("dataset.json").display()
        ))
    })
}

//! The model run on tensors stored in files: what `pipeline model forward` does.
//!
//! Input: one safetensors file with `input_ids` `[b, s]` (integers; images already expanded
//! to their tokens, batches left-padded: the fixture's conventions) and optionally
//! `attention_mask` `[b, s]`, `pixel_values` `[n, 3, H, W]` and `position_ids` `[b, s]`.
//! Other tensors in the file are ignored, so a fixture's `inputs.safetensors` works as is.
//! Output: a safetensors file with `logits` f32 `[b, s, vocab]`.
//!
//! Kept in the library (not the binary) so the binary needs no candle dependency and the
//! logic is testable without spawning a process.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::weights::save_safetensors;
use super::{Llava, ModelError, Result};

/// What to run.
#[derive(Debug, Clone)]
pub struct ForwardFiles {
    /// Model directory (config.json + safetensors).
    pub model: PathBuf,
    /// PEFT adapter directories, stacked in order.
    pub adapters: Vec<PathBuf>,
    /// Merge the adapters into the base weights before running.
    pub merge: bool,
    /// The inputs file.
    pub inputs: PathBuf,
    /// Where to write `logits`.
    pub out: PathBuf,
    /// Parameter dtype.
    pub dtype: DType,
}

/// What was run (for the command's summary line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSummary {
    /// Batch rows.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Images in the input.
    pub images: usize,
}

/// Parses a dtype name as the CLI and recipes spell it.
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// Loads the model (and adapters), runs one forward on the file's inputs, writes logits.
pub fn forward_files(job: &ForwardFiles) -> Result<ForwardSummary> {
    let device = Device::Cpu;
    let mut model = Llava::load(&job.model, job.dtype, &device)?;
    for (i, dir) in job.adapters.iter().enumerate() {
        let name = format!("adapter{i}");
        model.load_adapter(dir, &name, false)?;
        if job.merge {
            model.merge_adapter(&name)?;
        }
    }
    let inputs =
        candle_core::safetensors::load(&job.inputs, &device).map_err(|e| ModelError::Format {
            path: job.inputs.clone(),
            msg: format!("not a readable safetensors file: {e}"),
        })?;
    let bad = |name: &str, msg: String| ModelError::Format {
        path: job.inputs.clone(),
        msg: format!("tensor `{name}`: {msg}"),
    };
    let ids = inputs.get("input_ids").ok_or_else(|| ModelError::MissingTensor {
        path: job.inputs.clone(),
        name: "input_ids".into(),
        hint: Some("expected input_ids [batch, seq] and optionally attention_mask, pixel_values, position_ids".into()),
    })?;
    let (b, s) = ids.dims2().map_err(|_| {
        bad(
            "input_ids",
            format!("expected [batch, seq], got {:?}", ids.dims()),
        )
    })?;
    let check_2d = |name: &str| -> Result<Option<&Tensor>> {
        match inputs.get(name) {
            Some(t) if t.dims() != [b, s] => Err(bad(
                name,
                format!("expected [{b}, {s}] like input_ids, got {:?}", t.dims()),
            )),
            other => Ok(other),
        }
    };
    let mask = check_2d("attention_mask")?;
    let pos = check_2d("position_ids")?;
    let pixels = inputs.get("pixel_values");
    if let Some(p) = pixels
        && p.rank() != 4
    {
        return Err(bad(
            "pixel_values",
            format!(
                "expected [images, channels, height, width], got {:?}",
                p.dims()
            ),
        ));
    }
    let logits = model
        .forward(ids, pixels, mask, pos, None)
        .map_err(|e| match e {
            ModelError::Input(msg) => ModelError::Format {
                path: job.inputs.clone(),
                msg,
            },
            other => other,
        })?;
    let vocab = logits.dim(2)?;
    if let Some(dir) = job.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    save_safetensors(&[("logits".to_owned(), logits)], DType::F32, &job.out)?;
    Ok(ForwardSummary {
        batch: b,
        seq: s,
        vocab,
        images: pixels.map_or(0, |p| p.dim(0).unwrap_or(0)),
    })
}

/// `true` when `path` looks like a model directory (has a config.json).
pub fn is_model_dir(path: &Path) -> bool {
    path.join("config.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_errors_name_the_inputs_file_and_tensor() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny");
        let dir = tempfile::tempdir().unwrap();
        let inputs = dir.path().join("in.safetensors");
        let ids = Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1i64, 1]], &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &[("input_ids", ids.clone()), ("attention_mask", mask)]
                .into_iter()
                .collect(),
            &inputs,
        )
        .unwrap();
        let job = ForwardFiles {
            model: fixture.clone(),
            adapters: vec![],
            merge: false,
            inputs: inputs.clone(),
            out: dir.path().join("out/logits.safetensors"),
            dtype: DType::F32,
        };
        let e = forward_files(&job).unwrap_err().to_string();
        assert!(
            e.contains("in.safetensors") && e.contains("attention_mask") && e.contains("[1, 3]"),
            "{e}"
        );
        candle_core::safetensors::save(&[("input_ids", ids)].into_iter().collect(), &inputs)
            .unwrap();
        let sum = forward_files(&job).unwrap();
        assert_eq!(
            sum,
            ForwardSummary {
                batch: 1,
                seq: 3,
                vocab: 1024,
                images: 0
            }
        );
        let out = candle_core::safetensors::load(&job.out, &Device::Cpu).unwrap();
        assert_eq!(out["logits"].dims(), [1, 3, 1024]);
        assert!(parse_dtype("f16") == Some(DType::F16) && parse_dtype("int8").is_none());
        assert!(is_model_dir(&fixture));
    }
}

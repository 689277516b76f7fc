//! The model behind `asd.rewrite`'s `model` option: loads an HF LLaVA directory and answers
//! [`TextRequest`]s with the batched, KV-cached sampler ([`crate::model::generate`]).
//!
//! Determinism: requests are generated in fixed chunks of [`CHUNK`] prompts, each with a seed
//! derived from the stage seed and the chunk's index, and the sampler draws every sequence
//! from its own RNG, so the text depends on the seed and the requests only, never on
//! `batch_size`.

use std::path::Path;

use candle_core::{DType, Device};
use engine::stage::StageError;

use super::TextRequest;
use super::written::prompt;
use crate::kinds::sft::template;
use crate::model::Llava;
use crate::model::chat::{ChatTemplate, Turn};
use crate::model::generate::{GenPrompt, GenerateOptions, generate};
use crate::model::image::ImageProcessorConfig;
use crate::model::sampling::{SamplingParams, sequence_rng};
use crate::model::tokenizer::LlavaTokenizer;

/// Prompts per `generate` call: fixed, so that a chunk's seed does not depend on settings.
pub const CHUNK: usize = 32;

/// Sampling settings of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// Temperature, top-p (top-k off).
    pub sampling: SamplingParams,
    /// Longest reply in tokens.
    pub max_new_tokens: usize,
    /// Rows decoded together (speed only).
    pub batch_size: usize,
}

/// A loaded model that writes distractors and explanations.
pub struct Writer {
    model: Llava,
    tok: LlavaTokenizer,
    proc: ImageProcessorConfig,
    tpl: ChatTemplate,
    opts: WriterOptions,
}

fn input_err(e: impl std::fmt::Display) -> StageError {
    StageError::Input(e.to_string())
}

impl Writer {
    /// Loads the HF model directory `dir` (weights, `tokenizer.json`,
    /// `preprocessor_config.json`) on the CPU.
    ///
    /// # Errors
    /// Missing or malformed files, a tokenizer that does not fit the model, bad sampling
    /// settings; each names its file or parameter.
    pub fn load(dir: &Path, opts: WriterOptions) -> Result<Self, StageError> {
        opts.sampling
            .validate()
            .map_err(|e| StageError::Input(format!("parameter {e}")))?;
        let tok = LlavaTokenizer::load(dir).map_err(input_err)?;
        let proc =
            ImageProcessorConfig::load(&dir.join("preprocessor_config.json")).map_err(input_err)?;
        let model = Llava::load(dir, DType::F32, &Device::Cpu).map_err(input_err)?;
        let cfg = model.config().clone();
        tok.check_model_vocab(
            &dir.join("config.json"),
            cfg.text.vocab_size,
            cfg.image_token_index,
        )
        .map_err(input_err)?;
        Ok(Self {
            tpl: template(&model),
            model,
            tok,
            proc,
            opts,
        })
    }

    /// The model's raw reply to every request, in order. `image_path` maps a record's image
    /// to its file; `file` (the training file) and the record ids name the place of an error.
    /// `seed` is the stage seed mixed with the task; `between` runs after every chunk with the
    /// number of requests done and may stop the work (cancellation).
    ///
    /// # Errors
    /// An unreadable image, a prompt longer than the model allows, a generation failure, or
    /// whatever `between` returns.
    pub fn write(
        &self,
        requests: &[TextRequest],
        image_path: &dyn Fn(&str) -> std::path::PathBuf,
        file: &Path,
        seed: u64,
        between: &mut dyn FnMut(usize) -> Result<(), StageError>,
    ) -> Result<Vec<String>, StageError> {
        let max_pos = self.model.config().text.max_position_embeddings;
        let tok = &self.tok;
        let detok = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let mut out = Vec::with_capacity(requests.len());
        for (c, chunk) in requests.chunks(CHUNK).enumerate() {
            let mut prompts = Vec::with_capacity(chunk.len());
            for req in chunk {
                let at = || format!("{}: record {} (id {})", file.display(), req.record, req.id);
                let user = prompt(req.image.is_some(), &req.question, &req.answer, req.want);
                let input_ids = self
                    .tpl
                    .encode_prompt(&self.tok, &[Turn::ask(user)])
                    .map_err(|e| StageError::Input(format!("{}: {e}", at())))?;
                if input_ids.len() + self.opts.max_new_tokens > max_pos {
                    return Err(StageError::Input(format!(
                        "{}: the rewriting prompt of {} tokens (image expanded) + max_new_tokens {} exceeds the model's max_position_embeddings {max_pos}",
                        at(),
                        input_ids.len(),
                        self.opts.max_new_tokens
                    )));
                }
                let pixel_values = match &req.image {
                    Some(rel) => {
                        let t = self
                            .proc
                            .preprocess_file(&image_path(rel), &Device::Cpu)
                            .map_err(|e| {
                                StageError::Input(format!("{}: field `image`: {e}", at()))
                            })?;
                        Some(
                            t.unsqueeze(0)
                                .map_err(|e| StageError::Other(e.to_string()))?,
                        )
                    }
                    None => None,
                };
                prompts.push(GenPrompt {
                    input_ids,
                    pixel_values,
                });
            }
            let opts = GenerateOptions {
                max_new_tokens: self.opts.max_new_tokens,
                sampling: self.opts.sampling,
                num_samples: 1,
                seed: chunk_seed(seed, c),
                eos_token_ids: vec![self.tok.eos_id],
                stop_strings: Vec::new(),
                pad_token_id: self.tok.pad_id,
                batch_size: self.opts.batch_size,
            };
            let generated = generate(&self.model, &prompts, &opts, Some(&detok)).map_err(|e| {
                StageError::Other(format!("{}: rewriting generation: {e}", file.display()))
            })?;
            out.extend(generated.into_iter().map(|g| g.text.unwrap_or_default()));
            between(out.len())?;
        }
        Ok(out)
    }
}

/// The seed of chunk `c`: one draw from an RNG keyed by the seed and the chunk index.
fn chunk_seed(seed: u64, c: usize) -> u64 {
    use rand::Rng;
    sequence_rng(seed, c, 0).random()
}

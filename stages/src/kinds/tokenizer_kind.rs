//! `tokenizer.train`: the tiny preset's BPE, learned from every text of a CoIN dataset
//! artifact (training conversations, test questions and answers, pretraining captions) in file
//! order, so the vocabulary is a function of the data alone.

use std::path::Path;

use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, StageCtx, StageError, StageKind,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::common::{other, spec};
use crate::data::coin::{DatasetInfo, read_test, read_train};
use crate::model::chat::VICUNA_V1_SYSTEM;
use crate::model::tokenizer::{BpeTrainingConfig, LlavaTokenizer};

/// `tokenizer.train`.
#[derive(Debug, Clone, Copy)]
pub struct TokenizerTrain;

#[derive(Deserialize)]
struct TokParams {
    vocab_size: i64,
    min_frequency: i64,
}

/// Every text the model reads, in a fixed order: per task the training turns, then the test
/// questions and answers; then the pretraining captions (and their prompts). Each training
/// conversation also contributes the chat template's fixed text (the `vicuna_v1` system prompt
/// and the turn markers) once, as the model sees it once per example: without it BPE never
/// merges the system prompt, which then costs 92 character-level tokens in every sequence
/// (more than the answer and question together), about a third of each training step.
fn corpus(dir: &Path, info: &DatasetInfo) -> Result<Vec<String>, StageError> {
    let mut out = Vec::new();
    let template_text = || [VICUNA_V1_SYSTEM.to_string(), "USER: ASSISTANT:".to_string()];
    for t in &info.tasks {
        for r in read_train(&dir.join(&t.train))? {
            out.extend(template_text());
            out.extend(
                r.conversations
                    .into_iter()
                    .map(|c| c.value.replace("<image>", "")),
            );
        }
        for r in read_test(&dir.join(&t.test))? {
            out.push(r.text);
            out.extend(r.answer);
        }
    }
    if let Some(p) = &info.pretrain {
        for r in read_train(&dir.join(&p.file))? {
            out.extend(template_text());
            out.extend(
                r.conversations
                    .into_iter()
                    .map(|c| c.value.replace("<image>", "")),
            );
        }
    }
    Ok(out)
}

impl StageKind for TokenizerTrain {
    fn kind(&self) -> &'static str {
        "tokenizer.train"
    }
    fn version(&self) -> u32 {
        2
    }
    fn doc(&self) -> &'static str {
        "Train the tiny model's byte-fallback-free BPE tokenizer (Llama-style specials, `<image>` and \
         `<pad>` last) on every text of a CoIN dataset; output holds `tokenizer.json`."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            spec(
                "data",
                ParamType::Ref(ArtifactType::Dataset),
                None,
                "CoIN dataset artifact",
            ),
            spec(
                "vocab_size",
                ParamType::Int,
                Some(json!(1024)),
                "total vocabulary, specials included",
            ),
            spec(
                "min_frequency",
                ParamType::Int,
                Some(json!(2)),
                "minimum pair count for a merge",
            ),
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "tokenizer",
            ty: ArtifactType::Tokenizer,
            doc: "`tokenizer.json` (Hugging Face format)",
        }]
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: TokParams = ctx.params()?;
        let dir = ctx.input("data")?.to_path_buf();
        let info = DatasetInfo::load(&dir)?;
        let text = corpus(&dir, &info)?;
        let cfg = BpeTrainingConfig {
            vocab_size: usize::try_from(p.vocab_size).map_err(|_| {
                StageError::Input(format!(
                    "parameter `vocab_size` = {} is negative",
                    p.vocab_size
                ))
            })?,
            min_frequency: u64::try_from(p.min_frequency).map_err(|_| {
                StageError::Input(format!(
                    "parameter `min_frequency` = {} is negative",
                    p.min_frequency
                ))
            })?,
        };
        let tok = LlavaTokenizer::train_bpe(text.iter(), &cfg).map_err(other)?;
        let path = ctx.output("tokenizer").join("tokenizer.json");
        tok.save(&path).map_err(other)?;
        let _ = writeln!(
            ctx.log,
            "trained on {} texts: {} ids (<image> {}, <pad> {})",
            text.len(),
            tok.vocab_size(),
            tok.image_id,
            tok.pad_id
        );
        Ok(())
    }
}

//! `eval.coin`: answer a CoIN dataset's test questions with a model and score them with
//! CoIN's rule for each task.
//!
//! ## What it does
//!
//! For each selected task (`tasks`, or every task up to and including `upto`, or all), the
//! test records are split into shards of `shard_size`. Each shard is answered greedily in
//! batches ([`crate::model::generate`]: left padding, KV cache) from the LLaVA-1.5 prompt
//! (`vicuna_v1`; the record's `text` after an `<image>` line when it has an image, exactly as
//! CoIN's `model_vqa` builds it) and written to `checkpoint_dir/<task>/shard-NNNNN.jsonl`
//! (atomically, via a rename). A rerun after an interruption reads the finished shards back
//! and only generates the rest, so its output is the same bytes as an uninterrupted run's.
//!
//! ## Output (`metrics`, typed Metrics)
//!
//! - `predictions/<Task>.jsonl`: one line per test record, in test-file order, with CoIN's
//!   prediction fields `question_id`, `prompt` (the question text), `text` (the answer),
//!   `answer_id`, `model_id` (the stage name) and `metadata` (why generation stopped).
//! - `scores.json` ([`CoinScores`]): per task the rule, accuracy (%), summed score, record
//!   count and missing predictions, plus the task order; `eval.cl-metrics` reads it.
//!
//! Generation is greedy and per-row independent of the batch, so `batch_size` changes speed
//! only; `answer_id` is derived from the task and question id, so nothing depends on time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::coin::{
    DatasetInfo, RecordId, TestRecord, read_test, strip_image_token, write_json,
};
use crate::eval::coin_score::{Answer, Rule, TaskScore, rule_for, score_task};
use crate::kinds::sft::template;
use crate::model::Llava;
use crate::model::chat::{ChatTemplate, Turn};
use crate::model::generate::{GenPrompt, GenerateOptions, generate};
use crate::model::image::ImageProcessorConfig;
use crate::model::sampling::SamplingParams;
use crate::model::tokenizer::LlavaTokenizer;

/// Register `eval.coin`.
pub fn register(registry: &mut Registry) {
    registry.register(EvalCoin);
}

/// The scores file in the output.
pub const SCORES_FILE: &str = "scores.json";
/// The predictions folder in the output.
pub const PREDICTIONS_DIR: &str = "predictions";

/// One prediction line, with CoIN's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The test record's id.
    pub question_id: RecordId,
    /// The question text (the record's `text`).
    pub prompt: String,
    /// The model's answer.
    pub text: String,
    /// A stable id of this answer (`<task>/<question_id>`).
    pub answer_id: String,
    /// Who answered (the stage name).
    pub model_id: String,
    /// Generation details (`finish`: `eos` or `length`).
    pub metadata: Value,
}

/// `scores.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoinScores {
    /// The stage that produced it.
    pub model_id: String,
    /// Whether CoIN's scoring quirks were reproduced.
    pub faithful: bool,
    /// The evaluated tasks, in dataset order.
    pub order: Vec<String>,
    /// Per task.
    pub tasks: BTreeMap<String, TaskScore>,
}

impl CoinScores {
    /// Read `dir/scores.json`.
    ///
    /// # Errors
    /// Missing or malformed file, named.
    pub fn load(dir: &Path) -> Result<Self, StageError> {
        let path = dir.join(SCORES_FILE);
        let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            StageError::Input(format!(
                "{}: not an eval.coin scores file: {e}",
                path.display()
            ))
        })
    }
}

/// `eval.coin`.
#[derive(Debug, Clone, Copy)]
pub struct EvalCoin;

#[derive(Deserialize)]
struct Params {
    model: String,
    data: String,
    tasks: Vec<String>,
    upto: String,
    max_new_tokens: i64,
    batch_size: i64,
    shard_size: i64,
    faithful: bool,
}

fn spec(name: &'static str, ty: ParamType, default: Option<Value>, doc: &'static str) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        default,
        doc,
    }
}

fn at_least_one(name: &str, v: i64) -> Result<usize, StageError> {
    usize::try_from(v)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| StageError::Input(format!("parameter `{name}` = {v} must be at least 1")))
}

fn other(e: impl std::fmt::Display) -> StageError {
    StageError::Input(e.to_string())
}

/// The tasks to evaluate, in dataset order, each with its rule.
fn select_tasks(
    info: &DatasetInfo,
    data: &Path,
    p: &Params,
) -> Result<Vec<(String, Rule)>, StageError> {
    let names: Vec<&str> = info.tasks.iter().map(|t| t.name.as_str()).collect();
    let unknown = |param: &str, t: &str| {
        StageError::Input(format!(
            "parameter `{param}`: `{t}` is not a task of {} (have {names:?})",
            data.display()
        ))
    };
    let chosen: Vec<&str> = if !p.upto.is_empty() {
        if !p.tasks.is_empty() {
            return Err(StageError::Input(
                "parameters `tasks` and `upto` both set; use one".into(),
            ));
        }
        let end = names
            .iter()
            .position(|n| *n == p.upto)
            .ok_or_else(|| unknown("upto", &p.upto))?;
        names[..=end].to_vec()
    } else if p.tasks.is_empty() {
        names.clone()
    } else {
        if let Some(t) = p.tasks.iter().find(|t| !names.contains(&t.as_str())) {
            return Err(unknown("tasks", t));
        }
        names
            .iter()
            .copied()
            .filter(|n| p.tasks.iter().any(|t| t == n))
            .collect()
    };
    chosen
        .into_iter()
        .map(|t| {
            rule_for(t).map(|r| (t.to_string(), r)).ok_or_else(|| {
                StageError::Input(format!(
                    "{}: task `{t}` has no CoIN scoring rule (CoIN tasks: {:?})",
                    data.display(),
                    crate::data::coin::TASKS
                ))
            })
        })
        .collect()
}

/// Everything needed to answer questions.
struct Answerer {
    model: Llava,
    tok: LlavaTokenizer,
    proc: ImageProcessorConfig,
    tpl: ChatTemplate,
    opts: GenerateOptions,
    model_id: String,
}

impl Answerer {
    /// Answers `records` (the shard starting at test-file index `first`) of `task`.
    fn answer(
        &self,
        task: &str,
        file: &Path,
        info: &DatasetInfo,
        data: &Path,
        records: &[TestRecord],
        first: usize,
    ) -> Result<Vec<Prediction>, StageError> {
        let max_pos = self.model.config().text.max_position_embeddings;
        let mut prompts = Vec::with_capacity(records.len());
        for (k, rec) in records.iter().enumerate() {
            let at = || {
                format!(
                    "{}: record {} (question_id {})",
                    file.display(),
                    first + k,
                    rec.question_id
                )
            };
            let question = strip_image_token(&rec.text);
            let user = match rec.image {
                Some(_) => format!("<image>\n{question}"),
                None => question.to_string(),
            };
            let input_ids = self
                .tpl
                .encode_prompt(&self.tok, &[Turn::ask(user)])
                .map_err(|e| StageError::Input(format!("{}: {e}", at())))?;
            if input_ids.len() + self.opts.max_new_tokens > max_pos {
                return Err(StageError::Input(format!(
                    "{}: prompt of {} tokens (image expanded) + max_new_tokens {} exceeds the model's max_position_embeddings {max_pos}",
                    at(),
                    input_ids.len(),
                    self.opts.max_new_tokens
                )));
            }
            let pixel_values = match &rec.image {
                Some(rel) => {
                    let path = info.image_path(data, rel);
                    let t = self
                        .proc
                        .preprocess_file(&path, &Device::Cpu)
                        .map_err(|e| StageError::Input(format!("{}: field `image`: {e}", at())))?;
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
        let tok = &self.tok;
        let detok = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let out = generate(&self.model, &prompts, &self.opts, Some(&detok))
            .map_err(|e| StageError::Other(format!("generation for {task}: {e}")))?;
        Ok(records
            .iter()
            .zip(out)
            .map(|(rec, g)| Prediction {
                question_id: rec.question_id.clone(),
                prompt: rec.text.clone(),
                text: g.text.unwrap_or_default().trim().to_string(),
                answer_id: format!("{task}/{}", rec.question_id),
                model_id: self.model_id.clone(),
                metadata: json!({ "finish": g.finish }),
            })
            .collect())
    }
}

/// Reads a finished shard back; `None` when absent or not matching `records` (then it is
/// regenerated).
fn read_shard(path: &Path, records: &[TestRecord]) -> Option<Vec<Prediction>> {
    let text = std::fs::read_to_string(path).ok()?;
    let preds: Vec<Prediction> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .ok()?;
    let same = preds.len() == records.len()
        && preds
            .iter()
            .zip(records)
            .all(|(p, r)| p.question_id == r.question_id);
    same.then_some(preds)
}

fn jsonl(preds: &[Prediction]) -> String {
    preds
        .iter()
        .map(|p| serde_json::to_string(p).unwrap_or_default() + "\n")
        .collect()
}

/// Writes `text` to `path` through a temporary file and a rename, so a kill never leaves a
/// half-written shard that looks finished.
fn write_atomic(path: &Path, text: &str) -> Result<(), StageError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| StageError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StageError::io(path, e))
}

impl StageKind for EvalCoin {
    fn kind(&self) -> &'static str {
        "eval.coin"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Answer a CoIN dataset's test questions greedily (batched, KV cache) with an HF LLaVA model dir and score each task with CoIN's rule (ScienceQA letters, TextVQA soft accuracy, ImageNet substring, GQA, VizWiz/VQAv2/OCR-VQA exact, Grounding IoU > 0.5); `faithful` reproduces CoIN's scoring quirks. Writes predictions/<Task>.jsonl and scores.json; resumable by shards."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            spec(
                "model",
                ParamType::RefOrPath,
                None,
                "a model stage (`@task/...`) or a Hugging Face LLaVA directory (config.json, weights, tokenizer.json, preprocessor_config.json)",
            ),
            spec(
                "data",
                ParamType::Ref(ArtifactType::Dataset),
                None,
                "CoIN dataset artifact (data.synth-coin, data.coin, asd.rewrite)",
            ),
            spec(
                "tasks",
                ParamType::List(Box::new(ParamType::Str)),
                Some(json!([])),
                "tasks to evaluate (empty: all, or see `upto`)",
            ),
            spec(
                "upto",
                ParamType::Str,
                Some(json!("")),
                "evaluate every task up to and including this one (continual-learning rows)",
            ),
            spec(
                "max_new_tokens",
                ParamType::Int,
                Some(json!(64)),
                "longest answer in tokens",
            ),
            spec(
                "batch_size",
                ParamType::Int,
                Some(json!(8)),
                "questions decoded together (speed only)",
            ),
            spec(
                "shard_size",
                ParamType::Int,
                Some(json!(32)),
                "questions per resumable shard",
            ),
            spec(
                "faithful",
                ParamType::Bool,
                Some(json!(false)),
                "reproduce CoIN's scoring quirks (Grounding slicing, ImageNet pairing by position)",
            ),
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics",
            ty: ArtifactType::Metrics,
            doc: "scores.json (per-task accuracy %, counts) and predictions/<Task>.jsonl",
        }]
    }
    fn resources(&self, _: &Value) -> Resources {
        super::common::cpu_resources()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        crate::model::configure_cpu_runtime();
        let p: Params = ctx.params()?;
        let (model_dir, data) = (ctx.recipe_dir.join(&p.model), PathBuf::from(&p.data));
        let max_new_tokens = at_least_one("max_new_tokens", p.max_new_tokens)?;
        let batch_size = at_least_one("batch_size", p.batch_size)?;
        let shard_size = at_least_one("shard_size", p.shard_size)?;
        let info = DatasetInfo::load(&data)?;
        let tasks = select_tasks(&info, &data, &p)?;

        let tok = LlavaTokenizer::load(&model_dir).map_err(other)?;
        let proc = ImageProcessorConfig::load(&model_dir.join("preprocessor_config.json"))
            .map_err(other)?;
        let model = Llava::load(&model_dir, DType::F32, &Device::Cpu).map_err(other)?;
        let mcfg = model.config().clone();
        tok.check_model_vocab(
            &model_dir.join("config.json"),
            mcfg.text.vocab_size,
            mcfg.image_token_index,
        )
        .map_err(other)?;
        let opts = GenerateOptions {
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            num_samples: 1,
            seed: ctx.seed,
            eos_token_ids: vec![tok.eos_id],
            stop_strings: Vec::new(),
            pad_token_id: tok.pad_id,
            batch_size,
        };
        let answerer = Answerer {
            tpl: template(&model),
            model,
            tok,
            proc,
            opts,
            model_id: ctx.name.to_string(),
        };

        // Read every test file first: a broken one fails before any generation.
        let mut work = Vec::with_capacity(tasks.len());
        for (task, rule) in tasks {
            let entry = info
                .task(&task)
                .ok_or_else(|| StageError::Other(format!("BUG: task {task} vanished")))?;
            let file = data.join(&entry.test);
            let records = read_test(&file)?;
            work.push((task, rule, file, records));
        }
        let total: usize = work.iter().map(|w| w.3.len().div_ceil(shard_size)).sum();
        let mut done = 0usize;
        let pred_dir = ctx.output("metrics").join(PREDICTIONS_DIR);
        std::fs::create_dir_all(&pred_dir).map_err(|e| StageError::io(&pred_dir, e))?;
        let mut scores = CoinScores {
            model_id: ctx.name.to_string(),
            faithful: p.faithful,
            order: Vec::new(),
            tasks: BTreeMap::new(),
        };
        for (task, rule, file, records) in &work {
            let ck = ctx.checkpoint_dir.join(task);
            std::fs::create_dir_all(&ck).map_err(|e| StageError::io(&ck, e))?;
            let mut preds = Vec::with_capacity(records.len());
            let (mut reused, mut generated) = (0, 0);
            for (k, shard) in records.chunks(shard_size).enumerate() {
                let path = ck.join(format!("shard-{k:05}.jsonl"));
                if let Some(old) = read_shard(&path, shard) {
                    preds.extend(old);
                    reused += 1;
                } else {
                    if ctx.cancelled() {
                        return Err(StageError::Cancelled);
                    }
                    let new = answerer.answer(task, file, &info, &data, shard, k * shard_size)?;
                    write_atomic(&path, &jsonl(&new))?;
                    preds.extend(new);
                    generated += 1;
                }
                done += 1;
                ctx.progress
                    .progress(done as u64, total as u64, &format!("{task} shard {k}"));
            }
            let answers: Vec<Answer<'_>> = preds
                .iter()
                .map(|p| Answer {
                    question_id: &p.question_id,
                    text: &p.text,
                })
                .collect();
            let score = score_task(*rule, &answers, records, p.faithful)
                .map_err(|e| StageError::Input(format!("{}: {e}", file.display())))?;
            let out = pred_dir.join(format!("{task}.jsonl"));
            std::fs::write(&out, jsonl(&preds)).map_err(|e| StageError::io(&out, e))?;
            let _ = writeln!(
                ctx.log,
                "{task}: {:.2}% ({} of {}; shards generated {generated}, reused {reused})",
                score.accuracy, score.correct, score.total
            );
            scores.order.push(task.clone());
            scores.tasks.insert(task.clone(), score);
        }
        write_json(&ctx.output("metrics").join(SCORES_FILE), &scores)
    }
}

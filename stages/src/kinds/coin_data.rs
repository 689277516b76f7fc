//! CoIN data kinds: `data.synth-coin` (the synthetic CoIN look-alike), `data.coin` (real CoIN
//! or CoIN-ASD from disk) and `asd.rewrite` (Answer Style Diversification). All three emit
//! the CoIN dataset artifact of [`crate::data::coin`].
//!
//! `data.coin` copies the annotation files (byte for byte, after validating every record) but
//! *references* the images: `dataset.json` records the absolute image root rather than
//! copying CoIN's tens of gigabytes into the cache. The root is a `Path` parameter, so the
//! engine hashes its content into the key and a changed image reruns the stage; a moved root
//! needs a rerun (the key changes with the path anyway).
//!
//! `asd.rewrite` copies its input artifact (images included when they live inside it, so the
//! output stands alone) and adds `annotations/<Task>/train_x{X}.json` per task, pointing
//! `dataset.json` at it. `test.json` is copied unchanged (see [`crate::data::asd`]). With a
//! `model`, that model writes the distractors and explanations
//! ([`crate::data::asd::writer`]) and the output also holds `asd_model.json`: the sampling
//! settings and, per task, how much the model wrote and how often the rules stood in.

use std::path::{Path, PathBuf};

use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::data::asd::TaskPlan;
use crate::data::asd::writer::{Writer, WriterOptions};
use crate::data::asd::written::WrittenCounts;
use crate::data::coin::{
    self, AsdInfo, DatasetInfo, TASKS, TaskEntry, check_images, native_style, read_test,
    read_train, write_json,
};
use crate::data::synth_coin::{self, SCENES_FILE, SceneInfo, SynthConfig};
use crate::model::sampling::SamplingParams;

/// Register the CoIN data kinds.
pub fn register(registry: &mut Registry) {
    registry.register(SynthCoin);
    registry.register(Coin);
    registry.register(AsdRewrite);
}

fn dataset_output(doc: &'static str) -> Vec<OutputSpec> {
    vec![OutputSpec {
        name: "dataset",
        ty: ArtifactType::Dataset,
        doc,
    }]
}

fn log_line(ctx: &mut StageCtx<'_>, line: &str) -> Result<(), StageError> {
    writeln!(ctx.log, "{line}")
        .map_err(|e| StageError::Other(format!("cannot write the stage log: {e}")))
}

fn non_negative(name: &str, v: i64) -> Result<usize, StageError> {
    usize::try_from(v)
        .map_err(|_| StageError::Input(format!("parameter `{name}` = {v} must not be negative")))
}

/// `data.synth-coin`.
#[derive(Debug, Clone, Copy)]
pub struct SynthCoin;

#[derive(Deserialize)]
struct SynthParams {
    per_task: serde_json::Map<String, Value>,
    pretrain: i64,
    image_size: i64,
}

/// Parse `per_task = { train = N, test = M }`.
fn per_task(table: &serde_json::Map<String, Value>) -> Result<(usize, usize), StageError> {
    let mut train = 400;
    let mut test = 100;
    for (k, v) in table {
        let n = v.as_i64().ok_or_else(|| {
            StageError::Input(format!(
                "parameter `per_task.{k}`: expected an integer, got {v}"
            ))
        })?;
        let n = non_negative(&format!("per_task.{k}"), n)?;
        match k.as_str() {
            "train" => train = n,
            "test" => test = n,
            _ => {
                return Err(StageError::Input(format!(
                    "parameter `per_task`: unknown key `{k}` (expected `train` and/or `test`)"
                )));
            }
        }
    }
    Ok((train, test))
}

impl StageKind for SynthCoin {
    fn kind(&self) -> &'static str {
        "data.synth-coin"
    }
    fn version(&self) -> u32 {
        // 2: ScienceQA's shape questions show one large object, GQA and Grounding scenes have
        // one object per colour (GQA asks the colour at a relation), TextVQA's letters are
        // half as large again. 3: captions also write TextVQA's lower-case words, and a
        // grounded kind names objects by letter with their boxes. 4: the grounded kind gives
        // each cell and box after its object's name, count and relation captions name cells
        // too; one box per grid cell (no jitter); ScienceQA lists all options in a fixed
        // order; TextVQA's words start on the patch grid. 5: grounded captions give the box
        // right after the name (then the cell), word captions the lower-case word first,
        // half the drawing captions are book covers (colour and title); OCR-VQA's titles sit
        // on the patch grid.
        5
    }
    fn doc(&self) -> &'static str {
        "Generate a synthetic CoIN look-alike (8 tasks in CoIN order, each in its native answer style, \
         plus a captioning pretraining split) in CoIN's layout; deterministic for the seed."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "per_task",
                ty: ParamType::Table,
                default: Some(json!({"train": 400, "test": 100})),
                doc: "records per task: { train = N, test = M }",
            },
            ParamSpec {
                name: "pretrain",
                ty: ParamType::Int,
                default: Some(json!(2000)),
                doc: "captioning records in the pretraining split",
            },
            ParamSpec {
                name: "image_size",
                ty: ParamType::Int,
                default: Some(json!(64)),
                doc: "side of the square images in pixels (32..=1024)",
            },
        ]
    }
    fn outputs(&self, _params: &Value) -> Vec<OutputSpec> {
        dataset_output("CoIN layout: dataset.json, annotations/<Task>/{train,test}.json, images")
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: SynthParams = ctx.params()?;
        let (train, test) = per_task(&p.per_task)?;
        let image_size = u32::try_from(p.image_size).map_err(|_| {
            StageError::Input(format!(
                "parameter `image_size` = {} is outside 32..=1024",
                p.image_size
            ))
        })?;
        let cfg = SynthConfig {
            train,
            test,
            pretrain: non_negative("pretrain", p.pretrain)?,
            image_size,
        };
        cfg.validate()
            .map_err(|e| StageError::Input(format!("parameter {e}")))?;
        let out = ctx.output("dataset");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.resources.cpus.max(1) as usize)
            .build()
            .map_err(|e| StageError::Other(format!("cannot start the thread pool: {e}")))?;
        let start = std::time::Instant::now();
        let (progress, cancel, seed) = (ctx.progress, &*ctx.cancel, ctx.seed);
        let info = pool.install(|| synth_coin::generate(&out, &cfg, seed, progress, cancel))?;
        log_line(
            ctx,
            &format!(
                "generated CoIN-mini in {:.2}s (seed {seed}, {}px images)",
                start.elapsed().as_secs_f64(),
                cfg.image_size
            ),
        )?;
        for t in &info.tasks {
            log_line(
                ctx,
                &format!(
                    "  {:<10} train {:>6}  test {:>6}",
                    t.name, t.train_count, t.test_count
                ),
            )?;
        }
        log_line(ctx, &format!("  pretrain   {:>6}", cfg.pretrain))
    }
}

/// `data.coin`.
#[derive(Debug, Clone, Copy)]
pub struct Coin;

#[derive(Deserialize)]
struct CoinParams {
    root: String,
    train_file: String,
    tasks: Vec<String>,
    check_images: bool,
}

impl StageKind for Coin {
    fn kind(&self) -> &'static str {
        "data.coin"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Read and validate real CoIN / CoIN-ASD (root/annotations/<Task>/{train_file,test.json}, images \
         under root) and emit the CoIN dataset artifact; annotations are copied, images referenced by \
         absolute root."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "root",
                ty: ParamType::Path,
                default: None,
                doc: "the CoIN directory (holds annotations/ and the image folders)",
            },
            ParamSpec {
                name: "train_file",
                ty: ParamType::Str,
                default: Some(json!("train.json")),
                doc: "training file name per task, e.g. train_x20.json for CoIN-ASD",
            },
            ParamSpec {
                name: "tasks",
                ty: ParamType::List(Box::new(ParamType::Str)),
                default: Some(json!(TASKS)),
                doc: "tasks to read, in training order",
            },
            ParamSpec {
                name: "check_images",
                ty: ParamType::Bool,
                default: Some(json!(true)),
                doc: "fail when a record's image is missing",
            },
        ]
    }
    fn outputs(&self, _params: &Value) -> Vec<OutputSpec> {
        dataset_output(
            "CoIN layout: dataset.json and annotations/<Task>/; images stay under the root",
        )
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: CoinParams = ctx.params()?;
        let root = ctx.recipe_dir.join(&p.root);
        let root = root.canonicalize().map_err(|e| StageError::io(&root, e))?;
        if p.train_file.contains('/') || p.train_file.contains('\\') || p.train_file.is_empty() {
            return Err(StageError::Input(format!(
                "parameter `train_file` = `{}` must be a plain file name",
                p.train_file
            )));
        }
        if p.tasks.is_empty() {
            return Err(StageError::Input("parameter `tasks` is empty".into()));
        }
        let out = ctx.output("dataset");
        let asd = asd_x(&p.train_file).map(|x| AsdInfo { x });
        let mut entries = Vec::new();
        for (i, task) in p.tasks.iter().enumerate() {
            if ctx.cancelled() {
                return Err(StageError::Cancelled);
            }
            ctx.progress.progress(i as u64, p.tasks.len() as u64, task);
            let dir = root.join("annotations").join(task);
            if !dir.is_dir() {
                return Err(StageError::Input(format!(
                    "{}: missing task directory (expected CoIN's layout annotations/<Task>/{{{},test.json}})",
                    dir.display(),
                    p.train_file
                )));
            }
            let (train_path, test_path) = (dir.join(&p.train_file), dir.join("test.json"));
            let train = read_train(&train_path)?;
            let test = read_test(&test_path)?;
            if p.check_images {
                check_images(&train_path, &root, train.iter().map(|r| r.image.as_deref()))?;
                check_images(&test_path, &root, test.iter().map(|r| r.image.as_deref()))?;
            }
            let out_dir = out.join("annotations").join(task);
            std::fs::create_dir_all(&out_dir).map_err(|e| StageError::io(&out_dir, e))?;
            for (src, name) in [
                (&train_path, p.train_file.as_str()),
                (&test_path, "test.json"),
            ] {
                let dst = out_dir.join(name);
                std::fs::copy(src, &dst).map_err(|e| StageError::io(&dst, e))?;
            }
            log_line(
                ctx,
                &format!(
                    "{task:<10} train {:>7}  test {:>7}",
                    train.len(),
                    test.len()
                ),
            )?;
            entries.push(TaskEntry {
                name: task.clone(),
                train: format!("annotations/{task}/{}", p.train_file),
                test: format!("annotations/{task}/test.json"),
                train_count: train.len(),
                test_count: test.len(),
                native_style: native_style(task),
            });
        }
        let info = DatasetInfo {
            format: "coin".into(),
            source: "coin".into(),
            image_root: root.to_string_lossy().into_owned(),
            image_size: None,
            tasks: entries,
            pretrain: None,
            asd,
        };
        info.save(&out)
    }
}

/// `train_x20.json` → 20.
fn asd_x(name: &str) -> Option<u32> {
    name.strip_prefix("train_x")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// `asd.rewrite`.
#[derive(Debug, Clone, Copy)]
pub struct AsdRewrite;

#[derive(Deserialize)]
struct AsdParams {
    x: i64,
    model: String,
    temperature: f64,
    top_p: f64,
    max_new_tokens: i64,
    batch_size: i64,
}

/// The summary of a model-written rewrite, next to `dataset.json`.
pub const ASD_MODEL_FILE: &str = "asd_model.json";

/// `asd_model.json`: the sampling settings and what the model wrote, per task and in total.
#[derive(Debug, Clone, serde::Serialize)]
struct ModelSummary {
    temperature: f64,
    top_p: f64,
    max_new_tokens: usize,
    tasks: std::collections::BTreeMap<String, WrittenCounts>,
    total: WrittenCounts,
}

/// The writer for the `model` parameter (`None` when it is unset: rules only).
fn asd_writer(ctx: &StageCtx<'_>, p: &AsdParams) -> Result<Option<Writer>, StageError> {
    if p.model.is_empty() {
        return Ok(None);
    }
    let count = |name: &str, v: i64| {
        usize::try_from(v).ok().filter(|&n| n > 0).ok_or_else(|| {
            StageError::Input(format!("parameter `{name}` = {v} must be at least 1"))
        })
    };
    let opts = WriterOptions {
        sampling: SamplingParams {
            temperature: p.temperature as f32,
            top_k: 0,
            top_p: p.top_p as f32,
        },
        max_new_tokens: count("max_new_tokens", p.max_new_tokens)?,
        batch_size: count("batch_size", p.batch_size)?,
    };
    crate::model::configure_cpu_runtime();
    Writer::load(ctx.input("model")?, opts).map(Some)
}

impl StageKind for AsdRewrite {
    fn kind(&self) -> &'static str {
        "asd.rewrite"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Answer Style Diversification (SEFE): convert x% of each task's training records, split evenly \
         over the four non-native answer styles, with response-format prompts; writes \
         annotations/<Task>/train_x{x}.json and points dataset.json at it. Test sets are unchanged."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "data",
                ty: ParamType::Ref(ArtifactType::Dataset),
                default: None,
                doc: "a CoIN dataset (data.synth-coin or data.coin)",
            },
            ParamSpec {
                name: "x",
                ty: ParamType::Int,
                default: Some(json!(20)),
                doc: "percentage of training records converted (0..=100; 0 = identity)",
            },
            ParamSpec {
                name: "model",
                ty: ParamType::Ref(ArtifactType::Model),
                default: Some(json!("")),
                doc: "HF LLaVA model dir that writes distractors and explanations (unset: rules)",
            },
            ParamSpec {
                name: "temperature",
                ty: ParamType::Float,
                default: Some(json!(0.7)),
                doc: "sampling temperature of the model's text (0 = greedy)",
            },
            ParamSpec {
                name: "top_p",
                ty: ParamType::Float,
                default: Some(json!(0.9)),
                doc: "nucleus sampling of the model's text (1 = off)",
            },
            ParamSpec {
                name: "max_new_tokens",
                ty: ParamType::Int,
                default: Some(json!(96)),
                doc: "longest text the model writes per record, in tokens",
            },
            ParamSpec {
                name: "batch_size",
                ty: ParamType::Int,
                default: Some(json!(8)),
                doc: "records the model writes for together (speed only)",
            },
        ]
    }
    fn outputs(&self, _params: &Value) -> Vec<OutputSpec> {
        dataset_output("the input dataset with train_x{x}.json as each task's training file")
    }
    fn resources(&self, params: &Value) -> Resources {
        let with_model = params
            .get("model")
            .and_then(Value::as_str)
            .is_some_and(|m| !m.is_empty());
        Resources {
            memory_mb: if with_model { 2048 } else { 512 },
            ..Resources::default()
        }
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: AsdParams = ctx.params()?;
        let x = u32::try_from(p.x)
            .ok()
            .filter(|x| *x <= 100)
            .ok_or_else(|| {
                StageError::Input(format!(
                    "parameter `x` = {} must be a percentage in 0..=100",
                    p.x
                ))
            })?;
        let input = ctx.input("data")?.to_path_buf();
        let mut info = DatasetInfo::load(&input)?;
        if let Some(prev) = &info.asd {
            return Err(StageError::Input(format!(
                "{}: this dataset is already ASD-rewritten (x = {}); rewrite the original instead",
                input.join(coin::DATASET_FILE).display(),
                prev.x
            )));
        }
        let writer = asd_writer(ctx, &p)?;
        let out = ctx.output("dataset");
        copy_tree(&input, &out)?;
        let name = format!("train_x{x}.json");
        let image_root = info.image_root(&input);
        let mut written = std::collections::BTreeMap::new();
        let n_tasks = info.tasks.len() as u64;
        for (i, entry) in info.tasks.iter_mut().enumerate() {
            if ctx.cancelled() {
                return Err(StageError::Cancelled);
            }
            ctx.progress.progress(i as u64, n_tasks, &entry.name);
            let train_path = input.join(&entry.train);
            let records = read_train(&train_path)?;
            let scenes_path = train_path.with_file_name(SCENES_FILE);
            let scenes = read_scenes(&scenes_path)?;
            let plan = TaskPlan::new(&entry.name, &records, scenes.as_ref(), x, ctx.seed);
            let replies = match &writer {
                None => None,
                Some(w) => Some(write_task(ctx, w, &plan, &train_path, &image_root)?),
            };
            let (rewritten, summary) = plan.finish(replies.as_ref());
            let rel = Path::new(&entry.train).with_file_name(&name);
            write_json(&out.join(&rel), &rewritten)?;
            entry.train = rel.to_string_lossy().into_owned();
            let styles: Vec<String> = summary
                .converted
                .iter()
                .map(|(s, c)| format!("{} {c}", s.name()))
                .collect();
            let line = format!(
                "{:<10} native {:>6}  {}",
                entry.name,
                summary.native,
                styles.join("  ")
            );
            log_line(ctx, &line)?;
            if let Some(w) = summary.written {
                log_line(ctx, &format!("{:<10} model: {}", "", counts_line(&w)))?;
                written.insert(entry.name.clone(), w);
            }
        }
        if writer.is_some() {
            let mut total = WrittenCounts::default();
            for w in written.values() {
                total.add(w);
            }
            log_line(ctx, &format!("model total: {}", counts_line(&total)))?;
            let summary = ModelSummary {
                temperature: p.temperature,
                top_p: p.top_p,
                max_new_tokens: usize::try_from(p.max_new_tokens).unwrap_or_default(),
                tasks: written,
                total,
            };
            write_json(&out.join(ASD_MODEL_FILE), &summary)?;
        }
        info.asd = Some(AsdInfo { x });
        info.save(&out)
    }
}

/// `requests 12, distractors 20 (fallback 3), explanations 5 (fallback 1)`.
fn counts_line(w: &WrittenCounts) -> String {
    format!(
        "requests {}, distractors {} (fallback {}), explanations {} (fallback {})",
        w.requests,
        w.distractors_model,
        w.distractors_fallback,
        w.explanations_model,
        w.explanations_fallback
    )
}

/// The model's replies to one task's requests, by record index.
fn write_task(
    ctx: &StageCtx<'_>,
    writer: &Writer,
    plan: &TaskPlan<'_>,
    train_path: &Path,
    image_root: &Path,
) -> Result<std::collections::BTreeMap<usize, String>, StageError> {
    let requests = plan.requests();
    let (progress, cancel) = (ctx.progress, ctx.cancel.clone());
    let task = plan.task().to_string();
    let total = requests.len() as u64;
    let mut between = |done: usize| {
        progress.progress(done as u64, total, &format!("{task}: model writing"));
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    };
    let replies = writer.write(
        &requests,
        &|rel| image_root.join(rel),
        train_path,
        plan.text_seed(),
        &mut between,
    )?;
    Ok(requests.iter().map(|r| r.record).zip(replies).collect())
}

fn read_scenes(
    path: &Path,
) -> Result<Option<std::collections::BTreeMap<String, SceneInfo>>, StageError> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StageError::Input(format!("{}: malformed scene file: {e}", path.display())))
}

/// Copy the directory tree `src` into `dst` (which exists), skipping `dataset.json` at the top.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), StageError> {
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|e| StageError::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StageError::io(&dir, e))?;
            let rel_child = rel.join(entry.file_name());
            if rel_child == Path::new(coin::DATASET_FILE) {
                continue;
            }
            let ty = entry
                .file_type()
                .map_err(|e| StageError::io(entry.path(), e))?;
            let target = dst.join(&rel_child);
            if ty.is_dir() {
                std::fs::create_dir_all(&target).map_err(|e| StageError::io(&target, e))?;
                stack.push(rel_child);
            } else {
                std::fs::copy(entry.path(), &target).map_err(|e| StageError::io(&target, e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_task_table_is_checked() {
        let t = |v: Value| per_task(v.as_object().unwrap());
        assert_eq!(t(json!({"train": 5})).unwrap(), (5, 100));
        assert!(
            t(json!({"trian": 5}))
                .unwrap_err()
                .to_string()
                .contains("unknown key `trian`")
        );
        assert!(
            t(json!({"test": -1}))
                .unwrap_err()
                .to_string()
                .contains("per_task.test")
        );
        assert!(
            t(json!({"test": "x"}))
                .unwrap_err()
                .to_string()
                .contains("expected an integer")
        );
    }

    #[test]
    fn asd_file_names() {
        assert_eq!(asd_x("train_x20.json"), Some(20));
        assert_eq!(asd_x("train.json"), None);
        assert_eq!(asd_x("train_ori.json"), None);
    }
}

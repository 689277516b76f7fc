//! A deterministic generator of a small CoIN look-alike ("CoIN-mini") in CoIN's real layout.
//!
//! Eight tasks in CoIN order, each with its native answer style ([`tasks`] has the table),
//! plus a captioning pretraining split. The output directory is the same dataset artifact
//! that `data.coin` makes from real CoIN ([`crate::data::coin`]):
//!
//! ```text
//! dataset.json                      format "coin", tasks, counts, image size
//! annotations/<Task>/train.json     LLaVA conversation records
//! annotations/<Task>/test.json      flat question records (Grounding: answer_bbox, size)
//! annotations/<Task>/train_scenes.json  per training id: question type and scene facts (for ASD)
//! annotations/pretrain.json         captioning records (LLaVA conversation format)
//! ScienceQA/images/{train,test}/…   TextVQA/train_images/…   ImageNet/{split}/<class>/…
//! GQA/images/…   VizWiz/{split}/…   COCO/{train2014,val2014}/…   OCRVQA/images/…   pretrain/images/…
//! ```
//!
//! ## Determinism
//!
//! Every sample has its own generator, seeded from (seed, task, split, index) through
//! SplitMix64, so the samples do not depend on which rayon thread renders them or in which
//! order; the JSON files are assembled in index order after the parallel pass. Same seed and
//! sizes, same bytes (PNG encoding with fixed settings is deterministic). `rand`'s `StdRng` is
//! pinned by `Cargo.lock`; its stream is only promised stable within a `rand` version, so a
//! `rand` upgrade may change the generated data (bump the kind's version then).

pub mod draw;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use engine::stage::{Progress, StageError};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::coin::{
    DatasetInfo, IMAGE_TOKEN, RecordId, SplitEntry, TASKS, TaskEntry, TestRecord, TrainRecord,
    Turn, native_style, write_json,
};
use tasks::Sample;

/// Generator sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    /// Training records per task.
    pub train: usize,
    /// Test records per task.
    pub test: usize,
    /// Captioning records in the pretraining split.
    pub pretrain: usize,
    /// Side of the square images in pixels.
    pub image_size: u32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            train: 400,
            test: 100,
            pretrain: 2000,
            image_size: 64,
        }
    }
}

/// Upper bound on any count (keeps a typo from filling the disk).
pub const MAX_COUNT: usize = 1_000_000;

impl SynthConfig {
    /// Check the sizes.
    ///
    /// # Errors
    /// An image size outside 32..=1024 or a count above [`MAX_COUNT`].
    pub fn validate(&self) -> Result<(), String> {
        if !(32..=1024).contains(&self.image_size) {
            return Err(format!(
                "image_size = {} is outside 32..=1024",
                self.image_size
            ));
        }
        for (name, n) in [
            ("per_task.train", self.train),
            ("per_task.test", self.test),
            ("pretrain", self.pretrain),
        ] {
            if n > MAX_COUNT {
                return Err(format!("{name} = {n} is above the limit {MAX_COUNT}"));
            }
        }
        Ok(())
    }
}

/// Scene ground truth of one training record, written to `train_scenes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SceneInfo {
    /// Question type (answers of the same type are each other's distractors).
    pub qtype: String,
    /// Sentences stating what the image shows.
    pub facts: Vec<String>,
}

/// The sidecar file of a task's training scenes.
pub const SCENES_FILE: &str = "train_scenes.json";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Test,
    Pretrain,
}

/// SplitMix64 finalizer: a well-mixed 64-bit value from the sample's coordinates.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn sample_rng(seed: u64, task: usize, split: Split, index: usize) -> StdRng {
    let s = mix(seed ^ mix((task as u64) << 8 | split as u64) ^ mix(index as u64).rotate_left(17));
    StdRng::seed_from_u64(s)
}

/// Relative image path of a sample, in the folder CoIN keeps that task's images in.
fn image_rel(task: &str, split: Split, i: usize, s: &Sample) -> String {
    let sp = if split == Split::Test {
        "test"
    } else {
        "train"
    };
    match task {
        "ScienceQA" => format!("ScienceQA/images/{sp}/{i:05}.png"),
        "TextVQA" => format!("TextVQA/train_images/{sp}_{i:05}.png"),
        "ImageNet" => format!("ImageNet/{sp}/{}/{i:05}.png", s.answer.replace(' ', "_")),
        "GQA" => format!("GQA/images/{sp}_{i:05}.png"),
        "VizWiz" => format!("VizWiz/{sp}/VizWiz_{sp}_{i:08}.png"),
        "Grounding" => format!("COCO/train2014/grounding_{sp}_{i:05}.png"),
        "VQAv2" => format!(
            "COCO/{}/vqav2_{sp}_{i:05}.png",
            if split == Split::Test {
                "val2014"
            } else {
                "train2014"
            }
        ),
        "OCRVQA" => format!("OCRVQA/images/{sp}_{i:05}.png"),
        _ => format!("pretrain/images/{i:05}.png"),
    }
}

/// A generated sample, rendered to disk, without its pixels.
struct Done {
    image: String,
    question: String,
    answer: String,
    qtype: &'static str,
    facts: Vec<String>,
    bbox: Option<String>,
}

/// Generate the whole dataset into `out`, using the current rayon pool.
///
/// # Errors
/// Invalid sizes, I/O errors, or [`StageError::Cancelled`] when `cancel` is set.
pub fn generate(
    out: &Path,
    cfg: &SynthConfig,
    seed: u64,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<DatasetInfo, StageError> {
    cfg.validate().map_err(StageError::Input)?;
    let mut jobs: Vec<(usize, Split, usize)> = Vec::new();
    for t in 0..TASKS.len() {
        jobs.extend((0..cfg.train).map(|i| (t, Split::Train, i)));
        jobs.extend((0..cfg.test).map(|i| (t, Split::Test, i)));
    }
    jobs.extend((0..cfg.pretrain).map(|i| (TASKS.len(), Split::Pretrain, i)));
    let total = jobs.len() as u64;
    let done_count = AtomicU64::new(0);
    let results: Vec<Done> = jobs
        .par_iter()
        .map(|&(t, split, i)| {
            if cancel.load(Ordering::Relaxed) {
                return Err(StageError::Cancelled);
            }
            let task = TASKS.get(t).copied().unwrap_or("pretrain");
            let mut rng = sample_rng(seed, t, split, i);
            let s = tasks::generator(task)(&mut rng, cfg.image_size);
            let rel = image_rel(task, split, i, &s);
            let path = out.join(&rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
            }
            s.image
                .save_with_format(&path, image::ImageFormat::Png)
                .map_err(|e| {
                    StageError::Other(format!("{}: cannot write image: {e}", path.display()))
                })?;
            let n = done_count.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(256) || n == total {
                progress.progress(n, total, "rendering");
            }
            Ok(Done {
                image: rel,
                question: s.question,
                answer: s.answer,
                qtype: s.qtype,
                facts: s.facts,
                bbox: s.bbox,
            })
        })
        .collect::<Result<_, _>>()?;

    let mut results = results.into_iter();
    let mut entries = Vec::with_capacity(TASKS.len());
    for (t, task) in TASKS.iter().enumerate() {
        let dir = out.join("annotations").join(task);
        let train: Vec<Done> = results.by_ref().take(cfg.train).collect();
        let test: Vec<Done> = results.by_ref().take(cfg.test).collect();
        let mut scenes = BTreeMap::new();
        let train_records: Vec<TrainRecord> = train
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let id = format!("{}_{i:05}", task.to_lowercase());
                scenes.insert(
                    id.clone(),
                    SceneInfo {
                        qtype: d.qtype.to_string(),
                        facts: d.facts,
                    },
                );
                conversation(RecordId::Str(id), d.image, &d.question, d.answer)
            })
            .collect();
        let size = [cfg.image_size, cfg.image_size];
        let test_records: Vec<TestRecord> = test
            .into_iter()
            .enumerate()
            .map(|(i, d)| TestRecord {
                question_id: RecordId::Int((t as i64 + 1) * 1_000_000 + i as i64),
                image: Some(d.image),
                text: d.question,
                answer: Some(d.answer),
                size: d.bbox.as_ref().map(|_| size),
                answer_bbox: d.bbox,
                extra: serde_json::Map::new(),
            })
            .collect();
        write_json(&dir.join("train.json"), &train_records)?;
        write_json(&dir.join("test.json"), &test_records)?;
        write_json(&dir.join(SCENES_FILE), &scenes)?;
        entries.push(TaskEntry {
            name: (*task).to_string(),
            train: format!("annotations/{task}/train.json"),
            test: format!("annotations/{task}/test.json"),
            train_count: cfg.train,
            test_count: cfg.test,
            native_style: native_style(task),
        });
    }
    let pretrain: Vec<TrainRecord> = results
        .enumerate()
        .map(|(i, d)| {
            conversation(
                RecordId::Str(format!("pretrain_{i:06}")),
                d.image,
                &d.question,
                d.answer,
            )
        })
        .collect();
    write_json(&out.join("annotations/pretrain.json"), &pretrain)?;
    let info = DatasetInfo {
        format: "coin".into(),
        source: "synth-coin".into(),
        image_root: ".".into(),
        image_size: Some(cfg.image_size),
        tasks: entries,
        pretrain: Some(SplitEntry {
            file: "annotations/pretrain.json".into(),
            count: cfg.pretrain,
        }),
        asd: None,
    };
    info.save(out)?;
    Ok(info)
}

fn conversation(id: RecordId, image: String, question: &str, answer: String) -> TrainRecord {
    TrainRecord {
        id,
        image: Some(image),
        conversations: vec![
            Turn::human(format!("{IMAGE_TOKEN}\n{question}")),
            Turn::gpt(answer),
        ],
        extra: serde_json::Map::new(),
    }
}

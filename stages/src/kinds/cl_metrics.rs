//! `eval.cl-metrics`: the continual-learning accuracy matrix and its summary metrics from a
//! sequence of `eval.coin` outputs.
//!
//! `evals` lists the evaluations in training order (usually a gather, `"@eval/*"`, over a
//! `foreach` on the task sequence): evaluation `i` was taken after training task `i`. Row `i`
//! of the matrix is read from its `scores.json`: `a[i][j]` = accuracy on task `j` for every
//! `j <= i` (scores for later tasks, if present, are not part of the matrix). The metrics
//! themselves are [`crate::eval::cl_metrics`].
//!
//! ## Training order (row and column labels)
//!
//! The `tasks` parameter, when given, is the training order. Otherwise it is read from the
//! evaluations ([`training_order`]), because `scores.json` lists its tasks in *dataset* order,
//! which is not the training order when a recipe trains a subset or reorders the tasks:
//!
//! 1. each evaluation adds exactly one task over the earlier ones (`eval.coin` with
//!    `tasks = [...]` growing by one per step, in any order): that task;
//! 2. otherwise, each evaluation's last task, when these are all different (`eval.coin` with
//!    `upto`: the task trained last is the last one scored, also for a subset of the tasks);
//! 3. otherwise (e.g. every evaluation scores every task) nothing in the scores says which
//!    task was trained when, and the dataset order is assumed: the first `len(evals)` tasks of
//!    the last evaluation. The log says so; set `tasks` when that is wrong.
//!
//! ## Labels and losses (for the `report` kind)
//!
//! `label` names the method in reports (default: this stage's name); runs of one method over
//! several seeds share a label and are averaged there. `models` optionally lists the trained
//! models in task order: the per-step losses of each one's `train_log.json` are copied into
//! `losses.json`, so a report needs only this output.
//!
//! Output `metrics` (typed Metrics): `metrics.json` ([`ClMetrics`]), `metrics.md`, and with
//! `models`, `losses.json` (a list of [`LossCurve`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, StageCtx, StageError, StageKind,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::coin::write_json;
use crate::eval::cl_metrics::{ClSummary, markdown, summarize};
use crate::kinds::coin_eval::{CoinScores, SCORES_FILE};

/// Register `eval.cl-metrics`.
pub fn register(registry: &mut Registry) {
    registry.register(ClMetricsKind);
}

/// The metrics file in the output.
pub const METRICS_FILE: &str = "metrics.json";
/// The training-loss file in the output (present when `models` was given).
pub const LOSSES_FILE: &str = "losses.json";
/// The per-step training log inside a trained model directory.
pub const TRAIN_LOG_FILE: &str = "train_log.json";

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClMetrics {
    /// The method's name in reports: the `label` parameter, or the stage name. Empty in
    /// outputs written before labels existed.
    #[serde(default)]
    pub label: String,
    /// Training order (columns; row `i` is "after training task `i`").
    pub tasks: Vec<String>,
    /// The lower-triangular accuracy matrix in percent; row `i` has `i + 1` entries.
    pub matrix: Vec<Vec<f64>>,
    /// MFT, MFN, MAA and BWT, named in full.
    #[serde(flatten)]
    pub summary: ClSummary,
}

/// One task's training-loss curve (an entry of `losses.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossCurve {
    /// The task trained.
    pub task: String,
    /// Optimizer steps (1-based), ascending.
    pub steps: Vec<u64>,
    /// The task loss at each step.
    pub loss: Vec<f64>,
}

/// `eval.cl-metrics`.
#[derive(Debug, Clone, Copy)]
pub struct ClMetricsKind;

#[derive(Deserialize)]
struct Params {
    tasks: Vec<String>,
    label: String,
}

/// Where [`training_order`] found the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderSource {
    /// Each evaluation adds one task over the earlier ones.
    AddedTasks,
    /// Each evaluation's last (`upto`) task.
    LastTasks,
    /// Nothing told: the dataset order of the last evaluation.
    DatasetOrder,
}

/// The training order read from evaluations in training order (see the module docs).
#[must_use]
pub fn training_order(orders: &[&[String]]) -> (Vec<String>, OrderSource) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut added = Vec::with_capacity(orders.len());
    for order in orders {
        let new: Vec<&String> = order
            .iter()
            .filter(|t| !seen.contains(t.as_str()))
            .collect();
        if let [one] = new.as_slice() {
            added.push((*one).clone());
        }
        seen.extend(order.iter().map(String::as_str));
    }
    if added.len() == orders.len() {
        return (added, OrderSource::AddedTasks);
    }
    let last: Vec<String> = orders.iter().filter_map(|o| o.last().cloned()).collect();
    let distinct: BTreeSet<&String> = last.iter().collect();
    if last.len() == orders.len() && distinct.len() == last.len() {
        return (last, OrderSource::LastTasks);
    }
    let dataset = orders
        .last()
        .map(|o| o.iter().take(orders.len()).cloned().collect())
        .unwrap_or_default();
    (dataset, OrderSource::DatasetOrder)
}

/// Builds the matrix from the evaluations' scores (one per row, in order).
///
/// # Errors
/// Too few tasks for the rows, or a row missing a task's score (naming its file).
pub fn build_matrix(
    evals: &[(PathBuf, CoinScores)],
    tasks: &[String],
) -> Result<Vec<Vec<f64>>, StageError> {
    if tasks.len() < evals.len() {
        return Err(StageError::Input(format!(
            "{} evaluations but only {} tasks ({tasks:?}); evaluation i must follow training on task i",
            evals.len(),
            tasks.len()
        )));
    }
    evals
        .iter()
        .enumerate()
        .map(|(i, (dir, s))| {
            tasks[..=i]
                .iter()
                .map(|t| {
                    s.tasks.get(t).map(|x| x.accuracy).ok_or_else(|| {
                        StageError::Input(format!(
                            "{}: no score for task `{t}` (row {i} needs tasks {:?}; evaluate with `upto = \"{}\"`)",
                            dir.join(SCORES_FILE).display(),
                            &tasks[..=i],
                            tasks[i]
                        ))
                    })
                })
                .collect()
        })
        .collect()
}

/// The step and loss of one `train_log.json` entry; other fields are ignored, so the log
/// may grow fields without breaking this reader.
#[derive(Deserialize)]
struct LogStep {
    step: u64,
    loss: f64,
}

/// Reads the loss curve of the model trained on `task` from `dir/train_log.json`.
///
/// # Errors
/// A missing or malformed log, naming the file.
pub fn read_loss_curve(dir: &Path, task: &str) -> Result<LossCurve, StageError> {
    let path = dir.join(TRAIN_LOG_FILE);
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    let log: Vec<LogStep> = serde_json::from_slice(&bytes).map_err(|e| {
        StageError::Input(format!(
            "{}: not a training log (a list of {{\"step\", \"loss\"}} records): {e}",
            path.display()
        ))
    })?;
    Ok(LossCurve {
        task: task.to_string(),
        steps: log.iter().map(|l| l.step).collect(),
        loss: log.iter().map(|l| l.loss).collect(),
    })
}

impl StageKind for ClMetricsKind {
    fn kind(&self) -> &'static str {
        "eval.cl-metrics"
    }
    fn version(&self) -> u32 {
        // 2: training order read from the evaluations, `label`, `models` -> losses.json.
        2
    }
    fn doc(&self) -> &'static str {
        "Continual-learning metrics from eval.coin outputs in training order (`evals = \"@eval/*\"`): the lower-triangular accuracy matrix a[i][j] and MFT (mean diagonal), MFN (mean final row), MAA (mean of row means), BWT (mean final minus diagonal); metrics.json and metrics.md. With `models` (the trained models in task order) their per-step losses go to losses.json; `label` names the method in reports."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "evals",
                ty: ParamType::List(Box::new(ParamType::Ref(ArtifactType::Metrics))),
                default: None,
                doc: "eval.coin outputs, one per training stage, in order",
            },
            ParamSpec {
                name: "tasks",
                ty: ParamType::List(Box::new(ParamType::Str)),
                default: Some(json!([])),
                doc: "training order (empty: read from the evaluations)",
            },
            ParamSpec {
                name: "label",
                ty: ParamType::Str,
                default: Some(json!("")),
                doc: "the method's name in reports (empty: the stage name); seeds of one method share it",
            },
            ParamSpec {
                name: "models",
                ty: ParamType::List(Box::new(ParamType::Ref(ArtifactType::Model))),
                default: Some(json!([])),
                doc: "the trained models in task order; their train_log.json losses go to losses.json",
            },
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics",
            ty: ArtifactType::Metrics,
            doc: "metrics.json (label, tasks, matrix, MFT/MFN/MAA/BWT), metrics.md, losses.json (with `models`)",
        }]
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        let dirs = ctx.inputs.get("evals").cloned().unwrap_or_default();
        if dirs.is_empty() {
            return Err(StageError::Input(
                "parameter `evals`: no evaluations given".into(),
            ));
        }
        let evals = dirs
            .into_iter()
            .map(|d| CoinScores::load(&d).map(|s| (d, s)))
            .collect::<Result<Vec<_>, _>>()?;
        let tasks = if p.tasks.is_empty() {
            let orders: Vec<&[String]> = evals.iter().map(|(_, s)| s.order.as_slice()).collect();
            let (tasks, source) = training_order(&orders);
            if source == OrderSource::DatasetOrder {
                let _ = writeln!(
                    ctx.log,
                    "the evaluations do not tell the training order; assuming dataset order {tasks:?} (set `tasks` if wrong)"
                );
            }
            tasks
        } else {
            p.tasks
        };
        let matrix = build_matrix(&evals, &tasks)?;
        let summary = summarize(&matrix).map_err(|e| StageError::Input(e.to_string()))?;
        let tasks: Vec<String> = tasks.into_iter().take(matrix.len()).collect();

        let models = ctx.inputs.get("models").cloned().unwrap_or_default();
        if !models.is_empty() && models.len() != tasks.len() {
            return Err(StageError::Input(format!(
                "parameter `models`: {} models for {} trained tasks {tasks:?}; give one per task, in order",
                models.len(),
                tasks.len()
            )));
        }
        let losses = models
            .iter()
            .zip(&tasks)
            .map(|(dir, task)| read_loss_curve(dir, task))
            .collect::<Result<Vec<_>, _>>()?;

        let md = markdown(&tasks, &matrix, &summary);
        let out = ctx.output("metrics");
        let path = out.join("metrics.md");
        std::fs::write(&path, md).map_err(|e| StageError::io(&path, e))?;
        if !losses.is_empty() {
            write_json(&out.join(LOSSES_FILE), &losses)?;
        }
        let label = if p.label.is_empty() {
            ctx.name.to_string()
        } else {
            p.label
        };
        write_json(
            &out.join(METRICS_FILE),
            &ClMetrics {
                label,
                tasks,
                matrix,
                summary,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::coin_score::{Rule, TaskScore};
    use crate::kinds::report::tests::run_kind;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    fn order_of(orders: &[&[&str]]) -> (Vec<String>, OrderSource) {
        let owned: Vec<Vec<String>> = orders.iter().map(|o| names(o)).collect();
        let refs: Vec<&[String]> = owned.iter().map(Vec::as_slice).collect();
        training_order(&refs)
    }

    #[test]
    fn training_order_from_added_last_or_dataset_tasks() {
        // `upto` over the full dataset order: both rules agree, the first wins.
        let (t, s) = order_of(&[&["A"], &["A", "B"], &["A", "B", "C"]]);
        assert_eq!((t, s), (names(&["A", "B", "C"]), OrderSource::AddedTasks));
        // Reordered subset evaluated with `tasks = [...]` (scores list dataset order).
        let (t, s) = order_of(&[&["G"], &["A", "G"], &["A", "G", "V"]]);
        assert_eq!((t, s), (names(&["G", "A", "V"]), OrderSource::AddedTasks));
        // A subset in dataset order evaluated with `upto`: rows add several tasks each.
        let (t, s) = order_of(&[&["A"], &["A", "B", "C"], &["A", "B", "C", "D", "E"]]);
        assert_eq!((t, s), (names(&["A", "C", "E"]), OrderSource::LastTasks));
        // Every evaluation scores every task: nothing to read, dataset order.
        let (t, s) = order_of(&[&["A", "B", "C"], &["A", "B", "C"]]);
        assert_eq!((t, s), (names(&["A", "B"]), OrderSource::DatasetOrder));
    }

    fn scores_dir(root: &Path, name: &str, acc: &[(&str, f64)]) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let s = CoinScores {
            model_id: name.into(),
            faithful: false,
            order: acc.iter().map(|(t, _)| (*t).to_string()).collect(),
            tasks: acc
                .iter()
                .map(|(t, a)| {
                    let score = TaskScore {
                        rule: Rule::ExactCi,
                        accuracy: *a,
                        correct: 0.0,
                        total: 1,
                        missing: 0,
                    };
                    ((*t).to_string(), score)
                })
                .collect(),
        };
        std::fs::write(dir.join(SCORES_FILE), serde_json::to_vec(&s).unwrap()).unwrap();
        dir
    }

    fn model_dir(root: &Path, name: &str, losses: &[f64]) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // The shape `train.*` writes, with fields this reader ignores.
        let log: Vec<Value> = losses
            .iter()
            .enumerate()
            .map(|(i, l)| json!({"step": i + 1, "loss": l, "extras": [], "grad_norm": 1.0}))
            .collect();
        std::fs::write(dir.join(TRAIN_LOG_FILE), serde_json::to_vec(&log).unwrap()).unwrap();
        dir
    }

    #[test]
    fn reordered_subset_is_labelled_in_training_order_with_losses() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // Trained GQA, then ScienceQA, then VizWiz; `scores.json` lists dataset order.
        let evals = vec![
            scores_dir(r, "e0", &[("GQA", 70.0)]),
            scores_dir(r, "e1", &[("ScienceQA", 90.0), ("GQA", 40.0)]),
            scores_dir(
                r,
                "e2",
                &[("ScienceQA", 60.0), ("GQA", 30.0), ("VizWiz", 80.0)],
            ),
        ];
        let models = vec![
            model_dir(r, "m0", &[3.0, 2.0]),
            model_dir(r, "m1", &[2.5, 1.5, 1.0]),
            model_dir(r, "m2", &[4.0]),
        ];
        let out = run_kind(
            &ClMetricsKind,
            "metrics/lora",
            &r.join("run"),
            json!({}),
            &[("evals", evals.clone()), ("models", models.clone())],
        )
        .unwrap();
        let m: ClMetrics =
            serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap();
        assert_eq!(m.tasks, ["GQA", "ScienceQA", "VizWiz"]);
        assert_eq!(
            m.matrix,
            vec![vec![70.0], vec![40.0, 90.0], vec![30.0, 60.0, 80.0]]
        );
        // BWT = ((30 - 70) + (60 - 90)) / 2.
        assert!((m.summary.backward_transfer.unwrap() + 35.0).abs() < 1e-9);
        assert_eq!(m.label, "metrics/lora", "default label is the stage name");
        let md = std::fs::read_to_string(out.join("metrics.md")).unwrap();
        assert!(
            md.contains("| after \\ on | GQA | ScienceQA | VizWiz |"),
            "{md}"
        );
        assert!(md.contains("| ScienceQA | 40.00 | 90.00 |  |"), "{md}");
        let losses: Vec<LossCurve> =
            serde_json::from_slice(&std::fs::read(out.join(LOSSES_FILE)).unwrap()).unwrap();
        assert_eq!(losses.len(), 3);
        assert_eq!(losses[1].task, "ScienceQA");
        assert_eq!(losses[1].steps, [1, 2, 3]);
        assert_eq!(losses[1].loss, [2.5, 1.5, 1.0]);

        // An explicit label; no models means no losses.json.
        let out = run_kind(
            &ClMetricsKind,
            "metrics/x",
            &r.join("run2"),
            json!({"label": "SEFE"}),
            &[("evals", evals.clone())],
        )
        .unwrap();
        let m: ClMetrics =
            serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap();
        assert_eq!(m.label, "SEFE");
        assert!(!out.join(LOSSES_FILE).exists());

        // One model short: an error naming the counts.
        let e = run_kind(
            &ClMetricsKind,
            "metrics/x",
            &r.join("run3"),
            json!({}),
            &[("evals", evals.clone()), ("models", models[..2].to_vec())],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("2 models for 3 trained tasks"),
            "{e}"
        );

        // A model without a training log is named.
        std::fs::remove_file(models[2].join(TRAIN_LOG_FILE)).unwrap();
        let e = run_kind(
            &ClMetricsKind,
            "metrics/x",
            &r.join("run4"),
            json!({}),
            &[("evals", evals), ("models", models)],
        )
        .unwrap_err();
        assert!(e.to_string().contains("m2/train_log.json"), "{e}");
    }

    #[test]
    fn metrics_without_a_label_still_parse() {
        let old = r#"{"tasks":["A"],"matrix":[[50.0]],"mean_finetune_accuracy":50.0,
            "mean_final_accuracy":50.0,"mean_average_accuracy":50.0,"backward_transfer":null}"#;
        let m: ClMetrics = serde_json::from_str(old).unwrap();
        assert_eq!(m.label, "");
        assert_eq!(m.matrix, vec![vec![50.0]]);
    }
}

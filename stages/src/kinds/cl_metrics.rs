//! `eval.cl-metrics`: the continual-learning accuracy matrix and its summary metrics from a
//! sequence of `eval.coin` outputs.
//!
//! `evals` lists the evaluations in training order (usually a gather, `"@eval/*"`, over a
//! `foreach` on the task sequence): evaluation `i` was taken after training task `i`. Row `i`
//! of the matrix is read from its `scores.json`: `a[i][j]` = accuracy on task `j` for every
//! `j <= i` (scores for later tasks, if present, are not part of the matrix). The task order
//! is the `tasks` parameter, or by default the first `len(evals)` tasks of the last
//! evaluation's order. The metrics themselves are [`crate::eval::cl_metrics`].
//!
//! Output `metrics` (typed Metrics): `metrics.json` ([`ClMetrics`]) and `metrics.md`.

use std::path::PathBuf;

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

/// `metrics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClMetrics {
    /// Task order (columns; row `i` is "after training task `i`").
    pub tasks: Vec<String>,
    /// The lower-triangular accuracy matrix in percent; row `i` has `i + 1` entries.
    pub matrix: Vec<Vec<f64>>,
    /// MFT, MFN, MAA and BWT, named in full.
    #[serde(flatten)]
    pub summary: ClSummary,
}

/// `eval.cl-metrics`.
#[derive(Debug, Clone, Copy)]
pub struct ClMetricsKind;

#[derive(Deserialize)]
struct Params {
    tasks: Vec<String>,
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

impl StageKind for ClMetricsKind {
    fn kind(&self) -> &'static str {
        "eval.cl-metrics"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Continual-learning metrics from eval.coin outputs in training order (`evals = \"@eval/*\"`): the lower-triangular accuracy matrix a[i][j] and MFT (mean diagonal), MFN (mean final row), MAA (mean of row means), BWT (mean final minus diagonal); metrics.json and metrics.md."
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
                doc: "task order (empty: the last evaluation's order)",
            },
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "metrics",
            ty: ArtifactType::Metrics,
            doc: "metrics.json (matrix, MFT/MFN/MAA/BWT) and metrics.md",
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
            let last = &evals[evals.len() - 1].1.order;
            last.iter().take(evals.len()).cloned().collect()
        } else {
            p.tasks
        };
        let matrix = build_matrix(&evals, &tasks)?;
        let summary = summarize(&matrix).map_err(|e| StageError::Input(e.to_string()))?;
        let tasks: Vec<String> = tasks.into_iter().take(matrix.len()).collect();
        let md = markdown(&tasks, &matrix, &summary);
        let out = ctx.output("metrics");
        let path = out.join("metrics.md");
        std::fs::write(&path, md).map_err(|e| StageError::io(&path, e))?;
        write_json(
            &out.join("metrics.json"),
            &ClMetrics {
                tasks,
                matrix,
                summary,
            },
        )
    }
}

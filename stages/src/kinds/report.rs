//! `report`: a markdown and an HTML report comparing continual-learning methods.
//!
//! | param | type | default | |
//! |---|---|---|---|
//! | `metrics` | list of Metrics refs | required | `eval.cl-metrics` outputs, e.g. `"@metrics/*"` |
//! | `title` | string | `"Continual-learning report"` | the page title |
//!
//! Each input contributes one run: its `metrics.json` (label, training order, matrix, the
//! four metrics) and, when present, its `losses.json`. Runs sharing a label are one method
//! over several seeds. Rendering is [`crate::report`]; the output `report` holds
//! `report.md`, `report.html` and the figures as PNG and SVG, the same bytes for the same
//! inputs.

use std::path::Path;

use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, StageCtx, StageError, StageKind,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::kinds::cl_metrics::{ClMetrics, LOSSES_FILE, LossCurve, METRICS_FILE};
use crate::report::{ReportError, Run, render};

/// Register `report`.
pub fn register(registry: &mut Registry) {
    registry.register(ReportKind);
}

/// `report`.
#[derive(Debug, Clone, Copy)]
pub struct ReportKind;

#[derive(Deserialize)]
struct Params {
    title: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| StageError::Input(format!("{}: not {what}: {e}", path.display())))
}

/// Reads one `eval.cl-metrics` output as a run; `index` (0-based) names unlabelled runs.
///
/// # Errors
/// A missing or malformed `metrics.json` or `losses.json`, named; losses for other tasks
/// than the matrix's.
pub fn load_run(dir: &Path, index: usize) -> Result<Run, StageError> {
    let path = dir.join(METRICS_FILE);
    if !path.exists() && dir.join(crate::kinds::coin_eval::SCORES_FILE).exists() {
        return Err(StageError::Input(format!(
            "{}: an eval.coin output; `metrics` takes eval.cl-metrics outputs",
            dir.display()
        )));
    }
    let m: ClMetrics = read_json(&path, "an eval.cl-metrics metrics file")?;
    let lp = dir.join(LOSSES_FILE);
    let losses: Vec<LossCurve> = if lp.exists() {
        read_json(&lp, "an eval.cl-metrics losses file")?
    } else {
        Vec::new()
    };
    let loss_tasks: Vec<&str> = losses.iter().map(|c| c.task.as_str()).collect();
    if !losses.is_empty() && loss_tasks != m.tasks {
        return Err(StageError::Input(format!(
            "{}: losses for tasks {loss_tasks:?} but the matrix is over {:?}",
            lp.display(),
            m.tasks
        )));
    }
    if let Some(c) = losses.iter().find(|c| c.steps.len() != c.loss.len()) {
        return Err(StageError::Input(format!(
            "{}: task `{}` has {} steps but {} losses",
            lp.display(),
            c.task,
            c.steps.len(),
            c.loss.len()
        )));
    }
    let label = if m.label.is_empty() {
        format!("run {}", index + 1)
    } else {
        m.label
    };
    Ok(Run {
        label,
        tasks: m.tasks,
        matrix: m.matrix,
        summary: m.summary,
        losses,
    })
}

fn report_err(e: ReportError) -> StageError {
    match e {
        ReportError::Io { path, source } => StageError::io(path, source),
        ReportError::Mismatch(m) => StageError::Input(format!("parameter `metrics`: {m}")),
        ReportError::Plot(m) => StageError::Other(m),
    }
}

impl StageKind for ReportKind {
    fn kind(&self) -> &'static str {
        "report"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "A markdown + HTML report of continual-learning methods from eval.cl-metrics outputs (`metrics = \"@metrics/*\"`): the metric table (MFT, MFN, MAA, BWT; mean ± std over runs sharing a label), per method an accuracy-matrix heatmap and training-loss curves (PNG and SVG)."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "metrics",
                ty: ParamType::List(Box::new(ParamType::Ref(ArtifactType::Metrics))),
                default: None,
                doc: "eval.cl-metrics outputs; runs with the same label are averaged",
            },
            ParamSpec {
                name: "title",
                ty: ParamType::Str,
                default: Some(json!("Continual-learning report")),
                doc: "the report's title",
            },
        ]
    }
    fn outputs(&self, _: &Value) -> Vec<OutputSpec> {
        vec![OutputSpec {
            name: "report",
            ty: ArtifactType::Report,
            doc: "report.md, report.html, heatmap-*.{png,svg}, loss-*.{png,svg}",
        }]
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: Params = ctx.params()?;
        let dirs = ctx.inputs.get("metrics").cloned().unwrap_or_default();
        if dirs.is_empty() {
            return Err(StageError::Input(
                "parameter `metrics`: no eval.cl-metrics outputs given".into(),
            ));
        }
        let runs = dirs
            .iter()
            .enumerate()
            .map(|(i, d)| load_run(d, i))
            .collect::<Result<Vec<_>, _>>()?;
        let out = ctx.output("report");
        let files = render(&out, &p.title, runs).map_err(report_err)?;
        for f in files {
            let _ = writeln!(ctx.log, "wrote {f}");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use engine::stage::{NoProgress, Resources};

    use super::*;
    use crate::eval::cl_metrics::summarize;

    /// Runs `kind` as stage `name` in `work` (outputs under `work/out`) with `params` over the
    /// defaults and the given list inputs; returns the first output's directory.
    pub(crate) fn run_kind(
        kind: &dyn StageKind,
        name: &str,
        work: &Path,
        params: Value,
        inputs: &[(&str, Vec<PathBuf>)],
    ) -> Result<PathBuf, StageError> {
        let out_dir = work.join("out");
        let ckpt = work.join("ckpt");
        for o in kind.outputs(&params) {
            std::fs::create_dir_all(out_dir.join(o.name)).unwrap();
        }
        std::fs::create_dir_all(&ckpt).unwrap();
        let mut full = serde_json::Map::new();
        for s in kind.params() {
            if let Some(d) = s.default {
                full.insert(s.name.to_string(), d);
            }
        }
        for (k, v) in params.as_object().unwrap() {
            full.insert(k.clone(), v.clone());
        }
        let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
            .iter()
            .map(|(k, p)| ((*k).to_string(), p.clone()))
            .collect();
        for (k, p) in &inputs {
            let paths: Vec<&str> = p.iter().map(|x| x.to_str().unwrap()).collect();
            full.insert(k.clone(), json!(paths));
        }
        let params = Value::Object(full);
        let mut log = Vec::new();
        let mut ctx = StageCtx {
            name,
            recipe_dir: work,
            params: &params,
            inputs: &inputs,
            out_dir: &out_dir,
            checkpoint_dir: &ckpt,
            seed: 0,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: &NoProgress,
            log: &mut log,
            resources: Resources::default(),
        };
        kind.run(&mut ctx)?;
        let first = kind.outputs(&params)[0].name;
        Ok(out_dir.join(first))
    }

    /// Writes an `eval.cl-metrics`-shaped output.
    pub(crate) fn metrics_dir(
        root: &Path,
        name: &str,
        label: &str,
        tasks: &[&str],
        matrix: Vec<Vec<f64>>,
        losses: &[&[f64]],
    ) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let m = ClMetrics {
            label: label.into(),
            tasks: tasks.iter().map(|t| (*t).to_string()).collect(),
            summary: summarize(&matrix).unwrap(),
            matrix,
        };
        std::fs::write(dir.join(METRICS_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        if !losses.is_empty() {
            let curves: Vec<LossCurve> = tasks
                .iter()
                .zip(losses)
                .map(|(t, l)| LossCurve {
                    task: (*t).to_string(),
                    steps: (1..=l.len() as u64).collect(),
                    loss: l.to_vec(),
                })
                .collect();
            std::fs::write(dir.join(LOSSES_FILE), serde_json::to_vec(&curves).unwrap()).unwrap();
        }
        dir
    }

    fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect()
    }

    #[test]
    fn report_kind_renders_two_methods_deterministically() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let tasks = ["ScienceQA", "TextVQA", "ImageNet"];
        let lora = metrics_dir(
            r,
            "lora",
            "LoRA",
            &tasks,
            vec![vec![80.0], vec![40.0, 90.0], vec![20.0, 50.0, 85.0]],
            &[&[3.0, 2.0, 1.5], &[2.5, 1.2, 0.9], &[2.8, 1.9, 1.1]],
        );
        let sefe = metrics_dir(
            r,
            "sefe",
            "SEFE",
            &tasks,
            vec![vec![78.0], vec![70.0, 88.0], vec![65.0, 80.0, 84.0]],
            &[],
        );
        let inputs = [("metrics", vec![lora.clone(), sefe.clone()])];
        let params = json!({"title": "CoIN-mini <test>"});
        let a = run_kind(&ReportKind, "report", &r.join("a"), params.clone(), &inputs).unwrap();
        let b = run_kind(&ReportKind, "report", &r.join("b"), params, &inputs).unwrap();
        let files = tree(&a);
        assert_eq!(files, tree(&b), "same inputs, same bytes");
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "heatmap-1-lora.png",
                "heatmap-1-lora.svg",
                "heatmap-2-sefe.png",
                "heatmap-2-sefe.svg",
                "loss-1-lora.png",
                "loss-1-lora.svg",
                "report.html",
                "report.md",
            ]
        );
        let html = String::from_utf8(files["report.html"].clone()).unwrap();
        assert!(
            html.contains("<title>CoIN-mini &lt;test&gt;</title>"),
            "{html}"
        );
        let md = String::from_utf8(files["report.md"].clone()).unwrap();
        // LoRA: MFT (80+90+85)/3 = 85, MFN 155/3 = 51.67, BWT ((20-80)+(50-90))/2 = -50.
        assert!(md.contains("| LoRA | 1 | 85.00 | 51.67 |"), "{md}");
        assert!(md.contains("| -50.00 |"), "{md}");
        assert!(md.contains("No training losses were given"), "{md}");

        // An eval.coin output passed by mistake is named as such.
        let scores = r.join("eval");
        std::fs::create_dir_all(&scores).unwrap();
        std::fs::write(scores.join("scores.json"), "{}").unwrap();
        let e = run_kind(
            &ReportKind,
            "report",
            &r.join("c"),
            json!({}),
            &[("metrics", vec![scores])],
        )
        .unwrap_err();
        assert!(e.to_string().contains("an eval.coin output"), "{e}");
    }
}

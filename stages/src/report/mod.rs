//! The continual-learning report: methods side by side from `eval.cl-metrics` outputs.
//!
//! ## Model
//!
//! A [`Run`] is one `eval.cl-metrics` output: a label, the training order, the accuracy
//! matrix, its four metrics and (optionally) the per-task training losses. Runs sharing a
//! label are one [`Method`] seen over several seeds ([`group`], in order of first
//! appearance); they must share the task order, since averaging matrices of different
//! orders would mix tasks.
//!
//! ## Output ([`render`])
//!
//! - `report.md` and `report.html`: the title, the metric table (MFT, MFN, MAA, BWT per
//!   method, `mean ± std` over runs: [`table`]), the metric definitions, then per method its
//!   accuracy heatmap, the matrix as a table and its loss curves. The HTML is one file with
//!   inline CSS that links the images by relative path, so the folder can be moved or served
//!   as is.
//! - per method `k` (1-based, in table order) with a file-safe form of its label:
//!   `heatmap-k-<label>.{png,svg}` (the mean matrix over runs) and, when losses are known,
//!   `loss-k-<label>.{png,svg}` (one line per task; the mean over runs when every run logged
//!   the same steps, otherwise the first run's, and the page says which).
//!
//! Everything is a function of the runs and the title: no timestamps, no absolute paths, no
//! hash-map order, so the same inputs render the same bytes (tested).

mod page;
pub mod plots;
pub mod table;

use std::path::{Path, PathBuf};

use crate::eval::cl_metrics::ClSummary;
use crate::kinds::cl_metrics::LossCurve;

/// A report that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Drawing a figure failed.
    #[error("plot: {0}")]
    Plot(String),
    /// Runs that cannot be combined.
    #[error("{0}")]
    Mismatch(String),
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// One run of one method (an `eval.cl-metrics` output).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The method's name.
    pub label: String,
    /// Training order.
    pub tasks: Vec<String>,
    /// Lower-triangular accuracy matrix (%).
    pub matrix: Vec<Vec<f64>>,
    /// MFT, MFN, MAA, BWT.
    pub summary: ClSummary,
    /// Training losses per task, in task order; empty when not known.
    pub losses: Vec<LossCurve>,
}

/// The runs of one method.
#[derive(Debug, Clone, PartialEq)]
pub struct Method {
    /// The shared label.
    pub label: String,
    /// The shared training order.
    pub tasks: Vec<String>,
    /// At least one run.
    pub runs: Vec<Run>,
}

/// Where a method's loss curves come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Losses {
    /// No run logged losses.
    None,
    /// The mean over this many runs (1: the only run).
    Mean(usize, Vec<LossCurve>),
    /// The first run's: the runs logged different steps or tasks.
    FirstRun(Vec<LossCurve>),
}

impl Method {
    /// The element-wise mean of the runs' matrices.
    #[must_use]
    pub fn mean_matrix(&self) -> Vec<Vec<f64>> {
        let n = self.runs.len() as f64;
        let mut sum: Vec<Vec<f64>> = self.runs[0]
            .matrix
            .iter()
            .map(|r| vec![0.0; r.len()])
            .collect();
        for run in &self.runs {
            for (acc, row) in sum.iter_mut().zip(&run.matrix) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
        }
        sum.iter_mut().flatten().for_each(|a| *a /= n);
        sum
    }

    /// The loss curves to plot.
    #[must_use]
    pub fn losses(&self) -> Losses {
        let logged: Vec<&Vec<LossCurve>> = self
            .runs
            .iter()
            .map(|r| &r.losses)
            .filter(|l| !l.is_empty())
            .collect();
        let Some(first) = logged.first() else {
            return Losses::None;
        };
        let aligned = logged.len() == self.runs.len()
            && logged.iter().all(|l| {
                l.len() == first.len()
                    && l.iter()
                        .zip(first.iter())
                        .all(|(a, b)| a.task == b.task && a.steps == b.steps)
            });
        if !aligned {
            return Losses::FirstRun((*first).clone());
        }
        let n = logged.len() as f64;
        let mean = first
            .iter()
            .enumerate()
            .map(|(t, c)| LossCurve {
                task: c.task.clone(),
                steps: c.steps.clone(),
                loss: (0..c.loss.len())
                    .map(|s| logged.iter().map(|l| l[t].loss[s]).sum::<f64>() / n)
                    .collect(),
            })
            .collect();
        Losses::Mean(logged.len(), mean)
    }
}

/// Groups runs by label, in order of first appearance.
///
/// # Errors
/// Two runs of one label with different task orders or matrix shapes.
pub fn group(runs: Vec<Run>) -> Result<Vec<Method>, ReportError> {
    let mut methods: Vec<Method> = Vec::new();
    for run in runs {
        match methods.iter_mut().find(|m| m.label == run.label) {
            Some(m) => {
                let shape = |r: &Run| r.matrix.iter().map(Vec::len).collect::<Vec<_>>();
                if m.tasks != run.tasks || shape(&m.runs[0]) != shape(&run) {
                    return Err(ReportError::Mismatch(format!(
                        "runs labelled `{}` disagree on the tasks ({:?} vs {:?}); give each method its own `label`",
                        run.label, m.tasks, run.tasks
                    )));
                }
                m.runs.push(run);
            }
            None => methods.push(Method {
                label: run.label.clone(),
                tasks: run.tasks.clone(),
                runs: vec![run],
            }),
        }
    }
    Ok(methods)
}

/// A file-name-safe form of a label: lower-case ASCII letters and digits, `-` between words.
#[must_use]
pub fn slug(label: &str) -> String {
    let mut out = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    let out: String = out.trim_end_matches('-').chars().take(40).collect();
    if out.is_empty() { "method".into() } else { out }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ReportError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|source| ReportError::Io { path, source })
}

/// Renders the report of `runs` into `dir` (which must exist); returns the files written,
/// relative to `dir`, in writing order.
///
/// # Errors
/// No runs, runs of one label that disagree, a drawing or a write error.
pub fn render(dir: &Path, title: &str, runs: Vec<Run>) -> Result<Vec<String>, ReportError> {
    if runs.is_empty() {
        return Err(ReportError::Mismatch("no runs to report".into()));
    }
    let methods = group(runs)?;
    let mut files = Vec::new();
    let mut sections = Vec::with_capacity(methods.len());
    for (k, m) in methods.iter().enumerate() {
        let stem = format!("{}-{}", k + 1, slug(&m.label));
        let matrix = m.mean_matrix();
        let heat = plots::heatmap(&format!("{}: accuracy (%)", m.label), &m.tasks, &matrix)?;
        let heatmap = format!("heatmap-{stem}");
        write(dir, &format!("{heatmap}.png"), &heat.png)?;
        write(dir, &format!("{heatmap}.svg"), heat.svg.as_bytes())?;
        files.extend([format!("{heatmap}.png"), format!("{heatmap}.svg")]);
        let losses = m.losses();
        let curves = match &losses {
            Losses::None => None,
            Losses::Mean(_, c) | Losses::FirstRun(c) => Some(c),
        };
        let loss = match curves {
            Some(c) => {
                let fig = plots::loss_curves(&format!("{}: training loss", m.label), c)?;
                let name = format!("loss-{stem}");
                write(dir, &format!("{name}.png"), &fig.png)?;
                write(dir, &format!("{name}.svg"), fig.svg.as_bytes())?;
                files.extend([format!("{name}.png"), format!("{name}.svg")]);
                Some(name)
            }
            None => None,
        };
        sections.push(page::Section {
            method: m,
            matrix,
            heatmap,
            loss,
            losses,
        });
    }
    let rows: Vec<table::MetricRow> = methods.iter().map(table::MetricRow::of).collect();
    write(
        dir,
        "report.md",
        page::markdown(title, &rows, &sections).as_bytes(),
    )?;
    write(
        dir,
        "report.html",
        page::html(title, &rows, &sections).as_bytes(),
    )?;
    files.extend(["report.md".to_string(), "report.html".to_string()]);
    Ok(files)
}

#[cfg(test)]
mod tests;

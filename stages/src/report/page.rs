//! `report.md` and `report.html` from the rendered figures and the metric table.

use std::fmt::Write as _;

use super::table::{HEADERS, MetricRow};
use super::{Losses, Method};

/// One method's part of the page.
pub(super) struct Section<'a> {
    pub(super) method: &'a Method,
    /// The mean matrix shown in the heatmap.
    pub(super) matrix: Vec<Vec<f64>>,
    /// Stem of the heatmap files (`.png`, `.svg`).
    pub(super) heatmap: String,
    /// Stem of the loss-curve files, when there are losses.
    pub(super) loss: Option<String>,
    pub(super) losses: Losses,
}

const DEFINITIONS: &str = "a[i][j] is the accuracy (%) on task j after training on tasks 0..i. \
MFT = mean of a[j][j] (each task right after learning it); MFN = mean of the last row (every task at the end); \
MAA = mean over i of the mean of row i; BWT = mean over j < T-1 of a[T-1][j] - a[j][j] (negative: forgetting). \
With several runs of a method: mean ± sample standard deviation over runs; the heatmap and curves show means.";

fn runs_note(s: &Section<'_>) -> String {
    let n = s.method.runs.len();
    let mut note = if n == 1 {
        "1 run.".to_string()
    } else {
        format!("{n} runs; the matrix is their mean.")
    };
    match &s.losses {
        Losses::None => {
            note.push_str(" No training losses were given (`models` of eval.cl-metrics).")
        }
        Losses::Mean(k, _) if *k > 1 => {
            let _ = write!(note, " Loss curves: mean over {k} runs.");
        }
        Losses::Mean(..) => {}
        Losses::FirstRun(_) => {
            note.push_str(" Loss curves: the first run's (the runs logged different steps).");
        }
    }
    note
}

/// The matrix as a markdown table (rows "after task i", blank above the diagonal).
fn matrix_markdown(tasks: &[String], a: &[Vec<f64>]) -> String {
    let mut out = String::from("| after \\ on |");
    for t in tasks {
        let _ = write!(out, " {t} |");
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(tasks.len()));
    out.push('\n');
    for (i, t) in tasks.iter().enumerate() {
        let _ = write!(out, "| {t} |");
        for j in 0..tasks.len() {
            match a.get(i).and_then(|r| r.get(j)) {
                Some(v) => {
                    let _ = write!(out, " {v:.2} |");
                }
                None => out.push_str("  |"),
            }
        }
        out.push('\n');
    }
    out
}

/// `report.md`.
pub(super) fn markdown(title: &str, rows: &[MetricRow], sections: &[Section<'_>]) -> String {
    let mut out = format!("# {title}\n\n## Metrics\n\n");
    out.push_str(&super::table::markdown(rows));
    let _ = write!(out, "\n{DEFINITIONS}\n");
    for s in sections {
        let label = &s.method.label;
        let _ = write!(out, "\n## {label}\n\n{}\n\n", runs_note(s));
        let _ = write!(
            out,
            "![accuracy matrix of {label}]({h}.png) ([SVG]({h}.svg))\n\n",
            h = s.heatmap
        );
        out.push_str(&matrix_markdown(&s.method.tasks, &s.matrix));
        if let Some(l) = &s.loss {
            let _ = write!(
                out,
                "\n![training loss of {label}]({l}.png) ([SVG]({l}.svg))\n"
            );
        }
    }
    out
}

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}\
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem}\
td{text-align:right;font-variant-numeric:tabular-nums}td:first-child{text-align:left}\
img{max-width:100%;display:block;margin:.5rem 0}.note{color:#555}";

/// `report.html`: one file, inline CSS, images by relative path.
pub(super) fn html(title: &str, rows: &[MetricRow], sections: &[Section<'_>]) -> String {
    let t = esc(title);
    let mut out = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{t}</h1>\n<h2>Metrics</h2>\n<table>\n<tr>"
    );
    for h in HEADERS {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>\n");
    for r in rows {
        let _ = write!(out, "<tr><td>{}</td>", esc(&r.label));
        for c in r.cells() {
            let _ = write!(out, "<td>{}</td>", esc(&c));
        }
        out.push_str("</tr>\n");
    }
    let _ = write!(
        out,
        "</table>\n<p class=\"note\">{}</p>\n",
        esc(DEFINITIONS)
    );
    for s in sections {
        let label = esc(&s.method.label);
        let _ = write!(
            out,
            "<h2>{label}</h2>\n<p class=\"note\">{}</p>\n",
            esc(&runs_note(s))
        );
        let _ = write!(
            out,
            "<img src=\"{h}.png\" alt=\"accuracy matrix of {label}\">\n<p><a href=\"{h}.svg\">SVG</a></p>\n",
            h = esc(&s.heatmap)
        );
        if let Some(l) = &s.loss {
            let _ = write!(
                out,
                "<img src=\"{l}.png\" alt=\"training loss of {label}\">\n<p><a href=\"{l}.svg\">SVG</a></p>\n",
                l = esc(l)
            );
        }
    }
    out.push_str("</body>\n</html>\n");
    out
}

//! Continual-learning summary metrics over the lower-triangular accuracy matrix.
//!
//! `a[i][j]` is the accuracy (%) on task `j` after training on tasks `0..=i` (row `i` has
//! `i + 1` entries). With `T` tasks (0-based indices below):
//!
//! - **MFT** (mean fine-tune accuracy) = mean of the diagonal, `a[j][j]`: how well each task
//!   was learned right after training on it.
//! - **MFN** (mean final accuracy) = mean of the last row, `a[T-1][j]`.
//! - **MAA** (mean average accuracy) = mean over rows `i` of the row mean `mean_{j<=i} a[i][j]`.
//! - **BWT** (backward transfer) = mean over `j < T-1` of `a[T-1][j] - a[j][j]`; negative
//!   means forgetting. Undefined (`None`) for a single task.
//!
//! Papers disagree on which of MFT/MFN is which; the names here are spelled out in the output
//! (`mean_finetune_accuracy` etc.) and the matrix is stored next to them.

use serde::{Deserialize, Serialize};

/// The four summary metrics, named unambiguously.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClSummary {
    /// MFT: mean of `a[j][j]`.
    pub mean_finetune_accuracy: f64,
    /// MFN: mean of `a[T-1][j]`.
    pub mean_final_accuracy: f64,
    /// MAA: mean over `i` of `mean_{j<=i} a[i][j]`.
    pub mean_average_accuracy: f64,
    /// BWT: mean over `j < T-1` of `a[T-1][j] - a[j][j]`; `None` when `T = 1`.
    pub backward_transfer: Option<f64>,
}

/// A malformed matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatrixError {
    /// No rows.
    #[error("the accuracy matrix is empty")]
    Empty,
    /// Row `row` does not have `row + 1` entries.
    #[error("row {row} has {got} entries, expected {}", row + 1)]
    Ragged {
        /// Row index.
        row: usize,
        /// Its length.
        got: usize,
    },
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Computes MFT, MFN, MAA and BWT from a lower-triangular matrix.
///
/// # Errors
/// An empty matrix or a row of the wrong length.
pub fn summarize(a: &[Vec<f64>]) -> Result<ClSummary, MatrixError> {
    if a.is_empty() {
        return Err(MatrixError::Empty);
    }
    if let Some((row, r)) = a.iter().enumerate().find(|(i, r)| r.len() != i + 1) {
        return Err(MatrixError::Ragged { row, got: r.len() });
    }
    let t = a.len();
    let last = &a[t - 1];
    Ok(ClSummary {
        mean_finetune_accuracy: mean((0..t).map(|j| a[j][j])),
        mean_final_accuracy: mean(last.iter().copied()),
        mean_average_accuracy: mean(a.iter().map(|r| mean(r.iter().copied()))),
        backward_transfer: (t > 1).then(|| mean((0..t - 1).map(|j| last[j] - a[j][j]))),
    })
}

/// A markdown report: the matrix (rows "after task i", columns tasks, blank above the
/// diagonal) and the four metrics.
#[must_use]
pub fn markdown(tasks: &[String], a: &[Vec<f64>], s: &ClSummary) -> String {
    let mut out = String::from("| after \\ on |");
    for t in tasks {
        out.push_str(&format!(" {t} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(tasks.len()));
    out.push('\n');
    for (i, row) in a.iter().enumerate() {
        out.push_str(&format!("| {} |", tasks.get(i).map_or("?", String::as_str)));
        for j in 0..tasks.len() {
            match row.get(j) {
                Some(v) => out.push_str(&format!(" {v:.2} |")),
                None => out.push_str("  |"),
            }
        }
        out.push('\n');
    }
    out.push_str("\n| metric | value |\n|---|---:|\n");
    out.push_str(&format!(
        "| MFT (mean fine-tune accuracy, diagonal) | {:.2} |\n",
        s.mean_finetune_accuracy
    ));
    out.push_str(&format!(
        "| MFN (mean final accuracy, last row) | {:.2} |\n",
        s.mean_final_accuracy
    ));
    out.push_str(&format!(
        "| MAA (mean average accuracy) | {:.2} |\n",
        s.mean_average_accuracy
    ));
    let bwt = s
        .backward_transfer
        .map_or_else(|| "n/a".to_string(), |b| format!("{b:.2}"));
    out.push_str(&format!("| BWT (backward transfer) | {bwt} |\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example() {
        // T = 3.
        //   after 0: [80]
        //   after 1: [60, 90]
        //   after 2: [50, 70, 85]
        let a = vec![vec![80.0], vec![60.0, 90.0], vec![50.0, 70.0, 85.0]];
        let s = summarize(&a).unwrap();
        // MFT = (80 + 90 + 85) / 3 = 85.
        assert!((s.mean_finetune_accuracy - 85.0).abs() < 1e-12);
        // MFN = (50 + 70 + 85) / 3 = 68.333...
        assert!((s.mean_final_accuracy - 205.0 / 3.0).abs() < 1e-12);
        // MAA = (80 + 75 + 68.333...) / 3 = 74.444...
        assert!((s.mean_average_accuracy - (80.0 + 75.0 + 205.0 / 3.0) / 3.0).abs() < 1e-12);
        // BWT = ((50 - 80) + (70 - 90)) / 2 = -25.
        assert!((s.backward_transfer.unwrap() + 25.0).abs() < 1e-12);
        let md = markdown(&["A".into(), "B".into(), "C".into()], &a, &s);
        assert!(md.contains("| A | 80.00 |  |  |"), "{md}");
        assert!(md.contains("| C | 50.00 | 70.00 | 85.00 |"), "{md}");
        assert!(md.contains("BWT (backward transfer) | -25.00"), "{md}");
    }

    #[test]
    fn single_task_and_bad_shapes() {
        let s = summarize(&[vec![42.0]]).unwrap();
        assert_eq!(s.mean_final_accuracy, 42.0);
        assert_eq!(s.backward_transfer, None);
        assert_eq!(summarize(&[]), Err(MatrixError::Empty));
        assert_eq!(
            summarize(&[vec![1.0], vec![2.0]]),
            Err(MatrixError::Ragged { row: 1, got: 1 })
        );
    }
}

//! The metric table: MFT, MFN, MAA and BWT per method, as `mean ± std` over the method's
//! runs (seeds).
//!
//! The spread is the sample standard deviation (divisor `n - 1`), the usual choice for a
//! handful of seeds; one run shows its value alone. BWT is undefined for a single task; a
//! method whose runs have no BWT shows `n/a`.

use std::fmt;

use super::Method;

/// Mean and spread of one metric over a method's runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// The mean.
    pub mean: f64,
    /// The sample standard deviation; `None` for a single run.
    pub std: Option<f64>,
}

impl Stat {
    /// The statistic of `values`; `None` when there are none.
    #[must_use]
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            let ss: f64 = values.iter().map(|v| (v - mean).powi(2)).sum();
            (ss / (n - 1) as f64).sqrt()
        });
        Some(Self { mean, std })
    }
}

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.std {
            Some(s) => write!(f, "{:.2} ± {s:.2}", self.mean),
            None => write!(f, "{:.2}", self.mean),
        }
    }
}

/// One method's row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    /// The method.
    pub label: String,
    /// How many runs were averaged.
    pub runs: usize,
    /// Mean fine-tune accuracy (diagonal).
    pub mft: Stat,
    /// Mean final accuracy (last row).
    pub mfn: Stat,
    /// Mean average accuracy.
    pub maa: Stat,
    /// Backward transfer; `None` when no run defines it.
    pub bwt: Option<Stat>,
}

/// Column headers, shared by the markdown and HTML tables.
pub const HEADERS: [&str; 6] = [
    "method",
    "runs",
    "MFT (mean fine-tune acc.)",
    "MFN (mean final acc.)",
    "MAA (mean average acc.)",
    "BWT (backward transfer)",
];

impl MetricRow {
    /// The row of `m`.
    #[must_use]
    pub fn of(m: &Method) -> Self {
        let pick = |f: &dyn Fn(&crate::eval::cl_metrics::ClSummary) -> f64| {
            let v: Vec<f64> = m.runs.iter().map(|r| f(&r.summary)).collect();
            Stat::of(&v).unwrap_or(Stat {
                mean: f64::NAN,
                std: None,
            })
        };
        let bwt: Vec<f64> = m
            .runs
            .iter()
            .filter_map(|r| r.summary.backward_transfer)
            .collect();
        Self {
            label: m.label.clone(),
            runs: m.runs.len(),
            mft: pick(&|s| s.mean_finetune_accuracy),
            mfn: pick(&|s| s.mean_final_accuracy),
            maa: pick(&|s| s.mean_average_accuracy),
            bwt: Stat::of(&bwt),
        }
    }

    /// The cells after the label, as text.
    #[must_use]
    pub fn cells(&self) -> [String; 5] {
        [
            self.runs.to_string(),
            self.mft.to_string(),
            self.mfn.to_string(),
            self.maa.to_string(),
            self.bwt.map_or_else(|| "n/a".into(), |b| b.to_string()),
        ]
    }
}

/// A markdown table with one row per method.
#[must_use]
pub fn markdown(rows: &[MetricRow]) -> String {
    let mut out = format!("| {} |\n|---|", HEADERS.join(" | "));
    out.push_str(&"---:|".repeat(HEADERS.len() - 1));
    out.push('\n');
    for r in rows {
        let label = r.label.replace('|', "\\|");
        out.push_str(&format!("| {label} | {} |\n", r.cells().join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        // mean 4, squared deviations 4 + 0 + 4 = 8, / (3 - 1) = 4, std 2.
        let s = Stat::of(&[2.0, 4.0, 6.0]).unwrap();
        assert!((s.mean - 4.0).abs() < 1e-12);
        assert!((s.std.unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(s.to_string(), "4.00 ± 2.00");
        // One run: no spread is claimed.
        let one = Stat::of(&[61.25]).unwrap();
        assert_eq!(one.std, None);
        assert_eq!(one.to_string(), "61.25");
        assert_eq!(Stat::of(&[]), None);
        // Two equal runs: a spread of exactly zero, shown.
        assert_eq!(Stat::of(&[5.0, 5.0]).unwrap().to_string(), "5.00 ± 0.00");
    }
}

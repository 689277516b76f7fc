//! Learning-rate schedules, as Hugging Face's `get_cosine_schedule_with_warmup` and
//! `get_constant_schedule_with_warmup` (the two LLaVA-1.5 and its follow-ups use).
//!
//! A schedule is a multiplier on each group's peak lr, evaluated at the number of optimizer
//! steps already taken: the first update uses `factor(0)`, which is 0 whenever there is warmup,
//! exactly as with PyTorch's `LambdaLR` stepped after each `optimizer.step()`.
//! Warmup given as a ratio becomes `ceil(ratio · total_steps)` steps (HF `get_warmup_steps`).

use std::f64::consts::PI;

use super::TrainError;

/// Schedule shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Half a cosine from 1 down to 0 at `total_steps`.
    Cosine,
    /// Stays at 1.
    Constant,
}

impl std::str::FromStr for ScheduleKind {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            other => Err(TrainError::Config(format!(
                "unknown lr schedule `{other}` (expected `cosine` or `constant`)"
            ))),
        }
    }
}

/// A warmup-then-`kind` schedule over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Linear warmup steps (factor `step / warmup`).
    pub warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
}

impl Schedule {
    /// Builds a schedule with warmup given as a fraction of `total_steps` (HF `warmup_ratio`).
    pub fn with_warmup_ratio(
        kind: ScheduleKind,
        warmup_ratio: f64,
        total_steps: u64,
    ) -> Result<Self, TrainError> {
        if !(0.0..=1.0).contains(&warmup_ratio) {
            return Err(TrainError::Config(format!(
                "warmup_ratio must be in [0, 1], got {warmup_ratio}"
            )));
        }
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as u64;
        Ok(Self {
            kind,
            warmup_steps,
            total_steps,
        })
    }

    /// The lr multiplier for the update that follows `step` completed updates.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                // num_cycles = 0.5: half a cosine period over the post-warmup steps.
                (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_with_warmup_matches_hf_values() {
        // HF: get_cosine_schedule_with_warmup(opt, 3, 10) gives these lambdas for steps 0..=10.
        let s = Schedule::with_warmup_ratio(ScheduleKind::Cosine, 0.3, 10).unwrap();
        assert_eq!(s.warmup_steps, 3);
        let f: Vec<f64> = (0..=10).map(|i| s.factor(i)).collect();
        let want = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.5 * (1.0 + (PI / 7.0).cos()),
            0.5 * (1.0 + (2.0 * PI / 7.0).cos()),
            0.5 * (1.0 + (3.0 * PI / 7.0).cos()),
            0.5 * (1.0 + (4.0 * PI / 7.0).cos()),
            0.5 * (1.0 + (5.0 * PI / 7.0).cos()),
            0.5 * (1.0 + (6.0 * PI / 7.0).cos()),
            0.0,
        ];
        for (i, (g, w)) in f.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-12, "step {i}: {g} vs {w}");
        }
    }

    #[test]
    fn warmup_ratio_rounds_up_and_constant_stays_flat() {
        let s = Schedule::with_warmup_ratio(ScheduleKind::Constant, 0.03, 100).unwrap();
        assert_eq!(s.warmup_steps, 3);
        // Same float rounding as Python: 0.07 * 100 = 7.000000000000001, so HF warms up 8 steps.
        let odd = Schedule::with_warmup_ratio(ScheduleKind::Constant, 0.07, 100).unwrap();
        assert_eq!(odd.warmup_steps, 8);
        assert_eq!(s.factor(0), 0.0);
        assert!((s.factor(2) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.factor(3), 1.0);
        assert_eq!(s.factor(99), 1.0);
        let none = Schedule::with_warmup_ratio(ScheduleKind::Constant, 0.0, 5).unwrap();
        assert_eq!(
            none.factor(0),
            1.0,
            "no warmup: the first step uses the full lr"
        );
    }

    #[test]
    fn bad_ratio_and_kind_are_errors() {
        assert!(Schedule::with_warmup_ratio(ScheduleKind::Cosine, 1.5, 10).is_err());
        let err = "linear_decay"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("linear_decay"), "{err}");
        assert_eq!(
            "cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
    }
}

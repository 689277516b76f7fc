//! Token-level masked cross-entropy, per-sequence log-probabilities, and the [`LossHook`] trait
//! for extra loss terms.
//!
//! ## Cross-entropy convention
//!
//! Labels are aligned with `input_ids` (the chat template does not shift them); as in
//! transformers' `ForCausalLMLoss`, position `t`'s logits predict label `t + 1`, and labels equal
//! to [`IGNORE_INDEX`] are skipped. The loss of a step is the mean over *all* labelled targets of
//! the step, including across gradient-accumulation micro-batches: each micro-batch contributes
//! `sum(nll) / window_targets`, so accumulating `k` micro-batches gives exactly the gradient of
//! the big-batch mean (HF's `num_items_in_batch` behaviour), not a mean of means.
//!
//! Only the labelled rows go through log-softmax (a `index_select` first): for LLaVA that is a few
//! dozen answer tokens out of hundreds of image and prompt positions.
//!
//! Everything here is built from differentiable candle primitives; the max subtracted for
//! numerical stability is detached (its gradient is zero in exact arithmetic, and leaving it
//! attached only adds rounding noise to the argmax column).

use candle_core::{D, DType, Tensor, Var};

use super::TrainError;
pub use crate::model::chat::IGNORE_INDEX;

/// Numerically stable log-softmax over the last dimension, with backward.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor, TrainError> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Host copy of `labels` shifted left by one: `(row-major flat index into [b, s-1], target)` for
/// every labelled target. Rejects targets outside the vocabulary (bad data, not a panic).
fn shifted_targets(labels: &Tensor, vocab: usize) -> Result<Vec<(u32, u32)>, TrainError> {
    let s = labels.dim(1)?;
    let rows: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        for t in 0..s.saturating_sub(1) {
            let label = row[t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= vocab {
                return Err(TrainError::Data(format!(
                    "label {label} at row {i}, position {} is outside the vocabulary (0..{vocab}) and is not {IGNORE_INDEX}",
                    t + 1
                )));
            }
            out.push(((i * (s - 1) + t) as u32, label as u32));
        }
    }
    Ok(out)
}

/// Sum of the negative log-likelihoods of all labelled targets and their count.
/// `logits` `[b, s, vocab]` (any float dtype, computed in f32), `labels` `[b, s]` integer.
pub fn shifted_nll_sum(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize), TrainError> {
    let (b, s, v) = logits.dims3()?;
    if labels.dims() != [b, s] {
        return Err(TrainError::Data(format!(
            "labels have shape {:?} but logits are {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    let targets = shifted_targets(labels, v)?;
    if targets.is_empty() {
        let zero = logits.sum_all()?.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
        return Ok((zero, 0));
    }
    let dev = logits.device();
    let rows = Tensor::from_iter(targets.iter().map(|t| t.0), dev)?;
    let ids = Tensor::from_iter(targets.iter().map(|t| t.1), dev)?.unsqueeze(1)?;
    let flat = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let picked = flat.index_select(&rows, 0)?.to_dtype(DType::F32)?;
    let logp = log_softmax_last_dim(&picked)?.gather(&ids, 1)?;
    Ok((logp.sum_all()?.neg()?, targets.len()))
}

/// Mean cross-entropy over labelled targets (transformers' causal-LM loss for one batch).
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
    let (sum, n) = shifted_nll_sum(logits, labels)?;
    if n == 0 {
        return Err(TrainError::Data(
            "batch has no labelled targets".to_string(),
        ));
    }
    Ok((sum / n as f64)?)
}

/// Per-row sum of log-probabilities of the labelled targets, `[b]` f32 (DPO's policy and
/// reference log-likelihoods).
pub fn sequence_logprobs(logits: &Tensor, labels: &Tensor) -> Result<Tensor, TrainError> {
    let (b, s, v) = logits.dims3()?;
    let targets = shifted_targets(labels, v)?;
    let dev = logits.device();
    let flat = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let mut row_of = Vec::with_capacity(targets.len());
    for &(flat_idx, _) in &targets {
        row_of.push(flat_idx as usize / (s - 1));
    }
    if targets.is_empty() {
        return Ok(Tensor::zeros(b, DType::F32, dev)?);
    }
    let rows = Tensor::from_iter(targets.iter().map(|t| t.0), dev)?;
    let ids = Tensor::from_iter(targets.iter().map(|t| t.1), dev)?.unsqueeze(1)?;
    let picked = flat.index_select(&rows, 0)?.to_dtype(DType::F32)?;
    let logp = log_softmax_last_dim(&picked)?.gather(&ids, 1)?.squeeze(1)?; // [n]
    // Scatter-sum the n target log-probs into their rows with a one-hot [b, n] matmul.
    let n = targets.len();
    let mut onehot = vec![0f32; b * n];
    for (j, &r) in row_of.iter().enumerate() {
        onehot[r * n + j] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, n), dev)?;
    Ok(onehot.matmul(&logp.unsqueeze(1)?)?.squeeze(1)?)
}

/// What a hook sees for one micro-batch.
pub struct HookCtx<'a> {
    /// Optimizer steps completed before this one.
    pub step: u64,
    /// Micro-batch index inside the accumulation window.
    pub micro: usize,
    /// The model's logits `[b, s, vocab]` for this micro-batch (attached to the graph).
    pub logits: &'a Tensor,
    /// Labels `[b, s]`.
    pub labels: &'a Tensor,
    /// The trainable parameters by name.
    pub vars: &'a [(String, Var)],
    /// This micro-batch's share of the window's targets; a per-step term (a weight penalty)
    /// multiplied by it adds up to exactly once per optimizer step.
    pub window_fraction: f64,
}

/// An extra loss term added to the task loss before backward (RegLoRA's penalty, DPO's
/// alignment NLL, ...). Returning `None` adds nothing for this micro-batch.
pub trait LossHook {
    /// Name used in logs and step reports.
    fn name(&self) -> &str;
    /// The term for this micro-batch: a scalar tensor attached to the graph, already weighted.
    fn term(&mut self, ctx: &HookCtx<'_>) -> Result<Option<Tensor>, TrainError>;
}

/// A micro-batch's loss: what to backpropagate and what to report.
#[derive(Debug)]
pub struct MicroLoss {
    /// Scalar to call `backward` on (task contribution + hook terms).
    pub total: Tensor,
    /// This micro-batch's contribution to the step's mean task loss (`sum(nll) / window`).
    pub task: f64,
    /// Hook contributions by name.
    pub extras: Vec<(String, f64)>,
}

/// The supervised fine-tuning loss of one micro-batch: masked CE normalized by the window's
/// target count, plus every hook's term.
pub fn sft_micro_loss(
    logits: &Tensor,
    labels: &Tensor,
    window_targets: usize,
    hooks: &mut [Box<dyn LossHook>],
    step: u64,
    micro: usize,
    vars: &[(String, Var)],
) -> Result<MicroLoss, TrainError> {
    if window_targets == 0 {
        return Err(TrainError::Data(
            "accumulation window has no labelled targets".into(),
        ));
    }
    let (sum, n) = shifted_nll_sum(logits, labels)?;
    let mut total = (sum / window_targets as f64)?;
    let task = total.to_scalar::<f32>()? as f64;
    let ctx = HookCtx {
        step,
        micro,
        logits,
        labels,
        vars,
        window_fraction: n as f64 / window_targets as f64,
    };
    let mut extras = Vec::new();
    for hook in hooks.iter_mut() {
        if let Some(term) = hook.term(&ctx)? {
            let term = term.to_dtype(DType::F32)?;
            extras.push((hook.name().to_string(), term.to_scalar::<f32>()? as f64));
            total = (total + term)?;
        }
    }
    Ok(MicroLoss {
        total,
        task,
        extras,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits() -> Tensor {
        // b=2, s=3, v=4
        Tensor::new(
            &[
                [
                    [1.0f32, 2.0, 0.5, -1.0],
                    [0.0, 0.0, 3.0, 1.0],
                    [2.0, 1.0, 0.0, 0.0],
                ],
                [
                    [0.3, -0.2, 0.1, 0.9],
                    [1.5, 0.5, -0.5, 0.0],
                    [0.0, 4.0, 0.0, 1.0],
                ],
            ],
            &Device::Cpu,
        )
        .unwrap()
    }

    fn nll(row: &[f64], target: usize) -> f64 {
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        lse - row[target]
    }

    #[test]
    fn masked_ce_shifts_and_skips_ignored() {
        let labels = Tensor::new(&[[-100i64, 2, -100], [-100, 3, 1]], &Device::Cpu).unwrap();
        let loss: f32 = masked_cross_entropy(&logits(), &labels)
            .unwrap()
            .to_scalar()
            .unwrap();
        // Targets: row 0 position 0 -> 2; row 1 positions 0 -> 3 and 1 -> 1.
        let want = (nll(&[1.0, 2.0, 0.5, -1.0], 2)
            + nll(&[0.3, -0.2, 0.1, 0.9], 3)
            + nll(&[1.5, 0.5, -0.5, 0.0], 1))
            / 3.0;
        assert!((f64::from(loss) - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn gradient_flows_only_to_labelled_positions() {
        let x = Var::from_tensor(&logits()).unwrap();
        let labels = Tensor::new(&[[-100i64, 2, -100], [-100, -100, -100]], &Device::Cpu).unwrap();
        let loss = masked_cross_entropy(x.as_tensor(), &labels).unwrap();
        let g = loss.backward().unwrap();
        let g: Vec<Vec<Vec<f32>>> = g.get(x.as_tensor()).unwrap().to_vec3().unwrap();
        // d(nll)/d(logit) = softmax - onehot at (0, 0); zero elsewhere.
        let row = [1.0f64, 2.0, 0.5, -1.0];
        let z: f64 = row.iter().map(|v| v.exp()).sum();
        for k in 0..4 {
            let want = row[k].exp() / z - if k == 2 { 1.0 } else { 0.0 };
            assert!((f64::from(g[0][0][k]) - want).abs() < 1e-6);
        }
        assert!(
            g[0][1]
                .iter()
                .chain(&g[1][0])
                .chain(&g[1][2])
                .all(|&v| v == 0.0)
        );
    }

    #[test]
    fn accumulated_halves_equal_the_full_batch_mean() {
        let full = Tensor::new(&[[-100i64, 2, 0], [-100, 3, 1]], &Device::Cpu).unwrap();
        let want: f32 = masked_cross_entropy(&logits(), &full)
            .unwrap()
            .to_scalar()
            .unwrap();
        let mut got = 0.0;
        for row in 0..2 {
            let lg = logits().narrow(0, row, 1).unwrap();
            let lb = full.narrow(0, row, 1).unwrap();
            got += sft_micro_loss(&lg, &lb, 4, &mut [], 0, row, &[])
                .unwrap()
                .task;
        }
        assert!((got - f64::from(want)).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn sequence_logprobs_sum_per_row() {
        let labels = Tensor::new(&[[-100i64, 2, 0], [-100, -100, -100]], &Device::Cpu).unwrap();
        let lp: Vec<f32> = sequence_logprobs(&logits(), &labels)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want0 = -(nll(&[1.0, 2.0, 0.5, -1.0], 2) + nll(&[0.0, 0.0, 3.0, 1.0], 0));
        assert!((f64::from(lp[0]) - want0).abs() < 1e-5, "{lp:?}");
        assert_eq!(lp[1], 0.0);
    }

    struct Penalty;
    impl LossHook for Penalty {
        fn name(&self) -> &str {
            "l2"
        }
        fn term(&mut self, ctx: &HookCtx<'_>) -> Result<Option<Tensor>, TrainError> {
            let (_, w) = &ctx.vars[0];
            Ok(Some(
                (w.as_tensor().sqr()?.sum_all()? * ctx.window_fraction)?,
            ))
        }
    }

    #[test]
    fn hooks_add_terms_and_bad_labels_are_errors() {
        let w = Var::new(&[2.0f32], &Device::Cpu).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let labels = Tensor::new(&[[-100i64, 2, 0], [-100, 3, 1]], &Device::Cpu).unwrap();
        let mut hooks: Vec<Box<dyn LossHook>> = vec![Box::new(Penalty)];
        let out = sft_micro_loss(&logits(), &labels, 4, &mut hooks, 0, 0, &vars).unwrap();
        assert_eq!(out.extras, [("l2".to_string(), 4.0)]);
        let total: f32 = out.total.to_scalar().unwrap();
        assert!((f64::from(total) - out.task - 4.0).abs() < 1e-5);
        let g = out.total.backward().unwrap();
        let gw: Vec<f32> = g.get(w.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((gw[0] - 4.0).abs() < 1e-6, "d(w^2)/dw = 2w = 4");
        let bad = Tensor::new(&[[-100i64, 7, 0], [-100, 3, 1]], &Device::Cpu).unwrap();
        let err = masked_cross_entropy(&logits(), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 7") && err.contains("row 0"), "{err}");
    }
}

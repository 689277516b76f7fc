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

/// [`shifted_nll_sum`] from final hidden states `hidden` `[b, s, d]` and the LM head
/// `lm_head` (row-wise, `[n, d] -> [n, vocab]`): the head runs only at the `n` labelled
/// rows, gathered before it. The head is applied row by row either way, so the sum equals
/// applying it to every position first (up to GEMM rounding); for LLaVA, where most
/// positions are image and prompt tokens, it skips most of the LM-head GEMMs and the
/// log-softmax work, forward and backward.
pub fn shifted_nll_sum_hidden(
    hidden: &Tensor,
    labels: &Tensor,
    vocab: usize,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor, TrainError>,
) -> Result<(Tensor, usize), TrainError> {
    let (b, s, d) = hidden.dims3()?;
    if labels.dims() != [b, s] {
        return Err(TrainError::Data(format!(
            "labels have shape {:?} but hidden states are {:?}",
            labels.dims(),
            hidden.dims()
        )));
    }
    let targets = shifted_targets(labels, vocab)?;
    if targets.is_empty() {
        let zero = hidden.sum_all()?.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
        return Ok((zero, 0));
    }
    let dev = hidden.device();
    let rows = Tensor::from_iter(targets.iter().map(|t| t.0), dev)?;
    let ids = Tensor::from_iter(targets.iter().map(|t| t.1), dev)?.unsqueeze(1)?;
    let picked = hidden
        .narrow(1, 0, s - 1)?
        .reshape((b * (s - 1), d))?
        .index_select(&rows, 0)?;
    let logits = lm_head(&picked)?;
    if logits.dims() != [targets.len(), vocab] {
        return Err(TrainError::Data(format!(
            "LM head returned {:?} for {} rows, expected vocabulary {vocab}",
            logits.dims(),
            targets.len()
        )));
    }
    let logp = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?.gather(&ids, 1)?;
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

/// [`sft_micro_loss`] from final hidden states and the LM head. Without hooks, the head
/// runs only at the labelled positions ([`shifted_nll_sum_hidden`]); hooks see the full
/// logits, so with any hook the head runs everywhere and this is exactly
/// [`sft_micro_loss`].
#[allow(clippy::too_many_arguments)]
pub fn sft_micro_loss_hidden(
    hidden: &Tensor,
    lm_head: &dyn Fn(&Tensor) -> Result<Tensor, TrainError>,
    vocab: usize,
    labels: &Tensor,
    window_targets: usize,
    hooks: &mut [Box<dyn LossHook>],
    step: u64,
    micro: usize,
    vars: &[(String, Var)],
) -> Result<MicroLoss, TrainError> {
    if !hooks.is_empty() {
        let logits = lm_head(hidden)?;
        return sft_micro_loss(&logits, labels, window_targets, hooks, step, micro, vars);
    }
    if window_targets == 0 {
        return Err(TrainError::Data(
            "accumulation window has no labelled targets".into(),
        ));
    }
    let (sum, _) = shifted_nll_sum_hidden(hidden, labels, vocab, lm_head)?;
    let total = (sum / window_targets as f64)?;
    let task = total.to_scalar::<f32>()? as f64;
    Ok(MicroLoss {
        total,
        task,
        extras: Vec::new(),
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
    fn hidden_path_matches_full_logits_in_value_and_gradient() {
        let dev = Device::Cpu;
        // b=2, s=4, d=3, vocab=5; the head is a trainable [5, 3] matrix.
        let hv: Vec<f32> = (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let hidden = Var::from_tensor(&Tensor::from_vec(hv, (2, 4, 3), &dev).unwrap()).unwrap();
        let wv: Vec<f32> = (0..15).map(|i| ((i * 5 % 7) as f32 - 3.0) / 3.0).collect();
        let w = Var::from_tensor(&Tensor::from_vec(wv, (5, 3), &dev).unwrap()).unwrap();
        let head = |x: &Tensor| -> Result<Tensor, TrainError> {
            Ok(x.broadcast_matmul(&w.as_tensor().t()?)?)
        };
        let labels = Tensor::new(&[[-100i64, 2, -100, 4], [-100, -100, 1, 0]], &dev).unwrap();
        let (fast, n) = shifted_nll_sum_hidden(hidden.as_tensor(), &labels, 5, &head).unwrap();
        let (full, m) = shifted_nll_sum(&head(hidden.as_tensor()).unwrap(), &labels).unwrap();
        assert_eq!((n, m), (4, 4));
        let (a, b): (f32, f32) = (fast.to_scalar().unwrap(), full.to_scalar().unwrap());
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} vs {b}");
        let (ga, gb) = (fast.backward().unwrap(), full.backward().unwrap());
        for v in [&hidden, &w] {
            let x = ga.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let y = gb.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            for (x, y) in x
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(y.to_vec1::<f32>().unwrap())
            {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        // No hooks: the micro loss agrees with the logits path; a bad label is still caught.
        let mut hooks: Vec<Box<dyn LossHook>> = Vec::new();
        let ml = sft_micro_loss_hidden(
            hidden.as_tensor(),
            &head,
            5,
            &labels,
            8,
            &mut hooks,
            0,
            0,
            &[],
        )
        .unwrap();
        let logits = head(hidden.as_tensor()).unwrap();
        let want = sft_micro_loss(&logits, &labels, 8, &mut hooks, 0, 0, &[]).unwrap();
        assert!((ml.task - want.task).abs() <= 1e-6 * want.task.abs());
        let bad = Tensor::new(&[[-100i64, 9, -100, 4], [-100, -100, 1, 0]], &dev).unwrap();
        assert!(shifted_nll_sum_hidden(hidden.as_tensor(), &bad, 5, &head).is_err());
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

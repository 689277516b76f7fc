//! RegLoRA (SEFE §1.4): key-element selection after a task and the L1 penalty during the next.
//!
//! After task `t-1`, every regularized matrix `m` (a language-model linear carrying a LoRA pair
//! `A: [r, in]`, `B: [out, r]`) contributes the positions of the top `M %` entries of the raw
//! update `|ΔW| = |B·A|` (no `α/r` scaling), `k = floor(M/100 · out · in)` of them. The index
//! sets of all earlier tasks are *concatenated* (duplicates kept, so a position important for
//! several tasks weighs more). While training task `t` with a fresh pair, the loss adds
//!
//! `λ · (1/#matrices) · Σ_m mean_{(r,c) ∈ R(m)} |(B_t·A_t)[r,c]|`.
//!
//! Only the selected entries of `B·A` are formed (a `[K, r]` row gather of `B` times a column
//! gather of `A`), never the full product, so the penalty costs `O(K·r)` per matrix.
//!
//! On disk a key-element set is one safetensors file mapping the module's PEFT prefix
//! (`base_model.model.model.language_model.layers.0.self_attn.q_proj`) to an `I64 [K, 2]` tensor
//! of `(row, col)`; [`KeyElements::load`] / [`KeyElements::save`].

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use super::TrainError;
use super::loss::{HookCtx, LossHook};

/// Suffix of LoRA down-projection names.
const A_SUFFIX: &str = ".lora_A.weight";
/// Suffix of LoRA up-projection names.
const B_SUFFIX: &str = ".lora_B.weight";

/// Whether a trainable LoRA factor belongs to a regularized matrix (the language model's
/// decoder linears; projector and vision tower are never regularized).
fn regularized(module: &str) -> bool {
    module.contains(".language_model.layers.")
}

/// The regularized LoRA pairs among `vars`: module prefix -> (A, B), sorted by name.
///
/// # Errors
/// A module with only one of its two factors.
pub fn lora_pairs(vars: &[(String, Var)]) -> Result<BTreeMap<String, (Var, Var)>, TrainError> {
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for (name, v) in vars {
        if let Some(m) = name.strip_suffix(A_SUFFIX) {
            a.insert(m.to_string(), v.clone());
        } else if let Some(m) = name.strip_suffix(B_SUFFIX) {
            b.insert(m.to_string(), v.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (m, va) in a {
        let vb = b.remove(&m).ok_or_else(|| {
            TrainError::Config(format!("LoRA module `{m}` has lora_A but no lora_B"))
        })?;
        if regularized(&m) {
            out.insert(m, (va, vb));
        }
    }
    if let Some(m) = b.keys().next() {
        return Err(TrainError::Config(format!(
            "LoRA module `{m}` has lora_B but no lora_A"
        )));
    }
    Ok(out)
}

/// Top `top_percent` % entries of `|delta|` (`[out, in]`) as `(row, col)`, most important
/// first; ties broken by position so the selection is deterministic. `k = floor(p/100·out·in)`.
///
/// # Errors
/// A non-2D tensor or a percentage outside `0..=100`.
pub fn top_entries(delta: &Tensor, top_percent: f64) -> Result<Vec<[i64; 2]>, TrainError> {
    if !(0.0..=100.0).contains(&top_percent) {
        return Err(TrainError::Config(format!(
            "reglora top_percent {top_percent} is outside 0..=100"
        )));
    }
    let (rows, cols) = delta.dims2()?;
    let n = rows * cols;
    // Same arithmetic as Python's int(0.02 * out * in) for M = 2.
    let k = ((top_percent / 100.0) * n as f64).floor() as usize;
    let k = k.min(n);
    if k == 0 {
        return Ok(Vec::new());
    }
    let vals: Vec<f32> = delta
        .to_dtype(DType::F32)?
        .flatten_all()?
        .abs()?
        .to_vec1()?;
    let mut idx: Vec<usize> = (0..n).collect();
    let order = |x: &usize, y: &usize| vals[*y].total_cmp(&vals[*x]).then(x.cmp(y));
    if k < n {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    Ok(idx
        .into_iter()
        .map(|i| [(i / cols) as i64, (i % cols) as i64])
        .collect())
}

/// Accumulated key elements: module prefix -> `(row, col)` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyElements {
    /// Indices per module, in accumulation order (newest task first).
    pub sets: BTreeMap<String, Vec<[i64; 2]>>,
}

impl KeyElements {
    /// The key elements of one finished task: the top entries of `B·A` of every regularized
    /// pair in `vars`.
    ///
    /// # Errors
    /// Unpaired factors, a bad percentage, tensor errors.
    pub fn select(vars: &[(String, Var)], top_percent: f64) -> Result<Self, TrainError> {
        let mut sets = BTreeMap::new();
        for (m, (a, b)) in lora_pairs(vars)? {
            let delta = b
                .as_tensor()
                .to_dtype(DType::F32)?
                .matmul(&a.as_tensor().to_dtype(DType::F32)?)?;
            sets.insert(m, top_entries(&delta, top_percent)?);
        }
        Ok(Self { sets })
    }

    /// Concatenate `older` after `self` (no de-duplication).
    #[must_use]
    pub fn accumulate(mut self, older: &KeyElements) -> Self {
        for (m, v) in &older.sets {
            self.sets.entry(m.clone()).or_default().extend_from_slice(v);
        }
        self
    }

    /// Total index count.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sets.values().map(Vec::len).sum()
    }

    /// Whether there are no indices at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write as safetensors (`module -> I64 [K, 2]`; empty sets are skipped).
    ///
    /// # Errors
    /// I/O or tensor errors.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut map = std::collections::HashMap::new();
        for (m, v) in &self.sets {
            if v.is_empty() {
                continue;
            }
            let flat: Vec<i64> = v.iter().flatten().copied().collect();
            map.insert(
                m.clone(),
                Tensor::from_vec(flat, (v.len(), 2), &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Read a file written by [`KeyElements::save`].
    ///
    /// # Errors
    /// A missing or malformed file, a tensor that is not `[K, 2]` integers.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let bad = |msg: String| TrainError::Data(format!("{}: {msg}", path.display()));
        let map = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad(format!("not a key-element file: {e}")))?;
        let mut sets = BTreeMap::new();
        for (m, t) in map {
            if t.rank() != 2 || t.dim(1)? != 2 || !t.dtype().is_int() {
                return Err(bad(format!(
                    "tensor `{m}` must be integer [K, 2], got {:?} {:?}",
                    t.dtype(),
                    t.dims()
                )));
            }
            let rows: Vec<Vec<i64>> = t.to_dtype(DType::I64)?.to_vec2()?;
            sets.insert(m, rows.into_iter().map(|r| [r[0], r[1]]).collect());
        }
        Ok(Self { sets })
    }
}

/// The RegLoRA loss hook: `λ · mean over matrices of mean |(B·A)[r,c]|` at the key elements.
pub struct RegLoraPenalty {
    lambda: f64,
    /// module -> (A var, B var, row index tensor, col index tensor), modules with indices only.
    terms: Vec<(Var, Var, Tensor, Tensor)>,
}

impl RegLoraPenalty {
    /// Binds `keys` to the trainable LoRA pairs in `vars`.
    ///
    /// # Errors
    /// A module of `keys` that has no trainable pair, an index outside its matrix.
    pub fn new(
        keys: &KeyElements,
        vars: &[(String, Var)],
        lambda: f64,
    ) -> Result<Self, TrainError> {
        let pairs = lora_pairs(vars)?;
        let mut terms = Vec::new();
        for (m, idx) in &keys.sets {
            if idx.is_empty() {
                continue;
            }
            let (a, b) = pairs.get(m).ok_or_else(|| {
                TrainError::Config(format!(
                    "key elements name `{m}`, which has no trainable LoRA pair (different target modules?)"
                ))
            })?;
            let (out, inp) = (b.as_tensor().dim(0)?, a.as_tensor().dim(1)?);
            if let Some(p) = idx
                .iter()
                .find(|p| p[0] < 0 || p[1] < 0 || p[0] as usize >= out || p[1] as usize >= inp)
            {
                return Err(TrainError::Data(format!(
                    "key element {p:?} of `{m}` is outside its [{out}, {inp}] update"
                )));
            }
            let dev = a.as_tensor().device();
            let rows = Tensor::from_iter(idx.iter().map(|p| p[0] as u32), dev)?;
            let cols = Tensor::from_iter(idx.iter().map(|p| p[1] as u32), dev)?;
            terms.push((a.clone(), b.clone(), rows, cols));
        }
        Ok(Self { lambda, terms })
    }

    /// Number of regularized matrices (the normalizer).
    #[must_use]
    pub fn matrices(&self) -> usize {
        self.terms.len()
    }

    /// `(1/#matrices) Σ_m mean |(B·A)[R(m)]|`, unweighted, attached to the graph.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn raw(&self) -> Result<Option<Tensor>, TrainError> {
        let mut sum: Option<Tensor> = None;
        for (a, b, rows, cols) in &self.terms {
            let b_rows = b.as_tensor().index_select(rows, 0)?; // [K, r]
            let a_cols = a.as_tensor().index_select(cols, 1)?.t()?; // [K, r]
            let entries = (b_rows * a_cols)?.sum(1)?.to_dtype(DType::F32)?;
            let term = entries.abs()?.mean_all()?;
            sum = Some(match sum {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        Ok(match sum {
            Some(s) => Some((s / self.terms.len() as f64)?),
            None => None,
        })
    }
}

impl LossHook for RegLoraPenalty {
    fn name(&self) -> &str {
        "reglora"
    }

    fn term(&mut self, ctx: &HookCtx<'_>) -> Result<Option<Tensor>, TrainError> {
        // A per-step weight penalty: scaled by the micro-batch's share of the window so the
        // accumulated step sees it exactly once.
        Ok(match self.raw()? {
            Some(r) => Some((r * (self.lambda * ctx.window_fraction))?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(data: &[f32], shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn vars() -> Vec<(String, Var)> {
        let m = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
        // A [2, 3], B [2, 2]: B·A = [[1, 2, 3], [-4, -5, -6]] with B = I.. scaled below.
        vec![
            (
                format!("{m}{A_SUFFIX}"),
                var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3)),
            ),
            (
                format!("{m}{B_SUFFIX}"),
                var(&[1.0, 0.0, 0.0, -1.0], (2, 2)),
            ),
            (
                "multi_modal_projector.linear_1.weight".into(),
                var(&[1.0], (1, 1)),
            ),
        ]
    }

    #[test]
    fn top_entries_counts_and_orders() {
        // |ΔW| = [[1, 2, 3], [4, 5, 6]]; 50 % of 6 -> 3 entries: 6, 5, 4.
        let d = Tensor::from_slice(&[1f32, 2., 3., -4., -5., -6.], (2, 3), &Device::Cpu).unwrap();
        assert_eq!(top_entries(&d, 50.0).unwrap(), [[1, 2], [1, 1], [1, 0]]);
        // int(0.02 * 6) = 0.
        assert!(top_entries(&d, 2.0).unwrap().is_empty());
        // int(0.02 * 50 * 100) = 100 on a bigger matrix, in decreasing |value|.
        let v: Vec<f32> = (0..5000).map(|i| ((i * 7919) % 5000) as f32).collect();
        let d = Tensor::from_vec(v.clone(), (50, 100), &Device::Cpu).unwrap();
        let top = top_entries(&d, 2.0).unwrap();
        assert_eq!(top.len(), 100);
        let val = |p: &[i64; 2]| v[p[0] as usize * 100 + p[1] as usize];
        assert_eq!(val(&top[0]), 4999.0);
        assert_eq!(val(&top[99]), 4900.0);
        assert!(top.windows(2).all(|w| val(&w[0]) > val(&w[1])));
        assert!(top_entries(&d, 101.0).is_err());
    }

    #[test]
    fn select_skips_the_projector_and_accumulate_concatenates() {
        let ke = KeyElements::select(&vars(), 50.0).unwrap();
        assert_eq!(ke.sets.len(), 1);
        let (m, idx) = ke.sets.iter().next().unwrap();
        assert!(m.ends_with("q_proj"));
        // B·A = [[1, 2, 3], [-4, -5, -6]] -> top 3 by |.|: (1,2), (1,1), (1,0).
        assert_eq!(idx, &[[1, 2], [1, 1], [1, 0]]);
        let older = KeyElements {
            sets: [(m.clone(), vec![[1, 2], [0, 0]])].into(),
        };
        let acc = ke.clone().accumulate(&older);
        assert_eq!(acc.sets[m], [[1, 2], [1, 1], [1, 0], [1, 2], [0, 0]]);
        assert_eq!(acc.len(), 5);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.safetensors");
        acc.save(&p).unwrap();
        assert_eq!(KeyElements::load(&p).unwrap(), acc);
    }

    #[test]
    fn penalty_matches_a_hand_computed_value_and_has_gradients() {
        let vars = vars();
        let m = "base_model.model.model.language_model.layers.0.self_attn.q_proj".to_string();
        // Duplicates count twice: |(1,2)| = 6 twice, |(0,0)| = 1 -> mean (6+6+1)/3.
        let keys = KeyElements {
            sets: [(m, vec![[1, 2], [1, 2], [0, 0]])].into(),
        };
        let mut hook = RegLoraPenalty::new(&keys, &vars, 10.0).unwrap();
        assert_eq!(hook.matrices(), 1);
        let raw: f32 = hook.raw().unwrap().unwrap().to_scalar().unwrap();
        assert!((raw - 13.0 / 3.0).abs() < 1e-6, "{raw}");
        let logits = Tensor::zeros((1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let labels = Tensor::zeros((1, 1), DType::I64, &Device::Cpu).unwrap();
        let ctx = HookCtx {
            step: 0,
            micro: 0,
            logits: &logits,
            labels: &labels,
            vars: &vars,
            window_fraction: 0.5,
        };
        let t = hook.term(&ctx).unwrap().unwrap();
        let v: f32 = t.to_scalar().unwrap();
        assert!((v - 10.0 * 0.5 * 13.0 / 3.0).abs() < 1e-4, "{v}");
        // d/dB[1,1] of |ΔW[1,2]| (twice) / 3 * 5: ΔW[1,2] = B[1,0]A[0,2] + B[1,1]A[1,2] = -6,
        // so the gradient is 5 * 2/3 * sign(-6) * A[1,2] = -20.
        let g = t.backward().unwrap();
        let gb: Vec<Vec<f32>> = g.get(vars[1].1.as_tensor()).unwrap().to_vec2().unwrap();
        assert!((gb[1][1] + 20.0).abs() < 1e-4, "{gb:?}");
        let bad = KeyElements {
            sets: [(
                "base_model.model.model.language_model.layers.0.self_attn.q_proj".into(),
                vec![[2, 0]],
            )]
            .into(),
        };
        assert!(RegLoraPenalty::new(&bad, &vars, 1.0).is_err());
    }

    #[test]
    fn penalty_normalizes_by_matrix_count() {
        let mut vars = vars();
        let m2 = "base_model.model.model.language_model.layers.1.mlp.up_proj";
        vars.push((format!("{m2}{A_SUFFIX}"), var(&[2.0, 0.0], (1, 2))));
        vars.push((format!("{m2}{B_SUFFIX}"), var(&[3.0], (1, 1))));
        let m1 = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
        let keys = KeyElements {
            sets: [
                (m1.to_string(), vec![[0, 0]]),
                (m2.to_string(), vec![[0, 0], [0, 1]]),
            ]
            .into(),
        };
        let hook = RegLoraPenalty::new(&keys, &vars, 1.0).unwrap();
        // m1: |1| = 1; m2: ΔW = [[6, 0]] -> mean(6, 0) = 3; (1 + 3) / 2 = 2.
        let raw: f32 = hook.raw().unwrap().unwrap().to_scalar().unwrap();
        assert!((raw - 2.0).abs() < 1e-6, "{raw}");
    }
}

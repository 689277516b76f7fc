//! AdamW with parameter groups, and gradient clipping by global norm.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path, `amsgrad=False`), op for op,
//! so a parity test against torch holds to float rounding:
//!
//! ```text
//! p ← p · (1 − lr·wd)                      decoupled weight decay, before the moments
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! ```
//!
//! The moments are kept in f32 whatever the parameter dtype (a half-precision second moment
//! underflows), and live in the optimizer keyed by parameter name so a checkpoint can store them
//! by name and a resumed run can find them again even if the variable order changes.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, backprop::GradStore};

use super::TrainError;

/// Adam hyper-parameters shared by all groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1 (first-moment decay).
    pub beta1: f64,
    /// β2 (second-moment decay).
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's and HF Trainer's defaults: (0.9, 0.999), 1e-8.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A set of parameters sharing a learning rate and weight decay (e.g. projector vs LoRA).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Group name, for logs (`projector`, `lora`).
    pub name: String,
    /// Peak learning rate; the schedule multiplies it.
    pub lr: f64,
    /// Decoupled weight decay coefficient.
    pub weight_decay: f64,
    /// The parameters, by their model name.
    pub vars: Vec<(String, Var)>,
}

/// Gradients gathered by parameter name (after accumulation).
pub type Grads = BTreeMap<String, Tensor>;

/// AdamW over parameter groups.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    /// First and second moments by parameter name (f32).
    moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Number of updates taken (PyTorch's per-parameter `step`; equal for all parameters here).
    step: u64,
}

impl AdamW {
    /// A fresh optimizer (zero moments, step 0). Parameter names must be unique.
    pub fn new(cfg: AdamWConfig, groups: Vec<ParamGroup>) -> Result<Self, TrainError> {
        let mut moments = BTreeMap::new();
        for g in &groups {
            for (name, var) in &g.vars {
                let zeros = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                if moments
                    .insert(name.clone(), (zeros.clone(), zeros))
                    .is_some()
                {
                    return Err(TrainError::Config(format!(
                        "parameter `{name}` appears twice in the optimizer groups"
                    )));
                }
            }
        }
        Ok(Self {
            cfg,
            groups,
            moments,
            step: 0,
        })
    }

    /// The groups (their vars are shared with the model).
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// All parameters, in group order.
    pub fn vars(&self) -> impl Iterator<Item = &(String, Var)> {
        self.groups.iter().flat_map(|g| g.vars.iter())
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Moments by parameter name, for checkpoints.
    pub fn moments(&self) -> &BTreeMap<String, (Tensor, Tensor)> {
        &self.moments
    }

    /// Restores moments and the step counter from a checkpoint; every parameter must be present
    /// with its shape.
    pub fn restore(
        &mut self,
        step: u64,
        mut moments: BTreeMap<String, (Tensor, Tensor)>,
    ) -> Result<(), TrainError> {
        for (name, (m, _)) in &self.moments {
            match moments.get(name) {
                Some((m2, v2)) if m2.dims() == m.dims() && v2.dims() == m.dims() => {}
                Some((m2, _)) => {
                    return Err(TrainError::Checkpoint(format!(
                        "optimizer moment for `{name}` has shape {:?}, the parameter has {:?}",
                        m2.dims(),
                        m.dims()
                    )));
                }
                None => {
                    return Err(TrainError::Checkpoint(format!(
                        "optimizer state has no moments for parameter `{name}`"
                    )));
                }
            }
        }
        moments.retain(|k, _| self.moments.contains_key(k));
        self.moments = moments;
        self.step = step;
        Ok(())
    }

    /// Collects each parameter's gradient from a backward pass. A parameter the loss does not
    /// reach is an error: it means the graph was cut (e.g. by a fused op without backward) and
    /// training would silently leave it frozen.
    pub fn collect_grads(&self, store: &GradStore) -> Result<Grads, TrainError> {
        let mut out = Grads::new();
        for (name, var) in self.vars() {
            let g = store
                .get(var.as_tensor())
                .ok_or_else(|| TrainError::NoGradient(name.clone()))?;
            // Detached: a gradient computed by backward carries the op graph that made it
            // (and through it this step's activations); kept in the moments, it would chain
            // every step's graph to the next and memory would grow without bound.
            out.insert(name.clone(), g.detach().to_dtype(DType::F32)?);
        }
        Ok(out)
    }

    /// One AdamW update with every group's lr multiplied by `lr_scale` (the schedule's factor).
    pub fn step(&mut self, grads: &Grads, lr_scale: f64) -> Result<(), TrainError> {
        self.step += 1;
        let t = self.step as i32;
        let AdamWConfig { beta1, beta2, eps } = self.cfg;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            for (name, var) in &group.vars {
                let g = grads
                    .get(name)
                    .ok_or_else(|| TrainError::NoGradient(name.clone()))?;
                let (m, v) = &self.moments[name];
                let mut p = var.as_tensor().detach().to_dtype(DType::F32)?;
                if group.weight_decay != 0.0 {
                    p = p.affine(1.0 - lr * group.weight_decay, 0.0)?;
                }
                let g = g.detach();
                let m = ((m * beta1)? + (&g * (1.0 - beta1))?)?.detach();
                let v = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?.detach();
                let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
                let p = (p - (m.div(&denom)? * (lr / bc1))?)?;
                var.set(&p.to_dtype(var.dtype())?)?;
                self.moments.insert(name.clone(), (m, v));
            }
        }
        Ok(())
    }
}

/// L2 norm over all gradients together (`torch.nn.utils.clip_grad_norm_`'s total norm).
pub fn global_grad_norm(grads: &Grads) -> Result<f64, TrainError> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm`, as `clip_grad_norm_` does
/// (coefficient `max_norm / (norm + 1e-6)`, clamped to 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64, TrainError> {
    let norm = global_grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.to_vec1().unwrap()
    }

    /// Scalar AdamW written out in f64, the textbook formula, for comparison.
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            p -= lr / (1.0 - b1.powi(t)) * m / ((v / (1.0 - b2.powi(t))).sqrt() + eps);
        }
        p
    }

    #[test]
    fn adamw_matches_the_torch_formula_with_groups() {
        let a = var(&[0.5, -1.0]);
        let b = var(&[2.0]);
        let groups = vec![
            ParamGroup {
                name: "lora".into(),
                lr: 1e-2,
                weight_decay: 0.0,
                vars: vec![("a".into(), a.clone())],
            },
            ParamGroup {
                name: "proj".into(),
                lr: 3e-2,
                weight_decay: 0.1,
                vars: vec![("b".into(), b.clone())],
            },
        ];
        let mut opt = AdamW::new(AdamWConfig::default(), groups).unwrap();
        let ga = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.05]];
        let gb = [1.5, -0.7, 0.2];
        for s in 0..3 {
            let mut grads = Grads::new();
            grads.insert(
                "a".into(),
                Tensor::new(&[ga[s][0] as f32, ga[s][1] as f32], &Device::Cpu).unwrap(),
            );
            grads.insert(
                "b".into(),
                Tensor::new(&[gb[s] as f32], &Device::Cpu).unwrap(),
            );
            opt.step(&grads, 1.0).unwrap();
        }
        assert_eq!(opt.step_count(), 3);
        let want_a0 = reference(0.5, &[0.3, 0.1, -0.5], 1e-2, 0.0);
        let want_a1 = reference(-1.0, &[-0.2, 0.4, 0.05], 1e-2, 0.0);
        let want_b = reference(2.0, &gb, 3e-2, 0.1);
        let (got_a, got_b) = (vals(a.as_tensor()), vals(b.as_tensor()));
        assert!(
            (f64::from(got_a[0]) - want_a0).abs() < 1e-6,
            "{got_a:?} vs {want_a0}"
        );
        assert!(
            (f64::from(got_a[1]) - want_a1).abs() < 1e-6,
            "{got_a:?} vs {want_a1}"
        );
        assert!(
            (f64::from(got_b[0]) - want_b).abs() < 1e-6,
            "{got_b:?} vs {want_b}"
        );
        // Weight decay really acted on the `proj` group only: without it b would differ.
        assert!((reference(2.0, &gb, 3e-2, 0.0) - want_b).abs() > 1e-4);
    }

    #[test]
    fn first_step_moves_each_weight_by_lr() {
        // Bias correction makes the first update exactly lr·sign(g) (up to ε).
        let a = var(&[1.0, 1.0]);
        let groups = vec![ParamGroup {
            name: "g".into(),
            lr: 0.1,
            weight_decay: 0.0,
            vars: vec![("a".into(), a.clone())],
        }];
        let mut opt = AdamW::new(AdamWConfig::default(), groups).unwrap();
        let grads = Grads::from([(
            "a".to_string(),
            Tensor::new(&[3.0f32, -0.001], &Device::Cpu).unwrap(),
        )]);
        opt.step(&grads, 0.5).unwrap();
        let got = vals(a.as_tensor());
        assert!(
            (got[0] - 0.95).abs() < 1e-6 && (got[1] - 1.05).abs() < 1e-5,
            "{got:?}"
        );
    }

    #[test]
    fn clipping_scales_to_max_norm_like_torch() {
        let mut grads = Grads::from([
            (
                "x".to_string(),
                Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap(),
            ),
            (
                "y".to_string(),
                Tensor::new(&[4.0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12);
        let after = global_grad_norm(&grads).unwrap();
        assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{after}");
        assert!((vals(&grads["y"])[0] - 0.8).abs() < 1e-6);
        // Below the threshold nothing changes.
        let norm = clip_grad_norm(&mut grads, 10.0).unwrap();
        assert!((norm - after).abs() < 1e-9);
        assert!((vals(&grads["x"])[0] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn duplicate_params_and_missing_moments_are_errors() {
        let a = var(&[1.0]);
        let g = |n: &str| ParamGroup {
            name: n.into(),
            lr: 0.1,
            weight_decay: 0.0,
            vars: vec![("a".into(), a.clone())],
        };
        assert!(matches!(
            AdamW::new(AdamWConfig::default(), vec![g("x"), g("y")]),
            Err(TrainError::Config(_))
        ));
        let mut opt = AdamW::new(AdamWConfig::default(), vec![g("x")]).unwrap();
        let err = opt.restore(3, BTreeMap::new()).unwrap_err().to_string();
        assert!(err.contains("`a`"), "{err}");
    }
}

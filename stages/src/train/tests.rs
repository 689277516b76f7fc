//! Loop-level tests on a toy language model (embedding → dropout → two linear maps), small
//! enough to train many steps in milliseconds: gradient accumulation equivalence, checkpoint
//! resume bit-identity, per-group learning rates and the no-gradient guard.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::model::chat::IGNORE_INDEX;

const V: usize = 11;
const DIM: usize = 6;

/// Toy LM: logits = dropout(emb[ids]) @ w1 @ w2 ; w2 is the "LoRA" group.
struct Toy {
    emb: Tensor,
    data: Vec<(Vec<u32>, Vec<i64>)>,
    dropout: bool,
    /// Use only the first var (to provoke the no-gradient error).
    skip_w2: bool,
}

fn params(seed: u64) -> (Var, Var) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut r = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(-0.5f32..0.5))
            .collect::<Vec<_>>()
    };
    let w1 = Var::from_tensor(&Tensor::from_vec(r(DIM * DIM), (DIM, DIM), &Device::Cpu).unwrap())
        .unwrap();
    let w2 =
        Var::from_tensor(&Tensor::from_vec(r(DIM * V), (DIM, V), &Device::Cpu).unwrap()).unwrap();
    (w1, w2)
}

fn toy(dropout: bool) -> Toy {
    let mut rng = StdRng::seed_from_u64(7);
    let emb: Vec<f32> = (0..V * DIM)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let data = (0..10)
        .map(|i| {
            let len = 3 + i % 4;
            let ids: Vec<u32> = (0..len).map(|t| ((i * 3 + t * 5) % V) as u32).collect();
            // Prompt positions unlabelled, like the chat template does.
            let labels = ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < 2 { IGNORE_INDEX } else { i64::from(id) })
                .collect();
            (ids, labels)
        })
        .collect();
    Toy {
        emb: Tensor::from_vec(emb, (V, DIM), &Device::Cpu).unwrap(),
        data,
        dropout,
        skip_w2: false,
    }
}

impl Objective for Toy {
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError> {
        Ok(indices
            .iter()
            .map(|&i| {
                self.data[i]
                    .1
                    .iter()
                    .skip(1)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum())
    }

    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        vars: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError> {
        let examples: Vec<_> = mb
            .indices
            .iter()
            .map(|&i| crate::model::chat::Example {
                input_ids: self.data[i].0.clone(),
                labels: self.data[i].1.clone(),
            })
            .collect();
        let batch = crate::model::chat::Batch::right_padded(&examples, 0)
            .map_err(|e| TrainError::Objective(Box::new(e)))?;
        let t = batch
            .tensors(&Device::Cpu)
            .map_err(|e| TrainError::Objective(Box::new(e)))?;
        let (b, s) = t.input_ids.dims2()?;
        let mut h = self
            .emb
            .index_select(&t.input_ids.flatten_all()?, 0)?
            .reshape((b, s, DIM))?;
        if self.dropout {
            // Seeded dropout: the mask depends on the micro-batch seed only.
            let mut rng = StdRng::seed_from_u64(mb.seed);
            let keep: Vec<f32> = (0..b * s * DIM)
                .map(|_| if rng.random_bool(0.8) { 1.25 } else { 0.0 })
                .collect();
            h = (h * Tensor::from_vec(keep, (b, s, DIM), &Device::Cpu)?)?;
        }
        let w1 = vars[0].1.as_tensor();
        let mut out = h.broadcast_matmul(w1)?.tanh()?;
        out = if self.skip_w2 {
            out.broadcast_matmul(&Tensor::ones((DIM, V), DType::F32, &Device::Cpu)?)?
        } else {
            out.broadcast_matmul(vars[1].1.as_tensor())?
        };
        sft_micro_loss(
            &out,
            t.labels.as_ref().unwrap(),
            mb.window_targets,
            &mut [],
            mb.step,
            mb.micro,
            vars,
        )
    }
}

fn groups(seed: u64) -> Vec<ParamGroup> {
    let (w1, w2) = params(seed);
    vec![
        ParamGroup {
            name: "projector".into(),
            lr: 2e-2,
            weight_decay: 0.01,
            vars: vec![("w1".into(), w1)],
        },
        ParamGroup {
            name: "lora".into(),
            lr: 5e-2,
            weight_decay: 0.0,
            vars: vec![("w2".into(), w2)],
        },
    ]
}

fn cfg(steps: u64, mbs: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        total_steps: steps,
        micro_batch_size: mbs,
        grad_accum: accum,
        adam: AdamWConfig::default(),
        schedule: Schedule::with_warmup_ratio(ScheduleKind::Cosine, 0.2, steps).unwrap(),
        max_grad_norm: Some(0.5),
        checkpoint_every: Some(3),
        keep_checkpoints: 2,
        seed: 1234,
        shuffle: true,
    }
}

fn bytes(t: &Trainer) -> Vec<Vec<u8>> {
    t.vars()
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|f| f.to_le_bytes())
                .collect()
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_is_bit_identical() {
    let steps = 10;
    let mut straight = Trainer::new(cfg(steps, 3, 2), groups(1), 10).unwrap();
    let mut losses = Vec::new();
    straight
        .run(&mut toy(true), None, &mut |r| {
            losses.push(r.loss);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(straight.state().step, steps);
    assert!(
        losses.last().unwrap() < &losses[0],
        "training reduces the loss: {losses:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    // First attempt dies after step 5: the checkpoint at step 3 survives, steps 4-5 are lost.
    let mut first = Trainer::new(cfg(steps, 3, 2), groups(1), 10).unwrap();
    first
        .run(&mut toy(true), Some(dir.path()), &mut |r| {
            if r.step == 5 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("latest")).unwrap(),
        "step-00000003"
    );
    // A new process: fresh (differently initialised!) variables, resumed from disk.
    let mut resumed = Trainer::new(cfg(steps, 3, 2), groups(99), 10).unwrap();
    let mut seen = Vec::new();
    resumed
        .run(&mut toy(true), Some(dir.path()), &mut |r| {
            seen.push(r.step);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(
        seen,
        (4..=steps).collect::<Vec<_>>(),
        "resumed after the last checkpoint"
    );
    assert_eq!(bytes(&resumed), bytes(&straight), "final weights differ");
    assert_eq!(resumed.state(), straight.state());
    for (name, (m, v)) in straight.optimizer().moments() {
        let (m2, v2) = &resumed.optimizer().moments()[name];
        assert_eq!(m.to_vec2::<f32>().unwrap(), m2.to_vec2::<f32>().unwrap());
        assert_eq!(v.to_vec2::<f32>().unwrap(), v2.to_vec2::<f32>().unwrap());
    }
    // keep_checkpoints = 2: steps 6 and 9 remain (plus `latest`).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["latest", "step-00000006", "step-00000009"]);
}

#[test]
fn accumulation_equals_one_big_batch() {
    // Without dropout or shuffling, 2 x 2 accumulated must match 1 x 4 (to float rounding).
    let mut c1 = cfg(4, 4, 1);
    let mut c2 = cfg(4, 2, 2);
    for c in [&mut c1, &mut c2] {
        c.shuffle = false;
        c.checkpoint_every = None;
    }
    let mut big = Trainer::new(c1, groups(3), 8).unwrap();
    let mut acc = Trainer::new(c2, groups(3), 8).unwrap();
    let (mut lb, mut la) = (Vec::new(), Vec::new());
    big.run(&mut toy(false), None, &mut |r| {
        lb.push((r.loss, r.grad_norm));
        Flow::Continue
    })
    .unwrap();
    acc.run(&mut toy(false), None, &mut |r| {
        la.push((r.loss, r.grad_norm));
        Flow::Continue
    })
    .unwrap();
    for ((l1, g1), (l2, g2)) in lb.iter().zip(&la) {
        assert!(
            (l1 - l2).abs() < 1e-6 && (g1 - g2).abs() < 1e-5,
            "{lb:?} vs {la:?}"
        );
    }
    for (a, b) in big.vars().iter().zip(acc.vars()) {
        let d = (a.1.as_tensor() - b.1.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .max_keepdim(1)
            .unwrap();
        assert!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] < 1e-5);
    }
}

#[test]
fn groups_get_their_own_scheduled_lr() {
    let mut t = Trainer::new(cfg(10, 2, 1), groups(5), 10).unwrap();
    let mut toy = toy(false);
    let r1 = t.train_step(&mut toy, None).unwrap();
    assert_eq!(
        r1.lrs,
        [("projector".to_string(), 0.0), ("lora".to_string(), 0.0)],
        "warmup starts at 0"
    );
    let r2 = t.train_step(&mut toy, None).unwrap();
    assert_eq!(r2.lrs[0].1, 2e-2 * 0.5);
    assert_eq!(r2.lrs[1].1, 5e-2 * 0.5);
}

#[test]
fn every_trainable_var_must_get_a_gradient() {
    let mut t = Trainer::new(cfg(2, 2, 1), groups(5), 10).unwrap();
    let mut bad = toy(false);
    bad.skip_w2 = true;
    let err = t.train_step(&mut bad, None).unwrap_err();
    assert!(
        matches!(&err, TrainError::NoGradient(n) if n == "w2"),
        "{err}"
    );
}

#[test]
fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(cfg(6, 2, 1), groups(1), 10).unwrap();
    t.run(&mut toy(false), Some(dir.path()), &mut |_| Flow::Continue)
        .unwrap();
    let mut other = Trainer::new(cfg(8, 2, 1), groups(1), 10).unwrap();
    let err = other.resume(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("different settings") && err.contains("steps=6") && err.contains("steps=8"),
        "{err}"
    );
}

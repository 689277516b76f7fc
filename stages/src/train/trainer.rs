//! The training loop: data order, gradient accumulation, clipping, the AdamW step with its
//! schedule, and periodic checkpoints with bit-identical resume.
//!
//! The loop knows nothing about LLaVA. A stage supplies an [`Objective`] that turns example
//! indices into a loss (build the batch, run the model, add hook terms); the trainer decides
//! which indices, when to step, and what to save. SFT, LoRA, RegLoRA and DPO stages differ only
//! in their objective.
//!
//! ## Determinism
//!
//! Every random choice is a pure function of the run's seed and a counter: the example order of
//! epoch `e` is a shuffle seeded by `(seed, e)`, and the micro-batch at `(step, micro)` gets
//! [`MicroBatch::seed`] for its own randomness (LoRA dropout). The checkpoint stores the counters
//! (step, epoch, offset), so a resumed run replays exactly the random streams it would have seen.
//! Gradients are accumulated in a fixed order, and CPU candle ops are deterministic, so the final
//! weights of an interrupted-and-resumed run equal an uninterrupted run's bit for bit (tested).

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::TrainError;
use super::checkpoint::{self, TrainState};
use super::loss::MicroLoss;
use super::optim::{AdamW, AdamWConfig, Grads, ParamGroup, clip_grad_norm, global_grad_norm};
use super::schedule::Schedule;

/// Settings of one training run (hashed into the checkpoint fingerprint).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Optimizer steps to take.
    pub total_steps: u64,
    /// Examples per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Adam betas and epsilon.
    pub adam: AdamWConfig,
    /// LR multiplier over steps.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this, if set.
    pub max_grad_norm: Option<f64>,
    /// Checkpoint every N optimizer steps (and never if `None`).
    pub checkpoint_every: Option<u64>,
    /// How many checkpoints to keep on disk.
    pub keep_checkpoints: usize,
    /// Seed for data order and per-micro-batch randomness.
    pub seed: u64,
    /// Shuffle the examples each epoch (otherwise dataset order).
    pub shuffle: bool,
}

/// One micro-batch to score.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Optimizer steps completed before this one.
    pub step: u64,
    /// Index inside the accumulation window.
    pub micro: usize,
    /// Example indices.
    pub indices: Vec<usize>,
    /// Seed for this micro-batch's own randomness (dropout), derived from the run seed.
    pub seed: u64,
    /// Labelled targets in the whole window (the loss normalizer).
    pub window_targets: usize,
}

/// What a stage plugs into the loop.
pub trait Objective {
    /// Number of loss-bearing targets in these examples (used to normalize across the window).
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError>;
    /// Builds, runs and scores one micro-batch (see [`super::loss::sft_micro_loss`]).
    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        vars: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError>;
}

/// Per-step numbers for progress reporting and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Optimizer steps completed (1 after the first step).
    pub step: u64,
    /// Mean task loss over the window's targets.
    pub loss: f64,
    /// Hook terms by name, summed over the window.
    pub extras: Vec<(String, f64)>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used by each group for this step.
    pub lrs: Vec<(String, f64)>,
    /// Epoch of the next example.
    pub epoch: u64,
}

/// Whether to go on after a step (a cancel flag or a test's simulated kill says `Stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep training.
    Continue,
    /// Return now (after any checkpoint due at this step has been written).
    Stop,
}

/// The training loop's state: optimizer, counters, config.
pub struct Trainer {
    cfg: TrainConfig,
    opt: AdamW,
    vars: Vec<(String, Var)>,
    state: TrainState,
    n_examples: usize,
    order: (u64, Vec<usize>),
}

/// SplitMix64 finalizer: decorrelates seeds derived from small counters.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Trainer {
    /// A fresh run over `n_examples` examples training `groups`.
    pub fn new(
        cfg: TrainConfig,
        groups: Vec<ParamGroup>,
        n_examples: usize,
    ) -> Result<Self, TrainError> {
        if n_examples == 0 {
            return Err(TrainError::Config("no training examples".into()));
        }
        if cfg.micro_batch_size == 0 || cfg.grad_accum == 0 {
            return Err(TrainError::Config(format!(
                "micro_batch_size ({}) and grad_accum ({}) must be at least 1",
                cfg.micro_batch_size, cfg.grad_accum
            )));
        }
        if groups.iter().all(|g| g.vars.is_empty()) {
            return Err(TrainError::Config(
                "nothing to train: no trainable parameters".into(),
            ));
        }
        let opt = AdamW::new(cfg.adam, groups)?;
        let vars: Vec<(String, Var)> = opt.vars().cloned().collect();
        let fingerprint = fingerprint(&cfg, &opt, n_examples);
        let state = TrainState {
            step: 0,
            epoch: 0,
            offset: 0,
            seed: cfg.seed,
            fingerprint,
        };
        let order = (u64::MAX, Vec::new());
        Ok(Self {
            cfg,
            opt,
            vars,
            state,
            n_examples,
            order,
        })
    }

    /// Restores the newest checkpoint in `dir`, if any; returns whether one was found. The run's
    /// settings and parameter shapes must be those the checkpoint was written with.
    pub fn resume(&mut self, dir: &Path) -> Result<bool, TrainError> {
        let Some(var0) = self.vars.first() else {
            return Ok(false);
        };
        let Some(ck) = checkpoint::load_latest(dir, var0.1.device())? else {
            return Ok(false);
        };
        if ck.state.fingerprint != self.state.fingerprint {
            return Err(TrainError::Checkpoint(format!(
                "`{}` was written by a run with different settings:\n  checkpoint: {}\n  this run:   {}",
                ck.dir.display(),
                ck.state.fingerprint,
                self.state.fingerprint
            )));
        }
        for (name, var) in &self.vars {
            let t = ck.params.get(name).ok_or_else(|| {
                TrainError::Checkpoint(format!("`{}` lacks parameter `{name}`", ck.dir.display()))
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        self.opt.restore(ck.state.step, ck.moments)?;
        self.state = ck.state;
        Ok(true)
    }

    /// Counters (step, data position) and seed.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The optimizer (groups, moments).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// The trainable parameters by name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Next example indices, advancing the data position. Batches never span epochs (the last
    /// one of an epoch may be short, like a DataLoader without `drop_last`).
    fn next_indices(&mut self) -> Vec<usize> {
        let n = self.n_examples as u64;
        if self.state.offset >= n {
            self.state.epoch += 1;
            self.state.offset = 0;
        }
        if self.order.0 != self.state.epoch {
            let mut idx: Vec<usize> = (0..self.n_examples).collect();
            if self.cfg.shuffle {
                let mut rng = StdRng::seed_from_u64(mix(self.state.seed ^ mix(self.state.epoch)));
                idx.shuffle(&mut rng);
            }
            self.order = (self.state.epoch, idx);
        }
        let start = self.state.offset as usize;
        let end = (start + self.cfg.micro_batch_size).min(self.n_examples);
        self.state.offset = end as u64;
        self.order.1[start..end].to_vec()
    }

    /// One optimizer step: `grad_accum` micro-batches, clip, AdamW, maybe a checkpoint.
    pub fn train_step(
        &mut self,
        obj: &mut dyn Objective,
        ckpt_dir: Option<&Path>,
    ) -> Result<StepReport, TrainError> {
        let step = self.state.step;
        let batches: Vec<Vec<usize>> = (0..self.cfg.grad_accum)
            .map(|_| self.next_indices())
            .collect();
        let mut window_targets = 0;
        for b in &batches {
            window_targets += obj.targets(b)?;
        }
        if window_targets == 0 {
            return Err(TrainError::Data(format!(
                "step {}: the examples {batches:?} have no labelled targets",
                step + 1
            )));
        }
        let mut acc: Option<Grads> = None;
        let (mut loss, mut extras) = (0f64, Vec::<(String, f64)>::new());
        for (micro, indices) in batches.into_iter().enumerate() {
            let mb = MicroBatch {
                step,
                micro,
                indices,
                seed: mix(self.state.seed ^ mix(step.wrapping_mul(1 << 16) + micro as u64)),
                window_targets,
            };
            let out = obj.micro_loss(&mb, &self.vars)?;
            let total = f64::from(out.total.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !total.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    what: format!("loss ({total})"),
                });
            }
            loss += out.task;
            for (name, v) in out.extras {
                match extras.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, acc)) => *acc += v,
                    None => extras.push((name, v)),
                }
            }
            let grads = self.opt.collect_grads(&out.total.backward()?)?;
            acc = Some(match acc {
                None => grads,
                Some(mut a) => {
                    for (k, g) in grads {
                        let sum = (&a[&k] + g)?;
                        a.insert(k, sum);
                    }
                    a
                }
            });
        }
        let mut grads =
            acc.ok_or_else(|| TrainError::Config("BUG: empty accumulation window".into()))?;
        let grad_norm = match self.cfg.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => global_grad_norm(&grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: step + 1,
                what: format!("gradient norm ({grad_norm})"),
            });
        }
        let scale = self.cfg.schedule.factor(step);
        self.opt.step(&grads, scale)?;
        self.state.step += 1;
        if let (Some(every), Some(dir)) = (self.cfg.checkpoint_every, ckpt_dir)
            && every > 0
            && self.state.step.is_multiple_of(every)
        {
            self.checkpoint(dir)?;
        }
        Ok(StepReport {
            step: self.state.step,
            loss,
            extras,
            grad_norm,
            lrs: self
                .opt
                .groups()
                .iter()
                .map(|g| (g.name.clone(), g.lr * scale))
                .collect(),
            epoch: self.state.epoch,
        })
    }

    /// Writes a checkpoint of the current state to `dir` now.
    pub fn checkpoint(&self, dir: &Path) -> Result<std::path::PathBuf, TrainError> {
        let params: Vec<(String, Tensor)> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(
            dir,
            &self.state,
            &params,
            self.opt.moments(),
            self.cfg.keep_checkpoints,
        )
    }

    /// Trains until `total_steps` (resuming from `ckpt_dir` first if it holds a checkpoint),
    /// calling `on_step` after every step; returns the last report (None if already done).
    pub fn run(
        &mut self,
        obj: &mut dyn Objective,
        ckpt_dir: Option<&Path>,
        on_step: &mut dyn FnMut(&StepReport) -> Flow,
    ) -> Result<Option<StepReport>, TrainError> {
        if let Some(dir) = ckpt_dir {
            self.resume(dir)?;
        }
        let mut last = None;
        while self.state.step < self.cfg.total_steps {
            let report = self.train_step(obj, ckpt_dir)?;
            let flow = on_step(&report);
            last = Some(report);
            if flow == Flow::Stop {
                break;
            }
        }
        Ok(last)
    }
}

/// The settings a resume must share with the run that wrote the checkpoint.
fn fingerprint(cfg: &TrainConfig, opt: &AdamW, n_examples: usize) -> String {
    let mut s = format!(
        "steps={} mbs={} accum={} adam={:?} schedule={:?} clip={:?} seed={} shuffle={} examples={n_examples}",
        cfg.total_steps,
        cfg.micro_batch_size,
        cfg.grad_accum,
        cfg.adam,
        cfg.schedule,
        cfg.max_grad_norm,
        cfg.seed,
        cfg.shuffle
    );
    for g in opt.groups() {
        s.push_str(&format!(
            " group={}(lr={},wd={},n={})",
            g.name,
            g.lr,
            g.weight_decay,
            g.vars.len()
        ));
    }
    s
}

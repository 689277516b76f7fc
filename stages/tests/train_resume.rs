//! Checkpoint/resume on the real model: LoRA (with dropout, so the per-micro-batch random
//! stream matters) plus the projector in its own lr group, gradient accumulation, clipping and a
//! cosine schedule. A run killed after step 3 and resumed from its step-2 checkpoint in a fresh
//! model (adapter initialised with another seed) must end with the same bytes as a run that was
//! never interrupted.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use stages::model::chat::{Batch, ChatTemplate, Example, Turn};
use stages::model::image::ImageProcessorConfig;
use stages::model::tokenizer::LlavaTokenizer;
use stages::model::{Llava, LoraConfig, TrainMode};
use stages::train::{
    AdamWConfig, Flow, MicroBatch, MicroLoss, Objective, ParamGroup, Schedule, ScheduleKind,
    TrainConfig, TrainError, Trainer, sft_micro_loss,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

struct Sft {
    model: Llava,
    examples: Vec<Example>,
    images: Vec<Tensor>,
    pad: u32,
}

fn obj_err(e: impl std::error::Error + Send + Sync + 'static) -> TrainError {
    TrainError::Objective(Box::new(e))
}

impl Objective for Sft {
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError> {
        let ex: Vec<Example> = indices.iter().map(|&i| self.examples[i].clone()).collect();
        Ok(Batch::right_padded(&ex, self.pad)
            .map_err(obj_err)?
            .target_count())
    }

    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        vars: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError> {
        let ex: Vec<Example> = mb
            .indices
            .iter()
            .map(|&i| self.examples[i].clone())
            .collect();
        let b = Batch::right_padded(&ex, self.pad).map_err(obj_err)?;
        let t = b.tensors(&Device::Cpu).map_err(obj_err)?;
        let imgs: Vec<Tensor> = mb
            .indices
            .iter()
            .map(|&i| self.images[i % 2].clone())
            .collect();
        let pixels = Tensor::stack(&imgs, 0)?;
        self.model.set_dropout_seed(Some(mb.seed));
        let logits = self
            .model
            .forward(
                &t.input_ids,
                Some(&pixels),
                Some(&t.attention_mask),
                None,
                None,
            )
            .map_err(obj_err)?;
        sft_micro_loss(
            &logits,
            t.labels.as_ref().unwrap(),
            mb.window_targets,
            &mut [],
            mb.step,
            mb.micro,
            vars,
        )
    }
}

/// A model with a fresh dropout-0.1 adapter (init seeded by `seed`) and the objective.
fn setup(seed: u64) -> (Sft, Vec<ParamGroup>) {
    let tok = LlavaTokenizer::load(&fixture()).unwrap();
    let t = ChatTemplate::short(64);
    let qa = [
        ("<image>\nWhat color is the square?", "The square is red."),
        (
            "<image>\nHow many circles are there in the image?",
            "There are three green circles.",
        ),
        ("<image>\nWhat is in the image?", "A red square."),
        ("<image>\nAre there circles?", "There are three circles."),
    ];
    let examples = qa
        .iter()
        .map(|(q, a)| t.encode_training(&tok, &[Turn::qa(*q, *a)]).unwrap())
        .collect();
    let proc = ImageProcessorConfig::load(&fixture().join("preprocessor_config.json")).unwrap();
    let images = ["image_0.png", "image_1.png"]
        .map(|f| {
            proc.preprocess_file(&fixture().join(f), &Device::Cpu)
                .unwrap()
        })
        .to_vec();
    let mut model = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let mut lora = LoraConfig::language_model(4, 8.0);
    lora.dropout = 0.1;
    model.add_adapter("sft", lora, seed).unwrap();
    let mode = TrainMode {
        lora: true,
        projector: true,
        ..TrainMode::default()
    };
    let (proj, lora): (Vec<_>, Vec<_>) = model
        .trainable_vars(mode)
        .unwrap()
        .into_iter()
        .partition(|(n, _)| n.starts_with("multi_modal_projector."));
    assert!(!proj.is_empty() && !lora.is_empty());
    let groups = vec![
        ParamGroup {
            name: "projector".into(),
            lr: 2e-4,
            weight_decay: 0.0,
            vars: proj,
        },
        ParamGroup {
            name: "lora".into(),
            lr: 2e-3,
            weight_decay: 0.01,
            vars: lora,
        },
    ];
    (
        Sft {
            model,
            examples,
            images,
            pad: tok.pad_id,
        },
        groups,
    )
}

fn cfg() -> TrainConfig {
    TrainConfig {
        total_steps: 4,
        micro_batch_size: 1,
        grad_accum: 2,
        adam: AdamWConfig::default(),
        schedule: Schedule::with_warmup_ratio(ScheduleKind::Cosine, 0.25, 4).unwrap(),
        max_grad_norm: Some(1.0),
        checkpoint_every: Some(2),
        keep_checkpoints: 2,
        seed: 42,
        shuffle: true,
    }
}

fn bytes(t: &Trainer) -> Vec<(String, Vec<u8>)> {
    t.vars()
        .iter()
        .map(|(n, v)| {
            let f: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            (n.clone(), f.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect()
}

#[test]
fn resumed_lora_run_is_bit_identical_to_an_uninterrupted_one() {
    let (mut obj, groups) = setup(1);
    let mut straight = Trainer::new(cfg(), groups, 4).unwrap();
    let mut losses = Vec::new();
    straight
        .run(&mut obj, None, &mut |r| {
            losses.push(r.loss);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(losses.len(), 4);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (mut obj, groups) = setup(1);
    let mut first = Trainer::new(cfg(), groups, 4).unwrap();
    first
        .run(&mut obj, Some(dir.path()), &mut |r| {
            if r.step == 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    drop(first);
    // A fresh process: different adapter init, everything restored from the step-2 checkpoint.
    let (mut obj, groups) = setup(777);
    let mut resumed = Trainer::new(cfg(), groups, 4).unwrap();
    let mut steps = Vec::new();
    let mut resumed_losses = Vec::new();
    resumed
        .run(&mut obj, Some(dir.path()), &mut |r| {
            steps.push(r.step);
            resumed_losses.push(r.loss);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(steps, [3, 4]);
    assert_eq!(
        resumed_losses,
        losses[2..],
        "same batches, same dropout masks"
    );
    let (a, b) = (bytes(&straight), bytes(&resumed));
    assert_eq!(a.len(), b.len());
    for ((na, ba), (nb, bb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ba == bb, "`{na}` differs after resume");
    }
}

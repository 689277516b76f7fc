//! One-step training parity against the `llava-tiny` fixture (`expected_train.safetensors`,
//! produced by transformers + PEFT + `torch.optim.AdamW`): two LoRA steps on the two-example
//! batch, comparing loss, LoRA gradients (rtol 1e-3), global gradient norm and AdamW-updated
//! parameters (atol 1e-6), then the loss after step 2.
//!
//! The batch is built end to end by our own code: the chat template and tokenizer produce the
//! ids and labels, and the image processor produces the pixel values from the PNGs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use stages::model::chat::{Batch, BatchTensors, ChatTemplate, Turn};
use stages::model::image::ImageProcessorConfig;
use stages::model::tokenizer::LlavaTokenizer;
use stages::model::{Llava, TrainMode};
use stages::train::{
    AdamW, AdamWConfig, Flow, MicroBatch, MicroLoss, Objective, ParamGroup, Schedule, ScheduleKind,
    TrainConfig, TrainError, Trainer, global_grad_norm, masked_cross_entropy, sft_micro_loss,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("expected_train.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The fixture's training batch, built by the chat template, tokenizer and image processor.
fn batch() -> (BatchTensors, Tensor) {
    let tok = LlavaTokenizer::load(&fixture().join("tokenizer.json")).unwrap();
    let t = ChatTemplate::short(64);
    let examples = [
        t.encode_training(
            &tok,
            &[Turn::qa(
                "<image>\nWhat color is the square?",
                "The square is red.",
            )],
        )
        .unwrap(),
        t.encode_training(
            &tok,
            &[Turn::qa(
                "<image>\nHow many circles are there in the image?",
                "There are three green circles.",
            )],
        )
        .unwrap(),
    ];
    let batch = Batch::right_padded(&examples, tok.pad_id).unwrap();
    let tensors = batch.tensors(&Device::Cpu).unwrap();
    let want = expected();
    let ids: Vec<Vec<i64>> = tensors
        .input_ids
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(ids, want["input_ids"].to_vec2::<i64>().unwrap());
    let proc = ImageProcessorConfig::load(&fixture().join("preprocessor_config.json")).unwrap();
    let pixels = proc
        .preprocess_files(
            &[fixture().join("image_0.png"), fixture().join("image_1.png")],
            &Device::Cpu,
        )
        .unwrap();
    (tensors, pixels)
}

fn model() -> (Llava, Vec<(String, Var)>) {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m.load_adapter(&fixture().join("adapter"), "default", true)
        .unwrap();
    let vars = m.trainable_vars(TrainMode::LORA).unwrap();
    (m, vars)
}

fn logits(m: &Llava, b: &BatchTensors, pixels: &Tensor) -> Tensor {
    m.forward(
        &b.input_ids,
        Some(pixels),
        Some(&b.attention_mask),
        None,
        None,
    )
    .unwrap()
}

/// The fixture's short names → our variable (by PEFT key suffix).
fn named<'a>(vars: &'a [(String, Var)], short: &str) -> &'a Var {
    let key = match short {
        "q_proj.lora_A" => "layers.0.self_attn.q_proj.lora_A.",
        "q_proj.lora_B" => "layers.0.self_attn.q_proj.lora_B.",
        "down_proj_last.lora_A" => "layers.3.mlp.down_proj.lora_A.",
        "down_proj_last.lora_B" => "layers.3.mlp.down_proj.lora_B.",
        other => panic!("unknown {other}"),
    };
    let hits: Vec<_> = vars.iter().filter(|(n, _)| n.contains(key)).collect();
    assert_eq!(
        hits.len(),
        1,
        "{key}: {:?}",
        vars.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    &hits[0].1
}

const SHORT: [&str; 4] = [
    "q_proj.lora_A",
    "q_proj.lora_B",
    "down_proj_last.lora_A",
    "down_proj_last.lora_B",
];

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0])
}

/// max |got - want| and whether |got - want| <= atol + rtol |want| everywhere.
fn close(got: &Tensor, want: &Tensor, atol: f64, rtol: f64) -> (f64, bool) {
    assert_eq!(got.dims(), want.dims());
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let mut max = 0f64;
    let mut ok = true;
    for (a, b) in g.iter().zip(&w) {
        let d = f64::from((a - b).abs());
        max = max.max(d);
        ok &= d <= atol + rtol * f64::from(b.abs());
    }
    (max, ok)
}

#[test]
fn two_lora_steps_match_transformers_and_torch_adamw() {
    let want = expected();
    let (b, pixels) = batch();
    let (m, vars) = model();
    let (a0, want_a0) = (
        named(&vars, "q_proj.lora_A").as_tensor(),
        &want["q_proj.lora_A.init"],
    );
    assert_eq!(
        close(a0, want_a0, 0.0, 0.0).0,
        0.0,
        "adapter loaded as the fixture's init"
    );
    let group = ParamGroup {
        name: "lora".into(),
        lr: 1e-3,
        weight_decay: 0.0,
        vars: vars.clone(),
    };
    let mut opt = AdamW::new(AdamWConfig::default(), vec![group]).unwrap();
    let labels = b.labels.clone().unwrap();
    for step in 1..=2 {
        let loss = masked_cross_entropy(&logits(&m, &b, &pixels), &labels).unwrap();
        let want_loss = scalar(&want[&format!("step{step}.loss")]);
        let got_loss = f64::from(loss.to_scalar::<f32>().unwrap());
        assert!(
            (got_loss - want_loss).abs() < 1e-5,
            "step {step} loss {got_loss} vs {want_loss}"
        );
        let grads = opt.collect_grads(&loss.backward().unwrap()).unwrap();
        assert_eq!(grads.len(), vars.len(), "every LoRA factor gets a gradient");
        for short in SHORT {
            let name = &vars
                .iter()
                .find(|(_, v)| v.as_tensor().id() == named(&vars, short).as_tensor().id())
                .unwrap()
                .0;
            let (max, ok) = close(
                &grads[name],
                &want[&format!("step{step}.{short}.grad")],
                1e-6,
                1e-3,
            );
            assert!(ok, "step {step} {short}.grad: max |diff| {max}");
        }
        let norm = global_grad_norm(&grads).unwrap();
        let want_norm = scalar(&want[&format!("step{step}.grad_global_norm")]);
        assert!(
            (norm - want_norm).abs() <= 1e-3 * want_norm,
            "step {step} grad norm {norm} vs {want_norm}"
        );
        opt.step(&grads, 1.0).unwrap();
        for short in SHORT {
            let (max, ok) = close(
                named(&vars, short).as_tensor(),
                &want[&format!("step{step}.{short}.updated")],
                1e-6,
                0.0,
            );
            assert!(ok, "step {step} {short}.updated: max |diff| {max}");
        }
    }
    let loss = masked_cross_entropy(&logits(&m, &b, &pixels), &labels).unwrap();
    let got = f64::from(loss.to_scalar::<f32>().unwrap());
    let want_after = scalar(&want["loss_after_step2"]);
    assert!(
        (got - want_after).abs() < 1e-5,
        "loss after step 2: {got} vs {want_after}"
    );
}

/// The same two steps through the [`Trainer`] loop (objective + schedule + accumulation of one).
struct Sft {
    model: Llava,
    batch: BatchTensors,
    pixels: Tensor,
}

impl Objective for Sft {
    fn targets(&mut self, indices: &[usize]) -> Result<usize, TrainError> {
        assert_eq!(indices, [0, 1]);
        Ok(11)
    }
    fn micro_loss(
        &mut self,
        mb: &MicroBatch,
        vars: &[(String, Var)],
    ) -> Result<MicroLoss, TrainError> {
        let lg = logits(&self.model, &self.batch, &self.pixels);
        sft_micro_loss(
            &lg,
            self.batch.labels.as_ref().unwrap(),
            mb.window_targets,
            &mut [],
            mb.step,
            mb.micro,
            vars,
        )
    }
}

#[test]
fn trainer_loop_reproduces_the_fixture_steps() {
    let want = expected();
    let (batch, pixels) = batch();
    let (model, vars) = model();
    let cfg = TrainConfig {
        total_steps: 2,
        micro_batch_size: 2,
        grad_accum: 1,
        adam: AdamWConfig::default(),
        schedule: Schedule::with_warmup_ratio(ScheduleKind::Constant, 0.0, 2).unwrap(),
        max_grad_norm: None,
        checkpoint_every: None,
        keep_checkpoints: 1,
        seed: 0,
        shuffle: false,
    };
    let group = ParamGroup {
        name: "lora".into(),
        lr: 1e-3,
        weight_decay: 0.0,
        vars: vars.clone(),
    };
    let mut trainer = Trainer::new(cfg, vec![group], 2).unwrap();
    let mut reports = Vec::new();
    trainer
        .run(
            &mut Sft {
                model,
                batch,
                pixels,
            },
            None,
            &mut |r| {
                reports.push(r.clone());
                Flow::Continue
            },
        )
        .unwrap();
    assert_eq!(reports.len(), 2);
    for (i, r) in reports.iter().enumerate() {
        let step = i + 1;
        let want_loss = scalar(&want[&format!("step{step}.loss")]);
        assert!(
            (r.loss - want_loss).abs() < 1e-5,
            "step {step}: {} vs {want_loss}",
            r.loss
        );
        let want_norm = scalar(&want[&format!("step{step}.grad_global_norm")]);
        assert!((r.grad_norm - want_norm).abs() <= 1e-3 * want_norm);
    }
    for short in SHORT {
        let (max, ok) = close(
            named(&vars, short).as_tensor(),
            &want[&format!("step2.{short}.updated")],
            1e-6,
            0.0,
        );
        assert!(ok, "{short}.updated after 2 steps: max |diff| {max}");
    }
}

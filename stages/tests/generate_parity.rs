//! Generation and scoring against the Hugging Face llava-tiny fixture
//! (`tests/fixtures/llava-tiny`, see its README): greedy ids must equal transformers'
//! `generate` token for token, alone and left-padded in a batch; sampling must not depend
//! on batch composition; EOS and stop strings end sequences; log-probs of the greedy
//! continuation must match the fixture's per-step logits.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, IndexOp, Tensor};
use stages::model::Llava;
use stages::model::generate::{
    FinishReason, GenPrompt, GenerateOptions, generate, sequence_logprobs,
};
use stages::model::sampling::SamplingParams;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

struct Fixture {
    model: Llava,
    inputs: HashMap<String, Tensor>,
    expected: serde_json::Value,
}

fn fixture() -> Fixture {
    let d = dir();
    let model = Llava::load(&d, DType::F32, &Device::Cpu).expect("load llava-tiny");
    let inputs =
        candle_core::safetensors::load(d.join("inputs.safetensors"), &Device::Cpu).unwrap();
    let expected =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected_generate.json")).unwrap())
            .unwrap();
    Fixture {
        model,
        inputs,
        expected,
    }
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

fn expected_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

impl Fixture {
    fn prompt(&self, i: usize) -> GenPrompt {
        let pv = self.inputs["pixel_values"].i(i..i + 1).unwrap();
        GenPrompt {
            input_ids: ids(&self.inputs[&format!("input_ids_{i}")]),
            pixel_values: Some(pv),
        }
    }
}

fn greedy(n: usize) -> GenerateOptions {
    // The fixture's generation config has no EOS (always exactly 20 new tokens).
    GenerateOptions {
        max_new_tokens: n,
        pad_token_id: 1023,
        ..GenerateOptions::default()
    }
}

#[test]
fn greedy_matches_hf_alone_and_left_padded() {
    let f = fixture();
    let prompts = [f.prompt(0), f.prompt(1)];
    let want: Vec<Vec<u32>> = (0..2)
        .map(|i| expected_ids(&f.expected["single"][i]["new_token_ids"]))
        .collect();
    for i in 0..2 {
        let got = generate(&f.model, &prompts[i..i + 1], &greedy(20), None).unwrap();
        assert_eq!(got[0].token_ids, want[i], "prompt {i} alone");
        assert_eq!(got[0].finish, FinishReason::Length);
    }
    // Both prompts in one left-padded batch (lengths 74 and 77).
    let got = generate(
        &f.model,
        &prompts,
        &GenerateOptions {
            batch_size: 2,
            ..greedy(20)
        },
        None,
    )
    .unwrap();
    let want_b: Vec<Vec<u32>> = f.expected["batched_left_padded"]["new_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(expected_ids)
        .collect();
    assert_eq!(
        got.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>(),
        want_b
    );
}

#[test]
fn a_finished_row_leaves_the_batch_without_disturbing_the_others() {
    let f = fixture();
    let prompts = [f.prompt(0), f.prompt(1)];
    // 805 is prompt 0's third greedy token and never appears in prompt 1's 20.
    let opts = GenerateOptions {
        batch_size: 2,
        eos_token_ids: vec![805],
        ..greedy(20)
    };
    let got = generate(&f.model, &prompts, &opts, None).unwrap();
    assert_eq!(got[0].token_ids, [652, 591, 805]);
    assert_eq!(got[0].finish, FinishReason::Eos);
    assert_eq!(
        got[1].token_ids,
        expected_ids(&f.expected["single"][1]["new_token_ids"])
    );
    assert_eq!(got[1].finish, FinishReason::Length);
}

#[test]
fn sampling_is_independent_of_batch_composition() {
    let f = fixture();
    let prompts = [f.prompt(0), f.prompt(1)];
    let opts = GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
        },
        num_samples: 2,
        seed: 42,
        ..greedy(6)
    };
    let together = generate(
        &f.model,
        &prompts,
        &GenerateOptions {
            batch_size: 4,
            ..opts.clone()
        },
        None,
    )
    .unwrap();
    let apart = generate(
        &f.model,
        &prompts,
        &GenerateOptions {
            batch_size: 1,
            ..opts.clone()
        },
        None,
    )
    .unwrap();
    assert_eq!(together, apart);
    assert_eq!(
        together
            .iter()
            .map(|g| (g.prompt_index, g.sample_index))
            .collect::<Vec<_>>(),
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    );
    // Different samples of one prompt (almost surely) differ at temperature 1 over 6 tokens.
    assert_ne!(together[0].token_ids, together[1].token_ids);
    let reseeded = generate(
        &f.model,
        &prompts[..1],
        &GenerateOptions {
            seed: 43,
            num_samples: 1,
            ..opts
        },
        None,
    )
    .unwrap();
    assert_ne!(reseeded[0].token_ids, together[0].token_ids);
}

#[test]
fn eos_and_stop_strings_end_sequences() {
    let f = fixture();
    let p = [f.prompt(0)];
    // Greedy continuation of prompt 0 starts 652, 591, 805, 202, ...
    let eos = generate(
        &f.model,
        &p,
        &GenerateOptions {
            eos_token_ids: vec![805],
            ..greedy(20)
        },
        None,
    )
    .unwrap();
    assert_eq!(eos[0].token_ids, [652, 591, 805]);
    assert_eq!(eos[0].finish, FinishReason::Eos);
    let detok = |ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect::<String>();
    let opts = GenerateOptions {
        stop_strings: vec!["<805>".into()],
        eos_token_ids: vec![202],
        ..greedy(20)
    };
    let stop = generate(&f.model, &p, &opts, Some(&detok)).unwrap();
    assert_eq!(stop[0].token_ids, [652, 591, 805]);
    assert_eq!(stop[0].finish, FinishReason::Stop);
    assert_eq!(stop[0].text.as_deref(), Some("<652><591>"));
    // Stop strings without a detokenizer are a clear error, not a silent no-op.
    let err = generate(&f.model, &p, &opts, None).unwrap_err().to_string();
    assert!(err.contains("stop strings"), "{err}");
}

#[test]
fn logprobs_of_the_greedy_continuation_match_hf_step_logits() {
    let f = fixture();
    let prompt = f.prompt(0);
    let new = expected_ids(&f.expected["single"][0]["new_token_ids"]);
    let step_logits = candle_core::safetensors::load(
        dir().join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap()["generate.single_0.step_logits"]
        .clone();
    // log_softmax(step_logits[i])[new[i]]
    let lsm = candle_nn::ops::log_softmax(&step_logits, D::Minus1).unwrap();
    let want: Vec<f32> = new
        .iter()
        .enumerate()
        .map(|(i, &t)| lsm.i((i, t as usize)).unwrap().to_scalar::<f32>().unwrap())
        .collect();
    let n_prompt = prompt.input_ids.len();
    let all: Vec<u32> = prompt
        .input_ids
        .iter()
        .copied()
        .chain(new.iter().copied())
        .collect();
    let mask: Vec<f32> = (0..all.len())
        .map(|i| if i >= n_prompt { 1.0 } else { 0.0 })
        .collect();
    let s = all.len();
    let input = Tensor::from_vec(all, (1, s), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (1, s), &Device::Cpu).unwrap();
    let lp = sequence_logprobs(
        &f.model,
        &input,
        prompt.pixel_values.as_ref(),
        None,
        None,
        &mask,
    )
    .unwrap();
    let per = lp.per_token.to_vec2::<f32>().unwrap();
    for (i, w) in want.iter().enumerate() {
        let g = per[0][n_prompt - 1 + i];
        assert!((g - w).abs() < 1e-3, "token {i}: {g} vs HF {w}");
    }
    assert!(
        per[0][..n_prompt - 1].iter().all(|&v| v == 0.0),
        "prompt tokens are masked out"
    );
    let sum = lp.sum.to_vec1::<f32>().unwrap()[0];
    assert!((sum - want.iter().sum::<f32>()).abs() < 1e-2);
    assert_eq!(lp.count.to_vec1::<f32>().unwrap(), [20.0]);
}

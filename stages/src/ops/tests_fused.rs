//! Fused kernels against the composed references: forward values and gradients of every
//! input (rtol 1e-4 relative to the largest gradient entry), plus a finite-difference check
//! of the attention backward.

use candle_core::{DType, Device, Tensor, Var};

use super::tests::{causal_mask, randn};
use super::*;

fn close(name: &str, got: &Tensor, want: &Tensor, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    let err = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        err <= rtol * scale,
        "{name}: max err {err:e} > {rtol:e} * {scale:e}"
    );
}

/// Runs `f` on fresh Vars built from `inputs`, with fused and reference implementations, and
/// compares outputs and the gradient of `sum(y ⊙ r)` for every input.
fn check(
    name: &str,
    inputs: &[Tensor],
    fast: impl Fn(&[Tensor]) -> Tensor,
    slow: impl Fn(&[Tensor]) -> Tensor,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts);
        let r = randn(y.dims(), 99);
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Tensor> = ts
            .iter()
            .map(|t| {
                grads
                    .get(t)
                    .cloned()
                    .unwrap_or_else(|| panic!("{name}: an input got no gradient"))
            })
            .collect();
        (y, gs)
    };
    let (yf, gf) = run(&fast);
    let (ys, gs) = run(&slow);
    close(&format!("{name} forward"), &yf, &ys, 1e-5);
    for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
        close(&format!("{name} grad {i}"), a, b, 1e-4);
    }
}

#[test]
fn fused_rms_norm_matches_reference() {
    check(
        "rms_norm",
        &[randn(&[3, 7, 32], 1), randn(&[32], 2)],
        |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| reference::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
    );
}

#[test]
fn fused_layer_norm_matches_reference() {
    let ins = [randn(&[3, 6, 24], 31), randn(&[24], 32), randn(&[24], 33)];
    check(
        "layer_norm",
        &ins,
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        |t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
    );
}

#[test]
fn fused_silu_and_log_softmax_match_reference() {
    let x = (randn(&[3, 4, 40], 34) * 5.0).unwrap();
    check(
        "silu",
        std::slice::from_ref(&x),
        |t| silu(&t[0]).unwrap(),
        |t| reference::silu(&t[0]).unwrap(),
    );
    check(
        "log_softmax",
        &[x],
        |t| log_softmax_last_dim(&t[0]).unwrap(),
        |t| reference::log_softmax_last_dim(&t[0]).unwrap(),
    );
}

#[test]
fn fused_quick_gelu_matches_reference() {
    let x = (randn(&[3, 5, 37], 35) * 4.0).unwrap();
    check(
        "quick_gelu",
        &[x],
        |t| quick_gelu(&t[0]).unwrap(),
        |t| reference::quick_gelu(&t[0]).unwrap(),
    );
}

#[test]
fn fused_softmax_matches_reference() {
    let x = (randn(&[4, 5, 33], 3) * 6.0).unwrap();
    check(
        "softmax",
        &[x],
        |t| softmax_last_dim(&t[0]).unwrap(),
        |t| reference::softmax_last_dim(&t[0]).unwrap(),
    );
}

#[test]
fn fused_rope_matches_reference() {
    let ins = [
        randn(&[2, 3, 5, 16], 4),
        randn(&[2, 5, 16], 5),
        randn(&[2, 5, 16], 6),
    ];
    check(
        "rope",
        &ins,
        |t| rope(&t[0], &t[1], &t[2]).unwrap(),
        |t| reference::rope(&t[0], &t[1], &t[2]).unwrap(),
    );
    // Non-contiguous input (a transposed view) goes through the same kernel.
    let xt = randn(&[2, 5, 3, 16], 7).transpose(1, 2).unwrap();
    close(
        "rope strided",
        &rope(&xt, &ins[1], &ins[2]).unwrap(),
        &reference::rope(&xt, &ins[1], &ins[2]).unwrap(),
        1e-6,
    );
}

#[test]
fn fused_attention_matches_reference_gqa_causal_padded() {
    let (b, hq, hkv, s, t, d) = (2, 4, 2, 5, 7, 16);
    let ins = [
        randn(&[b, hq, s, d], 8),
        randn(&[b, hkv, t, d], 9),
        randn(&[b, hkv, t, d], 10),
    ];
    let mask = causal_mask(b, s, t, &[0, 2]);
    let sc = 1.0 / (d as f64).sqrt();
    check(
        "attention masked",
        &ins,
        |x| attention(&x[0], &x[1], &x[2], Some(&mask), sc).unwrap(),
        |x| reference::attention(&x[0], &x[1], &x[2], Some(&mask), sc).unwrap(),
    );
    check(
        "attention unmasked",
        &ins,
        |x| attention(&x[0], &x[1], &x[2], None, sc).unwrap(),
        |x| reference::attention(&x[0], &x[1], &x[2], None, sc).unwrap(),
    );
    // A mask broadcast from [1, 1, s, t] and a per-head one.
    let m1 = causal_mask(1, s, t, &[0]);
    check(
        "attention bcast mask",
        &ins,
        |x| attention(&x[0], &x[1], &x[2], Some(&m1), sc).unwrap(),
        |x| reference::attention(&x[0], &x[1], &x[2], Some(&m1), sc).unwrap(),
    );
    let mh = (randn(&[b, hq, s, t], 11) * 3.0).unwrap();
    check(
        "attention per-head mask",
        &ins,
        |x| attention(&x[0], &x[1], &x[2], Some(&mh), sc).unwrap(),
        |x| reference::attention(&x[0], &x[1], &x[2], Some(&mh), sc).unwrap(),
    );
}

#[test]
fn fused_attention_tiles_long_queries_and_a_strided_cache_view() {
    // s > the kernel's 128-row tile: the second tile must see its own mask rows and add
    // into the same dK, dV as the first.
    let (b, hq, hkv, s, t, d) = (1, 2, 1, 131, 133, 8);
    let ins = [
        randn(&[b, hq, s, d], 21),
        randn(&[b, hkv, t, d], 22),
        randn(&[b, hkv, t, d], 23),
    ];
    let mask = causal_mask(b, s, t, &[3]);
    check(
        "attention two tiles",
        &ins,
        |x| attention(&x[0], &x[1], &x[2], Some(&mask), 0.35).unwrap(),
        |x| reference::attention(&x[0], &x[1], &x[2], Some(&mask), 0.35).unwrap(),
    );
    // Keys/values read through a prefix view of a larger buffer (the KV cache layout).
    let kb = randn(&[1, 2, 9, 8], 24);
    let vb = randn(&[1, 2, 9, 8], 25);
    let (k, v) = (kb.narrow(2, 0, 6).unwrap(), vb.narrow(2, 0, 6).unwrap());
    let q = randn(&[1, 2, 1, 8], 26);
    let got = attention(&q, &k, &v, None, 0.5).unwrap();
    let want = reference::attention(
        &q,
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        None,
        0.5,
    )
    .unwrap();
    close("strided kv", &got, &want, 1e-5);
}

#[test]
fn fused_swiglu_matches_silu_times_up_with_gradients() {
    let ins = [randn(&[3, 5, 7], 31), randn(&[3, 5, 7], 32)];
    check(
        "swiglu",
        &ins,
        |x| crate::ops::swiglu(&x[0], &x[1]).unwrap(),
        |x| (reference::silu(&x[0]).unwrap() * &x[1]).unwrap(),
    );
    let bad = crate::ops::swiglu(&ins[0], &randn(&[3, 5, 6], 33));
    assert!(bad.is_err(), "mismatched shapes must be an error");
}

#[test]
fn fully_masked_rows_are_uniform_like_hf() {
    // A left-pad query row that sees nothing: HF (f32::MIN fill) yields the mean of values.
    let (q, k, v) = (
        randn(&[1, 1, 2, 8], 12),
        randn(&[1, 1, 2, 8], 13),
        randn(&[1, 1, 2, 8], 14),
    );
    let m = Tensor::new(&[[[[f32::MIN, f32::MIN], [0.0, 0.0]]]], &Device::Cpu).unwrap();
    let y = attention(&q, &k, &v, Some(&m), 0.5).unwrap();
    close(
        "pad row",
        &y,
        &reference::attention(&q, &k, &v, Some(&m), 0.5).unwrap(),
        1e-6,
    );
    let mean = v.mean_keepdim(2).unwrap().squeeze(2).unwrap();
    close(
        "pad row = mean(v)",
        &y.narrow(2, 0, 1).unwrap().squeeze(2).unwrap(),
        &mean,
        1e-6,
    );
}

#[test]
fn attention_backward_matches_finite_differences() {
    let ins = [
        randn(&[1, 2, 3, 4], 15),
        randn(&[1, 1, 4, 4], 16),
        randn(&[1, 1, 4, 4], 17),
    ];
    let mask = causal_mask(1, 3, 4, &[1]);
    let r = randn(&[1, 2, 3, 4], 18);
    let f = |t: &[Tensor]| -> f64 {
        let t64: Vec<Tensor> = t.iter().map(|x| x.to_dtype(DType::F64).unwrap()).collect();
        let y = reference::attention(&t64[0], &t64[1], &t64[2], Some(&mask), 0.5).unwrap();
        (y * r.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let vars: Vec<Var> = ins.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let y = attention(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        Some(&mask),
        0.5,
    )
    .unwrap();
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let base = ins[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (e, &ge) in g.iter().enumerate() {
            let shifted = |h: f32| {
                let mut p = base.clone();
                p[e] += h;
                let mut t = ins.to_vec();
                t[i] = Tensor::from_vec(p, ins[i].shape(), &Device::Cpu).unwrap();
                f(&t)
            };
            let fd = (shifted(1e-3) - shifted(-1e-3)) / 2e-3;
            assert!(
                (fd as f32 - ge).abs() < 1e-3,
                "input {i} elem {e}: fd {fd} vs {ge}"
            );
        }
    }
}

#[test]
fn frozen_linear_and_lora_match_reference_and_skip_base_grads() {
    let x = randn(&[2, 3, 12], 19);
    let (w, b) = (randn(&[10, 12], 20), randn(&[10], 21));
    let (a, bm) = (randn(&[4, 12], 22), randn(&[10, 4], 23));
    // Base weight and bias are plain tensors (frozen); x, A, B are trained.
    check(
        "lora",
        &[x.clone(), a.clone(), bm.clone()],
        |t| lora_linear(&t[0], &w, Some(&b), &t[1], &t[2], 2.0).unwrap(),
        |t| reference::lora_linear(&t[0], &w, Some(&b), &t[1], &t[2], 2.0).unwrap(),
    );
    // Enough rows (40 · (12 + 10) ≥ 2 · 12 · 10) for the merged-weight path.
    let many = randn(&[4, 10, 12], 24);
    check(
        "lora merged",
        &[many, a.clone(), bm.clone()],
        |t| lora_linear(&t[0], &w, Some(&b), &t[1], &t[2], 2.0).unwrap(),
        |t| reference::lora_linear(&t[0], &w, Some(&b), &t[1], &t[2], 2.0).unwrap(),
    );
    check(
        "frozen linear",
        std::slice::from_ref(&x),
        |t| linear(&t[0], &w, Some(&b)).unwrap(),
        |t| reference::linear(&t[0], &w, Some(&b)).unwrap(),
    );
    // With a trainable base weight the composed path runs and W gets its gradient.
    check(
        "trainable linear",
        &[x, w],
        |t| linear(&t[0], &t[1], Some(&b)).unwrap(),
        |t| reference::linear(&t[0], &t[1], Some(&b)).unwrap(),
    );
}

//! The CPU paths of the custom CUDA ops — the fused CPU kernels (`ops::attention`,
//! `ops::lora_linear` on f32) and the composed references (`ops::reference`) — against
//! plain candle ops written out here (per-head matmuls, candle_nn's composed softmax,
//! autograd for the gradients), in f32, with causal and padding masks, per-head masks,
//! fully masked rows, GQA, a strided KV-cache view and odd sizes. These are the semantics
//! the CUDA kernels are checked against on a GPU (`scripts/gpu-check.sh`).

use candle_core::{D, DType, Device, IndexOp, Result, Tensor, Var};
use stages::ops;

const TOL: f32 = 1e-5;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|: the relative error of `a` against the plain result `b`.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let num = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    let den = b.abs().unwrap().flatten_all().unwrap();
    let num = num.max(0).unwrap().to_scalar::<f32>().unwrap();
    let den = den.max(0).unwrap().to_scalar::<f32>().unwrap();
    num / den.max(f32::MIN_POSITIVE)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor) {
    let e = rel_err(a, b);
    assert!(e < TOL, "{what}: relative error {e:e} >= {TOL:e}");
}

/// Plain attention: one matmul pair per query head, KV head `h / (hq / hkv)`, candle_nn's
/// composed softmax (it has a backward), mask added to the scores.
fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, hq, s, _) = q.dims4()?;
    let (_, hkv, t, _) = k.dims4()?;
    let mut batches = Vec::with_capacity(b);
    for bi in 0..b {
        let mut heads = Vec::with_capacity(hq);
        for h in 0..hq {
            let kh = k.i((bi, h / (hq / hkv)))?;
            let vh = v.i((bi, h / (hq / hkv)))?;
            let mut sc = (q.i((bi, h))?.matmul(&kh.t()?)? * scale)?;
            if let Some(m) = mask {
                let mh = if m.dim(1)? == hq { h } else { 0 };
                sc = (sc + m.i((bi, mh))?.broadcast_as((s, t))?)?;
            }
            heads.push(candle_nn::ops::softmax(&sc, D::Minus1)?.matmul(&vh)?);
        }
        batches.push(Tensor::stack(&heads, 0)?);
    }
    Tensor::stack(&batches, 0)
}

/// HF-style additive mask `[b, 1, s, t]`: `f32::MIN` where hidden. Causal is bottom-right
/// aligned (query `i` sees keys `j <= i + t - s`); `pad[b]` hides the first keys (left
/// padding).
fn hf_mask(b: usize, s: usize, t: usize, causal: bool, pad: &[usize]) -> Tensor {
    let mut m = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                let hidden = (causal && j > i + t - s) || pad.get(bi).is_some_and(|&p| j < p);
                if hidden {
                    m[(bi * s + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, t), &Device::Cpu).unwrap()
}

struct Case {
    name: &'static str,
    b: usize,
    hq: usize,
    hkv: usize,
    s: usize,
    t: usize,
    d: usize,
    mask: Option<Tensor>,
}

fn cases() -> Vec<Case> {
    let per_head = (randn(&[2, 4, 5, 9], 77) * 3.0).unwrap();
    vec![
        Case {
            name: "no mask",
            b: 2,
            hq: 4,
            hkv: 4,
            s: 7,
            t: 7,
            d: 16,
            mask: None,
        },
        Case {
            name: "causal",
            b: 2,
            hq: 4,
            hkv: 4,
            s: 9,
            t: 9,
            d: 16,
            mask: Some(hf_mask(2, 9, 9, true, &[])),
        },
        Case {
            name: "causal, kv-cache offset",
            b: 1,
            hq: 2,
            hkv: 2,
            s: 3,
            t: 11,
            d: 8,
            mask: Some(hf_mask(1, 3, 11, true, &[])),
        },
        Case {
            name: "GQA 6/2, causal",
            b: 2,
            hq: 6,
            hkv: 2,
            s: 13,
            t: 13,
            d: 64,
            mask: Some(hf_mask(2, 13, 13, true, &[])),
        },
        Case {
            name: "MQA 4/1, odd sizes",
            b: 3,
            hq: 4,
            hkv: 1,
            s: 5,
            t: 17,
            d: 5,
            mask: None,
        },
        Case {
            name: "left padding",
            b: 2,
            hq: 2,
            hkv: 1,
            s: 6,
            t: 6,
            d: 12,
            mask: Some(hf_mask(2, 6, 6, false, &[0, 3])),
        },
        // Causal + left padding: the padded query rows see no key at all (fully masked rows,
        // uniform over every key under f32::MIN).
        Case {
            name: "causal + left padding",
            b: 2,
            hq: 4,
            hkv: 2,
            s: 8,
            t: 8,
            d: 128,
            mask: Some(hf_mask(2, 8, 8, true, &[2, 5])),
        },
        Case {
            name: "per-head additive mask",
            b: 2,
            hq: 4,
            hkv: 2,
            s: 5,
            t: 9,
            d: 7,
            mask: Some(per_head),
        },
        Case {
            name: "one query row (decode)",
            b: 2,
            hq: 4,
            hkv: 2,
            s: 1,
            t: 19,
            d: 32,
            mask: None,
        },
    ]
}

#[test]
fn attention_forward_matches_plain_candle() {
    for (n, c) in cases().into_iter().enumerate() {
        let seed = 100 * n as u64;
        let q = randn(&[c.b, c.hq, c.s, c.d], seed);
        let k = randn(&[c.b, c.hkv, c.t, c.d], seed + 1);
        let v = randn(&[c.b, c.hkv, c.t, c.d], seed + 2);
        let scale = 1.0 / (c.d as f64).sqrt();
        let want = plain_attention(&q, &k, &v, c.mask.as_ref(), scale).unwrap();
        let fused = ops::attention(&q, &k, &v, c.mask.as_ref(), scale).unwrap();
        let reference = ops::reference::attention(&q, &k, &v, c.mask.as_ref(), scale).unwrap();
        assert_close(&format!("{}: fused", c.name), &fused, &want);
        assert_close(&format!("{}: reference", c.name), &reference, &want);
    }
}

#[test]
fn fully_masked_rows_average_every_value() {
    // Causal + left padding of 3: query rows 0..3 of batch 0 see nothing.
    let (b, h, s, d) = (1, 2, 5, 4);
    let q = randn(&[b, h, s, d], 1);
    let k = randn(&[b, h, s, d], 2);
    let v = randn(&[b, h, s, d], 3);
    let mask = hf_mask(b, s, s, true, &[3]);
    let out = ops::attention(&q, &k, &v, Some(&mask), 0.5).unwrap();
    let mean = v.mean_keepdim(2).unwrap();
    for i in 0..3 {
        assert_close(&format!("row {i}"), &out.narrow(2, i, 1).unwrap(), &mean);
    }
    // Row 3 sees exactly key 3: its output is v[3].
    assert_close(
        "row 3",
        &out.narrow(2, 3, 1).unwrap(),
        &v.narrow(2, 3, 1).unwrap(),
    );
}

#[test]
fn attention_reads_a_strided_kv_cache_view() {
    // The preallocated KV cache is [b, h, cap, d]; attention reads a prefix view of it.
    let (b, hq, hkv, s, t, cap, d) = (2, 4, 2, 3, 10, 16, 8);
    let q = randn(&[b, hq, s, d], 11);
    let kc = randn(&[b, hkv, cap, d], 12);
    let vc = randn(&[b, hkv, cap, d], 13);
    let (k, v) = (kc.narrow(2, 0, t).unwrap(), vc.narrow(2, 0, t).unwrap());
    assert!(!k.is_contiguous());
    let mask = hf_mask(b, s, t, true, &[0, 4]);
    let want = plain_attention(
        &q,
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        Some(&mask),
        0.3,
    )
    .unwrap();
    let got = ops::attention(&q, &k, &v, Some(&mask), 0.3).unwrap();
    assert_close("strided kv", &got, &want);
}

/// Gradients of `sum(out · w)` (a fixed random weighting, so every output element
/// matters) with respect to q, k, v.
fn attention_grads(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
) -> [Tensor; 3] {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = f(qv.as_tensor(), kv.as_tensor(), vv.as_tensor()).unwrap();
    let loss = (out * w).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    [&qv, &kv, &vv].map(|x| g.get(x.as_tensor()).expect("gradient").clone())
}

#[test]
fn attention_backward_matches_candle_autograd() {
    for (n, c) in cases().into_iter().enumerate() {
        let seed = 1000 + 100 * n as u64;
        let q = randn(&[c.b, c.hq, c.s, c.d], seed);
        let k = randn(&[c.b, c.hkv, c.t, c.d], seed + 1);
        let v = randn(&[c.b, c.hkv, c.t, c.d], seed + 2);
        let w = randn(&[c.b, c.hq, c.s, c.d], seed + 3);
        let scale = 1.0 / (c.d as f64).sqrt();
        let m = c.mask.as_ref();
        let want = attention_grads(|q, k, v| plain_attention(q, k, v, m, scale), &q, &k, &v, &w);
        let fused = attention_grads(|q, k, v| ops::attention(q, k, v, m, scale), &q, &k, &v, &w);
        let reference = attention_grads(
            |q, k, v| ops::reference::attention(q, k, v, m, scale),
            &q,
            &k,
            &v,
            &w,
        );
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert_close(&format!("{}: fused {name}", c.name), &fused[i], &want[i]);
            assert_close(
                &format!("{}: reference {name}", c.name),
                &reference[i],
                &want[i],
            );
        }
    }
}

/// Plain LoRA linear: `x Wᵀ + b + s (x Aᵀ) Bᵀ` on 2-D rows.
fn plain_lora(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    s: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let x2 = x.flatten_to(dims.len() - 2)?;
    let mut y = x2.matmul(&w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let y = (y + (x2.matmul(&a.t()?)?.matmul(&bm.t()?)? * s)?)?;
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out)
}

#[test]
fn lora_linear_forward_and_backward_match_plain_candle() {
    // (leading dims, in, out, rank, bias): odd row counts and sizes, rank 1.
    let shapes: [(&[usize], usize, usize, usize, bool); 4] = [
        (&[3, 5], 24, 10, 4, true),
        (&[7], 33, 17, 1, false),
        (&[2, 1], 64, 48, 8, true),
        (&[65], 40, 9, 16, true), // more rows than the CPU kernel's small-M switch
    ];
    for (n, &(lead, k, o, r, with_bias)) in shapes.iter().enumerate() {
        let seed = 5000 + 10 * n as u64;
        let mut xs = lead.to_vec();
        xs.push(k);
        let x = randn(&xs, seed);
        let w = randn(&[o, k], seed + 1);
        let bias = with_bias.then(|| randn(&[o], seed + 2));
        let a = randn(&[r, k], seed + 3);
        let bm = randn(&[o, r], seed + 4);
        let s = 0.75;
        let name = format!("lora {lead:?}x{k} -> {o}, r {r}");

        let want = plain_lora(&x, &w, bias.as_ref(), &a, &bm, s).unwrap();
        let fused = ops::lora_linear(&x, &w, bias.as_ref(), &a, &bm, s).unwrap();
        let reference = ops::reference::lora_linear(&x, &w, bias.as_ref(), &a, &bm, s).unwrap();
        assert_close(&format!("{name}: fused"), &fused, &want);
        assert_close(&format!("{name}: reference"), &reference, &want);

        let gw = randn(want.dims(), seed + 5);
        let grads = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
            let (xv, av, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&a).unwrap(),
                Var::from_tensor(&bm).unwrap(),
            );
            let y = f(xv.as_tensor(), av.as_tensor(), bv.as_tensor()).unwrap();
            let g = (y * &gw).unwrap().sum_all().unwrap().backward().unwrap();
            [&xv, &av, &bv].map(|t| g.get(t.as_tensor()).expect("gradient").clone())
        };
        let b_ref = bias.as_ref();
        let want_g = grads(&|x, a, bm| plain_lora(x, &w, b_ref, a, bm, s));
        let fused_g = grads(&|x, a, bm| ops::lora_linear(x, &w, b_ref, a, bm, s));
        for (i, g) in ["dx", "dA", "dB"].iter().enumerate() {
            assert_close(&format!("{name}: fused {g}"), &fused_g[i], &want_g[i]);
        }
    }
}

#[test]
fn rel_err_detects_a_wrong_result() {
    // The metric itself: a 1e-4 perturbation of one element must fail the tolerance.
    let a = randn(&[4, 4], 9);
    let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[5] += 1e-4;
    let b = Tensor::from_vec(v, (4, 4), &Device::Cpu).unwrap();
    assert!(rel_err(&b, &a) > TOL);
    assert_eq!(rel_err(&a, &a), 0.0);
    assert_eq!(a.dtype(), DType::F32);
}

//! Ops against naive scalar-loop references, and gradient reachability.

use candle_core::{D, DType, Device, Tensor, Var};

use super::*;

pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
    // Deterministic pseudo-random values without depending on candle's RNG.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `max |got − want| / max |want|`.
pub(crate) fn max_rel(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let m = |t: Tensor| {
        t.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    m((got - want).unwrap().abs().unwrap()) / m(want.abs().unwrap()).max(1e-6)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let d = t.dim(D::Minus1).unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.chunks(d).map(|c| c.to_vec()).collect()
}

#[test]
fn rms_norm_matches_loop() {
    let x = randn(&[3, 5, 16], 1);
    let w = randn(&[16], 2);
    let y = rms_norm(&x, &w, 1e-5).unwrap();
    let wv = w.to_vec1::<f32>().unwrap();
    let want: Vec<f32> = rows(&x)
        .iter()
        .flat_map(|r| {
            let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            r.iter()
                .zip(&wv)
                .map(|(v, w)| v * inv * w)
                .collect::<Vec<_>>()
        })
        .collect();
    let want = Tensor::from_vec(want, x.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-5);
}

#[test]
fn layer_norm_matches_loop() {
    let x = randn(&[4, 12], 3);
    let w = randn(&[12], 4);
    let b = randn(&[12], 5);
    let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
    let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    let want: Vec<f32> = rows(&x)
        .iter()
        .flat_map(|r| {
            let n = r.len() as f32;
            let m = r.iter().sum::<f32>() / n;
            let var = r.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / n;
            let inv = 1.0 / (var + 1e-5).sqrt();
            (0..r.len())
                .map(|i| (r[i] - m) * inv * wv[i] + bv[i])
                .collect::<Vec<_>>()
        })
        .collect();
    let want = Tensor::from_vec(want, x.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-5);
}

#[test]
fn softmax_matches_loop_and_handles_f32_min() {
    let x = (randn(&[2, 3, 7], 6) * 10.0).unwrap();
    let y = softmax_last_dim(&x).unwrap();
    let want: Vec<f32> = rows(&x)
        .iter()
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = r.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<_>>()
        })
        .collect();
    let want = Tensor::from_vec(want, x.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-6);
    // A fully-masked-but-one row (f32::MIN added) must put all mass on the unmasked entry.
    let m = Tensor::new(&[[0.0f32, f32::MIN, f32::MIN]], &Device::Cpu).unwrap();
    let y = softmax_last_dim(&m).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y[0], vec![1.0, 0.0, 0.0]);
}

#[test]
fn rope_matches_loop() {
    let (b, h, s, d) = (2, 3, 4, 8);
    let x = randn(&[b, h, s, d], 7);
    let cos = randn(&[b, s, d], 8);
    let sin = randn(&[b, s, d], 9);
    let y = rope(&x, &cos, &sin).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let cv = cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let sv = sin.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut want = vec![0f32; xv.len()];
    for bi in 0..b {
        for hi in 0..h {
            for si in 0..s {
                let base = ((bi * h + hi) * s + si) * d;
                let cs = (bi * s + si) * d;
                for i in 0..d {
                    let rot = if i < d / 2 {
                        -xv[base + i + d / 2]
                    } else {
                        xv[base + i - d / 2]
                    };
                    want[base + i] = xv[base + i] * cv[cs + i] + rot * sv[cs + i];
                }
            }
        }
    }
    let want = Tensor::from_vec(want, x.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-6);
}

/// Naive attention with explicit loops, GQA head mapping `h -> h / (hq / hkv)`.
pub(super) fn naive_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f32,
) -> Tensor {
    let (b, hq, s, d) = q.dims4().unwrap();
    let (_, hkv, t, _) = k.dims4().unwrap();
    let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let vv = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mv = mask.map(|m| {
        m.broadcast_as((b, hq, s, t))
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    let mut out = vec![0f32; b * hq * s * d];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / (hq / hkv);
            for i in 0..s {
                let qo = ((bi * hq + h) * s + i) * d;
                let mut sc: Vec<f32> = (0..t)
                    .map(|j| {
                        let ko = ((bi * hkv + kh) * t + j) * d;
                        let dot: f32 = (0..d).map(|e| qv[qo + e] * kv[ko + e]).sum();
                        dot * scale
                            + mv.as_ref()
                                .map_or(0.0, |m| m[((bi * hq + h) * s + i) * t + j])
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f32::MIN, f32::max);
                sc.iter_mut().for_each(|x| *x = (*x - mx).exp());
                let z: f32 = sc.iter().sum();
                for (j, p) in sc.iter().enumerate() {
                    let vo = ((bi * hkv + kh) * t + j) * d;
                    for e in 0..d {
                        out[qo + e] += p / z * vv[vo + e];
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (b, hq, s, d), &Device::Cpu).unwrap()
}

/// Causal additive mask `[1, 1, s, t]` for queries at positions `t-s..t`, plus left padding.
pub(super) fn causal_mask(b: usize, s: usize, t: usize, pad: &[usize]) -> Tensor {
    let mut m = vec![0f32; b * s * t];
    for bi in 0..b {
        for i in 0..s {
            for j in 0..t {
                if j > i + (t - s) || j < pad[bi] {
                    m[(bi * s + i) * t + j] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, t), &Device::Cpu).unwrap()
}

#[test]
fn attention_gqa_causal_matches_loop() {
    let (b, hq, hkv, s, t, d) = (2, 4, 2, 3, 5, 8);
    let q = randn(&[b, hq, s, d], 10);
    let k = randn(&[b, hkv, t, d], 11);
    let v = randn(&[b, hkv, t, d], 12);
    let mask = causal_mask(b, s, t, &[0, 1]);
    let scale = 1.0 / (d as f64).sqrt();
    let y = attention(&q, &k, &v, Some(&mask), scale).unwrap();
    let want = naive_attention(&q, &k, &v, Some(&mask), scale as f32);
    assert!(
        max_abs_diff(&y, &want) < 1e-5,
        "{}",
        max_abs_diff(&y, &want)
    );
    let y = attention(&q, &k, &v, None, scale).unwrap();
    let want = naive_attention(&q, &k, &v, None, scale as f32);
    assert!(max_abs_diff(&y, &want) < 1e-5);
}

#[test]
fn attention_rejects_bad_gqa() {
    let q = randn(&[1, 3, 2, 4], 1);
    let k = randn(&[1, 2, 2, 4], 2);
    assert!(attention(&q, &k, &k, None, 1.0).is_err());
}

#[test]
fn activations_match_formulas() {
    let x = (randn(&[64], 13) * 4.0).unwrap();
    let xv = x.to_vec1::<f32>().unwrap();
    let q = quick_gelu(&x).unwrap().to_vec1::<f32>().unwrap();
    let s = silu(&x).unwrap().to_vec1::<f32>().unwrap();
    for i in 0..xv.len() {
        let sig = |z: f32| 1.0 / (1.0 + (-z).exp());
        assert!((q[i] - xv[i] * sig(1.702 * xv[i])).abs() < 1e-5);
        assert!((s[i] - xv[i] * sig(xv[i])).abs() < 1e-5);
    }
    // erf GELU at known points: gelu(1) = 0.8413447, gelu(-1) = -0.1586553.
    let g = gelu_erf(&Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((g[0] - 0.841_344_7).abs() < 1e-5 && (g[1] + 0.158_655_3).abs() < 1e-5);
}

#[test]
fn lora_linear_matches_merged_weight() {
    let x = randn(&[2, 3, 6], 14);
    let w = randn(&[5, 6], 15);
    let b = randn(&[5], 16);
    let a = randn(&[2, 6], 17);
    let bm = randn(&[5, 2], 18);
    let y = lora_linear(&x, &w, Some(&b), &a, &bm, 2.0).unwrap();
    let merged = (&w + (bm.matmul(&a).unwrap() * 2.0).unwrap()).unwrap();
    let want = linear(&x, &merged, Some(&b)).unwrap();
    assert!(max_abs_diff(&y, &want) < 1e-5);
}

#[test]
fn every_op_passes_gradients_to_every_input() {
    let var = |shape: &[usize], seed| Var::from_tensor(&randn(shape, seed)).unwrap();
    let x = var(&[2, 3, 4, 8], 20);
    let w = var(&[8], 21);
    let bias = var(&[8], 22);
    let cos = var(&[2, 4, 8], 23);
    let sin = var(&[2, 4, 8], 24);
    let k = var(&[2, 1, 4, 8], 25);
    let v = var(&[2, 1, 4, 8], 26);
    let lw = var(&[5, 8], 27);
    let lb = var(&[5], 28);
    let la = var(&[2, 8], 29);
    let lbm = var(&[5, 2], 30);
    let mask = causal_mask(2, 4, 4, &[0, 1]);
    let h = rms_norm(&x, &w, 1e-5).unwrap();
    let h = layer_norm(&h, &w, &bias, 1e-5).unwrap();
    let h = rope(&h, &cos, &sin).unwrap();
    let h = attention(&h, &k, &v, Some(&mask), 0.3).unwrap();
    let h = (softmax_last_dim(&h).unwrap()
        + quick_gelu(&h).unwrap()
        + silu(&h).unwrap()
        + gelu_erf(&h).unwrap())
    .unwrap();
    let h = lora_linear(&h, &lw, Some(&lb), &la, &lbm, 2.0).unwrap();
    let loss = h.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in [
        ("x", &x),
        ("w", &w),
        ("bias", &bias),
        ("cos", &cos),
        ("sin", &sin),
        ("k", &k),
        ("v", &v),
        ("lw", &lw),
        ("lb", &lb),
        ("la", &la),
        ("lbm", &lbm),
    ] {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            n > 0.0 && n.is_finite(),
            "zero/non-finite gradient for {name}: {n}"
        );
    }
}

//! The custom CUDA kernels against their CPU reference on a GPU (feature `cuda-candle`;
//! `scripts/gpu-check.sh` runs this). Every run draws fresh random shapes and inputs; the
//! seed is printed and `GPU_CHECK_SEED` replays it. Without a CUDA device the tests say so
//! and pass.
//!
//! Tolerances are relative (max |gpu − cpu| / max |cpu|) against the fused CPU ops in f32
//! on the same (rounded) inputs: f32 1e-4 (different summation order, `expf`), f16 1e-2
//! and bf16 4e-2 (the probabilities are rounded to the input type before `P·V`, as in
//! FlashAttention, and so is every output).
#![cfg(feature = "cuda-candle")]
// The seeds, skips and error margins are the report of a GPU check (`--nocapture`).
#![allow(clippy::print_stderr)]

use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Result, Tensor, Var};
use stages::ops;
use stages::ops::cuda::candle::{AttnMask, attention_masked};
use stages::ops::cuda::launch::AttnKernel;

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Self {
        let seed = std::env::var("GPU_CHECK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: GPU_CHECK_SEED={seed}");
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    /// Uniform in [-1, 1), as an f32 CPU tensor.
    fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

fn tol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 4e-2,
    }
}

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> f32 {
    let g = gpu
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let num = (g - cpu)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let den = cpu.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap().max(f32::MIN_POSITIVE)
}

/// The input as the GPU sees it (rounded to `dt`) and its f32 CPU copy.
fn both(x: &Tensor, dt: DType, dev: &Device) -> (Tensor, Tensor) {
    let r = x.to_dtype(dt).unwrap();
    (r.to_device(dev).unwrap(), r.to_dtype(DType::F32).unwrap())
}

/// Output and gradients of `sum(f(q, k, v) · w)` for q, k, v.
fn run3(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: [&Tensor; 3],
    w: &Tensor,
) -> [Tensor; 4] {
    let vars = x.map(|t| Var::from_tensor(t).unwrap());
    let out = f(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
    )
    .unwrap();
    let g = (out.to_dtype(DType::F32).unwrap() * w.to_device(out.device()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |v: &Var| g.get(v.as_tensor()).expect("gradient").clone();
    [out, grad(&vars[0]), grad(&vars[1]), grad(&vars[2])]
}

#[test]
fn attention_matches_cpu_reference_on_random_shapes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new("attention");
    let mut worst = 0f32;
    for case in 0..40 {
        let dt = rng.pick(&[DType::F32, DType::BF16, DType::F16]);
        let (b, hkv, rep, d) = (
            1 + rng.below(3),
            rng.pick(&[1, 2, 4]),
            rng.pick(&[1, 2, 4]),
            rng.pick(&[64, 128]),
        );
        let hq = hkv * rep;
        let s = 1 + rng.below(300);
        let t = if rng.below(3) == 0 {
            s + rng.below(200)
        } else {
            s
        };
        let causal = rng.below(2) == 0;
        let pads: Vec<u32> = (0..b).map(|_| rng.below(t.min(40) + 1) as u32).collect();
        let ranges: Vec<u32> = pads.iter().flat_map(|&p| [p, t as u32]).collect();
        let padded = rng.below(2) == 0;
        let dense = (rng.below(4) == 0).then(|| (rng.tensor(&[b, hq, s, t]) * 4.0).unwrap());
        let name = format!(
            "#{case} {dt:?} b{b} hq{hq} hkv{hkv} s{s} t{t} d{d} causal {causal} pad {padded} dense {}",
            dense.is_some()
        );
        let scale = 1.0 / (d as f64).sqrt();
        let x = [
            rng.tensor(&[b, hq, s, d]),
            rng.tensor(&[b, hkv, t, d]),
            rng.tensor(&[b, hkv, t, d]),
        ];
        let w = rng.tensor(&[b, hq, s, d]);
        let (xg, xc): (Vec<_>, Vec<_>) = x.iter().map(|t| both(t, dt, &dev)).unzip();
        let mask = |on: &Device| AttnMask {
            causal,
            key_range: padded.then(|| Tensor::from_vec(ranges.clone(), (b, 2), on).unwrap()),
            dense: dense.as_ref().map(|m| m.to_device(on).unwrap()),
        };
        for kernel in [AttnKernel::Auto, AttnKernel::Simt] {
            let (mg, mc) = (mask(&dev), mask(&Device::Cpu));
            let g = run3(
                |q, k, v| attention_masked(q, k, v, &mg, scale, kernel),
                [&xg[0], &xg[1], &xg[2]],
                &w,
            );
            let c = run3(
                |q, k, v| attention_masked(q, k, v, &mc, scale, kernel),
                [&xc[0], &xc[1], &xc[2]],
                &w,
            );
            for (i, what) in ["out", "dq", "dk", "dv"].iter().enumerate() {
                let e = rel_err(&g[i], &c[i]);
                worst = worst.max(e / tol(dt));
                assert!(
                    e < tol(dt),
                    "{name} {kernel:?} {what}: rel err {e:e} >= {:e}",
                    tol(dt)
                );
            }
        }
    }
    eprintln!(
        "attention: 40 cases, worst error at {:.0}% of its tolerance",
        worst * 100.0
    );
}

#[test]
fn model_dispatch_runs_the_kernels_with_dense_hf_masks() {
    // ops::attention (what the model calls) with an HF causal mask on CUDA vs the CPU.
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new("dispatch");
    let (b, hq, hkv, s, d) = (2, 8, 2, 77, 128);
    let mut m = vec![0f32; s * s];
    for i in 0..s {
        for j in i + 1..s {
            m[i * s + j] = f32::MIN;
        }
    }
    let mask = Tensor::from_vec(m, (1, 1, s, s), &Device::Cpu).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let x = [
            rng.tensor(&[b, hq, s, d]),
            rng.tensor(&[b, hkv, s, d]),
            rng.tensor(&[b, hkv, s, d]),
        ];
        let (xg, xc): (Vec<_>, Vec<_>) = x.iter().map(|t| both(t, dt, &dev)).unzip();
        let mg = mask.to_dtype(dt).unwrap().to_device(&dev).unwrap();
        let g = ops::attention(&xg[0], &xg[1], &xg[2], Some(&mg), 0.1).unwrap();
        let c = ops::attention(&xc[0], &xc[1], &xc[2], Some(&mask), 0.1).unwrap();
        let e = rel_err(&g, &c);
        assert!(e < tol(dt), "{dt:?}: rel err {e:e}");
    }
}

#[test]
fn lora_linear_matches_cpu_reference_on_random_shapes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new("lora");
    for case in 0..30 {
        let dt = rng.pick(&[DType::F32, DType::BF16, DType::F16]);
        let m = 1 + rng.below(300);
        let k = rng.pick(&[64, 96, 130, 33, 256]);
        let n = rng.pick(&[64, 100, 31, 512]);
        let r = rng.pick(&[1, 4, 8, 16]);
        let with_bias = rng.below(2) == 0;
        let name = format!("#{case} {dt:?} m{m} k{k} n{n} r{r} bias {with_bias}");
        let (wg, wc) = both(&rng.tensor(&[n, k]), dt, &dev);
        let bias = with_bias.then(|| both(&rng.tensor(&[n]), dt, &dev));
        let x = [
            rng.tensor(&[m, k]),
            rng.tensor(&[r, k]),
            rng.tensor(&[n, r]),
        ];
        let gw = rng.tensor(&[m, n]);
        let (xg, xc): (Vec<_>, Vec<_>) = x.iter().map(|t| both(t, dt, &dev)).unzip();
        let scale = 0.5;
        let g = run3(
            |x, a, bm| ops::lora_linear(x, &wg, bias.as_ref().map(|b| &b.0), a, bm, scale),
            [&xg[0], &xg[1], &xg[2]],
            &gw,
        );
        let c = run3(
            |x, a, bm| ops::lora_linear(x, &wc, bias.as_ref().map(|b| &b.1), a, bm, scale),
            [&xc[0], &xc[1], &xc[2]],
            &gw,
        );
        for (i, what) in ["y", "dx", "dA", "dB"].iter().enumerate() {
            let e = rel_err(&g[i], &c[i]);
            assert!(e < tol(dt), "{name} {what}: rel err {e:e} >= {:e}", tol(dt));
        }
    }
}

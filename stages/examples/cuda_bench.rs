//! Times the custom CUDA kernels against candle's own path and cuBLAS (feature
//! `cuda-candle`; run by `scripts/gpu-check.sh`). Prints achieved TFLOP/s, GB/s and the
//! fraction of the device's peak.
//!
//! Peaks come from a table of known devices (dense bf16 tensor-core TFLOP/s, HBM GB/s);
//! `PEAK_BF16_TFLOPS` and `PEAK_GBPS` override them for any other device.

#![allow(clippy::print_stdout)] // a benchmark report

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use stages::ops;
use stages::ops::cuda::candle::{AttnMask, attention_masked};
use stages::ops::cuda::launch::AttnKernel;

/// (name fragment, dense bf16 TFLOP/s, memory GB/s); first match wins.
const PEAKS: [(&str, f64, f64); 7] = [
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("A100-SXM4-80GB", 312.0, 2039.0),
    ("A100", 312.0, 1555.0),
    ("L40S", 362.0, 864.0),
    ("RTX 4090", 165.0, 1008.0),
];

fn peaks(name: &str) -> (f64, f64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    let known = PEAKS
        .iter()
        .find(|p| name.contains(p.0))
        .map(|p| (p.1, p.2));
    (
        env("PEAK_BF16_TFLOPS")
            .or(known.map(|k| k.0))
            .unwrap_or(f64::NAN),
        env("PEAK_GBPS").or(known.map(|k| k.1)).unwrap_or(f64::NAN),
    )
}

/// Median seconds of `f` over enough runs to fill ~1 s (at least 5), after 3 warm-ups.
fn time(dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::new();
    let start = Instant::now();
    while ts.len() < 5 || (start.elapsed().as_secs_f64() < 1.0 && ts.len() < 200) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn row(what: &str, secs: f64, flops: f64, bytes: f64, peak: (f64, f64)) {
    let tf = flops / secs / 1e12;
    let gb = bytes / secs / 1e9;
    println!(
        "  {what:<44} {:>9.3} ms {tf:>8.1} TFLOP/s ({:>5.1}% peak) {gb:>8.0} GB/s ({:>5.1}% peak)",
        secs * 1e3,
        100.0 * tf / peak.0,
        100.0 * gb / peak.1
    );
}

fn rand(shape: &[usize], dt: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dt)
}

fn attention(dev: &Device, peak: (f64, f64)) -> Result<()> {
    let dt = DType::BF16;
    for &(b, hq, hkv, s, d) in &[
        (1usize, 32usize, 32usize, 4096usize, 128usize),
        (1, 32, 8, 4096, 128),
        (2, 16, 16, 4096, 64),
        (4, 32, 8, 1024, 128),
    ] {
        println!("attention fwd bf16: b {b}, heads {hq}/{hkv}, seq {s}, head dim {d}");
        let (q, k, v) = (
            rand(&[b, hq, s, d], dt, dev)?,
            rand(&[b, hkv, s, d], dt, dev)?,
            rand(&[b, hkv, s, d], dt, dev)?,
        );
        let scale = 1.0 / (d as f64).sqrt();
        let flops = 4.0 * (b * hq * s * s * d) as f64;
        let bytes = 2.0 * (2 * q.elem_count() + 2 * k.elem_count()) as f64;
        for causal in [false, true] {
            let f = if causal { flops / 2.0 } else { flops };
            let mask = AttnMask {
                causal,
                ..Default::default()
            };
            for kernel in [AttnKernel::Auto, AttnKernel::Simt] {
                let t = time(dev, || attention_masked(&q, &k, &v, &mask, scale, kernel))?;
                row(
                    &format!("kernel {kernel:?}, causal {causal}"),
                    t,
                    f,
                    bytes,
                    peak,
                );
            }
        }
        // candle's path: repeat_kv, matmul, softmax (f32), matmul, with a dense causal mask.
        if b * hq * s * s * 4 <= (8usize << 30) {
            let ar = Tensor::arange(0u32, s as u32, dev)?;
            let hide = ar.unsqueeze(1)?.broadcast_lt(&ar.unsqueeze(0)?)?;
            let mask = hide
                .where_cond(
                    &Tensor::full(f32::MIN, (s, s), dev)?,
                    &Tensor::zeros((s, s), DType::F32, dev)?,
                )?
                .to_dtype(dt)?
                .reshape((1, 1, s, s))?;
            let t = time(dev, || ops::reference::attention(&q, &k, &v, None, scale))?;
            row("candle matmul+softmax, no mask", t, flops, bytes, peak);
            let t = time(dev, || {
                ops::reference::attention(&q, &k, &v, Some(&mask), scale)
            })?;
            row(
                "candle matmul+softmax, causal mask",
                t,
                flops / 2.0,
                bytes,
                peak,
            );
            let t = time(dev, || {
                let kr = ops::reference::repeat_kv(&k, hq / hkv)?.contiguous()?;
                q.matmul(&kr.t()?)
            })?;
            row(
                "cuBLAS Q·Kᵀ alone (half the FLOPs)",
                t,
                flops / 2.0,
                bytes,
                peak,
            );
        }
    }
    Ok(())
}

fn lora(dev: &Device, peak: (f64, f64)) -> Result<()> {
    let dt = DType::BF16;
    for &(m, k, n, r) in &[
        (4096usize, 4096usize, 4096usize, 16usize),
        (4096, 4096, 11008, 16),
        (8192, 4096, 4096, 64),
        (512, 4096, 4096, 16),
    ] {
        println!("LoRA linear bf16: tokens {m}, in {k}, out {n}, rank {r}");
        let (x, w, a, bm) = (
            rand(&[m, k], dt, dev)?,
            rand(&[n, k], dt, dev)?,
            rand(&[r, k], dt, dev)?,
            rand(&[n, r], dt, dev)?,
        );
        let base = 2.0 * (m * k * n) as f64;
        let flops = base + 2.0 * (m * k * r + m * r * n) as f64;
        let bytes = 2.0 * (m * k + n * k + m * n) as f64;
        let wt = w.t()?;
        let t_blas = time(dev, || x.matmul(&wt))?;
        row(
            "cuBLAS base GEMM x·Wᵀ (reference)",
            t_blas,
            base,
            bytes,
            peak,
        );
        let t_ours = time(dev, || ops::lora_linear(&x, &w, None, &a, &bm, 2.0))?;
        row("fused LoRA kernel", t_ours, flops, bytes, peak);
        let t_candle = time(dev, || {
            ops::reference::lora_linear(&x, &w, None, &a, &bm, 2.0)
        })?;
        row(
            "candle composed LoRA (cuBLAS x4 + add)",
            t_candle,
            flops,
            bytes,
            peak,
        );
        println!(
            "  fused LoRA / cuBLAS base GEMM time: {:.2}x (target <= 1.10x)",
            t_ours / t_blas
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let name = match &dev {
        Device::Cuda(c) => {
            let ctx = c.cuda_stream().context().clone();
            format!(
                "{} (cc {:?})",
                ctx.name().unwrap_or_default(),
                ctx.compute_capability().ok()
            )
        }
        _ => "?".to_string(),
    };
    let peak = peaks(&name);
    println!(
        "device: {name}; peaks: {} bf16 TFLOP/s, {} GB/s",
        peak.0, peak.1
    );
    attention(&dev, peak)?;
    lora(&dev, peak)?;
    Ok(())
}

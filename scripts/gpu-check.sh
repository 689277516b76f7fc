#!/usr/bin/env bash
# GPU check of the custom CUDA kernels (stages/kernels), for a machine with an NVIDIA GPU
# (compute capability 8.0+) and a CUDA toolkit: candle's CUDA backend runs nvcc when it
# builds and links against cuBLAS/cuRAND.
#   1. builds with `--features cuda-candle` (candle's CUDA backend + the kernel ops);
#   2. runs the kernels against the CPU reference on fresh random shapes, dtypes and masks
#      (stages/tests/cuda_gpu.rs; the seed is printed, GPU_CHECK_SEED=N replays it);
#   3. times them against candle's matmul/softmax path and cuBLAS and prints TFLOP/s, GB/s
#      and the fraction of the device's peak (stages/examples/cuda_bench.rs; set
#      PEAK_BF16_TFLOPS and PEAK_GBPS for a device it does not know).
# Usage: scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null; then
    echo "gpu-check: nvidia-smi not found: this needs a machine with an NVIDIA GPU" >&2
    exit 2
fi
if ! command -v nvcc >/dev/null; then
    echo "gpu-check: nvcc not found: candle's CUDA backend needs a CUDA toolkit to build" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
nvcc --version | tail -1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"

echo "== build (release, --features cuda-candle)"
cargo build --release -p stages --features cuda-candle --tests --examples

echo "== kernels vs the CPU reference (random shapes)"
cargo test --release -p stages --features cuda-candle --test cuda_gpu -- --nocapture --test-threads 1

echo "== timings vs candle and cuBLAS"
cargo run --release -p stages --features cuda-candle --example cuda_bench

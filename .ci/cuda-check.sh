#!/usr/bin/env bash
# CUDA checks that need no GPU (issue #6). Installs NVRTC and ptxas from the NVIDIA wheels
# on PyPI (pinned) into a venv, then:
#   1. compiles every kernel in stages/kernels with NVRTC for sm_80 and sm_90, assembles it
#      with ptxas and prints the register/spill report (fails on any error or warning);
#   2. `cargo check --features cuda` of the `pipeline` package;
#   3. the kernel tests of stages::ops::cuda with cudarc loading that NVRTC (the runtime's
#      own compile path, kernel names, launch-parameter struct sizes).
# Run from .ci/run; the venv is kept in /tmp between runs (CUDA_VENV to move it).
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_WHEEL="nvidia-cuda-nvrtc-cu12==12.9.86"
NVCC_WHEEL="nvidia-cuda-nvcc-cu12==12.9.86"   # ptxas only; the cu12 wheel has no nvcc binary
venv="${CUDA_VENV:-/tmp/pipeline-cuda-wheels}"

echo "== cuda: NVIDIA wheels ($NVRTC_WHEEL, $NVCC_WHEEL) in $venv"
installed=$("$venv/bin/pip" show nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 2>/dev/null | grep -c '^Version: 12.9.86$' || true)
if [ "$installed" != 2 ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$NVRTC_WHEEL" "$NVCC_WHEEL"
fi
nvidia=$("$venv/bin/python" -c 'import pathlib, nvidia.cuda_nvrtc as m; print(pathlib.Path(m.__path__[0]).parent)')

echo "== cuda: NVRTC + ptxas compile check (sm_80, sm_90)"
"$venv/bin/python" scripts/cuda/compile_check.py "$nvidia" sm_80 sm_90

echo "== cuda: cargo check --features cuda"
cargo check --features cuda

echo "== cuda: kernel tests with NVRTC (cargo test -p stages --features cuda --lib ops::cuda)"
LD_LIBRARY_PATH="$nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo test -p stages --features cuda --lib ops::cuda

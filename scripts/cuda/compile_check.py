#!/usr/bin/env python3
"""Compile check of the custom CUDA kernels, no GPU needed.

Compiles every `stages/kernels/*.cu` with NVRTC (from the NVIDIA PyPI wheels, through
ctypes) exactly as the runtime does (`common.cuh` prepended, the options below), then
assembles the PTX with `ptxas -v` for each architecture and prints each kernel's
registers, spills and shared memory. Exits non-zero on any NVRTC or ptxas error or
warning.

Usage: compile_check.py NVIDIA_DIR [ARCH...]     (default archs: sm_80 sm_90)
NVIDIA_DIR is a venv's site-packages/nvidia holding nvidia-cuda-nvrtc-cu12 and
nvidia-cuda-nvcc-cu12 (cuda_nvrtc/lib/libnvrtc.so.12, cuda_nvcc/bin/ptxas).
"""
import ctypes
import pathlib
import re
import subprocess
import sys
import tempfile

# Keep equal to NVRTC_OPTIONS in stages/src/ops/cuda/mod.rs (a test there checks).
OPTIONS = ["-std=c++17", "--fmad=true"]

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "stages" / "kernels"


class CheckError(Exception):
    pass


def nvrtc_compile(nvrtc, name, src, arch):
    """PTX of `src` for the virtual architecture of `arch` (sm_90 -> compute_90)."""
    def check(rc, what):
        if rc != 0:
            nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CheckError(f"{name} ({arch}): {what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")

    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    opts = OPTIONS + [f"--gpu-architecture={arch.replace('sm_', 'compute_')}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.value.decode(errors="replace").strip()
    if rc != 0 or "warning" in log:
        raise CheckError(f"NVRTC, {name} for {arch}:\n{log}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


INFO = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_report(ptxas, ptx_path, arch):
    """Runs `ptxas -v`; returns [(kernel, regs, stack, spill_st, spill_ld, smem)]."""
    r = subprocess.run([ptxas, f"-arch={arch}", "-v", "--warn-on-spills", str(ptx_path), "-o", "/dev/null"],
                       capture_output=True, text=True)
    if r.returncode != 0 or "error" in r.stderr.lower():
        raise CheckError(f"ptxas {ptx_path.name} for {arch} failed:\n{r.stderr}")
    rows, cur = [], None
    for line in r.stderr.splitlines():
        if m := INFO.search(line):
            cur = [m.group(1), 0, 0, 0, 0, 0]
            rows.append(cur)
        elif cur and (m := SPILL.search(line)):
            cur[2:5] = [int(x) for x in m.groups()]
        elif cur and (m := USED.search(line)):
            cur[1] = int(m.group(1))
            cur[5] = int(m.group(2) or 0)
    return rows


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    nv = pathlib.Path(sys.argv[1])
    archs = sys.argv[2:] or ["sm_80", "sm_90"]
    lib = nv / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
    ptxas = nv / "cuda_nvcc" / "bin" / "ptxas"
    nvrtc = ctypes.CDLL(str(lib))
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"NVRTC {major.value}.{minor.value}; ptxas {ver}")
    common = (KERNELS / "common.cuh").read_text()
    sources = sorted(KERNELS.glob("*.cu"))
    if not sources:
        raise CheckError(f"no kernels in {KERNELS}")
    spilled = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            print(f"\n{arch}: {'kernel':<26} {'regs':>4} {'stack':>5} {'spill st/ld':>11} {'smem':>6}")
            for cu in sources:
                src = common + f'\n#line 1 "{cu.name}"\n' + cu.read_text()
                path = pathlib.Path(tmp) / f"{cu.stem}.{arch}.ptx"
                path.write_text(nvrtc_compile(nvrtc, cu.name, src, arch))
                for k, regs, stack, st, ld, smem in sorted(ptxas_report(ptxas, path, arch)):
                    total += 1
                    spilled += (st + ld) > 0
                    flag = "  <- spills" if st + ld else ""
                    print(f"       {k:<26} {regs:>4} {stack:>5} {st:>5}/{ld:<5} {smem:>6}{flag}")
    print(f"\ncompile check: {len(sources)} files, {total} kernel builds over {len(archs)} archs, "
          f"0 errors, {spilled} with register spills")


if __name__ == "__main__":
    try:
        main()
    except (CheckError, OSError) as e:
        sys.exit(f"compile check FAILED: {e}")

#!/usr/bin/env python3
"""Compile the custom CUDA kernels to PTX with NVRTC, exactly as the runtime does.

Usage: nvrtc_compile.py LIBNVRTC OUT_DIR ARCH... (e.g. sm_80 sm_90)

Every `stages/kernels/*.cu` is compiled with `common.cuh` prepended and the options below,
which mirror `stages/src/ops/cuda/mod.rs` (`nvrtc_options`); the runtime test
`ops::cuda::tests::options_match_compile_check` keeps the two lists equal. Writes
OUT_DIR/<name>.<arch>.ptx and exits non-zero on the first compile error, printing NVRTC's log.
Uses only ctypes: no CUDA toolkit, no GPU.
"""
import ctypes
import pathlib
import sys

# Keep in sync with stages/src/ops/cuda/mod.rs (checked by a test there).
OPTIONS = ["-std=c++17", "--fmad=true"]

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "stages" / "kernels"


def check(nvrtc, rc, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")


def compile_one(nvrtc, name, src, arch):
    prog = ctypes.c_void_p()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
          "nvrtcCreateProgram")
    opts = OPTIONS + [f"--gpu-architecture={arch.replace('sm_', 'compute_')}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.stderr.write(log.value.decode(errors="replace"))
        check(nvrtc, rc, f"{name} ({arch})")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode(), log.value.decode(errors="replace").strip()


def main():
    lib, out, archs = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    nvrtc = ctypes.CDLL(lib)
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value} ({lib})")
    out.mkdir(parents=True, exist_ok=True)
    common = (KERNELS / "common.cuh").read_text()
    for cu in sorted(KERNELS.glob("*.cu")):
        src = common + "\n#line 1 \"" + cu.name + "\"\n" + cu.read_text()
        for arch in archs:
            ptx, log = compile_one(nvrtc, cu.name, src, arch)
            if log:
                print(log)
            dst = out / f"{cu.stem}.{arch}.ptx"
            dst.write_text(ptx)
            print(f"  {cu.name} -> {dst.name} ({len(ptx)} bytes)")


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        sys.exit(f"error: {e}")

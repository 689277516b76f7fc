//! Checks that need no GPU: the compile options agree with the compile-check script, the
//! kernels compile with NVRTC (when its library is on `LD_LIBRARY_PATH`), every kernel the
//! launchers name exists, and the launch-parameter structs have the kernels' sizes.

use super::launch::{AttnParams, GemmParams, HEAD_DIMS};
use super::*;

fn script_options() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/cuda/compile_check.py"
    );
    let text = std::fs::read_to_string(path).expect("compile-check script");
    let line = text
        .lines()
        .find(|l| l.starts_with("OPTIONS = ["))
        .expect("OPTIONS line in compile_check.py");
    line.trim_start_matches("OPTIONS = [")
        .trim_end_matches(']')
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn options_match_compile_check() {
    assert_eq!(script_options(), NVRTC_OPTIONS.to_vec());
    assert_eq!(
        nvrtc_options("compute_90").last().map(String::as_str),
        Some("--gpu-architecture=compute_90")
    );
}

#[test]
fn program_source_prepends_common_with_line_marker() {
    let s = program_source("x.cu", "int y;");
    assert!(s.starts_with(COMMON));
    assert!(s.ends_with("#line 1 \"x.cu\"\nint y;"));
}

/// Every kernel name the launchers can ask for.
fn launcher_kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for t in ["f32", "bf16", "f16"] {
        for d in HEAD_DIMS {
            for pass in ["fwd_simt", "bwd_delta", "bwd_dkdv", "bwd_dq"] {
                v.push(format!("attn_{pass}_{t}_d{d}"));
            }
            if t != "f32" {
                v.push(format!("attn_fwd_mma_{t}_d{d}"));
            }
        }
        v.push(format!("gemm2_{t}"));
        if t != "f32" {
            v.push(format!("lora_fwd_mma_{t}"));
        }
    }
    v
}

/// The byte size of a kernel's by-value struct parameter, read from its PTX signature
/// (`.param .align 8 .b8 NAME_param_K[SIZE]`).
fn struct_param_size(ptx: &str, kernel: &str) -> Option<usize> {
    let start = ptx.find(&format!(".entry {kernel}("))?;
    let sig = &ptx[start..start + ptx[start..].find(')')?];
    let b8 = sig.rfind(".b8 ")?;
    let open = b8 + sig[b8..].find('[')?;
    let close = open + sig[open..].find(']')?;
    sig[open + 1..close].parse().ok()
}

/// The PTX of one kernel, from its `.entry` to the next one.
fn entry_body<'a>(ptx: &'a str, kernel: &str) -> Option<&'a str> {
    let start = ptx.find(&format!(".entry {kernel}("))?;
    let rest = &ptx[start + 1..];
    Some(&rest[..rest.find(".entry ").unwrap_or(rest.len())])
}

#[test]
#[allow(clippy::print_stderr)] // says why it did nothing
fn kernels_compile_and_match_launchers() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc not on LD_LIBRARY_PATH (.ci/cuda-check.sh provides it)");
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx: Vec<String> = compile_all(arch)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|(_, p)| p.to_src())
            .collect();
        let all = ptx.join("\n");
        for name in launcher_kernel_names() {
            assert!(
                all.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} missing from the PTX"
            );
        }
        for t in ["bf16", "f16"] {
            let mma = format!("mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32");
            for k in [
                format!("attn_fwd_mma_{t}_d128"),
                format!("lora_fwd_mma_{t}"),
            ] {
                assert!(
                    entry_body(&all, &k).is_some_and(|b| b.contains(&mma)),
                    "{arch}: {k} does not use {mma}"
                );
            }
        }
        assert!(
            entry_body(&all, "attn_fwd_simt_bf16_d128").is_some_and(|b| !b.contains("mma.sync")),
            "{arch}: the SIMT kernel must not use tensor cores"
        );
        assert_eq!(
            struct_param_size(&all, "attn_fwd_mma_bf16_d128"),
            Some(std::mem::size_of::<AttnParams>()),
            "AttnParams size differs between Rust and CUDA"
        );
        assert_eq!(
            struct_param_size(&all, "gemm2_f32"),
            Some(std::mem::size_of::<GemmParams>()),
            "GemmParams size differs between Rust and CUDA"
        );
    }
}

#[test]
#[allow(clippy::print_stderr)] // says why it did nothing
fn compile_errors_name_the_file() {
    if !nvrtc_available() {
        eprintln!("skipped: libnvrtc not on LD_LIBRARY_PATH");
        return;
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: nvrtc_options("compute_80"),
        ..Default::default()
    };
    let err = cudarc::nvrtc::compile_ptx_with_opts(
        program_source("broken.cu", "__global__ void k() { undefined_name = 1; }"),
        opts,
    )
    .expect_err("must not compile");
    let log = compile_log(err);
    assert!(log.contains("broken.cu(1)"), "{log}");
}

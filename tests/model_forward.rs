//! End to end: `pipeline model forward` on the llava-tiny fixture writes the logits
//! transformers computed (base, with the PEFT adapter, and merged), and reports bad input
//! files by name with a non-zero exit.
#![cfg(feature = "ml")]

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::{Dtype, SafeTensors};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/fixtures/llava-tiny")
}

/// `name` from a safetensors file as f32 values (f32 or i64 tensors), with its shape.
fn read(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let data = t.data();
    let v = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    (v, t.shape().to_vec())
}

fn forward(extra: &[&str], out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["model", "forward", "--model"])
        .arg(fixture())
        .arg("--inputs")
        .arg(fixture().join("inputs.safetensors"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Compares written logits with the expected tensor on the non-padding rows.
fn assert_matches(out: &Path, expected: &str) {
    let (got, shape) = read(out, "logits");
    let (want, want_shape) = read(&fixture().join("expected.safetensors"), expected);
    assert_eq!(shape, want_shape);
    let (mask, _) = read(&fixture().join("inputs.safetensors"), "attention_mask");
    let vocab = shape[2];
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if mask[i / vocab] == 0.0 {
            continue;
        }
        let d = (g - w).abs();
        assert!(
            d <= 1e-4 + 1e-4 * w.abs(),
            "{expected}: element {i}: got {g}, want {w}"
        );
        worst = worst.max(d);
    }
    assert!(worst < 1e-4, "{expected}: max |Δ| {worst}");
}

#[test]
fn model_forward_writes_transformers_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("base.safetensors");
    let o = forward(&[], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("wrote logits [2, 77, 1024]"));
    assert_matches(&out, "logits");

    let adapter = fixture().join("adapter");
    let out = dir.path().join("lora.safetensors");
    let o = forward(&["--adapter", adapter.to_str().unwrap()], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_matches(&out, "logits_lora");

    let out = dir.path().join("merged.safetensors");
    let o = forward(&["--adapter", adapter.to_str().unwrap(), "--merge"], &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_matches(&out, "logits_merged");
}

#[test]
fn model_forward_names_a_bad_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "qwen2_vl"}"#,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["model", "forward", "--model"])
        .arg(dir.path())
        .arg("--inputs")
        .arg(fixture().join("inputs.safetensors"))
        .arg("--out")
        .arg(dir.path().join("o.safetensors"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("qwen2_vl"),
        "{err}"
    );
}

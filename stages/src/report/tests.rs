use super::*;
use crate::eval::cl_metrics::summarize;

fn run(label: &str, tasks: &[&str], matrix: Vec<Vec<f64>>, losses: &[&[f64]]) -> Run {
    Run {
        label: label.into(),
        tasks: tasks.iter().map(|t| (*t).to_string()).collect(),
        summary: summarize(&matrix).unwrap(),
        matrix,
        losses: tasks
            .iter()
            .zip(losses)
            .map(|(t, l)| LossCurve {
                task: (*t).to_string(),
                steps: (1..=l.len() as u64).collect(),
                loss: l.to_vec(),
            })
            .collect(),
    }
}

const TASKS: [&str; 4] = ["ScienceQA", "TextVQA", "ImageNet", "Grounding"];

/// Two methods: a baseline over two seeds (with losses) and SEFE over one.
fn runs() -> Vec<Run> {
    let lora = |d: f64| {
        run(
            "LoRA",
            &TASKS,
            vec![
                vec![80.0 + d],
                vec![40.0, 90.0 - d],
                vec![20.0, 50.0, 85.0],
                vec![10.0 + d, 30.0, 60.0, 75.0],
            ],
            &[
                &[3.0 + d, 2.0, 1.5],
                &[2.5, 1.2, 0.9],
                &[2.8, 1.9, 1.1],
                &[3.1, 2.2, 1.4],
            ],
        )
    };
    vec![
        lora(0.0),
        run(
            "SEFE (ASD + RegLoRA)",
            &TASKS,
            vec![
                vec![78.0],
                vec![70.0, 88.0],
                vec![65.0, 80.0, 84.0],
                vec![60.0, 75.0, 79.0, 70.0],
            ],
            &[],
        ),
        lora(4.0),
    ]
}

#[test]
fn table_averages_runs_sharing_a_label() {
    let methods = group(runs()).unwrap();
    assert_eq!(methods.len(), 2);
    assert_eq!(methods[0].runs.len(), 2);
    let row = table::MetricRow::of(&methods[0]);
    // MFT per run: (80+90+85+75)/4 = 82.5 and (84+86+85+75)/4 = 82.5: no spread.
    assert_eq!(row.mft.to_string(), "82.50 ± 0.00");
    // MFN per run: (10+30+60+75)/4 = 43.75 and (14+...)/4 = 44.75: mean 44.25, std
    // sqrt(2 * 0.5^2 / 1) = 0.7071.
    assert!((row.mfn.mean - 44.25).abs() < 1e-12);
    assert!((row.mfn.std.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
    assert_eq!(row.mfn.to_string(), "44.25 ± 0.71");
    let single = table::MetricRow::of(&methods[1]);
    assert_eq!(single.runs, 1);
    assert_eq!(single.mfn.std, None);
    let md = table::markdown(&[row, single]);
    assert!(
        md.contains("| LoRA | 2 | 82.50 ± 0.00 | 44.25 ± 0.71 |"),
        "{md}"
    );
    assert!(
        md.contains("| SEFE (ASD + RegLoRA) | 1 | 80.00 | 71.00 |"),
        "{md}"
    );
    // Mean matrix and mean losses of the two LoRA runs.
    let m = methods[0].mean_matrix();
    assert_eq!(m[0], [82.0]);
    assert_eq!(m[3], [12.0, 30.0, 60.0, 75.0]);
    match methods[0].losses() {
        Losses::Mean(2, c) => assert_eq!(c[0].loss, [5.0, 2.0, 1.5]),
        other => panic!("expected a mean over two runs, got {other:?}"),
    }
    assert_eq!(methods[1].losses(), Losses::None);
}

#[test]
fn a_label_over_different_tasks_is_an_error() {
    let mut rs = runs();
    rs[2].tasks.swap(0, 1);
    let e = group(rs).unwrap_err().to_string();
    assert!(
        e.contains("runs labelled `LoRA` disagree on the tasks"),
        "{e}"
    );
}

#[test]
fn renders_files_that_decode_and_are_all_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let files = render(dir.path(), "SEFE on CoIN-mini", runs()).unwrap();
    assert_eq!(
        files,
        [
            "heatmap-1-lora.png",
            "heatmap-1-lora.svg",
            "loss-1-lora.png",
            "loss-1-lora.svg",
            "heatmap-2-sefe-asd-reglora.png",
            "heatmap-2-sefe-asd-reglora.svg",
            "report.md",
            "report.html",
        ]
    );
    // To look at the figures: PIPELINE_KEEP_REPORT=<dir> cargo test -p stages --lib report
    if let Some(keep) = std::env::var_os("PIPELINE_KEEP_REPORT") {
        std::fs::create_dir_all(&keep).unwrap();
        for f in &files {
            std::fs::copy(dir.path().join(f), Path::new(&keep).join(f)).unwrap();
        }
    }
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    for f in files.iter().filter(|f| !f.starts_with("report.")) {
        let bytes = std::fs::read(dir.path().join(f)).unwrap();
        assert!(html.contains(&format!("\"{f}\"")), "report.html lacks {f}");
        assert!(md.contains(&format!("({f})")), "report.md lacks {f}");
        if f.ends_with(".png") {
            let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert!(img.width() > 200 && img.height() > 200, "{f}");
            // Not a blank canvas: white background plus drawn cells, lines and text.
            let distinct: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
            assert!(distinct.len() > 20, "{f}: {} colours", distinct.len());
        } else {
            let svg = String::from_utf8(bytes).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{f}"
            );
            if f.starts_with("heatmap-1") {
                // Row 0 of the mean LoRA matrix, written in its cell, and the task labels.
                assert!(svg.contains(">\n82.0\n</text>"), "{f}");
                assert!(svg.contains(">\nGrounding\n</text>"), "{f}");
            }
        }
    }
    assert!(md.starts_with("# SEFE on CoIN-mini\n"), "{md}");
    assert!(md.contains("| method | runs | MFT"), "{md}");
    assert!(
        md.contains("| Grounding | 12.00 | 30.00 | 60.00 | 75.00 |"),
        "{md}"
    );
    assert!(md.contains("2 runs; the matrix is their mean."), "{md}");
    assert!(html.contains("<td>82.50 ± 0.00</td>"), "{html}");

    // Same inputs, same bytes, file by file.
    let again = tempfile::tempdir().unwrap();
    render(again.path(), "SEFE on CoIN-mini", runs()).unwrap();
    for f in &files {
        assert_eq!(
            std::fs::read(dir.path().join(f)).unwrap(),
            std::fs::read(again.path().join(f)).unwrap(),
            "{f} differs between two renders"
        );
    }
}

#[test]
fn slugs_are_file_safe_and_never_empty() {
    assert_eq!(slug("SEFE (ASD + RegLoRA)"), "sefe-asd-reglora");
    assert_eq!(
        slug("metrics/method=lora,seed=1"),
        "metrics-method-lora-seed-1"
    );
    assert_eq!(slug("¿?"), "method");
}

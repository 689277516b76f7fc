//! `cargo bench -p stages --bench model -- [--model DIR | --preset NAME] [--batch B]
//! [--text-len T] [--lora-rank R] [--steps N] [--new-tokens G] [--only PHASE]`
//!
//! Runs [`stages::model::bench::run`] in the optimized bench profile and prints its JSON
//! report on stdout (the same report `pipeline model bench` prints). `scripts/bench_model.sh`
//! drives it next to the PyTorch reference. `--only forward|lora|full|gen1|gen16` runs that
//! phase alone and prints `{"phase", "wall", "cpu"}` (for profilers).

use std::path::PathBuf;
use std::process::ExitCode;

use stages::model::bench::{BenchOptions, ModelSource, Phase, run, run_phase};

fn parse() -> Result<(ModelSource, BenchOptions, Option<Phase>), String> {
    let mut src = ModelSource::Preset("llava-tiny".into());
    let mut o = BenchOptions::default();
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // cargo passes `--bench` to harness=false targets; ignore it.
        if a == "--bench" {
            continue;
        }
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{a}: `{v}` is not a non-negative integer"))
        };
        match a.as_str() {
            "--model" => src = ModelSource::Dir(PathBuf::from(val()?)),
            "--preset" => src = ModelSource::Preset(val()?),
            "--batch" => o.batch = num(val()?)?,
            "--text-len" => o.text_len = num(val()?)?,
            "--lora-rank" => o.lora_rank = num(val()?)?,
            "--steps" => o.steps = num(val()?)?,
            "--new-tokens" => o.new_tokens = num(val()?)?,
            "--only" => only = Some(val()?.parse()?),
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok((src, o, only))
}

#[allow(clippy::print_stdout, clippy::print_stderr)]
fn main() -> ExitCode {
    stages::model::configure_cpu_runtime();
    let (src, opts, only) = match parse() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("bench model: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(phase) = only {
        return match run_phase(&src, &opts, phase) {
            Ok((wall, cpu)) => {
                println!(
                    "{}",
                    serde_json::json!({"phase": format!("{phase:?}"), "wall": wall, "cpu": cpu})
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench model: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&src, &opts) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench model: {e}");
            ExitCode::FAILURE
        }
    }
}

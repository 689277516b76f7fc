//! Stage kinds for engine tests and benchmarks (feature `testing`): they need no ML and make
//! the executor's behaviour observable.
//!
//! - `test.echo`: writes `p` and the content of its inputs to `out/value.txt`. It also reads
//!   `q` (into its log) without letting it change the output, so a `q` edit reruns the stage
//!   but leaves its dependents cached (early cutoff).
//! - `test.fail`: always fails with `message`.
//! - `test.slow`: `steps` steps of `step_ms` each, reporting progress, checking the cancel
//!   flag between steps and checkpointing the step count, so an interrupted run resumes.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, StageCtx, StageError, StageKind,
};

/// Register the test kinds.
pub fn register(registry: &mut Registry) {
    registry.register(Echo);
    registry.register(Fail);
    registry.register(Slow);
}

fn deps_spec() -> ParamSpec {
    ParamSpec {
        name: "deps",
        ty: ParamType::List(Box::new(ParamType::Ref(ArtifactType::Files))),
        default: Some(json!([])),
        doc: "upstream outputs whose content is copied into this one",
    }
}

fn out_spec() -> Vec<OutputSpec> {
    vec![OutputSpec {
        name: "out",
        ty: ArtifactType::Files,
        doc: "`value.txt`",
    }]
}

/// Concatenate the `value.txt` of every input, in order.
fn read_inputs(ctx: &StageCtx<'_>) -> Result<String, StageError> {
    let mut text = String::new();
    for dir in ctx.inputs.get("deps").into_iter().flatten() {
        let path = dir.join("value.txt");
        let part = std::fs::read_to_string(&path).map_err(|e| StageError::io(&path, e))?;
        text.push_str(&part);
    }
    Ok(text)
}

/// `test.echo`.
#[derive(Debug, Clone, Copy)]
pub struct Echo;

#[derive(Deserialize)]
struct EchoParams {
    p: i64,
    q: i64,
}

impl StageKind for Echo {
    fn kind(&self) -> &'static str {
        "test.echo"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Test kind: output is `p` plus the inputs' content; `q` is read but does not change it."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "p",
                ty: ParamType::Int,
                default: Some(json!(0)),
                doc: "changes the output",
            },
            ParamSpec {
                name: "q",
                ty: ParamType::Int,
                default: Some(json!(0)),
                doc: "hashed, does not change the output",
            },
            deps_spec(),
        ]
    }
    fn outputs(&self, _: &serde_json::Value) -> Vec<OutputSpec> {
        out_spec()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: EchoParams = ctx.params()?;
        let upstream = read_inputs(ctx)?;
        writeln!(ctx.log, "echo {}: p={} q={}", ctx.name, p.p, p.q)
            .map_err(|e| StageError::Other(e.to_string()))?;
        let path = ctx.output("out").join("value.txt");
        std::fs::write(&path, format!("{upstream}p={}\n", p.p))
            .map_err(|e| StageError::io(&path, e))
    }
}

/// `test.fail`.
#[derive(Debug, Clone, Copy)]
pub struct Fail;

impl StageKind for Fail {
    fn kind(&self) -> &'static str {
        "test.fail"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Test kind: always fails."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "message",
                ty: ParamType::Str,
                default: Some(json!("boom")),
                doc: "the error",
            },
            ParamSpec {
                name: "panic",
                ty: ParamType::Bool,
                default: Some(json!(false)),
                doc: "panic instead of failing",
            },
            deps_spec(),
        ]
    }
    fn outputs(&self, _: &serde_json::Value) -> Vec<OutputSpec> {
        out_spec()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        if ctx.params.get("panic").and_then(serde_json::Value::as_bool) == Some(true) {
            // Exercises the executor's guard against buggy kinds.
            panic!("test.fail was asked to panic");
        }
        let message: String = ctx
            .params
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("boom")
            .to_owned();
        Err(StageError::Other(message))
    }
}

/// `test.slow`.
#[derive(Debug, Clone, Copy)]
pub struct Slow;

#[derive(Deserialize)]
struct SlowParams {
    steps: u64,
    step_ms: u64,
}

impl StageKind for Slow {
    fn kind(&self) -> &'static str {
        "test.slow"
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "Test kind: sleeps `steps` × `step_ms`, reporting progress, honouring cancel, resuming \
         from its checkpoint."
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec {
                name: "steps",
                ty: ParamType::Int,
                default: Some(json!(10)),
                doc: "number of steps",
            },
            ParamSpec {
                name: "step_ms",
                ty: ParamType::Int,
                default: Some(json!(100)),
                doc: "milliseconds per step",
            },
            deps_spec(),
        ]
    }
    fn outputs(&self, _: &serde_json::Value) -> Vec<OutputSpec> {
        out_spec()
    }
    fn run(&self, ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        let p: SlowParams = ctx.params()?;
        let upstream = read_inputs(ctx)?;
        let ckpt = ctx.checkpoint_dir.join("step");
        let start: u64 = std::fs::read_to_string(&ckpt)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if start > 0 {
            writeln!(ctx.log, "resuming at step {start}")
                .map_err(|e| StageError::Other(e.to_string()))?;
        }
        for step in start..p.steps {
            if ctx.cancelled() {
                return Err(StageError::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(p.step_ms));
            std::fs::write(&ckpt, (step + 1).to_string()).map_err(|e| StageError::io(&ckpt, e))?;
            ctx.progress.progress(step + 1, p.steps, "sleeping");
        }
        let path = ctx.output("out").join("value.txt");
        std::fs::write(&path, format!("{upstream}slow={}\n", p.steps))
            .map_err(|e| StageError::io(&path, e))
    }
}

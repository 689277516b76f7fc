//! A small registry of test kinds covering every parameter type and several output types,
//! so recipe tests need neither ML nor the executor.

use engine::stage::{
    ArtifactType, OutputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx, StageError,
    StageKind,
};
use serde_json::{Value, json};

/// A kind defined by tables, for tests.
struct Kind {
    name: &'static str,
    params: fn() -> Vec<ParamSpec>,
    outputs: &'static [(&'static str, ArtifactType)],
    cpus: u32,
}

impl StageKind for Kind {
    fn kind(&self) -> &'static str {
        self.name
    }
    fn version(&self) -> u32 {
        1
    }
    fn doc(&self) -> &'static str {
        "test kind"
    }
    fn params(&self) -> Vec<ParamSpec> {
        (self.params)()
    }
    fn outputs(&self, _params: &Value) -> Vec<OutputSpec> {
        self.outputs
            .iter()
            .map(|&(name, ty)| OutputSpec { name, ty, doc: "" })
            .collect()
    }
    fn resources(&self, _params: &Value) -> Resources {
        Resources {
            cpus: self.cpus,
            ..Resources::default()
        }
    }
    fn run(&self, _ctx: &mut StageCtx<'_>) -> Result<(), StageError> {
        Err(StageError::Other("test kinds do not run".into()))
    }
}

fn p(name: &'static str, ty: ParamType, default: Option<Value>) -> ParamSpec {
    ParamSpec {
        name,
        ty,
        default,
        doc: "a test parameter",
    }
}

fn list(t: ParamType) -> ParamType {
    ParamType::List(Box::new(t))
}

/// The registry used by all recipe tests.
pub(crate) fn registry() -> Registry {
    use ArtifactType::*;
    let mut r = Registry::new();
    r.register(Kind {
        name: "data.synth",
        params: || {
            vec![
                p("per_task", ParamType::Table, Some(json!({}))),
                p("size", ParamType::Int, Some(json!(10))),
                p("tasks", list(ParamType::Str), Some(json!([]))),
            ]
        },
        outputs: &[("train", Dataset), ("test", Dataset)],
        cpus: 1,
    });
    r.register(Kind {
        name: "data.rewrite",
        params: || {
            vec![
                p("data", ParamType::Ref(Dataset), None),
                p("x", ParamType::Int, Some(json!(20))),
                p("task", ParamType::Str, Some(json!(""))),
            ]
        },
        outputs: &[("data", Dataset)],
        cpus: 1,
    });
    r.register(Kind {
        name: "train.pretrain",
        params: || {
            vec![
                p("data", ParamType::Ref(Dataset), None),
                p("preset", ParamType::Str, Some(json!("tiny"))),
                p("tokenizer", ParamType::Path, Some(Value::Null)),
            ]
        },
        outputs: &[("model", Model)],
        cpus: 2,
    });
    r.register(Kind {
        name: "train.lora",
        params: || {
            vec![
                p("base", ParamType::Ref(Model), None),
                p("data", ParamType::Ref(Dataset), None),
                p("prev", ParamType::Ref(Model), Some(Value::Null)),
                p("lr", ParamType::Float, Some(json!(1e-4))),
                p("steps", ParamType::Int, Some(json!(10))),
                p(
                    "method",
                    ParamType::Enum(&["lora", "sefe", "asd", "reglora"]),
                    Some(json!("lora")),
                ),
                p("merge", ParamType::Bool, Some(json!(false))),
                p("reglora", ParamType::Table, Some(json!({}))),
            ]
        },
        outputs: &[("model", Model), ("adapter", Adapter)],
        cpus: 2,
    });
    r.register(Kind {
        name: "eval.coin",
        params: || {
            vec![
                p("model", ParamType::Ref(Model), None),
                p("data", ParamType::Ref(Dataset), None),
                p("upto", ParamType::Str, Some(json!(""))),
            ]
        },
        outputs: &[("metrics", Metrics)],
        cpus: 1,
    });
    r.register(Kind {
        name: "eval.cl-metrics",
        params: || vec![p("evals", list(ParamType::Ref(Metrics)), None)],
        outputs: &[("report", Report)],
        cpus: 1,
    });
    // The SEFE shape: train on the previous merged model and its key elements, merge,
    // select the next task's key elements.
    r.register(Kind {
        name: "train.cl",
        params: || {
            vec![
                p("base", ParamType::Ref(Model), None),
                p("data", ParamType::Ref(Dataset), None),
                p("key_elements", ParamType::Ref(Files), Some(Value::Null)),
                p("x", ParamType::Int, Some(json!(20))),
                p("lam", ParamType::Float, Some(json!(0.0))),
                p("task", ParamType::Str, Some(json!(""))),
            ]
        },
        outputs: &[("model", Model), ("adapter", Adapter)],
        cpus: 1,
    });
    r.register(Kind {
        name: "merge",
        params: || {
            vec![
                p("model", ParamType::Ref(Model), None),
                p("adapter", ParamType::Ref(Adapter), Some(Value::Null)),
            ]
        },
        outputs: &[("model", Model)],
        cpus: 1,
    });
    r.register(Kind {
        name: "select.keys",
        params: || vec![p("model", ParamType::Ref(Model), None)],
        outputs: &[("keys", Files)],
        cpus: 1,
    });
    r.register(Kind {
        name: "shell",
        params: || {
            vec![
                p("cmd", ParamType::Str, None),
                p("deps", list(ParamType::RefOrPath), Some(json!([]))),
                p("outs", list(ParamType::Str), Some(json!([]))),
            ]
        },
        outputs: &[("files", Files)],
        cpus: 1,
    });
    r
}

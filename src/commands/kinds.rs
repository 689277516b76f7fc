//! `pipeline kinds`: every stage kind with its parameters, defaults, outputs and docs.

use std::fmt::Write as _;

use engine::stage::ParamType;

use super::{CmdResult, out, registry};
use crate::cli::GlobalArgs;

fn type_name(t: &ParamType) -> String {
    match t {
        ParamType::Bool => "bool".into(),
        ParamType::Int => "int".into(),
        ParamType::Float => "float".into(),
        ParamType::Str => "string".into(),
        ParamType::Enum(values) => values.join("|"),
        ParamType::Path => "path".into(),
        ParamType::Ref(a) => format!(
            "@ref({})",
            serde_json::to_value(a)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
        ParamType::List(inner) => format!("[{}]", type_name(inner)),
        ParamType::Table => "table".into(),
        ParamType::RefOrPath => "@ref|path".into(),
    }
}

pub fn kinds(g: &GlobalArgs) -> CmdResult {
    let registry = registry();
    let mut text = String::new();
    for kind in registry.iter() {
        let params = kind.params();
        if g.json {
            let params: Vec<serde_json::Value> = params
                .iter()
                .map(|p| serde_json::json!({"name": p.name, "type": type_name(&p.ty), "default": p.default, "doc": p.doc}))
                .collect();
            let v = serde_json::json!({"kind": kind.kind(), "version": kind.version(), "doc": kind.doc(), "params": params});
            let _ = writeln!(text, "{v}");
            continue;
        }
        let _ = writeln!(text, "{} (version {})", kind.kind(), kind.version());
        let _ = writeln!(text, "  {}", kind.doc());
        let width = params.iter().map(|p| p.name.len()).max().unwrap_or(0);
        for p in &params {
            let default = match &p.default {
                Some(d) => format!(" = {d}"),
                None => " (required)".to_owned(),
            };
            let _ = writeln!(
                text,
                "    {:<width$}  {}{default}  {}",
                p.name,
                type_name(&p.ty),
                p.doc
            );
        }
        let outputs = kind.outputs(&serde_json::Value::Object(serde_json::Map::new()));
        for o in outputs {
            let _ = writeln!(text, "    -> {}: {}", o.name, o.doc);
        }
        text.push('\n');
    }
    out(&text);
    Ok(0)
}

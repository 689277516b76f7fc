//! `chain`: linking the elements of an expanded stage into a sequence.
//!
//! `chain = true` (or `chain = "<param>"`) links a `foreach` sequence: element `i > 0` gets
//! the parameter `prev` (or the named one) set to `@<stage>/<item i-1>`, so each task trains
//! on the previous task's model while the first keeps what the recipe wrote.

use super::Ctx;
use super::error::did_you_mean;
use super::expand::is_ref_type;
use super::value::{Loc, Table, V};
use crate::stage::StageKind;

/// `chain = true` -> `prev`; `chain = "param"` -> that parameter. It must be a parameter of
/// the kind, and chain needs `foreach`.
pub(crate) fn chain_param(
    name: &str,
    t: &Table,
    has_foreach: bool,
    kind: Option<&dyn StageKind>,
    ctx: &mut Ctx,
) -> Option<(String, Loc)> {
    let e = t.get("chain")?;
    let param = match &e.val.v {
        V::Bool(false) => return None,
        V::Bool(true) => "prev".to_string(),
        V::Str(s) => s.clone(),
        v => {
            ctx.err(
                "bad_value",
                e.val.loc,
                "expected a boolean or a parameter name",
                format!(
                    "`chain` must be `true` or a parameter name, got {}",
                    v.type_name()
                ),
                None,
            );
            return None;
        }
    };
    if !has_foreach {
        ctx.err(
            "bad_value",
            e.key_loc,
            "chain without foreach",
            format!("stage `{name}` has `chain` but no `foreach`"),
            Some("`chain` links the elements of a `foreach` sequence".to_string()),
        );
        return None;
    }
    let kind = kind?;
    let specs = kind.params();
    match specs.iter().find(|s| s.name == param) {
        Some(s) if is_ref_type(&s.ty) => Some((param, e.val.loc)),
        Some(_) => {
            ctx.err(
                "mistyped_param",
                e.val.loc,
                "not a reference parameter",
                format!(
                    "`chain` sets `{param}`, but `{param}` of `{}` is not a reference",
                    kind.kind()
                ),
                None,
            );
            None
        }
        None => {
            let help = did_you_mean(&param, specs.iter().map(|s| s.name)).unwrap_or_else(|| {
                format!(
                    "write `chain = \"<param>\"` naming a reference parameter of `{}`",
                    kind.kind()
                )
            });
            ctx.err(
                "unknown_param",
                e.val.loc,
                "unknown parameter",
                format!(
                    "`chain` sets `{param}`, which `{}` does not have",
                    kind.kind()
                ),
                Some(help),
            );
            None
        }
    }
}

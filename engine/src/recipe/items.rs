//! `foreach` and `matrix`: the elements a stage table expands into.
//!
//! `foreach` (a var name or an inline list) makes one element per item, named
//! `<stage>/<item>`; `matrix` (a table of var names or inline lists) makes one per element of
//! the cartesian product, named `<stage>/<dim>=<value>,...` in the table's key order, last
//! dimension fastest. Items are scalars; their text (see `value::scalar_text`) is what names
//! and `{item}`/`{<dim>}` substitution use, while their typed value is what a dimension named
//! like a parameter sets. Each element knows the element before it in a `chain`.

use super::Ctx;
use super::error::did_you_mean;
use super::value::{Entry, Node, Table, V, scalar_text};

/// Vars are lists of scalars; returns each var's items (None for a bad var, which is
/// reported here once rather than at every use).
pub(crate) fn check_vars(vars: &Table, ctx: &mut Ctx) -> Vec<(String, Option<Vec<Item>>)> {
    vars.iter()
        .map(|e| {
            (
                e.key.clone(),
                items_of(&e.val, &format!("var `{}`", e.key), ctx),
            )
        })
        .collect()
}

/// One item of a `foreach` or `matrix` list: its text (for names and `{item}`) and its value
/// (a matrix dimension named like a parameter sets that parameter to the typed value).
#[derive(Clone)]
pub(crate) struct Item {
    text: String,
    node: Node,
}

fn items_of(node: &Node, what: &str, ctx: &mut Ctx) -> Option<Vec<Item>> {
    let V::Array(items) = &node.v else {
        ctx.err(
            "bad_value",
            node.loc,
            "expected a list",
            format!("{what} must be a list, got {}", node.v.type_name()),
            Some("write e.g. `[\"A\", \"B\"]`".to_string()),
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        match scalar_text(&it.v) {
            Some(text) => out.push(Item {
                text,
                node: it.clone(),
            }),
            None => {
                ctx.err(
                    "bad_value",
                    it.loc,
                    "not a scalar",
                    format!(
                        "items of {what} must be strings, numbers or booleans, got {}",
                        it.v.type_name()
                    ),
                    None,
                );
                return None;
            }
        }
    }
    Some(out)
}

/// A foreach/matrix list: a var name or an inline list.
fn list_of(
    node: &Node,
    what: &str,
    vars_t: &Table,
    vars: &[(String, Option<Vec<Item>>)],
    ctx: &mut Ctx,
) -> Option<Vec<Item>> {
    match &node.v {
        V::Str(var) => match vars.iter().find(|(n, _)| n == var) {
            Some((_, items)) => items.clone(),
            None => {
                let help = did_you_mean(var, vars_t.keys()).unwrap_or_else(|| {
                    "define it under `[vars]` or write an inline list".to_string()
                });
                ctx.err(
                    "unknown_var",
                    node.loc,
                    "no such var",
                    format!("{what} names var `{var}`, which is not defined"),
                    Some(help),
                );
                None
            }
        },
        _ => items_of(node, what, ctx),
    }
}

/// One expansion: its name and substitutions.
pub(crate) struct Element {
    pub name: String,
    pub subs: Vec<(String, String)>,
    /// Matrix dimensions, with their item values (those named like a parameter set it).
    pub dims: Vec<(String, Node)>,
    /// The element before this one in a `chain`: the previous `foreach` item, or the element
    /// one step back along the last `matrix` dimension with the other dimensions equal.
    pub prev: Option<usize>,
}

/// The elements of stage `name`: one plain element, the `foreach` items or the `matrix`
/// product; `None` if the expansion itself is invalid (reported).
pub(crate) fn elements(
    name: &str,
    foreach: Option<&Entry>,
    matrix: Option<&Entry>,
    vars_t: &Table,
    vars: &[(String, Option<Vec<Item>>)],
    ctx: &mut Ctx,
) -> Option<Vec<Element>> {
    let mut elements = Vec::new();
    match (foreach, matrix) {
        (Some(_), Some(m)) => {
            ctx.err(
                "bad_value",
                m.key_loc,
                "second expansion",
                format!("stage `{name}` has both `foreach` and `matrix`"),
                Some("use `matrix` with several dimensions instead".to_string()),
            );
            return None;
        }
        (Some(f), None) => {
            let items = list_of(
                &f.val,
                &format!("`foreach` of stage `{name}`"),
                vars_t,
                vars,
                ctx,
            )?;
            for (i, item) in items.into_iter().enumerate() {
                elements.push(Element {
                    name: format!("{name}/{}", item.text),
                    subs: vec![
                        ("item".to_string(), item.text),
                        ("index".to_string(), i.to_string()),
                    ],
                    dims: Vec::new(),
                    prev: i.checked_sub(1),
                });
            }
        }
        (None, Some(m)) => {
            let V::Table(dims) = &m.val.v else {
                ctx.err(
                    "bad_value",
                    m.val.loc,
                    "expected a table",
                    format!(
                        "`matrix` must be a table of lists, got {}",
                        m.val.v.type_name()
                    ),
                    Some(
                        "write e.g. `matrix = { method = \"methods\", lr = [1e-4, 2e-4] }`"
                            .to_string(),
                    ),
                );
                return None;
            };
            let mut lists = Vec::new();
            for d in dims.iter() {
                let items = list_of(
                    &d.val,
                    &format!("matrix dimension `{}`", d.key),
                    vars_t,
                    vars,
                    ctx,
                )?;
                lists.push((d.key.clone(), items));
            }
            if lists.is_empty() {
                ctx.err(
                    "bad_value",
                    m.val.loc,
                    "empty matrix",
                    format!("`matrix` of stage `{name}` has no dimensions"),
                    None,
                );
                return None;
            }
            elements = product(name, &lists);
        }
        (None, None) => elements.push(Element {
            name: name.to_string(),
            subs: Vec::new(),
            dims: Vec::new(),
            prev: None,
        }),
    }
    Some(elements)
}

/// The cartesian product of the matrix dimensions, in row-major order (last dim fastest).
fn product(name: &str, lists: &[(String, Vec<Item>)]) -> Vec<Element> {
    let mut combos: Vec<Vec<usize>> = vec![Vec::new()];
    for (_, items) in lists {
        combos = combos
            .into_iter()
            .flat_map(|c| (0..items.len()).map(move |j| [c.clone(), vec![j]].concat()))
            .collect();
    }
    combos
        .into_iter()
        .enumerate()
        .map(|(idx, combo)| {
            let mut subs = Vec::with_capacity(lists.len() + 1);
            let mut label = Vec::with_capacity(lists.len());
            let mut dims = Vec::with_capacity(lists.len());
            for ((dim, items), &j) in lists.iter().zip(&combo) {
                label.push(format!("{dim}={}", items[j].text));
                subs.push((dim.clone(), items[j].text.clone()));
                dims.push((dim.clone(), items[j].node.clone()));
            }
            subs.push(("index".to_string(), idx.to_string()));
            // Row-major with the last dimension fastest: one step back along it is the
            // previous element, unless this is the dimension's first item.
            let prev = (combo.last().is_some_and(|&j| j > 0)).then(|| idx - 1);
            Element {
                name: format!("{name}/{}", label.join(",")),
                subs,
                dims,
                prev,
            }
        })
        .collect()
}

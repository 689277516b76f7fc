//! Every `err/*.toml` fixture fails to load; its rendered diagnostic is snapshotted.
//! A fixture's leading `# set: path=value` lines are passed as `--set` overrides.

use std::fs;

use super::{load, render};

fn sets_of(text: &str) -> Vec<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# set: "))
        .collect()
}

fn check(name: &str, expected_codes: &[&str]) {
    let rel = format!("err/{name}.toml");
    let text = fs::read_to_string(super::fixture(&rel)).expect("fixture exists");
    let err = match load(&rel, &sets_of(&text)) {
        Ok(_) => panic!("{rel} loaded, but it is an error fixture"),
        Err(e) => e,
    };
    let codes = err.codes();
    for want in expected_codes {
        let full = format!("pipeline::recipe::{want}");
        assert!(
            codes.contains(&full.as_str()),
            "{rel}: expected {full} among {codes:?}"
        );
    }
    for p in err.problems() {
        assert!(
            p.help_text().is_some() || p.code_str() == "pipeline::recipe::bad_value",
            "{rel}: `{}` has no help line",
            p.message()
        );
    }
    insta::assert_snapshot!(name, render(&err));
}

#[test]
fn toml_syntax() {
    check("toml_syntax", &["toml_syntax"]);
}

#[test]
fn missing_file() {
    check("missing_file", &["missing_file"]);
}

#[test]
fn extends_cycle() {
    check("extends_cycle", &["extends_cycle"]);
}

#[test]
fn unknown_kind() {
    check("unknown_kind", &["unknown_kind"]);
}

#[test]
fn unknown_param() {
    check("unknown_param", &["unknown_param"]);
}

#[test]
fn mistyped_param() {
    check("mistyped_param", &["mistyped_param"]);
}

#[test]
fn missing_param() {
    check("missing_param", &["missing_param"]);
}

#[test]
fn missing_stage() {
    check("missing_stage", &["missing_stage"]);
}

#[test]
fn missing_output() {
    check("missing_output", &["missing_output"]);
}

#[test]
fn output_type() {
    check("output_type", &["output_type"]);
}

#[test]
fn duplicate_stage() {
    check("duplicate_stage", &["duplicate_stage", "duplicate_var"]);
}

#[test]
fn cycle() {
    check("cycle", &["cycle"]);
}

#[test]
fn bad_set() {
    check("bad_set", &["bad_set", "mistyped_param"]);
}

#[test]
fn ambiguous_ref() {
    check("ambiguous_ref", &["ambiguous_ref"]);
}

#[test]
fn bad_values() {
    check(
        "bad_values",
        &[
            "bad_value",
            "bad_name",
            "unknown_key",
            "unknown_var",
            "unknown_param",
        ],
    );
}

#[test]
fn chain_mismatch() {
    check(
        "chain_mismatch",
        &["chain_mismatch", "missing_stage", "bad_value"],
    );
}

#[test]
fn gather_no_match() {
    check("gather_no_match", &["missing_stage", "ambiguous_ref"]);
}

#[test]
fn many_errors_at_once() {
    check("many", &["mistyped_param", "unknown_kind", "missing_stage"]);
}

/// Every fixture in `err/` has a test above (a new fixture without one would go unchecked).
#[test]
fn every_fixture_is_covered() {
    let src = include_str!("errors.rs");
    for entry in fs::read_dir(super::fixture("err")).expect("err dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("utf-8 name");
            assert!(
                src.contains(&format!("\"{stem}\",")),
                "err/{stem}.toml has no test"
            );
        }
    }
}

#[test]
fn unreadable_recipe_is_an_error_not_a_panic() {
    let err = load("err/does_not_exist.toml", &[]).expect_err("missing file");
    assert_eq!(err.codes(), vec!["pipeline::recipe::io"]);
    assert!(err.problems()[0].message().contains("does_not_exist.toml"));
}

/// A required parameter given a value of the wrong type is one problem (mistyped), not two.
#[test]
fn mistyped_required_param_is_not_also_missing() {
    let err = load("err/bad_set.toml", &["prep.cmd=true"]).expect_err("cmd is a string");
    assert_eq!(err.codes(), vec!["pipeline::recipe::mistyped_param"]);
    let err = load("err/bad_set.toml", &["prep.cmd=[1]"]).expect_err("cmd is a string");
    assert_eq!(err.codes(), vec!["pipeline::recipe::mistyped_param"]);
}

//! The loader never panics: not on arbitrary text, not on mutations of a valid recipe, not
//! on arbitrary `--set` arguments. Rendering the resulting diagnostics never panics either.

use std::io::Write as _;

use proptest::prelude::*;

const VALID: &str = include_str!("../fixtures/recipes/ok/coin_chain.toml");

fn load_text(text: &str, sets: &[String]) {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    if let Err(e) = engine::recipe::load(f.path(), sets, &super::kinds::registry()) {
        assert!(!e.problems().is_empty());
        let _ = super::render(&e);
    }
}

/// A mutation: replace the bytes in `at..at+len` (on char boundaries) by `with`.
fn mutate(base: &str, at: usize, len: usize, with: &str) -> String {
    let mut start = at % (base.len() + 1);
    while !base.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (start + len).min(base.len());
    while !base.is_char_boundary(end) {
        end += 1;
    }
    format!("{}{}{}", &base[..start], with, &base[end..])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text(text in "\\PC{0,300}") {
        load_text(&text, &[]);
    }

    #[test]
    fn toml_like_text(text in "(\\[stages\\.[a-z]{1,3}\\]\n|kind = \"(data.synth|train.lora|shell)\"\n|[a-z]{1,5} = (\"@[a-z/*.]{0,8}\"|[0-9]{1,3}|\\[\\]|true|\\{\\})\n|foreach = \\[\"a\"\\]\n|chain = true\n){0,20}") {
        load_text(&text, &[]);
    }

    #[test]
    fn mutated_recipe(edits in proptest::collection::vec((0usize..2000, 0usize..12, "(\\PC{0,6}|@|\\{item\\}|/\\*|\\.|\\[|\\]|=|\"|\n)"), 1..4)) {
        let mut text = VALID.to_string();
        for (at, len, with) in &edits {
            text = mutate(&text, *at, *len, with);
        }
        load_text(&text, &[]);
    }

    #[test]
    fn arbitrary_overrides(sets in proptest::collection::vec("(stages\\.|experiment\\.|vars\\.)?[a-z.]{0,12}(=\\PC{0,12})?", 0..4)) {
        load_text(VALID, &sets);
    }
}

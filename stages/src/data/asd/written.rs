//! Model-written distractors and explanations: the prompts that ask for them and the guard
//! rails that decide whether what came back is used or the rule-based text stands.
//!
//! A model writes text only for converted records whose style needs it: distractors for
//! yes/no (one) and multiple choice (three), an explanation for brief (~20 words) and detailed
//! (~50 words). Each request is one generation, prompted with the record's image and question
//! and told the correct answer, so the model only has to invent what is wrong or explain what
//! is right.
//!
//! **Distractors** come back as lines (or `;`-separated items); list markers (`1.`, `B)`,
//! `-`), surrounding quotes and a final period are removed. A candidate is rejected when it
//! is empty, equals the correct answer (case-insensitively, ignoring a final period) or
//! repeats an earlier one; each rejected or missing slot takes the next rule-based distractor
//! instead and counts as a fallback. **Explanations** have their whitespace collapsed; an
//! empty one falls back to the rule-based explanation. The counts go to the stage log and
//! `asd_model.json` ([`WrittenCounts`]).

use std::sync::LazyLock;

use regex::Regex;
use serde::Serialize;

/// What one converted record needs from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// This many wrong answers.
    Distractors(usize),
    /// An explanation of about this many words.
    Explanation(usize),
}

/// The user message asking for `want` about `question` (already stripped of its image marker
/// and instruction lines) whose correct answer is `answer`. `image` prefixes the `<image>`
/// line, as the training records do.
#[must_use]
pub fn prompt(image: bool, question: &str, answer: &str, want: Want) -> String {
    let ask = match want {
        Want::Distractors(1) => {
            "Write one wrong but plausible answer to this question, in the same \
                                 form as the correct answer."
                .to_string()
        }
        Want::Distractors(k) => format!(
            "Write {k} different wrong but plausible answers to this question, one per line, in \
             the same form as the correct answer."
        ),
        Want::Explanation(words) => format!(
            "Explain in about {words} words why this is the answer, using what the image shows."
        ),
    };
    format!(
        "{}{question}\nThe correct answer is \"{answer}\".\n{ask}",
        if image { "<image>\n" } else { "" }
    )
}

/// A list marker at the start of a line: `1.`, `2)`, `A.`, `b)`, `-`, `*`, `•`.
static MARKER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:\d{1,2}[.)]|[A-Za-z][.)]|[-*•])\s+").expect("a valid regex"));

/// The candidate distractors in a model's reply, cleaned, in order; empty items are dropped
/// (their slots are then missing and filled by the rules).
#[must_use]
pub fn parse_distractors(text: &str) -> Vec<String> {
    text.split(['\n', ';'])
        .map(|item| {
            let t = item.trim();
            let t = MARKER.find(t).map_or(t, |m| &t[m.end()..]);
            let t = t.trim().trim_matches(['"', '\'', '“', '”']).trim();
            t.trim_end_matches('.').trim().to_string()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// An explanation with its whitespace collapsed to single spaces.
#[must_use]
pub fn clean_explanation(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether two answers are the same for the guard rails: case-insensitive, ignoring
/// surrounding space and a final period.
#[must_use]
pub fn same_answer(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim().trim_end_matches('.').trim().to_lowercase();
    norm(a) == norm(b)
}

/// How much of a task's rewriting the model wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WrittenCounts {
    /// Generations run (one per converted yes/no, MCQ, brief or detailed record).
    pub requests: usize,
    /// Distractors the model wrote that were used.
    pub distractors_model: usize,
    /// Distractor slots where the model's candidate was missing, empty, the correct answer or
    /// a repeat, filled by the rules instead.
    pub distractors_fallback: usize,
    /// Explanations the model wrote that were used.
    pub explanations_model: usize,
    /// Empty explanations replaced by the rule-based one.
    pub explanations_fallback: usize,
}

impl WrittenCounts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.distractors_model += other.distractors_model;
        self.distractors_fallback += other.distractors_fallback;
        self.explanations_model += other.explanations_model;
        self.explanations_fallback += other.explanations_fallback;
    }

    /// All fallbacks.
    #[must_use]
    pub fn fallbacks(&self) -> usize {
        self.distractors_fallback + self.explanations_fallback
    }
}

/// The `k` distractors of a record: the model's valid candidates in order, each rejected or
/// missing slot filled with the next unused rule-based distractor (a slot stays empty when
/// the rules have none left).
pub fn merge_distractors(
    model: &[String],
    rules: &[&str],
    answer: &str,
    k: usize,
    counts: &mut WrittenCounts,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(k);
    let fresh = |out: &[String], c: &str| {
        !c.trim().is_empty() && !same_answer(c, answer) && !out.iter().any(|o| same_answer(o, c))
    };
    let mut rules = rules.iter();
    for slot in 0..k {
        if let Some(c) = model.get(slot).filter(|c| fresh(&out, c)) {
            out.push(c.clone());
            counts.distractors_model += 1;
            continue;
        }
        counts.distractors_fallback += 1;
        if let Some(r) = rules.by_ref().find(|r| fresh(&out, r)) {
            out.push((*r).to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_split_and_cleaned() {
        let got = parse_distractors("1. red\n2) \"blue.\"\n\n- green; B. yellow\n  \n* a cat ");
        assert_eq!(got, ["red", "blue", "green", "yellow", "a cat"]);
        // A word that merely starts with a letter and a period is not a marker.
        assert_eq!(parse_distractors("e.g."), ["e.g"]);
        assert_eq!(
            clean_explanation("  It is\n red \t because. "),
            "It is red because."
        );
    }

    #[test]
    fn bad_distractors_fall_back_one_slot_at_a_time() {
        let mut c = WrittenCounts::default();
        let model = [
            "Circle".to_string(),
            "square".to_string(),
            "SQUARE.".to_string(),
        ];
        let got = merge_distractors(&model, &["triangle", "star"], "circle", 3, &mut c);
        // "Circle" is the answer, "SQUARE." repeats "square": both slots take rule distractors.
        assert_eq!(got, ["triangle", "square", "star"]);
        assert_eq!((c.distractors_model, c.distractors_fallback), (1, 2));

        let mut c = WrittenCounts::default();
        let got = merge_distractors(&[], &["star"], "circle", 3, &mut c);
        assert_eq!(got, ["star"], "slots stay empty when the rules run out");
        assert_eq!(c.distractors_fallback, 3);

        let mut c = WrittenCounts::default();
        let got = merge_distractors(&["oval".into()], &["oval", "star"], "circle", 2, &mut c);
        assert_eq!(
            got,
            ["oval", "star"],
            "a rule distractor never repeats a model one"
        );
        assert_eq!((c.distractors_model, c.distractors_fallback), (1, 1));
    }

    #[test]
    fn prompts_carry_the_question_answer_and_request() {
        let p = prompt(true, "What color?", "red", Want::Distractors(3));
        assert!(
            p.starts_with("<image>\nWhat color?\nThe correct answer is \"red\".\n"),
            "{p}"
        );
        assert!(p.contains("3 different wrong"), "{p}");
        let p = prompt(false, "Why?", "because", Want::Explanation(50));
        assert!(
            !p.contains("<image>") && p.contains("about 50 words"),
            "{p}"
        );
    }
}

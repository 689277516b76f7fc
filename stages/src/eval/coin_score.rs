//! CoIN's per-task scoring rules (`llava/eval/CoIN/*.py`), as pure functions.
//!
//! Every task has one [`Rule`] ([`rule_for`]); [`score_task`] pairs predictions with test
//! records and averages the per-record scores ([`score_one`], each in `[0, 1]`) into an
//! accuracy in percent over *all* test records (a missing or unparseable answer scores 0, the
//! denominator is the number of records, as in CoIN).
//!
//! | rule | CoIN task(s) | correct when |
//! |---|---|---|
//! | [`Rule::ScienceQa`] | ScienceQA | the letter parsed by [`parse_letter`] equals the gold letter |
//! | [`Rule::SoftVqa`] | TextVQA | VQA soft accuracy over 10 human answers ([`vqa_soft_accuracy`]); normalized exact match when the record has fewer |
//! | [`Rule::Substring`] | ImageNet | gold ⊂ output or output ⊂ gold, case-sensitive |
//! | [`Rule::Gqa`] | GQA | output lower-cased, trailing `.` stripped, equals the gold |
//! | [`Rule::ExactCi`] | VizWiz, VQAv2 | case-insensitive exact match |
//! | [`Rule::OcrVqa`] | OCRVQA | case-insensitive exact match, and no `Unanswerable` in the output |
//! | [`Rule::Grounding`] | Grounding | IoU of the 4 parsed floats with the gold box > 0.5 |
//!
//! ## Quirks (`faithful`)
//!
//! CoIN's scripts have two known defects. With `faithful = true` they are reproduced, so that
//! numbers compare with published ones; by default the corrected behaviour is used:
//!
//! - **Grounding slicing**: after deleting the brackets, CoIN drops the first and the last
//!   character of the string (`s[1:-1]`), which turns `0.12, 0.34, 0.56, 0.78` into
//!   `.12, 0.34, 0.56, 0.7` — harmless on the first coordinate, truncating on the last.
//! - **ImageNet pairing by position**: CoIN zips the prediction list with the annotation list,
//!   so a prediction file in another order is scored against the wrong questions. Corrected,
//!   predictions are paired by `question_id`. Corrected mode also refuses an empty output,
//!   which the substring test would otherwise accept for every class (`"" in gold`).
//!
//! Boxes: CoIN scales both boxes by `max(w, h)` before the IoU; scaling both boxes by one
//! factor leaves the IoU unchanged, so it is computed on the normalized coordinates directly.

use std::collections::HashMap;

use crate::data::coin::{RecordId, TestRecord, parse_bbox};

/// How a task's answers are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Option-letter parsing (ScienceQA).
    ScienceQa,
    /// VQA soft accuracy with answer normalization (TextVQA).
    SoftVqa,
    /// Substring either way, case-sensitive (ImageNet).
    Substring,
    /// Lower-cased, trailing `.` stripped, exact (GQA).
    Gqa,
    /// Case-insensitive exact match (VizWiz, VQAv2).
    ExactCi,
    /// Case-insensitive exact match; `Unanswerable` anywhere is wrong (OCR-VQA).
    OcrVqa,
    /// Box IoU > 0.5 (Grounding).
    Grounding,
}

/// The rule of a CoIN task, by name; `None` for a task CoIN does not have.
#[must_use]
pub fn rule_for(task: &str) -> Option<Rule> {
    Some(match task {
        "ScienceQA" => Rule::ScienceQa,
        "TextVQA" => Rule::SoftVqa,
        "ImageNet" => Rule::Substring,
        "GQA" => Rule::Gqa,
        "VizWiz" | "VQAv2" => Rule::ExactCi,
        "OCRVQA" => Rule::OcrVqa,
        "Grounding" => Rule::Grounding,
        _ => return None,
    })
}

/// The option letters ScienceQA questions use.
const OPTIONS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

/// CoIN's ScienceQA answer parsing: the whole output is a letter A–E; else it starts with
/// `"X. "`; else exactly one match of `The answer is X.` (any capital, any character after
/// it, as the regex's unescaped `.` allows); else `None` (CoIN's `FAILED`).
#[must_use]
pub fn parse_letter(text: &str) -> Option<char> {
    let mut chars = text.chars();
    let first = chars.next();
    if let (Some(c), None) = (first, chars.clone().next()) {
        return OPTIONS.contains(&c).then_some(c);
    }
    let b = text.as_bytes();
    if b.len() >= 3 && OPTIONS.contains(&char::from(b[0])) && &b[1..3] == b". " {
        return Some(char::from(b[0]));
    }
    const LEAD: &str = "The answer is ";
    let mut found = Vec::new();
    let mut from = 0;
    // Non-overlapping scan like Python's `findall`.
    while let Some(at) = text[from..].find(LEAD) {
        let start = from + at + LEAD.len();
        let mut rest = text[start..].chars();
        match (rest.next(), rest.next()) {
            (Some(l), Some(dot)) if l.is_ascii_uppercase() && dot != '\n' => {
                found.push(l);
                from = start + l.len_utf8() + dot.len_utf8();
            }
            _ => from = start,
        }
    }
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Number words the VQA normalizer turns into digits.
const NUMBERS: [(&str, &str); 11] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
];
const TEN: (&str, &str) = ("ten", "10");
const ARTICLES: [&str; 3] = ["a", "an", "the"];
/// Apostrophe-less spellings the normalizer restores (the common subset of the VQA list).
const CONTRACTIONS: [(&str, &str); 24] = [
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldnt", "couldn't"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hes", "he's"),
    ("im", "i'm"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("ive", "i've"),
    ("shouldnt", "shouldn't"),
    ("thats", "that's"),
    ("theres", "there's"),
    ("theyre", "they're"),
    ("wasnt", "wasn't"),
    ("werent", "weren't"),
    ("whats", "what's"),
    ("wont", "won't"),
    ("wouldnt", "wouldn't"),
    ("youre", "you're"),
];
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

/// Whether `s` has a digit, a comma and a digit in a row (the normalizer's `COMMA_STRIP`).
fn has_digit_comma_digit(s: &str) -> bool {
    s.as_bytes()
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit())
}

/// The TextVQA/VQA answer normalization (EvalAI's answer processor): lower-case, drop `,`
/// and `?`, split `'s`, punctuation removed (glued) or replaced by a space, periods not
/// followed by a digit removed, number words to digits, articles dropped, contractions
/// restored.
#[must_use]
pub fn normalize_vqa(answer: &str) -> String {
    let lowered = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let text = lowered.replace(['\n', '\t'], " ").trim().to_string();
    let mut out = text.clone();
    for p in PUNCT {
        let glued = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = if glued || has_digit_comma_digit(&text) {
            out.replace(p, "")
        } else {
            out.replace(p, " ")
        };
    }
    // `(?!<=\d)(\.)(?!\d)` with Python's `sub(.., .., re.UNICODE)`: the flag lands in the
    // `count` slot (32), so at most 32 periods not followed by a digit are removed.
    let chars: Vec<char> = out.chars().collect();
    let mut stripped = String::with_capacity(out.len());
    let mut removed = 0;
    for (i, &c) in chars.iter().enumerate() {
        let next_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c == '.' && !next_digit && removed < 32 {
            removed += 1;
        } else {
            stripped.push(c);
        }
    }
    let words: Vec<String> = stripped
        .split_whitespace()
        .map(|w| {
            NUMBERS
                .iter()
                .chain(std::iter::once(&TEN))
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| v)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| v)
                .to_string()
        })
        .collect();
    words.join(" ")
}

/// TextVQA soft accuracy of `pred` against the human answers: for each of the `n` leave-one-out
/// subsets, `min(1, matches / 3)`, averaged (answers and prediction normalized).
#[must_use]
pub fn vqa_soft_accuracy(pred: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let pred = normalize_vqa(pred);
    let gts: Vec<String> = answers.iter().map(|a| normalize_vqa(a)).collect();
    let matches = gts.iter().filter(|g| **g == pred).count();
    let total: f64 = gts
        .iter()
        .map(|g| {
            let others = matches - usize::from(*g == pred);
            (others as f64 / 3.0).min(1.0)
        })
        .sum();
    total / gts.len() as f64
}

/// Four floats from a Grounding output: brackets removed, then (faithful) the first and last
/// character dropped as CoIN does, split at commas.
#[must_use]
pub fn parse_box(text: &str, faithful: bool) -> Option<[f64; 4]> {
    let s: String = text.chars().filter(|&c| c != '[' && c != ']').collect();
    let s = if faithful {
        let n = s.chars().count();
        if n < 2 {
            return None;
        }
        s.chars().skip(1).take(n - 2).collect()
    } else {
        s
    };
    let v: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    <[f64; 4]>::try_from(v).ok()
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes (0 for empty or inverted boxes).
#[must_use]
pub fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// A test record lacks what its rule needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {index} (question_id {id}): {msg}")]
pub struct GoldError {
    /// Index in the test file.
    pub index: usize,
    /// Its question id.
    pub id: String,
    /// What is missing.
    pub msg: String,
}

/// The gold answer string of a record.
fn answer(rec: &TestRecord) -> Option<&str> {
    rec.answer.as_deref()
}

/// The record's human answers when it carries CoIN's 10-answer list (`answers`).
fn human_answers(rec: &TestRecord) -> Option<Vec<String>> {
    let list = rec.extra.get("answers")?.as_array()?;
    let v: Vec<String> = list
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    (v.len() == list.len() && v.len() >= 10).then_some(v)
}

/// The score (0..=1) of `pred` for the test record `rec` under `rule`.
///
/// # Errors
/// The record lacks its gold answer (or, for Grounding, a parseable gold box).
pub fn score_one(
    rule: Rule,
    pred: &str,
    rec: &TestRecord,
    index: usize,
    faithful: bool,
) -> Result<f64, GoldError> {
    let fail = |msg: &str| GoldError {
        index,
        id: rec.question_id.to_string(),
        msg: msg.to_string(),
    };
    let need = || answer(rec).ok_or_else(|| fail("no `answer`"));
    let hit = |b: bool| if b { 1.0 } else { 0.0 };
    let pred_t = pred.trim();
    Ok(match rule {
        Rule::ScienceQa => {
            let gold = need()?.trim();
            let gold =
                parse_letter(gold).ok_or_else(|| fail("`answer` is not an option letter"))?;
            hit(parse_letter(pred_t) == Some(gold))
        }
        Rule::SoftVqa => match human_answers(rec) {
            Some(answers) => vqa_soft_accuracy(pred_t, &answers),
            None => hit(normalize_vqa(pred_t) == normalize_vqa(need()?)),
        },
        Rule::Substring => {
            let gold = need()?;
            if !faithful && pred_t.is_empty() {
                0.0
            } else {
                hit(gold.contains(pred_t) || pred_t.contains(gold))
            }
        }
        Rule::Gqa => {
            let norm = |s: &str| s.trim().trim_end_matches('.').to_lowercase();
            hit(norm(pred_t) == norm(need()?))
        }
        Rule::ExactCi => hit(pred_t.to_lowercase() == need()?.trim().to_lowercase()),
        Rule::OcrVqa => {
            let gold = need()?;
            hit(!pred_t.contains("Unanswerable")
                && pred_t.to_lowercase() == gold.trim().to_lowercase())
        }
        Rule::Grounding => {
            let gold_text = rec
                .answer_bbox
                .as_deref()
                .or(rec.answer.as_deref())
                .ok_or_else(|| fail("no `answer_bbox`"))?;
            let gold = parse_bbox(gold_text)
                .ok_or_else(|| fail("`answer_bbox` is not \"[x1, y1, x2, y2]\""))?;
            parse_box(pred_t, faithful).map_or(0.0, |b| hit(iou(b, gold) > 0.5))
        }
    })
}

/// A generated answer to one test question.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<'a> {
    /// The question it answers.
    pub question_id: &'a RecordId,
    /// The model's output.
    pub text: &'a str,
}

/// A task's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskScore {
    /// The rule used.
    pub rule: Rule,
    /// Accuracy in percent over all test records.
    pub accuracy: f64,
    /// Sum of per-record scores (soft accuracy makes it fractional).
    pub correct: f64,
    /// Number of test records (the denominator).
    pub total: usize,
    /// Test records without a prediction (scored 0).
    pub missing: usize,
}

/// Scores `answers` against the task's test `records`. Predictions are paired with records by
/// `question_id`, except for [`Rule::Substring`] with `faithful`, which pairs by position like
/// CoIN.
///
/// # Errors
/// A record without the gold its rule needs.
pub fn score_task(
    rule: Rule,
    answers: &[Answer<'_>],
    records: &[TestRecord],
    faithful: bool,
) -> Result<TaskScore, GoldError> {
    let by_id: HashMap<&RecordId, &str> = answers.iter().map(|a| (a.question_id, a.text)).collect();
    let mut correct = 0.0;
    let mut missing = 0;
    for (i, rec) in records.iter().enumerate() {
        let pred = if faithful && rule == Rule::Substring {
            answers.get(i).map(|a| a.text)
        } else {
            by_id.get(&rec.question_id).copied()
        };
        match pred {
            Some(p) => correct += score_one(rule, p, rec, i, faithful)?,
            None => missing += 1,
        }
    }
    let total = records.len();
    let accuracy = if total == 0 {
        0.0
    } else {
        100.0 * correct / total as f64
    };
    Ok(TaskScore {
        rule,
        accuracy,
        correct,
        total,
        missing,
    })
}

#[cfg(test)]
#[path = "coin_score_tests.rs"]
mod tests;

//! Answer Style Diversification (ASD, SEFE §1.4): rewrite X % of a task's training records
//! into the four answer styles the task does not natively use, so that every task's training
//! set carries the same mix of styles and a later task cannot teach the model to answer
//! earlier tasks in the wrong format.
//!
//! ## Counts and rounding
//!
//! For a task with `n` training records, `total = floor(n · x / 100)` records are converted.
//! They are split over the four non-native styles in [`AnswerStyle::ALL`] order: each gets
//! `total / 4`, and the first `total % 4` of them one more ([`style_counts`]). Which records
//! are converted, and into which style, is a seeded shuffle of the record indices (the first
//! `counts[0]` shuffled indices become the first style, and so on), so the choice is
//! deterministic for a seed and independent of the record order's meaning. `x = 0` converts
//! nothing: the output records equal the input ones.
//!
//! ## Styles
//!
//! Each converted record keeps its id, image and any later turns; its first question/answer
//! pair is rewritten and its human turn ends with a response-format prompt (RFP, [`rfp`])
//! naming the style. The record also gets an `answer_style` field (LLaVA's loader ignores
//! unknown fields) so analyses can tell converted records apart.
//!
//! | style | question | answer |
//! |---|---|---|
//! | yes/no | the question + `Is the correct answer "<cand>"?` | `Yes` / `No` (candidate: the answer or a distractor, 50/50) |
//! | MCQ | the question + up to four lettered options | the letter |
//! | short | the question (ScienceQA: without its options) | the answer text |
//! | brief | the question | the answer, then an explanation of about 20 words |
//! | detail | the question | the answer, then an explanation of about 50 words |
//!
//! The native instruction line(s) of the question (CoIN's last line, e.g. "Answer the question
//! using a single word or phrase.") are removed before the RFP is added.
//!
//! **Distractors** are other answers of the same task and question type (ScienceQA: the other
//! options of the question itself). The question type comes from the synthetic scene sidecar
//! when there is one, otherwise from the first two words of the question ("what color", "how
//! many"...). **Explanations** are the scene's ground-truth sentences for synthetic data, and
//! fixed templates otherwise, padded with neutral sentences to the target length.
//!
//! ## Model-written text
//!
//! As in SEFE, a model can write the distractors and explanations instead ([`written`] for
//! the prompts and guard rails, [`writer`] for the generation). The rewrite is then done in
//! two steps: [`TaskPlan::new`] picks the records and styles exactly as the rules do and
//! lists the [`TextRequest`]s (the record's image, question, answer and what it needs);
//! [`TaskPlan::finish`] takes the replies and builds the records, falling back to the rules
//! for every reply the guard rails reject. Without replies, `finish` is the rule-based
//! rewrite, byte for byte ([`rewrite_task`]).
//!
//! Test sets are not rewritten: evaluation scores each task in its native style, and CoIN's
//! test questions already end with their native instruction, so no RFP is added to them.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::data::coin::{
    AnswerStyle, IMAGE_TOKEN, TrainRecord, Turn, native_style, strip_image_token,
};
use crate::data::synth_coin::SceneInfo;
use crate::data::synth_coin::tasks::{MCQ_INSTRUCTION, SHORT_INSTRUCTION, VIZWIZ_INSTRUCTION};

pub mod writer;
pub mod written;

use written::{Want, WrittenCounts, clean_explanation, merge_distractors, parse_distractors};

/// The response-format prompt of each style (the last line of a converted question).
#[must_use]
pub fn rfp(style: AnswerStyle) -> &'static str {
    match style {
        AnswerStyle::YesNo => "Answer with Yes or No.",
        AnswerStyle::Mcq => MCQ_INSTRUCTION,
        AnswerStyle::Short => SHORT_INSTRUCTION,
        AnswerStyle::Brief => {
            "Answer the question, then explain your answer briefly in about 20 words."
        }
        AnswerStyle::Detail => {
            "Answer the question, then explain your answer in detail in about 50 words."
        }
    }
}

/// Instruction lines stripped from the end of a question before the RFP is added.
const INSTRUCTIONS: [&str; 3] = [SHORT_INSTRUCTION, MCQ_INSTRUCTION, VIZWIZ_INSTRUCTION];

/// The four styles a task with native style `native` is converted into, in fixed order.
#[must_use]
pub fn non_native(native: AnswerStyle) -> Vec<AnswerStyle> {
    AnswerStyle::ALL
        .into_iter()
        .filter(|s| *s != native)
        .collect()
}

/// How many records go to each non-native style: `floor(n·x/100)` split evenly, the remainder
/// to the first styles.
#[must_use]
pub fn style_counts(n: usize, x: u32) -> [usize; 4] {
    let total = n * x as usize / 100;
    let mut out = [total / 4; 4];
    for c in out.iter_mut().take(total % 4) {
        *c += 1;
    }
    out
}

/// A record's first question/answer, split into parts.
struct Qa {
    /// The question without image marker, instruction lines or (ScienceQA) options.
    base: String,
    /// The answer as text (ScienceQA: the chosen option's text).
    answer: String,
    /// Options parsed from an MCQ question.
    options: Vec<String>,
    qtype: String,
}

fn parse_qa(
    rec: &TrainRecord,
    native: AnswerStyle,
    scenes: Option<&BTreeMap<String, SceneInfo>>,
) -> Qa {
    let q = strip_image_token(&rec.conversations[0].value);
    let a = rec.conversations[1].value.trim().to_string();
    let mut lines: Vec<&str> = q.lines().collect();
    while lines
        .last()
        .is_some_and(|l| INSTRUCTIONS.contains(&l.trim()))
    {
        lines.pop();
    }
    let mut options = Vec::new();
    let mut answer = a.clone();
    if native == AnswerStyle::Mcq {
        // Option lines "A. text"; the answer letter picks one.
        let mut kept = Vec::new();
        for l in lines {
            let t = l.trim();
            let b = t.as_bytes();
            if b.len() > 3 && b[0].is_ascii_uppercase() && b[1] == b'.' && b[2] == b' ' {
                options.push(t[3..].to_string());
            } else {
                kept.push(l);
            }
        }
        lines = kept;
        let letter = a.trim_end_matches('.').trim();
        if letter.len() == 1
            && let Some(i) = letter.bytes().next().map(|c| c.wrapping_sub(b'A') as usize)
            && i < options.len()
        {
            answer = options[i].clone();
        }
    }
    let base = lines.join("\n").trim().to_string();
    let key = rec.id.to_string();
    let qtype = scenes
        .and_then(|s| s.get(&key))
        .map(|s| s.qtype.clone())
        .unwrap_or_else(|| infer_qtype(&base, &answer));
    Qa {
        base,
        answer,
        options,
        qtype,
    }
}

/// Question type of a record without scene information: yes/no answers form one type, the
/// rest are grouped by the question's first two words.
fn infer_qtype(question: &str, answer: &str) -> String {
    if matches!(answer.to_lowercase().as_str(), "yes" | "no") {
        return "yes/no".into();
    }
    let words: Vec<String> = question
        .split_whitespace()
        .take(2)
        .map(|w| w.to_lowercase())
        .collect();
    words.join(" ")
}

/// Words too common to say a fact is relevant.
const STOPWORDS: [&str; 14] = [
    "", "a", "an", "the", "is", "are", "of", "in", "to", "and", "this", "what", "there", "image",
];

fn normalize_word(w: &str) -> String {
    w.trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Neutral sentences used when the facts run short (templates for real data).
const FILLERS: [&str; 6] = [
    "The relevant part of the image is clearly visible and leaves little doubt.",
    "Other details in the picture do not change this conclusion.",
    "Checking the visual evidence against the question confirms it.",
    "This is the option that agrees with what the image actually shows.",
    "Nothing else in the scene fits the question as well.",
    "Looking again at the whole picture gives the same result.",
];

/// The answer followed by an explanation, about `target` words in all: the scene facts (if
/// any) that fit, a sentence tying them to the answer, then neutral sentences until at least
/// 4/5 of the target is reached (so at most one sentence past it).
fn explained_answer(
    rng: &mut StdRng,
    facts: &[String],
    question: &str,
    answer: &str,
    target: usize,
) -> String {
    let head = format!("{}.", answer.trim_end_matches('.'));
    let mut n = word_count(&head);
    let mut parts: Vec<String> = vec![head];
    let max = target + target / 4;
    let short = format!("So the answer is {answer}.");
    // Most relevant facts first (sharing words with the question and answer), random among
    // equals, so a short explanation keeps the fact that actually supports the answer.
    let mut facts: Vec<&String> = facts.iter().collect();
    facts.shuffle(rng);
    let key: BTreeSet<String> = format!("{question} {answer}")
        .split_whitespace()
        .map(normalize_word)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .collect();
    facts.sort_by_key(|f| {
        std::cmp::Reverse(
            f.split_whitespace()
                .filter(|w| key.contains(&normalize_word(w)))
                .count(),
        )
    });
    for f in facts {
        if n + word_count(f) + word_count(&short) <= max {
            n += word_count(f);
            parts.push(f.clone());
        }
    }
    let first_line = question.lines().next().unwrap_or("").trim();
    let long = format!("So for the question \"{first_line}\" the answer is {answer}.");
    let tie = if !first_line.is_empty() && n + word_count(&long) <= max {
        long
    } else {
        short
    };
    n += word_count(&tie);
    parts.push(tie);
    let mut fill: Vec<&str> = FILLERS.to_vec();
    fill.shuffle(rng);
    for f in fill {
        if n >= target * 4 / 5 {
            break;
        }
        n += word_count(f);
        parts.push(f.to_string());
    }
    parts.join(" ")
}

/// Distractor pools: distinct answers per question type (sorted, so the pools do not depend on
/// record order).
fn pools(qas: &[Qa]) -> BTreeMap<&str, Vec<&str>> {
    let mut sets: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for qa in qas {
        sets.entry(qa.qtype.as_str())
            .or_default()
            .insert(qa.answer.as_str());
    }
    sets.into_iter()
        .map(|(k, v)| (k, v.into_iter().collect()))
        .collect()
}

/// Up to `k` wrong answers: the question's own other options (MCQ-native tasks), else other
/// answers of the same question type; the whole task's answers when that type has none.
fn distractors<'a>(
    rng: &mut StdRng,
    qa: &'a Qa,
    pool: &[&'a str],
    task_pool: &[&'a str],
    k: usize,
) -> Vec<&'a str> {
    let same = |x: &str| x.trim().eq_ignore_ascii_case(qa.answer.trim());
    let mut cands: Vec<&str> = if qa.options.len() > 1 {
        qa.options
            .iter()
            .map(String::as_str)
            .filter(|o| !same(o))
            .collect()
    } else {
        pool.iter().copied().filter(|o| !same(o)).collect()
    };
    cands.dedup();
    cands.shuffle(rng);
    cands.truncate(k);
    // Other types' answers are obviously wrong options, so they only fill in when the type
    // offers no distractor at all.
    if cands.is_empty() && k > 0 {
        let mut more: Vec<&str> = task_pool
            .iter()
            .copied()
            .filter(|o| !same(o) && !cands.contains(o))
            .collect();
        more.shuffle(rng);
        cands.extend(more.into_iter().take(k));
    }
    cands
}

/// What a style needs written: distractors (yes/no one, MCQ three) or an explanation (brief
/// ~20 words, detailed ~50); nothing for short answers.
#[must_use]
pub fn want(style: AnswerStyle) -> Option<Want> {
    match style {
        AnswerStyle::YesNo => Some(Want::Distractors(1)),
        AnswerStyle::Mcq => Some(Want::Distractors(3)),
        AnswerStyle::Short => None,
        AnswerStyle::Brief => Some(Want::Explanation(20)),
        AnswerStyle::Detail => Some(Want::Explanation(50)),
    }
}

/// The distractors of a converted record: the rule-based ones, replaced by the model's
/// (through the guard rails) when it wrote some. The rule draw always happens, so the
/// record's RNG stream is the same with or without a model up to this point.
fn pick_distractors<'a>(
    rng: &mut StdRng,
    qa: &'a Qa,
    pools: (&[&'a str], &[&'a str]),
    k: usize,
    model: Option<(&str, &mut WrittenCounts)>,
) -> Vec<std::borrow::Cow<'a, str>> {
    let rules = distractors(rng, qa, pools.0, pools.1, k);
    match model {
        None => rules.into_iter().map(Into::into).collect(),
        Some((text, counts)) => {
            merge_distractors(&parse_distractors(text), &rules, &qa.answer, k, counts)
                .into_iter()
                .map(Into::into)
                .collect()
        }
    }
}

/// Convert one record into `style`; `model` is the model's reply for it (when one was asked
/// for) and the counts its guard rails update.
fn convert(
    rng: &mut StdRng,
    rec: &TrainRecord,
    qa: &Qa,
    style: AnswerStyle,
    pools: (&[&str], &[&str]),
    facts: &[String],
    model: Option<(&str, &mut WrittenCounts)>,
) -> TrainRecord {
    let (body, answer) = match style {
        AnswerStyle::YesNo => {
            let d = pick_distractors(rng, qa, pools, 1, model);
            let yes = d.is_empty() || rng.random_bool(0.5);
            let cand = if yes {
                qa.answer.as_str()
            } else {
                d[0].as_ref()
            };
            (
                format!("{}\nIs the correct answer \"{cand}\"?", qa.base),
                if yes { "Yes" } else { "No" }.to_string(),
            )
        }
        AnswerStyle::Mcq => {
            let mut opts = pick_distractors(rng, qa, pools, 3, model);
            opts.push(qa.answer.as_str().into());
            opts.shuffle(rng);
            let letters = ["A", "B", "C", "D"];
            let lines: Vec<String> = opts
                .iter()
                .zip(letters)
                .map(|(o, l)| format!("{l}. {o}"))
                .collect();
            let idx = opts.iter().position(|o| *o == qa.answer).unwrap_or(0);
            (
                format!("{}\n{}", qa.base, lines.join("\n")),
                letters[idx].to_string(),
            )
        }
        AnswerStyle::Short => (qa.base.clone(), qa.answer.clone()),
        AnswerStyle::Brief | AnswerStyle::Detail => {
            let target = if style == AnswerStyle::Brief { 20 } else { 50 };
            let written = model.and_then(|(text, counts)| {
                let e = clean_explanation(text);
                if e.is_empty() {
                    counts.explanations_fallback += 1;
                    None
                } else {
                    counts.explanations_model += 1;
                    Some(format!("{}. {e}", qa.answer.trim_end_matches('.')))
                }
            });
            let answer = written
                .unwrap_or_else(|| explained_answer(rng, facts, &qa.base, &qa.answer, target));
            (qa.base.clone(), answer)
        }
    };
    let had_image = rec.conversations[0].value.starts_with(IMAGE_TOKEN);
    let human = format!(
        "{}{body}\n{}",
        if had_image { "<image>\n" } else { "" },
        rfp(style)
    );
    let mut out = rec.clone();
    out.conversations[0] = Turn::human(human);
    out.conversations[1] = Turn::gpt(answer);
    out.extra
        .insert("answer_style".into(), Value::String(style.name().into()));
    out
}

/// What [`rewrite_task`] / [`TaskPlan::finish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsdSummary {
    /// Records converted into each style.
    pub converted: BTreeMap<AnswerStyle, usize>,
    /// Records left in the native style.
    pub native: usize,
    /// How much a model wrote (`None`: rule-based only).
    pub written: Option<WrittenCounts>,
}

/// One converted record's request to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    /// Index of the record in the task's training file.
    pub record: usize,
    /// The record's id (for messages).
    pub id: String,
    /// The style it is converted into.
    pub style: AnswerStyle,
    /// What the style needs.
    pub want: Want,
    /// The record's image, relative to the dataset's image root.
    pub image: Option<String>,
    /// The question, without image marker, instruction lines or (ScienceQA) options.
    pub question: String,
    /// The correct answer as text.
    pub answer: String,
}

/// One task's rewrite, decided but not yet written: which records become which style, with
/// each record's own RNG (so records can be finished with or without model text and the
/// others do not change).
pub struct TaskPlan<'a> {
    task: String,
    /// The stage seed salted with the task.
    seed: u64,
    records: &'a [TrainRecord],
    scenes: Option<&'a BTreeMap<String, SceneInfo>>,
    styles: Vec<AnswerStyle>,
    counts: [usize; 4],
    /// Per record: its style and the seed of its RNG, `None` when it stays native.
    assign: Vec<Option<(AnswerStyle, u64)>>,
    qas: Vec<Qa>,
}

impl<'a> TaskPlan<'a> {
    /// Plan the rewrite of the training records of `task` with ASD at `x` percent.
    ///
    /// `scenes` is the synthetic generator's ground truth by record id (facts for
    /// explanations, question types for distractors); `None` for real data.
    #[must_use]
    pub fn new(
        task: &str,
        records: &'a [TrainRecord],
        scenes: Option<&'a BTreeMap<String, SceneInfo>>,
        x: u32,
        seed: u64,
    ) -> Self {
        let native = native_style(task);
        let styles = non_native(native);
        let counts = style_counts(records.len(), x);
        let mut order: Vec<usize> = (0..records.len()).collect();
        // One stream per task, so adding a task does not change the others' rewrite.
        let seed = seed ^ task_salt(task);
        let mut rng = StdRng::seed_from_u64(seed);
        order.shuffle(&mut rng);
        let mut style_of: Vec<Option<AnswerStyle>> = vec![None; records.len()];
        let mut at = 0;
        for (style, &c) in styles.iter().zip(&counts) {
            for &i in &order[at..at + c] {
                style_of[i] = Some(*style);
            }
            at += c;
        }
        // Record seeds are drawn in record order, after the shuffle.
        let assign = style_of
            .into_iter()
            .map(|s| s.map(|s| (s, rng.random())))
            .collect();
        let qas = records
            .iter()
            .map(|r| parse_qa(r, native, scenes))
            .collect();
        Self {
            task: task.to_string(),
            seed,
            records,
            scenes,
            styles,
            counts,
            assign,
            qas,
        }
    }

    /// The task's name.
    #[must_use]
    pub fn task(&self) -> &str {
        &self.task
    }

    /// The seed for the model's sampling: the stage seed salted with the task, so tasks
    /// draw different streams.
    #[must_use]
    pub fn text_seed(&self) -> u64 {
        self.seed
    }

    /// What a model would be asked for: one request per converted record whose style needs
    /// distractors or an explanation, in record order.
    #[must_use]
    pub fn requests(&self) -> Vec<TextRequest> {
        self.assign
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let (style, _) = (*a)?;
                let want = want(style)?;
                let (rec, qa) = (&self.records[i], &self.qas[i]);
                Some(TextRequest {
                    record: i,
                    id: rec.id.to_string(),
                    style,
                    want,
                    image: rec.image.clone(),
                    question: qa.base.clone(),
                    answer: qa.answer.clone(),
                })
            })
            .collect()
    }

    /// Build the rewritten records. `replies` holds the model's raw reply per record index
    /// (from [`Self::requests`]); `None` rewrites with the rules alone.
    #[must_use]
    pub fn finish(
        &self,
        replies: Option<&BTreeMap<usize, String>>,
    ) -> (Vec<TrainRecord>, AsdSummary) {
        let pools = pools(&self.qas);
        let task_pool: Vec<&str> = self
            .qas
            .iter()
            .map(|q| q.answer.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut written = replies.map(|_| WrittenCounts::default());
        let mut out = Vec::with_capacity(self.records.len());
        for (i, rec) in self.records.iter().enumerate() {
            let Some((style, rec_seed)) = self.assign[i] else {
                out.push(rec.clone());
                continue;
            };
            let qa = &self.qas[i];
            let pool = pools.get(qa.qtype.as_str()).map_or(&[][..], Vec::as_slice);
            let facts = self
                .scenes
                .and_then(|s| s.get(&rec.id.to_string()))
                .map_or(&[][..], |s| s.facts.as_slice());
            let model = match (replies, written.as_mut(), want(style)) {
                (Some(r), Some(w), Some(_)) => {
                    w.requests += 1;
                    Some((r.get(&i).map_or("", String::as_str), w))
                }
                _ => None,
            };
            let mut rec_rng = StdRng::seed_from_u64(rec_seed);
            out.push(convert(
                &mut rec_rng,
                rec,
                qa,
                style,
                (pool, &task_pool),
                facts,
                model,
            ));
        }
        let converted = self
            .styles
            .iter()
            .zip(self.counts)
            .map(|(s, c)| (*s, c))
            .collect();
        (
            out,
            AsdSummary {
                converted,
                native: self.records.len() - self.counts.iter().sum::<usize>(),
                written,
            },
        )
    }
}

/// FNV-1a of the task name: salts the task's RNG stream.
fn task_salt(task: &str) -> u64 {
    task.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Rewrite the training records of `task` with ASD at `x` percent, with rule-based
/// distractors and explanations ([`TaskPlan`] without model replies).
///
/// `scenes` is the synthetic generator's ground truth by record id (facts for explanations,
/// question types for distractors); `None` for real data.
#[must_use]
pub fn rewrite_task(
    task: &str,
    records: &[TrainRecord],
    scenes: Option<&BTreeMap<String, SceneInfo>>,
    x: u32,
    seed: u64,
) -> (Vec<TrainRecord>, AsdSummary) {
    TaskPlan::new(task, records, scenes, x, seed).finish(None)
}

/// The style a rewritten record was converted into (`None`: native).
#[must_use]
pub fn record_style(rec: &TrainRecord) -> Option<AnswerStyle> {
    rec.extra
        .get("answer_style")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_down_and_spread_the_remainder() {
        assert_eq!(style_counts(400, 20), [20, 20, 20, 20]);
        assert_eq!(style_counts(10, 20), [1, 1, 0, 0]);
        assert_eq!(style_counts(7, 50), [1, 1, 1, 0]);
        assert_eq!(style_counts(100, 0), [0; 4]);
        assert_eq!(style_counts(3, 100), [1, 1, 1, 0]);
    }

    #[test]
    fn scienceqa_options_are_parsed() {
        let rec: TrainRecord = serde_json::from_value(serde_json::json!({
            "id": "s1", "image": "a.png",
            "conversations": [{"from": "human", "value": format!("<image>\nWhich shape?\nA. circle\nB. square\n{MCQ_INSTRUCTION}")},
                              {"from": "gpt", "value": "B"}]})).unwrap();
        let qa = parse_qa(&rec, AnswerStyle::Mcq, None);
        assert_eq!(qa.base, "Which shape?");
        assert_eq!(qa.answer, "square");
        assert_eq!(qa.options, ["circle", "square"]);
        assert_eq!(qa.qtype, "which shape?");
    }

    fn record(id: usize, question: &str, answer: &str) -> TrainRecord {
        serde_json::from_value(serde_json::json!({
            "id": format!("r{id}"), "image": format!("{id}.png"),
            "conversations": [
                {"from": "human", "value": format!("<image>\n{question}\n{SHORT_INSTRUCTION}")},
                {"from": "gpt", "value": answer}]}))
        .unwrap()
    }

    fn records() -> Vec<TrainRecord> {
        let colors = ["red", "blue", "green", "yellow", "purple", "orange"];
        (0..24)
            .map(|i| record(i, "What color is the shape?", colors[i % colors.len()]))
            .collect()
    }

    #[test]
    fn empty_replies_fall_back_to_exactly_the_rule_based_records() {
        let recs = records();
        let plan = TaskPlan::new("GQA", &recs, None, 100, 5);
        let requests = plan.requests();
        // GQA's native style is short: its four other styles all need text.
        assert_eq!(requests.len(), 24);
        let empty: BTreeMap<usize, String> =
            requests.iter().map(|r| (r.record, String::new())).collect();
        let (rules, s0) = plan.finish(None);
        let (fallen, s1) = plan.finish(Some(&empty));
        assert_eq!(rules, fallen);
        assert_eq!(s0.written, None);
        let w = s1.written.unwrap();
        assert_eq!(w.requests, 24);
        assert_eq!((w.distractors_model, w.explanations_model), (0, 0));
        // 6 yes/no (one slot), 6 MCQ (three slots), 6 + 6 explanations.
        assert_eq!((w.distractors_fallback, w.explanations_fallback), (24, 12));
    }

    #[test]
    fn replies_land_in_their_records() {
        let recs = records();
        let plan = TaskPlan::new("GQA", &recs, None, 100, 5);
        let requests = plan.requests();
        let replies: BTreeMap<usize, String> = requests
            .iter()
            .map(|r| {
                let text = match r.want {
                    Want::Distractors(_) => format!("{}\nteal\nmagenta\nteal", r.answer),
                    Want::Explanation(n) => format!("  The shape is {}\n({n}). ", r.answer),
                };
                (r.record, text)
            })
            .collect();
        let (out, s) = plan.finish(Some(&replies));
        let w = s.written.unwrap();
        // The answer (first line) and the repeated "teal" are rejected: yes/no falls back in
        // its one slot, MCQ keeps "teal" and "magenta" and falls back in its first slot.
        assert_eq!(w.explanations_model, 12);
        assert_eq!(w.distractors_model, 6 * 2);
        assert_eq!(w.distractors_fallback, 6 + 6);
        for r in &requests {
            let rec = &out[r.record];
            let (q, a) = (&rec.conversations[0].value, &rec.conversations[1].value);
            match r.style {
                AnswerStyle::Mcq => {
                    assert!(q.contains(". teal\n") && q.contains(". magenta\n"), "{q}");
                    assert_eq!(q.matches("teal").count(), 1, "{q}");
                }
                AnswerStyle::YesNo => {
                    assert!(!q.contains("teal") && (a == "Yes" || a == "No"), "{q} {a}");
                }
                _ => {
                    let n = if r.style == AnswerStyle::Brief {
                        20
                    } else {
                        50
                    };
                    assert_eq!(
                        *a,
                        format!("{}. The shape is {} ({n}).", r.answer, r.answer)
                    );
                }
            }
        }
    }

    #[test]
    fn explanations_hit_their_length() {
        let mut rng = StdRng::seed_from_u64(1);
        let facts = ["There is a red circle in the top left of the image.".to_string()];
        for (target, lo, hi) in [(20, 14, 32), (50, 38, 70)] {
            for f in [&facts[..], &[]] {
                let e = explained_answer(&mut rng, f, "What is it?", "circle", target);
                let n = word_count(&e);
                assert!((lo..=hi).contains(&n), "{n} words: {e}");
            }
        }
    }
}

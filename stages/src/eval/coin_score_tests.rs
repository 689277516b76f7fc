//! Hand-written cases for every CoIN scoring rule and both quirks.

use serde_json::json;

use super::*;

fn rec(id: i64, answer: &str) -> TestRecord {
    serde_json::from_value(json!({"question_id": id, "text": "q", "answer": answer})).unwrap()
}

fn one(rule: Rule, pred: &str, gold: &str) -> f64 {
    score_one(rule, pred, &rec(1, gold), 0, false).unwrap()
}

#[test]
fn rules_cover_every_coin_task() {
    for t in crate::data::coin::TASKS {
        assert!(rule_for(t).is_some(), "{t}");
    }
    assert_eq!(rule_for("VizWiz"), Some(Rule::ExactCi));
    assert_eq!(rule_for("MMBench"), None);
}

#[test]
fn scienceqa_letter_parsing_in_coin_order() {
    assert_eq!(parse_letter("B"), Some('B'));
    assert_eq!(parse_letter("F"), None);
    assert_eq!(parse_letter("C. a cat"), Some('C'));
    // "X." without the space is not the second form.
    assert_eq!(parse_letter("C.cat"), None);
    assert_eq!(parse_letter("I think so. The answer is D."), Some('D'));
    // Any character may follow the letter (unescaped `.` in CoIN's regex).
    assert_eq!(parse_letter("The answer is A!"), Some('A'));
    // Two matches is FAILED, as is none.
    assert_eq!(parse_letter("The answer is A. The answer is B."), None);
    assert_eq!(parse_letter("The answer is A"), None);
    assert_eq!(parse_letter("b"), None);
    assert_eq!(parse_letter(""), None);
    assert_eq!(one(Rule::ScienceQa, "A", "A"), 1.0);
    assert_eq!(one(Rule::ScienceQa, "A. yes", "B"), 0.0);
    assert_eq!(one(Rule::ScienceQa, "garbage", "A"), 0.0);
    assert!(score_one(Rule::ScienceQa, "A", &rec(1, "maybe"), 3, false).is_err());
}

#[test]
fn vqa_normalization() {
    assert_eq!(normalize_vqa("The Two Dogs."), "2 dogs");
    assert_eq!(normalize_vqa("a red car"), "red car");
    assert_eq!(normalize_vqa("dont"), "don't");
    assert_eq!(normalize_vqa("3.5"), "3.5");
    assert_eq!(normalize_vqa("1,000"), "1000");
    assert_eq!(normalize_vqa("black-white"), "black white");
    assert_eq!(normalize_vqa("black - white"), "black white");
    assert_eq!(normalize_vqa("what?"), "what");
    assert_eq!(normalize_vqa("man's hat"), "man 's hat");
}

#[test]
fn textvqa_soft_accuracy_leave_one_out() {
    let ten = |hits: usize| -> Vec<String> {
        (0..10)
            .map(|i| {
                if i < hits {
                    "stop".to_string()
                } else {
                    format!("other{i}")
                }
            })
            .collect()
    };
    // 3+ matches: every subset of 9 still has >= 3 (when 4+) -> 1.
    assert!((vqa_soft_accuracy("STOP", &ten(4)) - 1.0).abs() < 1e-12);
    // Exactly 3: the 3 subsets that drop a match see 2 (2/3), the other 7 see 3 (1).
    let want = (3.0 * (2.0 / 3.0) + 7.0) / 10.0;
    assert!((vqa_soft_accuracy("stop", &ten(3)) - want).abs() < 1e-12);
    // One match: 1 subset sees 0, 9 see 1/3.
    assert!((vqa_soft_accuracy("stop.", &ten(1)) - 0.3).abs() < 1e-12);
    assert_eq!(vqa_soft_accuracy("go", &ten(3)), 0.0);

    let mut r = rec(1, "stop");
    r.extra.insert("answers".into(), json!(ten(1)));
    assert!((score_one(Rule::SoftVqa, "stop", &r, 0, false).unwrap() - 0.3).abs() < 1e-12);
    // Without 10 answers: normalized exact match on `answer`.
    assert_eq!(one(Rule::SoftVqa, "The Stop.", "stop"), 1.0);
    assert_eq!(one(Rule::SoftVqa, "stops", "stop"), 0.0);
}

#[test]
fn imagenet_substring_either_way_case_sensitive() {
    assert_eq!(
        one(Rule::Substring, "a golden retriever", "golden retriever"),
        1.0
    );
    assert_eq!(one(Rule::Substring, "retriever", "golden retriever"), 1.0);
    assert_eq!(
        one(Rule::Substring, "Golden Retriever", "golden retriever"),
        0.0
    );
    assert_eq!(one(Rule::Substring, "tabby cat", "golden retriever"), 0.0);
    // Empty output: CoIN's `"" in gold` accepts it; corrected refuses it.
    assert_eq!(one(Rule::Substring, "", "cat"), 0.0);
    assert_eq!(
        score_one(Rule::Substring, "", &rec(1, "cat"), 0, true).unwrap(),
        1.0
    );
}

#[test]
fn imagenet_quirk_pairs_by_position() {
    let recs = vec![rec(10, "cat"), rec(11, "dog")];
    let (a, b) = (RecordId::Int(10), RecordId::Int(11));
    // Predictions listed in the other order.
    let answers = [
        Answer {
            question_id: &b,
            text: "dog",
        },
        Answer {
            question_id: &a,
            text: "cat",
        },
    ];
    let fixed = score_task(Rule::Substring, &answers, &recs, false).unwrap();
    assert_eq!((fixed.correct, fixed.accuracy), (2.0, 100.0));
    let faithful = score_task(Rule::Substring, &answers, &recs, true).unwrap();
    assert_eq!((faithful.correct, faithful.accuracy), (0.0, 0.0));
}

#[test]
fn gqa_lowercase_and_trailing_period() {
    assert_eq!(one(Rule::Gqa, "Left.", "left"), 1.0);
    assert_eq!(one(Rule::Gqa, "left..", "left"), 1.0);
    assert_eq!(one(Rule::Gqa, "the left", "left"), 0.0);
}

#[test]
fn exact_case_insensitive_and_ocr_unanswerable() {
    assert_eq!(one(Rule::ExactCi, "Unanswerable", "unanswerable"), 1.0);
    assert_eq!(one(Rule::ExactCi, "2 ", "2"), 1.0);
    assert_eq!(one(Rule::ExactCi, "two", "2"), 0.0);
    assert_eq!(one(Rule::OcrVqa, "HARRY POTTER", "Harry Potter"), 1.0);
    assert_eq!(one(Rule::OcrVqa, "Unanswerable", "Unanswerable"), 0.0);
    assert_eq!(one(Rule::OcrVqa, "harry", "Harry Potter"), 0.0);
}

fn boxed(gold: &str) -> TestRecord {
    serde_json::from_value(
        json!({"question_id": 5, "text": "q", "answer_bbox": gold, "size": [64, 48]}),
    )
    .unwrap()
}

#[test]
fn grounding_iou_and_parsing() {
    assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]), 1.0);
    assert!((iou([0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0]) - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(iou([0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 3.0]), 0.0);
    assert_eq!(iou([1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]), 0.0);
    let g = boxed("[0.10, 0.10, 0.50, 0.50]");
    let s = |p: &str, f: bool| score_one(Rule::Grounding, p, &g, 0, f).unwrap();
    assert_eq!(s("[0.10, 0.10, 0.50, 0.50]", false), 1.0);
    assert_eq!(s("[0.12, 0.11, 0.49, 0.52]", false), 1.0);
    assert_eq!(s("[0.30, 0.30, 0.70, 0.70]", false), 0.0);
    assert_eq!(s("a box", false), 0.0);
    assert_eq!(s("[0.1, 0.1, 0.5]", false), 0.0);
    // IoU exactly 0.5 is not enough: [0, 0, .5, .5] vs [0, 0, .5, .25] -> 0.5.
    let half = boxed("[0.0, 0.0, 0.5, 0.5]");
    assert_eq!(
        score_one(Rule::Grounding, "[0.0, 0.0, 0.5, 0.25]", &half, 0, false).unwrap(),
        0.0
    );
    assert!(score_one(Rule::Grounding, "[0,0,1,1]", &rec(1, "left"), 0, false).is_err());
}

#[test]
fn grounding_quirk_drops_first_and_last_character() {
    assert_eq!(
        parse_box("[0.12, 0.34, 0.56, 0.78]", true),
        Some([0.12, 0.34, 0.56, 0.7])
    );
    assert_eq!(
        parse_box("[0.12, 0.34, 0.56, 0.78]", false),
        Some([0.12, 0.34, 0.56, 0.78])
    );
    // A last coordinate of one digit loses everything: unparseable.
    assert_eq!(parse_box("[0.1, 0.2, 0.3, 1]", true), None);
    // The truncation flips a borderline case.
    let g = boxed("[0.00, 0.00, 0.50, 0.50]");
    // Corrected: [.0,.0,.5,.29] -> IoU .58 (> .5). Faithful reads .2 -> IoU .4 (wrong).
    let p = "[0.00, 0.00, 0.50, 0.29]";
    assert_eq!(score_one(Rule::Grounding, p, &g, 0, false).unwrap(), 1.0);
    assert_eq!(score_one(Rule::Grounding, p, &g, 0, true).unwrap(), 0.0);
}

#[test]
fn task_accuracy_counts_missing_as_wrong() {
    let recs = vec![rec(1, "a"), rec(2, "b"), rec(3, "c"), rec(4, "d")];
    let ids: Vec<RecordId> = (1..=3).map(RecordId::Int).collect();
    let answers: Vec<Answer<'_>> = ids
        .iter()
        .zip(["A", "x", "c"])
        .map(|(id, t)| Answer {
            question_id: id,
            text: t,
        })
        .collect();
    let s = score_task(Rule::ExactCi, &answers, &recs, false).unwrap();
    assert_eq!(s.total, 4);
    assert_eq!(s.missing, 1);
    assert_eq!(s.correct, 2.0);
    assert_eq!(s.accuracy, 50.0);
    let bad =
        vec![serde_json::from_value::<TestRecord>(json!({"question_id": 9, "text": "q"})).unwrap()];
    let id = RecordId::Int(9);
    let e = score_task(
        Rule::Gqa,
        &[Answer {
            question_id: &id,
            text: "x",
        }],
        &bad,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("question_id 9"), "{e}");
}

//! `asd.rewrite` with a `model` writing distractors and explanations, end to end through
//! `StageKind::run` with hand-built contexts: a tiny synth-coin dataset and the `llava-tiny`
//! fixture model (random weights, so its text is noise, but noise that changes with the image,
//! the question and the seed). Checks that every converted record is well-formed for its style
//! and counted, that the output is deterministic for a seed, that rejected text falls back to
//! the rules and is counted, and that without `model` the output is the rule-based rewrite,
//! byte for byte the same as before the option existed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use engine::stage::{NoProgress, Resources, StageCtx, StageError, StageKind};
use serde_json::{Value, json};
use stages::data::asd::{rfp, style_counts};
use stages::data::coin::{AnswerStyle, DatasetInfo, TrainRecord, read_train};
use stages::kinds::coin_data::{ASD_MODEL_FILE, AsdRewrite, Coin, SynthCoin};

const COIN_MINI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/coin-mini");
const LLAVA_TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llava-tiny");

/// Runs `kind` in `work` with `params` over the kind's defaults (as the recipe layer fills
/// them) and `inputs` as references; returns the `dataset` output and the log.
fn run(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, &Path)],
    seed: u64,
) -> Result<(PathBuf, String), StageError> {
    let out_dir = work.join("out");
    let ckpt = work.join("ckpt");
    std::fs::create_dir_all(out_dir.join("dataset")).unwrap();
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut full = serde_json::Map::new();
    for s in kind.params() {
        if let Some(d) = s.default {
            full.insert(s.name.to_string(), d);
        }
    }
    for (k, v) in params.as_object().unwrap() {
        full.insert(k.clone(), v.clone());
    }
    for (k, p) in inputs {
        full.insert((*k).to_string(), json!(p.to_str().unwrap()));
    }
    let params = Value::Object(full);
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, p)| ((*k).to_string(), vec![p.to_path_buf()]))
        .collect();
    let mut log = Vec::new();
    let mut ctx = StageCtx {
        name: "asd",
        recipe_dir: work,
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        checkpoint_dir: &ckpt,
        seed,
        cancel: Arc::new(AtomicBool::new(false)),
        progress: &NoProgress,
        log: &mut log,
        resources: Resources::default(),
    };
    kind.run(&mut ctx)?;
    Ok((out_dir.join("dataset"), String::from_utf8(log).unwrap()))
}

/// A synth-coin dataset with `train` records per task.
fn synth(work: &Path, train: usize) -> PathBuf {
    let params = json!({"per_task": {"train": train, "test": 1}, "pretrain": 0, "image_size": 64});
    run(&SynthCoin, work, params, &[], 5).unwrap().0
}

/// `asd.rewrite` of `data` at `x`, with the fixture model when `params` names sampling
/// settings (`Some`), rules only otherwise.
fn asd(
    data: &Path,
    work: &Path,
    x: i64,
    seed: u64,
    params: Option<Value>,
) -> Result<(PathBuf, String), StageError> {
    let mut p = json!({ "x": x });
    let model = Path::new(LLAVA_TINY);
    let mut inputs = vec![("data", data)];
    if let Some(extra) = params {
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        inputs.push(("model", model));
    }
    run(&AsdRewrite, work, p, &inputs, seed)
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn style_of(rec: &TrainRecord) -> Option<AnswerStyle> {
    rec.extra
        .get("answer_style")
        .map(|s| serde_json::from_value(s.clone()).unwrap())
}

/// The lettered option lines of an MCQ question.
fn options(human: &str) -> Vec<&str> {
    human
        .lines()
        .filter(|l| l.len() > 3 && l.as_bytes()[0].is_ascii_uppercase() && &l[1..3] == ". ")
        .map(|l| &l[3..])
        .collect()
}

/// A converted record is well-formed for its style: one RFP as the last line, a Yes/No
/// answer to a quoted candidate, a valid letter among 2-4 distinct options, an answer followed
/// by a non-empty explanation.
fn check_record(style: AnswerStyle, rec: &TrainRecord) {
    let human = &rec.conversations[0].value;
    let answer = &rec.conversations[1].value;
    assert_eq!(human.lines().last(), Some(rfp(style)), "{human}");
    assert_eq!(
        human.matches(rfp(style)).count(),
        1,
        "one RFP only: {human}"
    );
    match style {
        AnswerStyle::YesNo => {
            assert!(answer == "Yes" || answer == "No", "{answer}");
            assert!(human.contains("Is the correct answer \""), "{human}");
        }
        AnswerStyle::Mcq => {
            let opts = options(human);
            assert!((2..=4).contains(&opts.len()), "{human}");
            let distinct: BTreeSet<String> = opts.iter().map(|o| o.to_lowercase()).collect();
            assert_eq!(distinct.len(), opts.len(), "options repeat: {human}");
            assert!(
                answer.len() == 1 && ((answer.as_bytes()[0] - b'A') as usize) < opts.len(),
                "{answer} for {human}"
            );
        }
        AnswerStyle::Short => assert!(!answer.trim().is_empty()),
        AnswerStyle::Brief | AnswerStyle::Detail => {
            let (head, rest) = answer
                .split_once(". ")
                .unwrap_or_else(|| panic!("{answer}"));
            assert!(!head.is_empty() && !rest.trim().is_empty(), "{answer}");
        }
    }
}

/// Per task: (style counts, MCQ records, yes/no records, explained records).
fn census(out: &Path) -> BTreeMap<String, (BTreeMap<AnswerStyle, usize>, usize, usize, usize)> {
    let info = DatasetInfo::load(out).unwrap();
    let mut per = BTreeMap::new();
    for e in &info.tasks {
        let recs = read_train(&out.join(&e.train)).unwrap();
        let mut styles: BTreeMap<AnswerStyle, usize> = BTreeMap::new();
        for r in &recs {
            if let Some(s) = style_of(r) {
                check_record(s, r);
                *styles.entry(s).or_default() += 1;
            }
        }
        let n = |s| styles.get(&s).copied().unwrap_or(0);
        let explained = n(AnswerStyle::Brief) + n(AnswerStyle::Detail);
        let (mcq, yes_no) = (n(AnswerStyle::Mcq), n(AnswerStyle::YesNo));
        per.insert(e.name.clone(), (styles, mcq, yes_no, explained));
    }
    per
}

fn summary(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join(ASD_MODEL_FILE)).unwrap()).unwrap()
}

const SAMPLING: &str =
    r#"{"max_new_tokens": 12, "batch_size": 4, "temperature": 0.9, "top_p": 0.95}"#;

#[test]
#[allow(clippy::print_stderr)] // a sample of the model's text, for `--nocapture`
fn model_written_records_are_well_formed_counted_and_deterministic() {
    let t = tempfile::tempdir().unwrap();
    let data = synth(&t.path().join("synth"), 8);
    let sampling: Value = serde_json::from_str(SAMPLING).unwrap();
    let (out, log) = asd(&data, &t.path().join("a"), 50, 7, Some(sampling.clone())).unwrap();

    let info = DatasetInfo::load(&out).unwrap();
    let input = DatasetInfo::load(&data).unwrap();
    let per = census(&out);
    let s = summary(&out);
    for (e, orig) in info.tasks.iter().zip(&input.tasks) {
        let before = read_train(&data.join(&orig.train)).unwrap();
        let after = read_train(&out.join(&e.train)).unwrap();
        // Same ids in the same order; the untouched records are byte-equal.
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.id, b.id);
            if style_of(a).is_none() {
                assert_eq!(a, b);
            }
        }
        // floor(8 * 50 / 100) = 4 records, one per non-native style.
        let (styles, mcq, yes_no, explained) = &per[&e.name];
        assert_eq!(
            styles.values().copied().collect::<Vec<_>>(),
            style_counts(8, 50).to_vec(),
            "{}",
            e.name
        );
        assert!(!styles.contains_key(&e.native_style));
        // Every style but short asks the model once; every slot is counted once.
        let w = &s["tasks"][&e.name];
        assert_eq!(w["requests"], json!(mcq + yes_no + explained), "{}", e.name);
        assert_eq!(
            w["distractors_model"].as_u64().unwrap() + w["distractors_fallback"].as_u64().unwrap(),
            (3 * mcq + yes_no) as u64,
            "{}: {w}",
            e.name
        );
        assert_eq!(
            w["explanations_model"].as_u64().unwrap()
                + w["explanations_fallback"].as_u64().unwrap(),
            *explained as u64,
            "{}: {w}",
            e.name
        );
        assert!(log.contains(&format!("{:<10} model: requests {}", "", w["requests"])));
    }
    let total = &s["total"];
    assert_eq!(s["max_new_tokens"], json!(12));
    assert!(
        total["explanations_model"].as_u64().unwrap() > 0
            && total["distractors_model"].as_u64().unwrap() > 0,
        "the model wrote nothing: {total}"
    );
    assert!(log.contains("model total: requests"), "{log}");

    // The model's text is in the records: explanations differ from the rule-based ones.
    let (rules, _) = asd(&data, &t.path().join("rules"), 50, 7, None).unwrap();
    assert!(!rules.join(ASD_MODEL_FILE).exists());
    let changed = info
        .tasks
        .iter()
        .flat_map(|e| {
            let a = read_train(&out.join(&e.train)).unwrap();
            let b = read_train(&rules.join(&e.train)).unwrap();
            a.into_iter()
                .zip(b)
                .filter(|(x, y)| x != y)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    assert!(
        changed
            .iter()
            .all(|(a, b)| a.id == b.id && style_of(a) == style_of(b)),
        "the model changes text only, never which records convert into which style"
    );
    let explained_changed = changed
        .iter()
        .filter(|(a, _)| matches!(style_of(a), Some(AnswerStyle::Brief | AnswerStyle::Detail)))
        .count() as u64;
    assert_eq!(
        explained_changed,
        total["explanations_model"].as_u64().unwrap(),
        "every explanation the model wrote replaced a rule-based one"
    );

    if let Some((a, _)) = changed.first() {
        eprintln!("{total}\nfirst changed record: {:?}", a.conversations);
    }

    // Same seed, same bytes; another seed, other text.
    let (again, _) = asd(&data, &t.path().join("b"), 50, 7, Some(sampling.clone())).unwrap();
    assert!(tree(&out) == tree(&again), "same seed, same bytes");
    let (reseeded, _) = asd(&data, &t.path().join("c"), 50, 8, Some(sampling)).unwrap();
    assert!(tree(&out) != tree(&reseeded), "the seed changes the output");
}

#[test]
fn rejected_text_falls_back_to_the_rules_and_is_counted() {
    let t = tempfile::tempdir().unwrap();
    let data = synth(&t.path().join("synth"), 8);
    // One token per reply: at most one distractor per MCQ record, so at least two of its
    // three slots must come from the rules.
    let one = json!({"max_new_tokens": 1, "temperature": 0.0});
    let (out, log) = asd(&data, &t.path().join("a"), 100, 3, Some(one)).unwrap();
    let per = census(&out);
    let s = summary(&out);
    for (task, (_, mcq, yes_no, _)) in &per {
        let w = &s["tasks"][task];
        let fallback = w["distractors_fallback"].as_u64().unwrap();
        assert!(fallback >= 2 * *mcq as u64, "{task}: {w}");
        assert_eq!(
            w["distractors_model"].as_u64().unwrap() + fallback,
            (3 * mcq + yes_no) as u64,
            "{task}: {w}"
        );
    }
    let total = &s["total"];
    assert!(total["distractors_fallback"].as_u64().unwrap() > 0);
    assert!(
        log.contains(&format!(
            "fallback {}",
            total["distractors_fallback"].as_u64().unwrap()
        )),
        "{log}"
    );
}

#[test]
fn sampling_parameters_and_model_dir_are_checked() {
    let t = tempfile::tempdir().unwrap();
    let data = synth(&t.path().join("synth"), 4);
    let e = asd(
        &data,
        &t.path().join("a"),
        50,
        1,
        Some(json!({"max_new_tokens": 0})),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`max_new_tokens` = 0"), "{e}");
    let e = asd(
        &data,
        &t.path().join("b"),
        50,
        1,
        Some(json!({"top_p": 1.5})),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("top_p"), "{e}");
    let e = run(
        &AsdRewrite,
        &t.path().join("c"),
        json!({"x": 50}),
        &[("data", &data), ("model", &data)],
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tokenizer.json") || e.contains("config.json"),
        "{e}"
    );
}

/// 64-bit FNV-1a over each file's name and bytes, in name order.
fn digest(files: &BTreeMap<String, Vec<u8>>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, bytes) in files {
        for b in name.bytes().chain([0]).chain(bytes.iter().copied()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Without `model`, the rewrite of the hand-written `coin-mini` fixture is the same bytes as
/// before the option existed: the digests below were recorded from the rule-based
/// `asd.rewrite` as it was then, and no summary file appears.
#[test]
fn without_a_model_the_rewrite_is_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let (coin, _) = run(
        &Coin,
        &t.path().join("coin"),
        json!({"root": COIN_MINI}),
        &[],
        1,
    )
    .unwrap();
    for (x, seed, want) in [(100, 3, GOLDEN_X100_S3), (40, 9, GOLDEN_X40_S9)] {
        let (out, _) = asd(&coin, &t.path().join(format!("x{x}")), x, seed, None).unwrap();
        let files: BTreeMap<String, Vec<u8>> = tree(&out)
            .into_iter()
            .filter(|(k, _)| k.ends_with(&format!("train_x{x}.json")))
            .collect();
        assert_eq!(files.len(), 8);
        assert!(!out.join(ASD_MODEL_FILE).exists());
        assert_eq!(digest(&files), want, "x = {x}, seed {seed}");
    }
}

const GOLDEN_X100_S3: u64 = 0x8049_ae78_c9e5_167c;
const GOLDEN_X40_S9: u64 = 0xf230_c219_c630_73b1;

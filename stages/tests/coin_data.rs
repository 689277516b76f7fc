//! The CoIN data kinds end to end through `StageKind::run` with a hand-built `StageCtx`:
//! `data.synth-coin` (determinism, CoIN format, native styles, speed), `data.coin` (the
//! `coin-mini` fixture and broken copies of it) and `asd.rewrite` (counts, styles, identity).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use engine::stage::{NoProgress, Resources, StageCtx, StageError, StageKind};
use serde_json::{Value, json};
use stages::data::asd::{rfp, style_counts};
use stages::data::coin::{AnswerStyle, DatasetInfo, TASKS, parse_bbox, read_test, read_train};
use stages::kinds::coin_data::{AsdRewrite, Coin, SynthCoin};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/coin-mini");

/// Threads granted to a run: 3 when the work directory's name ends in `-3cpu`, else 2.
fn cpus(work: &Path) -> u32 {
    if work.to_string_lossy().ends_with("-3cpu") {
        3
    } else {
        2
    }
}

/// Run `kind` with `params` (all of them, defaults included) into `work/out`; returns the
/// `dataset` output directory and the log.
fn run(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: BTreeMap<String, Vec<PathBuf>>,
    seed: u64,
) -> Result<(PathBuf, String), StageError> {
    let out_dir = work.join("out");
    let ckpt = work.join("ckpt");
    std::fs::create_dir_all(out_dir.join("dataset")).unwrap();
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut log = Vec::new();
    let mut ctx = StageCtx {
        name: "coin",
        recipe_dir: work,
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        checkpoint_dir: &ckpt,
        seed,
        cancel: Arc::new(AtomicBool::new(false)),
        progress: &NoProgress,
        log: &mut log,
        resources: Resources {
            cpus: cpus(work),
            ..Resources::default()
        },
    };
    kind.run(&mut ctx)?;
    Ok((out_dir.join("dataset"), String::from_utf8(log).unwrap()))
}

fn synth(work: &Path, train: usize, test: usize, pretrain: usize, seed: u64) -> PathBuf {
    let params =
        json!({"per_task": {"train": train, "test": test}, "pretrain": pretrain, "image_size": 64});
    run(&SynthCoin, work, params, BTreeMap::new(), seed)
        .expect("synth-coin runs")
        .0
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn synth_coin_is_deterministic_and_seed_sensitive() {
    let t = tempfile::tempdir().unwrap();
    let a = tree(&synth(&t.path().join("a"), 12, 4, 6, 7));
    let b = tree(&synth(&t.path().join("b"), 12, 4, 6, 7));
    let c = tree(&synth(&t.path().join("c"), 12, 4, 6, 8));
    assert!(a.len() > 8 * 16, "{} files", a.len());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert!(
            b[k] == *v,
            "{} differs between two runs with the same seed",
            k.display()
        );
    }
    let differing = a.iter().filter(|(k, v)| c.get(*k) != Some(v)).count();
    assert!(
        differing > a.len() / 2,
        "only {differing} of {} files change with the seed",
        a.len()
    );
}

#[test]
fn synth_coin_matches_coin_format_and_native_styles() {
    let t = tempfile::tempdir().unwrap();
    let dir = synth(t.path(), 60, 30, 40, 3);
    let info = DatasetInfo::load(&dir).unwrap();
    assert_eq!(
        info.tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        TASKS
    );
    assert_eq!(info.image_size, Some(64));
    assert_eq!(info.image_root, ".");
    let mut all_qids = BTreeSet::new();
    for entry in &info.tasks {
        assert_eq!(
            entry.train,
            format!("annotations/{}/train.json", entry.name)
        );
        let train = read_train(&dir.join(&entry.train)).unwrap();
        let test = read_test(&dir.join(&entry.test)).unwrap();
        assert_eq!((train.len(), test.len()), (60, 30));
        for r in &train {
            let img = r.image.as_deref().unwrap();
            let pic = image::open(info.image_path(&dir, img)).unwrap();
            assert_eq!((pic.width(), pic.height()), (64, 64));
            assert!(r.conversations[0].value.starts_with("<image>\n"));
            assert_eq!(r.conversations.len(), 2);
        }
        for r in &test {
            assert!(
                all_qids.insert(r.question_id.clone()),
                "question ids unique across tasks"
            );
            assert!(info.image_path(&dir, r.image.as_deref().unwrap()).is_file());
        }
        let answers: Vec<&str> = train
            .iter()
            .map(|r| r.conversations[1].value.as_str())
            .chain(test.iter().map(|r| r.answer.as_deref().unwrap()))
            .collect();
        let distinct: BTreeSet<&str> = answers.iter().copied().collect();
        assert!(
            distinct.len() >= 3,
            "{}: answers should vary: {distinct:?}",
            entry.name
        );
        match entry.name.as_str() {
            "ScienceQA" => {
                assert_eq!(entry.native_style, AnswerStyle::Mcq);
                assert!(answers.iter().all(|a| ["A", "B", "C", "D"].contains(a)));
                assert!(test.iter().all(|r| r.text.ends_with(
                    "Answer with the option's letter from the given choices directly."
                )));
            }
            "Grounding" => {
                for r in &test {
                    let b = parse_bbox(r.answer_bbox.as_deref().unwrap()).unwrap();
                    assert!(
                        b[0] < b[2] && b[1] < b[3] && b.iter().all(|v| (0.0..=1.0).contains(v)),
                        "{b:?}"
                    );
                    assert_eq!(r.size, Some([64, 64]));
                }
                assert!(answers.iter().all(|a| parse_bbox(a).is_some()));
            }
            "VizWiz" => assert!(answers.contains(&"unanswerable") && distinct.len() > 1),
            "ImageNet" => assert!(
                distinct
                    .iter()
                    .all(|a| ["house", "tree", "car", "sun", "flag", "fish"].contains(a))
            ),
            "GQA" => assert!(
                answers
                    .iter()
                    .any(|a| ["left", "right", "above", "below"].contains(a))
            ),
            "VQAv2" => assert!(answers.iter().any(|a| a.parse::<u32>().is_ok())),
            "TextVQA" => assert!(
                answers
                    .iter()
                    .all(|a| a.chars().all(|c| c.is_ascii_lowercase()))
            ),
            _ => {}
        }
        if entry.name != "Grounding" {
            assert!(
                test.iter()
                    .all(|r| r.answer_bbox.is_none() && r.size.is_none())
            );
        }
    }
    let pre = info.pretrain.as_ref().unwrap();
    let caps = read_train(&dir.join(&pre.file)).unwrap();
    assert_eq!(caps.len(), 40);
    for r in &caps {
        let q = &r.conversations[0].value;
        // No task instruction and no task answer format leaks into the captioning split.
        assert!(
            !q.contains("Answer") && !q.contains("bounding box") && !q.contains("\nA. "),
            "{q}"
        );
        assert!(r.conversations[1].value.split_whitespace().count() >= 2);
    }
}

#[test]
fn synth_coin_rejects_bad_sizes() {
    let t = tempfile::tempdir().unwrap();
    let e = run(
        &SynthCoin,
        t.path(),
        json!({"per_task": {"train": 1, "tset": 1}, "pretrain": 0, "image_size": 64}),
        BTreeMap::new(),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("unknown key `tset`"), "{e}");
    let e = run(
        &SynthCoin,
        t.path(),
        json!({"per_task": {}, "pretrain": 0, "image_size": 8}),
        BTreeMap::new(),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("image_size = 8"), "{e}");
}

#[test]
#[allow(clippy::print_stderr)] // the measured time is the point of the test (`--nocapture`)
fn synth_coin_default_size_takes_seconds() {
    let t = tempfile::tempdir().unwrap();
    let params =
        json!({"per_task": {"train": 400, "test": 100}, "pretrain": 2000, "image_size": 64});
    let start = std::time::Instant::now();
    let (dir, log) = run(&SynthCoin, t.path(), params, BTreeMap::new(), 1).unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("default CoIN-mini: {secs:.2}s\n{log}");
    assert_eq!(
        DatasetInfo::load(&dir)
            .unwrap()
            .tasks
            .iter()
            .map(|t| t.train_count)
            .sum::<usize>(),
        3200
    );
    assert!(
        secs < 60.0,
        "generating the default dataset took {secs:.1}s"
    );
}

fn coin_params(root: &Path) -> Value {
    json!({"root": root.to_str().unwrap(), "train_file": "train.json", "tasks": TASKS, "check_images": true})
}

#[test]
fn data_coin_reads_the_fixture() {
    let t = tempfile::tempdir().unwrap();
    let (dir, log) = run(
        &Coin,
        t.path(),
        coin_params(Path::new(FIXTURE)),
        BTreeMap::new(),
        1,
    )
    .unwrap();
    let info = DatasetInfo::load(&dir).unwrap();
    assert_eq!(info.source, "coin");
    assert_eq!(
        Path::new(&info.image_root),
        Path::new(FIXTURE).canonicalize().unwrap()
    );
    let counts: Vec<(usize, usize)> = info
        .tasks
        .iter()
        .map(|t| (t.train_count, t.test_count))
        .collect();
    assert_eq!(
        counts,
        [
            (3, 2),
            (2, 1),
            (2, 1),
            (2, 1),
            (2, 1),
            (2, 1),
            (2, 1),
            (2, 1)
        ]
    );
    assert!(log.contains("ScienceQA") && log.contains("OCRVQA"), "{log}");
    // Annotations are copied byte for byte; images resolve through the root.
    for e in &info.tasks {
        let src = Path::new(FIXTURE)
            .join("annotations")
            .join(&e.name)
            .join("train.json");
        assert_eq!(
            std::fs::read(dir.join(&e.train)).unwrap(),
            std::fs::read(src).unwrap()
        );
        for r in read_test(&dir.join(&e.test)).unwrap() {
            assert!(info.image_path(&dir, r.image.as_deref().unwrap()).is_file());
        }
    }
    let g = read_test(&dir.join(&info.task("Grounding").unwrap().test)).unwrap();
    assert_eq!(g[0].size, Some([640, 427]));
    let sqa = read_train(&dir.join(&info.task("ScienceQA").unwrap().train)).unwrap();
    assert_eq!(sqa[1].image, None);
    assert_eq!(sqa[2].extra.get("source"), Some(&json!("lecture")));
}

/// Copy the fixture into `dst`, apply `edit` to it, and return `data.coin`'s error.
fn broken(edit: impl FnOnce(&Path)) -> String {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("CoIN");
    for (rel, bytes) in tree(Path::new(FIXTURE)) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    edit(&root);
    let work = t.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    run(&Coin, &work, coin_params(&root), BTreeMap::new(), 1)
        .unwrap_err()
        .to_string()
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn data_coin_rejects_broken_directories_precisely() {
    let e = broken(|r| std::fs::remove_file(r.join("GQA/images/2375430.jpg.png")).unwrap());
    assert!(e.contains("annotations/GQA/train.json: record 1: field `image`: image `GQA/images/2375430.jpg.png` not found"), "{e}");

    let e = broken(|r| {
        edit_json(&r.join("annotations/VizWiz/train.json"), |v| {
            v[1]["conversations"][1]["from"] = json!("human")
        })
    });
    assert!(e.contains("annotations/VizWiz/train.json: record 1 (id `vw_2`): field `conversations[1].from`: `human`, expected `gpt`"), "{e}");

    let e = broken(|r| {
        edit_json(&r.join("annotations/OCRVQA/train.json"), |v| {
            v[0]["conversations"][0]["value"] = json!(5)
        })
    });
    assert!(e.contains("annotations/OCRVQA/train.json: record 0 (id `ocr_1`): field `conversations[0].value`: expected a string"), "{e}");

    let e = broken(|r| {
        edit_json(&r.join("annotations/Grounding/test.json"), |v| {
            v[0]["answer_bbox"] = json!("[0.1, 0.2]")
        })
    });
    assert!(
        e.contains("annotations/Grounding/test.json: record 0 (id 0): field `answer_bbox`"),
        "{e}"
    );

    let e = broken(|r| {
        edit_json(&r.join("annotations/ImageNet/test.json"), |v| {
            v[0].as_object_mut()
                .unwrap()
                .remove("text")
                .map(drop)
                .unwrap()
        })
    });
    assert!(
        e.contains("annotations/ImageNet/test.json: record 0 (id 0): field `text`: missing"),
        "{e}"
    );

    let e = broken(|r| {
        edit_json(&r.join("annotations/TextVQA/train.json"), |v| {
            v[1]["id"] = json!("tvqa_1")
        })
    });
    assert!(
        e.contains("annotations/TextVQA/train.json: record 1: field `id`: duplicate id `tvqa_1`"),
        "{e}"
    );

    let e = broken(|r| {
        std::fs::write(r.join("annotations/VQAv2/train.json"), b"[{\"id\": 1,").unwrap()
    });
    assert!(
        e.contains("annotations/VQAv2/train.json: malformed JSON"),
        "{e}"
    );

    let e = broken(|r| std::fs::remove_file(r.join("annotations/ScienceQA/test.json")).unwrap());
    assert!(e.contains("annotations/ScienceQA/test.json"), "{e}");

    let e = broken(|r| std::fs::remove_dir_all(r.join("annotations/OCRVQA")).unwrap());
    assert!(
        e.contains("annotations/OCRVQA: missing task directory"),
        "{e}"
    );
}

fn asd(data: &Path, work: &Path, x: i64, seed: u64) -> Result<PathBuf, StageError> {
    let inputs = BTreeMap::from([("data".to_string(), vec![data.to_path_buf()])]);
    // The engine fills every default before a kind runs; do the same here.
    let mut params = serde_json::Map::new();
    for spec in AsdRewrite.params() {
        if let Some(d) = spec.default {
            params.insert(spec.name.to_string(), d);
        }
    }
    params.insert("data".into(), json!(data.to_str().unwrap()));
    params.insert("x".into(), json!(x));
    run(&AsdRewrite, work, Value::Object(params), inputs, seed).map(|r| r.0)
}

/// Check a converted record against its style.
fn check_style(style: AnswerStyle, human: &str, answer: &str) {
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(*lines.last().unwrap(), rfp(style), "{human}");
    let words = answer.split_whitespace().count();
    match style {
        AnswerStyle::YesNo => {
            assert!(answer == "Yes" || answer == "No", "{answer}");
            assert!(human.contains("Is the correct answer \""), "{human}");
        }
        AnswerStyle::Mcq => {
            let options: Vec<&str> = lines
                .iter()
                .filter(|l| {
                    l.len() > 3 && l.as_bytes()[1] == b'.' && l.as_bytes()[0].is_ascii_uppercase()
                })
                .copied()
                .collect();
            assert!((2..=4).contains(&options.len()), "{human}");
            let letter = answer.as_bytes()[0];
            assert!(
                answer.len() == 1 && (letter - b'A') < options.len() as u8,
                "{answer} for {human}"
            );
        }
        AnswerStyle::Short => assert!(
            !answer.is_empty() && !answer.contains('\n') && words <= 6,
            "{answer}"
        ),
        AnswerStyle::Brief => assert!((12..=35).contains(&words), "{words} words: {answer}"),
        AnswerStyle::Detail => assert!((36..=80).contains(&words), "{words} words: {answer}"),
    }
    // Only one RFP, and no native instruction left behind.
    assert!(
        !lines[..lines.len() - 1]
            .iter()
            .any(|l| l.starts_with("Answer the question using")
                || l.starts_with("Answer with the option")),
        "{human}"
    );
}

#[test]
fn asd_converts_exactly_x_percent_split_evenly() {
    let t = tempfile::tempdir().unwrap();
    let data = synth(&t.path().join("synth"), 50, 5, 0, 11);
    let out = asd(&data, &t.path().join("asd"), 20, 5).unwrap();
    let info = DatasetInfo::load(&out).unwrap();
    assert_eq!(info.asd.as_ref().map(|a| a.x), Some(20));
    let input = DatasetInfo::load(&data).unwrap();
    for (entry, orig) in info.tasks.iter().zip(&input.tasks) {
        assert_eq!(
            entry.train,
            format!("annotations/{}/train_x20.json", entry.name)
        );
        let before = read_train(&data.join(&orig.train)).unwrap();
        let after = read_train(&out.join(&entry.train)).unwrap();
        assert_eq!(after.len(), before.len());
        // Same ids, same order, unique (read_train rejects duplicates).
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(a, b)| a.id == b.id && a.image == b.image)
        );
        let mut per_style: BTreeMap<AnswerStyle, usize> = BTreeMap::new();
        for (b, a) in before.iter().zip(&after) {
            match a.extra.get("answer_style") {
                None => assert_eq!(a, b, "unconverted records are untouched"),
                Some(s) => {
                    let style: AnswerStyle = serde_json::from_value(s.clone()).unwrap();
                    assert_ne!(style, entry.native_style);
                    assert!(a.conversations[0].value.starts_with("<image>\n"));
                    check_style(style, &a.conversations[0].value, &a.conversations[1].value);
                    *per_style.entry(style).or_default() += 1;
                }
            }
        }
        // floor(50 * 20 / 100) = 10 → 3, 3, 2, 2 in style order.
        assert_eq!(
            per_style.values().copied().collect::<Vec<_>>(),
            style_counts(50, 20).to_vec(),
            "{}",
            entry.name
        );
        assert_eq!(style_counts(50, 20), [3, 3, 2, 2]);
        assert_eq!(
            std::fs::read(out.join(&entry.test)).unwrap(),
            std::fs::read(data.join(&orig.test)).unwrap(),
            "test sets are copied unchanged"
        );
        assert!(
            out.join(&entry.train)
                .with_file_name("train.json")
                .is_file(),
            "the original training file is kept"
        );
    }
    // Images travel with the artifact.
    let r = &read_train(&out.join(&info.tasks[0].train)).unwrap()[0];
    assert!(info.image_path(&out, r.image.as_deref().unwrap()).is_file());
}

#[test]
fn asd_is_deterministic_identity_at_zero_and_refuses_to_stack() {
    let t = tempfile::tempdir().unwrap();
    let data = synth(&t.path().join("synth"), 24, 2, 0, 2);
    let a = tree(&asd(&data, &t.path().join("a"), 40, 9).unwrap());
    let b = tree(&asd(&data, &t.path().join("b"), 40, 9).unwrap());
    assert!(a == b, "same seed, same bytes");
    let c = tree(&asd(&data, &t.path().join("c"), 40, 10).unwrap());
    assert!(a != c, "the seed picks the converted records");

    let zero = asd(&data, &t.path().join("z"), 0, 9).unwrap();
    for e in &DatasetInfo::load(&zero).unwrap().tasks {
        assert_eq!(
            std::fs::read(zero.join(&e.train)).unwrap(),
            std::fs::read(data.join("annotations").join(&e.name).join("train.json")).unwrap()
        );
    }
    let e = asd(&zero, &t.path().join("again"), 20, 9).unwrap_err();
    assert!(e.to_string().contains("already ASD-rewritten"), "{e}");
    let e = asd(&data, &t.path().join("bad"), 101, 9).unwrap_err();
    assert!(e.to_string().contains("`x` = 101"), "{e}");
}

#[test]
fn asd_on_real_format_records_uses_templates_and_options() {
    let t = tempfile::tempdir().unwrap();
    let (data, _) = run(
        &Coin,
        &t.path().join("coin"),
        coin_params(Path::new(FIXTURE)),
        BTreeMap::new(),
        1,
    )
    .unwrap();
    let out = asd(&data, &t.path().join("asd"), 100, 3).unwrap();
    let info = DatasetInfo::load(&out).unwrap();
    assert_eq!(
        info.image_root,
        DatasetInfo::load(&data).unwrap().image_root,
        "real images stay referenced"
    );
    for e in &info.tasks {
        let recs = read_train(&out.join(&e.train)).unwrap();
        // x = 100 converts every record: floor(n) split 1, 1, (1, 0) over the styles.
        assert!(
            recs.iter().all(|r| r.extra.contains_key("answer_style")),
            "{}",
            e.name
        );
        for r in &recs {
            let style: AnswerStyle =
                serde_json::from_value(r.extra["answer_style"].clone()).unwrap();
            check_style(style, &r.conversations[0].value, &r.conversations[1].value);
            if e.name == "ScienceQA" && style == AnswerStyle::Short {
                // The option text, not the letter.
                assert!(
                    ["whale", "rock", "blue"].contains(&r.conversations[1].value.as_str()),
                    "{:?}",
                    r.conversations
                );
            }
        }
    }
    let sqa = read_train(&out.join(&info.task("ScienceQA").unwrap().train)).unwrap();
    assert!(
        !sqa[1].conversations[0].value.starts_with("<image>"),
        "text-only records stay text-only"
    );
    assert_eq!(sqa[2].extra.get("source"), Some(&json!("lecture")));
}

#[test]
fn synth_coin_bytes_do_not_depend_on_the_thread_count() {
    let t = tempfile::tempdir().unwrap();
    let a = tree(&synth(&t.path().join("a"), 10, 3, 5, 21));
    let b = tree(&synth(&t.path().join("b-3cpu"), 10, 3, 5, 21));
    assert!(a == b);
}

#[test]
fn data_coin_reads_coin_asd_training_files() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("CoIN-ASD");
    for (rel, bytes) in tree(Path::new(FIXTURE)) {
        let rel = match rel.file_name().and_then(|n| n.to_str()) {
            Some("train.json") => rel.with_file_name("train_x20.json"),
            _ => rel,
        };
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let mut params = coin_params(&root);
    params["train_file"] = json!("train_x20.json");
    params["tasks"] = json!(["GQA", "VQAv2"]);
    let (dir, _) = run(&Coin, &t.path().join("w"), params, BTreeMap::new(), 1).unwrap();
    let info = DatasetInfo::load(&dir).unwrap();
    assert_eq!(info.asd.as_ref().map(|a| a.x), Some(20));
    assert_eq!(info.tasks.len(), 2);
    assert_eq!(info.tasks[0].train, "annotations/GQA/train_x20.json");
    assert_eq!(
        read_train(&dir.join(&info.tasks[1].train)).unwrap().len(),
        2
    );

    let mut params = coin_params(&root);
    params["train_file"] = json!("../x.json");
    let e = run(&Coin, &t.path().join("w2"), params, BTreeMap::new(), 1).unwrap_err();
    assert!(e.to_string().contains("plain file name"), "{e}");
}

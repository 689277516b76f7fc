//! The CoIN benchmark's file formats and the project's CoIN dataset artifact.
//!
//! ## CoIN's files (as SEFE's README lays them out)
//!
//! - `annotations/<Task>/train.json` (or CoIN-ASD's `train_x{X}.json`): a JSON list of LLaVA
//!   conversation records, [`TrainRecord`]: `id`, `image` (relative to the image root; absent
//!   for text-only records), `conversations` alternating `human`/`gpt` turns, the first human
//!   turn starting with `<image>\n` when there is an image.
//! - `annotations/<Task>/test.json`: a JSON list of flat question records, [`TestRecord`]:
//!   `question_id`, `image`, `text` (the question; its last line is the answer-format
//!   instruction), `answer`; Grounding records also carry `answer_bbox` (`"[x1, y1, x2, y2]"`
//!   normalized to the padded square) and `size` (`[w, h]`).
//! - images under per-source folders of one image root (`ScienceQA/`, `COCO/`, ...).
//!
//! Unknown fields of real records are kept ([`TrainRecord::extra`]), so rewriting a file
//! (ASD) loses nothing a downstream consumer might read.
//!
//! ## The dataset artifact
//!
//! `data.synth-coin`, `data.coin` and `asd.rewrite` all emit the same directory: CoIN's
//! `annotations/` tree plus [`DATASET_FILE`] ([`DatasetInfo`]), which names for each task the
//! training and test files to use (so an ASD output points at `train_x20.json`), their record
//! counts and the task's native answer style, and says where images resolve
//! ([`DatasetInfo::image_root`]: `"."` for images stored inside the artifact, an absolute path
//! for a real CoIN root that is referenced rather than copied). Consumers should go through
//! [`DatasetInfo::load`] and [`DatasetInfo::image_path`] rather than guess paths.
//!
//! ## Validation
//!
//! [`read_train`] and [`read_test`] check every record field by field before deserializing,
//! so an error names the file, the record index (and id when it has one) and the field
//! (`conversations[1].value`), never just "invalid type".

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use engine::stage::StageError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The eight CoIN tasks, in CoIN's training order.
pub const TASKS: [&str; 8] = [
    "ScienceQA",
    "TextVQA",
    "ImageNet",
    "GQA",
    "VizWiz",
    "Grounding",
    "VQAv2",
    "OCRVQA",
];

/// The artifact's description file.
pub const DATASET_FILE: &str = "dataset.json";

/// The human turn's image marker.
pub const IMAGE_TOKEN: &str = "<image>";

/// A record id: CoIN uses both strings and integers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RecordId {
    /// An integer id.
    Int(i64),
    /// A string id.
    Str(String),
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(i) => write!(f, "{i}"),
            Self::Str(s) => write!(f, "{s}"),
        }
    }
}

/// One conversation turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// `human` or `gpt`.
    pub from: String,
    /// The text.
    pub value: String,
}

impl Turn {
    /// A human turn.
    pub fn human(value: impl Into<String>) -> Self {
        Self {
            from: "human".into(),
            value: value.into(),
        }
    }
    /// A gpt turn.
    pub fn gpt(value: impl Into<String>) -> Self {
        Self {
            from: "gpt".into(),
            value: value.into(),
        }
    }
}

/// A training record (LLaVA conversation format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Record id, unique within the file.
    pub id: RecordId,
    /// Image path relative to the image root; `None` for text-only records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Alternating human/gpt turns, human first.
    pub conversations: Vec<Turn>,
    /// Any other fields of the original record, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A test record (flat question format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    /// Question id.
    pub question_id: RecordId,
    /// Image path relative to the image root; `None` for text-only questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The question; its last line is the answer-format instruction.
    pub text: String,
    /// The reference answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Grounding: the reference box `"[x1, y1, x2, y2]"`, normalized to the padded square.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_bbox: Option<String>,
    /// Grounding: the original image size `[w, h]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u32; 2]>,
    /// Any other fields, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The five answer styles of ASD; each CoIN task has one native style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerStyle {
    /// "Yes" / "No".
    YesNo,
    /// An option letter.
    Mcq,
    /// A word or short phrase (also a box, a class name, a count).
    Short,
    /// The answer plus an explanation of about 20 words.
    Brief,
    /// The answer plus an explanation of about 50 words.
    Detail,
}

impl AnswerStyle {
    /// All styles, in ASD's fixed order.
    pub const ALL: [AnswerStyle; 5] = [
        Self::YesNo,
        Self::Mcq,
        Self::Short,
        Self::Brief,
        Self::Detail,
    ];

    /// The name used in files (`yes_no`, `mcq`...).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::YesNo => "yes_no",
            Self::Mcq => "mcq",
            Self::Short => "short",
            Self::Brief => "brief",
            Self::Detail => "detail",
        }
    }
}

/// The native answer style of a CoIN task: ScienceQA is multiple choice, every other task
/// answers with a word, phrase, number or box (the "short answer" family).
#[must_use]
pub fn native_style(task: &str) -> AnswerStyle {
    if task == "ScienceQA" {
        AnswerStyle::Mcq
    } else {
        AnswerStyle::Short
    }
}

/// One task of the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEntry {
    /// Task name (one of [`TASKS`] for CoIN).
    pub name: String,
    /// Training file, relative to the artifact directory.
    pub train: String,
    /// Test file, relative to the artifact directory.
    pub test: String,
    /// Number of training records.
    pub train_count: usize,
    /// Number of test records.
    pub test_count: usize,
    /// The task's native answer style (the one its test set is scored in).
    pub native_style: AnswerStyle,
}

/// The captioning pretraining split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitEntry {
    /// Annotation file (LLaVA conversation records), relative to the artifact directory.
    pub file: String,
    /// Number of records.
    pub count: usize,
}

/// How an ASD artifact was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsdInfo {
    /// Percentage of each task's training records converted.
    pub x: u32,
}

/// `dataset.json`: what the artifact holds and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetInfo {
    /// Always `"coin"`.
    pub format: String,
    /// Where the data comes from: `synth-coin` (generated) or `coin` (read from disk); ASD keeps it and sets [`DatasetInfo::asd`].
    pub source: String,
    /// Where `image` fields resolve: `"."` is the artifact directory, otherwise an absolute path.
    pub image_root: String,
    /// Side of the square synthetic images; `None` for real data.
    pub image_size: Option<u32>,
    /// The tasks, in training order.
    pub tasks: Vec<TaskEntry>,
    /// The captioning pretraining split, when there is one.
    pub pretrain: Option<SplitEntry>,
    /// Set when the training files were rewritten by ASD.
    pub asd: Option<AsdInfo>,
}

impl DatasetInfo {
    /// Read `dir/dataset.json`.
    ///
    /// # Errors
    /// Missing or malformed file, or a format other than `coin`.
    pub fn load(dir: &Path) -> Result<Self, StageError> {
        let path = dir.join(DATASET_FILE);
        let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
        let info: Self = serde_json::from_slice(&bytes).map_err(|e| {
            StageError::Input(format!(
                "{}: not a CoIN dataset description: {e}",
                path.display()
            ))
        })?;
        if info.format != "coin" {
            return Err(StageError::Input(format!(
                "{}: format is `{}`, expected `coin`",
                path.display(),
                info.format
            )));
        }
        Ok(info)
    }

    /// Write `dir/dataset.json`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, dir: &Path) -> Result<(), StageError> {
        write_json(&dir.join(DATASET_FILE), self)
    }

    /// The image root for an artifact stored in `dir`.
    #[must_use]
    pub fn image_root(&self, dir: &Path) -> PathBuf {
        if self.image_root == "." {
            dir.to_path_buf()
        } else {
            PathBuf::from(&self.image_root)
        }
    }

    /// The file of image `rel` for an artifact stored in `dir`.
    #[must_use]
    pub fn image_path(&self, dir: &Path, rel: &str) -> PathBuf {
        self.image_root(dir).join(rel)
    }

    /// The entry of task `name`.
    #[must_use]
    pub fn task(&self, name: &str) -> Option<&TaskEntry> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// Write `value` as pretty JSON (plus a newline) to `path`, creating parent directories.
///
/// # Errors
/// I/O errors, with the path.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
    }
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| StageError::Other(format!("{}: {e}", path.display())))?;
    bytes.push(b'\n');
    std::fs::write(path, bytes).map_err(|e| StageError::io(path, e))
}

/// Read a JSON list of records.
fn read_list(path: &Path) -> Result<Vec<Value>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| StageError::Input(format!("{}: malformed JSON: {e}", path.display())))?;
    match value {
        Value::Array(items) => Ok(items),
        _ => Err(StageError::Input(format!(
            "{}: expected a JSON list of records",
            path.display()
        ))),
    }
}

/// A record-level error: file, index, id (when known), field, problem.
fn record_error(
    path: &Path,
    index: usize,
    rec: &Value,
    id_field: &str,
    field: &str,
    problem: &str,
) -> StageError {
    let id = match rec.get(id_field) {
        Some(Value::String(s)) => format!(" (id `{s}`)"),
        Some(Value::Number(n)) => format!(" (id {n})"),
        _ => String::new(),
    };
    StageError::Input(format!(
        "{}: record {index}{id}: field `{field}`: {problem}",
        path.display()
    ))
}

fn check_id(v: Option<&Value>) -> Result<(), &'static str> {
    match v {
        None => Err("missing"),
        Some(Value::String(_)) => Ok(()),
        Some(Value::Number(n)) if n.is_i64() => Ok(()),
        Some(_) => Err("expected a string or an integer"),
    }
}

fn check_opt_str(v: Option<&Value>) -> Result<(), &'static str> {
    match v {
        None | Some(Value::String(_)) => Ok(()),
        Some(_) => Err("expected a string"),
    }
}

/// Check one training record; `Err((field, problem))`.
fn check_train(rec: &Value) -> Result<(), (String, String)> {
    let fail = |f: &str, p: &str| Err((f.to_string(), p.to_string()));
    if !rec.is_object() {
        return fail("", "expected an object");
    }
    check_id(rec.get("id")).or_else(|p| fail("id", p))?;
    check_opt_str(rec.get("image")).or_else(|p| fail("image", p))?;
    let Some(conv) = rec.get("conversations") else {
        return fail("conversations", "missing");
    };
    let Value::Array(turns) = conv else {
        return fail("conversations", "expected a list of turns");
    };
    if turns.len() < 2 {
        return fail(
            "conversations",
            "expected at least one human turn and one gpt turn",
        );
    }
    for (t, turn) in turns.iter().enumerate() {
        let want = if t % 2 == 0 { "human" } else { "gpt" };
        match turn.get("from") {
            Some(Value::String(s)) if s == want => {}
            Some(Value::String(s)) => {
                return fail(
                    &format!("conversations[{t}].from"),
                    &format!("`{s}`, expected `{want}` (turns alternate, human first)"),
                );
            }
            Some(_) => return fail(&format!("conversations[{t}].from"), "expected a string"),
            None => return fail(&format!("conversations[{t}].from"), "missing"),
        }
        match turn.get("value") {
            Some(Value::String(_)) => {}
            Some(_) => return fail(&format!("conversations[{t}].value"), "expected a string"),
            None => return fail(&format!("conversations[{t}].value"), "missing"),
        }
    }
    Ok(())
}

/// Check one test record; `Err((field, problem))`.
fn check_test(rec: &Value) -> Result<(), (String, String)> {
    let fail = |f: &str, p: &str| Err((f.to_string(), p.to_string()));
    if !rec.is_object() {
        return fail("", "expected an object");
    }
    check_id(rec.get("question_id")).or_else(|p| fail("question_id", p))?;
    check_opt_str(rec.get("image")).or_else(|p| fail("image", p))?;
    match rec.get("text") {
        Some(Value::String(_)) => {}
        Some(_) => return fail("text", "expected a string"),
        None => return fail("text", "missing"),
    }
    check_opt_str(rec.get("answer")).or_else(|p| fail("answer", p))?;
    check_opt_str(rec.get("answer_bbox")).or_else(|p| fail("answer_bbox", p))?;
    if let Some(Value::String(b)) = rec.get("answer_bbox")
        && parse_bbox(b).is_none()
    {
        return fail(
            "answer_bbox",
            &format!("`{b}` is not a box \"[x1, y1, x2, y2]\""),
        );
    }
    match rec.get("size") {
        None => {}
        Some(Value::Array(a))
            if a.len() == 2
                && a.iter().all(|v| {
                    v.as_u64()
                        .is_some_and(|n| n > 0 && n <= u64::from(u32::MAX))
                }) => {}
        Some(_) => return fail("size", "expected [width, height] as two positive integers"),
    }
    Ok(())
}

/// Parse `"[x1, y1, x2, y2]"` into four floats.
#[must_use]
pub fn parse_bbox(s: &str) -> Option<[f64; 4]> {
    let inner = s.trim().strip_prefix('[')?.strip_suffix(']')?;
    let v: Vec<f64> = inner
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()?;
    <[f64; 4]>::try_from(v).ok()
}

/// Format a normalized box the way CoIN writes it: two decimals, `"[x1, y1, x2, y2]"`.
#[must_use]
pub fn format_bbox(b: [f64; 4]) -> String {
    format!("[{:.2}, {:.2}, {:.2}, {:.2}]", b[0], b[1], b[2], b[3])
}

/// Ids must be unique within a file.
fn check_unique<'a>(
    path: &Path,
    ids: impl Iterator<Item = &'a RecordId>,
    field: &str,
) -> Result<(), StageError> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        if !seen.insert(id) {
            return Err(StageError::Input(format!(
                "{}: record {i}: field `{field}`: duplicate id `{id}`",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Read and validate a training file (LLaVA conversation records).
///
/// # Errors
/// Unreadable or malformed file; a record with a missing or mistyped field (named with its
/// index); duplicate ids.
pub fn read_train(path: &Path) -> Result<Vec<TrainRecord>, StageError> {
    let items = read_list(path)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, rec) in items.into_iter().enumerate() {
        if let Err((field, problem)) = check_train(&rec) {
            return Err(record_error(path, i, &rec, "id", &field, &problem));
        }
        let r: TrainRecord = serde_json::from_value(rec.clone())
            .map_err(|e| record_error(path, i, &rec, "id", "", &e.to_string()))?;
        out.push(r);
    }
    check_unique(path, out.iter().map(|r| &r.id), "id")?;
    Ok(out)
}

/// Read and validate a test file (flat question records).
///
/// # Errors
/// As [`read_train`].
pub fn read_test(path: &Path) -> Result<Vec<TestRecord>, StageError> {
    let items = read_list(path)?;
    let mut out = Vec::with_capacity(items.len());
    for (i, rec) in items.into_iter().enumerate() {
        if let Err((field, problem)) = check_test(&rec) {
            return Err(record_error(path, i, &rec, "question_id", &field, &problem));
        }
        let r: TestRecord = serde_json::from_value(rec.clone())
            .map_err(|e| record_error(path, i, &rec, "question_id", "", &e.to_string()))?;
        out.push(r);
    }
    check_unique(path, out.iter().map(|r| &r.question_id), "question_id")?;
    Ok(out)
}

/// Check that every `image` of a file exists under `root`.
///
/// # Errors
/// The first missing image, with file, record index and path.
pub fn check_images<'a>(
    path: &Path,
    root: &Path,
    images: impl Iterator<Item = Option<&'a str>>,
) -> Result<(), StageError> {
    for (i, img) in images.enumerate() {
        if let Some(rel) = img {
            let p = root.join(rel);
            if !p.is_file() {
                return Err(StageError::Input(format!(
                    "{}: record {i}: field `image`: image `{rel}` not found (looked for {})",
                    path.display(),
                    p.display()
                )));
            }
        }
    }
    Ok(())
}

/// The question of a human turn without the `<image>` marker line.
#[must_use]
pub fn strip_image_token(value: &str) -> &str {
    value
        .strip_prefix(IMAGE_TOKEN)
        .map_or(value, |s| s.strip_prefix('\n').unwrap_or(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbox_roundtrip_and_rejects() {
        assert_eq!(
            parse_bbox("[0.1, 0.25, 0.5, 1.0]"),
            Some([0.1, 0.25, 0.5, 1.0])
        );
        assert_eq!(
            format_bbox([0.1, 0.25, 0.5, 1.0]),
            "[0.10, 0.25, 0.50, 1.00]"
        );
        assert_eq!(parse_bbox("[0.1, 0.2, 0.3]"), None);
        assert_eq!(parse_bbox("0.1, 0.2, 0.3, 0.4"), None);
    }

    #[test]
    fn train_check_names_the_field() {
        let bad = serde_json::json!({"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]});
        let (f, p) = check_train(&bad).unwrap_err();
        assert_eq!(f, "conversations[1].from");
        assert!(p.contains("expected `gpt`"), "{p}");
        let bad = serde_json::json!({"id": 1.5, "conversations": []});
        assert_eq!(check_train(&bad).unwrap_err().0, "id");
        let ok = serde_json::json!({"id": 3, "image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "extra": 1});
        assert!(check_train(&ok).is_ok());
        let r: TrainRecord = serde_json::from_value(ok.clone()).unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            ok,
            "extra fields survive a round trip"
        );
    }

    #[test]
    fn test_check_names_the_field() {
        let bad = serde_json::json!({"question_id": 1, "text": "q", "answer_bbox": "[1, 2]"});
        assert_eq!(check_test(&bad).unwrap_err().0, "answer_bbox");
        let bad = serde_json::json!({"question_id": 1, "text": "q", "size": [0, 3]});
        assert_eq!(check_test(&bad).unwrap_err().0, "size");
        let bad = serde_json::json!({"question_id": 1, "answer": "x"});
        assert_eq!(check_test(&bad).unwrap_err().0, "text");
    }
}

//! LLaVA-1.5 conversation format (`vicuna_v1`), image-token expansion, the training loss mask,
//! and batch padding.
//!
//! ## Text format
//!
//! LLaVA-1.5's `conv_vicuna_v1` joins turns with two separators, `" "` after a user turn and
//! `"</s>"` after an assistant turn:
//!
//! ```text
//! {system} USER: <image>\nWhat color is the square? ASSISTANT: The square is red.</s>USER: ... ASSISTANT:
//! ```
//!
//! The system prompt is configurable; with none (the `llava-tiny` fixture's short form) the text
//! starts at `USER:`. A prompt for generation ends with `ASSISTANT:` and no trailing space.
//!
//! LLaVA's feature-alignment pretraining (stage 1) uses the `plain` format instead: the image
//! and then the caption, with no system prompt, roles or instruction (LLaVA drops the user's
//! text; one turn, its `<image>` markers kept). We end the caption with `</s>` where LLaVA
//! ends it with `\n`, so a model pretrained this way stops after its caption.
//!
//! ```text
//! <image>A red circle in the top left.</s>
//! ```
//!
//! ## Tokens and labels
//!
//! The whole conversation is tokenized in one call (so BPE merges across turn boundaries behave
//! exactly as when Hugging Face's processor tokenizes the text), and the byte offsets the tokenizer
//! reports decide which tokens belong to an assistant answer: a token is a training target iff it
//! starts inside the answer span, which runs from the space after `ASSISTANT:` through the closing
//! `</s>`. Everything else (BOS, system prompt, user turns, image tokens, `ASSISTANT:`) gets label
//! [`IGNORE_INDEX`]. Labels are *not* shifted here: like transformers, the loss shifts them
//! (`crate::train::loss`).
//!
//! Each `<image>` id is then replaced by `image_tokens` copies (64 for llava-tiny, 576 for
//! LLaVA-1.5-7B), which is what `LlavaProcessor` does to the text; expanding ids instead of text
//! gives the same ids because `<image>` is an atomic special token.
//!
//! ## Batches
//!
//! Training batches are right-padded (labels [`IGNORE_INDEX`] on pads, positions `0..L` implied);
//! inference batches are left-padded so every row's last token is at the same column, with
//! `position_ids = cumsum(mask) - 1` (0 on pads) as HF `generate` derives them.

use std::ops::Range;

use candle_core::{Device, Tensor};

use super::tokenizer::{EOS, IMAGE, LlavaTokenizer, TokenizerError};

/// Label value excluded from the loss (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// LLaVA-1.5's `vicuna_v1` system prompt.
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// Errors building examples or batches.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("conversation is empty")]
    Empty,
    #[error("turn {turn}: only the last turn may lack an assistant answer")]
    MissingAnswer { turn: usize },
    #[error("training example has no assistant answer to learn from")]
    NoTargets,
    #[error("the plain pretraining format takes one turn, not {turns}")]
    PlainTurns { turns: usize },
    #[error("conversation has {found} `{IMAGE}` placeholders but {given} images")]
    ImageCount { found: usize, given: usize },
    #[error("cannot build a batch from zero examples")]
    EmptyBatch,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One exchange: the user's message (may contain `<image>`) and, for training, the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// User text, e.g. `"<image>\nWhat color is the square?"`.
    pub user: String,
    /// Assistant answer; `None` only on the last turn of a generation prompt.
    pub assistant: Option<String>,
}

impl Turn {
    /// A question with its answer.
    pub fn qa(user: impl Into<String>, assistant: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            assistant: Some(assistant.into()),
        }
    }
    /// A question awaiting an answer.
    pub fn ask(user: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            assistant: None,
        }
    }
}

/// The conversation template: system prompt, role names and image-token count.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    /// System prompt; `None` for the short form (the fixture's).
    pub system: Option<String>,
    /// Image features per `<image>` (`(image_size / patch)^2`, plus one for the "full" strategy).
    pub image_tokens: usize,
    /// LLaVA's `plain` pretraining format (see the module docs): `system` is unused.
    pub plain: bool,
}

impl ChatTemplate {
    /// LLaVA-1.5's `vicuna_v1` with its system prompt.
    pub fn vicuna_v1(image_tokens: usize) -> Self {
        Self {
            system: Some(VICUNA_V1_SYSTEM.to_string()),
            image_tokens,
            plain: false,
        }
    }

    /// The same format without a system prompt (how the `llava-tiny` fixture prompts).
    pub fn short(image_tokens: usize) -> Self {
        Self {
            system: None,
            image_tokens,
            plain: false,
        }
    }

    /// LLaVA's `plain` format of feature-alignment pretraining: image, caption, `</s>`.
    pub fn plain(image_tokens: usize) -> Self {
        Self {
            system: None,
            image_tokens,
            plain: true,
        }
    }

    /// Renders `turns` to text; returns the text and the byte ranges of the assistant answers
    /// (each from the space after `ASSISTANT:` through its `</s>`).
    pub fn render(&self, turns: &[Turn]) -> Result<(String, Vec<Range<usize>>), ChatError> {
        if turns.is_empty() {
            return Err(ChatError::Empty);
        }
        if self.plain {
            return render_plain(turns);
        }
        let mut text = String::new();
        if let Some(system) = &self.system {
            text.push_str(system);
            text.push(' ');
        }
        let mut spans = Vec::new();
        for (i, turn) in turns.iter().enumerate() {
            text.push_str("USER: ");
            text.push_str(&turn.user);
            text.push_str(" ASSISTANT:");
            match &turn.assistant {
                Some(answer) => {
                    let start = text.len();
                    text.push(' ');
                    text.push_str(answer);
                    text.push_str(EOS);
                    spans.push(start..text.len());
                }
                None if i + 1 == turns.len() => {}
                None => return Err(ChatError::MissingAnswer { turn: i }),
            }
        }
        Ok((text, spans))
    }

    /// Tokenizes a training conversation: ids with every `<image>` expanded, and labels that are
    /// [`IGNORE_INDEX`] everywhere except on assistant answers and their `</s>`.
    pub fn encode_training(
        &self,
        tok: &LlavaTokenizer,
        turns: &[Turn],
    ) -> Result<Example, ChatError> {
        if let Some(i) = turns.iter().position(|t| t.assistant.is_none()) {
            return Err(ChatError::MissingAnswer { turn: i });
        }
        let (text, spans) = self.render(turns)?;
        let (ids, offsets) = tok.encode_with_offsets(&text, true)?;
        let mut labels = Vec::with_capacity(ids.len());
        for (&id, &(start, end)) in ids.iter().zip(&offsets) {
            // BOS comes from the post-processor and has the empty range (0, 0).
            let in_answer = end > start && spans.iter().any(|s| s.contains(&start));
            labels.push(if in_answer {
                i64::from(id)
            } else {
                IGNORE_INDEX
            });
        }
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Err(ChatError::NoTargets);
        }
        Ok(self.expand(tok.image_id, &ids, &labels))
    }

    /// Tokenizes a generation prompt (the last turn's answer must be `None`), images expanded.
    pub fn encode_prompt(
        &self,
        tok: &LlavaTokenizer,
        turns: &[Turn],
    ) -> Result<Vec<u32>, ChatError> {
        let (text, _) = self.render(turns)?;
        let ids = tok.encode(&text, true)?;
        let labels = vec![IGNORE_INDEX; ids.len()];
        Ok(self.expand(tok.image_id, &ids, &labels).input_ids)
    }

    /// Replaces each `image_id` by `image_tokens` copies (labels follow, always ignored there).
    fn expand(&self, image_id: u32, ids: &[u32], labels: &[i64]) -> Example {
        let mut out = Example {
            input_ids: Vec::new(),
            labels: Vec::new(),
        };
        for (&id, &label) in ids.iter().zip(labels) {
            let n = if id == image_id { self.image_tokens } else { 1 };
            for _ in 0..n {
                out.input_ids.push(id);
                out.labels
                    .push(if id == image_id { IGNORE_INDEX } else { label });
            }
        }
        out
    }
}

/// The `plain` rendering: the first turn's `<image>` markers, then its answer and `</s>`.
fn render_plain(turns: &[Turn]) -> Result<(String, Vec<Range<usize>>), ChatError> {
    if turns.len() > 1 {
        return Err(ChatError::PlainTurns { turns: turns.len() });
    }
    let turn = &turns[0];
    let mut text = IMAGE.repeat(turn.user.matches(IMAGE).count());
    let mut spans = Vec::new();
    if let Some(answer) = &turn.assistant {
        let start = text.len();
        text.push_str(answer);
        text.push_str(EOS);
        spans.push(start..text.len());
    }
    Ok((text, spans))
}

/// Counts `<image>` placeholders in `turns` (the caller must supply that many images).
pub fn count_images(turns: &[Turn]) -> usize {
    turns.iter().map(|t| t.user.matches(IMAGE).count()).sum()
}

/// Checks that a conversation has exactly `images` placeholders.
pub fn check_image_count(turns: &[Turn], images: usize) -> Result<(), ChatError> {
    let found = count_images(turns);
    if found != images {
        return Err(ChatError::ImageCount {
            found,
            given: images,
        });
    }
    Ok(())
}

/// One tokenized training example (unpadded).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids, images expanded, BOS first.
    pub input_ids: Vec<u32>,
    /// Same length; [`IGNORE_INDEX`] except on assistant tokens.
    pub labels: Vec<i64>,
}

/// A padded batch, as plain rows (use [`Batch::tensors`] for the model).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[b][L]` ids, padded with `<pad>`.
    pub input_ids: Vec<Vec<u32>>,
    /// `[b][L]`, 1 = real token, 0 = pad.
    pub attention_mask: Vec<Vec<u32>>,
    /// `[b][L]` positions: `0..L` for right padding, `cumsum(mask) - 1` (0 on pads) for left.
    pub position_ids: Vec<Vec<u32>>,
    /// `[b][L]` labels (training only), [`IGNORE_INDEX`] on pads.
    pub labels: Option<Vec<Vec<i64>>>,
}

/// The same batch as candle tensors.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// `[b, L]` u32.
    pub input_ids: Tensor,
    /// `[b, L]` u32 (1 = real).
    pub attention_mask: Tensor,
    /// `[b, L]` u32.
    pub position_ids: Tensor,
    /// `[b, L]` i64, training batches only.
    pub labels: Option<Tensor>,
}

impl Batch {
    /// Right-pads training examples to the longest one (labels [`IGNORE_INDEX`] on pads).
    pub fn right_padded(examples: &[Example], pad_id: u32) -> Result<Self, ChatError> {
        let len = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .ok_or(ChatError::EmptyBatch)?;
        let mut batch = Batch {
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            position_ids: Vec::new(),
            labels: Some(Vec::new()),
        };
        for e in examples {
            let pad = len - e.input_ids.len();
            let mut ids = e.input_ids.clone();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            let mut mask = vec![1u32; e.input_ids.len()];
            mask.extend(std::iter::repeat_n(0, pad));
            let mut labels = e.labels.clone();
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
            batch.position_ids.push((0..len as u32).collect());
            if let Some(l) = batch.labels.as_mut() {
                l.push(labels);
            }
        }
        Ok(batch)
    }

    /// Left-pads generation prompts so every row ends at the same column.
    pub fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> Result<Self, ChatError> {
        let len = prompts
            .iter()
            .map(Vec::len)
            .max()
            .ok_or(ChatError::EmptyBatch)?;
        let mut batch = Batch {
            input_ids: Vec::new(),
            attention_mask: Vec::new(),
            position_ids: Vec::new(),
            labels: None,
        };
        for p in prompts {
            let pad = len - p.len();
            let mut ids = vec![pad_id; pad];
            ids.extend_from_slice(p);
            let mut mask = vec![0u32; pad];
            mask.extend(std::iter::repeat_n(1, p.len()));
            let mut pos = vec![0u32; pad];
            pos.extend(0..p.len() as u32);
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
            batch.position_ids.push(pos);
        }
        Ok(batch)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True for a batch without rows (never produced by the constructors).
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of labelled targets after the causal shift (what the mean loss divides by).
    pub fn target_count(&self) -> usize {
        self.labels.as_ref().map_or(0, |rows| {
            rows.iter()
                .map(|r| r.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
                .sum()
        })
    }

    /// Converts to tensors on `device`.
    pub fn tensors(&self, device: &Device) -> Result<BatchTensors, ChatError> {
        let u32s = |rows: &Vec<Vec<u32>>| -> candle_core::Result<Tensor> {
            let (b, l) = (rows.len(), rows.first().map_or(0, Vec::len));
            Tensor::from_iter(rows.iter().flatten().copied(), device)?.reshape((b, l))
        };
        let labels = match &self.labels {
            Some(rows) => {
                let (b, l) = (rows.len(), rows.first().map_or(0, Vec::len));
                Some(Tensor::from_iter(rows.iter().flatten().copied(), device)?.reshape((b, l))?)
            }
            None => None,
        };
        Ok(BatchTensors {
            input_ids: u32s(&self.input_ids)?,
            attention_mask: u32s(&self.attention_mask)?,
            position_ids: u32s(&self.position_ids)?,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
    }

    fn tok() -> LlavaTokenizer {
        LlavaTokenizer::load(&fixture().join("tokenizer.json")).unwrap()
    }

    /// The fixture's recorded tensors, as i64 rows.
    fn recorded(file: &str, name: &str) -> Vec<Vec<i64>> {
        let t = candle_core::safetensors::load(fixture().join(file), &Device::Cpu).unwrap();
        t[name]
            .to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap()
    }

    const Q0: &str = "<image>\nWhat color is the square?";
    const Q1: &str = "<image>\nHow many circles are there in the image?";
    const A0: &str = "The square is red.";
    const A1: &str = "There are three green circles.";

    #[test]
    fn fixture_prompt_tokens_match_transformers() {
        let tok = tok();
        let text = ChatTemplate::short(64).render(&[Turn::ask(Q0)]).unwrap().0;
        assert_eq!(text, "USER: <image>\nWhat color is the square? ASSISTANT:");
        let ids = tok.encode(&text, true).unwrap();
        assert_eq!(ids, [1, 126, 98, 1022, 3, 141, 243, 104, 102, 622, 127]);
        assert_eq!(
            tok.tokens(&ids),
            [
                "<s>",
                "▁USER:",
                "▁",
                "<image>",
                "\n",
                "What",
                "▁color",
                "▁is",
                "▁the",
                "▁square?",
                "▁ASSISTANT:"
            ]
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            "USER: \nWhat color is the square? ASSISTANT:"
        );
    }

    #[test]
    fn fixture_prompts_expand_and_left_pad_like_the_processor() {
        let tok = tok();
        let t = ChatTemplate::short(64);
        let p0 = t.encode_prompt(&tok, &[Turn::ask(Q0)]).unwrap();
        let p1 = t.encode_prompt(&tok, &[Turn::ask(Q1)]).unwrap();
        let as_i64 = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<_>>();
        assert_eq!(
            vec![as_i64(&p0)],
            recorded("inputs.safetensors", "input_ids_0")
        );
        assert_eq!(
            vec![as_i64(&p1)],
            recorded("inputs.safetensors", "input_ids_1")
        );
        let batch = Batch::left_padded(&[p0, p1], tok.pad_id).unwrap();
        let rows = |r: &Vec<Vec<u32>>| r.iter().map(|v| as_i64(v)).collect::<Vec<_>>();
        assert_eq!(
            rows(&batch.input_ids),
            recorded("inputs.safetensors", "input_ids")
        );
        assert_eq!(
            rows(&batch.attention_mask),
            recorded("inputs.safetensors", "attention_mask")
        );
        assert_eq!(
            rows(&batch.position_ids),
            recorded("inputs.safetensors", "position_ids")
        );
    }

    #[test]
    fn fixture_training_batch_matches_recorded_ids_and_labels() {
        let tok = tok();
        let t = ChatTemplate::short(64);
        let e0 = t.encode_training(&tok, &[Turn::qa(Q0, A0)]).unwrap();
        let e1 = t.encode_training(&tok, &[Turn::qa(Q1, A1)]).unwrap();
        let targets: Vec<u32> = e0
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        assert_eq!(
            tok.tokens(&targets),
            ["▁The", "▁square", "▁is", "▁red.", "</s>"]
        );
        let batch = Batch::right_padded(&[e0, e1], tok.pad_id).unwrap();
        let as_i64 = |r: &Vec<Vec<u32>>| {
            r.iter()
                .map(|v| v.iter().map(|&x| i64::from(x)).collect())
                .collect::<Vec<Vec<i64>>>()
        };
        assert_eq!(
            as_i64(&batch.input_ids),
            recorded("expected_train.safetensors", "input_ids")
        );
        assert_eq!(
            as_i64(&batch.attention_mask),
            recorded("expected_train.safetensors", "attention_mask")
        );
        assert_eq!(
            batch.labels.clone().unwrap(),
            recorded("expected_train.safetensors", "labels")
        );
        assert_eq!(batch.target_count(), 11, "README: 11 labelled targets");
        let tensors = batch.tensors(&Device::Cpu).unwrap();
        assert_eq!(tensors.input_ids.dims(), [2, 83]);
        assert_eq!(tensors.labels.unwrap().dtype(), candle_core::DType::I64);
    }

    #[test]
    fn vicuna_system_prompt_and_multi_turn_labels() {
        let tok = tok();
        let t = ChatTemplate::vicuna_v1(3);
        let turns = [Turn::qa(Q0, A0), Turn::qa("What shape is it?", "A square.")];
        let (text, spans) = t.render(&turns).unwrap();
        assert!(text.starts_with("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"));
        assert!(text.ends_with("ASSISTANT: A square.</s>"), "{text}");
        assert_eq!(spans.len(), 2);
        assert_eq!(&text[spans[0].clone()], " The square is red.</s>");
        let e = t.encode_training(&tok, &turns).unwrap();
        assert_eq!(
            e.input_ids.iter().filter(|&&i| i == tok.image_id).count(),
            3
        );
        let targets: Vec<u32> = e
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let decoded = tok.decode(&targets, false).unwrap();
        assert!(decoded.contains("The square is red.</s>"), "{decoded}");
        assert!(
            decoded.contains("square.</s>") && !decoded.contains("shape"),
            "{decoded}"
        );
        assert_eq!(targets.iter().filter(|&&i| i == tok.eos_id).count(), 2);
    }

    #[test]
    fn plain_format_is_image_then_caption_with_only_the_caption_learned() {
        let tok = tok();
        let t = ChatTemplate::plain(3);
        let (text, spans) = t.render(&[Turn::qa(Q0, A0)]).unwrap();
        assert_eq!(text, format!("<image>{A0}</s>"));
        assert_eq!(&text[spans[0].clone()], format!("{A0}</s>"));
        let e = t.encode_training(&tok, &[Turn::qa(Q0, A0)]).unwrap();
        let images = e.input_ids.iter().filter(|&&i| i == tok.image_id).count();
        assert_eq!(images, 3);
        // BOS, the image tokens, then the caption: everything after the image is a target.
        assert_eq!(e.input_ids[0], tok.bos_id);
        assert!(e.labels[..=images].iter().all(|&l| l == IGNORE_INDEX));
        assert!(e.labels[images + 1..].iter().all(|&l| l != IGNORE_INDEX));
        let targets: Vec<u32> = e.labels[images + 1..].iter().map(|&l| l as u32).collect();
        assert_eq!(
            tok.decode(&targets, false).unwrap().trim(),
            format!("{A0}</s>")
        );
        let prompt = t.encode_prompt(&tok, &[Turn::ask(Q0)]).unwrap();
        assert_eq!(prompt.len(), 1 + images);
        assert!(matches!(
            t.render(&[Turn::qa(Q0, A0), Turn::qa(Q0, A0)]),
            Err(ChatError::PlainTurns { turns: 2 })
        ));
    }

    #[test]
    fn malformed_conversations_are_errors() {
        let tok = tok();
        let t = ChatTemplate::short(64);
        assert!(matches!(t.render(&[]), Err(ChatError::Empty)));
        let bad = [Turn::ask("hi"), Turn::qa("x", "y")];
        assert!(matches!(
            t.render(&bad),
            Err(ChatError::MissingAnswer { turn: 0 })
        ));
        assert!(matches!(
            t.encode_training(&tok, &[Turn::ask(Q0)]),
            Err(ChatError::MissingAnswer { turn: 0 })
        ));
        assert!(matches!(
            check_image_count(&[Turn::ask(Q0)], 2),
            Err(ChatError::ImageCount { found: 1, given: 2 })
        ));
        assert!(matches!(
            Batch::right_padded(&[], 0),
            Err(ChatError::EmptyBatch)
        ));
    }
}

//! The LLaVA tokenizer: a `tokenizer.json` (Hugging Face `tokenizers` format) plus the handful of
//! special ids the rest of the model code needs.
//!
//! Real checkpoints ship their own `tokenizer.json`; we load it as is with the `tokenizers` crate
//! (0.23, the version candle already compiles) and never re-implement the algorithm. The tiny preset
//! has no upstream tokenizer, so [`LlavaTokenizer::train_bpe`] trains one with the same structure
//! as the `llava-tiny` fixture's (which transformers 5 loads unchanged):
//!
//! * BPE model, no normalizer, no byte fallback, `fuse_unk`;
//! * Metaspace pre-tokenizer and decoder (`▁`, prepend scheme `first`, split);
//! * specials `<unk>`=0, `<s>`=1, `</s>`=2 at the front of the vocabulary, then the merges, then
//!   `<image>` and `<pad>` as added tokens at the very end (so `<image>` = `vocab - 2` and
//!   `<pad>` = `vocab - 1`, like the fixture's 1022/1023);
//! * a `TemplateProcessing` post-processor that prepends BOS (`<s> $A`).
//!
//! Every failure names the file it came from. A tokenizer whose vocabulary does not fit the model's
//! embedding matrix is rejected up front ([`LlavaTokenizer::check_model_vocab`]) rather than failing
//! later with an out-of-range `index_select` deep inside the forward pass.

use std::path::{Path, PathBuf};

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Special token strings of the LLaVA-1.5 / Llama convention.
pub const UNK: &str = "<unk>";
/// Beginning of sequence, prepended by the post-processor.
pub const BOS: &str = "<s>";
/// End of sequence; closes every assistant turn.
pub const EOS: &str = "</s>";
/// The image placeholder that the processor expands to one token per image feature.
pub const IMAGE: &str = "<image>";
/// Padding token.
pub const PAD: &str = "<pad>";

/// A token's byte range `(start, end)` in the encoded text.
pub type Offsets = (usize, usize);

/// Errors from loading, checking, training or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write tokenizer `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("tokenizer `{}` has no `{token}` token (a LLaVA tokenizer needs {UNK}, {BOS}, {EOS}, {IMAGE} and {PAD})", path.display())]
    MissingSpecial { path: PathBuf, token: String },
    #[error(
        "tokenizer `{}` has {tokenizer_vocab} tokens (highest id {max_id}) but the model `{}` has only {model_vocab} embedding rows",
        tokenizer.display(), model.display()
    )]
    VocabMismatch {
        tokenizer: PathBuf,
        model: PathBuf,
        tokenizer_vocab: usize,
        max_id: u32,
        model_vocab: usize,
    },
    #[error(
        "tokenizer `{}` maps `{IMAGE}` to id {tokenizer_id} but the model `{}` expects image_token_index {model_id}",
        tokenizer.display(), model.display()
    )]
    ImageIdMismatch {
        tokenizer: PathBuf,
        model: PathBuf,
        tokenizer_id: u32,
        model_id: u32,
    },
    #[error("cannot train a tokenizer: {0}")]
    Train(String),
    #[error("tokenizer `{}` cannot encode or decode: {message}", path.display())]
    Codec { path: PathBuf, message: String },
}

/// Settings for [`LlavaTokenizer::train_bpe`].
#[derive(Debug, Clone)]
pub struct BpeTrainingConfig {
    /// Total vocabulary including the five specials (the model's `vocab_size`). The BPE part gets
    /// `vocab_size - 2` entries; if the corpus runs out of merges earlier the tokenizer is smaller.
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    pub min_frequency: u64,
}

impl Default for BpeTrainingConfig {
    fn default() -> Self {
        Self {
            vocab_size: 1024,
            min_frequency: 2,
        }
    }
}

/// A loaded tokenizer and its special ids.
#[derive(Clone)]
pub struct LlavaTokenizer {
    inner: Tokenizer,
    /// Where it came from, for error messages (`<trained>` when trained in memory).
    source: PathBuf,
    /// `<unk>` id.
    pub unk_id: u32,
    /// `<s>` id.
    pub bos_id: u32,
    /// `</s>` id.
    pub eos_id: u32,
    /// `<image>` id.
    pub image_id: u32,
    /// `<pad>` id.
    pub pad_id: u32,
}

impl std::fmt::Debug for LlavaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlavaTokenizer")
            .field("source", &self.source)
            .field("vocab", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("image_id", &self.image_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl LlavaTokenizer {
    /// Loads a `tokenizer.json`. `path` may also be a model directory containing one.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| TokenizerError::Read {
            path: file.clone(),
            source: Box::new(e),
        })?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|source| TokenizerError::Read {
            path: file.clone(),
            source,
        })?;
        Self::from_tokenizer(inner, file)
    }

    /// Wraps an already built tokenizer, looking up the special ids.
    pub fn from_tokenizer(inner: Tokenizer, source: PathBuf) -> Result<Self, TokenizerError> {
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::MissingSpecial {
                    path: source.clone(),
                    token: token.to_string(),
                })
        };
        Ok(Self {
            unk_id: id(UNK)?,
            bos_id: id(BOS)?,
            eos_id: id(EOS)?,
            image_id: id(IMAGE)?,
            pad_id: id(PAD)?,
            inner,
            source,
        })
    }

    /// Trains a BPE tokenizer with the fixture's structure (see the module docs) on `corpus`.
    pub fn train_bpe<I, S>(corpus: I, cfg: &BpeTrainingConfig) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if cfg.vocab_size < 8 {
            return Err(TokenizerError::Train(format!(
                "vocab_size {} is too small (the five specials alone take 5 ids)",
                cfg.vocab_size
            )));
        }
        let train_err = |e: tokenizers::Error| TokenizerError::Train(e.to_string());
        let model = BPE::builder()
            .unk_token(UNK.to_string())
            .fuse_unk(true)
            .build()
            .map_err(train_err)?;
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)));
        tok.with_decoder(Some(Metaspace::new('▁', PrependScheme::First, true)));
        // Specials first so they take ids 0, 1, 2 exactly as in Llama's vocabulary.
        let specials = [UNK, BOS, EOS].map(|s| AddedToken::from(s, true)).to_vec();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(cfg.vocab_size - 2)
            .min_frequency(cfg.min_frequency)
            .special_tokens(specials)
            .build()
            .into();
        tok.train(&mut trainer, corpus).map_err(train_err)?;
        // `<image>` and `<pad>` go after the learned vocabulary (ids vocab-2, vocab-1 when the
        // corpus fills it), matching the fixture and llava-hf checkpoints.
        tok.add_special_tokens([AddedToken::from(IMAGE, true), AddedToken::from(PAD, true)])
            .map_err(train_err)?;
        let bos = tok
            .token_to_id(BOS)
            .ok_or_else(|| TokenizerError::Train("BUG: no <s> after training".into()))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A"))
            .and_then(|b| b.try_pair(format!("{BOS} $A {BOS} $B")))
            .map_err(TokenizerError::Train)?
            .special_tokens(vec![(BOS, bos)])
            .build()
            .map_err(|e| TokenizerError::Train(e.to_string()))?;
        tok.with_post_processor(Some(post));
        Self::from_tokenizer(tok, PathBuf::from("<trained>"))
    }

    /// Writes `tokenizer.json` (the HF format) to `path`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let text = self
            .inner
            .to_string(true)
            .map_err(|source| TokenizerError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        std::fs::write(path, text).map_err(|e| TokenizerError::Write {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Number of ids, added tokens included (what the model's embedding must cover).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The file this tokenizer was loaded from (`<trained>` for an in-memory one).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The underlying `tokenizers` object, for anything not wrapped here.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Checks that every id fits the model's embedding (`model_vocab` rows, from `model_file`) and
    /// that `<image>` is the model's `image_token_index`. A model vocabulary larger than the
    /// tokenizer's is fine (llava-hf pads it to a multiple of 64).
    pub fn check_model_vocab(
        &self,
        model_file: &Path,
        model_vocab: usize,
        image_token_index: u32,
    ) -> Result<(), TokenizerError> {
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        if max_id as usize >= model_vocab {
            return Err(TokenizerError::VocabMismatch {
                tokenizer: self.source.clone(),
                model: model_file.to_path_buf(),
                tokenizer_vocab: self.vocab_size(),
                max_id,
                model_vocab,
            });
        }
        if self.image_id != image_token_index {
            return Err(TokenizerError::ImageIdMismatch {
                tokenizer: self.source.clone(),
                model: model_file.to_path_buf(),
                tokenizer_id: self.image_id,
                model_id: image_token_index,
            });
        }
        Ok(())
    }

    /// Encodes `text`; `add_bos` runs the post-processor (BOS first). Returns ids and each token's
    /// byte range in `text` (used by the chat template to find assistant tokens).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_bos: bool,
    ) -> Result<(Vec<u32>, Vec<Offsets>), TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| self.codec_err(e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Encodes `text`; `add_bos` prepends `<s>` through the post-processor.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.encode_with_offsets(text, add_bos)?.0)
    }

    /// The token strings of `ids` (unknown ids become `<unk>`), for debugging and tests.
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| self.inner.id_to_token(i).unwrap_or_else(|| UNK.to_string()))
            .collect()
    }

    /// Decodes `ids` to text; `skip_special` drops `<s>`, `</s>`, `<image>`, `<pad>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.codec_err(e))
    }

    fn codec_err(&self, e: tokenizers::Error) -> TokenizerError {
        TokenizerError::Codec {
            path: self.source.clone(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let colors = ["red", "green", "blue", "yellow"];
        let shapes = ["square", "circle", "triangle"];
        let mut lines = Vec::new();
        for (i, c) in colors.iter().enumerate() {
            for (j, s) in shapes.iter().enumerate() {
                lines.push(format!(
                    "USER: <image>\nWhat color is the {s}? ASSISTANT: The {s} is {c}."
                ));
                lines.push(format!("There are {} {c} {s}s in the image.", i + j + 2));
            }
        }
        lines
    }

    #[test]
    fn trained_tokenizer_has_fixture_structure() {
        let cfg = BpeTrainingConfig {
            vocab_size: 120,
            min_frequency: 1,
        };
        let tok = LlavaTokenizer::train_bpe(corpus().into_iter(), &cfg).unwrap();
        assert_eq!((tok.unk_id, tok.bos_id, tok.eos_id), (0, 1, 2));
        // The corpus is big enough to fill 118 BPE entries, so the added tokens land at the end.
        assert_eq!(tok.vocab_size(), 120);
        assert_eq!((tok.image_id, tok.pad_id), (118, 119));
        let ids = tok
            .encode("USER: <image>\nWhat color is the square?", true)
            .unwrap();
        assert_eq!(ids[0], 1, "post-processor prepends BOS");
        assert!(
            ids.contains(&118),
            "<image> is one special token: {:?}",
            tok.tokens(&ids)
        );
        assert_eq!(tok.tokens(&ids[1..2]), ["▁USER:"]);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            "USER: \nWhat color is the square?",
            "Metaspace decoder restores spaces; specials skipped"
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let cfg = BpeTrainingConfig {
            vocab_size: 100,
            min_frequency: 1,
        };
        let tok = LlavaTokenizer::train_bpe(corpus().into_iter(), &cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = LlavaTokenizer::load(dir.path()).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size());
        for line in corpus() {
            assert_eq!(
                back.encode(&line, true).unwrap(),
                tok.encode(&line, true).unwrap(),
                "{line}"
            );
        }
        assert_eq!(back.source(), path);
    }

    #[test]
    fn too_small_vocab_is_an_error() {
        let cfg = BpeTrainingConfig {
            vocab_size: 4,
            min_frequency: 1,
        };
        let err = LlavaTokenizer::train_bpe(corpus().into_iter(), &cfg).unwrap_err();
        assert!(err.to_string().contains("vocab_size 4"), "{err}");
    }

    #[test]
    fn missing_special_names_the_file() {
        let cfg = BpeTrainingConfig {
            vocab_size: 60,
            min_frequency: 1,
        };
        let tok = LlavaTokenizer::train_bpe(corpus().into_iter(), &cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tok.json");
        // Drop the `<pad>` added token from the saved JSON.
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .retain(|t| t["content"] != PAD);
        std::fs::write(&path, json.to_string()).unwrap();
        let err = LlavaTokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("tok.json") && err.contains("<pad>"), "{err}");
    }

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
    }

    #[test]
    fn fixture_tokenizer_loads_with_documented_ids() {
        let tok = LlavaTokenizer::load(&fixture()).unwrap();
        assert_eq!(tok.vocab_size(), 1024);
        assert_eq!(
            (tok.unk_id, tok.bos_id, tok.eos_id, tok.image_id, tok.pad_id),
            (0, 1, 2, 1022, 1023)
        );
        let ids = tok
            .encode("USER: <image>\nWhat color is the square? ASSISTANT:", true)
            .unwrap();
        assert_eq!(ids, [1, 126, 98, 1022, 3, 141, 243, 104, 102, 622, 127]);
        assert_eq!(
            tok.encode("USER:", false).unwrap(),
            [126],
            "no BOS without the post-processor"
        );
        let answer = tok.encode(" The square is red.", false).unwrap();
        assert_eq!(tok.tokens(&answer), ["▁The", "▁square", "▁is", "▁red."]);
        assert_eq!(tok.decode(&answer, false).unwrap(), "The square is red.");
    }

    #[test]
    fn vocabulary_is_checked_against_the_model() {
        let tok = LlavaTokenizer::load(&fixture().join("tokenizer.json")).unwrap();
        let model = fixture().join("model.safetensors");
        tok.check_model_vocab(&model, 1024, 1022).unwrap();
        tok.check_model_vocab(&model, 1088, 1022).unwrap(); // padded embeddings are fine
        let err = tok
            .check_model_vocab(&model, 1000, 1022)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.json")
                && err.contains("model.safetensors")
                && err.contains("1024")
                && err.contains("1000"),
            "{err}"
        );
        let err = tok
            .check_model_vocab(&model, 1024, 32000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1022") && err.contains("32000"), "{err}");
    }

    #[test]
    fn trained_tokenizer_json_has_the_fixture_pipeline() {
        let cfg = BpeTrainingConfig {
            vocab_size: 120,
            min_frequency: 1,
        };
        let tok = LlavaTokenizer::train_bpe(corpus().into_iter(), &cfg).unwrap();
        let ours: serde_json::Value =
            serde_json::from_str(&tok.inner().to_string(false).unwrap()).unwrap();
        let text = std::fs::read_to_string(fixture().join("tokenizer.json")).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in ["normalizer", "pre_tokenizer", "decoder"] {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        assert_eq!(
            ours["post_processor"]["single"],
            theirs["post_processor"]["single"]
        );
        for key in ["type", "unk_token", "fuse_unk", "byte_fallback", "dropout"] {
            assert_eq!(ours["model"][key], theirs["model"][key], "model.{key}");
        }
        let specials = |v: &serde_json::Value| -> Vec<String> {
            v["added_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["content"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(specials(&ours), specials(&theirs));
    }

    #[test]
    fn unreadable_tokenizer_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = LlavaTokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let err = LlavaTokenizer::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }
}

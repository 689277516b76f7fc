//! `config.json` for LLaVA-1.5, read exactly as transformers reads it.
//!
//! transformers fills every absent field with a class default, so a config written by
//! transformers 4.x (llava-hf hub checkpoints), by transformers 5 (the fixture) or by hand
//! must all parse to the same numbers. The defaults that matter and are easy to get wrong:
//!
//! - `rope_theta`: transformers 5 stores it as `text_config.rope_parameters.rope_theta`,
//!   4.x as `text_config.rope_theta`, and many hub configs omit it (then 10000).
//!   Any `rope_type` other than `default` (scaled RoPE variants) is refused, not ignored.
//! - `head_dim`: absent or null means `hidden_size / num_attention_heads`.
//! - `num_key_value_heads`: absent or null means `num_attention_heads` (no GQA).
//! - `vision_feature_layer`: an index into CLIP's `hidden_states` tuple, which *includes*
//!   the embeddings output (after `pre_layrnorm`) at index 0; negative counts from the end.
//! - `vision_feature_select_strategy`: `default` drops the CLS token, `full` keeps it.
//! - `tie_word_embeddings` may sit at the top level or in `text_config`; either one true ties.
//!
//! Unknown `model_type`s and architectures are errors naming the file and field, so a
//! Qwen or Idefics checkpoint is refused up front rather than failing on a missing tensor.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{ModelError, Result};

/// How the selected CLIP layer becomes image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token (`default`): `(image_size / patch_size)²` tokens per image.
    Default,
    /// Keep the CLS token (`full`): one more token per image.
    Full,
}

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionAct {
    /// `x · σ(1.702 x)` (OpenAI CLIP, every LLaVA-1.5 tower).
    QuickGelu,
    /// Exact erf GELU.
    Gelu,
}

/// The CLIP vision tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads (head dim = hidden / heads).
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Square input side in pixels.
    pub image_size: usize,
    /// Square patch side in pixels (the conv stride).
    pub patch_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub hidden_act: VisionAct,
    /// Kept only to write it back (CLIP's text/vision projection width; unused by LLaVA).
    pub projection_dim: usize,
}

impl ClipVisionConfig {
    /// Patches per image side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Positions in the tower: patches plus the CLS token.
    pub fn num_positions(&self) -> usize {
        self.patches_per_side() * self.patches_per_side() + 1
    }
    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The LLaMA decoder's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Rows of `embed_tokens` and `lm_head`.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// SwiGLU inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA: query head h reads KV head `h / (heads / kv_heads)`).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Longest position the checkpoint was trained for (informational; not enforced).
    pub max_position_embeddings: usize,
    /// Biases on q/k/v/o.
    pub attention_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    /// `<s>` id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// `</s>` id, if the config names one.
    pub eos_token_id: Option<u32>,
    /// Padding id, if the config names one.
    pub pad_token_id: Option<u32>,
}

/// A LLaVA-1.5 model config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The CLIP tower.
    pub vision: ClipVisionConfig,
    /// The language model.
    pub text: LlamaConfig,
    /// The token id that marks one image-feature slot in `input_ids`.
    pub image_token_index: u32,
    /// Index into CLIP's hidden-states tuple (negative counts from the end).
    pub vision_feature_layer: i64,
    /// CLS handling.
    pub vision_feature_select_strategy: FeatureSelect,
    /// Whether the projector linears have biases.
    pub multimodal_projector_bias: bool,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
}

impl LlavaConfig {
    /// Image tokens each image expands to in `input_ids`.
    pub fn image_tokens_per_image(&self) -> usize {
        let p = self.vision.patches_per_side();
        match self.vision_feature_select_strategy {
            FeatureSelect::Default => p * p,
            FeatureSelect::Full => p * p + 1,
        }
    }

    /// Index into CLIP's hidden-states list (length `layers + 1`) of the selected layer.
    pub fn feature_layer_index(&self) -> usize {
        let n = self.vision.num_hidden_layers as i64 + 1;
        let i = if self.vision_feature_layer < 0 {
            n + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        i as usize
    }

    /// Reads and validates `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Parses config JSON text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            path: path.to_owned(),
            field: "<root>".into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(&v, path)
    }

    /// Parses an already-decoded config.
    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let f = Fields { path, root: v };
        let model_type = f.str_or("model_type", None)?;
        if model_type != "llava" {
            return Err(f.err(
                "model_type",
                format!("`{model_type}` is not supported; only `llava` (LLaVA-1.5) is"),
            ));
        }
        if let Some(arch) = v.get("architectures").and_then(Value::as_array) {
            for (i, a) in arch.iter().enumerate() {
                let a = a.as_str().unwrap_or_default();
                if a != "LlavaForConditionalGeneration" {
                    return Err(f.err(
                        &format!("architectures[{i}]"),
                        format!("`{a}` is not supported; expected `LlavaForConditionalGeneration`"),
                    ));
                }
            }
        }
        let vt = f.str_or("vision_config.model_type", Some("clip_vision_model"))?;
        if vt != "clip_vision_model" {
            return Err(f.err(
                "vision_config.model_type",
                format!("`{vt}` is not supported; expected `clip_vision_model`"),
            ));
        }
        let tt = f.str_or("text_config.model_type", Some("llama"))?;
        if tt != "llama" {
            return Err(f.err(
                "text_config.model_type",
                format!("`{tt}` is not supported; expected `llama`"),
            ));
        }
        let act = f.str_or("projector_hidden_act", Some("gelu"))?;
        if act != "gelu" {
            return Err(f.err(
                "projector_hidden_act",
                format!("`{act}` is not supported; expected `gelu`"),
            ));
        }
        let hidden_act = match f
            .str_or("vision_config.hidden_act", Some("quick_gelu"))?
            .as_str()
        {
            "quick_gelu" => VisionAct::QuickGelu,
            "gelu" => VisionAct::Gelu,
            other => {
                return Err(f.err(
                    "vision_config.hidden_act",
                    format!("`{other}` is not supported (quick_gelu, gelu)"),
                ));
            }
        };
        let text_act = f.str_or("text_config.hidden_act", Some("silu"))?;
        if text_act != "silu" {
            return Err(f.err(
                "text_config.hidden_act",
                format!("`{text_act}` is not supported; expected `silu`"),
            ));
        }
        let vision = ClipVisionConfig {
            hidden_size: f.usize_or("vision_config.hidden_size", Some(768))?,
            intermediate_size: f.usize_or("vision_config.intermediate_size", Some(3072))?,
            num_hidden_layers: f.usize_or("vision_config.num_hidden_layers", Some(12))?,
            num_attention_heads: f.usize_or("vision_config.num_attention_heads", Some(12))?,
            num_channels: f.usize_or("vision_config.num_channels", Some(3))?,
            image_size: f.usize_or("vision_config.image_size", Some(224))?,
            patch_size: f.usize_or("vision_config.patch_size", Some(32))?,
            layer_norm_eps: f.f64_or("vision_config.layer_norm_eps", Some(1e-5))?,
            hidden_act,
            projection_dim: f.usize_or("vision_config.projection_dim", Some(512))?,
        };
        let heads = f.usize_or("text_config.num_attention_heads", Some(32))?;
        let hidden = f.usize_or("text_config.hidden_size", Some(4096))?;
        let rope_theta = match f
            .get("text_config.rope_parameters")
            .filter(|v| !v.is_null())
        {
            Some(_) => {
                let ty = f.str_or("text_config.rope_parameters.rope_type", Some("default"))?;
                if ty != "default" {
                    return Err(f.err(
                        "text_config.rope_parameters.rope_type",
                        format!("`{ty}` is not supported; only unscaled (`default`) RoPE is"),
                    ));
                }
                f.f64_or("text_config.rope_parameters.rope_theta", Some(10000.0))?
            }
            None => f.f64_or("text_config.rope_theta", Some(10000.0))?,
        };
        if f.get("text_config.rope_scaling")
            .is_some_and(|v| !v.is_null())
        {
            return Err(f.err(
                "text_config.rope_scaling",
                "scaled RoPE is not supported".into(),
            ));
        }
        let tie = f.bool_or("tie_word_embeddings", Some(false))?
            || f.bool_or("text_config.tie_word_embeddings", Some(false))?;
        let text = LlamaConfig {
            vocab_size: f.usize_or("text_config.vocab_size", Some(32000))?,
            hidden_size: hidden,
            intermediate_size: f.usize_or("text_config.intermediate_size", Some(11008))?,
            num_hidden_layers: f.usize_or("text_config.num_hidden_layers", Some(32))?,
            num_attention_heads: heads,
            num_key_value_heads: f.usize_or("text_config.num_key_value_heads", Some(heads))?,
            head_dim: f.usize_or("text_config.head_dim", Some(hidden / heads.max(1)))?,
            rms_norm_eps: f.f64_or("text_config.rms_norm_eps", Some(1e-6))?,
            rope_theta,
            max_position_embeddings: f
                .usize_or("text_config.max_position_embeddings", Some(2048))?,
            attention_bias: f.bool_or("text_config.attention_bias", Some(false))?,
            mlp_bias: f.bool_or("text_config.mlp_bias", Some(false))?,
            // LlamaConfig's defaults apply only when the key is absent (null means "none").
            bos_token_id: f.opt_u32_or("text_config.bos_token_id", 1)?,
            eos_token_id: f.opt_u32_or("text_config.eos_token_id", 2)?,
            // transformers 4.x hub configs (llava-hf) put it at the top level.
            pad_token_id: f
                .opt_u32("text_config.pad_token_id")?
                .or(f.opt_u32("pad_token_id")?),
        };
        let strategy = match f
            .str_or("vision_feature_select_strategy", Some("default"))?
            .as_str()
        {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            other => {
                return Err(f.err(
                    "vision_feature_select_strategy",
                    format!("`{other}` is not supported (default, full)"),
                ));
            }
        };
        let layer = match f.get("vision_feature_layer") {
            None => -2,
            Some(Value::Number(n)) if n.is_i64() => n.as_i64().unwrap_or(-2),
            Some(Value::Array(_)) => {
                return Err(f.err(
                    "vision_feature_layer",
                    "a list of layers is not supported; give one integer".into(),
                ));
            }
            Some(other) => {
                return Err(f.err(
                    "vision_feature_layer",
                    format!("expected an integer, got {other}"),
                ));
            }
        };
        let image_token_index = f
            .opt_u32("image_token_index")?
            .or(f.opt_u32("image_token_id")?)
            .unwrap_or(32000);
        let cfg = LlavaConfig {
            vision,
            text,
            image_token_index,
            vision_feature_layer: layer,
            vision_feature_select_strategy: strategy,
            multimodal_projector_bias: f.bool_or("multimodal_projector_bias", Some(true))?,
            tie_word_embeddings: tie,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the cross-field invariants the forward relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |field: &str, msg: String| ModelError::Config {
            path: path.to_owned(),
            field: field.into(),
            msg,
        };
        let v = &self.vision;
        let t = &self.text;
        let positive = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.head_dim", t.head_dim),
        ];
        for (field, n) in positive {
            if n == 0 {
                return Err(err(field, "must be positive".into()));
            }
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(err(
                "vision_config.num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    v.num_attention_heads, v.hidden_size
                ),
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(err(
                "vision_config.patch_size",
                format!(
                    "{} does not divide image_size {}",
                    v.patch_size, v.image_size
                ),
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(err(
                "text_config.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            ));
        }
        if !t.head_dim.is_multiple_of(2) {
            return Err(err(
                "text_config.head_dim",
                format!("{} is odd; RoPE needs an even head dim", t.head_dim),
            ));
        }
        let n = v.num_hidden_layers as i64 + 1;
        if self.vision_feature_layer >= n || self.vision_feature_layer < -n {
            return Err(err(
                "vision_feature_layer",
                format!(
                    "{} is out of range for {} hidden states (embeddings + {} layers)",
                    self.vision_feature_layer, n, v.num_hidden_layers
                ),
            ));
        }
        Ok(())
    }

    /// The config as transformers 5 writes it (`save_pretrained`), so HF can load our saves.
    pub fn to_json(&self) -> Value {
        let v = &self.vision;
        let t = &self.text;
        json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "image_seq_length": self.image_tokens_per_image(),
            "image_token_index": self.image_token_index,
            "model_type": "llava",
            "multimodal_projector_bias": self.multimodal_projector_bias,
            "projector_hidden_act": "gelu",
            "text_config": {
                "attention_bias": t.attention_bias,
                "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id,
                "head_dim": t.head_dim,
                "hidden_act": "silu",
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "max_position_embeddings": t.max_position_embeddings,
                "mlp_bias": t.mlp_bias,
                "model_type": "llama",
                "num_attention_heads": t.num_attention_heads,
                "num_hidden_layers": t.num_hidden_layers,
                "num_key_value_heads": t.num_key_value_heads,
                "pad_token_id": t.pad_token_id,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
                "tie_word_embeddings": self.tie_word_embeddings,
                "vocab_size": t.vocab_size,
            },
            "tie_word_embeddings": self.tie_word_embeddings,
            "vision_config": {
                "hidden_act": match v.hidden_act { VisionAct::QuickGelu => "quick_gelu", VisionAct::Gelu => "gelu" },
                "hidden_size": v.hidden_size,
                "image_size": v.image_size,
                "intermediate_size": v.intermediate_size,
                "layer_norm_eps": v.layer_norm_eps,
                "model_type": "clip_vision_model",
                "num_attention_heads": v.num_attention_heads,
                "num_channels": v.num_channels,
                "num_hidden_layers": v.num_hidden_layers,
                "patch_size": v.patch_size,
                "projection_dim": v.projection_dim,
            },
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": match self.vision_feature_select_strategy {
                FeatureSelect::Default => "default",
                FeatureSelect::Full => "full",
            },
        })
    }
}

/// Typed access to dotted fields of a JSON config, with errors naming file and field.
struct Fields<'a> {
    path: &'a Path,
    root: &'a Value,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: String) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            field: field.into(),
            msg,
        }
    }

    fn get(&self, dotted: &str) -> Option<&Value> {
        dotted.split('.').try_fold(self.root, |v, k| v.get(k))
    }

    /// The field, or `default` when absent or null; an error when absent without default.
    fn present(&self, dotted: &str, has_default: bool) -> Result<Option<&Value>> {
        match self.get(dotted) {
            Some(Value::Null) | None if has_default => Ok(None),
            Some(Value::Null) | None => Err(self.err(dotted, "is required".into())),
            Some(v) => Ok(Some(v)),
        }
    }

    fn str_or(&self, dotted: &str, default: Option<&str>) -> Result<String> {
        match self.present(dotted, default.is_some())? {
            None => Ok(default.unwrap_or_default().to_owned()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(dotted, format!("expected a string, got {other}"))),
        }
    }

    fn usize_or(&self, dotted: &str, default: Option<usize>) -> Result<usize> {
        match self.present(dotted, default.is_some())? {
            None => Ok(default.unwrap_or_default()),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.err(dotted, format!("expected a non-negative integer, got {v}"))
            }),
        }
    }

    fn f64_or(&self, dotted: &str, default: Option<f64>) -> Result<f64> {
        match self.present(dotted, default.is_some())? {
            None => Ok(default.unwrap_or_default()),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(dotted, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, dotted: &str, default: Option<bool>) -> Result<bool> {
        match self.present(dotted, default.is_some())? {
            None => Ok(default.unwrap_or_default()),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(dotted, format!("expected true or false, got {other}"))),
        }
    }

    /// Like `opt_u32`, with `default` when the key is absent (not when it is null).
    fn opt_u32_or(&self, dotted: &str, default: u32) -> Result<Option<u32>> {
        if self.get(dotted).is_none() {
            Ok(Some(default))
        } else {
            self.opt_u32(dotted)
        }
    }

    /// An optional token id. transformers allows a list for `eos_token_id`; we keep the first.
    fn opt_u32(&self, dotted: &str) -> Result<Option<u32>> {
        let v = match self.get(dotted) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(a)) => match a.first() {
                None => return Ok(None),
                Some(v) => v,
            },
            Some(v) => v,
        };
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.err(dotted, format!("expected a token id, got {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<LlavaConfig> {
        LlavaConfig::from_value(&v, Path::new("dir/config.json"))
    }

    #[test]
    fn hub_4x_config_uses_transformers_defaults() {
        // llava-hf/llava-1.5-7b-hf's text_config omits rope_theta, head_dim and kv heads.
        let cfg = parse(json!({
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": 32000, "vision_feature_layer": -2,
            "text_config": {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 100},
            "vision_config": {"hidden_size": 32, "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "num_hidden_layers": 3}
        }))
        .unwrap();
        assert_eq!(cfg.text.rope_theta, 10000.0);
        assert_eq!(cfg.text.head_dim, 16);
        assert_eq!(cfg.text.num_key_value_heads, 4);
        assert_eq!(cfg.vision_feature_select_strategy, FeatureSelect::Default);
        assert_eq!(cfg.image_tokens_per_image(), 4);
        assert_eq!(cfg.feature_layer_index(), 2);
        assert!(cfg.multimodal_projector_bias);
        assert_eq!(cfg.text.pad_token_id, None);
    }

    #[test]
    fn llava_hf_7b_config_parses_to_the_preset() {
        // llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): most text fields are
        // left to LlamaConfig's defaults, pad_token_id sits at the top level.
        let cfg = parse(json!({
            "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
            "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
            "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                "torch_dtype": "float16", "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
        }))
        .unwrap();
        assert_eq!(cfg, crate::model::preset::llava_15_7b());
    }

    #[test]
    fn rope_theta_read_from_every_layout() {
        let base = |text: Value| {
            json!({"model_type": "llava", "text_config": text,
                   "vision_config": {"hidden_size": 32, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}})
        };
        let t = |extra: Value| {
            let mut v = json!({"hidden_size": 64, "num_attention_heads": 4});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parse(base(v)).unwrap().text.rope_theta
        };
        assert_eq!(
            t(json!({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})),
            5e5
        );
        assert_eq!(t(json!({"rope_theta": 1234.0})), 1234.0);
        assert_eq!(t(json!({})), 10000.0);
        let e = parse(base(json!({"hidden_size": 64, "num_attention_heads": 4,
            "rope_parameters": {"rope_theta": 1.0, "rope_type": "yarn"}})))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dir/config.json")
                && e.contains("rope_parameters.rope_type")
                && e.contains("yarn"),
            "{e}"
        );
    }

    #[test]
    fn unknown_architecture_names_file_and_field() {
        let e = parse(
            json!({"model_type": "llava", "architectures": ["Qwen2VLForConditionalGeneration"]}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dir/config.json")
                && e.contains("architectures[0]")
                && e.contains("Qwen2VL"),
            "{e}"
        );
        let e = parse(json!({"model_type": "idefics"}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `model_type`") && e.contains("idefics"),
            "{e}"
        );
        let e = parse(json!({"model_type": "llava", "text_config": {"hidden_size": "big"}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text_config.hidden_size") && e.contains("\"big\""),
            "{e}"
        );
    }

    #[test]
    fn to_json_round_trips() {
        for name in ["llava-tiny", "llava-1.5-7b"] {
            let cfg = crate::model::preset::preset(name).unwrap();
            let back = parse(cfg.to_json()).unwrap();
            assert_eq!(back, cfg, "{name}");
        }
    }

    #[test]
    fn out_of_range_feature_layer_is_rejected() {
        let e = parse(json!({"model_type": "llava", "vision_feature_layer": -9,
            "vision_config": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}}))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("vision_feature_layer") && e.contains("-9"),
            "{e}"
        );
    }
}

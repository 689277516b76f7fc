//! Built-in model configs.
//!
//! - `llava-tiny` (the default): the fixture's shape family, small enough that a LoRA step
//!   on CPU takes milliseconds. CLIP 64 px, patch 8 (64 image tokens), hidden 128 × 2 layers;
//!   projector 128 → 256 → 256; LLaMA hidden 256 × 4 layers, 4 heads of 64, MLP 688, vocab 1024
//!   (ids 1022 `<image>` and 1023 `<pad>` at the top, as the tiny tokenizer lays them out).
//! - `llava-1.5-7b`: `llava-hf/llava-1.5-7b-hf` exactly (CLIP ViT-L/14-336, 24 layers,
//!   hidden 1024, feature layer -2; LLaMA-7B 32 layers, hidden 4096, MLP 11008, vocab 32064
//!   padded, `<image>` = 32000), so weights of that checkpoint load into it unchanged.

use std::path::Path;

use super::config::{ClipVisionConfig, FeatureSelect, LlamaConfig, LlavaConfig, VisionAct};
use super::{ModelError, Result};

/// Names accepted by [`preset`].
pub const PRESETS: &[&str] = &["llava-tiny", "llava-1.5-7b"];

/// The config called `name`.
pub fn preset(name: &str) -> Result<LlavaConfig> {
    match name {
        "llava-tiny" => Ok(llava_tiny()),
        "llava-1.5-7b" => Ok(llava_15_7b()),
        other => Err(ModelError::Config {
            path: Path::new("<preset>").to_owned(),
            field: "name".into(),
            msg: format!(
                "unknown model preset `{other}` (known: {})",
                PRESETS.join(", ")
            ),
        }),
    }
}

/// The tiny default model.
pub fn llava_tiny() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 128,
            intermediate_size: 512,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 64,
            patch_size: 8,
            layer_norm_eps: 1e-5,
            hidden_act: VisionAct::QuickGelu,
            projection_dim: 128,
        },
        text: LlamaConfig {
            vocab_size: 1024,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 4,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 512,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: Some(1023),
        },
        image_token_index: 1022,
        vision_feature_layer: -2,
        vision_feature_select_strategy: FeatureSelect::Default,
        multimodal_projector_bias: true,
        tie_word_embeddings: false,
    }
}

/// `llava-hf/llava-1.5-7b-hf`.
pub fn llava_15_7b() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            layer_norm_eps: 1e-5,
            hidden_act: VisionAct::QuickGelu,
            projection_dim: 768,
        },
        text: LlamaConfig {
            vocab_size: 32064,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            max_position_embeddings: 4096,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: Some(32001),
        },
        image_token_index: 32000,
        vision_feature_layer: -2,
        vision_feature_select_strategy: FeatureSelect::Default,
        multimodal_projector_bias: true,
        tie_word_embeddings: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_shapes() {
        let t = llava_tiny();
        assert_eq!(t.image_tokens_per_image(), 64);
        assert_eq!(t.feature_layer_index(), 1);
        let b = llava_15_7b();
        assert_eq!(b.image_tokens_per_image(), 576);
        assert_eq!(b.feature_layer_index(), 23);
        assert!(
            preset("llava-13b")
                .unwrap_err()
                .to_string()
                .contains("llava-tiny, llava-1.5-7b")
        );
    }

    #[test]
    fn tiny_preset_matches_the_fixture_config() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny/config.json");
        assert_eq!(LlavaConfig::from_file(&path).unwrap(), llava_tiny());
    }
}

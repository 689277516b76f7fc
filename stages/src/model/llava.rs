//! [`Llava`]: the whole model — image features, the image-token merge, the decoder — plus
//! loading, saving and the choice of trainable variables.
//!
//! ## The merge
//!
//! Inputs follow the LlavaProcessor convention: every `<image>` in the prompt was expanded
//! to `image_tokens_per_image` copies of `image_token_index` before tokenizing. The model
//! embeds all ids, then overwrites the image-token rows, in row-major order, with the
//! projected features of the images in order (transformers' `masked_scatter`). The count
//! must match exactly: `#image tokens == #images × tokens per image`, otherwise it is an
//! input error. Without `pixel_values` no merge happens (decode steps of generation).
//!
//! The merge is an `index_select` over `[text embeddings; image features]`, so gradients
//! flow to both the embedding table and the projector/vision tower.
//!
//! ## Trainable variables
//!
//! [`Llava::trainable_vars`] is the only place parameters become [`Var`]s. It first freezes
//! everything (detaching shares storage, no copies), then turns the selected group into
//! variables and puts them back into the model, so later forwards record gradients for
//! exactly that group and an optimizer updating the returned vars updates the model.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};

use super::clip::{ClipVision, Projector, select};
use super::config::{FeatureSelect, LlavaConfig};
use super::kv_cache::KvCache;
use super::linear::{Ctx, DropoutKey, LinearInfo};
use super::llama::{Llama, Positions, additive_mask, rope_tables};
use super::lora::Adapter;
use super::weights::{Builder, Checkpoint, ParamStore, Source, save_safetensors, write_atomic};
use super::{ModelError, Result};

/// Which parameters [`Llava::trainable_vars`] turns into variables; the rest are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainMode {
    /// The trainable adapters' LoRA factors.
    pub lora: bool,
    /// `multi_modal_projector.*`.
    pub projector: bool,
    /// Every `language_model.*` base weight.
    pub language_model: bool,
    /// Every `vision_tower.*` base weight.
    pub vision: bool,
}

impl TrainMode {
    /// LoRA only (base frozen).
    pub const LORA: Self = Self {
        lora: true,
        projector: false,
        language_model: false,
        vision: false,
    };
    /// The projector only (LLaVA-1.5 stage-1 pretraining).
    pub const PROJECTOR: Self = Self {
        lora: false,
        projector: true,
        language_model: false,
        vision: false,
    };
    /// Full fine-tuning as LLaVA-1.5 does it: language model + projector, vision frozen.
    pub const FULL: Self = Self {
        lora: false,
        projector: true,
        language_model: true,
        vision: false,
    };
    /// Every base parameter, vision tower included.
    pub const ALL: Self = Self {
        lora: false,
        projector: true,
        language_model: true,
        vision: true,
    };
}

/// Intermediate tensors of one forward, for parity checks against transformers.
#[derive(Debug, Clone)]
pub struct Trace {
    /// CLIP embeddings output (before `pre_layrnorm`), `[n, 1+P, Dv]`.
    pub vision_embeddings: Option<Tensor>,
    /// CLIP `hidden_states[0..=selected]`.
    pub vision_hidden_states: Vec<Tensor>,
    /// The selected layer after the CLS policy, `[n, T, Dv]`.
    pub vision_selected: Option<Tensor>,
    /// Projected image features `[n, T, D]`.
    pub image_features: Option<Tensor>,
    /// Decoder input after the merge `[b, s, D]`.
    pub lm_inputs_embeds: Tensor,
    /// Output of each decoder layer.
    pub lm_layer_outputs: Vec<Tensor>,
    /// Final RMSNorm output.
    pub lm_final_hidden: Tensor,
    /// `[b, s, vocab]`.
    pub logits: Tensor,
}

/// LLaVA-1.5 (`LlavaForConditionalGeneration`).
pub struct Llava {
    pub(crate) cfg: LlavaConfig,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) store: ParamStore,
    pub(crate) linears: Vec<LinearInfo>,
    pub(crate) adapters: Vec<Adapter>,
    vision: ClipVision,
    projector: Projector,
    lm: Llama,
    /// `Some((seed, forward counter))` in training mode: LoRA dropout is on.
    dropout: Option<(u64, AtomicU64)>,
}

impl Llava {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or a sharded index), converting
    /// weights to `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = LlavaConfig::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Self::build(cfg, Source::Checkpoint(&ck), dtype, device)
    }

    /// Loads weights from an opened checkpoint for a given config.
    pub fn from_checkpoint(
        cfg: LlavaConfig,
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, Source::Checkpoint(ck), dtype, device)
    }

    /// A randomly initialised model (seeded; each tensor's values depend only on the seed
    /// and its name). Linear/embedding weights N(0, 0.02²), norms 1, biases 0.
    pub fn from_config_random(
        cfg: LlavaConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::build(cfg, Source::Random(seed), dtype, device)
    }

    fn build(cfg: LlavaConfig, source: Source<'_>, dtype: DType, device: &Device) -> Result<Self> {
        let mut bld = Builder::new(source, dtype, device);
        let mut linears = Vec::new();
        let vision = ClipVision::new(&mut bld, &cfg.vision, &mut linears)?;
        let projector = Projector::new(&mut bld, &cfg, &mut linears)?;
        let lm = Llama::new(&mut bld, &cfg.text, cfg.tie_word_embeddings, &mut linears)?;
        Ok(Self {
            cfg,
            dtype,
            device: device.clone(),
            store: bld.store,
            linears,
            adapters: Vec::new(),
            vision,
            projector,
            lm,
            dropout: None,
        })
    }

    /// Writes `dir/config.json` and `dir/model.safetensors` (transformers-5 names) in the
    /// model's dtype. Attached adapters are not included (save them with `save_adapter`, or
    /// merge them first).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, self.dtype)
    }

    /// [`Llava::save`] converting weights to `dtype` (f32, f16 or bf16).
    pub fn save_as(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let tensors: Vec<(String, Tensor)> = self
            .store
            .iter()
            .map(|(n, t)| (n.to_owned(), t.detach()))
            .collect();
        save_safetensors(&tensors, dtype, &dir.join("model.safetensors"))?;
        let mut cfg = self.cfg.to_json();
        let dt = match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        };
        cfg["dtype"] = dt.into();
        write_atomic(
            &dir.join("config.json"),
            &serde_json::to_string_pretty(&cfg).unwrap_or_default(),
        )
    }

    /// The config.
    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }

    /// The parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All base parameters with canonical names.
    pub fn params(&self) -> &ParamStore {
        &self.store
    }

    /// Replaces base parameter `name` (canonical) with `value` (same shape; converted to the
    /// model's dtype and device; frozen until the next [`Llava::trainable_vars`]).
    pub fn set_param(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let id = self
            .store
            .id(name)
            .ok_or_else(|| ModelError::Input(format!("no parameter `{name}`")))?;
        let cur = self.store.get(id);
        if cur.dims() != value.dims() {
            return Err(ModelError::Input(format!(
                "parameter `{name}` has shape {:?}, got {:?}",
                cur.dims(),
                value.dims()
            )));
        }
        let v = value
            .to_dtype(self.dtype)?
            .to_device(&self.device)?
            .detach();
        self.store.set(id, v);
        Ok(())
    }

    /// Every linear layer (LoRA-targetable), in registration order.
    pub fn linears(&self) -> &[LinearInfo] {
        &self.linears
    }

    /// Training mode: LoRA dropout on, with masks seeded by `seed` and a per-forward counter.
    /// `None` = inference (no dropout).
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.dropout = seed.map(|s| (s, AtomicU64::new(0)));
    }

    fn ctx(&self) -> Ctx<'_> {
        let dropout = self.dropout.as_ref().map(|(seed, n)| DropoutKey {
            seed: *seed,
            step: n.fetch_add(1, Ordering::Relaxed),
        });
        Ctx {
            store: &self.store,
            adapters: &self.adapters,
            dropout,
        }
    }

    /// CLIP's selected hidden state after the CLS policy: `[n, T, Dv]`.
    pub fn vision_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cx = self.ctx();
        let (_, hs) = self.vision_forward(pixel_values, &cx)?;
        Ok(self.select(&hs)?)
    }

    /// The projector applied to vision features: `[n, T, D]`.
    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.projector.forward(features, &self.ctx())?)
    }

    /// `project(vision_features(pixel_values))`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cx = self.ctx();
        let (_, hs) = self.vision_forward(pixel_values, &cx)?;
        Ok(self.projector.forward(&self.select(&hs)?, &cx)?)
    }

    fn vision_forward(&self, pixel_values: &Tensor, cx: &Ctx<'_>) -> Result<(Tensor, Vec<Tensor>)> {
        let (emb, hs) = self
            .vision
            .forward(pixel_values, cx, self.cfg.feature_layer_index())
            .map_err(input_or_candle)?;
        Ok((emb, hs))
    }

    fn select(&self, hs: &[Tensor]) -> candle_core::Result<Tensor> {
        let h = &hs[self.cfg.feature_layer_index()];
        select(
            h,
            self.cfg.vision_feature_select_strategy == FeatureSelect::Full,
        )
    }

    /// Logits `[b, s, vocab]`.
    ///
    /// - `input_ids`: `[b, s]`, any integer dtype; images already expanded to their tokens.
    /// - `pixel_values`: `[n, 3, H, W]`, one row per image in the order they appear.
    /// - `attention_mask`: `[b, past + s]`, 1 = real token, 0 = padding.
    /// - `position_ids`: `[b, s]`; default `past..past+s` for every row (pass
    ///   `cumsum(mask) - 1` for left-padded batches, as transformers' `generate` does).
    /// - `cache`: appended to; its length is `past`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden =
            self.forward_hidden(input_ids, pixel_values, attention_mask, position_ids, cache)?;
        self.lm_head(&hidden)
    }

    /// Like [`Llava::forward`] but returns the final-norm hidden states `[b, s, D]`, so a
    /// caller can apply [`Llava::lm_head`] to only the positions it needs.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.forward_hidden_from(
            input_ids,
            pixel_values,
            attention_mask,
            position_ids,
            cache,
            0,
        )
    }

    /// [`Llava::forward_hidden`] at positions `from..s` only (`[b, s − from, D]`): the last
    /// decoder layer computes just those rows (keys and values of all positions still
    /// enter the cache), so a caller that needs a few positions (the last one to start
    /// generating; the scored ones of a loss) skips most of that layer's work.
    pub fn forward_hidden_from(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        from: usize,
    ) -> Result<Tensor> {
        let cx = self.ctx();
        let feats = match pixel_values {
            Some(pv) => {
                let (_, hs) = self.vision_forward(pv, &cx)?;
                Some(self.projector.forward(&self.select(&hs)?, &cx)?)
            }
            None => None,
        };
        let embeds = self.merge(input_ids, feats.as_ref(), &cx)?;
        let s = embeds.dim(1)?;
        if from >= s.max(1) {
            return Err(ModelError::Input(format!(
                "forward: output positions from {from} of a {s}-token input"
            )));
        }
        self.decode(embeds, attention_mask, position_ids, cache, &cx, None, from)
    }

    /// The LM head on hidden states `[.., D]`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm.lm_head(hidden, &self.ctx())?)
    }

    /// A full forward that keeps every intermediate tensor (no cache).
    pub fn forward_traced(
        &self,
        input_ids: &Tensor,
        pixel_values: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Trace> {
        let cx = self.ctx();
        let (mut emb, mut hs, mut sel, mut feats) = (None, Vec::new(), None, None);
        if let Some(pv) = pixel_values {
            let (e, h) = self.vision_forward(pv, &cx)?;
            let s = self.select(&h)?;
            feats = Some(self.projector.forward(&s, &cx)?);
            (emb, hs, sel) = (Some(e), h, Some(s));
        }
        let embeds = self.merge(input_ids, feats.as_ref(), &cx)?;
        let mut layers = Vec::new();
        let hidden = self.decode(
            embeds.clone(),
            attention_mask,
            position_ids,
            None,
            &cx,
            Some(&mut layers),
            0,
        )?;
        let logits = self.lm.lm_head(&hidden, &cx)?;
        Ok(Trace {
            vision_embeddings: emb,
            vision_hidden_states: hs,
            vision_selected: sel,
            image_features: feats,
            lm_inputs_embeds: embeds,
            lm_layer_outputs: layers,
            lm_final_hidden: hidden,
            logits,
        })
    }

    /// Token embeddings with image-token rows replaced by `features` (`[n, T, D]`) in order.
    pub fn embed_inputs(&self, input_ids: &Tensor, features: Option<&Tensor>) -> Result<Tensor> {
        self.merge(input_ids, features, &self.ctx())
    }

    fn merge(&self, input_ids: &Tensor, features: Option<&Tensor>, cx: &Ctx<'_>) -> Result<Tensor> {
        let (b, s) = input_ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "input_ids must be [batch, seq], got {:?}",
                input_ids.dims()
            ))
        })?;
        let ids = int_values(input_ids, "input_ids")?;
        let vocab = self.cfg.text.vocab_size as i64;
        let img = i64::from(self.cfg.image_token_index);
        let merging = features.is_some();
        let mut lookup = Vec::with_capacity(ids.len());
        let mut image_rows = Vec::new();
        for (p, &id) in ids.iter().enumerate() {
            if merging && id == img {
                image_rows.push(p);
                // The image id may lie outside the vocabulary in some checkpoints; its
                // embedding is overwritten anyway.
                lookup.push(0u32);
            } else if !(0..vocab).contains(&id) {
                return Err(ModelError::Input(format!(
                    "input_ids[{}][{}] = {id} is outside the vocabulary (size {vocab})",
                    p / s,
                    p % s
                )));
            } else {
                lookup.push(id as u32);
            }
        }
        let table = cx.store.get(self.lm.embed);
        let d = self.cfg.text.hidden_size;
        let lookup = Tensor::from_vec(lookup, b * s, &self.device)?;
        let text = table.index_select(&lookup, 0)?;
        let Some(features) = features else {
            return Ok(text.reshape((b, s, d))?);
        };
        let (n, t, fd) = features.dims3()?;
        if n * t != image_rows.len() {
            return Err(ModelError::Input(format!(
                "input_ids hold {} image tokens (id {img}) but {n} image(s) × {t} tokens per image = {}",
                image_rows.len(),
                n * t
            )));
        }
        if fd != d {
            return Err(ModelError::Input(format!(
                "image features have width {fd}, the language model {d}"
            )));
        }
        // Row p of the result comes from text row p, or image-feature row k for the k-th
        // image token: one gather over [text; features], differentiable for both.
        let mut gather: Vec<u32> = (0..(b * s) as u32).collect();
        for (k, &p) in image_rows.iter().enumerate() {
            gather[p] = (b * s + k) as u32;
        }
        let both = Tensor::cat(
            &[
                &text,
                &features.reshape((n * t, d))?.to_dtype(text.dtype())?,
            ],
            0,
        )?;
        let gather = Tensor::from_vec(gather, b * s, &self.device)?;
        Ok(both.index_select(&gather, 0)?.reshape((b, s, d))?)
    }

    /// Runs the decoder on merged embeddings; builds positions, RoPE tables and the mask.
    /// Returns the final hidden states of positions `from..s`.
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        embeds: Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        cx: &Ctx<'_>,
        capture: Option<&mut Vec<Tensor>>,
        from: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = embeds.dims3()?;
        let past = cache.as_deref().map_or(0, KvCache::len);
        let pos: Vec<i64> = match position_ids {
            Some(p) => {
                if p.dims() != [b, s] {
                    return Err(ModelError::Input(format!(
                        "position_ids has shape {:?}, expected [{b}, {s}]",
                        p.dims()
                    )));
                }
                int_values(p, "position_ids")?
            }
            None => (0..b)
                .flat_map(|_| (past..past + s).map(|p| p as i64))
                .collect(),
        };
        let keep: Option<Vec<bool>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, past + s] {
                    return Err(ModelError::Input(format!(
                        "attention_mask has shape {:?}, expected [{b}, {}] (cached {past} + new {s})",
                        m.dims(),
                        past + s
                    )));
                }
                Some(
                    m.to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(|v| v != 0.0)
                        .collect(),
                )
            }
            None => None,
        };
        let dt = embeds.dtype();
        let c = &self.cfg.text;
        let (cos, sin) = rope_tables(&pos, b, s, c.head_dim, c.rope_theta, dt, &self.device)?;
        // A single new token with no padding attends to everything: skip the mask.
        let mask = if s == 1 && keep.as_ref().is_none_or(|k| k.iter().all(|v| *v)) {
            None
        } else {
            Some(additive_mask(
                keep.as_deref(),
                b,
                s,
                past,
                dt,
                &self.device,
            )?)
        };
        Ok(self.lm.forward(
            embeds,
            &Positions {
                mask: mask.as_ref(),
                cos: &cos,
                sin: &sin,
            },
            from,
            cache,
            cx,
            capture,
        )?)
    }

    /// Freezes every parameter, then turns the group `mode` selects into variables (named
    /// canonically; LoRA factors by their PEFT keys) and returns them. Parameters the
    /// forward never reads (see `never_used`) stay frozen. An empty selection is an error
    /// (it would train nothing).
    pub fn trainable_vars(&mut self, mode: TrainMode) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        for id in self.store.ids().collect::<Vec<_>>() {
            let name = self.store.name(id).to_owned();
            let t = self.store.get(id).detach();
            let pick = !self.never_used(&name)
                && ((mode.projector && name.starts_with("multi_modal_projector."))
                    || (mode.language_model && name.starts_with("language_model."))
                    || (mode.vision && name.starts_with("vision_tower.")));
            if pick {
                let v = Var::from_tensor(&t)?;
                self.store.set(id, v.as_tensor().clone());
                out.push((name, v));
            } else {
                self.store.set(id, t);
            }
        }
        let keys: Vec<(String, String, bool)> = (0..self.linears.len())
            .map(|s| {
                let unused = self.never_used(&format!("{}.weight", self.linears[s].name));
                (
                    self.peft_key(s, "lora_A"),
                    self.peft_key(s, "lora_B"),
                    unused,
                )
            })
            .collect();
        let trainable_adapters = self.adapters.iter().filter(|a| a.trainable).count();
        if mode.lora && trainable_adapters > 1 {
            return Err(ModelError::Adapter(format!(
                "{trainable_adapters} adapters are marked trainable; train one at a time (freeze or merge the others)"
            )));
        }
        for ad in &mut self.adapters {
            let train = mode.lora && ad.trainable;
            for (slot, pair) in ad.pairs.iter_mut().enumerate() {
                let Some(p) = pair else { continue };
                let (a, b) = (p.a.detach(), p.b.detach());
                let (key_a, key_b, unused) = &keys[slot];
                if train && !unused {
                    let (va, vb) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                    p.a = va.as_tensor().clone();
                    p.b = vb.as_tensor().clone();
                    out.push((key_a.clone(), va));
                    out.push((key_b.clone(), vb));
                } else {
                    (p.a, p.b) = (a, b);
                }
            }
        }
        if out.is_empty() {
            return Err(ModelError::Adapter(format!(
                "training mode {mode:?} selects no parameters (no trainable adapter attached?)"
            )));
        }
        Ok(out)
    }
}

impl Llava {
    /// Parameters no forward ever reads: CLIP's `post_layernorm` and the encoder layers past
    /// the selected feature layer. They are loaded and saved but never made trainable (they
    /// would get no gradient, and an optimizer would carry state for nothing).
    fn never_used(&self, name: &str) -> bool {
        if name.starts_with("vision_tower.post_layernorm.") {
            return true;
        }
        name.strip_prefix("vision_tower.encoder.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| n >= self.cfg.feature_layer_index())
    }
}

/// Integer values of a small index tensor (ids, positions) on the host.
fn int_values(t: &Tensor, what: &str) -> Result<Vec<i64>> {
    let t = match t.dtype() {
        DType::I64 => t.clone(),
        DType::U32 | DType::U8 => t.to_dtype(DType::I64)?,
        other => {
            return Err(ModelError::Input(format!(
                "{what} must be an integer tensor, got {other:?}"
            )));
        }
    };
    Ok(t.flatten_all()?.to_vec1::<i64>()?)
}

/// Shape errors about user tensors surface as input errors; anything else stays a candle error.
fn input_or_candle(e: candle_core::Error) -> ModelError {
    match e {
        candle_core::Error::Msg(m) => ModelError::Input(m),
        other => ModelError::Candle(other),
    }
}

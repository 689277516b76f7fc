//! LoRA adapters in PEFT's format: targeting, init, dropout, read/write, merge, stacking.
//!
//! ## Semantics (PEFT 0.21, `LoraConfig`)
//!
//! - A targeted linear computes `W x + b + scale · B (A dropout(x))` with `A: [r, in]`,
//!   `B: [out, r]`, `scale = alpha / r` (or `alpha / √r` with `use_rslora`).
//! - `target_modules` is matched against *in-memory* module names
//!   (`model.language_model.layers.0.self_attn.q_proj`, `model.vision_tower.encoder…`,
//!   `model.multi_modal_projector.linear_1`, `lm_head`): a **string** is a regex that must
//!   match the whole name; a **list** matches a name equal to an entry or ending in
//!   `.entry`.
//! - A fresh adapter has `A ~ U(-1/√in, 1/√in)` (PEFT's kaiming-uniform with a = √5) and
//!   `B = 0`, so it starts as the identity edit. Our init is seeded by (seed, adapter,
//!   layer) rather than drawn from a global generator, so it is reproducible.
//! - Dropout (inverted, `1/(1-p)` on kept units) applies only to the LoRA branch and only
//!   when the model is in training mode (`Llava::set_dropout_seed`).
//!
//! ## Files
//!
//! `adapter_config.json` (the PEFT fields we use, plus PEFT's defaults for the others so
//! PEFT loads it) and `adapter_model.safetensors` with keys
//! `base_model.model.<in-memory module>.lora_{A,B}.weight`. Options we do not implement
//! (DoRA, per-module rank/alpha patterns, `modules_to_save`, LoRA biases, `fan_in_fan_out`)
//! are refused with an error naming the field, never ignored.
//!
//! ## Stacking
//!
//! Several adapters can be attached at once; their contributions add. Continual learning
//! keeps earlier adapters frozen (or merges them into the base with
//! [`Llava::merge_adapter`]) and trains the newest.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Value, json};

use super::linear::DropoutKey;
use super::llava::Llava;
use super::weights::{canonical, fnv1a, in_memory_name, save_safetensors, write_atomic};
use super::{ModelError, Result};

/// Which linear layers an adapter attaches to.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Names or name suffixes (PEFT list form), e.g. `["q_proj", "v_proj"]`.
    Names(Vec<String>),
    /// A regex that must match the whole in-memory module name (PEFT string form).
    Regex(String),
}

impl TargetModules {
    /// A matcher for this target set (the regex is compiled once).
    pub fn matcher(&self) -> Result<impl Fn(&str) -> bool + '_> {
        let re = match self {
            TargetModules::Regex(r) => {
                Some(regex::Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                    ModelError::Adapter(format!("target_modules regex `{r}` is invalid: {e}"))
                })?)
            }
            TargetModules::Names(_) => None,
        };
        Ok(move |name: &str| match (self, &re) {
            (_, Some(re)) => re.is_match(name),
            (TargetModules::Names(ns), None) => ns.iter().any(|t| {
                name == t
                    || name
                        .strip_suffix(t.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
            (TargetModules::Regex(_), None) => false,
        })
    }

    fn to_json(&self) -> Value {
        match self {
            TargetModules::Names(n) => json!(n),
            TargetModules::Regex(r) => json!(r),
        }
    }
}

/// An adapter's hyper-parameters (the PEFT `LoraConfig` fields we implement).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout` probability on the LoRA branch's input.
    pub dropout: f64,
    /// Which layers.
    pub target_modules: TargetModules,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Written to `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// The usual LLaVA LoRA: every attention and MLP projection of the language model.
    pub fn language_model(r: usize, alpha: f64) -> Self {
        LoraConfig {
            r,
            alpha,
            dropout: 0.0,
            target_modules: TargetModules::Regex(
                r".*\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)".into(),
            ),
            use_rslora: false,
            base_model_name_or_path: None,
        }
    }

    /// The factor on `B A x`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Reads a PEFT `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        let err = |field: &str, msg: String| ModelError::Config {
            path: path.to_owned(),
            field: field.into(),
            msg,
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| err("<root>", format!("not valid JSON: {e}")))?;
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(err(
                "peft_type",
                format!("`{peft_type}` is not supported; only LORA is"),
            ));
        }
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .filter(|r| *r > 0)
            .ok_or_else(|| err("r", "expected a positive integer".into()))?
            as usize;
        let alpha = match v.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(a) => a
                .as_f64()
                .ok_or_else(|| err("lora_alpha", format!("expected a number, got {a}")))?,
        };
        let dropout = match v.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(d) => d
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| {
                    err(
                        "lora_dropout",
                        format!("expected a probability in [0, 1), got {d}"),
                    )
                })?,
        };
        let target_modules = match v.get("target_modules") {
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::Names(
                a.iter()
                    .map(|x| {
                        x.as_str().map(str::to_owned).ok_or_else(|| {
                            err("target_modules", format!("expected strings, got {x}"))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            other => {
                return Err(err(
                    "target_modules",
                    format!("expected a regex string or a list of names, got {other:?}"),
                ));
            }
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        for k in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
            if flag(k) {
                return Err(err(k, "is true, which is not supported".into()));
            }
        }
        if let Some(b) = v.get("bias").and_then(Value::as_str)
            && b != "none"
        {
            return Err(err(
                "bias",
                format!("`{b}` is not supported; only `none` is"),
            ));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if v.get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(err(k, "per-module patterns are not supported".into()));
            }
        }
        for k in [
            "modules_to_save",
            "layers_to_transform",
            "exclude_modules",
            "trainable_token_indices",
        ] {
            if v.get(k)
                .is_some_and(|x| !x.is_null() && x.as_array().is_none_or(|a| !a.is_empty()))
            {
                return Err(err(k, "is set, which is not supported".into()));
            }
        }
        Ok(LoraConfig {
            r,
            alpha,
            dropout,
            target_modules,
            use_rslora: flag("use_rslora"),
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// The `adapter_config.json` PEFT writes for this config.
    pub fn to_json(&self) -> Value {
        json!({
            "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration", "parent_library": "transformers.models.llava.modeling_llava"},
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": self.target_modules.to_json(),
            "task_type": null,
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

/// One LoRA pair `A: [r, in]`, `B: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down projection.
    pub a: Tensor,
    /// Up projection.
    pub b: Tensor,
}

/// An adapter attached to the model.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Its name (unique on the model).
    pub name: String,
    /// Hyper-parameters.
    pub config: LoraConfig,
    /// Whether [`Llava::trainable_vars`] in LoRA mode returns its tensors.
    pub trainable: bool,
    /// Factors per linear slot (`None` = not targeted).
    pub(crate) pairs: Vec<Option<LoraPair>>,
}

impl Adapter {
    pub(crate) fn pair(&self, slot: usize) -> Option<&LoraPair> {
        self.pairs.get(slot).and_then(Option::as_ref)
    }

    /// The factor on `B A x`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Inverted dropout on the LoRA branch input, with a mask seeded by (key, slot, name).
    pub(crate) fn dropout(
        &self,
        x: &Tensor,
        key: DropoutKey,
        slot: usize,
    ) -> candle_core::Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let p = self.config.dropout;
        let seed = key.seed
            ^ key.step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ fnv1a(self.name.as_bytes())
            ^ (slot as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }

    /// Number of targeted layers.
    pub fn num_layers(&self) -> usize {
        self.pairs.iter().flatten().count()
    }
}

/// PEFT key prefix of every adapter tensor.
const PEFT_PREFIX: &str = "base_model.model.";

impl Llava {
    /// Attaches a fresh trainable adapter `name` (A uniform, B zero; seeded by `seed`).
    /// Returns the number of targeted layers; zero is an error (a typo in the targets).
    pub fn add_adapter(&mut self, name: &str, config: LoraConfig, seed: u64) -> Result<usize> {
        self.check_new_adapter_name(name)?;
        let matches = config.target_modules.matcher()?;
        let mut pairs = Vec::with_capacity(self.linears.len());
        for info in &self.linears {
            if !matches(&in_memory_name(&info.name)) {
                pairs.push(None);
                continue;
            }
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                seed ^ fnv1a(name.as_bytes()) ^ fnv1a(info.name.as_bytes()).rotate_left(17),
            );
            let bound = 1.0 / (info.in_dim as f64).sqrt();
            let a: Vec<f32> = (0..config.r * info.in_dim)
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a =
                Tensor::from_vec(a, (config.r, info.in_dim), &self.device)?.to_dtype(self.dtype)?;
            let b = Tensor::zeros((info.out_dim, config.r), self.dtype, &self.device)?;
            pairs.push(Some(LoraPair { a, b }));
        }
        let n = pairs.iter().flatten().count();
        if n == 0 {
            return Err(ModelError::Adapter(format!(
                "adapter `{name}`: target_modules {:?} match no linear layer",
                config.target_modules
            )));
        }
        drop(matches);
        self.adapters.push(Adapter {
            name: name.to_owned(),
            config,
            trainable: true,
            pairs,
        });
        Ok(n)
    }

    /// Loads a PEFT adapter directory as `name` (frozen unless `trainable`).
    pub fn load_adapter(&mut self, dir: &Path, name: &str, trainable: bool) -> Result<()> {
        self.check_new_adapter_name(name)?;
        let config = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
        let path = dir.join("adapter_model.safetensors");
        let raw = candle_core::safetensors::load(&path, &self.device).map_err(|e| {
            ModelError::Format {
                path: path.clone(),
                msg: format!("not a readable safetensors file: {e}"),
            }
        })?;
        let mut a_of = vec![None; self.linears.len()];
        let mut b_of = vec![None; self.linears.len()];
        let mut keys: Vec<_> = raw.into_iter().collect();
        keys.sort_by(|x, y| x.0.cmp(&y.0));
        for (key, t) in keys {
            let bad = |msg: String| ModelError::Format {
                path: path.clone(),
                msg: format!("tensor `{key}`: {msg}"),
            };
            let module = key
                .strip_prefix(PEFT_PREFIX)
                .and_then(|k| k.strip_suffix(".weight"))
                .ok_or_else(|| {
                    bad(format!(
                        "expected `{PEFT_PREFIX}<module>.lora_A.weight` or `.lora_B.weight`"
                    ))
                })?;
            let (module, is_a) = if let Some(m) = module.strip_suffix(".lora_A") {
                (m, true)
            } else if let Some(m) = module.strip_suffix(".lora_B") {
                (m, false)
            } else {
                return Err(bad("only lora_A / lora_B tensors are supported".into()));
            };
            let canon = canonical(&format!("{module}.weight"));
            let canon = canon.strip_suffix(".weight").unwrap_or(&canon);
            let slot = self
                .linears
                .iter()
                .position(|l| l.name == canon)
                .ok_or_else(|| bad(format!("no linear layer `{module}` in this model")))?;
            let info = &self.linears[slot];
            let expected = if is_a {
                vec![config.r, info.in_dim]
            } else {
                vec![info.out_dim, config.r]
            };
            if t.dims() != expected.as_slice() {
                return Err(ModelError::Shape {
                    path: path.clone(),
                    name: key.clone(),
                    expected,
                    got: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(self.dtype)?;
            if is_a {
                a_of[slot] = Some(t)
            } else {
                b_of[slot] = Some(t)
            }
        }
        let mut pairs = Vec::with_capacity(self.linears.len());
        for (slot, (a, b)) in a_of.into_iter().zip(b_of).enumerate() {
            match (a, b) {
                (Some(a), Some(b)) => pairs.push(Some(LoraPair { a, b })),
                (None, None) => pairs.push(None),
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(ModelError::MissingTensor {
                        path: path.clone(),
                        name: format!(
                            "{PEFT_PREFIX}{}.{missing}.weight",
                            in_memory_name(&self.linears[slot].name)
                        ),
                        hint: Some("the other factor of the pair is present".into()),
                    });
                }
            }
        }
        if pairs.iter().all(Option::is_none) {
            return Err(ModelError::Format {
                path,
                msg: "the adapter holds no LoRA tensors".into(),
            });
        }
        self.adapters.push(Adapter {
            name: name.to_owned(),
            config,
            trainable,
            pairs,
        });
        Ok(())
    }

    /// Writes adapter `name` as a PEFT directory (f32 tensors, PEFT key names).
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        let ad = self.adapter(name)?;
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut tensors = Vec::new();
        for (slot, pair) in ad.pairs.iter().enumerate() {
            if let Some(p) = pair {
                let m = in_memory_name(&self.linears[slot].name);
                tensors.push((format!("{PEFT_PREFIX}{m}.lora_A.weight"), p.a.detach()));
                tensors.push((format!("{PEFT_PREFIX}{m}.lora_B.weight"), p.b.detach()));
            }
        }
        save_safetensors(&tensors, DType::F32, &dir.join("adapter_model.safetensors"))?;
        let text = serde_json::to_string_pretty(&ad.config.to_json()).unwrap_or_default();
        write_atomic(&dir.join("adapter_config.json"), &text)
    }

    /// Folds adapter `name` into the base weights (`W += scale · B A`, computed in f32) and
    /// detaches it. The result equals PEFT's `merge_and_unload` for that adapter.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        let idx = self.adapter_index(name)?;
        let ad = self.adapters.remove(idx);
        let scale = ad.scale();
        for (slot, pair) in ad.pairs.iter().enumerate() {
            let Some(p) = pair else { continue };
            let id = self.linears[slot].weight;
            let w = self.store.get(id);
            let delta =
                (p.b.to_dtype(DType::F32)?
                    .matmul(&p.a.to_dtype(DType::F32)?)?
                    * scale)?;
            let merged = (w.to_dtype(DType::F32)? + delta)?
                .to_dtype(w.dtype())?
                .detach();
            self.store.set(id, merged);
        }
        Ok(())
    }

    /// Detaches adapter `name` without merging it.
    pub fn remove_adapter(&mut self, name: &str) -> Result<Adapter> {
        let idx = self.adapter_index(name)?;
        Ok(self.adapters.remove(idx))
    }

    /// Marks adapter `name` trainable or frozen for [`Llava::trainable_vars`].
    pub fn set_adapter_trainable(&mut self, name: &str, trainable: bool) -> Result<()> {
        let idx = self.adapter_index(name)?;
        self.adapters[idx].trainable = trainable;
        Ok(())
    }

    /// The attached adapters, oldest first.
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// Adapter `name`.
    pub fn adapter(&self, name: &str) -> Result<&Adapter> {
        Ok(&self.adapters[self.adapter_index(name)?])
    }

    fn adapter_index(&self, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| {
                let known: Vec<_> = self.adapters.iter().map(|a| a.name.as_str()).collect();
                ModelError::Adapter(format!("no adapter `{name}` (attached: {known:?})"))
            })
    }

    fn check_new_adapter_name(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(ModelError::Adapter(format!(
                "an adapter named `{name}` is already attached"
            )));
        }
        Ok(())
    }

    /// PEFT key of factor `which` ("lora_A"/"lora_B") of linear slot `slot`.
    pub(crate) fn peft_key(&self, slot: usize, which: &str) -> String {
        format!(
            "{PEFT_PREFIX}{}.{which}.weight",
            in_memory_name(&self.linears[slot].name)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_targets_match_names_and_dotted_suffixes() {
        let t = TargetModules::Names(vec!["q_proj".into(), "mlp.fc1".into()]);
        let m = t.matcher().unwrap();
        assert!(m("model.language_model.layers.0.self_attn.q_proj"));
        assert!(m("model.vision_tower.encoder.layers.1.mlp.fc1"));
        assert!(!m("model.language_model.layers.0.self_attn.xq_proj"));
        assert!(m("q_proj"));
    }

    #[test]
    fn regex_targets_must_match_the_whole_name() {
        let t = LoraConfig::language_model(8, 16.0).target_modules;
        let m = t.matcher().unwrap();
        assert!(m("model.language_model.layers.12.mlp.down_proj"));
        assert!(!m("model.vision_tower.encoder.layers.0.self_attn.q_proj"));
        assert!(!m("model.language_model.layers.1.self_attn.q_proj.extra"));
        let m = TargetModules::Regex("q_proj".into());
        assert!(!m.matcher().unwrap()(
            "model.language_model.layers.0.self_attn.q_proj"
        ));
        assert!(TargetModules::Regex("(".into()).matcher().is_err());
    }

    #[test]
    fn unsupported_peft_options_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("adapter_config.json");
        std::fs::write(&p, r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true}"#).unwrap();
        let e = LoraConfig::from_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains("use_dora"),
            "{e}"
        );
        std::fs::write(&p, r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_rslora":true}"#).unwrap();
        let c = LoraConfig::from_file(&p).unwrap();
        assert!((c.scale() - 4.0).abs() < 1e-12);
        let back = LoraConfig::from_file(&{
            std::fs::write(&p, c.to_json().to_string()).unwrap();
            p.clone()
        })
        .unwrap();
        assert_eq!(back, c);
    }
}

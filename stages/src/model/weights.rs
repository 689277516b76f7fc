//! Reading and writing LLaVA checkpoints (safetensors), and the flat parameter store.
//!
//! ## Name layouts
//!
//! One model, three spellings of its weight names; all are read, one is written:
//!
//! | layout | vision | projector | language model |
//! |---|---|---|---|
//! | transformers-5 `save_pretrained` (**canonical**, written) | `vision_tower.*` | `multi_modal_projector.*` | `language_model.model.*`, `language_model.lm_head.weight` |
//! | llava-hf hub, transformers 4.x | `vision_tower.vision_model.*` | same | same |
//! | transformers-5 in-memory (and PEFT keys) | `model.vision_tower.*` | `model.multi_modal_projector.*` | `model.language_model.*`, `lm_head.weight` |
//!
//! [`canonical`] maps the other two onto the first. Every internal name is canonical.
//!
//! ## Files
//!
//! A directory holds `model.safetensors`, or `model.safetensors.index.json` whose
//! `weight_map` names the shard of each tensor. Files are memory-mapped and a tensor is
//! converted to the requested dtype only when the model asks for it, so a 7B f16 checkpoint
//! never sits in memory twice. A shape mismatch is reported from the header, before any
//! data is read, naming the shard, the tensor and both shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::{ModelError, Result};

/// Maps any accepted LLaVA weight name onto the transformers-5 save layout.
pub fn canonical(name: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),
        ("vision_tower.vision_model.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ];
    for (old, new) in MAP {
        if let Some(rest) = name.strip_prefix(old) {
            return format!("{new}{rest}");
        }
    }
    name.to_owned()
}

/// The transformers-5 in-memory module name (what PEFT matches and keys by) of a canonical
/// weight prefix, e.g. `language_model.model.layers.0.self_attn.q_proj` →
/// `model.language_model.layers.0.self_attn.q_proj`.
pub fn in_memory_name(canonical_prefix: &str) -> String {
    if let Some(rest) = canonical_prefix.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if let Some(rest) = canonical_prefix.strip_prefix("language_model.lm_head") {
        format!("lm_head{rest}")
    } else {
        format!("model.{canonical_prefix}")
    }
}

/// A memory-mapped checkpoint (one file or a sharded set).
pub struct Checkpoint {
    /// The file named in errors about the whole checkpoint (the index, or the single file).
    origin: PathBuf,
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// canonical name → (file index, name as stored)
    names: HashMap<String, (usize, String)>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors` or `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Format {
                    path: index.clone(),
                    msg: format!("not valid JSON: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Format {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            Self::from_files(index, &paths)
        } else if single.is_file() {
            Self::from_files(single.clone(), &[single])
        } else {
            Err(ModelError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            })
        }
    }

    /// Opens the given safetensors files as one checkpoint; `origin` names it in errors.
    pub fn from_files(origin: PathBuf, paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut names = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            if !p.is_file() {
                return Err(ModelError::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("shard listed in {} is missing", origin.display()),
                    ),
                });
            }
            // SAFETY: the file is mapped read-only; like every safetensors reader we assume it
            // is not truncated or rewritten while the model loads (checkpoints are immutable
            // cache artifacts in this project).
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| ModelError::Format {
                path: p.clone(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
            for (name, _) in st.tensors() {
                names.insert(canonical(&name), (i, name));
            }
            files.push((p.clone(), st));
        }
        Ok(Self {
            origin,
            files,
            names,
        })
    }

    /// Whether the checkpoint holds `canonical_name` (in any layout).
    pub fn contains(&self, canonical_name: &str) -> bool {
        self.names.contains_key(canonical_name)
    }

    /// Canonical names of every tensor in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// Loads `canonical_name`, checking its shape, converted to `dtype` on `device`.
    pub fn tensor(
        &self,
        canonical_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some((fi, stored)) = self.names.get(canonical_name) else {
            let hint = self
                .close_name(canonical_name)
                .map(|n| format!("the checkpoint has `{n}`"));
            return Err(ModelError::MissingTensor {
                path: self.origin.clone(),
                name: canonical_name.to_owned(),
                hint,
            });
        };
        let (path, st) = &self.files[*fi];
        let view = st.get(stored).map_err(|e| ModelError::Format {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if view.shape() != shape {
            return Err(ModelError::Shape {
                path: path.clone(),
                name: stored.clone(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let t = st.load(stored, device).map_err(|e| ModelError::Format {
            path: path.clone(),
            msg: format!("tensor `{stored}`: {e}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }

    /// A present name that differs from `name` only in its last component or layer index,
    /// to point at layout mistakes (e.g. a checkpoint with fewer layers than the config).
    fn close_name(&self, name: &str) -> Option<&str> {
        let stem = name.rsplit_once('.').map(|(s, _)| s)?;
        let mut v: Vec<&str> = self
            .names
            .keys()
            .filter(|k| k.starts_with(stem))
            .map(String::as_str)
            .collect();
        v.sort_unstable();
        v.first().copied()
    }
}

/// Handle of one parameter in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

/// Every base-model parameter, in registration order, with its canonical name.
///
/// Blocks keep [`ParamId`]s and read the tensors from here during forward. Keeping the
/// tensors in one flat list makes saving, merging and turning a subset into trainable
/// variables one loop each, independent of the block structure.
#[derive(Default, Clone)]
pub struct ParamStore {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// Adds a parameter; names are unique.
    pub(crate) fn push(&mut self, name: String, t: Tensor) -> ParamId {
        let id = self.tensors.len();
        self.index.insert(name.clone(), id);
        self.names.push(name);
        self.tensors.push(t);
        ParamId(id)
    }

    /// The tensor of `id`.
    pub fn get(&self, id: ParamId) -> &Tensor {
        &self.tensors[id.0]
    }

    /// Replaces the tensor of `id` (same shape; used by merging and var selection).
    pub(crate) fn set(&mut self, id: ParamId, t: Tensor) {
        self.tensors[id.0] = t;
    }

    /// The id of a canonical name.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied().map(ParamId)
    }

    /// The canonical name of `id`.
    pub fn name(&self, id: ParamId) -> &str {
        &self.names[id.0]
    }

    /// `(name, tensor)` for every parameter, in registration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    /// Ids of every parameter.
    pub fn ids(&self) -> impl Iterator<Item = ParamId> + use<> {
        (0..self.tensors.len()).map(ParamId)
    }

    /// Total element count.
    pub fn num_elements(&self) -> usize {
        self.tensors.iter().map(Tensor::elem_count).sum()
    }
}

/// How a parameter is initialised when there is no checkpoint.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// N(0, std²).
    Normal(f64),
    /// All ones (norm scales).
    Ones,
    /// All zeros (biases).
    Zeros,
}

/// Where [`ParamStore`] entries come from while a model is built.
pub(crate) enum Source<'a> {
    /// A checkpoint: shapes are checked, values converted.
    Checkpoint(&'a Checkpoint),
    /// Seeded random init: each tensor's stream depends only on (seed, name).
    Random(u64),
}

/// Builds the parameter store while blocks register their weights.
pub(crate) struct Builder<'a> {
    pub(crate) store: ParamStore,
    source: Source<'a>,
    dtype: DType,
    device: Device,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(source: Source<'a>, dtype: DType, device: &Device) -> Self {
        Self {
            store: ParamStore::default(),
            source,
            dtype,
            device: device.clone(),
        }
    }

    /// Registers `name` with `shape`, loading or initialising it.
    pub(crate) fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<ParamId> {
        let t = match &self.source {
            Source::Checkpoint(ck) => ck.tensor(name, shape, self.dtype, &self.device)?,
            Source::Random(seed) => random_tensor(*seed, name, shape, init)?
                .to_dtype(self.dtype)?
                .to_device(&self.device)?,
        };
        Ok(self.store.push(name.to_owned(), t))
    }
}

/// A deterministic tensor for `name`: the stream is seeded from (seed, name), so adding a
/// parameter elsewhere never changes the others.
pub(crate) fn random_tensor(seed: u64, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
    use rand::SeedableRng;
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Normal(std) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
            normal_samples(&mut rng, n)
                .into_iter()
                .map(|z| (z * std) as f32)
                .collect()
        }
    };
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// `n` standard normal samples (Box–Muller on the seeded uniform stream).
pub(crate) fn normal_samples(rng: &mut impl rand::Rng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// 64-bit FNV-1a: a stable (across runs and platforms) hash for seeding from names.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `tensors` to `path` as safetensors in `dtype`, atomically (temp file + rename), so
/// a crash never leaves a truncated checkpoint under the final name.
pub fn save_safetensors(tensors: &[(String, Tensor)], dtype: DType, path: &Path) -> Result<()> {
    let mut map = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?;
        map.insert(name.clone(), t);
    }
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp).map_err(|e| ModelError::Format {
        path: tmp.clone(),
        msg: format!("writing: {e}"),
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `text` to `path` atomically.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_maps_to_the_save_layout() {
        for (from, to) in [
            (
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "model.vision_tower.embeddings.class_embedding",
                "vision_tower.embeddings.class_embedding",
            ),
            (
                "model.multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
            (
                "model.language_model.layers.3.mlp.up_proj.weight",
                "language_model.model.layers.3.mlp.up_proj.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
            (
                "language_model.model.norm.weight",
                "language_model.model.norm.weight",
            ),
        ] {
            assert_eq!(canonical(from), to);
        }
        assert_eq!(
            in_memory_name("language_model.model.layers.0.self_attn.q_proj"),
            "model.language_model.layers.0.self_attn.q_proj"
        );
        assert_eq!(
            in_memory_name("vision_tower.encoder.layers.1.mlp.fc2"),
            "model.vision_tower.encoder.layers.1.mlp.fc2"
        );
        assert_eq!(in_memory_name("language_model.lm_head"), "lm_head");
    }

    #[test]
    fn random_init_depends_on_name_not_order() {
        let a = random_tensor(7, "x", &[4], Init::Normal(1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = random_tensor(7, "x", &[4], Init::Normal(1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = random_tensor(7, "y", &[4], Init::Normal(1.0))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let z = normal_samples(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1),
            20000,
        );
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / z.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}

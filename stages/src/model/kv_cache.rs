//! The KV cache of incremental decoding (see [`KvCache`]).

use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};

use crate::ops::decoder;
use crate::ops::packed::{self, Packed};

/// Per-layer key/value cache for incremental decoding.
///
/// Keys and values are stored post-RoPE in preallocated buffers `[b, kv_heads, cap, head_dim]`
/// and written in place (`slice_set`) at `[len, len + s)`, so a decode step copies only its
/// own new positions instead of concatenating the whole cache. The attention kernel reads
/// the valid prefix `[0, len + s)` through a strided view (each head's `t × d` block is
/// contiguous; heads sit `cap × d` apart). Buffers grow geometrically when full; a caller
/// that knows the final length avoids regrowth with [`KvCache::with_capacity`].
///
/// Sharing rules: views handed out ([`KvCache::layer`], the keys a forward attended to)
/// only ever cover positions already written, and writes only touch positions past the
/// current length, so a view never changes under its holder. A [`Clone`] shares the
/// buffers and is marked non-exclusive: its first append copies its prefix into fresh
/// buffers instead of writing into storage the original still appends to.
///
/// Keys that are part of an autograd graph (a cached forward of a model being trained)
/// take the concatenation path instead, so gradients still flow through cached positions.
///
/// The cache length [`KvCache::len`] is the number of positions already processed; the next
/// forward's attention mask (if given) must cover `len + new` columns.
///
/// Decoding weights: a forward of few rows through the cache (a decoding step) multiplies
/// them by the layers' weights packed for that (`ops::packed`: same bits as the plain
/// product, read as one stream). The cache packs each layer's weights at its first such
/// step and keeps them, keyed by the weight tensors, so a cache belongs to one model; its
/// clones and [`KvCache::sharing_packs`] share them.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Capacity (positions) for buffers allocated from now on.
    reserve: usize,
    packs: Packs,
}

/// Per layer, the projection weights packed for decoding, with the ids of the tensors they
/// were packed from.
type PackedLayer = ([candle_core::TensorId; 7], Arc<[Packed; 7]>);

/// Packed decoding weights, shared between caches of one generation.
#[derive(Debug, Default, Clone)]
struct Packs(Arc<Mutex<PackState>>);

#[derive(Debug, Default)]
struct PackState {
    layers: Vec<Option<PackedLayer>>,
    /// Set to keep plain products (tests compare the two paths).
    off: bool,
}

/// Most bytes of packed weights a generation keeps. Packing doubles the decoder's weights
/// in memory; a model whose layers would need more (the 7B preset in f32) decodes with
/// plain products throughout.
const PACK_BUDGET: usize = 2 << 30;

/// One layer's buffers and its valid-prefix views.
#[derive(Debug, Clone)]
struct LayerKv {
    /// `[b, h, cap, d]` contiguous buffers (`None` on the concatenation path).
    buf: Option<(Tensor, Tensor)>,
    /// Views of the first `filled` positions.
    view: (Tensor, Tensor),
    filled: usize,
    /// Whether this cache alone may write into `buf` past `filled`.
    exclusive: bool,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|l| LayerKv {
                    exclusive: false,
                    ..l.clone()
                })
            })
            .collect();
        Self {
            layers,
            len: self.len,
            reserve: self.reserve,
            packs: self.packs.clone(),
        }
    }
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache whose buffers are sized for `positions` cached positions up front
    /// (prompt plus new tokens), so generation never regrows them.
    pub fn with_capacity(positions: usize) -> Self {
        Self {
            reserve: positions,
            ..Self::default()
        }
    }

    /// This cache with `other`'s packed decoding weights, shared: the caches of one
    /// generation's batches pack the model once. Both must serve the same model.
    pub fn sharing_packs(mut self, other: &KvCache) -> Self {
        self.packs = other.packs.clone();
        self
    }

    /// Decodes with plain products instead of packed weights (to compare the two).
    #[cfg(test)]
    pub(crate) fn without_packing(self) -> Self {
        self.packs.0.lock().unwrap_or_else(|e| e.into_inner()).off = true;
        self
    }

    /// Bytes of packed decoding weights held.
    #[cfg(test)]
    pub(crate) fn packed_bytes(&self) -> usize {
        let st = self.packs.0.lock().unwrap_or_else(|e| e.into_inner());
        st.layers
            .iter()
            .flatten()
            .flat_map(|(_, packs)| packs.iter())
            .map(Packed::bytes)
            .sum()
    }

    /// Layer `i` (of `layers` like it)'s weights packed for a forward of `rows` rows,
    /// packing them on first use; `None` where plain products serve (many rows, no FMA, a
    /// model over the budget, turned off).
    pub(crate) fn packed(
        &self,
        (i, layers): (usize, usize),
        p: &decoder::Params,
        rows: usize,
    ) -> Option<Arc<[Packed; 7]>> {
        if !(packed::usable() && packed::few_rows(rows)) {
            return None;
        }
        let ids = p.w.each_ref().map(Tensor::id);
        let mut st = self.packs.0.lock().unwrap_or_else(|e| e.into_inner());
        if st.off {
            return None;
        }
        if let Some(Some((have, packs))) = st.layers.get(i)
            && *have == ids
        {
            return Some(packs.clone());
        }
        let per_layer = p.w.iter().try_fold(0usize, |sum, t| {
            let (out, k) = t.dims2().ok()?;
            sum.checked_add(Packed::size(out, k))
        })?;
        if per_layer.checked_mul(layers)? > PACK_BUDGET {
            return None;
        }
        let packs =
            p.w.iter()
                .map(Packed::from_tensor)
                .collect::<Result<Vec<_>>>();
        let packs: Arc<[Packed; 7]> = Arc::new(packs.ok()?.try_into().ok()?);
        if st.layers.len() <= i {
            st.layers.resize(i + 1, None);
        }
        st.layers[i] = Some((ids, packs.clone()));
        Some(packs)
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        self.layers.clear();
        self.len = 0;
    }

    /// Keeps only the batch rows in `rows` (u32 indices), e.g. to drop finished sequences.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            match &l.buf {
                Some((kb, vb)) => {
                    // Fresh buffers of the same capacity: exclusively ours.
                    let (kb, vb) = (kb.index_select(rows, 0)?, vb.index_select(rows, 0)?);
                    l.view = (kb.narrow(2, 0, l.filled)?, vb.narrow(2, 0, l.filled)?);
                    l.buf = Some((kb, vb));
                    l.exclusive = true;
                }
                None => {
                    l.view = (
                        l.view.0.index_select(rows, 0)?,
                        l.view.1.index_select(rows, 0)?,
                    );
                }
            }
        }
        Ok(())
    }

    /// Layer `i`'s cached keys and values `[b, kv_heads, len, head_dim]`, if any.
    pub fn layer(&self, i: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(i).and_then(Option::as_ref).map(|l| &l.view)
    }

    /// Appends `k`, `v` (`[b, h, s, d]`) to layer `i`, returning the full keys and values
    /// (a view of the valid prefix; strided when preallocated).
    pub(crate) fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        let s = k.dim(2)?;
        let tracked = k.track_op() || v.track_op();
        let layer = match self.layers[i].take() {
            None if tracked => LayerKv {
                buf: None,
                view: (k, v),
                filled: s,
                exclusive: true,
            },
            Some(l) if tracked || l.buf.is_none() => LayerKv {
                buf: None,
                view: (
                    Tensor::cat(&[&l.view.0, &k], 2)?,
                    Tensor::cat(&[&l.view.1, &v], 2)?,
                ),
                filled: l.filled + s,
                exclusive: true,
            },
            prev => write_in_place(prev, k, v, self.reserve)?,
        };
        let view = layer.view.clone();
        self.layers[i] = Some(layer);
        Ok(view)
    }

    /// [`KvCache::append`] for the fused decoder layer's token-major keys/values: a layer's
    /// first append with a reserve writes its buffers directly (one pass, no zero-filled
    /// buffer to copy into); later ones take the general path.
    pub(crate) fn append_new(
        &mut self,
        i: usize,
        new: decoder::NewKv<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, h, s, d) = new.dims;
        let fresh = self.layers.get(i).is_none_or(Option::is_none);
        if !fresh || self.reserve < s {
            let (k, v) = new.tensors()?;
            return self.append(i, k, v);
        }
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        let cap = self.reserve;
        let (kb, vb) = new.buffers(cap);
        let kb = Tensor::from_vec(kb, (b, h, cap, d), &Device::Cpu)?;
        let vb = Tensor::from_vec(vb, (b, h, cap, d), &Device::Cpu)?;
        let layer = LayerKv {
            view: (kb.narrow(2, 0, s)?, vb.narrow(2, 0, s)?),
            buf: Some((kb, vb)),
            filled: s,
            exclusive: true,
        };
        let view = layer.view.clone();
        self.layers[i] = Some(layer);
        Ok(view)
    }

    /// Records that `n` more positions were processed (after all layers appended).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// The preallocated path: reuses `prev`'s buffers when they are exclusive and large
/// enough, else allocates new ones (copying the valid prefix), then writes `k`, `v` at
/// the end of the prefix in place.
fn write_in_place(prev: Option<LayerKv>, k: Tensor, v: Tensor, reserve: usize) -> Result<LayerKv> {
    let (b, h, s, d) = k.dims4()?;
    let filled = prev.as_ref().map_or(0, |l| l.filled);
    let need = filled + s;
    let (kb, vb) = match prev {
        Some(LayerKv {
            buf: Some(bufs),
            exclusive: true,
            ..
        }) if bufs.0.dims().get(2).is_some_and(|&cap| cap >= need) => bufs,
        prev => {
            // Geometric growth: O(log n) prefix copies over a whole generation.
            let cap = need.max(reserve).max(2 * filled);
            let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
            if let Some(l) = prev {
                kb.slice_set(&l.view.0.contiguous()?, 2, 0)?;
                vb.slice_set(&l.view.1.contiguous()?, 2, 0)?;
            }
            (kb, vb)
        }
    };
    kb.slice_set(&k.contiguous()?, 2, filled)?;
    vb.slice_set(&v.contiguous()?, 2, filled)?;
    Ok(LayerKv {
        view: (kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?),
        buf: Some((kb, vb)),
        filled: need,
        exclusive: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(seed: f32, s: usize) -> (Tensor, Tensor) {
        let n = 2 * 3 * s * 4;
        let k: Vec<f32> = (0..n).map(|i| seed + i as f32).collect();
        let v: Vec<f32> = (0..n).map(|i| -seed - i as f32).collect();
        (
            Tensor::from_vec(k, (2, 3, s, 4), &Device::Cpu).unwrap(),
            Tensor::from_vec(v, (2, 3, s, 4), &Device::Cpu).unwrap(),
        )
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Appends `chunks` to layer 0 and checks the views against a plain concatenation.
    fn check_appends(
        cache: &mut KvCache,
        chunks: &[(Tensor, Tensor)],
        mut want: (Tensor, Tensor),
    ) -> (Tensor, Tensor) {
        for (k, v) in chunks {
            let (gk, gv) = cache.append(0, k.clone(), v.clone()).unwrap();
            cache.advance(k.dim(2).unwrap());
            want = (
                Tensor::cat(&[&want.0, k], 2).unwrap(),
                Tensor::cat(&[&want.1, v], 2).unwrap(),
            );
            assert_eq!(gk.dims(), want.0.dims());
            assert_eq!(vals(&gk), vals(&want.0));
            assert_eq!(vals(&gv), vals(&want.1));
            let (lk, _) = cache.layer(0).unwrap();
            assert_eq!(vals(lk), vals(&want.0));
        }
        want
    }

    #[test]
    fn preallocated_cache_matches_concatenation_across_regrowth() {
        // No reserve: the first append sizes the buffer exactly, so later ones regrow.
        let mut cache = KvCache::new();
        let first = kv(0.0, 5);
        cache.append(0, first.0.clone(), first.1.clone()).unwrap();
        cache.advance(5);
        let chunks: Vec<_> = (1..8).map(|i| kv(100.0 * i as f32, 1 + i % 3)).collect();
        check_appends(&mut cache, &chunks, first);
        assert_eq!(
            cache.len(),
            5 + chunks.iter().map(|c| c.0.dim(2).unwrap()).sum::<usize>()
        );
    }

    #[test]
    fn a_first_append_of_token_major_rows_fills_the_buffers_directly() {
        let mut cache = KvCache::with_capacity(16);
        let first = kv(0.0, 5);
        // The same keys/values token-major ([b, s, h, d]), as the fused layer computes them.
        let tm = |t: &Tensor| vals(&t.transpose(1, 2).unwrap().contiguous().unwrap());
        let (k, v) = (tm(&first.0), tm(&first.1));
        let new = decoder::NewKv {
            k: &k,
            v: &v,
            dims: (2, 3, 5, 4),
        };
        let (gk, gv) = cache.append_new(0, new).unwrap();
        cache.advance(5);
        assert_eq!((vals(&gk), vals(&gv)), (vals(&first.0), vals(&first.1)));
        check_appends(&mut cache, &[kv(100.0, 1), kv(200.0, 2)], first);
    }

    #[test]
    fn cloned_caches_do_not_write_into_each_other() {
        let mut a = KvCache::with_capacity(64);
        let first = kv(0.0, 4);
        a.append(0, first.0.clone(), first.1.clone()).unwrap();
        a.advance(4);
        let held = a.layer(0).unwrap().clone();
        let mut b = a.clone();
        let wa = check_appends(&mut a, &[kv(1000.0, 2), kv(2000.0, 1)], first.clone());
        let wb = check_appends(&mut b, &[kv(-5000.0, 3)], first.clone());
        // Each cache still sees only its own appends, and an earlier view is unchanged.
        assert_eq!(vals(&a.layer(0).unwrap().0), vals(&wa.0));
        assert_eq!(vals(&b.layer(0).unwrap().1), vals(&wb.1));
        assert_eq!(vals(&held.0), vals(&first.0));
    }

    #[test]
    fn cache_select_rows_keeps_the_chosen_rows() {
        let mut cache = KvCache::with_capacity(16);
        let first = kv(0.0, 3);
        cache.append(0, first.0.clone(), first.1.clone()).unwrap();
        cache.advance(3);
        let rows = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        cache.select_rows(&rows).unwrap();
        let next = kv(7.0, 1);
        let next = (
            next.0.narrow(0, 0, 1).unwrap(),
            next.1.narrow(0, 0, 1).unwrap(),
        );
        let (k, _) = cache
            .append(
                0,
                next.0.contiguous().unwrap(),
                next.1.contiguous().unwrap(),
            )
            .unwrap();
        let want = Tensor::cat(&[&first.0.narrow(0, 1, 1).unwrap(), &next.0], 2).unwrap();
        assert_eq!(vals(&k), vals(&want));
    }

    #[test]
    fn weights_are_packed_for_few_rows_and_models_within_the_budget() {
        let w = |o: usize, k: usize| Tensor::ones((o, k), candle_core::DType::F32, &Device::Cpu);
        let p = decoder::Params {
            ln1: w(1, 16).unwrap(),
            ln2: w(1, 16).unwrap(),
            w: std::array::from_fn(|_| w(16, 16).unwrap()),
            lora: Default::default(),
            packed: None,
        };
        let cache = KvCache::new();
        if !packed::usable() {
            assert!(cache.packed((0, 1), &p, 16).is_none());
            return;
        }
        let one = cache.packed((0, 2), &p, 16).expect("packed");
        // Kept: the same layer's weights are not packed again.
        assert!(Arc::ptr_eq(&one, &cache.packed((0, 2), &p, 4).unwrap()));
        assert_eq!(cache.packed_bytes(), 7 * Packed::size(16, 16));
        assert!(cache.packed((0, 2), &p, 1).is_none() && cache.packed((0, 2), &p, 65).is_none());
        // A model whose layers would not all fit is not packed at all.
        let layers = PACK_BUDGET / (7 * Packed::size(16, 16)) + 1;
        assert!(KvCache::new().packed((0, layers), &p, 16).is_none());
        assert!(KvCache::new().packed((0, layers - 1), &p, 16).is_some());
    }
}

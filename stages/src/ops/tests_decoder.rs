//! The fused decoder layer (module `decoder`) against the layer composed from the
//! reference ops: outputs, the gradients of the input and of every LoRA factor, the
//! output suffix, GQA, a padding mask, and the KV-cache path step by step.

use candle_core::{D, DType, Device, Tensor, Var};

use super::decoder::{self, DOWN, GATE, K, Kv, LayerDims, O, Params, Positions, Q, UP, V};
use super::reference;
use super::tests::{causal_mask, max_rel, randn};

const DIMS: LayerDims = LayerDims {
    d: 16,
    hq: 4,
    hkv: 2,
    hd: 8,
    inter: 24,
    eps: 1e-5,
};

fn params(seed: u64, lora: bool) -> Params {
    let t = |shape: &[usize], k: u64, scale: f64| (randn(shape, seed * 100 + k) * scale).unwrap();
    let w: [Tensor; 7] = std::array::from_fn(|i| {
        let (o, n) = proj(i);
        t(&[o, n], i as u64, 0.3)
    });
    // Every projection but v has a pair, q and down two (stacked adapters), with non-zero
    // B so every branch matters.
    let lora = std::array::from_fn(|i| {
        let (o, n) = proj(i);
        let pairs = match (lora, i) {
            (false, _) | (_, V) => 0,
            (_, Q | DOWN) => 2,
            _ => 1,
        };
        (0..pairs as u64)
            .map(|k| {
                let a = Var::from_tensor(&t(&[3, n], 20 + i as u64 + 50 * k, 0.3)).unwrap();
                let b = Var::from_tensor(&t(&[o, 3], 40 + i as u64 + 50 * k, 0.3)).unwrap();
                (a.as_tensor().clone(), b.as_tensor().clone(), 1.5 - k as f32)
            })
            .collect()
    });
    Params {
        ln1: (t(&[16], 60, 0.1) + 1.0).unwrap(),
        ln2: (t(&[16], 61, 0.1) + 1.0).unwrap(),
        w,
        lora,
        packed: None,
    }
}

fn proj(i: usize) -> (usize, usize) {
    match i {
        Q => (32, 16),
        K | V => (16, 16),
        O => (16, 32),
        GATE | UP => (24, 16),
        _ => (16, 24),
    }
}

/// RoPE tables for positions `0..s` in every row, and a causal mask with the first
/// `pad` keys of row 0 masked (left padding).
fn positions(b: usize, s: usize, pad: usize) -> (Tensor, Tensor, Tensor) {
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..s as i64).collect();
    let (cos, sin) =
        crate::model::llama::rope_tables(&pos, b, s, 8, 100.0, DType::F32, &Device::Cpu).unwrap();
    let mut pads = vec![0; b];
    pads[0] = pad;
    (cos, sin, causal_mask(b, s, s, &pads))
}

/// The layer composed from reference ops, output rows `from..s`.
fn composed(
    p: &Params,
    x: &Tensor,
    (cos, sin, mask): &(Tensor, Tensor, Tensor),
    from: usize,
) -> Tensor {
    let (b, s, _) = x.dims3().unwrap();
    let sq = s - from;
    let lin = |i: usize, u: &Tensor| {
        p.lora[i].iter().fold(
            reference::linear(u, &p.w[i], None).unwrap(),
            |y, (a, bm, sc)| {
                let low =
                    reference::linear(&reference::linear(u, a, None).unwrap(), bm, None).unwrap();
                (y + (low * *sc as f64).unwrap()).unwrap()
            },
        )
    };
    let heads = |t: Tensor, len: usize, h: usize| {
        t.reshape((b, len, h, 8))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let tail = |t: &Tensor, dim: usize| t.narrow(dim, from, sq).unwrap();
    let n = reference::rms_norm(x, &p.ln1, 1e-5).unwrap();
    let q = heads(lin(Q, &tail(&n, 1)), sq, 4);
    let k = heads(lin(K, &n), s, 2);
    let v = heads(lin(V, &n), s, 2);
    let q = reference::rope(&q, &tail(cos, 1), &tail(sin, 1)).unwrap();
    let k = reference::rope(&k, cos, sin).unwrap();
    let a = reference::attention(&q, &k, &v, Some(&tail(mask, 2)), 1.0 / 8f64.sqrt())
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, sq, 32))
        .unwrap();
    let x1 = (tail(x, 1) + lin(O, &a)).unwrap();
    let n2 = reference::rms_norm(&x1, &p.ln2, 1e-5).unwrap();
    let h = (reference::silu(&lin(GATE, &n2)).unwrap() * lin(UP, &n2)).unwrap();
    (x1 + lin(DOWN, &h)).unwrap()
}

/// Output and all gradients of the fused op vs the composed layer.
fn check(b: usize, s: usize, from: usize, lora: bool) {
    let p = params(b as u64 * 7 + s as u64, lora);
    let tables = positions(b, s, 2);
    let pos = Positions::new(&tables.0, &tables.1, Some(&tables.2)).unwrap();
    let x = Var::from_tensor(&randn(&[b, s, 16], 5)).unwrap();
    let x = x.as_tensor();
    let y = decoder::train(&p, DIMS, x, &pos, from).unwrap();
    let want = composed(&p, x, &tables, from);
    let case = format!("b {b} s {s} from {from} lora {lora}");
    assert!(
        max_rel(&y, &want) < 1e-5,
        "{case}: forward {}",
        max_rel(&y, &want)
    );
    let r = randn(y.dims(), 9);
    let gf = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut ts = vec![x.clone()];
    for (a, bm, _) in p.lora.iter().flatten() {
        ts.extend([a.clone(), bm.clone()]);
    }
    for (i, t) in ts.iter().enumerate() {
        let (f, c) = (gf.get(t).unwrap(), gc.get(t).unwrap());
        assert!(max_rel(f, c) < 1e-4, "{case}: grad {i} {}", max_rel(f, c));
    }
    // Without a graph the same values come out.
    let plain = decoder::forward(&p, DIMS, &x.detach(), &pos, from, Kv::Own).unwrap();
    assert_eq!(max_rel(&plain, &y), 0.0);
}

#[test]
fn fused_layer_matches_composed_with_few_rows() {
    // Few rows: LoRA in its split form, attention tiles of a few rows.
    check(2, 5, 0, true);
    check(2, 5, 3, true);
    check(2, 5, 4, false);
}

#[test]
fn fused_layer_matches_composed_with_merged_lora() {
    // Enough rows that every LoRA projection runs on merged weights.
    check(3, 24, 0, true);
    check(3, 24, 10, true);
    check(3, 24, 0, false);
}

#[test]
fn fused_layer_with_a_kv_cache_matches_the_whole_sequence() {
    let (b, s) = (2, 7);
    let p = params(3, true);
    let x = randn(&[b, s, 16], 11);
    let full_tables = positions(b, s, 0);
    let pos = Positions::new(&full_tables.0, &full_tables.1, Some(&full_tables.2)).unwrap();
    let want = decoder::forward(&p, DIMS, &x, &pos, 0, Kv::Own).unwrap();
    // Prefill 5 positions, then one at a time, keys/values concatenated by the callback.
    let mut cache: Option<(Tensor, Tensor)> = None;
    let mut outs = Vec::new();
    for (start, len) in [(0, 5), (5, 1), (6, 1)] {
        let cos = full_tables.0.narrow(1, start, len).unwrap();
        let sin = full_tables.1.narrow(1, start, len).unwrap();
        let mask = if len > 1 {
            Some(causal_mask(b, len, start + len, &[0, 0]))
        } else {
            None
        };
        let pos = Positions::new(&cos, &sin, mask.as_ref()).unwrap();
        let mut append = |new: decoder::NewKv<'_>| {
            let (k, v) = new.tensors()?;
            let kv = match cache.take() {
                None => (k, v),
                Some((pk, pv)) => (
                    Tensor::cat(&[&pk, &k], 2).unwrap(),
                    Tensor::cat(&[&pv, &v], 2).unwrap(),
                ),
            };
            cache = Some(kv.clone());
            Ok(kv)
        };
        let xs = x.narrow(1, start, len).unwrap();
        outs.push(decoder::forward(&p, DIMS, &xs, &pos, 0, Kv::Cache(&mut append)).unwrap());
    }
    let got = Tensor::cat(&outs, 1).unwrap();
    assert!(max_rel(&got, &want) < 1e-5, "{}", max_rel(&got, &want));
    assert_eq!(got.dim(D::Minus1).unwrap(), 16);
}

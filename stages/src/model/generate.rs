//! Batched generation with a KV cache, and log-probabilities of given responses.
//!
//! ## Generation
//!
//! Every prompt is expanded into `num_samples` rows; rows are processed in chunks of
//! `batch_size`. A chunk is **left-padded** to its longest prompt, with attention mask 0 on
//! the pads and explicit `position_ids = cumsum(mask) − 1` (0 on pads), exactly what
//! transformers' `generate` feeds the model, so a padded row sees the same positions as when
//! run alone. The prompt is prefilled once (the LM head runs only on the last position),
//! then each step feeds one token per row and appends to the [`KvCache`].
//!
//! A row stops at an EOS id (kept as its last token, as HF does), when a stop string
//! appears in its decoded continuation (text is cut before it), or after `max_new_tokens`.
//! Finished rows are dropped from the batch (and the cache) so the remaining ones decode
//! faster. Sampling is per row with an RNG derived from `(seed, prompt, sample)`
//! ([`sequence_rng`]), so results do not depend on batch size or composition.
//!
//! Stop strings need text; to stay independent of any tokenizer implementation the caller
//! passes a [`Detokenizer`] (any `Fn(&[u32]) -> String` works).
//!
//! ## Scoring
//!
//! [`token_logprobs`] / [`sequence_logprobs`] give `log p(token_{i+1} | ..token_i)` per
//! token and summed under a response mask, differentiable (fused log-softmax + gather),
//! for DPO losses and multiple-choice scoring.

use candle_core::{DType, Device, Tensor};

use super::sampling::{SamplingParams, sample, sequence_rng};
use super::{KvCache, Llava, ModelError, Result};

/// Turns token ids back into text (for stop strings and the returned text).
pub trait Detokenizer {
    /// The text of `ids` (special tokens skipped, as the caller wishes).
    fn decode(&self, ids: &[u32]) -> String;
}

impl<F: Fn(&[u32]) -> String> Detokenizer for F {
    fn decode(&self, ids: &[u32]) -> String {
        self(ids)
    }
}

/// One prompt: token ids (images already expanded to their image tokens) and its images.
#[derive(Debug, Clone)]
pub struct GenPrompt {
    /// Prompt token ids.
    pub input_ids: Vec<u32>,
    /// `[n_images, 3, H, W]` for the prompt's image tokens, in order; `None` if text-only.
    pub pixel_values: Option<Tensor>,
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Tokens to generate at most per sequence.
    pub max_new_tokens: usize,
    /// Greedy / temperature / top-k / top-p.
    pub sampling: SamplingParams,
    /// Sequences per prompt.
    pub num_samples: usize,
    /// Base seed of the per-sequence RNGs.
    pub seed: u64,
    /// Tokens that end a sequence (kept as its last token).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a sequence when they appear in its decoded continuation.
    pub stop_strings: Vec<String>,
    /// Id used for left padding (masked out, so its value only needs to be in the vocab).
    pub pad_token_id: u32,
    /// Rows decoded together.
    pub batch_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            num_samples: 1,
            seed: 0,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            pad_token_id: 0,
            batch_size: 16,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token was produced.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Index into the prompts.
    pub prompt_index: usize,
    /// Which of the prompt's samples.
    pub sample_index: usize,
    /// New tokens (EOS included when it ended the sequence).
    pub token_ids: Vec<u32>,
    /// Decoded continuation (without EOS, cut before a stop string) when a detokenizer was given.
    pub text: Option<String>,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Generates `num_samples` continuations of every prompt; results are ordered by prompt,
/// then sample.
pub fn generate(
    model: &Llava,
    prompts: &[GenPrompt],
    opts: &GenerateOptions,
    detok: Option<&dyn Detokenizer>,
) -> Result<Vec<Generated>> {
    opts.sampling
        .validate()
        .map_err(|e| ModelError::Input(format!("generation: {e}")))?;
    if opts.batch_size == 0 || opts.num_samples == 0 {
        return Err(ModelError::Input(
            "generation: batch_size and num_samples must be at least 1".into(),
        ));
    }
    if !opts.stop_strings.is_empty() && detok.is_none() {
        return Err(ModelError::Input(
            "generation: stop strings need a tokenizer to decode text".into(),
        ));
    }
    if let Some(i) = prompts.iter().position(|p| p.input_ids.is_empty()) {
        return Err(ModelError::Input(format!(
            "generation: prompt {i} is empty"
        )));
    }
    let rows: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|p| (0..opts.num_samples).map(move |s| (p, s)))
        .collect();
    let mut out = Vec::with_capacity(rows.len());
    // Holds the decoding weights the batches pack (see `KvCache`), so they are packed once.
    let packs = KvCache::new();
    for chunk in rows.chunks(opts.batch_size) {
        out.extend(generate_chunk(model, prompts, chunk, opts, detok, &packs)?);
    }
    Ok(out)
}

/// State of one row while decoding.
struct Row {
    prompt: usize,
    sample: usize,
    rng: rand::rngs::StdRng,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    /// Attention mask over everything fed so far (prompt incl. pads, then new tokens).
    mask: Vec<u32>,
    next_pos: i64,
}

fn generate_chunk(
    model: &Llava,
    prompts: &[GenPrompt],
    chunk: &[(usize, usize)],
    opts: &GenerateOptions,
    detok: Option<&dyn Detokenizer>,
    packs: &KvCache,
) -> Result<Vec<Generated>> {
    let dev = model.device().clone();
    let b = chunk.len();
    let len = chunk
        .iter()
        .map(|&(p, _)| prompts[p].input_ids.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(b * len);
    let mut pos = Vec::with_capacity(b * len);
    let mut rows = Vec::with_capacity(b);
    let mut images = Vec::new();
    for &(p, s) in chunk {
        let prompt = &prompts[p];
        let pad = len - prompt.input_ids.len();
        ids.extend(
            std::iter::repeat_n(opts.pad_token_id, pad).chain(prompt.input_ids.iter().copied()),
        );
        pos.extend(std::iter::repeat_n(0i64, pad).chain(0..prompt.input_ids.len() as i64));
        let mut mask = vec![0u32; pad];
        mask.resize(len, 1);
        rows.push(Row {
            prompt: p,
            sample: s,
            rng: sequence_rng(opts.seed, p, s),
            tokens: Vec::new(),
            finish: None,
            mask,
            next_pos: prompt.input_ids.len() as i64,
        });
        if let Some(pv) = &prompt.pixel_values {
            images.push(pv.clone());
        }
    }
    if opts.max_new_tokens == 0 {
        return Ok(rows
            .into_iter()
            .map(|r| finished(r, FinishReason::Length, opts, detok))
            .collect());
    }
    let pixel_values = if images.is_empty() {
        None
    } else {
        Some(Tensor::cat(&images, 0)?)
    };
    let mut cache = KvCache::with_capacity(len + opts.max_new_tokens).sharing_packs(packs);
    let input = Tensor::from_vec(ids, (b, len), &dev)?;
    let position = Tensor::from_vec(pos, (b, len), &dev)?;
    let mask = mask_tensor(&rows, &dev)?;
    // Only the last position's hidden state is needed: the last layer skips the others.
    let hidden = model.forward_hidden_from(
        &input,
        pixel_values.as_ref(),
        Some(&mask),
        Some(&position),
        Some(&mut cache),
        len - 1,
    )?;
    let mut logits = model.lm_head(&hidden)?;
    let mut done = Vec::with_capacity(b);
    loop {
        let rows_logits = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, l) in rows.iter_mut().zip(&rows_logits) {
            let tok = sample(l, &opts.sampling, &mut row.rng);
            row.tokens.push(tok);
            row.finish = stop_reason(row, tok, opts, detok);
        }
        // Retire finished rows, shrinking the batch and the cache.
        if rows.iter().any(|r| r.finish.is_some()) {
            let keep: Vec<u32> = (0..rows.len() as u32)
                .filter(|&i| rows[i as usize].finish.is_none())
                .collect();
            let mut still = Vec::with_capacity(keep.len());
            for r in rows.drain(..) {
                match r.finish {
                    Some(f) => done.push(finished(r, f, opts, detok)),
                    None => still.push(r),
                }
            }
            rows = still;
            if rows.is_empty() {
                break;
            }
            cache.select_rows(&Tensor::new(keep.as_slice(), &dev)?)?;
        }
        let n = rows.len();
        let last: Vec<u32> = rows
            .iter()
            .map(|r| *r.tokens.last().unwrap_or(&opts.pad_token_id))
            .collect();
        let next_pos: Vec<i64> = rows.iter().map(|r| r.next_pos).collect();
        for r in rows.iter_mut() {
            r.mask.push(1);
            r.next_pos += 1;
        }
        let input = Tensor::from_vec(last, (n, 1), &dev)?;
        let position = Tensor::from_vec(next_pos, (n, 1), &dev)?;
        let mask = mask_tensor(&rows, &dev)?;
        logits = model.forward(&input, None, Some(&mask), Some(&position), Some(&mut cache))?;
    }
    done.sort_by_key(|g| (g.prompt_index, g.sample_index));
    Ok(done)
}

fn mask_tensor(rows: &[Row], dev: &Device) -> Result<Tensor> {
    let t = rows.first().map_or(0, |r| r.mask.len());
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.mask.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), dev)?)
}

fn stop_reason(
    row: &Row,
    tok: u32,
    opts: &GenerateOptions,
    detok: Option<&dyn Detokenizer>,
) -> Option<FinishReason> {
    if opts.eos_token_ids.contains(&tok) {
        return Some(FinishReason::Eos);
    }
    if let Some(d) = detok.filter(|_| !opts.stop_strings.is_empty()) {
        let text = d.decode(&row.tokens);
        if opts.stop_strings.iter().any(|s| text.contains(s.as_str())) {
            return Some(FinishReason::Stop);
        }
    }
    (row.tokens.len() >= opts.max_new_tokens).then_some(FinishReason::Length)
}

fn finished(
    row: Row,
    finish: FinishReason,
    opts: &GenerateOptions,
    detok: Option<&dyn Detokenizer>,
) -> Generated {
    let text = detok.map(|d| {
        let body = if finish == FinishReason::Eos {
            &row.tokens[..row.tokens.len() - 1]
        } else {
            &row.tokens[..]
        };
        let mut text = d.decode(body);
        if finish == FinishReason::Stop {
            let cut = opts
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min();
            if let Some(c) = cut {
                text.truncate(c);
            }
        }
        text
    });
    Generated {
        prompt_index: row.prompt,
        sample_index: row.sample,
        token_ids: row.tokens,
        text,
        finish,
    }
}

/// Per-token and summed log-probabilities of a batch's tokens under the model.
#[derive(Debug, Clone)]
pub struct SequenceLogprobs {
    /// `[b, s − 1]`: entry `i` is `log p(ids[i+1] | ids[..=i])`, 0 where the mask is 0.
    pub per_token: Tensor,
    /// `[b]`: sum of `per_token`.
    pub sum: Tensor,
    /// `[b]`: number of scored tokens per row.
    pub count: Tensor,
}

/// Log-probabilities of `input_ids[:, 1:]` under `logits[:, :-1]`, masked by
/// `response_mask[:, 1:]` (1 = a response token to score). `logits: [b, s, V]`,
/// `input_ids`, `response_mask`: `[b, s]` (any numeric dtype for the mask). Differentiable
/// in `logits`.
pub fn token_logprobs(
    logits: &Tensor,
    input_ids: &Tensor,
    response_mask: &Tensor,
) -> Result<SequenceLogprobs> {
    let (b, s, _) = logits.dims3()?;
    if input_ids.dims() != [b, s] || response_mask.dims() != [b, s] {
        return Err(ModelError::Input(format!(
            "log-probs: logits {:?} need input_ids and response_mask of [{b}, {s}], got {:?} and {:?}",
            logits.dims(),
            input_ids.dims(),
            response_mask.dims()
        )));
    }
    if s < 2 {
        return Err(ModelError::Input(
            "log-probs: sequences need at least 2 tokens".into(),
        ));
    }
    let l = logits.narrow(1, 0, s - 1)?.to_dtype(DType::F32)?;
    let lsm = crate::ops::log_softmax_last_dim(&l)?;
    let targets = input_ids
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::U32)?
        .unsqueeze(2)?;
    let picked = lsm.gather(&targets.contiguous()?, 2)?.squeeze(2)?;
    let mask = response_mask.narrow(1, 1, s - 1)?.to_dtype(DType::F32)?;
    let per_token = (picked * &mask)?;
    let sum = per_token.sum(1)?;
    let count = mask.sum(1)?;
    Ok(SequenceLogprobs {
        per_token,
        sum,
        count,
    })
}

/// Runs the model (no cache) and scores the masked tokens; same result as
/// [`token_logprobs`] on the full logits. Training batches are right-padded: pass the
/// attention mask and leave `position_ids` `None` (positions `0..s`).
///
/// The LM head runs only at the positions that predict a scored token (hidden states
/// gathered where `response_mask[:, 1:] != 0`): for LLaVA most positions are image and
/// prompt tokens, so this skips most of the LM-head GEMMs and log-softmax forward and
/// backward. The last decoder layer likewise starts at the first such position
/// ([`Llava::forward_hidden_from`]). Scores are scattered back into `per_token` with
/// `index_add`, which is differentiable in the gathered values.
pub fn sequence_logprobs(
    model: &Llava,
    input_ids: &Tensor,
    pixel_values: Option<&Tensor>,
    attention_mask: Option<&Tensor>,
    position_ids: Option<&Tensor>,
    response_mask: &Tensor,
) -> Result<SequenceLogprobs> {
    let full = || -> Result<SequenceLogprobs> {
        // Every position: also how shape problems get reported.
        let hidden =
            model.forward_hidden(input_ids, pixel_values, attention_mask, position_ids, None)?;
        token_logprobs(&model.lm_head(&hidden)?, input_ids, response_mask)
    };
    let (b, s) = match input_ids.dims2() {
        Ok((b, s)) if s >= 2 && response_mask.dims() == [b, s] => (b, s),
        _ => return full(),
    };
    let mask = response_mask.narrow(1, 1, s - 1)?.to_dtype(DType::F32)?;
    let mask_v = mask.flatten_all()?.to_vec1::<f32>()?;
    let rows: Vec<u32> = (0..mask_v.len() as u32)
        .filter(|&i| mask_v[i as usize] != 0.0)
        .collect();
    let Some(from) = rows.iter().map(|&r| r as usize % (s - 1)).min() else {
        return full();
    };
    let hidden = model.forward_hidden_from(
        input_ids,
        pixel_values,
        attention_mask,
        position_ids,
        None,
        from,
    )?;
    let (_, sh, dm) = hidden.dims3()?;
    let dev = hidden.device();
    let targets: Vec<u32> = input_ids
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1()?;
    let picked_t: Vec<u32> = rows.iter().map(|&r| targets[r as usize]).collect();
    let weights: Vec<f32> = rows.iter().map(|&r| mask_v[r as usize]).collect();
    // Row r = (batch, position i) of the [b, s − 1] scores is row (batch, i − from) of
    // the hidden states.
    let at: Vec<u32> = rows
        .iter()
        .map(|&r| {
            let (bi, i) = (r as usize / (s - 1), r as usize % (s - 1));
            (bi * sh + i - from) as u32
        })
        .collect();
    let n = rows.len();
    let rows = Tensor::from_vec(rows, n, dev)?;
    let h = hidden
        .reshape((b * sh, dm))?
        .index_select(&Tensor::from_vec(at, n, dev)?, 0)?;
    let lsm = crate::ops::log_softmax_last_dim(&model.lm_head(&h)?.to_dtype(DType::F32)?)?;
    let picked = lsm
        .gather(&Tensor::from_vec(picked_t, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let picked = (picked * Tensor::from_vec(weights, n, dev)?)?;
    let per_token = Tensor::zeros(b * (s - 1), DType::F32, dev)?
        .index_add(&rows, &picked, 0)?
        .reshape((b, s - 1))?;
    Ok(SequenceLogprobs {
        sum: per_token.sum(1)?,
        count: mask.sum(1)?,
        per_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_logprobs_match_a_manual_log_softmax() {
        let logits = Tensor::new(
            &[[[1.0f32, 2.0, 0.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let ids = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[0u32, 0, 1]], &Device::Cpu).unwrap();
        let lp = token_logprobs(&logits, &ids, &mask).unwrap();
        let per = lp.per_token.to_vec2::<f32>().unwrap();
        let want = 3.0 - (0.5f32.exp() * 2.0 + 3.0f32.exp()).ln();
        assert_eq!(per[0][0], 0.0, "masked token contributes nothing");
        assert!((per[0][1] - want).abs() < 1e-6);
        assert!((lp.sum.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
        assert_eq!(lp.count.to_vec1::<f32>().unwrap(), [1.0]);
    }

    #[test]
    fn gathered_sequence_logprobs_match_the_full_logits_path_with_gradients() {
        let cfg = crate::model::preset::llava_tiny();
        let img = cfg.image_token_index;
        let mut model = Llava::from_config_random(cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let mode = crate::model::TrainMode {
            lora: false,
            projector: false,
            language_model: true,
            vision: false,
        };
        let vars = model.trainable_vars(mode).unwrap();
        let (b, s) = (2, 6);
        let ids: Vec<u32> = (0..(b * s) as u32).map(|i| 5 + i * 7 % 90).collect();
        assert!(!ids.contains(&img));
        let ids = Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap();
        let mask = Tensor::new(
            &[
                [0f32, 0.0, 1.0, 1.0, 0.0, 1.0],
                [0.0, 1.0, 0.0, 0.0, 1.0, 1.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let fast = sequence_logprobs(&model, &ids, None, None, None, &mask).unwrap();
        let logits = model.forward(&ids, None, None, None, None).unwrap();
        let full = token_logprobs(&logits, &ids, &mask).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        };
        close(&fast.per_token, &full.per_token);
        close(&fast.sum, &full.sum);
        close(&fast.count, &full.count);
        let gf = fast.sum.sum_all().unwrap().backward().unwrap();
        let gs = full.sum.sum_all().unwrap().backward().unwrap();
        let mut compared = 0;
        for (name, v) in &vars {
            match (gf.get(v.as_tensor()), gs.get(v.as_tensor())) {
                (Some(a), Some(b)) => {
                    close(a, b);
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!("{name}: gradient present on one path only"),
            }
        }
        assert!(compared > 10, "only {compared} gradients compared");
    }

    #[test]
    fn token_logprobs_are_differentiable_and_check_shapes() {
        let v = candle_core::Var::new(&[[[1.0f32, 2.0], [0.0, 1.0]]], &Device::Cpu).unwrap();
        let ids = Tensor::new(&[[0u32, 1]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1f32, 1.0]], &Device::Cpu).unwrap();
        let lp = token_logprobs(v.as_tensor(), &ids, &mask).unwrap();
        let g = lp.sum.sum_all().unwrap().backward().unwrap();
        let g = g.get(v.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        // d/dx log softmax(x)[1] = onehot(1) − softmax(x) at position 0; position 1 unused.
        let p1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert!((g[0][0][1] - (1.0 - p1)).abs() < 1e-6 && g[0][1] == [0.0, 0.0]);
        assert!(
            token_logprobs(
                v.as_tensor(),
                &Tensor::new(&[[0u32]], &Device::Cpu).unwrap(),
                &mask
            )
            .is_err()
        );
    }
}

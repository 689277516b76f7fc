//! Next-token selection: greedy, temperature, top-k, top-p, with per-sequence seeded RNGs.
//!
//! The warpers apply in transformers' order (temperature, then top-k, then top-p) to one
//! row of logits at a time. Determinism does not depend on batching: every generated
//! sequence owns an RNG derived from `(seed, prompt index, sample index)` alone
//! ([`sequence_rng`]), so the same prompt/sample pair draws the same tokens whatever else
//! shares its batch. Greedy picks the first maximal logit, as `torch.argmax` does.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to pick the next token. `temperature == 0` means greedy (top-k/top-p ignored).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 = greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }

    /// Whether this selects the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the ranges, naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// The RNG of one generated sequence: a SplitMix64-style mix of the three indices, so
/// neighbouring seeds and indices give unrelated streams.
pub fn sequence_rng(seed: u64, prompt_index: usize, sample_index: usize) -> StdRng {
    let mut z = seed;
    for v in [prompt_index as u64, sample_index as u64] {
        z = splitmix(z ^ splitmix(v.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    }
    StdRng::seed_from_u64(z)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the first maximal value (NaNs never win).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    if p.is_greedy() || logits.len() <= 1 {
        return argmax(logits);
    }
    let probs = warped_probs(logits, p);
    let u: f32 = rng.random();
    let mut acc = 0f32;
    let mut last = 0;
    for (i, &q) in probs.iter().enumerate() {
        if q > 0.0 {
            acc += q;
            last = i;
            if u < acc {
                return i as u32;
            }
        }
    }
    // Rounding left `acc` a hair under 1: the last token with mass takes the remainder.
    last as u32
}

/// The sampling distribution after temperature, top-k and top-p (zeros for removed tokens).
pub fn warped_probs(logits: &[f32], p: &SamplingParams) -> Vec<f32> {
    let t = if p.temperature > 0.0 {
        p.temperature
    } else {
        1.0
    };
    let mut z: Vec<f32> = logits.iter().map(|&l| l / t).collect();
    if p.top_k > 0 && p.top_k < z.len() {
        // HF keeps every token whose logit is >= the k-th largest (ties survive).
        let mut sorted = z.clone();
        let kth = *sorted
            .select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a))
            .1;
        z.iter_mut()
            .filter(|v| **v < kth)
            .for_each(|v| *v = f32::NEG_INFINITY);
    }
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = z.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= s);
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        // Keep the most likely tokens until their mass reaches top_p (at least one).
        let mut cum = 0f32;
        let mut keep = 0;
        for &i in &order {
            keep += 1;
            cum += probs[i];
            if cum >= p.top_p {
                break;
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= s);
    }
    probs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        assert_eq!(
            sample(
                &[0.1, 3.0, 2.0],
                &SamplingParams::greedy(),
                &mut sequence_rng(0, 0, 0)
            ),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_remove_the_tail() {
        let logits = [2.0f32, 1.0, 0.0, -1.0, 3.0];
        let k2 = warped_probs(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 2,
                top_p: 1.0,
            },
        );
        let kept: Vec<usize> = (0..5).filter(|&i| k2[i] > 0.0).collect();
        assert_eq!(kept, [0, 4]);
        assert!((k2.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // softmax([3,2,1,0,-1]) ≈ [.636,.234,.086,.032,.012]: top_p 0.8 keeps {3, 2}, 0.9 adds 1.
        let p8 = warped_probs(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.8,
            },
        );
        assert_eq!((0..5).filter(|&i| p8[i] > 0.0).count(), 2);
        let p9 = warped_probs(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.9,
            },
        );
        assert_eq!(
            (0..5).filter(|&i| p9[i] > 0.0).collect::<Vec<_>>(),
            [0, 1, 4]
        );
    }

    #[test]
    fn temperature_flattens_and_sharpens() {
        let logits = [1.0f32, 0.0];
        let hot = warped_probs(
            &logits,
            &SamplingParams {
                temperature: 10.0,
                top_k: 0,
                top_p: 1.0,
            },
        );
        let cold = warped_probs(
            &logits,
            &SamplingParams {
                temperature: 0.1,
                top_k: 0,
                top_p: 1.0,
            },
        );
        assert!(hot[0] < 0.53 && cold[0] > 0.9999);
    }

    #[test]
    fn sampling_follows_the_distribution_and_is_seeded() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 0.25 / 0.75
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        let mut rng = sequence_rng(7, 1, 2);
        let ones = (0..4000)
            .filter(|_| sample(&logits, &p, &mut rng) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
        let draw = |s, pi, si| {
            let mut r = sequence_rng(s, pi, si);
            (0..32)
                .map(|_| sample(&logits, &p, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 1, 2), draw(7, 1, 2));
        assert_ne!(draw(7, 1, 2), draw(7, 2, 1));
        assert_ne!(draw(7, 0, 0), draw(8, 0, 0));
    }

    #[test]
    fn validate_names_bad_fields() {
        let bad = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        };
        assert!(bad.validate().unwrap_err().contains("temperature"));
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        };
        assert!(bad.validate().unwrap_err().contains("top_p"));
    }
}

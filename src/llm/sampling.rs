//! Choosing the next token from logits: greedy (the default for captions: deterministic), or
//! repeat penalty → top-k → temperature → top-p → a seeded draw. Pure Rust, no FFI.

use serde::Deserialize;

/// Sampling settings; `temperature = 0` means greedy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Divide positive logits (multiply negative ones) of recently generated tokens by this.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the draw, for reproducible sampling.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 40, top_p: 0.95, repeat_penalty: 1.1, repeat_last_n: 64, seed: 0 }
    }
}

/// A sampler with its random state and scratch buffer.
pub struct TokenSampler {
    params: SamplingParams,
    rng: u64,
    candidates: Vec<(i32, f32)>,
    scratch: Vec<f32>,
}

impl TokenSampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = params.seed ^ 0x9E37_79B9_7F4A_7C15;
        TokenSampler { params, rng, candidates: Vec::new(), scratch: Vec::new() }
    }

    fn next_f32(&mut self) -> f32 {
        (crate::util::splitmix64(&mut self.rng) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks the next token from `logits`, given the tokens generated so far (`history`).
    /// Returns `None` for empty logits.
    pub fn sample(&mut self, logits: &[f32], history: &[i32]) -> Option<i32> {
        if logits.is_empty() {
            return None;
        }
        let p = &self.params;
        let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let penalty = p.repeat_penalty;
        let penalised = |logit: f32| if logit > 0.0 { logit / penalty } else { logit * penalty };
        // The penalty touches at most `repeat_last_n` tokens: they are rewritten in a copy (each
        // from its own logit, so a token repeated in the history is penalised once), not looked
        // up in the history for every one of the vocabulary's tokens.
        let penalise = penalty != 1.0 && !recent.is_empty();
        if p.temperature <= 0.0 {
            if !penalise {
                return Some(argmax(logits) as i32);
            }
            self.scratch.clear();
            self.scratch.extend_from_slice(logits);
            for &t in recent {
                if let Some(l) = logits.get(t as usize) {
                    self.scratch[t as usize] = penalised(*l);
                }
            }
            return Some(argmax(&self.scratch) as i32);
        }
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().map(|(t, l)| (t as i32, *l)));
        if penalise {
            for &t in recent {
                if let Some(l) = logits.get(t as usize) {
                    self.candidates[t as usize].1 = penalised(*l);
                }
            }
        }
        let temperature = p.temperature;
        let (top_k, top_p) = (p.top_k, p.top_p);
        self.candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if top_k > 0 {
            self.candidates.truncate(top_k);
        }
        let max = self.candidates.first()?.1;
        let mut total = 0.0;
        for c in &mut self.candidates {
            c.1 = ((c.1 - max) / temperature).exp();
            total += c.1;
        }
        let mut kept = 0;
        let mut mass = 0.0;
        for c in &mut self.candidates {
            c.1 /= total;
            mass += c.1;
            kept += 1;
            if mass >= top_p {
                break;
            }
        }
        self.candidates.truncate(kept);
        let mut draw = self.next_f32() * mass;
        for (token, prob) in &self.candidates {
            draw -= prob;
            if draw <= 0.0 {
                return Some(*token);
            }
        }
        self.candidates.last().map(|c| c.0)
    }
}

/// The index of the largest value, the first one on ties (`values` not empty). Two passes the
/// compiler vectorises: the maximum over eight lanes, then its first position.
fn argmax(values: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    // All NaN or -inf: the first token, as a fold that never replaces its start would give.
    values.iter().position(|&v| v == max).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, repeat_penalty: 1.0, ..SamplingParams::default() }
    }

    #[test]
    fn greedy_picks_the_largest_logit_and_penalises_repeats() {
        // (logits, history, penalty, expected token)
        let cases: &[(&[f32], &[i32], f32, i32)] = &[
            (&[0.1, 2.0, 1.5], &[], 1.0, 1),
            (&[0.1, 2.0, 1.5], &[1], 1.5, 2),    // 2.0 / 1.5 = 1.33 < 1.5
            (&[-1.0, -0.5, -0.6], &[1], 1.5, 2), // -0.5 * 1.5 = -0.75 < -0.6
            (&[3.0, 3.0], &[], 1.0, 0),          // ties go to the first
        ];
        for (logits, history, penalty, expected) in cases {
            let mut s = TokenSampler::new(SamplingParams { repeat_penalty: *penalty, ..greedy() });
            assert_eq!(s.sample(logits, history), Some(*expected), "{logits:?} {history:?}");
        }
        assert_eq!(TokenSampler::new(greedy()).sample(&[], &[]), None);
    }

    #[test]
    fn greedy_with_a_penalty_agrees_with_penalising_every_token() {
        // The reference: every token's logit penalised if it is among the recent ones.
        let reference = |logits: &[f32], recent: &[i32], penalty: f32| {
            let value = |t: usize| {
                let l = logits[t];
                match recent.contains(&(t as i32)) {
                    true if l > 0.0 => l / penalty,
                    true => l * penalty,
                    false => l,
                }
            };
            (0..logits.len()).fold(0, |best, t| if value(t) > value(best) { t } else { best }) as i32
        };
        let mut rng = 5u64;
        for n in [1, 7, 8, 9, 100, 49_157] {
            // Few distinct values, so ties and repeats are common.
            let logits: Vec<f32> = (0..n).map(|_| (crate::util::splitmix64(&mut rng) % 13) as f32 - 6.0).collect();
            let history: Vec<i32> = (0..80).map(|_| (crate::util::splitmix64(&mut rng) % n as u64) as i32).collect();
            for (penalty, last_n) in [(1.0, 64), (1.3, 64), (1.3, 0), (0.7, 8), (2.0, 200)] {
                let params = SamplingParams { repeat_penalty: penalty, repeat_last_n: last_n, ..greedy() };
                let recent = &history[history.len().saturating_sub(last_n)..];
                let got = TokenSampler::new(params).sample(&logits, &history);
                assert_eq!(got, Some(reference(&logits, recent, penalty)), "n {n}, penalty {penalty}, last {last_n}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, 1.0, f32::NAN, 1.0]), 1);
    }

    #[test]
    fn a_penalised_token_is_drawn_less_often() {
        // Two equal logits; the one just generated, penalised hard, is drawn far less often.
        let params =
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repeat_penalty: 4.0, repeat_last_n: 4, seed: 3 };
        let mut s = TokenSampler::new(params);
        let draws: Vec<i32> = (0..400).map(|_| s.sample(&[2.0, 2.0], &[0, 0]).unwrap()).collect();
        let zeros = draws.iter().filter(|&&t| t == 0).count();
        // P(0) = e^0.5 / (e^0.5 + e^2) = 0.18.
        assert!((40..110).contains(&zeros), "{zeros} of 400 draws were the penalised token");
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params =
            SamplingParams { temperature: 1.0, top_k: 3, top_p: 1.0, repeat_penalty: 1.0, repeat_last_n: 0, seed: 7 };
        let draw = |params: &SamplingParams| {
            let mut s = TokenSampler::new(params.clone());
            (0..200).map(|_| s.sample(&logits, &[]).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params), "the same seed gives the same draws");
        assert_ne!(a, draw(&SamplingParams { seed: 8, ..params.clone() }));
        let mut top3: Vec<i32> = (0..50).collect();
        top3.sort_by(|x, y| logits[*y as usize].total_cmp(&logits[*x as usize]));
        top3.truncate(3);
        assert!(a.iter().all(|t| top3.contains(t)), "only the top 3 are drawn");
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 1, "temperature 1 over three close logits draws more than one token");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // Probabilities after softmax at T=1: one token dominates (~0.97), so top_p 0.9 keeps it alone.
        let logits = [10.0, 6.0, 5.0, 4.0];
        let params =
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, repeat_penalty: 1.0, repeat_last_n: 0, seed: 1 };
        let mut s = TokenSampler::new(params);
        assert!((0..100).all(|_| s.sample(&logits, &[]) == Some(0)));
    }
}

//! Scene-change gating: caption when the scene changed, or when a maximum interval has passed;
//! never more often than a minimum interval. An unchanged scene costs an encoder run, no LLM run.
//!
//! The scene signature is the encoder's patch grid average-pooled as the projector pools it, so a
//! change in *where* things are counts, not only in what the whole image looks like. The distance
//! is the cosine distance between two signatures (0: identical, 2: opposite).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::util::cosine_distance;

/// Gating settings (`[scene]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Cosine distance between scene signatures above which the scene counts as changed.
    pub change_threshold: f32,
    /// Never caption more often than this (seconds).
    pub min_interval_s: f64,
    /// Caption at least this often, changed or not (seconds).
    pub max_interval_s: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig { change_threshold: 0.05, min_interval_s: 2.0, max_interval_s: 300.0 }
    }
}

/// What to do with a frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Caption it: the first frame.
    First,
    /// Caption it: the scene changed by this distance.
    Changed(f32),
    /// Caption it: the maximum interval passed.
    Refresh,
    /// Skip it: the scene did not change (distance given).
    Unchanged(f32),
    /// Skip it for now: it changed, but the minimum interval has not passed.
    TooSoon(f32),
}

impl Decision {
    /// True when the frame should be captioned.
    pub fn caption(&self) -> bool {
        matches!(self, Decision::First | Decision::Changed(_) | Decision::Refresh)
    }
}

/// The gate: remembers the signature and time of the last captioned scene.
#[derive(Debug, Default)]
pub struct SceneGate {
    last: Option<(Vec<f32>, Instant)>,
}

impl SceneGate {
    /// A gate that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides about a frame with scene signature `signature` seen at `now`. Call
    /// [`SceneGate::captioned`] once the caption is made.
    pub fn decide(&self, config: &GateConfig, signature: &[f32], now: Instant) -> Decision {
        let Some((last, at)) = &self.last else { return Decision::First };
        let distance = cosine_distance(last, signature);
        let since = now.saturating_duration_since(*at);
        if since < Duration::from_secs_f64(config.min_interval_s) {
            return if distance > config.change_threshold {
                Decision::TooSoon(distance)
            } else {
                Decision::Unchanged(distance)
            };
        }
        if distance > config.change_threshold {
            Decision::Changed(distance)
        } else if since >= Duration::from_secs_f64(config.max_interval_s) {
            Decision::Refresh
        } else {
            Decision::Unchanged(distance)
        }
    }

    /// Records that the scene with `signature` was captioned at `now`.
    pub fn captioned(&mut self, signature: &[f32], now: Instant) {
        match &mut self.last {
            Some((last, at)) => {
                last.clear();
                last.extend_from_slice(signature);
                *at = now;
            }
            None => self.last = Some((signature.to_vec(), now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_distance_cases() {
        let cases: &[(&[f32], &[f32], f32)] = &[
            (&[1.0, 0.0], &[1.0, 0.0], 0.0),
            (&[1.0, 0.0], &[0.0, 1.0], 1.0),
            (&[1.0, 0.0], &[-1.0, 0.0], 2.0),
            (&[1.0, 2.0], &[2.0, 4.0], 0.0),
            (&[0.0, 0.0], &[1.0, 0.0], 1.0),
        ];
        for (a, b, expected) in cases {
            assert!((cosine_distance(a, b) - expected).abs() < 1e-6, "{a:?} {b:?}");
        }
    }

    #[test]
    fn gate_decisions_over_time() {
        let config = GateConfig { change_threshold: 0.1, min_interval_s: 2.0, max_interval_s: 10.0 };
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        let mut gate = SceneGate::new();
        // (signature, time, expected decision kind, caption it?)
        let steps: &[(&[f32], f64, &str)] = &[
            (&a, 0.0, "first"),
            (&a, 1.0, "unchanged"),
            (&b, 1.5, "too_soon"),
            (&b, 2.5, "changed"),
            (&b, 5.0, "unchanged"),
            (&b, 12.6, "refresh"),
            (&a, 13.0, "too_soon"),
        ];
        for (signature, t, kind) in steps {
            let d = gate.decide(&config, signature, at(*t));
            let got = match d {
                Decision::First => "first",
                Decision::Changed(_) => "changed",
                Decision::Refresh => "refresh",
                Decision::Unchanged(_) => "unchanged",
                Decision::TooSoon(_) => "too_soon",
            };
            assert_eq!(got, *kind, "at {t} s");
            if d.caption() {
                gate.captioned(signature, at(*t));
            }
        }
    }
}

//! Diffusion samplers for distilled (few-step) latent diffusion: the noise schedule, the Euler
//! sampler with "trailing" timesteps that SD-Turbo ships with (one step by default), and the LCM
//! sampler (two to eight steps). Pure math on flat `f32` slices, checked against fixtures that
//! diffusers' own schedulers computed (`models/generator/sampler.json`).
//!
//! Both follow diffusers' definitions for ε-prediction models:
//! - Euler: σ_t = √((1 − ᾱ_t)/ᾱ_t); the model sees x/√(σ²+1); x₀ = x − σ·ε; x ← x + (σ_next − σ)·ε.
//! - LCM: x₀ = (x − √(1−ᾱ_t)·ε)/√ᾱ_t; denoised = c_out·x₀ + c_skip·x; then, except after the last
//!   step, x ← √ᾱ_prev·denoised + √(1−ᾱ_prev)·noise.

use crate::manifest::{NoiseSchedule, SamplerKind};

impl NoiseSchedule {
    /// ᾱ_t for every training timestep ("scaled_linear": β linear in √β).
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let (a, b) = (self.beta_start.sqrt(), self.beta_end.sqrt());
        let mut prod = 1.0;
        (0..n)
            .map(|i| {
                let s = a + (b - a) * i as f64 / (n - 1).max(1) as f64;
                prod *= 1.0 - s * s;
                prod
            })
            .collect()
    }
}

/// LCM's fixed settings (diffusers' defaults for LCM-distilled SD models).
const LCM_ORIGINAL_STEPS: usize = 50;
const LCM_TIMESTEP_SCALING: f64 = 10.0;
const LCM_SIGMA_DATA: f64 = 0.5;

/// A sampler set up for a number of steps.
#[derive(Debug, Clone)]
pub struct DiffusionSampler {
    kind: SamplerKind,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    /// Euler: σ per step plus a final 0.
    sigmas: Vec<f64>,
}

/// The result of one update.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOut {
    /// The next sample.
    pub prev: Vec<f32>,
    /// The model's estimate of the clean latent.
    pub denoised: Vec<f32>,
}

impl DiffusionSampler {
    /// Sets up `steps` steps (1 or more; at most the training timesteps, LCM at most 50).
    pub fn new(kind: SamplerKind, schedule: &NoiseSchedule, steps: usize) -> DiffusionSampler {
        let n = schedule.num_train_timesteps;
        let alphas_cumprod = schedule.alphas_cumprod();
        let steps = steps.max(1);
        let timesteps: Vec<usize> = match kind {
            // diffusers "trailing": round(arange(n, 0, -n/steps)) - 1.
            SamplerKind::Euler => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| ((n as f64 - i as f64 * ratio).round() as usize).saturating_sub(1).min(n - 1))
                    .collect()
            }
            // Every (n / 50)-th timestep, newest first, `steps` of them spread evenly.
            SamplerKind::Lcm => {
                let k = n / LCM_ORIGINAL_STEPS;
                let origin: Vec<usize> = (1..=LCM_ORIGINAL_STEPS).rev().map(|i| i * k - 1).collect();
                let steps = steps.min(origin.len());
                (0..steps).map(|i| origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize]).collect()
            }
        };
        let mut sigmas: Vec<f64> =
            timesteps.iter().map(|&t| ((1.0 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt()).collect();
        sigmas.push(0.0);
        DiffusionSampler { kind, alphas_cumprod, timesteps, sigmas }
    }

    /// The timesteps, one per step, in order.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Euler's σ per step, then 0 (LCM computes them too, for reference).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// What the initial Gaussian noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SamplerKind::Euler => self.sigmas[0],
            SamplerKind::Lcm => 1.0,
        }
    }

    /// The UNet's input at step `i` (Euler scales by 1/√(σ²+1); LCM feeds the sample as is).
    pub fn scale_input(&self, sample: &[f32], i: usize, out: &mut Vec<f32>) {
        out.clear();
        let scale = match self.kind {
            SamplerKind::Euler => 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt(),
            SamplerKind::Lcm => 1.0,
        };
        out.extend(sample.iter().map(|&x| (x as f64 * scale) as f32));
    }

    /// One update at step `i` from the UNet's ε prediction. `noise` (same length as `sample`) is
    /// used by LCM between steps; Euler ignores it.
    pub fn step(&self, eps: &[f32], i: usize, sample: &[f32], noise: &[f32]) -> StepOut {
        match self.kind {
            SamplerKind::Euler => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let denoised: Vec<f32> =
                    sample.iter().zip(eps).map(|(&x, &e)| (x as f64 - sigma * e as f64) as f32).collect();
                let prev =
                    sample.iter().zip(eps).map(|(&x, &e)| (x as f64 + (next - sigma) * e as f64) as f32).collect();
                StepOut { prev, denoised }
            }
            SamplerKind::Lcm => {
                let t = self.timesteps[i];
                let last = i + 1 >= self.timesteps.len();
                let prev_t = if last { t } else { self.timesteps[i + 1] };
                let (a_t, a_prev) = (self.alphas_cumprod[t], self.alphas_cumprod[prev_t]);
                let scaled = t as f64 * LCM_TIMESTEP_SCALING;
                let c_skip = LCM_SIGMA_DATA * LCM_SIGMA_DATA / (scaled * scaled + LCM_SIGMA_DATA * LCM_SIGMA_DATA);
                let c_out = scaled / (scaled * scaled + LCM_SIGMA_DATA * LCM_SIGMA_DATA).sqrt();
                let denoised: Vec<f32> = sample
                    .iter()
                    .zip(eps)
                    .map(|(&x, &e)| {
                        let x0 = (x as f64 - (1.0 - a_t).sqrt() * e as f64) / a_t.sqrt();
                        (c_out * x0 + c_skip * x as f64) as f32
                    })
                    .collect();
                let prev = if last {
                    denoised.clone()
                } else {
                    denoised
                        .iter()
                        .zip(noise)
                        .map(|(&d, &z)| (a_prev.sqrt() * d as f64 + (1.0 - a_prev).sqrt() * z as f64) as f32)
                        .collect()
                };
                StepOut { prev, denoised }
            }
        }
    }
}

/// Seeded standard-normal noise (SplitMix64 + Box–Muller): the same seed gives the same latents
/// on every machine.
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed ^ 0xD1B5_4A32_D192_ED03;
    // (0, 1]: never 0, so the logarithm is finite.
    let mut next = move || ((crate::util::splitmix64(&mut state) >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Fixtures {
        sample: Vec<f32>,
        model_output: Vec<f32>,
        euler: std::collections::HashMap<String, EulerFx>,
        lcm: std::collections::HashMap<String, LcmFx>,
    }
    #[derive(Deserialize)]
    struct EulerFx {
        timesteps: Vec<f64>,
        sigmas: Vec<f64>,
        init_noise_sigma: f64,
        scaled_input: Vec<f32>,
        prev_sample: Vec<f32>,
        denoised: Vec<f32>,
    }
    #[derive(Deserialize)]
    struct LcmFx {
        timesteps: Vec<usize>,
        init_noise_sigma: f64,
        noise: Vec<f32>,
        prev_sample: Vec<f32>,
        denoised: Vec<f32>,
    }

    fn fixtures() -> Fixtures {
        // The checkout cargo runs the test from: a build directory shared with another clone keeps
        // a test binary whose compile-time `env!` names that clone.
        let repo = std::env::var_os("CARGO_MANIFEST_DIR")
            .map_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")), std::path::PathBuf::from);
        let path = repo.join("models/generator/sampler.json");
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
            .unwrap()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs diffusers {y}");
        }
    }

    #[test]
    fn euler_trailing_matches_diffusers() {
        let fx = fixtures();
        for (steps, e) in &fx.euler {
            let s = DiffusionSampler::new(SamplerKind::Euler, &NoiseSchedule::default(), steps.parse().unwrap());
            let ts: Vec<f64> = s.timesteps().iter().map(|&t| t as f64).collect();
            assert_eq!(ts, e.timesteps, "{steps} steps");
            for (a, b) in s.sigmas().iter().zip(&e.sigmas) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b), "sigma {a} vs {b}");
            }
            assert!((s.init_noise_sigma() - e.init_noise_sigma).abs() < 1e-4);
            let mut scaled = Vec::new();
            s.scale_input(&fx.sample, 0, &mut scaled);
            close(&scaled, &e.scaled_input, 1e-5);
            let out = s.step(&fx.model_output, 0, &fx.sample, &[]);
            close(&out.prev, &e.prev_sample, 1e-5);
            close(&out.denoised, &e.denoised, 1e-5);
        }
    }

    #[test]
    fn lcm_matches_diffusers() {
        let fx = fixtures();
        for (steps, l) in &fx.lcm {
            let s = DiffusionSampler::new(SamplerKind::Lcm, &NoiseSchedule::default(), steps.parse().unwrap());
            assert_eq!(s.timesteps(), l.timesteps.as_slice(), "{steps} steps");
            assert_eq!(s.init_noise_sigma(), l.init_noise_sigma);
            let out = s.step(&fx.model_output, 0, &fx.sample, &l.noise);
            close(&out.denoised, &l.denoised, 1e-5);
            close(&out.prev, &l.prev_sample, 1e-5);
        }
    }

    #[test]
    fn noise_is_seeded_and_standard_normal() {
        let a = gaussian_noise(42, 20_001);
        assert_eq!(a, gaussian_noise(42, 20_001));
        assert_ne!(a[..16], gaussian_noise(43, 16)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean}, variance {var}");
    }
}

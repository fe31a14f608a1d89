//! The generator on demand: loaded by the first request that needs it, unloaded after an idle
//! time, so a device with shared memory holds it only while it is in use.

use std::path::PathBuf;
use std::time::Instant;

use super::generator::{Generator, GeneratorError, RenderLimits};
use super::GeneratorConfig;
use crate::manifest::{GeneratorSpec, Manifest};
use crate::onnx::OnnxRuntime;
use crate::util::ms_since;

/// The generator, loaded when first needed and unloaded after an idle time, so a device with
/// shared memory holds it only while it is in use.
pub struct OnDemand {
    runtime: OnnxRuntime,
    manifest: Manifest,
    cache_root: PathBuf,
    config: GeneratorConfig,
    loaded: Option<Generator>,
    last_used: Instant,
}

impl OnDemand {
    /// Nothing is loaded until [`OnDemand::get`].
    pub fn new(runtime: OnnxRuntime, manifest: Manifest, cache_root: PathBuf, config: GeneratorConfig) -> Self {
        OnDemand { runtime, manifest, cache_root, config, loaded: None, last_used: Instant::now() }
    }

    /// The manifest's generator section, or why there is none to use.
    pub fn spec(&self) -> Result<&GeneratorSpec, GeneratorError> {
        if !self.config.enabled {
            return Err(GeneratorError::Disabled);
        }
        self.manifest.generator.as_ref().ok_or_else(|| GeneratorError::NotConfigured(self.manifest.origin.clone()))
    }

    /// The request limits from the config.
    pub fn limits(&self) -> RenderLimits {
        self.config.limits()
    }

    /// The generator config.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// Whether the models are in memory.
    pub fn is_loaded(&self) -> bool {
        self.loaded.is_some()
    }

    /// The generator, loading it first if needed; the second value is the load time in ms when
    /// this call loaded it.
    pub fn get(&mut self) -> Result<(&mut Generator, Option<f64>), GeneratorError> {
        self.spec()?;
        self.last_used = Instant::now();
        let mut load_ms = None;
        if self.loaded.is_none() {
            if self.config.min_free_mib > 0 {
                if let Some(available_mib) = mem_available_mib() {
                    if available_mib < self.config.min_free_mib {
                        return Err(GeneratorError::Memory { available_mib, required_mib: self.config.min_free_mib });
                    }
                }
            }
            let generator = Generator::load(&self.runtime, &self.manifest, &self.cache_root)?;
            load_ms = Some(generator.load_ms());
            self.loaded = Some(generator);
        }
        Ok((self.loaded.as_mut().expect("loaded above"), load_ms))
    }

    /// Unloads the generator when it has been idle for `generator.idle_unload_s`; returns the
    /// time the unload took when it did.
    pub fn unload_if_idle(&mut self) -> Option<f64> {
        if self.loaded.is_some() && self.last_used.elapsed().as_secs_f64() >= self.config.idle_unload_s {
            let start = Instant::now();
            self.loaded = None;
            crate::ffi::release_free_memory();
            let ms = ms_since(start);
            tracing::info!(unload_ms = ms, idle_s = self.config.idle_unload_s, "generator unloaded after idling");
            return Some(ms);
        }
        None
    }
}

/// `MemAvailable` from /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib / 1024)
}

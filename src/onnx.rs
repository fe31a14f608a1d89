//! ONNX Runtime: loading the shared library, building sessions with an ordered list of execution
//! providers and a CPU fallback, checking a model's inputs and outputs against the manifest, and
//! running f32 tensors.
//!
//! This is the only module that knows the `ort` crate. The library is loaded at run time
//! (`load-dynamic`) with the `api-17` feature: any ONNX Runtime from 1.17 on loads, which covers
//! NVIDIA's JetPack 6 builds; the fetched reference library is 1.32.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::cache;
use crate::ffi;
use serde::Deserialize;

/// The oldest ONNX Runtime this build loads (the `api-NN` feature it is built with).
pub const MIN_ORT_VERSION: &str = "1.17";

/// An ONNX Runtime execution provider, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpKind {
    /// NVIDIA TensorRT.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU (always available; the implicit last resort).
    Cpu,
}

impl std::fmt::Display for EpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EpKind::Tensorrt => "tensorrt",
            EpKind::Cuda => "cuda",
            EpKind::Cpu => "cpu",
        })
    }
}

/// One entry of `onnx.execution_providers`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpConfig {
    /// Which provider.
    pub kind: EpKind,
    /// When true, failing to register this provider stops startup instead of falling back.
    #[serde(default)]
    pub required: bool,
    /// The GPU (TensorRT, CUDA).
    #[serde(default)]
    pub device_id: i32,
    /// TensorRT: build fp16 engines.
    #[serde(default)]
    pub fp16: bool,
    /// TensorRT: where built engines are cached (default: `<cache>/tensorrt`).
    pub engine_cache_dir: Option<PathBuf>,
}

/// ONNX Runtime settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnnxConfig {
    /// The `libonnxruntime.so` to load; else `ORT_DYLIB_PATH`; else the fetched cache's.
    pub library: Option<PathBuf>,
    /// Threads inside one operator (0: ONNX Runtime's default, one per core).
    pub intra_threads: usize,
    /// Providers in order of preference; the CPU is always the last resort.
    pub execution_providers: Vec<EpConfig>,
    /// Weight pre-packing (ONNX Runtime's default): weights are re-laid out once for faster
    /// matrix products, a second copy next to the original. Off saves that copy (37 MiB of peak
    /// RSS for the reference stack, for 6 % more time per caption; README, "Benchmarks").
    pub prepacking: bool,
}

impl Default for OnnxConfig {
    fn default() -> Self {
        OnnxConfig {
            library: None,
            intra_threads: 0,
            execution_providers: vec![EpConfig {
                kind: EpKind::Cpu,
                required: false,
                device_id: 0,
                fp16: false,
                engine_cache_dir: None,
            }],
            prepacking: true,
        }
    }
}

/// An error from ONNX Runtime or from a model that does not fit the manifest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OnnxError {
    /// The library file does not exist.
    #[error("ONNX Runtime library {path} (from {origin}) not found; run `make models`, or set `onnx.library` or ORT_DYLIB_PATH to a libonnxruntime.so >= {MIN_ORT_VERSION}")]
    LibraryNotFound {
        /// The path tried.
        path: PathBuf,
        /// Which setting gave the path.
        origin: &'static str,
    },
    /// The file is not a loadable ONNX Runtime library, or is too old.
    #[error(
        "ONNX Runtime library {path} (from {origin}): {message} (expected libonnxruntime.so >= {MIN_ORT_VERSION})"
    )]
    LibraryLoad {
        /// The path tried.
        path: PathBuf,
        /// Which setting gave the path.
        origin: &'static str,
        /// The loader's message.
        message: String,
    },
    /// A second, different library was requested in the same process.
    #[error("ONNX Runtime is already loaded from {loaded}; cannot also load {requested} in the same process")]
    AlreadyLoaded {
        /// The library in use.
        loaded: PathBuf,
        /// The one asked for.
        requested: PathBuf,
    },
    /// A provider marked `required` could not be registered.
    #[error("{file}: required execution provider `{ep}` is not available: {reason}")]
    RequiredEp {
        /// The model.
        file: PathBuf,
        /// The provider.
        ep: EpKind,
        /// Why registration failed.
        reason: String,
    },
    /// Creating the session failed (not an ONNX file, unsupported operators, ...).
    #[error("{file}: ONNX Runtime cannot load it as {what}: {message}")]
    Session {
        /// The model.
        file: PathBuf,
        /// What the file should be.
        what: String,
        /// ONNX Runtime's message.
        message: String,
    },
    /// The model's inputs or outputs differ from the manifest.
    #[error("{file}: {message}")]
    Signature {
        /// The model.
        file: PathBuf,
        /// The difference, with both sides named.
        message: String,
    },
    /// Running the model failed.
    #[error("{file}: inference failed: {message}")]
    Run {
        /// The model.
        file: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
}

/// The library and its environment: ONNX Runtime allows one of each per process.
struct Loaded {
    environment: ort::environment::Environment,
    library: PathBuf,
    version: String,
}

static LOADED: Mutex<Option<Arc<Loaded>>> = Mutex::new(None);

/// The loaded ONNX Runtime library with one session configuration (providers, threads).
#[derive(Clone)]
pub struct OnnxRuntime {
    loaded: Arc<Loaded>,
    config: OnnxConfig,
    /// Where TensorRT engines are cached unless an EP entry says otherwise.
    trt_cache_default: PathBuf,
}

/// Picks the library: `onnx.library` from config, else `ORT_DYLIB_PATH`, else the fetched cache's.
pub fn library_path(config: &OnnxConfig, cache_root: &Path) -> (PathBuf, &'static str) {
    if let Some(path) = &config.library {
        return (path.clone(), "config onnx.library");
    }
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|v| !v.is_empty()) {
        return (PathBuf::from(path), "ORT_DYLIB_PATH");
    }
    (cache::default_ort_library(cache_root), "the model cache")
}

impl OnnxRuntime {
    /// Loads the library named by `config` (see [`library_path`]) and creates the environment.
    pub fn init(config: &OnnxConfig, cache_root: &Path) -> Result<Self, OnnxError> {
        let (path, origin) = library_path(config, cache_root);
        if !path.is_file() {
            return Err(OnnxError::LibraryNotFound { path, origin });
        }
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        let mut slot = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = match &*slot {
            Some(loaded) if loaded.library == canonical => loaded.clone(),
            Some(loaded) => {
                return Err(OnnxError::AlreadyLoaded { loaded: loaded.library.clone(), requested: canonical })
            }
            None => {
                let load_err = |message: String| OnnxError::LibraryLoad { path: path.clone(), origin, message };
                let builder = ort::init_from(&canonical).map_err(|e| load_err(e.to_string()))?;
                let environment = builder.with_name("scenecast").build().map_err(|e| load_err(e.to_string()))?;
                let version = ffi::ort_version(&canonical).unwrap_or_else(|| "unknown".into());
                let loaded = Arc::new(Loaded { environment, library: canonical, version });
                *slot = Some(loaded.clone());
                loaded
            }
        };
        Ok(OnnxRuntime { loaded, config: config.clone(), trt_cache_default: cache_root.join("tensorrt") })
    }

    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.loaded.library
    }

    /// The library's version as it reports it.
    pub fn version(&self) -> &str {
        &self.loaded.version
    }

    /// The process's ONNX Runtime environment, for benchmarks that compare scenecast against a bare
    /// `ort` session in the same process (ONNX Runtime allows one environment per process).
    pub fn ort_environment(&self) -> &ort::environment::Environment {
        &self.loaded.environment
    }

    /// Opens `file` (described as `what` in errors) with the configured execution providers.
    ///
    /// Providers are tried in the configured order. One that fails to register is skipped with a
    /// WARN naming the reason, unless it is `required`, which fails instead. Every provider that
    /// registers is kept, so ONNX Runtime can place each node on the first one that supports it;
    /// the CPU provider is always there last.
    pub fn session(&self, file: &Path, what: &str) -> Result<OnnxSession, OnnxError> {
        if !file.is_file() {
            return Err(OnnxError::Session {
                file: file.to_owned(),
                what: what.to_owned(),
                message: "file not found".into(),
            });
        }
        let session_err =
            |message: String| OnnxError::Session { file: file.to_owned(), what: what.to_owned(), message };
        let mut builder = Session::builder(&self.loaded.environment).map_err(|e| session_err(e.to_string()))?;
        if self.config.intra_threads > 0 {
            builder = builder.with_intra_threads(self.config.intra_threads).map_err(|e| session_err(e.to_string()))?;
        }
        if !self.config.prepacking {
            builder = builder.with_prepacking(false).map_err(|e| session_err(e.to_string()))?;
        }
        let mut providers = Vec::new();
        for ep in &self.config.execution_providers {
            match self.register(ep, &mut builder) {
                Ok(()) => providers.push(ep.kind.clone()),
                Err(reason) if ep.required => {
                    return Err(OnnxError::RequiredEp { file: file.to_owned(), ep: ep.kind.clone(), reason });
                }
                Err(reason) => {
                    tracing::warn!(ep = %ep.kind, model = %file.display(), "execution provider unavailable, falling back: {reason}");
                }
            }
        }
        if !providers.contains(&EpKind::Cpu) {
            providers.push(EpKind::Cpu);
        }
        let session = builder.commit_from_file(file).map_err(|e| session_err(e.to_string()))?;
        // ONNX Runtime has parsed the file into a protobuf and copied its weights out, then freed
        // the protobuf; glibc keeps such freed memory mapped unless told. Returned now, it does
        // not stack up under the next model's load (measured: `scenecast caption` over 12 photos
        // peaks at 405 MiB instead of 440; under 1 ms a call).
        crate::ffi::release_free_memory();
        tracing::info!(model = %file.display(), ep = %providers[0], "session ready ({what}); providers {}", join(&providers));
        Ok(OnnxSession { session, file: file.to_owned(), providers })
    }

    fn register(&self, ep: &EpConfig, builder: &mut ort::session::builder::SessionBuilder) -> Result<(), String> {
        let result = match ep.kind {
            EpKind::Tensorrt => {
                let cache_dir = ep.engine_cache_dir.clone().unwrap_or_else(|| self.trt_cache_default.clone());
                ort::ep::TensorRT::default()
                    .with_device_id(ep.device_id)
                    .with_fp16(ep.fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(cache_dir.display())
                    .register(builder)
            }
            EpKind::Cuda => ort::ep::CUDA::default().with_device_id(ep.device_id).register(builder),
            // ort's CPU provider disables ONNX Runtime's memory arena unless asked: keep the arena,
            // ONNX Runtime's own default (without it every run allocates its intermediate tensors;
            // measured: no lower peak RSS, 4 % slower captions).
            EpKind::Cpu => ort::ep::CPU::default().with_arena_allocator(true).register(builder),
        };
        result.map_err(|e| e.to_string())
    }
}

fn join(eps: &[EpKind]) -> String {
    eps.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// An open model.
pub struct OnnxSession {
    session: Session,
    file: PathBuf,
    providers: Vec<EpKind>,
}

/// One input tensor for [`OnnxSession::run`]: its data in one of the element types models take.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// 32-bit integers (token ids in some exports).
    I32(&'a [i32]),
    /// 64-bit integers (token ids, timesteps).
    I64(&'a [i64]),
    /// Booleans (pixel masks).
    Bool(&'a [bool]),
}

/// The element type of a declared input or output, as far as scenecast uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    /// f32.
    F32,
    /// i32.
    I32,
    /// i64.
    I64,
    /// bool.
    Bool,
    /// Anything else (f16, strings, ...).
    Other,
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Element::F32 => "f32",
            Element::I32 => "i32",
            Element::I64 => "i64",
            Element::Bool => "bool",
            Element::Other => "another type",
        })
    }
}

/// Every outlet (input or output) as `describe` writes it, comma-separated, for error messages.
fn list(outlets: &[ort::value::Outlet]) -> String {
    outlets.iter().map(|o| describe(o.name(), o.dtype())).collect::<Vec<_>>().join(", ")
}

/// A tensor's name and shape as the model declares it (-1 for a free dimension).
fn describe(name: &str, dtype: &ValueType) -> String {
    match dtype.tensor_shape() {
        Some(shape) => format!("`{name}` {:?} {:?}", shape.iter().collect::<Vec<_>>(), dtype.tensor_type()),
        None => format!("`{name}` (not a tensor)"),
    }
}

/// True when a declared model dimension fits the manifest's: -1 in either means free.
fn dim_matches(model: i64, manifest: i64) -> bool {
    model < 0 || manifest < 0 || model == manifest
}

impl OnnxSession {
    /// The model file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The providers this session registered, preferred first; the first is the one it runs on
    /// wherever it supports the operator.
    pub fn providers(&self) -> &[EpKind] {
        &self.providers
    }

    /// The preferred provider of this session.
    pub fn ep(&self) -> &EpKind {
        &self.providers[0]
    }

    /// Checks that the model has an f32 input `input` of a shape compatible with `input_shape`,
    /// and an f32 output `output` compatible with `output_shape`.
    pub fn check_signature(
        &self,
        input: &str,
        input_shape: &[i64],
        output: &str,
        output_shape: &[i64],
    ) -> Result<(), OnnxError> {
        self.check_input(input, input_shape)?;
        self.check_outlet("output", output, output_shape, self.session.outputs())
    }

    /// Checks that the model has an f32 input `input` of a shape compatible with `shape`.
    pub fn check_input(&self, input: &str, shape: &[i64]) -> Result<(), OnnxError> {
        self.check_outlet("input", input, shape, self.session.inputs())
    }

    fn check_outlet(
        &self,
        kind: &str,
        name: &str,
        want: &[i64],
        outlets: &[ort::value::Outlet],
    ) -> Result<(), OnnxError> {
        let Some(found) = outlets.iter().find(|o| o.name() == name) else {
            return Err(OnnxError::Signature {
                file: self.file.clone(),
                message: format!(
                    "expected {kind} `{name}` with shape {want:?}; the model's {kind}s are: {}",
                    list(outlets)
                ),
            });
        };
        let shape: Vec<i64> = found.dtype().tensor_shape().map(|s| s.iter().copied().collect()).unwrap_or_default();
        let is_f32 = found.dtype().tensor_type() == Some(TensorElementType::Float32);
        if !is_f32 || shape.len() != want.len() || !shape.iter().zip(want).all(|(m, w)| dim_matches(*m, *w)) {
            return Err(OnnxError::Signature {
                file: self.file.clone(),
                message: format!(
                    "{kind} `{name}`: expected f32 {want:?} (-1 = any), the model has {}",
                    describe(name, found.dtype())
                ),
            });
        }
        Ok(())
    }

    /// The element type and rank of the input or output `name`, if the model has one.
    pub fn io_type(&self, name: &str) -> Option<(Element, usize)> {
        let outlets = self.session.inputs().iter().chain(self.session.outputs());
        outlets
            .filter(|o| o.name() == name)
            .map(|o| {
                let element = match o.dtype().tensor_type() {
                    Some(TensorElementType::Float32) => Element::F32,
                    Some(TensorElementType::Int32) => Element::I32,
                    Some(TensorElementType::Int64) => Element::I64,
                    Some(TensorElementType::Bool) => Element::Bool,
                    _ => Element::Other,
                };
                (element, o.dtype().tensor_shape().map_or(0, |s| s.len()))
            })
            .next()
    }

    /// Checks that the model has each named input and output with one of the allowed element
    /// types and the given rank; the error lists what the model has instead.
    pub fn check_io(
        &self,
        inputs: &[(&str, &[Element], usize)],
        outputs: &[(&str, &[Element], usize)],
    ) -> Result<(), OnnxError> {
        for (kind, wanted, outlets) in
            [("input", inputs, self.session.inputs()), ("output", outputs, self.session.outputs())]
        {
            for (name, types, rank) in wanted {
                let found = outlets.iter().find(|o| o.name() == *name).and_then(|_| self.io_type(name));
                let ok = found.is_some_and(|(e, r)| types.contains(&e) && r == *rank);
                if !ok {
                    let want = types.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or ");
                    return Err(OnnxError::Signature {
                        file: self.file.clone(),
                        message: format!(
                            "expected {kind} `{name}` of {want} with rank {rank}; the model's {kind}s are: {}",
                            list(outlets)
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs the model on named inputs of any supported element type and copies the named f32
    /// output into `out` (reused across calls). Returns the output's shape.
    pub fn run(
        &mut self,
        inputs: &[(&str, &[usize], Input<'_>)],
        output: &str,
        out: &mut Vec<f32>,
    ) -> Result<Vec<usize>, OnnxError> {
        let file = &self.file;
        let run_err = |message: String| OnnxError::Run { file: file.clone(), message };
        let mut values: Vec<(&str, ort::session::SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, shape, data) in inputs {
            let shape = shape.to_vec();
            let value = match *data {
                Input::F32(d) => TensorRef::from_array_view((shape, d)).map(Into::into),
                Input::I32(d) => TensorRef::from_array_view((shape, d)).map(Into::into),
                Input::I64(d) => TensorRef::from_array_view((shape, d)).map(Into::into),
                Input::Bool(d) => TensorRef::from_array_view((shape, d)).map(Into::into),
            }
            .map_err(|e| run_err(format!("input `{name}`: {e}")))?;
            values.push((name, value));
        }
        let outputs = self.session.run(values).map_err(|e| run_err(e.to_string()))?;
        let value = outputs.get(output).ok_or_else(|| run_err(format!("the model produced no output `{output}`")))?;
        let (out_shape, data) = value.try_extract_tensor::<f32>().map_err(|e| run_err(e.to_string()))?;
        out.clear();
        out.extend_from_slice(data);
        Ok(out_shape.iter().map(|d| *d as usize).collect())
    }

    /// Runs the model on one f32 input and copies the named f32 output into `out`, which is
    /// reused across calls. Returns the output's shape.
    pub fn run_f32(
        &mut self,
        input: &str,
        data: &[f32],
        shape: &[usize],
        output: &str,
        out: &mut Vec<f32>,
    ) -> Result<Vec<usize>, OnnxError> {
        let file = &self.file;
        let run_err = |message: String| OnnxError::Run { file: file.clone(), message };
        let tensor = TensorRef::from_array_view((shape.to_vec(), data)).map_err(|e| run_err(e.to_string()))?;
        let outputs = self.session.run(ort::inputs![input => tensor]).map_err(|e| run_err(e.to_string()))?;
        let value = outputs.get(output).ok_or_else(|| run_err(format!("the model produced no output `{output}`")))?;
        let (out_shape, values) = value.try_extract_tensor::<f32>().map_err(|e| run_err(e.to_string()))?;
        out.clear();
        out.extend_from_slice(values);
        Ok(out_shape.iter().map(|d| *d as usize).collect())
    }
}

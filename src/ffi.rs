//! The one place with `unsafe`: thin, checked wrappers over llama.cpp's C API where the safe
//! `llama-cpp-2` crate has no equivalent, ONNX Runtime's version probe (`OrtGetApiBase`) and
//! glibc's `malloc_trim`. The crate root denies `unsafe_code`; this module alone allows it.
//!
//! Invariants, for every function here:
//! - A wrapper owns its C object and frees it exactly once, in `Drop`; the raw pointer never
//!   leaves this module.
//! - Every C getter is called only after its preconditions are checked on the Rust side: key and
//!   tensor indices come from llama.cpp's own lookups and are range-checked, and a typed getter is
//!   called only after `gguf_get_kv_type` confirmed the type (llama.cpp aborts the process on a
//!   type mismatch instead of returning an error).
//! - Strings returned by llama.cpp are copied (or borrowed for no longer than `&self`), never kept
//!   past the lifetime of the object that owns them.
//! - A C object that another one points into is kept alive by an `Arc` in the one that points:
//!   a context holds its model and its adapter, an adapter holds its model.
//! - A context's batches are allocated once, with `n_batch` entries, and reused: a decode writes
//!   every entry it declares (`n_tokens`) before llama.cpp reads them, and never more than fit.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

/// A GGUF file's metadata, read by llama.cpp's own reader (`gguf_init_from_file`, `no_alloc`:
/// tensor data is not read).
pub struct GgufFile {
    ctx: NonNull<sys::gguf_context>,
}

// SAFETY: the context is only read after construction (all methods take `&self` and call
// llama.cpp getters that do not mutate), so sharing it across threads is sound.
unsafe impl Send for GgufFile {}
unsafe impl Sync for GgufFile {}

/// A metadata value, converted to an owned Rust value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any integer type.
    Int(i64),
    /// Any float type.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// An array (only its length is kept).
    Array(usize),
}

impl GgufFile {
    /// Opens `path`; `None` when the file is missing or not a valid GGUF header.
    pub fn open(path: &Path) -> Option<Self> {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call; with
        // `ctx` null llama.cpp allocates no ggml context, and returns null on any failure.
        let ptr = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        NonNull::new(ptr).map(|ctx| GgufFile { ctx })
    }

    fn key_id(&self, key: &str) -> Option<i64> {
        let c_key = CString::new(key).ok()?;
        // SAFETY: valid context and NUL-terminated key; returns -1 when absent.
        let id = unsafe { sys::gguf_find_key(self.ctx.as_ptr(), c_key.as_ptr()) };
        (id >= 0).then_some(id)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<GgufValue> {
        let id = self.key_id(key)?;
        let ctx = self.ctx.as_ptr();
        // SAFETY: `id` was returned by gguf_find_key on this context, so it is in range; each
        // typed getter below is called only for the type gguf_get_kv_type reported.
        unsafe {
            let value = match sys::gguf_get_kv_type(ctx, id) {
                sys::GGUF_TYPE_UINT8 => GgufValue::Int(i64::from(sys::gguf_get_val_u8(ctx, id))),
                sys::GGUF_TYPE_INT8 => GgufValue::Int(i64::from(sys::gguf_get_val_i8(ctx, id))),
                sys::GGUF_TYPE_UINT16 => GgufValue::Int(i64::from(sys::gguf_get_val_u16(ctx, id))),
                sys::GGUF_TYPE_INT16 => GgufValue::Int(i64::from(sys::gguf_get_val_i16(ctx, id))),
                sys::GGUF_TYPE_UINT32 => GgufValue::Int(i64::from(sys::gguf_get_val_u32(ctx, id))),
                sys::GGUF_TYPE_INT32 => GgufValue::Int(i64::from(sys::gguf_get_val_i32(ctx, id))),
                sys::GGUF_TYPE_UINT64 => {
                    GgufValue::Int(i64::try_from(sys::gguf_get_val_u64(ctx, id)).unwrap_or(i64::MAX))
                }
                sys::GGUF_TYPE_INT64 => GgufValue::Int(sys::gguf_get_val_i64(ctx, id)),
                sys::GGUF_TYPE_FLOAT32 => GgufValue::Float(f64::from(sys::gguf_get_val_f32(ctx, id))),
                sys::GGUF_TYPE_FLOAT64 => GgufValue::Float(sys::gguf_get_val_f64(ctx, id)),
                sys::GGUF_TYPE_BOOL => GgufValue::Bool(sys::gguf_get_val_bool(ctx, id)),
                sys::GGUF_TYPE_STRING => {
                    let ptr = sys::gguf_get_val_str(ctx, id);
                    if ptr.is_null() {
                        return None;
                    }
                    GgufValue::Str(CStr::from_ptr(ptr).to_string_lossy().into_owned())
                }
                sys::GGUF_TYPE_ARRAY => GgufValue::Array(sys::gguf_get_arr_n(ctx, id)),
                _ => return None,
            };
            Some(value)
        }
    }

    /// Number of tensors the header describes.
    pub fn n_tensors(&self) -> i64 {
        // SAFETY: valid context.
        unsafe { sys::gguf_get_n_tensors(self.ctx.as_ptr()) }
    }

    /// The byte offset just past the last tensor's data: a complete file is at least this long.
    pub fn data_end(&self) -> u64 {
        let ctx = self.ctx.as_ptr();
        // SAFETY: valid context; tensor ids are in 0..n_tensors.
        unsafe {
            let base = sys::gguf_get_data_offset(ctx) as u64;
            (0..self.n_tensors())
                .map(|id| {
                    base + sys::gguf_get_tensor_offset(ctx, id) as u64 + sys::gguf_get_tensor_size(ctx, id) as u64
                })
                .max()
                .unwrap_or(base)
        }
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: the context came from gguf_init_from_file and is freed only here.
        unsafe { sys::gguf_free(self.ctx.as_ptr()) }
    }
}

/// The version string of an ONNX Runtime library (`OrtGetApiBase()->GetVersionString()`), or
/// `None` when the file does not load or exports no `OrtGetApiBase`.
///
/// The library is opened a second time by name; the dynamic loader returns the same handle when
/// `ort` has already loaded it, so this costs nothing and initialises nothing.
pub fn ort_version(path: &Path) -> Option<String> {
    /// The first two members of ONNX Runtime's `OrtApiBase`, stable since 1.0.
    #[repr(C)]
    struct OrtApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: loading a shared library runs its initialisers; the path is the ONNX Runtime
    // library the caller is about to use (or already uses), whose initialisers are benign.
    let lib = unsafe { libloading::Library::new(path) }.ok()?;
    // SAFETY: the symbol's type is `const OrtApiBase* ORT_API_CALL OrtGetApiBase(void)` in
    // onnxruntime_c_api.h; the returned struct is static in the library, which outlives its use
    // here, and the version string is a static C string that we copy before `lib` drops.
    unsafe {
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> =
            lib.get(b"OrtGetApiBase\0").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).get_version_string)();
        (!version.is_null()).then(|| CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

impl GgufFile {
    /// Whether the file holds a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        let Ok(c_name) = CString::new(name) else { return false };
        // SAFETY: valid context and NUL-terminated name.
        unsafe { sys::gguf_find_tensor(self.ctx.as_ptr(), c_name.as_ptr()) >= 0 }
    }

    /// A 2-D tensor's `(type, file offset of its data, rows, bytes per row)` for rows of
    /// `row_len` values, from this header; `None` when it is absent or its size is not a whole
    /// number of such rows.
    fn tensor_layout(&self, name: &str, row_len: usize) -> Option<(sys::ggml_type, u64, usize, usize)> {
        let c_name = CString::new(name).ok()?;
        let ctx = self.ctx.as_ptr();
        // SAFETY: valid context and NUL-terminated name; the id is checked before it is used.
        unsafe {
            let id = sys::gguf_find_tensor(ctx, c_name.as_ptr());
            if id < 0 {
                return None;
            }
            let ty = sys::gguf_get_tensor_type(ctx, id);
            let n_bytes = sys::gguf_get_tensor_size(ctx, id);
            let offset = sys::gguf_get_data_offset(ctx) + sys::gguf_get_tensor_offset(ctx, id);
            let row_bytes = sys::ggml_row_size(ty, row_len as i64);
            if row_bytes == 0 || !n_bytes.is_multiple_of(row_bytes) {
                return None;
            }
            Some((ty, offset as u64, n_bytes / row_bytes, row_bytes))
        }
    }

    /// The float values of some rows (of `row_len` values: the tensor's first dimension) of a
    /// tensor, in the order of `rows`, read from `path` at the offsets this header gives (only
    /// those rows) and dequantised with ggml's own `to_float` for its type. The error says what is
    /// wrong: the tensor is absent or not a whole number of rows, a row is out of range, the type
    /// has no converter, or the file cannot be read.
    pub fn tensor_rows_f32(&self, path: &Path, name: &str, row_len: usize, rows: &[usize]) -> Result<Vec<f32>, String> {
        use std::io::{Read, Seek, SeekFrom};
        let (ty, offset, n_rows, row_bytes) = self
            .tensor_layout(name, row_len)
            .ok_or_else(|| format!("is missing, or its size is not a whole number of rows of {row_len} values"))?;
        if let Some(row) = rows.iter().find(|r| **r >= n_rows) {
            return Err(format!("has {n_rows} rows; row {row} was asked for"));
        }
        // SAFETY: the type traits are static in ggml (a table indexed by a type the header gave).
        let to_float = unsafe { (*sys::ggml_get_type_traits(ty)).to_float }
            .ok_or_else(|| format!("is of ggml type {ty}, which ggml cannot convert to f32"))?;
        let unreadable = |e: std::io::Error| format!("cannot be read: {e}");
        let mut file = std::fs::File::open(path).map_err(unreadable)?;
        let mut raw = vec![0u8; row_bytes];
        let mut out = vec![0f32; rows.len() * row_len];
        for (row, dst) in rows.iter().zip(out.chunks_exact_mut(row_len)) {
            file.seek(SeekFrom::Start(offset + (row * row_bytes) as u64)).map_err(unreadable)?;
            file.read_exact(&mut raw).map_err(unreadable)?;
            // SAFETY: `to_float` reads exactly `row_size(ty, row_len)` = `row_bytes` bytes from
            // `raw` (its length) and writes `row_len` floats to `dst` (its length).
            unsafe { to_float(raw.as_ptr().cast(), dst.as_mut_ptr(), row_len as i64) };
        }
        Ok(out)
    }
}

/// Routes llama.cpp's and ggml's log lines into `tracing` and remembers the last error, so that
/// a failed load can say why. Installed once by [`backend_init`].
static LAST_ERROR: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
static LAST_LEVEL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

unsafe extern "C" fn log_callback(
    level: sys::ggml_log_level,
    text: *const std::ffi::c_char,
    _user: *mut std::ffi::c_void,
) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    use std::sync::atomic::Ordering;
    let level = if level == sys::GGML_LOG_LEVEL_CONT { LAST_LEVEL.load(Ordering::Relaxed) } else { level };
    LAST_LEVEL.store(level, Ordering::Relaxed);
    let line = text.trim_end();
    match level {
        sys::GGML_LOG_LEVEL_ERROR => {
            tracing::error!(target: "llama.cpp", "{line}");
            // Keep every error line since the last take: a failed load logs its cause first
            // and a generic "failed to load model" last.
            if let Ok(mut last) = LAST_ERROR.lock() {
                if !last.is_empty() {
                    last.push_str("; ");
                }
                last.push_str(line);
            }
        }
        sys::GGML_LOG_LEVEL_WARN => tracing::warn!(target: "llama.cpp", "{line}"),
        sys::GGML_LOG_LEVEL_INFO => tracing::debug!(target: "llama.cpp", "{line}"),
        _ => tracing::trace!(target: "llama.cpp", "{line}"),
    }
}

/// Takes the error lines llama.cpp logged since the last call, joined by "; " (empty if none).
pub fn take_last_error() -> String {
    LAST_ERROR.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default()
}

/// Initialises llama.cpp's backends and its logging, once per process.
pub fn backend_init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    // SAFETY: called once; the callback is a plain function valid for the program's lifetime.
    INIT.call_once(|| unsafe {
        sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
        sys::llama_backend_init();
    });
}

/// Options for loading a model.
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    /// Layers to offload to a GPU (0: CPU only).
    pub n_gpu_layers: i32,
}

/// A loaded llama.cpp model. Immutable after loading, so it is shared (`Arc`) by contexts.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
    vocab: NonNull<sys::llama_vocab>,
}

// SAFETY: a llama_model is read-only after loading and llama.cpp documents it as shareable between
// contexts on different threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Loads a model from its GGUF files in split order (split 0, which holds the metadata,
    /// first); one path is a whole GGUF (or a split 0 whose other splits follow llama.cpp's naming).
    /// On failure returns llama.cpp's last logged error.
    pub fn load_splits(paths: &[&Path], options: ModelOptions) -> Result<Self, String> {
        backend_init();
        let c_paths = paths
            .iter()
            .map(|path| CString::new(path.as_os_str().as_encoded_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| "path contains a NUL byte".to_owned())?;
        if c_paths.is_empty() {
            return Err("no GGUF file to load".into());
        }
        let mut ptrs: Vec<*const std::ffi::c_char> = c_paths.iter().map(|p| p.as_ptr()).collect();
        let _ = take_last_error();
        // SAFETY: default params are plain data; every path is a valid C string that outlives the
        // call (`c_paths`), and `ptrs` holds exactly `ptrs.len()` of them; a null return means
        // failure, with the reason logged.
        unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = options.n_gpu_layers;
            let ptr = if ptrs.len() == 1 {
                sys::llama_model_load_from_file(ptrs[0], params)
            } else {
                sys::llama_model_load_from_splits(ptrs.as_mut_ptr(), ptrs.len(), params)
            };
            let Some(ptr) = NonNull::new(ptr) else {
                let reason = take_last_error();
                return Err(if reason.is_empty() { "llama.cpp could not load the model".into() } else { reason });
            };
            let vocab = sys::llama_model_get_vocab(ptr.as_ptr()).cast_mut();
            match NonNull::new(vocab) {
                Some(vocab) => Ok(Model { ptr, vocab }),
                None => {
                    sys::llama_model_free(ptr.as_ptr());
                    Err("the model has no vocabulary".into())
                }
            }
        }
    }

    /// Embedding width.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) as usize }
    }

    /// Parameter count.
    pub fn n_params(&self) -> u64 {
        // SAFETY: valid model.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_n_tokens(self.vocab.as_ptr()) as usize }
    }

    /// Whether `token` ends generation (end of turn, end of sequence).
    pub fn is_eog(&self, token: i32) -> bool {
        // SAFETY: valid vocab; llama.cpp range-checks the token.
        unsafe { sys::llama_vocab_is_eog(self.vocab.as_ptr(), token) }
    }

    /// Whether the vocabulary wants a BOS token in front of a fresh sequence.
    pub fn adds_bos(&self) -> bool {
        // SAFETY: valid vocab.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab.as_ptr()) }
    }

    /// Tokenizes `text`; `add_special` adds BOS where the model wants it; special tokens written
    /// in the text (`<|im_start|>`) are parsed as such.
    pub fn tokenize(&self, text: &str, add_special: bool) -> Vec<i32> {
        let len = i32::try_from(text.len()).unwrap_or(i32::MAX);
        let mut tokens = vec![0i32; text.len() + 2];
        // SAFETY: `text` is valid for `len` bytes; `tokens` has room for the count passed. A
        // negative result is the needed size; the second call has exactly that room.
        unsafe {
            let mut n = sys::llama_tokenize(
                self.vocab.as_ptr(),
                text.as_ptr().cast(),
                len,
                tokens.as_mut_ptr(),
                tokens.len() as i32,
                add_special,
                true,
            );
            if n < 0 {
                tokens.resize(n.unsigned_abs() as usize, 0);
                n = sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr().cast(),
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len() as i32,
                    add_special,
                    true,
                );
            }
            tokens.truncate(n.max(0) as usize);
        }
        tokens
    }

    /// The bytes a token stands for (special tokens rendered as text).
    pub fn token_bytes(&self, token: i32) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        // SAFETY: `buf` has the room passed; a negative result is the needed size.
        unsafe {
            let mut n = sys::llama_token_to_piece(
                self.vocab.as_ptr(),
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                true,
            );
            if n < 0 {
                buf.resize(n.unsigned_abs() as usize, 0);
                n = sys::llama_token_to_piece(
                    self.vocab.as_ptr(),
                    token,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    true,
                );
            }
            buf.truncate(n.max(0) as usize);
        }
        buf
    }

    /// The GGUF's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model; the returned string is owned by the model and copied at once.
        unsafe {
            let ptr = sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null());
            (!ptr.is_null()).then(|| CStr::from_ptr(ptr).to_string_lossy().into_owned())
        }
    }

    /// Renders `messages` (role, content) with `template` (a Jinja template string of a kind
    /// llama.cpp recognises, or a built-in name such as `chatml`), adding the assistant prefix.
    pub fn apply_chat_template(template: &str, messages: &[(&str, &str)]) -> Option<String> {
        let template = CString::new(template).ok()?;
        let owned: Vec<(CString, CString)> = messages
            .iter()
            .map(|(r, c)| Some((CString::new(*r).ok()?, CString::new(*c).ok()?)))
            .collect::<Option<_>>()?;
        let chat: Vec<sys::llama_chat_message> =
            owned.iter().map(|(r, c)| sys::llama_chat_message { role: r.as_ptr(), content: c.as_ptr() }).collect();
        let mut buf = vec![0u8; 4096];
        // SAFETY: all strings live in `owned`/`template` for the call; `buf` has the room passed;
        // a result larger than the room is the needed size, and the second call has it.
        unsafe {
            let mut n = sys::llama_chat_apply_template(
                template.as_ptr(),
                chat.as_ptr(),
                chat.len(),
                true,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
            );
            if n < 0 {
                return None;
            }
            if n as usize > buf.len() {
                buf.resize(n as usize, 0);
                n = sys::llama_chat_apply_template(
                    template.as_ptr(),
                    chat.as_ptr(),
                    chat.len(),
                    true,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                );
            }
            buf.truncate(n.max(0) as usize);
        }
        String::from_utf8(buf).ok()
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the model came from llama_model_load_from_file; contexts hold an `Arc<Model>`,
        // so none is alive when this runs.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// Returns freed heap memory to the operating system (glibc's `malloc_trim`), so that loading or
/// unloading a model shrinks the resident set instead of leaving the pages in the allocator's free
/// lists. A no-op on other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers from us and only walks the allocator's own free lists;
    // it is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Options for a context.
#[derive(Debug, Clone, Copy)]
pub struct ContextOptions {
    /// Context length in tokens.
    pub n_ctx: u32,
    /// Most tokens decoded in one call.
    pub n_batch: u32,
    /// Most positions one decode returns outputs (logits, hidden states) for. llama.cpp sizes its
    /// compute buffer for this many (by default `n_batch`).
    pub n_outputs: u32,
    /// CPU threads.
    pub n_threads: i32,
}

/// A LoRA adapter (a GGUF of `general.type = "adapter"`) loaded for one model.
pub struct Adapter {
    ptr: NonNull<sys::llama_adapter_lora>,
    model: std::sync::Arc<Model>,
}

// SAFETY: an adapter's weights are read-only after loading, like its model's.
unsafe impl Send for Adapter {}
unsafe impl Sync for Adapter {}

impl Adapter {
    /// Loads the adapter at `path` for `model`; on failure returns llama.cpp's last logged error
    /// (a wrong architecture or tensor shapes name the base model as the likely cause).
    pub fn load(model: std::sync::Arc<Model>, path: &Path) -> Result<Self, String> {
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| "path contains a NUL byte".to_owned())?;
        let _ = take_last_error();
        // SAFETY: valid model, kept alive by the `model` field for as long as the adapter; the path
        // is a valid C string for the call; a null return means failure, with the reason logged.
        let ptr = unsafe { sys::llama_adapter_lora_init(model.ptr.as_ptr(), c_path.as_ptr()) };
        match NonNull::new(ptr) {
            Some(ptr) => Ok(Adapter { ptr, model }),
            None => {
                let reason = take_last_error();
                Err(if reason.is_empty() { "llama.cpp could not load the adapter".into() } else { reason })
            }
        }
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        // SAFETY: the adapter came from llama_adapter_lora_init and is freed once, while its model
        // is alive (the `model` field drops after this body). A context using it holds an
        // `Arc<Adapter>` and is freed first.
        unsafe { sys::llama_adapter_lora_free(self.ptr.as_ptr()) }
    }
}

/// The input of one decode call: token ids or embedding rows.
pub enum BatchInput<'a> {
    /// Token ids.
    Tokens(&'a [i32]),
    /// Row-major embeddings, `n_embd` floats per position.
    Embeddings(&'a [f32]),
}

/// A llama.cpp context (KV cache and compute buffers) on one sequence, 0.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    model: std::sync::Arc<Model>,
    n_batch: usize,
    /// Most positions one decode returns outputs for (`ContextOptions::n_outputs`).
    n_outputs: usize,
    /// The adapter the context computes with; held so that it outlives the context's use of it.
    adapter: Option<std::sync::Arc<Adapter>>,
    /// The token batch, allocated once (a decode per generated token must not allocate).
    tokens: Batch,
    /// The embedding batch, allocated on first use (image tokens).
    embeddings: Option<Batch>,
}

/// A `llama_batch` allocated once with room for `capacity` entries (token ids, or embedding rows
/// of `width` floats when `width > 0`) and one sequence id each, freed once in `Drop`.
struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    width: usize,
}

impl Batch {
    fn new(capacity: usize, width: usize) -> Self {
        // SAFETY: llama_batch_init allocates `capacity` entries of every array (a token array, or
        // `capacity * width` floats when width > 0) with room for 1 seq id each; freed in Drop.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, width as i32, 1) };
        Batch { raw, capacity, width }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_batch_init and is freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

// SAFETY: a llama_context is not tied to a thread; `&mut self` on every mutating method ensures
// one user at a time.
unsafe impl Send for Context {}

impl Context {
    /// A context on `model`.
    pub fn new(model: std::sync::Arc<Model>, options: ContextOptions) -> Result<Self, String> {
        // SAFETY: default params are plain data; the model outlives the context (held by Arc and
        // dropped after it, see Drop); a null return means failure.
        unsafe {
            let mut params = sys::llama_context_default_params();
            params.n_ctx = options.n_ctx;
            params.n_batch = options.n_batch;
            params.n_ubatch = options.n_batch;
            params.n_seq_max = 1;
            let n_outputs = options.n_outputs.clamp(1, options.n_batch);
            params.n_outputs_max = n_outputs;
            params.n_threads = options.n_threads;
            params.n_threads_batch = options.n_threads;
            // Keep the whole cache for sliding-window models, so a scene prefix can be kept
            // while later positions are dropped and rewritten.
            params.swa_full = true;
            params.no_perf = true;
            let _ = take_last_error();
            let ptr = sys::llama_init_from_model(model.ptr.as_ptr(), params);
            let ptr = NonNull::new(ptr).ok_or_else(|| {
                let reason = take_last_error();
                if reason.is_empty() {
                    "llama.cpp could not create a context".to_owned()
                } else {
                    reason
                }
            })?;
            let n_batch = options.n_batch as usize;
            Ok(Context {
                ptr,
                model,
                n_batch,
                n_outputs: n_outputs as usize,
                adapter: None,
                tokens: Batch::new(n_batch, 0),
                embeddings: None,
            })
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Computes from now on with `adapter` at `scale` (1.0: as trained). Call before decoding: what
    /// is already in the cache was computed without it.
    pub fn set_adapter(&mut self, adapter: std::sync::Arc<Adapter>, scale: f32) -> Result<(), String> {
        if !std::sync::Arc::ptr_eq(&adapter.model, &self.model) {
            return Err("the adapter was loaded for another model".into());
        }
        let mut ptr = adapter.ptr.as_ptr();
        let mut scale = scale;
        // SAFETY: valid context; the adapter belongs to this context's model (checked above) and
        // is kept alive in `self.adapter` for as long as the context may use it; llama.cpp copies
        // the one pointer and scale out of the arrays during the call.
        let rc = unsafe { sys::llama_set_adapters_lora(self.ptr.as_ptr(), &mut ptr, 1, &mut scale) };
        if rc != 0 {
            return Err(format!("llama.cpp refused the adapter ({rc})"));
        }
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Turns the adapter given to [`Context::set_adapter`] off (`false`, the base model alone) or
    /// back on at scale 1.0 (`true`) for what is decoded from now on; what is already in the
    /// cache stays as it was computed. Without an adapter, turning it off is a no-op.
    pub fn enable_adapter(&mut self, on: bool) -> Result<(), String> {
        match (&self.adapter, on) {
            (Some(adapter), true) => self.set_adapter(adapter.clone(), 1.0),
            (None, true) => Err("no adapter was set on this context".into()),
            (_, false) => {
                // SAFETY: valid context; zero adapters with null arrays is the documented way to
                // remove all adapters (llama.cpp asserts n_adapters == 0 for null arrays).
                let rc = unsafe {
                    sys::llama_set_adapters_lora(self.ptr.as_ptr(), std::ptr::null_mut(), 0, std::ptr::null_mut())
                };
                if rc != 0 {
                    return Err(format!("llama.cpp refused to remove the adapter ({rc})"));
                }
                Ok(())
            }
        }
    }

    /// Most positions one decode returns outputs for (`ContextOptions::n_outputs`, at most
    /// `n_batch`).
    pub fn n_outputs(&self) -> usize {
        self.n_outputs
    }

    /// Context length.
    pub fn n_ctx(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) as usize }
    }

    /// Decodes `input` at positions `pos0..` of sequence 0, in chunks of at most `n_batch`;
    /// logits are computed for the last position only. Returns llama.cpp's status on failure.
    pub fn decode(&mut self, input: BatchInput<'_>, pos0: usize) -> Result<(), i32> {
        self.decode_outputs(input, pos0, 1)
    }

    /// Like [`Context::decode`], with outputs (logits, or hidden states in embeddings mode) for
    /// the last `n_outputs` positions, which must lie in the last chunk of `n_batch`.
    fn decode_outputs(&mut self, input: BatchInput<'_>, pos0: usize, n_outputs: usize) -> Result<(), i32> {
        let n_embd = self.model.n_embd();
        let n_total = match input {
            BatchInput::Tokens(tokens) => tokens.len(),
            BatchInput::Embeddings(embd) if n_embd > 0 && embd.len() % n_embd == 0 => embd.len() / n_embd,
            // Rows of another width cannot be decoded; the caller checks and names the widths.
            BatchInput::Embeddings(_) => return Err(-1),
        };
        let batch = match input {
            BatchInput::Tokens(_) => &mut self.tokens,
            BatchInput::Embeddings(_) => self.embeddings.get_or_insert_with(|| Batch::new(self.n_batch, n_embd)),
        };
        debug_assert!(batch.capacity == self.n_batch && (batch.width == 0) == matches!(input, BatchInput::Tokens(_)));
        let mut start = 0;
        while start < n_total {
            let n = (n_total - start).min(batch.capacity);
            let is_last_chunk = start + n == n_total;
            // SAFETY: the batch has room for `capacity >= n` entries (and rows of `width = n_embd`
            // floats for embeddings, checked above: the embedding batch is made with this model's
            // n_embd); we write exactly `n` entries and set n_tokens = n before decoding. llama.cpp
            // reads the batch during the call only.
            let status = unsafe {
                let raw = &mut batch.raw;
                for i in 0..n {
                    match input {
                        BatchInput::Tokens(tokens) => *raw.token.add(i) = tokens[start + i],
                        BatchInput::Embeddings(embd) => {
                            let row = &embd[(start + i) * n_embd..(start + i + 1) * n_embd];
                            std::ptr::copy_nonoverlapping(row.as_ptr(), raw.embd.add(i * n_embd), n_embd);
                        }
                    }
                    *raw.pos.add(i) = (pos0 + start + i) as i32;
                    *raw.n_seq_id.add(i) = 1;
                    *(*raw.seq_id.add(i)).add(0) = 0;
                    *raw.logits.add(i) = i8::from(is_last_chunk && i + n_outputs >= n);
                }
                raw.n_tokens = n as i32;
                sys::llama_decode(self.ptr.as_ptr(), *raw)
            };
            if status != 0 {
                return Err(status);
            }
            start += n;
        }
        Ok(())
    }

    /// Decodes `tokens` at positions `pos0..` and returns the final hidden states (after the
    /// output norm, `n_embd` floats per token) of all of them, row-major. At most the context's
    /// `n_outputs` tokens.
    pub fn hidden_states(&mut self, tokens: &[i32], pos0: usize) -> Result<Vec<f32>, i32> {
        let n_embd = self.model.n_embd();
        if tokens.is_empty() || tokens.len() > self.n_outputs {
            return Err(-1);
        }
        // SAFETY: valid context; embeddings mode only changes what the next decode outputs.
        unsafe { sys::llama_set_embeddings(self.ptr.as_ptr(), true) };
        let result = self.decode_outputs(BatchInput::Tokens(tokens), pos0, tokens.len()).and_then(|()| {
            let mut out = Vec::with_capacity(tokens.len() * n_embd);
            for i in 0..tokens.len() {
                // SAFETY: after a successful decode with outputs requested for every position of
                // this batch and embeddings on (no pooling for a causal LM), row `i` of the batch
                // is `n_embd` floats, valid until the next decode; copied out at once.
                let row = unsafe { sys::llama_get_embeddings_ith(self.ptr.as_ptr(), i as i32) };
                if row.is_null() {
                    return Err(-2);
                }
                out.extend_from_slice(unsafe { std::slice::from_raw_parts(row, n_embd) });
            }
            Ok(out)
        });
        // SAFETY: as above; back to logits for generation.
        unsafe { sys::llama_set_embeddings(self.ptr.as_ptr(), false) };
        result
    }

    /// The logits of the last decoded position (length `n_vocab`).
    pub fn last_logits(&mut self) -> &[f32] {
        let n_vocab = self.model.n_vocab();
        // SAFETY: after a successful decode with the last position's logits requested, index -1
        // is that position's row of `n_vocab` floats, valid until the next decode (`&mut self`
        // borrow prevents one while the slice lives).
        unsafe {
            let ptr = sys::llama_get_logits_ith(self.ptr.as_ptr(), -1);
            if ptr.is_null() {
                return &[];
            }
            std::slice::from_raw_parts(ptr, n_vocab)
        }
    }

    /// Drops positions `from..` of sequence 0, keeping `0..from` (the scene prefix).
    pub fn truncate(&mut self, from: usize) -> bool {
        // SAFETY: valid context; its memory is owned by it.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_rm(mem, 0, from as i32, -1)
        }
    }

    /// Sequence 0's cache as llama.cpp serialises it (each cell's position, keys and values), to
    /// be put into a context on a model of the same shape with [`Context::set_state`].
    pub fn state(&mut self) -> Result<Vec<u8>, String> {
        // SAFETY: valid context; the buffer is `size` bytes, the size llama.cpp asked for, and
        // llama.cpp writes at most that many (it returns how many it wrote).
        unsafe {
            let size = sys::llama_state_seq_get_size(self.ptr.as_ptr(), 0);
            let mut state = vec![0u8; size];
            let written = sys::llama_state_seq_get_data(self.ptr.as_ptr(), state.as_mut_ptr(), size, 0);
            if written == 0 || written > size {
                return Err(format!("llama.cpp wrote {written} bytes of a {size}-byte sequence state"));
            }
            state.truncate(written);
            Ok(state)
        }
    }

    /// Replaces sequence 0's cache with `state` (from [`Context::state`]); llama.cpp checks that
    /// its layers and widths are this model's. The context has no logits until the next decode.
    pub fn set_state(&mut self, state: &[u8]) -> Result<(), String> {
        let _ = take_last_error();
        // SAFETY: valid context; llama.cpp reads at most `state.len()` bytes of the slice and
        // returns 0 when they are not a state of this context's shape.
        let read = unsafe { sys::llama_state_seq_set_data(self.ptr.as_ptr(), state.as_ptr(), state.len(), 0) };
        if read == 0 {
            let reason = take_last_error();
            return Err(if reason.is_empty() { "llama.cpp refused the sequence state".into() } else { reason });
        }
        Ok(())
    }

    /// Empties the cache.
    pub fn clear(&mut self) {
        // SAFETY: valid context; `true` also clears the data buffers.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context came from llama_init_from_model and is freed once, before its
        // `Arc<Model>` and `Arc<Adapter>` fields are dropped (fields drop after this body).
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

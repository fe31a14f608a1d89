//! The one place with `unsafe`: thin, checked wrappers over llama.cpp's C API where the safe
//! `llama-cpp-2` crate has no equivalent.
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
                sys::GGUF_TYPE_UINT64 => GgufValue::Int(i64::try_from(sys::gguf_get_val_u64(ctx, id)).unwrap_or(i64::MAX)),
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
                .map(|id| base + sys::gguf_get_tensor_offset(ctx, id) as u64 + sys::gguf_get_tensor_size(ctx, id) as u64)
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
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> = lib.get(b"OrtGetApiBase\0").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).get_version_string)();
        (!version.is_null()).then(|| CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

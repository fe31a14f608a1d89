//! The model cache: where fetched model parts live and how a file is checked against its
//! recorded size and sha256.
//!
//! The cache is filled by `models/fetch.py` (`make models`); this module only reads it. Both
//! sides share one sidecar format: next to each verified file `F` lies `F.verified`, a JSON record
//! of size, mtime and digest, so that a file is hashed once and not on every start.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An error while locating or verifying a cached file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The file does not exist.
    #[error("{path}: file not found (expected {what}; run `make models` to fetch the reference models)")]
    Missing {
        /// The file that was looked for.
        path: PathBuf,
        /// What the file should have been.
        what: String,
    },
    /// The file has another size than recorded: usually a truncated download.
    #[error("{path}: {actual} bytes, expected {expected} bytes (truncated or a different file; `make models` fetches it again)")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// The recorded size.
        expected: u64,
        /// The size on disk.
        actual: u64,
    },
    /// The file's digest differs from the recorded one.
    #[error(
        "{path}: sha256 {actual}, expected {expected} (a corrupted or different file; `make models` fetches it again)"
    )]
    WrongDigest {
        /// The file.
        path: PathBuf,
        /// The recorded digest.
        expected: String,
        /// The digest of the file on disk.
        actual: String,
    },
    /// Reading the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// The root of the cache: `$SCENECAST_CACHE`, else `$XDG_CACHE_HOME/scenecast`, else
/// `~/.cache/scenecast`. Model parts are under its `models/` folder.
pub fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SCENECAST_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("scenecast");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/cache"));
    home.join(".cache").join("scenecast")
}

/// The folder that holds the fetched model parts under a cache root.
pub fn models_dir(root: &Path) -> PathBuf {
    root.join("models")
}

/// The CPU name used in the cache layout and in the fetch script (`x86_64`, `aarch64`).
pub fn host_arch() -> &'static str {
    std::env::consts::ARCH
}

/// Where `make models` puts the ONNX Runtime library for this CPU.
pub fn default_ort_library(root: &Path) -> PathBuf {
    models_dir(root).join("ort").join(host_arch()).join("libonnxruntime.so.1.32.0")
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    sha256: String,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

/// The sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, CacheError> {
    let io = |source| CacheError::Io { path: path.to_owned(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Checks that `path` exists and, where given, has `size` bytes and the digest `sha256`.
///
/// `what` names the expected content for the error message. A matching sidecar stamp saves the
/// hashing; a fresh successful hash writes one (best effort: a read-only cache still verifies).
pub fn verify(path: &Path, what: &str, size: Option<u64>, sha256: Option<&str>) -> Result<(), CacheError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) | Err(_) => return Err(CacheError::Missing { path: path.to_owned(), what: what.to_owned() }),
    };
    if let Some(expected) = size {
        if meta.len() != expected {
            return Err(CacheError::WrongSize { path: path.to_owned(), expected, actual: meta.len() });
        }
    }
    let Some(expected) = sha256 else { return Ok(()) };
    let expected = expected.to_ascii_lowercase();
    let stamp = Stamp { size: meta.len(), mtime_ns: mtime_ns(&meta), sha256: expected.clone() };
    if let Ok(text) = std::fs::read_to_string(stamp_path(path)) {
        if serde_json::from_str::<Stamp>(&text).is_ok_and(|s| s == stamp) {
            return Ok(());
        }
    }
    let actual = sha256_file(path)?;
    if actual != expected {
        return Err(CacheError::WrongDigest { path: path.to_owned(), expected, actual });
    }
    if let Ok(json) = serde_json::to_string(&stamp) {
        let _ = std::fs::write(stamp_path(path), json);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn verify_accepts_matching_file_and_rejects_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"hello").unwrap();
        verify(&path, "a greeting", Some(5), Some(HELLO_SHA)).unwrap();
        assert!(stamp_path(&path).exists(), "a successful hash leaves a stamp");
        // Same size, other content, newer mtime: the stamp no longer matches, so it is rehashed.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&path, b"jello").unwrap();
        let err = verify(&path, "a greeting", Some(5), Some(HELLO_SHA)).unwrap_err();
        assert!(matches!(err, CacheError::WrongDigest { .. }), "{err}");
        assert!(err.to_string().contains(HELLO_SHA), "{err}");
    }

    #[test]
    fn verify_names_size_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        let err = verify(&path, "the LLM GGUF", None, None).unwrap_err();
        assert!(err.to_string().contains("model.gguf: file not found (expected the LLM GGUF"), "{err}");
        std::fs::write(&path, b"GGUF").unwrap();
        let err = verify(&path, "the LLM GGUF", Some(98_362_432), None).unwrap_err();
        assert!(err.to_string().contains("4 bytes, expected 98362432 bytes"), "{err}");
    }
}

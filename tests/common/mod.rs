//! Shared helpers for the integration tests: the real fetched models and photos.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use scenecast::config::Config;
use scenecast::frame::RgbImage;
use scenecast::manifest::Manifest;
use scenecast::onnx::OnnxRuntime;

/// The model cache `make test` filled.
pub fn cache_root() -> PathBuf {
    scenecast::cache::default_root()
}

/// A fetched sample photo.
pub fn photo(name: &str) -> RgbImage {
    let path = cache_root().join("models/photos").join(name);
    RgbImage::open(&path).unwrap_or_else(|e| panic!("{e}; run `make models` first"))
}

/// The reference manifest.
pub fn manifest() -> Manifest {
    Manifest::reference().unwrap()
}

/// The ONNX Runtime library with the default (CPU) config.
pub fn runtime() -> OnnxRuntime {
    OnnxRuntime::init(&Config::builtin().onnx, &cache_root()).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the `scenecast` binary with `args` and extra environment; returns (status ok, stdout, stderr).
pub fn scenecast(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_scenecast"));
    cmd.args(args).env_remove("ORT_DYLIB_PATH").env_remove("SCENECAST_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run scenecast");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A temporary file with `contents`.
pub fn write_temp(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

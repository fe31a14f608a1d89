//! The camera: frame sources behind one trait (a V4L2 device, a slideshow of image files), the
//! conversion of camera buffers to RGB8, and the latest-frame slot between the capture thread and
//! the worker.

mod convert;
mod source;
mod v4l2;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use convert::{mjpeg_to_rgb, rgb24_to_rgb, FrameConverter};
pub use source::{CameraError, FrameSlot, FrameSource, Slideshow};
pub use v4l2::{convert_buffer, PixelFormat, V4l2Config, V4l2Source};

/// Where frames come from: a V4L2 camera when `[camera.v4l2]` is given, else images.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// A V4L2 camera.
    pub v4l2: Option<V4l2Config>,
    /// An image file or a directory of images played as a slideshow (default: the fetched sample
    /// photos, the demo camera).
    pub path: Option<PathBuf>,
    /// Seconds each slideshow frame stays (a still image is delivered again at this rate).
    pub interval_s: f64,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig { v4l2: None, path: None, interval_s: 10.0 }
    }
}

/// Opens the configured source: the V4L2 device, else the slideshow at `camera.path` (default:
/// the fetched sample photos under `models_dir`).
pub fn open(config: &CameraConfig, models_dir: &Path) -> Result<Box<dyn FrameSource>, CameraError> {
    Ok(match &config.v4l2 {
        Some(v4l2) => Box::new(V4l2Source::new(v4l2.clone())),
        None => {
            let path = config.path.clone().unwrap_or_else(|| models_dir.join("photos"));
            Box::new(Slideshow::open(&path, Duration::from_secs_f64(config.interval_s))?)
        }
    })
}

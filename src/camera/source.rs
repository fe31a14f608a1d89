//! Frame sources behind one trait: a V4L2 camera ([`super::V4l2Source`]), and here a still image or a
//! slideshow of a directory (the demo camera, using the fetched sample photos). A capture thread
//! pulls frames and puts each in the [`FrameSlot`], which keeps only the newest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::frame::{Frame, ImageError, RgbImage};

/// An error of the camera: a frame source that fails, or a buffer that cannot be converted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CameraError {
    /// The path has no usable images.
    #[error("frame source {path}: no PNG, JPEG or WebP images (expected an image file or a directory of them)")]
    Empty {
        /// The path.
        path: PathBuf,
    },
    /// The directory could not be read.
    #[error("frame source {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An image did not decode.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A raw buffer is shorter than its format and size require.
    #[error("{format} frame {width}x{height}: buffer has {actual} bytes, expected at least {expected}")]
    ShortBuffer {
        /// The pixel format.
        format: &'static str,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A frame size that cannot be converted.
    #[error("{format} frame {width}x{height}: {message}")]
    BadGeometry {
        /// The pixel format.
        format: &'static str,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// What is wrong.
        message: String,
    },
    /// A JPEG (MJPEG) frame that does not decode.
    #[error("MJPEG frame does not decode: {0}")]
    Jpeg(String),
}

/// Something that delivers frames.
pub trait FrameSource: Send {
    /// Blocks until the next frame. An error means this attempt failed (a camera that vanished,
    /// a file that no longer decodes); the caller retries with backoff.
    fn next_frame(&mut self) -> Result<Frame, CameraError>;
}

/// The latest frame, shared between the capture thread and the worker. Old frames are replaced,
/// never queued.
#[derive(Default)]
pub struct FrameSlot {
    frame: std::sync::Mutex<Option<Frame>>,
    /// When the capture thread last delivered a frame (for the watchdog).
    last_delivery: std::sync::Mutex<Option<Instant>>,
}

impl FrameSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts a frame in, replacing any frame not yet taken.
    pub fn put(&self, frame: Frame) {
        if let Ok(mut slot) = self.frame.lock() {
            *slot = Some(frame);
        }
        if let Ok(mut at) = self.last_delivery.lock() {
            *at = Some(Instant::now());
        }
    }

    /// Takes the newest frame, if one arrived since the last take.
    pub fn take(&self) -> Option<Frame> {
        self.frame.lock().ok().and_then(|mut slot| slot.take())
    }

    /// How long ago the last frame arrived (`None`: never).
    pub fn age(&self) -> Option<Duration> {
        self.last_delivery.lock().ok().and_then(|at| at.map(|t| t.elapsed()))
    }
}

/// A still image or a directory of images played in name order, one every `interval`, looping.
pub struct Slideshow {
    files: Vec<PathBuf>,
    interval: Duration,
    next_index: usize,
    next_due: Instant,
    seq: u64,
}

impl Slideshow {
    /// A slideshow of `path` (an image, or a directory of images).
    pub fn open(path: &Path, interval: Duration) -> Result<Self, CameraError> {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| CameraError::Io { path: path.to_owned(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| RgbImage::is_image_file(p))
                .collect();
            files.sort();
            files
        } else if path.is_file() {
            vec![path.to_owned()]
        } else {
            Vec::new()
        };
        if files.is_empty() {
            return Err(CameraError::Empty { path: path.to_owned() });
        }
        Ok(Slideshow { files, interval, next_index: 0, next_due: Instant::now(), seq: 0 })
    }
}

impl FrameSource for Slideshow {
    /// The next image once its time has come; a still image is delivered again every interval,
    /// as a camera pointed at a still scene would.
    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        let now = Instant::now();
        if now < self.next_due {
            std::thread::sleep(self.next_due - now);
        }
        self.next_due = Instant::now() + self.interval;
        let path = &self.files[self.next_index];
        self.next_index = (self.next_index + 1) % self.files.len();
        let image = RgbImage::open(path)?;
        let frame = Frame { seq: self.seq, captured_at: SystemTime::now(), image };
        self.seq += 1;
        Ok(frame)
    }
}

//! Frame sources behind one trait. For now: still images and a slideshow of a directory (the demo
//! camera, using the fetched sample photos).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::frame::{Frame, ImageError, RgbImage};

/// An error of a frame source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The path has no usable images.
    #[error("frame source {path}: no PNG or JPEG images (expected an image file or a directory of them)")]
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
}

/// Something that delivers frames.
pub trait FrameSource: Send {
    /// The next frame if one is due (`None` while the current frame is still the newest).
    fn poll(&mut self) -> Result<Option<Frame>, SourceError>;
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
    pub fn open(path: &Path, interval: Duration) -> Result<Self, SourceError> {
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| SourceError::Io { path: path.to_owned(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(), Some("png" | "jpg" | "jpeg")))
                .collect();
            files.sort();
            files
        } else if path.is_file() {
            vec![path.to_owned()]
        } else {
            Vec::new()
        };
        if files.is_empty() {
            return Err(SourceError::Empty { path: path.to_owned() });
        }
        Ok(Slideshow { files, interval, next_index: 0, next_due: Instant::now(), seq: 0 })
    }
}

impl FrameSource for Slideshow {
    fn poll(&mut self) -> Result<Option<Frame>, SourceError> {
        if Instant::now() < self.next_due || (self.files.len() == 1 && self.seq > 0) {
            return Ok(None);
        }
        let path = &self.files[self.next_index];
        self.next_index = (self.next_index + 1) % self.files.len();
        self.next_due = Instant::now() + self.interval;
        let image = RgbImage::open(path)?;
        let frame = Frame { seq: self.seq, captured_at: SystemTime::now(), image };
        self.seq += 1;
        Ok(Some(frame))
    }
}

//! Frames: the plain owned values that travel from a frame source into the pipeline.

use std::path::Path;
use std::time::SystemTime;

/// An RGB8 image: `height` rows of `width` pixels, 3 bytes each, no row padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

/// An error while decoding an image file.
#[derive(Debug, thiserror::Error)]
#[error("image {path}: {message} (expected a PNG or JPEG file)")]
pub struct ImageError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

impl RgbImage {
    /// An image from packed RGB8 pixels. Returns `None` when the length is not `width * height * 3`.
    pub fn from_pixels(width: u32, height: u32, pixels: Vec<u8>) -> Option<Self> {
        (pixels.len() == width as usize * height as usize * 3 && width > 0 && height > 0)
            .then_some(RgbImage { width, height, pixels })
    }

    /// An empty image that conversions fill (and grow) in place.
    pub fn empty() -> Self {
        RgbImage { width: 0, height: 0, pixels: Vec::new() }
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The packed RGB8 bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Resizes the buffer for a new frame size and hands it out for filling. The allocation is
    /// kept across frames of the same (or smaller) size, so steady-state capture allocates nothing.
    pub fn reshape(&mut self, width: u32, height: u32) -> &mut [u8] {
        self.width = width;
        self.height = height;
        self.pixels.resize(width as usize * height as usize * 3, 0);
        &mut self.pixels
    }

    /// Decodes a PNG or JPEG file.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let err = |message: String| ImageError { path: path.display().to_string(), message };
        let reader = image::ImageReader::open(path)
            .map_err(|e| err(e.to_string()))?
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))?;
        let decoded = reader.decode().map_err(|e| err(e.to_string()))?;
        let rgb = decoded.into_rgb8();
        let (width, height) = rgb.dimensions();
        RgbImage::from_pixels(width, height, rgb.into_raw()).ok_or_else(|| err("image has no pixels".into()))
    }

    /// The image mirrored left to right.
    pub fn flipped_horizontally(&self) -> Self {
        let row_len = self.width as usize * 3;
        let mut pixels = Vec::with_capacity(self.pixels.len());
        for row in self.pixels.chunks_exact(row_len) {
            for px in row.chunks_exact(3).rev() {
                pixels.extend_from_slice(px);
            }
        }
        RgbImage { width: self.width, height: self.height, pixels }
    }
}

/// A frame from a source: the image, its sequence number and when it was captured.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Monotonic per source, starting at 0.
    pub seq: u64,
    /// Wall-clock capture time (reported with captions and answers).
    pub captured_at: SystemTime,
    /// The pixels.
    pub image: RgbImage,
}

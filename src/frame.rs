//! Frames and images: the plain owned values that travel from a frame source into the pipeline,
//! and the one place that decodes and encodes image files.

use std::path::Path;
use std::time::SystemTime;

/// An RGB8 image: `height` rows of `width` pixels, 3 bytes each, no row padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

/// An error while decoding an image file or encoding an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A file that does not decode.
    #[error("image {path}: {message} (expected a PNG, JPEG or WebP file)")]
    Decode {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// An image that does not encode.
    #[error("encoding a {width}x{height} image as {format}: {message}")]
    Encode {
        /// The MIME type asked for.
        format: &'static str,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// What went wrong.
        message: String,
    },
}

/// An image file format for published and generated images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// PNG (lossless).
    #[default]
    Png,
    /// JPEG (quality 90).
    Jpeg,
}

impl ImageFormat {
    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
        }
    }

    /// From a file name's extension (`.png`, `.jpg`, `.jpeg`).
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "png" => Some(ImageFormat::Png),
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            _ => None,
        }
    }
}

impl RgbImage {
    /// An image from packed RGB8 pixels. Returns `None` when the length is not `width * height * 3`.
    pub fn from_pixels(width: u32, height: u32, pixels: Vec<u8>) -> Option<Self> {
        (pixels.len() == width as usize * height as usize * 3 && width > 0 && height > 0).then_some(RgbImage {
            width,
            height,
            pixels,
        })
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

    /// Whether `path` names an image file scenecast decodes (PNG, JPEG or WebP, by extension, any case).
    pub fn is_image_file(path: &Path) -> bool {
        matches!(
            path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref(),
            Some("png" | "jpg" | "jpeg" | "webp")
        )
    }

    /// Decodes a PNG, JPEG or WebP file.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ImageError::Decode { path: path.display().to_string(), message: e.to_string() })?;
        Self::decode(&bytes, &path.display().to_string())
    }

    /// Decodes a PNG, JPEG or WebP image from memory (`what` names it in errors). Images larger
    /// than 8192 pixels on a side are refused before their pixels are allocated.
    pub fn decode(bytes: &[u8], what: &str) -> Result<Self, ImageError> {
        let err = |message: String| ImageError::Decode { path: what.to_owned(), message };
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(8192);
        limits.max_image_height = Some(8192);
        reader.limits(limits);
        let decoded = reader.decode().map_err(|e| err(e.to_string()))?;
        let rgb = decoded.into_rgb8();
        let (width, height) = rgb.dimensions();
        RgbImage::from_pixels(width, height, rgb.into_raw()).ok_or_else(|| err("image has no pixels".into()))
    }

    /// Encodes the image as PNG or JPEG.
    pub fn encode(&self, format: ImageFormat) -> Result<Vec<u8>, ImageError> {
        use image::ImageEncoder as _;
        let mut out = Vec::new();
        let (w, h) = (self.width, self.height);
        let result = match format {
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut out).write_image(
                &self.pixels,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            ),
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).write_image(
                &self.pixels,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            ),
        };
        result.map_err(|e| ImageError::Encode {
            format: format.content_type(),
            width: w,
            height: h,
            message: e.to_string(),
        })?;
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_known_by_extension_in_any_case() {
        for name in ["a.png", "b.JPG", "c.jpeg", "d.WebP"] {
            assert!(RgbImage::is_image_file(Path::new(name)), "{name}");
        }
        for name in ["e.gif", "f", "g.png.txt"] {
            assert!(!RgbImage::is_image_file(Path::new(name)), "{name}");
        }
    }

    #[test]
    fn encoded_png_and_jpeg_decode_to_the_same_size() {
        let img = RgbImage::from_pixels(16, 8, (0..16 * 8 * 3).map(|i| (i % 251) as u8).collect()).unwrap();
        for format in [ImageFormat::Png, ImageFormat::Jpeg] {
            let bytes = img.encode(format).unwrap();
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (16, 8), "{format:?}");
        }
        let png = img.encode(ImageFormat::Png).unwrap();
        assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8().into_raw(), img.pixels(), "PNG is lossless");
    }

    #[test]
    fn formats_come_from_extensions() {
        assert_eq!(ImageFormat::from_path(Path::new("a.PNG")), Some(ImageFormat::Png));
        assert_eq!(ImageFormat::from_path(Path::new("a.jpeg")), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::from_path(Path::new("a.gif")), None);
    }
}

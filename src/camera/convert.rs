//! Camera buffers (YUYV 4:2:2, MJPEG, RGB24) to RGB8: the only module that knows camera pixel
//! formats. The converter owns its scratch buffers, so once the frame size is stable it
//! allocates nothing per frame.

use yuvutils_rs::{YuvPackedImage, YuvRange, YuvStandardMatrix};
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

use super::source::CameraError;
use crate::frame::RgbImage;

/// Converts camera buffers to RGB8. Holds the scratch memory that padded rows need, so that
/// converting frames of a stable size allocates nothing.
#[derive(Debug, Default)]
pub struct FrameConverter {
    /// Tightly packed YUYV rows, used when the driver pads rows (stride > width * 2).
    packed: Vec<u8>,
    /// An MJPEG frame with the standard Huffman tables put in (many webcams leave them out).
    jpeg: Vec<u8>,
}

impl FrameConverter {
    /// A converter with no scratch memory yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Converts a packed YUYV 4:2:2 buffer (V4L2 `YUYV`, BT.601 limited range as webcams send
    /// it) into `out`. `stride` is the bytes per row (V4L2 `bytesperline`; at least `width * 2`);
    /// the buffer may be longer than the frame (V4L2 buffers often are).
    pub fn yuyv_to_rgb(
        &mut self,
        src: &[u8],
        width: u32,
        height: u32,
        stride: u32,
        out: &mut RgbImage,
    ) -> Result<(), CameraError> {
        let geometry =
            |message: &str| CameraError::BadGeometry { format: "YUYV", width, height, message: message.into() };
        if width == 0 || height == 0 || !width.is_multiple_of(2) {
            return Err(geometry("width must be even and both sides non-zero"));
        }
        if stride < width * 2 {
            return Err(geometry(&format!("stride {stride} is less than width * 2 = {}", width * 2)));
        }
        let row = width as usize * 2;
        let expected = stride as usize * (height as usize - 1) + row;
        if src.len() < expected {
            return Err(CameraError::ShortBuffer { format: "YUYV", width, height, expected, actual: src.len() });
        }
        // The converter wants exactly `height` rows of `width * 2` bytes: pack padded rows first.
        let packed: &[u8] = if stride as usize == row {
            &src[..row * height as usize]
        } else {
            self.packed.clear();
            for y in 0..height as usize {
                let start = y * stride as usize;
                self.packed.extend_from_slice(&src[start..start + row]);
            }
            &self.packed
        };
        let image = YuvPackedImage { yuy: packed, yuy_stride: width * 2, width, height };
        let dst = out.reshape(width, height);
        yuvutils_rs::yuyv422_to_rgb(&image, dst, width * 3, YuvRange::Limited, YuvStandardMatrix::Bt601)
            .map_err(|e| geometry(&e.to_string()))
    }

    /// Decodes one MJPEG frame into `out`. Many UVC webcams send MJPEG frames without Huffman
    /// tables (the MJPEG convention: the decoder assumes the standard ones of JPEG Annex K.3);
    /// such a frame gets the standard tables put in before decoding.
    pub fn mjpeg_to_rgb(&mut self, src: &[u8], max_side: u32, out: &mut RgbImage) -> Result<(), CameraError> {
        if has_huffman_tables(src) {
            return mjpeg_to_rgb(src, max_side, out);
        }
        self.jpeg.clear();
        self.jpeg.extend_from_slice(&src[..2]);
        self.jpeg.extend_from_slice(&STANDARD_DHT);
        self.jpeg.extend_from_slice(&src[2..]);
        let jpeg = std::mem::take(&mut self.jpeg);
        let result = mjpeg_to_rgb(&jpeg, max_side, out);
        self.jpeg = jpeg;
        result
    }
}

/// True when a JPEG defines Huffman tables (a DHT segment) before its scan, or when its markers
/// cannot be followed (the decoder then reports the real problem).
fn has_huffman_tables(jpeg: &[u8]) -> bool {
    if jpeg.len() < 4 || jpeg[0] != 0xFF || jpeg[1] != 0xD8 {
        return true;
    }
    let mut i = 2;
    while i + 4 <= jpeg.len() {
        if jpeg[i] != 0xFF {
            return true;
        }
        match jpeg[i + 1] {
            0xC4 => return true,
            0xDA => return false,
            0xFF => i += 1, // fill byte
            _ => i += 2 + usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]])),
        }
    }
    true
}

/// The DHT segment with the standard tables of JPEG Annex K.3 (K.3.3.1 and K.3.3.2): luminance
/// and chrominance, DC and AC. 0x1A2 = 418 bytes of payload plus the length field.
const STANDARD_DHT: [u8; 420] = {
    const DC_BITS_LUMA: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_BITS_CHROMA: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const AC_BITS_LUMA: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_VALUES_LUMA: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07, 0x22, 0x71,
        0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72,
        0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37,
        0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59,
        0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3,
        0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
        0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
        0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    const AC_BITS_CHROMA: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    const AC_VALUES_CHROMA: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71, 0x13, 0x22,
        0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1,
        0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36,
        0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58,
        0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a,
        0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba,
        0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
        0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    let mut out = [0u8; 420];
    out[0] = 0xFF;
    out[1] = 0xC4;
    out[2] = 0x01;
    out[3] = 0xA2;
    let mut i = 4;
    // (table class << 4 | id, bits, values)
    let tables: [(u8, &[u8; 16], &[u8]); 4] = [
        (0x00, &DC_BITS_LUMA, &DC_VALUES),
        (0x10, &AC_BITS_LUMA, &AC_VALUES_LUMA),
        (0x01, &DC_BITS_CHROMA, &DC_VALUES),
        (0x11, &AC_BITS_CHROMA, &AC_VALUES_CHROMA),
    ];
    let mut t = 0;
    while t < tables.len() {
        let (class_id, bits, values) = tables[t];
        out[i] = class_id;
        i += 1;
        let mut b = 0;
        while b < 16 {
            out[i] = bits[b];
            i += 1;
            b += 1;
        }
        let mut v = 0;
        while v < values.len() {
            out[i] = values[v];
            i += 1;
            v += 1;
        }
        t += 1;
    }
    out
};

/// Copies a packed RGB24 buffer with `stride` bytes per row into `out`.
pub fn rgb24_to_rgb(src: &[u8], width: u32, height: u32, stride: u32, out: &mut RgbImage) -> Result<(), CameraError> {
    let row = width as usize * 3;
    if width == 0 || height == 0 || (stride as usize) < row {
        return Err(CameraError::BadGeometry {
            format: "RGB24",
            width,
            height,
            message: format!("stride {stride} < width * 3 = {row}"),
        });
    }
    let expected = stride as usize * (height as usize - 1) + row;
    if src.len() < expected {
        return Err(CameraError::ShortBuffer { format: "RGB24", width, height, expected, actual: src.len() });
    }
    let dst = out.reshape(width, height);
    for (y, dst_row) in dst.chunks_exact_mut(row).enumerate() {
        let start = y * stride as usize;
        dst_row.copy_from_slice(&src[start..start + row]);
    }
    Ok(())
}

/// Decodes one MJPEG frame (a JPEG image) into `out`. Frames larger than `max_side` pixels on a
/// side are refused before decoding, so a corrupt header cannot ask for gigabytes.
pub fn mjpeg_to_rgb(src: &[u8], max_side: u32, out: &mut RgbImage) -> Result<(), CameraError> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(max_side as usize)
        .set_max_height(max_side as usize);
    let mut decoder = JpegDecoder::new_with_options(src, options);
    decoder.decode_headers().map_err(|e| CameraError::Jpeg(format!("{e:?}")))?;
    let (width, height) = decoder.dimensions().ok_or_else(|| CameraError::Jpeg("no image dimensions".into()))?;
    let (width, height) = (width as u32, height as u32);
    if decoder.get_output_colorspace() != Some(ColorSpace::RGB) {
        return Err(CameraError::Jpeg(format!("cannot convert to RGB from {:?}", decoder.get_output_colorspace())));
    }
    let dst = out.reshape(width, height);
    decoder.decode_into(dst).map_err(|e| CameraError::Jpeg(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BT.601 limited-range RGB -> YCbCr, written independently of the converter under test.
    fn rgb_to_ycbcr(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
        let y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
        let cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0;
        let cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0;
        (y, cb, cr)
    }

    /// A smooth test pattern: each horizontal pixel pair shares its colour, as 4:2:2 assumes.
    fn pattern(width: u32, height: u32) -> Vec<[u8; 3]> {
        (0..height)
            .flat_map(|y| {
                (0..width)
                    .map(move |x| [((x / 2) * 7 % 256) as u8, (y * 5 % 256) as u8, (((x / 2) + y) * 3 % 256) as u8])
            })
            .collect()
    }

    fn encode_yuyv(px: &[[u8; 3]], width: u32, height: u32, stride: u32) -> Vec<u8> {
        let mut out = vec![0u8; (stride * height) as usize];
        for y in 0..height as usize {
            for x in (0..width as usize).step_by(2) {
                let [r, g, b] = px[y * width as usize + x];
                let (yy, cb, cr) = rgb_to_ycbcr(r as f32, g as f32, b as f32);
                let o = y * stride as usize + x * 2;
                out[o..o + 4].copy_from_slice(&[
                    yy.round() as u8,
                    cb.round() as u8,
                    yy.round() as u8,
                    cr.round() as u8,
                ]);
            }
        }
        out
    }

    #[test]
    fn yuyv_round_trips_a_synthetic_frame() {
        // Cases: (width, height, stride): tight rows, and padded rows as some drivers deliver.
        for (width, height, stride) in [(64u32, 8u32, 128u32), (1280, 4, 2624)] {
            let px = pattern(width, height);
            let buf = encode_yuyv(&px, width, height, stride);
            let mut rgb = RgbImage::empty();
            FrameConverter::new().yuyv_to_rgb(&buf, width, height, stride, &mut rgb).unwrap();
            assert_eq!((rgb.width(), rgb.height()), (width, height));
            let max_err = rgb
                .pixels()
                .chunks_exact(3)
                .zip(&px)
                .flat_map(|(got, want)| (0..3).map(move |c| (got[c] as i32 - want[c] as i32).abs()))
                .max()
                .unwrap();
            assert!(max_err <= 3, "{width}x{height} stride {stride}: max error {max_err} levels");
        }
    }

    #[test]
    fn bad_raw_buffers_are_errors() {
        let mut rgb = RgbImage::empty();
        let err = FrameConverter::new().yuyv_to_rgb(&[0u8; 100], 64, 8, 128, &mut rgb).unwrap_err();
        assert_eq!(err.to_string(), "YUYV frame 64x8: buffer has 100 bytes, expected at least 1024");
        let err = FrameConverter::new().yuyv_to_rgb(&[0u8; 2048], 63, 8, 128, &mut rgb).unwrap_err();
        assert!(err.to_string().contains("width must be even"), "{err}");
        let err = FrameConverter::new().yuyv_to_rgb(&[0u8; 2048], 64, 8, 100, &mut rgb).unwrap_err();
        assert!(err.to_string().contains("stride 100 is less than width * 2 = 128"), "{err}");
        let err = rgb24_to_rgb(&[0u8; 10], 4, 4, 12, &mut rgb).unwrap_err();
        assert!(err.to_string().contains("buffer has 10 bytes, expected at least 48"), "{err}");
        let err = mjpeg_to_rgb(b"\xff\xd8 not really a jpeg", 4096, &mut rgb).unwrap_err();
        assert!(err.to_string().starts_with("MJPEG frame does not decode"), "{err}");
    }

    #[test]
    fn mjpeg_decodes_a_synthetic_frame() {
        let (width, height) = (96u32, 64u32);
        let px: Vec<u8> = pattern(width, height).into_iter().flatten().collect();
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode(&px, width, height, image::ExtendedColorType::Rgb8)
            .unwrap();
        let mut rgb = RgbImage::empty();
        mjpeg_to_rgb(&jpeg, 4096, &mut rgb).unwrap();
        assert_eq!((rgb.width(), rgb.height()), (width, height));
        let mean_err =
            rgb.pixels().iter().zip(&px).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / px.len() as f64;
        assert!(mean_err < 4.0, "mean abs error {mean_err}");
        // The size guard refuses the frame before decoding it.
        let err = mjpeg_to_rgb(&jpeg, 32, &mut rgb).unwrap_err();
        assert!(err.to_string().contains("MJPEG"), "{err}");

        // A webcam-style frame without Huffman tables decodes to the same pixels once the
        // standard tables are put in (the encoder used them).
        let mut stripped = jpeg[..2].to_vec();
        let mut i = 2;
        while jpeg[i + 1] != 0xDA {
            let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
            if jpeg[i + 1] != 0xC4 {
                stripped.extend_from_slice(&jpeg[i..i + 2 + len]);
            }
            i += 2 + len;
        }
        stripped.extend_from_slice(&jpeg[i..]);
        assert!(!has_huffman_tables(&stripped) && has_huffman_tables(&jpeg));
        assert!(mjpeg_to_rgb(&stripped, 4096, &mut rgb).is_err(), "the decoder alone cannot");
        let mut with_tables = RgbImage::empty();
        FrameConverter::new().mjpeg_to_rgb(&stripped, 4096, &mut with_tables).unwrap();
        mjpeg_to_rgb(&jpeg, 4096, &mut rgb).unwrap();
        assert_eq!(with_tables, rgb);
    }

    #[test]
    fn rgb24_honours_stride() {
        let src: Vec<u8> = (0..2 * 8).map(|i| i as u8).collect(); // 2 rows, 2 px + 2 padding bytes
        let mut rgb = RgbImage::empty();
        rgb24_to_rgb(&src, 2, 2, 8, &mut rgb).unwrap();
        assert_eq!(rgb.pixels(), &[0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    }
}

//! Pre-processing: an RGB8 frame to the encoder's normalised NCHW f32 tensor. The buffers belong
//! to the [`Preprocessor`], so once the frame size is stable no step allocates per frame.

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::U16x3;
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};

use super::VisionError;
use crate::frame::RgbImage;
use crate::manifest::{ChannelOrder, PreprocessSpec, ResizeMode};

/// Turns RGB8 frames into a model's input tensor: resize (bilinear convolution, Pillow's
/// `BILINEAR` filter), scale to [0, 1], normalise with the manifest's mean/std, lay out as NCHW f32
/// in the manifest's channel order (RGB, or BGR for models trained on OpenCV's loader).
///
/// The resize runs on 16-bit samples (each byte `v` widened to `v * 257`), not on bytes: an 8-bit
/// resize rounds every output to a whole level, which shifts a normalised value by up to
/// 0.5 / 255 / std ≈ 0.009, while 16 bits keep it within 1e-4 of an exact float resize.
pub struct Preprocessor {
    spec: PreprocessSpec,
    resizer: Resizer,
    options: ResizeOptions,
    /// The frame widened to 16 bits; grows to the largest frame seen, then stays.
    wide: Vec<U16x3>,
    /// The resized image, `height * width` pixels.
    resized: Vec<U16x3>,
    /// The output tensor, `3 * height * width`, planar.
    tensor: Vec<f32>,
    /// Per channel, `(scale, offset)` with `normalised = sample * scale + offset`.
    affine: [(f32, f32); 3],
}

impl Preprocessor {
    /// A pre-processor for one encoder's input spec.
    pub fn new(spec: &PreprocessSpec) -> Self {
        let [height, width] = spec.size;
        let n_pixels = height as usize * width as usize;
        let affine = std::array::from_fn(|c| (1.0 / (65535.0 * spec.std[c]), -spec.mean[c] / spec.std[c]));
        let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        if spec.resize == ResizeMode::CenterCrop {
            options = options.fit_into_destination(Some((0.5, 0.5)));
        }
        Preprocessor {
            spec: spec.clone(),
            resizer: Resizer::new(),
            options,
            wide: Vec::new(),
            resized: vec![U16x3::default(); n_pixels],
            tensor: vec![0.0; n_pixels * 3],
            affine,
        }
    }

    /// The tensor shape `[1, 3, height, width]`.
    pub fn shape(&self) -> [usize; 4] {
        [1, 3, self.spec.size[0] as usize, self.spec.size[1] as usize]
    }

    /// The tensor of the last `run` (zeros before the first).
    pub fn tensor(&self) -> &[f32] {
        &self.tensor
    }

    /// Pre-processes `image`; the returned slice is the NCHW tensor, valid until the next call.
    pub fn run(&mut self, image: &RgbImage) -> Result<&[f32], VisionError> {
        let [height, width] = self.spec.size;
        let resize_err = |message: String| VisionError::Resize {
            from_w: image.width(),
            from_h: image.height(),
            to_w: width,
            to_h: height,
            message,
        };
        self.wide.clear();
        self.wide.extend(
            image
                .pixels()
                .chunks_exact(3)
                .map(|px| U16x3::new([u16::from(px[0]) * 257, u16::from(px[1]) * 257, u16::from(px[2]) * 257])),
        );
        let src =
            TypedImageRef::new(image.width(), image.height(), &self.wide).map_err(|e| resize_err(e.to_string()))?;
        let mut dst =
            TypedImage::from_pixels_slice(width, height, &mut self.resized).map_err(|e| resize_err(e.to_string()))?;
        self.resizer.resize_typed(&src, &mut dst, &self.options).map_err(|e| resize_err(e.to_string()))?;

        let plane = width as usize * height as usize;
        let (first, rest) = self.tensor.split_at_mut(plane);
        let (g_plane, last) = rest.split_at_mut(plane);
        let (r_plane, b_plane) = match self.spec.channels {
            ChannelOrder::Rgb => (first, last),
            ChannelOrder::Bgr => (last, first),
        };
        // The manifest's mean and std are in the tensor's order: per colour, which plane's.
        let plane_of = |colour: usize| match self.spec.channels {
            ChannelOrder::Rgb => colour,
            ChannelOrder::Bgr => 2 - colour,
        };
        let [(rs, ro), (gs, go), (bs, bo)] = std::array::from_fn(|colour| self.affine[plane_of(colour)]);
        for (i, px) in self.resized.iter().enumerate() {
            let [r, g, b] = px.0;
            r_plane[i] = f32::from(r) * rs + ro;
            g_plane[i] = f32::from(g) * gs + go;
            b_plane[i] = f32::from(b) * bs + bo;
        }
        Ok(&self.tensor)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: ResizeMode) -> PreprocessSpec {
        PreprocessSpec {
            size: [4, 4],
            resize,
            channels: ChannelOrder::Rgb,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.25, 0.5],
        }
    }

    #[test]
    fn bgr_puts_blue_first_with_the_statistics_of_each_plane() {
        let img = RgbImage::from_pixels(4, 4, [255u8, 0, 128].repeat(16)).unwrap();
        // mean/std in the tensor's (BGR) order: blue's are first.
        let bgr = PreprocessSpec {
            channels: ChannelOrder::Bgr,
            mean: [0.25, 0.5, 0.75],
            std: [0.5, 0.25, 0.125],
            ..spec(ResizeMode::Squash)
        };
        let t = Preprocessor::new(&bgr).run(&img).unwrap().to_vec();
        let blue = (128.0 / 255.0 - 0.25) / 0.5;
        assert!(t[..16].iter().all(|v| (v - blue).abs() < 1e-5), "B plane first: {:?}", &t[..16]);
        assert!(t[16..32].iter().all(|v| (v + 2.0).abs() < 1e-5), "G plane: (0 - .5) / .25");
        assert!(t[32..].iter().all(|v| (v - (1.0 - 0.75) / 0.125).abs() < 1e-5), "R plane last: {:?}", &t[32..]);
    }

    #[test]
    fn normalises_into_planar_layout() {
        let img = RgbImage::from_pixels(4, 4, [255u8, 0, 128].repeat(16)).unwrap();
        let mut pre = Preprocessor::new(&spec(ResizeMode::Squash));
        let t = pre.run(&img).unwrap().to_vec();
        assert_eq!(pre.shape(), [1, 3, 4, 4]);
        assert!(t[..16].iter().all(|v| (v - 1.0).abs() < 1e-6), "R plane: (1 - .5) / .5");
        assert!(t[16..32].iter().all(|v| (v + 2.0).abs() < 1e-6), "G plane: (0 - .5) / .25");
        assert!(t[32..].iter().all(|v| (v - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6), "B plane");
    }

    #[test]
    fn center_crop_drops_the_sides_and_squash_keeps_them() {
        // 12x4: black 4-px bands left and right of a white 4x4 centre.
        let mut px = Vec::new();
        for _ in 0..4 {
            for x in 0..12 {
                px.extend_from_slice(if (4..8).contains(&x) { &[255u8; 3] } else { &[0u8; 3] });
            }
        }
        let img = RgbImage::from_pixels(12, 4, px).unwrap();
        let white = (1.0 - 0.5) / 0.5;
        let cropped = Preprocessor::new(&spec(ResizeMode::CenterCrop)).run(&img).unwrap().to_vec();
        assert!(cropped[..16].iter().all(|v| (v - white).abs() < 1e-6), "{cropped:?}");
        let squashed = Preprocessor::new(&spec(ResizeMode::Squash)).run(&img).unwrap().to_vec();
        assert!(squashed[..16].iter().any(|v| (v - white).abs() > 0.5), "{squashed:?}");
    }
}

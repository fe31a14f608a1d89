//! The V4L2 camera: format negotiation (MJPEG, then YUYV, then RGB24), resolution and frame rate
//! from config, memory-mapped streaming, and reopening with backoff when the device vanishes.
//!
//! The only module that knows `v4l`. Conversion of the device's buffers goes through
//! [`convert_buffer`], the same function the tests drive with synthetic YUYV and MJPEG buffers.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use v4l::buffer::Type;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;

use super::convert::{rgb24_to_rgb, FrameConverter};
use super::source::{CameraError, FrameSource};
use crate::frame::{Frame, RgbImage};

/// The pixel formats scenecast converts, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Motion JPEG: least USB bandwidth, so the highest resolutions and rates.
    Mjpeg,
    /// Packed YUV 4:2:2.
    Yuyv,
    /// Packed RGB.
    Rgb24,
}

impl PixelFormat {
    /// The V4L2 FourCC.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuyv => *b"YUYV",
            PixelFormat::Rgb24 => *b"RGB3",
        }
    }

    /// The format of a FourCC, if scenecast converts it.
    pub fn from_fourcc(fourcc: &[u8; 4]) -> Option<Self> {
        [PixelFormat::Mjpeg, PixelFormat::Yuyv, PixelFormat::Rgb24].into_iter().find(|f| &f.fourcc() == fourcc)
    }
}

/// `[camera.v4l2]` settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct V4l2Config {
    /// The device node.
    pub device: PathBuf,
    /// Requested width (the closest the camera offers is used).
    pub width: u32,
    /// Requested height.
    pub height: u32,
    /// Requested frame rate.
    pub fps: u32,
}

impl Default for V4l2Config {
    fn default() -> Self {
        V4l2Config { device: PathBuf::from("/dev/video0"), width: 1280, height: 720, fps: 15 }
    }
}

/// Picks a format and size from what the camera offers: the most preferred format that offers any
/// size, and of its sizes the one closest in area to the request (ties: the larger). `offers` lists
/// each FourCC with its discrete sizes (an empty list: any size, taken as the request).
pub fn choose_format(offers: &[([u8; 4], Vec<(u32, u32)>)], want: (u32, u32)) -> Option<(PixelFormat, (u32, u32))> {
    let preferred = [PixelFormat::Mjpeg, PixelFormat::Yuyv, PixelFormat::Rgb24];
    preferred.into_iter().find_map(|format| {
        let (_, sizes) = offers.iter().find(|(fourcc, _)| *fourcc == format.fourcc())?;
        if sizes.is_empty() {
            return Some((format, want));
        }
        let want_area = i64::from(want.0) * i64::from(want.1);
        sizes
            .iter()
            .copied()
            .min_by_key(|(w, h)| ((i64::from(*w) * i64::from(*h) - want_area).abs(), -(i64::from(*w) * i64::from(*h))))
            .map(|size| (format, size))
    })
}

/// Converts one captured buffer to RGB8: the device path's conversion, shared with the tests.
pub fn convert_buffer(
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: u32,
    data: &[u8],
    converter: &mut FrameConverter,
    out: &mut RgbImage,
) -> Result<(), CameraError> {
    match format {
        PixelFormat::Mjpeg => converter.mjpeg_to_rgb(data, 8192, out),
        PixelFormat::Yuyv => converter.yuyv_to_rgb(data, width, height, stride.max(width * 2), out),
        PixelFormat::Rgb24 => rgb24_to_rgb(data, width, height, stride.max(width * 3), out),
    }
}

struct Open {
    stream: v4l::io::mmap::Stream<'static>,
    format: PixelFormat,
    width: u32,
    height: u32,
    stride: u32,
    /// Keeps the device open as long as the stream.
    _device: v4l::Device,
}

/// A V4L2 camera as a frame source.
pub struct V4l2Source {
    config: V4l2Config,
    open: Option<Open>,
    converter: FrameConverter,
    seq: u64,
    backoff: Duration,
    retry_at: Instant,
}

fn source_err(config: &V4l2Config, message: String) -> CameraError {
    CameraError::Io { path: config.device.clone(), source: std::io::Error::other(message) }
}

impl V4l2Source {
    /// A source for the configured device; the device is opened on the first frame (and again
    /// after it vanishes).
    pub fn new(config: V4l2Config) -> Self {
        V4l2Source {
            config,
            open: None,
            converter: FrameConverter::new(),
            seq: 0,
            backoff: Duration::from_millis(500),
            retry_at: Instant::now(),
        }
    }

    fn open(&self) -> Result<Open, CameraError> {
        let c = &self.config;
        let err = |what: &str, e: std::io::Error| source_err(c, format!("{what}: {e}"));
        let device = v4l::Device::with_path(&c.device)
            .map_err(|e| err("cannot open (is the camera connected, and this user in the video group?)", e))?;
        let mut offers = Vec::new();
        for desc in device.enum_formats().map_err(|e| err("cannot list formats", e))? {
            let sizes = device
                .enum_framesizes(desc.fourcc)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|fs| fs.size.to_discrete())
                .map(|d| (d.width, d.height))
                .collect();
            offers.push((desc.fourcc.repr, sizes));
        }
        let (format, (width, height)) = choose_format(&offers, (c.width, c.height)).ok_or_else(|| {
            let offered: Vec<String> = offers.iter().map(|(f, _)| String::from_utf8_lossy(f).into_owned()).collect();
            source_err(c, format!("offers none of MJPG, YUYV, RGB3 (it offers {})", offered.join(", ")))
        })?;
        let mut fmt = device.format().map_err(|e| err("cannot read the format", e))?;
        fmt.width = width;
        fmt.height = height;
        fmt.fourcc = v4l::FourCC::new(&format.fourcc());
        let fmt = device.set_format(&fmt).map_err(|e| err("cannot set the format", e))?;
        let format = PixelFormat::from_fourcc(&fmt.fourcc.repr)
            .ok_or_else(|| source_err(c, format!("the driver switched to {}", fmt.fourcc)))?;
        if let Err(e) = device.set_params(&v4l::video::capture::Parameters::with_fps(c.fps)) {
            tracing::warn!(device = %c.device.display(), "cannot set {} fps: {e}", c.fps);
        }
        let mut stream = v4l::io::mmap::Stream::with_buffers(&device, Type::VideoCapture, 4)
            .map_err(|e| err("cannot start streaming", e))?;
        stream.set_timeout(Duration::from_secs(2));
        tracing::info!(device = %c.device.display(), format = ?format, width = fmt.width, height = fmt.height, "camera open");
        Ok(Open { stream, format, width: fmt.width, height: fmt.height, stride: fmt.stride, _device: device })
    }
}

impl FrameSource for V4l2Source {
    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        if self.open.is_none() {
            let now = Instant::now();
            if now < self.retry_at {
                std::thread::sleep(self.retry_at - now);
            }
            match self.open() {
                Ok(open) => {
                    self.open = Some(open);
                    self.backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    self.retry_at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
                    return Err(e);
                }
            }
        }
        let open = self.open.as_mut().expect("opened above");
        let (buffer, meta) = match open.stream.next() {
            Ok(next) => next,
            Err(e) => {
                // The camera vanished (unplugged, driver reset): close and reopen with backoff.
                self.open = None;
                self.retry_at = Instant::now() + self.backoff;
                return Err(source_err(&self.config, format!("capture failed, reopening: {e}")));
            }
        };
        let used = (meta.bytesused as usize).min(buffer.len());
        let mut image = RgbImage::empty();
        convert_buffer(
            open.format,
            open.width,
            open.height,
            open.stride,
            &buffer[..used],
            &mut self.converter,
            &mut image,
        )
        .map_err(|e| source_err(&self.config, format!("frame {}: {e}", meta.sequence)))?;
        let frame = Frame { seq: self.seq, captured_at: SystemTime::now(), image };
        self.seq += 1;
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_choice_prefers_mjpeg_then_yuyv_and_the_closest_size() {
        let hd = vec![(640, 480), (1280, 720), (1920, 1080)];
        // (offers, wanted size, expected)
        let cases: Vec<(Vec<([u8; 4], Vec<(u32, u32)>)>, (u32, u32), Option<(PixelFormat, (u32, u32))>)> = vec![
            (
                vec![(*b"YUYV", hd.clone()), (*b"MJPG", hd.clone())],
                (1280, 720),
                Some((PixelFormat::Mjpeg, (1280, 720))),
            ),
            (vec![(*b"YUYV", vec![(640, 480), (800, 600)])], (1280, 720), Some((PixelFormat::Yuyv, (800, 600)))),
            (vec![(*b"RGB3", vec![]), (*b"GREY", hd.clone())], (320, 240), Some((PixelFormat::Rgb24, (320, 240)))),
            (vec![(*b"H264", hd.clone()), (*b"GREY", hd.clone())], (1280, 720), None),
            (vec![(*b"MJPG", vec![(1280, 720), (1280, 720)])], (1000, 1000), Some((PixelFormat::Mjpeg, (1280, 720)))),
        ];
        for (offers, want, expected) in cases {
            assert_eq!(choose_format(&offers, want), expected, "{want:?}");
        }
    }

    #[test]
    fn captured_buffers_convert_through_the_device_path() {
        // A synthetic 4x2 YUYV frame with padded rows (stride 12) of mid grey, and a real JPEG.
        let mut yuyv = Vec::new();
        for _ in 0..2 {
            yuyv.extend_from_slice(&[126, 128, 126, 128, 126, 128, 126, 128, 0, 0, 0, 0]);
        }
        let mut converter = FrameConverter::new();
        let mut out = RgbImage::empty();
        convert_buffer(PixelFormat::Yuyv, 4, 2, 12, &yuyv, &mut converter, &mut out).unwrap();
        assert_eq!((out.width(), out.height()), (4, 2));
        assert!(out.pixels().iter().all(|v| (*v as i32 - 128).abs() <= 2), "{:?}", out.pixels());

        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode(&[200u8; 16 * 8 * 3], 16, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        convert_buffer(PixelFormat::Mjpeg, 16, 8, 0, &jpeg, &mut converter, &mut out).unwrap();
        assert_eq!((out.width(), out.height()), (16, 8));
        assert!(out.pixels().iter().all(|v| (*v as i32 - 200).abs() <= 3));

        let err = convert_buffer(PixelFormat::Yuyv, 4, 2, 12, &yuyv[..10], &mut converter, &mut out).unwrap_err();
        assert!(err.to_string().contains("buffer has 10 bytes"), "{err}");
    }
}

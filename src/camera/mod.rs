//! The camera: frame sources (V4L2, a slideshow of files) and the latest-frame slot.

pub mod source;
pub mod v4l2;
pub use v4l2::*;

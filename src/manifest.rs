//! The model manifest: everything model-specific about one model stack (encoder, projector,
//! LLM), read from TOML. Code elsewhere never hard-codes a model fact; it asks the manifest.
//!
//! The reference stack's manifest (`models/reference.toml`) is compiled into the binary, so a
//! device needs only the fetched cache, not the source tree.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache;

/// The reference stack's manifest text, compiled in.
pub const REFERENCE_MANIFEST: &str = include_str!("../models/reference.toml");

/// An error in a manifest: the file and the key are named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The file could not be read.
    #[error("manifest {path}: {source}")]
    Read {
        /// The manifest file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not match the manifest's schema.
    #[error("manifest {origin}: {message}")]
    Parse {
        /// The manifest file, or `<built-in reference>`.
        origin: String,
        /// The TOML error, which names the key and line.
        message: String,
    },
    /// A value parses but is not usable.
    #[error("manifest {origin}: `{key}`: {message}")]
    Invalid {
        /// The manifest file, or `<built-in reference>`.
        origin: String,
        /// The dotted key of the bad value.
        key: &'static str,
        /// What is wrong and what was expected.
        message: String,
    },
}

/// Where a model file is and what it must be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    /// A path relative to the model cache (`$SCENECAST_CACHE/models`).
    pub cache: Option<PathBuf>,
    /// A path that is absolute or relative to the manifest's own directory.
    pub path: Option<PathBuf>,
    /// The expected sha256 (hex); checked by `models check`.
    pub sha256: Option<String>,
    /// The expected size in bytes; checked on every load (cheap, and catches truncation).
    pub size: Option<u64>,
}

/// Which tokens a LoRA adapter computes on (`llm.adapter_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterScope {
    /// Every token: the scene, the question, the answer, text-only requests.
    #[default]
    All,
    /// Only the scene prefix with its image tokens (a "visual expert", as in CogVLM): questions,
    /// answers and text-only requests run the base model, so decoding pays nothing for it.
    Scene,
    /// What the model reads about a scene with an image, not what it writes: the scene prefix and
    /// each request's prompt (so the first token of an answer is the adapter's), while the rest of
    /// the answer and text-only requests run the base model. Decoding pays nothing for it.
    Prompt,
    /// As `Prompt` for questions, as `Scene` for captions: the caption prompt runs the base model,
    /// each question about a scene with an image is read by the adapter.
    Questions,
}

impl AdapterScope {
    /// Whether the adapter is switched on and off around parts of the conversation (not on for
    /// every token).
    pub fn is_scoped(self) -> bool {
        self != AdapterScope::All
    }
}

/// How the frame is brought to the encoder's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resize the whole frame to the input size, ignoring its aspect ratio.
    Squash,
    /// Crop the centre of the frame to the input's aspect ratio, then resize.
    CenterCrop,
}

/// The order of the colour planes in a model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue (ViTs exported from PyTorch).
    #[default]
    Rgb,
    /// Blue, green, red (models trained with OpenCV's loader, such as NanoDet).
    Bgr,
}

/// Pre-processing from an RGB8 frame to a model's input tensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessSpec {
    /// Input size as `[height, width]`.
    pub size: [u32; 2],
    /// How the frame is fitted to `size`.
    pub resize: ResizeMode,
    /// The tensor's channel order (default RGB).
    #[serde(default)]
    pub channels: ChannelOrder,
    /// Per-channel mean on values in [0, 1], in the tensor's channel order.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in the tensor's channel order.
    pub std: [f32; 3],
}

/// A second modality encoder: an object detector (ONNX) whose class scores the projector reads
/// next to the patch features (`projector.detections_input`). Its output is one score per anchor
/// point and class, the anchor points of every grid (`strides`) row-major, finest first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSpec {
    /// The ONNX file.
    pub file: FileRef,
    /// The image input's name.
    pub input: String,
    /// The image input's shape, `[1, 3, height, width]`.
    pub input_shape: Vec<i64>,
    /// The class-score output's name.
    pub output: String,
    /// The output's shape, `[1, anchors, classes]`.
    pub output_shape: Vec<i64>,
    /// The stride of each anchor grid over the input, finest first.
    pub strides: Vec<u32>,
    /// The class of each score column.
    pub classes: Vec<String>,
    /// Columns named `<category_prefix><category>` score a `[grounding]` category itself (the
    /// ImageNet classifier's columns of `dinov2s-nanodet-imagenet.toml`: "imagenet cat"), and the
    /// caption check can read them (`grounding.classifier_threshold`). Such a column that is zero
    /// over a whole frame gives no score (no class of the classifier falls under the category).
    #[serde(default)]
    pub category_prefix: Option<String>,
    /// Pre-processing.
    pub preprocess: PreprocessSpec,
}

impl DetectorSpec {
    /// The horizontal centre of each anchor point, as a fraction of the input's width (which is the
    /// frame's: the detector's input is the whole frame, resized), in the output's order: every
    /// grid row-major, finest first. The manifest checks that each stride divides the input size.
    pub fn anchor_x(&self) -> Vec<f32> {
        let [height, width] = self.preprocess.size;
        self.strides
            .iter()
            .filter(|s| **s > 0)
            .flat_map(|&stride| {
                let (rows, columns) = (height / stride, width / stride);
                (0..rows)
                    .flat_map(move |_| (0..columns).map(move |c| ((c as f32 + 0.5) * stride as f32) / width as f32))
            })
            .collect()
    }
}

/// The modality encoder (a ViT exported to ONNX). Two layouts: patch features that the
/// `[projector]` pools and maps into the LLM's space (the reference stack), or, without a
/// `[projector]`, an export with its connector inside whose output already is the image tokens
/// (SmolVLM's `vision_encoder.onnx`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderSpec {
    /// The ONNX file.
    pub file: FileRef,
    /// The image input's name.
    pub input: String,
    /// The image input's shape: `[batch, 3, height, width]`, or `[batch, images, 3, height,
    /// width]` (Idefics3 / SmolVLM exports; scenecast sends one image); -1 for a free dimension.
    pub input_shape: Vec<i64>,
    /// A pixel-mask input `[batch, images, height, width]` (true for real pixels; bool, or int64
    /// in some exports), as Idefics3 exports take it; scenecast sends whole images, so it is all
    /// true.
    #[serde(default)]
    pub mask_input: Option<String>,
    /// The patch-feature output's name.
    pub output: String,
    /// The output's shape `[batch, tokens, width]`; -1 for a free dimension.
    pub output_shape: Vec<i64>,
    /// Tokens before the patch grid (a CLS token, registers).
    pub prefix_tokens: usize,
    /// The patch grid `[rows, cols]`, row-major after the prefix tokens (for an encoder with its
    /// connector inside: the grid of its image tokens, e.g. SmolVLM's 8 x 8).
    pub patch_grid: [usize; 2],
    /// Pre-processing.
    pub preprocess: PreprocessSpec,
}

/// The input projector: pooled patch features to LLM embeddings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSpec {
    /// The ONNX file.
    pub file: FileRef,
    /// Input name; shape `[n_tokens, in_width]`.
    pub input: String,
    /// Output name; shape `[n_tokens, out_width]`.
    pub output: String,
    /// The grid the patch tokens are average-pooled to; one image token per cell.
    pub pool: [usize; 2],
    /// Feature width in (the encoder's width).
    pub in_width: usize,
    /// Embedding width out; must equal the LLM's `n_embd`.
    pub out_width: usize,
    /// True for the untrained placeholder projector.
    #[serde(default)]
    pub untrained: bool,
    /// The input that takes the `[detector]`'s raw output `[1, anchors, classes]`; required
    /// exactly when the manifest has a detector.
    #[serde(default)]
    pub detections_input: Option<String>,
    /// Image tokens the projector makes from the detections, after the pooled patch tokens; 0
    /// when it fuses them into the patch tokens (each cell's token reads the scores in its cell).
    #[serde(default)]
    pub detection_tokens: usize,
    /// The encoder's leading tokens (CLS, `encoder.prefix_tokens`) the projector reads as they
    /// are, after the pooled patch cells: each becomes an image token of the whole frame, after
    /// the cells' (and any detection tokens). 0: the leading tokens are dropped.
    #[serde(default)]
    pub global_tokens: usize,
}

/// How a conversation is laid out around the image tokens: either written out (`prefix` and
/// `suffix`) or taken from the GGUF's own `tokenizer.chat_template` (`template = "gguf"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSpec {
    /// The default system prompt, substituted for `{system}` (none by default).
    #[serde(default)]
    pub system: String,
    /// `"gguf"`: derive prefix and suffix from the GGUF's chat template.
    pub template: Option<String>,
    /// Text before the image tokens; `{system}` is substituted.
    pub prefix: Option<String>,
    /// Text after the image tokens; `{question}` is substituted.
    pub suffix: Option<String>,
    /// Strings that end generation (besides the model's end-of-generation tokens).
    #[serde(default)]
    pub stop: Vec<String>,
}

/// The LLM backbone (a GGUF run by llama.cpp).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSpec {
    /// The GGUF file.
    pub file: FileRef,
    /// The expected `general.architecture`.
    pub architecture: String,
    /// The expected embedding width.
    pub n_embd: usize,
    /// A LoRA adapter (GGUF, `general.type = "adapter"`) trained together with the projector,
    /// applied at its trained scale where `adapter_scope` says.
    #[serde(default)]
    pub adapter: Option<FileRef>,
    /// Which tokens the adapter computes on: all of them, only the scene prefix (chat prefix and
    /// image tokens), or the scene prefix and each request's prompt, as it was trained (`[adapter]
    /// scope` of the training configuration).
    #[serde(default)]
    pub adapter_scope: AdapterScope,
    /// The model's further GGUF files after `file` (its split 0), in split order (llama.cpp's
    /// split GGUFs): the tensors `file` and `scene_model` share, mapped once for both.
    #[serde(default)]
    pub splits: Vec<FileRef>,
    /// The scene adapter folded into the weights it changes: split 0 of a second model over the
    /// same `splits` (`merge_adapter.py split`). The scene prefix is decoded by it and its keys and
    /// values handed to the base model's context, so no token pays for applying `adapter` at run
    /// time; needs `adapter_scope = "scene"` (questions and answers run the base model, as there).
    #[serde(default)]
    pub scene_model: Option<FileRef>,
    /// The chat layout.
    pub chat: ChatSpec,
}

/// An ONNX model of the generator with the input and output it is run with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxIo {
    /// The ONNX file.
    pub file: FileRef,
    /// Input name.
    pub input: String,
    /// Output name.
    pub output: String,
}

/// The denoising UNet's tensor names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetSpec {
    /// The ONNX file.
    pub file: FileRef,
    /// Noisy latents `[b, channels, h, w]` (f32).
    pub sample: String,
    /// Timestep `[b]` (i64 or f32, whichever the export declares).
    pub timestep: String,
    /// Conditioning `[b, context_tokens, text_width]` (f32).
    pub context: String,
    /// Predicted noise, shaped like `sample`.
    pub output: String,
}

/// The output projector: LLM hidden states at the signal tokens to the generator's conditioning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputProjectorSpec {
    /// The ONNX file.
    pub file: FileRef,
    /// Input name; shape `[n_signal_tokens, llm.n_embd]`.
    pub input: String,
    /// Output name; shape `[1, context_tokens, text_width]`.
    pub output: String,
    /// Text appended after the LLM's description; the hidden states of its tokens are the input.
    pub signal: String,
}

/// The modality generator: a distilled latent diffusion model in the layout of SD-Turbo's ONNX
/// export (CLIP tokenizer, text encoder, UNet, VAE decoder), and optionally an output projector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    /// A sentence for humans.
    #[serde(default)]
    pub description: String,
    /// True for randomly initialised test weights of the real layout: their images are noise.
    #[serde(default)]
    pub random: bool,
    /// The tokenizer (`tokenizer.json` of the Hugging Face `tokenizers` format).
    pub tokenizer: FileRef,
    /// The id prompts are padded with to `context_tokens` (from the export's tokenizer config).
    pub pad_token: u32,
    /// Token ids `[b, context_tokens]` to hidden states `[b, context_tokens, text_width]`.
    pub text_encoder: OnnxIo,
    /// The denoiser.
    pub unet: UnetSpec,
    /// Latents `[b, channels, h, w]` to an image `[b, 3, h * vae_scale, w * vae_scale]` in [-1, 1].
    pub vae_decoder: OnnxIo,
    /// Optional: conditioning from the LLM's hidden states instead of the text encoder.
    pub output_projector: Option<OutputProjectorSpec>,
    /// Tokens of conditioning (CLIP: 77).
    pub context_tokens: usize,
    /// Width of the conditioning.
    pub text_width: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Pixels per latent cell along each side.
    pub vae_scale: usize,
    /// Latents are divided by this before decoding (SD 2.x: 0.18215).
    pub latent_scaling: f32,
    /// Image sides must be multiples of this (the UNet's total down-sampling times `vae_scale`).
    pub size_multiple: usize,
    /// The training noise schedule.
    #[serde(default)]
    pub schedule: NoiseSchedule,
    /// Default sampler, steps, guidance and `[height, width]`.
    pub sampler: SamplerKind,
    /// Default number of steps.
    pub steps: usize,
    /// Default classifier-free guidance scale; 1 or less turns guidance off (SD-Turbo: 0).
    #[serde(default)]
    pub guidance: f32,
    /// Default image size `[height, width]`.
    pub size: [usize; 2],
}

/// The caption check by the image tokens (`[grounding]`): the projector's vocabulary, and how
/// strongly some image token must point at a category's name for a caption to keep naming it
/// (written by `scenecast calibrate`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroundingSpec {
    /// The categories the projector was trained on, named as its captions name them.
    pub categories: Vec<String>,
    /// The least support (the largest cosine of an image token with the name's direction in the
    /// LLM's input space) a named category needs to stay in a caption.
    pub threshold: f32,
    /// The caption when no named category is left ("No known object.").
    pub nothing: String,
    /// A second check, by the detector's own scores of the categories (its columns named
    /// `detector.category_prefix` + category): a named category that has such a score in the
    /// frame stays only when its best score over the anchors reaches this. None: no such check.
    #[serde(default)]
    pub classifier_threshold: Option<f32>,
    /// Categories the second check does not judge: the classifier does not recognise them on
    /// their own training photos (its median score of the category there is below
    /// `classifier_threshold`: ImageNet files a coffee cup under espresso, a person under their
    /// clothes), so their names stand on the image tokens alone. Written by `scenecast calibrate`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classifier_exempt: Vec<String>,
    /// Captions guided by the detector's category columns: when the checked caption names no
    /// category and one category's best score in the frame reaches this (a probability: the
    /// classifier's mass on the category's classes), the LLM writes the caption again with its
    /// answer begun as `guide` says. None: no guided captions. Set by hand, not calibrated.
    #[serde(default)]
    pub guide_threshold: Option<f32>,
    /// How a guided caption begins: `{a}` is the article ("a", "an") and `{name}` the category.
    #[serde(default = "default_guide")]
    pub guide: String,
    /// How a guided answer begins: with `guide_threshold`, a presence question about one category
    /// ("Is there a goat?") that the LLM does not answer with this word, while the category's best
    /// score in the frame reaches the threshold, is answered again begun with it.
    #[serde(default = "default_guide_yes")]
    pub guide_yes: String,
    /// Answers to "Where is the <category>?" placed by the image tokens: the phrases for an
    /// object on the left, in the centre and on the right of the frame, in that order. The grid
    /// cells whose image tokens point at the category place it (`region`); an answer that places
    /// it elsewhere is written again begun with the phrase. Needs image tokens that are a grid of
    /// cells (a `[projector]`). None: the LLM's answers stand.
    #[serde(default)]
    pub positions: Option<[String; 3]>,
    /// With `positions`: the image tokens place an object at the centre of its region, the grid
    /// cells connected to the one whose token points at the category most that reach this
    /// fraction of that best cosine (their centres weighted by cosine): a whole object, where the
    /// one best cell may be any part of it. None: the best cell alone places it.
    #[serde(default)]
    pub region: Option<f32>,
    /// With `positions`: the middle band of the frame's width, `[from, to]` as fractions of it,
    /// whose cells are "in the centre"; a cell whose centre lies left of `from` is on the left,
    /// right of `to` on the right. A fact of how the projector was trained (its composer placed
    /// objects' centres at 0.2–0.32, 0.44–0.56 and 0.68–0.8 of the width).
    #[serde(default = "default_centre")]
    pub centre: [f32; 2],
}

/// The middle quarter of the width, between the reference projector's three training positions.
pub fn default_centre() -> [f32; 2] {
    [0.375, 0.625]
}

/// The beginning of a guided caption, as the reference projector's captions begin.
pub fn default_guide() -> String {
    "There is {a} {name}".into()
}

/// The beginning of a guided answer, as the reference projector's answers begin.
pub fn default_guide_yes() -> String {
    "Yes".into()
}

/// The word of a `positions` phrase that names its side: its last run of letters and digits,
/// lower-case, in one spelling ([`side_spelling`]: "On the left." → "left", "In the center" →
/// "centre"); "" for a phrase without one.
pub fn side_word(phrase: &str) -> String {
    side_spelling(
        phrase.split(|c: char| !c.is_alphanumeric()).rfind(|w| !w.is_empty()).unwrap_or_default().to_lowercase(),
    )
}

/// A lower-case word in the one spelling side words are compared in: "center" is "centre", so a
/// phrase and an answer may spell the middle either way.
pub fn side_spelling(word: String) -> String {
    if word == "center" {
        "centre".to_owned()
    } else {
        word
    }
}

/// The phrases of `positions`, as the reference projector's answers place objects.
pub fn default_positions() -> [String; 3] {
    ["On the left".into(), "In the centre".into(), "On the right".into()]
}

impl GroundingSpec {
    /// The word of each of `positions`' phrases that names its side ([`side_word`]); None
    /// without positions.
    pub fn position_words(&self) -> Option<[String; 3]> {
        self.positions.as_ref().map(|p| p.each_ref().map(|phrase| side_word(phrase)))
    }

    /// The beginning of a caption guided to `category` (`guide` with its article and name).
    pub fn guide_start(&self, category: &str) -> String {
        let article = if category.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
        self.guide.replace("{a}", article).replace("{name}", category)
    }

    /// The section as TOML, under `comment` (each of its lines wrapped to 100 columns as `# ` lines).
    pub fn to_toml(&self, comment: &str) -> String {
        let quote = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut text = String::from("[grounding]\n");
        for paragraph in comment.lines() {
            let mut line = String::from("#");
            for word in paragraph.split_whitespace() {
                if line.len() + 1 + word.len() > 100 && line.len() > 1 {
                    text += &format!("{line}\n");
                    line = String::from("#");
                }
                line += &format!(" {word}");
            }
            text += &format!("{line}\n");
        }
        text += "categories = [\n";
        let mut line = String::new();
        for name in &self.categories {
            if line.len() + name.len() > 96 {
                text += &format!("  {}\n", line.trim_end());
                line.clear();
            }
            line += &format!("{}, ", quote(name));
        }
        text += &format!("  {}\n]\n", line.trim_end());
        text += &format!("threshold = {:.4}\nnothing = {}\n", self.threshold, quote(&self.nothing));
        if let Some(t) = self.classifier_threshold {
            text += &format!("classifier_threshold = {t:.5}\n");
        }
        if !self.classifier_exempt.is_empty() {
            let names: Vec<String> = self.classifier_exempt.iter().map(|c| quote(c)).collect();
            text += &format!("classifier_exempt = [{}]\n", names.join(", "));
        }
        if let Some(t) = self.guide_threshold {
            text += &format!(
                "guide_threshold = {t}\nguide = {}\nguide_yes = {}\n",
                quote(&self.guide),
                quote(&self.guide_yes)
            );
        }
        if let Some(p) = &self.positions {
            text += &format!("positions = [{}, {}, {}]\n", quote(&p[0]), quote(&p[1]), quote(&p[2]));
            text += &format!("centre = [{}, {}]\n", self.centre[0], self.centre[1]);
            if let Some(r) = self.region {
                text += &format!("region = {r}\n");
            }
        }
        text
    }
}

/// Manifest text with its `[grounding]` section replaced by `section` (up to the next table and
/// the comments that open it), or `section` appended after a blank line when it has none.
pub fn with_grounding(text: &str, section: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let is_header = |l: &str| l.trim_start().starts_with('[');
    let Some(start) = lines.iter().position(|l| l.trim() == "[grounding]") else {
        return format!("{}\n\n{section}", text.trim_end());
    };
    let mut end = (start + 1..lines.len()).find(|&i| is_header(lines[i])).unwrap_or(lines.len());
    if end < lines.len() {
        while end > start + 1 && (lines[end - 1].trim().is_empty() || lines[end - 1].trim_start().starts_with('#')) {
            end -= 1;
        }
    }
    let mut out: Vec<String> = lines[..start].iter().map(|l| l.to_string()).collect();
    out.push(section.trim_end().to_owned());
    if end < lines.len() && !lines[end].trim().is_empty() {
        out.push(String::new());
    }
    out.extend(lines[end..].iter().map(|l| l.to_string()));
    out.join("\n") + "\n"
}

/// One model stack.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// A short identifier, reported with every result.
    pub name: String,
    /// A sentence for humans.
    pub description: String,
    /// True for a stack of randomly initialised test weights (its text is gibberish by design).
    #[serde(default)]
    pub random: bool,
    /// The modality encoder.
    pub encoder: EncoderSpec,
    /// The input projector; without one, the encoder's output is the image tokens.
    pub projector: Option<ProjectorSpec>,
    /// A second encoder, an object detector read by the projector (optional).
    pub detector: Option<DetectorSpec>,
    /// The LLM backbone.
    pub llm: LlmSpec,
    /// The modality generator (optional).
    pub generator: Option<GeneratorSpec>,
    /// The caption check by the image tokens (optional).
    pub grounding: Option<GroundingSpec>,
    /// Where the manifest came from (a path, or `<built-in reference>`); not in the TOML.
    #[serde(skip)]
    pub origin: String,
    /// The directory that `path = ...` file references are relative to.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Manifest {
    /// The compiled-in reference manifest.
    pub fn reference() -> Result<Self, ManifestError> {
        Self::parse(REFERENCE_MANIFEST, "<built-in reference>", Path::new("."))
    }

    /// Reads and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parses and validates manifest text.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self, ManifestError> {
        let mut manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        manifest.origin = origin.to_owned();
        manifest.base_dir = base_dir.to_owned();
        manifest.validate()?;
        Ok(manifest)
    }

    fn invalid(&self, key: &'static str, message: String) -> ManifestError {
        ManifestError::Invalid { origin: self.origin.clone(), key, message }
    }

    /// Every file the manifest names, with its dotted key.
    pub fn files(&self) -> Vec<(&'static str, &FileRef)> {
        let mut files = vec![("encoder.file", &self.encoder.file)];
        if let Some(detector) = &self.detector {
            files.push(("detector.file", &detector.file));
        }
        if let Some(projector) = &self.projector {
            files.push(("projector.file", &projector.file));
        }
        files.push(("llm.file", &self.llm.file));
        files.extend(self.llm.splits.iter().map(|split| ("llm.splits", split)));
        if let Some(adapter) = &self.llm.adapter {
            files.push(("llm.adapter", adapter));
        }
        if let Some(scene) = &self.llm.scene_model {
            files.push(("llm.scene_model", scene));
        }
        if let Some(g) = &self.generator {
            files.extend([
                ("generator.tokenizer", &g.tokenizer),
                ("generator.text_encoder.file", &g.text_encoder.file),
                ("generator.unet.file", &g.unet.file),
                ("generator.vae_decoder.file", &g.vae_decoder.file),
            ]);
            if let Some(o) = &g.output_projector {
                files.push(("generator.output_projector.file", &o.file));
            }
        }
        files
    }

    fn validate(&self) -> Result<(), ManifestError> {
        for (key, file) in self.files() {
            if file.cache.is_some() == file.path.is_some() {
                return Err(self.invalid(key, "give exactly one of `cache = \"...\"` or `path = \"...\"`".into()));
            }
            if let Some(sha) = &file.sha256 {
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(self.invalid(key, format!("sha256 {sha:?} is not 64 hex digits")));
                }
            }
        }
        if self.llm.adapter_scope.is_scoped() && self.llm.adapter.is_none() {
            let scope = serde_json::to_string(&self.llm.adapter_scope).unwrap_or_default();
            return Err(self.invalid("llm.adapter_scope", format!("{scope} needs `llm.adapter`, and none is given")));
        }
        if self.llm.scene_model.is_some() && self.llm.adapter_scope != AdapterScope::Scene {
            let scope = serde_json::to_string(&self.llm.adapter_scope).unwrap_or_default();
            return Err(self.invalid(
                "llm.scene_model",
                format!(
                    "holds an adapter folded in for the scene prefix; expected `adapter_scope = \"scene\"` \
                     and the adapter it folds, got adapter_scope {scope}"
                ),
            ));
        }
        let enc = &self.encoder;
        let [height, width] = enc.preprocess.size;
        let dims = &enc.input_shape;
        let image_dims = match dims.len() {
            4 if dims[1] == 3 => &dims[2..],
            5 if dims[1] == 1 && dims[2] == 3 => &dims[3..],
            _ => {
                return Err(self.invalid(
                    "encoder.input_shape",
                    format!("expected [batch, 3, height, width] or [batch, 1, 3, height, width], got {dims:?}"),
                ))
            }
        };
        if image_dims != [i64::from(height), i64::from(width)] {
            return Err(self.invalid(
                "encoder.preprocess.size",
                format!("[{height}, {width}] does not match encoder.input_shape {:?}", enc.input_shape),
            ));
        }
        if height == 0 || width == 0 {
            return Err(self.invalid("encoder.preprocess.size", "sizes must be positive".into()));
        }
        if enc.preprocess.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(self
                .invalid("encoder.preprocess.std", format!("every value must be > 0, got {:?}", enc.preprocess.std)));
        }
        if enc.output_shape.len() != 3 {
            return Err(self.invalid(
                "encoder.output_shape",
                format!("expected [batch, tokens, width], got {:?}", enc.output_shape),
            ));
        }
        let [rows, cols] = enc.patch_grid;
        if enc.output_shape[1] != (enc.prefix_tokens + rows * cols) as i64 {
            return Err(self.invalid(
                "encoder.patch_grid",
                format!(
                    "{rows}x{cols} patches + {} prefix tokens = {} tokens, but encoder.output_shape says {}",
                    enc.prefix_tokens,
                    enc.prefix_tokens + rows * cols,
                    enc.output_shape[1]
                ),
            ));
        }
        match &self.projector {
            Some(proj) => {
                let [pool_rows, pool_cols] = proj.pool;
                if pool_rows == 0 || pool_cols == 0 || rows % pool_rows != 0 || cols % pool_cols != 0 {
                    return Err(self.invalid(
                        "projector.pool",
                        format!("{pool_rows}x{pool_cols} must evenly divide the patch grid {rows}x{cols}"),
                    ));
                }
                if proj.global_tokens > enc.prefix_tokens {
                    return Err(self.invalid(
                        "projector.global_tokens",
                        format!(
                            "{} leading tokens asked for, but the encoder has {} before its patch grid \
                             (encoder.prefix_tokens); expected at most that",
                            proj.global_tokens, enc.prefix_tokens
                        ),
                    ));
                }
                if enc.output_shape[2] != proj.in_width as i64 {
                    return Err(self.invalid(
                        "projector.in_width",
                        format!("{} differs from the encoder's feature width {}", proj.in_width, enc.output_shape[2]),
                    ));
                }
                if proj.out_width != self.llm.n_embd {
                    return Err(self.invalid(
                        "projector.out_width",
                        format!("{} differs from llm.n_embd {}", proj.out_width, self.llm.n_embd),
                    ));
                }
            }
            None if enc.output_shape[2] != self.llm.n_embd as i64 => {
                return Err(self.invalid(
                    "encoder.output_shape",
                    format!(
                        "without a [projector] the encoder's output is the image tokens, so its width must be \
                         llm.n_embd {}; it is {}",
                        self.llm.n_embd, enc.output_shape[2]
                    ),
                ))
            }
            None => {}
        }
        self.validate_detector()?;
        if let Some(g) = &self.generator {
            self.validate_generator(g)?;
        }
        if let Some(g) = &self.grounding {
            self.validate_grounding(g)?;
        }
        let chat = &self.llm.chat;
        match (chat.template.as_deref(), &chat.prefix, &chat.suffix) {
            (Some("gguf"), None, None) => {}
            (Some("gguf"), _, _) => {
                return Err(self.invalid(
                    "llm.chat.template",
                    "\"gguf\" takes the layout from the GGUF; remove prefix and suffix".into(),
                ))
            }
            (Some(other), _, _) => {
                return Err(
                    self.invalid("llm.chat.template", format!("{other:?} is not known; the one value is \"gguf\""))
                )
            }
            (None, Some(_), Some(suffix)) if suffix.contains("{question}") => {}
            (None, Some(_), Some(_)) => return Err(self.invalid("llm.chat.suffix", "must contain `{question}`".into())),
            (None, _, _) => {
                return Err(self.invalid("llm.chat", "give `prefix` and `suffix`, or `template = \"gguf\"`".into()))
            }
        }
        Ok(())
    }

    fn validate_grounding(&self, g: &GroundingSpec) -> Result<(), ManifestError> {
        let mut seen = std::collections::HashSet::new();
        for name in &g.categories {
            let plain =
                !name.is_empty() && name.split(' ').all(|w| !w.is_empty() && w.chars().all(char::is_alphanumeric));
            if !plain {
                return Err(self.invalid(
                    "grounding.categories",
                    format!("{name:?} is not a name of plain words (letters and digits, single spaces)"),
                ));
            }
            if !seen.insert(name.to_lowercase()) {
                return Err(self.invalid("grounding.categories", format!("{name:?} is listed twice")));
            }
        }
        if g.categories.is_empty() {
            return Err(self.invalid("grounding.categories", "expected at least one category".into()));
        }
        if !(g.threshold.is_finite() && (-1.0..=1.0).contains(&g.threshold)) {
            return Err(self.invalid("grounding.threshold", format!("{} is not a cosine in [-1, 1]", g.threshold)));
        }
        if g.nothing.trim().is_empty() {
            return Err(
                self.invalid("grounding.nothing", "expected the caption for a scene with no known object".into())
            );
        }
        // Both the second judge and the guide read the detector's columns that score the categories.
        let scored = self.category_columns(&g.categories).iter().any(Option::is_some);
        let needs_columns = |key: &'static str| {
            self.invalid(
                key,
                "expected a [detector] with `category_prefix` and a column named by it for some category".into(),
            )
        };
        if let Some(t) = g.classifier_threshold {
            if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
                return Err(self.invalid("grounding.classifier_threshold", format!("{t} is not a score in [0, 1]")));
            }
            if !scored {
                return Err(needs_columns("grounding.classifier_threshold"));
            }
        }
        if let Some(c) = g.classifier_exempt.iter().find(|c| !g.categories.contains(c)) {
            return Err(self.invalid(
                "grounding.classifier_exempt",
                format!(
                    "{c:?} is not one of `grounding.categories`; expected categories the classifier does not judge"
                ),
            ));
        }
        if !g.classifier_exempt.is_empty() && g.classifier_threshold.is_none() {
            return Err(self.invalid(
                "grounding.classifier_exempt",
                "exempts categories from a check there is not: expected a `classifier_threshold` too".into(),
            ));
        }
        if let Some(t) = g.guide_threshold {
            if !(t.is_finite() && t > 0.0 && t <= 1.0) {
                return Err(self.invalid("grounding.guide_threshold", format!("{t} is not a score in (0, 1]")));
            }
            if !scored {
                return Err(needs_columns("grounding.guide_threshold"));
            }
            if !g.guide.contains("{name}") {
                return Err(self.invalid(
                    "grounding.guide",
                    format!("{:?} does not name the category: expected a beginning with {{name}}, as \"There is {{a}} {{name}}\"", g.guide),
                ));
            }
            if g.guide_yes.trim().is_empty() {
                return Err(self
                    .invalid("grounding.guide_yes", "expected the word a yes answer begins with, as \"Yes\"".into()));
            }
        }
        if let Some((phrases, words)) = g.positions.as_ref().zip(g.position_words()) {
            if words.iter().any(String::is_empty)
                || words[0] == words[1]
                || words[1] == words[2]
                || words[0] == words[2]
            {
                return Err(self.invalid(
                    "grounding.positions",
                    format!("{phrases:?}: expected three phrases for left, centre and right whose last words differ, as [\"On the left\", \"In the centre\", \"On the right\"]"),
                ));
            }
            if self.cell_grid().is_none() {
                return Err(self.invalid(
                    "grounding.positions",
                    "expected a [projector], whose grid of cells places the objects".into(),
                ));
            }
        }
        if let Some(r) = g.region.filter(|r| !(r.is_finite() && (0.0..=1.0).contains(r))) {
            return Err(self.invalid(
                "grounding.region",
                format!("{r}: expected a fraction of the best cosine from 0 to 1, as 0.4"),
            ));
        }
        let [from, to] = g.centre;
        if !(from.is_finite() && to.is_finite() && 0.0 <= from && from < to && to <= 1.0) {
            return Err(self.invalid(
                "grounding.centre",
                format!("{:?}: expected [from, to] with 0 <= from < to <= 1, as [0.375, 0.625]", g.centre),
            ));
        }
        Ok(())
    }

    /// `[rows, columns]` of the image tokens that are grid cells: the projector's pooled grid,
    /// whose cells are the first image tokens, row by row. None without a projector.
    pub fn cell_grid(&self) -> Option<[usize; 2]> {
        self.projector.as_ref().map(|p| p.pool)
    }
    /// The detector's own class of each category, when it has one of that very name (COCO's
    /// "dog"; not a `category_prefix` column): where it scores the class most locates the category
    /// in the frame ([`crate::llm::Grounding::answer_guide`]). None without a detector.
    pub fn detector_class_columns(&self, categories: &[String]) -> Vec<Option<usize>> {
        let classes = self.detector.as_ref().map(|d| &d.classes);
        categories.iter().map(|c| classes.and_then(|classes| classes.iter().position(|k| k == c))).collect()
    }

    /// Per category, the detector's column that scores it (`detector.category_prefix`): None for
    /// every category without such a column, or without a detector or prefix.
    pub fn category_columns(&self, categories: &[String]) -> Vec<Option<usize>> {
        let columns = self.detector.as_ref().and_then(|d| Some((d.category_prefix.as_deref()?, &d.classes)));
        categories
            .iter()
            .map(|c| columns.and_then(|(prefix, classes)| classes.iter().position(|k| *k == format!("{prefix}{c}"))))
            .collect()
    }

    fn validate_detector(&self) -> Result<(), ManifestError> {
        let projector = self.projector.as_ref();
        let wired = projector.and_then(|p| p.detections_input.as_ref());
        let Some(det) = &self.detector else {
            if wired.is_some() || projector.is_some_and(|p| p.detection_tokens > 0) {
                return Err(self.invalid(
                    "projector.detections_input",
                    "the projector reads detections, but the manifest has no [detector]".into(),
                ));
            }
            return Ok(());
        };
        if wired.is_none() {
            return Err(self.invalid(
                "projector.detections_input",
                "the manifest has a [detector]; name the projector input that takes its scores".into(),
            ));
        }
        let [height, width] = det.preprocess.size;
        if det.input_shape != [1, 3, i64::from(height), i64::from(width)] || height == 0 || width == 0 {
            return Err(self.invalid(
                "detector.input_shape",
                format!("expected [1, 3, {height}, {width}] (detector.preprocess.size), got {:?}", det.input_shape),
            ));
        }
        if det.preprocess.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(self
                .invalid("detector.preprocess.std", format!("every value must be > 0, got {:?}", det.preprocess.std)));
        }
        if det.strides.is_empty() || det.strides.iter().any(|s| *s == 0 || height % s != 0 || width % s != 0) {
            return Err(self.invalid(
                "detector.strides",
                format!("each stride must divide the input size {height}x{width}, got {:?}", det.strides),
            ));
        }
        let anchors: u32 = det.strides.iter().map(|s| (height / s) * (width / s)).sum();
        let expected = [1, i64::from(anchors), det.classes.len() as i64];
        if det.output_shape != expected {
            return Err(self.invalid(
                "detector.output_shape",
                format!(
                    "expected {expected:?} ({anchors} anchor points of strides {:?}, {} classes), got {:?}",
                    det.strides,
                    det.classes.len(),
                    det.output_shape
                ),
            ));
        }
        Ok(())
    }

    fn validate_generator(&self, g: &GeneratorSpec) -> Result<(), ManifestError> {
        let positive = [
            ("generator.context_tokens", g.context_tokens),
            ("generator.text_width", g.text_width),
            ("generator.latent_channels", g.latent_channels),
            ("generator.vae_scale", g.vae_scale),
            ("generator.size_multiple", g.size_multiple),
            ("generator.steps", g.steps),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(self.invalid(key, "must be at least 1".into()));
            }
        }
        if !g.size_multiple.is_multiple_of(g.vae_scale) {
            return Err(self.invalid(
                "generator.size_multiple",
                format!("{} is not a multiple of generator.vae_scale {}", g.size_multiple, g.vae_scale),
            ));
        }
        if let Some(bad) = g.size.iter().find(|s| **s == 0 || **s % g.size_multiple != 0) {
            return Err(self.invalid(
                "generator.size",
                format!("{bad} is not a positive multiple of generator.size_multiple {}", g.size_multiple),
            ));
        }
        if !(g.latent_scaling.is_finite() && g.latent_scaling > 0.0) {
            return Err(
                self.invalid("generator.latent_scaling", format!("expected a number > 0, got {}", g.latent_scaling))
            );
        }
        if !g.guidance.is_finite() || g.guidance < 0.0 {
            return Err(self.invalid("generator.guidance", format!("expected a number >= 0, got {}", g.guidance)));
        }
        let s = &g.schedule;
        if s.num_train_timesteps < 2 || !(s.beta_start > 0.0 && s.beta_end < 1.0 && s.beta_start < s.beta_end) {
            return Err(self.invalid(
                "generator.schedule",
                "expected num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1".into(),
            ));
        }
        if g.output_projector.as_ref().is_some_and(|o| o.signal.trim().is_empty()) {
            return Err(self.invalid(
                "generator.output_projector.signal",
                "is empty; give the text whose hidden states condition the image".into(),
            ));
        }
        Ok(())
    }

    /// The number of image tokens one frame costs.
    pub fn n_image_tokens(&self) -> usize {
        match &self.projector {
            Some(p) => p.pool[0] * p.pool[1] + p.detection_tokens + p.global_tokens,
            None => self.encoder.patch_grid[0] * self.encoder.patch_grid[1],
        }
    }

    /// True when the stack cannot describe images: random test weights, or the untrained
    /// placeholder projector.
    pub fn untrained(&self) -> bool {
        self.random || self.projector.as_ref().is_some_and(|p| p.untrained)
    }

    /// The absolute location of a file reference, given the cache root.
    pub fn resolve(&self, file: &FileRef, cache_root: &Path) -> PathBuf {
        match (&file.cache, &file.path) {
            (Some(rel), _) => cache::models_dir(cache_root).join(rel),
            (None, Some(path)) if path.is_absolute() => path.clone(),
            (None, Some(path)) => self.base_dir.join(path),
            (None, None) => PathBuf::new(), // excluded by validate()
        }
    }
}

/// The training noise schedule of a Stable Diffusion model (from the manifest).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoiseSchedule {
    /// Training timesteps (1000).
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    /// β at the first timestep.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// β at the last timestep.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}

impl Default for NoiseSchedule {
    fn default() -> Self {
        NoiseSchedule { num_train_timesteps: 1000, beta_start: 0.00085, beta_end: 0.012 }
    }
}

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Euler with trailing timesteps (SD-Turbo's own scheduler; one step is the Turbo sampler).
    Euler,
    /// Latent consistency sampler.
    Lcm,
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SamplerKind::Euler => "euler",
            SamplerKind::Lcm => "lcm",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(edit: impl Fn(String) -> String) -> Result<Manifest, ManifestError> {
        Manifest::parse(&edit(REFERENCE_MANIFEST.to_owned()), "test.toml", Path::new("/m"))
    }

    /// Each case: an edit of `manifest` (replace the first `from` with `to`) and a fragment the
    /// error must contain.
    fn assert_edits_fail(manifest: &str, cases: &[(&str, &str, &str)]) {
        for (from, to, expect) in cases {
            assert!(manifest.contains(from), "fixture edit {from:?} no longer applies");
            let err =
                Manifest::parse(&manifest.replacen(from, to, 1), "test.toml", Path::new("/m")).unwrap_err().to_string();
            assert!(err.starts_with("manifest test.toml: "), "{err}");
            assert!(err.contains(expect), "expected {expect:?} in: {err}");
        }
    }

    #[test]
    fn reference_manifest_is_valid() {
        let m = Manifest::reference().unwrap();
        assert_eq!(m.n_image_tokens(), 64, "the detector's scores are fused into the 8 x 8 patch tokens");
        assert_eq!(
            m.detector.as_ref().map(|d| d.classes.len()),
            Some(80 + 83),
            "COCO's classes and the classifier's categories"
        );
        assert_eq!(m.projector.as_ref().and_then(|p| p.detections_input.as_deref()), Some("detections"));
        assert_eq!(m.projector.as_ref().map(|p| p.out_width), Some(m.llm.n_embd));
        let p = m.resolve(&m.llm.file, Path::new("/c"));
        assert_eq!(
            p,
            Path::new("/c/models/smollm2/SmolLM2-135M-Instruct.Q4_1.v15-base.gguf"),
            "the fetched GGUF's split 0, its other tensors in one further split"
        );
        assert_eq!(m.llm.splits.len(), 1);
        let g = m.generator.as_ref().expect("the reference stack has a generator");
        assert!(!g.random, "the shipped generator is the trained scenegen, not the random test model");
        assert_eq!((g.latent_channels, g.vae_scale, g.text_width, g.size), (48, 4, 128, [64, 64]));
        assert!(m.llm.adapter.is_some(), "the projector's adapter");
        assert_eq!(m.llm.adapter_scope, AdapterScope::Scene, "on the scene prefix only: decoding runs the base GGUF");
        assert!(m.llm.scene_model.is_some(), "the adapter folded into a scene model");
        assert_eq!(
            m.files().len(),
            12,
            "encoder, detector, projector, LLM (two splits), its adapter, the scene model and the generator's five"
        );
    }

    #[test]
    fn a_grounding_section_is_written_replaced_and_checked() {
        let spec = GroundingSpec {
            categories: ["dog", "teddy bear", "cat"].map(String::from).to_vec(),
            threshold: 0.1874,
            nothing: "No \"known\" object.".into(),
            classifier_threshold: None,
            classifier_exempt: Vec::new(),
            guide_threshold: None,
            guide: default_guide(),
            guide_yes: default_guide_yes(),
            positions: None,
            centre: default_centre(),
            region: None,
        };
        let section = spec.to_toml("Calibrated on two kinds.\n\nSecond line.");
        assert!(section.starts_with("[grounding]\n# Calibrated on two kinds.\n#\n# Second line.\n"), "{section}");
        let long = spec.to_toml(&"wordy ".repeat(40));
        assert!(
            long.lines().all(|l| l.len() <= 100) && long.lines().filter(|l| l.starts_with("# ")).count() == 3,
            "{long}"
        );
        // Without a section (comments at the end stay), then replacing it in place.
        let bare = with_grounding(REFERENCE_MANIFEST, "");
        let without = &bare[..bare.find("[grounding]").unwrap_or(bare.len())];
        let once = with_grounding(without, &section);
        let m = Manifest::parse(&once, "test.toml", Path::new("/m")).unwrap();
        let g = m.grounding.expect("written");
        assert_eq!((g.categories, g.threshold, g.nothing), (spec.categories.clone(), 0.1874, spec.nothing.clone()));
        assert!(!section.contains("classifier_threshold"), "written only when calibrated: {section}");
        let with_classifier = GroundingSpec { classifier_threshold: Some(0.00912), ..spec.clone() }.to_toml("C.");
        assert!(with_classifier.ends_with("classifier_threshold = 0.00912\n"), "{with_classifier}");
        let exempt = ["teddy bear", "cat"].map(String::from).to_vec();
        let with_exempt =
            GroundingSpec { classifier_threshold: Some(0.5), classifier_exempt: exempt.clone(), ..spec.clone() };
        let text = with_exempt.to_toml("E.");
        assert!(text.ends_with("classifier_exempt = [\"teddy bear\", \"cat\"]\n"), "{text}");
        let parsed = Manifest::parse(&with_grounding(without, &text), "test.toml", Path::new("/m")).unwrap();
        assert_eq!(parsed.grounding.expect("written").classifier_exempt, exempt);
        let other = GroundingSpec { threshold: 0.3, ..spec.clone() }.to_toml("Again.");
        let twice = with_grounding(&once, &other);
        assert_eq!(twice.matches("[grounding]").count(), 1, "{twice}");
        assert_eq!(Manifest::parse(&twice, "t", Path::new("/m")).unwrap().grounding.unwrap().threshold, 0.3);
        // A section followed by another table keeps that table and the comment that opens it.
        let middle = format!("{}\n# the generator\n[x]\n", section);
        let replaced = with_grounding(&middle, &other);
        assert!(replaced.ends_with("nothing = 'No \"known\" object.'\n\n# the generator\n[x]\n"), "{replaced}");
        let cases: &[(&str, &str, &str)] = &[
            ("\"teddy bear\", \"cat\"", "\"teddy bear\", \"dog\"", "`grounding.categories`: \"dog\" is listed twice"),
            (
                "\"teddy bear\", \"cat\"",
                "\"teddy bear\", \"hot-dog\"",
                "`grounding.categories`: \"hot-dog\" is not a name of plain words",
            ),
            ("threshold = 0.1874", "threshold = 1.5", "`grounding.threshold`: 1.5 is not a cosine in [-1, 1]"),
            ("nothing = ", "nothing = \"  \"\n#", "`grounding.nothing`: expected the caption"),
        ];
        assert_edits_fail(&once, cases);
        // The guide: written with its beginning, read back, and checked.
        let guided = GroundingSpec { guide_threshold: Some(0.99), ..spec.clone() }.to_toml("G.");
        assert!(
            guided.ends_with("guide_threshold = 0.99\nguide = \"There is {a} {name}\"\nguide_yes = \"Yes\"\n"),
            "{guided}"
        );
        let text = with_grounding(&once, &guided);
        let g = Manifest::parse(&text, "t", Path::new("/m")).unwrap().grounding.unwrap();
        assert_eq!((g.guide_threshold, g.guide_start("apple").as_str()), (Some(0.99), "There is an apple"));
        let cases: &[(&str, &str, &str)] = &[
            (
                "guide_threshold = 0.99",
                "guide_threshold = 0",
                "`grounding.guide_threshold`: 0 is not a score in (0, 1]",
            ),
            ("{a} {name}", "{a} thing", "`grounding.guide`: \"There is {a} thing\" does not name the category"),
            (
                "guide_yes = \"Yes\"",
                "guide_yes = \" \"",
                "`grounding.guide_yes`: expected the word a yes answer begins with",
            ),
        ];
        assert_edits_fail(&text, cases);
        // Positions: written, read back, and checked.
        let placed = ["On the left".to_owned(), "In the centre".to_owned(), "On the right".to_owned()];
        let placing = GroundingSpec { positions: Some(placed.clone()), ..spec.clone() }.to_toml("P.");
        assert!(
            placing.ends_with(
                "positions = [\"On the left\", \"In the centre\", \"On the right\"]\ncentre = [0.375, 0.625]\n"
            ),
            "{placing}"
        );
        let text = with_grounding(&once, &placing);
        let m = Manifest::parse(&text, "t", Path::new("/m")).unwrap();
        assert_eq!((m.grounding.clone().unwrap().positions, m.cell_grid()), (Some(placed.clone()), Some([8, 8])));
        let wide =
            Manifest::parse(&text.replace("centre = [0.375, 0.625]", "centre = [0.3, 0.7]"), "t", Path::new("/m"));
        assert_eq!(wide.unwrap().grounding.unwrap().centre, [0.3, 0.7]);
        // A region: written after the band, read back; none is the best cell alone.
        assert_eq!(m.grounding.clone().unwrap().region, None);
        let regional =
            GroundingSpec { positions: Some(placed.clone()), region: Some(0.4), ..spec.clone() }.to_toml("P.");
        assert!(regional.ends_with("centre = [0.375, 0.625]\nregion = 0.4\n"), "{regional}");
        let text = with_grounding(&once, &regional);
        assert_eq!(Manifest::parse(&text, "t", Path::new("/m")).unwrap().grounding.unwrap().region, Some(0.4));
        let cases: &[(&str, &str, &str)] = &[
            (
                "\"On the right\"]",
                "\"To the left\"]",
                "`grounding.positions`: [\"On the left\", \"In the centre\", \"To the left\"]: expected three phrases",
            ),
            (
                "centre = [0.375, 0.625]",
                "centre = [0.625, 0.375]",
                "`grounding.centre`: [0.625, 0.375]: expected [from, to] with 0 <= from < to <= 1",
            ),
            (
                "region = 0.4",
                "region = 1.5",
                "`grounding.region`: 1.5: expected a fraction of the best cosine from 0 to 1",
            ),
            ("region = 0.4", "region = -0.1", "`grounding.region`: -0.1: expected a fraction"),
        ];
        assert_edits_fail(&text, cases);
    }

    #[test]
    fn errors_name_the_key() {
        // Each case: an edit of the reference manifest and a fragment the error must contain.
        let cases: &[(&str, &str, &str)] = &[
            ("pool = [8, 8]", "pool = [5, 5]", "`projector.pool`: 5x5 must evenly divide the patch grid 16x16"),
            (
                "pool = [8, 8]",
                "pool = [8, 8]\nglobal_tokens = 2",
                "`projector.global_tokens`: 2 leading tokens asked for, but the encoder has 1",
            ),
            ("out_width = 576", "out_width = 640", "`projector.out_width`: 640 differs from llm.n_embd 576"),
            (
                "in_width = 384",
                "in_width = 768",
                "`projector.in_width`: 768 differs from the encoder's feature width 384",
            ),
            ("std = [0.229, 0.224, 0.225]", "std = [0.229, 0.0, 0.225]", "`encoder.preprocess.std`"),
            ("size = [224, 224]", "size = [256, 224]", "`encoder.preprocess.size`: [256, 224] does not match"),
            (
                "patch_grid = [16, 16]",
                "patch_grid = [14, 14]",
                "`encoder.patch_grid`: 14x14 patches + 1 prefix tokens = 197",
            ),
            ("prefix_tokens = 1", "prefix_tokens = 1\ncolour = \"red\"", "unknown field `colour`"),
            ("resize = \"squash\"", "resize = \"stretch\"", "unknown variant `stretch`"),
            ("n_embd = 576", "n_embd = \"wide\"", "n_embd"),
            ("suffix = \"\\n{question}", "suffix = \"\\n{query}", "`llm.chat.suffix`: must contain `{question}`"),
            ("stop = [", "template = \"jinja\"\nstop = [", "`llm.chat.template`: \"jinja\" is not known"),
            (
                "size = [64, 64]",
                "size = [60, 64]",
                "`generator.size`: 60 is not a positive multiple of generator.size_multiple 16",
            ),
            (
                "size_multiple = 16",
                "size_multiple = 18",
                "`generator.size_multiple`: 18 is not a multiple of generator.vae_scale 4",
            ),
            ("signal = \" Picture:\"", "signal = \" \"", "`generator.output_projector.signal`: is empty"),
            ("latent_scaling = 1.0", "latent_scaling = 0.0", "`generator.latent_scaling`: expected a number > 0"),
            ("sampler = \"euler\"", "sampler = \"ddim\"", "unknown variant `ddim`"),
            ("steps = 1\n", "steps = 0\n", "`generator.steps`: must be at least 1"),
        ];
        assert_edits_fail(REFERENCE_MANIFEST, cases);
    }

    /// NanoDet with the ImageNet classifier in one detector graph (projectors v14, v15).
    const IMAGENET_MANIFEST: &str = include_str!("../models/dinov2s-nanodet-imagenet.toml");

    #[test]
    fn the_classifier_columns_score_the_categories_and_their_threshold_is_checked() {
        let m = Manifest::parse(IMAGENET_MANIFEST, "test.toml", Path::new("/m")).unwrap();
        let det = m.detector.as_ref().expect("a detector");
        let names = ["cat", "deer", "teddy bear", "pliers"].map(String::from);
        // "imagenet cat" is column 80 + 1; "teddy bear" is a COCO class but no category column.
        let at = |c: &str| det.classes.iter().position(|k| k == c);
        assert_eq!(m.category_columns(&names), [Some(81), at("imagenet deer"), None, at("imagenet pliers")]);
        assert!(at("imagenet deer").is_some(), "every category has a column, zero where ImageNet has none");
        // Without the prefix (NanoDet alone, projector v4's stack) no category has a column.
        let coco = Manifest::parse(NANODET_MANIFEST, "test.toml", Path::new("/m")).unwrap();
        assert!(coco.category_columns(&names).iter().all(Option::is_none));
        // The reference reads the classifier (projector v15) and its check does too.
        let reference = Manifest::reference().unwrap();
        assert_eq!(reference.category_columns(&names), m.category_columns(&names));
        assert!(reference.grounding.and_then(|g| g.classifier_threshold).is_some());
        // The threshold in a [grounding] section.
        let checked = IMAGENET_MANIFEST
            .replace("nothing = \"No known object.\"", "nothing = \"No known object.\"\nclassifier_threshold = 0.009");
        assert_ne!(checked, IMAGENET_MANIFEST, "the fixture has a [grounding] to edit");
        let m = Manifest::parse(&checked, "test.toml", Path::new("/m")).unwrap();
        assert_eq!(m.grounding.and_then(|g| g.classifier_threshold), Some(0.009));
        let cases: &[(&str, &str, &str)] = &[
            (
                "classifier_threshold = 0.009",
                "classifier_threshold = 1.5",
                "`grounding.classifier_threshold`: 1.5 is not a score in [0, 1]",
            ),
            (
                "category_prefix = \"imagenet \"",
                "category_prefix = \"ImageNet \"",
                "`grounding.classifier_threshold`: expected a [detector] with `category_prefix`",
            ),
            (
                "classifier_threshold = 0.009",
                "classifier_threshold = 0.009\nclassifier_exempt = [\"cat\", \"unicorn\"]",
                "`grounding.classifier_exempt`: \"unicorn\" is not one of `grounding.categories`",
            ),
            (
                "classifier_threshold = 0.009",
                "classifier_exempt = [\"cat\"]",
                "`grounding.classifier_exempt`: exempts categories from a check there is not",
            ),
        ];
        assert_edits_fail(&checked, cases);
        let exempt = checked
            .replace("classifier_threshold = 0.009", "classifier_threshold = 0.009\nclassifier_exempt = [\"cat\"]");
        let m = Manifest::parse(&exempt, "test.toml", Path::new("/m")).unwrap();
        assert_eq!(m.grounding.unwrap().classifier_exempt, ["cat"]);
    }

    /// The projector-v4 stack: the reference plus the COCO detector as a second encoder.
    const NANODET_MANIFEST: &str = include_str!("../models/dinov2s-nanodet.toml");

    #[test]
    fn anchor_centres_follow_the_detectors_grids_row_major_finest_first() {
        let m = Manifest::reference().unwrap();
        let det = m.detector.as_ref().unwrap();
        let x = det.anchor_x();
        assert_eq!(x.len(), 52 * 52 + 26 * 26 + 13 * 13 + 8 * 8, "strides 8, 16, 32 and the classifier's 52 on 416");
        assert_eq!((x[0], x[51], x[52]), (4.0 / 416.0, 412.0 / 416.0, 4.0 / 416.0), "a row of stride 8, then the next");
        assert_eq!(x[2704], 8.0 / 416.0, "stride 16 begins");
        assert_eq!(*x.last().unwrap(), 390.0 / 416.0, "the classifier's last cell");
        // The detector's own classes of the categories' names: COCO's "dog", not "imagenet dog".
        let names = ["dog", "goat", "cup"].map(String::from);
        let dog = det.classes.iter().position(|c| c == "dog");
        let cup = det.classes.iter().position(|c| c == "cup");
        assert_eq!(m.detector_class_columns(&names), [dog, None, cup]);
        assert!(dog.is_some_and(|d| d < 80));
    }

    #[test]
    fn the_detector_stack_is_valid_and_its_errors_name_the_key() {
        let m = Manifest::parse(NANODET_MANIFEST, "test.toml", Path::new("/m")).unwrap();
        assert_eq!(m.n_image_tokens(), 64 + 3, "8 x 8 pooled patches and the detector's three strips");
        let det = m.detector.as_ref().expect("a detector");
        assert_eq!((det.classes.len(), det.preprocess.channels), (80, ChannelOrder::Bgr));
        assert_eq!(m.files().len(), 10, "encoder, detector, projector, LLM, its adapter and the generator's five");
        let cases: &[(&str, &str, &str)] = &[
            ("detections_input = \"detections\"\n", "", "`projector.detections_input`: the manifest has a [detector]"),
            ("strides = [8, 16, 32]", "strides = [8, 16, 30]", "`detector.strides`: each stride must divide"),
            (
                "output_shape = [1, 3549, 80]",
                "output_shape = [1, 3549, 81]",
                "`detector.output_shape`: expected [1, 3549, 80] (3549 anchor points of strides [8, 16, 32], 80 classes)",
            ),
            ("input_shape = [1, 3, 416, 416]", "input_shape = [1, 3, 320, 320]", "`detector.input_shape`: expected [1, 3, 416, 416]"),
            ("channels = \"bgr\"", "channels = \"bgra\"", "unknown variant `bgra`"),
            ("[detector]\n", "[unused]\n", "unknown field `unused`"),
        ];
        assert_edits_fail(NANODET_MANIFEST, cases);
        // A projector that fuses the detections into the patch tokens adds none.
        let fused = NANODET_MANIFEST.replace("detection_tokens = 3", "detection_tokens = 0");
        let m = Manifest::parse(&fused, "test.toml", Path::new("/m")).unwrap();
        assert_eq!(m.n_image_tokens(), 64, "the detections fused into the 8 x 8 patch tokens");
        let global = fused.replace("detection_tokens = 0", "detection_tokens = 0\nglobal_tokens = 1");
        let m = Manifest::parse(&global, "test.toml", Path::new("/m")).unwrap();
        assert_eq!(m.n_image_tokens(), 64 + 1, "the cells and the CLS token");
        // A projector that reads detections without a detector.
        let start = NANODET_MANIFEST.find("\n[detector]\n").unwrap();
        let end = NANODET_MANIFEST.find("\n[llm]\n").unwrap();
        let without = format!("{}{}", &NANODET_MANIFEST[..start], &NANODET_MANIFEST[end..]);
        let err = Manifest::parse(&without, "test.toml", Path::new("/m")).unwrap_err().to_string();
        assert!(
            err.contains(
                "`projector.detections_input`: the projector reads detections, but the manifest has no [detector]"
            ),
            "{err}"
        );
    }

    #[test]
    fn path_files_resolve_against_the_manifest_dir() {
        let m = with(|t| {
            t.replacen(
                "file = { cache = \"projector/dinov2s-nanodet-imagenet-smollm2-v15.onnx\"",
                "file = { path = \"proj.onnx\"",
                1,
            )
        })
        .unwrap();
        assert_eq!(m.resolve(&m.projector.as_ref().unwrap().file, Path::new("/c")), Path::new("/m/proj.onnx"));
        let err = with(|t| {
            t.replacen("file = { cache = \"dinov2s/encoder.onnx\"", "file = { cache = \"a\", path = \"b\"", 1)
        })
        .unwrap_err();
        assert!(err.to_string().contains("`encoder.file`: give exactly one of"), "{err}");
        let err = with(|t| {
            let line = t.lines().find(|l| l.starts_with("adapter = ")).unwrap().to_owned();
            t.replacen(&line, "adapter = { path = \"a.gguf\", cache = \"b.gguf\" }", 1)
        })
        .unwrap_err();
        assert!(err.to_string().contains("`llm.adapter`: give exactly one of"), "{err}");
    }

    #[test]
    fn an_adapter_scope_is_all_by_default_and_a_scoped_one_needs_an_adapter() {
        // The reference names its adapter with a scope (`adapter_scope = "…"`).
        let scope_line = |t: &str| t.lines().find(|l| l.starts_with("adapter_scope = ")).unwrap().to_owned();
        let scoped = |t: String, scope: &str| {
            let line = scope_line(&t);
            t.replacen(&format!("\n{line}\n"), &format!("\nadapter_scope = \"{scope}\"\n"), 1)
        };
        let no_scene_model = |t: String| {
            let line = t.lines().find(|l| l.starts_with("scene_model = ")).unwrap();
            t.replacen(&format!("{line}\n"), "", 1)
        };
        assert!(with(|t| t).unwrap().llm.adapter_scope.is_scoped());
        let unscoped = with(|t| {
            let line = scope_line(&t);
            no_scene_model(t.replacen(&format!("\n{line}\n"), "\n", 1))
        })
        .unwrap();
        assert_eq!(unscoped.llm.adapter_scope, AdapterScope::All, "the default");
        assert!(unscoped.llm.adapter.is_some());
        let no_adapter = |t: String| {
            let line = t.lines().find(|l| l.starts_with("adapter = ")).unwrap();
            t.replacen(&format!("{line}\n"), "", 1)
        };
        for (name, scope) in
            [("scene", AdapterScope::Scene), ("prompt", AdapterScope::Prompt), ("questions", AdapterScope::Questions)]
        {
            assert_eq!(with(|t| no_scene_model(scoped(t, name))).unwrap().llm.adapter_scope, scope);
            let err = with(|t| no_adapter(no_scene_model(scoped(t, name)))).unwrap_err();
            let expected = format!("`llm.adapter_scope`: \"{name}\" needs `llm.adapter`");
            assert!(err.to_string().contains(&expected), "{err}");
        }
        // A scene model folds an adapter computed on the scene prefix only: no other scope.
        for name in ["all", "prompt", "questions"] {
            let err = with(|t| scoped(t, name)).unwrap_err().to_string();
            let expected = format!("`llm.scene_model`: holds an adapter folded in for the scene prefix; expected `adapter_scope = \"scene\"` and the adapter it folds, got adapter_scope \"{name}\"");
            assert!(err.contains(&expected), "{err}");
        }
        let err = with(|t| scoped(t, "image")).unwrap_err();
        assert!(err.to_string().contains("adapter_scope"), "{err}");
    }
}

//! Evaluation of a model stack through the shipped runtime: the ONNX encoder and projector and the
//! quantized GGUF on llama.cpp, exactly as the daemon runs them.
//!
//! An evaluation set is a JSON file (written by `models/train_projector.py`): the category names,
//! the caption prompt, and scenes, each an image with the objects it shows and questions with their
//! expected answers. Scoring is plain text matching, so it needs nothing model-specific:
//! - captions: a category counts as named when its name (or plural) appears as a word; object
//!   precision and recall are over named vs. shown categories;
//! - yes/no questions: the first word of the answer;
//! - position questions: the first of left/right/centre (center, middle) in the answer.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::frame::{ImageError, RgbImage};
use crate::llm::{classifier_support, mentions, name_directions, stated_sides, support, Backbone, GuideKind};
use crate::pipeline::{Pipeline, StackError};
use crate::vision::ImageTokens;

/// What can go wrong while evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The set file cannot be read or parsed.
    #[error("evaluation set {path}: {reason}")]
    Set {
        /// The set file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A kind of scene asked for that the set does not have.
    #[error("no scene of kind {kind:?} in the evaluation set; it has {has}")]
    Kind {
        /// The kind asked for.
        kind: String,
        /// The kinds the set has, comma-separated.
        has: String,
    },
    /// No caption of the calibration scenes named a category they show.
    #[error(
        "none of the {scenes} calibration captions named a category its scene shows, so there is nothing to \
         calibrate on; expected scenes of objects the projector trained on (kinds photo, heldout-pair)"
    )]
    NothingToCalibrate {
        /// The scenes captioned.
        scenes: usize,
    },
    /// A scene's image cannot be opened.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The model stack failed.
    #[error(transparent)]
    Stack(#[from] StackError),
}

/// An evaluation set.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalSet {
    /// Its name (the projector it was made for).
    #[serde(default)]
    pub name: String,
    /// Every category the model was trained on: the words that captions are searched for.
    pub categories: Vec<String>,
    /// The prompt captions are asked with.
    pub caption_prompt: String,
    /// The scenes.
    pub scenes: Vec<Scene>,
}

/// One image, what it shows, and what to ask about it.
#[derive(Debug, Clone, Deserialize)]
pub struct Scene {
    /// Image path, absolute or relative to the set file.
    pub image: PathBuf,
    /// A group name the report keeps apart (`heldout-pair`, `empty`, `photo`, …).
    pub kind: String,
    /// Categories shown.
    pub objects: Vec<String>,
    /// Questions with expected answers.
    #[serde(default)]
    pub questions: Vec<Question>,
}

/// A question and its expected answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Question {
    /// `yesno` (expect `yes`/`no`) or `position` (expect `left`/`centre`/`right`).
    pub kind: String,
    /// The question as asked.
    pub question: String,
    /// The expected answer.
    pub expect: String,
}

impl EvalSet {
    /// Reads a set; relative image paths become relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, EvalError> {
        let bad = |reason: String| EvalError::Set { path: path.to_owned(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut set: EvalSet = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if set.categories.is_empty() || set.scenes.is_empty() {
            return Err(bad("expected at least one category and one scene".into()));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for scene in &mut set.scenes {
            if scene.image.is_relative() {
                scene.image = base.join(&scene.image);
            }
            for q in &scene.questions {
                let known = match q.kind.as_str() {
                    "yesno" | "lookalike" => matches!(q.expect.as_str(), "yes" | "no"),
                    "position" => matches!(q.expect.as_str(), "left" | "centre" | "right"),
                    _ => false,
                };
                if !known {
                    return Err(bad(format!(
                        "question {:?}: kind {:?} expecting {:?}; expected kind yesno or lookalike (yes/no), or position (left/centre/right)",
                        q.question, q.kind, q.expect
                    )));
                }
            }
        }
        Ok(set)
    }

    /// Keeps only the scenes of the given kinds (`scenecast eval --kind`); the set's name gains
    /// them. A kind that no scene has is refused with the kinds the set has.
    pub fn keep_kinds(&mut self, kinds: &[String]) -> Result<(), EvalError> {
        if kinds.is_empty() {
            return Ok(());
        }
        let has: std::collections::BTreeSet<&str> = self.scenes.iter().map(|s| s.kind.as_str()).collect();
        if let Some(missing) = kinds.iter().find(|k| !has.contains(k.as_str())) {
            let has: Vec<&str> = has.into_iter().collect();
            return Err(EvalError::Kind { kind: missing.clone(), has: has.join(", ") });
        }
        self.scenes.retain(|s| kinds.contains(&s.kind));
        self.name = format!("{} ({})", self.name, kinds.join(", "));
        Ok(())
    }
}

/// `Some(true)` for an answer that starts with "yes", `Some(false)` for "no", else `None`.
pub fn yes_no(text: &str) -> Option<bool> {
    let first = text.split(|c: char| !c.is_alphanumeric()).find(|w| !w.is_empty())?.to_lowercase();
    match first.as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// The first position word in `text`, normalised to `left`, `centre` or `right`.
pub fn position(text: &str) -> Option<&'static str> {
    text.split(|c: char| !c.is_alphanumeric()).find_map(|w| match w.to_lowercase().as_str() {
        "left" => Some("left"),
        "right" => Some("right"),
        "centre" | "center" | "middle" => Some("centre"),
        _ => None,
    })
}

/// The most tokens a caption or answer may take during evaluation.
pub const MAX_ANSWER_TOKENS: usize = 48;

/// Counts for one group of scenes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Scenes.
    pub scenes: usize,
    /// Shown categories that the caption named.
    pub true_positives: usize,
    /// Named categories that were not shown.
    pub false_positives: usize,
    /// Shown categories that the caption did not name.
    pub false_negatives: usize,
    /// Scenes whose caption named every shown category and nothing else.
    pub exact: usize,
    /// Scenes whose caption named no category (right for scenes of nothing known).
    pub named_nothing: usize,
    /// Scenes that showed something and whose caption named every shown category (other names
    /// allowed): "names both objects" for a two-object scene.
    pub all_named: usize,
    /// Yes/no questions answered correctly, of `yesno_total`.
    pub yesno_correct: usize,
    /// Yes/no questions asked.
    pub yesno_total: usize,
    /// Position questions answered correctly, of `position_total`.
    pub position_correct: usize,
    /// Position questions asked.
    pub position_total: usize,
    /// Lookalike questions answered correctly, of `lookalike_total`: presence questions about the
    /// known category nearest to an unknown thing shown ("Is there a deer?" about a giraffe,
    /// kind `lookalike` in the set), kept out of the yes/no counts.
    pub lookalike_correct: usize,
    /// Lookalike questions asked.
    pub lookalike_total: usize,
    /// Sides the caption states right ("a goat on the left", [`stated_sides`]), of
    /// `caption_side_total`: for each object a position question asks about, the first side the
    /// caption gives it, against that question's answer.
    pub caption_side_correct: usize,
    /// Objects asked about by position questions whose side the caption states.
    pub caption_side_total: usize,
}

fn ratio(n: usize, d: usize) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

impl Tally {
    /// Of the categories named, the share that were shown (`None` when nothing was named).
    pub fn precision(&self) -> Option<f64> {
        ratio(self.true_positives, self.true_positives + self.false_positives)
    }
    /// Of the categories shown, the share that were named.
    pub fn recall(&self) -> Option<f64> {
        ratio(self.true_positives, self.true_positives + self.false_negatives)
    }
    /// Share of yes/no questions answered correctly.
    pub fn yesno_accuracy(&self) -> Option<f64> {
        ratio(self.yesno_correct, self.yesno_total)
    }
    /// Share of position questions answered correctly.
    pub fn position_accuracy(&self) -> Option<f64> {
        ratio(self.position_correct, self.position_total)
    }
    fn add(&mut self, other: &Tally) {
        self.scenes += other.scenes;
        self.true_positives += other.true_positives;
        self.false_positives += other.false_positives;
        self.false_negatives += other.false_negatives;
        self.exact += other.exact;
        self.named_nothing += other.named_nothing;
        self.all_named += other.all_named;
        self.yesno_correct += other.yesno_correct;
        self.yesno_total += other.yesno_total;
        self.position_correct += other.position_correct;
        self.position_total += other.position_total;
        self.lookalike_correct += other.lookalike_correct;
        self.lookalike_total += other.lookalike_total;
        self.caption_side_correct += other.caption_side_correct;
        self.caption_side_total += other.caption_side_total;
    }
}

/// What the model said about one scene, and how it scored.
#[derive(Debug, Clone, Serialize)]
pub struct SceneResult {
    /// The image.
    pub image: PathBuf,
    /// Its group.
    pub kind: String,
    /// Categories shown.
    pub objects: Vec<String>,
    /// The caption, as the stack publishes it.
    pub caption: String,
    /// The caption as the LLM wrote it, when the check by the image tokens (the manifest's
    /// `[grounding]`) changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unchecked: Option<String>,
    /// Categories the caption named.
    pub named: Vec<String>,
    /// (question, answer, correct) for each question.
    pub answers: Vec<(String, String, bool)>,
    /// This scene's counts.
    pub tally: Tally,
    /// Its counts with the caption as the LLM wrote it (equal to `tally` when the check changed
    /// nothing).
    pub unchecked_tally: Tally,
    /// Per category of the set (in its order): how strongly some image token points at the
    /// category's name, the largest cosine of an image token with the name's direction
    /// ([`name_directions`]), the similarity the projector's grounding loss trains. What a
    /// check of captions by the image tokens reads (`llm::Grounding`; models/experiments/grounded_filter.py).
    pub support: Vec<f32>,
    /// Per category of the set, with a detector that scores the categories itself
    /// (`detector.category_prefix`): its best score of the category in the scene (None: no score).
    /// Empty without such a detector.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classifier: Vec<Option<f32>>,
    /// The category a guided caption was begun with (`grounding.guide_threshold`): the first
    /// caption named nothing the checks kept, and the detector's category columns were sure of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guided: Option<String>,
    /// The categories the caption was placed again for (`grounding.positions`): the LLM put them
    /// on another side than the detector's class of their name or their image tokens do.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<String>,
    /// The questions answered again begun by a guide (`Grounding::answer_guide`: yes for a
    /// presence question whose category the detector's category columns are sure of or the
    /// scene's caption names, the side the detector's class of its name or the image tokens place
    /// the object on for a position question); `answers` has the answers that stand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guided_answers: Vec<GuidedAnswer>,
}

/// A question whose answer a guide began ([`SceneResult::guided_answers`]).
#[derive(Debug, Clone, Serialize)]
pub struct GuidedAnswer {
    /// The question.
    pub question: String,
    /// Its kind in the set (`yesno`, `lookalike`, `position`).
    pub kind: String,
    /// What began it: the detector's category columns (`presence`), the scene's caption
    /// (`named`), or where the object is (`position`).
    pub by: GuideKind,
    /// The LLM's own answer, before the guide.
    pub written: String,
    /// Whether that answer was right.
    pub written_right: bool,
}

/// Whether `answer` is right for `q`.
fn right(q: &Question, answer: &str) -> bool {
    match q.kind.as_str() {
        "yesno" | "lookalike" => yes_no(answer) == Some(q.expect == "yes"),
        _ => position(answer) == Some(q.expect.as_str()),
    }
}

/// Scores one scene from its caption and its answers (in the order of `scene.questions`).
pub fn score(
    scene: &Scene,
    categories: &[String],
    caption: &str,
    answers: &[String],
) -> (Vec<String>, Vec<bool>, Tally) {
    let named: Vec<String> = mentions(caption, categories).into_iter().map(str::to_owned).collect();
    let shown = |n: &String| scene.objects.contains(n);
    let mut tally = Tally { scenes: 1, ..Tally::default() };
    tally.true_positives = named.iter().filter(|n| shown(n)).count();
    tally.false_positives = named.len() - tally.true_positives;
    let mut distinct = scene.objects.clone();
    distinct.sort();
    distinct.dedup();
    tally.false_negatives = distinct.iter().filter(|o| !named.contains(o)).count();
    tally.exact = usize::from(tally.false_positives == 0 && tally.false_negatives == 0);
    tally.named_nothing = usize::from(named.is_empty());
    tally.all_named = usize::from(!distinct.is_empty() && tally.false_negatives == 0);
    let stated = stated_sides(caption, categories);
    for q in scene.questions.iter().filter(|q| q.kind == "position") {
        let asked = crate::llm::position(&q.question, categories);
        let Some(&(_, side)) = stated.iter().find(|(name, _)| Some(*name) == asked) else { continue };
        tally.caption_side_total += 1;
        tally.caption_side_correct += usize::from(["left", "centre", "right"][side] == q.expect);
    }
    let mut correct = Vec::with_capacity(answers.len());
    for (q, a) in scene.questions.iter().zip(answers) {
        let ok = right(q, a);
        let (asked, answered_right) = match q.kind.as_str() {
            "yesno" => (&mut tally.yesno_total, &mut tally.yesno_correct),
            "lookalike" => (&mut tally.lookalike_total, &mut tally.lookalike_correct),
            _ => (&mut tally.position_total, &mut tally.position_correct),
        };
        *asked += 1;
        *answered_right += usize::from(ok);
        correct.push(ok);
    }
    (named, correct, tally)
}

/// Runs every scene through the pipeline: a caption, then each question against the same cached
/// scene prefix. `progress` sees each result as it is made.
pub fn run(
    set: &EvalSet,
    pipeline: &mut Pipeline,
    progress: &mut dyn FnMut(usize, &SceneResult),
) -> Result<Vec<SceneResult>, EvalError> {
    let mut tokens = ImageTokens::default();
    // Options carry a deadline, so each request gets fresh ones; answers are short, and a cap keeps
    // a runaway answer from costing minutes.
    let options = |b: &Backbone| {
        let mut o = b.default_options();
        o.max_tokens = o.max_tokens.min(MAX_ANSWER_TOKENS);
        o
    };
    let directions = name_directions(&pipeline.backbone, &set.categories).map_err(StackError::from)?;
    let columns = pipeline.manifest.category_columns(&set.categories);
    let scored = columns.iter().any(Option::is_some);
    let mut results = Vec::with_capacity(set.scenes.len());
    for (i, scene) in set.scenes.iter().enumerate() {
        let image = RgbImage::open(&scene.image)?;
        pipeline.set_scene(i as u64, &image, &mut tokens)?;
        let support = support(&tokens, &directions);
        let classifier = if scored { classifier_support(&tokens, &columns) } else { Vec::new() };
        let backbone = &mut pipeline.backbone;
        let o = options(backbone);
        let described = backbone.describe(&set.caption_prompt, &o, &mut |_| true).map_err(StackError::from)?;
        let unchecked = (described.as_written() != described.text).then(|| described.as_written().to_owned());
        let guided = described.guided.map(|g| g.guide.category);
        let moved = described.moved.map(|m| m.categories).unwrap_or_default();
        let caption = described.text;
        let mut answers = Vec::with_capacity(scene.questions.len());
        let mut guided_answers = Vec::new();
        for q in &scene.questions {
            let o = options(backbone);
            let g = backbone.ask(&q.question, &o, &mut |_| true).map_err(StackError::from)?;
            if let Some(guided) = g.guided {
                guided_answers.push(GuidedAnswer {
                    question: q.question.clone(),
                    kind: q.kind.clone(),
                    by: guided.guide.kind,
                    written_right: right(q, &guided.written),
                    written: guided.written,
                });
            }
            answers.push(g.text);
        }
        let (named, correct, tally) = score(scene, &set.categories, &caption, &answers);
        let unchecked_tally = match &unchecked {
            Some(text) => score(scene, &set.categories, text, &answers).2,
            None => tally.clone(),
        };
        let answers =
            scene.questions.iter().zip(answers).zip(correct).map(|((q, a), ok)| (q.question.clone(), a, ok)).collect();
        let result = SceneResult {
            image: scene.image.clone(),
            kind: scene.kind.clone(),
            objects: scene.objects.clone(),
            caption,
            unchecked,
            named,
            answers,
            tally,
            unchecked_tally,
            support,
            classifier,
            guided,
            moved,
            guided_answers,
        };
        progress(i, &result);
        results.push(result);
    }
    Ok(results)
}

/// The threshold of the caption check by the image tokens, calibrated on scenes of objects the
/// projector trained on (see [`calibrate`]).
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// The least support that keeps `keep` of the correctly named categories.
    pub threshold: f32,
    /// The share of correct names it keeps.
    pub keep: f64,
    /// Correctly named categories (shown and named) the threshold is taken over.
    pub correct: usize,
    /// Named categories that were not shown.
    pub wrong: usize,
    /// Of `wrong`, how many fall below the threshold.
    pub wrong_removed: usize,
    /// Scenes of unknown things whose best score set the threshold against the correct names
    /// (0: the threshold keeps the share `keep` asked for).
    pub unknown: usize,
    /// Of `unknown`, the scenes where no category scores as much as the threshold.
    pub unknown_removed: usize,
}

/// The caption check's thresholds (see [`calibrate`]).
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    /// By the image tokens.
    pub tokens: Calibration,
    /// By the detector's own scores of the categories (`detector.category_prefix`), over the
    /// names that have a score and that the image tokens keep; None without such a detector.
    pub classifier: Option<Calibration>,
    /// With unknown scenes: the categories `classifier` does not judge, whose median score on the
    /// (at least [`MIN_EXEMPT_SCENES`]) scenes showing them, of the classifier's kinds, is below its
    /// threshold.
    pub classifier_exempt: Vec<String>,
}

/// Captions every scene of `set` (through [`Backbone::describe`], as the LLM writes them, before
/// any check) and takes the support of each category a caption names correctly; the threshold is
/// the highest that keeps `keep` of them. With a detector that scores the categories itself
/// (`detector.category_prefix`), the same again for its scores, over the names the image tokens
/// keep, over the names of the scenes of `classifier_kinds` only (all of them when it is empty).
/// With scenes of `unknown_kinds` (photos of things outside the vocabulary, e.g. `unknown-photo`),
/// the detector's threshold is instead the one that best tells those names from the unknown
/// scenes: each unknown scene counts by its best score of any category not exempt (below), and
/// the threshold is the score that keeps the largest share of the correct names less the share of
/// unknown scenes it lets through (Youden's J; [`separating_threshold`]). A category shown by at
/// least [`MIN_EXEMPT_SCENES`] scenes (of `classifier_kinds`) whose median score there is below
/// that threshold is one the classifier does not recognise: it is exempt from the detector's
/// check, and the threshold is taken again without it, until the exempt categories stay the same.
/// Unknown scenes are not captioned. Run it on scenes the projector trained on (`photo`,
/// `heldout-pair`, `unknown-photo`), never on the held-out rows it is measured on.
pub fn calibrate(
    set: &EvalSet,
    pipeline: &mut Pipeline,
    keep: f64,
    classifier_kinds: &[String],
    unknown_kinds: &[String],
    progress: &mut dyn FnMut(usize),
) -> Result<Thresholds, EvalError> {
    let directions = name_directions(&pipeline.backbone, &set.categories).map_err(StackError::from)?;
    let columns = pipeline.manifest.category_columns(&set.categories);
    let mut tokens = ImageTokens::default();
    // Each name a caption wrote: whether the scene shows it, its token support, its detector score
    // (None too where the scene's kind does not calibrate the classifier's threshold).
    let mut names: Vec<Name> = Vec::new();
    // Each unknown scene's detector scores of the categories.
    let mut unknown: Vec<Vec<Option<f32>>> = Vec::new();
    // Per category, its detector scores in the scenes (of the classifier's kinds) that show it.
    let mut shown: Vec<Vec<f32>> = vec![Vec::new(); set.categories.len()];
    for (i, scene) in set.scenes.iter().enumerate() {
        let image = RgbImage::open(&scene.image)?;
        pipeline.set_scene(i as u64, &image, &mut tokens)?;
        let classifier = classifier_support(&tokens, &columns);
        if unknown_kinds.contains(&scene.kind) {
            unknown.push(classifier);
            progress(i);
            continue;
        }
        let support = support(&tokens, &directions);
        let backbone = &mut pipeline.backbone;
        let mut o = backbone.default_options();
        o.max_tokens = o.max_tokens.min(MAX_ANSWER_TOKENS);
        let g = backbone.describe(&set.caption_prompt, &o, &mut |_| true).map_err(StackError::from)?;
        let caption = g.as_written();
        let judged = classifier_kinds.is_empty() || classifier_kinds.contains(&scene.kind);
        for name in mentions(caption, &set.categories) {
            let at = set.categories.iter().position(|c| c == name).expect("a mention is a category");
            let score = classifier[at].filter(|_| judged);
            names.push(Name { shown: scene.objects.iter().any(|o| o == name), support: support[at], score, at });
        }
        if judged {
            for object in &scene.objects {
                if let Some(at) = set.categories.iter().position(|c| c == object) {
                    shown[at].extend(classifier[at]);
                }
            }
        }
        progress(i);
    }
    let split = |names: &mut dyn Iterator<Item = (bool, f32)>| -> (Vec<f32>, Vec<f32>) {
        let (right, wrong): (Vec<_>, Vec<_>) = names.partition(|(shown, _)| *shown);
        (right.into_iter().map(|n| n.1).collect(), wrong.into_iter().map(|n| n.1).collect())
    };
    let (mut right, wrong) = split(&mut names.iter().map(|n| (n.shown, n.support)));
    let tokens =
        threshold(&mut right, &wrong, keep).ok_or(EvalError::NothingToCalibrate { scenes: set.scenes.len() })?;
    // The names the classifier judges: those the tokens keep, with a score, of categories not exempt.
    let judged_names = |exempt: &[usize]| {
        let kept = names.iter().filter(|n| n.support >= tokens.threshold && !exempt.contains(&n.at));
        split(&mut kept.filter_map(|n| Some((n.shown, n.score?))))
    };
    if !columns.iter().any(Option::is_some) {
        return Ok(Thresholds { tokens, classifier: None, classifier_exempt: Vec::new() });
    }
    if unknown.is_empty() {
        let (mut right, wrong) = judged_names(&[]);
        return Ok(Thresholds {
            tokens,
            classifier: threshold(&mut right, &wrong, keep),
            classifier_exempt: Vec::new(),
        });
    }
    // Against unknown scenes: the separating threshold, then the categories the classifier does
    // not recognise at it on the scenes that show them are exempt, and the threshold is taken
    // again without them, until the exempt categories stay the same.
    let median = |scores: &[f32]| {
        let mut s = scores.to_vec();
        s.sort_by(f32::total_cmp);
        s.get(s.len() / 2).copied()
    };
    let mut exempt: Vec<usize> = Vec::new();
    let mut classifier = None;
    for round in 0..10 {
        let (right, wrong) = judged_names(&exempt);
        let best: Vec<f32> = unknown
            .iter()
            .map(|scores| {
                let scored = scores.iter().enumerate().filter(|(at, _)| !exempt.contains(at));
                scored.filter_map(|(_, s)| *s).fold(0.0, f32::max)
            })
            .collect();
        classifier = separating_threshold(&right, &wrong, &best);
        let Some(t) = classifier.as_ref().map(|c| c.threshold) else { break };
        let again: Vec<usize> = (0..shown.len())
            .filter(|&at| shown[at].len() >= MIN_EXEMPT_SCENES && median(&shown[at]).is_some_and(|m| m < t))
            .collect();
        // The last round keeps the threshold it took with the exempt categories it took it without.
        if again == exempt || round == 9 {
            break;
        }
        exempt = again;
    }
    let classifier_exempt = exempt.iter().map(|&at| set.categories[at].clone()).collect();
    Ok(Thresholds { tokens, classifier, classifier_exempt })
}

/// The fewest scenes showing a category (of the classifier's kinds) that can exempt it from the
/// classifier's check: one photo the classifier misreads says little about the category.
const MIN_EXEMPT_SCENES: usize = 2;

/// A category a caption named, as calibration reads it.
struct Name {
    /// Whether the scene shows it.
    shown: bool,
    /// Its support by the image tokens.
    support: f32,
    /// Its detector score (None without one, or where the scene's kind does not calibrate it).
    score: Option<f32>,
    /// Its index among the set's categories.
    at: usize,
}

/// The threshold that best tells the `right` scores from the `unknown` ones: the score (one of
/// theirs) that maximises the share of `right` at or above it less the share of `unknown` at or
/// above it; of equals, the lowest (it keeps the most). None when `right` is empty.
fn separating_threshold(right: &[f32], wrong: &[f32], unknown: &[f32]) -> Option<Calibration> {
    if right.is_empty() {
        return None;
    }
    let share = |scores: &[f32], t: f32| scores.iter().filter(|s| **s >= t).count() as f64 / scores.len().max(1) as f64;
    let mut candidates: Vec<f32> = right.iter().chain(unknown).copied().collect();
    candidates.sort_by(f32::total_cmp);
    let mut best = (f64::MIN, 0.0);
    for t in candidates {
        let j = share(right, t) - share(unknown, t);
        if j > best.0 {
            best = (j, t);
        }
    }
    let threshold = best.1;
    Some(Calibration {
        threshold,
        keep: share(right, threshold),
        correct: right.len(),
        wrong: wrong.len(),
        wrong_removed: wrong.iter().filter(|s| **s < threshold).count(),
        unknown: unknown.len(),
        unknown_removed: unknown.iter().filter(|s| **s < threshold).count(),
    })
}

/// The highest threshold that keeps `keep` of `right` (None when it is empty).
fn threshold(right: &mut [f32], wrong: &[f32], keep: f64) -> Option<Calibration> {
    right.sort_by(f32::total_cmp);
    let at = ((1.0 - keep.clamp(0.0, 1.0)) * right.len() as f64).floor() as usize;
    let threshold = *right.get(at.min(right.len().checked_sub(1)?))?;
    Some(Calibration {
        threshold,
        keep,
        correct: right.len(),
        wrong: wrong.len(),
        wrong_removed: wrong.iter().filter(|s| **s < threshold).count(),
        unknown: 0,
        unknown_removed: 0,
    })
}

/// The report's lines on answers a guide began (empty when there are none): per question kind,
/// how many, how many of them are right, and how many the LLM's own answers had right, per scene
/// kind.
fn guided_answers(results: &[SceneResult]) -> String {
    let mut s = String::new();
    for (kind, by, what) in [
        (
            "yesno",
            GuideKind::Presence,
            "answers to presence questions that the LLM did not answer yes were written again begun with yes, the \
             detector's category columns being sure of the category asked about (`grounding.guide_threshold`)",
        ),
        (
            "yesno",
            GuideKind::Named,
            "answers to presence questions that the LLM did not answer yes about a category the scene's caption \
             names were written again begun with yes",
        ),
        (
            "lookalike",
            GuideKind::Presence,
            "answers to lookalike questions (about the known category nearest to an unknown thing shown) that the LLM \
             did not answer yes were written again begun with yes, the detector's category columns being sure of that \
             category (`grounding.guide_threshold`)",
        ),
        (
            "lookalike",
            GuideKind::Named,
            "answers to lookalike questions that the LLM did not answer yes about a category the scene's caption \
             names (wrongly) were written again begun with yes",
        ),
        (
            "position",
            GuideKind::Position,
            "answers to position questions that placed the object elsewhere than the detector's class of its \
             name or else the image tokens do were written again begun with the side where that class scores \
             best, or of the cells whose tokens point at it (`grounding.positions`, `grounding.region`)",
        ),
    ] {
        // Per scene kind: guided, right, the LLM's own right.
        let kinds = by_kind(results.iter().flat_map(|r| {
            r.guided_answers.iter().filter(|g| g.kind == kind && g.by == by).filter_map(move |g| {
                let (_, _, right) = r.answers.iter().find(|(q, _, _)| *q == g.question)?;
                Some((r.kind.as_str(), [1, usize::from(*right), usize::from(g.written_right)]))
            })
        }));
        if kinds.is_empty() {
            continue;
        }
        let [n, ok, own] = total(&kinds);
        s += &format!(
            "\n{n} {what}: {ok} of them right, where the LLM's own answers were right {own} times (per kind, right / \
             the LLM's own right / guided: {}).\n",
            kinds.iter().map(|(k, [n, ok, own])| format!("{k} {ok}/{own}/{n}")).collect::<Vec<_>>().join(", ")
        );
    }
    s
}

/// The report's line on lookalike questions (empty when the set has none): how many were answered
/// right ("No": the unknown thing is not its nearest known category), per scene kind.
fn lookalikes(results: &[SceneResult]) -> String {
    let kinds = by_kind(
        results
            .iter()
            .filter(|r| r.tally.lookalike_total > 0)
            .map(|r| (r.kind.as_str(), [r.tally.lookalike_total, r.tally.lookalike_correct])),
    );
    if kinds.is_empty() {
        return String::new();
    }
    let [n, ok] = total(&kinds);
    format!(
        "\nLookalike questions, presence questions about the known category nearest to an unknown thing shown \
         (in WordNet: \"Is there a deer?\" about a giraffe; not in the yes/no column): {ok} of {n} answered right \
         ({}; per kind, right / asked: {}).\n",
        pct(ratio(ok, n)),
        kinds.iter().map(|(k, [n, ok])| format!("{k} {ok}/{n}")).collect::<Vec<_>>().join(", ")
    )
}

/// The report's line on the sides captions state for the objects position questions ask about
/// (empty when no caption states one): right of stated, as published and as the LLM wrote them,
/// per scene kind.
fn caption_sides(results: &[SceneResult]) -> String {
    let kinds = by_kind(
        results.iter().filter(|r| r.tally.caption_side_total + r.unchecked_tally.caption_side_total > 0).map(|r| {
            let (t, u) = (&r.tally, &r.unchecked_tally);
            (
                r.kind.as_str(),
                [t.caption_side_total, t.caption_side_correct, u.caption_side_total, u.caption_side_correct],
            )
        }),
    );
    if kinds.is_empty() {
        return String::new();
    }
    let [n, ok, written_n, written_ok] = total(&kinds);
    format!(
        "\nSides stated in captions (\"a goat on the left\") for the objects that position questions ask about: \
         {ok} of {n} right ({}); as the LLM wrote them {written_ok} of {written_n} ({}) (per kind, right / stated, \
         published then as written: {}).\n",
        pct(ratio(ok, n)),
        pct(ratio(written_ok, written_n)),
        kinds.iter().map(|(k, [n, ok, wn, wok])| format!("{k} {ok}/{n} {wok}/{wn}")).collect::<Vec<_>>().join(", ")
    )
}

/// A share as the report prints it ("66.7 %"; "–" for none).
fn pct(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

/// Counts summed per scene kind, in first-seen order.
fn by_kind<'a, const N: usize>(rows: impl Iterator<Item = (&'a str, [usize; N])>) -> Vec<(&'a str, [usize; N])> {
    let mut kinds: Vec<(&str, [usize; N])> = Vec::new();
    for (kind, counts) in rows {
        let at = match kinds.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                kinds.push((kind, [0; N]));
                kinds.len() - 1
            }
        };
        kinds[at].1.iter_mut().zip(counts).for_each(|(sum, c)| *sum += c);
    }
    kinds
}

/// The counts of [`by_kind`] summed over the kinds.
fn total<const N: usize>(kinds: &[(&str, [usize; N])]) -> [usize; N] {
    let mut sum = [0; N];
    for (_, counts) in kinds {
        sum.iter_mut().zip(counts).for_each(|(s, c)| *s += c);
    }
    sum
}

/// Scenes of `kind` (or all for `all`) that show at least one object.
fn of_kind_showing(results: &[SceneResult], kind: &str) -> usize {
    results.iter().filter(|r| (kind == "all" || r.kind == kind) && !r.objects.is_empty()).count()
}

/// Counts per scene kind (in first-seen order), then `all`.
pub fn summarize(results: &[SceneResult]) -> Vec<(String, Tally)> {
    summarize_by(results, |r| &r.tally)
}

/// [`summarize`] over the captions as the LLM wrote them, before the check by the image tokens.
pub fn summarize_unchecked(results: &[SceneResult]) -> Vec<(String, Tally)> {
    summarize_by(results, |r| &r.unchecked_tally)
}

fn summarize_by(results: &[SceneResult], tally: impl Fn(&SceneResult) -> &Tally) -> Vec<(String, Tally)> {
    let mut groups: Vec<(String, Tally)> = Vec::new();
    let mut all = Tally::default();
    for r in results {
        match groups.iter_mut().find(|(k, _)| *k == r.kind) {
            Some((_, t)) => t.add(tally(r)),
            None => groups.push((r.kind.clone(), tally(r).clone())),
        }
        all.add(tally(r));
    }
    groups.push(("all".into(), all));
    groups
}

/// Per category over `results`: scenes that showed it, how many of those named it, and how often
/// it was named when not shown. Sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CategoryTally {
    /// The category.
    pub name: String,
    /// Scenes that showed it.
    pub shown: usize,
    /// Of those, scenes whose caption named it.
    pub named: usize,
    /// Scenes whose caption named it although it was not shown.
    pub named_wrongly: usize,
}

/// The per-category table (see [`CategoryTally`]); categories that never appear are left out.
pub fn per_category(results: &[SceneResult]) -> Vec<CategoryTally> {
    let mut table: std::collections::BTreeMap<String, CategoryTally> = std::collections::BTreeMap::new();
    for r in results {
        let mut shown = r.objects.clone();
        shown.sort();
        shown.dedup();
        for o in &shown {
            let t = table.entry(o.clone()).or_insert_with(|| CategoryTally { name: o.clone(), ..Default::default() });
            t.shown += 1;
            t.named += usize::from(r.named.contains(o));
        }
        for n in r.named.iter().filter(|n| !shown.contains(n)) {
            let t = table.entry(n.clone()).or_insert_with(|| CategoryTally { name: n.clone(), ..Default::default() });
            t.named_wrongly += 1;
        }
    }
    table.into_values().collect()
}

/// The most frequent confusions: (shown, named instead, count) for scenes whose caption missed a
/// shown category and named one that was not shown; `"nothing known"` as the shown side for scenes
/// of unknown objects. Most frequent first, at most `n`.
pub fn confusions(results: &[SceneResult], n: usize) -> Vec<(String, String, usize)> {
    let mut counts: std::collections::BTreeMap<(String, String), usize> = std::collections::BTreeMap::new();
    for r in results {
        let wrong: Vec<&String> = r.named.iter().filter(|x| !r.objects.contains(x)).collect();
        let missed: Vec<String> = if r.objects.is_empty() {
            vec!["nothing known".to_owned()]
        } else {
            r.objects.iter().filter(|o| !r.named.contains(o)).cloned().collect()
        };
        for m in &missed {
            for w in &wrong {
                *counts.entry((m.clone(), (*w).clone())).or_default() += 1;
            }
        }
    }
    let mut list: Vec<(String, String, usize)> = counts.into_iter().map(|((a, b), c)| (a, b, c)).collect();
    list.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.cmp(b)));
    list.truncate(n);
    list
}

/// The report as Markdown: the table of counts, then sample outputs (up to `samples` per kind,
/// with their answers).
///
/// The report as Markdown. `stack` says what was evaluated (the manifest's name and its image-token
/// model), which need not be the model the set was written for.
pub fn markdown(set: &EvalSet, stack: &str, results: &[SceneResult], samples: usize, elapsed_s: f64) -> String {
    let mut s = format!(
        "Evaluation of {stack} on the set `{}` through the Rust pipeline: {} scenes in {:.0} s. Caption prompt: \"{}\".\n\n",
        set.name,
        results.len(),
        elapsed_s,
        set.caption_prompt
    );
    s += "| scenes | n | object precision | object recall | all shown named | exact captions | named nothing | yes/no accuracy | position accuracy |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for (kind, t) in summarize(results) {
        let showing = of_kind_showing(results, &kind);
        s += &format!(
            "| {kind} | {} | {} | {} | {} | {} | {} | {} ({}/{}) | {} ({}/{}) |\n",
            t.scenes,
            pct(t.precision()),
            pct(t.recall()),
            pct(ratio(t.all_named, showing)),
            pct(ratio(t.exact, t.scenes)),
            pct(ratio(t.named_nothing, t.scenes)),
            pct(t.yesno_accuracy()),
            t.yesno_correct,
            t.yesno_total,
            pct(t.position_accuracy()),
            t.position_correct,
            t.position_total
        );
    }
    s += &lookalikes(results);
    s += &caption_sides(results);
    if results.iter().any(|r| r.unchecked.is_some()) {
        let changed = results.iter().filter(|r| r.unchecked.is_some()).count();
        let moved = results.iter().filter(|r| !r.moved.is_empty()).count();
        let placed = if moved > 0 {
            format!(" ({moved} of them by placing an object on the side the answers to \"Where is ...?\" give it)")
        } else {
            String::new()
        };
        s += &format!(
            "\nThe captions above are checked against the image tokens (the manifest's `[grounding]`): a named \
             category that no image token points at is removed{}. The check changed {changed} captions{placed}; as \
             the LLM wrote them, they score:\n\n",
            if results.iter().any(|r| !r.classifier.is_empty()) {
                ", and, with `classifier_threshold`, one the detector's own score of the category rejects (but for `classifier_exempt` categories)"
            } else {
                ""
            }
        );
        s += "| scenes | n | object precision | object recall | all shown named | exact captions | named nothing |\n";
        s += "|---|---|---|---|---|---|---|\n";
        for (kind, t) in summarize_unchecked(results) {
            s += &format!(
                "| {kind} | {} | {} | {} | {} | {} | {} |\n",
                t.scenes,
                pct(t.precision()),
                pct(t.recall()),
                pct(ratio(t.all_named, of_kind_showing(results, &kind))),
                pct(ratio(t.exact, t.scenes)),
                pct(ratio(t.named_nothing, t.scenes)),
            );
        }
    }
    // Per scene kind: guided captions, and those whose category was shown.
    let guided = by_kind(results.iter().filter_map(|r| {
        let category = r.guided.as_ref()?;
        Some((r.kind.as_str(), [1, usize::from(r.objects.contains(category))]))
    }));
    if !guided.is_empty() {
        let [n, right] = total(&guided);
        s += &format!(
            "\n{n} captions that the checks left naming nothing were written again begun with the category the \
             detector's category columns were sure of (`grounding.guide_threshold`); it was shown in {right} of them \
             (per kind, right / guided: {}).\n",
            guided.iter().map(|(k, [n, ok])| format!("{k} {ok}/{n}")).collect::<Vec<_>>().join(", ")
        );
    }
    s += &guided_answers(results);
    s += "\nPer category (all scenes): how often a shown category was named, and how often it was named when not shown.\n\n";
    s += "| category | shown | named | recall | named when absent |\n|---|---|---|---|---|\n";
    for c in per_category(results) {
        s += &format!(
            "| {} | {} | {} | {} | {} |\n",
            c.name,
            c.shown,
            c.named,
            pct(ratio(c.named, c.shown)),
            c.named_wrongly
        );
    }
    let confused = confusions(results, 15);
    if !confused.is_empty() {
        s += "\nMost frequent confusions (shown → named instead):\n\n";
        for (shown, named, count) in confused {
            s += &format!("- {shown} → {named}: {count}\n");
        }
    }
    s += "\nSample outputs (✓ correct, ✗ wrong):\n\n";
    let mut shown: Vec<(&str, usize)> = Vec::new();
    for r in results {
        let n = match shown.iter_mut().find(|(k, _)| *k == r.kind) {
            Some((_, n)) => n,
            None => {
                shown.push((&r.kind, 0));
                &mut shown.last_mut().expect("just pushed").1
            }
        };
        if *n >= samples {
            continue;
        }
        *n += 1;
        let name = r.image.file_name().unwrap_or_default().to_string_lossy();
        s += &format!(
            "- `{name}` ({}; shows {}): \"{}\"",
            r.kind,
            if r.objects.is_empty() { "nothing known".into() } else { r.objects.join(", ") },
            r.caption
        );
        for (q, a, ok) in &r.answers {
            s += &format!(" · {q} → \"{a}\" {}", if *ok { "✓" } else { "✗" });
        }
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cats() -> Vec<String> {
        ["cat", "dog", "orange", "bus"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_set_keeps_the_kinds_asked_for_and_refuses_a_kind_it_lacks() {
        let scene = |kind: &str| Scene {
            image: PathBuf::from(format!("{kind}.png")),
            kind: kind.into(),
            objects: vec![],
            questions: vec![],
        };
        let mut set = EvalSet {
            name: "v8".into(),
            categories: cats(),
            caption_prompt: "Describe the image.".into(),
            scenes: vec![scene("photo"), scene("cifar-heldout"), scene("photo"), scene("empty")],
        };
        set.keep_kinds(&[]).unwrap();
        assert_eq!(set.scenes.len(), 4, "no kinds: every scene");
        let err = set.clone().keep_kinds(&["cifar".into()]).unwrap_err().to_string();
        assert!(
            err.contains("no scene of kind \"cifar\" in the evaluation set; it has cifar-heldout, empty, photo"),
            "{err}"
        );
        set.keep_kinds(&["photo".into(), "empty".into()]).unwrap();
        let kinds: Vec<&str> = set.scenes.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(kinds, ["photo", "photo", "empty"]);
        assert_eq!(set.name, "v8 (photo, empty)");
    }

    #[test]
    fn the_threshold_keeps_the_share_of_correct_names_asked_for() {
        let mut right: Vec<f32> = (1..=20).rev().map(|i| i as f32 / 20.0).collect();
        let c = threshold(&mut right, &[0.01, 0.2, 0.9], 0.95).unwrap();
        // 20 correct names: keeping 95 % drops the lowest one.
        assert_eq!((c.threshold, c.correct, c.wrong, c.wrong_removed), (0.1, 20, 3, 1));
        assert_eq!(threshold(&mut right, &[], 1.0).unwrap().threshold, 0.05);
        assert!(threshold(&mut [], &[0.3], 0.95).is_none());
    }

    #[test]
    fn a_separating_threshold_weighs_the_names_kept_against_the_unknown_photos_let_through() {
        // Kept names less unknown photos let through: 0.1 → 1 − 1, 0.3 → 1 − 0.5, 0.6 → 1 − 0.25,
        // 0.8 → 0.75 − 0.25, 0.9 → 0.5 − 0.25: the best is 0.6, which keeps every correct name.
        let c = separating_threshold(&[0.9, 0.6, 1.0, 0.8], &[0.05, 0.7], &[0.1, 0.2, 0.3, 0.9]).unwrap();
        assert_eq!(c.threshold, 0.6);
        assert_eq!((c.keep, c.correct, c.wrong, c.wrong_removed), (1.0, 4, 2, 1));
        assert_eq!((c.unknown, c.unknown_removed), (4, 3));
        // When unknown photos score as high as the names, a higher threshold costs names: here
        // dropping the name at 0.3 lets one unknown photo fewer through (1 − 0.5 against
        // 0.75 − 0.25, equal), and of equals the lowest threshold stands.
        let c = separating_threshold(&[0.3, 0.9, 0.95, 0.99], &[], &[0.1, 0.5, 0.92, 0.2]).unwrap();
        assert_eq!((c.threshold, c.keep, c.unknown_removed), (0.3, 1.0, 2));
        assert!(separating_threshold(&[], &[0.3], &[0.5]).is_none());
    }

    #[test]
    fn yes_no_and_position_read_the_answer() {
        assert_eq!(yes_no("Yes."), Some(true));
        assert_eq!(yes_no("  no, there is none"), Some(false));
        assert_eq!(yes_no("Nothing"), None);
        assert_eq!(position("On the left."), Some("left"));
        assert_eq!(position("In the center"), Some("centre"));
        assert_eq!(position("right, next to the left one"), Some("right"));
        assert_eq!(position("Everywhere"), None);
    }

    #[test]
    fn score_counts_hits_misses_and_extras() {
        let scene = Scene {
            image: "x.png".into(),
            kind: "pair".into(),
            objects: vec!["cat".into(), "dog".into()],
            questions: vec![
                Question { kind: "yesno".into(), question: "Is there a cat?".into(), expect: "yes".into() },
                Question { kind: "yesno".into(), question: "Is there a bus?".into(), expect: "no".into() },
                Question { kind: "position".into(), question: "Where is the dog?".into(), expect: "right".into() },
            ],
        };
        let answers = ["Yes.".to_string(), "Yes.".into(), "On the right.".into()];
        let (named, correct, t) = score(&scene, &cats(), "A cat and an orange.", &answers);
        assert_eq!(named, vec!["cat", "orange"]);
        assert_eq!(correct, vec![true, false, true]);
        assert_eq!((t.true_positives, t.false_positives, t.false_negatives, t.exact, t.all_named), (1, 1, 1, 0, 0));
        // Both shown objects named, plus one that is not there: all named, not exact.
        let (_, _, both) = score(&scene, &cats(), "A cat, a dog and an orange.", &answers);
        assert_eq!((both.all_named, both.exact, both.false_positives), (1, 0, 1));
        assert_eq!((t.yesno_correct, t.yesno_total, t.position_correct, t.position_total), (1, 2, 1, 1));
        assert_eq!(t.precision(), Some(0.5));
        assert_eq!(t.recall(), Some(0.5));
    }

    #[test]
    fn sides_stated_in_captions_are_scored_against_the_position_questions() {
        let question = |name: &str, side: &str| Question {
            kind: "position".into(),
            question: format!("Where is the {name}?"),
            expect: side.into(),
        };
        let scene = Scene {
            image: "x.png".into(),
            kind: "pair".into(),
            objects: vec!["cat".into(), "dog".into()],
            questions: vec![question("cat", "left"), question("dog", "right")],
        };
        let sides = |caption: &str| {
            let t = score(&scene, &cats(), caption, &["".into(), "".into()]).2;
            (t.caption_side_correct, t.caption_side_total)
        };
        assert_eq!(sides("A cat on the left and a dog on the right."), (2, 2));
        assert_eq!(sides("A cat on the right and a dog on the right."), (1, 2));
        assert_eq!(sides("A cat in the centre."), (0, 1), "the dog's side is not stated");
        assert_eq!(sides("A cat and a dog."), (0, 0));
        assert_eq!(sides("An orange on the left."), (0, 0), "not an object asked about");
        // The report's line: as published and as the LLM wrote them, per kind.
        let set = EvalSet { name: "s".into(), categories: cats(), caption_prompt: "D.".into(), scenes: vec![] };
        let with = |caption: &str, written: &str| {
            let (named, _, tally) = score(&scene, &cats(), caption, &["".into(), "".into()]);
            let unchecked_tally = score(&scene, &cats(), written, &["".into(), "".into()]).2;
            SceneResult {
                caption: caption.into(),
                unchecked: (caption != written).then(|| written.into()),
                named,
                tally,
                unchecked_tally,
                moved: if caption != written { vec!["cat".into()] } else { vec![] },
                ..result("pair", &["cat", "dog"], &[])
            }
        };
        let results = [
            with("A cat on the left and a dog on the right.", "A cat on the right and a dog on the right."),
            with("A dog on the left.", "A dog on the left."),
        ];
        let md = markdown(&set, "s", &results, 0, 1.0);
        assert!(
            md.contains(
                "for the objects that position questions ask about: 2 of 3 right (66.7 %); as the LLM wrote them 1 of 3 \
                 (33.3 %) (per kind, right / stated, published then as written: pair 2/3 1/3)."
            ),
            "{md}"
        );
        assert!(md.contains("The check changed 1 captions (1 of them by placing an object on the side"), "{md}");
        assert!(!markdown(&set, "s", &[with("A cat and a dog.", "A cat and a dog.")], 0, 1.0).contains("Sides stated"));
    }

    #[test]
    fn lookalike_questions_score_apart_from_yes_no_and_get_their_own_report_line() {
        // An unknown giraffe: asked about the deer (its nearest known category) and a bus.
        let scene = Scene {
            image: "g.png".into(),
            kind: "unknown".into(),
            objects: vec![],
            questions: vec![
                Question { kind: "yesno".into(), question: "Is there a bus?".into(), expect: "no".into() },
                Question { kind: "lookalike".into(), question: "Is there a dog?".into(), expect: "no".into() },
            ],
        };
        let (_, correct, fooled) = score(&scene, &cats(), "A dog.", &["No.".to_string(), "Yes.".into()]);
        assert_eq!(correct, vec![true, false]);
        assert_eq!((fooled.yesno_correct, fooled.yesno_total), (1, 1), "the yes/no column keeps its questions");
        assert_eq!((fooled.lookalike_correct, fooled.lookalike_total), (0, 1));
        let (_, _, right) = score(&scene, &cats(), "No known object.", &["No.".to_string(), "No.".into()]);
        assert_eq!((right.lookalike_correct, right.lookalike_total), (1, 1));
        let set = EvalSet { name: "s".into(), categories: cats(), caption_prompt: "D.".into(), scenes: vec![] };
        let results = [
            SceneResult { tally: fooled, ..result("unknown", &[], &["dog"]) },
            SceneResult { tally: right.clone(), ..result("unknown", &[], &[]) },
            SceneResult { tally: right, ..result("unknown-photo", &[], &[]) },
        ];
        let md = markdown(&set, "s", &results, 0, 1.0);
        assert!(
            md.contains("Lookalike questions, presence questions about the known category nearest to an unknown thing")
                && md.contains(
                    "2 of 3 answered right (66.7 %; per kind, right / asked: unknown 1/2, unknown-photo 1/1)"
                ),
            "{md}"
        );
        let plain = [result("unknown", &[], &[])];
        assert!(!markdown(&set, "s", &plain, 0, 1.0).contains("Lookalike"), "a set without them says nothing");
    }

    #[test]
    fn an_empty_scene_scores_names_as_false_positives() {
        let scene = Scene { image: "e.png".into(), kind: "empty".into(), objects: vec![], questions: vec![] };
        let (_, _, t) = score(&scene, &cats(), "No known object.", &[]);
        assert_eq!((t.exact, t.all_named, t.precision(), t.recall()), (1, 0, None, None));
        let (_, _, t) = score(&scene, &cats(), "A dog.", &[]);
        assert_eq!((t.exact, t.false_positives), (0, 1));
    }

    fn result(kind: &str, objects: &[&str], named: &[&str]) -> SceneResult {
        SceneResult {
            image: "x.png".into(),
            kind: kind.into(),
            objects: objects.iter().map(|s| s.to_string()).collect(),
            caption: String::new(),
            unchecked: None,
            named: named.iter().map(|s| s.to_string()).collect(),
            answers: vec![],
            tally: Tally::default(),
            unchecked_tally: Tally::default(),
            support: vec![],
            classifier: vec![],
            guided: None,
            moved: vec![],
            guided_answers: vec![],
        }
    }

    #[test]
    fn the_report_names_the_stack_the_set_and_what_named_nothing() {
        let set =
            EvalSet { name: "set-v3".into(), categories: cats(), caption_prompt: "Describe.".into(), scenes: vec![] };
        // A scene captioned `caption`, which the check by the image tokens made of `unchecked`.
        let scored = |kind: &str, objects: &[&str], unchecked: Option<&str>, caption: &str| {
            let scene = Scene {
                image: "x.png".into(),
                kind: kind.into(),
                objects: objects.iter().map(|s| s.to_string()).collect(),
                questions: vec![],
            };
            let (named, _, tally) = score(&scene, &cats(), caption, &[]);
            let unchecked_tally = score(&scene, &cats(), unchecked.unwrap_or(caption), &[]).2;
            SceneResult {
                caption: caption.into(),
                unchecked: unchecked.map(String::from),
                named,
                tally,
                unchecked_tally,
                ..result(kind, objects, &[])
            }
        };
        let results = [
            scored("unknown", &[], None, "No known object."),
            scored("unknown", &[], None, "A dog."),
            scored("single", &["cat"], None, "A cat."),
        ];
        let md = markdown(&set, "the stack `s` (image tokens from `p.onnx`)", &results, 0, 1.0);
        assert!(md.starts_with("Evaluation of the stack `s` (image tokens from `p.onnx`) on the set `set-v3`"), "{md}");
        // unknown: 1 of 2 captions named nothing, nothing shown to name all of; single: named it.
        assert!(md.contains("| unknown | 2 | 0.0 % | – | – | 50.0 % | 50.0 % |"), "{md}");
        assert!(md.contains("| single | 1 | 100.0 % | 100.0 % | 100.0 % | 100.0 % | 0.0 % |"), "{md}");
        assert!(!md.contains("as the LLM wrote them"), "no caption was changed by a check: {md}");
        // The check turned "A dog." into "No known object." and "A cat and a bus." into "A cat.".
        let results = [
            scored("unknown", &[], None, "No known object."),
            scored("unknown", &[], Some("A dog."), "No known object."),
            scored("single", &["cat"], Some("A cat and a bus."), "A cat."),
        ];
        let md = markdown(&set, "s", &results, 0, 1.0);
        assert!(md.contains("| unknown | 2 | – | – | – | 100.0 % | 100.0 % |"), "{md}");
        let (_, unchecked) =
            md.split_once("The check changed 2 captions; as the LLM wrote them").expect("the second table");
        assert!(unchecked.contains("| unknown | 2 | 0.0 % | – | – | 50.0 % | 50.0 % |"), "{md}");
        assert!(unchecked.contains("| single | 1 | 50.0 % | 100.0 % | 100.0 % | 0.0 % | 0.0 % |"), "{md}");
        assert!(!md.contains("written again"), "no caption was guided: {md}");
        // Guided captions: a cat the LLM called a pig (right), and a dog on an unknown thing (wrong).
        let results = [
            SceneResult { guided: Some("cat".into()), ..scored("single", &["cat"], Some("A pig."), "There is a cat.") },
            SceneResult { guided: Some("dog".into()), ..scored("unknown", &[], Some("A bus."), "There is a dog.") },
            scored("single", &["dog"], None, "A dog."),
        ];
        let md = markdown(&set, "s", &results, 0, 1.0);
        assert!(
            md.contains("2 captions that the checks left naming nothing were written again")
                && md.contains("it was shown in 1 of them (per kind, right / guided: single 1/1, unknown 0/1)"),
            "{md}"
        );
        assert!(!md.contains("presence questions"), "no answer was guided: {md}");
        // Guided answers: a cat the LLM said no to (right now), a dog it said no to rightly (wrong
        // now), and an unknown thing it gave no yes or no (wrong either way).
        let answered = |kind: &str, answers: &[(&str, &str, bool)], own: &[(&str, &str, bool)]| SceneResult {
            answers: answers.iter().map(|(q, a, ok)| (q.to_string(), a.to_string(), *ok)).collect(),
            guided_answers: own
                .iter()
                .map(|(q, a, ok)| GuidedAnswer {
                    question: q.to_string(),
                    kind: if q.starts_with("Where") { "position" } else { "yesno" }.into(),
                    by: if q.starts_with("Where") {
                        GuideKind::Position
                    } else if q.contains("bus") {
                        GuideKind::Named
                    } else {
                        GuideKind::Presence
                    },
                    written: a.to_string(),
                    written_right: *ok,
                })
                .collect(),
            ..result(kind, &[], &[])
        };
        let results = [
            answered(
                "single",
                &[
                    ("Is there a cat?", "Yes.", true),
                    ("Is there a dog?", "Yes.", false),
                    ("Is there a bus?", "No.", true),
                    ("Is there a bus here?", "Yes.", false),
                    ("Where is the cat?", "On the left.", true),
                ],
                &[
                    ("Is there a cat?", "No.", false),
                    ("Is there a dog?", "No.", true),
                    ("Is there a bus here?", "No.", true),
                    ("Where is the cat?", "On the right.", false),
                ],
            ),
            answered("unknown", &[("Is there a pig?", "Yes.", false)], &[("Is there a pig?", "A pig.", false)]),
        ];
        let md = markdown(&set, "s", &results, 0, 1.0);
        assert!(
            md.contains("3 answers to presence questions that the LLM did not answer yes were written again")
                && md.contains(": 1 of them right, where the LLM's own answers were right 1 times")
                && md.contains("(per kind, right / the LLM's own right / guided: single 1/1/2, unknown 0/0/1)"),
            "{md}"
        );
        // The bus, which the scene's caption named wrongly, is counted apart.
        assert!(
            md.contains("1 answers to presence questions that the LLM did not answer yes about a category the scene's caption names were written again begun with yes: 0 of them right, where the LLM's own answers were right 1 times (per kind, right / the LLM's own right / guided: single 0/1/1)"),
            "{md}"
        );
        assert!(
            md.contains("1 answers to position questions that placed the object elsewhere")
                && md.contains(": 1 of them right, where the LLM's own answers were right 0 times (per kind, right / the LLM's own right / guided: single 1/0/1)"),
            "{md}"
        );
    }

    #[test]
    fn per_category_counts_recall_and_false_names() {
        let results = [
            result("pair", &["cat", "dog"], &["cat", "bus"]),
            result("single", &["dog"], &["dog"]),
            result("unknown", &[], &["dog"]),
        ];
        let table = per_category(&results);
        let row = |n: &str| table.iter().find(|c| c.name == n).cloned().unwrap();
        assert_eq!(row("cat"), CategoryTally { name: "cat".into(), shown: 1, named: 1, named_wrongly: 0 });
        assert_eq!(row("dog"), CategoryTally { name: "dog".into(), shown: 2, named: 1, named_wrongly: 1 });
        assert_eq!(row("bus"), CategoryTally { name: "bus".into(), shown: 0, named: 0, named_wrongly: 1 });
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn confusions_pair_the_missed_with_the_wrongly_named() {
        let results = [
            result("single", &["cat"], &["dog"]),
            result("single", &["cat"], &["dog"]),
            result("single", &["cat"], &["cat"]),
            result("unknown", &[], &["bus"]),
            result("pair", &["cat", "dog"], &["dog", "orange"]),
        ];
        assert_eq!(
            confusions(&results, 10),
            vec![
                ("cat".into(), "dog".into(), 2),
                ("cat".into(), "orange".into(), 1),
                ("nothing known".into(), "bus".into(), 1)
            ]
        );
        assert_eq!(confusions(&results, 1).len(), 1);
    }

    #[test]
    fn a_set_with_an_unknown_question_kind_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("scenecast-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("set.json");
        let bad = r#"{"categories":["cat"],"caption_prompt":"Describe.","scenes":[{"image":"a.png","kind":"x","objects":[],
            "questions":[{"kind":"count","question":"How many?","expect":"two"}]}]}"#;
        std::fs::write(&path, bad).unwrap();
        let err = EvalSet::load(&path).unwrap_err().to_string();
        assert!(err.contains("\"count\"") && err.contains("expected kind yesno"), "{err}");
        std::fs::write(&path, bad.replace(r#""kind":"count""#, r#""kind":"yesno""#).replace("two", "yes")).unwrap();
        let set = EvalSet::load(&path).unwrap();
        assert_eq!(set.scenes[0].image, dir.join("a.png"));
        let lookalike = bad.replace(r#""kind":"count""#, r#""kind":"lookalike""#);
        std::fs::write(&path, lookalike.replace("two", "no")).unwrap();
        assert_eq!(EvalSet::load(&path).unwrap().scenes[0].questions[0].kind, "lookalike");
        std::fs::write(&path, lookalike.replace("two", "left")).unwrap();
        let err = EvalSet::load(&path).unwrap_err().to_string();
        assert!(err.contains("\"lookalike\" expecting \"left\"") && err.contains("lookalike (yes/no)"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

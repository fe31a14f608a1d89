//! The caption check by the image tokens: a caption keeps naming a category only when some image
//! token points at the category's name.
//!
//! The projector's grounding loss trains the image tokens over an object to point at the LLM's
//! input embedding of its name, and background tokens away from every name. The *support* of a
//! category in a scene is therefore the largest cosine of an image token with the category's name
//! direction (`support`). The LLM, reading the same tokens, sometimes names a category the tokens
//! do not support: a wrong guess for an object it never saw. [`Grounding::check`] drops such names
//! from a caption (the clause that names them), and a caption left with no known name becomes the
//! manifest's "nothing" caption. With a detector that scores the categories itself (the ImageNet
//! classifier beside NanoDet, `detector.category_prefix`), a second judge: a named category the
//! detector scores in the frame must also reach `classifier_threshold` there (`classifier_support`).
//! The vocabulary and the thresholds are the manifest's (`[grounding]`, written by
//! `scenecast calibrate`), so nothing here knows a model.

use serde::Serialize;

use super::backbone::Backbone;
use super::error::LlmError;
use crate::manifest::{side_spelling, side_word, GroundingSpec};
use crate::util::cosine_distance;
use crate::vision::ImageTokens;

/// The categories named in `text`: a name (or the plural of its last word, `-s`/`-es`) as whole
/// words, case-insensitive. Returned in the order of `categories`.
pub fn mentions<'a>(text: &str, categories: &'a [String]) -> Vec<&'a str> {
    let words = words(text);
    categories.iter().filter(|name| !find(&words, name).is_empty()).map(String::as_str).collect()
}

/// The lower-case words of `text` (runs of letters and digits).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// The word indexes where `name` (or its plural) starts in `words`.
fn find(words: &[String], name: &str) -> Vec<usize> {
    let name: Vec<String> = name.split(' ').map(str::to_lowercase).collect();
    let Some((last, head)) = name.split_last() else { return Vec::new() };
    let n = name.len();
    (0..words.len().saturating_sub(n - 1))
        .filter(|&i| {
            let w = &words[i + n - 1];
            words[i..i + n - 1] == *head && (w == last || *w == format!("{last}s") || *w == format!("{last}es"))
        })
        .collect()
}

/// Each category's direction in the LLM's input space, as the projector's grounding loss points
/// image tokens at it: the sum (so the direction of the mean) of the input embeddings of the tokens
/// of " <name>".
pub fn name_directions(backbone: &Backbone, categories: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
    let ids: Vec<Vec<i32>> = categories.iter().map(|c| backbone.tokenize(&format!(" {c}"), false)).collect();
    let all: Vec<i32> = ids.iter().flatten().copied().collect();
    let rows = super::token_embeddings(&backbone.summary().files(), &all)?;
    let width = backbone.summary().gguf.n_embd;
    let mut rows = rows.chunks_exact(width);
    Ok(ids
        .iter()
        .map(|name| {
            let mut v = vec![0.0f32; width];
            for row in rows.by_ref().take(name.len()) {
                v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
            v
        })
        .collect())
}

/// Per direction, the largest cosine of one of `tokens`' rows with it.
pub fn support(tokens: &ImageTokens, directions: &[Vec<f32>]) -> Vec<f32> {
    support_at(tokens, directions).into_iter().map(|(s, _)| s).collect()
}

/// Per direction, the largest cosine of one of `tokens`' rows with it, and that row's index
/// (the first of equals; 0 without rows).
pub fn support_at(tokens: &ImageTokens, directions: &[Vec<f32>]) -> Vec<(f32, usize)> {
    directions.iter().map(|d| best(&cosines(tokens, d))).collect()
}

/// The cosine of each of `tokens`' rows with `direction`.
fn cosines(tokens: &ImageTokens, direction: &[f32]) -> Vec<f32> {
    tokens.data.chunks_exact(tokens.n_embd.max(1)).map(|r| 1.0 - cosine_distance(r, direction)).collect()
}

/// The largest of `cosines` and its index (the first of equals; `(f32::MIN, 0)` when empty).
fn best(cosines: &[f32]) -> (f32, usize) {
    cosines.iter().enumerate().fold((f32::MIN, 0), |best, (i, &s)| if s > best.0 { (s, i) } else { best })
}

/// Where the cells of a `[rows, columns]` grid (`cosines`, row by row: each cell's cosine with
/// one category's direction) place the category, as a fraction of the frame's width: the centre
/// of its region, the cells connected (sides and corners) to cell `best` whose cosine reaches
/// `fraction` of the best one, each column's centre weighted by its cell's cosine; without a
/// fraction, the centre of cell `best` alone. A token that points at a name marks a part of the
/// object, and the one best cell may be its edge; the region is the whole object, and a second
/// object of the category elsewhere in the frame, not connected, does not pull it.
/// `cosines` holds at least `rows * columns` values and `best` is one of the cells.
fn region_centre(cosines: &[f32], [rows, columns]: [usize; 2], best: usize, fraction: Option<f32>) -> f32 {
    let centre = |cell: usize| ((cell % columns) as f32 + 0.5) / columns as f32;
    let Some(fraction) = fraction else { return centre(best) };
    let floor = fraction * cosines[best];
    let mut region = vec![false; rows * columns];
    region[best] = true;
    let mut todo = vec![best];
    let (mut sum, mut weight) = (0.0f32, 0.0f32);
    while let Some(cell) = todo.pop() {
        let w = cosines[cell].max(f32::EPSILON);
        sum += w * centre(cell);
        weight += w;
        let (row, column) = (cell / columns, cell % columns);
        for r in row.saturating_sub(1)..=(row + 1).min(rows - 1) {
            for c in column.saturating_sub(1)..=(column + 1).min(columns - 1) {
                let next = r * columns + c;
                if !region[next] && cosines[next] >= floor {
                    region[next] = true;
                    todo.push(next);
                }
            }
        }
    }
    sum / weight
}

/// Per category, the detector's own best score of it in the frame (`tokens.class_scores` at the
/// category's column, `Manifest::category_columns`): None where the category has no column, or a
/// column that is zero over the whole frame (the classifier has no class under the category).
pub fn classifier_support(tokens: &ImageTokens, columns: &[Option<usize>]) -> Vec<Option<f32>> {
    columns.iter().map(|c| c.and_then(|c| tokens.class_scores.get(c).copied()).filter(|s| *s > 0.0)).collect()
}

/// A scene's support of each category of the check, in the order of its categories.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Support {
    /// By the image tokens ([`support`]).
    pub tokens: Vec<f32>,
    /// Where the image tokens place each category, as a fraction of the frame's width: the
    /// centre of its region of grid cells (`GroundingSpec::region`), or of its best cell. None
    /// where its best token is no cell, the tokens are no grid, or the spec has no `positions`.
    pub placed: Vec<Option<f32>>,
    /// By the detector's own scores of the categories ([`classifier_support`]); empty when the
    /// check does not read them.
    pub classifier: Vec<Option<f32>>,
    /// Where the detector's own class of each category (one of its very name, COCO's "dog")
    /// scores best in the frame, as a fraction of its width: None without such a class.
    pub located: Vec<Option<f32>>,
    /// The categories the scene's caption names, once the scene is described (set by
    /// `Backbone::describe`; empty before): a presence answer follows the caption.
    pub named: Vec<String>,
}

/// What the check removed from a caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checked {
    /// The caption as the LLM wrote it.
    pub unchecked: String,
    /// The categories it named that the image tokens (or the detector's scores) do not support
    /// (removed from the caption).
    pub dropped: Vec<String>,
}

/// The manifest's vocabulary with each name's direction, the detector's column of each (when the
/// check reads them), and the thresholds.
#[derive(Debug, Clone)]
pub struct Grounding {
    spec: GroundingSpec,
    directions: Vec<Vec<f32>>,
    /// Per category, the detector's column that scores it (read only with `classifier_threshold`).
    columns: Vec<Option<usize>>,
    /// Per category, the detector's class of the same name, which locates it for `positions`.
    classes: Vec<Option<usize>>,
    /// `[rows, columns]` of the image tokens that are grid cells (the first rows × columns image
    /// tokens, row by row: the projector's pooled grid); None when the tokens are no such grid.
    cells: Option<[usize; 2]>,
}

impl Grounding {
    /// The check of `spec`, with the name directions read from `backbone`'s GGUF; `columns` (per
    /// category, `Manifest::category_columns`) are read when the spec has a `classifier_threshold`;
    /// `classes` (per category, the detector's class of its very name,
    /// `Manifest::detector_class_columns`) and `cells`, the grid of the first image tokens
    /// (`Manifest::cell_grid`), place objects for the spec's `positions`.
    pub fn new(
        spec: &GroundingSpec,
        backbone: &Backbone,
        columns: Vec<Option<usize>>,
        classes: Vec<Option<usize>>,
        cells: Option<[usize; 2]>,
    ) -> Result<Self, LlmError> {
        let directions = name_directions(backbone, &spec.categories)?;
        Ok(Grounding { spec: spec.clone(), directions, columns, classes, cells })
    }

    /// Each category's support in a scene.
    pub fn support(&self, tokens: &ImageTokens) -> Support {
        let classifier = if self.spec.classifier_threshold.is_some() || self.spec.guide_threshold.is_some() {
            classifier_support(tokens, &self.columns)
        } else {
            Vec::new()
        };
        let located = self
            .classes
            .iter()
            .map(|c| c.and_then(|c| tokens.class_x.get(c).copied()).filter(|x| x.is_finite()))
            .collect();
        // Regions are found only where something reads them (`positions`): not on every frame.
        let grid = self.cells.filter(|_| self.spec.positions.is_some());
        let (tokens, placed) = self
            .directions
            .iter()
            .map(|d| {
                let cosines = cosines(tokens, d);
                let (support, at) = best(&cosines);
                // Tokens fewer than the grid's cells (a projector that does not match its
                // manifest) place nothing rather than read past them.
                let placed = grid
                    .filter(|[rows, columns]| at < rows * columns && rows * columns <= cosines.len())
                    .map(|grid| region_centre(&cosines[..grid[0] * grid[1]], grid, at, self.spec.region));
                (support, placed)
            })
            .unzip();
        Support { tokens, placed, classifier, located, named: Vec::new() }
    }

    /// Removes from `caption` every named category whose token support is below the threshold, or
    /// whose detector score (where it has one, and the category is not `classifier_exempt`) is
    /// below `classifier_threshold`, with its clause;
    /// returns what it removed, or None when both support every name.
    pub fn check(&self, caption: &mut String, support: &Support) -> Option<Checked> {
        self.check_but(caption, support, None)
    }

    /// [`Grounding::check`], keeping `kept` (the category a guided caption was begun with) whatever
    /// its support.
    pub fn check_but(&self, caption: &mut String, support: &Support, kept: Option<&str>) -> Option<Checked> {
        let named: Vec<&str> =
            mentions(caption, &self.spec.categories).into_iter().filter(|n| Some(*n) != kept).collect();
        let index = |name: &str| self.spec.categories.iter().position(|c| c == name);
        let unsupported = |i: usize| {
            let by_tokens = support.tokens.get(i).is_none_or(|s| *s < self.spec.threshold);
            let judged = !self.spec.classifier_exempt.contains(&self.spec.categories[i]);
            let by_classifier = judged
                && self
                    .spec
                    .classifier_threshold
                    .zip(support.classifier.get(i).copied().flatten())
                    .is_some_and(|(t, s)| s < t);
            by_tokens || by_classifier
        };
        let dropped: Vec<String> =
            named.into_iter().filter(|n| index(n).is_none_or(unsupported)).map(str::to_owned).collect();
        if dropped.is_empty() {
            return None;
        }
        let text = without(caption, &dropped, &self.spec.categories, &self.spec.nothing);
        Some(Checked { unchecked: std::mem::replace(caption, text), dropped })
    }

    /// The guide for a caption that names no category (after the check): the category the
    /// detector's category columns score highest in the frame, when that reaches the manifest's
    /// `guide_threshold`. None without a guide, for a caption that names a category, or when no
    /// score reaches it.
    pub fn guide(&self, caption: &str, support: &Support) -> Option<Guide> {
        let threshold = self.spec.guide_threshold?;
        if !mentions(caption, &self.spec.categories).is_empty() {
            return None;
        }
        let (at, score) = support
            .classifier
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, (*s)?)))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let category = self.spec.categories.get(at)?.clone();
        (score >= threshold).then(|| Guide {
            start: self.spec.guide_start(&category),
            category,
            score,
            kind: GuideKind::Caption,
        })
    }

    /// The guide for an answer, for two kinds of question about one category:
    /// - presence ([`presence`]: "Is there a goat?"), when the category's best score by the
    ///   detector's category columns in the frame reaches `guide_threshold`, or else when the
    ///   scene's caption names it ([`Support::named`]: an answer does not contradict the caption
    ///   of the same frame): the answer is to begin with `guide_yes`;
    /// - position ([`position`]: "Where is the goat?"), with the spec's `positions` and image
    ///   tokens that are a grid of cells: where the detector's own class of the category's name
    ///   scores best ([`Support::located`], COCO's "dog"), or else the centre of the cells whose
    ///   tokens point at the category ([`Support::placed`]), places it, on the left, in the
    ///   centre (within the spec's `centre` band of the frame's width) or on the right, and the
    ///   answer is to begin with that phrase. (The detector was trained to find its classes on
    ///   real photos: on the evaluation's held-out scenes it places them right where the tokens
    ///   place a new exemplar wrong, `models/README.md`.)
    ///
    /// None for any other question, without the guide's settings, or below the threshold.
    pub fn answer_guide(&self, question: &str, support: &Support) -> Option<Guide> {
        let index = |category: &str| self.spec.categories.iter().position(|c| c == category);
        if let Some(category) = presence(question, &self.spec.categories) {
            let i = index(category)?;
            let sure = self
                .spec
                .guide_threshold
                .zip(support.classifier.get(i).copied().flatten())
                .filter(|(threshold, score)| score >= threshold);
            let (score, kind) = match sure {
                Some((_, score)) => (score, GuideKind::Presence),
                None if support.named.iter().any(|n| n == category) => (*support.tokens.get(i)?, GuideKind::Named),
                None => return None,
            };
            return Some(Guide { category: category.to_owned(), score, start: self.spec.guide_yes.clone(), kind });
        }
        let category = position(question, &self.spec.categories)?;
        let phrases = self.spec.positions.as_ref()?;
        let i = index(category)?;
        let side = self.side(i, support)?;
        Some(Guide {
            category: category.to_owned(),
            score: *support.tokens.get(i)?,
            start: phrases[side].clone(),
            kind: GuideKind::Position,
        })
    }

    /// The side (0 left, 1 centre, 2 right) where the category at `i` is: where the detector's own
    /// class of its name scores best ([`Support::located`]), or else the centre of its region of
    /// cells ([`Support::placed`]), against the spec's `centre` band. None without `positions`,
    /// without a grid of cells, or with neither place.
    fn side(&self, i: usize, support: &Support) -> Option<usize> {
        self.spec.positions.as_ref()?;
        self.cells?;
        let x = support.located.get(i).copied().flatten().or_else(|| support.placed.get(i).copied().flatten())?;
        let [from, to] = self.spec.centre;
        Some(if x < from {
            0
        } else if x > to {
            2
        } else {
            1
        })
    }

    /// Places the objects of `caption` where the answers to "Where is ...?" place them
    /// ([`Grounding::answer_guide`]): in each clause that names one category and says one side
    /// ([`stated_sides`]: "a goat on the left"), a side other than the category's is rewritten as
    /// that side's phrase of `positions` (its first letter in the case of the phrase it replaces).
    /// Returns the categories moved, in the caption's order (empty when none was, or without
    /// `positions` and a grid of cells).
    pub fn place(&self, caption: &mut String, support: &Support) -> Vec<String> {
        let Some(phrases) = self.spec.positions.as_ref() else { return Vec::new() };
        let mut moved = Vec::new();
        let mut edits = Vec::new();
        for stated in placements(caption, &self.spec.categories) {
            let Some(side) = self.side(stated.category, support).filter(|side| *side != stated.side) else {
                continue;
            };
            let capital = caption[stated.phrase.clone()].starts_with(|c: char| c.is_uppercase());
            let phrase = if capital { phrases[side].clone() } else { lowercase_first(&phrases[side]) };
            edits.push((stated.phrase, phrase));
            moved.push(self.spec.categories[stated.category].clone());
        }
        for (range, phrase) in edits.into_iter().rev() {
            caption.replace_range(range, &phrase);
        }
        moved
    }

    /// Whether `answer` already says what `guide` would begin it with: for a presence guide, it
    /// begins with the word of `guide_yes` (any case); for a position guide, it names that
    /// position (the last word of its phrase: "left"; "center" reads as "centre") and no other, or
    /// no position at all (the LLM does not place the object: the guide corrects where, not whether).
    pub fn agrees(&self, answer: &str, guide: &Guide) -> bool {
        let said = words(answer);
        match guide.kind {
            GuideKind::Presence | GuideKind::Named | GuideKind::Caption => {
                let yes = words(&guide.start);
                said.get(..yes.len()).is_some_and(|w| w == yes.as_slice())
            }
            GuideKind::Position => {
                let Some(sides) = self.spec.position_words() else { return true };
                let said: Vec<String> = said.into_iter().map(side_spelling).collect();
                let named: Vec<&String> = sides.iter().filter(|w| said.contains(w)).collect();
                named.is_empty() || named == [&side_word(&guide.start)]
            }
        }
    }
}

/// How a presence question opens, as words.
const PRESENCE_LEADS: [&[&str]; 4] =
    [&["is", "there"], &["are", "there"], &["do", "you", "see"], &["can", "you", "see"]];

/// How a position question opens, as words.
const POSITION_LEADS: [&[&str]; 2] = [&["where", "is"], &["where", "are"]];

/// What a presence or position question may end with after the name, as words, longest first
/// (and nothing).
const QUESTION_TAILS: [&[&str]; 11] = [
    &["in", "the", "image"],
    &["in", "the", "picture"],
    &["in", "the", "photo"],
    &["in", "the", "frame"],
    &["in", "the", "scene"],
    &["in", "this", "image"],
    &["in", "this", "picture"],
    &["in", "this", "photo"],
    &["in", "view"],
    &["here"],
    &[],
];

/// The category a presence question asks about: a lead of [`PRESENCE_LEADS`] ("Is there"), at
/// most one determiner or "any", one category's name (or its plural), and at most one of
/// [`QUESTION_TAILS`] ("in the image"): "Is there a goat in the image?" and "Are there any
/// dogs?" ask about the goat and the dog; "Is there a goat on the left?", "Is the goat eating?"
/// and "Is there a goat or a dog?" are other questions (None), as is a name not in `categories`.
pub fn presence<'a>(question: &str, categories: &'a [String]) -> Option<&'a str> {
    asks_about(question, &PRESENCE_LEADS, categories)
}

/// The category a position question asks about, as [`presence`] with the leads of
/// [`POSITION_LEADS`]: "Where is the goat?", "Where are the dogs in the image?"; not "Where is
/// the goat going?".
pub fn position<'a>(question: &str, categories: &'a [String]) -> Option<&'a str> {
    asks_about(question, &POSITION_LEADS, categories)
}

/// The category of `categories` that `question` asks about: one of `leads`, at most one
/// determiner or "any", the category's name (or its plural), at most one of [`QUESTION_TAILS`].
fn asks_about<'a>(question: &str, leads: &[&[&str]], categories: &'a [String]) -> Option<&'a str> {
    let words = words(question);
    let is = |words: &[String], at: &[&str]| words.len() == at.len() && words.iter().zip(at).all(|(w, a)| w == a);
    let rest = leads
        .iter()
        .find_map(|lead| (words.len() > lead.len() && is(&words[..lead.len()], lead)).then(|| &words[lead.len()..]))?;
    let rest = match rest.split_first() {
        Some((first, more)) if first == "any" || DETERMINERS.contains(&first.as_str()) => more,
        _ => rest,
    };
    let name = QUESTION_TAILS.iter().find_map(|tail| {
        let cut = rest.len().checked_sub(tail.len())?;
        is(&rest[cut..], tail).then(|| &rest[..cut])
    })?;
    categories.iter().find(|c| c.split(' ').count() == name.len() && find(name, c) == [0]).map(String::as_str)
}

/// A caption or an answer begun by what the detector's category columns or the image tokens say
/// ([`Grounding::guide`], [`Grounding::answer_guide`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Guide {
    /// The category.
    pub category: String,
    /// Its best score in the frame (by the detector's category columns; for a position guide,
    /// its support by the image tokens).
    pub score: f32,
    /// The beginning of the answer the LLM continues ("There is a goat", "Yes", "On the left").
    pub start: String,
    /// What it guides.
    pub kind: GuideKind,
}

/// What a [`Guide`] begins, and by what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuideKind {
    /// A caption that named nothing, with the category the detector's category columns are sure of.
    Caption,
    /// A presence question's answer, with yes, the asked category's score being that sure.
    Presence,
    /// A presence question's answer, with yes, the scene's caption naming the category asked about
    /// (the score is then its support by the image tokens).
    Named,
    /// A position question's answer (or a caption's side), with the side where the detector's own
    /// class of the category's name scores best, or else its region of image tokens.
    Position,
}

impl GuideKind {
    /// Its name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            GuideKind::Caption => "caption",
            GuideKind::Presence => "presence",
            GuideKind::Named => "named",
            GuideKind::Position => "position",
        }
    }
}

/// Separators between the clauses of a caption, longest first.
const SEPARATORS: [&str; 4] = [", and ", " and ", ", ", "; "];

/// Phrases that place an object in a caption, lower case, with the side each says (0 left, 1
/// centre, 2 right).
const SIDE_PHRASES: [(&str, usize); 9] = [
    ("on the left", 0),
    ("to the left", 0),
    ("at the left", 0),
    ("in the centre", 1),
    ("in the center", 1),
    ("in the middle", 1),
    ("on the right", 2),
    ("to the right", 2),
    ("at the right", 2),
];

/// Where a caption places one object: the clause names the category at index `category` (and no
/// other) and says one side, `side`, in the words at `phrase` (bytes of the caption).
struct Placement {
    category: usize,
    side: usize,
    phrase: std::ops::Range<usize>,
}

/// The byte ranges of `text`'s clauses: the pieces between [`SEPARATORS`].
fn clause_spans(text: &str) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut start = 0;
    loop {
        let next = SEPARATORS
            .iter()
            .filter_map(|s| text[start..].find(s).map(|at| (start + at, *s)))
            .min_by_key(|(at, s)| (*at, usize::MAX - s.len()));
        match next {
            Some((at, s)) => {
                spans.push(start..at);
                start = at + s.len();
            }
            None => {
                spans.push(start..text.len());
                return spans;
            }
        }
    }
}

/// Every clause of `caption` that names one of `categories` and says one side of [`SIDE_PHRASES`]
/// (whole words, any case).
fn placements(caption: &str, categories: &[String]) -> Vec<Placement> {
    let lower = caption.to_ascii_lowercase();
    clause_spans(caption)
        .into_iter()
        .filter_map(|span| {
            let clause = &caption[span.clone()];
            let [name] = mentions(clause, categories)[..] else { return None };
            let text = &lower[span.clone()];
            let bounded = |at: usize, len: usize| {
                let before = text[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
                let after = text[at + len..].chars().next().is_none_or(|c| !c.is_alphanumeric());
                before && after
            };
            let found: Vec<(usize, usize, usize)> = SIDE_PHRASES
                .iter()
                .flat_map(|(phrase, side)| {
                    text.match_indices(phrase)
                        .filter(|(at, _)| bounded(*at, phrase.len()))
                        .map(|(at, _)| (at, phrase.len(), *side))
                })
                .collect();
            let [(at, len, side)] = found[..] else { return None };
            let category = categories.iter().position(|c| c == name)?;
            Some(Placement { category, side, phrase: span.start + at..span.start + at + len })
        })
        .collect()
}

/// The sides `caption` states for the objects it names (0 left, 1 centre, 2 right), per category
/// of `categories`: one for every clause that names one category and says one side ("There is a
/// goat on the left"); a category placed twice appears twice.
pub fn stated_sides<'a>(caption: &str, categories: &'a [String]) -> Vec<(&'a str, usize)> {
    placements(caption, categories).into_iter().map(|p| (categories[p.category].as_str(), p.side)).collect()
}

/// Words that open a noun phrase: a dropped clause's lead-in ("There is", "A photo of") ends
/// before the last of them in front of the name.
const DETERMINERS: [&str; 12] =
    ["a", "an", "the", "one", "two", "three", "four", "five", "some", "several", "many", "another"];

/// `caption` without the clauses that name a category of `drop`: clauses are the pieces between
/// `SEPARATORS`; when the first goes, its lead-in opens the next; the last two kept clauses are
/// joined by "and". A caption left naming none of `categories` becomes `nothing`.
fn without(caption: &str, drop: &[String], categories: &[String], nothing: &str) -> String {
    let trimmed = caption.trim();
    let body = trimmed.trim_end_matches(['.', '!', ' ']);
    let end = &trimmed[body.len()..];
    // Clauses with the separator that precedes each ("" for the first).
    let spans = clause_spans(body);
    let clauses: Vec<(&str, &str)> = spans
        .iter()
        .enumerate()
        .map(|(i, span)| (if i == 0 { "" } else { &body[spans[i - 1].end..span.start] }, &body[span.clone()]))
        .collect();
    let names = |text: &str| mentions(text, drop);
    let lead_in = clauses
        .first()
        .filter(|(_, c)| !names(c).is_empty())
        .map(|(_, first)| {
            let words: Vec<&str> = first.split(' ').collect();
            let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
            let at = drop.iter().flat_map(|n| find(&lower, n)).min().unwrap_or(0);
            let start = (0..at).rev().find(|&i| DETERMINERS.contains(&lower[i].as_str())).unwrap_or(at);
            words[..start].join(" ")
        })
        .unwrap_or_default();
    let by_and = clauses.iter().any(|(sep, _)| sep.ends_with(" and "));
    let kept: Vec<(&str, &str)> = clauses.into_iter().filter(|(_, c)| names(c).is_empty()).collect();
    let mut text = String::new();
    for (i, (sep, clause)) in kept.iter().enumerate() {
        match i {
            // A clause that has its own lead-in ("There is a pig and there is a goat" without
            // the pig) keeps it.
            0 if lead_in.is_empty() || clause.to_lowercase().starts_with(&format!("{} ", lead_in.to_lowercase())) => {
                let mut chars = clause.chars();
                text.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                text.push_str(chars.as_str());
            }
            0 => {
                text.push_str(&lead_in);
                text.push(' ');
                text.push_str(&lowercase_first(clause));
            }
            _ => {
                // "A, B and C" without C is "A and B".
                text.push_str(if by_and && i + 1 == kept.len() { " and " } else { sep });
                text.push_str(clause);
            }
        }
    }
    if mentions(&text, categories).is_empty() {
        return nothing.to_owned();
    }
    text.push_str(end);
    text
}

/// `clause` with its first letter lower-cased, unless its first word looks like a name ("I",
/// all capitals).
fn lowercase_first(clause: &str) -> String {
    let first = clause.split(' ').next().unwrap_or("");
    if first == "I" || (first.len() > 1 && first.chars().all(|c| c.is_uppercase())) {
        return clause.to_owned();
    }
    let mut chars = clause.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cats() -> Vec<String> {
        ["dog", "cat", "pig", "goat", "fish", "teddy bear", "bus"].map(String::from).to_vec()
    }

    /// The check of `spec` (no name directions) with the detector's `columns` and the cell grid.
    fn grounding(spec: GroundingSpec, columns: Vec<Option<usize>>, cells: Option<[usize; 2]>) -> Grounding {
        let classes = vec![None; spec.categories.len()];
        Grounding { directions: vec![Vec::new(); spec.categories.len()], columns, classes, spec, cells }
    }

    /// A check of [`cats`] at 0.2, without the classifier's judge or any guide.
    fn spec() -> GroundingSpec {
        GroundingSpec {
            categories: cats(),
            threshold: 0.2,
            nothing: "Nothing known.".into(),
            classifier_threshold: None,
            classifier_exempt: Vec::new(),
            guide_threshold: None,
            guide: crate::manifest::default_guide(),
            guide_yes: crate::manifest::default_guide_yes(),
            positions: None,
            centre: crate::manifest::default_centre(),
            region: None,
        }
    }

    #[test]
    fn mentions_whole_words_plurals_and_names_of_two_words() {
        let c = cats();
        assert_eq!(mentions("Two dogs and a cat.", &c), vec!["dog", "cat"]);
        assert_eq!(mentions("A doggy and a catalogue.", &c), Vec::<&str>::new());
        assert_eq!(mentions("Some fishes, two buses.", &c), vec!["fish", "bus"]);
        assert_eq!(mentions("A Teddy Bears picnic; a bear.", &c), vec!["teddy bear"]);
        assert_eq!(mentions("A bear.", &c), Vec::<&str>::new());
    }

    #[test]
    fn clauses_naming_dropped_categories_go() {
        let c = cats();
        let drop = |caption: &str, names: &[&str]| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            without(caption, &names, &c, "No known object.")
        };
        let table = [
            ("There is a pig on the left and a goat on the right.", &["pig"][..], "There is a goat on the right."),
            ("There is a pig on the left and a goat on the right.", &["goat"], "There is a pig on the left."),
            ("A horse on the left and a pig on the right.", &["pig"], "No known object."),
            ("A pig on the left and a goat on the right.", &["pig"], "A goat on the right."),
            ("A photo of a dog.", &["dog"], "No known object."),
            ("A photo of a dog and a cat.", &["dog"], "A photo of a cat."),
            ("A dog, a pig and a cat.", &["pig"], "A dog and a cat."),
            ("A dog, a pig and a cat.", &["cat"], "A dog and a pig."),
            ("A dog, a pig, and a cat!", &["dog"], "A pig and a cat!"),
            ("I see two teddy bears and a fish", &["teddy bear"], "I see a fish"),
            ("There is a fish in the centre.", &["fish", "goat"], "No known object."),
            ("There is a pig on the left and there is a goat.", &["pig"], "There is a goat."),
        ];
        for (caption, names, expect) in table {
            assert_eq!(drop(caption, names), expect, "{caption:?} without {names:?}");
        }
    }

    #[test]
    fn the_check_keeps_supported_names_and_drops_the_rest() {
        let spec = spec();
        let n = spec.categories.len();
        let g = grounding(spec, vec![None; n], None);
        let support = [0.5, 0.1, 0.19, 0.2, 0.0, 0.0, 0.0];
        let check = |caption: &str, support: &[f32]| {
            let mut text = caption.to_owned();
            let removed = g.check(&mut text, &Support { tokens: support.to_vec(), ..Support::default() });
            (text, removed)
        };
        let (kept, removed) = check("A dog on the left and a goat on the right.", &support);
        assert_eq!((kept.as_str(), removed), ("A dog on the left and a goat on the right.", None));
        let (text, removed) = check("A cat on the left and a dog on the right.", &support);
        assert_eq!(text, "A dog on the right.");
        let removed = removed.expect("the cat is removed");
        assert_eq!(removed.unchecked, "A cat on the left and a dog on the right.");
        assert_eq!(removed.dropped, vec!["cat"]);
        assert_eq!(check("A pig.", &support).0, "Nothing known.");
        assert_eq!(check("No known object.", &support).0, "No known object.");
        // A support list that is too short counts as no support.
        assert_eq!(check("A goat.", &support[..2]).0, "Nothing known.");
    }

    #[test]
    fn the_detectors_own_scores_drop_names_it_scores_low_and_leave_the_rest_to_the_tokens() {
        // Columns: dog 0, cat 2, pig 3 (zero over the frame: no classifier class under it); goat,
        // fish, teddy bear and bus have none.
        let spec = GroundingSpec { classifier_threshold: Some(0.01), ..spec() };
        let n = spec.categories.len();
        let columns = vec![Some(0), Some(2), Some(3), None, None, None, None];
        let g = grounding(spec, columns, None);
        let tokens = ImageTokens { class_scores: vec![0.4, 0.9, 0.005, 0.0], ..ImageTokens::default() };
        let classifier = classifier_support(&tokens, &g.columns);
        assert_eq!(classifier, [Some(0.4), Some(0.005), None, None, None, None, None]);
        // Every name is supported by the tokens; the cat's own score is below 0.01.
        let support = Support { tokens: vec![0.5; n], classifier, ..Support::default() };
        let check = |caption: &str| {
            let mut text = caption.to_owned();
            (g.check(&mut text, &support).map(|c| c.dropped), text)
        };
        assert_eq!(check("A dog and a cat."), (Some(vec!["cat".to_owned()]), "A dog.".to_owned()));
        assert_eq!(check("A pig and a goat."), (None, "A pig and a goat.".to_owned()), "no score: the tokens decide");
        assert_eq!(check("A cat.").1, "Nothing known.");
        // Without a detector's scores (a frame from a stack without one) the tokens decide alone.
        let none = classifier_support(&ImageTokens::default(), &g.columns);
        assert!(none.iter().all(Option::is_none));
        let mut text = "A cat.".to_owned();
        assert_eq!(g.check(&mut text, &Support { tokens: vec![0.5; n], classifier: none, ..Support::default() }), None);
        // A category exempt from the detector's check stands on the tokens alone.
        let exempt = grounding(
            GroundingSpec { classifier_exempt: vec!["cat".into()], ..g.spec.clone() },
            g.columns.clone(),
            None,
        );
        let mut text = "A dog and a cat.".to_owned();
        assert_eq!(exempt.check(&mut text, &support), None);
        // A low token support drops a name whatever the detector says.
        let mut text = "A dog and a cat.".to_owned();
        let low = Support { tokens: vec![0.1; n], classifier: vec![Some(0.9); n], ..Support::default() };
        assert_eq!(g.check(&mut text, &low).map(|c| c.dropped), Some(vec!["dog".to_owned(), "cat".to_owned()]));
    }

    #[test]
    fn a_caption_naming_nothing_is_guided_by_the_best_classifier_score_that_reaches_the_threshold() {
        let spec = GroundingSpec { guide_threshold: Some(0.9), ..spec() };
        let n = spec.categories.len();
        let columns = vec![Some(0), Some(1), Some(2), Some(3), None, None, None];
        let g = grounding(spec, columns, None);
        // The guide alone makes the check read the classifier's columns.
        let tokens = ImageTokens { class_scores: vec![0.3, 0.2, 0.0, 0.95], ..ImageTokens::default() };
        let support = Support { tokens: vec![0.0; n], ..g.support(&tokens) };
        assert_eq!(support.classifier[..4], [Some(0.3), Some(0.2), None, Some(0.95)]);
        let guide = g.guide("Nothing known.", &support).expect("the goat scores 0.95");
        assert_eq!((guide.category.as_str(), guide.start.as_str()), ("goat", "There is a goat"));
        assert_eq!(g.guide("A dog on the left.", &support), None, "a caption that names a category is the LLM's");
        let low = ImageTokens { class_scores: vec![0.3, 0.2, 0.0, 0.85], ..ImageTokens::default() };
        assert_eq!(g.guide("Nothing known.", &g.support(&low)), None, "below the threshold");
        assert_eq!(g.guide("Nothing known.", &g.support(&ImageTokens::default())), None, "no scores (no detector)");
        // The guided caption keeps its category whatever the tokens say; the rest is checked.
        let mut text = "There is a goat on the left and a dog on the right.".to_owned();
        let checked = g.check_but(&mut text, &support, Some("goat")).expect("the dog has no support");
        assert_eq!((text.as_str(), checked.dropped), ("There is a goat on the left.", vec!["dog".to_owned()]));
        let article = GroundingSpec { guide: "I see {a} {name}".into(), ..g.spec.clone() };
        assert_eq!(article.guide_start("orange"), "I see an orange");
    }

    #[test]
    fn presence_questions_name_one_category_and_nothing_else() {
        let cats = cats();
        let table: &[(&str, Option<&str>)] = &[
            ("Is there a goat in the image?", Some("goat")),
            ("is there a goat", Some("goat")),
            ("Are there any dogs?", Some("dog")),
            ("Are there two buses here?", Some("bus")),
            ("Do you see a teddy bear in this picture?", Some("teddy bear")),
            ("Can you see fish?", Some("fish")),
            ("Is there a goat on the left?", None),
            ("Is there a goat or a dog?", None),
            ("Is the goat eating?", None),
            ("Where is the goat?", None),
            ("Is there a bear?", None),
            ("Is there a horse?", None),
            ("Is there?", None),
        ];
        for (question, expect) in table {
            assert_eq!(presence(question, &cats), *expect, "{question:?}");
        }
        let table: &[(&str, Option<&str>)] = &[
            ("Where is the goat?", Some("goat")),
            ("Where are the dogs in the image?", Some("dog")),
            ("where is a teddy bear", Some("teddy bear")),
            ("Where is the goat going?", None),
            ("Is there a goat?", None),
            ("Where is the horse?", None),
        ];
        for (question, expect) in table {
            assert_eq!(position(question, &cats), *expect, "{question:?}");
        }
    }

    #[test]
    fn a_position_answer_is_guided_by_where_the_tokens_place_the_category() {
        let spec = GroundingSpec { positions: Some(crate::manifest::default_positions()), ..spec() };
        let n = spec.categories.len();
        // Two rows of four cells. The tokens place the dog in column 0 (its centre at 0.125 of
        // the width), the cat in column 3, the pig in column 2 (0.625); the goat nowhere (its
        // best token is no cell).
        let g = grounding(spec, vec![None; n], Some([2, 4]));
        let placed = vec![Some(0.125), Some(0.875), Some(0.625), None, None, None, None];
        let support = Support { tokens: vec![0.3; n], placed, ..Support::default() };
        let start = |q: &str| g.answer_guide(q, &support).map(|guide| guide.start);
        assert_eq!(start("Where is the dog?").as_deref(), Some("On the left"));
        assert_eq!(start("Where is the cat?").as_deref(), Some("On the right"));
        assert_eq!(start("Where are the pigs?").as_deref(), Some("In the centre"));
        assert_eq!(start("Where is the goat?"), None, "its best token is no cell");
        assert_eq!(start("Is there a dog?"), None, "presence needs guide_threshold or a caption naming it");
        let guide = g.answer_guide("Where is the dog?", &support).unwrap();
        assert_eq!((guide.kind, guide.score), (GuideKind::Position, 0.3));
        // The LLM's answer stands when it names the same side, or none (it does not place it).
        assert!(["On the left.", "The dog is on the left.", "There is no dog."].iter().all(|a| g.agrees(a, &guide)));
        assert!(!["On the right.", "Left or right.", "In the centre.", "In the center."]
            .iter()
            .any(|a| g.agrees(a, &guide)));
        let middle = g.answer_guide("Where is the pig?", &support).unwrap();
        assert!(g.agrees("The pig is in the center.", &middle) && g.agrees("In the centre.", &middle));
        // Phrases that spell the middle "center" read the same way.
        let center = ["On the left".to_owned(), "In the center".to_owned(), "On the right".to_owned()];
        let us = Grounding { spec: GroundingSpec { positions: Some(center), ..g.spec.clone() }, ..g.clone() };
        let (left, middle) = (
            us.answer_guide("Where is the dog?", &support).unwrap(),
            us.answer_guide("Where is the pig?", &support).unwrap(),
        );
        assert!(!us.agrees("In the center.", &left) && !us.agrees("In the centre.", &left));
        assert!(us.agrees("In the centre.", &middle) && us.agrees("The pig is in the center.", &middle));
        // The manifest's centre band decides: narrowed to [0.4, 0.6], the pig's cell (centre at
        // 0.625) is on the right; widened to [0.1, 0.9], the dog's (0.125) is in the centre.
        let band = |centre: [f32; 2], q: &str| {
            let us = Grounding { spec: GroundingSpec { centre, ..g.spec.clone() }, ..g.clone() };
            us.answer_guide(q, &support).map(|guide| guide.start)
        };
        assert_eq!(band([0.4, 0.6], "Where is the pig?").as_deref(), Some("On the right"));
        assert_eq!(band([0.1, 0.9], "Where is the dog?").as_deref(), Some("In the centre"));
        // Without positions, or without a grid of cells, no guide.
        let off = Grounding { spec: GroundingSpec { positions: None, ..g.spec.clone() }, ..g.clone() };
        assert_eq!(off.answer_guide("Where is the dog?", &support), None);
        let no_grid = Grounding { cells: None, ..g.clone() };
        assert_eq!(no_grid.answer_guide("Where is the dog?", &support), None);
    }

    #[test]
    fn the_detector_places_a_category_it_has_a_class_of_where_that_class_scores_best() {
        let spec = GroundingSpec { positions: Some(crate::manifest::default_positions()), ..spec() };
        let n = spec.categories.len();
        // The detector's classes: column 0 "cat", column 1 "dog" (COCO's own), 2 "imagenet dog".
        let mut g = grounding(spec, vec![None; n], Some([2, 4]));
        g.classes = vec![Some(1), Some(0), None, None, None, None, None];
        // Its best "dog" anchor at 0.8 of the width, "cat" at 0.1; the tokens place the dog on
        // the left (column 0) and the cat and the pig in the centre (column 2).
        let tokens =
            ImageTokens { class_scores: vec![0.4, 0.3, 0.9], class_x: vec![0.1, 0.8, 0.5], ..ImageTokens::default() };
        let by_tokens = vec![Some(0.125), Some(0.625), Some(0.625), None, None, None, None];
        let support = Support { tokens: vec![0.3; n], placed: by_tokens.clone(), ..g.support(&tokens) };
        assert_eq!(&support.located[..3], [Some(0.8), Some(0.1), None]);
        let start = |g: &Grounding, support: &Support, q: &str| g.answer_guide(q, support).map(|guide| guide.start);
        assert_eq!(
            start(&g, &support, "Where is the dog?").as_deref(),
            Some("On the right"),
            "the detector's, not the tokens'"
        );
        assert_eq!(start(&g, &support, "Where is the cat?").as_deref(), Some("On the left"));
        assert_eq!(start(&g, &support, "Where is the pig?").as_deref(), Some("In the centre"), "no class: the tokens'");
        // A class the detector could not place (NaN) leaves it to the tokens.
        let unplaced = ImageTokens { class_x: vec![f32::NAN, f32::NAN, 0.5], ..tokens };
        let support = Support { placed: by_tokens, ..g.support(&unplaced) };
        assert_eq!(start(&g, &support, "Where is the dog?").as_deref(), Some("On the left"));
    }

    #[test]
    fn a_presence_answer_is_guided_to_yes_when_the_classifier_is_sure_of_the_category_asked_about() {
        let spec = GroundingSpec { guide_threshold: Some(0.9), ..spec() };
        let columns = vec![Some(0), Some(1), Some(2), Some(3), None, None, None];
        let g = grounding(spec, columns, None);
        let tokens = ImageTokens { class_scores: vec![0.3, 0.2, 0.0, 0.95], ..ImageTokens::default() };
        let support = g.support(&tokens);
        let guide = g.answer_guide("Is there a goat in the image?", &support).expect("the goat scores 0.95");
        assert_eq!((guide.category.as_str(), guide.score, guide.start.as_str()), ("goat", 0.95, "Yes"));
        assert_eq!(g.answer_guide("Is there a dog?", &support), None, "the dog scores 0.3");
        assert_eq!(g.answer_guide("Is there a fish?", &support), None, "no column scores the fish");
        assert_eq!(g.answer_guide("Where is the goat?", &support), None, "not a presence question");
        assert_eq!(g.answer_guide("Is there a goat?", &g.support(&ImageTokens::default())), None, "no detector");
        let off = Grounding { spec: GroundingSpec { guide_threshold: None, ..g.spec.clone() }, ..g.clone() };
        assert_eq!(off.answer_guide("Is there a goat?", &support), None, "no guide");
        // The LLM's own answer stands when it begins with the yes word.
        assert!(["Yes.", "yes, on the left", " YES"].iter().all(|a| g.agrees(a, &guide)));
        assert!(!["No.", "Yesterday.", "There is a goat."].iter().any(|a| g.agrees(a, &guide)));
    }

    #[test]
    fn captions_state_sides_per_clause_and_are_placed_where_the_answers_place_them() {
        let cats = cats();
        // One category and one side per clause; a clause with two names or two sides states none.
        assert_eq!(stated_sides("A dog on the left and a cat in the middle.", &cats), [("dog", 0), ("cat", 1)]);
        assert_eq!(
            stated_sides("On the right there is a goat, and two pigs to the left.", &cats),
            [("goat", 2), ("pig", 0)]
        );
        assert_eq!(stated_sides("A dog and a cat on the left.", &cats), [("cat", 0)], "the dog's clause says no side");
        assert!(stated_sides("A dog next to a cat on the left.", &cats).is_empty(), "two names in one clause");
        assert!(stated_sides("A dog on the left or on the right.", &cats).is_empty(), "two sides in one clause");
        assert!(stated_sides("A dog on the leftmost rock.", &cats).is_empty(), "whole words only");
        assert!(stated_sides("Nothing known.", &cats).is_empty());
        // The detector places the dog on the right, the tokens the cat in the centre and the pig
        // on the left; the goat nowhere.
        let spec = GroundingSpec { positions: Some(crate::manifest::default_positions()), ..spec() };
        let n = spec.categories.len();
        let g = grounding(spec, vec![None; n], Some([2, 4]));
        let support = Support {
            tokens: vec![0.3; n],
            located: vec![Some(0.9), None, None, None, None, None, None],
            placed: vec![Some(0.1), Some(0.5), Some(0.2), None, None, None, None],
            ..Support::default()
        };
        let place = |caption: &str| {
            let mut text = caption.to_owned();
            let moved = g.place(&mut text, &support);
            (text, moved)
        };
        assert_eq!(
            place("A dog on the left and a cat on the right."),
            ("A dog on the right and a cat in the centre.".to_owned(), vec!["dog".to_owned(), "cat".to_owned()])
        );
        assert_eq!(
            place("There is a pig on the left."),
            ("There is a pig on the left.".to_owned(), vec![]),
            "already there"
        );
        assert_eq!(
            place("In the middle there is a pig."),
            ("On the left there is a pig.".to_owned(), vec!["pig".to_owned()]),
            "a capital kept"
        );
        assert_eq!(place("In the middle, a pig."), ("In the middle, a pig.".to_owned(), vec![]), "two clauses");
        assert_eq!(place("A goat on the right."), ("A goat on the right.".to_owned(), vec![]), "placed nowhere");
        assert_eq!(place("A dog next to a cat on the left."), ("A dog next to a cat on the left.".to_owned(), vec![]));
        // Without positions (or a grid of cells) nothing moves.
        let off = Grounding { spec: GroundingSpec { positions: None, ..g.spec.clone() }, ..g.clone() };
        let mut text = "A dog on the left.".to_owned();
        assert!(off.place(&mut text, &support).is_empty() && text == "A dog on the left.");
        let no_grid = Grounding { cells: None, ..g.clone() };
        assert!(no_grid.place(&mut text, &support).is_empty() && text == "A dog on the left.");
    }

    #[test]
    fn a_presence_answer_follows_the_scenes_caption() {
        let spec = GroundingSpec { guide_threshold: Some(0.9), ..spec() };
        let columns = vec![Some(0), Some(1), Some(2), Some(3), None, None, None];
        let g = grounding(spec, columns, None);
        let n = g.spec.categories.len();
        // The classifier is sure of the goat only; the scene's caption names the dog and the goat.
        let tokens = ImageTokens { class_scores: vec![0.3, 0.2, 0.0, 0.95], ..ImageTokens::default() };
        let mut support = Support { tokens: (0..n).map(|i| i as f32 / 10.0).collect(), ..g.support(&tokens) };
        assert_eq!(g.answer_guide("Is there a dog?", &support), None, "before the scene is described");
        support.named = vec!["dog".into(), "goat".into()];
        let dog = g.answer_guide("Is there a dog in the image?", &support).expect("the caption names the dog");
        assert_eq!(
            (dog.category.as_str(), dog.score, dog.start.as_str(), dog.kind),
            ("dog", 0.0, "Yes", GuideKind::Named),
            "its support by the image tokens as the score"
        );
        assert_eq!(
            g.answer_guide("Is there a goat?", &support).unwrap().kind,
            GuideKind::Presence,
            "the classifier's first"
        );
        assert_eq!(g.answer_guide("Is there a cat?", &support), None, "not named, not scored");
        assert_eq!(g.answer_guide("Is there a dog on the left?", &support), None, "not only about presence");
        // Without `guide_threshold` the caption still guides.
        let off = Grounding { spec: GroundingSpec { guide_threshold: None, ..g.spec.clone() }, ..g.clone() };
        assert_eq!(off.answer_guide("Is there a goat?", &support).unwrap().kind, GuideKind::Named);
        assert!(g.agrees("Yes, a dog.", &dog) && !g.agrees("No.", &dog));
    }

    /// A token of width 2 whose cosine with `[1, 0]` is `c`.
    fn at_cosine(c: f32) -> [f32; 2] {
        [c, (1.0 - c * c).max(0.0).sqrt()]
    }

    #[test]
    fn the_tokens_place_a_category_at_the_centre_of_its_region_of_cells() {
        // A grid of two rows of four cells, each cell's cosine with the category's direction.
        let grid = [2, 4];
        // An object over the top row's four cells, pointed at most from its left edge: the best
        // cell alone puts it on the left (0.125), the region in the middle.
        let wide = [0.9, 0.85, 0.85, 0.8, 0.0, 0.1, 0.0, 0.0];
        assert_eq!(region_centre(&wide, grid, 0, None), 0.125);
        let centre = region_centre(&wide, grid, 0, Some(0.5));
        let expect = (0.9 * 0.125 + 0.85 * 0.375 + 0.85 * 0.625 + 0.8 * 0.875) / 3.4;
        assert!((centre - expect).abs() < 1e-6, "{centre} vs {expect}");
        // Cells below the fraction are not the object: at 0.95 of the best only the best cell.
        assert_eq!(region_centre(&wide, grid, 0, Some(0.95)), 0.125);
        // A second object in the far corner, not connected to the best cell, does not pull it;
        // a corner counts as connected.
        let apart = [0.9, 0.0, 0.0, 0.85, 0.0, 0.0, 0.0, 0.0];
        assert_eq!(region_centre(&apart, grid, 0, Some(0.5)), 0.125);
        let diagonal = [0.9, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0];
        assert!((region_centre(&diagonal, grid, 0, Some(0.5)) - 0.25).abs() < 1e-6);
        // A best cosine below zero: the best cell alone.
        assert_eq!(region_centre(&[-0.2, -0.3, -0.25, -0.4, -0.5, -0.5, -0.5, -0.5], grid, 0, Some(0.5)), 0.125);

        // Through the check's support: the tokens of `wide`, then a token of the whole frame that
        // points at the category more than any cell (no grid cell: placed nowhere).
        let spec = GroundingSpec { positions: Some(crate::manifest::default_positions()), region: Some(0.5), ..spec() };
        let n = spec.categories.len();
        let mut directions = vec![vec![0.0, 1.0]; n];
        directions[0] = vec![1.0, 0.0];
        let g = Grounding { directions, columns: vec![None; n], classes: vec![None; n], spec, cells: Some(grid) };
        let rows: Vec<f32> = wide.iter().flat_map(|&c| at_cosine(c)).collect();
        let tokens = ImageTokens { n_tokens: 8, n_embd: 2, data: rows.clone(), ..ImageTokens::default() };
        let support = g.support(&tokens);
        assert!((support.placed[0].unwrap() - expect).abs() < 1e-5, "{:?}", support.placed);
        assert_eq!(g.answer_guide("Where is the dog?", &support).unwrap().start, "In the centre");
        let best_cell = Grounding { spec: GroundingSpec { region: None, ..g.spec.clone() }, ..g.clone() };
        assert_eq!(
            best_cell.answer_guide("Where is the dog?", &best_cell.support(&tokens)).unwrap().start,
            "On the left"
        );
        let short = ImageTokens { n_tokens: 3, n_embd: 2, data: rows[..6].to_vec(), ..ImageTokens::default() };
        assert_eq!(g.support(&short).placed[0], None, "fewer tokens than the grid's cells: placed nowhere");
        let global = [rows, at_cosine(1.0).to_vec()].concat();
        let tokens = ImageTokens { n_tokens: 9, n_embd: 2, data: global, ..ImageTokens::default() };
        assert_eq!(g.support(&tokens).placed[0], None);
        assert_eq!(g.answer_guide("Where is the dog?", &g.support(&tokens)), None);
    }

    #[test]
    fn support_is_the_best_token_cosine_with_each_direction() {
        // Two tokens of width 3: one along x (any length), one between y and z.
        let tokens =
            ImageTokens { n_tokens: 2, n_embd: 3, data: vec![5.0, 0.0, 0.0, 0.0, 1.0, 1.0], ..ImageTokens::default() };
        let directions = [vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, -1.0]];
        let s = support(&tokens, &directions);
        let half = std::f32::consts::FRAC_1_SQRT_2;
        assert!((s[0] - 1.0).abs() < 1e-6 && (s[1] - half).abs() < 1e-6, "{s:?}");
        assert!(s[2].abs() < 1e-6, "the best of 0 and -0.71: {s:?}");
    }
}

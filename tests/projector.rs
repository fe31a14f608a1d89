//! The shipped (trained) projector through the whole real pipeline — DINOv2-S and the COCO detector on
//! ONNX Runtime, the projector, SmolLM2 on llama.cpp with the projector's LoRA adapter on the scene prefix — names what fixed
//! photos show (its first 15 categories and ones v3 added), names nothing for photos of unknown
//! things, and answers whether they show a category. These are training photos: the test guards
//! the runtime against regressions; generalisation is measured by `make eval` (models/README.md).
//! A regression in any stage (pre-processing, pooling, the projector file, the adapter and its
//! scope, the merged GGUF, the chat layout, injection of the image tokens) shows up here as a wrong or
//! missing name or a wrong yes/no.

mod common;

use common::*;
use scenecast::llm::mentions;
use scenecast::llm::Backbone;
use scenecast::llm::LlmConfig;
use scenecast::manifest::{AdapterScope, FileRef};
use scenecast::vision::ImageTokens;
use scenecast::vision::Vision;
use std::path::Path;

/// (photo, the category the caption must name): whole photos, as a camera would deliver them.
const PHOTOS: &[(&str, &str)] = &[
    ("chelsea.png", "cat"),
    ("apple.jpg", "apple"),
    ("baboon.jpg", "monkey"),
    ("coffee.png", "cup"),
    ("rocket.jpg", "rocket"),
    ("butterfly.jpg", "butterfly"),
    ("squirrel_cls.jpg", "squirrel"),
    // Categories v3 added, from GCompris's photos (the fetch's photos-gcompris-fixed part).
    ("gcompris/farm-cow.webp", "cow"),
    ("gcompris/farm-pig.webp", "pig"),
    ("gcompris/erase-goat.webp", "goat"),
    ("gcompris/cat-hammer1.webp", "hammer"),
    ("gcompris/erase-toucan.webp", "bird"),
];

/// Photos of things of no category (a koala, a crocodile): the caption names none of the 82 and
/// presence questions are answered "No.".
const UNKNOWN: &[&str] = &["gcompris/world-koala.webp", "gcompris/world-crocodile.webp"];

/// The stack of manifest `m` from the model cache: its LLM loaded with `config`, and its vision,
/// whose image tokens are as wide as that LLM's embeddings.
fn stack(m: &scenecast::manifest::Manifest, config: &LlmConfig) -> (Backbone, Vision) {
    let root = cache_root();
    let backbone = Backbone::load(m, &root, config).unwrap();
    let vision = Vision::load(&runtime(), m, &root, Some(backbone.summary().gguf.llm_width())).unwrap();
    (backbone, vision)
}

/// Every category the shipped projector was trained on (models/projector/train-v3.toml, which v5's
/// train-v5.toml extends with the detector and nothing else about the data): a caption
/// naming any other than the photo's is wrong.
fn categories() -> Vec<String> {
    let path = common::repo().join("models/projector/train-v3.toml");
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names: Vec<String> =
        config["category"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names.len(), 82, "{}: the shipped vocabulary", path.display());
    names
}

#[test]
fn the_trained_projector_names_the_objects_in_fixed_photos() {
    let m = manifest();
    assert!(!m.untrained(), "the reference stack ships the trained projector");
    let (mut backbone, mut vision) = stack(&m, &LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() });
    let categories = categories();
    let mut tokens = ImageTokens::default();
    let prompt = LlmConfig::default().caption_prompt;
    for (i, (file, category)) in PHOTOS.iter().enumerate() {
        vision.run(&photo(file), &mut tokens).unwrap();
        backbone.set_scene(i as u64, Some(&tokens)).unwrap();
        let described = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap();
        let caption = described.text;
        assert_eq!(mentions(&caption, &categories), vec![*category], "{file}: {caption:?}");
        assert_eq!(described.checked, None, "{file}: the LLM's own caption, which the image tokens support");
        // Presence questions about the same cached scene: the shown category, and the next photo's.
        let absent = PHOTOS[(i + 1) % PHOTOS.len()].1;
        for (asked, expected) in [(*category, "Yes."), (absent, "No.")] {
            let question = format!(
                "Is there {} {asked} in the image?",
                if asked.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
            );
            let answer = backbone.ask(&question, &backbone.default_options(), &mut |_| true).unwrap().text;
            assert_eq!(answer.trim(), expected, "{file}: {question}");
        }
    }
    for (i, file) in UNKNOWN.iter().enumerate() {
        vision.run(&photo(file), &mut tokens).unwrap();
        backbone.set_scene((PHOTOS.len() + i) as u64, Some(&tokens)).unwrap();
        let caption = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap().text;
        assert!(mentions(&caption, &categories).is_empty(), "{file} shows nothing known: {caption:?}");
        let answer =
            backbone.ask("Is there a dog in the image?", &backbone.default_options(), &mut |_| true).unwrap().text;
        assert_eq!(answer.trim(), "No.", "{file}: is there a dog?");
    }
    // Image tokens must not take over questions that are not about the image.
    let answer =
        backbone.ask("What is the capital of France?", &backbone.default_options(), &mut |_| true).unwrap().text;
    assert!(answer.contains("Paris"), "{answer:?}");
}

#[test]
fn image_tokens_point_at_the_name_of_what_a_photo_shows() {
    // The grounding loss points each image token over an object at the LLM's embedding of the
    // object's name: read back through the runtime (`eval::support`, what `scenecast eval` records
    // per scene), the name of what each fixed photo shows is the best supported of the 82
    // categories, and every shown category's support stands above the best-supported category of
    // the unknown photos. (Printed: each photo's best three. With v7, shown 0.49 to 0.83, unknown
    // below 0.07.)
    let m = manifest();
    let (backbone, mut vision) = stack(&m, &LlmConfig { threads: 1, ..LlmConfig::default() });
    let categories = categories();
    let directions = scenecast::llm::name_directions(&backbone, &categories).unwrap();
    let mut tokens = ImageTokens::default();
    let mut best = |file: &str| {
        vision.run(&photo(file), &mut tokens).unwrap();
        let support = scenecast::llm::support(&tokens, &directions);
        let mut ranked: Vec<(f32, &str)> = support.iter().copied().zip(categories.iter().map(String::as_str)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("{file}: {:?}", &ranked[..3]);
        ranked
    };
    let mut shown_support = Vec::new();
    for (file, category) in PHOTOS {
        let ranked = best(file);
        let at = ranked.iter().position(|(_, c)| c == category).unwrap();
        assert_eq!(at, 0, "{file}: {category} ranks {} of 82: {:?}", at + 1, &ranked[..3]);
        shown_support.push(ranked[at].0);
    }
    for file in UNKNOWN {
        let top = best(file)[0].0;
        assert!(shown_support.iter().all(|s| *s > top), "{file}: best support {top}, shown {shown_support:?}");
    }
}

#[test]
fn the_caption_check_drops_names_the_image_tokens_do_not_support() {
    // The reference manifest's [grounding]: its vocabulary is the projector's, and on real image
    // tokens the check keeps the name of what a photo shows and drops a name it does not show.
    let root = cache_root();
    let m = manifest();
    let spec = m.grounding.clone().expect("the reference manifest checks captions");
    assert_eq!(spec.categories, categories(), "the check's vocabulary is the projector's");
    let config = LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() };
    let (mut backbone, mut vision) = stack(&m, &config);
    let mut tokens = ImageTokens::default();
    let mut scene = |backbone: &mut Backbone, id: u64, file: &str| {
        vision.run(&photo(file), &mut tokens).unwrap();
        backbone.set_scene(id, Some(&tokens)).unwrap();
    };
    scene(&mut backbone, 0, "chelsea.png");
    // The caption as checked, and what the check removed.
    let check = |backbone: &Backbone, text: &str| {
        let mut text = text.to_owned();
        let support = backbone.scene_support().expect("a scene with an image");
        let removed = backbone.grounding().unwrap().check(&mut text, support);
        (text, removed)
    };
    let (text, removed) = check(&backbone, "A cat on the left and a whale on the right.");
    let dropped = removed.map(|r| r.dropped).unwrap_or_default();
    assert_eq!((text.as_str(), dropped.as_slice()), ("A cat on the left.", &["whale".to_owned()][..]));
    assert_eq!(check(&backbone, "A photo of a cat.").1, None, "the shown category stays");
    // A koala is none of the 82: every name goes, and the caption says so.
    scene(&mut backbone, 1, UNKNOWN[0]);
    assert_eq!(check(&backbone, "A photo of a bear.").0, spec.nothing);
    let removed = check(&backbone, "A photo of a whale and a rocket.").1.expect("both removed");
    assert_eq!(removed.dropped, ["whale", "rocket"]);
    // A scene without an image has no support, and its captions are not checked.
    backbone.set_scene(2, None).unwrap();
    assert!(backbone.scene_support().is_none());
    // `llm.ground_captions = false`: captions as the LLM writes them.
    let off = Backbone::load(&m, &root, &LlmConfig { ground_captions: false, ..config }).unwrap();
    assert!(off.grounding().is_none());
}

#[test]
fn calibrate_takes_the_threshold_from_the_captions_of_training_objects() {
    // `scenecast calibrate` on a set of the fixed photos (kind "photo"): every caption names its
    // photo's category (the first test), so keeping 95 % of 12 correct names keeps all of them and
    // the threshold is the least support among them, which stands above the unknown photos' best.
    let dir = tempfile::tempdir().unwrap();
    let photos = cache_root().join("models/photos");
    let mut scenes: Vec<serde_json::Value> = PHOTOS
        .iter()
        .map(|(file, category)| serde_json::json!({"image": photos.join(file), "kind": "photo", "objects": [category]}))
        .collect();
    scenes
        .extend(UNKNOWN.iter().map(|f| serde_json::json!({"image": photos.join(f), "kind": "unknown", "objects": []})));
    let set = serde_json::json!({"name": "fixed", "categories": categories(), "caption_prompt": LlmConfig::default().caption_prompt, "scenes": scenes});
    let set_path = write_temp(dir.path(), "set.json", set.to_string().as_bytes());
    let set_arg = set_path.to_str().unwrap();

    // The default kinds are the training set's; this set has no "heldout-pair".
    let (ok, _, err) = scenecast(&["calibrate", set_arg], &[]);
    assert!(
        !ok && err.contains("no scene of kind \"heldout-pair\" in the evaluation set; it has photo, unknown"),
        "{err}"
    );
    let (ok, _, err) = scenecast(&["calibrate", set_arg, "--kind", "photo", "--keep", "1.5"], &[]);
    assert!(!ok && err.contains("--keep 1.5: expected a share in (0, 1]"), "{err}");
    let (ok, _, err) = scenecast(&["calibrate", set_arg, "--kind", "photo", "--guide", "1.5"], &[]);
    assert!(!ok && err.contains("--guide 1.5: expected a score in (0, 1]"), "{err}");

    let (ok, section, err) = scenecast(&["calibrate", set_arg, "--kind", "photo"], &[]);
    assert!(ok, "{err}");
    assert!(err.contains("keeps 95 % of 12 correct names"), "{err}");
    let reference = include_str!("../models/reference.toml");
    let text = scenecast::manifest::with_grounding(reference, &section);
    let written = scenecast::manifest::Manifest::parse(&text, "calibrated", Path::new(".")).unwrap().grounding.unwrap();
    assert_eq!(written.categories, categories());
    let m = manifest();
    // The guide is set, not calibrated: the loaded manifest's carries over.
    let guide = m.grounding.as_ref().and_then(|g| g.guide_threshold);
    assert_eq!((written.guide_threshold, guide.is_some()), (guide, true), "{section}");

    let (backbone, mut vision) = stack(&m, &LlmConfig { threads: 1, ..LlmConfig::default() });
    let directions = scenecast::llm::name_directions(&backbone, &categories()).unwrap();
    let mut tokens = ImageTokens::default();
    let mut support = |file: &str| {
        vision.run(&photo(file), &mut tokens).unwrap();
        scenecast::llm::support(&tokens, &directions)
    };
    let at = |name: &str| categories().iter().position(|c| c == name).unwrap();
    let least = PHOTOS.iter().map(|(f, c)| support(f)[at(c)]).fold(f32::MAX, f32::min);
    assert!(
        (written.threshold - least).abs() < 1e-3,
        "threshold {} against the least support {least}",
        written.threshold
    );
    for file in UNKNOWN {
        let best = support(file).into_iter().fold(f32::MIN, f32::max);
        assert!(best < written.threshold, "{file}: best support {best} reaches the threshold {}", written.threshold);
    }

    // `--classifier-kind`: the classifier's threshold from the names of some kinds only. With the
    // GCompris photos as a kind of their own, the tokens' threshold is the one above (every
    // scene's names), the classifier's the least score of the GCompris photos' categories.
    let gcompris = |file: &str| file.starts_with("gcompris/");
    let split: Vec<serde_json::Value> = PHOTOS
        .iter()
        .map(|(file, category)| {
            let kind = if gcompris(file) { "gcompris" } else { "photo" };
            serde_json::json!({"image": photos.join(file), "kind": kind, "objects": [category]})
        })
        .collect();
    let split = serde_json::json!({"name": "split", "categories": categories(), "caption_prompt": LlmConfig::default().caption_prompt, "scenes": split});
    let split_path = write_temp(dir.path(), "split.json", split.to_string().as_bytes());
    let split_arg = split_path.to_str().unwrap();
    let (ok, _, err) = scenecast(&["calibrate", split_arg, "--kind", "photo", "--classifier-kind", "gcompris"], &[]);
    assert!(!ok && err.contains("--classifier-kind gcompris: not among the scenes calibrated on"), "{err}");
    let args =
        ["calibrate", split_arg, "--kind", "photo", "--kind", "gcompris", "--classifier-kind", "gcompris", "--place"];
    let (ok, section, err) = scenecast(&args, &[]);
    assert!(ok && section.replace("\n# ", " ").contains("in the scenes of kinds gcompris"), "{err}\n{section}");
    let text = scenecast::manifest::with_grounding(reference, &section);
    let by_kind = scenecast::manifest::Manifest::parse(&text, "calibrated", Path::new(".")).unwrap().grounding.unwrap();
    assert!(
        (by_kind.threshold - written.threshold).abs() < 1e-4,
        "{} against {}",
        by_kind.threshold,
        written.threshold
    );
    // --place writes the positions' phrases; without it the loaded manifest's carry over.
    assert_eq!(by_kind.positions, Some(scenecast::manifest::default_positions()), "{section}");
    assert_eq!(written.positions, m.grounding.as_ref().and_then(|g| g.positions.clone()));
    let columns = m.category_columns(&categories());
    let (mut least_all, mut least_gcompris) = (f32::MAX, f32::MAX);
    for (file, category) in PHOTOS {
        vision.run(&photo(file), &mut tokens).unwrap();
        // A category no ImageNet class falls under has no score, and does not calibrate it.
        let Some(score) = scenecast::llm::classifier_support(&tokens, &columns)[at(category)] else { continue };
        least_all = least_all.min(score);
        if gcompris(file) {
            least_gcompris = least_gcompris.min(score);
        }
    }
    assert!(least_gcompris > least_all + 1e-4, "the split must move the threshold: {least_gcompris} and {least_all}");
    let calibrated = by_kind.classifier_threshold.expect("calibrated");
    assert!((calibrated - least_gcompris).abs() < 1e-5, "{calibrated} against {least_gcompris}");

    // `--unknown-kind`: the classifier's threshold is the score that best tells the photos' names
    // from the unknown photos (koala, crocodile) by their best category score, and a category the
    // classifier does not recognise at it on its own photo is exempt from its check. These scenes
    // separate: every name the classifier judges reaches the threshold, every exempt category's
    // score and every unknown photo's best judged score fall below it. Not a --kind as well.
    // The coffee photo is in the set twice (two frames of one cup), so the classifier's median
    // score of cups is over two scenes, the least that can exempt a category.
    let (ok, _, err) = scenecast(&["calibrate", set_arg, "--kind", "photo", "--unknown-kind", "photo"], &[]);
    assert!(!ok && err.contains("--unknown-kind photo: also a --kind"), "{err}");
    let mut twice = set.clone();
    let coffee = serde_json::json!({"image": photos.join("coffee.png"), "kind": "photo", "objects": ["cup"]});
    twice["scenes"].as_array_mut().unwrap().push(coffee);
    let twice_path = write_temp(dir.path(), "twice.json", twice.to_string().as_bytes());
    let twice_arg = twice_path.to_str().unwrap();
    let (ok, section, err) = scenecast(&["calibrate", twice_arg, "--kind", "photo", "--unknown-kind", "unknown"], &[]);
    assert!(
        ok && section.replace("\n# ", " ").contains("photos of unknown things (kinds unknown)"),
        "{err}\n{section}"
    );
    assert!(err.contains("keeps 100 % of"), "{err}");
    let text = scenecast::manifest::with_grounding(reference, &section);
    let separated =
        scenecast::manifest::Manifest::parse(&text, "calibrated", Path::new(".")).unwrap().grounding.unwrap();
    let calibrated = separated.classifier_threshold.expect("calibrated");
    let exempt = &separated.classifier_exempt;
    assert!(exempt.iter().all(|c| c == "cup"), "only a category shown twice can be exempt: {exempt:?}");
    let mut scores = |file: &str| {
        vision.run(&photo(file), &mut tokens).unwrap();
        scenecast::llm::classifier_support(&tokens, &columns)
    };
    let mut least = f32::MAX;
    for (file, category) in PHOTOS {
        let Some(score) = scores(file)[at(category)] else { continue };
        if exempt.iter().any(|c| c == category) {
            assert!(score < calibrated, "{category} is exempt at {score}, above {calibrated}");
        } else {
            least = least.min(score);
        }
    }
    assert!((calibrated - least).abs() < 1e-5, "{calibrated}: expected the least judged name's score {least}");
    let names = categories();
    for file in UNKNOWN {
        let judged = scores(file).into_iter().enumerate().filter(|(i, _)| !exempt.contains(&names[*i]));
        let best = judged.filter_map(|(_, s)| s).fold(0.0, f32::max);
        assert!(best < calibrated, "{file}: its best judged score {best} reaches {calibrated}");
    }
    // The image tokens' threshold is calibrated as without it.
    assert!((separated.threshold - written.threshold).abs() < 1e-4, "{}", separated.threshold);
}

#[test]
fn the_classifiers_judge_drops_the_name_of_an_unknown_animal_and_leaves_people_to_the_tokens() {
    // The judge's threshold is set against photos of unknown things (models/README.md, "A judge
    // that knows what it does not know"). A chameleon (a held-out photo of no category): the LLM
    // names a category the image tokens support, and the classifier scores it below the
    // threshold, so it goes. An astronaut: ImageNet has no class for a person, so "person" scores
    // below the threshold too, but the category is exempt, and the caption keeps it.
    let m = manifest();
    let spec = m.grounding.clone().expect("the reference manifest checks captions");
    let threshold = spec.classifier_threshold.expect("the reference manifest has the classifier's judge");
    assert!(spec.classifier_exempt.iter().any(|c| c == "person"), "{:?}", spec.classifier_exempt);
    let config = LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() };
    let (mut backbone, mut vision) = stack(&m, &config);
    let directions = scenecast::llm::name_directions(&backbone, &spec.categories).unwrap();
    let columns = m.category_columns(&spec.categories);
    let at = |name: &str| spec.categories.iter().position(|c| c == name).unwrap();
    let prompt = LlmConfig::default().caption_prompt;
    let mut tokens = ImageTokens::default();

    vision.run(&photo("gcompris/erase-chamaeleon.webp"), &mut tokens).unwrap();
    backbone.set_scene(0, Some(&tokens)).unwrap();
    let described = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap();
    assert!(mentions(&described.text, &spec.categories).is_empty(), "a chameleon: {:?}", described.text);
    let checked = described.checked.expect("the LLM named a category, and the check removed it");
    let support = scenecast::llm::support(&tokens, &directions);
    let scores = scenecast::llm::classifier_support(&tokens, &columns);
    for name in &checked.dropped {
        let (s, c) = (support[at(name)], scores[at(name)].expect("a category the classifier scores"));
        assert!(s >= spec.threshold && c < threshold, "{name}: tokens {s}, classifier {c}: the judge drops it");
    }

    vision.run(&photo("astronaut.png"), &mut tokens).unwrap();
    backbone.set_scene(1, Some(&tokens)).unwrap();
    let described = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap();
    assert_eq!(mentions(&described.text, &spec.categories), ["person"], "{:?}", described.text);
    let person = scenecast::llm::classifier_support(&tokens, &columns)[at("person")].expect("a score");
    assert!(person < threshold, "person at {person}: kept because it is exempt, not by its score");
}

#[test]
fn captions_and_answers_the_llm_gets_wrong_are_begun_by_the_classifier_or_the_image_tokens() {
    // A photo of a Nubian ibex, a goat the projector never trained on (one of `make eval`'s held-out
    // camera photos). The image tokens do not support the name the LLM writes, so the check leaves
    // none; the ImageNet classifier puts all but a trace of its probability on goats, so the LLM
    // writes the caption again begun with "There is a goat" and places it itself. Without the
    // guide the caption says nothing known.
    let root = cache_root();
    let m = manifest();
    let spec = m.grounding.clone().expect("the reference manifest checks captions");
    let threshold = spec.guide_threshold.expect("the reference manifest guides captions");
    let config = LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() };
    let (mut backbone, mut vision) = stack(&m, &config);
    let mut tokens = ImageTokens::default();
    vision.run(&photo("gcompris/erase-nubian_ibex.webp"), &mut tokens).unwrap();
    backbone.set_scene(0, Some(&tokens)).unwrap();
    let prompt = LlmConfig::default().caption_prompt;
    let described = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap();
    let guided = described.guided.clone().expect("guided");
    assert_eq!((guided.guide.category.as_str(), guided.guide.start.as_str()), ("goat", "There is a goat"));
    assert!(guided.guide.score >= threshold, "{guided:?}");
    assert!(described.text.starts_with("There is a goat"), "{:?}", described.text);
    assert_eq!(mentions(&described.text, &categories()), ["goat"], "{:?}", described.text);
    assert_eq!(described.as_written(), guided.written);
    // Asked whether there is a goat, the LLM says no; the classifier's score begins the answer
    // with yes, and what streams is that answer alone. A question that is not only about presence
    // is the LLM's.
    let question = "Is there a goat in the image?";
    let mut streamed = String::new();
    let answer = backbone
        .ask(question, &backbone.default_options(), &mut |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    let begun = answer.guided.clone().expect("the answer is guided");
    assert_eq!((begun.guide.category.as_str(), begun.guide.start.as_str()), ("goat", spec.guide_yes.as_str()));
    assert!(answer.text.starts_with("Yes") && streamed.trim() == answer.text, "{answer:?}, streamed {streamed:?}");
    assert_eq!(scenecast::eval::yes_no(&begun.written), Some(false), "{begun:?}");
    let placed = backbone.ask("Is there a goat on the left?", &backbone.default_options(), &mut |_| true).unwrap();
    assert_eq!(placed.guided, None, "{placed:?}");
    // "Where is the goat?": the LLM says on the right; the grid cell whose image token points at
    // "goat" most is in the middle of the frame, so the answer is begun with the centre's phrase.
    let directions = scenecast::llm::name_directions(&backbone, &spec.categories).unwrap();
    let goat = spec.categories.iter().position(|c| c == "goat").unwrap();
    let (_, at) = scenecast::llm::support_at(&tokens, &directions)[goat];
    let [rows, columns] = m.cell_grid().expect("a grid of cells");
    assert!(at < rows * columns, "the best token is a cell: {at}");
    let x = ((at % columns) as f32 + 0.5) / columns as f32;
    let side = if x < 0.375 {
        "left"
    } else if x > 0.625 {
        "right"
    } else {
        "centre"
    };
    let phrases = spec.positions.clone().expect("the reference manifest places objects");
    let where_ = backbone.ask("Where is the goat?", &backbone.default_options(), &mut |_| true).unwrap();
    let placed_by = where_.guided.clone().expect("the LLM placed it elsewhere");
    assert_eq!((side, placed_by.guide.kind), ("centre", scenecast::llm::GuideKind::Position), "{where_:?}");
    assert_eq!(placed_by.guide.start, phrases[1]);
    assert_eq!(scenecast::eval::position(&where_.text), Some(side), "{where_:?}");
    assert_eq!(scenecast::eval::position(&placed_by.written), Some("right"), "{where_:?}");
    // The same scene without the guide.
    let mut unguided = m.clone();
    unguided.grounding.as_mut().unwrap().guide_threshold = None;
    let mut plain = Backbone::load(&unguided, &root, &config).unwrap();
    plain.set_scene(0, Some(&tokens)).unwrap();
    let alone = plain.describe(&prompt, &plain.default_options(), &mut |_| true).unwrap();
    assert_eq!((alone.text.as_str(), &alone.guided), (spec.nothing.as_str(), &None));
    assert_eq!(alone.as_written(), guided.written, "the LLM's own caption is the same");
    let own = plain.ask(question, &plain.default_options(), &mut |_| true).unwrap();
    assert_eq!((own.text.as_str(), &own.guided), (begun.written.as_str(), &None), "the LLM's own answer");
}

#[test]
fn a_category_the_detector_has_a_class_of_is_placed_where_that_class_scores_best() {
    // The cat of chelsea.png in the right third of a grey frame three times as wide. "cat" is one
    // of NanoDet's COCO classes: its best anchor places the cat, and the answer says so.
    let cat = photo("chelsea.png");
    let (w, h) = (cat.width() as usize, cat.height() as usize);
    let mut pixels = vec![128u8; 3 * w * h * 3];
    for (y, row) in cat.pixels().chunks_exact(w * 3).enumerate() {
        let at = (y * 3 * w + 2 * w) * 3;
        pixels[at..at + w * 3].copy_from_slice(row);
    }
    let frame = scenecast::frame::RgbImage::from_pixels((3 * w) as u32, h as u32, pixels).unwrap();
    let m = manifest();
    let config = LlmConfig { threads: 1, ..LlmConfig::default() };
    let (mut backbone, mut vision) = stack(&m, &config);
    let mut tokens = ImageTokens::default();
    vision.run(&frame, &mut tokens).unwrap();
    backbone.set_scene(0, Some(&tokens)).unwrap();
    let spec = m.grounding.as_ref().unwrap();
    let i = spec.categories.iter().position(|c| c == "cat").unwrap();
    let located = backbone.scene_support().unwrap().located[i].expect("COCO's cat class places the cat");
    assert!(located > spec.centre[1], "the cat's best anchor at {located} of the width");
    let answer = backbone.ask("Where is the cat?", &backbone.default_options(), &mut |_| true).unwrap();
    assert_eq!(scenecast::eval::position(&answer.text), Some("right"), "{answer:?}");
    // A caption that puts the cat on the left is placed again where the answer places it.
    let grounding = backbone.grounding().expect("the reference manifest checks captions");
    let mut caption = "There is a cat on the left and nothing else.".to_owned();
    let moved = grounding.place(&mut caption, backbone.scene_support().unwrap());
    assert_eq!((caption.as_str(), moved), ("There is a cat on the right and nothing else.", vec!["cat".to_owned()]));
    // The LLM's own caption of the frame comes out placed: it states a side, and placing it
    // again moves nothing.
    let prompt = LlmConfig::default().caption_prompt;
    let described = backbone.describe(&prompt, &backbone.default_options(), &mut |_| true).unwrap();
    assert!(!scenecast::llm::stated_sides(&described.text, &spec.categories).is_empty(), "{described:?}");
    let mut again = described.text.clone();
    assert_eq!(
        backbone.grounding().unwrap().place(&mut again, backbone.scene_support().unwrap()),
        Vec::<String>::new()
    );
}

/// A file in the model cache, by its cache path.
fn cached(path: &str) -> FileRef {
    FileRef { cache: Some(path.into()), path: None, sha256: None, size: None }
}

#[test]
fn the_merged_model_captions_as_the_base_model_with_the_unmerged_adapter() {
    // Projector v5's adapter was trained on every token; `make models` folds it into a copy of
    // SmolLM2 (models/merge_adapter.py, sources.toml's `merge`). The same adapter applied at run
    // time to the fetched base GGUF must name the same things, so the merged GGUF serves v5 as
    // the adapter does. This also keeps the unmerged, every-token path (users' own adapters) tested.
    let mut merged = manifest();
    merged.projector.as_mut().unwrap().file = cached("projector/dinov2s-nanodet-smollm2-v5.onnx");
    // v5 reads NanoDet's 80 COCO columns alone (the reference's detector adds the classifier's).
    merged.detector = common::nanodet_manifest().detector;
    merged.llm.file = cached("smollm2/SmolLM2-135M-Instruct.v5-merged.gguf");
    merged.llm.splits.clear();
    merged.llm.scene_model = None;
    merged.llm.adapter = None;
    merged.llm.adapter_scope = AdapterScope::All;
    let mut unmerged = merged.clone();
    unmerged.llm.file = cached("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    unmerged.llm.adapter = Some(cached("projector/dinov2s-nanodet-smollm2-v5.lora.gguf"));
    let config = LlmConfig { threads: 1, max_tokens: 24, ..LlmConfig::default() };
    let categories = categories();
    let mut captions = Vec::new();
    for m in [&merged, &unmerged] {
        let (mut backbone, mut vision) = stack(m, &config);
        let mut tokens = ImageTokens::default();
        let mut named = Vec::new();
        for (i, file) in ["chelsea.png", "gcompris/farm-cow.webp", "gcompris/world-koala.webp"].iter().enumerate() {
            vision.run(&photo(file), &mut tokens).unwrap();
            backbone.set_scene(i as u64, Some(&tokens)).unwrap();
            let caption =
                backbone.describe(&config.caption_prompt, &backbone.default_options(), &mut |_| true).unwrap();
            named.push(mentions(&caption.text, &categories));
        }
        captions.push(named);
    }
    assert_eq!(captions[0], captions[1], "merged vs unmerged adapter");
    assert_eq!(captions[0], [vec!["cat".to_owned()], vec!["cow".to_owned()], vec![]]);
}

#[test]
fn scoped_adapters_compute_on_the_scene_prefix_and_prompts_only() {
    // The reference's adapter is scoped (`llm.adapter_scope`). With scope "scene" it computes the
    // chat prefix and the image tokens, and every token after them (question, answer, text-only
    // requests) runs the base model: text-only answers equal the base GGUF's alone, captions do
    // not. With scope "prompt" it also computes the request about a scene (what the model
    // reads), not the answer nor text-only requests. Scope "questions" computes a question's
    // prompt as "prompt" does and a caption's as "scene" does. The same adapter runs in every scope,
    // applied by llama.cpp at run time (no `scene_model`). The reference itself folds it into a
    // scene model (`llm.scene_model`), which must do what scope "scene" does.
    let reference = manifest();
    assert!(
        reference.llm.adapter_scope.is_scoped() && reference.llm.scene_model.is_some(),
        "the reference's adapter is scoped ({:?}) and folded into a scene model",
        reference.llm.adapter_scope
    );
    let mut base = reference.clone();
    base.llm.adapter = None;
    base.llm.adapter_scope = AdapterScope::All;
    base.llm.scene_model = None;
    let with_scope = |scope| {
        let mut m = reference.clone();
        m.llm.adapter_scope = scope;
        m.llm.scene_model = None;
        m
    };
    let stacks = [
        base,
        with_scope(AdapterScope::All),
        with_scope(AdapterScope::Scene),
        with_scope(AdapterScope::Prompt),
        with_scope(AdapterScope::Questions),
        reference.clone(),
    ];
    let config = LlmConfig { threads: 1, max_tokens: 40, ..LlmConfig::default() };
    let story = "Write a short story about a robot who learns to paint.";
    let question = "What is the animal in the image doing? Answer in two sentences.";
    let (mut texts, mut captions, mut answers, mut states) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in &stacks {
        let (mut backbone, mut vision) = stack(m, &config);
        texts.push(backbone.ask(story, &backbone.default_options(), &mut |_| true).unwrap().text);
        let mut tokens = ImageTokens::default();
        vision.run(&photo("chelsea.png"), &mut tokens).unwrap();
        backbone.set_scene(1, Some(&tokens)).unwrap();
        // Right after the scene, as every caption comes: the hidden states after a description
        // read what the caption prompt's tokens hold (and whether the adapter was off for them).
        states.push(backbone.signal_states(&config.caption_prompt, "A cat.", " Picture:").unwrap());
        answers.push(backbone.ask(question, &backbone.default_options(), &mut |_| true).unwrap().text);
        backbone.set_scene(1, Some(&tokens)).unwrap();
        captions
            .push(backbone.describe(&config.caption_prompt, &backbone.default_options(), &mut |_| true).unwrap().text);
        // After a scene, a text-only request still runs as before it.
        backbone.set_scene(2, None).unwrap();
        let again = backbone.ask(story, &backbone.default_options(), &mut |_| true).unwrap().text;
        assert_eq!(&again, texts.last().unwrap(), "a text request after a scene");
    }
    let [base, every, scene, prompt, questions, folded] = [0, 1, 2, 3, 4, 5];
    assert_ne!(
        texts[every], texts[base],
        "the adapter on every token changes a text-only answer (else this test shows nothing)"
    );
    assert_eq!(texts[scene], texts[base], "a scene-scoped adapter leaves text-only requests to the base model");
    assert_ne!(captions[scene], captions[base], "a scene-scoped adapter computes the scene prefix: {captions:?}");
    assert_eq!(texts[prompt], texts[base], "a prompt-scoped adapter leaves text-only requests to the base model");
    assert_ne!(states[prompt], states[scene], "a prompt-scoped adapter computes the caption prompt");
    assert_ne!(states[scene], states[every], "a scene-scoped adapter does not compute the caption prompt");
    assert_ne!(answers[prompt], answers[scene], "a prompt-scoped adapter computes the question: {answers:?}");
    // "questions": the question as "prompt" reads it, the caption as "scene" does.
    assert_eq!(texts[questions], texts[base], "a questions-scoped adapter leaves text-only requests to the base model");
    assert_eq!(answers[questions], answers[prompt], "a questions-scoped adapter computes the question");
    assert_eq!(
        captions[questions], captions[scene],
        "a questions-scoped adapter leaves the caption prompt to the base model"
    );
    assert_eq!(states[questions], states[scene], "the description's states are a caption's");
    // The scene model: its cache of the scene prefix is the adapter's (to Q8_0's rounding of the
    // folded weights), and everything after it is the base model's.
    assert_eq!(texts[folded], texts[base], "the scene model leaves text-only requests to the base model");
    assert_eq!(captions[folded], captions[scene], "the scene model captions as the scene-scoped adapter");
    // An answer of two sentences may part from the adapter's late (Q8_0's rounding of the folded
    // weights tips a near tie), but not in what it says of the scene: the same words first.
    let first_words = |a: &str| {
        a.split_whitespace()
            .take(6)
            .map(|w| w.trim_matches(|c: char| c.is_ascii_punctuation()).to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        first_words(&answers[folded]),
        first_words(&answers[scene]),
        "the scene model answers as the scene-scoped adapter: {answers:?}"
    );
    let cosine = |a: &[f32], b: &[f32]| {
        let dot = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
    };
    let (near, far) = (cosine(&states[folded], &states[scene]), cosine(&states[folded], &states[base]));
    assert!(near > 0.99 && far < 0.9, "the description's states: {near} to the adapter's, {far} to the base's");
}

/// `scenecast caption` over several photos in one process (models loaded once) writes, for each
/// photo, the caption it writes for that photo alone: nothing of one photo leaks into the next.
#[test]
fn captioning_several_photos_in_one_process_equals_one_at_a_time() {
    let photos = cache_root().join("models/photos");
    let paths: Vec<String> =
        ["chelsea.png", "coffee.png", "rocket.jpg"].iter().map(|p| photos.join(p).display().to_string()).collect();
    let lines = |args: &[&str]| -> Vec<serde_json::Value> {
        let (ok, stdout, stderr) = scenecast(&[&["caption", "--json"], args].concat(), &[]);
        assert!(ok, "{stderr}");
        stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let all: Vec<&str> = paths.iter().map(String::as_str).collect();
    let together = lines(&all);
    assert_eq!(together.len(), 3);
    for (path, caption) in paths.iter().zip(&together) {
        assert_eq!(caption["image"].as_str(), Some(path.as_str()));
        let alone = lines(&[path.as_str()]);
        assert_eq!(caption["text"], alone[0]["text"], "{path}");
    }
    assert_ne!(together[0]["text"], together[1]["text"], "different photos, different captions");
    // A missing photo is an error that names it.
    let (ok, _, stderr) = scenecast(&["caption", &paths[0], "/nonexistent/frame.png"], &[]);
    assert!(!ok && stderr.contains("/nonexistent/frame.png"), "{stderr}");
}

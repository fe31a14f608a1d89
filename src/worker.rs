//! The inference worker: one thread that owns the models. It captions new frames and answers
//! questions about the latest one, questions first, and hands results to the MQTT side.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tokio::sync::mpsc::Sender;

use crate::backbone::Backbone;
use crate::frame::Frame;
use crate::mqtt::{Outgoing, Question};
use crate::projector::ImageTokens;
use crate::source::FrameSource;
use crate::vision::Vision;
use crate::wire::{self, Reply, RequestError};

/// What the worker owns.
pub struct Worker {
    /// The vision path.
    pub vision: Vision,
    /// The LLM.
    pub backbone: Backbone,
    /// Where frames come from.
    pub source: Box<dyn FrameSource>,
    /// The model stack's name, reported with captions.
    pub model: String,
}

/// The frame whose scene is in the backbone's cache.
struct Scene {
    seq: u64,
    ts_ms: u64,
}

fn ts_ms(frame: &Frame) -> u64 {
    frame.captured_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Worker {
    /// Runs until `stop` is set or the question channel closes. Results go to `out`.
    pub fn run(mut self, questions: Receiver<Question>, out: Sender<Outgoing>, stop: Arc<AtomicBool>) {
        let mut tokens = ImageTokens::default();
        let mut scene: Option<Scene> = None;
        while !stop.load(Ordering::SeqCst) {
            // Questions first.
            match questions.recv_timeout(Duration::from_millis(50)) {
                Ok(question) => {
                    self.answer(question, scene.as_ref(), &out, &stop);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            match self.source.poll() {
                Ok(Some(frame)) => match self.caption(&frame, &mut tokens, &stop) {
                    Ok(caption) => {
                        scene = Some(Scene { seq: frame.seq, ts_ms: ts_ms(&frame) });
                        if out.blocking_send(Outgoing::Caption(caption)).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::error!(frame = frame.seq, "captioning failed: {e}"),
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("frame source: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn options(&self, stop: &Arc<AtomicBool>) -> crate::backbone::GenerateOptions {
        crate::backbone::GenerateOptions { cancel: Some(stop.clone()), ..self.backbone.default_options() }
    }

    fn caption(&mut self, frame: &Frame, tokens: &mut ImageTokens, stop: &Arc<AtomicBool>) -> Result<wire::Caption, Box<dyn std::error::Error>> {
        let start = Instant::now();
        let vt = self.vision.run(&frame.image, tokens)?;
        let prefill_ms = self.backbone.set_scene(frame.seq, Some(tokens))?;
        let prompt = self.backbone.caption_prompt().to_owned();
        let options = self.options(stop);
        let g = self.backbone.ask(&prompt, &options, &mut |_| true)?;
        if g.stop == crate::backbone::StopReason::Cancelled {
            return Err("cancelled by shutdown".into());
        }
        let timings: BTreeMap<String, f64> = [
            ("preprocess", vt.preprocess_ms),
            ("encode", vt.encode_ms),
            ("project", vt.project_ms),
            ("prefill", prefill_ms + g.prefill_ms),
            ("decode", g.decode_ms),
            ("total", start.elapsed().as_secs_f64() * 1e3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), (v * 10.0).round() / 10.0))
        .collect();
        tracing::info!(frame = frame.seq, total_ms = timings["total"], "caption: {}", g.text);
        Ok(wire::Caption { text: g.text, frame_seq: frame.seq, frame_ts_ms: ts_ms(frame), timings_ms: timings, model: self.model.clone() })
    }

    fn answer(&mut self, question: Question, scene: Option<&Scene>, out: &Sender<Outgoing>, stop: &Arc<AtomicBool>) {
        if question.expired(Instant::now()) {
            tracing::warn!(question = %question.text, "request expired while queued; not answered");
            let _ = out.blocking_send(Outgoing::Expired);
            return;
        }
        let start = Instant::now();
        let to = question.reply.clone();
        let id = to.id.clone();
        let options = self.options(stop);
        let stream = question.stream;
        let mut so_far = String::new();
        let result = self.backbone.ask(&question.text, &options, &mut |piece| {
            if stream {
                so_far.push_str(piece);
                let partial = wire::Answer { id: id.clone(), text: so_far.trim().to_owned(), done: false, frame_seq: None, frame_ts_ms: None, timings_ms: BTreeMap::new() };
                let _ = out.blocking_send(Outgoing::Reply { to: to.clone(), reply: Reply::Answer(partial) });
            }
            true
        });
        let reply = match result {
            Ok(g) => {
                let timings: BTreeMap<String, f64> = [
                    ("queue", (start - question.received_at).as_secs_f64() * 1e3),
                    ("prefill", g.prefill_ms),
                    ("decode", g.decode_ms),
                    ("ttft", g.ttft_ms),
                    ("total", start.elapsed().as_secs_f64() * 1e3),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), (v * 10.0).round() / 10.0))
                .collect();
                Reply::Answer(wire::Answer { id, text: g.text, done: true, frame_seq: scene.map(|s| s.seq), frame_ts_ms: scene.map(|s| s.ts_ms), timings_ms: timings })
            }
            Err(e) => Reply::Error(wire::ErrorReply::new(id, &RequestError::Internal(e.to_string()))),
        };
        let _ = out.blocking_send(Outgoing::Reply { to, reply });
    }
}

//! The store-and-forward spool: results produced while the broker is unreachable wait here, on
//! disk, and leave in order once it is back.
//!
//! One file per message, named by a zero-padded sequence number, so the directory listing is the
//! order. The spool is bounded by a message count; when it is full the *oldest* message is dropped
//! (a camera's newest caption matters more than its oldest) and the drop is counted. A message is
//! written to a temporary name and renamed, so a crash never leaves half a message.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A message as it will be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpooledMessage {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// The retain flag.
    pub retain: bool,
    /// MQTT v5 correlation data of a reply.
    #[serde(default)]
    pub correlation: Option<Vec<u8>>,
    /// MQTT v5 user properties.
    #[serde(default)]
    pub user_properties: Vec<(String, String)>,
    /// MQTT v5 content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// MQTT v5 Response Topic (an offloaded job's: where the worker sends the result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    /// MQTT v5 Message Expiry Interval, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry_s: Option<u32>,
}

impl SpooledMessage {
    /// A message without v5 properties.
    pub fn plain(topic: String, payload: Vec<u8>, retain: bool) -> Self {
        SpooledMessage {
            topic,
            payload,
            retain,
            correlation: None,
            user_properties: Vec::new(),
            content_type: None,
            response_topic: None,
            expiry_s: None,
        }
    }

    /// A JSON message, with per-stage timings (if any) as `<stage>_ms` user properties.
    pub fn json(
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        timings: &std::collections::BTreeMap<String, f64>,
    ) -> Self {
        SpooledMessage {
            topic,
            payload,
            retain,
            correlation: None,
            user_properties: timings.iter().map(|(k, v)| (format!("{k}_ms"), format!("{v:.1}"))).collect(),
            content_type: Some("application/json".into()),
            response_topic: None,
            expiry_s: None,
        }
    }
}

/// An error of the spool's directory.
#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    /// The file or directory.
    pub path: PathBuf,
    /// The underlying error.
    pub source: std::io::Error,
}

/// The on-disk queue.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limit: usize,
    /// Sequence numbers of the files present, oldest first.
    seqs: std::collections::VecDeque<u64>,
    next: u64,
    dropped: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError { path: path.to_owned(), source }
}

impl Spool {
    /// Opens (creating) the spool in `dir`, keeping what an earlier run left there.
    pub fn open(dir: &Path, limit: usize) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".msg")).and_then(|n| n.parse().ok()))
            .collect();
        seqs.sort_unstable();
        let next = seqs.last().map_or(0, |s| s + 1);
        let mut spool = Spool { dir: dir.to_owned(), limit: limit.max(1), seqs: seqs.into(), next, dropped: 0 };
        spool.enforce_limit()?;
        Ok(spool)
    }

    fn path_of(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.msg"))
    }

    fn enforce_limit(&mut self) -> Result<(), SpoolError> {
        while self.seqs.len() > self.limit {
            let oldest = self.seqs.pop_front().expect("non-empty");
            let path = self.path_of(oldest);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            self.dropped += 1;
        }
        Ok(())
    }

    /// Appends a message; drops the oldest when over the limit.
    pub fn push(&mut self, message: &SpooledMessage) -> Result<(), SpoolError> {
        let path = self.path_of(self.next);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(message).map_err(|e| SpoolError { path: tmp.clone(), source: e.into() })?;
        std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.seqs.push_back(self.next);
        self.next += 1;
        self.enforce_limit()
    }

    /// The oldest message, without removing it. A file that no longer parses is dropped (and
    /// counted), so one corrupt file cannot block the queue.
    pub fn front(&mut self) -> Result<Option<SpooledMessage>, SpoolError> {
        while let Some(&seq) = self.seqs.front() {
            let path = self.path_of(seq);
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            match serde_json::from_slice(&bytes) {
                Ok(message) => return Ok(Some(message)),
                Err(e) => {
                    tracing::warn!(file = %path.display(), "dropping an unreadable spooled message: {e}");
                    self.pop()?;
                    self.dropped += 1;
                }
            }
        }
        Ok(None)
    }

    /// Removes the oldest message (after it was handed to the client).
    pub fn pop(&mut self) -> Result<(), SpoolError> {
        if let Some(seq) = self.seqs.pop_front() {
            let path = self.path_of(seq);
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Messages dropped since opening.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The bound.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> SpooledMessage {
        SpooledMessage::plain("t".into(), format!("{i}").into_bytes(), false)
    }

    #[test]
    fn keeps_order_across_reopen_and_drops_the_oldest_when_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 3).unwrap();
        for i in 0..5 {
            spool.push(&msg(i)).unwrap();
        }
        assert_eq!((spool.len(), spool.dropped()), (3, 2));
        drop(spool);
        let mut spool = Spool::open(dir.path(), 3).unwrap();
        let mut out = Vec::new();
        while let Some(m) = spool.front().unwrap() {
            out.push(String::from_utf8(m.payload).unwrap());
            spool.pop().unwrap();
        }
        assert_eq!(out, ["2", "3", "4"]);
        spool.push(&msg(9)).unwrap();
        assert_eq!(spool.front().unwrap().unwrap().payload, b"9");
    }

    #[test]
    fn a_corrupt_file_is_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        spool.push(&msg(1)).unwrap();
        spool.push(&msg(2)).unwrap();
        std::fs::write(dir.path().join(format!("{:020}.msg", 0)), b"{half").unwrap();
        assert_eq!(spool.front().unwrap().unwrap().payload, b"2");
        assert_eq!(spool.dropped(), 1);
    }
}

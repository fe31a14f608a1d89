//! systemd integration: the `sd_notify` protocol (a datagram per message to `$NOTIFY_SOCKET`), the
//! watchdog interval from `$WATCHDOG_USEC`, and whether stderr goes to the journal.
//!
//! Implemented directly (it is one `sendto`), so it works the same under systemd and in tests, where
//! a test binds its own socket and sets `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Sends notifications to the service manager; does nothing when not started by one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
}

#[derive(Debug, Clone)]
enum SocketAddr {
    Path(PathBuf),
    /// Linux abstract namespace (`@name` in `NOTIFY_SOCKET`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (absent: a no-op notifier).
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) else {
            return Notifier { socket: None };
        };
        let value = value.to_string_lossy().into_owned();
        let addr = match value.strip_prefix('@') {
            Some(name) => SocketAddr::Abstract(name.as_bytes().to_vec()),
            None => SocketAddr::Path(PathBuf::from(value)),
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Notifier { socket: Some((socket, addr)) },
            Err(e) => {
                tracing::warn!("cannot create the sd_notify socket: {e}");
                Notifier { socket: None }
            }
        }
    }

    /// True when a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` lines, e.g. `READY=1`).
    pub fn notify(&self, state: &str) {
        let Some((socket, addr)) = &self.socket else { return };
        let result = match addr {
            SocketAddr::Path(path) => socket.send_to(state.as_bytes(), path),
            SocketAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
            }
        };
        if let Err(e) = result {
            tracing::debug!("sd_notify {state:?}: {e}");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    /// A `STATUS=` line.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={status}"));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// `RELOADING=1`, then after the reload `READY=1`.
    pub fn reloading(&self) {
        self.notify("RELOADING=1");
    }
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`, when meant for this
/// process per `$WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// True when stderr is connected to the journal (systemd sets `$JOURNAL_STREAM`).
pub fn logs_to_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some_and(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_arrive_as_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier { socket: Some((UnixDatagram::unbound().unwrap(), SocketAddr::Path(path))) };
        notifier.ready("captioning");
        notifier.watchdog();
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=captioning");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let notifier = Notifier { socket: None };
        assert!(!notifier.enabled());
        notifier.ready("x");
    }
}

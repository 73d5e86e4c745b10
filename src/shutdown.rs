//! Process signals, turned into the two things the daemon does with them:
//! reload the config (SIGHUP) or stop (SIGTERM, SIGINT).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Re-read the config file.
    Reload,
    /// Stop serving and exit.
    Shutdown,
}

/// The daemon's signal handlers, installed once at start-up.
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs handlers for SIGHUP, SIGTERM and SIGINT.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.hup.recv() => Request::Reload,
            _ = self.term.recv() => Request::Shutdown,
            _ = self.int.recv() => Request::Shutdown,
        }
    }
}

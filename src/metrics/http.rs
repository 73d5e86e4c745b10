//! The daemon's own HTTP listener, with no instance labels: the handle the
//! server writes its connection counts to, so an operator sees a flood of
//! clients (and what the cap did about it) before it costs the probes.

use prometheus::{Gauge, IntCounterVec, Registry};

use super::{counter, opts};

/// Why the listener closed a connection it had accepted, before any answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Every slot under the cap had a request in progress: the new connection
    /// was closed at once.
    Limit,
    /// At the cap, the oldest connection without a request in progress (idle,
    /// still sending its request head, or still in its TLS handshake) was
    /// closed to make room for the new one.
    Evicted,
    /// The request head (or the TLS handshake) did not arrive within the
    /// read-header timeout, or a keep-alive connection stayed idle that long.
    HeaderTimeout,
}

impl Rejection {
    /// Every reason, so each series exists (at 0) from the start.
    pub const ALL: [Rejection; 3] = [Rejection::Limit, Rejection::Evicted, Rejection::HeaderTimeout];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Limit => "limit",
            Rejection::Evicted => "evicted",
            Rejection::HeaderTimeout => "header_timeout",
        }
    }
}

/// The listener's series. Cheap to clone (handles to the same series).
#[derive(Clone)]
pub struct HttpMetrics {
    open: Gauge,
    max: Gauge,
    rejected: IntCounterVec,
}

impl HttpMetrics {
    pub(super) fn register(r: &Registry) -> HttpMetrics {
        let single = |name: &str| {
            let g = Gauge::with_opts(opts(name)).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let rejected = counter(r, "cutover_http_connections_rejected_total", &["reason"]);
        for reason in Rejection::ALL {
            rejected.with_label_values(&[reason.as_str()]);
        }
        HttpMetrics {
            open: single("cutover_http_connections"),
            max: single("cutover_http_connections_max"),
            rejected,
        }
    }

    /// The cap in force.
    pub fn set_max(&self, max: usize) {
        self.max.set(max as f64);
    }

    /// Connections open now (TLS handshakes included).
    pub fn set_open(&self, open: usize) {
        self.open.set(open as f64);
    }

    /// One connection closed before it was answered.
    pub fn rejected(&self, reason: Rejection) {
        self.rejected.with_label_values(&[reason.as_str()]).inc();
    }
}

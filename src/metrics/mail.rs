//! Mail flow: the handle the ledger publishes to (as its [`MailSink`]),
//! labelled by check and route (the sending environment). Besides the
//! series it keeps each route's totals typed, for the status page.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Registry};
use serde::Serialize;

use super::opts;
use crate::ledger::{MailCount, MailSink};

/// Labels of the per-route mail series; `route` is the sending environment.
const MAIL_LABELS: [&str; 2] = ["check", "route"];

/// One mailflow route's counts, as the series say them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RouteTotals {
    /// Check name.
    pub check: String,
    /// The environment that sent.
    pub route: String,
    /// Mails the server accepted.
    pub sent: f64,
    /// Mails that could not be sent.
    pub send_failures: f64,
    /// Delivered, by the environment they landed in.
    pub delivered: BTreeMap<String, f64>,
    /// Not found within `late_after`.
    pub late: f64,
    /// Not found within `lost_after` (recovered ones included: see `recovered`).
    pub lost: f64,
    /// Found after they were counted lost; `lost - recovered` is the net loss.
    pub recovered: f64,
    /// Extra copies.
    pub duplicates: f64,
    /// Sent and neither delivered nor lost yet.
    pub in_flight: f64,
    /// Age of the oldest of those, seconds.
    pub oldest_in_flight_age_seconds: f64,
    /// When a mail last became visible, by environment, Unix seconds.
    pub last_delivered: BTreeMap<String, f64>,
    /// Mean delivery latency, seconds.
    pub mean_delivery_seconds: Option<f64>,
    /// Sum and count behind the mean.
    #[serde(skip)]
    latency: (f64, u64),
}

/// The mail-flow families. Cheap to clone (handles to the same series).
#[derive(Clone)]
pub struct MailMetrics {
    sent: IntCounterVec,
    send_failures: IntCounterVec,
    delivered: IntCounterVec,
    late: IntCounterVec,
    lost: IntCounterVec,
    recovered: IntCounterVec,
    duplicates: IntCounterVec,
    in_flight: GaugeVec,
    oldest: GaugeVec,
    delivery: HistogramVec,
    last_delivered: GaugeVec,
    totals: Arc<Mutex<BTreeMap<(String, String), RouteTotals>>>,
}

impl MailMetrics {
    pub(super) fn register(registry: &Registry) -> MailMetrics {
        let counter = |name: &str, extra: &[&str]| {
            let mut labels = MAIL_LABELS.to_vec();
            labels.extend_from_slice(extra);
            super::counter(registry, name, &labels)
        };
        let gauge = |name: &str, extra: &[&str]| {
            let mut labels = MAIL_LABELS.to_vec();
            labels.extend_from_slice(extra);
            super::gauge(registry, name, &labels)
        };
        let delivery = HistogramVec::new(
            HistogramOpts::from(opts("cutover_mail_delivery_seconds")).buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
            ]),
            &MAIL_LABELS,
        )
        .expect("valid metric");
        registry.register(Box::new(delivery.clone())).expect("unique metric");
        MailMetrics {
            sent: counter("cutover_mail_sent_total", &[]),
            send_failures: counter("cutover_mail_send_failures_total", &["reason"]),
            delivered: counter("cutover_mail_delivered_total", &["delivered_env"]),
            late: counter("cutover_mail_late_total", &[]),
            lost: counter("cutover_mail_lost_total", &[]),
            recovered: counter("cutover_mail_recovered_total", &[]),
            duplicates: counter("cutover_mail_duplicates_total", &[]),
            in_flight: gauge("cutover_mail_in_flight", &[]),
            oldest: gauge("cutover_mail_oldest_in_flight_age_seconds", &[]),
            delivery,
            last_delivered: gauge("cutover_mail_last_delivered_timestamp_seconds", &["delivered_env"]),
            totals: Default::default(),
        }
    }

    /// Every route's totals, ordered by check and route.
    pub fn routes(&self) -> Vec<RouteTotals> {
        self.totals
            .lock()
            .expect("mail totals lock")
            .values()
            .cloned()
            .collect()
    }

    fn route<T>(&self, check: &str, route: &str, f: impl FnOnce(&mut RouteTotals) -> T) -> T {
        let mut totals = self.totals.lock().expect("mail totals lock");
        let r = totals
            .entry((check.to_string(), route.to_string()))
            .or_insert_with(|| RouteTotals {
                check: check.to_string(),
                route: route.to_string(),
                ..RouteTotals::default()
            });
        f(r)
    }
}

impl MailSink for MailMetrics {
    fn add(&self, check: &str, route: &str, what: MailCount, label: &str, n: u64) {
        let counter = match what {
            MailCount::Sent => self.sent.with_label_values(&[check, route]),
            MailCount::SendFailure => self.send_failures.with_label_values(&[check, route, label]),
            MailCount::Delivered => self.delivered.with_label_values(&[check, route, label]),
            MailCount::Late => self.late.with_label_values(&[check, route]),
            MailCount::Lost => self.lost.with_label_values(&[check, route]),
            MailCount::Recovered => self.recovered.with_label_values(&[check, route]),
            MailCount::Duplicate => self.duplicates.with_label_values(&[check, route]),
        };
        counter.inc_by(n);
        self.route(check, route, |r| {
            let n = n as f64;
            match what {
                MailCount::Sent => r.sent += n,
                MailCount::SendFailure => r.send_failures += n,
                MailCount::Delivered => *r.delivered.entry(label.to_string()).or_default() += n,
                MailCount::Late => r.late += n,
                MailCount::Lost => r.lost += n,
                MailCount::Recovered => r.recovered += n,
                MailCount::Duplicate => r.duplicates += n,
            }
        });
    }

    fn delivered(&self, check: &str, route: &str, env: &str, latency: Option<f64>, visible_at: f64) {
        if let Some(seconds) = latency {
            self.delivery
                .with_label_values(&[check, route])
                .observe(seconds.max(0.0));
        }
        let last = self.last_delivered.with_label_values(&[check, route, env]);
        if visible_at > last.get() {
            last.set(visible_at);
        }
        self.route(check, route, |r| {
            if let Some(seconds) = latency {
                r.latency.0 += seconds.max(0.0);
                r.latency.1 += 1;
                r.mean_delivery_seconds = Some(r.latency.0 / r.latency.1 as f64);
            }
            r.last_delivered.insert(env.to_string(), last.get());
        });
    }

    /// Also makes the route's unlabelled counters exist at 0, so `increase()`
    /// sees their first event.
    fn in_flight(&self, check: &str, route: &str, count: u64, oldest_age: f64) {
        for c in [&self.sent, &self.late, &self.lost, &self.recovered, &self.duplicates] {
            c.with_label_values(&[check, route]);
        }
        self.in_flight.with_label_values(&[check, route]).set(count as f64);
        self.oldest.with_label_values(&[check, route]).set(oldest_age);
        self.route(check, route, |r| {
            r.in_flight = count as f64;
            r.oldest_in_flight_age_seconds = oldest_age;
        });
    }
}

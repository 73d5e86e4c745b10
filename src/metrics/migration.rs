//! The migration phase's series, with no instance labels: the handle the
//! daemon writes the phase in force to, from above the migration logic.

use std::sync::{Arc, Mutex};

use prometheus::{Gauge, GaugeVec, Registry};

use super::{gauge, opts};
use crate::config::Phase;
use crate::migration::{Current, Source};

/// The phase series. Cheap to clone (handles to the same series).
#[derive(Clone)]
pub struct MigrationMetrics {
    phase: GaugeVec,
    serving: GaugeVec,
    manual: Gauge,
    /// The `env` label currently set on `serving`, so a change removes it.
    serving_now: Arc<Mutex<Option<String>>>,
}

impl MigrationMetrics {
    pub(super) fn register(r: &Registry) -> MigrationMetrics {
        let manual = Gauge::with_opts(opts("cutover_migration_phase_override")).expect("valid metric");
        r.register(Box::new(manual.clone())).expect("unique metric");
        MigrationMetrics {
            phase: gauge(r, "cutover_migration_phase", &["phase"]),
            serving: gauge(r, "cutover_expected_serving_env_info", &["env"]),
            manual,
            serving_now: Default::default(),
        }
    }

    /// Shows the phase in force: the stateset (every phase present, 1 for
    /// the current one), the one expected serving environment (none when
    /// unknown), and whether it was set by hand.
    pub fn show(&self, current: &Current) {
        let (phase, serving) = (current.phase, current.serving.as_deref());
        let manual = current.source == Source::Manual;
        for p in Phase::ALL {
            self.phase
                .with_label_values(&[p.as_str()])
                .set(if Some(p) == phase { 1.0 } else { 0.0 });
        }
        let mut now = self.serving_now.lock().expect("metrics lock");
        if now.as_deref() != serving {
            if let Some(old) = now.take() {
                let _ = self.serving.remove_label_values(&[&old]);
            }
            if let Some(env) = serving {
                self.serving.with_label_values(&[env]).set(1.0);
            }
            *now = serving.map(str::to_string);
        }
        self.manual.set(if manual { 1.0 } else { 0.0 });
    }
}

//! The `dav` kind's series: what a run found in the home (collections, objects
//! of the read collection), its write round trip and the leftovers it swept,
//! and whether old and new hold the same data for the account.

use prometheus::{GaugeVec, Registry};

use super::{INSTANCE_LABELS, Instance, KindSeries, gauge};
use crate::probe::Measurement;
use crate::probe::dav::Measured;

/// `cutover_dav_*`; parity carries only `check`, as it speaks of two instances.
pub(super) struct Series {
    collections: GaugeVec,
    objects: GaugeVec,
    roundtrip: GaugeVec,
    orphans: GaugeVec,
    parity: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            collections: gauge(r, "cutover_dav_collections", &INSTANCE_LABELS),
            objects: gauge(r, "cutover_dav_objects", &INSTANCE_LABELS),
            roundtrip: gauge(r, "cutover_dav_write_roundtrip_seconds", &INSTANCE_LABELS),
            orphans: gauge(r, "cutover_dav_orphaned_probe_objects", &INSTANCE_LABELS),
            parity: gauge(r, "cutover_dav_parity", &["check"]),
        }
    }

    /// The family and label values a measurement is published under.
    fn series<'a>(&self, inst: &'a Instance, m: &Measured) -> (&GaugeVec, Vec<&'a str>, f64) {
        let base = inst.values().to_vec();
        match m {
            Measured::Collections { count } => (&self.collections, base, *count as f64),
            Measured::Objects { count } => (&self.objects, base, *count as f64),
            Measured::WriteRoundtrip { seconds } => (&self.roundtrip, base, *seconds),
            Measured::Orphans { removed } => (&self.orphans, base, *removed as f64),
            Measured::Parity { equal } => (&self.parity, vec![inst.check.as_str()], f64::from(u8::from(*equal))),
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::Dav(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Dav(m) = m {
            let (family, labels, value) = self.series(inst, m);
            family.with_label_values(&labels).set(value);
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Dav(m) = m {
            let (family, labels, _) = self.series(inst, m);
            let _ = family.remove_label_values(&labels);
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        matches!((old, new), (Measurement::Dav(a), Measurement::Dav(b)) if a.same_series(b))
    }
}

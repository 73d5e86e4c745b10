//! The migration's phases: which one is in force (from the check file's
//! `migration` section and the clock, or set by hand, because real nights run
//! late), which environment should serve in it, and the go/no-go questions
//! that matter in it. `check`, the daemon's metrics and its status page all
//! ask this module, so they never disagree.
//!
//! A manual override lives in the daemon's memory: it survives reloads, wins
//! over the clock until cleared, and is gone after a restart (the clock rules
//! again), so a stale override from an earlier night can never linger.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use crate::config::{Migration, Phase, PhaseWindow};
use crate::timestamp;

pub use crate::config::NONE;

impl Migration {
    /// The index of the phase the clock says is in force at `now`.
    fn at(&self, now: f64) -> Option<usize> {
        self.phases.iter().enumerate().position(|(i, w)| {
            let end = w.end.or_else(|| self.phases.get(i + 1).map(|n| n.start));
            now >= w.start && end.is_none_or(|e| now < e)
        })
    }

    /// Who should serve in `phase`: as configured, or the phase's default.
    pub fn serving(&self, phase: Phase) -> String {
        self.phases
            .iter()
            .find(|w| w.phase == phase)
            .map_or_else(|| phase.default_serving().to_string(), |w| w.serving.clone())
    }

    /// The environment being moved to: whoever serves once switched.
    pub fn target(&self) -> String {
        Some(self.serving(Phase::Switched))
            .filter(|s| s != NONE)
            .unwrap_or_else(|| "new".into())
    }

    /// The environment being moved away from: whoever serves in preparation.
    pub fn source(&self) -> String {
        Some(self.serving(Phase::Preparation))
            .filter(|s| s != NONE)
            .unwrap_or_else(|| "old".into())
    }

    /// The phase in force at `now`, by the clock or by `manual` when set.
    pub fn current(&self, manual: Option<Manual>, now: f64) -> Current {
        let clock = self.at(now);
        let next = self.phases.iter().find(|w| w.start > now).map(|w| NextPhase {
            phase: w.phase,
            start: w.start,
        });
        let clock_phase = clock.map(|i| self.phases[i].phase);
        if let Some(m) = manual {
            return Current {
                phase: Some(m.phase),
                serving: Some(self.serving(m.phase)),
                source: Source::Manual,
                since: Some(m.since),
                until: None,
                clock: clock_phase,
                next,
            };
        }
        if let Some(i) = clock {
            let w = &self.phases[i];
            return Current {
                phase: Some(w.phase),
                serving: Some(w.serving.clone()),
                source: Source::Clock,
                since: Some(w.start),
                until: w.end.or_else(|| self.phases.get(i + 1).map(|n| n.start)),
                clock: clock_phase,
                next,
            };
        }
        if self.phases.is_empty() {
            return Current {
                phase: None,
                serving: None,
                source: Source::Unconfigured,
                since: None,
                until: None,
                clock: None,
                next: None,
            };
        }
        // Between phases or outside them: whoever served last keeps serving;
        // before the first phase, nothing has moved yet.
        let last = self.phases.iter().rev().find(|w| w.start <= now);
        Current {
            phase: None,
            serving: Some(last.map_or_else(|| self.source(), |w| w.serving.clone())),
            source: Source::Clock,
            since: last.and_then(|w| w.end),
            until: next.map(|n| n.start),
            clock: None,
            next,
        }
    }
}

// ---------------------------------------------------------------------------
// The phase in force, and its manual override.
// ---------------------------------------------------------------------------

/// Where the phase in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The `migration` section and the clock.
    Clock,
    /// Set by hand (`POST /api/v1/phase`, `cutover-monitor phase set`).
    Manual,
    /// Given to `check --phase`, to judge as if in that phase.
    Assumed,
    /// No `migration` section and no override.
    Unconfigured,
}

impl Source {
    /// The name the API and the logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Clock => "clock",
            Source::Manual => "manual",
            Source::Assumed => "assumed",
            Source::Unconfigured => "unconfigured",
        }
    }
}

/// A phase set by hand.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Manual {
    /// The phase.
    pub phase: Phase,
    /// When it was set, Unix seconds.
    pub since: f64,
}

/// The next phase the clock will bring.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NextPhase {
    /// Which.
    #[serde(rename = "name")]
    pub phase: Phase,
    /// When, Unix seconds.
    pub start: f64,
}

/// The phase in force and what follows from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Current {
    /// The phase in force; none outside every configured phase.
    pub phase: Option<Phase>,
    /// The environment that should serve now, `none`, or unknown (no
    /// `migration` section and no override).
    pub serving: Option<String>,
    /// Clock, manual, or unconfigured.
    pub source: Source,
    /// Since when the phase is in force (its start, or when it was set by hand).
    pub since: Option<f64>,
    /// Until when, by the clock.
    pub until: Option<f64>,
    /// The phase the clock says, which a manual override may differ from.
    pub clock: Option<Phase>,
    /// The next phase by the clock.
    pub next: Option<NextPhase>,
}

impl Current {
    /// One line for people: `switched (set by hand at …; the clock says window); new should serve`.
    pub fn describe(&self) -> String {
        let mut out = match (self.phase, self.source) {
            (_, Source::Unconfigured) => "none (no `migration` section in the check file)".to_string(),
            (None, _) => "between phases".to_string(),
            (Some(p), Source::Assumed) => format!(
                "{p} (from --phase; the clock says {})",
                self.clock.map_or("no phase", Phase::as_str)
            ),
            (Some(p), Source::Manual) => format!(
                "{p} (set by hand at {}; the clock says {})",
                self.since.map_or("?".into(), timestamp),
                self.clock.map_or("no phase", Phase::as_str)
            ),
            (Some(p), _) => format!(
                "{p} (by the clock since {}{})",
                self.since.map_or("?".into(), timestamp),
                self.until
                    .map_or(String::new(), |u| format!(", until {}", timestamp(u)))
            ),
        };
        match self.serving.as_deref() {
            Some(NONE) => out.push_str("; no environment should serve"),
            Some(env) => out.push_str(&format!("; {env} should serve")),
            None => {}
        }
        out
    }
}

/// What [`Control::publish`] last logged: phase, serving environment, source.
type Published = (Option<Phase>, Option<String>, Source);

/// The daemon's phase state: the manual override, and what it last
/// published, so a change of phase is logged once.
#[derive(Default)]
pub struct Control {
    manual: Mutex<Option<Manual>>,
    published: Mutex<Option<Published>>,
}

impl Control {
    /// No override: the clock rules.
    pub fn new() -> Arc<Control> {
        Arc::new(Control::default())
    }

    /// Overrides the clock with `phase` until [`Control::clear`].
    pub fn set(&self, phase: Phase) -> Manual {
        let manual = Manual {
            phase,
            since: crate::unix_now(),
        };
        *self.manual.lock().expect("phase lock") = Some(manual);
        tracing::info!(
            phase = phase.as_str(),
            "migration phase set by hand; it wins over the clock until cleared"
        );
        manual
    }

    /// Removes the override; returns it if there was one.
    pub fn clear(&self) -> Option<Manual> {
        let was = self.manual.lock().expect("phase lock").take();
        if let Some(m) = was {
            tracing::info!(
                phase = m.phase.as_str(),
                "manual migration phase cleared; the clock rules again"
            );
        }
        was
    }

    /// The override in force, if any.
    pub fn manual(&self) -> Option<Manual> {
        *self.manual.lock().expect("phase lock")
    }

    /// The phase in force now.
    pub fn current(&self, migration: &Migration) -> Current {
        migration.current(self.manual(), crate::unix_now())
    }

    /// Computes the phase in force and logs when it changed; the caller
    /// writes it to the phase series.
    pub fn publish(&self, migration: &Migration) -> Current {
        let current = self.current(migration);
        let key = (current.phase, current.serving.clone(), current.source);
        let mut published = self.published.lock().expect("phase lock");
        if published.as_ref() != Some(&key) {
            tracing::info!(
                phase = current.phase.map_or("none", Phase::as_str),
                serving = current.serving.as_deref().unwrap_or("unknown"),
                source = current.source.as_str(),
                "migration phase: {}",
                current.describe()
            );
            *published = Some(key);
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ENVS: &str = "environments:\n  old: {addresses: [127.0.0.10]}\n  new: {addresses: [127.0.0.20]}\n  live: {resolver: system}\nchecks: []\n";

    fn load(text: &str) -> Result<Migration, Vec<String>> {
        crate::probe::parse(Path::new("c.yaml"), &format!("{ENVS}{text}"))
            .map(|c| c.migration)
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    fn night() -> Migration {
        load(
            "migration:\n  phases:\n    - {name: preparation, start: 2025-06-14T08:00:00Z}\n    - {name: window, start: 2025-06-14T22:00:00+02:00, end: 2025-06-15T01:00:00+02:00}\n    - {name: switched, start: 2025-06-15T01:00:00+02:00}\n",
        )
        .unwrap()
    }

    const T_PREP: f64 = 1_749_888_000.0; // 2025-06-14T08:00:00Z
    const T_WINDOW: f64 = 1_749_931_200.0; // 2025-06-14T20:00:00Z
    const T_SWITCH: f64 = 1_749_942_000.0; // 2025-06-14T23:00:00Z

    #[test]
    fn the_clock_picks_the_phase_and_offsets_count() {
        let m = night();
        assert_eq!(m.phases[1].start, T_WINDOW);
        let at = |t: f64| m.current(None, t);
        assert_eq!(at(T_PREP - 1.0).phase, None);
        assert_eq!(at(T_PREP - 1.0).serving.as_deref(), Some("old"));
        assert_eq!(at(T_PREP).phase, Some(Phase::Preparation));
        assert_eq!(at(T_WINDOW - 1.0).until, Some(T_WINDOW));
        assert_eq!(at(T_WINDOW).phase, Some(Phase::Window));
        assert_eq!(at(T_WINDOW).serving.as_deref(), Some("none"));
        assert_eq!(at(T_SWITCH).phase, Some(Phase::Switched));
        assert_eq!(at(T_SWITCH + 1e6).serving.as_deref(), Some("new"));
        assert_eq!(at(T_PREP).next.map(|n| n.phase), Some(Phase::Window));
    }

    #[test]
    fn a_manual_phase_wins_over_the_clock() {
        let m = night();
        let manual = Manual {
            phase: Phase::Window,
            since: T_SWITCH + 60.0,
        };
        let c = m.current(Some(manual), T_SWITCH + 120.0);
        assert_eq!(
            (c.phase, c.source, c.clock),
            (Some(Phase::Window), Source::Manual, Some(Phase::Switched))
        );
        assert_eq!(c.serving.as_deref(), Some("none"));
        let none = Migration::default().current(Some(manual), 0.0);
        assert_eq!(none.serving.as_deref(), Some("none"));
        assert_eq!(Migration::default().current(None, 0.0).source, Source::Unconfigured);
    }

    #[test]
    fn every_phase_error_is_reported_with_its_position() {
        let errs = load(
            "migration:\n  phases:\n    - {name: window, start: 2025-06-14T22:00:00Z, end: 2025-06-15T02:00:00Z}\n    - {name: switched, start: 2025-06-15T01:00:00Z, serving: newer}\n    - {name: decommission, start: yesterday}\n    - {name: preparation, start: 2025-06-16T00:00:00Z, serving: live}\n    - {name: rollback, start: 2025-06-17T00:00:00Z}\n",
        )
        .unwrap_err();
        let expected = [
            "c.yaml:9:53: field `migration.phases[1].serving`: unknown environment `newer`: expected `none` or one of `old`, `new`",
            "c.yaml:9:24: field `migration.phases[1].start`: phase `switched` starts (2025-06-15T01:00:00Z) before `window` (migration.phases[0]) ends (2025-06-15T02:00:00Z): phases must not overlap",
            "c.yaml:10:28: field `migration.phases[2].start`: expected an RFC 3339 time like `2025-06-14T22:00:00+02:00`, got `yesterday` (the 'year' component could not be parsed)",
            "c.yaml:11:56: field `migration.phases[3].serving`: `live` follows DNS: name the pinned environment that should serve, or `none`",
            "c.yaml:11:8: field `migration.phases[3].name`: phase `preparation` comes after `switched` (migration.phases[1]): list phases in the order preparation, window, switched, decommission",
            "c.yaml:12:8: field `migration.phases[4].name`: unknown variant `rollback`, expected one of `preparation`, `window`, `switched`, `decommission`",
        ];
        assert_eq!(errs, expected);
    }

    #[test]
    fn ends_before_starts_duplicates_and_missing_default_environments_are_refused() {
        let errs = load(
            "migration:\n  phases:\n    - {name: window, start: 2025-06-14T22:00:00Z, end: 2025-06-14T21:00:00Z}\n    - {name: window, start: 2025-06-15T22:00:00Z}\n  rollback: true\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(
            errs[0].starts_with("c.yaml:10:3: field `migration.rollback`: unknown field"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("`migration.phases[0].end`: phase `window` ends (2025-06-14T21:00:00Z) before it starts"),
            "{}",
            errs[1]
        );
        assert!(
            errs[2].contains("`migration.phases[1].name`: phase `window` is listed twice"),
            "{}",
            errs[2]
        );
        let text = "environments:\n  a: {addresses: [127.0.0.10]}\nchecks: []\nmigration:\n  phases:\n    - {name: switched, start: 2025-06-15T01:00:00Z}\n";
        let errs = crate::probe::parse(Path::new("c.yaml"), text)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            errs,
            "c.yaml:6:8: field `migration.phases[0].name`: phase `switched` is served by `new` unless `serving` says otherwise, and there is no environment `new`"
        );
    }
}

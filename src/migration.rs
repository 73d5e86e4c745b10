//! The migration's phases: which one is in force (from the check file's
//! `migration` section and the clock, or set by hand, because real nights run
//! late), which environment should serve in it, and the go/no-go questions
//! that matter in it. `check`, the daemon's metrics and its status page all
//! ask this module, so they never disagree.
//!
//! A manual override lives in the daemon's memory: it survives reloads, wins
//! over the clock until cleared, and is gone after a restart (the clock rules
//! again), so a stale override from an earlier night can never linger.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::config::{Config, EnvKind, Environment, Loader};
use crate::metrics::{Instance, MigrationMetrics};
use crate::probe::Outcome;

/// The value of `serving` (and of `cutover_expected_serving_env_info{env}`)
/// when no environment should serve, e.g. while data moves.
pub const NONE: &str = "none";

/// A phase of the migration night, in the order they happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the window: old serves, new must get ready.
    Preparation,
    /// Services stopped, data moving: nothing has to serve.
    Window,
    /// DNS and MX point at new: new serves.
    Switched,
    /// Old is being switched off: new serves.
    Decommission,
}

impl Phase {
    /// Every phase, in order: the label values of `cutover_migration_phase`.
    pub const ALL: [Phase; 4] = [Phase::Preparation, Phase::Window, Phase::Switched, Phase::Decommission];

    /// The label value and the name in the check file and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparation => "preparation",
            Phase::Window => "window",
            Phase::Switched => "switched",
            Phase::Decommission => "decommission",
        }
    }

    /// Who serves when the check file does not say.
    pub fn default_serving(self) -> &'static str {
        match self {
            Phase::Preparation => "old",
            Phase::Window => NONE,
            Phase::Switched | Phase::Decommission => "new",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Phase, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase `{s}`: expected preparation, window, switched or decommission"))
    }
}

// ---------------------------------------------------------------------------
// Schema and validation.
// ---------------------------------------------------------------------------

/// `migration:` in the check file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrationSpec {
    /// The phases in time order; each lasts until its `end`, or until the next one starts.
    pub phases: Vec<PhaseSpec>,
}

/// One phase of `migration.phases`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// `preparation`, `window`, `switched` or `decommission`.
    pub name: Phase,
    /// When it starts, RFC 3339, e.g. `2025-06-14T22:00:00+02:00`.
    pub start: Rfc3339,
    /// When it ends; when omitted, it lasts until the next phase starts.
    pub end: Option<Rfc3339>,
    /// The environment that should serve: a pinned environment's name or
    /// `none`; `old` for preparation, `none` for window, `new` after.
    pub serving: Option<String>,
}

/// A point in time written as RFC 3339 (`2025-06-14T22:00:00Z`, or with an
/// offset), checked while the config loads.
#[derive(Debug, Clone, PartialEq)]
pub struct Rfc3339 {
    /// Unix seconds.
    pub unix: f64,
}

impl<'de> Deserialize<'de> for Rfc3339 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
            .map(|t| Rfc3339 {
                unix: t.unix_timestamp_nanos() as f64 / 1e9,
            })
            .map_err(|e| {
                de::Error::custom(format!(
                    "expected an RFC 3339 time like `2025-06-14T22:00:00+02:00`, got `{text}` ({e})"
                ))
            })
    }
}

impl JsonSchema for Rfc3339 {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Rfc3339".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "format": "date-time", "examples": ["2025-06-14T22:00:00+02:00"]})
    }
}

/// One validated phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseWindow {
    /// Which phase.
    #[serde(rename = "name")]
    pub phase: Phase,
    /// Start, Unix seconds.
    pub start: f64,
    /// End as written, Unix seconds.
    pub end: Option<f64>,
    /// The environment that should serve, or [`NONE`].
    pub serving: String,
}

/// The validated `migration` section; empty when the file has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Migration {
    /// Phases in time order.
    pub phases: Vec<PhaseWindow>,
}

/// Validates `migration:`, recording every problem with its position.
pub(crate) fn load(l: &mut Loader, value: Option<Value>, environments: &[Arc<Environment>]) -> Migration {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Migration::default();
    };
    // Each phase on its own, so every problem is reported, not just the first.
    let Value::Mapping(mut map) = value else {
        l.error("migration", "expected a mapping with `phases`");
        return Migration::default();
    };
    for key in map.keys() {
        if key.as_str() != Some("phases") {
            let name = key.as_str().unwrap_or("?");
            l.error(
                format!("migration.{name}"),
                format!("unknown field `{name}`, expected `phases`"),
            );
        }
    }
    let items = match map.remove("phases") {
        Some(Value::Sequence(items)) if !items.is_empty() => items,
        Some(Value::Sequence(_)) | None => {
            l.error(
                "migration.phases",
                "list at least one phase, e.g. `- {name: switched, start: 2025-06-14T23:00:00+02:00}`",
            );
            return Migration::default();
        }
        Some(_) => {
            l.error("migration.phases", "expected a list of phases");
            return Migration::default();
        }
    };
    let mut out: Vec<PhaseWindow> = Vec::new();
    let mut prev_at = 0;
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("migration.phases[{i}]");
        let Some(p) = l.parse::<PhaseSpec>(item, &at) else {
            continue;
        };
        if out.iter().any(|w| w.phase == p.name) {
            l.error(format!("{at}.name"), format!("phase `{}` is listed twice", p.name));
        }
        if let Some(end) = &p.end {
            if end.unix <= p.start.unix {
                l.error(
                    format!("{at}.end"),
                    format!(
                        "phase `{}` ends ({}) before it starts ({})",
                        p.name,
                        timestamp(end.unix),
                        timestamp(p.start.unix)
                    ),
                );
            }
        }
        let serving = p
            .serving
            .clone()
            .unwrap_or_else(|| p.name.default_serving().to_string());
        if serving != NONE {
            let field = if p.serving.is_some() {
                format!("{at}.serving")
            } else {
                format!("{at}.name")
            };
            match environments.iter().find(|e| e.name == serving).map(|e| &e.kind) {
                Some(EnvKind::Pinned(_)) => {}
                Some(EnvKind::Live(_)) => l.error(
                    field,
                    format!("`{serving}` follows DNS: name the pinned environment that should serve, or `none`"),
                ),
                None if p.serving.is_some() => l.error(
                    field,
                    format!("unknown environment `{serving}`: expected `none` or {}", env_names(environments)),
                ),
                None => l.error(
                    field,
                    format!(
                        "phase `{}` is served by `{serving}` unless `serving` says otherwise, and there is no environment `{serving}`",
                        p.name
                    ),
                ),
            }
        }
        if let Some(prev) = out.last() {
            if p.name < prev.phase {
                l.error(
                    format!("{at}.name"),
                    format!(
                        "phase `{}` comes after `{}` (migration.phases[{prev_at}]): list phases in the order preparation, window, switched, decommission",
                        p.name, prev.phase
                    ),
                );
            } else if p.start.unix <= prev.start {
                l.error(
                    format!("{at}.start"),
                    format!(
                        "phase `{}` starts ({}) no later than `{}` (migration.phases[{prev_at}], {}): phases follow each other in time",
                        p.name,
                        timestamp(p.start.unix),
                        prev.phase,
                        timestamp(prev.start)
                    ),
                );
            } else if let Some(end) = prev.end.filter(|e| *e > p.start.unix) {
                l.error(
                    format!("{at}.start"),
                    format!(
                        "phase `{}` starts ({}) before `{}` (migration.phases[{prev_at}]) ends ({}): phases must not overlap",
                        p.name,
                        timestamp(p.start.unix),
                        prev.phase,
                        timestamp(end)
                    ),
                );
            }
        }
        prev_at = i;
        out.push(PhaseWindow {
            phase: p.name,
            start: p.start.unix,
            end: p.end.map(|e| e.unix),
            serving,
        });
    }
    Migration { phases: out }
}

fn env_names(environments: &[Arc<Environment>]) -> String {
    let names: Vec<String> = environments
        .iter()
        .filter(|e| matches!(e.kind, EnvKind::Pinned(_)))
        .map(|e| format!("`{}`", e.name))
        .collect();
    if names.is_empty() {
        "a pinned environment".into()
    } else {
        format!("one of {}", names.join(", "))
    }
}

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

    /// Computes the phase in force, sets its metrics, and logs when it changed.
    pub fn publish(&self, migration: &Migration, metrics: &MigrationMetrics) -> Current {
        let current = self.current(migration);
        metrics.set(
            current.phase,
            current.serving.as_deref(),
            current.source == Source::Manual,
        );
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

/// How often the daemon re-reads the clock for phase boundaries.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Keeps the phase metrics current as the clock passes phase boundaries and
/// reloads change the phases; runs until aborted.
pub async fn publish_loop(control: Arc<Control>, config: Arc<RwLock<Arc<Config>>>, metrics: MigrationMetrics) {
    loop {
        let current = config.read().expect("config lock").clone();
        control.publish(&current.migration, &metrics);
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
}

// ---------------------------------------------------------------------------
// Go/no-go: what matters in each phase.
// ---------------------------------------------------------------------------

/// One instance's state as the go/no-go questions see it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: &'static str,
    /// Environment (or resolver) name.
    pub env: String,
    /// Address label.
    pub address: String,
    /// Whether `env` is a configured environment (not a resolver of a `dns` check).
    pub is_env: bool,
    /// Whether that environment follows DNS.
    pub live: bool,
    /// Pass, fail, or not run yet.
    pub ok: Option<bool>,
    /// Failure reason label.
    pub reason: Option<&'static str>,
    /// For live instances: the environment the resolved address belongs to.
    pub resolved_env: Option<String>,
}

/// Pairs an instance with its last outcome (none before its first run).
pub fn observe(config: &Config, inst: &Instance, outcome: Option<&Outcome>) -> Observation {
    let env = config.environments.iter().find(|e| e.name == inst.env);
    Observation {
        check: inst.check.clone(),
        kind: inst.kind,
        env: inst.env.clone(),
        address: inst.address.clone(),
        is_env: env.is_some(),
        live: env.is_some_and(|e| matches!(e.kind, EnvKind::Live(_))),
        ok: outcome.map(Outcome::success),
        reason: outcome.and_then(|o| o.result.as_ref().err()).map(|f| f.reason.as_str()),
        resolved_env: outcome.and_then(|o| o.resolved.as_ref()).map(|(_, env)| env.clone()),
    }
}

/// What is known about mail flow for the mail questions.
#[derive(Debug, Clone)]
pub enum MailEvidence {
    /// No `mailflow` check: the mail questions are not asked.
    Unconfigured,
    /// `check`: whether each run's probe mail arrived, but not where.
    OneShot,
    /// The daemon's ledger: when a probe mail last became visible in each
    /// environment, and how recent counts as flowing.
    Ledger {
        /// Environment -> Unix seconds.
        last_delivered: BTreeMap<String, f64>,
        /// Seconds.
        fresh_within: f64,
    },
}

/// The answer to a go/no-go question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Go.
    Yes,
    /// No-go.
    No,
    /// Not known yet (checks not run, nothing configured to tell).
    Unknown,
}

impl Answer {
    /// How `check` and the status page print it.
    pub fn label(self) -> &'static str {
        match self {
            Answer::Yes => "GO",
            Answer::No => "NO-GO",
            Answer::Unknown => "UNKNOWN",
        }
    }
}

/// One go/no-go question with its answer and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// E.g. `Is new ready?`.
    pub question: String,
    /// Yes, no, unknown.
    pub answer: Answer,
    /// The evidence, e.g. which instances fail.
    pub detail: String,
}

/// The questions that matter in the phase in force: before the switch, is
/// the target ready; after it, does live resolve to the target, does it serve,
/// does mail flow into it and nothing land in the source any more. None
/// without a `migration` section or an override.
pub fn verdicts(
    migration: &Migration,
    current: &Current,
    seen: &[Observation],
    mail: &MailEvidence,
    now: f64,
) -> Vec<Verdict> {
    let phase = match (current.phase, current.source) {
        (Some(p), _) => p,
        (None, Source::Unconfigured) => return Vec::new(),
        // Between phases the last one's questions still hold; before the first, preparation's.
        (None, _) => migration
            .phases
            .iter()
            .rev()
            .find(|w| w.start <= now)
            .map_or(Phase::Preparation, |w| w.phase),
    };
    let target = migration.target();
    let source = migration.source();
    match phase {
        Phase::Preparation | Phase::Window => vec![healthy(seen, &target, format!("Is {target} ready?"))],
        Phase::Switched | Phase::Decommission => {
            let mut out = vec![
                live_is(seen, &target),
                healthy(seen, &target, format!("Is {target} serving?")),
            ];
            let switched_at = match current.source {
                Source::Manual => current.since,
                _ => migration
                    .phases
                    .iter()
                    .find(|w| w.phase == Phase::Switched && w.start <= now)
                    .map(|w| w.start)
                    .or(current.since),
            };
            out.extend(mail_verdicts(seen, mail, &target, &source, switched_at, now));
            out
        }
    }
}

fn healthy(seen: &[Observation], env: &str, question: String) -> Verdict {
    let mine: Vec<&Observation> = seen.iter().filter(|o| o.is_env && o.env == env).collect();
    let failing: Vec<String> = mine
        .iter()
        .filter(|o| o.ok == Some(false))
        .map(|o| format!("{} {} ({})", o.check, o.address, o.reason.unwrap_or("?")))
        .collect();
    let pending = mine.iter().filter(|o| o.ok.is_none()).count();
    let (answer, detail) = if mine.is_empty() {
        (Answer::Unknown, format!("no check runs in `{env}`"))
    } else if !failing.is_empty() {
        (
            Answer::No,
            format!(
                "{} of {} {env} instances failing: {}",
                failing.len(),
                mine.len(),
                failing.join(", ")
            ),
        )
    } else if pending > 0 {
        (
            Answer::Unknown,
            format!("{pending} of {} {env} instances not run yet", mine.len()),
        )
    } else {
        (Answer::Yes, format!("all {} {env} instances OK", mine.len()))
    };
    Verdict {
        question,
        answer,
        detail,
    }
}

fn live_is(seen: &[Observation], target: &str) -> Verdict {
    let live: Vec<&Observation> = seen.iter().filter(|o| o.live).collect();
    let elsewhere: Vec<String> = live
        .iter()
        .filter_map(|o| {
            o.resolved_env
                .as_deref()
                .filter(|e| *e != target)
                .map(|e| format!("{} -> {e}", o.check))
        })
        .collect();
    let unresolved: Vec<String> = live
        .iter()
        .filter(|o| o.resolved_env.is_none())
        .map(|o| format!("{} ({})", o.check, o.reason.unwrap_or("not run yet")))
        .collect();
    let (answer, detail) = if live.is_empty() {
        (Answer::Unknown, "no check runs in a live environment".to_string())
    } else if !elsewhere.is_empty() {
        (
            Answer::No,
            format!(
                "{} of {} live instances resolve elsewhere: {}",
                elsewhere.len(),
                live.len(),
                elsewhere.join(", ")
            ),
        )
    } else if !unresolved.is_empty() {
        (Answer::Unknown, format!("not resolved: {}", unresolved.join(", ")))
    } else {
        (
            Answer::Yes,
            format!("all {} live instances resolve to {target}", live.len()),
        )
    };
    Verdict {
        question: format!("Is live = {target}?"),
        answer,
        detail,
    }
}

fn mail_verdicts(
    seen: &[Observation],
    mail: &MailEvidence,
    target: &str,
    source: &str,
    switched_at: Option<f64>,
    now: f64,
) -> Vec<Verdict> {
    match mail {
        MailEvidence::Unconfigured => Vec::new(),
        MailEvidence::OneShot => {
            let runs: Vec<&Observation> = seen.iter().filter(|o| o.kind == "mailflow").collect();
            let failed: Vec<String> = runs
                .iter()
                .filter(|o| o.ok == Some(false))
                .map(|o| format!("{} via {} ({})", o.check, o.env, o.reason.unwrap_or("?")))
                .collect();
            let flowing = if runs.is_empty() {
                (Answer::Unknown, "no mailflow check selected".to_string())
            } else if failed.is_empty() {
                (Answer::Yes, format!("all {} probe mails arrived", runs.len()))
            } else {
                (Answer::No, format!("not arrived: {}", failed.join(", ")))
            };
            vec![
                Verdict {
                    question: "Is mail flowing?".into(),
                    answer: flowing.0,
                    detail: flowing.1,
                },
                Verdict {
                    question: format!("Is nothing landing in {source}?"),
                    answer: Answer::Unknown,
                    detail: "`check` sees that a probe mail arrived, not where: the daemon's status page tells".into(),
                },
            ]
        }
        MailEvidence::Ledger {
            last_delivered,
            fresh_within,
        } => {
            let flowing = match last_delivered.get(target) {
                None => (Answer::No, format!("no probe mail has arrived in {target} yet")),
                Some(at) if now - at <= *fresh_within => (
                    Answer::Yes,
                    format!("last probe mail arrived in {target} {} ago", ago(now - at)),
                ),
                Some(at) => (
                    Answer::No,
                    format!(
                        "last probe mail arrived in {target} {} ago (flowing means within {})",
                        ago(now - at),
                        ago(*fresh_within)
                    ),
                ),
            };
            let landing = match (last_delivered.get(source), switched_at) {
                (Some(at), Some(switch)) if *at >= switch => (
                    Answer::No,
                    format!(
                        "a probe mail arrived in {source} {} ago, after the switch ({})",
                        ago(now - at),
                        timestamp(switch)
                    ),
                ),
                (_, Some(switch)) => (
                    Answer::Yes,
                    format!(
                        "no probe mail arrived in {source} since the switch ({})",
                        timestamp(switch)
                    ),
                ),
                (_, None) => (Answer::Unknown, "the switch time is not known".to_string()),
            };
            vec![
                Verdict {
                    question: format!("Is mail flowing into {target}?"),
                    answer: flowing.0,
                    detail: flowing.1,
                },
                Verdict {
                    question: format!("Is nothing landing in {source}?"),
                    answer: landing.0,
                    detail: landing.1,
                },
            ]
        }
    }
}

/// A short age for people: `42s`, `12m`, `3h5m`.
fn ago(seconds: f64) -> String {
    let secs = seconds.max(0.0).round() as u64;
    humantime::format_duration(Duration::from_secs(if secs >= 3600 { secs / 60 * 60 } else { secs })).to_string()
}

/// RFC 3339 in UTC, to the second.
pub fn timestamp(unix: f64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ENVS: &str = "environments:\n  old: {addresses: [127.0.0.10]}\n  new: {addresses: [127.0.0.20]}\n  live: {resolver: system}\nchecks: []\n";

    fn load(text: &str) -> Result<Migration, Vec<String>> {
        crate::config::parse(Path::new("c.yaml"), &format!("{ENVS}{text}"))
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
        let errs = crate::config::parse(Path::new("c.yaml"), text)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            errs,
            "c.yaml:6:8: field `migration.phases[0].name`: phase `switched` is served by `new` unless `serving` says otherwise, and there is no environment `new`"
        );
    }

    fn obs(check: &str, env: &str, ok: Option<bool>, resolved: Option<&str>) -> Observation {
        Observation {
            check: check.into(),
            kind: "http",
            env: env.into(),
            address: "a".into(),
            is_env: true,
            live: env == "live",
            ok,
            reason: (ok == Some(false)).then_some("refused"),
            resolved_env: resolved.map(str::to_string),
        }
    }

    #[test]
    fn before_the_window_new_must_be_ready_after_the_switch_live_must_be_new() {
        let m = night();
        let seen = vec![
            obs("webmail", "old", Some(true), None),
            obs("webmail", "new", Some(false), None),
            obs("webmail", "live", Some(true), Some("old")),
        ];
        let prep = verdicts(&m, &m.current(None, T_PREP), &seen, &MailEvidence::Unconfigured, T_PREP);
        assert_eq!(prep.len(), 1);
        assert_eq!(
            (prep[0].question.as_str(), prep[0].answer),
            ("Is new ready?", Answer::No)
        );
        assert!(prep[0].detail.contains("webmail a (refused)"), "{}", prep[0].detail);
        let mail = MailEvidence::Ledger {
            last_delivered: BTreeMap::from([("new".into(), T_SWITCH + 50.0), ("old".into(), T_SWITCH + 10.0)]),
            fresh_within: 180.0,
        };
        let after = verdicts(&m, &m.current(None, T_SWITCH + 60.0), &seen, &mail, T_SWITCH + 60.0);
        let answers: Vec<(&str, Answer)> = after.iter().map(|v| (v.question.as_str(), v.answer)).collect();
        assert_eq!(
            answers,
            [
                ("Is live = new?", Answer::No),
                ("Is new serving?", Answer::No),
                ("Is mail flowing into new?", Answer::Yes),
                ("Is nothing landing in old?", Answer::No),
            ]
        );
        assert!(
            verdicts(
                &Migration::default(),
                &Migration::default().current(None, 0.0),
                &seen,
                &mail,
                0.0
            )
            .is_empty()
        );
    }
}

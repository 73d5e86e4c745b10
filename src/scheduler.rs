//! When probes run: one task per check instance (check x environment x address),
//! each on its own interval at a stable offset, never overlapping itself and
//! never waiting for another instance. A probe with its own servers (DNS
//! resolvers) runs once per server instead, the server's name in `env`.
//!
//! Results are published to [`Metrics`] as they arrive; scraping never runs a
//! probe. The log gets one line per state change of an instance (up, down, or
//! a different failure reason), never one per success.
//!
//! A panic never ends anything silently: a probe run that panics fails, and a
//! probe's long-lived background task that panics is restarted by
//! [`supervise`] with a backoff and counted in `cutover_task_restarts_total`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::task::JoinHandle;

use crate::audits::{AuditStore, ParityStore};
use crate::config::{EnvKind, Kind, KindSpec, ResolverAddr};
use crate::ledger::Ledger;
use crate::metrics::{Instance, Metrics};
use crate::migration::Control;
use crate::probe::{
    BackgroundContext, BackgroundTask, Config, Failure, FailureReason, InPhase, Measurement, Outcome, Probe, Run,
};

/// A check with its built probe.
pub type LoadedCheck = crate::config::LoadedCheck<Arc<dyn Probe>>;
use crate::resolve;

/// Where an instance connects.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A fixed address of a pinned environment.
    Pinned(IpAddr),
    /// Whatever the resolver answers at probe time.
    Live(ResolverAddr),
}

/// One schedulable unit: a check in one environment at one address.
#[derive(Clone)]
pub struct InstanceSpec {
    /// Its labels.
    pub inst: Instance,
    /// The check and its probe.
    pub check: LoadedCheck,
    /// Where it connects.
    pub target: Target,
}

/// Label value of `address` for live instances, whose address changes with DNS.
pub const LIVE_ADDRESS: &str = "resolved";

/// Expands a configuration into its instances, in file order.
pub fn instances(config: &Config) -> Vec<InstanceSpec> {
    let mut out = Vec::new();
    for loaded in &config.checks {
        let check = &loaded.check;
        // One instance per resolver, so a silent one never delays the others.
        if let Some(servers) = loaded.probe.own_targets() {
            for (name, ip) in servers {
                out.push(InstanceSpec {
                    inst: Instance {
                        check: check.name.clone(),
                        kind: check.kind.kind(),
                        env: name,
                        address: ip.to_string(),
                    },
                    check: loaded.clone(),
                    target: Target::Pinned(ip),
                });
            }
            continue;
        }
        for env in &check.envs {
            let targets: Vec<(String, Target)> = match &env.kind {
                EnvKind::Pinned(addrs) => addrs.iter().map(|ip| (ip.to_string(), Target::Pinned(*ip))).collect(),
                EnvKind::Live(resolver) => vec![(LIVE_ADDRESS.to_string(), Target::Live(*resolver))],
            };
            for (address, target) in targets {
                out.push(InstanceSpec {
                    inst: Instance {
                        check: check.name.clone(),
                        kind: check.kind.kind(),
                        env: env.name.clone(),
                        address,
                    },
                    check: loaded.clone(),
                    target,
                });
            }
        }
    }
    out
}

/// Runs one instance once, within its check's timeout.
pub async fn run_once(spec: &InstanceSpec, config: &Config) -> Outcome {
    let phase = config.migration.current(None, crate::unix_now()).phase;
    run_queued(spec, config, phase).await.0
}

/// Waits for a probe slot (`defaults.max_concurrent_probes`), then runs. The
/// timeout starts once the slot is granted, so a run is never failed for time
/// spent behind others; that wait is returned for `cutover_probe_queue_wait_seconds`.
/// The cap keeps a thousand hung targets from exhausting file descriptors.
async fn run_queued(spec: &InstanceSpec, config: &Config, phase: Option<crate::config::Phase>) -> (Outcome, Duration) {
    let queued = Instant::now();
    let _slot = config
        .probe_slots
        .acquire()
        .await
        .expect("probe slots are never closed");
    let waited = queued.elapsed();
    (run_admitted(spec, config, phase).await, waited)
}

async fn run_admitted(spec: &InstanceSpec, config: &Config, phase: Option<crate::config::Phase>) -> Outcome {
    let timeout = spec.check.check.timeout;
    let started_at = crate::unix_now();
    let start = Instant::now();
    let mut run = Run::default();
    run.env = spec.inst.env.clone();
    run.migration_phase = phase;
    let mut resolved = None;
    // A panic in a probe (a bug, or a library tripped by a hostile reply) must
    // fail this run, not end the instance's task and silently stop the check.
    let attempt = std::panic::AssertUnwindSafe(attempt(spec, config, &mut run, &mut resolved)).catch_unwind();
    let result = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let what = panic_text(&*panic);
            tracing::error!(check = %spec.inst.check, env = %spec.inst.env, panic = %crate::probe::sanitize(&what), "probe panicked; this is a bug");
            Err(Failure::new(
                FailureReason::Protocol,
                format!("the probe panicked: {what}"),
            ))
        }
        Err(_) => Err(Failure {
            reason: FailureReason::Timeout,
            phase: run.current_phase(),
            detail: format!("no result within {}", humantime::format_duration(timeout)),
        }),
    };
    Outcome {
        result,
        duration: start.elapsed(),
        phases: run.phases().to_vec(),
        cert: run.cert.take(),
        measurements: std::mem::take(&mut run.measurements),
        notes: std::mem::take(&mut run.notes),
        resolved,
        started_at,
    }
}

/// What a panic said, when it said it with a string (as `panic!` and
/// `unwrap` do).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

async fn attempt(
    spec: &InstanceSpec,
    config: &Config,
    run: &mut Run,
    resolved: &mut Option<(IpAddr, String)>,
) -> Result<(), Failure> {
    let probe = &spec.check.probe;
    let ip = match &spec.target {
        Target::Pinned(ip) => *ip,
        Target::Live(resolver) => {
            let lookup = async {
                Ok::<_, Failure>(resolve::lookup(*resolver, probe.hostname(), spec.check.check.timeout).await?)
            };
            let ips = run.phase("resolve", lookup).await.in_phase("resolve")?;
            // Users' clients try IPv4 first on most networks; so do we.
            let ip = ips.iter().find(|ip| ip.is_ipv4()).unwrap_or(&ips[0]).to_owned();
            *resolved = Some((ip, config.env_of(ip).unwrap_or("unknown").to_string()));
            ip
        }
    };
    probe.run(ip, run).await
}

/// Runs every given instance once, concurrently (the `check` command and `/probe`).
pub async fn run_all(specs: &[InstanceSpec], config: &Config) -> Vec<Outcome> {
    futures::future::join_all(specs.iter().map(|s| run_once(s, config))).await
}

/// The offset within its interval at which an instance runs: stable across
/// restarts and reloads, spread evenly so instances do not fire together.
pub fn offset(inst: &Instance, interval: Duration) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    inst.hash(&mut h);
    let nanos = interval.as_nanos().max(1);
    Duration::from_nanos((u128::from(h.finish()) % nanos) as u64)
}

/// The last published state of an instance, for state-change logging and the
/// status surfaces.
#[derive(Debug, Clone)]
pub struct LastState {
    /// The last outcome.
    pub outcome: Outcome,
    /// Unix time since which the instance has been in this state.
    pub since: f64,
}

/// State shared between the scheduler and the HTTP surface.
pub struct Shared {
    /// Every metric.
    pub metrics: Metrics,
    /// Last state per instance.
    pub last: Mutex<HashMap<Instance, LastState>>,
    /// Per `hosted_domains` check: its last finished audit and change log.
    pub audits: AuditStore,
    /// Per `mailbox_parity` check: its last finished audit.
    pub parity: ParityStore,
    /// The phase override (`/api/v1/phase`); with the check file's clock it
    /// gives each run the phase in force.
    pub phase: Arc<Control>,
}

impl Shared {
    /// Fresh state around a registry.
    pub fn new(metrics: Metrics) -> Arc<Shared> {
        Arc::new(Shared {
            metrics,
            last: Mutex::new(HashMap::new()),
            audits: AuditStore::default(),
            parity: ParityStore::default(),
            phase: Control::new(),
        })
    }

    /// Publishes an outcome and logs it if the instance's state changed.
    pub fn publish(&self, inst: &Instance, outcome: Outcome) {
        self.metrics.record(inst, &outcome);
        for m in &outcome.measurements {
            if let Measurement::HostedDomains(report) = m {
                for (direction, n) in self.audits.keep(&inst.check, report.clone()) {
                    self.metrics.hosted_domain_changes(&inst.check, direction, n);
                }
            }
            if let Measurement::MailboxParity(report) = m {
                self.parity.keep(&inst.check, report.clone());
            }
        }
        let mut last = self.last.lock().expect("state lock");
        let previous = last.get(inst);
        let changed = match previous {
            None => true,
            Some(p) => state_key(&p.outcome) != state_key(&outcome),
        };
        let since = match previous {
            Some(p) if !changed => p.since,
            _ => outcome.started_at,
        };
        if changed {
            log_change(inst, previous.map(|p| &p.outcome), &outcome);
        }
        last.insert(inst.clone(), LastState { outcome, since });
    }
}

fn state_key(o: &Outcome) -> Option<FailureReason> {
    o.result.as_ref().err().map(|f| f.reason)
}

fn log_change(inst: &Instance, before: Option<&Outcome>, now: &Outcome) {
    let was = before.map_or("unknown", |b| if b.success() { "up" } else { "down" });
    match &now.result {
        Ok(()) => tracing::info!(
            check = %inst.check, kind = inst.kind.as_str(), env = %inst.env, address = %inst.address,
            was, state = "up", duration_seconds = now.duration.as_secs_f64(),
            "check instance is up"
        ),
        Err(f) => tracing::warn!(
            check = %inst.check, kind = inst.kind.as_str(), env = %inst.env, address = %inst.address,
            was, state = "down", reason = f.reason.as_str(), phase = f.phase.unwrap_or("-"),
            detail = %f.detail,
            "check instance is down"
        ),
    }
}

/// Owns the running instance tasks.
pub struct Scheduler {
    shared: Arc<Shared>,
    tasks: Vec<(Instance, JoinHandle<()>)>,
    /// Given by the daemon: then each check's [`crate::probe::Probe::background`]
    /// tasks run alongside its instances.
    background: Option<BackgroundContext>,
    /// Each running background task under its supervisor, by name.
    background_tasks: Vec<(String, JoinHandle<()>)>,
    storage: Option<PathBuf>,
}

impl Scheduler {
    /// A scheduler with nothing scheduled.
    pub fn new(shared: Arc<Shared>) -> Scheduler {
        Scheduler {
            shared,
            tasks: Vec::new(),
            background: None,
            background_tasks: Vec::new(),
            storage: None,
        }
    }

    /// Lets [`Scheduler::prepare`] open the mail ledger in `dir`
    /// (`--storage.path`) once a config needs it; only the daemon does this.
    pub fn with_storage(mut self, dir: PathBuf) -> Scheduler {
        self.shared.audits.keep_in(dir.join("hosted-domains"));
        self.shared.parity.keep_in(dir.join("mailbox-parity"));
        self.storage = Some(dir);
        self
    }

    /// Opens what `config` needs before [`Scheduler::apply`]: the mail ledger,
    /// the first time a config has a `mailflow` check (daemons without one
    /// write nothing to disk). An error keeps the previous config running.
    pub fn prepare(&mut self, config: &Config) -> Result<(), String> {
        self.restore_audits(config);
        let needs_ledger = config
            .checks
            .iter()
            .any(|c| matches!(c.check.kind, KindSpec::Mailflow(_)));
        if let (true, None, Some(dir)) = (needs_ledger, &self.background, &self.storage) {
            let ledger = Ledger::open(dir, Arc::new(self.shared.metrics.mail()))
                .map_err(|e| format!("--storage.path {}: {e}", dir.display()))?;
            tracing::info!(ledger = ledger.location(), instance = %ledger.identity.instance, "mail ledger opened");
            self.background = Some(BackgroundContext {
                ledger: Arc::new(ledger),
            });
        }
        Ok(())
    }

    /// Serves the audit each `hosted_domains` check last finished before a
    /// restart, until its next one: counts, rows, and the base of its change log.
    fn restore_audits(&self, config: &Config) {
        for loaded in &config.checks {
            if loaded.check.kind.kind() == Kind::MailboxParity {
                // Kept in memory across reloads, on disk across restarts: the
                // rebuilt probe compares its next audit with it.
                if let Some(report) = self.shared.parity.restore(&loaded.check.name) {
                    self.shared.metrics.record_parity(&loaded.check.name, &report);
                    loaded.probe.resume(&Measurement::MailboxParity(report));
                }
                continue;
            }
            if loaded.check.kind.kind() != Kind::HostedDomains {
                continue;
            }
            if let Some(report) = self.shared.audits.restore(&loaded.check.name) {
                self.shared.metrics.record_audit(&loaded.check.name, &report);
            }
        }
    }

    /// Replaces the running instances with those of `config`. Series of
    /// instances that are gone are removed; the others keep their counters.
    pub fn apply(&mut self, config: Arc<Config>) {
        let specs = instances(&config);
        for (inst, task) in self.tasks.drain(..) {
            task.abort();
            if !specs.iter().any(|s| s.inst == inst) {
                self.shared.metrics.forget(&inst);
                self.shared.last.lock().expect("state lock").remove(&inst);
            }
        }
        self.shared.metrics.set_instances(specs.len());
        self.shared.audits.lock().retain(|check, _| {
            specs
                .iter()
                .any(|s| &s.inst.check == check && s.inst.kind == Kind::HostedDomains)
        });
        self.shared.parity.lock().retain(|check, _| {
            specs
                .iter()
                .any(|s| &s.inst.check == check && s.inst.kind == Kind::MailboxParity)
        });
        let mut gone: Vec<String> = Vec::new();
        for (name, task) in self.background_tasks.drain(..) {
            task.abort();
            gone.push(name);
        }
        if let Some(ctx) = &self.background {
            for loaded in &config.checks {
                for task in loaded.probe.background(ctx) {
                    gone.retain(|n| *n != task.name);
                    self.shared.metrics.task_started(&task.name);
                    let name = task.name.clone();
                    self.background_tasks
                        .push((name, tokio::spawn(supervise(task, self.shared.clone()))));
                }
            }
        }
        for name in gone {
            self.shared.metrics.forget_task(&name);
        }
        for spec in specs {
            let inst = spec.inst.clone();
            let task = tokio::spawn(instance_loop(spec, config.clone(), self.shared.clone()));
            self.tasks.push((inst, task));
        }
    }

    /// Stops every instance.
    pub fn stop(&mut self) {
        for (_, task) in self.tasks.drain(..) {
            task.abort();
        }
        for (_, task) in self.background_tasks.drain(..) {
            task.abort();
        }
    }
}

/// First wait before a background task is started again.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// The wait doubles up to this, and starts over once a run lasted this long.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Runs a probe's background task for as long as its config is applied. A
/// panic in it (a bug, or a protocol library tripped by a hostile server:
/// imap-proto is known to panic) would otherwise end it silently, and a
/// mailbox watcher would stop watching until the next reload while its mails
/// count late or lost. Each end is counted in `cutover_task_restarts_total`
/// and logged once per different cause, and the task starts again after a
/// backoff. The tasks loop forever: one that returns is restarted too.
async fn supervise(task: BackgroundTask, shared: Arc<Shared>) {
    let mut backoff = RESTART_BACKOFF;
    let mut last_cause: Option<String> = None;
    loop {
        let started = Instant::now();
        let ended = std::panic::AssertUnwindSafe((task.start)()).catch_unwind().await;
        let cause = match ended {
            Ok(()) => "returned".to_string(),
            Err(panic) => format!("panicked: {}", crate::probe::sanitize(&panic_text(&*panic))),
        };
        if started.elapsed() >= RESTART_BACKOFF_MAX {
            backoff = RESTART_BACKOFF;
        }
        if last_cause.as_deref() != Some(cause.as_str()) {
            tracing::error!(
                task = %task.name, cause = %cause, restart_in_seconds = backoff.as_secs_f64(),
                "background task stopped; restarting it (this is a bug)"
            );
            last_cause = Some(cause);
        }
        shared.metrics.task_restarted(&task.name);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn instance_loop(spec: InstanceSpec, config: Arc<Config>, shared: Arc<Shared>) {
    let interval = spec.check.check.interval;
    // Align to the wall clock so an instance keeps its slot across restarts.
    let since_epoch = Duration::from_secs_f64(crate::unix_now());
    let phase = Duration::from_nanos((since_epoch.as_nanos() % interval.as_nanos().max(1)) as u64);
    let wanted = offset(&spec.inst, interval);
    let wait = if wanted >= phase {
        wanted - phase
    } else {
        interval - (phase - wanted)
    };
    // A long-interval check with nothing recent runs at once, then keeps its slot.
    let within = |t: f64| crate::unix_now() - t < interval.as_secs_f64();
    let recent = shared
        .last
        .lock()
        .expect("state lock")
        .get(&spec.inst)
        .is_some_and(|l| within(l.outcome.started_at))
        || shared
            .audits
            .lock()
            .get(&spec.inst.check)
            .is_some_and(|a| within(a.report.started_at))
        || shared
            .parity
            .lock()
            .get(&spec.inst.check)
            .is_some_and(|r| within(r.started_at));
    let mut first = tokio::time::Instant::now() + wait;
    if spec.check.probe.eager() && !recent {
        let phase = shared.phase.current(&config.migration).phase;
        let (outcome, waited) = run_queued(&spec, &config, phase).await;
        shared.metrics.queue_waited(waited);
        shared.publish(&spec.inst, outcome);
        // Not again right away when the slot is near.
        if wait < interval / 2 {
            first += interval;
        }
    }
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        let phase = shared.phase.current(&config.migration).phase;
        let (outcome, waited) = run_queued(&spec, &config, phase).await;
        shared.metrics.queue_waited(waited);
        shared.publish(&spec.inst, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe with a bug.
    struct Panics;

    impl crate::probe::Probe for Panics {
        fn hostname(&self) -> &str {
            "panic.test"
        }
        fn run<'a>(&'a self, _: IpAddr, _: &'a mut Run) -> futures::future::BoxFuture<'a, Result<(), Failure>> {
            Box::pin(async { panic!("index out of bounds") })
        }
    }

    #[tokio::test]
    async fn a_panicking_probe_fails_its_run_and_the_instance_lives_on() {
        let text =
            "environments: {old: {addresses: [127.0.0.1]}}\nchecks: [{name: p, kind: tcp, host: a.test, port: 1}]\n";
        let mut config = crate::probe::parse(std::path::Path::new("c.yaml"), text).unwrap();
        config.checks[0].probe = Arc::new(Panics);
        let spec = instances(&config).remove(0);
        for _ in 0..2 {
            let outcome = run_once(&spec, &config).await;
            let failure = outcome.result.unwrap_err();
            assert_eq!(failure.reason, FailureReason::Protocol);
            assert!(
                failure.detail.contains("panicked: index out of bounds"),
                "{}",
                failure.detail
            );
        }
    }

    #[tokio::test]
    async fn a_background_task_that_panics_is_counted_and_started_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let shared = Shared::new(Metrics::new());
        let starts = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let counted = starts.clone();
        let task = BackgroundTask {
            name: "mailflow_watch:flow:new:INBOX".into(),
            start: Box::new(move || {
                let (n, tx) = (counted.fetch_add(1, Ordering::SeqCst), tx.clone());
                Box::pin(async move {
                    if n == 0 {
                        panic!("hostile input");
                    }
                    tx.send(n).unwrap();
                    futures::future::pending::<()>().await
                })
            }),
        };
        shared.metrics.task_started(&task.name);
        let restarts = "cutover_task_restarts_total{task=\"mailflow_watch:flow:new:INBOX\"}";
        assert!(shared.metrics.encode().contains(&format!("{restarts} 0")));
        let supervisor = tokio::spawn(supervise(task, shared.clone()));
        let second = tokio::time::timeout(RESTART_BACKOFF * 5, rx.recv()).await;
        assert_eq!(second.ok().flatten(), Some(1), "not started again");
        assert!(shared.metrics.encode().contains(&format!("{restarts} 1")));
        assert!(!supervisor.is_finished());
        supervisor.abort();
        shared.metrics.forget_task("mailflow_watch:flow:new:INBOX");
        assert!(!shared.metrics.encode().contains("mailflow_watch"));
    }

    #[test]
    fn offsets_are_stable_and_within_the_interval() {
        let inst = |n: u32| Instance {
            check: format!("c{n}"),
            kind: crate::config::Kind::Tcp,
            env: "old".into(),
            address: "127.0.0.10".into(),
        };
        let interval = Duration::from_secs(30);
        assert_eq!(offset(&inst(1), interval), offset(&inst(1), interval));
        let offsets: Vec<Duration> = (0..1000).map(|n| offset(&inst(n), interval)).collect();
        assert!(offsets.iter().all(|o| *o < interval));
        // Spread: every tenth of the interval gets some instances.
        for slot in 0..10 {
            let lo = interval * slot / 10;
            let hi = interval * (slot + 1) / 10;
            assert!(offsets.iter().any(|o| *o >= lo && *o < hi), "slot {slot} empty");
        }
    }
}

//! The mail ledger: every probe mail a `mailflow` check sends, from the intent
//! to send until it is delivered, late, lost or seen twice — kept on disk so a
//! restart (even `kill -9`) neither forgets a mail in flight nor counts one twice.
//!
//! SQLite in WAL mode with `synchronous=FULL` (via rusqlite's bundled build),
//! rather than redb: SQLite's atomic commit has decades of crash and power-loss
//! testing behind it (its test suite simulates crashes and torn writes at every
//! I/O), which is what "no mail is counted twice after a crash" rests on.
//!
//! Every state change and the counter totals it implies are written in one
//! transaction, and published to its [`MailSink`] (the metrics' mail series) only after it committed; at
//! start the counters begin from the stored totals, so metrics always equal the
//! ledger. A row is written before its mail is sent (`intent`); a crash before
//! the server's reply is recorded leaves `intent`, which becomes `send_unknown`:
//! delivered if the mail shows up, `not_sent` (not lost: it may never have left)
//! if it does not within `lost_after`. After a (re)start nothing is declared
//! lost or `not_sent` until the watchers have searched every mailbox
//! ([`Losses::Hold`]): a mail that arrived while the daemon was down is found,
//! late, not lost. One found after it was counted lost anyway (a watcher was
//! down past `lost_after`) is also counted `recovered`, so that `sent =
//! delivered + lost - recovered + in flight` always holds.
//!
//! Calls are short synchronous transactions behind a mutex; probe traffic is a
//! few mails a minute, far from needing a connection pool.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// A counted mail event. The ledger keeps one total per event (and label) so
/// counters start from its totals after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailCount {
    /// `cutover_mail_sent_total`.
    Sent,
    /// `cutover_mail_send_failures_total`, label `reason`.
    SendFailure,
    /// `cutover_mail_delivered_total`, label `delivered_env`.
    Delivered,
    /// `cutover_mail_late_total`.
    Late,
    /// `cutover_mail_lost_total`.
    Lost,
    /// `cutover_mail_duplicates_total`.
    Duplicate,
    /// `cutover_mail_recovered_total`: found after it was counted lost. Lost
    /// minus recovered is the net loss, so `sent = delivered + lost -
    /// recovered + in flight` holds whatever the order of events.
    Recovered,
}

impl MailCount {
    /// Every event, for reading totals back.
    pub const ALL: [MailCount; 7] = [
        Self::Sent,
        Self::SendFailure,
        Self::Delivered,
        Self::Late,
        Self::Lost,
        Self::Duplicate,
        Self::Recovered,
    ];

    /// The name the ledger stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::SendFailure => "send_failure",
            Self::Delivered => "delivered",
            Self::Late => "late",
            Self::Lost => "lost",
            Self::Duplicate => "duplicate",
            Self::Recovered => "recovered",
        }
    }
}

/// Where the ledger publishes what it committed. The daemon hands it the
/// metrics' mail series; `check`'s one-shot ledger hands it [`NoSink`]. The
/// ledger sits below the metrics, so it names this trait, never the metrics.
pub trait MailSink: Send + Sync {
    /// Adds `n` to an event's count on a route; `label` is the failure reason
    /// or the delivered environment, empty for the unlabelled events.
    fn add(&self, check: &str, route: &str, what: MailCount, label: &str, n: u64);
    /// A delivery into `env`: its latency when the accept time is known, and
    /// when it became visible (Unix seconds).
    fn delivered(&self, check: &str, route: &str, env: &str, latency: Option<f64>, visible_at: f64);
    /// Mails in flight on a route and the age of the oldest, in seconds.
    fn in_flight(&self, check: &str, route: &str, count: u64, oldest_age: f64);
}

/// A [`MailSink`] that keeps nothing: for one-shot runs nobody scrapes.
pub struct NoSink;

impl MailSink for NoSink {
    fn add(&self, _: &str, _: &str, _: MailCount, _: &str, _: u64) {}
    fn delivered(&self, _: &str, _: &str, _: &str, _: Option<f64>, _: f64) {}
    fn in_flight(&self, _: &str, _: &str, _: u64, _: f64) {}
}

/// The database file inside `--storage.path`.
pub const DB_FILE: &str = "ledger.sqlite";
/// This daemon's instance id, made once: it marks the probe mails it owns.
pub const INSTANCE_FILE: &str = "instance-id";
/// The key that signs probe markers when the check names none, made once, mode 0600.
pub const KEY_FILE: &str = "mailflow-hmac.key";

/// A ledger failure, naming the database and the step.
#[derive(Debug, thiserror::Error)]
#[error("ledger {where_}: {step}: {source}")]
pub struct LedgerError {
    where_: String,
    step: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// Who this daemon is, for probe markers: mails with another instance id are
/// never counted nor deleted.
pub struct Identity {
    /// Random hex, stable across restarts of one storage directory.
    pub instance: String,
    key: Vec<u8>,
}

impl Identity {
    /// The default marker key (checks may name their own).
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

/// What a state change led to, for the watcher's log and the one-shot check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// First delivery of a known mail.
    Delivered,
    /// Another copy of a mail already delivered.
    Duplicate,
    /// This very message was recorded before (seen again before its deletion).
    AlreadyRecorded,
    /// Our own, verified, but unknown to this ledger (an earlier run's): recorded as stray.
    Stray,
    /// First delivery of a mail already counted lost: counted delivered and recovered.
    Recovered,
}

/// Whether a [`Ledger::sweep`] may close mails that were not found in time
/// (`lost`, `not_sent`). Only the watchers know whether every mailbox has been
/// searched since they started; until then a missing mail is unknown, not lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Losses {
    /// Every watched mailbox has been searched: overdue mails are lost.
    Declare,
    /// Some mailbox has not been searched yet: overdue mails stay in flight.
    Hold,
}

/// A probe mail as found in a mailbox.
pub struct Found<'a> {
    /// The probe id.
    pub id: &'a str,
    /// Environment of the watched mailbox (`delivered_env`).
    pub env: &'a str,
    /// The mailbox name.
    pub mailbox: &'a str,
    /// The mailbox's UIDVALIDITY.
    pub uidvalidity: u32,
    /// The message's UID.
    pub uid: u32,
    /// When it became visible, Unix seconds.
    pub visible_at: f64,
    /// The Received hops, one per line, as far as they parsed.
    pub hops: &'a str,
    /// The check's `late_after`: found later than this after it was accepted,
    /// the mail is late even if no sweep said so yet (the daemon was down).
    pub late_after: Duration,
}

/// One row, for the one-shot check and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The state: intent, sent, send_unknown, send_failed, delivered, lost, not_sent, stray.
    pub state: String,
    /// Where it landed.
    pub delivered_env: Option<String>,
    /// Visible minus accepted, seconds.
    pub latency: Option<f64>,
    /// Extra copies seen.
    pub duplicates: u32,
}

/// The ledger.
pub struct Ledger {
    conn: Mutex<Connection>,
    where_: String,
    metrics: Arc<dyn MailSink>,
    /// This daemon's identity.
    pub identity: Identity,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mails (
    id TEXT PRIMARY KEY,
    check_name TEXT NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    accepted REAL,
    reply TEXT,
    late INTEGER NOT NULL DEFAULT 0,
    delivered_env TEXT,
    mailbox TEXT,
    visible REAL,
    latency REAL,
    hops TEXT,
    duplicates INTEGER NOT NULL DEFAULT 0,
    finished REAL
);
CREATE INDEX IF NOT EXISTS mails_route ON mails (check_name, route, state);
CREATE TABLE IF NOT EXISTS sightings (
    env TEXT NOT NULL,
    mailbox TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (env, mailbox, uidvalidity, uid)
);
CREATE TABLE IF NOT EXISTS totals (
    check_name TEXT NOT NULL,
    route TEXT NOT NULL,
    event TEXT NOT NULL,
    label TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (check_name, route, event, label)
);
";

fn now() -> f64 {
    crate::unix_now()
}

/// Random hex from the kernel (Linux's `/dev/urandom`), for ids and keys.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, with the identity kept there,
    /// resumes what a crash interrupted and seeds `metrics` from the totals.
    pub fn open(dir: &Path, metrics: Arc<dyn MailSink>) -> Result<Ledger, LedgerError> {
        let where_ = dir.join(DB_FILE).display().to_string();
        let err = |step: &'static str| {
            let where_ = where_.clone();
            move |e: std::io::Error| LedgerError {
                where_,
                step,
                source: Box::new(e),
            }
        };
        // The daemon's own directory, readable by nobody else: it holds the
        // marker key, and the ledger names mailboxes and servers.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err("creating the storage directory"))?;
        let instance = read_or_create(&dir.join(INSTANCE_FILE), 8).map_err(err("instance id"))?;
        let key = read_or_create(&dir.join(KEY_FILE), 32).map_err(err("marker key"))?;
        // SQLite creates its -wal and -shm files with the database file's mode,
        // so creating that file 0600 first keeps all three private.
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(dir.join(DB_FILE))
            .map_err(err("creating the database file"))?;
        let conn = Connection::open(dir.join(DB_FILE)).map_err(|e| sql(&where_, "open", e))?;
        let identity = Identity {
            instance,
            key: key.into_bytes(),
        };
        Self::start(conn, where_, metrics, identity)
    }

    /// A ledger in memory with a fresh identity, for `check`: nothing outlives the run.
    pub fn in_memory(metrics: Arc<dyn MailSink>) -> Result<Ledger, LedgerError> {
        let where_ = ":memory:".to_string();
        let conn = Connection::open_in_memory().map_err(|e| sql(&where_, "open", e))?;
        let random = |n| {
            random_hex(n).map_err(|e| LedgerError {
                where_: where_.clone(),
                step: "random identity",
                source: Box::new(e),
            })
        };
        let identity = Identity {
            instance: random(8)?,
            key: random(32)?.into_bytes(),
        };
        Self::start(conn, where_.clone(), metrics, identity)
    }

    fn start(
        conn: Connection,
        where_: String,
        metrics: Arc<dyn MailSink>,
        identity: Identity,
    ) -> Result<Ledger, LedgerError> {
        let e = |step| {
            let w = where_.clone();
            move |err| sql(&w, step, err)
        };
        conn.busy_timeout(Duration::from_secs(5)).map_err(e("busy_timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(e("WAL mode"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(e("synchronous"))?;
        conn.execute_batch(SCHEMA).map_err(e("schema"))?;
        // A crash between intent and reply: the mail may or may not have left.
        conn.execute("UPDATE mails SET state = 'send_unknown' WHERE state = 'intent'", [])
            .map_err(e("resuming interrupted sends"))?;
        let ledger = Ledger {
            conn: Mutex::new(conn),
            where_: where_.clone(),
            metrics,
            identity,
        };
        ledger.seed().map_err(e("reading totals"))?;
        Ok(ledger)
    }

    /// Counters from the stored totals, the latency histogram and last
    /// delivery times from the retained rows, in-flight gauges per route.
    fn seed(&self) -> rusqlite::Result<()> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT check_name, route, event, label, value FROM totals")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (check, route, event, label, value) = row?;
            if let Some(what) = MailCount::ALL.into_iter().find(|w| w.as_str() == event) {
                self.metrics.add(&check, &route, what, &label, value.max(0) as u64);
            }
        }
        let mut stmt = conn.prepare(
            "SELECT check_name, route, delivered_env, latency, visible FROM mails WHERE state = 'delivered' AND check_name != ''",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, f64>(4)?,
            ))
        })?;
        for row in rows {
            let (check, route, env, latency, visible) = row?;
            self.metrics.delivered(&check, &route, &env, latency, visible);
        }
        let mut stmt = conn.prepare("SELECT DISTINCT check_name, route FROM mails WHERE check_name != ''")?;
        let routes: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (check, route) in routes {
            publish_flight(&conn, &self.metrics, &check, &route)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the
        // transaction rolls back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, step: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
        move |e| sql(&self.where_, step, e)
    }

    /// Records the intent to send mail `id`, before anything goes on the wire.
    pub fn intent(&self, id: &str, check: &str, route: &str) -> Result<(), LedgerError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO mails (id, check_name, route, state, created) VALUES (?1, ?2, ?3, 'intent', ?4)",
            params![id, check, route, now()],
        )
        .map_err(self.fail("recording the intent to send"))?;
        publish_flight(&conn, &self.metrics, check, route).map_err(self.fail("in-flight gauges"))
    }

    /// Records the server's acceptance (250 after DATA) at `at`. If a watcher
    /// was faster and already recorded the delivery, only the latency is added.
    pub fn accepted(&self, id: &str, at: f64, reply: &str) -> Result<(), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.fail("begin"))?;
        let row: Option<AcceptRow> = tx
            .query_row(
                "SELECT check_name, route, state, visible, delivered_env FROM mails WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(self.fail("reading a mail"))?;
        let Some((check, route, state, visible, env)) = row else {
            return Ok(());
        };
        let mut publish = Vec::new();
        match state.as_str() {
            "intent" | "send_unknown" => {
                tx.execute(
                    "UPDATE mails SET state = 'sent', accepted = ?2, reply = ?3 WHERE id = ?1",
                    params![id, at, reply],
                )
                .map_err(self.fail("recording the reply"))?;
                bump(&tx, &check, &route, MailCount::Sent, "").map_err(self.fail("totals"))?;
                publish.push((MailCount::Sent, String::new()));
            }
            "delivered" => {
                let latency = visible.map(|v| (v - at).max(0.0));
                tx.execute(
                    "UPDATE mails SET accepted = ?2, reply = ?3, latency = ?4 WHERE id = ?1 AND accepted IS NULL",
                    params![id, at, reply, latency],
                )
                .map_err(self.fail("recording the reply"))?;
                if let (Some(env), Some(visible)) = (env, visible) {
                    tx.commit().map_err(self.fail("commit"))?;
                    self.metrics.delivered(&check, &route, &env, latency, visible);
                    return Ok(());
                }
            }
            _ => {}
        }
        tx.commit().map_err(self.fail("commit"))?;
        for (what, label) in publish {
            self.metrics.add(&check, &route, what, &label, 1);
        }
        publish_flight(&conn, &self.metrics, &check, &route).map_err(self.fail("in-flight gauges"))
    }

    /// Records a failed send. `definite`: the server refused or the session
    /// broke before the message was complete, so nothing left; otherwise the
    /// mail may have been accepted (`send_unknown`).
    pub fn send_failed(&self, id: &str, reason: &str, definite: bool) -> Result<(), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.fail("begin"))?;
        let row: Option<(String, String)> = tx
            .query_row(
                "SELECT check_name, route FROM mails WHERE id = ?1 AND state = 'intent'",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.fail("reading a mail"))?;
        let Some((check, route)) = row else {
            return Ok(());
        };
        let (state, finished) = if definite {
            ("send_failed", Some(now()))
        } else {
            ("send_unknown", None)
        };
        tx.execute(
            "UPDATE mails SET state = ?2, reply = ?3, finished = ?4 WHERE id = ?1",
            params![id, state, reason, finished],
        )
        .map_err(self.fail("recording a failed send"))?;
        bump(&tx, &check, &route, MailCount::SendFailure, reason).map_err(self.fail("totals"))?;
        tx.commit().map_err(self.fail("commit"))?;
        self.metrics.add(&check, &route, MailCount::SendFailure, reason, 1);
        publish_flight(&conn, &self.metrics, &check, &route).map_err(self.fail("in-flight gauges"))
    }

    /// Records that a verified own probe mail is in a mailbox. Once this
    /// returns, the message is recorded and may be deleted.
    pub fn found(&self, f: &Found<'_>) -> Result<Sighting, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.fail("begin"))?;
        let new = tx
            .execute(
                "INSERT OR IGNORE INTO sightings (env, mailbox, uidvalidity, uid, id) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![f.env, f.mailbox, f.uidvalidity, f.uid, f.id],
            )
            .map_err(self.fail("recording a sighting"))?;
        if new == 0 {
            return Ok(Sighting::AlreadyRecorded);
        }
        let row: Option<(String, String, String, Option<f64>, bool)> = tx
            .query_row(
                "SELECT check_name, route, state, accepted, late FROM mails WHERE id = ?1",
                [f.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(self.fail("reading a mail"))?;
        let Some((check, route, state, accepted, late)) = row else {
            tx.execute(
                "INSERT INTO mails (id, check_name, route, state, created, delivered_env, mailbox, visible, hops, finished)
                 VALUES (?1, '', '', 'stray', ?2, ?3, ?4, ?2, ?5, ?2)",
                params![f.id, f.visible_at, f.env, f.mailbox, f.hops],
            )
            .map_err(self.fail("recording a stray mail"))?;
            tx.commit().map_err(self.fail("commit"))?;
            return Ok(Sighting::Stray);
        };
        let mut events = Vec::new();
        let (verdict, latency) = match state.as_str() {
            "delivered" => {
                tx.execute("UPDATE mails SET duplicates = duplicates + 1 WHERE id = ?1", [f.id])
                    .map_err(self.fail("recording a duplicate"))?;
                events.push(MailCount::Duplicate);
                (Sighting::Duplicate, None)
            }
            "stray" => (Sighting::Stray, None),
            other => {
                let verdict = if other == "lost" {
                    Sighting::Recovered
                } else {
                    Sighting::Delivered
                };
                // Not accepted as far as we know, yet here: it was sent after all.
                if matches!(other, "intent" | "send_unknown" | "not_sent" | "send_failed") {
                    events.push(MailCount::Sent);
                }
                events.push(MailCount::Delivered);
                // Counted lost already, and a counter cannot go back: the
                // loss is undone by counting the recovery.
                if other == "lost" {
                    events.push(MailCount::Recovered);
                }
                let latency = accepted.map(|a| (f.visible_at - a).max(0.0));
                let late_now = !late && latency.is_some_and(|l| l > f.late_after.as_secs_f64());
                if late_now {
                    events.push(MailCount::Late);
                }
                tx.execute(
                    "UPDATE mails SET state = 'delivered', delivered_env = ?2, mailbox = ?3, visible = ?4,
                     latency = ?5, hops = ?6, finished = ?4, late = late OR ?7 WHERE id = ?1",
                    params![f.id, f.env, f.mailbox, f.visible_at, latency, f.hops, late_now],
                )
                .map_err(self.fail("recording a delivery"))?;
                (verdict, latency)
            }
        };
        for what in &events {
            let label = if *what == MailCount::Delivered { f.env } else { "" };
            bump(&tx, &check, &route, *what, label).map_err(self.fail("totals"))?;
        }
        tx.commit().map_err(self.fail("commit"))?;
        for what in events {
            let label = if what == MailCount::Delivered { f.env } else { "" };
            self.metrics.add(&check, &route, what, label, 1);
        }
        if matches!(verdict, Sighting::Delivered | Sighting::Recovered) {
            self.metrics.delivered(&check, &route, f.env, latency, f.visible_at);
        }
        publish_flight(&conn, &self.metrics, &check, &route).map_err(self.fail("in-flight gauges"))?;
        Ok(verdict)
    }

    /// Ages a check's mails on every route: interrupted sends older than
    /// `stale` become `send_unknown`, sent mails become late, then lost;
    /// `send_unknown` mails never seen become `not_sent` (both only with
    /// [`Losses::Declare`]); finished rows past `retention` go. Also refreshes
    /// the in-flight gauges.
    pub fn sweep(&self, check: &str, ages: &Ages, losses: Losses) -> Result<(), LedgerError> {
        let routes: Vec<String> = {
            let conn = self.lock();
            let mut stmt = conn
                .prepare("SELECT DISTINCT route FROM mails WHERE check_name = ?1")
                .map_err(self.fail("listing routes"))?;
            stmt.query_map([check], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<_, _>>())
                .map_err(self.fail("listing routes"))?
        };
        for route in routes {
            self.sweep_route(check, &route, ages, losses)?;
        }
        Ok(())
    }

    fn sweep_route(&self, check: &str, route: &str, ages: &Ages, losses: Losses) -> Result<(), LedgerError> {
        let t = now();
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.fail("begin"))?;
        let mut events = Vec::new();
        tx.execute(
            "UPDATE mails SET state = 'send_unknown' WHERE check_name = ?1 AND route = ?2 AND state = 'intent' AND created < ?3",
            params![check, route, t - ages.stale.as_secs_f64()],
        )
        .map_err(self.fail("sweeping interrupted sends"))?;
        let late = tx
            .execute(
                "UPDATE mails SET late = 1 WHERE check_name = ?1 AND route = ?2 AND state = 'sent'
                 AND late = 0 AND accepted < ?3",
                params![check, route, t - ages.late_after.as_secs_f64()],
            )
            .map_err(self.fail("marking late mails"))?;
        // Held: overdue mails stay in flight until every mailbox was searched.
        let mut lost = 0;
        if losses == Losses::Declare {
            let overdue = t - ages.lost_after.as_secs_f64();
            lost = tx
                .execute(
                    "UPDATE mails SET state = 'lost', finished = ?4 WHERE check_name = ?1 AND route = ?2
                     AND state = 'sent' AND accepted < ?3",
                    params![check, route, overdue, t],
                )
                .map_err(self.fail("marking lost mails"))?;
            tx.execute(
                "UPDATE mails SET state = 'not_sent', finished = ?4 WHERE check_name = ?1 AND route = ?2
                 AND state = 'send_unknown' AND created < ?3",
                params![check, route, overdue, t],
            )
            .map_err(self.fail("closing unknown sends"))?;
        }
        let cutoff = t - ages.retention.as_secs_f64();
        tx.execute(
            "DELETE FROM sightings WHERE id IN (SELECT id FROM mails WHERE finished < ?1)",
            [cutoff],
        )
        .map_err(self.fail("pruning sightings"))?;
        tx.execute("DELETE FROM mails WHERE finished < ?1", [cutoff])
            .map_err(self.fail("pruning"))?;
        for (what, n) in [(MailCount::Late, late), (MailCount::Lost, lost)] {
            for _ in 0..n {
                bump(&tx, check, route, what, "").map_err(self.fail("totals"))?;
            }
            if n > 0 {
                events.push((what, n as u64));
            }
        }
        tx.commit().map_err(self.fail("commit"))?;
        for (what, n) in events {
            self.metrics.add(check, route, what, "", n);
        }
        publish_flight(&conn, &self.metrics, check, route).map_err(self.fail("in-flight gauges"))
    }

    /// One mail's row.
    pub fn entry(&self, id: &str) -> Result<Option<Entry>, LedgerError> {
        self.lock()
            .query_row(
                "SELECT state, delivered_env, latency, duplicates FROM mails WHERE id = ?1",
                [id],
                |r| {
                    Ok(Entry {
                        state: r.get(0)?,
                        delivered_env: r.get(1)?,
                        latency: r.get(2)?,
                        duplicates: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.fail("reading a mail"))
    }

    /// Whether the ledger knows mail `id` (in any state).
    pub fn knows(&self, id: &str) -> Result<bool, LedgerError> {
        Ok(self.entry(id)?.is_some())
    }

    /// Where the database lives, for messages.
    pub fn location(&self) -> &str {
        &self.where_
    }
}

/// check, route, state, visible, delivered_env of one mail.
type AcceptRow = (String, String, String, Option<f64>, Option<String>);

/// The ages a [`Ledger::sweep`] applies.
#[derive(Debug, Clone, Copy)]
pub struct Ages {
    /// An `intent` older than this was interrupted (a send never takes this long).
    pub stale: Duration,
    /// Not found after this long: late.
    pub late_after: Duration,
    /// Not found after this long: lost.
    pub lost_after: Duration,
    /// Finished rows older than this are pruned.
    pub retention: Duration,
}

fn bump(
    tx: &rusqlite::Transaction<'_>,
    check: &str,
    route: &str,
    what: MailCount,
    label: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO totals (check_name, route, event, label, value) VALUES (?1, ?2, ?3, ?4, 1)
         ON CONFLICT (check_name, route, event, label) DO UPDATE SET value = value + 1",
        params![check, route, what.as_str(), label],
    )?;
    Ok(())
}

fn publish_flight(conn: &Connection, metrics: &Arc<dyn MailSink>, check: &str, route: &str) -> rusqlite::Result<()> {
    let (count, oldest): (i64, Option<f64>) = conn.query_row(
        "SELECT COUNT(*), MIN(COALESCE(accepted, created)) FROM mails
         WHERE check_name = ?1 AND route = ?2 AND state IN ('sent', 'send_unknown')",
        params![check, route],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let age = oldest.map_or(0.0, |o| (now() - o).max(0.0));
    metrics.in_flight(check, route, count.max(0) as u64, age);
    Ok(())
}

fn sql(where_: &str, step: &'static str, e: rusqlite::Error) -> LedgerError {
    LedgerError {
        where_: where_.to_string(),
        step,
        source: Box::new(e),
    }
}

/// Reads a small identity file, or creates it with `bytes` random bytes in hex,
/// mode 0600, written to a temporary name and renamed so a crash never leaves
/// half a key.
fn read_or_create(path: &Path, bytes: usize) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let value = random_hex(bytes)?;
    crate::write_private(path, value.as_bytes())?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found<'a>(id: &'a str, uid: u32) -> Found<'a> {
        Found {
            id,
            env: "new",
            mailbox: "INBOX",
            uidvalidity: 1,
            uid,
            visible_at: now(),
            hops: "",
            late_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_mail_is_counted_once_whatever_the_order_of_reply_and_sighting() {
        let l = Ledger::in_memory(Arc::new(NoSink)).unwrap();
        l.intent("a", "c", "new").unwrap();
        l.accepted("a", now(), "250 ok").unwrap();
        assert_eq!(l.found(&found("a", 1)).unwrap(), Sighting::Delivered);
        assert_eq!(l.found(&found("a", 1)).unwrap(), Sighting::AlreadyRecorded);
        assert_eq!(l.found(&found("a", 2)).unwrap(), Sighting::Duplicate);
        // The watcher first, then the reply.
        l.intent("b", "c", "new").unwrap();
        assert_eq!(l.found(&found("b", 3)).unwrap(), Sighting::Delivered);
        l.accepted("b", now(), "250 ok").unwrap();
        let b = l.entry("b").unwrap().unwrap();
        assert_eq!((b.state.as_str(), b.latency.is_some()), ("delivered", true));
        assert_eq!(l.found(&found("zz", 4)).unwrap(), Sighting::Stray);
        let totals: Vec<(String, i64)> = l
            .lock()
            .prepare("SELECT event || ':' || label, value FROM totals ORDER BY 1")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let want = [("delivered:new", 2), ("duplicate:", 1), ("sent:", 2)];
        let want: Vec<(String, i64)> = want.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(totals, want);
    }

    #[test]
    fn totals_survive_a_reopen_and_interrupted_sends_become_unknown() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = Ledger::open(dir.path(), Arc::new(NoSink)).unwrap();
            l.intent("a", "c", "new").unwrap();
            l.accepted("a", now(), "250").unwrap();
            l.found(&found("a", 1)).unwrap();
            l.intent("b", "c", "new").unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode() & 0o777;
        // Private state: the key, the instance id, and the ledger with its WAL.
        for file in [KEY_FILE, INSTANCE_FILE, DB_FILE] {
            assert_eq!(mode(file), 0o600, "{file}");
        }
        let wal = format!("{DB_FILE}-wal");
        if dir.path().join(&wal).exists() {
            assert_eq!(mode(&wal), 0o600, "{wal}");
        }
        let l = Ledger::open(dir.path(), Arc::new(NoSink)).unwrap();
        assert_eq!(l.entry("b").unwrap().unwrap().state, "send_unknown");
        assert_eq!(l.found(&found("b", 2)).unwrap(), Sighting::Delivered);
        let ages = Ages {
            stale: Duration::ZERO,
            late_after: Duration::ZERO,
            lost_after: Duration::ZERO,
            retention: Duration::from_secs(3600),
        };
        l.intent("c", "c", "new").unwrap();
        l.accepted("c", now() - 1.0, "250").unwrap();
        l.sweep("c", &ages, Losses::Declare).unwrap();
        assert_eq!(l.entry("c").unwrap().unwrap().state, "lost");
    }

    #[test]
    fn a_mail_found_past_late_after_is_late_once_whether_or_not_a_sweep_said_so() {
        let counted = Arc::new(Counting::default());
        let l = Ledger::in_memory(counted.clone()).unwrap();
        let late_after = Duration::from_secs(60);
        // The daemon was down: no sweep ran between acceptance and sighting.
        l.intent("a", "c", "new").unwrap();
        l.accepted("a", now() - 90.0, "250").unwrap();
        l.found(&Found {
            late_after,
            ..found("a", 1)
        })
        .unwrap();
        // A sweep marked it late before it was found.
        l.intent("b", "c", "new").unwrap();
        l.accepted("b", now() - 90.0, "250").unwrap();
        let ages = Ages {
            stale: late_after,
            late_after,
            lost_after: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
        };
        l.sweep("c", &ages, Losses::Declare).unwrap();
        l.found(&Found {
            late_after,
            ..found("b", 2)
        })
        .unwrap();
        // On time.
        l.intent("o", "c", "new").unwrap();
        l.accepted("o", now() - 1.0, "250").unwrap();
        l.found(&Found {
            late_after,
            ..found("o", 3)
        })
        .unwrap();
        assert_eq!(counted.0.lock().unwrap().0.get("late"), Some(&2));
        assert_balanced(&l, &counted, "late deliveries");
    }

    /// The counters a scrape would show, as the ledger published them.
    #[derive(Default)]
    struct Counting(Mutex<(std::collections::HashMap<&'static str, u64>, u64)>);

    impl MailSink for Counting {
        fn add(&self, _: &str, _: &str, what: MailCount, _: &str, n: u64) {
            *self.0.lock().unwrap().0.entry(what.as_str()).or_default() += n;
        }
        fn delivered(&self, _: &str, _: &str, _: &str, _: Option<f64>, _: f64) {}
        fn in_flight(&self, _: &str, _: &str, count: u64, _: f64) {
            self.0.lock().unwrap().1 = count;
        }
    }

    /// Asserts `sent = delivered + lost - recovered + in flight` twice: in
    /// the ledger (stored totals and the rows still in flight) and in the
    /// counters it published.
    fn assert_balanced(l: &Ledger, counted: &Counting, step: &str) {
        let (ledger, in_flight) = {
            let conn = l.lock();
            let total = |event: &str| -> i64 {
                conn.query_row(
                    "SELECT COALESCE(SUM(value), 0) FROM totals WHERE event = ?1",
                    [event],
                    |r| r.get(0),
                )
                .unwrap()
            };
            let in_flight: i64 = conn
                .query_row("SELECT COUNT(*) FROM mails WHERE state = 'sent'", [], |r| r.get(0))
                .unwrap();
            let ledger = ["sent", "delivered", "lost", "recovered"].map(total);
            (ledger, in_flight)
        };
        let [sent, delivered, lost, recovered] = ledger;
        assert_eq!(
            sent,
            delivered + lost - recovered + in_flight,
            "ledger after {step}: {ledger:?}"
        );
        let (counters, gauge) = &*counted.0.lock().unwrap();
        let c = |event: &str| counters.get(event).copied().unwrap_or(0) as i64;
        assert_eq!(
            c("sent"),
            c("delivered") + c("lost") - c("recovered") + *gauge as i64,
            "counters after {step}: {counters:?}, in flight {gauge}"
        );
        assert_eq!(
            ledger,
            ["sent", "delivered", "lost", "recovered"].map(c),
            "after {step}"
        );
    }

    #[test]
    fn sent_is_delivered_plus_net_lost_plus_in_flight_whatever_the_order() {
        let counted = Arc::new(Counting::default());
        let l = Ledger::in_memory(counted.clone()).unwrap();
        let overdue = Ages {
            stale: Duration::ZERO,
            late_after: Duration::ZERO,
            lost_after: Duration::ZERO,
            retention: Duration::from_secs(3600),
        };
        let send = |id: &str| {
            l.intent(id, "c", "new").unwrap();
            l.accepted(id, now() - 1.0, "250").unwrap();
        };
        send("a");
        assert_eq!(l.found(&found("a", 1)).unwrap(), Sighting::Delivered);
        assert_balanced(&l, &counted, "an ordinary delivery");

        // Overdue, but not every mailbox has been searched since a restart.
        send("b");
        l.sweep("c", &overdue, Losses::Hold).unwrap();
        assert_eq!(l.entry("b").unwrap().unwrap().state, "sent");
        assert_balanced(&l, &counted, "a held sweep");

        // Declared lost, then found after all: recovered, once.
        l.sweep("c", &overdue, Losses::Declare).unwrap();
        assert_eq!(l.entry("b").unwrap().unwrap().state, "lost");
        assert_balanced(&l, &counted, "a loss");
        assert_eq!(l.found(&found("b", 2)).unwrap(), Sighting::Recovered);
        let b = l.entry("b").unwrap().unwrap();
        assert_eq!((b.state.as_str(), b.latency.is_some()), ("delivered", true));
        assert_balanced(&l, &counted, "a recovery");
        assert_eq!(l.found(&found("b", 3)).unwrap(), Sighting::Duplicate);
        assert_balanced(&l, &counted, "a copy of a recovered mail");

        // Lost for good.
        send("d");
        l.sweep("c", &overdue, Losses::Declare).unwrap();
        assert_balanced(&l, &counted, "a loss for good");

        // A crash hid the reply: not sent, then found after all.
        l.intent("e", "c", "new").unwrap();
        l.sweep("c", &overdue, Losses::Declare).unwrap();
        assert_eq!(l.entry("e").unwrap().unwrap().state, "not_sent");
        assert_eq!(l.found(&found("e", 4)).unwrap(), Sighting::Delivered);
        assert_balanced(&l, &counted, "a send whose reply a crash hid");

        send("f");
        assert_balanced(&l, &counted, "one in flight");
        let c = &counted.0.lock().unwrap().0;
        assert_eq!((c["lost"], c["recovered"], c["delivered"]), (2, 1, 3));
    }
}

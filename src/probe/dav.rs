//! `kind: dav` — what a calendar (CalDAV) or contacts (CardDAV) client does
//! when it is set up with only a hostname and a password, pinned to one
//! environment: RFC 6764 discovery, the principal and its home, the home's
//! collections, one query, optionally a write round trip, and the legacy URLs
//! old clients still use.
//!
//! Built on reqwest with a client per run (a fresh connection, as a client
//! arriving after the switch has), `resolve()` for pinning and redirects
//! judged by hand: a discovery redirect is a finding, never something to
//! follow blindly with credentials. Every request body is a fixed document;
//! every answer is read to at most [`MAX_BODY`] and parsed by namespace URI,
//! since servers pick their own prefixes.
//!
//! The probe keeps the last facts (collections, object count) of the `old`
//! and `new` environments, so each run can say whether new holds what old
//! holds for the same account ([`Measured::Parity`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderMap, LOCATION};
use reqwest::{Method, StatusCode, Url};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::{CertFacts, Failure, FailureReason, FieldError, InPhase, Measurement, Probe, Run, tls};
use crate::config::{Check, Credential, Credentials, DavService, DavSpec};

/// The largest answer we read; a home's listing or a month of events is far below.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The most XML nodes we build from one answer, so a body of tiny elements
/// within [`MAX_BODY`] cannot make the DOM balloon.
const MAX_NODES: u32 = 400_000;

/// Every probe object's UID and resource name starts with this.
pub const MARKER_PREFIX: &str = "cutover-probe-";

/// The default calendar-query range: wide, so every event of a test account counts.
const DEFAULT_RANGE: (&str, &str) = ("20000101T000000Z", "21000101T000000Z");

const DAV: &str = "DAV:";
const CALDAV: &str = "urn:ietf:params:xml:ns:caldav";
const CARDDAV: &str = "urn:ietf:params:xml:ns:carddav";
const CALENDARSERVER: &str = "http://calendarserver.org/ns/";

const PROPFIND_PRINCIPAL: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<d:propfind xmlns:d="DAV:"><d:prop><d:current-user-principal/></d:prop></d:propfind>"#;
const PROPFIND_CALENDAR_HOME: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<d:propfind xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><c:calendar-home-set/></d:prop></d:propfind>"#;
const PROPFIND_ADDRESSBOOK_HOME: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<d:propfind xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:carddav"><d:prop><c:addressbook-home-set/></d:prop></d:propfind>"#;
const PROPFIND_COLLECTIONS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<d:propfind xmlns:d="DAV:" xmlns:cs="http://calendarserver.org/ns/"><d:prop><d:resourcetype/><d:displayname/><cs:getctag/><d:sync-token/></d:prop></d:propfind>"#;
const PROPFIND_ETAGS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<d:propfind xmlns:d="DAV:"><d:prop><d:getetag/></d:prop></d:propfind>"#;
const ADDRESSBOOK_QUERY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<c:addressbook-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:carddav"><d:prop><d:getetag/></d:prop><c:filter/></c:addressbook-query>"#;

/// What a `dav` run measured, for `metrics/dav.rs`.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// Collections of the service's type in the home.
    Collections { count: u64 },
    /// Objects the query found in the read collection (probe objects excluded).
    Objects { count: u64 },
    /// PUT, GET and DELETE of the probe object, end to end.
    WriteRoundtrip { seconds: f64 },
    /// Leftover probe objects of earlier (killed) runs found and removed.
    Orphans { removed: u64 },
    /// Whether old and new hold the same collections and object counts.
    Parity { equal: bool },
}

impl Measured {
    /// Whether two measurements are published under the same series.
    pub fn same_series(&self, other: &Measured) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// One environment's view of the account, kept across runs for parity.
#[derive(Debug, Clone, Default, PartialEq)]
struct Facts {
    /// Names of the service's collections in the home.
    collections: BTreeSet<String>,
    /// Objects in the read collection, when the read got that far.
    objects: Option<u64>,
}

/// A built `dav` check.
pub struct DavProbe {
    check: String,
    service: DavService,
    host: String,
    origin: Url,
    credential: Arc<Credential>,
    collection: String,
    range: (String, String),
    write_collection: Option<String>,
    legacy: Vec<String>,
    expect_collections: Vec<String>,
    min_collections: Option<u64>,
    /// How long a run may take: a probe object older than this is a leftover.
    timeout: Duration,
    tls: rustls::ClientConfig,
    /// Cross-environment state for parity.
    parity: Mutex<ParityState>,
}

/// The last facts of `old` and `new`, and the differences last logged (so a
/// lasting difference is logged once, not every run).
#[derive(Default)]
struct ParityState {
    known: HashMap<String, Facts>,
    logged: Option<Vec<String>>,
}

impl DavProbe {
    /// Validates the spec and resolves its credential.
    pub fn new(spec: &DavSpec, check: &Check, credentials: &Credentials) -> Result<Self, FieldError> {
        let credential = super::credential(credentials, &spec.credentials)?;
        let origin = Url::parse(&spec.url).map_err(|e| FieldError::new("url", format!("invalid URL: {e}")))?;
        if origin.scheme() != "https" {
            return Err(FieldError::new(
                "url",
                "expected an https:// URL: every request carries the password",
            ));
        }
        let Some(host) = origin.domain().map(str::to_ascii_lowercase) else {
            return Err(FieldError::new(
                "url",
                "expected the production hostname, not an address: TLS and discovery check it",
            ));
        };
        if origin.path() != "/" || origin.query().is_some() {
            return Err(FieldError::new(
                "url",
                "give the origin only (e.g. `https://dav.example.com/`): discovery starts at /.well-known/",
            ));
        }
        for (field, name) in [
            ("collection", Some(&spec.collection)),
            ("write_collection", spec.write_collection.as_ref()),
        ] {
            if let Some(name) = name {
                if !valid_segment(name) {
                    return Err(FieldError::new(
                        field,
                        format!("`{name}`: expected one collection name under the home, e.g. `calendar`"),
                    ));
                }
            }
        }
        if spec.write_collection.is_some() && !spec.write {
            return Err(FieldError::new("write_collection", "set `write: true` to write there"));
        }
        let range = match (&spec.time_range, spec.service) {
            (Some(_), DavService::Carddav) => {
                return Err(FieldError::new(
                    "time_range",
                    "only a `caldav` check queries a time range",
                ));
            }
            (Some(r), DavService::Caldav) => {
                for (field, value) in [("time_range.start", &r.start), ("time_range.end", &r.end)] {
                    if !ical_utc(value) {
                        return Err(FieldError::new(
                            field,
                            format!("expected an iCalendar UTC time like `20300101T000000Z`, got `{value}`"),
                        ));
                    }
                }
                if r.start >= r.end {
                    return Err(FieldError::new("time_range.end", "must be after `start`"));
                }
                (r.start.clone(), r.end.clone())
            }
            (None, _) => (DEFAULT_RANGE.0.to_string(), DEFAULT_RANGE.1.to_string()),
        };
        for (i, path) in spec.legacy_urls.iter().enumerate() {
            if !path.starts_with('/')
                || path.contains("://")
                || path.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(FieldError::new(
                    format!("legacy_urls[{i}]"),
                    format!("`{path}`: expected a path on the same host, e.g. `/SOGo/dav/`"),
                ));
            }
        }
        for (i, name) in spec.expect.collections.iter().enumerate() {
            if !valid_segment(name) {
                return Err(FieldError::new(
                    format!("expect.collections[{i}]"),
                    format!("`{name}`: expected a collection name, e.g. `calendar`"),
                ));
            }
        }
        let tls = super::http::session_tls(&check.roots)?;
        Ok(DavProbe {
            check: check.name.clone(),
            service: spec.service,
            host,
            origin,
            credential,
            collection: spec.collection.clone(),
            range,
            write_collection: spec
                .write
                .then(|| spec.write_collection.clone().unwrap_or_else(|| spec.collection.clone())),
            legacy: spec.legacy_urls.clone(),
            expect_collections: spec.expect.collections.clone(),
            min_collections: spec.expect.min_collections,
            timeout: check.timeout,
            tls,
            parity: Mutex::new(ParityState::default()),
        })
    }

    /// What this service calls its collections, for messages.
    fn noun(&self) -> &'static str {
        match self.service {
            DavService::Caldav => "calendar",
            DavService::Carddav => "address book",
        }
    }

    /// Records `env`'s facts (only `old` and `new` take part) and, when both
    /// are known, says what differs (empty: they agree). A difference is
    /// logged when it changes, naming what differs.
    fn parity(&self, env: &str, facts: Option<Facts>) -> Option<Vec<String>> {
        if env != "old" && env != "new" {
            return None;
        }
        let mut guard = self.parity.lock().expect("parity lock");
        let ParityState { known, logged } = &mut *guard;
        if let Some(facts) = facts {
            known.insert(env.to_string(), facts);
        }
        let (old, new) = (known.get("old")?, known.get("new")?);
        let diffs = differences(old, new, &self.collection);
        if logged.as_ref() != Some(&diffs) {
            if diffs.is_empty() {
                // Worth a line when it ends a difference; routine at start.
                if logged.is_some() {
                    tracing::info!(check = %self.check, "dav parity: new holds what old holds again");
                } else {
                    tracing::debug!(check = %self.check, "dav parity: new holds what old holds");
                }
            } else {
                tracing::warn!(check = %self.check, differences = %diffs.join("; "), "dav parity: new differs from old");
            }
            *logged = Some(diffs.clone());
        }
        Some(diffs)
    }
}

/// What differs between old's and new's facts, one sentence each.
fn differences(old: &Facts, new: &Facts, read: &str) -> Vec<String> {
    let mut out = Vec::new();
    for name in old.collections.difference(&new.collections) {
        out.push(format!("collection `{name}` is in old but missing in new"));
    }
    for name in new.collections.difference(&old.collections) {
        out.push(format!("collection `{name}` is in new but not in old"));
    }
    if let (Some(o), Some(n)) = (old.objects, new.objects) {
        if o != n {
            out.push(format!("`{read}`: old has {o} objects, new {n}"));
        }
    }
    out
}

impl Probe for DavProbe {
    fn hostname(&self) -> &str {
        &self.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let session = Session::new(self, ip)?;
            let mut facts = None;
            let result = session.walk(run, &mut facts).await;
            run.cert = session.cert.lock().expect("cert slot").take();
            if let Some(diffs) = self.parity(&run.env, facts) {
                let equal = diffs.is_empty();
                run.notes.extend(diffs);
                run.measurements.push(Measurement::Dav(Measured::Parity { equal }));
            }
            result
        })
    }
}

/// One run: its client and what it learnt along the way.
struct Session<'a> {
    probe: &'a DavProbe,
    client: reqwest::Client,
    /// The certificate of the first answer (one connection per run).
    cert: Mutex<Option<CertFacts>>,
}

/// An answer, read in full (up to [`MAX_BODY`]).
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl<'a> Session<'a> {
    fn new(probe: &'a DavProbe, ip: IpAddr) -> Result<Self, Failure> {
        let port = probe.origin.port_or_known_default().unwrap_or(443);
        let client = super::http::session(&probe.tls, &probe.host, port, ip)
            .tls_info(true)
            .build()
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("building the HTTP client: {e}")))?;
        Ok(Session {
            probe,
            client,
            cert: Mutex::new(None),
        })
    }

    /// Every phase in order; `facts` is filled as far as the run gets.
    async fn walk(&self, run: &mut Run, facts: &mut Option<Facts>) -> Result<(), Failure> {
        let p = self.probe;
        let context = run.phase("discovery", self.discover()).await.in_phase("discovery")?;
        let home = run
            .phase("principal", self.principal(&context))
            .await
            .in_phase("principal")?;
        let listed = run
            .phase("collections", self.collections(&home))
            .await
            .in_phase("collections")?;
        let names: BTreeSet<String> = listed.keys().cloned().collect();
        run.measurements.push(Measurement::Dav(Measured::Collections {
            count: names.len() as u64,
        }));
        *facts = Some(Facts {
            collections: names,
            objects: None,
        });
        self.expect_collections(&listed).in_phase("collections")?;
        let read = &listed[&p.collection];
        let count = run.phase("read", self.read(read)).await.in_phase("read")?;
        run.measurements.push(Measurement::Dav(Measured::Objects { count }));
        if let Some(f) = facts.as_mut() {
            f.objects = Some(count);
        }
        if let Some(name) = &p.write_collection {
            let target = &listed[name];
            let marker = Marker::new(&p.credential, &p.check, &run.env);
            let (removed, took) = run
                .phase("write", self.write(target, &marker))
                .await
                .in_phase("write")?;
            run.measurements.push(Measurement::Dav(Measured::Orphans { removed }));
            run.measurements.push(Measurement::Dav(Measured::WriteRoundtrip {
                seconds: took.as_secs_f64(),
            }));
        }
        if !p.legacy.is_empty() {
            run.phase("legacy", self.legacy()).await.in_phase("legacy")?;
        }
        Ok(())
    }

    /// `GET /.well-known/caldav|carddav` must redirect to the production host;
    /// returns the context path it names.
    async fn discover(&self) -> Result<String, Failure> {
        let path = match self.probe.service {
            DavService::Caldav => "/.well-known/caldav",
            DavService::Carddav => "/.well-known/carddav",
        };
        let reply = self.send(Method::GET, path, None, None, &[], false).await?;
        let status = reply.status;
        if !is_redirect(status) {
            if status.is_server_error() {
                return Err(Failure::new(
                    FailureReason::UnexpectedStatus,
                    format!("GET {path}: {status}"),
                ));
            }
            return Err(Failure::new(
                FailureReason::WellknownMissing,
                format!("GET {path} answered {status}, not a redirect to the DAV context path"),
            ));
        }
        let target = self.location(path, &reply.headers).ok_or_else(|| {
            Failure::new(
                FailureReason::WellknownMissing,
                format!("GET {path} answered {status} without a usable Location"),
            )
        })?;
        let host = target.host_str().unwrap_or("");
        if !host.eq_ignore_ascii_case(&self.probe.host) || target.scheme() != "https" {
            return Err(Failure::new(
                FailureReason::WellknownWrongTarget,
                format!(
                    "GET {path} redirects to {target} (host {host}): clients would leave {} for a name that does not move",
                    self.probe.host
                ),
            ));
        }
        Ok(target.path().to_string())
    }

    /// The principal (`current-user-principal` on the context path), then its home set.
    async fn principal(&self, context: &str) -> Result<String, Failure> {
        let reply = self
            .propfind(context, "0", PROPFIND_PRINCIPAL, "PROPFIND context path")
            .await?;
        let entries = multistatus(&reply.body)?;
        let principal = entries
            .iter()
            .find_map(|e| e.prop(DAV, "current-user-principal").and_then(|p| p.hrefs.first()))
            .ok_or_else(|| {
                Failure::new(
                    FailureReason::PrincipalMissing,
                    format!("PROPFIND {context}: no current-user-principal"),
                )
            })?;
        let principal = self.path_of(context, principal)?;
        let (body, ns, name) = match self.probe.service {
            DavService::Caldav => (PROPFIND_CALENDAR_HOME, CALDAV, "calendar-home-set"),
            DavService::Carddav => (PROPFIND_ADDRESSBOOK_HOME, CARDDAV, "addressbook-home-set"),
        };
        let reply = self.propfind(&principal, "0", body, "PROPFIND principal").await?;
        let entries = multistatus(&reply.body)?;
        let home = entries
            .iter()
            .find_map(|e| e.prop(ns, name).and_then(|p| p.hrefs.first()))
            .ok_or_else(|| {
                Failure::new(
                    FailureReason::PrincipalMissing,
                    format!("principal {principal} has no {name}"),
                )
            })?;
        let home = self.path_of(&principal, home)?;
        Ok(if home.ends_with('/') { home } else { format!("{home}/") })
    }

    /// The home's collections of the service's type, by name.
    async fn collections(&self, home: &str) -> Result<BTreeMap<String, Collection>, Failure> {
        let reply = self.propfind(home, "1", PROPFIND_COLLECTIONS, "PROPFIND home").await?;
        let (ns, kind) = match self.probe.service {
            DavService::Caldav => (CALDAV, "calendar"),
            DavService::Carddav => (CARDDAV, "addressbook"),
        };
        let mut out = BTreeMap::new();
        for entry in multistatus(&reply.body)? {
            let path = self.path_of(home, &entry.href)?;
            if same_path(&path, home) {
                continue;
            }
            let Some(types) = entry.prop(DAV, "resourcetype") else {
                continue;
            };
            if !types.children.iter().any(|(n, l)| n == ns && l == kind) {
                continue;
            }
            let Some(name) = last_segment(&path) else {
                continue;
            };
            // What a client would show and sync by; ctags differ between
            // server products, so parity compares names and counts instead.
            let ctag = entry
                .prop(CALENDARSERVER, "getctag")
                .or_else(|| entry.prop(DAV, "sync-token"))
                .map_or("", |p| p.text.as_str());
            let shown = entry.prop(DAV, "displayname").map_or("", |p| p.text.as_str());
            tracing::debug!(check = %self.probe.check, collection = %name, displayname = %super::sanitize(shown), ctag = %super::sanitize(ctag), "dav collection");
            out.insert(
                name,
                Collection {
                    path: if path.ends_with('/') { path } else { format!("{path}/") },
                },
            );
        }
        Ok(out)
    }

    fn expect_collections(&self, listed: &BTreeMap<String, Collection>) -> Result<(), Failure> {
        let p = self.probe;
        let mut wanted: Vec<&String> = vec![&p.collection];
        wanted.extend(&p.write_collection);
        wanted.extend(&p.expect_collections);
        for name in wanted {
            if !listed.contains_key(name) {
                return Err(Failure::new(
                    FailureReason::CollectionMissing,
                    format!(
                        "{} `{name}` is missing from the home (has: {})",
                        p.noun(),
                        listed.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        if let Some(min) = p.min_collections {
            if (listed.len() as u64) < min {
                return Err(Failure::new(
                    FailureReason::CollectionMissing,
                    format!("the home has {} {}s, expected at least {min}", listed.len(), p.noun()),
                ));
            }
        }
        Ok(())
    }

    /// Counts the read collection's objects with a calendar-query (time
    /// range) or an addressbook-query; probe objects do not count, so a write
    /// round trip in flight never skews parity.
    async fn read(&self, collection: &Collection) -> Result<u64, Failure> {
        let body = match self.probe.service {
            DavService::Caldav => calendar_query(&self.probe.range.0, &self.probe.range.1),
            DavService::Carddav => ADDRESSBOOK_QUERY.to_string(),
        };
        let reply = self
            .send(
                Method::from_bytes(b"REPORT").expect("method"),
                &collection.path,
                Some("1"),
                Some(body),
                &[],
                true,
            )
            .await?;
        self.expect(&reply, &[207], &format!("REPORT {}", collection.path))?;
        let mut count = 0;
        for entry in multistatus(&reply.body)? {
            let path = self.path_of(&collection.path, &entry.href)?;
            if same_path(&path, &collection.path) || !entry.ok {
                continue;
            }
            if last_segment(&path).is_some_and(|n| n.starts_with(MARKER_PREFIX)) {
                continue;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Removes leftovers of earlier runs, then PUT, GET and DELETE one probe
    /// object. Returns the leftovers removed and the round trip's duration.
    async fn write(&self, collection: &Collection, marker: &Marker) -> Result<(u64, Duration), Failure> {
        let removed = self.sweep(collection, marker).await?;
        let start = Instant::now();
        let uid = marker.uid(crate::unix_now() as u64 * 1000, &nonce());
        let (ext, content_type, object) = match self.probe.service {
            DavService::Caldav => ("ics", "text/calendar; charset=utf-8", event(&uid)),
            DavService::Carddav => ("vcf", "text/vcard; charset=utf-8", vcard(&uid)),
        };
        let path = format!("{}{uid}.{ext}", collection.path);
        let put = self
            .send(
                Method::PUT,
                &path,
                None,
                Some(object),
                &[("if-none-match", "*"), ("content-type", content_type)],
                true,
            )
            .await?;
        if put.status == StatusCode::PRECONDITION_FAILED {
            return Err(Failure::new(
                FailureReason::PreconditionFailed,
                format!("PUT {path} with If-None-Match: * answered 412: the name is taken"),
            ));
        }
        self.expect(&put, &[201, 204], &format!("PUT {path}"))?;
        let got = self.send(Method::GET, &path, None, None, &[], true).await;
        let checked = got.and_then(|got| {
            self.expect(&got, &[200], &format!("GET {path}"))?;
            let text = String::from_utf8_lossy(&got.body);
            let uids: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix("UID:"))
                .collect();
            if uids != [uid.as_str()] || !text.contains("cutover-monitor probe") {
                return Err(Failure::new(
                    FailureReason::WriteMismatch,
                    format!("GET {path} returned UIDs {uids:?}, not the object just written"),
                ));
            }
            Ok(header(&got.headers, ETAG).or_else(|| header(&put.headers, ETAG)))
        });
        // The object is deleted whatever GET said, so a mismatch leaves nothing behind.
        let etag = match &checked {
            Ok(Some(etag)) => etag.clone(),
            _ => header(&put.headers, ETAG).unwrap_or_default(),
        };
        let deleted = self.delete(&path, &etag).await;
        checked?;
        deleted?;
        Ok((removed, start.elapsed()))
    }

    /// DELETE with `If-Match` (or unconditionally when the server gave no ETag).
    async fn delete(&self, path: &str, etag: &str) -> Result<(), Failure> {
        let headers: &[(&str, &str)] = if etag.is_empty() { &[] } else { &[("if-match", etag)] };
        let reply = self.send(Method::DELETE, path, None, None, headers, true).await?;
        if reply.status == StatusCode::PRECONDITION_FAILED {
            return Err(Failure::new(
                FailureReason::PreconditionFailed,
                format!("DELETE {path} with If-Match {etag} answered 412: changed by someone else"),
            ));
        }
        self.expect(&reply, &[200, 204], &format!("DELETE {path}"))
    }

    /// Deletes probe objects that earlier runs of this check and environment
    /// left behind (killed mid-run): only those whose name and UID carry a
    /// marker that verifies with this check's key, and that are older than a
    /// run can last. Anything else in the collection is never touched.
    async fn sweep(&self, collection: &Collection, marker: &Marker) -> Result<u64, Failure> {
        let reply = self
            .propfind(&collection.path, "1", PROPFIND_ETAGS, "PROPFIND write collection")
            .await?;
        let cutoff = (crate::unix_now() as u64 * 1000).saturating_sub(self.probe.timeout.as_millis() as u64);
        let mut removed = 0;
        for entry in multistatus(&reply.body)? {
            let path = self.path_of(&collection.path, &entry.href)?;
            let Some(name) = last_segment(&path) else { continue };
            let Some(uid) = name.strip_suffix(".ics").or_else(|| name.strip_suffix(".vcf")) else {
                continue;
            };
            // Younger ones may be a run in flight (a `check` beside the daemon).
            if marker.verify(uid).is_none_or(|at| at >= cutoff) {
                continue;
            }
            let got = self.send(Method::GET, &path, None, None, &[], true).await?;
            if got.status != StatusCode::OK {
                continue;
            }
            let text = String::from_utf8_lossy(&got.body);
            let uids: Vec<&str> = text
                .lines()
                .filter_map(|l| l.trim_end_matches('\r').strip_prefix("UID:"))
                .collect();
            if uids != [uid] {
                continue;
            }
            let Some(etag) = header(&got.headers, ETAG) else {
                continue;
            };
            self.delete(&path, &etag).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Each legacy path answers 2xx, or redirects within the production host.
    async fn legacy(&self) -> Result<(), Failure> {
        for path in &self.probe.legacy {
            let method = Method::from_bytes(b"PROPFIND").expect("method");
            let body = Some(PROPFIND_PRINCIPAL.to_string());
            let reply = self.send(method, path, Some("0"), body, &[], true).await?;
            if reply.status.is_success() {
                continue;
            }
            if !is_redirect(reply.status) {
                self.expect(&reply, &[], &format!("legacy PROPFIND {path}"))?;
            }
            let target = self.location(path, &reply.headers);
            if !target
                .as_ref()
                .and_then(Url::host_str)
                .is_some_and(|h| h.eq_ignore_ascii_case(&self.probe.host))
            {
                return Err(Failure::new(
                    FailureReason::UnexpectedStatus,
                    format!(
                        "legacy {path}: {} redirect to {}, not within {}",
                        reply.status,
                        target.map_or("nowhere".to_string(), |u| u.to_string()),
                        self.probe.host
                    ),
                ));
            }
        }
        Ok(())
    }

    /// PROPFIND with `Depth`; 207 required.
    async fn propfind(&self, path: &str, depth: &str, body: &str, what: &str) -> Result<Reply, Failure> {
        let method = Method::from_bytes(b"PROPFIND").expect("method");
        let reply = self
            .send(method, path, Some(depth), Some(body.to_string()), &[], true)
            .await?;
        self.expect(&reply, &[207], &format!("{what} {path}"))?;
        Ok(reply)
    }

    /// `Ok` when the status is one of `ok`; `auth_failed` for 401.
    fn expect(&self, reply: &Reply, ok: &[u16], what: &str) -> Result<(), Failure> {
        let status = reply.status;
        if ok.contains(&status.as_u16()) {
            return Ok(());
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(Failure::new(
                FailureReason::AuthFailed,
                format!("{what}: 401, the server rejected the credentials"),
            ));
        }
        if status == StatusCode::NOT_FOUND {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("{what}: 404 Not Found"),
            ));
        }
        Err(Failure::new(
            FailureReason::UnexpectedStatus,
            format!("{what}: {status}"),
        ))
    }

    /// One request to the pinned address; the answer read up to [`MAX_BODY`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        depth: Option<&str>,
        body: Option<String>,
        headers: &[(&str, &str)],
        auth: bool,
    ) -> Result<Reply, Failure> {
        let url = self
            .probe
            .origin
            .join(path)
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("path {path:?}: {e}")))?;
        let mut request = self.client.request(method.clone(), url);
        if let Some(depth) = depth {
            request = request.header("depth", depth);
        }
        if let Some(body) = body {
            if !headers.iter().any(|(n, _)| *n == "content-type") {
                request = request.header(CONTENT_TYPE, "application/xml; charset=utf-8");
            }
            request = request.body(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if auth {
            let c = &self.probe.credential;
            request = request.basic_auth(&c.username, Some(c.password.expose()));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| http_failure(&e, &format!("{method} {path}")))?;
        if let Some(info) = response.extensions().get::<reqwest::tls::TlsInfo>() {
            let mut cert = self.cert.lock().expect("cert slot");
            if cert.is_none() {
                *cert = info
                    .peer_certificate()
                    .and_then(|der| tls::cert_facts(&CertificateDer::from(der.to_vec()), &self.probe.host));
            }
        }
        if response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(oversize(&method, path));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| http_failure(&e, &format!("{method} {path}: reading the body")))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(oversize(&method, path));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status: response.status(),
            headers: response.headers().clone(),
            body: body.freeze(),
        })
    }

    /// A redirect's target, resolved against the request's URL.
    fn location(&self, path: &str, headers: &HeaderMap) -> Option<Url> {
        let location = header(headers, LOCATION)?;
        self.probe.origin.join(path).ok()?.join(&location).ok()
    }

    /// An href from a multistatus as a path on the production host; an href
    /// naming another host is a protocol error (we never follow it).
    fn path_of(&self, base: &str, href: &str) -> Result<String, Failure> {
        let base = self
            .probe
            .origin
            .join(base)
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("path {base:?}: {e}")))?;
        let url = base
            .join(href.trim())
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("href {href:?}: {e}")))?;
        if !url.host_str().is_some_and(|h| h.eq_ignore_ascii_case(&self.probe.host)) {
            return Err(Failure::new(
                FailureReason::Protocol,
                format!("href {href:?} names another host than {}", self.probe.host),
            ));
        }
        Ok(url.path().to_string())
    }
}

/// A collection in the home.
struct Collection {
    /// Its path, ending in `/`.
    path: String,
}

fn oversize(method: &Method, path: &str) -> Failure {
    Failure::new(
        FailureReason::Oversize,
        format!("{method} {path}: answer larger than {MAX_BODY} bytes"),
    )
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn header(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

/// Classifies a reqwest error by the I/O or TLS error underneath it.
fn http_failure(e: &reqwest::Error, what: &str) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            let f = Failure::io(io);
            return Failure::new(f.reason, format!("{what}: {}", f.detail));
        }
        if let Some(tls) = s.downcast_ref::<rustls::Error>() {
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
            let reason = tls::classify_io(&io).map_or(FailureReason::TlsHandshake, FailureReason::from);
            return Failure::new(reason, format!("{what}: {tls}"));
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return Failure::new(FailureReason::Oversize, format!("{what}: {h}"));
            }
            if h.is_parse() || h.is_incomplete_message() {
                return Failure::new(FailureReason::Protocol, format!("{what}: {h}"));
            }
        }
        source = s.source();
    }
    let reason = if e.is_decode() || e.is_body() {
        FailureReason::Protocol
    } else {
        FailureReason::Network
    };
    Failure::new(reason, format!("{what}: {}", error_chain(e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One `<response>` of a multistatus, with the properties of its 2xx propstats.
#[derive(Debug)]
struct Entry {
    href: String,
    /// The response-level status is absent or 2xx.
    ok: bool,
    props: Vec<Prop>,
}

/// One property: its namespace and name, the hrefs and text inside it, and
/// its child elements (for `resourcetype`).
#[derive(Debug)]
struct Prop {
    ns: String,
    name: String,
    hrefs: Vec<String>,
    text: String,
    children: Vec<(String, String)>,
}

impl Entry {
    fn prop(&self, ns: &str, name: &str) -> Option<&Prop> {
        self.props.iter().find(|p| p.ns == ns && p.name == name)
    }
}

/// Parses a `DAV:multistatus`, matching elements by namespace URI.
fn multistatus(body: &[u8]) -> Result<Vec<Entry>, Failure> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Failure::new(FailureReason::Protocol, format!("multistatus is not UTF-8: {e}")))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::NodesLimitReached => Failure::new(
            FailureReason::Oversize,
            format!("multistatus has more than {MAX_NODES} XML nodes"),
        ),
        e => Failure::new(FailureReason::Protocol, format!("multistatus is not XML: {e}")),
    })?;
    let root = doc.root_element();
    if !is(root, DAV, "multistatus") {
        return Err(Failure::new(
            FailureReason::Protocol,
            format!("expected a DAV:multistatus, got <{}>", root.tag_name().name()),
        ));
    }
    let mut out = Vec::new();
    for response in root.children().filter(|n| is(*n, DAV, "response")) {
        let href = child(response, DAV, "href")
            .and_then(|h| h.text())
            .ok_or_else(|| Failure::new(FailureReason::Protocol, "a multistatus response without href"))?;
        let ok = child(response, DAV, "status").is_none_or(|s| status_ok(s.text().unwrap_or("")));
        let mut props = Vec::new();
        for propstat in response.children().filter(|n| is(*n, DAV, "propstat")) {
            if !child(propstat, DAV, "status").is_some_and(|s| status_ok(s.text().unwrap_or(""))) {
                continue;
            }
            let Some(prop) = child(propstat, DAV, "prop") else {
                continue;
            };
            for p in prop.children().filter(|n| n.is_element()) {
                props.push(Prop {
                    ns: p.tag_name().namespace().unwrap_or("").to_string(),
                    name: p.tag_name().name().to_string(),
                    hrefs: p
                        .children()
                        .filter(|n| is(*n, DAV, "href"))
                        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
                        .collect(),
                    text: p.text().unwrap_or("").trim().to_string(),
                    children: p
                        .children()
                        .filter(|n| n.is_element())
                        .map(|n| {
                            (
                                n.tag_name().namespace().unwrap_or("").to_string(),
                                n.tag_name().name().to_string(),
                            )
                        })
                        .collect(),
                });
            }
        }
        out.push(Entry {
            href: href.trim().to_string(),
            ok,
            props,
        });
    }
    Ok(out)
}

fn is(node: roxmltree::Node, ns: &str, name: &str) -> bool {
    node.is_element() && node.tag_name().namespace() == Some(ns) && node.tag_name().name() == name
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, ns: &str, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|n| is(*n, ns, name))
}

/// `HTTP/1.1 200 OK` and the like.
fn status_ok(line: &str) -> bool {
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| (200..300).contains(&c))
}

/// Whether two paths name the same resource: percent-decoded, trailing `/` ignored.
fn same_path(a: &str, b: &str) -> bool {
    decode(a).trim_end_matches('/') == decode(b).trim_end_matches('/')
}

/// The last non-empty path segment, percent-decoded.
fn last_segment(path: &str) -> Option<String> {
    let segment = path.trim_end_matches('/').rsplit('/').next()?;
    (!segment.is_empty()).then(|| decode(segment))
}

/// Percent-decoding, so `%40` and `@` compare equal (servers write either).
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let (hi, lo) = (bytes[i + 1], bytes[i + 2]);
            if hi.is_ascii_hexdigit() && lo.is_ascii_hexdigit() {
                let digit = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
                out.push(digit(hi) << 4 | digit(lo));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn valid_segment(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\'])
        && !name.chars().any(char::is_control)
}

/// `20300101T000000Z`: safe to put into the query document as it is.
fn ical_utc(value: &str) -> bool {
    let b = value.as_bytes();
    b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

fn calendar_query(start: &str, end: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><d:getetag/></d:prop><c:filter><c:comp-filter name="VCALENDAR"><c:comp-filter name="VEVENT"><c:time-range start="{start}" end="{end}"/></c:comp-filter></c:comp-filter></c:filter></c:calendar-query>"#
    )
}

/// The probe event: far in the past so no calendar view shows it, and
/// without attendees so no server sends invitations.
fn event(uid: &str) -> String {
    [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//cutover-monitor//dav probe//EN",
        "BEGIN:VEVENT",
        &format!("UID:{uid}"),
        "DTSTAMP:20000101T000000Z",
        "DTSTART:20000101T000000Z",
        "DTEND:20000101T000100Z",
        "SUMMARY:cutover-monitor probe",
        "TRANSP:TRANSPARENT",
        "END:VEVENT",
        "END:VCALENDAR",
        "",
    ]
    .join("\r\n")
}

fn vcard(uid: &str) -> String {
    [
        "BEGIN:VCARD",
        "VERSION:3.0",
        &format!("UID:{uid}"),
        "FN:cutover-monitor probe",
        "N:probe;cutover-monitor;;;",
        "END:VCARD",
        "",
    ]
    .join("\r\n")
}

/// A value unlikely to repeat, so two runs never pick the same name.
fn nonce() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    hex(&h.finalize()[..4])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs probe objects' UIDs for one check and environment, so a later run
/// deletes only its own leftovers. The key is the account's password: only
/// someone who can log in could forge a marker, and they could delete the
/// objects anyway. Binding the environment keeps `live` from sweeping an
/// object that `old` or `new` is writing on the same server at that moment.
pub struct Marker {
    key: Vec<u8>,
    scope: String,
}

impl Marker {
    /// The marker of `check` in `env`, keyed by `credential`'s password.
    pub fn new(credential: &Credential, check: &str, env: &str) -> Marker {
        Marker {
            key: credential.password.expose().as_bytes().to_vec(),
            scope: format!("dav-probe\0{check}\0{env}"),
        }
    }

    fn mac(&self, at_ms: u64, nonce: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(self.scope.as_bytes());
        mac.update(format!("\0{at_ms}\0{nonce}").as_bytes());
        hex(&mac.finalize().into_bytes()[..8])
    }

    /// `cutover-probe-<unix ms>-<nonce>-<mac>`: also the object's file name.
    pub fn uid(&self, at_ms: u64, nonce: &str) -> String {
        format!("{MARKER_PREFIX}{at_ms}-{nonce}-{}", self.mac(at_ms, nonce))
    }

    /// When a UID made by [`Marker::uid`] for this scope was made (Unix ms);
    /// `None` for anything else.
    pub fn verify(&self, uid: &str) -> Option<u64> {
        let mut parts = uid.strip_prefix(MARKER_PREFIX)?.split('-');
        let (at, nonce, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || at.is_empty() || !at.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let at: u64 = at.parse().ok()?;
        // Constant-time comparison through the MAC itself.
        let mut check = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        check.update(self.scope.as_bytes());
        check.update(format!("\0{at}\0{nonce}").as_bytes());
        let want = check.finalize().into_bytes();
        let got: Vec<u8> = (0..mac.len() / 2)
            .map(|i| u8::from_str_radix(mac.get(2 * i..2 * i + 2)?, 16).ok())
            .collect::<Option<_>>()?;
        (mac.len() == 16 && got.len() == 8 && constant_eq(&got, &want[..8])).then_some(at)
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn credential(password: &str) -> Credential {
        Credential {
            username: "probe@example.test".into(),
            password: Secret::new(password.into()),
        }
    }

    #[test]
    fn markers_verify_only_for_their_check_environment_and_key() {
        let m = Marker::new(&credential("pw"), "dav", "new");
        let uid = m.uid(1_700_000_000_000, "0a1b2c3d");
        assert!(uid.starts_with(MARKER_PREFIX));
        assert_eq!(m.verify(&uid), Some(1_700_000_000_000));
        for other in [
            Marker::new(&credential("pw"), "dav", "old"),
            Marker::new(&credential("pw"), "dav2", "new"),
            Marker::new(&credential("other"), "dav", "new"),
        ] {
            assert_eq!(other.verify(&uid), None);
        }
        let forged = format!("{}-0000000000000000", uid.rsplit_once('-').unwrap().0);
        assert_eq!(m.verify(&forged), None);
        assert_eq!(m.verify(&format!("{uid}-x")), None);
        assert_eq!(m.verify("cutover-probe-1-2-3"), None);
    }

    #[test]
    fn multistatus_is_read_by_namespace_and_propstat_status() {
        let body = br#"<?xml version="1.0"?>
<x:multistatus xmlns:x="DAV:" xmlns:k="urn:ietf:params:xml:ns:caldav">
 <x:response><x:href>/u%40e/</x:href>
  <x:propstat><x:prop><x:resourcetype><x:collection/></x:resourcetype></x:prop><x:status>HTTP/1.1 200 OK</x:status></x:propstat>
  <x:propstat><x:prop><x:displayname/></x:prop><x:status>HTTP/1.1 404 Not Found</x:status></x:propstat>
 </x:response>
 <x:response><x:href>/u%40e/cal/</x:href>
  <x:propstat><x:prop><x:resourcetype><k:calendar/><x:collection/></x:resourcetype><x:displayname>Cal</x:displayname></x:prop><x:status>HTTP/1.1 200 OK</x:status></x:propstat>
 </x:response>
</x:multistatus>"#;
        let entries = multistatus(body).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].prop(DAV, "displayname").is_none(), "404 propstat ignored");
        let types = &entries[1].prop(DAV, "resourcetype").unwrap().children;
        assert!(types.contains(&(CALDAV.to_string(), "calendar".to_string())));
        assert_eq!(entries[1].prop(DAV, "displayname").unwrap().text, "Cal");
        // The same names in another namespace are not DAV's.
        let wrong = br#"<multistatus xmlns="urn:other"><response/></multistatus>"#;
        assert_eq!(multistatus(wrong).unwrap_err().reason, FailureReason::Protocol);
        assert_eq!(multistatus(b"<a><b></a>").unwrap_err().reason, FailureReason::Protocol);
        let dtd = br#"<!DOCTYPE x [<!ENTITY a "aaaa">]><multistatus xmlns="DAV:">&a;</multistatus>"#;
        assert_eq!(multistatus(dtd).unwrap_err().reason, FailureReason::Protocol);
    }

    #[test]
    fn paths_compare_percent_decoded() {
        assert!(same_path("/probe%40example.test/", "/probe@example.test"));
        assert_eq!(last_segment("/a/b%20c/").as_deref(), Some("b c"));
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%4"), "%4");
    }

    #[test]
    fn parity_names_what_differs() {
        let facts = |c: &[&str], n| Facts {
            collections: c.iter().map(|s| s.to_string()).collect(),
            objects: n,
        };
        let old = facts(&["calendar", "probe-writes"], Some(5));
        assert!(differences(&old, &old.clone(), "calendar").is_empty());
        let d = differences(&old, &facts(&["calendar"], Some(3)), "calendar");
        assert_eq!(
            d,
            [
                "collection `probe-writes` is in old but missing in new",
                "`calendar`: old has 5 objects, new 3"
            ]
        );
        assert!(differences(&old, &facts(&["calendar", "probe-writes"], None), "calendar").is_empty());
    }
}

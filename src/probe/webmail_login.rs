//! `kind: webmail_login` (`app: roundcube`) — one real webmail session per
//! run, as a user's browser has it: the login page, the login, the mail page,
//! the message list of one mailbox, the logout. A webmail whose login page
//! loads but whose login fails (mail store down, sessions not stored, the
//! password not migrated) passes an `http` check and fails here, with a
//! reason taken from what the webmail itself says.
//!
//! reqwest carries the session (one cookie jar per run, form POST, bodies read
//! up to [`MAX_BODY`]); it connects to the environment's address through
//! `resolve()` while URL, `Host`, SNI and the certificate keep the production
//! name, trusts only the check's roots (a rustls config of our own, with ring),
//! and follows no redirect by itself: each one is judged here, and one to
//! another host fails naming it.
//!
//! The pages are read with tight regular expressions, not an HTML parser
//! (`scraper`): the probe needs one hidden input (`_token`), the JSON argument
//! of `rcmail.set_env(...)` (read with serde_json from where the call starts,
//! so braces inside strings cannot cut it short), the text of
//! `rcmail.display_message(...)` and the `plugins/<name>/` asset paths. All
//! four are strings Roundcube writes itself; a DOM would add a large
//! dependency to find them no better.
//!
//! Roundcube says why a login failed only in words: the probe asks for
//! `Accept-Language: en-US` and matches Roundcube's `en_US` texts of the labels
//! `loginfailed`, `storageerror`, `invalidrequest`, `sessionerror`,
//! `cookiesdisabled` and `accountlocked`. A 401 with any other text counts as
//! a rejected login (Roundcube answers 401 only for failed logins).
//!
//! Safety: a run sends at most one login. After `auth_failed` (or
//! `account_locked`) from an address, runs against that address send nothing
//! for `auth_backoff` and report `auth_failed` saying they are backing off, so
//! a wrong password cannot lock the account. The password goes only into the
//! POST body; failure details carry the server's words, never the form.
//!
//! The probe object lives until a reload and is shared by the check's
//! instances, so it also keeps each environment's last application facts
//! (version, skin, plugins) and reports with every run whether `old` and `new`
//! run the same webmail ([`Measured::Parity`]), logging each change of verdict.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use regex::Regex;
use reqwest::header::{ACCEPT_LANGUAGE, HeaderMap, LOCATION, SET_COOKIE};
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use serde_json::Value;

use super::{Failure, FailureReason, FieldError, InPhase, Measurement, Probe, Run};
use crate::config::{Check, Credential, Credentials, DEFAULT_AUTH_BACKOFF, WebmailApp, WebmailLoginSpec};

pub use super::http::MAX_BODY;

/// Redirects followed to reach the login page (`/roundcube` -> `/roundcube/`).
const MAX_REDIRECTS: usize = 5;

/// What a webmail run measured.
#[derive(Debug, Clone, PartialEq)]
pub enum Measured {
    /// Messages in the listed mailbox, as the webmail counts them.
    Mailbox {
        /// The mailbox listed.
        mailbox: String,
        /// Roundcube's `env.messagecount`.
        messages: u64,
    },
    /// What the environment runs, read from its pages.
    App(AppFacts),
    /// Whether `old` and `new` last showed the same application facts.
    Parity {
        /// True when version, skin and plugin set are equal.
        equal: bool,
        /// What differs, e.g. `plugins: zipdownload only in old`; empty when equal.
        differences: Vec<String>,
    },
}

/// The application facts old and new must share before the switch: a
/// missing plugin or another skin is what users notice first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppFacts {
    /// The `app` label: `roundcube`.
    pub app: &'static str,
    /// The version, e.g. `1.6.5` (from `rcversion` 10605).
    pub version: String,
    /// The skin, e.g. `elastic`.
    pub skin: String,
    /// Plugins whose assets the login and mail pages load, sorted.
    pub plugins: Vec<String>,
}

impl AppFacts {
    /// What differs between `old` and `new`, one line per fact.
    fn differences(old: &AppFacts, new: &AppFacts) -> Vec<String> {
        let mut out = Vec::new();
        if old.version != new.version {
            out.push(format!("version: old {}, new {}", old.version, new.version));
        }
        if old.skin != new.skin {
            out.push(format!("skin: old {}, new {}", old.skin, new.skin));
        }
        let (o, n): (BTreeSet<_>, BTreeSet<_>) = (old.plugins.iter().collect(), new.plugins.iter().collect());
        let only = |a: &BTreeSet<&String>, b: &BTreeSet<&String>| {
            a.difference(b).map(|s| s.as_str()).collect::<Vec<_>>().join(",")
        };
        let (only_old, only_new) = (only(&o, &n), only(&n, &o));
        if !only_old.is_empty() {
            out.push(format!("plugins: {only_old} only in old"));
        }
        if !only_new.is_empty() {
            out.push(format!("plugins: {only_new} only in new"));
        }
        out
    }
}

/// A built `webmail_login` check.
pub struct WebmailLoginProbe {
    url: Url,
    host: String,
    port: u16,
    app: WebmailApp,
    credential: Arc<Credential>,
    mailbox: String,
    auth_backoff: Duration,
    tls: rustls::ClientConfig,
    patterns: Patterns,
    state: Mutex<State>,
}

/// What outlives a run: backoffs per address, facts per environment.
#[derive(Default)]
struct State {
    /// Address -> when logins may be sent to it again.
    backoff: HashMap<IpAddr, Instant>,
    /// Environment -> its last complete facts.
    facts: HashMap<String, AppFacts>,
    /// The last parity verdict's differences, to log only changes.
    last_differences: Option<Vec<String>>,
}

/// The regular expressions that read Roundcube's pages, compiled once.
struct Patterns {
    token: Regex,
    message: Regex,
    plugin: Regex,
    title: Regex,
    second_factor: Regex,
    mailbox_list: Regex,
}

impl Patterns {
    fn new() -> Patterns {
        let re = |p: &str| Regex::new(p).expect("valid pattern");
        Patterns {
            // Roundcube writes `<input type="hidden" name="_token" value="...">`.
            token: re(r#"<input[^>]*\bname="_token"[^>]*\bvalue="([A-Za-z0-9]{16,64})""#),
            message: re(r#"rcmail\.display_message\("((?:[^"\\]|\\.){0,300})""#),
            plugin: re(r#"["'/]plugins/([a-z0-9_][a-z0-9_-]{0,63})/"#),
            title: re(r"(?is)<title>([^<]{0,200})</title>"),
            // twofactor_gauthenticator, kolab_2fa and the like name themselves so.
            second_factor: re(r"(?i)(twofactor|two[_-]factor|kolab[_-]2fa|plugin\.[a-z_]*2fa|totp)"),
            mailbox_list: re(r#"id="mailboxlist""#),
        }
    }
}

impl WebmailLoginProbe {
    /// Validates the spec, resolves its credential and builds the TLS config.
    pub fn new(spec: &WebmailLoginSpec, check: &Check, credentials: &Credentials) -> Result<Self, FieldError> {
        let credential = super::credential(credentials, &spec.credentials)?;
        let url = Url::parse(&spec.url).map_err(|e| FieldError::new("url", format!("invalid URL: {e}")))?;
        if url.scheme() != "https" {
            return Err(FieldError::new(
                "url",
                "expected an https:// URL: the password must not travel in clear",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(FieldError::new(
                "url",
                "credentials do not belong in the URL: use `credentials`",
            ));
        }
        let host = match url.host_str() {
            Some(h) if h.parse::<IpAddr>().is_err() && !h.starts_with('[') => h.to_ascii_lowercase(),
            _ => return Err(FieldError::new("url", "expected a hostname, not an address")),
        };
        let port = url.port_or_known_default().unwrap_or(443);
        if spec.mailbox.is_empty() || spec.mailbox.chars().any(|c| c.is_control()) {
            return Err(FieldError::new("mailbox", "must be a mailbox name"));
        }
        let auth_backoff = spec.auth_backoff.map_or(DEFAULT_AUTH_BACKOFF, |d| d.0);
        let tls = super::http::session_tls(&check.roots)?;
        Ok(WebmailLoginProbe {
            url,
            host,
            port,
            app: spec.app,
            credential,
            mailbox: spec.mailbox.clone(),
            auth_backoff,
            tls,
            patterns: Patterns::new(),
            state: Mutex::new(State::default()),
        })
    }

    /// A client for one run: its own cookie jar and connections, pinned to `ip`.
    fn client(&self, ip: IpAddr) -> Result<Client, Failure> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_LANGUAGE, "en-US".parse().expect("valid header"));
        super::http::session(&self.tls, &self.host, self.port, ip)
            .cookie_store(true)
            .default_headers(headers)
            .build()
            .map_err(|e| Failure::new(FailureReason::Protocol, format!("HTTP client: {}", chain(&e))))
    }

    /// The absolute URL of `?query` on the login page's path.
    fn at(&self, base: &Url, query: &[(&str, &str)]) -> Url {
        let mut url = base.clone();
        url.set_fragment(None);
        url.query_pairs_mut().clear().extend_pairs(query);
        url
    }

    /// A redirect target, refused when it leaves the pinned host.
    fn follow(&self, from: &Url, page: &Page) -> Result<Url, Failure> {
        let Some(location) = &page.location else {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} without a Location", page.status),
            ));
        };
        let next = from.join(location).map_err(|e| {
            Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} to an invalid Location {location:?}: {e}", page.status),
            )
        })?;
        match next.host_str() {
            Some(h) if h.eq_ignore_ascii_case(&self.host) => Ok(next),
            other => Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!(
                    "{} redirect to another host ({}); only {} is pinned",
                    page.status,
                    other.unwrap_or("none"),
                    self.host
                ),
            )),
        }
    }

    /// The whole session; `token` keeps the request token once logged in, so
    /// the caller can log out after a later step fails.
    async fn session(
        &self,
        client: &Client,
        ip: IpAddr,
        run: &mut Run,
        token: &mut Option<String>,
    ) -> Result<(), Failure> {
        // While backing off, nothing at all is sent to the address.
        self.check_backoff(ip).in_phase("login")?;

        // 1. The login page (following same-host redirects to it).
        let (base, login_page) = run
            .phase("login_page", async {
                let mut url = self.url.clone();
                for _ in 0..=MAX_REDIRECTS {
                    let page = fetch(client.get(url.clone())).await?;
                    if page.status.is_redirection() {
                        url = self.follow(&url, &page)?;
                        continue;
                    }
                    return Ok((url, page));
                }
                Err(Failure::new(
                    FailureReason::UnexpectedStatus,
                    format!("more than {MAX_REDIRECTS} redirects"),
                ))
            })
            .await
            .in_phase("login_page")?;
        let login_form = self.read_login_page(&login_page).in_phase("login_page")?;

        // 2. The login: one attempt at most.
        let post = client.post(self.at(&base, &[("_task", "login")])).form(&[
            ("_token", login_form.token.as_str()),
            ("_task", "login"),
            ("_action", "login"),
            ("_timezone", "UTC"),
            ("_url", ""),
            ("_user", self.credential.username.as_str()),
            ("_pass", self.credential.password.expose()),
        ]);
        let answer = run.phase("login", fetch(post)).await.in_phase("login")?;
        let mail_url = match self.judge_login(&base, &answer) {
            Ok(url) => url,
            Err(f) => {
                if matches!(f.reason, FailureReason::AuthFailed | FailureReason::AccountLocked) {
                    let until = Instant::now() + self.auth_backoff;
                    self.state.lock().expect("webmail state").backoff.insert(ip, until);
                }
                return Err(f).in_phase("login");
            }
        };
        self.state.lock().expect("webmail state").backoff.remove(&ip);

        // 3. The mail page: logged in, with a mailbox list and a request token.
        let mail_page = run
            .phase("mail_page", fetch(client.get(mail_url)))
            .await
            .in_phase("mail_page")?;
        let env = self.read_mail_page(&mail_page).in_phase("mail_page")?;
        *token = Some(env.token.clone());
        let facts = self.facts(&login_form, &login_page, &mail_page);
        run.measurements
            .push(Measurement::WebmailLogin(Measured::App(facts.clone())));
        self.state
            .lock()
            .expect("webmail state")
            .facts
            .insert(run.env.clone(), facts);

        // 4. The message list, as the page's JavaScript asks for it.
        let list = self.at(
            &base,
            &[
                ("_task", "mail"),
                ("_action", "list"),
                ("_mbox", &self.mailbox),
                ("_remote", "1"),
            ],
        );
        let answer = run
            .phase(
                "list",
                fetch(client.get(list).header("X-Roundcube-Request", env.token.as_str())),
            )
            .await
            .in_phase("list")?;
        let messages = read_list(&answer).in_phase("list")?;
        run.measurements.push(Measurement::WebmailLogin(Measured::Mailbox {
            mailbox: self.mailbox.clone(),
            messages,
        }));

        // 5. The logout: the server forgets the session.
        *token = None;
        let logout = self.at(&base, &[("_task", "logout"), ("_token", &env.token)]);
        let answer = run
            .phase("logout", fetch(client.get(logout)))
            .await
            .in_phase("logout")?;
        self.judge_logout(&answer).in_phase("logout")
    }

    /// Refuses to send a login while the address is backing off.
    fn check_backoff(&self, ip: IpAddr) -> Result<(), Failure> {
        let mut state = self.state.lock().expect("webmail state");
        match state.backoff.get(&ip) {
            Some(until) if *until > Instant::now() => Err(Failure::new(
                FailureReason::AuthFailed,
                format!(
                    "backing off after a rejected login: no login is sent to {ip} for another {}s (auth_backoff {})",
                    until.saturating_duration_since(Instant::now()).as_secs() + 1,
                    humantime::format_duration(self.auth_backoff)
                ),
            )),
            Some(_) => {
                state.backoff.remove(&ip);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Step 1: 200, a session cookie, the `_token` and Roundcube's env.
    fn read_login_page(&self, page: &Page) -> Result<LoginForm, Failure> {
        if page.status != StatusCode::OK {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} for the login page{}", page.status, self.title(page)),
            ));
        }
        let Some(token) = self.patterns.token.captures(&page.body).map(|c| c[1].to_string()) else {
            return Err(Failure::new(
                FailureReason::UnexpectedPage,
                format!(
                    "no hidden `_token` input: not a Roundcube login form{}",
                    self.title(page)
                ),
            ));
        };
        if page.cookies.is_empty() {
            return Err(Failure::new(
                FailureReason::UnexpectedPage,
                "the login page set no session cookie",
            ));
        }
        let env = set_env(&page.body).ok_or_else(|| {
            Failure::new(
                FailureReason::UnexpectedPage,
                "no `rcmail.set_env({...})` on the login page: not Roundcube",
            )
        })?;
        let version = env
            .get("rcversion")
            .and_then(Value::as_u64)
            .map_or_else(|| "unknown".to_string(), version_name);
        let skin = env.get("skin").and_then(Value::as_str).unwrap_or("unknown").to_string();
        Ok(LoginForm { token, version, skin })
    }

    /// Step 2: a redirect to the mail task on the same host is a login; the
    /// page Roundcube shows otherwise says why not.
    fn judge_login(&self, base: &Url, page: &Page) -> Result<Url, Failure> {
        if page.status.is_redirection() {
            let next = self.follow(base, page)?;
            let task = query_value(&next, "_task");
            let action = query_value(&next, "_action").unwrap_or_default();
            if self.patterns.second_factor.is_match(&action) {
                return Err(Failure::new(
                    FailureReason::SecondFactor,
                    format!("the login continues at a second-factor step (`_action={action}`)"),
                ));
            }
            return match task.as_deref() {
                Some("mail") if page.cookies.iter().any(|c| c.ends_with("sessauth")) => Ok(next),
                Some("mail") => Err(Failure::new(
                    FailureReason::UnexpectedPage,
                    "the login redirected to the mail page without setting the auth cookie",
                )),
                Some("login") => Err(Failure::new(
                    FailureReason::InvalidRequest,
                    format!("the login redirected back to the login page{}", err_param(&next)),
                )),
                _ => Err(Failure::new(
                    FailureReason::UnexpectedPage,
                    format!(
                        "{} redirect to {} instead of the mail page",
                        page.status,
                        redacted(&next)
                    ),
                )),
            };
        }
        if page.status == StatusCode::TOO_MANY_REQUESTS {
            return Err(Failure::new(
                FailureReason::AccountLocked,
                format!("status {}: rate limited", page.status),
            ));
        }
        let message = self.message(page);
        let said = message.as_deref().map(|m| format!(": {m:?}")).unwrap_or_default();
        let classified = message.as_deref().and_then(classify_message);
        if let Some(reason) = classified {
            return Err(Failure::new(reason, format!("status {}{said}", page.status)));
        }
        if self.patterns.second_factor.is_match(&page.body) {
            return Err(Failure::new(
                FailureReason::SecondFactor,
                format!("status {}: the login asks for a second factor", page.status),
            ));
        }
        if page.status == StatusCode::UNAUTHORIZED {
            // Roundcube answers 401 only for failed logins (#7010).
            return Err(Failure::new(FailureReason::AuthFailed, format!("status 401{said}")));
        }
        if page.status.is_client_error() || page.status.is_server_error() {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} for the login{said}{}", page.status, self.title(page)),
            ));
        }
        Err(Failure::new(
            FailureReason::UnexpectedPage,
            format!(
                "status {} and no redirect to the mail page{said}{}",
                page.status,
                self.title(page)
            ),
        ))
    }

    /// Step 3: the mail task with a mailbox list and a request token.
    fn read_mail_page(&self, page: &Page) -> Result<MailEnv, Failure> {
        if page.status != StatusCode::OK {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} for the mail page{}", page.status, self.title(page)),
            ));
        }
        let env = set_env(&page.body).ok_or_else(|| {
            Failure::new(
                FailureReason::UnexpectedPage,
                format!("no `rcmail.set_env({{...}})` on the mail page{}", self.title(page)),
            )
        })?;
        match env.get("task").and_then(Value::as_str) {
            Some("mail") => {}
            Some("login") => {
                let said = self.message(page).map(|m| format!(": {m:?}")).unwrap_or_default();
                return Err(Failure::new(
                    FailureReason::InvalidRequest,
                    format!("the mail page shows the login page again: the session was lost{said}"),
                ));
            }
            other => {
                return Err(Failure::new(
                    FailureReason::UnexpectedPage,
                    format!("the mail page is task {other:?}, not `mail`"),
                ));
            }
        }
        let Some(token) = env.get("request_token").and_then(Value::as_str) else {
            return Err(Failure::new(
                FailureReason::UnexpectedPage,
                "the mail page has no request token",
            ));
        };
        if !self.patterns.mailbox_list.is_match(&page.body) {
            return Err(Failure::new(
                FailureReason::UnexpectedPage,
                "the mail page has no mailbox list",
            ));
        }
        Ok(MailEnv {
            token: token.to_string(),
        })
    }

    /// Step 5: Roundcube shows the login page (or redirects to it).
    fn judge_logout(&self, page: &Page) -> Result<(), Failure> {
        if page.status.is_redirection() {
            let next = self.follow(&self.url, page)?;
            return match query_value(&next, "_task").as_deref() {
                Some("login") | None => Ok(()),
                _ => Err(Failure::new(
                    FailureReason::UnexpectedPage,
                    format!("the logout redirected to {}", redacted(&next)),
                )),
            };
        }
        if page.status != StatusCode::OK {
            return Err(Failure::new(
                FailureReason::UnexpectedStatus,
                format!("status {} for the logout", page.status),
            ));
        }
        match set_env(&page.body)
            .as_ref()
            .and_then(|e| e.get("task"))
            .and_then(Value::as_str)
        {
            Some("login") => Ok(()),
            other => Err(Failure::new(
                FailureReason::UnexpectedPage,
                format!("after the logout the page is task {other:?}, not the login page: the session may live on"),
            )),
        }
    }

    /// Version and skin from the login page, plugins from both pages.
    fn facts(&self, form: &LoginForm, login: &Page, mail: &Page) -> AppFacts {
        let plugins: BTreeSet<String> = [login, mail]
            .iter()
            .flat_map(|p| self.patterns.plugin.captures_iter(&p.body).map(|c| c[1].to_string()))
            .collect();
        AppFacts {
            app: self.app.as_str(),
            version: form.version.clone(),
            skin: form.skin.clone(),
            plugins: plugins.into_iter().collect(),
        }
    }

    /// The text of `rcmail.display_message(...)`, unescaped.
    fn message(&self, page: &Page) -> Option<String> {
        let raw = self.patterns.message.captures(&page.body)?;
        let text = serde_json::from_str::<String>(&format!("\"{}\"", &raw[1])).unwrap_or_else(|_| raw[1].to_string());
        Some(text)
    }

    /// ` ("<title>")` of a page, for details.
    fn title(&self, page: &Page) -> String {
        self.patterns
            .title
            .captures(&page.body)
            .map(|c| format!(" ({:?})", c[1].trim()))
            .unwrap_or_default()
    }

    /// Reports old/new parity from the facts known so far; logs changes.
    fn publish_parity(&self, run: &mut Run) {
        let mut state = self.state.lock().expect("webmail state");
        let (Some(old), Some(new)) = (state.facts.get("old"), state.facts.get("new")) else {
            return;
        };
        let differences = AppFacts::differences(old, new);
        if state.last_differences.as_ref() != Some(&differences) {
            if differences.is_empty() {
                tracing::info!(
                    check.host = %self.host,
                    "webmail parity: old and new run the same version, skin and plugins"
                );
            } else {
                tracing::warn!(
                    check.host = %self.host,
                    differences = %differences.join("; "),
                    "webmail parity: new differs from old"
                );
            }
            state.last_differences = Some(differences.clone());
        }
        run.notes
            .extend(differences.iter().map(|d| format!("webmail differs from old's: {d}")));
        run.measurements.push(Measurement::WebmailLogin(Measured::Parity {
            equal: differences.is_empty(),
            differences,
        }));
    }
}

impl Probe for WebmailLoginProbe {
    fn hostname(&self) -> &str {
        &self.host
    }

    fn run<'a>(&'a self, ip: IpAddr, run: &'a mut Run) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let client = self.client(ip)?;
            let mut token = None;
            let result = self.session(&client, ip, run, &mut token).await;
            if let Some(token) = token {
                // A later step failed while logged in: leave no session behind.
                let logout = self.at(&self.url, &[("_task", "logout"), ("_token", &token)]);
                let _ = fetch(client.get(logout)).await;
            }
            self.publish_parity(run);
            result
        })
    }
}

/// What step 1 read.
struct LoginForm {
    token: String,
    version: String,
    skin: String,
}

/// What step 3 read.
struct MailEnv {
    token: String,
}

/// One response, read up to [`MAX_BODY`].
struct Page {
    status: StatusCode,
    location: Option<String>,
    /// Names of the cookies it set (or deleted).
    cookies: Vec<String>,
    body: String,
}

/// Sends a request and reads the whole answer.
async fn fetch(request: RequestBuilder) -> Result<Page, Failure> {
    let mut response = request.send().await.map_err(|e| transport(&e))?;
    if response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Failure::new(
            FailureReason::Oversize,
            format!("body larger than {MAX_BODY} bytes"),
        ));
    }
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cookies = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok()?.split('=').next().map(|n| n.trim().to_string()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Failure::new(
                FailureReason::Oversize,
                format!("body larger than {MAX_BODY} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Page {
        status,
        location,
        cookies,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Classifies a transport error: refused, TLS and certificate errors through
/// the same rules as every other probe.
fn transport(e: &reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            let mut f = Failure::io(io);
            f.detail = super::sanitize(&chain(e));
            return f;
        }
        source = err.source();
    }
    let reason = if e.is_timeout() {
        FailureReason::Timeout
    } else if e.is_body() || e.is_decode() {
        FailureReason::Protocol
    } else {
        FailureReason::Network
    };
    Failure::new(reason, chain(e))
}

/// An error and its causes on one line, without the URL (it may carry a token).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = match e.downcast_ref::<reqwest::Error>() {
        Some(r) => {
            let text = r.to_string();
            text.split(" for url (").next().unwrap_or(&text).to_string()
        }
        None => e.to_string(),
    };
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The JSON object given to `rcmail.set_env(...)`.
fn set_env(body: &str) -> Option<serde_json::Map<String, Value>> {
    let start = body.find("rcmail.set_env(")? + "rcmail.set_env(".len();
    let mut values = serde_json::Deserializer::from_str(&body[start..]).into_iter::<Value>();
    match values.next()? {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// `10605` -> `1.6.5`, as Roundcube's `RCMAIL_VERSION` reads.
fn version_name(rcversion: u64) -> String {
    format!("{}.{}.{}", rcversion / 10000, rcversion / 100 % 100, rcversion % 100)
}

/// Step 4: `env.messagecount` of the list answer; `session_error` is a lost session.
fn read_list(page: &Page) -> Result<u64, Failure> {
    if page.status != StatusCode::OK {
        return Err(Failure::new(
            FailureReason::UnexpectedStatus,
            format!("status {} for the message list", page.status),
        ));
    }
    let json: Value = serde_json::from_str(&page.body).map_err(|e| {
        Failure::new(
            FailureReason::UnexpectedPage,
            format!("the message list is not JSON: {e}"),
        )
    })?;
    let exec = json.get("exec").and_then(Value::as_str).unwrap_or_default();
    if exec.contains("session_error") {
        return Err(Failure::new(
            FailureReason::InvalidRequest,
            "the message list answered `session_error`: the session was lost",
        ));
    }
    json.pointer("/env/messagecount")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .ok_or_else(|| {
            Failure::new(
                FailureReason::UnexpectedPage,
                "the message list has no `env.messagecount`",
            )
        })
}

/// Roundcube's `en_US` texts of the login errors, to reasons.
fn classify_message(text: &str) -> Option<FailureReason> {
    Some(match text.trim() {
        "Login failed." | "loginfailed" => FailureReason::AuthFailed,
        "Connection to storage server failed." | "storageerror" => FailureReason::StorageError,
        "Invalid request! No data was saved."
        | "invalidrequest"
        | "Your session is invalid or expired."
        | "sessionerror"
        | "Your browser does not accept cookies."
        | "cookiesdisabled" => FailureReason::InvalidRequest,
        "Too many failed login attempts. Try again later." | "accountlocked" => FailureReason::AccountLocked,
        _ => return None,
    })
}

/// One query parameter of a URL.
fn query_value(url: &Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// ` (_err=session)` when Roundcube said why it sent us back.
fn err_param(url: &Url) -> String {
    query_value(url, "_err")
        .map(|e| format!(" (_err={e})"))
        .unwrap_or_default()
}

/// A URL for a detail, with its request token left out.
fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "_token" {
                "redacted".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if pairs.is_empty() {
        shown.set_query(None);
    } else {
        shown.query_pairs_mut().clear().extend_pairs(pairs);
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_env_reads_the_json_even_with_braces_in_strings() {
        let body = r#"<script>rcmail.set_env({"task":"login","rcversion":10605,"skin":"elastic","x":"});"});
rcmail.gui_container("x");</script>"#;
        let env = set_env(body).unwrap();
        assert_eq!(env["skin"], "elastic");
        assert_eq!(version_name(env["rcversion"].as_u64().unwrap()), "1.6.5");
    }

    #[test]
    fn plugins_and_token_come_from_roundcube_markup() {
        let p = Patterns::new();
        let body = r#"<input type="hidden" name="_token" value="S0ZNHOShgUqIOQBW48shAO2KjfliLYlz">
<script src="plugins/jqueryui/js/jquery-ui.min.js?s=1"></script>
<script src="plugins/zipdownload/zipdownload.min.js?s=2"></script>
<link href="skins/elastic/plugins/x.css">"#;
        assert_eq!(&p.token.captures(body).unwrap()[1], "S0ZNHOShgUqIOQBW48shAO2KjfliLYlz");
        let names: Vec<_> = p.plugin.captures_iter(body).map(|c| c[1].to_string()).collect();
        assert_eq!(names, ["jqueryui", "zipdownload"]);
    }

    #[test]
    fn login_messages_map_to_reasons() {
        assert_eq!(classify_message("Login failed."), Some(FailureReason::AuthFailed));
        assert_eq!(
            classify_message("Connection to storage server failed."),
            Some(FailureReason::StorageError)
        );
        assert_eq!(
            classify_message("Invalid request! No data was saved."),
            Some(FailureReason::InvalidRequest)
        );
        assert_eq!(
            classify_message("Too many failed login attempts. Try again later."),
            Some(FailureReason::AccountLocked)
        );
        assert_eq!(classify_message("Hello"), None);
    }

    #[test]
    fn differences_name_each_fact() {
        let facts = |skin: &str, plugins: &[&str]| AppFacts {
            app: "roundcube",
            version: "1.6.5".into(),
            skin: skin.into(),
            plugins: plugins.iter().map(|s| s.to_string()).collect(),
        };
        let old = facts("elastic", &["archive", "jqueryui", "zipdownload"]);
        assert!(AppFacts::differences(&old, &old).is_empty());
        let new = facts("larry", &["archive", "jqueryui", "markasjunk"]);
        assert_eq!(
            AppFacts::differences(&old, &new),
            [
                "skin: old elastic, new larry",
                "plugins: zipdownload only in old",
                "plugins: markasjunk only in new"
            ]
        );
    }

    #[test]
    fn redacted_urls_hide_the_request_token() {
        let url = Url::parse("https://w.test/roundcube/?_task=mail&_token=abc").unwrap();
        assert_eq!(redacted(&url), "https://w.test/roundcube/?_task=mail&_token=redacted");
    }
}

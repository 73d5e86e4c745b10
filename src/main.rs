//! Command-line wiring only: parse flags, set up logging, hand over.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cutover_monitor::config::{self, Kind};
use cutover_monitor::probe::hosted_domains::{Finding, HostedDomainsProbe, Progress};
use cutover_monitor::probe::mailbox_parity::{Finding as ParityFinding, MailboxParityProbe};
use cutover_monitor::{client, daemon, listener, migration, probe, report, scheduler};
use hyper::Method;

/// Watches a mail service's old and new environments side by side during a
/// migration, plus the live view DNS hands out, and exports Prometheus metrics.
#[derive(Parser)]
#[command(name = "cutover-monitor", version)]
struct Cli {
    /// Log level for cutover-monitor's own lines (other libraries log at warn).
    #[arg(long = "log.level", default_value = "info", global = true, value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// Log format.
    #[arg(long = "log.format", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

/// The phase names the CLI accepts: the migration's own list.
fn phases() -> clap::builder::PossibleValuesParser {
    migration::Phase::ALL.map(migration::Phase::as_str).into()
}

#[derive(Subcommand)]
enum PhaseAction {
    /// Print the phase in force and its go/no-go answers.
    Show,
    /// Set the phase by hand; it wins over the clock until `phase clear` (kept until the daemon restarts).
    Set {
        /// The phase.
        #[arg(value_parser = phases())]
        phase: String,
    },
    /// Remove the manual phase: the clock rules again.
    Clear,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: probe on schedule and serve /metrics.
    Run {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
        /// Address to serve /metrics and the other endpoints on.
        #[arg(long = "web.listen-address", default_value = "127.0.0.1:9839")]
        listen: SocketAddr,
        /// TLS and basic auth for the endpoints, in the Prometheus exporter-toolkit format.
        #[arg(long = "web.config.file")]
        web_config_file: Option<PathBuf>,
        /// Serve endpoints that change state (POST /-/reload); off by default, SIGHUP always reloads.
        #[arg(long = "web.enable-lifecycle")]
        enable_lifecycle: bool,
        /// Directory of the mail ledger (`mailflow` checks); created when needed.
        #[arg(long = "storage.path", default_value = "./data")]
        storage_path: PathBuf,
        /// Open HTTP connections at most (at most half the soft limit on open files); at the cap the oldest without a request in progress is closed for a new one.
        #[arg(long = "web.max-connections", default_value_t = listener::DEFAULT_MAX_CONNECTIONS, value_parser = at_least_one)]
        max_connections: usize,
        /// Time a client gets for its TLS handshake and for each request head; also how long a keep-alive connection may idle.
        #[arg(long = "web.read-header-timeout", default_value = "10s", value_parser = positive_duration)]
        read_header_timeout: std::time::Duration,
    },
    /// Run the selected checks once and print the results (exit 0 all OK, 2 any failing, 3 could not run).
    Check {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
        /// Only these environments (repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Only these checks (repeatable).
        #[arg(long)]
        check: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
        /// Judge go/no-go as if in this migration phase (default: the phase the clock gives).
        #[arg(long, value_parser = phases())]
        phase: Option<String>,
    },
    /// Show or set the migration phase of a running daemon, through its API.
    Phase {
        #[command(subcommand)]
        action: PhaseAction,
        /// Where the daemon serves HTTP.
        #[arg(long = "web.listen-address", default_value = "127.0.0.1:9839", global = true)]
        listen: SocketAddr,
        /// Basic-auth user, when the daemon's web config asks for one (password in CUTOVER_WEB_PASSWORD).
        #[arg(long = "web.username", global = true)]
        username: Option<String>,
    },
    /// Report every problem in a check file, each as file:line:col: field: message.
    Validate {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
        /// A web config file to check as well.
        #[arg(long = "web.config.file")]
        web_config_file: Option<PathBuf>,
    },
    /// Audit the customer domains of the `hosted_domains` checks once and print
    /// each domain with a problem, its offending records and the suggested fix
    /// (exit 0 when the audit ran, 3 when it could not).
    Domains {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
        /// Only these hosted_domains checks (repeatable); all when omitted.
        #[arg(long)]
        check: Vec<String>,
        /// Only domains with one of these findings (repeatable or comma-separated); every finding but `ok` when omitted.
        #[arg(long, value_parser = finding_name, value_delimiter = ',')]
        finding: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DomainsFormat::Table)]
        format: DomainsFormat,
    },
    /// Audit the mailboxes of the `mailbox_parity` checks once, old against
    /// new, and print each account with a finding and its details (exit 0
    /// when the audit ran, 3 when it could not or a server stopped answering).
    Parity {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
        /// Only these mailbox_parity checks (repeatable); all when omitted.
        #[arg(long)]
        check: Vec<String>,
        /// Only accounts with one of these findings (repeatable or comma-separated); every finding but `ok` when omitted.
        #[arg(long, value_parser = parity_finding_name, value_delimiter = ',')]
        finding: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DomainsFormat::Table)]
        format: DomainsFormat,
        /// Judge `old_still_receiving` as in this phase (the check file's clock when omitted).
        #[arg(long, value_parser = phases())]
        phase: Option<String>,
    },
    /// Print the JSON Schema of the check file, for editors.
    Schema,
}

#[derive(Clone, Copy, ValueEnum)]
enum DomainsFormat {
    Table,
    Csv,
    Json,
}

fn parity_finding_name(text: &str) -> Result<String, String> {
    ParityFinding::parse(text).map(|f| f.as_str().to_string())
}

fn finding_name(text: &str) -> Result<String, String> {
    Finding::parse(text).map(|f| f.as_str().to_string())
}

/// A count of at least 1.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number: {e}")),
    }
}

/// A duration like `10s` or `500ms`, not zero.
fn positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("expected a duration like `10s`: {e}")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print exit quietly when their reader goes away (`| head`),
    // as Unix tools do, instead of panicking on EPIPE (Rust ignores SIGPIPE).
    // Not `run`: a peer closing a socket must not kill the daemon.
    if !matches!(cli.command, Command::Run { .. }) {
        // SAFETY: before any other thread exists; restores the default action.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(&cli.log_level, cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Run {
            config_file,
            listen,
            web_config_file,
            enable_lifecycle,
            storage_path,
            max_connections,
            read_header_timeout,
        } => match runtime.block_on(daemon::run(daemon::Options {
            config_file,
            listen,
            web_config_file,
            enable_lifecycle,
            storage_path,
            max_connections,
            read_header_timeout,
        })) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cutover-monitor: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check {
            config_file,
            env,
            check,
            format,
            phase,
        } => ExitCode::from(runtime.block_on(run_check(config_file, env, check, format, phase)) as u8),
        Command::Phase {
            action,
            listen,
            username,
        } => match runtime.block_on(run_phase(action, listen, username)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cutover-monitor: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Validate {
            config_file,
            web_config_file,
        } => {
            let checks = probe::load(&config_file);
            let web = daemon::load_web(web_config_file.as_deref());
            for errors in [checks.as_ref().err(), web.as_ref().err()].into_iter().flatten() {
                eprintln!("{errors}");
            }
            match (checks, web, web_config_file) {
                (Ok(c), Ok(_), web_file) => {
                    println!("{}: OK, {} checks", config_file.display(), c.checks.len());
                    if let Some(web_file) = web_file {
                        println!("{}: OK", web_file.display());
                    }
                    ExitCode::SUCCESS
                }
                _ => ExitCode::FAILURE,
            }
        }
        Command::Domains {
            config_file,
            check,
            finding,
            format,
        } => ExitCode::from(runtime.block_on(run_domains(config_file, check, finding, format)) as u8),
        Command::Parity {
            config_file,
            check,
            finding,
            format,
            phase,
        } => ExitCode::from(runtime.block_on(run_parity(config_file, check, finding, format, phase)) as u8),
        Command::Schema => {
            println!("{:#}", config::json_schema());
            ExitCode::SUCCESS
        }
    }
}

async fn run_check(
    config_file: PathBuf,
    envs: Vec<String>,
    checks: Vec<String>,
    format: OutputFormat,
    phase: Option<String>,
) -> i32 {
    let config = match probe::load(&config_file) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return report::EXIT_UNKNOWN;
        }
    };
    let specs: Vec<_> = scheduler::instances(&config)
        .into_iter()
        .filter(|s| envs.is_empty() || envs.contains(&s.inst.env))
        .filter(|s| checks.is_empty() || checks.contains(&s.inst.check))
        // An audit of thousands of domains is the `domains` command's job.
        .filter(|s| s.inst.kind != Kind::HostedDomains || checks.contains(&s.inst.check))
        .collect();
    if specs.is_empty() {
        eprintln!("no check instance matches --env {envs:?} --check {checks:?}");
        return report::EXIT_UNKNOWN;
    }
    let outcomes = scheduler::run_all(&specs, &config).await;
    let rows = report::rows(&specs, &outcomes);
    match format {
        OutputFormat::Table => print!("{}", report::table(&rows)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows).expect("rows serialize")),
    }
    if matches!(format, OutputFormat::Table) && (phase.is_some() || !config.migration.phases.is_empty()) {
        let now = cutover_monitor::unix_now();
        let mut current = config.migration.current(None, now);
        if let Some(p) = phase.and_then(|p| p.parse::<migration::Phase>().ok()) {
            current = config
                .migration
                .current(Some(migration::Manual { phase: p, since: now }), now);
            current.source = migration::Source::Assumed;
        }
        let seen: Vec<_> = specs.iter().zip(&outcomes).map(|(s, o)| (s, Some(o))).collect();
        let mail = if config.checks.iter().any(|c| c.check.kind.kind() == Kind::Mailflow) {
            report::MailEvidence::OneShot
        } else {
            report::MailEvidence::Unconfigured
        };
        let verdicts = report::assess(&config, &current, &seen, &mail, now);
        print!("{}", report::go_no_go(&current, &verdicts));
    }
    report::exit_code(&rows)
}

/// `domains`: one audit per selected `hosted_domains` check, with a progress
/// bar on a terminal, then the rows on stdout and a summary on stderr.
async fn run_domains(config_file: PathBuf, checks: Vec<String>, findings: Vec<String>, format: DomainsFormat) -> i32 {
    let config = match probe::load(&config_file) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return report::EXIT_UNKNOWN;
        }
    };
    // Built again from the validated spec: the daemon's probes are opaque.
    let audits: Vec<(&str, HostedDomainsProbe)> = config
        .checks
        .iter()
        .filter(|c| checks.is_empty() || checks.contains(&c.check.name))
        .filter_map(|c| match &c.check.kind {
            config::KindSpec::HostedDomains(spec) => HostedDomainsProbe::new(spec, &c.check)
                .ok()
                .map(|p| (c.check.name.as_str(), p)),
            _ => None,
        })
        .collect();
    if audits.is_empty() {
        eprintln!(
            "{}: no hosted_domains check{}",
            config_file.display(),
            if checks.is_empty() {
                String::new()
            } else {
                format!(" named {checks:?}")
            }
        );
        return report::EXIT_UNKNOWN;
    }
    let wanted: Vec<Finding> = if findings.is_empty() {
        Finding::ALL.into_iter().filter(|f| *f != Finding::Ok).collect()
    } else {
        findings.iter().filter_map(|f| Finding::parse(f).ok()).collect()
    };
    let mut reports = Vec::new();
    for (name, probe) in audits {
        let progress = std::sync::Arc::new(Progress::default());
        let bar = progress_bar(name, &progress);
        let result = probe.audit(&progress).await;
        bar.abort();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r\x1b[2K");
        }
        match result {
            Ok(report) => reports.push(report),
            Err(failure) => {
                eprintln!("{name}: the audit failed: {failure}");
                return report::EXIT_UNKNOWN;
            }
        }
    }
    let lines: Vec<report::DomainLine> = reports
        .iter()
        .flat_map(|r| {
            r.domains
                .iter()
                .filter(|row| wanted.iter().any(|f| row.has(*f)))
                .map(|row| report::DomainLine { check: &r.check, row })
        })
        .collect();
    match format {
        DomainsFormat::Table => print!("{}", report::domains_table(&lines)),
        DomainsFormat::Csv => print!("{}", report::domains_csv(&lines)),
        DomainsFormat::Json => {
            // Streamed: 100,000 rows are 20 MB of JSON, not worth holding at once.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let written = serde_json::to_writer_pretty(&mut out, &lines)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush());
            if let Err(e) = written {
                eprintln!("writing the rows: {e}");
                return report::EXIT_UNKNOWN;
            }
        }
    }
    for r in &reports {
        eprint!("{}", report::audit_summary(r));
    }
    report::EXIT_OK
}

/// `parity`: one audit per selected `mailbox_parity` check, with a progress
/// bar on a terminal, then the rows on stdout and a summary on stderr. Without
/// a kept audit, `old_still_receiving` has no base: every account starts one.
async fn run_parity(
    config_file: PathBuf,
    checks: Vec<String>,
    findings: Vec<String>,
    format: DomainsFormat,
    phase: Option<String>,
) -> i32 {
    // Every check built as the daemon would (so the file is validated whole),
    // the parity probes kept by their own type: the daemon's are opaque.
    let build = |check: &config::Check, credentials: &config::Credentials| match &check.kind {
        config::KindSpec::MailboxParity(spec) => MailboxParityProbe::new(spec, check, credentials).map(Some),
        _ => probe::build(check, credentials).map(|_| None),
    };
    let config = match config::load(&config_file, &build) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return report::EXIT_UNKNOWN;
        }
    };
    let audits: Vec<(&str, &MailboxParityProbe)> = config
        .checks
        .iter()
        .filter(|c| checks.is_empty() || checks.contains(&c.check.name))
        .filter_map(|c| c.probe.as_ref().map(|p| (c.check.name.as_str(), p)))
        .collect();
    if audits.is_empty() {
        eprintln!(
            "{}: no mailbox_parity check{}",
            config_file.display(),
            if checks.is_empty() {
                String::new()
            } else {
                format!(" named {checks:?}")
            }
        );
        return report::EXIT_UNKNOWN;
    }
    let phase = match phase.and_then(|p| p.parse::<migration::Phase>().ok()) {
        Some(p) => Some(p),
        None => config.migration.current(None, cutover_monitor::unix_now()).phase,
    };
    let wanted: Vec<ParityFinding> = if findings.is_empty() {
        ParityFinding::ALL
            .into_iter()
            .filter(|f| *f != ParityFinding::Ok)
            .collect()
    } else {
        findings.iter().filter_map(|f| ParityFinding::parse(f).ok()).collect()
    };
    let mut reports = Vec::new();
    let mut code = report::EXIT_OK;
    for (name, probe) in audits {
        let progress = std::sync::Arc::new(Progress::default());
        let bar = progress_bar_of(name, "accounts", &progress);
        let result = probe.audit(&progress, phase).await;
        bar.abort();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprint!("\r\x1b[2K");
        }
        match result {
            Ok(report) => {
                for (side, n) in &report.unreachable {
                    eprintln!("{name}: {side} did not answer for {n} accounts (login_failed); the audit is incomplete");
                    code = report::EXIT_UNKNOWN;
                }
                reports.push(report)
            }
            Err(failure) => {
                eprintln!("{name}: the audit failed: {failure}");
                return report::EXIT_UNKNOWN;
            }
        }
    }
    let lines: Vec<report::ParityLine> = reports
        .iter()
        .flat_map(|r| {
            r.accounts
                .iter()
                .filter(|row| wanted.iter().any(|f| row.has(*f)))
                .map(|row| report::ParityLine { check: &r.check, row })
        })
        .collect();
    match format {
        DomainsFormat::Table => print!("{}", report::parity_table(&lines)),
        DomainsFormat::Csv => print!("{}", report::parity_csv(&lines)),
        DomainsFormat::Json => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let written = serde_json::to_writer_pretty(&mut out, &lines)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(out))
                .and_then(|()| out.flush());
            if let Err(e) = written {
                eprintln!("writing the rows: {e}");
                return report::EXIT_UNKNOWN;
            }
        }
    }
    for r in &reports {
        eprint!("{}", report::parity_summary(r));
    }
    code
}

/// Redraws `domains done/total` on stderr every 200 ms while an audit runs,
/// only when stderr is a terminal (logs and pipes get the summary alone).
fn progress_bar(check: &str, progress: &std::sync::Arc<Progress>) -> tokio::task::JoinHandle<()> {
    progress_bar_of(check, "domains", progress)
}

/// [`progress_bar`] counting `what` (domains, accounts).
fn progress_bar_of(
    check: &str,
    what: &'static str,
    progress: &std::sync::Arc<Progress>,
) -> tokio::task::JoinHandle<()> {
    let (check, progress) = (check.to_string(), progress.clone());
    tokio::spawn(async move {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return;
        }
        let start = std::time::Instant::now();
        loop {
            let done = progress.done.load(std::sync::atomic::Ordering::Relaxed);
            let total = progress.total.load(std::sync::atomic::Ordering::Relaxed).max(1);
            let filled = done * 30 / total;
            let elapsed = start.elapsed().as_secs_f64();
            let left = if done > 0 {
                format!(", ~{:.0} s left", elapsed / done as f64 * (total - done) as f64)
            } else {
                String::new()
            };
            eprint!(
                "\r\x1b[2K{check}: [{}{}] {done}/{total} {what}, {elapsed:.0} s{left}",
                "#".repeat(filled),
                ".".repeat(30 - filled)
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
}

/// `phase show|set|clear`: one call to the running daemon's API.
async fn run_phase(action: PhaseAction, listen: SocketAddr, username: Option<String>) -> Result<(), String> {
    let daemon = client::Daemon::new(listen, username)?;
    let (method, path, body) = match &action {
        PhaseAction::Show => (Method::GET, "/api/v1/status", None),
        PhaseAction::Set { phase } => (
            Method::POST,
            "/api/v1/phase",
            Some(serde_json::json!({ "phase": phase })),
        ),
        PhaseAction::Clear => (Method::DELETE, "/api/v1/phase", None),
    };
    let (status, text) = daemon
        .call(method, path, body.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("the daemon at {listen} answered {status}: {}", text.trim()));
    }
    let bad = |e: serde_json::Error| format!("the daemon at {listen} sent an unexpected answer: {e}");
    let out = match action {
        PhaseAction::Show => {
            let status: serde_json::Value = serde_json::from_str(&text).map_err(bad)?;
            let current: migration::Current = serde_json::from_value(status["phase"].clone()).map_err(bad)?;
            let verdicts: Vec<report::Verdict> = serde_json::from_value(status["verdicts"].clone()).map_err(bad)?;
            report::go_no_go(&current, &verdicts)
        }
        _ => report::go_no_go(&serde_json::from_str(&text).map_err(bad)?, &[]),
    };
    print!("{}", out.trim_start());
    Ok(())
}

fn init_logging(level: &str, format: LogFormat) {
    // Third-party crates stay at warn whatever the level: protocol libraries
    // trace their sessions, and those can carry credentials.
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,cutover_monitor={level}"));
    // Colours only on a terminal: in a file or the journal they are raw escapes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

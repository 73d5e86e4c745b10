//! Command-line wiring only: parse flags, set up logging, hand over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cutover_monitor::{config, daemon, report, scheduler};

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
    },
    /// Report every problem in a check file, each as file:line:col: field: message.
    Validate {
        /// The check file.
        #[arg(long = "config.file", default_value = "checks/lab.yaml")]
        config_file: PathBuf,
    },
    /// Print the JSON Schema of the check file, for editors.
    Schema,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level, cli.log_format);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match cli.command {
        Command::Run { config_file, listen } => match runtime.block_on(daemon::run(config_file, listen)) {
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
        } => ExitCode::from(runtime.block_on(run_check(config_file, env, check, format)) as u8),
        Command::Validate { config_file } => match config::load(&config_file) {
            Ok(c) => {
                println!("{}: OK, {} checks", config_file.display(), c.checks.len());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Schema => {
            println!("{:#}", config::json_schema());
            ExitCode::SUCCESS
        }
    }
}

async fn run_check(config_file: PathBuf, envs: Vec<String>, checks: Vec<String>, format: OutputFormat) -> i32 {
    let config = match config::load(&config_file) {
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
    report::exit_code(&rows)
}

fn init_logging(level: &str, format: LogFormat) {
    // Third-party crates stay at warn whatever the level: protocol libraries
    // trace their sessions, and those can carry credentials.
    let filter = tracing_subscriber::EnvFilter::new(format!("warn,cutover_monitor={level}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

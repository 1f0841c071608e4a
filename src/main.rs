//! The `canarygate` binary: parses the command line, loads the config, sets up
//! logging and signals, and hands over to the library.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use canarygate::config::{self, Config};
use canarygate::demo::{self, AppIdentity};
use canarygate::ops::control::{Change, ControlError};
use canarygate::server::nofile;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, error, info, warn};

// mimalloc: measurably faster than glibc malloc for the proxy's many small,
// short-lived allocations (headers, buffers) across threads. Built with `no_thp`:
// otherwise it advises transparent huge pages on its arena and every region it
// touches costs 2 MiB of RSS (8 MiB at start, and most of what 10,000 idle
// connections held); a proxy's heap is small and gains nothing from huge pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad config or bad usage (EX_USAGE from sysexits.h).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "canarygate", version, about = "Canary-splitting reverse proxy")]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Runtime worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a config file: exit 0, or 64 with the file, line, key and problem.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start two demo apps (production v1, canary v2) and the proxy in front of them.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Redis for live flags; default: redis://127.0.0.1:6379/0 if it answers,
        /// otherwise the built-in static flags.
        #[arg(long)]
        redis_url: Option<String>,
    },
    /// Send one info alert through every configured alert channel (ignoring their
    /// min_severity); print `ok` or the error per channel; exit 0 only if all worked.
    AlertTest {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The doctor: a process of its own that stops runaway CPU hogs (never root or
    /// protected processes) and alerts. Reads `[doctor]`, `[alerts]` and
    /// `server.admin_listen` of FILE; needs CAP_KILL to stop other users' processes.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// Sample for `sustain_ms`, print what it sees and would do, signal nothing.
        #[arg(long)]
        once: bool,
    },
    /// Maintenance: a process of its own that archives log files to secondary
    /// storage (verified) before the disk fills, then frees them. Reads
    /// `[maintenance]`, `[alerts]` and `server.admin_listen` of FILE; needs write
    /// access to maintenance.dirs only.
    Maintenance {
        #[arg(long, short)]
        config: PathBuf,
        /// One round, then exit.
        #[arg(long)]
        once: bool,
        /// With --once: print what would be archived and why; touch nothing.
        #[arg(long, requires = "once")]
        dry_run: bool,
    },
    /// The canary analysis: `canary status` prints the shared verdict from Redis.
    Canary {
        #[command(subcommand)]
        command: CanaryCommand,
    },
    /// Serve the demo web app alone (for tests, benchmarks and deployments).
    Backend {
        #[arg(long)]
        listen: SocketAddr,
        /// Shown in the page and sent in the `x-backend` header.
        #[arg(long)]
        name: String,
        /// Version label shown in the page.
        #[arg(long, default_value = "v1")]
        app_version: String,
        /// Runtime worker threads (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Start broken: answer 500 to one page in three (never `/health` or
        /// `/readyz`), as a bad release would; for canary analysis and deploy tests.
        #[arg(long)]
        broken: bool,
        /// On SIGTERM, answer 503 on `/readyz` and go on serving this long before
        /// stopping (a proxy checking `/readyz` stops sending first).
        #[arg(long, default_value_t = 0)]
        drain_ms: u64,
    },
}

#[derive(Subcommand)]
enum CanaryCommand {
    /// Print the analysis state from Redis (`canarygate:analysis` and the reserved
    /// flags). Exit 0 when read; 64 on a bad config or no Redis; 69 when Redis does
    /// not answer.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object instead of `key: value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Set `canary_percent` (0 to 100) for the fleet and take the levers from the
    /// analysis (`canary_auto off`). Like every change below: one Redis transaction,
    /// the audit alert to every channel; exit 0 when done, 64 on a bad argument or
    /// config, 69 when Redis does not answer (nothing changed).
    Set {
        /// A whole number from 0 to 100 (anything else: exit 64, saying so).
        #[arg(allow_negative_numbers = true)]
        percent: String,
        #[arg(long, short)]
        config: PathBuf,
    },
    /// `canary_auto off`: nothing moves; the analysis keeps judging and alerting.
    Pause {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// `canary_auto on`: the analysis takes the levers back at its next round.
    Resume {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// `canary_percent 0` and `canary_auto off`: every user to production.
    Rollback {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// `canary_percent 100` and `canary_auto off`; prints the next step.
    Promote {
        #[arg(long, short)]
        config: PathBuf,
    },
}

impl CanaryCommand {
    /// The change and the config file of a `canary` command other than `status`.
    fn change(&self) -> Option<(Result<Change, ControlError>, &Path)> {
        Some(match self {
            Self::Status { .. } => return None,
            Self::Set { percent, config } => (Change::percent(percent).map(Change::Set), config),
            Self::Pause { config } => (Ok(Change::Pause), config),
            Self::Resume { config } => (Ok(Change::Resume), config),
            Self::Rollback { config } => (Ok(Change::Rollback), config),
            Self::Promote { config } => (Ok(Change::Promote), config),
        })
    }
}

/// Exit status when a service the command needs does not answer (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match &cli.command {
        Command::Check { config } => match config::load(config) {
            Ok(cfg) => {
                println!("{}: ok", config.display());
                let nofile = nofile::inspect(cfg.limits.max_connections);
                if nofile.hard_too_low() {
                    // Not a config error: the unit that runs the proxy may have its own.
                    eprintln!(
                        "warning: limits.max_connections = {} needs {} file descriptors; the hard \
                         limit here is {} (about {} connections). Set LimitNOFILE={} in the unit \
                         (or ulimit -Hn) where the proxy runs.",
                        cfg.limits.max_connections,
                        nofile.needed,
                        nofile.hard.unwrap_or_default(),
                        nofile
                            .hard
                            .unwrap_or_default()
                            .saturating_sub(nofile::SPARE)
                            / 2,
                        nofile.needed
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Run { config, workers } => {
            match config::load(config) {
                Ok(cfg) => match preflight(&cfg) {
                    Ok(()) => exit_with(current_thread_runtime().and_then(|rt| {
                        rt.block_on(run(cfg, config, workers.unwrap_or_else(cores)))
                    })),
                    Err(message) => {
                        eprintln!("error: {}: {message}", config.display());
                        ExitCode::from(EXIT_CONFIG)
                    }
                },
                Err(e) => config_failure(&e),
            }
        }
        Command::Demo {
            listen,
            admin_listen,
            redis_url,
        } => exit_with(runtime().and_then(|rt| {
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone())?;
                demo::demo(*listen, *admin_listen, redis_url.clone(), shutdown).await?;
                Ok(())
            })
        })),
        Command::Doctor { config, once } => {
            // The kill log outlives each reload's doctor: the breaker's window holds.
            let kills = canarygate::ops::doctor::breaker::KillLog::default();
            co_located(
                "doctor",
                config,
                canarygate::config::doctor::DoctorFile::validate,
                canarygate::config::doctor::DoctorFile::changed_sections,
                once.then_some(
                    |file| async move { Ok(canarygate::ops::doctor::once(&file).await?) },
                ),
                move |file, shutdown| {
                    let kills = std::sync::Arc::clone(&kills);
                    async move { Ok(canarygate::ops::doctor::run(file, shutdown, kills).await?) }
                },
            )
        }
        Command::Maintenance {
            config,
            once,
            dry_run,
        } => co_located(
            "maintenance",
            config,
            canarygate::config::maintenance::MaintenanceFile::validate,
            canarygate::config::maintenance::MaintenanceFile::changed_sections,
            once.then_some(|file| async move {
                Ok(canarygate::ops::maintenance::once(&file, *dry_run).await?)
            }),
            |file, shutdown| async move { Ok(canarygate::ops::maintenance::run(file, shutdown).await?) },
        ),
        Command::Canary {
            command: CanaryCommand::Status { config, json },
        } => match config::load(config) {
            Ok(cfg) => canary_status(&cfg, *json),
            Err(e) => config_failure(&e),
        },
        Command::Canary { command } => match command.change() {
            Some((change, path)) => canary_change(change, path),
            None => unreachable!("status is matched above"),
        },
        Command::AlertTest { config } => match config::load(config) {
            Ok(cfg) => alert_test(&cfg),
            Err(e) => config_failure(&e),
        },
        Command::Backend {
            listen,
            name,
            app_version,
            workers,
            broken,
            drain_ms,
        } => exit_with(runtime_with(*workers).and_then(|rt| {
            rt.block_on(serve_backend(
                *listen,
                AppIdentity {
                    name: name.clone(),
                    version: app_version.clone(),
                    broken: *broken,
                },
                std::time::Duration::from_millis(*drain_ms),
            ))
        })),
    }
}

/// `alert-test`: one info alert per channel, each outcome printed.
fn alert_test(config: &Config) -> ExitCode {
    let instance = format!(
        "{}:{}",
        canarygate::ops::alerts::alert::hostname(),
        config.server.listen.port()
    );
    let results = runtime().and_then(|rt| {
        rt.block_on(canarygate::ops::alerts::dispatch::send_test(
            &config.alerts,
            &instance,
        ))
        .context("cannot build the alert channels")
    });
    match results {
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Ok(results) if results.is_empty() => {
            eprintln!(
                "no alert channels configured ([alerts.twilio], [alerts.email], [alerts.alertmanager], [alerts.webhook])"
            );
            ExitCode::FAILURE
        }
        Ok(results) => {
            let mut all_ok = true;
            for (channel, result) in results {
                match result {
                    Ok(()) => println!("{channel}: ok"),
                    Err(error) => {
                        all_ok = false;
                        println!("{channel}: error: {error}");
                    }
                }
            }
            if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The shadow's figures in the record's `figures` (written with `[shadow] gate`),
/// as one line.
fn shadow_figures(figures: &str) -> Option<String> {
    let figures: serde_json::Value = serde_json::from_str(figures).ok()?;
    let t = figures.get("shadow")?;
    Some(format!(
        "{} compared, {:.2}% differing ({} differences, {} canary errors, {} noise, {} match)",
        t["samples"],
        t["diff_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        t["diffs"],
        t["candidate_errors"],
        t["noise"],
        t["matches"],
    ))
}

/// `canary status`: the shared record, for the deploy playbook and humans.
fn canary_status(config: &Config, as_json: bool) -> ExitCode {
    use canarygate::ops::analysis::{StoreError, shared_status};
    let read =
        runtime().map(|rt| rt.block_on(shared_status(&config.flags, &config.analysis.redis_key)));
    let (record, levers) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(StoreError::Settings(message))) => {
            eprintln!("error: {message}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Ok(Err(error)) => {
            eprintln!("error: {error}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let state = record.state.map_or("none", |s| s.as_str());
    let shadow = shadow_figures(&record.figures);
    let mut fields: Vec<(String, String)> = vec![
        ("state".to_owned(), state.to_owned()),
        ("reason".to_owned(), record.reason),
        ("at".to_owned(), record.at),
        ("instance".to_owned(), record.instance),
        ("step".to_owned(), record.step.to_string()),
        ("figures".to_owned(), record.figures),
    ];
    if let Some(shadow) = shadow {
        fields.push(("shadow".to_owned(), shadow));
    }
    fields.extend(levers.into_iter().map(|(k, v)| (k.to_owned(), v)));
    if as_json {
        let object: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        println!("{}", serde_json::Value::Object(object));
    } else {
        for (key, value) in fields {
            println!("{key}: {value}");
        }
    }
    ExitCode::SUCCESS
}

/// `canary set|pause|resume|rollback|promote`: the change for the fleet
/// ([`canarygate::ops::control`]), with `canary status`'s exit codes.
fn canary_change(change: Result<Change, ControlError>, path: &Path) -> ExitCode {
    let done = change.and_then(|change| {
        let config = config::load(path).map_err(|e| ControlError::Usage(e.to_string()))?;
        let rt = runtime().map_err(|e| ControlError::Usage(format!("{e:#}")))?;
        rt.block_on(canarygate::ops::control::from_cli(&config, change))
    });
    match done {
        Ok(done) => {
            println!("{}", done.message);
            for failure in &done.alert_failures {
                eprintln!("warning: audit alert not sent: {failure}");
            }
            ExitCode::SUCCESS
        }
        Err(error @ (ControlError::Usage(_) | ControlError::Settings(_))) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error @ ControlError::Redis(_)) => {
            eprintln!("error: {error}; nothing changed");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// What `run` checks beyond the file itself, before binding anything: the
/// environment variables the config names, and the TLS certificate and key.
fn preflight(config: &Config) -> Result<(), String> {
    config
        .check_environment()
        .map_err(|v| format!("key `{}`: {}", v.key, v.message))?;
    if let Some(tls) = &config.server.tls {
        canarygate::tls::server_config(tls, None).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn config_failure(error: &config::ConfigError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(EXIT_CONFIG)
}

/// A co-located process (`doctor`, `maintenance`): reads its sections of `path`
/// (exit 64 when they are wrong), then prints one report (`--once`) or runs until
/// SIGTERM/SIGINT, re-reading `path` on SIGHUP.
fn co_located<F, O, R>(
    name: &'static str,
    path: &std::path::Path,
    validate: fn(&F) -> Result<(), config::Violation>,
    sections: fn(&F, &F) -> Vec<&'static str>,
    once: Option<impl FnOnce(F) -> O>,
    run: impl Fn(F, CancellationToken) -> R,
) -> ExitCode
where
    F: serde::de::DeserializeOwned + Clone,
    O: std::future::Future<Output = anyhow::Result<String>>,
    R: std::future::Future<Output = anyhow::Result<()>>,
{
    let file = match config::load_as::<F>(path, validate) {
        Ok(file) => file,
        Err(e) => return config_failure(&e),
    };
    exit_with(runtime().and_then(|rt| {
        rt.block_on(async {
            if let Some(once) = once {
                print!("{}", once(file).await?);
                return Ok(());
            }
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            canarygate::ops::sidecar::run_reloading(
                name,
                path,
                |p| config::load_as::<F>(p, validate),
                sections,
                file,
                run,
                shutdown,
            )
            .await
        })
    }))
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// `run` is thread-per-core: this runtime is worker 0 (plus the admin listener and the
/// background tasks); the other workers get their own (see `Listeners::workers`).
fn current_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers.max(1));
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Standard error that never reports a failed write. tracing-subscriber answers a
/// failed write with `eprintln!`, which panics when stderr is gone (a closed pipe, a
/// journald restart): the panic killed the task that logged, the SIGTERM handler among
/// them, and the proxy no longer stopped. A log line that cannot be written is lost;
/// nothing else is.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LossyStderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} on {addr}"))
}

/// Cancels `token` on SIGTERM or SIGINT; a second signal exits at once.
fn spawn_signal_handler(token: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::spawn(
        async move {
            tokio::select! {
                _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
                _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
            }
            token.cancel();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            warn!("second signal; exiting without draining");
            std::process::exit(130);
        }
        .in_current_span(),
    );
    Ok(())
}

async fn run(config: Config, path: &Path, workers: usize) -> anyhow::Result<()> {
    canarygate::worker::set_workers(workers);
    // Before anything is opened; logged in the proxy's span below.
    let nofile = nofile::raise(config.limits.max_connections);
    let mut proxy_sockets = canarygate::reuseport_listeners(config.server.listen, workers)
        .with_context(|| format!("cannot bind the proxy listener on {}", config.server.listen))?;
    let first = proxy_sockets.remove(0);
    // HTTPS the same way: a socket per worker, so TLS work spreads over the cores.
    let mut tls_sockets = match &config.server.tls {
        Some(tls) => canarygate::reuseport_listeners(tls.listen, workers)
            .with_context(|| format!("cannot bind the TLS listener on {}", tls.listen))?,
        None => Vec::new(),
    }
    .into_iter();
    let listeners = canarygate::Listeners {
        proxy: TcpListener::from_std(first).context("proxy listener")?,
        workers: proxy_sockets,
        admin: bind(config.server.admin_listen, "admin listener").await?,
        tls: tls_sockets
            .next()
            .map(TcpListener::from_std)
            .transpose()
            .context("TLS listener")?,
        tls_workers: tls_sockets.collect(),
    };
    // The proxy's log lines carry its fleet id: its tasks', listeners' and signal
    // handlers' spans nest in this one. (Per-connection tasks do not enter it: a
    // span entered on every poll of every connection costs the request path.)
    let instance = canarygate::instance_id(&config, listeners.proxy.local_addr()?.port());
    let span = tracing::info_span!("proxy", instance = %instance);
    let config_max_connections = config.limits.max_connections;
    async move {
        info!(config = %path.display(), "config loaded");
        log_nofile(&nofile, config_max_connections);
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let state = canarygate::state::AppState::new(config);
        spawn_reload_handler(state.clone(), path.to_owned())?;
        canarygate::serve_all(listeners, state, shutdown).await?;
        Ok(())
    }
    .instrument(span)
    .await
}

/// Says what the start did to the descriptor limit: a hard limit below the need
/// at warn, with what the proxy can hold instead.
fn log_nofile(nofile: &std::io::Result<nofile::Nofile>, max_connections: u32) {
    match nofile {
        Err(error) => warn!(%error, "cannot raise the soft RLIMIT_NOFILE"),
        Ok(n) if n.hard_too_low() => warn!(
            max_connections,
            needed = n.needed,
            soft = n.after.unwrap_or(u64::MAX),
            hard = n.hard.unwrap_or(u64::MAX),
            connections_held = n.connections_held().unwrap_or(u64::MAX),
            "the hard RLIMIT_NOFILE is below what max_connections needs; set LimitNOFILE in the unit"
        ),
        Ok(n) => info!(
            needed = n.needed,
            soft_before = n.before.unwrap_or(u64::MAX),
            soft = n.after.unwrap_or(u64::MAX),
            hard = n.hard.unwrap_or(u64::MAX),
            "RLIMIT_NOFILE"
        ),
    }
}

/// Re-reads the config on SIGHUP; a bad one is logged and the running one kept.
fn spawn_reload_handler(state: canarygate::state::AppState, path: PathBuf) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    tokio::spawn(
        async move {
            while hup.recv().await.is_some() {
                info!(signal = "SIGHUP", "reloading config");
                // The outcome is logged, counted and recorded as an event by reload().
                let _ = canarygate::reload(&state, &path);
            }
        }
        .in_current_span(),
    );
    Ok(())
}

async fn serve_backend(
    listen: SocketAddr,
    identity: AppIdentity,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    let listener = bind(listen, "backend").await?;
    info!(addr = %listener.local_addr()?, name = %identity.name, "backend listening");
    // SIGTERM: `/readyz` turns 503 at once, the app serves on for `drain`, then stops
    // (a proxy checking /readyz takes it out of rotation meanwhile).
    let signalled = CancellationToken::new();
    spawn_signal_handler(signalled.clone())?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        signalled.cancelled().await;
        demo::start_draining();
        tokio::time::sleep(drain).await;
        stop.cancel();
    });
    demo::run(listener, identity, demo::serve_options(), shutdown).await;
    Ok(())
}

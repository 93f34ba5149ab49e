//! The `pgsplit` binary: parses the command line, loads the configuration
//! and runs the proxy (or the local lab). All logic lives in the library
//! crates, so tests drive the same code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pgsplit_server::config::{Config, Overrides};
use pgsplit_server::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pgsplit",
    version,
    about = "Read/write-splitting PostgreSQL proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log lines as `text` (the default) or `json` (one object per line,
    /// with the client's conn_id, user, db and peer); also PGSPLIT_LOG_FORMAT.
    #[arg(
        long,
        global = true,
        env = "PGSPLIT_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Clone, Default)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:6432).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Primary as postgres://user:password@host:port/db (quick mode: these
    /// credentials are also what clients log in with).
    #[arg(long)]
    primary: Option<String>,
    /// Replica as postgres://user:password@host:port/db. As in libpq, a
    /// host such as %2Fvar%2Frun%2Fpostgresql (or ?host=/dir) is a unix
    /// socket directory.
    #[arg(long)]
    replica: Option<String>,
    /// Override any configuration key: --set timeouts.connect_timeout=2s
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local primary + streaming replica from the installed
    /// PostgreSQL binaries, with pgsplit in front of them.
    #[cfg(feature = "lab")]
    Lab {
        /// Address for pgsplit to listen on.
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: std::net::SocketAddr,
    },
}

/// Sets up logging from `PGSPLIT_LOG` (default `info`). A spec of levels
/// and targets (`info`, `pgsplit_server=debug,warn`) is a static
/// [`Targets`](tracing_subscriber::filter::Targets) filter, which costs
/// nothing when a session's span is entered and left on every poll; only a
/// spec with span or field directives (`[client{user=app}]=debug`) needs
/// the dynamic `EnvFilter`, which looks the span up each time.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{EnvFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("PGSPLIT_LOG").unwrap_or_else(|_| "info".to_owned());
    let (targets, dynamic) = match spec.parse::<Targets>() {
        Ok(t) if !spec.contains('[') => (Some(t), None),
        _ => (
            None,
            Some(EnvFilter::try_new(&spec).unwrap_or_else(|e| {
                eprintln!(
                    "pgsplit: PGSPLIT_LOG={spec:?} is not a log filter ({e}); logging at info"
                );
                EnvFilter::new("info")
            })),
        ),
    };
    let registry = tracing_subscriber::registry().with(targets).with(dynamic);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    // Colours on a terminal only: a log file or journal gets plain text.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_target(false)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        #[cfg(feature = "lab")]
        Some(Command::Lab { listen }) => lab(listen),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        primary_url: args.primary,
        replica_url: args.replica,
        set: args.set,
    };
    let source = pgsplit_server::reload::Source {
        path: args.config.clone(),
        overrides: overrides.clone(),
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgsplit: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        println!("configuration ok");
        return ExitCode::SUCCESS;
    }
    if config.users.is_empty() {
        eprintln!("pgsplit: no users configured: add [[users]] to the file or give --primary postgres://user:password@host:port/db");
        return ExitCode::from(2);
    }
    let listen = config.listen;
    let server = match pgsplit_server::Server::bind(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pgsplit: cannot start on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    server.shared().live.set_source(source);
    let token = CancellationToken::new();
    let now = server.shared().immediate.clone();
    let (on_signal, on_second) = (token.clone(), now.clone());
    let shared = server.shared().clone();
    let signals = std::thread::Builder::new()
        .name("pgsplit-signals".into())
        .spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(signals(on_signal, on_second, shared));
            } else {
                on_signal.cancel();
            }
        });
    if let Err(e) = signals {
        eprintln!("pgsplit: cannot start the signal handler: {e}");
        return ExitCode::FAILURE;
    }
    match server.run(token) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsplit: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM: a graceful shutdown (`graceful`): no new clients,
/// transactions in flight may finish for `[timeouts] shutdown_grace`, idle
/// clients get `FATAL 57P01`. SIGQUIT, or a second SIGINT/SIGTERM during
/// that, closes at once (`now`). SIGHUP reloads the configuration.
async fn signals(
    graceful: CancellationToken,
    now: CancellationToken,
    shared: std::sync::Arc<pgsplit_server::Shared>,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
        ) else {
            shutdown_signal().await;
            graceful.cancel();
            return;
        };
        let quit_first = loop {
            tokio::select! {
                _ = term.recv() => break false,
                _ = int.recv() => break false,
                _ = quit.recv() => break true,
                // Logged (and counted) by the reload itself.
                _ = hup.recv() => { let _ = shared.reload(); }
            }
        };
        graceful.cancel();
        if quit_first {
            now.cancel();
            return;
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
        now.cancel();
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
        shutdown_signal().await;
        graceful.cancel();
        let _ = tokio::signal::ctrl_c().await;
        now.cancel();
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(feature = "lab")]
fn lab(listen: std::net::SocketAddr) -> ExitCode {
    match pgsplit_lab::stack::run_interactive(listen, shutdown_signal()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsplit lab: {e}");
            ExitCode::FAILURE
        }
    }
}

//! The `corerelay` binary: parse the CLI, load the config, start, wait for a
//! signal. All the work is in the library; `run` turns into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use corerelay::config::{Config, LogFormat};
use corerelay::{sys, Server};

/// corerelay: a thread-per-core message relay (RELY, relayd-compatible).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Extras that do not run the server.
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// YAML config file (default: ./config.yaml if there is one, as Veylor
    /// reads it, then ./config.yml, as wsgateway does; else the embedded
    /// defaults, RELY on 0.0.0.0:33333).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// More logging: warnings by default; -v info (the start-up report),
    /// -vv debug, -vvv trace (RUST_LOG wins).
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// Run as a drop-in for wsproxy: configured only from its environment
    /// variables (HOST, PORT, REDIS_URL, WS_PING_INTERVAL_SECS, ...) and a
    /// ./.env file, as wsproxy is.
    #[arg(long, conflicts_with = "config")]
    wsproxy: bool,
    /// Print the YAML config that --wsproxy runs, and exit.
    #[arg(long, requires = "wsproxy")]
    print_config: bool,
    /// Log line format: text, or json (one object a line); overrides the
    /// config's log_format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// RELY port on 0.0.0.0, like `python -m relayd 40000` (overrides the config's rely.listen).
    port: Option<u16>,
}

/// What `corerelay <command>` does instead of serving.
#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell): `corerelay completions bash > /etc/bash_completion.d/corerelay`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `corerelay man | man -l -`.
    Man,
}

/// Starts the logger: RUST_LOG wins over `level`; `json` writes one
/// object a line with the time, level, target and message (escaped by
/// serde_json, so any message stays one parseable line).
fn init_logging(level: &str, format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if format == LogFormat::Json {
        b.format(|buf, record| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": buf.timestamp_millis().to_string(),
                "level": record.level().as_str(),
                "target": record.target(),
                "message": record.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.cmd {
        Some(Cmd::Completions { shell }) => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "corerelay",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Some(Cmd::Man) => {
            use clap::CommandFactory;
            let r = clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout());
            return if r.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        None => {}
    }
    if cli.wsproxy {
        // wsproxy reads ./.env (never overriding the environment) first.
        let _ = dotenvy::dotenv();
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // wsproxy's LOG_LEVEL applies when RUST_LOG is unset.
    let level = match std::env::var("LOG_LEVEL") {
        Ok(l) if cli.wsproxy && cli.verbose == 0 && !l.is_empty() => l,
        _ => level.to_owned(),
    };
    match run(cli, &level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corerelay: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Read when no -c is given and it exists in the working directory.
/// Veylor's ./config.yaml, then wsgateway's ./config.yml.
const LOCAL_CONFIGS: [&str; 2] = ["config.yaml", "config.yml"];

fn run(cli: Cli, level: &str) -> Result<(), Box<dyn std::error::Error>> {
    // As Veylor and wsgateway do: with no -c, their file when there is one.
    let mut cli = cli;
    let local = LOCAL_CONFIGS
        .iter()
        .find(|f| std::path::Path::new(f).is_file());
    let mut used_local = None;
    if let (None, false, Some(f)) = (&cli.config, cli.wsproxy, local) {
        used_local = Some(*f);
        cli.config = Some(PathBuf::from(f));
    }
    let env = |k: &str| std::env::var(k).ok();
    if cli.print_config {
        print!("{}", corerelay::config::wsproxy_yaml(&env)?);
        return Ok(());
    }
    // The config names the log format, so it is read first (its errors go
    // to stderr as they are).
    let mut cfg = match &cli.config {
        _ if cli.wsproxy => corerelay::config::wsproxy_config(&env)?,
        Some(p) => Config::load(p)?,
        None => Config::defaults(),
    };
    init_logging(level, cli.log_format.unwrap_or(cfg.log_format));
    if let Some(f) = used_local {
        log::warn!("no -c given: using ./{f}");
    }
    if let Some(port) = cli.port {
        cfg.rely.listen = vec![std::net::SocketAddr::from(([0, 0, 0, 0], port))];
    }
    if cli.check_config {
        let text = cli
            .config
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        cfg.check_host(&text)?;
        println!(
            "{}: ok",
            cli.config.as_ref().map_or(
                if cli.wsproxy {
                    "<wsproxy environment>"
                } else {
                    "<defaults>"
                }
                .into(),
                |p| p.display().to_string()
            )
        );
        return Ok(());
    }

    sys::tune_allocator();
    let limit = sys::raise_file_limit();
    // Before anything accepts: the handler's self-pipe needs two file
    // descriptors, and a connection flood at start-up could otherwise take
    // the last ones and make the server exit (found by the EMFILE test).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let server = Server::start(cfg)?;
    let cfg = server.config();
    log::info!(
        "corerelay {} config={}",
        env!("CARGO_PKG_VERSION"),
        cfg.source
            .as_ref()
            .map_or("<embedded defaults>".into(), |p| p.display().to_string())
    );
    match limit {
        Ok(l) => {
            log::info!("file limit soft={} hard={}", l.soft, l.hard);
            if cfg.max_connections as u64 > l.soft {
                log::warn!(
                    "max_connections {} is above the file limit {}: connections past the limit fail to be accepted (raise LimitNOFILE, or leave max_connections unset)",
                    cfg.max_connections,
                    l.soft
                );
            }
        }
        Err(e) => log::warn!("cannot read or raise the file limit: {e}"),
    }
    for a in server.admin_addrs() {
        if !a.ip().is_loopback() {
            log::warn!(
                "the admin API on {a} is reachable beyond this host: admin.allow decides who may use it"
            );
        }
    }
    log::info!(
        "workers={} cpus={:?} busy_poll={} max_connections={}",
        cfg.workers,
        server.cpus(),
        cfg.busy_poll,
        cfg.max_connections
    );
    for a in server.rely_addrs() {
        log::info!("listening: rely on {a}");
    }
    for a in server.ws_addrs() {
        log::info!("listening: websocket on {a}");
    }
    for a in server.admin_addrs() {
        log::info!("listening: admin on {a}");
    }
    if let Some(c) = &cfg.cluster {
        let url = cfg.redis_server(c.server).map_or("-", |r| r.url.as_str());
        log::info!("cluster: node {} (prefix {}) on {url}", c.node_id, c.prefix);
    }
    for s in &cfg.sources {
        log::info!(
            "source {} websocket={} unix={}",
            s.url,
            s.websocket.map_or("-".into(), |a| a.to_string()),
            s.unix_socket
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string())
        );
    }
    for e in cfg.websocket.iter().flat_map(|w| &w.endpoints) {
        log::info!(
            "websocket endpoint {} on_message={:?}",
            e.path,
            e.on_message
        );
    }

    let stopper = server.stopper();
    let (path, port, running) = (cli.config.clone(), cli.port, server.config().clone());
    std::thread::Builder::new()
        .name("corerelay-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload(path.as_deref(), port, &running);
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    log::info!("signal {sig}: graceful shutdown (again to exit at once)");
                    sys::notify_stopping();
                    stopper.stop();
                } else {
                    log::warn!("signal {sig} again: exiting now");
                    std::process::exit(128 + sig);
                }
            }
        })?;
    sys::notify_ready();
    server.wait();
    log::info!("stopped");
    Ok(())
}

/// SIGHUP: re-reads the config file. An invalid file is logged and
/// ignored; the server keeps running and no connection drops. Applying a
/// valid file live is not built yet: the settings that differ are logged
/// as needing a restart.
fn reload(path: Option<&std::path::Path>, port: Option<u16>, running: &Config) {
    let Some(path) = path else {
        log::warn!("SIGHUP: running on the embedded defaults, there is no file to re-read");
        return;
    };
    match Config::load(path) {
        Err(e) => log::error!("SIGHUP: {e}; the running configuration is kept"),
        Ok(mut new) => {
            if let Some(port) = port {
                new.rely.listen = vec![std::net::SocketAddr::from(([0, 0, 0, 0], port))];
            }
            // TLS certificates change live: the next handshakes present
            // what the files hold now.
            let sections = [
                ("rely", running.rely.tls.as_ref(), new.rely.tls.as_ref()),
                (
                    "websocket",
                    running.websocket.as_ref().and_then(|w| w.tls.as_ref()),
                    new.websocket.as_ref().and_then(|w| w.tls.as_ref()),
                ),
                (
                    "admin",
                    running.admin.as_ref().and_then(|a| a.tls.as_ref()),
                    new.admin.as_ref().and_then(|a| a.tls.as_ref()),
                ),
            ];
            for (name, old, now) in sections {
                if let (Some(old), Some(now)) = (old, now) {
                    match old.reload(&now.cert, &now.key) {
                        Ok(()) => log::info!(
                            "SIGHUP: {name} TLS certificate reloaded from {}",
                            now.cert.display()
                        ),
                        Err(e) => log::error!("SIGHUP: {name} TLS: {e}; the old certificate stays"),
                    }
                }
            }
            let changed = config_changes(running, &new);
            if changed.is_empty() {
                log::info!("SIGHUP: {} re-read, nothing changed", path.display());
            } else {
                log::warn!(
                    "SIGHUP: {} re-read; changed, and applied only after a restart: {}",
                    path.display(),
                    changed.join(", ")
                );
            }
        }
    }
}

/// The top-level sections that differ between two configurations.
fn config_changes(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            out.push(name);
        }
    };
    check(
        "workers",
        a.workers == b.workers && a.cpus == b.cpus && a.pin == b.pin,
    );
    check("rely", format!("{:?}", a.rely) == format!("{:?}", b.rely));
    check(
        "websocket",
        format!("{:?}", a.websocket) == format!("{:?}", b.websocket),
    );
    check(
        "admin",
        format!("{:?}", a.admin) == format!("{:?}", b.admin),
    );
    check(
        "sources",
        format!(
            "{:?}",
            a.sources
                .iter()
                .map(|s| (&s.url, &s.headers, s.websocket))
                .collect::<Vec<_>>()
        ) == format!(
            "{:?}",
            b.sources
                .iter()
                .map(|s| (&s.url, &s.headers, s.websocket))
                .collect::<Vec<_>>()
        ),
    );
    check(
        "veltix",
        format!("{:?}", a.veltix) == format!("{:?}", b.veltix),
    );
    check(
        "limits",
        a.max_connections == b.max_connections
            && a.max_memory == b.max_memory
            && a.send_timeout == b.send_timeout
            && a.shutdown_grace == b.shutdown_grace,
    );
    out
}

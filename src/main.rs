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
    // The command line's filter, if it chose one (RUST_LOG still wins).
    let level = match cli.verbose {
        0 => None,
        1 => Some("info".to_owned()),
        2 => Some("debug".to_owned()),
        _ => Some("trace".to_owned()),
    };
    // wsproxy's LOG_LEVEL applies when RUST_LOG is unset.
    let level = match std::env::var("LOG_LEVEL") {
        Ok(l) if cli.wsproxy && cli.verbose == 0 && !l.is_empty() => Some(l),
        _ => level,
    };
    match run(cli, level.as_deref()) {
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

fn run(cli: Cli, level: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
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
    corerelay::logging::init(
        level,
        cfg.log_level.as_deref(),
        cli.log_format.unwrap_or(cfg.log_format),
    );
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
    let (path, port, mut reloader) = (cli.config.clone(), cli.port, server.reloader());
    std::thread::Builder::new()
        .name("corerelay-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload(path.as_deref(), port, &mut reloader);
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
/// ignored; a valid one is applied live where it can be (see
/// `config::merge`), and what needs a restart is named. The server keeps
/// running and no connection drops either way.
fn reload(path: Option<&std::path::Path>, port: Option<u16>, reloader: &mut corerelay::Reloader) {
    let Some(path) = path else {
        log::warn!("SIGHUP: running on the embedded defaults, there is no file to re-read");
        return;
    };
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("SIGHUP: {e}; the running configuration is kept");
            return;
        }
    };
    if let Some(port) = port {
        new.rely.listen = vec![std::net::SocketAddr::from(([0, 0, 0, 0], port))];
    }
    // The level first, so the cores' lines about taking the new
    // configuration are written at it.
    if new.log_level != reloader.running().log_level {
        use corerelay::logging::{set_config_level, LevelChange};
        if set_config_level(new.log_level.as_deref()) == LevelChange::Pinned {
            log::warn!("SIGHUP: log_level changed, but RUST_LOG or -v chose the level; it stays");
        }
    }
    let report = reloader.apply(new);
    for (name, cert, err) in &report.tls {
        match err {
            None => log::info!(
                "SIGHUP: {name} TLS certificate reloaded from {}",
                cert.display()
            ),
            Some(e) => log::error!("SIGHUP: {name} TLS: {e}; the old certificate stays"),
        }
    }
    for (n, url) in &report.added {
        log::info!("SIGHUP: source {n} added: {url}");
    }
    for (n, addr) in &report.bound {
        log::info!("listening: source {n} websocket on {addr}");
    }
    for (n, url) in &report.removed {
        log::info!("SIGHUP: source {n} removed: {url} (its clients are closed)");
    }
    for (n, url) in &report.redialled {
        log::info!("SIGHUP: source {n} changed: dialling {url} again (its clients stay)");
    }
    for e in &report.errors {
        log::error!("SIGHUP: {e}");
    }
    for (core, why) in &report.failed {
        log::error!("SIGHUP: core {core} did not take the new configuration: {why}");
    }
    if report.applied.is_empty() && report.restart.is_empty() {
        log::info!("SIGHUP: {} re-read, nothing changed", path.display());
    }
    if !report.applied.is_empty() {
        log::info!(
            "SIGHUP: {} re-read; applied: {}",
            path.display(),
            report.applied.join(", ")
        );
    }
    if !report.restart.is_empty() {
        log::warn!(
            "SIGHUP: {} re-read; changed, and needs a restart (kept as running): {}",
            path.display(),
            report.restart.join(", ")
        );
    }
}

//! The `corerelay` binary: parse the CLI, load the config, start, wait for a
//! signal. All the work is in the library; `run` turns into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use corerelay::config::Config;
use corerelay::{sys, Server};

/// corerelay: a thread-per-core message relay (RELY, relayd-compatible).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// YAML config file (default: embedded defaults, RELY on 0.0.0.0:33333).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// More logging: -v info, -vv debug, -vvv trace (RUST_LOG wins).
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// RELY port on 0.0.0.0, like `python -m relayd 40000` (overrides the config's rely.listen).
    port: Option<u16>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn,corerelay=info",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corerelay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::defaults(),
    };
    if let Some(port) = cli.port {
        cfg.rely.listen = vec![std::net::SocketAddr::from(([0, 0, 0, 0], port))];
    }
    if cli.check_config {
        println!(
            "{}: ok",
            cli.config
                .as_ref()
                .map_or("<defaults>".into(), |p| p.display().to_string())
        );
        return Ok(());
    }

    let limit = sys::raise_file_limit();
    // Before anything accepts: the handler's self-pipe needs two file
    // descriptors, and a connection flood at start-up could otherwise take
    // the last ones and make the server exit (found by the EMFILE test).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
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
        Ok(l) => log::info!("file limit soft={} hard={}", l.soft, l.hard),
        Err(e) => log::warn!("cannot read or raise the file limit: {e}"),
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
    std::thread::Builder::new()
        .name("corerelay-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
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

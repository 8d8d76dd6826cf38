//! Autobahn fuzzingserver driver for corerelay's upstream WebSocket client.
//! usage: corerelay-autobahn-client ws://127.0.0.1:PORT
//!
//! For each case it starts corerelay in-process with one source pointed at
//! `/runCase?case=N&agent=relay` and `echo_upstream: true` (every message
//! from the source goes back to it), waits until that connection is over
//! (the source's first reconnect attempt), and stops the server. The suite
//! thus exercises the real engine path: non-blocking connect, upgrade,
//! client-mode framing, close handshake.

use std::time::{Duration, Instant};

use corerelay::config::Config;
use corerelay::Server;

fn main() {
    let base = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:9001".into());
    let count = case_count(&base).unwrap_or_else(|e| {
        eprintln!("corerelay-autobahn-client: getCaseCount: {e}");
        std::process::exit(1)
    });
    eprintln!("corerelay-autobahn-client: {count} cases");
    for case in 1..=count {
        if let Err(e) = run_case(&base, case) {
            eprintln!("case {case}: {e}");
        }
    }
    if let Err(e) = tungstenite::connect(format!("{base}/updateReports?agent=relay"))
        .map(|(mut ws, _)| ws.close(None))
    {
        eprintln!("corerelay-autobahn-client: updateReports: {e}");
        std::process::exit(1);
    }
}

fn case_count(base: &str) -> Result<u32, Box<dyn std::error::Error>> {
    let (mut ws, _) = tungstenite::connect(format!("{base}/getCaseCount"))?;
    let msg = ws.read()?;
    Ok(msg.to_text()?.trim().parse()?)
}

fn run_case(base: &str, case: u32) -> Result<(), Box<dyn std::error::Error>> {
    let sock =
        std::env::temp_dir().join(format!("corerelay-ab-{}-{case}.sock", std::process::id()));
    // CORERELAY_AUTOBAHN_COMPRESSION=1: the source offers permessage-deflate.
    let compression = std::env::var_os("CORERELAY_AUTOBAHN_COMPRESSION").is_some();
    let yaml = format!(
        "workers: 1\npin: false\nrely:\n  listen: []\nsources:\n  - url: \"{base}/runCase?case={case}&agent=relay\"\n    echo_upstream: true\n    compression: {compression}\n    unix_socket_path: \"{}\"\n    max_message_size: 16MiB\n    connect_timeout: 10s\nperformance:\n  reconnect_delay: 60s\n",
        sock.display()
    );
    let cfg = Config::from_yaml(&yaml, None)?;
    let server = Server::start(cfg)?;
    // The case is over when the source's connection ends (bounded).
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.metrics().source_reconnects == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(server);
    Ok(())
}

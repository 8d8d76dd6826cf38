//! Interactive RELY chat client, like relayd's `client.py`: type a line and
//! press Enter to send it to `--to-client-id`; `/quit` or `/exit` leaves.
//! Heartbeats keep the login alive while idle.

use std::io::{self, BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use clap::Parser;
use corerelay::client::rely::RelyClient;

/// Interactive RELY chat client.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Relay host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Relay port.
    #[arg(long, default_value_t = 33333)]
    port: u16,
    /// Our id (1..=255 bytes).
    #[arg(long)]
    client_id: String,
    /// Peer id to send to.
    #[arg(long)]
    to_client_id: String,
    /// Seconds between heartbeats while idle (the server's default idle
    /// timeout is 120 s).
    #[arg(long, default_value_t = 15)]
    heartbeat: u64,
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(a) {
        eprintln!("corerelay-chat: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> io::Result<()> {
    let client = RelyClient::connect((a.host.as_str(), a.port), a.client_id.as_bytes())?;
    println!(
        "connected to {}:{} as {:?}; sending to {:?}. /quit to leave.",
        a.host, a.port, a.client_id, a.to_client_id
    );
    let (mut reader, mut writer) = client.split();

    // Receiver thread: print what arrives; tell main when the relay closes.
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || loop {
        match reader.recv(None) {
            Ok(Some(m)) => {
                println!(
                    "[{}] {}",
                    String::from_utf8_lossy(&m.from),
                    String::from_utf8_lossy(&m.payload)
                );
                let _ = io::stdout().flush();
            }
            Ok(None) => {}
            Err(_) => {
                println!("connection closed by relay");
                let _ = closed_tx.send(());
                return;
            }
        }
    });

    // Stdin thread: lines into a channel, so main can heartbeat while idle.
    let (line_tx, line_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    let to = a.to_client_id.into_bytes();
    let beat = Duration::from_secs(a.heartbeat.max(1));
    loop {
        if closed_rx.try_recv().is_ok() {
            return Ok(());
        }
        match line_rx.recv_timeout(beat) {
            Ok(line) => {
                let t = line.trim();
                if t == "/quit" || t == "/exit" {
                    return Ok(());
                }
                if !line.is_empty() {
                    writer.send(&to, line.as_bytes())?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => writer.heartbeat()?,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

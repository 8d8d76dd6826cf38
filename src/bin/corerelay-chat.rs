//! Interactive chat client. RELY (like relayd's `client.py`): type a line
//! and press Enter to send it to `--to-client-id`; heartbeats keep the
//! login alive while idle. `--veltix 3` (or `1`): the Veltix README's chat,
//! on a corerelay Veltix hub: every line goes to the hub's other clients.
//! `/quit` or `/exit` leaves.

use std::io::{self, BufRead, Write};
use std::sync::mpsc;
use std::time::Duration;

use clap::Parser;
use corerelay::client::rely::RelyClient;
use corerelay::client::veltix::{Builder, ClientError, Version};

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
    /// Our id (1..=255 bytes; RELY).
    #[arg(long, required_unless_present = "veltix")]
    client_id: Option<String>,
    /// Peer id to send to (RELY).
    #[arg(long, required_unless_present = "veltix")]
    to_client_id: Option<String>,
    /// Speak Veltix (version 1 or 3) to a Veltix hub instead of RELY.
    #[arg(long, value_parser = ["1", "3"])]
    veltix: Option<String>,
    /// Veltix: the message type code of chat lines.
    #[arg(long, default_value_t = 200)]
    veltix_type: u16,
    /// Seconds between heartbeats while idle (the server's default idle
    /// timeout is 120 s).
    #[arg(long, default_value_t = 15)]
    heartbeat: u64,
}

fn main() {
    let a = Args::parse();
    let r = match a.veltix.as_deref() {
        Some(v) => veltix_chat(&a, v).map_err(|e| io::Error::other(e.to_string())),
        None => run(a),
    };
    if let Err(e) = r {
        eprintln!("corerelay-chat: {e}");
        std::process::exit(1);
    }
}

/// Lines from stdin, on a channel (so the caller can do other work).
fn stdin_lines() -> mpsc::Receiver<String> {
    let (line_tx, line_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    line_rx
}

/// The Veltix README's chat: lines go to the hub, the hub's lines print.
fn veltix_chat(a: &Args, v: &str) -> Result<(), ClientError> {
    let version = if v == "1" { Version::V1 } else { Version::V3 };
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let client = Builder::new(format!("{}:{}", a.host, a.port), version)
        .on_recv(|m| {
            println!("[type {}] {}", m.ty, String::from_utf8_lossy(&m.content));
            let _ = io::stdout().flush();
        })
        .on_disconnect(move || {
            println!("connection closed by the server");
            let _ = closed_tx.send(());
        })
        .connect()?;
    println!(
        "connected to the Veltix hub at {}:{} (v{v}). /quit to leave.",
        a.host, a.port
    );
    let lines = stdin_lines();
    loop {
        if closed_rx.try_recv().is_ok() {
            return Ok(());
        }
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let t = line.trim();
                if t == "/quit" || t == "/exit" {
                    return Ok(());
                }
                if !line.is_empty() {
                    client.send(a.veltix_type, line.as_bytes())?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

fn run(a: Args) -> io::Result<()> {
    let (Some(client_id), Some(to_client_id)) = (a.client_id, a.to_client_id) else {
        return Err(io::Error::other(
            "--client-id and --to-client-id are required",
        ));
    };
    let client = RelyClient::connect((a.host.as_str(), a.port), client_id.as_bytes())?;
    println!(
        "connected to {}:{} as {:?}; sending to {:?}. /quit to leave.",
        a.host, a.port, client_id, to_client_id
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

    // Lines arrive on a channel, so main can heartbeat while idle.
    let line_rx = stdin_lines();
    let to = to_client_id.into_bytes();
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

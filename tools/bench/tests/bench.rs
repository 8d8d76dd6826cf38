//! The load tool measures what it claims: checked against servers whose
//! behaviour the test controls.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corerelay::protocol::rely::{Decoder, Frame};

const BENCH: &str = env!("CARGO_BIN_EXE_corerelay-bench");

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BENCH)
        .args(args)
        .output()
        .expect("run corerelay-bench");
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or("")
        .to_owned();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[test]
fn json_holds_every_field() {
    let v = run_json(&[
        "pingpong",
        "--inproc",
        "1",
        "--warmup",
        "0.2",
        "--duration",
        "0.3",
        "--json",
    ]);
    for k in [
        "version",
        "machine",
        "mode",
        "proto",
        "pairs",
        "payload",
        "seconds",
        "messages",
        "msgs_per_s",
        "server_cpu_s",
        "server_ns_per_msg",
        "client_cpu_s",
        "rtt_us",
    ] {
        assert!(!v[k].is_null(), "field {k} in {v}");
    }
    for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(
            v["rtt_us"][k].as_f64().is_some_and(|x| x > 0.0),
            "rtt_us.{k} in {v}"
        );
    }
    assert!(v["machine"]["cpus"].as_u64().is_some_and(|n| n >= 1));
    assert!(v["messages"].as_u64().is_some_and(|n| n > 0));
    let v = run_json(&[
        "ws-fanout",
        "--inproc",
        "1",
        "--subs",
        "5",
        "--warmup",
        "0.2",
        "--duration",
        "0.3",
        "--json",
    ]);
    for k in [
        "version",
        "machine",
        "subs",
        "published",
        "delivered",
        "deliveries_per_s",
        "gaps",
        "dups",
        "latency_us",
    ] {
        assert!(!v[k].is_null(), "field {k} in {v}");
    }
    for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
        assert!(
            v["latency_us"][k].as_f64().is_some(),
            "latency_us.{k} in {v}"
        );
    }
    let sf = run_json(&[
        "source-fanout",
        "--inproc",
        "1",
        "--subs",
        "4",
        "--unix-subs",
        "2",
        "--warmup",
        "0.2",
        "--duration",
        "0.3",
        "--json",
    ]);
    for k in [
        "ws_subs",
        "unix_subs",
        "delivered",
        "deliveries_per_s",
        "gaps",
        "server_ns_per_delivery",
        "latency_us",
    ] {
        assert!(!sf[k].is_null(), "field {k} in {sf}");
    }
    assert_eq!(sf["gaps"].as_u64(), Some(0));
    assert_eq!(
        (v["gaps"].as_u64(), v["dups"].as_u64()),
        (Some(0), Some(0)),
        "corerelay neither drops nor repeats"
    );
}

/// A RELY relay that holds every frame 5 ms before forwarding it.
fn slow_relay(delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peers: Arc<Mutex<HashMap<Vec<u8>, TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut d = Decoder::new();
                let mut buf = [0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                    let _ = d.feed(&buf[..n], u32::MAX, |f| {
                        match f {
                            Frame::Login { id } => {
                                if let Ok(c) = s.try_clone() {
                                    peers.lock().unwrap().insert(id.to_vec(), c);
                                }
                            }
                            Frame::Transfer { to, raw, .. } => {
                                out.push((to.to_vec(), raw.to_vec()))
                            }
                        }
                        true
                    });
                    for (to, raw) in out {
                        std::thread::sleep(delay);
                        if let Some(p) = peers.lock().unwrap().get_mut(&to) {
                            let _ = p.write_all(&raw);
                        }
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn reported_latency_matches_an_injected_delay() {
    // Each round trip crosses the relay twice: at least 10 ms.
    let addr = slow_relay(Duration::from_millis(5)).to_string();
    let v = run_json(&[
        "pingpong",
        "--target",
        &addr,
        "--pairs",
        "1",
        "--warmup",
        "0.3",
        "--duration",
        "1",
        "--json",
    ]);
    let p50 = v["rtt_us"]["p50"].as_f64().unwrap();
    assert!(
        (10_000.0..25_000.0).contains(&p50),
        "p50 {p50} us for 2 x 5 ms"
    );
    let n = v["messages"].as_u64().unwrap();
    // ~1 s / ~10 ms per round trip, 2 messages each.
    assert!((60..=220).contains(&n), "{n} messages");
}

#[test]
fn csv_compare_and_plot() {
    let dir = std::env::temp_dir().join(format!("corerelay-benchout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BENCH)
        .args([
            "rely-pingpong",
            "--inproc",
            "1",
            "--warmup",
            "0.1",
            "--duration",
            "0.3",
            "--csv",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "header and row: {text}");
    assert_eq!(lines[0].split(',').count(), lines[1].split(',').count());
    assert!(lines[0].contains("rtt_us.p99"));
    // Two runs as JSON, compared.
    let (a, b, svg) = (dir.join("a.json"), dir.join("b.json"), dir.join("rtt.svg"));
    for (p, extra) in [(&a, None), (&b, Some(svg.to_str().unwrap()))] {
        let mut args = vec![
            "pingpong",
            "--inproc",
            "1",
            "--warmup",
            "0.1",
            "--duration",
            "0.3",
            "--json",
        ];
        if let Some(svg) = extra {
            args.extend(["--plot", svg]);
        }
        let o = Command::new(BENCH).args(&args).output().unwrap();
        std::fs::write(p, &o.stdout).unwrap();
    }
    let o = Command::new(BENCH)
        .arg("--compare")
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let cmp = String::from_utf8_lossy(&o.stdout);
    let line = cmp
        .lines()
        .find(|l| l.starts_with("payload"))
        .expect("payload compared");
    assert!(line.trim_end().ends_with("1.000"), "{line}");
    assert!(cmp.lines().any(|l| l.starts_with("rtt_us.p50")), "{cmp}");
    let svg = std::fs::read_to_string(&svg).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("round trip"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A fake broadcast server: every subscriber gets the same scripted
/// sequence, with 3 messages dropped and 2 repeated on purpose.
#[test]
fn gaps_and_duplicates_counted_exactly_against_a_lossy_server() {
    use tungstenite::Message;
    const SUBS: usize = 3;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    // Sequence: 0..=99 without 10, 11, 50; 20 sent twice; 30 again after 31.
    let mut script: Vec<u64> = (0..=99).filter(|s| ![10, 11, 50].contains(s)).collect();
    let i20 = script.iter().position(|&s| s == 20).unwrap();
    script.insert(i20 + 1, 20);
    let i31 = script.iter().position(|&s| s == 31).unwrap();
    script.insert(i31 + 1, 30);
    std::thread::spawn(move || {
        let mut subs = Vec::new();
        for s in l.incoming().flatten() {
            let path = Arc::new(Mutex::new(String::new()));
            let p = path.clone();
            #[allow(clippy::result_large_err)]
            let cb = move |req: &tungstenite::handshake::server::Request, resp| {
                *p.lock().unwrap() = req.uri().path().to_owned();
                Ok(resp)
            };
            let Ok(ws) = tungstenite::accept_hdr(s, cb) else {
                continue;
            };
            if path.lock().unwrap().contains("publisher") {
                // Everyone is in: play the script to each subscriber.
                for sub in subs.iter_mut() {
                    for seq in &script {
                        let mut p = vec![0u8; 64];
                        p[..8].copy_from_slice(&seq.to_le_bytes());
                        let _ = tungstenite::WebSocket::send(sub, Message::Binary(p.into()));
                    }
                }
                // Keep the publisher's socket open (its messages are ignored).
                std::thread::spawn(move || {
                    let mut ws = ws;
                    while ws.read().is_ok() {}
                });
            } else {
                subs.push(ws);
            }
        }
    });
    let target = addr.to_string();
    let v = run_json(&[
        "ws-fanout",
        "--ws-target",
        &target,
        "--subs",
        &SUBS.to_string(),
        "--warmup",
        "0.3",
        "--duration",
        "0.5",
        "--json",
    ]);
    assert_eq!(v["gaps"].as_u64(), Some(3 * SUBS as u64), "{v}");
    assert_eq!(v["dups"].as_u64(), Some(2 * SUBS as u64), "{v}");
}

/// The stream mode's single driver thread moves messages for many pairs
/// and reports the server's CPU per message; with --rate it keeps the rate
/// (the window does not run ahead of the schedule).
#[test]
fn stream_from_one_thread_moves_messages_and_keeps_the_rate() {
    let v = run_json(&[
        "stream",
        "--inproc",
        "1",
        "--pairs",
        "20",
        "--window",
        "64",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--json",
    ]);
    assert!(v["messages"].as_u64().is_some_and(|n| n > 1000), "{v}");
    assert!(
        v["server_ns_per_msg"].as_f64().is_some_and(|x| x > 0.0),
        "{v}"
    );
    // Paced: --rate is kept, not exceeded by the window.
    let v = run_json(&[
        "stream",
        "--inproc",
        "1",
        "--pairs",
        "4",
        "--rate",
        "2000",
        "--warmup",
        "0.2",
        "--duration",
        "1",
        "--json",
    ]);
    let rate = v["msgs_per_s"].as_f64().unwrap_or(0.0);
    assert!((1000.0..3000.0).contains(&rate), "paced at 2000/s: {v}");
}

/// The floor relay is a correct relay: the fan-out run against it sees
/// every message at every subscriber, once, and its echo answers.
#[test]
fn the_floor_relays_every_message_once() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(BENCH)
        .args(["floor", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let floor = Kill(child);
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(
            out.read(&mut b).unwrap(),
            1,
            "the floor says where it listens"
        );
        line.push(b[0]);
    }
    let addr = String::from_utf8(line).unwrap();
    let addr = addr.trim().trim_start_matches("listening on ").to_owned();
    let pid = floor.0.id().to_string();
    let v = run_json(&[
        "ws-fanout",
        "--ws-target",
        &addr,
        "--pid",
        &pid,
        "--subs",
        "20",
        "--warmup",
        "0.2",
        "--duration",
        "0.5",
        "--json",
    ]);
    assert!(v["delivered"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert_eq!(
        (v["gaps"].as_u64(), v["dups"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    let e = run_json(&[
        "ws-echo",
        "--ws-target",
        &addr,
        "--target",
        &addr,
        "--clients",
        "2",
        "--warmup",
        "0.2",
        "--duration",
        "0.3",
        "--json",
    ]);
    assert!(
        e["round_trips_per_s"].as_f64().is_some_and(|x| x > 0.0),
        "{e}"
    );
}

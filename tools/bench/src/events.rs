//! The `events` mode: `--subs` WebSocket connections on a wsgateway-style
//! endpoint each send messages (at most `--window` in flight in all), and
//! a reader XREADs the stream they become (`--redis`, its CPU by
//! `--redis-pid`): events/s, server CPU per event next to redis-server's,
//! and the latency from a client's send to the entry being readable.
//! With `--amqp URL` the in-process server publishes them to that broker
//! (a durable exchange and queue of the bench's own, persistent messages,
//! as wsgateway's sample config has it), and an event counts once the
//! broker confirms it (`amqp_confirmed`); the broker's CPU comes from
//! `--broker-pid`. No latency is measured then.
//!
//! Payloads carry a sequence number and the send time in their first 16
//! bytes (binary messages).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corerelay::config::Config;
use corerelay::protocol::resp::{self, Value};
use corerelay::Server;
use hdrhistogram::Histogram;

use crate::{exit_err, report, self_cpu, server_cpu, stat_cpu, Args};

fn connect(ws: SocketAddr) -> TcpStream {
    crate::ws::upgrade(ws, "/connect", "").unwrap_or_else(|e| exit_err("upgrade", e))
}

/// A masked binary frame carrying `seq` and the send time.
fn frame(seq: u64, epoch: Instant, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(16));
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    p.resize(size.max(16), b'x');
    let mut v = Vec::with_capacity(p.len() + 14);
    crate::ws::masked_frame(&mut v, 0x2, &p);
    v
}

/// The `message` field of each message entry in an XREAD reply, and the
/// last entry id.
fn entries(v: &Value<'_>, out: &mut Vec<Vec<u8>>, last: &mut Vec<u8>) {
    let Value::Array(streams) = v else { return };
    for s in streams {
        let Value::Array(kv) = s else { continue };
        let Some(Value::Array(es)) = kv.get(1) else {
            continue;
        };
        for e in es {
            let Value::Array(parts) = e else { continue };
            if let Some(id) = parts.first().and_then(Value::bytes) {
                *last = id.to_vec();
            }
            let Some(Value::Array(fields)) = parts.get(1) else {
                continue;
            };
            let mut action = None;
            let mut msg = None;
            for f in fields.chunks(2) {
                match (f[0].bytes(), f.get(1).and_then(Value::bytes)) {
                    (Some(b"action"), Some(a)) => action = Some(a),
                    (Some(b"message"), Some(m)) => msg = Some(m),
                    _ => {}
                }
            }
            if let (Some(b"message"), Some(m)) = (action, msg) {
                out.push(m.to_vec());
            }
        }
    }
}

/// The events mode.
pub fn run(a: &Args) {
    let epoch = Instant::now();
    let stream = format!("bench-events-{}", std::process::id());
    if a.amqp.is_some() && a.inproc.is_none() {
        exit_err(
            "events",
            "--amqp needs --inproc (the rate is the server's confirmed count)",
        );
    }
    let sink = match &a.amqp {
        Some(url) => format!(
            "events:\n  amqp:\n    url: \"{url}\"\n    exchange: \"{stream}\"\n    queue: \"{stream}\"\n    max_pending_bytes: 256MiB\n"
        ),
        None => format!(
            "events:\n  redis:\n    url: \"redis://{}\"\n    max_pending_bytes: 256MiB\n  stream_name: \"{stream}\"\n",
            a.redis
        ),
    };
    let server = a.inproc.map(|w| {
        let yaml = format!(
            "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  ping_interval: 0\n  endpoints:\n    - path: /connect\n      set_tags: {{app: bench}}\n      stream_include_tags: [app]\nadmin:\n  listen: []\n{sink}"
        );
        let mut cfg = Config::from_yaml(&yaml, None).unwrap_or_else(|e| exit_err("config", e));
        cfg.workers = w;
        cfg.busy_poll = a.busy_poll;
        Server::start(cfg).unwrap_or_else(|e| exit_err("start", e))
    });
    let ws = server.as_ref().map_or(a.ws_target, |s| s.ws_addrs()[0]);
    if let (Some(s), Some(_)) = (&server, &a.amqp) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.metrics().amqp_up < w_of(a) {
            if Instant::now() > deadline {
                exit_err("amqp", "the server did not connect to the broker");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let confirmed =
        |s: &Option<corerelay::ServerHandle>| s.as_ref().map_or(0, |s| s.metrics().amqp_confirmed);
    let mut socks: Vec<TcpStream> = (0..a.subs.max(1)).map(|_| connect(ws)).collect();
    // The reader: XREAD from the stream's end, blocking 100 ms at a time.
    let received = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
    ));
    let reader = (a.amqp.is_none()).then(|| {
        let (received, measuring, stop, hist) = (
            received.clone(),
            measuring.clone(),
            stop.clone(),
            hist.clone(),
        );
        let (redis, stream) = (a.redis, stream.clone());
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(redis).unwrap_or_else(|e| exit_err("redis", e));
            let mut last = b"0-0".to_vec();
            let mut buf = Vec::new();
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
            let mut msgs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut out = Vec::new();
                resp::encode(
                    &mut out,
                    &[
                        b"XREAD",
                        b"COUNT",
                        b"5000",
                        b"BLOCK",
                        b"100",
                        b"STREAMS",
                        stream.as_bytes(),
                        &last,
                    ],
                );
                if s.write_all(&out).is_err() {
                    break;
                }
                let reply = loop {
                    if let Ok(Some((v, n))) = resp::decode(&buf, usize::MAX) {
                        msgs.clear();
                        entries(&v, &mut msgs, &mut last);
                        buf.drain(..n);
                        break true;
                    }
                    let mut b = [0u8; 65536];
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => break false,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                };
                if !reply {
                    break;
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let measure = measuring.load(Ordering::Relaxed);
                for m in &msgs {
                    if m.len() >= 16 && measure {
                        let sent = u64::from_le_bytes(m[8..16].try_into().unwrap_or_default());
                        let _ = local.record(now.saturating_sub(sent).max(1));
                    }
                }
                received.fetch_add(msgs.len() as u64, Ordering::Relaxed);
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
        })
    });
    // With AMQP the broker's confirms are the count (the open events
    // confirmed before measuring are left out by `r0`).
    let got_now = |received: &AtomicU64| {
        if a.amqp.is_some() {
            confirmed(&server)
        } else {
            received.load(Ordering::Relaxed)
        }
    };
    let backend_pid = a.broker_pid.or(a.redis_pid);
    // The open events are confirmed before sending starts.
    let opens = if a.amqp.is_some() {
        socks.len() as u64
    } else {
        0
    };
    if a.amqp.is_some() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while confirmed(&server) < opens && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let measure_from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let window = a.window.max(1);
    let (mut seq, mut cpu0, mut rcpu0, mut ccpu0, mut r0) = (0u64, None, None, 0.0, 0);
    let n = socks.len();
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= measure_from {
            cpu0 = Some(server_cpu(a.pid, server.is_some()).unwrap_or(0.0));
            rcpu0 = backend_pid.and_then(|p| stat_cpu(&format!("/proc/{p}/stat")));
            ccpu0 = self_cpu();
            r0 = got_now(&received);
            measuring.store(true, Ordering::Relaxed);
        }
        if now >= end {
            break;
        }
        while (seq + opens).saturating_sub(got_now(&received)) >= window && Instant::now() < end {
            std::hint::spin_loop();
        }
        let f = frame(seq, epoch, a.payload);
        if socks[(seq % n as u64) as usize].write_all(&f).is_err() {
            exit_err("send", "connection closed");
        }
        seq += 1;
    }
    measuring.store(false, Ordering::Relaxed);
    let got = got_now(&received) - r0;
    let srv = cpu0.and_then(|c0| server_cpu(a.pid, server.is_some()).map(|c| c - c0));
    let rcpu = rcpu0.and_then(|c0| {
        backend_pid
            .and_then(|p| stat_cpu(&format!("/proc/{p}/stat")))
            .map(|c| c - c0)
    });
    let client = self_cpu() - ccpu0;
    stop.store(true, Ordering::Relaxed);
    if let Some(r) = reader {
        let _ = r.join();
    }
    let h = hist.lock().map(|h| h.clone()).ok();
    report(
        a,
        "events",
        a.duration,
        got,
        (srv, None),
        client,
        h.as_ref(),
    );
    if let Some(rc) = rcpu {
        let who = if a.amqp.is_some() {
            "broker"
        } else {
            "redis-server"
        };
        let line = format!(
            "{who} cpu {rc:.2}s = {:.0} ns/event",
            rc * 1e9 / got.max(1) as f64
        );
        if a.json || a.csv {
            eprintln!("{line}");
        } else {
            println!("  {line}");
        }
    }
    // The stream is the bench's own: leave Redis as it was.
    if a.amqp.is_some() {
        drop(socks.drain(..));
        return;
    }
    if let Ok(mut s) = TcpStream::connect(a.redis) {
        let mut out = Vec::new();
        resp::encode(&mut out, &[b"DEL", stream.as_bytes()]);
        let _ = s.write_all(&out);
        let _ = s.read(&mut [0u8; 64]);
    }
    drop(socks.drain(..));
}

/// The in-process worker count (every core connects to the broker).
fn w_of(a: &Args) -> u64 {
    a.inproc.unwrap_or(1) as u64
}

//! The `wsproxy` mode: `--subs` sessions, each one WebSocket socket on
//! `/{agent}/ws/{id}`, and one publisher on `session:{id}:down` (round
//! robin), through a redis-server the user runs (`--redis`, its CPU by
//! `--redis-pid`). With `--proto redis` the same publisher feeds plain
//! Redis subscribers instead: the floor corerelay sits on. `--window 1`
//! measures PUBLISH-to-receive latency, a larger window the rate. `--up`
//! measures the other way: every session sends JSON text and one Redis
//! subscriber (PSUBSCRIBE) counts what arrives on `session:*:up`.
//!
//! Payloads carry a sequence number and the send time in their first 16
//! bytes (so they travel as binary frames: not UTF-8).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use corerelay::config::Config;
use corerelay::protocol::resp;
use corerelay::Server;

use crate::ws::{readers, Client};

use crate::{exit_err, report, self_cpu, server_cpu, stat_cpu, Args, Proto};

/// The in-process server (`--inproc`): one session endpoint, no auth (the
/// steady state is measured, not connects).
fn inproc_config(redis: SocketAddr, workers: usize, busy: bool) -> Config {
    let yaml = format!(
        "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  ping_interval: 0\n  max_output_bytes: 64MiB\n  endpoints:\n    - path: /{{agent}}/ws/{{session_id}}\n      wsproxy: {{auth: false}}\nadmin:\n  listen: []\nredis:\n  url: \"redis://{redis}\"\n  max_pending_bytes: 256MiB\n"
    );
    let mut cfg = Config::from_yaml(&yaml, None).unwrap_or_else(|e| exit_err("config", e));
    cfg.workers = workers;
    cfg.busy_poll = busy;
    cfg
}

fn resp_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| exit_err(&format!("redis {addr}"), e));
    let _ = s.set_nodelay(true);
    s
}

/// Reads one whole reply (blocking), for setup steps.
fn resp_read(s: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    loop {
        if let Ok(Some((_, n))) = resp::decode(buf, usize::MAX) {
            return buf.drain(..n).collect();
        }
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) | Err(_) => exit_err("redis", "connection closed"),
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// A payload: sequence, send time (ns since `epoch`), padding.
fn payload(seq: u64, epoch: Instant, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(16));
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    p.resize(size.max(16), b'x');
    p
}

/// A session socket on `/bench/ws/{id}`.
fn session(ws: SocketAddr, id: &str) -> TcpStream {
    crate::ws::upgrade(
        ws,
        &format!("/bench/ws/{id}"),
        "Authorization: Bearer bench\r\n",
    )
    .unwrap_or_else(|e| exit_err("upgrade", e))
}

/// The wsproxy mode.
pub fn run(a: &Args) {
    let epoch = Instant::now();
    let floor = a.proto == Proto::Redis && !a.up;
    let server = a.inproc.filter(|_| !floor).map(|w| {
        Server::start(inproc_config(a.redis, w, a.busy_poll))
            .unwrap_or_else(|e| exit_err("start", e))
    });
    let ws = server.as_ref().map_or(a.ws_target, |s| s.ws_addrs()[0]);
    if let Some(s) = &server {
        // Every core's Redis is up before sessions come.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.metrics().redis_sub_up < s.config().workers as u64 {
            if Instant::now() > deadline {
                exit_err("redis", format!("not connected to {}", a.redis));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let n = a.subs.max(1);
    let ids: Vec<String> = (0..n)
        .map(|i| format!("b{}-{i}", std::process::id()))
        .collect();
    if a.up {
        return up(a, ws, &ids, server.is_some(), epoch);
    }
    // Receivers: session sockets, or plain subscribers (the floor).
    let mut rxs = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    for id in &ids {
        let ch = format!("session:{id}:down");
        let s = if a.proto == Proto::Redis {
            let mut s = resp_connect(a.redis);
            let mut out = Vec::new();
            resp::encode(&mut out, &[b"SUBSCRIBE", ch.as_bytes()]);
            s.write_all(&out)
                .unwrap_or_else(|e| exit_err("subscribe", e));
            resp_read(&mut s, &mut Vec::new());
            s
        } else {
            session(ws, id)
        };
        s.set_nonblocking(true)
            .unwrap_or_else(|e| exit_err("nonblocking", e));
        let s = mio::net::TcpStream::from_std(s);
        rxs.push(if a.proto == Proto::Redis {
            Client::Resp(s)
        } else {
            Client::Ws(s)
        });
        channels.push(ch);
    }
    let r = readers(epoch, rxs).unwrap_or_else(|e| exit_err("readers", e));
    // The publisher: PUBLISH in batches, at most --window undelivered.
    let mut p = resp_connect(a.redis);
    let mut pbuf = Vec::new();
    let (mut seq, mut out) = (0u64, Vec::new());
    let window = a.window.max(1);
    let batch = (a.batch as u64).clamp(1, window) as usize;
    let measure_from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let (mut cpu0, mut rcpu0, mut ccpu0, mut d0) = (None, None, 0.0, 0);
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= measure_from {
            cpu0 = Some(server_cpu(a.pid, server.is_some()).unwrap_or(0.0));
            rcpu0 = a
                .redis_pid
                .and_then(|p| stat_cpu(&format!("/proc/{p}/stat")));
            ccpu0 = self_cpu();
            d0 = r.delivered.load(Ordering::Relaxed);
            r.measuring.store(true, Ordering::Relaxed);
        }
        if now >= end {
            break;
        }
        // Closed loop: wait for room in the window (bounded by the clock).
        while seq - r.delivered.load(Ordering::Relaxed) + batch as u64 > window
            && Instant::now() < end
        {
            std::hint::spin_loop();
        }
        out.clear();
        for _ in 0..batch {
            let ch = &channels[(seq % n as u64) as usize];
            let pl = payload(seq, epoch, a.payload);
            resp::encode(&mut out, &[b"PUBLISH", ch.as_bytes(), &pl]);
            seq += 1;
        }
        p.write_all(&out).unwrap_or_else(|e| exit_err("publish", e));
        for _ in 0..batch {
            resp_read(&mut p, &mut pbuf);
        }
    }
    r.measuring.store(false, Ordering::Relaxed);
    let delivered = r.delivered.load(Ordering::Relaxed) - d0;
    let srv = cpu0.and_then(|c0| server_cpu(a.pid, server.is_some()).map(|c| c - c0));
    let rcpu = rcpu0.and_then(|c0| {
        a.redis_pid
            .and_then(|p| stat_cpu(&format!("/proc/{p}/stat")))
            .map(|c| c - c0)
    });
    let client = self_cpu() - ccpu0;
    r.stop.store(true, Ordering::Relaxed);
    let _ = r.thread.join();
    let h = r.hist.lock().map(|h| h.clone()).ok();
    report(
        a,
        "wsproxy",
        a.duration,
        delivered,
        (srv, None),
        client,
        h.as_ref(),
    );
    if let Some(rc) = rcpu {
        let line = format!(
            "redis-server cpu {rc:.2}s = {:.0} ns/delivery",
            rc * 1e9 / delivered.max(1) as f64
        );
        if a.json || a.csv {
            eprintln!("{line}");
        } else {
            println!("  {line}");
        }
    }
}

/// `--up`: every session sends JSON text (at most --window in flight in
/// all); one PSUBSCRIBE reader counts arrivals on `session:*:up`.
fn up(a: &Args, ws: SocketAddr, ids: &[String], inproc: bool, epoch: Instant) {
    let mut sub = resp_connect(a.redis);
    let mut o = Vec::new();
    resp::encode(&mut o, &[b"PSUBSCRIBE", b"session:*:up"]);
    sub.write_all(&o)
        .unwrap_or_else(|e| exit_err("psubscribe", e));
    resp_read(&mut sub, &mut Vec::new());
    sub.set_nonblocking(true)
        .unwrap_or_else(|e| exit_err("nonblocking", e));
    let mut socks: Vec<TcpStream> = ids.iter().map(|id| session(ws, id)).collect();
    let r = readers(
        epoch,
        vec![Client::Resp(mio::net::TcpStream::from_std(sub))],
    )
    .unwrap_or_else(|e| exit_err("readers", e));
    let measure_from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let window = a.window.max(1);
    let (mut seq, mut cpu0, mut ccpu0, mut d0) = (0u64, None, 0.0, 0);
    let mut frame = Vec::new();
    loop {
        let now = Instant::now();
        if cpu0.is_none() && now >= measure_from {
            cpu0 = Some(server_cpu(a.pid, inproc).unwrap_or(0.0));
            ccpu0 = self_cpu();
            d0 = r.delivered.load(Ordering::Relaxed);
            r.measuring.store(true, Ordering::Relaxed);
        }
        if now >= end {
            break;
        }
        while seq - r.delivered.load(Ordering::Relaxed) >= window && Instant::now() < end {
            std::hint::spin_loop();
        }
        let i = (seq % ids.len() as u64) as usize;
        let body = json_payload(seq, epoch, a.payload);
        frame.clear();
        crate::ws::masked_frame(&mut frame, 0x1, &body);
        if socks[i].write_all(&frame).is_err() {
            exit_err("send", "session socket closed");
        }
        seq += 1;
    }
    r.measuring.store(false, Ordering::Relaxed);
    let delivered = r.delivered.load(Ordering::Relaxed) - d0;
    let srv = cpu0.and_then(|c0| server_cpu(a.pid, inproc).map(|c| c - c0));
    let client = self_cpu() - ccpu0;
    r.stop.store(true, Ordering::Relaxed);
    let _ = r.thread.join();
    report(
        a,
        "wsproxy-up",
        a.duration,
        delivered,
        (srv, None),
        client,
        None,
    );
}

/// A JSON text message of the requested size (the up path counts
/// arrivals; it does not time them).
fn json_payload(_seq: u64, _epoch: Instant, size: usize) -> Vec<u8> {
    let mut p = b"{\"p\":\"".to_vec();
    while p.len() + 2 < size.max(16) {
        p.push(b'x');
    }
    p.extend_from_slice(b"\"}");
    p
}

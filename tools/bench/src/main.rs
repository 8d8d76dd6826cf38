//! corerelay-bench: load generator for corerelay and, on the same work, a
//! redis-server pub/sub baseline (each client subscribes to a channel named
//! by its id and publishes to its peer's).
//!
//! Modes:
//! - `pingpong`: P pairs, one message in flight per pair, round-trip
//!   percentiles (HdrHistogram).
//! - `stream`: P pairs, each sender keeps up to `--window` messages in
//!   flight, written in batches; delivered messages per second.
//! - `conns`: open `--conns` idle logged-in connections and report the
//!   server's RSS growth per connection (`--pid`).
//!
//! Server CPU per message comes from /proc: `--pid` for a server process,
//! or the `corerelay-core-*` threads when `--inproc` runs corerelay inside
//! this process. `--inproc` also lets `--placement cross|same` put each
//! pair's two clients on different (or the same) cores with certainty, by
//! asking the server's directory and reconnecting. The tool reports its own
//! CPU so a reader can tell when the client is the bottleneck.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use corerelay::config::Config;
use corerelay::protocol::rely::{self, Decoder, Frame};
use corerelay::{Server, ServerHandle};
use hdrhistogram::Histogram;

mod events;
mod floor;
mod ws;
mod wsproxy;

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for corerelay (RELY) with a Redis pub/sub baseline")]
struct Args {
    /// What to measure (omit with --compare).
    #[arg(value_enum, required_unless_present = "compare")]
    mode: Option<Mode>,
    /// Compare two --json outputs: prints each figure of B next to A and
    /// the ratio B/A, so a regression is visible.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<std::path::PathBuf>>,
    /// Print CSV (a header line, then a row) instead of the summary.
    #[arg(long)]
    csv: bool,
    /// The path `conns --ws` upgrades on (`{i}` becomes the connection's
    /// number, for endpoints that take an id from the path).
    #[arg(long, default_value = "/echo")]
    ws_path: String,
    /// Where `floor` listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the latency percentile curve as SVG to this file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Open loop: messages per second (all senders together) instead of
    /// a closed window (stream and ws-fanout); 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// rely (corerelay) or redis (pub/sub baseline).
    #[arg(long, value_enum, default_value = "rely")]
    proto: Proto,
    /// Server address (ignored with --inproc).
    #[arg(long, default_value = "127.0.0.1:33333")]
    target: SocketAddr,
    /// Run corerelay in this process with this many workers.
    #[arg(long)]
    inproc: Option<usize>,
    /// With --inproc: spin instead of parking.
    #[arg(long)]
    busy_poll: bool,
    /// With --inproc: where each pair's two clients live.
    #[arg(long, value_enum, default_value = "any")]
    placement: Placement,
    /// PID of an external server, for its CPU time.
    #[arg(long)]
    pid: Option<u32>,
    /// pingpong and stream: the B side of every pair connects here, a
    /// second node of a cluster (the A side to --target), so every message
    /// crosses nodes through Redis.
    #[arg(long)]
    target_b: Option<SocketAddr>,
    /// PID of the --target-b node, for its CPU time (added to --pid's).
    #[arg(long)]
    pid_b: Option<u32>,
    /// Client pairs.
    #[arg(long, default_value_t = 1)]
    pairs: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// stream: messages in flight per pair.
    #[arg(long, default_value_t = 256)]
    window: u64,
    /// stream: messages per write.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// conns: idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// ws-echo: concurrent echo connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// ws-fanout: subscribers.
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// source-fanout: Unix-socket subscribers.
    #[arg(long, default_value_t = 100)]
    unix_subs: usize,
    /// WebSocket server address for ws modes (ignored with --inproc). It
    /// must serve /echo (on_message: echo) and /fan/{id} (broadcast on a
    /// fixed tag).
    #[arg(long, default_value = "127.0.0.1:5000")]
    ws_target: SocketAddr,
    /// ws-fanout: who publishes (the admin API needs --admin-target or
    /// --inproc).
    #[arg(long, value_enum, default_value = "broadcast")]
    publisher: PublisherKind,
    /// Admin API address for --publisher admin (ignored with --inproc).
    #[arg(long)]
    admin_target: Option<SocketAddr>,
    /// Veltix hub address for veltix-hub (ignored with --inproc): a Veltix
    /// 3.3.0 hub, such as tools/bench/veltix_hub.py.
    #[arg(long, default_value = "127.0.0.1:8080")]
    veltix_target: SocketAddr,
    /// Veltix echo address for veltix-echo (ignored with --inproc).
    #[arg(long, default_value = "127.0.0.1:8081")]
    veltix_echo_target: SocketAddr,
    /// conns: open WebSocket connections (on /echo) instead of RELY.
    #[arg(long)]
    ws: bool,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// ws-fanout: subscribers offer permessage-deflate, on the in-process
    /// server's `compression: shared` endpoint (/fan) or its `dedicated`
    /// one (/dfan: a compressor per subscriber).
    #[arg(long, value_enum)]
    deflate: Option<DeflateKind>,
    /// ws-fanout: the payload after its 16-byte header is JSON market
    /// ticks (compressible like a real feed) instead of one repeated byte.
    #[arg(long)]
    json_payload: bool,
    /// wsproxy: the redis-server to publish through.
    #[arg(long, default_value = "127.0.0.1:6379")]
    redis: SocketAddr,
    /// wsproxy, pingpong, stream: redis-server's PID, for its CPU time
    /// (reported on its own).
    #[arg(long)]
    redis_pid: Option<u32>,
    /// wsproxy: measure client messages up to Redis instead.
    #[arg(long)]
    up: bool,
    /// events: publish to this AMQP broker (`amqp://...`, events.amqp)
    /// instead of a Redis stream; the rate is what the broker confirms
    /// (always --inproc). The broker's CPU comes from --broker-pid.
    #[arg(long)]
    amqp: Option<String>,
    /// events with --amqp: the broker's PID (beam.smp), for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// RELY round trips (also `rely-pingpong`).
    #[value(alias = "rely-pingpong")]
    Pingpong,
    /// RELY streaming (also `rely-stream`).
    #[value(alias = "rely-stream")]
    Stream,
    Conns,
    /// WebSocket echo round trips, with a raw TCP ping-pong baseline.
    WsEcho,
    /// One publisher, `--subs` subscribers on a broadcast endpoint.
    WsFanout,
    /// An upstream source (served by the tool) fanned out to `--subs`
    /// WebSocket and `--unix-subs` Unix clients (always --inproc).
    SourceFanout,
    /// One Veltix v3 client sends, `--subs` others on the hub receive.
    VeltixHub,
    /// Veltix v3 echo round trips (one client).
    VeltixEcho,
    /// wsproxy sessions: a publisher on `session:{id}:down` for `--subs`
    /// sessions (`--proto redis`: plain Redis subscribers, the floor);
    /// `--up`: the sessions publish to `:up`.
    Wsproxy,
    /// wsgateway events: `--subs` connections send, a reader XREADs the
    /// stream (`--redis`), or the AMQP broker confirms them (`--amqp`).
    Events,
    /// Serves the floor relay on `--listen` (the fan-out and echo
    /// baseline) until killed.
    Floor,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Rely,
    Redis,
}

/// Which permessage-deflate endpoint ws-fanout subscribers use.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum DeflateKind {
    /// One compressed frame per core for every subscriber.
    Shared,
    /// A compressor per subscriber.
    Dedicated,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum PublisherKind {
    /// A member of a broadcast endpoint.
    Broadcast,
    /// POST /send on the admin API.
    Admin,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Any,
    Cross,
    Same,
}

/// One logical client: sends to its peer, receives what is sent to it.
struct Client {
    proto: Proto,
    id: String,
    /// RELY: the one connection. Redis: the subscriber.
    rx: TcpStream,
    /// RELY: a clone of `rx`. Redis: the publisher (CLIENT REPLY OFF).
    tx: TcpStream,
    buf: Vec<u8>,
    rbuf: Box<[u8]>,
    dec: Decoder,
    resp: Vec<u8>,
}

impl Client {
    fn connect(proto: Proto, addr: SocketAddr, id: &str) -> io::Result<Client> {
        let rx = TcpStream::connect(addr)?;
        rx.set_nodelay(true)?;
        let mut c = match proto {
            Proto::Rely => {
                let tx = rx.try_clone()?;
                Client::new(proto, id, rx, tx)
            }
            Proto::Redis => {
                let tx = TcpStream::connect(addr)?;
                tx.set_nodelay(true)?;
                Client::new(proto, id, rx, tx)
            }
        };
        match proto {
            Proto::Rely => {
                rely::encode_login(&mut c.buf, id.as_bytes());
                c.tx.write_all(&c.buf)?;
                c.buf.clear();
            }
            Proto::Redis => {
                c.tx.write_all(&resp_cmd(&[b"CLIENT", b"REPLY", b"OFF"]))?;
                c.rx.write_all(&resp_cmd(&[b"SUBSCRIBE", id.as_bytes()]))?;
                // Wait for the subscribe confirmation: *3 $9 subscribe $n id :1
                let mut got = Vec::new();
                c.rx.set_read_timeout(Some(Duration::from_secs(5)))?;
                while !got.ends_with(b":1\r\n") {
                    let n = c.rx.read(&mut c.rbuf)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    got.extend_from_slice(&c.rbuf[..n]);
                }
                c.rx.set_read_timeout(None)?;
            }
        }
        Ok(c)
    }

    fn new(proto: Proto, id: &str, rx: TcpStream, tx: TcpStream) -> Client {
        Client {
            proto,
            id: id.to_owned(),
            rx,
            tx,
            buf: Vec::new(),
            rbuf: vec![0; 256 * 1024].into_boxed_slice(),
            dec: Decoder::new(),
            resp: Vec::new(),
        }
    }

    /// Appends one message for `to` to the write buffer.
    fn push(&mut self, to: &str, payload: &[u8]) {
        match self.proto {
            Proto::Rely => {
                rely::encode_transfer(&mut self.buf, self.id.as_bytes(), to.as_bytes(), payload)
            }
            Proto::Redis => {
                self.buf
                    .extend_from_slice(&resp_cmd(&[b"PUBLISH", to.as_bytes(), payload]));
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tx.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Blocks for at least one message; calls `f` for each payload read.
    fn recv(&mut self, mut f: impl FnMut(&[u8])) -> io::Result<usize> {
        loop {
            let n = self.rx.read(&mut self.rbuf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut count = 0;
            match self.proto {
                Proto::Rely => {
                    self.dec
                        .feed(&self.rbuf[..n], u32::MAX, |fr| {
                            if let Frame::Transfer { payload, .. } = fr {
                                count += 1;
                                f(payload);
                            }
                            true
                        })
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                Proto::Redis => {
                    self.resp.extend_from_slice(&self.rbuf[..n]);
                    let mut at = 0;
                    while let Some((payload, used)) = parse_resp_message(&self.resp[at..]) {
                        count += 1;
                        f(payload);
                        at += used;
                    }
                    self.resp.drain(..at);
                }
            }
            if count > 0 {
                return Ok(count);
            }
        }
    }
}

impl Client {
    /// Waits up to `d` for at least one message; false if none came.
    fn recv_within(&mut self, d: Duration, f: impl FnMut(&[u8])) -> io::Result<bool> {
        self.rx.set_read_timeout(Some(d))?;
        let r = self.recv(f);
        self.rx.set_read_timeout(None)?;
        match r {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// Sends probes from `from` to `to` until one arrives, then drains the
/// rest. A RELY login has no answer, and a cluster node subscribes the
/// id's channel a moment after it: traffic sent before then is dropped,
/// which would stall a round trip or shrink a window for good. Bounded.
fn until_routed(from: &mut Client, to: &mut Client) {
    let die = |what: String| -> ! {
        eprintln!("corerelay-bench: {what}");
        std::process::exit(1)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let to_id = to.id.clone();
    loop {
        from.push(&to_id, b"probe");
        if let Err(e) = from.flush() {
            die(format!("probe {} -> {to_id}: {e}", from.id));
        }
        match to.recv_within(Duration::from_millis(50), |_| {}) {
            Ok(true) => break,
            Ok(false) if Instant::now() < deadline => {}
            Ok(false) => die(format!("{to_id} never reachable from {}", from.id)),
            Err(e) => die(format!("probe at {to_id}: {e}")),
        }
    }
    while let Ok(true) = to.recv_within(Duration::from_millis(100), |_| {}) {}
}

fn resp_cmd(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        v.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        v.extend_from_slice(p);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Parses `*3 $7 message $n channel $m payload` from the front of `b`.
fn parse_resp_message(b: &[u8]) -> Option<(&[u8], usize)> {
    fn line(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&b[at..end], end + 2))
    }
    fn bulk(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let (hdr, at) = line(b, at)?;
        let n: usize = std::str::from_utf8(hdr.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if b.len() < at + n + 2 {
            return None;
        }
        Some((&b[at..at + n], at + n + 2))
    }
    let (hdr, at) = line(b, 0)?;
    if hdr != b"*3" {
        return None;
    }
    let (_kind, at) = bulk(b, at)?;
    let (_chan, at) = bulk(b, at)?;
    let (payload, at) = bulk(b, at)?;
    Some((payload, at))
}

/// CPU seconds (user + system) from a /proc stat line.
fn stat_cpu(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// CPU of the server: an external pid, or this process's core threads.
fn server_cpu(pid: Option<u32>, inproc: bool) -> Option<f64> {
    if let Some(p) = pid {
        return stat_cpu(&format!("/proc/{p}/stat"));
    }
    if !inproc {
        return None;
    }
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = e.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("corerelay-core") {
            total += stat_cpu(dir.join("stat").to_str()?)?;
        }
    }
    Some(total)
}

fn self_cpu() -> f64 {
    stat_cpu("/proc/self/stat").unwrap_or(0.0)
}

struct Setup {
    server: Option<ServerHandle>,
    addr: SocketAddr,
    ws_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// Veltix hub and echo listeners.
    veltix: (SocketAddr, SocketAddr),
}

/// The endpoints the ws modes use, for --inproc.
const WS_ENDPOINTS: &str = r#"
websocket:
  listen: ["127.0.0.1:0"]
  ping_interval: 0
  max_output_bytes: 64MiB
  # Only subscribers that offer it (--deflate) get compressed frames.
  compression: shared
  endpoints:
    - path: /echo
      on_message: echo
    - path: /fan/{id}
      id_param: id
      set_tags: {room: bench}
      on_message: broadcast
      broadcast_tag: room
    - path: /dfan/{id}
      id_param: id
      set_tags: {room: bench}
      on_message: broadcast
      broadcast_tag: room
      compression: dedicated
admin:
  listen: ["127.0.0.1:0"]
veltix:
  - listen: "127.0.0.1:0"
    on_message: hub
  - listen: "127.0.0.1:0"
    on_message: echo
"#;

fn setup(a: &Args) -> Setup {
    let Some(workers) = a.inproc else {
        return Setup {
            server: None,
            addr: a.target,
            ws_addr: a.ws_target,
            admin_addr: a.admin_target,
            veltix: (a.veltix_target, a.veltix_echo_target),
        };
    };
    let mut cfg = Config::from_yaml(WS_ENDPOINTS, None).expect("bench config");
    cfg.workers = workers;
    cfg.busy_poll = a.busy_poll;
    cfg.rely.listen = vec!["127.0.0.1:0".parse().expect("literal address")];
    cfg.rely.idle_timeout = None;
    let server = Server::start(cfg).unwrap_or_else(|e| exit_err("start", e));
    let (addr, ws_addr) = (server.rely_addrs()[0], server.ws_addrs()[0]);
    let admin_addr = server.admin_addrs().first().copied();
    let v = server.veltix_addrs();
    Setup {
        veltix: (v[0], v[1]),
        server: Some(server),
        addr,
        ws_addr,
        admin_addr,
    }
}

/// Connects `id`; with an in-process server, retries until it lands on a
/// core that satisfies `want` (bounded).
fn connect_placed(a: &Args, s: &Setup, id: &str, want: impl Fn(usize) -> bool) -> Client {
    // The B side of a pair on the second node, when there is one.
    let addr = match a.target_b {
        Some(b) if id.starts_with("bench-b") => b,
        _ => s.addr,
    };
    for _ in 0..1000 {
        let c = Client::connect(a.proto, addr, id).unwrap_or_else(|e| {
            eprintln!("corerelay-bench: connect {id} to {addr}: {e}");
            std::process::exit(1)
        });
        let Some(server) = &s.server else { return c };
        let deadline = Instant::now() + Duration::from_secs(5);
        let core = loop {
            if let Some(core) = server.owner_core(id.as_bytes()) {
                break core;
            }
            assert!(Instant::now() < deadline, "login of {id} never registered");
            std::thread::sleep(Duration::from_micros(100));
        };
        if want(core) {
            return c;
        }
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.owner_core(id.as_bytes()).is_some() {
            assert!(Instant::now() < deadline, "old login of {id} never left");
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    eprintln!("corerelay-bench: could not place {id}");
    std::process::exit(1)
}

fn make_pairs(a: &Args, s: &Setup) -> Vec<(Client, Client)> {
    let workers = a.inproc.unwrap_or(1).max(1);
    (0..a.pairs)
        .map(|p| {
            let (ia, ib) = (format!("bench-a{p}"), format!("bench-b{p}"));
            let home = p % workers;
            let ca = connect_placed(a, s, &ia, |c| a.placement == Placement::Any || c == home);
            let core_a = s.server.as_ref().and_then(|h| h.owner_core(ia.as_bytes()));
            let cb = connect_placed(a, s, &ib, |c| match (a.placement, core_a) {
                (Placement::Cross, Some(ca)) => c != ca,
                (Placement::Same, Some(ca)) => c == ca,
                _ => true,
            });
            (ca, cb)
        })
        .map(|(mut ca, mut cb)| {
            if a.proto == Proto::Rely && s.server.is_none() {
                until_routed(&mut ca, &mut cb);
                until_routed(&mut cb, &mut ca);
            }
            (ca, cb)
        })
        .collect()
}

struct Measure {
    server_cpu0: Option<f64>,
    redis_cpu0: Option<f64>,
    self_cpu0: f64,
    t0: Instant,
}

/// The servers' CPU seconds: --pid's (or the in-process cores'), plus
/// --pid-b's.
fn servers_cpu(a: &Args) -> Option<f64> {
    let one = server_cpu(a.pid, a.inproc.is_some())?;
    match a.pid_b {
        Some(p) => Some(one + stat_cpu(&format!("/proc/{p}/stat"))?),
        None => Some(one),
    }
}

/// redis-server's CPU seconds (--redis-pid).
fn redis_cpu(a: &Args) -> Option<f64> {
    stat_cpu(&format!("/proc/{}/stat", a.redis_pid?))
}

impl Measure {
    fn start(a: &Args) -> Measure {
        Measure {
            server_cpu0: servers_cpu(a),
            redis_cpu0: redis_cpu(a),
            self_cpu0: self_cpu(),
            t0: Instant::now(),
        }
    }
    /// redis-server's CPU seconds since `start`.
    fn redis(&self, a: &Args) -> Option<f64> {
        redis_cpu(a).zip(self.redis_cpu0).map(|(b, a)| b - a)
    }
    /// (elapsed s, server cpu s, client cpu s)
    fn end(&self, a: &Args) -> (f64, Option<f64>, f64) {
        let el = self.t0.elapsed().as_secs_f64();
        let srv = servers_cpu(a).zip(self.server_cpu0).map(|(b, a)| b - a);
        let mut me = self_cpu() - self.self_cpu0;
        if a.inproc.is_some() {
            me -= srv.unwrap_or(0.0);
        }
        (el, srv, me)
    }
}

fn pingpong(a: &Args, s: &Setup) {
    let pairs = make_pairs(a, s);
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = pairs
        .into_iter()
        .map(|(mut ca, mut cb)| {
            let (stop, measuring, count) = (stop.clone(), measuring.clone(), count.clone());
            let payload = vec![0x42u8; a.payload];
            std::thread::spawn(move || {
                let mut h =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
                let (ida, idb) = (ca.id.clone(), cb.id.clone());
                // A lost message ends the run instead of hanging it.
                for c in [&ca, &cb] {
                    c.rx.set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("read timeout");
                }
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    ca.push(&idb, &payload);
                    ca.flush().expect("send a->b");
                    let mut got = vec![];
                    cb.recv(|p| got = p.to_vec())
                        .expect("recv at b (lost, or 10 s late)");
                    cb.push(&ida, &got);
                    cb.flush().expect("send b->a");
                    ca.recv(|_| {}).expect("recv at a (lost, or 10 s late)");
                    if measuring.load(Ordering::Relaxed) {
                        let _ = h.record(t.elapsed().as_nanos() as u64);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let m = Measure::start(a);
    measuring.store(true, Ordering::Relaxed);
    wait_measuring(Duration::from_secs_f64(a.duration));
    measuring.store(false, Ordering::Relaxed);
    let (el, srv, me) = m.end(a);
    let redis = m.redis(a);
    stop.store(true, Ordering::Relaxed);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    for t in threads {
        h.add(t.join().expect("pair thread")).expect("same bounds");
    }
    let rt = count.load(Ordering::Relaxed);
    let msgs = rt * 2;
    if let Some(p) = &a.plot {
        plot(
            p,
            &format!(
                "{:?} round trip, {} pairs, {} B",
                a.proto, a.pairs, a.payload
            ),
            &[("round trip", &h)],
        );
    }
    report(a, "pingpong", el, msgs, (srv, redis), me, Some(&h));
}

/// One pair of the stream mode on the single driver thread.
struct StreamPair {
    tx: Client,
    rx: Client,
    to: String,
    sent: u64,
    received: u64,
    /// Bytes of `tx.buf` already written.
    off: usize,
    /// When its next batch is due (--rate).
    next: Instant,
}

/// Writes what is buffered without blocking; true once all of it is out.
fn write_some(c: &mut Client, off: &mut usize) -> io::Result<bool> {
    while *off < c.buf.len() {
        match c.tx.write(&c.buf[*off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.buf.clear();
    *off = 0;
    Ok(true)
}

/// Reads what is there without blocking; returns the messages decoded.
fn read_some(c: &mut Client) -> io::Result<u64> {
    let mut count = 0u64;
    loop {
        let n = match c.rx.read(&mut c.rbuf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(count),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match c.proto {
            Proto::Rely => {
                c.dec
                    .feed(&c.rbuf[..n], u32::MAX, |fr| {
                        count += u64::from(matches!(fr, Frame::Transfer { .. }));
                        true
                    })
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            Proto::Redis => {
                c.resp.extend_from_slice(&c.rbuf[..n]);
                let mut at = 0;
                while let Some((_, used)) = parse_resp_message(&c.resp[at..]) {
                    count += 1;
                    at += used;
                }
                c.resp.drain(..at);
            }
        }
    }
}

/// The stream mode's client: one thread and one mio poll for every pair
/// (as the external pairbench does), so that the tool measures the server
/// rather than 100 blocking threads contending for the CPUs. Each sender
/// keeps at most `--window` messages in flight, written `--batch` at a
/// time; with `--rate`, each pair sends its share on a fixed schedule.
fn stream(a: &Args, s: &Setup) {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use std::os::fd::AsRawFd;
    let (window, batch) = (a.window, a.batch as u64);
    let pace =
        (a.rate > 0.0).then(|| Duration::from_secs_f64(batch as f64 * a.pairs as f64 / a.rate));
    let payload = vec![0x42u8; a.payload];
    let mut pairs: Vec<StreamPair> = make_pairs(a, s)
        .into_iter()
        .map(|(tx, rx)| StreamPair {
            to: format!("bench-b{}", &tx.id["bench-a".len()..]),
            tx,
            rx,
            sent: 0,
            received: 0,
            off: 0,
            next: Instant::now(),
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let (stop_d, total_d) = (stop.clone(), total.clone());
    let driver = std::thread::spawn(move || -> io::Result<()> {
        let mut poll = Poll::new()?;
        for (i, p) in pairs.iter_mut().enumerate() {
            p.tx.tx.set_nonblocking(true)?;
            p.rx.rx.set_nonblocking(true)?;
            let (w, r) = (p.tx.tx.as_raw_fd(), p.rx.rx.as_raw_fd());
            poll.registry()
                .register(&mut SourceFd(&w), Token(2 * i), Interest::WRITABLE)?;
            poll.registry()
                .register(&mut SourceFd(&r), Token(2 * i + 1), Interest::READABLE)?;
        }
        let mut events = Events::with_capacity(1024);
        let mut due: Vec<usize> = (0..pairs.len()).collect();
        while !stop_d.load(Ordering::Relaxed) {
            // Send what each listed pair's window (and schedule) allows.
            let now = Instant::now();
            let mut wait = Duration::from_millis(10);
            for &i in &due {
                let p = &mut pairs[i];
                if !p.tx.buf.is_empty() && !write_some(&mut p.tx, &mut p.off)? {
                    continue; // a writable event lists it again
                }
                while p.sent - p.received + batch <= window {
                    if let Some(d) = pace {
                        if now < p.next {
                            wait = wait.min(p.next - now);
                            break;
                        }
                        p.next += d;
                    }
                    for _ in 0..batch {
                        p.tx.push(&p.to, &payload);
                    }
                    p.sent += batch;
                    if !write_some(&mut p.tx, &mut p.off)? {
                        break;
                    }
                }
            }
            due.clear();
            if pace.is_some() {
                due.extend(0..pairs.len());
            }
            poll.poll(&mut events, Some(wait))?;
            for ev in events.iter() {
                let i = ev.token().0 / 2;
                if ev.token().0 % 2 == 1 {
                    let n = read_some(&mut pairs[i].rx)?;
                    pairs[i].received += n;
                    total_d.fetch_add(n, Ordering::Relaxed);
                }
                due.push(i);
            }
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let m = Measure::start(a);
    let n0 = total.load(Ordering::Relaxed);
    wait_measuring(Duration::from_secs_f64(a.duration));
    let n1 = total.load(Ordering::Relaxed);
    let (el, srv, me) = m.end(a);
    let redis = m.redis(a);
    stop.store(true, Ordering::Relaxed);
    match driver.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => exit_err("stream", e),
        Err(_) => exit_err("stream", "the driver thread panicked"),
    }
    report(a, "stream", el, n1 - n0, (srv, redis), me, None);
}

/// Resident set size of `pid` in bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn conns(a: &Args, s: &Setup) {
    let pid = a.pid.unwrap_or_else(|| {
        eprintln!("corerelay-bench: conns needs --pid of the server");
        std::process::exit(2)
    });
    let before = rss(pid).unwrap_or(0);
    let t0 = Instant::now();
    let mut open = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        // Spread over 127.0.0.x sources so large counts do not exhaust one
        // source address's ephemeral ports.
        // 5000 per source address, starting at one that varies per run, so
        // TIME_WAIT sockets left by earlier runs do not exhaust the ports.
        let host = 1 + ((std::process::id() as usize + i / 5000) % 250) as u8;
        let src = SocketAddr::from(([127, 0, 1, host], 0));
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .unwrap_or_else(|e| exit_err("socket", e));
        sock.bind(&src.into())
            .unwrap_or_else(|e| exit_err("bind source", e));
        let target = if a.ws { s.ws_addr } else { s.addr };
        sock.connect(&target.into())
            .unwrap_or_else(|e| exit_err(&format!("connection {i}"), e));
        let mut t: TcpStream = sock.into();
        if a.ws {
            write!(
                t,
                "GET {} HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                a.ws_path.replace("{i}", &i.to_string())
            )
            .expect("upgrade");
        } else {
            let mut f = Vec::new();
            rely::encode_login(&mut f, format!("idle-{i}").as_bytes());
            t.write_all(&f).expect("login");
        }
        open.push(t);
    }
    if a.ws {
        // Read each 101 so every connection has finished its upgrade (a
        // refused one would measure nothing: say so and stop).
        for (i, t) in open.iter_mut().enumerate() {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && t.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            if !head.starts_with(b"HTTP/1.1 101") {
                let line =
                    String::from_utf8_lossy(head.split(|&c| c == b'\r').next().unwrap_or(&[]));
                eprintln!("corerelay-bench: connection {i} was not upgraded: {line:?}");
                std::process::exit(1);
            }
        }
    }
    // Let the server finish accepting and reading the logins.
    std::thread::sleep(Duration::from_secs_f64(a.warmup.max(0.5)));
    let after = rss(pid).unwrap_or(0);
    let per = after.saturating_sub(before) as f64 / a.conns as f64;
    if a.json || a.csv {
        emit_json(format!(
            "{{\"mode\":\"conns\",\"conns\":{},\"rss_before\":{before},\"rss_after\":{after},\"bytes_per_conn\":{per:.1},\"open_seconds\":{:.3}}}",
            a.conns,
            t0.elapsed().as_secs_f64()
        ));
    } else {
        println!(
            "conns={} server RSS {} -> {} KiB: {per:.0} bytes per idle connection",
            a.conns,
            before / 1024,
            after / 1024
        );
    }
}

fn report(
    a: &Args,
    mode: &str,
    elapsed: f64,
    msgs: u64,
    (srv, redis): (Option<f64>, Option<f64>),
    client: f64,
    h: Option<&Histogram<u64>>,
) {
    let rate = msgs as f64 / elapsed;
    let srv_ns = srv.map(|c| c * 1e9 / msgs.max(1) as f64);
    let redis_ns = redis.map(|c| c * 1e9 / msgs.max(1) as f64);
    let pct = |q: f64| h.map(|h| h.value_at_quantile(q) as f64 / 1000.0);
    if a.json || a.csv {
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        emit_json(format!(
            "{{\"mode\":\"{mode}\",\"proto\":\"{:?}\",\"inproc\":{},\"busy_poll\":{},\"placement\":\"{:?}\",\"pairs\":{},\"payload\":{},\"window\":{},\"batch\":{},\"seconds\":{elapsed:.3},\"messages\":{msgs},\"msgs_per_s\":{rate:.1},\"server_cpu_s\":{},\"server_ns_per_msg\":{},\"redis_ns_per_msg\":{},\"client_cpu_s\":{client:.3},\"rtt_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"p9999\":{},\"max\":{}}}}}",
            a.proto,
            a.inproc.unwrap_or(0),
            a.busy_poll,
            a.placement,
            a.pairs,
            a.payload,
            a.window,
            a.batch,
            opt(srv),
            opt(srv_ns),
            opt(redis_ns),
            opt(pct(0.5)),
            opt(pct(0.9)),
            opt(pct(0.99)),
            opt(pct(0.999)),
            opt(pct(0.9999)),
            opt(h.map(|h| h.max() as f64 / 1000.0)),
        ));
        return;
    }
    println!(
        "{mode} proto={:?} pairs={} payload={}B{}{}",
        a.proto,
        a.pairs,
        a.payload,
        a.inproc.map_or(String::new(), |w| format!(
            " inproc workers={w} busy_poll={} placement={:?}",
            a.busy_poll, a.placement
        )),
        if mode == "stream" {
            format!(" window={} batch={}", a.window, a.batch)
        } else {
            String::new()
        }
    );
    println!("  {msgs} messages in {elapsed:.2}s = {rate:.0} msgs/s");
    if let Some(h) = h {
        println!(
            "  round trip us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.9) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.value_at_quantile(0.999) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    match (srv, srv_ns) {
        (Some(c), Some(ns)) => {
            println!("  server cpu {c:.2}s = {ns:.0} ns/msg; client cpu {client:.2}s")
        }
        _ => println!("  server cpu unknown (pass --pid or --inproc); client cpu {client:.2}s"),
    }
}

fn main() {
    let a = Args::parse();
    let _ = OUTPUT.set(if a.csv {
        Output::Csv
    } else if a.json || a.csv {
        Output::Json
    } else {
        Output::Human
    });
    if let Some(files) = &a.compare {
        compare(&files[0], &files[1]);
        return;
    }
    let Some(mode) = a.mode else {
        exit_err("usage", "a mode or --compare is required")
    };
    if a.proto == Proto::Redis && a.inproc.is_some() && mode != Mode::Wsproxy {
        eprintln!("corerelay-bench: --inproc runs corerelay; use --target/--pid for redis");
        std::process::exit(2);
    }
    if mode == Mode::Wsproxy {
        // It runs its own in-process server (a wsproxy config).
        wsproxy::run(&a);
        std::process::exit(0);
    }
    if mode == Mode::Events {
        events::run(&a);
        std::process::exit(0);
    }
    if mode == Mode::SourceFanout {
        // It builds its own in-process server around the feed it serves.
        source_fanout(&a);
        std::process::exit(0);
    }
    let s = setup(&a);
    match mode {
        Mode::Pingpong => pingpong(&a, &s),
        Mode::Stream => stream(&a, &s),
        Mode::Conns => conns(&a, &s),
        Mode::WsEcho => ws_echo(&a, &s),
        Mode::WsFanout => ws_fanout(&a, &s, false),
        Mode::VeltixHub => ws_fanout(&a, &s, true),
        Mode::VeltixEcho => veltix_echo(&a, &s),
        Mode::SourceFanout => source_fanout(&a),
        Mode::Wsproxy => wsproxy::run(&a),
        Mode::Events => events::run(&a),
        Mode::Floor => {
            if let Err(e) = floor::run(a.listen) {
                exit_err("floor", e);
            }
        }
    }
    // Client threads may still hold sockets; exit without a graceful drain.
    std::process::exit(0);
}

fn exit_err(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("corerelay-bench: {what}: {e}");
    std::process::exit(1)
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// WebSocket echo against corerelay and raw TCP ping-pong against a
/// thread-per-connection echo server, same payload, same run.
fn ws_echo(a: &Args, s: &Setup) {
    let conns: Vec<ws::WsConn> = (0..a.clients)
        .map(|_| {
            ws::WsConn::connect(s.ws_addr, "/echo").unwrap_or_else(|e| exit_err("ws connect", e))
        })
        .collect();
    echo(
        a,
        "ws-echo",
        "corerelay WebSocket",
        conns,
        ws::ws_round_trip,
    );
}

/// Veltix v3 echo round trips, with the same raw TCP baseline.
fn veltix_echo(a: &Args, s: &Setup) {
    let conns: Vec<TcpStream> = (0..a.clients)
        .map(|_| ws::veltix_connect(s.veltix.1).unwrap_or_else(|e| exit_err("veltix connect", e)))
        .collect();
    echo(
        a,
        "veltix-echo",
        "corerelay Veltix",
        conns,
        ws::veltix_round_trip,
    );
}

/// Echo round trips on `conns`, then raw TCP ping-pong against a
/// thread-per-connection echo server with the same payload, and the report.
fn echo<C: Send + 'static>(
    a: &Args,
    mode: &str,
    label: &str,
    conns: Vec<C>,
    round_trip: fn(&mut C, &[u8]) -> io::Result<()>,
) {
    let (warm, dur) = (
        Duration::from_secs_f64(a.warmup),
        Duration::from_secs_f64(a.duration),
    );
    let m = Measure::start(a);
    let (n, h, el) = ws::pingpong(conns, a.payload, warm, dur, round_trip);
    let (_, srv, me) = m.end(a);
    let base = ws::tcp_echo_server().unwrap_or_else(|e| exit_err("tcp echo server", e));
    let tcp: Vec<TcpStream> = (0..a.clients)
        .map(|_| {
            let t = TcpStream::connect(base).unwrap_or_else(|e| exit_err("tcp connect", e));
            let _ = t.set_nodelay(true);
            t
        })
        .collect();
    let (tn, th, tel) = ws::pingpong(tcp, a.payload, warm, dur, ws::tcp_round_trip);
    let rate = n as f64 / el;
    let ratio = us(&h, 0.5) / us(&th, 0.5).max(0.001);
    if let Some(p) = &a.plot {
        let title = format!(
            "echo round trip, {} connections, {} B",
            a.clients, a.payload
        );
        plot(p, &title, &[(label, &h), ("raw TCP baseline", &th)]);
    }
    if a.json || a.csv {
        emit_json(format!(
            "{{\"mode\":\"{mode}\",\"clients\":{},\"payload\":{},\"round_trips_per_s\":{rate:.1},\"rtt_us\":{},\"tcp_round_trips_per_s\":{:.1},\"tcp_rtt_us\":{},\"p50_ratio_vs_tcp\":{ratio:.3},\"server_cpu_s\":{},\"client_cpu_s\":{me:.3}}}",
            a.clients,
            a.payload,
            percentiles_json(&h),
            tn as f64 / tel,
            percentiles_json(&th),
            srv.map_or("null".into(), |v| format!("{v:.3}"))
        ));
    } else {
        println!("{mode} clients={} payload={}B", a.clients, a.payload);
        println!(
            "  {label}: {rate:.0} round trips/s, rtt us p50 {:.1} p99 {:.1} p99.9 {:.1}",
            us(&h, 0.5),
            us(&h, 0.99),
            us(&h, 0.999)
        );
        println!(
            "  raw TCP baseline: {:.0} round trips/s, rtt us p50 {:.1} p99 {:.1}",
            tn as f64 / tel,
            us(&th, 0.5),
            us(&th, 0.99)
        );
        println!("  p50 ratio {label}/TCP: {ratio:.2}");
    }
}

/// One publisher on a broadcast endpoint, `--subs` subscribers.
/// ws-fanout, or (veltix) the same run on a Veltix v3 hub.
fn ws_fanout(a: &Args, s: &Setup, veltix: bool) {
    let (warm, dur) = (
        Duration::from_secs_f64(a.warmup),
        Duration::from_secs_f64(a.duration),
    );
    let start = std::cell::Cell::new(None);
    let end = std::cell::Cell::new(None);
    let mode = if veltix { "veltix-hub" } else { "ws-fanout" };
    let addr = if veltix { s.veltix.0 } else { s.ws_addr };
    let r = ws::fanout(
        addr,
        veltix,
        |id| match a.deflate {
            Some(DeflateKind::Dedicated) => format!("/dfan/{id}"),
            _ => format!("/fan/{id}"),
        },
        a.subs,
        a.payload,
        a.window,
        a.batch,
        a.rate,
        (a.publisher == PublisherKind::Admin)
            .then_some(s.admin_addr)
            .flatten(),
        warm,
        dur,
        ws::FanoutShape {
            deflate: a.deflate.is_some(),
            json: a.json_payload,
        },
        || start.set(Some((server_cpu(a.pid, a.inproc.is_some()), self_cpu()))),
        || end.set(Some((server_cpu(a.pid, a.inproc.is_some()), self_cpu()))),
    )
    .unwrap_or_else(|e| exit_err("fan-out", e));
    let (s0, c0) = start.get().unwrap_or((None, 0.0));
    let (s1, c1) = end.get().unwrap_or((None, 0.0));
    let srv = s1.zip(s0).map(|(b, a)| b - a);
    let client = c1
        - c0
        - if a.inproc.is_some() {
            srv.unwrap_or(0.0)
        } else {
            0.0
        };
    let rate = r.delivered as f64 / r.seconds;
    let ns = srv.map(|c| c * 1e9 / r.delivered.max(1) as f64);
    if let Some(p) = &a.plot {
        plot(
            p,
            &format!("fan-out one-way latency, {} subscribers", a.subs),
            &[("publish -> receive", &r.latency)],
        );
    }
    if let Some(h) = &s.server {
        let m = h.metrics();
        eprintln!(
            "  server: {} deliveries in {} flushes ({:.1} per flush), {} loop iterations",
            m.fanout_deliveries,
            m.flushes,
            m.fanout_deliveries as f64 / m.flushes.max(1) as f64,
            m.loop_iterations
        );
    }
    if a.json || a.csv {
        emit_json(format!(
            "{{\"mode\":\"{mode}\",\"subs\":{},\"payload\":{},\"window\":{},\"batch\":{},\"rate\":{},\"publisher\":\"{:?}\",\"published\":{},\"delivered\":{},\"deliveries_per_s\":{rate:.1},\"gaps\":{},\"dups\":{},\"server_ns_per_delivery\":{},\"wire_bytes_per_delivery\":{:.1},\"deflate\":{},\"latency_us\":{},\"client_cpu_s\":{client:.3}}}",
            a.subs,
            a.payload,
            a.window,
            a.batch,
            a.rate,
            a.publisher,
            r.published,
            r.delivered,
            r.gaps,
            r.dups,
            ns.map_or("null".into(), |v| format!("{v:.1}")),
            r.wire_bytes as f64 / r.delivered.max(1) as f64,
            a.deflate.map_or("null".into(), |d| format!("\"{d:?}\"")),
            percentiles_json(&r.latency)
        ));
    } else {
        println!(
            "{mode} subs={} payload={}B window={}",
            a.subs, a.payload, a.window
        );
        println!(
            "  {} published, {} delivered in {:.2}s = {rate:.0} deliveries/s, {} gaps, {} duplicates",
            r.published, r.delivered, r.seconds, r.gaps, r.dups
        );
        println!(
            "  one-way latency us p50 {:.1} p99 {:.1}",
            us(&r.latency, 0.5),
            us(&r.latency, 0.99)
        );
        println!(
            "  {:.1} bytes on the wire per delivery{}",
            r.wire_bytes as f64 / r.delivered.max(1) as f64,
            match a.deflate {
                Some(d) => format!(" (permessage-deflate, {d:?})"),
                None => String::new(),
            }
        );
        match ns {
            Some(ns) => println!("  server cpu {ns:.0} ns per delivery; client cpu {client:.2}s"),
            None => {
                println!("  server cpu unknown (pass --pid or --inproc); client cpu {client:.2}s")
            }
        }
    }
}

/// One upstream source at full rate to WebSocket and Unix clients.
fn source_fanout(a: &Args) {
    use std::sync::atomic::AtomicBool as Flag;
    let epoch = Instant::now();
    let subs = a.subs + a.unix_subs;
    let (delivered_fb, published, go, stop_feed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Flag::new(false)),
        Arc::new(Flag::new(false)),
    );
    let feed = ws::feed_server(
        epoch,
        a.payload,
        a.window,
        subs as u64,
        delivered_fb.clone(),
        published.clone(),
        go.clone(),
        stop_feed.clone(),
    )
    .unwrap_or_else(|e| exit_err("feed", e));
    let sock = std::env::temp_dir().join(format!("corerelay-bench-{}.sock", std::process::id()));
    let yaml = format!(
        "workers: {}\nbusy_poll: {}\nrely:\n  listen: []\nwebsocket:\n  listen: []\n  ping_interval: 0\n  max_output_bytes: 64MiB\n  endpoints:\n    - path: /unused\nadmin:\n  listen: []\nsources:\n  - url: \"ws://{feed}/\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\nperformance:\n  max_queue_size: 1000000\n",
        a.inproc.unwrap_or(2),
        a.busy_poll,
        sock.display()
    );
    let cfg = Config::from_yaml(&yaml, None).unwrap_or_else(|e| exit_err("config", e));
    let server = Server::start(cfg).unwrap_or_else(|e| exit_err("start", e));
    let ws_addr = server.source_ws_addrs()[0];
    let mut clients = Vec::with_capacity(subs);
    for _ in 0..a.subs {
        let c = ws::WsConn::connect(ws_addr, "/").unwrap_or_else(|e| exit_err("ws connect", e));
        let _ = c.s.set_nonblocking(true);
        clients.push(ws::Client::Ws(mio::net::TcpStream::from_std(c.s)));
    }
    for _ in 0..a.unix_subs {
        let u = std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| exit_err("unix connect", e));
        let _ = u.set_nonblocking(true);
        clients.push(ws::Client::Unix(mio::net::UnixStream::from_std(u)));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (server.metrics().ws_upgrades as usize) < a.subs
        || (server.metrics().accepted as usize) < subs
    {
        if Instant::now() > deadline {
            exit_err("setup", "clients did not all connect");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = ws::readers(epoch, clients).unwrap_or_else(|e| exit_err("readers", e));
    // The feed's window follows the readers' delivery count.
    let (d, fb, st) = (r.delivered.clone(), delivered_fb.clone(), stop_feed.clone());
    let mirror = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            fb.store(d.load(Ordering::Relaxed), Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    go.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    let srv0 = server_cpu(None, true);
    let (d0, p0) = (
        r.delivered.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    r.measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    wait_measuring(Duration::from_secs_f64(a.duration));
    r.measuring.store(false, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    let (d1, p1) = (
        r.delivered.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    let srv = server_cpu(None, true).zip(srv0).map(|(b, a)| b - a);
    stop_feed.store(true, Ordering::Relaxed);
    r.stop.store(true, Ordering::Relaxed);
    let _ = r.thread.join();
    let _ = mirror.join();
    let h = r
        .hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| Histogram::new(3).expect("sigfig"));
    let delivered = d1 - d0;
    let rate = delivered as f64 / el;
    if let Some(p) = &a.plot {
        let title = format!(
            "source fan-out latency, {} ws + {} unix",
            a.subs, a.unix_subs
        );
        plot(p, &title, &[("upstream send -> client receive", &h)]);
    }
    let ns = srv.map(|c| c * 1e9 / delivered.max(1) as f64);
    if a.json || a.csv {
        emit_json(format!(
            "{{\"mode\":\"source-fanout\",\"ws_subs\":{},\"unix_subs\":{},\"payload\":{},\"window\":{},\"workers\":{},\"published\":{},\"delivered\":{delivered},\"deliveries_per_s\":{rate:.1},\"gaps\":{},\"server_ns_per_delivery\":{},\"latency_us\":{}}}",
            a.subs,
            a.unix_subs,
            a.payload,
            a.window,
            a.inproc.unwrap_or(2),
            p1 - p0,
            r.gaps.load(Ordering::Relaxed),
            ns.map_or("null".into(), |v| format!("{v:.1}")),
            percentiles_json(&h)
        ));
        drop(server);
        return;
    }
    println!(
        "source-fanout ws={} unix={} payload={}B: {} messages from the source, {delivered} deliveries in {el:.2}s = {rate:.0} deliveries/s, {} gaps",
        a.subs,
        a.unix_subs,
        a.payload,
        p1 - p0,
        r.gaps.load(Ordering::Relaxed)
    );
    println!(
        "  upstream send -> client receive us: p50 {:.1} p99 {:.1}",
        us(&h, 0.5),
        us(&h, 0.99)
    );
    if let Some(ns) = ns {
        println!("  server cpu {ns:.0} ns per delivery");
    }
    drop(server);
}

/// Prints one JSON object, prefixed with what a reader needs to compare
/// runs: the tool's version and the machine it ran on.
fn emit_json(body: String) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meta = format!(
        "\"version\":\"{}\",\"machine\":{{\"cpus\":{cpus},\"os\":\"{}\",\"arch\":\"{}\",\"kernel\":\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        kernel.trim()
    );
    let full = match body.strip_prefix('{') {
        Some(rest) => format!("{{{meta},{rest}"),
        None => body,
    };
    if OUTPUT.get() == Some(&Output::Csv) {
        print_csv(&full);
    } else {
        println!("{full}");
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Human,
    Json,
    Csv,
}

static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Flattens a JSON object into (dotted key, value) pairs.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        serde_json::Value::String(s) => out.push((prefix.to_owned(), s.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// Prints a run's JSON object as CSV: a header line, then the row.
fn print_csv(json: &str) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return println!("{json}");
    };
    let mut pairs = Vec::new();
    flatten("", &v, &mut pairs);
    let esc = |s: &str| {
        if s.contains([',', '"']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_owned()
        }
    };
    println!(
        "{}",
        pairs
            .iter()
            .map(|(k, _)| esc(k))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "{}",
        pairs
            .iter()
            .map(|(_, v)| esc(v))
            .collect::<Vec<_>>()
            .join(",")
    );
}

/// `--compare A B`: every numeric figure of B next to A, with B/A.
fn compare(a: &std::path::Path, b: &std::path::Path) {
    let load = |p: &std::path::Path| -> Vec<(String, String)> {
        let text =
            std::fs::read_to_string(p).unwrap_or_else(|e| exit_err(&p.display().to_string(), e));
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or("{}");
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| exit_err(&p.display().to_string(), e));
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        out
    };
    let (fa, fb) = (load(a), load(b));
    println!("{:<32} {:>16} {:>16} {:>8}", "figure", "A", "B", "B/A");
    for (k, va) in &fa {
        let Some((_, vb)) = fb.iter().find(|(kb, _)| kb == k) else {
            continue;
        };
        match (va.parse::<f64>(), vb.parse::<f64>()) {
            (Ok(x), Ok(y)) => {
                let ratio = if x != 0.0 {
                    format!("{:.3}", y / x)
                } else {
                    "-".into()
                };
                println!("{k:<32} {x:>16.3} {y:>16.3} {ratio:>8}");
            }
            _ if va != vb => println!("{k:<32} {va:>16} {vb:>16} {:>8}", "differs"),
            _ => {}
        }
    }
}

/// Waits out the measured window, with a progress bar when stderr is a
/// terminal (never in CI logs or pipes).
fn wait_measuring(d: Duration) {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return std::thread::sleep(d);
    }
    let steps = (d.as_millis() / 100).max(1) as u64;
    let bar = indicatif::ProgressBar::new(steps);
    for _ in 0..steps {
        std::thread::sleep(d / steps as u32);
        bar.inc(1);
    }
    bar.finish_and_clear();
}

/// Writes latency percentile curves (x: number of nines, log-like; y: us)
/// as SVG.
fn plot(path: &std::path::Path, title: &str, series: &[(&str, &Histogram<u64>)]) {
    use plotters::prelude::*;
    let quantiles: Vec<f64> = (0..=40)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 10.0))
        .collect();
    let nines = |q: f64| -(1.0 - q).max(1e-6).log10();
    let ymax = series
        .iter()
        .map(|(_, h)| h.max() as f64 / 1000.0)
        .fold(1.0, f64::max);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..4.2f64, 0f64..ymax * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("percentile (1 = 90%, 2 = 99%, 3 = 99.9%, 4 = 99.99%)")
            .y_desc("latency (us)")
            .draw()?;
        let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (name, h)) in series.iter().enumerate() {
            let c = colors[i % colors.len()];
            let pts: Vec<(f64, f64)> = quantiles
                .iter()
                .map(|&q| (nines(q), h.value_at_quantile(q) as f64 / 1000.0))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    if let Err(e) = draw() {
        eprintln!("corerelay-bench: plot {}: {e}", path.display());
    }
}

/// The full percentile set of a latency histogram, in microseconds, as a
/// JSON object (the same fields for every mode).
fn percentiles_json(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "null".into();
    }
    format!(
        "{{\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"p999\":{:.2},\"p9999\":{:.2},\"max\":{:.2}}}",
        us(h, 0.5),
        us(h, 0.9),
        us(h, 0.99),
        us(h, 0.999),
        us(h, 0.9999),
        h.max() as f64 / 1000.0
    )
}

//! WebSocket modes of corerelay-bench: echo round trips (with a raw TCP
//! ping-pong baseline in the same run) and broadcast fan-out to many
//! subscribers read by one mio thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corerelay::protocol::resp;
use corerelay::protocol::veltix::v3;
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

/// Per-subscriber sequence tracking: a sequence number above the next
/// expected one is a gap (drops), one below it a duplicate (or reorder).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeqTracker {
    /// The next sequence number expected.
    pub next: u64,
    /// Messages missing.
    pub gaps: u64,
    /// Messages seen again (or out of order).
    pub dups: u64,
}

impl SeqTracker {
    /// Records one received sequence number.
    pub fn observe(&mut self, seq: u64) {
        if seq >= self.next {
            self.gaps += seq - self.next;
            self.next = seq + 1;
        } else {
            self.dups += 1;
        }
    }
}

/// A blocking WebSocket client connection (masked frames out).
pub struct WsConn {
    pub s: TcpStream,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// Connects and upgrades on `path`, sending `extra` header lines (each
/// ending in CRLF); the socket once the 101 is read.
pub fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(io::Error::other(format!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&head)
        )));
    }
    Ok(s)
}

/// Appends a masked client frame (`opcode` with FIN).
pub fn masked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let mask = [0x11, 0x22, 0x33, 0x44];
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

impl WsConn {
    /// Connects and upgrades on `path`.
    pub fn connect(addr: SocketAddr, path: &str) -> io::Result<WsConn> {
        Ok(WsConn {
            s: upgrade(addr, path, "")?,
            buf: Vec::new(),
            out: Vec::new(),
        })
    }

    /// Appends a masked binary frame to the write buffer.
    pub fn push(&mut self, payload: &[u8]) {
        masked_frame(&mut self.out, 0x2, payload);
    }

    /// Writes the buffer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.s.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// Blocks for one server frame's payload.
    pub fn recv(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some((payload, used)) = parse_server_frame(&self.buf) {
                let p = payload.to_vec();
                self.buf.drain(..used);
                return Ok(p);
            }
            let mut tmp = [0u8; 64 * 1024];
            let n = self.s.read(&mut tmp)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// Who publishes in a fan-out run.
enum Publisher {
    /// A member of the broadcast room.
    Ws(WsConn),
    /// The admin API: each message is a POST /send?room=bench, answered
    /// with the count before the next batch goes.
    Admin(TcpStream, Vec<u8>),
    /// A Veltix v3 hub client (type 200 frames).
    Veltix(TcpStream, Vec<u8>),
}

impl Publisher {
    fn push(&mut self, payload: &[u8]) {
        match self {
            Publisher::Ws(c) => c.push(payload),
            Publisher::Admin(_, out) => {
                out.extend_from_slice(
                    format!(
                        "POST /send?room=bench HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                        payload.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(payload);
            }
            Publisher::Veltix(_, out) => v3::encode(out, 0, 200, 0, payload),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Publisher::Ws(c) => c.flush(),
            Publisher::Veltix(s, out) => {
                s.write_all(out)?;
                out.clear();
                Ok(())
            }
            Publisher::Admin(s, out) => {
                s.write_all(out)?;
                let requests = out.windows(5).filter(|w| w == b"POST ").count();
                out.clear();
                // Pipelined: read one response per request (head + count body).
                let mut got = 0;
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                while got < requests {
                    let n = s.read(&mut tmp)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    got = buf.windows(4).filter(|w| w == b"\r\n\r\n").count();
                }
                Ok(())
            }
        }
    }
}

/// Connects a Veltix v3 client (handshake done, blocking).
pub fn veltix_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let read_msg = |s: &mut TcpStream| -> io::Result<Vec<u8>> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut m = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut m)?;
        Ok(m)
    };
    let hello = read_msg(&mut s)?;
    if !v3::compatible(&hello) {
        return Err(io::Error::other(format!(
            "Veltix server hello: {}",
            String::from_utf8_lossy(&hello)
        )));
    }
    let mut mine = Vec::new();
    v3::encode_handshake(&mut mine, &v3::hello());
    s.write_all(&mine)?;
    let ack = read_msg(&mut s)?;
    if !ack.windows(2).any(|w| w == b"ok") {
        return Err(io::Error::other("Veltix handshake refused"));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Parses a Veltix v3 frame's content from the front of `b`.
pub fn parse_veltix_frame(b: &[u8]) -> Option<(&[u8], usize)> {
    match v3::parse(b, usize::MAX) {
        v3::Parse::Frame(f, used) => Some((f.content, used)),
        _ => None,
    }
}

/// Parses an unmasked server frame from the front of `b`.
pub fn parse_server_frame(b: &[u8]) -> Option<(&[u8], usize)> {
    if b.len() < 2 {
        return None;
    }
    let (len, hl) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (b.len() >= hl + len).then(|| (&b[hl..hl + len], hl + len))
}

/// A raw TCP echo server (one thread per connection), the baseline a
/// WebSocket echo is compared with.
pub fn tcp_echo_server() -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut s = s;
                let mut b = vec![0u8; 64 * 1024];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Ping-pong over `conns` connections for `dur` (after `warmup`), each
/// sending `payload` bytes and waiting for them back. Returns round trips
/// and the RTT histogram (ns).
pub fn pingpong<C: Send + 'static>(
    conns: Vec<C>,
    payload: usize,
    warmup: Duration,
    dur: Duration,
    round_trip: fn(&mut C, &[u8]) -> io::Result<()>,
) -> (u64, Histogram<u64>, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let (stop, measuring, count) = (stop.clone(), measuring.clone(), count.clone());
            std::thread::spawn(move || {
                let mut h =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
                let p = vec![0x42u8; payload];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if round_trip(&mut c, &p).is_err() {
                        break;
                    }
                    if measuring.load(Ordering::Relaxed) {
                        let _ = h.record(t.elapsed().as_nanos() as u64);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                h
            })
        })
        .collect();
    std::thread::sleep(warmup);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(dur);
    measuring.store(false, Ordering::Relaxed);
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    for t in threads {
        if let Ok(x) = t.join() {
            let _ = h.add(x);
        }
    }
    (count.load(Ordering::Relaxed), h, el)
}

/// WebSocket echo round trip.
pub fn ws_round_trip(c: &mut WsConn, p: &[u8]) -> io::Result<()> {
    c.push(p);
    c.flush()?;
    c.recv().map(|_| ())
}

/// A Veltix v3 echo round trip: one frame out, the same frame back.
pub fn veltix_round_trip(s: &mut TcpStream, p: &[u8]) -> io::Result<()> {
    let mut f = Vec::with_capacity(p.len() + v3::HEADER);
    v3::encode(&mut f, 0, 200, 1, p);
    s.write_all(&f)?;
    s.read_exact(&mut f)
}

/// Raw TCP round trip.
pub fn tcp_round_trip(s: &mut TcpStream, p: &[u8]) -> io::Result<()> {
    s.write_all(p)?;
    let mut b = vec![0u8; p.len()];
    s.read_exact(&mut b)
}

/// Results of a fan-out run.
pub struct Fanout {
    /// Messages published in the measured window.
    pub published: u64,
    /// Deliveries counted in the measured window.
    pub delivered: u64,
    /// Sequence gaps seen by subscribers (drops), whole run.
    pub gaps: u64,
    /// Repeated (or reordered) messages seen by subscribers, whole run.
    pub dups: u64,
    /// One-way latency (ns).
    pub latency: Histogram<u64>,
    /// Measured seconds.
    pub seconds: f64,
    /// Bytes the subscribers read in the measured window (frames as sent,
    /// compressed or not).
    pub wire_bytes: u64,
}

/// What fan-out subscribers offer and what the publisher sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct FanoutShape {
    /// Subscribers offer permessage-deflate (asking the server not to keep
    /// a context, so each frame inflates on its own here).
    pub deflate: bool,
    /// The payload after its 16-byte header is JSON ticks, not filler.
    pub json: bool,
}

/// `len` bytes of JSON-like market ticks (varying numbers, so it
/// compresses as a real feed does, not as a run of one byte).
pub fn json_filler(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let syms = [
        "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "AVGO",
    ];
    out.push(b'[');
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let sym = syms[(x % syms.len() as u64) as usize];
        let px = 100 + (x >> 8) % 400;
        let c = (x >> 20) % 100;
        let q = 1 + (x >> 32) % 5000;
        let rec = format!(
            "{{\"sym\":\"{sym}\",\"bid\":{px}.{c:02},\"ask\":{px}.{:02},\"size\":{q},\"venue\":\"XNAS\",\"ts\":{}}},",
            (c + 1) % 100,
            1_764_460_800_000 + (x >> 40) % 100_000
        );
        out.extend_from_slice(rec.as_bytes());
    }
    out.truncate(len.saturating_sub(1));
    out.push(b']');
    out
}

/// The first 16 bytes of a compressed message (its sequence number and
/// send time): inflated up to there only, since every broadcast frame is
/// compressed on its own (no context takeover).
fn inflate_prefix(d: &mut flate2::Decompress, p: &[u8]) -> Option<[u8; 16]> {
    d.reset(false);
    let mut out = [0u8; 16];
    d.decompress(p, &mut out, flate2::FlushDecompress::Sync)
        .ok()?;
    (d.total_out() == 16).then_some(out)
}

/// One publisher on a broadcast room, `subs` subscribers read by one mio
/// thread. Each message carries its sequence number and send time.
#[allow(clippy::too_many_arguments)]
pub fn fanout(
    addr: SocketAddr,
    veltix: bool,
    room_path: impl Fn(&str) -> String,
    subs: usize,
    payload: usize,
    window: u64,
    batch: usize,
    rate: f64,
    admin: Option<SocketAddr>,
    warmup: Duration,
    dur: Duration,
    shape: FanoutShape,
    on_start: impl FnOnce(),
    on_end: impl FnOnce(),
) -> io::Result<Fanout> {
    let epoch = Instant::now();
    let offer = if shape.deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
    } else {
        ""
    };
    let mut poll = Poll::new()?;
    let mut streams = Vec::with_capacity(subs);
    for i in 0..subs {
        let s = if veltix {
            veltix_connect(addr)?
        } else {
            upgrade(addr, &room_path(&format!("sub{i}")), offer)?
        };
        s.set_nonblocking(true)?;
        let mut m = mio::net::TcpStream::from_std(s);
        poll.registry()
            .register(&mut m, Token(i), Interest::READABLE)?;
        streams.push((m, Vec::<u8>::new(), SeqTracker::default()));
    }
    // The publisher: a member of the broadcast room, or (admin) an HTTP
    // keep-alive connection posting each message to /send?room=bench.
    let mut publisher = match admin {
        None if veltix => Publisher::Veltix(veltix_connect(addr)?, Vec::new()),
        None => Publisher::Ws(WsConn::connect(addr, &room_path("publisher"))?),
        Some(a) => {
            let s = TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            Publisher::Admin(s, Vec::new())
        }
    };
    let delivered = Arc::new(AtomicU64::new(0));
    let wire = Arc::new(AtomicU64::new(0));
    let dups = Arc::new(AtomicU64::new(0));
    let gaps = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
    ));
    let reader = {
        let wire = wire.clone();
        let (delivered, gaps, dups, measuring, stop, hist) = (
            delivered.clone(),
            gaps.clone(),
            dups.clone(),
            measuring.clone(),
            stop.clone(),
            hist.clone(),
        );
        std::thread::spawn(move || {
            let mut events = Events::with_capacity(1024);
            let mut tmp = vec![0u8; 256 * 1024];
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
            let mut inflater = flate2::Decompress::new(false);
            while !stop.load(Ordering::Relaxed) {
                if poll
                    .poll(&mut events, Some(Duration::from_millis(50)))
                    .is_err()
                {
                    break;
                }
                for ev in events.iter() {
                    let (s, buf, next) = &mut streams[ev.token().0];
                    loop {
                        match s.read(&mut tmp) {
                            Ok(0) => break,
                            Ok(n) => {
                                buf.extend_from_slice(&tmp[..n]);
                                if measuring.load(Ordering::Relaxed) {
                                    wire.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    let mut at = 0;
                    let now = epoch.elapsed().as_nanos() as u64;
                    let m = measuring.load(Ordering::Relaxed);
                    let parse = if veltix {
                        parse_veltix_frame
                    } else {
                        parse_server_frame
                    };
                    while let Some((p, used)) = parse(&buf[at..]) {
                        let compressed = !veltix && buf[at] & 0x40 != 0;
                        let head = if compressed {
                            inflate_prefix(&mut inflater, p)
                        } else {
                            p.get(..16).and_then(|h| h.try_into().ok())
                        };
                        if let Some(p) = head {
                            let seq = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
                            let sent = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                            let before = *next;
                            next.observe(seq);
                            gaps.fetch_add(next.gaps - before.gaps, Ordering::Relaxed);
                            dups.fetch_add(next.dups - before.dups, Ordering::Relaxed);
                            if m {
                                let _ = local.record(now.saturating_sub(sent).max(1));
                            }
                        }
                        delivered.fetch_add(1, Ordering::Relaxed);
                        at += used;
                    }
                    buf.drain(..at);
                }
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
        })
    };
    let published = Arc::new(AtomicU64::new(0));
    let writer = {
        let (delivered, published, stop) = (delivered.clone(), published.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = 0u64;
            let mut p = vec![0x42u8; payload.max(16)];
            if shape.json {
                let body = json_filler(p.len() - 16);
                p[16..].copy_from_slice(&body);
            }
            // Open loop (--rate): one batch per tick on a fixed schedule.
            let pace = (rate > 0.0).then(|| Duration::from_secs_f64(batch.max(1) as f64 / rate));
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = pace {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    next += p;
                }
                let done = delivered.load(Ordering::Relaxed);
                if seq * subs as u64 > done + window * subs as u64 {
                    std::thread::yield_now();
                    continue;
                }
                for _ in 0..batch.max(1) {
                    p[..8].copy_from_slice(&seq.to_le_bytes());
                    p[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                    publisher.push(&p);
                    seq += 1;
                }
                if publisher.flush().is_err() {
                    break;
                }
                published.store(seq, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(warmup);
    on_start();
    let (d0, p0) = (
        delivered.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(dur);
    measuring.store(false, Ordering::Relaxed);
    let seconds = t0.elapsed().as_secs_f64();
    let (d1, p1) = (
        delivered.load(Ordering::Relaxed),
        published.load(Ordering::Relaxed),
    );
    let wire_bytes = wire.load(Ordering::Relaxed);
    on_end();
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let _ = reader.join();
    let latency = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| Histogram::new(3).expect("sigfig"));
    Ok(Fanout {
        published: p1 - p0,
        delivered: d1 - d0,
        gaps: gaps.load(Ordering::Relaxed),
        dups: dups.load(Ordering::Relaxed),
        latency,
        seconds,
        wire_bytes,
    })
}

/// A minimal upstream feed for `source-fanout`: accepts one WebSocket
/// client (corerelay's source connection) and writes server frames carrying
/// a sequence number and send time, keeping at most `window` messages ahead
/// of the slowest-possible delivery count.
// The run's parameters and shared counters, passed as they are.
#[allow(clippy::too_many_arguments)]
pub fn feed_server(
    epoch: Instant,
    payload: usize,
    window: u64,
    clients: u64,
    delivered: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
    go: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let _ = s.set_nodelay(true);
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
        let text = String::from_utf8_lossy(&head);
        let key = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Sec-WebSocket-Key:")
                    .or_else(|| l.strip_prefix("sec-websocket-key:"))
            })
            .unwrap_or("")
            .trim()
            .to_owned();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if write!(s, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").is_err() {
            return;
        }
        while !go.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut p = vec![0x42u8; payload.max(16)];
        let mut out = Vec::with_capacity(64 * 1024);
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if seq * clients > delivered.load(Ordering::Relaxed) + window * clients {
                std::thread::yield_now();
                continue;
            }
            out.clear();
            for _ in 0..8 {
                p[..8].copy_from_slice(&seq.to_le_bytes());
                p[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                out.push(0x82);
                let len = p.len();
                if len < 126 {
                    out.push(len as u8);
                } else {
                    out.push(126);
                    out.extend_from_slice(&(len as u16).to_be_bytes());
                }
                out.extend_from_slice(&p);
                seq += 1;
            }
            if s.write_all(&out).is_err() {
                return;
            }
            published.store(seq, Ordering::Relaxed);
        }
    });
    Ok(addr)
}

/// Reads WebSocket (`ws`) and Unix (length-prefixed) clients with one mio
/// thread, counting deliveries, gaps and latency (payload: seq, send time).
pub struct Readers {
    pub delivered: Arc<AtomicU64>,
    pub gaps: Arc<AtomicU64>,
    pub measuring: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
    pub hist: Arc<Mutex<Histogram<u64>>>,
    pub thread: std::thread::JoinHandle<()>,
}

/// A connected client for [`readers`].
pub enum Client {
    /// A WebSocket client (upgrade done).
    Ws(mio::net::TcpStream),
    /// A Unix-socket client (4-byte length framing).
    Unix(mio::net::UnixStream),
    /// A Redis subscriber (pub/sub pushes; the payload of each message).
    Resp(mio::net::TcpStream),
}

/// How a client's bytes are framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    Ws,
    LenPrefix,
    Resp,
}

/// The payload of a pub/sub push (`message` or `pmessage`), if it is one.
fn push_payload<'a>(v: &resp::Value<'a>) -> Option<&'a [u8]> {
    let resp::Value::Array(parts) = v else {
        return None;
    };
    match parts.as_slice() {
        [k, _, p] if k.bytes() == Some(b"message") => p.bytes(),
        [k, _, _, p] if k.bytes() == Some(b"pmessage") => p.bytes(),
        _ => None,
    }
}

/// The first whole frame in `b`: its payload (None: a frame with none,
/// such as a subscription confirmation) and its length.
fn next_frame(framing: Framing, b: &[u8]) -> Option<(Option<&[u8]>, usize)> {
    match framing {
        Framing::Ws => parse_server_frame(b).map(|(p, n)| (Some(p), n)),
        Framing::LenPrefix if b.len() >= 4 => {
            let n = u32::from_be_bytes(b[..4].try_into().unwrap_or_default()) as usize;
            (b.len() >= 4 + n).then(|| (Some(&b[4..4 + n]), 4 + n))
        }
        Framing::LenPrefix => None,
        Framing::Resp => match resp::decode(b, usize::MAX) {
            Ok(Some((v, n))) => Some((push_payload(&v), n)),
            _ => None,
        },
    }
}

/// Starts the reader over already-connected clients.
pub fn readers(epoch: Instant, clients: Vec<Client>) -> io::Result<Readers> {
    let poll = Poll::new()?;
    let mut conns = Vec::with_capacity(clients.len());
    for (i, c) in clients.into_iter().enumerate() {
        let (s, framing) = match c {
            Client::Unix(mut u) => {
                poll.registry()
                    .register(&mut u, Token(i), Interest::READABLE)?;
                (Err(u), Framing::LenPrefix)
            }
            Client::Ws(mut t) => {
                poll.registry()
                    .register(&mut t, Token(i), Interest::READABLE)?;
                (Ok(t), Framing::Ws)
            }
            Client::Resp(mut t) => {
                poll.registry()
                    .register(&mut t, Token(i), Interest::READABLE)?;
                (Ok(t), Framing::Resp)
            }
        };
        conns.push((s, Vec::<u8>::new(), SeqTracker::default(), framing));
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let gaps = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds"),
    ));
    let (d, g, m, st, h) = (
        delivered.clone(),
        gaps.clone(),
        measuring.clone(),
        stop.clone(),
        hist.clone(),
    );
    let mut poll = poll;
    let thread = std::thread::spawn(move || {
        let mut events = Events::with_capacity(1024);
        let mut tmp = vec![0u8; 256 * 1024];
        let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
        while !st.load(Ordering::Relaxed) {
            if poll
                .poll(&mut events, Some(Duration::from_millis(50)))
                .is_err()
            {
                break;
            }
            for ev in events.iter() {
                let (s, buf, next, framing) = &mut conns[ev.token().0];
                loop {
                    let r = match s {
                        Ok(t) => t.read(&mut tmp),
                        Err(u) => u.read(&mut tmp),
                    };
                    match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let measure = m.load(Ordering::Relaxed);
                let mut at = 0;
                while let Some((p, used)) = next_frame(*framing, &buf[at..]) {
                    let Some(p) = p else {
                        at += used;
                        continue;
                    };
                    if p.len() >= 16 {
                        let seq = u64::from_le_bytes(p[..8].try_into().unwrap_or_default());
                        let sent = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                        let before = next.gaps;
                        next.observe(seq);
                        g.fetch_add(next.gaps - before, Ordering::Relaxed);
                        if measure {
                            let _ = local.record(now.saturating_sub(sent).max(1));
                        }
                    }
                    d.fetch_add(1, Ordering::Relaxed);
                    at += used;
                }
                buf.drain(..at);
            }
        }
        if let Ok(mut hh) = h.lock() {
            let _ = hh.add(&local);
        }
    });
    Ok(Readers {
        delivered,
        gaps,
        measuring,
        stop,
        hist,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_duplicates_are_counted_exactly() {
        let mut t = SeqTracker::default();
        // 0 1 2 [3 dropped] 4 4(dup) 5 [6 7 dropped] 8 5(dup, late) 9
        for s in [0, 1, 2, 4, 4, 5, 8, 5, 9] {
            t.observe(s);
        }
        assert_eq!(
            t,
            SeqTracker {
                next: 10,
                gaps: 3,
                dups: 2
            }
        );
    }

    #[test]
    fn server_frames_parse_whole_only() {
        let mut f = Vec::new();
        corerelay::protocol::ws::encode_frame(&mut f, 0x2, &[7u8; 300]);
        assert_eq!(
            parse_server_frame(&f).map(|(p, n)| (p.len(), n)),
            Some((300, f.len()))
        );
        assert!(parse_server_frame(&f[..f.len() - 1]).is_none());
    }
}

//! The `floor` mode: the least work a WebSocket relay can do, as the
//! baseline the fan-out and echo figures are printed next to. One thread,
//! one mio poll, no features: every connection on `/echo` gets its
//! messages back; every other connection is a member of one room, and each
//! message a member sends goes to every other member. Per loop iteration,
//! the messages read are framed once into one buffer, and each member gets
//! them with one `writev` (its own messages left out); what a socket does
//! not take waits in that member's buffer. It never limits a slow member.
//!
//! It runs until killed and prints `listening on ADDR` first.

use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;

use corerelay::protocol::ws;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

struct Peer {
    s: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes the socket has not taken yet.
    out: Vec<u8>,
    upgraded: bool,
    echo: bool,
    dead: bool,
}

/// One client frame: (opcode, payload unmasked, bytes used), or None when
/// incomplete. Fragments and extensions are not supported (nor sent by the
/// tool).
fn parse(b: &mut [u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let op = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    let mask = if masked {
        let m: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at.checked_add(len)?;
    if b.len() < end {
        return None;
    }
    if let Some(m) = mask {
        for (i, x) in b[at..end].iter_mut().enumerate() {
            *x ^= m[i % 4];
        }
    }
    Some((op, at..end, end))
}

/// The 101 answer for a request head, and whether it asked for `/echo`.
fn upgrade(head: &str) -> Option<(String, bool)> {
    let path = head.split_whitespace().nth(1)?;
    let key = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| v.trim().to_owned())
    })?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Some((
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ),
        path == "/echo",
    ))
}

/// Writes `out` (then `parts`) without blocking; keeps what is left in
/// `out`. False when the connection failed.
fn send(p: &mut Peer, parts: &[&[u8]]) -> bool {
    if p.out.is_empty() && !parts.is_empty() && parts.len() <= 8 {
        let mut iov = [IoSlice::new(&[]); 8];
        for (i, b) in parts.iter().enumerate() {
            iov[i] = IoSlice::new(b);
        }
        let total: usize = parts.iter().map(|b| b.len()).sum();
        let mut n = match p.s.write_vectored(&iov[..parts.len()]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return false,
        };
        if n == total {
            return true;
        }
        for b in parts {
            let skip = n.min(b.len());
            p.out.extend_from_slice(&b[skip..]);
            n -= skip;
        }
        return true;
    }
    for b in parts {
        p.out.extend_from_slice(b);
    }
    let mut off = 0;
    while off < p.out.len() {
        match p.s.write(&p.out[off..]) {
            Ok(0) => return false,
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    p.out.drain(..off);
    true
}

/// Runs the floor relay on `addr` until the process is killed.
pub fn run(addr: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);
    let mut peers: slab::Slab<Peer> = slab::Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; 256 * 1024];
    // This iteration's room messages, framed, and who sent each.
    let mut batch: Vec<u8> = Vec::new();
    let mut senders: Vec<(usize, usize, usize)> = Vec::new();
    let mut dirty: Vec<usize> = Vec::new();
    let mut gone: Vec<usize> = Vec::new();
    loop {
        poll.poll(&mut events, None)?;
        batch.clear();
        senders.clear();
        dirty.clear();
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nodelay(true);
                            let e = peers.vacant_entry();
                            poll.registry().register(
                                &mut s,
                                Token(e.key()),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            e.insert(Peer {
                                s,
                                inbuf: Vec::new(),
                                out: Vec::new(),
                                upgraded: false,
                                echo: false,
                                dead: false,
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let k = ev.token().0;
            let Some(p) = peers.get_mut(k) else { continue };
            if ev.is_writable() && !p.out.is_empty() {
                dirty.push(k);
            }
            if !ev.is_readable() {
                continue;
            }
            loop {
                match p.s.read(&mut rbuf) {
                    Ok(0) => {
                        p.dead = true;
                        gone.push(k);
                        break;
                    }
                    Ok(n) => p.inbuf.extend_from_slice(&rbuf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        p.dead = true;
                        gone.push(k);
                        break;
                    }
                }
            }
            if !p.upgraded {
                let Some(end) = p.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&p.inbuf[..end]).into_owned();
                p.inbuf.drain(..end + 4);
                let Some((answer, echo)) = upgrade(&head) else {
                    p.dead = true;
                    gone.push(k);
                    continue;
                };
                p.upgraded = true;
                p.echo = echo;
                p.out.extend_from_slice(answer.as_bytes());
                dirty.push(k);
            }
            let mut at = 0;
            while let Some((op, body, used)) = parse(&mut p.inbuf[at..]) {
                let body = at + body.start..at + body.end;
                at += used;
                match op {
                    ws::OP_CLOSE => {
                        p.dead = true;
                        gone.push(k);
                    }
                    ws::OP_PING => {
                        ws::encode_header(&mut p.out, ws::OP_PONG, true, body.len());
                        let pong = p.inbuf[body].to_vec();
                        p.out.extend_from_slice(&pong);
                        dirty.push(k);
                    }
                    ws::OP_TEXT | ws::OP_BINARY if p.echo => {
                        ws::encode_header(&mut p.out, op, true, body.len());
                        let m = p.inbuf[body].to_vec();
                        p.out.extend_from_slice(&m);
                        dirty.push(k);
                    }
                    ws::OP_TEXT | ws::OP_BINARY => {
                        let start = batch.len();
                        ws::encode_header(&mut batch, op, true, body.len());
                        batch.extend_from_slice(&p.inbuf[body]);
                        senders.push((k, start, batch.len()));
                    }
                    _ => {}
                }
            }
            p.inbuf.drain(..at);
        }
        if !batch.is_empty() {
            let mut parts: Vec<&[u8]> = Vec::with_capacity(8);
            for (k, p) in peers.iter_mut() {
                if !p.upgraded || p.echo || p.dead {
                    continue;
                }
                // Its own messages left out: the stretches between them.
                parts.clear();
                let mut from = 0;
                for &(s, a, b) in &senders {
                    if s == k {
                        if a > from {
                            parts.push(&batch[from..a]);
                        }
                        from = b;
                    }
                }
                if from < batch.len() {
                    parts.push(&batch[from..]);
                }
                if !send(p, &parts) {
                    p.dead = true;
                    gone.push(k);
                }
            }
        }
        for &k in &dirty {
            if let Some(p) = peers.get_mut(k) {
                if !send(p, &[]) {
                    p.dead = true;
                    gone.push(k);
                }
            }
        }
        for k in gone.drain(..) {
            if peers.get(k).is_some_and(|p| p.dead) {
                let mut p = peers.remove(k);
                let _ = poll.registry().deregister(&mut p.s);
            }
        }
    }
}

//! Soak: mixed clients against one server for a while, then back to
//! baseline. Ignored by default; `.ci/run` runs it for a short time:
//! `CORERELAY_SOAK_SECS=15 cargo test --test tests soak -- --ignored`.
//!
//! At the same time: RELY pairs streaming (order checked), a WebSocket room
//! with a broadcaster, admin calls (/send, /status, /metrics), connection
//! churn (RELY and WebSocket), one consumer that never reads, one pinger.
//! Afterwards: no connection, no queued byte, the process's descriptors
//! back to where they were, and the counters agree with each other.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

const ROOM: &str = "  max_output_bytes: 256KiB\n  endpoints:\n    - path: /room/{room}/{id}\n      id_param: id\n      on_message: broadcast\n      broadcast_tag: room\n    - path: /echo\n      on_message: echo\nadmin:\n  listen: [\"127.0.0.1:0\"]\n";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[test]
#[ignore = "long; run by .ci/run with CORERELAY_SOAK_SECS"]
fn soak_mixed_clients_return_to_baseline() {
    let secs: u64 = std::env::var("CORERELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (s, ws) = ws_server(2, ROOM, |c| c.send_timeout = Some(Duration::from_secs(2)));
    let admin = s.handle.admin_addrs()[0];
    let rely = s.addr;
    let baseline = open_fds();
    let stop = Arc::new(AtomicBool::new(false));
    let relayed = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // RELY pairs: each side sends numbered messages and checks the order.
    for p in 0..4 {
        let (stop, relayed) = (stop.clone(), relayed.clone());
        let a = s.login(&format!("pa{p}"));
        let b = s.login(&format!("pb{p}"));
        threads.push(std::thread::spawn(move || {
            let (mut ar, mut aw) = a.split();
            let (mut br, _bw) = b.split();
            let (mut sent, mut got) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                aw.send(format!("pb{p}").as_bytes(), &sent.to_be_bytes())
                    .unwrap();
                sent += 1;
                while got < sent {
                    let m = br.recv(Some(WAIT)).unwrap().expect("relayed");
                    assert_eq!(m.payload, got.to_be_bytes(), "pair {p}: in order");
                    got += 1;
                    relayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = ar.recv(Some(Duration::from_millis(1)));
        }));
    }

    // A room: a broadcaster and members that read everything.
    let members: Vec<WsRaw> = (0..10)
        .map(|i| WsRaw::connect(ws, &format!("/room/r/m{i}")))
        .collect();
    let mut caster = WsRaw::connect(ws, "/room/r/caster");
    wait_until(
        || s.handle.owner_core(b"m9").is_some() && s.handle.owner_core(b"caster").is_some(),
        "room",
    );
    let cast = Arc::new(AtomicU64::new(0));
    {
        let (stop, cast) = (stop.clone(), cast.clone());
        // 16 KiB every 2 ms: enough to fill the slow member's buffers.
        let news = [b"news".as_slice(), &[b'.'; 16 * 1024]].concat();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                caster.send(0x1, true, &news);
                cast.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    // A member that falls 256 KiB behind (16 messages: the machine is
    // starved) is cut as a slow consumer, as it should be; that is the
    // only close it may see.
    let cut = Arc::new(AtomicU64::new(0));
    for mut m in members {
        let (stop, cut) = (stop.clone(), cut.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match m.read_within(Duration::from_millis(100)) {
                    Ok(Some(f)) if f.opcode == 0x8 => {
                        assert_eq!(f.close_code(), Some(1008), "only a slow consumer is cut");
                        cut.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    // The broadcaster's, or the admin API's /send.
                    Ok(Some(f)) => assert!(
                        f.opcode == 0x1
                            && (f.payload.starts_with(b"news") || f.payload == b"admin"),
                        "opcode {} {:?}",
                        f.opcode,
                        &f.payload[..f.payload.len().min(16)]
                    ),
                    Ok(None) => panic!("a member's connection ended without a close"),
                    Err(()) => {}
                }
            }
        }));
    }

    // The admin API: sends to the room, status, metrics, on keep-alive.
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(
                    http(admin, "POST", "/send?room=r", &[], b"admin").status,
                    200
                );
                assert_eq!(http(admin, "GET", "/status", &[], b"").status, 200);
                assert_eq!(http(admin, "GET", "/metrics", &[], b"").status, 200);
            }
        }));
    }

    // Churn: connections that come and go, logged in or upgraded.
    {
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut r = Raw::connect(rely);
                r.send(&login_frame(&format!("churn{}", i % 16)));
                let mut w = WsRaw::connect(ws, "/echo");
                w.send(0x2, true, b"x");
                assert_eq!(w.read().expect("echo").payload, b"x");
                drop(r);
                drop(w);
                i += 1;
            }
        }));
    }

    // A member that never reads (tiny receive buffer): it must be cut.
    let slow = {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&ws.into()).unwrap();
        let mut t: std::net::TcpStream = sock.into();
        t.write_all(WsRaw::request("/room/r/slow").as_bytes())
            .unwrap();
        assert!(read_http_head(&mut t).starts_with("HTTP/1.1 101"));
        t
    };

    // A pinger: pings, reads its pongs.
    {
        let stop = stop.clone();
        let mut p = WsRaw::connect(ws, "/echo");
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                p.send(0x9, true, b"ping");
                let f = p.read().expect("pong");
                assert_eq!((f.opcode, f.payload.as_slice()), (0xA, &b"ping"[..]));
            }
        }));
    }

    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a soak client failed");
    }
    let mut slow = slow;
    let mut sink = Vec::new();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let _ = slow.read_to_end(&mut sink);
    drop(slow);

    // Back to baseline.
    wait_until(
        || s.handle.metrics().connections == 0,
        "every connection closed",
    );
    wait_until(|| s.handle.metrics().queued_bytes == 0, "nothing queued");
    wait_until(|| open_fds() <= baseline, "descriptors back to baseline");
    let m = s.handle.metrics();
    assert_eq!(
        m.accepted, m.closed,
        "every accepted connection closed once"
    );
    assert!(
        m.slow_consumer_disconnect + m.write_timeouts > cut.load(Ordering::Relaxed),
        "the slow member was cut, and each member that saw a 1008 is counted"
    );
    assert_eq!(m.protocol_errors, 0);
    assert!(relayed.load(Ordering::Relaxed) > 0 && cast.load(Ordering::Relaxed) > 0);
    eprintln!(
        "soak: {secs} s, {} accepted, {} relayed, {} broadcasts, {} fan-out deliveries, {} reading members cut as slow",
        m.accepted,
        relayed.load(Ordering::Relaxed),
        cast.load(Ordering::Relaxed),
        m.fanout_deliveries,
        cut.load(Ordering::Relaxed)
    );
}

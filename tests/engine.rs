//! The engine across cores: delivery between cores, ordering, the
//! last-login-wins race, slow receivers, connection limits.

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use corerelay::config::SlowConsumer;

use crate::support::*;

#[test]
fn delivery_between_cores_both_ways_in_order() {
    let s = TestServer::start(4);
    let mut alice = s.login("alice");
    let a_core = s.core_of("alice");
    let mut bob = s.login_not_on("bob", a_core);
    assert_ne!(s.core_of("bob"), a_core, "the test needs two cores");

    const N: u32 = 5000;
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            alice.send(b"bob", &i.to_be_bytes()).unwrap();
        }
        alice
    });
    for i in 0..N {
        let m = bob.recv(Some(WAIT)).unwrap().expect("message");
        assert_eq!(m.payload, i.to_be_bytes(), "order kept across cores");
    }
    let mut alice = sender.join().unwrap();
    bob.send(b"alice", b"back").unwrap();
    assert_eq!(alice.recv(Some(WAIT)).unwrap().unwrap().payload, b"back");
    assert!(s.handle.metrics().cross_core >= u64::from(N));
}

#[test]
fn many_pairs_across_cores() {
    let s = TestServer::start(4);
    let mut pairs = Vec::new();
    for p in 0..20 {
        let a = s.login(&format!("a{p}"));
        let b = s.login_not_on(&format!("b{p}"), s.core_of(&format!("a{p}")));
        pairs.push((p, a, b));
    }
    let threads: Vec<_> = pairs
        .into_iter()
        .map(|(p, mut a, mut b)| {
            std::thread::spawn(move || {
                let to = format!("b{p}");
                for i in 0..200u32 {
                    a.send(to.as_bytes(), &i.to_be_bytes()).unwrap();
                    let m = b.recv(Some(WAIT)).unwrap().expect("delivered");
                    assert_eq!(m.payload, i.to_be_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Many threads log in as one id at the same moment, on several cores,
/// repeatedly: exactly one connection survives, and it is the directory's.
#[test]
fn last_login_wins_race() {
    let s = TestServer::start(4);
    const CLIENTS: usize = 12;
    for round in 0..10 {
        let id = format!("contested-{round}");
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let addr = s.addr;
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (b, id) = (barrier.clone(), id.clone());
                std::thread::spawn(move || {
                    let mut raw = TcpStream::connect(addr).unwrap();
                    let f = login_frame(&id);
                    b.wait();
                    std::io::Write::write_all(&mut raw, &f).unwrap();
                    raw
                })
            })
            .collect();
        let mut conns: Vec<Raw> = threads
            .into_iter()
            .map(|t| Raw(t.join().unwrap()))
            .collect();
        // Exactly one stays: all others are closed.
        let mut open = Vec::new();
        for (i, c) in conns.iter_mut().enumerate() {
            c.0.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut b = [0u8; 1];
            match c.0.read(&mut b) {
                Ok(0) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => {}
                Err(_) => open.push(i),
                Ok(_) => panic!("unexpected data"),
            }
        }
        assert_eq!(
            open.len(),
            1,
            "round {round}: exactly one survivor, got {open:?}"
        );
        // And the survivor is the one the id resolves to.
        let mut sender = s.login(&format!("sender-{round}"));
        sender.send(id.as_bytes(), b"who").unwrap();
        let want = transfer_frame(&format!("sender-{round}"), &id, b"who");
        assert_eq!(conns[open[0]].read_exact(want.len()), want);
    }
    assert_eq!(s.handle.metrics().kicked_login, 10 * (CLIENTS as u64 - 1));
}

/// Two connections each log in as one id many times, at once, on two
/// cores: every login of one displaces the other's, and kicks cross in
/// flight. A kick must reach only the login it displaced, so exactly one
/// connection survives, every time, and it is the one the id resolves to:
/// a transfer to the id reaches it, and the other reads an EOF.
#[test]
fn repeated_racing_logins_leave_exactly_one_holder() {
    let s = TestServer::start(2);
    const TRIALS: u64 = 200;
    const LOGINS: usize = 100;
    let mut sender = s.login("sender");
    for trial in 0..TRIALS {
        let id = format!("raced-{trial}");
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (b, id, addr) = (barrier.clone(), id.clone(), s.addr);
                std::thread::spawn(move || {
                    let mut raw = TcpStream::connect(addr).unwrap();
                    let burst: Vec<u8> = (0..LOGINS).flat_map(|_| login_frame(&id)).collect();
                    b.wait();
                    // A kicked connection may be closed mid-burst.
                    let _ = std::io::Write::write_all(&mut raw, &burst);
                    raw
                })
            })
            .collect();
        let mut conns: Vec<Raw> = threads
            .into_iter()
            .map(|t| Raw(t.join().unwrap()))
            .collect();
        // The loser reads an EOF (reads with a short timeout, bounded).
        let mut loser = None;
        let deadline = Instant::now() + WAIT;
        while loser.is_none() && Instant::now() < deadline {
            for (i, c) in conns.iter_mut().enumerate() {
                c.0.set_read_timeout(Some(Duration::from_millis(5)))
                    .unwrap();
                let mut b = [0u8; 1];
                match c.0.read(&mut b) {
                    Ok(0) => loser = Some(i),
                    Ok(_) => panic!("trial {trial}: unexpected data"),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => loser = Some(i),
                    Err(_) => {}
                }
            }
        }
        let loser = loser.expect("one connection kicked");
        // The other is the holder: alive, and a transfer to the id reaches it.
        let survivor = &mut conns[1 - loser];
        sender.send(id.as_bytes(), b"who").unwrap();
        let want = transfer_frame("sender", &id, b"who");
        survivor.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = vec![0u8; want.len()];
        let got = std::io::Read::read_exact(&mut survivor.0, &mut buf);
        assert!(
            got.is_ok() && buf == want,
            "trial {trial}: the other one holds the id"
        );
    }
}

fn small_rcvbuf_client(s: &TestServer, id: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut t: TcpStream = sock.into();
    std::io::Write::write_all(&mut t, &login_frame(id)).unwrap();
    wait_until(
        || s.handle.owner_core(id.as_bytes()).is_some(),
        "slow client logged in",
    );
    t
}

#[test]
fn slow_receiver_is_disconnected_and_sender_never_blocks() {
    const LIMIT: usize = 256 * 1024;
    let s = TestServer::with(2, |c| {
        c.rely.max_output_bytes = LIMIT;
        c.rely.slow_consumer = SlowConsumer::Disconnect;
    });
    let mut slow = small_rcvbuf_client(&s, "slow");
    let mut fast_rx = s.login("fast-rx");
    let mut sender = s.login("sender");
    let payload = vec![0x5a; 16 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    // Far more than kernel buffers plus the limit; stop once the slow one is cut.
    while s.handle.metrics().slow_consumer_disconnect == 0 {
        assert!(sent < 4096, "slow receiver never disconnected");
        sender.send(b"slow", &payload).unwrap();
        sent += 1;
        assert!(start.elapsed() < Duration::from_secs(20), "sender blocked");
    }
    assert!(s.handle.metrics().queued_bytes <= (LIMIT + payload.len() + 64) as u64 * 2);
    // The slow connection is closed; after draining what was buffered it sees EOF.
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = vec![0u8; 1 << 16];
    let mut eof = false;
    for _ in 0..100_000 {
        match slow.read(&mut sink) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(_) => {}
            Err(_) => {
                eof = true;
                break;
            }
        }
    }
    assert!(eof, "slow receiver closed");
    // Its queued bytes left with it (a graceful drain waits for this to be 0).
    wait_until(
        || s.handle.metrics().queued_bytes == 0,
        "queue accounting released",
    );
    // Everyone else carries on.
    sender.send(b"fast-rx", b"still fast").unwrap();
    assert_eq!(
        fast_rx.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"still fast"
    );
}

#[test]
fn slow_receiver_drop_policy_keeps_connection_and_counts() {
    const LIMIT: usize = 128 * 1024;
    let s = TestServer::with(2, |c| {
        c.rely.max_output_bytes = LIMIT;
        c.rely.slow_consumer = SlowConsumer::Drop;
    });
    let slow = small_rcvbuf_client(&s, "slow");
    let mut sender = s.login("sender");
    let payload = vec![0xa5; 16 * 1024];
    let mut sent = 0;
    while s.handle.metrics().slow_consumer_drop < 10 {
        assert!(sent < 4096, "nothing dropped");
        sender.send(b"slow", &payload).unwrap();
        sent += 1;
    }
    // Server memory for it stays bounded by the limit (plus one message).
    assert!(s.handle.metrics().queued_bytes <= (LIMIT + payload.len() + 64) as u64);
    assert_eq!(s.handle.metrics().slow_consumer_disconnect, 0);
    // Still connected: drain it; frames arrive whole (drops are whole
    // messages, never partial bytes), and a fresh message arrives last.
    let mut slow = slow;
    sender.send(b"slow", b"final").unwrap();
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut dec = corerelay::protocol::rely::Decoder::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut frames, mut last) = (0usize, Vec::new());
    while last != b"final" {
        let n = slow.read(&mut buf).expect("slow receiver still connected");
        assert!(n > 0, "slow receiver was closed");
        dec.feed(&buf[..n], u32::MAX, |f| {
            if let corerelay::protocol::rely::Frame::Transfer { payload, .. } = f {
                frames += 1;
                last = payload.to_vec();
            }
            true
        })
        .expect("whole frames");
    }
    // Every message was either delivered whole or dropped and counted
    // (sent messages plus "final").
    let drops = s.handle.metrics().slow_consumer_drop as usize;
    assert!(drops >= 10);
    assert_eq!(frames, sent + 1 - drops, "delivered = sent - dropped");
    assert_eq!(s.handle.metrics().slow_consumer_disconnect, 0);
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let s = TestServer::with(1, |c| c.max_connections = 2);
    let _a = s.login("a");
    let _b = s.login("b");
    let mut c = Raw::connect(s.addr);
    assert!(c.closed(), "third connection refused");
    wait_until(|| s.handle.metrics().rejected_limit == 1, "counted");
}

/// A delivery whose destination died before it was applied is counted in
/// `dropped_dead_conn`, never handed to the slot's next tenant. Made certain
/// without timing: the victim sends itself a transfer and a malformed frame
/// in one write, so its core reads both in one pass; the transfer becomes a
/// local delivery applied after the reads, by which time the bad frame has
/// closed the victim. (The generation check against a reused slot is
/// proven by the core's unit test `stale_delivery_to_a_reused_slot_is_counted`.)
#[test]
fn dead_connection_deliveries_are_counted_not_misdelivered() {
    let s = TestServer::start(1);
    for round in 0..5u64 {
        let mut victim = Raw::connect(s.addr);
        victim.send(&login_frame("victim"));
        wait_until(|| s.handle.owner_core(b"victim").is_some(), "victim in");
        let mut burst = transfer_frame("victim", "victim", b"to my dead self");
        burst.extend_from_slice(b"not a RELY frame at all");
        victim.send(&burst);
        assert!(victim.closed(), "the malformed frame closes the victim");
        wait_until(
            || s.handle.metrics().dropped_dead_conn == round + 1,
            "the delivery to the dead victim counted",
        );
        // A newcomer (most likely in the freed slot) gets nothing of it.
        let mut newcomer = s.login(&format!("newcomer-{round}"));
        assert!(newcomer
            .recv(Some(Duration::from_millis(20)))
            .unwrap()
            .is_none());
    }
    let m = s.handle.metrics();
    assert_eq!((m.dropped_dead_conn, m.protocol_errors), (5, 5));
}

/// With a one-batch channel, cross-core traffic overflows into the sender's
/// local outbox all the time; nothing may be lost or reordered.
#[test]
fn full_cross_core_channel_loses_and_reorders_nothing() {
    let s = TestServer::with(2, |c| c.mesh_capacity = 1);
    const PAIRS: usize = 8;
    const N: u32 = 50_000;
    let mut threads = Vec::new();
    for p in 0..PAIRS {
        let (a, b) = (format!("a{p}"), format!("b{p}"));
        let mut ca = s.login(&a);
        let mut cb = s.login_not_on(&b, s.core_of(&a));
        let sender = std::thread::spawn(move || {
            // Frames written in large batches so one read carries many.
            let mut buf = Vec::new();
            for i in 0..N {
                buf.extend_from_slice(&transfer_frame(&a, &b, &i.to_be_bytes()));
                if buf.len() > 64 * 1024 {
                    ca.writer.send_raw(&buf).unwrap();
                    buf.clear();
                }
            }
            ca.writer.send_raw(&buf).unwrap();
            ca
        });
        let receiver = std::thread::spawn(move || {
            for i in 0..N {
                let m = cb.recv(Some(WAIT)).unwrap().expect("no loss");
                assert_eq!(m.payload, i.to_be_bytes(), "order kept through overflow");
            }
        });
        threads.push((sender, receiver));
    }
    for (snd, rcv) in threads {
        rcv.join().unwrap();
        drop(snd.join().unwrap());
    }
    assert!(
        s.handle.metrics().mesh_overflow > 0,
        "the channel was actually full"
    );
}

/// Shutdown right after the server has read a burst of cross-core traffic
/// (with a one-batch channel, so much of it waits in the sender core's
/// overflow): every message read before the signal is still delivered, in
/// order, before the receiver sees EOF.
#[test]
fn shutdown_delivers_everything_read_across_cores() {
    let s = TestServer::with(2, |c| c.mesh_capacity = 1);
    let mut alice = s.login("alice");
    let mut bob = s.login_not_on("bob", s.core_of("alice"));
    const N: u32 = 100_000;
    let receiver = std::thread::spawn(move || {
        let mut got = 0u32;
        loop {
            match bob.recv(Some(WAIT)) {
                Ok(Some(m)) => {
                    assert_eq!(m.payload, got.to_be_bytes());
                    got += 1;
                }
                Ok(None) => panic!("stalled after {got}"),
                Err(_) => return got, // EOF at shutdown
            }
        }
    });
    let mut buf = Vec::new();
    for i in 0..N {
        buf.extend_from_slice(&transfer_frame("alice", "bob", &i.to_be_bytes()));
    }
    alice.writer.send_raw(&buf).unwrap();
    let frames = u64::from(N) + 2; // plus the two logins
    wait_until(
        || s.handle.metrics().frames_in >= frames,
        "server read everything",
    );
    s.handle.shutdown();
    assert_eq!(receiver.join().unwrap(), N);
}

/// A receiver whose socket takes nothing is cut after send_timeout even
/// under its byte limit (nginx's send_timeout), and counted.
#[test]
fn a_receiver_that_takes_nothing_is_cut_at_send_timeout() {
    let s = TestServer::with(1, |c| {
        c.send_timeout = Some(Duration::from_millis(300));
        c.rely.max_output_bytes = 256 << 20;
    });
    let _sink = small_rcvbuf_client(&s, "sink");
    let mut sender = s.login("source");
    // Enough to fill the kernel's buffers, far under the byte limit.
    let payload = vec![0u8; 64 * 1024];
    for _ in 0..200 {
        sender.send(b"sink", &payload).unwrap();
    }
    wait_until(|| s.handle.metrics().write_timeouts == 1, "cut");
    assert_eq!(
        s.handle.metrics().slow_consumer_disconnect,
        0,
        "under its byte limit"
    );
    wait_until(|| s.handle.owner_core(b"sink").is_none(), "closed");
}

/// max_memory caps the bytes queued on all cores together: two receivers
/// that never read, each under its own byte limit, are cut largest first
/// once the total passes the cap, and the total comes back under it.
#[test]
fn max_memory_cuts_the_largest_queues() {
    let s = TestServer::with(2, |c| {
        c.max_memory = Some(512 * 1024);
        c.rely.max_output_bytes = 64 << 20;
        c.send_timeout = None;
    });
    let _a = small_rcvbuf_client(&s, "sink-a");
    let _b = small_rcvbuf_client(&s, "sink-b");
    let mut sender = s.login("source");
    let payload = vec![0u8; 64 * 1024];
    for _ in 0..100 {
        sender.send(b"sink-a", &payload).unwrap();
        sender.send(b"sink-b", &payload).unwrap();
    }
    wait_until(|| s.handle.metrics().memory_cuts >= 1, "a queue cut");
    wait_until(
        || s.handle.metrics().queued_bytes <= 512 * 1024,
        "queued bytes back under the cap",
    );
    assert_eq!(
        s.handle.metrics().slow_consumer_disconnect,
        0,
        "under their own limits"
    );
}

#[test]
fn a_busy_port_is_refused_with_how_to_find_the_holder() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let mut cfg = corerelay::config::Config::defaults();
    cfg.workers = 1;
    cfg.pin = false;
    cfg.rely.listen = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    cfg.admin = None;
    let e = match corerelay::Server::start(cfg) {
        Ok(_) => panic!("started on a busy port"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(e.contains(&format!("ss -ltnp 'sport = :{port}'")), "{e}");
    assert!(e.contains("ip_local_reserved_ports"), "{e}");
}

/// A reload that lowers the output limit applies to connections already
/// open: a receiver that stopped reading, under a limit it would never
/// reach, is cut at the new one.
#[test]
fn reload_lowers_the_output_limit_of_open_connections() {
    let s = TestServer::with(2, |c| {
        c.rely.max_output_bytes = 1 << 30;
        c.rely.slow_consumer = SlowConsumer::Disconnect;
    });
    let _slow = small_rcvbuf_client(&s, "slow");
    let mut sender = s.login("sender");
    let mut reloader = s.handle.reloader();
    let mut new = reloader.running().clone();
    new.rely.max_output_bytes = 256 * 1024;
    let report = reloader.apply(new);
    assert_eq!(report.applied, vec!["rely"]);
    assert!(report.restart.is_empty() && report.failed.is_empty());
    let payload = vec![0x5a; 16 * 1024];
    let mut sent = 0;
    // 64 MiB at most: far under the old limit, far over the new one.
    while s.handle.metrics().slow_consumer_disconnect == 0 {
        assert!(sent < 4096, "the lowered limit never applied");
        sender.send(b"slow", &payload).unwrap();
        sent += 1;
    }
    assert!(s.handle.metrics().queued_bytes <= 2 * (256 + 17) * 1024);
}

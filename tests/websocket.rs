//! The WebSocket server: handshake, echo, framing rules and their close
//! codes, keepalive, handshake limits, shutdown. Real clients over loopback:
//! tungstenite's client, and a raw client for what no library would send.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use tungstenite::Message;

use crate::support::*;

const ECHO: &str =
    "  endpoints:\n    - path: /echo\n      on_message: echo\n      max_message_size: 64KiB\n";

#[test]
fn library_client_echo_text_and_binary() {
    let (_s, ws) = ws_server(2, ECHO, |_| {});
    let (mut c, resp) = tungstenite::connect(format!("ws://{ws}/echo")).expect("upgrade");
    assert_eq!(resp.status(), 101);
    c.send(Message::Text("héllo".into())).unwrap();
    assert_eq!(c.read().unwrap(), Message::Text("héllo".into()));
    c.send(Message::Binary(vec![0u8, 1, 2, 255].into()))
        .unwrap();
    assert_eq!(
        c.read().unwrap(),
        Message::Binary(vec![0u8, 1, 2, 255].into())
    );
    let big = "x".repeat(60_000);
    c.send(Message::Text(big.clone().into())).unwrap();
    assert_eq!(c.read().unwrap(), Message::Text(big.into()));
    c.close(None).unwrap();
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    let (_s, ws) = ws_server(1, ECHO, |_| {});
    let mut c = WsRaw::connect(ws, "/echo");
    c.send(0x1, false, "frag".as_bytes());
    c.send(0x9, true, b"mid");
    c.send(0x0, false, "men".as_bytes());
    c.send(0x0, true, "ted €".as_bytes());
    let pong = c.read().unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"mid"[..]));
    let m = c.read().unwrap();
    assert_eq!(
        (m.opcode, m.fin, m.payload),
        (0x1, true, "fragmented €".as_bytes().to_vec())
    );
}

#[test]
fn frames_split_byte_by_byte_and_many_per_read() {
    let (_s, ws) = ws_server(1, ECHO, |_| {});
    let mut c = WsRaw::connect(ws, "/echo");
    let mut stream = Vec::new();
    for i in 0..50 {
        stream.extend(WsRaw::frame(0x2, true, format!("m{i}").as_bytes()));
    }
    for chunk in stream[..40].chunks(1) {
        c.send_raw(chunk);
        std::thread::sleep(Duration::from_micros(100));
    }
    c.send_raw(&stream[40..]);
    for i in 0..50 {
        assert_eq!(c.read().unwrap().payload, format!("m{i}").as_bytes());
    }
}

fn assert_closes_with(ws: std::net::SocketAddr, bytes: &[u8], code: u16, what: &str) {
    let mut c = WsRaw::connect(ws, "/echo");
    c.send_raw(bytes);
    assert_eq!(c.expect_close(), code, "{what}");
    assert!(c.eof(), "{what}: TCP closed after the close frame");
}

#[test]
fn protocol_errors_send_the_right_close_code() {
    let (s, ws) = ws_server(2, ECHO, |_| {});
    let mut bystander = WsRaw::connect(ws, "/echo");
    let mut unmasked = vec![0x81, 0x02];
    unmasked.extend_from_slice(b"hi");
    assert_closes_with(ws, &unmasked, 1002, "unmasked client frame");
    let mut rsv = WsRaw::frame(0x1, true, b"x");
    rsv[0] |= 0x40;
    assert_closes_with(ws, &rsv, 1002, "reserved bit without extension");
    assert_closes_with(ws, &WsRaw::frame(0x3, true, b""), 1002, "reserved opcode");
    assert_closes_with(
        ws,
        &WsRaw::frame(0x0, true, b"x"),
        1002,
        "continuation without start",
    );
    assert_closes_with(ws, &WsRaw::frame(0x9, false, b""), 1002, "fragmented ping");
    assert_closes_with(
        ws,
        &WsRaw::frame(0x9, true, &[0; 126]),
        1002,
        "ping over 125 bytes",
    );
    assert_closes_with(
        ws,
        &WsRaw::frame(0x1, true, &[0xc3, 0x28]),
        1007,
        "invalid UTF-8",
    );
    assert_closes_with(
        ws,
        &WsRaw::frame(0x8, true, &[0x03, 0xe8, 0xff]),
        1007,
        "close reason not UTF-8",
    );
    assert_closes_with(
        ws,
        &WsRaw::frame(0x8, true, &[0x03, 0xed]),
        1002,
        "close code 1005 on the wire",
    );
    assert_closes_with(
        ws,
        &WsRaw::frame(0x2, true, &vec![0; 65 * 1024]),
        1009,
        "message over max_message_size",
    );
    // Over the limit by fragments: rejected when the total passes it.
    let mut frags = WsRaw::frame(0x2, false, &vec![0; 40 * 1024]);
    frags.extend(WsRaw::frame(0x0, true, &vec![0; 40 * 1024]));
    assert_closes_with(ws, &frags, 1009, "fragments over max_message_size");
    // A header announcing 2^62 bytes: 1009 without waiting for any payload.
    let mut huge = vec![0x82, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    assert_closes_with(ws, &huge, 1009, "huge length");
    assert!(s.handle.metrics().protocol_errors >= 11);
    // Nobody else was affected.
    bystander.send(0x1, true, b"still here");
    assert_eq!(bystander.read().unwrap().payload, b"still here");
}

#[test]
fn client_close_is_echoed_then_tcp_closes() {
    let (_s, ws) = ws_server(1, ECHO, |_| {});
    let mut c = WsRaw::connect(ws, "/echo");
    c.send(0x1, true, b"last words");
    c.send(0x8, true, &[0x0f, 0xa0, b'b', b'y', b'e']); // 4000 "bye"
    assert_eq!(
        c.read().unwrap().payload,
        b"last words",
        "echo before the close"
    );
    assert_eq!(c.expect_close(), 4000, "the peer's code is echoed");
    assert!(c.eof());
    let mut c = WsRaw::connect(ws, "/echo");
    c.send(0x8, true, b"");
    assert_eq!(
        c.read().unwrap().payload,
        vec![0x03, 0xe8],
        "empty close answered with 1000"
    );
}

#[test]
fn server_pings_and_closes_silent_clients() {
    let (s, ws) = ws_server(1, ECHO, |c| {
        let w = c.websocket.as_mut().unwrap();
        w.ping_interval = Some(Duration::from_millis(200));
        w.pong_timeout = Duration::from_millis(300);
    });
    let mut polite = WsRaw::connect(ws, "/echo");
    let mut silent = WsRaw::connect(ws, "/echo");
    // The polite one answers three pings and stays.
    for _ in 0..3 {
        let ping = polite.read().unwrap();
        assert_eq!(ping.opcode, 0x9);
        polite.send(0xA, true, &ping.payload);
    }
    // The silent one got a ping, never answered, and was closed.
    assert_eq!(silent.read().unwrap().opcode, 0x9);
    assert!(silent.eof());
    assert_eq!(s.handle.metrics().ws_ping_timeouts, 1);
    polite.send(0x1, true, b"alive");
    loop {
        let f = polite.read().unwrap();
        if f.opcode == 0x1 {
            assert_eq!(f.payload, b"alive");
            break;
        }
        polite.send(0xA, true, &f.payload);
    }
}

#[test]
fn handshake_refusals() {
    let (s, ws) = ws_server(1, ECHO, |c| {
        c.websocket.as_mut().unwrap().handshake_timeout = Duration::from_millis(300);
    });
    let status = |req: &[u8]| {
        let mut t = std::net::TcpStream::connect(ws).unwrap();
        t.write_all(req).unwrap();
        let head = read_http_head(&mut t);
        let mut body = Vec::new();
        // read_to_end returns only at EOF: the server closes after the body.
        std::io::Read::read_to_end(&mut t, &mut body).expect("closed after the refusal");
        head.lines().next().unwrap_or("").to_owned()
    };
    assert!(status(WsRaw::request("/nope").as_bytes()).contains("404"));
    assert!(status(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").contains("426"));
    let v8 = WsRaw::request("/echo").replace("Version: 13", "Version: 8");
    assert!(status(v8.as_bytes()).contains("426"));
    let nokey =
        WsRaw::request("/echo").replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    assert!(status(nokey.as_bytes()).contains("400"));
    // 24 characters, but not base64 of 16 bytes (RFC 6455 4.1).
    let badkey =
        WsRaw::request("/echo").replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!!!!!!!!!!!!!!!!!!!!!!");
    assert!(status(badkey.as_bytes()).contains("400"));
    assert!(status(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").contains("400"));
    let mut huge = WsRaw::request("/echo").replace("\r\n\r\n", "\r\n");
    huge.push_str(&format!("X-Pad: {}\r\n\r\n", "a".repeat(9000)));
    assert!(status(huge.as_bytes()).contains("431"));
    // Slowloris: half a request, then nothing: closed at the deadline.
    let mut slow = Raw::connect(ws);
    slow.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n");
    assert!(slow.closed());
    assert_eq!(s.handle.metrics().ws_handshake_timeouts, 1);
    assert_eq!(s.handle.metrics().ws_handshake_errors, 7);
}

#[test]
fn shutdown_sends_going_away() {
    let (s, ws) = ws_server(2, ECHO, |_| {});
    let mut a = WsRaw::connect(ws, "/echo");
    let mut b = WsRaw::connect(ws, "/echo");
    a.send(0x1, true, b"sync");
    assert_eq!(a.read().unwrap().payload, b"sync");
    b.send(0x1, true, b"sync");
    assert_eq!(b.read().unwrap().payload, b"sync");
    s.handle.shutdown();
    assert_eq!(a.expect_close(), 1001);
    assert_eq!(b.expect_close(), 1001);
    assert!(a.eof() && b.eof());
}

/// Pongs are own writes like echoes: a client that pings and never reads
/// is cut at the connection's limit, not allowed to grow the server.
#[test]
fn pongs_to_a_client_that_never_reads_are_bounded() {
    let (s, ws) = ws_server(1, ECHO, |c| {
        c.websocket.as_mut().unwrap().max_output_bytes = 64 * 1024;
    });
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&ws.into()).unwrap();
    let mut t: std::net::TcpStream = sock.into();
    t.write_all(WsRaw::request("/echo").as_bytes()).unwrap();
    assert!(read_http_head(&mut t).starts_with("HTTP/1.1 101"));
    let mut c = WsRaw(t);
    // 256 pings of 125 bytes per write.
    let burst: Vec<u8> = (0..256)
        .flat_map(|_| WsRaw::frame(0x9, true, &[1u8; 125]))
        .collect();
    c.0.set_write_timeout(Some(WAIT)).unwrap();
    let mut sent = 0;
    while s.handle.metrics().slow_consumer_disconnect == 0 {
        assert!(sent < 4096, "never disconnected");
        if c.0.write_all(&burst).is_err() {
            break; // the server closed us
        }
        sent += 1;
    }
    wait_until(
        || s.handle.metrics().slow_consumer_disconnect == 1,
        "the pinger is cut",
    );
    assert!(s.handle.metrics().queued_bytes <= 64 * 1024 + 64 * 1024);
    wait_until(|| s.handle.metrics().connections == 0, "closed");
}

#[test]
fn echo_to_a_client_that_never_reads_is_bounded() {
    let (s, ws) = ws_server(1, ECHO, |c| {
        c.websocket.as_mut().unwrap().max_output_bytes = 256 * 1024;
    });
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&ws.into()).unwrap();
    let mut t: std::net::TcpStream = sock.into();
    t.write_all(WsRaw::request("/echo").as_bytes()).unwrap();
    assert!(read_http_head(&mut t).starts_with("HTTP/1.1 101"));
    let mut c = WsRaw(t);
    let frame = WsRaw::frame(0x2, true, &[7u8; 32 * 1024]);
    c.0.set_write_timeout(Some(WAIT)).unwrap();
    let mut sent = 0;
    while s.handle.metrics().slow_consumer_disconnect == 0 {
        assert!(sent < 4096, "never disconnected");
        if c.0.write_all(&frame).is_err() {
            break; // the server closed us
        }
        sent += 1;
    }
    wait_until(
        || s.handle.metrics().slow_consumer_disconnect == 1,
        "slow consumer counted",
    );
    assert!(s.handle.metrics().queued_bytes <= 256 * 1024 + 64 * 1024);
    wait_until(
        || s.handle.metrics().connections == 0,
        "slow consumer closed",
    );
    wait_until(
        || s.handle.metrics().queued_bytes == 0,
        "queue accounting released",
    );
}

const ROOMS: &str = "  endpoints:\n    - path: /room/{room}/{id}\n      id_param: id\n      on_message: broadcast\n      broadcast_tag: room\n";

/// Connects `id` to `room`; returns it and its core.
fn join(s: &TestServer, ws: std::net::SocketAddr, room: &str, id: &str) -> (WsRaw, usize) {
    let c = WsRaw::connect(ws, &format!("/room/{room}/{id}"));
    wait_until(
        || s.handle.owner_core(id.as_bytes()).is_some(),
        "registered",
    );
    (c, s.core_of(id))
}

#[test]
fn broadcast_reaches_every_other_member_on_every_core_once_in_order() {
    let (s, ws) = ws_server(4, ROOMS, |_| {});
    let (mut sender, _) = join(&s, ws, "a", "sender");
    let mut members = Vec::new();
    let mut cores = std::collections::HashSet::new();
    for i in 0..12 {
        let (c, core) = join(&s, ws, "a", &format!("m{i}"));
        cores.insert(core);
        members.push(c);
    }
    // Certainty, not luck: members must span several cores.
    let mut extra = 0;
    while cores.len() < 2 {
        assert!(extra < 100, "could not spread members over cores");
        let (c, core) = join(&s, ws, "a", &format!("x{extra}"));
        cores.insert(core);
        members.push(c);
        extra += 1;
    }
    let (mut other_room, _) = join(&s, ws, "b", "outsider");
    const N: usize = 100;
    for i in 0..N {
        sender.send(0x1, true, format!("msg {i}").as_bytes());
    }
    for (k, m) in members.iter_mut().enumerate() {
        for i in 0..N {
            let f = m.read().unwrap();
            assert_eq!(
                (f.opcode, f.payload.as_slice()),
                (0x1, format!("msg {i}").as_bytes()),
                "member {k}"
            );
        }
        assert!(
            m.read_within(Duration::from_millis(20)).is_err(),
            "member {k}: nothing extra"
        );
    }
    assert!(
        sender.read_within(Duration::from_millis(50)).is_err(),
        "the sender does not get its own messages"
    );
    assert!(
        other_room.read_within(Duration::from_millis(50)).is_err(),
        "other rooms get nothing"
    );
    assert_eq!(
        s.handle.metrics().fanout_deliveries,
        (N * members.len()) as u64
    );
}

#[test]
fn binary_broadcast_stays_binary() {
    let (s, ws) = ws_server(2, ROOMS, |_| {});
    let (mut a, _) = join(&s, ws, "r", "a");
    let (mut b, _) = join(&s, ws, "r", "b");
    a.send(0x2, true, &[0, 1, 2]);
    let f = b.read().unwrap();
    assert_eq!((f.opcode, f.payload), (0x2, vec![0, 1, 2]));
}

const RELY_WS: &str =
    "  endpoints:\n    - path: /rely/{id}\n      id_param: id\n      on_message: rely\n";

#[test]
fn rely_mode_websocket_and_rely_clients_address_each_other_across_cores() {
    let (s, ws) = ws_server(4, RELY_WS, |_| {});
    let mut bob = s.login("bob");
    let bob_core = s.core_of("bob");
    // Land the WebSocket client on another core (bounded retries).
    let mut web = None;
    for _ in 0..100 {
        let (c, core) = join_path(&s, ws, "/rely/web", "web");
        if core != bob_core {
            web = Some(c);
            break;
        }
        drop(c);
        wait_until(|| s.handle.owner_core(b"web").is_none(), "old login gone");
    }
    let mut web = web.expect("WebSocket client on another core");

    // WebSocket -> RELY: the binary message is the RELY frame, forwarded byte for byte.
    let frame = transfer_frame("web", "bob", b"from the browser");
    web.send(0x2, true, &frame);
    let m = bob.recv(Some(WAIT)).unwrap().expect("bob receives");
    assert_eq!(
        (m.from.as_slice(), m.payload.as_slice()),
        (&b"web"[..], &b"from the browser"[..])
    );

    // RELY -> WebSocket: arrives as one binary message holding the frame.
    bob.send(b"web", b"from a RELY client").unwrap();
    let f = web.read().unwrap();
    assert_eq!(
        (f.opcode, f.payload),
        (0x2, transfer_frame("bob", "web", b"from a RELY client"))
    );

    // Heartbeats are accepted and not forwarded; offline ids are discarded.
    web.send(0x2, true, &transfer_frame("web", "", b""));
    web.send(0x2, true, &transfer_frame("web", "nobody", b"x"));
    wait_until(
        || s.handle.metrics().dropped_offline == 1,
        "offline counted",
    );
    assert!(bob.recv(Some(Duration::from_millis(50))).unwrap().is_none());
}

#[test]
fn rely_mode_rejects_text_garbage_and_spoofing() {
    let (s, ws) = ws_server(1, RELY_WS, |_| {});
    let (mut c, _) = join_path(&s, ws, "/rely/a", "a");
    c.send(0x1, true, b"text is not a RELY frame");
    assert_eq!(c.expect_close(), 1003);
    let (mut c, _) = join_path(&s, ws, "/rely/a", "a");
    c.send(0x2, true, b"RELY garbage");
    assert_eq!(c.expect_close(), 1007);
    let (mut c, _) = join_path(&s, ws, "/rely/a", "a");
    let mut two = transfer_frame("a", "b", b"1");
    two.extend(transfer_frame("a", "b", b"2"));
    c.send(0x2, true, &two);
    assert_eq!(c.expect_close(), 1007, "exactly one frame per message");
    let (mut c, _) = join_path(&s, ws, "/rely/a", "a");
    c.send(0x2, true, &transfer_frame("mallory", "b", b"x"));
    assert_eq!(c.expect_close(), 1008);
    assert_eq!(s.handle.metrics().spoofed_from, 1);
}

#[test]
fn websocket_id_last_login_wins_with_1008() {
    let (s, ws) = ws_server(2, RELY_WS, |_| {});
    let (mut old, _) = join_path(&s, ws, "/rely/dup", "dup");
    let new = WsRaw::connect(ws, "/rely/dup");
    assert_eq!(old.expect_close(), 1008);
    assert!(old.eof());
    let mut bob = s.login("bob");
    bob.send(b"dup", b"to the newest").unwrap();
    let mut new = new;
    assert_eq!(
        new.read().unwrap().payload,
        transfer_frame("bob", "dup", b"to the newest")
    );
}

/// Connects to `path`, waits for `id` to register; returns it and its core.
fn join_path(s: &TestServer, ws: std::net::SocketAddr, path: &str, id: &str) -> (WsRaw, usize) {
    let before = s.handle.metrics().ws_upgrades;
    let c = WsRaw::connect(ws, path);
    wait_until(
        || s.handle.metrics().ws_upgrades > before && s.handle.owner_core(id.as_bytes()).is_some(),
        "registered",
    );
    (c, s.core_of(id))
}

#[test]
fn slow_member_is_cut_while_the_others_keep_receiving() {
    let (s, ws) = ws_server(2, ROOMS, |c| {
        c.websocket.as_mut().unwrap().max_output_bytes = 128 * 1024
    });
    // A member that never reads, with a tiny receive buffer.
    let _slow = never_reading_ws(ws, "/room/r/slow");
    wait_until(|| s.handle.owner_core(b"slow").is_some(), "slow in");
    let (mut sender, _) = join(&s, ws, "r", "sender");
    let mut readers: Vec<WsRaw> = (0..3)
        .map(|i| join(&s, ws, "r", &format!("ok{i}")).0)
        .collect();
    // Well past what kernel buffers absorb (the server's send buffer
    // autotunes up to several MiB).
    const N: usize = 600;
    let payload = vec![b'x'; 16 * 1024];
    let mut got = vec![0usize; readers.len()];
    for i in 0..N {
        sender.send(0x2, true, &payload);
        // Readers keep up: each takes every message as it comes.
        {
            for (k, r) in readers.iter_mut().enumerate() {
                while got[k] <= i {
                    assert_eq!(r.read().unwrap().payload.len(), 16 * 1024);
                    got[k] += 1;
                }
            }
        }
    }
    assert_eq!(got, vec![N; 3], "every reader got every message");
    wait_until(
        || s.handle.metrics().slow_consumer_disconnect == 1,
        "slow member cut",
    );
    assert!(s.handle.metrics().queued_bytes < 4 * 128 * 1024);
}

/// Members that each send a burst at once (read in one iteration, so
/// queued as runs that skip each sender's own messages): every member gets
/// every other member's messages once, in each sender's order, and none of
/// its own; a member that only listens gets them all.
#[test]
fn bursts_from_several_members_reach_every_other_member_in_each_senders_order() {
    let (s, ws) = ws_server(2, ROOMS, |_| {});
    const SENDERS: usize = 4;
    const N: usize = 300;
    let mut members: Vec<WsRaw> = (0..SENDERS)
        .map(|k| join(&s, ws, "r", &format!("s{k}")).0)
        .collect();
    members.push(join(&s, ws, "r", "listener").0);
    for (k, m) in members.iter_mut().take(SENDERS).enumerate() {
        let burst: Vec<u8> = (0..N)
            .flat_map(|i| WsRaw::frame(0x1, true, format!("{k}:{i}").as_bytes()))
            .collect();
        m.send_raw(&burst);
    }
    for (me, m) in members.iter_mut().enumerate() {
        let others = if me < SENDERS { SENDERS - 1 } else { SENDERS };
        let mut next = [0usize; SENDERS];
        for _ in 0..others * N {
            let f = m.read().expect("a message");
            let text = String::from_utf8(f.payload).expect("text");
            let (k, i) = text.split_once(':').expect("k:i");
            let (k, i): (usize, usize) = (k.parse().unwrap(), i.parse().unwrap());
            assert_ne!(k, me, "member {me} got its own message {i}");
            assert_eq!(i, next[k], "member {me}: sender {k} out of order");
            next[k] += 1;
        }
        assert!(
            m.read_within(Duration::from_millis(20)).is_err(),
            "member {me}: nothing extra"
        );
    }
    assert_eq!(
        s.handle.metrics().fanout_deliveries,
        (SENDERS * N * SENDERS) as u64
    );
}

/// A burst larger than a member's limit under the `drop` policy: the
/// member keeps what fits, in order, the rest is dropped message by message
/// and counted, and nothing is both.
#[test]
fn a_burst_over_a_members_limit_under_drop_keeps_an_ordered_prefix_and_counts_the_rest() {
    let (s, ws) = ws_server(1, ROOMS, |c| {
        let w = c.websocket.as_mut().unwrap();
        w.max_output_bytes = 64 * 1024;
        w.slow_consumer = corerelay::config::SlowConsumer::Drop;
    });
    let slow = never_reading_ws(ws, "/room/r/slow");
    wait_until(|| s.handle.owner_core(b"slow").is_some(), "slow in");
    let (mut sender, _) = join(&s, ws, "r", "sender");
    const N: usize = 2000;
    let burst: Vec<u8> = (0..N as u32)
        .flat_map(|i| {
            let mut p = i.to_be_bytes().to_vec();
            p.resize(1024, b'x');
            WsRaw::frame(0x2, true, &p)
        })
        .collect();
    sender.send_raw(&burst);
    wait_until(
        || {
            let m = s.handle.metrics();
            m.fanout_deliveries + m.slow_consumer_drop == N as u64
        },
        "every message queued or dropped",
    );
    let m = s.handle.metrics();
    assert!(m.slow_consumer_drop > 0, "the limit held");
    assert_eq!(m.slow_consumer_disconnect, 0);
    // What was queued arrives in order, starting with the first message.
    let kept = m.fanout_deliveries as usize;
    let mut r = WsRaw(slow);
    let mut last = None;
    for _ in 0..kept {
        let f = r.read().expect("a kept message");
        let i = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
        assert!(last.is_none_or(|l| i > l), "in order");
        if last.is_none() {
            assert_eq!(i, 0, "the first message fits an empty queue");
        }
        last = Some(i);
    }
    assert!(r.read_within(Duration::from_millis(50)).is_err(), "no more");
}

/// Path parameters that decode to invalid UTF-8 stay distinct: `%ff` and
/// `%fe` are two ids, so neither connection replaces the other.
#[test]
fn invalid_utf8_ids_stay_distinct() {
    let (s, ws) = ws_server(1, ROOMS, |_| {});
    let mut a = WsRaw::connect(ws, "/room/r/%ff");
    let mut b = WsRaw::connect(ws, "/room/r/%fe");
    wait_until(|| s.handle.logged_in() == 2, "two ids");
    assert_eq!(s.handle.metrics().kicked_login, 0);
    a.send(0x1, true, b"hello");
    assert_eq!(
        b.read().unwrap().payload,
        b"hello",
        "both in the room, both open"
    );
}

/// A broadcast read before the shutdown begins reaches every member on
/// every core, before their close 1001 (the goodbyes wait until no core
/// will send anything more).
#[test]
fn a_broadcast_read_before_shutdown_reaches_every_core() {
    for trial in 0..6 {
        let (s, ws) = ws_server(2, ROOMS, |c| c.shutdown_grace = Duration::from_secs(5));
        let mut members: Vec<WsRaw> = (0..100)
            .map(|i| WsRaw::connect(ws, &format!("/room/r/m{i}")))
            .collect();
        let mut sender = WsRaw::connect(ws, "/room/r/sender");
        wait_until(|| s.handle.logged_in() == 101, "all in the room");
        let cores: HashSet<usize> = (0..100).map(|i| s.core_of(&format!("m{i}"))).collect();
        assert_eq!(cores.len(), 2, "members on both cores");
        sender.send(0x1, true, b"last words");
        wait_until(
            || s.handle.metrics().ws_messages_in == 1,
            "the broadcast is read",
        );
        s.handle.shutdown();
        for (i, m) in members.iter_mut().enumerate() {
            let f = m.read().expect("a frame");
            assert_eq!(
                (f.opcode, f.payload.as_slice()),
                (0x1, &b"last words"[..]),
                "trial {trial}: member {i} got the broadcast before its close"
            );
            assert_eq!(m.expect_close(), 1001);
        }
    }
}

/// Ids are one namespace unless an endpoint takes a prefix: with
/// `id_prefix`, a WebSocket client cannot take a RELY client's id.
#[test]
fn id_prefix_keeps_endpoint_ids_apart_from_rely_ids() {
    let eps = "  endpoints:\n    - path: /p/{id}\n      id_param: id\n      id_prefix: \"ws:\"\n      on_message: rely\n";
    let (s, ws) = ws_server(2, eps, |_| {});
    let mut relay_alice = s.login("alice");
    let _ws_alice = WsRaw::connect(ws, "/p/alice");
    wait_until(|| s.handle.owner_core(b"ws:alice").is_some(), "ws:alice in");
    assert_eq!(s.handle.metrics().kicked_login, 0, "nobody replaced");
    let mut bob = s.login("bob");
    bob.send(b"alice", b"for the RELY client").unwrap();
    let m = relay_alice
        .recv(Some(WAIT))
        .unwrap()
        .expect("still alice's");
    assert_eq!(m.payload, b"for the RELY client");
}

#[test]
fn allowed_origins_refuse_other_browser_origins_with_403() {
    let (s, ws) = crate::support::ws_server(
        1,
        "  endpoints:\n    - path: /app\n      on_message: echo\n      allowed_origins: [\"https://app.example.com\", \"https://*.example.org/\"]\n",
        |_| {},
    );
    let upgrade = |origin: Option<&str>| {
        let mut t = std::net::TcpStream::connect(ws).unwrap();
        let mut req = crate::support::WsRaw::request("/app");
        if let Some(o) = origin {
            req = req.replacen("\r\n\r\n", &format!("\r\nOrigin: {o}\r\n\r\n"), 1);
        }
        std::io::Write::write_all(&mut t, req.as_bytes()).unwrap();
        crate::support::read_http_head(&mut t)
    };
    assert!(upgrade(Some("https://app.example.com")).starts_with("HTTP/1.1 101"));
    assert!(
        upgrade(Some("HTTPS://App.Example.com")).starts_with("HTTP/1.1 101"),
        "case-insensitive"
    );
    assert!(
        upgrade(Some("https://eu.example.org")).starts_with("HTTP/1.1 101"),
        "a wildcard"
    );
    assert!(
        upgrade(None).starts_with("HTTP/1.1 101"),
        "clients that are not browsers send none"
    );
    let refused = upgrade(Some("http://evil.example"));
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(upgrade(Some("https://example.org.evil.com")).starts_with("HTTP/1.1 403"));
    assert_eq!(s.handle.metrics().ws_origin_refused, 2);
}

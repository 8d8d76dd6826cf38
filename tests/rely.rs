//! RELY behaviour, as the relayd README states it, through real sockets.

use std::time::Duration;

use crate::support::*;

#[test]
fn transfer_is_forwarded_byte_for_byte() {
    let s = TestServer::start(2);
    let mut alice = Raw::connect(s.addr);
    alice.send(&login_frame("alice"));
    let mut bob = Raw::connect(s.addr);
    bob.send(&login_frame("bob"));
    wait_until(|| s.handle.logged_in() == 2, "both logged in");
    let frame = transfer_frame("alice", "bob", b"hello \x00\xff bob");
    alice.send(&frame);
    assert_eq!(bob.read_exact(frame.len()), frame);
    // Empty payloads are frames too.
    let empty = transfer_frame("alice", "bob", b"");
    alice.send(&empty);
    assert_eq!(bob.read_exact(empty.len()), empty);
}

#[test]
fn client_library_round_trip() {
    let s = TestServer::start(2);
    let mut a = s.login("alice");
    let mut b = s.login("bob");
    a.send(b"bob", b"ping").unwrap();
    let m = b.recv(Some(WAIT)).unwrap().expect("bob receives");
    assert_eq!(
        (m.from.as_slice(), m.to.as_slice(), m.payload.as_slice()),
        (&b"alice"[..], &b"bob"[..], &b"ping"[..])
    );
    b.send(b"alice", b"pong").unwrap();
    assert_eq!(a.recv(Some(WAIT)).unwrap().unwrap().payload, b"pong");
}

#[test]
fn heartbeat_is_not_forwarded_and_keeps_the_connection() {
    let s = TestServer::with(1, |c| {
        c.rely.idle_timeout = Some(Duration::from_millis(600))
    });
    let mut alice = s.login("alice");
    let mut bob = s.login("bob");
    let mut silent = Raw::connect(s.addr);
    silent.send(&login_frame("silent"));
    // Heartbeat for 1.5 s, over twice the idle timeout.
    for _ in 0..10 {
        alice.writer.heartbeat().unwrap();
        bob.writer.heartbeat().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_until(
        || s.handle.metrics().heartbeats == 20,
        "20 heartbeats counted",
    );
    assert!(
        silent.closed(),
        "a silent connection is closed for inactivity"
    );
    assert!(s.handle.metrics().idle_timeouts >= 1);
    // Both heartbeating connections are still open, and bob's first frame
    // is alice's message: no heartbeat was forwarded.
    alice.send(b"bob", b"after heartbeats").unwrap();
    assert_eq!(
        bob.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"after heartbeats"
    );
}

#[test]
fn idle_connection_is_closed() {
    let s = TestServer::with(1, |c| {
        c.rely.idle_timeout = Some(Duration::from_millis(300))
    });
    let mut never_logs_in = Raw::connect(s.addr);
    let mut logged_in = Raw::connect(s.addr);
    logged_in.send(&login_frame("x"));
    assert!(never_logs_in.closed());
    assert!(logged_in.closed());
    wait_until(|| s.handle.metrics().idle_timeouts == 2, "both counted");
    wait_until(|| s.handle.logged_in() == 0, "id released");
}

#[test]
fn offline_destination_is_discarded() {
    let s = TestServer::start(2);
    let mut alice = s.login("alice");
    let mut bob = s.login("bob");
    alice.send(b"nobody", b"lost").unwrap();
    alice.send(b"bob", b"kept").unwrap();
    assert_eq!(bob.recv(Some(WAIT)).unwrap().unwrap().payload, b"kept");
    assert_eq!(s.handle.metrics().dropped_offline, 1);
    // A peer that left is offline too.
    drop(bob);
    wait_until(|| s.handle.owner_core(b"bob").is_none(), "bob gone");
    alice.send(b"bob", b"late").unwrap();
    wait_until(|| s.handle.metrics().dropped_offline == 2, "counted");
    // The sender is unaffected.
    let mut carol = s.login("carol");
    alice.send(b"carol", b"still here").unwrap();
    assert_eq!(
        carol.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"still here"
    );
}

/// The newer login is placed on the other core with certainty (a probe
/// login shows where a connection lives; a RELY client may log in again
/// under another id), so the kick crosses cores.
#[test]
fn last_login_wins() {
    let s = TestServer::start(2);
    let mut old = s.login("alice");
    let old_core = s.core_of("alice");
    let mut new = None;
    for i in 0..64 {
        let mut c = Raw::connect(s.addr);
        let probe = format!("probe-{i}");
        c.send(&login_frame(&probe));
        wait_until(
            || s.handle.owner_core(probe.as_bytes()).is_some(),
            "probe in",
        );
        if s.core_of(&probe) != old_core {
            new = Some(c);
            break;
        }
    }
    let mut new = new.expect("a connection on the other core within 64 tries");
    new.send(&login_frame("alice"));
    assert!(
        old.reader.closed_within(WAIT),
        "the older connection is closed"
    );
    wait_until(|| s.handle.metrics().kicked_login == 1, "kick counted");
    assert_ne!(
        s.core_of("alice"),
        old_core,
        "alice now lives on the other core"
    );
    let mut bob = s.login("bob");
    bob.send(b"alice", b"to the newest").unwrap();
    let want = transfer_frame("bob", "alice", b"to the newest");
    assert_eq!(new.read_exact(want.len()), want);
}

fn assert_closed_after(s: &TestServer, bytes: &[u8], what: &str) {
    let mut c = Raw::connect(s.addr);
    c.send(bytes);
    assert!(c.closed(), "{what}: connection should be closed");
}

#[test]
fn protocol_violations_close_the_connection() {
    let s = TestServer::with(2, |c| c.rely.max_payload = 1024);
    let mut bystander_a = s.login("a");
    let mut bystander_b = s.login("b");

    assert_closed_after(
        &s,
        &transfer_frame("x", "a", b"hi"),
        "transfer before login",
    );
    assert_closed_after(&s, b"RELX\x01\x01\x01x", "bad magic");
    assert_closed_after(&s, b"GET / HTTP/1.1\r\n\r\n", "not RELY at all");
    assert_closed_after(&s, b"RELY\x02\x01\x01x", "bad version");
    assert_closed_after(&s, b"RELY\x01\x05\x01x", "bad command");
    assert_closed_after(&s, b"RELY\x01\x01\x00", "empty login id");
    let mut f = login_frame("y");
    f.extend_from_slice(b"RELY\x01\x09\x00");
    assert_closed_after(&s, &f, "empty from id");
    let mut f = login_frame("z");
    f.extend_from_slice(&transfer_frame("z", "a", &[0u8; 1025]));
    assert_closed_after(&s, &f, "payload over the configured limit");

    let m = s.handle.metrics();
    assert_eq!(m.not_logged_in, 1);
    assert_eq!(m.protocol_errors, 7);
    // Nobody else noticed.
    bystander_a.send(b"b", b"fine").unwrap();
    assert_eq!(
        bystander_b.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"fine"
    );
}

#[test]
fn four_gib_payload_is_rejected_from_the_header() {
    let s = TestServer::start(1);
    let mut c = Raw::connect(s.addr);
    c.send(&login_frame("big"));
    // The header alone announces 4 GiB - 1; no payload follows. The server
    // must close at once rather than wait for (or allocate) the payload.
    let mut f = b"RELY\x01\x09\x03big\x01x".to_vec();
    f.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&f);
    assert!(c.closed());
    assert_eq!(s.handle.metrics().protocol_errors, 1);
}

#[test]
fn from_id_spoofing() {
    let s = TestServer::start(1);
    let mut bob = s.login("bob");
    let mut mallory = Raw::connect(s.addr);
    mallory.send(&login_frame("mallory"));
    mallory.send(&transfer_frame("alice", "bob", b"i am alice"));
    assert!(
        mallory.closed(),
        "spoofed FromClientID closes with check_from: true"
    );
    assert_eq!(s.handle.metrics().spoofed_from, 1);
    assert!(bob
        .recv(Some(Duration::from_millis(200)))
        .unwrap()
        .is_none());

    let s = TestServer::with(1, |c| c.rely.check_from = false);
    let mut bob = s.login("bob");
    let mut proxy = Raw::connect(s.addr);
    proxy.send(&login_frame("proxy"));
    proxy.send(&transfer_frame("alice", "bob", b"on behalf of alice"));
    let m = bob.recv(Some(WAIT)).unwrap().unwrap();
    assert_eq!(
        (m.from.as_slice(), m.payload.as_slice()),
        (&b"alice"[..], &b"on behalf of alice"[..])
    );
}

#[test]
fn byte_by_byte_input() {
    let s = TestServer::start(2);
    let mut bob = s.login("bob");
    let mut alice = Raw::connect(s.addr);
    let mut stream = login_frame("alice");
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| transfer_frame("alice", "bob", format!("msg {i}").as_bytes()))
        .collect();
    for f in &frames {
        stream.extend_from_slice(f);
    }
    for b in &stream {
        alice.send(std::slice::from_ref(b));
        // Let each byte arrive on its own (TCP_NODELAY is on).
        std::thread::sleep(Duration::from_micros(200));
    }
    for i in 0..3 {
        let m = bob.recv(Some(WAIT)).unwrap().expect("frame");
        assert_eq!(m.payload, format!("msg {i}").as_bytes());
    }
}

#[test]
fn relogin_on_same_connection_changes_id() {
    let s = TestServer::start(1);
    let mut c = Raw::connect(s.addr);
    c.send(&login_frame("first"));
    wait_until(|| s.handle.owner_core(b"first").is_some(), "first");
    c.send(&login_frame("second"));
    wait_until(
        || s.handle.owner_core(b"second").is_some() && s.handle.owner_core(b"first").is_none(),
        "renamed",
    );
    let mut bob = s.login("bob");
    bob.send(b"second", b"x").unwrap();
    let want = transfer_frame("bob", "second", b"x");
    assert_eq!(c.read_exact(want.len()), want);
}

#[test]
fn idle_timeout_fires_in_busy_poll_mode() {
    // A spinning core with no traffic must still run its timers.
    let s = TestServer::with(1, |c| {
        c.busy_poll = true;
        c.rely.idle_timeout = Some(Duration::from_millis(300));
    });
    let mut c = Raw::connect(s.addr);
    c.send(&login_frame("idle"));
    assert!(c.closed());
    assert_eq!(s.handle.metrics().idle_timeouts, 1);
}

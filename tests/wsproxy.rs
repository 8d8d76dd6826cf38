//! wsproxy sessions against a real redis-server the tests start: auth,
//! subscribe-before-101, down and up, Redis restarts, Redis that hangs or
//! answers too much, /health and /ready. The checks of wsproxy's own
//! black-box suites (websocket_flow.rs, bidirectional_flow.rs,
//! test_wsproxy.py) are here in our words.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use corerelay::config::Config;
use corerelay::Server;

use crate::support::redis::{DelayProxy, GarbageRedis, RedisServer, Reply, SilentRedis};
use crate::support::{http, read_http_head, wait_until, TestServer, WsRaw, WAIT};

fn yaml(redis_url: &str, extra_endpoint: &str) -> String {
    format!(
        "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /{{agent_id}}/ws/{{session_id}}\n      max_message_size: 200000\n      wsproxy:\n        auth_timeout: 1s\n        auth_grace_period: 3h\n{extra_endpoint}admin:\n  listen: []\n  on_websocket_listener: true\nredis:\n  url: \"{redis_url}\"\n  reconnect_delay: 50ms\n  reconnect_max_delay: 200ms\n"
    )
}

/// A wsproxy-style server on `redis_url` with `workers` cores.
fn server(
    workers: usize,
    redis_url: &str,
    f: impl FnOnce(&mut Config),
) -> (TestServer, SocketAddr) {
    let mut cfg = Config::from_yaml(&yaml(redis_url, ""), None).expect("config");
    cfg.workers = workers;
    cfg.pin = false;
    f(&mut cfg);
    let handle = Server::start(cfg).expect("server starts");
    let ws = handle.ws_addrs()[0];
    let srv = TestServer { handle, addr: ws };
    (srv, ws)
}

/// Waits until every core's Redis connections are up.
fn wait_redis_up(s: &TestServer) {
    let cores = s.handle.config().workers;
    wait_until(
        || {
            (0..cores).all(|c| {
                s.handle
                    .core_metrics(c)
                    .is_some_and(|m| m.redis_cmd_up == 1 && m.redis_sub_up == 1)
            })
        },
        "redis connected on every core",
    );
}

/// The upgrade request with an optional Authorization header.
fn request(path: &str, auth: Option<&str>) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(a) = auth {
        r.push_str(&format!("Authorization: {a}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// Sends an upgrade; returns the status code, the body (if refused) and
/// the socket.
fn open(ws: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(ws).expect("connect");
    s.set_nodelay(true).unwrap();
    s.write_all(request(path, auth).as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut body = String::new();
    if status != 101 {
        use std::io::Read;
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.read_to_string(&mut body);
    }
    (status, body, s)
}

/// A session socket, upgraded with `token`.
fn session(ws: SocketAddr, id: &str, token: &str) -> WsRaw {
    let (status, body, s) = open(
        ws,
        &format!("/agent1/ws/{id}"),
        Some(&format!("Bearer {token}")),
    );
    assert_eq!(status, 101, "upgrade refused: {body}");
    WsRaw(s)
}

fn text_of(w: &mut WsRaw) -> String {
    let f = w.read().expect("a frame");
    assert_eq!(f.opcode, 1, "a text frame: {f:?}");
    String::from_utf8(f.payload).unwrap()
}

#[test]
fn auth_answers_are_wsproxys() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:s1:auth", "right"]);
    let path = "/agent1/ws/s1";
    let (code, body, _) = open(ws, path, None);
    assert_eq!((code, body.as_str()), (401, "Missing authorization token"));
    let (code, body, _) = open(ws, path, Some("Basic cmlnaHQ="));
    assert_eq!((code, body.as_str()), (401, "Missing authorization token"));
    let (code, _, _) = open(ws, path, Some("bearer right"));
    assert_eq!(code, 401, "the prefix is case-sensitive, as in wsproxy");
    let (code, body, _) = open(ws, path, Some("Bearer wrong"));
    assert_eq!((code, body.as_str()), (403, "Invalid authorization token"));
    let (code, body, _) = open(ws, "/agent1/ws/nobody", Some("Bearer right"));
    assert_eq!((code, body.as_str()), (403, "Invalid authorization token"));
    let (code, body, _) = open(ws, "/agent1/ws/a%2Fb", Some("Bearer right"));
    assert_eq!((code, body.as_str()), (400, "Invalid session id"));
    assert!(s.handle.metrics().session_refused >= 6);
    // The right token: 101, the TTL reset to the grace period, the token
    // kept so the client can reconnect.
    let w = session(ws, "s1", "right");
    match r.cmd(&["TTL", "session:s1:auth"]) {
        Reply::Int(t) => assert!((10790..=10800).contains(&t), "ttl {t}"),
        other => panic!("TTL answered {other:?}"),
    }
    drop(w);
    let _again = session(ws, "s1", "right");
    assert_eq!(
        r.cmd(&["GET", "session:s1:auth"]),
        Reply::Bulk(b"right".to_vec())
    );
}

#[test]
fn a_publish_the_instant_the_101_arrives_is_delivered() {
    let redis = RedisServer::start();
    let (s, ws) = server(2, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    // wsproxy subscribes after its 101 and loses these; every one must
    // arrive here, on whichever core took the socket.
    for i in 0..40 {
        let id = format!("instant-{i}");
        r.cmd(&["SET", &format!("session:{id}:auth"), "t"]);
        let mut w = session(ws, &id, "t");
        let n = r.publish(
            &format!("session:{id}:down"),
            format!("{{\"n\":{i}}}").as_bytes(),
        );
        assert_eq!(n, 1, "one core subscribed for the socket");
        assert_eq!(text_of(&mut w), format!("{{\"n\":{i}}}"));
    }
}

#[test]
fn the_101_waits_for_the_subscription_even_when_redis_is_slow_to_confirm() {
    let redis = RedisServer::start();
    // Every write on the subscription connection reaches Redis 300 ms late:
    // a server that answered 101 before its SUBSCRIBE was confirmed would
    // lose the publish below for certain.
    let proxy = DelayProxy::start(redis.addr(), b"-0-sub", Duration::from_millis(300));
    let (s, ws) = server(1, &format!("redis://{}", proxy.addr), |c| {
        c.redis.as_mut().unwrap().request_timeout = Duration::from_secs(3);
        c.websocket.as_mut().unwrap().endpoints[0]
            .session
            .as_mut()
            .unwrap()
            .auth_timeout = Duration::from_secs(3);
    });
    wait_redis_up(&s);
    let mut r = redis.client();
    for i in 0..3 {
        let id = format!("slow-{i}");
        r.cmd(&["SET", &format!("session:{id}:auth"), "t"]);
        let mut w = session(ws, &id, "t");
        assert_eq!(
            r.publish(&format!("session:{id}:down"), b"{\"first\":true}"),
            1
        );
        assert_eq!(text_of(&mut w), "{\"first\":true}");
    }
}

#[test]
fn every_socket_of_a_session_receives_on_either_core() {
    let redis = RedisServer::start();
    let (s, ws) = server(2, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:shared:auth", "t"]);
    // Open sockets until both cores hold one (the kernel spreads them by
    // source port); bounded.
    let mut socks = Vec::new();
    for _ in 0..64 {
        socks.push(session(ws, "shared", "t"));
        let per_core: Vec<u64> = (0..2)
            .map(|c| s.handle.core_metrics(c).unwrap().session_sockets)
            .collect();
        if per_core.iter().all(|&n| n > 0) {
            break;
        }
    }
    let per_core: Vec<u64> = (0..2)
        .map(|c| s.handle.core_metrics(c).unwrap().session_sockets)
        .collect();
    assert!(
        per_core.iter().all(|&n| n > 0),
        "sockets on both cores: {per_core:?}"
    );
    // One subscription per core, not per socket.
    assert_eq!(r.publish("session:shared:down", b"{\"to\":\"all\"}"), 2);
    for w in &mut socks {
        assert_eq!(text_of(w), "{\"to\":\"all\"}");
    }
}

#[test]
fn client_json_goes_up_verbatim_and_the_rest_as_wsproxy_does() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:up1:auth", "t"]);
    let mut backend = redis.client();
    backend.subscribe("session:up1:up");
    let mut w = session(ws, "up1", "t");
    let msg = br#"{"type":"ping","counter":1,"timestamp":"2026-11-30T00:00:00Z"}"#;
    w.send(0x1, true, msg);
    assert_eq!(backend.message_within(WAIT).as_deref(), Some(&msg[..]));
    // Not JSON: wsproxy's error, the connection stays, nothing published.
    w.send(0x1, true, b"not json");
    assert_eq!(text_of(&mut w), r#"{"error":"Invalid JSON format"}"#);
    // Binary: ignored.
    w.send(0x2, true, b"{\"binary\":true}");
    // A fragmented JSON message is reassembled (wsproxy drops these).
    w.send(0x1, false, b"{\"part\":");
    w.send(0x0, true, b"2}");
    assert_eq!(
        backend.message_within(WAIT).as_deref(),
        Some(&b"{\"part\":2}"[..])
    );
    // 100 KB of JSON goes through whole.
    let big = format!("{{\"data\":\"{}\"}}", "x".repeat(100_000));
    w.send(0x1, true, big.as_bytes());
    assert_eq!(
        backend.message_within(WAIT).as_deref(),
        Some(big.as_bytes())
    );
    assert_eq!(backend.message_within(Duration::from_millis(200)), None);
    let m = s.handle.metrics();
    assert_eq!(
        (
            m.session_up,
            m.session_invalid_json,
            m.session_binary_ignored
        ),
        (3, 1, 1)
    );
    // Bidirectional on one socket.
    r.publish(
        "session:up1:down",
        b"{\"type\":\"data\",\"payload\":\"Hello from Redis!\"}",
    );
    assert_eq!(
        text_of(&mut w),
        "{\"type\":\"data\",\"payload\":\"Hello from Redis!\"}"
    );
}

#[test]
fn a_non_utf8_down_payload_is_a_binary_frame_and_oversized_client_messages_get_1009() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:bin:auth", "t"]);
    let mut w = session(ws, "bin", "t");
    r.publish("session:bin:down", &[0xff, 0xfe, 0x00]);
    let f = w.read().expect("frame");
    assert_eq!((f.opcode, f.payload), (0x2, vec![0xff, 0xfe, 0x00]));
    w.send(0x1, true, &vec![b' '; 200_001]);
    assert_eq!(w.expect_close(), 1009);
}

#[test]
fn redis_restart_keeps_sockets_open_and_they_hear_again() {
    let redis = RedisServer::start();
    let (s, ws) = server(2, &redis.url(), |_| {});
    wait_redis_up(&s);
    redis.client().cmd(&["SET", "session:live:auth", "t"]);
    let mut w = session(ws, "live", "t");
    let health = |s: &TestServer| http(s.handle.ws_addrs()[0], "GET", "/health", &[], b"");
    let h = health(&s);
    assert_eq!(h.status, 200);
    assert_eq!(
        h.text(),
        r#"{"status":"healthy","redis":"connected","active_connections":1}"#
    );
    let port = redis.kill();
    wait_until(
        || health(&s).status == 503,
        "/health says 503 while Redis is away",
    );
    let h = health(&s);
    assert!(
        h.text()
            .contains(r#""status":"unhealthy","redis":"disconnected""#),
        "{}",
        h.text()
    );
    // Meanwhile a new session cannot be authorised: 500, as wsproxy.
    let (code, body, _) = open(ws, "/agent1/ws/live", Some("Bearer t"));
    assert_eq!((code, body.as_str()), (500, "Internal server error"));
    let redis = RedisServer::on(port);
    wait_until(|| health(&s).status == 200, "/health back to 200");
    let mut r = redis.client();
    // Resubscribed: the old socket hears the new Redis.
    let deadline = Instant::now() + WAIT;
    while r.publish("session:live:down", b"{\"after\":\"restart\"}") == 0 {
        assert!(Instant::now() < deadline, "never resubscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(text_of(&mut w), "{\"after\":\"restart\"}");
    assert!(s.handle.metrics().redis_reconnects >= 2);
}

#[test]
fn auth_against_a_redis_that_does_not_answer_is_504_within_the_timeout() {
    let silent = SilentRedis::start();
    // The connection's own deadline is far away: within the read's wait
    // (5 s) only the 1 s auth timeout can answer. No clock is read here.
    let (_s, ws) = server(1, &format!("redis://{}", silent.addr), |c| {
        c.redis.as_mut().unwrap().request_timeout = Duration::from_secs(60);
    });
    let (code, body, _) = open(ws, "/agent1/ws/hang", Some("Bearer t"));
    assert_eq!((code, body.as_str()), (504, "Authentication timeout"));
}

#[test]
fn no_redis_at_all_is_500_and_health_503() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (s, ws) = server(1, &format!("redis://127.0.0.1:{port}"), |_| {});
    wait_until(|| s.handle.metrics().redis_cmd_up == 0, "not connected");
    let (code, body, _) = open(ws, "/agent1/ws/x", Some("Bearer t"));
    assert_eq!((code, body.as_str()), (500, "Internal server error"));
    assert_eq!(http(ws, "GET", "/health", &[], b"").status, 503);
    let r = http(ws, "GET", "/ready", &[], b"");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, r#"{"status":"ready"}"#)
    );
}

#[test]
fn a_reply_over_the_cap_drops_that_redis_connection_not_the_process() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |c| {
        c.redis.as_mut().unwrap().max_reply_bytes = 1024;
    });
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:cap:auth", "t"]);
    let mut w = session(ws, "cap", "t");
    r.publish("session:cap:down", &vec![b'x'; 4096]);
    wait_until(
        || s.handle.metrics().redis_bad_replies >= 1,
        "the oversized reply refused",
    );
    // The socket stays; once resubscribed it hears small messages again.
    // Redis may still count the dropped connection as a subscriber for a
    // moment (what it gets is lost: at most once), so publish until one
    // arrives.
    let deadline = Instant::now() + WAIT;
    loop {
        if r.publish("session:cap:down", b"{\"small\":1}") > 0 {
            if let Ok(Some(f)) = w.read_within(Duration::from_millis(300)) {
                assert_eq!(f.payload, b"{\"small\":1}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "never heard again");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closing_the_last_socket_unsubscribes_the_core() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |_| {});
    wait_redis_up(&s);
    let mut r = redis.client();
    r.cmd(&["SET", "session:gone:auth", "t"]);
    let a = session(ws, "gone", "t");
    let b = session(ws, "gone", "t");
    assert_eq!(s.handle.metrics().redis_channels, 1);
    drop(a);
    wait_until(
        || s.handle.metrics().session_sockets == 1,
        "one socket left",
    );
    assert_eq!(r.publish("session:gone:down", b"{}"), 1, "still subscribed");
    drop(b);
    wait_until(|| s.handle.metrics().redis_channels == 0, "unsubscribed");
    assert_eq!(r.publish("session:gone:down", b"{}"), 0);
}

#[test]
fn health_counts_sessions_and_ready_is_503_while_draining() {
    let redis = RedisServer::start();
    let (s, ws) = server(1, &redis.url(), |c| {
        c.shutdown_grace = Duration::from_secs(2);
    });
    wait_redis_up(&s);
    redis.client().cmd(&["SET", "session:h:auth", "t"]);
    let _a = session(ws, "h", "t");
    let _b = session(ws, "h", "t");
    let h = http(ws, "GET", "/health", &[], b"");
    assert_eq!(
        h.text(),
        r#"{"status":"healthy","redis":"connected","active_connections":2}"#
    );
    assert!(
        h.head.contains("Content-Type: application/json"),
        "{}",
        h.head
    );
    // Keep an admin connection open across the drain: /ready on it is 503.
    let mut c = TcpStream::connect(ws).unwrap();
    c.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let r = crate::support::read_response(&mut c);
    assert_eq!(r.text(), r#"{"status":"ready"}"#);
    s.handle.shutdown();
    let deadline = Instant::now() + WAIT;
    loop {
        c.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let r = crate::support::read_response(&mut c);
        if r.status == 503 {
            assert_eq!(r.text(), r#"{"status":"draining"}"#);
            break;
        }
        assert!(Instant::now() < deadline, "never 503");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// websockets 15 and redis 5 (wsproxy's own Python suite's libraries).
fn wsproxy_python() -> std::path::PathBuf {
    crate::support::venv_python(
        "wsproxy-venv",
        &["websockets==15.0.1", "redis==5.2.1"],
        "import websockets, redis; assert websockets.__version__ == '15.0.1'",
    )
    .expect("a Python venv with websockets and redis")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `corerelay --wsproxy` as wsproxy users start it: variables from the
/// environment and from ./.env (the environment wins), then Python's
/// websockets and redis clients do what wsproxy's suite does, then SIGTERM
/// drains: clients get 1001 and the process exits within the grace period.
#[test]
fn the_wsproxy_command_with_its_environment_and_python_clients() {
    use std::process::{Command, Stdio};
    let redis = RedisServer::start();
    let python = wsproxy_python();
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("corerelay-wsproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".env"),
        format!(
            "# as in wsproxy's .env.example\nHOST=127.0.0.1\nPORT={port}\nREDIS_URL=redis://127.0.0.1:1\nSHUTDOWN_GRACE_PERIOD_SECS=3\nAUTH_TIMEOUT_SECS=2\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_corerelay"))
        .arg("--wsproxy")
        .current_dir(&dir)
        .env("REDIS_URL", redis.url())
        .env_remove("RUST_LOG")
        .env_remove("PORT")
        .env_remove("HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() || http(addr, "GET", "/health", &[], b"").status != 200
    {
        assert!(Instant::now() < deadline, "--wsproxy never became healthy");
        if let Ok(Some(st)) = child.try_wait() {
            panic!("--wsproxy exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = crate::support::KillOnDrop(child);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/wsproxy.py"
        ))
        .args([
            &format!("http://{addr}"),
            &format!("ws://{addr}"),
            &redis.url(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(v["health"][0], 200, "{v}");
    assert_eq!(v["health"][1]["status"], "healthy", "{v}");
    assert_eq!(v["wrong_token"], 403, "{v}");
    assert_eq!(v["no_token"], 401, "{v}");
    assert_eq!(v["receivers"], 1, "{v}");
    assert_eq!(v["down"], true, "{v}");
    assert_eq!(v["up"], true, "{v}");
    assert_eq!(v["invalid"]["error"], "Invalid JSON format", "{v}");
    assert_eq!(v["after_invalid"], "{\"still\":\"open\"}", "{v}");

    // SIGTERM: a session socket hears 1001 and the process is gone within
    // SHUTDOWN_GRACE_PERIOD_SECS.
    redis.client().cmd(&["SET", "session:bye:auth", "t"]);
    let mut w = session(addr, "bye", "t");
    let mut child = child;
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert_eq!(w.expect_close(), 1001);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(Some(st)) = child.0.try_wait() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the grace period"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_url_logs_in_selects_its_database_and_names_the_connections() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let mut r = redis.client();
    assert_eq!(r.cmd(&["AUTH", "s3cret"]), Reply::Simple("OK".into()));
    r.cmd(&["SELECT", "3"]);
    r.cmd(&["SET", "session:db3:auth", "t"]);
    let url = format!(
        "redis://default:s3cret@127.0.0.1:{}/3?pool_size=512",
        redis.port
    );
    let (s, ws) = server(1, &url, |_| {});
    wait_redis_up(&s);
    // The token is found in database 3 only.
    let mut w = session(ws, "db3", "t");
    match r.cmd(&["CLIENT", "LIST"]) {
        Reply::Bulk(list) => {
            let list = String::from_utf8_lossy(&list).into_owned();
            assert!(list.contains("name=corerelay-0-cmd"), "{list}");
            assert!(list.contains("name=corerelay-0-sub"), "{list}");
        }
        other => panic!("CLIENT LIST answered {other:?}"),
    }
    // Pub/sub ignores databases: the socket hears its channel.
    r.publish("session:db3:down", b"{}");
    assert_eq!(text_of(&mut w), "{}");
    // A wrong password: no connection, /health says so, nothing crashes.
    let bad = format!("redis://default:wrong@127.0.0.1:{}", redis.port);
    let (s2, ws2) = server(1, &bad, |_| {});
    wait_until(|| s2.handle.metrics().redis_errors >= 1, "AUTH refused");
    assert_eq!(s2.handle.metrics().redis_cmd_up, 0);
    assert_eq!(http(ws2, "GET", "/health", &[], b"").status, 503);
}

#[test]
fn a_redis_that_answers_garbage_is_dropped_counted_and_retried() {
    let garbage = GarbageRedis::start();
    let (s, ws) = server(1, &format!("redis://{}", garbage.addr), |_| {});
    wait_until(
        || s.handle.metrics().redis_bad_replies >= 2,
        "garbage refused, and again after a retry",
    );
    let (code, _, _) = open(ws, "/agent1/ws/g", Some("Bearer t"));
    assert!(code == 500 || code == 504, "refused, not crashed: {code}");
    assert_eq!(http(ws, "GET", "/health", &[], b"").status, 503);
}

/// Sockets on both cores of a 2-core server, opened until each core
/// holds one (bounded).
fn sockets_on_both_cores(s: &TestServer, ws: SocketAddr, id: &str) -> Vec<WsRaw> {
    let mut socks = Vec::new();
    for _ in 0..64 {
        socks.push(session(ws, id, "t"));
        if (0..2).all(|c| s.handle.core_metrics(c).unwrap().session_sockets > 0) {
            return socks;
        }
    }
    panic!("no socket landed on one of the cores");
}

#[test]
fn with_redis_on_core_zero_only_every_core_is_served() {
    let redis = RedisServer::start();
    let (s, ws) = server(2, &redis.url(), |c| {
        c.redis.as_mut().unwrap().per_core = false;
    });
    wait_until(
        || s.handle.core_metrics(0).unwrap().redis_sub_up == 1,
        "core 0 connected",
    );
    let mut r = redis.client();
    // Two connections in all, both core 0's.
    match r.cmd(&["CLIENT", "LIST"]) {
        Reply::Bulk(list) => {
            let list = String::from_utf8_lossy(&list).into_owned();
            assert_eq!(list.matches("name=corerelay-").count(), 2, "{list}");
            assert!(!list.contains("name=corerelay-1-"), "{list}");
        }
        other => panic!("CLIENT LIST answered {other:?}"),
    }
    assert_eq!(http(ws, "GET", "/health", &[], b"").status, 200);
    r.cmd(&["SET", "session:c0:auth", "t"]);
    let (code, body, _) = open(ws, "/a/ws/c0", Some("Bearer wrong"));
    assert_eq!((code, body.as_str()), (403, "Invalid authorization token"));
    let mut socks = sockets_on_both_cores(&s, ws, "c0");
    // One subscription (core 0's) reaches the sockets of both cores.
    assert_eq!(r.publish("session:c0:down", b"{\"n\":1}"), 1);
    for w in &mut socks {
        assert_eq!(text_of(w), "{\"n\":1}");
    }
    // Up from every socket, whichever core holds it.
    let mut backend = redis.client();
    backend.subscribe("session:c0:up");
    for w in &mut socks {
        w.send(0x1, true, b"{\"up\":true}");
        assert_eq!(
            backend.message_within(WAIT).as_deref(),
            Some(&b"{\"up\":true}"[..])
        );
    }
    // A Redis restart: resubscribed by core 0, heard on both cores.
    let port = redis.kill();
    wait_until(
        || http(ws, "GET", "/health", &[], b"").status == 503,
        "503 while away",
    );
    let redis = RedisServer::on(port);
    let mut r = redis.client();
    let deadline = Instant::now() + WAIT;
    while r.publish("session:c0:down", b"{\"n\":2}") == 0 {
        assert!(Instant::now() < deadline, "never resubscribed");
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in &mut socks {
        assert_eq!(text_of(w), "{\"n\":2}");
    }
    // The last socket to close, on whichever core, unsubscribes.
    drop(socks);
    wait_until(
        || s.handle.metrics().redis_channels == 0,
        "unsubscribed after the last socket",
    );
    assert_eq!(r.publish("session:c0:down", b"{}"), 0);
}

#[test]
fn with_redis_on_core_zero_only_the_101_still_waits_for_the_subscription() {
    let redis = RedisServer::start();
    let proxy = DelayProxy::start(redis.addr(), b"-0-sub", Duration::from_millis(300));
    let (s, ws) = server(2, &format!("redis://{}", proxy.addr), |c| {
        let r = c.redis.as_mut().unwrap();
        r.per_core = false;
        r.request_timeout = Duration::from_secs(3);
        c.websocket.as_mut().unwrap().endpoints[0]
            .session
            .as_mut()
            .unwrap()
            .auth_timeout = Duration::from_secs(3);
    });
    wait_until(
        || s.handle.core_metrics(0).unwrap().redis_sub_up == 1,
        "core 0 connected",
    );
    let mut r = redis.client();
    // Until both cores have taken some (bounded; the kernel spreads
    // connections by source port).
    for i in 0..40 {
        if i >= 4 && (0..2).all(|c| s.handle.core_metrics(c).unwrap().ws_upgrades > 0) {
            break;
        }
        let id = format!("c0slow-{i}");
        r.cmd(&["SET", &format!("session:{id}:auth"), "t"]);
        let mut w = session(ws, &id, "t");
        assert_eq!(
            r.publish(&format!("session:{id}:down"), b"{\"first\":true}"),
            1
        );
        assert_eq!(text_of(&mut w), "{\"first\":true}");
    }
    assert!(
        (0..2).all(|c| s.handle.core_metrics(c).unwrap().ws_upgrades > 0),
        "sessions on both cores"
    );
}

#[test]
fn the_admin_api_reaches_a_session_by_its_tags() {
    let redis = RedisServer::start();
    let (s, ws) = server(2, &redis.url(), |_| {});
    wait_redis_up(&s);
    redis.client().cmd(&["SET", "session:tagged:auth", "t"]);
    let mut socks = sockets_on_both_cores(&s, ws, "tagged");
    // Sessions are tagged with their path parameters.
    let r = http(
        ws,
        "POST",
        "/send?session_id=tagged&agent_id=agent1",
        &[],
        b"{\"from\":\"admin\"}",
    );
    assert_eq!((r.status, r.text()), (200, socks.len().to_string()));
    for w in &mut socks {
        assert_eq!(text_of(w), "{\"from\":\"admin\"}");
    }
    let st = http(ws, "GET", "/status", &[], b"").text();
    assert_eq!(st.matches("session_id=tagged").count(), socks.len(), "{st}");
}

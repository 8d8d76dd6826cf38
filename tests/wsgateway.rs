//! wsgateway's backend half against a real redis-server the tests start:
//! the test plays the backend, reading the stream through a consumer group
//! (entries as maps: field order is not part of the contract), and
//! answering through the admin API.

use std::net::SocketAddr;

use corerelay::config::Config;
use corerelay::Server;

use crate::support::redis::{Entry, RedisServer};
use crate::support::{http, wait_until, TestServer, WsRaw, WAIT};

const ENDPOINT: &str = "    - path: /connect
      set_tags: {foo: bar, group: g1, hidden: x}
      stream_include_tags: [group, foo]
      json_extract_vars: {command: command, ref: data.actionRef}
";

fn yaml(redis_url: &str, stream: &str, extra: &str) -> String {
    format!(
        "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n{ENDPOINT}admin:\n  listen: []\n  on_websocket_listener: true\nevents:\n  redis:\n    url: \"{redis_url}\"\n    reconnect_delay: 50ms\n    reconnect_max_delay: 200ms\n  stream_name: \"{stream}\"\n{extra}"
    )
}

fn server_yaml(
    yaml: &str,
    workers: usize,
    f: impl FnOnce(&mut Config),
) -> (TestServer, SocketAddr) {
    let mut cfg = Config::from_yaml(yaml, None).expect("config");
    cfg.workers = workers;
    cfg.pin = false;
    f(&mut cfg);
    let handle = Server::start(cfg).expect("server starts");
    let ws = handle.ws_addrs()[0];
    (TestServer { handle, addr: ws }, ws)
}

fn text(e: &Entry, k: &str) -> String {
    String::from_utf8_lossy(e.get(k).map(Vec::as_slice).unwrap_or(b"<missing>")).into_owned()
}

fn wait_cmd_up(s: &TestServer) {
    let n = s.handle.config().workers;
    wait_until(
        || (0..n).all(|c| s.handle.core_metrics(c).unwrap().redis_cmd_up >= 1),
        "events' Redis connected",
    );
}

#[test]
fn open_message_and_close_events_carry_the_included_tags_and_the_bytes() {
    let redis = RedisServer::start();
    let (s, ws) = server_yaml(&yaml(&redis.url(), "connectionevents", ""), 2, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("connectionevents", "ws_consumers");
    let mut w = WsRaw::connect(ws, "/connect");
    w.send(0x1, true, b"hello \xc3\xa9");
    w.send(0x2, true, &[0, 0xff, 7]);
    drop(w);
    let ev = r.read_group("connectionevents", "ws_consumers", 4, WAIT);
    assert_eq!(ev.len(), 4, "{ev:?}");
    let id = text(&ev[0], "connection");
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    for e in &ev {
        assert_eq!(text(e, "connection"), id);
        // Only the included tags, keys sorted, url-encoded.
        assert_eq!(text(e, "tags"), "foo=bar&group=g1");
    }
    let actions: Vec<String> = ev.iter().map(|e| text(e, "action")).collect();
    assert_eq!(actions, ["open", "message", "message", "close"]);
    assert_eq!(ev[0].len(), 3, "open: connection, action, tags");
    assert_eq!(text(&ev[1], "type"), "text");
    assert_eq!(ev[1]["message"], "hello é".as_bytes());
    assert_eq!(text(&ev[2], "type"), "binary");
    assert_eq!(ev[2]["message"], vec![0, 0xff, 7]);
    assert_eq!(ev[3].len(), 3, "close: connection, action, tags");
    // Redis applies an XADD before the core reads its reply.
    crate::support::wait_until(
        || s.handle.metrics().events_written >= 4,
        "4 events counted",
    );
}

#[test]
fn a_thousand_messages_from_one_connection_arrive_in_order() {
    let redis = RedisServer::start();
    let (s, ws) = server_yaml(&yaml(&redis.url(), "ordered", ""), 2, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("ordered", "g");
    let mut w = WsRaw::connect(ws, "/connect");
    let mut batch = Vec::new();
    for i in 0..1000 {
        batch.extend_from_slice(&WsRaw::frame(
            0x1,
            true,
            format!("{{\"seq\":{i}}}").as_bytes(),
        ));
    }
    w.send_raw(&batch);
    let ev = r.read_group("ordered", "g", 1001, WAIT * 2);
    let seqs: Vec<String> = ev
        .iter()
        .filter(|e| text(e, "action") == "message")
        .map(|e| text(e, "message"))
        .collect();
    let want: Vec<String> = (0..1000).map(|i| format!("{{\"seq\":{i}}}")).collect();
    assert_eq!(seqs, want);
}

#[test]
fn the_stream_name_follows_tags_and_json_and_settags_moves_the_next_event() {
    let redis = RedisServer::start();
    let (s, ws) = server_yaml(
        &yaml(
            &redis.url(),
            "ev-{tag.group:nogroup}-{json.command}-{json.ref:none}",
            "",
        ),
        1,
        |_| {},
    );
    wait_cmd_up(&s);
    let mut r = redis.client();
    for st in [
        "ev-g1-_-none",
        "ev-g1-join-7",
        "ev-g2-_-none",
        "ev-nogroup-say-none",
    ] {
        r.group(st, "g");
    }
    let mut w = WsRaw::connect(ws, "/connect");
    // open: the json variables take their defaults.
    let open = r.read_group("ev-g1-_-none", "g", 1, WAIT);
    assert_eq!(text(&open[0], "action"), "open");
    let id = text(&open[0], "connection");
    w.send(0x1, true, br#"{"command":"join","data":{"actionRef":7}}"#);
    let m = r.read_group("ev-g1-join-7", "g", 1, WAIT);
    assert_eq!(text(&m[0], "action"), "message");
    w.send(0x1, true, b"not json");
    let m = r.read_group("ev-g1-_-none", "g", 1, WAIT);
    assert_eq!(text(&m[0], "message"), "not json");
    // /settags moves the next event to another stream.
    let a = http(
        ws,
        "POST",
        &format!("/settags?id={id}"),
        &[("Content-Type", "text/plain")],
        b"group=g2",
    );
    assert_eq!(a.text(), "1");
    w.send(0x1, true, b"{}");
    let m = r.read_group("ev-g2-_-none", "g", 1, WAIT);
    assert_eq!(text(&m[0], "tags"), "foo=bar&group=g2");
    // An empty value deletes the tag: the default again.
    http(ws, "POST", &format!("/settags?id={id}"), &[], b"group=");
    w.send(0x1, true, br#"{"command":"say"}"#);
    let m = r.read_group("ev-nogroup-say-none", "g", 1, WAIT);
    assert_eq!(text(&m[0], "tags"), "foo=bar");
}

#[test]
fn sync_hashes_appear_follow_settags_and_go() {
    let redis = RedisServer::start();
    let extra = "sync:\n  ttl: 2m\n";
    let (s, ws) = server_yaml(&yaml(&redis.url(), "connectionevents", extra), 1, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("connectionevents", "g");
    let w = WsRaw::connect(ws, "/connect");
    let local = w.0.local_addr().unwrap();
    let open = r.read_group("connectionevents", "g", 1, WAIT);
    let id = text(&open[0], "connection");
    let key = format!("connection:{id}");
    let tkey = format!("{key}:tags");
    wait_until(|| !r.hgetall(&tkey).is_empty(), "tags hash written");
    assert_eq!(r.hgetall(&key), vec![("addr".into(), local.to_string())]);
    assert_eq!(
        r.hgetall(&tkey),
        vec![
            ("foo".into(), "bar".into()),
            ("group".into(), "g1".into()),
            ("hidden".into(), "x".into())
        ]
    );
    match r.cmd(&["TTL", &key]) {
        crate::support::redis::Reply::Int(t) => assert!((1..=120).contains(&t), "ttl {t}"),
        other => panic!("TTL answered {other:?}"),
    }
    http(
        ws,
        "POST",
        &format!("/settags?id={id}"),
        &[],
        b"foo=new&hidden=&extra=1",
    );
    wait_until(
        || {
            r.hgetall(&tkey)
                .iter()
                .any(|(k, v)| k == "foo" && v == "new")
        },
        "changed tag synced",
    );
    assert_eq!(
        r.hgetall(&tkey),
        vec![
            ("extra".into(), "1".into()),
            ("foo".into(), "new".into()),
            ("group".into(), "g1".into())
        ]
    );
    drop(w);
    wait_until(
        || r.hgetall(&key).is_empty() && r.hgetall(&tkey).is_empty(),
        "hashes deleted on close",
    );
}

#[test]
fn redis_killed_mid_stream_the_server_serves_on_and_events_flow_again() {
    let redis = RedisServer::start();
    let (s, ws) = server_yaml(&yaml(&redis.url(), "live", ""), 1, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("live", "g");
    let mut w = WsRaw::connect(ws, "/connect");
    w.send(0x1, true, b"before");
    assert_eq!(r.read_group("live", "g", 2, WAIT).len(), 2);
    let port = redis.kill();
    wait_until(
        || s.handle.metrics().redis_cmd_up == 0,
        "the server sees Redis gone",
    );
    // Served meanwhile: messages wait in the buffer.
    for i in 0..10 {
        w.send(0x1, true, format!("during-{i}").as_bytes());
    }
    let redis = RedisServer::on(port);
    let mut r = redis.client();
    r.group("live", "g");
    w.send(0x1, true, b"after");
    let ev = r.read_group("live", "g", 11, WAIT);
    let msgs: Vec<String> = ev.iter().map(|e| text(e, "message")).collect();
    let mut want: Vec<String> = (0..10).map(|i| format!("during-{i}")).collect();
    want.push("after".into());
    assert_eq!(msgs, want, "buffered while away, then in order");
    assert!(s.handle.metrics().redis_reconnects >= 1);
}

#[test]
fn past_the_buffer_events_are_dropped_and_counted() {
    // Nothing listens here: events wait, then overflow the smallest buffer.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (s, ws) = server_yaml(
        &yaml(&format!("redis://127.0.0.1:{port}"), "x", ""),
        1,
        |c| {
            let e = c.events.as_ref().unwrap().redis_server().unwrap();
            let r = if e == 0 {
                c.redis.as_mut().unwrap()
            } else {
                &mut c.redis_extra[e - 1]
            };
            r.max_pending_bytes = 64 << 10;
        },
    );
    let mut w = WsRaw::connect(ws, "/connect");
    let chunk = vec![b'x'; 8 << 10];
    for _ in 0..20 {
        w.send(0x2, true, &chunk);
    }
    wait_until(
        || s.handle.metrics().events_dropped >= 5,
        "overflow counted",
    );
    // Still served.
    let a = http(ws, "GET", "/health", &[], b"");
    assert_eq!(a.status, 200);
    w.send(0x9, true, b"p");
    let pong = w.read().expect("pong within the wait");
    assert_eq!(pong.opcode, 0xA);
}

/// A wsgateway config.yml with every key its own sample has (our values).
fn wsgateway_yml(redis: &str) -> String {
    format!(
        "listen_addr: 127.0.0.1:0
internal_endpoint_access_whitelist:
  - 127.0.0.0/8
  - 10.0.0.0/8
  - not-a-network
  - ::1/128
connection_redis_sync:
  # hashes connection:<id> and connection:<id>:tags
  addr: {redis}/0?client_name=gwsync
stream_redis:
  addr: {redis}/0?client_name=gwstream&pool_size=1000
  stream_name: connectionevents
max_message_size_kb: 64
endpoints:
  - path: /connect
    set_tags:
      foo: bar
      other: tag
    stream_include_tags:
      - foo
      - group
    max_message_size_kb: 128
    json_extract_vars:
      command: \"command\"
      other: \"data.actionRef\"
      bad-name: \"x\"
  - path: /connect/v2
    set_tags:
      version: 2
      beta: true
    stream_include_tags:
      - version
      - beta
prometheus:
  enabled: true
"
    )
}

#[test]
fn wsgateways_config_yml_runs_as_it_is() {
    let redis = RedisServer::start();
    let yml = wsgateway_yml(&redis.url());
    let cfg = Config::from_yaml(&yml, None).expect("wsgateway's config.yml loads");
    assert!(cfg.rely.listen.is_empty(), "no RELY listener");
    let ws_cfg = cfg.websocket.as_ref().unwrap();
    assert_eq!(ws_cfg.endpoints.len(), 2);
    assert_eq!(ws_cfg.endpoints[0].max_message_size, 128 * 1024);
    assert_eq!(
        ws_cfg.endpoints[1].max_message_size,
        64 * 1024,
        "the global limit"
    );
    assert_eq!(
        ws_cfg.endpoints[0].json_vars.len(),
        2,
        "the bad variable name is skipped"
    );
    assert_eq!(
        ws_cfg.endpoints[1].set_tags,
        vec![
            ("beta".into(), "true".into()),
            ("version".into(), "2".into())
        ],
        "scalars become strings"
    );
    let admin = cfg.admin.as_ref().unwrap();
    assert!(admin.on_websocket_listener && admin.listen.is_empty());
    assert_eq!(admin.allow.len(), 3, "the bad network is skipped");
    let ev = cfg.events.as_ref().unwrap();
    assert_eq!(ev.stream.fixed(), Some("connectionevents"));
    let sync = cfg.sync.as_ref().unwrap();
    assert_eq!(
        ev.redis_server(),
        Some(sync.server),
        "one server, one set of connections"
    );
    assert_eq!(
        cfg.redis_server(ev.redis_server().unwrap())
            .unwrap()
            .client_name,
        "gwstream",
        "client_name from the URL"
    );
    let (s, ws) = server_yaml(&yml, 2, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("connectionevents", "ws_consumers");
    let _a = WsRaw::connect(ws, "/connect");
    let _b = WsRaw::connect(ws, "/connect/v2");
    let ev = r.read_group("connectionevents", "ws_consumers", 2, WAIT);
    let mut tags: Vec<String> = ev.iter().map(|e| text(e, "tags")).collect();
    tags.sort();
    assert_eq!(tags, ["beta=true&version=2", "foo=bar"]);
    // The admin API shares listen_addr.
    assert_eq!(http(ws, "POST", "/send?foo=bar", &[], b"hi").text(), "1");
    let st = http(ws, "GET", "/status", &[], b"").text();
    assert_eq!(st.lines().count(), 2, "{st}");
}

#[test]
fn wsgateway_configs_that_cannot_run_are_refused_naming_the_key() {
    // A stream_amqp is read as it is; one next to a stream_redis, or one
    // whose URL cannot work, is refused naming its key, the secret masked.
    let amqp = "listen_addr: 127.0.0.1:0\nstream_amqp:\n  addr: amqp://guest:guest@localhost:5672/\n  exchange: wsgateway\nendpoints:\n  - path: /connect\n";
    assert!(Config::from_yaml(amqp, None).is_ok());
    let both = "listen_addr: 127.0.0.1:0\nstream_redis:\n  addr: redis://h\nstream_amqp:\n  addr: amqp://h/\nendpoints:\n  - path: /connect\n";
    let e = Config::from_yaml(both, None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("stream_amqp.addr"), "{e}");
    let tls = "listen_addr: 127.0.0.1:0\nstream_amqp:\n  addr: amqpx://u:hunter2@h/\nendpoints:\n  - path: /connect\n";
    let e = Config::from_yaml(tls, None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("stream_amqp.addr"), "{e}");
    assert_eq!(e.line, Some(3), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let none = "listen_addr: 127.0.0.1:0\nendpoints:\n  - path: /connect\n";
    let e = Config::from_yaml(none, None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("stream_redis.addr"), "{e}");
    let bad = "stream_redis:\n  addr: rediss://u:hunter2@h:6380\nendpoints:\n  - path: /c\n";
    let e = Config::from_yaml(bad, None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("stream_redis.addr"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let typo = "stream_redis:\n  addr: redis://h\n  stream_nmae: x\nendpoints:\n  - path: /c\n";
    let e = Config::from_yaml(typo, None).unwrap_err();
    assert!(e.to_string().contains("stream_nmae"), "{e}");
    assert_eq!(e.line, Some(3), "{e}");
}

/// wsgateway's demo backend and e2e client, in our words: the backend
/// reads the stream through a group, answers with /send?id=, sets tags
/// with a form body sent as text/plain, and sends to a tag.
#[test]
fn the_demo_backend_round_trip() {
    let redis = RedisServer::start();
    let yml = wsgateway_yml(&redis.url());
    let (s, ws) = server_yaml(&yml, 2, |_| {});
    wait_cmd_up(&s);
    let mut r = redis.client();
    r.group("connectionevents", "ws_consumers");
    let mut c = WsRaw::connect(ws, "/connect");
    let open = r.read_group("connectionevents", "ws_consumers", 1, WAIT);
    let id = text(&open[0], "connection");
    // echo
    c.send(0x1, true, b"echo hello there");
    let m = r.read_group("connectionevents", "ws_consumers", 1, WAIT);
    let said = text(&m[0], "message");
    let reply = said.strip_prefix("echo ").unwrap();
    let a = http(
        ws,
        "POST",
        &format!("/send?id={id}"),
        &[("Content-Type", "text/plain")],
        reply.as_bytes(),
    );
    assert_eq!(a.text(), "1");
    assert_eq!(c.read().unwrap().payload, b"hello there");
    // settag, with the form body sent as text/plain
    let a = http(
        ws,
        "POST",
        &format!("/settags?id={id}"),
        &[("Content-Type", "text/plain;charset=UTF-8")],
        b"foo=1234",
    );
    assert_eq!(a.text(), "1");
    c.send(0x1, true, b"gettag foo");
    let m = r.read_group("connectionevents", "ws_consumers", 1, WAIT);
    assert_eq!(
        text(&m[0], "tags"),
        "foo=1234",
        "the next event carries the new tag"
    );
    // send to a tag
    let a = http(
        ws,
        "POST",
        "/send?foo=1234",
        &[("Content-Type", "text/plain")],
        b"a message!",
    );
    assert_eq!(a.text(), "1");
    assert_eq!(c.read().unwrap().payload, b"a message!");
    // close with a body: the body, then 1000
    let a = http(ws, "POST", &format!("/close?id={id}"), &[], b"bye");
    assert_eq!(a.text(), "1");
    assert_eq!(c.read().unwrap().payload, b"bye");
    assert_eq!(c.expect_close(), 1000);
    let m = r.read_group("connectionevents", "ws_consumers", 1, WAIT);
    assert_eq!(
        (text(&m[0], "action"), text(&m[0], "tags")),
        ("close".into(), "foo=1234".into())
    );
}

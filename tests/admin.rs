//! The admin HTTP API with wsgateway's semantics, through real HTTP and
//! WebSocket clients on loopback.

use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

const TAGGED: &str =
    "  endpoints:\n    - path: /c/{team}/{id}\n      id_param: id\n      set_tags: {app: demo}\n";

struct Setup {
    s: TestServer,
    ws: SocketAddr,
    admin: SocketAddr,
}

fn setup(workers: usize) -> Setup {
    let (s, ws) = ws_server(workers, TAGGED, |_| {});
    let admin = s.handle.admin_addrs()[0];
    Setup { s, ws, admin }
}

fn client(st: &Setup, team: &str, id: &str) -> WsRaw {
    let before = st.s.handle.metrics().ws_upgrades;
    let c = WsRaw::connect(st.ws, &format!("/c/{team}/{id}"));
    wait_until(|| st.s.handle.metrics().ws_upgrades > before, "upgraded");
    c
}

fn post(st: &Setup, target: &str, body: &[u8]) -> HttpResponse {
    http(st.admin, "POST", target, &[], body)
}

#[test]
fn health_ready_metrics() {
    let st = setup(2);
    let _c = client(&st, "red", "a");
    let r = http(st.admin, "GET", "/health", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    assert_eq!(http(st.admin, "GET", "/ready", &[], b"").status, 200);
    let m = http(st.admin, "GET", "/metrics", &[], b"").text();
    assert!(m.contains("# TYPE corerelay_connections gauge"), "{m}");
    assert!(
        m.contains("corerelay_ws_upgrades_total{core=\"0\"}")
            && m.contains("corerelay_ws_upgrades_total{core=\"1\"}")
    );
    // Prometheus conventions: HELP on every family, process metrics.
    let families = m.lines().filter(|l| l.starts_with("# TYPE ")).count();
    let helps = m.lines().filter(|l| l.starts_with("# HELP ")).count();
    assert_eq!(families, helps, "{m}");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "corerelay_build_info{version=",
    ] {
        assert!(m.contains(&format!("\n{name}")), "{name} in {m}");
    }
    let total: u64 = m
        .lines()
        .filter(|l| l.starts_with("corerelay_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    // The WebSocket client and this admin connection, plus possibly the two
    // earlier admin connections: they close lingeringly (until their client's
    // EOF is read), which may not have happened yet.
    assert!((2..=4).contains(&total), "connections {total}: {m}");
}

#[test]
fn send_by_tags_ids_and_empty_selector() {
    let st = setup(4);
    let mut red: Vec<WsRaw> = (0..6)
        .map(|i| client(&st, "red", &format!("r{i}")))
        .collect();
    let mut blue: Vec<WsRaw> = (0..4)
        .map(|i| client(&st, "blue", &format!("b{i}")))
        .collect();
    let cores: HashSet<usize> = (0..6).map(|i| st.s.core_of(&format!("r{i}"))).collect();
    assert!(
        cores.len() >= 2 || st.s.handle.config().workers == 1,
        "red spans cores: {cores:?}"
    );

    // AND of tags: team=red AND app=demo.
    let r = post(&st, "/send?team=red&app=demo", b"hello reds");
    assert_eq!((r.status, r.text().as_str()), (200, "6"));
    for c in &mut red {
        let f = c.read().unwrap();
        assert_eq!((f.opcode, f.payload.as_slice()), (0x1, &b"hello reds"[..]));
    }
    // No connection has both.
    assert_eq!(post(&st, "/send?team=red&app=other", b"x").text(), "0");
    // An id list wins over tags.
    let r = post(&st, "/send?id=b1,r2,nobody&team=red", b"by id");
    assert_eq!(r.text(), "2");
    assert_eq!(blue[1].read().unwrap().payload, b"by id");
    assert_eq!(red[2].read().unwrap().payload, b"by id");
    // An empty selector matches nothing.
    assert_eq!(post(&st, "/send", b"to nobody").text(), "0");
    // Binary iff application/octet-stream.
    let r = http(
        st.admin,
        "POST",
        "/send?team=blue",
        &[("Content-Type", "application/octet-stream")],
        &[0, 255],
    );
    assert_eq!(r.text(), "4");
    for c in &mut blue {
        let f = c.read().unwrap();
        if f.payload == b"by id" {
            continue;
        }
        assert_eq!((f.opcode, f.payload.as_slice()), (0x2, &[0u8, 255][..]));
    }
    // Exactly once: nothing else is waiting anywhere.
    for c in red.iter_mut().chain(blue.iter_mut()) {
        if let Ok(Some(f)) = c.read_within(Duration::from_millis(20)) {
            assert_eq!(
                (f.opcode, f.payload.as_slice()),
                (0x2, &[0u8, 255][..]),
                "only the binary may be left"
            );
        }
    }
    // Text that is not UTF-8 is refused.
    assert_eq!(post(&st, "/send?team=red", &[0xff, 0xfe]).status, 400);
}

#[test]
fn settags_change_and_delete_leave_no_stale_entries() {
    let st = setup(2);
    let mut a = client(&st, "red", "a");
    let mut b = client(&st, "red", "b");
    assert_eq!(
        post(&st, "/settags?id=a", b"role=admin&team=blue").text(),
        "1"
    );
    // a moved from red to blue: red has only b now.
    assert_eq!(post(&st, "/send?team=red", b"reds").text(), "1");
    assert_eq!(b.read().unwrap().payload, b"reds");
    assert_eq!(
        post(&st, "/send?team=blue&role=admin", b"blue admins").text(),
        "1"
    );
    assert_eq!(a.read().unwrap().payload, b"blue admins");
    // An empty value deletes.
    assert_eq!(post(&st, "/settags?team=blue", b"role=").text(), "1");
    assert_eq!(post(&st, "/send?role=admin", b"x").text(), "0");
    // Settags by tag selector over several connections.
    assert_eq!(post(&st, "/settags?app=demo", b"wave=1").text(), "2");
    assert_eq!(post(&st, "/send?wave=1", b"w").text(), "2");
    assert_eq!(
        post(&st, "/settags?team=red", b"").status,
        400,
        "a body is required"
    );
    let status = http(st.admin, "GET", "/status", &[], b"").text();
    let mut lines: Vec<&str> = status.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "id=a app=demo team=blue wave=1",
            "id=b app=demo team=red wave=1"
        ]
    );
}

#[test]
fn close_sends_body_then_1000() {
    let st = setup(2);
    let mut a = client(&st, "red", "a");
    let mut keep = client(&st, "red", "keep");
    let r = post(&st, "/close?id=a", b"bye");
    assert_eq!(r.text(), "1");
    let f = a.read().unwrap();
    assert_eq!((f.opcode, f.payload.as_slice()), (0x1, &b"bye"[..]));
    let close = a.read().unwrap();
    assert_eq!(close.close_code(), Some(1000));
    assert_eq!(&close.payload[2..], b"Closed by server");
    assert!(a.eof());
    // Without a body: just the close.
    assert_eq!(post(&st, "/close?id=keep", b"").text(), "1");
    assert_eq!(keep.expect_close(), 1000);
    wait_until(|| st.s.handle.metrics().connections == 0, "both closed");
}

#[test]
fn status_text_and_json() {
    let st = setup(2);
    let _a = client(&st, "red", "a");
    let _b = client(&st, "blue", "b\"q");
    let r = http(
        st.admin,
        "GET",
        "/status",
        &[("Accept", "application/json")],
        b"",
    );
    assert!(r.head.contains("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("valid JSON");
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["a", "b\"q"]);
    assert_eq!(v[0]["tags"]["app"], "demo");
}

#[test]
fn refusals() {
    let st = setup(1);
    assert_eq!(http(st.admin, "GET", "/nope", &[], b"").status, 404);
    assert_eq!(http(st.admin, "GET", "/send", &[], b"").status, 405);
    assert_eq!(post(&st, "/send?id=x", &vec![b'a'; 2 << 20]).status, 413);
    let mut s = std::net::TcpStream::connect(st.admin).unwrap();
    s.write_all(b"POST /send?id=x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).status, 411);
    let mut s = std::net::TcpStream::connect(st.admin).unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).status, 400);
    assert_eq!(st.s.handle.metrics().admin_errors, 5);
}

#[test]
fn keep_alive_and_pipelining() {
    let st = setup(2);
    let mut a = client(&st, "red", "a");
    let mut s = std::net::TcpStream::connect(st.admin).unwrap();
    let one = "POST /send?id=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1";
    let two = "POST /send?id=a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n2";
    s.write_all(format!("{one}{two}").as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).text(), "1");
    assert_eq!(read_response(&mut s).text(), "1");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).text(), "ok\n");
    assert_eq!(a.read().unwrap().payload, b"1");
    assert_eq!(a.read().unwrap().payload, b"2", "in order");
}

#[test]
fn allowed_networks() {
    let (s, _ws) = ws_server(1, TAGGED, |c| {
        c.admin.as_mut().unwrap().allow =
            vec![corerelay::config::Cidr::parse("10.0.0.0/8").unwrap()];
    });
    let admin = s.handle.admin_addrs()[0];
    for path in ["/metrics", "/status"] {
        assert_eq!(http(admin, "GET", path, &[], b"").status, 403, "{path}");
    }
    assert_eq!(http(admin, "POST", "/send?x=1", &[], b"hi").status, 403);
    // Probes and load balancers may ask for health and readiness.
    assert_eq!(http(admin, "GET", "/health", &[], b"").status, 200);
    assert_eq!(http(admin, "GET", "/ready", &[], b"").status, 200);
}

#[test]
fn ready_is_503_while_draining() {
    let (s, _ws) = ws_server(1, TAGGED, |c| {
        c.shutdown_grace = Duration::from_secs(2);
        c.rely.max_output_bytes = 64 << 20;
    });
    let admin = s.handle.admin_addrs()[0];
    // A RELY receiver that never reads (small receive buffer) keeps the
    // drain busy for its whole grace period.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&s.addr.into()).unwrap();
    let mut stuck: std::net::TcpStream = sock.into();
    stuck.write_all(&login_frame("stuck")).unwrap();
    wait_until(
        || s.handle.owner_core(b"stuck").is_some(),
        "stuck logged in",
    );
    let mut sender = s.login("sender");
    for _ in 0..256 {
        sender.send(b"stuck", &[0u8; 64 * 1024]).unwrap();
    }
    wait_until(|| s.handle.metrics().queued_bytes > 0, "output queued");
    s.handle.shutdown();
    wait_until(
        || http(admin, "GET", "/ready", &[], b"").status == 503,
        "ready turns 503",
    );
    // The admin listener keeps accepting during the drain.
    for _ in 0..3 {
        assert_eq!(
            http(admin, "GET", "/health", &[], b"").status,
            200,
            "still alive while draining"
        );
    }
}

#[test]
fn admin_on_the_websocket_listener_when_enabled() {
    let (s, ws) = ws_server(1, TAGGED, |c| {
        c.admin.as_mut().unwrap().on_websocket_listener = true
    });
    let _a = {
        let c = WsRaw::connect(ws, "/c/red/a");
        wait_until(|| s.handle.owner_core(b"a").is_some(), "a in");
        c
    };
    assert_eq!(http(ws, "GET", "/health", &[], b"").status, 200);
    assert_eq!(http(ws, "POST", "/send?team=red", &[], b"hi").text(), "1");
    // Without the option, a plain request on the WebSocket port is 426 on
    // an endpoint's path, 404 elsewhere.
    let st = setup(1);
    assert_eq!(http(st.ws, "GET", "/c/red/x", &[], b"").status, 426);
    assert_eq!(http(st.ws, "GET", "/health", &[], b"").status, 404);
}

/// Pipelined requests are never dropped: twenty 64 KiB /send requests in
/// one write get twenty answers, in order (the connection is not read while
/// a request is in flight; the requests wait in the socket).
#[test]
fn pipelined_large_requests_are_all_answered() {
    let st = setup(2);
    let mut a = client(&st, "red", "a");
    let s = std::net::TcpStream::connect(st.admin).unwrap();
    let mut w = s.try_clone().unwrap();
    let body = vec![b'x'; 64 * 1024];
    let writer = std::thread::spawn(move || {
        let mut all = Vec::new();
        for _ in 0..20 {
            all.extend_from_slice(
                format!(
                    "POST /send?id=a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            all.extend_from_slice(&body);
        }
        w.write_all(&all).unwrap();
    });
    let mut r = s;
    r.set_read_timeout(Some(WAIT)).unwrap();
    for i in 0..20 {
        assert_eq!(read_response(&mut r).text(), "1", "answer {i}");
        assert_eq!(a.read().unwrap().payload.len(), 64 * 1024);
    }
    writer.join().unwrap();
}

/// Answers obey a bound: a client that pipelines /metrics and never reads
/// stops being served at about 1 MiB of queued answers; nothing is lost,
/// and everything it asked for arrives once it reads.
#[test]
fn answers_to_a_client_that_never_reads_are_bounded() {
    let st = setup(1);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&st.admin.into()).unwrap();
    let s: std::net::TcpStream = sock.into();
    let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    let writer = std::thread::spawn(move || {
        let mut sent = 0usize;
        for _ in 0..3000 {
            if w.write_all(req).is_err() {
                break; // the server stopped reading us: the bound holds
            }
            sent += 1;
        }
        sent
    });
    let sent = writer.join().unwrap();
    let queued = st.s.handle.metrics().queued_bytes;
    assert!(queued <= (1 << 20) + (256 << 10), "{queued} bytes queued");
    let mut r = s;
    r.set_read_timeout(Some(WAIT)).unwrap();
    for i in 0..sent {
        assert_eq!(read_response(&mut r).status, 200, "answer {i} of {sent}");
    }
}

/// An admin request must arrive whole within admin.request_timeout of its
/// first byte: a slowloris gets 408 and is closed (counted).
#[test]
fn a_request_that_never_completes_gets_408() {
    let (s, _ws) = ws_server(1, TAGGED, |c| {
        c.admin.as_mut().unwrap().request_timeout = Duration::from_millis(300);
    });
    let mut t = std::net::TcpStream::connect(s.handle.admin_addrs()[0]).unwrap();
    t.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let r = read_response(&mut t);
    assert_eq!(r.status, 408);
    assert_eq!(s.handle.metrics().admin_errors, 1);
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut t, &mut rest).expect("closed after the 408");
}

/// A generated id is made when /status first shows it (an idle client of
/// such an endpoint holds no id until then): the ids are distinct, carry
/// the endpoint's prefix, stay the same on the next /status, and address
/// exactly their own client.
#[test]
fn generated_ids_are_made_when_status_shows_them() {
    let (s, ws) = ws_server(
        2,
        "  endpoints:\n    - path: /g\n      id_prefix: \"n1-\"\n",
        |_| {},
    );
    let admin = s.handle.admin_addrs()[0];
    let mut clients: Vec<WsRaw> = (0..3)
        .map(|_| {
            let before = s.handle.metrics().ws_upgrades;
            let c = WsRaw::connect(ws, "/g");
            wait_until(|| s.handle.metrics().ws_upgrades > before, "upgraded");
            c
        })
        .collect();
    let ids = |text: String| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .map(|l| {
                l.trim()
                    .strip_prefix("id=")
                    .expect("an id= line")
                    .to_owned()
            })
            .collect();
        v.sort();
        v
    };
    let first = ids(http(admin, "GET", "/status", &[], b"").text());
    assert_eq!(first.len(), 3, "{first:?}");
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 3, "distinct");
    for id in &first {
        let uuid = id.strip_prefix("n1-").expect("the endpoint's prefix");
        assert_eq!(uuid.len(), 36, "{id}");
    }
    assert_eq!(
        ids(http(admin, "GET", "/status", &[], b"").text()),
        first,
        "an id, once shown, stays"
    );
    for id in &first {
        let r = http(admin, "POST", &format!("/send?id={id}"), &[], b"hi");
        assert_eq!(r.text(), "1", "{id} reached");
        // Whichever client it is gets it (bounded rounds of short reads);
        // then none of the others has anything.
        let mut got = None;
        for _ in 0..100 {
            got = (0..clients.len()).find(|&i| {
                matches!(clients[i].read_within(Duration::from_millis(20)), Ok(Some(f)) if f.payload == b"hi")
            });
            if got.is_some() {
                break;
            }
        }
        let got = got.expect("one client got it");
        for (i, c) in clients.iter_mut().enumerate().filter(|(i, _)| *i != got) {
            assert!(
                c.read_within(Duration::from_millis(100)).is_err(),
                "client {i} got {id}'s message too"
            );
        }
    }
    assert_eq!(
        http(admin, "POST", "/send?id=n1-unknown", &[], b"x").text(),
        "0"
    );
}

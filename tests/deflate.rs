//! permessage-deflate (RFC 7692) through real sockets: negotiation per
//! endpoint with Python's `websockets` (which offers compression by
//! default), a broadcast to compressing and plain clients compressed once
//! per core, a decompression bomb refused with 1009 in bounded memory,
//! protocol errors, and a compressing upstream feed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use flate2::{Compress, Compression, FlushCompress};

use crate::support::{http, ws_server, WsRaw};

/// websockets 15 (and redis, the venv the wsproxy tests share).
fn python() -> std::path::PathBuf {
    crate::support::venv_python(
        "wsproxy-venv",
        &["websockets==15.0.1", "redis==5.2.1"],
        "import websockets, redis; assert websockets.__version__ == '15.0.1'",
    )
    .expect("a Python venv with websockets")
}

const ENDPOINTS: &str = "  compression_min_size: 64B
  endpoints:
    - path: /shared
      on_message: echo
      compression: shared
    - path: /dedicated
      on_message: echo
      compression: dedicated
      max_message_size: 4MiB
    - path: /plain
      on_message: echo
    - path: /room/{room}
      compression: shared
    - path: /droom/{room}
      compression: dedicated
    - path: /bomb
      on_message: echo
      compression: shared
      max_message_size: 4MiB
";

/// Runs a Python script to completion; its stdout, or a panic with stderr.
fn run_python(script: &str) -> String {
    let out = Command::new(python())
        .args(["-c", script])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_endpoint_negotiates_as_configured_and_echoes_intact() {
    let (s, ws) = ws_server(2, ENDPOINTS, |_| {});
    let script = format!(
        r#"import asyncio, json, websockets
async def main():
    for path in ["/shared", "/dedicated", "/plain"]:
        async with websockets.connect("ws://{ws}" + path, open_timeout=5, max_size=None) as c:
            print(path, c.response.headers.get("Sec-WebSocket-Extensions"))
            for i in range(50):
                m = json.dumps({{"seq": i, "items": [{{"k": "v" * (i % 7), "n": i}}] * (i % 13)}})
                await c.send(m)
                assert await asyncio.wait_for(c.recv(), 5) == m, (path, i)
                b = m.encode() + bytes(range(256)) * (i % 3)
                await c.send(b)
                assert await asyncio.wait_for(c.recv(), 5) == b, (path, i)
            await c.send("é")
            assert await asyncio.wait_for(c.recv(), 5) == "é"
asyncio.run(main())
"#
    );
    let out = run_python(&script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "/shared permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "/dedicated permessage-deflate",
            "/plain None",
        ]
    );
    let m = s.handle.metrics();
    assert_eq!(m.ws_compression_agreed, 2);
    assert_eq!(m.protocol_errors, 0);
    assert!(m.ws_compressor_output_bytes < m.ws_compressor_input_bytes);
}

#[test]
fn a_broadcast_reaches_compressing_and_plain_clients_compressed_once_per_core() {
    let (s, ws) = ws_server(2, ENDPOINTS, |_| {});
    let script = format!(
        r#"import asyncio, sys, websockets
async def main():
    z = [await websockets.connect("ws://{ws}/room/r1", open_timeout=5) for _ in range(100)]
    p = [await websockets.connect("ws://{ws}/room/r1", open_timeout=5, compression=None) for _ in range(100)]
    assert all(c.response.headers.get("Sec-WebSocket-Extensions") for c in z)
    assert not any(c.response.headers.get("Sec-WebSocket-Extensions") for c in p)
    print("ready", flush=True)
    want = sys.stdin.readline().strip()
    got = await asyncio.gather(*[asyncio.wait_for(c.recv(), 10) for c in z + p])
    print("intact", sum(g == want for g in got), flush=True)
    for c in z + p:
        await c.close()
asyncio.run(main())
"#
    );
    let mut child = Command::new(python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().and_then(|l| l.ok());
    assert_eq!(first.as_deref(), Some("ready"), "{child:?}");
    crate::support::wait_until(|| s.handle.metrics().connections == 200, "200 connections");
    // A 2 KiB JSON message, as a feed would send it.
    let msg: String = format!(
        "[{}]",
        (0..35)
            .map(|i| format!(
                "{{\"sym\":\"SYM{i:03}\",\"bid\":{}.25,\"ask\":{}.75,\"venue\":\"XNAS\"}}",
                100 + i,
                100 + i
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(msg.len() > 1900, "{}", msg.len());
    let admin = s.handle.admin_addrs()[0];
    let r = http(admin, "POST", "/send?room=r1", &[], msg.as_bytes());
    assert_eq!((r.status, r.text()), (200, "200".into()));
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(format!("{msg}\n").as_bytes())
        .unwrap();
    let last = lines.next().and_then(|l| l.ok());
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "{err}");
    assert_eq!(last.as_deref(), Some("intact 200"), "{err}");
    let m = s.handle.metrics();
    let len = msg.len() as u64;
    // Compressed once on each core that holds compressing subscribers,
    // not once per subscriber.
    assert!(
        m.ws_compressor_input_bytes >= len && m.ws_compressor_input_bytes <= 2 * len,
        "compressor input {} for a {len}-byte message",
        m.ws_compressor_input_bytes
    );
    // Each compressing subscriber got the compressed frame: its endpoint's
    // bytes before and after, per delivery.
    let text = http(admin, "GET", "/metrics", &[], b"").text();
    let value = |name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{endpoint=\"/room/{{room}}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    assert_eq!(
        value("corerelay_ws_deflate_sent_plain_bytes_total"),
        100 * len
    );
    let wire = value("corerelay_ws_deflate_sent_wire_bytes_total");
    assert!(
        wire * 3 < 100 * len,
        "{wire} bytes on the wire for 100 x {len}"
    );
}

/// A raw client that offers permessage-deflate on `path`.
fn deflate_client(ws: std::net::SocketAddr, path: &str, offer: &str) -> (WsRaw, String) {
    let mut s = std::net::TcpStream::connect(ws).unwrap();
    let req = WsRaw::request(path).replace(
        "\r\n\r\n",
        &format!("\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"),
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = crate::support::read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (WsRaw(s), head)
}

/// A masked frame with RSV1 set on the first byte.
fn rsv1_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = WsRaw::frame(opcode, fin, payload);
    f[0] |= 0x40;
    f
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

#[test]
fn a_one_gib_decompression_bomb_gets_1009_in_bounded_memory() {
    let (s, ws) = ws_server(1, ENDPOINTS, |_| {});
    // 1 GiB of zeros, deflated as one message, built 1 MiB at a time.
    let mut c = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 1 << 20];
    let mut bomb = Vec::with_capacity(2 << 20);
    for i in 0..1024 {
        let flush = if i == 1023 {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        let before = c.total_in();
        while c.total_in() - before < zeros.len() as u64 || flush == FlushCompress::Sync {
            bomb.reserve(64 * 1024);
            let used = (c.total_in() - before) as usize;
            c.compress_vec(&zeros[used..], &mut bomb, flush).unwrap();
            if flush == FlushCompress::Sync
                && c.total_in() - before == zeros.len() as u64
                && bomb.len() < bomb.capacity()
            {
                break;
            }
        }
    }
    assert!(bomb.ends_with(&[0, 0, 0xff, 0xff]));
    bomb.truncate(bomb.len() - 4);
    assert!(
        bomb.len() < 4 << 20,
        "the bomb fits the 4 MiB limit compressed"
    );
    let before = peak_rss();
    let (mut c, head) = deflate_client(ws, "/bomb", "permessage-deflate");
    assert!(head.contains("permessage-deflate"), "{head}");
    c.send_raw(&rsv1_frame(0x2, true, &bomb));
    assert_eq!(c.expect_close(), 1009);
    let grew = peak_rss().saturating_sub(before);
    assert!(
        grew < 256 << 20,
        "peak RSS grew {} MiB inflating a 1 GiB bomb",
        grew >> 20
    );
    assert_eq!(s.handle.metrics().protocol_errors, 1);
    // The server goes on: a fresh client echoes.
    let (mut c2, _) = deflate_client(ws, "/bomb", "permessage-deflate");
    c2.send(0x1, true, b"still here");
    assert_eq!(c2.read().unwrap().payload, b"still here");
}

#[test]
fn rsv1_where_it_does_not_belong_and_bad_deflate_data_are_closed() {
    let (s, ws) = ws_server(1, ENDPOINTS, |_| {});
    // No extension agreed: RSV1 is a protocol error (1002).
    let mut plain = WsRaw::connect(ws, "/plain");
    plain.send_raw(&rsv1_frame(0x1, true, b"x"));
    assert_eq!(plain.expect_close(), 1002);
    // Agreed, but on a continuation frame or a control frame: 1002.
    let (mut c, _) = deflate_client(ws, "/shared", "permessage-deflate");
    c.send(0x1, false, b"a");
    c.send_raw(&rsv1_frame(0x0, true, b"b"));
    assert_eq!(c.expect_close(), 1002);
    let (mut c, _) = deflate_client(ws, "/shared", "permessage-deflate");
    c.send_raw(&rsv1_frame(0x9, true, b""));
    assert_eq!(c.expect_close(), 1002);
    // Not deflate data: 1007, counted.
    let (mut c, _) = deflate_client(ws, "/shared", "permessage-deflate");
    c.send_raw(&rsv1_frame(0x2, true, &[0xff, 0xff, 0xff, 0xff]));
    assert_eq!(c.expect_close(), 1007);
    // Compressed text that inflates to invalid UTF-8: 1007.
    let mut z = Vec::new();
    assert!(corerelay::protocol::deflate::Deflater::new(6, 15).message(
        &[0xff, 0xfe],
        &mut z,
        true
    ));
    let (mut c, _) = deflate_client(ws, "/shared", "permessage-deflate");
    c.send_raw(&rsv1_frame(0x1, true, &z));
    assert_eq!(c.expect_close(), 1007);
    let m = s.handle.metrics();
    assert_eq!(m.ws_inflate_errors, 1);
    assert_eq!(m.protocol_errors, 5);
    // A fragmented compressed message (RSV1 on the first frame only) is
    // inflated whole and echoed compressed.
    let text = "fragmented and compressed ".repeat(20);
    let mut z = Vec::new();
    assert!(corerelay::protocol::deflate::Deflater::new(6, 15).message(
        text.as_bytes(),
        &mut z,
        true
    ));
    let (mut c, _) = deflate_client(ws, "/shared", "permessage-deflate");
    let (a, b) = z.split_at(z.len() / 2);
    c.send_raw(&rsv1_frame(0x1, false, a));
    c.send(0x0, true, b);
    let f = c.read().unwrap();
    assert!(f.rsv1 && f.opcode == 0x1, "{f:?}");
    let mut out = Vec::new();
    corerelay::protocol::deflate::Inflater::new(15)
        .message(&f.payload, &mut out, 1 << 20, true)
        .unwrap();
    assert_eq!(out, text.as_bytes());
    // Shorter than compression_min_size: sent plain.
    c.send(0x1, true, b"tiny");
    let f = c.read().unwrap();
    assert!(!f.rsv1 && f.payload == b"tiny", "{f:?}");
}

#[test]
fn offers_that_cannot_be_honoured_are_declined_not_failed() {
    let (_s, ws) = ws_server(1, ENDPOINTS, |_| {});
    // shared cannot keep a limit on the server's window: declined.
    let (mut c, head) = deflate_client(
        ws,
        "/shared",
        "permessage-deflate; server_max_window_bits=10",
    );
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    c.send(0x1, true, &[b'a'; 300]);
    let f = c.read().unwrap();
    assert!(!f.rsv1, "nothing agreed, nothing compressed");
    // dedicated keeps it; a malformed offer before it is skipped.
    let (_c, head) = deflate_client(
        ws,
        "/dedicated",
        "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=10",
    );
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n"
        ),
        "{head}"
    );
}

#[test]
fn a_compressing_feed_is_inflated_for_the_sources_clients() {
    // The feed: Python's websockets server (it accepts permessage-deflate
    // by default), sending JSON ticks until told to stop.
    let script = r#"import asyncio, json, websockets
async def feed(c):
    print("extensions", [e.name for e in c.protocol.extensions], flush=True)
    for i in range(2000):
        await c.send(json.dumps({"seq": i, "pad": "tick " * 40}))
        await asyncio.sleep(0.01)
async def main():
    async with websockets.serve(feed, "127.0.0.1", 0) as srv:
        print("port", srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"#;
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _guard = crate::support::KillOnDrop(child);
    let port = lines
        .next()
        .and_then(|l| l.ok())
        .and_then(|l| l.strip_prefix("port ").map(str::to_owned))
        .expect("the feed's port");
    let dir = std::env::temp_dir().join(format!("corerelay-deflate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: []\nsources:\n  - url: \"ws://127.0.0.1:{port}/feed\"\n    compression: true\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\n",
        dir.join("feed.sock").display()
    );
    let cfg = corerelay::Config::from_yaml(&yaml, None).unwrap();
    let server = corerelay::Server::start(cfg).unwrap();
    assert_eq!(
        lines.next().and_then(|l| l.ok()).as_deref(),
        Some("extensions ['permessage-deflate']"),
        "the feed agreed to compress"
    );
    let mut c = WsRaw::connect(server.source_ws_addrs()[0], "/");
    let mut last = None;
    for _ in 0..5 {
        let f = c.read().expect("a tick");
        let v: serde_json::Value = serde_json::from_slice(&f.payload).expect("intact JSON");
        let seq = v["seq"].as_u64().unwrap();
        assert!(last.is_none_or(|l| seq == l + 1), "in order");
        assert_eq!(v["pad"].as_str().unwrap().len(), 200);
        last = Some(seq);
    }
    assert_eq!(server.metrics().protocol_errors, 0);
    server.shutdown();
    server.wait();
}

#[test]
fn a_broadcast_to_dedicated_clients_goes_through_each_ones_context() {
    let (s, ws) = ws_server(2, ENDPOINTS, |_| {});
    let script = format!(
        r#"import asyncio, sys, websockets
async def main():
    cs = [await websockets.connect("ws://{ws}/droom/r2", open_timeout=5) for _ in range(10)]
    assert all(c.response.headers.get("Sec-WebSocket-Extensions") == "permessage-deflate" for c in cs)
    print("ready", flush=True)
    for _ in range(3):
        want = sys.stdin.readline().strip()
        got = await asyncio.gather(*[asyncio.wait_for(c.recv(), 10) for c in cs])
        print("intact", sum(g == want for g in got), flush=True)
asyncio.run(main())
"#
    );
    let mut child = Command::new(python())
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(|l| l.ok()).as_deref(), Some("ready"));
    crate::support::wait_until(|| s.handle.metrics().connections == 10, "10 connections");
    let admin = s.handle.admin_addrs()[0];
    // Three messages sharing most of their text: with context takeover the
    // later ones compress against the earlier ones, per connection.
    for i in 0..3 {
        let msg = format!(
            "{{\"seq\":{i},\"body\":\"{}\"}}",
            "the same words again ".repeat(20)
        );
        let r = http(admin, "POST", "/send?room=r2", &[], msg.as_bytes());
        assert_eq!(r.text(), "10");
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{msg}\n").as_bytes()).unwrap();
        assert_eq!(
            lines.next().and_then(|l| l.ok()).as_deref(),
            Some("intact 10")
        );
    }
    assert!(child.wait().unwrap().success());
    let m = s.handle.metrics();
    // Compressed once per subscriber, not once per core.
    assert!(
        m.ws_compressor_input_bytes > 20 * 400,
        "{}",
        m.ws_compressor_input_bytes
    );
}

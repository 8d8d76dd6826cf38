//! Veltix listeners as Veltix's clients meet them: our Rust client, raw
//! sockets for what no well-behaved client sends, and (in
//! `pypi_client_on_hub_and_echo`) the unmodified PyPI client, veltix 3.3.0.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use corerelay::client::veltix::{Builder, Client, ClientError, Message, Version};
use corerelay::config::Config;
use corerelay::protocol::veltix::{v1, v3};
use corerelay::{Server, ServerHandle};

use crate::support::*;

/// Two listeners on 2 cores: a v3 hub and a v3 echo; a v1 hub and a v1
/// echo; `extra` is appended to each v3 listener.
fn server(extra: &str) -> ServerHandle {
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: []\nadmin:\n  listen: [\"127.0.0.1:0\"]\nveltix:\n  - listen: \"127.0.0.1:0\"\n    on_message: hub\n{extra}  - listen: \"127.0.0.1:0\"\n    on_message: echo\n{extra}  - listen: \"127.0.0.1:0\"\n    version: 1\n  - listen: \"127.0.0.1:0\"\n    version: 1\n    on_message: echo\n"
    );
    Server::start(Config::from_yaml(&yaml, None).expect("config")).expect("start")
}

/// A v3 (or v1) client whose received messages arrive on a channel.
fn client(addr: SocketAddr, v: Version) -> (Client, mpsc::Receiver<Message>) {
    let (tx, rx) = mpsc::channel();
    let c = Builder::new(addr.to_string(), v)
        .on_recv(move |m| {
            let _ = tx.send(m);
        })
        .connect()
        .expect("connect");
    (c, rx)
}

/// Clients of `addr` until one certainly lives on each of the 2 cores (the
/// per-core accept counters say where each landed); each with its core.
fn on_both_cores(
    s: &ServerHandle,
    addr: SocketAddr,
    v: Version,
) -> Vec<(usize, Client, mpsc::Receiver<Message>)> {
    let mut out: Vec<(usize, Client, mpsc::Receiver<Message>)> = Vec::new();
    for _ in 0..64 {
        let before: Vec<u64> = (0..2)
            .map(|i| s.core_metrics(i).unwrap().accepted)
            .collect();
        let (c, rx) = client(addr, v);
        let mut core = None;
        wait_until(
            || {
                core = (0..2).find(|&i| s.core_metrics(i).unwrap().accepted > before[i]);
                core.is_some()
            },
            "accepted",
        );
        out.push((core.unwrap_or(0), c, rx));
        if out.iter().any(|o| o.0 == 0) && out.iter().any(|o| o.0 == 1) && out.len() >= 3 {
            return out;
        }
    }
    panic!("no client on each core within 64 connections");
}

#[test]
fn hub_reaches_every_other_client_on_every_core_restamped() {
    let s = server("");
    let hub = s.veltix_addrs()[0];
    let clients = on_both_cores(&s, hub, Version::V3);
    let (sender_core, sender, sender_rx) = &clients[0];
    sender.send(200, b"hello hub").unwrap();
    for (core, _, rx) in &clients[1..] {
        let m = rx.recv_timeout(WAIT).expect("every other client gets it");
        assert_eq!(
            (m.ty, m.content.as_slice()),
            (200, &b"hello hub"[..]),
            "core {core}"
        );
        assert!(
            m.request_id >= v3::SERVER_IDS,
            "re-stamped: {}",
            m.request_id
        );
    }
    assert!(
        clients.iter().any(|c| c.0 != *sender_core),
        "another core was reached"
    );
    assert!(
        sender_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "not the sender"
    );
    let m = s.metrics();
    assert_eq!(m.veltix_frames_in, 1);
    assert_eq!(m.fanout_deliveries, clients.len() as u64 - 1);
}

#[test]
fn echo_send_and_wait_and_ping() {
    let s = server("");
    let (c, _rx) = client(s.veltix_addrs()[1], Version::V3);
    let r = c
        .send_and_wait(201, "Veltix 🦀".as_bytes(), WAIT)
        .unwrap()
        .expect("the echo answers the waiter");
    assert_eq!((r.ty, r.content.as_slice()), (201, "Veltix 🦀".as_bytes()));
    assert!(r.request_id < v3::SERVER_IDS, "the request's own id");
    let rtt = c.ping(WAIT).unwrap().expect("pong");
    assert!(rtt < WAIT);
    wait_until(|| s.metrics().veltix_pings == 1, "ping counted");
}

/// A client's pending `send_and_wait` is completed by request id alone, so a
/// hub forwarding another client's frame with its client id (both start at
/// 0) would complete it with a stranger's chat line. Re-stamping prevents it.
#[test]
fn a_forwarded_frame_never_completes_anothers_wait() {
    let s = server("");
    let hub = s.veltix_addrs()[0];
    let (a, _arx) = client(hub, Version::V3);
    let (b, brx) = client(hub, Version::V3);
    wait_until(|| s.metrics().accepted == 2, "both in");
    let waiter = std::thread::spawn(move || {
        let r = b.send_and_wait(300, b"question nobody answers", Duration::from_millis(800));
        (r.map(|o| o.is_none()).unwrap_or(false), b)
    });
    // Both clients number from 0: a's first frame carries the id b waits on.
    wait_until(|| s.metrics().veltix_frames_in == 1, "b's question is in");
    assert_eq!(a.send(200, b"chat line").unwrap(), 0, "the id b waits on");
    let got = brx.recv_timeout(WAIT).expect("b's on_recv gets a's line");
    assert_eq!(got.content, b"chat line");
    let (timed_out, _b) = waiter.join().unwrap();
    assert!(timed_out, "b's wait was not completed by a's frame");
}

/// A raw v3 connection past the handshake.
fn raw_v3(addr: SocketAddr, pv: &str) -> TcpStream {
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    let hello = read_handshake(&mut t).expect("server hello");
    assert!(v3::compatible(&hello));
    let mine = format!("{{\"v\": \"9.9.9\", \"pv\": \"{pv}\", \"meta\": {{}}}}");
    let mut m = Vec::new();
    v3::encode_handshake(&mut m, mine.as_bytes());
    t.write_all(&m).unwrap();
    t
}

fn read_handshake(t: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    t.read_exact(&mut len).ok()?;
    let mut m = vec![0; u16::from_be_bytes(len) as usize];
    t.read_exact(&mut m).ok()?;
    Some(m)
}

#[test]
fn corrupt_frames_are_dropped_and_the_connection_stays() {
    let s = server("");
    let hub = s.veltix_addrs()[0];
    let (_b, brx) = client(hub, Version::V3);
    let mut raw = raw_v3(hub, "1.0");
    assert_eq!(read_handshake(&mut raw).unwrap(), v3::ACCEPTED);
    wait_until(|| s.metrics().accepted == 2, "both in");
    let mut good = Vec::new();
    v3::encode(&mut good, 0, 200, 5, b"intact");
    let mut bad_crc = good.clone();
    bad_crc[12] ^= 0xff;
    let mut input = b"garbage before".to_vec();
    input.extend_from_slice(&bad_crc);
    input.extend_from_slice(&good);
    raw.write_all(&input).unwrap();
    let m = brx.recv_timeout(WAIT).expect("the intact frame arrives");
    assert_eq!(m.content, b"intact");
    assert!(
        brx.recv_timeout(Duration::from_millis(200)).is_err(),
        "only it"
    );
    assert_eq!(s.metrics().veltix_corrupt, 2, "the junk and the bad CRC");
    // Still usable: a ping on the same connection gets its pong.
    let mut ping = Vec::new();
    v3::encode(&mut ping, 0, v3::PING, 77, b"");
    raw.write_all(&ping).unwrap();
    let mut pong = [0u8; v3::HEADER];
    raw.read_exact(&mut pong).unwrap();
    let mut want = Vec::new();
    v3::encode(&mut want, 0, v3::PONG, 77, b"");
    assert_eq!(&pong[..], &want[..]);
}

#[test]
fn server_full_and_the_protocol_version_check() {
    let s = server("    max_clients: 2\n");
    let hub = s.veltix_addrs()[0];
    let (_a, _) = client(hub, Version::V3);
    let (_b, _) = client(hub, Version::V3);
    match Builder::new(hub.to_string(), Version::V3).connect() {
        Err(ClientError::ServerFull) => {}
        other => panic!("expected server_full, got {:?}", other.err()),
    }
    wait_until(|| s.metrics().veltix_refused_full == 1, "counted");
    let admin = s.admin_addrs()[0];
    let status = http(admin, "GET", "/status", &[], b"").text();
    assert!(
        status.contains(&format!("veltix={hub} version=3 on_message=hub clients=2")),
        "{status}"
    );
    let metrics = http(admin, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains(&format!("corerelay_veltix_clients{{listener=\"{hub}\"}} 2")),
        "{metrics}"
    );
    // Another major version is closed without a word.
    let mut other = raw_v3(s.veltix_addrs()[1], "2.0");
    assert!(read_handshake(&mut other).is_none(), "closed");
    wait_until(|| s.metrics().protocol_errors == 1, "counted");
    // A place freed is a place taken again.
    drop(_a);
    let one_left = format!("corerelay_veltix_clients{{listener=\"{hub}\"}} 1");
    wait_until(
        || {
            http(admin, "GET", "/metrics", &[], b"")
                .text()
                .contains(&one_left)
        },
        "a's place given back",
    );
    let again = Builder::new(hub.to_string(), Version::V3).connect();
    assert!(again.is_ok(), "{:?}", again.err());
}

#[test]
fn v1_hub_forwards_byte_for_byte_and_drops_bad_hashes() {
    let s = server("");
    let hub = s.veltix_addrs()[2];
    let mut a = TcpStream::connect(hub).unwrap();
    let (_b, brx) = client(hub, Version::V1);
    wait_until(|| s.metrics().accepted == 2, "both in");
    let mut frame = Vec::new();
    v1::encode(&mut frame, 200, b"hello", 0x0000_01a2_05c6_7c46);
    let mut bad = frame.clone();
    *bad.last_mut().unwrap() ^= 1;
    let mut input = bad.clone();
    input.extend_from_slice(&frame);
    a.write_all(&input).unwrap();
    let m = brx.recv_timeout(WAIT).expect("the good frame");
    assert_eq!(
        (m.ty, m.content.as_slice(), m.timestamp_ms),
        (200, &b"hello"[..], 0x0000_01a2_05c6_7c46),
        "byte for byte, the sender's timestamp kept"
    );
    assert!(brx.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(s.metrics().veltix_corrupt, 1);
    // The v1 echo answers the content back.
    let (e, erx) = client(s.veltix_addrs()[3], Version::V1);
    e.send(201, b"back").unwrap();
    let m = erx.recv_timeout(WAIT).expect("echo");
    assert_eq!((m.ty, m.content.as_slice()), (201, &b"back"[..]));
}

/// The unmodified PyPI client (veltix 3.3.0) against a hub and an echo:
/// three clients on the hub, `send_and_wait` on the echo, `ping_server`.
/// The virtual environment is built under target/ on first use (PyPI);
/// if it cannot be built, this test fails and says why.
#[test]
fn pypi_client_on_hub_and_echo() {
    let python = match veltix_python() {
        Ok(p) => p,
        Err(e) => panic!("cannot build a Python environment with veltix==3.3.0: {e}"),
    };
    let s = server("");
    let (hub, echo) = (s.veltix_addrs()[0], s.veltix_addrs()[1]);
    let script = r#"
import json, sys, threading, time
from veltix import Client, ClientConfig, MessageType, Request
CHAT = MessageType(200, "chat")
hub_port, echo_port = int(sys.argv[1]), int(sys.argv[2])
got = {i: [] for i in range(3)}
done = threading.Event()
clients = []
for i in range(3):
    c = Client(ClientConfig(server_addr="127.0.0.1", port=hub_port))
    def on_recv(r, i=i):
        got[i].append((r.type.code, r.content.decode(), r.request_id))
        if sum(len(v) for v in got.values()) == 2:
            done.set()
    c.on_recv(on_recv)
    assert c.connect(), "hub connect"
    clients.append(c)
time.sleep(0.2)
clients[0].send(Request(CHAT, b"hi from 0"))
done.wait(5)
e = Client(ClientConfig(server_addr="127.0.0.1", port=echo_port))
assert e.connect(), "echo connect"
r = e.send_and_wait(Request(CHAT, b"echo me"), timeout=5)
rtt = e.ping_server(timeout=5)
print(json.dumps({
    "hub": {str(k): v for k, v in got.items()},
    "echo": None if r is None else [r.type.code, r.content.decode()],
    "ping": rtt,
}))
for c in clients + [e]:
    c.disconnect()
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(hub.port().to_string())
        .arg(echo.port().to_string())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON from the script");
    assert_eq!(v["hub"]["0"], serde_json::json!([]), "not the sender: {v}");
    for i in ["1", "2"] {
        let got = &v["hub"][i][0];
        assert_eq!(
            (got[0].as_u64(), got[1].as_str()),
            (Some(200), Some("hi from 0")),
            "{v}"
        );
        assert!(got[2].as_u64().unwrap_or(0) >= 32768, "server id: {v}");
    }
    assert_eq!(v["echo"], serde_json::json!([200, "echo me"]), "{v}");
    assert!(v["ping"].as_f64().is_some(), "ping answered: {v}");
}

/// target/veltix-venv/bin/python with veltix==3.3.0, built once.
fn veltix_python() -> Result<std::path::PathBuf, String> {
    crate::support::venv_python(
        "veltix-venv",
        &["veltix==3.3.0"],
        "import veltix; assert veltix.__version__ == '3.3.0'",
    )
}

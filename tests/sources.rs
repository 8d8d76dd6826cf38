//! Upstream sources' local endpoints (Veylor-compatible): Unix sockets with
//! 4-byte big-endian framing, per-source WebSocket servers, socket files.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use corerelay::config::Config;
use corerelay::Server;

use crate::support::*;

fn tmp_sock(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corerelay-src-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("s.sock")
}

/// A Veylor config for one source at an address nobody serves (port 9 on
/// loopback: the discard port, closed here), with a Unix socket and a
/// WebSocket port.
fn config(sock: &std::path::Path) -> Config {
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: []\nsources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\n    max_message_size: 1KiB\nperformance:\n  max_queue_size: 100\n  reconnect_delay: 5\n  reconnect_max_attempts: 0\n",
        sock.display()
    );
    Config::from_yaml(&yaml, None).expect("config")
}

#[test]
fn unix_framing_byte_by_byte_and_bad_lengths() {
    let path = tmp_sock("frames");
    let server = Server::start(config(&path)).expect("start");
    let mut c = UnixStream::connect(&path).expect("connect unix");
    let mut msg = 5u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"hello");
    msg.extend_from_slice(&0u32.to_be_bytes());
    for b in &msg {
        c.write_all(std::slice::from_ref(b)).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    // The source is down: both messages were parsed, then dropped and counted.
    wait_until(
        || server.metrics().source_dropped == 2,
        "two framed messages seen",
    );
    // A length over max_message_size closes that client only.
    let mut bad = UnixStream::connect(&path).unwrap();
    bad.write_all(&4096u32.to_be_bytes()).unwrap();
    bad.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut bad, &mut b).unwrap_or(0),
        0,
        "closed"
    );
    assert_eq!(server.metrics().protocol_errors, 1);
    c.write_all(&1u32.to_be_bytes()).unwrap();
    c.write_all(b"x").unwrap();
    wait_until(
        || server.metrics().source_dropped == 3,
        "the good client is unaffected",
    );
    drop(server);
    assert!(!path.exists(), "socket file removed at shutdown");
}

#[test]
fn stale_socket_file_is_replaced_live_one_is_refused() {
    let path = tmp_sock("stale");
    // Stale: a socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::start(config(&path)).expect("stale file replaced");
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    // Live: another process (here a listener we hold) answers on it.
    let live = UnixListener::bind(&path).unwrap();
    let err = Server::start(config(&path))
        .err()
        .expect("live socket refused");
    assert!(err.to_string().contains("live process"), "{err}");
    assert!(path.exists(), "the live socket file was not deleted");
    drop(live);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn source_websocket_port_takes_any_path() {
    let path = tmp_sock("ws");
    let server = Server::start(config(&path)).expect("start");
    let ws = server.source_ws_addrs()[0];
    let mut a = WsRaw::connect(ws, "/");
    let mut b = WsRaw::connect(ws, "/anything/at/all?x=1");
    a.send(0x1, true, b"to the source");
    b.send(0x2, true, &[1, 2, 3]);
    wait_until(
        || server.metrics().source_dropped == 2,
        "both messages routed to the (down) source",
    );
    // Still connected.
    a.send(0x9, true, b"p");
    assert_eq!(a.read().unwrap().opcode, 0xA);
    b.send(0x9, true, b"p");
    assert_eq!(b.read().unwrap().opcode, 0xA);
}

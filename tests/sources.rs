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

mod upstream {
    //! An in-test upstream feed: a tungstenite server on loopback.

    use std::net::{SocketAddr, TcpListener};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tungstenite::handshake::server::{Request, Response};
    use tungstenite::Message;

    pub struct Feed {
        pub addr: SocketAddr,
        /// Messages to send to the connected corerelay.
        pub tx: Sender<Message>,
        /// Messages corerelay sent upstream.
        pub rx: Receiver<Message>,
        /// Upgrade headers of the latest connection.
        pub headers: Arc<Mutex<Vec<(String, String)>>>,
        /// Connections accepted so far.
        pub accepted: Arc<AtomicUsize>,
        /// Set to close the current connection.
        pub kick: Arc<AtomicUsize>,
    }

    /// Serves connections one after another on `listener`.
    // tungstenite's header callback fixes its (large) error type.
    #[allow(clippy::result_large_err)]
    pub fn start(listener: TcpListener) -> Feed {
        let addr = listener.local_addr().unwrap();
        let (tx, out_rx) = channel::<Message>();
        let (in_tx, rx) = channel::<Message>();
        let headers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let kick = Arc::new(AtomicUsize::new(0));
        let (h, a, k) = (headers.clone(), accepted.clone(), kick.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = h.clone();
                let cb = move |req: &Request, resp: Response| {
                    let mut v = seen.lock().unwrap();
                    v.clear();
                    for (n, val) in req.headers() {
                        v.push((n.as_str().to_owned(), val.to_str().unwrap_or("").to_owned()));
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tungstenite::accept_hdr(stream, cb) else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let kicks = k.load(Ordering::SeqCst);
                let _ = ws
                    .get_mut()
                    .set_read_timeout(Some(Duration::from_millis(5)));
                // Bounded by the test's lifetime: ends when corerelay goes
                // or the test asks for a kick.
                loop {
                    if k.load(Ordering::SeqCst) != kicks {
                        break;
                    }
                    while let Ok(m) = out_rx.try_recv() {
                        if ws.send(m).is_err() {
                            break;
                        }
                    }
                    match ws.read() {
                        Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
                        Ok(Message::Close(_)) => break,
                        Ok(m) => {
                            let _ = in_tx.send(m);
                        }
                        Err(tungstenite::Error::Io(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            }
        });
        Feed {
            addr,
            tx,
            rx,
            headers,
            accepted,
            kick,
        }
    }
}

fn source_config(url: &str, sock: &std::path::Path, delay: &str) -> Config {
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: []\nadmin:\n  listen: [\"127.0.0.1:0\"]\nsources:\n  - url: \"{url}\"\n    headers:\n      Authorization: \"Bearer sekrit\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\nperformance:\n  reconnect_delay: {delay}\n",
        sock.display()
    );
    Config::from_yaml(&yaml, None).expect("config")
}

fn read_unix_msg(c: &mut UnixStream) -> Vec<u8> {
    use std::io::Read;
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut len = [0u8; 4];
    c.read_exact(&mut len).expect("length");
    let mut m = vec![0; u32::from_be_bytes(len) as usize];
    c.read_exact(&mut m).expect("message");
    m
}

#[test]
fn upstream_fans_out_and_clients_talk_back() {
    use tungstenite::Message;
    let feed = upstream::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let path = tmp_sock("up");
    let server = Server::start(source_config(
        &format!("ws://{}/feed?x=1", feed.addr),
        &path,
        "100ms",
    ))
    .expect("start");
    wait_until(
        || feed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 1,
        "corerelay connects upstream",
    );
    let h = feed.headers.lock().unwrap().clone();
    assert!(
        h.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == "Bearer sekrit"),
        "{h:?}"
    );
    // WebSocket clients (on both cores, likely) and a Unix client.
    let ws = server.source_ws_addrs()[0];
    let mut clients: Vec<WsRaw> = Vec::new();
    // Certainty, not luck: WebSocket clients on both cores (per-core
    // upgrade counters tell where each landed).
    let on_core = |c: usize| server.core_metrics(c).map_or(0, |m| m.ws_upgrades);
    while clients.len() < 4 || on_core(0) == 0 || on_core(1) == 0 {
        assert!(
            clients.len() < 100,
            "could not spread clients over both cores"
        );
        clients.push(WsRaw::connect(ws, "/"));
        let n = clients.len() as u64;
        wait_until(|| server.metrics().ws_upgrades == n, "client in");
    }
    let mut ux = UnixStream::connect(&path).unwrap();
    let n = clients.len() as u64;
    wait_until(|| server.metrics().accepted > n, "unix client in");
    feed.tx.send(Message::Text("hello".into())).unwrap();
    feed.tx
        .send(Message::Binary(vec![1u8, 2, 3].into()))
        .unwrap();
    for c in &mut clients {
        let f = c.read().unwrap();
        assert_eq!(
            (f.opcode, f.payload.as_slice()),
            (0x1, &b"hello"[..]),
            "text stays text"
        );
        let f = c.read().unwrap();
        assert_eq!(
            (f.opcode, f.payload.as_slice()),
            (0x2, &[1u8, 2, 3][..]),
            "binary stays binary"
        );
    }
    assert_eq!(read_unix_msg(&mut ux), b"hello");
    assert_eq!(read_unix_msg(&mut ux), [1, 2, 3]);
    // Clients -> source, in order per client; Unix messages as binary.
    clients[0].send(0x1, true, b"up 1");
    clients[0].send(0x2, true, b"up 2");
    let mut f = 4u32.to_be_bytes().to_vec();
    f.extend_from_slice(b"unix");
    ux.write_all(&f).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(feed.rx.recv_timeout(WAIT).expect("upstream receives"));
    }
    let pos = |m: &Message| got.iter().position(|x| x == m).expect("received");
    assert!(
        pos(&Message::Text("up 1".into())) < pos(&Message::Binary(b"up 2".to_vec().into())),
        "in order"
    );
    assert!(got.contains(&Message::Binary(b"unix".to_vec().into())));
    assert_eq!(server.metrics().source_out, 3);
    // One clean connection throughout: the upgrade response alone in a
    // read must not be mistaken for frames.
    assert_eq!(server.metrics().source_reconnects, 0);
    assert_eq!(feed.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Sources in /status and /metrics.
    let admin = server.admin_addrs()[0];
    let status = http(admin, "GET", "/status", &[], b"").text();
    // The query's values are masked wherever the URL is shown.
    let url = format!("ws://{}/feed?x=***", feed.addr);
    assert!(
        status.contains(&format!(
            "source={url} state=up messages_in=2 messages_out=3 dropped=0 reconnects=0"
        )),
        "{status}"
    );
    let metrics = http(admin, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("corerelay_source_up_by_source{source=\"0\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("corerelay_source_messages_in_by_source_total{source=\"0\"} 2"));
}

#[test]
fn upstream_restart_keeps_clients_and_backs_off() {
    use tungstenite::Message;
    let feed = upstream::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    init_log();
    let path = tmp_sock("restart");
    let server = Server::start(source_config(
        &format!("ws://{}/", feed.addr),
        &path,
        "200ms",
    ))
    .expect("start");
    wait_until(
        || feed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 1,
        "connected",
    );
    let mut c = WsRaw::connect(server.source_ws_addrs()[0], "/");
    wait_until(|| server.metrics().ws_upgrades == 1, "client in");
    // The source drops the connection: corerelay reconnects after its delay.
    let t0 = std::time::Instant::now();
    feed.kick.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    wait_until(
        || feed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 2,
        "reconnected",
    );
    let waited = t0.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(90),
        "backoff observed: {waited:?}"
    );
    assert!(
        waited < std::time::Duration::from_secs(3),
        "reconnected promptly: {waited:?}"
    );
    // The client stayed connected and hears the new connection.
    feed.tx.send(Message::Text("after restart".into())).unwrap();
    assert_eq!(c.read().unwrap().payload, b"after restart");
}

#[test]
fn instantly_closing_source_backs_off() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = accepts.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s); // accept and close at once
        }
    });
    let path = tmp_sock("flap");
    let server =
        Server::start(source_config(&format!("ws://{addr}/"), &path, "100ms")).expect("start");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let n = accepts.load(std::sync::atomic::Ordering::SeqCst);
    // 100 ms doubling with jitter of at most half: under 1.5 s that is at
    // most 1 + 5 attempts; a tight loop would be thousands.
    assert!((2..=7).contains(&n), "{n} connection attempts in 1.5 s");
    assert!(server.metrics().source_reconnects >= 1);
}

/// A TLS server config for 127.0.0.1 with a self-signed certificate, and
/// the path of that certificate as a CA file (`name` keeps tests apart).
fn tls_server(name: &str) -> (std::sync::Arc<rustls::ServerConfig>, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
    let dir = std::env::temp_dir().join(format!("corerelay-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    let server_cfg = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key.into())
        .unwrap(),
    );
    (server_cfg, ca)
}

/// A wss:// source yields at most one TLS record's plaintext per read, so a
/// read shorter than the buffer does not mean the socket is drained. A
/// burst followed by silence must arrive whole, not wait for the source's
/// next message or the next ping (30 s away here).
#[test]
fn wss_burst_then_silence_arrives_whole() {
    use tungstenite::Message;
    let (server_cfg, ca) = tls_server("burst");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Some(tcp) = listener.incoming().flatten().next() else {
            return;
        };
        let conn = rustls::ServerConnection::new(server_cfg).unwrap();
        let mut ws = tungstenite::accept(rustls::StreamOwned::new(conn, tcp)).unwrap();
        let _ = up_tx.send(());
        if go_rx.recv_timeout(WAIT).is_err() {
            return;
        }
        for i in 0..3u8 {
            ws.send(Message::Binary(vec![i; 64 * 1024].into())).unwrap();
        }
        // Silent, connection open, until the test is done.
        let _ = done_rx.recv_timeout(WAIT * 2);
    });
    let path = tmp_sock("wss-burst");
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: []\nsources:\n  - url: \"wss://{addr}/burst\"\n    ca_file: \"{}\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\n",
        ca.display(),
        path.display()
    );
    let server = Server::start(Config::from_yaml(&yaml, None).unwrap()).expect("start");
    up_rx.recv_timeout(WAIT).expect("TLS upgrade done");
    let mut c = WsRaw::connect(server.source_ws_addrs()[0], "/");
    wait_until(|| server.metrics().ws_upgrades == 1, "client in");
    go_tx.send(()).unwrap();
    for i in 0..3u8 {
        let f = c.read().expect("all three messages of the burst");
        assert_eq!((f.opcode, f.payload.len()), (0x2, 64 * 1024));
        assert!(f.payload.iter().all(|&b| b == i), "message {i} intact");
    }
    let _ = done_tx.send(());
}

/// A wss:// upstream with a certificate from a private CA the test makes.
#[test]
fn wss_source_trusts_its_ca_file_and_nothing_else() {
    use std::sync::Arc;
    use tungstenite::Message;
    let (server_cfg, ca) = tls_server("ca");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (got_tx, got_rx) = std::sync::mpsc::channel::<Message>();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let conn = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
            let Ok(mut ws) = tungstenite::accept(rustls::StreamOwned::new(conn, tcp)) else {
                continue;
            };
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if go_rx.recv_timeout(WAIT).is_err() {
                return;
            }
            ws.send(Message::Text("secure hello".into())).unwrap();
            while let Ok(m) = ws.read() {
                if m.is_text() || m.is_binary() {
                    let _ = got_tx.send(m);
                }
            }
        }
    });
    let path = tmp_sock("wss");
    let yaml = |ca_line: &str| {
        format!(
            "workers: 2\npin: false\nrely:\n  listen: []\nsources:\n  - url: \"wss://{addr}/secure\"\n{ca_line}    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\nperformance:\n  reconnect_delay: 100ms\n",
            path.display()
        )
    };
    let cfg =
        Config::from_yaml(&yaml(&format!("    ca_file: \"{}\"\n", ca.display())), None).unwrap();
    let server = Server::start(cfg).expect("start");
    wait_until(
        || accepted.load(std::sync::atomic::Ordering::SeqCst) == 1,
        "TLS upgrade done",
    );
    let mut c = WsRaw::connect(server.source_ws_addrs()[0], "/");
    wait_until(|| server.metrics().ws_upgrades == 1, "client in");
    go_tx.send(()).unwrap();
    let f = c.read().unwrap();
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (0x1, &b"secure hello"[..])
    );
    c.send(0x1, true, b"secure up");
    assert_eq!(
        got_rx.recv_timeout(WAIT).unwrap(),
        Message::Text("secure up".into())
    );
    drop(c);
    drop(server);

    // Without the CA file the Mozilla roots do not know this certificate:
    // the handshake fails, the source never comes up, and it backs off.
    let cfg = Config::from_yaml(&yaml(""), None).unwrap();
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    let server = Server::start(cfg).expect("start");
    wait_until(
        || server.metrics().source_reconnects >= 2,
        "failed handshakes retried",
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "no upgrade over an untrusted certificate"
    );
    assert_eq!(server.metrics().source_in, 0);
}

/// max_queue_size bounds what a client that never reads can hold: it is
/// cut (disconnect policy) while the others keep receiving everything.
#[test]
fn slow_source_client_is_bounded_by_max_queue_size() {
    use tungstenite::Message;
    let feed = upstream::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let path = tmp_sock("slowq");
    let mut cfg = source_config(&format!("ws://{}/", feed.addr), &path, "100ms");
    cfg.performance.max_queue_size = 50;
    let server = Server::start(cfg).expect("start");
    wait_until(
        || feed.accepted.load(std::sync::atomic::Ordering::SeqCst) == 1,
        "connected",
    );
    let ws = server.source_ws_addrs()[0];
    // A client with a tiny receive buffer that never reads.
    let _slow = never_reading_ws(ws, "/");
    let mut reader = WsRaw::connect(ws, "/");
    wait_until(|| server.metrics().ws_upgrades == 2, "both in");
    let payload = "y".repeat(16 * 1024);
    const N: usize = 600;
    for i in 0..N {
        feed.tx.send(Message::Text(payload.clone().into())).unwrap();
        // The reader keeps up as it goes.
        let f = reader.read().unwrap();
        assert_eq!(f.payload.len(), payload.len(), "message {i}");
    }
    wait_until(
        || server.metrics().slow_consumer_disconnect == 1,
        "slow client cut",
    );
    // Its queue never held more than max_queue_size messages' worth.
    assert!(server.metrics().queued_bytes <= 64 * 16 * 1024);
}

/// A source that stops reading does not make corerelay queue its clients'
/// messages without bound: past websocket.max_output_bytes they are
/// dropped and counted (source_dropped), and queued bytes stay bounded.
#[test]
fn messages_for_a_source_that_never_reads_are_bounded() {
    let listener = {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        sock.listen(8).unwrap();
        let l: std::net::TcpListener = sock.into();
        l
    };
    let addr = listener.local_addr().unwrap();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Some(tcp) = listener.incoming().flatten().next() else {
            return;
        };
        // Upgraded, then never read again until the test ends.
        let _ws = tungstenite::accept(tcp).unwrap();
        let _ = up_tx.send(());
        let _ = done_rx.recv_timeout(WAIT * 4);
    });
    let path = tmp_sock("noread");
    let yaml = format!(
        "workers: 1\npin: false\nrely:\n  listen: []\nwebsocket:\n  listen: []\n  max_output_bytes: 256KiB\n  endpoints:\n    - path: /unused\nadmin:\n  listen: []\nsources:\n  - url: \"ws://{addr}/\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\n",
        path.display()
    );
    let server = Server::start(Config::from_yaml(&yaml, None).unwrap()).expect("start");
    up_rx.recv_timeout(WAIT).expect("source up");
    let mut c = WsRaw::connect(server.source_ws_addrs()[0], "/");
    wait_until(|| server.metrics().ws_upgrades == 1, "client in");
    let frame = WsRaw::frame(0x2, true, &[9u8; 16 * 1024]);
    let mut sent = 0;
    while server.metrics().source_dropped == 0 {
        assert!(sent < 4096, "nothing dropped after {sent} messages");
        c.send_raw(&frame);
        sent += 1;
    }
    wait_until(
        || {
            let m = server.metrics();
            m.source_out + m.source_dropped == sent as u64
        },
        "every message written upstream or dropped, none lost",
    );
    let m = server.metrics();
    assert!(
        m.queued_bytes <= 256 * 1024 + 64 * 1024,
        "{} queued",
        m.queued_bytes
    );
    let _ = done_tx.send(());
}

/// A reload adds, changes and removes sources while the server runs. An
/// added source is dialled and its listeners open; a source whose feed
/// settings changed is dialled again while its clients stay; a removed
/// source's clients are closed (WebSocket 1001), its listeners and socket
/// file go, and it leaves /status and /metrics. The others never notice.
#[test]
fn reload_adds_changes_and_removes_sources() {
    use std::sync::atomic::Ordering::SeqCst;
    use tungstenite::Message;
    let feed_a = upstream::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let feed_b = upstream::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let (path_a, path_b) = (tmp_sock("reload-a"), tmp_sock("reload-b"));
    let source = |feed: std::net::SocketAddr, path: &std::path::Path, token: &str| {
        format!("  - url: \"ws://{feed}/feed\"\n    headers:\n      Authorization: \"Bearer {token}\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n    unix_socket_path: \"{}\"\n", path.display())
    };
    let yaml = |sources: String| {
        format!("workers: 2\npin: false\nrely:\n  listen: []\nadmin:\n  listen: [\"127.0.0.1:0\"]\nsources:\n{sources}performance:\n  reconnect_delay: 100ms\n")
    };
    let server =
        Server::start(Config::from_yaml(&yaml(source(feed_a.addr, &path_a, "one")), None).unwrap())
            .expect("start");
    let admin = server.admin_addrs()[0];
    let ws_a = server.source_ws_addrs()[0];
    let source_up = |n: usize| {
        http(admin, "GET", "/metrics", &[], b"")
            .text()
            .contains(&format!(
                "corerelay_source_up_by_source{{source=\"{n}\"}} 1"
            ))
    };
    wait_until(|| source_up(0), "source A up");
    let mut client_a = WsRaw::connect(ws_a, "/");
    let mut unix_a = UnixStream::connect(&path_a).unwrap();
    wait_until(|| server.metrics().accepted >= 2, "A's clients in");
    feed_a.tx.send(Message::Text("a1".into())).unwrap();
    assert_eq!(client_a.read().unwrap().payload, b"a1");
    assert_eq!(read_unix_msg(&mut unix_a), b"a1");

    // A's header changes (dial again, keep its clients); B is added.
    let mut reloader = server.reloader();
    let two = yaml(source(feed_a.addr, &path_a, "two") + &source(feed_b.addr, &path_b, "b"));
    let report = reloader.apply(Config::from_yaml(&two, None).unwrap());
    assert_eq!(report.applied, vec!["sources"], "{report:?}");
    assert_eq!(report.redialled.len(), 1, "{report:?}");
    assert_eq!(report.added.len(), 1, "{report:?}");
    assert!(
        report.errors.is_empty() && report.failed.is_empty(),
        "{report:?}"
    );
    let ws_b = report.bound[0].1;
    wait_until(|| feed_a.accepted.load(SeqCst) == 2, "A dialled again");
    let auth = |f: &upstream::Feed| {
        let h = f.headers.lock().unwrap();
        h.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(auth(&feed_a).as_deref(), Some("Bearer two"));
    wait_until(|| feed_b.accepted.load(SeqCst) == 1, "B dialled");
    wait_until(|| source_up(0) && source_up(1), "both up");
    feed_a.tx.send(Message::Text("a2".into())).unwrap();
    assert_eq!(client_a.read().unwrap().payload, b"a2", "A's client stayed");
    assert_eq!(read_unix_msg(&mut unix_a), b"a2");
    let before = server.metrics().accepted;
    let mut client_b = WsRaw::connect(ws_b, "/");
    let mut unix_b = UnixStream::connect(&path_b).unwrap();
    wait_until(|| server.metrics().accepted >= before + 2, "B's clients in");
    client_b.send(0x1, true, b"from b");
    assert_eq!(
        feed_b.rx.recv_timeout(WAIT).unwrap(),
        Message::Text("from b".into())
    );
    feed_b.tx.send(Message::Text("b1".into())).unwrap();
    assert_eq!(client_b.read().unwrap().payload, b"b1");
    assert_eq!(read_unix_msg(&mut unix_b), b"b1");

    // A is removed.
    let report =
        reloader.apply(Config::from_yaml(&yaml(source(feed_b.addr, &path_b, "b")), None).unwrap());
    assert_eq!(report.removed.len(), 1, "{report:?}");
    assert!(
        report.added.is_empty() && report.redialled.is_empty(),
        "{report:?}"
    );
    assert_eq!(client_a.expect_close(), 1001);
    unix_a.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(
        std::io::Read::read(&mut unix_a, &mut [0u8; 16]).unwrap_or(0),
        0
    );
    assert!(!path_a.exists(), "A's socket file removed");
    wait_until(
        || std::net::TcpStream::connect(ws_a).is_err(),
        "A's port closed",
    );
    let status = http(admin, "GET", "/status", &[], b"").text();
    assert!(!status.contains(&feed_a.addr.to_string()), "{status}");
    assert!(status.contains(&feed_b.addr.to_string()), "{status}");
    let metrics = http(admin, "GET", "/metrics", &[], b"").text();
    assert!(!metrics.contains("source=\"0\""), "{metrics}");
    // B carries on.
    feed_b.tx.send(Message::Text("b2".into())).unwrap();
    assert_eq!(client_b.read().unwrap().payload, b"b2");
    assert_eq!(read_unix_msg(&mut unix_b), b"b2");
    assert_eq!(feed_b.accepted.load(SeqCst), 1, "B was never dialled again");
    drop(server);
    assert!(
        !path_b.exists(),
        "the added source's socket file removed at exit"
    );
}

//! TLS on incoming connections (`tls: {cert, key}` on websocket, rely and
//! admin), with a test certificate: Python's websockets over ssl (wss),
//! a rustls client for RELY and for the admin API (https), and what a
//! client that does not speak TLS gets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use corerelay::config::Config;
use corerelay::Server;

use crate::support::{wait_until, TestServer, WAIT};

/// A self-signed certificate for 127.0.0.1 (also its own CA), as PEM
/// files: (cert, key).
fn cert(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("corerelay-srvtls-{}-{name}", std::process::id()));
    let (_, c, k) = crate::support::test_cert(&dir);
    (c, k)
}

fn server(name: &str) -> (TestServer, std::path::PathBuf) {
    let (c, k) = cert(name);
    let tls = format!(
        "tls: {{cert: \"{}\", key: \"{}\"}}",
        c.display(),
        k.display()
    );
    let yaml = format!(
        "workers: 2\npin: false\nrely: {{listen: [\"127.0.0.1:0\"], {tls}}}\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  {tls}\n  endpoints: [{{path: /echo, on_message: echo}}]\nadmin: {{listen: [\"127.0.0.1:0\"], {tls}}}\n"
    );
    let cfg = Config::from_yaml(&yaml, None).expect("config with tls");
    let handle = Server::start(cfg).expect("starts");
    let addr = handle.rely_addrs()[0];
    (TestServer { handle, addr }, c)
}

/// A blocking rustls client trusting `ca`.
fn tls_client(
    addr: SocketAddr,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A client that sends `first` in the clear to a TLS port is closed
/// within the wait (rustls may send an alert first).
fn plain_client_is_closed(addr: SocketAddr, first: &[u8]) {
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(WAIT)).unwrap();
    t.write_all(first).unwrap();
    let mut buf = [0u8; 256];
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match t.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(std::time::Instant::now() < deadline, "closed"),
        }
    }
}

#[test]
fn rely_and_the_admin_api_over_tls() {
    let (s, ca) = server("rely");
    // RELY: log in, send to self, get it back, through TLS.
    let mut t = tls_client(s.addr, &ca);
    t.write_all(&crate::support::login_frame("tlsuser"))
        .unwrap();
    wait_until(
        || s.handle.owner_core(b"tlsuser").is_some(),
        "login over TLS",
    );
    let f = crate::support::transfer_frame("tlsuser", "tlsuser", b"secret payload");
    t.write_all(&f).unwrap();
    let mut back = vec![0u8; f.len()];
    t.read_exact(&mut back).unwrap();
    assert_eq!(back, f, "the transfer frame, byte for byte");
    // https admin API.
    let mut a = tls_client(s.handle.admin_addrs()[0], &ca);
    a.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = a.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[test]
fn plain_clients_on_a_tls_port_are_closed_and_counted() {
    let (s, _) = server("plain");
    plain_client_is_closed(
        s.handle.ws_addrs()[0],
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    wait_until(|| s.handle.metrics().tls_errors >= 1, "counted");
    // The server goes on serving TLS clients.
    assert_eq!(s.handle.metrics().connections, 0);
}

#[test]
fn wss_echo_with_pythons_websockets_over_ssl() {
    let (s, ca) = server("wss");
    let python = crate::support::venv_python(
        "wsproxy-venv",
        &["websockets==15.0.1", "redis==5.2.1"],
        "import websockets, redis; assert websockets.__version__ == '15.0.1'",
    )
    .expect("a Python venv with websockets");
    let url = format!("wss://127.0.0.1:{}/echo", s.handle.ws_addrs()[0].port());
    let script = format!(
        "import asyncio, ssl, websockets
async def main():
    ctx = ssl.create_default_context(cafile={ca:?})
    async with websockets.connect({url:?}, ssl=ctx, open_timeout=5) as ws:
        await ws.send('hello over tls')
        print(await asyncio.wait_for(ws.recv(), 5))
asyncio.run(main())
",
        ca = ca.display().to_string(),
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello over tls"
    );
}

#[test]
fn tls_files_that_cannot_serve_are_refused_naming_the_key() {
    let (c, _) = cert("bad");
    let e = Config::from_yaml(
        &format!("websocket:\n  tls:\n    cert: \"{}\"\n    key: /nonexistent/key.pem\n  endpoints: [{{path: /e}}]\n", c.display()),
        None,
    )
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("websocket.tls.key"), "{e}");
    assert_eq!(e.line, Some(4), "{e}");
    let e = Config::from_yaml(
        &format!("rely:\n  tls: {{cert: \"{}\"}}\n", c.display()),
        None,
    )
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("rely.tls.key"), "{e}");
}

/// A Veltix listener with `tls:`: the v3 handshake and an echo through
/// TLS, framed exactly as on a plain listener; a plain client is closed.
#[test]
fn veltix_over_tls() {
    use corerelay::protocol::veltix::v3;
    let (c, k) = cert("veltix");
    let yaml = format!(
        "workers: 2\npin: false\nrely: {{listen: []}}\nveltix:\n  - listen: \"127.0.0.1:0\"\n    on_message: echo\n    tls: {{cert: \"{}\", key: \"{}\"}}\n",
        c.display(),
        k.display()
    );
    let server = Server::start(Config::from_yaml(&yaml, None).expect("config")).expect("starts");
    let addr = server.veltix_addrs()[0];
    let mut t = tls_client(addr, &c);
    // The server's hello, ours, its acceptance: length-prefixed JSON.
    let read_msg = |t: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>| {
        let mut len = [0u8; 2];
        t.read_exact(&mut len).unwrap();
        let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
        t.read_exact(&mut m).unwrap();
        m
    };
    assert!(v3::compatible(&read_msg(&mut t)), "the server's hello");
    let mut out = Vec::new();
    v3::encode_handshake(&mut out, &v3::hello());
    t.write_all(&out).unwrap();
    assert_eq!(read_msg(&mut t), v3::ACCEPTED);
    let mut frame = Vec::new();
    v3::encode(&mut frame, 0, 200, 7, b"over tls");
    t.write_all(&frame).unwrap();
    let mut back = vec![0u8; frame.len()];
    t.read_exact(&mut back).unwrap();
    match v3::parse(&back, 1 << 20) {
        v3::Parse::Frame(f, _) => {
            assert_eq!((f.ty, f.request_id, f.content), (200, 7, &b"over tls"[..]))
        }
        other => panic!("{other:?}"),
    }
    // A client speaking plain Veltix gets closed and counted.
    plain_client_is_closed(addr, &out);
    wait_until(|| server.metrics().tls_errors >= 1, "counted");
}

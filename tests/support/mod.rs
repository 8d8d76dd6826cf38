//! Test helpers: an in-process server that stops on drop, raw TCP clients,
//! bounded waits.

#![allow(dead_code)]

pub mod rabbitmq;
pub mod redis;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use corerelay::client::rely::RelyClient;
use corerelay::config::Config;
use corerelay::{Server, ServerHandle};

/// Logs to the test output when RUST_LOG is set (e.g. RUST_LOG=debug).
pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Generous bound for anything that should happen "at once".
pub const WAIT: Duration = Duration::from_secs(5);

/// An in-process server on 127.0.0.1:0; dropping it shuts it down.
pub struct TestServer {
    pub handle: ServerHandle,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Defaults with RELY on 127.0.0.1:0, `workers` cores, not pinned.
    pub fn start(workers: usize) -> TestServer {
        Self::with(workers, |_| {})
    }

    /// Like `start`, with the config adjusted by `f`.
    pub fn with(workers: usize, f: impl FnOnce(&mut Config)) -> TestServer {
        let mut cfg = Config::defaults();
        cfg.workers = workers;
        cfg.pin = false;
        cfg.rely.listen = vec!["127.0.0.1:0".parse().unwrap()];
        if let Some(a) = cfg.admin.as_mut() {
            a.listen = vec!["127.0.0.1:0".parse().unwrap()];
        }
        f(&mut cfg);
        let handle = Server::start(cfg).expect("server starts");
        let addr = handle.rely_addrs()[0];
        TestServer { handle, addr }
    }

    /// A logged-in client whose login the server has registered.
    pub fn login(&self, id: &str) -> RelyClient {
        let c = RelyClient::connect(self.addr, id.as_bytes()).expect("connect");
        let me = c.local_addr().unwrap();
        wait_until(|| self.registered_as(id, me), "login registered");
        c
    }

    /// A client logged in as `id` on a core other than `avoid`, found by
    /// reconnecting (the kernel picks the core from the source port). Bounded.
    pub fn login_not_on(&self, id: &str, avoid: usize) -> RelyClient {
        for _ in 0..200 {
            let c = self.login(id);
            if self.handle.owner_core(id.as_bytes()) != Some(avoid) {
                return c;
            }
            drop(c);
            wait_until(
                || self.handle.owner_core(id.as_bytes()) != Some(avoid),
                "old login gone",
            );
        }
        panic!("could not land {id} on a core other than {avoid}");
    }

    fn registered_as(&self, id: &str, _me: SocketAddr) -> bool {
        // The directory records the newest login of an id; tests log in each
        // id from one place at a time, so presence is enough.
        self.handle.owner_core(id.as_bytes()).is_some()
    }

    /// Which core owns `id`.
    pub fn core_of(&self, id: &str) -> usize {
        self.handle.owner_core(id.as_bytes()).expect("id logged in")
    }
}

/// Polls `f` until true, at most `WAIT`; panics with `what` otherwise.
pub fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A raw TCP connection for byte-exact checks and malformed input.
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        Raw(s)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("write");
    }

    /// Reads exactly `n` bytes within `WAIT`.
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut v = vec![0; n];
        self.0.read_exact(&mut v).expect("read");
        v
    }

    /// True if the server closes the connection within `WAIT` (EOF or
    /// reset), without sending anything first.
    pub fn closed(&mut self) -> bool {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// True if nothing arrives within `d` and the connection stays open.
    pub fn quiet_for(&mut self, d: Duration) -> bool {
        self.0.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

pub fn login_frame(id: &str) -> Vec<u8> {
    let mut v = Vec::new();
    corerelay::protocol::rely::encode_login(&mut v, id.as_bytes());
    v
}

pub fn transfer_frame(from: &str, to: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    corerelay::protocol::rely::encode_transfer(&mut v, from.as_bytes(), to.as_bytes(), payload);
    v
}

/// A raw WebSocket client: our own masked frames, byte-exact reads, so tests
/// can send what no well-behaved library would.
pub struct WsRaw(pub TcpStream);

/// A server frame as read.
#[derive(Debug, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    /// RSV1: a permessage-deflate compressed message.
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl WsFrame {
    /// Close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

impl WsRaw {
    /// The upgrade request for `path`.
    pub fn request(path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    }

    /// Connects and upgrades; panics unless the answer is 101.
    pub fn connect(addr: SocketAddr, path: &str) -> WsRaw {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        s.write_all(Self::request(path).as_bytes()).unwrap();
        let head = read_http_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "{head}"
        );
        WsRaw(s)
    }

    /// A masked client frame.
    pub fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![opcode | if fin { 0x80 } else { 0 }];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len <= 0xffff {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    pub fn send(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        self.0
            .write_all(&Self::frame(opcode, fin, payload))
            .expect("write");
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("write");
    }

    /// Reads one server frame within `WAIT`; None on EOF.
    pub fn read(&mut self) -> Option<WsFrame> {
        self.read_within(WAIT).expect("frame within the wait")
    }

    /// Reads one frame; Err(()) if nothing arrives within `d`. Only the
    /// first byte waits at most `d`: once a frame has begun, the rest gets
    /// `WAIT`, so a timeout never leaves the stream mid-frame.
    pub fn read_within(&mut self, d: Duration) -> Result<Option<WsFrame>, ()> {
        self.0.set_read_timeout(Some(d)).unwrap();
        let mut h = [0u8; 2];
        loop {
            match self.0.read(&mut h[..1]) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(())
                }
                Err(_) => return Ok(None),
            }
        }
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        if self.0.read_exact(&mut h[1..]).is_err() {
            return Ok(None);
        }
        assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut b = [0u8; 2];
            self.0.read_exact(&mut b).unwrap();
            len = u16::from_be_bytes(b) as usize;
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.0.read_exact(&mut b).unwrap();
            len = u64::from_be_bytes(b) as usize;
        }
        let mut payload = vec![0; len];
        self.0.read_exact(&mut payload).unwrap();
        Ok(Some(WsFrame {
            fin: h[0] & 0x80 != 0,
            rsv1: h[0] & 0x40 != 0,
            opcode: h[0] & 0x0f,
            payload,
        }))
    }

    /// Reads frames until a close frame; returns its code. Panics on EOF
    /// without one.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            let f = self.read().expect("a close frame before EOF");
            if f.opcode == 0x8 {
                return f.close_code().unwrap_or(1005);
            }
        }
    }

    /// True if the server closes the TCP connection within `WAIT`.
    pub fn eof(&mut self) -> bool {
        Raw(self.0.try_clone().unwrap()).closed()
    }
}

/// Reads an HTTP response head (to the blank line) within `WAIT`.
pub fn read_http_head(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
        assert!(head.len() < 16 * 1024, "response head too long");
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A server with a WebSocket listener and the given endpoints (YAML list).
pub fn ws_server(
    workers: usize,
    ws_yaml: &str,
    f: impl FnOnce(&mut Config),
) -> (TestServer, SocketAddr) {
    let yaml = format!("websocket:\n  listen: [\"127.0.0.1:0\"]\n{ws_yaml}");
    let mut cfg = Config::from_yaml(&yaml, None).expect("test config");
    cfg.workers = workers;
    cfg.pin = false;
    cfg.rely.listen = vec!["127.0.0.1:0".parse().unwrap()];
    if let Some(a) = cfg.admin.as_mut() {
        a.listen = vec!["127.0.0.1:0".parse().unwrap()];
    }
    f(&mut cfg);
    let handle = Server::start(cfg).expect("server starts");
    let addr = handle.rely_addrs()[0];
    let ws = handle.ws_addrs()[0];
    (TestServer { handle, addr }, ws)
}

/// An HTTP response as a test reads it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response (head, then a Content-Length body) within `WAIT`.
pub fn read_response(s: &mut TcpStream) -> HttpResponse {
    let head = read_http_head(s);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).expect("response body");
    HttpResponse { status, head, body }
}

/// One request on a fresh connection (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // The server may answer (413) before taking the whole body.
    let _ = s.write_all(body);
    read_response(&mut s)
}

/// `target/<name>/bin/python` of a venv holding `packages` (pip
/// requirement strings), built once; `check` is Python code that succeeds
/// only when they import at the right versions. `.ci/run` builds them
/// ahead; a test that finds none builds it (PyPI is reachable).
pub fn venv_python(
    name: &str,
    packages: &[&str],
    check: &str,
) -> Result<std::path::PathBuf, String> {
    use std::process::Command;
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    let python = venv.join("bin/python");
    let ready = |p: &std::path::Path| {
        Command::new(p)
            .args(["-c", check])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr)))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages))?;
    if ready(&python) {
        Ok(python)
    } else {
        Err(format!("{packages:?} did not import after installing"))
    }
}

/// A child process killed (and reaped) when the test ends, whatever happens.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A WebSocket client upgraded on `path` that never reads, with a tiny
/// receive buffer: a slow consumer the server sees at once.
pub fn never_reading_ws(addr: SocketAddr, path: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut slow: TcpStream = sock.into();
    slow.write_all(WsRaw::request(path).as_bytes()).unwrap();
    assert!(read_http_head(&mut slow).starts_with("HTTP/1.1 101"));
    slow
}

/// A self-signed certificate for 127.0.0.1 and localhost (its own CA),
/// written into `dir` as cert.pem and key.pem: the key pair and the two
/// paths.
pub fn test_cert(
    dir: &std::path::Path,
) -> (
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, ck.cert.pem()).unwrap();
    std::fs::write(&k, ck.signing_key.serialize_pem()).unwrap();
    (ck, c, k)
}

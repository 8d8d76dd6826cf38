//! A blocking Veltix client (v1 or v3), with the callback API Veltix's
//! README shows: `on_connect`, `on_recv`, `on_disconnect`, and `send`,
//! `send_and_wait` (v3, matched by request id), `ping` (v3, returns the
//! round trip). A reader thread decodes frames, answers the server's
//! pings, completes waiters and calls `on_recv` for the rest; callbacks
//! run on that thread, so a slow callback delays later messages.
//!
//! ```no_run
//! use corerelay::client::veltix::{Builder, Version};
//! let client = Builder::new("127.0.0.1:8080", Version::V3)
//!     .on_recv(|m| println!("type {} from the hub: {:?}", m.ty, m.content))
//!     .connect()
//!     .expect("connect");
//! client.send(200, b"hello").expect("send");
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::protocol::veltix::Version;
use crate::protocol::veltix::{v1, v3};

/// A message received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Type code (200 and up for applications).
    pub ty: u16,
    /// The content.
    pub content: Vec<u8>,
    /// v3: the request id it carries (0 for v1).
    pub request_id: u16,
    /// v3: flags; v1: 0.
    pub flags: u8,
    /// v1: the sender's timestamp (Unix ms); v3: 0.
    pub timestamp_ms: u64,
}

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// A socket error, or the server closed.
    Io(io::Error),
    /// The server is full (v3's `server_full`).
    ServerFull,
    /// The handshake was refused or malformed.
    Handshake(String),
    /// Not in this protocol version (v1 has no request ids or pings).
    Unsupported(&'static str),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::ServerFull => write!(f, "server full"),
            ClientError::Handshake(m) => write!(f, "handshake failed: {m}"),
            ClientError::Unsupported(what) => write!(f, "{what} needs Veltix v3"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

type OnRecv = Box<dyn FnMut(Message) + Send>;
type OnEvent = Box<dyn FnMut() + Send>;
type Pending = Arc<Mutex<HashMap<u16, mpsc::Sender<Message>>>>;

/// Configures and connects a [`Client`].
pub struct Builder {
    addr: String,
    version: Version,
    on_recv: Option<OnRecv>,
    on_connect: Option<OnEvent>,
    on_disconnect: Option<OnEvent>,
    handshake_timeout: Duration,
    max_message: usize,
}

impl Builder {
    /// A client of `addr` speaking `version`.
    pub fn new(addr: impl Into<String>, version: Version) -> Builder {
        Builder {
            addr: addr.into(),
            version,
            on_recv: None,
            on_connect: None,
            on_disconnect: None,
            handshake_timeout: Duration::from_secs(5),
            max_message: v3::DEFAULT_MAX_MESSAGE,
        }
    }

    /// Called for every message that no `send_and_wait` is waiting for.
    pub fn on_recv(mut self, f: impl FnMut(Message) + Send + 'static) -> Builder {
        self.on_recv = Some(Box::new(f));
        self
    }

    /// Called once connected (after the handshake).
    pub fn on_connect(mut self, f: impl FnMut() + Send + 'static) -> Builder {
        self.on_connect = Some(Box::new(f));
        self
    }

    /// Called when the connection ends.
    pub fn on_disconnect(mut self, f: impl FnMut() + Send + 'static) -> Builder {
        self.on_disconnect = Some(Box::new(f));
        self
    }

    /// Connects (and, for v3, completes the handshake).
    pub fn connect(self) -> Result<Client, ClientError> {
        let addr = self
            .addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut leftover = Vec::new();
        if self.version == Version::V3 {
            leftover = handshake(&mut stream, self.handshake_timeout)?;
        }
        stream.set_read_timeout(None)?;
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        let pending: Pending = Arc::default();
        let Builder {
            version,
            on_recv,
            mut on_connect,
            on_disconnect,
            max_message,
            ..
        } = self;
        if let Some(f) = on_connect.as_mut() {
            f();
        }
        let reader = Reader {
            stream,
            version,
            writer: writer.clone(),
            pending: pending.clone(),
            on_recv,
            on_disconnect,
            max_message,
        };
        let thread = std::thread::Builder::new()
            .name("veltix-client".into())
            .spawn(move || reader.run(leftover))?;
        Ok(Client {
            writer,
            pending,
            version,
            next_id: AtomicU16::new(0),
            reader: Some(thread),
        })
    }
}

/// The v3 handshake: the server's hello (or `server_full`), ours, its
/// acceptance. Returns bytes read past the handshake (frames).
fn handshake(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, ClientError> {
    stream.set_read_timeout(Some(timeout))?;
    let mut dec = v3::HandshakeDecoder::default();
    let mut buf = [0u8; 4096];
    let mut leftover = Vec::new();
    let mut read_message = |stream: &mut TcpStream, leftover: &mut Vec<u8>| {
        // Bounded: the deadline per read, and the 30 KiB message cap.
        loop {
            if !leftover.is_empty() {
                let input = std::mem::take(leftover);
                match dec.feed(&input) {
                    Ok(Some((m, used))) => {
                        *leftover = input[used..].to_vec();
                        return Ok(m);
                    }
                    Ok(None) => {}
                    Err(_) => return Err(ClientError::Handshake("message too large".into())),
                }
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(ClientError::Handshake("closed by the server".into()));
            }
            leftover.extend_from_slice(&buf[..n]);
        }
    };
    let hello = read_message(stream, &mut leftover)?;
    let value: serde_json::Value = serde_json::from_slice(&hello)
        .map_err(|e| ClientError::Handshake(format!("server hello: {e}")))?;
    if value.get("error").and_then(|e| e.as_str()) == Some("server_full") {
        return Err(ClientError::ServerFull);
    }
    if !v3::compatible(&hello) {
        return Err(ClientError::Handshake(
            "incompatible protocol version".into(),
        ));
    }
    let mut mine = Vec::new();
    v3::encode_handshake(&mut mine, &v3::hello());
    stream.write_all(&mine)?;
    let ack = read_message(stream, &mut leftover)?;
    let ok = serde_json::from_slice::<serde_json::Value>(&ack)
        .ok()
        .and_then(|v| v.get("result").and_then(|r| r.as_str()).map(|r| r == "ok"));
    if ok != Some(true) {
        return Err(ClientError::Handshake(String::from_utf8_lossy(&ack).into()));
    }
    Ok(leftover)
}

struct Reader {
    stream: TcpStream,
    version: Version,
    writer: Arc<Mutex<TcpStream>>,
    pending: Pending,
    on_recv: Option<OnRecv>,
    on_disconnect: Option<OnEvent>,
    max_message: usize,
}

impl Reader {
    fn run(mut self, leftover: Vec<u8>) {
        let mut v3dec = v3::Decoder::default();
        let mut v1dec = v1::Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut input = leftover;
        loop {
            let mut got = Vec::new();
            match self.version {
                Version::V3 => v3dec.feed(&input, self.max_message, |e| {
                    if let v3::Event::Frame(f) = e {
                        got.push(Message {
                            ty: f.ty,
                            content: f.content.to_vec(),
                            request_id: f.request_id,
                            flags: f.flags,
                            timestamp_ms: 0,
                        });
                    }
                    true
                }),
                Version::V1 => {
                    let r = v1dec.feed(&input, self.max_message, |e| {
                        if let v1::Event::Frame(f) = e {
                            got.push(Message {
                                ty: f.ty,
                                content: f.content.to_vec(),
                                request_id: 0,
                                flags: 0,
                                timestamp_ms: f.timestamp_ms,
                            });
                        }
                        true
                    });
                    if r.is_err() {
                        break;
                    }
                }
            }
            for m in got {
                self.dispatch(m);
            }
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => input = buf[..n].to_vec(),
            }
        }
        self.pending.lock().map(|mut p| p.clear()).ok();
        if let Some(f) = self.on_disconnect.as_mut() {
            f();
        }
    }

    /// Veltix's order: a ping is answered, a waiter gets its reply, the rest
    /// goes to `on_recv`.
    fn dispatch(&mut self, m: Message) {
        if self.version == Version::V3 && m.ty == v3::PING {
            let pong = v3::header(0, v3::PONG, m.request_id, b"");
            if let Ok(mut w) = self.writer.lock() {
                let _ = w.write_all(&pong);
            }
            return;
        }
        let waiter = match self.pending.lock() {
            Ok(mut p) if self.version == Version::V3 => p.remove(&m.request_id),
            _ => None,
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(m);
            }
            None => {
                if let Some(f) = self.on_recv.as_mut() {
                    f(m);
                }
            }
        }
    }
}

/// A connected client. Dropping it closes the connection.
pub struct Client {
    writer: Arc<Mutex<TcpStream>>,
    pending: Pending,
    version: Version,
    next_id: AtomicU16,
    reader: Option<JoinHandle<()>>,
}

impl Client {
    /// Client-range request ids: 0 to 32767, as Veltix clients allocate.
    fn id(&self) -> u16 {
        self.next_id.fetch_add(1, Ordering::Relaxed) % v3::SERVER_IDS
    }

    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| io::Error::other("writer poisoned"))?;
        w.write_all(bytes)
    }

    fn frame(&self, ty: u16, content: &[u8], id: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(content.len() + v1::HEADER);
        match self.version {
            Version::V3 => v3::encode(&mut f, 0, ty, id, content),
            Version::V1 => v1::encode(&mut f, ty, content, crate::engine::message::unix_ms()),
        }
        f
    }

    /// Sends a message; returns its request id (v3; 0 for v1).
    pub fn send(&self, ty: u16, content: &[u8]) -> Result<u16, ClientError> {
        let id = match self.version {
            Version::V3 => self.id(),
            Version::V1 => 0,
        };
        self.write(&self.frame(ty, content, id))?;
        Ok(id)
    }

    /// Sends a message and waits for the reply carrying its request id
    /// (v3). `Ok(None)`: none within `timeout`.
    pub fn send_and_wait(
        &self,
        ty: u16,
        content: &[u8],
        timeout: Duration,
    ) -> Result<Option<Message>, ClientError> {
        if self.version != Version::V3 {
            return Err(ClientError::Unsupported("send_and_wait"));
        }
        let id = self.id();
        let (tx, rx) = mpsc::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        self.write(&self.frame(ty, content, id))?;
        let r = rx.recv_timeout(timeout).ok();
        if r.is_none() {
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
        }
        Ok(r)
    }

    /// Pings the server and returns the round trip (v3). `Ok(None)`: no
    /// pong within `timeout`.
    pub fn ping(&self, timeout: Duration) -> Result<Option<Duration>, ClientError> {
        let start = Instant::now();
        Ok(self
            .send_and_wait(v3::PING, b"", timeout)?
            .filter(|m| m.ty == v3::PONG)
            .map(|_| start.elapsed()))
    }

    /// Closes the connection and waits for the reader (which calls
    /// `on_disconnect`).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

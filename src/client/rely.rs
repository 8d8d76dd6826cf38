//! A blocking RELY client: login, send, heartbeat, receive with a timeout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::protocol::rely::{self, Decoder, Frame};

/// A frame received from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// FromClientID.
    pub from: Vec<u8>,
    /// ToClientID (our id).
    pub to: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Receiving half (also used whole by [`RelyClient`]).
#[derive(Debug)]
pub struct RelyReader {
    stream: TcpStream,
    decoder: Decoder,
    inbox: VecDeque<Received>,
    buf: Box<[u8]>,
    max_payload: u32,
}

impl RelyReader {
    fn new(stream: TcpStream) -> Self {
        RelyReader {
            stream,
            decoder: Decoder::new(),
            inbox: VecDeque::new(),
            buf: vec![0; 64 * 1024].into_boxed_slice(),
            max_payload: u32::MAX,
        }
    }

    /// Waits up to `timeout` (None: forever) for the next frame. `Ok(None)`
    /// means the timeout passed; `UnexpectedEof` means the relay closed.
    pub fn recv(&mut self, timeout: Option<Duration>) -> io::Result<Option<Received>> {
        if let Some(r) = self.inbox.pop_front() {
            return Ok(Some(r));
        }
        self.stream.set_read_timeout(timeout)?;
        loop {
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let inbox = &mut self.inbox;
            self.decoder
                .feed(&self.buf[..n], self.max_payload, |f| {
                    if let Frame::Transfer {
                        from, to, payload, ..
                    } = f
                    {
                        inbox.push_back(Received {
                            from: from.to_vec(),
                            to: to.to_vec(),
                            payload: payload.to_vec(),
                        });
                    }
                    true
                })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some(r) = self.inbox.pop_front() {
                return Ok(Some(r));
            }
        }
    }

    /// True once the relay has closed the connection (waits up to `timeout`).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.recv(Some(left)) {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }
}

/// Sending half.
#[derive(Debug)]
pub struct RelyWriter {
    stream: TcpStream,
    id: Vec<u8>,
    buf: Vec<u8>,
}

impl RelyWriter {
    /// Sends `payload` to `to`.
    pub fn send(&mut self, to: &[u8], payload: &[u8]) -> io::Result<()> {
        self.buf.clear();
        rely::encode_transfer(&mut self.buf, &self.id, to, payload);
        self.stream.write_all(&self.buf)
    }

    /// Sends a heartbeat (ToClientIDLen 0).
    pub fn heartbeat(&mut self) -> io::Result<()> {
        self.send(b"", b"")
    }

    /// Writes raw bytes (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Our id.
    pub fn id(&self) -> &[u8] {
        &self.id
    }
}

/// A logged-in client.
#[derive(Debug)]
pub struct RelyClient {
    /// Receiving half.
    pub reader: RelyReader,
    /// Sending half.
    pub writer: RelyWriter,
}

impl RelyClient {
    /// Connects and logs in as `id` (1..=255 bytes).
    pub fn connect<A: ToSocketAddrs>(addr: A, id: &[u8]) -> io::Result<Self> {
        if id.is_empty() || id.len() > 255 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "client id must be 1..=255 bytes",
            ));
        }
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut buf = Vec::new();
        rely::encode_login(&mut buf, id);
        (&stream).write_all(&buf)?;
        let writer = RelyWriter {
            stream: stream.try_clone()?,
            id: id.to_vec(),
            buf,
        };
        Ok(RelyClient {
            reader: RelyReader::new(stream),
            writer,
        })
    }

    /// Sends `payload` to `to`.
    pub fn send(&mut self, to: &[u8], payload: &[u8]) -> io::Result<()> {
        self.writer.send(to, payload)
    }

    /// Receives the next frame (see [`RelyReader::recv`]).
    pub fn recv(&mut self, timeout: Option<Duration>) -> io::Result<Option<Received>> {
        self.reader.recv(timeout)
    }

    /// Local address of the socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.stream.local_addr()
    }

    /// Splits into halves for a reader thread and a writer.
    pub fn split(self) -> (RelyReader, RelyWriter) {
        (self.reader, self.writer)
    }
}

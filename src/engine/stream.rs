//! A connection's socket: TCP (RELY, WebSocket, admin, upstream) or a Unix
//! stream (per-source local clients). One type so the engine's read, flush
//! and close paths do not care which.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

/// The socket.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
    /// A TLS client connection (wss:// sources).
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Shuts down one or both halves.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => s.tcp.shutdown(how),
        }
    }

    /// TCP_NODELAY (a no-op for Unix streams).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(on),
            Stream::Unix(_) => Ok(()),
            Stream::Tls(s) => s.tcp.set_nodelay(on),
        }
    }

    /// Is a non-blocking connect complete? (A peer address appears then;
    /// a Unix stream is always connected.)
    pub fn connected(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.peer_addr().is_ok(),
            Stream::Unix(_) => true,
            Stream::Tls(s) => s.tcp.peer_addr().is_ok(),
        }
    }

    /// A pending socket error (after a non-blocking connect).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Stream::Tcp(s) => s.take_error(),
            Stream::Unix(s) => s.take_error(),
            Stream::Tls(s) => s.tcp.take_error(),
        }
    }
}

/// What one read left behind in the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// More may be waiting: read again (within the fairness budget).
    More,
    /// Nothing more for now; the next arrival raises a new edge.
    Drained,
    /// The peer closed its side; nothing will follow these bytes.
    Closed,
}

impl Stream {
    /// Reads into `buf` and says whether the socket may hold more, so the
    /// caller never mistakes a short read for a drained socket. For plain
    /// sockets a short read drains the kernel buffer; a TLS stream yields at
    /// most one record's plaintext per read, so it is drained only when the
    /// socket says `WouldBlock`. (sozu's `socket_read` returns the same pair.)
    pub fn read_some(&mut self, buf: &mut [u8]) -> io::Result<(usize, Drain)> {
        let r = match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => {
                return match s.read(buf) {
                    Ok(0) => Ok((0, Drain::Closed)),
                    Ok(n) => Ok((n, Drain::More)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((0, Drain::Drained)),
                    Err(e) => Err(e),
                }
            }
        };
        match r {
            Ok(0) => Ok((0, Drain::Closed)),
            Ok(n) if n < buf.len() => Ok((n, Drain::Drained)),
            Ok(n) => Ok((n, Drain::More)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((0, Drain::Drained)),
            Err(e) => Err(e),
        }
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            // rustls takes one buffer at a time; the outbox calls again.
            Stream::Tls(s) => s.write(
                bufs.iter()
                    .find(|b| !b.is_empty())
                    .map_or(&[][..], |b| &b[..]),
            ),
        }
    }
    /// Writes what TLS still holds (a no-op for plain sockets).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush_tls(),
            _ => Ok(()),
        }
    }
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.register(r, t, i),
            Stream::Unix(s) => s.register(r, t, i),
            Stream::Tls(s) => s.tcp.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.reregister(r, t, i),
            Stream::Unix(s) => s.reregister(r, t, i),
            Stream::Tls(s) => s.tcp.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.deregister(r),
            Stream::Unix(s) => s.deregister(r),
            Stream::Tls(s) => s.tcp.deregister(r),
        }
    }
}

/// A TLS connection over a non-blocking TCP socket: a client (wss://
/// sources) or a server (listeners with `tls:`). rustls is sans-io:
/// records are read from and written to the socket here, so the engine's
/// read and flush paths stay the same (a server's handshake replies go out
/// from the read that took the client's hello).
#[derive(Debug)]
pub struct TlsStream {
    /// The socket.
    pub tcp: TcpStream,
    /// The TLS state.
    pub tls: rustls::Connection,
}

impl TlsStream {
    /// Writes pending TLS records (handshake, encrypted data) to the
    /// socket; `WouldBlock` if the socket is full.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.tcp)?;
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Bounded: each turn either returns or consumes socket bytes until
        // the socket would block.
        loop {
            match self.tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if self.tls.read_tls(&mut self.tcp)? == 0 {
                return Ok(0);
            }
            self.tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Handshake replies and data buffered before the handshake ended.
            match self.flush_tls() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Take no more plaintext while encrypted bytes wait for the socket.
        self.flush_tls()?;
        let n = self.tls.writer().write(buf)?;
        match self.flush_tls() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_tls()
    }
}

//! SO_REUSEPORT listener groups: one socket per core on the same address, so
//! the kernel spreads accepted connections over the cores.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};

fn new_socket(addr: SocketAddr, reuseport: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR lets a restart bind while old connections sit in TIME_WAIT.
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Binds `count` listeners on `addr` with SO_REUSEPORT and returns them with
/// the address actually bound (port 0 resolves to one port for all).
///
/// SO_REUSEPORT would let a second corerelay (same user) silently share the
/// port with a running one; a probe bind without it fails with EADDRINUSE in
/// that case, so the port is checked free first.
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> io::Result<(SocketAddr, Vec<TcpListener>)> {
    if addr.port() != 0 {
        let probe = new_socket(addr, false)?;
        probe.bind(&addr.into())?;
        drop(probe);
    }
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let s = new_socket(bound, true)?;
        s.bind(&bound.into())?;
        s.listen(backlog)?;
        if bound.port() == 0 {
            bound = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no inet address"))?;
        }
        out.push(s.into());
    }
    Ok((bound, out))
}

/// A listening socket: TCP (one per core, SO_REUSEPORT) or Unix (one owner
/// core).
#[derive(Debug)]
pub enum ListenSock {
    /// TCP.
    Tcp(mio::net::TcpListener),
    /// Unix stream, with its path.
    Unix(mio::net::UnixListener),
}

impl ListenSock {
    /// Accepts one connection (non-blocking); Unix peers get the unspecified
    /// address.
    pub fn accept(&self) -> io::Result<(super::stream::Stream, SocketAddr)> {
        match self {
            ListenSock::Tcp(l) => l.accept().map(|(s, a)| (super::stream::Stream::Tcp(s), a)),
            ListenSock::Unix(l) => l.accept().map(|(s, _)| {
                (
                    super::stream::Stream::Unix(s),
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                )
            }),
        }
    }
}

impl mio::event::Source for ListenSock {
    fn register(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.register(r, t, i),
            ListenSock::Unix(l) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &mio::Registry, t: mio::Token, i: mio::Interest) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.reregister(r, t, i),
            ListenSock::Unix(l) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.deregister(r),
            ListenSock::Unix(l) => l.deregister(r),
        }
    }
}

/// Binds a Unix stream listener at `path`. A stale socket file (nobody
/// answers on it) is replaced; a live one (another process answers) is an
/// error, so a second instance never steals a running one's socket.
pub fn bind_unix(
    path: &std::path::Path,
    mode: u32,
) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "path exists and is not a socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "a live process answers on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// What a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// RELY clients.
    Rely,
    /// WebSocket clients (HTTP upgrade first).
    WebSocket,
    /// The admin HTTP API.
    Admin,
    /// WebSocket clients of upstream source `n`.
    SourceWs(u16),
    /// Unix clients of upstream source `n` (owner core only).
    SourceUnix(u16),
    /// Clients of Veltix listener `n`.
    Veltix(u16),
}

/// A core's listener and its edge-triggered state.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub sock: ListenSock,
    /// What it accepts.
    pub kind: ListenerKind,
    /// Bound address.
    pub addr: SocketAddr,
    /// Its poll token.
    pub token: usize,
    /// Readiness seen and not yet drained to WouldBlock.
    pub pending: bool,
    /// After EMFILE and friends: do not accept before this instant.
    pub paused_until: Option<Instant>,
    /// When an accept failure was last logged.
    pub warned: Option<Instant>,
    /// Accept failures since then.
    pub failures_unlogged: u64,
}

impl Listener {
    /// Registers `sock` on `poll` under `token` (edge-triggered reads).
    pub(crate) fn register(
        poll: &mio::Poll,
        token: usize,
        kind: ListenerKind,
        mut sock: ListenSock,
    ) -> io::Result<Listener> {
        let addr = match &sock {
            ListenSock::Tcp(l) => l.local_addr()?,
            ListenSock::Unix(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        poll.registry()
            .register(&mut sock, mio::Token(token), mio::Interest::READABLE)?;
        Ok(Listener {
            sock,
            kind,
            addr,
            token,
            pending: true,
            paused_until: None,
            warned: None,
            failures_unlogged: 0,
        })
    }

    /// Accepts up to `batch` connections into `out` (edge-triggered: until
    /// `WouldBlock`, or the batch, whichever first). An accept failure
    /// (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses the listener for `pause`
    /// rather than spinning on it, and is returned for counting.
    pub(crate) fn accept_batch(
        &mut self,
        batch: usize,
        now: Instant,
        pause: std::time::Duration,
        out: &mut Vec<(super::stream::Stream, SocketAddr)>,
    ) -> Option<io::Error> {
        if !self.pending || self.paused_until.is_some_and(|t| t > now) {
            return None;
        }
        self.paused_until = None;
        let mut accepted = 0;
        while accepted < batch {
            match self.sock.accept() {
                Ok(c) => {
                    accepted += 1;
                    out.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.pending = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    self.paused_until = Some(now + pause);
                    return Some(e);
                }
            }
        }
        None
    }
}

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

/// What a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// RELY clients.
    Rely,
    /// WebSocket clients (HTTP upgrade first).
    WebSocket,
    /// The admin HTTP API.
    Admin,
}

/// A core's listener and its edge-triggered state.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub sock: mio::net::TcpListener,
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
}

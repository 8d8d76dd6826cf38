//! [`Upstreams`]: the owner-core runtime of upstream sources (a source is
//! owned by core `index % workers`). It decides when to dial (capped
//! exponential backoff with jitter from `reconnect_delay`, up to
//! `reconnect_max_attempts`), resolves host names on a helper thread that
//! wakes the core (the only non-core thread), opens the non-blocking TCP or
//! TLS stream, and counts what is dropped while a source is down. It never
//! touches a connection: the core registers what it dials and tells it
//! when a connection closes. The live connection's protocol is the
//! upstream stage (`adapter::upstream`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::metrics::{SourceStatus, SourceTable};
use super::shared::Shared;
use super::stream::{Stream, TlsStream};
use super::ConnId;
use crate::config::{Config, SourceConfig};

/// An upstream connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// A source that is down warns about dropped client messages at most this
/// often.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
enum State {
    /// Waiting to (re)connect.
    Idle { retry_at: Instant },
    /// A helper thread resolves the host name.
    Resolving(Receiver<io::Result<Vec<SocketAddr>>>),
    /// A connection exists (connecting, upgrading or open).
    Connected(ConnId),
    /// reconnect_max_attempts reached.
    Failed,
}

#[derive(Debug)]
struct Owned {
    source: u16,
    state: State,
    attempts: u32,
    opened_at: Option<Instant>,
    warned: Option<Instant>,
}

/// A connection to open for a source.
#[derive(Debug)]
pub(crate) struct Dial {
    pub source: u16,
    pub addr: SocketAddr,
    pub stream: Stream,
}

/// The sources one core owns.
#[derive(Debug)]
pub(crate) struct Upstreams {
    core: usize,
    owned: Vec<Owned>,
    /// The core's configuration and source table (replaced on reload).
    cfg: Arc<Config>,
    table: SourceTable,
}

impl Upstreams {
    /// The sources of `cfg` that core `core` owns.
    pub(crate) fn new(cfg: Arc<Config>, table: SourceTable, core: usize) -> Self {
        let mut u = Upstreams {
            core,
            owned: Vec::new(),
            cfg,
            table,
        };
        u.adopt();
        u
    }

    /// Takes sources this core owns and does not run yet (all at start,
    /// the added ones after a reload): each is dialled at once.
    fn adopt(&mut self) {
        let now = Instant::now();
        let workers = self.cfg.workers;
        for (i, s) in self.cfg.sources.iter().enumerate() {
            let source = i as u16;
            if i % workers == self.core
                && !s.retired
                && !self.owned.iter().any(|o| o.source == source)
            {
                self.owned.push(Owned {
                    source,
                    state: State::Idle { retry_at: now },
                    attempts: 0,
                    opened_at: None,
                    warned: None,
                });
            }
        }
    }

    /// A reload: drops the retired sources, adopts the added ones, and
    /// makes the ones in `redial` dial again at once. Returns the
    /// connections to close (those of `redial`; the retired sources' are
    /// closed with their clients).
    pub(crate) fn reload(
        &mut self,
        cfg: Arc<Config>,
        table: SourceTable,
        redial: &[u16],
    ) -> Vec<ConnId> {
        self.cfg = cfg;
        self.table = table;
        let cfg = &self.cfg;
        self.owned.retain(|o| {
            cfg.sources
                .get(o.source as usize)
                .is_some_and(|s| !s.retired)
        });
        let mut close = Vec::new();
        let now = Instant::now();
        for o in self.owned.iter_mut().filter(|o| redial.contains(&o.source)) {
            if let State::Connected(id) = o.state {
                close.push(id);
            }
            o.state = State::Idle { retry_at: now };
            o.attempts = 0;
        }
        self.adopt();
        close
    }

    fn status(&self, source: u16) -> Option<&SourceStatus> {
        self.table.get(source as usize).map(|s| &**s)
    }

    /// The connections to open now: retry times that came, resolutions
    /// that finished. Never blocks.
    pub(crate) fn due(&mut self, now: Instant, shared: &Arc<Shared>) -> Vec<Dial> {
        let mut dials = Vec::new();
        for i in 0..self.owned.len() {
            let source = self.owned[i].source;
            // Most iterations every source is connected: nothing to read.
            let waiting = match &self.owned[i].state {
                State::Idle { retry_at } => *retry_at <= now,
                State::Resolving(_) => true,
                _ => false,
            };
            if !waiting {
                continue;
            }
            let all = self.cfg.clone();
            let Some(cfg) = all.sources.get(source as usize) else {
                continue;
            };
            let addr = match &self.owned[i].state {
                State::Idle { retry_at } if *retry_at <= now => {
                    let t = &cfg.target;
                    if let Ok(ip) = t.host.parse::<IpAddr>() {
                        Some(SocketAddr::new(ip, t.port))
                    } else {
                        self.resolve(i, shared);
                        None
                    }
                }
                State::Resolving(rx) => match rx.try_recv() {
                    Ok(Ok(addrs)) if !addrs.is_empty() => Some(addrs[0]),
                    Ok(r) => {
                        let why = r.err().map_or("no address".to_owned(), |e| e.to_string());
                        log::warn!("source {}: cannot resolve: {why}", cfg.url);
                        self.down(i, false, shared);
                        None
                    }
                    Err(_) => None,
                },
                _ => None,
            };
            let Some(addr) = addr else { continue };
            match open_stream(cfg, addr) {
                Ok(stream) => dials.push(Dial {
                    source,
                    addr,
                    stream,
                }),
                Err(e) => {
                    log::warn!("source {}: connect to {addr}: {e}", cfg.url);
                    self.down(i, false, shared);
                }
            }
        }
        dials
    }

    fn resolve(&mut self, i: usize, shared: &Arc<Shared>) {
        let source = self.owned[i].source as usize;
        let Some(t) = self.cfg.sources.get(source).map(|s| &s.target) else {
            return;
        };
        let spawned = resolve_in_background(t.host.clone(), t.port, shared.clone(), self.core);
        if let Some(st) = self.status(source as u16) {
            st.state.set(SourceStatus::RESOLVING);
        }
        self.owned[i].state = match spawned {
            Some(rx) => State::Resolving(rx),
            None => State::Idle {
                retry_at: Instant::now() + self.cfg.performance.reconnect_delay,
            },
        };
    }

    /// The core registered the dialled connection as `id`.
    pub(crate) fn dialled(&mut self, source: u16, id: ConnId) {
        if let Some(o) = self.owned.iter_mut().find(|o| o.source == source) {
            o.state = State::Connected(id);
            o.opened_at = Some(Instant::now());
            if let Some(st) = self.table.get(source as usize) {
                st.state.set(SourceStatus::CONNECTING);
            }
        }
    }

    /// The core could not register the dialled connection.
    pub(crate) fn dial_failed(&mut self, source: u16, shared: &Shared) {
        if let Some(i) = self.owned.iter().position(|o| o.source == source) {
            self.down(i, false, shared);
        }
    }

    /// The live connection of `source`, if any.
    pub(crate) fn conn(&self, source: u16) -> Option<ConnId> {
        self.owned
            .iter()
            .find(|o| o.source == source)
            .and_then(|o| match o.state {
                State::Connected(id) => Some(id),
                _ => None,
            })
    }

    /// A connection of this core closed: if it was a source's, schedule
    /// the next try.
    pub(crate) fn closed(&mut self, id: ConnId, shared: &Shared) {
        let Some(i) = self
            .owned
            .iter()
            .position(|o| matches!(o.state, State::Connected(c) if c == id))
        else {
            return;
        };
        let was_open = self
            .status(self.owned[i].source)
            .is_some_and(|s| s.state.get() == SourceStatus::UP);
        self.down(i, was_open, shared);
    }

    /// A client message for a source that is not open: dropped, counted,
    /// and warned about at most once a minute.
    pub(crate) fn dropped(&mut self, source: u16, shared: &Shared) {
        shared.metrics[self.core].source_dropped.inc();
        if let Some(st) = self.table.get(source as usize) {
            st.dropped.inc();
        }
        let now = Instant::now();
        if let Some(o) = self.owned.iter_mut().find(|o| o.source == source) {
            if o.warned.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                o.warned = Some(now);
                if let Some(s) = self.cfg.sources.get(source as usize) {
                    log::warn!("source {} is down: dropping client messages for it", s.url);
                }
            }
        }
    }

    /// Source `owned[i]` lost its connection (or never got one): schedule
    /// the next try with capped exponential backoff and jitter. The attempt
    /// count resets only after a connection stayed up a while, so a source
    /// that accepts and closes at once backs off instead of spinning.
    fn down(&mut self, i: usize, was_open: bool, shared: &Shared) {
        let perf = &self.cfg.performance;
        let s = &mut self.owned[i];
        let stable = was_open
            && s.opened_at
                .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION);
        if stable {
            s.attempts = 0;
        }
        s.attempts = s.attempts.saturating_add(1);
        shared.metrics[self.core].source_reconnects.inc();
        let status = self.table.get(s.source as usize);
        if let Some(st) = status {
            st.reconnects.inc();
            st.state.set(SourceStatus::DOWN);
        }
        if perf.reconnect_max_attempts > 0 && s.attempts > perf.reconnect_max_attempts {
            log::error!(
                "source {}: giving up after {} attempts",
                s.source,
                perf.reconnect_max_attempts
            );
            s.state = State::Failed;
            if let Some(st) = status {
                st.state.set(SourceStatus::FAILED);
            }
            return;
        }
        let delay = backoff(
            perf.reconnect_delay,
            perf.reconnect_max_delay,
            s.attempts,
            uuid::Uuid::new_v4().as_u64_pair().1,
        );
        s.state = State::Idle {
            retry_at: Instant::now() + delay,
        };
        log::debug!(
            "source {}: retry in {delay:?} (attempt {})",
            s.source,
            s.attempts
        );
    }
}

/// Resolves `host` on a helper thread that wakes core `core` when done
/// (a core never blocks on DNS). None if the thread cannot start.
pub(crate) fn resolve_in_background(
    host: String,
    port: u16,
    shared: Arc<Shared>,
    core: usize,
) -> Option<Receiver<io::Result<Vec<SocketAddr>>>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("corerelay-resolve".into())
        .spawn(move || {
            use std::net::ToSocketAddrs;
            let r = (host.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<_>>());
            let _ = tx.send(r);
            shared.inboxes[core].wake();
        })
        .ok()
        .map(|_| rx)
}

/// The delay before attempt `attempts` (1-based): `base * 2^(attempts-1)`
/// capped at `max` (at least `base`), times a jitter between half and all
/// of it drawn from `random`.
pub(crate) fn backoff(base: Duration, max: Duration, attempts: u32, random: u64) -> Duration {
    let grown = base.as_secs_f64() * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
    let capped = grown.min(max.as_secs_f64().max(base.as_secs_f64()));
    let r = (random >> 11) as f64 / (1u64 << 53) as f64;
    Duration::from_secs_f64(capped * (0.5 + 0.5 * r))
}

/// The next attempt's delay for a connection that was lost (or never
/// made): the attempt count restarts after a `stable` connection, then
/// grows, and the delay is `backoff` with fresh jitter.
pub(crate) fn retry_delay(
    attempts: &mut u32,
    stable: bool,
    base: Duration,
    max: Duration,
) -> Duration {
    if stable {
        *attempts = 0;
    }
    *attempts = attempts.saturating_add(1);
    backoff(base, max, *attempts, uuid::Uuid::new_v4().as_u64_pair().1)
}

/// Opens a non-blocking connection to a source (TLS for wss://, with the
/// URL's host as SNI and certificate name).
fn open_stream(cfg: &SourceConfig, addr: SocketAddr) -> io::Result<Stream> {
    let tcp = mio::net::TcpStream::connect(addr)?;
    let Some(tls) = &cfg.tls else {
        return Ok(Stream::Tcp(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(cfg.target.host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(io::Error::other)?;
    Ok(Stream::Tls(Box::new(TlsStream {
        tcp,
        tls: rustls::Connection::Client(conn),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_half_to_all() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(1));
        let max_r = u64::MAX;
        assert!(backoff(b, m, 1, max_r) <= b, "at most the whole delay");
        assert_eq!(backoff(b, m, 1, 0), Duration::from_millis(50));
        assert_eq!(backoff(b, m, 3, 0), Duration::from_millis(200));
        assert_eq!(backoff(b, m, 20, 0), Duration::from_millis(500), "capped");
        assert_eq!(
            backoff(b, Duration::ZERO, 5, 0),
            Duration::from_millis(50),
            "max below base"
        );
    }
}

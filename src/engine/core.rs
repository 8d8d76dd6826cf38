//! `Core`: one event-loop thread. It owns its poll, listeners, connections,
//! timer wheel, scratch buffer and inbound channel; other threads reach it
//! only through [`Shared`] (mesh inboxes, directory, counters, flags).
//!
//! One iteration: poll (park only if nothing is pending, after announcing it)
//! -> note readiness -> accept (capped) -> drain the inbound channel -> read
//! ready connections (budgeted; skipped under backpressure or drain) -> apply
//! local deliveries and kicks -> timers -> flush dirty connections (one
//! writev run each) -> send this iteration's cross-core batches.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::admin::{self, AdminState};
use super::conn::{admit, CloseReason, Conn, Proto, Queued, RelyState, Timing, UnixState};
use super::directory::{Directory, LookupCache};
use super::listener::{ListenSock, Listener, ListenerKind};
use super::mesh::{Batch, Inbox, Item, Outgoing};
use super::metrics::{CoreMetrics, SourceStatus};
use super::outbox::{Chunk, Flush};
use super::route::{
    Actions, AdminCall, Ctx, FanOp, Fanout, Local, ReplyTo, SourceMembers, SHARE_FRAME_ACROSS_CORES,
};
use super::source;
use super::stream::Drain;
use super::tags::{apply_changes, Selector, TagIndex};
use super::timer::{Timer, Wheel};
use super::ConnId;
use super::{rely, ws};
use crate::config::{
    Config, DEFAULT_WS_HANDSHAKE_TIMEOUT, DEFAULT_WS_MAX_OUTPUT_BYTES, DEFAULT_WS_PING_INTERVAL,
    DEFAULT_WS_PONG_TIMEOUT,
};
use crate::protocol::ws as wsproto;

/// Timer resolution.
pub const TICK: Duration = Duration::from_millis(100);
/// Timer wheel buckets (409.6 s per turn at 100 ms ticks): enough that a
/// slot stays short (cancel scans one) even with a million connections.
const WHEEL_SLOTS: usize = 4096;
/// Reads per connection per iteration before yielding to the others.
const READS_PER_ITERATION: usize = 4;
/// How long an accept failure (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses a
/// listener instead of spinning on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// An admin connection with no request for this long is closed.
const ADMIN_IDLE: Duration = Duration::from_secs(60);
/// An upstream connection that stayed up this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// An owned source's connection state.
#[derive(Debug)]
struct SourceRt {
    idx: u16,
    state: SrcState,
    attempts: u32,
    opened_at: Option<Instant>,
}

#[derive(Debug)]
enum SrcState {
    /// Waiting to (re)connect.
    Idle { retry_at: Instant },
    /// A helper thread resolves the host name.
    Resolving(Receiver<std::io::Result<Vec<std::net::SocketAddr>>>),
    /// A connection exists (connecting, upgrading or open).
    Connected(ConnId),
    /// reconnect_max_attempts reached.
    Failed,
}

/// A deadline passed on an open upstream: ping, or give up on it.
fn upstream_deadline(c: &mut Conn, now: u64, t: &Timing) -> Option<CloseReason> {
    let Proto::Upstream(u) = &mut c.proto else {
        return None;
    };
    let source::UpStage::Open {
        next_ping,
        ping_sent,
        ..
    } = &mut u.stage
    else {
        return None;
    };
    if ping_sent.is_some_and(|s| s + t.ws_pong <= now) {
        return Some(CloseReason::PingTimeout);
    }
    if let Some(every) = t.ws_ping {
        if *next_ping <= now {
            *next_ping = now + every;
            if ping_sent.is_none() {
                *ping_sent = Some(now);
                source::send_frame(c, wsproto::OP_PING, b"");
            }
        }
    }
    None
}

/// A source that is down warns about dropped client messages at most this
/// often.
const SOURCE_WARN_EVERY: Duration = Duration::from_secs(60);
/// Poll timeout while cross-core batches wait for room.
const OVERFLOW_RETRY: Duration = Duration::from_millis(1);

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX / 2;

/// What all cores share.
#[derive(Debug)]
pub struct Shared {
    /// The validated configuration.
    pub cfg: Config,
    /// Client id -> connection.
    pub directory: Directory,
    /// One inbox per core.
    pub inboxes: Arc<[Inbox]>,
    /// One counter set per core.
    pub metrics: Box<[CoreMetrics]>,
    /// One status per upstream source (written by its owner core).
    pub sources: Box<[super::metrics::SourceStatus]>,
    /// Set once to begin a graceful shutdown.
    pub shutdown: AtomicBool,
    /// Draining cores that will never send to another core again (they have
    /// stopped reading and their outgoing batches are all in channels). A
    /// core exits only when this equals the worker count, so no delivery
    /// read before the signal is lost on its way between cores.
    pub quiesced: AtomicUsize,
}

impl Shared {
    /// Begins a graceful shutdown on every core.
    pub fn begin_shutdown(&self) {
        if !self.shutdown.swap(true, Ordering::SeqCst) {
            for inbox in self.inboxes.iter() {
                inbox.wake();
            }
        }
    }
}

/// Everything a core thread needs, built before the thread starts so that
/// bind errors surface in `Server::start`.
pub struct CoreSetup {
    /// Core index.
    pub index: usize,
    /// Its poll (the waker is registered on it).
    pub poll: Poll,
    /// Its inbound channel.
    pub rx: Receiver<Batch>,
    /// Its listeners (one per configured address).
    pub listeners: Vec<(ListenerKind, ListenSock)>,
}

/// One event loop.
pub struct Core {
    index: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listeners: Vec<Listener>,
    conns: Slab<Conn>,
    next_gen: u64,
    max_conns: usize,
    scratch: Box<[u8]>,
    rx: Receiver<Batch>,
    mesh: Outgoing,
    actions: Actions,
    /// Connections with unread input (key, gen).
    ready: Vec<(usize, u64)>,
    /// Connections with queued output (key, gen).
    dirty: Vec<(usize, u64)>,
    wheel: Wheel,
    fired: Vec<Timer>,
    epoch: Instant,
    now: u64,
    timing: Timing,
    drain_deadline: Option<Instant>,
    /// This core has counted itself in `Shared::quiesced`.
    quiesced: bool,
    /// Bytes waiting in all of this core's output queues.
    queued: u64,
    /// This iteration's local delivery buffer once frozen; reclaimed for
    /// reuse after the flush, when no queue refers to it any more.
    local_batch: Option<Arc<Vec<u8>>>,
    /// Directory lookups, validated per shard version.
    cache: LookupCache,
    /// Tags of this core's WebSocket connections.
    tags: TagIndex,
    /// This core's clients of each upstream source.
    members: SourceMembers,
    /// When each source's "down, dropping" warning was last logged.
    source_warned: Vec<Option<Instant>>,
    /// The sources this core owns (index % workers == this core).
    sources: Vec<SourceRt>,
    /// Upstream connections whose connect completed this iteration.
    connected: Vec<(usize, u64)>,
    /// Reused buffer of selected slots.
    selected: Vec<usize>,
    /// Admin requests waiting for the cores' replies.
    pending: std::collections::HashMap<u64, PendingAdmin>,
    next_req: u64,
}

/// An admin request in flight.
#[derive(Debug)]
struct PendingAdmin {
    conn: ConnId,
    waiting: usize,
    count: u64,
    text: Vec<u8>,
    status: bool,
    json: bool,
    keep_alive: bool,
}

/// Reads and drops a lingering connection's input; a reason once the peer
/// has closed (or the socket failed).
fn discard_input(conn: &mut Conn, scratch: &mut [u8]) -> Option<CloseReason> {
    for _ in 0..READS_PER_ITERATION {
        match conn.stream.read_some(scratch) {
            Ok((_, Drain::Closed)) => return conn.closing.map(|c| c.reason),
            Ok((_, Drain::More)) => {}
            Ok((n, Drain::Drained)) if n > 0 && conn.read_closed => {}
            Ok((_, Drain::Drained)) => {
                conn.readable = false;
                return None;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(CloseReason::IoError),
        }
    }
    None
}

/// Appends one /status entry for a WebSocket connection.
fn status_line(out: &mut Vec<u8>, c: &Conn, json: bool) {
    let Proto::Ws(w) = &c.proto else { return };
    let id = c
        .login
        .as_ref()
        .map(|l| String::from_utf8_lossy(&l.id).into_owned())
        .unwrap_or_default();
    if json {
        let tags: serde_json::Map<String, serde_json::Value> = w
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(&**v)))
            .collect();
        let entry = serde_json::json!({ "id": id, "tags": tags });
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(entry.to_string().as_bytes());
    } else {
        out.extend_from_slice(format!("id={id}").as_bytes());
        for (k, v) in &w.tags {
            out.extend_from_slice(format!(" {k}={v}").as_bytes());
        }
        out.push(b'\n');
    }
}

impl Core {
    /// Builds the core; registers its listeners.
    pub fn new(setup: CoreSetup, shared: Arc<Shared>) -> io::Result<Core> {
        let cfg = &shared.cfg;
        let mut listeners = Vec::new();
        for (i, (kind, mut sock)) in setup.listeners.into_iter().enumerate() {
            let addr = match &sock {
                ListenSock::Tcp(l) => l.local_addr()?,
                ListenSock::Unix(_) => std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            };
            setup.poll.registry().register(
                &mut sock,
                Token(LISTENER_BASE + i),
                Interest::READABLE,
            )?;
            listeners.push(Listener {
                sock,
                kind,
                addr,
                token: LISTENER_BASE + i,
                pending: true,
                paused_until: None,
            });
        }
        let max_conns = cfg.max_connections.div_ceil(cfg.workers).max(1);
        let ticks = |d: Duration| {
            (d.as_millis() as u64)
                .div_ceil(TICK.as_millis() as u64)
                .max(1)
        };
        let ws = cfg.websocket.as_ref();
        let timing = Timing {
            rely_idle: cfg.rely.idle_timeout.map(ticks),
            // Defaults apply to sources' listeners without a websocket section.
            ws_ping: ws
                .map_or(Some(DEFAULT_WS_PING_INTERVAL), |w| w.ping_interval)
                .map(ticks),
            ws_pong: ticks(ws.map_or(DEFAULT_WS_PONG_TIMEOUT, |w| w.pong_timeout)),
            ws_idle: ws.and_then(|w| w.idle_timeout).map(ticks),
            ws_handshake: ticks(ws.map_or(DEFAULT_WS_HANDSHAKE_TIMEOUT, |w| w.handshake_timeout)),
            admin_idle: ticks(ADMIN_IDLE),
        };
        Ok(Core {
            index: setup.index,
            poll: setup.poll,
            listeners,
            conns: Slab::with_capacity(1024.min(max_conns)),
            next_gen: 1,
            max_conns,
            scratch: vec![0u8; cfg.read_buffer].into_boxed_slice(),
            rx: setup.rx,
            mesh: Outgoing::new(shared.inboxes.clone()),
            actions: Actions::default(),
            ready: Vec::new(),
            dirty: Vec::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            fired: Vec::new(),
            epoch: Instant::now(),
            now: 0,
            timing,
            drain_deadline: None,
            quiesced: false,
            queued: 0,
            local_batch: None,
            cache: LookupCache::default(),
            tags: TagIndex::default(),
            members: SourceMembers {
                ws: (0..cfg.sources.len()).map(|_| Default::default()).collect(),
                unix: (0..cfg.sources.len()).map(|_| Default::default()).collect(),
            },
            source_warned: vec![None; cfg.sources.len()],
            sources: (0..cfg.sources.len())
                .filter(|i| i % cfg.workers == setup.index)
                .map(|i| SourceRt {
                    idx: i as u16,
                    state: SrcState::Idle {
                        retry_at: Instant::now(),
                    },
                    attempts: 0,
                    opened_at: None,
                })
                .collect(),
            connected: Vec::new(),
            selected: Vec::new(),
            pending: std::collections::HashMap::new(),
            next_req: 1,
            shared,
        })
    }

    fn metrics(&self) -> &CoreMetrics {
        &self.shared.metrics[self.index]
    }

    /// Runs until shutdown completes.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let busy_poll = self.shared.cfg.busy_poll;
        loop {
            let timeout = self.poll_timeout(busy_poll);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("core {}: poll failed: {e}", self.index);
                    break;
                }
            }
            self.shared.inboxes[self.index].unpark();
            if busy_poll && events.is_empty() && self.rx.is_empty() && self.ready.is_empty() {
                // Spinning, but idle: let any other runnable thread on this
                // CPU go first. Costs one cheap syscall when there is none;
                // when the machine is oversubscribed it saves the scheduler
                // from preempting us a whole time slice later. The iteration
                // still runs: timers and retries must not depend on traffic.
                std::thread::yield_now();
            }
            let instant = Instant::now();
            self.now = (instant - self.epoch).as_millis() as u64 / TICK.as_millis() as u64;
            self.metrics().loop_iterations.inc();

            for ev in events.iter() {
                let t = ev.token();
                if t == WAKER {
                    continue;
                }
                if t.0 >= LISTENER_BASE {
                    // By token, not position: draining drops listeners.
                    if let Some(l) = self.listeners.iter_mut().find(|l| l.token == t.0) {
                        l.pending = true;
                    }
                    continue;
                }
                let Some(c) = self.conns.get_mut(t.0) else {
                    continue;
                };
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    c.readable = true;
                    // Remembered: the FIN may arrive with the last data, and
                    // no edge follows it.
                    c.read_closed |= ev.is_read_closed() || ev.is_error();
                    if !c.in_ready {
                        c.in_ready = true;
                        self.ready.push((t.0, c.gen));
                    }
                }
                if ev.is_writable() {
                    c.writable = true;
                    if let Proto::Upstream(u) = &c.proto {
                        if matches!(u.stage, source::UpStage::Connecting) {
                            self.connected.push((t.0, c.gen));
                        }
                    }
                    // TLS may hold encrypted bytes with an empty outbox.
                    let tls = matches!(c.stream, super::stream::Stream::Tls(_));
                    if (!c.out.is_empty() || tls) && !c.in_dirty {
                        c.in_dirty = true;
                        self.dirty.push((t.0, c.gen));
                    }
                }
            }

            self.upstreams_connected();
            if self.drain_deadline.is_none() && self.shared.shutdown.load(Ordering::Acquire) {
                self.begin_drain(instant);
            }
            // While draining only the admin listeners remain (for /ready).
            self.accept(instant);
            self.drain_inbox();
            if self.mesh.backpressured() {
                self.metrics().mesh_backpressure.inc();
            } else {
                self.read_ready();
            }
            self.apply_actions();
            self.run_timers();
            self.drive_sources(instant);
            self.flush_dirty();
            self.reclaim_local_batch();
            let waited = self.mesh.flush();
            if waited > 0 {
                self.metrics().mesh_overflow.add(waited);
            }

            if let Some(deadline) = self.drain_deadline {
                if !self.quiesced && !self.mesh.has_pending() {
                    self.quiesced = true;
                    self.shared.quiesced.fetch_add(1, Ordering::SeqCst);
                }
                let all_quiet =
                    self.shared.quiesced.load(Ordering::SeqCst) == self.shared.cfg.workers;
                let flushed = all_quiet && self.rx.is_empty() && self.queued == 0;
                if flushed || instant >= deadline {
                    if !flushed {
                        log::warn!(
                            "core {}: shutdown grace expired with {} bytes still queued",
                            self.index,
                            self.queued
                        );
                    }
                    break;
                }
            }
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.close(k, CloseReason::Shutdown);
        }
        log::debug!("core {} stopped", self.index);
    }

    fn poll_timeout(&self, busy_poll: bool) -> Option<Duration> {
        let now = Instant::now();
        let draining = self.drain_deadline.is_some();
        let accept_ready = self
            .listeners
            .iter()
            .any(|l| l.pending && l.paused_until.is_none_or(|t| t <= now));
        // Reads wait while a cross-core channel is full; spinning on them
        // would only burn the CPU the destination core needs.
        let read_ready = !self.ready.is_empty() && !self.mesh.backpressured() && !draining;
        if busy_poll || read_ready || accept_ready {
            return Some(Duration::ZERO);
        }
        let mut t = if self.mesh.has_pending() || draining {
            OVERFLOW_RETRY
        } else {
            TICK
        };
        for l in &self.listeners {
            if let Some(until) = l.paused_until {
                t = t.min(until.saturating_duration_since(now));
            }
        }
        // Announce the park even for a short sleep, so a delivery for us
        // wakes us instead of waiting out the timeout.
        let inbox = &self.shared.inboxes[self.index];
        inbox.park();
        if !self.rx.is_empty() {
            inbox.unpark();
            return Some(Duration::ZERO);
        }
        Some(t)
    }

    /// Stops accepting and reading; WebSocket clients get a close 1001 (the
    /// drain then waits for it to flush); unfinished upgrades just close.
    fn begin_drain(&mut self, now: Instant) {
        log::debug!("core {}: draining", self.index);
        // The admin API stays up while draining: /ready answers 503.
        let (admin, others): (Vec<Listener>, Vec<Listener>) = self
            .listeners
            .drain(..)
            .partition(|l| l.kind == ListenerKind::Admin);
        for mut l in others {
            let _ = self.poll.registry().deregister(&mut l.sock);
        }
        self.listeners = admin;
        self.drain_deadline = Some(now + self.shared.cfg.shutdown_grace);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(c) = self.conns.get(key) else {
                continue;
            };
            match &c.proto {
                Proto::Ws(_) => {
                    self.own_write(key, |c, now| {
                        c.ws_close(
                            wsproto::CLOSE_GOING_AWAY,
                            "server shutting down",
                            CloseReason::Shutdown,
                            now,
                            false,
                        )
                    });
                }
                Proto::Handshake(_) => self.close(key, CloseReason::Shutdown),
                Proto::Upstream(u) if u.is_open() => {
                    self.own_write(key, |c, now| {
                        source::send_frame(
                            c,
                            wsproto::OP_CLOSE,
                            &wsproto::CLOSE_GOING_AWAY.to_be_bytes(),
                        );
                        c.begin_closing(CloseReason::Shutdown, now);
                    });
                }
                Proto::Upstream(_) => self.close(key, CloseReason::Shutdown),
                Proto::Rely(_) | Proto::Admin(_) | Proto::Unix(_) => {}
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        let batch = self.shared.cfg.accept_batch;
        for li in 0..self.listeners.len() {
            let l = &mut self.listeners[li];
            if !l.pending || l.paused_until.is_some_and(|t| t > now) {
                continue;
            }
            l.paused_until = None;
            let mut accepted = 0;
            while accepted < batch {
                let l = &mut self.listeners[li];
                match l.sock.accept() {
                    Ok((stream, peer)) => {
                        accepted += 1;
                        let kind = l.kind;
                        self.add_conn(stream, peer, kind);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        l.pending = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS, ENOMEM: pause rather than spin.
                        log::warn!(
                            "core {}: accept on {} failed: {e}; pausing {:?}",
                            self.index,
                            l.addr,
                            ACCEPT_PAUSE
                        );
                        l.paused_until = Some(now + ACCEPT_PAUSE);
                        self.shared.metrics[self.index].accept_errors.inc();
                        break;
                    }
                }
            }
        }
    }

    fn add_conn(
        &mut self,
        mut stream: super::stream::Stream,
        peer: std::net::SocketAddr,
        kind: ListenerKind,
    ) {
        let m = &self.shared.metrics[self.index];
        if self.conns.len() >= self.max_conns {
            m.rejected_limit.inc();
            log::debug!(
                "core {}: connection limit {} reached, refusing {peer}",
                self.index,
                self.max_conns
            );
            return;
        }
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("{peer}: TCP_NODELAY failed: {e}");
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("{peer}: register failed: {e}");
            return;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        let cfg = &self.shared.cfg;
        let mut conn = match kind {
            ListenerKind::Rely => {
                let mut c = Conn::new(
                    gen,
                    stream,
                    peer,
                    Proto::Rely(RelyState::default()),
                    self.now,
                );
                c.out_limit = cfg.rely.max_output_bytes;
                c.policy = cfg.rely.slow_consumer;
                c
            }
            ListenerKind::WebSocket => Conn::new(
                gen,
                stream,
                peer,
                ws::handshake_stage(&self.timing, self.now, None),
                self.now,
            ),
            ListenerKind::SourceWs(src) => Conn::new(
                gen,
                stream,
                peer,
                ws::handshake_stage(&self.timing, self.now, Some(src)),
                self.now,
            ),
            ListenerKind::SourceUnix(source) => {
                let mut c = Conn::new(
                    gen,
                    stream,
                    peer,
                    Proto::Unix(UnixState {
                        decoder: Default::default(),
                        source,
                    }),
                    self.now,
                );
                c.out_limit = cfg
                    .websocket
                    .as_ref()
                    .map_or(DEFAULT_WS_MAX_OUTPUT_BYTES as usize, |w| w.max_output_bytes);
                c.out_max_msgs = cfg.performance.max_queue_size;
                if let Some(set) = self.members.unix.get_mut(source as usize) {
                    set.insert(key);
                }
                c
            }
            ListenerKind::Admin => Conn::new(
                gen,
                stream,
                peer,
                Proto::Admin(AdminState::default()),
                self.now,
            ),
        };
        if let Some(due) = conn.due(&self.timing) {
            conn.timer = Some((self.wheel.arm(Timer { due, key, gen }), due));
        }
        entry.insert(conn);
        m.accepted.inc();
        m.connections.set(self.conns.len() as u64);
        log::debug!("core {}: accepted {peer}", self.index);
    }

    /// Lists a connection for this iteration's flush.
    fn mark_dirty(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.in_dirty && !c.out.is_empty() {
                c.in_dirty = true;
                self.dirty.push((key, c.gen));
            }
        }
    }

    /// Re-arms a connection's timer if its deadline moved earlier (a state
    /// change: upgrade done, closing started). Later deadlines are found
    /// lazily when the old entry fires.
    fn rearm_if_earlier(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let Some(due) = c.due(&self.timing) else {
            return;
        };
        if let Some((slot, armed)) = c.timer {
            if armed <= due {
                return;
            }
            self.wheel.cancel(slot, key, c.gen);
        }
        c.timer = Some((
            self.wheel.arm(Timer {
                due,
                key,
                gen: c.gen,
            }),
            due,
        ));
    }

    fn drain_inbox(&mut self) {
        // Bounded: at most what was in the channel when we started.
        for _ in 0..self.rx.len() {
            let Ok(batch) = self.rx.try_recv() else { break };
            let data = Arc::new(batch.data);
            let mut fanouts = batch.fanouts.into_iter();
            for item in batch.items {
                match item {
                    Item::Deliver { to, start, len } => self.deliver(
                        to,
                        Chunk::Slice {
                            buf: data.clone(),
                            start,
                            len,
                        },
                    ),
                    Item::Kick { conn } => self.kick(conn),
                    Item::Fanout(_) => {
                        if let Some(f) = fanouts.next() {
                            self.fanout(f);
                        }
                    }
                    Item::ToSource {
                        source,
                        text,
                        start,
                        len,
                    } => {
                        let msg = &data[start as usize..(start + len) as usize];
                        self.send_upstream(source, text, msg);
                    }
                    Item::Reply {
                        req,
                        count,
                        start,
                        len,
                    } => {
                        let text = &data[start as usize..(start + len) as usize];
                        self.on_reply(req, count, text);
                    }
                }
            }
        }
    }

    /// Runs a fan-out on every local connection it selects, and reports the
    /// count (and status text) to its reply address. Returns the count.
    fn fanout(&mut self, f: Fanout) -> u64 {
        let mut slots = std::mem::take(&mut self.selected);
        slots.clear();
        match &*f.selector {
            Selector::Tags(want) => self.tags.select(want, &mut slots),
            Selector::Ids(ids) => {
                for id in ids {
                    if let Some(c) = self.cache.lookup(&self.shared.directory, id.as_bytes()) {
                        if c.core as usize == self.index {
                            slots.push(c.slot as usize);
                        }
                    }
                }
            }
            Selector::All => slots.extend(
                self.conns
                    .iter()
                    .filter(|(_, c)| matches!(c.proto, Proto::Ws(_)))
                    .map(|(k, _)| k),
            ),
            Selector::Source(src) => {
                if let Some(set) = self.members.ws.get(*src as usize) {
                    slots.extend(set.iter().copied());
                }
            }
            Selector::SourceUnix(src) => {
                if let Some(set) = self.members.unix.get(*src as usize) {
                    slots.extend(set.iter().copied());
                }
            }
        }
        let mut n = 0;
        let mut text = Vec::new();
        for &slot in &slots {
            let Some(c) = self.conns.get(slot) else {
                continue;
            };
            let id = ConnId {
                core: self.index as u16,
                slot: slot as u32,
                gen: c.gen,
            };
            let kind_ok = match *f.selector {
                Selector::SourceUnix(_) => matches!(c.proto, Proto::Unix(_)),
                _ => matches!(c.proto, Proto::Ws(_)),
            };
            if Some(id) == f.exclude || c.closing.is_some() || !kind_ok {
                continue;
            }
            let touched = match &f.op {
                FanOp::Send => self.queue_on(slot, Chunk::Shared(f.frame.clone()), None),
                FanOp::Close => {
                    if !f.frame.is_empty() {
                        self.queue_on(slot, Chunk::Shared(f.frame.clone()), None);
                    }
                    self.close_ws(
                        slot,
                        wsproto::CLOSE_NORMAL,
                        "Closed by server",
                        CloseReason::Closed,
                    );
                    true
                }
                FanOp::SetTags(changes) => self.set_tags(slot, changes),
                FanOp::Status { json } => {
                    status_line(&mut text, c, *json);
                    true
                }
            };
            n += u64::from(touched);
        }
        if matches!(f.op, FanOp::Send | FanOp::Close) {
            self.shared.metrics[self.index].fanout_deliveries.add(n);
        }
        self.selected = slots;
        if let Some(r) = f.reply {
            if r.core as usize == self.index {
                self.on_reply(r.req, n, &text);
            } else {
                self.mesh.reply(r.core as usize, r.req, n, &text);
            }
        }
        n
    }

    /// Sends a WebSocket close and starts closing (flushed with the rest).
    fn close_ws(&mut self, key: usize, code: u16, reason: &str, why: CloseReason) {
        self.own_write(key, |c, now| c.ws_close(code, reason, why, now, false));
    }

    /// Runs one of a connection's own writes (a close frame, a ping, an
    /// admin answer, an upgrade request) and keeps the queued-bytes account,
    /// the flush list and the timer in step with it. The write may also
    /// shrink the queue (a slow consumer's unstarted bytes dropped).
    fn own_write<R>(&mut self, key: usize, f: impl FnOnce(&mut Conn, u64) -> R) -> Option<R> {
        let now = self.now;
        let c = self.conns.get_mut(key)?;
        let before = c.out.bytes() as u64;
        let r = f(c, now);
        self.queued = self.queued - before + c.out.bytes() as u64;
        self.mark_dirty(key);
        self.rearm_if_earlier(key);
        Some(r)
    }

    /// Applies tag changes to one connection, keeping the index exact.
    fn set_tags(&mut self, key: usize, changes: &[(String, String)]) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let Proto::Ws(w) = &mut c.proto else {
            return false;
        };
        let (removed, added) = apply_changes(&mut w.tags, changes);
        self.tags.remove(key, &removed);
        self.tags.insert(key, &added);
        if let Some(ep) = self
            .shared
            .cfg
            .websocket
            .as_ref()
            .and_then(|ws| ws.endpoints.get(w.endpoint))
        {
            w.broadcast = ws::broadcast_selector(ep.broadcast_tag.as_deref(), &w.tags);
        }
        true
    }

    /// A client message for a source this core owns: written upstream in
    /// order if the source is open, else dropped and counted (warning at
    /// most once a minute).
    fn send_upstream(&mut self, source: u16, text: bool, msg: &[u8]) {
        let open = self
            .sources
            .iter()
            .find(|s| s.idx == source)
            .and_then(|s| match s.state {
                SrcState::Connected(id) => Some(id),
                _ => None,
            });
        if let Some(id) = open {
            let key = id.slot as usize;
            let writable = self.conns.get(key).is_some_and(|c| {
                c.gen == id.gen
                    && c.closing.is_none()
                    && matches!(&c.proto, Proto::Upstream(u) if u.is_open())
            });
            if writable {
                let op = if text {
                    wsproto::OP_TEXT
                } else {
                    wsproto::OP_BINARY
                };
                self.own_write(key, |c, _| source::send_frame(c, op, msg));
                self.shared.metrics[self.index].source_out.inc();
                self.shared.sources[source as usize].messages_out.inc();
                return;
            }
        }
        let m = &self.shared.metrics[self.index];
        m.source_dropped.inc();
        if let Some(st) = self.shared.sources.get(source as usize) {
            st.dropped.inc();
        }
        let now = Instant::now();
        if let Some(w) = self.source_warned.get_mut(source as usize) {
            if w.is_none_or(|t| now.duration_since(t) >= SOURCE_WARN_EVERY) {
                *w = Some(now);
                let url = self
                    .shared
                    .cfg
                    .sources
                    .get(source as usize)
                    .map_or("?", |s| s.url.as_str());
                log::warn!("source {url} is down: dropping client messages for it");
            }
        }
    }

    /// Sends the upgrade request on upstreams whose TCP connect completed.
    fn upstreams_connected(&mut self) {
        for (key, gen) in std::mem::take(&mut self.connected) {
            let Some(c) = self.conns.get_mut(key).filter(|c| c.gen == gen) else {
                continue;
            };
            let Proto::Upstream(u) = &c.proto else {
                continue;
            };
            let Some(cfg) = self.shared.cfg.sources.get(u.source as usize) else {
                continue;
            };
            let cfg = cfg.clone();
            if let Some(Err(e)) = self.own_write(key, |c, _| source::on_connected(c, &cfg)) {
                log::warn!("source {}: connect failed: {e}", cfg.url);
                self.close(key, CloseReason::IoError);
            }
        }
    }

    /// Starts connections whose retry time has come, and collects name
    /// resolutions. Never blocks: host names resolve on a helper thread.
    fn drive_sources(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        for i in 0..self.sources.len() {
            let idx = self.sources[i].idx as usize;
            let cfg = &self.shared.cfg.sources[idx];
            match &self.sources[i].state {
                SrcState::Idle { retry_at } if *retry_at <= now => {
                    let t = &cfg.target;
                    if let Ok(ip) = t.host.parse::<std::net::IpAddr>() {
                        self.connect_source(i, std::net::SocketAddr::new(ip, t.port));
                    } else {
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        let (host, port, shared, core) =
                            (t.host.clone(), t.port, self.shared.clone(), self.index);
                        let spawned = std::thread::Builder::new()
                            .name("corerelay-resolve".into())
                            .spawn(move || {
                                use std::net::ToSocketAddrs;
                                let r = (host.as_str(), port)
                                    .to_socket_addrs()
                                    .map(|a| a.collect::<Vec<_>>());
                                let _ = tx.send(r);
                                shared.inboxes[core].wake();
                            });
                        self.shared.sources[idx].state.set(SourceStatus::RESOLVING);
                        self.sources[i].state = match spawned {
                            Ok(_) => SrcState::Resolving(rx),
                            Err(_) => SrcState::Idle {
                                retry_at: now + self.shared.cfg.performance.reconnect_delay,
                            },
                        };
                    }
                }
                SrcState::Resolving(rx) => match rx.try_recv() {
                    Ok(Ok(addrs)) if !addrs.is_empty() => self.connect_source(i, addrs[0]),
                    Ok(r) => {
                        log::warn!("source {}: cannot resolve: {:?}", cfg.url, r.err());
                        let idx = self.sources[i].idx;
                        self.source_down(idx, false);
                    }
                    Err(_) => {}
                },
                _ => {}
            }
        }
    }

    /// Opens a non-blocking connection to a source.
    fn connect_source(&mut self, i: usize, addr: std::net::SocketAddr) {
        let idx = self.sources[i].idx;
        let cfg = &self.shared.cfg.sources[idx as usize];
        let connected = mio::net::TcpStream::connect(addr).and_then(|tcp| match &cfg.tls {
            None => Ok(super::stream::Stream::Tcp(tcp)),
            Some(tls) => {
                // SNI and certificate name: the URL's host.
                let name = rustls::pki_types::ServerName::try_from(cfg.target.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn =
                    rustls::ClientConnection::new(tls.clone(), name).map_err(io::Error::other)?;
                Ok(super::stream::Stream::Tls(Box::new(
                    super::stream::TlsStream { tcp, tls: conn },
                )))
            }
        });
        let mut stream = match connected {
            Ok(s) => s,
            Err(e) => {
                log::warn!("source {}: connect to {addr}: {e}", cfg.url);
                self.source_down(idx, false);
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("source {}: register: {e}", cfg.url);
            self.source_down(idx, false);
            return;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        let ticks = (cfg.connect_timeout.as_millis() as u64)
            .div_ceil(TICK.as_millis() as u64)
            .max(1);
        let seed = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
        let state = source::UpstreamState {
            source: idx,
            stage: source::UpStage::Connecting,
            deadline: self.now + ticks,
            mask_seed: seed,
        };
        let mut conn = Conn::new(gen, stream, addr, Proto::Upstream(state), self.now);
        conn.writable = false;
        if let Some(due) = conn.due(&self.timing) {
            conn.timer = Some((self.wheel.arm(Timer { due, key, gen }), due));
        }
        entry.insert(conn);
        self.sources[i].state = SrcState::Connected(ConnId {
            core: self.index as u16,
            slot: key as u32,
            gen,
        });
        self.sources[i].opened_at = Some(Instant::now());
        self.shared.sources[idx as usize]
            .state
            .set(SourceStatus::CONNECTING);
        log::debug!("source {}: connecting to {addr}", cfg.url);
    }

    /// The upstream connection of `source` is gone: schedule the next try
    /// with capped exponential backoff and jitter. The attempt count resets
    /// only after a connection stayed up a while, so a source that accepts
    /// and closes at once backs off instead of spinning.
    fn source_down(&mut self, source: u16, was_open: bool) {
        let perf = &self.shared.cfg.performance;
        let Some(s) = self.sources.iter_mut().find(|s| s.idx == source) else {
            return;
        };
        let stable = was_open
            && s.opened_at
                .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION);
        if stable {
            s.attempts = 0;
        }
        s.attempts = s.attempts.saturating_add(1);
        self.shared.metrics[self.index].source_reconnects.inc();
        let status = &self.shared.sources[source as usize];
        status.reconnects.inc();
        status.state.set(SourceStatus::DOWN);
        if perf.reconnect_max_attempts > 0 && s.attempts > perf.reconnect_max_attempts {
            log::error!(
                "source {source}: giving up after {} attempts",
                perf.reconnect_max_attempts
            );
            s.state = SrcState::Failed;
            status.state.set(SourceStatus::FAILED);
            return;
        }
        let base = perf.reconnect_delay.as_secs_f64()
            * 2f64.powi(s.attempts.saturating_sub(1).min(30) as i32);
        let capped = base.min(
            perf.reconnect_max_delay
                .as_secs_f64()
                .max(perf.reconnect_delay.as_secs_f64()),
        );
        // Jitter: between half and all of the delay (from the OS randomness
        // already drawn for masks; precision does not matter here).
        let r = (uuid::Uuid::new_v4().as_u64_pair().1 >> 11) as f64 / (1u64 << 53) as f64;
        let delay = Duration::from_secs_f64(capped * (0.5 + 0.5 * r));
        s.state = SrcState::Idle {
            retry_at: Instant::now() + delay,
        };
        log::debug!(
            "source {source}: retry in {delay:?} (attempt {})",
            s.attempts
        );
    }

    /// Starts an admin request on every core.
    fn admin_call(&mut self, call: AdminCall) {
        let req = self.next_req;
        self.next_req += 1;
        let json = matches!(call.op, FanOp::Status { json: true });
        self.pending.insert(
            req,
            PendingAdmin {
                conn: call.conn,
                waiting: self.shared.cfg.workers,
                count: 0,
                text: Vec::new(),
                status: matches!(call.op, FanOp::Status { .. }),
                json,
                keep_alive: call.keep_alive,
            },
        );
        let shared: Option<Arc<[u8]>> = (call.frame.len() >= SHARE_FRAME_ACROSS_CORES)
            .then(|| Arc::from(call.frame.as_slice()));
        let reply = Some(ReplyTo {
            core: self.index as u16,
            req,
        });
        let mut mine = None;
        for core in 0..self.shared.cfg.workers {
            let f = Fanout {
                selector: call.selector.clone(),
                frame: shared
                    .clone()
                    .unwrap_or_else(|| Arc::from(call.frame.as_slice())),
                exclude: None,
                op: call.op.clone(),
                reply,
            };
            if core == self.index {
                mine = Some(f);
            } else {
                self.mesh.fanout(core, f);
            }
        }
        if let Some(f) = mine {
            self.fanout(f);
        }
    }

    /// A core's answer to an admin request; the last one answers the client.
    fn on_reply(&mut self, req: u64, count: u64, text: &[u8]) {
        let Some(p) = self.pending.get_mut(&req) else {
            return;
        };
        p.count += count;
        if p.json && !text.is_empty() && !p.text.is_empty() {
            p.text.push(b',');
        }
        p.text.extend_from_slice(text);
        p.waiting -= 1;
        if p.waiting > 0 {
            return;
        }
        let Some(p) = self.pending.remove(&req) else {
            return;
        };
        let key = p.conn.slot as usize;
        let now = self.now;
        let Some(c) = self.conns.get_mut(key).filter(|c| c.gen == p.conn.gen) else {
            return;
        };
        let before = c.out.bytes();
        let mut p = p;
        // Sources are listed after the connections.
        for (cfg, st) in self
            .shared
            .cfg
            .sources
            .iter()
            .zip(self.shared.sources.iter())
        {
            if !p.status {
                break;
            }
            let (url, state) = (&cfg.url, st.state_name());
            let (i, o, d, r) = (
                st.messages_in.get(),
                st.messages_out.get(),
                st.dropped.get(),
                st.reconnects.get(),
            );
            if p.json {
                let v = serde_json::json!({"source": url, "state": state, "messages_in": i, "messages_out": o, "dropped": d, "reconnects": r});
                if !p.text.is_empty() {
                    p.text.push(b',');
                }
                p.text.extend_from_slice(v.to_string().as_bytes());
            } else {
                p.text.extend_from_slice(
                    format!("source={url} state={state} messages_in={i} messages_out={o} dropped={d} reconnects={r}\n").as_bytes(),
                );
            }
        }
        if p.status && p.json {
            let mut body = Vec::with_capacity(p.text.len() + 2);
            body.push(b'[');
            body.extend_from_slice(&p.text);
            body.push(b']');
            admin::respond(c, "200 OK", "application/json", &body, p.keep_alive, now);
        } else if p.status {
            admin::respond(
                c,
                "200 OK",
                "text/plain; charset=utf-8",
                &p.text,
                p.keep_alive,
                now,
            );
        } else {
            admin::respond(
                c,
                "200 OK",
                "text/plain; charset=utf-8",
                p.count.to_string().as_bytes(),
                p.keep_alive,
                now,
            );
        }
        if let Proto::Admin(st) = &mut c.proto {
            st.pending = false;
            // Pipelined requests wait in the buffer: read them next.
            if !st.buf.is_empty() && !c.in_ready {
                c.in_ready = true;
                self.ready.push((key, c.gen));
            }
        }
        self.queued += (c.out.bytes() - before) as u64;
        self.mark_dirty(key);
        self.rearm_if_earlier(key);
    }

    fn live(&self, id: ConnId) -> bool {
        debug_assert_eq!(id.core as usize, self.index);
        self.conns
            .get(id.slot as usize)
            .is_some_and(|c| c.gen == id.gen)
    }

    /// Last login wins: the older connection goes (a WebSocket client with
    /// close 1008 first).
    fn kick(&mut self, id: ConnId) {
        if !self.live(id) {
            return;
        }
        let key = id.slot as usize;
        self.shared.metrics[self.index].kicked_login.inc();
        if matches!(self.conns.get(key).map(|c| &c.proto), Some(Proto::Ws(_))) {
            self.own_write(key, |c, now| {
                // Its id now belongs to the newer connection: forget it here
                // so cleanup cannot touch the newer login.
                c.login = None;
                c.ws_close(
                    wsproto::CLOSE_POLICY,
                    "replaced by a newer connection",
                    CloseReason::Kicked,
                    now,
                    false,
                );
            });
        } else {
            self.close(key, CloseReason::Kicked);
        }
    }

    /// Delivers a RELY transfer frame: as it is to a RELY client, as a
    /// binary message to a WebSocket client (rely mode).
    fn deliver(&mut self, to: ConnId, data: Chunk) {
        let key = to.slot as usize;
        let live = self
            .conns
            .get(key)
            .is_some_and(|c| c.gen == to.gen && c.closing.is_none());
        if !live {
            self.shared.metrics[self.index].dropped_dead_conn.inc();
            return;
        }
        let ws = matches!(self.conns.get(key).map(|c| &c.proto), Some(Proto::Ws(_)));
        // The frame header goes on the stack: this runs per message.
        let (h, n) = wsproto::header_array(wsproto::OP_BINARY, data.len());
        self.queue_on(key, data, ws.then_some(&h[..n]));
    }

    /// Queues `data` (after `header`, if any) on a live connection under its
    /// byte limit, applying the slow-consumer policy. Returns whether it
    /// was queued.
    fn queue_on(&mut self, key: usize, data: Chunk, header: Option<&[u8]>) -> bool {
        let m = &self.shared.metrics[self.index];
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        let hlen = header.map_or(0, <[u8]>::len);
        let len = (data.len() + hlen) as u64;
        match admit(&c.out, len as usize, c.out_limit, c.out_max_msgs, c.policy) {
            Queued::Yes => {
                if let Some(h) = header {
                    c.out.push_bytes(&[h]);
                }
                c.out.push(data);
                self.queued += len;
                m.delivered.inc();
                if !c.in_dirty {
                    c.in_dirty = true;
                    self.dirty.push((key, c.gen));
                }
                true
            }
            Queued::Dropped => {
                m.slow_consumer_drop.inc();
                false
            }
            Queued::Disconnect => {
                m.slow_consumer_disconnect.inc();
                log::debug!(
                    "{}: slow consumer ({} bytes queued), disconnecting",
                    c.peer,
                    c.out.bytes()
                );
                self.slow_consumer(key);
                false
            }
        }
    }

    /// The `disconnect` policy: a WebSocket client gets close 1008 after
    /// what is already on the wire; anything else closes at once.
    fn slow_consumer(&mut self, key: usize) {
        if matches!(self.conns.get(key).map(|c| &c.proto), Some(Proto::Ws(_))) {
            self.own_write(key, |c, now| {
                c.ws_close(
                    wsproto::CLOSE_POLICY,
                    "slow consumer",
                    CloseReason::SlowConsumer,
                    now,
                    true,
                )
            });
        } else {
            self.close(key, CloseReason::SlowConsumer);
        }
    }

    fn read_ready(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        let mut again = Vec::new();
        for (key, gen) in ready {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.gen == gen) else {
                continue;
            };
            conn.in_ready = false;
            if self.drain_deadline.is_some() && !matches!(conn.proto, Proto::Admin(_)) {
                // Draining: only the admin API is still read (/ready).
                continue;
            }
            if let Some(closing) = conn.closing {
                // On its way out: input no longer matters, but a lingering
                // HTTP connection reads (and drops) it until the peer closes.
                if closing.shut {
                    if let Some(r) = discard_input(conn, &mut self.scratch) {
                        self.close(key, r);
                    }
                } else {
                    conn.readable = false;
                }
                continue;
            }
            let m = &self.shared.metrics[self.index];
            let mut cx = Ctx {
                core: self.index as u16,
                cfg: &self.shared.cfg,
                dir: &self.shared.directory,
                cache: &mut self.cache,
                tags: &mut self.tags,
                members: &mut self.members,
                metrics: m,
                mesh: &mut self.mesh,
                actions: &mut self.actions,
                now: self.now,
                timing: self.timing,
                all_metrics: &self.shared.metrics,
                sources: &self.shared.sources,
                draining: self.drain_deadline.is_some(),
            };
            let queued_before = conn.out.bytes();
            if let Proto::Admin(st) = &conn.proto {
                // Pipelined requests left in the buffer by an earlier read.
                if !st.pending && !st.buf.is_empty() {
                    admin::on_bytes(conn, key, &[], &mut cx);
                }
            }
            let mut close = None;
            let mut reads = 0;
            while conn.readable && conn.closing.is_none() {
                if reads == READS_PER_ITERATION {
                    conn.in_ready = true;
                    again.push((key, gen));
                    break;
                }
                reads += 1;
                match conn.stream.read_some(&mut self.scratch) {
                    Ok((0, Drain::Closed)) => {
                        close = Some(CloseReason::PeerClosed);
                        break;
                    }
                    Ok((0, _)) => conn.readable = false,
                    Ok((n, drain)) => {
                        m.bytes_in.add(n as u64);
                        // Drained: a new arrival raises a new edge, unless
                        // the peer has closed (then read on to the end).
                        if drain != Drain::More {
                            conn.readable = conn.read_closed || drain == Drain::Closed;
                        }
                        let input = &mut self.scratch[..n];
                        let r = match conn.proto {
                            Proto::Rely(_) => rely::on_bytes(conn, key, input, &mut cx),
                            Proto::Handshake(_) => {
                                ws::on_handshake_bytes(conn, key, input, &mut cx);
                                None
                            }
                            Proto::Ws(_) => {
                                ws::on_bytes(conn, key, input, &mut cx);
                                None
                            }
                            Proto::Admin(_) => {
                                admin::on_bytes(conn, key, input, &mut cx);
                                None
                            }
                            Proto::Unix(_) => source::on_unix_bytes(conn, input, &mut cx),
                            Proto::Upstream(_) => source::on_upstream_bytes(conn, input, &mut cx),
                        };
                        if let Some(r) = r {
                            close = Some(r);
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("{}: read error: {e}", conn.peer);
                        close = Some(CloseReason::IoError);
                        break;
                    }
                }
            }
            if let Some(r) = close {
                self.count_close(r);
                self.close(key, r);
                continue;
            }
            // Replies the adapter queued itself (pongs, echoes, close frames).
            self.queued += (conn.out.bytes() - queued_before) as u64;
            self.mark_dirty(key);
            self.rearm_if_earlier(key);
        }
        self.ready.extend(again);
    }

    fn count_close(&self, r: CloseReason) {
        let m = self.metrics();
        match r {
            CloseReason::Protocol => m.protocol_errors.inc(),
            CloseReason::NotLoggedIn => m.not_logged_in.inc(),
            CloseReason::Spoofed => m.spoofed_from.inc(),
            _ => {}
        }
    }

    /// Applies local actions in order (so per-pair order holds). Delivery
    /// bytes become one shared buffer for the iteration; queues hold slices
    /// of it until the flush.
    fn apply_actions(&mut self) {
        if self.actions.local.is_empty() {
            return;
        }
        let data = Arc::new(std::mem::take(&mut self.actions.data));
        let mut local = std::mem::take(&mut self.actions.local);
        for action in local.drain(..) {
            match action {
                Local::Deliver { to, start, len } => self.deliver(
                    to,
                    Chunk::Slice {
                        buf: data.clone(),
                        start,
                        len,
                    },
                ),
                Local::Fanout(f) => {
                    self.fanout(f);
                }
                Local::Kick(id) => self.kick(id),
                Local::Admin(call) => self.admin_call(call),
                Local::ToSource {
                    source,
                    text,
                    start,
                    len,
                } => {
                    let msg = &data[start as usize..(start + len) as usize];
                    self.send_upstream(source, text, msg);
                }
            }
        }
        self.actions.local = local;
        self.local_batch = Some(data);
    }

    /// After the flush no queue holds a slice, so the local buffer can be
    /// reused rather than reallocated.
    fn reclaim_local_batch(&mut self) {
        if let Some(arc) = self.local_batch.take() {
            if let Ok(mut v) = Arc::try_unwrap(arc) {
                if v.capacity() <= 4 * crate::engine::mesh::MAX_BATCH_BYTES
                    && self.actions.data.capacity() == 0
                {
                    v.clear();
                    self.actions.data = v;
                }
            }
        }
    }

    fn run_timers(&mut self) {
        self.wheel.advance(self.now, &mut self.fired);
        let fired = std::mem::take(&mut self.fired);
        for t in &fired {
            let now = self.now;
            let Some(c) = self.conns.get_mut(t.key).filter(|c| c.gen == t.gen) else {
                continue;
            };
            // The fired entry has left the wheel.
            c.timer = None;
            if c.due(&self.timing).is_some_and(|due| due <= now) {
                let queued_before = c.out.bytes();
                let close = match (&c.proto, c.closing) {
                    (_, Some(closing)) => Some(closing.reason),
                    (Proto::Rely(_), None) => {
                        log::debug!("{}: idle timeout", c.peer);
                        self.shared.metrics[self.index].idle_timeouts.inc();
                        Some(CloseReason::Idle)
                    }
                    (Proto::Admin(_), None) => Some(CloseReason::Idle),
                    (Proto::Unix(_), None) => None,
                    (Proto::Upstream(u), None) if !u.is_open() => {
                        log::warn!("source {}: connect/upgrade timed out", u.source);
                        Some(CloseReason::HandshakeTimeout)
                    }
                    (Proto::Upstream(_), None) => upstream_deadline(c, now, &self.timing),
                    (Proto::Handshake(_), None) => {
                        log::debug!("{}: WebSocket handshake timeout", c.peer);
                        self.shared.metrics[self.index].ws_handshake_timeouts.inc();
                        Some(CloseReason::HandshakeTimeout)
                    }
                    (Proto::Ws(_), None) => {
                        let r = ws::on_deadline(c, now, &self.timing);
                        match r {
                            Some(CloseReason::PingTimeout) => {
                                log::debug!("{}: ping unanswered", c.peer);
                                self.shared.metrics[self.index].ws_ping_timeouts.inc();
                            }
                            _ if c.closing.is_some_and(|x| x.reason == CloseReason::Idle) => {
                                self.shared.metrics[self.index].idle_timeouts.inc();
                            }
                            _ => {}
                        }
                        r
                    }
                };
                if let Some(r) = close {
                    self.close(t.key, r);
                    continue;
                }
                if let Some(c) = self.conns.get(t.key) {
                    self.queued += (c.out.bytes() - queued_before) as u64;
                }
                self.mark_dirty(t.key);
            }
            self.rearm_if_earlier(t.key);
        }
        self.fired = fired;
        self.fired.clear();
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &(key, gen) in &dirty {
            let Some(c) = self.conns.get_mut(key).filter(|c| c.gen == gen) else {
                continue;
            };
            c.in_dirty = false;
            if !c.writable {
                c.out.detach_slices();
                continue; // a writable event re-lists it
            }
            self.shared.metrics[self.index].flushes.inc();
            match c.out.flush_to(&mut c.stream) {
                Ok((n, status)) => {
                    self.queued -= n as u64;
                    self.shared.metrics[self.index].bytes_out.add(n as u64);
                    // TLS streams may still hold encrypted bytes.
                    let held = match std::io::Write::flush(&mut c.stream) {
                        Ok(()) => false,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                        Err(e) => {
                            log::debug!("{}: write error: {e}", c.peer);
                            self.close(key, CloseReason::IoError);
                            continue;
                        }
                    };
                    if status == Flush::WouldBlock || held {
                        c.writable = false;
                        c.out.detach_slices();
                    } else if let Some(closing) = c.closing.as_mut() {
                        // The goodbye is on the wire.
                        if closing.linger && !closing.shut {
                            closing.shut = true;
                            let _ = c.stream.shutdown(std::net::Shutdown::Write);
                            if c.readable && !c.in_ready {
                                c.in_ready = true;
                                self.ready.push((key, c.gen));
                            }
                        } else if !closing.linger {
                            let reason = closing.reason;
                            self.close(key, reason);
                        }
                    }
                }
                Err(e) => {
                    log::debug!("{}: write error: {e}", c.peer);
                    self.close(key, CloseReason::IoError);
                }
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
        self.shared.metrics[self.index]
            .queued_bytes
            .set(self.queued);
    }

    /// Closes a connection: directory cleanup (epoch-checked), timer
    /// cancelled, queued bytes forgotten, slab removal, socket drop.
    fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(mut c) = self.conns.try_remove(key) else {
            return;
        };
        self.queued -= c.out.bytes() as u64;
        if let Some((slot, _)) = c.timer {
            self.wheel.cancel(slot, key, c.gen);
        }
        if let Some(l) = c.login.take() {
            self.shared.directory.logout(&l.id, l.epoch);
        }
        match &c.proto {
            Proto::Ws(w) => {
                self.tags.remove(key, &w.tags);
                if let Some(set) = w.source.and_then(|s| self.members.ws.get_mut(s as usize)) {
                    set.remove(&key);
                }
            }
            Proto::Unix(u) => {
                if let Some(set) = self.members.unix.get_mut(u.source as usize) {
                    set.remove(&key);
                }
            }
            Proto::Upstream(u) => {
                let (source, was_open) = (u.source, u.is_open());
                self.source_down(source, was_open);
            }
            _ => {}
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        let m = &self.shared.metrics[self.index];
        m.closed.inc();
        m.connections.set(self.conns.len() as u64);
        m.queued_bytes.set(self.queued);
        log::debug!("core {}: closed {} ({reason:?})", self.index, c.peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core with no listeners, driven by hand.
    fn core(yaml: &str) -> Core {
        let cfg = Config::from_yaml(yaml, None).expect("config");
        let poll = Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), WAKER).expect("waker");
        let (inbox, rx) = Inbox::new(cfg.mesh_capacity, waker);
        let shared = Arc::new(Shared {
            directory: Directory::new(1),
            inboxes: vec![inbox].into(),
            metrics: vec![CoreMetrics::default()].into(),
            sources: Box::new([]),
            shutdown: AtomicBool::new(false),
            quiesced: AtomicUsize::new(0),
            cfg,
        });
        let setup = CoreSetup {
            index: 0,
            poll,
            rx,
            listeners: Vec::new(),
        };
        Core::new(setup, shared).expect("core")
    }

    /// A real loopback connection's server side (the client end is kept
    /// open by the caller).
    fn accepted(l: &std::net::TcpListener) -> (super::super::stream::Stream, std::net::TcpStream) {
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let s = super::super::stream::Stream::Tcp(mio::net::TcpStream::from_std(server));
        (s, client)
    }

    #[test]
    fn stale_delivery_to_a_reused_slot_is_counted() {
        let mut core = core("workers: 1\npin: false\nrely:\n  listen: []\n");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = l.local_addr().unwrap();
        let (s1, _c1) = accepted(&l);
        core.add_conn(s1, peer, ListenerKind::Rely);
        let (slot, old_gen) = core.conns.iter().map(|(k, c)| (k, c.gen)).next().unwrap();
        core.close(slot, CloseReason::PeerClosed);
        let (s2, _c2) = accepted(&l);
        core.add_conn(s2, peer, ListenerKind::Rely);
        let new_gen = core.conns.get(slot).expect("the freed slot is reused").gen;
        assert_ne!(new_gen, old_gen);
        let old = ConnId {
            core: 0,
            slot: slot as u32,
            gen: old_gen,
        };
        core.deliver(old, Chunk::Owned(b"for the old tenant".as_slice().into()));
        assert_eq!(core.metrics().dropped_dead_conn.get(), 1);
        assert!(
            core.conns[slot].out.is_empty(),
            "the new tenant got nothing"
        );
    }
}

//! `Core`: one event-loop thread. It owns its poll, listeners, connections,
//! timer wheel, scratch buffer, indexes and inbound channel; other threads
//! reach it only through [`Shared`] (mesh inboxes, directory, counters,
//! flags). It knows no protocol: a connection's stage does
//! (`adapter::Stage`), and the core only calls the stage contract and acts
//! on its [`Outcome`].
//!
//! One iteration: poll (park only if nothing is pending, after announcing it)
//! -> note readiness -> accept (capped) -> apply batches from other cores ->
//! read ready connections (budgeted; skipped under backpressure or drain) ->
//! apply this core's own batch (what the reads left for local connections,
//! in order) -> timers -> dial upstream sources -> flush dirty connections
//! (one writev run each) -> send this iteration's batches to other cores.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::adapter::upstream::UpstreamStage;
use super::adapter::{Outcome, Stage};
use super::admin_calls::{status_tail, AdminCalls, Done, Origin};
use super::channels::Channels;
use super::conn::Conn;
use super::directory::LookupCache;
use super::io::{CloseReason, Flushed, Io, Limits, Queued};
use super::listener::{ListenSock, Listener, ListenerKind};
use super::mesh::{Batch, Item, Outgoing};
use super::message::{AdminCall, FanOp, Fanout, Frames, Wire};
use super::metrics::CoreMetrics;
use super::outbox::{Chunk, Outbox};
use super::redis::{self, remote, JoinState, Redis};
use super::route::ctx;
use super::shared::Shared;
use super::stream::{Drain, Stream};
use super::tags::{Selector, TagIndex};
use super::timer::{Timer, Timing, Wheel, TICK};
use super::upstreams::Upstreams;
use super::ConnId;
use crate::config::{Config, SlowConsumer};

/// Timer wheel buckets (409.6 s per turn at 100 ms ticks): enough that a
/// slot stays short (cancel scans one) even with a million connections.
const WHEEL_SLOTS: usize = 4096;
/// Reads per connection per iteration before yielding to the others.
const READS_PER_ITERATION: usize = 4;
/// How long an accept failure (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses a
/// listener instead of spinning on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Rounds of local work per iteration (work that applying makes is
/// one round deeper: an admin reply to this core's own request).
const LOCAL_ROUNDS: usize = 4;
/// Accept failures are logged at most this often per listener.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// Poll timeout while cross-core batches wait for room.
const OVERFLOW_RETRY: Duration = Duration::from_millis(1);

/// The waker's token (registered by the server on each core's poll).
pub(crate) const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX / 2;

/// Everything a core thread needs, built before the thread starts so that
/// bind errors surface in `Server::start`.
pub(crate) struct CoreSetup {
    pub index: usize,
    /// Its poll (the waker is registered on it).
    pub poll: Poll,
    pub rx: Receiver<Batch>,
    /// Its listeners (one per configured address).
    pub listeners: Vec<(ListenerKind, ListenSock)>,
}

/// Where a connection stands after a stage call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Open,
    /// Open, but read nothing more until an answer comes.
    Await,
    Closed,
}

/// Queues shrinking by this much on one core give their memory back.
const TRIM_AFTER: u64 = 1 << 20;
/// Queues that held this much since the last trim and are now empty give
/// their memory back too.
const TRIM_DRAINED: u64 = 256 << 10;
/// No more often than this per core.
const TRIM_EVERY: Duration = Duration::from_secs(1);

fn conn_id(core: usize, slot: usize, gen: u64) -> ConnId {
    ConnId {
        core: core as u16,
        slot: slot as u32,
        gen,
    }
}

/// Marks a reply from another node (a survey answer) to an admin request,
/// in the request number's top bit: requests count up from 1 and never
/// reach it.
const REMOTE_REPLY: u64 = 1 << 63;

/// One event loop.
pub(crate) struct Core {
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
    /// Connections with unread input (key, gen).
    ready: Vec<(usize, u64)>,
    /// Connections with queued output (key, gen).
    dirty: Vec<(usize, u64)>,
    /// Outbound connections whose connect completed this iteration.
    connected: Vec<(usize, u64)>,
    wheel: Wheel,
    fired: Vec<Timer>,
    epoch: Instant,
    now: u64,
    timing: Timing,
    drain_deadline: Option<Instant>,
    /// This core has counted itself in `Shared::quiesced`.
    quiesced: bool,
    /// The drain's goodbyes are out (after every core quiesced).
    goodbyes_sent: bool,
    /// Bytes waiting in all of this core's output queues.
    queued: u64,
    /// This iteration's own batch buffer once applied; handed back to the
    /// mesh for reuse after the flush, when no queue refers to it any more.
    local_data: Option<Arc<Vec<u8>>>,
    /// Directory lookups, validated per shard version.
    cache: LookupCache,
    /// Tags of this core's WebSocket connections.
    tags: TagIndex,
    /// This core's channel members (sources' clients).
    channels: Channels,
    /// The upstream sources this core owns.
    upstreams: Upstreams,
    /// Admin requests waiting for the cores' replies.
    admin: AdminCalls,
    /// This core's Redis clients, by server (`Config::redis_server`;
    /// None: not configured, or held by core 0 only).
    redis: Vec<Option<Redis>>,
    /// Core 0 of a cluster node: the other nodes heard from, and when this
    /// node next says it is alive.
    registry: Option<(super::cluster::Registry, Instant)>,
    /// With a cluster, after its Redis came back: the next slab key whose
    /// login to claim anew (a batch per iteration, so a million logins
    /// never flood the connection's buffer).
    reclaim: Option<usize>,
    /// With a cluster: the command connection came (back) up, so the ids
    /// are to be claimed anew once this node's channel is heard.
    reclaim_due: bool,
    /// The `Shared::cluster_heard` subscription count at the last claim
    /// anew: a node channel subscribed again (kicks may have been lost
    /// meanwhile) is a reason to claim again too.
    heard_gen: u64,
    /// With a cluster: when this core next claims its logins' ids again,
    /// renewing their keys (every half `owner_ttl`).
    next_refresh: Option<Instant>,
    /// Shared permessage-deflate contexts (one compressed frame per
    /// broadcast on this core) and the buffer messages inflate into.
    codec: crate::protocol::deflate::CoreCodec,
    /// Reused buffer of selected slots.
    selected: Vec<usize>,
    /// The most bytes queued on this core since the allocator last gave
    /// freed memory back, and when it did.
    queued_high: u64,
    last_trim: Option<Instant>,
    /// The fan-outs of one selector gathered while a batch is applied,
    /// queued as one run per subscriber (empty between batches).
    run: super::fanrun::Run,
    /// Reused buffer of accepted sockets.
    accepted: Vec<(Stream, std::net::SocketAddr)>,
    /// The configuration this core runs: the one it started with until a
    /// reload hands it another (`Core::reload`). `Shared::cfg` stays the
    /// start-up one, which fixed the listeners, threads and tables.
    cfg: Arc<Config>,
    /// Every source slot's status (`Shared::sources` until a reload).
    sources: super::metrics::SourceTable,
    /// The next listener's token, less `LISTENER_BASE`.
    next_listener: usize,
    /// The events' AMQP publisher (`events.amqp`).
    amqp: Option<super::amqp::Amqp>,
}

impl Core {
    /// Builds the core; registers its listeners.
    pub(crate) fn new(setup: CoreSetup, shared: Arc<Shared>) -> io::Result<Core> {
        let cfg = &shared.cfg;
        let listeners = setup
            .listeners
            .into_iter()
            .enumerate()
            .map(|(i, (kind, sock))| Listener::register(&setup.poll, LISTENER_BASE + i, kind, sock))
            .collect::<io::Result<Vec<_>>>()?;
        let max_conns = cfg.max_connections.div_ceil(cfg.workers).max(1);
        let timing = Timing::new(cfg, TICK);
        let live = Arc::new(cfg.clone());
        let next_listener = listeners.len();
        Ok(Core {
            index: setup.index,
            poll: setup.poll,
            listeners,
            conns: Slab::with_capacity(1024.min(max_conns)),
            next_gen: 1,
            max_conns,
            scratch: vec![0u8; cfg.read_buffer].into_boxed_slice(),
            codec: crate::protocol::deflate::CoreCodec::new(cfg.ws().compression_level),
            registry: (setup.index == 0 && cfg.cluster.is_some())
                .then(|| (super::cluster::Registry::default(), Instant::now())),
            reclaim: None,
            reclaim_due: false,
            heard_gen: 0,
            next_refresh: cfg
                .cluster
                .as_ref()
                .map(|c| Instant::now() + c.owner_ttl / 2),
            rx: setup.rx,
            mesh: Outgoing::new(shared.inboxes.clone(), setup.index),
            ready: Vec::new(),
            dirty: Vec::new(),
            connected: Vec::new(),
            wheel: Wheel::new(WHEEL_SLOTS, 0),
            fired: Vec::new(),
            epoch: Instant::now(),
            now: 0,
            timing,
            drain_deadline: None,
            quiesced: false,
            goodbyes_sent: false,
            queued: 0,
            local_data: None,
            cache: LookupCache::default(),
            tags: TagIndex::default(),
            channels: Channels::default(),
            upstreams: Upstreams::new(live.clone(), shared.sources.clone(), setup.index),
            admin: AdminCalls::default(),
            redis: {
                let held: Vec<Option<Redis>> = (0..cfg.redis_server_count())
                    .map(|s| {
                        cfg.holds_redis(setup.index, s).then(|| {
                            let r = Redis::new(setup.index, s, cfg.redis_subscribes(s));
                            match &cfg.cluster {
                                Some(c) if c.server == s => r.with_cluster(
                                    redis::ClusterNames {
                                        id_prefix: c.id_channel_prefix().into(),
                                        node: c.node_channel().into(),
                                        ctl: c.ctl_channel().into(),
                                    },
                                    setup.index == 0,
                                ),
                                _ => r,
                            }
                        })
                    })
                    .collect();
                // Empty when this core talks to no Redis: the loop skips
                // every Redis step on one length check.
                if held.iter().all(Option::is_none) {
                    Vec::new()
                } else {
                    held
                }
            },
            selected: Vec::new(),
            queued_high: 0,
            last_trim: None,
            run: Default::default(),
            accepted: Vec::new(),
            cfg: live,
            sources: shared.sources.clone(),
            next_listener,
            amqp: match cfg.events.as_ref().map(|e| &e.sink) {
                Some(crate::config::EventSink::Amqp(a)) => {
                    Some(super::amqp::Amqp::new(setup.index, a))
                }
                _ => None,
            },
            shared,
        })
    }

    fn metrics(&self) -> &CoreMetrics {
        &self.shared.metrics[self.index]
    }

    /// Runs until shutdown completes.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let busy_poll = self.cfg.busy_poll;
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
            self.note_events(&events);

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
            self.apply_local();
            self.service_redis();
            self.cluster_tick(instant);
            self.run_timers();
            self.dial_upstreams(instant);
            for r in self.redis.iter_mut().flatten() {
                r.flush(&self.shared, self.poll.registry());
            }
            self.service_amqp(instant);
            self.flush_dirty();
            self.run.recycle();
            self.cut_if_over_memory();
            self.trim_if_drained(instant);
            if let Some(arc) = self.local_data.take() {
                // After the flush no queue holds a slice of it.
                if let Ok(v) = Arc::try_unwrap(arc) {
                    self.mesh.recycle_local(v, Vec::new());
                }
            }
            let waited = self.mesh.flush();
            if waited > 0 {
                self.metrics().mesh_overflow.add(waited);
            }
            // After every write of the iteration: off the path of what it
            // delivers.
            for r in self.redis.iter_mut().flatten() {
                r.read_quiet(self.poll.registry(), &self.shared);
            }
            if self.drained(instant) {
                break;
            }
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.close(k, CloseReason::Shutdown);
        }
        for r in self.redis.iter_mut().flatten() {
            r.close(self.poll.registry());
        }
        if let Some(a) = self.amqp.as_mut() {
            a.abandon(&self.shared.metrics[self.index]);
        }
        log::debug!("core {} stopped", self.index);
    }

    /// Remembers edge-triggered readiness and lists connections to read,
    /// flush or finish connecting.
    fn note_events(&mut self, events: &Events) {
        for ev in events.iter() {
            let t = ev.token();
            if t == WAKER {
                continue;
            }
            if t.0 >= redis::TOKEN_FLOOR {
                let (server, sub) = redis::of_token(t);
                if let Some(Some(r)) = self.redis.get_mut(server) {
                    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    r.on_event(sub, readable, ev.is_writable());
                }
                continue;
            }
            if t == super::amqp::TOKEN {
                if let Some(a) = self.amqp.as_mut() {
                    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                    a.on_event(readable, ev.is_writable());
                }
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
                c.io.readable = true;
                // Remembered: the FIN may arrive with the last data, and
                // no edge follows it.
                c.io.read_closed |= ev.is_read_closed() || ev.is_error();
                if !c.io.in_ready {
                    c.io.in_ready = true;
                    self.ready.push((t.0, c.gen));
                }
            }
            if ev.is_writable() {
                c.io.writable = true;
                if c.stage.awaits_connect() {
                    self.connected.push((t.0, c.gen));
                }
                // TLS may hold encrypted bytes with an empty outbox.
                let tls = matches!(c.io.stream, Stream::Tls(_));
                if (!c.io.out.is_empty() || tls) && !c.io.in_dirty {
                    c.io.in_dirty = true;
                    self.dirty.push((t.0, c.gen));
                }
            }
        }
    }

    /// While draining: true once this core may exit (every core quiet and
    /// everything flushed, or the grace period over).
    fn drained(&mut self, instant: Instant) -> bool {
        let Some(deadline) = self.drain_deadline else {
            return false;
        };
        if !self.quiesced && !self.mesh.has_pending() {
            self.quiesced = true;
            self.shared.quiesced.fetch_add(1, Ordering::SeqCst);
        }
        let all_quiet = self.shared.quiesced.load(Ordering::SeqCst) == self.cfg.workers;
        if all_quiet && self.rx.is_empty() && !self.goodbyes_sent {
            // Flushed from the next iteration on.
            self.say_goodbyes();
            return false;
        }
        // Events wait for their broker's confirms too (within the grace).
        let events = self.amqp.as_ref().is_none_or(super::amqp::Amqp::settled);
        let flushed =
            self.goodbyes_sent && all_quiet && self.rx.is_empty() && self.queued == 0 && events;
        if !flushed && instant >= deadline {
            log::warn!(
                "core {}: shutdown grace expired with {} bytes still queued",
                self.index,
                self.queued
            );
        }
        flushed || instant >= deadline
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
        let redis_ready = self.redis.iter().flatten().any(Redis::busy)
            || self.amqp.as_ref().is_some_and(super::amqp::Amqp::busy);
        if busy_poll || read_ready || accept_ready || redis_ready {
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

    /// Stops accepting and reading; each stage says goodbye its own way
    /// (WebSocket clients get a close 1001 that the drain waits to flush;
    /// unfinished upgrades just close).
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
        self.drain_deadline = Some(now + self.cfg.shutdown_grace);
        if self.registry.is_some() {
            // The other nodes stop waiting for this one at once.
            if let Some(c) = self.cfg.cluster.clone() {
                let words = format!("bye|{}", c.node_id);
                self.cluster_publish(&c.ctl_channel(), words.as_bytes());
            }
        }
        // The goodbyes (WebSocket 1001, closing unfinished upgrades) wait
        // until no core will send anything more (`drained`): a broadcast
        // read by another core just before the drain must still reach our
        // clients, not find them closing.
    }

    /// Every core has stopped sending and our inbox is applied: say
    /// goodbye the way each stage does.
    fn say_goodbyes(&mut self) {
        self.goodbyes_sent = true;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.act(key, |s, io, _, cx| s.on_drain(io, cx.now()));
        }
    }

    fn accept(&mut self, now: Instant) {
        let mut accepted = std::mem::take(&mut self.accepted);
        for li in 0..self.listeners.len() {
            let l = &mut self.listeners[li];
            let kind = l.kind;
            let failed = l.accept_batch(self.cfg.accept_batch, now, ACCEPT_PAUSE, &mut accepted);
            if let Some(e) = failed {
                self.metrics().accept_errors.inc();
                // At the file limit this repeats every pause: warn at most
                // once per ACCEPT_WARN_EVERY per listener, with the count.
                let l = &mut self.listeners[li];
                l.failures_unlogged += 1;
                if l.warned
                    .is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY)
                {
                    log::warn!(
                        "core {}: accept on {} failed: {e} ({} times since the last warning); pausing {ACCEPT_PAUSE:?} each time",
                        self.index,
                        l.addr,
                        l.failures_unlogged,
                    );
                    l.warned = Some(now);
                    l.failures_unlogged = 0;
                }
            }
            for (stream, peer) in accepted.drain(..) {
                self.add_conn(stream, peer, kind);
            }
        }
        self.accepted = accepted;
    }

    fn add_conn(&mut self, stream: Stream, peer: std::net::SocketAddr, kind: ListenerKind) {
        if self.over_memory() {
            self.metrics().rejected_memory.inc();
            log::debug!("core {}: over max_memory, refusing {peer}", self.index);
            return;
        }
        if self.conns.len() >= self.max_conns {
            self.metrics().rejected_limit.inc();
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
        // A listener with `tls:` serves TLS: the handshake runs inside the
        // stream as bytes arrive; the stage sees plaintext only.
        let cfg = &self.cfg;
        let tls = match kind {
            ListenerKind::Rely => cfg.rely.tls.as_ref(),
            ListenerKind::WebSocket => cfg.websocket.as_ref().and_then(|w| w.tls.as_ref()),
            ListenerKind::Admin => cfg.admin.as_ref().and_then(|a| a.tls.as_ref()),
            ListenerKind::Veltix(i) => cfg.veltix.get(i as usize).and_then(|v| v.tls.as_ref()),
            _ => None,
        };
        let stream = match (stream, tls) {
            (Stream::Tcp(tcp), Some(t)) => match rustls::ServerConnection::new(t.config.clone()) {
                Ok(c) => Stream::Tls(Box::new(super::stream::TlsStream {
                    tcp,
                    tls: rustls::Connection::Server(c),
                })),
                Err(e) => {
                    self.metrics().tls_errors.inc();
                    log::debug!("{peer}: TLS setup failed: {e}");
                    return;
                }
            },
            (s, _) => s,
        };
        let (stage, limits) = Stage::accepted(kind, &self.cfg, &self.timing, self.now);
        let proto = stage.name();
        if let Some(id) = self.insert(stream, peer, stage, limits, true) {
            let m = self.metrics();
            m.accepted.inc();
            m.connections.set(self.conns.len() as u64);
            log::debug!(
                "accepted conn={}:{}:{} peer={peer} proto={proto}",
                id.core,
                id.slot,
                id.gen
            );
        }
    }

    /// Registers a connection, arms its first deadline and lets its stage
    /// join what it belongs to.
    fn insert(
        &mut self,
        mut stream: Stream,
        peer: std::net::SocketAddr,
        stage: Stage,
        limits: Limits,
        writable: bool,
    ) -> Option<ConnId> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("{peer}: register failed: {e}");
            return None;
        }
        let gen = self.next_gen;
        self.next_gen += 1;
        let mut io = Io::new(stream, peer, self.now);
        io.set_limits(limits);
        io.writable = writable;
        let mut conn = Conn::new(gen, io, stage);
        if let Some(due) = conn.due(&self.timing) {
            conn.set_timer(Some((self.wheel.arm(Timer { due, key, gen }), due)));
        }
        entry.insert(conn);
        // It may be refused at once (a full Veltix listener): still counted
        // as accepted, then closed.
        self.act(key, |s, io, me, cx| s.on_open(io, me, cx));
        Some(conn_id(self.index, key, gen))
    }

    /// Calls a stage (with its `Io` and a `Ctx`) and acts on the outcome.
    fn act(
        &mut self,
        key: usize,
        f: impl FnOnce(&mut Stage, &mut Io, ConnId, &mut super::route::Ctx<'_>) -> Outcome,
    ) -> Step {
        let Some(c) = self.conns.get_mut(key) else {
            return Step::Closed;
        };
        let me = conn_id(self.index, key, c.gen);
        let before = c.io.out.bytes();
        let out = f(&mut c.stage, &mut c.io, me, &mut ctx!(self));
        self.conclude(key, out, before)
    }

    /// Acts on a stage's outcome: keeps the queued-bytes account, the flush
    /// list and the timer in step with what the stage queued (`before`: its
    /// queue's bytes before the call); closes; or installs the next stage
    /// and feeds it what followed (bounded: each upgrade consumes a stage).
    fn conclude(&mut self, key: usize, mut out: Outcome, mut before: usize) -> Step {
        loop {
            let Some(c) = self.conns.get_mut(key) else {
                return Step::Closed;
            };
            let after = c.io.out.bytes();
            self.queued = self.queued - before as u64 + after as u64;
            before = after;
            match out {
                Outcome::Upgrade(stage, mut rest) => {
                    c.stage = stage;
                    if rest.is_empty() {
                        out = Outcome::Continue;
                        continue;
                    }
                    let me = conn_id(self.index, key, c.gen);
                    out = c.stage.on_bytes(&mut c.io, me, &mut rest, &mut ctx!(self));
                }
                Outcome::Close(reason) => {
                    self.close(key, reason);
                    return Step::Closed;
                }
                Outcome::Continue | Outcome::Await => {
                    let step = if matches!(out, Outcome::Await) {
                        Step::Await
                    } else {
                        Step::Open
                    };
                    self.mark_dirty(key);
                    self.rearm_if_earlier(key);
                    return step;
                }
            }
        }
    }

    /// Lists a connection for this iteration's flush.
    fn mark_dirty(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.io.in_dirty && !c.io.out.is_empty() {
                c.io.in_dirty = true;
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
        if let Some((slot, armed)) = c.timer() {
            if armed <= due {
                return;
            }
            self.wheel.cancel(slot, key, c.gen);
        }
        let gen = c.gen;
        c.set_timer(Some((self.wheel.arm(Timer { due, key, gen }), due)));
    }

    /// Applies the batches other cores sent (bounded: at most what was in
    /// the channel when we started).
    fn drain_inbox(&mut self) {
        for _ in 0..self.rx.len() {
            let Ok(mut batch) = self.rx.try_recv() else {
                break;
            };
            if let Some(r) = batch.reload.take() {
                self.reload(*r);
            }
            self.apply(batch);
        }
    }

    /// Takes a reloaded configuration: new connections follow it at once,
    /// and the connections already open take its output limits (a lowered
    /// limit applies at their next queued message; the slow-consumer
    /// policy decides as it always does). One pass over this core's slab,
    /// once per reload.
    ///
    /// Sources: a retired source's listeners close here and its
    /// connections (feed, clients, upgrades on its listener) say goodbye
    /// (WebSocket clients get 1001); an added source's listeners register,
    /// and its owner core dials it; a source in `redial` has its feed
    /// closed and dialled again at once, its clients staying.
    fn reload(&mut self, r: super::mesh::Reload) {
        self.cfg = r.cfg;
        self.sources = r.sources;
        self.timing = Timing::new(&self.cfg, TICK);
        self.max_conns = self.cfg.max_connections.div_ceil(self.cfg.workers).max(1);
        for (_, c) in self.conns.iter_mut() {
            if let Some(l) = c.stage.limits(&self.cfg, c.io.limits()) {
                c.io.set_limits(l);
            }
        }
        let cfg = self.cfg.clone();
        let retired = |s: u16| cfg.sources.get(s as usize).is_none_or(|s| s.retired);
        let poll = &self.poll;
        self.listeners.retain_mut(|l| match l.kind {
            ListenerKind::SourceWs(s) | ListenerKind::SourceUnix(s) if retired(s) => {
                let _ = poll.registry().deregister(&mut l.sock);
                false
            }
            _ => true,
        });
        // A draining core accepts nothing more: the new sockets just close.
        if self.drain_deadline.is_none() {
            for (kind, sock) in r.listeners {
                let token = LISTENER_BASE + self.next_listener;
                self.next_listener += 1;
                match Listener::register(&self.poll, token, kind, sock) {
                    Ok(l) => self.listeners.push(l),
                    Err(e) => log::error!("core {}: cannot listen for a source: {e}", self.index),
                }
            }
        }
        let doomed: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.stage.source().is_some_and(retired))
            .map(|(k, _)| k)
            .collect();
        for key in doomed {
            self.act(key, |s, io, _, cx| {
                s.goodbye(io, CloseReason::SourceRemoved, cx.now())
            });
        }
        let redial = self
            .upstreams
            .reload(cfg.clone(), self.sources.clone(), &r.redial);
        for id in redial {
            if self.live(id) {
                self.act(id.slot as usize, |_, _, _, _| {
                    Outcome::Close(CloseReason::Reconfigured)
                });
            }
        }
        log::debug!("core {}: configuration reloaded", self.index);
    }

    /// Applies this iteration's own batch: what this core's reads left for
    /// its own connections, in order. Its buffers go back to the mesh for
    /// the next iteration (the data once the flush no longer needs it).
    /// Applying can leave more local work (a fan-out's reply to this
    /// core's own admin request): taken in the same iteration, in rounds.
    fn apply_local(&mut self) {
        for _ in 0..LOCAL_ROUNDS {
            let batch = self.mesh.take_local();
            if batch.items.is_empty() {
                self.mesh.recycle_local(batch.data, batch.items);
                return;
            }
            let (data, items) = self.apply(batch);
            self.mesh.recycle_local(Vec::new(), items);
            // Kept until after the flush; an earlier round's buffer is
            // simply dropped (queues still holding its slices keep it).
            self.local_data = Some(data);
        }
    }

    /// Applies one batch in order. Delivery bytes stay in the batch's one
    /// buffer; queues hold slices of it until the flush. Returns the buffer
    /// and the (emptied) item list, for reuse.
    fn apply(&mut self, batch: Batch) -> (Arc<Vec<u8>>, Vec<Item>) {
        let Batch {
            data,
            mut items,
            fanouts,
            ..
        } = batch;
        let data = Arc::new(data);
        let mut fanouts = fanouts.into_iter();
        for &item in &items {
            if !matches!(item, Item::Fanout) {
                // Whatever else the batch says comes after the run so far.
                self.end_run();
            }
            match item {
                Item::Deliver { to, start, len } => self.deliver(
                    to,
                    Chunk::Slice {
                        buf: data.clone(),
                        start,
                        len,
                    },
                ),
                Item::Kick { conn, epoch } => self.kick(conn, epoch),
                Item::Fanout => {
                    if let Some(f) = fanouts.next() {
                        self.gather(f);
                    }
                }
                Item::ToSource {
                    source,
                    text,
                    start,
                    len,
                } => {
                    self.write_upstream(source, text, &data[start as usize..(start + len) as usize])
                }
                Item::Reply {
                    req,
                    count,
                    start,
                    len,
                } => self.reply(req, count, &data[start as usize..(start + len) as usize]),
                Item::Redis { conn, start, len } => {
                    let d = data.clone();
                    let bytes = d
                        .get(start as usize..(start + len) as usize)
                        .unwrap_or_default();
                    self.redis_item(conn, bytes);
                }
            }
        }
        self.end_run();
        items.clear();
        (data, items)
    }

    /// Adds a fan-out to the run being gathered, or runs it alone (ending
    /// the run first: order is kept across fan-outs).
    fn gather(&mut self, f: Fanout) {
        if !super::fanrun::joinable(&f) {
            self.end_run();
            self.fanout(f);
            return;
        }
        if let Err(f) = self.run.add(f) {
            self.end_run();
            if let Err(f) = self.run.add(f) {
                self.fanout(f);
            }
        }
    }

    /// Queues the run gathered so far on its subscribers.
    fn end_run(&mut self) {
        match self.run.msgs.len() {
            0 => {}
            1 => {
                if let Some(f) = self.run.msgs.pop() {
                    self.run.finish();
                    self.fanout(f);
                }
            }
            _ => {
                let mut run = std::mem::take(&mut self.run);
                self.fanout_run(&mut run);
                run.finish();
                self.run = run;
            }
        }
    }

    fn live(&self, id: ConnId) -> bool {
        debug_assert_eq!(id.core as usize, self.index);
        self.conns
            .get(id.slot as usize)
            .is_some_and(|c| c.gen == id.gen)
    }

    /// Last login wins: the older connection goes, with its stage's
    /// goodbye, if it still holds the login (`epoch`) that was replaced. A
    /// connection that logged in again since is the newest holder, and a
    /// kick for its old login must not remove it (else two racing
    /// connections could kick each other and leave the id to nobody).
    fn kick(&mut self, id: ConnId, epoch: u64) {
        let holds = self.conns.get(id.slot as usize).is_some_and(|c| {
            c.gen == id.gen && c.io.login.as_ref().is_some_and(|l| l.epoch() == epoch)
        });
        if !holds {
            return;
        }
        self.metrics().kicked_login.inc();
        self.act(id.slot as usize, |s, io, _, cx| {
            s.goodbye(io, CloseReason::Kicked, cx.now())
        });
    }

    /// Delivers a RELY transfer frame, wrapped for the holder's wire (as it
    /// is to a RELY client, as a binary message to a WebSocket client).
    fn deliver(&mut self, to: ConnId, data: Chunk) {
        let key = to.slot as usize;
        let wire = match self.conns.get(key) {
            Some(c) if c.gen == to.gen && c.io.closing.is_none() => c.stage.transfer_wire(),
            _ => {
                self.metrics().dropped_dead_conn.inc();
                return;
            }
        };
        // The header goes on the stack: this runs per message.
        let (h, n) = wire.map_or(([0; 10], 0), |w| w.binary_header(data.len()));
        self.queue_on(key, n + data.len(), 1, |out| {
            if n > 0 {
                out.push_bytes(&[&h[..n]]);
            }
            out.push(data);
        });
    }

    /// Queues `msgs` messages of `len` bytes in all on a live connection
    /// (`push` puts them in the queue) under its limits, applying the
    /// slow-consumer policy to them as one. Returns whether they were
    /// queued.
    #[inline]
    fn queue_on(
        &mut self,
        key: usize,
        len: usize,
        msgs: u64,
        push: impl FnOnce(&mut Outbox),
    ) -> bool {
        let m = &self.shared.metrics[self.index];
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        match c.io.admit(len) {
            Queued::Yes => {
                push(&mut c.io.out);
                self.queued += len as u64;
                m.delivered.add(msgs);
                if !c.io.in_dirty {
                    c.io.in_dirty = true;
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
                    c.io.peer(),
                    c.io.out.bytes()
                );
                self.act(key, |s, io, _, cx| {
                    s.goodbye(io, CloseReason::SlowConsumer, cx.now())
                });
                false
            }
        }
    }

    /// Counts a shared compressed frame queued on `slot` in its endpoint's
    /// permessage-deflate row.
    fn count_deflated(&self, slot: usize, plain: usize, wire: usize) {
        let Some(Stage::Ws(w)) = self.conns.get(slot).map(|c| &c.stage) else {
            return;
        };
        let row = w.row(self.cfg.ws().endpoints.len());
        if let Some(s) = self.shared.deflate_of(self.index).get(row) {
            s.out_plain.add(plain as u64);
            s.out_wire.add(wire as u64);
        }
    }

    /// Runs a fan-out on every local connection it selects, each getting
    /// the message framed for its own wire (once per wire on this core),
    /// and reports the count (and status text) to its reply address.
    fn fanout(&mut self, f: Fanout) {
        let mut slots = std::mem::take(&mut self.selected);
        self.select(&f.selector, &mut slots);
        let min_deflate = self.cfg.ws().compression_min_size;
        let mut frames = f
            .msg
            .as_ref()
            .map(|m| Frames::new(m, f.force_binary, min_deflate));
        let (mut n, mut text) = (0, Vec::new());
        for &slot in &slots {
            let Some(c) = self.conns.get_mut(slot) else {
                continue;
            };
            let id = conn_id(self.index, slot, c.gen);
            if Some(id) == f.exclude || c.io.closing.is_some() {
                continue;
            }
            let touched = match &f.op {
                FanOp::Send | FanOp::Close => {
                    let Some(wire) = c.stage.wire() else {
                        continue;
                    };
                    if let (Some(m), Wire::WsOwn) = (&f.msg, wire) {
                        let queued = self.queue_own(slot, m, f.force_binary);
                        if matches!(f.op, FanOp::Send) && !queued {
                            continue;
                        }
                    } else if let Some(fr) = frames.as_mut() {
                        let fr = fr.get(wire, &mut self.codec);
                        let len = fr.len();
                        let queued = self.queue_on(slot, len, 1, |out| fr.push_to(out));
                        if matches!(f.op, FanOp::Send) && !queued {
                            continue;
                        }
                        let work = frames.as_ref().and_then(|f| f.work());
                        if let (Wire::WsDeflate, Some((plain, _))) = (wire, work) {
                            self.count_deflated(slot, plain, len);
                        }
                    }
                    if matches!(f.op, FanOp::Close) {
                        self.act(slot, |s, io, _, cx| {
                            s.goodbye(io, CloseReason::Closed, cx.now())
                        });
                    }
                    true
                }
                op => c
                    .stage
                    .admin_op(&mut c.io, id, op, &mut ctx!(self), &mut text),
            };
            n += u64::from(touched);
        }
        if matches!(f.op, FanOp::Send | FanOp::Close) {
            self.metrics().fanout_deliveries.add(n);
        }
        if let Some((plain, z)) = frames.as_ref().and_then(|f| f.work()) {
            // Once per core per message, however many took it.
            let m = self.metrics();
            m.ws_compressor_input_bytes.add(plain as u64);
            m.ws_compressor_output_bytes.add(z as u64);
        }
        self.selected = slots;
        if let Some(r) = f.reply {
            self.mesh.reply(r.core as usize, r.req, n, &text);
        }
    }

    /// The slots on this core that `sel` selects, into `slots`.
    fn select(&mut self, sel: &Selector, slots: &mut Vec<usize>) {
        slots.clear();
        match sel {
            Selector::Tags(want) => self.tags.select(want, slots),
            Selector::Ids(ids) => {
                for id in ids {
                    if let Some(c) = self.cache.lookup(&self.shared.directory, id.as_bytes()) {
                        if c.core as usize == self.index {
                            slots.push(c.slot as usize);
                        }
                    }
                }
            }
            Selector::All => slots.extend(self.conns.iter().map(|(k, _)| k)),
            Selector::Channel(ch) => self.channels.select(*ch, slots),
        }
    }

    /// Queues `m` on `slot` compressed through the connection's own
    /// context (permessage-deflate `dedicated`). Returns whether it was
    /// queued.
    fn queue_own(&mut self, slot: usize, m: &super::message::Message, force_binary: bool) -> bool {
        let mut frame = Vec::new();
        self.act(slot, |s, _, _, cx| {
            frame = s.own_frame(m, force_binary, cx);
            Outcome::Continue
        });
        // Its own bytes: queued as they are, not copied (shrunk in place: a
        // compressed frame is smaller than the room made for it, and queues
        // count length).
        frame.shrink_to_fit();
        let len = frame.len();
        self.queue_on(slot, len, 1, |out| out.push(Chunk::Buf(frame)))
    }

    /// Queues a run of sends to one selector: each subscriber gets the
    /// stretches of the run's frames it may see (all but its own messages)
    /// as one reference each, admitted as one unless the `drop` policy
    /// must choose message by message. Connections that count messages
    /// (Veylor's `max_queue_size`) get one reference per message, and
    /// `dedicated` compressors frame each message themselves.
    fn fanout_run(&mut self, run: &mut super::fanrun::Run) {
        let mut slots = std::mem::take(&mut self.selected);
        self.select(&run.msgs[0].selector, &mut slots);
        run.prepare(self.index);
        let k = run.msgs.len();
        let min_deflate = self.cfg.ws().compression_min_size;
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut n = 0u64;
        for &slot in &slots {
            let Some(c) = self.conns.get(slot) else {
                continue;
            };
            if c.io.closing.is_some() {
                continue;
            }
            let Some(wire) = c.stage.wire() else {
                continue;
            };
            let id = conn_id(self.index, slot, c.gen);
            let counts_msgs = c.io.limits().msgs != u32::MAX;
            spans.clear();
            super::fanrun::stretches(k, run.skips_of(id), |a, b| spans.push((a, b)));
            if wire == Wire::WsOwn {
                for &(a, b) in &spans {
                    for f in &run.msgs[a..b] {
                        let live = self.conns.get(slot).is_some_and(|c| c.io.closing.is_none());
                        if let (true, Some(m)) = (live, &f.msg) {
                            n += u64::from(self.queue_own(slot, m, f.force_binary));
                        }
                    }
                }
                continue;
            }
            run.frame(
                wire,
                min_deflate,
                &mut self.codec,
                &self.shared.metrics[self.index],
            );
            let Some(fr) = run.framed(wire) else {
                continue;
            };
            for &(a, b) in &spans {
                let Some(c) = self.conns.get(slot) else {
                    break;
                };
                let (_, len) = fr.span(a, b);
                // All of it fits: admitting it as one decides as admitting
                // each would. Else each is decided on its own, as the
                // policy says (an empty queue takes any one message).
                let whole = !counts_msgs && c.io.out.bytes() + len as usize <= c.io.limits().bytes;
                if whole {
                    n += self.queue_frames(slot, fr, a, b);
                } else {
                    for i in a..b {
                        n += self.queue_frames(slot, fr, i, i + 1);
                    }
                }
            }
        }
        self.metrics().fanout_deliveries.add(n);
        self.selected = slots;
    }

    /// Queues frames `a..b` of a run on `slot` by reference, unless it is
    /// closing. Returns the messages queued.
    fn queue_frames(
        &mut self,
        slot: usize,
        fr: &super::fanrun::RunFrames,
        a: usize,
        b: usize,
    ) -> u64 {
        if self.conns.get(slot).is_none_or(|c| c.io.closing.is_some()) {
            return 0;
        }
        let (start, len) = fr.span(a, b);
        let slice = Chunk::Slice {
            buf: fr.buf.clone(),
            start,
            len,
        };
        let msgs = (b - a) as u64;
        if !self.queue_on(slot, len as usize, msgs, |out| out.push(slice)) {
            return 0;
        }
        if let Some((plain, z)) = fr.compressed(a, b) {
            self.count_deflated(slot, plain as usize, z as usize);
        }
        msgs
    }

    /// A client message for a source this core owns: written upstream in
    /// order if the source is open, else dropped and counted.
    fn write_upstream(&mut self, source: u16, text: bool, msg: &[u8]) {
        if let Some(id) = self.upstreams.conn(source).filter(|id| self.live(*id)) {
            let key = id.slot as usize;
            let mut sent = false;
            self.act(key, |s, io, _, _| {
                sent = s.send_upstream(io, text, msg);
                Outcome::Continue
            });
            if sent {
                self.metrics().source_out.inc();
                if let Some(st) = self.sources.get(source as usize) {
                    st.messages_out.inc();
                }
                return;
            }
        }
        self.upstreams.dropped(source, &self.shared);
    }

    /// A core's (or, flagged [`REMOTE_REPLY`], another node's) answer to an
    /// admin request this core started.
    fn reply(&mut self, req: u64, count: u64, text: &[u8]) {
        let (shared, cfg, sources) = (&self.shared, &self.cfg, &self.sources);
        let tail = |out: &mut Vec<u8>, json| status_tail(out, json, shared, cfg, sources);
        let done = if req & REMOTE_REPLY != 0 {
            self.admin.on_remote(req & !REMOTE_REPLY, count, text, tail)
        } else {
            self.admin.on_reply(req, count, text, tail)
        };
        if let Some(d) = done {
            self.admin_done(d);
        }
    }

    /// A finished admin call: the answer goes to the admin connection,
    /// which may then read its next request, or (another node's survey)
    /// back to the node that asked.
    fn admin_done(&mut self, done: Done) {
        let (conn, answer) = match done {
            Done::Conn(c, a) => (c, a),
            Done::Survey(o, count, text) => {
                let text = match &self.cfg.cluster {
                    Some(c) if !text.is_empty() => super::cluster::cap_status(
                        super::cluster::label(&text, &c.node_id),
                        c.max_message_size.saturating_sub(64),
                    ),
                    _ => text,
                };
                self.cluster_publish(
                    format!("{}{}", self.cluster_node_prefix(), o.node).as_bytes(),
                    &super::cluster::answer(o.core, o.req, count, &text),
                );
                return;
            }
        };
        if !self.live(conn) {
            return;
        }
        let key = conn.slot as usize;
        if self.act(key, |s, io, _, cx| s.on_answer(io, answer, cx.now())) == Step::Open {
            if let Some(c) = self.conns.get_mut(key) {
                // Pipelined requests wait in its buffer or its socket.
                if !c.io.in_ready {
                    c.io.in_ready = true;
                    self.ready.push((key, c.gen));
                }
            }
        }
    }

    fn read_ready(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        let mut again = Vec::new();
        for (key, gen) in ready {
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.gen == gen) else {
                continue;
            };
            conn.io.in_ready = false;
            if self.drain_deadline.is_some() && !conn.stage.reads_while_draining() {
                continue;
            }
            if let Some(closing) = conn.io.closing {
                // On its way out: input no longer matters, but a lingering
                // HTTP connection reads (and drops) it until the peer closes.
                if closing.shut {
                    if let Some(r) = conn
                        .io
                        .discard_input(&mut self.scratch, READS_PER_ITERATION)
                    {
                        self.close(key, r);
                    }
                } else {
                    conn.io.readable = false;
                }
                continue;
            }
            if conn.stage.wants_resume()
                && self.act(key, |s, io, me, cx| s.resume(io, me, cx)) != Step::Open
            {
                continue;
            }
            let mut reads = 0;
            while let Some(conn) = self.conns.get_mut(key) {
                if !conn.io.readable || conn.io.closing.is_some() {
                    break;
                }
                if reads == READS_PER_ITERATION {
                    conn.io.in_ready = true;
                    again.push((key, gen));
                    break;
                }
                reads += 1;
                match conn.io.stream.read_some(&mut self.scratch) {
                    Ok((0, Drain::Closed)) => {
                        self.close(key, CloseReason::PeerClosed);
                        break;
                    }
                    Ok((0, _)) => conn.io.readable = false,
                    Ok((n, drain)) => {
                        self.shared.metrics[self.index].bytes_in.add(n as u64);
                        // Drained: a new arrival raises a new edge, unless
                        // the peer has closed (then read on to the end).
                        if drain != Drain::More {
                            conn.io.readable = conn.io.read_closed || drain == Drain::Closed;
                        }
                        let me = conn_id(self.index, key, gen);
                        let before = conn.io.out.bytes();
                        let input = &mut self.scratch[..n];
                        let out = conn
                            .stage
                            .on_bytes(&mut conn.io, me, input, &mut ctx!(self));
                        if self.conclude(key, out, before) != Step::Open {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if matches!(conn.io.stream, Stream::Tls(_))
                            && e.kind() == io::ErrorKind::InvalidData
                        {
                            // A bad handshake or record (plain HTTP on a TLS
                            // port, an unknown CA at the client, ...).
                            self.shared.metrics[self.index].tls_errors.inc();
                        }
                        log::debug!("{}: read error: {e}", conn.io.peer());
                        self.close(key, CloseReason::IoError);
                        break;
                    }
                }
            }
        }
        self.ready.extend(again);
    }

    fn run_timers(&mut self) {
        self.wheel.advance(self.now, &mut self.fired);
        let fired = std::mem::take(&mut self.fired);
        for t in &fired {
            let Some(c) = self.conns.get_mut(t.key).filter(|c| c.gen == t.gen) else {
                continue;
            };
            // The fired entry has left the wheel.
            c.set_timer(None);
            if c.due(&self.timing).is_some_and(|due| due <= self.now) {
                if let Some(closing) = c.io.closing {
                    self.close(t.key, closing.reason);
                    continue;
                }
                if c.write_deadline(&self.timing)
                    .is_some_and(|w| w <= self.now)
                {
                    log::debug!("{}: took none of its output in send_timeout", c.io.peer());
                    self.metrics().write_timeouts.inc();
                    self.close(t.key, CloseReason::WriteTimeout);
                    continue;
                }
                if self.act(t.key, |s, io, me, cx| s.on_deadline(io, me, cx)) == Step::Closed {
                    continue;
                }
            }
            self.rearm_if_earlier(t.key);
        }
        self.fired = fired;
        self.fired.clear();
    }

    /// Redis: connects, replies and channel messages. Replies and
    /// subscription confirmations go to the connections that asked (on
    /// this core, or through the mesh when this core holds Redis for the
    /// others); a channel message reaches the channel's members as a
    /// fan-out on this core and on each other core with members (framed
    /// once per core, under each member's limits).
    /// The AMQP publisher: after the reads (this iteration's events are
    /// queued), its socket driven and written once.
    fn service_amqp(&mut self, now: Instant) {
        let (Some(a), Some(crate::config::EventSink::Amqp(cfg))) = (
            self.amqp.as_mut(),
            self.cfg.events.as_ref().map(|e| &e.sink),
        ) else {
            return;
        };
        a.service(cfg, self.poll.registry(), &self.shared, now);
        a.flush(cfg, &self.shared, self.poll.registry());
        self.shared.metrics[self.index]
            .amqp_up
            .set(u64::from(a.up()));
    }

    fn service_redis(&mut self) {
        if self.redis.is_empty() {
            return;
        }
        let (mut cmd_up, mut sub_up, mut in_flight) = (0, 0, 0);
        for server in 0..self.redis.len() {
            let Some(r) = self.redis[server].as_mut() else {
                continue;
            };
            r.service(self.poll.registry(), &self.shared);
            let (c, s) = r.ready();
            cmd_up += u64::from(c);
            sub_up += u64::from(s);
            in_flight += r.in_flight() as u64;
            let events = r.take_events();
            self.redis_events(server, events);
        }
        let m = self.metrics();
        m.redis_cmd_up.set(cmd_up);
        m.redis_sub_up.set(sub_up);
        m.redis_in_flight.set(in_flight);
    }

    /// `{p}:node:` of the cluster (empty without one).
    fn cluster_node_prefix(&self) -> String {
        self.shared
            .cfg
            .cluster
            .as_ref()
            .map_or(String::new(), |c| c.node_channel_prefix())
    }

    /// PUBLISHes `words` on `channel` through this core's cluster Redis
    /// (dropped and counted while it is away).
    fn cluster_publish(&mut self, channel: &[u8], words: &[u8]) {
        let Some(c) = &self.cfg.cluster else {
            return;
        };
        let m = &self.shared.metrics[self.index];
        if let (Some(Some(r)), Some(rc)) = (
            self.redis.get_mut(c.server),
            self.cfg.redis_server(c.server),
        ) {
            r.send(rc, m, &[b"PUBLISH", channel, words]);
        }
    }

    /// Once per iteration with a cluster: admin calls that waited long
    /// enough for the other nodes answer with what came; core 0 says this
    /// node is alive every `ping_interval` and forgets silent nodes.
    fn cluster_tick(&mut self, now: Instant) {
        if self.admin.awaits_nodes() {
            let (shared, cfg, sources) = (&self.shared, &self.cfg, &self.sources);
            let tail = |out: &mut Vec<u8>, json| status_tail(out, json, shared, cfg, sources);
            let done = self.admin.expire(now, tail);
            self.metrics()
                .cluster_survey_timeouts
                .add(done.len() as u64);
            for d in done {
                self.admin_done(d);
            }
        }
        if let (Some(t), Some(c)) = (self.next_refresh, &self.cfg.cluster) {
            if now >= t {
                self.next_refresh = Some(now + c.owner_ttl / 2);
                self.reclaim.get_or_insert(0);
            }
        }
        self.cluster_reclaim();
        if let Some(from) = self.reclaim.take() {
            self.reclaim_batch(from);
        }
        // Core 0, once per ping_interval (not per iteration): say this
        // node is alive and forget the silent ones.
        let (Some((reg, next)), Some(c)) = (self.registry.as_mut(), &self.cfg.cluster) else {
            return;
        };
        if now < *next {
            return;
        }
        *next = now + c.ping_interval;
        let changed = reg.expire(now.checked_sub(c.node_expiry).unwrap_or(now));
        let (channel, words) = (c.ctl_channel(), format!("ping|{}", c.node_id));
        if changed {
            self.publish_nodes();
        }
        self.cluster_publish(&channel, words.as_bytes());
    }

    /// Starts claiming this core's ids anew after Redis came back, but only
    /// once this node's channel is subscribed again: a claim that displaces
    /// a login here (or finds a newer one elsewhere) tells this node on
    /// that channel, and a kick published before it is heard would leave
    /// the id held on two nodes. The core holding the channel publishes
    /// whether it is heard; every core claims when it is, after its own
    /// command connection came up or the channel was subscribed anew.
    fn cluster_reclaim(&mut self) {
        let Some(c) = &self.cfg.cluster else {
            return;
        };
        let Some(Some(r)) = self.redis.get(c.server) else {
            return;
        };
        let heard = &self.shared.cluster_heard;
        if let Some(now_heard) = r.node_heard() {
            let v = heard.load(Ordering::Acquire);
            if now_heard != (v & 1 == 1) {
                let next = if now_heard {
                    ((v >> 1) + 1) << 1 | 1
                } else {
                    v & !1
                };
                heard.store(next, Ordering::Release);
            }
        }
        let v = heard.load(Ordering::Acquire);
        if v & 1 == 0 || !r.ready().0 {
            return;
        }
        if self.reclaim_due || v >> 1 != self.heard_gen {
            self.reclaim_due = false;
            self.heard_gen = v >> 1;
            self.reclaim.get_or_insert(0);
        }
    }

    /// Claims anew the ids of up to `RECLAIM_BATCH` logins from slab key
    /// `from` on; the rest next iteration.
    fn reclaim_batch(&mut self, from: usize) {
        const RECLAIM_BATCH: usize = 1024;
        let mut batch = Vec::new();
        let mut next = None;
        // By key, not by the slab's iterator: each batch costs its own
        // length, not a walk from the start.
        for k in from..self.conns.capacity() {
            if batch.len() == RECLAIM_BATCH {
                next = Some(k);
                break;
            }
            let Some(c) = self.conns.get(k) else {
                continue;
            };
            if let (Some(l), None) = (&c.io.login, c.io.closing) {
                batch.push(l.clone());
            }
        }
        let mut cx = ctx!(self);
        for l in &batch {
            cx.claim(l.id(), l.epoch(), true);
        }
        self.reclaim = next;
    }

    /// Core 0's registry, for the admin calls of every core.
    fn publish_nodes(&self) {
        let Some((reg, _)) = &self.registry else {
            return;
        };
        let names = reg.names();
        self.shared
            .cluster_known
            .store(names.len(), Ordering::Relaxed);
        if let Ok(mut n) = self.shared.cluster_nodes.lock() {
            *n = names;
        }
    }

    /// Words from another node (its pings and surveys on the control
    /// channel; kicks and survey answers on this node's channel).
    fn cluster_said(&mut self, words: &[u8]) {
        use super::cluster::Said;
        let shared = self.shared.clone();
        let Some(c) = &shared.cfg.cluster else {
            return;
        };
        let Some(said) = super::cluster::parse(words) else {
            self.metrics().redis_bad_replies.inc();
            return;
        };
        match said {
            Said::Ping(node) if node != c.node_id => {
                if let Some((reg, _)) = self.registry.as_mut() {
                    match reg.heard(node, Instant::now()) {
                        Some(true) => self.publish_nodes(),
                        Some(false) => {}
                        // More nodes than a cluster has: a Redis (or a
                        // client of it) saying garbage on the channel.
                        None => self.metrics().redis_bad_replies.inc(),
                    }
                }
            }
            Said::Bye(node) => {
                if let Some((reg, _)) = self.registry.as_mut() {
                    reg.forget(&node);
                    self.publish_nodes();
                }
            }
            Said::Ping(_) => {}
            Said::Kick(id, epoch) => {
                // Logins here up to the epoch the other node displaced (a
                // newer one was claimed after it, and displaces it).
                if let Some(h) = self.shared.directory.holder(&id) {
                    if h.epoch <= epoch {
                        self.metrics().cluster_kicks.inc();
                        if h.conn.core as usize == self.index {
                            self.kick(h.conn, h.epoch);
                        } else {
                            self.mesh.kick(h.conn.core as usize, h.conn, h.epoch);
                        }
                    }
                }
            }
            Said::Survey(s) if s.from != c.node_id => {
                let Some((selector, msg, op)) = s.call() else {
                    self.metrics().redis_bad_replies.inc();
                    return;
                };
                self.metrics().cluster_surveys_in.inc();
                let call = AdminCall {
                    // Nobody's connection: the result goes back to s.from.
                    conn: conn_id(self.index, u32::MAX as usize, 0),
                    selector,
                    msg,
                    op,
                    keep_alive: false,
                    all_nodes: false,
                };
                let origin = Origin {
                    node: s.from,
                    core: s.core,
                    req: s.req,
                };
                self.admin
                    .start(call, &mut self.mesh, 0, None, Some(origin));
            }
            Said::Survey(_) => {}
            Said::Answer {
                core,
                req,
                count,
                text,
            } => {
                if core as usize == self.index {
                    self.reply(req | REMOTE_REPLY, count, &text);
                } else {
                    self.mesh
                        .reply(core as usize, req | REMOTE_REPLY, count, &text);
                }
            }
        }
    }

    /// A transfer from another node: delivered by the core that
    /// holds the id (every core holding a login of it subscribed, and an
    /// older one on another core may still be closing).
    fn cluster_transfer(&mut self, frame: Vec<u8>) {
        use crate::protocol::rely::{self, Frame, Parse};
        // Only whole transfer frames go on id channels; anything else was
        // not published by a node (counted, dropped).
        let dst = match rely::parse(&frame, u32::MAX) {
            Ok(Parse::Frame(Frame::Transfer { to, .. }, used)) if used == frame.len() => {
                self.cache.lookup(&self.shared.directory, to)
            }
            _ => {
                self.metrics().redis_bad_replies.inc();
                return;
            }
        };
        let Some(dst) = dst else {
            self.metrics().dropped_offline.inc();
            return;
        };
        if dst.core as usize != self.index {
            return;
        }
        self.metrics().cluster_in.inc();
        self.deliver(dst, Chunk::Owned(frame.into_boxed_slice()));
    }

    /// Hands server `server`'s events to the connections they are for.
    fn redis_events(&mut self, server: usize, mut events: Vec<redis::Event>) {
        let mut cores = std::mem::take(&mut self.selected);
        let s = server as u8;
        for ev in events.drain(..) {
            match ev {
                redis::Event::Answer(c, tag, a) if c.core as usize != self.index => {
                    self.mesh
                        .redis(c.core as usize, c, remote::ANSWER, tag, s, |out| {
                            remote::encode_answer(out, &a)
                        });
                }
                redis::Event::Answer(c, tag, a) => {
                    if self.live(c) {
                        self.act_then_read(c, |s, io, me, cx| s.on_redis(io, me, tag, a, cx));
                    }
                }
                redis::Event::Ready(c, id) if c.core as usize != self.index => {
                    self.mesh.redis(
                        c.core as usize,
                        c,
                        remote::JOINED,
                        remote::READY,
                        s,
                        |out| out.extend_from_slice(&id.to_le_bytes()),
                    );
                }
                redis::Event::Ready(c, id) => {
                    if self.live(c) {
                        self.act_then_read(c, |s, io, me, cx| {
                            s.on_joined(io, me, JoinState::Ready, id, cx)
                        });
                    }
                }
                redis::Event::Message(id, selector, msg) => {
                    if let Some(Some(r)) = self.redis.get(server) {
                        r.remote_cores(id, &mut cores);
                    }
                    let f = Fanout {
                        selector,
                        msg: Some(msg),
                        force_binary: false,
                        exclude: None,
                        op: FanOp::Send,
                        reply: None,
                    };
                    for &core in &cores {
                        self.mesh.fanout(core, f.clone());
                    }
                    self.fanout(f);
                }
                redis::Event::Transfer(frame) => self.cluster_transfer(frame),
                redis::Event::Said(words) => self.cluster_said(&words),
                redis::Event::Up => {
                    if self.cfg.cluster.is_some() {
                        self.reclaim_due = true;
                    }
                }
            }
        }
        cores.clear();
        if self.selected.is_empty() {
            self.selected = cores;
        }
        if let Some(Some(r)) = self.redis.get_mut(server) {
            r.recycle_events(events);
        }
    }

    /// Redis work another core sent (`redis.per_core: false`): commands
    /// and joins for the core that holds Redis, answers and join results
    /// for the connection's own core.
    fn redis_item(&mut self, conn: ConnId, d: &[u8]) {
        let (op, tag, server, body) = match d {
            [op, tag, server, body @ ..] => (*op, *tag, *server as usize, body),
            _ => return,
        };
        let id = body
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes);
        let back = conn.core as usize;
        let s = server as u8;
        match op {
            remote::CALL | remote::SEND | remote::EVENT | remote::JOIN | remote::LEAVE => {
                let (Some(Some(r)), Some(cfg)) =
                    (self.redis.get_mut(server), self.cfg.redis_server(server))
                else {
                    return;
                };
                let m = &self.shared.metrics[self.index];
                match op {
                    remote::CALL => {
                        if !r.command_encoded(cfg, m, Some((conn, tag)), body) {
                            self.mesh.redis(back, conn, remote::ANSWER, tag, s, |out| {
                                remote::encode_answer(out, &redis::Answer::Down)
                            });
                        }
                    }
                    remote::SEND => {
                        r.command_encoded(cfg, m, None, body);
                    }
                    remote::EVENT => {
                        r.send_event_encoded(cfg, m, body);
                    }
                    remote::JOIN => {
                        let (state, id) = remote::join_state(r.join(cfg, m, body, conn));
                        self.mesh
                            .redis(back, conn, remote::JOINED, state, s, |out| {
                                out.extend_from_slice(&id.to_le_bytes())
                            });
                    }
                    _ => r.leave(cfg, m, id, conn),
                }
            }
            remote::ANSWER if self.live(conn) => {
                let a = remote::decode_answer(body);
                self.act_then_read(conn, |s, io, me, cx| s.on_redis(io, me, tag, a, cx));
            }
            remote::JOINED => {
                let state = match tag {
                    remote::READY => JoinState::Ready,
                    remote::PENDING => JoinState::Pending,
                    _ => JoinState::Down,
                };
                if self.live(conn) {
                    self.act_then_read(conn, |s, io, me, cx| s.on_joined(io, me, state, id, cx));
                } else if state != JoinState::Down {
                    // Gone before it heard: give the join back.
                    self.mesh
                        .redis(remote::CORE, conn, remote::LEAVE, 0, s, |out| {
                            out.extend_from_slice(&id.to_le_bytes())
                        });
                }
            }
            _ => {}
        }
    }

    /// Calls a waiting stage with an answer; if it goes on, it may read
    /// what its client sent meanwhile.
    fn act_then_read(
        &mut self,
        c: ConnId,
        f: impl FnOnce(&mut Stage, &mut Io, ConnId, &mut super::route::Ctx<'_>) -> Outcome,
    ) {
        let key = c.slot as usize;
        if self.act(key, f) == Step::Open {
            if let Some(c) = self.conns.get_mut(key) {
                if c.io.readable && !c.io.in_ready {
                    c.io.in_ready = true;
                    self.ready.push((key, c.gen));
                }
            }
        }
    }

    /// Sends the upgrade request on upstreams whose TCP connect completed.
    fn upstreams_connected(&mut self) {
        for (key, gen) in std::mem::take(&mut self.connected) {
            if self.conns.get(key).is_some_and(|c| c.gen == gen) {
                self.act(key, |s, io, _, cx| s.on_connected(io, cx));
            }
        }
    }

    /// Opens the upstream connections whose time has come. Never blocks.
    fn dial_upstreams(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            return;
        }
        for d in self.upstreams.due(now, &self.shared) {
            let cfg = &self.cfg.sources[d.source as usize];
            let _ = d.stream.set_nodelay(true);
            let deadline = self.now + Timing::ticks(cfg.connect_timeout, TICK);
            let stage = UpstreamStage::connecting(d.source, deadline);
            log::debug!("source {}: connecting to {}", cfg.url, d.addr);
            // Client messages wait here while the source does not read: up
            // to the WebSocket output limit, then they are dropped and
            // counted (source_dropped), never queued without bound.
            let ws = self.cfg.ws();
            let limits = Limits {
                bytes: ws.max_output_bytes,
                msgs: u32::MAX,
                policy: SlowConsumer::Drop,
            };
            match self.insert(d.stream, d.addr, stage, limits, false) {
                Some(id) => self.upstreams.dialled(d.source, id),
                None => self.upstreams.dial_failed(d.source, &self.shared),
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut stalled = Vec::new();
        for &(key, gen) in &dirty {
            let Some(c) = self.conns.get_mut(key).filter(|c| c.gen == gen) else {
                continue;
            };
            c.io.in_dirty = false;
            if !c.io.writable {
                c.io.out.settle(c.io.limits().msgs != u32::MAX);
                continue; // a writable event re-lists it
            }
            let (n, left) = c.io.flush();
            // Progress restarts the write deadline; a socket that takes
            // nothing starts it.
            if n > 0 {
                c.io.set_stalled(false, self.now);
            }
            if left == Flushed::Blocked && c.io.stalled_since().is_none() {
                c.io.set_stalled(true, self.now);
                stalled.push(key);
            }
            let m = &self.shared.metrics[self.index];
            m.flushes.inc();
            m.bytes_out.add(n as u64);
            self.queued -= n as u64;
            match left {
                Flushed::Done if c.stage.wants_resume() && !c.io.in_ready => {
                    // Its answers are out: it may take the requests it holds.
                    c.io.in_ready = true;
                    self.ready.push((key, gen));
                }
                Flushed::Done | Flushed::Blocked => {}
                Flushed::Lingering => {
                    if c.io.readable && !c.io.in_ready {
                        c.io.in_ready = true;
                        self.ready.push((key, gen));
                    }
                }
                Flushed::Close(reason) => self.close(key, reason),
            }
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
        for key in stalled {
            self.rearm_if_earlier(key);
        }
        self.metrics().queued_bytes.set(self.queued);
    }

    /// Once queues on this core have shrunk by `TRIM_AFTER` bytes (a slow
    /// consumer cut, a backlog drained), the allocator returns the freed
    /// pages now free inside this worker's heap (glibc keeps them
    /// otherwise: only a heap's top is given back). At most once per
    /// `TRIM_EVERY` per core.
    fn trim_if_drained(&mut self, now: Instant) {
        self.queued_high = self.queued_high.max(self.queued);
        // Also once everything has drained: what shrank by less than
        // TRIM_AFTER since the last trim (a backlog that drained slowly,
        // after a cut) would otherwise stay resident.
        let shrank = self.queued_high - self.queued >= TRIM_AFTER
            || (self.queued == 0 && self.queued_high >= TRIM_DRAINED);
        if !shrank || self.last_trim.is_some_and(|t| now - t < TRIM_EVERY) {
            return;
        }
        self.queued_high = self.queued;
        self.last_trim = Some(now);
        crate::sys::trim_allocator();
    }

    /// Bytes queued on every core, against `max_memory` (each core's gauge
    /// is current as of its last flush).
    fn over_memory(&self) -> bool {
        self.cfg.max_memory.is_some_and(|cap| {
            self.shared
                .metrics
                .iter()
                .map(|m| m.queued_bytes.get())
                .sum::<u64>()
                > cap
        })
    }

    /// Over `max_memory`: this core cuts its largest queue (one per
    /// iteration, so the cores together converge without cutting more than
    /// needed), with the stage's slow-consumer goodbye.
    fn cut_if_over_memory(&mut self) {
        if self.queued == 0 || !self.over_memory() {
            return;
        }
        let Some((key, bytes)) = self
            .conns
            .iter()
            .filter(|(_, c)| c.io.closing.is_none())
            .map(|(k, c)| (k, c.io.out.bytes()))
            .max_by_key(|&(_, b)| b)
            .filter(|&(_, b)| b > 0)
        else {
            return;
        };
        self.metrics().memory_cuts.inc();
        log::debug!(
            "core {}: over max_memory, cutting a queue of {bytes} bytes",
            self.index
        );
        self.act(key, |s, io, _, cx| {
            s.goodbye(io, CloseReason::SlowConsumer, cx.now())
        });
        self.metrics().queued_bytes.set(self.queued);
    }

    /// Closes a connection: its stage leaves its indexes, the id is
    /// released (epoch-checked), the timer cancelled, queued bytes
    /// forgotten, the slot freed, the socket dropped; an upstream's runtime
    /// hears of it.
    fn close(&mut self, key: usize, reason: CloseReason) {
        let Some(mut c) = self.conns.try_remove(key) else {
            return;
        };
        self.queued -= c.io.out.bytes() as u64;
        if let Some((slot, _)) = c.timer() {
            self.wheel.cancel(slot, key, c.gen);
        }
        let me = conn_id(self.index, key, c.gen);
        {
            let mut cx = ctx!(self);
            c.stage.on_close(&c.io, me, &mut cx);
            if let Some(l) = c.io.login.take() {
                cx.logout(&l);
            }
        }
        self.upstreams.closed(me, &self.shared);
        let _ = self.poll.registry().deregister(&mut c.io.stream);
        let m = self.metrics();
        m.closed.inc();
        m.connections.set(self.conns.len() as u64);
        m.queued_bytes.set(self.queued);
        log::debug!(
            "closed conn={}:{}:{} peer={} proto={} reason={reason}",
            me.core,
            me.slot,
            me.gen,
            c.io.peer(),
            c.stage.name()
        );
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;

//! [`Redis`]: one core's Redis client (DESIGN.md section 6). Two
//! non-blocking connections driven by the core's loop: one for commands,
//! one for subscriptions. No thread, no blocking call: the core hands it
//! readiness, it reads and decodes replies ([`crate::protocol::resp`]),
//! matches them in order against what each request was for, and gives the
//! core [`Event`]s to hand to connections. Everything one iteration asks
//! for goes out in one write per connection (`flush`).
//!
//! Bounds: the read buffer is capped (`max_reply_bytes`); commands wait in
//! a capped buffer while Redis is away (`max_pending_bytes`), beyond which
//! a publish is dropped and counted and a request fails at once; every
//! request has a deadline (`request_timeout`), and a connection whose
//! oldest request passes it is dropped (a Redis that stopped answering),
//! failing what was pending. A lost connection comes back with the
//! sources' capped backoff and jitter; the subscription connection then
//! subscribes this core's channels again, 512 to a command.
//!
//! Subscriptions are per core and refcounted: a core subscribes exactly the
//! channels its own connections joined, so a message arrives on the core
//! that owns its receivers. Each subscribed channel is a
//! [`Channel::Redis`] of the core's channel index, so a message reaches its
//! members by the same fan-out (framed once, slow-consumer policy) as a
//! source's message. A join waits for the subscription to be confirmed
//! (`Join::Pending`, then [`Event::Ready`]), so a connection that is told
//! "subscribed" misses nothing published after.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::channels::Channel;
use super::message::Message;
use super::metrics::CoreMetrics;
use super::shared::Shared;
use super::tags::Selector;
use super::upstreams::retry_delay;
use super::ConnId;
use crate::config::RedisConfig;
use crate::protocol::resp::{self, Value};

/// Redis servers a config may name (sessions, events, sync).
pub(crate) const MAX_SERVERS: usize = 4;
/// Tokens at or above this are Redis connections: server `s` has
/// `usize::MAX - 1 - 2s` (commands) and the one below (subscriptions).
pub(crate) const TOKEN_FLOOR: usize = usize::MAX - 2 * MAX_SERVERS;

/// A Redis connection's token on the core's poll.
pub(crate) fn token(server: usize, sub: bool) -> Token {
    Token(usize::MAX - 1 - 2 * server - usize::from(sub))
}

/// The server and connection of a Redis token.
pub(crate) fn of_token(t: Token) -> (usize, bool) {
    let k = usize::MAX - 1 - t.0;
    (k / 2, k % 2 == 1)
}

/// Channels per SUBSCRIBE when resubscribing (as Centrifuge batches).
const SUBSCRIBE_BATCH: usize = 512;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// A read shorter than this ends the connection's reads for the
/// iteration (see `read_into`).
const SMALL_READ: usize = 4096;
/// Reads per connection per iteration before the others get a turn.
const READS_PER_ITERATION: usize = 64;
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// How long the command connection stays quiet (see [`Link::quiet`])
/// after its last transfer before it listens for replies again.
const QUIET_HOLD: Duration = Duration::from_secs(1);
/// A quiet connection's replies are read once this many transfers wait
/// for theirs (one read for the lot, not one per transfer)...
const QUIET_BATCH: usize = 64;
/// ...or once the oldest has waited this long (the core wakes at least
/// every tick, so a count lags by at most about a tick and a half).
const QUIET_LAG: Duration = Duration::from_millis(50);

/// What a reply means to whoever asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `$-1` or `*-1`.
    Nil,
    /// An integer.
    Int(i64),
    /// A simple or bulk string.
    Bytes(Vec<u8>),
    /// An array (its contents are not needed by any caller yet).
    Array,
    /// Redis refused the command (`-ERR ...`).
    Error(String),
    /// No connection to Redis (or its buffer is full).
    Down,
    /// No reply within `request_timeout`.
    Timeout,
}

/// Whom a reply goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// AUTH, SELECT, CLIENT SETNAME: an error drops the connection.
    Setup,
    /// A keepalive PING.
    Ping,
    /// Nobody waits (PUBLISH, EXPIRE): errors are counted.
    Ignore,
    /// A client event (XADD) or a sync write: kept while Redis is away,
    /// counted when written, failed or lost.
    Event,
    /// A connection's stage, with its own tag for the request.
    Conn(ConnId, u8),
    /// A PUBLISH of a transfer to another node: its receiver count says
    /// whether anyone held the id.
    Transfer,
    /// SCRIPT LOAD of cluster script `.0`: the reply is its SHA.
    Load(u8),
    /// EVALSHA of cluster script `.0`: NOSCRIPT (the cache was flushed)
    /// makes the next run send its text again.
    Sha(u8),
}

/// What the core hands on after `service`.
#[derive(Debug)]
pub(crate) enum Event {
    /// A reply for connection `.0`'s request tagged `.1`.
    Answer(ConnId, u8, Answer),
    /// The channel connection `.0` joined (local id `.1`) is subscribed.
    Ready(ConnId, u32),
    /// A message on a subscribed channel, for its members: verbatim, text
    /// when it is UTF-8 and binary otherwise (never an empty text frame).
    Message(u32, Arc<Selector>, Message),
    /// A RELY transfer frame from another node, for its ToClientID
    /// (cluster).
    Transfer(Vec<u8>),
    /// Words on this node's channel or the control channel (cluster:
    /// `engine::cluster::parse`).
    Said(Vec<u8>),
    /// The cluster's command connection is up (again): the core claims the
    /// ids it holds anew, since Redis may have lost or given them away.
    Up,
}

/// The cluster's channel names a core's Redis client reads messages of.
#[derive(Debug, Clone)]
pub(crate) struct ClusterNames {
    /// `{prefix}:id:`: transfers for the id that follows.
    pub id_prefix: Box<[u8]>,
    /// `{prefix}:node:{me}`: kicks and survey answers for this node.
    pub node: Box<[u8]>,
    /// `{prefix}:ctl`: every node's pings and surveys.
    pub ctl: Box<[u8]>,
}

/// What a stage hears about its join later (`Stage::on_joined`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinState {
    /// Subscribed: a member from now on.
    Ready,
    /// On its way (the id is now held).
    Pending,
    /// Cannot be made.
    Down,
}

/// The answer to a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Join {
    /// Subscribed already: a member of `Channel::Redis(id)` from now on.
    Ready(u32),
    /// A SUBSCRIBE is on its way: [`Event::Ready`] follows.
    Pending(u32),
    /// The subscription connection is down.
    Down,
    /// Asked of the core that holds Redis: the result comes as
    /// `Stage::on_joined` (`redis.per_core: false`).
    Remote,
}

#[derive(Debug)]
enum State {
    /// Waiting to (re)connect.
    Idle { retry_at: Instant },
    /// A helper thread resolves the host name.
    Resolving(Receiver<io::Result<Vec<SocketAddr>>>),
    /// TCP connect in progress.
    Connecting {
        stream: TcpStream,
        deadline: Instant,
    },
    /// Connected (the setup commands lead its pipeline).
    Up { stream: TcpStream },
}

/// One connection to Redis.
#[derive(Debug)]
struct Link {
    token: Token,
    sub: bool,
    state: State,
    /// Encoded commands not yet written (from `written`).
    out: Vec<u8>,
    written: usize,
    /// Bytes read and not yet decoded (capped).
    inb: Vec<u8>,
    /// What each reply in flight is for, oldest first, with its deadline
    /// and send time.
    pending: VecDeque<(Want, Instant, Instant)>,
    readable: bool,
    writable: bool,
    attempts: u32,
    up_since: Option<Instant>,
    /// Last time a byte came in (keepalive).
    heard: Instant,
    /// The subscription connection's outstanding PING.
    ping_due: Option<Instant>,
    /// Transfers (`Want::Transfer`) among `pending`.
    transfers: usize,
    /// Registered for writability only: while every request in flight is a
    /// transfer, whose reply only counts it, the replies must not wake the
    /// core (a wake-up per cross-node message costs the sending node as
    /// much CPU as the message, and on a busy machine delays the node that
    /// delivers it). They are read at an iteration's end instead, in
    /// batches ([`Redis::read_quiet`]); the core wakes at least every tick.
    quiet: bool,
    /// When the last transfer was queued (the quiet mode's hold).
    last_transfer: Option<Instant>,
}

/// A channel this core subscribes.
#[derive(Debug)]
struct Sub {
    /// Its local channel id.
    id: u32,
    /// Members and joiners.
    refs: u32,
    /// Joiners waiting for the confirmation.
    waiting: Few<ConnId>,
    /// The last command sent for it was SUBSCRIBE.
    subscribed: bool,
    /// Confirmations still due for commands sent for it.
    outstanding: u32,
    /// Its members' selector (None: a channel held for the cluster, whose
    /// messages the core routes itself; it needs none, nor an id entry).
    selector: Option<Arc<Selector>>,
    /// Joins per core from other cores (`redis.per_core: false`), indexed
    /// by core; empty while only this core's connections joined.
    remote: Few<u32>,
}

/// A vector that costs one pointer while empty: most channels (an idle
/// session's) have no joiner waiting and no member on another core, and
/// a core holds one `Sub` per channel.
#[derive(Debug)]
#[allow(clippy::box_collection)] // 8 bytes, not a vector's 24, in every entry
struct Few<T>(Option<Box<Vec<T>>>);

impl<T> Default for Few<T> {
    fn default() -> Self {
        Few(None)
    }
}

impl<T> Few<T> {
    /// The vector, for growing (made on the first).
    fn vec(&mut self) -> &mut Vec<T> {
        self.0.get_or_insert_with(Default::default)
    }

    /// Its items; it holds nothing after.
    fn take(&mut self) -> Vec<T> {
        self.0.take().map(|v| *v).unwrap_or_default()
    }

    fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(v) = self.0.as_mut() {
            v.retain(keep);
            if v.is_empty() {
                self.0 = None;
            }
        }
    }
}

impl<T> std::ops::Deref for Few<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }
}

impl<T> std::ops::DerefMut for Few<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.0.as_deref_mut().map_or(&mut [], Vec::as_mut_slice)
    }
}

/// One core's Redis client.
#[derive(Debug)]
pub(crate) struct Redis {
    core: usize,
    /// Its index in `Config::redis_servers`.
    server: usize,
    /// Keeps a subscription connection (the sessions' server does).
    subscribes: bool,
    cmd: Link,
    sub: Link,
    subs: HashMap<Box<[u8]>, Sub>,
    names: HashMap<u32, Box<[u8]>>,
    next_id: u32,
    events: Vec<Event>,
    /// Reads land here first (appending to a link's buffer costs a copy
    /// of what arrived, not a zeroing of a whole chunk per read).
    scratch: Box<[u8]>,
    /// The clock at the last `service`.
    now: Instant,
    /// The cluster's names, when this is the cluster's server.
    cluster: Option<ClusterNames>,
    /// The command connection was ready at the last `service`.
    cmd_was_ready: bool,
    /// The cluster scripts' SHAs on the current command connection.
    shas: [Option<Box<[u8]>>; 2],
}

impl Link {
    fn new(token: Token, sub: bool) -> Link {
        let now = Instant::now();
        Link {
            token,
            sub,
            state: State::Idle { retry_at: now },
            out: Vec::new(),
            written: 0,
            inb: Vec::new(),
            pending: VecDeque::new(),
            readable: false,
            writable: false,
            attempts: 0,
            up_since: None,
            heard: now,
            ping_due: None,
            transfers: 0,
            quiet: false,
            last_transfer: None,
        }
    }

    fn up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Up and logged in (AUTH, SELECT and SETNAME answered): what /health
    /// and the `redis_*_up` gauges report.
    fn ready(&self) -> bool {
        self.up() && self.pending.front().is_none_or(|p| p.0 != Want::Setup)
    }

    /// May a command be buffered now (up, or about to be)?
    fn accepting(&self) -> bool {
        !matches!(self.state, State::Idle { .. })
    }

    fn name(&self) -> &'static str {
        if self.sub {
            "subscribe"
        } else {
            "command"
        }
    }

    fn queued(&self) -> usize {
        self.out.len() - self.written
    }

    /// Appends a command if the buffer has room.
    fn push(&mut self, args: &[&[u8]], cap: usize) -> bool {
        if self.queued() + resp::encoded_len(args) > cap {
            return false;
        }
        resp::encode(&mut self.out, args);
        true
    }

    /// Appends one command already encoded (by another core).
    fn push_encoded(&mut self, cmd: &[u8], cap: usize) -> bool {
        if self.queued() + cmd.len() > cap {
            return false;
        }
        self.out.extend_from_slice(cmd);
        true
    }
}

impl Redis {
    /// Core `core`'s client of server `server` (`Config::redis_servers`);
    /// `subscribes`: it also keeps a subscription connection.
    pub(crate) fn new(core: usize, server: usize, subscribes: bool) -> Redis {
        Redis {
            core,
            server,
            subscribes,
            cmd: Link::new(token(server, false), false),
            sub: Link::new(token(server, true), true),
            subs: HashMap::new(),
            names: HashMap::new(),
            next_id: 0,
            events: Vec::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            now: Instant::now(),
            cluster: None,
            cmd_was_ready: false,
            shas: [None, None],
        }
    }

    /// Reads the cluster's channels: transfers for held ids, and (`node`:
    /// core 0) this node's channel and the control channel, which it holds
    /// from now on.
    pub(crate) fn with_cluster(mut self, names: ClusterNames, node: bool) -> Redis {
        if node {
            self.hold(&names.node.clone());
            self.hold(&names.ctl.clone());
        }
        self.cluster = Some(names);
        self
    }

    /// Whether this node's channel is subscribed (confirmed) on this
    /// core's connection, so kicks for this node reach it; None on a core
    /// that does not hold it.
    pub(crate) fn node_heard(&self) -> Option<bool> {
        let node = &self.cluster.as_ref()?.node;
        let s = self.subs.get(node)?;
        Some(self.sub.ready() && s.subscribed && s.outstanding == 0)
    }

    /// Keeps channel `name` subscribed (now, or at the next connect) with
    /// no member waiting for it: the cluster's channels, whose messages
    /// the core routes itself. Undone by [`Redis::release`].
    pub(crate) fn hold(&mut self, name: &[u8]) {
        let up = self.sub.up();
        if let Some(s) = self.subs.get_mut(name) {
            s.refs += 1;
            if !s.subscribed && up {
                resp::encode(&mut self.sub.out, &[b"SUBSCRIBE", name]);
                s.subscribed = true;
                s.outstanding += 1;
            }
            return;
        }
        // While down, the connect's resubscribe sends it.
        if up {
            resp::encode(&mut self.sub.out, &[b"SUBSCRIBE", name]);
        }
        self.insert_sub(name, up, false);
    }

    /// A new channel with one reference, SUBSCRIBEd already if `sent`;
    /// its local id. `members`: connections join it (a held channel has no
    /// selector and no id entry: the core routes its messages itself, and
    /// it is found by name).
    fn insert_sub(&mut self, name: &[u8], sent: bool, members: bool) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let selector = members.then(|| {
            self.names.insert(id, name.into());
            Arc::new(Selector::Channel(Channel::Redis(id)))
        });
        self.subs.insert(
            name.into(),
            Sub {
                id,
                refs: 1,
                waiting: Few::default(),
                subscribed: sent,
                outstanding: u32::from(sent),
                selector,
                remote: Few::default(),
            },
        );
        id
    }

    /// Undoes one [`Redis::hold`] of `name`.
    pub(crate) fn release(&mut self, cfg: &RedisConfig, m: &CoreMetrics, name: &[u8]) {
        self.unref(cfg, m, name);
    }

    /// One reference to channel `name` fewer: the last one unsubscribes
    /// (the channel is forgotten when Redis confirms, or at once while the
    /// connection is down).
    fn unref(&mut self, cfg: &RedisConfig, m: &CoreMetrics, name: &[u8]) {
        let Some(s) = self.subs.get_mut(name) else {
            return;
        };
        s.refs = s.refs.saturating_sub(1);
        if s.refs > 0 {
            return;
        }
        if s.subscribed
            && self.sub.up()
            && self
                .sub
                .push(&[b"UNSUBSCRIBE", name], cfg.max_pending_bytes)
        {
            s.subscribed = false;
            s.outstanding += 1;
            return;
        }
        if s.outstanding == 0 || !self.sub.up() {
            self.forget(name);
            m.redis_channels.set(self.subs.len() as u64);
        }
    }

    /// Runs cluster script `script` (`engine::cluster::SCRIPTS`) with
    /// `args` (its key count, keys and arguments), nobody waiting: by SHA
    /// once the connection has loaded it, else by its text. False if it
    /// was dropped (counted).
    pub(crate) fn eval(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        script: usize,
        args: &[&[u8]],
    ) -> bool {
        let Some(text) = super::cluster::SCRIPTS.get(script) else {
            return false;
        };
        let mut all: Vec<&[u8]> = Vec::with_capacity(args.len() + 2);
        let sha = self.shas.get(script).cloned().flatten();
        let want = match &sha {
            Some(sha) => {
                all.extend([&b"EVALSHA"[..], &sha[..]]);
                Want::Sha(script as u8)
            }
            None => {
                all.extend([&b"EVAL"[..], text]);
                Want::Ignore
            }
        };
        all.extend_from_slice(args);
        let ok = self.command(cfg, m, want, &all);
        if !ok {
            m.redis_dropped.inc();
        }
        ok
    }

    /// PUBLISHes a transfer for another node on channel `prefix` + `id`;
    /// its reply counts it as sent or offline. False if it cannot go (no
    /// connection, or no room). Per relayed message: no allocation, and
    /// the iteration's clock for its deadline.
    pub(crate) fn publish_transfer(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        (prefix, id): (&[u8], &[u8]),
        frame: &[u8],
    ) -> bool {
        let l = &mut self.cmd;
        let args: [&[&[u8]]; 3] = [&[b"PUBLISH"], &[prefix, id], &[frame]];
        if !l.accepting() || l.queued() + resp::encoded_len_parts(&args) > cfg.max_pending_bytes {
            return false;
        }
        resp::encode_parts(&mut l.out, &args);
        let now = self.now;
        l.pending
            .push_back((Want::Transfer, now + cfg.request_timeout, now));
        l.transfers += 1;
        l.last_transfer = Some(now);
        m.redis_requests.inc();
        true
    }

    /// Readiness from the core's poll.
    pub(crate) fn on_event(&mut self, sub: bool, readable: bool, writable: bool) {
        let l = if sub { &mut self.sub } else { &mut self.cmd };
        l.readable |= readable;
        l.writable |= writable;
    }

    /// Input is waiting that the last iteration left (its read budget ran
    /// out): the core must not sleep.
    pub(crate) fn busy(&self) -> bool {
        (self.cmd.readable && self.cmd.up())
            || (self.sub.readable && self.sub.up())
            || !self.events.is_empty()
    }

    /// Sends a command whose reply goes to `me`'s stage, tagged `tag`.
    /// Err(Down) at once if there is no connection or no room.
    pub(crate) fn call(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        me: ConnId,
        tag: u8,
        args: &[&[u8]],
    ) -> Result<(), Answer> {
        self.command(cfg, m, Want::Conn(me, tag), args)
            .then_some(())
            .ok_or(Answer::Down)
    }

    /// Sends an event (an XADD, a sync write): unlike other commands it
    /// waits while Redis is away, in the connection's capped buffer, and
    /// goes out after the reconnect, in order. False if dropped (no room);
    /// counted either way.
    pub(crate) fn send_event(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        args: &[&[u8]],
    ) -> bool {
        self.event(cfg, m, |l, cap| l.push(args, cap))
    }

    /// [`Redis::send_event`] for an event another core encoded.
    pub(crate) fn send_event_encoded(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        cmd: &[u8],
    ) -> bool {
        self.event(cfg, m, |l, cap| l.push_encoded(cmd, cap))
    }

    fn event(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        push: impl FnOnce(&mut Link, usize) -> bool,
    ) -> bool {
        let l = &mut self.cmd;
        if !push(l, cfg.max_pending_bytes) {
            m.events_dropped.inc();
            return false;
        }
        // This iteration's clock, not a clock read per event: an event's
        // deadline is coarse anyway (and restarts when a connection comes
        // up).
        let now = self.now;
        l.pending
            .push_back((Want::Event, now + cfg.request_timeout, now));
        m.redis_requests.inc();
        true
    }

    /// Sends a command nobody waits for (a failure is counted). False if
    /// it was dropped (no connection, or no room).
    pub(crate) fn send(&mut self, cfg: &RedisConfig, m: &CoreMetrics, args: &[&[u8]]) -> bool {
        let ok = self.command(cfg, m, Want::Ignore, args);
        if !ok {
            m.redis_dropped.inc();
        }
        ok
    }

    /// A command another core encoded (`redis.per_core: false`): its reply
    /// goes to `from` (tag `tag`) if `want`, else nowhere. False if dropped.
    pub(crate) fn command_encoded(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        want: Option<(ConnId, u8)>,
        cmd: &[u8],
    ) -> bool {
        let l = &mut self.cmd;
        if !l.accepting() || !l.push_encoded(cmd, cfg.max_pending_bytes) {
            if want.is_none() {
                m.redis_dropped.inc();
            }
            return false;
        }
        let now = Instant::now();
        let want = want.map_or(Want::Ignore, |(c, t)| Want::Conn(c, t));
        l.pending.push_back((want, now + cfg.request_timeout, now));
        m.redis_requests.inc();
        true
    }

    fn command(&mut self, cfg: &RedisConfig, m: &CoreMetrics, want: Want, args: &[&[u8]]) -> bool {
        let l = &mut self.cmd;
        if !l.accepting() || !l.push(args, cfg.max_pending_bytes) {
            return false;
        }
        let now = Instant::now();
        l.pending.push_back((want, now + cfg.request_timeout, now));
        m.redis_requests.inc();
        true
    }

    /// `me` joins channel `name`: subscribed at once, after a
    /// confirmation, or not at all while the subscription connection is
    /// down. Every join is matched by one [`Redis::leave`] (a `Down` join
    /// holds nothing).
    pub(crate) fn join(
        &mut self,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        name: &[u8],
        me: ConnId,
    ) -> Join {
        if !self.sub.accepting() {
            return Join::Down;
        }
        // While connecting, the connect's resubscribe sends it.
        let up = self.sub.up();
        let remote = (me.core as usize != self.core).then_some(me.core as usize);
        if let Some(s) = self.subs.get_mut(name) {
            if let Some(c) = remote {
                if s.remote.len() <= c {
                    s.remote.vec().resize(c + 1, 0);
                }
                s.remote[c] += 1;
            }
            if s.subscribed && s.outstanding == 0 {
                s.refs += 1;
                return Join::Ready(s.id);
            }
            if !s.subscribed && up {
                if !self.sub.push(&[b"SUBSCRIBE", name], cfg.max_pending_bytes) {
                    if let Some(c) = remote {
                        s.remote[c] -= 1;
                    }
                    return Join::Down;
                }
                s.subscribed = true;
                s.outstanding += 1;
            }
            s.refs += 1;
            s.waiting.vec().push(me);
            return Join::Pending(s.id);
        }
        if up && !self.sub.push(&[b"SUBSCRIBE", name], cfg.max_pending_bytes) {
            return Join::Down;
        }
        let id = self.insert_sub(name, up, true);
        if let Some(s) = self.subs.get_mut(name) {
            s.waiting.vec().push(me);
            if let Some(c) = remote {
                s.remote.vec().resize(c + 1, 0);
                s.remote[c] = 1;
            }
        }
        m.redis_channels.set(self.subs.len() as u64);
        Join::Pending(id)
    }

    /// Undoes one join of channel `id` by `me`; the last one unsubscribes.
    pub(crate) fn leave(&mut self, cfg: &RedisConfig, m: &CoreMetrics, id: u32, me: ConnId) {
        let Some(name) = self.names.get(&id).cloned() else {
            return;
        };
        if let Some(s) = self.subs.get_mut(&name) {
            s.waiting.retain(|w| *w != me);
            if let Some(n) = s.remote.get_mut(me.core as usize) {
                *n = n.saturating_sub(1);
            }
        }
        self.unref(cfg, m, &name);
    }

    /// The other cores with members of channel `id` (per_core: false).
    pub(crate) fn remote_cores(&self, id: u32, out: &mut Vec<usize>) {
        out.clear();
        let Some(s) = self.names.get(&id).and_then(|n| self.subs.get(n)) else {
            return;
        };
        out.extend(
            s.remote
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, _)| c),
        );
    }

    fn forget(&mut self, name: &[u8]) {
        if let Some(s) = self.subs.remove(name) {
            self.names.remove(&s.id);
        }
    }

    /// One iteration's work: dial what is due, finish connects, read and
    /// decode replies, fail requests past their deadline, ping idle
    /// connections. What connections must hear is left in
    /// [`Redis::take_events`].
    pub(crate) fn service(&mut self, registry: &Registry, shared: &Arc<Shared>) {
        let Some(cfg) = shared.cfg.redis_server(self.server) else {
            return;
        };
        let m = &shared.metrics[self.core];
        let now = Instant::now();
        self.now = now;
        for sub in [false, true] {
            if sub && !self.subscribes {
                continue;
            }
            self.dial(sub, registry, cfg, shared, now);
            self.finish_connect(sub, registry, cfg, m, now);
            let l = self.link(sub);
            if l.quiet && l.pending.front().is_some_and(|p| p.1 <= now) {
                // A quiet connection's replies may sit unread: read them
                // before judging a deadline (a short request_timeout).
                l.readable = true;
            }
            if let Err(why) = self.read(sub, cfg, m) {
                self.drop_link(sub, registry, cfg, m, &why);
                continue;
            }
            if let Err(why) = self.check_deadlines(sub, cfg, m, now) {
                self.drop_link(sub, registry, cfg, m, &why);
            }
        }
        let ready = self.cmd.ready();
        if ready && !self.cmd_was_ready && self.cluster.is_some() {
            self.events.push(Event::Up);
        }
        self.cmd_was_ready = ready;
    }

    /// Its command and subscription connections are up and logged in.
    pub(crate) fn ready(&self) -> (bool, bool) {
        (self.cmd.ready(), self.sub.ready())
    }

    /// Requests waiting for their reply.
    pub(crate) fn in_flight(&self) -> usize {
        self.cmd.pending.len()
    }

    /// What the last `service` left for connections.
    pub(crate) fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Hands back the (emptied) event buffer for reuse.
    pub(crate) fn recycle_events(&mut self, mut v: Vec<Event>) {
        v.clear();
        if self.events.is_empty() {
            self.events = v;
        }
    }

    fn link(&mut self, sub: bool) -> &mut Link {
        if sub {
            &mut self.sub
        } else {
            &mut self.cmd
        }
    }

    fn dial(
        &mut self,
        sub: bool,
        registry: &Registry,
        cfg: &RedisConfig,
        shared: &Arc<Shared>,
        now: Instant,
    ) {
        let core = self.core;
        let m = &shared.metrics[core];
        let l = self.link(sub);
        let addr = match &l.state {
            State::Idle { retry_at } if *retry_at <= now => {
                let t = &cfg.target;
                match t.host.parse::<IpAddr>() {
                    Ok(ip) => Ok(SocketAddr::new(ip, t.port)),
                    Err(_) => {
                        l.state = resolve(t.host.clone(), t.port, shared.clone(), core);
                        return;
                    }
                }
            }
            State::Resolving(rx) => match rx.try_recv() {
                Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs[0]),
                Ok(r) => Err(r.err().map_or("no address".into(), |e| e.to_string())),
                Err(_) => return,
            },
            _ => return,
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                log::warn!("redis {}: cannot resolve: {e}", cfg.url);
                return self.drop_link(sub, registry, cfg, m, "resolve failed");
            }
        };
        let l = self.link(sub);
        let opened = TcpStream::connect(addr).and_then(|mut s| {
            registry.register(&mut s, l.token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        match opened {
            Ok(stream) => {
                log::debug!("core {core}: redis {} connection to {addr}", l.name());
                l.state = State::Connecting {
                    stream,
                    deadline: now + cfg.connect_timeout,
                };
                l.readable = false;
                l.writable = false;
                l.quiet = false;
            }
            Err(e) => {
                log::debug!("core {core}: redis connect to {addr}: {e}");
                self.drop_link(sub, registry, cfg, m, "connect failed");
            }
        }
    }

    /// A connect that completed (or failed, or ran out of time).
    fn finish_connect(
        &mut self,
        sub: bool,
        registry: &Registry,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        now: Instant,
    ) {
        let core = self.core;
        // The cluster's scripts are loaded on each new command connection.
        let load_scripts = !sub && self.cluster.is_some();
        let l = self.link(sub);
        let State::Connecting { stream, deadline } = &l.state else {
            return;
        };
        let failed = if !l.writable {
            (now >= *deadline).then(|| "connect timeout".to_owned())
        } else {
            match stream.take_error() {
                Ok(None) if stream.peer_addr().is_ok() => None,
                Ok(Some(e)) | Err(e) => Some(format!("connect: {e}")),
                Ok(None) => {
                    l.writable = false;
                    (now >= *deadline).then(|| "connect timeout".to_owned())
                }
            }
        };
        if let Some(why) = failed {
            return self.drop_link(sub, registry, cfg, m, &why);
        }
        if !l.writable {
            return;
        }
        let State::Connecting { stream, .. } =
            std::mem::replace(&mut l.state, State::Idle { retry_at: now })
        else {
            return;
        };
        let _ = stream.set_nodelay(true);
        l.state = State::Up { stream };
        l.up_since = Some(now);
        l.heard = now;
        // The setup commands go first, ahead of anything buffered while
        // connecting (commands are only buffered from now on: `accepting`).
        let mut setup = Vec::new();
        let mut n = 0;
        let t = &cfg.target;
        if let Some(pass) = &t.password {
            match &t.user {
                Some(u) => resp::encode(&mut setup, &[b"AUTH", u.as_bytes(), pass.as_bytes()]),
                None => resp::encode(&mut setup, &[b"AUTH", pass.as_bytes()]),
            }
            n += 1;
        }
        if t.db != 0 {
            resp::encode(&mut setup, &[b"SELECT", t.db.to_string().as_bytes()]);
            n += 1;
        }
        let name = format!(
            "{}-{}-{}",
            cfg.client_name,
            core,
            if sub { "sub" } else { "cmd" }
        );
        resp::encode(&mut setup, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
        n += 1;
        let deadline = now + cfg.request_timeout;
        // What waited while Redis was away is sent now: its clock starts now.
        for p in l.pending.iter_mut() {
            p.1 = deadline;
            p.2 = now;
        }
        // The cluster's scripts, loaded once per connection: their replies
        // come after the setup's, ahead of what was buffered.
        if load_scripts {
            for text in super::cluster::SCRIPTS.iter() {
                resp::encode(&mut setup, &[b"SCRIPT", b"LOAD", text]);
            }
            for i in (0..super::cluster::SCRIPTS.len()).rev() {
                l.pending.push_front((Want::Load(i as u8), deadline, now));
            }
        }
        for _ in 0..n {
            l.pending.push_front((Want::Setup, deadline, now));
        }
        setup.extend_from_slice(&l.out[l.written..]);
        l.out = setup;
        l.written = 0;
        log::info!(
            "core {core}: redis {} connection up ({})",
            l.name(),
            cfg.url
        );
        if sub {
            self.resubscribe(cfg, now);
        }
    }

    /// Forgets channels nobody holds any more and rebuilds the id-to-name
    /// map from what is left (held cluster channels, which have no
    /// selector, are found by name only).
    fn prune_subs(&mut self) {
        self.subs.retain(|_, s| s.refs > 0);
        self.names = self
            .subs
            .iter()
            .filter(|(_, s)| s.selector.is_some())
            .map(|(k, s)| (s.id, k.clone()))
            .collect();
    }

    /// After a (re)connect: every channel with members is subscribed again,
    /// in batches, with a PING behind them so a silent Redis is noticed.
    fn resubscribe(&mut self, cfg: &RedisConfig, now: Instant) {
        self.prune_subs();
        let names: Vec<Box<[u8]>> = self.subs.keys().cloned().collect();
        for batch in names.chunks(SUBSCRIBE_BATCH) {
            let mut args: Vec<&[u8]> = Vec::with_capacity(batch.len() + 1);
            args.push(b"SUBSCRIBE");
            args.extend(batch.iter().map(|n| &n[..]));
            resp::encode(&mut self.sub.out, &args);
        }
        for s in self.subs.values_mut() {
            s.subscribed = true;
            s.outstanding = 1;
        }
        if !names.is_empty() {
            log::info!(
                "core {}: redis resubscribing {} channels",
                self.core,
                names.len()
            );
            resp::encode(&mut self.sub.out, &[b"PING"]);
            self.sub.ping_due = Some(now + cfg.request_timeout);
        }
    }

    /// Reads what the socket has (budgeted) and decodes every whole reply.
    fn read(&mut self, sub: bool, cfg: &RedisConfig, m: &CoreMetrics) -> Result<(), String> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let res = self.read_into(sub, cfg, &mut scratch);
        self.scratch = scratch;
        let closed = res?;
        self.decode(sub, cfg, m)?;
        if closed {
            return Err("Redis closed the connection".into());
        }
        Ok(())
    }

    /// Reads what the socket has, within the budget. Ok(true): the peer
    /// closed after what was read.
    fn read_into(
        &mut self,
        sub: bool,
        cfg: &RedisConfig,
        scratch: &mut [u8],
    ) -> Result<bool, String> {
        let l = self.link(sub);
        let State::Up { stream } = &mut l.state else {
            return Ok(false);
        };
        if !l.readable {
            return Ok(false);
        }
        // Past the budget the link stays readable: the core comes back at
        // once.
        for _ in 0..READS_PER_ITERATION {
            match stream.read(scratch) {
                Ok(0) => {
                    l.readable = false;
                    return Ok(true);
                }
                Ok(n) => {
                    l.inb.extend_from_slice(&scratch[..n]);
                    l.heard = Instant::now();
                    if n < SMALL_READ {
                        // Drained, and little came: a new arrival raises a
                        // new edge (a close too), so no read to hear
                        // WouldBlock. After a larger read more is likely
                        // on its way, and reading on batches it into this
                        // iteration's writes (what a stream's rate needs).
                        l.readable = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
            if l.inb.len() > cfg.max_reply_bytes {
                // Decode what is whole before judging the rest.
                break;
            }
        }
        Ok(false)
    }

    fn decode(&mut self, sub: bool, cfg: &RedisConfig, m: &CoreMetrics) -> Result<(), String> {
        let mut inb = std::mem::take(&mut self.link(sub).inb);
        let mut at = 0;
        let res = loop {
            match resp::decode(&inb[at..], cfg.max_reply_bytes) {
                Ok(Some((v, n))) => {
                    at += n;
                    let r = if sub {
                        self.on_push(v, m)
                    } else {
                        self.on_reply(v, m)
                    };
                    if let Err(e) = r {
                        break Err(e);
                    }
                }
                Ok(None) if inb.len() - at > cfg.max_reply_bytes => {
                    m.redis_bad_replies.inc();
                    break Err("a reply over redis.max_reply_bytes".into());
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    m.redis_bad_replies.inc();
                    break Err(e.to_string());
                }
            }
        };
        inb.drain(..at);
        let l = self.link(sub);
        l.inb = inb;
        // A burst's buffer is not kept for an idle connection.
        if l.inb.is_empty() && l.inb.capacity() > 4 * READ_CHUNK {
            l.inb = Vec::new();
        }
        res
    }

    /// A reply on the command connection: the oldest request's.
    fn on_reply(&mut self, v: Value<'_>, m: &CoreMetrics) -> Result<(), String> {
        let Some((want, _, sent)) = self.cmd.pending.pop_front() else {
            m.redis_bad_replies.inc();
            return Err("a reply nobody asked for".into());
        };
        if want == Want::Transfer {
            self.cmd.transfers = self.cmd.transfers.saturating_sub(1);
        }
        m.redis_replies.inc();
        m.redis_reply_ns.add(sent.elapsed().as_nanos() as u64);
        let answer = match v {
            Value::Nil => Answer::Nil,
            Value::Int(i) => Answer::Int(i),
            Value::Simple(b) | Value::Bulk(b) => Answer::Bytes(b.to_vec()),
            Value::Array(_) => Answer::Array,
            Value::Error(e) => {
                m.redis_errors.inc();
                Answer::Error(String::from_utf8_lossy(e).into_owned())
            }
        };
        match (want, answer) {
            (Want::Setup, Answer::Error(e)) => Err(format!("setup refused: {e}")),
            (Want::Conn(c, tag), a) => {
                self.events.push(Event::Answer(c, tag, a));
                Ok(())
            }
            (Want::Ignore, Answer::Error(e)) => {
                log::debug!("core {}: redis: {e}", self.core);
                Ok(())
            }
            (Want::Event, Answer::Error(e)) => {
                m.events_failed.inc();
                log::debug!("core {}: redis refused an event: {e}", self.core);
                Ok(())
            }
            (Want::Event, _) => {
                m.events_written.inc();
                Ok(())
            }
            (Want::Load(i), Answer::Bytes(sha)) => {
                if let Some(s) = self.shas.get_mut(i as usize) {
                    *s = Some(sha.into());
                }
                Ok(())
            }
            (Want::Load(_), a) => {
                log::warn!("core {}: redis: loading a cluster script: {a:?}", self.core);
                Ok(())
            }
            (Want::Sha(i), Answer::Error(e)) => {
                if e.starts_with("NOSCRIPT") {
                    if let Some(s) = self.shas.get_mut(i as usize) {
                        *s = None;
                    }
                }
                log::debug!("core {}: redis: {e}", self.core);
                Ok(())
            }
            // Nobody subscribed: no node holds the id.
            (Want::Transfer, Answer::Int(0)) => {
                m.dropped_offline.inc();
                Ok(())
            }
            (Want::Transfer, Answer::Int(_)) => {
                m.cluster_out.inc();
                Ok(())
            }
            (Want::Transfer, _) => {
                m.cluster_dropped.inc();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A message on the subscription connection: a confirmation, a
    /// channel message, or a pong.
    fn on_push(&mut self, v: Value<'_>, m: &CoreMetrics) -> Result<(), String> {
        let parts = match v {
            Value::Array(parts) => parts,
            Value::Simple(b) if b.eq_ignore_ascii_case(b"PONG") => {
                self.sub.ping_due = None;
                return Ok(());
            }
            Value::Simple(_) if self.sub.pending.front().is_some_and(|p| p.0 == Want::Setup) => {
                self.sub.pending.pop_front();
                return Ok(());
            }
            Value::Error(e) => {
                m.redis_errors.inc();
                return Err(format!(
                    "subscription connection refused: {}",
                    String::from_utf8_lossy(e)
                ));
            }
            _ => {
                m.redis_bad_replies.inc();
                return Err("unexpected reply on the subscription connection".into());
            }
        };
        let kind = parts.first().and_then(Value::bytes).unwrap_or_default();
        match (kind, parts.get(1).and_then(Value::bytes), parts.get(2)) {
            (b"message", Some(ch), Some(payload)) => {
                let Some(s) = self.subs.get(ch) else {
                    return Ok(()); // unsubscribed meanwhile
                };
                let Some(data) = payload.bytes() else {
                    m.redis_bad_replies.inc();
                    return Err("a message without a payload".into());
                };
                m.redis_messages.inc();
                if let Some(c) = &self.cluster {
                    if ch.starts_with(&c.id_prefix) {
                        // The id is in the frame itself (ToClientID): one
                        // allocation per message, not two.
                        self.events.push(Event::Transfer(data.to_vec()));
                        return Ok(());
                    }
                    if *ch == *c.node || *ch == *c.ctl {
                        self.events.push(Event::Said(data.to_vec()));
                        return Ok(());
                    }
                }
                let text = std::str::from_utf8(data).is_ok();
                self.events.push(Event::Message(
                    s.id,
                    s.selector
                        .clone()
                        .unwrap_or_else(|| Arc::new(Selector::Channel(Channel::Redis(s.id)))),
                    Message::new(text, data),
                ));
                Ok(())
            }
            (b"subscribe" | b"unsubscribe", Some(ch), _) => {
                let subscribe = kind == b"subscribe";
                let Some(s) = self.subs.get_mut(ch) else {
                    return Ok(());
                };
                s.outstanding = s.outstanding.saturating_sub(1);
                if s.outstanding > 0 {
                    return Ok(());
                }
                if s.subscribed {
                    // Taken, not drained: an idle session's channel keeps
                    // no buffer for joiners that came once.
                    for w in s.waiting.take() {
                        self.events.push(Event::Ready(w, s.id));
                    }
                } else if s.refs == 0 {
                    let ch = ch.to_vec();
                    self.forget(&ch);
                    m.redis_channels.set(self.subs.len() as u64);
                }
                let _ = subscribe;
                Ok(())
            }
            (b"pong", _, _) => {
                self.sub.ping_due = None;
                Ok(())
            }
            _ => {
                m.redis_bad_replies.inc();
                Err("unexpected push on the subscription connection".into())
            }
        }
    }

    /// Fails a connection whose oldest request passed its deadline; pings
    /// an idle one.
    fn check_deadlines(
        &mut self,
        sub: bool,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        now: Instant,
    ) -> Result<(), String> {
        let l = self.link(sub);
        if !l.up() {
            return Ok(());
        }
        if l.pending.front().is_some_and(|p| p.1 <= now) || l.ping_due.is_some_and(|d| d <= now) {
            m.redis_timeouts.inc();
            return Err(format!("no reply within {:?}", cfg.request_timeout));
        }
        let Some(every) = cfg.ping_interval else {
            return Ok(());
        };
        if now.duration_since(l.heard) >= every && l.pending.is_empty() && l.ping_due.is_none() {
            resp::encode(&mut l.out, &[b"PING"]);
            if sub {
                l.ping_due = Some(now + cfg.request_timeout);
            } else {
                l.pending
                    .push_back((Want::Ping, now + cfg.request_timeout, now));
            }
            l.heard = now; // one ping per interval
        }
        Ok(())
    }

    /// Writes what this iteration queued: one write per connection.
    pub(crate) fn flush(&mut self, shared: &Arc<Shared>, registry: &Registry) {
        let Some(cfg) = shared.cfg.redis_server(self.server) else {
            return;
        };
        let m = &shared.metrics[self.core];
        for sub in [false, true] {
            let l = self.link(sub);
            let State::Up { stream } = &mut l.state else {
                continue;
            };
            if l.written == l.out.len() {
                continue;
            }
            let mut failed = None;
            while l.written < l.out.len() {
                match stream.write(&l.out[l.written..]) {
                    Ok(0) => {
                        failed = Some("write returned 0".to_owned());
                        break;
                    }
                    Ok(n) => l.written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        l.writable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        failed = Some(format!("write failed: {e}"));
                        break;
                    }
                }
            }
            if l.written == l.out.len() {
                l.out.clear();
                l.written = 0;
                if l.out.capacity() > 4 * READ_CHUNK {
                    l.out = Vec::new();
                }
            } else if l.written > l.out.len() / 2 {
                l.out.drain(..l.written);
                l.written = 0;
            }
            if let Some(why) = failed {
                self.drop_link(sub, registry, cfg, m, &why);
            }
        }
        self.set_quiet(registry, cfg, m, shared.cfg.busy_poll);
    }

    /// Registers the command connection quiet or not (see [`Link::quiet`]):
    /// quiet while nothing but transfers is in flight and transfers went
    /// out within [`QUIET_HOLD`]. A hold past a burst's end listens again,
    /// so a Redis that closed the connection is noticed within it (the
    /// subscription connection notices at once); during a burst the reads
    /// at each iteration's end notice it. One `epoll_ctl` per
    /// change, not per message. Never with `busy_poll`: a spinning core
    /// wakes for nothing, and reading each spin would only add reads.
    fn set_quiet(
        &mut self,
        registry: &Registry,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        busy_poll: bool,
    ) {
        let l = &mut self.cmd;
        let State::Up { stream } = &mut l.state else {
            return;
        };
        let quiet = !busy_poll
            && l.pending.len() == l.transfers
            && (l.transfers > 0
                || l.last_transfer
                    .is_some_and(|t| self.now.saturating_duration_since(t) < QUIET_HOLD));
        if quiet == l.quiet {
            return;
        }
        let interest = if quiet {
            Interest::WRITABLE
        } else {
            // Replies that came while quiet raise an event at once.
            Interest::READABLE | Interest::WRITABLE
        };
        match registry.reregister(stream, l.token, interest) {
            Ok(()) => l.quiet = quiet,
            Err(e) => self.drop_link(false, registry, cfg, m, &format!("reregister: {e}")),
        }
    }

    /// End of an iteration: reads the replies a quiet command connection
    /// has, so they are counted without a wake-up of their own, once
    /// [`QUIET_BATCH`] transfers wait or the oldest waited [`QUIET_LAG`].
    pub(crate) fn read_quiet(&mut self, registry: &Registry, shared: &Arc<Shared>) {
        // Replies only count transfers, so they wait for a batch (or a
        // lag): one read per reply would cost a syscall per message.
        let l = &self.cmd;
        let due = l.transfers >= QUIET_BATCH
            || l.pending
                .front()
                .is_some_and(|p| self.now.saturating_duration_since(p.2) >= QUIET_LAG);
        if !(l.quiet && l.transfers > 0 && due) {
            return;
        }
        let Some(cfg) = shared.cfg.redis_server(self.server) else {
            return;
        };
        let m = &shared.metrics[self.core];
        self.cmd.readable = true;
        if let Err(why) = self.read(false, cfg, m) {
            self.drop_link(false, registry, cfg, m, &why);
        }
    }

    /// Ends a connection: every request it held fails, the backoff grows,
    /// the channels wait to be subscribed again.
    fn drop_link(
        &mut self,
        sub: bool,
        registry: &Registry,
        cfg: &RedisConfig,
        m: &CoreMetrics,
        why: &str,
    ) {
        let core = self.core;
        let l = self.link(sub);
        let was_up = l.up();
        match std::mem::replace(
            &mut l.state,
            State::Idle {
                retry_at: Instant::now(),
            },
        ) {
            State::Up { mut stream } | State::Connecting { mut stream, .. } => {
                let _ = registry.deregister(&mut stream);
            }
            _ => {}
        }
        let stable = l.up_since.take().is_some_and(|t| t.elapsed() >= STABLE);
        let delay = retry_delay(
            &mut l.attempts,
            stable,
            cfg.reconnect_delay,
            cfg.reconnect_max_delay,
        );
        l.state = State::Idle {
            retry_at: Instant::now() + delay,
        };
        l.out.clear();
        l.written = 0;
        l.inb.clear();
        l.readable = false;
        l.writable = false;
        l.ping_due = None;
        l.transfers = 0;
        l.quiet = false;
        let failed: Vec<_> = l.pending.drain(..).collect();
        let name = l.name();
        if was_up {
            m.redis_reconnects.inc();
            log::warn!("core {core}: redis {name} connection lost ({why}); retrying in {delay:?}");
        } else {
            log::debug!(
                "core {core}: redis {name} connection failed ({why}); retrying in {delay:?}"
            );
        }
        let answer = if why.starts_with("no reply") {
            Answer::Timeout
        } else {
            Answer::Down
        };
        for (want, _, _) in failed {
            match want {
                Want::Conn(c, tag) => self.events.push(Event::Answer(c, tag, answer.clone())),
                // Written or not, we cannot know: at most once.
                Want::Event => m.events_dropped.inc(),
                Want::Transfer => m.cluster_dropped.inc(),
                _ => {}
            }
        }
        if sub {
            // Subscribed again on reconnect; joiners keep waiting (their
            // own deadlines bound the wait).
            for s in self.subs.values_mut() {
                s.subscribed = false;
                s.outstanding = 0;
            }
            self.prune_subs();
            m.redis_channels.set(self.subs.len() as u64);
        }
    }

    /// The core shuts down: the connections close with it.
    pub(crate) fn close(&mut self, registry: &Registry) {
        for l in [&mut self.cmd, &mut self.sub] {
            if let State::Up { stream } | State::Connecting { stream, .. } = &mut l.state {
                let _ = registry.deregister(stream);
            }
            l.state = State::Idle {
                retry_at: Instant::now() + Duration::from_secs(3600),
            };
        }
    }
}

/// The ops of `mesh::Item::Redis` when only core 0 talks to Redis
/// (`redis.per_core: false`): other cores send commands and joins to it,
/// it sends answers, join results and channel messages (as fan-outs) back.
pub(crate) mod remote {
    use super::{Answer, Join};

    /// The core that holds the Redis connections then.
    pub(crate) const CORE: usize = 0;
    /// A command (encoded RESP) whose answer goes back, tagged.
    pub(crate) const CALL: u8 = 1;
    /// A command nobody waits for.
    pub(crate) const SEND: u8 = 2;
    /// An answer for a CALL.
    pub(crate) const ANSWER: u8 = 3;
    /// Join the channel named by the bytes.
    pub(crate) const JOIN: u8 = 4;
    /// A join's state (tag: READY, PENDING, DOWN), the channel id after.
    pub(crate) const JOINED: u8 = 5;
    /// Leave the channel whose id follows.
    pub(crate) const LEAVE: u8 = 6;
    /// An event (kept while Redis is away).
    pub(crate) const EVENT: u8 = 7;

    pub(crate) const READY: u8 = 0;
    pub(crate) const PENDING: u8 = 1;
    pub(crate) const DOWN: u8 = 2;

    /// Appends an answer.
    pub(crate) fn encode_answer(out: &mut Vec<u8>, a: &Answer) {
        match a {
            Answer::Nil => out.push(0),
            Answer::Int(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Answer::Bytes(b) => {
                out.push(2);
                out.extend_from_slice(b);
            }
            Answer::Array => out.push(3),
            Answer::Error(e) => {
                out.push(4);
                out.extend_from_slice(e.as_bytes());
            }
            Answer::Down => out.push(5),
            Answer::Timeout => out.push(6),
        }
    }

    /// Reads an answer (Down if it is not one).
    pub(crate) fn decode_answer(b: &[u8]) -> Answer {
        match b.split_first() {
            Some((0, _)) => Answer::Nil,
            Some((1, i)) => i
                .try_into()
                .map_or(Answer::Down, |i| Answer::Int(i64::from_le_bytes(i))),
            Some((2, v)) => Answer::Bytes(v.to_vec()),
            Some((3, _)) => Answer::Array,
            Some((4, e)) => Answer::Error(String::from_utf8_lossy(e).into_owned()),
            Some((6, _)) => Answer::Timeout,
            _ => Answer::Down,
        }
    }

    /// A join result as (state, channel id).
    pub(crate) fn join_state(j: Join) -> (u8, u32) {
        match j {
            Join::Ready(id) => (READY, id),
            Join::Pending(id) => (PENDING, id),
            Join::Down | Join::Remote => (DOWN, 0),
        }
    }
}

/// Resolves on a helper thread that wakes the core (never on a core).
fn resolve(host: String, port: u16, shared: Arc<Shared>, core: usize) -> State {
    match super::upstreams::resolve_in_background(host, port, shared, core) {
        Some(rx) => State::Resolving(rx),
        None => State::Idle {
            retry_at: Instant::now() + Duration::from_secs(1),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_entry_stays_small_and_gives_its_buffers_back() {
        // A core holds one per channel: an idle session's is one of these.
        assert!(
            std::mem::size_of::<Sub>() <= 40,
            "{}",
            std::mem::size_of::<Sub>()
        );
        let mut w: Few<u32> = Few::default();
        w.vec().extend([1, 2, 3]);
        w.retain(|&x| x != 2);
        assert_eq!(&*w, &[1, 3]);
        assert_eq!(w.take(), [1, 3]);
        assert!(w.0.is_none() && w.is_empty());
        w.vec().push(4);
        w.retain(|_| false);
        assert!(w.0.is_none(), "an emptied one holds no buffer");
    }
}

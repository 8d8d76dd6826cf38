//! [`Amqp`]: one core's AMQP 0-9-1 publisher, the sink of `events.amqp`
//! (wsgateway's `stream_amqp`). One non-blocking connection driven by the
//! core's loop, like its Redis client: no thread, no blocking call.
//!
//! Frames are read and written with `amq-protocol` (the codec the `lapin`
//! client is built on): it parses from a byte slice and writes into a
//! buffer, so it fits a loop that owns its socket. The one frame written
//! by hand is a publish's body (7 header bytes, the body, 0xCE), so that
//! an event is not copied once more on its way out.
//!
//! The connection: protocol header, `connection.start-ok` (PLAIN from the
//! URL), `tune-ok`, `open` (the vhost), channel 1, `confirm.select`, then
//! the exchange (a durable topic exchange, when named), the queue (durable,
//! when named) and its binding with `#`, as wsgateway declares them; after
//! every reconnect again.
//!
//! Delivery: an event counts as delivered when the broker confirms it
//! (publisher confirms). Events wait in one bounded per-core buffer
//! (`max_pending_bytes`, unsent and unconfirmed together) while the broker
//! is away, slow or blocking publishers; past it new events are dropped and
//! counted. After a reconnect the unconfirmed ones go out again first, in
//! order, then the rest: per-connection order holds (one channel per core,
//! and a WebSocket connection's events are all written by its core), and a
//! broker that lost the connection before confirming may see an event
//! twice (at least once). At most `max_in_flight` publishes are unconfirmed
//! at once. `mandatory` is set, so an event no queue takes comes back
//! (`basic.return`) and is counted.
//!
//! Failure: a connect or handshake past `connect_timeout`, a broker silent
//! for two heartbeats, a frame that does not parse or is larger than the
//! negotiated `frame_max`, a `connection.close` or `channel.close` from the
//! broker: the connection is dropped and dialled again with the sources'
//! capped backoff and jitter.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, ProtocolVersion};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use crossbeam_channel::Receiver;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::metrics::CoreMetrics;
use super::shared::Shared;
use super::stream::{Drain, Stream, TlsStream};
use super::upstreams::retry_delay;
use crate::config::AmqpConfig;
use crate::protocol::amqp::{next_frame, put, put_body, Next};

/// The AMQP connection's token on its core's poll (below the Redis ones).
pub(crate) const TOKEN: Token = Token(super::redis::TOKEN_FLOOR - 1);
/// The one channel events are published on.
const CHANNEL: u16 = 1;
/// The largest frame we accept (the broker may ask for less).
const FRAME_MAX: u32 = 128 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per iteration before the rest of the loop gets a turn.
const READS_PER_ITERATION: usize = 16;
/// Output held on the socket's side before publishing waits.
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// A connection that stayed up this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// AMQP's content class for `basic`.
const BASIC_CLASS: u16 = 60;

/// One event: its routing key and JSON body.
#[derive(Debug)]
struct Event {
    key: String,
    body: Vec<u8>,
}

impl Event {
    fn cost(&self) -> usize {
        self.key.len() + self.body.len() + std::mem::size_of::<Event>()
    }
}

/// How far the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Start,
    Tune,
    Open,
    Channel,
    Select,
    Exchange,
    Queue,
    Bind,
    Ready,
}

#[derive(Debug)]
struct Link {
    stream: Stream,
    /// The TCP connect completed.
    connected: bool,
    step: Step,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    written: usize,
    frame_max: u32,
    heartbeat: Option<Duration>,
    heard: Instant,
    said: Instant,
    /// The handshake's deadline (None once ready).
    deadline: Option<Instant>,
    /// The delivery tag of the next publish.
    next_tag: u64,
    /// `connection.blocked`: publish nothing until unblocked.
    blocked: bool,
    since: Instant,
}

#[derive(Debug)]
enum State {
    Idle { retry_at: Instant },
    Resolving(Receiver<io::Result<Vec<SocketAddr>>>),
    Linked(Box<Link>),
}

/// One core's publisher.
#[derive(Debug)]
pub(crate) struct Amqp {
    core: usize,
    state: State,
    /// Not yet published on the current connection, oldest first.
    pending: VecDeque<Event>,
    /// Published and not yet confirmed: (delivery tag, event).
    unconfirmed: VecDeque<(u64, Event)>,
    /// What both hold.
    bytes: usize,
    attempts: u32,
    readable: bool,
    writable: bool,
    /// Reused by the codec.
    scratch: Vec<u8>,
    /// The first failure since the last success was logged.
    warned: bool,
    /// `max_in_flight`.
    max_in_flight: usize,
}

fn method(class: AMQPClass, channel: u16) -> AMQPFrame {
    AMQPFrame::Method(channel, class)
}

/// What we tell the broker about ourselves: the capabilities we use.
fn client_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "basic.nack",
        "connection.blocked",
        "consumer_cancel_notify",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut p = FieldTable::default();
    p.insert("product".into(), AMQPValue::LongString("corerelay".into()));
    p.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

impl Amqp {
    pub(crate) fn new(core: usize, cfg: &AmqpConfig) -> Amqp {
        Amqp {
            core,
            state: State::Idle {
                retry_at: Instant::now(),
            },
            pending: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            bytes: 0,
            attempts: 0,
            readable: false,
            writable: false,
            scratch: Vec::new(),
            warned: false,
            max_in_flight: cfg.max_in_flight as usize,
        }
    }

    /// Queues an event (false: the buffer is full; dropped and counted).
    ///
    /// A routing key is an AMQP short string: at most 255 bytes. A longer
    /// one (rendered from tags or JSON) could never be sent, and would be
    /// retried forever ahead of every later event: it is dropped and
    /// counted instead.
    pub(crate) fn publish(
        &mut self,
        cfg: &AmqpConfig,
        m: &CoreMetrics,
        key: &str,
        body: Vec<u8>,
    ) -> bool {
        if key.len() > 255 {
            log::debug!(
                "core {}: amqp: a routing key of {} bytes (over 255): event dropped",
                self.core,
                key.len()
            );
            m.events_dropped.inc();
            m.amqp_dropped.inc();
            return false;
        }
        let e = Event {
            key: key.to_owned(),
            body,
        };
        if self.bytes + e.cost() > cfg.max_pending_bytes {
            m.events_dropped.inc();
            m.amqp_dropped.inc();
            return false;
        }
        self.bytes += e.cost();
        self.pending.push_back(e);
        m.amqp_buffered
            .set((self.pending.len() + self.unconfirmed.len()) as u64);
        true
    }

    /// Readiness from the core's poll.
    pub(crate) fn on_event(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    /// Anything to do at once (the core then polls without sleeping)?
    pub(crate) fn busy(&self) -> bool {
        match &self.state {
            State::Linked(l) => {
                self.readable
                    || (l.step == Step::Ready
                        && !l.blocked
                        && !self.pending.is_empty()
                        && self.unconfirmed.len() < self.max_in_flight
                        && l.wbuf.len() < MAX_WRITE_BUFFER
                        && self.writable)
            }
            _ => false,
        }
    }

    /// Drives the connection: dial when due, finish the connect, read and
    /// handle frames, publish what waits, keep the heartbeat. Never blocks.
    pub(crate) fn service(
        &mut self,
        cfg: &AmqpConfig,
        registry: &Registry,
        shared: &Arc<Shared>,
        now: Instant,
    ) {
        let m = &shared.metrics[self.core];
        if !matches!(self.state, State::Linked(_)) {
            self.dial(cfg, registry, shared, now);
        }
        if let Err(why) = self.drive(cfg, m, now) {
            self.drop_link(cfg, m, registry, now, &why);
        }
        m.amqp_buffered
            .set((self.pending.len() + self.unconfirmed.len()) as u64);
    }

    fn drive(&mut self, cfg: &AmqpConfig, m: &CoreMetrics, now: Instant) -> Result<(), String> {
        let State::Linked(l) = &mut self.state else {
            return Ok(());
        };
        if !l.connected {
            if !self.writable {
                return match l.deadline {
                    Some(d) if now >= d => Err("connect timeout".into()),
                    _ => Ok(()),
                };
            }
            match l.stream.take_error() {
                Ok(None) if l.stream.connected() => {}
                Ok(Some(e)) | Err(e) => return Err(format!("connect: {e}")),
                Ok(None) => {
                    self.writable = false;
                    return Ok(());
                }
            }
            l.connected = true;
            let _ = l.stream.set_nodelay(true);
            put(
                &mut l.wbuf,
                &mut self.scratch,
                &AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1()),
            )?;
            l.heard = now;
        }
        if let Some(d) = l.deadline {
            if now >= d {
                return Err("handshake timeout".into());
            }
        }
        if self.readable {
            self.readable = false;
            let mut chunk = [0u8; READ_CHUNK];
            // Edge-triggered: read until drained, within the budget (a TLS
            // read yields one record at a time, so a short read is not
            // "drained": `read_some` says which).
            for i in 0..READS_PER_ITERATION {
                let State::Linked(l) = &mut self.state else {
                    return Ok(());
                };
                let (n, drain) = match l.stream.read_some(&mut chunk) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Drain::More),
                    Err(e) => return Err(format!("read: {e}")),
                };
                if n > 0 {
                    l.rbuf.extend_from_slice(&chunk[..n]);
                    l.heard = now;
                    self.frames(cfg, m)?;
                }
                match drain {
                    Drain::Closed => return Err("closed by the broker".into()),
                    Drain::Drained => break,
                    Drain::More if i + 1 == READS_PER_ITERATION => self.readable = true,
                    Drain::More => {}
                }
            }
        }
        let State::Linked(l) = &mut self.state else {
            return Ok(());
        };
        if let Some(h) = l.heartbeat {
            if now.duration_since(l.heard) >= 2 * h {
                return Err(format!("no heartbeat for {:?}", 2 * h));
            }
            if now.duration_since(l.said) >= h / 2 && l.connected {
                l.wbuf.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0xCE]);
                l.said = now;
            }
        }
        self.send_pending(cfg, m)
    }

    /// Handles every complete frame in the read buffer.
    fn frames(&mut self, cfg: &AmqpConfig, m: &CoreMetrics) -> Result<(), String> {
        loop {
            let State::Linked(l) = &mut self.state else {
                return Ok(());
            };
            if l.rbuf.is_empty() {
                return Ok(());
            }
            let (used, frame) = match next_frame(&l.rbuf, l.frame_max) {
                Next::Frame(f, used) => (used, f),
                Next::Need => return Ok(()),
                Next::TooLarge => return Err("a frame over frame_max".into()),
                Next::Bad(e) => return Err(format!("bad frame: {e}")),
            };
            l.rbuf.drain(..used);
            self.frame(cfg, m, frame)?;
        }
    }

    fn frame(&mut self, cfg: &AmqpConfig, m: &CoreMetrics, f: AMQPFrame) -> Result<(), String> {
        let State::Linked(l) = &mut self.state else {
            return Ok(());
        };
        let out = &mut l.wbuf;
        let scratch = &mut self.scratch;
        let class = match f {
            AMQPFrame::Method(_, c) => c,
            // Heartbeats only prove the broker is there (`heard`); nothing
            // else is expected by a publisher.
            _ => return Ok(()),
        };
        match (l.step, class) {
            (Step::Start, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => {
                let mechs = String::from_utf8_lossy(s.mechanisms.as_bytes()).into_owned();
                if !mechs.split(' ').any(|x| x == "PLAIN") {
                    return Err(format!("the broker offers no PLAIN login ({mechs})"));
                }
                let response = format!("\0{}\0{}", cfg.user, cfg.password);
                let ok = connection::StartOk {
                    client_properties: client_properties(),
                    mechanism: "PLAIN".into(),
                    response: LongString::from(response),
                    locale: "en_US".into(),
                };
                put(
                    out,
                    scratch,
                    &method(
                        AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)),
                        0,
                    ),
                )?;
                l.step = Step::Tune;
            }
            (Step::Tune, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => {
                // The smaller of what each side allows (0: no limit).
                let frame_max = match t.frame_max {
                    0 => FRAME_MAX,
                    n => n.min(FRAME_MAX),
                };
                let ours = cfg
                    .heartbeat
                    .map_or(0, |h| h.as_secs().clamp(1, 65535) as u16);
                let heartbeat = match (t.heartbeat, ours) {
                    (0, x) | (x, 0) => x,
                    (a, b) => a.min(b),
                };
                l.frame_max = frame_max.max(4096);
                l.heartbeat = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
                let ok = connection::TuneOk {
                    channel_max: 1,
                    frame_max: l.frame_max,
                    heartbeat,
                };
                put(
                    out,
                    scratch,
                    &method(AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)), 0),
                )?;
                let open = connection::Open {
                    virtual_host: cfg.vhost.as_str().into(),
                };
                put(
                    out,
                    scratch,
                    &method(AMQPClass::Connection(connection::AMQPMethod::Open(open)), 0),
                )?;
                l.step = Step::Open;
            }
            (Step::Open, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {
                put(
                    out,
                    scratch,
                    &method(
                        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
                        CHANNEL,
                    ),
                )?;
                l.step = Step::Channel;
            }
            (Step::Channel, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => {
                let sel = confirm::Select { nowait: false };
                put(
                    out,
                    scratch,
                    &method(
                        AMQPClass::Confirm(confirm::AMQPMethod::Select(sel)),
                        CHANNEL,
                    ),
                )?;
                l.step = Step::Select;
            }
            (Step::Select, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))) => {
                self.declare(cfg, Step::Exchange)?;
            }
            (Step::Exchange, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_))) => {
                self.declare(cfg, Step::Queue)?;
            }
            (Step::Queue, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))) => {
                self.declare(cfg, Step::Bind)?;
            }
            (Step::Bind, AMQPClass::Queue(queue::AMQPMethod::BindOk(_))) => {
                self.declare(cfg, Step::Ready)?;
            }
            (Step::Ready, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => {
                self.settle(m, a.delivery_tag, a.multiple, true);
            }
            (Step::Ready, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
                self.settle(m, n.delivery_tag, n.multiple, false);
            }
            (_, AMQPClass::Basic(basic::AMQPMethod::Return(r))) => {
                // Its ack follows; it is counted here.
                m.amqp_returned.inc();
                log::debug!(
                    "core {}: amqp: an event to {:?} was returned: {} {}",
                    self.core,
                    r.routing_key.as_str(),
                    r.reply_code,
                    r.reply_text.as_str()
                );
            }
            (_, AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
                log::warn!(
                    "core {}: amqp {}: the broker blocks publishing ({})",
                    self.core,
                    cfg.url,
                    b.reason.as_str()
                );
                l.blocked = true;
            }
            (_, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_))) => {
                l.blocked = false;
            }
            (_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                let ok = connection::CloseOk {};
                let _ = put(
                    out,
                    scratch,
                    &method(
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(ok)),
                        0,
                    ),
                );
                let _ = l.stream.write(&out[l.written..]);
                return Err(format!(
                    "the broker closed the connection: {} {}",
                    c.reply_code,
                    c.reply_text.as_str()
                ));
            }
            (_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                return Err(format!(
                    "the broker closed the channel: {} {}",
                    c.reply_code,
                    c.reply_text.as_str()
                ));
            }
            (step, other) => {
                return Err(format!("unexpected {other:?} while at {step:?}"));
            }
        }
        Ok(())
    }

    /// Sends the next declaration from `step` on (skipping the ones not
    /// configured), or becomes ready.
    fn declare(&mut self, cfg: &AmqpConfig, mut step: Step) -> Result<(), String> {
        let State::Linked(l) = &mut self.state else {
            return Ok(());
        };
        let (out, scratch) = (&mut l.wbuf, &mut self.scratch);
        loop {
            match step {
                Step::Exchange if !cfg.exchange.is_empty() => {
                    let d = exchange::Declare {
                        exchange: cfg.exchange.as_str().into(),
                        kind: "topic".into(),
                        passive: false,
                        durable: true,
                        auto_delete: false,
                        internal: false,
                        nowait: false,
                        arguments: FieldTable::default(),
                    };
                    put(
                        out,
                        scratch,
                        &method(
                            AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)),
                            CHANNEL,
                        ),
                    )?;
                    break;
                }
                Step::Exchange => step = Step::Queue,
                Step::Queue if !cfg.queue.is_empty() => {
                    let d = queue::Declare {
                        queue: cfg.queue.as_str().into(),
                        passive: false,
                        durable: true,
                        exclusive: false,
                        auto_delete: false,
                        nowait: false,
                        arguments: FieldTable::default(),
                    };
                    put(
                        out,
                        scratch,
                        &method(AMQPClass::Queue(queue::AMQPMethod::Declare(d)), CHANNEL),
                    )?;
                    break;
                }
                Step::Queue => step = Step::Bind,
                Step::Bind if !cfg.queue.is_empty() && !cfg.exchange.is_empty() => {
                    let b = queue::Bind {
                        queue: cfg.queue.as_str().into(),
                        exchange: cfg.exchange.as_str().into(),
                        routing_key: "#".into(),
                        nowait: false,
                        arguments: FieldTable::default(),
                    };
                    put(
                        out,
                        scratch,
                        &method(AMQPClass::Queue(queue::AMQPMethod::Bind(b)), CHANNEL),
                    )?;
                    break;
                }
                Step::Bind => step = Step::Ready,
                _ => {
                    step = Step::Ready;
                    break;
                }
            }
        }
        l.step = step;
        if step == Step::Ready {
            l.deadline = None;
            self.warned = false;
            log::info!("core {}: amqp connection up ({})", self.core, cfg.url);
        }
        Ok(())
    }

    /// The broker confirmed (or refused) publishes up to `tag`.
    fn settle(&mut self, m: &CoreMetrics, tag: u64, multiple: bool, ok: bool) {
        let done = |e: Event, bytes: &mut usize| {
            *bytes -= e.cost();
            if ok {
                m.amqp_confirmed.inc();
            } else {
                // The broker could not take it (an internal error): it is
                // not delivered.
                m.amqp_nacked.inc();
                m.events_dropped.inc();
            }
        };
        if multiple {
            while self.unconfirmed.front().is_some_and(|(t, _)| *t <= tag) {
                if let Some((_, e)) = self.unconfirmed.pop_front() {
                    done(e, &mut self.bytes);
                }
            }
        } else if let Some(i) = self.unconfirmed.iter().position(|(t, _)| *t == tag) {
            if let Some((_, e)) = self.unconfirmed.remove(i) {
                done(e, &mut self.bytes);
            }
        }
    }

    /// Publishes what waits, within the in-flight and buffer bounds.
    fn send_pending(&mut self, cfg: &AmqpConfig, m: &CoreMetrics) -> Result<(), String> {
        let State::Linked(l) = &mut self.state else {
            return Ok(());
        };
        if l.step != Step::Ready || l.blocked {
            return Ok(());
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        while self.unconfirmed.len() < cfg.max_in_flight as usize && l.wbuf.len() < MAX_WRITE_BUFFER
        {
            let Some(e) = self.pending.pop_front() else {
                break;
            };
            let publish = basic::Publish {
                exchange: cfg.exchange.as_str().into(),
                routing_key: ShortString::from(e.key.as_str()),
                mandatory: true,
                immediate: false,
            };
            put(
                &mut l.wbuf,
                &mut self.scratch,
                &method(
                    AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
                    CHANNEL,
                ),
            )?;
            let props = basic::AMQPProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(ts);
            let header = AMQPContentHeader {
                class_id: BASIC_CLASS,
                body_size: e.body.len() as u64,
                properties: props,
            };
            put(
                &mut l.wbuf,
                &mut self.scratch,
                &AMQPFrame::Header(CHANNEL, BASIC_CLASS, Box::new(header)),
            )?;
            put_body(&mut l.wbuf, CHANNEL, &e.body, l.frame_max);
            let tag = l.next_tag;
            l.next_tag += 1;
            m.amqp_published.inc();
            self.unconfirmed.push_back((tag, e));
        }
        Ok(())
    }

    /// Writes what the iteration produced (one write per iteration).
    pub(crate) fn flush(&mut self, cfg: &AmqpConfig, shared: &Arc<Shared>, registry: &Registry) {
        let State::Linked(l) = &mut self.state else {
            return;
        };
        if !l.connected || l.written >= l.wbuf.len() {
            return;
        }
        // TLS records still held go first.
        match l.stream.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.writable = false;
                return;
            }
            Err(e) => {
                let m = &shared.metrics[self.core];
                return self.drop_link(cfg, m, registry, Instant::now(), &format!("write: {e}"));
            }
        }
        let r = loop {
            match l.stream.write(&l.wbuf[l.written..]) {
                Ok(0) => break Err("write returned 0".to_owned()),
                Ok(n) => {
                    l.written += n;
                    l.said = Instant::now();
                    if l.written >= l.wbuf.len() {
                        l.wbuf.clear();
                        l.written = 0;
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    break Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("write: {e}")),
            }
        };
        // Compact: a long-lived buffer keeps only what is unwritten.
        if let State::Linked(l) = &mut self.state {
            if l.written > 0 && l.written * 2 >= l.wbuf.len() {
                l.wbuf.drain(..l.written);
                l.written = 0;
            }
        }
        if let Err(why) = r {
            let m = &shared.metrics[self.core];
            self.drop_link(cfg, m, registry, Instant::now(), &why);
        }
    }

    fn dial(&mut self, cfg: &AmqpConfig, registry: &Registry, shared: &Arc<Shared>, now: Instant) {
        let addr = match &self.state {
            State::Idle { retry_at } if *retry_at <= now => match cfg.host.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, cfg.port),
                Err(_) => {
                    self.state = resolve(cfg.host.clone(), cfg.port, shared.clone(), self.core);
                    return;
                }
            },
            State::Resolving(rx) => match rx.try_recv() {
                Ok(Ok(addrs)) if !addrs.is_empty() => addrs[0],
                Ok(r) => {
                    let why = r.err().map_or("no address".into(), |e| e.to_string());
                    let m = &shared.metrics[self.core];
                    return self.drop_link(
                        cfg,
                        m,
                        registry,
                        now,
                        &format!("cannot resolve: {why}"),
                    );
                }
                Err(_) => return,
            },
            _ => return,
        };
        let opened = open_stream(cfg, addr).and_then(|mut s| {
            registry.register(&mut s, TOKEN, Interest::READABLE | Interest::WRITABLE)?;
            Ok(s)
        });
        match opened {
            Ok(stream) => {
                log::debug!("core {}: amqp connecting to {addr}", self.core);
                self.readable = false;
                self.writable = false;
                self.state = State::Linked(Box::new(Link {
                    stream,
                    connected: false,
                    step: Step::Start,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    written: 0,
                    frame_max: FRAME_MAX,
                    heartbeat: None,
                    heard: now,
                    said: now,
                    deadline: Some(now + cfg.connect_timeout),
                    next_tag: 1,
                    blocked: false,
                    since: now,
                }));
            }
            Err(e) => {
                let m = &shared.metrics[self.core];
                self.drop_link(cfg, m, registry, now, &format!("connect: {e}"));
            }
        }
    }

    /// Loses the connection (or the attempt): the unconfirmed events go
    /// back ahead of the rest, and the next attempt comes after the
    /// backoff.
    fn drop_link(
        &mut self,
        cfg: &AmqpConfig,
        m: &CoreMetrics,
        registry: &Registry,
        now: Instant,
        why: &str,
    ) {
        let was = std::mem::replace(&mut self.state, State::Idle { retry_at: now });
        let mut stable = false;
        if let State::Linked(mut l) = was {
            let _ = registry.deregister(&mut l.stream);
            stable = l.step == Step::Ready && now.duration_since(l.since) >= STABLE;
            if l.step == Step::Ready {
                m.amqp_reconnects.inc();
            }
        }
        m.amqp_up.set(0);
        while let Some((_, e)) = self.unconfirmed.pop_back() {
            self.pending.push_front(e);
        }
        let delay = retry_delay(
            &mut self.attempts,
            stable,
            cfg.reconnect_delay,
            cfg.reconnect_max_delay,
        );
        if self.warned {
            log::debug!(
                "core {}: amqp {}: {why}; retry in {delay:?}",
                self.core,
                cfg.url
            );
        } else {
            self.warned = true;
            log::warn!(
                "core {}: amqp {}: {why}; retry in {delay:?}",
                self.core,
                cfg.url
            );
        }
        self.state = State::Idle {
            retry_at: now + delay,
        };
        self.readable = false;
        self.writable = false;
    }

    /// Nothing more to wait for at shutdown: every event confirmed, or no
    /// broker to confirm them.
    pub(crate) fn settled(&self) -> bool {
        (self.pending.is_empty() && self.unconfirmed.is_empty()) || !self.up()
    }

    /// The core exits: what was never confirmed is counted as dropped.
    pub(crate) fn abandon(&mut self, m: &CoreMetrics) {
        let n = (self.pending.len() + self.unconfirmed.len()) as u64;
        if n > 0 {
            log::warn!(
                "core {}: amqp: {n} events not confirmed at shutdown",
                self.core
            );
        }
        m.amqp_dropped.add(n);
        m.events_dropped.add(n);
        self.pending.clear();
        self.unconfirmed.clear();
        self.bytes = 0;
        m.amqp_buffered.set(0);
    }

    /// Is the connection up and publishing?
    pub(crate) fn up(&self) -> bool {
        matches!(&self.state, State::Linked(l) if l.step == Step::Ready)
    }
}

/// A non-blocking connection to the broker: TLS for amqps://, with the
/// URL's host as SNI and certificate name.
fn open_stream(cfg: &AmqpConfig, addr: SocketAddr) -> io::Result<Stream> {
    let tcp = TcpStream::connect(addr)?;
    let Some(tls) = &cfg.tls else {
        return Ok(Stream::Tcp(tcp));
    };
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = rustls::ClientConnection::new(tls.clone(), name).map_err(io::Error::other)?;
    Ok(Stream::Tls(Box::new(TlsStream {
        tcp,
        tls: rustls::Connection::Client(conn),
    })))
}

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
    use crate::config::AmqpFile;

    fn cfg(max: u64) -> AmqpConfig {
        AmqpFile {
            url: Some("amqp://127.0.0.1:9/".into()),
            max_pending_bytes: Some(crate::config::Size(max)),
            ..AmqpFile::default()
        }
        .validate()
        .expect("config")
    }

    #[test]
    fn events_that_cannot_go_are_dropped_and_counted_not_retried() {
        let (c, m) = (cfg(1024), CoreMetrics::default());
        let mut a = Amqp::new(0, &c);
        // A key AMQP cannot carry (over 255 bytes).
        assert!(!a.publish(&c, &m, &"k".repeat(256), b"{}".to_vec()));
        assert!(a.publish(&c, &m, &"k".repeat(255), b"{}".to_vec()));
        // Past the buffer's bytes.
        let mut kept = 1;
        while a.publish(&c, &m, "k", vec![b'x'; 100]) {
            kept += 1;
            assert!(kept < 100, "the cap never applied");
        }
        assert_eq!(m.amqp_dropped.get(), 2);
        assert_eq!(m.events_dropped.get(), 2);
        assert_eq!(m.amqp_buffered.get(), kept);
        assert!(a.bytes <= 1024);
    }

    #[test]
    fn names_over_255_bytes_are_refused() {
        let e = AmqpFile {
            url: Some("amqp://h/".into()),
            exchange: Some("x".repeat(256)),
            ..AmqpFile::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.0, "exchange");
    }
}

//! The WebSocket stage (after the upgrade): frames are decoded in place;
//! control frames are answered here (ping -> pong, close -> close echo);
//! messages go where the endpoint says (`on_message`), or upstream for a
//! source's client. A protocol error sends its close code (1002/1007/1009)
//! and the connection closes once that is flushed. Goodbyes the core asks
//! for (kick, slow consumer, admin close, shutdown) are close frames too.
//!
//! The stage owns its tags and its channel membership: it indexed them on
//! the way in (the handshake stage) and leaves them in `on_close`.

use std::sync::Arc;

use super::deflate::ConnDeflate;
use super::rely::relay_transfer;
use super::session::on_session_message;
use super::Outcome;
use crate::config::{Endpoint, OnMessage};
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Queued};
use crate::engine::keepalive::{Due, Keepalive};
use crate::engine::message::{Message, Wire};
use crate::engine::route::Ctx;
use crate::engine::tags::{apply_changes, Selector, TagList};
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::rely::{self, Frame, Parse};
use crate::protocol::ws::{self, Decoder, Event};

/// Whose client this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A client of endpoint `n` (index in the config).
    Endpoint(u16),
    /// A client of upstream source `n`: its messages go upstream.
    Source(u16),
    /// A wsproxy session socket of endpoint `endpoint`, a member of Redis
    /// channel `channel` (its `:down`); its messages go to its `:up`.
    Session { endpoint: u16, channel: u32 },
}

/// A WebSocket client.
#[derive(Debug)]
pub(crate) struct WsStage {
    decoder: Decoder,
    role: Role,
    /// Its tags (key, value), sorted by key.
    tags: TagList,
    keepalive: Keepalive,
    /// For `on_message: broadcast`: the connections sharing this one's
    /// `broadcast_tag` value (None: it has no such tag).
    broadcast: Option<Arc<Selector>>,
    /// permessage-deflate, when its upgrade agreed it.
    deflate: Option<Box<ConnDeflate>>,
}

/// A new id for a client of an endpoint without `id_param`: its prefix and a
/// UUID v4, as wsgateway makes them.
pub(crate) fn generated_id(ep: &Endpoint) -> String {
    format!("{}{}", ep.id_prefix, uuid::Uuid::new_v4())
}

/// A close to send, and why.
type Goodbye = (u16, &'static str, CloseReason);

/// Queues a close frame (bypassing the byte limit: it is tiny and final)
/// and starts closing. Anything not yet on the wire is dropped first if
/// `discard_queued` (a slow consumer).
fn close_with(io: &mut Io, (code, reason, why): Goodbye, now: u64, discard_queued: bool) {
    if io.closing.is_some() {
        return;
    }
    if discard_queued {
        io.out.truncate_unstarted();
    }
    let mut f = Vec::with_capacity(4 + reason.len());
    ws::encode_close(&mut f, code, reason);
    io.out.push_bytes(&[&f]);
    io.close_after_flush(why, now);
}

impl WsStage {
    /// The source whose client this is, if it is one.
    pub(crate) fn source(&self) -> Option<u16> {
        match self.role {
            Role::Source(s) => Some(s),
            _ => None,
        }
    }

    /// A client of endpoint `index` with these tags.
    pub(crate) fn endpoint(
        index: usize,
        ep: &Endpoint,
        tags: TagList,
        broadcast: Option<Arc<Selector>>,
        cx: &Ctx<'_>,
    ) -> WsStage {
        WsStage {
            decoder: Decoder::new(ep.max_message_size),
            role: Role::Endpoint(index as u16),
            tags,
            keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
            broadcast,
            deflate: None,
        }
    }

    /// Compresses as its upgrade agreed.
    pub(crate) fn with_deflate(mut self, deflate: Option<Box<ConnDeflate>>) -> WsStage {
        if deflate.is_some() {
            self.decoder.allow_compressed();
        }
        self.deflate = deflate;
        self
    }

    /// Its row of permessage-deflate counters: its endpoint's, or the
    /// sources' clients' after the endpoints.
    fn stats_row(&self, cx: &Ctx<'_>) -> usize {
        self.row(cx.cfg().ws().endpoints.len())
    }

    /// [`Self::stats_row`] given the number of endpoints.
    pub(crate) fn row(&self, endpoints: usize) -> usize {
        match self.role {
            Role::Endpoint(i) | Role::Session { endpoint: i, .. } => i as usize,
            Role::Source(_) => endpoints,
        }
    }

    /// The wire its fanned-out messages take: plain frames, its core's
    /// shared compressed frames, or frames it compresses itself.
    #[inline]
    pub(crate) fn wire(&self) -> Wire {
        match &self.deflate {
            None => Wire::WsServer,
            Some(d) if d.shares_frames() => Wire::WsDeflate,
            Some(_) => Wire::WsOwn,
        }
    }

    /// A fanned-out message as this connection's own frame (`dedicated`:
    /// through its own context), for [`Wire::WsOwn`].
    pub(crate) fn own_frame(
        &mut self,
        msg: &Message,
        force_binary: bool,
        cx: &mut Ctx<'_>,
    ) -> Vec<u8> {
        let op = if force_binary || !msg.is_text() {
            ws::OP_BINARY
        } else {
            ws::OP_TEXT
        };
        let mut f = Vec::with_capacity(msg.bytes.len() + 14);
        let row = self.stats_row(cx);
        match self.deflate.as_deref_mut() {
            Some(d) => {
                let min = cx.cfg().ws().compression_min_size;
                if let Some(work) = d.frame(op, &msg.bytes, min, cx.codec(), &mut f) {
                    count_sent(cx, row, work);
                }
            }
            None => ws::encode_frame(&mut f, op, &msg.bytes),
        }
        f
    }

    /// A client of upstream source `src`.
    pub(crate) fn source_client(src: u16, max_message: usize, cx: &Ctx<'_>) -> WsStage {
        WsStage {
            decoder: Decoder::new(max_message),
            role: Role::Source(src),
            tags: TagList::default(),
            keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
            broadcast: None,
            deflate: None,
        }
    }

    /// A wsproxy session socket of endpoint `index`, a member of Redis
    /// channel `channel`, publishing to `up`.
    pub(crate) fn session(
        endpoint: u16,
        ep: &Endpoint,
        channel: u32,
        tags: TagList,
        cx: &Ctx<'_>,
    ) -> WsStage {
        WsStage {
            decoder: Decoder::new(ep.max_message_size),
            role: Role::Session { endpoint, channel },
            tags,
            keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
            broadcast: None,
            deflate: None,
        }
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let (on_message, events) = match self.role {
            Role::Source(_) | Role::Session { .. } => (None, None),
            Role::Endpoint(i) => match cx.cfg().ws().endpoints.get(i as usize) {
                Some(ep) => (Some(ep.on_message), ep.events.then_some(ep)),
                None => return Outcome::Close(CloseReason::Protocol),
            },
        };
        let row = self.stats_row(cx);
        let max = self.decoder.max_message();
        let Self {
            decoder,
            role,
            keepalive,
            broadcast,
            tags,
            deflate,
        } = self;
        // What to do after the decoder stops: a close to send, if any.
        let mut goodbye: Option<Goodbye> = None;
        let mut slow = false;
        // Inflated messages land here (the core's buffer, while in use).
        let mut inflated: Vec<u8> = Vec::new();
        let res = decoder.feed(input, |ev| {
            io.touch(cx.now());
            match ev {
                Event::Message {
                    text,
                    data,
                    compressed,
                } => {
                    cx.metrics().ws_messages_in.inc();
                    let data: &[u8] = match (compressed, deflate.as_deref_mut()) {
                        (false, _) => data,
                        (true, d) => {
                            if inflated.capacity() == 0 {
                                inflated = cx.codec().take_buf();
                            }
                            inflated.clear();
                            match inflate(d, data, &mut inflated, max, text, cx) {
                                Ok(()) => {
                                    if let Some(s) = cx.deflate_stats(row) {
                                        s.in_wire.add(data.len() as u64);
                                        s.in_plain.add(inflated.len() as u64);
                                    }
                                    &inflated
                                }
                                Err(e) => {
                                    log::debug!("{}: WebSocket {e}", io.peer());
                                    cx.metrics().protocol_errors.inc();
                                    goodbye = Some((e.close_code(), "", CloseReason::Protocol));
                                    return false;
                                }
                            }
                        }
                    };
                    // wsgateway's message event, in this connection's order.
                    if let (Some(ep), Some(l)) = (events, io.login.as_ref()) {
                        crate::engine::events::on_message(cx, me, ep, l.id(), tags, text, data);
                    }
                    let (Some(on_message), Role::Endpoint(_)) = (on_message, *role) else {
                        if let Role::Source(src) = *role {
                            // Kept as it is: text stays text, binary binary.
                            cx.send_upstream(src, text, data);
                        }
                        if let Role::Session { endpoint, .. } = *role {
                            slow = !on_session_message(io, me, endpoint, tags, text, data, cx);
                            return !slow;
                        }
                        return true;
                    };
                    match on_message {
                        OnMessage::Echo => {
                            let op = if text { ws::OP_TEXT } else { ws::OP_BINARY };
                            // Own writes share the connection's queue and limit.
                            let q = match deflate.as_deref_mut() {
                                None => {
                                    let (h, n) = ws::header_array(op, data.len());
                                    let drops = &cx.metrics().slow_consumer_drop;
                                    io.push_own(&[&h[..n], data], drops)
                                }
                                Some(d) => {
                                    let min = cx.cfg().ws().compression_min_size;
                                    let mut f = Vec::with_capacity(data.len() + 14);
                                    if let Some(work) = d.frame(op, data, min, cx.codec(), &mut f) {
                                        count_sent(cx, row, work);
                                    }
                                    io.push_own(&[&f], &cx.metrics().slow_consumer_drop)
                                }
                            };
                            slow = q == Queued::Disconnect;
                            !slow
                        }
                        OnMessage::Broadcast => {
                            match broadcast {
                                Some(sel) => cx.fanout(
                                    sel.clone(),
                                    Message::new(text, data),
                                    false,
                                    Some(me),
                                ),
                                None => cx.metrics().ws_discarded.inc(),
                            }
                            true
                        }
                        OnMessage::Rely => match rely_message(text, data, io, cx) {
                            Ok(()) => true,
                            Err(bad) => {
                                goodbye = Some(bad);
                                false
                            }
                        },
                        OnMessage::None => {
                            cx.metrics().ws_discarded.inc();
                            true
                        }
                    }
                }
                Event::Ping(p) => {
                    // A pong is an own write like an echo: it obeys the
                    // connection's limit, or a client that pings and never
                    // reads would grow the server without bound.
                    let (h, n) = ws::header_array(ws::OP_PONG, p.len());
                    let drops = &cx.metrics().slow_consumer_drop;
                    slow = io.push_own(&[&h[..n], p], drops) == Queued::Disconnect;
                    !slow
                }
                Event::Pong(_) => {
                    keepalive.on_pong();
                    true
                }
                Event::Close { code, .. } => {
                    // Echo the peer's code (RFC 6455 5.5.1), then close.
                    goodbye = Some((code.unwrap_or(ws::CLOSE_NORMAL), "", CloseReason::Closed));
                    false
                }
            }
        });
        if inflated.capacity() > 0 {
            cx.codec().put_buf(inflated);
        }
        if let Err(e) = res {
            log::debug!("{}: WebSocket {e}", io.peer());
            cx.metrics().protocol_errors.inc();
            goodbye = Some((e.close_code(), "", CloseReason::Protocol));
        }
        if slow {
            cx.metrics().slow_consumer_disconnect.inc();
            return self.goodbye(io, CloseReason::SlowConsumer, cx.now());
        }
        if let Some(g) = goodbye {
            close_with(io, g, cx.now(), false);
        }
        Outcome::Continue
    }

    pub(crate) fn due(&self, io: &Io, t: &Timing) -> Option<u64> {
        let ping = self.keepalive.due(t.ws_pong);
        let idle = t.ws_idle.map(|i| io.last_active() + i);
        match (ping, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Send the next ping, or give up on an unanswered one or an idle
    /// client.
    pub(crate) fn on_deadline(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let (now, t) = (cx.now(), cx.timing());
        if self.keepalive.dead(now, t.ws_pong) {
            log::debug!("{}: ping unanswered", io.peer());
            cx.metrics().ws_ping_timeouts.inc();
            return Outcome::Close(CloseReason::PingTimeout);
        }
        if t.ws_idle.is_some_and(|i| io.last_active() + i <= now) {
            cx.metrics().idle_timeouts.inc();
            close_with(
                io,
                (ws::CLOSE_NORMAL, "idle timeout", CloseReason::Idle),
                now,
                false,
            );
            return Outcome::Continue;
        }
        if self.keepalive.on_deadline(now, t.ws_ping, t.ws_pong) == Due::Ping {
            let mut f = Vec::with_capacity(2);
            ws::encode_frame(&mut f, ws::OP_PING, b"");
            io.out.push_bytes(&[&f]);
            // A live connection keeps its sync hashes from expiring.
            if let (Role::Endpoint(_), Some(l)) = (self.role, io.login.as_ref()) {
                crate::engine::events::refresh(cx, me, l.id());
            }
        }
        Outcome::Continue
    }

    /// A close frame for a goodbye the core asks for; the connection
    /// closes once it is flushed.
    pub(crate) fn goodbye(&mut self, io: &mut Io, why: CloseReason, now: u64) -> Outcome {
        let (g, discard) = match why {
            // Its id now belongs to the newer connection. The login is kept
            // (its close event names it); releasing it at close is
            // epoch-checked, so it cannot touch the newer login.
            CloseReason::Kicked => (
                (ws::CLOSE_POLICY, "replaced by a newer connection", why),
                false,
            ),
            CloseReason::SlowConsumer => ((ws::CLOSE_POLICY, "slow consumer", why), true),
            CloseReason::Shutdown => ((ws::CLOSE_GOING_AWAY, "server shutting down", why), false),
            CloseReason::SourceRemoved => ((ws::CLOSE_GOING_AWAY, "source removed", why), false),
            _ => ((ws::CLOSE_NORMAL, "Closed by server", why), false),
        };
        close_with(io, g, now, discard);
        Outcome::Continue
    }

    pub(crate) fn on_close(&mut self, io: &Io, me: ConnId, cx: &mut Ctx<'_>) {
        let slot = me.slot as usize;
        if let (Role::Endpoint(i), Some(l)) = (self.role, io.login.as_ref()) {
            if let Some(ep) = cx.cfg().ws().endpoints.get(i as usize).filter(|e| e.events) {
                // A replaced connection's id now names the newer one: its
                // close event goes out, but the newer one's hashes stay.
                let replaced = io.closing.is_some_and(|c| c.reason == CloseReason::Kicked);
                crate::engine::events::on_close(cx, me, ep, l.id(), &self.tags, !replaced);
            }
        }
        cx.untag(slot, std::mem::take(&mut self.tags));
        match self.role {
            Role::Source(src) => cx.leave(Channel::Source(src), slot),
            Role::Session { channel: ch, .. } => {
                cx.leave(Channel::Redis(ch), slot);
                cx.redis_leave(ch, me);
                let m = cx.metrics();
                m.session_sockets
                    .set(m.session_sockets.get().saturating_sub(1));
            }
            Role::Endpoint(_) => {}
        }
    }

    /// Applies tag changes, keeping the index exact.
    pub(crate) fn set_tags(
        &mut self,
        io: &Io,
        me: ConnId,
        changes: &[(String, String)],
        cx: &mut Ctx<'_>,
    ) -> bool {
        let Role::Endpoint(i) = self.role else {
            return false;
        };
        let slot = me.slot as usize;
        // Out of the index under the old list, back in under the new one:
        // the list may be shared, and the new one may match another's.
        let mut tags = self.tags.to_vec();
        cx.untag(slot, std::mem::take(&mut self.tags));
        let (removed, added) = apply_changes(&mut tags, changes);
        self.tags = tags.into();
        cx.tag(slot, &mut self.tags);
        if let Some(ep) = cx.cfg().ws().endpoints.get(i as usize) {
            self.broadcast = cx.broadcast_selector(ep.broadcast_tag.as_deref(), &self.tags);
            if let Some(l) = io.login.as_ref() {
                crate::engine::events::on_tags(cx, me, ep, l.id(), &removed, &added);
            }
        }
        true
    }

    /// Gives a client of an endpoint that generates ids the id it has not
    /// been given yet (see the handshake): /status is about to show it.
    fn ensure_id(&self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) {
        if io.login.is_some() {
            return;
        }
        let Role::Endpoint(i) = self.role else {
            return;
        };
        let Some(id) = cx
            .cfg()
            .ws()
            .endpoints
            .get(i as usize)
            .filter(|ep| ep.id_param.is_none())
            .map(generated_id)
        else {
            return;
        };
        io.login = Some(cx.login(id.as_bytes(), me));
    }

    /// Appends this connection's /status entry.
    pub(crate) fn status(
        &self,
        io: &mut Io,
        me: ConnId,
        json: bool,
        out: &mut Vec<u8>,
        cx: &mut Ctx<'_>,
    ) -> bool {
        self.ensure_id(io, me, cx);
        let id = io
            .login
            .as_ref()
            .map(|l| String::from_utf8_lossy(l.id()).into_owned())
            .unwrap_or_default();
        if json {
            let tags: serde_json::Map<String, serde_json::Value> = self
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
            for (k, v) in self.tags.iter() {
                out.extend_from_slice(format!(" {k}={v}").as_bytes());
            }
            out.push(b'\n');
        }
        true
    }
}

/// Inflates a compressed message into `out` (at most `max` bytes) and
/// checks a text message's UTF-8, which the decoder left to this.
fn inflate(
    d: Option<&mut ConnDeflate>,
    data: &[u8],
    out: &mut Vec<u8>,
    max: usize,
    text: bool,
    cx: &mut Ctx<'_>,
) -> Result<(), ws::WsError> {
    // The decoder refuses RSV1 unless the upgrade agreed on deflate.
    let d = d.ok_or(ws::WsError::Protocol("RSV1 without an extension"))?;
    d.inflate(data, out, max, cx.codec()).inspect_err(|e| {
        if *e == ws::WsError::BadDeflate {
            cx.metrics().ws_inflate_errors.inc();
        }
    })?;
    if text && std::str::from_utf8(out).is_err() {
        return Err(ws::WsError::InvalidUtf8);
    }
    Ok(())
}

/// Counts one compressed send: the compressor's work on this core and its
/// endpoint's bytes before and after.
pub(crate) fn count_sent(cx: &Ctx<'_>, row: usize, (plain, wire): (usize, usize)) {
    let m = cx.metrics();
    m.ws_compressor_input_bytes.add(plain as u64);
    m.ws_compressor_output_bytes.add(wire as u64);
    if let Some(s) = cx.deflate_stats(row) {
        s.out_plain.add(plain as u64);
        s.out_wire.add(wire as u64);
    }
}

/// `on_message: rely`: a binary message is one RELY transfer frame, routed
/// by the RELY rule ([`relay_transfer`]). Errors carry the close to send.
fn rely_message(text: bool, data: &[u8], io: &Io, cx: &mut Ctx<'_>) -> Result<(), Goodbye> {
    if text {
        return Err((
            ws::CLOSE_UNSUPPORTED,
            "send RELY transfer frames as binary messages",
            CloseReason::Protocol,
        ));
    }
    let (from, to) = match rely::parse(data, cx.cfg().rely.max_payload) {
        Ok(Parse::Frame(Frame::Transfer { from, to, .. }, used)) if used == data.len() => {
            (from, to)
        }
        _ => {
            cx.metrics().protocol_errors.inc();
            return Err((
                ws::CLOSE_INVALID_DATA,
                "not one RELY transfer frame",
                CloseReason::Protocol,
            ));
        }
    };
    match relay_transfer(cx, io.login.as_ref(), from, to, data) {
        Ok(()) => {
            cx.metrics().frames_in.inc();
            Ok(())
        }
        Err(_) => Err((
            ws::CLOSE_POLICY,
            "FromClientID is not this connection's id",
            CloseReason::Spoofed,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::test_io;
    use crate::engine::mesh::Item;
    use crate::engine::message::FanOp;
    use crate::engine::route::test::{deliveries, TestCx};
    use crate::engine::tags::Tag;

    const CFG: &str = "workers: 2\npin: false\nwebsocket:\n  listen: []\n  endpoints:\n    - path: /echo\n      on_message: echo\n    - path: /room/{room}\n      on_message: broadcast\n      broadcast_tag: room\n    - path: /rely/{id}\n      id_param: id\n      on_message: rely\nsources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    websocket_port: 0\n  - url: \"ws://127.0.0.1:9/other\"\n    websocket_port: 0\n";

    fn me() -> ConnId {
        ConnId {
            core: 0,
            slot: 4,
            gen: 1,
        }
    }

    /// A masked client frame.
    fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        ws::encode_masked(&mut f, op, payload, [1, 2, 3, 4]);
        f
    }

    fn client(t: &mut TestCx, endpoint: usize, tags: Vec<Tag>) -> WsStage {
        let mut cx = t.cx();
        let tag = cx.cfg().ws().endpoints[endpoint].broadcast_tag.clone();
        let b = cx.broadcast_selector(tag.as_deref(), &tags);
        let tags = tags.into();
        let ep = &cx.cfg().ws().endpoints[endpoint];
        WsStage::endpoint(endpoint, ep, tags, b, &cx)
    }

    #[test]
    fn echo_answers_on_the_same_connection() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = client(&mut t, 0, Vec::new());
        let out = st.on_bytes(&mut io, me(), &mut frame(ws::OP_TEXT, b"hi"), &mut t.cx());
        assert!(matches!(out, Outcome::Continue));
        assert_eq!(io.out.contents(), b"\x81\x02hi");
    }

    #[test]
    fn broadcast_is_one_message_per_core_without_the_sender() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = client(&mut t, 1, vec![("room".into(), "r1".into())]);
        st.on_bytes(
            &mut io,
            me(),
            &mut frame(ws::OP_TEXT, b"hello"),
            &mut t.cx(),
        );
        let local = t.local();
        let other = t.sent_to(1);
        for f in [&local.fanouts[0], &other[0].fanouts[0]] {
            assert_eq!(f.exclude, Some(me()));
            assert!(matches!(f.op, FanOp::Send));
            let m = f.msg.as_ref().expect("a message");
            assert_eq!((m.is_text(), &*m.bytes), (true, &b"hello"[..]));
            assert_eq!(
                *f.selector,
                Selector::Tags(vec![("room".into(), "r1".into())])
            );
        }
        assert!(io.out.is_empty(), "nothing back to the sender");
    }

    #[test]
    fn rely_mode_routes_binary_transfers_and_refuses_text() {
        let mut t = TestCx::new(CFG, 2);
        let holder = ConnId {
            core: 0,
            slot: 9,
            gen: 3,
        };
        t.dir.login(b"bob", holder);
        let mut io = test_io("127.0.0.1:1");
        io.login = Some(t.cx().login(b"alice", me()));
        let mut st = client(&mut t, 2, Vec::new());
        let mut transfer = Vec::new();
        rely::encode_transfer(&mut transfer, b"alice", b"bob", b"x");
        st.on_bytes(
            &mut io,
            me(),
            &mut frame(ws::OP_BINARY, &transfer),
            &mut t.cx(),
        );
        assert_eq!(deliveries(&t.local()), vec![(holder, transfer.clone())]);
        let mut spoof = Vec::new();
        rely::encode_transfer(&mut spoof, b"mallory", b"bob", b"x");
        st.on_bytes(
            &mut io,
            me(),
            &mut frame(ws::OP_BINARY, &spoof),
            &mut t.cx(),
        );
        assert_eq!(io.closing.map(|c| c.reason), Some(CloseReason::Spoofed));
        assert_eq!(&io.out.contents()[..4], b"\x88\x2a\x03\xf0", "close 1008");
        assert_eq!(t.m().spoofed_from, 1);
    }

    #[test]
    fn a_source_client_sends_upstream_to_the_owner_core() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = WsStage::source_client(1, 1024, &t.cx());
        st.on_bytes(&mut io, me(), &mut frame(ws::OP_BINARY, b"up"), &mut t.cx());
        assert!(t.local().items.is_empty(), "source 1 is owned by core 1");
        let b = t.sent_to(1);
        assert!(matches!(
            b[0].items[..],
            [Item::ToSource {
                source: 1,
                text: false,
                ..
            }]
        ));
        assert_eq!(b[0].data, b"up");
    }

    #[test]
    fn ping_pong_and_a_protocol_error() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = client(&mut t, 0, Vec::new());
        st.on_bytes(&mut io, me(), &mut frame(ws::OP_PING, b"p"), &mut t.cx());
        assert_eq!(io.out.contents(), b"\x8a\x01p");
        let mut unmasked = vec![0x81, 0x01, b'x'];
        st.on_bytes(&mut io, me(), &mut unmasked, &mut t.cx());
        assert_eq!(io.closing.map(|c| c.reason), Some(CloseReason::Protocol));
        assert_eq!(&io.out.contents()[3..], b"\x88\x02\x03\xea", "close 1002");
        assert_eq!(t.m().protocol_errors, 1);
    }

    #[test]
    fn a_kick_says_why_and_its_cleanup_leaves_the_newer_login() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        io.login = Some(t.cx().login(b"alice", me()));
        let newer = ConnId {
            core: 1,
            slot: 9,
            gen: 3,
        };
        t.cx().login(b"alice", newer);
        let mut st = client(&mut t, 0, Vec::new());
        st.goodbye(&mut io, CloseReason::Kicked, 1);
        // What the core does at close: an epoch-checked logout.
        let l = io.login.take().expect("kept for the close event");
        t.cx().logout(&l);
        assert_eq!(t.dir.lookup(b"alice"), Some(newer));
        let out = io.out.contents();
        assert_eq!(&out[2..4], &1008u16.to_be_bytes());
        assert!(out.ends_with(b"replaced by a newer connection"));
    }

    #[test]
    fn closing_leaves_the_tag_index_and_the_channel() {
        let mut t = TestCx::new(CFG, 2);
        let tags: Vec<Tag> = vec![("room".into(), "r1".into())];
        let mut st = client(&mut t, 1, tags.clone());
        t.cx().tag(4, &mut st.tags);
        st.on_close(&test_io("127.0.0.1:1"), me(), &mut t.cx());
        let mut slots = Vec::new();
        t.tags.select(&tags, &mut slots);
        assert!(slots.is_empty());
        t.cx().join(Channel::Source(0), 4);
        let mut src = WsStage::source_client(0, 1024, &t.cx());
        src.on_close(&test_io("127.0.0.1:1"), me(), &mut t.cx());
        assert_eq!(t.channels.len(Channel::Source(0)), 0);
    }
}

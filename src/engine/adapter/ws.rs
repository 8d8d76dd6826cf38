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

use super::rely::relay_transfer;
use super::Outcome;
use crate::config::{Endpoint, OnMessage};
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Queued};
use crate::engine::keepalive::{Due, Keepalive};
use crate::engine::message::Message;
use crate::engine::route::Ctx;
use crate::engine::tags::{apply_changes, Selector, Tag};
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
}

/// A WebSocket client.
#[derive(Debug)]
pub(crate) struct WsStage {
    decoder: Decoder,
    role: Role,
    /// Its tags (key, value), sorted by key.
    tags: Vec<Tag>,
    keepalive: Keepalive,
    /// For `on_message: broadcast`: the connections sharing this one's
    /// `broadcast_tag` value (None: it has no such tag).
    broadcast: Option<Arc<Selector>>,
}

/// A close to send, and why.
type Goodbye = (u16, &'static str, CloseReason);

/// The selector for `on_message: broadcast`: connections whose `tag` has
/// this connection's value.
pub(crate) fn broadcast_selector(tag: Option<&str>, tags: &[Tag]) -> Option<Arc<Selector>> {
    let tag = tag?;
    let (k, v) = tags.iter().find(|(k, _)| **k == *tag)?;
    Some(Arc::new(Selector::Tags(vec![(k.clone(), v.clone())])))
}

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
    /// A client of endpoint `index` with these tags.
    pub(crate) fn endpoint(
        index: usize,
        ep: &Endpoint,
        tags: Vec<Tag>,
        broadcast: Option<Arc<Selector>>,
        cx: &Ctx<'_>,
    ) -> WsStage {
        WsStage {
            decoder: Decoder::new(ep.max_message_size),
            role: Role::Endpoint(index as u16),
            tags,
            keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
            broadcast,
        }
    }

    /// A client of upstream source `src`.
    pub(crate) fn source_client(src: u16, max_message: usize, cx: &Ctx<'_>) -> WsStage {
        WsStage {
            decoder: Decoder::new(max_message),
            role: Role::Source(src),
            tags: Vec::new(),
            keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
            broadcast: None,
        }
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let on_message = match self.role {
            Role::Source(_) => None,
            Role::Endpoint(i) => match cx.cfg().ws().endpoints.get(i as usize) {
                Some(ep) => Some(ep.on_message),
                None => return Outcome::Close(CloseReason::Protocol),
            },
        };
        let Self {
            decoder,
            role,
            keepalive,
            broadcast,
            ..
        } = self;
        // What to do after the decoder stops: a close to send, if any.
        let mut goodbye: Option<Goodbye> = None;
        let mut slow = false;
        let res = decoder.feed(input, |ev| {
            io.last_active = cx.now();
            match ev {
                Event::Message { text, data } => {
                    cx.metrics().ws_messages_in.inc();
                    let (Some(on_message), Role::Endpoint(_)) = (on_message, *role) else {
                        if let Role::Source(src) = *role {
                            // Kept as it is: text stays text, binary binary.
                            cx.send_upstream(src, text, data);
                        }
                        return true;
                    };
                    match on_message {
                        OnMessage::Echo => {
                            let op = if text { ws::OP_TEXT } else { ws::OP_BINARY };
                            let (h, n) = ws::header_array(op, data.len());
                            // Own writes share the connection's queue and limit.
                            match io.admit(n + data.len()) {
                                Queued::Yes => io.out.push_bytes(&[&h[..n], data]),
                                Queued::Dropped => cx.metrics().slow_consumer_drop.inc(),
                                Queued::Disconnect => {
                                    slow = true;
                                    return false;
                                }
                            }
                            true
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
                    let (h, n) = ws::header_array(ws::OP_PONG, p.len());
                    io.out.push_bytes(&[&h[..n], p]);
                    true
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
        if let Err(e) = res {
            log::debug!("{}: WebSocket {e}", io.peer);
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
        let idle = t.ws_idle.map(|i| io.last_active + i);
        match (ping, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Send the next ping, or give up on an unanswered one or an idle
    /// client.
    pub(crate) fn on_deadline(&mut self, io: &mut Io, cx: &mut Ctx<'_>) -> Outcome {
        let (now, t) = (cx.now(), cx.timing());
        if self.keepalive.dead(now, t.ws_pong) {
            log::debug!("{}: ping unanswered", io.peer);
            cx.metrics().ws_ping_timeouts.inc();
            return Outcome::Close(CloseReason::PingTimeout);
        }
        if t.ws_idle.is_some_and(|i| io.last_active + i <= now) {
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
        }
        Outcome::Continue
    }

    /// A close frame for a goodbye the core asks for; the connection
    /// closes once it is flushed.
    pub(crate) fn goodbye(&mut self, io: &mut Io, why: CloseReason, now: u64) -> Outcome {
        let (g, discard) = match why {
            CloseReason::Kicked => {
                // Its id now belongs to the newer connection: forget it here
                // so cleanup cannot touch the newer login.
                io.login = None;
                (
                    (ws::CLOSE_POLICY, "replaced by a newer connection", why),
                    false,
                )
            }
            CloseReason::SlowConsumer => ((ws::CLOSE_POLICY, "slow consumer", why), true),
            CloseReason::Shutdown => ((ws::CLOSE_GOING_AWAY, "server shutting down", why), false),
            _ => ((ws::CLOSE_NORMAL, "Closed by server", why), false),
        };
        close_with(io, g, now, discard);
        Outcome::Continue
    }

    pub(crate) fn on_close(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        let slot = me.slot as usize;
        cx.untag(slot, &self.tags);
        if let Role::Source(src) = self.role {
            cx.leave(Channel::Source(src), slot);
        }
    }

    /// Applies tag changes, keeping the index exact.
    pub(crate) fn set_tags(
        &mut self,
        me: ConnId,
        changes: &[(String, String)],
        cx: &mut Ctx<'_>,
    ) -> bool {
        let Role::Endpoint(i) = self.role else {
            return false;
        };
        let slot = me.slot as usize;
        let (removed, added) = apply_changes(&mut self.tags, changes);
        cx.untag(slot, &removed);
        cx.tag(slot, &added);
        if let Some(ep) = cx.cfg().ws().endpoints.get(i as usize) {
            self.broadcast = broadcast_selector(ep.broadcast_tag.as_deref(), &self.tags);
        }
        true
    }

    /// Appends this connection's /status entry.
    pub(crate) fn status(&self, io: &Io, json: bool, out: &mut Vec<u8>) -> bool {
        let id = io
            .login
            .as_ref()
            .map(|l| String::from_utf8_lossy(&l.id).into_owned())
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
            for (k, v) in &self.tags {
                out.extend_from_slice(format!(" {k}={v}").as_bytes());
            }
            out.push(b'\n');
        }
        true
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

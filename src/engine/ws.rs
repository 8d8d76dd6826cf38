//! The WebSocket adapter: the HTTP upgrade stage and the WebSocket stage.
//!
//! Handshake: the request head accumulates in the connection (capped at
//! `max_handshake_bytes`, bounded in time by `handshake_timeout`), is parsed
//! with httparse, routed to an endpoint, and answered with 101 or a 4xx
//! (then the connection closes once that is flushed). Bytes that follow the
//! head in the same read are frames and go straight to the new stage.
//!
//! WebSocket: frames are decoded in place; control frames are answered here
//! (ping -> pong, close -> close echo); messages go where the endpoint says.
//! A protocol error sends its close code (1002/1007/1009) and the
//! connection closes once that is flushed.

use super::conn::{admit, CloseReason, Conn, Handshake, Login, Proto, Queued, Timing, WsState};
use std::sync::Arc;

use super::admin::{self, AdminState};
use super::route::Ctx;
use super::tags::Selector;
use super::ConnId;
use crate::config::{
    OnMessage, DEFAULT_SLOW_CONSUMER, DEFAULT_WS_MAX_HANDSHAKE_BYTES, DEFAULT_WS_MAX_MESSAGE,
    DEFAULT_WS_MAX_OUTPUT_BYTES,
};
use crate::protocol::http::{self, HttpError};
use crate::protocol::rely::{self, Frame, Parse};
use crate::protocol::ws::{self, Event};

/// A new WebSocket listener connection's first stage (`source`: a source's
/// listener).
pub fn handshake_stage(t: &Timing, now: u64, source: Option<u16>) -> Proto {
    Proto::Handshake(Handshake {
        buf: Vec::new(),
        deadline: now + t.ws_handshake,
        source,
    })
}

/// `on_message: rely`: a binary message is one RELY transfer frame, routed
/// by ToClientID exactly as a RELY client's would be. Errors carry the close
/// to send.
fn rely_message(
    text: bool,
    data: &[u8],
    login: Option<&Login>,
    cx: &mut Ctx<'_>,
) -> Result<(), (u16, &'static str, CloseReason)> {
    if text {
        return Err((
            ws::CLOSE_UNSUPPORTED,
            "send RELY transfer frames as binary messages",
            CloseReason::Protocol,
        ));
    }
    let malformed = (
        ws::CLOSE_INVALID_DATA,
        "not one RELY transfer frame",
        CloseReason::Protocol,
    );
    let (from, to) = match rely::parse(data, cx.cfg.rely.max_payload) {
        Ok(Parse::Frame(Frame::Transfer { from, to, .. }, used)) if used == data.len() => {
            (from, to)
        }
        _ => {
            cx.metrics.protocol_errors.inc();
            return Err(malformed);
        }
    };
    if cx.cfg.rely.check_from && login.is_none_or(|l| *l.id != *from) {
        cx.metrics.spoofed_from.inc();
        return Err((
            ws::CLOSE_POLICY,
            "FromClientID is not this connection's id",
            CloseReason::Spoofed,
        ));
    }
    cx.metrics.frames_in.inc();
    if to.is_empty() {
        cx.metrics.heartbeats.inc();
    } else if !cx.send_to_id(to, &[data]) {
        cx.metrics.dropped_offline.inc();
    }
    Ok(())
}

fn refuse(conn: &mut Conn, e: HttpError, cx: &mut Ctx<'_>) {
    log::debug!("{}: handshake refused: {e:?}", conn.peer);
    cx.metrics.ws_handshake_errors.inc();
    conn.out.push_bytes(&[&e.response()]);
    conn.begin_closing(CloseReason::Protocol, cx.now);
}

/// Feeds bytes to a connection in the handshake stage.
pub fn on_handshake_bytes(conn: &mut Conn, slot: usize, input: &mut [u8], cx: &mut Ctx<'_>) {
    let ws_cfg = cx.cfg.websocket.as_ref();
    let max_head = ws_cfg.map_or(DEFAULT_WS_MAX_HANDSHAKE_BYTES as usize, |w| {
        w.max_handshake_bytes
    });
    let Proto::Handshake(h) = &mut conn.proto else {
        return;
    };
    let source = h.source;
    let room = max_head.saturating_sub(h.buf.len());
    h.buf.extend_from_slice(&input[..input.len().min(room)]);
    let req = match http::parse_request(&h.buf) {
        Ok(Some(r)) => r,
        Ok(None) if input.len() > room || h.buf.len() >= max_head => {
            return refuse(conn, HttpError::HeadTooLarge, cx)
        }
        Ok(None) => return,
        Err(e) => return refuse(conn, e, cx),
    };
    let plain = req.header("upgrade").is_none();
    if plain
        && source.is_none()
        && cx
            .cfg
            .admin
            .as_ref()
            .is_some_and(|a| a.on_websocket_listener)
    {
        // A plain request on a WebSocket port: the admin API answers it
        // (with the same allowed-network check).
        let mut buf = std::mem::take(&mut h.buf);
        if input.len() > room {
            buf.extend_from_slice(&input[room..]);
        }
        conn.proto = Proto::Admin(AdminState {
            buf,
            pending: false,
        });
        return admin::on_bytes(conn, slot, &[], cx);
    }
    // A source's listener takes any path (as Veylor); others route.
    let routed = match (source, ws_cfg) {
        (Some(_), _) => None,
        (None, Some(w)) => match w.route(&req.path) {
            Some(r) => Some(r),
            None => return refuse(conn, HttpError::NotFound, cx),
        },
        (None, None) => return refuse(conn, HttpError::NotFound, cx),
    };
    let key = match req.websocket_key() {
        Ok(k) => k.to_owned(),
        Err(e) => return refuse(conn, e, cx),
    };
    // Frames the client sent right behind its request head.
    let mut early: Vec<u8> = h.buf[req.head_len..].to_vec();
    if input.len() > room {
        early.extend_from_slice(&input[room..]);
    }
    let me = ConnId {
        core: cx.core,
        slot: slot as u32,
        gen: conn.gen,
    };
    let (endpoint, tags, max_message, broadcast) = match (routed, ws_cfg) {
        (Some((endpoint, params)), Some(w)) => {
            let ep = &w.endpoints[endpoint];
            let mut tags: Vec<(Box<str>, Box<str>)> = ep
                .set_tags
                .iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect();
            for (k, v) in &params {
                if ep.tag_params.contains(k) {
                    tags.retain(|(tk, _)| **tk != **k);
                    tags.push((k.as_str().into(), v.as_str().into()));
                }
            }
            tags.sort();
            let id = match &ep.id_param {
                Some(p) => params
                    .iter()
                    .find(|(k, _)| k == p)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                None => uuid::Uuid::new_v4().to_string(),
            };
            let epoch = cx.login(id.as_bytes(), me);
            conn.login = Some(Login {
                id: id.as_bytes().into(),
                epoch,
            });
            cx.tags.insert(slot, &tags);
            let broadcast = broadcast_selector(ep.broadcast_tag.as_deref(), &tags);
            conn.out_limit = w.max_output_bytes;
            conn.policy = w.slow_consumer;
            (endpoint, tags, ep.max_message_size, broadcast)
        }
        _ => {
            // A source's client: no id, no tags; it receives the source's
            // messages and its own go upstream.
            let src = source.unwrap_or_default();
            let max = cx
                .cfg
                .sources
                .get(src as usize)
                .map_or(DEFAULT_WS_MAX_MESSAGE as usize, |s| s.max_message_size);
            if let Some(set) = cx.members.ws.get_mut(src as usize) {
                set.insert(slot);
            }
            conn.out_limit =
                ws_cfg.map_or(DEFAULT_WS_MAX_OUTPUT_BYTES as usize, |w| w.max_output_bytes);
            conn.policy = ws_cfg.map_or(DEFAULT_SLOW_CONSUMER, |w| w.slow_consumer);
            conn.out_max_msgs = cx.cfg.performance.max_queue_size;
            (usize::MAX, Vec::new(), max, None)
        }
    };
    conn.out.push_bytes(&[&http::switching_protocols(&key)]);
    conn.last_active = cx.now;
    let next_ping = cx.timing.ws_ping.map_or(u64::MAX, |p| cx.now + p);
    conn.proto = Proto::Ws(WsState {
        decoder: ws::Decoder::new(max_message),
        endpoint,
        tags,
        next_ping,
        ping_sent: None,
        source,
        broadcast,
    });
    cx.metrics.ws_upgrades.inc();
    log::debug!("{}: WebSocket {} source={source:?}", conn.peer, req.path);
    if !early.is_empty() {
        on_bytes(conn, slot, &mut early, cx);
    }
}

/// The selector for `on_message: broadcast`: connections whose `tag` has
/// this connection's value.
pub fn broadcast_selector(
    tag: Option<&str>,
    tags: &[(Box<str>, Box<str>)],
) -> Option<Arc<Selector>> {
    let tag = tag?;
    let (k, v) = tags.iter().find(|(k, _)| **k == *tag)?;
    Some(Arc::new(Selector::Tags(vec![(k.clone(), v.clone())])))
}

/// Feeds bytes to a WebSocket connection.
pub fn on_bytes(conn: &mut Conn, slot: usize, input: &mut [u8], cx: &mut Ctx<'_>) {
    let me = ConnId {
        core: cx.core,
        slot: slot as u32,
        gen: conn.gen,
    };
    let cfg = cx.cfg.websocket.as_ref();
    let Conn {
        proto,
        out,
        last_active,
        peer,
        out_limit,
        policy,
        out_max_msgs,
        login,
        ..
    } = &mut *conn;
    let (limit, policy, max_msgs) = (*out_limit, *policy, *out_max_msgs);
    let Proto::Ws(w) = proto else { return };
    // A source's clients send upstream; others do what their endpoint says.
    let on_message = match (w.source, cfg) {
        (Some(_), _) => None,
        (None, Some(c)) => Some(c.endpoints[w.endpoint].on_message),
        (None, None) => return,
    };
    let mut header = Vec::with_capacity(10);
    // What to do after the decoder stops: a close to send, if any.
    let mut goodbye: Option<(u16, &'static str, CloseReason)> = None;
    let mut slow = false;
    let res = w.decoder.feed(input, |ev| {
        *last_active = cx.now;
        match ev {
            Event::Message { text, data } => {
                cx.metrics.ws_messages_in.inc();
                let Some(on_message) = on_message else {
                    // Kept as it is: text stays text, binary stays binary.
                    cx.send_upstream(w.source.unwrap_or_default(), text, data);
                    return true;
                };
                match on_message {
                    OnMessage::Echo => {
                        header.clear();
                        ws::encode_header(
                            &mut header,
                            if text { ws::OP_TEXT } else { ws::OP_BINARY },
                            true,
                            data.len(),
                        );
                        // Own writes share the connection's queue and limit.
                        match admit(out, header.len() + data.len(), limit, max_msgs, policy) {
                            Queued::Yes => {
                                out.push_bytes(&[&header, data]);
                                true
                            }
                            Queued::Dropped => {
                                cx.metrics.slow_consumer_drop.inc();
                                true
                            }
                            Queued::Disconnect => {
                                slow = true;
                                false
                            }
                        }
                    }
                    OnMessage::Broadcast => {
                        match &w.broadcast {
                            Some(sel) => {
                                header.clear();
                                ws::encode_header(
                                    &mut header,
                                    if text { ws::OP_TEXT } else { ws::OP_BINARY },
                                    true,
                                    data.len(),
                                );
                                header.extend_from_slice(data);
                                cx.fanout(sel.clone(), &header, Some(me));
                            }
                            None => cx.metrics.ws_discarded.inc(),
                        }
                        true
                    }
                    OnMessage::Rely => match rely_message(text, data, login.as_ref(), cx) {
                        Ok(()) => true,
                        Err(bad) => {
                            goodbye = Some(bad);
                            false
                        }
                    },
                    OnMessage::None => {
                        cx.metrics.ws_discarded.inc();
                        true
                    }
                }
            }
            Event::Ping(p) => {
                header.clear();
                ws::encode_header(&mut header, ws::OP_PONG, true, p.len());
                out.push_bytes(&[&header, p]);
                true
            }
            Event::Pong(_) => {
                w.ping_sent = None;
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
        log::debug!("{peer}: WebSocket {e}");
        cx.metrics.protocol_errors.inc();
        goodbye = Some((e.close_code(), "", CloseReason::Protocol));
    }
    if slow {
        cx.metrics.slow_consumer_disconnect.inc();
        conn.ws_close(
            ws::CLOSE_POLICY,
            "slow consumer",
            CloseReason::SlowConsumer,
            cx.now,
            true,
        );
    } else if let Some((code, reason, why)) = goodbye {
        conn.ws_close(code, reason, why, cx.now, false);
    }
}

/// A deadline passed on a WebSocket connection: send the next ping, or give
/// up on an unanswered one or an idle client. Returns a reason if it must
/// close at once.
pub fn on_deadline(conn: &mut Conn, now: u64, t: &Timing) -> Option<CloseReason> {
    let last_active = conn.last_active;
    let Proto::Ws(w) = &mut conn.proto else {
        return None;
    };
    if w.ping_sent.is_some_and(|s| s + t.ws_pong <= now) {
        return Some(CloseReason::PingTimeout);
    }
    if t.ws_idle.is_some_and(|i| last_active + i <= now) {
        conn.ws_close(
            ws::CLOSE_NORMAL,
            "idle timeout",
            CloseReason::Idle,
            now,
            false,
        );
        return None;
    }
    if let Some(every) = t.ws_ping {
        if w.next_ping <= now {
            w.next_ping = now + every;
            if w.ping_sent.is_none() {
                w.ping_sent = Some(now);
                let mut f = Vec::with_capacity(2);
                ws::encode_frame(&mut f, ws::OP_PING, b"");
                conn.out.push_bytes(&[&f]);
            }
        }
    }
    None
}

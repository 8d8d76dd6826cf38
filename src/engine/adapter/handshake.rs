//! The HTTP upgrade stage of a WebSocket listener's connection.
//!
//! The request head accumulates here (capped at `max_handshake_bytes`,
//! bounded in time by `handshake_timeout`), is parsed with httparse, routed
//! to an endpoint (a source's listener takes any path, as Veylor does), and
//! answered with 101, or with a 4xx after which the connection lingers and
//! closes. On 101 the stage upgrades to [`WsStage`], having logged the id in,
//! indexed the tags or joined the source's channel; bytes that followed the
//! head in the same read are frames for the new stage. A plain request on a
//! WebSocket port goes to the admin stage when the admin API is served there.

use super::admin::AdminStage;
use super::deflate::ConnDeflate;
use super::session::SessionOpen;
use super::ws::{generated_id, WsStage};
use super::{Outcome, Stage};
use crate::config::OnMessage;
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Limits};
use crate::engine::route::Ctx;
use crate::engine::tags::{Tag, TagList};
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::deflate::{self, Agreed, Policy};
use crate::protocol::http::{self, HttpError, Request};

/// permessage-deflate as `policy` allows it for this request's offers.
pub(crate) fn negotiate(req: &Request, policy: &Policy) -> Option<Agreed> {
    deflate::negotiate(req.header_values("sec-websocket-extensions"), policy)
}

/// The 101 for `key`, accepting `agreed` if any (and counting it).
pub(crate) fn switching(key: &str, agreed: Option<&Agreed>, cx: &Ctx<'_>) -> Vec<u8> {
    let answer = agreed.map(|a| {
        cx.metrics().ws_compression_agreed.inc();
        a.answer()
    });
    http::switching_protocols(key, answer.as_deref())
}

/// An endpoint connection's tags: the endpoint's fixed ones, then its
/// tagged path parameters (a parameter wins over a fixed tag of its name),
/// sorted by key.
fn endpoint_tags(ep: &crate::config::Endpoint, params: &[(String, String)]) -> Vec<Tag> {
    let mut tags: Vec<Tag> = ep
        .set_tags
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect();
    for (k, v) in params {
        if ep.tag_params.contains(k) {
            tags.retain(|(tk, _)| **tk != **k);
            tags.push((k.as_str().into(), v.as_str().into()));
        }
    }
    tags.sort();
    tags
}

/// A WebSocket listener's connection before the upgrade.
#[derive(Debug)]
pub(crate) struct HandshakeStage {
    /// The request head so far (capped).
    buf: Vec<u8>,
    /// Tick by which the upgrade must complete.
    deadline: u64,
    /// Set on a source's WebSocket listener: any path, clients of it.
    source: Option<u16>,
}

impl HandshakeStage {
    /// The source whose listener accepted it, if any.
    pub(crate) fn source(&self) -> Option<u16> {
        self.source
    }

    pub(crate) fn accepted(t: &Timing, now: u64, source: Option<u16>) -> (Stage, Limits) {
        let st = HandshakeStage {
            buf: Vec::new(),
            deadline: now + t.ws_handshake,
            source,
        };
        (Stage::Handshake(st), Limits::NONE)
    }

    fn refuse(&self, io: &mut Io, e: HttpError, cx: &mut Ctx<'_>) -> Outcome {
        log::debug!(
            "{}: handshake refused: {}",
            io.peer(),
            String::from_utf8_lossy(&e.response())
                .lines()
                .next()
                .unwrap_or("")
        );
        cx.metrics().ws_handshake_errors.inc();
        io.out.push_bytes(&[&e.response()]);
        io.close_after_answer(CloseReason::Protocol, cx.now());
        Outcome::Continue
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let ws = cx.cfg().ws();
        let max_head = ws.max_handshake_bytes;
        let room = max_head.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&input[..input.len().min(room)]);
        let rest = |this: &Self, from: usize| {
            let mut v = this.buf[from..].to_vec();
            if input.len() > room {
                v.extend_from_slice(&input[room..]);
            }
            v
        };
        let req = match http::parse_request(&self.buf) {
            Ok(Some(r)) => r,
            Ok(None) if input.len() > room || self.buf.len() >= max_head => {
                return self.refuse(io, HttpError::HeadTooLarge, cx)
            }
            Ok(None) => return Outcome::Continue,
            Err(e) => return self.refuse(io, e, cx),
        };
        let admin_here = cx
            .cfg()
            .admin
            .as_ref()
            .is_some_and(|a| a.on_websocket_listener);
        if req.header("upgrade").is_none() && self.source.is_none() && admin_here {
            // A plain request on a WebSocket port: the admin API answers it
            // (with the same allowed-network check).
            return Outcome::Upgrade(Stage::Admin(AdminStage::default()), rest(self, 0));
        }
        let routed = match self.source {
            Some(_) => None,
            None => match ws.route(&req.path) {
                Some(r) => Some(r),
                None => return self.refuse(io, HttpError::NotFound, cx),
            },
        };
        let key = match req.websocket_key() {
            Ok(k) => k.to_owned(),
            Err(e) => return self.refuse(io, e, cx),
        };
        if let Some((endpoint, _)) = &routed {
            if !ws.endpoints[*endpoint].origin_allowed(req.header("origin")) {
                log::debug!(
                    "{}: origin {} not allowed",
                    io.peer(),
                    req.header("origin").unwrap_or_default()
                );
                cx.metrics().ws_origin_refused.inc();
                cx.metrics().ws_handshake_errors.inc();
                io.out.push_bytes(&[&http::plain_response(
                    "403 Forbidden",
                    "origin not allowed\n",
                )]);
                io.close_after_answer(CloseReason::Protocol, cx.now());
                return Outcome::Continue;
            }
        }
        // Frames the client sent right behind its request head.
        let early = rest(self, req.head_len);
        let policy = match &routed {
            Some((endpoint, _)) => ws.endpoints[*endpoint].compression,
            None => ws.compression,
        };
        let agreed = negotiate(&req, &policy);
        let next = match (routed, self.source) {
            (Some((endpoint, params)), _) if ws.endpoints[endpoint].session.is_some() => {
                let ep = &ws.endpoints[endpoint];
                let Some(s) = ep.session.as_ref() else {
                    return self.refuse(io, HttpError::NotFound, cx);
                };
                let tags = endpoint_tags(ep, &params);
                let open = (key, agreed);
                return SessionOpen::begin(io, me, endpoint, s, &req, tags, open, early, cx);
            }
            (Some((endpoint, params)), _) => {
                let ep = &ws.endpoints[endpoint];
                let mut tags: TagList = endpoint_tags(ep, &params).into();
                // A generated id nobody can see yet is made when it is first
                // shown (see `WsStage::ensure_id`): wsgateway never sends it
                // to the client, so until an event or /status names it no one
                // can address it, and an idle client holds neither the id nor
                // its directory entry.
                let id = match &ep.id_param {
                    Some(p) => {
                        let v = params.iter().find(|(k, _)| k == p).map(|(_, v)| v.as_str());
                        Some(format!("{}{}", ep.id_prefix, v.unwrap_or_default()))
                    }
                    None if ep.events || ep.on_message == OnMessage::Rely => Some(generated_id(ep)),
                    None => None,
                };
                if let Some(id) = id {
                    io.login = Some(cx.login(id.as_bytes(), me));
                }
                cx.tag(me.slot as usize, &mut tags);
                let broadcast = cx.broadcast_selector(ep.broadcast_tag.as_deref(), &tags);
                io.set_limits(Limits {
                    bytes: ws.max_output_bytes,
                    msgs: u32::MAX,
                    policy: ws.slow_consumer,
                });
                // wsgateway's open event, after the endpoint's tags are set.
                if let (true, Some(l)) = (ep.events, io.login.as_ref()) {
                    let l = l.clone();
                    crate::engine::events::on_open(cx, me, ep, l.id(), &tags, io.peer());
                }
                WsStage::endpoint(endpoint, ep, tags, broadcast, cx)
            }
            (None, Some(src)) => {
                // A source's client: no id, no tags; it receives the
                // source's messages and its own go upstream.
                let Some(scfg) = cx.cfg().sources.get(src as usize) else {
                    return self.refuse(io, HttpError::NotFound, cx);
                };
                let max = scfg.max_message_size;
                cx.join(Channel::Source(src), me.slot as usize);
                io.set_limits(Limits {
                    bytes: ws.max_output_bytes,
                    msgs: u32::try_from(cx.cfg().performance.max_queue_size).unwrap_or(u32::MAX),
                    policy: ws.slow_consumer,
                });
                WsStage::source_client(src, max, cx)
            }
            (None, None) => return self.refuse(io, HttpError::NotFound, cx),
        };
        io.out.push_bytes(&[&switching(&key, agreed.as_ref(), cx)]);
        let next = next.with_deflate(agreed.map(|a| ConnDeflate::new(policy.mode, a)));
        io.touch(cx.now());
        cx.metrics().ws_upgrades.inc();
        log::debug!(
            "{}: WebSocket {} source={:?}",
            io.peer(),
            req.path,
            self.source
        );
        Outcome::Upgrade(Stage::Ws(next), early)
    }

    pub(crate) fn due(&self, _io: &Io, _t: &Timing) -> Option<u64> {
        Some(self.deadline)
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        log::debug!("{}: WebSocket handshake timeout", io.peer());
        cx.metrics().ws_handshake_timeouts.inc();
        Outcome::Close(CloseReason::HandshakeTimeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::channels::Channel;
    use crate::engine::io::test_io;
    use crate::engine::route::test::TestCx;

    const CFG: &str = "workers: 1\npin: false\nwebsocket:\n  listen: []\n  endpoints:\n    - path: /{team}/ws/{user}\n      id_param: user\n      set_tags: {kind: chat}\nadmin:\n  listen: []\n  on_websocket_listener: true\nsources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    websocket_port: 0\nperformance:\n  max_queue_size: 77\n";

    fn me() -> ConnId {
        ConnId {
            core: 0,
            slot: 5,
            gen: 2,
        }
    }

    fn upgrade_request(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes()
    }

    fn stage(t: &TestCx, source: Option<u16>) -> HandshakeStage {
        match HandshakeStage::accepted(&t.timing, 0, source).0 {
            Stage::Handshake(h) => h,
            other => panic!("not a handshake stage: {other:?}"),
        }
    }

    #[test]
    fn upgrade_logs_in_tags_and_hands_early_frames_to_the_new_stage() {
        let mut t = TestCx::new(CFG, 1);
        let mut io = test_io("127.0.0.1:1");
        let mut input = upgrade_request("/red/ws/alice");
        input.extend_from_slice(b"early");
        let out = stage(&t, None).on_bytes(&mut io, me(), &mut input, &mut t.cx());
        let Outcome::Upgrade(Stage::Ws(_), early) = out else {
            panic!("expected an upgrade, got {out:?}");
        };
        assert_eq!(early, b"early");
        let answer = String::from_utf8(io.out.contents()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
        assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{answer}");
        assert_eq!(t.dir.lookup(b"alice"), Some(me()));
        let mut slots = Vec::new();
        t.tags.select(
            &[
                ("team".into(), "red".into()),
                ("kind".into(), "chat".into()),
            ],
            &mut slots,
        );
        assert_eq!(slots, vec![5]);
        assert_eq!(t.m().ws_upgrades, 1);
    }

    #[test]
    fn unknown_path_is_refused_and_the_answer_lingers() {
        let mut t = TestCx::new(CFG, 1);
        let mut io = test_io("127.0.0.1:1");
        let mut input = upgrade_request("/nope");
        let out = stage(&t, None).on_bytes(&mut io, me(), &mut input, &mut t.cx());
        assert!(matches!(out, Outcome::Continue));
        assert!(io.out.contents().starts_with(b"HTTP/1.1 404"));
        let closing = io.closing.expect("closing");
        assert!(closing.linger, "an HTTP answer lingers");
        assert_eq!(t.m().ws_handshake_errors, 1);
        assert!(t.dir.is_empty());
    }

    #[test]
    fn a_source_listener_takes_any_path_and_joins_the_channel() {
        let mut t = TestCx::new(CFG, 1);
        let mut io = test_io("127.0.0.1:1");
        let mut input = upgrade_request("/anything/at/all");
        let out = stage(&t, Some(0)).on_bytes(&mut io, me(), &mut input, &mut t.cx());
        assert!(matches!(out, Outcome::Upgrade(Stage::Ws(_), _)));
        assert_eq!(t.channels.len(Channel::Source(0)), 1);
        assert_eq!(io.limits().msgs, 77, "Veylor's max_queue_size");
        assert!(t.dir.is_empty(), "no id");
    }

    #[test]
    fn a_plain_request_goes_to_the_admin_stage_whole() {
        let mut t = TestCx::new(CFG, 1);
        let mut io = test_io("127.0.0.1:1");
        let req = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let out = stage(&t, None).on_bytes(&mut io, me(), &mut req.clone(), &mut t.cx());
        let Outcome::Upgrade(Stage::Admin(_), rest) = out else {
            panic!("expected the admin stage, got {out:?}");
        };
        assert_eq!(rest, req);
    }

    #[test]
    fn a_head_over_the_cap_is_refused() {
        let mut t = TestCx::new(CFG, 1);
        let mut io = test_io("127.0.0.1:1");
        let mut input = b"GET / HTTP/1.1\r\nX: ".to_vec();
        input.resize(64 * 1024, b'a');
        stage(&t, None).on_bytes(&mut io, me(), &mut input, &mut t.cx());
        assert!(io.out.contents().starts_with(b"HTTP/1.1 431"));
    }
}

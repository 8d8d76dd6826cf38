//! A wsproxy session's upgrade, between the request head and the 101
//! (`SessionOpen`): the bearer token is checked against
//! `session:{id}:auth` in Redis within `auth_timeout`, the token's TTL is
//! reset to `auth_grace_period`, and the core subscribes
//! `session:{id}:down` before it answers 101, so a message published the
//! instant the client sees the 101 is delivered (wsproxy subscribes after,
//! and loses it). Refusals are wsproxy's: 401 without a bearer token, 403
//! for a wrong or unknown token, 504 when Redis does not answer in time,
//! 500 on a Redis error, 503 when the subscription cannot be made.
//!
//! After the 101 the connection is a [`WsStage`] whose messages go to
//! `session:{id}:up` (`on_session_message`): JSON text verbatim, anything
//! else answered or ignored as wsproxy does.

use super::ws::WsStage;
use super::{Outcome, Stage};
use crate::config::{Endpoint, SessionConfig, SESSIONS_SERVER};
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Limits, Queued};
use crate::engine::redis::{Answer, Join, JoinState};
use crate::engine::route::Ctx;
use crate::engine::tags::{Tag, TagList};
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::http::{self, Request};
use crate::protocol::ws;

/// The tag of the auth lookup's reply.
const TAG_AUTH: u8 = 1;
/// Longest session id taken (it becomes two channel names and a key).
const MAX_SESSION_ID: usize = 512;

/// wsproxy's answer to a client text message that is not JSON.
pub(crate) const INVALID_JSON: &[u8] = br#"{"error":"Invalid JSON format"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `GET session:{id}:auth`.
    Auth,
    /// Waiting for the `:down` subscription's confirmation.
    Subscribe,
}

/// A session socket between its request head and its 101.
#[derive(Debug)]
pub(crate) struct SessionOpen {
    endpoint: u16,
    /// Sec-WebSocket-Key, for the 101.
    key: String,
    /// permessage-deflate, as negotiated from the request.
    agreed: Option<crate::protocol::deflate::Agreed>,
    token: Vec<u8>,
    phase: Phase,
    /// Tick by which this phase must finish.
    deadline: u64,
    /// Bytes that followed the request head (frames sent early), capped.
    early: Vec<u8>,
    /// The `:down` channel joined (held until the stage ends).
    joined: Option<u32>,
    /// A join asked of core 0 whose id has not come yet.
    remote_join: bool,
    /// The socket's tags (its path parameters, the session id among them).
    tags: Vec<Tag>,
}

/// The session id among a session socket's tags.
pub(crate) fn session_of<'t>(tags: &'t [Tag], s: &SessionConfig) -> Option<&'t str> {
    tags.iter()
        .find(|(k, _)| **k == *s.param)
        .map(|(_, v)| &**v)
}

/// The key and channel names of session `id`.
fn name(cfg: &SessionConfig, id: &str, suffix: &str) -> Vec<u8> {
    format!("{}{id}:{suffix}", cfg.prefix).into_bytes()
}

/// Refuses the upgrade with wsproxy's status and body; the answer lingers
/// and the connection closes.
fn refuse(io: &mut Io, status: &str, body: &str, cx: &Ctx<'_>) -> Outcome {
    log::debug!("{}: session refused: {status}", io.peer());
    cx.metrics().session_refused.inc();
    cx.metrics().ws_handshake_errors.inc();
    io.out.push_bytes(&[&http::plain_response(status, body)]);
    io.close_after_answer(CloseReason::Protocol, cx.now());
    Outcome::Continue
}

/// A session id is one path segment: no `/` once decoded, no control
/// characters, not too long.
fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID
        && !id.bytes().any(|b| b == b'/' || b < 0x20 || b == 0x7f)
}

impl SessionOpen {
    /// The handshake routed a request to session endpoint `endpoint`:
    /// checks the token's form and the session id, and asks Redis.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn begin(
        io: &mut Io,
        me: ConnId,
        endpoint: usize,
        s: &SessionConfig,
        req: &Request,
        tags: Vec<Tag>,
        (key, agreed): (String, Option<crate::protocol::deflate::Agreed>),
        early: Vec<u8>,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let session = session_of(&tags, s).unwrap_or_default();
        if !valid_session_id(session) {
            return refuse(io, "400 Bad Request", "Invalid session id", cx);
        }
        let mut st = SessionOpen {
            endpoint: endpoint as u16,
            key,
            agreed,
            token: Vec::new(),
            phase: Phase::Auth,
            deadline: cx.now() + Timing::ticks(s.auth_timeout, crate::engine::timer::TICK),
            early,
            joined: None,
            remote_join: false,
            tags,
        };
        if !s.auth {
            return st.subscribe(io, me, s, cx);
        }
        // Exactly wsproxy's rule: the case-sensitive prefix "Bearer ".
        let Some(token) = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
        else {
            return refuse(io, "401 Unauthorized", "Missing authorization token", cx);
        };
        st.token = token.as_bytes().to_vec();
        let auth_key = name(s, st.session(s), "auth");
        if cx
            .redis_call(SESSIONS_SERVER, me, TAG_AUTH, &[b"GET", &auth_key])
            .is_err()
        {
            return refuse(io, "500 Internal Server Error", "Internal server error", cx);
        }
        Outcome::Upgrade(Stage::Session(Box::new(st)), Vec::new())
    }

    /// Its session id: a tag (validated in `begin`).
    fn session<'t>(&'t self, s: &SessionConfig) -> &'t str {
        session_of(&self.tags, s).unwrap_or_default()
    }

    fn config<'c>(&self, cx: &Ctx<'c>) -> Option<(&'c Endpoint, &'c SessionConfig)> {
        let ep = cx.cfg().ws().endpoints.get(self.endpoint as usize)?;
        Some((ep, ep.session.as_ref()?))
    }

    /// Joins `:down` on this core: the 101 now, or once subscribed.
    fn subscribe(
        mut self,
        io: &mut Io,
        me: ConnId,
        s: &SessionConfig,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let down = name(s, self.session(s), "down");
        match cx.redis_join(&down, me) {
            Join::Ready(id) => {
                self.joined = Some(id);
                self.finish(io, me, cx)
            }
            Join::Pending(id) => {
                self.joined = Some(id);
                self.wait_subscription(s, cx)
            }
            // Core 0 answers with `on_joined`.
            Join::Remote => {
                self.remote_join = true;
                self.wait_subscription(s, cx)
            }
            Join::Down => refuse(
                io,
                "503 Service Unavailable",
                "Unable to prepare session",
                cx,
            ),
        }
    }

    fn wait_subscription(mut self, s: &SessionConfig, cx: &Ctx<'_>) -> Outcome {
        self.phase = Phase::Subscribe;
        self.deadline = cx.now() + Timing::ticks(s.auth_timeout, crate::engine::timer::TICK);
        Outcome::Upgrade(Stage::Session(Box::new(self)), Vec::new())
    }

    /// Subscribed: answers 101 and becomes a WebSocket session stage.
    fn finish(mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let Some(id) = self.joined.take() else {
            return Outcome::Close(CloseReason::Protocol);
        };
        let Some((ep, s)) = self.config(cx) else {
            cx.redis_leave(id, me);
            return Outcome::Close(CloseReason::Protocol);
        };
        cx.join(Channel::Redis(id), me.slot as usize);
        let mut tags: TagList = std::mem::take(&mut self.tags).into();
        cx.tag(me.slot as usize, &mut tags);
        let ws_cfg = cx.cfg().ws();
        io.set_limits(Limits {
            bytes: ws_cfg.max_output_bytes,
            msgs: u32::MAX,
            policy: ws_cfg.slow_consumer,
        });
        io.out.push_bytes(&[&super::handshake::switching(
            &self.key,
            self.agreed.as_ref(),
            cx,
        )]);
        io.touch(cx.now());
        cx.metrics().ws_upgrades.inc();
        let m = cx.metrics();
        m.session_sockets.set(m.session_sockets.get() + 1);
        log::debug!(
            "{}: session {} open",
            io.peer(),
            session_of(&tags, s).unwrap_or_default()
        );
        let deflate = self
            .agreed
            .map(|a| super::deflate::ConnDeflate::new(ep.compression.mode, a));
        let next = WsStage::session(self.endpoint, ep, id, tags, cx).with_deflate(deflate);
        Outcome::Upgrade(Stage::Ws(next), std::mem::take(&mut self.early))
    }

    /// The auth lookup's reply.
    pub(crate) fn on_redis(
        &mut self,
        io: &mut Io,
        me: ConnId,
        tag: u8,
        a: Answer,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        if tag != TAG_AUTH || self.phase != Phase::Auth || io.closing.is_some() {
            return Outcome::Continue;
        }
        let Some((_, s)) = self.config(cx) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        match a {
            Answer::Bytes(v) if v == self.token => {
                // Reconnects with the same token work until the grace
                // period passes without one.
                let key = name(s, self.session(s), "auth");
                let ttl = s.auth_grace_period.as_secs().to_string();
                cx.redis_send(SESSIONS_SERVER, me, &[b"EXPIRE", &key, ttl.as_bytes()]);
                let st = std::mem::replace(self, SessionOpen::placeholder());
                st.subscribe(io, me, s, cx)
            }
            Answer::Bytes(_) | Answer::Nil => {
                refuse(io, "403 Forbidden", "Invalid authorization token", cx)
            }
            Answer::Timeout => refuse(io, "504 Gateway Timeout", "Authentication timeout", cx),
            _ => refuse(io, "500 Internal Server Error", "Internal server error", cx),
        }
    }

    /// News of the `:down` join: confirmed (the 101 now), on its way (a
    /// remote join's channel id), or impossible (503).
    pub(crate) fn on_joined(
        &mut self,
        io: &mut Io,
        me: ConnId,
        state: JoinState,
        id: u32,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        if self.remote_join && state != JoinState::Down {
            // Held from now on, whatever happens next: left on close.
            self.remote_join = false;
            self.joined = Some(id);
        }
        if self.phase != Phase::Subscribe || io.closing.is_some() {
            return Outcome::Continue;
        }
        match state {
            JoinState::Ready => {
                std::mem::replace(self, SessionOpen::placeholder()).finish(io, me, cx)
            }
            JoinState::Pending => Outcome::Continue,
            JoinState::Down => refuse(
                io,
                "503 Service Unavailable",
                "Unable to prepare session",
                cx,
            ),
        }
    }

    /// An empty stand-in while the real one moves into its next stage.
    fn placeholder() -> SessionOpen {
        SessionOpen {
            endpoint: 0,
            key: String::new(),
            agreed: None,
            token: Vec::new(),
            phase: Phase::Auth,
            deadline: 0,
            early: Vec::new(),
            joined: None,
            remote_join: false,
            tags: Vec::new(),
        }
    }

    /// Frames a client sent before its 101 (read only if the core reads
    /// while we wait): kept, up to the handshake cap.
    pub(crate) fn on_bytes(
        &mut self,
        _io: &mut Io,
        _me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        if self.early.len() + input.len() > cx.cfg().ws().max_handshake_bytes {
            return Outcome::Close(CloseReason::Protocol);
        }
        self.early.extend_from_slice(input);
        Outcome::Continue
    }

    pub(crate) fn due(&self, io: &Io, _t: &Timing) -> Option<u64> {
        // Once refused, the lingering answer has its own deadline.
        io.closing.is_none().then_some(self.deadline)
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        cx.metrics().ws_handshake_timeouts.inc();
        match self.phase {
            Phase::Auth => refuse(io, "504 Gateway Timeout", "Authentication timeout", cx),
            Phase::Subscribe => refuse(
                io,
                "503 Service Unavailable",
                "Unable to prepare session",
                cx,
            ),
        }
    }

    pub(crate) fn on_close(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        if let Some(id) = self.joined.take() {
            cx.redis_leave(id, me);
        }
    }
}

/// A session socket's client message: JSON text goes verbatim to
/// `:up`; other text is answered with wsproxy's error and the connection
/// stays; binary is ignored and counted. Returns false if the client is
/// now a slow consumer (its error answer did not fit).
pub(crate) fn on_session_message(
    io: &mut Io,
    me: ConnId,
    endpoint: u16,
    tags: &[Tag],
    text: bool,
    data: &[u8],
    cx: &mut Ctx<'_>,
) -> bool {
    let m = cx.metrics();
    let Some(s) = cx
        .cfg()
        .ws()
        .endpoints
        .get(endpoint as usize)
        .and_then(|e| e.session.as_ref())
    else {
        return true;
    };
    let up = name(s, session_of(tags, s).unwrap_or_default(), "up");
    let up = &up[..];
    if !text {
        m.session_binary_ignored.inc();
        return true;
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
        if cx.redis_send(SESSIONS_SERVER, me, &[b"PUBLISH", up, data]) {
            m.session_up.inc();
        }
        return true;
    }
    m.session_invalid_json.inc();
    let (h, n) = ws::header_array(ws::OP_TEXT, INVALID_JSON.len());
    io.push_own(&[&h[..n], INVALID_JSON], &m.slow_consumer_drop) != Queued::Disconnect
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_is_one_segment() {
        assert!(valid_session_id("test-session-123"));
        assert!(valid_session_id("a:b"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a/b"));
        assert!(!valid_session_id("a\nb"));
        assert!(!valid_session_id(&"x".repeat(MAX_SESSION_ID + 1)));
    }
}

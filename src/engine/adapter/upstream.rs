//! The upstream client stage: the connection to an upstream source
//! (Veylor's feed), owned by the source's owner core. Stages: TCP connect
//! (non-blocking) -> upgrade request and response (our own httparse head,
//! checked for 101 and Sec-WebSocket-Accept) -> open: server frames are
//! decoded (a masked one is a protocol error), our frames are masked.
//!
//! An upstream message goes to the source's channel on every core, framed
//! there for each member's wire (WebSocket clients everywhere, Unix clients
//! on this core). Client messages for the source arrive as mesh items and
//! are written here in order. Connecting, backoff and reconnecting belong
//! to `engine::upstreams`; this stage only talks to one live connection.

use std::sync::Arc;

use super::{Outcome, Stage};
use crate::config::SourceConfig;
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Queued};
use crate::engine::keepalive::{Due, Keepalive};
use crate::engine::message::Message;
use crate::engine::metrics::SourceStatus;
use crate::engine::route::Ctx;
use crate::engine::tags::Selector;
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::deflate::{self, Agreed, InflateError, Inflater};
use crate::protocol::ws;

/// Largest upgrade response head accepted from a source.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// How far an upstream connection has got.
#[derive(Debug)]
enum Phase {
    /// TCP connect in progress (non-blocking).
    Connecting,
    /// Upgrade request sent; the response head accumulates here.
    Handshake {
        /// Our Sec-WebSocket-Key.
        key: String,
        /// Response bytes so far.
        buf: Vec<u8>,
    },
    /// Upgraded: frames flow.
    Open {
        decoder: ws::Decoder,
        keepalive: Keepalive,
        /// permessage-deflate, if the source accepted our offer.
        inflate: Option<Box<(Agreed, Inflater)>>,
    },
}

/// The connection to an upstream source.
#[derive(Debug)]
pub(crate) struct UpstreamStage {
    source: u16,
    phase: Phase,
    /// Tick by which it must be open.
    deadline: u64,
    /// Mask generator state (xorshift, seeded from OS randomness).
    mask_seed: u64,
    /// The source's channel, made once.
    channel: Arc<Selector>,
}

/// A fresh mask for the next client frame (RFC 6455 wants them
/// unpredictable to intermediaries).
fn next_mask(seed: &mut u64) -> [u8; 4] {
    let mut x = *seed;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *seed = x;
    (x as u32).to_ne_bytes()
}

/// Queues a masked frame (own write: bypasses client limits, the upstream
/// is ours).
fn send_frame(io: &mut Io, seed: &mut u64, opcode: u8, payload: &[u8]) {
    let mut f = Vec::with_capacity(payload.len() + 14);
    ws::encode_masked(&mut f, opcode, payload, next_mask(seed));
    io.out.push_bytes(&[&f]);
}

/// The upgrade request for a source.
pub(crate) fn upgrade_request(cfg: &SourceConfig, key: &str) -> Vec<u8> {
    let t = &cfg.target;
    let host = if t.host.contains(':') {
        format!("[{}]", t.host)
    } else {
        t.host.clone()
    };
    let default_port = if t.tls { 443 } else { 80 };
    let host = if t.port == default_port {
        host
    } else {
        format!("{host}:{}", t.port)
    };
    let mut r = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        t.path
    );
    if cfg.compression {
        r.push_str(&format!(
            "Sec-WebSocket-Extensions: {}\r\n",
            deflate::CLIENT_OFFER
        ));
    }
    for (k, v) in &cfg.headers {
        // Header names and values come from the config file; strip line
        // breaks so a value cannot smuggle a header.
        let clean = |s: &str| s.replace(['\r', '\n'], "");
        r.push_str(&format!("{}: {}\r\n", clean(k), clean(v)));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

impl UpstreamStage {
    /// Its source.
    pub(crate) fn source(&self) -> u16 {
        self.source
    }

    /// A connection to source `source` being opened, due open by `deadline`.
    pub(crate) fn connecting(source: u16, deadline: u64) -> Stage {
        Stage::Upstream(Box::new(UpstreamStage {
            source,
            phase: Phase::Connecting,
            deadline,
            mask_seed: uuid::Uuid::new_v4().as_u64_pair().0 | 1,
            channel: Arc::new(Selector::Channel(Channel::Source(source))),
        }))
    }

    fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    pub(crate) fn awaits_connect(&self) -> bool {
        matches!(self.phase, Phase::Connecting)
    }

    /// The TCP connect completed (writable): send the upgrade request.
    pub(crate) fn on_connected(&mut self, io: &mut Io, cx: &mut Ctx<'_>) -> Outcome {
        if !self.awaits_connect() {
            return Outcome::Continue;
        }
        let Some(cfg) = cx.cfg().sources.get(self.source as usize) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        match io.stream.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                log::warn!("source {}: connect failed: {e}", cfg.url);
                return Outcome::Close(CloseReason::IoError);
            }
        }
        let key = tungstenite::handshake::client::generate_key();
        io.out.push_bytes(&[&upgrade_request(cfg, &key)]);
        self.phase = Phase::Handshake {
            key,
            buf: Vec::new(),
        };
        Outcome::Continue
    }

    /// A client message for the source: written if the connection is open.
    pub(crate) fn send_message(&mut self, io: &mut Io, text: bool, msg: &[u8]) -> bool {
        // Masked frames add at most 14 bytes.
        if !self.is_open() || io.closing.is_some() || io.admit(msg.len() + 14) != Queued::Yes {
            return false;
        }
        let op = if text { ws::OP_TEXT } else { ws::OP_BINARY };
        send_frame(io, &mut self.mask_seed, op, msg);
        true
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        _me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let source = self.source;
        let Some(cfg) = cx.cfg().sources.get(source as usize) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        // Bytes behind the upgrade response (frames), if this read ended it.
        let mut rest: Option<Vec<u8>> = None;
        if let Phase::Handshake { key, buf } = &mut self.phase {
            buf.extend_from_slice(input);
            match upgraded(cfg, key, buf) {
                Err(()) => {
                    cx.metrics().protocol_errors.inc();
                    return Outcome::Close(CloseReason::Protocol);
                }
                Ok(None) => return Outcome::Continue,
                Ok(Some((head_len, agreed))) => {
                    rest = Some(buf[head_len..].to_vec());
                    let mut decoder = ws::Decoder::client(cfg.max_message_size);
                    let inflate = agreed.map(|a| {
                        decoder.allow_compressed();
                        Box::new((a, Inflater::new(a.server_bits)))
                    });
                    self.phase = Phase::Open {
                        decoder,
                        keepalive: Keepalive::new(cx.now(), cx.timing().ws_ping),
                        inflate,
                    };
                }
            }
            log::info!("source {}: connected", cfg.url);
            if let Some(st) = cx.source_status(source) {
                st.state.set(SourceStatus::UP);
            }
        }
        // After the upgrade only what followed the response head is frames;
        // the input itself was the response.
        let input: &mut [u8] = match rest.as_mut() {
            Some(r) => r,
            None => input,
        };
        let Self {
            phase:
                Phase::Open {
                    decoder,
                    keepalive,
                    inflate,
                },
            mask_seed,
            channel,
            ..
        } = self
        else {
            return Outcome::Continue;
        };
        if input.is_empty() {
            return Outcome::Continue;
        }
        let mut closed = false;
        let mut bad: Option<ws::WsError> = None;
        let mut inflated: Vec<u8> = Vec::new();
        let res = decoder.feed(input, |ev| match ev {
            ws::Event::Message {
                text,
                data,
                compressed,
            } => {
                let data: &[u8] = if compressed {
                    if inflated.capacity() == 0 {
                        inflated = cx.codec().take_buf();
                    }
                    inflated.clear();
                    match inflate_message(
                        inflate.as_deref_mut(),
                        data,
                        &mut inflated,
                        cfg.max_message_size,
                        text,
                    ) {
                        Ok(()) => &inflated,
                        Err(e) => {
                            bad = Some(e);
                            return false;
                        }
                    }
                } else {
                    data
                };
                cx.metrics().source_in.inc();
                if let Some(st) = cx.source_status(source) {
                    st.messages_in.inc();
                }
                cx.fanout(
                    channel.clone(),
                    Message::new(text, data),
                    cfg.force_binary,
                    None,
                );
                if cfg.echo_upstream {
                    let op = if text { ws::OP_TEXT } else { ws::OP_BINARY };
                    send_frame(io, mask_seed, op, data);
                }
                true
            }
            ws::Event::Ping(p) => {
                send_frame(io, mask_seed, ws::OP_PONG, p);
                true
            }
            ws::Event::Pong(_) => {
                keepalive.on_pong();
                true
            }
            ws::Event::Close { code, .. } => {
                let code = code.unwrap_or(ws::CLOSE_NORMAL).to_be_bytes();
                send_frame(io, mask_seed, ws::OP_CLOSE, &code);
                closed = true;
                false
            }
        });
        if inflated.capacity() > 0 {
            cx.codec().put_buf(inflated);
        }
        io.touch(cx.now());
        let res = match (res, bad) {
            (Ok(()), Some(e)) => Err(e),
            (r, _) => r,
        };
        match res {
            Err(e) => {
                log::warn!("source {}: {e}; reconnecting", cfg.url);
                send_frame(io, mask_seed, ws::OP_CLOSE, &e.close_code().to_be_bytes());
                io.close_after_flush(CloseReason::Protocol, cx.now());
            }
            Ok(()) if closed => io.close_after_flush(CloseReason::PeerClosed, cx.now()),
            Ok(()) => {}
        }
        Outcome::Continue
    }

    pub(crate) fn due(&self, _io: &Io, t: &Timing) -> Option<u64> {
        match &self.phase {
            Phase::Open { keepalive, .. } => keepalive.due(t.ws_pong),
            _ => Some(self.deadline),
        }
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let Phase::Open { keepalive, .. } = &mut self.phase else {
            log::warn!("source {}: connect/upgrade timed out", self.source);
            return Outcome::Close(CloseReason::HandshakeTimeout);
        };
        let t = cx.timing();
        match keepalive.on_deadline(cx.now(), t.ws_ping, t.ws_pong) {
            Due::Dead => Outcome::Close(CloseReason::PingTimeout),
            Due::Ping => {
                send_frame(io, &mut self.mask_seed, ws::OP_PING, b"");
                Outcome::Continue
            }
            Due::Nothing => Outcome::Continue,
        }
    }

    /// Shutdown: an open upstream gets a close 1001; others just close.
    pub(crate) fn on_drain(&mut self, io: &mut Io, now: u64) -> Outcome {
        if !self.is_open() {
            return Outcome::Close(CloseReason::Shutdown);
        }
        let code = ws::CLOSE_GOING_AWAY.to_be_bytes();
        send_frame(io, &mut self.mask_seed, ws::OP_CLOSE, &code);
        io.close_after_flush(CloseReason::Shutdown, now);
        Outcome::Continue
    }
}

/// Inflates a compressed message from the source into `out` (at most
/// `max` bytes) and checks a text message's UTF-8.
fn inflate_message(
    inflate: Option<&mut (Agreed, Inflater)>,
    data: &[u8],
    out: &mut Vec<u8>,
    max: usize,
    text: bool,
) -> Result<(), ws::WsError> {
    let (agreed, inflater) = inflate.ok_or(ws::WsError::Protocol("RSV1 without an extension"))?;
    inflater
        .message(data, out, max, agreed.server_no_context)
        .map_err(|e| match e {
            InflateError::TooBig => ws::WsError::TooBig,
            InflateError::Corrupt => ws::WsError::BadDeflate,
        })?;
    if text && std::str::from_utf8(out).is_err() {
        return Err(ws::WsError::InvalidUtf8);
    }
    Ok(())
}

/// What the upgrade response agreed: its head length and permessage-deflate
/// (if accepted).
type Upgraded = (usize, Option<Agreed>);

/// Checks the upgrade response in `buf`: its head length and extension once
/// complete and valid, None while incomplete, Err if refused or malformed
/// (or it accepted an extension we did not offer).
fn upgraded(cfg: &SourceConfig, key: &str, buf: &[u8]) -> Result<Option<Upgraded>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
        _ => {
            log::warn!("source {}: bad upgrade response", cfg.url);
            return Err(());
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let got = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim);
    if resp.code != Some(101) || got != Some(accept.as_str()) {
        log::warn!(
            "source {}: upgrade refused (status {:?})",
            cfg.url,
            resp.code
        );
        return Err(());
    }
    let extensions = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    let agreed = match deflate::client_accepts(extensions) {
        Ok(a) if a.is_none() || cfg.compression => a,
        Ok(_) => {
            log::warn!(
                "source {}: upgrade accepted an extension never offered",
                cfg.url
            );
            return Err(());
        }
        Err(why) => {
            log::warn!("source {}: upgrade response: {why}", cfg.url);
            return Err(());
        }
    };
    Ok(Some((head_len, agreed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_response_is_checked_for_101_and_the_accept_key() {
        let cfg = crate::Config::from_yaml(
            "sources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    websocket_port: 0\n",
            None,
        )
        .expect("config");
        let s = &cfg.sources[0];
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nframes";
        assert_eq!(upgraded(s, key, good), Ok(Some((good.len() - 6, None))));
        assert_eq!(upgraded(s, key, &good[..20]), Ok(None), "incomplete");
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(upgraded(s, key, wrong), Err(()));
        let refused =
            b"HTTP/1.1 403 Forbidden\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(upgraded(s, key, refused), Err(()));
        let req = upgrade_request(s, key);
        assert!(req.starts_with(b"GET /feed HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"));
    }
}

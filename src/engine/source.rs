//! Upstream sources (Veylor-compatible): their Unix-socket clients here;
//! the upstream connection itself lives on the source's owner core.
//!
//! A source's clients are WebSocket clients on its own listener (any path)
//! and Unix-socket clients on its socket (owned by one core, 4-byte
//! big-endian length framing both ways). Messages from the source go to all
//! of them, framed once per wire format; their messages go to the source in
//! order per client (Unix messages as binary).

use super::conn::{CloseReason, Conn, Proto};
use super::route::Ctx;

/// Feeds bytes from a Unix client; returns a reason if it must close
/// (a length over the source's message limit).
pub fn on_unix_bytes(conn: &mut Conn, input: &[u8], cx: &mut Ctx<'_>) -> Option<CloseReason> {
    let Proto::Unix(u) = &mut conn.proto else {
        return None;
    };
    let source = u.source;
    let max = cx
        .cfg
        .sources
        .get(source as usize)
        .map_or(1 << 20, |s| s.max_message_size) as u32;
    let res = u.decoder.feed(input, max, |msg| {
        cx.send_upstream(source, false, msg);
        true
    });
    match res {
        Ok(()) => None,
        Err(e) => {
            // Counted as a protocol error when the core closes it.
            log::debug!("unix client of source {source}: {e}");
            Some(CloseReason::Protocol)
        }
    }
}

use std::sync::Arc;

use super::route::{FanOp, Fanout, Local};
use super::tags::Selector;
use crate::config::SourceConfig;
use crate::protocol::{lenprefix, ws};

/// How far an upstream connection has got.
#[derive(Debug)]
pub enum UpStage {
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
        /// Server-frame decoder.
        decoder: ws::Decoder,
        /// Tick of the next ping.
        next_ping: u64,
        /// Tick of the unanswered ping, if any.
        ping_sent: Option<u64>,
    },
}

/// The connection to an upstream source (on its owner core).
#[derive(Debug)]
pub struct UpstreamState {
    /// Which source.
    pub source: u16,
    /// Stage.
    pub stage: UpStage,
    /// Tick by which it must be open.
    pub deadline: u64,
    /// Mask generator state (xorshift).
    pub mask_seed: u64,
}

/// Largest upgrade response head accepted from a source.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

impl UpstreamState {
    /// A fresh mask for the next client frame (RFC 6455 wants them
    /// unpredictable to intermediaries; xorshift seeded from OS randomness).
    pub fn mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask_seed = x;
        (x as u32).to_ne_bytes()
    }

    /// True once upgraded.
    pub fn is_open(&self) -> bool {
        matches!(self.stage, UpStage::Open { .. })
    }
}

/// The upgrade request for a source.
pub fn upgrade_request(cfg: &SourceConfig, key: &str) -> Vec<u8> {
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
    for (k, v) in &cfg.headers {
        // Header names and values come from the config file; strip line
        // breaks so a value cannot smuggle a header.
        let clean = |s: &str| s.replace(['\r', '\n'], "");
        r.push_str(&format!("{}: {}\r\n", clean(k), clean(v)));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The TCP connect completed (writable): send the upgrade request.
pub fn on_connected(conn: &mut Conn, cfg: &SourceConfig) -> std::io::Result<()> {
    if let Some(e) = conn.stream.take_error()? {
        return Err(e);
    }
    let Proto::Upstream(u) = &mut conn.proto else {
        return Ok(());
    };
    if !matches!(u.stage, UpStage::Connecting) {
        return Ok(());
    }
    let key = tungstenite::handshake::client::generate_key();
    conn.out.push_bytes(&[&upgrade_request(cfg, &key)]);
    u.stage = UpStage::Handshake {
        key,
        buf: Vec::new(),
    };
    Ok(())
}

/// Sends a masked frame upstream (own write: bypasses client limits, the
/// upstream is ours).
pub fn send_frame(conn: &mut Conn, opcode: u8, payload: &[u8]) {
    let Proto::Upstream(u) = &mut conn.proto else {
        return;
    };
    let mask = u.mask();
    let mut f = Vec::with_capacity(payload.len() + 14);
    ws::encode_masked(&mut f, opcode, payload, mask);
    conn.out.push_bytes(&[&f]);
}

/// Bytes from the upstream; a reason if the connection must close (it is
/// then reconnected with backoff).
pub fn on_upstream_bytes(
    conn: &mut Conn,
    input: &mut [u8],
    cx: &mut Ctx<'_>,
) -> Option<CloseReason> {
    let Proto::Upstream(u) = &mut conn.proto else {
        return None;
    };
    let source = u.source;
    let Some(cfg) = cx.cfg.sources.get(source as usize) else {
        return Some(CloseReason::Protocol);
    };
    // Bytes behind the upgrade response (frames), if this read finished it.
    let mut rest: Option<Vec<u8>> = None;
    if let UpStage::Handshake { key, buf } = &mut u.stage {
        buf.extend_from_slice(input);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return None,
            _ => {
                log::warn!("source {}: bad upgrade response", cfg.url);
                return Some(CloseReason::Protocol);
            }
        };
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .and_then(|h| std::str::from_utf8(h.value).ok())
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if resp.code != Some(101)
            || header("sec-websocket-accept").map(str::trim) != Some(accept.as_str())
        {
            log::warn!(
                "source {}: upgrade refused (status {:?})",
                cfg.url,
                resp.code
            );
            return Some(CloseReason::Protocol);
        }
        rest = Some(buf[head_len..].to_vec());
        let next_ping = cx.timing.ws_ping.map_or(u64::MAX, |p| cx.now + p);
        u.stage = UpStage::Open {
            decoder: ws::Decoder::client(cfg.max_message_size),
            next_ping,
            ping_sent: None,
        };
        log::info!("source {}: connected", cfg.url);
        if let Some(st) = cx.sources.get(source as usize) {
            st.state.set(super::metrics::SourceStatus::UP);
        }
    }
    // After the upgrade only what followed the response head is frames;
    // the input itself was the response.
    let input: &mut [u8] = match rest.as_mut() {
        Some(r) => r,
        None => input,
    };
    let Proto::Upstream(u) = &mut conn.proto else {
        return None;
    };
    let UpStage::Open {
        decoder, ping_sent, ..
    } = &mut u.stage
    else {
        return None;
    };
    if input.is_empty() {
        return None;
    }
    // Replies to send after decoding (the decoder borrows the connection).
    let mut replies: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut close = None;
    let res = decoder.feed(input, |ev| match ev {
        ws::Event::Message { text, data } => {
            cx.metrics.source_in.inc();
            if let Some(st) = cx.sources.get(source as usize) {
                st.messages_in.inc();
            }
            source_message(cx, source, cfg, text, data);
            if cfg.echo_upstream {
                replies.push((
                    if text { ws::OP_TEXT } else { ws::OP_BINARY },
                    data.to_vec(),
                ));
            }
            true
        }
        ws::Event::Ping(p) => {
            replies.push((ws::OP_PONG, p.to_vec()));
            true
        }
        ws::Event::Pong(_) => {
            *ping_sent = None;
            true
        }
        ws::Event::Close { code, .. } => {
            let mut p = Vec::new();
            p.extend_from_slice(&code.unwrap_or(ws::CLOSE_NORMAL).to_be_bytes());
            replies.push((ws::OP_CLOSE, p));
            close = Some(CloseReason::PeerClosed);
            false
        }
    });
    conn.last_active = cx.now;
    for (op, p) in &replies {
        send_frame(conn, *op, p);
    }
    match res {
        Err(e) => {
            log::warn!("source {}: {e}; reconnecting", cfg.url);
            let mut p = e.close_code().to_be_bytes().to_vec();
            p.truncate(2);
            send_frame(conn, ws::OP_CLOSE, &p);
            conn.begin_closing(CloseReason::Protocol, cx.now);
            None
        }
        Ok(()) => {
            if let Some(r) = close {
                conn.begin_closing(r, cx.now);
            }
            None
        }
    }
}

/// One upstream message to every client of the source, framed once per
/// wire format: a WebSocket frame fanned out to every core, a length-
/// prefixed frame to this (owner) core's Unix clients.
fn source_message(cx: &mut Ctx<'_>, source: u16, cfg: &SourceConfig, text: bool, data: &[u8]) {
    let mut frame = Vec::with_capacity(data.len() + 10);
    let op = if text && !cfg.force_binary {
        ws::OP_TEXT
    } else {
        ws::OP_BINARY
    };
    ws::encode_frame(&mut frame, op, data);
    cx.fanout(Arc::new(Selector::Source(source)), &frame, None);
    if cfg.unix_socket.is_some() {
        let mut uf = Vec::with_capacity(data.len() + 4);
        lenprefix::encode(&mut uf, data);
        cx.actions.local.push(Local::Fanout(Fanout {
            selector: Arc::new(Selector::SourceUnix(source)),
            frame: Arc::from(uf),
            exclude: None,
            op: FanOp::Send,
            reply: None,
        }));
    }
}

//! WebSocket framing (RFC 6455), sans-io: bytes in, events or "need more"
//! or a typed error (with its close code) out. The decoder runs in server
//! mode (client frames must be masked) for WebSocket clients and in client
//! mode (server frames must not be) for the upstream client; encoders write
//! server frames, masked client frames and close frames.
//!
//! Header parsing is tungstenite's `FrameHeader::parse` (consumes nothing on
//! incomplete input); everything else is ours, over our own buffers:
//! - a frame wholly inside the caller's buffer is unmasked in place and
//!   handed out as a slice (no copy);
//! - a frame that spans reads is assembled in `partial`, which grows only as
//!   bytes arrive;
//! - a fragmented message is assembled in `message`, bounded by the
//!   endpoint's max message size, checked from each header before copying;
//! - text is validated as UTF-8 as it arrives (fail fast, 1007), so an
//!   invalid fragment is rejected before the message ends.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Going away (server shutdown).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Protocol error.
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Unsupported data (e.g. text where binary is required).
pub const CLOSE_UNSUPPORTED: u16 = 1003;
/// Invalid payload data (bad UTF-8).
pub const CLOSE_INVALID_DATA: u16 = 1007;
/// Policy violation (slow consumer, replaced by a newer login).
pub const CLOSE_POLICY: u16 = 1008;
/// Message too big.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Internal error / keepalive failure.
pub const CLOSE_INTERNAL: u16 = 1011;
/// Control frames carry at most 125 bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why the peer's bytes are not acceptable; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// Framing rule broken (1002).
    Protocol(&'static str),
    /// Text that is not UTF-8, or a close reason that is not (1007).
    InvalidUtf8,
    /// A message over the endpoint's limit (1009), before or after
    /// inflating.
    TooBig,
    /// A compressed message that is not deflate data (1007).
    BadDeflate,
}

impl WsError {
    /// The close code to send.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => CLOSE_PROTOCOL,
            WsError::InvalidUtf8 | WsError::BadDeflate => CLOSE_INVALID_DATA,
            WsError::TooBig => CLOSE_TOO_BIG,
        }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Protocol(why) => write!(f, "protocol error: {why}"),
            WsError::InvalidUtf8 => write!(f, "invalid UTF-8"),
            WsError::TooBig => write!(f, "message too big"),
            WsError::BadDeflate => write!(f, "invalid deflate data"),
        }
    }
}

impl std::error::Error for WsError {}

/// What a client sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message.
    Message {
        /// Text (UTF-8 checked) or binary.
        text: bool,
        /// Its payload, unmasked.
        data: &'a [u8],
        /// Deflated (RSV1, permessage-deflate): `data` is still compressed
        /// and its UTF-8 is unchecked.
        compressed: bool,
    },
    /// A ping; answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A close frame (code checked, reason UTF-8 checked).
    Close {
        /// The status code, if any.
        code: Option<u16>,
        /// The reason.
        reason: &'a [u8],
    },
}

/// True for codes a peer may send (RFC 6455 7.4, as Autobahn checks them).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// XORs `buf` with `mask`, starting at mask phase `phase` (bytes already
/// unmasked before `buf`).
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(phase + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let wide = u64::from(word) | (u64::from(word) << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// Appends a server (unmasked) frame header for `len` payload bytes.
pub fn encode_header(out: &mut Vec<u8>, opcode: u8, fin: bool, len: usize) {
    out.push(opcode | if fin { 0x80 } else { 0 });
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// A server frame header in a stack buffer: (bytes, length used).
pub fn header_array(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Appends a complete server frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    encode_header(out, opcode, true, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a client (masked) frame.
pub fn encode_masked(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let start = out.len();
    encode_header(out, opcode, true, payload.len());
    out[start + 1] |= 0x80;
    out.extend_from_slice(&mask);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], mask, 0);
}

/// Appends a close frame with `code` and a reason (truncated to fit 125).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut r = reason.as_bytes();
    if r.len() > MAX_CONTROL_PAYLOAD - 2 {
        let mut end = MAX_CONTROL_PAYLOAD - 2;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        r = &r[..end];
    }
    encode_header(out, OP_CLOSE, true, 2 + r.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(r);
}

/// UTF-8 validation across chunk boundaries: std's validator does the bulk;
/// this keeps only what a sequence split between chunks still needs.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Stream {
    need: u8,
    lo: u8,
    hi: u8,
}

impl Utf8Stream {
    /// Feeds the next bytes; false as soon as they cannot be UTF-8.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut i = 0;
        while self.need > 0 && i < bytes.len() {
            if !self.cont(bytes[i]) {
                return false;
            }
            i += 1;
        }
        if self.need > 0 {
            return true;
        }
        let rest = &bytes[i..];
        match std::str::from_utf8(rest) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                // A valid prefix of one sequence ends the chunk.
                let tail = &rest[e.valid_up_to()..];
                let (need, lo, hi) = match tail[0] {
                    0xC2..=0xDF => (1, 0x80, 0xBF),
                    0xE0 => (2, 0xA0, 0xBF),
                    0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
                    0xED => (2, 0x80, 0x9F),
                    0xF0 => (3, 0x90, 0xBF),
                    0xF1..=0xF3 => (3, 0x80, 0xBF),
                    0xF4 => (3, 0x80, 0x8F),
                    _ => return false,
                };
                *self = Utf8Stream { need, lo, hi };
                tail[1..].iter().all(|&b| self.cont(b))
            }
        }
    }

    fn cont(&mut self, b: u8) -> bool {
        if b < self.lo || b > self.hi {
            return false;
        }
        self.need -= 1;
        self.lo = 0x80;
        self.hi = 0xBF;
        true
    }

    /// True if no sequence is left open.
    pub fn complete(&self) -> bool {
        self.need == 0
    }
}

/// Incremental decoder for one connection (client -> server frames).
#[derive(Debug)]
pub struct Decoder {
    /// The buffers of frames that span reads and of fragmented messages,
    /// made when a connection first needs them: most connections never do
    /// (every frame whole in one read), and an idle one holds 8 bytes here
    /// instead of two empty vectors' 48.
    bufs: Option<Box<Bufs>>,
    /// Payload bytes of `partial` already unmasked (and UTF-8 checked).
    /// (u32: a frame never passes the 1 GiB message cap; keeps the
    /// per-connection stage small.)
    prepared: u32,
    /// The fragmented message's kind, while one is open.
    open: Option<bool>,
    /// The open fragmented message is compressed.
    open_compressed: bool,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    rsv1: bool,
    /// UTF-8 state of the text message being received.
    utf8: Utf8Stream,
    max_message: u32,
    /// Decoding a server's frames (as a client): they must be unmasked.
    from_server: bool,
}

/// See [`Decoder::bufs`].
#[derive(Debug, Default)]
struct Bufs {
    /// Bytes of a frame that spans reads (header masked; payload unmasked
    /// up to `prepared`).
    partial: Vec<u8>,
    /// A fragmented message so far (unmasked).
    message: Vec<u8>,
}

enum Step {
    /// A frame `header_len + payload_len` long at the front.
    Frame {
        header: FrameHeader,
        header_len: usize,
        payload_len: usize,
    },
    /// At least `total` bytes are needed; the header, once complete.
    Need {
        total: usize,
        header: Option<(FrameHeader, usize)>,
    },
}

impl Decoder {
    /// A server's decoder of client frames (masked), enforcing
    /// `max_message` bytes per message.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            bufs: None,
            prepared: 0,
            open: None,
            open_compressed: false,
            rsv1: false,
            utf8: Utf8Stream::default(),
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            from_server: false,
        }
    }

    /// A client's decoder of server frames (unmasked).
    pub fn client(max_message: usize) -> Self {
        Decoder {
            from_server: true,
            ..Decoder::new(max_message)
        }
    }

    /// The largest message it accepts.
    pub fn max_message(&self) -> usize {
        self.max_message as usize
    }

    /// Accepts RSV1 on a message's first frame (permessage-deflate).
    pub fn allow_compressed(&mut self) {
        self.rsv1 = true;
    }

    /// Heap bytes held (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b.partial.capacity() + b.message.capacity())
    }

    /// Bytes of a frame held across reads.
    #[inline]
    fn partial_len(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.partial.len())
    }

    /// The held frame, leaving an empty buffer.
    fn take_partial(&mut self) -> Vec<u8> {
        self.bufs
            .as_mut()
            .map(|b| std::mem::take(&mut b.partial))
            .unwrap_or_default()
    }

    fn step(&self, buf: &[u8]) -> Result<Step, WsError> {
        let mut cur = Cursor::new(buf);
        let (header, len) = match FrameHeader::parse(&mut cur) {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Ok(Step::Need {
                    total: buf.len() + 1,
                    header: None,
                })
            }
            Err(_) => return Err(WsError::Protocol("reserved opcode")),
        };
        if header.rsv2 || header.rsv3 || (header.rsv1 && !self.rsv1) {
            return Err(WsError::Protocol("reserved bits set without an extension"));
        }
        if header.rsv1 && !matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary)) {
            // RFC 7692 6.1: only a message's first frame, never control.
            return Err(WsError::Protocol("RSV1 on a continuation or control frame"));
        }
        if header.mask.is_some() == self.from_server {
            return Err(WsError::Protocol(if self.from_server {
                "server frame masked"
            } else {
                "client frame not masked"
            }));
        }
        let control = matches!(header.opcode, OpCode::Control(_));
        if control {
            if len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(WsError::Protocol("control frame over 125 bytes"));
            }
            if !header.is_final {
                return Err(WsError::Protocol("fragmented control frame"));
            }
        } else {
            // Checked from the header, before any byte is copied.
            let so_far = if self.open.is_some() {
                self.bufs.as_ref().map_or(0, |b| b.message.len()) as u64
            } else {
                0
            };
            if so_far.saturating_add(len) > self.max_message as u64 {
                return Err(WsError::TooBig);
            }
            match (header.opcode, self.open) {
                (OpCode::Data(Data::Continue), None) => {
                    return Err(WsError::Protocol("continuation without a message"))
                }
                (OpCode::Data(Data::Text | Data::Binary), Some(_)) => {
                    return Err(WsError::Protocol("new message inside a fragmented one"))
                }
                _ => {}
            }
        }
        let header_len = cur.position() as usize;
        let payload_len = len as usize;
        let total = header_len + payload_len;
        if buf.len() < total {
            return Ok(Step::Need {
                total,
                header: Some((header, header_len)),
            });
        }
        Ok(Step::Frame {
            header,
            header_len,
            payload_len,
        })
    }

    /// Is a data frame with this opcode part of a text message?
    fn is_text(&self, op: OpCode) -> bool {
        match op {
            OpCode::Data(Data::Text) => true,
            OpCode::Data(Data::Continue) => self.open == Some(true),
            _ => false,
        }
    }

    /// Is the message this data frame belongs to compressed (its UTF-8 is
    /// checked after inflating, not here)?
    fn compressed(&self, h: &FrameHeader) -> bool {
        match h.opcode {
            OpCode::Data(Data::Continue) => self.open_compressed,
            _ => h.rsv1,
        }
    }

    /// Unmasks the payload bytes of `partial` that arrived since the last
    /// call and checks text as it comes (fail fast on invalid UTF-8).
    fn prepare_partial(&mut self, h: &FrameHeader, header_len: usize) -> Result<(), WsError> {
        let start = self.prepared as usize;
        if self.partial_len() <= header_len + start {
            return Ok(());
        }
        let text = self.is_text(h.opcode) && !self.compressed(h);
        if text && start == 0 && h.opcode == OpCode::Data(Data::Text) {
            self.utf8 = Utf8Stream::default();
        }
        let bufs = self.bufs.get_or_insert_default();
        let fresh = &mut bufs.partial[header_len + start..];
        if let Some(mask) = h.mask {
            apply_mask(fresh, mask, start);
        }
        if text && !self.utf8.feed(fresh) {
            return Err(WsError::InvalidUtf8);
        }
        self.prepared += fresh.len() as u32;
        Ok(())
    }

    /// Feeds bytes (unmasked in place where whole frames lie in `input`)
    /// and calls `on_event` per event, in order. `on_event` returns false to
    /// stop (the connection is closing); the rest is discarded.
    pub fn feed<F>(&mut self, mut input: &mut [u8], mut on_event: F) -> Result<(), WsError>
    where
        F: FnMut(Event<'_>) -> bool,
    {
        while self.partial_len() > 0 {
            let step = match &self.bufs {
                Some(b) => self.step(&b.partial)?,
                None => break,
            };
            match step {
                Step::Frame {
                    header,
                    header_len,
                    payload_len,
                } => {
                    let mut frame = self.take_partial();
                    let prepared = std::mem::take(&mut self.prepared) as usize;
                    let payload = &mut frame[header_len..header_len + payload_len];
                    let go_on = self.frame(&header, payload, prepared, &mut on_event)?;
                    frame.clear();
                    if frame.capacity() <= 64 * 1024 {
                        // Keep a small buffer for reuse.
                        self.bufs.get_or_insert_default().partial = frame;
                    }
                    if !go_on {
                        return Ok(());
                    }
                }
                Step::Need { total, header } => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let take = (total - self.partial_len()).min(input.len());
                    let (head, rest) = std::mem::take(&mut input).split_at_mut(take);
                    self.bufs
                        .get_or_insert_default()
                        .partial
                        .extend_from_slice(head);
                    input = rest;
                    if let Some((h, header_len)) = header {
                        self.prepare_partial(&h, header_len)?;
                    }
                }
            }
        }
        while !input.is_empty() {
            match self.step(input)? {
                Step::Frame {
                    header,
                    header_len,
                    payload_len,
                } => {
                    let (frame, rest) =
                        std::mem::take(&mut input).split_at_mut(header_len + payload_len);
                    if !self.frame(&header, &mut frame[header_len..], 0, &mut on_event)? {
                        return Ok(());
                    }
                    input = rest;
                }
                Step::Need { header, .. } => {
                    self.bufs
                        .get_or_insert_default()
                        .partial
                        .extend_from_slice(input);
                    self.prepared = 0;
                    if let Some((h, header_len)) = header {
                        self.prepare_partial(&h, header_len)?;
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Handles one complete frame whose first `prepared` payload bytes are
    /// already unmasked and UTF-8 checked.
    fn frame<F>(
        &mut self,
        h: &FrameHeader,
        payload: &mut [u8],
        prepared: usize,
        on_event: &mut F,
    ) -> Result<bool, WsError>
    where
        F: FnMut(Event<'_>) -> bool,
    {
        if let Some(mask) = h.mask {
            apply_mask(&mut payload[prepared..], mask, prepared);
        }
        match h.opcode {
            OpCode::Control(Control::Ping) => Ok(on_event(Event::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_event(Event::Pong(payload))),
            OpCode::Control(Control::Close) => {
                let (code, reason) = match payload.len() {
                    0 => (None, &payload[..0]),
                    1 => return Err(WsError::Protocol("close frame with a 1-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !valid_close_code(code) {
                            return Err(WsError::Protocol("invalid close code"));
                        }
                        let reason = &payload[2..];
                        if std::str::from_utf8(reason).is_err() {
                            return Err(WsError::InvalidUtf8);
                        }
                        (Some(code), &payload[2..])
                    }
                };
                Ok(on_event(Event::Close { code, reason }))
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(WsError::Protocol("reserved opcode"))
            }
            OpCode::Data(kind) => {
                let text = self.is_text(h.opcode);
                let compressed = self.compressed(h);
                let check = text && !compressed;
                let starts = kind != Data::Continue;
                if prepared == 0 && check {
                    if starts {
                        self.utf8 = Utf8Stream::default();
                    }
                    if !self.utf8.feed(payload) {
                        return Err(WsError::InvalidUtf8);
                    }
                }
                if check && h.is_final && !self.utf8.complete() {
                    return Err(WsError::InvalidUtf8);
                }
                if h.is_final && self.open.is_none() {
                    // Whole message in one frame: hand out the slice.
                    return Ok(on_event(Event::Message {
                        text,
                        data: payload,
                        compressed,
                    }));
                }
                if starts {
                    self.open = Some(text);
                    self.open_compressed = compressed;
                }
                self.bufs
                    .get_or_insert_default()
                    .message
                    .extend_from_slice(payload);
                if !h.is_final {
                    return Ok(true);
                }
                let mut message = self
                    .bufs
                    .as_mut()
                    .map(|b| std::mem::take(&mut b.message))
                    .unwrap_or_default();
                self.open = None;
                let go_on = on_event(Event::Message {
                    text,
                    data: &message,
                    compressed,
                });
                if message.capacity() <= 64 * 1024 {
                    message.clear();
                    self.bufs.get_or_insert_default().message = message;
                }
                Ok(go_on)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    pub(crate) fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut v = vec![opcode | if fin { 0x80 } else { 0 }];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len <= 0xffff {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        apply_mask(&mut p, mask, 0);
        v.extend_from_slice(&p);
        v
    }

    fn events(d: &mut Decoder, chunks: &[&[u8]]) -> Result<Vec<String>, WsError> {
        let mut out = Vec::new();
        for c in chunks {
            let mut c = c.to_vec();
            d.feed(&mut c, |e| {
                out.push(match e {
                    Event::Message { text, data, .. } => format!(
                        "{}:{}",
                        if text { "T" } else { "B" },
                        String::from_utf8_lossy(data)
                    ),
                    Event::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                    Event::Pong(p) => format!("pong:{}", String::from_utf8_lossy(p)),
                    Event::Close { code, reason } => {
                        format!("close:{code:?}:{}", String::from_utf8_lossy(reason))
                    }
                });
                true
            })?;
        }
        Ok(out)
    }

    #[test]
    fn any_split_same_events() {
        let mut s = client_frame(OP_TEXT, false, "héllo ".as_bytes());
        s.extend(client_frame(OP_PING, true, b"p"));
        s.extend(client_frame(0x0, true, "wörld".as_bytes()));
        s.extend(client_frame(OP_BINARY, true, &[b'x'; 300]));
        s.extend(client_frame(OP_CLOSE, true, &[0x03, 0xe8, b'o', b'k']));
        let whole = events(&mut Decoder::new(1 << 20), &[&s]).unwrap();
        assert_eq!(whole[0], "ping:p");
        assert_eq!(whole[1], "T:héllo wörld");
        assert_eq!(whole[3], "close:Some(1000):ok");
        for split in 0..s.len() {
            let (a, b) = s.split_at(split);
            assert_eq!(
                events(&mut Decoder::new(1 << 20), &[a, b]).unwrap(),
                whole,
                "split {split}"
            );
        }
    }

    #[test]
    fn rules() {
        let e = |b: Vec<u8>| {
            events(&mut Decoder::new(1000), &[&b])
                .unwrap_err()
                .close_code()
        };
        let mut unmasked = client_frame(OP_TEXT, true, b"x");
        unmasked[1] &= 0x7f;
        unmasked.drain(2..6);
        assert_eq!(e(unmasked), 1002);
        let mut rsv = client_frame(OP_TEXT, true, b"x");
        rsv[0] |= 0x40;
        assert_eq!(e(rsv), 1002);
        assert_eq!(e(client_frame(0x3, true, b"")), 1002, "reserved opcode");
        assert_eq!(e(client_frame(0x0, true, b"x")), 1002, "bare continuation");
        assert_eq!(
            e(client_frame(OP_PING, false, b"")),
            1002,
            "fragmented control"
        );
        assert_eq!(
            e(client_frame(OP_PING, true, &[0; 126])),
            1002,
            "long control"
        );
        assert_eq!(e(client_frame(OP_TEXT, true, &[0xff])), 1007);
        assert_eq!(e(client_frame(OP_BINARY, true, &[0; 1001])), 1009);
        assert_eq!(e(client_frame(OP_CLOSE, true, &[0x03])), 1002);
        assert_eq!(
            e(client_frame(OP_CLOSE, true, &[0x03, 0xed])),
            1002,
            "1005 may not be sent"
        );
        assert_eq!(e(client_frame(OP_CLOSE, true, &[0x03, 0xe8, 0xff])), 1007);
        let mut two = client_frame(OP_TEXT, false, b"a");
        two.extend(client_frame(OP_TEXT, true, b"b"));
        assert_eq!(e(two), 1002, "new message inside a fragmented one");
    }

    #[test]
    fn invalid_utf8_fails_fast_in_fragments() {
        let mut d = Decoder::new(1000);
        let first = client_frame(OP_TEXT, false, &[0xce]); // incomplete: fine so far
        assert!(events(&mut d, &[&first]).unwrap().is_empty());
        let bad = client_frame(0x0, false, &[0xff]);
        assert_eq!(events(&mut d, &[&bad]), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn oversize_rejected_from_header() {
        // Header announcing 2^62 bytes: rejected before any payload.
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&(1u64 << 62).to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        let mut d = Decoder::new(1 << 20);
        assert_eq!(events(&mut d, &[&f]), Err(WsError::TooBig));
        assert!(d.capacity() < 64);
    }

    #[test]
    fn invalid_utf8_fails_fast_inside_one_frame() {
        // One text frame whose invalid bytes arrive before its end.
        let f = client_frame(
            OP_TEXT,
            true,
            &[0xce, 0xba, 0xf4, 0x90, 0x80, 0x80, b'x', b'y'],
        );
        let mut d = Decoder::new(1000);
        assert!(
            events(&mut d, &[&f[..8]]).unwrap().is_empty(),
            "valid so far"
        );
        assert_eq!(
            events(&mut d, &[&f[8..10]]),
            Err(WsError::InvalidUtf8),
            "rejected before the frame ends"
        );
    }

    #[test]
    fn utf8_stream_matches_std_on_every_split() {
        let samples: [&[u8]; 6] = [
            "ascii é € 𝄞 ok".as_bytes(),
            &[0xed, 0xa0, 0x80],
            &[0xf4, 0x90, 0x80, 0x80],
            &[0xe0, 0x80, 0x80],
            &[0xc3],
            &[0xf0, 0x9d, 0x84, 0x9e, 0xc3, 0xa9],
        ];
        for s in samples {
            let want = std::str::from_utf8(s).is_ok();
            for cut in 0..=s.len() {
                let mut u = Utf8Stream::default();
                let ok = u.feed(&s[..cut]) && u.feed(&s[cut..]) && u.complete();
                assert_eq!(ok, want, "{s:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn client_mode_reads_unmasked_server_frames() {
        let mut f = Vec::new();
        encode_frame(&mut f, OP_TEXT, b"from server");
        assert_eq!(
            events(&mut Decoder::client(100), &[&f]).unwrap(),
            vec!["T:from server"]
        );
        let masked = client_frame(OP_TEXT, true, b"x");
        assert!(
            events(&mut Decoder::client(100), &[&masked]).is_err(),
            "servers do not mask"
        );
        let mut m = Vec::new();
        encode_masked(&mut m, OP_BINARY, b"abc", [1, 2, 3, 4]);
        assert_eq!(
            events(&mut Decoder::new(100), &[&m]).unwrap(),
            vec!["B:abc"]
        );
    }

    #[test]
    fn header_array_matches_encode_header() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut v = Vec::new();
            encode_header(&mut v, OP_BINARY, true, len);
            let (h, n) = header_array(OP_BINARY, len);
            assert_eq!(&h[..n], &v[..], "len {len}");
        }
    }

    #[test]
    fn mask_phases() {
        let mask = [1, 2, 3, 4];
        let mut a: Vec<u8> = (0..37).collect();
        let orig = a.clone();
        apply_mask(&mut a[..5], mask, 0);
        apply_mask(&mut a[5..], mask, 5);
        for (i, (x, o)) in a.iter().zip(&orig).enumerate() {
            assert_eq!(*x, o ^ mask[i % 4]);
        }
    }
}

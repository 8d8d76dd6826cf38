//! RELY wire codec (relayd-compatible), sans-io: bytes in, frames or "need
//! more" or a typed error out. No sockets, no clocks, so it can be fuzzed and
//! benchmarked alone.
//!
//! Frame layouts (all integers big-endian):
//! ```text
//! login:    "RELY" 0x01 0x01 A:u8(1..=255) ClientID[A]
//! transfer: "RELY" 0x01 0x09 A:u8(1..=255) From[A] B:u8(0..=255) To[B] N:u32 Payload[N]
//! ```
//! `B == 0` is a heartbeat: it refreshes idle time and is never forwarded.
//!
//! Invariants:
//! - Every check that can fail is made as soon as the bytes it needs are
//!   present, so a bad magic is rejected at its 4th byte, and a payload length
//!   over the limit is rejected from the header alone, before any allocation.
//! - [`Decoder`] yields the same frames for any split of the input: a frame
//!   that spans reads is assembled in the decoder's `partial` buffer, which
//!   grows only as bytes actually arrive (a peer announcing 8 MiB and sending
//!   nothing costs nothing).

use std::fmt;

/// The four magic bytes that open every RELY frame.
pub const MAGIC: &[u8; 4] = b"RELY";
/// The only protocol version relayd speaks.
pub const VERSION: u8 = 0x01;
/// Command byte of a login frame.
pub const CMD_LOGIN: u8 = 0x01;
/// Command byte of a transfer frame.
pub const CMD_TRANSFER: u8 = 0x09;
/// relayd's per-frame payload safety limit (8 MiB), our default.
pub const DEFAULT_MAX_PAYLOAD: u32 = 8 * 1024 * 1024;
/// Bytes before the first variable-length field: magic, version, cmd, A.
const FIXED_HEAD: usize = 7;
/// Largest possible transfer header: 7 + 255 + 1 + 255 + 4.
pub const MAX_HEADER: usize = FIXED_HEAD + 255 + 1 + 255 + 4;

/// Why a byte stream is not RELY. Each variant closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelyError {
    /// The first four bytes are not `RELY`.
    BadMagic,
    /// The version byte is not 0x01.
    BadVersion(u8),
    /// The command byte is neither login nor transfer.
    BadCommand(u8),
    /// ClientIDLen / FromClientIDLen is 0 (must be 1..=255).
    EmptyClientId,
    /// PayloadLen exceeds the configured limit.
    PayloadTooLarge {
        /// Announced payload length.
        len: u32,
        /// Configured limit.
        max: u32,
    },
}

impl fmt::Display for RelyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelyError::BadMagic => write!(f, "bad magic"),
            RelyError::BadVersion(v) => write!(f, "bad version 0x{v:02x}"),
            RelyError::BadCommand(c) => write!(f, "bad command 0x{c:02x}"),
            RelyError::EmptyClientId => write!(f, "empty client id"),
            RelyError::PayloadTooLarge { len, max } => {
                write!(f, "payload length {len} over limit {max}")
            }
        }
    }
}

impl std::error::Error for RelyError {}

/// A decoded frame, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Login with a client id.
    Login {
        /// The id to register (raw bytes; relayd does not check UTF-8).
        id: &'a [u8],
    },
    /// Transfer (or heartbeat when `to` is empty).
    Transfer {
        /// FromClientID as sent.
        from: &'a [u8],
        /// ToClientID; empty means heartbeat.
        to: &'a [u8],
        /// The payload.
        payload: &'a [u8],
        /// The whole frame as received, for byte-for-byte forwarding.
        raw: &'a [u8],
    },
}

/// Result of looking at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// A complete frame and how many bytes it used.
    Frame(Frame<'a>, usize),
    /// Not enough bytes; at least this many are needed in total (a lower bound
    /// that becomes exact once the header is complete).
    Need(usize),
}

/// Parses one frame from the front of `buf`, consuming nothing on incomplete
/// input.
pub fn parse(buf: &[u8], max_payload: u32) -> Result<Parse<'_>, RelyError> {
    // Validate the fixed prefix byte by byte, so garbage fails fast.
    let n = buf.len().min(4);
    if buf[..n] != MAGIC[..n] {
        return Err(RelyError::BadMagic);
    }
    if buf.len() < 5 {
        return Ok(Parse::Need(FIXED_HEAD));
    }
    if buf[4] != VERSION {
        return Err(RelyError::BadVersion(buf[4]));
    }
    if buf.len() < 6 {
        return Ok(Parse::Need(FIXED_HEAD));
    }
    let cmd = buf[5];
    if cmd != CMD_LOGIN && cmd != CMD_TRANSFER {
        return Err(RelyError::BadCommand(cmd));
    }
    if buf.len() < FIXED_HEAD {
        return Ok(Parse::Need(FIXED_HEAD));
    }
    let a = buf[6] as usize;
    if a == 0 {
        return Err(RelyError::EmptyClientId);
    }
    let after_a = FIXED_HEAD + a;
    if cmd == CMD_LOGIN {
        if buf.len() < after_a {
            return Ok(Parse::Need(after_a));
        }
        let id = &buf[FIXED_HEAD..after_a];
        return Ok(Parse::Frame(Frame::Login { id }, after_a));
    }
    // Transfer: need B.
    if buf.len() < after_a + 1 {
        return Ok(Parse::Need(after_a + 1));
    }
    let b = buf[after_a] as usize;
    let after_b = after_a + 1 + b;
    let head = after_b + 4;
    if buf.len() < head {
        return Ok(Parse::Need(head));
    }
    let len = u32::from_be_bytes([
        buf[after_b],
        buf[after_b + 1],
        buf[after_b + 2],
        buf[after_b + 3],
    ]);
    if len > max_payload {
        return Err(RelyError::PayloadTooLarge {
            len,
            max: max_payload,
        });
    }
    let total = head + len as usize;
    if buf.len() < total {
        return Ok(Parse::Need(total));
    }
    Ok(Parse::Frame(
        Frame::Transfer {
            from: &buf[FIXED_HEAD..after_a],
            to: &buf[after_a + 1..after_b],
            payload: &buf[head..total],
            raw: &buf[..total],
        },
        total,
    ))
}

/// Incremental decoder: per-connection state is only the partial frame.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
}

impl Decoder {
    /// A decoder with no partial frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of an incomplete frame held between reads.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Heap capacity held by this decoder (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds `input` and calls `on_frame` for each complete frame, in order.
    /// `on_frame` returns `false` to stop early (e.g. the connection is being
    /// closed); the rest of the input is then discarded. On error, the
    /// decoder is left in an unspecified state and must not be fed again.
    pub fn feed<F>(
        &mut self,
        mut input: &[u8],
        max_payload: u32,
        mut on_frame: F,
    ) -> Result<(), RelyError>
    where
        F: FnMut(Frame<'_>) -> bool,
    {
        // Finish a frame started in an earlier read, copying only the bytes
        // it needs, so the rest can still be parsed in place.
        while !self.partial.is_empty() {
            match parse(&self.partial, max_payload)? {
                Parse::Frame(frame, used) => {
                    debug_assert_eq!(used, self.partial.len());
                    let go_on = on_frame(frame);
                    self.partial.clear();
                    if self.partial.capacity() > MAX_HEADER * 4 {
                        // Give back a large frame's buffer once done with it.
                        self.partial = Vec::new();
                    }
                    if !go_on {
                        return Ok(());
                    }
                }
                Parse::Need(total) => {
                    if input.is_empty() {
                        return Ok(());
                    }
                    let take = (total - self.partial.len()).min(input.len());
                    self.partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
            }
        }
        while !input.is_empty() {
            match parse(input, max_payload)? {
                Parse::Frame(frame, used) => {
                    if !on_frame(frame) {
                        return Ok(());
                    }
                    input = &input[used..];
                }
                Parse::Need(_) => {
                    self.partial.extend_from_slice(input);
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Appends a login frame for `id` to `out`. Panics if `id` is empty or longer
/// than 255 bytes (a caller bug, not network input).
pub fn encode_login(out: &mut Vec<u8>, id: &[u8]) {
    assert!(
        !id.is_empty() && id.len() <= 255,
        "client id must be 1..=255 bytes"
    );
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(CMD_LOGIN);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
}

/// Appends a transfer frame to `out`; an empty `to` makes a heartbeat. Panics
/// on id lengths outside the protocol or a payload over 4 GiB (caller bugs).
pub fn encode_transfer(out: &mut Vec<u8>, from: &[u8], to: &[u8], payload: &[u8]) {
    assert!(
        !from.is_empty() && from.len() <= 255,
        "from id must be 1..=255 bytes"
    );
    assert!(to.len() <= 255, "to id must be 0..=255 bytes");
    let len = u32::try_from(payload.len()).expect("payload over 4 GiB");
    out.reserve(FIXED_HEAD + from.len() + 1 + to.len() + 4 + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(CMD_TRANSFER);
    out.push(from.len() as u8);
    out.extend_from_slice(from);
    out.push(to.len() as u8);
    out.extend_from_slice(to);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames_of(chunks: &[&[u8]]) -> Result<Vec<Vec<u8>>, RelyError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, DEFAULT_MAX_PAYLOAD, |f| {
                out.push(match f {
                    Frame::Login { id } => [b"L".as_slice(), id].concat(),
                    Frame::Transfer { raw, .. } => raw.to_vec(),
                });
                true
            })?;
        }
        Ok(out)
    }

    #[test]
    fn any_split_gives_same_frames() {
        let mut stream = Vec::new();
        encode_login(&mut stream, b"alice");
        encode_transfer(&mut stream, b"alice", b"bob", b"hello world");
        encode_transfer(&mut stream, b"alice", b"", b"");
        encode_transfer(&mut stream, b"alice", b"bob", &[7u8; 1000]);
        let whole = frames_of(&[&stream]).unwrap();
        assert_eq!(whole.len(), 4);
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(frames_of(&[a, b]).unwrap(), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames_of(&bytes).unwrap(), whole);
    }

    #[test]
    fn rejects_early() {
        assert_eq!(parse(b"RELX", 10), Err(RelyError::BadMagic));
        assert_eq!(parse(b"X", 10), Err(RelyError::BadMagic));
        assert_eq!(parse(b"RELY\x02", 10), Err(RelyError::BadVersion(2)));
        assert_eq!(parse(b"RELY\x01\x05", 10), Err(RelyError::BadCommand(5)));
        assert_eq!(
            parse(b"RELY\x01\x01\x00", 10),
            Err(RelyError::EmptyClientId)
        );
        let mut f = Vec::new();
        f.extend_from_slice(b"RELY\x01\x09\x01a\x01b");
        f.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse(&f, DEFAULT_MAX_PAYLOAD),
            Err(RelyError::PayloadTooLarge {
                len: u32::MAX,
                max: DEFAULT_MAX_PAYLOAD
            })
        );
    }

    #[test]
    fn huge_length_allocates_nothing() {
        let mut f = Vec::new();
        f.extend_from_slice(b"RELY\x01\x09\x01a\x01b");
        f.extend_from_slice(&(DEFAULT_MAX_PAYLOAD).to_be_bytes());
        let mut d = Decoder::new();
        d.feed(&f, DEFAULT_MAX_PAYLOAD, |_| true).unwrap();
        assert!(d.capacity() < 1024, "buffered only what arrived");
    }
}

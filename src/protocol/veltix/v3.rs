//! Veltix 3 (what `pip install veltix` speaks, 2.0.0 to 3.3.0), sans-io.
//!
//! Handshake, before any frame: each message is a u16 big-endian length and
//! UTF-8 JSON (at most 30 KiB). The server speaks first,
//! `{"v": "...", "pv": "1.0", "meta": {}}`; the client answers with its own;
//! the server accepts (`{"result": "ok"}`) if the protocol majors match, or
//! closes; when full it sends `{"error": "server_full"}` and closes.
//!
//! Frame, all integers big-endian:
//! ```text
//! "VX" | flags u8 | type u16 | size u32 | CRC32(content) u32 | request_id u16 | content
//! ```
//! Types 0 and 1 are PING and PONG; a PONG carries its PING's request id.
//! Clients number their requests below 32768, servers from 32768.
//!
//! Failure handling is Veltix's: a wrong magic, a frame over the size limit
//! or a CRC mismatch drops bytes up to the next "VX" (resync) and is
//! reported as [`Corrupt`]; the connection is never closed for it. Every
//! length is checked from the header before anything is buffered, and
//! [`Decoder`] yields the same events for any split of the input.

/// The two magic bytes that open every frame.
pub const MAGIC: &[u8; 2] = b"VX";
/// Header length.
pub const HEADER: usize = 15;
/// System type: ping (empty content).
pub const PING: u16 = 0;
/// System type: pong, with the ping's request id.
pub const PONG: u16 = 1;
/// The first request id of the server's range.
pub const SERVER_IDS: u16 = 32768;
/// Veltix's default largest frame (header and content): 10 MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 10 * 1024 * 1024;
/// Largest handshake message (3.3.0's limit).
pub const MAX_HANDSHAKE: usize = 30 * 1024;
/// The protocol version we speak.
pub const PROTOCOL_VERSION: &str = "1.0";
/// The package version we announce (the one whose protocol we speak).
pub const PACKAGE_VERSION: &str = "3.3.0";

/// A decoded frame, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Flags (only 0 is defined; receivers ignore them).
    pub flags: u8,
    /// Message type code.
    pub ty: u16,
    /// Request id.
    pub request_id: u16,
    /// The content.
    pub content: &'a [u8],
}

/// Why bytes were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    /// The bytes did not start with "VX".
    BadMagic,
    /// The header announced a frame over the limit.
    TooLarge,
    /// The content's CRC32 did not match the header's.
    BadCrc,
}

/// One step of decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A verified frame.
    Frame(Frame<'a>),
    /// Bytes dropped for this reason (the stream resynced).
    Corrupt(Corrupt),
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// A frame and the bytes it used.
    Frame(Frame<'a>, usize),
    /// Drop this many bytes (up to the next possible "VX").
    Skip(usize, Corrupt),
    /// At least this many bytes in all are needed.
    Need(usize),
}

/// Where the next frame could start after a corrupt one at 0: the next
/// "VX" from offset 1, a trailing "V" that may begin one, or the end.
fn resync(buf: &[u8]) -> usize {
    let mut i = 1;
    while i < buf.len() {
        if buf[i] == MAGIC[0] && (i + 1 == buf.len() || buf[i + 1] == MAGIC[1]) {
            return i;
        }
        i += 1;
    }
    buf.len()
}

/// Parses one frame at the start of `buf`; `max` bounds header plus
/// content.
pub fn parse(buf: &[u8], max: usize) -> Parse<'_> {
    if buf.len() < 2 {
        return if buf.first().is_some_and(|&b| b != MAGIC[0]) {
            Parse::Skip(1, Corrupt::BadMagic)
        } else {
            Parse::Need(2)
        };
    }
    if &buf[..2] != MAGIC {
        return Parse::Skip(resync(buf), Corrupt::BadMagic);
    }
    if buf.len() < HEADER {
        return Parse::Need(HEADER);
    }
    let size = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
    let total = HEADER.saturating_add(size);
    if total > max {
        return Parse::Skip(resync(&buf[..HEADER]), Corrupt::TooLarge);
    }
    if buf.len() < total {
        return Parse::Need(total);
    }
    let content = &buf[HEADER..total];
    let crc = u32::from_be_bytes([buf[9], buf[10], buf[11], buf[12]]);
    if crc32fast::hash(content) != crc {
        return Parse::Skip(resync(&buf[..total]), Corrupt::BadCrc);
    }
    let frame = Frame {
        flags: buf[2],
        ty: u16::from_be_bytes([buf[3], buf[4]]),
        request_id: u16::from_be_bytes([buf[13], buf[14]]),
        content,
    };
    Parse::Frame(frame, total)
}

/// Appends one frame to `out`.
pub fn encode(out: &mut Vec<u8>, flags: u8, ty: u16, request_id: u16, content: &[u8]) {
    out.extend_from_slice(&header(flags, ty, request_id, content));
    out.extend_from_slice(content);
}

/// The header of a frame of `content` (on the stack: it runs per message).
pub fn header(flags: u8, ty: u16, request_id: u16, content: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..2].copy_from_slice(MAGIC);
    h[2] = flags;
    h[3..5].copy_from_slice(&ty.to_be_bytes());
    h[5..9].copy_from_slice(&(content.len() as u32).to_be_bytes());
    h[9..13].copy_from_slice(&crc32fast::hash(content).to_be_bytes());
    h[13..15].copy_from_slice(&request_id.to_be_bytes());
    h
}

/// Incremental frame decoder: per-connection state is only a partial frame
/// (or up to 14 bytes of one's header).
///
/// One corrupt region is one [`Corrupt`] event however it is split: the
/// junk after a bad frame, or a run of bytes without "VX", is reported once
/// (at its start), until a good frame follows.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
    /// Inside a corrupt region already reported.
    junk: bool,
}

impl Decoder {
    /// Heap capacity held (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Whether a skip starts a new corrupt region (to report). A bad magic
    /// continues the region a bad frame began.
    fn report(&mut self, why: Corrupt) -> bool {
        let new = !(self.junk && why == Corrupt::BadMagic);
        self.junk = true;
        new
    }

    /// Feeds `input`, calling `on_event` for each frame or drop, in order;
    /// `on_event` returns false to stop (the rest is discarded).
    pub fn feed<F>(&mut self, mut input: &[u8], max: usize, mut on_event: F)
    where
        F: FnMut(Event<'_>) -> bool,
    {
        // Bounded: every turn consumes input or partial bytes, or returns.
        while !self.partial.is_empty() {
            match parse(&self.partial, max) {
                Parse::Frame(f, used) => {
                    self.junk = false;
                    let go_on = on_event(Event::Frame(f));
                    self.partial.drain(..used);
                    if self.partial.capacity() > 4 * HEADER && self.partial.is_empty() {
                        self.partial = Vec::new();
                    }
                    if !go_on {
                        return;
                    }
                }
                Parse::Skip(n, why) => {
                    self.partial.drain(..n);
                    if self.report(why) && !on_event(Event::Corrupt(why)) {
                        return;
                    }
                }
                Parse::Need(total) => {
                    if input.is_empty() {
                        return;
                    }
                    let take = (total - self.partial.len()).min(input.len());
                    self.partial.extend_from_slice(&input[..take]);
                    input = &input[take..];
                }
            }
        }
        while !input.is_empty() {
            match parse(input, max) {
                Parse::Frame(f, used) => {
                    self.junk = false;
                    if !on_event(Event::Frame(f)) {
                        return;
                    }
                    input = &input[used..];
                }
                Parse::Skip(n, why) => {
                    input = &input[n..];
                    if self.report(why) && !on_event(Event::Corrupt(why)) {
                        return;
                    }
                }
                Parse::Need(_) => {
                    self.partial.extend_from_slice(input);
                    return;
                }
            }
        }
    }
}

/// Incremental decoder of handshake messages (u16 length + JSON).
#[derive(Debug, Default)]
pub struct HandshakeDecoder {
    buf: Vec<u8>,
}

/// A handshake message was over [`MAX_HANDSHAKE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeTooLarge;

impl HandshakeDecoder {
    /// Feeds bytes; returns the first complete message and the number of
    /// input bytes it used (the rest are frames), or None while incomplete.
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HandshakeTooLarge> {
        let before = self.buf.len();
        let need_len = 2usize.saturating_sub(before).min(input.len());
        self.buf.extend_from_slice(&input[..need_len]);
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > MAX_HANDSHAKE {
            return Err(HandshakeTooLarge);
        }
        let have = self.buf.len() - 2;
        let take = (len - have).min(input.len() - need_len);
        self.buf
            .extend_from_slice(&input[need_len..need_len + take]);
        if self.buf.len() - 2 < len {
            return Ok(None);
        }
        let msg = self.buf[2..].to_vec();
        self.buf = Vec::new();
        Ok(Some((msg, need_len + take)))
    }
}

/// Appends one handshake message.
pub fn encode_handshake(out: &mut Vec<u8>, json: &[u8]) {
    out.extend_from_slice(&(json.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(json);
}

/// The hello both sides send: `{"v": .., "pv": .., "meta": {}}`, spaced as
/// Python's json.dumps spaces it.
pub fn hello() -> Vec<u8> {
    format!("{{\"v\": \"{PACKAGE_VERSION}\", \"pv\": \"{PROTOCOL_VERSION}\", \"meta\": {{}}}}")
        .into_bytes()
}

/// The server's acceptance.
pub const ACCEPTED: &[u8] = br#"{"result": "ok"}"#;
/// The server's refusal when it is full.
pub const SERVER_FULL: &[u8] = br#"{"error": "server_full"}"#;

/// Does a peer's hello speak our protocol? (Its `pv` major must equal
/// ours; a missing or malformed `pv` is refused, as Veltix refuses it.)
pub fn compatible(hello: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(hello) else {
        return false;
    };
    let major = |s: &str| s.split('.').next().and_then(|m| m.parse::<u32>().ok());
    match v.get("pv").and_then(|p| p.as_str()).and_then(major) {
        Some(m) => Some(m) == major(PROTOCOL_VERSION),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Owned events, to compare across splits.
    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        F(u8, u16, u16, Vec<u8>),
        C(Corrupt),
    }

    fn events(chunks: &[&[u8]], max: usize) -> Vec<Ev> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, max, |e| {
                out.push(match e {
                    Event::Frame(f) => Ev::F(f.flags, f.ty, f.request_id, f.content.to_vec()),
                    Event::Corrupt(c) => Ev::C(c),
                });
                true
            });
        }
        out
    }

    /// Every split of `input` in two, and byte by byte, yields `whole`.
    fn same_for_every_split(input: &[u8], max: usize) -> Vec<Ev> {
        let whole = events(&[input], max);
        for i in 0..=input.len() {
            assert_eq!(
                events(&[&input[..i], &input[i..]], max),
                whole,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(events(&bytes, max), whole, "byte by byte");
        whole
    }

    const GOLDEN: [(&str, u16, &str, u16); 4] = [
        (
            "56580000c8000000053610a686123468656c6c6f",
            200,
            "hello",
            0x1234,
        ),
        ("565800000000000000000000000000", 0, "", 0),
        (
            "56580000c90000000b035d5cdeffff56656c74697820f09fa680",
            201,
            "Veltix 🦀",
            0xFFFF,
        ),
        (
            "565800271000000010d2e71e5100017b226b223a205b312c20322c20335d7d",
            10000,
            "{\"k\": [1, 2, 3]}",
            1,
        ),
    ];

    #[test]
    fn golden_vectors_encode_and_decode_for_every_split() {
        let mut all = Vec::new();
        for (hex, ty, content, id) in GOLDEN {
            let mut f = Vec::new();
            encode(&mut f, 0, ty, id, content.as_bytes());
            assert_eq!(f, unhex(hex), "encode {content:?}");
            all.extend_from_slice(&f);
        }
        let want: Vec<Ev> = GOLDEN
            .iter()
            .map(|(_, ty, c, id)| Ev::F(0, *ty, *id, c.as_bytes().to_vec()))
            .collect();
        assert_eq!(same_for_every_split(&all, DEFAULT_MAX_MESSAGE), want);
    }

    #[test]
    fn corrupt_frames_are_dropped_and_the_stream_resyncs() {
        let mut good = Vec::new();
        encode(&mut good, 0x80, 200, 7, b"ok");
        let mut bad_crc = good.clone();
        bad_crc[9] ^= 1;
        let mut too_big = Vec::new();
        encode(&mut too_big, 0, 200, 8, &[b'x'; 64]);
        let mut input = b"junk".to_vec();
        input.extend_from_slice(&bad_crc);
        input.extend_from_slice(&good);
        input.extend_from_slice(&too_big[..HEADER]);
        input.extend_from_slice(&good);
        let got = same_for_every_split(&input, 32);
        assert_eq!(
            got,
            vec![
                Ev::C(Corrupt::BadMagic),
                Ev::C(Corrupt::BadCrc),
                Ev::F(0x80, 200, 7, b"ok".to_vec()),
                Ev::C(Corrupt::TooLarge),
                Ev::F(0x80, 200, 7, b"ok".to_vec()),
            ]
        );
    }

    #[test]
    fn an_oversize_header_is_dropped_before_its_content_arrives() {
        let mut big = Vec::new();
        encode(&mut big, 0, 200, 1, &vec![0u8; 1 << 20]);
        let mut d = Decoder::default();
        let mut got = Vec::new();
        d.feed(&big[..HEADER], 1024, |e| {
            got.push(format!("{e:?}"));
            true
        });
        assert_eq!(got, vec!["Corrupt(TooLarge)"]);
        assert!(d.capacity() < 64, "nothing buffered for it");
    }

    #[test]
    fn handshake_messages_and_the_version_check() {
        let captured = unhex(
            "00277b2276223a2022332e332e30222c20227076223a2022312e30222c20226d657461223a207b7d7d",
        );
        let mut mine = Vec::new();
        encode_handshake(&mut mine, &hello());
        assert_eq!(mine, captured, "our hello is Veltix 3.3.0's, byte for byte");
        let mut ack = Vec::new();
        encode_handshake(&mut ack, ACCEPTED);
        assert_eq!(ack, unhex("00107b22726573756c74223a20226f6b227d"));
        let mut input = captured.clone();
        input.extend_from_slice(b"VX");
        for i in 0..=input.len() {
            let mut d = HandshakeDecoder::default();
            let first = d.feed(&input[..i]).unwrap();
            let (msg, used) = match first {
                Some(m) => m,
                None => {
                    let (m, u) = d.feed(&input[i..]).unwrap().expect("complete");
                    (m, i + u)
                }
            };
            assert_eq!(
                (msg.as_slice(), used),
                (&captured[2..], captured.len()),
                "split {i}"
            );
        }
        assert!(compatible(&hello()));
        assert!(compatible(br#"{"v": "3.0.1", "pv": "1.7", "meta": {}}"#));
        assert!(!compatible(br#"{"v": "9.0.0", "pv": "2.0", "meta": {}}"#));
        assert!(!compatible(
            br#"{"v": "2.0.0", "meta": {"id_window": 30000}}"#
        ));
        assert!(!compatible(b"not json"));
        let mut d = HandshakeDecoder::default();
        assert_eq!(d.feed(&[0xff, 0xff]), Err(HandshakeTooLarge));
    }
}

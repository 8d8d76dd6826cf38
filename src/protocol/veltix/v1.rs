//! Veltix 1 (the format its README describes, v1.0.0), sans-io.
//!
//! No handshake. Each frame, integers big-endian:
//! ```text
//! type u16 | size u32 | SHA-256(content) 32 bytes | timestamp_ms u64 | content
//! ```
//! The timestamp is the sender's Unix time in milliseconds.
//!
//! v1.0.0 parsed each `recv()` chunk as one frame; we frame the stream by
//! `size`, so coalesced and split reads both work. A hash mismatch drops that
//! frame (counted) and keeps the connection, as Veltix does. A size over the
//! limit cannot be skipped (v1 has no magic to resync on), so it is an error
//! that closes the connection, found from the header before anything is
//! buffered.

use sha2::{Digest, Sha256};

/// Header length.
pub const HEADER: usize = 46;

/// A decoded frame, borrowing from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Message type code.
    pub ty: u16,
    /// The sender's timestamp (Unix ms).
    pub timestamp_ms: u64,
    /// The content.
    pub content: &'a [u8],
    /// The whole frame, for byte-for-byte forwarding.
    pub raw: &'a [u8],
}

/// One step of decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A verified frame.
    Frame(Frame<'a>),
    /// A frame whose content did not match its hash, dropped.
    BadHash,
}

/// The header announced more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// Announced content size.
    pub size: u64,
}

/// What [`parse`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<'a> {
    /// An event and the bytes it used.
    Event(Event<'a>, usize),
    /// At least this many bytes in all are needed.
    Need(usize),
}

/// Parses one frame at the start of `buf`; `max` bounds header plus
/// content.
pub fn parse(buf: &[u8], max: usize) -> Result<Parse<'_>, TooLarge> {
    if buf.len() < HEADER {
        return Ok(Parse::Need(HEADER));
    }
    let size = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
    let total = HEADER.saturating_add(size);
    if total > max {
        return Err(TooLarge { size: size as u64 });
    }
    if buf.len() < total {
        return Ok(Parse::Need(total));
    }
    let content = &buf[HEADER..total];
    if Sha256::digest(content).as_slice() != &buf[6..38] {
        return Ok(Parse::Event(Event::BadHash, total));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&buf[38..46]);
    let frame = Frame {
        ty: u16::from_be_bytes([buf[0], buf[1]]),
        timestamp_ms: u64::from_be_bytes(ts),
        content,
        raw: &buf[..total],
    };
    Ok(Parse::Event(Event::Frame(frame), total))
}

/// Appends one frame to `out`.
pub fn encode(out: &mut Vec<u8>, ty: u16, content: &[u8], timestamp_ms: u64) {
    out.extend_from_slice(&header(ty, content, timestamp_ms));
    out.extend_from_slice(content);
}

/// The header of a frame of `content` (on the stack).
pub fn header(ty: u16, content: &[u8], timestamp_ms: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..2].copy_from_slice(&ty.to_be_bytes());
    h[2..6].copy_from_slice(&(content.len() as u32).to_be_bytes());
    h[6..38].copy_from_slice(&Sha256::digest(content));
    h[38..].copy_from_slice(&timestamp_ms.to_be_bytes());
    h
}

/// Incremental decoder: per-connection state is only the partial frame.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
}

impl Decoder {
    /// Heap capacity held (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds `input`, calling `on_event` for each frame or drop, in order;
    /// `on_event` returns false to stop (the rest is discarded). After an
    /// error the decoder must not be fed again.
    pub fn feed<F>(&mut self, mut input: &[u8], max: usize, mut on_event: F) -> Result<(), TooLarge>
    where
        F: FnMut(Event<'_>) -> bool,
    {
        while !self.partial.is_empty() {
            match parse(&self.partial, max)? {
                Parse::Event(e, used) => {
                    debug_assert_eq!(used, self.partial.len());
                    let go_on = on_event(e);
                    self.partial.clear();
                    if self.partial.capacity() > 4 * HEADER {
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
            match parse(input, max)? {
                Parse::Event(e, used) => {
                    if !on_event(e) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The capture in BEHAVIOUR.md: "hello", type 200, from v1.0.0.
    const CAPTURE: &str = "00c8000000052cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824000001a205c67c4668656c6c6f";

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        F(u16, u64, Vec<u8>, Vec<u8>),
        Bad,
    }

    fn events(chunks: &[&[u8]], max: usize) -> Result<Vec<Ev>, TooLarge> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, max, |e| {
                out.push(match e {
                    Event::Frame(f) => {
                        Ev::F(f.ty, f.timestamp_ms, f.content.to_vec(), f.raw.to_vec())
                    }
                    Event::BadHash => Ev::Bad,
                });
                true
            })?;
        }
        Ok(out)
    }

    #[test]
    fn the_captured_frame_encodes_and_decodes_for_every_split() {
        let golden = unhex(CAPTURE);
        let mut mine = Vec::new();
        encode(&mut mine, 200, b"hello", 0x0000_01a2_05c6_7c46);
        assert_eq!(mine, golden);
        let mut bad = golden.clone();
        *bad.last_mut().unwrap() ^= 1;
        let mut input = golden.clone();
        input.extend_from_slice(&bad);
        input.extend_from_slice(&golden);
        let f = Ev::F(
            200,
            0x0000_01a2_05c6_7c46,
            b"hello".to_vec(),
            golden.clone(),
        );
        let want = vec![f.clone(), Ev::Bad, f];
        for i in 0..=input.len() {
            let got = events(&[&input[..i], &input[i..]], 1024).unwrap();
            assert_eq!(got, want, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(events(&bytes, 1024).unwrap(), want);
    }

    #[test]
    fn an_oversize_size_is_refused_from_the_header() {
        let mut big = Vec::new();
        encode(&mut big, 200, &vec![0u8; 4096], 1);
        let mut d = Decoder::default();
        assert_eq!(
            d.feed(&big[..HEADER], 1024, |_| true),
            Err(TooLarge { size: 4096 })
        );
    }
}

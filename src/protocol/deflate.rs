//! permessage-deflate (RFC 7692), sans-io: the `Sec-WebSocket-Extensions`
//! grammar, the server's choice among a client's offers, the client's check
//! of a server's answer, and whole-message deflate and inflate over flate2
//! (zlib-rs backend, raw deflate with a chosen window).
//!
//! Inflating is bounded while it runs: output past the caller's cap stops
//! the inflate and is reported as too big, so a decompression bomb costs at
//! most the cap (plus one growth step), never what it claims to expand to.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in the header.
pub const NAME: &str = "permessage-deflate";

/// The 4 bytes a sync flush ends with, which the sender strips and the
/// receiver puts back (RFC 7692 7.2.1 and 7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Smallest window zlib can deflate with (raw deflate refuses 8, and a
/// larger window inflates any smaller one's data).
pub const MIN_BITS: u8 = 9;
/// Largest window (32 KiB).
pub const MAX_BITS: u8 = 15;

/// What a server endpoint accepts (`compression:` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Decline every offer.
    Off,
    /// Only without context takeover either way, so one compressed frame
    /// per core serves every subscriber and no connection holds a context.
    Shared,
    /// A compression context per connection (context takeover allowed).
    Dedicated,
}

/// A server's negotiation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// What it accepts.
    pub mode: Mode,
    /// Largest window it compresses with (dedicated), 9..=15.
    pub server_max_window_bits: u8,
    /// Largest window it asks clients to compress with, when they offer to
    /// be told (dedicated), 9..=15.
    pub client_max_window_bits: u8,
}

impl Policy {
    /// Declines everything.
    pub const OFF: Policy = Policy {
        mode: Mode::Off,
        server_max_window_bits: MAX_BITS,
        client_max_window_bits: MAX_BITS,
    };
}

/// What both sides agreed, seen from this side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The server compresses each message on its own.
    pub server_no_context: bool,
    /// The client compresses each message on its own.
    pub client_no_context: bool,
    /// Window the server compresses with.
    pub server_bits: u8,
    /// Window the client compresses with.
    pub client_bits: u8,
    /// `client_max_window_bits` goes in the answer with this value.
    answer_client_bits: Option<u8>,
    /// `server_max_window_bits` goes in the answer.
    answer_server_bits: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value that accepts it.
    pub fn answer(&self) -> String {
        let mut s = String::from(NAME);
        if self.server_no_context {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context {
            s.push_str("; client_no_context_takeover");
        }
        if self.answer_server_bits {
            s.push_str(&format!("; server_max_window_bits={}", self.server_bits));
        }
        if let Some(b) = self.answer_client_bits {
            s.push_str(&format!("; client_max_window_bits={b}"));
        }
        s
    }
}

/// One extension of a header list: its name and parameters (name, value).
type Element = (String, Vec<(String, Option<String>)>);

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// Parses a `Sec-WebSocket-Extensions` value (RFC 6455 9.1 with RFC 7230
/// tokens and quoted strings); None if it does not follow the grammar.
pub fn parse_list(s: &str) -> Option<Vec<Element>> {
    let b = s.as_bytes();
    let mut i = 0;
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> Option<String> {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        (start < *i).then(|| s[start..*i].to_ascii_lowercase())
    };
    let mut out = Vec::new();
    loop {
        ows(&mut i);
        if i == b.len() && !out.is_empty() {
            // A trailing comma.
            return None;
        }
        let name = token(&mut i)?;
        let mut params = Vec::new();
        loop {
            ows(&mut i);
            match b.get(i) {
                None | Some(b',') => break,
                Some(b';') => i += 1,
                Some(_) => return None,
            }
            ows(&mut i);
            let p = token(&mut i)?;
            ows(&mut i);
            let mut value = None;
            if b.get(i) == Some(&b'=') {
                i += 1;
                ows(&mut i);
                if b.get(i) == Some(&b'"') {
                    i += 1;
                    let mut v = Vec::new();
                    loop {
                        match b.get(i)? {
                            b'"' => break,
                            b'\\' => {
                                i += 1;
                                v.push(*b.get(i)?);
                            }
                            &c => v.push(c),
                        }
                        i += 1;
                    }
                    i += 1;
                    value = Some(String::from_utf8(v).ok()?);
                } else {
                    value = Some(token(&mut i)?);
                }
            }
            params.push((p, value));
        }
        out.push((name, params));
        if i == b.len() {
            return Some(out);
        }
        i += 1; // the comma
    }
}

/// A window size value: 8..=15, decimal, no leading zero.
fn bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|n| (8..=15).contains(n))
}

/// A permessage-deflate offer's parameters, checked (RFC 7692 7.1).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Params {
    server_no_context: bool,
    client_no_context: bool,
    server_bits: Option<u8>,
    /// Present (the client takes a limit); its own value if it gave one.
    client_bits: Option<Option<u8>>,
}

impl Params {
    /// None for an unknown, repeated or badly valued parameter.
    fn parse(params: &[(String, Option<String>)]) -> Option<Params> {
        let mut p = Params::default();
        let mut seen = [false; 4];
        for (name, value) in params {
            let (slot, ok) = match name.as_str() {
                "server_no_context_takeover" => {
                    p.server_no_context = true;
                    (0, value.is_none())
                }
                "client_no_context_takeover" => {
                    p.client_no_context = true;
                    (1, value.is_none())
                }
                "server_max_window_bits" => {
                    p.server_bits = value.as_deref().and_then(bits);
                    (2, p.server_bits.is_some())
                }
                "client_max_window_bits" => {
                    let v = match value.as_deref() {
                        None => None,
                        Some(v) => Some(bits(v)?),
                    };
                    p.client_bits = Some(v);
                    (3, true)
                }
                _ => return None,
            };
            if !ok || std::mem::replace(&mut seen[slot], true) {
                return None;
            }
        }
        Some(p)
    }
}

/// The server's choice: the first permessage-deflate offer, across every
/// `Sec-WebSocket-Extensions` header in order, that this policy can honour
/// (None: decline, the connection goes on uncompressed). Offers that break
/// the grammar or RFC 7692's rules are skipped, not failed.
pub fn negotiate<'a>(headers: impl Iterator<Item = &'a str>, policy: &Policy) -> Option<Agreed> {
    if policy.mode == Mode::Off {
        return None;
    }
    for value in headers {
        let Some(list) = parse_list(value) else {
            continue;
        };
        for (name, params) in list {
            if name != NAME {
                continue;
            }
            let Some(p) = Params::parse(&params) else {
                continue;
            };
            if let Some(a) = accept(&p, policy) {
                return Some(a);
            }
        }
    }
    None
}

fn accept(p: &Params, policy: &Policy) -> Option<Agreed> {
    match policy.mode {
        Mode::Off => None,
        Mode::Shared => {
            // One 15-bit frame per core for everyone: a client that limits
            // the server's window cannot take it.
            if p.server_bits.is_some_and(|b| b < MAX_BITS) {
                return None;
            }
            Some(Agreed {
                server_no_context: true,
                client_no_context: true,
                server_bits: MAX_BITS,
                client_bits: MAX_BITS,
                answer_client_bits: None,
                answer_server_bits: false,
            })
        }
        Mode::Dedicated => {
            let server_bits = p
                .server_bits
                .unwrap_or(MAX_BITS)
                .min(policy.server_max_window_bits);
            if server_bits < MIN_BITS {
                return None;
            }
            let (client_bits, answer_client_bits) = match p.client_bits {
                // The client did not offer to be limited: it may use 15.
                None => (MAX_BITS, None),
                Some(v) => {
                    let b = v.unwrap_or(MAX_BITS).min(policy.client_max_window_bits);
                    (b.max(MIN_BITS), (b < MAX_BITS).then_some(b))
                }
            };
            Some(Agreed {
                server_no_context: p.server_no_context,
                client_no_context: false,
                server_bits,
                client_bits,
                answer_client_bits,
                answer_server_bits: p.server_bits.is_some() || server_bits < MAX_BITS,
            })
        }
    }
}

/// What a client offers: compression, and (we send uncompressed, so either
/// is kept) no context on our side and any limit on our window.
pub const CLIENT_OFFER: &str =
    "permessage-deflate; client_no_context_takeover; client_max_window_bits";

/// A client's reading of the server's answer to [`CLIENT_OFFER`]: Ok(None)
/// if it declined, the agreement if it accepted, Err (fail the connection,
/// RFC 6455 9.1) if it answered with something never offered or invalid.
pub fn client_accepts<'a>(
    mut headers: impl Iterator<Item = &'a str>,
) -> Result<Option<Agreed>, &'static str> {
    let mut agreed = None;
    for value in &mut headers {
        let list = parse_list(value).ok_or("malformed Sec-WebSocket-Extensions")?;
        for (name, params) in list {
            if name != NAME {
                return Err("an extension that was not offered");
            }
            if agreed.is_some() {
                return Err("permessage-deflate accepted twice");
            }
            let p = Params::parse(&params).ok_or("invalid permessage-deflate parameters")?;
            agreed = Some(Agreed {
                server_no_context: p.server_no_context,
                client_no_context: p.client_no_context,
                // zlib inflates an 8-bit window's data with a 9-bit window.
                server_bits: p.server_bits.unwrap_or(MAX_BITS).max(MIN_BITS),
                client_bits: p.client_bits.flatten().unwrap_or(MAX_BITS),
                answer_client_bits: None,
                answer_server_bits: false,
            });
        }
    }
    Ok(agreed)
}

/// Why an inflate stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// The output passed the cap (1009).
    TooBig,
    /// Not a deflate stream (1007).
    Corrupt,
}

/// Deflates whole messages with one context.
pub struct Deflater {
    c: Compress,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deflater")
    }
}

impl Deflater {
    /// A raw deflate context at `level` (0..=9) with a `2^bits` window.
    pub fn new(level: u32, bits: u8) -> Deflater {
        Deflater {
            c: Compress::new_with_window_bits(
                Compression::new(level.min(9)),
                false,
                bits.clamp(MIN_BITS, MAX_BITS),
            ),
        }
    }

    /// Appends `input` as one compressed message (sync-flushed, its 4-byte
    /// tail removed). `fresh` forgets earlier messages first (no context
    /// takeover). False if zlib failed; `out` is then as it was.
    pub fn message(&mut self, input: &[u8], out: &mut Vec<u8>, fresh: bool) -> bool {
        if input.is_empty() {
            // An empty stored block (RFC 7692 7.2.3.6): zlib would emit
            // nothing for a flush with nothing new.
            out.push(0x00);
            return true;
        }
        if fresh {
            self.c.reset();
        }
        let start = out.len();
        let in0 = self.c.total_in();
        loop {
            let used = (self.c.total_in() - in0) as usize;
            // Room for incompressible input plus block overhead.
            out.reserve((input.len() - used) + (input.len() - used) / 64 + 64);
            if self
                .c
                .compress_vec(&input[used..], out, FlushCompress::Sync)
                .is_err()
            {
                out.truncate(start);
                return false;
            }
            let done = (self.c.total_in() - in0) as usize == input.len();
            // A flush that did not fill the buffer is complete.
            if done && out.len() < out.capacity() {
                break;
            }
        }
        if out.len() < start + TAIL.len() || out[out.len() - 4..] != TAIL {
            out.truncate(start);
            return false;
        }
        out.truncate(out.len() - TAIL.len());
        true
    }
}

/// Inflates whole messages with one context.
pub struct Inflater {
    d: Decompress,
    /// The sender ended a stream (a final block): start over next time.
    ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

/// Output grows by at most this much per step, so a cap check happens at
/// least this often.
const STEP: usize = 256 * 1024;

impl Inflater {
    /// A raw inflate context with a `2^bits` window.
    pub fn new(bits: u8) -> Inflater {
        Inflater {
            d: Decompress::new_with_window_bits(false, bits.clamp(MIN_BITS, MAX_BITS)),
            ended: false,
        }
    }

    /// Appends the message compressed in `input` (tail stripped) to `out`,
    /// at most `max` bytes of it. `fresh` forgets earlier messages first
    /// (the sender uses no context takeover).
    pub fn message(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
        fresh: bool,
    ) -> Result<(), InflateError> {
        if fresh || std::mem::take(&mut self.ended) {
            self.d.reset(false);
        }
        let start = out.len();
        // Output goes into a window of the buffer no larger than what the
        // cap still allows, so the inflated bytes never pass max + 1 (the
        // one byte that proves "too big"); the window grows as it fills.
        let mut step = (input.len() * 4).clamp(4096, STEP);
        for part in [input, &TAIL[..]] {
            let in0 = self.d.total_in();
            loop {
                let used = (self.d.total_in() - in0) as usize;
                let produced = out.len() - start;
                let room = (max + 1 - produced).min(step);
                let len0 = out.len();
                if out.capacity() < len0 + room {
                    out.reserve_exact(room);
                }
                out.resize(len0 + room, 0);
                let out0 = self.d.total_out();
                let status =
                    self.d
                        .decompress(&part[used..], &mut out[len0..], FlushDecompress::Sync);
                let wrote = (self.d.total_out() - out0) as usize;
                out.truncate(len0 + wrote);
                let status = status.map_err(|_| InflateError::Corrupt)?;
                if out.len() - start > max {
                    return Err(InflateError::TooBig);
                }
                let now_used = (self.d.total_in() - in0) as usize;
                if status == Status::StreamEnd {
                    // A final block: what follows it is not ours to read.
                    self.ended = true;
                    return Ok(());
                }
                if now_used == part.len() && wrote < room {
                    break;
                }
                if now_used == used && wrote == 0 {
                    // No progress with room to spare: zlib needs input
                    // that is not there (a truncated message).
                    break;
                }
                step = (step * 2).min(STEP);
            }
        }
        Ok(())
    }
}

/// One core's shared contexts: deflate without context takeover (one frame
/// per core for every subscriber), inflate for clients that agreed to no
/// context takeover, and the buffer inflated messages land in. Made on
/// first use, so a core that never compresses holds none of it.
#[derive(Debug, Default)]
pub struct CoreCodec {
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
    /// Reused output buffer (taken while a message is being handled).
    pub buf: Vec<u8>,
    /// Compression level for everything this core compresses.
    pub level: u32,
}

impl CoreCodec {
    /// A codec compressing at `level`.
    pub fn new(level: u32) -> CoreCodec {
        CoreCodec {
            level,
            ..CoreCodec::default()
        }
    }

    /// The shared deflater (15-bit window; reset per message).
    pub fn deflater(&mut self) -> &mut Deflater {
        let level = self.level;
        self.deflater
            .get_or_insert_with(|| Deflater::new(level, MAX_BITS))
    }

    /// The shared inflater (15-bit window; reset per message).
    pub fn inflater(&mut self) -> &mut Inflater {
        self.inflater.get_or_insert_with(|| Inflater::new(MAX_BITS))
    }

    /// Takes the output buffer (empty) for one message.
    pub fn take_buf(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        b
    }

    /// Gives the buffer back; a large one is dropped so one big message
    /// does not pin its memory.
    pub fn put_buf(&mut self, b: Vec<u8>) {
        if b.capacity() <= 256 * 1024 {
            self.buf = b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode) -> Policy {
        Policy {
            mode,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }

    fn neg(h: &str, p: &Policy) -> Option<String> {
        negotiate([h].into_iter(), p).map(|a| a.answer())
    }

    #[test]
    fn grammar() {
        let l = parse_list(
            "permessage-deflate; client_max_window_bits=\"10\" ; server_no_context_takeover, x-foo",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0].1[0],
            ("client_max_window_bits".into(), Some("10".into()))
        );
        assert_eq!(l[1].0, "x-foo");
        for bad in ["", "a;", "a,", "a b", "a; b=\"x", "a; =1", ";a"] {
            assert!(parse_list(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn shared_answers_without_context_takeover_either_way() {
        let p = policy(Mode::Shared);
        let want = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(neg("permessage-deflate", &p).as_deref(), Some(want));
        assert_eq!(
            neg("permessage-deflate; client_max_window_bits", &p).as_deref(),
            Some(want)
        );
        // A limit on the server's window cannot be kept by a shared frame:
        // that offer is declined, the next one taken.
        assert_eq!(
            neg(
                "permessage-deflate; server_max_window_bits=10, permessage-deflate",
                &p
            )
            .as_deref(),
            Some(want)
        );
        assert_eq!(
            neg("permessage-deflate; server_max_window_bits=10", &p),
            None
        );
        assert_eq!(neg("permessage-deflate", &policy(Mode::Off)), None);
    }

    #[test]
    fn dedicated_honours_the_offer_and_its_own_limits() {
        let mut p = policy(Mode::Dedicated);
        assert_eq!(
            neg("permessage-deflate", &p).as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            neg(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=9",
                &p
            )
            .as_deref(),
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=9")
        );
        // 8 cannot be deflated by zlib: declined.
        assert_eq!(
            neg("permessage-deflate; server_max_window_bits=8", &p),
            None
        );
        p.server_max_window_bits = 10;
        p.client_max_window_bits = 11;
        let a = negotiate(
            ["permessage-deflate; client_max_window_bits"].into_iter(),
            &p,
        )
        .unwrap();
        assert_eq!((a.server_bits, a.client_bits), (10, 11));
        assert_eq!(
            a.answer(),
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11"
        );
        // The client did not offer to be limited: it may use 15.
        let a = negotiate(["permessage-deflate"].into_iter(), &p).unwrap();
        assert_eq!(a.client_bits, 15);
        // client 8 is fine: a 9-bit inflate reads it.
        let a = negotiate(
            ["permessage-deflate; client_max_window_bits=8"].into_iter(),
            &p,
        )
        .unwrap();
        assert_eq!(a.client_bits, 9);
        assert!(a.answer().ends_with("client_max_window_bits=8"));
    }

    #[test]
    fn bad_offers_are_declined_not_failed() {
        let p = policy(Mode::Dedicated);
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; x=1",
            "permessage-deflate;;",
        ] {
            assert_eq!(neg(bad, &p), None, "{bad}");
        }
        // Several headers: the first acceptable offer in any of them.
        let a = negotiate(
            ["x-other", "permessage-deflate; x=1, permessage-deflate"].into_iter(),
            &p,
        );
        assert!(a.is_some());
    }

    #[test]
    fn the_client_checks_the_answer() {
        assert_eq!(client_accepts(std::iter::empty()), Ok(None));
        let a = client_accepts(["permessage-deflate; server_no_context_takeover"].into_iter())
            .unwrap()
            .unwrap();
        assert!(a.server_no_context);
        assert!(client_accepts(["x-other"].into_iter()).is_err());
        assert!(client_accepts(["permessage-deflate; nope"].into_iter()).is_err());
        assert!(client_accepts(["permessage-deflate", "permessage-deflate"].into_iter()).is_err());
    }

    #[test]
    fn round_trips_with_and_without_context() {
        let msgs: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("{{\"seq\":{i},\"data\":\"{}\"}}", "abc".repeat(i * 50)).into_bytes())
            .chain([Vec::new(), vec![0u8; 100_000]])
            .collect();
        for fresh in [true, false] {
            let (mut d, mut i) = (Deflater::new(6, 15), Inflater::new(15));
            for m in &msgs {
                let mut c = Vec::new();
                assert!(d.message(m, &mut c, fresh));
                let mut out = Vec::new();
                i.message(&c, &mut out, 1 << 20, fresh).unwrap();
                assert_eq!(&out, m);
            }
        }
        // Empty message: a single 0x00 (RFC 7692 7.2.3.6).
        let mut c = Vec::new();
        Deflater::new(6, 15).message(b"", &mut c, true);
        assert_eq!(c, [0x00]);
    }

    #[test]
    fn a_bomb_stops_at_the_cap() {
        let mut c = Vec::new();
        assert!(Deflater::new(1, 15).message(&vec![0u8; 8 << 20], &mut c, true));
        assert!(c.len() < 128 * 1024, "{}", c.len());
        let mut out = Vec::new();
        let r = Inflater::new(15).message(&c, &mut out, 1 << 20, true);
        assert_eq!(r, Err(InflateError::TooBig));
        assert!(
            out.capacity() <= (1 << 20) + STEP + 64,
            "{}",
            out.capacity()
        );
        let r = Inflater::new(15).message(b"\xff\xff\xff", &mut Vec::new(), 1 << 20, true);
        assert_eq!(r, Err(InflateError::Corrupt));
    }
}

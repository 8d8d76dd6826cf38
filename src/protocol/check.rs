//! Invariant checks for every decoder, one function per fuzz target
//! (tools/fuzz) and per corpus file (tests/corpus.rs): each feeds its input
//! whole and split at every byte boundary and panics if
//! - the events (frames, messages, drops, the error) differ with the split;
//! - a length leaves its bound;
//! - re-encoding what was decoded does not decode to the same thing.
//!
//! Inputs past [`MAX_SPLIT_INPUT`] bytes are split-checked on their prefix
//! only, so one input costs O(n^2) at worst on a small n.

use super::{amqp, deflate, http, lenprefix, rely, resp, veltix, ws};

/// Longest prefix whose every split is checked.
pub const MAX_SPLIT_INPUT: usize = 2048;

/// Limits the checks decode with (small, so limits are exercised).
const MAX_PAYLOAD: u32 = 1024;

fn splits(data: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let d = &data[..data.len().min(MAX_SPLIT_INPUT)];
    (0..=d.len()).map(move |i| (&d[..i], &d[i..]))
}

fn prefix(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_SPLIT_INPUT)]
}

#[derive(Debug, PartialEq, Eq)]
enum RelyEv {
    Login(Vec<u8>),
    Transfer(Vec<u8>, Vec<u8>, Vec<u8>),
}

fn rely_events(chunks: &[&[u8]]) -> (Vec<RelyEv>, Option<rely::RelyError>) {
    let mut d = rely::Decoder::new();
    let mut out = Vec::new();
    for c in chunks {
        let r = d.feed(c, MAX_PAYLOAD, |f| {
            out.push(match f {
                rely::Frame::Login { id } => RelyEv::Login(id.to_vec()),
                rely::Frame::Transfer {
                    from, to, payload, ..
                } => {
                    assert!(
                        payload.len() <= MAX_PAYLOAD as usize,
                        "payload over the limit"
                    );
                    RelyEv::Transfer(from.to_vec(), to.to_vec(), payload.to_vec())
                }
            });
            true
        });
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    (out, None)
}

/// RELY frames.
pub fn rely(data: &[u8]) {
    let whole = rely_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(rely_events(&[a, b]), whole, "split at {}", a.len());
    }
    let mut again = Vec::new();
    for ev in &whole.0 {
        match ev {
            RelyEv::Login(id) => rely::encode_login(&mut again, id),
            RelyEv::Transfer(f, t, p) => rely::encode_transfer(&mut again, f, t, p),
        }
    }
    assert_eq!(rely_events(&[&again]), (whole.0, None), "round trip");
}

#[derive(Debug, PartialEq, Eq)]
enum WsEv {
    Message(bool, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, Vec<u8>),
}

fn ws_events(mut d: ws::Decoder, chunks: &[&[u8]]) -> (Vec<WsEv>, Option<ws::WsError>) {
    let mut out = Vec::new();
    for c in chunks {
        let mut buf = c.to_vec();
        let r = d.feed(&mut buf, |e| {
            out.push(match e {
                ws::Event::Message { text, data, .. } => {
                    assert!(data.len() <= MAX_PAYLOAD as usize, "message over the limit");
                    if text {
                        assert!(std::str::from_utf8(data).is_ok(), "text is UTF-8");
                    }
                    WsEv::Message(text, data.to_vec())
                }
                ws::Event::Ping(p) => WsEv::Ping(p.to_vec()),
                ws::Event::Pong(p) => WsEv::Pong(p.to_vec()),
                ws::Event::Close { code, reason } => WsEv::Close(code, reason.to_vec()),
            });
            true
        });
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    (out, None)
}

fn ws_check(data: &[u8], make: fn() -> ws::Decoder, client: bool) {
    let whole = ws_events(make(), &[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(ws_events(make(), &[a, b]), whole, "split at {}", a.len());
    }
    // Messages re-encoded as the peer would send them decode the same.
    let mut again = Vec::new();
    let mut want = Vec::new();
    for ev in whole.0 {
        if let WsEv::Message(text, data) = &ev {
            let op = if *text { ws::OP_TEXT } else { ws::OP_BINARY };
            if client {
                ws::encode_frame(&mut again, op, data);
            } else {
                ws::encode_masked(&mut again, op, data, [7, 1, 2, 9]);
            }
            want.push(ev);
        }
    }
    assert_eq!(ws_events(make(), &[&again]), (want, None), "round trip");
}

/// WebSocket frames from a client (what the server reads).
pub fn ws_server(data: &[u8]) {
    ws_check(data, || ws::Decoder::new(MAX_PAYLOAD as usize), false);
}

/// WebSocket frames from a server (what the upstream client reads).
pub fn ws_client(data: &[u8]) {
    ws_check(data, || ws::Decoder::client(MAX_PAYLOAD as usize), true);
}

/// What a compressed client stream decodes and inflates to: per message,
/// its kind and bytes, or why it stopped.
type Inflated = (
    Vec<(bool, Result<Vec<u8>, deflate::InflateError>)>,
    Option<ws::WsError>,
);

fn inflate_events(chunks: &[&[u8]], fresh: bool, bits: u8) -> Inflated {
    let mut d = ws::Decoder::new(MAX_PAYLOAD as usize);
    d.allow_compressed();
    let mut inflater = deflate::Inflater::new(bits);
    let mut out = Vec::new();
    // A failed inflate closes the connection: nothing after it is read.
    let mut stopped = false;
    for c in chunks {
        if stopped {
            break;
        }
        let mut buf = c.to_vec();
        let r = d.feed(&mut buf, |e| {
            if let ws::Event::Message {
                text,
                data,
                compressed: true,
            } = e
            {
                let mut m = Vec::new();
                let r = inflater.message(data, &mut m, MAX_PAYLOAD as usize, fresh);
                assert!(m.len() <= MAX_PAYLOAD as usize + 1, "inflated past the cap");
                stopped = r.is_err();
                out.push((text, r.map(|()| m)));
                return !stopped;
            }
            true
        });
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    (out, None)
}

/// permessage-deflate from a client (what the server inflates): the first
/// byte picks context takeover and the window, the rest is frames. The
/// output never passes the cap, the result does not depend on how the
/// input was split, and what inflates deflates and inflates back to itself.
pub fn ws_inflate(data: &[u8]) {
    let Some((&flags, frames)) = data.split_first() else {
        return;
    };
    let fresh = flags & 1 == 1;
    let bits = deflate::MIN_BITS + (flags >> 1) % 7;
    let whole = inflate_events(&[prefix(frames)], fresh, bits);
    for (a, b) in splits(frames) {
        assert_eq!(
            inflate_events(&[a, b], fresh, bits),
            whole,
            "split at {}",
            a.len()
        );
    }
    let mut z = deflate::Deflater::new(6, deflate::MAX_BITS);
    for (_, r) in &whole.0 {
        if let Ok(m) = r {
            let mut c = Vec::new();
            assert!(z.message(m, &mut c, true), "deflates");
            let mut back = Vec::new();
            deflate::Inflater::new(deflate::MAX_BITS)
                .message(&c, &mut back, m.len(), true)
                .expect("inflates back");
            assert_eq!(&back, m, "round trip");
        }
    }
}

/// An HTTP request head: never a panic; a complete head is found only once
/// all of it is there, and its length stays within the input.
pub fn http(data: &[u8]) {
    let whole = http::parse_request(prefix(data));
    if let Ok(Some(r)) = &whole {
        assert!(r.head_len <= data.len());
        for i in 0..r.head_len {
            assert!(
                !matches!(http::parse_request(&data[..i]), Ok(Some(_))),
                "complete at {i} before {}",
                r.head_len
            );
        }
        let _ = r.websocket_key();
    }
}

fn lenprefix_events(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<lenprefix::TooBig>) {
    let mut d = lenprefix::Decoder::default();
    let mut out = Vec::new();
    for c in chunks {
        let r = d.feed(c, MAX_PAYLOAD, |m| {
            assert!(m.len() <= MAX_PAYLOAD as usize);
            out.push(m.to_vec());
            true
        });
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    (out, None)
}

/// Unix-socket length-prefixed messages.
pub fn lenprefix(data: &[u8]) {
    let whole = lenprefix_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(lenprefix_events(&[a, b]), whole, "split at {}", a.len());
    }
    let mut again = Vec::new();
    for m in &whole.0 {
        lenprefix::encode(&mut again, m);
    }
    assert_eq!(lenprefix_events(&[&again]), (whole.0, None), "round trip");
}

/// The YAML config: an error or a config, never a panic; an error names
/// what is wrong.
pub fn config_yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = crate::Config::from_yaml(&text, None) {
        assert!(!e.to_string().is_empty());
    }
}

#[derive(Debug, PartialEq, Eq)]
enum V3Ev {
    Frame(u8, u16, u16, Vec<u8>),
    Corrupt(veltix::v3::Corrupt),
}

fn v3_events(chunks: &[&[u8]]) -> Vec<V3Ev> {
    let mut d = veltix::v3::Decoder::default();
    let mut out = Vec::new();
    for c in chunks {
        d.feed(c, MAX_PAYLOAD as usize, |e| {
            out.push(match e {
                veltix::v3::Event::Frame(f) => {
                    assert!(f.content.len() + veltix::v3::HEADER <= MAX_PAYLOAD as usize);
                    V3Ev::Frame(f.flags, f.ty, f.request_id, f.content.to_vec())
                }
                veltix::v3::Event::Corrupt(c) => V3Ev::Corrupt(c),
            });
            true
        });
    }
    out
}

/// Veltix v3 frames (and the handshake decoder on the same bytes).
pub fn veltix_v3(data: &[u8]) {
    let whole = v3_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(v3_events(&[a, b]), whole, "split at {}", a.len());
    }
    let mut again = Vec::new();
    let mut want = Vec::new();
    for ev in whole {
        if let V3Ev::Frame(flags, ty, id, content) = &ev {
            veltix::v3::encode(&mut again, *flags, *ty, *id, content);
            want.push(ev);
        }
    }
    assert_eq!(v3_events(&[&again]), want, "round trip");
    let mut h = veltix::v3::HandshakeDecoder::default();
    if let Ok(Some((m, used))) = h.feed(prefix(data)) {
        assert!(m.len() <= veltix::v3::MAX_HANDSHAKE && used <= data.len());
        let _ = veltix::v3::compatible(&m);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum V1Ev {
    Frame(u16, u64, Vec<u8>),
    BadHash,
}

fn v1_events(chunks: &[&[u8]]) -> (Vec<V1Ev>, Option<veltix::v1::TooLarge>) {
    let mut d = veltix::v1::Decoder::default();
    let mut out = Vec::new();
    for c in chunks {
        let r = d.feed(c, MAX_PAYLOAD as usize, |e| {
            out.push(match e {
                veltix::v1::Event::Frame(f) => {
                    V1Ev::Frame(f.ty, f.timestamp_ms, f.content.to_vec())
                }
                veltix::v1::Event::BadHash => V1Ev::BadHash,
            });
            true
        });
        if let Err(e) = r {
            return (out, Some(e));
        }
    }
    (out, None)
}

/// Veltix v1 frames.
pub fn veltix_v1(data: &[u8]) {
    let whole = v1_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(v1_events(&[a, b]), whole, "split at {}", a.len());
    }
    let mut again = Vec::new();
    let mut want = Vec::new();
    for ev in whole.0 {
        if let V1Ev::Frame(ty, ts, content) = &ev {
            veltix::v1::encode(&mut again, *ty, content, *ts);
            want.push(ev);
        }
    }
    assert_eq!(v1_events(&[&again]), (want, None), "round trip");
}

/// Replies taken from a buffer as its bytes arrive in `chunks`.
fn resp_events(chunks: &[&[u8]]) -> (Vec<String>, Option<resp::RespError>) {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match resp::decode(&buf, MAX_PAYLOAD as usize) {
                Ok(Some((v, n))) => {
                    assert!(n <= MAX_PAYLOAD as usize, "reply over the cap");
                    out.push(format!("{v:?}"));
                    buf.drain(..n);
                }
                // What the Redis client does with a buffer that holds no
                // whole reply within the cap.
                Ok(None) if buf.len() > MAX_PAYLOAD as usize => {
                    return (out, Some(resp::RespError::TooLarge))
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// Redis replies (RESP2).
pub fn resp(data: &[u8]) {
    let whole = resp_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(resp_events(&[a, b]), whole, "split at {}", a.len());
    }
}

/// The bound the AMQP check decodes with.
const AMQP_FRAME_MAX: u32 = 4096;

fn amqp_events(chunks: &[&[u8]]) -> (Vec<String>, Option<&'static str>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match amqp::next_frame(&buf, AMQP_FRAME_MAX) {
                amqp::Next::Frame(f, used) => {
                    assert!(used <= buf.len() && used > 0);
                    assert!(
                        used <= AMQP_FRAME_MAX as usize + 8,
                        "a frame over the bound"
                    );
                    // Written back by the codec, it reads the same.
                    let mut again = Vec::new();
                    if amqp::put(&mut again, &mut scratch, &f).is_ok() {
                        match amqp::next_frame(&again, u32::MAX) {
                            amqp::Next::Frame(g, n) => {
                                assert_eq!(format!("{g:?}"), format!("{f:?}"), "round trip");
                                assert_eq!(n, again.len());
                            }
                            other => panic!("re-encoded frame reads as {other:?}"),
                        }
                    }
                    out.push(format!("{f:?}"));
                    buf.drain(..used);
                }
                amqp::Next::Need => break,
                amqp::Next::TooLarge => return (out, Some("too large")),
                amqp::Next::Bad(_) => return (out, Some("bad")),
            }
        }
    }
    (out, None)
}

/// AMQP 0-9-1 frames (the events publisher's reads) and body frames.
pub fn amqp(data: &[u8]) {
    let whole = amqp_events(&[prefix(data)]);
    for (a, b) in splits(data) {
        assert_eq!(amqp_events(&[a, b]), whole, "split at {}", a.len());
    }
    // A body written by hand reads back as body frames holding it.
    let body = prefix(data);
    let mut out = Vec::new();
    amqp::put_body(&mut out, 1, body, 64);
    let mut back = Vec::new();
    let mut rest = out.as_slice();
    while !rest.is_empty() {
        match amqp::next_frame(rest, 64) {
            amqp::Next::Frame(amq_protocol::frame::AMQPFrame::Body(1, b), n) => {
                back.extend_from_slice(&b);
                rest = &rest[n..];
            }
            other => panic!("a body frame reads as {other:?}"),
        }
    }
    assert_eq!(back, body);
}

/// One check: panics if `data` breaks an invariant.
pub type Check = fn(&[u8]);

/// Every check by its fuzz target's name.
pub const TARGETS: [(&str, Check); 11] = [
    ("amqp", amqp),
    ("rely", rely),
    ("ws_server", ws_server),
    ("ws_client", ws_client),
    ("http", http),
    ("lenprefix", lenprefix),
    ("config_yaml", config_yaml),
    ("veltix_v1", veltix_v1),
    ("veltix_v3", veltix_v3),
    ("resp", resp),
    ("ws_inflate", ws_inflate),
];

/// A broker's side of a handshake and a confirm, as bytes (a seed for
/// the AMQP check and its corpus).
pub fn amqp_seed() -> Vec<u8> {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{basic, connection, AMQPClass};
    let mut out = Vec::new();
    let mut s = Vec::new();
    let frames = [
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: 2047,
                frame_max: 131072,
                heartbeat: 60,
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 7,
                multiple: true,
            })),
        ),
        AMQPFrame::Heartbeat(0),
    ];
    for f in &frames {
        let _ = amqp::put(&mut out, &mut s, f);
    }
    amqp::put_body(&mut out, 1, b"{\"action\":\"open\"}", 4096);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap stand-in for the fuzzers in the normal test run: mutated
    /// valid inputs (bit flips, cuts, splices) through every check.
    #[test]
    fn mutated_inputs_hold_the_invariants() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut v = Vec::new();
        rely::encode_login(&mut v, b"alice");
        rely::encode_transfer(&mut v, b"alice", b"bob", b"hello");
        seeds.push(v);
        let mut v = Vec::new();
        ws::encode_masked(&mut v, ws::OP_TEXT, "héllo".as_bytes(), [1, 2, 3, 4]);
        ws::encode_masked(&mut v, ws::OP_PING, b"p", [5, 6, 7, 8]);
        seeds.push(v);
        let mut v = Vec::new();
        ws::encode_frame(&mut v, ws::OP_BINARY, b"\x00\x01");
        ws::encode_close(&mut v, 1000, "bye");
        seeds.push(v);
        let mut v = Vec::new();
        lenprefix::encode(&mut v, b"hi");
        seeds.push(v);
        let mut v = Vec::new();
        veltix::v3::encode(&mut v, 0, 200, 7, b"hello");
        veltix::v3::encode(&mut v, 0, veltix::v3::PING, 8, b"");
        seeds.push(v);
        let mut v = Vec::new();
        veltix::v1::encode(&mut v, 200, b"hello", 1);
        seeds.push(v);
        seeds.push(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_vec());
        seeds.push(b"workers: 2\nrely:\n  listen: [\"127.0.0.1:0\"]\n".to_vec());
        seeds.push(amqp_seed());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..400 {
            let mut input = seeds[rnd() as usize % seeds.len()].clone();
            match round % 4 {
                0 if !input.is_empty() => {
                    let i = rnd() as usize % input.len();
                    input[i] ^= 1 << (rnd() % 8);
                }
                1 => input.truncate(rnd() as usize % (input.len() + 1)),
                2 => {
                    let other = &seeds[rnd() as usize % seeds.len()];
                    input.extend_from_slice(other);
                }
                _ => input.insert(rnd() as usize % (input.len() + 1), rnd() as u8),
            }
            for (_, check) in TARGETS {
                check(&input);
            }
        }
    }
}

//! AMQP 0-9-1 frames as the events publisher reads and writes them:
//! amq-protocol's parser behind the bound corerelay sets (a frame is at
//! most the negotiated `frame_max`), its writer into a reused buffer, and
//! the one frame written by hand, a content body.

use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame};

/// Framing around a frame's payload: type, channel, size, and 0xCE.
pub const FRAME_OVERHEAD: usize = 8;

/// What the start of a buffer holds.
#[derive(Debug)]
pub enum Next {
    /// A frame, and the bytes it took.
    Frame(AMQPFrame, usize),
    /// Not a whole frame yet.
    Need,
    /// More than `frame_max` buffered and still no whole frame.
    TooLarge,
    /// Not AMQP.
    Bad(String),
}

/// The first frame of `buf` (the 8-byte protocol header counts as one).
pub fn next_frame(buf: &[u8], frame_max: u32) -> Next {
    if buf.is_empty() {
        return Next::Need;
    }
    // The type byte first, so that a bad one reads the same however
    // many bytes follow it.
    if !matches!(buf[0], 1 | 2 | 3 | 8 | b'A') {
        return Next::Bad(format!("frame type {}", buf[0]));
    }
    // A size field over the bound is refused as soon as it is read,
    // before its bytes arrive: nothing buffers more than frame_max.
    if buf.len() >= 7 && buf[0] != b'A' {
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
        if size as usize + FRAME_OVERHEAD > frame_max as usize {
            return Next::TooLarge;
        }
    }
    match parse_frame(buf) {
        Ok((rest, f)) => Next::Frame(f, buf.len() - rest.len()),
        Err(e) if e.is_incomplete() => Next::Need,
        Err(e) => Next::Bad(e.to_string()),
    }
}

/// Appends one frame through the codec (`scratch` is its reused buffer).
pub fn put(out: &mut Vec<u8>, scratch: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), String> {
    let mut buf = std::mem::take(scratch);
    buf.clear();
    match cookie_factory::gen_simple(gen_frame(frame), buf) {
        Ok(b) => {
            out.extend_from_slice(&b);
            *scratch = b;
            Ok(())
        }
        Err(e) => Err(format!("cannot encode a frame: {e:?}")),
    }
}

/// Appends `body` as content body frames of at most `frame_max` bytes on
/// `channel`: written by hand, so the body is copied once, into `out`.
pub fn put_body(out: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: u32) {
    let chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for part in body.chunks(chunk) {
        out.push(3);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
        out.push(0xCE);
    }
}

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

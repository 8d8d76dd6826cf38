//! The RELY adapter: decoded frames in, routing actions out. It touches only
//! the connection being read and the [`Ctx`], never another connection.

use super::conn::{CloseReason, Conn, Login, Proto};
use super::route::Ctx;
use super::ConnId;
use crate::protocol::rely::Frame;

/// Feeds bytes read from `conn` (slab key `slot`). Returns a close reason if
/// the connection must close.
pub fn on_bytes(
    conn: &mut Conn,
    slot: usize,
    input: &[u8],
    cx: &mut Ctx<'_>,
) -> Option<CloseReason> {
    let me = ConnId {
        core: cx.core,
        slot: slot as u32,
        gen: conn.gen,
    };
    let Conn {
        proto,
        login,
        last_active,
        peer,
        ..
    } = conn;
    let Proto::Rely(state) = proto else {
        debug_assert!(false, "RELY bytes for a non-RELY connection");
        return Some(CloseReason::Protocol);
    };
    let rely = &cx.cfg.rely;
    let (max_payload, check_from) = (rely.max_payload, rely.check_from);
    let mut close = None;
    let res = state.decoder.feed(input, max_payload, |frame| {
        cx.metrics.frames_in.inc();
        *last_active = cx.now;
        match frame {
            Frame::Login { id } => {
                if let Some(old) = login.take() {
                    if *old.id != *id {
                        cx.dir.logout(&old.id, old.epoch);
                    }
                }
                let epoch = cx.login(id, me);
                log::debug!("{peer}: login {:?}", String::from_utf8_lossy(id));
                *login = Some(Login {
                    id: id.into(),
                    epoch,
                });
                true
            }
            Frame::Transfer { from, to, raw, .. } => {
                let Some(l) = login.as_ref() else {
                    close = Some(CloseReason::NotLoggedIn);
                    return false;
                };
                if check_from && *l.id != *from {
                    close = Some(CloseReason::Spoofed);
                    return false;
                }
                if to.is_empty() {
                    cx.metrics.heartbeats.inc();
                } else if !cx.send_to_id(to, &[raw]) {
                    cx.metrics.dropped_offline.inc();
                }
                true
            }
        }
    });
    match res {
        Err(e) => {
            log::debug!("{peer}: RELY protocol error: {e}");
            Some(CloseReason::Protocol)
        }
        Ok(()) => close,
    }
}

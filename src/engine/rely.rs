//! The RELY adapter: decoded frames in, routing actions out. It touches only
//! the connection being read and the core's action lists, never another
//! connection's state, so the core applies local deliveries after the read.

use super::conn::{CloseReason, Conn, Login};
use super::directory::{Directory, LookupCache};
use super::mesh::Outgoing;
use super::metrics::CoreMetrics;
use super::ConnId;
use crate::config::RelyConfig;
use crate::protocol::rely::Frame;

/// What reading produced that the core must apply, after the reads.
#[derive(Debug, Default)]
pub struct Actions {
    /// Bytes of local deliveries, back to back (one buffer per iteration).
    pub data: Vec<u8>,
    /// Deliveries to connections on this core, in order: (to, start, len).
    pub local: Vec<(ConnId, u32, u32)>,
    /// Local connections replaced by a newer login.
    pub kicks: Vec<ConnId>,
}

impl Actions {
    /// Adds a local delivery.
    #[inline]
    pub fn deliver(&mut self, to: ConnId, bytes: &[u8]) {
        let start = self.data.len() as u32;
        self.data.extend_from_slice(bytes);
        self.local.push((to, start, bytes.len() as u32));
    }
}

/// Everything the adapter may touch besides the connection.
pub struct Ctx<'a> {
    /// This core's index.
    pub core: u16,
    /// The directory.
    pub dir: &'a Directory,
    /// This core's lookup cache.
    pub cache: &'a mut LookupCache,
    /// RELY settings.
    pub cfg: &'a RelyConfig,
    /// This core's counters.
    pub metrics: &'a CoreMetrics,
    /// Cross-core batches.
    pub mesh: &'a mut Outgoing,
    /// Local actions.
    pub actions: &'a mut Actions,
    /// Current tick.
    pub now: u64,
}

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
        decoder,
        login,
        last_active,
        peer,
        ..
    } = conn;
    let mut close = None;
    let res = decoder.feed(input, cx.cfg.max_payload, |frame| {
        cx.metrics.frames_in.inc();
        *last_active = cx.now;
        match frame {
            Frame::Login { id } => {
                if let Some(old) = login.take() {
                    if *old.id != *id {
                        cx.dir.logout(&old.id, old.epoch);
                    }
                }
                let (epoch, replaced) = cx.dir.login(id, me);
                if let Some(old) = replaced {
                    if old.core == cx.core {
                        cx.actions.kicks.push(old);
                    } else {
                        cx.mesh.kick(old.core as usize, old);
                    }
                }
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
                if cx.cfg.check_from && *l.id != *from {
                    close = Some(CloseReason::Spoofed);
                    return false;
                }
                if to.is_empty() {
                    cx.metrics.heartbeats.inc();
                    return true;
                }
                match cx.cache.lookup(cx.dir, to) {
                    None => cx.metrics.dropped_offline.inc(),
                    Some(dst) if dst.core == cx.core => cx.actions.deliver(dst, raw),
                    Some(dst) => {
                        cx.metrics.cross_core.inc();
                        cx.mesh.deliver(dst.core as usize, dst, raw);
                    }
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

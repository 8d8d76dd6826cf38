//! The RELY stage (relayd's clients), and [`relay_transfer`]: the one RELY
//! routing rule, which WebSocket endpoints in `rely` mode use too.
//!
//! Frames are decoded in place from the core's scratch buffer; a transfer is
//! forwarded byte for byte to the id's holder wherever it lives; a
//! heartbeat (empty ToClientID) only refreshes the idle time. A transfer
//! before login, a spoofed FromClientID (with `check_from`), or a malformed
//! frame closes the connection and is counted.

use super::Outcome;
use crate::config::Config;
use crate::engine::io::{CloseReason, Io, Limits, Login};
use crate::engine::route::Ctx;
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::rely::{Decoder, Frame};

/// A RELY client: only its partial frame.
#[derive(Debug, Default)]
pub(crate) struct RelyStage {
    decoder: Decoder,
}

/// Routes one RELY transfer frame `raw` from a connection holding `login`:
/// the rule shared by RELY clients and WebSocket `rely` mode. Errors are
/// counted here and name the close.
pub(crate) fn relay_transfer(
    cx: &mut Ctx<'_>,
    login: Option<&Login>,
    from: &[u8],
    to: &[u8],
    raw: &[u8],
) -> Result<(), CloseReason> {
    let Some(l) = login else {
        cx.metrics().not_logged_in.inc();
        return Err(CloseReason::NotLoggedIn);
    };
    if cx.cfg().rely.check_from && l.id() != from {
        cx.metrics().spoofed_from.inc();
        return Err(CloseReason::Spoofed);
    }
    if to.is_empty() {
        cx.metrics().heartbeats.inc();
    } else if !cx.send_to_id(to, &[raw]) {
        cx.metrics().dropped_offline.inc();
    }
    Ok(())
}

impl RelyStage {
    pub(crate) fn accepted(cfg: &Config) -> (super::Stage, Limits) {
        let limits = Limits {
            bytes: cfg.rely.max_output_bytes,
            msgs: u32::MAX,
            policy: cfg.rely.slow_consumer,
        };
        (super::Stage::Rely(RelyStage::default()), limits)
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let max_payload = cx.cfg().rely.max_payload;
        let mut close = None;
        let res = self.decoder.feed(input, max_payload, |frame| {
            cx.metrics().frames_in.inc();
            io.touch(cx.now());
            match frame {
                Frame::Login { id } => {
                    // The same id again changes nothing: the connection
                    // still holds it (a newer login elsewhere closes it),
                    // and a second login would hold its cluster channel
                    // twice and release it once.
                    if io.login.as_ref().is_some_and(|l| l.id() == id) {
                        return true;
                    }
                    if let Some(old) = io.login.take() {
                        cx.logout(&old);
                    }
                    log::debug!("{}: login {}", io.peer(), String::from_utf8_lossy(id));
                    io.login = Some(cx.login(id, me));
                    true
                }
                Frame::Transfer { from, to, raw, .. } => {
                    match relay_transfer(cx, io.login.as_ref(), from, to, raw) {
                        Ok(()) => true,
                        Err(r) => {
                            close = Some(r);
                            false
                        }
                    }
                }
            }
        });
        match (res, close) {
            (Err(e), _) => {
                log::debug!("{}: RELY protocol error: {e}", io.peer());
                cx.metrics().protocol_errors.inc();
                Outcome::Close(CloseReason::Protocol)
            }
            (Ok(()), Some(r)) => Outcome::Close(r),
            (Ok(()), None) => Outcome::Continue,
        }
    }

    pub(crate) fn due(&self, io: &Io, t: &Timing) -> Option<u64> {
        t.rely_idle.map(|i| io.last_active() + i)
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        log::debug!("{}: idle timeout", io.peer());
        cx.metrics().idle_timeouts.inc();
        Outcome::Close(CloseReason::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::mesh::Item;
    use crate::engine::route::test::{deliveries, TestCx};
    use crate::protocol::rely::{encode_login, encode_transfer};

    const CFG: &str = "workers: 2\npin: false\n";

    fn io() -> Io {
        crate::engine::io::test_io("127.0.0.1:1")
    }

    fn id(core: u16, slot: u32) -> ConnId {
        ConnId { core, slot, gen: 1 }
    }

    #[test]
    fn transfer_goes_byte_for_byte_to_the_holder_on_its_core() {
        let mut t = TestCx::new(CFG, 2);
        t.dir.login(b"bob", id(1, 7));
        t.dir.login(b"carol", id(0, 8));
        let (mut st, mut io) = (RelyStage::default(), io());
        let mut input = Vec::new();
        encode_login(&mut input, b"alice");
        let mut to_bob = Vec::new();
        encode_transfer(&mut to_bob, b"alice", b"bob", b"hi");
        let mut to_carol = Vec::new();
        encode_transfer(&mut to_carol, b"alice", b"carol", b"yo");
        input.extend_from_slice(&to_bob);
        input.extend_from_slice(&to_carol);
        let out = st.on_bytes(&mut io, id(0, 3), &mut input, &mut t.cx());
        assert!(matches!(out, Outcome::Continue));
        assert_eq!(deliveries(&t.local()), vec![(id(0, 8), to_carol)]);
        let other = t.sent_to(1);
        assert_eq!(deliveries(&other[0]), vec![(id(1, 7), to_bob)]);
        assert_eq!((t.m().frames_in, t.m().cross_core), (3, 1));
    }

    #[test]
    fn transfer_before_login_and_spoofing_close() {
        let mut t = TestCx::new(CFG, 1);
        let (mut st, mut io) = (RelyStage::default(), io());
        let mut f = Vec::new();
        encode_transfer(&mut f, b"alice", b"bob", b"x");
        let out = st.on_bytes(&mut io, id(0, 1), &mut f.clone(), &mut t.cx());
        assert!(matches!(out, Outcome::Close(CloseReason::NotLoggedIn)));
        let mut input = Vec::new();
        encode_login(&mut input, b"mallory");
        input.extend_from_slice(&f);
        let (mut st, mut io) = (RelyStage::default(), super::tests::io());
        let out = st.on_bytes(&mut io, id(0, 2), &mut input, &mut t.cx());
        assert!(matches!(out, Outcome::Close(CloseReason::Spoofed)));
        assert_eq!((t.m().not_logged_in, t.m().spoofed_from), (1, 1));
    }

    #[test]
    fn heartbeat_and_offline_are_counted_not_sent() {
        let mut t = TestCx::new(CFG, 1);
        let (mut st, mut io) = (RelyStage::default(), io());
        let mut input = Vec::new();
        encode_login(&mut input, b"alice");
        encode_transfer(&mut input, b"alice", b"", b"");
        encode_transfer(&mut input, b"alice", b"nobody", b"lost");
        st.on_bytes(&mut io, id(0, 1), &mut input, &mut t.cx());
        assert_eq!((t.m().heartbeats, t.m().dropped_offline), (1, 1));
        assert!(t
            .local()
            .items
            .iter()
            .all(|i| !matches!(i, Item::Deliver { .. })));
    }

    #[test]
    fn relogin_under_another_id_kicks_nobody_and_frees_the_old_id() {
        let mut t = TestCx::new(CFG, 1);
        let (mut st, mut io) = (RelyStage::default(), io());
        let mut input = Vec::new();
        encode_login(&mut input, b"a");
        encode_login(&mut input, b"b");
        st.on_bytes(&mut io, id(0, 1), &mut input, &mut t.cx());
        assert_eq!(t.dir.lookup(b"a"), None);
        assert_eq!(t.dir.lookup(b"b"), Some(id(0, 1)));
        assert!(t.local().items.is_empty(), "no kick");
    }
}

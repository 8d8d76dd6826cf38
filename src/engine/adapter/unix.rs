//! The Unix-socket client stage of an upstream source (Veylor's local
//! clients): 4-byte big-endian length framing both ways. Messages in go to
//! the source (as binary, in order); the source's messages reach it as a
//! member of the source's channel on the source's owner core. A length
//! over the source's `max_message_size` closes that client only.

use super::{Outcome, Stage};
use crate::config::Config;
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Limits};
use crate::engine::route::Ctx;
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::lenprefix::Decoder;

/// A Unix client of a source.
#[derive(Debug)]
pub(crate) struct UnixStage {
    decoder: Decoder,
    source: u16,
}

impl UnixStage {
    /// Its source.
    pub(crate) fn source(&self) -> u16 {
        self.source
    }

    pub(crate) fn accepted(cfg: &Config, source: u16) -> (Stage, Limits) {
        let ws = cfg.ws();
        let limits = Limits {
            bytes: ws.max_output_bytes,
            msgs: u32::try_from(cfg.performance.max_queue_size).unwrap_or(u32::MAX),
            policy: ws.slow_consumer,
        };
        let st = UnixStage {
            decoder: Decoder::default(),
            source,
        };
        (Stage::Unix(st), limits)
    }

    pub(crate) fn on_open(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        cx.join(Channel::Source(self.source), me.slot as usize);
    }

    pub(crate) fn on_close(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        cx.leave(Channel::Source(self.source), me.slot as usize);
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        _me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let source = self.source;
        let Some(max) = cx
            .cfg()
            .sources
            .get(source as usize)
            .map(|s| s.max_message_size)
        else {
            return Outcome::Close(CloseReason::Protocol);
        };
        let res = self.decoder.feed(input, max as u32, |msg| {
            cx.send_upstream(source, false, msg);
            true
        });
        match res {
            Ok(()) => Outcome::Continue,
            Err(e) => {
                log::debug!("{}: unix client of source {source}: {e}", io.peer());
                cx.metrics().protocol_errors.inc();
                Outcome::Close(CloseReason::Protocol)
            }
        }
    }

    pub(crate) fn due(&self, _io: &Io, _t: &Timing) -> Option<u64> {
        None
    }

    pub(crate) fn on_deadline(&mut self, _io: &mut Io, _me: ConnId, _cx: &mut Ctx<'_>) -> Outcome {
        Outcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::test_io;
    use crate::engine::mesh::Item;
    use crate::engine::route::test::TestCx;

    const CFG: &str = "workers: 1\npin: false\nsources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    unix_socket_path: /tmp/unused.sock\n    max_message_size: 8\n";

    #[test]
    fn framed_messages_go_upstream_and_an_oversize_length_closes() {
        let mut t = TestCx::new(CFG, 1);
        let cfg = t.cfg.clone();
        let Stage::Unix(mut st) = UnixStage::accepted(&cfg, 0).0 else {
            panic!("not a unix stage");
        };
        let me = ConnId {
            core: 0,
            slot: 2,
            gen: 1,
        };
        st.on_open(me, &mut t.cx());
        assert_eq!(t.channels.len(Channel::Source(0)), 1);
        let mut io = test_io("127.0.0.1:1");
        let mut input = vec![0, 0, 0, 2, b'h', b'i'];
        assert!(matches!(
            st.on_bytes(&mut io, me, &mut input, &mut t.cx()),
            Outcome::Continue
        ));
        let b = t.local();
        assert!(matches!(
            b.items[..],
            [Item::ToSource {
                source: 0,
                text: false,
                ..
            }]
        ));
        assert_eq!(b.data, b"hi");
        let mut big = 9u32.to_be_bytes().to_vec();
        let out = st.on_bytes(&mut io, me, &mut big, &mut t.cx());
        assert!(matches!(out, Outcome::Close(CloseReason::Protocol)));
        assert_eq!(t.m().protocol_errors, 1);
        st.on_close(me, &mut t.cx());
        assert_eq!(t.channels.len(Channel::Source(0)), 0);
    }
}

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
    pub(crate) fn accepted(cfg: &Config, source: u16) -> (Stage, Limits) {
        let ws = cfg.ws();
        let limits = Limits {
            bytes: ws.max_output_bytes,
            msgs: cfg.performance.max_queue_size,
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
                log::debug!("{}: unix client of source {source}: {e}", io.peer);
                cx.metrics().protocol_errors.inc();
                Outcome::Close(CloseReason::Protocol)
            }
        }
    }

    pub(crate) fn due(&self, _io: &Io, _t: &Timing) -> Option<u64> {
        None
    }

    pub(crate) fn on_deadline(&mut self, _io: &mut Io, _cx: &mut Ctx<'_>) -> Outcome {
        Outcome::Continue
    }
}

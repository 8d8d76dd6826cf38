//! The Veltix stage: a client of a `veltix:` listener, v1 or v3 by
//! listener (codecs in `protocol::veltix`).
//!
//! v3 does what Veltix 3.3.0's server does: the server speaks first (its
//! hello, or `server_full` and a close past `max_clients`); a client whose
//! protocol major differs is closed; PING is answered with a PONG carrying
//! its request id and never forwarded; corrupt frames are dropped and
//! counted and the connection kept. v1 has no handshake; a frame whose hash
//! does not match is dropped and counted.
//!
//! What a client's frames do is the listener's `on_message`:
//! - hub: every other client of the listener gets it, on every core, framed
//!   once per core (`Channel::VeltixHub`). v3 frames are re-stamped with a
//!   server-range request id (32768 and up) and keep their flags, because a
//!   Veltix client completes a pending `send_and_wait` by request id alone;
//!   v1 frames go byte for byte;
//! - echo: the sender gets it back (v3: same type, content and request id,
//!   as `Request.respond` does);
//! - none: discarded and counted.

use std::sync::Arc;

use super::{Outcome, Stage};
use crate::config::{Config, VeltixConfig, VeltixOnMessage};
use crate::engine::channels::Channel;
use crate::engine::io::{CloseReason, Io, Limits, Queued};
use crate::engine::keepalive::{Due, Keepalive};
use crate::engine::message::{unix_ms, Kind, Message, Wire};
use crate::engine::route::Ctx;
use crate::engine::tags::Selector;
use crate::engine::timer::{tick32, Timing, TICK};
use crate::engine::ConnId;
use crate::protocol::veltix::{v1, v3, Version, USER_TYPES};

#[derive(Debug)]
enum Phase {
    /// v3: the server's hello is out; waiting for the client's.
    Hello {
        dec: v3::HandshakeDecoder,
        deadline: u32,
    },
    /// v3 frames flow.
    V3(v3::Decoder),
    /// v1 frames flow (no handshake).
    V1(v1::Decoder),
    /// Refused (server full): only the goodbye is left to flush.
    Refused,
}

/// A Veltix client.
#[derive(Debug)]
pub(crate) struct VeltixStage {
    /// Index of its listener in `Config::veltix`.
    listener: u16,
    phase: Phase,
    /// v3 with `ping_interval`: the server pings.
    keepalive: Keepalive,
    /// The next server-range request id (pings, forwarded frames).
    next_id: u16,
    /// The listener's pong deadline in ticks.
    pong_ticks: u32,
    /// Holds one of the listener's `max_clients` places.
    counted: bool,
    /// The hub's selector while a hub member (made once, not per frame).
    hub: Option<Arc<Selector>>,
}

/// The next id of the server's range, 32768 to 65535, wrapping.
fn take_server_id(next: &mut u16) -> u16 {
    let id = *next;
    *next = if id == u16::MAX {
        v3::SERVER_IDS
    } else {
        id + 1
    };
    id
}

/// An echo: an own write under the connection's limits, counted as a frame
/// out. False: the client is a slow consumer (over its limit).
fn echo(io: &mut Io, parts: &[&[u8]], cx: &Ctx<'_>) -> bool {
    match io.push_own(parts, &cx.metrics().slow_consumer_drop) {
        Queued::Yes => cx.metrics().veltix_frames_out.inc(),
        Queued::Dropped => {}
        Queued::Disconnect => return false,
    }
    true
}

impl VeltixStage {
    pub(crate) fn accepted(cfg: &Config, listener: u16, now: u64) -> (Stage, Limits) {
        let ws = cfg.ws();
        let limits = Limits {
            bytes: ws.max_output_bytes,
            msgs: u32::MAX,
            policy: ws.slow_consumer,
        };
        let l = cfg.veltix.get(listener as usize);
        let phase = match l.map(|l| l.version) {
            Some(Version::V1) => Phase::V1(v1::Decoder::default()),
            _ => Phase::Hello {
                dec: v3::HandshakeDecoder::default(),
                deadline: tick32(now + l.map_or(1, |l| Timing::ticks(l.handshake_timeout, TICK))),
            },
        };
        let st = VeltixStage {
            listener,
            phase,
            keepalive: Keepalive::new(now, None),
            next_id: v3::SERVER_IDS,
            pong_ticks: tick32(l.map_or(1, |l| Timing::ticks(l.pong_timeout, TICK))),
            counted: false,
            hub: None,
        };
        (Stage::Veltix(Box::new(st)), limits)
    }

    fn cfg<'a>(&self, cx: &Ctx<'a>) -> Option<&'a VeltixConfig> {
        cx.cfg().veltix.get(self.listener as usize)
    }

    fn hub(&self) -> Channel {
        Channel::VeltixHub(self.listener)
    }

    /// A fresh server-range request id.
    fn server_id(&mut self) -> u16 {
        take_server_id(&mut self.next_id)
    }

    /// Takes a place on the listener, or refuses (v3: `server_full`).
    pub(crate) fn on_open(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let Some(l) = self.cfg(cx) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        if !cx.veltix_take(self.listener, l.max_clients) {
            cx.metrics().veltix_refused_full.inc();
            log::debug!("{}: Veltix listener full", io.peer());
            if let Phase::Hello { .. } = self.phase {
                let mut m = Vec::new();
                v3::encode_handshake(&mut m, v3::SERVER_FULL);
                io.out.push_bytes(&[&m]);
                io.close_after_flush(CloseReason::Closed, cx.now());
                self.phase = Phase::Refused;
                return Outcome::Continue;
            }
            return Outcome::Close(CloseReason::Closed);
        }
        self.counted = true;
        match self.phase {
            Phase::Hello { .. } => {
                let mut m = Vec::new();
                v3::encode_handshake(&mut m, &v3::hello());
                io.out.push_bytes(&[&m]);
            }
            _ => self.joined(me, cx),
        }
        Outcome::Continue
    }

    /// Frames flow: a hub member from now on.
    fn joined(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        if self
            .cfg(cx)
            .is_some_and(|l| l.on_message == VeltixOnMessage::Hub)
        {
            cx.join(self.hub(), me.slot as usize);
            self.hub = Some(Arc::new(Selector::Channel(self.hub())));
        }
    }

    pub(crate) fn on_close(&mut self, me: ConnId, cx: &mut Ctx<'_>) {
        if matches!(self.phase, Phase::V1(_) | Phase::V3(_)) {
            cx.leave(self.hub(), me.slot as usize);
        }
        if std::mem::take(&mut self.counted) {
            cx.veltix_release(self.listener);
        }
    }

    /// The wire a fanned-out message takes to this client (none before
    /// its handshake is done).
    pub(crate) fn wire(&self) -> Option<Wire> {
        match self.phase {
            Phase::V3(_) => Some(Wire::VeltixV3),
            Phase::V1(_) => Some(Wire::VeltixV1),
            _ => None,
        }
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let Some(l) = self.cfg(cx) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        io.touch(cx.now());
        let mut start = 0;
        if let Phase::Hello { dec, .. } = &mut self.phase {
            let (hello, used) = match dec.feed(input) {
                Ok(Some(m)) => m,
                Ok(None) => return Outcome::Continue,
                Err(v3::HandshakeTooLarge) => {
                    cx.metrics().protocol_errors.inc();
                    return Outcome::Close(CloseReason::Protocol);
                }
            };
            if !v3::compatible(&hello) {
                // Veltix closes without a word.
                log::debug!("{}: Veltix handshake refused (protocol version)", io.peer());
                cx.metrics().protocol_errors.inc();
                return Outcome::Close(CloseReason::Protocol);
            }
            let mut ack = Vec::new();
            v3::encode_handshake(&mut ack, v3::ACCEPTED);
            io.out.push_bytes(&[&ack]);
            self.phase = Phase::V3(v3::Decoder::default());
            self.keepalive =
                Keepalive::new(cx.now(), l.ping_interval.map(|p| Timing::ticks(p, TICK)));
            self.joined(me, cx);
            start = used;
        }
        let input = &input[start..];
        match &mut self.phase {
            Phase::V3(_) => self.on_v3(io, me, input, l, cx),
            Phase::V1(_) => self.on_v1(io, me, input, l, cx),
            _ => Outcome::Continue,
        }
    }

    fn on_v3(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &[u8],
        l: &VeltixConfig,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let Phase::V3(dec) = &mut self.phase else {
            return Outcome::Continue;
        };
        let (hub, keepalive, next_id) = (&self.hub, &mut self.keepalive, &mut self.next_id);
        let mut slow = false;
        dec.feed(input, l.max_message_size, |ev| {
            let f = match ev {
                v3::Event::Corrupt(why) => {
                    log::debug!("{}: Veltix frame dropped: {why:?}", io.peer());
                    cx.metrics().veltix_corrupt.inc();
                    return true;
                }
                v3::Event::Frame(f) => f,
            };
            cx.metrics().veltix_frames_in.inc();
            match f.ty {
                v3::PING => {
                    cx.metrics().veltix_pings.inc();
                    let h = v3::header(0, v3::PONG, f.request_id, b"");
                    io.out.push_bytes(&[&h]);
                    cx.metrics().veltix_frames_out.inc();
                    return true;
                }
                v3::PONG => {
                    keepalive.on_pong();
                    return true;
                }
                ty if ty < USER_TYPES => {
                    // No other system type exists since Veltix 2.0.
                    cx.metrics().veltix_corrupt.inc();
                    return true;
                }
                _ => {}
            }
            match l.on_message {
                VeltixOnMessage::Hub => {
                    let id = take_server_id(next_id);
                    let kind = Kind::Veltix {
                        ty: f.ty,
                        flags: f.flags,
                        request_id: id,
                    };
                    let msg = Message::with_kind(kind, f.content);
                    if let Some(sel) = hub {
                        cx.fanout(sel.clone(), msg, false, Some(me));
                    }
                    true
                }
                VeltixOnMessage::Echo => {
                    let h = v3::header(f.flags, f.ty, f.request_id, f.content);
                    slow = !echo(io, &[&h, f.content], cx);
                    !slow
                }
                VeltixOnMessage::None => {
                    cx.metrics().veltix_discarded.inc();
                    true
                }
            }
        });
        if slow {
            cx.metrics().slow_consumer_disconnect.inc();
            return Outcome::Close(CloseReason::SlowConsumer);
        }
        Outcome::Continue
    }

    fn on_v1(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &[u8],
        l: &VeltixConfig,
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let Phase::V1(dec) = &mut self.phase else {
            return Outcome::Continue;
        };
        let hub = &self.hub;
        let mut slow = false;
        let res = dec.feed(input, l.max_message_size, |ev| {
            let f = match ev {
                v1::Event::BadHash => {
                    log::debug!("{}: Veltix v1 frame dropped: bad hash", io.peer());
                    cx.metrics().veltix_corrupt.inc();
                    return true;
                }
                v1::Event::Frame(f) => f,
            };
            cx.metrics().veltix_frames_in.inc();
            match l.on_message {
                VeltixOnMessage::Hub => {
                    let msg = Message::with_kind(Kind::VeltixV1Frame, f.raw);
                    if let Some(sel) = hub {
                        cx.fanout(sel.clone(), msg, false, Some(me));
                    }
                    true
                }
                VeltixOnMessage::Echo => {
                    // The header on the stack: no copy of the content.
                    let h = v1::header(f.ty, f.content, unix_ms());
                    slow = !echo(io, &[&h, f.content], cx);
                    !slow
                }
                VeltixOnMessage::None => {
                    cx.metrics().veltix_discarded.inc();
                    true
                }
            }
        });
        if let Err(e) = res {
            // v1 cannot resync past a frame it will not take.
            log::debug!(
                "{}: Veltix v1 frame of {} bytes over the limit",
                io.peer(),
                e.size
            );
            cx.metrics().protocol_errors.inc();
            return Outcome::Close(CloseReason::Protocol);
        }
        if slow {
            cx.metrics().slow_consumer_disconnect.inc();
            return Outcome::Close(CloseReason::SlowConsumer);
        }
        Outcome::Continue
    }

    pub(crate) fn due(&self, _io: &Io, _t: &Timing) -> Option<u64> {
        match (&self.phase, &self.keepalive) {
            (Phase::Hello { deadline, .. }, _) => Some(u64::from(*deadline)),
            (Phase::V3(_), k) => k.due(u64::from(self.pong_ticks)),
            _ => None,
        }
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        if let Phase::Hello { .. } = self.phase {
            log::debug!("{}: Veltix handshake timeout", io.peer());
            cx.metrics().ws_handshake_timeouts.inc();
            return Outcome::Close(CloseReason::HandshakeTimeout);
        }
        let Some(l) = self.cfg(cx) else {
            return Outcome::Continue;
        };
        let every = l.ping_interval.map(|p| Timing::ticks(p, TICK));
        let pong = u64::from(self.pong_ticks);
        let k = &mut self.keepalive;
        match k.on_deadline(cx.now(), every, pong) {
            Due::Dead => {
                log::debug!("{}: Veltix ping unanswered", io.peer());
                cx.metrics().ws_ping_timeouts.inc();
                Outcome::Close(CloseReason::PingTimeout)
            }
            Due::Ping => {
                let id = self.server_id();
                io.out.push_bytes(&[&v3::header(0, v3::PING, id, b"")]);
                cx.metrics().veltix_frames_out.inc();
                Outcome::Continue
            }
            Due::Nothing => Outcome::Continue,
        }
    }
}

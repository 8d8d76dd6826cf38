//! Keepalive: the ping/pong rule every stage that pings its peer shares
//! (WebSocket clients, the upstream client; later Veltix v3). A ping goes
//! out every `ping` ticks while none is unanswered; an unanswered ping
//! older than `pong` ticks means the peer is gone.

use super::timer::tick32;

/// One connection's keepalive state, in ticks kept as u32 (see `tick32`;
/// 8 bytes of every WebSocket connection's slab entry, not 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keepalive {
    /// Tick of the next ping (NEVER: never).
    next_ping: u32,
    /// Tick of the unanswered ping (NEVER: none).
    ping_sent: u32,
}

const NEVER: u32 = u32::MAX;

/// What a deadline asks of the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// Nothing yet.
    Nothing,
    /// Send a ping now.
    Ping,
    /// The last ping went unanswered: close.
    Dead,
}

impl Keepalive {
    /// Starts at `now`: the first ping after `every` ticks (None: never).
    pub(crate) fn new(now: u64, every: Option<u64>) -> Self {
        Keepalive {
            next_ping: every.map_or(NEVER, |p| tick32(now + p)),
            ping_sent: NEVER,
        }
    }

    /// A pong (any pong: RFC 6455 allows unsolicited ones) clears the wait.
    pub(crate) fn on_pong(&mut self) {
        self.ping_sent = NEVER;
    }

    fn sent(&self) -> Option<u64> {
        (self.ping_sent != NEVER).then_some(u64::from(self.ping_sent))
    }

    /// The tick at which [`Keepalive::on_deadline`] has something to do.
    pub(crate) fn due(&self, pong: u64) -> Option<u64> {
        match self.sent() {
            Some(sent) => Some(sent + pong),
            None => (self.next_ping != NEVER).then_some(u64::from(self.next_ping)),
        }
    }

    /// The last ping went unanswered for `pong` ticks.
    pub(crate) fn dead(&self, now: u64, pong: u64) -> bool {
        self.sent().is_some_and(|s| s + pong <= now)
    }

    /// Called when a deadline passes.
    pub(crate) fn on_deadline(&mut self, now: u64, every: Option<u64>, pong: u64) -> Due {
        if self.dead(now, pong) {
            return Due::Dead;
        }
        if let Some(every) = every {
            if u64::from(self.next_ping) <= now {
                self.next_ping = tick32(now + every);
                if self.ping_sent == NEVER {
                    self.ping_sent = tick32(now);
                    return Due::Ping;
                }
            }
        }
        Due::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_then_pong_then_ping_then_silence() {
        let mut k = Keepalive::new(0, Some(10));
        assert_eq!(k.due(5), Some(10));
        assert_eq!(k.on_deadline(9, Some(10), 5), Due::Nothing);
        assert_eq!(k.on_deadline(10, Some(10), 5), Due::Ping);
        assert_eq!(k.due(5), Some(15));
        k.on_pong();
        assert_eq!(k.due(5), Some(20));
        assert_eq!(k.on_deadline(20, Some(10), 5), Due::Ping);
        assert_eq!(k.on_deadline(24, Some(10), 5), Due::Nothing);
        assert_eq!(k.on_deadline(25, Some(10), 5), Due::Dead);
    }

    #[test]
    fn no_interval_never_pings() {
        let mut k = Keepalive::new(0, None);
        assert_eq!(k.due(5), None);
        assert_eq!(k.on_deadline(1000, None, 5), Due::Nothing);
    }
}

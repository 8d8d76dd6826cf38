//! A hashed timer wheel for per-connection deadlines (idle, ping, pong,
//! handshake, closing and upstream connect deadlines), and [`Timing`], the
//! config's durations in ticks.
//!
//! Entries are never moved when a connection is active: an entry records the
//! deadline it was armed for, and when it fires the owner checks the
//! connection's real deadline and re-arms if that moved. So activity costs a
//! store of a timestamp, not a wheel operation. A closing connection cancels
//! its entry (a scan of one short slot), so connection churn leaves no stale
//! entries behind: the wheel holds at most one entry per live connection.

/// Timer resolution.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// A tick as a connection keeps it: u32 ticks of 100 ms cover 13.6 years
/// of uptime (later ticks saturate), in half the bytes of a u64 in every
/// connection's slab entry.
#[inline]
pub(crate) fn tick32(t: u64) -> u32 {
    u32::try_from(t).unwrap_or(u32::MAX)
}

/// Deadlines in ticks, from the config.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// RELY idle timeout.
    pub rely_idle: Option<u64>,
    /// WebSocket ping interval.
    pub ws_ping: Option<u64>,
    /// WebSocket pong deadline.
    pub ws_pong: u64,
    /// WebSocket idle timeout.
    pub ws_idle: Option<u64>,
    /// WebSocket handshake deadline.
    pub ws_handshake: u64,
    /// Admin connection idle timeout.
    pub admin_idle: u64,
    /// Admin request deadline (from its first byte).
    pub admin_request: u64,
    /// Write-progress deadline: ticks a socket may take nothing.
    pub send: Option<u64>,
}

/// An admin connection with no request for this long is closed.
const ADMIN_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

impl Timing {
    /// The config's deadlines at `tick` resolution.
    pub fn new(cfg: &crate::Config, tick: std::time::Duration) -> Timing {
        let ws = cfg.ws();
        let t = |d| Timing::ticks(d, tick);
        Timing {
            rely_idle: cfg.rely.idle_timeout.map(t),
            ws_ping: ws.ping_interval.map(t),
            ws_pong: t(ws.pong_timeout),
            ws_idle: ws.idle_timeout.map(t),
            ws_handshake: t(ws.handshake_timeout),
            admin_idle: t(ADMIN_IDLE),
            admin_request: cfg.admin.as_ref().map_or(1, |a| t(a.request_timeout)),
            send: cfg.send_timeout.map(t),
        }
    }

    /// Ticks for a duration (at least one).
    pub fn ticks(d: std::time::Duration, tick: std::time::Duration) -> u64 {
        (d.as_millis() as u64)
            .div_ceil(tick.as_millis() as u64)
            .max(1)
    }
}

/// A timer entry: which connection (slab key and generation) and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// Tick at which the entry is due.
    pub due: u64,
    /// Slab key.
    pub key: usize,
    /// Connection generation, so a reused slot is not hit.
    pub gen: u64,
}

/// A timer as the wheel keeps it: 16 bytes, not 24 (one per connection
/// with a deadline; ticks as `tick32`, slab keys are u32 as in `ConnId`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    due: u32,
    key: u32,
    gen: u64,
}

impl Entry {
    fn timer(self) -> Timer {
        Timer {
            due: u64::from(self.due),
            key: self.key as usize,
            gen: self.gen,
        }
    }
}

/// The wheel: `slots.len()` buckets of one tick each.
#[derive(Debug)]
pub struct Wheel {
    slots: Vec<Vec<Entry>>,
    /// Last tick processed.
    now: u64,
    len: usize,
}

impl Wheel {
    /// A wheel with `slots` buckets (rounded up to a power of two).
    pub fn new(slots: usize, now: u64) -> Self {
        let n = slots.next_power_of_two().max(2);
        Wheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            now,
            len: 0,
        }
    }

    /// Entries armed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no entry is armed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms an entry; a due tick in the past fires on the next advance.
    /// Returns the slot, for [`Wheel::cancel`].
    pub fn arm(&mut self, t: Timer) -> u32 {
        let due = t.due.max(self.now + 1);
        let mask = self.slots.len() as u64 - 1;
        let slot = (due & mask) as usize;
        self.slots[slot].push(Entry {
            due: tick32(due),
            key: t.key as u32,
            gen: t.gen,
        });
        self.len += 1;
        slot as u32
    }

    /// Removes the entry for (`key`, `gen`) from `slot`, if there.
    pub fn cancel(&mut self, slot: u32, key: usize, gen: u64) {
        let Some(v) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if let Some(i) = v.iter().position(|t| t.key as usize == key && t.gen == gen) {
            v.swap_remove(i);
            self.len -= 1;
        }
    }

    /// Advances to tick `now`, appending due entries to `fired`. Entries
    /// for later rounds of the wheel stay in place.
    pub fn advance(&mut self, now: u64, fired: &mut Vec<Timer>) {
        let mask = self.slots.len() as u64 - 1;
        // Past one full turn every slot has been visited; skip the rest.
        let start = self.now.max(now.saturating_sub(mask + 1));
        for tick in start + 1..=now {
            let slot = &mut self.slots[(tick & mask) as usize];
            let before = slot.len();
            slot.retain(|t| {
                if u64::from(t.due) <= now {
                    fired.push(t.timer());
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
            // A burst of deadlines (a wave of accepts) leaves no large
            // empty slot behind.
            if slot.is_empty() && slot.capacity() > 64 {
                *slot = Vec::new();
            }
        }
        self.now = self.now.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_of_ticks_and_rounds() {
        let mut w = Wheel::new(8, 0);
        w.arm(Timer {
            due: 3,
            key: 1,
            gen: 1,
        });
        w.arm(Timer {
            due: 11,
            key: 2,
            gen: 1,
        }); // same slot, next round
        w.arm(Timer {
            due: 0,
            key: 3,
            gen: 1,
        }); // past: next tick
        let mut f = vec![];
        w.advance(1, &mut f);
        assert_eq!(f.iter().map(|t| t.key).collect::<Vec<_>>(), vec![3]);
        f.clear();
        w.advance(5, &mut f);
        assert_eq!(f.iter().map(|t| t.key).collect::<Vec<_>>(), vec![1]);
        f.clear();
        w.advance(100, &mut f);
        assert_eq!(f.iter().map(|t| t.key).collect::<Vec<_>>(), vec![2]);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_removes_only_that_entry() {
        let mut w = Wheel::new(8, 0);
        let s1 = w.arm(Timer {
            due: 3,
            key: 1,
            gen: 1,
        });
        w.arm(Timer {
            due: 3,
            key: 2,
            gen: 1,
        });
        w.cancel(s1, 1, 2); // wrong generation: kept
        assert_eq!(w.len(), 2);
        w.cancel(s1, 1, 1);
        assert_eq!(w.len(), 1);
        let mut f = vec![];
        w.advance(3, &mut f);
        assert_eq!(f.iter().map(|t| t.key).collect::<Vec<_>>(), vec![2]);
    }
}

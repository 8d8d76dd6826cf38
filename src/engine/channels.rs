//! Channels: named groups of one core's connections that a message reaches
//! as a whole (`Selector::Channel`). Today a channel is an upstream source's
//! clients: its WebSocket clients on every core and its Unix clients on its
//! owner core, each framed for its own wire by its stage. A Redis session
//! or a Veltix hub becomes another [`Channel`] kind, not another index.
//!
//! Invariant: a slot is a member exactly while its connection is open and
//! joined; stages leave their channel when they close (`Stage::on_close`).

use std::collections::{HashMap, HashSet};

/// A channel's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The clients of upstream source `n`.
    Source(u16),
    /// The hub clients of Veltix listener `n`.
    VeltixHub(u16),
    /// The members of a Redis channel this core subscribes (its local id;
    /// `engine::redis` keeps the names).
    Redis(u32),
}

/// One core's channel membership (slab keys).
#[derive(Debug, Default)]
pub(crate) struct Channels {
    members: HashMap<Channel, HashSet<usize>>,
}

impl Channels {
    pub(crate) fn join(&mut self, ch: Channel, slot: usize) {
        self.members.entry(ch).or_default().insert(slot);
    }

    pub(crate) fn leave(&mut self, ch: Channel, slot: usize) {
        if let Some(set) = self.members.get_mut(&ch) {
            set.remove(&slot);
            if set.is_empty() {
                self.members.remove(&ch);
            }
        }
    }

    /// Appends the members of `ch` to `out`.
    pub(crate) fn select(&self, ch: Channel, out: &mut Vec<usize>) {
        if let Some(set) = self.members.get(&ch) {
            out.extend(set.iter().copied());
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self, ch: Channel) -> usize {
        self.members.get(&ch).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_the_last_member_forgets_the_channel() {
        let mut c = Channels::default();
        c.join(Channel::Source(1), 7);
        c.join(Channel::Source(1), 9);
        c.leave(Channel::Source(1), 7);
        let mut out = Vec::new();
        c.select(Channel::Source(1), &mut out);
        assert_eq!(out, vec![9]);
        c.leave(Channel::Source(1), 9);
        assert!(c.members.is_empty());
        assert_eq!(c.len(Channel::Source(1)), 0);
    }
}

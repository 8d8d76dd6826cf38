//! What protocol adapters may touch besides the connection they are
//! reading ([`Ctx`]), and the local actions they leave for the core to apply
//! after the reads ([`Actions`]): adapters never touch another connection's
//! state, so a delivery to a connection on the same core waits in a list.

use super::conn::Timing;
use super::directory::{Directory, LookupCache};
use super::mesh::Outgoing;
use super::metrics::CoreMetrics;
use std::sync::Arc;

use super::tags::{Selector, TagIndex};

/// One core's clients of each upstream source (slab keys).
#[derive(Debug, Default)]
pub struct SourceMembers {
    /// WebSocket clients, per source.
    pub ws: Vec<std::collections::HashSet<usize>>,
    /// Unix clients, per source (only on the source's owner core).
    pub unix: Vec<std::collections::HashSet<usize>>,
}
use super::ConnId;
use crate::config::Config;

/// What a fan-out does to each selected connection.
#[derive(Debug, Clone)]
pub enum FanOp {
    /// Queue the frame.
    Send,
    /// Queue the frame (if any), then close 1000 "Closed by server".
    Close,
    /// Apply tag changes (an empty value deletes).
    SetTags(Arc<Vec<(String, String)>>),
    /// Report the connection's id and tags (JSON lines if `json`).
    Status {
        /// JSON objects instead of `id=.. k=v` lines.
        json: bool,
    },
}

/// Where a core reports how many connections a fan-out touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The core holding the admin request.
    pub core: u16,
    /// Its request number on that core.
    pub req: u64,
}

/// One operation for many connections, framed once per core.
#[derive(Debug, Clone)]
pub struct Fanout {
    /// Who it applies to (evaluated by each core on its own index).
    pub selector: Arc<Selector>,
    /// The WebSocket frame, this core's own copy (or a shared one when
    /// large), so reference counting stays on the core. Empty: none.
    pub frame: Arc<[u8]>,
    /// A connection that must not receive it (the sender).
    pub exclude: Option<ConnId>,
    /// What to do.
    pub op: FanOp,
    /// Report the count (and status text) here.
    pub reply: Option<ReplyTo>,
}

/// An admin request that needs every core: the core fans it out and
/// answers `conn` once all cores have replied.
#[derive(Debug)]
pub struct AdminCall {
    /// The admin connection.
    pub conn: ConnId,
    /// Target connections.
    pub selector: Arc<Selector>,
    /// Frame to send (may be empty).
    pub frame: Vec<u8>,
    /// Operation.
    pub op: FanOp,
    /// Keep the HTTP connection open after answering.
    pub keep_alive: bool,
}

/// A local action, applied by the core after the reads, in order (so a
/// connection sees one sender's deliveries, fan-outs and kicks in order).
#[derive(Debug)]
pub enum Local {
    /// Deliver `data[start..start + len]` (a RELY transfer frame).
    Deliver {
        /// Destination.
        to: ConnId,
        /// Offset in `Actions::data`.
        start: u32,
        /// Length.
        len: u32,
    },
    /// A fan-out to this core's matching connections.
    Fanout(Fanout),
    /// Close a connection replaced by a newer login.
    Kick(ConnId),
    /// An admin request to fan out to every core.
    Admin(AdminCall),
    /// A client message for upstream source `source` (owned by this core).
    ToSource {
        /// The source.
        source: u16,
        /// Text (else binary).
        text: bool,
        /// Offset in `Actions::data`.
        start: u32,
        /// Length.
        len: u32,
    },
}

/// Local actions and the bytes of their deliveries.
#[derive(Debug, Default)]
pub struct Actions {
    /// Bytes of local deliveries, back to back (one buffer per iteration).
    pub data: Vec<u8>,
    /// The actions, in order.
    pub local: Vec<Local>,
}

impl Actions {
    /// Adds a local delivery of `parts` (concatenated).
    #[inline]
    pub fn deliver(&mut self, to: ConnId, parts: &[&[u8]]) {
        let start = self.data.len() as u32;
        for p in parts {
            self.data.extend_from_slice(p);
        }
        let len = self.data.len() as u32 - start;
        self.local.push(Local::Deliver { to, start, len });
    }
}

/// Frames at least this large are shared by one reference across cores
/// rather than copied once per core (the copy would cost more than the
/// contended reference count).
pub const SHARE_FRAME_ACROSS_CORES: usize = 64 * 1024;

/// Everything an adapter may touch besides the connection.
pub struct Ctx<'a> {
    /// This core's index.
    pub core: u16,
    /// The configuration.
    pub cfg: &'a Config,
    /// The directory.
    pub dir: &'a Directory,
    /// This core's lookup cache.
    pub cache: &'a mut LookupCache,
    /// This core's tag index.
    pub tags: &'a mut TagIndex,
    /// This core's clients of each upstream source.
    pub members: &'a mut SourceMembers,
    /// This core's counters.
    pub metrics: &'a CoreMetrics,
    /// Cross-core batches.
    pub mesh: &'a mut Outgoing,
    /// Local actions.
    pub actions: &'a mut Actions,
    /// Current tick.
    pub now: u64,
    /// Deadlines in ticks.
    pub timing: Timing,
    /// Every core's counters (for /metrics).
    pub all_metrics: &'a [CoreMetrics],
    /// Every source's state and counters.
    pub sources: &'a [super::metrics::SourceStatus],
    /// The server is shutting down (/ready answers 503).
    pub draining: bool,
}

impl Ctx<'_> {
    /// Registers `id` for `me` (last login wins) and arranges the kick of the
    /// connection it replaces. Returns the login epoch.
    pub fn login(&mut self, id: &[u8], me: ConnId) -> u64 {
        let (epoch, replaced) = self.dir.login(id, me);
        if let Some(old) = replaced {
            if old.core == self.core {
                self.actions.local.push(Local::Kick(old));
            } else {
                self.mesh.kick(old.core as usize, old);
            }
        }
        epoch
    }

    /// Sends `parts` (one frame, concatenated) to the connection holding
    /// `to`, wherever it lives. Returns false if nobody holds it.
    pub fn send_to_id(&mut self, to: &[u8], parts: &[&[u8]]) -> bool {
        match self.cache.lookup(self.dir, to) {
            None => false,
            Some(dst) if dst.core == self.core => {
                self.actions.deliver(dst, parts);
                true
            }
            Some(dst) => {
                self.metrics.cross_core.inc();
                self.mesh.deliver(dst.core as usize, dst, parts);
                true
            }
        }
    }

    /// Sends a client message to upstream source `source`, through its
    /// owner core (in order per client).
    pub fn send_upstream(&mut self, source: u16, text: bool, data: &[u8]) {
        let owner = source as usize % self.cfg.workers;
        if owner == self.core as usize {
            let start = self.actions.data.len() as u32;
            self.actions.data.extend_from_slice(data);
            self.actions.local.push(Local::ToSource {
                source,
                text,
                start,
                len: data.len() as u32,
            });
        } else {
            self.mesh.to_source(owner, source, text, data);
        }
    }

    /// Sends one WebSocket frame to every connection `selector` matches on
    /// every core (except `exclude`): one fan-out per core, not per client.
    pub fn fanout(&mut self, selector: Arc<Selector>, frame: &[u8], exclude: Option<ConnId>) {
        let cores = self.cfg.workers;
        let shared: Option<Arc<[u8]>> =
            (frame.len() >= SHARE_FRAME_ACROSS_CORES).then(|| Arc::from(frame));
        for core in 0..cores {
            let f = Fanout {
                selector: selector.clone(),
                frame: shared.clone().unwrap_or_else(|| Arc::from(frame)),
                exclude,
                op: FanOp::Send,
                reply: None,
            };
            if core == self.core as usize {
                self.actions.local.push(Local::Fanout(f));
            } else {
                self.mesh.fanout(core, f);
            }
        }
    }
}

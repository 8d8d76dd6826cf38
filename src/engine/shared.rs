//! [`Shared`]: what all cores share, by `Arc`: the validated config, the
//! directory, each core's inbox and counters, each source's status, and the
//! shutdown flags. Everything else a core owns alone.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::directory::Directory;
use super::mesh::Inbox;
use super::metrics::{CoreMetrics, DeflateStats, SourceTable};
use crate::config::Config;

/// What all cores share.
#[derive(Debug)]
pub struct Shared {
    /// The validated configuration.
    pub cfg: Config,
    /// Client id -> connection.
    pub directory: Directory,
    /// One inbox per core.
    pub inboxes: Arc<[Inbox]>,
    /// One counter set per core.
    pub metrics: Box<[CoreMetrics]>,
    /// One status per upstream source at start-up (written by its owner
    /// core; a reload gives each core a longer table, `Core::sources`).
    pub sources: SourceTable,
    /// permessage-deflate bytes per core per endpoint (rows of
    /// [`Shared::deflate_rows`]; each core writes only its own).
    pub deflate: Box<[DeflateStats]>,
    /// Clients on each Veltix listener (its `max_clients` bound).
    pub veltix_clients: Box<[AtomicUsize]>,
    /// The other nodes of the cluster core 0 has heard from, sorted
    /// (written by core 0 when they change; read by admin calls).
    pub cluster_nodes: std::sync::Mutex<Vec<String>>,
    /// Their number.
    pub cluster_known: AtomicUsize,
    /// Whether this node's channel is subscribed (bit 0), and how many
    /// times it has been subscribed anew (the rest); written by the core
    /// that holds it. Kicks for this node come on that channel, so a core
    /// claims its ids again only once it is heard (see
    /// `Core::cluster_reclaim`).
    pub cluster_heard: AtomicU64,
    /// Set once to begin a graceful shutdown.
    pub shutdown: AtomicBool,
    /// Draining cores that will never send to another core again (they have
    /// stopped reading and their outgoing batches are all in channels). A
    /// core exits only when this equals the worker count, so no delivery
    /// read before the signal is lost on its way between cores.
    pub quiesced: AtomicUsize,
}

impl Shared {
    /// Rows of permessage-deflate counters per core: one per endpoint,
    /// then one for the sources' WebSocket clients.
    pub fn deflate_rows(cfg: &Config) -> usize {
        cfg.ws().endpoints.len() + 1
    }

    /// Zeroed permessage-deflate counters for `workers` cores.
    pub fn deflate_stats(cfg: &Config, workers: usize) -> Box<[DeflateStats]> {
        (0..workers * Self::deflate_rows(cfg))
            .map(|_| DeflateStats::default())
            .collect()
    }

    /// Core `core`'s permessage-deflate rows.
    pub fn deflate_of(&self, core: usize) -> &[DeflateStats] {
        let rows = Self::deflate_rows(&self.cfg);
        self.deflate
            .get(core * rows..(core + 1) * rows)
            .unwrap_or(&[])
    }

    /// Begins a graceful shutdown on every core.
    pub fn begin_shutdown(&self) {
        if !self.shutdown.swap(true, Ordering::SeqCst) {
            for inbox in self.inboxes.iter() {
                inbox.wake();
            }
        }
    }
}

//! [`Shared`]: what all cores share, by `Arc`: the validated config, the
//! directory, each core's inbox and counters, each source's status, and the
//! shutdown flags. Everything else a core owns alone.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::directory::Directory;
use super::mesh::Inbox;
use super::metrics::{CoreMetrics, SourceStatus};
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
    /// One status per upstream source (written by its owner core).
    pub sources: Box<[SourceStatus]>,
    /// Clients on each Veltix listener (its `max_clients` bound).
    pub veltix_clients: Box<[AtomicUsize]>,
    /// Set once to begin a graceful shutdown.
    pub shutdown: AtomicBool,
    /// Draining cores that will never send to another core again (they have
    /// stopped reading and their outgoing batches are all in channels). A
    /// core exits only when this equals the worker count, so no delivery
    /// read before the signal is lost on its way between cores.
    pub quiesced: AtomicUsize,
}

impl Shared {
    /// Begins a graceful shutdown on every core.
    pub fn begin_shutdown(&self) {
        if !self.shutdown.swap(true, Ordering::SeqCst) {
            for inbox in self.inboxes.iter() {
                inbox.wake();
            }
        }
    }
}

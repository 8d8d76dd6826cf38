//! The per-core engine: one pinned event-loop thread per core, each owning
//! its listeners (SO_REUSEPORT), its slab of connections, its timer wheel and
//! its inbound mesh channel. Nothing is shared mutably between cores except
//! the channels, the [`directory::Directory`] and a few atomics.
//!
//! - `core.rs`: the loop (`Core`), accept, read, deliver, flush, shutdown.
//! - `conn.rs`: one connection's state and its LIFECYCLE.
//! - `rely.rs`: the RELY adapter: frames in, routing actions out.
//! - `ws.rs`: the WebSocket adapter: HTTP upgrade, then frames.
//! - `admin.rs`: the admin HTTP API.
//! - `source.rs`: upstream sources and their Unix clients.
//! - `route.rs`: what adapters may touch, and the local actions they leave.
//! - `tags.rs`: per-core tag index and selectors.
//! - `mesh.rs`: cross-core channels and wake-only-if-parked.
//! - `directory.rs`: client id -> connection, last login wins.
//! - `outbox.rs`: bounded output queues written with writev.
//! - `timer.rs`: the timer wheel for idle deadlines.
//! - `listener.rs`: SO_REUSEPORT listener groups.
//! - `metrics.rs`: per-core counters.

pub mod admin;
pub mod conn;
pub mod core;
pub mod directory;
pub mod listener;
pub mod mesh;
pub mod metrics;
pub mod outbox;
pub mod rely;
pub mod route;
pub mod source;
pub mod stream;
pub mod tags;
pub mod timer;
pub mod ws;

/// A connection's server-wide identity. Slab slots are reused, so `gen`
/// (unique per core over the process lifetime) is checked on arrival: a
/// message for a dead connection is dropped and counted, never delivered to
/// the slot's next tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Owning core.
    pub core: u16,
    /// Slab key on that core.
    pub slot: u32,
    /// Generation: never repeats on a core.
    pub gen: u64,
}

//! The per-core engine: one pinned event-loop thread per core, each owning
//! its listeners (SO_REUSEPORT), its slab of connections, its timer wheel,
//! its indexes and its inbound mesh channel. Nothing is shared mutably
//! between cores except the channels, the [`directory::Directory`] and a
//! few atomics ([`shared`]).
//!
//! Who owns what:
//! - `core.rs`: the loop. It knows no protocol.
//! - `conn.rs` (a connection and its LIFECYCLE) = `io.rs` (its socket side:
//!   stream, bounded outbox, readiness, closing, login) + a stage.
//! - `adapter/`: the stages, one file each, behind one contract
//!   (`adapter/mod.rs`): `rely`, `handshake`, `ws`, `admin`, `unix`,
//!   `upstream`.
//! - `route.rs`: `Ctx`, the stages' only door to the rest of the engine.
//! - [`message`]: messages, fan-outs, admin calls; framing once per wire.
//! - [`mesh`]: the one vocabulary of work between connections (`Item`),
//!   batches per core (the own core's included), wake-only-if-parked.
//! - [`channels`], [`tags`], [`directory`]: who receives what.
//! - `upstreams.rs`: dialling and backoff of upstream sources (owner core);
//!   `admin_calls.rs`: admin requests in flight; `keepalive.rs`: ping/pong.
//! - `stream.rs`, `outbox.rs`, `timer.rs`, `listener.rs`, [`metrics`].
//!
//! # Data flows
//!
//! **A RELY transfer, A (core 0) to B (core 1).** Core 0: `Core::read_ready`
//! reads A's socket into the scratch buffer (`Stream::read_some`), hands it
//! to `adapter::rely::RelyStage::on_bytes`, which decodes in place and calls
//! `relay_transfer` -> `Ctx::send_to_id`: the per-core `LookupCache` names
//! B's `ConnId`, and `Outgoing::deliver` copies the frame once into this
//! iteration's batch for core 1. At the end of the iteration
//! `Outgoing::flush` sends the batch and wakes core 1 only if it is parked.
//! Core 1: `Core::drain_inbox` -> `Core::apply` -> `Core::deliver` checks
//! B's generation, asks B's stage for its wire (`Stage::transfer_wire`: as
//! it is for RELY, a binary WebSocket header for `rely` mode), and queues a
//! slice of the batch (`Core::queue_on`); `Core::flush_dirty` writes it
//! with one `writev`. Same core: the batch is the own core's, applied by
//! `Core::apply_local` after the reads, in the same order.
//!
//! **A fan-out (a broadcast endpoint message, or an upstream message).**
//! The stage calls `Ctx::fanout` with a [`message::Message`] (bytes plus
//! kind, no wire format): one `Fanout` per core (`Item::Fanout`). Each core
//! (`Core::fanout`) selects its connections (tags, ids, or a channel),
//! frames the message once per wire its members need
//! ([`message::Frames`]: a WebSocket frame, a length-prefixed frame), and
//! queues that frame by reference on each of them.
//!
//! **An admin call (`POST /send?team=red`).** `adapter::admin` parses the
//! request, makes a `Message`, and calls `Ctx::admin`: `AdminCalls::start`
//! registers it and queues a fan-out with a reply address for every core;
//! the stage answers `Outcome::Await` and reads nothing more. Each core runs
//! the fan-out and replies with its count (`Item::Reply`); on the asking
//! core `AdminCalls::on_reply` sums them, and the last one becomes an
//! `Answer` that `Core::reply` hands to `AdminStage::on_answer`.
//!
//! **A source message, and a client message for a source.** The source's
//! owner core reads the upstream (`adapter::upstream`), which fans each
//! message out to the source's channel (`Selector::Channel`) on every core:
//! WebSocket clients everywhere, Unix clients on the owner core, each framed
//! for its wire. A client's message goes to the owner core as
//! `Item::ToSource` (`Ctx::send_upstream`), where `Core::write_upstream` writes
//! it upstream in order, or `Upstreams::dropped` counts it while the
//! source is down.

pub(crate) mod adapter;
pub(crate) mod admin_calls;
pub(crate) mod amqp;
pub mod channels;
pub(crate) mod cluster;
pub(crate) mod conn;
pub(crate) mod core;
pub mod directory;
pub(crate) mod events;
pub(crate) mod fanrun;
pub(crate) mod io;
pub(crate) mod keepalive;
pub(crate) mod listener;
pub mod mesh;
pub mod message;
pub mod metrics;
pub(crate) mod outbox;
pub(crate) mod redis;
pub(crate) mod route;
pub(crate) mod shared;
pub(crate) mod stream;
pub mod tags;
pub(crate) mod timer;
pub(crate) mod upstreams;

pub use io::CloseReason;

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

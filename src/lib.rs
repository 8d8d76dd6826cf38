//! corerelay: a thread-per-core message relay server.
//!
//! - [`config`]: the YAML file and its validation.
//! - [`server`]: start, stop and observe a server.
//! - [`engine`]: the per-core event loops and what they share.
//! - [`protocol`]: sans-io wire codecs.
//! - [`client`]: small blocking clients (chat, load tool, tests).
//! - [`sys`]: file limits and systemd notification.
//! - [`logging`]: the process logger and its live level.
#![deny(missing_docs)]

pub mod client;
pub mod config;
pub mod engine;
pub mod logging;
pub mod protocol;
pub mod server;
pub mod sys;

pub use config::Config;
pub use server::{ReloadReport, Reloader, Server, ServerHandle, StartError};

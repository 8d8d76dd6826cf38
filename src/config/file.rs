//! The config file as written: every section and key, all optional,
//! serde with `deny_unknown_fields` so a typo is an error, not a default.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Dur, OnMessage, Size, SlowConsumer};

/// The config file as written. Every key is optional.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Event-loop threads; 0 or absent means one per available CPU.
    pub workers: Option<usize>,
    /// Explicit CPU ids to pin workers to (worker i -> cpus[i % len]).
    pub cpus: Option<Vec<usize>>,
    /// Pin workers to CPUs.
    pub pin: Option<bool>,
    /// Spin instead of parking.
    pub busy_poll: Option<bool>,
    /// Server-wide connection limit.
    pub max_connections: Option<usize>,
    /// Accepts per listener per iteration.
    pub accept_batch: Option<usize>,
    /// Per-worker scratch read buffer.
    pub read_buffer: Option<Size>,
    /// Cross-core channel capacity in batches.
    pub mesh_capacity: Option<usize>,
    /// Graceful shutdown flush limit.
    pub shutdown_grace: Option<Dur>,
    /// Close a connection whose socket takes nothing for this long.
    pub send_timeout: Option<Dur>,
    /// Cap on the bytes queued in all output queues together.
    pub max_memory: Option<Size>,
    /// listen(2) backlog.
    pub backlog: Option<i32>,
    /// RELY protocol section.
    pub rely: Option<RelyFile>,
    /// WebSocket section.
    pub websocket: Option<WsFile>,
    /// Admin API section.
    pub admin: Option<AdminFile>,
    /// Upstream sources (Veylor's key).
    pub sources: Option<Vec<SourceFile>>,
    /// Veltix listeners.
    pub veltix: Option<Vec<super::VeltixFile>>,
    /// Veylor's performance section.
    pub performance: Option<PerformanceFile>,
    /// Log lines as `text` or `json`.
    pub log_format: Option<super::LogFormat>,
    /// Log filter (`info`, `warn,corerelay::engine=debug`); changes on SIGHUP.
    pub log_level: Option<String>,
    /// The Redis server (wsproxy sessions).
    pub redis: Option<super::RedisFile>,
    /// Client events to a Redis stream (wsgateway's stream_redis).
    pub events: Option<super::EventsFile>,
    /// Connection hashes in Redis (wsgateway's connection_redis_sync).
    pub sync: Option<super::SyncFile>,
    /// Several nodes on one Redis.
    pub cluster: Option<super::ClusterFile>,
}

/// One `sources[]` entry as written (Veylor's keys, plus corerelay's).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceFile {
    /// `ws://` or `wss://` URL of the upstream feed.
    pub url: String,
    /// Extra request headers for the upgrade (e.g. Authorization).
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// Port of this source's WebSocket server.
    pub websocket_port: Option<u16>,
    /// Host of this source's WebSocket server.
    pub websocket_host: Option<String>,
    /// Path of this source's Unix socket.
    pub unix_socket_path: Option<PathBuf>,
    /// File mode of the Unix socket (octal as a string, e.g. "0660", or a number).
    pub unix_socket_mode: Option<String>,
    /// Rebroadcast every message as binary (Veylor's behaviour) instead of
    /// keeping text as text.
    pub force_binary: Option<bool>,
    /// Send every upstream message back upstream (for conformance runs).
    pub echo_upstream: Option<bool>,
    /// Largest message from the source or its clients.
    pub max_message_size: Option<Size>,
    /// Offer permessage-deflate to the feed (its compressed messages are
    /// inflated here, bounded by max_message_size).
    pub compression: Option<bool>,
    /// Connect and upgrade deadline.
    pub connect_timeout: Option<Dur>,
    /// PEM file of CA certificates to trust for wss:// (a private feed);
    /// default: the Mozilla roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
}

/// Veylor's `performance:` section.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PerformanceFile {
    /// Messages a client's queue may hold.
    pub max_queue_size: Option<usize>,
    /// First reconnect delay.
    pub reconnect_delay: Option<Dur>,
    /// Reconnect attempts; 0 = forever.
    pub reconnect_max_attempts: Option<u32>,
    /// Backoff ceiling.
    pub reconnect_max_delay: Option<Dur>,
}

/// The `admin:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Addresses to listen on; [] disables the admin listener.
    pub listen: Option<Vec<SocketAddr>>,
    /// CIDR networks allowed to call it.
    pub allow: Option<Vec<String>>,
    /// Largest request, head and body.
    pub max_request_bytes: Option<Size>,
    /// Also answer plain (non-upgrade) HTTP requests on the WebSocket
    /// listeners.
    pub on_websocket_listener: Option<bool>,
    /// A request's head and body must arrive within this.
    pub request_timeout: Option<Dur>,
    /// TLS for these listeners (https://).
    pub tls: Option<super::TlsFile>,
}

/// The `websocket:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WsFile {
    /// Addresses to listen on.
    pub listen: Option<Vec<SocketAddr>>,
    /// Upgrade deadline.
    pub handshake_timeout: Option<Dur>,
    /// Request head cap.
    pub max_handshake_bytes: Option<Size>,
    /// TLS for these listeners (wss://).
    pub tls: Option<super::TlsFile>,
    /// Server ping interval; 0 disables.
    pub ping_interval: Option<Dur>,
    /// Pong deadline after a ping.
    pub pong_timeout: Option<Dur>,
    /// Close after this long without a client frame; 0 disables.
    pub idle_timeout: Option<Dur>,
    /// Output queue byte limit per connection.
    pub max_output_bytes: Option<Size>,
    /// Slow-consumer policy.
    pub slow_consumer: Option<SlowConsumer>,
    /// permessage-deflate for every endpoint (and the sources' WebSocket
    /// clients) unless an endpoint says otherwise: off, shared, dedicated.
    pub compression: Option<crate::protocol::deflate::Mode>,
    /// Messages shorter than this are sent uncompressed.
    pub compression_min_size: Option<Size>,
    /// zlib level, 1 (fastest) to 9 (smallest).
    pub compression_level: Option<u32>,
    /// `dedicated`: largest window the server compresses with (9..=15;
    /// a smaller one costs less memory per connection).
    pub server_max_window_bits: Option<u8>,
    /// `dedicated`: largest window clients are asked to compress with,
    /// when they offer to be told (9..=15).
    pub client_max_window_bits: Option<u8>,
    /// Endpoints (paths).
    pub endpoints: Option<Vec<EndpointFile>>,
}

/// One endpoint as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointFile {
    /// Path or template, e.g. `/connect` or `/{agent_id}/ws/{session_id}`.
    pub path: String,
    /// What client messages do.
    pub on_message: Option<OnMessage>,
    /// Largest message after reassembly.
    pub max_message_size: Option<Size>,
    /// Tags every connection of this endpoint gets.
    pub set_tags: Option<std::collections::BTreeMap<String, String>>,
    /// Path parameters that become tags (default: all of them).
    pub tag_params: Option<Vec<String>>,
    /// Path parameter that is the client id (default: a generated UUID).
    pub id_param: Option<String>,
    /// Prepended to this endpoint's ids (keeps them apart from RELY ids).
    pub id_prefix: Option<String>,
    /// Tag whose value groups connections for `on_message: broadcast`.
    pub broadcast_tag: Option<String>,
    /// wsproxy sessions: the socket hears `session:{id}:down` and its JSON
    /// goes to `session:{id}:up` (needs the `redis:` section).
    pub wsproxy: Option<super::SessionFile>,
    /// Send this endpoint's open, message and close events to the
    /// `events:` stream (default: true when there is one).
    pub events: Option<bool>,
    /// Browser origins allowed to connect (`https://app.example.com`, `*`
    /// wildcards); others get 403. Absent: any.
    pub allowed_origins: Option<Vec<String>>,
    /// permessage-deflate here (default: the section's `compression`).
    pub compression: Option<crate::protocol::deflate::Mode>,
    /// Tags copied into this endpoint's events.
    pub stream_include_tags: Option<Vec<String>>,
    /// Variables for `{json.V}` in the stream name: V -> a JSON path
    /// (`data.actionRef`).
    pub json_extract_vars: Option<std::collections::BTreeMap<String, String>>,
}

/// The `rely:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RelyFile {
    /// Addresses to listen on; an empty list disables RELY.
    pub listen: Option<Vec<SocketAddr>>,
    /// Payload limit per frame.
    pub max_payload: Option<Size>,
    /// Reject FromClientID spoofing.
    pub check_from: Option<bool>,
    /// Idle timeout; 0 disables.
    pub idle_timeout: Option<Dur>,
    /// Output queue byte limit per connection.
    pub max_output_bytes: Option<Size>,
    /// Policy when the output queue is over its limit.
    pub slow_consumer: Option<SlowConsumer>,
    /// TLS for these listeners.
    pub tls: Option<super::TlsFile>,
}

//! Configuration: the YAML file as written ([`FileConfig`], serde with
//! `deny_unknown_fields`) and the validated [`Config`] the engine runs on.
//!
//! Every default is a named `DEFAULT_*` constant below and is documented once,
//! in config.yaml.example. Durations are written as `250ms`, `5s`, `2m`, `1h`
//! or a bare number of seconds; sizes as `65536`, `64KiB`, `8MiB`, `1GiB`.
//! Errors carry the file, line and key so a user can fix them without
//! guessing, and are reported before anything binds.
//!
//! Files: `defaults.rs` (every `DEFAULT_*`), `file.rs` (the YAML as
//! written), `values.rs` (durations, sizes, URLs, networks), `endpoint.rs`
//! (WebSocket endpoints), `tls.rs` (wss:// client settings), `validate.rs`
//! (FileConfig -> Config). This file: the validated [`Config`] and its
//! sections, loading, and [`ConfigError`].

mod amqp;
mod cluster;
mod defaults;
mod endpoint;
mod events;
mod file;
mod redis;
mod reload;
mod tls;
mod validate;
mod values;
mod veltix;
mod wsgateway;
mod wsproxy;

pub use amqp::*;
pub use cluster::*;
pub use defaults::*;
pub use endpoint::*;
pub use events::*;
pub use file::*;
pub use redis::*;
pub use reload::*;
pub use tls::*;
pub use values::*;
pub use veltix::*;
pub use wsgateway::is_wsgateway;
pub use wsproxy::*;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (None: embedded defaults).
    pub source: Option<PathBuf>,
    /// Number of event-loop threads (>= 1).
    pub workers: usize,
    /// Pin workers to CPUs.
    pub pin: bool,
    /// Explicit CPU ids to pin to; empty means every CPU this process may use.
    pub cpus: Vec<usize>,
    /// Spin instead of parking.
    pub busy_poll: bool,
    /// Server-wide connection limit.
    pub max_connections: usize,
    /// Accepts per listener per iteration.
    pub accept_batch: usize,
    /// Per-worker scratch read buffer size in bytes.
    pub read_buffer: usize,
    /// Cross-core channel capacity in batches.
    pub mesh_capacity: usize,
    /// Graceful shutdown flush limit.
    pub shutdown_grace: Duration,
    /// Close a connection whose socket takes none of its queued output for
    /// this long (None: never).
    pub send_timeout: Option<Duration>,
    /// Cap on the bytes waiting in all output queues together (None: no
    /// cap). Over it, new connections are refused and each core cuts its
    /// largest queue.
    pub max_memory: Option<u64>,
    /// listen(2) backlog.
    pub backlog: i32,
    /// RELY settings.
    pub rely: RelyConfig,
    /// WebSocket settings (None: no WebSocket listener).
    pub websocket: Option<WsConfig>,
    /// Admin API settings (None: no admin API).
    pub admin: Option<AdminConfig>,
    /// Upstream sources.
    pub sources: Vec<SourceConfig>,
    /// Veltix listeners.
    pub veltix: Vec<VeltixConfig>,
    /// Reconnect and queue settings shared by sources.
    pub performance: PerformanceConfig,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The log filter when neither RUST_LOG nor `-v` is given (env_logger
    /// directives; None: warnings). Changes on SIGHUP.
    pub log_level: Option<String>,
    /// The `redis:` section: the server of wsproxy sessions (None: none).
    pub redis: Option<RedisConfig>,
    /// Client events to a Redis stream (wsgateway's `stream_redis`).
    pub events: Option<EventsConfig>,
    /// Connection hashes in Redis (wsgateway's `connection_redis_sync`).
    pub sync: Option<SyncConfig>,
    /// Several nodes on one Redis (None: this node alone).
    pub cluster: Option<ClusterConfig>,
    /// Other Redis servers (events, sync) when they are not `redis`:
    /// server `1 + i` (see [`Config::redis_server`]).
    pub redis_extra: Vec<RedisConfig>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `[time LEVEL target] message`, for people.
    #[default]
    Text,
    /// One JSON object a line: `ts`, `level`, `target`, `message`.
    Json,
}

/// The sessions' server: the `redis:` section.
pub const SESSIONS_SERVER: usize = 0;

impl Config {
    /// Redis server `i`: 0 is the `redis:` section, the rest are
    /// `redis_extra`.
    pub fn redis_server(&self, i: usize) -> Option<&RedisConfig> {
        match i {
            0 => self.redis.as_ref(),
            i => self.redis_extra.get(i - 1),
        }
    }

    /// How many server indexes there are (0 may be unset).
    pub fn redis_server_count(&self) -> usize {
        1 + self.redis_extra.len()
    }

    /// Does core `core` hold connections to server `server`? (Every core
    /// does, unless the server is `per_core: false`: then core 0 only.)
    pub fn holds_redis(&self, core: usize, server: usize) -> bool {
        self.redis_server(server)
            .is_some_and(|r| r.per_core || core == 0)
    }

    /// Does server `server` need a subscription connection? (The
    /// sessions' server does.)
    pub fn redis_subscribes(&self, server: usize) -> bool {
        (server == SESSIONS_SERVER && self.redis.is_some())
            || self.cluster.as_ref().is_some_and(|c| c.server == server)
    }
}

/// A validated upstream source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The URL for logs and /status, with its userinfo and query values
    /// masked (`redact_url`): secrets are never printed or exported.
    pub url: String,
    /// Parsed URL.
    pub target: WsUrl,
    /// Extra upgrade headers.
    pub headers: Vec<(String, String)>,
    /// This source's WebSocket server address.
    pub websocket: Option<SocketAddr>,
    /// This source's Unix socket.
    pub unix_socket: Option<PathBuf>,
    /// Unix socket file mode.
    pub unix_mode: u32,
    /// Rebroadcast everything as binary.
    pub force_binary: bool,
    /// Echo upstream messages back upstream.
    pub echo_upstream: bool,
    /// Largest message.
    pub max_message_size: usize,
    /// Offer permessage-deflate to the feed.
    pub compression: bool,
    /// Connect and upgrade deadline.
    pub connect_timeout: Duration,
    /// TLS client settings for wss:// (None for ws://).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Removed by a reload: nothing connects or listens for it any more.
    /// Its slot stays, so that the other sources keep their numbers (in
    /// /metrics, and in messages between cores).
    pub retired: bool,
}

/// Validated `performance:` settings.
#[derive(Debug, Clone)]
pub struct PerformanceConfig {
    /// Messages a client's queue may hold.
    pub max_queue_size: usize,
    /// First reconnect delay.
    pub reconnect_delay: Duration,
    /// Backoff ceiling.
    pub reconnect_max_delay: Duration,
    /// Attempts before giving up; 0 = forever.
    pub reconnect_max_attempts: u32,
}

/// Validated admin API settings.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Listen addresses (may be empty).
    pub listen: Vec<SocketAddr>,
    /// Allowed networks.
    pub allow: Vec<Cidr>,
    /// Largest request.
    pub max_request_bytes: usize,
    /// Answer plain HTTP on the WebSocket listeners too.
    pub on_websocket_listener: bool,
    /// A request's head and body must arrive within this of its first
    /// byte (slowloris), else 408 and close.
    pub request_timeout: Duration,
    /// TLS for its listeners (None: plain).
    pub tls: Option<ServerTls>,
    /// `listen` is the default (127.0.0.1:6666), not written: if another
    /// process holds it, the server starts without the admin API.
    pub listen_defaulted: bool,
}

impl AdminConfig {
    /// May `ip` use the admin API?
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }
}

/// Validated WebSocket settings.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Upgrade deadline.
    pub handshake_timeout: Duration,
    /// Request head cap.
    pub max_handshake_bytes: usize,
    /// Server ping interval (None: no pings).
    pub ping_interval: Option<Duration>,
    /// Pong deadline.
    pub pong_timeout: Duration,
    /// Idle timeout (None: never).
    pub idle_timeout: Option<Duration>,
    /// Output queue byte limit per connection.
    pub max_output_bytes: usize,
    /// Slow-consumer policy.
    pub slow_consumer: SlowConsumer,
    /// Endpoints, matched in order.
    pub endpoints: Vec<Endpoint>,
    /// TLS for its listeners (None: plain).
    pub tls: Option<ServerTls>,
    /// permessage-deflate for the sources' WebSocket clients (endpoints
    /// carry their own).
    pub compression: crate::protocol::deflate::Policy,
    /// Messages shorter than this go out uncompressed.
    pub compression_min_size: usize,
    /// zlib level for everything compressed.
    pub compression_level: u32,
}

impl WsConfig {
    /// The first endpoint matching `path`, with its parameters.
    pub fn route(&self, path: &str) -> Option<(usize, Vec<(String, String)>)> {
        self.endpoints
            .iter()
            .enumerate()
            .find_map(|(i, e)| e.matches(path).map(|p| (i, p)))
    }
}

/// Validated RELY settings.
#[derive(Debug, Clone)]
pub struct RelyConfig {
    /// Listen addresses (may be empty).
    pub listen: Vec<SocketAddr>,
    /// Payload limit per frame.
    pub max_payload: u32,
    /// Reject FromClientID spoofing.
    pub check_from: bool,
    /// Idle timeout (None: never).
    pub idle_timeout: Option<Duration>,
    /// Output queue byte limit per connection.
    pub max_output_bytes: usize,
    /// Slow-consumer policy.
    pub slow_consumer: SlowConsumer,
    /// TLS for its listeners (None: plain).
    pub tls: Option<ServerTls>,
}

/// A configuration error, with as much location as is known.
#[derive(Debug)]
pub struct ConfigError {
    /// The file, if any.
    pub path: Option<PathBuf>,
    /// 1-based line, if known.
    pub line: Option<usize>,
    /// Dotted key, if known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}", p.display())?,
            None => write!(f, "<defaults>")?,
        }
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(k) = &self.key {
            write!(f, "key `{k}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The embedded defaults: RELY on 0.0.0.0:33333, like relayd.
    pub fn defaults() -> Config {
        // Defaults are valid by construction.
        match FileConfig::default().validate(None, "") {
            Ok(c) => c,
            Err(e) => unreachable!("embedded defaults invalid: {e}"),
        }
    }

    /// Loads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: Some(path.to_owned()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::from_yaml(&text, Some(path))
    }

    /// Parses and validates YAML text (`path` is used in errors only).
    pub fn from_yaml(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        if wsgateway::is_wsgateway(text) {
            let err = |key: &str, message: String| ConfigError {
                path: path.map(Path::to_owned),
                line: line_of(text, key),
                key: Some(key.to_owned()),
                message,
            };
            return wsgateway::translate(text, &err)?.validate(path, text);
        }
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| {
                let msg = e.to_string();
                // yaml_serde prefixes the dotted path: "rely.listen[0]: ...".
                let (key, rest) = match msg.split_once(": ") {
                    Some((k, r)) if !k.contains(' ') => (Some(k.to_owned()), r.to_owned()),
                    _ => (None, msg.clone()),
                };
                // Unknown fields name themselves in backticks.
                let key = key.or_else(|| rest.split('`').nth(1).map(str::to_owned));
                let rest = match rest.rfind(" at line ") {
                    Some(i) => rest[..i].to_owned(),
                    None => rest,
                };
                let line = e.location().map(|l| l.line());
                // The path can stop at the section (custom deserializers lose
                // it); the key written on the reported line completes it.
                let leaf = line
                    .and_then(|l| text.lines().nth(l - 1))
                    .and_then(|l| l.trim_start().trim_start_matches("- ").split_once(':'))
                    .map(|(k, _)| k.trim().to_owned())
                    .filter(|k| !k.is_empty() && !k.contains(' '));
                let key = match (key, leaf) {
                    (Some(k), Some(l)) if !k.ends_with(&l) && !k.contains('[') => {
                        Some(format!("{k}.{l}"))
                    }
                    (None, Some(l)) => Some(l),
                    (k, _) => k,
                };
                ConfigError {
                    path: path.map(Path::to_owned),
                    line,
                    key,
                    message: rest,
                }
            })?
        };
        file.validate(path, text)
    }
}

impl Config {
    /// What only this host can tell, and start-up would find: each Unix
    /// socket's directory exists and this user may create files in it.
    /// (`--check-config` runs it; `text` is the file, for line numbers.)
    pub fn check_host(&self, text: &str) -> Result<(), ConfigError> {
        for (i, s) in self.sources.iter().enumerate() {
            let Some(path) = &s.unix_socket else { continue };
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let problem = if !dir.is_dir() {
                Some("does not exist")
            } else {
                use std::os::unix::ffi::OsStrExt;
                let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok();
                // SAFETY: access(2) reads a NUL-terminated path we own.
                let ok = c.is_some_and(
                    |c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0,
                );
                (!ok).then_some("is not writable by this user")
            };
            if let Some(p) = problem {
                let key = format!("sources[{i}].unix_socket_path");
                return Err(ConfigError {
                    path: self.source.clone(),
                    line: line_of(text, &key),
                    key: Some(key),
                    message: format!("the socket's directory {} {p}", dir.display()),
                });
            }
        }
        Ok(())
    }
}

/// Finds the first line that defines `key` (its last dotted component), for
/// errors found after parsing, where serde no longer knows positions.
fn line_of(text: &str, key: &str) -> Option<usize> {
    // Each dotted component is looked for after the previous one's line,
    // so `websocket.listen` finds the listen under websocket, not rely's.
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    for part in key.split('.') {
        let name = part.split('[').next().unwrap_or(part);
        let at = lines[from..].iter().position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.strip_prefix(name)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })?;
        found = Some(from + at);
        from += at + 1;
    }
    found.map(|i| i + 1)
}

impl Config {
    /// The WebSocket settings in force: the `websocket:` section's, or the
    /// defaults when there is none (a source's WebSocket listener still
    /// serves clients then). The engine reads these, never a `DEFAULT_*`.
    pub fn ws(&self) -> &WsConfig {
        static DEFAULTS: std::sync::OnceLock<WsConfig> = std::sync::OnceLock::new();
        self.websocket.as_ref().unwrap_or_else(|| {
            DEFAULTS.get_or_init(|| WsConfig {
                listen: Vec::new(),
                handshake_timeout: DEFAULT_WS_HANDSHAKE_TIMEOUT,
                max_handshake_bytes: DEFAULT_WS_MAX_HANDSHAKE_BYTES as usize,
                ping_interval: Some(DEFAULT_WS_PING_INTERVAL),
                pong_timeout: DEFAULT_WS_PONG_TIMEOUT,
                idle_timeout: None,
                max_output_bytes: DEFAULT_WS_MAX_OUTPUT_BYTES as usize,
                slow_consumer: DEFAULT_SLOW_CONSUMER,
                endpoints: Vec::new(),
                tls: None,
                compression: crate::protocol::deflate::Policy::OFF,
                compression_min_size: DEFAULT_WS_COMPRESSION_MIN_SIZE as usize,
                compression_level: DEFAULT_WS_COMPRESSION_LEVEL,
            })
        })
    }
}

#[cfg(test)]
mod tests;

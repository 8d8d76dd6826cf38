//! Configuration: the YAML file as written ([`FileConfig`], serde with
//! `deny_unknown_fields`) and the validated [`Config`] the engine runs on.
//!
//! Every default is a named `DEFAULT_*` constant below and is documented once,
//! in config.yaml.example. Durations are written as `250ms`, `5s`, `2m`, `1h`
//! or a bare number of seconds; sizes as `65536`, `64KiB`, `8MiB`, `1GiB`.
//! Errors carry the file, line and key so a user can fix them without
//! guessing, and are reported before anything binds.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// relayd's default port.
pub const DEFAULT_RELY_PORT: u16 = 33333;
/// relayd binds all interfaces.
pub const DEFAULT_RELY_LISTEN: &str = "0.0.0.0:33333";
/// relayd's per-frame payload limit: 8 MiB.
pub const DEFAULT_MAX_PAYLOAD: u64 = crate::protocol::rely::DEFAULT_MAX_PAYLOAD as u64;
/// Ceiling for `rely.max_payload`: 1 GiB keeps every frame and batch
/// offset within u32.
pub const MAX_MAX_PAYLOAD: u64 = 1 << 30;
/// A connection with no frame for this long is closed. Clients heartbeat
/// (ToClientIDLen 0) to stay connected; the chat client does so every 15 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Per-connection output queue limit. A message is always accepted into an
/// empty queue, so one maximal frame always fits whatever this is.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;
/// Reject transfers whose FromClientID differs from the login id.
pub const DEFAULT_CHECK_FROM: bool = true;
/// Pin each worker to its own CPU.
pub const DEFAULT_PIN: bool = true;
/// Park idle workers in epoll instead of spinning.
pub const DEFAULT_BUSY_POLL: bool = false;
/// Server-wide connection limit (split evenly across workers).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
/// Connections accepted per listener per loop iteration, so a connect storm
/// cannot starve established connections.
pub const DEFAULT_ACCEPT_BATCH: usize = 64;
/// Per-worker scratch read buffer; connections hold only partial frames.
pub const DEFAULT_READ_BUFFER: u64 = 256 * 1024;
/// Cross-core channel capacity, in batches. A source core sends at most one
/// batch per destination per loop iteration (more only past 1 MiB), and the
/// destination drains its whole channel each iteration, so 256 leaves room
/// for 64 busy sources several iterations over; it also bounds what one
/// stalled core can have waiting for it (capacity x batch size).
pub const DEFAULT_MESH_CAPACITY: usize = 256;
/// How long a graceful shutdown may spend flushing queued output.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// listen(2) backlog per listener.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// wsgateway's WebSocket listener.
pub const DEFAULT_WS_LISTEN: &str = "0.0.0.0:5000";
/// A connection must complete its HTTP upgrade within this (slowloris).
pub const DEFAULT_WS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request head accepted for an upgrade.
pub const DEFAULT_WS_MAX_HANDSHAKE_BYTES: u64 = 8 * 1024;
/// Server ping interval (wsproxy: WS_PING_INTERVAL_SECS=30).
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Close when a ping is not answered within this (wsproxy: 10 s).
pub const DEFAULT_WS_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message (after reassembly) per endpoint unless set.
pub const DEFAULT_WS_MAX_MESSAGE: u64 = 1024 * 1024;
/// Output queue byte limit per WebSocket connection.
pub const DEFAULT_WS_MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;

/// wsgateway's admin API address (loopback only by default).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:6666";
/// Networks allowed to use the admin API.
pub const DEFAULT_ADMIN_ALLOW: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// Largest admin request (head and body).
pub const DEFAULT_ADMIN_MAX_REQUEST: u64 = 1024 * 1024;

/// Veylor: messages a client's queue may hold (Veylor documents but ignores
/// it; corerelay enforces it, with the slow-consumer policy).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1000;
/// Veylor: first reconnect delay; later ones double up to the cap.
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Reconnect backoff ceiling.
pub const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(60);
/// Veylor: 0 = retry forever.
pub const DEFAULT_RECONNECT_MAX_ATTEMPTS: u32 = 0;
/// A connection to a source must be open (TCP + upgrade) within this.
pub const DEFAULT_SOURCE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unix socket file mode.
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o660;
/// Veylor binds source WebSocket servers on all interfaces.
pub const DEFAULT_SOURCE_WS_HOST: &str = "0.0.0.0";

/// What happens when a connection's output queue is over its byte limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close the slow connection (counted as `slow_consumer_disconnect`).
    Disconnect,
    /// Drop the message for that connection (counted as `slow_consumer_drop`).
    Drop,
}

/// Default slow-consumer policy: for a byte relay a silent gap is worse than
/// a reconnect, so the slow receiver is disconnected.
pub const DEFAULT_SLOW_CONSUMER: SlowConsumer = SlowConsumer::Disconnect;

/// A duration as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A byte size as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 250ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" => n / 1_000_000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `65536`, `64KiB`, `64K`, `8MiB`, `8M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 65536, 64KiB, 8MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} out of range"))
}

/// Visits a YAML scalar that may be a number or a string, so errors keep
/// the value's own position (an untagged enum would buffer and lose it).
struct ScalarVisitor<T> {
    expecting: &'static str,
    from_u64: fn(u64) -> Result<T, String>,
    from_str: fn(&str) -> Result<T, String>,
}

impl<'de, T> de::Visitor<'de> for ScalarVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_u64)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))?;
        (self.from_u64)(v).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.from_str)(&v.to_string()).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration such as 250ms, 5s, 2m or a number of seconds",
            from_u64: |n| Ok(Dur(Duration::from_secs(n))),
            from_str: |s| parse_duration(s).map(Dur),
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a size such as 65536, 64KiB or 8MiB",
            from_u64: |n| Ok(Size(n)),
            from_str: |s| parse_size(s).map(Size),
        })
    }
}

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
    /// Veylor's performance section.
    pub performance: Option<PerformanceFile>,
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
}

/// What a WebSocket endpoint does with client messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMessage {
    /// Discard them (counted): clients only receive.
    None,
    /// Send each message back to its sender.
    Echo,
    /// Send each message to the other connections sharing the endpoint's
    /// `broadcast_tag` value.
    Broadcast,
    /// Binary messages are RELY transfer frames, routed by ToClientID to RELY
    /// or WebSocket clients; a RELY transfer to this client's id arrives as a
    /// binary message.
    Rely,
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
    /// Tag whose value groups connections for `on_message: broadcast`.
    pub broadcast_tag: Option<String>,
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
}

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
    /// Reconnect and queue settings shared by sources.
    pub performance: PerformanceConfig,
}

/// A parsed `ws://` / `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// TLS (`wss`).
    pub tls: bool,
    /// Host name or address, as written (brackets stripped).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path and query, at least "/".
    pub path: String,
}

impl WsUrl {
    /// Parses `ws[s]://host[:port][/path][?query]`.
    pub fn parse(s: &str) -> Result<WsUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else {
            return Err(format!("{s:?}: the URL must start with ws:// or wss://"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed [ in host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{s:?}: bad port"))?,
                None => default_port,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("{s:?}: bad port"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(WsUrl {
            tls,
            host,
            port,
            path,
        })
    }
}

/// A validated upstream source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The URL as written (for logs and /status).
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
    /// Connect and upgrade deadline.
    pub connect_timeout: Duration,
    /// TLS client settings for wss:// (None for ws://).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The TLS client settings for a wss:// source: rustls with the ring
/// provider, trusting `ca_file` if given, else the Mozilla roots.
pub fn tls_client_config(
    ca_file: Option<&Path>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let certs =
                CertificateDer::pem_file_iter(p).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", p.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate found", p.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
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

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?
        };
        Ok(Cidr { addr, prefix })
    }

    /// True if `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
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
}

impl AdminConfig {
    /// May `ip` use the admin API?
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(ip))
    }
}

/// One segment of an endpoint path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Must equal this text.
    Literal(String),
    /// Captures the segment under this name.
    Param(String),
}

/// A validated endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The path as written.
    pub path: String,
    /// Its segments.
    pub template: Vec<Segment>,
    /// What client messages do.
    pub on_message: OnMessage,
    /// Largest message after reassembly.
    pub max_message_size: usize,
    /// Fixed tags.
    pub set_tags: Vec<(String, String)>,
    /// Path parameters that become tags.
    pub tag_params: Vec<String>,
    /// Path parameter used as the client id.
    pub id_param: Option<String>,
    /// Broadcast grouping tag.
    pub broadcast_tag: Option<String>,
}

impl Endpoint {
    /// Matches a request path; returns the captured parameters.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segs.len() != self.template.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, t) in segs.iter().zip(&self.template) {
            match t {
                Segment::Literal(l) if l == seg => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if seg.is_empty() => return None,
                Segment::Param(name) => {
                    params.push((name.clone(), crate::protocol::http::url_decode(seg)))
                }
            }
        }
        Some(params)
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

/// Finds the first line that defines `key` (its last dotted component), for
/// errors found after parsing, where serde no longer knows positions.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(leaf)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

impl FileConfig {
    /// Checks cross-field rules and fills defaults.
    pub fn validate(self, path: Option<&Path>, text: &str) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            path: path.map(Path::to_owned),
            line: line_of(text, key),
            key: Some(key.to_owned()),
            message,
        };
        let available = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let workers = match self.workers {
            None | Some(0) => available,
            Some(n) if n > 1024 => return Err(err("workers", format!("{n} is more than 1024"))),
            Some(n) => n,
        };
        let pin = self.pin.unwrap_or(DEFAULT_PIN);
        let cpus = match (&self.cpus, pin) {
            (_, false) => Vec::new(),
            (Some(list), true) if list.is_empty() => {
                return Err(err(
                    "cpus",
                    "must list at least one CPU id (or omit it)".into(),
                ))
            }
            (Some(list), true) => list.clone(),
            (None, true) => Vec::new(), // resolved against the machine at start
        };
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(err("max_connections", "must be at least 1".into()));
        }
        let accept_batch = self.accept_batch.unwrap_or(DEFAULT_ACCEPT_BATCH).max(1);
        let read_buffer = self.read_buffer.map_or(DEFAULT_READ_BUFFER, |s| s.0);
        if !(4096..=64 << 20).contains(&read_buffer) {
            return Err(err(
                "read_buffer",
                format!("{read_buffer} is outside 4KiB..64MiB"),
            ));
        }
        let mesh_capacity = self.mesh_capacity.unwrap_or(DEFAULT_MESH_CAPACITY);
        if mesh_capacity == 0 {
            return Err(err("mesh_capacity", "must be at least 1".into()));
        }
        let rely = self.rely.unwrap_or_default();
        let listen = rely
            .listen
            .unwrap_or_else(|| vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_RELY_PORT))]);
        let max_payload = rely.max_payload.map_or(DEFAULT_MAX_PAYLOAD, |s| s.0);
        if max_payload > MAX_MAX_PAYLOAD {
            return Err(err(
                "rely.max_payload",
                format!("{max_payload} is over 1GiB"),
            ));
        }
        let max_payload = max_payload as u32;
        let idle_timeout = rely.idle_timeout.map_or(Some(DEFAULT_IDLE_TIMEOUT), |d| {
            (!d.0.is_zero()).then_some(d.0)
        });
        let max_output = rely
            .max_output_bytes
            .map_or(DEFAULT_MAX_OUTPUT_BYTES, |s| s.0);
        if max_output == 0 {
            return Err(err("rely.max_output_bytes", "must be at least 1".into()));
        }
        let websocket = match self.websocket {
            None => None,
            Some(ws) => Some(validate_ws(ws, &err)?),
        };
        // On by default with WebSocket (wsgateway), off for a pure relayd
        // setup; `admin: {listen: []}` turns it off.
        let admin = match (self.admin, websocket.is_some()) {
            (None, false) => None,
            (a, _) => {
                let a = a.unwrap_or_default();
                let allow = match a.allow {
                    None => DEFAULT_ADMIN_ALLOW
                        .iter()
                        .map(|c| Cidr::parse(c).expect("literal network"))
                        .collect(),
                    Some(list) => list
                        .iter()
                        .map(|c| Cidr::parse(c))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| err("admin.allow", e))?,
                };
                Some(AdminConfig {
                    listen: a.listen.unwrap_or_else(|| {
                        vec![DEFAULT_ADMIN_LISTEN.parse().expect("literal address")]
                    }),
                    allow,
                    max_request_bytes: a
                        .max_request_bytes
                        .map_or(DEFAULT_ADMIN_MAX_REQUEST, |s| s.0)
                        .clamp(1024, 1 << 30) as usize,
                    on_websocket_listener: a.on_websocket_listener.unwrap_or(false),
                })
            }
        };
        let perf = self.performance.unwrap_or_default();
        let performance = PerformanceConfig {
            max_queue_size: perf.max_queue_size.unwrap_or(DEFAULT_MAX_QUEUE_SIZE).max(1),
            reconnect_delay: perf
                .reconnect_delay
                .map_or(DEFAULT_RECONNECT_DELAY, |d| d.0)
                .max(Duration::from_millis(10)),
            reconnect_max_delay: perf
                .reconnect_max_delay
                .map_or(DEFAULT_RECONNECT_MAX_DELAY, |d| d.0),
            reconnect_max_attempts: perf
                .reconnect_max_attempts
                .unwrap_or(DEFAULT_RECONNECT_MAX_ATTEMPTS),
        };
        let mut sources = Vec::new();
        for (i, s) in self.sources.unwrap_or_default().into_iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k}");
            let target = WsUrl::parse(&s.url).map_err(|e| err(&key("url"), e))?;
            let tls = if target.tls {
                Some(tls_client_config(s.ca_file.as_deref()).map_err(|e| err(&key("ca_file"), e))?)
            } else {
                None
            };
            let host: std::net::IpAddr = s
                .websocket_host
                .as_deref()
                .unwrap_or(DEFAULT_SOURCE_WS_HOST)
                .parse()
                .map_err(|_| err(&key("websocket_host"), "must be an IP address".into()))?;
            let websocket = s.websocket_port.map(|p| SocketAddr::new(host, p));
            if websocket.is_none() && s.unix_socket_path.is_none() {
                return Err(err(
                    &key("url"),
                    "each source needs websocket_port or unix_socket_path".into(),
                ));
            }
            let unix_mode = match s.unix_socket_mode.as_deref() {
                None => DEFAULT_UNIX_SOCKET_MODE,
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        err(
                            &key("unix_socket_mode"),
                            format!("{m:?} is not an octal mode like 0660"),
                        )
                    })?,
            };
            let max = s
                .max_message_size
                .map_or(DEFAULT_WS_MAX_MESSAGE * 16, |x| x.0);
            if max == 0 || max > MAX_MAX_PAYLOAD {
                return Err(err(
                    &key("max_message_size"),
                    format!("{max} is outside 1..=1GiB"),
                ));
            }
            sources.push(SourceConfig {
                url: s.url,
                target,
                headers: s.headers.unwrap_or_default().into_iter().collect(),
                websocket,
                unix_socket: s.unix_socket_path,
                unix_mode,
                force_binary: s.force_binary.unwrap_or(false),
                echo_upstream: s.echo_upstream.unwrap_or(false),
                max_message_size: max as usize,
                connect_timeout: s
                    .connect_timeout
                    .map_or(DEFAULT_SOURCE_CONNECT_TIMEOUT, |d| d.0),
                tls,
            });
        }
        Ok(Config {
            source: path.map(Path::to_owned),
            websocket,
            admin,
            sources,
            performance,
            workers,
            pin,
            cpus,
            busy_poll: self.busy_poll.unwrap_or(DEFAULT_BUSY_POLL),
            max_connections,
            accept_batch,
            read_buffer: read_buffer as usize,
            mesh_capacity,
            shutdown_grace: self.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            backlog: self.backlog.unwrap_or(DEFAULT_BACKLOG).max(1),
            rely: RelyConfig {
                listen,
                max_payload,
                check_from: rely.check_from.unwrap_or(DEFAULT_CHECK_FROM),
                idle_timeout,
                max_output_bytes: usize::try_from(max_output).unwrap_or(usize::MAX),
                slow_consumer: rely.slow_consumer.unwrap_or(DEFAULT_SLOW_CONSUMER),
            },
        })
    }
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
            })
        })
    }
}

fn validate_ws(
    ws: WsFile,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<WsConfig, ConfigError> {
    let listen = ws
        .listen
        .unwrap_or_else(|| vec![DEFAULT_WS_LISTEN.parse().expect("literal address")]);
    let files = ws.endpoints.unwrap_or_default();
    if files.is_empty() {
        return Err(err(
            "websocket.endpoints",
            "list at least one endpoint (path: ...)".into(),
        ));
    }
    let mut endpoints = Vec::with_capacity(files.len());
    for (i, e) in files.into_iter().enumerate() {
        let key = |k: &str| format!("websocket.endpoints[{i}].{k}");
        if !e.path.starts_with('/') {
            return Err(err(&key("path"), format!("{:?} must start with /", e.path)));
        }
        let mut template = Vec::new();
        for seg in e.path.trim_start_matches('/').split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || template.contains(&Segment::Param(name.to_owned())) {
                    return Err(err(
                        &key("path"),
                        format!("bad or repeated parameter {seg:?}"),
                    ));
                }
                template.push(Segment::Param(name.to_owned()));
            } else if seg.contains(['{', '}']) {
                return Err(err(
                    &key("path"),
                    format!("segment {seg:?}: a parameter must be a whole segment"),
                ));
            } else {
                template.push(Segment::Literal(seg.to_owned()));
            }
        }
        let params: Vec<String> = template
            .iter()
            .filter_map(|s| match s {
                Segment::Param(p) => Some(p.clone()),
                Segment::Literal(_) => None,
            })
            .collect();
        // By default every parameter but the id becomes a tag.
        let tag_params = e.tag_params.unwrap_or_else(|| {
            params
                .iter()
                .filter(|p| Some(*p) != e.id_param.as_ref())
                .cloned()
                .collect()
        });
        for p in tag_params.iter().chain(e.id_param.iter()) {
            if !params.contains(p) {
                return Err(err(
                    &key("path"),
                    format!("parameter {p:?} is not in the path"),
                ));
            }
        }
        let on_message = e.on_message.unwrap_or(OnMessage::None);
        if on_message == OnMessage::Broadcast && e.broadcast_tag.is_none() {
            return Err(err(
                &key("broadcast_tag"),
                "on_message: broadcast needs broadcast_tag".into(),
            ));
        }
        let max = e.max_message_size.map_or(DEFAULT_WS_MAX_MESSAGE, |s| s.0);
        if max == 0 || max > MAX_MAX_PAYLOAD {
            return Err(err(
                &key("max_message_size"),
                format!("{max} is outside 1..=1GiB"),
            ));
        }
        endpoints.push(Endpoint {
            path: e.path,
            template,
            on_message,
            max_message_size: max as usize,
            set_tags: e.set_tags.unwrap_or_default().into_iter().collect(),
            tag_params,
            id_param: e.id_param,
            broadcast_tag: e.broadcast_tag,
        });
    }
    let nonzero =
        |d: Option<Dur>, def: Option<Duration>| d.map_or(def, |d| (!d.0.is_zero()).then_some(d.0));
    Ok(WsConfig {
        listen,
        handshake_timeout: ws
            .handshake_timeout
            .map_or(DEFAULT_WS_HANDSHAKE_TIMEOUT, |d| d.0),
        max_handshake_bytes: ws
            .max_handshake_bytes
            .map_or(DEFAULT_WS_MAX_HANDSHAKE_BYTES, |s| s.0)
            .clamp(512, 1 << 20) as usize,
        ping_interval: nonzero(ws.ping_interval, Some(DEFAULT_WS_PING_INTERVAL)),
        pong_timeout: ws.pong_timeout.map_or(DEFAULT_WS_PONG_TIMEOUT, |d| d.0),
        idle_timeout: nonzero(ws.idle_timeout, None),
        max_output_bytes: ws
            .max_output_bytes
            .map_or(DEFAULT_WS_MAX_OUTPUT_BYTES, |s| s.0)
            .max(1) as usize,
        slow_consumer: ws.slow_consumer.unwrap_or(DEFAULT_SLOW_CONSUMER),
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn defaults_match_relayd() {
        let c = Config::defaults();
        assert_eq!(
            c.rely.listen,
            vec!["0.0.0.0:33333".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.rely.max_payload, 8 << 20);
        assert!(c.workers >= 1);
        assert_eq!(DEFAULT_RELY_LISTEN, "0.0.0.0:33333");
    }

    #[test]
    fn websocket_endpoints() {
        let c = Config::from_yaml(
            "websocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /echo\n      on_message: echo\n    - path: /{agent_id}/ws/{session_id}\n      id_param: session_id\n",
            None,
        )
        .unwrap();
        let ws = c.websocket.unwrap();
        assert_eq!(ws.route("/echo").unwrap().0, 0);
        let (i, p) = ws.route("/a%20b/ws/s1").unwrap();
        assert_eq!(i, 1);
        assert_eq!(
            p,
            vec![
                ("agent_id".into(), "a b".into()),
                ("session_id".into(), "s1".into())
            ]
        );
        assert!(ws.route("/a/ws/").is_none() && ws.route("/nope").is_none());
        let e = Config::from_yaml(
            "websocket:\n  endpoints:\n    - path: /x/{a}\n      id_param: b\n",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("websocket.endpoints[0]"), "{e}");
    }

    #[test]
    fn veylor_config_as_written() {
        let c = Config::from_yaml(
            "sources:\n  - url: \"ws://127.0.0.1:9000/feed?x=1\"\n    headers:\n      Authorization: \"Bearer t\"\n    websocket_port: 8765\n    unix_socket_path: \"/tmp/v.sock\"\nperformance:\n  max_queue_size: 1000\n  reconnect_delay: 5\n  reconnect_max_attempts: 0  # 0 for infinite\n",
            None,
        )
        .unwrap();
        let s = &c.sources[0];
        assert_eq!(
            s.target,
            WsUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/feed?x=1".into()
            }
        );
        assert_eq!(s.websocket, Some("0.0.0.0:8765".parse().unwrap()));
        assert_eq!(
            s.headers,
            vec![("Authorization".to_string(), "Bearer t".to_string())]
        );
        assert_eq!(c.performance.reconnect_delay, Duration::from_secs(5));
        let e = Config::from_yaml("sources:\n  - url: ws://h/\n", None).unwrap_err();
        assert!(
            e.to_string().contains("websocket_port or unix_socket_path"),
            "{e}"
        );
        assert_eq!(WsUrl::parse("ws://[::1]:81").unwrap().host, "::1");
        assert_eq!(WsUrl::parse("ws://h?q").unwrap().path, "/?q");
        assert!(WsUrl::parse("http://h").is_err());
    }

    #[test]
    fn cidr() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        let lo = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(
            lo.contains("::ffff:127.0.0.1".parse().unwrap()),
            "v4-mapped"
        );
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("nope").is_err());
        assert!(
            Config::defaults().admin.is_none(),
            "pure relayd defaults bind no admin port"
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = Config::from_yaml("workers: 2\nrely:\n  idle_timeout: soon\n", None).unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key.as_deref(), Some("rely.idle_timeout"), "{e}");
        let e = Config::from_yaml("rely:\n  bogus: 1\n", None).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_yaml("workers: 2\nmax_connections: 0\n", None).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(e.key.as_deref(), Some("max_connections"));
    }
}

//! `events.amqp`: client events published to an AMQP 0-9-1 exchange
//! (RabbitMQ), as wsgateway's `stream_amqp` does: the URL, the exchange
//! (declared a durable topic exchange when named), the queue (declared
//! durable and bound with `#` when named), the routing-key template, and
//! the client's own bounds.

use std::time::Duration;

use serde::Deserialize;

use super::{redact_url, Dur, Size};

/// The heartbeat asked of the broker (it may ask for less).
pub const DEFAULT_AMQP_HEARTBEAT: Duration = Duration::from_secs(30);
/// Deadline for the TCP connect and the whole handshake.
pub const DEFAULT_AMQP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Events a core holds (unsent and unconfirmed) while the broker is away
/// or slow; past it new events are dropped and counted.
pub const DEFAULT_AMQP_MAX_PENDING: u64 = 16 << 20;
/// Publishes a core keeps unconfirmed at once.
pub const DEFAULT_AMQP_MAX_IN_FLIGHT: u32 = 4096;
/// The first reconnect delay (doubled per failure, with jitter).
pub const DEFAULT_AMQP_RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// The reconnect backoff ceiling (wsgateway's is 10 s).
pub const DEFAULT_AMQP_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(10);

/// `events.amqp` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpFile {
    /// `amqp://user:pass@host:port/vhost` (amqps:// for TLS).
    pub url: Option<String>,
    /// Exchange to publish to ("" is the default exchange).
    pub exchange: Option<String>,
    /// Queue to declare and bind with `#` (optional).
    pub queue: Option<String>,
    /// Routing key, with `{tag.X}` and `{json.V}` as the stream name
    /// (parsed into `EventsConfig::stream`).
    pub routing_key: Option<String>,
    /// Accepted and unused, as in wsgateway.
    pub headers: Option<serde_yaml::Value>,
    /// Heartbeat asked of the broker; 0 disables.
    pub heartbeat: Option<Dur>,
    /// TCP connect and handshake deadline.
    pub connect_timeout: Option<Dur>,
    /// Events held per core while the broker is away.
    pub max_pending_bytes: Option<Size>,
    /// Unconfirmed publishes per core.
    pub max_in_flight: Option<u32>,
    /// First reconnect delay.
    pub reconnect_delay: Option<Dur>,
    /// Reconnect backoff ceiling.
    pub reconnect_max_delay: Option<Dur>,
    /// amqps://: PEM file of the CAs to trust (default: the public roots).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Validated `events.amqp`.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// The URL for logs, secrets masked.
    pub url: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// PLAIN user.
    pub user: String,
    /// PLAIN password.
    pub password: String,
    /// Virtual host.
    pub vhost: String,
    /// Exchange ("" is the default exchange).
    pub exchange: String,
    /// Queue to declare and bind ("" none).
    pub queue: String,
    /// Heartbeat asked (None: off).
    pub heartbeat: Option<Duration>,
    /// TCP connect and handshake deadline.
    pub connect_timeout: Duration,
    /// Events held per core.
    pub max_pending_bytes: usize,
    /// Unconfirmed publishes per core.
    pub max_in_flight: u32,
    /// First reconnect delay.
    pub reconnect_delay: Duration,
    /// Reconnect backoff ceiling.
    pub reconnect_max_delay: Duration,
    /// TLS client settings for amqps:// (None for amqp://).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl AmqpFile {
    /// Checks the URL and fills defaults; errors are (key, message).
    pub fn validate(self) -> Result<AmqpConfig, (&'static str, String)> {
        let raw = self.url.unwrap_or_default();
        let shown = redact_url(&raw);
        let u = url::Url::parse(raw.trim()).map_err(|e| ("url", format!("{shown:?}: {e}")))?;
        let tls = match u.scheme() {
            "amqp" => None,
            "amqps" => Some(
                super::tls_client_config(self.ca_file.as_deref()).map_err(|e| ("ca_file", e))?,
            ),
            _ => {
                return Err((
                    "url",
                    format!("{shown:?}: the URL must start with amqp:// or amqps://"),
                ))
            }
        };
        let host =
            super::values::host_of(&u).ok_or_else(|| ("url", format!("{shown:?}: no host")))?;
        let dec = super::values::userinfo_part;
        // As RabbitMQ's URI spec: no userinfo means guest/guest; an empty
        // path means the default vhost "/", "/x" means "x" (%2F for "/").
        let (user, password) = match (u.username(), u.password()) {
            ("", None) => ("guest".to_owned(), "guest".to_owned()),
            (n, p) => (dec(n), p.map(dec).unwrap_or_default()),
        };
        let vhost = match u.path() {
            "" | "/" => "/".to_owned(),
            p => crate::protocol::http::url_decode(&p[1..]),
        };
        let exchange = self.exchange.unwrap_or_default();
        let queue = self.queue.unwrap_or_default();
        for (key, name) in [("exchange", &exchange), ("queue", &queue)] {
            if name.len() > 255 {
                return Err((key, "is longer than AMQP's 255 bytes".into()));
            }
        }
        let max = self
            .max_pending_bytes
            .map_or(DEFAULT_AMQP_MAX_PENDING, |s| s.0);
        let in_flight = self.max_in_flight.unwrap_or(DEFAULT_AMQP_MAX_IN_FLIGHT);
        if in_flight == 0 {
            return Err(("max_in_flight", "must be at least 1".into()));
        }
        Ok(AmqpConfig {
            url: shown,
            host,
            port: u.port().unwrap_or(if tls.is_some() { 5671 } else { 5672 }),
            user,
            password,
            vhost,
            exchange,
            queue,
            heartbeat: self.heartbeat.map_or(Some(DEFAULT_AMQP_HEARTBEAT), |d| {
                Some(d.0).filter(|d| !d.is_zero())
            }),
            connect_timeout: self
                .connect_timeout
                .map_or(DEFAULT_AMQP_CONNECT_TIMEOUT, |d| d.0),
            max_pending_bytes: usize::try_from(max).unwrap_or(usize::MAX),
            max_in_flight: in_flight,
            reconnect_delay: self
                .reconnect_delay
                .map_or(DEFAULT_AMQP_RECONNECT_DELAY, |d| d.0),
            reconnect_max_delay: self
                .reconnect_max_delay
                .map_or(DEFAULT_AMQP_RECONNECT_MAX_DELAY, |d| d.0),
            tls,
        })
    }
}

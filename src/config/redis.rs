//! The `redis:` section (the server the cores talk to) and an endpoint's
//! `wsproxy:` block (sessions whose sockets hear `session:{id}:down` and
//! publish to `session:{id}:up`), as written and validated.

use std::time::Duration;

use serde::Deserialize;

use super::{redact_url, Dur, Size};

/// Redis connection defaults.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Deadline for a TCP connect to Redis.
pub const DEFAULT_REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for any one reply.
pub const DEFAULT_REDIS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest reply (and so the largest message from Redis) a core takes.
pub const DEFAULT_REDIS_MAX_REPLY: u64 = 64 << 20;
/// Commands a core may hold for one connection while it is away or slow.
pub const DEFAULT_REDIS_MAX_PENDING: u64 = 16 << 20;
/// How often an idle connection is pinged (a dead peer is found within
/// this plus `request_timeout`).
pub const DEFAULT_REDIS_PING_INTERVAL: Duration = Duration::from_secs(5);
/// The first reconnect delay, doubled per failure with jitter.
pub const DEFAULT_REDIS_RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// The reconnect backoff ceiling.
pub const DEFAULT_REDIS_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
/// wsproxy's AUTH_TIMEOUT_SECS.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// wsproxy's AUTH_GRACE_PERIOD_SECS (3 h).
pub const DEFAULT_AUTH_GRACE_PERIOD: Duration = Duration::from_secs(10800);

/// The `redis:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RedisFile {
    /// `redis://[user:pass@]host:port/db`.
    pub url: Option<String>,
    /// TCP connect deadline.
    pub connect_timeout: Option<Dur>,
    /// Deadline for each reply.
    pub request_timeout: Option<Dur>,
    /// Largest reply taken; a larger one drops the connection.
    pub max_reply_bytes: Option<Size>,
    /// Commands held per connection while Redis is away or slow.
    pub max_pending_bytes: Option<Size>,
    /// Ping interval of an idle connection; 0 disables.
    pub ping_interval: Option<Dur>,
    /// First reconnect delay.
    pub reconnect_delay: Option<Dur>,
    /// Reconnect backoff ceiling.
    pub reconnect_max_delay: Option<Dur>,
    /// `CLIENT SETNAME` prefix (the core's number is appended).
    pub client_name: Option<String>,
    /// Each core keeps its own two connections (true), or only core 0
    /// does and the others reach Redis through it (false: two connections
    /// in all, for many cores or a low `maxclients`).
    pub per_core: Option<bool>,
}

/// A parsed `redis://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// Host name or address.
    pub host: String,
    /// Port (default 6379).
    pub port: u16,
    /// ACL user name (AUTH user pass), if any.
    pub user: Option<String>,
    /// Password (AUTH), if any.
    pub password: Option<String>,
    /// Database number (SELECT), 0 by default.
    pub db: u32,
}

impl std::fmt::Debug for RedisUrl {
    // Never prints the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis://{}:{}/{}", self.host, self.port, self.db)
    }
}

impl RedisUrl {
    /// Parses `redis://[user:pass@]host[:port][/db][?options]`. Query
    /// options (`?pool_size=`, `?protocol=`) are ignored, as wsproxy's
    /// client ignores what it does not know.
    pub fn parse(raw: &str) -> Result<RedisUrl, String> {
        let shown = redact_url(raw);
        let u = url::Url::parse(raw.trim()).map_err(|e| format!("{shown:?}: {e}"))?;
        if u.scheme() != "redis" {
            return Err(format!("{shown:?}: the URL must start with redis://"));
        }
        let host = super::values::host_of(&u).ok_or_else(|| format!("{shown:?}: no host"))?;
        let dec = super::values::userinfo_part;
        let (user, password) = match (u.username(), u.password()) {
            ("", None) => (None, None),
            // redis://:pass@host and redis://pass@host are the password
            // alone (AUTH pass), as redis-cli and go-redis read them.
            ("", Some(p)) => (None, Some(dec(p))),
            (n, None) => (None, Some(dec(n))),
            (n, Some(p)) => (Some(dec(n)), Some(dec(p))),
        };
        let db = match u.path().trim_matches('/') {
            "" => 0,
            d => d
                .parse()
                .map_err(|_| format!("{shown:?}: the path must be a database number"))?,
        };
        Ok(RedisUrl {
            host,
            port: u.port().unwrap_or(6379),
            user,
            password,
            db,
        })
    }
}

/// Validated `redis:` settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// The URL for logs and errors, secrets masked.
    pub url: String,
    /// Where to connect and how to log in.
    pub target: RedisUrl,
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Deadline for each reply.
    pub request_timeout: Duration,
    /// Largest reply taken.
    pub max_reply_bytes: usize,
    /// Commands held per connection while Redis is away or slow.
    pub max_pending_bytes: usize,
    /// Ping interval of an idle connection (None: never).
    pub ping_interval: Option<Duration>,
    /// First reconnect delay.
    pub reconnect_delay: Duration,
    /// Reconnect backoff ceiling.
    pub reconnect_max_delay: Duration,
    /// `CLIENT SETNAME` prefix.
    pub client_name: String,
    /// Two connections per core (else on core 0 only).
    pub per_core: bool,
}

impl RedisFile {
    /// Validates; errors are (key under `redis.`, message).
    pub fn validate(self) -> Result<RedisConfig, (&'static str, String)> {
        let raw = self.url.unwrap_or_else(|| DEFAULT_REDIS_URL.to_owned());
        let target = RedisUrl::parse(&raw).map_err(|e| ("url", e))?;
        let max_reply = self
            .max_reply_bytes
            .map_or(DEFAULT_REDIS_MAX_REPLY, |s| s.0);
        if !(1024..=1 << 30).contains(&max_reply) {
            return Err((
                "max_reply_bytes",
                format!("{max_reply} is outside 1KiB..=1GiB"),
            ));
        }
        let max_pending = self
            .max_pending_bytes
            .map_or(DEFAULT_REDIS_MAX_PENDING, |s| s.0)
            .clamp(64 << 10, 1 << 30);
        let name = self.client_name.unwrap_or_else(|| "corerelay".to_owned());
        if name.is_empty() || name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err((
                "client_name",
                "must be non-empty, without spaces or control characters".into(),
            ));
        }
        let positive =
            |d: Option<Dur>, def: Duration| d.map_or(def, |d| d.0).max(Duration::from_millis(10));
        Ok(RedisConfig {
            url: redact_url(&raw),
            target,
            connect_timeout: positive(self.connect_timeout, DEFAULT_REDIS_CONNECT_TIMEOUT),
            request_timeout: positive(self.request_timeout, DEFAULT_REDIS_REQUEST_TIMEOUT),
            max_reply_bytes: max_reply as usize,
            max_pending_bytes: max_pending as usize,
            ping_interval: self
                .ping_interval
                .map_or(Some(DEFAULT_REDIS_PING_INTERVAL), |d| {
                    (!d.0.is_zero()).then_some(d.0)
                }),
            reconnect_delay: positive(self.reconnect_delay, DEFAULT_REDIS_RECONNECT_DELAY),
            reconnect_max_delay: positive(
                self.reconnect_max_delay,
                DEFAULT_REDIS_RECONNECT_MAX_DELAY,
            ),
            client_name: name,
            per_core: self.per_core.unwrap_or(true),
        })
    }
}

/// An endpoint's `wsproxy:` block as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SessionFile {
    /// The path parameter holding the session id (default `session_id`).
    pub session_param: Option<String>,
    /// Check `Authorization: Bearer` against `session:{id}:auth` (default
    /// true, as wsproxy does).
    pub auth: Option<bool>,
    /// Deadline for the auth lookup (AUTH_TIMEOUT_SECS).
    pub auth_timeout: Option<Dur>,
    /// TTL the token key gets after a successful connect
    /// (AUTH_GRACE_PERIOD_SECS).
    pub auth_grace_period: Option<Dur>,
    /// Key and channel prefix (default `session:`).
    pub prefix: Option<String>,
}

/// A validated wsproxy session endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Path parameter holding the session id.
    pub param: String,
    /// Check the bearer token.
    pub auth: bool,
    /// Deadline for the auth lookup.
    pub auth_timeout: Duration,
    /// Token TTL after a successful connect.
    pub auth_grace_period: Duration,
    /// Key and channel prefix.
    pub prefix: String,
}

impl SessionFile {
    /// Validates; errors are (key under the block, message).
    pub fn validate(self) -> Result<SessionConfig, (&'static str, String)> {
        let grace = self
            .auth_grace_period
            .map_or(DEFAULT_AUTH_GRACE_PERIOD, |d| d.0);
        if grace.as_secs() == 0 {
            return Err((
                "auth_grace_period",
                "must be at least 1s (it is an EXPIRE in seconds)".into(),
            ));
        }
        Ok(SessionConfig {
            param: self
                .session_param
                .unwrap_or_else(|| "session_id".to_owned()),
            auth: self.auth.unwrap_or(true),
            auth_timeout: self
                .auth_timeout
                .map_or(DEFAULT_AUTH_TIMEOUT, |d| d.0)
                .max(Duration::from_millis(10)),
            auth_grace_period: grace,
            prefix: self.prefix.unwrap_or_else(|| "session:".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_as_wsproxy_users_write_them() {
        let u = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6379, 0));
        assert_eq!((u.user, u.password), (None, None));
        let u =
            RedisUrl::parse("redis://app:s%40cret@cache.internal:6380/3?pool_size=512").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.internal", 6380, 3));
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        let u = RedisUrl::parse("redis://:pw@[::1]/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 6379));
        assert_eq!(
            (u.user.as_deref(), u.password.as_deref()),
            (None, Some("pw"))
        );
        assert!(!format!("{u:?}").contains("pw"));
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        for bad in [
            "http://x",
            "redis://:hunter2@",
            "redis://u:hunter2@h:notaport",
            "redis://u:hunter2@h/x",
        ] {
            let e = RedisUrl::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}

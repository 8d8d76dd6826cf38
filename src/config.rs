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
        Ok(Config {
            source: path.map(Path::to_owned),
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

//! The `events:` section (wsgateway's `stream_redis`: client events XADDed
//! to a Redis stream; or its `stream_amqp`: published to an AMQP exchange,
//! `events.amqp`) and the `sync:` section (its
//! `connection_redis_sync`: a hash per connection), and the stream-name
//! template they share with wsgateway.

use std::time::Duration;

use serde::Deserialize;

use super::{Dur, RedisFile};

/// wsgateway's default stream.
pub const DEFAULT_STREAM_NAME: &str = "connectionevents";

/// The `events:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EventsFile {
    /// The Redis server of the stream (default: the `redis:` section).
    pub redis: Option<RedisFile>,
    /// Publish to an AMQP exchange instead (wsgateway's `stream_amqp`).
    pub amqp: Option<super::AmqpFile>,
    /// The stream name, with `{tag.X[:default]}` and `{json.V[:default]}`.
    pub stream_name: Option<String>,
    /// `XADD ... MAXLEN ~ n` (0 or absent: no trimming, as wsgateway).
    pub stream_maxlen: Option<u64>,
}

/// The `sync:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SyncFile {
    /// The Redis server of the hashes (default: the events' server, else
    /// the `redis:` section).
    pub redis: Option<RedisFile>,
    /// EXPIRE on the two keys, refreshed while the connection lives (0 or
    /// absent: none, as wsgateway).
    pub ttl: Option<Dur>,
}

/// One piece of a stream-name template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text as written.
    Lit(String),
    /// `{tag.X:default}`.
    Tag(String, String),
    /// `{json.V:default}`: V names a `json_extract_vars` entry.
    Json(String, String),
    /// Any other `{name:default}`: always the default.
    Default(String),
}

/// A parsed stream name (or routing key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(pub Vec<Part>);

impl Template {
    /// Parses wsgateway's `{[a-zA-Z0-9_\-:.]+}` variables; other braces
    /// stay text.
    pub fn parse(s: &str) -> Template {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.');
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            match after.find('}') {
                Some(close) if close > 0 && after[..close].chars().all(ok) => {
                    lit.push_str(&rest[..open]);
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    let inner = &after[..close];
                    let (name, default) = match inner.split_once(':') {
                        Some((n, d)) => (n, d.to_owned()),
                        None => (inner, "_".to_owned()),
                    };
                    parts.push(if let Some(t) = name.strip_prefix("tag.") {
                        Part::Tag(t.to_owned(), default)
                    } else if let Some(v) = name.strip_prefix("json.") {
                        Part::Json(v.to_owned(), default)
                    } else {
                        Part::Default(default)
                    });
                    rest = &after[close + 1..];
                }
                _ => {
                    lit.push_str(&rest[..=open]);
                    rest = after;
                }
            }
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Template(parts)
    }

    /// A template without variables: the same name for every event.
    pub fn fixed(&self) -> Option<&str> {
        match self.0.as_slice() {
            [] => Some(""),
            [Part::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Does any part read the message's JSON?
    pub fn uses_json(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Part::Json(..)))
    }
}

/// Where events go.
#[derive(Debug, Clone)]
pub enum EventSink {
    /// XADD on this Redis server (`Config::redis_server`).
    Redis(usize),
    /// Published to this AMQP broker's exchange.
    Amqp(Box<super::AmqpConfig>),
}

/// Validated `events:` settings.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// Where they go.
    pub sink: EventSink,
    /// The stream name template (Redis) or routing key template (AMQP).
    pub stream: Template,
    /// `MAXLEN ~` (None: no trimming).
    pub maxlen: Option<u64>,
}

impl EventsConfig {
    /// The Redis server events go to (None: they go to AMQP).
    pub fn redis_server(&self) -> Option<usize> {
        match self.sink {
            EventSink::Redis(s) => Some(s),
            EventSink::Amqp(_) => None,
        }
    }
}

/// Validated `sync:` settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Its Redis server (`Config::redis_server`).
    pub server: usize,
    /// EXPIRE on the keys, refreshed at each server ping (None: none).
    pub ttl: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_as_wsgateway_reads_them() {
        let t = Template::parse("events-{tag.group:nogroup}-{json.command}.{x:d}{bad name}{}");
        assert_eq!(
            t.0,
            vec![
                Part::Lit("events-".into()),
                Part::Tag("group".into(), "nogroup".into()),
                Part::Lit("-".into()),
                Part::Json("command".into(), "_".into()),
                Part::Lit(".".into()),
                Part::Default("d".into()),
                Part::Lit("{bad name}{}".into()),
            ]
        );
        assert_eq!(
            Template::parse("connectionevents").fixed(),
            Some("connectionevents")
        );
        assert!(t.uses_json());
        assert_eq!(
            Template::parse("{json.a:x:y}").0,
            vec![Part::Json("a".into(), "x:y".into())]
        );
    }
}

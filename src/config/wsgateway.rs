//! wsgateway's config.yml as it is: a file with wsgateway's top-level
//! keys is read in wsgateway's schema and turned into the corerelay
//! sections that do the same (as a Veylor file is). Its keys:
//! `listen_addr` (WebSocket endpoints and the admin API on one listener),
//! `internal_endpoint_access_whitelist` (who may call the admin API),
//! `stream_redis` (events), `connection_redis_sync` (sync),
//! `stream_amqp` (events to an AMQP exchange), `max_message_size_kb`,
//! `endpoints[]` and `prometheus`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};

use serde::Deserialize;

use super::{
    AdminFile, ConfigError, EndpointFile, EventsFile, FileConfig, RedisFile, RelyFile, Size,
    SyncFile, WsFile,
};

/// Top-level keys only wsgateway's schema has.
const WSGATEWAY_KEYS: [&str; 7] = [
    "listen_addr",
    "internal_endpoint_access_whitelist",
    "connection_redis_sync",
    "stream_redis",
    "stream_amqp",
    "max_message_size_kb",
    "prometheus",
];

/// wsgateway's defaults.
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_WHITELIST: [&str; 2] = ["127.0.0.1/8", "::1/128"];
const DEFAULT_MAX_MESSAGE_KB: u64 = 131072;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Addr {
    addr: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct StreamRedis {
    addr: Option<String>,
    stream_name: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct StreamAmqp {
    addr: Option<String>,
    exchange: Option<String>,
    queue: Option<String>,
    routing_key: Option<String>,
    headers: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Prometheus {
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Endpoint {
    path: Option<String>,
    set_tags: Option<BTreeMap<String, serde_yaml::Value>>,
    stream_include_tags: Option<Vec<String>>,
    max_message_size_kb: Option<u64>,
    json_extract_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct WsgatewayFile {
    listen_addr: Option<String>,
    internal_endpoint_access_whitelist: Option<Vec<String>>,
    connection_redis_sync: Option<Addr>,
    stream_redis: Option<StreamRedis>,
    stream_amqp: Option<StreamAmqp>,
    max_message_size_kb: Option<u64>,
    endpoints: Option<Vec<Endpoint>>,
    prometheus: Option<Prometheus>,
}

/// Is this wsgateway's schema? (Any of its own top-level keys.)
pub fn is_wsgateway(text: &str) -> bool {
    let Ok(serde_yaml::Value::Mapping(m)) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
        return false;
    };
    m.keys()
        .filter_map(|k| k.as_str())
        .any(|k| WSGATEWAY_KEYS.contains(&k))
}

/// A YAML scalar as wsgateway stores a tag value (`2` becomes `"2"`).
fn scalar(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// A go-redis URL for our client: `client_name=` becomes CLIENT SETNAME's
/// prefix; other options (`pool_size=`) are ignored.
fn redis_file(url: &str) -> RedisFile {
    let client_name = url
        .split_once('?')
        .and_then(|(_, q)| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("client_name="))
                .map(crate::protocol::http::url_decode)
        })
        .filter(|n| !n.is_empty());
    RedisFile {
        url: Some(url.to_owned()),
        client_name,
        ..RedisFile::default()
    }
}

/// Reads wsgateway's config.yml into the sections that do what it says.
pub fn translate(
    text: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<FileConfig, ConfigError> {
    let w: WsgatewayFile = serde_yaml::from_str(text).map_err(|e| {
        let line = e.location().map(|l| l.line());
        let mut c = err("", e.to_string());
        c.key = None;
        c.line = line;
        c
    })?;
    let stream = w.stream_redis.unwrap_or_default();
    let stream_addr = stream.addr.filter(|a| !a.is_empty());
    let amqp = w
        .stream_amqp
        .filter(|a| a.addr.as_deref().is_some_and(|a| !a.is_empty()));
    // As wsgateway: exactly one of the two.
    let events = match (&stream_addr, amqp) {
        (Some(_), Some(_)) => {
            return Err(err(
                "stream_amqp.addr",
                "set stream_redis.addr or stream_amqp.addr, not both".into(),
            ))
        }
        (None, None) => {
            return Err(err(
                "stream_redis.addr",
                "wsgateway needs a stream: set stream_redis.addr (redis://host:port/db) or stream_amqp.addr (amqp://user:pass@host:port/)".into(),
            ))
        }
        (Some(a), None) => EventsFile {
            redis: Some(redis_file(a)),
            stream_name: stream.stream_name,
            ..EventsFile::default()
        },
        (None, Some(a)) => {
            let file = super::AmqpFile {
                url: a.addr,
                exchange: a.exchange,
                queue: a.queue,
                routing_key: a.routing_key,
                headers: a.headers,
                ..super::AmqpFile::default()
            };
            EventsFile {
                amqp: Some(file),
                ..EventsFile::default()
            }
        }
    };
    // Checked here, so an error names wsgateway's key.
    if let Some(a) = events.amqp.as_ref().and_then(|a| a.url.clone()) {
        let check = super::AmqpFile {
            url: Some(a),
            ..super::AmqpFile::default()
        };
        check
            .validate()
            .map_err(|(_, m)| err("stream_amqp.addr", m))?;
    }
    for (key, url) in [
        ("stream_redis.addr", stream_addr.as_deref()),
        (
            "connection_redis_sync.addr",
            w.connection_redis_sync
                .as_ref()
                .and_then(|s| s.addr.as_deref())
                .filter(|a| !a.is_empty()),
        ),
    ] {
        if let Some(u) = url {
            super::RedisUrl::parse(u).map_err(|e| err(key, e))?;
        }
    }
    let listen_raw = w
        .listen_addr
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| DEFAULT_LISTEN.into());
    // Go's ":5000" is every address.
    let listen_full = match listen_raw.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => listen_raw.clone(),
    };
    let listen: SocketAddr = listen_full
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            err(
                "listen_addr",
                format!("{listen_raw:?} is not an address to listen on"),
            )
        })?;
    let allow: Vec<String> = match w.internal_endpoint_access_whitelist {
        None => DEFAULT_WHITELIST.iter().map(|s| s.to_string()).collect(),
        // As wsgateway: a bad network is logged and skipped.
        Some(list) => list
            .into_iter()
            .filter(|c| {
                let ok = super::Cidr::parse(c).is_ok() && c.contains('/');
                if !ok {
                    log::warn!(
                        "internal_endpoint_access_whitelist: {c:?} is not a CIDR network; skipped"
                    );
                }
                ok
            })
            .collect(),
    };
    let global_kb = w
        .max_message_size_kb
        .filter(|&k| k > 0)
        .unwrap_or(DEFAULT_MAX_MESSAGE_KB);
    let mut endpoints = Vec::new();
    for (i, e) in w.endpoints.unwrap_or_default().into_iter().enumerate() {
        let Some(path) = e.path.filter(|p| !p.is_empty()) else {
            return Err(err(
                &format!("endpoints[{i}].path"),
                "every endpoint needs a path".into(),
            ));
        };
        let kb = e
            .max_message_size_kb
            .filter(|&k| k > 0)
            .unwrap_or(global_kb);
        let vars = e.json_extract_vars.map(|m| {
            m.into_iter()
                .filter(|(k, _)| {
                    let ok = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        log::warn!("endpoints[{i}].json_extract_vars: {k:?} is not a variable name; skipped");
                    }
                    ok
                })
                .collect()
        });
        endpoints.push(EndpointFile {
            path,
            set_tags: e
                .set_tags
                .map(|m| m.iter().map(|(k, v)| (k.clone(), scalar(v))).collect()),
            // Tags come from set_tags and /settags only (no path
            // parameters), and ids are generated, as in wsgateway.
            tag_params: Some(Vec::new()),
            max_message_size: Some(Size(kb.saturating_mul(1024))),
            stream_include_tags: e.stream_include_tags,
            json_extract_vars: vars,
            events: Some(true),
            ..EndpointFile::default()
        });
    }
    if endpoints.is_empty() {
        return Err(err(
            "endpoints",
            "list at least one endpoint (path: /connect)".into(),
        ));
    }
    let _ = w.prometheus.and_then(|p| p.enabled); // /metrics is always served
    Ok(FileConfig {
        rely: Some(RelyFile {
            listen: Some(Vec::new()),
            ..RelyFile::default()
        }),
        websocket: Some(WsFile {
            listen: Some(vec![listen]),
            endpoints: Some(endpoints),
            ..WsFile::default()
        }),
        admin: Some(AdminFile {
            listen: Some(Vec::new()),
            allow: Some(allow),
            on_websocket_listener: Some(true),
            ..AdminFile::default()
        }),
        events: Some(events),
        sync: w
            .connection_redis_sync
            .and_then(|s| s.addr)
            .filter(|a| !a.is_empty())
            .map(|a| SyncFile {
                redis: Some(redis_file(&a)),
                ttl: None,
            }),
        ..FileConfig::default()
    })
}

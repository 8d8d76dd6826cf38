//! `corerelay --wsproxy`: wsproxy's environment variables (and a `.env`
//! file, read by the same parser wsproxy uses) turned into a corerelay
//! config. The variables become YAML that goes through the same validation
//! as a file, so `--wsproxy --print-config` shows a file that runs the
//! same server.
//!
//! Defaults are wsproxy's code defaults (its README's 30 s / 10 s ping
//! values differ from its code's 15 s / 30 s; the code is what runs).

use std::net::{SocketAddr, ToSocketAddrs};

use super::{Config, ConfigError};

/// The variables read, with wsproxy's defaults.
pub const WSPROXY_VARS: [(&str, &str); 9] = [
    ("HOST", "0.0.0.0"),
    ("PORT", "8080"),
    ("REDIS_URL", "redis://127.0.0.1:6379"),
    ("WS_PING_INTERVAL_SECS", "15"),
    ("WS_PING_TIMEOUT_SECS", "30"),
    ("SHUTDOWN_GRACE_PERIOD_SECS", "30"),
    ("AUTH_TIMEOUT_SECS", "5"),
    ("AUTH_GRACE_PERIOD_SECS", "10800"),
    ("MAX_MESSAGE_SIZE_BYTES", "1048576"),
];

/// wsproxy's log filter when neither RUST_LOG nor LOG_LEVEL is set.
pub const WSPROXY_LOG_LEVEL: &str = "info";

fn err(var: &str, message: String) -> ConfigError {
    ConfigError {
        path: None,
        line: None,
        key: Some(var.to_owned()),
        message,
    }
}

/// The YAML equivalent of wsproxy's environment, as `get` reads it.
pub fn wsproxy_yaml(get: &dyn Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let var = |name: &str| -> String {
        let def = WSPROXY_VARS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, d)| d);
        get(name).unwrap_or_else(|| def.to_owned())
    };
    let num = |name: &str| -> Result<u64, ConfigError> {
        let v = var(name);
        v.trim()
            .parse::<u64>()
            .map_err(|_| err(name, format!("{v:?} is not a whole number")))
    };
    let port = num("PORT")?;
    if port == 0 || port > u64::from(u16::MAX) {
        return Err(err(
            "PORT",
            "PORT must be greater than 0 (and at most 65535)".into(),
        ));
    }
    let host = var("HOST");
    // A host name (wsproxy binds `(host, port)`, resolving it) is resolved
    // once at start.
    let listen: SocketAddr = (host.as_str(), port as u16)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            err(
                "HOST",
                format!("{host:?} is not an address this host can bind"),
            )
        })?;
    let redis = var("REDIS_URL");
    if redis.trim().is_empty() {
        return Err(err("REDIS_URL", "REDIS_URL cannot be empty".into()));
    }
    let max = num("MAX_MESSAGE_SIZE_BYTES")?;
    if max == 0 {
        return Err(err(
            "MAX_MESSAGE_SIZE_BYTES",
            "MAX_MESSAGE_SIZE_BYTES must be greater than 0".into(),
        ));
    }
    let interval = num("WS_PING_INTERVAL_SECS")?;
    // wsproxy closes a client silent for the timeout at each tick; with a
    // timeout below the interval (its README's 30/10) that closes healthy
    // idle clients. corerelay waits for a pong at least one interval.
    let timeout = num("WS_PING_TIMEOUT_SECS")?.max(interval).max(1);
    let grace = num("SHUTDOWN_GRACE_PERIOD_SECS")?;
    let auth_timeout = num("AUTH_TIMEOUT_SECS")?;
    let auth_grace = num("AUTH_GRACE_PERIOD_SECS")?;
    let q = |s: &str| serde_json::Value::from(s).to_string();
    Ok(format!(
        "# From wsproxy's environment (corerelay --wsproxy).
rely:
  listen: []
shutdown_grace: {grace}s
websocket:
  listen: [{listen}]
  ping_interval: {interval}s
  pong_timeout: {timeout}s
  endpoints:
    - path: /{{agent_id}}/ws/{{session_id}}
      max_message_size: {max}
      wsproxy:
        session_param: session_id
        auth_timeout: {auth_timeout}s
        auth_grace_period: {auth_grace}s
admin:
  listen: []
  on_websocket_listener: true
redis:
  url: {redis}
",
        listen = q(&listen.to_string()),
        redis = q(&redis),
    ))
}

/// The config wsproxy's environment describes.
pub fn wsproxy_config(get: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let yaml = wsproxy_yaml(get)?;
    Config::from_yaml(&yaml, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        wsproxy_config(&|k| m.get(k).cloned())
    }

    #[test]
    fn wsproxy_defaults() {
        let c = with(&[]).unwrap();
        let ws = c.websocket.as_ref().unwrap();
        assert_eq!(ws.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(ws.ping_interval, Some(std::time::Duration::from_secs(15)));
        assert_eq!(ws.pong_timeout, std::time::Duration::from_secs(30));
        let ep = &ws.endpoints[0];
        assert_eq!(ep.max_message_size, 1048576);
        let s = ep.session.as_ref().unwrap();
        assert_eq!(s.auth_timeout, std::time::Duration::from_secs(5));
        assert_eq!(s.auth_grace_period, std::time::Duration::from_secs(10800));
        assert!(c.rely.listen.is_empty());
        assert!(c.admin.as_ref().unwrap().on_websocket_listener);
        assert_eq!(c.redis.as_ref().unwrap().target.port, 6379);
        assert_eq!(c.shutdown_grace, std::time::Duration::from_secs(30));
    }

    #[test]
    fn readme_ping_values_keep_healthy_clients() {
        let c = with(&[
            ("WS_PING_INTERVAL_SECS", "30"),
            ("WS_PING_TIMEOUT_SECS", "10"),
        ])
        .unwrap();
        let ws = c.websocket.unwrap();
        assert_eq!(ws.pong_timeout, std::time::Duration::from_secs(30));
    }

    #[test]
    fn wsproxy_refusals() {
        let e = with(&[("PORT", "0")]).unwrap_err();
        assert!(e.to_string().contains("PORT must be greater than 0"), "{e}");
        let e = with(&[("REDIS_URL", "")]).unwrap_err();
        assert!(e.to_string().contains("REDIS_URL cannot be empty"), "{e}");
        let e = with(&[("MAX_MESSAGE_SIZE_BYTES", "0")]).unwrap_err();
        assert!(e.to_string().contains("greater than 0"), "{e}");
        let e = with(&[("PORT", "eighty")]).unwrap_err();
        assert!(e.to_string().contains("PORT"), "{e}");
        let e = with(&[("REDIS_URL", "redis://u:hunter2@h:bad")]).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

//! FileConfig -> Config: defaults applied, values checked, cross-field
//! rules, each error naming the file, line and key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::veltix::validate_veltix;
use super::*;

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
        // Unset: what the file limit allows, keeping a reserve for
        // listeners, polls and the admin API (HAProxy derives maxconn from
        // ulimit-n the same way), so the server never meets EMFILE on its
        // own and the admin API stays reachable at the limit.
        let max_connections = self.max_connections.unwrap_or_else(|| {
            crate::sys::file_limit().map_or(DEFAULT_MAX_CONNECTIONS, |l| {
                let fds = usize::try_from(l.hard).unwrap_or(usize::MAX);
                fds.saturating_sub(FD_RESERVE)
                    .clamp(1, DEFAULT_MAX_CONNECTIONS)
            })
        });
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
        // A file in Veylor's shape (sources, and no rely, websocket or
        // veltix section) serves what Veylor serves: no RELY listener, and
        // binary to clients, unless it says otherwise.
        let veylor_shaped = self.sources.is_some()
            && self.rely.is_none()
            && self.websocket.is_none()
            && self.veltix.is_none();
        let rely = self.rely.unwrap_or_default();
        let listen = rely.listen.unwrap_or_else(|| {
            if veylor_shaped {
                Vec::new()
            } else {
                vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_RELY_PORT))]
            }
        });
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
        let rely_tls = match rely.tls {
            None => None,
            Some(t) => Some(
                t.validate()
                    .map_err(|(k, m)| err(&format!("rely.tls.{k}"), m))?,
            ),
        };
        let websocket = match self.websocket {
            None => None,
            Some(ws) => Some(validate_ws(ws, self.events.is_some(), &err)?),
        };
        // On by default whatever is configured (NATS's monitoring port):
        // /health, /ready, /metrics and /status on loopback for relayd- and
        // Veylor-only setups too; `admin: {listen: []}` turns it off.
        let admin = {
            let a = self.admin.unwrap_or_default();
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
                listen_defaulted: a.listen.is_none(),
                listen: a.listen.unwrap_or_else(|| {
                    vec![DEFAULT_ADMIN_LISTEN.parse().expect("literal address")]
                }),
                allow,
                max_request_bytes: a
                    .max_request_bytes
                    .map_or(DEFAULT_ADMIN_MAX_REQUEST, |s| s.0)
                    .clamp(1024, 1 << 30) as usize,
                on_websocket_listener: a.on_websocket_listener.unwrap_or(false),
                request_timeout: a
                    .request_timeout
                    .map_or(DEFAULT_ADMIN_REQUEST_TIMEOUT, |d| d.0),
                tls: match a.tls {
                    None => None,
                    Some(t) => Some(
                        t.validate()
                            .map_err(|(k, m)| err(&format!("admin.tls.{k}"), m))?,
                    ),
                },
            })
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
            let mut headers: Vec<(String, String)> =
                s.headers.unwrap_or_default().into_iter().collect();
            if let Some(u) = &target.userinfo {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                {
                    use base64::Engine;
                    let b = base64::engine::general_purpose::STANDARD.encode(u.as_bytes());
                    headers.push(("Authorization".into(), format!("Basic {b}")));
                }
            }
            sources.push(SourceConfig {
                url: redact_url(&s.url),
                target,
                headers,
                websocket,
                unix_socket: s.unix_socket_path,
                unix_mode,
                force_binary: s.force_binary.unwrap_or(veylor_shaped),
                echo_upstream: s.echo_upstream.unwrap_or(false),
                max_message_size: max as usize,
                compression: s.compression.unwrap_or(false),
                connect_timeout: s
                    .connect_timeout
                    .map_or(DEFAULT_SOURCE_CONNECT_TIMEOUT, |d| d.0),
                tls,
                retired: false,
            });
        }
        let redis = match self.redis {
            None => None,
            Some(r) => Some(
                r.validate()
                    .map_err(|(k, m)| err(&format!("redis.{k}"), m))?,
            ),
        };
        if redis.is_none() {
            let mut sessions = websocket
                .iter()
                .flat_map(|w| w.endpoints.iter().enumerate());
            if let Some((i, _)) = sessions.find(|(_, e)| e.session.is_some()) {
                return Err(err(
                    &format!("websocket.endpoints[{i}].wsproxy"),
                    "wsproxy sessions need a redis: section (url: redis://...)".into(),
                ));
            }
        }
        // Events and sync may name other servers: each distinct one gets
        // an index (0 is `redis:`), so two names of one server share its
        // connections.
        let mut extra: Vec<RedisConfig> = Vec::new();
        let mut server_of = |r: Option<RedisFile>,
                             fallback: Option<usize>,
                             section: &str|
         -> Result<usize, ConfigError> {
            let Some(r) = r else {
                return fallback.ok_or_else(|| {
                    err(
                        section,
                        format!("{section} needs a Redis server: {section}.redis.url or a redis: section"),
                    )
                });
            };
            let r = r
                .validate()
                .map_err(|(k, m)| err(&format!("{section}.redis.{k}"), m))?;
            if redis.as_ref().is_some_and(|m| m.target == r.target) {
                return Ok(SESSIONS_SERVER);
            }
            if let Some(i) = extra.iter().position(|x| x.target == r.target) {
                return Ok(i + 1);
            }
            extra.push(r);
            Ok(extra.len())
        };
        let main = redis.as_ref().map(|_| SESSIONS_SERVER);
        let events = match self.events {
            None => None,
            Some(e) if e.amqp.is_some() => {
                if e.redis.is_some() || e.stream_name.is_some() || e.stream_maxlen.is_some() {
                    return Err(err(
                        "events.amqp",
                        "events go to Redis (redis, stream_name, stream_maxlen) or to AMQP (amqp), not both".into(),
                    ));
                }
                let file = e.amqp.unwrap_or_default();
                let stream = Template::parse(file.routing_key.as_deref().unwrap_or(""));
                let a = file
                    .validate()
                    .map_err(|(k, m)| err(&format!("events.amqp.{k}"), m))?;
                Some(EventsConfig {
                    stream,
                    sink: EventSink::Amqp(Box::new(a)),
                    maxlen: None,
                })
            }
            Some(e) => {
                let server = server_of(e.redis, main, "events")?;
                let name = e.stream_name.filter(|s| !s.is_empty());
                Some(EventsConfig {
                    sink: EventSink::Redis(server),
                    stream: Template::parse(name.as_deref().unwrap_or(DEFAULT_STREAM_NAME)),
                    maxlen: e.stream_maxlen.filter(|&n| n > 0),
                })
            }
        };
        let sync = match self.sync {
            None => None,
            Some(s) => {
                let server = server_of(
                    s.redis,
                    events
                        .as_ref()
                        .and_then(EventsConfig::redis_server)
                        .or(main),
                    "sync",
                )?;
                Some(SyncConfig {
                    server,
                    ttl: s.ttl.map(|d| d.0).filter(|d| !d.is_zero()),
                })
            }
        };
        let cluster = match self.cluster {
            None => None,
            Some(c) => {
                let (mut c, r) = c
                    .validate()
                    .map_err(|(k, m)| err(&format!("cluster.{k}"), m))?;
                if r.per_core == Some(false) {
                    return Err(err(
                        "cluster.redis.per_core",
                        "the cluster's Redis connections are per core (a core subscribes the ids it holds)".into(),
                    ));
                }
                c.server = server_of(Some(r), None, "cluster")?;
                Some(c)
            }
        };
        if let (Some(c), Some(r)) = (&cluster, &redis) {
            if c.server == SESSIONS_SERVER && !r.per_core {
                return Err(err(
                    "redis.per_core",
                    "the cluster shares this server, and its connections are per core".into(),
                ));
            }
        }
        if let (Some(s), Some(ttl), Some(ws)) =
            (&sync, sync.as_ref().and_then(|s| s.ttl), &websocket)
        {
            let _ = s;
            match ws.ping_interval {
                Some(p) if ttl >= 2 * p && ttl.as_secs() >= 1 => {}
                _ => {
                    return Err(err(
                        "sync.ttl",
                        "must be at least 1s and twice websocket.ping_interval (it is refreshed at each ping)".into(),
                    ))
                }
            }
        }
        let veltix = validate_veltix(self.veltix.unwrap_or_default(), max_connections, &err)?;
        // Every TCP listener with its key, in the order they bind.
        let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
        listeners.extend(listen.iter().map(|a| ("rely.listen".to_owned(), *a)));
        for a in websocket.iter().flat_map(|w| &w.listen) {
            listeners.push(("websocket.listen".into(), *a));
        }
        for a in admin.iter().flat_map(|a| &a.listen) {
            listeners.push(("admin.listen".into(), *a));
        }
        for (i, s) in sources.iter().enumerate() {
            if let Some(a) = s.websocket {
                listeners.push((format!("sources[{i}].websocket_port"), a));
            }
        }
        for (i, v) in veltix.iter().enumerate() {
            listeners.push((format!("veltix[{i}].listen"), v.listen));
        }
        check_listeners(&listeners, &err)?;
        if let Some(l) = &self.log_level {
            check_log_level(l).map_err(|m| err("log_level", m))?;
        }
        Ok(Config {
            log_level: self.log_level,
            source: path.map(Path::to_owned),
            veltix,
            redis_extra: extra,
            cluster,
            log_format: self.log_format.unwrap_or_default(),
            events,
            sync,
            redis,
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
            max_memory: self.max_memory.map(|s| s.0).filter(|&b| b > 0),
            send_timeout: match self.send_timeout {
                None => Some(DEFAULT_SEND_TIMEOUT),
                Some(d) => (!d.0.is_zero()).then_some(d.0),
            },
            backlog: self.backlog.unwrap_or(DEFAULT_BACKLOG).max(1),
            rely: RelyConfig {
                listen,
                max_payload,
                check_from: rely.check_from.unwrap_or(DEFAULT_CHECK_FROM),
                idle_timeout,
                max_output_bytes: usize::try_from(max_output).unwrap_or(usize::MAX),
                slow_consumer: rely.slow_consumer.unwrap_or(DEFAULT_SLOW_CONSUMER),
                tls: rely_tls,
            },
        })
    }
}

fn validate_ws(
    ws: WsFile,
    events_on: bool,
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
    let window = |v: Option<u8>, k: &str| -> Result<u8, ConfigError> {
        match v {
            None => Ok(crate::protocol::deflate::MAX_BITS),
            Some(b) if (9..=15).contains(&b) => Ok(b),
            Some(b) => Err(err(
                &format!("websocket.{k}"),
                format!("{b} is outside 9..=15 (zlib cannot deflate with 8)"),
            )),
        }
    };
    let policy = |mode| crate::protocol::deflate::Policy {
        mode,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    let mut section = policy(
        ws.compression
            .unwrap_or(crate::protocol::deflate::Mode::Off),
    );
    section.server_max_window_bits = window(ws.server_max_window_bits, "server_max_window_bits")?;
    section.client_max_window_bits = window(ws.client_max_window_bits, "client_max_window_bits")?;
    let level = ws.compression_level.unwrap_or(DEFAULT_WS_COMPRESSION_LEVEL);
    if !(1..=9).contains(&level) {
        return Err(err(
            "websocket.compression_level",
            format!("{level} is outside 1..=9"),
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
        let session = match e.wsproxy {
            None => None,
            Some(s) => {
                let s = s
                    .validate()
                    .map_err(|(k, m)| err(&key(&format!("wsproxy.{k}")), m))?;
                if !params.contains(&s.param) {
                    return Err(err(
                        &key("wsproxy.session_param"),
                        format!("parameter {:?} is not in the path", s.param),
                    ));
                }
                Some(s)
            }
        };
        let mut tag_params = tag_params;
        if let Some(s) = &session {
            // The session id is always a tag: it names the session's
            // sockets to the admin API and keeps its :up channel's name.
            if !tag_params.contains(&s.param) {
                tag_params.push(s.param.clone());
            }
        }
        let max = e.max_message_size.map_or(DEFAULT_WS_MAX_MESSAGE, |s| s.0);
        if max == 0 || max > MAX_MAX_PAYLOAD {
            return Err(err(
                &key("max_message_size"),
                format!("{max} is outside 1..=1GiB"),
            ));
        }
        let mut json_vars = Vec::new();
        for (v, path) in e.json_extract_vars.unwrap_or_default() {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(
                    &key("json_extract_vars"),
                    format!("{v:?}: a variable name is letters, digits and _"),
                ));
            }
            json_vars.push((v, crate::engine::events::split_json_path(&path)));
        }
        endpoints.push(Endpoint {
            path: e.path,
            template,
            on_message,
            max_message_size: max as usize,
            set_tags: e.set_tags.unwrap_or_default().into_iter().collect(),
            tag_params,
            id_param: e.id_param,
            id_prefix: e.id_prefix.unwrap_or_default(),
            broadcast_tag: e.broadcast_tag,
            events: e.events.unwrap_or(events_on) && session.is_none(),
            stream_include_tags: e.stream_include_tags.unwrap_or_default(),
            json_vars,
            allowed_origins: e
                .allowed_origins
                .unwrap_or_default()
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            session,
            compression: crate::protocol::deflate::Policy {
                mode: e.compression.unwrap_or(section.mode),
                ..section
            },
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
        tls: match ws.tls {
            None => None,
            Some(t) => Some(
                t.validate()
                    .map_err(|(k, m)| err(&format!("websocket.tls.{k}"), m))?,
            ),
        },
        compression: section,
        compression_min_size: ws
            .compression_min_size
            .map_or(DEFAULT_WS_COMPRESSION_MIN_SIZE, |s| s.0)
            as usize,
        compression_level: level,
    })
}

/// Two listeners on one port would both bind (every group uses
/// SO_REUSEPORT) and share its connections at random, or fail at start:
/// refused here, naming the second one. Port 0 (a free port each) never
/// clashes; an unspecified address clashes with any address of its family.
fn check_listeners(
    listeners: &[(String, SocketAddr)],
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for (i, (key, a)) in listeners.iter().enumerate() {
        if a.port() == 0 {
            continue;
        }
        let clash = listeners[..i].iter().find(|(_, b)| {
            b.port() == a.port()
                && a.is_ipv4() == b.is_ipv4()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        });
        if let Some((first, b)) = clash {
            return Err(err(
                key,
                format!("{a} overlaps {first} ({b}): each listener needs its own port"),
            ));
        }
    }
    Ok(())
}

/// A log filter as env_logger reads it: comma-separated `level` or
/// `target=level` directives, each level one of off, error, warn, info,
/// debug, trace. (A bare target, which env_logger also takes, is refused.)
pub fn check_log_level(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let mut any = false;
    for d in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        any = true;
        let level = d
            .rsplit_once('=')
            .map_or(d, |(target, l)| if target.is_empty() { "" } else { l });
        let is_level = LEVELS.iter().any(|x| x.eq_ignore_ascii_case(level));
        // env_logger would take a bare word that is no level as a target
        // at trace, silencing the rest: a typo (`verbose`) must not do that.
        if !is_level {
            return Err(format!(
                "`{d}` is not a level (off, error, warn, info, debug, trace) or target=level"
            ));
        }
    }
    if any {
        Ok(())
    } else {
        Err("is empty (a level such as `info`, or leave it out)".into())
    }
}

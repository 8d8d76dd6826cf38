//! Live reload's rules: which settings of a re-read config the running
//! server takes at once, and which wait for a restart (they are kept as
//! running, and named).
//!
//! Live: limits (`max_connections`, `max_memory`, `send_timeout`,
//! `shutdown_grace`, each section's output limit, slow-consumer policy,
//! payload and message sizes, timeouts), the admin allow-list and request
//! settings, each endpoint's tags and options, `performance`, `log_level`,
//! and sources added, removed or changed (see [`merge_sources`]). TLS
//! certificates are re-read in place (`ServerTls::reload`).
//!
//! Restart: what a listener, a thread or a connection already made was
//! built from: workers and CPUs, listen addresses, TLS on or off, the set
//! of endpoint paths, the compression level, the Veltix listeners, Redis,
//! events, sync and cluster, and the log format.

use super::{Config, SourceConfig};

/// A re-read config merged into the running one.
#[derive(Debug)]
pub struct Merged {
    /// What the server runs from now on.
    pub live: Config,
    /// Settings that changed and apply now.
    pub applied: Vec<&'static str>,
    /// Settings that changed but stay as running until a restart.
    pub restart: Vec<&'static str>,
    /// Sources whose feed is to be dialled again (`SourceSlots::redial`).
    pub redial: Vec<u16>,
}

/// Debug text, the one comparison every config type has (ServerTls and
/// rustls settings print their file names, not key material).
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Keeps the running value of a restart-only setting, naming it in
/// `restart` if the file changed it.
fn keep<T: std::fmt::Debug + Clone>(
    name: &'static str,
    live: &mut T,
    running: &T,
    restart: &mut Vec<&'static str>,
) {
    if !same(live, running) {
        restart.push(name);
        *live = running.clone();
    }
}

/// Merges `new` into `running`: restart-only settings keep their running
/// values.
pub fn merge(running: &Config, new: Config) -> Merged {
    let mut live = new;
    let mut restart = Vec::new();
    let r = &mut restart;
    keep("workers", &mut live.workers, &running.workers, r);
    keep("pin", &mut live.pin, &running.pin, r);
    keep("cpus", &mut live.cpus, &running.cpus, r);
    keep("busy_poll", &mut live.busy_poll, &running.busy_poll, r);
    keep(
        "read_buffer",
        &mut live.read_buffer,
        &running.read_buffer,
        r,
    );
    keep(
        "mesh_capacity",
        &mut live.mesh_capacity,
        &running.mesh_capacity,
        r,
    );
    keep("backlog", &mut live.backlog, &running.backlog, r);
    keep(
        "accept_batch",
        &mut live.accept_batch,
        &running.accept_batch,
        r,
    );
    keep("log_format", &mut live.log_format, &running.log_format, r);
    keep(
        "rely.listen",
        &mut live.rely.listen,
        &running.rely.listen,
        r,
    );
    keep("rely.tls", &mut live.rely.tls, &running.rely.tls, r);
    keep("veltix", &mut live.veltix, &running.veltix, r);
    keep("redis", &mut live.redis, &running.redis, r);
    keep(
        "redis_extra",
        &mut live.redis_extra,
        &running.redis_extra,
        r,
    );
    keep("events", &mut live.events, &running.events, r);
    keep("sync", &mut live.sync, &running.sync, r);
    keep("cluster", &mut live.cluster, &running.cluster, r);
    match (&mut live.websocket, &running.websocket) {
        (Some(l), Some(w)) => {
            keep("websocket.listen", &mut l.listen, &w.listen, r);
            keep("websocket.tls", &mut l.tls, &w.tls, r);
            let level = "websocket.compression_level";
            keep(level, &mut l.compression_level, &w.compression_level, r);
            // Endpoints are rows of per-core tables (counters, selectors):
            // their options change live, their set and order do not.
            let paths = |w: &super::WsConfig| {
                w.endpoints
                    .iter()
                    .map(|e| e.path.clone())
                    .collect::<Vec<_>>()
            };
            if paths(l) != paths(w) {
                r.push("websocket.endpoints (paths)");
                l.endpoints = w.endpoints.clone();
            }
        }
        (None, None) => {}
        _ => keep("websocket", &mut live.websocket, &running.websocket, r),
    }
    match (&mut live.admin, &running.admin) {
        (Some(l), Some(a)) => {
            keep("admin.listen", &mut l.listen, &a.listen, r);
            // Whether the listener was defaulted belongs to the one bound.
            l.listen_defaulted = a.listen_defaulted;
            keep("admin.tls", &mut l.tls, &a.tls, r);
        }
        (None, None) => {}
        _ => keep("admin", &mut live.admin, &running.admin, r),
    }
    let sources = merge_sources(&running.sources, std::mem::take(&mut live.sources));
    live.sources = sources.slots;
    let mut applied = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            applied.push(name);
        }
    };
    check(
        "max_connections",
        live.max_connections == running.max_connections,
    );
    check("max_memory", live.max_memory == running.max_memory);
    check("send_timeout", live.send_timeout == running.send_timeout);
    check(
        "shutdown_grace",
        live.shutdown_grace == running.shutdown_grace,
    );
    check("rely", same(&live.rely, &running.rely));
    check("websocket", same(&live.websocket, &running.websocket));
    check("admin", same(&live.admin, &running.admin));
    check("performance", same(&live.performance, &running.performance));
    check("log_level", live.log_level == running.log_level);
    check("sources", same(&live.sources, &running.sources));
    live.source = running.source.clone();
    Merged {
        live,
        applied,
        restart,
        redial: sources.redial,
    }
}

/// Where a source's clients connect. With a fixed address or a socket
/// path that is enough; a source on port 0 (tests) or with neither is also
/// known by its URL.
fn client_side(s: &SourceConfig) -> impl PartialEq + '_ {
    let by_url = s
        .websocket
        .map_or(s.unix_socket.is_none(), |a| a.port() == 0);
    (
        s.websocket,
        s.unix_socket.as_deref(),
        by_url.then_some(s.url.as_str()),
    )
}

/// What the server sends and offers the feed: when it changes, the feed
/// is dialled again.
fn feed_side(s: &SourceConfig) -> impl PartialEq + '_ {
    (
        &s.target,
        &s.headers,
        s.compression,
        s.connect_timeout,
        s.tls.is_some(),
    )
}

/// The running sources' slots, re-matched against a re-read file.
#[derive(Debug)]
pub struct SourceSlots {
    /// One per slot: a running slot keeps its number; sources new in the
    /// file take new slots at the end; a running source the file no longer
    /// has stays as a retired slot.
    pub slots: Vec<SourceConfig>,
    /// Kept slots whose feed settings changed: dial the feed again (their
    /// clients stay connected).
    pub redial: Vec<u16>,
}

/// Sources across a reload. A source of the file is the running one with
/// the same client side (WebSocket address, Unix socket path): its clients
/// stay connected, its other settings apply, and its feed is dialled again
/// if the URL, headers, compression or timeout changed. A running source
/// the file lacks is retired (its clients are closed, its listeners
/// closed); a file source with no running match is added.
pub fn merge_sources(running: &[SourceConfig], new: Vec<SourceConfig>) -> SourceSlots {
    let mut slots: Vec<SourceConfig> = running
        .iter()
        .map(|r| SourceConfig {
            retired: true,
            ..r.clone()
        })
        .collect();
    let mut redial = Vec::new();
    for n in new {
        let found = running
            .iter()
            .enumerate()
            .position(|(i, r)| !r.retired && slots[i].retired && client_side(r) == client_side(&n));
        match found {
            Some(i) => {
                if feed_side(&running[i]) != feed_side(&n) {
                    redial.push(i as u16);
                }
                slots[i] = n;
            }
            None => slots.push(n),
        }
    }
    SourceSlots { slots, redial }
}

//! Per-core counters. Each core is the only writer of its own
//! [`CoreMetrics`], so an increment is a plain load and store (no locked
//! instruction on the hot path); any thread may read them for reports.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A counter written by one thread and read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one. Only the owning core may call this.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`. Only the owning core may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    /// Sets a gauge. Only the owning core may call this.
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// One core's counters.
        #[derive(Debug, Default)]
        pub struct CoreMetrics { $( $(#[$doc])* pub $name: Counter, )* }

        /// A point-in-time copy of counters (one core or summed).
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct Snapshot { $( $(#[$doc])* pub $name: u64, )* }

        impl CoreMetrics {
            /// Copies the counters.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.get(), )* }
            }
        }

        impl Snapshot {
            /// Adds another snapshot into this one.
            pub fn add(&mut self, o: &Snapshot) {
                $( self.$name += o.$name; )*
            }
            /// (name, value) pairs, for text reports.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }
    };
}

metrics! {
    /// Open connections (gauge).
    connections,
    /// Connections accepted.
    accepted,
    /// Connections closed for any reason.
    closed,
    /// Connections refused because the core was at its connection limit.
    rejected_limit,
    /// accept(2) failures (EMFILE and friends); the listener pauses.
    accept_errors,
    /// Frames decoded.
    frames_in,
    /// Bytes read from sockets.
    bytes_in,
    /// Bytes written to sockets.
    bytes_out,
    /// Socket flushes (each one writev run; messages per flush show how
    /// well writes are batched).
    flushes,
    /// Messages queued for a local or remote connection.
    delivered,
    /// Messages handed to another core.
    cross_core,
    /// Heartbeats received.
    heartbeats,
    /// Transfers to an id nobody is logged in as (discarded).
    dropped_offline,
    /// Messages for a connection that closed or whose slot was reused.
    dropped_dead_conn,
    /// Messages dropped by the `drop` slow-consumer policy.
    slow_consumer_drop,
    /// Connections closed by the `disconnect` slow-consumer policy.
    slow_consumer_disconnect,
    /// Connections closed because a newer login took their id.
    kicked_login,
    /// Connections closed for malformed frames.
    protocol_errors,
    /// Transfers before login (closed).
    not_logged_in,
    /// Transfers whose FromClientID is not the login id (closed).
    spoofed_from,
    /// Connections closed for inactivity.
    idle_timeouts,
    /// WebSocket upgrades completed.
    ws_upgrades,
    /// Upgrade requests refused with a 4xx.
    ws_handshake_errors,
    /// Connections that did not complete the upgrade in time.
    ws_handshake_timeouts,
    /// WebSocket messages received.
    ws_messages_in,
    /// WebSocket messages discarded (`on_message: none`, or nothing to
    /// broadcast to).
    ws_discarded,
    /// Frames queued by fan-outs (one per receiving connection).
    fanout_deliveries,
    /// Connections refused because queued bytes were over `max_memory`.
    rejected_memory,
    /// Largest queues cut because queued bytes were over `max_memory`.
    memory_cuts,
    /// Connections closed because their socket took none of the queued
    /// output for `send_timeout`.
    write_timeouts,
    /// WebSocket connections closed for an unanswered ping.
    ws_ping_timeouts,
    /// Cross-core batches that found the channel full and waited locally
    /// (counted once per iteration they waited).
    mesh_overflow,
    /// Loop iterations in which reading was paused because a cross-core
    /// channel was full.
    mesh_backpressure,
    /// Bytes queued in output buffers (gauge, updated each iteration).
    queued_bytes,
    /// Event-loop iterations.
    loop_iterations,
    /// The Redis command connection is up (gauge, 0 or 1).
    redis_cmd_up,
    /// The Redis subscription connection is up (gauge, 0 or 1).
    redis_sub_up,
    /// Redis connections lost after they were up.
    redis_reconnects,
    /// Redis requests sent (or buffered to send).
    redis_requests,
    /// Redis requests waiting for their reply (gauge).
    redis_in_flight,
    /// Redis replies received.
    redis_replies,
    /// Nanoseconds from request to reply, summed (divide by
    /// redis_replies for the mean).
    redis_reply_ns,
    /// Commands dropped because Redis was away or its buffer full
    /// (publishes to `:up` among them).
    redis_dropped,
    /// Error replies from Redis.
    redis_errors,
    /// Connections dropped because a reply did not come in time.
    redis_timeouts,
    /// Connections dropped for a malformed, unexpected or oversized reply.
    redis_bad_replies,
    /// Messages received on subscribed channels.
    redis_messages,
    /// Channels this core subscribes (gauge).
    redis_channels,
    /// wsproxy session sockets open (gauge).
    session_sockets,
    /// Client events (and sync writes) Redis accepted.
    events_written,
    /// Client events Redis refused (an error reply).
    events_failed,
    /// Client events dropped: the buffer was full while Redis was away,
    /// or they were in flight on a connection that was lost.
    events_dropped,
    /// Session upgrades refused (401, 403, 500, 503, 504).
    session_refused,
    /// Client messages published to a session's `:up` channel.
    session_up,
    /// Client text messages that were not JSON (answered with an error).
    session_invalid_json,
    /// Client binary messages ignored (wsproxy takes text only).
    session_binary_ignored,
    /// Nanoseconds spent working (not waiting in epoll) in iterations.
    loop_busy_ns,
    /// Cross-core batches waiting in this core's channel (gauge).
    mesh_queue_depth,
    /// Veltix frames received (verified).
    veltix_frames_in,
    /// Veltix frames sent (echoes, pongs, pings and hub deliveries).
    veltix_frames_out,
    /// Veltix frames dropped as corrupt (bad magic, CRC or hash, over the
    /// size limit, a system type that does not exist); the connection stays.
    veltix_corrupt,
    /// Veltix pings answered.
    veltix_pings,
    /// Veltix frames discarded (`on_message: none`).
    veltix_discarded,
    /// Veltix clients refused because their listener was full.
    veltix_refused_full,
    /// Client messages for a source that was down (dropped).
    source_dropped,
    /// Client messages written upstream.
    source_out,
    /// Messages received from upstream sources.
    source_in,
    /// Upstream connection attempts after the first.
    source_reconnects,
    /// Admin API requests handled.
    admin_requests,
    /// Admin API requests refused (4xx).
    admin_errors,
}

/// One upstream source's state and counters, written by its owner core.
#[derive(Debug, Default)]
pub struct SourceStatus {
    /// [`SourceStatus::STATES`] index.
    pub state: Counter,
    /// Messages received from the source.
    pub messages_in: Counter,
    /// Client messages written to the source.
    pub messages_out: Counter,
    /// Client messages dropped while it was down.
    pub dropped: Counter,
    /// Connections lost (each followed by a reconnect, unless failed).
    pub reconnects: Counter,
}

impl SourceStatus {
    /// State names by index.
    pub const STATES: [&'static str; 5] = ["down", "resolving", "connecting", "up", "failed"];
    /// Waiting to reconnect.
    pub const DOWN: u64 = 0;
    /// Resolving the host.
    pub const RESOLVING: u64 = 1;
    /// Connecting or upgrading.
    pub const CONNECTING: u64 = 2;
    /// Open.
    pub const UP: u64 = 3;
    /// reconnect_max_attempts reached.
    pub const FAILED: u64 = 4;

    /// The state's name.
    pub fn state_name(&self) -> &'static str {
        Self::STATES
            .get(self.state.get() as usize)
            .copied()
            .unwrap_or("down")
    }
}

/// (name, Prometheus type, value) of one per-source series.
type Series = (&'static str, &'static str, fn(&SourceStatus) -> u64);

/// Prometheus lines for sources (label: the URL).
pub fn prometheus_sources(out: &mut String, urls: &[String], sources: &[SourceStatus]) {
    use std::fmt::Write;
    let series: [Series; 5] = [
        ("source_up", "gauge", |s| {
            u64::from(s.state.get() == SourceStatus::UP)
        }),
        ("source_messages_in", "counter", |s| s.messages_in.get()),
        ("source_messages_out", "counter", |s| s.messages_out.get()),
        ("source_dropped", "counter", |s| s.dropped.get()),
        ("source_reconnects", "counter", |s| s.reconnects.get()),
    ];
    for (name, kind, f) in series {
        let _ = writeln!(out, "# TYPE corerelay_{name}_by_source {kind}");
        // Labelled by index in the config, not by URL: a URL can carry a
        // token (`/status` lists each index with its masked URL).
        for (i, s) in sources.iter().enumerate().take(urls.len()) {
            let _ = writeln!(out, "corerelay_{name}_by_source{{source=\"{i}\"}} {}", f(s));
        }
    }
}

/// Counters that are levels, not totals.
const GAUGES: [&str; 8] = [
    "connections",
    "queued_bytes",
    "mesh_queue_depth",
    "redis_cmd_up",
    "redis_sub_up",
    "redis_in_flight",
    "redis_channels",
    "session_sockets",
];

/// Renders every core's counters in the Prometheus text format, one series
/// per core (`core` label).
pub fn prometheus(cores: &[CoreMetrics]) -> String {
    use std::fmt::Write;
    let snaps: Vec<Snapshot> = cores.iter().map(CoreMetrics::snapshot).collect();
    let mut out = String::with_capacity(64 * 40 * cores.len().max(1));
    let names: Vec<&'static str> = Snapshot::default()
        .pairs()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (i, name) in names.iter().enumerate() {
        let kind = if GAUGES.contains(name) {
            "gauge"
        } else {
            "counter"
        };
        let _ = writeln!(out, "# TYPE corerelay_{name} {kind}");
        for (core, s) in snaps.iter().enumerate() {
            let _ = writeln!(
                out,
                "corerelay_{name}{{core=\"{core}\"}} {}",
                s.pairs()[i].1
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text() {
        let cores = [CoreMetrics::default(), CoreMetrics::default()];
        cores[1].connections.set(3);
        cores[0].accepted.add(7);
        let t = prometheus(&cores);
        assert!(t.contains("# TYPE corerelay_connections gauge\ncorerelay_connections{core=\"0\"} 0\ncorerelay_connections{core=\"1\"} 3\n"));
        assert!(t.contains("# TYPE corerelay_accepted counter\ncorerelay_accepted{core=\"0\"} 7\n"));
    }
}

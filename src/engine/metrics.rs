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
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// One core's counters.
        #[derive(Debug, Default)]
        pub struct CoreMetrics { $( $(#[doc = $doc])* pub $name: Counter, )* }

        /// A point-in-time copy of counters (one core or summed).
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct Snapshot { $( $(#[doc = $doc])* pub $name: u64, )* }

        /// (name, help) of every counter, in order: the doc comments above
        /// are the HELP text of /metrics.
        pub const HELP: &[(&str, &str)] = &[ $( (stringify!($name), concat!($($doc),*)), )* ];

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
    /// Upgrades that agreed on permessage-deflate.
    ws_compression_agreed,
    /// Bytes given to a compressor: once per core for a broadcast to
    /// `shared` connections, once per connection for `dedicated` ones.
    ws_compressor_input_bytes,
    /// Bytes a compressor produced for those.
    ws_compressor_output_bytes,
    /// Compressed messages that were not valid deflate data (closed 1007).
    ws_inflate_errors,
    /// Upgrade requests refused with a 4xx.
    ws_handshake_errors,
    /// Connections that did not complete the upgrade in time.
    ws_handshake_timeouts,
    /// Upgrades refused because their Origin is not allowed (403).
    ws_origin_refused,
    /// TLS connections closed for a failed handshake or a bad record.
    tls_errors,
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
    /// Events published to the AMQP broker (events.amqp).
    amqp_published,
    /// Events the AMQP broker confirmed.
    amqp_confirmed,
    /// Events the AMQP broker returned as unroutable (no queue took them).
    amqp_returned,
    /// Events the AMQP broker refused (basic.nack).
    amqp_nacked,
    /// Events dropped because the AMQP buffer was full.
    amqp_dropped,
    /// Events waiting for the AMQP broker (unsent and unconfirmed).
    amqp_buffered,
    /// 1 while this core's AMQP connection is up.
    amqp_up,
    /// AMQP connections lost after they were up.
    amqp_reconnects,
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
    /// Transfers sent to another node (its PUBLISH reached a subscriber).
    cluster_out,
    /// Transfers from another node delivered here.
    cluster_in,
    /// Transfers for another node lost: over the cluster's message cap, or
    /// Redis away or failing (at most once).
    cluster_dropped,
    /// Logins here closed because another node took their id.
    cluster_kicks,
    /// Admin calls sent to the other nodes.
    cluster_surveys,
    /// Other nodes' admin calls run here.
    cluster_surveys_in,
    /// Admin calls answered without every node (the survey timeout).
    cluster_survey_timeouts,
    /// Admin API requests handled.
    admin_requests,
    /// Admin API requests refused (4xx).
    admin_errors,
}

/// Every source slot's status, by slot (`SourceConfig::retired` slots
/// included). Each core holds one; a reload hands out a longer one that
/// shares the kept sources' counters.
pub type SourceTable = std::sync::Arc<[std::sync::Arc<SourceStatus>]>;

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

/// One endpoint's permessage-deflate traffic on one core: payload bytes of
/// compressed messages before and after compression, each way.
#[derive(Debug, Default)]
pub struct DeflateStats {
    /// Sent compressed: the messages' own bytes.
    pub out_plain: Counter,
    /// Sent compressed: what went on the wire.
    pub out_wire: Counter,
    /// Received compressed: what came on the wire.
    pub in_wire: Counter,
    /// Received compressed: the inflated messages.
    pub in_plain: Counter,
}

/// Prometheus lines for permessage-deflate per endpoint (`names`: one per
/// row, the endpoints' paths then the sources' clients), summed over cores
/// (`stats` holds `names.len()` rows per core).
pub fn prometheus_deflate(out: &mut String, names: &[String], stats: &[DeflateStats]) {
    use std::fmt::Write;
    type Row = (&'static str, &'static str, fn(&DeflateStats) -> u64);
    let series: [Row; 4] = [
        (
            "ws_deflate_sent_plain_bytes",
            "Bytes of messages sent compressed, before compression.",
            |s| s.out_plain.get(),
        ),
        (
            "ws_deflate_sent_wire_bytes",
            "Bytes of messages sent compressed, as sent.",
            |s| s.out_wire.get(),
        ),
        (
            "ws_deflate_received_wire_bytes",
            "Bytes of compressed messages received, as received.",
            |s| s.in_wire.get(),
        ),
        (
            "ws_deflate_received_plain_bytes",
            "Bytes of compressed messages received, inflated.",
            |s| s.in_plain.get(),
        ),
    ];
    if names.is_empty() {
        return;
    }
    for (name, help, f) in series {
        let full = format!("corerelay_{name}_total");
        family(out, &full, "counter", help);
        for (row, n) in names.iter().enumerate() {
            let v: u64 = stats.iter().skip(row).step_by(names.len()).map(f).sum();
            let n = n.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "{full}{{endpoint=\"{n}\"}} {v}");
        }
    }
}

/// (name, Prometheus type, help, value) of one per-source series.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SourceStatus) -> u64,
);

/// One family's HELP and TYPE lines. HELP text is escaped as the text
/// format asks (backslash and newline).
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = help.replace('\\', "\\\\");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Prometheus lines for sources, labelled by index in the config, not by
/// URL: a URL can carry a token (`/status` lists each index with its
/// masked URL).
pub fn prometheus_sources<'s>(
    out: &mut String,
    sources: impl Iterator<Item = (usize, &'s SourceStatus)> + Clone,
) {
    use std::fmt::Write;
    let series: [Series; 5] = [
        (
            "source_up",
            "gauge",
            "1 while the source's connection is open.",
            |s| u64::from(s.state.get() == SourceStatus::UP),
        ),
        (
            "source_messages_in",
            "counter",
            "Messages received from the source.",
            |s| s.messages_in.get(),
        ),
        (
            "source_messages_out",
            "counter",
            "Client messages written to the source.",
            |s| s.messages_out.get(),
        ),
        (
            "source_dropped",
            "counter",
            "Client messages dropped while the source was down.",
            |s| s.dropped.get(),
        ),
        (
            "source_reconnects",
            "counter",
            "Connections to the source lost.",
            |s| s.reconnects.get(),
        ),
    ];
    for (name, kind, help, f) in series {
        let full = if kind == "counter" {
            format!("corerelay_{name}_by_source_total")
        } else {
            format!("corerelay_{name}_by_source")
        };
        family(out, &full, kind, help);
        for (i, s) in sources.clone() {
            let _ = writeln!(out, "{full}{{source=\"{i}\"}} {}", f(s));
        }
    }
}

/// Counters that are levels, not totals.
const GAUGES: [&str; 10] = [
    "amqp_buffered",
    "amqp_up",
    "connections",
    "queued_bytes",
    "mesh_queue_depth",
    "redis_cmd_up",
    "redis_sub_up",
    "redis_in_flight",
    "redis_channels",
    "session_sockets",
];

/// The exported name of counter `name`, and the divisor to its base unit:
/// counters end in `_total`; nanosecond sums become seconds.
fn exported(name: &str) -> (String, Option<f64>) {
    if GAUGES.contains(&name) {
        return (format!("corerelay_{name}"), None);
    }
    match name.strip_suffix("_ns") {
        Some(stem) => (format!("corerelay_{stem}_seconds_total"), Some(1e9)),
        None => (format!("corerelay_{name}_total"), None),
    }
}

/// Renders every core's counters in the Prometheus text format, one series
/// per core (`core` label), each family with HELP and TYPE.
pub fn prometheus(cores: &[CoreMetrics]) -> String {
    use std::fmt::Write;
    let snaps: Vec<Vec<(&'static str, u64)>> = cores.iter().map(|c| c.snapshot().pairs()).collect();
    let mut out = String::with_capacity(64 * 60 * cores.len().max(1));
    for (i, (name, help)) in HELP.iter().enumerate() {
        let kind = if GAUGES.contains(name) {
            "gauge"
        } else {
            "counter"
        };
        let (full, div) = exported(name);
        family(&mut out, &full, kind, help);
        for (core, s) in snaps.iter().enumerate() {
            let v = s[i].1;
            let _ = match div {
                Some(d) => writeln!(out, "{full}{{core=\"{core}\"}} {}", v as f64 / d),
                None => writeln!(out, "{full}{{core=\"{core}\"}} {v}"),
            };
        }
    }
    out
}

/// The standard process metrics (`process_*`, as the Prometheus client
/// libraries name them) from /proc, and `corerelay_build_info`. Reading
/// /proc is a few in-memory syscalls, not blocking I/O.
pub fn prometheus_process(out: &mut String) {
    use std::fmt::Write;
    // SAFETY: sysconf only reads a system constant.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    if let (Some(u), Some(s)) = (field(14), field(15)) {
        family(
            out,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
        );
        let _ = writeln!(out, "process_cpu_seconds_total {}", (u + s) as f64 / tick);
    }
    if let Some(rss) = field(24) {
        family(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {}", rss * page);
    }
    if let Some(vsz) = field(23) {
        family(
            out,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
        );
        let _ = writeln!(out, "process_virtual_memory_bytes {vsz}");
    }
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        family(
            out,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
        );
        let _ = writeln!(out, "process_open_fds {}", d.count());
    }
    if let Ok(l) = crate::sys::file_limit() {
        family(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
        );
        let _ = writeln!(out, "process_max_fds {}", l.soft);
    }
    let btime = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
    });
    if let (Some(b), Some(start)) = (btime, field(22)) {
        family(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {}",
            b as f64 + start as f64 / tick
        );
    }
    family(
        out,
        "corerelay_build_info",
        "gauge",
        "The running version; always 1.",
    );
    let _ = writeln!(
        out,
        "corerelay_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
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
        assert!(t.contains("# TYPE corerelay_connections gauge\ncorerelay_connections{core=\"0\"} 0\ncorerelay_connections{core=\"1\"} 3\n"), "{t}");
        assert!(t.contains("# HELP corerelay_accepted_total Connections accepted.\n# TYPE corerelay_accepted_total counter\ncorerelay_accepted_total{core=\"0\"} 7\n"), "{t}");
        cores[0].loop_busy_ns.add(1_500_000_000);
        let t = prometheus(&cores);
        assert!(
            t.contains("corerelay_loop_busy_seconds_total{core=\"0\"} 1.5\n"),
            "{t}"
        );
    }
}

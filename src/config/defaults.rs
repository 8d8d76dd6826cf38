//! Every `DEFAULT_*` of the config, with why it is that number. Each is
//! documented once more, for users, in config.yaml.example.

use std::time::Duration;

use super::SlowConsumer;

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
/// Server-wide connection limit (split evenly across workers), when the
/// file limit allows it; otherwise the file limit less [`FD_RESERVE`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_000_000;
/// Descriptors kept out of the default connection limit: listeners (one
/// per worker per address), polls, wakers, Unix sockets, upstream and
/// resolver connections, log files.
pub const FD_RESERVE: usize = 256;
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
/// A connection whose socket takes none of its queued output for this long
/// is closed, even under its byte limit (nginx's send_timeout).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful shutdown may spend flushing queued output.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// listen(2) backlog per listener.
pub const DEFAULT_BACKLOG: i32 = 4096;

/// wsgateway's WebSocket listener.
pub const DEFAULT_WS_LISTEN: &str = "0.0.0.0:5000";
/// A connection must complete its HTTP upgrade within this (slowloris).
pub const DEFAULT_WS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP request head accepted for an upgrade.
pub const DEFAULT_WS_MAX_HANDSHAKE_BYTES: u64 = 8 * 1024;
/// Server ping interval (wsproxy: WS_PING_INTERVAL_SECS=30).
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Close when a ping is not answered within this (wsproxy: 10 s).
pub const DEFAULT_WS_PONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message (after reassembly) per endpoint unless set.
pub const DEFAULT_WS_MAX_MESSAGE: u64 = 1024 * 1024;
/// Output queue byte limit per WebSocket connection.
pub const DEFAULT_WS_MAX_OUTPUT_BYTES: u64 = 16 * 1024 * 1024;
/// Messages shorter than this are not worth deflating: the 2-9 bytes of
/// block overhead and the CPU buy nothing (Node's ws uses 1 KiB; JSON
/// ticks of a few hundred bytes still shrink 2-3 times, so lower).
pub const DEFAULT_WS_COMPRESSION_MIN_SIZE: u64 = 128;
/// zlib's default level: near level 9's ratio at a third of its CPU. A
/// broadcast is compressed once per core, so its cost is per message, not
/// per subscriber.
pub const DEFAULT_WS_COMPRESSION_LEVEL: u32 = 6;

/// wsgateway's admin API address (loopback only by default).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:6666";
/// Networks allowed to use the admin API.
pub const DEFAULT_ADMIN_ALLOW: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// An admin request must arrive whole within this of its first byte.
pub const DEFAULT_ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest admin request (head and body).
pub const DEFAULT_ADMIN_MAX_REQUEST: u64 = 1024 * 1024;

/// Veylor: messages a client's queue may hold (Veylor documents but ignores
/// it; corerelay enforces it, with the slow-consumer policy).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1000;
/// Veylor: first reconnect delay; later ones double up to the cap.
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(5);
/// Reconnect backoff ceiling.
pub const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(60);
/// Veylor: 0 = retry forever.
pub const DEFAULT_RECONNECT_MAX_ATTEMPTS: u32 = 0;
/// A connection to a source must be open (TCP + upgrade) within this.
pub const DEFAULT_SOURCE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Unix socket file mode.
pub const DEFAULT_UNIX_SOCKET_MODE: u32 = 0o660;
/// Veylor binds source WebSocket servers on all interfaces.
pub const DEFAULT_SOURCE_WS_HOST: &str = "0.0.0.0";

/// Default slow-consumer policy: for a byte relay a silent gap is worse than
/// a reconnect, so the slow receiver is disconnected.
pub const DEFAULT_SLOW_CONSUMER: SlowConsumer = SlowConsumer::Disconnect;

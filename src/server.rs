//! `Server::start`: binds every listener (so bind errors surface before any
//! thread runs), builds the mesh, and spawns one pinned core thread per
//! worker. [`ServerHandle`] stops the server (gracefully) and reports on it;
//! [`Reloader`] hands the cores a re-read configuration.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::Config;
use crate::engine::core::{Core, CoreSetup, WAKER};
use crate::engine::directory::Directory;
use crate::engine::listener::{bind_group, bind_unix, ListenSock, ListenerKind};
use crate::engine::mesh::Inbox;
use crate::engine::metrics::{CoreMetrics, Snapshot};
use crate::engine::shared::Shared;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// A listener could not bind.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A Unix socket could not be bound (or a live process owns it).
    Unix {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Creating a poll, waker or thread failed.
    Io(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind { addr, source } => {
                write!(f, "cannot listen on {addr}: {source}")?;
                if source.kind() == io::ErrorKind::AddrInUse {
                    let p = addr.port();
                    write!(
                        f,
                        " (another server listens there: `ss -ltnp 'sport = :{p}'` names it; if nothing listens, a client socket in TIME_WAIT holds it and it frees within a minute: reserve the port with `sysctl net.ipv4.ip_local_reserved_ports={p}`, see tools/systemd/corerelay-ports.conf)"
                    )?;
                }
                Ok(())
            }
            StartError::Unix { path, source } => {
                write!(f, "cannot listen on {}: {source}", path.display())
            }
            StartError::Io(e) => write!(f, "cannot start: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Io(e)
    }
}

/// Where a listener binds.
#[derive(Debug)]
enum Bind {
    /// A TCP address, one SO_REUSEPORT socket per core.
    Tcp(SocketAddr),
    /// A Unix socket path with its mode, owned by one core (a Unix
    /// listener cannot be shared with SO_REUSEPORT).
    Unix {
        path: std::path::PathBuf,
        mode: u32,
        owner: usize,
    },
}

/// The listener table: one row per address the config asks for, saying
/// what the listener accepts. A new protocol adds its rows here.
fn listener_table(cfg: &Config) -> Vec<(ListenerKind, Bind)> {
    let mut rows = Vec::new();
    for &a in &cfg.rely.listen {
        rows.push((ListenerKind::Rely, Bind::Tcp(a)));
    }
    for &a in cfg.websocket.iter().flat_map(|w| &w.listen) {
        rows.push((ListenerKind::WebSocket, Bind::Tcp(a)));
    }
    for &a in cfg.admin.iter().flat_map(|a| &a.listen) {
        rows.push((ListenerKind::Admin, Bind::Tcp(a)));
    }
    for (i, v) in cfg.veltix.iter().enumerate() {
        rows.push((ListenerKind::Veltix(i as u16), Bind::Tcp(v.listen)));
    }
    for (i, src) in cfg.sources.iter().enumerate() {
        rows.extend(source_rows(i as u16, src, cfg.workers));
    }
    rows
}

/// A source's rows: its WebSocket address, and its Unix socket on its
/// owner core (`index % workers`). Used at start and for a source a reload
/// adds.
fn source_rows(
    i: u16,
    src: &crate::config::SourceConfig,
    workers: usize,
) -> Vec<(ListenerKind, Bind)> {
    let mut rows = Vec::new();
    if let Some(a) = src.websocket {
        rows.push((ListenerKind::SourceWs(i), Bind::Tcp(a)));
    }
    if let Some(path) = &src.unix_socket {
        let (path, mode, owner) = (path.clone(), src.unix_mode, i as usize % workers);
        rows.push((
            ListenerKind::SourceUnix(i),
            Bind::Unix { path, mode, owner },
        ));
    }
    rows
}

/// One row's sockets as (core, socket) pairs, and the address a TCP row
/// bound (port 0 resolved).
type RowSockets = (Vec<(usize, ListenSock)>, Option<SocketAddr>);

impl Bind {
    /// Binds the row: a TCP address once per core (SO_REUSEPORT), a Unix
    /// path on its owner core. Returns (core, socket) pairs and the address
    /// a TCP row bound (port 0 resolved).
    fn bind(&self, workers: usize, backlog: i32) -> Result<RowSockets, StartError> {
        match self {
            Bind::Tcp(addr) => {
                let (bound, group) =
                    bind_group(*addr, workers, backlog).map_err(|source| StartError::Bind {
                        addr: *addr,
                        source,
                    })?;
                let socks = group
                    .into_iter()
                    .enumerate()
                    .map(|(core, l)| (core, ListenSock::Tcp(mio::net::TcpListener::from_std(l))))
                    .collect();
                Ok((socks, Some(bound)))
            }
            Bind::Unix { path, mode, owner } => {
                let l = bind_unix(path, *mode).map_err(|source| StartError::Unix {
                    path: path.clone(),
                    source,
                })?;
                let sock = ListenSock::Unix(mio::net::UnixListener::from_std(l));
                Ok((vec![(*owner, sock)], None))
            }
        }
    }
}

/// The server.
pub struct Server;

impl Server {
    /// Binds, spawns the cores and returns once every listener is accepting.
    pub fn start(mut cfg: Config) -> Result<ServerHandle, StartError> {
        let workers = cfg.workers;
        let mut per_core: Vec<Vec<(ListenerKind, ListenSock)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut bound = Vec::new();
        let mut bound_veltix = Vec::new();
        let mut unix_paths = Vec::new();
        for (kind, bind) in listener_table(&cfg) {
            let (socks, addr) = match bind.bind(workers, cfg.backlog) {
                Ok(b) => b,
                // The admin API nobody asked for is best effort: a second
                // server on this host runs without it.
                Err(e)
                    if kind == ListenerKind::Admin
                        && cfg.admin.as_ref().is_some_and(|a| a.listen_defaulted) =>
                {
                    log::warn!(
                        "the default admin API is not available ({e}); running without it (set admin.listen to choose another address)"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(addr) = addr {
                bound.push((kind, addr));
                if let ListenerKind::Veltix(i) = kind {
                    // Port 0 resolved: /status and /metrics name the real one.
                    bound_veltix.push((i as usize, addr));
                }
            }
            if let Bind::Unix { path, .. } = bind {
                unix_paths.push(path);
            }
            for (core, l) in socks {
                per_core[core].push((kind, l));
            }
        }

        let as_read_veltix = cfg.veltix.iter().map(|v| v.listen).collect();
        for (i, addr) in bound_veltix {
            cfg.veltix[i].listen = addr;
        }
        let mut setups = Vec::with_capacity(workers);
        let mut inboxes = Vec::with_capacity(workers);
        for (index, listeners) in per_core.into_iter().enumerate() {
            let poll = mio::Poll::new()?;
            let waker = mio::Waker::new(poll.registry(), WAKER)?;
            let (inbox, rx) = Inbox::new(cfg.mesh_capacity, waker);
            inboxes.push(inbox);
            setups.push(CoreSetup {
                index,
                poll,
                rx,
                listeners,
            });
        }

        let cpus = resolve_cpus(&cfg);
        let shared = Arc::new(Shared {
            directory: Directory::new(workers),
            inboxes: inboxes.into(),
            metrics: (0..workers).map(|_| CoreMetrics::default()).collect(),
            sources: cfg
                .sources
                .iter()
                .map(|_| Arc::default())
                .collect::<Vec<_>>()
                .into(),
            veltix_clients: cfg.veltix.iter().map(|_| Default::default()).collect(),
            deflate: Shared::deflate_stats(&cfg, workers),
            cluster_nodes: Default::default(),
            cluster_known: AtomicUsize::new(0),
            cluster_heard: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            quiesced: AtomicUsize::new(0),
            cfg,
        });

        let mut threads = Vec::with_capacity(workers);
        for setup in setups {
            let index = setup.index;
            let core = Core::new(setup, shared.clone())?;
            let cpu = (!cpus.is_empty()).then(|| cpus[index % cpus.len()]);
            let t = std::thread::Builder::new()
                .name(format!("corerelay-core-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                            log::warn!("core {index}: could not pin to cpu {cpu}");
                        }
                    }
                    core.run();
                })
                .map_err(StartError::Io);
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.begin_shutdown();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(ServerHandle {
            shared,
            threads,
            bound,
            unix_paths: Arc::new(std::sync::Mutex::new(unix_paths)),
            cpus,
            as_read_veltix,
        })
    }
}

fn resolve_cpus(cfg: &Config) -> Vec<usize> {
    if !cfg.pin {
        return Vec::new();
    }
    if !cfg.cpus.is_empty() {
        return cfg.cpus.clone();
    }
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// A running server. Dropping it shuts the server down and waits.
pub struct ServerHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Every bound TCP address with what it accepts, in table order.
    bound: Vec<(ListenerKind, SocketAddr)>,
    /// Unix socket files to remove at exit (a reload adds and removes).
    unix_paths: Arc<std::sync::Mutex<Vec<std::path::PathBuf>>>,
    cpus: Vec<usize>,
    /// The Veltix addresses as the file gave them (port 0 before binding
    /// resolved it), so that a re-read file is compared like for like.
    as_read_veltix: Vec<SocketAddr>,
}

/// A cheap, cloneable way to begin shutdown from another thread (signals).
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Begins a graceful shutdown (idempotent).
    pub fn stop(&self) {
        self.0.begin_shutdown();
    }
}

impl ServerHandle {
    fn bound(&self, f: impl Fn(ListenerKind) -> bool) -> Vec<SocketAddr> {
        self.bound
            .iter()
            .filter(|(k, _)| f(*k))
            .map(|(_, a)| *a)
            .collect()
    }

    /// The bound RELY addresses, in config order.
    pub fn rely_addrs(&self) -> Vec<SocketAddr> {
        self.bound(|k| k == ListenerKind::Rely)
    }

    /// The bound WebSocket addresses, in config order.
    pub fn ws_addrs(&self) -> Vec<SocketAddr> {
        self.bound(|k| k == ListenerKind::WebSocket)
    }

    /// The bound admin API addresses, in config order.
    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        self.bound(|k| k == ListenerKind::Admin)
    }

    /// The bound Veltix addresses, in config order.
    pub fn veltix_addrs(&self) -> Vec<SocketAddr> {
        self.bound(|k| matches!(k, ListenerKind::Veltix(_)))
    }

    /// The bound addresses of sources' WebSocket servers, in config order
    /// (sources without one are skipped).
    pub fn source_ws_addrs(&self) -> Vec<SocketAddr> {
        self.bound(|k| matches!(k, ListenerKind::SourceWs(_)))
    }

    /// The CPUs workers are pinned to (empty: not pinned).
    pub fn cpus(&self) -> &[usize] {
        &self.cpus
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Begins a graceful shutdown: stop accepting, flush within the grace
    /// period, close. Returns at once; `wait` joins.
    pub fn shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// A handle for signal threads.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// A handle that applies re-read configurations (SIGHUP).
    pub fn reloader(&self) -> Reloader {
        Reloader {
            shared: self.shared.clone(),
            running: self.shared.cfg.clone(),
            as_read_veltix: self.as_read_veltix.clone(),
            table: self.shared.sources.clone(),
            unix_paths: self.unix_paths.clone(),
        }
    }

    /// Waits for every core to stop (after `shutdown`), then removes the
    /// Unix socket files.
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let paths = std::mem::take(&mut *self.unix_paths.lock().unwrap_or_else(|e| e.into_inner()));
        for p in paths {
            if let Err(e) = std::fs::remove_file(&p) {
                log::warn!("cannot remove {}: {e}", p.display());
            }
        }
    }

    /// Which core owns the connection logged in as `id`, if any.
    pub fn owner_core(&self, id: &[u8]) -> Option<usize> {
        self.shared.directory.lookup(id).map(|c| c.core as usize)
    }

    /// Counters summed over cores.
    pub fn metrics(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for m in self.shared.metrics.iter() {
            s.add(&m.snapshot());
        }
        s
    }

    /// One core's counters.
    pub fn core_metrics(&self, core: usize) -> Option<Snapshot> {
        self.shared.metrics.get(core).map(CoreMetrics::snapshot)
    }

    /// Ids currently logged in.
    pub fn logged_in(&self) -> usize {
        self.shared.directory.len()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.begin_shutdown();
        self.join();
    }
}

/// Applies re-read configurations to a running server: what can change
/// live goes to every core (each takes it between two loop iterations, so
/// no connection drops), the rest is named as needing a restart
/// (`config::merge`). Used from one thread (the signal thread); it may
/// block briefly, never a core.
pub struct Reloader {
    shared: Arc<Shared>,
    /// What the cores run now.
    running: Config,
    as_read_veltix: Vec<SocketAddr>,
    /// The cores' source table.
    table: crate::engine::metrics::SourceTable,
    unix_paths: Arc<std::sync::Mutex<Vec<std::path::PathBuf>>>,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Settings that changed and now apply.
    pub applied: Vec<&'static str>,
    /// Settings that changed and wait for a restart.
    pub restart: Vec<&'static str>,
    /// TLS certificates re-read: (section, certificate file, error if the
    /// old one stays).
    pub tls: Vec<(&'static str, std::path::PathBuf, Option<String>)>,
    /// Cores that did not take the new configuration, and why.
    pub failed: Vec<(usize, &'static str)>,
    /// Sources added: slot and (masked) URL.
    pub added: Vec<(u16, String)>,
    /// Sources removed: slot and URL.
    pub removed: Vec<(u16, String)>,
    /// Sources whose feed is dialled again.
    pub redialled: Vec<(u16, String)>,
    /// The added sources' WebSocket addresses, by slot (port 0 resolved).
    pub bound: Vec<(u16, SocketAddr)>,
    /// Sources that could not be added, and why.
    pub errors: Vec<String>,
}

/// How long a reload waits for room in a core's channel.
const RELOAD_SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Reloader {
    /// The configuration the cores run.
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Applies `new` (validated, as read from the file).
    pub fn apply(&mut self, mut new: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        // Listeners bound to port 0 compare as the file says them.
        for (v, (read, bound)) in new.veltix.iter_mut().zip(
            self.as_read_veltix
                .iter()
                .zip(self.running.veltix.iter().map(|v| v.listen)),
        ) {
            if v.listen == *read {
                v.listen = bound;
            }
        }
        // Certificates change in place: the next handshakes present what
        // the files hold now; sessions already open keep theirs.
        let sections = [
            (
                "rely",
                self.running.rely.tls.as_ref(),
                new.rely.tls.as_ref(),
            ),
            (
                "websocket",
                self.running.websocket.as_ref().and_then(|w| w.tls.as_ref()),
                new.websocket.as_ref().and_then(|w| w.tls.as_ref()),
            ),
            (
                "admin",
                self.running.admin.as_ref().and_then(|a| a.tls.as_ref()),
                new.admin.as_ref().and_then(|a| a.tls.as_ref()),
            ),
        ];
        let veltix = self
            .running
            .veltix
            .iter()
            .zip(&new.veltix)
            .map(|(old, now)| ("veltix", old.tls.as_ref(), now.tls.as_ref()));
        for (name, old, now) in sections.into_iter().chain(veltix) {
            if let (Some(old), Some(now)) = (old, now) {
                let err = old.reload(&now.cert, &now.key).err();
                report.tls.push((name, now.cert.clone(), err));
            }
        }
        let merged = crate::config::merge(&self.running, new);
        report.applied = merged.applied;
        report.restart = merged.restart;
        if report.applied.is_empty() {
            return report;
        }
        let mut live = merged.live;
        let workers = self.shared.inboxes.len();
        let mut per_core: Vec<Vec<(ListenerKind, ListenSock)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut new_paths = Vec::new();
        for i in self.running.sources.len()..live.sources.len() {
            let s = &mut live.sources[i];
            let bound = match u16::try_from(i) {
                Ok(n) => bind_source(n, s, workers, live.backlog),
                Err(_) => Err("no more source slots (65536 were used since start)".into()),
            };
            match bound {
                Ok(b) => {
                    for (core, row) in b.rows {
                        per_core[core].push(row);
                    }
                    report.bound.extend(b.addr);
                    new_paths.extend(b.path);
                    report.added.push((i as u16, s.url.clone()));
                }
                Err(e) => {
                    report
                        .errors
                        .push(format!("source {}: {e}; not added", s.url));
                    s.retired = true;
                }
            }
        }
        for (i, (was, now)) in self.running.sources.iter().zip(&live.sources).enumerate() {
            if !was.retired && now.retired {
                report.removed.push((i as u16, was.url.clone()));
            }
        }
        for &i in &merged.redial {
            if let Some(s) = live.sources.get(i as usize) {
                report.redialled.push((i, s.url.clone()));
            }
        }
        let table: crate::engine::metrics::SourceTable = self
            .table
            .iter()
            .cloned()
            .chain((self.table.len()..live.sources.len()).map(|_| Arc::default()))
            .collect::<Vec<_>>()
            .into();
        let live = Arc::new(live);
        for ((i, inbox), listeners) in self.shared.inboxes.iter().enumerate().zip(per_core) {
            let batch = crate::engine::mesh::Batch {
                reload: Some(Box::new(crate::engine::mesh::Reload {
                    cfg: live.clone(),
                    sources: table.clone(),
                    listeners,
                    redial: merged.redial.clone(),
                })),
                ..Default::default()
            };
            if let Err(why) = inbox.send_from_outside(batch, RELOAD_SEND_WAIT) {
                report.failed.push((i, why));
            }
        }
        // Socket files: the removed sources' go now (the owner core closes
        // the socket), the added ones' at exit.
        let mut paths = self.unix_paths.lock().unwrap_or_else(|e| e.into_inner());
        for &(i, _) in &report.removed {
            if let Some(p) = live
                .sources
                .get(i as usize)
                .and_then(|s| s.unix_socket.as_ref())
            {
                if let Err(e) = std::fs::remove_file(p) {
                    report
                        .errors
                        .push(format!("cannot remove {}: {e}", p.display()));
                }
                paths.retain(|q| q != p);
            }
        }
        paths.extend(new_paths);
        drop(paths);
        self.table = table;
        self.running = Config::clone(&live);
        report
    }
}

/// An added source's sockets, by core (its `source_rows`, all bound or
/// none).
struct SourceSockets {
    rows: Vec<(usize, (ListenerKind, ListenSock))>,
    addr: Option<(u16, SocketAddr)>,
    path: Option<std::path::PathBuf>,
}

fn bind_source(
    n: u16,
    s: &crate::config::SourceConfig,
    workers: usize,
    backlog: i32,
) -> Result<SourceSockets, String> {
    let mut out = SourceSockets {
        rows: Vec::new(),
        addr: None,
        path: None,
    };
    for (kind, bind) in source_rows(n, s, workers) {
        let (socks, addr) = bind.bind(workers, backlog).map_err(|e| e.to_string())?;
        out.addr = out.addr.or(addr.map(|a| (n, a)));
        if let Bind::Unix { path, .. } = bind {
            out.path = Some(path);
        }
        out.rows
            .extend(socks.into_iter().map(|(core, l)| (core, (kind, l))));
    }
    Ok(out)
}

//! [`Ctx`]: the adapters' only door to the rest of the engine. Its fields
//! are private; what a stage may do is what its methods say: log an id in
//! or out, send to an id, fan a message out, send to an upstream source,
//! join or leave a channel, tag a connection, start an admin call, read the
//! config and the counters. Work for other connections (this core's or
//! another's) goes into the mesh batches and is applied after the reads, so
//! a stage never touches a connection but its own.
//!
//! `Ctx::for_test` (tests only) builds one without a running core, so each
//! adapter's routing decisions have unit tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::admin_calls::AdminCalls;
use super::channels::{Channel, Channels};
use super::directory::{Directory, LookupCache};
use super::io::Login;
use super::mesh::Outgoing;
use super::message::{AdminCall, FanOp, Fanout, Message};
use super::metrics::{CoreMetrics, SourceStatus};
use super::redis::{remote, Answer, Join};
use super::tags::{Selector, Tag, TagIndex, TagList};
use super::timer::Timing;
use super::ConnId;
use crate::config::{Config, RedisConfig, SESSIONS_SERVER};

/// Everything a stage may touch besides its own connection.
pub(crate) struct Ctx<'a> {
    pub(super) cfg: &'a Config,
    pub(super) dir: &'a Directory,
    pub(super) cache: &'a mut LookupCache,
    pub(super) tags: &'a mut TagIndex,
    pub(super) channels: &'a mut Channels,
    pub(super) metrics: &'a CoreMetrics,
    pub(super) all_metrics: &'a [CoreMetrics],
    pub(super) sources: &'a [Arc<SourceStatus>],
    pub(super) veltix: &'a [AtomicUsize],
    pub(super) mesh: &'a mut Outgoing,
    pub(super) admin: &'a mut AdminCalls,
    pub(super) now: u64,
    pub(super) timing: &'a Timing,
    pub(super) draining: bool,
    pub(super) redis: &'a mut [Option<super::redis::Redis>],
    /// This core's shared compression contexts and buffer.
    pub(super) codec: &'a mut crate::protocol::deflate::CoreCodec,
    /// This core's permessage-deflate counters, one row per endpoint.
    pub(super) deflate: &'a [super::metrics::DeflateStats],
    /// Every core's (for /metrics).
    pub(super) all_deflate: &'a [super::metrics::DeflateStats],
    /// Other nodes of the cluster known (core 0's registry).
    pub(super) nodes_known: &'a std::sync::atomic::AtomicUsize,
    /// The events' AMQP publisher, if `events.amqp`.
    pub(super) amqp: Option<&'a mut super::amqp::Amqp>,
}

/// Builds a [`Ctx`] from a core's fields (a macro, so the borrows stay
/// field by field and the core can still reach its slab).
macro_rules! ctx {
    ($core:expr) => {
        $crate::engine::route::Ctx {
            cfg: &$core.cfg,
            dir: &$core.shared.directory,
            cache: &mut $core.cache,
            tags: &mut $core.tags,
            channels: &mut $core.channels,
            metrics: &$core.shared.metrics[$core.index],
            all_metrics: &$core.shared.metrics,
            sources: &$core.sources,
            veltix: &$core.shared.veltix_clients,
            mesh: &mut $core.mesh,
            admin: &mut $core.admin,
            now: $core.now,
            timing: &$core.timing,
            draining: $core.drain_deadline.is_some(),
            redis: &mut $core.redis,
            codec: &mut $core.codec,
            deflate: $core.shared.deflate_of($core.index),
            all_deflate: &$core.shared.deflate,
            nodes_known: &$core.shared.cluster_known,
            amqp: $core.amqp.as_mut(),
        }
    };
}
pub(crate) use ctx;

impl<'a> Ctx<'a> {
    /// The current tick.
    #[inline]
    pub(crate) fn now(&self) -> u64 {
        self.now
    }

    /// Deadlines in ticks.
    #[inline]
    pub(crate) fn timing(&self) -> &'a Timing {
        self.timing
    }

    /// This core's shared compression contexts and buffer.
    #[inline]
    pub(crate) fn codec(&mut self) -> &mut crate::protocol::deflate::CoreCodec {
        self.codec
    }

    /// This core's permessage-deflate counters of endpoint `row` (the
    /// sources' clients after the endpoints).
    #[inline]
    pub(crate) fn deflate_stats(&self, row: usize) -> Option<&'a super::metrics::DeflateStats> {
        self.deflate.get(row)
    }

    /// The configuration (read only).
    #[inline]
    pub(crate) fn cfg(&self) -> &'a Config {
        self.cfg
    }

    /// This core's counters.
    #[inline]
    pub(crate) fn metrics(&self) -> &'a CoreMetrics {
        self.metrics
    }

    /// The server is shutting down (/ready answers 503).
    pub(crate) fn draining(&self) -> bool {
        self.draining
    }

    /// Registers `id` for `me` (last login wins) and arranges the kick of
    /// the connection it replaces, wherever it lives.
    pub(crate) fn login(&mut self, id: &[u8], me: ConnId) -> Login {
        let (login, replaced) = self.dir.login(id, me);
        let epoch = login.epoch();
        if let Some(old) = replaced {
            self.mesh.kick(old.conn.core as usize, old.conn, old.epoch);
        }
        if self.cfg.cluster.is_some() {
            // Hear the id's transfers from other nodes, and take it from
            // whichever node held it.
            if let Some(c) = &self.cfg.cluster {
                if let (Some(r), Some(_)) = self.redis_of(c.server) {
                    r.hold(&c.id_channel(id));
                }
            }
            self.claim(id, epoch, false);
        }
        login
    }

    /// Claims `id` for this node's login `epoch` (see
    /// [`super::cluster::CLAIM_SCRIPT`]);
    /// `again`: a re-claim after Redis came back.
    pub(crate) fn claim(&mut self, id: &[u8], epoch: u64, again: bool) {
        let Some(c) = &self.cfg.cluster else {
            return;
        };
        let (m, server) = (self.metrics, c.server);
        let (ttl, e) = (c.owner_ttl.as_secs().to_string(), epoch.to_string());
        let np = c.node_channel_prefix();
        let args: [&[u8]; 8] = [
            b"1",
            &c.owner_key(id),
            c.node_id.as_bytes(),
            e.as_bytes(),
            ttl.as_bytes(),
            np.as_bytes(),
            id,
            if again { b"1" } else { b"0" },
        ];
        if let (Some(r), Some(rc)) = self.redis_of(server) {
            r.eval(rc, m, super::cluster::CLAIM, &args);
        }
    }

    /// Releases an id (only if this login still holds it).
    pub(crate) fn logout(&mut self, login: &Login) {
        self.dir.logout(login.id(), login.epoch());
        if let Some(c) = &self.cfg.cluster {
            let m = self.metrics;
            if let (Some(r), Some(rc)) = self.redis_of(c.server) {
                r.release(rc, m, &c.id_channel(login.id()));
                // The key goes only if it still names this login.
                let e = login.epoch().to_string();
                let args: [&[u8]; 4] = [
                    b"1",
                    &c.owner_key(login.id()),
                    c.node_id.as_bytes(),
                    e.as_bytes(),
                ];
                r.eval(rc, m, super::cluster::RELEASE, &args);
            }
        }
    }

    /// Sends `parts` (one RELY transfer frame, concatenated) to the
    /// connection holding `to`, wherever it lives: on this node through
    /// the mesh, on another (`cluster:`) through Redis. False if nobody
    /// here holds it and there is no other node to ask.
    pub(crate) fn send_to_id(&mut self, to: &[u8], parts: &[&[u8]]) -> bool {
        let Some(dst) = self.cache.lookup(self.dir, to) else {
            return self.send_to_node(to, parts);
        };
        if dst.core as usize != self.mesh.me() {
            self.metrics.cross_core.inc();
        }
        self.mesh.deliver(dst.core as usize, dst, parts);
        true
    }

    /// A transfer for an id no connection here holds: PUBLISHed on the
    /// id's channel, for the node that holds it (its reply counts it as
    /// sent or offline). False without a cluster.
    fn send_to_node(&mut self, to: &[u8], parts: &[&[u8]]) -> bool {
        let Some(c) = &self.cfg.cluster else {
            return false;
        };
        let m = self.metrics;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > c.max_message_size {
            m.cluster_dropped.inc();
            return true;
        }
        let frame = match parts {
            [one] => std::borrow::Cow::Borrowed(*one),
            _ => std::borrow::Cow::Owned(parts.concat()),
        };
        let sent = match self.redis_of(c.server) {
            (Some(r), Some(rc)) => r.publish_transfer(rc, m, (&c.id_prefix, to), &frame),
            _ => false,
        };
        if !sent {
            m.cluster_dropped.inc();
        }
        true
    }

    /// Sends a client message to upstream source `source`, through its
    /// owner core (in order per client).
    pub(crate) fn send_upstream(&mut self, source: u16, text: bool, data: &[u8]) {
        let owner = source as usize % self.mesh.cores();
        self.mesh.to_source(owner, source, text, data);
    }

    /// Sends `msg` to every connection `selector` matches on every core
    /// (except `exclude`): one fan-out per core, not per client.
    pub(crate) fn fanout(
        &mut self,
        selector: Arc<Selector>,
        msg: Message,
        force_binary: bool,
        exclude: Option<ConnId>,
    ) {
        let f = Fanout {
            selector,
            msg: Some(msg),
            force_binary,
            exclude,
            op: FanOp::Send,
            reply: None,
        };
        for core in 0..self.mesh.cores() {
            self.mesh.fanout(core, f.clone());
        }
    }

    /// Starts an admin request on every core; the answer comes back to the
    /// admin stage (`Stage::on_answer`) once all have replied.
    pub(crate) fn admin(&mut self, call: AdminCall) {
        let survey = match &self.cfg.cluster {
            Some(c) if call.all_nodes => super::cluster::Survey::of(
                &c.node_id,
                self.mesh.me() as u16,
                0,
                &call.selector,
                call.msg.as_ref(),
                &call.op,
            )
            .map(|s| (s, c.clone())),
            _ => None,
        };
        let Some((mut s, c)) = survey else {
            self.admin.start(call, self.mesh, 0, None, None);
            return;
        };
        // Every other node this node knows answers with its count, or the
        // call answers without it after survey_timeout.
        let known = self.nodes_known.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Instant::now() + c.survey_timeout;
        let status = matches!(call.op, FanOp::Status { .. });
        let req = self
            .admin
            .start(call, self.mesh, known, Some(deadline), None);
        if status {
            self.admin.label(req, &c.node_id);
        }
        if known == 0 {
            return;
        }
        s.req = req;
        let m = self.metrics;
        let words = s.encode();
        // A survey over the cluster's message cap would risk every node's
        // subscriber (Redis' pub/sub output limit): this node answers alone.
        let sent = words.len() <= c.max_message_size
            && match self.redis_of(c.server) {
                (Some(r), Some(rc)) => r.send(rc, m, &[b"PUBLISH", &c.ctl_channel(), &words]),
                _ => false,
            };
        if sent {
            m.cluster_surveys.inc();
        } else {
            m.cluster_dropped.inc();
            self.admin.give_up_nodes(req);
        }
    }

    /// Makes `slot` a member of `ch` on this core.
    pub(crate) fn join(&mut self, ch: Channel, slot: usize) {
        self.channels.join(ch, slot);
    }

    /// Ends `slot`'s membership of `ch`.
    pub(crate) fn leave(&mut self, ch: Channel, slot: usize) {
        self.channels.leave(ch, slot);
    }

    /// Indexes `slot` under `tags`, which becomes the list this core's
    /// connections with the same tags share.
    pub(crate) fn tag(&mut self, slot: usize, tags: &mut TagList) {
        self.tags.insert(slot, tags);
    }

    /// The selector for `on_message: broadcast`: connections whose `tag`
    /// has the value it has in `tags` (None: no such tag). Shared per core
    /// by every connection of that value.
    pub(crate) fn broadcast_selector(
        &mut self,
        tag: Option<&str>,
        tags: &[Tag],
    ) -> Option<Arc<Selector>> {
        let tag = tag?;
        let (k, v) = tags.iter().find(|(k, _)| **k == *tag)?;
        Some(self.tags.selector_of(k, v))
    }

    /// Removes `slot` from the index under `tags`, which it gives up.
    pub(crate) fn untag(&mut self, slot: usize, tags: TagList) {
        self.tags.remove(slot, tags);
    }

    /// Upstream source `n`'s shared status and counters.
    pub(crate) fn source_status(&self, n: u16) -> Option<&'a SourceStatus> {
        self.sources.get(n as usize).map(|s| &**s)
    }

    /// Takes one of Veltix listener `n`'s `max` places; false if full.
    pub(crate) fn veltix_take(&self, n: u16, max: usize) -> bool {
        let Some(c) = self.veltix.get(n as usize) else {
            return false;
        };
        c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v < max).then_some(v + 1)
        })
        .is_ok()
    }

    /// Gives back a place taken with [`Ctx::veltix_take`].
    pub(crate) fn veltix_release(&self, n: u16) {
        if let Some(c) = self.veltix.get(n as usize) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// This core's client of Redis server `server`, with its config; or
    /// None and whether the server exists at all (then core 0 holds it).
    fn redis_of(
        &mut self,
        server: usize,
    ) -> (Option<&mut super::redis::Redis>, Option<&'a RedisConfig>) {
        let cfg = self.cfg.redis_server(server);
        let r = self.redis.get_mut(server).and_then(Option::as_mut);
        (r, cfg)
    }

    /// Sends a command to Redis server `server` whose reply comes back to
    /// `me`'s stage (`Stage::on_redis`, with `tag`). Err at once if Redis is
    /// away (on a core without its own connections, core 0 answers Down
    /// instead).
    pub(crate) fn redis_call(
        &mut self,
        server: usize,
        me: ConnId,
        tag: u8,
        args: &[&[u8]],
    ) -> Result<(), Answer> {
        let m = self.metrics;
        match self.redis_of(server) {
            (Some(r), Some(cfg)) => r.call(cfg, m, me, tag, args),
            (None, Some(_)) => {
                self.mesh
                    .redis(remote::CORE, me, remote::CALL, tag, server as u8, |out| {
                        crate::protocol::resp::encode(out, args)
                    });
                Ok(())
            }
            _ => Err(Answer::Down),
        }
    }

    /// Sends a command to server `server` nobody waits for (dropped and
    /// counted while Redis is away, once its buffer is full). False if
    /// dropped here.
    pub(crate) fn redis_send(&mut self, server: usize, me: ConnId, args: &[&[u8]]) -> bool {
        let m = self.metrics;
        match self.redis_of(server) {
            (Some(r), Some(cfg)) => r.send(cfg, m, args),
            (None, Some(_)) => {
                self.mesh
                    .redis(remote::CORE, me, remote::SEND, 0, server as u8, |out| {
                        crate::protocol::resp::encode(out, args)
                    });
                true
            }
            _ => {
                m.redis_dropped.inc();
                false
            }
        }
    }

    /// Queues an event for the AMQP broker (false: dropped and counted).
    pub(crate) fn amqp_event(&mut self, key: &str, body: Vec<u8>) -> bool {
        let sink = self.cfg.events.as_ref().map(|e| &e.sink);
        match (self.amqp.as_deref_mut(), sink) {
            (Some(a), Some(crate::config::EventSink::Amqp(cfg))) => {
                a.publish(cfg, self.metrics, key, body)
            }
            _ => {
                self.metrics.events_dropped.inc();
                false
            }
        }
    }

    /// Sends an event (an XADD, a sync write) to server `server`: kept
    /// while Redis is away, in the capped buffer, and sent in order after
    /// the reconnect. False if dropped here (counted).
    pub(crate) fn redis_event(&mut self, server: usize, me: ConnId, args: &[&[u8]]) -> bool {
        let m = self.metrics;
        match self.redis_of(server) {
            (Some(r), Some(cfg)) => r.send_event(cfg, m, args),
            (None, Some(_)) => {
                self.mesh
                    .redis(remote::CORE, me, remote::EVENT, 0, server as u8, |out| {
                        crate::protocol::resp::encode(out, args)
                    });
                true
            }
            _ => {
                m.events_dropped.inc();
                false
            }
        }
    }

    /// `me` joins channel `name` of the sessions' server (subscribed once
    /// per core that holds Redis, refcounted). A `Ready`, `Pending` or
    /// `Remote` join must be left once, with the id it got.
    pub(crate) fn redis_join(&mut self, name: &[u8], me: ConnId) -> Join {
        let m = self.metrics;
        match self.redis_of(SESSIONS_SERVER) {
            (Some(r), Some(cfg)) => r.join(cfg, m, name, me),
            (None, Some(_)) => {
                self.mesh.redis(
                    remote::CORE,
                    me,
                    remote::JOIN,
                    0,
                    SESSIONS_SERVER as u8,
                    |out| out.extend_from_slice(name),
                );
                Join::Remote
            }
            _ => Join::Down,
        }
    }

    /// Undoes a join of the sessions' channel `id`.
    pub(crate) fn redis_leave(&mut self, id: u32, me: ConnId) {
        let m = self.metrics;
        match self.redis_of(SESSIONS_SERVER) {
            (Some(r), Some(cfg)) => r.leave(cfg, m, id, me),
            (None, Some(_)) => self.mesh.redis(
                remote::CORE,
                me,
                remote::LEAVE,
                0,
                SESSIONS_SERVER as u8,
                |out| out.extend_from_slice(&id.to_le_bytes()),
            ),
            _ => {}
        }
    }

    /// wsproxy session sockets open on every core.
    pub(crate) fn session_sockets(&self) -> u64 {
        self.all_metrics
            .iter()
            .map(|m| m.session_sockets.get())
            .sum()
    }

    /// Is every Redis connection of every core up? (wsproxy's /health.)
    pub(crate) fn redis_connected(&self) -> bool {
        let cfg = self.cfg;
        self.all_metrics.iter().enumerate().all(|(core, m)| {
            let held = (0..cfg.redis_server_count()).filter(|&s| cfg.holds_redis(core, s));
            let (cmd, sub) = held.fold((0, 0), |(c, s), server| {
                (c + 1, s + u64::from(cfg.redis_subscribes(server)))
            });
            m.redis_cmd_up.get() == cmd && m.redis_sub_up.get() == sub
        })
    }

    /// The Prometheus text of every core's and every source's counters.
    pub(crate) fn metrics_text(&self) -> String {
        let mut body = super::metrics::prometheus(self.all_metrics);
        let live = self.cfg.sources.iter().zip(self.sources.iter()).enumerate();
        super::metrics::prometheus_sources(
            &mut body,
            live.filter(|(_, (c, _))| !c.retired)
                .map(|(i, (_, s))| (i, &**s)),
        );
        if self
            .all_deflate
            .iter()
            .any(|s| s.out_wire.get() + s.in_wire.get() > 0)
            || self
                .cfg
                .ws()
                .endpoints
                .iter()
                .any(|e| e.compression.mode != crate::protocol::deflate::Mode::Off)
            || self.cfg.ws().compression.mode != crate::protocol::deflate::Mode::Off
        {
            let mut names: Vec<String> = self
                .cfg
                .ws()
                .endpoints
                .iter()
                .map(|e| e.path.clone())
                .collect();
            names.push("(sources)".into());
            super::metrics::prometheus_deflate(&mut body, &names, self.all_deflate);
        }
        if !self.cfg.veltix.is_empty() {
            body.push_str("# HELP corerelay_veltix_clients Clients on each Veltix listener.\n# TYPE corerelay_veltix_clients gauge\n");
        }
        for (l, n) in self.cfg.veltix.iter().zip(self.veltix) {
            use std::fmt::Write;
            let _ = writeln!(
                body,
                "corerelay_veltix_clients{{listener=\"{}\"}} {}",
                l.listen,
                n.load(Ordering::Relaxed)
            );
        }
        super::metrics::prometheus_process(&mut body);
        body
    }
}

#[cfg(test)]
pub(crate) mod test {
    //! A [`Ctx`] without a running core: real directory, indexes and mesh
    //! (its inboxes need a poll for their wakers), inspected after a stage
    //! has acted.

    use super::*;
    use crate::engine::mesh::{Batch, Inbox, Item};

    pub(crate) struct TestCx {
        pub cfg: Config,
        pub dir: Directory,
        pub cache: LookupCache,
        pub tags: TagIndex,
        pub channels: Channels,
        pub metrics: Vec<CoreMetrics>,
        pub sources: Vec<Arc<SourceStatus>>,
        pub veltix: Vec<AtomicUsize>,
        pub codec: crate::protocol::deflate::CoreCodec,
        pub deflate: Box<[crate::engine::metrics::DeflateStats]>,
        pub nodes_known: AtomicUsize,
        pub mesh: Outgoing,
        pub admin: AdminCalls,
        pub timing: Timing,
        pub now: u64,
        _polls: Vec<mio::Poll>,
        pub rx: Vec<crossbeam_channel::Receiver<Batch>>,
    }

    impl TestCx {
        /// `cores` cores; this is core 0.
        pub(crate) fn new(yaml: &str, cores: usize) -> TestCx {
            let cfg = Config::from_yaml(yaml, None).expect("config");
            let mut polls = Vec::new();
            let mut inboxes = Vec::new();
            let mut rx = Vec::new();
            for _ in 0..cores {
                let poll = mio::Poll::new().expect("poll");
                let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
                let (i, r) = Inbox::new(16, waker);
                inboxes.push(i);
                rx.push(r);
                polls.push(poll);
            }
            TestCx {
                dir: Directory::new(cores),
                cache: LookupCache::default(),
                tags: TagIndex::default(),
                channels: Channels::default(),
                metrics: (0..cores).map(|_| CoreMetrics::default()).collect(),
                sources: cfg.sources.iter().map(|_| Arc::default()).collect(),
                veltix: cfg.veltix.iter().map(|_| AtomicUsize::new(0)).collect(),
                codec: crate::protocol::deflate::CoreCodec::new(cfg.ws().compression_level),
                deflate: crate::engine::shared::Shared::deflate_stats(&cfg, cores),
                nodes_known: AtomicUsize::new(0),
                mesh: Outgoing::new(inboxes.into(), 0),
                admin: AdminCalls::default(),
                timing: Timing {
                    ws_pong: 100,
                    ws_handshake: 100,
                    admin_idle: 600,
                    admin_request: 100,
                    ..Timing::default()
                },
                now: 1,
                _polls: polls,
                rx,
                cfg,
            }
        }

        pub(crate) fn cx(&mut self) -> Ctx<'_> {
            Ctx {
                cfg: &self.cfg,
                dir: &self.dir,
                cache: &mut self.cache,
                tags: &mut self.tags,
                channels: &mut self.channels,
                metrics: &self.metrics[0],
                all_metrics: &self.metrics,
                sources: &self.sources,
                veltix: &self.veltix,
                mesh: &mut self.mesh,
                admin: &mut self.admin,
                now: self.now,
                timing: &self.timing,
                draining: false,
                redis: &mut [],
                codec: &mut self.codec,
                deflate: &self.deflate,
                all_deflate: &self.deflate,
                nodes_known: &self.nodes_known,
                amqp: None,
            }
        }

        /// What the stage left for this core, in order.
        pub(crate) fn local(&mut self) -> Batch {
            self.mesh.take_local()
        }

        /// What the stage left for core `dst`, in order (sent first).
        pub(crate) fn sent_to(&mut self, dst: usize) -> Vec<Batch> {
            self.mesh.flush();
            self.rx[dst].try_iter().collect()
        }

        pub(crate) fn m(&self) -> crate::engine::metrics::Snapshot {
            self.metrics[0].snapshot()
        }
    }

    /// The delivered bytes of a batch's `Deliver` items.
    pub(crate) fn deliveries(b: &Batch) -> Vec<(ConnId, Vec<u8>)> {
        b.items
            .iter()
            .filter_map(|i| match *i {
                Item::Deliver { to, start, len } => {
                    Some((to, b.data[start as usize..(start + len) as usize].to_vec()))
                }
                _ => None,
            })
            .collect()
    }
}

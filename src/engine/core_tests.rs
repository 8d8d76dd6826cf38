//! Unit tests of `Core` driven by hand (no thread, no listeners), for
//! what integration tests cannot make certain.

use super::*;
use crate::config::Config;
use crate::engine::directory::Directory;
use crate::engine::mesh::Inbox;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

/// A core with no listeners, driven by hand.
fn core(yaml: &str) -> Core {
    let cfg = Config::from_yaml(yaml, None).expect("config");
    let poll = Poll::new().expect("poll");
    let waker = mio::Waker::new(poll.registry(), WAKER).expect("waker");
    let (inbox, rx) = Inbox::new(cfg.mesh_capacity, waker);
    let shared = Arc::new(Shared {
        directory: Directory::new(1),
        inboxes: vec![inbox].into(),
        metrics: vec![CoreMetrics::default()].into(),
        sources: Vec::new().into(),
        veltix_clients: Box::new([]),
        deflate: Shared::deflate_stats(&cfg, 1),
        cluster_nodes: Default::default(),
        cluster_known: AtomicUsize::new(0),
        cluster_heard: AtomicU64::new(0),
        shutdown: AtomicBool::new(false),
        quiesced: AtomicUsize::new(0),
        cfg,
    });
    let setup = CoreSetup {
        index: 0,
        poll,
        rx,
        listeners: Vec::new(),
    };
    Core::new(setup, shared).expect("core")
}

/// A real loopback connection's server side (the client end is kept
/// open by the caller).
fn accepted(l: &std::net::TcpListener) -> (Stream, std::net::TcpStream) {
    let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    server.set_nonblocking(true).unwrap();
    (Stream::Tcp(mio::net::TcpStream::from_std(server)), client)
}

#[test]
fn stale_delivery_to_a_reused_slot_is_counted() {
    let mut core = core("workers: 1\npin: false\nrely:\n  listen: []\n");
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = l.local_addr().unwrap();
    let (s1, _c1) = accepted(&l);
    core.add_conn(s1, peer, ListenerKind::Rely);
    let (slot, old_gen) = core.conns.iter().map(|(k, c)| (k, c.gen)).next().unwrap();
    core.close(slot, CloseReason::PeerClosed);
    let (s2, _c2) = accepted(&l);
    core.add_conn(s2, peer, ListenerKind::Rely);
    let new_gen = core.conns.get(slot).expect("the freed slot is reused").gen;
    assert_ne!(new_gen, old_gen);
    let old = conn_id(0, slot, old_gen);
    core.deliver(old, Chunk::Owned(b"for the old tenant".as_slice().into()));
    assert_eq!(core.metrics().dropped_dead_conn.get(), 1);
    assert!(
        core.conns[slot].io.out.is_empty(),
        "the new tenant got nothing"
    );
    assert_eq!(core.queued, 0);
}

//! Several nodes on one Redis (`cluster:`): two corerelay nodes in this
//! process and a real redis-server on loopback. RELY and WebSocket ids are
//! one namespace across nodes: transfers arrive byte for byte and in order,
//! an id nobody holds is counted offline, and a login on one node closes
//! the older login of the same id on the other.

use std::time::{Duration, Instant};

use corerelay::client::rely::RelyClient;
use corerelay::{Config, Server, ServerHandle};

use crate::support::redis::{RedisServer, Reply};
use crate::support::{transfer_frame, wait_until, WsRaw, WAIT};

/// A node named `name` on `redis`, with RELY and a WebSocket endpoint in
/// rely mode, and extra cluster keys.
fn node(redis: &RedisServer, name: &str, extra: &str) -> ServerHandle {
    let yaml = format!(
        "workers: 2\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: [\"127.0.0.1:0\"]\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /rely/{{id}}\n      id_param: id\n      on_message: rely\ncluster:\n  redis_url: \"{}\"\n  node_id: {name}\n  prefix: test{}\n{extra}",
        redis.url(),
        redis.addr().port()
    );
    let n = Server::start(Config::from_yaml(&yaml, None).expect("cluster config"))
        .expect("node starts");
    // Until its Redis connections are up a node serves alone (its logins
    // are claimed, and its kicks heard, from then on).
    wait_until(
        || {
            let m = n.metrics();
            m.redis_cmd_up == 2 && m.redis_sub_up == 2
        },
        "the node's Redis connections up",
    );
    n
}

fn login(n: &ServerHandle, id: &str) -> RelyClient {
    let c = RelyClient::connect(n.rely_addrs()[0], id.as_bytes()).expect("connect");
    wait_until(|| n.owner_core(id.as_bytes()).is_some(), "login registered");
    c
}

/// Sends probes from `from` to `to` until one arrives (the receiving
/// node's subscription is in place), then drains the rest. Bounded.
fn until_routed(from: &mut RelyClient, to: &mut RelyClient) {
    let deadline = Instant::now() + WAIT;
    loop {
        let id = to.writer.id().to_vec();
        from.send(&id, b"probe").unwrap();
        if let Ok(Some(r)) = to.recv(Some(Duration::from_millis(50))) {
            assert_eq!(r.payload, b"probe");
            break;
        }
        assert!(Instant::now() < deadline, "never routed across nodes");
    }
    while let Ok(Some(_)) = to.recv(Some(Duration::from_millis(100))) {}
}

#[test]
fn rely_transfers_cross_nodes_byte_for_byte_and_in_order() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    let mut alice = login(&a, "alice");
    let mut bob = login(&b, "bob");
    until_routed(&mut bob, &mut alice);
    until_routed(&mut alice, &mut bob);
    // 10,000 frames from bob (node b) to alice (node a), in order.
    let n = 10_000u32;
    let (mut w, r) = (bob, &mut alice);
    for i in 0..n {
        w.send(b"alice", &i.to_be_bytes()).unwrap();
    }
    for i in 0..n {
        let got = r.recv(Some(WAIT)).unwrap().expect("frame within the wait");
        assert_eq!(
            (got.from.as_slice(), got.payload.as_slice()),
            (&b"bob"[..], &i.to_be_bytes()[..])
        );
    }
    // Byte for byte the other way, with an empty and a binary payload.
    let payload: Vec<u8> = (0..=255).collect();
    r.send(b"bob", &payload).unwrap();
    r.send(b"bob", b"").unwrap();
    assert_eq!(w.recv(Some(WAIT)).unwrap().unwrap().payload, payload);
    assert_eq!(w.recv(Some(WAIT)).unwrap().unwrap().payload, b"");
    let (ma, mb) = (a.metrics(), b.metrics());
    assert!(mb.cluster_out >= u64::from(n), "{}", mb.cluster_out);
    assert!(ma.cluster_in >= u64::from(n), "{}", ma.cluster_in);
    assert_eq!(ma.cluster_dropped + mb.cluster_dropped, 0);
}

#[test]
fn an_id_no_node_holds_is_offline_and_ids_here_never_touch_redis() {
    let redis = RedisServer::start();
    let (a, b) = (
        node(&redis, "a", "  max_message_size: 1KiB\n"),
        node(&redis, "b", ""),
    );
    let mut x = login(&a, "x");
    let mut y = login(&a, "y");
    let _z = login(&b, "z");
    let before = a.metrics();
    // Both on node a: the mesh, not Redis.
    x.send(b"y", b"local").unwrap();
    assert_eq!(y.recv(Some(WAIT)).unwrap().unwrap().payload, b"local");
    x.send(b"nobody", b"lost").unwrap();
    wait_until(
        || a.metrics().dropped_offline > before.dropped_offline,
        "offline counted from the PUBLISH reply",
    );
    // Over the cluster's message cap: dropped and counted, not sent.
    x.send(b"z", &[7u8; 2048]).unwrap();
    wait_until(|| a.metrics().cluster_dropped == 1, "over the cap counted");
    let m = a.metrics();
    assert_eq!(m.cluster_out, before.cluster_out, "nothing crossed");
}

#[test]
fn rely_reaches_a_websocket_id_on_another_node_and_back() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    let mut ws = WsRaw::connect(a.ws_addrs()[0], "/rely/wsuser");
    wait_until(|| a.owner_core(b"wsuser").is_some(), "ws login");
    let mut r = login(&b, "relyuser");
    // Probe until node a's subscription is in place.
    let deadline = Instant::now() + WAIT;
    let frame = loop {
        r.send(b"wsuser", b"to the browser").unwrap();
        if let Ok(Some(f)) = ws.read_within(Duration::from_millis(50)) {
            break f;
        }
        assert!(Instant::now() < deadline, "never routed");
    };
    // A RELY transfer reaches a WebSocket id in rely mode as a binary
    // message: the transfer frame itself.
    assert_eq!(frame.opcode, 0x2);
    assert_eq!(
        frame.payload,
        transfer_frame("relyuser", "wsuser", b"to the browser")
    );
    // And a WebSocket client's transfer reaches the RELY id on node b.
    ws.send(
        0x2,
        true,
        &transfer_frame("wsuser", "relyuser", b"from the browser"),
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let got = r.recv(Some(WAIT)).unwrap().expect("a frame");
        if got.payload == b"from the browser" {
            assert_eq!(got.from, b"wsuser");
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn a_login_on_another_node_closes_the_older_one() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    let prefix = format!("test{}", redis.addr().port());
    let mut rc = redis.client();
    let mut old = login(&a, "carol");
    // Node a's claim is in Redis before node b's login.
    let key = format!("{prefix}:own:carol");
    let mut owner = || match rc.cmd(&["HGET", &key, "owner"]) {
        Reply::Bulk(v) => Some(v),
        _ => None,
    };
    wait_until(|| owner().as_deref() == Some(b"a"), "node a owns carol");
    let mut new = login(&b, "carol");
    assert!(
        old.reader.closed_within(WAIT),
        "the older login on node a is closed"
    );
    wait_until(|| a.metrics().cluster_kicks == 1, "kick counted on node a");
    assert_eq!(owner().as_deref(), Some(&b"b"[..]));
    // carol now resolves to node b: a sender on node a reaches her there.
    wait_until(|| a.owner_core(b"carol").is_none(), "node a let go");
    let mut dave = login(&a, "dave");
    until_routed(&mut dave, &mut new);
    // The older login's cleanup left node b's claim alone.
    assert_eq!(owner().as_deref(), Some(&b"b"[..]));
    // Closing the newer one removes the claim.
    drop(new);
    wait_until(|| owner().is_none(), "claim released");
}

#[test]
fn concurrent_logins_of_one_id_on_two_nodes_leave_exactly_one() {
    let redis = RedisServer::start();
    let nodes = [node(&redis, "a", ""), node(&redis, "b", "")];
    let prefix = format!("test{}", redis.addr().port());
    // 8 threads, 10 logins each, alternating nodes, all kept open.
    let clients: Vec<Vec<RelyClient>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|t| {
                let nodes = &nodes;
                s.spawn(move || {
                    (0..10)
                        .map(|i| {
                            let n = &nodes[(t + i) % 2];
                            RelyClient::connect(n.rely_addrs()[0], b"racer").expect("connect")
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let open = || nodes.iter().map(|n| n.metrics().connections).sum::<u64>();
    wait_until(|| open() == 1, "exactly one racer left open");
    // The survivor is the login the id resolves to: its node holds it and
    // Redis names that node.
    let mut rc = redis.client();
    let Reply::Bulk(v) = rc.cmd(&["HGET", &format!("{prefix}:own:racer"), "owner"]) else {
        panic!("an owner key");
    };
    let owner = if v == b"a" { 0 } else { 1 };
    assert!(nodes[owner].owner_core(b"racer").is_some());
    assert!(nodes[1 - owner].owner_core(b"racer").is_none());
    let mut alive = 0;
    for mut c in clients.into_iter().flatten() {
        if !c.reader.closed_within(Duration::from_millis(20)) {
            alive += 1;
        }
    }
    assert_eq!(alive, 1);
}

//! Several nodes on one Redis (`cluster:`): two corerelay nodes in this
//! process and a real redis-server on loopback. RELY and WebSocket ids are
//! one namespace across nodes: transfers arrive byte for byte and in order,
//! an id nobody holds is counted offline, and a login on one node closes
//! the older login of the same id on the other.

use std::time::{Duration, Instant};

use corerelay::client::rely::RelyClient;
use corerelay::{Config, Server, ServerHandle};

use crate::support::redis::{RedisServer, Reply};
use crate::support::{http, transfer_frame, wait_until, HttpResponse, WsRaw, WAIT};

/// The YAML of a node named `name` on `redis`: RELY, a WebSocket endpoint
/// in rely mode and a tagged one, pings every 100 ms, and extra cluster
/// keys.
fn node_yaml(redis: &RedisServer, name: &str, extra: &str) -> String {
    format!(
        "workers: 2\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: [\"127.0.0.1:0\"]\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /rely/{{id}}\n      id_param: id\n      on_message: rely\n    - path: /room/{{room}}/{{id}}\n      id_param: id\ncluster:\n  redis_url: \"{}\"\n  node_id: {name}\n  prefix: test{}\n  ping_interval: 100ms\n  node_expiry: 1s\n{extra}",
        redis.url(),
        redis.addr().port()
    )
}

/// A node named `name` on `redis` (see [`node_yaml`]).
fn node(redis: &RedisServer, name: &str, extra: &str) -> ServerHandle {
    node_of(&node_yaml(redis, name, extra))
}

/// A node of this YAML, once its Redis connections are up.
fn node_of(yaml: &str) -> ServerHandle {
    let n =
        Server::start(Config::from_yaml(yaml, None).expect("cluster config")).expect("node starts");
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
    let ma = a.metrics();
    // Claims run the loaded script by its SHA, not its text.
    let Reply::Bulk(stats) = redis.client().cmd(&["INFO", "commandstats"]) else {
        panic!("commandstats");
    };
    let stats = String::from_utf8_lossy(&stats).into_owned();
    assert!(stats.contains("cmdstat_evalsha:calls="), "{stats}");
    // The PUBLISH replies that count them are read at the sending core's
    // own pace (they never wake it): at its next iteration or tick.
    wait_until(
        || b.metrics().cluster_out >= u64::from(n),
        "every transfer counted as sent",
    );
    assert!(ma.cluster_in >= u64::from(n), "{}", ma.cluster_in);
    assert_eq!(ma.cluster_dropped + b.metrics().cluster_dropped, 0);
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
    let mut z = login(&b, "z");
    // Garbage published on an id's channel (not a node's transfer frame):
    // counted and dropped; the id keeps working.
    until_routed(&mut x, &mut z);
    let bad = b.metrics().redis_bad_replies;
    let chan = format!("test{}:id:z", redis.addr().port());
    assert_eq!(redis.client().publish(&chan, b"\x00garbage"), 1);
    wait_until(|| b.metrics().redis_bad_replies > bad, "garbage counted");
    until_routed(&mut x, &mut z);
    // The probes' PUBLISH replies counted (they never wake the sender).
    wait_until(|| a.metrics().redis_in_flight == 0, "probes counted");
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

/// Subscribers Redis counts on `chan`.
fn numsub(redis: &RedisServer, chan: &str) -> i64 {
    match redis.client().cmd(&["PUBSUB", "NUMSUB", chan]) {
        Reply::Array(v) => match v.get(1) {
            Some(Reply::Int(n)) => *n,
            other => panic!("NUMSUB count: {other:?}"),
        },
        other => panic!("NUMSUB: {other:?}"),
    }
}

#[test]
fn a_login_repeated_on_one_connection_is_held_once_and_let_go_at_close() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    let mut rep = login(&a, "rep");
    let mut other = login(&b, "other");
    // relayd clients may send their login again; it changes nothing.
    let mut again = Vec::new();
    corerelay::protocol::rely::encode_login(&mut again, b"rep");
    rep.writer.send_raw(&again).unwrap();
    rep.writer.send_raw(&again).unwrap();
    until_routed(&mut other, &mut rep);
    let chan = format!("test{}:id:rep", redis.addr().port());
    assert_eq!(numsub(&redis, &chan), 1, "one node subscribes the id");
    drop(rep);
    // The close lets the channel go: a node that kept it would take (and
    // drop) every later transfer to the id, and a login elsewhere would
    // race its stale subscription.
    wait_until(|| numsub(&redis, &chan) == 0, "the id's channel let go");
    let key = format!("test{}:own:rep", redis.addr().port());
    wait_until(
        || {
            redis
                .client()
                .hgetall(&key)
                .iter()
                .all(|(k, _)| k != "owner")
        },
        "the claim given up",
    );
}

/// Transfer replies are read in batches, not as they come; a short
/// `request_timeout` must still never take a reply that sat unread for a
/// late one. Pings are slowed so nothing but the tick wakes the sender.
#[test]
fn replies_that_wait_for_their_batch_are_not_taken_for_timeouts() {
    let redis = RedisServer::start();
    let node_q = |name: &str| {
        node_of(
            &node_yaml(&redis, name, "  redis:\n    request_timeout: 90ms\n")
                .replace("ping_interval: 100ms", "ping_interval: 10s")
                .replace("node_expiry: 1s", "node_expiry: 30s"),
        )
    };
    let (a, b) = (node_q("a"), node_q("b"));
    let mut alice = login(&a, "alice");
    let mut bob = login(&b, "bob");
    until_routed(&mut bob, &mut alice);
    wait_until(
        || b.metrics().redis_in_flight == 0,
        "the probes' replies read",
    );
    let before = b.metrics();
    // Fewer than a batch, each then left to wait: the sending core sleeps
    // a whole tick (100 ms, past the 90 ms timeout) before it reads.
    for i in 0..3u32 {
        bob.send(b"alice", &i.to_be_bytes()).unwrap();
        let got = alice
            .recv(Some(WAIT))
            .unwrap()
            .expect("frame within the wait");
        assert_eq!(got.payload, i.to_be_bytes());
        let want = before.cluster_out + u64::from(i) + 1;
        wait_until(|| b.metrics().cluster_out >= want, "the transfer counted");
    }
    let m = b.metrics();
    assert_eq!(
        m.redis_timeouts, before.redis_timeouts,
        "a reply taken for a timeout"
    );
    assert_eq!(m.cluster_dropped, before.cluster_dropped);
    // And the link stayed up: one more still crosses.
    bob.send(b"alice", b"after").unwrap();
    assert_eq!(alice.recv(Some(WAIT)).unwrap().unwrap().payload, b"after");
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
    // Every login made (80 accepted and logged in), one left open.
    let sum = |f: fn(&corerelay::engine::metrics::Snapshot) -> u64| {
        nodes.iter().map(|n| f(&n.metrics())).sum::<u64>()
    };
    let deadline = Instant::now() + WAIT;
    while !(sum(|m| m.accepted) == 80 && sum(|m| m.connections) == 1) {
        assert!(
            Instant::now() < deadline,
            "not one racer left: accepted {} open {} kicks {}/{} held on a {:?} b {:?} claim {:?}",
            sum(|m| m.accepted),
            sum(|m| m.connections),
            nodes[0].metrics().cluster_kicks,
            nodes[1].metrics().cluster_kicks,
            nodes[0].owner_core(b"racer"),
            nodes[1].owner_core(b"racer"),
            redis
                .client()
                .cmd(&["HGETALL", &format!("{prefix}:own:racer")]),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// An admin call on `n`, with its `X-Corerelay-Nodes` header.
fn admin(n: &ServerHandle, method: &str, target: &str, body: &[u8]) -> (HttpResponse, String) {
    let r = http(n.admin_addrs()[0], method, target, &[], body);
    let nodes = r
        .head
        .lines()
        .find_map(|l| l.strip_prefix("X-Corerelay-Nodes: "))
        .unwrap_or_default()
        .to_owned();
    (r, nodes)
}

/// Waits until `n` answers admin calls for `want` nodes (`answered/known`).
fn until_nodes(n: &ServerHandle, want: &str) {
    wait_until(
        || admin(n, "POST", "/send?room=nobody", b"x").1 == want,
        "the node registry",
    );
}

#[test]
fn admin_calls_reach_every_node_and_sum_their_counts() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    let mut clients: Vec<WsRaw> = Vec::new();
    for (n, count) in [(&a, 3), (&b, 2)] {
        for i in 0..count {
            let id = format!("{}{i}", n.config().cluster.as_ref().unwrap().node_id);
            clients.push(WsRaw::connect(n.ws_addrs()[0], &format!("/room/r1/{id}")));
            wait_until(|| n.owner_core(id.as_bytes()).is_some(), "ws login");
        }
    }
    until_nodes(&a, "2/2");
    until_nodes(&b, "2/2");
    // A tag selector: every node's matching connections, one total.
    let (r, nodes) = admin(&a, "POST", "/send?room=r1", b"hello everyone");
    assert_eq!(
        (r.status, r.text(), nodes.as_str()),
        (200, "5".into(), "2/2")
    );
    for c in &mut clients {
        assert_eq!(c.read().unwrap().payload, b"hello everyone");
    }
    // Ids wherever they are.
    let (r, nodes) = admin(&b, "POST", "/send?id=a0,b1,nobody", b"to two");
    assert_eq!((r.text(), nodes.as_str()), ("2".into(), "2/2"));
    assert_eq!(clients[0].read().unwrap().payload, b"to two");
    assert_eq!(clients[4].read().unwrap().payload, b"to two");
    // settags on every node, then a selector on the new tag.
    let (r, _) = admin(&a, "POST", "/settags?room=r1", b"team=blue");
    assert_eq!(r.text(), "5");
    let (r, _) = admin(&b, "POST", "/close?team=blue", b"");
    assert_eq!(r.text(), "5");
    for c in &mut clients {
        assert_eq!(c.expect_close(), 1000);
    }
    // /status of every node on request.
    let w = WsRaw::connect(b.ws_addrs()[0], "/room/r2/late");
    wait_until(|| b.owner_core(b"late").is_some(), "ws login");
    let (r, nodes) = admin(&a, "GET", "/status?nodes=all", b"");
    assert_eq!(nodes, "2/2");
    assert!(r.text().contains("node=b id=late"), "{}", r.text());
    let (r, nodes) = admin(&a, "GET", "/status", b"");
    assert!(
        nodes.is_empty() && !r.text().contains("id=late"),
        "this node only"
    );
    drop(w);
    assert!(a.metrics().cluster_surveys >= 4);
    assert!(b.metrics().cluster_surveys_in >= 4);
}

#[test]
fn a_stopped_node_says_goodbye_and_calls_stop_waiting_for_it() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "a", ""), node(&redis, "b", ""));
    until_nodes(&a, "2/2");
    b.shutdown();
    b.wait();
    until_nodes(&a, "1/1");
}

#[test]
fn a_killed_node_loses_only_its_own_and_its_ids_log_in_elsewhere_at_once() {
    let redis = RedisServer::start();
    let a = node(&redis, "a", "");
    let dir = std::env::temp_dir().join(format!("corerelay-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("b.yaml");
    std::fs::write(&cfg, node_yaml(&redis, "b", "")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_corerelay"))
        .args(["-c", cfg.to_str().unwrap(), "-v"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let rely: std::net::SocketAddr = loop {
        let l = lines.next().expect("a log line").unwrap();
        if let Some(addr) = l.split("listening: rely on ").nth(1) {
            break addr.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let mut stay = login(&a, "stay");
    let mut kb = RelyClient::connect(rely, b"kb").unwrap();
    until_routed(&mut stay, &mut kb);
    until_nodes(&a, "2/2");
    child.kill().unwrap(); // SIGKILL: no goodbye
    child.wait().unwrap();
    // Its id logs in here at once and is reachable.
    let mut kb2 = login(&a, "kb");
    stay.send(b"kb", b"after").unwrap();
    assert_eq!(kb2.recv(Some(WAIT)).unwrap().unwrap().payload, b"after");
    // Calls answer without it after the survey timeout, then not wait at
    // all once its entry expires (node_expiry 1 s).
    let t = Instant::now();
    let (r, nodes) = admin(&a, "POST", "/send?room=nobody", b"x");
    assert!(
        r.status == 200 && (nodes == "1/2" || nodes == "1/1"),
        "{nodes}"
    );
    assert!(t.elapsed() < WAIT);
    until_nodes(&a, "1/1");
    let t = Instant::now();
    assert_eq!(admin(&a, "POST", "/send?room=nobody", b"x").1, "1/1");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "no wait for a forgotten node"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_redis_outage_degrades_to_single_nodes_and_the_newest_login_keeps_its_id_after() {
    let redis = RedisServer::start();
    // Quick reconnects, so the test does not wait out a long backoff.
    let extra = "  redis:\n    reconnect_delay: 20ms\n    reconnect_max_delay: 200ms\n";
    let (a, b) = (node(&redis, "a", extra), node(&redis, "b", extra));
    let mut x = login(&a, "x");
    let mut y = login(&a, "y");
    let mut z = login(&b, "z");
    until_routed(&mut x, &mut z);
    let port = redis.kill();
    wait_until(|| a.metrics().redis_cmd_up == 0, "node a sees Redis gone");
    // Alone, each node still serves its own.
    x.send(b"y", b"local during the outage").unwrap();
    assert_eq!(
        y.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"local during the outage"
    );
    let before = a.metrics().cluster_dropped;
    x.send(b"z", b"lost").unwrap();
    wait_until(
        || a.metrics().cluster_dropped > before,
        "cross-node drop counted",
    );
    // One id logs in on both nodes while they cannot see each other:
    // first on a, later on b.
    // (Epochs are microseconds: the second login's is later.)
    let mut old = login(&a, "dup");
    let mut new = login(&b, "dup");
    // Redis comes back empty (no persistence): the nodes subscribe and
    // claim their ids again; the newer login of "dup" keeps it, whichever
    // node claims first.
    let redis = RedisServer::on(port);
    assert!(old.reader.closed_within(WAIT), "the older dup is closed");
    let mut rc = redis.client();
    wait_until(
        || matches!(rc.cmd(&["HGET", &format!("test{port}:own:dup"), "owner"]), Reply::Bulk(v) if v == b"b"),
        "b owns dup",
    );
    until_routed(&mut x, &mut z);
    until_routed(&mut x, &mut new);
    wait_until(
        || matches!(rc.cmd(&["HGET", &format!("test{port}:own:x"), "owner"]), Reply::Bulk(v) if v == b"a"),
        "x claimed again",
    );
}

#[test]
fn a_long_login_keeps_its_claim_alive() {
    let redis = RedisServer::start();
    let a = node(&redis, "a", "  owner_ttl: 2s\n");
    let _l = login(&a, "long");
    let key = format!("test{}:own:long", redis.addr().port());
    let mut rc = redis.client();
    let ttl = |rc: &mut crate::support::redis::RedisClient| match rc.cmd(&["PTTL", &key]) {
        Reply::Int(ms) => ms,
        other => panic!("{other:?}"),
    };
    wait_until(|| ttl(&mut rc) > 0, "claimed");
    // Renewed every half owner_ttl (1 s): it runs down past 1.5 s left,
    // then is back above it, and the key outlives its first 2 s.
    wait_until(|| ttl(&mut rc) < 1500, "running down");
    wait_until(|| ttl(&mut rc) > 1500, "renewed");
    let deadline = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < deadline {
        assert!(ttl(&mut rc) > 0, "the claim of a live login never lapses");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_survey_over_the_message_cap_stays_on_its_node_and_says_so() {
    let redis = RedisServer::start();
    let (a, b) = (
        node(&redis, "a", "  max_message_size: 1KiB\n"),
        node(&redis, "b", ""),
    );
    until_nodes(&a, "2/2");
    let _w = WsRaw::connect(b.ws_addrs()[0], "/room/r1/far");
    let t = Instant::now();
    let (r, nodes) = admin(&a, "POST", "/send?room=r1", &[b'x'; 2048]);
    // Not sent to b (it would pass the cap): this node's count at once,
    // with the left-out node visible.
    assert_eq!((r.text(), nodes.as_str()), ("0".into(), "1/2"));
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "no wait for the survey timeout"
    );
    assert!(a.metrics().cluster_dropped >= 1);
}

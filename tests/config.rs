//! Config loading as a user meets it.

use corerelay::config::Config;

#[test]
fn example_config_is_valid_and_documents_every_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml.example");
    let cfg = Config::load(std::path::Path::new(path)).expect("example loads");
    assert_eq!(cfg.rely.listen[0].port(), 33333);
    let text = std::fs::read_to_string(path).unwrap();
    for key in [
        "workers",
        "cpus",
        "pin",
        "busy_poll",
        "max_connections",
        "accept_batch",
        "read_buffer",
        "mesh_capacity",
        "shutdown_grace",
        "send_timeout",
        "log_format",
        "max_memory",
        "backlog",
        "rely",
        "listen",
        "max_payload",
        "check_from",
        "idle_timeout",
        "max_output_bytes",
        "slow_consumer",
    ] {
        assert!(
            text.contains(&format!("{key}:")),
            "config.yaml.example documents {key}"
        );
    }
}

/// A commented block of config.yaml.example, uncommented as the example
/// tells a user to (one '#' removed from each line).
fn example_block(start: &str, end: &str) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml.example"))
        .unwrap();
    let from = text.find(start).expect("block start");
    let to = text.find(end).expect("block end marker");
    text[from..to]
        .lines()
        .map(|l| l.strip_prefix('#').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_documents(block: &str, keys: &[&str]) {
    for key in keys {
        assert!(
            block.contains(&format!("{key}:")),
            "config.yaml.example documents {key}"
        );
    }
}

/// The WebSocket/admin block is valid and documents every key.
#[test]
fn example_websocket_block_is_valid() {
    let block = example_block("#websocket:", "# --- end of the WebSocket");
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    let ws = cfg.websocket.expect("websocket");
    assert_eq!(ws.endpoints.len(), 2);
    assert_eq!(cfg.admin.expect("admin").listen[0].port(), 6666);
    assert_documents(
        &block,
        &[
            "handshake_timeout",
            "max_handshake_bytes",
            "ping_interval",
            "pong_timeout",
            "idle_timeout",
            "max_output_bytes",
            "slow_consumer",
            "endpoints",
            "path",
            "on_message",
            "max_message_size",
            "set_tags",
            "tag_params",
            "id_param",
            "id_prefix",
            "broadcast_tag",
            "allowed_origins",
            "allow",
            "max_request_bytes",
            "on_websocket_listener",
            "request_timeout",
        ],
    );
}

/// The sources block is valid, documents every key, and reads like
/// Veylor's own config.
#[test]
fn example_sources_block_is_valid() {
    let block = example_block("#sources:", "# --- end of the sources section");
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    assert_eq!(cfg.sources.len(), 1);
    assert_eq!(cfg.performance.max_queue_size, 1000);
    assert_documents(
        &block,
        &[
            "url",
            "headers",
            "websocket_port",
            "websocket_host",
            "unix_socket_path",
            "unix_socket_mode",
            "force_binary",
            "echo_upstream",
            "max_message_size",
            "connect_timeout",
            "ca_file",
            "max_queue_size",
            "reconnect_delay",
            "reconnect_max_delay",
            "reconnect_max_attempts",
        ],
    );
}

#[test]
fn errors_name_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("corerelay-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bad.yaml");
    std::fs::write(
        &p,
        "workers: 2\nrely:\n  listen: [\"127.0.0.1:0\"]\n  max_payload: huge\n",
    )
    .unwrap();
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("bad.yaml:4"), "{e}");
    assert!(e.contains("rely.max_payload"), "{e}");
    std::fs::write(&p, "wrokers: 2\n").unwrap();
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(e.contains("bad.yaml:1") && e.contains("wrokers"), "{e}");
    std::fs::write(&p, "rely:\n  slow_consumer: explode\n").unwrap();
    let e = Config::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.yaml:2") && e.contains("slow_consumer"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The Veltix block is valid and documents every key.
#[test]
fn example_veltix_block_is_valid() {
    let block = example_block("#veltix:", "# --- end of the Veltix section");
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    assert_eq!(cfg.veltix.len(), 1);
    assert_eq!(cfg.veltix[0].max_message_size, 10 * 1024 * 1024);
    assert_documents(
        &block,
        &[
            "listen",
            "version",
            "on_message",
            "max_clients",
            "max_message_size",
            "handshake_timeout",
            "ping_interval",
            "pong_timeout",
        ],
    );
    let e = Config::from_yaml(
        "veltix:\n  - listen: \"127.0.0.1:1\"\n    version: 2\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("veltix[0].version"), "{e}");
}

/// Durations are bounded at validation: a value no deadline can hold is an
/// error naming its key, not a panic at shutdown.
#[test]
fn durations_out_of_range_are_refused() {
    for yaml in [
        "shutdown_grace: 18446744073709551615\n",
        "shutdown_grace: 99999999999h\n",
        "rely:\n  idle_timeout: 18446744073709551615\n",
    ] {
        let e = Config::from_yaml(yaml, None).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{yaml}: {e}");
    }
}

/// Unset, max_connections stays below the file limit, with a reserve, so
/// the server never runs out of descriptors on its own.
#[test]
fn default_max_connections_fits_the_file_limit() {
    let cfg = Config::defaults();
    let hard = corerelay::sys::file_limit().expect("getrlimit").hard;
    assert!(
        cfg.max_connections as u64 + 256 <= hard.max(257),
        "{} vs {hard}",
        cfg.max_connections
    );
    assert!(cfg.max_connections <= 1_000_000);
    let set = Config::from_yaml("max_connections: 5\n", None).unwrap();
    assert_eq!(set.max_connections, 5, "an explicit value is kept");
}

/// The Redis and wsproxy block is valid and documents every key.
#[test]
fn example_redis_block_is_valid() {
    let block = example_block(
        "#websocket:\n#  listen: [\"0.0.0.0:8080\"]",
        "# --- end of the Redis",
    );
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    let s = cfg.websocket.expect("websocket").endpoints[0]
        .session
        .clone()
        .expect("a session endpoint");
    assert_eq!(s.auth_grace_period, std::time::Duration::from_secs(10800));
    let r = cfg.redis.expect("redis");
    assert_eq!((r.target.host.as_str(), r.target.port), ("127.0.0.1", 6379));
    assert_documents(
        &block,
        &[
            "session_param",
            "auth",
            "auth_timeout",
            "auth_grace_period",
            "prefix",
            "url",
            "connect_timeout",
            "request_timeout",
            "max_reply_bytes",
            "max_pending_bytes",
            "ping_interval",
            "reconnect_delay",
            "reconnect_max_delay",
            "client_name",
            "per_core",
        ],
    );
}

#[test]
fn wsproxy_endpoints_need_redis_and_their_parameter() {
    let e = Config::from_yaml(
        "websocket:\n  endpoints:\n    - path: /{a}/ws/{session_id}\n      wsproxy: {}\n",
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("need a redis: section"), "{e}");
    assert_eq!(e.line, Some(4), "{e}");
    let e = Config::from_yaml(
        "redis: {}\nwebsocket:\n  endpoints:\n    - path: /ws/{id}\n      wsproxy: {}\n",
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("\"session_id\" is not in the path"),
        "{e}"
    );
    let e = Config::from_yaml("redis:\n  url: \"redis://:hunter2@h:x\"\n", None).unwrap_err();
    assert!(e.to_string().contains("redis.url"), "{e}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

/// The events block is valid and documents every key.
#[test]
fn example_events_block_is_valid() {
    let block = example_block(
        "#websocket:\n#  listen: [\"0.0.0.0:5000\"]",
        "# --- end of the events",
    );
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    let ep = &cfg.websocket.expect("websocket").endpoints[0];
    assert!(ep.events);
    assert_eq!(ep.json_vars.len(), 2);
    let ev = cfg.events.expect("events");
    assert_eq!(ev.stream.fixed(), Some("connectionevents"));
    assert_eq!(Some(cfg.sync.expect("sync").server), ev.redis_server());
    assert_documents(
        &block,
        &[
            "events",
            "stream_include_tags",
            "json_extract_vars",
            "stream_name",
            "stream_maxlen",
            "sync",
            "ttl",
        ],
    );
}

/// The cluster block is valid and documents every key; bad names and a
/// cluster Redis shared with a core-0-only `redis:` are refused by key.
#[test]
fn example_cluster_block_is_valid() {
    let block = example_block("#cluster:", "# --- end of the cluster section");
    let cfg = Config::from_yaml(&block, None).expect("uncommented block loads");
    let c = cfg.cluster.as_ref().expect("a cluster");
    assert_eq!(
        (c.node_id.as_str(), c.prefix.as_str()),
        ("relay-1", "corerelay")
    );
    assert_eq!(c.max_message_size, 8 << 20);
    assert!(cfg.redis_subscribes(c.server));
    assert_documents(
        &block,
        &[
            "redis_url",
            "node_id",
            "prefix",
            "max_message_size",
            "owner_ttl",
            "ping_interval",
            "node_expiry",
            "survey_timeout",
        ],
    );
    let e = Config::from_yaml("cluster:\n  node_id: \"a b\"\n", None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("cluster.node_id"), "{e}");
    let e = Config::from_yaml(
        "redis:\n  url: redis://127.0.0.1:1\n  per_core: false\ncluster:\n  redis_url: redis://127.0.0.1:1\n",
        None,
    )
    .unwrap_err();
    assert_eq!(e.key.as_deref(), Some("redis.per_core"), "{e}");
    // No node_id: the host name and a random suffix.
    let a = Config::from_yaml("cluster: {}\n", None).unwrap();
    let b = Config::from_yaml("cluster: {}\n", None).unwrap();
    assert_ne!(a.cluster.unwrap().node_id, b.cluster.unwrap().node_id);
}

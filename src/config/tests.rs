//! Unit tests of parsing and validation.

use super::validate::check_log_level;
use super::*;

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
    assert!(parse_duration("5 parsecs").is_err());
    assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
    assert_eq!(parse_size("64K").unwrap(), 64 << 10);
    assert!(parse_size("lots").is_err());
}

#[test]
fn defaults_match_relayd() {
    let c = Config::defaults();
    assert_eq!(
        c.rely.listen,
        vec!["0.0.0.0:33333".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.rely.max_payload, 8 << 20);
    assert!(c.workers >= 1);
    assert_eq!(DEFAULT_RELY_LISTEN, "0.0.0.0:33333");
}

#[test]
fn websocket_endpoints() {
    let c = Config::from_yaml(
        "websocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /echo\n      on_message: echo\n    - path: /{agent_id}/ws/{session_id}\n      id_param: session_id\n",
        None,
    )
    .unwrap();
    let ws = c.websocket.unwrap();
    assert_eq!(ws.route("/echo").unwrap().0, 0);
    let (i, p) = ws.route("/a%20b/ws/s1").unwrap();
    assert_eq!(i, 1);
    assert_eq!(
        p,
        vec![
            ("agent_id".into(), "a b".into()),
            ("session_id".into(), "s1".into())
        ]
    );
    assert!(ws.route("/a/ws/").is_none() && ws.route("/nope").is_none());
    let e = Config::from_yaml(
        "websocket:\n  endpoints:\n    - path: /x/{a}\n      id_param: b\n",
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("websocket.endpoints[0]"), "{e}");
}

#[test]
fn veylor_config_as_written() {
    let c = Config::from_yaml(
        "sources:\n  - url: \"ws://127.0.0.1:9000/feed?x=1\"\n    headers:\n      Authorization: \"Bearer t\"\n    websocket_port: 8765\n    unix_socket_path: \"/tmp/v.sock\"\nperformance:\n  max_queue_size: 1000\n  reconnect_delay: 5\n  reconnect_max_attempts: 0  # 0 for infinite\n",
        None,
    )
    .unwrap();
    let s = &c.sources[0];
    assert_eq!(
        s.target,
        WsUrl {
            tls: false,
            host: "127.0.0.1".into(),
            port: 9000,
            path: "/feed?x=1".into(),
            userinfo: None,
        }
    );
    assert_eq!(s.url, "ws://127.0.0.1:9000/feed?x=***", "shown masked");
    assert_eq!(s.websocket, Some("0.0.0.0:8765".parse().unwrap()));
    assert_eq!(
        s.headers,
        vec![("Authorization".to_string(), "Bearer t".to_string())]
    );
    assert_eq!(c.performance.reconnect_delay, Duration::from_secs(5));
    let e = Config::from_yaml("sources:\n  - url: ws://h/\n", None).unwrap_err();
    assert!(
        e.to_string().contains("websocket_port or unix_socket_path"),
        "{e}"
    );
    assert_eq!(WsUrl::parse("ws://[::1]:81").unwrap().host, "::1");
    assert_eq!(WsUrl::parse("ws://h?q").unwrap().path, "/?q");
    assert!(WsUrl::parse("http://h").is_err());
}

#[test]
fn cidr() {
    let n = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(n.contains("10.1.2.3".parse().unwrap()));
    assert!(!n.contains("10.2.0.1".parse().unwrap()));
    let lo = Cidr::parse("127.0.0.0/8").unwrap();
    assert!(
        lo.contains("::ffff:127.0.0.1".parse().unwrap()),
        "v4-mapped"
    );
    assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
    assert!(Cidr::parse("10.0.0.0/33").is_err() && Cidr::parse("nope").is_err());
    let admin = Config::defaults()
        .admin
        .expect("the admin API on the embedded defaults");
    assert_eq!(
        admin.listen,
        vec!["127.0.0.1:6666".parse().unwrap()],
        "loopback only"
    );
    let off = Config::from_yaml("admin: {listen: []}\n", None).unwrap();
    assert!(off.admin.unwrap().listen.is_empty());
}

#[test]
fn errors_name_line_and_key() {
    let e = Config::from_yaml("workers: 2\nrely:\n  idle_timeout: soon\n", None).unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    assert_eq!(e.key.as_deref(), Some("rely.idle_timeout"), "{e}");
    let e = Config::from_yaml("rely:\n  bogus: 1\n", None).unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = Config::from_yaml("workers: 2\nmax_connections: 0\n", None).unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert_eq!(e.key.as_deref(), Some("max_connections"));
}

#[test]
fn url_secrets_are_masked_and_userinfo_becomes_basic_auth() {
    assert_eq!(
        redact_url("wss://user:s3cret@feed.example:443/a/b?token=hunter2&v=1&flag"),
        "wss://***@feed.example:443/a/b?token=***&v=***&flag"
    );
    let c = Config::from_yaml(
        "sources:\n  - url: \"ws://user:s3cret@127.0.0.1:9000/feed\"\n    websocket_port: 0\n",
        None,
    )
    .unwrap();
    let s = &c.sources[0];
    assert_eq!(s.url, "ws://***@127.0.0.1:9000/feed");
    assert_eq!(s.target.host, "127.0.0.1");
    assert_eq!(
        s.headers,
        vec![(
            "Authorization".to_string(),
            "Basic dXNlcjpzM2NyZXQ=".to_string()
        )]
    );
    let e = Config::from_yaml(
        "sources:\n  - url: \"ws://user:s3cret@h:badport/feed\"\n    websocket_port: 0\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("port") && !e.contains("s3cret"), "{e}");
}

#[test]
fn listeners_on_one_port_are_refused_with_the_second_key() {
    let e = Config::from_yaml(
        "rely:\n  listen: [\"0.0.0.0:5000\"]\nwebsocket:\n  listen: [\"127.0.0.1:5000\"]\n  endpoints:\n    - path: /x\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("websocket.listen") && e.contains("overlaps rely.listen"),
        "{e}"
    );
    assert!(e.contains(":4:"), "names the line: {e}");
    let e = Config::from_yaml(
        "sources:\n  - url: \"ws://h/\"\n    websocket_port: 8080\nveltix:\n  - listen: \"0.0.0.0:8080\"\n",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("veltix[0].listen"), "{e}");
    // Port 0, other ports, or other families do not clash.
    Config::from_yaml(
        "rely:\n  listen: [\"127.0.0.1:0\", \"[::1]:5000\"]\nwebsocket:\n  listen: [\"127.0.0.1:0\", \"0.0.0.0:5000\"]\n  endpoints:\n    - path: /x\n",
        None,
    )
    .expect("no clash");
}

#[test]
fn a_veylor_shaped_file_serves_what_veylor_serves() {
    let veylor = "sources:\n  - url: \"ws://127.0.0.1:9000/feed\"\n    websocket_port: 8765\n";
    let c = Config::from_yaml(veylor, None).unwrap();
    assert!(c.rely.listen.is_empty(), "no RELY on 0.0.0.0");
    assert!(c.sources[0].force_binary, "binary, as Veylor sends");
    let c = Config::from_yaml(&format!("{veylor}    force_binary: false\n"), None).unwrap();
    assert!(!c.sources[0].force_binary, "unless the file says otherwise");
    let mixed = format!("rely:\n  listen: [\"127.0.0.1:0\"]\n{veylor}");
    let c = Config::from_yaml(&mixed, None).unwrap();
    assert!(
        !c.sources[0].force_binary && c.rely.listen.len() == 1,
        "not Veylor-shaped"
    );
    assert_eq!(
        Config::defaults().rely.listen[0].port(),
        33333,
        "relayd's default kept"
    );
}

#[test]
fn reload_merge_applies_live_settings_and_keeps_restart_ones() {
    let yaml = |workers: u32, path: &str, out: &str, allow: &str| {
        format!("workers: {workers}\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  max_output_bytes: {out}\n  endpoints:\n    - path: {path}\nadmin:\n  listen: [\"127.0.0.1:0\"]\n  allow: [\"{allow}\"]\n")
    };
    let run = Config::from_yaml(&yaml(2, "/a", "1MiB", "127.0.0.0/8"), None).unwrap();
    // Nothing changed.
    let same = merge(
        &run,
        Config::from_yaml(&yaml(2, "/a", "1MiB", "127.0.0.0/8"), None).unwrap(),
    );
    assert!(
        same.applied.is_empty() && same.restart.is_empty(),
        "{same:?}"
    );
    // A limit and the allow-list apply; the workers and the endpoint
    // paths stay as running.
    let m = merge(
        &run,
        Config::from_yaml(&yaml(4, "/b", "64KiB", "10.0.0.0/8"), None).unwrap(),
    );
    assert_eq!(m.restart, vec!["workers", "websocket.endpoints (paths)"]);
    assert_eq!(m.applied, vec!["websocket", "admin"]);
    assert_eq!(m.live.workers, 2);
    let ws = m.live.ws();
    assert_eq!(ws.max_output_bytes, 64 << 10);
    assert_eq!(ws.endpoints[0].path, "/a");
    assert!(!m
        .live
        .admin
        .as_ref()
        .unwrap()
        .allows("127.0.0.1".parse().unwrap()));
}

#[test]
fn log_level_is_checked() {
    for good in ["info", "warn,corerelay::engine=debug", "OFF"] {
        assert!(check_log_level(good).is_ok(), "{good}");
    }
    for bad in ["", "loud", "corerelay", "corerelay=verbose", "=info"] {
        assert!(check_log_level(bad).is_err(), "{bad}");
    }
    let e = Config::from_yaml("log_level: chatty\n", None).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("log_level"));
}

#[test]
fn reload_matches_sources_by_where_their_clients_connect() {
    let src = |url: &str, port: u16, extra: &str| {
        format!("  - url: \"{url}\"\n    websocket_port: {port}\n    websocket_host: \"127.0.0.1\"\n{extra}")
    };
    let cfg = |s: String| {
        Config::from_yaml(&format!("workers: 1\npin: false\nsources:\n{s}"), None).unwrap()
    };
    let run = cfg(src("ws://127.0.0.1:9/a", 9001, "") + &src("ws://127.0.0.1:9/b", 9002, ""));
    // b's URL changes (same port: same source, dialled again); a goes; c
    // is new; b keeps slot 1 and c takes slot 2.
    let new = cfg(src("ws://127.0.0.1:9/b2", 9002, "    force_binary: true\n")
        + &src("ws://127.0.0.1:9/c", 9003, ""));
    let m = merge_sources(&run.sources, new.sources);
    let urls: Vec<(&str, bool)> = m
        .slots
        .iter()
        .map(|s| (s.url.as_str(), s.retired))
        .collect();
    assert_eq!(
        urls,
        vec![
            ("ws://127.0.0.1:9/a", true),
            ("ws://127.0.0.1:9/b2", false),
            ("ws://127.0.0.1:9/c", false)
        ]
    );
    assert_eq!(m.redial, vec![1]);
    assert!(m.slots[1].force_binary);
    // A retired slot stays retired; the same source added again takes a
    // new slot.
    let again = merge_sources(&m.slots, cfg(src("ws://127.0.0.1:9/a", 9001, "")).sources);
    assert_eq!(again.slots.len(), 4);
    assert!(again.slots[..3].iter().all(|s| s.retired));
    assert!(!again.slots[3].retired);
    // Only options: nothing dialled again.
    let opts = merge_sources(
        &run.sources,
        cfg(
            src("ws://127.0.0.1:9/a", 9001, "    max_message_size: 1KiB\n")
                + &src("ws://127.0.0.1:9/b", 9002, ""),
        )
        .sources,
    );
    assert!(opts.redial.is_empty() && opts.slots.len() == 2);
}

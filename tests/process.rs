//! The `corerelay` binary as an operator runs it: CLI, config errors before
//! binding, signals and graceful shutdown.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corerelay::client::rely::RelyClient;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_corerelay");

fn write_config(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("corerelay-proc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Starts the binary (`-c config -v`) and returns it with its RELY address,
/// read from the start-up log (bounded).
fn spawn(config: &std::path::Path) -> (Child, SocketAddr) {
    let (child, addr, _logs) =
        spawn_logged(Command::new(BIN).args(["-c", config.to_str().unwrap(), "-v"]));
    (child, addr)
}

/// Runs `cmd` (which starts the server), returning it, its RELY address and
/// a channel of its later log lines.
fn spawn_logged(cmd: &mut Command) -> (Child, SocketAddr, std::sync::mpsc::Receiver<String>) {
    let (child, rx) = spawn_with_logs(cmd);
    let deadline = Instant::now() + WAIT;
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server logs its listener");
        if let Some(a) = line.split("listening: rely on ").nth(1) {
            break a.trim().parse().unwrap();
        }
    };
    (child, addr, rx)
}

/// Runs `cmd`, returning it and a channel of its log lines (disconnected
/// once it exits).
fn spawn_with_logs(cmd: &mut Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drain to EOF even if nobody listens, so the server's log writes
        // never fail on a closed pipe; bytes that are not UTF-8 must not
        // end the reader (lines() would stop there).
        let mut r = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match std::io::BufRead::read_until(&mut r, b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {
                    let _ = tx.send(String::from_utf8_lossy(&buf).trim_end().to_owned());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(format!("<test log reader stopped: {e}>"));
                    break;
                }
            }
        }
    });
    (child, rx)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "server did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn version_and_check_config() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let good = write_config("good", "workers: 1\nrely:\n  listen: [\"127.0.0.1:0\"]\n");
    let out = Command::new(BIN)
        .args(["--check-config", "-c", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // What only the host can tell: a socket directory that is not there.
    let missing = write_config(
        "nosockdir",
        "workers: 1\nsources:\n  - url: \"ws://127.0.0.1:9/x\"\n    unix_socket_path: /nonexistent-corerelay/feed.sock\n",
    );
    let out = Command::new(BIN)
        .args(["--check-config", "-c", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml:4") && err.contains("sources[0].unix_socket_path"),
        "{err}"
    );
    assert!(
        err.contains("/nonexistent-corerelay does not exist"),
        "{err}"
    );
    // A directory this user may not write to: mode 0555 for a user; for
    // root (whom modes do not stop), a root-owned 0755 directory checked
    // as nobody.
    let dir = std::env::temp_dir().join(format!("corerelay-proc-{}-rodir", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "workers: 1\nsources:\n  - url: \"ws://127.0.0.1:9/x\"\n    unix_socket_path: {}/feed.sock\n",
        dir.display()
    );
    let ro = write_config("rosockdir", &yaml);
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid(2) has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(ro.parent().unwrap(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A copy nobody may run, wherever the checkout lives.
        let bin = ro.parent().unwrap().join("corerelay");
        std::fs::copy(BIN, &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(["--check-config", "-c", ro.to_str().unwrap()])
            .output()
            .expect("setpriv (util-linux) runs the check as nobody")
    } else {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        Command::new(BIN)
            .args(["--check-config", "-c", ro.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.yaml:4")
            && err.contains("sources[0].unix_socket_path")
            && err.contains("is not writable by this user"),
        "{err}"
    );
}

#[test]
fn bad_config_exits_nonzero_before_binding() {
    // The port in the bad file must stay free: nothing binds on error.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bad = write_config(
        "bad",
        &format!("rely:\n  listen: [\"127.0.0.1:{port}\"]\n  idle_timeout: forever\n"),
    );
    let out = Command::new(BIN)
        .args(["-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.yaml:3"), "{err}");
    assert!(err.contains("rely.idle_timeout"), "{err}");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "nothing was bound"
    );
    let out = Command::new(BIN)
        .args(["-c", "/nonexistent/corerelay.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/corerelay.yaml"));
}

#[test]
fn sigterm_flushes_then_exits_zero() {
    let cfg = write_config(
        "term",
        "workers: 2\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\n",
    );
    let (mut child, addr) = spawn(&cfg);
    let mut alice = RelyClient::connect(addr, b"alice").unwrap();
    let mut bob = RelyClient::connect(addr, b"bob").unwrap();
    // Make sure both logins are in before sending (round trip through the relay).
    let deadline = Instant::now() + WAIT;
    loop {
        alice.send(b"bob", b"sync").unwrap();
        if bob.recv(Some(Duration::from_millis(50))).unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline);
    }
    while bob.recv(Some(Duration::from_millis(50))).unwrap().is_some() {}
    for i in 0..1000u32 {
        alice.send(b"bob", &i.to_be_bytes()).unwrap();
    }
    // Everything sent before the signal and read by the server is delivered.
    let mut got = 0u32;
    while got < 1000 {
        let m = bob.recv(Some(WAIT)).unwrap().expect("delivered");
        assert_eq!(m.payload, got.to_be_bytes());
        got += 1;
    }
    signal(&child, libc::SIGTERM);
    assert!(
        bob.reader.closed_within(WAIT),
        "clients are closed at shutdown"
    );
    let st = wait_exit(&mut child);
    assert_eq!(st.code(), Some(0), "graceful exit is 0");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer accepting"
    );
}

#[test]
fn second_signal_exits_at_once() {
    // A receiver that never reads keeps output queued, so the graceful drain
    // would wait for the whole (long) grace period.
    let cfg = write_config(
        "twice",
        "workers: 1\npin: false\nshutdown_grace: 60s\nrely:\n  listen: [\"127.0.0.1:0\"]\n  max_output_bytes: 64MiB\n",
    );
    let (mut child, addr) = spawn(&cfg);
    let mut stuck = RelyClient::connect(addr, b"stuck").unwrap();
    // A message to itself proves the login is registered.
    stuck.send(b"stuck", b"in").unwrap();
    assert!(stuck.recv(Some(WAIT)).unwrap().is_some());
    let mut alice = RelyClient::connect(addr, b"alice").unwrap();
    let payload = vec![1u8; 64 * 1024];
    // 16 MiB: write_all returns only once the server has read most of it
    // into the stuck receiver's queue (kernel buffers hold a few MiB).
    for _ in 0..256 {
        alice.send(b"stuck", &payload).unwrap();
    }
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    let t = Instant::now();
    signal(&child, libc::SIGTERM);
    let st = wait_exit(&mut child);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_ne!(st.code(), Some(0));
}

#[test]
fn positional_port_like_relayd() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .arg(port.to_string())
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut c = loop {
        if let Ok(c) = RelyClient::connect(("127.0.0.1", port), b"solo") {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "server listens on the given port"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    c.send(b"solo", b"echo to self").unwrap();
    assert_eq!(
        c.recv(Some(WAIT)).unwrap().unwrap().payload,
        b"echo to self"
    );
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

/// Starts the binary under `sh -c "ulimit -n N; exec ..."`.
fn spawn_limited(
    config: &std::path::Path,
    nofile: u32,
) -> (Child, SocketAddr, std::sync::mpsc::Receiver<String>) {
    spawn_logged(
        Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" -c \"$1\" -vv"))
            .arg(BIN)
            .arg(config),
    )
}

/// Out of file descriptors, the listener pauses instead of spinning, the
/// connected clients keep working, and queued connections are accepted once
/// descriptors free up.
#[test]
fn emfile_pauses_accept_and_recovers() {
    let cfg = write_config(
        "emfile",
        // Above the file limit on purpose (the default stays below it).
        // No admin listener: another test's request to the default admin
        // port would be one more failing accept here.
        "workers: 1\npin: false\nmax_connections: 1000\nrely:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: []\n",
    );
    let (mut child, addr, logs) = spawn_limited(&cfg, 48);
    // -vv: the per-connection debug lines explain a failure.
    let mut conns: Vec<Raw> = (0..70)
        .map(|i| {
            let mut c = Raw::connect(addr);
            c.send(&login_frame(&format!("c{i}")));
            c
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("EMFILE logged");
        if line.contains("accept on") && line.contains("pausing") {
            break;
        }
    }
    // Over about a second, a paused listener retries about ten times, and
    // logs none of them: the warning comes at most once per 10 s (a
    // spinning listener would log thousands).
    let window = Instant::now() + Duration::from_millis(1000);
    let mut retries = 0;
    while let Ok(line) = logs.recv_timeout(window.saturating_duration_since(Instant::now())) {
        retries += line.contains("pausing") as usize;
    }
    assert_eq!(retries, 0, "{retries} accept warnings in a second");
    // Free descriptors: every connection still open is (or becomes) served.
    conns.drain(..35);
    for (i, c) in conns.iter_mut().enumerate() {
        let id = format!("c{}", i + 35);
        let f = transfer_frame(&id, &id, b"me");
        c.send(&f);
        c.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = vec![0u8; f.len()];
        if let Err(e) = std::io::Read::read_exact(&mut c.0, &mut got) {
            let alive = child.try_wait().map(|st| st.is_none()).unwrap_or(false);
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            format!(
                                "{}->{}",
                                e.file_name().to_string_lossy(),
                                std::fs::read_link(e.path())
                                    .map(|p| p.display().to_string())
                                    .unwrap_or_default()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            eprintln!("server fds: {fds:?}");
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(st)) = child.try_wait() {
                    use std::os::unix::process::ExitStatusExt;
                    eprintln!("server exit: code {:?} signal {:?}", st.code(), st.signal());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut log = Vec::new();
            while let Ok(line) = logs.recv_timeout(Duration::from_millis(500)) {
                log.push(line);
            }
            panic!(
                "{id} not served after recovery: {e} (server alive: {alive})\nserver log:\n{}",
                log.join("\n")
            );
        }
        assert_eq!(got, f);
    }
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}

#[test]
fn systemd_notify_ready_and_stopping() {
    let dir = std::env::temp_dir().join(format!("corerelay-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let cfg = write_config(
        "notify",
        "workers: 1\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\n",
    );
    let mut child = Command::new(BIN)
        .args(["-c", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 sent");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    signal(&child, libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("STOPPING=1 sent");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The chat client as a person uses it: two terminals, type, read, /quit.
#[test]
fn chat_clients_talk() {
    use std::io::Write;
    let s = TestServer::start(2);
    let chat = |me: &str, peer: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_corerelay-chat"))
            .args(["--host", "127.0.0.1", "--port", &s.addr.port().to_string()])
            .args(["--client-id", me, "--to-client-id", peer])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = c.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (c, rx)
    };
    let (mut alice, _alice_out) = chat("alice", "bob");
    let (mut bob, bob_out) = chat("bob", "alice");
    wait_until(|| s.handle.logged_in() == 2, "both chat clients logged in");
    writeln!(alice.stdin.as_mut().unwrap(), "hello bob").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = bob_out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("bob prints");
        if line.contains("[alice] hello bob") {
            break;
        }
    }
    writeln!(alice.stdin.as_mut().unwrap(), "/quit").unwrap();
    writeln!(bob.stdin.as_mut().unwrap(), "/exit").unwrap();
    assert!(wait_exit(&mut alice).success());
    assert!(wait_exit(&mut bob).success());
}

/// The Veltix README's chat, on a corerelay Veltix hub: two chat clients in
/// Veltix mode; a line typed in one prints in the other.
#[test]
fn veltix_chat_clients_talk_through_a_hub() {
    use std::io::Write;
    let cfg = corerelay::Config::from_yaml(
        "workers: 2\npin: false\nrely:\n  listen: []\nveltix:\n  - listen: \"127.0.0.1:0\"\n",
        None,
    )
    .unwrap();
    let server = corerelay::Server::start(cfg).unwrap();
    let port = server.veltix_addrs()[0].port().to_string();
    let chat = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_corerelay-chat"))
            .args(["--host", "127.0.0.1", "--port", &port, "--veltix", "3"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = c.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (c, rx)
    };
    let (mut a, a_out) = chat();
    let (mut b, b_out) = chat();
    // The banner prints once the handshake is done, and the hub takes a
    // client before it accepts the handshake: both are members then.
    for out in [&a_out, &b_out] {
        let line = out.recv_timeout(WAIT).expect("banner");
        assert!(line.starts_with("connected to the Veltix hub"), "{line}");
    }
    writeln!(a.stdin.as_mut().unwrap(), "hello hub").unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = b_out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("b prints");
        if line.contains("[type 200] hello hub") {
            break;
        }
    }
    writeln!(a.stdin.as_mut().unwrap(), "/quit").unwrap();
    writeln!(b.stdin.as_mut().unwrap(), "/exit").unwrap();
    assert!(wait_exit(&mut a).success());
    assert!(wait_exit(&mut b).success());
}

/// Secrets in a source URL never leave the process: user:password becomes
/// a Basic Authorization header for the source, and neither it nor a query
/// token appears in the logs (at debug level), /status or /metrics.
#[test]
// tungstenite's header callback fixes its (large) error type.
#[allow(clippy::result_large_err)]
fn source_url_secrets_never_appear() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = upstream.local_addr().unwrap().port();
    let (auth_tx, auth_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let Some(tcp) = upstream.incoming().flatten().next() else {
            return;
        };
        let cb = |req: &tungstenite::handshake::server::Request,
                  resp: tungstenite::handshake::server::Response| {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let _ = auth_tx.send(auth);
            Ok(resp)
        };
        if let Ok(mut ws) = tungstenite::accept_hdr(tcp, cb) {
            while ws.read().is_ok() {}
        }
    });
    let cfg = write_config(
        "secrets",
        &format!(
            "workers: 1\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: [\"127.0.0.1:0\"]\nsources:\n  - url: \"ws://user:s3cret@127.0.0.1:{port}/feed?token=hunter2\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n"
        ),
    );
    let (mut child, _addr, logs) =
        spawn_logged(Command::new(BIN).args(["-c", cfg.to_str().unwrap(), "-vv"]));
    let auth = auth_rx.recv_timeout(WAIT).expect("the source was reached");
    assert_eq!(
        auth, "Basic dXNlcjpzM2NyZXQ=",
        "user:password as Basic auth"
    );
    let mut lines = Vec::new();
    let mut admin = None;
    let deadline = Instant::now() + WAIT;
    while admin.is_none() || !lines.iter().any(|l: &String| l.contains("connected")) {
        let Ok(line) = logs.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        if let Some(a) = line.split("listening: admin on ").nth(1) {
            admin = a.trim().parse::<SocketAddr>().ok();
        }
        lines.push(line);
    }
    let admin = admin.expect("admin listener logged");
    let status = http(admin, "GET", "/status", &[], b"").text();
    let metrics = http(admin, "GET", "/metrics", &[], b"").text();
    assert!(status.contains("source=ws://***@127.0.0.1"), "{status}");
    for (what, text) in [
        ("logs", lines.join("\n")),
        ("/status", status),
        ("/metrics", metrics),
    ] {
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "a secret in the {what}: {text}"
        );
    }
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
}

/// Waits (bounded) for a log line containing `what`; returns it.
fn expect_log(logs: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no log line with {what:?}"));
        if line.contains(what) {
            return line;
        }
    }
}

/// The address after `listening: <what> on ` in the start-up log.
fn listening(logs: &std::sync::mpsc::Receiver<String>, what: &str) -> SocketAddr {
    let line = expect_log(logs, &format!("listening: {what} on "));
    let Some(a) = line.split(" on ").nth(1) else {
        panic!("{line}")
    };
    a.trim().parse().unwrap()
}

/// SIGHUP never kills the server. An invalid file is logged and ignored.
/// A valid one applies live where it can: an endpoint's tags (for the
/// connections that open after it), a lowered limit (for the connections
/// already open too), the log level; what needs a restart (the worker
/// count) is named and kept. The connections stay up throughout.
#[test]
fn sighup_applies_live_changes_and_keeps_connections() {
    let body = |tag: &str, max_payload: &str, workers: u32, level: &str| {
        format!(
            "workers: {workers}\npin: false\nlog_level: {level}\nrely:\n  listen: [\"127.0.0.1:0\"]\n  max_payload: {max_payload}\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /room/{{room}}\n      set_tags: {{kind: {tag}}}\nadmin:\n  listen: [\"127.0.0.1:0\"]\n"
        )
    };
    let cfg = write_config("hup", &body("old", "1MiB", 2, "info"));
    // No -v: the file's log_level decides, and may change.
    let (child, addr, logs) = spawn_logged(Command::new(BIN).args(["-c", cfg.to_str().unwrap()]));
    let mut child = KillOnDrop(child);
    let ws = listening(&logs, "websocket");
    let admin = listening(&logs, "admin");
    let mut alice = RelyClient::connect(addr, b"alice").unwrap();
    let mut bob = RelyClient::connect(addr, b"bob").unwrap();
    let mut member = WsRaw::connect(ws, "/room/a");
    let count = |sel: &str| http(admin, "POST", &format!("/send?{sel}"), &[], b"hi").text();
    assert_eq!(count("kind=old"), "1");

    std::fs::write(&cfg, "workers: lots\n").unwrap();
    signal(&child.0, libc::SIGHUP);
    let line = expect_log(&logs, "SIGHUP:");
    assert!(line.contains("running configuration is kept"), "{line}");

    std::fs::write(&cfg, body("new", "64", 1, "debug")).unwrap();
    signal(&child.0, libc::SIGHUP);
    // The restart line, and the debug line each core writes when it takes
    // the configuration (so the new level is in force), in any order.
    let (mut restart, mut cores) = (None, 0);
    while restart.is_none() || cores < 2 {
        let line = expect_log(&logs, "");
        if line.contains("needs a restart") {
            restart = Some(line);
        } else if line.contains("configuration reloaded") {
            cores += 1;
        }
    }
    let line = restart.unwrap_or_default();
    assert!(line.contains("workers"), "{line}");
    assert!(child.0.try_wait().unwrap().is_none(), "still running");

    // The open member keeps the tags it joined with; a new one gets the
    // endpoint's new tags.
    let _late = WsRaw::connect(ws, "/room/b");
    assert_eq!(count("kind=new"), "1");
    assert_eq!(count("kind=old"), "1");
    assert_eq!(member.read().unwrap().payload, b"hi");

    // The lowered max_payload applies to the connections already open:
    // a 100-byte payload now closes its sender, and only it.
    alice.send(b"bob", &[b'x'; 100]).unwrap();
    assert!(alice.recv(Some(WAIT)).is_err(), "alice is closed");
    let mut carol = RelyClient::connect(addr, b"carol").unwrap();
    carol.send(b"bob", b"still here").unwrap();
    let m = bob.recv(Some(WAIT)).unwrap().expect("bob hears carol");
    assert_eq!(m.payload, b"still here");
    // The workers stayed as they were: two cores serve.
    let metrics = http(admin, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains("core=\"1\""), "{metrics}");

    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
}

/// As Veylor: run with no -c in a folder holding config.yaml, and that file
/// is used; a Veylor-shaped file opens no RELY listener.
#[test]
fn config_yaml_in_the_working_directory_is_used() {
    let dir = std::env::temp_dir().join(format!("corerelay-proc-{}-cwd", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        "pin: false\nworkers: 1\nsources:\n  - url: \"ws://127.0.0.1:9/feed\"\n    websocket_port: 0\n    websocket_host: \"127.0.0.1\"\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("-v")
        .current_dir(&dir)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !lines
        .iter()
        .any(|l: &String| l.contains("websocket=127.0.0.1:"))
    {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("start-up report: {lines:?}"));
        lines.push(line);
    }
    let log = lines.join("\n");
    assert!(
        log.contains("using ./config.yaml") && log.contains("config=config.yaml"),
        "{log}"
    );
    assert!(
        !log.contains("listening: rely"),
        "no RELY for a Veylor-shaped file: {log}"
    );
    signal(&child, libc::SIGTERM);
    assert!(wait_exit(&mut child).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The embedded defaults serve the admin API on 127.0.0.1:6666 (NATS's
/// monitoring port habit); if another process holds that port, the server
/// says so and runs without it.
#[test]
fn the_embedded_defaults_serve_the_admin_api_on_loopback() {
    // The RELY port is a free one picked here; another test's client
    // socket may take it before the child binds it, so a child that says
    // so is started again on another (bounded).
    let mut attempt = 0;
    let (child, bound) = loop {
        attempt += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (mut child, logs) = spawn_with_logs(Command::new(BIN).args(["-v", &port.to_string()]));
        // A child's start-up under a loaded test run (CI once took over 5 s).
        let deadline = Instant::now() + 4 * WAIT;
        let mut bound = None;
        let mut said = Vec::new();
        while bound.is_none() && Instant::now() < deadline {
            match logs.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.contains("listening: admin on 127.0.0.1:6666") => bound = Some(true),
                Ok(l) if l.contains("default admin API on 127.0.0.1:6666 is not available") => {
                    bound = Some(false)
                }
                Ok(l) => said.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                // The child exited: what it said is why.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(b) = bound {
            break (child, b);
        }
        let _ = child.kill();
        let _ = child.wait();
        let taken = said
            .iter()
            .any(|l| l.contains(&format!("cannot listen on 0.0.0.0:{port}")));
        assert!(
            taken && attempt < 3,
            "neither bound nor explained: {said:?}"
        );
    };
    // Killed whatever happens below.
    let mut child = KillOnDrop(child);
    // Otherwise another process holds it: said, and still serving RELY.
    if bound {
        let a: SocketAddr = "127.0.0.1:6666".parse().unwrap();
        assert_eq!(
            crate::support::http(a, "GET", "/health", &[], b"").status,
            200
        );
        let m = crate::support::http(a, "GET", "/metrics", &[], b"").text();
        assert!(m.contains("corerelay_accepted_total"), "{m}");
    }
    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
}

/// `--log-format json`: every line is one JSON object; connect and close
/// lines (debug) name the connection, peer, protocol and close reason.
#[test]
fn json_log_lines_parse_and_name_connections() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        "jsonlog",
        &format!(
            "rely: {{listen: [\"127.0.0.1:{port}\"]}}\nadmin: {{listen: []}}\nlog_format: json\n"
        ),
    );
    let mut child = Command::new(BIN)
        .args(["-vv", "-c", cfg.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, logs) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufRead::lines(BufReader::new(stderr)).map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut child = KillOnDrop(child);
    let deadline = Instant::now() + WAIT;
    let c = loop {
        if let Ok(c) = RelyClient::connect(("127.0.0.1", port), b"jsonlogger") {
            break c;
        }
        assert!(Instant::now() < deadline, "listening");
        std::thread::sleep(Duration::from_millis(20));
    };
    let me = c.local_addr().unwrap().to_string();
    drop(c);
    let (mut accepted, mut closed) = (false, false);
    while !(accepted && closed) && Instant::now() < deadline {
        let Ok(l) = logs.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        for k in ["ts", "level", "target", "message"] {
            assert!(v.get(k).is_some(), "{k} in {l}");
        }
        let msg = v["message"].as_str().unwrap();
        assert!(!msg.contains("Some(") && !msg.contains("None"), "{msg}");
        if msg.starts_with("accepted conn=") && msg.contains(&format!("peer={me} proto=rely")) {
            accepted = true;
        }
        if msg.starts_with("closed conn=")
            && msg.contains(&format!("peer={me} proto=rely reason=peer closed"))
        {
            closed = true;
        }
    }
    assert!(accepted && closed, "connect and close lines");
    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
}

/// Shell completions and the man page come from the same CLI definition.
#[test]
fn completions_and_man_page() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_corerelay()") && script.contains("--wsproxy"),
        "{script}"
    );
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH corerelay 1") && man.contains("log\\-format"),
        "{man}"
    );
}

/// SIGHUP reloads TLS certificates: the next handshakes present the new
/// one, and a connection opened before keeps its session.
#[test]
fn sighup_reloads_tls_certificates() {
    use std::io::{Read, Write};
    use std::sync::Arc;
    let make = || rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (a, b) = (make(), make());
    let dir = std::env::temp_dir().join(format!("corerelay-hup-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, a.cert.pem()).unwrap();
    std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
    let body = format!(
        "workers: 1\npin: false\nrely:\n  listen: [\"127.0.0.1:0\"]\n  tls: {{cert: \"{}\", key: \"{}\"}}\nadmin: {{listen: []}}\n",
        cert.display(),
        key.display()
    );
    let cfg = write_config("hup-tls", &body);
    let (child, addr, logs) =
        spawn_logged(Command::new(BIN).args(["-c", cfg.to_str().unwrap(), "-v"]));
    let mut child = KillOnDrop(child);
    // A client trusting both, reporting which certificate it was shown.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(a.cert.der().clone()).unwrap();
    roots.add(b.cert.der().clone()).unwrap();
    let client_cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let connect = || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(client_cfg.clone(), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        let shown = conn.peer_certificates().unwrap()[0].to_vec();
        (rustls::StreamOwned::new(conn, tcp), shown)
    };
    let (mut early, shown) = connect();
    assert_eq!(shown, a.cert.der().to_vec(), "the first certificate");
    early.write_all(&login_frame("early")).unwrap();
    std::fs::write(&cert, b.cert.pem()).unwrap();
    std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
    signal(&child.0, libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    loop {
        let l = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a reload line");
        if l.contains("rely TLS certificate reloaded") {
            break;
        }
    }
    let (_late, shown) = connect();
    assert_eq!(shown, b.cert.der().to_vec(), "the new certificate");
    // The connection from before still relays (to itself).
    let f = transfer_frame("early", "early", b"still here");
    early.write_all(&f).unwrap();
    let mut back = vec![0u8; f.len()];
    early.read_exact(&mut back).unwrap();
    assert_eq!(back, f);
    signal(&child.0, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
}

/// The server's resident set, in bytes.
fn rss_of(child: &Child) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A slow consumer of small broadcast messages costs what its limit says
/// (resident memory grows by at most 1.1 times `max_output_bytes` while
/// its queue fills), and once it is cut the memory goes back to the
/// system: resident memory returns to where it was, give or take the
/// server's working buffers (an eighth of the limit; the queue would hold
/// all of it).
#[test]
fn a_slow_consumer_costs_its_limit_and_gives_the_memory_back_when_cut() {
    const LIMIT: u64 = 16 << 20;
    let cfg = write_config(
        "slowmem",
        "workers: 1\nrely:\n  listen: [\"127.0.0.1:0\"]\nadmin:\n  listen: [\"127.0.0.1:0\"]\n\
         websocket:\n  listen: [\"127.0.0.1:0\"]\n  max_output_bytes: 16MiB\n  ping_interval: 0\n  \
         endpoints:\n    - path: /bcast\n      on_message: broadcast\n      set_tags: {g: all}\n      \
         broadcast_tag: g\n",
    );
    let (child, _, logs) =
        spawn_logged(Command::new(BIN).args(["-c", cfg.to_str().unwrap(), "-v"]));
    let child = KillOnDrop(child);
    let (mut ws, mut admin) = (None::<SocketAddr>, None::<SocketAddr>);
    let deadline = Instant::now() + WAIT;
    while ws.is_none() || admin.is_none() {
        let l = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("listeners logged");
        if let Some(a) = l.split("listening: websocket on ").nth(1) {
            ws = a.trim().parse().ok();
        }
        if let Some(a) = l.split("listening: admin on ").nth(1) {
            admin = a.trim().parse().ok();
        }
    }
    let (ws, admin) = (ws.unwrap(), admin.unwrap());
    let cut = || {
        let m = http(admin, "GET", "/metrics", &[], b"").text();
        m.lines()
            .filter(|l| l.starts_with("corerelay_slow_consumer_disconnect_total"))
            .any(|l| l.rsplit(' ').next() != Some("0"))
    };
    // A member that keeps up (read to the end on a thread), and a warm-up,
    // so that the baseline holds the server's working buffers.
    let mut fast = WsRaw::connect(ws, "/bcast").0;
    std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 16];
        while matches!(std::io::Read::read(&mut fast, &mut b), Ok(n) if n > 0) {}
    });
    let mut publisher = WsRaw::connect(ws, "/bcast");
    let burst: Vec<u8> = (0..1000)
        .flat_map(|_| WsRaw::frame(0x2, true, &[7u8; 64]))
        .collect();
    // As many as the run below sends between two looks at the metrics,
    // several times over.
    for _ in 0..200 {
        publisher.send_raw(&burst);
    }
    // A member that never reads, with a tiny receive buffer.
    let slow = never_reading_ws(ws, "/bcast");
    let base = rss_of(&child.0);
    // 4 times the limit, well past what kernel buffers absorb.
    let mut peak = base;
    let mut bursts = 0;
    while !cut() {
        assert!(bursts < 4 * LIMIT as usize / 64_000, "never cut");
        for _ in 0..20 {
            publisher.send_raw(&burst);
            peak = peak.max(rss_of(&child.0));
        }
        bursts += 20;
    }
    let grew = peak.saturating_sub(base);
    assert!(
        grew <= LIMIT + LIMIT / 10,
        "resident memory grew {grew} bytes for a {LIMIT}-byte limit"
    );
    // The member that keeps up may still be reading its backlog on a
    // loaded machine: that memory is its own, not the cut consumer's.
    let queued = || {
        let m = http(admin, "GET", "/metrics", &[], b"").text();
        m.lines()
            .filter(|l| l.starts_with("corerelay_queued_bytes{"))
            .all(|l| l.rsplit(' ').next() == Some("0"))
    };
    let drained = Instant::now() + Duration::from_secs(60);
    while !queued() {
        assert!(Instant::now() < drained, "queues never drained");
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = Instant::now() + Duration::from_secs(10);
    loop {
        let now = rss_of(&child.0);
        // What may stay is the server's working buffers (sized by the
        // bursts), never the consumer's queue.
        if now <= base + (base / 10).max(LIMIT / 8) {
            break;
        }
        assert!(
            Instant::now() < back,
            "resident memory stayed at {now} bytes after the cut (baseline {base})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(slow);
}

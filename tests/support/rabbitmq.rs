//! A real RabbitMQ broker (Debian's `rabbitmq-server`) on free loopback
//! ports, its own node name, data directory and Erlang port mapper, so
//! that it touches nothing else on the machine; killed on drop. A restart
//! keeps the ports and the data (durable queues, persistent messages).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The broker's start-up, on a loaded 2-CPU machine.
const START_WAIT: Duration = Duration::from_secs(90);

/// A port that binds now, below Linux's ephemeral range (32768 and up).
/// Erlang binds its ports itself, later; an ephemeral port could meanwhile
/// become the local port of one of the many client sockets the other tests
/// open, and the broker then refuses to start (`dist_port_already_used`).
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Debian's broker script, run as it is by the package's unit.
fn binary() -> Option<PathBuf> {
    let p = PathBuf::from(
        std::env::var("RABBITMQ_SERVER")
            .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into()),
    );
    p.exists().then_some(p)
}

/// A broker child process.
pub struct RabbitMq {
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its AMQPS port (`start_tls`), and the CA file that trusts it.
    pub tls: Option<(u16, PathBuf)>,
    dist: u16,
    epmd: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitMq {
    /// Starts one and waits until it accepts AMQP connections; None (with
    /// a note) when the broker is not installed and CI did not ask for it.
    pub fn start(name: &str) -> Option<RabbitMq> {
        Self::start_with(name, false)
    }

    /// As `start`, with a TLS listener too: a self-signed certificate for
    /// 127.0.0.1 (its own CA), written next to the data.
    pub fn start_tls(name: &str) -> Option<RabbitMq> {
        Self::start_with(name, true)
    }

    fn start_with(name: &str, tls: bool) -> Option<RabbitMq> {
        if binary().is_none() {
            assert!(
                std::env::var_os("CORERELAY_REQUIRE_RABBITMQ").is_none(),
                "CORERELAY_REQUIRE_RABBITMQ is set but rabbitmq-server is not installed"
            );
            eprintln!(
                "rabbitmq-server is not installed: this AMQP test did not run (CI installs it)"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!("corerelay-rmq-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let tls = tls.then(|| {
            let (_, c, k) = super::test_cert(&dir);
            let port = free_port();
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!(
                    "listeners.ssl.default = 127.0.0.1:{port}\nssl_options.cacertfile = {c}\nssl_options.certfile = {c}\nssl_options.keyfile = {k}\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                    c = c.display(),
                    k = k.display()
                ),
            )
            .unwrap();
            (port, c)
        });
        let mut b = RabbitMq {
            tls,
            port: free_port(),
            dist: free_port(),
            epmd: free_port(),
            dir,
            child: None,
        };
        b.spawn();
        Some(b)
    }

    /// Starts the broker and waits until it listens. Ports are picked free
    /// but not held (Erlang binds them itself), so a broker that exits at
    /// once (a port taken meanwhile) is started again on new ports; its
    /// output is kept in `out.log` for the failure message.
    fn spawn(&mut self) {
        for attempt in 0..3 {
            if attempt > 0 {
                self.port = free_port();
                self.dist = free_port();
                self.epmd = free_port();
            }
            if self.try_spawn() {
                return;
            }
        }
        let log = std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        let dump = std::fs::read_to_string(self.dir.join("erl_crash.dump")).unwrap_or_default();
        let slogan = dump
            .lines()
            .find(|l| l.starts_with("Slogan:"))
            .unwrap_or("");
        panic!("rabbitmq-server did not listen; {slogan}\nits last lines, newest first:\n{tail}");
    }

    fn try_spawn(&mut self) -> bool {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let out = std::fs::File::create(self.dir.join("out.log")).expect("a log file");
        let err = out.try_clone().expect("a log file");
        let node = format!("corerelay{}@localhost", self.port);
        let child = Command::new(binary().expect("rabbitmq-server"))
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("ERL_EPMD_PORT", self.epmd.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            // A VM that fails to start writes its dump here, not into the
            // working directory (the checkout).
            .env("ERL_CRASH_DUMP", d("erl_crash.dump"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("rabbitmq-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        let ports = [Some(self.port), self.tls.as_ref().map(|t| t.0)];
        for p in ports.into_iter().flatten() {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                let exited = self
                    .child
                    .as_mut()
                    .is_none_or(|c| c.try_wait().ok().flatten().is_some());
                if exited || Instant::now() >= deadline {
                    self.kill();
                    return false;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        true
    }

    /// The URL clients use.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/", self.port)
    }

    /// Kills the broker (no goodbye to its clients) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The Erlang VM is a child of the script: stop it by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on the broker's own pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let deadline = Instant::now() + START_WAIT;
                // SAFETY: signal 0 only checks the pid.
                while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let deadline = Instant::now() + START_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "rabbitmq-server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.kill();
        // Its port mapper daemonized; it serves this broker only.
        let _ = Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", self.epmd.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A real `redis-server` on a free loopback port (killed on drop), a small
//! blocking RESP client for the tests' side of Redis, and a fake Redis
//! that accepts and never answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corerelay::protocol::resp::{self, Value};

use super::WAIT;

/// A redis-server child process.
pub struct RedisServer {
    pub port: u16,
    child: Child,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::on(free_port())
    }

    /// Starts one on `port` (a restart keeps the port).
    pub fn on(port: u16) -> RedisServer {
        Self::with_args(port, &[])
    }

    /// Starts one on a free port with extra arguments (`--requirepass x`).
    pub fn start_with(args: &[&str]) -> RedisServer {
        Self::with_args(free_port(), args)
    }

    fn with_args(port: u16, extra: &[&str]) -> RedisServer {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "warning",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (apt-get install redis-server): {e}"));
        let s = RedisServer { port, child };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = RedisClient::try_connect(s.addr()) {
                // Up, with or without a password.
                if matches!(c.cmd(&["PING"]), Reply::Simple(_) | Reply::Error(_)) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> RedisClient {
        RedisClient::try_connect(self.addr()).expect("connect to redis")
    }

    /// Kills it and waits for the port to be free.
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An owned reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Reply>),
}

fn owned(v: &Value<'_>) -> Reply {
    match v {
        Value::Simple(b) => Reply::Simple(String::from_utf8_lossy(b).into()),
        Value::Error(b) => Reply::Error(String::from_utf8_lossy(b).into()),
        Value::Int(i) => Reply::Int(*i),
        Value::Bulk(b) => Reply::Bulk(b.to_vec()),
        Value::Nil => Reply::Nil,
        Value::Array(a) => Reply::Array(a.iter().map(owned).collect()),
    }
}

/// A blocking RESP client (the tests' backend).
pub struct RedisClient {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RedisClient {
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<RedisClient> {
        let s = TcpStream::connect_timeout(&addr, WAIT)?;
        s.set_nodelay(true)?;
        Ok(RedisClient { s, buf: Vec::new() })
    }

    pub fn send(&mut self, args: &[&[u8]]) {
        let mut out = Vec::new();
        resp::encode(&mut out, args);
        self.s.write_all(&out).expect("write to redis");
    }

    /// The next reply within `d` (None: nothing came).
    pub fn read_within(&mut self, d: Duration) -> Option<Reply> {
        let deadline = Instant::now() + d;
        loop {
            if let Some((v, n)) = resp::decode(&self.buf, usize::MAX).expect("valid RESP") {
                let r = owned(&v);
                self.buf.drain(..n);
                return Some(r);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.s
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut b = [0u8; 65536];
            match self.s.read(&mut b) {
                Ok(0) => panic!("redis closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(_) => return None,
            }
        }
    }

    pub fn read(&mut self) -> Reply {
        self.read_within(WAIT).expect("a reply within the wait")
    }

    pub fn cmd(&mut self, args: &[&str]) -> Reply {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.send(&a);
        self.read()
    }

    pub fn publish(&mut self, ch: &str, payload: &[u8]) -> i64 {
        self.send(&[b"PUBLISH", ch.as_bytes(), payload]);
        match self.read() {
            Reply::Int(n) => n,
            r => panic!("PUBLISH answered {r:?}"),
        }
    }

    /// SUBSCRIBE and wait for the confirmation.
    pub fn subscribe(&mut self, ch: &str) {
        self.send(&[b"SUBSCRIBE", ch.as_bytes()]);
        match self.read() {
            Reply::Array(a) if a.first() == Some(&Reply::Bulk(b"subscribe".to_vec())) => {}
            r => panic!("SUBSCRIBE answered {r:?}"),
        }
    }

    /// The next pub/sub message's payload within `d`.
    pub fn message_within(&mut self, d: Duration) -> Option<Vec<u8>> {
        match self.read_within(d)? {
            Reply::Array(mut a) if a.len() == 3 && a[0] == Reply::Bulk(b"message".to_vec()) => {
                match a.pop() {
                    Some(Reply::Bulk(b)) => Some(b),
                    r => panic!("message payload {r:?}"),
                }
            }
            r => panic!("not a message: {r:?}"),
        }
    }
}

/// Accepts connections and never answers (a Redis that hangs).
pub struct SilentRedis {
    pub addr: SocketAddr,
    _keep: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    _l: std::thread::JoinHandle<()>,
}

impl SilentRedis {
    pub fn start() -> SilentRedis {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let keep = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let k = keep.clone();
        let t = std::thread::spawn(move || {
            for s in l.incoming().take(64).flatten() {
                k.lock().unwrap().push(s);
            }
        });
        SilentRedis {
            addr,
            _keep: keep,
            _l: t,
        }
    }
}

/// A TCP proxy to Redis that holds back, by `delay`, every client-to-
/// server write on connections whose first bytes contain `marker` (e.g. a
/// core's subscription connection, by its CLIENT SETNAME). Makes a race
/// certain instead of likely.
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    pub fn start(target: SocketAddr, marker: &'static [u8], delay: Duration) -> DelayProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for client in l.incoming().take(64).flatten() {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_r, mut c_w) = (server, client);
                std::thread::spawn(move || {
                    let mut b = [0u8; 65536];
                    let mut slow = None;
                    while let Ok(n) = c_r.read(&mut b) {
                        if n == 0 {
                            break;
                        }
                        let is_slow = *slow.get_or_insert_with(|| {
                            b[..n].windows(marker.len()).any(|w| w == marker)
                        });
                        if is_slow {
                            std::thread::sleep(delay);
                        }
                        if s_w.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_w.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_r, &mut c_w);
                    let _ = c_w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        DelayProxy { addr }
    }
}

/// Answers every read with bytes that are not RESP.
pub struct GarbageRedis {
    pub addr: SocketAddr,
}

impl GarbageRedis {
    pub fn start() -> GarbageRedis {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().take(64).flatten() {
                std::thread::spawn(move || {
                    let mut b = [0u8; 4096];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(b"?this is not redis\r\n").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        GarbageRedis { addr }
    }
}

/// One stream entry as a backend sees it: its fields as a map (field
/// order is not part of the contract).
pub type Entry = std::collections::HashMap<String, Vec<u8>>;

impl RedisClient {
    /// XGROUP CREATE ... MKSTREAM (an existing group is fine).
    pub fn group(&mut self, stream: &str, group: &str) {
        match self.cmd(&["XGROUP", "CREATE", stream, group, "0", "MKSTREAM"]) {
            Reply::Simple(_) => {}
            Reply::Error(e) if e.starts_with("BUSYGROUP") => {}
            r => panic!("XGROUP answered {r:?}"),
        }
    }

    /// Reads entries through the consumer group until `n` arrived or
    /// `d` passed (each XREADGROUP blocks at most 200 ms), acking them.
    pub fn read_group(&mut self, stream: &str, group: &str, n: usize, d: Duration) -> Vec<Entry> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            let r = self.cmd(&[
                "XREADGROUP",
                "GROUP",
                group,
                "backend",
                "COUNT",
                "1000",
                "BLOCK",
                "200",
                "STREAMS",
                stream,
                ">",
            ]);
            let Reply::Array(streams) = r else { continue };
            for s in streams {
                let Reply::Array(mut kv) = s else { continue };
                let Some(Reply::Array(entries)) = kv.pop() else {
                    continue;
                };
                for e in entries {
                    let Reply::Array(mut parts) = e else { continue };
                    let Some(Reply::Array(fields)) = parts.pop() else {
                        continue;
                    };
                    if let Some(Reply::Bulk(id)) = parts.pop() {
                        let id = String::from_utf8_lossy(&id).into_owned();
                        self.cmd(&["XACK", stream, group, &id]);
                    }
                    let mut m = Entry::new();
                    for pair in fields.chunks(2) {
                        if let [Reply::Bulk(k), Reply::Bulk(v)] = pair {
                            m.insert(String::from_utf8_lossy(k).into_owned(), v.clone());
                        }
                    }
                    out.push(m);
                }
            }
        }
        out
    }

    /// HGETALL as a sorted list of pairs.
    pub fn hgetall(&mut self, key: &str) -> Vec<(String, String)> {
        let Reply::Array(a) = self.cmd(&["HGETALL", key]) else {
            panic!("HGETALL did not answer an array")
        };
        let mut v: Vec<(String, String)> = a
            .chunks(2)
            .filter_map(|p| match p {
                [Reply::Bulk(k), Reply::Bulk(v)] => Some((
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }
}

//! Test helpers: an in-process server that stops on drop, raw TCP clients,
//! bounded waits.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use corerelay::client::rely::RelyClient;
use corerelay::config::Config;
use corerelay::{Server, ServerHandle};

/// Generous bound for anything that should happen "at once".
pub const WAIT: Duration = Duration::from_secs(5);

/// An in-process server on 127.0.0.1:0; dropping it shuts it down.
pub struct TestServer {
    pub handle: ServerHandle,
    pub addr: SocketAddr,
}

impl TestServer {
    /// Defaults with RELY on 127.0.0.1:0, `workers` cores, not pinned.
    pub fn start(workers: usize) -> TestServer {
        Self::with(workers, |_| {})
    }

    /// Like `start`, with the config adjusted by `f`.
    pub fn with(workers: usize, f: impl FnOnce(&mut Config)) -> TestServer {
        let mut cfg = Config::defaults();
        cfg.workers = workers;
        cfg.pin = false;
        cfg.rely.listen = vec!["127.0.0.1:0".parse().unwrap()];
        f(&mut cfg);
        let handle = Server::start(cfg).expect("server starts");
        let addr = handle.rely_addrs()[0];
        TestServer { handle, addr }
    }

    /// A logged-in client whose login the server has registered.
    pub fn login(&self, id: &str) -> RelyClient {
        let c = RelyClient::connect(self.addr, id.as_bytes()).expect("connect");
        let me = c.local_addr().unwrap();
        wait_until(|| self.registered_as(id, me), "login registered");
        c
    }

    /// A client logged in as `id` on a core other than `avoid`, found by
    /// reconnecting (the kernel picks the core from the source port). Bounded.
    pub fn login_not_on(&self, id: &str, avoid: usize) -> RelyClient {
        for _ in 0..200 {
            let c = self.login(id);
            if self.handle.owner_core(id.as_bytes()) != Some(avoid) {
                return c;
            }
            drop(c);
            wait_until(
                || self.handle.owner_core(id.as_bytes()) != Some(avoid),
                "old login gone",
            );
        }
        panic!("could not land {id} on a core other than {avoid}");
    }

    fn registered_as(&self, id: &str, _me: SocketAddr) -> bool {
        // The directory records the newest login of an id; tests log in each
        // id from one place at a time, so presence is enough.
        self.handle.owner_core(id.as_bytes()).is_some()
    }

    /// Which core owns `id`.
    pub fn core_of(&self, id: &str) -> usize {
        self.handle.owner_core(id.as_bytes()).expect("id logged in")
    }
}

/// Polls `f` until true, at most `WAIT`; panics with `what` otherwise.
pub fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A raw TCP connection for byte-exact checks and malformed input.
pub struct Raw(pub TcpStream);

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).unwrap();
        Raw(s)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("write");
    }

    /// Reads exactly `n` bytes within `WAIT`.
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut v = vec![0; n];
        self.0.read_exact(&mut v).expect("read");
        v
    }

    /// True if the server closes the connection within `WAIT` (EOF or
    /// reset), without sending anything first.
    pub fn closed(&mut self) -> bool {
        self.0.set_read_timeout(Some(WAIT)).unwrap();
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// True if nothing arrives within `d` and the connection stays open.
    pub fn quiet_for(&mut self, d: Duration) -> bool {
        self.0.set_read_timeout(Some(d)).unwrap();
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

pub fn login_frame(id: &str) -> Vec<u8> {
    let mut v = Vec::new();
    corerelay::protocol::rely::encode_login(&mut v, id.as_bytes());
    v
}

pub fn transfer_frame(from: &str, to: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    corerelay::protocol::rely::encode_transfer(&mut v, from.as_bytes(), to.as_bytes(), payload);
    v
}

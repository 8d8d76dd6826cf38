//! wsgateway's AMQP backend (`stream_amqp`) against a real RabbitMQ the
//! test starts: a wsgateway config.yml as it is, the events read by the
//! PyPI `pika` client from the queue the server declared and bound, their
//! routing keys, bodies and properties, 1,000 messages of one connection
//! in order, and a broker killed and restarted mid-stream.

use std::io::BufRead;
use std::process::{Command, Stdio};

use corerelay::config::Config;
use corerelay::Server;

use crate::support::rabbitmq::RabbitMq;
use crate::support::{venv_python, wait_until, WsRaw};

/// Reads up to `n` messages from `queue`, each a JSON line: routing key,
/// content type, delivery mode, timestamp, body. Stops after `idle`
/// seconds without one.
const CONSUMER: &str = r#"
import json, sys, pika
url, queue, n, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
got = 0
for method, props, body in ch.consume(queue, inactivity_timeout=idle, auto_ack=True):
    if method is None:
        break
    print(json.dumps({"rk": method.routing_key, "ct": props.content_type,
                      "dm": props.delivery_mode, "ts": props.timestamp,
                      "body": json.loads(body)}), flush=True)
    got += 1
    if got >= n:
        break
conn.close()
"#;

/// Declares a queue bound to the `wsgateway` exchange with one routing
/// key, as a backend with its own queue does.
const DECLARE: &str = r#"
import sys, pika
url, queue, key = sys.argv[1], sys.argv[2], sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.queue_declare(queue, durable=True)
ch.queue_bind(queue, "wsgateway", routing_key=key)
conn.close()
"#;

fn python() -> std::path::PathBuf {
    venv_python(
        "amqp-venv",
        &["pika==1.3.2"],
        "import pika; assert pika.__version__ == '1.3.2'",
    )
    .expect("a Python venv with pika")
}

/// Consumes up to `n` messages (bounded by the consumer's idle stop).
fn consume(broker: &RabbitMq, queue: &str, n: usize) -> Vec<serde_json::Value> {
    let mut child = Command::new(python())
        .args(["-c", CONSUMER, &broker.url(), queue, &n.to_string(), "5"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the consumer runs");
    let out = child.stdout.take().expect("stdout");
    let lines: Vec<serde_json::Value> = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).expect("a JSON line"))
        .collect();
    assert!(child.wait().expect("the consumer ends").success());
    lines
}

/// wsgateway's config.yml, with its stream_amqp section.
fn wsgateway_yaml(url: &str, extra: &str) -> String {
    format!(
        "listen_addr: 127.0.0.1:0
stream_amqp:
  addr: {url}
  exchange: wsgateway
  queue: wsgateway.wsevents
  routing_key: \"{{tag.group:nogroup}}.{{json.command:unknown_command}}\"
  headers: {{}}
endpoints:
  - path: /connect
    set_tags: {{group: g1, hidden: x}}
    stream_include_tags: [group]
    json_extract_vars: {{command: command}}
{extra}"
    )
}

fn start(yaml: &str, f: impl FnOnce(&mut Config)) -> corerelay::ServerHandle {
    let mut cfg = Config::from_yaml(yaml, None).expect("config");
    cfg.workers = 2;
    cfg.pin = false;
    cfg.admin = None;
    f(&mut cfg);
    let s = Server::start(cfg).expect("starts");
    wait_until(
        || s.metrics().amqp_up == 2,
        "both cores connected to the broker",
    );
    s
}

#[test]
fn events_reach_rabbitmq_as_wsgateway_publishes_them() {
    let Some(broker) = RabbitMq::start("events") else {
        return;
    };
    let s = start(&wsgateway_yaml(&broker.url(), ""), |_| {});
    // A backend's own queue, for one routing key only.
    let declared = Command::new(python())
        .args(["-c", DECLARE, &broker.url(), "hello-only", "g1.hello"])
        .status()
        .expect("the declaring client runs");
    assert!(declared.success());
    let ws = s.ws_addrs()[0];
    let mut c = WsRaw::connect(ws, "/connect");
    c.send(0x1, true, br#"{"command":"hello","n":1}"#);
    c.send(0x2, true, &[0xff, b'A']);
    c.send(0x8, true, &1000u16.to_be_bytes());
    let _ = c.read();
    wait_until(|| s.metrics().amqp_confirmed == 4, "four events confirmed");
    let got = consume(&broker, "wsgateway.wsevents", 4);
    assert_eq!(got.len(), 4, "{got:?}");
    let field = |i: usize, k: &str| got[i]["body"][k].as_str().unwrap_or("").to_owned();
    let id = field(0, "connection");
    assert_eq!(id.len(), 36, "a uuid: {id}");
    let actions: Vec<String> = (0..4).map(|i| field(i, "action")).collect();
    assert_eq!(actions, ["open", "message", "message", "close"]);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(field(i, "connection"), id);
        assert_eq!(field(i, "tags"), "group=g1", "only the included tags");
        assert_eq!(m["ct"], "application/json");
        assert_eq!(m["dm"], 2, "persistent");
        assert!(m["ts"].as_u64().is_some_and(|t| t > 1_700_000_000), "{m}");
    }
    assert_eq!(field(1, "type"), "text");
    assert_eq!(field(1, "message"), r#"{"command":"hello","n":1}"#);
    assert_eq!(field(2, "type"), "binary");
    assert_eq!(field(2, "message"), "\u{fffd}A", "binary as lossy UTF-8");
    let keys: Vec<&str> = got.iter().map(|m| m["rk"].as_str().unwrap_or("")).collect();
    assert_eq!(
        keys,
        [
            "g1.unknown_command",
            "g1.hello",
            "g1.unknown_command",
            "g1.unknown_command"
        ]
    );
    let m = s.metrics();
    assert_eq!(
        (m.amqp_published, m.amqp_returned, m.amqp_dropped),
        (4, 0, 0)
    );
    // The routed copy: only the message whose key the queue is bound to.
    let hello = consume(&broker, "hello-only", 4);
    assert_eq!(hello.len(), 1, "{hello:?}");
    assert_eq!(hello[0]["rk"], "g1.hello");
    assert_eq!(hello[0]["body"]["action"], "message");
}

#[test]
fn one_connections_events_stay_in_order_across_a_broker_restart() {
    let Some(mut broker) = RabbitMq::start("restart") else {
        return;
    };
    // A small buffer, so that the outage overflows it.
    let s = start(&wsgateway_yaml(&broker.url(), ""), |c| {
        if let Some(corerelay::config::EventSink::Amqp(a)) = c.events.as_mut().map(|e| &mut e.sink)
        {
            a.max_pending_bytes = 512 * 1024;
            a.reconnect_max_delay = std::time::Duration::from_millis(500);
        }
    });
    let ws = s.ws_addrs()[0];
    let mut c = WsRaw::connect(ws, "/connect");
    let msg = |i: u32| format!(r#"{{"command":"seq","i":{i}}}"#);
    for i in 0..1000 {
        c.send(0x1, true, msg(i).as_bytes());
    }
    wait_until(
        || s.metrics().amqp_confirmed == 1001,
        "open and 1,000 confirmed",
    );
    assert_eq!(s.metrics().amqp_dropped, 0);
    broker.kill();
    // While the broker is away: buffered up to the cap, then dropped.
    for i in 1000..5000 {
        c.send(0x1, true, msg(i).as_bytes());
    }
    wait_until(|| s.metrics().amqp_dropped > 0, "the overflow is dropped");
    assert_eq!(s.metrics().amqp_up, 0);
    broker.restart();
    wait_until(|| s.metrics().amqp_up == 2, "reconnected");
    // What waited goes out first; then new events have room again.
    wait_until(|| s.metrics().amqp_buffered == 0, "the backlog confirmed");
    for i in 5000..5100 {
        c.send(0x1, true, msg(i).as_bytes());
    }
    wait_until(
        || {
            let m = s.metrics();
            m.amqp_buffered == 0 && m.amqp_confirmed + m.amqp_dropped >= 5101
        },
        "everything settled",
    );
    let m = s.metrics();
    let got = consume(&broker, "wsgateway.wsevents", 6000);
    // Persistent messages in a durable queue survive the restart; an
    // event sent again after the reconnect may come twice (at least once).
    let mut seen: Vec<u64> = Vec::new();
    for g in got.iter().skip(1) {
        let m: serde_json::Value =
            serde_json::from_str(g["body"]["message"].as_str().unwrap_or("{}")).unwrap();
        let i = m["i"].as_u64().expect("a sequence number");
        if seen.last().is_some_and(|&l| i <= l) {
            assert!(
                seen.contains(&i),
                "{i} after {:?}: out of order",
                seen.last()
            );
            continue;
        }
        seen.push(i);
    }
    assert_eq!(got[0]["body"]["action"], "open");
    assert!(
        seen.starts_with(&(0..1000).collect::<Vec<_>>()),
        "all before the outage"
    );
    assert!(
        seen.ends_with(&(5000..5100).collect::<Vec<_>>()),
        "all after it"
    );
    assert_eq!(
        seen.len() as u64 + m.amqp_dropped,
        5100,
        "each message arrived or was counted as dropped"
    );
    eprintln!(
        "amqp restart: {} delivered, {} dropped, {} confirmed, {} reconnects",
        seen.len(),
        m.amqp_dropped,
        m.amqp_confirmed,
        m.amqp_reconnects
    );
    assert!(m.amqp_reconnects >= 2, "{m:?}");
    assert_eq!(m.events_dropped, m.amqp_dropped);
}

/// amqps://: corerelay's own config (`events.amqp`) to the broker's TLS
/// listener, trusting its certificate through `ca_file`; and an event no
/// queue takes, returned and counted.
#[test]
fn amqps_with_a_ca_file() {
    let Some(broker) = RabbitMq::start_tls("tls") else {
        return;
    };
    let Some((port, ca)) = broker.tls.clone() else {
        panic!("a TLS listener")
    };
    let yaml = format!(
        "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /connect\nevents:\n  amqp:\n    url: \"amqps://guest:guest@127.0.0.1:{port}/\"\n    ca_file: \"{}\"\n    exchange: wsgateway\n    queue: wsgateway.wsevents\n",
        ca.display()
    );
    let s = start(&yaml, |_| {});
    let mut c = WsRaw::connect(s.ws_addrs()[0], "/connect");
    c.send(0x1, true, b"over tls");
    wait_until(
        || s.metrics().amqp_confirmed == 2,
        "open and message confirmed",
    );
    let got = consume(&broker, "wsgateway.wsevents", 2);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[1]["body"]["message"], "over tls");
    assert_eq!(got[1]["rk"], "", "no routing_key: the empty key");
    // An exchange no queue is bound to: the broker returns each event
    // (mandatory) and still confirms it; both are counted.
    let lonely = format!(
        "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /connect\nevents:\n  amqp:\n    url: \"{}\"\n    exchange: nobody-home\n",
        broker.url()
    );
    let s2 = start(&lonely, |_| {});
    let _c2 = WsRaw::connect(s2.ws_addrs()[0], "/connect");
    wait_until(
        || s2.metrics().amqp_confirmed == 1,
        "the open event confirmed",
    );
    wait_until(|| s2.metrics().amqp_returned == 1, "and returned");
}

/// A fake broker on loopback: it takes the protocol header, then answers
/// garbage (`garbage`) or nothing. Returns its address and how many
/// connections it accepted.
fn fake_broker(
    garbage: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut s in fake.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut header = [0u8; 8];
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = s.read_exact(&mut header);
            if garbage {
                // Not AMQP: an HTTP error, then a frame type that does not exist.
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n\x07\x00\x00");
            }
            // Held open: only the client ends it.
            held.push(s);
            if held.len() > 16 {
                break;
            }
        }
    });
    (addr, accepted)
}

/// A broker that answers garbage is dropped on the bad frame (its
/// handshake deadline is a minute away, so only the frame check can end
/// it), one that answers nothing at the handshake deadline; each is
/// dialled again with backoff, events wait in the buffer, and the server
/// serves its clients throughout. No RabbitMQ needed.
#[test]
fn a_broker_that_answers_garbage_or_nothing_is_dropped_and_retried() {
    use std::sync::atomic::Ordering;
    for (garbage, timeout) in [(true, "60s"), (false, "300ms")] {
        let (addr, accepted) = fake_broker(garbage);
        let yaml = format!(
            "rely:\n  listen: []\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  endpoints:\n    - path: /connect\n      on_message: echo\nevents:\n  amqp:\n    url: \"amqp://{addr}/\"\n    exchange: x\n    connect_timeout: {timeout}\n    reconnect_delay: 20ms\n    reconnect_max_delay: 100ms\n"
        );
        let mut cfg = Config::from_yaml(&yaml, None).expect("config");
        cfg.workers = 1;
        cfg.pin = false;
        let s = Server::start(cfg).expect("starts");
        wait_until(
            || accepted.load(Ordering::SeqCst) >= 3,
            "dropped and dialled again, more than once",
        );
        let mut c = WsRaw::connect(s.ws_addrs()[0], "/connect");
        c.send(0x1, true, b"still served");
        assert_eq!(c.read().expect("echo").payload, b"still served");
        wait_until(|| s.metrics().amqp_buffered == 2, "open and message wait");
        let m = s.metrics();
        assert_eq!((m.amqp_up, m.amqp_published, m.amqp_dropped), (0, 0, 0));
    }
}

//! The admin HTTP stage (wsgateway's API, plus health, readiness and
//! metrics).
//!
//! Requests are parsed with httparse from the stage's buffer (head and body
//! capped at `max_request_bytes`). `/health`, `/ready` and `/metrics` are
//! answered at once. `/send`, `/settags`, `/close` and `/status` need every
//! core: the stage starts an admin call (`Ctx::admin`) and waits
//! (`Outcome::Await`, so nothing more is read) until the core hands it the
//! [`Answer`]. One request is in flight per connection; pipelined requests
//! wait. Keep-alive is honoured.
//!
//! Answers: 200 with a count (or the status listing); 400 for a malformed
//! request or body; 403 outside the allowed networks; 404/405; 411 for a
//! chunked body; 413 over the size cap. Refusals are counted
//! (`admin_errors`) and close the connection after the answer.

use std::sync::Arc;

use super::{Outcome, Stage};
use crate::engine::admin_calls::Answer;
use crate::engine::io::{CloseReason, Io, Limits};
use crate::engine::message::{AdminCall, FanOp, Message};
use crate::engine::route::Ctx;
use crate::engine::tags::Selector;
use crate::engine::timer::Timing;
use crate::engine::ConnId;
use crate::protocol::http::{self, HttpError, Request};

const TEXT: &str = "text/plain; charset=utf-8";

/// Bytes of answers one admin connection may have queued before it stops
/// taking pipelined requests (a /metrics answer is tens of KiB).
const ANSWERS_QUEUED: usize = 1 << 20;

/// An admin connection.
#[derive(Debug, Default)]
pub(crate) struct AdminStage {
    /// Bytes received and not yet handled (capped).
    buf: Vec<u8>,
    /// A request is waiting for the cores' replies.
    pending: bool,
    /// Tick at which the request now in the buffer began (None: empty).
    started: Option<u64>,
    /// The peer is outside the allowed networks: it gets /health and
    /// /ready only (load balancers and probes), 403 for the rest.
    outsider: bool,
}

pub(crate) use crate::protocol::http::form_pairs;

/// Queues an HTTP response; without keep-alive the connection then closes.
fn respond(io: &mut Io, a: &Answer, now: u64) {
    // With other nodes, how many answered of those known: a partial total
    // is visible, and the body stays a bare number for wsgateway clients.
    let nodes = a.nodes.map_or(String::new(), |(answered, known)| {
        format!("X-Corerelay-Nodes: {answered}/{known}\r\n")
    });
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{nodes}Connection: {}\r\n\r\n",
        a.status,
        a.content_type,
        a.body.len(),
        if a.keep_alive { "keep-alive" } else { "close" }
    );
    io.out.push_bytes(&[head.as_bytes(), &a.body]);
    if !a.keep_alive {
        io.close_after_answer(CloseReason::Closed, now);
    }
}

fn ok(body: &[u8], keep_alive: bool) -> Answer {
    Answer {
        status: "200 OK",
        content_type: TEXT,
        body: body.to_vec(),
        keep_alive,
        nodes: None,
    }
}

fn json(status: &'static str, body: String, keep_alive: bool) -> Answer {
    Answer {
        status,
        content_type: "application/json",
        body: body.into_bytes(),
        keep_alive,
        nodes: None,
    }
}

/// A refused request: answered, counted, and the connection closes.
fn refuse(io: &mut Io, cx: &Ctx<'_>, status: &'static str, msg: &str) -> Outcome {
    cx.metrics().admin_errors.inc();
    let a = Answer {
        status,
        content_type: "text/plain",
        body: format!("{msg}\n").into_bytes(),
        keep_alive: false,
        nodes: None,
    };
    respond(io, &a, cx.now());
    Outcome::Continue
}

fn too_large(io: &mut Io, cx: &Ctx<'_>) -> Outcome {
    refuse(
        io,
        cx,
        "413 Payload Too Large",
        "request over admin.max_request_bytes",
    )
}

impl AdminStage {
    pub(crate) fn accepted() -> (Stage, Limits) {
        (Stage::Admin(AdminStage::default()), Limits::NONE)
    }

    pub(crate) fn on_bytes(
        &mut self,
        io: &mut Io,
        me: ConnId,
        input: &mut [u8],
        cx: &mut Ctx<'_>,
    ) -> Outcome {
        let Some(admin) = cx.cfg().admin.as_ref() else {
            return Outcome::Close(CloseReason::Protocol);
        };
        io.touch(cx.now());
        // Kept whole: pipelined requests are never dropped. The buffer stays
        // bounded because the core reads nothing while a request is in
        // flight or the answers wait (Outcome::Await), and a request that
        // cannot complete within max_request_bytes is refused (413).
        if self.buf.is_empty() && !input.is_empty() {
            self.started = Some(cx.now());
        }
        self.buf.extend_from_slice(input);
        self.outsider = !admin.allows(io.peer().ip());
        self.resume(io, me, cx)
    }

    pub(crate) fn wants_resume(&self) -> bool {
        self.pending || !self.buf.is_empty()
    }

    /// Handles buffered requests until one must wait or the buffer holds
    /// no whole request. Bounded: each turn consumes one request or stops.
    pub(crate) fn resume(&mut self, io: &mut Io, me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let Some(cap) = cx.cfg().admin.as_ref().map(|a| a.max_request_bytes) else {
            return Outcome::Close(CloseReason::Protocol);
        };
        while io.closing.is_none() {
            // Answers waiting for a reader that does not read: take no more
            // requests until they are on the wire (the core re-lists us).
            if self.pending || io.out.bytes() >= ANSWERS_QUEUED {
                return Outcome::Await;
            }
            if self.buf.is_empty() {
                break;
            }
            let req = match http::parse_request(&self.buf) {
                Ok(Some(r)) => r,
                Ok(None) if self.buf.len() > cap => return too_large(io, cx),
                Ok(None) => break,
                Err(HttpError::HeadTooLarge) => return too_large(io, cx),
                Err(_) => return refuse(io, cx, "400 Bad Request", "malformed HTTP request"),
            };
            if req.header("transfer-encoding").is_some() {
                return refuse(io, cx, "411 Length Required", "send a Content-Length body");
            }
            if req
                .headers
                .iter()
                .filter(|(n, _)| n == "content-length")
                .count()
                > 1
            {
                // RFC 9112 6.3: a message with several lengths is invalid.
                return refuse(io, cx, "400 Bad Request", "more than one Content-Length");
            }
            let len = match req.header("content-length").map(str::parse::<usize>) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => return refuse(io, cx, "400 Bad Request", "bad Content-Length"),
            };
            if req.head_len.saturating_add(len) > cap {
                return too_large(io, cx);
            }
            if self.buf.len() < req.head_len + len {
                break; // the body is still arriving
            }
            let body: Vec<u8> = self.buf[req.head_len..req.head_len + len].to_vec();
            self.buf.drain(..req.head_len + len);
            // The next pipelined request's clock starts now.
            self.started = (!self.buf.is_empty()).then(|| cx.now());
            let keep_alive = !req.header_has_token("connection", "close");
            cx.metrics().admin_requests.inc();
            if let Some(refused) = self.handle(io, me, &req, body, keep_alive, cx) {
                return refused;
            }
        }
        if self.pending || io.out.bytes() >= ANSWERS_QUEUED {
            Outcome::Await
        } else {
            Outcome::Continue
        }
    }

    /// One request: answered at once, refused, or started on every core.
    fn handle(
        &mut self,
        io: &mut Io,
        me: ConnId,
        req: &Request,
        body: Vec<u8>,
        keep_alive: bool,
        cx: &mut Ctx<'_>,
    ) -> Option<Outcome> {
        let now = cx.now();
        let call = |op: FanOp| (op, Selector::from_pairs(&form_pairs(&req.query)));
        let public = matches!(req.path.as_str(), "/health" | "/ready");
        if self.outsider && !public {
            log::debug!(
                "{}: admin request from outside the allowed networks",
                io.peer()
            );
            return Some(refuse(io, cx, "403 Forbidden", "forbidden"));
        }
        let wsproxy =
            cx.cfg().redis.is_some() && cx.cfg().ws().endpoints.iter().any(|e| e.session.is_some());
        // With a cluster, calls go to every node (/status: on ?nodes=all).
        let mut all_nodes = true;
        let (op, selector, msg) = match (req.method.as_str(), req.path.as_str()) {
            ("GET" | "HEAD", "/health") if wsproxy => {
                // wsproxy's answer, with Redis's state across every core.
                let n = cx.session_sockets();
                let a = if cx.redis_connected() {
                    json(
                        "200 OK",
                        format!(
                            r#"{{"status":"healthy","redis":"connected","active_connections":{n}}}"#
                        ),
                        keep_alive,
                    )
                } else {
                    json(
                        "503 Service Unavailable",
                        format!(
                            r#"{{"status":"unhealthy","redis":"disconnected","active_connections":{n},"error":"no connection to Redis"}}"#
                        ),
                        keep_alive,
                    )
                };
                respond(io, &a, now);
                return None;
            }
            ("GET" | "HEAD", "/ready") if wsproxy => {
                let a = if cx.draining() {
                    json(
                        "503 Service Unavailable",
                        r#"{"status":"draining"}"#.into(),
                        keep_alive,
                    )
                } else {
                    json("200 OK", r#"{"status":"ready"}"#.into(), keep_alive)
                };
                respond(io, &a, now);
                return None;
            }
            ("GET" | "HEAD", "/health") => {
                respond(io, &ok(b"ok\n", keep_alive), now);
                return None;
            }
            ("GET" | "HEAD", "/ready") if cx.draining() => {
                let a = Answer {
                    status: "503 Service Unavailable",
                    ..ok(b"draining\n", keep_alive)
                };
                respond(io, &a, now);
                return None;
            }
            ("GET" | "HEAD", "/ready") => {
                respond(io, &ok(b"ready\n", keep_alive), now);
                return None;
            }
            ("GET", "/metrics") => {
                let a = Answer {
                    content_type: "text/plain; version=0.0.4",
                    ..ok(cx.metrics_text().as_bytes(), keep_alive)
                };
                respond(io, &a, now);
                return None;
            }
            ("GET", "/status") => {
                let json = req
                    .header("accept")
                    .is_some_and(|a| a.contains("application/json"));
                all_nodes = form_pairs(&req.query)
                    .iter()
                    .any(|(k, v)| k == "nodes" && v == "all");
                (FanOp::Status { json }, Some(Selector::All), None)
            }
            ("POST", "/send") | ("POST", "/close") => {
                let binary = req
                    .header("content-type")
                    .is_some_and(|c| c.starts_with("application/octet-stream"));
                if !binary && std::str::from_utf8(&body).is_err() {
                    return Some(refuse(
                        io,
                        cx,
                        "400 Bad Request",
                        "body is not UTF-8 text (send application/octet-stream for binary)",
                    ));
                }
                let send = req.path == "/send";
                let msg = (send || !body.is_empty()).then(|| Message::new(!binary, &body));
                let (op, sel) = call(if send { FanOp::Send } else { FanOp::Close });
                (op, sel, msg)
            }
            ("POST", "/settags") => {
                // Not UTF-8, or no pair at all: the same answer.
                let changes = std::str::from_utf8(&body)
                    .map(|f| form_pairs(f.trim()))
                    .unwrap_or_default();
                if changes.is_empty() {
                    return Some(refuse(
                        io,
                        cx,
                        "400 Bad Request",
                        "settags body must be a form: k=v&k2=",
                    ));
                }
                let (op, sel) = call(FanOp::SetTags(Arc::new(changes)));
                (op, sel, None)
            }
            (
                _,
                "/health" | "/ready" | "/metrics" | "/status" | "/send" | "/settags" | "/close",
            ) => {
                return Some(refuse(
                    io,
                    cx,
                    "405 Method Not Allowed",
                    "method not allowed",
                ));
            }
            _ => return Some(refuse(io, cx, "404 Not Found", "not found")),
        };
        // An empty selector matches nothing: answer without asking the cores.
        let Some(selector) = selector else {
            respond(io, &ok(b"0", keep_alive), now);
            return None;
        };
        self.pending = true;
        cx.admin(AdminCall {
            conn: me,
            selector: Arc::new(selector),
            msg,
            op,
            keep_alive,
            all_nodes,
        });
        None
    }

    /// The cores' answer to the request in flight.
    pub(crate) fn on_answer(&mut self, io: &mut Io, a: Answer, now: u64) -> Outcome {
        respond(io, &a, now);
        self.pending = false;
        Outcome::Continue
    }

    pub(crate) fn due(&self, io: &Io, t: &Timing) -> Option<u64> {
        let idle = io.last_active() + t.admin_idle;
        // A request waiting for the cores is not late; one still arriving is.
        match self.started.filter(|_| !self.pending) {
            Some(s) => Some(idle.min(s + t.admin_request)),
            None => Some(idle),
        }
    }

    pub(crate) fn on_deadline(&mut self, io: &mut Io, _me: ConnId, cx: &mut Ctx<'_>) -> Outcome {
        let late = self
            .started
            .filter(|_| !self.pending)
            .is_some_and(|s| s + cx.timing().admin_request <= cx.now());
        if late {
            log::debug!("{}: admin request not complete in time", io.peer());
            return refuse(
                io,
                cx,
                "408 Request Timeout",
                "request not complete in time",
            );
        }
        Outcome::Close(CloseReason::Idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::io::test_io;
    use crate::engine::route::test::TestCx;

    const CFG: &str = "workers: 2\npin: false\nadmin:\n  listen: []\n";

    fn me() -> ConnId {
        ConnId {
            core: 0,
            slot: 1,
            gen: 1,
        }
    }

    #[test]
    fn health_is_answered_at_once_and_pipelined_requests_follow() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = AdminStage::default();
        let mut two = b"GET /health HTTP/1.1\r\n\r\nGET /ready HTTP/1.1\r\n\r\n".to_vec();
        let out = st.on_bytes(&mut io, me(), &mut two, &mut t.cx());
        assert!(matches!(out, Outcome::Continue));
        let text = String::from_utf8(io.out.contents()).unwrap();
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.ends_with("ready\n"));
        assert!(io.closing.is_none(), "keep-alive");
    }

    #[test]
    fn send_waits_for_every_core_then_answers() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut st = AdminStage::default();
        let mut req = b"POST /send?id=a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        let out = st.on_bytes(&mut io, me(), &mut req, &mut t.cx());
        assert!(matches!(out, Outcome::Await), "{out:?}");
        assert!(matches!(
            st.resume(&mut io, me(), &mut t.cx()),
            Outcome::Await
        ));
        let f = &t.local().fanouts[0];
        let m = f.msg.as_ref().expect("message");
        assert_eq!((m.is_text(), &*m.bytes), (true, &b"hi"[..]));
        assert_eq!(f.reply.map(|r| r.core), Some(0));
        assert_eq!(t.sent_to(1)[0].fanouts.len(), 1);
        let a = Answer {
            status: "200 OK",
            content_type: TEXT,
            body: b"3".to_vec(),
            keep_alive: true,
            nodes: Some((2, 3)),
        };
        assert!(matches!(st.on_answer(&mut io, a, 1), Outcome::Continue));
        assert!(io.out.contents().ends_with(b"\r\n\r\n3"));
        let head = String::from_utf8(io.out.contents()).unwrap();
        assert!(head.contains("X-Corerelay-Nodes: 2/3\r\n"), "{head}");
        assert!(!st.wants_resume());
    }

    #[test]
    fn refusals_are_counted_and_close() {
        let mut t = TestCx::new(
            "workers: 1\npin: false\nadmin:\n  listen: []\n  allow: [\"10.0.0.0/8\"]\n",
            1,
        );
        let mut io = test_io("127.0.0.1:1");
        let mut st = AdminStage::default();
        st.on_bytes(
            &mut io,
            me(),
            &mut b"GET /metrics HTTP/1.1\r\n\r\n".to_vec(),
            &mut t.cx(),
        );
        assert!(io.out.contents().starts_with(b"HTTP/1.1 403"));
        assert!(io.closing.is_some());
        let mut t = TestCx::new(CFG, 1);
        for (req, status) in [
            (&b"GET /nowhere HTTP/1.1\r\n\r\n"[..], &b"HTTP/1.1 404"[..]),
            (b"DELETE /send HTTP/1.1\r\n\r\n", b"HTTP/1.1 405"),
            (
                b"POST /send HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 411",
            ),
            (
                b"POST /settags?id=a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 400",
            ),
            (
                b"POST /send?id=a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
                b"HTTP/1.1 400",
            ),
        ] {
            let mut io = test_io("127.0.0.1:1");
            AdminStage::default().on_bytes(&mut io, me(), &mut req.to_vec(), &mut t.cx());
            assert!(
                io.out.contents().starts_with(status),
                "{:?}",
                String::from_utf8_lossy(req)
            );
        }
        assert_eq!(t.m().admin_errors, 5);
    }

    #[test]
    fn an_empty_selector_matches_nothing_without_asking_the_cores() {
        let mut t = TestCx::new(CFG, 2);
        let mut io = test_io("127.0.0.1:1");
        let mut req = b"POST /send HTTP/1.1\r\nContent-Length: 1\r\n\r\nx".to_vec();
        let out = AdminStage::default().on_bytes(&mut io, me(), &mut req, &mut t.cx());
        assert!(matches!(out, Outcome::Continue));
        assert!(io.out.contents().ends_with(b"\r\n\r\n0"));
        assert!(t.local().items.is_empty());
    }
}

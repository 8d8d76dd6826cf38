//! The admin HTTP API (wsgateway's, plus health, readiness and metrics).
//!
//! Requests are parsed with httparse from the connection's buffer (head and
//! body capped at `max_request_bytes`). `/health`, `/ready` and `/metrics`
//! are answered at once from shared state. `/send`, `/settags`, `/close` and
//! `/status` need every core: the adapter leaves an [`AdminCall`] for its
//! core, which fans it out once per core and answers when every core has
//! replied. One request is in flight per connection; pipelined requests
//! wait in the buffer. Keep-alive is honoured.
//!
//! Answers: 200 with a count (or the status listing); 400 for a malformed
//! request or body; 403 outside the allowed networks; 404/405; 411 for a
//! chunked body; 413 over the size cap.

use std::sync::Arc;

use super::conn::{CloseReason, Conn, Proto};
use super::metrics;
use super::route::{AdminCall, Ctx, FanOp, Local};
use super::tags::Selector;
use super::ConnId;
use crate::protocol::http::{self, url_decode, HttpError, Request};
use crate::protocol::ws;

/// An admin connection's state.
#[derive(Debug, Default)]
pub struct AdminState {
    /// Bytes received and not yet handled (capped).
    pub buf: Vec<u8>,
    /// A request is waiting for the cores' replies.
    pub pending: bool,
}

/// Splits `a=1&b=2` into url-decoded pairs (empty keys skipped).
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// Queues an HTTP response; without keep-alive the connection then closes.
pub fn respond(
    conn: &mut Conn,
    status: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    now: u64,
) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    conn.out.push_bytes(&[head.as_bytes(), body]);
    if !keep_alive {
        conn.begin_closing(CloseReason::Closed, now);
    }
}

/// A refused request: answered, counted, and the connection closes.
fn refuse(cx: &Ctx<'_>, conn: &mut Conn, status: &str, msg: &str, now: u64) {
    cx.metrics.admin_errors.inc();
    respond(
        conn,
        status,
        "text/plain",
        format!("{msg}\n").as_bytes(),
        false,
        now,
    );
}

/// Feeds bytes to an admin connection (empty `input` resumes buffered
/// requests after an answer).
pub fn on_bytes(conn: &mut Conn, slot: usize, input: &[u8], cx: &mut Ctx<'_>) {
    let Some(admin) = cx.cfg.admin.as_ref() else {
        return;
    };
    let cap = admin.max_request_bytes;
    let allowed = admin.allows(conn.peer.ip());
    conn.last_active = cx.now;
    let Proto::Admin(st) = &mut conn.proto else {
        return;
    };
    let room = (cap + 1).saturating_sub(st.buf.len());
    st.buf.extend_from_slice(&input[..input.len().min(room)]);
    if !allowed {
        log::debug!(
            "{}: admin request from outside the allowed networks",
            conn.peer
        );
        return refuse(cx, conn, "403 Forbidden", "forbidden", cx.now);
    }
    // Bounded: each turn consumes one request or stops.
    while conn.closing.is_none() {
        let Proto::Admin(st) = &mut conn.proto else {
            return;
        };
        if st.pending || st.buf.is_empty() {
            return;
        }
        let req = match http::parse_request(&st.buf) {
            Ok(Some(r)) => r,
            Ok(None) if st.buf.len() > cap => return too_large(conn, cx),
            Ok(None) => return,
            Err(HttpError::HeadTooLarge) => return too_large(conn, cx),
            Err(_) => {
                return refuse(
                    cx,
                    conn,
                    "400 Bad Request",
                    "malformed HTTP request",
                    cx.now,
                );
            }
        };
        if req.header("transfer-encoding").is_some() {
            return refuse(
                cx,
                conn,
                "411 Length Required",
                "send a Content-Length body",
                cx.now,
            );
        }
        let len = match req.header("content-length").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return refuse(cx, conn, "400 Bad Request", "bad Content-Length", cx.now);
            }
        };
        if req.head_len.saturating_add(len) > cap {
            return too_large(conn, cx);
        }
        if st.buf.len() < req.head_len + len {
            return; // the body is still arriving
        }
        let body: Vec<u8> = st.buf[req.head_len..req.head_len + len].to_vec();
        st.buf.drain(..req.head_len + len);
        let keep_alive = !req.header_has_token("connection", "close");
        cx.metrics.admin_requests.inc();
        handle(conn, slot, &req, body, keep_alive, cx);
    }
}

fn too_large(conn: &mut Conn, cx: &mut Ctx<'_>) {
    refuse(
        cx,
        conn,
        "413 Payload Too Large",
        "request over admin.max_request_bytes",
        cx.now,
    );
}

fn handle(
    conn: &mut Conn,
    slot: usize,
    req: &Request,
    body: Vec<u8>,
    keep_alive: bool,
    cx: &mut Ctx<'_>,
) {
    let now = cx.now;
    let text = "text/plain; charset=utf-8";
    let method = req.method.as_str();
    let call = |op: FanOp| (op, Selector::from_pairs(&form_pairs(&req.query)));
    let (op, selector, frame) = match (method, req.path.as_str()) {
        ("GET" | "HEAD", "/health") => {
            return respond(conn, "200 OK", text, b"ok\n", keep_alive, now)
        }
        ("GET" | "HEAD", "/ready") if cx.draining => {
            return respond(
                conn,
                "503 Service Unavailable",
                text,
                b"draining\n",
                keep_alive,
                now,
            )
        }
        ("GET" | "HEAD", "/ready") => {
            return respond(conn, "200 OK", text, b"ready\n", keep_alive, now)
        }
        ("GET", "/metrics") => {
            let mut body = metrics::prometheus(cx.all_metrics);
            let urls: Vec<String> = cx.cfg.sources.iter().map(|s| s.url.clone()).collect();
            metrics::prometheus_sources(&mut body, &urls, cx.sources);
            return respond(
                conn,
                "200 OK",
                "text/plain; version=0.0.4",
                body.as_bytes(),
                keep_alive,
                now,
            );
        }
        ("GET", "/status") => {
            let json = req
                .header("accept")
                .is_some_and(|a| a.contains("application/json"));
            (FanOp::Status { json }, Some(Selector::All), Vec::new())
        }
        ("POST", "/send") | ("POST", "/close") => {
            let binary = req
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/octet-stream"));
            if !binary && std::str::from_utf8(&body).is_err() {
                return refuse(
                    cx,
                    conn,
                    "400 Bad Request",
                    "body is not UTF-8 text (send application/octet-stream for binary)",
                    now,
                );
            }
            let mut frame = Vec::new();
            if req.path == "/send" || !body.is_empty() {
                ws::encode_frame(
                    &mut frame,
                    if binary { ws::OP_BINARY } else { ws::OP_TEXT },
                    &body,
                );
            }
            let (op, sel) = call(if req.path == "/send" {
                FanOp::Send
            } else {
                FanOp::Close
            });
            (op, sel, frame)
        }
        ("POST", "/settags") => {
            // Not UTF-8, or no pair at all: the same answer.
            let changes = std::str::from_utf8(&body)
                .map(|f| form_pairs(f.trim()))
                .unwrap_or_default();
            if changes.is_empty() {
                return refuse(
                    cx,
                    conn,
                    "400 Bad Request",
                    "settags body must be a form: k=v&k2=",
                    now,
                );
            }
            let (op, sel) = call(FanOp::SetTags(Arc::new(changes)));
            (op, sel, Vec::new())
        }
        (_, "/health" | "/ready" | "/metrics" | "/status" | "/send" | "/settags" | "/close") => {
            return refuse(
                cx,
                conn,
                "405 Method Not Allowed",
                "method not allowed",
                now,
            );
        }
        _ => {
            return refuse(cx, conn, "404 Not Found", "not found", now);
        }
    };
    // An empty selector matches nothing: answer without asking the cores.
    let Some(selector) = selector else {
        return respond(conn, "200 OK", text, b"0", keep_alive, now);
    };
    if let Proto::Admin(st) = &mut conn.proto {
        st.pending = true;
    }
    let me = ConnId {
        core: cx.core,
        slot: slot as u32,
        gen: conn.gen,
    };
    cx.actions.local.push(Local::Admin(AdminCall {
        conn: me,
        selector: Arc::new(selector),
        frame,
        op,
        keep_alive,
    }));
}

//! wsgateway's way out to the backend: a WebSocket connection's `open`,
//! `message` and `close` events XADDed to a Redis stream (`events:`), and
//! its hashes `connection:{id}` and `connection:{id}:tags` (`sync:`).
//!
//! Every event of a connection is written by the core that owns the
//! connection, on that core's own command connection to the events'
//! server, in the order they happen: per-connection order holds (wsgateway
//! handles messages in parallel and does not keep it). While Redis is away
//! they wait in that connection's capped buffer and go out after the
//! reconnect; past the cap they are dropped and counted (`events_dropped`).
//!
//! The stream name is rendered per event with the tags the connection has
//! at that moment, and `{json.V}` from the message's JSON (open and close
//! take the defaults), as wsgateway renders it.

use std::net::SocketAddr;

use crate::config::{Endpoint, Part, Template};
use crate::engine::route::Ctx;
use crate::engine::tags::Tag;
use crate::engine::ConnId;

/// Splits a gjson-style path (`data.items.0.name`, `\.` for a literal dot).
pub(crate) fn split_json_path(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '.' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The value at `path` as gjson's `String()` gives it: a string unquoted,
/// a number, bool or nested value as JSON text, "" for null or missing.
pub(crate) fn json_lookup(doc: &serde_json::Value, path: &[String]) -> String {
    let mut v = doc;
    for key in path {
        v = match v {
            serde_json::Value::Object(m) => match m.get(key) {
                Some(x) => x,
                None => return String::new(),
            },
            serde_json::Value::Array(a) => match key.parse::<usize>().ok().and_then(|i| a.get(i)) {
                Some(x) => x,
                None => return String::new(),
            },
            _ => return String::new(),
        };
    }
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders a stream name: tags as they are now, JSON from `json` (None:
/// not a message, or not JSON; every `{json.V}` takes its default).
pub(crate) fn render(
    t: &Template,
    tags: &[Tag],
    vars: &[(String, Vec<String>)],
    json: Option<&serde_json::Value>,
) -> String {
    let mut out = String::new();
    for p in &t.0 {
        match p {
            Part::Lit(s) => out.push_str(s),
            Part::Tag(name, def) => match tags.iter().find(|(k, _)| **k == **name) {
                Some((_, v)) if !v.is_empty() => out.push_str(v),
                _ => out.push_str(def),
            },
            Part::Json(var, def) => {
                let v = json
                    .and_then(|doc| {
                        let path = vars.iter().find(|(n, _)| n == var)?;
                        Some(json_lookup(doc, &path.1))
                    })
                    .unwrap_or_default();
                out.push_str(if v.is_empty() { def } else { &v });
            }
            Part::Default(def) => out.push_str(def),
        }
    }
    out
}

/// Go's `url.QueryEscape`: unreserved bytes as they are, space as `+`,
/// the rest `%XX`.
fn query_escape(out: &mut String, s: &str) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            b => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 15) as usize] as char);
            }
        }
    }
}

/// The `tags` field: the included tags, `url.Values.Encode()`d (keys
/// sorted; the tags are kept sorted by key).
pub(crate) fn tags_field(tags: &[Tag], include: &[String]) -> String {
    let mut out = String::new();
    for (k, v) in tags
        .iter()
        .filter(|(k, _)| include.iter().any(|i| **i == **k))
    {
        if !out.is_empty() {
            out.push('&');
        }
        query_escape(&mut out, k);
        out.push('=');
        query_escape(&mut out, v);
    }
    out
}

/// XADDs one event of connection `id` (and, for a message, `text`/`data`).
fn xadd(
    cx: &mut Ctx<'_>,
    me: ConnId,
    ep: &Endpoint,
    id: &[u8],
    tags: &[Tag],
    action: &[u8],
    msg: Option<(bool, &[u8])>,
) {
    let Some(ev) = cx.cfg().events.as_ref() else {
        return;
    };
    let json = match msg {
        Some((_, data)) if ev.stream.uses_json() => {
            serde_json::from_slice::<serde_json::Value>(data).ok()
        }
        _ => None,
    };
    let stream = match ev.stream.fixed() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(render(&ev.stream, tags, &ep.json_vars, json.as_ref())),
    };
    let tag_field = tags_field(tags, &ep.stream_include_tags);
    let server = match &ev.sink {
        crate::config::EventSink::Redis(s) => *s,
        crate::config::EventSink::Amqp(_) => {
            let body = amqp_body(id, action, &tag_field, msg);
            cx.amqp_event(&stream, body);
            return;
        }
    };
    let maxlen = ev.maxlen.map(|n| n.to_string());
    // On the stack: this runs per client message.
    let mut args: [&[u8]; 16] = [b""; 16];
    let mut n = 0;
    fn put<'a>(args: &mut [&'a [u8]; 16], n: &mut usize, parts: &[&'a [u8]]) {
        for p in parts {
            args[*n] = p;
            *n += 1;
        }
    }
    put(&mut args, &mut n, &[b"XADD", stream.as_bytes()]);
    if let Some(m) = &maxlen {
        put(&mut args, &mut n, &[b"MAXLEN", b"~", m.as_bytes()]);
    }
    put(
        &mut args,
        &mut n,
        &[b"*", b"connection", id, b"action", action],
    );
    if let Some((text, data)) = msg {
        let kind: &[u8] = if text { b"text" } else { b"binary" };
        put(
            &mut args,
            &mut n,
            &[
                b"type",
                kind,
                b"tags",
                tag_field.as_bytes(),
                b"message",
                data,
            ],
        );
    } else {
        put(&mut args, &mut n, &[b"tags", tag_field.as_bytes()]);
    }
    cx.redis_event(server, me, &args[..n]);
}

/// An event as wsgateway publishes it to AMQP: a JSON object with
/// `connection`, `action` and `tags`, and for a message `type` and
/// `message` (binary as lossy UTF-8, as Go's string conversion of it).
pub(crate) fn amqp_body(
    id: &[u8],
    action: &[u8],
    tags: &str,
    msg: Option<(bool, &[u8])>,
) -> Vec<u8> {
    // Each value is written escaped straight into the body: no value or
    // string is built per field (this runs per client message).
    fn field(out: &mut Vec<u8>, name: &[u8], v: &[u8]) {
        out.extend_from_slice(name);
        // Writing into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &*String::from_utf8_lossy(v));
    }
    let mut out = Vec::with_capacity(96 + msg.map_or(0, |(_, d)| d.len() + d.len() / 8));
    field(&mut out, b"{\"connection\":", id);
    field(&mut out, b",\"action\":", action);
    field(&mut out, b",\"tags\":", tags.as_bytes());
    if let Some((text, data)) = msg {
        out.extend_from_slice(if text {
            b",\"type\":\"text\""
        } else {
            b",\"type\":\"binary\""
        });
        field(&mut out, b",\"message\":", data);
    }
    out.push(b'}');
    out
}

/// A connection opened (after its 101): its `open` event, and its hashes.
pub(crate) fn on_open(
    cx: &mut Ctx<'_>,
    me: ConnId,
    ep: &Endpoint,
    id: &[u8],
    tags: &[Tag],
    peer: SocketAddr,
) {
    if !ep.events {
        return;
    }
    xadd(cx, me, ep, id, tags, b"open", None);
    let Some(sync) = cx.cfg().sync.as_ref() else {
        return;
    };
    let server = sync.server;
    let (key, tkey) = keys(id);
    let addr = peer.to_string();
    cx.redis_event(server, me, &[b"HSET", &key, b"addr", addr.as_bytes()]);
    if !tags.is_empty() {
        let mut args: Vec<&[u8]> = vec![b"HSET", &tkey];
        for (k, v) in tags {
            args.extend([k.as_bytes(), v.as_bytes()]);
        }
        cx.redis_event(server, me, &args);
    }
    refresh(cx, me, id);
}

/// A client message: its `message` event.
pub(crate) fn on_message(
    cx: &mut Ctx<'_>,
    me: ConnId,
    ep: &Endpoint,
    id: &[u8],
    tags: &[Tag],
    text: bool,
    data: &[u8],
) {
    if ep.events {
        xadd(cx, me, ep, id, tags, b"message", Some((text, data)));
    }
}

/// The connection closes: its `close` event with the tags it has now,
/// then its hashes go (`unsync`; not when a newer connection took its id).
pub(crate) fn on_close(
    cx: &mut Ctx<'_>,
    me: ConnId,
    ep: &Endpoint,
    id: &[u8],
    tags: &[Tag],
    unsync: bool,
) {
    if !ep.events {
        return;
    }
    xadd(cx, me, ep, id, tags, b"close", None);
    if let Some(sync) = cx.cfg().sync.as_ref().filter(|_| unsync) {
        let server = sync.server;
        let (key, tkey) = keys(id);
        cx.redis_event(server, me, &[b"DEL", &key, &tkey]);
    }
}

/// Tags changed (`/settags`): the tags hash follows.
pub(crate) fn on_tags(
    cx: &mut Ctx<'_>,
    me: ConnId,
    ep: &Endpoint,
    id: &[u8],
    removed: &[Tag],
    added: &[Tag],
) {
    let Some(sync) = cx.cfg().sync.as_ref().filter(|_| ep.events) else {
        return;
    };
    let server = sync.server;
    let (_, tkey) = keys(id);
    let gone: Vec<&[u8]> = removed
        .iter()
        .filter(|(k, _)| !added.iter().any(|(a, _)| a == k))
        .map(|(k, _)| k.as_bytes())
        .collect();
    if !gone.is_empty() {
        let mut args: Vec<&[u8]> = vec![b"HDEL", &tkey];
        args.extend(gone);
        cx.redis_event(server, me, &args);
    }
    if !added.is_empty() {
        let mut args: Vec<&[u8]> = vec![b"HSET", &tkey];
        for (k, v) in added {
            args.extend([k.as_bytes(), v.as_bytes()]);
        }
        cx.redis_event(server, me, &args);
    }
    refresh(cx, me, id);
}

/// Resets the hashes' TTL (`sync.ttl`; also at every server ping).
pub(crate) fn refresh(cx: &mut Ctx<'_>, me: ConnId, id: &[u8]) {
    let Some((server, ttl)) = cx
        .cfg()
        .sync
        .as_ref()
        .and_then(|s| Some((s.server, s.ttl?)))
    else {
        return;
    };
    let (key, tkey) = keys(id);
    let secs = ttl.as_secs().to_string();
    cx.redis_event(server, me, &[b"EXPIRE", &key, secs.as_bytes()]);
    cx.redis_event(server, me, &[b"EXPIRE", &tkey, secs.as_bytes()]);
}

fn keys(id: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut key = b"connection:".to_vec();
    key.extend_from_slice(id);
    let mut tkey = key.clone();
    tkey.extend_from_slice(b":tags");
    (key, tkey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_bodies_are_wsgateways_json_escaped_in_place() {
        let b = amqp_body(
            b"id-1",
            b"message",
            "g=1&x=%22",
            Some((true, b"say \"hi\"\n")),
        );
        let v: serde_json::Value = serde_json::from_slice(&b).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"connection": "id-1", "action": "message", "tags": "g=1&x=%22",
                               "type": "text", "message": "say \"hi\"\n"})
        );
        let b = amqp_body(b"id-1", b"message", "", Some((false, &[0xff, b'A'])));
        let v: serde_json::Value = serde_json::from_slice(&b).expect("JSON");
        assert_eq!(v["type"], "binary");
        assert_eq!(v["message"], "\u{fffd}A", "binary as lossy UTF-8");
        let b = amqp_body(b"id-1", b"open", "", None);
        assert_eq!(b, br#"{"connection":"id-1","action":"open","tags":""}"#);
    }

    fn tags(v: &[(&str, &str)]) -> Vec<Tag> {
        v.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn the_tags_field_is_url_values_encode() {
        let t = tags(&[
            ("a b", "1&2"),
            ("foo", "bar"),
            ("group", "x/y"),
            ("skip", "me"),
        ]);
        let inc: Vec<String> = ["foo", "group", "a b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(tags_field(&t, &inc), "a+b=1%262&foo=bar&group=x%2Fy");
        assert_eq!(tags_field(&t, &[]), "");
    }

    #[test]
    fn stream_names_render_as_wsgateway_renders_them() {
        let t = Template::parse("ev-{tag.group:nogroup}-{json.cmd}-{json.ref:none}");
        let vars = vec![
            ("cmd".to_string(), split_json_path("command")),
            ("ref".to_string(), split_json_path("data.actionRef")),
        ];
        let doc: serde_json::Value =
            serde_json::from_str(r#"{"command":"join","data":{"actionRef":7}}"#).unwrap();
        let g = tags(&[("group", "red")]);
        assert_eq!(render(&t, &g, &vars, Some(&doc)), "ev-red-join-7");
        assert_eq!(render(&t, &[], &vars, None), "ev-nogroup-_-none");
        let empty = tags(&[("group", "")]);
        assert_eq!(render(&t, &empty, &vars, None), "ev-nogroup-_-none");
    }

    #[test]
    fn json_paths_read_like_gjson() {
        let doc: serde_json::Value =
            serde_json::from_str(r#"{"a":{"b.c":1,"l":[{"x":"y"},true]},"n":null}"#).unwrap();
        assert_eq!(json_lookup(&doc, &split_json_path(r"a.b\.c")), "1");
        assert_eq!(json_lookup(&doc, &split_json_path("a.l.0.x")), "y");
        assert_eq!(json_lookup(&doc, &split_json_path("a.l.1")), "true");
        assert_eq!(
            json_lookup(&doc, &split_json_path("a.l")),
            r#"[{"x":"y"},true]"#
        );
        assert_eq!(json_lookup(&doc, &split_json_path("n")), "");
        assert_eq!(json_lookup(&doc, &split_json_path("missing.x")), "");
    }
}

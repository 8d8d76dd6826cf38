//! WebSocket endpoints: what a path template is, how a request path
//! matches one, and what the endpoint does with client messages.

use serde::Deserialize;

/// What a WebSocket endpoint does with client messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMessage {
    /// Discard them (counted): clients only receive.
    None,
    /// Send each message back to its sender.
    Echo,
    /// Send each message to the other connections sharing the endpoint's
    /// `broadcast_tag` value.
    Broadcast,
    /// Binary messages are RELY transfer frames, routed by ToClientID to RELY
    /// or WebSocket clients; a RELY transfer to this client's id arrives as a
    /// binary message.
    Rely,
}

/// One segment of an endpoint path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Must equal this text.
    Literal(String),
    /// Captures the segment under this name.
    Param(String),
}

/// A validated endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The path as written.
    pub path: String,
    /// Its segments.
    pub template: Vec<Segment>,
    /// What client messages do.
    pub on_message: OnMessage,
    /// Largest message after reassembly.
    pub max_message_size: usize,
    /// Fixed tags.
    pub set_tags: Vec<(String, String)>,
    /// Path parameters that become tags.
    pub tag_params: Vec<String>,
    /// Path parameter used as the client id.
    pub id_param: Option<String>,
    /// Prepended to every id of this endpoint: a namespace of its own, so
    /// its clients cannot take RELY clients' (or other endpoints') ids.
    pub id_prefix: String,
    /// Broadcast grouping tag.
    pub broadcast_tag: Option<String>,
    /// A wsproxy session endpoint (its messages go to Redis, not
    /// `on_message`).
    pub session: Option<super::SessionConfig>,
    /// Its connections' events go to the `events:` stream.
    pub events: bool,
    /// Tags copied into its events.
    pub stream_include_tags: Vec<String>,
    /// `{json.V}` variables: (V, JSON path split at dots).
    pub json_vars: Vec<(String, Vec<String>)>,
    /// Origins allowed to connect, lower-cased patterns (empty: any).
    pub allowed_origins: Vec<String>,
    /// permessage-deflate negotiation.
    pub compression: crate::protocol::deflate::Policy,
}

/// Does `origin` match `pattern` (both lower-case; `*` matches any run of
/// characters)?
fn glob(pattern: &[u8], s: &[u8]) -> bool {
    // Iterative matching with one backtrack point: linear enough for the
    // short strings an Origin header holds.
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if p < pattern.len() && pattern[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Endpoint {
    /// May a request with this `Origin` header (None: not sent, as by
    /// clients that are not browsers) connect here?
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(o) = origin else {
            return true;
        };
        if self.allowed_origins.is_empty() {
            return true;
        }
        let o = o.trim().to_ascii_lowercase();
        self.allowed_origins
            .iter()
            .any(|p| glob(p.as_bytes(), o.as_bytes()))
    }
}

impl Endpoint {
    /// Matches a request path; returns the captured parameters.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segs.len() != self.template.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, t) in segs.iter().zip(&self.template) {
            match t {
                Segment::Literal(l) if l == seg => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if seg.is_empty() => return None,
                // Escapes that decode to invalid UTF-8 are kept as written,
                // so `%ff` and `%fe` stay two different ids.
                Segment::Param(name) => params.push((
                    name.clone(),
                    crate::protocol::http::url_decode_utf8(seg).unwrap_or_else(|| seg.to_string()),
                )),
            }
        }
        Some(params)
    }
}

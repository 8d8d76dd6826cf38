//! The HTTP/1.1 side of a WebSocket listener, sans-io: parse a request head
//! (httparse) from the bytes so far and classify it as a WebSocket upgrade,
//! a plain request, or an error with its status code.

/// A request head parsed from the start of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (after `?`), possibly empty.
    pub query: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head (the body, if any, follows).
    pub head_len: usize,
}

impl Request {
    /// First header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`, in order.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True if header `name` holds `token` in its comma-separated list
    /// (case-insensitive), as `Connection: keep-alive, Upgrade` does.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The `Sec-WebSocket-Key` if this is a valid WebSocket upgrade
    /// request (RFC 6455 4.2.1), else why not.
    pub fn websocket_key(&self) -> Result<&str, HttpError> {
        if self.method != "GET" {
            return Err(HttpError::BadRequest("WebSocket upgrade must be GET"));
        }
        if !self
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        {
            return Err(HttpError::UpgradeRequired);
        }
        if !self.header_has_token("connection", "upgrade") {
            return Err(HttpError::BadRequest("Connection header lacks Upgrade"));
        }
        if self.header("sec-websocket-version") != Some("13") {
            return Err(HttpError::BadVersion);
        }
        match self.header("sec-websocket-key") {
            // 16 random bytes, base64: 22 characters and "==" (RFC 6455 4.1).
            Some(k) if is_key(k) => Ok(k),
            _ => Err(HttpError::BadRequest(
                "missing or malformed Sec-WebSocket-Key",
            )),
        }
    }
}

/// A base64 encoding of 16 bytes: 22 base64 characters, then "==".
fn is_key(k: &str) -> bool {
    let b = k.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Why a request is refused, with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// 400 with a reason.
    BadRequest(&'static str),
    /// 404: no endpoint at this path.
    NotFound,
    /// 426: a plain request on a WebSocket-only listener.
    UpgradeRequired,
    /// 426 with `Sec-WebSocket-Version: 13`.
    BadVersion,
    /// 431: the head is over the configured cap.
    HeadTooLarge,
}

impl HttpError {
    /// The complete response to send before closing.
    pub fn response(&self) -> Vec<u8> {
        let (status, body, extra) = match self {
            HttpError::BadRequest(why) => ("400 Bad Request", *why, ""),
            HttpError::NotFound => ("404 Not Found", "no WebSocket endpoint at this path", ""),
            HttpError::UpgradeRequired => (
                "426 Upgrade Required",
                "WebSocket upgrade required",
                "Upgrade: websocket\r\n",
            ),
            HttpError::BadVersion => (
                "426 Upgrade Required",
                "unsupported WebSocket version",
                "Sec-WebSocket-Version: 13\r\n",
            ),
            HttpError::HeadTooLarge => (
                "431 Request Header Fields Too Large",
                "request head too large",
                "",
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}\n",
            body.len() + 1
        )
        .into_bytes()
    }
}

/// A complete plain-text response that closes the connection (`body` as
/// it is, no newline added: wsproxy's clients compare it).
pub fn plain_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Parses a request head from `buf`. `Ok(None)`: incomplete (caller checks
/// the size cap).
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::BadRequest("malformed HTTP request")),
    };
    if req.version != Some(1) {
        return Err(HttpError::BadRequest("HTTP/1.1 required"));
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut hs = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::BadRequest("header value not UTF-8"))?;
        hs.push((h.name.to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: hs,
        head_len,
    }))
}

/// The 101 response accepting a WebSocket upgrade.
pub fn switching_protocols(key: &str, extensions: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let ext = extensions.map_or(String::new(), |e| {
        format!("Sec-WebSocket-Extensions: {e}\r\n")
    });
    format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n")
        .into_bytes()
}

/// Decodes a query or form value: `+` is a space, `%XX` a byte
/// (form_urlencoded's rules; invalid UTF-8 becomes U+FFFD).
pub fn url_decode(s: &str) -> String {
    let spaced: Vec<u8> = s
        .bytes()
        .map(|c| if c == b'+' { b' ' } else { c })
        .collect();
    percent_encoding::percent_decode(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Decodes a path segment's `%XX` escapes (a `+` stays a plus: paths are
/// not form-encoded); None if the result is not UTF-8, so two different
/// invalid byte strings never decode to the same text.
pub fn url_decode_utf8(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The `k=v&k2=v2` pairs of a query or form body, decoded (form_urlencoded);
/// empty keys are skipped.
pub fn form_pairs(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /chat/room1?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn upgrade_request() {
        let r = parse_request(UPGRADE.as_bytes()).unwrap().unwrap();
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/chat/room1", "x=1"));
        assert_eq!(r.websocket_key().unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
        let resp =
            String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(
            resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "RFC 6455 example"
        );
        assert_eq!(parse_request(&UPGRADE.as_bytes()[..20]).unwrap(), None);
    }

    #[test]
    fn refusals() {
        let plain = parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(plain.websocket_key(), Err(HttpError::UpgradeRequired));
        let v8 = UPGRADE.replace("Version: 13", "Version: 8");
        assert_eq!(
            parse_request(v8.as_bytes())
                .unwrap()
                .unwrap()
                .websocket_key(),
            Err(HttpError::BadVersion)
        );
        assert!(parse_request(b"\x16\x03\x01garbage\r\n\r\n").is_err());
        assert!(String::from_utf8(HttpError::NotFound.response())
            .unwrap()
            .starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn decoding() {
        assert_eq!(url_decode("a%20b+c%2"), "a b c%2");
        assert_eq!(url_decode("%e2%82%ac"), "€");
        assert_eq!(
            url_decode_utf8("a+b%20c").as_deref(),
            Some("a+b c"),
            "paths keep +"
        );
        assert_eq!(url_decode_utf8("%ff"), None);
        assert_eq!(
            form_pairs("a=1&=x&b=two+words&c"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "two words".to_string()),
                ("c".to_string(), String::new())
            ]
        );
    }
}

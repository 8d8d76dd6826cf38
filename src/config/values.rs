//! Value types as written in YAML and their parsers: durations, sizes,
//! the slow-consumer policy, `ws://` URLs and CIDR networks.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// What happens when a connection's output queue is over its byte limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close the slow connection (counted as `slow_consumer_disconnect`).
    Disconnect,
    /// Drop the message for that connection (counted as `slow_consumer_drop`).
    Drop,
}

/// A duration as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

/// A byte size as written in YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

/// The longest duration a config may hold (about 31 years): anything
/// longer is a typo, and deadlines computed from it must not overflow.
pub const MAX_DURATION_SECS: u64 = 1_000_000_000;

/// Parses `250ms`, `5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 250ms, 5s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "us" => n / 1_000_000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=MAX_DURATION_SECS as f64).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `65536`, `64KiB`, `64K`, `8MiB`, `8M`, `1GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 65536, 64KiB, 8MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" | "k" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {s:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} out of range"))
}

/// Visits a YAML scalar that may be a number or a string, so errors keep
/// the value's own position (an untagged enum would buffer and lose it).
struct ScalarVisitor<T> {
    expecting: &'static str,
    from_u64: fn(u64) -> Result<T, String>,
    from_str: fn(&str) -> Result<T, String>,
}

impl<'de, T> de::Visitor<'de> for ScalarVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        (self.from_u64)(v).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))?;
        (self.from_u64)(v).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        (self.from_str)(&v.to_string()).map_err(E::custom)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.from_str)(v).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a duration such as 250ms, 5s, 2m or a number of seconds",
            from_u64: |n| {
                (n <= MAX_DURATION_SECS)
                    .then(|| Dur(Duration::from_secs(n)))
                    .ok_or_else(|| format!("duration {n} s out of range"))
            },
            from_str: |s| parse_duration(s).map(Dur),
        })
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor {
            expecting: "a size such as 65536, 64KiB or 8MiB",
            from_u64: |n| Ok(Size(n)),
            from_str: |s| parse_size(s).map(Size),
        })
    }
}

/// A parsed `ws://` / `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// TLS (`wss`).
    pub tls: bool,
    /// Host name or address, as written (brackets stripped).
    pub host: String,
    /// Port (default 80/443).
    pub port: u16,
    /// Path and query, at least "/".
    pub path: String,
    /// `user:password` from the URL (percent-decoded), sent as Basic auth.
    pub userinfo: Option<String>,
}

/// The host of a parsed URL without IPv6 brackets, and whether there is one.
pub(crate) fn host_of(u: &url::Url) -> Option<String> {
    match u.host()? {
        url::Host::Domain("") => None,
        url::Host::Domain(d) => Some(d.to_owned()),
        url::Host::Ipv4(a) => Some(a.to_string()),
        url::Host::Ipv6(a) => Some(a.to_string()),
    }
}

/// A URL's percent-encoded userinfo part, decoded (not form-decoded: a
/// `+` in a password is a plus).
pub(crate) fn userinfo_part(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl WsUrl {
    /// Parses `ws[s]://[user:password@]host[:port][/path][?query]` (the
    /// `url` crate, WHATWG rules).
    pub fn parse(raw: &str) -> Result<WsUrl, String> {
        // Errors show the URL with its secrets masked; the parser's own
        // messages never include the input.
        let shown = redact_url(raw);
        let s = shown.as_str();
        let u = url::Url::parse(raw.trim()).map_err(|e| format!("{s:?}: {e}"))?;
        let tls = match u.scheme() {
            "wss" => true,
            "ws" => false,
            _ => return Err(format!("{s:?}: the URL must start with ws:// or wss://")),
        };
        let host = host_of(&u).ok_or_else(|| format!("{s:?}: no host"))?;
        let port = u
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        // The request target: path and query as written (the fragment is
        // never sent).
        let mut path = u.path().to_owned();
        if path.is_empty() {
            path.push('/');
        }
        if let Some(q) = u.query() {
            path.push('?');
            path.push_str(q);
        }
        // user:password@ becomes a Basic Authorization header (it is never
        // printed).
        let userinfo = (!u.username().is_empty() || u.password().is_some()).then(|| {
            let mut ui = userinfo_part(u.username());
            if let Some(p) = u.password() {
                ui.push(':');
                ui.push_str(&userinfo_part(p));
            }
            ui
        });
        Ok(WsUrl {
            tls,
            host,
            port,
            path,
            userinfo,
        })
    }
}

/// A URL as it may be printed or exported: `user:password@` becomes
/// `***@` and every query value `***` (tokens travel there).
pub fn redact_url(s: &str) -> String {
    let (scheme, rest) = match s.split_once("://") {
        Some((sch, r)) => (format!("{sch}://"), r),
        None => (String::new(), s),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    let mut out = format!("{scheme}{authority}{path}");
    if let Some(q) = query {
        let masked: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => kv.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&masked.join("&"));
    }
    out
}

/// An IP network, `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?
        };
        Ok(Cidr { addr, prefix })
    }

    /// True if `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

//! RESP2, the Redis wire protocol, sans-io: replies are decoded by the
//! `redis-protocol` crate from our own buffer (values borrow from it), and
//! commands are encoded here (an array of bulk strings is all a client
//! sends).
//!
//! Before the crate sees a reply, [`frame_len`] walks it without
//! allocating: it finds where the first whole reply ends (or says "need
//! more"), refuses nesting deeper than [`MAX_DEPTH`] (the crate decodes
//! arrays by recursion, so a Redis answering `*1\r\n` a million times would
//! otherwise overflow the core's stack), and refuses a reply whose declared
//! size is over the caller's cap before waiting for it. The crate then
//! decodes only whole replies, so a reply that arrives in many reads is
//! parsed once, not once per read.

use redis_protocol::resp2::decode::decode_range;
use redis_protocol::resp2::types::RangeFrame;

/// Deepest array nesting accepted. Nothing a server sends to us nests
/// more than 2 (a pub/sub message is an array of bulk strings).
pub const MAX_DEPTH: usize = 8;

/// A decoded reply; strings borrow from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// `+OK`.
    Simple(&'a [u8]),
    /// `-ERR ...`: a failed command (the connection is fine).
    Error(&'a [u8]),
    /// `:1`.
    Int(i64),
    /// `$n` with its bytes.
    Bulk(&'a [u8]),
    /// `$-1` or `*-1`.
    Nil,
    /// `*n`.
    Array(Vec<Value<'a>>),
}

impl<'a> Value<'a> {
    /// The bytes of a simple or bulk string.
    pub fn bytes(&self) -> Option<&'a [u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) => Some(b),
            _ => None,
        }
    }
}

/// Why a reply stream cannot be read on: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// Not RESP (a bad type byte, length or terminator).
    Malformed(&'static str),
    /// Arrays nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// A reply announces more bytes than the cap.
    TooLarge,
}

impl std::fmt::Display for RespError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RespError::Malformed(why) => write!(f, "malformed reply: {why}"),
            RespError::TooDeep => write!(f, "reply nested deeper than {MAX_DEPTH}"),
            RespError::TooLarge => write!(f, "reply larger than the read cap"),
        }
    }
}

impl std::error::Error for RespError {}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

fn parse_len(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or(RespError::Malformed("bad length"))
}

/// The length of the first whole reply in `buf`, or None if more bytes are
/// needed. Errors if it is not RESP, nests too deep, or is declared larger
/// than `cap` bytes.
pub fn frame_len(buf: &[u8], cap: usize) -> Result<Option<usize>, RespError> {
    let mut pos = 0usize;
    // Elements still due in each open array.
    let mut open = [0i64; MAX_DEPTH];
    let mut depth = 0usize;
    loop {
        // Every rule below depends only on bytes before the cap, so a reply
        // is judged the same whether it arrives whole or in pieces.
        if pos >= cap {
            return Err(RespError::TooLarge);
        }
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
            return Err(RespError::Malformed("unknown type byte"));
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            if buf.len() > cap {
                return Err(RespError::TooLarge);
            }
            return Ok(None);
        };
        if eol + 2 > cap {
            return Err(RespError::TooLarge);
        }
        let line = &buf[pos + 1..eol];
        pos = eol + 2;
        match kind {
            b':' => {
                parse_len(line)?;
            }
            b'$' => match parse_len(line)? {
                -1 => {}
                n if n < 0 => return Err(RespError::Malformed("negative length")),
                n => {
                    let end = usize::try_from(n)
                        .ok()
                        .and_then(|n| pos.checked_add(n)?.checked_add(2))
                        .filter(|&e| e <= cap)
                        .ok_or(RespError::TooLarge)?;
                    if buf.len() < end {
                        return Ok(None);
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return Err(RespError::Malformed("bulk string without CRLF"));
                    }
                    pos = end;
                }
            },
            b'*' => match parse_len(line)? {
                -1 | 0 => {}
                n if n < 0 => return Err(RespError::Malformed("negative length")),
                n => {
                    if depth == MAX_DEPTH {
                        return Err(RespError::TooDeep);
                    }
                    open[depth] = n;
                    depth += 1;
                    continue;
                }
            },
            // `+` and `-`: the line is the value.
            _ => {}
        }
        // One element is whole: close the arrays it completes.
        loop {
            if depth == 0 {
                return Ok(Some(pos));
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

fn value<'a>(buf: &'a [u8], f: RangeFrame) -> Value<'a> {
    match f {
        RangeFrame::SimpleString((a, b)) => Value::Simple(&buf[a..b]),
        RangeFrame::Error((a, b)) => Value::Error(&buf[a..b]),
        RangeFrame::Integer(i) => Value::Int(i),
        RangeFrame::BulkString((a, b)) => Value::Bulk(&buf[a..b]),
        RangeFrame::Null => Value::Nil,
        RangeFrame::Array(v) => Value::Array(v.into_iter().map(|f| value(buf, f)).collect()),
    }
}

/// Decodes the first whole reply in `buf`: the value and the bytes it took,
/// or None if more are needed.
pub fn decode(buf: &[u8], cap: usize) -> Result<Option<(Value<'_>, usize)>, RespError> {
    let Some(n) = frame_len(buf, cap)? else {
        return Ok(None);
    };
    match decode_range(&buf[..n]) {
        Ok(Some((f, used))) if used == n => Ok(Some((value(buf, f), n))),
        // Our walk and the crate disagree: treat it as not RESP.
        Ok(_) => Err(RespError::Malformed("reply length mismatch")),
        Err(_) => Err(RespError::Malformed("rejected by the decoder")),
    }
}

/// Appends `prefix`, `n` in decimal, and CRLF (no formatter: this runs
/// twice per argument of every command).
fn header(out: &mut Vec<u8>, prefix: u8, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push(prefix);
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Appends one command: an array of bulk strings.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.reserve(encoded_len(args));
    header(out, b'*', args.len());
    for a in args {
        header(out, b'$', a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Appends one command whose arguments are each the concatenation of their
/// parts (a channel name from its prefix and an id, without building it).
pub fn encode_parts(out: &mut Vec<u8>, args: &[&[&[u8]]]) {
    header(out, b'*', args.len());
    for a in args {
        header(out, b'$', a.iter().map(|p| p.len()).sum());
        for p in *a {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// The encoded size of an [`encode_parts`] command.
pub fn encoded_len_parts(args: &[&[&[u8]]]) -> usize {
    fn digits(n: usize) -> usize {
        n.checked_ilog10().unwrap_or(0) as usize + 1
    }
    3 + digits(args.len())
        + args
            .iter()
            .map(|a| {
                let len: usize = a.iter().map(|p| p.len()).sum();
                5 + digits(len) + len
            })
            .sum::<usize>()
}

/// The encoded size of a command, without encoding it.
pub fn encoded_len(args: &[&[u8]]) -> usize {
    fn digits(n: usize) -> usize {
        n.checked_ilog10().unwrap_or(0) as usize + 1
    }
    3 + digits(args.len())
        + args
            .iter()
            .map(|a| 5 + digits(a.len()) + a.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 1 << 20;

    /// Every reply in `input`, fed whole.
    fn all(input: &[u8]) -> (Vec<String>, Option<RespError>) {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            match decode(&input[at..], CAP) {
                Ok(Some((v, n))) => {
                    out.push(format!("{v:?}"));
                    at += n;
                }
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn every_kind_decodes() {
        let (v, e) = all(
            b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*0\r\n*2\r\n$1\r\na\r\n:1\r\n",
        );
        assert_eq!(e, None);
        assert_eq!(
            v,
            vec![
                "Simple([79, 75])",
                "Error([69, 82, 82, 32, 110, 111])",
                "Int(42)",
                "Bulk([97, 98, 99])",
                "Nil",
                "Nil",
                "Array([])",
                "Array([Bulk([97]), Int(1)])",
            ]
        );
    }

    #[test]
    fn a_split_at_every_byte_gives_the_same_replies() {
        let input = b"*3\r\n$7\r\nmessage\r\n$14\r\nsession:a:down\r\n$5\r\nhello\r\n:7\r\n$0\r\n\r\n+PONG\r\n*2\r\n*1\r\n:1\r\n$2\r\n\r\n\r\n";
        let whole = all(input);
        assert_eq!(whole.0.len(), 5);
        for i in 0..=input.len() {
            // Bytes arrive in two reads; replies are taken as they complete.
            let mut buf = input[..i].to_vec();
            let mut got = Vec::new();
            let mut take = |buf: &mut Vec<u8>| {
                while let Some((v, n)) = decode(buf, CAP).expect("valid") {
                    got.push(format!("{v:?}"));
                    buf.drain(..n);
                }
            };
            take(&mut buf);
            buf.extend_from_slice(&input[i..]);
            take(&mut buf);
            assert_eq!(got, whole.0, "split at {i}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_recursed() {
        let deep = b"*1\r\n".repeat(100_000);
        assert_eq!(decode(&deep, usize::MAX), Err(RespError::TooDeep));
        let ok = [&b"*1\r\n".repeat(MAX_DEPTH)[..], b":1\r\n"].concat();
        assert!(decode(&ok, CAP).unwrap().is_some());
    }

    #[test]
    fn a_reply_over_the_cap_is_refused_before_it_arrives() {
        assert_eq!(decode(b"$2000000\r\nab", CAP), Err(RespError::TooLarge));
        assert_eq!(
            decode(b"$99999999999999999999999\r\n", CAP),
            Err(RespError::Malformed("bad length"))
        );
        let long_simple = [b"+".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(decode(&long_simple, 50), Err(RespError::TooLarge));
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            &b"?what\r\n"[..],
            b"$3\r\nabcde\r\n",
            b"$-5\r\n",
            b":x\r\n",
            b"*-2\r\n",
            b"$1234567890123456789012345\r\n",
        ] {
            assert!(
                matches!(decode(bad, CAP), Err(RespError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        let args: [&[u8]; 3] = [b"PUBLISH", b"session:x:up", b"{}"];
        encode(&mut out, &args);
        assert_eq!(
            out,
            b"*3\r\n$7\r\nPUBLISH\r\n$12\r\nsession:x:up\r\n$2\r\n{}\r\n"
        );
        assert_eq!(encoded_len(&args), out.len());
        let big = vec![b'x'; 12345];
        let args: [&[u8]; 1] = [&big];
        out.clear();
        encode(&mut out, &args);
        assert_eq!(encoded_len(&args), out.len());
    }
}

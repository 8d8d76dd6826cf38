//! Veylor's Unix-socket framing, sans-io: a 4-byte big-endian length, then
//! that many bytes, in both directions. Lengths are checked before any
//! allocation; any split of the input yields the same messages.

/// Why the bytes are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooBig {
    /// The announced length.
    pub len: u32,
    /// The limit.
    pub max: u32,
}

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "message length {} over limit {}", self.len, self.max)
    }
}

impl std::error::Error for TooBig {}

/// Appends one framed message.
pub fn encode(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Incremental decoder: per-connection state is only a partial message.
#[derive(Debug, Default)]
pub struct Decoder {
    partial: Vec<u8>,
}

impl Decoder {
    /// Heap bytes held.
    pub fn capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// Feeds bytes; calls `on_msg` per complete message (false stops).
    pub fn feed<F: FnMut(&[u8]) -> bool>(
        &mut self,
        mut input: &[u8],
        max: u32,
        mut on_msg: F,
    ) -> Result<(), TooBig> {
        while !self.partial.is_empty() {
            let need = match need(&self.partial, max)? {
                Some(total) if self.partial.len() == total => {
                    let go = on_msg(&self.partial[4..]);
                    self.partial.clear();
                    if self.partial.capacity() > 64 * 1024 {
                        self.partial = Vec::new();
                    }
                    if !go {
                        return Ok(());
                    }
                    continue;
                }
                Some(total) => total,
                None => 4,
            };
            if input.is_empty() {
                return Ok(());
            }
            let take = (need - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
        }
        while !input.is_empty() {
            match need(input, max)? {
                Some(total) if input.len() >= total => {
                    if !on_msg(&input[4..total]) {
                        return Ok(());
                    }
                    input = &input[total..];
                }
                _ => {
                    self.partial.extend_from_slice(input);
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Total frame length once the 4 length bytes are there.
fn need(b: &[u8], max: u32) -> Result<Option<usize>, TooBig> {
    if b.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if len > max {
        return Err(TooBig { len, max });
    }
    Ok(Some(4 + len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(chunks: &[&[u8]], max: u32) -> Result<Vec<Vec<u8>>, TooBig> {
        let mut d = Decoder::default();
        let mut out = vec![];
        for c in chunks {
            d.feed(c, max, |m| {
                out.push(m.to_vec());
                true
            })?;
        }
        Ok(out)
    }

    #[test]
    fn any_split() {
        let mut s = vec![];
        encode(&mut s, b"hello");
        encode(&mut s, b"");
        encode(&mut s, &[9; 300]);
        let whole = msgs(&[&s], 1000).unwrap();
        assert_eq!(whole.len(), 3);
        for cut in 0..s.len() {
            assert_eq!(
                msgs(&[&s[..cut], &s[cut..]], 1000).unwrap(),
                whole,
                "cut {cut}"
            );
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(msgs(&bytes, 1000).unwrap(), whole);
    }

    #[test]
    fn length_checked_before_allocation() {
        let mut d = Decoder::default();
        assert_eq!(
            d.feed(&u32::MAX.to_be_bytes(), 1000, |_| true),
            Err(TooBig {
                len: u32::MAX,
                max: 1000
            })
        );
        assert!(d.capacity() < 64);
        // Split header: still rejected once the 4th byte arrives.
        let h = 5000u32.to_be_bytes();
        assert_eq!(
            msgs(&[&h[..2], &h[2..]], 1000),
            Err(TooBig {
                len: 5000,
                max: 1000
            })
        );
    }
}

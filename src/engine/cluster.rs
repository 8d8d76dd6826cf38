//! What nodes say to each other through Redis (`cluster:`), and what core 0
//! remembers of the other nodes. Channels (prefix `{p}`):
//! - `{p}:ctl`, every node: `ping|{node}` every `ping_interval`,
//!   `bye|{node}` at shutdown, and admin surveys (`survey|{json}`);
//! - `{p}:node:{node}`, one node: `kick|{epoch}|{id}` (from the claim
//!   script) and survey answers (`answer|{core}|{req}|{count}|{text}`).
//!
//! Transfers travel on `{p}:id:{id}` and never come here. Everything is
//! parsed defensively: a message that does not parse is counted and
//! dropped, never trusted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::message::{FanOp, Message};
use super::tags::Selector;

/// Claims id KEYS[1] (a hash) for login ARGV[2] of node ARGV[1], for
/// ARGV[3] seconds. The hash keeps the owner node and, per node, the newest
/// login it claimed: a node's logins may reach Redis out of order (each
/// core has its own connection), and a claim older than that node's newest
/// is stale (its login is already closed here) and changes nothing. If
/// another node owned the id, its channel (ARGV[4] + its name) is told to
/// close its logins of id ARGV[5] up to its newest claim. One atomic step:
/// Redis alone orders the claims, so exactly one login survives.
///
/// ARGV[6] = "1" re-claims after the connection to Redis came back: then
/// the newer login by the nodes' clocks (epochs are microseconds) keeps
/// the id, whichever node re-claims first; an older one closes itself.
/// Claiming again a login that still owns the id renews the key's
/// lifetime (the periodic refresh).
pub(crate) const CLAIM_SCRIPT: &[u8] = b"local n, e = ARGV[1], tonumber(ARGV[2])
local seq = tonumber(redis.call('HGET', KEYS[1], 's:' .. n))
if seq and seq >= e then
  if seq == e and redis.call('HGET', KEYS[1], 'owner') == n then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
  end
  return 0
end
local prev = redis.call('HGET', KEYS[1], 'owner')
if ARGV[6] == '1' and prev and prev ~= n then
  local ps = tonumber(redis.call('HGET', KEYS[1], 's:' .. prev))
  if ps and ps > e then
    redis.call('HSET', KEYS[1], 's:' .. n, ARGV[2])
    redis.call('PUBLISH', ARGV[4] .. n, 'kick|' .. ARGV[2] .. '|' .. ARGV[5])
    return 2
  end
end
redis.call('HSET', KEYS[1], 'owner', n, 's:' .. n, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if prev and prev ~= n then
  local ps = redis.call('HGET', KEYS[1], 's:' .. prev)
  if ps then redis.call('PUBLISH', ARGV[4] .. prev, 'kick|' .. ps .. '|' .. ARGV[5]) end
end
return 1";

/// Gives up claim KEYS[1] only if node ARGV[1]'s login ARGV[2] still owns
/// it. The nodes' newest-login marks stay (for a minute): a claim of an
/// older login still on its way must stay stale, or it would take the id
/// back and close a live login elsewhere.
pub(crate) const RELEASE_SCRIPT: &[u8] = b"if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] and redis.call('HGET', KEYS[1], 's:' .. ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'owner')
  redis.call('EXPIRE', KEYS[1], 60)
  return 1
end
return 0";

/// The scripts by number, as [`crate::engine::redis::Redis::eval`] takes
/// them (loaded once per connection, then run by their SHA).
pub(crate) const SCRIPTS: [&[u8]; 2] = [CLAIM_SCRIPT, RELEASE_SCRIPT];
/// [`CLAIM_SCRIPT`]'s number.
pub(crate) const CLAIM: usize = 0;
/// [`RELEASE_SCRIPT`]'s number.
pub(crate) const RELEASE: usize = 1;

/// A message on a node's channel or the control channel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Said {
    /// Node `.0` is alive.
    Ping(String),
    /// Node `.0` is leaving.
    Bye(String),
    /// Close logins of id `.0` up to epoch `.1` (another node took it).
    Kick(Box<[u8]>, u64),
    /// Another node's admin call, for this node's connections.
    Survey(Box<Survey>),
    /// This node's count for a survey this node started: for request
    /// `req` on core `core`.
    Answer {
        /// The core waiting.
        core: u16,
        /// Its request.
        req: u64,
        /// Connections touched there.
        count: u64,
        /// /status text.
        text: Vec<u8>,
    },
}

/// An admin call sent to every other node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Survey {
    /// The asking node (answers go to its channel).
    pub from: String,
    /// The asking core and its request number.
    pub core: u16,
    /// The request on that core.
    pub req: u64,
    /// send, close, settags or status.
    pub op: String,
    /// Tag pairs (all must match), or ids, or everything.
    #[serde(default)]
    pub tags: Option<Vec<(String, String)>>,
    /// Ids the call is for.
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    /// The message (base64), if any.
    #[serde(default)]
    pub msg: Option<String>,
    /// The message is text.
    #[serde(default)]
    pub text: bool,
    /// settags: the changes.
    #[serde(default)]
    pub changes: Vec<(String, String)>,
    /// status: as JSON objects.
    #[serde(default)]
    pub json: bool,
}

impl Survey {
    /// The survey for an admin call, or None for one that stays on this
    /// node (a channel selector names this node's own channels).
    pub(crate) fn of(
        from: &str,
        core: u16,
        req: u64,
        selector: &Selector,
        msg: Option<&Message>,
        op: &FanOp,
    ) -> Option<Survey> {
        let (tags, ids) = match selector {
            Selector::Tags(t) => (
                Some(
                    t.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                None,
            ),
            Selector::Ids(ids) => (None, Some(ids.iter().map(|i| i.to_string()).collect())),
            Selector::All => (None, None),
            Selector::Channel(_) => return None,
        };
        let (op, changes, json) = match op {
            FanOp::Send => ("send", Vec::new(), false),
            FanOp::Close => ("close", Vec::new(), false),
            FanOp::SetTags(c) => ("settags", c.to_vec(), false),
            FanOp::Status { json } => ("status", Vec::new(), *json),
        };
        Some(Survey {
            from: from.to_owned(),
            core,
            req,
            op: op.to_owned(),
            tags,
            ids,
            msg: msg.map(|m| base64::engine::general_purpose::STANDARD.encode(&m.bytes)),
            text: msg.is_some_and(Message::is_text),
            changes,
            json,
        })
    }

    /// What the call asks of this node's cores; None if it does not parse.
    pub(crate) fn call(&self) -> Option<(Arc<Selector>, Option<Message>, FanOp)> {
        let selector = match (&self.tags, &self.ids) {
            (Some(t), None) => Selector::Tags(
                t.iter()
                    .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                    .collect(),
            ),
            (None, Some(ids)) => Selector::Ids(ids.iter().map(|i| i.as_str().into()).collect()),
            (None, None) => Selector::All,
            _ => return None,
        };
        let msg = match &self.msg {
            None => None,
            Some(b) => Some(Message::new(
                self.text,
                &base64::engine::general_purpose::STANDARD.decode(b).ok()?,
            )),
        };
        let op = match self.op.as_str() {
            "send" => FanOp::Send,
            "close" => FanOp::Close,
            "settags" => FanOp::SetTags(Arc::new(self.changes.clone())),
            "status" => FanOp::Status { json: self.json },
            _ => return None,
        };
        Some((Arc::new(selector), msg, op))
    }

    /// Its words on the control channel.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = b"survey|".to_vec();
        // A derived Serialize of strings and numbers cannot fail.
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        out
    }
}

/// /status entries marked with the node they are on: `node=X ` before
/// each text line, `"node":"X"` first in each JSON object.
pub(crate) fn label(text: &[u8], node: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 64);
    if text.first() == Some(&b'{') {
        // Entries are serde_json objects, each opening with `{"id":`; a
        // quote inside a value is escaped, so the pattern is never there.
        let json = serde_json::to_string(node).unwrap_or_default();
        let pat = br#"{"id":"#;
        let mut rest = text;
        while let Some(at) = rest.windows(pat.len()).position(|w| w == pat) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(b"{\"node\":");
            out.extend_from_slice(json.as_bytes());
            out.extend_from_slice(b",\"id\":");
            rest = &rest[at + pat.len()..];
        }
        out.extend_from_slice(rest);
        return out;
    }
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"id=") {
            out.extend_from_slice(format!("node={node} ").as_bytes());
        }
        out.extend_from_slice(line);
    }
    out
}

/// /status text cut to at most `max` bytes at an entry's end (a line, or
/// a JSON object): an answer must stay under Redis' pub/sub output limit,
/// which would otherwise disconnect the asking node's subscriber.
pub(crate) fn cap_status(mut text: Vec<u8>, max: usize) -> Vec<u8> {
    if text.len() <= max {
        return text;
    }
    let head = &text[..max];
    let end = if text.first() == Some(&b'{') {
        // Entries are joined by ",{": keep whole objects.
        head.windows(2).rposition(|w| w == b",{").unwrap_or(0)
    } else {
        head.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
    };
    text.truncate(end);
    text
}

/// An answer's words on the asking node's channel.
pub(crate) fn answer(core: u16, req: u64, count: u64, text: &[u8]) -> Vec<u8> {
    let mut out = format!("answer|{core}|{req}|{count}|").into_bytes();
    out.extend_from_slice(text);
    out
}

/// Reads a message from the control channel or a node's channel.
pub(crate) fn parse(data: &[u8]) -> Option<Said> {
    let (word, rest) = split(data)?;
    let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    match word {
        b"ping" => Some(Said::Ping(String::from_utf8(rest.to_vec()).ok()?)),
        b"bye" => Some(Said::Bye(String::from_utf8(rest.to_vec()).ok()?)),
        b"kick" => {
            let (epoch, id) = split(rest)?;
            Some(Said::Kick(id.into(), num(epoch)?))
        }
        b"survey" => Some(Said::Survey(Box::new(serde_json::from_slice(rest).ok()?))),
        b"answer" => {
            let (core, rest) = split(rest)?;
            let (req, rest) = split(rest)?;
            let (count, text) = split(rest)?;
            Some(Said::Answer {
                core: u16::try_from(num(core)?).ok()?,
                req: num(req)?,
                count: num(count)?,
                text: text.to_vec(),
            })
        }
        _ => None,
    }
}

/// The bytes before the first `|`, and those after it.
fn split(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = b.iter().position(|&c| c == b'|')?;
    Some((&b[..at], &b[at + 1..]))
}

/// Nodes a registry keeps at most (a cluster of 100 nodes is large).
pub(crate) const MAX_NODES: usize = 4096;

/// The other nodes core 0 has heard from, and when.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    nodes: HashMap<String, Instant>,
}

impl Registry {
    /// Node `node` spoke: Some(true) if it is new, None if refused
    /// (past [`MAX_NODES`]: the registry stays bounded whatever is
    /// published on the control channel).
    pub(crate) fn heard(&mut self, node: String, now: Instant) -> Option<bool> {
        if let Some(t) = self.nodes.get_mut(&node) {
            *t = now;
            return Some(false);
        }
        if self.nodes.len() >= MAX_NODES {
            return None;
        }
        self.nodes.insert(node, now);
        Some(true)
    }

    /// Node `node` said goodbye.
    pub(crate) fn forget(&mut self, node: &str) {
        self.nodes.remove(node);
    }

    /// Forgets nodes silent since before `oldest`; true if any went.
    pub(crate) fn expire(&mut self, oldest: Instant) -> bool {
        let n = self.nodes.len();
        self.nodes.retain(|_, t| *t >= oldest);
        n != self.nodes.len()
    }

    /// The nodes, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_garbage_is_refused() {
        assert_eq!(parse(b"ping|a-1"), Some(Said::Ping("a-1".into())));
        assert_eq!(parse(b"bye|a-1"), Some(Said::Bye("a-1".into())));
        assert_eq!(
            parse(b"kick|42|id|with|bars"),
            Some(Said::Kick(b"id|with|bars"[..].into(), 42))
        );
        assert_eq!(
            parse(&answer(3, 9, 17, b"id=x\n")),
            Some(Said::Answer {
                core: 3,
                req: 9,
                count: 17,
                text: b"id=x\n".to_vec()
            })
        );
        for bad in [
            &b""[..],
            b"ping",
            b"kick|x|id",
            b"answer|1|2",
            b"answer|70000|1|1|",
            b"survey|{",
            b"nonsense|1",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_survey_carries_the_call() {
        let sel = Selector::Tags(vec![("room".into(), "r1".into())]);
        let msg = Message::new(false, &[0, 255, 7]);
        let s = Survey::of("a", 1, 5, &sel, Some(&msg), &FanOp::Send).unwrap();
        let Some(Said::Survey(back)) = parse(&s.encode()) else {
            panic!("a survey");
        };
        assert_eq!(*back, s);
        let (sel2, msg2, op) = back.call().unwrap();
        assert_eq!(*sel2, sel);
        assert_eq!(&*msg2.unwrap().bytes, &[0, 255, 7]);
        assert!(matches!(op, FanOp::Send));
        let ids = Selector::Ids(vec!["x".into(), "y".into()]);
        let s = Survey::of("a", 0, 1, &ids, None, &FanOp::Close).unwrap();
        assert_eq!(*s.call().unwrap().0, ids);
    }

    #[test]
    fn status_entries_name_their_node() {
        assert_eq!(
            label(b"id=x k=v\nid=y\n", "a-1"),
            b"node=a-1 id=x k=v\nnode=a-1 id=y\n".to_vec()
        );
        assert_eq!(
            label(
                br#"{"id":"x","tags":{"k":"{\"id\":"}},{"id":"y","tags":{}}"#,
                "a"
            ),
            br#"{"node":"a","id":"x","tags":{"k":"{\"id\":"}},{"node":"a","id":"y","tags":{}}"#
                .to_vec()
        );
    }

    #[test]
    fn status_answers_are_cut_at_an_entry() {
        assert_eq!(cap_status(b"id=a\nid=bb\n".to_vec(), 8), b"id=a\n");
        assert_eq!(cap_status(b"id=a\n".to_vec(), 64), b"id=a\n");
        assert_eq!(
            cap_status(br#"{"id":"a"},{"id":"b"}"#.to_vec(), 15),
            br#"{"id":"a"}"#
        );
    }

    #[test]
    fn silent_nodes_expire() {
        let mut r = Registry::default();
        let t0 = Instant::now();
        assert_eq!(r.heard("b".into(), t0), Some(true));
        assert_eq!(r.heard("b".into(), t0), Some(false));
        r.heard("c".into(), t0 + std::time::Duration::from_secs(5));
        assert!(r.expire(t0 + std::time::Duration::from_secs(1)));
        assert_eq!(r.names(), ["c"]);
        r.forget("c");
        assert!(r.names().is_empty());
    }
}

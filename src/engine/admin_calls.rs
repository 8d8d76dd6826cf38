//! [`AdminCalls`]: the admin requests this core started and is waiting on.
//! A request that needs every core (/send /settags /close /status) becomes
//! one fan-out per core with this core's reply address; each core answers
//! with its count and status text (`Item::Reply`); the last answer makes
//! the HTTP answer ([`Answer`]), which the core hands to the admin stage of
//! the connection that asked. This type never touches a connection.
//!
//! With `cluster:` a call also goes to the other nodes (a survey, sent by
//! the core): it then waits for their answers too, until the survey
//! timeout, and the answer says how many nodes answered of how many are
//! known. A survey from another node is a call of its own here, whose
//! result goes back to that node instead of to a connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::mesh::Outgoing;
use super::message::{AdminCall, FanOp, Fanout, ReplyTo};
use super::metrics::SourceStatus;
use super::shared::Shared;
use super::ConnId;
use crate::config::Config;
use crate::protocol::veltix::Version;

/// An HTTP answer for an admin connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub keep_alive: bool,
    /// Nodes that answered, of those known (this one included), when the
    /// call went to other nodes.
    pub nodes: Option<(usize, usize)>,
}

/// Where a call's result goes when another node asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The asking node.
    pub node: String,
    /// Its core and request.
    pub core: u16,
    /// Its request number.
    pub req: u64,
}

/// A finished call.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Done {
    /// The answer for this node's admin connection.
    Conn(ConnId, Answer),
    /// The count (and status text) for the node that asked.
    Survey(Origin, u64, Vec<u8>),
}

const TEXT: &str = "text/plain; charset=utf-8";

#[derive(Debug)]
struct Pending {
    conn: ConnId,
    waiting: usize,
    /// Other nodes still to answer, how many were asked, and how many
    /// answered.
    remote: usize,
    asked: usize,
    answered: usize,
    /// Give up on the other nodes then.
    deadline: Option<Instant>,
    origin: Option<Origin>,
    /// /status of every node: this node's entries carry its name.
    label: Option<String>,
    count: u64,
    text: Vec<u8>,
    status: bool,
    json: bool,
    keep_alive: bool,
}

/// Admin requests in flight on one core.
#[derive(Debug, Default)]
pub(crate) struct AdminCalls {
    pending: HashMap<u64, Pending>,
    next_req: u64,
}

impl AdminCalls {
    /// Registers `call` and queues its fan-out for every core (this one's
    /// in the local batch); `remote` other nodes are asked too (by the
    /// caller, with the returned request number), until `deadline`.
    pub(crate) fn start(
        &mut self,
        call: AdminCall,
        mesh: &mut Outgoing,
        remote: usize,
        deadline: Option<Instant>,
        origin: Option<Origin>,
    ) -> u64 {
        self.next_req += 1;
        let req = self.next_req;
        let status = matches!(call.op, FanOp::Status { .. });
        self.pending.insert(
            req,
            Pending {
                conn: call.conn,
                remote,
                asked: remote,
                answered: 0,
                deadline,
                origin,
                label: None,
                waiting: mesh.cores(),
                count: 0,
                text: Vec::new(),
                status,
                json: matches!(call.op, FanOp::Status { json: true }),
                keep_alive: call.keep_alive,
            },
        );
        let f = Fanout {
            selector: call.selector,
            msg: call.msg,
            force_binary: false,
            exclude: None,
            op: call.op,
            reply: Some(ReplyTo {
                core: mesh.me() as u16,
                req,
            }),
        };
        for core in 0..mesh.cores() {
            mesh.fanout(core, f.clone());
        }
        req
    }

    /// Adds one answer's count and text to request `req`.
    fn add(&mut self, req: u64, count: u64, text: &[u8]) -> Option<&mut Pending> {
        let p = self.pending.get_mut(&req)?;
        p.count += count;
        if p.json && !text.is_empty() && !p.text.is_empty() {
            p.text.push(b',');
        }
        p.text.extend_from_slice(text);
        Some(p)
    }

    /// Request `req` will hear from no other node (the survey could not go
    /// out): it answers with this node's count once its cores have, and
    /// says how many nodes it left out.
    pub(crate) fn give_up_nodes(&mut self, req: u64) {
        if let Some(p) = self.pending.get_mut(&req) {
            p.remote = 0;
        }
    }

    /// Marks request `req`'s entries from this node's cores with `node`.
    pub(crate) fn label(&mut self, req: u64, node: &str) {
        if let Some(p) = self.pending.get_mut(&req) {
            p.label = Some(node.to_owned());
        }
    }

    /// One core's answer to request `req`. The last answer finishes it
    /// (`tail` appends what /status lists after the connections: see
    /// [`status_tail`]).
    pub(crate) fn on_reply(
        &mut self,
        req: u64,
        count: u64,
        text: &[u8],
        tail: impl FnOnce(&mut Vec<u8>, bool),
    ) -> Option<Done> {
        let labelled = match self.pending.get(&req).and_then(|p| p.label.as_deref()) {
            Some(node) if !text.is_empty() => Some(super::cluster::label(text, node)),
            _ => None,
        };
        let p = self.add(req, count, labelled.as_deref().unwrap_or(text))?;
        p.waiting = p.waiting.saturating_sub(1);
        self.finish_if_answered(req, tail)
    }

    /// Another node's answer to request `req`.
    pub(crate) fn on_remote(
        &mut self,
        req: u64,
        count: u64,
        text: &[u8],
        tail: impl FnOnce(&mut Vec<u8>, bool),
    ) -> Option<Done> {
        let p = self.pending.get(&req)?;
        if p.remote == 0 {
            return None; // late: the call gave up on it already
        }
        let p = self.add(req, count, text)?;
        p.remote -= 1;
        p.answered += 1;
        self.finish_if_answered(req, tail)
    }

    /// Finishes request `req` once every core and every node answered.
    fn finish_if_answered(
        &mut self,
        req: u64,
        tail: impl FnOnce(&mut Vec<u8>, bool),
    ) -> Option<Done> {
        let p = self.pending.get(&req)?;
        if p.waiting > 0 || p.remote > 0 {
            return None;
        }
        self.finish(req, tail)
    }

    /// Calls whose other nodes did not all answer by their deadline,
    /// finished with what came.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        mut tail: impl FnMut(&mut Vec<u8>, bool),
    ) -> Vec<Done> {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.waiting == 0 && p.remote > 0 && p.deadline.is_some_and(|d| d <= now))
            .map(|(r, _)| *r)
            .collect();
        late.into_iter()
            .filter_map(|r| self.finish(r, &mut tail))
            .collect()
    }

    /// Any call waiting on other nodes?
    pub(crate) fn awaits_nodes(&self) -> bool {
        self.pending.values().any(|p| p.remote > 0)
    }

    fn finish(&mut self, req: u64, tail: impl FnOnce(&mut Vec<u8>, bool)) -> Option<Done> {
        let mut p = self.pending.remove(&req)?;
        if let Some(o) = p.origin.take() {
            return Some(Done::Survey(o, p.count, p.text));
        }
        let nodes = (p.asked > 0 || p.deadline.is_some()).then_some((1 + p.answered, 1 + p.asked));
        let body = if p.status {
            tail(&mut p.text, p.json);
            if p.json {
                let mut body = Vec::with_capacity(p.text.len() + 2);
                body.push(b'[');
                body.extend_from_slice(&p.text);
                body.push(b']');
                body
            } else {
                p.text
            }
        } else {
            p.count.to_string().into_bytes()
        };
        let content_type = if p.status && p.json {
            "application/json"
        } else {
            TEXT
        };
        Some(Done::Conn(
            p.conn,
            Answer {
                status: "200 OK",
                content_type,
                body,
                keep_alive: p.keep_alive,
                nodes,
            },
        ))
    }
}

/// What /status lists after the connections: each upstream source and
/// each Veltix listener, with their counters.
pub(crate) fn status_tail(
    out: &mut Vec<u8>,
    json: bool,
    shared: &Shared,
    cfg: &Config,
    sources: &[Arc<SourceStatus>],
) {
    for (c, st) in cfg.sources.iter().zip(sources.iter()) {
        if !c.retired {
            source_line(out, &c.url, st, json);
        }
    }
    for (l, n) in shared.cfg.veltix.iter().zip(shared.veltix_clients.iter()) {
        let version = match l.version {
            Version::V1 => 1,
            Version::V3 => 3,
        };
        let on_message = format!("{:?}", l.on_message).to_lowercase();
        let clients = n.load(std::sync::atomic::Ordering::Relaxed);
        if json {
            let v = serde_json::json!({"veltix": l.listen.to_string(), "version": version, "on_message": on_message, "clients": clients});
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(v.to_string().as_bytes());
        } else {
            out.extend_from_slice(
                format!(
                    "veltix={} version={version} on_message={on_message} clients={clients}\n",
                    l.listen
                )
                .as_bytes(),
            );
        }
    }
}

/// One /status entry for a source.
fn source_line(out: &mut Vec<u8>, url: &str, st: &SourceStatus, json: bool) {
    let state = st.state_name();
    let (i, o, d, r) = (
        st.messages_in.get(),
        st.messages_out.get(),
        st.dropped.get(),
        st.reconnects.get(),
    );
    if json {
        let v = serde_json::json!({"source": url, "state": state, "messages_in": i, "messages_out": o, "dropped": d, "reconnects": r});
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(v.to_string().as_bytes());
    } else {
        out.extend_from_slice(
            format!("source={url} state={state} messages_in={i} messages_out={o} dropped={d} reconnects={r}\n").as_bytes(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::route::test::TestCx;
    use crate::engine::tags::Selector;
    use std::sync::Arc;

    fn call(op: FanOp) -> AdminCall {
        AdminCall {
            conn: ConnId {
                core: 0,
                slot: 3,
                gen: 9,
            },
            selector: Arc::new(Selector::All),
            msg: None,
            op,
            keep_alive: true,
            all_nodes: true,
        }
    }

    #[test]
    fn counts_are_summed_and_the_last_reply_answers() {
        let mut t = TestCx::new("workers: 2\npin: false\n", 2);
        let mut calls = AdminCalls::default();
        calls.start(call(FanOp::Send), &mut t.mesh, 0, None, None);
        assert_eq!(t.local().fanouts.len(), 1, "one fan-out for this core");
        assert_eq!(t.sent_to(1)[0].fanouts.len(), 1, "one for the other");
        let req = calls.next_req;
        assert_eq!(calls.on_reply(req, 2, b"", |_, _| {}), None);
        let Some(Done::Conn(conn, a)) = calls.on_reply(req, 3, b"", |_, _| {}) else {
            panic!("an answer");
        };
        assert_eq!(conn.slot, 3);
        assert_eq!(a.nodes, None, "one node");
        assert_eq!((a.body.as_slice(), a.keep_alive), (&b"5"[..], true));
        assert_eq!(calls.on_reply(req, 1, b"", |_, _| {}), None, "forgotten");
    }

    #[test]
    fn json_status_joins_the_cores_entries() {
        let mut t = TestCx::new("workers: 2\npin: false\n", 2);
        let mut calls = AdminCalls::default();
        calls.start(
            call(FanOp::Status { json: true }),
            &mut t.mesh,
            0,
            None,
            None,
        );
        let req = calls.next_req;
        assert_eq!(calls.on_reply(req, 1, br#"{"id":"a"}"#, |_, _| {}), None);
        let Some(Done::Conn(_, a)) = calls.on_reply(req, 1, br#"{"id":"b"}"#, |_, _| {}) else {
            panic!("an answer");
        };
        assert_eq!(a.content_type, "application/json");
        assert_eq!(a.body, br#"[{"id":"a"},{"id":"b"}]"#.to_vec());
    }

    #[test]
    fn other_nodes_add_their_counts_until_the_deadline() {
        let mut t = TestCx::new("workers: 1\npin: false\n", 1);
        let mut calls = AdminCalls::default();
        let now = Instant::now();
        let req = calls.start(call(FanOp::Send), &mut t.mesh, 2, Some(now), None);
        assert_eq!(
            calls.on_reply(req, 1, b"", |_, _| {}),
            None,
            "nodes pending"
        );
        assert_eq!(calls.on_remote(req, 4, b"", |_, _| {}), None);
        assert!(calls.awaits_nodes());
        let done = calls.expire(now, |_, _| {});
        let [Done::Conn(_, a)] = &done[..] else {
            panic!("one answer: {done:?}");
        };
        assert_eq!((a.body.as_slice(), a.nodes), (&b"5"[..], Some((2, 3))));
        assert_eq!(calls.on_remote(req, 9, b"", |_, _| {}), None, "late");
        // A survey from another node goes back to it.
        let o = Origin {
            node: "b".into(),
            core: 1,
            req: 7,
        };
        let req = calls.start(call(FanOp::Send), &mut t.mesh, 0, None, Some(o.clone()));
        assert_eq!(
            calls.on_reply(req, 3, b"", |_, _| {}),
            Some(Done::Survey(o, 3, Vec::new()))
        );
    }
}

//! TagIndex: one core's index of its connections' tags, and the selector
//! rules (wsgateway's): an id list wins over tags; otherwise every tag pair
//! must match (AND); an empty selector matches nothing.
//!
//! Invariant: (key, value) -> slots holds exactly the live WebSocket
//! connections that carry that tag now. A tag change removes the old entry
//! (and an emptied set), so no stale entry ever matches (wsgateway's
//! stale-tag bug is not copied).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// One tag: (key, value). Shared strings: a core's index holds one copy of
/// each key and value, and every connection carrying the tag points at it
/// (a room of N members keeps its name once, not N times).
pub type Tag = (Arc<str>, Arc<str>);

/// A connection's tags, sorted by key: none (no allocation, and 8 bytes
/// of the connection's slab entry, not a vector's 24) or a list shared by
/// every connection of its core with the same tags (see
/// [`TagIndex::insert`]). A change is a new list: the old one is given
/// back to the index ([`TagIndex::remove`]) and the new one indexed.
#[derive(Debug, Default)]
pub struct TagList(Option<Arc<Vec<Tag>>>);

impl From<Vec<Tag>> for TagList {
    fn from(mut v: Vec<Tag>) -> Self {
        // A list is built once and kept as long as its connections: no
        // spare room (a vector of two pushed tags has room for four).
        v.shrink_to_fit();
        TagList((!v.is_empty()).then(|| Arc::new(v)))
    }
}

impl std::ops::Deref for TagList {
    type Target = [Tag];
    #[inline]
    fn deref(&self) -> &[Tag] {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

/// Which connections a fan-out, tag change or close targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// These client ids (resolved through the directory).
    Ids(Vec<Box<str>>),
    /// Connections carrying all of these tags.
    Tags(Vec<Tag>),
    /// Every WebSocket connection (for /status; not reachable from a query).
    All,
    /// The members of a channel on each core, whatever their wire (not
    /// reachable from a query).
    Channel(super::channels::Channel),
}

impl Selector {
    /// Builds a selector from query pairs: `id=a,b` wins; else all pairs
    /// AND-ed; no pairs (or an empty id list) selects nothing (None).
    pub fn from_pairs(pairs: &[(String, String)]) -> Option<Selector> {
        if let Some((_, ids)) = pairs.iter().find(|(k, _)| k == "id") {
            let ids: Vec<Box<str>> = ids
                .split(',')
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect();
            return (!ids.is_empty()).then_some(Selector::Ids(ids));
        }
        let mut tags: Vec<Tag> = pairs
            .iter()
            .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
            .collect();
        tags.sort();
        tags.dedup();
        (!tags.is_empty()).then_some(Selector::Tags(tags))
    }
}

/// The index.
#[derive(Debug, Default)]
pub struct TagIndex {
    by_tag: HashMap<Arc<str>, HashMap<Arc<str>, Members>>,
    /// The distinct tag lists its connections carry, each held by the
    /// index and by every connection with exactly those tags (a room of N
    /// members keeps one list, not N).
    lists: HashSet<Arc<Vec<Tag>>>,
}

/// The connections carrying one (key, value), and the selector of exactly
/// that tag, made once and shared by every member that broadcasts to it
/// (not one allocation per connection; equal fan-outs compare by pointer).
#[derive(Debug, Default)]
struct Members {
    slots: Slots,
    selector: Option<Arc<Selector>>,
}

/// A tag value's members. Most values (a user's id, a session) have one,
/// which needs no table of its own: 16 bytes in the entry instead of a
/// 48-byte set and its 64-byte table.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // 8 bytes, not a set's 48, in every entry
enum Slots {
    #[default]
    Empty,
    One(usize),
    Many(Box<HashSet<usize>>),
}

impl Slots {
    fn insert(&mut self, slot: usize) {
        match self {
            Slots::Empty => *self = Slots::One(slot),
            Slots::One(s) if *s == slot => {}
            Slots::One(s) => *self = Slots::Many(Box::new(HashSet::from([*s, slot]))),
            Slots::Many(set) => {
                set.insert(slot);
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        match self {
            Slots::One(s) if *s == slot => *self = Slots::Empty,
            Slots::Many(set) => {
                set.remove(&slot);
                if set.len() <= 1 {
                    *self = set.iter().next().map_or(Slots::Empty, |&s| Slots::One(s));
                }
            }
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Slots::Empty)
    }

    fn len(&self) -> usize {
        match self {
            Slots::Empty => 0,
            Slots::One(_) => 1,
            Slots::Many(set) => set.len(),
        }
    }

    fn contains(&self, slot: usize) -> bool {
        match self {
            Slots::Empty => false,
            Slots::One(s) => *s == slot,
            Slots::Many(set) => set.contains(&slot),
        }
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let (one, many) = match self {
            Slots::Empty => (None, None),
            Slots::One(s) => (Some(*s), None),
            Slots::Many(set) => (None, Some(set.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl TagIndex {
    /// Adds `slot` under each of its tags, and makes `list` the one this
    /// core's connections with the same tags share, whose strings are the
    /// index's own (so the caller's fresh copies are freed).
    pub fn insert(&mut self, slot: usize, list: &mut TagList) {
        let Some(arc) = list.0.as_mut() else {
            return;
        };
        if arc.is_empty() {
            list.0 = None;
            return;
        }
        if let Some(shared) = self.lists.get(&**arc) {
            // Its strings are the index's already.
            *arc = shared.clone();
            for (k, v) in arc.iter() {
                self.add(slot, k, v);
            }
            return;
        }
        for tag in Arc::make_mut(arc).iter_mut() {
            *tag = self.add(slot, &tag.0, &tag.1);
        }
        self.lists.insert(arc.clone());
    }

    /// Removes `slot` from each of its tags, dropping emptied sets, and
    /// lets go of the shared list when `slot` was its last holder. Takes
    /// the list: a holder that kept it would keep it out of that count.
    pub fn remove(&mut self, slot: usize, list: TagList) {
        self.remove_tags(slot, &list);
        if let Some(arc) = &list.0 {
            // Held by the index and by this connection alone (the count
            // first: most closes leave a list others still share, and need
            // not hash it).
            if Arc::strong_count(arc) == 2
                && self.lists.get(&**arc).is_some_and(|s| Arc::ptr_eq(s, arc))
            {
                self.lists.remove(&**arc);
            }
        }
    }

    /// Removes `slot` from each tag, dropping emptied sets.
    fn remove_tags(&mut self, slot: usize, tags: &[Tag]) {
        for (k, v) in tags {
            if let Some(values) = self.by_tag.get_mut(k) {
                if let Some(m) = values.get_mut(v) {
                    m.slots.remove(slot);
                    if m.slots.is_empty() {
                        values.remove(v);
                    }
                }
                if values.is_empty() {
                    self.by_tag.remove(k);
                }
            }
        }
    }

    /// Adds `slot` under (`k`, `v`); the index's own copies of the two
    /// strings (these, if it had none).
    fn add(&mut self, slot: usize, k: &Arc<str>, v: &Arc<str>) -> Tag {
        let e = self.by_tag.entry(k.clone());
        let key = e.key().clone();
        let e = e.or_default().entry(v.clone());
        let value = e.key().clone();
        e.or_default().slots.insert(slot);
        (key, value)
    }

    /// Slots carrying every tag in `want` (non-empty), smallest set first.
    pub fn select(&self, want: &[Tag], out: &mut Vec<usize>) {
        let mut sets = Vec::with_capacity(want.len());
        for (k, v) in want {
            match self.by_tag.get(k).and_then(|vals| vals.get(v)) {
                Some(m) => sets.push(&m.slots),
                None => return,
            }
        }
        sets.sort_by_key(|s| s.len());
        let Some((first, rest)) = sets.split_first() else {
            return;
        };
        out.extend(
            first
                .iter()
                .filter(|&slot| rest.iter().all(|s| s.contains(slot))),
        );
    }

    /// The selector of connections tagged `k` = `v`, shared while any
    /// connection carries that tag (a new one when none does).
    pub fn selector_of(&mut self, k: &str, v: &str) -> Arc<Selector> {
        // The index's own strings, when it has them.
        let key = self.by_tag.get_key_value(k).map(|(key, _)| key.clone());
        let Some(values) = self.by_tag.get_mut(k) else {
            return Arc::new(Selector::Tags(vec![(k.into(), v.into())]));
        };
        let key = key.unwrap_or_else(|| k.into());
        let value = values.get_key_value(v).map(|(value, _)| value.clone());
        match (values.get_mut(v), value) {
            (Some(m), Some(value)) => m
                .selector
                .get_or_insert_with(|| Arc::new(Selector::Tags(vec![(key, value)])))
                .clone(),
            _ => Arc::new(Selector::Tags(vec![(key, v.into())])),
        }
    }

    /// Distinct (key, value) entries (for memory checks and tests).
    pub fn entries(&self) -> usize {
        self.by_tag.values().map(HashMap::len).sum()
    }

    /// Distinct tag lists held (for memory checks and tests).
    pub fn lists(&self) -> usize {
        self.lists.len()
    }
}

/// Applies a `settags` body to a sorted tag list: an empty value deletes.
/// Returns (removed, added) pairs for the index.
pub fn apply_changes(tags: &mut Vec<Tag>, changes: &[(String, String)]) -> (Vec<Tag>, Vec<Tag>) {
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for (k, v) in changes {
        if let Some(i) = tags.iter().position(|(tk, _)| **tk == **k) {
            if *tags[i].1 == **v {
                continue;
            }
            removed.push(tags.remove(i));
        }
        if !v.is_empty() {
            let pair: Tag = (k.as_str().into(), v.as_str().into());
            added.push(pair.clone());
            tags.push(pair);
        }
    }
    tags.sort();
    (removed, added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_of_one_value_share_one_selector_while_any_is_there() {
        let mut ix = TagIndex::default();
        let (mut m1, mut m2) = (l(&[("room", "a")]), l(&[("room", "a")]));
        ix.insert(1, &mut m1);
        ix.insert(2, &mut m2);
        let (s1, s2) = (ix.selector_of("room", "a"), ix.selector_of("room", "a"));
        assert!(Arc::ptr_eq(&s1, &s2));
        assert_eq!(*s1, Selector::Tags(t(&[("room", "a")])));
        assert!(!Arc::ptr_eq(&s1, &ix.selector_of("room", "b")));
        ix.remove(1, m1);
        ix.remove(2, m2);
        assert_eq!(ix.entries(), 0, "the last member takes the entry along");
        assert_eq!(ix.lists(), 0, "and the list");
        let mut m3 = l(&[("room", "a")]);
        ix.insert(3, &mut m3);
        let s3 = ix.selector_of("room", "a");
        assert!(!Arc::ptr_eq(&s1, &s3) && *s1 == *s3);
        let mut out = Vec::new();
        ix.select(&t(&[("room", "a")]), &mut out);
        assert_eq!(out, [3]);
    }

    #[test]
    fn members_with_the_same_tags_share_one_list_and_the_index_strings() {
        let mut ix = TagIndex::default();
        let (mut a, mut b) = (l(&[("room", "x")]), l(&[("room", "x")]));
        ix.insert(1, &mut a);
        ix.insert(2, &mut b);
        let (la, lb) = (a.0.as_ref().unwrap(), b.0.as_ref().unwrap());
        assert!(Arc::ptr_eq(la, lb), "one list");
        // The index's own and the two members'.
        assert_eq!(Arc::strong_count(la), 3);
        let s = ix.selector_of("room", "x");
        let Selector::Tags(st) = &*s else {
            panic!("a tag selector: {s:?}");
        };
        assert!(Arc::ptr_eq(&st[0].1, &a[0].1), "one copy of the value");
        // A change gives the changed member a list of its own; the other
        // keeps the shared one, and a list nobody holds is let go.
        let b = change(&mut ix, 2, b, &[("room", "y")]);
        assert!(!Arc::ptr_eq(a.0.as_ref().unwrap(), b.0.as_ref().unwrap()));
        assert_eq!(&*b, &t(&[("room", "y")])[..]);
        assert!(
            Arc::ptr_eq(&a[0].0, &b[0].0),
            "one copy of the key across lists"
        );
        assert_eq!(ix.lists(), 2);
        let mut out = Vec::new();
        ix.select(&t(&[("room", "x")]), &mut out);
        assert_eq!(out, [1]);
        ix.remove(1, a);
        ix.remove(2, b);
        assert_eq!((ix.entries(), ix.lists()), (0, 0));
    }

    /// What /settags does: out under the old list, in under the new one.
    fn change(ix: &mut TagIndex, slot: usize, old: TagList, changes: &[(&str, &str)]) -> TagList {
        let mut v = old.to_vec();
        ix.remove(slot, old);
        let changes: Vec<(String, String)> = changes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        apply_changes(&mut v, &changes);
        let mut new = TagList::from(v);
        ix.insert(slot, &mut new);
        new
    }

    #[test]
    fn one_member_needs_no_table_and_a_set_shrinks_back_to_one() {
        let mut s = Slots::default();
        s.insert(7);
        s.insert(7);
        assert!(matches!(s, Slots::One(7)));
        s.insert(9);
        assert_eq!(
            (s.len(), s.contains(7), s.contains(9), s.contains(8)),
            (2, true, true, false)
        );
        let mut all: Vec<usize> = s.iter().collect();
        all.sort();
        assert_eq!(all, [7, 9]);
        s.remove(7);
        assert!(matches!(s, Slots::One(9)));
        s.remove(8);
        s.remove(9);
        assert!(s.is_empty() && s.iter().next().is_none());
    }

    fn t(pairs: &[(&str, &str)]) -> Vec<Tag> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn l(pairs: &[(&str, &str)]) -> TagList {
        t(pairs).into()
    }

    #[test]
    fn selector_rules() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(Selector::from_pairs(&p(&[])), None, "empty selects nothing");
        assert_eq!(
            Selector::from_pairs(&p(&[("room", "1"), ("id", "a,b")])),
            Some(Selector::Ids(vec!["a".into(), "b".into()])),
            "id wins"
        );
        assert_eq!(Selector::from_pairs(&p(&[("id", "")])), None);
        assert_eq!(
            Selector::from_pairs(&p(&[("b", "2"), ("a", "1")])),
            Some(Selector::Tags(t(&[("a", "1"), ("b", "2")])))
        );
    }

    #[test]
    fn and_of_tags_and_no_stale_entries() {
        let mut ix = TagIndex::default();
        let mut a = l(&[("role", "admin"), ("room", "1")]);
        let mut b = l(&[("room", "1")]);
        ix.insert(1, &mut a);
        ix.insert(2, &mut b);
        let mut out = vec![];
        ix.select(&t(&[("room", "1"), ("role", "admin")]), &mut out);
        assert_eq!(out, vec![1]);
        // Change room 1 -> 2 on slot 1: it leaves room 1 entirely.
        let mut v = a.to_vec();
        let (removed, added) = apply_changes(
            &mut v,
            &[("room".into(), "2".into()), ("role".into(), "".into())],
        );
        assert_eq!(removed, t(&[("room", "1"), ("role", "admin")]));
        assert_eq!(added, t(&[("room", "2")]));
        let a = change(&mut ix, 1, a, &[("room", "2"), ("role", "")]);
        assert_eq!(&*a, &t(&[("room", "2")])[..]);
        out.clear();
        ix.select(&t(&[("room", "1")]), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        ix.select(&t(&[("role", "admin")]), &mut out);
        assert!(out.is_empty(), "deleted tag matches nothing");
        // Deleting every tag leaves no list.
        let a = change(&mut ix, 1, a, &[("room", "")]);
        assert!(a.0.is_none());
        ix.remove(1, a);
        ix.remove(2, b);
        assert_eq!((ix.entries(), ix.lists()), (0, 0));
    }
}

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
/// of the connection's slab entry, not a vector's 24) or a boxed list.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // a thin pointer is the point
pub struct TagList(Option<Box<Vec<Tag>>>);

impl TagList {
    /// The list, for changes (made on the first).
    pub fn vec_mut(&mut self) -> &mut Vec<Tag> {
        self.0.get_or_insert_with(Default::default)
    }

    /// The tags, for [`TagIndex::insert`] (empty when there are none).
    pub fn slice_mut(&mut self) -> &mut [Tag] {
        self.0.as_deref_mut().map_or(&mut [], |v| v.as_mut_slice())
    }
}

impl From<Vec<Tag>> for TagList {
    fn from(v: Vec<Tag>) -> Self {
        TagList((!v.is_empty()).then(|| Box::new(v)))
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
}

/// The connections carrying one (key, value), and the selector of exactly
/// that tag, made once and shared by every member that broadcasts to it
/// (not one allocation per connection; equal fan-outs compare by pointer).
#[derive(Debug, Default)]
struct Members {
    slots: HashSet<usize>,
    selector: Option<Arc<Selector>>,
}

impl TagIndex {
    /// Adds `slot` under each tag, and points `tags` at the index's own
    /// copies of the strings (so the caller's fresh ones are freed).
    pub fn insert(&mut self, slot: usize, tags: &mut [Tag]) {
        for (k, v) in tags {
            if let Some((known, _)) = self.by_tag.get_key_value(&**k) {
                *k = known.clone();
            }
            let values = self.by_tag.entry(k.clone()).or_default();
            if let Some((known, _)) = values.get_key_value(&**v) {
                *v = known.clone();
            }
            values.entry(v.clone()).or_default().slots.insert(slot);
        }
    }

    /// Removes `slot` from each tag, dropping emptied sets.
    pub fn remove(&mut self, slot: usize, tags: &[Tag]) {
        for (k, v) in tags {
            if let Some(values) = self.by_tag.get_mut(k) {
                if let Some(m) = values.get_mut(v) {
                    m.slots.remove(&slot);
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
                .copied()
                .filter(|slot| rest.iter().all(|s| s.contains(slot))),
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
        ix.insert(1, &mut t(&[("room", "a")]));
        ix.insert(2, &mut t(&[("room", "a")]));
        let (s1, s2) = (ix.selector_of("room", "a"), ix.selector_of("room", "a"));
        assert!(std::sync::Arc::ptr_eq(&s1, &s2));
        assert_eq!(*s1, Selector::Tags(t(&[("room", "a")])));
        assert!(!std::sync::Arc::ptr_eq(&s1, &ix.selector_of("room", "b")));
        ix.remove(1, &t(&[("room", "a")]));
        ix.remove(2, &t(&[("room", "a")]));
        assert_eq!(ix.entries(), 0, "the last member takes the entry along");
        ix.insert(3, &mut t(&[("room", "a")]));
        let s3 = ix.selector_of("room", "a");
        assert!(!std::sync::Arc::ptr_eq(&s1, &s3) && *s1 == *s3);
        let mut out = Vec::new();
        ix.select(&t(&[("room", "a")]), &mut out);
        assert_eq!(out, [3]);
    }

    #[test]
    fn members_of_one_tag_share_its_strings_with_the_index() {
        let mut ix = TagIndex::default();
        let (mut a, mut b) = (t(&[("room", "x")]), t(&[("room", "x")]));
        ix.insert(1, &mut a);
        ix.insert(2, &mut b);
        assert!(Arc::ptr_eq(&a[0].0, &b[0].0) && Arc::ptr_eq(&a[0].1, &b[0].1));
        // The index's copy and the two members' references, nothing else.
        assert_eq!(Arc::strong_count(&a[0].1), 3);
        let s = ix.selector_of("room", "x");
        let Selector::Tags(st) = &*s else {
            panic!("a tag selector: {s:?}");
        };
        assert!(Arc::ptr_eq(&st[0].1, &a[0].1));
    }

    fn t(pairs: &[(&str, &str)]) -> Vec<Tag> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
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
        let mut a = t(&[("role", "admin"), ("room", "1")]);
        ix.insert(1, &mut a);
        ix.insert(2, &mut t(&[("room", "1")]));
        let mut out = vec![];
        ix.select(&t(&[("room", "1"), ("role", "admin")]), &mut out);
        assert_eq!(out, vec![1]);
        // Change room 1 -> 2 on slot 1: it leaves room 1 entirely.
        let (removed, mut added) = apply_changes(
            &mut a,
            &[("room".into(), "2".into()), ("role".into(), "".into())],
        );
        ix.remove(1, &removed);
        ix.insert(1, &mut added);
        assert_eq!(a, t(&[("room", "2")]));
        out.clear();
        ix.select(&t(&[("room", "1")]), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        ix.select(&t(&[("role", "admin")]), &mut out);
        assert!(out.is_empty(), "deleted tag matches nothing");
        ix.remove(1, &a);
        ix.remove(2, &t(&[("room", "1")]));
        assert_eq!(ix.entries(), 0);
    }
}

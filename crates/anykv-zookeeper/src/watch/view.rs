//! The consumer's view of a watched range, and the rule that turns what a
//! batch read into events in revision order. Pure (no I/O), so the ordering
//! argument is tested here without a server.
//!
//! The view keeps a **floor**: every change not emitted yet has a zxid above
//! it, and no event emitted so far has a revision above `floor + 1`. A batch
//! hands over what it read together with a **watermark**: every change with
//! a zxid at or below the watermark is reflected in what it read (or was in
//! the view already). Then:
//!
//! * a key the view has and the batch found gone is a delete, reported at
//!   `floor + 1`: ZooKeeper 3.8 does not say a delete's zxid, but it is
//!   above the floor, so `floor + 1` is at or below it and at or above every
//!   earlier event;
//! * a key whose `mzxid` changed is a put at its `mzxid`, emitted if that is
//!   at or below the watermark, in `mzxid` order; above it, a change the
//!   batch has not seen could come before it, so the key is held back and
//!   read again by the next batch;
//! * the floor becomes the watermark.
//!
//! Later events are all above the new floor, so revisions never go down.

use std::collections::BTreeMap;

use anykv_core::{Event, KvPair};

/// Views up to this many keys keep them in a sorted vector: most watches
/// are on one key, and a B-tree node costs a dozen slots (about 1.2 KB)
/// even for one entry.
const SMALL: usize = 16;

/// path → pair: a sorted vector while small, a B-tree beyond.
enum Keys {
    Small(Vec<(String, KvPair)>),
    Big(BTreeMap<String, KvPair>),
}

impl Default for Keys {
    fn default() -> Keys {
        Keys::Small(Vec::new())
    }
}

impl Keys {
    fn from_map(map: BTreeMap<String, KvPair>) -> Keys {
        if map.len() <= SMALL {
            let mut v = Vec::with_capacity(map.len());
            v.extend(map);
            Keys::Small(v)
        } else {
            Keys::Big(map)
        }
    }

    fn get(&self, path: &str) -> Option<&KvPair> {
        match self {
            Keys::Small(v) => v
                .binary_search_by(|(p, _)| p.as_str().cmp(path))
                .ok()
                .map(|i| &v[i].1),
            Keys::Big(m) => m.get(path),
        }
    }

    fn insert(&mut self, path: String, kv: KvPair) -> Option<KvPair> {
        match self {
            Keys::Small(v) => match v.binary_search_by(|(p, _)| p.as_str().cmp(&path)) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, kv)),
                Err(i) if v.len() < SMALL => {
                    // Exactly the room needed: most views hold one key.
                    v.reserve_exact(1);
                    v.insert(i, (path, kv));
                    None
                }
                Err(_) => {
                    let mut m: BTreeMap<String, KvPair> = std::mem::take(v).into_iter().collect();
                    m.insert(path, kv);
                    *self = Keys::Big(m);
                    None
                }
            },
            Keys::Big(m) => m.insert(path, kv),
        }
    }

    fn remove(&mut self, path: &str) -> Option<KvPair> {
        match self {
            Keys::Small(v) => {
                let i = v.binary_search_by(|(p, _)| p.as_str().cmp(path)).ok()?;
                let (_, kv) = v.remove(i);
                if v.is_empty() {
                    v.shrink_to_fit();
                }
                Some(kv)
            }
            Keys::Big(m) => m.remove(path),
        }
    }

    fn paths(&self) -> Box<dyn Iterator<Item = &String> + '_> {
        match self {
            Keys::Small(v) => Box::new(v.iter().map(|(p, _)| p)),
            Keys::Big(m) => Box::new(m.keys()),
        }
    }

    #[cfg(test)]
    fn revisions(&self) -> BTreeMap<String, u64> {
        let pairs: Box<dyn Iterator<Item = (&String, &KvPair)>> = match self {
            Keys::Small(v) => Box::new(v.iter().map(|(p, kv)| (p, kv))),
            Keys::Big(m) => Box::new(m.iter()),
        };
        pairs.map(|(p, kv)| (p.clone(), kv.mod_revision)).collect()
    }
}

/// What the consumer has been told about the range.
#[derive(Default)]
pub(crate) struct View {
    /// path → pair, as last emitted (or absorbed).
    keys: Keys,
    /// Every change not emitted yet has a larger zxid.
    floor: u64,
}

/// A batch's reads: path → its pair now (`None`: absent or not a key).
pub(crate) type Reads = BTreeMap<String, Option<KvPair>>;

/// The outcome of [`View::apply`].
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Deletes first, then puts in revision order.
    pub(crate) events: Vec<Event>,
    /// Paths whose new value lies above the watermark, with that value's
    /// `mzxid`: read them again.
    pub(crate) held: Vec<(String, u64)>,
}

/// One path's change, as [`View::classify`] finds it.
enum Change {
    None,
    Delete,
    Put(KvPair),
}

impl View {
    /// A view that knows `keys` and nothing changed up to `floor`
    /// (`Start::After(floor)`).
    pub(crate) fn new(keys: BTreeMap<String, KvPair>, floor: u64) -> View {
        View {
            keys: Keys::from_map(keys),
            floor,
        }
    }

    /// The paths the view holds.
    pub(crate) fn paths(&self) -> impl Iterator<Item = &String> {
        self.keys.paths()
    }

    /// The floor (see the module docs).
    #[cfg(test)]
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    fn classify(&self, path: &str, read: Option<KvPair>) -> Change {
        match (self.keys.get(path), read) {
            (Some(_), None) => Change::Delete,
            (None, None) => Change::None,
            (None, Some(kv)) => Change::Put(kv),
            // An older value than the consumer has: a read from a server
            // behind the one the view came from. Not a change.
            (Some(old), Some(kv)) if kv.mod_revision <= old.mod_revision => Change::None,
            (Some(_), Some(kv)) => Change::Put(kv),
        }
    }

    /// Turns a batch's reads, complete up to `watermark`, into events and
    /// updates the view (see the module docs).
    pub(crate) fn apply(&mut self, reads: Reads, watermark: u64) -> Applied {
        self.apply_with(reads, watermark, |_| 0)
    }

    /// [`View::apply`], where `above(path)` is a zxid the delete of `path`
    /// is known to be above (0: nothing known). A delete is then reported
    /// at `above + 1`, kept within `floor + 1 ..= watermark + 1`: at or
    /// below its real zxid, above every earlier event, at or below every
    /// later one; events are sorted by revision, a delete first on a tie.
    pub(crate) fn apply_with(
        &mut self,
        reads: Reads,
        watermark: u64,
        above: impl Fn(&str) -> u64,
    ) -> Applied {
        let watermark = watermark.max(self.floor);
        let mut deleted = Vec::new();
        let mut puts = Vec::new();
        let mut held = Vec::new();
        for (path, read) in reads {
            match self.classify(&path, read) {
                Change::None => {}
                Change::Delete => {
                    let revision = (above(&path) + 1).clamp(self.floor + 1, watermark + 1);
                    deleted.push((revision, path));
                }
                Change::Put(kv) if kv.mod_revision <= watermark => puts.push((path, kv)),
                Change::Put(kv) => held.push((path, kv.mod_revision)),
            }
        }
        deleted.sort();
        puts.sort_by_key(|(_, kv)| kv.mod_revision);
        let mut events = Vec::with_capacity(deleted.len() + puts.len());
        let mut puts = puts.into_iter().peekable();
        for (revision, path) in deleted {
            while let Some((_, kv)) = puts.peek() {
                if kv.mod_revision >= revision {
                    break;
                }
                if let Some((path, kv)) = puts.next() {
                    let prev = self.keys.insert(path, kv.clone());
                    events.push(Event::Put { kv, prev });
                }
            }
            if let Some(old) = self.keys.remove(&path) {
                events.push(Event::Delete {
                    key: old.key,
                    revision,
                });
            }
        }
        for (path, kv) in puts {
            let prev = self.keys.insert(path, kv.clone());
            events.push(Event::Put { kv, prev });
        }
        self.floor = watermark;
        Applied { events, held }
    }

    /// Like [`View::apply`] without events: the starting view of
    /// `Start::Now`. Returns the held paths, as [`Applied::held`].
    pub(crate) fn absorb(&mut self, reads: Reads, watermark: u64) -> Vec<(String, u64)> {
        let watermark = watermark.max(self.floor);
        let mut held = Vec::new();
        for (path, read) in reads {
            match self.classify(&path, read) {
                Change::None => {}
                Change::Delete => {
                    self.keys.remove(&path);
                }
                Change::Put(kv) if kv.mod_revision <= watermark => {
                    self.keys.insert(path, kv);
                }
                Change::Put(kv) => held.push((path, kv.mod_revision)),
            }
        }
        self.floor = watermark;
        held
    }
}

#[cfg(test)]
mod tests {
    use anykv_core::{Key, Version};

    use super::*;

    fn kv(key: &str, rev: u64) -> KvPair {
        KvPair {
            key: Key::new(key).unwrap_or_else(|e| panic!("{key}: {e}")),
            value: format!("{key}@{rev}").into(),
            version: Version::new(rev),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn reads(items: &[(&str, Option<u64>)]) -> Reads {
        items
            .iter()
            .map(|(k, rev)| (format!("/{k}"), rev.map(|r| kv(k, r))))
            .collect()
    }

    fn shown(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Put { kv, .. } => format!("put {}@{}", kv.key, kv.mod_revision),
                Event::Delete { key, revision } => format!("del {key}@{revision}"),
            })
            .collect()
    }

    /// Revisions never go down across any sequence of batches.
    fn assert_ordered(all: &[Event]) {
        for w in all.windows(2) {
            assert!(
                w[0].revision() <= w[1].revision(),
                "out of order: {:?}",
                shown(all)
            );
        }
    }

    #[test]
    fn complete_batch_emits_deletes_then_puts_in_revision_order() {
        let mut v = View::new(BTreeMap::from([("/a".into(), kv("a", 5))]), 10);
        let out = v.apply(reads(&[("c", Some(14)), ("a", None), ("b", Some(12))]), 14);
        assert_eq!(shown(&out.events), ["del a@11", "put b@12", "put c@14"]);
        assert!(out.held.is_empty());
        assert_eq!(v.floor(), 14);
    }

    #[test]
    fn a_put_above_the_watermark_is_held_until_a_later_batch() {
        // A batch cut short: b@30 was read in its last round, when a change
        // at 25 may still be pending elsewhere (c, notified, not read yet).
        let mut v = View::new(BTreeMap::new(), 10);
        let first = v.apply(reads(&[("a", Some(20)), ("b", Some(30))]), 20);
        assert_eq!(shown(&first.events), ["put a@20"]);
        assert_eq!(first.held, [("/b".to_owned(), 30)]);
        // The next batch reads the held path and the pending one.
        let second = v.apply(reads(&[("b", Some(30)), ("c", Some(25))]), 30);
        assert_eq!(shown(&second.events), ["put c@25", "put b@30"]);
        let all: Vec<Event> = first.events.into_iter().chain(second.events).collect();
        assert_ordered(&all);
    }

    #[test]
    fn a_delete_is_reported_at_or_below_its_real_zxid_and_above_earlier_events() {
        let mut v = View::new(BTreeMap::from([("/a".into(), kv("a", 7))]), 20);
        // The delete happened at some zxid above 20, unknown.
        let out = v.apply(reads(&[("a", None)]), 20);
        assert_eq!(shown(&out.events), ["del a@21"]);
        // A put at 21 (the real delete was later, or in the same multi)
        // still comes in order.
        let next = v.apply(reads(&[("b", Some(21))]), 21);
        let all: Vec<Event> = out.events.into_iter().chain(next.events).collect();
        assert_ordered(&all);
    }

    #[test]
    fn deletes_with_known_bounds_get_distinct_revisions_in_order() {
        let mut v = View::new(
            BTreeMap::from([("/a".into(), kv("a", 5)), ("/b".into(), kv("b", 6))]),
            10,
        );
        let bounds = |p: &str| match p {
            "/a" => 12,
            "/b" => 15,
            _ => 0,
        };
        let out = v.apply_with(
            reads(&[("a", None), ("b", None), ("c", Some(14))]),
            20,
            bounds,
        );
        assert_eq!(shown(&out.events), ["del a@13", "put c@14", "del b@16"]);
        // Bounds beyond the watermark are kept at watermark + 1.
        let mut v = View::new(BTreeMap::from([("/a".into(), kv("a", 5))]), 10);
        let out = v.apply_with(reads(&[("a", None)]), 12, |_| 30);
        assert_eq!(shown(&out.events), ["del a@13"]);
    }

    #[test]
    fn an_older_read_than_the_view_is_not_a_change() {
        let mut v = View::new(BTreeMap::from([("/a".into(), kv("a", 40))]), 40);
        let out = v.apply(reads(&[("a", Some(35))]), 40);
        assert!(out.events.is_empty(), "{:?}", shown(&out.events));
        let same = v.apply(reads(&[("a", Some(40))]), 41);
        assert!(same.events.is_empty(), "{:?}", shown(&same.events));
    }

    #[test]
    fn put_carries_the_previous_pair_from_the_view() {
        let mut v = View::new(BTreeMap::from([("/a".into(), kv("a", 3))]), 3);
        let out = v.apply(reads(&[("a", Some(9))]), 9);
        match &out.events[..] {
            [Event::Put { kv, prev: Some(p) }] => {
                assert_eq!((kv.mod_revision, p.mod_revision), (9, 3));
            }
            other => panic!("{:?}", shown(other)),
        }
    }

    #[test]
    fn absorbing_emits_nothing_and_raises_the_floor() {
        let mut v = View::default();
        let held = v.absorb(reads(&[("a", Some(5)), ("b", Some(9))]), 7);
        assert_eq!(held, [("/b".to_owned(), 9)]);
        assert_eq!(v.floor(), 7);
        assert_eq!(v.paths().collect::<Vec<_>>(), ["/a"]);
        // The held key shows up as a put once read again, above the floor.
        let out = v.apply(reads(&[("b", Some(9))]), 9);
        assert_eq!(shown(&out.events), ["put b@9"]);
    }

    /// A model of the server (a log of changes, each at the next zxid) and
    /// of the batches: whatever mix of complete and cut-short batches and
    /// reads of a stale view, the emitted revisions never go down, nothing is
    /// emitted twice, and the view ends equal to the store.
    #[test]
    fn any_interleaving_of_batches_keeps_revision_order_and_converges() {
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            // Some rounds with more keys than a small view holds.
            let keys = if round % 10 == 0 { 40 } else { 1 + rnd(6) };
            let mut store: BTreeMap<String, u64> = BTreeMap::new();
            let mut zxid = 100;
            let mut view = View::new(BTreeMap::new(), zxid);
            let mut all = Vec::new();
            // Paths changed since the last batch that read them (notified).
            let mut pending: BTreeMap<String, u64> = BTreeMap::new();
            for _ in 0..40 {
                // Some writes.
                for _ in 0..rnd(4) {
                    zxid += 1;
                    let k = format!("/k{}", rnd(keys));
                    if rnd(4) == 0 {
                        store.remove(&k);
                    } else {
                        store.insert(k.clone(), zxid);
                    }
                    pending.entry(k).or_insert(zxid);
                }
                // A batch reads some of the notified paths (all of them for
                // a complete cut), at the current state.
                let complete = rnd(2) == 0;
                let mut read = Reads::new();
                let mut still = BTreeMap::new();
                for (k, first) in std::mem::take(&mut pending) {
                    if complete || rnd(2) == 0 {
                        let name = &k[1..];
                        read.insert(k.clone(), store.get(&k).map(|r| kv(name, *r)));
                    } else {
                        still.insert(k, first);
                    }
                }
                // Watermark: below every change not read.
                let watermark = if complete {
                    zxid
                } else {
                    still.values().min().map_or(zxid, |m| m - 1)
                };
                let out = view.apply(read, watermark);
                for (p, _) in out.held {
                    still.entry(p).or_insert(watermark + 1);
                }
                pending = still;
                all.extend(out.events);
            }
            // Settle: one complete batch of everything pending.
            let read: Reads = std::mem::take(&mut pending)
                .into_keys()
                .map(|k| {
                    let r = store.get(&k).map(|r| kv(&k[1..], *r));
                    (k, r)
                })
                .collect();
            let out = view.apply(read, zxid);
            assert!(out.held.is_empty());
            all.extend(out.events);
            assert_ordered(&all);
            let mut puts = std::collections::HashSet::new();
            for e in &all {
                if let Event::Put { kv, .. } = e {
                    assert!(
                        puts.insert((kv.key.to_string(), kv.mod_revision)),
                        "duplicate {:?}",
                        shown(&all)
                    );
                }
            }
            let shown_view: BTreeMap<String, u64> = view.keys.revisions();
            assert_eq!(shown_view, store, "converged");
        }
    }
}

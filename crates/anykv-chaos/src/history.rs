//! The acknowledged-write history and the checks of what a watch delivered
//! and what the store kept against it.
//!
//! Writers put every key once, with a unique value, so each check is a
//! plain comparison: an event for a key nobody wrote, with a value nobody
//! wrote, or a `Delete` (the workload deletes nothing) was invented; a key
//! seen twice was duplicated; a revision lower than the one before is out
//! of order; an acknowledged key missing from the store was lost.

use std::collections::{BTreeMap, HashMap, HashSet};

use anykv::{Event, KvPair};

/// What became of one write attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The store acknowledged it.
    Acked,
    /// Timed out or lost its connection: it may or may not have been applied.
    Unknown,
    /// Refused before it reached the server: it was not applied.
    NotApplied,
}

/// Every write attempt of a run: key → (value, fate).
#[derive(Default, Debug)]
pub struct WriteLog {
    writes: HashMap<String, (Vec<u8>, Fate)>,
}

impl WriteLog {
    /// Records one attempt.
    pub fn record(&mut self, key: String, value: Vec<u8>, fate: Fate) {
        self.writes.insert(key, (value, fate));
    }

    /// Acknowledged writes.
    pub fn acked(&self) -> usize {
        self.count(&Fate::Acked)
    }

    /// Writes whose outcome is unknown.
    pub fn unknown(&self) -> usize {
        self.count(&Fate::Unknown)
    }

    fn count(&self, fate: &Fate) -> usize {
        self.writes.values().filter(|(_, f)| f == fate).count()
    }

    /// Compares the store's final contents (every pair under the workload's
    /// prefix) with the log.
    pub fn check_store(&self, pairs: &[KvPair]) -> StoreCheck {
        let found: HashMap<&str, &[u8]> = pairs
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_ref()))
            .collect();
        let mut check = StoreCheck::default();
        for (key, (value, fate)) in &self.writes {
            match (fate, found.get(key.as_str())) {
                (Fate::Acked, None) => check.lost.push(key.clone()),
                (Fate::Acked, Some(v)) if v != value => check.lost.push(key.clone()),
                (Fate::NotApplied, Some(_)) => check.phantom.push(key.clone()),
                _ => {}
            }
        }
        for p in pairs {
            if !self.writes.contains_key(p.key.as_str()) {
                check.phantom.push(p.key.to_string());
            }
        }
        check.lost.sort();
        check.phantom.sort();
        check
    }

    /// Checks the events a watch delivered over the whole run (`complete`:
    /// a Full backend, which must deliver every applied write; a Converge
    /// backend must too here, since every key is written once and its view
    /// has to converge on the store's).
    pub fn check_events(&self, events: &[Event], store: &[KvPair]) -> EventCheck {
        let mut check = EventCheck::default();
        let mut seen = HashSet::new();
        let mut last_rev = 0;
        for ev in events {
            let revision = match ev {
                Event::Put { kv, .. } => {
                    let key = kv.key.as_str();
                    match self.writes.get(key) {
                        Some((value, fate))
                            if value.as_slice() == kv.value.as_ref()
                                && *fate != Fate::NotApplied => {}
                        _ => check.invented.push(format!("put {key}")),
                    }
                    if !seen.insert(key.to_owned()) {
                        check.duplicates.push(key.to_owned());
                    }
                    kv.mod_revision
                }
                Event::Delete { key, revision } => {
                    check.invented.push(format!("delete {key}"));
                    *revision
                }
            };
            if revision <= last_rev {
                check.out_of_order += 1;
            }
            last_rev = last_rev.max(revision);
        }
        // The view converges: every key the store holds was delivered.
        let delivered: BTreeMap<&str, ()> = seen.iter().map(|k| (k.as_str(), ())).collect();
        for p in store {
            if !delivered.contains_key(p.key.as_str()) {
                check.missing.push(p.key.to_string());
            }
        }
        check.missing.sort();
        check
    }
}

/// The store against the log.
#[derive(Default, Debug)]
pub struct StoreCheck {
    /// Acknowledged writes not in the store (or with another value).
    pub lost: Vec<String>,
    /// Keys in the store that were never written, or whose write provably
    /// never reached the server.
    pub phantom: Vec<String>,
}

/// A watch's events against the log and the store.
#[derive(Default, Debug)]
pub struct EventCheck {
    /// Events for writes that never happened (and any delete).
    pub invented: Vec<String>,
    /// Keys delivered more than once.
    pub duplicates: Vec<String>,
    /// Events whose revision is not above the previous one's.
    pub out_of_order: usize,
    /// Keys in the store that the watch never delivered.
    pub missing: Vec<String>,
}

impl EventCheck {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.invented.is_empty()
            && self.duplicates.is_empty()
            && self.out_of_order == 0
            && self.missing.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anykv::{Key, Version};

    fn pair(k: &str, v: &str, rev: u64) -> KvPair {
        KvPair {
            key: Key::new(k).unwrap(),
            value: v.to_owned().into_bytes().into(),
            version: Version::new(rev),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn put(k: &str, v: &str, rev: u64) -> Event {
        Event::Put {
            kv: pair(k, v, rev),
            prev: None,
        }
    }

    fn log() -> WriteLog {
        let mut log = WriteLog::default();
        log.record("a".into(), b"1".to_vec(), Fate::Acked);
        log.record("b".into(), b"2".to_vec(), Fate::Unknown);
        log.record("c".into(), b"3".to_vec(), Fate::NotApplied);
        log
    }

    #[test]
    fn a_clean_history_passes() {
        let store = [pair("a", "1", 5), pair("b", "2", 6)];
        let log = log();
        assert!(log.check_store(&store).lost.is_empty());
        let events = [put("a", "1", 5), put("b", "2", 6)];
        assert!(log.check_events(&events, &store).is_clean());
    }

    #[test]
    fn each_violation_is_caught() {
        let log = log();
        let store = [pair("b", "2", 6), pair("c", "3", 7)];
        let s = log.check_store(&store);
        assert_eq!(s.lost, ["a"], "acked a is missing");
        assert_eq!(s.phantom, ["c"], "c was never applied");
        let events = [
            put("b", "2", 6),
            Event::Delete {
                key: Key::new("b").unwrap(),
                revision: 8,
            },
            put("b", "2", 6),
            put("x", "9", 9),
        ];
        let e = log.check_events(&events, &[pair("a", "1", 5)]);
        assert_eq!(e.invented, ["delete b", "put x"]);
        assert_eq!(e.duplicates, ["b"]);
        assert_eq!(e.out_of_order, 1);
        assert_eq!(e.missing, ["a"]);
    }
}

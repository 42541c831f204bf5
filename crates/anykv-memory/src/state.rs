//! The data of one in-memory store: keys, revisions, the event log and TTLs.
//! Everything here runs under the store's mutex.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use anykv_core::{Error, Event, Key, KvPair, Prefix, Result, Revision, Version};
use bytes::Bytes;
use tokio::{sync::broadcast, time::Instant};

pub(crate) const BACKEND: &str = "memory";

/// An event with its position in the log: several events can share a
/// revision (an atomic commit), the sequence number is unique.
pub(crate) type Sequenced = (u64, Event);

struct Entry {
    value: Bytes,
    create_revision: Revision,
    mod_revision: Revision,
    expires: Option<Instant>,
}

pub(crate) struct State {
    data: BTreeMap<Key, Entry>,
    expiries: BTreeSet<(Instant, Key)>,
    revision: Revision,
    seq: u64,
    log: VecDeque<Sequenced>,
    log_capacity: usize,
    /// Highest revision dropped from the log: a watch from before it cannot replay.
    compacted: Revision,
    pub(crate) events: broadcast::Sender<Sequenced>,
}

impl State {
    pub(crate) fn new(log_capacity: usize) -> State {
        let (events, _) = broadcast::channel(1024);
        State {
            data: BTreeMap::new(),
            expiries: BTreeSet::new(),
            revision: 0,
            seq: 0,
            log: VecDeque::new(),
            log_capacity: log_capacity.max(1),
            compacted: 0,
            events,
        }
    }

    pub(crate) fn revision(&self) -> Revision {
        self.revision
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    fn pair(key: &Key, e: &Entry) -> KvPair {
        KvPair {
            key: key.clone(),
            value: e.value.clone(),
            version: Version::new(e.mod_revision),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
        }
    }

    /// Removes every key whose TTL has run out, each as its own revision.
    pub(crate) fn expire(&mut self, now: Instant) {
        while let Some((at, key)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.pop_first();
            if self.data.get(&key).and_then(|e| e.expires) == Some(at) {
                self.revision += 1;
                self.remove(&key);
            }
        }
    }

    pub(crate) fn get(&self, key: &Key) -> Option<KvPair> {
        self.data.get(key).map(|e| Self::pair(key, e))
    }

    pub(crate) fn version(&self, key: &Key) -> Option<Version> {
        self.data.get(key).map(|e| Version::new(e.mod_revision))
    }

    pub(crate) fn list(&self, prefix: &Prefix) -> Vec<KvPair> {
        self.range(prefix).map(|(k, e)| Self::pair(k, e)).collect()
    }

    fn range<'a>(&'a self, prefix: &'a Prefix) -> impl Iterator<Item = (&'a Key, &'a Entry)> + 'a {
        let dir = prefix.dir();
        // Keys sort by bytes, so everything below `dir` is one contiguous run.
        self.data
            .range::<str, _>((
                std::ops::Bound::Included(dir.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.as_str().starts_with(&dir))
    }

    /// Starts a new revision for a write.
    pub(crate) fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        self.revision
    }

    /// Writes at the current revision (call `next_revision` first).
    pub(crate) fn write(&mut self, key: &Key, value: Bytes, expires: Option<Instant>) -> Version {
        let rev = self.revision;
        let prev = self.data.get(key).map(|e| Self::pair(key, e));
        if let Some(old) = self.data.get(key).and_then(|e| e.expires) {
            self.expiries.remove(&(old, key.clone()));
        }
        if let Some(at) = expires {
            self.expiries.insert((at, key.clone()));
        }
        let entry = Entry {
            value,
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            expires,
        };
        let kv = Self::pair(key, &entry);
        self.data.insert(key.clone(), entry);
        self.publish(Event::Put { kv, prev });
        Version::new(rev)
    }

    /// Removes at the current revision; true if the key existed.
    pub(crate) fn remove(&mut self, key: &Key) -> bool {
        match self.data.remove(key) {
            None => false,
            Some(e) => {
                if let Some(at) = e.expires {
                    self.expiries.remove(&(at, key.clone()));
                }
                self.publish(Event::Delete {
                    key: key.clone(),
                    revision: self.revision,
                });
                true
            }
        }
    }

    pub(crate) fn keys_below(&self, prefix: &Prefix) -> Vec<Key> {
        self.range(prefix).map(|(k, _)| k.clone()).collect()
    }

    fn publish(&mut self, event: Event) {
        self.seq += 1;
        let item = (self.seq, event);
        if self.log.len() == self.log_capacity
            && let Some((_, old)) = self.log.pop_front()
        {
            self.compacted = self.compacted.max(old.revision());
        }
        self.log.push_back(item.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(item);
    }

    fn compacted_error(&self, revision: Revision) -> Error {
        Error::Compacted {
            backend: BACKEND,
            revision,
            oldest: self.compacted + 1,
        }
    }

    /// Logged events with a revision above `rev`, or `Compacted` if some of
    /// them are no longer retained.
    pub(crate) fn since_revision(&self, rev: Revision) -> Result<Vec<Sequenced>> {
        if rev < self.compacted {
            return Err(self.compacted_error(rev));
        }
        Ok(self
            .log
            .iter()
            .filter(|(_, e)| e.revision() > rev)
            .cloned()
            .collect())
    }

    /// Logged events after sequence number `seq` (a watcher that fell behind
    /// the broadcast), or `Compacted` if the log no longer reaches back.
    pub(crate) fn since_seq(&self, seq: u64, rev: Revision) -> Result<Vec<Sequenced>> {
        let first = self.log.front().map_or(self.seq + 1, |(s, _)| *s);
        if first > seq + 1 {
            return Err(self.compacted_error(rev));
        }
        Ok(self.log.iter().filter(|(s, _)| *s > seq).cloned().collect())
    }
}

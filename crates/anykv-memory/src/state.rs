//! The data of one in-memory store: keys, revisions, the event log and TTLs.
//! Everything here runs under the store's mutex.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::Duration,
};

use anykv_core::{Error, Event, Key, KvPair, Prefix, Result, Revision, Version};
use bytes::Bytes;
use tokio::time::Instant;

use anykv_core::embedded::hub::Group;

pub(crate) const BACKEND: &str = "memory";

struct Entry {
    value: Bytes,
    create_revision: Revision,
    mod_revision: Revision,
    expires: Option<Instant>,
}

/// A live session: its deadline and its ephemeral keys, each with the
/// revision of its session write (see `anykv_core::embedded::session`).
struct SessionRec {
    deadline: Instant,
    keys: HashMap<Key, Revision>,
}

pub(crate) struct State {
    data: BTreeMap<Key, Entry>,
    sessions: BTreeMap<u64, SessionRec>,
    next_session: u64,
    expiries: BTreeSet<(Instant, Key)>,
    revision: Revision,
    /// Every event, in revision order, up to `log_capacity` of them.
    log: VecDeque<Event>,
    log_capacity: usize,
    /// Highest revision dropped from the log: a watch from before it cannot replay.
    compacted: Revision,
    /// Events logged under the current lock, routed to the watches when
    /// the lock is released (see `Guard`), so that each watch gets a whole
    /// revision at once.
    pub(crate) unpublished: Vec<Event>,
}

impl State {
    pub(crate) fn new(log_capacity: usize) -> State {
        State {
            data: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 0,
            expiries: BTreeSet::new(),
            revision: 0,
            log: VecDeque::new(),
            log_capacity: log_capacity.max(1),
            compacted: 0,
            unpublished: Vec::new(),
        }
    }

    pub(crate) fn revision(&self) -> Revision {
        self.revision
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

    /// Removes every key whose TTL has run out, each as its own revision,
    /// and ends every session whose deadline passed.
    pub(crate) fn expire(&mut self, now: Instant) {
        if !self.sessions.is_empty() {
            let due: Vec<u64> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                self.end_session(id);
            }
        }
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

    /// Records a new session alive until `now + ttl`.
    pub(crate) fn begin_session(&mut self, ttl: Duration, now: Instant) -> u64 {
        self.next_session += 1;
        let id = self.next_session;
        self.sessions.insert(
            id,
            SessionRec {
                deadline: now + ttl,
                keys: HashMap::new(),
            },
        );
        id
    }

    /// Pushes a live session's deadline (`None`: only checks it); false if
    /// it is gone. Call `expire` first.
    pub(crate) fn renew_session(&mut self, id: u64, ttl: Option<Duration>, now: Instant) -> bool {
        match self.sessions.get_mut(&id) {
            None => false,
            Some(s) => {
                if let Some(ttl) = ttl {
                    s.deadline = now + ttl;
                }
                true
            }
        }
    }

    /// An ephemeral put under a live session (call `expire` first).
    pub(crate) fn session_put(
        &mut self,
        id: u64,
        key: &Key,
        value: Bytes,
        cond: anykv_core::Condition,
    ) -> Result<Version> {
        if !self.sessions.contains_key(&id) {
            return Err(anykv_core::embedded::session::lost_error(BACKEND, key));
        }
        anykv_core::store::condition::check(BACKEND, key, cond, self.version(key))?;
        let rev = self.next_revision();
        let v = self.write(key, value, None);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.keys.insert(key.clone(), rev);
        }
        Ok(v)
    }

    /// Ends a session: its keys still as it wrote them are deleted in one
    /// revision. False if it was already gone.
    pub(crate) fn end_session(&mut self, id: u64) -> bool {
        let Some(s) = self.sessions.remove(&id) else {
            return false;
        };
        let mut doomed: Vec<Key> = s
            .keys
            .into_iter()
            .filter(|(k, rev)| self.data.get(k).is_some_and(|e| e.mod_revision == *rev))
            .map(|(k, _)| k)
            .collect();
        if !doomed.is_empty() {
            doomed.sort();
            self.next_revision();
            for k in &doomed {
                self.remove(k);
            }
        }
        true
    }

    pub(crate) fn keys_below(&self, prefix: &Prefix) -> Vec<Key> {
        self.range(prefix).map(|(k, _)| k.clone()).collect()
    }

    fn publish(&mut self, event: Event) {
        if self.log.len() == self.log_capacity
            && let Some(old) = self.log.pop_front()
        {
            self.compacted = self.compacted.max(old.revision());
        }
        self.log.push_back(event.clone());
        self.unpublished.push(event);
    }

    fn compacted_error(&self, revision: Revision) -> Error {
        Error::Compacted {
            backend: BACKEND,
            revision,
            oldest: self.compacted + 1,
        }
    }

    /// Up to `max` logged revisions above `rev`, each whole, or `Compacted`
    /// if some of them are no longer retained.
    pub(crate) fn log_after(&self, rev: Revision, max: usize) -> Result<Vec<Group>> {
        if rev < self.compacted {
            return Err(self.compacted_error(rev));
        }
        let from = self.log.partition_point(|e| e.revision() <= rev);
        let mut out: Vec<Group> = Vec::new();
        for ev in self.log.range(from..) {
            let rev = ev.revision();
            if let Some((r, evs)) = out.last_mut()
                && *r == rev
            {
                evs.push(ev.clone());
            } else if out.len() >= max {
                break;
            } else {
                out.push((rev, vec![ev.clone()]));
            }
        }
        Ok(out)
    }

    /// Drops the log up to `rev`: watches from before it get `Compacted`.
    pub(crate) fn compact(&mut self, rev: Revision) -> Result<()> {
        if rev > self.revision {
            return Err(Error::InvalidArgument {
                backend: BACKEND,
                message: format!(
                    "cannot compact at revision {rev}: the store is at revision {}",
                    self.revision
                ),
            });
        }
        if rev <= self.compacted {
            return Ok(());
        }
        while self.log.front().is_some_and(|e| e.revision() <= rev) {
            self.log.pop_front();
        }
        self.compacted = rev;
        Ok(())
    }
}

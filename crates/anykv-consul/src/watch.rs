//! Watches: blocking queries diffed into events.
//!
//! One *hub* per watched key or prefix runs the blocking loop (`GET
//! kv/<key>` or `GET kv/<prefix>/?recurse` with `?index=&wait=`) and
//! publishes each answer as a snapshot; every watch stream on that target
//! diffs consecutive snapshots against its own view. So N watchers of one
//! prefix cost one blocking query, and each stream still starts from its
//! own consistent baseline read (taken before `watch` returns, so a write
//! made after `watch` returns is never part of the baseline).
//!
//! Index rules (Consul's "Blocking Queries" documentation): an answer whose
//! index is lower than the one asked with means the index was reset
//! (tombstones reaped, snapshot restored): the hub takes the answer as a
//! fresh baseline and starts a new *epoch*, and streams diff against it
//! even though its index is lower; an index is never used below 1.
//!
//! A hub ends when its last stream is dropped: its in-flight request is
//! dropped with it, which closes the connection and ends the query on the
//! agent. [`Registry::close`] ends every stream with `Cancelled`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use anykv_core::{Error, ErrorKind, Event, Key, KvPair, Result, Start, Target, WatchStream};
use futures::StreamExt;
use tokio::sync::watch;

use crate::{
    Inner,
    error::BACKEND,
    kv::{ReadMode, blocking_deadline, entry},
};

/// How long one blocking query waits on the agent (Consul adds up to 1/16
/// of jitter).
const BLOCK_WAIT: Duration = Duration::from_secs(60);
/// First retry delay after a failed query; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Retry delay after a refusal that will not fix itself soon (ACLs).
const FATAL_BACKOFF: Duration = Duration::from_secs(5);

type Entries = Arc<BTreeMap<Key, KvPair>>;

/// One answer of the blocking loop, or its failure.
#[derive(Debug)]
struct Snapshot {
    /// `X-Consul-Index` of the answer.
    index: u64,
    /// Incremented whenever the index went backwards.
    epoch: u64,
    entries: Entries,
    /// Set while the query fails; `entries` is then the last good state.
    fault: Option<Fault>,
    /// Outages reported so far, and the last one: a stream that only sees a
    /// later, healthy snapshot (the channel keeps the latest value) still
    /// reports the outage it missed.
    outages: u64,
    last_fault: Option<Fault>,
}

/// A query failure, re-created as an [`Error`] for each stream.
#[derive(Clone, Debug)]
struct Fault {
    kind: ErrorKind,
    message: String,
}

impl Fault {
    fn from_error(e: &Error) -> Fault {
        Fault {
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    /// Transient failures keep the stream open; the loop retries.
    fn is_fatal(&self) -> bool {
        !matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
    }

    fn to_error(&self) -> Error {
        let message = format!("watch: {}", self.message);
        match self.kind {
            ErrorKind::Unavailable | ErrorKind::Timeout => Error::Unavailable {
                backend: BACKEND,
                message,
                source: None,
            },
            ErrorKind::PermissionDenied => Error::PermissionDenied {
                backend: BACKEND,
                message,
                source: None,
            },
            ErrorKind::Unauthenticated => Error::Unauthenticated {
                backend: BACKEND,
                message,
                source: None,
            },
            _ => Error::Backend {
                backend: BACKEND,
                message,
                source: None,
            },
        }
    }
}

/// What a hub reads: one key, or everything below a directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Scope {
    path: String,
    recurse: bool,
}

impl Scope {
    fn of(target: &Target) -> Scope {
        match target {
            Target::Key(k) => Scope {
                path: k.as_str().to_owned(),
                recurse: false,
            },
            Target::Prefix(p) => Scope {
                path: p.dir(),
                recurse: true,
            },
        }
    }
}

type Channel = watch::Sender<Option<Arc<Snapshot>>>;

/// The running hubs of one store, and its close signal.
pub(crate) struct Registry {
    hubs: Mutex<HashMap<Scope, Channel>>,
    /// Bumped by `close()`: streams opened before end with `Cancelled`.
    closed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            hubs: Mutex::new(HashMap::new()),
            closed: watch::channel(0).0,
        }
    }
}

impl Registry {
    fn hubs(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Channel>> {
        // The map is only ever inserted into / removed from: a panic cannot
        // leave it half-updated, so poisoning is ignored.
        self.hubs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Running hubs.
    pub(crate) fn len(&self) -> usize {
        self.hubs().len()
    }

    /// Ends every open stream with `Cancelled`.
    pub(crate) fn close(&self) {
        self.closed.send_modify(|g| *g += 1);
    }

    /// A receiver on the hub for `scope`, starting the hub if needed.
    fn subscribe(
        &self,
        inner: &Arc<Inner>,
        scope: &Scope,
    ) -> watch::Receiver<Option<Arc<Snapshot>>> {
        let mut hubs = self.hubs();
        if let Some(tx) = hubs.get(scope) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        hubs.insert(scope.clone(), tx.clone());
        tokio::spawn(run_hub(Arc::downgrade(inner), scope.clone(), tx));
        rx
    }

    /// Called by a hub whose streams are all gone: unregisters it unless a
    /// stream subscribed meanwhile (subscription happens under the same lock).
    fn retire(&self, scope: &Scope, tx: &Channel) -> bool {
        let mut hubs = self.hubs();
        if tx.receiver_count() > 0 {
            return false;
        }
        if hubs.get(scope).is_some_and(|t| t.same_channel(tx)) {
            hubs.remove(scope);
        }
        true
    }
}

/// The blocking loop of one scope.
async fn run_hub(inner: std::sync::Weak<Inner>, scope: Scope, tx: Channel) {
    // The index the next query asks with (0 after a failure: answer at once).
    let mut index = 0u64;
    // The index of the last published answer, to detect resets.
    let mut last_published = 0u64;
    let mut epoch = 0u64;
    let mut published = false;
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    let mut outages = 0u64;
    let mut last_fault: Option<Fault> = None;
    loop {
        let Some(store) = inner.upgrade() else {
            // The store is gone: nothing can answer any more.
            let fault = Fault {
                kind: ErrorKind::Cancelled,
                message: "the store was dropped".into(),
            };
            publish_fault(&tx, fault, outages + 1);
            return;
        };
        let slack = store.http.settings().timeout;
        let query = store.read_raw(
            &scope.path,
            scope.recurse,
            ReadMode::Blocking {
                index,
                wait: BLOCK_WAIT,
            },
        );
        // Bound the request ourselves: the client has no overall timeout,
        // and a hung agent must not stall the loop forever.
        let query = tokio::time::timeout(blocking_deadline(BLOCK_WAIT, slack), query);
        let outcome = tokio::select! {
            _ = tx.closed() => None,
            r = query => Some(r),
        };
        let Some(outcome) = outcome else {
            drop(store);
            if store_retire(&inner, &scope, &tx) {
                return;
            }
            continue;
        };
        let result = outcome.unwrap_or_else(|_| {
            Err(Error::Timeout {
                backend: BACKEND,
                operation: "watch",
                after: blocking_deadline(BLOCK_WAIT, slack),
            })
        });
        match result.and_then(|(kvs, new_index)| {
            let mut entries = BTreeMap::new();
            for kv in kvs {
                if let Some(e) = entry(kv)? {
                    entries.insert(e.pair.key.clone(), e.pair);
                }
            }
            Ok((entries, new_index))
        }) {
            Ok((entries, new_index)) => {
                backoff = FIRST_BACKOFF;
                let recovered = std::mem::take(&mut failing);
                if published && new_index == index && !recovered {
                    continue; // the wait ran out: nothing changed
                }
                let (next, reset) = next_index(last_published, new_index);
                if reset {
                    epoch += 1; // a fresh baseline
                }
                index = next;
                last_published = index;
                published = true;
                tx.send_replace(Some(Arc::new(Snapshot {
                    index,
                    epoch,
                    entries: Arc::new(entries),
                    fault: None,
                    outages,
                    last_fault: last_fault.clone(),
                })));
            }
            Err(e) => {
                let fault = Fault::from_error(&e);
                let delay = if fault.is_fatal() {
                    FATAL_BACKOFF
                } else {
                    backoff
                };
                if !failing || fault.is_fatal() {
                    tracing::debug!(error = %e, path = %scope.path, "consul watch query failed; retrying");
                    outages += 1;
                    last_fault = Some(fault.clone());
                    publish_fault(&tx, fault, outages);
                }
                failing = true;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                drop(store);
                // After an error, ask from scratch: the index may be gone.
                index = 0;
                published = false;
                tokio::select! {
                    _ = tx.closed() => {
                        if store_retire(&inner, &scope, &tx) {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Consul's rules for the index of the next blocking query, given the
/// index last acted on and the one just answered: an answer below it means
/// the index was reset (the answer is a fresh baseline, and blocking on the
/// old, higher index could wait for nothing); an index is never below 1
/// (0 would answer at once, forever).
pub(crate) fn next_index(previous: u64, answered: u64) -> (u64, bool) {
    (answered.max(1), answered < previous)
}

fn store_retire(inner: &std::sync::Weak<Inner>, scope: &Scope, tx: &Channel) -> bool {
    match inner.upgrade() {
        Some(store) => store.watches.retire(scope, tx),
        None => true,
    }
}

fn publish_fault(tx: &Channel, fault: Fault, outages: u64) {
    tx.send_modify(|cur| {
        let (index, epoch, entries) = match cur {
            Some(s) => (s.index, s.epoch, s.entries.clone()),
            None => (0, 0, Entries::default()),
        };
        *cur = Some(Arc::new(Snapshot {
            index,
            epoch,
            entries,
            fault: Some(fault.clone()),
            outages,
            last_fault: Some(fault),
        }));
    });
}

/// Opens a watch stream: a consistent baseline read, then the hub's snapshots.
pub(crate) async fn watch(inner: &Arc<Inner>, target: Target, start: Start) -> Result<WatchStream> {
    let scope = Scope::of(&target);
    let closed = inner.watches.closed.subscribe();
    // Subscribe first, read second: a snapshot published in between is
    // either older than the baseline (skipped) or newer (diffed).
    let rx = inner.watches.subscribe(inner, &scope);
    let (epoch, outages) = rx
        .borrow()
        .as_ref()
        .map_or((0, 0), |s| (s.epoch, s.outages));
    let (kvs, index) = inner
        .read_raw(&scope.path, scope.recurse, ReadMode::Consistent)
        .await?;
    let mut view = BTreeMap::new();
    for kv in kvs {
        if let Some(e) = entry(kv)?
            && target.matches(&e.pair.key)
        {
            view.insert(e.pair.key.clone(), e.pair);
        }
    }
    let mut pending = VecDeque::new();
    if let Start::After(rev) = start {
        // No history in Consul: replay the current keys changed after `rev`.
        let mut replay: Vec<&KvPair> = view.values().filter(|p| p.mod_revision > rev).collect();
        replay.sort_by_key(|p| p.mod_revision);
        pending.extend(replay.into_iter().map(|p| {
            Ok(Event::Put {
                kv: p.clone(),
                prev: None,
            })
        }));
    }
    let stream = Stream {
        rx,
        closed,
        target,
        view: Arc::new(view),
        index,
        epoch,
        outages,
        pending,
        done: false,
    };
    Ok(futures::stream::unfold(stream, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    })
    .boxed())
}

/// One watch stream's state.
struct Stream {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    closed: watch::Receiver<u64>,
    target: Target,
    view: Entries,
    index: u64,
    epoch: u64,
    /// Outages of the hub this stream has reported (or that predate it).
    outages: u64,
    pending: VecDeque<Result<Event>>,
    done: bool,
}

impl Stream {
    async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            let snapshot = tokio::select! {
                biased;
                _ = self.closed.changed() => {
                    self.done = true;
                    return Some(Err(Error::Cancelled {
                        backend: BACKEND,
                        message: "the store was closed".into(),
                    }));
                }
                changed = self.rx.changed() => match changed {
                    Ok(()) => self.rx.borrow_and_update().clone(),
                    Err(_) => {
                        self.done = true;
                        return Some(Err(Error::Backend {
                            backend: BACKEND,
                            message: "watch loop ended unexpectedly".into(),
                            source: None,
                        }));
                    }
                },
            };
            if let Some(s) = snapshot {
                self.apply(&s);
            }
        }
    }

    fn apply(&mut self, s: &Snapshot) {
        if s.outages > self.outages {
            // One error per outage seen, even if it is already over.
            self.outages = s.outages;
            if let Some(fault) = s.fault.as_ref().or(s.last_fault.as_ref()) {
                self.pending.push_back(Err(fault.to_error()));
            }
        }
        if let Some(fault) = &s.fault {
            if fault.is_fatal() {
                self.done = true;
            }
            return;
        }
        if s.epoch == self.epoch && s.index <= self.index {
            return; // not newer than what this stream already knows
        }
        let events = diff(&self.view, &s.entries, s.index, &self.target);
        self.pending.extend(events.into_iter().map(Ok));
        self.view = s.entries.clone();
        self.index = s.index;
        self.epoch = s.epoch;
    }
}

/// The events that turn `old` into `new`, in revision order: puts by their
/// `ModifyIndex`, then deletes at `index` (the answer that showed them).
fn diff(
    old: &BTreeMap<Key, KvPair>,
    new: &BTreeMap<Key, KvPair>,
    index: u64,
    target: &Target,
) -> Vec<Event> {
    let mut puts: Vec<Event> = new
        .iter()
        .filter(|(k, p)| {
            target.matches(k) && old.get(*k).map(|o| o.mod_revision) != Some(p.mod_revision)
        })
        .map(|(k, p)| Event::Put {
            kv: p.clone(),
            prev: old.get(k).cloned(),
        })
        .collect();
    puts.sort_by_key(Event::revision);
    let deletes = old
        .keys()
        .filter(|k| target.matches(k) && !new.contains_key(*k))
        .map(|k| Event::Delete {
            key: k.clone(),
            revision: index,
        });
    puts.extend(deletes);
    puts
}

#[cfg(test)]
mod tests {
    use super::*;
    use anykv_core::{Prefix, Version};
    use bytes::Bytes;

    fn pair(k: &str, v: &str, rev: u64) -> (Key, KvPair) {
        let key = Key::new(k).unwrap();
        (
            key.clone(),
            KvPair {
                key,
                value: Bytes::from(v.to_owned()),
                version: Version::new(rev),
                create_revision: rev,
                mod_revision: rev,
            },
        )
    }

    #[test]
    fn diff_orders_puts_then_deletes() {
        let all = Target::Prefix(Prefix::root());
        let old: BTreeMap<_, _> = [pair("a", "1", 5), pair("b", "1", 6), pair("c", "1", 7)].into();
        let new: BTreeMap<_, _> = [pair("a", "2", 10), pair("c", "1", 7), pair("d", "1", 9)].into();
        let ev = diff(&old, &new, 11, &all);
        let shown: Vec<(String, u64)> = ev
            .iter()
            .map(|e| (e.key().to_string(), e.revision()))
            .collect();
        assert_eq!(shown, [("d".into(), 9), ("a".into(), 10), ("b".into(), 11)]);
        match &ev[1] {
            Event::Put { prev: Some(p), .. } => assert_eq!(&p.value[..], b"1"),
            other => panic!("{other:?}"),
        }
        assert!(diff(&new, &new, 12, &all).is_empty());
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(10, 12), (12, false), "moved forward");
        assert_eq!(next_index(10, 10), (10, false), "wait ran out");
        assert_eq!(next_index(10, 4), (4, true), "went backwards: reset");
        assert_eq!(next_index(0, 0), (1, false), "never below 1");
        assert_eq!(next_index(5, 0), (1, true));
    }

    #[test]
    fn diff_respects_the_target() {
        let t = Target::Key(Key::new("a").unwrap());
        let old = BTreeMap::new();
        let new: BTreeMap<_, _> = [pair("a", "1", 3), pair("ab", "1", 4)].into();
        let ev = diff(&old, &new, 4, &t);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].key().as_str(), "a");
    }
}

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
//! Index rules (Consul's "Blocking Queries" documentation, and what a
//! restarted server does): the hub keeps the index of the last answer it
//! published, also across failures. An answer with a lower index is either
//! a reset (tombstones reaped, snapshot restored, data lost) or a server
//! that is behind: one just restarted answers from its log replay for a
//! moment (seen here: indexes 1241, 1565, … up to the 3213 it had before the
//! kill, each a partial state), and in `stale` mode a lagging server. Only a
//! `consistent` read tells them apart, so a lower index from a read that was
//! not `consistent` is never published: the hub re-reads `consistent` and
//! publishes that. A lower index on a `consistent` read is a real reset: the
//! hub publishes it as a fresh baseline in a new *epoch*, and streams diff
//! against it even though its index is lower. No query asks with index 0
//! once an answer came (0 answers at once, forever). The decisions live in
//! [`Cursor`], a pure state machine, tested with the sequences a restart
//! produces. So a stream only ever diffs states a
//! `consistent` read (or a read at least as new as the last published one)
//! vouched for: a delete is never invented, and a put never re-emitted.
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

/// What the hub does with one answer of its blocking query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing changed (the wait ran out): ask again from the same index.
    Wait,
    /// Publish the answer; `reset` starts a new epoch (the index went
    /// backwards on a `consistent` read).
    Publish { reset: bool },
    /// The answer is older than the last published one and comes from a
    /// read that is not `consistent`: a server replaying its log after a
    /// restart, or lagging. Do not publish it; re-read `consistent`.
    Confirm,
}

/// The hub's index bookkeeping. Pure, so that the sequences a server
/// restart produces can be tested without a server.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    /// The index the next blocking query asks with (0: answer at once).
    pub ask: u64,
    /// The index of the last published answer (0 before the first). Kept
    /// across failures: it is what tells a restarted server's replay apart.
    pub published: u64,
    /// Bumped by every reset.
    pub epoch: u64,
}

impl Cursor {
    /// Decides on an answer with `X-Consul-Index` `index`; `consistent`
    /// says whether the read was `?consistent` (then its state is the
    /// truth, whatever its index).
    pub(crate) fn on_answer(&mut self, index: u64, consistent: bool) -> Step {
        if self.published > 0 && index == self.published && self.ask == self.published {
            return Step::Wait;
        }
        let behind = index < self.published;
        if behind && !consistent {
            return Step::Confirm;
        }
        if behind {
            self.epoch += 1;
        }
        // Never below 1: index 0 would answer at once, forever.
        self.published = index.max(1);
        self.ask = self.published;
        Step::Publish { reset: behind }
    }

    /// The query failed: ask the next one to answer at once (the agent may
    /// be a restarted one whose index is lower), but keep `published`.
    pub(crate) fn on_failure(&mut self) {
        self.ask = 0;
    }
}

/// One answer, decoded: the entries and `X-Consul-Index`.
type Answer = (BTreeMap<Key, KvPair>, u64);

fn decode(kvs: Vec<consulrs::api::kv::common::KVPair>, index: u64) -> Result<Answer> {
    let mut entries = BTreeMap::new();
    for kv in kvs {
        if let Some(e) = entry(kv)? {
            entries.insert(e.pair.key.clone(), e.pair);
        }
    }
    Ok((entries, index))
}

/// One step of the loop: a blocking query from `cursor.ask`, and, if its
/// answer cannot be trusted, the `consistent` re-read that replaces it.
/// `Ok(None)`: nothing to publish.
async fn query(store: &Inner, scope: &Scope, cursor: &mut Cursor) -> Result<Option<Answer>> {
    let mode = ReadMode::blocking(cursor.ask, BLOCK_WAIT);
    let slack = store.http.settings().timeout;
    let deadline = blocking_deadline(BLOCK_WAIT, slack);
    // Bound the request ourselves too: a hung agent must not stall the loop.
    let (kvs, index) =
        tokio::time::timeout(deadline, store.read_raw(&scope.path, scope.recurse, mode))
            .await
            .map_err(|_| Error::Timeout {
                backend: BACKEND,
                operation: "watch",
                after: deadline,
            })??;
    let answer = decode(kvs, index)?;
    match cursor.on_answer(answer.1, store.is_consistent(mode)) {
        Step::Wait => Ok(None),
        Step::Publish { .. } => Ok(Some(answer)),
        Step::Confirm => {
            tracing::debug!(
                path = %scope.path,
                index = answer.1,
                published = cursor.published,
                "consul watch: answer older than the last one; confirming with a consistent read"
            );
            let (kvs, index) = store
                .read_raw(&scope.path, scope.recurse, ReadMode::CONSISTENT)
                .await?;
            let confirmed = decode(kvs, index)?;
            match cursor.on_answer(confirmed.1, true) {
                Step::Wait => Ok(None),
                Step::Publish { .. } | Step::Confirm => Ok(Some(confirmed)),
            }
        }
    }
}

/// The blocking loop of one scope.
async fn run_hub(inner: std::sync::Weak<Inner>, scope: Scope, tx: Channel) {
    let mut cursor = Cursor::default();
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
        let outcome = tokio::select! {
            _ = tx.closed() => None,
            r = query(&store, &scope, &mut cursor) => Some(r),
        };
        let Some(result) = outcome else {
            drop(store);
            if store_retire(&inner, &scope, &tx) {
                return;
            }
            continue;
        };
        match result {
            Ok(None) => {
                backoff = FIRST_BACKOFF;
                failing = false;
            }
            Ok(Some((entries, _))) => {
                backoff = FIRST_BACKOFF;
                failing = false;
                tx.send_replace(Some(Arc::new(Snapshot {
                    index: cursor.published,
                    epoch: cursor.epoch,
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
                cursor.on_failure();
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
/// the index was reset (blocking on the old, higher index could wait for
/// nothing); an index is never below 1 (0 would answer at once, forever).
/// For callers whose reads are all `consistent` (the lock keeper).
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
        .read_raw(&scope.path, scope.recurse, ReadMode::CONSISTENT)
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
        view: View {
            target,
            entries: Arc::new(view),
            index,
            epoch,
        },
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

/// What a stream's consumer has been told: the state it was last brought
/// to, the index and epoch of that state.
struct View {
    target: Target,
    entries: Entries,
    index: u64,
    epoch: u64,
}

impl View {
    /// The events that bring the consumer from its view to `entries`, the
    /// state at `index` in `epoch`; none if that state is not newer.
    fn advance(&mut self, index: u64, epoch: u64, entries: &Entries) -> Vec<Event> {
        if epoch == self.epoch && index <= self.index {
            return Vec::new(); // not newer than what this stream already knows
        }
        // After a reset the answer's index can be lower than events this
        // stream already delivered: deletes it reveals carry the higher of
        // the two, so that revisions never go down.
        let events = diff(&self.entries, entries, index.max(self.index), &self.target);
        self.entries = entries.clone();
        self.index = index;
        self.epoch = epoch;
        events
    }
}

/// One watch stream's state.
struct Stream {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    closed: watch::Receiver<u64>,
    view: View,
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
        let events = self.view.advance(s.index, s.epoch, &s.entries);
        self.pending.extend(events.into_iter().map(Ok));
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

    #[test]
    fn cursor_rules() {
        let mut c = Cursor::default();
        assert_eq!(c.on_answer(0, false), Step::Publish { reset: false });
        assert_eq!((c.ask, c.published), (1, 1), "never below 1");
        assert_eq!(c.on_answer(12, false), Step::Publish { reset: false });
        assert_eq!(c.on_answer(12, false), Step::Wait, "the wait ran out");
        assert_eq!(c.ask, 12);
        assert_eq!(c.on_answer(10, false), Step::Confirm, "older, unconfirmed");
        assert_eq!((c.ask, c.published, c.epoch), (12, 12, 0), "untouched");
        assert_eq!(c.on_answer(10, true), Step::Publish { reset: true });
        assert_eq!((c.ask, c.published, c.epoch), (10, 10, 1));
        c.on_failure();
        assert_eq!((c.ask, c.published), (0, 10), "the last index is kept");
        assert_eq!(
            c.on_answer(10, false),
            Step::Publish { reset: false },
            "after a failure the answer is published again (streams skip it)"
        );
    }

    /// One answer of a blocking query in a simulated run: `None` is a
    /// failed request (the agent killed), else index, entries, and whether
    /// the read was `consistent`.
    type Sim = Option<(u64, Vec<(&'static str, u64)>, bool)>;

    fn state(pairs: &[(&str, u64)]) -> Entries {
        Arc::new(pairs.iter().map(|&(k, rev)| pair(k, "v", rev)).collect())
    }

    /// Runs `answers` through the hub's [`Cursor`] and a stream's [`View`]
    /// (whose baseline is `start` at index `at`), as `run_hub` and `Stream`
    /// do; `truth` answers the `consistent` re-reads. Returns the events as
    /// `(key, revision, is_put)`.
    fn simulate(
        start: &[(&str, u64)],
        at: u64,
        answers: &[Sim],
        truth: (u64, &[(&str, u64)]),
    ) -> Vec<(String, u64, bool)> {
        let mut cursor = Cursor {
            ask: at,
            published: at,
            epoch: 0,
        };
        let mut view = View {
            target: Target::Prefix(Prefix::root()),
            entries: state(start),
            index: at,
            epoch: 0,
        };
        let mut events = Vec::new();
        for a in answers {
            let Some((index, pairs, consistent)) = a else {
                cursor.on_failure();
                continue;
            };
            let published = match cursor.on_answer(*index, *consistent) {
                Step::Wait => continue,
                Step::Publish { .. } => state(pairs),
                Step::Confirm => match cursor.on_answer(truth.0, true) {
                    Step::Wait => continue,
                    _ => state(truth.1),
                },
            };
            events.extend(view.advance(cursor.published, cursor.epoch, &published));
        }
        events
            .iter()
            .map(|e| {
                (
                    e.key().to_string(),
                    e.revision(),
                    matches!(e, Event::Put { .. }),
                )
            })
            .collect()
    }

    const FULL: &[(&str, u64)] = &[("a", 5), ("b", 7), ("c", 9)];

    #[test]
    fn a_restarted_server_replaying_its_log_invents_nothing() {
        // Seen here with `consistency=default` after kill -9 + restart: the
        // first answers come from the log replay, with lower indexes.
        let answers: &[Sim] = &[
            None, // killed
            None, // refused while restarting
            Some((5, vec![("a", 5)], false)),
            Some((7, vec![("a", 5), ("b", 7)], false)),
            Some((9, FULL.to_vec(), false)),
            Some((10, vec![("a", 5), ("b", 7), ("c", 9), ("d", 10)], false)),
        ];
        assert_eq!(
            simulate(FULL, 9, answers, (9, FULL)),
            [("d".to_owned(), 10, true)],
            "no delete of b or c, no second put of them, then the new write"
        );
    }

    #[test]
    fn a_restart_seen_through_consistent_reads_changes_nothing() {
        let answers: &[Sim] = &[None, Some((9, FULL.to_vec(), true))];
        assert!(simulate(FULL, 9, answers, (9, FULL)).is_empty());
    }

    #[test]
    fn a_lagging_stale_server_is_confirmed_not_believed() {
        // `stale`: another server, behind, answers with an older state;
        // the consistent re-read shows the current one (with a new key).
        let now: &[(&str, u64)] = &[("a", 5), ("b", 7), ("c", 9), ("e", 11)];
        let answers: &[Sim] = &[None, Some((7, vec![("a", 5), ("b", 7)], false))];
        assert_eq!(
            simulate(FULL, 9, answers, (11, now)),
            [("e".to_owned(), 11, true)]
        );
    }

    #[test]
    fn a_real_reset_is_a_new_baseline_and_revisions_never_go_down() {
        // Tombstones reaped: the index drops on a consistent read, the
        // state is the same: no event. Then a write after it.
        let answers: &[Sim] = &[
            Some((8, FULL.to_vec(), true)),
            Some((13, vec![("a", 5), ("b", 7), ("c", 9), ("f", 13)], true)),
        ];
        assert_eq!(
            simulate(FULL, 12, answers, (0, &[])),
            [("f".to_owned(), 13, true)]
        );
        // The data really gone (an in-memory agent restarted): the deletes
        // are real, and carry the stream's last index, not a lower one.
        let answers: &[Sim] = &[None, Some((2, vec![], true))];
        let ev = simulate(FULL, 9, answers, (0, &[]));
        assert_eq!(
            ev,
            [
                ("a".to_owned(), 9, false),
                ("b".to_owned(), 9, false),
                ("c".to_owned(), 9, false)
            ]
        );
    }
}

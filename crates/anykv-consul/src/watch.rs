//! Watches: shared blocking queries, fanned out and diffed into events.
//!
//! The [`Registry`] holds every open watch (*member*) and the *hubs* that
//! serve them: one blocking loop each (`GET kv/<key>` or `GET
//! kv/<prefix>?recurse` with `?index=&wait=`), at most `max_watch_conns`.
//! A new watch joins a running hub that covers its target; if none does, it
//! gets a hub of its own while the bound allows; only beyond that does
//! [`plan`] re-decide the hubs' scopes from all the members' targets (see
//! its docs), and each member is re-routed to the hub whose scope covers
//! its target (it registers at the new hub at once, so nothing published
//! meanwhile is lost; its old slot tells the stream where it went). So
//! opening N watches costs O(1) each but for a few re-plans of O(N)
//! (10,000 keys opened in order: ~285), and closing one costs O(1).
//! While more watches than the bound are open, a new hub waits
//! [`HUB_SETTLE`] before its first query, so the many hubs a burst of new
//! watches starts and retires at once cost the agent nothing.
//!
//! A hub's query loop parks the next query as soon as an answer's body has
//! arrived and hands the body to its publisher task, which decodes it
//! (reusing the entries whose indexes did not change), keeps it as the
//! hub's latest answer (for late joiners and for streams that fall behind)
//! and computes what changed since the previous one. Its [`Routes`] index
//! the hub's streams by key and by directory, and push the change into the
//! [`Slot`] of each stream whose target a changed key is in: a put wakes
//! the streams it concerns, not all the hub's streams, and an answer that
//! changes nothing (Consul answers a query on an absent key or an empty
//! directory with the index of the whole KV table, so every KV write wakes
//! it) wakes no stream at all (such a query waits [`EMPTY_PAUSE`] between
//! two empty answers, and once every hub is empty they merge into one:
//! [`Registry::emptiness`]). Every stream applies the changes to its own
//! view, restricted to its target, so N watchers under one scope cost one
//! blocking query. A stream's [`Slot`] holds at most [`FAN_OUT_BUFFER`]
//! answers; the hub never waits for it. Each stream starts from a consistent baseline read
//! that began after its `watch` was called and ended before it returns
//! (so a write acknowledged before the call is in it, one made after
//! `watch` returns is not); watches opening at once under one hub share
//! such reads ([`Registry::baseline`]: one read in flight per hub, the
//! watches that ask meanwhile share the next). A handle's own puts
//! are recorded, so that states a shared query skipped over can be replayed
//! ([`intermediate`]).
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
//! A hub ends when the plan no longer has its scope (its last stream was
//! dropped, or its streams moved): its task is aborted and its in-flight
//! request dropped with it, which closes the connection (Consul 1.8 still
//! holds the query until its wait runs out: see [`HUB_SETTLE`]).
//! [`Registry::close`] ends every stream with `Cancelled`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use anykv_core::{
    Error, ErrorKind, Event, Key, KvPair, Result, Start, Target, Version, WatchStream,
    batch::Batcher,
};
use bytes::Bytes;
use serde::Deserialize;

use crate::{
    Inner,
    error::{self, BACKEND},
    kv::{ReadMode, blocking_deadline},
};

/// How long one blocking query waits on the agent (Consul adds up to 1/16
/// of jitter). Short, because a query that reaches a restarted agent (whose
/// index restarted lower) without failing first blocks on the old, higher
/// index until this runs out: its answer then reveals the reset. At most
/// `max_watch_conns` queries per handle, so idle watches still cost about
/// one request per second or less.
const BLOCK_WAIT: Duration = Duration::from_secs(10);
/// How long a new hub started while more watches than `max_watch_conns`
/// are open (so while the plan can change) waits before its first query. Consul 1.8 does not end a blocking query whose
/// client went away: the agent keeps it, and counts its connection against
/// `http_max_conns_per_client` (200 by default), until the wait runs out.
/// While many watches open at once the plan changes often and most new
/// hubs are retired within milliseconds; waiting a moment means those
/// cost no request and leave nothing behind on the agent (measured: of ~1,000 hubs started
/// while 10,000 key watches opened, ~40 lived longer than 300 joins). The
/// price: a write in a hub's first moment reaches its streams up to this
/// much later (and a hub that settles is not told of an agent restart in
/// that moment by a failed query: its next answer shows the reset).
const HUB_SETTLE: Duration = Duration::from_millis(250);
/// How long a hub whose scope was empty in its last two answers waits
/// before it asks again. Consul answers a query on an absent key or an
/// empty directory with the index of the whole KV table, so any write to
/// a key near it in Consul's tree (in practice, anywhere under the same
/// prefix) ends the query, which then has nothing new to say. Without the
/// pause each such hub cost the agent one request per write. Measured with
/// 1,000 key watches on missing keys (ten hubs) and 500 puts/s of other
/// keys: the p99 of those puts was 6.3-8.9 ms without the pause and
/// 0.8-1.0 ms with it (0.6 ms with no watch open), and the agent's CPU over
/// the whole case fell from 3.4-3.9 s to 2.5-2.8 s. The price: a key
/// created in such a scope while other keys are written reaches its
/// watches up to this much later (delay p99 1.5-3.9 ms -> 5.1-6.9 ms when
/// those 1,000 keys are then created in turn).
const EMPTY_PAUSE: Duration = Duration::from_millis(10);
/// The least time between two merges of the hubs into one (see
/// [`Registry::emptiness`]). A merge aborts the queries of the hubs it
/// replaces, and Consul 1.8 holds an aborted query until its wait runs out
/// ([`BLOCK_WAIT`]), counting it against `http_max_conns_per_client`: one
/// merge per wait keeps those at most one plan's worth.
const MERGE_GAP: Duration = Duration::from_secs(12);
/// The longest gap between merges: a merge that finds keys soon after it
/// (a watched key created, most likely) doubles the gap up to this.
const MAX_MERGE_GAP: Duration = Duration::from_secs(300);
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
        // A query that timed out is the agent unreachable, as for any read.
        let kind = match self.kind {
            ErrorKind::Timeout => ErrorKind::Unavailable,
            kind => kind,
        };
        Error::of_kind(kind, BACKEND, message)
    }
}

/// What a hub reads: one key, or everything below a directory (`path`
/// then ends in `/`, or is empty for the root). A shared baseline read may
/// also be recursive on any string prefix ([`Scope::with`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Scope {
    /// Shared, not copied: a watch's scope is also its key in the
    /// registry's sorted set and in its hub's routes.
    path: Arc<str>,
    recurse: bool,
}

impl Scope {
    fn of(target: &Target) -> Scope {
        match target {
            Target::Key(k) => Scope {
                path: k.as_str().into(),
                recurse: false,
            },
            Target::Prefix(p) => Scope {
                path: p.dir().into(),
                recurse: true,
            },
        }
    }

    /// The narrowest scope whose answers contain everything `self` and
    /// `other` read: the same scope, or a recursive read of their longest
    /// common prefix (Consul's `?recurse` matches a plain string prefix,
    /// not only a directory). Keys opened together are usually neighbours,
    /// so a batch of their baselines reads about as many entries as it has
    /// watches, not its hub's whole scope.
    fn with(&self, other: &Scope) -> Scope {
        if self == other {
            return self.clone();
        }
        Scope {
            path: common_prefix(&self.path, &other.path).into(),
            recurse: true,
        }
    }

    /// Whether this scope's answers contain everything `other` reads.
    fn covers(&self, other: &Scope) -> bool {
        if self.recurse {
            other.path.starts_with(&*self.path)
        } else {
            self == other
        }
    }
}

/// How many answers a stream's [`Slot`] keeps while its consumer does not
/// read. A stream further behind drops them and re-syncs to the hub's
/// latest answer when read again (Converge: it emits the differences).
const FAN_OUT_BUFFER: usize = 1024;

/// A hub's output: its latest answer (for streams that join, move or fall
/// behind), and the [`Routes`] that hand each answer to the streams whose
/// target it touches. One allocation of ~150 bytes: a stream moved before
/// it was first polled keeps its old hub's channel until then, and opening
/// 1,000 watches at once starts and retires a few hundred hubs (a `tokio`
/// watch channel for the latest answer cost ~500 bytes more each, for a
/// wake-up nobody waited on).
#[derive(Clone)]
struct Channel(Arc<Outlet>);

struct Outlet {
    latest: Mutex<Option<Arc<Snapshot>>>,
    routes: Mutex<Routes>,
}

/// One answer as the slots carry it: what changed since the hub's
/// previous answer, so that a queued answer costs the size of the
/// changes, not of the scope.
#[derive(Debug)]
struct Change {
    index: u64,
    epoch: u64,
    /// The index of the previous answer `changes` are relative to.
    from: u64,
    /// Keys changed since the previous answer: the new entry, or `None`
    /// for a key gone.
    changes: Vec<(Key, Option<KvPair>)>,
    /// The whole state, when no previous answer is there to compare with
    /// (the first answer, and resets: streams diff against it).
    full: Option<Entries>,
    fault: Option<Fault>,
    outages: u64,
    last_fault: Option<Fault>,
}

/// The keys that differ between two states (by `ModifyIndex`): changed
/// or new ones in key order, then the keys gone. Both maps are walked once
/// side by side (no lookup per key: a wide scope has many).
fn delta(old: &BTreeMap<Key, KvPair>, new: &BTreeMap<Key, KvPair>) -> Vec<(Key, Option<KvPair>)> {
    let mut out: Vec<(Key, Option<KvPair>)> = Vec::new();
    let mut gone: Vec<(Key, Option<KvPair>)> = Vec::new();
    let mut was = old.iter().peekable();
    for (k, p) in new {
        while let Some((ok, _)) = was.next_if(|(ok, _)| *ok < k) {
            gone.push((ok.clone(), None));
        }
        match was.next_if(|(ok, _)| *ok == k) {
            Some((_, o)) if o.mod_revision == p.mod_revision => {}
            _ => out.push((k.clone(), Some(p.clone()))),
        }
    }
    gone.extend(was.map(|(ok, _)| (ok.clone(), None)));
    out.append(&mut gone);
    out
}

/// One stream's mailbox at the hub serving it: the answers that touch its
/// target, in order. The hub never waits for it: past [`FAN_OUT_BUFFER`]
/// answers it drops them and marks the slot `lagged`.
struct Slot {
    queue: Mutex<SlotQueue>,
    /// Wakes the stream. The stream registers before it looks at the queue
    /// a last time, so a push in between is never missed; a waker, not a
    /// future, so that a waiting stream stores no future of its own.
    ready: futures::task::AtomicWaker,
}

struct SlotQueue {
    items: VecDeque<Arc<Change>>,
    /// Answers were dropped: re-sync to the hub's latest one.
    lagged: bool,
    /// The planner moved the stream to another hub: its feed there (the
    /// old hub pushes nothing after this). Boxed: rare, and every watch
    /// has a slot.
    moved: Option<Box<Feed>>,
    /// The index of the stream's view when it came here (`u64::MAX` until
    /// known): the hub pushes every answer to the slot until one above it
    /// (see [`Routes::fresh`]).
    until: u64,
    /// The store was closed: the stream ends with `Cancelled`.
    closed: bool,
}

/// What a stream takes from its slot at once.
struct Taken {
    items: VecDeque<Arc<Change>>,
    lagged: bool,
    moved: Option<Box<Feed>>,
    closed: bool,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            queue: Mutex::new(SlotQueue {
                items: VecDeque::new(),
                lagged: false,
                moved: None,
                until: u64::MAX,
                closed: false,
            }),
            ready: futures::task::AtomicWaker::new(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, SlotQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stream's view is at `index` now that it came here.
    fn arrived_at(&self, index: u64) {
        self.queue().until = index;
    }

    fn push(&self, change: &Arc<Change>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.items.back().is_some_and(|last| Arc::ptr_eq(last, change)) {
            return; // already queued for another of its keys
        }
        if q.lagged {
            // Already dropping: the re-sync covers this one too.
        } else if q.items.len() >= FAN_OUT_BUFFER {
            q.items = VecDeque::new();
            q.lagged = true;
        } else {
            q.items.push_back(change.clone());
        }
        drop(q);
        self.ready.wake();
    }

    /// Tells the stream it moved to `feed` (after its last push here).
    fn redirect(&self, feed: Feed) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).moved = Some(Box::new(feed));
        self.ready.wake();
    }

    /// Ends the stream with `Cancelled` (the store was closed).
    fn close(&self) {
        self.queue().closed = true;
        self.ready.wake();
    }

    /// Everything queued, whether answers were dropped before it, and
    /// where the stream moved.
    fn take(&self) -> Taken {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        Taken {
            items: std::mem::take(&mut q.items),
            lagged: std::mem::take(&mut q.lagged),
            moved: q.moved.take(),
            closed: q.closed,
        }
    }
}

/// A hub's streams by target, so that an answer wakes only the streams
/// whose target one of its changed keys is in: a key looked up, and each
/// directory above it (a prefix watch reads `dir/…`). Answers that change
/// nothing (a query on an absent key or an empty directory wakes on every
/// KV write: Consul answers it with the index of the whole table) wake
/// nobody. Answers that concern everyone (a first or reset state, a fault)
/// go to every slot.
#[derive(Default)]
struct Routes {
    keys: HashMap<Arc<str>, Slots>,
    dirs: HashMap<Arc<str>, Slots>,
    /// Slots of streams that came here and have not been pushed an answer
    /// newer than their view yet: they get every answer, whatever it
    /// changed, until one is (a stream's baseline can be newer than the
    /// answer the next one's changes are relative to; see
    /// `View::advance_by`).
    fresh: Vec<Arc<Slot>>,
}

/// The slots of one target at a hub. Most targets have one watch, kept
/// inline: a `Vec` cost each watch 48 bytes of heap besides.
enum Slots {
    One(Arc<Slot>),
    Many(Vec<Arc<Slot>>),
}

impl Slots {
    fn push(&mut self, slot: Arc<Slot>) {
        match self {
            Slots::One(first) => *self = Slots::Many(vec![first.clone(), slot]),
            Slots::Many(all) => all.push(slot),
        }
    }

    /// Removes `slot`; whether none is left.
    fn remove(&mut self, slot: &Arc<Slot>) -> bool {
        match self {
            Slots::One(only) => Arc::ptr_eq(only, slot),
            Slots::Many(all) => {
                all.retain(|s| !Arc::ptr_eq(s, slot));
                all.is_empty()
            }
        }
    }

    fn iter(&self) -> std::slice::Iter<'_, Arc<Slot>> {
        match self {
            Slots::One(only) => std::slice::from_ref(only).iter(),
            Slots::Many(all) => all.iter(),
        }
    }
}

impl Routes {
    fn table(&mut self, scope: &Scope) -> &mut HashMap<Arc<str>, Slots> {
        if scope.recurse {
            &mut self.dirs
        } else {
            &mut self.keys
        }
    }

    fn add(&mut self, scope: &Scope, slot: Arc<Slot>) {
        self.fresh.push(slot.clone());
        match self.table(scope).entry(scope.path.clone()) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().push(slot),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Slots::One(slot));
            }
        }
    }

    fn remove(&mut self, scope: &Scope, slot: &Arc<Slot>) {
        if !self.fresh.is_empty() {
            self.fresh.retain(|s| !Arc::ptr_eq(s, slot));
        }
        let table = self.table(scope);
        if let Some(slots) = table.get_mut(&*scope.path)
            && slots.remove(slot)
        {
            table.remove(&*scope.path);
        }
    }

    fn deliver(&mut self, change: &Arc<Change>) {
        if change.fault.is_none() && !self.fresh.is_empty() {
            self.fresh.retain(|slot| {
                slot.push(change);
                change.index <= slot.queue().until
            });
        }
        if change.full.is_some() || change.fault.is_some() {
            for slot in self
                .keys
                .values()
                .chain(self.dirs.values())
                .flat_map(Slots::iter)
            {
                slot.push(change);
            }
            return;
        }
        for (key, _) in &change.changes {
            let key = key.as_str();
            for slot in self.keys.get(key).into_iter().flat_map(Slots::iter) {
                slot.push(change);
            }
            if self.dirs.is_empty() {
                continue;
            }
            // Every directory above the key: "", "a/", "a/b/" for "a/b/c".
            let dirs = std::iter::once(0).chain(key.match_indices('/').map(|(i, _)| i + 1));
            for end in dirs {
                for slot in self.dirs.get(&key[..end]).into_iter().flat_map(Slots::iter) {
                    slot.push(change);
                }
            }
        }
    }
}

impl Channel {
    fn new() -> Channel {
        Channel(Arc::new(Outlet {
            latest: Mutex::new(None),
            routes: Mutex::default(),
        }))
    }

    fn send(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        // Latest first: a stream that registers in between gets this
        // answer as its starting point (`Feed::at`), the slot the next.
        let previous = self.replace(Some(snapshot.clone()));
        let (changes, full, from) = match &previous {
            _ if snapshot.fault.is_some() => (Vec::new(), None, 0),
            Some(p) if p.epoch == snapshot.epoch && p.index > 0 => {
                (delta(&p.entries, &snapshot.entries), None, p.index)
            }
            _ => (Vec::new(), Some(snapshot.entries.clone()), 0),
        };
        let change = Arc::new(Change {
            index: snapshot.index,
            epoch: snapshot.epoch,
            from,
            changes,
            full,
            fault: snapshot.fault.clone(),
            outages: snapshot.outages,
            last_fault: snapshot.last_fault.clone(),
        });
        self.routes().deliver(&change);
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.0.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `latest` the hub's latest answer; the one it replaces.
    fn replace(&self, latest: Option<Arc<Snapshot>>) -> Option<Arc<Snapshot>> {
        let mut slot = self.0.latest.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *slot, latest)
    }

    fn current(&self) -> Option<Arc<Snapshot>> {
        let latest = self.0.latest.lock().unwrap_or_else(|p| p.into_inner());
        latest.clone()
    }
}

/// Where a stream is served: the channel of the hub serving it, and
/// the slot registered there for it when the planner moved the stream
/// (so nothing the hub publishes before the stream looks is lost).
#[derive(Clone)]
struct Feed {
    channel: Channel,
    slot: Arc<Slot>,
    /// The hub's latest answer when the slot was registered (read after,
    /// so the slot holds every answer newer than this one).
    at: Option<Arc<Snapshot>>,
}

impl Feed {
    /// Registers a slot for a watch of `scope` at `channel`'s hub.
    fn of(channel: &Channel, scope: &Scope) -> Feed {
        let slot = Arc::new(Slot::new());
        channel.routes().add(scope, slot.clone());
        Feed {
            slot,
            at: channel.current(),
            channel: channel.clone(),
        }
    }
}

/// The running hubs of one store, the watches they serve, and the close
/// signal.
pub(crate) struct Registry {
    state: Mutex<State>,
    /// This handle's latest puts, for hubs whose query saw only a later
    /// state of the key (see [`intermediate`]).
    recent: Recent,
    /// Whether any hub runs (puts are recorded only then).
    running: std::sync::atomic::AtomicBool,
    /// Most hubs at once: the watches' share of connections.
    limit: usize,
    /// Baseline reads shared by the watches that open at once, per hub.
    baselines: Arc<Batcher<Scope, Option<Scope>, BaseRead>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Every open watch stream, by id.
    members: HashMap<u64, Member>,
    /// The members' scopes, sorted, with how many members have each: what
    /// [`plan`] reads, kept as members come and go rather than sorted
    /// again for every re-plan.
    scopes: BTreeMap<Scope, usize>,
    /// The hubs of the current plan.
    hubs: HashMap<Scope, Hub>,
    /// The hubs whose scope was empty in their last two answers.
    empty: std::collections::HashSet<Scope>,
    /// Whether every watch is served by one hub on the common prefix of
    /// the plan's scopes, because every one of them was empty (see
    /// [`Registry::emptiness`]).
    merged: bool,
    /// When the hubs may merge again.
    merges: MergeClock,
}

/// When the hubs of a registry may merge (see [`Registry::emptiness`]):
/// at least [`MERGE_GAP`] after the last merge, and after a merge that
/// found keys within that gap (its prefix holds keys no watch covers, so
/// the next merge would likely end at once too), twice the previous gap,
/// up to [`MAX_MERGE_GAP`]. A merged scope whose very first answer held
/// keys is never merged into again: keys no watch covers lie under it (the
/// common prefix of a handle's watches can be a short one, even the whole
/// namespace), and each try would read them all. Pure, so that its rules
/// are tested without a clock.
#[derive(Debug, Default)]
struct MergeClock {
    /// When the hubs merged last.
    merged_at: Option<tokio::time::Instant>,
    /// The least time from that merge to the next.
    gap: Duration,
    /// A merged scope that was not empty from its first answer on.
    refused: Option<Scope>,
}

impl MergeClock {
    /// Whether the hubs may merge into `scope` at `now`.
    fn may_merge(&self, scope: &Scope, now: tokio::time::Instant) -> bool {
        self.refused.as_ref() != Some(scope)
            && self
                .merged_at
                .is_none_or(|at| now.duration_since(at) >= self.gap.max(MERGE_GAP))
    }

    fn merged(&mut self, now: tokio::time::Instant) {
        self.merged_at = Some(now);
    }

    /// The merged hub of `scope` found keys at `now`, in its `first`
    /// answer or a later one.
    fn split(&mut self, scope: &Scope, first: bool, now: tokio::time::Instant) {
        if first {
            self.refused = Some(scope.clone());
        }
        let quick = self
            .merged_at
            .is_some_and(|at| now.duration_since(at) < MERGE_GAP);
        self.gap = if quick {
            (self.gap.max(MERGE_GAP) * 2).min(MAX_MERGE_GAP)
        } else {
            MERGE_GAP
        };
    }
}

impl State {
    /// Registers member `id`.
    fn add(&mut self, id: u64, member: Member) {
        *self.scopes.entry(member.scope.clone()).or_default() += 1;
        self.members.insert(id, member);
    }

    /// One member of `scope` fewer (its entry in `members` is gone).
    fn forget(&mut self, scope: &Scope) {
        if let Some(n) = self.scopes.get_mut(scope) {
            *n -= 1;
            if *n == 0 {
                self.scopes.remove(scope);
            }
        }
    }
}

/// One watch stream, as the planner sees it.
struct Member {
    /// What it watches.
    scope: Scope,
    /// The hub serving it now.
    hub: Scope,
    /// Its slot there (the stream learns of a move through it).
    slot: Arc<Slot>,
}

/// A running blocking loop.
struct Hub {
    tx: Channel,
    task: tokio::task::AbortHandle,
    /// How many members it serves (it stops when none is left).
    members: usize,
}

impl Hub {
    /// Stops the hub, which no watch needs any more (each moved or left).
    fn retire(&self) {
        // Dropping the task drops its in-flight request: the connection
        // closes and the query ends on the agent.
        self.task.abort();
        // Streams that moved keep this channel until they next poll (and
        // learn where they went): free what it holds now, not then. They
        // need neither: the routes serve nobody any more, and a moved
        // stream takes its state from its new hub.
        *self.tx.routes() = Routes::default();
        self.tx.replace(None);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // The store is gone: end every stream, then every query.
        for hub in self.state().hubs.values() {
            let fault = Fault {
                kind: ErrorKind::Cancelled,
                message: "the store was dropped".into(),
            };
            let outages = hub.tx.current().map_or(0, |s| s.outages) + 1;
            publish_fault(&hub.tx, fault, outages);
            hub.task.abort();
        }
    }
}

impl Registry {
    /// A registry whose hubs stay within `limit` blocking queries.
    pub(crate) fn new(limit: usize) -> Registry {
        Registry {
            state: Mutex::new(State::default()),
            recent: Recent::default(),
            running: std::sync::atomic::AtomicBool::new(false),
            limit: limit.max(1),
            baselines: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the state whole before it can panic (inserts,
        // removals, channel sends), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any watch runs.
    pub(crate) fn active(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a put this handle made (its committed entry).
    pub(crate) fn local_put(&self, pair: KvPair) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT_PUTS {
            recent.pop_front();
        }
        recent.push_back(pair);
    }

    /// Running hubs (blocking loops).
    pub(crate) fn len(&self) -> usize {
        self.state().hubs.len()
    }

    /// Ends every open stream with `Cancelled`.
    pub(crate) fn close(&self) {
        // Each open stream's current slot (a stream that moved finds it
        // after the move).
        for member in self.state().members.values() {
            member.slot.close();
        }
    }

    /// Registers a watch of `scope` at the hub that serves it.
    ///
    /// O(1) in the number of watches unless a re-plan is needed: a watch
    /// that a running query covers joins it, one that none covers gets a
    /// query of its own while the bound allows; only a watch that neither
    /// can serve re-plans (O(watches)), and the plan's scopes then cover
    /// most of those that follow, so N watches cost far fewer than N
    /// re-plans.
    ///
    /// Returns the watch's id, its feed, and the scope of the hub serving
    /// it now (its baseline is read with that hub's other new watches).
    fn join(&self, inner: &Arc<Inner>, scope: Scope) -> (u64, Feed, Scope) {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        self.running
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some((cover, hub)) = state.hubs.iter_mut().find(|(c, _)| c.covers(&scope)) {
            hub.members += 1;
            let feed = Feed::of(&hub.tx, &scope);
            let hub = cover.clone();
            state.add(
                id,
                Member {
                    scope,
                    hub: hub.clone(),
                    slot: feed.slot.clone(),
                },
            );
            return (id, feed, hub);
        }
        // While more watches than the bound are open, the plan can change
        // with each join: new hubs settle (see `HUB_SETTLE`).
        let settle = state.members.len() > self.limit;
        if state.hubs.len() < self.limit
            && let Some(hub) = self.start_hub(inner, &scope, settle)
        {
            let feed = Feed::of(&hub.tx, &scope);
            state.hubs.insert(scope.clone(), Hub { members: 1, ..hub });
            state.add(
                id,
                Member {
                    hub: scope.clone(),
                    scope: scope.clone(),
                    slot: feed.slot.clone(),
                },
            );
            return (id, feed, scope);
        }
        // A slot of no hub yet: the plan right below routes the watch.
        let slot = Arc::new(Slot::new());
        state.add(
            id,
            Member {
                scope: scope.clone(),
                hub: scope.clone(),
                slot: slot.clone(),
            },
        );
        // A target the merged hub does not cover: back to the full plan.
        state.merged = false;
        let moved = self.replan(&mut state, inner, Some(id), settle);
        let hub = state.members.get(&id).map_or(scope, |m| m.hub.clone());
        // No plan without a runtime: a channel nobody feeds until a later
        // re-plan moves the watch (through `slot`).
        let feed = moved.unwrap_or_else(|| Feed {
            channel: Channel::new(),
            slot,
            at: None,
        });
        (id, feed, hub)
    }

    /// Unregisters a watch; a hub nobody needs any more stops at once.
    fn leave(&self, inner: &Arc<Inner>, id: u64) {
        let mut state = self.state();
        let Some(gone) = state.members.remove(&id) else {
            return;
        };
        state.forget(&gone.scope);
        if let Some(hub) = state.hubs.get(&gone.hub) {
            hub.tx.routes().remove(&gone.scope, &gone.slot);
        }
        let orphaned = match state.hubs.get_mut(&gone.hub) {
            Some(hub) => {
                hub.members = hub.members.saturating_sub(1);
                hub.members == 0
            }
            None => false,
        };
        if state.members.len() <= self.limit {
            // Few watches left: each may get its own, narrower query.
            state.merged = false;
            self.replan(&mut state, inner, None, false);
        } else if orphaned && let Some(hub) = state.hubs.remove(&gone.hub) {
            hub.retire();
        }
    }

    /// Starts the blocking loop of `scope` (none without a runtime: a
    /// stream dropped outside one; the next join or leave inside one
    /// re-plans).
    /// With `settle`, the hub waits [`HUB_SETTLE`] before it blocks.
    fn start_hub(&self, inner: &Arc<Inner>, scope: &Scope, settle: bool) -> Option<Hub> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let tx = Channel::new();
        let task = runtime
            .spawn(run_hub(
                Arc::downgrade(inner),
                scope.clone(),
                tx.clone(),
                self.recent.clone(),
                settle,
            ))
            .abort_handle();
        Some(Hub {
            tx,
            task,
            members: 0,
        })
    }

    /// Brings the hubs in line with the plan for the current watches:
    /// starts the hubs it adds, moves each watch to the hub covering it
    /// (`fresh` is routed whether or not its hub changed: its feed is
    /// returned), stops the rest.
    /// New hubs `settle` first (see [`HUB_SETTLE`]).
    fn replan(
        &self,
        state: &mut State,
        inner: &Arc<Inner>,
        fresh: Option<u64>,
        settle: bool,
    ) -> Option<Feed> {
        let limit = if state.merged { 1 } else { self.limit };
        let plan = plan(state.scopes.keys(), limit);
        for scope in &plan {
            if !state.hubs.contains_key(scope)
                && let Some(hub) = self.start_hub(inner, scope, settle)
            {
                state.hubs.insert(scope.clone(), hub);
            }
        }
        for hub in state.hubs.values_mut() {
            hub.members = 0;
        }
        let mut fresh_feed = None;
        let State { members, hubs, .. } = state;
        for (id, m) in members.iter_mut() {
            let Some(cover) = plan.iter().find(|c| c.covers(&m.scope)) else {
                continue;
            };
            let moving = *cover != m.hub || fresh == Some(*id);
            if moving && let Some(old) = hubs.get(&m.hub) {
                old.tx.routes().remove(&m.scope, &m.slot);
            }
            let Some(hub) = hubs.get_mut(cover) else {
                continue;
            };
            hub.members += 1;
            if moving {
                let feed = Feed::of(&hub.tx, &m.scope);
                m.hub = cover.clone();
                let old = std::mem::replace(&mut m.slot, feed.slot.clone());
                if fresh == Some(*id) {
                    // Its stream does not exist yet: `join` hands it over.
                    fresh_feed = Some(feed);
                } else {
                    // The stream applies what the old slot holds, then
                    // moves (see `Stream::receive`).
                    old.redirect(feed);
                }
            }
        }
        self.running.store(
            !state.members.is_empty(),
            std::sync::atomic::Ordering::Relaxed,
        );
        state.hubs.retain(|scope, hub| {
            let keep = plan.contains(scope);
            if !keep {
                hub.retire();
            }
            keep
        });
        let State { empty, hubs, .. } = state;
        empty.retain(|scope| hubs.contains_key(scope));
        fresh_feed
    }

    /// Hub `scope` found its scope empty in two answers in a row (`empty`)
    /// or found keys in it.
    ///
    /// Consul answers a query on an absent key or an empty directory with
    /// the index of the whole KV table, and ends it at any write in the
    /// subtree of the deepest node of its radix tree that the query's path
    /// reaches (seen here: with only `m/zz` under `m/`, writes of `m/zy`
    /// end a query on the empty `m/a` and writes of `other/…` do not; with
    /// nothing under `m/`, writes anywhere under the namespace do); each
    /// then waits [`EMPTY_PAUSE`]. Watches on keys that do not
    /// exist yet (a plan of up to `max_watch_conns` empty scopes) would
    /// cost the agent up to that many requests per pause while anything is
    /// written. So once every hub is empty the hubs merge into one, on the
    /// common prefix of all the watches' targets: one request per pause.
    /// When that hub finds a key, the plan is split again (its hubs start
    /// from their own first answer, so nothing written meanwhile is missed;
    /// the streams move as in any re-plan). Merges are at least
    /// [`MERGE_GAP`] apart, longer after a merge that found keys soon, and
    /// never again into a scope that held keys from its first answer on
    /// (see [`MergeClock`]).
    ///
    /// `first`: this is the hub's first answer.
    fn emptiness(&self, inner: &Arc<Inner>, scope: &Scope, empty: bool, first: bool) {
        let mut state = self.state();
        if !state.hubs.contains_key(scope) {
            return; // retired meanwhile
        }
        let now = tokio::time::Instant::now();
        if !empty {
            state.empty.remove(scope);
            if state.merged {
                state.merged = false;
                state.merges.split(scope, first, now);
                tracing::debug!(path = %scope.path, "consul watch: the merged query found keys; splitting it");
                self.replan(&mut state, inner, None, false);
            }
            return;
        }
        state.empty.insert(scope.clone());
        if state.merged
            || state.hubs.len() < 2
            || !state.hubs.keys().all(|s| state.empty.contains(s))
        {
            return;
        }
        // The scope the merge would read: what `plan` makes of all the
        // targets with a bound of 1, their common prefix, which is that of
        // the first and the last (they are sorted).
        let (Some((first, _)), Some((last, _))) = (
            state.scopes.first_key_value(),
            state.scopes.last_key_value(),
        ) else {
            return;
        };
        let both = [first, last];
        let ends = if first == last { &both[..1] } else { &both[..] };
        let into = Group::new(ends).scope();
        if state.merges.may_merge(&into, now) {
            tracing::debug!(
                queries = state.hubs.len(),
                "consul watch: every query is empty; merging them into one"
            );
            state.merged = true;
            state.merges.merged(now);
            self.replan(&mut state, inner, None, false);
        }
    }
}

/// The scopes to run blocking queries on for watches of `targets`: at most
/// `limit`, each target covered by one of them.
///
/// Consul's `?recurse` reads every key that starts with a string, not only
/// a directory, so the planner works on a trie of the targets' paths: it
/// starts from one scope, the longest common prefix of all paths, and
/// repeatedly splits the scope holding the most targets into one scope per
/// next character (each the longest common prefix of its targets; a lone
/// key becomes an exact key read, a lone prefix its own directory), while
/// the total stays within `limit`. A scope whose prefix is itself a watched
/// directory is not split (that watch needs the whole directory).
///
/// Why split the busiest scope first: a scope's query returns every pair
/// under it on each change, and writes in quick succession under one scope
/// can land while its query is being re-sent (one round trip), so that a
/// watch sees only their result. Spreading targets over as many scopes as
/// the bound allows keeps answers small and makes it unlikely that two
/// writes race one query.
fn plan<'a>(targets: impl Iterator<Item = &'a Scope>, limit: usize) -> Vec<Scope> {
    // Borrowed, not cloned: a re-plan of 10,000 watches splits groups of
    // thousands several times over. The registry hands them sorted and
    // unique (`State::scopes`); sorting is the fallback.
    let mut all: Vec<&Scope> = targets.collect();
    if !all.is_sorted() {
        all.sort_unstable();
    }
    all.dedup();
    if all.is_empty() {
        return Vec::new();
    }
    let mut groups = vec![Group::new(&all)];
    loop {
        let mut order: Vec<usize> = (0..groups.len())
            .filter(|&i| groups[i].splittable())
            .collect();
        order.sort_by_key(|&i| std::cmp::Reverse(groups[i].targets.len()));
        let mut done = true;
        for i in order {
            let parts = groups[i].split();
            if groups.len() - 1 + parts.len() <= limit.max(1) {
                groups.swap_remove(i);
                groups.extend(parts);
                done = false;
                break;
            }
        }
        if done {
            break;
        }
    }
    let mut scopes: Vec<Scope> = groups.iter().map(Group::scope).collect();
    scopes.sort();
    scopes
}

/// Targets that share one scope (a run of the sorted targets), and their
/// longest common prefix.
struct Group<'a> {
    prefix: &'a str,
    targets: &'a [&'a Scope],
}

impl<'a> Group<'a> {
    /// `targets` sorted: their common prefix is that of the first and the
    /// last (whatever lies between shares it), so this is O(prefix), not
    /// O(targets): a re-plan of 10,000 watches does it a few hundred times.
    fn new(targets: &'a [&'a Scope]) -> Group<'a> {
        let (first, last) = match targets {
            [] => ("", ""),
            [one, ..] => (&*one.path, &*targets[targets.len() - 1].path),
        };
        Group {
            prefix: common_prefix(first, last),
            targets,
        }
    }

    /// One target alone is read as itself; several, by their prefix.
    fn scope(&self) -> Scope {
        match self.targets {
            [one] => (*one).clone(),
            _ => Scope {
                path: self.prefix.into(),
                recurse: true,
            },
        }
    }

    fn splittable(&self) -> bool {
        self.targets.len() > 1
            && !self
                .targets
                .iter()
                .any(|t| t.recurse && &*t.path == self.prefix)
    }

    /// The targets by the character after the prefix (a key equal to the
    /// prefix has none: it is a group of its own). Sorted targets that
    /// share the prefix are sorted by that character too, so each group is
    /// a run of them.
    fn split(&self) -> Vec<Group<'a>> {
        let next = |t: &Scope| t.path[self.prefix.len()..].chars().next();
        let mut out = Vec::new();
        let mut rest = self.targets;
        while let [first, ..] = rest {
            let c = next(first);
            let run = rest.iter().take_while(|t| next(t) == c).count();
            let (this, tail) = rest.split_at(run);
            out.push(Group::new(this));
            rest = tail;
        }
        out
    }
}

/// The longest common prefix of `a` and `b`, in whole characters.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    &a[..end]
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

/// One answer, undecoded: the JSON body (`None`: 404, nothing there) and
/// `X-Consul-Index`.
type Answer = (Option<Bytes>, u64);

/// How many answers may wait for decoding while the query is already
/// parked again; a full queue pauses the query (never drops an answer).
const ANSWER_QUEUE: usize = 16;

/// One entry of a KV answer, borrowed from the body: only what a stream
/// needs (values are decoded only for entries that changed).
#[derive(Deserialize)]
struct RawPair<'a> {
    #[serde(rename = "Key", borrow)]
    key: Cow<'a, str>,
    #[serde(rename = "Value", borrow, default)]
    value: Option<Cow<'a, str>>,
    #[serde(rename = "CreateIndex")]
    create_index: u64,
    #[serde(rename = "ModifyIndex")]
    modify_index: u64,
}

/// Decodes an answer, reusing the entries of `prev` whose indexes did not
/// change: a wide scope answers with every pair below it on each change,
/// and only the changed ones need their values decoded.
fn decode(body: Option<&[u8]>, prev: &BTreeMap<Key, KvPair>) -> Result<BTreeMap<Key, KvPair>> {
    use base64::Engine;
    let Some(body) = body else {
        return Ok(BTreeMap::new());
    };
    let raw: Vec<RawPair<'_>> = serde_json::from_slice(body)
        .map_err(|e| error::internal("watch: unexpected reply from consul", e))?;
    // Consul answers in key order, the order of `prev` too: one walk over
    // both finds each unchanged entry without a lookup, and the new map is
    // built from a sorted list at once (a wide scope answers with every
    // pair below it on each change, so this is the hot path of a put).
    // Any other order costs a lookup per key out of place.
    let mut old = prev.iter().peekable();
    let mut sorted: Vec<(Key, KvPair)> = Vec::with_capacity(raw.len());
    for r in raw {
        while old.next_if(|(k, _)| k.as_str() < r.key.as_ref()).is_some() {}
        let known = match old.peek() {
            Some(&(k, p)) if k.as_str() == r.key.as_ref() => Some((k, p)),
            // New, or out of order: look it up.
            _ => prev.get_key_value(r.key.as_ref()),
        };
        if let Some((k, p)) = known
            && p.mod_revision == r.modify_index
            && p.create_revision == r.create_index
        {
            sorted.push((k.clone(), p.clone()));
            continue;
        }
        // Names no anykv client could write are skipped, as everywhere.
        let Some(key) = Key::from_backend(&r.key) else {
            continue;
        };
        let value = match r.value {
            None => Bytes::new(),
            Some(b64) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| error::internal(format!("value of {key} is not base64"), e))?,
            ),
        };
        sorted.push((
            key.clone(),
            KvPair {
                key,
                value,
                version: Version::new(r.modify_index),
                create_revision: r.create_index,
                mod_revision: r.modify_index,
            },
        ));
    }
    Ok(sorted.into_iter().collect())
}

/// One step of the loop: a blocking query from `cursor.ask`, and, if its
/// answer cannot be trusted, the `consistent` re-read that replaces it.
/// `Ok(None)`: nothing to publish.
async fn query(store: &Inner, scope: &Scope, cursor: &mut Cursor) -> Result<Option<Answer>> {
    let mode = ReadMode::blocking(cursor.ask, BLOCK_WAIT).for_watch();
    let slack = store.http.settings().timeout;
    let deadline = blocking_deadline(BLOCK_WAIT, slack);
    // Bound the request ourselves too: a hung agent must not stall the loop.
    let answer = tokio::time::timeout(deadline, store.read_body(&scope.path, scope.recurse, mode))
        .await
        .map_err(|_| Error::Timeout {
            backend: BACKEND,
            operation: "watch",
            after: deadline,
        })??;
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
            let confirmed = store
                .read_body(&scope.path, scope.recurse, ReadMode::CONSISTENT.for_watch())
                .await?;
            match cursor.on_answer(confirmed.1, true) {
                Step::Wait => Ok(None),
                Step::Publish { .. } | Step::Confirm => Ok(Some(confirmed)),
            }
        }
    }
}

/// What the query loop hands to the hub's publisher, in order.
enum Msg {
    Answer {
        answer: Answer,
        index: u64,
        epoch: u64,
        outages: u64,
        last_fault: Option<Fault>,
    },
    Fault {
        fault: Fault,
        outages: u64,
    },
}

/// The blocking loop of one scope. Runs until the registry aborts it (no
/// watch needs its scope any more) or the store is dropped.
///
/// The query is parked again as soon as an answer's body has arrived;
/// decoding and publishing happen in a second task fed in order. So the
/// time in which the agent holds no query for this scope (and writes in
/// quick succession could be seen only as their result) is one round
/// trip, however wide the scope, as for a single-key query.
async fn run_hub(
    inner: std::sync::Weak<Inner>,
    scope: Scope,
    tx: Channel,
    recent: Recent,
    settle: bool,
) {
    let (queue, answers) = tokio::sync::mpsc::channel(ANSWER_QUEUE);
    // Ends once the queue is drained after this loop ends (abort included).
    tokio::spawn(publish(answers, tx, scope.clone(), recent));
    let mut cursor = Cursor::default();
    let settled = tokio::time::Instant::now() + if settle { HUB_SETTLE } else { Duration::ZERO };
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    let mut outages = 0u64;
    let mut last_fault: Option<Fault> = None;
    // Whether the last answer was empty, and whether the next query waits
    // first (see `EMPTY_PAUSE`).
    let mut empty = false;
    let mut pause = false;
    // What the registry was last told of this scope: `Some(true)` empty,
    // `Some(false)` not (see `Registry::emptiness`).
    let mut told: Option<bool> = None;
    // Whether an answer was published yet.
    let mut answered = false;
    loop {
        if std::mem::take(&mut pause) {
            tokio::time::sleep(EMPTY_PAUSE).await;
        }
        let Some(store) = inner.upgrade() else {
            // The store is gone: nothing can answer any more.
            let fault = Fault {
                kind: ErrorKind::Cancelled,
                message: "the store was dropped".into(),
            };
            let _ = queue
                .send(Msg::Fault {
                    fault,
                    outages: outages + 1,
                })
                .await;
            return;
        };
        if tokio::time::Instant::now() < settled {
            // A young hub does not query yet: see `HUB_SETTLE`. Its
            // streams have their baselines; its first answer brings them
            // what changed since.
            drop(store);
            tokio::time::sleep_until(settled).await;
            continue;
        }
        let result = query(&store, &scope, &mut cursor).await;
        drop(store);
        let mut tell = None;
        let msg = match result {
            Ok(None) => {
                backoff = FIRST_BACKOFF;
                failing = false;
                None
            }
            Ok(Some(answer)) => {
                backoff = FIRST_BACKOFF;
                failing = false;
                pause = empty && answer.0.is_none();
                empty = answer.0.is_none();
                // Empty twice in a row, or keys: news for the planner
                // (after this answer is queued, below).
                let now = if pause {
                    Some(true)
                } else {
                    (!empty).then_some(false)
                };
                if now.is_some() && now != told {
                    told = now;
                    tell = now.map(|empty| (empty, !answered));
                }
                answered = true;
                Some(Msg::Answer {
                    answer,
                    index: cursor.published,
                    epoch: cursor.epoch,
                    outages,
                    last_fault: last_fault.clone(),
                })
            }
            Err(e) => {
                let fault = Fault::from_error(&e);
                let delay = if fault.is_fatal() {
                    FATAL_BACKOFF
                } else {
                    backoff
                };
                let mut msg = None;
                if !failing || fault.is_fatal() {
                    tracing::debug!(error = %e, path = %scope.path, "consul watch query failed; retrying");
                    outages += 1;
                    last_fault = Some(fault.clone());
                    msg = Some(Msg::Fault { fault, outages });
                }
                failing = true;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                cursor.on_failure();
                if let Some(m) = msg.take()
                    && queue.send(m).await.is_err()
                {
                    return;
                }
                tokio::time::sleep(delay).await;
                None
            }
        };
        if let Some(m) = msg
            && queue.send(m).await.is_err()
        {
            return;
        }
        if let Some((empty, first)) = tell.take()
            && let Some(store) = inner.upgrade()
        {
            // May retire this very hub (its task then ends at its next
            // await): the answer is queued for its streams already.
            store.watches.emptiness(&store, &scope, empty, first);
        }
    }
}

/// How many of its own puts a handle remembers for its watches.
const RECENT_PUTS: usize = 4096;

type Recent = Arc<Mutex<VecDeque<KvPair>>>;

/// The states between two answers that this handle's own puts prove.
///
/// A shared query can miss states: writes that land while it is being
/// re-sent are seen only as their result (a put then a delete of one key
/// shows as nothing new). Puts this handle made are known exactly, though
/// (key, value, index): for each such put in `scope` with an index between
/// the previous answer's (`from`) and the new one's that the new answer no
/// longer shows, this returns a state at the put's index: the previous
/// state with the new answer's entries up to that index and the put. So
/// streams see the put, in revision order, before what the new answer
/// shows after it (deletes keep the new answer's index, as always).
fn intermediate(
    recent: &Recent,
    scope: &Scope,
    from: u64,
    prev: &Entries,
    new: &BTreeMap<Key, KvPair>,
    to: u64,
) -> Vec<(u64, Entries)> {
    let mut missed: Vec<KvPair> = {
        let recent = recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|p| p.mod_revision > from && p.mod_revision < to)
            .filter(|p| {
                scope.covers(&Scope {
                    path: p.key.as_str().into(),
                    recurse: false,
                })
            })
            .filter(|p| new.get(&p.key).map(|n| n.mod_revision) != Some(p.mod_revision))
            .cloned()
            .collect()
    };
    if missed.is_empty() {
        // The usual case: no copy of the (possibly wide) state.
        return Vec::new();
    }
    missed.sort_by_key(|p| p.mod_revision);
    let mut states = Vec::new();
    let mut state: BTreeMap<Key, KvPair> = (**prev).clone();
    for put in missed {
        let at = put.mod_revision;
        for (k, p) in new.iter().filter(|(_, p)| p.mod_revision <= at) {
            state.insert(k.clone(), p.clone());
        }
        state.insert(put.key.clone(), put);
        states.push((at, Arc::new(state.clone())));
    }
    states
}

/// The hub's publisher: decodes answers in order and publishes them.
async fn publish(
    mut answers: tokio::sync::mpsc::Receiver<Msg>,
    tx: Channel,
    scope: Scope,
    recent: Recent,
) {
    let mut entries: Entries = Entries::default();
    let mut last: Option<(u64, u64)> = None;
    while let Some(msg) = answers.recv().await {
        match msg {
            Msg::Fault { fault, outages } => publish_fault(&tx, fault, outages),
            Msg::Answer {
                answer,
                index,
                epoch,
                outages,
                last_fault,
            } => match decode(answer.0.as_deref(), &entries) {
                Ok(decoded) => {
                    if let Some((from, e)) = last
                        && e == epoch
                    {
                        for (at, state) in
                            intermediate(&recent, &scope, from, &entries, &decoded, index)
                        {
                            tx.send(Snapshot {
                                index: at,
                                epoch,
                                entries: state,
                                fault: None,
                                outages,
                                last_fault: last_fault.clone(),
                            });
                        }
                    }
                    last = Some((index, epoch));
                    entries = Arc::new(decoded);
                    tx.send(Snapshot {
                        index,
                        epoch,
                        entries: entries.clone(),
                        fault: None,
                        outages,
                        last_fault,
                    });
                }
                Err(e) => {
                    // A body that is not Consul's JSON: reported like a
                    // failed query; the next answer replaces it.
                    let fault = Fault::from_error(&e);
                    publish_fault(&tx, fault, outages + 1);
                }
            },
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

fn publish_fault(tx: &Channel, fault: Fault, outages: u64) {
    let (index, epoch, entries) = match tx.current() {
        Some(s) => (s.index, s.epoch, s.entries.clone()),
        None => (0, 0, Entries::default()),
    };
    tx.send(Snapshot {
        index,
        epoch,
        entries,
        fault: Some(fault.clone()),
        outages,
        last_fault: Some(fault),
    });
}

/// A baseline read's outcome, shared by the watches of its batch.
type BaseRead = std::result::Result<(Entries, u64), Fault>;

impl Registry {
    /// A `consistent` read of `own` (the watch's target) that started after
    /// this call, shared with the other watches of hub `hub` that ask
    /// meanwhile: at most one read per hub runs; the watches that ask
    /// while it runs share the next one, which reads the narrowest scope
    /// covering all their targets (one alone reads its own target; keys
    /// opened together, usually neighbours, their common prefix, not the
    /// hub's whole scope). So opening many watches at once costs a few
    /// small reads per hub rather than one each, and every baseline is
    /// still read after its `watch` was called.
    async fn baseline(
        &self,
        inner: &Arc<Inner>,
        hub: Scope,
        own: &Scope,
    ) -> Result<(Entries, u64)> {
        let hub_scope = hub.clone();
        let read = self
            .baselines
            .join(
                hub,
                |_| false,
                |reads| {
                    *reads = Some(match reads.take() {
                        Some(reads) => reads.with(own),
                        None => own.clone(),
                    });
                },
                || {
                    let inner = inner.clone();
                    move |reads: Option<Scope>| {
                        read_baseline(inner.clone(), hub_scope.clone(), reads)
                    }
                },
            )
            .await
            .map(|((), read)| read);
        match read.as_deref() {
            Some(Ok(read)) => Ok(read.clone()),
            Some(Err(fault)) => Err(match fault.kind {
                // The read's own deadline passed.
                ErrorKind::Timeout => Error::Timeout {
                    backend: BACKEND,
                    operation: "watch",
                    after: inner.http.settings().timeout,
                },
                _ => fault.to_error(),
            }),
            None => Err(ended()),
        }
    }
}

/// The baseline read of a batch of watches of hub `hub` that asked for
/// `reads` (the narrowest scope covering their targets).
async fn read_baseline(inner: Arc<Inner>, hub: Scope, reads: Option<Scope>) -> BaseRead {
    // Never wider than the hub's scope (it covers every member).
    let scope = match &reads {
        Some(reads) if hub.covers(reads) => reads,
        _ => &hub,
    };
    match inner
        .read_body(&scope.path, scope.recurse, ReadMode::CONSISTENT)
        .await
    {
        Ok((body, index)) => decode(body.as_deref(), &BTreeMap::new())
            .map(|entries| (Arc::new(entries), index))
            .map_err(|e| Fault::from_error(&e)),
        Err(e) => Err(Fault::from_error(&e)),
    }
}

/// Opens a watch stream: a consistent baseline read, then the hub's snapshots.
pub(crate) async fn watch(inner: &Arc<Inner>, target: Target, start: Start) -> Result<WatchStream> {
    let scope = Scope::of(&target);
    // Subscribe first, read second: a snapshot published in between is
    // either older than the baseline (skipped) or newer (diffed).
    let (id, joined, hub) = inner.watches.join(inner, scope.clone());
    let member = Membership {
        inner: Arc::downgrade(inner),
        id,
    };
    let Feed {
        slot,
        channel: feed,
        at: _,
    } = joined;
    let (epoch, outages) = feed.current().map_or((0, 0), |s| (s.epoch, s.outages));
    let (entries, index) = inner.watches.baseline(inner, hub, &scope).await?;
    let view: ViewMap = in_target(&entries, &target)
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect();
    drop(entries);
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
    slot.arrived_at(index);
    let stream = Stream {
        _member: member,
        feed,
        slot,
        view: View {
            target,
            entries: view,
            index,
            epoch,
        },
        outages,
        pending,
        done: false,
    };
    Ok(Box::pin(stream))
}

/// The entries a stream has delivered, in key order: a sorted vector while
/// there are few (a key watch holds at most one, and a `BTreeMap` node
/// costs about 1 KiB however few entries it holds), a map beyond.
#[derive(Debug)]
enum ViewMap {
    Few(Vec<KvPair>),
    Many(BTreeMap<Key, KvPair>),
}

/// Most entries a [`ViewMap`] keeps in a vector.
const FEW: usize = 8;

impl FromIterator<(Key, KvPair)> for ViewMap {
    fn from_iter<I: IntoIterator<Item = (Key, KvPair)>>(iter: I) -> ViewMap {
        let mut few = Vec::new();
        let mut iter = iter.into_iter();
        for (_, p) in iter.by_ref() {
            few.push(p);
            if few.len() > FEW {
                break;
            }
        }
        if few.len() <= FEW {
            few.sort_by(|a, b| a.key.cmp(&b.key));
            few.dedup_by(|a, b| a.key == b.key);
            few.shrink_to_fit();
            return ViewMap::Few(few);
        }
        ViewMap::Many(
            few.into_iter()
                .map(|p| (p.key.clone(), p))
                .chain(iter)
                .collect(),
        )
    }
}

impl ViewMap {
    fn get(&self, key: &Key) -> Option<&KvPair> {
        match self {
            ViewMap::Few(v) => v.binary_search_by(|p| p.key.cmp(key)).ok().map(|i| &v[i]),
            ViewMap::Many(m) => m.get(key),
        }
    }

    fn insert(&mut self, pair: KvPair) {
        match self {
            ViewMap::Few(v) => match v.binary_search_by(|p| p.key.cmp(&pair.key)) {
                Ok(i) => v[i] = pair,
                Err(_) if v.len() >= FEW => {
                    let mut m: BTreeMap<Key, KvPair> =
                        v.drain(..).map(|p| (p.key.clone(), p)).collect();
                    m.insert(pair.key.clone(), pair);
                    *self = ViewMap::Many(m);
                }
                Err(i) => v.insert(i, pair),
            },
            ViewMap::Many(m) => {
                m.insert(pair.key.clone(), pair);
            }
        }
    }

    fn remove(&mut self, key: &Key) -> Option<KvPair> {
        match self {
            ViewMap::Few(v) => v
                .binary_search_by(|p| p.key.cmp(key))
                .ok()
                .map(|i| v.remove(i)),
            ViewMap::Many(m) => m.remove(key),
        }
    }

    fn values(&self) -> Box<dyn Iterator<Item = &KvPair> + '_> {
        match self {
            ViewMap::Few(v) => Box::new(v.iter()),
            ViewMap::Many(m) => Box::new(m.values()),
        }
    }
}

/// What a stream's consumer has been told: the state it was last brought
/// to, the index and epoch of that state.
struct View {
    target: Target,
    /// The entries of the target only.
    entries: ViewMap,
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
        self.entries = in_target(entries, &self.target)
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        self.index = index;
        self.epoch = epoch;
        events
    }

    /// Like [`advance`](Self::advance), from the changes since the hub's
    /// previous answer. The view is at least as new as that answer (older
    /// answers are skipped by index), so keys not among the changes are
    /// as the view has them.
    ///
    /// `from` is the index of the answer the changes are relative to. A
    /// view newer than it (a baseline read after that answer) may hold a
    /// key that came after it and is gone by `index`, which the changes do
    /// not name: any key of the view written after `from` would be among
    /// the changes if it still existed, so one that is not is deleted.
    fn advance_by(
        &mut self,
        index: u64,
        epoch: u64,
        from: u64,
        changes: &[(Key, Option<KvPair>)],
    ) -> Vec<Event> {
        if epoch == self.epoch && index <= self.index {
            return Vec::new();
        }
        let gone: Vec<Key> = if from < self.index {
            let named: std::collections::HashSet<&str> =
                changes.iter().map(|(k, _)| k.as_str()).collect();
            self.entries
                .values()
                .filter(|p| p.mod_revision > from && !named.contains(p.key.as_str()))
                .map(|p| p.key.clone())
                .collect()
        } else {
            Vec::new()
        };
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (k, new) in changes.iter().filter(|(k, _)| self.target.matches(k)) {
            match new {
                Some(p) => {
                    let old = self.entries.get(k);
                    if old.map(|o| o.mod_revision) != Some(p.mod_revision) {
                        puts.push(Event::Put {
                            kv: p.clone(),
                            prev: old.cloned(),
                        });
                        self.entries.insert(p.clone());
                    }
                }
                None => {
                    if self.entries.remove(k).is_some() {
                        deletes.push(Event::Delete {
                            key: k.clone(),
                            revision: index.max(self.index),
                        });
                    }
                }
            }
        }
        for k in gone {
            if self.entries.remove(&k).is_some() {
                deletes.push(Event::Delete {
                    key: k,
                    revision: index.max(self.index),
                });
            }
        }
        puts.sort_by_key(Event::revision);
        puts.extend(deletes);
        self.index = index;
        self.epoch = epoch;
        puts
    }
}

/// A stream's registration: dropping the stream leaves the registry at
/// once, which re-plans (a hub nobody needs stops with its query).
struct Membership {
    inner: std::sync::Weak<Inner>,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.watches.leave(&inner, self.id);
        }
    }
}

/// One watch stream's state.
///
/// Fan-out: the hub serving the stream pushes into the stream's [`Slot`]
/// only the answers that change a key of its target (or concern every
/// stream: a first or reset state, a fault), so an answer costs the
/// streams it does not touch nothing, not even a wake-up. The stream
/// applies each answer's changes to its own view, restricted to its
/// target. A stream that is not read holds at most its view and
/// [`FAN_OUT_BUFFER`] queued answers (shared with the other streams they
/// were routed to): the hub never waits for it, and past that bound the
/// slot drops them; when read again the stream re-syncs to the hub's
/// latest answer and emits the differences (Converge).
struct Stream {
    _member: Membership,
    /// The channel of the hub serving this stream, replaced when the
    /// planner moves the stream to another hub.
    feed: Channel,
    /// This stream's mailbox at that hub (which also says where the
    /// stream moved).
    slot: Arc<Slot>,
    view: View,
    /// Outages of the hub this stream has reported (or that predate it).
    outages: u64,
    pending: VecDeque<Result<Event>>,
    done: bool,
}

/// Polled by hand rather than built from an `async` block: a waiting
/// stream then holds its state and nothing else (a boxed `unfold` of an
/// `async` step also holds the step's future, about three times the
/// state), which is most of a watch's memory when 10,000 wait.
impl futures::Stream for Stream {
    type Item = Result<Event>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Event>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                if this.pending.is_empty() {
                    // A waiting stream keeps no buffer (a few hundred
                    // bytes each, times 10,000 watches).
                    this.pending = VecDeque::new();
                }
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.receive() {
                continue;
            }
            // Register, then look once more: a push between the look above
            // and the registration would otherwise wake nobody.
            this.slot.ready.register(cx.waker());
            if !this.receive() {
                return Poll::Pending;
            }
        }
    }
}

impl Stream {
    /// Applies what the slot holds, and moves if the planner moved the
    /// stream; whether there was anything.
    fn receive(&mut self) -> bool {
        let Taken {
            items,
            lagged,
            moved,
            closed,
        } = self.slot.take();
        if closed {
            self.done = true;
            self.pending.push_back(Err(Error::Cancelled {
                backend: BACKEND,
                message: "the store was closed".into(),
            }));
            return true;
        }
        let any = lagged || moved.is_some() || !items.is_empty();
        if lagged {
            // Fell more than the buffer behind (not read for a while):
            // re-sync to the latest answer (newer than anything queued,
            // which the hub published before it); the diff emits what
            // changed meanwhile.
            tracing::debug!("consul watch: a slow stream skips to the latest answer");
            if let Some(s) = self.feed.current() {
                self.apply(&s);
            }
        } else {
            for c in items {
                self.apply_change(&c);
            }
        }
        if let Some(feed) = moved {
            self.switch(*feed);
        }
        any
    }

    /// Moves to the hub of `feed`. The view stays: indexes of all hubs are
    /// Raft indexes, and a hub's answer at index `i` is the state of its
    /// scope from `i` until it was read, so an answer not above the view's
    /// index shows this target as the view has it. Only the epoch (a hub's
    /// own count of resets) is the new hub's.
    fn switch(&mut self, feed: Feed) {
        self.slot = feed.slot;
        self.feed = feed.channel;
        let (epoch, outages) = feed.at.as_ref().map_or((0, 0), |s| (s.epoch, s.outages));
        self.view.epoch = epoch;
        self.outages = outages;
        // The hub's state when the stream moved, then its answers since.
        if let Some(s) = feed.at {
            self.apply(&s);
        }
        self.slot.arrived_at(self.view.index);
    }

    /// Applies one answer of the slot: its changes, or its whole state.
    fn apply_change(&mut self, c: &Change) {
        if c.outages > self.outages {
            // One error per outage seen, even if it is already over.
            self.outages = c.outages;
            if let Some(fault) = c.fault.as_ref().or(c.last_fault.as_ref()) {
                self.pending.push_back(Err(fault.to_error()));
            }
        }
        if let Some(fault) = &c.fault {
            if fault.is_fatal() {
                self.done = true;
            }
            return;
        }
        let events = match &c.full {
            Some(full) => self.view.advance(c.index, c.epoch, full),
            None if c.epoch == self.view.epoch => {
                self.view.advance_by(c.index, c.epoch, c.from, &c.changes)
            }
            // A reset this stream did not see the state of: re-sync.
            None => match self.feed.current() {
                Some(s) => self.view.advance(s.index, s.epoch, &s.entries),
                None => Vec::new(),
            },
        };
        self.pending.extend(events.into_iter().map(Ok));
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

fn ended() -> Error {
    Error::Backend {
        backend: BACKEND,
        message: "watch loop ended unexpectedly".into(),
        source: None,
    }
}

/// The entries of `map` in `target`: a lookup for a key, a range for a
/// prefix, so that a stream's diff costs what its own target holds, not
/// what the (possibly much wider) hub scope holds.
fn in_target<'a>(
    map: &'a BTreeMap<Key, KvPair>,
    target: &'a Target,
) -> Box<dyn Iterator<Item = (&'a Key, &'a KvPair)> + 'a> {
    match target {
        Target::Key(k) => Box::new(map.get_key_value(k.as_str()).into_iter()),
        Target::Prefix(p) => {
            let dir = p.dir();
            let from = map.range::<str, _>((
                std::ops::Bound::Included(dir.as_str()),
                std::ops::Bound::Unbounded,
            ));
            Box::new(
                from.take_while(move |(k, _)| k.as_str().starts_with(&dir))
                    .filter(move |(k, _)| target.matches(k)),
            )
        }
    }
}

/// The events that turn `old` into `new`, in revision order: puts by their
/// `ModifyIndex`, then deletes at `index` (the answer that showed them).
fn diff(old: &ViewMap, new: &BTreeMap<Key, KvPair>, index: u64, target: &Target) -> Vec<Event> {
    let mut puts: Vec<Event> = in_target(new, target)
        .filter(|(k, p)| old.get(k).map(|o| o.mod_revision) != Some(p.mod_revision))
        .map(|(k, p)| Event::Put {
            kv: p.clone(),
            prev: old.get(k).cloned(),
        })
        .collect();
    puts.sort_by_key(Event::revision);
    let deletes = old
        .values()
        .filter(|p| target.matches(&p.key) && !new.contains_key(&p.key))
        .map(|p| Event::Delete {
            key: p.key.clone(),
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
    fn delta_lists_changed_and_new_keys_in_order_then_the_gone_ones() {
        // `delta` compares indexes only: the values do not matter here.
        let old = state(&[("a", 1), ("b", 2), ("d", 3), ("f", 4)]);
        let new = state(&[("b", 9), ("c", 10), ("d", 3), ("e", 11)]);
        let got: Vec<(String, Option<u64>)> = delta(&old, &new)
            .into_iter()
            .map(|(k, p)| (k.to_string(), p.map(|p| p.mod_revision)))
            .collect();
        let want: Vec<(String, Option<u64>)> = vec![
            ("b".into(), Some(9)),
            ("c".into(), Some(10)),
            ("e".into(), Some(11)),
            ("a".into(), None),
            ("f".into(), None),
        ];
        assert_eq!(got, want);
        assert!(delta(&new, &new).is_empty());
        assert_eq!(delta(&BTreeMap::new(), &new).len(), 4);
        assert_eq!(delta(&new, &BTreeMap::new()).len(), 4);
    }

    #[test]
    fn decode_reuses_unchanged_entries_in_any_order() {
        let prev: BTreeMap<_, _> = [pair("a", "x", 1), pair("b", "y", 2), pair("c", "z", 3)].into();
        // "eA==" is base64 of "x"; c changed; d is new; the answer is not
        // in key order (a key out of place is looked up).
        let body = br#"[
            {"Key":"c","Value":"dw==","CreateIndex":3,"ModifyIndex":7},
            {"Key":"a","Value":"eA==","CreateIndex":1,"ModifyIndex":1},
            {"Key":"b","Value":"eQ==","CreateIndex":2,"ModifyIndex":2},
            {"Key":"d","CreateIndex":8,"ModifyIndex":8}
        ]"#;
        let got = decode(Some(body), &prev).unwrap();
        let summary: Vec<(&str, &[u8], u64)> = got
            .values()
            .map(|p| (p.key.as_str(), p.value.as_ref(), p.mod_revision))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", &b"x"[..], 1),
                ("b", b"y", 2),
                ("c", b"w", 7),
                ("d", b"", 8)
            ]
        );
        // An unchanged entry in order is the previous one, not a copy.
        let key = Key::new("b").unwrap();
        assert_eq!(got[&key].value.as_ptr(), prev[&key].value.as_ptr());
    }

    #[test]
    fn diff_orders_puts_then_deletes() {
        let all = Target::Prefix(Prefix::root());
        let old: BTreeMap<_, _> = [pair("a", "1", 5), pair("b", "1", 6), pair("c", "1", 7)].into();
        let new: BTreeMap<_, _> = [pair("a", "2", 10), pair("c", "1", 7), pair("d", "1", 9)].into();
        let ev = diff(&old.clone().into_iter().collect(), &new, 11, &all);
        let shown: Vec<(String, u64)> = ev
            .iter()
            .map(|e| (e.key().to_string(), e.revision()))
            .collect();
        assert_eq!(shown, [("d".into(), 9), ("a".into(), 10), ("b".into(), 11)]);
        match &ev[1] {
            Event::Put { prev: Some(p), .. } => assert_eq!(&p.value[..], b"1"),
            other => panic!("{other:?}"),
        }
        assert!(diff(&new.clone().into_iter().collect(), &new, 12, &all).is_empty());
    }

    fn key(path: &str) -> Scope {
        Scope {
            path: path.into(),
            recurse: false,
        }
    }

    fn dir(path: &str) -> Scope {
        Scope {
            path: path.into(),
            recurse: true,
        }
    }

    #[test]
    fn a_batch_reads_the_common_prefix_of_its_targets() {
        let k = key("ns/k/00100");
        assert_eq!(k.with(&k), k, "one target: itself");
        assert_eq!(k.with(&key("ns/k/00199")), dir("ns/k/001"));
        assert_eq!(dir("ns/p/1/").with(&key("ns/p/2")), dir("ns/p/"));
        assert_eq!(key("ns/é1").with(&key("ns/è2")), dir("ns/"), "whole chars");
        let wide = key("a").with(&key("b"));
        assert_eq!(wide, dir(""));
        assert!(dir("ns/k/").covers(&key("ns/k/1").with(&key("ns/k/2"))));
    }

    #[test]
    fn the_plan_keeps_targets_alone_when_they_fit() {
        let t = [key("a/b"), dir("a/b/"), key("a/c/d"), dir("x/"), key("x/y")];
        let p = plan(t.iter(), 10);
        assert_eq!(p, [key("a/b"), dir("a/b/"), key("a/c/d"), dir("x/")]);
        assert!(p.iter().any(|c| c.covers(&key("x/y"))));
        assert!(
            !dir("a/").covers(&key("a")),
            "a key is not below its namesake"
        );
        assert!(dir("").covers(&key("a")));
    }

    #[test]
    fn the_plan_fits_the_bound_whatever_n() {
        for n in [17usize, 100, 2_000] {
            let t: Vec<Scope> = (0..n)
                .map(|i| key(&format!("ns/w/g{}/k{i}", i % 50)))
                .chain([key("ns/top"), dir("other/deep/er/")])
                .collect();
            let p = plan(t.iter(), 16);
            assert!(p.len() <= 16, "{n}: {p:?}");
            assert!(p.len() >= 10, "{n}: uses the bound: {p:?}");
            for s in &t {
                assert_eq!(
                    p.iter().filter(|c| c.covers(s)).count(),
                    1,
                    "{s:?} covered once by {p:?}"
                );
            }
        }
        let t: Vec<Scope> = (0..50).map(|i| key(&format!("t{i}"))).collect();
        let p = plan(t.iter(), 16);
        assert!(p.len() <= 16 && t.iter().all(|s| p.iter().any(|c| c.covers(s))));
        assert_eq!(plan(t.iter(), 1), [dir("t")], "one query for all");
        assert!(plan([].iter(), 16).is_empty());
        // A watched directory covers what is below it, and is not split.
        let t = [dir("a/"), key("a/x"), key("a/y"), key("b")];
        assert_eq!(plan(t.iter(), 16), [dir("a/"), key("b")]);
        // Multi-byte names split at character boundaries.
        let t = [key("ü/a"), key("ü/b"), key("üx")];
        let p = plan(t.iter(), 2);
        assert!(
            p.len() <= 2 && t.iter().all(|s| p.iter().any(|c| c.covers(s))),
            "{p:?}"
        );
    }

    #[test]
    fn own_puts_a_shared_answer_skipped_are_replayed_in_order() {
        // Answer at 10: a=5. Then this handle put b at 12 and c at 13, and
        // someone deleted b (14) and wrote a (15): the next answer (15)
        // shows a=15, c=13, no b.
        let scope = Scope {
            path: "".into(),
            recurse: true,
        };
        let recent: Recent = Arc::default();
        for (k, rev) in [("b", 12), ("c", 13), ("z", 9)] {
            recent.lock().unwrap().push_back(pair(k, "own", rev).1);
        }
        let prev = state(&[("a", 5)]);
        let new: BTreeMap<_, _> = [pair("a", "v", 15), pair("c", "own", 13)].into();
        let mids = intermediate(&recent, &scope, 10, &prev, &new, 15);
        assert_eq!(mids.len(), 1, "c is in the answer; z predates it");
        assert_eq!(mids[0].0, 12);
        // A prefix stream and a key stream over the sequence 10 → 12 → 15.
        for target in [
            Target::Prefix(Prefix::root()),
            Target::Key(Key::new("b").unwrap()),
        ] {
            let mut view = View {
                entries: in_target(&prev, &target)
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect(),
                target,
                index: 10,
                epoch: 0,
            };
            let mut events = view.advance_by(12, 0, 10, &delta(&prev, &mids[0].1));
            events.extend(view.advance_by(15, 0, 12, &delta(&mids[0].1, &new)));
            let revs: Vec<u64> = events.iter().map(Event::revision).collect();
            assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{events:?}");
            assert!(
                matches!(&events[0], Event::Put { kv, .. } if kv.key.as_str() == "b"),
                "{events:?}"
            );
            assert!(
                events.iter().any(
                    |e| matches!(e, Event::Delete { key, revision: 15 } if key.as_str() == "b")
                ),
                "{events:?}"
            );
        }
    }

    #[test]
    fn a_view_map_keeps_key_order_few_or_many() {
        let mut m: ViewMap = [pair("b", "1", 2), pair("a", "1", 1)].into_iter().collect();
        assert!(matches!(&m, ViewMap::Few(v) if v.len() == 2));
        for i in (0..20).rev() {
            m.insert(pair(&format!("k{i:02}"), "v", 10 + i).1);
            let keys: Vec<&str> = m.values().map(|p| p.key.as_str()).collect();
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
        }
        assert!(matches!(&m, ViewMap::Many(b) if b.len() == 22));
        m.insert(pair("a", "2", 40).1);
        assert_eq!(&m.get(&Key::new("a").unwrap()).unwrap().value[..], b"2");
        assert!(m.remove(&Key::new("k05").unwrap()).is_some());
        assert!(m.get(&Key::new("k05").unwrap()).is_none());
        let mut few: ViewMap = std::iter::empty().collect();
        assert!(few.remove(&Key::new("a").unwrap()).is_none());
        few.insert(pair("z", "1", 1).1);
        few.insert(pair("z", "2", 2).1);
        assert_eq!(few.values().count(), 1);
        let many: ViewMap = (0..30).map(|i| pair(&format!("x{i:02}"), "v", i)).collect();
        assert_eq!(many.values().count(), 30);
        assert!(matches!(many, ViewMap::Many(_)));
    }

    fn snapshot(index: u64, pairs: &[(&str, u64)]) -> Snapshot {
        Snapshot {
            index,
            epoch: 0,
            entries: state(pairs),
            fault: None,
            outages: 0,
            last_fault: None,
        }
    }

    fn stream_at(channel: &Channel, target: Target, index: u64, view: &[(&str, u64)]) -> Stream {
        let feed = Feed::of(channel, &Scope::of(&target));
        feed.slot.arrived_at(index);
        Stream {
            _member: Membership {
                inner: std::sync::Weak::new(),
                id: 0,
            },
            feed: feed.channel,
            slot: feed.slot,
            view: View {
                entries: (*state(view)).clone().into_iter().collect(),
                target,
                index,
                epoch: 0,
            },
            outages: 0,
            pending: VecDeque::new(),
            done: false,
        }
    }

    fn events(s: &mut Stream) -> Vec<(String, u64, bool)> {
        s.receive();
        s.pending
            .drain(..)
            .map(|e| {
                let e = e.unwrap();
                let put = matches!(e, Event::Put { .. });
                (e.key().to_string(), e.revision(), put)
            })
            .collect()
    }

    #[test]
    fn answers_reach_only_the_streams_they_concern() {
        let ch = Channel::new();
        ch.send(snapshot(10, &[("a/x", 5)]));
        let key = |k: &str| Target::Key(Key::new(k).unwrap());
        let mut on_x = stream_at(&ch, key("a/x"), 10, &[("a/x", 5)]);
        let mut on_y = stream_at(&ch, key("a/y"), 10, &[]);
        let mut on_a = stream_at(
            &ch,
            Target::Prefix(anykv_core::Prefix::new("a").unwrap()),
            10,
            &[("a/x", 5)],
        );
        // The first answer after they joined reaches every new stream.
        ch.send(snapshot(11, &[("a/x", 5)]));
        for s in [&mut on_x, &mut on_y, &mut on_a] {
            assert!(events(s).is_empty());
        }
        // Then only those whose target changed.
        ch.send(snapshot(12, &[("a/x", 12)]));
        ch.send(snapshot(13, &[("a/x", 12)])); // an absent key's wake-up
        assert!(on_y.slot.take().items.is_empty(), "a/y not woken");
        assert_eq!(events(&mut on_x), [("a/x".to_owned(), 12, true)]);
        assert_eq!(events(&mut on_a), [("a/x".to_owned(), 12, true)]);
        ch.send(snapshot(14, &[("a/x", 12), ("a/y", 14)]));
        assert!(on_x.slot.take().items.is_empty(), "a/x not woken");
        assert_eq!(events(&mut on_y), [("a/y".to_owned(), 14, true)]);
        assert_eq!(events(&mut on_a), [("a/y".to_owned(), 14, true)]);
        // Two streams on one key; one leaves, the other stays served.
        let mut on_x2 = stream_at(&ch, key("a/x"), 14, &[("a/x", 12)]);
        ch.send(snapshot(15, &[("a/x", 15), ("a/y", 14)]));
        assert_eq!(events(&mut on_x), [("a/x".to_owned(), 15, true)]);
        assert_eq!(events(&mut on_x2), [("a/x".to_owned(), 15, true)]);
        ch.routes().remove(&Scope::of(&key("a/x")), &on_x.slot);
        ch.send(snapshot(16, &[("a/x", 16), ("a/y", 14)]));
        assert!(on_x.slot.take().items.is_empty(), "left");
        assert_eq!(events(&mut on_x2), [("a/x".to_owned(), 16, true)]);
        ch.routes().remove(&Scope::of(&key("a/x")), &on_x2.slot);
        assert!(!ch.routes().keys.contains_key("a/x"), "the last one gone");
    }

    #[test]
    fn a_key_that_came_and_went_after_the_hubs_answer_is_deleted() {
        // The hub answered at 10 (no x). A stream's baseline read at 12
        // shows x (created at 11); x is deleted at 13, and the hub's next
        // answer (14) is the same as its previous one: no change names x.
        let ch = Channel::new();
        ch.send(snapshot(10, &[("a", 5)]));
        let all = Target::Prefix(anykv_core::Prefix::root());
        let mut s = stream_at(&ch, all, 12, &[("a", 5), ("x", 11)]);
        ch.send(snapshot(14, &[("a", 5)]));
        assert_eq!(events(&mut s), [("x".to_owned(), 14, false)]);
        // The same when the hub's first answer after the stream came is
        // older than its baseline: the next one (which changes nothing
        // either) still reaches it.
        let ch = Channel::new();
        ch.send(snapshot(8, &[("a", 5)]));
        let all = Target::Prefix(anykv_core::Prefix::root());
        let mut s = stream_at(&ch, all, 12, &[("a", 5), ("b", 10), ("x", 11)]);
        ch.send(snapshot(10, &[("a", 5), ("b", 10)]));
        assert!(events(&mut s).is_empty(), "older than the view");
        ch.send(snapshot(14, &[("a", 5), ("b", 10)]));
        assert_eq!(events(&mut s), [("x".to_owned(), 14, false)]);
        ch.send(snapshot(15, &[("a", 5), ("b", 10)]));
        assert!(s.slot.take().items.is_empty(), "no longer fresh");
    }

    #[test]
    fn a_stream_that_falls_behind_resyncs_to_the_latest_answer() {
        let ch = Channel::new();
        ch.send(snapshot(10, &[]));
        let mut s = stream_at(&ch, Target::Key(Key::new("k").unwrap()), 10, &[]);
        for i in 0..(FAN_OUT_BUFFER as u64 + 5) {
            ch.send(snapshot(11 + i, &[("k", 11 + i)]));
        }
        let last = 10 + FAN_OUT_BUFFER as u64 + 5;
        assert_eq!(events(&mut s), [("k".to_owned(), last, true)]);
    }

    #[test]
    fn merges_wait_their_gap_longer_after_one_that_found_keys_soon_and_never_into_a_full_scope() {
        let t0 = tokio::time::Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let (a, b) = (dir("a/"), dir("b/"));
        let mut clock = MergeClock::default();
        assert!(clock.may_merge(&a, t0), "the first merge at once");
        clock.merged(t0);
        assert!(!clock.may_merge(&a, at(11)) && clock.may_merge(&a, at(12)));
        // Keys found soon (a watched key created): the gap doubles, up to
        // its bound.
        clock.split(&a, false, at(1));
        clock.merged(at(12));
        assert!(!clock.may_merge(&a, at(12 + 23)) && clock.may_merge(&a, at(12 + 24)));
        let mut now = at(40);
        for _ in 0..10 {
            clock.merged(now);
            clock.split(&a, false, now);
        }
        assert_eq!(clock.gap, MAX_MERGE_GAP);
        // A merge that held for a while: back to the least gap.
        clock.merged(now);
        now += MERGE_GAP * 5;
        clock.split(&a, false, now);
        assert_eq!(clock.gap, MERGE_GAP);
        assert!(clock.may_merge(&a, now));
        // Keys in the merged scope's first answer: never that scope again;
        // another one after the gap.
        clock.merged(now);
        clock.split(&b, true, now);
        now += MAX_MERGE_GAP * 2;
        assert!(!clock.may_merge(&b, now) && clock.may_merge(&a, now));
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
        let old: BTreeMap<Key, KvPair> = BTreeMap::new();
        let new: BTreeMap<_, _> = [pair("a", "1", 3), pair("ab", "1", 4)].into();
        let ev = diff(&old.into_iter().collect(), &new, 4, &t);
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
            entries: (*state(start)).clone().into_iter().collect(),
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

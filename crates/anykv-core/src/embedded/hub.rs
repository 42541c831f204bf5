//! Watch routing for drivers whose writes happen in this process (memory,
//! redb): the driver publishes each committed revision's events to the
//! [`Hub`], and serves [`EventLog`] reads for watches that replay.
//!
//! An index maps each watched key and each watched prefix to its watches, so
//! a written key reaches only the watches whose target matches: one lookup
//! for the key, one per ancestor (`a`, `a/b` for `a/b/c`) and one for the
//! root. Every watch has a bounded buffer of its own. The writer never waits
//! for a consumer: when a buffer would overflow, that watch is detached (its
//! buffer dropped, its later events skipped) and, when its consumer reads
//! again, it replays from its own last revision out of the store's event log
//! and attaches again. If the log no longer reaches back that far, the watch
//! yields `Error::Compacted` and ends.
//!
//! Ordering, no gap and no duplicate come from one rule: events reach a
//! watch in whole revisions (a buffer takes all of a revision's matching
//! events or none; a log read returns whole revisions), and the watch passes
//! on only revisions above the last one it handled.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context as TaskContext, Poll},
};

use crate::{Error, Event, Key, Result, Revision, Target, WatchStream};
use futures::{Stream, future::BoxFuture, task::AtomicWaker};

/// Events a watch buffers for its consumer before it is detached.
pub const BUFFER: usize = 128;
/// Revisions read from the event log per read.
pub const LOG_CHUNK: usize = 512;

/// One revision and its events, in commit order.
pub type Group = (Revision, Vec<Event>);

/// The store's event log, as a watch replays it.
pub trait EventLog: Send + Sync + 'static {
    /// Up to `max` logged revisions after `after`, oldest first, each with
    /// all of its events; `Error::Compacted` if the log no longer reaches
    /// back to `after`.
    fn read_after(
        self: Arc<Self>,
        after: Revision,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<Group>>>;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves its data consistent at each step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The per-watch mailbox the writer fills.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    /// The consumer registers, then looks at the buffer once more, so a
    /// push in between is never missed; a waker, not a future, so that a
    /// waiting watch stores no future of its own.
    wake: AtomicWaker,
}

#[derive(Default)]
struct SlotState {
    buf: VecDeque<Event>,
    /// The buffer overflowed: events are skipped until the watch re-attaches.
    detached: bool,
    closed: bool,
}

enum Taken {
    Events(VecDeque<Event>),
    Detached,
    Closed,
    Empty,
}

impl Slot {
    /// Takes all of one revision's matching events, or detaches the watch.
    fn push(&self, events: &[&Event]) {
        let mut st = lock(&self.state);
        if st.detached || st.closed {
            return;
        }
        let was_empty = st.buf.is_empty();
        if st.buf.len() + events.len() > BUFFER {
            st.buf = VecDeque::new();
            st.detached = true;
        } else {
            st.buf.extend(events.iter().map(|e| (*e).clone()));
        }
        drop(st);
        // The consumer sleeps only after finding the buffer empty.
        if was_empty {
            self.wake.wake();
        }
    }

    fn take(&self) -> Taken {
        let mut st = lock(&self.state);
        if !st.buf.is_empty() {
            Taken::Events(std::mem::take(&mut st.buf))
        } else if st.detached {
            Taken::Detached
        } else if st.closed {
            Taken::Closed
        } else {
            Taken::Empty
        }
    }

    fn reattach(&self) {
        let mut st = lock(&self.state);
        st.detached = false;
        st.buf.clear();
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.wake();
    }
}

type Entry = (u64, Arc<Slot>);

#[derive(Default)]
struct Index {
    next_id: u64,
    keys: HashMap<Key, Vec<Entry>>,
    /// By prefix string; `""` is the root.
    prefixes: HashMap<String, Vec<Entry>>,
    closed: bool,
}

impl Index {
    /// Calls `f` for every watch whose target contains `key`.
    fn each_match<'a>(&'a self, key: &Key, mut f: impl FnMut(&'a Entry)) {
        let key = key.as_str();
        if let Some(ws) = self.keys.get(key) {
            ws.iter().for_each(&mut f);
        }
        if self.prefixes.is_empty() {
            return;
        }
        if let Some(ws) = self.prefixes.get("") {
            ws.iter().for_each(&mut f);
        }
        for (i, b) in key.bytes().enumerate() {
            if b == b'/'
                && let Some(ws) = self.prefixes.get(&key[..i])
            {
                ws.iter().for_each(&mut f);
            }
        }
    }
}

/// The watches of one store, indexed by target.
#[derive(Default)]
pub struct Hub {
    index: Mutex<Index>,
}

impl Hub {
    /// Routes committed events (in revision order, each revision's events
    /// contiguous) to the watches they match. Never waits for a consumer.
    pub fn publish(&self, events: &[Event]) {
        let index = lock(&self.index);
        if index.keys.is_empty() && index.prefixes.is_empty() {
            return;
        }
        let mut rest = events;
        while let Some(first) = rest.first() {
            let rev = first.revision();
            let n = rest.iter().take_while(|e| e.revision() == rev).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            if let [only] = group {
                index.each_match(only.key(), |(_, slot)| slot.push(&[only]));
                continue;
            }
            // Several events at one revision: each watch takes its share at once.
            let mut hits: Vec<(&Arc<Slot>, Vec<&Event>)> = Vec::new();
            let mut at: HashMap<u64, usize> = HashMap::new();
            for ev in group {
                index.each_match(ev.key(), |(id, slot)| {
                    let i = *at.entry(*id).or_insert_with(|| {
                        hits.push((slot, Vec::new()));
                        hits.len() - 1
                    });
                    hits[i].1.push(ev);
                });
            }
            for (slot, evs) in hits {
                slot.push(&evs);
            }
        }
    }

    /// Adds a watch of `target`; `None` once the hub is closed.
    pub fn register(self: &Arc<Self>, target: Target) -> Option<Watcher> {
        let mut index = lock(&self.index);
        if index.closed {
            return None;
        }
        index.next_id += 1;
        let id = index.next_id;
        let slot = Arc::new(Slot::default());
        let entry = (id, slot.clone());
        match &target {
            Target::Key(k) => index.keys.entry(k.clone()).or_default().push(entry),
            Target::Prefix(p) => index
                .prefixes
                .entry(p.as_str().to_owned())
                .or_default()
                .push(entry),
        }
        Some(Watcher {
            hub: self.clone(),
            id,
            slot,
            target,
        })
    }

    fn remove(&self, id: u64, target: &Target) {
        fn drop_from<K: std::hash::Hash + Eq + std::borrow::Borrow<str>>(
            map: &mut HashMap<K, Vec<Entry>>,
            name: &str,
            id: u64,
        ) {
            if let Some(ws) = map.get_mut(name) {
                ws.retain(|(i, _)| *i != id);
                if ws.is_empty() {
                    map.remove(name);
                }
            }
        }
        let mut index = lock(&self.index);
        match target {
            Target::Key(k) => drop_from(&mut index.keys, k.as_str(), id),
            Target::Prefix(p) => drop_from(&mut index.prefixes, p.as_str(), id),
        }
    }

    /// Ends every watch (each yields `closed` after its buffered events)
    /// and refuses new ones.
    #[allow(dead_code)] // a memory store never closes under its watches
    pub fn close(&self) {
        let mut index = lock(&self.index);
        index.closed = true;
        for (_, slot) in index.keys.values().chain(index.prefixes.values()).flatten() {
            slot.close();
        }
    }

    /// How many watches are registered (for tests and diagnostics).
    pub fn watch_count(&self) -> usize {
        let index = lock(&self.index);
        index
            .keys
            .values()
            .chain(index.prefixes.values())
            .map(Vec::len)
            .sum()
    }
}

/// A registered watch; dropping it removes the watch from the index.
pub struct Watcher {
    hub: Arc<Hub>,
    id: u64,
    slot: Arc<Slot>,
    target: Target,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.hub.remove(self.id, &self.target);
    }
}

/// Where a new watch starts.
pub enum Begin {
    /// Live events above this revision (registered before it was read).
    Now(Revision),
    /// The log after `after`, starting with `first` (already read, after the
    /// watch was registered), then live events.
    Log {
        /// The revision the watch starts after.
        after: Revision,
        /// The first chunk of the log after `after`.
        first: Vec<Group>,
    },
}

enum Mode {
    /// Taking events from the buffer; revisions at or below `floor` were
    /// already handled from the log.
    Live { floor: Revision },
    /// Replaying the log. `attached`: the buffer has been taking events
    /// since before the last log read began.
    CatchUp { attached: bool, at_end: bool },
}

struct Cursor {
    w: Watcher,
    log: Arc<dyn EventLog>,
    /// Last revision handled (delivered, or read from the log and skipped).
    last: Revision,
    mode: Mode,
    groups: VecDeque<Group>,
    ready: VecDeque<Event>,
    /// What a closed hub ends the stream with.
    closed: fn() -> Error,
    done: bool,
    /// The log read in flight while catching up.
    reading: Option<BoxFuture<'static, Result<Vec<Group>>>>,
}

/// The stream of a registered watch.
pub fn stream(
    w: Watcher,
    log: Arc<dyn EventLog>,
    from: Begin,
    closed: fn() -> Error,
) -> WatchStream {
    let (last, mode, groups) = match from {
        Begin::Now(rev) => (rev, Mode::Live { floor: rev }, VecDeque::new()),
        Begin::Log { after, first } => {
            let at_end = first.len() < LOG_CHUNK;
            (
                after,
                Mode::CatchUp {
                    attached: true,
                    at_end,
                },
                first.into(),
            )
        }
    };
    let cursor = Cursor {
        w,
        log,
        last,
        mode,
        groups,
        ready: VecDeque::new(),
        closed,
        done: false,
        reading: None,
    };
    Box::pin(cursor)
}

/// Polled by hand rather than built from an `async` step: a waiting watch
/// then holds its cursor and nothing else (a boxed `unfold` also holds the
/// step's future, about as big again), which is most of a watch's memory
/// when 10,000 wait.
impl Stream for Cursor {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Result<Event>>> {
        let c = self.get_mut();
        if c.done {
            return Poll::Ready(None);
        }
        let mut registered = false;
        loop {
            if let Some(ev) = c.ready.pop_front() {
                if c.ready.is_empty() {
                    // A waiting watch keeps no buffer.
                    c.ready = VecDeque::new();
                }
                return Poll::Ready(Some(Ok(ev)));
            }
            match c.mode {
                Mode::Live { floor } => match c.w.slot.take() {
                    Taken::Events(mut evs) => {
                        // `ready` is empty here: hand over the buffer as it is.
                        evs.retain(|e| e.revision() > floor);
                        if let Some(e) = evs.back() {
                            c.last = c.last.max(e.revision());
                        }
                        c.ready = evs;
                    }
                    Taken::Detached => {
                        c.mode = Mode::CatchUp {
                            attached: false,
                            at_end: false,
                        };
                    }
                    Taken::Closed => {
                        c.done = true;
                        return Poll::Ready(Some(Err((c.closed)())));
                    }
                    Taken::Empty if registered => return Poll::Pending,
                    Taken::Empty => {
                        // Register, then look once more: a push between the
                        // look above and the registration woke nobody.
                        c.w.slot.wake.register(cx.waker());
                        registered = true;
                    }
                },
                Mode::CatchUp { attached, at_end } => {
                    if c.reading.is_none() {
                        if let Some((rev, events)) = c.groups.pop_front() {
                            if rev > c.last {
                                c.last = rev;
                                let target = &c.w.target;
                                c.ready
                                    .extend(events.into_iter().filter(|e| target.matches(e.key())));
                            }
                            continue;
                        }
                        if at_end && attached {
                            // Everything up to `last` came from the log; the
                            // buffer holds what was published since, possibly
                            // overlapping.
                            c.mode = Mode::Live { floor: c.last };
                            continue;
                        }
                        if at_end {
                            // Attach before the last read, so nothing falls
                            // between.
                            c.w.slot.reattach();
                        }
                        c.reading = Some(c.log.clone().read_after(c.last, LOG_CHUNK));
                    }
                    let Some(read) = c.reading.as_mut() else {
                        continue;
                    };
                    let Poll::Ready(result) = read.as_mut().poll(cx) else {
                        return Poll::Pending;
                    };
                    c.reading = None;
                    match result {
                        Ok(chunk) => {
                            c.mode = Mode::CatchUp {
                                attached: attached || at_end,
                                at_end: chunk.len() < LOG_CHUNK,
                            };
                            c.groups = chunk.into();
                        }
                        Err(e) => {
                            c.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }
}

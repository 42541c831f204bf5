//! In-memory anykv driver: the reference semantics of the contract.
//!
//! `memory://` opens a fresh private store; `memory://NAME` opens the store
//! named NAME, shared by every handle of the process that uses the name (and
//! kept while one handle lives). The URL path is the namespace:
//! `memory://app/tenant-a`. Options: `history=N` (events kept for watches
//! from a past revision, default 10000).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> anykv_core::Result<()> {
//! use anykv_core::{Store, StoreExt};
//! use anykv_memory as _; // link the driver
//! let kv = anykv_core::open("memory://docs").await?;
//! kv.set("greeting", "hello").await?;
//! assert_eq!(kv.value("greeting").await?.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
//!
//! Mapping: one mutex over a sorted map; every write takes the next store
//! revision, which is also the written key's version (so versions are never
//! reused). TTLs expire on access and by a background sweep. Locks exclude
//! within the process.
//!
//! **Watches** are indexed by key and by prefix: a write reaches only the
//! watches whose target contains its key (one lookup for the key, one per
//! ancestor, one for the root), never every watch of the store. Each watch
//! buffers up to 128 events for its consumer. A consumer that falls further
//! behind never slows the writer or other watches: its watch is *detached*
//! (the buffer is dropped and later events skip it) and, when the consumer
//! reads again, resumes from its own last revision out of the event log, in
//! order, with no gap or duplicate, then follows live events again. If the
//! log (`history` events, or a `compact`) no longer reaches back that far,
//! the stream yields `Error::Compacted` and ends. Dropping a stream removes
//! its watch from the index at once ([`MemoryStore::watch_count`]).
//!
//! **Sessions** are in-process (`with_sessions(Some(50 ms), false)`): a
//! session is a record in the store (id, deadline) plus its ephemeral keys,
//! each remembered with the revision of its session write, so every handle
//! of the store sees them as ordinary keys. A task renews the deadline
//! every `ttl / 3` (TTLs below 500 ms are raised to 500 ms, which
//! `Session::ttl` reports); the TTL sweep (every 50 ms, and every
//! operation) ends a session whose deadline passed. Close, drop and expiry
//! delete the session's keys in one revision, with a Delete event for each,
//! and fire `lost()`. A key rewritten by an ordinary put since is no longer
//! the session's and stays. An ephemeral put checks its condition like
//! `put` and returns its revision as the version.
//!
//! **snapshot** reads every prefix under one lock, at the store revision
//! of that moment ([`SnapshotMode::Atomic`]). **compact** drops the event
//! log up to a revision: watches from below it then get `Compacted`;
//! compacting at or below an earlier compaction is a no-op, beyond the
//! current revision `InvalidArgument`.

mod lock;
mod state;
mod watch;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock, Weak},
    time::Duration,
};

use anykv_core::embedded::{hub, session};
use anykv_core::{
    Capabilities, Check, Condition, Config, Error, Key, KvPair, LockGuard, LockInfo, LockOptions,
    Op, Prefix, PutOptions, Result, Revision, Session, SessionOptions, Snapshot, SnapshotMode,
    Start, Store, Target, Version, WatchStream, async_trait, registry::Driver, store::condition,
};
use bytes::Bytes;
use tokio::time::Instant;

use crate::state::{BACKEND, State};

/// Largest value accepted.
pub const MAX_VALUE_SIZE: usize = 16 << 20;

/// How often expired keys are swept (reads hide them at once).
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// Events kept for watches from a past revision, unless `?history=` says otherwise.
pub const DEFAULT_HISTORY: usize = 10_000;

const CAPS: Capabilities = Capabilities::full(MAX_VALUE_SIZE)
    .with_ttl(Some(Duration::from_millis(100)))
    .with_snapshot(Some(SnapshotMode::Atomic))
    .with_compact(true)
    // In-process sessions; a session past its deadline is ended by the next
    // sweep (or the next operation), hence the sweep interval.
    .with_sessions(Some(SWEEP_EVERY), false);

anykv_core::inventory::submit! {
    Driver {
        name: "memory",
        schemes: &["memory"],
        description: "in-process memory store (reference semantics; memory://NAME shares one store)",
        params: &["history"],
        path_is_namespace: true,
        capabilities: || CAPS,
        open: |config| Box::pin(async move { Ok(MemoryStore::open(&config)? as Arc<dyn Store>) }),
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    locks: Mutex<lock::Locks>,
    released: lock::Released,
    pub(crate) hub: Arc<hub::Hub>,
    renewals: session::Renewals,
}

/// The locked state; releasing it routes the events written meanwhile to
/// the watches (still under the lock, so a watch reading the log under the
/// lock sees each event either there or in its buffer).
pub(crate) struct Guard<'a> {
    state: MutexGuard<'a, State>,
    hub: &'a hub::Hub,
}

impl std::ops::Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if !self.state.unpublished.is_empty() {
            let mut events = std::mem::take(&mut self.state.unpublished);
            self.hub.publish(&events);
            events.clear();
            self.state.unpublished = events;
        }
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> Guard<'_> {
        // A panic while holding the lock cannot leave the map half-written
        // (every mutation is a single insert/remove), so poison is ignored.
        Guard {
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            hub: &self.hub,
        }
    }

    pub(crate) fn locks(&self) -> MutexGuard<'_, lock::Locks> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The in-memory store.
pub struct MemoryStore {
    shared: Arc<Shared>,
}

fn named_stores() -> &'static Mutex<HashMap<String, Weak<Shared>>> {
    static NAMED: OnceLock<Mutex<HashMap<String, Weak<Shared>>>> = OnceLock::new();
    NAMED.get_or_init(Default::default)
}

impl MemoryStore {
    /// A fresh private store keeping `history` events for watches.
    pub fn new(history: usize) -> Arc<MemoryStore> {
        Self::from_shared(Arc::new(Shared {
            state: Mutex::new(State::new(history)),
            locks: Mutex::new(lock::Locks::default()),
            released: lock::Released::default(),
            hub: Arc::default(),
            renewals: session::Renewals::default(),
        }))
    }

    /// Opens from a URL's config (`memory://` or `memory://NAME`).
    pub fn open(config: &Config) -> Result<Arc<MemoryStore>> {
        let history = config
            .parse_param::<usize>("history")?
            .unwrap_or(DEFAULT_HISTORY);
        let name = config.hosts.join(",");
        if name.is_empty() {
            return Ok(Self::new(history));
        }
        let mut named = named_stores().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = named.get(&name).and_then(Weak::upgrade) {
            return Ok(Self::from_shared(shared));
        }
        let store = Self::new(history);
        named.retain(|_, w| w.strong_count() > 0);
        named.insert(name, Arc::downgrade(&store.shared));
        Ok(store)
    }

    fn from_shared(shared: Arc<Shared>) -> Arc<MemoryStore> {
        // The sweeper holds only a weak reference: it ends with the store.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&shared);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tick.tick().await;
                    let Some(shared) = weak.upgrade() else { return };
                    shared.lock().expire(Instant::now());
                }
            });
        }
        Arc::new(MemoryStore { shared })
    }

    /// The state with expired keys removed.
    fn state(&self) -> Guard<'_> {
        let mut st = self.shared.lock();
        st.expire(Instant::now());
        st
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPS
    }

    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        Ok(self.state().get(key))
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        let mut st = self.state();
        condition::check(BACKEND, key, opts.condition, st.version(key))?;
        st.next_revision();
        let expires = opts.ttl.map(|t| Instant::now() + t);
        Ok(st.write(key, value, expires))
    }

    async fn delete(&self, key: &Key, cond: Condition) -> Result<bool> {
        let mut st = self.state();
        let current = st.version(key);
        condition::check(BACKEND, key, cond, current)?;
        if current.is_none() {
            return Ok(false);
        }
        st.next_revision();
        Ok(st.remove(key))
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        Ok(self.state().list(prefix))
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let mut st = self.state();
        let doomed = st.keys_below(prefix);
        if doomed.is_empty() {
            return Ok(0);
        }
        // One revision for the whole range, like etcd's range delete.
        st.next_revision();
        Ok(doomed.iter().filter(|k| st.remove(k)).count() as u64)
    }

    async fn watch(&self, target: Target, start: Start) -> Result<WatchStream> {
        watch::open(self.shared.clone(), target, start)
    }

    async fn lock(&self, key: &Key, opts: LockOptions) -> Result<LockGuard> {
        let acquire = lock::acquire(&self.shared, key, &opts);
        match opts.wait {
            None => Ok(acquire.await),
            Some(wait) => tokio::time::timeout(wait, acquire)
                .await
                .map_err(|_| Error::Timeout {
                    backend: BACKEND,
                    operation: "lock",
                    after: wait,
                }),
        }
    }

    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        Ok(lock::try_acquire(&self.shared, key, &opts))
    }

    async fn lock_holder(&self, key: &Key) -> Result<Option<LockInfo>> {
        Ok(self.shared.locks().holder(key))
    }

    async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        let mut st = self.state();
        for check in &checks {
            let current = st.get(check.key());
            if !check.holds(current.as_ref().map(|kv| (&kv.value, kv.version))) {
                return Err(condition::failed_check(BACKEND, check));
            }
        }
        let rev = st.next_revision();
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    st.write(&k, v, None);
                }
                Op::Delete(k) => {
                    st.remove(&k);
                }
            }
        }
        Ok(rev)
    }

    async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        // One lock: every prefix at one revision.
        let st = self.state();
        Ok(Snapshot {
            revision: st.revision(),
            pairs: prefixes.iter().flat_map(|p| st.list(p)).collect(),
        })
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        self.state().compact(revision)
    }

    async fn probe(&self) -> Result<()> {
        Ok(())
    }

    async fn session(&self, opts: SessionOptions) -> Result<Session> {
        let ttl = session::effective_ttl(opts.ttl);
        let id = self.shared.lock().begin_session(ttl, Instant::now());
        Ok(session::start(
            self.shared.clone(),
            BACKEND,
            id,
            ttl,
            &self.shared.renewals,
        ))
    }
}

#[async_trait]
impl session::Ledger for Shared {
    async fn renew(&self, id: u64, ttl: Option<Duration>) -> Result<bool> {
        let now = Instant::now();
        let mut st = self.lock();
        st.expire(now);
        Ok(st.renew_session(id, ttl, now))
    }

    async fn put(&self, id: u64, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        let mut st = self.lock();
        st.expire(Instant::now());
        st.session_put(id, key, value, condition)
    }

    async fn end(&self, id: u64) -> Result<()> {
        self.lock().end_session(id);
        Ok(())
    }
}

impl MemoryStore {
    /// The store's current revision.
    pub fn revision(&self) -> Revision {
        self.shared.lock().revision()
    }

    /// How many watches are registered on the store (dropping a watch's
    /// stream removes it at once).
    pub fn watch_count(&self) -> usize {
        self.shared.hub.watch_count()
    }

    /// Test hook: stops (or resumes) the renewal of every session of the
    /// store, so that they expire as if their process had frozen.
    #[doc(hidden)]
    pub fn pause_session_renewals(&self, paused: bool) {
        self.shared.renewals.pause(paused);
    }
}

//! [`Mirror`]: a local, always-current copy of a prefix, built once over
//! [`Store::snapshot`] and [`Store::watch`] for every backend (the informer
//! pattern: read the prefix at one revision, then follow it from there).
//!
//! One task per mirror owns every change to its state, so the rules below
//! never race:
//! - **Start.** A snapshot at revision `s`, then a watch from `After(s)`.
//!   On [`Converge`](crate::WatchHistory::Converge) backends a watch from `s`
//!   cannot report keys deleted between the snapshot and the watch's start,
//!   so the mirror takes a second snapshot once its watch runs and applies
//!   the differences.
//! - **Snapshots win by revision.** Applying a snapshot at `s` removes the
//!   mirror's keys absent from it whose last write is at or below `s`, takes
//!   every pair newer than the mirror's, and raises a watermark to `s`: a
//!   later event at or below the watermark is already reflected and is
//!   skipped (so a replay after a resync never applies twice).
//! - **Events win per key.** A put applies only if newer than the key's
//!   pair, a delete only if not older than it; a duplicate is a no-op.
//! - **Outages.** When the watch reports `Unavailable`, the mirror is not
//!   synced until a snapshot succeeds (retried with backoff); the
//!   differences are emitted as events. When the watch ends (`Compacted`, a
//!   closed stream), the mirror resumes from its revision, or from a new
//!   snapshot when that history is gone. It never diverges silently.

use std::{
    collections::{BTreeSet, HashMap},
    marker::PhantomData,
    sync::{
        Arc, RwLock, RwLockReadGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    capability::WatchHistory,
    error::{Error, ErrorKind, Result},
    key::{Key, Prefix},
    store::{Store, WatchStream},
    types::{Event, KvPair, Revision, Start, Target, Version},
};

/// How long `wait_for` lets the watch catch up before it takes a snapshot:
/// an own write inside the prefix normally arrives within milliseconds; a
/// revision that no event of the prefix will ever reach (a write elsewhere)
/// costs one snapshot after this.
const CATCH_UP: Duration = Duration::from_secs(1);
/// How long `wait_for` retries a snapshot the backend cannot serve yet.
const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// Backoff between snapshot attempts while the backend is unreachable.
const RESYNC_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// Applied events kept for slow `changes()` readers before they see a gap.
const CHANGES_BUFFER: usize = 4096;

/// What the mirror task tells `changes()` subscribers.
#[derive(Clone, Debug)]
enum Note {
    Applied(Event),
    Outage(String),
}

/// One key's state, without the key (the map holds it).
#[derive(Clone, Debug)]
struct Entry {
    value: Bytes,
    version: Version,
    create_revision: Revision,
    mod_revision: Revision,
}

impl Entry {
    fn pair(&self, key: Key) -> KvPair {
        KvPair {
            key,
            value: self.value.clone(),
            version: self.version,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }

    fn of(kv: &KvPair) -> Entry {
        Entry {
            value: kv.value.clone(),
            version: kv.version,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
        }
    }
}

/// A key as the mirror stores it: one allocation shared by both indexes.
type Name = Arc<str>;

/// The mirrored pairs: a hash map for `get` (the hot path) and an ordered
/// set of the same names for `list` and `keys`.
#[derive(Default)]
struct State {
    entries: HashMap<Name, Entry>,
    order: BTreeSet<Name>,
    /// Every change at or below this revision is reflected (last snapshot).
    watermark: Revision,
    /// Highest revision applied.
    revision: Revision,
}

impl State {
    /// The first snapshot, loaded in bulk (pairs sorted by key, no diff).
    fn load(pairs: Vec<KvPair>, revision: Revision) -> State {
        let mut entries = HashMap::with_capacity(pairs.len());
        let mut names = Vec::with_capacity(pairs.len());
        for kv in &pairs {
            let name: Name = Arc::from(kv.key.as_str());
            entries.insert(name.clone(), Entry::of(kv));
            names.push(name);
        }
        State {
            entries,
            // From sorted names: a bulk build, no rebalancing.
            order: names.into_iter().collect(),
            watermark: revision,
            revision,
        }
    }

    /// Applies one watch event; returns it if it changed the state.
    fn apply(&mut self, ev: Event) -> Option<Event> {
        let rev = ev.revision();
        if rev <= self.watermark {
            return None;
        }
        let applied = match &ev {
            Event::Put { kv, .. } => {
                let newer = self
                    .entries
                    .get(kv.key.as_str())
                    .is_none_or(|e| e.mod_revision < kv.mod_revision);
                if newer {
                    self.insert(kv);
                }
                newer
            }
            Event::Delete { key, revision } => {
                let present = self
                    .entries
                    .get(key.as_str())
                    .is_some_and(|e| e.mod_revision <= *revision);
                if present {
                    self.remove(key.as_str());
                }
                present
            }
        };
        self.revision = self.revision.max(rev);
        applied.then_some(ev)
    }

    /// True for a delete of a key the mirror holds that [`State::apply`]
    /// would drop (at or below the watermark, or older than the key's
    /// pair). On a [`Full`](crate::WatchHistory::Full) backend revisions
    /// are exact and such a delete is a replay. On a
    /// [`Converge`](crate::WatchHistory::Converge) backend a delete's
    /// revision is only a lower bound (ZooKeeper reports no zxid for it), so
    /// it may be a delete after the last snapshot all the same: only a new
    /// snapshot can tell.
    fn doubts(&self, ev: &Event) -> bool {
        let Event::Delete { key, revision } = ev else {
            return false;
        };
        self.entries
            .get(key.as_str())
            .is_some_and(|e| *revision <= self.watermark || e.mod_revision > *revision)
    }

    /// Applies a snapshot of the whole mirrored prefix; returns the
    /// differences as events (puts with their previous pair, deletes at the
    /// snapshot's revision) when `diff` is asked for (someone listens).
    fn apply_snapshot(&mut self, pairs: Vec<KvPair>, revision: Revision, diff: bool) -> Vec<Event> {
        let mut events = Vec::new();
        let fresh: HashMap<&str, &KvPair> = pairs.iter().map(|kv| (kv.key.as_str(), kv)).collect();
        let gone: Vec<Name> = self
            .entries
            .iter()
            .filter(|(k, e)| !fresh.contains_key(&***k) && e.mod_revision <= revision)
            .map(|(k, _)| k.clone())
            .collect();
        for name in gone {
            self.remove(&name);
            if diff {
                events.push(Event::Delete {
                    key: Key::trusted(&name),
                    revision,
                });
            }
        }
        let mut puts: Vec<&KvPair> = pairs
            .iter()
            .filter(|kv| {
                self.entries
                    .get(kv.key.as_str())
                    .is_none_or(|e| e.mod_revision < kv.mod_revision)
            })
            .collect();
        puts.sort_by(|a, b| a.mod_revision.cmp(&b.mod_revision).then(a.key.cmp(&b.key)));
        for kv in puts {
            let prev = self.insert(kv);
            if diff {
                events.push(Event::Put {
                    kv: kv.clone(),
                    prev,
                });
            }
        }
        self.watermark = self.watermark.max(revision);
        self.revision = self.revision.max(revision);
        events
    }

    /// Inserts or replaces a pair; returns the previous one.
    fn insert(&mut self, kv: &KvPair) -> Option<KvPair> {
        let entry = Entry::of(kv);
        if let Some(old) = self.entries.get_mut(kv.key.as_str()) {
            let prev = old.pair(kv.key.clone());
            *old = entry;
            return Some(prev);
        }
        let name: Name = Arc::from(kv.key.as_str());
        self.order.insert(name.clone());
        self.entries.insert(name, entry);
        None
    }

    fn remove(&mut self, name: &str) {
        self.entries.remove(name);
        self.order.remove(name);
    }

    fn below<'a>(&'a self, prefix: &'a Prefix) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        let start = prefix.dir();
        self.order
            .range::<str, _>((
                std::ops::Bound::Included(start.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |k| prefix.is_root() || k.starts_with(start.as_str()))
            .filter(move |k| prefix.contains(k))
            .filter_map(|k| self.entries.get(&**k).map(|e| (&**k, e)))
    }
}

/// What the task and the handle share.
struct Shared {
    prefix: Prefix,
    backend: &'static str,
    state: RwLock<State>,
    /// The applied revision, for `wait_for`.
    revision: watch::Sender<Revision>,
    synced: AtomicBool,
    changes: broadcast::Sender<Note>,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way readers could misuse: each update is one insert/remove.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request to the task: take a snapshot now, answer when applied.
type Resync = oneshot::Sender<Result<()>>;

/// A local, always-current copy of one prefix; see [`StoreExt::mirror`](crate::StoreExt::mirror).
///
/// Reads (`get`, `list`, `keys`) are local and never wait for the network.
/// Dropping the mirror stops its watch.
///
/// ```no_run
/// # async fn demo(kv: anykv_core::Kv) -> anykv_core::Result<()> {
/// use anykv_core::{Key, Prefix, StoreExt};
/// let mirror = kv.mirror(&Prefix::new("config")?).await?;
/// let version = kv.set("config/mode", "fast").await?;
/// mirror.wait_for(version.get()).await?; // read-your-writes
/// let mode = mirror.get(&Key::new("config/mode")?).map(|kv| kv.value);
/// assert_eq!(mode.as_deref(), Some(&b"fast"[..]));
/// # Ok(()) }
/// ```
pub struct Mirror {
    shared: Arc<Shared>,
    resync: mpsc::Sender<Resync>,
    task: JoinHandle<()>,
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("prefix", &self.shared.prefix)
            .field("revision", &self.revision())
            .field("synced", &self.is_synced())
            .finish()
    }
}

impl Mirror {
    /// Mirrors `prefix` of `store`: returns once the first snapshot is applied
    /// and the watch runs.
    pub(crate) async fn start<S: Store + Clone>(store: S, prefix: Prefix) -> Result<Mirror> {
        let snap = store.snapshot(std::slice::from_ref(&prefix)).await?;
        let (changes, _) = broadcast::channel(CHANGES_BUFFER);
        let state = State::load(snap.pairs, snap.revision);
        let shared = Arc::new(Shared {
            prefix: prefix.clone(),
            backend: store.backend(),
            state: RwLock::new(state),
            revision: watch::Sender::new(snap.revision),
            synced: AtomicBool::new(true),
            changes,
        });
        let stream = store
            .watch(Target::Prefix(prefix), Start::After(snap.revision))
            .await?;
        let mut follower = Follower {
            store,
            shared: shared.clone(),
        };
        if follower.converges() {
            // Deletes between the snapshot and the watch's start are in no
            // event: a second snapshot, taken while the watch runs, has them.
            follower.resync().await?;
        }
        let (resync, requests) = mpsc::channel(16);
        let task = tokio::spawn(follower.run(stream, requests));
        Ok(Mirror {
            shared,
            resync,
            task,
        })
    }

    /// The mirrored prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.shared.prefix
    }

    /// The pair at `key`, if the mirror holds it.
    pub fn get(&self, key: &Key) -> Option<KvPair> {
        self.shared
            .read()
            .entries
            .get(key.as_str())
            .map(|e| e.pair(key.clone()))
    }

    /// The value at `key`, if the mirror holds it (no copy of the key).
    pub fn value(&self, key: &Key) -> Option<Bytes> {
        self.shared
            .read()
            .entries
            .get(key.as_str())
            .map(|e| e.value.clone())
    }

    /// Every pair strictly below `prefix` (the root: all), sorted by key.
    pub fn list(&self, prefix: &Prefix) -> Vec<KvPair> {
        let state = self.shared.read();
        state
            .below(prefix)
            .map(|(k, e)| e.pair(Key::trusted(k)))
            .collect()
    }

    /// The distinct names one level below `prefix`, sorted.
    pub fn keys(&self, prefix: &Prefix) -> Vec<String> {
        let state = self.shared.read();
        // Not adjacent in key order: `a`, `a-x`, `a/b` name `a` twice.
        let names: BTreeSet<&str> = state
            .below(prefix)
            .filter_map(|(k, _)| prefix.child_name(k))
            .collect();
        names.into_iter().map(str::to_owned).collect()
    }

    /// How many keys the mirror holds.
    pub fn len(&self) -> usize {
        self.shared.read().entries.len()
    }

    /// True when the mirror holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The highest revision the mirror has applied.
    pub fn revision(&self) -> Revision {
        *self.shared.revision.borrow()
    }

    /// False while the watch reports an outage and until a snapshot after it
    /// has been applied; reads then answer from the last known state.
    pub fn is_synced(&self) -> bool {
        self.shared.synced.load(Ordering::Acquire)
    }

    /// Returns once the mirror reflects every change of its prefix up to
    /// `revision`, the revision of a completed write (on every built-in
    /// driver a write's [`Version`] is its revision: `wait_for(version.get())`
    /// after a `put` is read-your-writes).
    ///
    /// The watch normally gets there within milliseconds; if it has not
    /// after a second (the revision may be of a write outside the prefix,
    /// which no event reports), the mirror takes a snapshot, which reflects
    /// every write completed before it. While the backend is unreachable it
    /// retries the snapshot for up to 30 s, then fails with its error; it
    /// fails at once if the mirror has stopped.
    pub async fn wait_for(&self, revision: Revision) -> Result<()> {
        let mut rx = self.shared.revision.subscribe();
        // The borrow `wait_for` returns must not live across an await.
        let caught_up = tokio::time::timeout(CATCH_UP, async {
            rx.wait_for(|r| *r >= revision).await.is_ok()
        })
        .await
        .unwrap_or(false);
        if caught_up {
            return Ok(());
        }
        // Retry while the backend is unreachable (a session reconnecting, a
        // leader being elected), within a bound: past it, the last error.
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        let mut backoff = RESYNC_BACKOFF.0;
        loop {
            let (tx, done) = oneshot::channel();
            self.resync.send(tx).await.map_err(|_| self.stopped())?;
            match done.await.map_err(|_| self.stopped())? {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() && tokio::time::Instant::now() + backoff < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RESYNC_BACKOFF.1);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The events the mirror applies from now on, in order, with the
    /// differences of each resync as events. An `Err(Unavailable)` item marks
    /// an outage (the stream goes on) or a reader so slow that events were
    /// dropped for it (the mirror itself lost nothing: read it).
    pub fn changes(&self) -> BoxStream<'static, Result<Event>> {
        let backend = self.shared.backend;
        let rx = self.shared.changes.subscribe();
        futures::stream::unfold(rx, move |mut rx| async move {
            let item = match rx.recv().await {
                Ok(Note::Applied(ev)) => Ok(ev),
                Ok(Note::Outage(message)) => Err(Error::Unavailable {
                    backend,
                    message,
                    source: None,
                }),
                Err(broadcast::error::RecvError::Lagged(n)) => Err(Error::Unavailable {
                    backend,
                    message: format!(
                        "mirror changes: {n} events dropped for a slow reader; the mirror is current"
                    ),
                    source: None,
                }),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((item, rx))
        })
        .boxed()
    }

    fn stopped(&self) -> Error {
        Error::Cancelled {
            backend: self.shared.backend,
            message: "the mirror has stopped".into(),
        }
    }
}

/// The mirror's task: applies the watch, and snapshots when asked or needed.
struct Follower<S> {
    store: S,
    shared: Arc<Shared>,
}

impl<S: Store + Clone> Follower<S> {
    async fn run(mut self, mut stream: WatchStream, mut requests: mpsc::Receiver<Resync>) {
        let mut backoff = RESYNC_BACKOFF.0;
        let mut behind = false;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(ev)) => {
                        if self.apply(ev) && self.resync().await.is_err() {
                            behind = true;
                        }
                    }
                    Some(Err(e)) if e.kind() == ErrorKind::Unavailable => {
                        self.outage(e.to_string());
                        behind = true;
                    }
                    // A terminal error (`Compacted`, `Cancelled`, …) or the
                    // end of the stream: follow again from the mirror's
                    // revision, or from a new snapshot.
                    end => {
                        if let Some(Err(e)) = end {
                            if e.kind() == ErrorKind::Cancelled {
                                self.outage(e.to_string());
                                return;
                            }
                            self.outage(e.to_string());
                        }
                        match self.follow_again().await {
                            Ok(s) => { stream = s; backoff = RESYNC_BACKOFF.0; }
                            Err(e) if e.kind() == ErrorKind::Cancelled => return,
                            Err(_) => {
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(RESYNC_BACKOFF.1);
                                stream = futures::stream::empty().boxed();
                            }
                        }
                    }
                },
                Some(done) = requests.recv() => {
                    let result = self.resync().await;
                    behind = result.is_err();
                    let _ = done.send(result);
                }
                () = tokio::time::sleep(backoff), if behind => {
                    match self.resync().await {
                        Ok(()) => { behind = false; backoff = RESYNC_BACKOFF.0; }
                        Err(_) => backoff = (backoff * 2).min(RESYNC_BACKOFF.1),
                    }
                }
            }
        }
    }

    /// Whether the backend's watches only converge (see
    /// [`WatchHistory::Converge`]): no replay from a revision, deletes at a
    /// lower bound of theirs.
    fn converges(&self) -> bool {
        self.store.capabilities().watch_history == WatchHistory::Converge
    }

    /// A new watch from the mirror's revision; from a new snapshot when that
    /// history is gone or the backend keeps none.
    async fn follow_again(&mut self) -> Result<WatchStream> {
        let target = Target::Prefix(self.shared.prefix.clone());
        if self.store.capabilities().watch_history == WatchHistory::Full {
            let from = self.shared.read().revision;
            match self.store.watch(target.clone(), Start::After(from)).await {
                Ok(s) => {
                    self.shared.synced.store(true, Ordering::Release);
                    return Ok(s);
                }
                Err(e) if e.kind() != ErrorKind::Compacted => return Err(e),
                Err(_) => {}
            }
        }
        let snap = self
            .store
            .snapshot(std::slice::from_ref(&self.shared.prefix))
            .await?;
        let stream = self
            .store
            .watch(target, Start::After(snap.revision))
            .await?;
        self.apply_snapshot(snap.pairs, snap.revision);
        if self.converges() {
            self.resync().await?;
        }
        Ok(stream)
    }

    async fn resync(&mut self) -> Result<()> {
        let snap = self
            .store
            .snapshot(std::slice::from_ref(&self.shared.prefix))
            .await?;
        self.apply_snapshot(snap.pairs, snap.revision);
        Ok(())
    }

    /// Applies one event; returns true when the mirror cannot tell whether
    /// it must apply it (see [`State::doubts`]) and must take a snapshot.
    fn apply(&self, ev: Event) -> bool {
        let (applied, doubt) = {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            let doubt = state.doubts(&ev) && self.converges();
            let applied = state.apply(ev);
            self.shared.revision.send_if_modified(|r| {
                let changed = *r < state.revision;
                *r = state.revision;
                changed
            });
            (applied, doubt)
        };
        if let Some(ev) = applied {
            let _ = self.shared.changes.send(Note::Applied(ev));
        }
        doubt
    }

    fn apply_snapshot(&self, pairs: Vec<KvPair>, revision: Revision) {
        let diff = {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            let listening = self.shared.changes.receiver_count() > 0;
            let diff = state.apply_snapshot(pairs, revision, listening);
            self.shared.revision.send_if_modified(|r| {
                let changed = *r < state.revision;
                *r = state.revision;
                changed
            });
            diff
        };
        self.shared.synced.store(true, Ordering::Release);
        for ev in diff {
            let _ = self.shared.changes.send(Note::Applied(ev));
        }
    }

    fn outage(&self, message: String) {
        self.shared.synced.store(false, Ordering::Release);
        let _ = self.shared.changes.send(Note::Outage(message));
    }
}

/// A [`Mirror`] whose values are JSON documents of type `T`; see
/// [`StoreExt::mirror_json`](crate::StoreExt::mirror_json).
///
/// Values are decoded when read: one that does not decode is an
/// `Err(Error::Codec)` for its key only, in `get`, `list` and `changes`.
pub struct JsonMirror<T> {
    mirror: Mirror,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for JsonMirror<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.mirror.fmt(f)
    }
}

/// A change of a [`JsonMirror`].
#[derive(Clone, Debug, PartialEq)]
pub enum JsonChange<T> {
    /// The key now holds this value.
    Put {
        /// The key.
        key: Key,
        /// The decoded value.
        value: T,
        /// The revision of the write.
        revision: Revision,
    },
    /// The key was deleted.
    Delete {
        /// The key.
        key: Key,
        /// The revision of the delete.
        revision: Revision,
    },
}

fn decode<T: DeserializeOwned>(key: &Key, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Codec {
        key: key.to_string(),
        source: Box::new(e),
    })
}

impl<T: DeserializeOwned + Send + 'static> JsonMirror<T> {
    pub(crate) fn new(mirror: Mirror) -> Self {
        JsonMirror {
            mirror,
            _type: PhantomData,
        }
    }

    /// The decoded value at `key`: `Ok(None)` if absent, `Err(Codec)` if it
    /// does not decode.
    pub fn get(&self, key: &Key) -> Result<Option<T>> {
        self.mirror.value(key).map(|v| decode(key, &v)).transpose()
    }

    /// Every key strictly below `prefix`, sorted, each with its decoded value
    /// or its decoding error.
    pub fn list(&self, prefix: &Prefix) -> Vec<(Key, Result<T>)> {
        self.mirror
            .list(prefix)
            .into_iter()
            .map(|kv| {
                let value = decode(&kv.key, &kv.value);
                (kv.key, value)
            })
            .collect()
    }

    /// Decoded changes; a value that does not decode is an `Err(Codec)` item
    /// for that key, and the stream goes on.
    pub fn changes(&self) -> BoxStream<'static, Result<JsonChange<T>>> {
        self.mirror
            .changes()
            .map(|item| match item? {
                Event::Put { kv, .. } => Ok(JsonChange::Put {
                    value: decode(&kv.key, &kv.value)?,
                    revision: kv.mod_revision,
                    key: kv.key,
                }),
                Event::Delete { key, revision } => Ok(JsonChange::Delete { key, revision }),
            })
            .boxed()
    }

    /// The untyped mirror underneath (`revision`, `wait_for`, `is_synced`, `keys`).
    pub fn raw(&self) -> &Mirror {
        &self.mirror
    }

    /// See [`Mirror::wait_for`].
    pub async fn wait_for(&self, revision: Revision) -> Result<()> {
        self.mirror.wait_for(revision).await
    }

    /// See [`Mirror::revision`].
    pub fn revision(&self) -> Revision {
        self.mirror.revision()
    }

    /// See [`Mirror::is_synced`].
    pub fn is_synced(&self) -> bool {
        self.mirror.is_synced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(k: &str, v: &str, rev: Revision) -> KvPair {
        KvPair {
            key: Key::new(k).expect("key"),
            value: Bytes::from(v.to_owned()),
            version: Version::new(rev),
            create_revision: rev,
            mod_revision: rev,
        }
    }

    fn put(k: &str, v: &str, rev: Revision) -> Event {
        Event::Put {
            kv: pair(k, v, rev),
            prev: None,
        }
    }

    fn del(k: &str, rev: Revision) -> Event {
        Event::Delete {
            key: Key::new(k).expect("key"),
            revision: rev,
        }
    }

    fn values(s: &State) -> Vec<(String, String)> {
        s.below(&Prefix::root())
            .map(|(k, e)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(&e.value).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn events_apply_once_and_in_revision_order_per_key() {
        let mut s = State::default();
        assert!(s.apply(put("a", "1", 5)).is_some());
        assert!(
            s.apply(put("a", "1", 5)).is_none(),
            "a duplicate is a no-op"
        );
        assert!(s.apply(put("a", "0", 4)).is_none(), "an older put loses");
        assert!(s.apply(del("a", 3)).is_none(), "an older delete loses");
        assert!(s.apply(del("a", 6)).is_some());
        assert!(s.apply(del("a", 7)).is_none(), "deleting an absent key");
        assert_eq!(s.revision, 7);
        assert!(values(&s).is_empty());
    }

    #[test]
    fn a_snapshot_emits_the_differences_and_raises_the_watermark() {
        let mut s = State::default();
        s.apply(put("p/a", "1", 2));
        s.apply(put("p/b", "1", 3));
        s.apply(put("p/late", "x", 12)); // written after the snapshot's read
        let diff = s.apply_snapshot(vec![pair("p/a", "2", 8), pair("p/c", "1", 9)], 10, true);
        assert_eq!(
            values(&s),
            [("p/a", "2"), ("p/c", "1"), ("p/late", "x")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert_eq!(diff.len(), 3, "{diff:?}");
        assert!(matches!(&diff[0], Event::Delete { key, revision: 10 } if key.as_str() == "p/b"));
        assert!(
            matches!(&diff[1], Event::Put { kv, prev: Some(prev) } if kv.key.as_str() == "p/a" && &prev.value[..] == b"1")
        );
        // Events the snapshot already reflects are skipped (a replay after a
        // resync), later ones apply.
        assert!(s.apply(put("p/b", "1", 3)).is_none());
        assert!(s.apply(del("p/c", 10)).is_none());
        assert!(s.apply(del("p/c", 11)).is_some());
        assert_eq!(s.revision, 12);
    }

    #[test]
    fn a_delete_it_would_drop_while_holding_the_key_is_doubted() {
        // The mirror's snapshot at 10 holds p/a; a Converge backend then
        // reports the delete of p/a at a lower bound (8): dropped by the
        // watermark rule, so only a snapshot can say whether it is a replay.
        let mut s = State::load(vec![pair("p/a", "1", 5), pair("p/b", "1", 9)], 10);
        assert!(s.doubts(&del("p/a", 8)), "at or below the watermark");
        assert!(s.doubts(&del("p/b", 8)), "older than the key's pair");
        assert!(!s.doubts(&del("p/a", 11)), "a later delete applies");
        assert!(!s.doubts(&del("p/x", 8)), "a key it does not hold");
        assert!(!s.doubts(&put("p/a", "2", 7)), "puts carry exact revisions");
        assert!(s.apply(del("p/a", 8)).is_none());
        s.apply_snapshot(vec![pair("p/b", "1", 9)], 12, false);
        assert_eq!(values(&s), [("p/b".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn listing_is_directory_scoped_and_sorted() {
        let mut s = State::default();
        for (i, k) in ["a/b", "a-x", "a/c/d", "ab", "a"].iter().enumerate() {
            s.apply(put(k, "v", i as u64 + 1));
        }
        let under_a: Vec<String> = s
            .below(&Prefix::new("a").expect("prefix"))
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(under_a, ["a/b", "a/c/d"]);
        assert_eq!(s.below(&Prefix::root()).count(), 5);
    }
}

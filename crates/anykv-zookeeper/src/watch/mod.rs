//! Watches: persistent (recursive) ZooKeeper watches turned into anykv
//! events in revision order, converging after reconnects and session expiry.
//!
//! ZooKeeper 3.8 notifications name a path and a change type, nothing else.
//! The watch task keeps its view of the watched range (path → pair, see
//! [`view`]) and, for each batch of notifications, reads the changed znodes
//! and emits the differences from that view:
//!
//! 1. take every notification already received (without waiting);
//! 2. read their paths in multi-reads;
//! 3. repeat while new notifications arrived meanwhile. ZooKeeper sends a
//!    session its notifications before any reply that shows the change, so
//!    once a read returns with nothing new pending, what the batch read is a
//!    consistent cut: every change up to it is included, every later change
//!    has a larger zxid. The batch's watermark is the largest zxid it saw.
//!    Under writes that never pause, a batch stops after 2 s anyway; then
//!    only the changes up to the largest zxid seen *before its last round*
//!    are known complete (a pending notification is for a later change), so
//!    that is its watermark and the puts above it wait for the next batch;
//! 4. [`view::View::apply`] emits deletes (at one above the previous
//!    watermark: ZooKeeper does not report a delete's zxid before 3.9) and
//!    the puts up to the watermark in `mzxid` order. Revisions never go down.
//!
//! The cut argument needs every notification since the previous cut. A
//! disconnection breaks it: persistent watches can miss events across it
//! (ZOOKEEPER-4698) and zookeeper-client 0.11 does not register them again
//! on reconnect (its `resend_watches` only sends the one-shot kinds). So a
//! batch that sees the connection drop is thrown away, not emitted, even if
//! its reads were answered after the reconnect (the client queues requests
//! while disconnected); once connected the task registers the watch anew,
//! `sync`s, re-reads the whole range and emits the differences as one
//! batch. After a session expiry it does the same on a new session:
//! `watch_history: Converge` (no invented, duplicated or reordered event;
//! changes between two reads of a key can be merged). Dropping the stream
//! ends the task, which drops the ZooKeeper watcher and so removes the
//! server-side watch.

mod view;

use std::{
    collections::{BTreeMap, BTreeSet},
    panic::AssertUnwindSafe,
    sync::Arc,
    time::Duration,
};

use anykv_core::{Error, Event, KvPair, Result, Start, Target, WatchStream};
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch as tokio_watch};
use tokio_stream::wrappers::ReceiverStream;
use zookeeper_client::{self as zk, AddWatchMode, EventType, PersistentWatcher, SessionState};

use self::view::{Reads, View};
use crate::{
    Inner,
    codec::{self, Node},
    conn::{self, Session},
    error::{self, BACKEND},
    tree,
};

/// How long one batch may keep reading newly notified znodes before it
/// emits what it knows to be complete (see step 3 above).
const MAX_BATCH: Duration = Duration::from_secs(2);

/// Events buffered between the task and a slow consumer.
const BUFFER: usize = 256;

/// What a watch covers, as znode paths.
#[derive(Clone)]
enum Range {
    /// One znode.
    Key(String),
    /// Every znode strictly below this one (`/`: everything but `/zookeeper`).
    Below(String),
}

impl Range {
    fn contains(&self, path: &str) -> bool {
        match self {
            Range::Key(k) => path == k,
            Range::Below(base) if base == "/" => path.len() > 1 && !codec::is_system(path),
            Range::Below(base) => {
                path.len() > base.len() + 1
                    && path.starts_with(base.as_str())
                    && path.as_bytes()[base.len()] == b'/'
            }
        }
    }

    fn path(&self) -> &str {
        match self {
            Range::Key(p) | Range::Below(p) => p,
        }
    }

    fn mode(&self) -> AddWatchMode {
        match self {
            Range::Key(_) => AddWatchMode::Persistent,
            Range::Below(_) => AddWatchMode::PersistentRecursive,
        }
    }
}

/// One notification, as the task sees it.
enum Got {
    /// A znode in range changed.
    Node(String),
    /// A znode outside the range, or a change type that does not matter.
    Nothing,
    /// The connection dropped; the session may come back.
    Disconnected,
    /// (Re)connected.
    Connected,
    /// The session is over (expired, closed, refused) or the watcher died.
    Ended,
}

/// Why a step stopped early.
enum Interrupt {
    /// The session ended: open a new one.
    SessionEnded,
    /// A read failed: transient (retry after reconnecting) or fatal.
    Failed(zk::Error),
}

impl From<zk::Error> for Interrupt {
    fn from(e: zk::Error) -> Self {
        if error::session_gone(&e) {
            Interrupt::SessionEnded
        } else {
            Interrupt::Failed(e)
        }
    }
}

/// The keys of the whole range, read at once.
struct Snapshot {
    keys: BTreeMap<String, KvPair>,
    /// The largest `mzxid` among the znodes read (keys or not).
    seen: u64,
}

/// What a batch read, ready for [`View::apply`].
struct Gathered {
    reads: Reads,
    /// Every change up to this zxid is in `reads` (or was in the view).
    watermark: u64,
    /// Paths notified but not read (a batch cut short).
    pending: BTreeSet<String>,
}

/// Starts a watch: the server-side watch and the first read of the range
/// are done before this returns, so no later write is missed.
pub(crate) async fn watch(inner: Arc<Inner>, target: Target, start: Start) -> Result<WatchStream> {
    let (range, shown) = match &target {
        Target::Key(k) => (Range::Key(codec::path_of(k.as_str())), k.to_string()),
        Target::Prefix(p) => (Range::Below(codec::prefix_path(p.as_str())), p.to_string()),
    };
    let closed = inner.conn.closed();
    let session = inner.session().await?;
    let fail = |e| inner.fail(&session, e, "watch", &shown);
    let mut watcher = session
        .client
        .watch(range.path(), range.mode())
        .await
        .map_err(fail)?;
    let mut task = Task {
        inner: inner.clone(),
        range,
        view: View::default(),
        carry: BTreeSet::new(),
        resync: false,
        connected: true,
        closed,
    };
    let snapshot = task.read_all(&session).await.map_err(fail)?;
    let replay = match start {
        Start::Now => {
            // The starting view must be a consistent cut too (a delete's
            // revision is derived from it): settle it like a batch, emitting
            // nothing.
            let gathered = task
                .gather(&session, &mut watcher, Some(snapshot))
                .await
                .map_err(|i| match i {
                    Interrupt::Failed(e) => fail(e),
                    Interrupt::SessionEnded => fail(zk::Error::SessionExpired),
                })?
                .ok_or_else(|| {
                    conn::not_connected("the connection dropped while the watch started")
                })?;
            let held = task.view.absorb(gathered.reads, gathered.watermark);
            task.carry.extend(held);
            task.carry.extend(gathered.pending);
            None
        }
        Start::After(r) => {
            // The consumer knows the keys unchanged since r; the others are
            // emitted as puts by the first batch.
            let known = snapshot
                .keys
                .iter()
                .filter(|(_, kv)| kv.mod_revision <= r)
                .map(|(p, kv)| (p.clone(), kv.clone()))
                .collect();
            task.view = View::new(known, r);
            Some(snapshot)
        }
    };
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(task.run(session, watcher, tx, replay));
    Ok(ReceiverStream::new(rx).boxed())
}

struct Task {
    inner: Arc<Inner>,
    range: Range,
    /// What the consumer has been told.
    view: View,
    /// Paths to read in the next batch (notified, or held back).
    carry: BTreeSet<String>,
    /// Notifications may have been missed: register again and read the
    /// whole range once connected.
    resync: bool,
    /// The session is connected (as far as the notifications tell).
    connected: bool,
    closed: tokio_watch::Receiver<u64>,
}

type Tx = mpsc::Sender<Result<Event>>;

impl Task {
    async fn run(
        mut self,
        mut session: Arc<Session>,
        mut watcher: PersistentWatcher,
        tx: Tx,
        replay: Option<Snapshot>,
    ) {
        let mut snapshot = replay;
        loop {
            // Checked here too, not only while waiting: a watch retrying
            // reads must still stop when dropped or closed.
            if tx.is_closed() {
                return;
            }
            if self.closed.has_changed().unwrap_or(true) {
                let _ = tx.send(Err(cancelled())).await;
                return;
            }
            if self.resync && self.connected {
                match self.register_again(&session, &mut watcher).await {
                    Ok(s) => snapshot = Some(s),
                    Err(interrupt) => {
                        if !self
                            .recover(interrupt, &mut session, &mut watcher, &tx)
                            .await
                        {
                            return;
                        }
                        continue;
                    }
                }
            }
            // A batch to process right away (unless a resync must come
            // first): the replay, a resync, or paths left over.
            if !self.resync && (snapshot.is_some() || !self.carry.is_empty()) {
                match self
                    .batch(&session, &mut watcher, snapshot.take(), &tx)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(interrupt) => {
                        if !self
                            .recover(interrupt, &mut session, &mut watcher, &tx)
                            .await
                        {
                            return;
                        }
                    }
                }
                continue;
            }
            let got = tokio::select! {
                _ = tx.closed() => return,
                _ = self.closed.changed() => {
                    let _ = tx.send(Err(cancelled())).await;
                    return;
                }
                got = next(&mut watcher, &self.range) => got,
            };
            match got {
                Got::Ended => {
                    let ended = Interrupt::SessionEnded;
                    if !self.recover(ended, &mut session, &mut watcher, &tx).await {
                        return;
                    }
                }
                other => {
                    if let Some(path) = self.note(other) {
                        self.carry.insert(path);
                    }
                }
            }
        }
    }

    /// Records a session notification; returns the path of a node one.
    fn note(&mut self, got: Got) -> Option<String> {
        match got {
            Got::Node(p) => return Some(p),
            Got::Nothing | Got::Ended => {}
            Got::Disconnected => {
                tracing::debug!(path = self.range.path(), "zookeeper watch: disconnected");
                self.disconnected();
            }
            Got::Connected => {
                tracing::debug!(path = self.range.path(), "zookeeper watch: connected");
                self.connected = true;
            }
        }
        None
    }

    /// Notifications may be lost from here on: nothing read before the
    /// next full re-read is emitted (the Connected notification follows).
    fn disconnected(&mut self) {
        self.connected = false;
        self.resync = true;
        self.carry.clear();
    }

    /// Registers the watch again (see the module docs), then reads the
    /// whole range.
    async fn register_again(
        &mut self,
        session: &Arc<Session>,
        watcher: &mut PersistentWatcher,
    ) -> Result<Snapshot, Interrupt> {
        // Dropping the old watcher does not remove the new one from the
        // server (same path and mode).
        *watcher = session
            .client
            .watch(self.range.path(), self.range.mode())
            .await?;
        let snapshot = self.read_all(session).await?;
        self.resync = false;
        tracing::debug!(
            path = self.range.path(),
            keys = snapshot.keys.len(),
            "zookeeper watch: registered again, range re-read"
        );
        Ok(snapshot)
    }

    /// Recovers from an interrupted step: a new session after the old one
    /// ended, or a wait for reconnection after a transient failure. False
    /// when the watch is over.
    async fn recover(
        &mut self,
        interrupt: Interrupt,
        session: &mut Arc<Session>,
        watcher: &mut PersistentWatcher,
        tx: &Tx,
    ) -> bool {
        match interrupt {
            Interrupt::SessionEnded => match self.reopen(tx).await {
                Some((s, w)) => {
                    (*session, *watcher) = (s, w);
                    true
                }
                None => false,
            },
            Interrupt::Failed(e) => self.transient(e, session, tx).await,
        }
    }

    /// A failed read: keeps going (after a full re-read once connected) if
    /// the error is transient, else delivers it and ends.
    async fn transient(&mut self, e: zk::Error, session: &Session, tx: &Tx) -> bool {
        let err = error::map(e, "watch", self.range.path());
        if err.indicates_unreachable() {
            tracing::debug!(error = %err, "zookeeper: watch read failed, re-reading once connected");
            self.disconnected();
            // Usually the connection dropped and a reconnect notification
            // follows; if the session is connected already (a throttled
            // read), try again after a pause instead of waiting for one.
            self.connected = conn::is_connected(&session.client);
            if self.connected {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            true
        } else {
            let _ = tx.send(Err(err)).await;
            false
        }
    }

    /// Opens a new session after the old one ended and sets the watch up
    /// again; the caller then re-reads the range (`register_again`). Retries with
    /// backoff until it works, the stream is dropped or the store is closed
    /// (`None`: stop).
    async fn reopen(&mut self, tx: &Tx) -> Option<(Arc<Session>, PersistentWatcher)> {
        tracing::debug!(
            path = self.range.path(),
            "zookeeper watch: session ended, reopening"
        );
        self.disconnected();
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                // No session yet (servers down or electing a leader) is
                // transient; anything else (bad credentials) ends the watch.
                let session = match self.inner.session().await {
                    Ok(s) => s,
                    Err(e) if e.indicates_unreachable() => return Err(None),
                    Err(e) => return Err(Some(e)),
                };
                match session
                    .client
                    .watch(self.range.path(), self.range.mode())
                    .await
                {
                    Ok(w) => Ok((session, w)),
                    Err(e) => {
                        if error::session_gone(&e) {
                            self.inner.conn.forget(&session);
                            return Err(None);
                        }
                        let err = error::map(e, "watch", self.range.path());
                        Err((!err.indicates_unreachable()).then_some(err))
                    }
                }
            };
            match attempt.await {
                Ok(found) => {
                    // Connected now; the run loop re-reads the range.
                    self.connected = true;
                    return Some(found);
                }
                Err(Some(fatal)) => {
                    let _ = tx.send(Err(fatal)).await;
                    return None;
                }
                Err(None) => {}
            }
            tokio::select! {
                _ = tx.closed() => return None,
                _ = self.closed.changed() => {
                    let _ = tx.send(Err(cancelled())).await;
                    return None;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// One batch: reads the carried paths (and the whole range if
    /// `snapshot` is given), keeps reading what gets notified meanwhile,
    /// then emits what changed. `Ok(false)`: the consumer is gone.
    async fn batch(
        &mut self,
        session: &Arc<Session>,
        watcher: &mut PersistentWatcher,
        snapshot: Option<Snapshot>,
        tx: &Tx,
    ) -> Result<bool, Interrupt> {
        let Some(gathered) = self.gather(session, watcher, snapshot).await? else {
            // The connection dropped meanwhile: the resync takes over.
            return Ok(true);
        };
        let applied = self.view.apply(gathered.reads, gathered.watermark);
        self.carry.extend(applied.held);
        self.carry.extend(gathered.pending);
        tracing::debug!(
            path = self.range.path(),
            events = applied.events.len(),
            carried = self.carry.len(),
            "zookeeper watch: batch"
        );
        for ev in applied.events {
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The reading part of a batch (steps 1–3 of the module docs), starting
    /// from the carried paths. `None`: the connection dropped meanwhile, so
    /// what was read is not known to be complete and must not be emitted.
    async fn gather(
        &mut self,
        session: &Arc<Session>,
        watcher: &mut PersistentWatcher,
        snapshot: Option<Snapshot>,
    ) -> Result<Option<Gathered>, Interrupt> {
        let mut paths = std::mem::take(&mut self.carry);
        let mut reads = Reads::new();
        // Largest zxid seen so far, and before the latest round.
        let mut seen = 0;
        let mut before_round = 0;
        if let Some(snapshot) = snapshot {
            for p in self.view.paths() {
                reads.insert(p.clone(), None);
            }
            for (p, kv) in snapshot.keys {
                reads.insert(p, Some(kv));
            }
            seen = snapshot.seen;
        }
        let started = tokio::time::Instant::now();
        loop {
            self.drain(watcher, &mut paths)?;
            if self.resync {
                return Ok(None);
            }
            if paths.is_empty() {
                return Ok(Some(Gathered {
                    reads,
                    watermark: seen,
                    pending: paths,
                }));
            }
            if started.elapsed() > MAX_BATCH {
                // Writes keep coming: what is pending changed after the
                // previous round's reads.
                return Ok(Some(Gathered {
                    reads,
                    watermark: before_round,
                    pending: paths,
                }));
            }
            if !conn::is_connected(&session.client) {
                // Do not queue reads into a dropped connection; the
                // Disconnected notification is on its way.
                self.disconnected();
                return Ok(None);
            }
            before_round = seen;
            let list: Vec<String> = std::mem::take(&mut paths).into_iter().collect();
            let read = tree::read_many(&session.client, &list).await?;
            let now = codec::now_millis();
            for (path, r) in list.into_iter().zip(read) {
                let kv = r.and_then(|(data, stat)| {
                    seen = seen.max(stat.mzxid as u64);
                    to_pair(&path, data, &stat, now)
                });
                reads.insert(path, kv);
            }
        }
    }

    /// Takes the notifications already received, without waiting.
    fn drain(
        &mut self,
        watcher: &mut PersistentWatcher,
        paths: &mut BTreeSet<String>,
    ) -> Result<(), Interrupt> {
        while let Some(got) = try_next(watcher, &self.range) {
            if matches!(got, Got::Ended) {
                return Err(Interrupt::SessionEnded);
            }
            if let Some(path) = self.note(got) {
                paths.insert(path);
            }
        }
        Ok(())
    }

    /// The keys in range now, after a `sync`: the read reflects every write
    /// acknowledged before it, also on a new session whose server may lag
    /// behind the one the view came from.
    async fn read_all(&self, session: &Session) -> Result<Snapshot, zk::Error> {
        let client = &session.client;
        client.sync(self.range.path()).await?;
        let now = codec::now_millis();
        match &self.range {
            Range::Key(path) => Ok(match client.get_data(path).await {
                Ok((data, stat)) => Snapshot {
                    seen: stat.mzxid as u64,
                    keys: to_pair(path, data, &stat, now)
                        .map(|kv| (path.clone(), kv))
                        .into_iter()
                        .collect(),
                },
                Err(zk::Error::NoNode) => Snapshot {
                    keys: BTreeMap::new(),
                    seen: 0,
                },
                Err(e) => return Err(e),
            }),
            Range::Below(base) => {
                let nodes = tree::scan(client, base).await?;
                let seen = nodes.iter().map(|n| n.stat.mzxid as u64).max();
                let keys = nodes
                    .into_iter()
                    .filter_map(|n| {
                        let kv = to_pair(&n.path, n.data, &n.stat, now)?;
                        Some((n.path, kv))
                    })
                    .collect();
                Ok(Snapshot {
                    keys,
                    seen: seen.unwrap_or(0),
                })
            }
        }
    }
}

/// The pair of a znode if it is a key.
fn to_pair(path: &str, data: Vec<u8>, stat: &zk::Stat, now: i64) -> Option<KvPair> {
    let key = codec::key_of(path)?;
    match codec::classify(data, stat, now) {
        Node::Key(value) => Some(codec::pair(key, value, stat)),
        Node::NotKey => None,
    }
}

fn cancelled() -> Error {
    Error::Cancelled {
        backend: BACKEND,
        message: "the store was closed".to_owned(),
    }
}

fn interpret(event: zk::WatchedEvent, range: &Range) -> Got {
    match event.event_type {
        EventType::Session => match event.session_state {
            SessionState::Disconnected => Got::Disconnected,
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => Got::Connected,
            _ => Got::Ended,
        },
        EventType::NodeCreated | EventType::NodeDeleted | EventType::NodeDataChanged
            if range.contains(&event.path) =>
        {
            Got::Node(event.path)
        }
        _ => Got::Nothing,
    }
}

/// The next notification. zookeeper-client panics when a watcher is polled
/// after its session ended; that is caught and reported as the end.
async fn next(watcher: &mut PersistentWatcher, range: &Range) -> Got {
    match AssertUnwindSafe(watcher.changed()).catch_unwind().await {
        Ok(event) => interpret(event, range),
        Err(_) => Got::Ended,
    }
}

/// A notification already received, if any.
fn try_next(watcher: &mut PersistentWatcher, range: &Range) -> Option<Got> {
    match AssertUnwindSafe(watcher.changed())
        .catch_unwind()
        .now_or_never()?
    {
        Ok(event) => Some(interpret(event, range)),
        Err(_) => Some(Got::Ended),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_is_directory_scoped() {
        let r = Range::Below("/ns/a".into());
        assert!(r.contains("/ns/a/b"));
        assert!(r.contains("/ns/a/b/c"));
        assert!(!r.contains("/ns/a"));
        assert!(!r.contains("/ns/ab"));
        let root = Range::Below("/".into());
        assert!(root.contains("/x"));
        assert!(!root.contains("/"));
        assert!(!root.contains("/zookeeper/quota"));
        assert!(Range::Key("/k".into()).contains("/k"));
        assert!(!Range::Key("/k".into()).contains("/k/x"));
    }
}

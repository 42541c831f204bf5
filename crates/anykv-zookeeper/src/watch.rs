//! Watches: persistent (recursive) ZooKeeper watches turned into anykv
//! events, converging after reconnects and session expiry.
//!
//! ZooKeeper 3.8 notifications name a path and a change type, nothing else.
//! The watch task keeps its view of the watched range (path → pair) and,
//! for each batch of notifications, reads the changed znodes and emits the
//! differences from that view:
//!
//! 1. take every notification already received (without waiting);
//! 2. read their paths in multi-reads;
//! 3. repeat while new notifications arrived meanwhile (for at most 2 s of
//!    uninterrupted writes to the range). ZooKeeper sends a
//!    session its notifications before any reply that shows the change, so
//!    when a read returns with nothing new pending, the values read form a
//!    consistent cut: every change up to it is included, every later change
//!    has a larger `mzxid`. Emitting each batch's puts in `mzxid` order
//!    therefore keeps events in revision order across batches;
//! 4. deletes come first in a batch, with revision = one more than the last
//!    revision the watch had seen (ZooKeeper does not report a delete's zxid
//!    before 3.9; that number is at or below the real one and above every
//!    earlier event).
//!
//! After a disconnection (persistent watches can miss events across it,
//! ZOOKEEPER-4698) or a session expiry (the watch is registered again on a
//! new session), the task re-reads the whole range and emits the
//! differences. Dropping the stream ends the task, which drops the
//! ZooKeeper watcher and so removes the server-side watch.

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

use crate::{
    Inner,
    codec::{self, Node},
    conn::Session,
    error::{self, BACKEND},
    tree,
};

/// How long one batch may keep reading newly notified znodes before its
/// events are emitted anyway. Only a continuous stream of writes to the
/// range keeps a batch from settling; cut short, a batch may emit a put
/// whose revision is below one already emitted.
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

/// Why a batch stopped early.
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

/// Starts a watch: the server-side watch and the first read of the range
/// are done before this returns, so no later write is missed.
pub(crate) async fn watch(inner: Arc<Inner>, target: Target, start: Start) -> Result<WatchStream> {
    let (range, shown) = match &target {
        Target::Key(k) => (Range::Key(codec::path_of(k.as_str())), k.to_string()),
        Target::Prefix(p) => (Range::Below(codec::prefix_path(p.as_str())), p.to_string()),
    };
    let closed = inner.conn.closed();
    let session = inner.session().await?;
    let watcher = session
        .client
        .watch(range.path(), range.mode())
        .await
        .map_err(|e| inner.fail(&session, e, "watch", &shown))?;
    let mut task = Task {
        inner: inner.clone(),
        range,
        view: BTreeMap::new(),
        last: 0,
        carry: BTreeSet::new(),
        resync: false,
        connected: true,
        closed,
    };
    let snapshot = task
        .read_range(&session.client)
        .await
        .map_err(|e| inner.fail(&session, e, "watch", &shown))?;
    let replay = match start {
        Start::Now => {
            task.last = snapshot
                .values()
                .map(|kv| kv.mod_revision)
                .max()
                .unwrap_or(0);
            task.view = snapshot;
            None
        }
        Start::After(r) => {
            // The consumer knows the keys unchanged since r; the others are
            // emitted as puts by the first batch.
            task.last = r;
            task.view = snapshot
                .iter()
                .filter(|(_, kv)| kv.mod_revision <= r)
                .map(|(p, kv)| (p.clone(), kv.clone()))
                .collect();
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
    /// What the consumer has been told: path → pair.
    view: BTreeMap<String, KvPair>,
    /// The last revision emitted (or known at the start).
    last: u64,
    /// Paths notified but not read yet (a batch cut short).
    carry: BTreeSet<String>,
    /// The range must be read again in full once connected.
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
        replay: Option<BTreeMap<String, KvPair>>,
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
                // zookeeper-client 0.11 does not send persistent watches
                // again after a reconnect (its `resend_watches` only ever
                // sends the one-shot kinds): register the watch anew.
                // Dropping the old watcher does not remove the new one from
                // the server (same path and mode).
                match session
                    .client
                    .watch(self.range.path(), self.range.mode())
                    .await
                {
                    Ok(w) => watcher = w,
                    Err(e) => {
                        if !self
                            .recover(Interrupt::from(e), &mut session, &mut watcher, &tx)
                            .await
                        {
                            return;
                        }
                        continue;
                    }
                }
                match self.read_all(&session).await {
                    Ok(s) => snapshot = Some(s),
                    Err(interrupt) => {
                        if !self
                            .recover(interrupt, &mut session, &mut watcher, &tx)
                            .await
                        {
                            return;
                        }
                    }
                }
            }
            // A batch to process right away: the replay, a resync, or paths
            // left over from a batch cut short.
            if snapshot.is_some() || !self.carry.is_empty() {
                let paths = std::mem::take(&mut self.carry);
                match self
                    .batch(&session, &mut watcher, snapshot.take(), paths, &tx)
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
                self.connected = false;
                self.resync = true;
            }
            Got::Connected => {
                tracing::debug!(path = self.range.path(), "zookeeper watch: connected");
                self.connected = true;
            }
        }
        None
    }

    /// A failed read: keeps going (after a full re-read once connected) if
    /// the error is transient, else delivers it and ends.
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

    async fn transient(&mut self, e: zk::Error, session: &Session, tx: &Tx) -> bool {
        let err = error::map(e, "watch", self.range.path());
        if err.indicates_unreachable() {
            tracing::debug!(error = %err, "zookeeper: watch read failed, re-reading once connected");
            self.resync = true;
            // Usually the connection dropped and a reconnect notification
            // follows; if the session is connected already (a throttled
            // read), try again after a pause instead of waiting for one.
            self.connected = matches!(
                session.client.state(),
                SessionState::SyncConnected | SessionState::ConnectedReadOnly
            );
            if self.connected {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            true
        } else {
            let _ = tx.send(Err(err)).await;
            false
        }
    }

    /// Reads the whole range, clearing the resync flag.
    async fn read_all(
        &mut self,
        session: &Arc<Session>,
    ) -> Result<BTreeMap<String, KvPair>, Interrupt> {
        let snapshot = self.read_range(&session.client).await?;
        self.resync = false;
        Ok(snapshot)
    }

    /// Opens a new session after the old one ended, sets the watch up again
    /// and re-reads the range. Retries with backoff until it works, the
    /// stream is dropped or the store is closed (`None`: stop).
    async fn reopen(&mut self, tx: &Tx) -> Option<(Arc<Session>, PersistentWatcher)> {
        tracing::debug!(
            path = self.range.path(),
            "zookeeper watch: session ended, reopening"
        );
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
                let watcher = match session
                    .client
                    .watch(self.range.path(), self.range.mode())
                    .await
                {
                    Ok(w) => w,
                    Err(e) => {
                        let fatal = !error::map(e.clone(), "watch", "").indicates_unreachable()
                            && !error::session_gone(&e);
                        if error::session_gone(&e) {
                            self.inner.conn.forget(&session);
                        }
                        return Err(fatal.then(|| error::map(e, "watch", self.range.path())));
                    }
                };
                Ok::<_, Option<Error>>((session, watcher))
            };
            match attempt.await {
                Ok((session, mut watcher)) => {
                    let done = match self.read_all(&session).await {
                        Ok(snapshot) => {
                            self.batch(&session, &mut watcher, Some(snapshot), BTreeSet::new(), tx)
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    match done {
                        Ok(true) => {
                            self.connected = true;
                            return Some((session, watcher));
                        }
                        Ok(false) => return None,
                        Err(Interrupt::Failed(e)) => {
                            let err = error::map(e, "watch", self.range.path());
                            if !err.indicates_unreachable() {
                                let _ = tx.send(Err(err)).await;
                                return None;
                            }
                        }
                        Err(Interrupt::SessionEnded) => self.inner.conn.forget(&session),
                    }
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

    /// One batch: reads `paths` (and the whole range if `snapshot` is given),
    /// keeps reading what gets notified meanwhile, then emits the
    /// differences. `Ok(false)`: the consumer is gone.
    async fn batch(
        &mut self,
        session: &Arc<Session>,
        watcher: &mut PersistentWatcher,
        snapshot: Option<BTreeMap<String, KvPair>>,
        mut paths: BTreeSet<String>,
        tx: &Tx,
    ) -> Result<bool, Interrupt> {
        let mut results: BTreeMap<String, Option<KvPair>> = BTreeMap::new();
        if let Some(snapshot) = snapshot {
            for p in self.view.keys() {
                results.insert(p.clone(), None);
            }
            for (p, kv) in snapshot {
                results.insert(p, Some(kv));
            }
        }
        let mut rounds = 0;
        let started = tokio::time::Instant::now();
        loop {
            self.drain(watcher, &mut paths)?;
            if paths.is_empty() {
                break;
            }
            if started.elapsed() > MAX_BATCH {
                // Writes keep coming: emit what was read, read the rest next.
                self.carry = std::mem::take(&mut paths);
                break;
            }
            rounds += 1;
            let list: Vec<String> = std::mem::take(&mut paths).into_iter().collect();
            let read = tree::read_many(&session.client, &list).await?;
            let now = codec::now_millis();
            for (path, r) in list.into_iter().zip(read) {
                let kv = r.and_then(|(data, stat)| to_pair(&path, data, &stat, now));
                results.insert(path, kv);
            }
        }
        let events = self.diff(results);
        tracing::debug!(
            path = self.range.path(),
            rounds,
            events = events.len(),
            "zookeeper watch: batch"
        );
        for ev in events {
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
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

    /// Events that turn the consumer's view into `results` (for the paths
    /// in it), and the view updated.
    fn diff(&mut self, results: BTreeMap<String, Option<KvPair>>) -> Vec<Event> {
        let mut deleted = Vec::new();
        let mut put = Vec::new();
        for (path, new) in results {
            match (self.view.get(&path), new) {
                (Some(_), None) => deleted.push(path),
                (old, Some(kv)) if old.map(|o| o.mod_revision) != Some(kv.mod_revision) => {
                    put.push((path, kv));
                }
                _ => {}
            }
        }
        let mut events = Vec::with_capacity(deleted.len() + put.len());
        if !deleted.is_empty() {
            let floor = deleted
                .iter()
                .filter_map(|p| self.view.get(p).map(|kv| kv.mod_revision))
                .max()
                .unwrap_or(0);
            let revision = self.last.max(floor) + 1;
            self.last = revision;
            for path in deleted {
                if let Some(old) = self.view.remove(&path) {
                    events.push(Event::Delete {
                        key: old.key,
                        revision,
                    });
                }
            }
        }
        put.sort_by_key(|(_, kv)| kv.mod_revision);
        for (path, kv) in put {
            self.last = self.last.max(kv.mod_revision);
            let prev = self.view.insert(path, kv.clone());
            events.push(Event::Put { kv, prev });
        }
        events
    }

    /// The keys in range now: path → pair.
    async fn read_range(&self, client: &zk::Client) -> Result<BTreeMap<String, KvPair>, zk::Error> {
        let now = codec::now_millis();
        match &self.range {
            Range::Key(path) => Ok(match client.get_data(path).await {
                Ok((data, stat)) => to_pair(path, data, &stat, now)
                    .map(|kv| (path.clone(), kv))
                    .into_iter()
                    .collect(),
                Err(zk::Error::NoNode) => BTreeMap::new(),
                Err(e) => return Err(e),
            }),
            Range::Below(base) => Ok(tree::scan(client, base)
                .await?
                .into_iter()
                .filter_map(|n| {
                    let kv = to_pair(&n.path, n.data, &n.stat, now)?;
                    Some((n.path, kv))
                })
                .collect()),
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

//! The hub: one task per store serving all its watches (see the module
//! docs of `watch` for the protocol).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use anykv_core::{Error, ErrorKind, KvPair, Result, Start};
use futures::{
    FutureExt,
    future::{BoxFuture, join_all},
};
use tokio::{
    sync::{mpsc, oneshot, watch as tokio_watch},
    time::Instant,
};
use zookeeper_client::{self as zk, EventType, MultiReadResult, SessionState};

use super::{
    Range,
    servers::{self, ServerKey, Servers},
    sub::Shared,
    view::{Reads, View},
};
use crate::{
    Inner,
    codec::{self, Node},
    conn::{self, Session},
    error::{self, BACKEND},
    tree,
};

/// Where the hub answers a new watch.
pub(crate) type Reply = oneshot::Sender<Result<(u64, Arc<Shared>)>>;

/// What the hub is asked by watches and their streams.
pub(crate) enum Cmd {
    /// A new watch; the reply comes once its server watch is registered and
    /// its range read.
    Add {
        range: Range,
        start: Start,
        reply: Reply,
    },
    /// The stream was dropped.
    Drop(u64),
    /// The stream drained its queue after a detachment: re-read its range.
    Resync(u64),
}

/// A watch as the hub keeps it.
struct Sub {
    range: Range,
    view: View,
    shared: Arc<Shared>,
    /// The server watch it counts on.
    share: ServerKey,
}

/// The watches on one path (most paths have one: no allocation then).
enum Ids {
    One(u64),
    Many(Vec<u64>),
}

impl Ids {
    fn push(&mut self, id: u64) {
        match self {
            Ids::One(first) => *self = Ids::Many(vec![*first, id]),
            Ids::Many(ids) => ids.push(id),
        }
    }

    /// Removes `id`; true when no watch is left.
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Ids::One(only) => *only == id,
            Ids::Many(ids) => {
                ids.retain(|&i| i != id);
                if let [only] = ids[..] {
                    *self = Ids::One(only);
                    return false;
                }
                ids.is_empty()
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        match self {
            Ids::One(id) => std::slice::from_ref(id).iter().copied(),
            Ids::Many(ids) => ids.iter().copied(),
        }
    }
}

/// A path notified since it was last read.
#[derive(Clone, Copy)]
struct Dirty {
    /// Its change has a zxid above this (see `Hub::drain`).
    above: u64,
    /// Something but a delete happened: it must be read (a delete alone
    /// needs no read).
    read: bool,
    /// Complete drains before its first notification was taken (0: not a
    /// notification, a put held back).
    first: u64,
    /// The same for its last notification.
    last: u64,
}

/// What [`read_paths`] returns.
type ReadResult = Result<Vec<Result<Option<(Vec<u8>, zk::Stat)>, zk::Error>>, zk::Error>;

/// Rounds in flight at most (see [`Hub::start_round`]).
const PIPELINE: usize = 4;

/// A round whose read is out.
struct Round {
    epoch: u64,
    /// The notified paths it took.
    batch: BTreeMap<String, Dirty>,
    /// Its deletes, each with the zxid it is known to be above.
    deletes: HashMap<String, u64>,
    /// The paths read, then the parents of its deletes.
    to_read: Vec<String>,
    parents: Vec<String>,
    sent: Instant,
    read: BoxFuture<'static, ReadResult>,
}

/// The hub's state.
pub(crate) struct Hub {
    /// Which hub of the store this is (see [`super::HubHandle`]).
    id: u64,
    inner: Arc<Inner>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    closed: tokio_watch::Receiver<u64>,
    session: Option<Arc<Session>>,
    servers: Servers,
    /// Boxed: a `Sub` is about 100 bytes, and the table keeps up to twice
    /// as many slots as watches.
    subs: HashMap<u64, Box<Sub>>,
    next_id: u64,
    /// key path → watches on that key.
    by_key: HashMap<String, Ids>,
    /// prefix base path → watches below it.
    by_base: HashMap<String, Ids>,
    /// parent znode → watches whose key or prefix base is its child.
    crowd: HashMap<String, usize>,
    dirty: BTreeMap<String, Dirty>,
    /// Rounds whose read is out, oldest first.
    inflight: VecDeque<Round>,
    /// The largest zxid any reply showed (the connection's replies come
    /// after the notifications of every change they reflect).
    seen: u64,
    /// `seen` at the last drain of the notifications.
    cut: u64,
    /// Complete drains so far.
    drains: u64,
    /// The session is connected, as its notifications tell.
    connected: bool,
    /// Bumped by every disconnection: a round that saw one is dropped.
    epoch: u64,
    /// Notifications may have been missed: register again, re-read all.
    resync_all: bool,
    /// Watches that drained their queue after a detachment.
    resync_some: BTreeSet<u64>,
    /// No retry (reconnect, re-read) before this.
    not_before: Option<Instant>,
    backoff: Duration,
}

/// Reads of whole ranges: each key's value, each prefix's keys.
#[derive(Default)]
struct RangeReads {
    keys: HashMap<String, Option<KvPair>>,
    bases: HashMap<String, Vec<(String, KvPair)>>,
}

impl RangeReads {
    /// What `range` holds now, as reads for [`View`].
    fn of(&self, range: &Range) -> Reads {
        match range {
            Range::Key(p) => {
                let mut r = Reads::new();
                r.insert(p.clone(), self.keys.get(p).cloned().flatten());
                r
            }
            Range::Below(b) => self
                .bases
                .get(b)
                .map(|v| {
                    v.iter()
                        .map(|(p, kv)| (p.clone(), Some(kv.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Why a read stopped.
enum Stop {
    /// The session is over.
    Ended,
    /// Unreachable or disconnected: re-read everything once connected.
    Transient(zk::Error),
}

impl Hub {
    pub(crate) fn new(id: u64, inner: Arc<Inner>, cmds: mpsc::UnboundedReceiver<Cmd>) -> Hub {
        let closed = inner.conn.closed();
        Hub {
            id,
            inner,
            cmds,
            closed,
            session: None,
            servers: Servers::default(),
            subs: HashMap::new(),
            next_id: 1,
            by_key: HashMap::new(),
            by_base: HashMap::new(),
            crowd: HashMap::new(),
            dirty: BTreeMap::new(),
            inflight: VecDeque::new(),
            seen: 0,
            cut: 0,
            drains: 1,
            connected: false,
            epoch: 0,
            resync_all: false,
            resync_some: BTreeSet::new(),
            not_before: None,
            backoff: Duration::from_millis(100),
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            if self.closed.has_changed().unwrap_or(true) {
                return self.cancel_all();
            }
            if self.subs.is_empty() {
                // Nothing to serve: end, unless a command is waiting. Under
                // the handle's lock, so a watch starting now either was
                // sent here already or starts a new hub.
                let cmd = {
                    let mut handle = self.inner.hub.lock();
                    match self.cmds.try_recv() {
                        Ok(cmd) => cmd,
                        Err(_) => {
                            handle.clear(self.id);
                            return;
                        }
                    }
                };
                self.handle(cmd).await;
                continue;
            }
            let waiting = self.not_before.is_some_and(|t| Instant::now() < t);
            if !waiting {
                if self.session.is_none() && !self.subs.is_empty() {
                    self.settle().await;
                    self.reopen().await;
                    continue;
                }
                if self.connected && self.resync_all {
                    self.settle().await;
                    self.resync_everything().await;
                    continue;
                }
                if self.connected && !self.resync_some.is_empty() {
                    self.settle().await;
                    let ids = std::mem::take(&mut self.resync_some);
                    self.resync(ids.into_iter().collect()).await;
                    continue;
                }
                if self.connected && !self.dirty.is_empty() && self.inflight.len() < PIPELINE {
                    self.start_round();
                    continue;
                }
            }
            let until = self
                .not_before
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = self.closed.changed() => return self.cancel_all(),
                cmd = self.cmds.recv() => {
                    if let Some(cmd) = cmd {
                        self.handle(cmd).await;
                    }
                }
                n = self.servers.next() => self.note(n),
                got = oldest(&mut self.inflight), if !self.inflight.is_empty() => {
                    if let Some(round) = self.inflight.pop_front() {
                        self.finish_round(round, got);
                    }
                }
                _ = tokio::time::sleep_until(until), if self.not_before.is_some() => {
                    self.not_before = None;
                }
            }
        }
    }

    /// Ends every watch with `Cancelled` (the store was closed).
    fn cancel_all(&mut self) {
        self.inner.hub.lock().clear(self.id);
        self.cmds.close();
        for (_, sub) in self.subs.drain() {
            sub.shared.end(Some(super::cancelled()));
        }
        while let Ok(cmd) = self.cmds.try_recv() {
            if let Cmd::Add { reply, .. } = cmd {
                let _ = reply.send(Err(super::cancelled()));
            }
        }
    }

    async fn handle(&mut self, first: Cmd) {
        // Take every command waiting, so that watches started together
        // are set up together (one sync, pipelined registrations and reads).
        let mut adds = Vec::new();
        let mut next = Some(first);
        while let Some(cmd) = next {
            match cmd {
                Cmd::Add {
                    range,
                    start,
                    reply,
                } => adds.push((range, start, reply)),
                Cmd::Drop(id) => self.remove(id),
                Cmd::Resync(id) => {
                    if self.subs.contains_key(&id) {
                        self.resync_some.insert(id);
                    }
                }
            }
            next = self.cmds.try_recv().ok();
        }
        if !adds.is_empty() {
            // New views start from the watermark: no round in flight.
            self.settle().await;
            self.add(adds).await;
        }
    }

    /// Removes a watch and frees its share of its server watch.
    fn remove(&mut self, id: u64) {
        let Some(sub) = self.subs.remove(&id) else {
            return;
        };
        self.resync_some.remove(&id);
        self.unindex(id, &sub.range);
        self.servers.release(&sub.share);
    }

    /// Routes the notifications of `range` to watch `id`.
    fn index(&mut self, id: u64, range: &Range) {
        let index = match range {
            Range::Key(_) => &mut self.by_key,
            Range::Below(_) => &mut self.by_base,
        };
        index
            .entry(range.path().to_owned())
            .and_modify(|ids| ids.push(id))
            .or_insert(Ids::One(id));
        if let Some(parent) = shared_parent(range) {
            *self.crowd.entry(parent.to_owned()).or_default() += 1;
        }
    }

    /// Undoes [`Hub::index`].
    fn unindex(&mut self, id: u64, range: &Range) {
        let index = match range {
            Range::Key(p) => self.by_key.get_mut(p),
            Range::Below(b) => self.by_base.get_mut(b),
        };
        if let Some(ids) = index
            && ids.remove(id)
        {
            match range {
                Range::Key(p) => self.by_key.remove(p),
                Range::Below(b) => self.by_base.remove(b),
            };
        }
        if let Some(parent) = shared_parent(range)
            && let Some(n) = self.crowd.get_mut(parent)
        {
            *n -= 1;
            if *n == 0 {
                self.crowd.remove(parent);
            }
        }
    }

    /// The watches whose range holds `path`.
    fn route(&self, path: &str) -> Vec<u64> {
        let mut out = Vec::new();
        if let Some(ids) = self.by_key.get(path) {
            out.extend(ids.iter());
        }
        if self.by_base.is_empty() {
            return out;
        }
        for a in codec::ancestors(path) {
            if let Some(ids) = self.by_base.get(a) {
                out.extend(ids.iter());
            }
        }
        if path != "/"
            && !codec::is_system(path)
            && let Some(ids) = self.by_base.get("/")
        {
            out.extend(ids.iter());
        }
        out
    }

    /// True when every child created or deleted below `path` is notified
    /// and taken (a prefix watch covers its children).
    fn children_all_notified(&self, path: &str) -> bool {
        if self.by_base.contains_key(path) {
            return true;
        }
        if self.by_base.contains_key("/") && !codec::is_system(path) {
            return true;
        }
        codec::ancestors(path)
            .into_iter()
            .any(|a| self.by_base.contains_key(a))
    }

    fn routed(&self, path: &str) -> bool {
        !self.route(path).is_empty()
    }

    /// Records one notification.
    fn note(&mut self, (generation, event): servers::Notified) {
        if generation != self.servers.generation {
            return; // an earlier registration's
        }
        let Some(event) = event else {
            return self.ended();
        };
        match event.event_type {
            EventType::Session => match event.session_state {
                SessionState::Disconnected => self.disconnected(),
                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                    if !self.connected {
                        tracing::debug!("zookeeper watches: connected");
                    }
                    self.connected = true;
                }
                s if s.is_terminated() => self.ended(),
                _ => {}
            },
            EventType::NodeCreated | EventType::NodeDataChanged | EventType::NodeDeleted => {
                if !self.routed(&event.path) {
                    return;
                }
                let read = event.event_type != EventType::NodeDeleted;
                let (above, after) = (self.cut, self.drains);
                tracing::trace!(path = %event.path, ?event.event_type, above, after, "zookeeper watches: noted");
                self.dirty
                    .entry(event.path)
                    .and_modify(|d| {
                        d.read |= read;
                        d.last = after;
                    })
                    .or_insert(Dirty {
                        above,
                        read,
                        first: after,
                        last: after,
                    });
            }
            _ => {}
        }
    }

    /// Takes the notifications already received. Every notification that
    /// arrives after this drain is for a change that no reply received
    /// before it reflects, so its zxid is above `seen` now: that is the
    /// bound recorded for the next ones.
    fn drain(&mut self) {
        while let Some(n) = self.servers.try_next() {
            self.note(n);
        }
        self.cut = self.seen;
        self.drains += 1;
    }

    /// Tightens the bounds of pending notifications with exact zxids: a
    /// fact `(d, x)` says a notification taken before complete drain `d`
    /// was for a change at exactly `x`. ZooKeeper sends a session its
    /// notifications in zxid order, and every notification taken after
    /// drain `d` completed arrived after that one, so its change is above
    /// `x`. (Without this, a notification that arrived while a round was
    /// reading would hold back the round's puts until read again.)
    fn tighten(&mut self, mut facts: Vec<(u64, u64)>) {
        if facts.is_empty() {
            return;
        }
        facts.sort_unstable();
        let mut best = 0;
        for f in &mut facts {
            best = best.max(f.1);
            f.1 = best;
        }
        let inflight = self.inflight.iter_mut().flat_map(|r| r.batch.values_mut());
        for d in self.dirty.values_mut().chain(inflight) {
            // Facts from before the drain preceding its first notification.
            let i = facts.partition_point(|&(at, _)| at < d.first);
            if i > 0 {
                d.above = d.above.max(facts[i - 1].1);
            }
        }
    }

    /// The notified paths not read yet: waiting, or in a round in flight.
    fn unread(&self) -> impl Iterator<Item = (&String, &Dirty)> {
        self.dirty
            .iter()
            .chain(self.inflight.iter().flat_map(|r| r.batch.iter()))
    }

    /// True when `path` has a notification not read yet that asks for a
    /// read (a change but a delete).
    fn read_pending(&self, path: &str) -> bool {
        let pending = |d: &Dirty| d.read && d.last > 0;
        self.dirty.get(path).is_some_and(pending)
            || self
                .inflight
                .iter()
                .any(|r| r.batch.get(path).is_some_and(pending))
    }

    /// Every change at or below this zxid has been read (or is in views).
    fn watermark(&self) -> u64 {
        self.watermark_after(&HashSet::new())
    }

    /// [`Hub::watermark`] once the paths `read` were read: a put held back
    /// on one of them (not notified since) was read again there, by a read
    /// served after the one that held it back, so a copy of it still
    /// waiting (or in a round in flight) bounds nothing. Without this, a
    /// held path in two rounds in flight would hold itself back forever.
    fn watermark_after(&self, read: &HashSet<&str>) -> u64 {
        self.unread()
            .filter(|(p, d)| d.last > 0 || !read.contains(p.as_str()))
            .map(|(_, d)| d.above)
            .min()
            .map_or(self.seen, |m| m.min(self.seen))
    }

    fn disconnected(&mut self) {
        if self.connected {
            tracing::debug!("zookeeper watches: disconnected");
        }
        self.connected = false;
        self.epoch += 1;
        self.resync_all = true;
        self.dirty.clear();
        self.inflight.clear();
    }

    fn ended(&mut self) {
        tracing::debug!("zookeeper watches: session ended");
        self.session = None;
        self.disconnected();
    }

    fn stop(&mut self, e: zk::Error) -> Stop {
        if error::session_gone(&e) {
            self.ended();
            Stop::Ended
        } else {
            Stop::Transient(e)
        }
    }

    /// After a transient failure: re-read everything once connected, and
    /// pause first if the session says it is connected (a throttled read).
    fn transient(&mut self, e: zk::Error) {
        tracing::debug!(error = %e, "zookeeper watches: read failed, re-reading once connected");
        let connected = self
            .session
            .as_ref()
            .is_some_and(|s| conn::is_connected(&s.client));
        self.disconnected();
        self.connected = connected;
        if connected {
            self.not_before = Some(Instant::now() + Duration::from_millis(200));
        }
    }

    /// Opens a new session after the old one ended.
    async fn reopen(&mut self) {
        match self.inner.conn.open_separate().await {
            Ok(s) => {
                self.session = Some(s);
                self.connected = true;
                self.resync_all = true;
                self.backoff = Duration::from_millis(100);
            }
            Err(e) if e.indicates_unreachable() => {
                self.not_before = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                // Bad credentials and the like: nothing will come back.
                for (_, sub) in self.subs.drain() {
                    sub.shared.end(Some(again(&e)));
                }
            }
        }
    }

    /// The connected session for new watches.
    async fn session_for_add(&mut self) -> Result<Arc<Session>> {
        if let Some(s) = &self.session
            && s.usable()
        {
            if self.connected && conn::is_connected(&s.client) {
                return Ok(s.clone());
            }
            return Err(conn::not_connected(
                "the session is disconnected, reconnecting in the background",
            ));
        }
        let s = self.inner.conn.open_separate().await?;
        if self.session.is_some() || !self.subs.is_empty() {
            // A new session under running watches: they re-read.
            self.resync_all = true;
        }
        self.session = Some(s.clone());
        self.connected = true;
        Ok(s)
    }

    /// Sets up new watches: registers the server watches they need (all at
    /// once, pipelined), one `sync`, reads their ranges (pipelined), then
    /// builds their views.
    async fn add(&mut self, adds: Vec<(Range, Start, Reply)>) {
        let session = match self.session_for_add().await {
            Ok(s) => s,
            Err(e) => {
                for (_, _, reply) in adds {
                    let _ = reply.send(Err(again(&e)));
                }
                return;
            }
        };
        let client = &session.client;
        let epoch = self.epoch;
        // Registrations, deduplicated.
        // (A key needed under a recursive watch needed in the same batch is
        // merged into it once both are registered.)
        // A parent znode that holds many watched znodes gets one recursive
        // watch for all of them (see `SHARE_AT`).
        let mut crowd: HashMap<&str, usize> = HashMap::new();
        for (range, _, _) in &adds {
            if let Some(parent) = shared_parent(range) {
                *crowd.entry(parent).or_default() += 1;
            }
        }
        let mut needed: Vec<ServerKey> = Vec::new();
        let mut asked: HashSet<ServerKey> = HashSet::new();
        let mut wanted: Vec<Option<ServerKey>> = Vec::with_capacity(adds.len());
        for (range, _, _) in &adds {
            if self.servers.covering(range).is_some() {
                wanted.push(None);
                continue;
            }
            let key = match shared_parent(range) {
                Some(parent)
                    if self.crowd.get(parent).copied().unwrap_or(0)
                        + crowd.get(parent).copied().unwrap_or(0)
                        >= SHARE_AT =>
                {
                    (parent.to_owned(), true)
                }
                _ => servers::own_key(range),
            };
            if asked.insert(key.clone()) {
                needed.push(key.clone());
            }
            wanted.push(Some(key));
        }
        // Registrations, one `sync` and the reads, sent back to back: one
        // round trip for the whole batch (plus one per level of a prefix).
        // ZooKeeper serves a session's requests in order, so the reads come
        // after the watches are registered and reflect every write
        // acknowledged before the sync.
        let ranges: Vec<Range> = adds.iter().map(|(r, ..)| r.clone()).collect();
        let namespace = self.inner.namespace_path.clone();
        let registrations: Vec<_> = needed
            .iter()
            .map(|k| Servers::register(client, k))
            .collect();
        let synced = client.sync(&namespace);
        let (registered, synced, read) = futures::join!(
            join_all(registrations),
            synced,
            read_ranges(client, &ranges)
        );
        let read = synced.and(read);
        let mut failed: HashMap<ServerKey, zk::Error> = HashMap::new();
        let mut recursive = Vec::new();
        for (key, r) in needed.iter().cloned().zip(registered) {
            match r {
                // Users are counted below, one per watch.
                Ok(w) => {
                    if key.1 {
                        recursive.push(key.clone());
                    }
                    self.servers.insert(key, w);
                }
                Err(e) => {
                    failed.insert(key, e);
                }
            }
        }
        // Shallowest first, so that a watch merged away takes no others.
        recursive.sort_by_key(|k| k.0.len());
        for base in recursive {
            let moved = self.servers.merge_under(&base);
            if moved.is_empty() {
                continue;
            }
            for sub in self.subs.values_mut() {
                if moved.contains(&sub.share) {
                    sub.share = base.clone();
                }
            }
        }
        let mut ready = Vec::new();
        for ((range, start, reply), key) in adds.into_iter().zip(wanted) {
            match self.servers.covering(&range) {
                Some(share) => ready.push((range, start, reply, share)),
                None => {
                    let e = key
                        .and_then(|k| failed.get(&k).cloned())
                        .unwrap_or(zk::Error::ConnectionLoss);
                    let _ = reply.send(Err(self.map_err(&session, e, &range)));
                }
            }
        }
        // Counted before any await, so a concurrent drop cannot free them.
        for (_, _, _, share) in &ready {
            self.servers.attach(share);
        }
        self.servers.prune(&needed);
        let reads = match read {
            Ok((reads, seen)) => {
                self.seen = self.seen.max(seen);
                reads
            }
            Err(e) => {
                for (range, _, reply, share) in ready {
                    self.servers.release(&share);
                    let _ = reply.send(Err(self.map_err(&session, e.clone(), &range)));
                }
                if let Stop::Transient(e) = self.stop(e) {
                    self.transient(e);
                }
                return;
            }
        };
        // Routed before the drain: a notification taken by it may be for a
        // change after the read, which the new watch must not miss. (One
        // for a change before the read is read again: no harm.)
        let mut ids = Vec::with_capacity(ready.len());
        for (range, ..) in &ready {
            let id = self.next_id;
            self.next_id += 1;
            self.index(id, range);
            ids.push(id);
        }
        self.drain();
        if self.epoch != epoch {
            for ((range, _, reply, share), id) in ready.into_iter().zip(ids) {
                self.unindex(id, &range);
                self.servers.release(&share);
                let _ = reply.send(Err(conn::not_connected(
                    "the connection dropped while the watch started",
                )));
            }
            return;
        }
        let watermark = self.watermark();
        for ((range, start, reply, share), id) in ready.into_iter().zip(ids) {
            let now = reads.of(&range);
            let shared = Shared::new();
            let mut view;
            let held = match start {
                Start::Now => {
                    view = View::default();
                    view.absorb(now, watermark)
                }
                Start::After(r) => {
                    // The consumer knows the keys unchanged since r; the
                    // others are emitted as puts.
                    let known = now
                        .iter()
                        .filter_map(|(p, kv)| Some((p.clone(), kv.clone()?)))
                        .filter(|(_, kv)| kv.mod_revision <= r)
                        .collect();
                    view = View::new(known, r);
                    let applied = view.apply(now, watermark);
                    shared.push(applied.events);
                    applied.held
                }
            };
            self.subs.insert(
                id,
                Box::new(Sub {
                    range,
                    view,
                    shared: shared.clone(),
                    share,
                }),
            );
            self.hold(held, watermark);
            if reply.send(Ok((id, shared))).is_err() {
                self.remove(id);
            }
        }
    }

    fn map_err(&self, session: &Arc<Session>, e: zk::Error, range: &Range) -> Error {
        self.inner.fail(session, e, "watch", range.path())
    }

    /// Paths whose value read lies above the watermark: read again. The
    /// change not emitted is exactly at the `mzxid` read (a later one is
    /// notified on its own), so it is known to be above `mzxid - 1`: a
    /// tighter bound than the watermark, without which two held paths in
    /// different rounds in flight would hold each other back forever.
    fn hold(&mut self, held: Vec<(String, u64)>, watermark: u64) {
        for (p, mzxid) in held {
            let above = mzxid.saturating_sub(1).max(watermark);
            self.dirty
                .entry(p)
                .and_modify(|d| {
                    d.read = true;
                    d.above = d.above.min(above);
                    d.first = 0;
                })
                .or_insert(Dirty {
                    above,
                    read: true,
                    first: 0,
                    last: 0,
                });
        }
    }

    /// Starts a round: takes the notified paths and sends their reads
    /// (deletes need no read); [`Hub::finish_round`] takes it from there.
    /// Up to [`PIPELINE`] rounds are in flight, so a notification that
    /// arrives while a read is out is read at once, not after that reply.
    fn start_round(&mut self) {
        let Some(session) = self.session.clone() else {
            return;
        };
        // Complete drain first: what arrives from here on arrived after
        // every notification of the batch (see `tighten`).
        self.drain();
        if self.dirty.is_empty() {
            return;
        }
        let epoch = self.epoch;
        let batch = std::mem::take(&mut self.dirty);
        let deletes: HashMap<String, u64> = batch
            .iter()
            .filter(|(_, d)| !d.read)
            .map(|(p, d)| (p.clone(), d.above))
            .collect();
        let to_read: Vec<String> = batch
            .iter()
            .filter(|(_, d)| d.read)
            .map(|(p, _)| p.clone())
            .collect();
        // The parents of deleted znodes, read too: a parent's `pzxid` is
        // the zxid of its last child created or deleted (see below).
        let mut parents: Vec<String> = deletes.keys().filter_map(|p| parent_of(p)).collect();
        parents.sort();
        parents.dedup();
        let all: Vec<String> = to_read.iter().chain(&parents).cloned().collect();
        let mut read: BoxFuture<'static, ReadResult> =
            Box::pin(async move { read_paths(&session.client, &all).await });
        // Polled once now so the requests go out now, in order with the
        // other rounds (the client sends a request when it is made).
        if let Some(done) = read.as_mut().now_or_never() {
            read = Box::pin(std::future::ready(done));
        }
        self.inflight.push_back(Round {
            epoch,
            batch,
            deletes,
            to_read,
            parents,
            sent: Instant::now(),
            read,
        });
    }

    /// Waits for every round in flight and finishes it, in order.
    async fn settle(&mut self) {
        while let Some(mut round) = self.inflight.pop_front() {
            let got = (&mut round.read).await;
            self.finish_round(round, got);
        }
    }

    /// Finishes the oldest round once its read is back: takes the
    /// notifications that arrived meanwhile and hands every watch the
    /// changes up to the watermark.
    fn finish_round(&mut self, round: Round, got: ReadResult) {
        let Round {
            epoch,
            batch,
            mut deletes,
            to_read,
            parents,
            sent,
            read: _,
        } = round;
        if self.epoch != epoch {
            return; // the resync takes over
        }
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                if let Stop::Transient(e) = self.stop(e) {
                    self.transient(e);
                }
                return;
            }
        };
        let now = codec::now_millis();
        let mut results: Vec<(String, Option<KvPair>)> = Vec::with_capacity(batch.len());
        let mut failed: Vec<(String, zk::Error)> = Vec::new();
        // (path, its batch entry's last drain, the mzxid read)
        let mut found: Vec<(usize, u64, u64)> = Vec::new();
        let mut got = got;
        let parent_reads = got.split_off(to_read.len().min(got.len()));
        let mut pzxids: HashMap<String, u64> = HashMap::new();
        for (parent, r) in parents.into_iter().zip(parent_reads) {
            if let Ok(Some((_, stat))) = r {
                let pzxid = stat.pzxid as u64;
                self.seen = self.seen.max(pzxid);
                pzxids.insert(parent, pzxid);
            }
        }
        // Per parent, how many znodes of the batch are its children.
        let mut siblings: HashMap<String, usize> = HashMap::new();
        for p in batch.keys() {
            if let Some(q) = parent_of(p) {
                *siblings.entry(q).or_default() += 1;
            }
        }
        let delete_lasts: Vec<(String, u64)> = batch
            .iter()
            .filter(|(_, d)| !d.read && d.last > 0)
            .map(|(p, d)| (p.clone(), d.last))
            .collect();
        let mut got = to_read.into_iter().zip(got);
        // Per result: whether it was read (not a delete taken as such).
        let mut got_read: Vec<bool> = Vec::with_capacity(batch.len());
        for (path, d) in batch {
            if !d.read {
                results.push((path, None));
                got_read.push(false);
                continue;
            }
            match got.next() {
                Some((_, Ok(Some((data, stat))))) => {
                    let mzxid = stat.mzxid as u64;
                    self.seen = self.seen.max(mzxid);
                    if d.last > 0 {
                        found.push((results.len(), d.last, mzxid));
                    }
                    let kv = super::to_pair(&path, data, &stat, now);
                    results.push((path, kv));
                    got_read.push(true);
                }
                Some((_, Ok(None))) => {
                    results.push((path, None));
                    got_read.push(true);
                }
                Some((p, Err(e))) => failed.push((p, e)),
                None => {}
            }
        }
        self.drain();
        if self.epoch != epoch {
            return; // the resync takes over
        }
        // A path read as present with no later notification but deletes is
        // exactly at its last notified change: its mzxid is that change's
        // zxid (a later write to it would have been notified before the
        // reply, a delete reflected would have shown it missing).
        let mut facts: Vec<(u64, u64)> = found
            .into_iter()
            .filter(|(i, _, _)| !self.read_pending(&results[*i].0))
            .map(|(_, last, mzxid)| (last, mzxid))
            .collect();
        // A delete that is the batch's only change below its parent, with
        // no later one notified, and whose parent's children are all
        // notified (inside a prefix watch): the parent's `pzxid` is exactly
        // the delete's zxid.
        let pending_parents: BTreeSet<String> =
            self.unread().filter_map(|(p, _)| parent_of(p)).collect();
        for (path, last) in delete_lasts {
            let Some(q) = parent_of(&path) else { continue };
            let Some(&pzxid) = pzxids.get(&q) else {
                continue;
            };
            if siblings.get(&q) == Some(&1)
                && !pending_parents.contains(&q)
                && self.children_all_notified(&q)
            {
                deletes.insert(path, pzxid.saturating_sub(1));
                facts.push((last, pzxid));
            }
        }
        tracing::trace!(?facts, "zookeeper watches: facts");
        self.tighten(facts);
        let read_now: HashSet<&str> = results
            .iter()
            .zip(&got_read)
            .filter(|(_, ok)| **ok)
            .map(|((p, _), _)| p.as_str())
            .collect();
        let watermark = self.watermark_after(&read_now);
        tracing::trace!(
            watermark,
            seen = self.seen,
            pending = self.dirty.len(),
            inflight = self.inflight.len(),
            read_us = sent.elapsed().as_micros() as u64,
            "zookeeper watches: round read"
        );
        // What each delete of the batch is known to be above.
        let bounds: HashMap<String, u64> = deletes;
        // Per watch, its share of the results.
        let mut per: HashMap<u64, Reads> = HashMap::new();
        for (path, kv) in results {
            for id in self.route(&path) {
                per.entry(id).or_default().insert(path.clone(), kv.clone());
            }
        }
        for (path, e) in failed {
            for id in self.route(&path) {
                per.remove(&id);
                if let Some(sub) = self.subs.get(&id) {
                    sub.shared.end(Some(error::map(e.clone(), "watch", &path)));
                }
                self.remove(id);
            }
        }
        let mut held = Vec::new();
        for (id, reads) in per {
            let Some(sub) = self.subs.get_mut(&id) else {
                continue;
            };
            if !sub.shared.room_for(reads.len()) {
                tracing::trace!(
                    path = sub.range.path(),
                    "zookeeper watch: consumer behind, detached"
                );
                continue;
            }
            let applied = sub
                .view
                .apply_with(reads, watermark, |p| bounds.get(p).copied().unwrap_or(0));
            tracing::trace!(path = sub.range.path(), events = applied.events.len(), held = ?applied.held, "zookeeper watches: applied");
            sub.shared.push(applied.events);
            held.extend(applied.held);
        }
        self.hold(held, watermark);
    }

    /// Re-reads the ranges of `ids` (detached watches drained by their
    /// consumer) and emits the differences.
    async fn resync(&mut self, ids: Vec<u64>) {
        let Some(session) = self.session.clone() else {
            self.resync_some.extend(ids);
            return;
        };
        let epoch = self.epoch;
        let ranges: Vec<Range> = ids
            .iter()
            .filter_map(|id| self.subs.get(id).map(|s| s.range.clone()))
            .collect();
        let reads = match read_ranges(&session.client, &ranges).await {
            Ok((reads, seen)) => {
                self.seen = self.seen.max(seen);
                reads
            }
            Err(e) => {
                self.resync_some.extend(ids);
                if let Stop::Transient(e) = self.stop(e) {
                    self.transient(e);
                }
                return;
            }
        };
        self.drain();
        if self.epoch != epoch {
            self.resync_some.extend(ids);
            return;
        }
        let watermark = self.watermark();
        let mut held = Vec::new();
        for id in ids {
            if let Some(sub) = self.subs.get_mut(&id) {
                sub.shared.resume();
                held.extend(converge(sub, &reads, watermark));
            }
        }
        self.hold(held, watermark);
    }

    /// After a disconnection or a new session: registers every server
    /// watch again (zookeeper-client 0.11 does not), `sync`s, re-reads
    /// every range and emits the differences.
    async fn resync_everything(&mut self) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let client = &session.client;
        if !conn::is_connected(client) {
            self.connected = false;
            return;
        }
        self.servers.generation += 1;
        let epoch = self.epoch;
        let keys = self.servers.keys();
        let registered = join_all(keys.iter().map(|k| Servers::register(client, k))).await;
        for (key, r) in keys.iter().zip(registered) {
            match r {
                Ok(w) => self.servers.renew(key, w),
                Err(e) => {
                    if let Stop::Transient(e) = self.stop(e) {
                        self.transient(e);
                    }
                    return;
                }
            }
        }
        let ranges: Vec<Range> = self.subs.values().map(|s| s.range.clone()).collect();
        let namespace = self.inner.namespace_path.clone();
        let read = async {
            client.sync(&namespace).await?;
            read_ranges(client, &ranges).await
        };
        let reads = match read.await {
            Ok((reads, seen)) => {
                self.seen = self.seen.max(seen);
                reads
            }
            Err(e) => {
                if let Stop::Transient(e) = self.stop(e) {
                    self.transient(e);
                }
                return;
            }
        };
        self.drain();
        if self.epoch != epoch {
            return;
        }
        self.resync_all = false;
        let watermark = self.watermark();
        let mut held = Vec::new();
        let mut detached = 0;
        for sub in self.subs.values_mut() {
            if sub.shared.is_live() {
                held.extend(converge(sub, &reads, watermark));
            } else {
                detached += 1;
            }
        }
        tracing::debug!(
            watches = self.subs.len(),
            detached,
            "zookeeper watches: registered again, ranges re-read"
        );
        self.hold(held, watermark);
    }
}

/// Watches whose key or prefix base share a parent znode, from which on
/// that parent gets one `PersistentRecursive` watch serving all of them
/// (and any later one below it) instead of one server watch each: a server
/// watch costs the client about 0.8 KiB and the setup a request. The price
/// is that changes to unwatched znodes below that parent are notified too
/// (and dropped by the hub without a read).
pub(crate) const SHARE_AT: usize = 64;

/// The parent znode a watch counts towards (see [`SHARE_AT`]); never `/`,
/// whose recursive watch would cover ZooKeeper's own subtree.
fn shared_parent(range: &Range) -> Option<&str> {
    let path = range.path();
    let i = path.rfind('/')?;
    (i > 0).then(|| &path[..i])
}

/// Hands a watch its whole range as read now: a key it knows and the read
/// lacks is a delete (Converge).
fn converge(sub: &mut Sub, reads: &RangeReads, watermark: u64) -> Vec<(String, u64)> {
    let mut now = reads.of(&sub.range);
    for p in sub.view.paths() {
        if !now.contains_key(p) {
            now.insert(p.clone(), None);
        }
    }
    // A re-sync into an empty queue may exceed the buffer: it is bounded
    // by the range.
    if !sub.shared.room_for(now.len()) {
        return Vec::new();
    }
    let applied = sub.view.apply(now, watermark);
    sub.shared.push(applied.events);
    applied.held
}

/// The parent of a znode path (`None` for the root and top-level znodes'
/// parent `/`, which is returned as `/`).
fn parent_of(path: &str) -> Option<String> {
    let i = path.rfind('/')?;
    if path.len() <= 1 {
        return None;
    }
    Some(if i == 0 {
        "/".to_owned()
    } else {
        path[..i].to_owned()
    })
}

/// The same error again, for each of several watches (errors are not
/// `Clone`): same kind, same message, same *never sent* marking.
fn again(e: &Error) -> Error {
    let message = e.to_string();
    match e.kind() {
        ErrorKind::Unavailable if e.never_reached_server() => {
            Error::not_sent(BACKEND, message.clone(), message)
        }
        ErrorKind::Cancelled => super::cancelled(),
        kind => Error::of_kind(kind, BACKEND, message),
    }
}

/// The read of the oldest round in flight (pending forever if none).
async fn oldest(inflight: &mut VecDeque<Round>) -> ReadResult {
    match inflight.front_mut() {
        Some(round) => (&mut round.read).await,
        None => std::future::pending().await,
    }
}

/// Reads paths with multi-reads of 64, all sent at once (pipelined on the
/// connection): per path its data and stat, `None` if missing, or its own
/// error.
async fn read_paths(client: &zk::Client, paths: &[String]) -> ReadResult {
    let chunks = paths.chunks(tree::READ_CHUNK).map(|chunk| async move {
        let mut reader = client.new_multi_reader();
        for p in chunk {
            reader.add_get_data(p)?;
        }
        reader.commit().await
    });
    let mut out = Vec::with_capacity(paths.len());
    for results in join_all(chunks).await {
        for r in results? {
            out.push(match r {
                MultiReadResult::Data { data, stat } => Ok(Some((data, stat))),
                MultiReadResult::Error {
                    err: zk::Error::NoNode,
                } => Ok(None),
                MultiReadResult::Error { err } => Err(err),
                _ => Ok(None),
            });
        }
    }
    Ok(out)
}

/// Reads whole ranges: keys in pipelined multi-reads, each distinct prefix
/// once (all prefixes level by level in shared multi-reads). Returns the reads and the largest `mzxid`.
async fn read_ranges(
    client: &zk::Client,
    ranges: &[Range],
) -> Result<(RangeReads, u64), zk::Error> {
    let mut keys: Vec<String> = Vec::new();
    let mut bases: Vec<String> = Vec::new();
    for r in ranges {
        match r {
            Range::Key(p) => keys.push(p.clone()),
            Range::Below(b) => bases.push(b.clone()),
        }
    }
    keys.sort();
    keys.dedup();
    bases.sort();
    bases.dedup();
    let (got, scans) = futures::join!(read_paths(client, &keys), tree::scan_many(client, &bases));
    let now = codec::now_millis();
    let mut seen = 0;
    let mut out = RangeReads::default();
    for (path, r) in keys.into_iter().zip(got?) {
        let kv = match r? {
            Some((data, stat)) => {
                seen = seen.max(stat.mzxid as u64);
                super::to_pair(&path, data, &stat, now)
            }
            None => None,
        };
        out.keys.insert(path, kv);
    }
    for (base, nodes) in bases.into_iter().zip(scans?) {
        let mut pairs = Vec::new();
        for n in nodes {
            seen = seen.max(n.stat.mzxid as u64);
            if let Node::Key(value) = codec::classify(n.data, &n.stat, now)
                && let Some(key) = codec::key_of(&n.path)
            {
                pairs.push((n.path, codec::pair(key, value, &n.stat)));
            }
        }
        out.bases.insert(base, pairs);
    }
    Ok((out, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hold_one_or_many_and_say_when_empty() {
        let mut ids = Ids::One(1);
        ids.push(2);
        ids.push(3);
        assert_eq!(ids.iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!ids.remove(2));
        assert!(!ids.remove(1));
        assert!(matches!(ids, Ids::One(3)));
        assert!(!ids.remove(7), "another id leaves it as it was");
        assert_eq!(ids.iter().collect::<Vec<_>>(), [3]);
        assert!(ids.remove(3));
    }

    #[test]
    fn the_shared_parent_is_never_the_root() {
        assert_eq!(shared_parent(&Range::Key("/ns/k/1".into())), Some("/ns/k"));
        assert_eq!(shared_parent(&Range::Below("/ns/p".into())), Some("/ns"));
        assert_eq!(shared_parent(&Range::Key("/k".into())), None);
        assert_eq!(shared_parent(&Range::Below("/".into())), None);
    }
}

//! Leader election, written once over sessions, `list` and `watch` (the
//! recipe of etcd's `concurrency.Election` and Curator's `LeaderLatch`), so
//! it behaves the same on every backend that has sessions.
//!
//! Each candidate writes one ephemeral key `NAME/<id>` under a session of its
//! own. Candidates are ordered by the key's `create_revision`: the oldest
//! leads, the others each wait for the deletion of the candidate just before
//! them (no herd). The leader's `create_revision` is its term: a later
//! candidate's key is always created later, so terms strictly increase from
//! one leader to the next. The session renews its lease in the background
//! from the moment the candidate enters the queue, so a long wait never
//! wakes up with a dead lease (etcd-client #14 / #89).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use tokio::{sync::Mutex, task::JoinHandle, time::Instant};

use crate::{
    error::{Error, ErrorKind, Result},
    ext::StoreExt,
    key::{Key, Prefix},
    lock::{LostNotifier, LostSignal, lost_pair},
    session::{Session, SessionOptions},
    store::Store,
    types::{Condition, Event, KvPair, Start, Target, Version},
};

/// Options of [`Election::campaign`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CampaignOptions {
    /// TTL of the candidate's session: a leader whose process dies or
    /// freezes loses leadership this long after its last renewal.
    pub ttl: Duration,
    /// How long to wait for leadership; `None`: as long as it takes. Past it
    /// the campaign fails with `Error::Timeout` and leaves nothing behind.
    pub wait: Option<Duration>,
}

impl Default for CampaignOptions {
    fn default() -> Self {
        CampaignOptions {
            ttl: Duration::from_secs(10),
            wait: None,
        }
    }
}

impl CampaignOptions {
    /// Sets the session TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how long to wait for leadership.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }
}

/// The current leader of an election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    /// The value the leader campaigned with or last proclaimed.
    pub value: Bytes,
    /// Its term: strictly increasing across successive leaders.
    pub term: u64,
    /// The leader's candidate key.
    pub key: Key,
}

/// An election named by a key; see [`StoreExt::election`].
///
/// ```no_run
/// # async fn demo(kv: anykv_core::Kv) -> anykv_core::Result<()> {
/// use anykv_core::{CampaignOptions, Key, StoreExt};
/// let election = kv.election(&Key::new("leaders/scheduler")?);
/// let leadership = election.campaign("node-1".into(), CampaignOptions::default()).await?;
/// println!("leading in term {}", leadership.term());
/// tokio::select! {
///     () = leadership.lost() => eprintln!("lost leadership: stop"),
///     () = async { /* the leader's work, fenced with leadership.term() */ } => {}
/// }
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Election<S> {
    store: S,
    name: Key,
}

/// Why a candidate key belongs to an election: one level below its name.
fn candidates(name: &Prefix, pairs: Vec<KvPair>) -> Vec<KvPair> {
    let mut c: Vec<KvPair> = pairs
        .into_iter()
        .filter(|kv| {
            name.child_name(kv.key.as_str())
                .is_some_and(|child| kv.key.as_str().len() == name.dir().len() + child.len())
        })
        .collect();
    c.sort_by_key(|kv| kv.create_revision);
    c
}

fn lost_leadership(key: &Key, backend: &'static str) -> Error {
    Error::LockLost {
        backend,
        key: key.to_string(),
    }
}

impl<S: Store + Clone> Election<S> {
    pub(crate) fn new(store: S, name: Key) -> Self {
        Election { store, name }
    }

    /// The election's name.
    pub fn name(&self) -> &Key {
        &self.name
    }

    fn prefix(&self) -> Prefix {
        self.name.as_prefix()
    }

    async fn queue(&self) -> Result<Vec<KvPair>> {
        Ok(candidates(
            &self.prefix(),
            self.store.list(&self.prefix()).await?,
        ))
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        Ok(self.queue().await?.into_iter().next().map(|kv| Leader {
            value: kv.value,
            term: kv.create_revision,
            key: kv.key,
        }))
    }

    /// Waits until this candidate leads (first come, first served),
    /// renewing its session while it waits. Fails with `Timeout` after
    /// `opts.wait`, with `LockLost` if its session ends while it waits; in
    /// both cases its candidacy is withdrawn.
    pub async fn campaign(&self, value: Bytes, opts: CampaignOptions) -> Result<Leadership<S>> {
        let session = self
            .store
            .session(SessionOptions::with_ttl(opts.ttl))
            .await?;
        let deadline = opts.wait.map(|w| Instant::now() + w);
        let key = self.name.child(&candidate_id(&session));
        let result = self.enqueue_and_wait(&session, &key, value, deadline).await;
        match result {
            Ok((version, term)) => Ok(Leadership::start(
                self.store.clone(),
                session,
                key,
                term,
                version,
            )),
            Err(e) => {
                // Withdraw: closing the session deletes the candidate key.
                if let Err(close) = session.close().await {
                    tracing::debug!(error = %close, "withdrawing a candidate: its TTL will");
                }
                Err(e)
            }
        }
    }

    async fn enqueue_and_wait(
        &self,
        session: &Session,
        key: &Key,
        value: Bytes,
        deadline: Option<Instant>,
    ) -> Result<(Version, u64)> {
        let version = session.put(key, value, Condition::IfAbsent).await?;
        let backend = self.store.backend();
        loop {
            let queue = self.queue().await?;
            let Some(pos) = queue.iter().position(|kv| &kv.key == key) else {
                return Err(lost_leadership(key, backend));
            };
            let mine = &queue[pos];
            if pos == 0 {
                let _ = version;
                return Ok((mine.version, mine.create_revision));
            }
            // Wait for the candidate just before this one to go.
            let before = queue[pos - 1].clone();
            let mut w = self
                .store
                .watch(
                    Target::Key(before.key.clone()),
                    Start::After(before.mod_revision),
                )
                .await?;
            // A Converge watch does not report a delete that happened before
            // it started: look again now that it runs.
            if self.store.get(&before.key).await?.is_none() {
                continue;
            }
            let lost = session.lost();
            let gone = async {
                while let Some(item) = w.next().await {
                    match item {
                        Ok(Event::Delete { .. }) => return Ok(()),
                        Ok(Event::Put { .. }) => {}
                        Err(e) if e.kind() == ErrorKind::Unavailable => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            };
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = gone => r?,
                () = lost => return Err(lost_leadership(key, backend)),
                () = until => return Err(Error::Timeout {
                    backend,
                    operation: "campaign",
                    after: deadline.map_or(Duration::ZERO, |d| d.saturating_duration_since(Instant::now())),
                }),
            }
        }
    }

    /// The leader now, then every change (a new leader, a new value, no
    /// leader), in term order. Errors are items; the stream goes on.
    ///
    /// It follows a [`Mirror`](crate::Mirror) of the election and applies
    /// each change in turn, so a leader that leads only briefly is still
    /// reported (a fresh `list` after each change could skip it).
    pub fn observe(&self) -> BoxStream<'static, Result<Option<Leader>>> {
        let election = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let prefix = election.prefix();
            let mirror = loop {
                match election.store.mirror(&prefix).await {
                    Ok(m) => break m,
                    Err(e) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            // Subscribe first, then read: a change in between is in both,
            // and applying it twice is a no-op.
            let mut changes = mirror.changes();
            let mut queue: BTreeMap<Key, KvPair> = candidates(&prefix, mirror.list(&prefix))
                .into_iter()
                .map(|kv| (kv.key.clone(), kv))
                .collect();
            let mut last: Option<Option<Leader>> = None;
            loop {
                let now = leader_of(&queue);
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                let item = tokio::select! {
                    item = changes.next() => item,
                    () = tx.closed() => return,
                };
                match item {
                    Some(Ok(Event::Put { kv, .. })) => {
                        if candidates(&prefix, vec![kv.clone()]).is_empty() {
                            continue;
                        }
                        let newer = queue
                            .get(&kv.key)
                            .is_none_or(|old| old.mod_revision < kv.mod_revision);
                        if newer {
                            queue.insert(kv.key.clone(), kv);
                        }
                    }
                    Some(Ok(Event::Delete { key, revision })) => {
                        if queue
                            .get(&key)
                            .is_some_and(|old| old.mod_revision <= revision)
                        {
                            queue.remove(&key);
                        }
                    }
                    Some(Err(e)) => {
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
    }
}

/// The leader of a queue of candidates: the oldest.
fn leader_of(queue: &BTreeMap<Key, KvPair>) -> Option<Leader> {
    queue
        .values()
        .min_by_key(|kv| kv.create_revision)
        .map(|kv| Leader {
            value: kv.value.clone(),
            term: kv.create_revision,
            key: kv.key.clone(),
        })
}

/// A candidate key's last segment: unique per campaign.
fn candidate_id(session: &Session) -> String {
    let id: String = session
        .id()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(40)
        .collect();
    format!("{id}-{:08x}", rand::random::<u32>())
}

/// This candidate leads; see [`Election::campaign`]. Dropping it resigns.
pub struct Leadership<S: Store + Clone> {
    store: S,
    key: Key,
    term: u64,
    version: Arc<Mutex<Version>>,
    session: Option<Session>,
    lost: LostSignal,
    notifier: LostNotifier,
    guard: JoinHandle<()>,
}

impl<S: Store + Clone> std::fmt::Debug for Leadership<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key)
            .field("term", &self.term)
            .field("lost", &self.lost.is_lost())
            .finish()
    }
}

impl<S: Store + Clone> Leadership<S> {
    fn start(store: S, session: Session, key: Key, term: u64, version: Version) -> Self {
        let (notifier, lost) = lost_pair();
        // Leadership ends with the session or with the candidate key (a
        // delete by anyone, e.g. an operator).
        let guard = {
            let (store, key, notifier) = (store.clone(), key.clone(), notifier.clone());
            let session_lost = session.lost();
            tokio::spawn(async move {
                let key_gone = async {
                    loop {
                        let Ok(mut w) = store.watch(Target::Key(key.clone()), Start::Now).await
                        else {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        };
                        if matches!(store.get(&key).await, Ok(None)) {
                            return;
                        }
                        while let Some(item) = w.next().await {
                            if matches!(item, Ok(Event::Delete { .. })) {
                                return;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = session_lost => {}
                    () = key_gone => {}
                }
                notifier.notify();
            })
        };
        Leadership {
            store,
            key,
            term,
            version: Arc::new(Mutex::new(version)),
            session: Some(session),
            lost,
            notifier,
            guard,
        }
    }

    /// The fencing token of this leadership: strictly greater than every
    /// earlier leader's.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The candidate key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Updates the leader's value, only while it still leads: a fenced
    /// write that fails with `LockLost` once leadership is gone.
    pub async fn proclaim(&self, value: Bytes) -> Result<()> {
        let backend = self.store.backend();
        if self.lost.is_lost() {
            return Err(lost_leadership(&self.key, backend));
        }
        let Some(session) = &self.session else {
            return Err(lost_leadership(&self.key, backend));
        };
        let mut version = self.version.lock().await;
        match session
            .put(&self.key, value, Condition::IfVersion(*version))
            .await
        {
            Ok(v) => {
                *version = v;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::NotFound | ErrorKind::Conflict | ErrorKind::LockLost
                ) =>
            {
                self.notifier.notify();
                Err(lost_leadership(&self.key, backend))
            }
            Err(e) => Err(e),
        }
    }

    /// Resolves when leadership is gone (resigned, session lost, key deleted).
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.lost.clone().wait()
    }

    /// True once leadership is gone.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// Gives leadership up: the next candidate leads.
    pub async fn resign(mut self) -> Result<()> {
        self.notifier.notify();
        self.guard.abort();
        match self.session.take() {
            Some(s) => s.close().await,
            None => Ok(()),
        }
    }
}

impl<S: Store + Clone> Drop for Leadership<S> {
    fn drop(&mut self) {
        self.notifier.notify();
        self.guard.abort();
        // Dropping the session closes it in the background.
        drop(self.session.take());
    }
}

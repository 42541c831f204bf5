//! The server-side watches of a store's hub, shared by the anykv watches
//! they cover, and their notifications merged into one stream.
//!
//! A watch on a key or prefix that lies under a registered
//! `PersistentRecursive` watch (or on the same key as a `Persistent` one)
//! uses that one; otherwise it registers its own. Each server watch counts
//! its users; the last one leaving drops the zookeeper-client watcher,
//! which removes the watch from the server.

use std::{
    collections::{BTreeMap, HashSet},
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::{
    FutureExt, StreamExt,
    stream::{AbortHandle, Abortable, BoxStream, SelectAll},
    task::ArcWake,
};
use zookeeper_client::{self as zk, AddWatchMode, PersistentWatcher};

use super::Range;
use crate::codec;

/// A server watch: its path and whether it is recursive.
pub(crate) type ServerKey = (String, bool);

/// The server watch that serves `range` when it has none of its own.
pub(crate) fn own_key(range: &Range) -> ServerKey {
    match range {
        Range::Key(p) => (p.clone(), false),
        Range::Below(p) => (p.clone(), true),
    }
}

fn mode(key: &ServerKey) -> AddWatchMode {
    if key.1 {
        AddWatchMode::PersistentRecursive
    } else {
        AddWatchMode::Persistent
    }
}

struct Server {
    users: u32,
    abort: AbortHandle,
}

/// A notification, with the generation of the registration it came from
/// (registrations are renewed after a reconnect; older ones are ignored).
pub(crate) type Notified = (u64, Option<zk::WatchedEvent>);

/// The registered server watches.
#[derive(Default)]
pub(crate) struct Servers {
    /// Sorted, so that the watches below a path are one range (see
    /// [`Servers::merge_under`]).
    map: BTreeMap<ServerKey, Server>,
    streams: SelectAll<Abortable<BoxStream<'static, Notified>>>,
    /// Generation of the current registrations.
    pub(crate) generation: u64,
}

impl Servers {
    /// A registered watch that already serves `range`.
    pub(crate) fn covering(&self, range: &Range) -> Option<ServerKey> {
        let own = own_key(range);
        if self.map.contains_key(&own) {
            return Some(own);
        }
        // A recursive watch on a key's own path serves the key too.
        if let Range::Key(p) = range
            && self.map.contains_key(&(p.clone(), true))
        {
            return Some((p.clone(), true));
        }
        let path = range.path();
        let mut ancestors = codec::ancestors(path);
        if path != "/" {
            ancestors.push("/");
        }
        ancestors
            .into_iter()
            .map(|a| (a.to_owned(), true))
            .find(|k| self.map.contains_key(k))
    }

    /// One more user of a registered watch.
    pub(crate) fn attach(&mut self, key: &ServerKey) {
        if let Some(s) = self.map.get_mut(key) {
            s.users += 1;
        }
    }

    /// A newly registered watch, without users yet ([`Servers::attach`]
    /// them, then [`Servers::prune`] the new ones).
    pub(crate) fn insert(&mut self, key: ServerKey, watcher: PersistentWatcher) {
        let abort = self.add_stream(watcher);
        if let Some(old) = self.map.insert(key, Server { users: 0, abort }) {
            old.abort.abort();
        }
    }

    /// Moves the users of every watch that recursive watch `base` also
    /// serves onto `base`, and drops those watches: registered watches
    /// never overlap, so no change is notified twice (zookeeper-client
    /// hands a notification to every local watcher it matches, and two
    /// copies could not be told from two changes). Returns the keys moved.
    pub(crate) fn merge_under(&mut self, base: &ServerKey) -> HashSet<ServerKey> {
        if !base.1 || !self.map.contains_key(base) {
            return HashSet::new();
        }
        // The key on the base's own path, then everything below it: the
        // paths that start with `base/` sort between `base/` and `base0`
        // ('0' follows '/'). Only those are visited, not every watch.
        let mut moved: HashSet<ServerKey> = HashSet::new();
        let own = (base.0.clone(), false);
        if self.map.contains_key(&own) {
            moved.insert(own);
        }
        let inside = Range::Below(base.0.clone());
        let (from, to) = if base.0 == "/" {
            ("/".to_owned(), "0".to_owned())
        } else {
            (format!("{}/", base.0), format!("{}0", base.0))
        };
        moved.extend(
            self.map
                .range((from, false)..(to, false))
                .map(|(k, _)| k)
                .filter(|k| *k != base && inside.contains(&k.0))
                .cloned(),
        );
        let mut users = 0;
        for k in &moved {
            if let Some(s) = self.map.remove(k) {
                users += s.users;
                s.abort.abort();
            }
        }
        if let Some(b) = self.map.get_mut(base) {
            b.users += users;
        }
        moved
    }

    /// Removes those of `keys` nobody uses (not every watch: this runs
    /// once per batch of new watches).
    pub(crate) fn prune<'k>(&mut self, keys: impl IntoIterator<Item = &'k ServerKey>) {
        for key in keys {
            if self.map.get(key).is_some_and(|s| s.users == 0)
                && let Some(s) = self.map.remove(key)
            {
                s.abort.abort();
            }
        }
    }

    /// One user fewer; the last one removes the server watch.
    pub(crate) fn release(&mut self, key: &ServerKey) {
        let Some(s) = self.map.get_mut(key) else {
            return;
        };
        s.users = s.users.saturating_sub(1);
        if s.users > 0 {
            return;
        }
        if let Some(s) = self.map.remove(key) {
            // Dropping the watcher (with its stream) removes the server
            // watch unless another watcher of the client has that path.
            s.abort.abort();
        }
    }

    pub(crate) fn keys(&self) -> Vec<ServerKey> {
        self.map.keys().cloned().collect()
    }

    /// Replaces a watch's registration by a new one (after a reconnect),
    /// keeping its users. The new watcher is registered before the old one
    /// is dropped, so the server watch stays.
    pub(crate) fn renew(&mut self, key: &ServerKey, watcher: PersistentWatcher) {
        let abort = self.add_stream(watcher);
        match self.map.get_mut(key) {
            Some(s) => std::mem::replace(&mut s.abort, abort).abort(),
            None => abort.abort(),
        }
    }

    /// Registers `key` on the server. The request is sent at once (not
    /// when the future is first polled), so requests made after this call
    /// are served after it.
    pub(crate) fn register<'a>(
        client: &'a zk::Client,
        key: &ServerKey,
    ) -> impl Future<Output = Result<PersistentWatcher, zk::Error>> + Send + 'a {
        client.watch(&key.0, mode(key))
    }

    /// The next notification of any registration (pending forever if none).
    pub(crate) async fn next(&mut self) -> Notified {
        if self.streams.is_empty() {
            return std::future::pending().await;
        }
        match self.streams.next().await {
            Some(n) => n,
            None => std::future::pending().await,
        }
    }

    /// A notification already received, if any. `None` means none is
    /// waiting: the merged stream may answer `Pending` to share the CPU
    /// while items are ready (waking itself), so that is polled through.
    pub(crate) fn try_next(&mut self) -> Option<Notified> {
        if self.streams.is_empty() {
            return None;
        }
        for _ in 0..1024 {
            let flag = Arc::new(Flag(AtomicBool::new(false)));
            let waker = futures::task::waker(flag.clone());
            let mut cx = Context::from_waker(&waker);
            match self.streams.poll_next_unpin(&mut cx) {
                Poll::Ready(n) => return n,
                Poll::Pending if flag.0.load(Ordering::Acquire) => continue,
                Poll::Pending => return None,
            }
        }
        None
    }

    fn add_stream(&mut self, watcher: PersistentWatcher) -> AbortHandle {
        let generation = self.generation;
        let (abort, registration) = AbortHandle::new_pair();
        // zookeeper-client panics when a watcher is polled after its
        // session ended: that is caught, reported once as `None`, and the
        // stream ends.
        let stream = futures::stream::unfold(Some(watcher), move |w| async move {
            let mut w = w?;
            match AssertUnwindSafe(w.changed()).catch_unwind().await {
                Ok(e) if e.session_state.is_terminated() => Some(((generation, Some(e)), None)),
                Ok(e) => Some(((generation, Some(e)), Some(w))),
                Err(_) => Some(((generation, None), None)),
            }
        });
        self.streams
            .push(Abortable::new(stream.boxed(), registration));
        abort
    }
}

/// A waker that only records that it was woken.
struct Flag(AtomicBool);

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.store(true, Ordering::Release);
    }
}

//! Sessions: a ZooKeeper session of their own (a new client connection
//! whose session timeout is the TTL); their keys are EPHEMERAL znodes of
//! it, written by the conditional put of [`write::put_checked`], so the
//! value encoding, implicit parents and versions (`mzxid`) are an ordinary
//! key's. Closing the client closes the session: the server deletes its
//! ephemerals at once. A disconnection is not a loss: the client reconnects
//! and, within the timeout, the session and its znodes survive; the session
//! is lost when its state turns `Expired` (the server said so on reconnect,
//! or the client gave up after 7/5 of the timeout without a server), `Closed`
//! or `AuthFailed`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use anykv_core::{
    Bytes, Condition, Error, ErrorKind, Key, LostNotifier, LostSignal, Result, Session,
    SessionBackend, SessionOptions, Version, async_trait, lost_pair,
};
use tokio::sync::oneshot;
use zookeeper_client::{self as zk, StateWatcher};

use crate::{
    Inner, codec,
    conn::{self, Session as ZkConn},
    error::BACKEND,
    write::{self, Cx, Kind},
};

/// How long past its TTL a dead session's keys may survive, with the
/// default `tickTime` of 2 s. ZooKeeper's session tracker expires sessions
/// in buckets of one `tickTime`, rounding each deadline up to the next
/// bucket, then deletes the ephemerals through the commit pipeline: a dead
/// session's keys go between TTL and TTL + tickTime (+ the commit). Measured
/// at the minimum TTL (4 s, tickTime 2 s) on a loaded 2-core VM: 0.0–1.65 s
/// past the TTL after a freeze (`tests/session.rs`, `…_figures`), 2.0 s
/// after a SIGKILL (`tests/tests/coordination_faults.rs`). It does not grow
/// with the TTL; it is one `tickTime` plus the commit, so a server with a
/// larger `tickTime` (which also raises the minimum TTL, 2 × tickTime) has
/// a coarser one.
pub(crate) const SESSION_GRANULARITY: Duration = Duration::from_secs(3);

/// Sessions opened by a store that are still open, by id: for tests that
/// expire one from outside ([`crate::ZkStore::session_info_of`]).
pub(crate) type Registry = Mutex<HashMap<String, zk::SessionInfo>>;

/// Opens a session of its own with `opts.ttl` as its session timeout.
pub(crate) async fn start(inner: &Arc<Inner>, opts: SessionOptions) -> Result<Session> {
    let client = inner.conn.connect_with(opts.ttl).await?;
    // What the server granted: `opts.ttl` clamped to its
    // [minSessionTimeout, maxSessionTimeout] (2 and 20 ticks by default).
    let ttl = client.session_timeout();
    let sid = client.session_id().0;
    let id = format!("{sid:x}");
    let states = client.state_watcher();
    registry(inner).insert(id.clone(), client.session().clone());
    let (notifier, lost) = lost_pair();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(monitor(
        states.clone(),
        notifier.clone(),
        stopped,
        Arc::downgrade(inner),
        id.clone(),
    ));
    tracing::debug!(session = %id, ?ttl, "zookeeper: session for ephemeral keys opened");
    let backend = ZkSession {
        inner: inner.clone(),
        sid,
        id,
        lost: lost.clone(),
        notifier,
        open: Mutex::new(Some(Open {
            conn: Arc::new(ZkConn { client }),
            states,
            _stop: stop,
        })),
    };
    Ok(Session::new(Arc::new(backend), lost, ttl))
}

fn registry(inner: &Inner) -> std::sync::MutexGuard<'_, HashMap<String, zk::SessionInfo>> {
    inner
        .ephemeral_sessions
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Fires the lost signal when the session reaches a terminal state, or
/// when the session is closed (`stop` dropped).
async fn monitor(
    mut states: StateWatcher,
    notifier: LostNotifier,
    stopped: oneshot::Receiver<()>,
    inner: Weak<Inner>,
    id: String,
) {
    tokio::select! {
        () = conn::ended(&mut states) => {}
        _ = stopped => {}
    }
    tracing::debug!(session = %id, state = ?states.peek_state(), "zookeeper: session ended");
    notifier.notify();
    if let Some(inner) = inner.upgrade() {
        registry(&inner).remove(&id);
    }
}

/// The client of an open session.
struct Open {
    /// The only holder of the client: dropping it closes the session.
    conn: Arc<ZkConn>,
    states: StateWatcher,
    /// Dropped on close: ends the monitor, which fires the lost signal.
    _stop: oneshot::Sender<()>,
}

/// The driver's side of a [`Session`].
struct ZkSession {
    inner: Arc<Inner>,
    sid: i64,
    id: String,
    lost: LostSignal,
    /// Fired by close itself, so `lost()` has resolved when it returns.
    notifier: LostNotifier,
    /// `None` once closed.
    open: Mutex<Option<Open>>,
}

fn lost_error(key: &Key) -> Error {
    Error::LockLost {
        backend: BACKEND,
        key: key.to_string(),
    }
}

#[async_trait]
impl SessionBackend for ZkSession {
    fn id(&self) -> String {
        self.id.clone()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        let path = codec::path_of(key.as_str());
        if codec::is_system(&path) {
            return Err(crate::reserved(key));
        }
        let conn = {
            let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            match open.as_ref() {
                Some(o) if !self.lost.is_lost() => o.conn.clone(),
                _ => return Err(lost_error(key)),
            }
        };
        if !conn.usable() {
            return Err(lost_error(key));
        }
        // As for the store's own session: never hand the client a request
        // while it reconnects (it would queue it).
        if !conn::is_connected(&conn.client) {
            return Err(conn::not_connected(
                "the session is disconnected, reconnecting in the background",
            ));
        }
        let data = codec::encode(&value, None);
        let cx = Cx {
            inner: &self.inner,
            session: &conn,
            operation: "session put",
            key: key.as_str(),
        };
        match write::put_checked(&cx, key, &path, &data, condition, Kind::Ephemeral(self.sid)).await
        {
            // The session ended under the put (expired, closed).
            Err(e) if e.kind() == ErrorKind::Unavailable && !conn.usable() => Err(lost_error(key)),
            r => r,
        }
    }

    async fn close(&self) -> Result<()> {
        let open = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Open {
            conn,
            mut states,
            _stop,
        }) = open
        else {
            return Ok(());
        };
        // Dropping the last client sends CloseSession: the server deletes
        // the session's ephemerals as it closes it. A put in flight holds a
        // clone until it ends.
        drop(conn);
        // Disconnected, the client cannot tell the server: the session then
        // ends with its timeout.
        if tokio::time::timeout(
            self.inner.conn.settings.connect_timeout,
            conn::ended(&mut states),
        )
        .await
        .is_err()
        {
            tracing::debug!(session = %self.id, "zookeeper: session close not confirmed; it ends with its timeout");
        }
        self.notifier.notify();
        drop(_stop);
        Ok(())
    }
}

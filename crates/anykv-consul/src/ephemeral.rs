//! anykv sessions (`Store::session`): a Consul session with the TTL asked
//! for (see [`session::ephemeral_ttl`]), `Behavior=delete`, `LockDelay=0s`
//! and no health checks; ephemeral keys are keys the session acquires.
//!
//! - put = `[condition…, lock]` in one `/v1/txn` (see `Inner::put_in_session`):
//!   exact `AlreadyExists` / `NotFound` / `Conflict`, and the `lock`'s
//!   `ModifyIndex` as the version;
//! - kept alive by the lock code's renewal loop (every third of the TTL,
//!   sooner with backoff after a failure); "Consul does not know the
//!   session" is believed only once a `consistent` read of the session
//!   confirms it, and a silence is a loss only after a whole TTL without a
//!   successful renewal (Consul deletes the keys after 2 × TTL);
//! - close = `PUT /v1/session/destroy/<id>`: Consul deletes the keys (also
//!   sent when the keeper gives the session up for lack of renewals).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anykv_core::{
    Condition, Error, Key, LostNotifier, Result, Session, SessionBackend, SessionOptions, Version,
    async_trait, lost_pair,
};
use bytes::Bytes;
use tokio::{sync::oneshot, time::Instant};

use crate::{
    Inner,
    error::BACKEND,
    lock::{self, FIRST_RETRY, MAX_RETRY, Witness},
    session::{self, SessionKind},
};

/// Starts a session; see the module docs.
pub(crate) async fn start(inner: &Arc<Inner>, opts: SessionOptions) -> Result<Session> {
    let ttl = session::ephemeral_ttl(opts.ttl)?;
    let id = inner
        .create_session(SessionKind::Ephemeral, ttl)
        .await?
        .keep();
    let (notifier, signal) = lost_pair();
    let (stop_tx, stop_rx) = oneshot::channel();
    let backend = Arc::new(Ephemeral {
        inner: inner.clone(),
        id: id.clone(),
        ttl,
        ended: Arc::new(AtomicBool::new(false)),
        stop: Mutex::new(Some(stop_tx)),
    });
    tokio::spawn(keeper(
        inner.clone(),
        id,
        ttl,
        backend.ended.clone(),
        notifier,
        stop_rx,
    ));
    Ok(Session::new(backend, signal, ttl))
}

/// The driver's side of one session.
struct Ephemeral {
    inner: Arc<Inner>,
    id: String,
    /// The Consul session TTL.
    ttl: Duration,
    /// Closed or lost: puts fail with `LockLost` without asking Consul.
    ended: Arc<AtomicBool>,
    /// Stops the keeper (which fires `lost()` as it ends).
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

/// Renews the session until it is closed or lost; ending for any reason
/// fires `lost()`. A session given up for lack of renewals is destroyed
/// (retried, see [`destroy_retrying`]), so that its keys go as soon as the
/// agent answers again rather than when Consul expires it.
async fn keeper(
    inner: Arc<Inner>,
    id: String,
    ttl: Duration,
    ended: Arc<AtomicBool>,
    notifier: LostNotifier,
    stop: oneshot::Receiver<()>,
) {
    tokio::select! {
        _ = stop => {}
        reason = lock::renew_loop(&inner, Witness::Session, &id, ttl) => {
            tracing::debug!(session = %id, reason, "consul session lost");
            let (first, _) = oneshot::channel();
            tokio::spawn(destroy_retrying(inner.clone(), id.clone(), ttl, first));
        }
    }
    ended.store(true, Ordering::SeqCst);
    notifier.notify();
}

#[async_trait]
impl SessionBackend for Ephemeral {
    fn id(&self) -> String {
        self.id.clone()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        if self.ended.load(Ordering::SeqCst) {
            return Err(Error::LockLost {
                backend: BACKEND,
                key: key.to_string(),
            });
        }
        let version = self
            .inner
            .put_in_session(key, value, condition, &self.id)
            .await;
        if matches!(version, Err(Error::LockLost { .. })) {
            // Confirmed gone: the keeper may not have noticed yet.
            self.end();
        }
        version
    }

    /// Fires `lost()` at once, then destroys the session (Consul deletes
    /// its keys). A failed destroy (agent down, frozen) is retried in the
    /// background for up to 2 × TTL, when Consul has expired the session
    /// anyway; the first attempt's outcome is returned.
    async fn close(&self) -> Result<()> {
        if !self.end() {
            return Ok(());
        }
        let (first_tx, first_rx) = oneshot::channel();
        tokio::spawn(destroy_retrying(
            self.inner.clone(),
            self.id.clone(),
            self.ttl,
            first_tx,
        ));
        let timeout = self.inner.http.settings().timeout;
        crate::lock::first_attempt(first_rx, timeout, "session close").await
    }
}

impl Ephemeral {
    /// Marks the session ended and stops its keeper (firing `lost()`);
    /// false if it had ended already.
    fn end(&self) -> bool {
        let first = !self.ended.swap(true, Ordering::SeqCst);
        let stop = match self.stop.lock() {
            Ok(mut s) => s.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(stop);
        first
    }
}

/// Destroys the session, retrying retryable failures with backoff until
/// 2 × `ttl` from now; `first` gets the first attempt's outcome.
async fn destroy_retrying(
    inner: Arc<Inner>,
    id: String,
    ttl: Duration,
    first: oneshot::Sender<Result<()>>,
) {
    let deadline = Instant::now() + ttl * 2;
    let mut first = Some(first);
    let mut retry = FIRST_RETRY;
    loop {
        let outcome = session::destroy(&inner.http, &id).await;
        let again =
            outcome.as_ref().is_err_and(Error::is_retryable) && Instant::now() + retry < deadline;
        if let Err(e) = &outcome {
            tracing::debug!(session = %id, error = %e, again, "consul session destroy failed");
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(outcome);
        }
        if !again {
            return;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

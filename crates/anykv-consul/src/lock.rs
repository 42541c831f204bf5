//! Locks: a session acquiring the lock record with `/v1/txn`'s `lock` verb.
//!
//! - fencing token = the record's `ModifyIndex` returned by the `lock`
//!   operation (a Raft index: strictly increasing across holders);
//! - the guard's keeper task renews the session every third of its TTL and
//!   follows the record with blocking queries; it fires `lost()` when the
//!   session is gone, the record no longer names it, or renewals failed for
//!   a whole session TTL (Consul frees the lock only after 2 × TTL, so the
//!   holder hears about it first);
//! - release = `check-session` + `delete` of the record, then the session is
//!   destroyed (no lock-delay: the session holds nothing any more);
//! - waiting = blocking queries on the record until it is free.

use std::{sync::Arc, time::Duration};

use anykv_core::{
    Error, Key, LockGuard, LockInfo, LockOptions, LockRelease, LostNotifier, Result, async_trait,
    lost_pair,
};
use bytes::Bytes;
use tokio::{sync::oneshot, time::Instant};

use crate::{
    Inner,
    error::BACKEND,
    http::{TxnOp, TxnOutcome},
    kv::{ReadMode, blocking_deadline},
    session::{self, SessionGuard, SessionKind},
};

/// Longest single blocking query while waiting for, or holding, a lock.
const BLOCK_WAIT: Duration = Duration::from_secs(30);
/// Pause when the record is free but cannot be taken yet (lock-delay).
const DELAY_POLL: Duration = Duration::from_millis(200);

pub(crate) async fn try_lock(
    inner: &Arc<Inner>,
    key: &Key,
    opts: LockOptions,
) -> Result<Option<LockGuard>> {
    session::check_ttl(opts.ttl)?;
    let session = inner.create_session(SessionKind::Lock, opts.ttl).await?;
    match acquire(inner, key, session.id(), &opts).await? {
        Some(token) => Ok(Some(guard(inner, key, session, token, opts.ttl))),
        None => {
            session.destroy().await;
            Ok(None)
        }
    }
}

pub(crate) async fn lock(inner: &Arc<Inner>, key: &Key, opts: LockOptions) -> Result<LockGuard> {
    session::check_ttl(opts.ttl)?;
    // A wait too long to represent is no deadline at all.
    let deadline = opts.wait.and_then(|w| Instant::now().checked_add(w));
    let renew_every = session::session_ttl(opts.ttl) / 3;
    let mut session = inner.create_session(SessionKind::Lock, opts.ttl).await?;
    let mut renewed = Instant::now();
    loop {
        if let Some(token) = acquire(inner, key, session.id(), &opts).await? {
            return Ok(guard(inner, key, session, token, opts.ttl));
        }
        let remaining = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    session.destroy().await;
                    return Err(Error::Timeout {
                        backend: BACKEND,
                        operation: "lock",
                        after: opts.wait.unwrap_or_default(),
                    });
                }
                left
            }
            None => BLOCK_WAIT,
        };
        // Keep the waiting session alive; replace it if Consul dropped it.
        if renewed.elapsed() >= renew_every {
            if !session::renew(&inner.http, session.id()).await? {
                session = inner.create_session(SessionKind::Lock, opts.ttl).await?;
            }
            renewed = Instant::now();
        }
        let step = remaining.min(BLOCK_WAIT).min(renew_every);
        let (kvs, index) = inner
            .read_raw(key.as_str(), false, ReadMode::Consistent)
            .await?;
        let held = kvs
            .into_iter()
            .any(|kv| kv.key == key.as_str() && kv.session.is_some_and(|s| !s.is_empty()));
        if held {
            // Wake up when the record changes (released, deleted, expired).
            let wait = inner.read_raw(
                key.as_str(),
                false,
                ReadMode::Blocking {
                    index: index.max(1),
                    wait: step,
                },
            );
            let slack = inner.http.settings().timeout;
            let _ = tokio::time::timeout(blocking_deadline(step, slack), wait).await;
        } else {
            // Free but refused: a lock-delay is running.
            tokio::time::sleep(DELAY_POLL.min(step)).await;
        }
    }
}

pub(crate) async fn holder(inner: &Arc<Inner>, key: &Key) -> Result<Option<LockInfo>> {
    let Some(e) = inner.read_entry(key.as_str(), ReadMode::Consistent).await? else {
        return Ok(None);
    };
    Ok(e.session.map(|_| LockInfo {
        fencing_token: e.pair.mod_revision,
        owner: owner_of(&e.pair.value),
    }))
}

fn owner_of(value: &Bytes) -> Option<String> {
    (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned())
}

/// One attempt: the fencing token if the lock was taken.
async fn acquire(
    inner: &Inner,
    key: &Key,
    session: &str,
    opts: &LockOptions,
) -> Result<Option<u64>> {
    let owner = opts.owner.as_deref().unwrap_or("");
    let op = TxnOp::new("lock", key.as_str())
        .value(owner.as_bytes())
        .session(session);
    match inner.http.txn(&[op]).await? {
        TxnOutcome::Committed(r) => {
            let index = r
                .results
                .into_iter()
                .flatten()
                .filter_map(|x| x.kv)
                .map(|kv| kv.modify_index)
                .max();
            index.map(Some).ok_or_else(|| Error::Backend {
                backend: BACKEND,
                message: format!("lock {key}: consul returned no entry"),
                source: None,
            })
        }
        // "lock is already held" or a running lock-delay.
        TxnOutcome::RolledBack(_) => Ok(None),
    }
}

fn guard(
    inner: &Arc<Inner>,
    key: &Key,
    session: SessionGuard,
    token: u64,
    ttl: Duration,
) -> LockGuard {
    let session = session.keep();
    let (notifier, signal) = lost_pair();
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(keeper(
        inner.clone(),
        key.clone(),
        session.clone(),
        token,
        session::session_ttl(ttl),
        notifier,
        stop_rx,
    ));
    LockGuard::new(
        key.clone(),
        token,
        signal,
        Box::new(Release {
            inner: inner.clone(),
            key: key.clone(),
            session,
            stop: Some(stop_tx),
        }),
    )
}

/// Keeps the session alive and watches the record until the lock is lost
/// or released; ending (for any reason) drops the notifier, which fires
/// `lost()`.
async fn keeper(
    inner: Arc<Inner>,
    key: Key,
    session: String,
    token: u64,
    session_ttl: Duration,
    notifier: LostNotifier,
    stop: oneshot::Receiver<()>,
) {
    let renew = async {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(session_ttl / 3).await;
            match tokio::time::timeout(
                inner.http.settings().timeout,
                session::renew(&inner.http, &session),
            )
            .await
            {
                Ok(Ok(true)) => last_ok = Instant::now(),
                Ok(Ok(false)) => return, // invalidated
                Ok(Err(_)) | Err(_) => {
                    if last_ok.elapsed() >= session_ttl {
                        return; // cannot vouch for the session any more
                    }
                }
            }
        }
    };
    let follow = async {
        let mut index = token.max(1);
        loop {
            let wait = inner.read_raw(
                key.as_str(),
                false,
                ReadMode::Blocking {
                    index,
                    wait: BLOCK_WAIT,
                },
            );
            let slack = inner.http.settings().timeout;
            match tokio::time::timeout(blocking_deadline(BLOCK_WAIT, slack), wait).await {
                Ok(Ok((kvs, new_index))) => {
                    let ours = kvs.into_iter().any(|kv| {
                        kv.key == key.as_str() && kv.session.as_deref() == Some(session.as_str())
                    });
                    if !ours {
                        return; // released by someone else, deleted, or expired
                    }
                    index = crate::watch::next_index(index, new_index).0;
                }
                // Reachability is the renew loop's business; just retry.
                Ok(Err(_)) | Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = renew => {
            tracing::debug!(%key, "consul lock session lost");
            notifier.notify();
        }
        _ = follow => {
            tracing::debug!(%key, "consul lock record no longer held by our session");
            notifier.notify();
        }
    }
    drop(notifier);
}

struct Release {
    inner: Arc<Inner>,
    key: Key,
    session: String,
    stop: Option<oneshot::Sender<()>>,
}

#[async_trait]
impl LockRelease for Release {
    async fn release(mut self: Box<Self>) -> Result<()> {
        // Stop the keeper first: its notifier goes, so `lost()` resolves.
        drop(self.stop.take());
        let k = self.key.as_str();
        // Delete the record only if this session still holds it; if not,
        // the lock was already lost and there is nothing to give back.
        let ops = [
            TxnOp::new("check-session", k).session(&self.session),
            TxnOp::new("delete", k),
        ];
        let outcome = self.inner.http.txn(&ops).await;
        // The session holds nothing now: destroying it triggers no lock-delay.
        let destroyed = session::destroy(&self.inner.http, &self.session).await;
        outcome?;
        destroyed
    }
}

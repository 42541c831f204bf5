//! Locks: a session acquiring the lock record with `/v1/txn`'s `lock` verb.
//!
//! - fencing token = the record's `ModifyIndex` returned by the `lock`
//!   operation (a Raft index: strictly increasing across holders);
//! - the guard's keeper task renews the session every third of its TTL and
//!   follows the record with `consistent` blocking queries; it fires
//!   `lost()` only when the lock is really (or possibly) gone: the record no
//!   longer names the session on a `consistent` read, or no renewal
//!   succeeded for a whole session TTL (Consul frees the lock only after
//!   2 × TTL, so the holder hears about it first). A renewal answered "no
//!   such session" is checked against a `consistent` read of the record
//!   first: a server just restarted says so while it replays its log, for
//!   a session that is alive (see [`Renewal`]);
//! - release = `check-session` + `delete` of the record, then the session is
//!   destroyed (no lock-delay: the session holds nothing any more), in a
//!   background task that retries through an outage (see [`give_back`]);
//! - waiting = `consistent` blocking queries on the record until it is free.
//!
//! The decisions of the keeper are pure functions ([`renewal_verdict`]),
//! tested with what a restart produces.

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
/// First retry delay of a failed renewal, follow query or release; doubles
/// up to [`MAX_RETRY`].
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(100);
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(2);

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
            .read_raw(key.as_str(), false, ReadMode::CONSISTENT)
            .await?;
        let held = kvs
            .into_iter()
            .any(|kv| kv.key == key.as_str() && kv.session.is_some_and(|s| !s.is_empty()));
        if held {
            // Wake up when the record changes (released, deleted, expired).
            let wait = inner.read_raw(
                key.as_str(),
                false,
                ReadMode::blocking(index.max(1), step).consistent(),
            );
            let slack = inner.http.settings().timeout;
            let _ = tokio::time::timeout(blocking_deadline(step, slack), wait).await;
        } else {
            // Free but refused: a lock-delay is running.
            tokio::time::sleep(DELAY_POLL.min(step)).await;
        }
    }
}

/// `lock_holder`: a read the user asks for, in the store's `consistency`.
pub(crate) async fn holder(inner: &Arc<Inner>, key: &Key) -> Result<Option<LockInfo>> {
    let Some(e) = inner.read_entry(key.as_str(), ReadMode::PLAIN).await? else {
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
    let session_ttl = session::session_ttl(ttl);
    let (notifier, signal) = lost_pair();
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(keeper(
        inner.clone(),
        key.clone(),
        session.clone(),
        token,
        session_ttl,
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
            session_ttl,
            stop: Some(stop_tx),
        }),
    )
}

/// What one renewal attempt said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Consul renewed the session.
    Renewed,
    /// Consul answered that it does not know the session, and a
    /// `consistent` read of the [`Witness`] confirmed it.
    Gone,
    /// Consul answered that it does not know the session, but a
    /// `consistent` read of the [`Witness`] still shows it (or failed): a
    /// server replaying its log after a restart answers that way.
    Unconfirmed,
    /// No answer (agent down, frozen, no leader).
    Failed,
}

/// What the keeper concludes after a renewal attempt, `since_renewal` after
/// the last successful one: `Some(reason)` when the lock must be reported
/// lost. Transient failures are not a loss until a whole session TTL went
/// by without renewal (then Consul may have expired the session: it does so
/// 2 × TTL after the last renewal, so the holder hears first).
pub(crate) fn renewal_verdict(
    renewal: Renewal,
    since_renewal: Duration,
    session_ttl: Duration,
) -> Option<&'static str> {
    match renewal {
        Renewal::Renewed => None,
        Renewal::Gone => Some("the session is gone (confirmed by a consistent read)"),
        Renewal::Unconfirmed | Renewal::Failed if since_renewal >= session_ttl => {
            Some("no renewal succeeded for a whole session TTL")
        }
        Renewal::Unconfirmed | Renewal::Failed => None,
    }
}

/// Whether the record of `key` still names `session`, on a `consistent`
/// read (only a live session can hold a key: Consul clears or deletes the
/// keys of a session it invalidates, in the same Raft entry).
async fn record_names(inner: &Inner, key: &Key, session: &str) -> Result<bool> {
    let entry = inner.read_entry(key.as_str(), ReadMode::CONSISTENT).await?;
    Ok(entry.is_some_and(|e| e.session.as_deref() == Some(session)))
}

/// What confirms that a session Consul calls unknown is really gone.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Witness<'a> {
    /// A lock: the record no longer names the session.
    Record(&'a Key),
    /// An anykv session: a `consistent` read of the session finds nothing.
    Session,
}

impl Witness<'_> {
    /// Whether the session still looks alive to the witness.
    async fn alive(self, inner: &Inner, session: &str) -> Result<bool> {
        match self {
            Witness::Record(key) => record_names(inner, key, session).await,
            Witness::Session => Ok(session::info(&inner.http, session).await?.is_some()),
        }
    }
}

/// One renewal, bounded by the timeout, classified.
async fn renew_once(inner: &Inner, witness: Witness<'_>, session: &str) -> Renewal {
    let timeout = inner.http.settings().timeout;
    match tokio::time::timeout(timeout, session::renew(&inner.http, session)).await {
        Ok(Ok(true)) => Renewal::Renewed,
        Ok(Ok(false)) => match tokio::time::timeout(timeout, witness.alive(inner, session)).await {
            Ok(Ok(false)) => Renewal::Gone,
            Ok(Ok(true)) | Ok(Err(_)) | Err(_) => Renewal::Unconfirmed,
        },
        Ok(Err(_)) | Err(_) => Renewal::Failed,
    }
}

/// Renews the session every third of its TTL, and sooner (with backoff)
/// after a failed attempt; returns why the session (and what it holds)
/// must be reported lost.
pub(crate) async fn renew_loop(
    inner: &Inner,
    witness: Witness<'_>,
    session: &str,
    session_ttl: Duration,
) -> &'static str {
    let every = session_ttl / 3;
    let mut last_ok = Instant::now();
    let mut delay = every;
    let mut retry = FIRST_RETRY;
    loop {
        tokio::time::sleep(delay).await;
        let renewal = renew_once(inner, witness, session).await;
        if renewal == Renewal::Renewed {
            last_ok = Instant::now();
        }
        if let Some(reason) = renewal_verdict(renewal, last_ok.elapsed(), session_ttl) {
            return reason;
        }
        if renewal == Renewal::Renewed {
            delay = every;
            retry = FIRST_RETRY;
        } else {
            tracing::debug!(session, ?renewal, "consul session renewal failed; retrying");
            delay = retry.min(every);
            retry = (retry * 2).min(MAX_RETRY);
        }
    }
}

/// Follows the record with `consistent` blocking queries; returns once it
/// no longer names the session (released by someone else, deleted, or the
/// session expired). Failed queries are retried: reachability is the
/// renewal loop's business.
async fn follow(inner: &Inner, key: &Key, session: &str, token: u64) -> &'static str {
    let mut index = token.max(1);
    let mut retry = FIRST_RETRY;
    loop {
        let mode = ReadMode::blocking(index, BLOCK_WAIT).consistent();
        let wait = inner.read_raw(key.as_str(), false, mode);
        let slack = inner.http.settings().timeout;
        match tokio::time::timeout(blocking_deadline(BLOCK_WAIT, slack), wait).await {
            Ok(Ok((kvs, new_index))) => {
                let ours = kvs
                    .into_iter()
                    .any(|kv| kv.key == key.as_str() && kv.session.as_deref() == Some(session));
                if !ours {
                    return "the record no longer names the session";
                }
                index = crate::watch::next_index(index, new_index).0;
                retry = FIRST_RETRY;
            }
            Ok(Err(_)) | Err(_) => {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
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
    tokio::select! {
        _ = stop => {}
        reason = renew_loop(&inner, Witness::Record(&key), &session, session_ttl) => {
            tracing::debug!(%key, reason, "consul lock lost");
            notifier.notify();
        }
        reason = follow(&inner, &key, &session, token) => {
            tracing::debug!(%key, reason, "consul lock lost");
            notifier.notify();
        }
    }
    drop(notifier);
}

struct Release {
    inner: Arc<Inner>,
    key: Key,
    session: String,
    session_ttl: Duration,
    stop: Option<oneshot::Sender<()>>,
}

impl Release {
    /// Stops the keeper and starts [`give_back`] on `rt`; the receiver gets
    /// the outcome of its first attempt.
    fn start(mut self, rt: &tokio::runtime::Handle) -> oneshot::Receiver<Result<()>> {
        // Stop the keeper first: its notifier goes, so `lost()` resolves.
        drop(self.stop.take());
        let (first_tx, first_rx) = oneshot::channel();
        rt.spawn(give_back(
            self.inner,
            self.key,
            self.session,
            self.session_ttl,
            first_tx,
        ));
        first_rx
    }
}

#[async_trait]
impl LockRelease for Release {
    /// Returns the outcome of the first attempt, within the timeout; if it
    /// failed, the background task keeps trying (see [`give_back`]).
    async fn release(self: Box<Self>) -> Result<()> {
        let timeout = self.inner.http.settings().timeout;
        let first = self.start(&tokio::runtime::Handle::current());
        first_attempt(first, timeout, "release").await
    }

    fn release_on_drop(self: Box<Self>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            drop(self.start(&rt));
        }
        // Without a runtime the session simply expires on the server.
    }
}

/// Gives the lock back: deletes the record if this session still holds it
/// (`check-session` + `delete`), then destroys the session. A failed
/// attempt (agent down, frozen, restarting) is retried with backoff for up
/// to 2 × the session TTL, after which Consul has expired the session
/// anyway; so a contender gets the lock soon after the agent is back, not
/// when the session expires. Both steps are idempotent: a retried delete
/// whose first try was applied finds the record gone (or someone else's)
/// and does nothing. `first` gets the first attempt's outcome.
async fn give_back(
    inner: Arc<Inner>,
    key: Key,
    session: String,
    session_ttl: Duration,
    first: oneshot::Sender<Result<()>>,
) {
    let deadline = Instant::now() + session_ttl * 2;
    let mut first = Some(first);
    let mut deleted = false;
    let mut retry = FIRST_RETRY;
    loop {
        let outcome = release_once(&inner, &key, &session, &mut deleted).await;
        let again =
            outcome.as_ref().is_err_and(Error::is_retryable) && Instant::now() + retry < deadline;
        if let Err(e) = &outcome {
            tracing::debug!(%key, error = %e, again, "consul lock release failed");
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

/// One release attempt; `deleted` remembers a done first step.
async fn release_once(inner: &Inner, key: &Key, session: &str, deleted: &mut bool) -> Result<()> {
    if !*deleted {
        // Delete the record only if this session still holds it; if not,
        // the lock was already lost and there is nothing to give back.
        let k = key.as_str();
        let ops = [
            TxnOp::new("check-session", k).session(session),
            TxnOp::new("delete", k),
        ];
        inner.http.txn(&ops).await?;
        *deleted = true;
    }
    // The session holds nothing now: destroying it triggers no lock-delay.
    session::destroy(&inner.http, session).await
}

/// The outcome of the first attempt of a give-back that goes on in the
/// background (a lock's release, a session's destroy), waited for at most
/// `timeout`.
pub(crate) async fn first_attempt(
    first: tokio::sync::oneshot::Receiver<Result<()>>,
    timeout: std::time::Duration,
    operation: &'static str,
) -> Result<()> {
    match tokio::time::timeout(timeout, first).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(Error::Cancelled {
            backend: BACKEND,
            message: format!("{operation}: the runtime is shutting down"),
        }),
        Err(_) => Err(Error::Timeout {
            backend: BACKEND,
            operation,
            after: timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_confirmed_or_long_silence_is_a_loss() {
        let ttl = Duration::from_secs(10);
        let s = Duration::from_secs;
        assert_eq!(renewal_verdict(Renewal::Renewed, s(30), ttl), None);
        // A restarted server answers "session not found" while replaying
        // its log; the record still names the session: not lost.
        assert_eq!(renewal_verdict(Renewal::Unconfirmed, s(4), ttl), None);
        assert_eq!(renewal_verdict(Renewal::Failed, s(9), ttl), None);
        assert!(renewal_verdict(Renewal::Gone, s(0), ttl).is_some());
        assert!(renewal_verdict(Renewal::Failed, s(10), ttl).is_some());
        assert!(renewal_verdict(Renewal::Unconfirmed, s(11), ttl).is_some());
    }
}

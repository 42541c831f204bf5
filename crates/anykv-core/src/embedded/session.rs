//! Sessions for drivers that keep their records in this process (memory,
//! redb).
//!
//! A session is a record in the store (id, deadline) plus the ephemeral keys
//! written under it, each remembered with the revision of that write. The
//! store's own TTL machinery (memory's sweeper, redb's writer thread) ends a
//! session whose deadline passed; ending one (close, drop, expiry, reopen of
//! a redb file) deletes, in one revision, those of its keys still at the
//! remembered revision: a key overwritten by an ordinary put since then is
//! detached from the session, as an etcd put without a lease would be.
//!
//! The driver supplies the record keeping ([`Ledger`]); this file supplies
//! the `SessionBackend` and the renewal task, the same for both.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::{
    Bytes, Condition, Error, Key, LostNotifier, Result, Session, SessionBackend, Version,
    async_trait, lost_pair,
};

/// Shortest session TTL: shorter ones are raised to it (renewals run every
/// third of the TTL, so this keeps them well apart from one another).
pub const MIN_TTL: Duration = Duration::from_millis(500);

/// The effective TTL of a requested one.
pub fn effective_ttl(ttl: Duration) -> Duration {
    ttl.max(MIN_TTL)
}

/// The driver's session records.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Pushes the session's deadline to now + `ttl` (`None`: only checks
    /// it). False once the session is gone (ended or expired).
    async fn renew(&self, id: u64, ttl: Option<Duration>) -> Result<bool>;

    /// An ephemeral put: the condition is checked as for `Store::put`; a
    /// session that is gone is `LockLost`.
    async fn put(&self, id: u64, key: &Key, value: Bytes, condition: Condition) -> Result<Version>;

    /// Ends the session, deleting its keys in one revision. Ending an
    /// ended session is a no-op.
    async fn end(&self, id: u64) -> Result<()>;
}

/// Per store: a test hook that stops every renewal, to let sessions expire
/// as if their process had frozen.
#[derive(Default)]
pub struct Renewals {
    paused: Arc<AtomicBool>,
}

impl Renewals {
    /// Stops (`true`) or resumes (`false`) every renewal of the store.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

/// The error of a put on a session that is gone.
pub fn lost_error(backend: &'static str, key: &Key) -> Error {
    Error::LockLost {
        backend,
        key: key.to_string(),
    }
}

struct Backend<L: Ledger> {
    ledger: Arc<L>,
    id: u64,
    backend: &'static str,
    ended: AtomicBool,
    lost: LostNotifier,
}

#[async_trait]
impl<L: Ledger> SessionBackend for Backend<L> {
    fn id(&self) -> String {
        self.id.to_string()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        if self.ended.load(Ordering::SeqCst) {
            return Err(lost_error(self.backend, key));
        }
        self.ledger.put(self.id, key, value, condition).await
    }

    async fn close(&self) -> Result<()> {
        if self.ended.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let out = self.ledger.end(self.id).await;
        self.lost.notify();
        out
    }
}

/// A `Session` over the recorded session `id` (created by the driver with
/// deadline now + `ttl`, the effective TTL), renewed every `ttl / 3` by a
/// task of the current runtime.
pub fn start<L: Ledger>(
    ledger: Arc<L>,
    backend: &'static str,
    id: u64,
    ttl: Duration,
    renewals: &Renewals,
) -> Session {
    let (notifier, signal) = lost_pair();
    let b = Arc::new(Backend {
        ledger: ledger.clone(),
        id,
        backend,
        ended: AtomicBool::new(false),
        lost: notifier.clone(),
    });
    let weak = Arc::downgrade(&b);
    let paused = renewals.paused.clone();
    tokio::spawn(renew_loop(ledger, weak, id, ttl, paused, notifier));
    Session::new(b, signal, ttl)
}

async fn renew_loop<L: Ledger>(
    ledger: Arc<L>,
    session: Weak<Backend<L>>,
    id: u64,
    ttl: Duration,
    paused: Arc<AtomicBool>,
    lost: LostNotifier,
) {
    let every = ttl / 3;
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let Some(s) = session.upgrade() else {
            // Dropped where no runtime could run its close: end it here.
            if let Err(e) = ledger.end(id).await {
                tracing::debug!(error = %e, "ending a dropped session failed; its TTL will");
            }
            return;
        };
        if s.ended.load(Ordering::SeqCst) {
            return;
        }
        let push = (!paused.load(Ordering::SeqCst)).then_some(ttl);
        match ledger.renew(id, push).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => {
                // Expired (or purged): the store has deleted its keys.
                s.ended.store(true, Ordering::SeqCst);
                lost.notify();
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::warn!(error = %e, "session renewal failed for longer than its TTL");
                s.ended.store(true, Ordering::SeqCst);
                lost.notify();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "session renewal failed; retrying"),
        }
    }
}

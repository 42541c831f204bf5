//! In-process locks with fencing tokens that survive restarts.
//!
//! Exclusion lives in memory: only this process can have the file open, so
//! only its tasks can compete. The fencing token is the store revision of a
//! lock record written (durably) under the lock key when the lock is taken:
//! revisions are persisted and never reused, so tokens keep increasing
//! across holders and across restarts. The record is deleted on release;
//! records left by a crashed process are dropped when the file is reopened.
//!
//! `LockOptions::ttl` needs no lease here: a holder that dies takes the
//! whole process, and with it every lock, down.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anykv_core::{
    Bytes, Condition, Error, Key, LockGuard, LockInfo, LockOptions, LockRelease, LostNotifier,
    Result, Version, async_trait, lost_pair,
};
use tokio::sync::Notify;

use crate::{
    engine::Engine,
    error::{self, BACKEND},
    writer::WriteOp,
};

/// Who holds which lock in this process.
#[derive(Default)]
pub(crate) struct LockTable {
    held: Mutex<HashMap<Key, Holder>>,
    /// Wakes waiters whenever a lock is given back.
    released: Notify,
    next_claim: AtomicU64,
}

struct Holder {
    claim: u64,
    /// `None` while the lock record is being written.
    token: Option<u64>,
    owner: Option<String>,
    /// Dropping it (release, shutdown) fires the guard's `lost()`.
    _lost: Option<LostNotifier>,
}

impl LockTable {
    fn held(&self) -> MutexGuard<'_, HashMap<Key, Holder>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims a free lock, returning the claim id.
    fn claim(&self, key: &Key, owner: &Option<String>) -> Option<u64> {
        let mut held = self.held();
        if held.contains_key(key) {
            return None;
        }
        let claim = self.next_claim.fetch_add(1, Ordering::Relaxed) + 1;
        held.insert(
            key.clone(),
            Holder {
                claim,
                token: None,
                owner: owner.clone(),
                _lost: None,
            },
        );
        Some(claim)
    }

    /// Turns a claim into a held lock; false if the claim is gone (shutdown).
    fn confirm(&self, key: &Key, claim: u64, token: u64, lost: LostNotifier) -> bool {
        match self.held().get_mut(key) {
            Some(h) if h.claim == claim => {
                h.token = Some(token);
                h._lost = Some(lost);
                true
            }
            _ => false,
        }
    }

    /// Gives a claim or lock back and wakes the waiters.
    fn unclaim(&self, key: &Key, claim: u64) {
        let removed = {
            let mut held = self.held();
            if held.get(key).is_some_and(|h| h.claim == claim) {
                held.remove(key)
            } else {
                None
            }
        };
        // Dropped outside the table's mutex: it wakes `lost()` waiters.
        drop(removed);
        self.released.notify_waiters();
    }

    /// The current holder, once its lock record is written.
    pub(crate) fn holder(&self, key: &Key) -> Option<LockInfo> {
        let held = self.held();
        let h = held.get(key)?;
        Some(LockInfo {
            fencing_token: h.token?,
            owner: h.owner.clone(),
        })
    }

    /// Forgets every lock (engine shutdown): each guard's `lost()` fires.
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.held());
        drop(all);
        self.released.notify_waiters();
    }
}

/// Takes the lock at `key`: waits up to `wait` (`None`: forever), or not at
/// all when `try_only`, in which case a held lock is `Ok(None)`.
pub(crate) async fn acquire(
    engine: &Arc<Engine>,
    key: &Key,
    opts: &LockOptions,
    try_only: bool,
) -> Result<Option<LockGuard>> {
    let deadline = opts.wait.map(|w| tokio::time::Instant::now() + w);
    let table = &engine.locks;
    let claim = loop {
        // Registered before trying, so a release in between is not missed.
        let released = table.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if engine.is_closed() {
            return Err(error::closed());
        }
        if let Some(claim) = table.claim(key, &opts.owner) {
            break claim;
        }
        if try_only {
            return Ok(None);
        }
        match deadline {
            None => released.await,
            Some(d) => {
                if tokio::time::timeout_at(d, released).await.is_err() {
                    return Err(Error::Timeout {
                        backend: BACKEND,
                        operation: "lock",
                        after: opts.wait.unwrap_or(Duration::ZERO),
                    });
                }
            }
        }
    };
    // If this future is dropped while the record is written, the claim is
    // given back rather than leaked.
    let pending = Pending {
        engine: engine.clone(),
        key: key.clone(),
        claim,
        armed: true,
    };
    let owner = Bytes::from(opts.owner.clone().unwrap_or_default());
    let token = engine
        .write(WriteOp::Put {
            key: key.clone(),
            value: owner,
            condition: Condition::Always,
            ttl: None,
        })
        .await?;
    let (notifier, signal) = lost_pair();
    if !table.confirm(key, claim, token, notifier) {
        return Err(error::closed());
    }
    let mut pending = pending;
    pending.armed = false;
    let release = Release {
        engine: engine.clone(),
        key: key.clone(),
        claim,
        token,
    };
    Ok(Some(LockGuard::new(
        key.clone(),
        token,
        signal,
        Box::new(release),
    )))
}

struct Pending {
    engine: Arc<Engine>,
    key: Key,
    claim: u64,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.engine.locks.unclaim(&self.key, self.claim);
        }
    }
}

struct Release {
    engine: Arc<Engine>,
    key: Key,
    claim: u64,
    token: u64,
}

impl Release {
    /// The record delete: only if the record is still ours (a later holder's
    /// record has another version).
    fn delete_record(&self) -> WriteOp {
        WriteOp::Delete {
            key: self.key.clone(),
            condition: Condition::IfVersion(Version::new(self.token)),
        }
    }
}

#[async_trait]
impl LockRelease for Release {
    async fn release(self: Box<Self>) -> Result<()> {
        self.engine.locks.unclaim(&self.key, self.claim);
        if self.engine.is_closed() {
            return Ok(());
        }
        match self.engine.write(self.delete_record()).await {
            // Someone else's record by now, or closed meanwhile: nothing of ours left.
            Ok(_) | Err(Error::Conflict { .. } | Error::NotFound { .. }) => Ok(()),
            Err(_) if self.engine.is_closed() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// In-process: released at once, no runtime needed; the record delete
    /// is queued to the writer without waiting.
    fn release_on_drop(self: Box<Self>) {
        self.engine.locks.unclaim(&self.key, self.claim);
        if !self.engine.is_closed() {
            self.engine.write_detached(self.delete_record());
        }
    }
}

//! The locks and sessions held through one [`Kv`](crate::Kv) handle.
//!
//! The layer wraps every guard a driver hands back so that, on every
//! backend alike:
//! - `release()` ends within the per-operation timeout, even while the
//!   server is frozen; the driver's release goes on in the background until
//!   it is done (or the lease runs out), so giving up waiting never leaves
//!   the lock held longer than the driver would;
//! - closing the handle releases every lock taken through it and fires each
//!   guard's `lost()`: a closed handle holds nothing;
//! - `lost()` fires when the driver reports the lease or session lost;
//! - a lock taken with `max_hold` is released when that runs out, and its
//!   `lost()` fires, so a stuck holder cannot block the others forever.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;

use bytes::Bytes;

use crate::{
    error::{Error, Result},
    key::Key,
    lock::{LockGuard, LockRelease, LostNotifier, lost_pair},
    session::{Session, SessionBackend},
    types::{Condition, Version},
};

/// A driver's release, taken by whichever comes first: the guard or `close()`.
type Slot = Arc<Mutex<Option<Box<dyn LockRelease>>>>;

/// The registry of one handle's held locks.
#[derive(Default)]
pub(crate) struct HeldLocks {
    next: AtomicU64,
    held: Mutex<HashMap<u64, (Slot, LostNotifier)>>,
}

impl HeldLocks {
    /// Wraps a driver's guard: bounded release, registered for `close()`,
    /// released after `max_hold` if given.
    pub(crate) fn track(
        self: &Arc<Self>,
        guard: LockGuard,
        backend: &'static str,
        timeout: Duration,
        max_hold: Option<Duration>,
    ) -> LockGuard {
        let (key, token, driver_lost, release) = guard.into_parts();
        let (notifier, lost) = lost_pair();
        let slot: Slot = Arc::new(Mutex::new(release));
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries().insert(id, (slot.clone(), notifier.clone()));
        // Forward the driver's signal until nobody listens any more, and
        // enforce `max_hold`.
        let forward = notifier.clone();
        let (held, locks) = (slot.clone(), Arc::downgrade(self));
        tokio::spawn(async move {
            let expired = async {
                match max_hold {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = driver_lost.wait() => forward.notify(),
                _ = forward.closed() => {}
                () = expired => {
                    if let Some(locks) = locks.upgrade() {
                        locks.entries().remove(&id);
                    }
                    // Lost first: the holder must stop before another can
                    // take the lock.
                    forward.notify();
                    if let Some(r) = take(&held)
                        && let Err(e) = bounded_release(r, backend, timeout).await
                    {
                        tracing::warn!(error = %e, "releasing a lock past max_hold; its lease will end it");
                    }
                }
            }
        });
        let release = LayerRelease {
            id,
            slot,
            locks: Arc::downgrade(self),
            lost: notifier,
            backend,
            timeout,
        };
        LockGuard::new(key, token, lost, Box::new(release))
    }

    /// Releases every lock still held through this handle, each bounded by
    /// `timeout`, and fires their `lost()`. Returns the first error.
    pub(crate) async fn release_all(&self, backend: &'static str, timeout: Duration) -> Result<()> {
        let all: Vec<(Slot, LostNotifier)> = self.entries().drain().map(|(_, v)| v).collect();
        let releases = all.into_iter().map(|(slot, lost)| async move {
            let release = take(&slot);
            let out = match release {
                Some(r) => bounded_release(r, backend, timeout).await,
                None => Ok(()),
            };
            lost.notify();
            out
        });
        futures::future::join_all(releases)
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()
            .map(drop)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Slot, LostNotifier)>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn take(slot: &Slot) -> Option<Box<dyn LockRelease>> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Runs the driver's release in a task of its own and waits at most
/// `timeout` for it: past the deadline the caller gets `Timeout` while the
/// release carries on (a dropped release future could leave the lock held
/// until its lease ran out).
async fn bounded_release(
    release: Box<dyn LockRelease>,
    backend: &'static str,
    timeout: Duration,
) -> Result<()> {
    let task = tokio::spawn(release.release());
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(join)) => Err(Error::backend(backend, "lock release task failed", join)),
        Err(_) => Err(Error::Timeout {
            backend,
            operation: "release",
            after: timeout,
        }),
    }
}

/// The release the layer hands out in place of the driver's.
struct LayerRelease {
    id: u64,
    slot: Slot,
    locks: Weak<HeldLocks>,
    lost: LostNotifier,
    backend: &'static str,
    timeout: Duration,
}

#[async_trait]
impl LockRelease for LayerRelease {
    async fn release(self: Box<Self>) -> Result<()> {
        if let Some(locks) = self.locks.upgrade() {
            locks.entries().remove(&self.id);
        }
        // None: the handle was closed and released it already.
        let outcome = match take(&self.slot) {
            Some(r) => bounded_release(r, self.backend, self.timeout).await,
            None => Ok(()),
        };
        self.lost.notify();
        outcome
    }
}

/// The sessions started through one handle, ended by `close()` (a closed
/// handle holds nothing: its ephemeral keys go with it).
#[derive(Default)]
pub(crate) struct HeldSessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<dyn SessionBackend>>>,
}

impl HeldSessions {
    /// Registers a session; it leaves the registry when it is closed.
    pub(crate) fn track(self: &Arc<Self>, session: Session) -> Session {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let registry = Arc::downgrade(self);
        session.map_backend(|inner| {
            self.entries().insert(id, inner.clone());
            Arc::new(TrackedSession {
                id,
                inner,
                registry,
            })
        })
    }

    /// Ends every session still open through this handle, each bounded by
    /// `timeout`. Returns the first error.
    pub(crate) async fn close_all(&self, backend: &'static str, timeout: Duration) -> Result<()> {
        let all: Vec<Arc<dyn SessionBackend>> = self.entries().drain().map(|(_, s)| s).collect();
        let closes = all.into_iter().map(|s| async move {
            match tokio::time::timeout(timeout, s.close()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(Error::Timeout {
                    backend,
                    operation: "session close",
                    after: timeout,
                }),
            }
        });
        futures::future::join_all(closes)
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()
            .map(drop)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<dyn SessionBackend>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A session backend that leaves its handle's registry when closed.
struct TrackedSession {
    id: u64,
    inner: Arc<dyn SessionBackend>,
    registry: Weak<HeldSessions>,
}

#[async_trait]
impl SessionBackend for TrackedSession {
    fn id(&self) -> String {
        self.inner.id()
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        self.inner.put(key, value, condition).await
    }

    async fn close(&self) -> Result<()> {
        if let Some(r) = self.registry.upgrade() {
            r.entries().remove(&self.id);
        }
        self.inner.close().await
    }
}

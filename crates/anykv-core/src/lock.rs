//! Lock guards shared by every driver.
//!
//! A driver hands back a [`LockGuard`] built from its fencing token, a
//! [`LostSignal`] it fires when the lease or session behind the lock goes,
//! and a [`LockRelease`] that gives the lock up.

use std::{fmt, future::Future, sync::Arc};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{error::Result, key::Key};

/// Gives a held lock back; implemented by each driver.
#[async_trait]
pub trait LockRelease: Send + Sync + 'static {
    /// Releases the lock and waits until the backend confirms.
    async fn release(self: Box<Self>) -> Result<()>;

    /// Releases the lock from `Drop`, where nothing can be awaited: the default
    /// spawns [`release`](Self::release) on the current tokio runtime, if any.
    /// Without a runtime the lease simply runs out on the server.
    fn release_on_drop(self: Box<Self>) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = self.release().await {
                    tracing::debug!(error = %e, "lock release on drop failed; the lease will expire");
                }
            });
        }
    }
}

/// The driver's half of a lost-lock signal: call [`notify`](Self::notify)
/// when the lease/session is lost. Dropping every clone fires the signal too,
/// so a keep-alive task that ends for any reason is noticed.
#[derive(Clone, Debug)]
pub struct LostNotifier(Arc<watch::Sender<bool>>);

/// The holder's half: resolves once the lock can no longer be trusted.
#[derive(Clone, Debug)]
pub struct LostSignal(watch::Receiver<bool>);

/// A connected notifier/signal pair.
pub fn lost_pair() -> (LostNotifier, LostSignal) {
    let (tx, rx) = watch::channel(false);
    (LostNotifier(Arc::new(tx)), LostSignal(rx))
}

impl LostNotifier {
    /// Marks the lock as lost.
    pub fn notify(&self) {
        self.0.send_replace(true);
    }

    /// True once no holder is listening any more.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Resolves once no holder is listening any more (every signal dropped).
    pub async fn closed(&self) {
        self.0.closed().await
    }
}

impl LostSignal {
    /// True if the lock is already lost.
    pub fn is_lost(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Waits until the lock is lost.
    pub async fn wait(mut self) {
        // An error means every notifier is gone: the lock is no longer kept.
        let _ = self.0.wait_for(|lost| *lost).await;
    }
}

/// A held lock.
///
/// The guard renews its lease while held (driver-side). Dropping it releases
/// the lock in the background; [`release`](Self::release) does it and waits.
///
/// ```no_run
/// # async fn demo(store: &dyn anykv_core::Store) -> anykv_core::Result<()> {
/// use anykv_core::{Key, LockOptions};
/// let guard = store.lock(&Key::new("jobs/nightly")?, LockOptions::default()).await?;
/// let token = guard.fencing_token(); // pass to the resource you protect
/// tokio::select! {
///     _ = guard.lost() => eprintln!("lock lost, stop writing with token {token}"),
///     _ = async { /* work */ } => {}
/// }
/// guard.release().await?;
/// # Ok(()) }
/// ```
pub struct LockGuard {
    key: Key,
    fencing_token: u64,
    lost: LostSignal,
    release: Option<Box<dyn LockRelease>>,
}

impl LockGuard {
    /// Built by drivers.
    pub fn new(
        key: Key,
        fencing_token: u64,
        lost: LostSignal,
        release: Box<dyn LockRelease>,
    ) -> Self {
        LockGuard {
            key,
            fencing_token,
            lost,
            release: Some(release),
        }
    }

    /// The lock's key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Strictly increasing across successive holders of this key.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Resolves if the lease or session behind the lock is lost (or the lock
    /// is released). The future does not borrow the guard.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lost.clone().wait()
    }

    /// A clonable handle on the lost signal.
    pub fn lost_signal(&self) -> LostSignal {
        self.lost.clone()
    }

    /// True if the lock is already known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// Releases the lock and waits for the backend to confirm.
    pub async fn release(mut self) -> Result<()> {
        match self.release.take() {
            Some(r) => r.release().await,
            None => Ok(()),
        }
    }

    /// Replaces the key shown by the guard (the namespace layer shows the
    /// caller's key, not the bookkeeping key).
    pub fn with_key(mut self, key: Key) -> Self {
        self.key = key;
        self
    }

    /// Takes the guard apart, for a layer that wraps its release or its lost
    /// signal and builds a new guard with [`LockGuard::new`]. The lock stays
    /// held: the caller owns the release now (`None` if already released).
    pub fn into_parts(mut self) -> (Key, u64, LostSignal, Option<Box<dyn LockRelease>>) {
        let release = self.release.take();
        (
            self.key.clone(),
            self.fencing_token,
            self.lost.clone(),
            release,
        )
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            r.release_on_drop();
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("fencing_token", &self.fencing_token)
            .field("lost", &self.is_lost())
            .finish()
    }
}

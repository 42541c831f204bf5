//! In-process locks: exclusion between tasks and handles of one process,
//! fencing tokens from a per-store counter.

use std::{collections::HashMap, sync::Arc};

use anykv_core::{
    Key, LockGuard, LockInfo, LockOptions, LockRelease, LostNotifier, Result, async_trait,
    lost_pair,
};
use tokio::sync::Notify;

use crate::Shared;

#[derive(Default)]
pub(crate) struct Locks {
    held: HashMap<Key, Holder>,
    next_token: u64,
}

struct Holder {
    token: u64,
    owner: Option<String>,
    // Kept so that dropping the holder record (release) fires `lost()`.
    _lost: LostNotifier,
}

/// Wakes waiters when any lock of the store is released.
#[derive(Default)]
pub(crate) struct Released(pub(crate) Notify);

impl Locks {
    pub(crate) fn holder(&self, key: &Key) -> Option<LockInfo> {
        self.held.get(key).map(|h| LockInfo {
            fencing_token: h.token,
            owner: h.owner.clone(),
        })
    }
}

pub(crate) fn try_acquire(
    shared: &Arc<Shared>,
    key: &Key,
    opts: &LockOptions,
) -> Option<LockGuard> {
    let mut locks = shared.locks();
    if locks.held.contains_key(key) {
        return None;
    }
    locks.next_token += 1;
    let token = locks.next_token;
    let (notifier, signal) = lost_pair();
    locks.held.insert(
        key.clone(),
        Holder {
            token,
            owner: opts.owner.clone(),
            _lost: notifier,
        },
    );
    let release = Release {
        shared: shared.clone(),
        key: key.clone(),
        token,
    };
    Some(LockGuard::new(
        key.clone(),
        token,
        signal,
        Box::new(release),
    ))
}

pub(crate) async fn acquire(shared: &Arc<Shared>, key: &Key, opts: &LockOptions) -> LockGuard {
    loop {
        // Register interest before trying, so a release in between is not missed.
        let released = shared.released.0.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if let Some(guard) = try_acquire(shared, key, opts) {
            return guard;
        }
        released.await;
    }
}

struct Release {
    shared: Arc<Shared>,
    key: Key,
    token: u64,
}

impl Release {
    fn now(&self) {
        let mut locks = self.shared.locks();
        if locks
            .held
            .get(&self.key)
            .is_some_and(|h| h.token == self.token)
        {
            locks.held.remove(&self.key);
        }
        drop(locks);
        self.shared.released.0.notify_waiters();
    }
}

#[async_trait]
impl LockRelease for Release {
    async fn release(self: Box<Self>) -> Result<()> {
        self.now();
        Ok(())
    }

    // In-process: release synchronously, no runtime needed.
    fn release_on_drop(self: Box<Self>) {
        self.now();
    }
}

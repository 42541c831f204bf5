//! Sessions and ephemeral keys: one lease kept alive in the background, and
//! keys that disappear when it ends.
//!
//! A driver maps a session onto its backend's own liveness unit (an etcd
//! lease, a ZooKeeper session, a Consul session with `Behavior=delete`, an
//! in-process record for redb and memory) and implements [`SessionBackend`];
//! [`Session`] is what applications hold, the same for every backend.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    error::Result,
    key::Key,
    lock::LostSignal,
    types::{Condition, Version},
};

/// Options of [`Store::session`](crate::Store::session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionOptions {
    /// How long the session outlives its last renewal: after the process
    /// dies (or freezes) its keys disappear within `ttl` plus the backend's
    /// granularity (`Capabilities::sessions`).
    pub ttl: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ttl: Duration::from_secs(10),
        }
    }
}

impl SessionOptions {
    /// A session with this TTL.
    pub fn with_ttl(ttl: Duration) -> Self {
        SessionOptions { ttl }
    }
}

/// What a driver implements for a session. Keys arrive namespaced and
/// validated, values within `max_value_size`; the layers add timeouts.
#[async_trait]
pub trait SessionBackend: Send + Sync + 'static {
    /// The backend's id of the session (lease id, session id).
    fn id(&self) -> String;

    /// Writes `key` bound to the session: it is deleted when the session
    /// ends. A failed condition is `AlreadyExists`, `NotFound` or `Conflict`
    /// as for [`Store::put`](crate::Store::put); a session that has ended
    /// fails with `LockLost`.
    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version>;

    /// Ends the session now (revokes the lease): its keys are deleted.
    /// Ending an ended session is a no-op.
    async fn close(&self) -> Result<()>;
}

/// A live session; see [`Store::session`](crate::Store::session).
///
/// Its keys are ordinary keys for everyone else (get, list, watch, mirrors
/// see them) and disappear when the session ends: by [`close`](Session::close),
/// by drop, when its lease expires (renewal failed for longer than its TTL),
/// or when the process dies.
///
/// ```no_run
/// # async fn demo(kv: anykv_core::Kv) -> anykv_core::Result<()> {
/// use anykv_core::{Condition, Key, SessionOptions, Store};
/// let session = kv.session(SessionOptions::default()).await?;
/// // Presence: gone within the TTL once this process is.
/// session.put(&Key::new("instances/web-1")?, "10.0.0.7:80".into(), Condition::Always).await?;
/// // A reservation (voltha's Reserve): only one session owns the device.
/// session.put(&Key::new("owners/olt-7")?, "web-1".into(), Condition::IfAbsent).await?;
/// tokio::select! {
///     () = session.lost() => eprintln!("session lost: stop acting as owner"),
///     () = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
/// }
/// session.close().await?; // ReleaseAllReservations
/// # Ok(()) }
/// ```
pub struct Session {
    id: String,
    backend: Option<Arc<dyn SessionBackend>>,
    lost: LostSignal,
    ttl: Duration,
}

impl Session {
    /// A session over a driver's backend; `lost` fires when the session ends
    /// for any reason (the driver notifies it).
    pub fn new(backend: Arc<dyn SessionBackend>, lost: LostSignal, ttl: Duration) -> Session {
        Session {
            id: backend.id(),
            backend: Some(backend),
            lost,
            ttl,
        }
    }

    /// The backend's id of the session.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The session's TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Writes an ephemeral key (see [`SessionBackend::put`]).
    pub async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        match &self.backend {
            Some(b) => b.put(key, value, condition).await,
            None => Err(crate::Error::LockLost {
                backend: "session",
                key: key.to_string(),
            }),
        }
    }

    /// Resolves when the session is gone (closed, expired, or its renewal
    /// failed past its TTL).
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        self.lost.clone().wait()
    }

    /// True once the session is gone.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// The lost signal, to hand to tasks.
    pub fn lost_signal(&self) -> LostSignal {
        self.lost.clone()
    }

    /// Ends the session: its keys are deleted.
    pub async fn close(mut self) -> Result<()> {
        match self.backend.take() {
            Some(b) => b.close().await,
            None => Ok(()),
        }
    }

    /// Replaces the backend with a wrapper of it (the layers use this to
    /// add namespacing, checks and timeouts).
    pub fn map_backend(
        mut self,
        wrap: impl FnOnce(Arc<dyn SessionBackend>) -> Arc<dyn SessionBackend>,
    ) -> Session {
        self.backend = self.backend.take().map(wrap);
        self
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = b.close().await {
                    tracing::debug!(error = %e, "session close on drop failed; its TTL will end it");
                }
            });
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .field("lost", &self.is_lost())
            .finish()
    }
}

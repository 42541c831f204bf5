//! Sessions: one etcd lease kept alive in the background (the same
//! [`KeptLease`] a lock holds); an ephemeral key is a put attached to it
//! (`with_lease`), conditional as [`Store::put`](anykv_core::Store::put)'s.
//! Revoking the lease (close, drop) or its expiry deletes every such key in
//! the same raft entry.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anykv_core::{
    Bytes, Condition, Error, Key, LostSignal, Result, Session, SessionBackend, SessionOptions,
    Version, async_trait,
};

use crate::{
    conn::Conn,
    error::BACKEND,
    lease::{self, KeptLease},
    txn,
};

/// How long past its TTL a dead session's keys may survive. etcd checks for
/// expired leases every 500 ms and deletes their keys in one raft entry
/// (measured: 0.0-0.55 s past the TTL on etcd 3.4 on a quiet machine,
/// `tests/driver.rs` `session_keys_expire_after_a_kill_figures`, but 1.9 s
/// once while two test runs loaded both cores: the sweep and its raft entry
/// wait for CPU like everything else); the TTL counts whole seconds, so a
/// TTL asked for with a fraction is rounded up by less than a second
/// ([`Session::ttl`] reports the granted one). Below etcd's minimum (2 s with
/// the default election timeout) the granted TTL is that minimum. Declared
/// as 3 s, the same margin as plain TTL keys (`lease::TTL_GRANULARITY`).
pub(crate) const SESSION_GRANULARITY: Duration = lease::TTL_GRANULARITY;

/// Starts a session: grants a lease of `opts.ttl` and renews it every third
/// of the TTL the server granted.
pub(crate) async fn start(conn: &Arc<Conn>, opts: SessionOptions) -> Result<Session> {
    let clients = conn.clients().await?;
    let granted = lease::grant(conn, opts.ttl, "session").await?;
    let kept = KeptLease::start(clients.lease.clone(), granted, conn.timeout());
    let lost = kept.lost.clone();
    let backend = EtcdSession {
        conn: conn.clone(),
        id: granted.id,
        lost: lost.clone(),
        kept: Mutex::new(Some(kept)),
    };
    Ok(Session::new(Arc::new(backend), lost, granted.ttl))
}

/// The driver's side of a [`Session`].
struct EtcdSession {
    conn: Arc<Conn>,
    id: i64,
    lost: LostSignal,
    /// `None` once closed.
    kept: Mutex<Option<KeptLease>>,
}

impl EtcdSession {
    fn lost_error(key: &Key) -> Error {
        Error::LockLost {
            backend: BACKEND,
            key: key.to_string(),
        }
    }
}

#[async_trait]
impl SessionBackend for EtcdSession {
    fn id(&self) -> String {
        format!("{:x}", self.id)
    }

    async fn put(&self, key: &Key, value: Bytes, condition: Condition) -> Result<Version> {
        if self.lost.is_lost() {
            return Err(Self::lost_error(key));
        }
        // A lease revoked or expired on the server makes etcd refuse the
        // whole transaction ("requested lease not found"), which the error
        // map turns into `LockLost`: a put never outlives its session.
        let written = txn::put(&self.conn, key, value, condition, Some(self.id)).await;
        if let Err(Error::LockLost { .. }) = &written {
            // etcd said the lease is gone: fire lost() now rather than at
            // the next renewal, so the holder never sees a failed put on a
            // session that still looks alive.
            let _ = self.close().await;
        }
        written
    }

    async fn close(&self) -> Result<()> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match kept {
            Some(k) => k.revoke().await,
            None => Ok(()),
        }
    }
}

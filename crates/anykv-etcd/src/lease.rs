//! Leases: TTL keys, and the kept-alive leases of locks and sessions.
//!
//! etcd expires keys through leases only. Leases count whole seconds and the
//! server raises any TTL below its minimum (1.5 × election timeout, 2 s with
//! the defaults) to that minimum, then checks expiry every 500 ms; hence the
//! declared TTL granularity.

use std::time::Duration;

use anykv_core::{LostNotifier, LostSignal, Result, lost_pair};
use etcd_client::LeaseClient;
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    conn::{Conn, after},
    error::Ctx,
};

/// How late a TTL key may disappear. etcd raises any lease TTL below its
/// minimum (1.5 × election timeout rounded up: 2 s with the defaults) to that
/// minimum, counts whole seconds, and sweeps expired leases every 500 ms, so
/// a 100 ms TTL key goes after about 2.4 s (measured on etcd 3.4) and a 2 s
/// one about 0.4 s late. A server with a longer election timeout is later.
pub(crate) const TTL_GRANULARITY: Duration = Duration::from_secs(3);

/// A TTL in whole seconds, rounded up, at least one.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// A granted lease.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lease {
    pub id: i64,
    /// The TTL the server granted (it may raise the one asked for).
    pub ttl: Duration,
}

/// Grants a lease of `ttl` (rounded up to whole seconds).
pub(crate) async fn grant(conn: &Conn, ttl: Duration, op: &'static str) -> Result<Lease> {
    let secs = ttl_secs(ttl);
    let resp = conn
        .call(Ctx::new(op, None, conn.timeout()), |c| {
            let mut lease = c.lease.clone();
            async move { lease.grant(secs, None).await }
        })
        .await?;
    let granted = u64::try_from(resp.ttl()).unwrap_or(0).max(1);
    Ok(Lease {
        id: resp.id(),
        ttl: Duration::from_secs(granted),
    })
}

/// Revokes a lease (deleting its keys), bounded by `timeout`; a lease that is
/// already gone counts as revoked.
pub(crate) async fn revoke(mut client: LeaseClient, id: i64, timeout: Duration) -> Result<()> {
    let ctx = Ctx::new("release", None, timeout);
    match tokio::time::timeout(timeout, client.revoke(id)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => Ok(()),
        Ok(Err(e)) => Err(crate::error::map(e, ctx)),
        Err(_) => Err(ctx.timeout_error()),
    }
}

/// Revokes a lease without waiting (an unused TTL lease after a failed
/// conditional put; it would expire on its own anyway).
pub(crate) fn revoke_in_background(client: LeaseClient, id: i64, timeout: Duration) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            if let Err(e) = revoke(client, id, timeout).await {
                tracing::debug!(error = %e, lease = id, "etcd: revoking an unused lease failed; it will expire");
            }
        });
    }
}

/// A lease kept alive by a task (a lock's or a session's), revoked when
/// dropped unless revoked before.
pub(crate) struct KeptLease {
    client: LeaseClient,
    pub lease: Lease,
    timeout: Duration,
    renew: JoinHandle<()>,
    notifier: Option<LostNotifier>,
    /// Fires when the lease is gone: revoked, expired, or not renewed in time.
    pub lost: LostSignal,
}

impl KeptLease {
    /// Starts renewing `lease` in the background.
    pub fn start(client: LeaseClient, lease: Lease, timeout: Duration) -> KeptLease {
        let (notifier, lost) = lost_pair();
        let renew = tokio::spawn(keep_alive(client.clone(), lease, timeout, notifier.clone()));
        KeptLease {
            client,
            lease,
            timeout,
            renew,
            notifier: Some(notifier),
            lost,
        }
    }

    /// Stops renewing, notifies `lost`, and revokes the lease (deleting its
    /// keys). If that fails it is tried again in the background: a lock
    /// record left behind would hold the queue until its lease expires.
    pub async fn revoke(mut self) -> Result<()> {
        self.stop();
        let revoked = revoke(self.client.clone(), self.lease.id, self.timeout).await;
        if revoked.is_err() {
            revoke_in_background(self.client.clone(), self.lease.id, self.timeout);
        }
        revoked
    }

    fn stop(&mut self) {
        self.renew.abort();
        if let Some(n) = self.notifier.take() {
            n.notify();
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        if self.notifier.is_some() {
            // Dropped without `revoke` (a cancelled lock call, a dropped
            // session): revoke in the background; the lease would expire anyway.
            self.stop();
            revoke_in_background(self.client.clone(), self.lease.id, self.timeout);
        }
    }
}

/// Renews `lease` every third of its TTL. Notifies `lost` and ends when etcd
/// says the lease is gone, or when no renewal succeeded before the lease
/// would have run out on the server (counted from when the last successful
/// renewal was *sent*, so the client never believes it longer than etcd).
async fn keep_alive(mut client: LeaseClient, lease: Lease, timeout: Duration, lost: LostNotifier) {
    let every = (lease.ttl / 3).max(Duration::from_millis(100));
    let retry = Duration::from_millis(200).min(every);
    let mut expires = after(Instant::now(), lease.ttl);
    let mut stream = None;
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let sent = Instant::now();
        if sent >= expires {
            break;
        }
        let bound = timeout.min(expires - sent);
        match tokio::time::timeout(bound, renew(&mut client, &mut stream, lease)).await {
            Ok(Ok(ttl)) if ttl > 0 => {
                expires = after(sent, Duration::from_secs(u64::try_from(ttl).unwrap_or(0)));
                wait = every;
            }
            // Expired or revoked on the server.
            Ok(Ok(_)) => break,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg))) if msg.contains("not found") => {
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, lease = lease.id, "etcd: lease renewal failed; retrying");
                stream = None;
                wait = retry;
            }
            Err(_) => {
                stream = None;
                wait = retry;
            }
        }
    }
    tracing::debug!(lease = lease.id, "etcd: lease lost");
    lost.notify();
}

type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// One renewal; returns the TTL etcd granted (0 or less: the lease is gone).
async fn renew(
    client: &mut LeaseClient,
    stream: &mut Option<KeepAlive>,
    lease: Lease,
) -> Result<i64, etcd_client::Error> {
    match stream.as_mut() {
        Some((keeper, responses)) => {
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(r) => Ok(r.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "keep-alive stream closed".into(),
                )),
            }
        }
        None => {
            // Opening the stream renews once: etcd-client reads the first
            // answer and fails with "lease not found" if the lease is gone.
            *stream = Some(client.keep_alive(lease.id).await?);
            Ok(i64::try_from(lease.ttl.as_secs()).unwrap_or(i64::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_secs(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 1);
    }
}

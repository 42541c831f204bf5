//! Leases: TTL keys and lock sessions.
//!
//! etcd expires keys through leases only. Leases count whole seconds and the
//! server raises any TTL below its minimum (1.5 × election timeout, 2 s with
//! the defaults) to that minimum, then checks expiry every 500 ms; hence the
//! declared TTL granularity.

use std::time::Duration;

use anykv_core::Result;
use etcd_client::LeaseClient;

use crate::{conn::Conn, error::Ctx};

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

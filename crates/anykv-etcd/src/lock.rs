//! Locks, as etcd's own `concurrency.Mutex` does them (so `etcdctl lock`
//! and anykv exclude each other on the same name).
//!
//! - A session is a lease of the lock's TTL, renewed by a background task.
//! - Taking the lock writes a record `<lock key>/<lease id in hex>` bound to
//!   the lease. The records of one lock are ordered by create revision; the
//!   lowest is the holder. The holder's create revision is its fencing token:
//!   every later record, hence every later holder, has a higher one.
//! - A waiter watches only its predecessor (the record created just before
//!   its own) for deletion, then looks again: no thundering herd.
//! - The lock is lost when the lease is: the renewal task notifies the guard
//!   when etcd says the lease is gone, or when it could not renew before the
//!   lease would have expired on the server.
//! - Releasing revokes the lease, which deletes the record in the same step.
//!
//! Records of a nested lock (`a/b` under `a`) share the key range of `a`'s
//! records; only direct children (`a/<hex>`) count as records of `a`.

use std::time::Duration;

use anykv_core::{
    Error, Key, LockGuard, LockInfo, LockOptions, LockRelease, LostSignal, Result, async_trait,
};
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, WatchOptions,
    proto::PbKeyValue, proto::PbTxnOpResponse,
};
use tokio::time::Instant;

use crate::{
    conn::Conn,
    error::{self, BACKEND, Ctx},
    lease::{self, KeptLease},
    range::{Range, rev},
    txn::{exec, header_rev},
};

/// The records of `lock` (direct children only), in the order etcd returned.
fn records(lock: &Key, kvs: Vec<PbKeyValue>) -> impl Iterator<Item = PbKeyValue> {
    let dir = format!("{lock}/").into_bytes();
    kvs.into_iter().filter(move |kv| {
        kv.key
            .strip_prefix(dir.as_slice())
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(&b'/'))
    })
}

/// Range options over the records of `lock`, ordered by create revision.
fn by_create(lock: &Key, order: SortOrder) -> (Vec<u8>, GetOptions) {
    let r = Range::children(lock);
    (
        r.start,
        GetOptions::new()
            .with_range(r.end)
            .with_sort(SortTarget::Create, order),
    )
}

/// Takes the lock named `lock`. `wait`: `Some(None)` waits forever,
/// `Some(Some(d))` up to `d`, `None` does not wait (try_lock: `Ok(None)` when held).
pub(crate) async fn acquire(
    conn: &Conn,
    lock: &Key,
    opts: &LockOptions,
    wait: Option<Option<Duration>>,
) -> Result<Option<LockGuard>> {
    let started = Instant::now();
    let clients = conn.clients().await?;
    let lease = lease::grant(conn, opts.ttl, "lock").await?;
    let session = KeptLease::start(clients.lease.clone(), lease, conn.timeout());
    let mine = format!("{lock}/{:x}", lease.id);
    let owner = opts.owner.clone().unwrap_or_default();

    // Create the record unless it exists (a retried attempt), and read every
    // record of the lock in the same revision.
    let (pfx, all) = by_create(lock, SortOrder::Ascend);
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            mine.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![
            TxnOp::put(
                mine.as_str(),
                owner,
                Some(PutOptions::new().with_lease(lease.id)),
            ),
            TxnOp::get(pfx.clone(), Some(all.clone())),
        ])
        .or_else(vec![
            TxnOp::get(mine.as_str(), None),
            TxnOp::get(pfx, Some(all)),
        ]);
    let ctx = Ctx::new("lock", Some(lock.as_str()), conn.timeout());
    let mut resp = exec(conn, ctx, &txn).await?;
    let my_rev = if resp.succeeded() {
        header_rev(&resp)
    } else {
        ranged(&mut resp.0.responses, 0)
            .into_iter()
            .next()
            .map(|kv| rev(kv.create_revision))
            .unwrap_or(0)
    };
    let first = records(lock, ranged(&mut resp.0.responses, 1))
        .next()
        .map(|kv| rev(kv.create_revision));
    if my_rev == 0 {
        return Err(Error::backend(
            BACKEND,
            format!("lock {lock}: own record missing after creation"),
            "inconsistent transaction result",
        ));
    }

    if first != Some(my_rev) {
        let Some(limit) = wait else {
            // Held by someone else: the answer stands even if giving our
            // place back fails (it is retried in the background).
            let _ = session.revoke().await;
            return Ok(None);
        };
        let waiting = wait_predecessors(conn, lock, my_rev, session.lost.clone());
        let outcome = match limit {
            None => waiting.await,
            Some(d) => {
                let left = d.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, waiting).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::Timeout {
                        backend: BACKEND,
                        operation: "lock",
                        after: d,
                    }),
                }
            }
        };
        let outcome = match outcome {
            // Our record may have gone while we waited (lease expired, or
            // deleted by hand): then we hold nothing.
            Ok(()) => match record_exists(conn, &mine).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(lock_lost(lock)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            // Give up our place in the queue now rather than at lease expiry.
            let _ = session.revoke().await;
            return Err(e);
        }
    }
    let lost = session.lost.clone();
    Ok(Some(LockGuard::new(
        lock.clone(),
        my_rev,
        lost,
        Box::new(Release(session)),
    )))
}

/// The pairs read by the `i`-th op of a transaction branch.
fn ranged(responses: &mut [etcd_client::proto::PbResponseOp], i: usize) -> Vec<PbKeyValue> {
    match responses.get_mut(i).and_then(|r| r.response.take()) {
        Some(PbTxnOpResponse::ResponseRange(r)) => r.kvs,
        _ => Vec::new(),
    }
}

/// Whether the record `mine` still exists.
async fn record_exists(conn: &Conn, mine: &str) -> Result<bool> {
    let ctx = Ctx::new("lock", Some(mine), conn.timeout());
    let resp = conn
        .call(ctx, |c| {
            let mut kv = c.kv.clone();
            async move {
                kv.get(mine, Some(GetOptions::new().with_count_only()))
                    .await
            }
        })
        .await?;
    Ok(resp.count() > 0)
}

/// Waits until no record of `lock` older than `my_rev` is left.
async fn wait_predecessors(conn: &Conn, lock: &Key, my_rev: u64, lost: LostSignal) -> Result<()> {
    let before = i64::try_from(my_rev.saturating_sub(1)).unwrap_or(i64::MAX);
    let (pfx, newest_first) = by_create(lock, SortOrder::Descend);
    let newest_first = newest_first.with_max_create_revision(before);
    loop {
        if lost.is_lost() {
            return Err(lock_lost(lock));
        }
        let ctx = Ctx::new("lock", Some(lock.as_str()), conn.timeout());
        let mut resp = conn
            .call(ctx, |c| {
                let mut kv = c.kv.clone();
                let (pfx, o) = (pfx.clone(), newest_first.clone());
                async move { kv.get(pfx, Some(o)).await }
            })
            .await?;
        let at = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        let Some(pred) = records(lock, resp.take_kvs().into_iter().map(|kv| kv.0).collect()).next()
        else {
            return Ok(());
        };
        tokio::select! {
            r = wait_delete(conn, pred.key, at) => r?,
            _ = lost.clone().wait() => return Err(lock_lost(lock)),
        }
    }
}

/// Waits for a delete of `key` after revision `at`. Returns early (Ok) when
/// the watch breaks: the caller looks again.
async fn wait_delete(conn: &Conn, key: Vec<u8>, at: u64) -> Result<()> {
    let ctx = Ctx::new("lock", None, conn.timeout());
    let mut client = conn.clients().await?.watch.clone();
    let from = i64::try_from(at.saturating_add(1)).unwrap_or(i64::MAX);
    let mut stream = match tokio::time::timeout(
        conn.timeout(),
        client.watch(key, Some(WatchOptions::new().with_start_revision(from))),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(error::map(e, ctx)),
        Err(_) => return Err(ctx.timeout_error()),
    };
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.canceled() || resp.0.events.iter().any(|e| e.r#type == 1) {
                    return Ok(());
                }
            }
            Ok(None) | Err(_) => return Ok(()),
        }
    }
}

/// Who holds `lock`: the record with the lowest create revision.
pub(crate) async fn holder(conn: &Conn, lock: &Key) -> Result<Option<LockInfo>> {
    let (pfx, oldest_first) = by_create(lock, SortOrder::Ascend);
    let ctx = Ctx::new("lock_holder", Some(lock.as_str()), conn.timeout());
    let mut resp = conn
        .call(ctx, |c| {
            let mut kv = c.kv.clone();
            let (pfx, o) = (pfx.clone(), oldest_first.clone());
            async move { kv.get(pfx, Some(o)).await }
        })
        .await?;
    Ok(
        records(lock, resp.take_kvs().into_iter().map(|kv| kv.0).collect())
            .next()
            .map(|kv| LockInfo {
                fencing_token: rev(kv.create_revision),
                owner: String::from_utf8(kv.value).ok().filter(|o| !o.is_empty()),
            }),
    )
}

fn lock_lost(lock: &Key) -> Error {
    Error::LockLost {
        backend: BACKEND,
        key: lock.to_string(),
    }
}

/// The guard's release handle.
struct Release(KeptLease);

#[async_trait]
impl LockRelease for Release {
    async fn release(self: Box<Self>) -> Result<()> {
        self.0.revoke().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_children_are_records_of_a_lock() {
        let kv = |k: &str| PbKeyValue {
            key: k.as_bytes().to_vec(),
            ..Default::default()
        };
        let lock = Key::from_backend("__anykv/locks/ns/a").unwrap();
        let kvs = vec![
            kv("__anykv/locks/ns/a/694d7c"),
            kv("__anykv/locks/ns/a/b/694d7d"),
            kv("__anykv/locks/ns/ab/694d7e"),
            kv("__anykv/locks/ns/a/"),
        ];
        let got: Vec<String> = records(&lock, kvs)
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect();
        assert_eq!(got, ["__anykv/locks/ns/a/694d7c"]);
    }
}

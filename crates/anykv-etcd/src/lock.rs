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
    Error, Key, LockGuard, LockInfo, LockOptions, LockRelease, LostNotifier, LostSignal, Result,
    async_trait, lost_pair,
};
use etcd_client::{
    Compare, CompareOp, GetOptions, LeaseClient, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    WatchOptions, proto::PbKeyValue, proto::PbTxnOpResponse,
};
use tokio::{task::JoinHandle, time::Instant};

use crate::{
    conn::{Conn, after},
    error::{self, BACKEND, Ctx},
    lease::{self, Lease},
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
    let session = Session::start(clients.lease.clone(), lease, conn.timeout());
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

/// A lease kept alive by a task, revoked when dropped unless released.
struct Session {
    client: LeaseClient,
    lease: Lease,
    timeout: Duration,
    renew: JoinHandle<()>,
    notifier: Option<LostNotifier>,
    lost: LostSignal,
}

impl Session {
    fn start(client: LeaseClient, lease: Lease, timeout: Duration) -> Session {
        let (notifier, lost) = lost_pair();
        let renew = tokio::spawn(keep_alive(client.clone(), lease, timeout, notifier.clone()));
        Session {
            client,
            lease,
            timeout,
            renew,
            notifier: Some(notifier),
            lost,
        }
    }

    /// Stops renewing, marks the lock lost for its holder, and revokes the
    /// lease (deleting the record). If that fails it is tried again in the
    /// background: a record left behind would hold the queue until its
    /// lease expires.
    async fn revoke(mut self) -> Result<()> {
        self.stop();
        let revoked = lease::revoke(self.client.clone(), self.lease.id, self.timeout).await;
        if revoked.is_err() {
            lease::revoke_in_background(self.client.clone(), self.lease.id, self.timeout);
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

impl Drop for Session {
    fn drop(&mut self) {
        if self.notifier.is_some() {
            // Dropped without `revoke` (a cancelled lock call): give the
            // place up in the background; the lease would expire anyway.
            self.stop();
            lease::revoke_in_background(self.client.clone(), self.lease.id, self.timeout);
        }
    }
}

/// The guard's release handle.
struct Release(Session);

#[async_trait]
impl LockRelease for Release {
    async fn release(self: Box<Self>) -> Result<()> {
        self.0.revoke().await
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
                tracing::debug!(error = %e, lease = lease.id, "etcd lock: renewal failed; retrying");
                stream = None;
                wait = retry;
            }
            Err(_) => {
                stream = None;
                wait = retry;
            }
        }
    }
    tracing::debug!(lease = lease.id, "etcd lock: lease lost");
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

//! Locks: exclusion, fencing tokens, try_lock, holder, lost(), release.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anykv_core::{Bytes, ErrorKind, Key, Kv, LockOptions, PutOptions, Store};

use crate::support::{Ctx, err_kind, eventually, key, ok};

fn opts(wait: Option<Duration>) -> LockOptions {
    LockOptions {
        ttl: Duration::from_secs(10),
        wait,
        owner: Some("testkit".into()),
        ..LockOptions::default()
    }
}

/// On a backend without locks, every lock operation is `Unsupported`.
async fn unsupported(cx: &Ctx) -> bool {
    if cx.caps().locks {
        return false;
    }
    let k = key("lk/x");
    err_kind(
        "lock",
        cx.kv.lock(&k, opts(None)).await,
        ErrorKind::Unsupported,
    );
    err_kind(
        "try_lock",
        cx.kv.try_lock(&k, opts(None)).await,
        ErrorKind::Unsupported,
    );
    err_kind(
        "lock_holder",
        cx.kv.lock_holder(&k).await,
        ErrorKind::Unsupported,
    );
    true
}

pub async fn mutual_exclusion_between_tasks(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    const TASKS: usize = 8;
    const ROUNDS: usize = 5;
    let lock = key("lk/counter-lock");
    let counter = key("lk/counter");
    ok(
        "init",
        cx.kv.put(&counter, "0".into(), PutOptions::default()).await,
    );
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let kv: Kv = if t % 2 == 0 {
            cx.kv.clone()
        } else {
            cx.other_handle()
        };
        let (lock, counter, inside) = (lock.clone(), counter.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = kv.lock(&lock, opts(Some(Duration::from_secs(60)))).await?;
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                let cur = kv.get(&counter).await?.map(|p| p.value).unwrap_or_default();
                let n: u64 = std::str::from_utf8(&cur)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u64::MAX);
                tokio::time::sleep(Duration::from_millis(2)).await;
                kv.put(
                    &counter,
                    Bytes::from((n + 1).to_string()),
                    PutOptions::default(),
                )
                .await?;
                inside.fetch_sub(1, Ordering::SeqCst);
                guard.release().await?;
            }
            Ok::<(), anykv_core::Error>(())
        }));
    }
    for t in tasks {
        ok("locking task", t.await.expect("task"));
    }
    let total = ok("get counter", cx.kv.get(&counter).await)
        .expect("counter")
        .value;
    assert_eq!(
        &total[..],
        (TASKS * ROUNDS).to_string().as_bytes(),
        "increments lost: the lock did not exclude"
    );
}

pub async fn fencing_tokens_increase(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let k = key("lk/fence");
    let other = cx.other_handle();
    let mut last = None;
    for i in 0..4 {
        let kv = if i % 2 == 0 { &cx.kv } else { &other };
        let g = ok(
            "lock",
            kv.lock(&k, opts(Some(Duration::from_secs(20)))).await,
        );
        assert_eq!(g.key(), &k, "the guard shows the caller's key");
        if let Some(prev) = last {
            assert!(
                g.fencing_token() > prev,
                "fencing token {} not above {prev}",
                g.fencing_token()
            );
        }
        last = Some(g.fencing_token());
        ok("release", g.release().await);
    }
}

pub async fn try_lock_and_holder(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let k = key("lk/try");
    let other = cx.other_handle();
    assert_eq!(
        ok("holder of a free lock", cx.kv.lock_holder(&k).await),
        None
    );
    let g =
        ok("try_lock free", cx.kv.try_lock(&k, opts(None)).await).expect("a free lock is taken");
    assert!(
        ok("try_lock held", other.try_lock(&k, opts(None)).await).is_none(),
        "try_lock on a held lock returns None"
    );
    let holder = ok("lock_holder", other.lock_holder(&k).await).expect("a holder is reported");
    assert_eq!(holder.fencing_token, g.fencing_token());
    assert_eq!(holder.owner.as_deref(), Some("testkit"));
    ok("release", g.release().await);
    assert_eq!(
        ok("holder after release", cx.kv.lock_holder(&k).await),
        None
    );
    let g2 = ok(
        "try_lock after release",
        other.try_lock(&k, opts(None)).await,
    )
    .expect("free again");
    ok("release", g2.release().await);
    // Locks are not keys: they never show in the namespace.
    assert!(ok("list", cx.kv.list(&anykv_core::Prefix::root()).await).is_empty());
}

pub async fn lost_after_release(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let g = ok("lock", cx.kv.lock(&key("lk/lost"), opts(None)).await);
    assert!(!g.is_lost(), "a fresh lock is not lost");
    let lost = g.lost();
    let signal = g.lost_signal();
    ok("release", g.release().await);
    tokio::time::timeout(Duration::from_secs(10), lost)
        .await
        .expect("lost() resolves once the lock is released");
    assert!(signal.is_lost());
}

pub async fn dropped_guard_releases(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let k: Key = key("lk/drop");
    let g = ok("lock", cx.kv.lock(&k, opts(None)).await);
    drop(g);
    let other = cx.other_handle();
    let g2 = ok(
        "lock after drop",
        other.lock(&k, opts(Some(Duration::from_secs(20)))).await,
    );
    ok("release", g2.release().await);
    eventually("holder clears", Duration::from_secs(10), || async {
        matches!(cx.kv.lock_holder(&k).await, Ok(None))
    })
    .await;
}

pub async fn wait_times_out(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let k = key("lk/wait");
    let g = ok("lock", cx.kv.lock(&k, opts(None)).await);
    let started = tokio::time::Instant::now();
    err_kind(
        "lock with a wait on a held lock",
        cx.other_handle()
            .lock(&k, opts(Some(Duration::from_millis(300))))
            .await,
        ErrorKind::Timeout,
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "gave up before the wait"
    );
    assert!(
        !g.is_lost(),
        "a waiter timing out does not disturb the holder"
    );
    ok("release", g.release().await);
}

/// A holder past `max_hold` loses the lock (its `lost()` fires) and the
/// next waiter takes it, with a higher fencing token.
pub async fn max_hold_releases(cx: Ctx) {
    if unsupported(&cx).await {
        return;
    }
    let k = key("lk/maxhold");
    let stuck = ok(
        "lock with max_hold",
        cx.kv
            .lock(&k, opts(None).with_max_hold(Duration::from_secs(1)))
            .await,
    );
    let started = tokio::time::Instant::now();
    let other = cx.other_handle();
    let waiter = {
        let k = k.clone();
        tokio::spawn(async move { other.lock(&k, opts(Some(Duration::from_secs(30)))).await })
    };
    tokio::time::timeout(Duration::from_secs(15), stuck.lost())
        .await
        .expect("lost() fires past max_hold");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "lost before max_hold: {:?}",
        started.elapsed()
    );
    assert!(stuck.is_lost());
    let next = ok(
        "the waiter takes the lock",
        tokio::time::timeout(Duration::from_secs(30), waiter)
            .await
            .expect("waiter within 30 s")
            .expect("task"),
    );
    assert!(next.fencing_token() > stuck.fencing_token());
    ok("release", next.release().await);
    drop(stuck);
}

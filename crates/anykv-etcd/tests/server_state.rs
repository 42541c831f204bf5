//! Tests that look at (or change) state of the whole etcd server: the
//! watcher count in its metrics, and compaction. They run one at a time, in
//! their own test binary, so no other test's watches or history interfere.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use anykv_core::{Error, Key, Prefix, PutOptions, Start, Store, Target};
use anykv_etcd as _;
use futures::StreamExt;
use tokio::{sync::Mutex, time::timeout};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_watch_streams_cancels_the_server_watchers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let endpoint = common::endpoints(&url)[0].clone();
    let kv = common::open(&url, &common::unique("watchers"), "").await;
    let base = common::metric(&endpoint, WATCHERS).await.expect("metrics");
    let mut streams = Vec::new();
    for i in 0..20 {
        let p = Prefix::new(format!("p{i}")).unwrap();
        streams.push(kv.watch(Target::Prefix(p), Start::Now).await.unwrap());
    }
    let open = common::metric(&endpoint, WATCHERS).await.unwrap();
    assert!(open >= base + 20.0, "20 watches open: {base} -> {open}");
    drop(streams);
    let mut now = open;
    for _ in 0..50 {
        now = common::metric(&endpoint, WATCHERS).await.unwrap();
        if now <= base {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        now <= base,
        "server watchers left after dropping: {base} -> {now}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_from_a_compacted_revision_yields_compacted_then_ends() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let ns = common::unique("compact");
    let kv = common::open(&url, &ns, "").await;
    let k = Key::new("k").unwrap();
    let first = kv.put(&k, "1".into(), PutOptions::default()).await.unwrap();
    let last = kv.put(&k, "2".into(), PutOptions::default()).await.unwrap();
    let mut raw = common::raw(&url).await;
    raw.compact(last.get() as i64, None).await.unwrap();

    let mut w = kv
        .watch(Target::Key(k.clone()), Start::After(first.get() - 1))
        .await
        .unwrap();
    match timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Err(Error::Compacted {
            revision, oldest, ..
        }))) => {
            assert_eq!(revision, first.get());
            assert_eq!(oldest, last.get());
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // The driver's stream ends right after the error (checked on the driver
    // itself: the layers add their own end-of-stream handling).
    let driver =
        anykv_etcd::EtcdStore::connect(anykv_etcd::EtcdOptions::new(common::endpoints(&url)))
            .await
            .unwrap();
    let full = Key::new(format!("{ns}/k")).unwrap();
    let mut w = driver
        .watch(Target::Key(full), Start::After(first.get() - 1))
        .await
        .unwrap();
    assert!(matches!(
        timeout(Duration::from_secs(5), w.next()).await,
        Ok(Some(Err(Error::Compacted { .. })))
    ));
    let next = timeout(Duration::from_secs(5), w.next()).await;
    assert!(
        matches!(next, Ok(None)),
        "the stream ends after Compacted, got {next:?}"
    );
    // From the compaction point on, history is there.
    let mut w = kv
        .watch(Target::Key(k.clone()), Start::After(last.get() - 1))
        .await
        .unwrap();
    match timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Ok(e))) => assert_eq!(e.revision(), last.get()),
        other => panic!("{other:?}"),
    }
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// `snapshot` under concurrent writers: every pair is the state at the
/// returned revision (no pair newer than it; each key's value is the one it
/// had then), and a key written before the call and untouched since is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_pinned_to_one_revision_under_concurrent_writers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let ns = common::unique("snapshot");
    let kv = common::open(&url, &ns, "").await;
    let (a, b) = (Prefix::new("a").unwrap(), Prefix::new("b").unwrap());
    // Enough keys for several pages (256 per page) in each prefix.
    let mut written = Vec::new();
    for i in 0..300 {
        for p in ["a", "b"] {
            let k = Key::new(format!("{p}/k{i:03}")).unwrap();
            written.push(kv.put(&k, "0".into(), PutOptions::default()).await.unwrap());
        }
    }
    let still = Key::new("b/still").unwrap();
    let still_v = kv
        .put(&still, "s".into(), PutOptions::default())
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (kv, stop) = (kv.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let p = if n.is_multiple_of(2) { "a" } else { "b" };
                let k = Key::new(format!("{p}/k{:03}", n % 300)).unwrap();
                kv.put(&k, n.to_string().into(), PutOptions::default())
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut raw = common::raw(&url).await;
    for _ in 0..5 {
        let snap = kv.snapshot(&[a.clone(), b.clone()]).await.unwrap();
        assert_eq!(snap.pairs.len(), 601, "every key of both prefixes, once");
        assert!(
            snap.pairs
                .iter()
                .any(|p| p.key == still && p.version == still_v)
        );
        // The same ranges read by a raw client at the snapshot's revision.
        let mut expected = Vec::new();
        for p in ["a", "b"] {
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_revision(snap.revision as i64);
            let resp = raw.get(format!("{ns}/{p}/"), Some(opts)).await.unwrap();
            for kv in resp.kvs() {
                expected.push((kv.key_str().unwrap().to_owned(), kv.mod_revision() as u64));
            }
        }
        let mut got: Vec<(String, u64)> = snap
            .pairs
            .iter()
            .map(|p| {
                assert!(
                    p.mod_revision <= snap.revision,
                    "{p:?} after {}",
                    snap.revision
                );
                (format!("{ns}/{}", p.key), p.mod_revision)
            })
            .collect();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "the state at revision {}", snap.revision);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(written.iter().all(|v| v.get() > 0));
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// `compact`: a watch from below the compaction point is `Compacted`;
/// compacting again at or below it is a no-op; above the current revision is
/// `InvalidArgument`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_discards_history_is_idempotent_and_refuses_the_future() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let kv = common::open(&url, &common::unique("compact2"), "").await;
    assert!(kv.capabilities().compact);
    let k = Key::new("k").unwrap();
    let first = kv.put(&k, "1".into(), PutOptions::default()).await.unwrap();
    let last = kv.put(&k, "2".into(), PutOptions::default()).await.unwrap();
    kv.compact(last.get()).await.unwrap();
    kv.compact(last.get()).await.unwrap();
    kv.compact(first.get()).await.unwrap();
    let e = kv.compact(last.get() + 1_000_000).await.unwrap_err();
    assert_eq!(e.kind(), anykv_core::ErrorKind::InvalidArgument, "{e}");
    let mut w = kv
        .watch(Target::Key(k.clone()), Start::After(first.get() - 1))
        .await
        .unwrap();
    match timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Err(Error::Compacted { oldest, .. }))) => assert_eq!(oldest, last.get()),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// 1,500 watches on one handle (two shared streams): etcd counts 1,500 more
/// watchers; dropping 1,000 of them cancels exactly those at once (the
/// other 500 stay and still deliver), and dropping the rest frees them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_shared_stream_watches_cancels_exactly_their_server_watchers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let endpoint = common::endpoints(&url)[0].clone();
    let kv = common::open(&url, &common::unique("watchers2"), "").await;
    let base = common::metric(&endpoint, WATCHERS).await.expect("metrics");
    let mut streams = Vec::new();
    for i in 0..1500 {
        let k = Key::new(format!("k{i}")).unwrap();
        streams.push(kv.watch(Target::Key(k), Start::Now).await.unwrap());
    }
    let settled = |want: f64| {
        let endpoint = endpoint.clone();
        async move {
            let mut now = f64::NAN;
            for _ in 0..50 {
                now = common::metric(&endpoint, WATCHERS).await.unwrap();
                if now == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            now
        }
    };
    assert_eq!(settled(base + 1500.0).await, base + 1500.0);
    let kept = streams.split_off(1000);
    drop(streams);
    assert_eq!(settled(base + 500.0).await, base + 500.0, "1,000 cancelled");
    let mut kept = kept;
    let k = Key::new("k1499").unwrap();
    let v = kv.put(&k, "x".into(), PutOptions::default()).await.unwrap();
    match timeout(Duration::from_secs(5), kept[499].next()).await {
        Ok(Some(Ok(e))) => assert_eq!(e.revision(), v.get()),
        other => panic!("a kept watch still delivers: {other:?}"),
    }
    drop(kept);
    assert_eq!(settled(base).await, base, "all cancelled");
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

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

//! `snapshot()` on Consul (issue 10): several prefixes at one index, under
//! concurrent writers.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anykv_consul as _; // links the driver so `open` finds it
use anykv_core::{ErrorKind, Event, Key, Prefix, PutOptions, SnapshotMode, Start, Store, Target};
use futures::StreamExt;
use tokio::time::{Instant, timeout};

/// Every version each key was acknowledged with.
type Acked = Arc<Mutex<BTreeMap<String, Vec<u64>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefixes_at_one_index_under_concurrent_writers() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("snapshot");
    let kv = common::open(&url, &ns, "timeout=5s").await;
    assert_eq!(kv.capabilities().snapshot, Some(SnapshotMode::Atomic));
    let (a, b) = (Prefix::new("a").unwrap(), Prefix::new("b").unwrap());

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (kv, acked, stop) = (kv.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Alternate prefixes; a few keys each, rewritten often.
                let name = format!(
                    "{}/k{}",
                    if i.is_multiple_of(2) { "a" } else { "b" },
                    (w * 7 + i) % 10
                );
                let key = Key::new(name.clone()).unwrap();
                let v = kv
                    .put(&key, format!("{w}-{i}").into(), PutOptions::default())
                    .await
                    .unwrap();
                acked.lock().unwrap().entry(name).or_default().push(v.get());
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut snapshots = 0;
    let mut taken = Vec::new();
    let end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < end {
        // Everything acknowledged before the call must be in the snapshot.
        let before = acked.lock().unwrap().clone();
        let snap = kv.snapshot(&[a.clone(), b.clone()]).await.unwrap();
        let got: BTreeMap<String, u64> = snap
            .pairs
            .iter()
            .map(|p| (p.key.to_string(), p.mod_revision))
            .collect();
        for p in &snap.pairs {
            assert!(
                p.mod_revision <= snap.revision,
                "{} at {} in a snapshot at {}",
                p.key,
                p.mod_revision,
                snap.revision
            );
            assert!(
                p.key.as_str().starts_with("a/") || p.key.as_str().starts_with("b/"),
                "{} is in neither prefix",
                p.key
            );
        }
        for (key, versions) in &before {
            let latest = versions.iter().max().copied().unwrap_or(0);
            let seen = got.get(key).copied();
            assert!(
                seen.is_some_and(|s| s >= latest),
                "{key}: acknowledged at {latest} before the snapshot, snapshot has {seen:?}"
            );
        }
        snapshots += 1;
        taken.push(snap);
    }
    assert!(snapshots >= 5, "only {snapshots} snapshots in 4 s");

    // A watch from the snapshot's revision reports every key changed after it.
    let snap = taken.last().cloned().unwrap();
    let mut w = kv
        .watch(Target::Prefix(a.clone()), Start::After(snap.revision))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in writers {
        t.await.unwrap();
    }
    // Exactly the state at `revision`: for each key, the newest write at or
    // below it (the writers never delete), now that every write is known.
    let acked = acked.lock().unwrap().clone();
    for snap in &taken {
        let got: BTreeMap<&str, u64> = snap
            .pairs
            .iter()
            .map(|p| (p.key.as_str(), p.mod_revision))
            .collect();
        for (key, versions) in &acked {
            let at = versions.iter().filter(|v| **v <= snap.revision).max();
            assert_eq!(
                got.get(key.as_str()),
                at,
                "{key}: the state at {} has version {at:?}",
                snap.revision
            );
        }
    }
    let final_a: BTreeMap<String, u64> = kv
        .list(&a)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key.to_string(), p.mod_revision))
        .collect();
    let mut view: BTreeMap<String, u64> = snap
        .pairs
        .iter()
        .filter(|p| p.key.as_str().starts_with("a/"))
        .map(|p| (p.key.to_string(), p.mod_revision))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    while view != final_a {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, w.next()).await {
            Ok(Some(Ok(Event::Put { kv, .. }))) => {
                assert!(kv.mod_revision > snap.revision);
                view.insert(kv.key.to_string(), kv.mod_revision);
            }
            other => panic!("watch from the snapshot did not converge: {other:?}"),
        }
    }
    println!("{snapshots} snapshots under 4 writers, each exactly the state at its revision");
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_prefixes_is_a_clear_error() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("snapshot-many");
    let kv = common::open(&url, &ns, "").await;
    let many: Vec<Prefix> = (0..=anykv_consul::MAX_SNAPSHOT_PREFIXES)
        .map(|i| Prefix::new(format!("p{i:03}")).unwrap())
        .collect();
    let e = kv.snapshot(&many).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("63"), "{e}");
    let fine = kv
        .snapshot(&many[..anykv_consul::MAX_SNAPSHOT_PREFIXES])
        .await
        .unwrap();
    assert!(fine.pairs.is_empty() && fine.revision > 0);
}

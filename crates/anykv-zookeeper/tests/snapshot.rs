//! `snapshot` on a real ZooKeeper: pairs of several prefixes as of one
//! instant (the verified double read), under concurrent multi writers.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anykv_core::{
    Event, Key, Op, Prefix, PutOptions, SnapshotMode, Start, Store, Target, WatchStream,
};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn prefix(s: &str) -> Prefix {
    Prefix::new(s).unwrap()
}

async fn next_event(w: &mut WatchStream) -> Event {
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Ok(e))) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_of_two_prefixes_never_show_a_multi_half_applied() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("snapshot");
    let kv = common::open(&url, &ns, "").await;
    assert_eq!(
        kv.capabilities().snapshot,
        Some(SnapshotMode::Verified),
        "declared"
    );
    // Written before, never touched again: present in every snapshot.
    kv.put(&key("a/still"), "here".into(), PutOptions::default())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Two writers, each updating one key under `a/` and one under `b/` in
    // one multi, both to the same counter value; a third key appears and
    // disappears (children created and deleted under the prefixes).
    let mut writers = Vec::new();
    for w in 0..2 {
        let kv = kv.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                n += 1;
                let v = format!("{n}");
                let mut ops = vec![
                    Op::Put(key(&format!("a/w{w}")), v.clone().into()),
                    Op::Put(key(&format!("b/deep/w{w}")), v.clone().into()),
                ];
                if n.is_multiple_of(2) {
                    ops.push(Op::Put(key(&format!("a/t{w}/x")), v.clone().into()));
                    ops.push(Op::Put(key(&format!("b/t{w}")), v.into()));
                } else if n > 1 {
                    ops.push(Op::Delete(key(&format!("a/t{w}/x"))));
                    ops.push(Op::Delete(key(&format!("b/t{w}"))));
                }
                kv.atomic(vec![], ops).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            n
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    let (mut taken, mut refused) = (0, 0);
    let mut last_revision = 0;
    while Instant::now() < deadline {
        let snap = match kv.snapshot(&[prefix("a"), prefix("b")]).await {
            Ok(s) => s,
            Err(e) => {
                // Allowed under writes, but must say so.
                assert_eq!(e.kind(), anykv_core::ErrorKind::Unavailable, "{e}");
                refused += 1;
                continue;
            }
        };
        taken += 1;
        assert!(snap.revision >= last_revision, "revisions go forward");
        last_revision = snap.revision;
        let get = |k: &str| {
            snap.pairs
                .iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| String::from_utf8(kv.value.to_vec()).unwrap())
        };
        assert_eq!(get("a/still").as_deref(), Some("here"), "untouched key");
        for w in 0..2 {
            let a = get(&format!("a/w{w}"));
            let b = get(&format!("b/deep/w{w}"));
            assert_eq!(a, b, "writer {w}'s multi half applied: {:?}", snap.pairs);
            let ta = get(&format!("a/t{w}/x"));
            let tb = get(&format!("b/t{w}"));
            assert_eq!(ta, tb, "writer {w}'s created/deleted pair split");
            if let Some(t) = ta {
                assert_eq!(Some(t), a, "the pair written in the same multi");
            }
        }
        for kv in &snap.pairs {
            assert!(
                kv.mod_revision <= snap.revision,
                "{kv:?} after the revision"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 10, "the writers ran");
    }
    eprintln!("snapshots: {taken} taken, {refused} refused under writes");
    assert!(taken >= 10, "{taken} snapshots taken, {refused} refused");

    // Quiet now: a snapshot succeeds at once and a watch from its revision
    // reports exactly the later changes.
    let snap = kv.snapshot(&[prefix("a"), prefix("b")]).await.unwrap();
    let mut w = kv
        .watch(Target::Prefix(prefix("a")), Start::After(snap.revision))
        .await
        .unwrap();
    kv.put(&key("a/after"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    match next_event(&mut w).await {
        Event::Put { kv, .. } => assert_eq!(kv.key.as_str(), "a/after", "nothing before it"),
        other => panic!("{other:?}"),
    }
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_prefixes_are_empty_and_checked() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("snapshot-missing");
    let kv = common::open(&url, &ns, "").await;
    kv.put(&key("x/1"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    let snap = kv
        .snapshot(&[prefix("nothing/here"), prefix("x")])
        .await
        .unwrap();
    let keys: Vec<&str> = snap.pairs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["x/1"]);
    assert!(snap.revision >= snap.pairs[0].mod_revision);
    // The root prefix covers the namespace.
    let all = kv.snapshot(&[Prefix::root()]).await.unwrap();
    assert_eq!(all.pairs.len(), 1);
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

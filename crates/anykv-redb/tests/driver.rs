//! redb-specific behaviour beyond the shared suite: persistence across
//! restarts, history bounds, TTL sweeping, group commit, file ownership.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use anykv_core::{
    Bytes, Check, Condition, ErrorKind, Event, Key, Kv, LockOptions, Op, Prefix, PutOptions, Start,
    Store, Target,
};
use anykv_redb::{RedbStore, Settings};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn url(path: &Path, query: &str) -> String {
    format!("redb://{}{query}", path.display())
}

async fn open(path: &Path, query: &str) -> Kv {
    anykv_core::open(&url(path, query)).await.unwrap()
}

async fn next(w: &mut anykv_core::WatchStream) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("no error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_versions_and_tokens_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restart.redb");
    let k = key("a/b");
    let (v1, token1);
    {
        let kv = open(&path, "").await;
        v1 = kv.put(&k, "1".into(), PutOptions::default()).await.unwrap();
        assert!(kv.delete(&k, Condition::Always).await.unwrap());
        let g = kv.lock(&key("job"), LockOptions::default()).await.unwrap();
        token1 = g.fencing_token();
        // Closed while the lock is held: a crash leaves the record behind.
        std::mem::forget(g);
        kv.close().await.unwrap();
    }
    let kv = open(&path, "").await;
    assert_eq!(kv.get(&k).await.unwrap(), None, "the delete is durable");
    let v2 = kv.put(&k, "2".into(), PutOptions::default()).await.unwrap();
    assert!(
        v2.get() > v1.get(),
        "versions are never reused across restarts"
    );
    let pair = kv.get(&k).await.unwrap().unwrap();
    assert_eq!(
        pair.create_revision,
        v2.get(),
        "a re-created key is a new incarnation"
    );
    assert_eq!(
        kv.lock_holder(&key("job")).await.unwrap(),
        None,
        "stale lock records are dropped"
    );
    let g = kv
        .try_lock(&key("job"), LockOptions::default())
        .await
        .unwrap()
        .expect("the lock of the dead run is free");
    assert!(
        g.fencing_token() > token1,
        "fencing tokens keep increasing across restarts"
    );
    g.release().await.unwrap();
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_window_and_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("history.redb");
    let kv = open(&path, "?history=5").await;
    let k = key("h");
    let first = kv
        .put(&k, "0".into(), PutOptions::default())
        .await
        .unwrap()
        .get();
    for i in 1..10 {
        kv.put(&k, Bytes::from(i.to_string()), PutOptions::default())
            .await
            .unwrap();
    }
    let err = kv
        .watch(Target::Key(k.clone()), Start::After(first))
        .await
        .err()
        .expect("a start before the window fails");
    assert_eq!(err.kind(), ErrorKind::Compacted, "{err}");
    assert!(err.to_string().contains("compacted"), "{err}");
    // The last 5 revisions are still there.
    let last = kv.get(&k).await.unwrap().unwrap().mod_revision;
    let mut w = kv
        .watch(Target::Key(k.clone()), Start::After(last - 4))
        .await
        .unwrap();
    for want in 6..10 {
        let ev = next(&mut w).await;
        let Event::Put { kv: p, prev } = ev else {
            panic!("put expected")
        };
        assert_eq!(p.value, Bytes::from(want.to_string()));
        assert_eq!(
            prev.unwrap().value,
            Bytes::from((want - 1).to_string()),
            "prev is logged"
        );
    }
    kv.close().await.unwrap();
}

/// Writers run while watches start from a past revision and from now: each
/// watch sees one contiguous run of revisions, no gap and no duplicate,
/// including when a slow consumer overflows the live channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_then_live_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watch.redb");
    let kv = open(&path, "?history=100000").await;
    let start = kv
        .put(&key("w/start"), "s".into(), PutOptions::default())
        .await
        .unwrap()
        .get();
    const WRITERS: usize = 16;
    const PER_WRITER: usize = 200;
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                kv.put(
                    &key(&format!("w/{t}/{i}")),
                    "v".into(),
                    PutOptions::default(),
                )
                .await
                .unwrap();
            }
        }));
    }
    // Started while the writers run: the replay part and the live part meet.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut from_past = kv
        .watch(
            Target::Prefix(Prefix::new("w").unwrap()),
            Start::After(start),
        )
        .await
        .unwrap();
    // A consumer that does not read until the writers are done: its live
    // channel overflows and it must recover from the log.
    let mut slow = kv
        .watch(Target::Prefix(Prefix::root()), Start::After(start))
        .await
        .unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    // Then more single commits than the live channel holds (256 batches).
    const SEQUENTIAL: usize = 600;
    for i in 0..SEQUENTIAL {
        kv.put(
            &key(&format!("w/seq/{i}")),
            "v".into(),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let total = WRITERS * PER_WRITER + SEQUENTIAL;
    for (name, w) in [("from_past", &mut from_past), ("slow", &mut slow)] {
        let mut seen = BTreeMap::new();
        let mut last = start;
        while seen.len() < total {
            let ev = next(w).await;
            assert_eq!(ev.revision(), last + 1, "{name}: revisions are contiguous");
            last = ev.revision();
            assert!(
                seen.insert(ev.key().to_string(), ev.revision()).is_none(),
                "{name}: duplicate {ev:?}"
            );
        }
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
        assert!(
            quiet.is_err(),
            "{name}: nothing beyond the writes: {quiet:?}"
        );
    }
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_read_at_once_swept_in_background_and_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ttl.redb");
    let kv = open(&path, "?sweep_interval=50ms").await;
    assert_eq!(
        kv.capabilities().ttl,
        Some(Duration::from_millis(50)),
        "granularity is the sweep interval"
    );
    let k = key("t/short");
    let mut w = kv
        .watch(Target::Prefix(Prefix::new("t").unwrap()), Start::Now)
        .await
        .unwrap();
    let ttl = Duration::from_millis(300);
    kv.put(&k, "x".into(), PutOptions::default().with_ttl(ttl))
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, Event::Put { .. }));
    tokio::time::sleep(ttl).await;
    // Reads honour the deadline whether or not the sweep ran yet.
    assert_eq!(kv.get(&k).await.unwrap(), None);
    assert!(!kv.exists(&k).await.unwrap());
    let started = tokio::time::Instant::now();
    match next(&mut w).await {
        Event::Delete { key, .. } => assert_eq!(key, k),
        other => panic!("expected the sweep's delete, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "swept within the interval (plus slack)"
    );
    // An expired, not yet swept key counts as absent for conditions.
    kv.put(
        &k,
        "y".into(),
        PutOptions::default().with_ttl(Duration::from_millis(1)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    kv.put(&k, "z".into(), PutOptions::if_absent())
        .await
        .unwrap();
    // An absurdly long TTL saturates instead of wrapping into the past.
    kv.put(
        &key("t/forever"),
        "f".into(),
        PutOptions::default().with_ttl(Duration::MAX),
    )
    .await
    .unwrap();
    assert!(kv.exists(&key("t/forever")).await.unwrap());
    // A TTL that runs out while the file is closed is gone on reopen.
    kv.put(
        &key("t/offline"),
        "o".into(),
        PutOptions::default().with_ttl(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    drop(w);
    kv.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kv = open(&path, "?sweep_interval=50ms").await;
    assert_eq!(kv.get(&key("t/offline")).await.unwrap(), None);
    assert_eq!(kv.get(&k).await.unwrap().unwrap().value, Bytes::from("z"));
    kv.close().await.unwrap();
}

/// 64 concurrent writers, some with failing conditions: every good write
/// succeeds, every bad one fails alone, and all good ones are durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_isolates_failed_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("group.redb");
    let kv = open(&path, "").await;
    kv.put(&key("g/taken"), "x".into(), PutOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            if i % 8 == 0 {
                let e = kv
                    .put(&key("g/taken"), "y".into(), PutOptions::if_absent())
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::AlreadyExists);
                let e = kv
                    .atomic(
                        vec![Check::Absent(key("g/taken"))],
                        vec![Op::Put(key(&format!("g/never{i}")), "n".into())],
                    )
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Conflict);
            } else {
                kv.put(
                    &key(&format!("g/{i}")),
                    Bytes::from(vec![i as u8; 256]),
                    PutOptions::default(),
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    kv.close().await.unwrap();
    let kv = open(&path, "").await;
    let listed = kv.list(&Prefix::new("g").unwrap()).await.unwrap();
    assert_eq!(
        listed.len(),
        56 + 1,
        "every acknowledged write is there, no failed one"
    );
    assert!(listed.iter().all(|p| !p.key.as_str().contains("never")));
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_elsewhere_is_unavailable_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.redb");
    // Another holder of the file (redb's lock is per open file description,
    // so this stands in for another process; the durability test checks a
    // real second process).
    let raw = redb::Database::create(&path).unwrap();
    let started = std::time::Instant::now();
    let e = anykv_core::open(&url(&path, "")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    drop(raw);
    let kv = open(&path, "").await;
    kv.probe().await.unwrap();
    kv.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_on_one_file_share_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.redb");
    let a = open(&path, "?prefix=a").await;
    let b = open(&path, "?prefix=b").await;
    let same = dir.path().join(".").join("shared.redb");
    let c = open(&same, "?prefix=a").await;
    a.put(&key("k"), "from a".into(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        b.get(&key("k")).await.unwrap(),
        None,
        "namespaces are isolated"
    );
    assert_eq!(
        c.get(&key("k")).await.unwrap().unwrap().value,
        Bytes::from("from a")
    );
    let g = a.lock(&key("l"), LockOptions::default()).await.unwrap();
    assert!(
        c.try_lock(&key("l"), LockOptions::default())
            .await
            .unwrap()
            .is_none(),
        "locks are shared"
    );
    let e = anykv_core::open(&url(&path, "?history=7"))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidArgument,
        "conflicting settings are refused: {e}"
    );
    g.release().await.unwrap();
    a.close().await.unwrap();
    // The others keep the file open.
    b.put(&key("k"), "from b".into(), PutOptions::default())
        .await
        .unwrap();
    // The last operation a read: its cached snapshot must not pin the file.
    assert!(b.get(&key("k")).await.unwrap().is_some());
    b.close().await.unwrap();
    c.close().await.unwrap();
    // Every handle closed: the file is free for a raw redb open.
    redb::Database::create(&path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_and_options() {
    let dir = tempfile::tempdir().unwrap();
    let rel_dir = dir.path().to_owned();
    // Relative paths resolve against the current directory; tests share one
    // process, so run this in a child-free way: a path relative to "/".
    let abs = rel_dir.join("rel.redb");
    let relative = abs.strip_prefix("/").unwrap().to_owned();
    std::env::set_current_dir("/").unwrap();
    let kv = anykv_core::open(&format!("redb://{}", relative.display()))
        .await
        .unwrap();
    kv.put(&key("x"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    kv.close().await.unwrap();
    assert!(abs.exists(), "created at the relative path");
    for (bad, kind) in [
        ("redb://", ErrorKind::InvalidUrl),
        (
            "redb:///nonexistent-dir-anykv/x.redb",
            ErrorKind::InvalidUrl,
        ),
        (&*url(&abs, "?history=0"), ErrorKind::InvalidUrl),
        (&*url(&abs, "?sweep_interval=soon"), ErrorKind::InvalidUrl),
        (&*url(&abs, "?colour=blue"), ErrorKind::InvalidUrl),
        (&*url(&rel_dir, ""), ErrorKind::InvalidUrl),
    ] {
        let e = anykv_core::open(bad).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{bad}: {e}");
    }
    // A file that is not a redb file is refused with an error, not a panic.
    let junk = rel_dir.join("junk.redb");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    let e = anykv_core::open(&url(&junk, "")).await.unwrap_err();
    assert!(
        matches!(
            e.kind(),
            ErrorKind::DataLoss
                | ErrorKind::Unavailable
                | ErrorKind::InvalidArgument
                | ErrorKind::Backend
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_and_stops_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        RedbStore::open(dir.path().join("export.redb"), Settings::default())
            .await
            .unwrap(),
    );
    let pairs: Vec<_> = (0..5000)
        .map(|i| {
            Ok(anykv_core::KvPair {
                key: key(&format!("e/{i:05}")),
                value: Bytes::from(vec![1u8; 100]),
                version: anykv_core::Version::new(0),
                create_revision: 0,
                mod_revision: 0,
            })
        })
        .collect();
    let n = store
        .import(futures::stream::iter(pairs).boxed())
        .await
        .unwrap();
    assert_eq!(n, 5000);
    let mut s = store.export(&Prefix::new("e").unwrap()).await.unwrap();
    let mut got = 0;
    let mut prev = String::new();
    while let Some(p) = s.next().await {
        let p = p.unwrap();
        assert!(p.key.as_str() > prev.as_str(), "sorted");
        prev = p.key.to_string();
        got += 1;
    }
    assert_eq!(got, 5000);
    // Dropped half-way: the reader thread stops and the store closes cleanly.
    let mut s = store.export(&Prefix::root()).await.unwrap();
    let _ = s.next().await;
    drop(s);
    assert_eq!(store.keys(&Prefix::root()).await.unwrap(), ["e"]);
    store.close().await.unwrap();
    assert_eq!(
        store.get(&key("e/00001")).await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_skip_subtrees_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let kv = open(&dir.path().join("keys.redb"), "").await;
    for k in [
        "a", "a-x", "a/b", "a/c/d", "a0", "b/z", "p/q", "p/q/r", "p/q-s", "p/r",
    ] {
        kv.put(&key(k), "v".into(), PutOptions::default())
            .await
            .unwrap();
    }
    assert_eq!(
        kv.keys(&Prefix::root()).await.unwrap(),
        ["a", "a-x", "a0", "b", "p"]
    );
    assert_eq!(
        kv.keys(&Prefix::new("p").unwrap()).await.unwrap(),
        ["q", "q-s", "r"]
    );
    assert_eq!(
        kv.keys(&Prefix::new("a").unwrap()).await.unwrap(),
        ["b", "c"]
    );
    kv.close().await.unwrap();
}

/// Point reads share a cached snapshot between commits: a read that starts
/// after a write was acknowledged must still see it, whatever other readers
/// keep cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_see_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let kv = open(&dir.path().join("ryw.redb"), "").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..4 {
        let (kv, stop) = (kv.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = kv.get(&key(&format!("ryw/{}", r % 2))).await.unwrap();
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut writers = Vec::new();
    for w in 0..2 {
        let kv = kv.clone();
        writers.push(tokio::spawn(async move {
            let k = key(&format!("ryw/{w}"));
            for i in 0..200u32 {
                let v = kv
                    .put(&k, Bytes::from(i.to_string()), PutOptions::default())
                    .await
                    .unwrap();
                let got = kv.get(&k).await.unwrap().unwrap();
                assert_eq!(got.version, v, "a read after the ack sees the write");
                assert!(kv.exists(&k).await.unwrap());
                if i.is_multiple_of(50) {
                    assert!(kv.delete(&k, Condition::Always).await.unwrap());
                    assert_eq!(
                        kv.get(&k).await.unwrap(),
                        None,
                        "a read after a delete sees it"
                    );
                    assert!(!kv.exists(&k).await.unwrap());
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    kv.close().await.unwrap();
}

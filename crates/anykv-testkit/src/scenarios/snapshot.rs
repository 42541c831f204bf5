//! Snapshots (several prefixes at one revision), the watch that follows one,
//! and compaction.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anykv_core::{
    Bytes, Condition, ErrorKind, Event, Key, KvPair, PutOptions, Snapshot, Start, Store, Target,
    WatchHistory,
};

use crate::support::{Ctx, err_kind, key, next_event, ok, prefix, settle};

/// The snapshot, or `None` after checking that an undeclared snapshot is
/// refused with `Unsupported`.
async fn snapshot_or_unsupported(cx: &Ctx, prefixes: &[&str]) -> Option<Snapshot> {
    let prefixes: Vec<_> = prefixes.iter().map(|p| prefix(p)).collect();
    let got = cx.kv.snapshot(&prefixes).await;
    if cx.caps().snapshot.is_none() {
        err_kind(
            "snapshot without the capability",
            got,
            ErrorKind::Unsupported,
        );
        return None;
    }
    Some(ok("snapshot", got))
}

fn value_of(pairs: &[KvPair], k: &str) -> Option<u64> {
    pairs
        .iter()
        .find(|p| p.key.as_str() == k)
        .and_then(|p| std::str::from_utf8(&p.value).ok()?.parse().ok())
}

/// A writer puts `sa/x = n` then `sb/x = n` for n = 1, 2, …: any state at
/// one instant has `sb/x ≤ sa/x ≤ sb/x + 1`, which a read of one prefix
/// after the other (in either order) breaks as soon as a write lands between.
pub async fn two_prefixes_at_one_revision(cx: Ctx) {
    let kv = cx.kv.clone();
    ok(
        "marker",
        kv.put(&key("sa/marker"), "m".into(), PutOptions::default())
            .await,
    );
    ok(
        "marker",
        kv.put(&key("sb/deep/marker"), "m".into(), PutOptions::default())
            .await,
    );
    ok(
        "outside",
        kv.put(&key("sc/x"), "no".into(), PutOptions::default())
            .await,
    );
    if snapshot_or_unsupported(&cx, &["sa"]).await.is_none() {
        return;
    }
    err_kind(
        "snapshot of no prefix",
        kv.snapshot(&[]).await,
        ErrorKind::InvalidArgument,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (kv, stop) = (kv.clone(), stop.clone());
        tokio::spawn(async move {
            let (a, b) = (key("sa/x"), key("sb/x"));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 10_000 {
                n += 1;
                let v = Bytes::from(n.to_string());
                ok(
                    "writer a",
                    kv.put(&a, v.clone(), PutOptions::default()).await,
                );
                ok("writer b", kv.put(&b, v, PutOptions::default()).await);
            }
            n
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut snapshots = 0;
    while tokio::time::Instant::now() < deadline {
        let snap = ok(
            "snapshot under writes",
            kv.snapshot(&[prefix("sa"), prefix("sb"), prefix("sa/x")])
                .await,
        );
        snapshots += 1;
        let keys: Vec<&str> = snap.pairs.iter().map(|p| p.key.as_str()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            keys, sorted,
            "pairs sorted by key, each once (overlapping prefixes)"
        );
        assert!(
            keys.contains(&"sa/marker") && keys.contains(&"sb/deep/marker"),
            "{keys:?}"
        );
        assert!(!keys.contains(&"sc/x"), "a key of another prefix: {keys:?}");
        for p in &snap.pairs {
            assert!(
                p.mod_revision <= snap.revision,
                "{} written at {} after the snapshot's revision {}",
                p.key,
                p.mod_revision,
                snap.revision
            );
        }
        let (a, b) = (value_of(&snap.pairs, "sa/x"), value_of(&snap.pairs, "sb/x"));
        match (a, b) {
            (None, None) | (Some(1), None) => {}
            (Some(a), Some(b)) => assert!(
                b <= a && a <= b + 1,
                "not one instant: sa/x = {a}, sb/x = {b} (revision {})",
                snap.revision
            ),
            other => panic!("not one instant: (sa/x, sb/x) = {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let written = ok(
        "writer",
        writer.await.map_err(|e| anykv_core::Error::Cancelled {
            backend: "testkit",
            message: e.to_string(),
        }),
    );
    assert!(
        snapshots >= 3 && written >= 3,
        "{snapshots} snapshots, {written} writes"
    );
    // After the writer: the snapshot holds its last, acknowledged writes.
    let snap = ok(
        "final snapshot",
        kv.snapshot(&[prefix("sb"), prefix("sa")]).await,
    );
    assert_eq!(value_of(&snap.pairs, "sa/x"), Some(written));
    assert_eq!(value_of(&snap.pairs, "sb/x"), Some(written));
}

/// Applies events to a map of key → value, as a consumer would.
fn apply(state: &mut BTreeMap<Key, Bytes>, ev: &Event) {
    match ev {
        Event::Put { kv, .. } => {
            state.insert(kv.key.clone(), kv.value.clone());
        }
        Event::Delete { key, .. } => {
            state.remove(key);
        }
    }
}

/// Snapshot, writes, then a watch from the snapshot's revision: Full
/// backends replay exactly the writes after it, once each, in order;
/// Converge backends converge with nothing invented.
pub async fn watch_after_snapshot_has_no_gap(cx: Ctx) {
    let kv = &cx.kv;
    for i in 0..4 {
        ok(
            "put",
            kv.put(&key(&format!("sw/k{i}")), "0".into(), PutOptions::default())
                .await,
        );
    }
    let Some(snap) = snapshot_or_unsupported(&cx, &["sw"]).await else {
        return;
    };
    let full = cx.caps().watch_history == WatchHistory::Full;
    let mut expected: Vec<(String, Option<&str>)> = vec![
        ("sw/k1".into(), Some("1")),
        ("sw/new".into(), Some("n")),
        ("sw/k2".into(), Some("2")),
    ];
    for (k, v) in &expected {
        ok(
            "put after",
            kv.put(
                &key(k),
                Bytes::from(v.unwrap_or_default().to_owned()),
                PutOptions::default(),
            )
            .await,
        );
    }
    if full {
        // Full backends replay deletes too.
        ok(
            "delete after",
            kv.delete(&key("sw/k3"), Condition::Always).await,
        );
        expected.push(("sw/k3".into(), None));
    }
    let mut w = ok(
        "watch after snapshot",
        kv.watch(Target::Prefix(prefix("sw")), Start::After(snap.revision))
            .await,
    );
    let mut state: BTreeMap<Key, Bytes> = snap
        .pairs
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect();
    if full {
        let mut last = snap.revision;
        for (k, v) in &expected {
            let ev = next_event("replayed write", &mut w).await;
            assert!(
                ev.revision() > last,
                "out of order or at/before the snapshot: {ev:?}"
            );
            last = ev.revision();
            assert_eq!(
                ev.key().as_str(),
                k,
                "exactly the writes after the snapshot"
            );
            match (ev, v) {
                (Event::Put { kv, .. }, Some(v)) => assert_eq!(&kv.value[..], v.as_bytes()),
                (Event::Delete { .. }, None) => {}
                (ev, v) => panic!("expected {k} = {v:?}, got {ev:?}"),
            }
        }
    } else {
        // Converge: the keys changed since, then live events; every event is
        // a real write of this scenario.
        let writes: Vec<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
        for _ in 0..expected.len() {
            let ev = next_event("converging event", &mut w).await;
            assert!(
                ev.revision() > snap.revision,
                "at/before the snapshot: {ev:?}"
            );
            assert!(writes.contains(&ev.key().as_str()), "invented event {ev:?}");
            apply(&mut state, &ev);
        }
        settle().await;
        ok(
            "live delete",
            kv.delete(&key("sw/k3"), Condition::Always).await,
        );
        loop {
            let ev = next_event("live delete", &mut w).await;
            apply(&mut state, &ev);
            if matches!(&ev, Event::Delete { key, .. } if key.as_str() == "sw/k3") {
                break;
            }
        }
    }
    if full {
        for (k, v) in &expected {
            match v {
                Some(v) => state.insert(key(k), Bytes::from(v.to_string())),
                None => state.remove(&key(k)),
            };
        }
    }
    let now: BTreeMap<Key, Bytes> = ok("list", kv.list(&prefix("sw")).await)
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    assert_eq!(state, now, "snapshot + events = the store");
}

/// `compact` discards history (a watch from before it gets `Compacted`)
/// and leaves the data and running watches alone; undeclared, it is
/// `Unsupported`.
pub async fn compact_discards_history_only(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("cp/k");
    ok("put 1", kv.put(&k, "1".into(), PutOptions::default()).await);
    let first = crate::support::revision_of(kv, &k).await;
    ok("put 2", kv.put(&k, "2".into(), PutOptions::default()).await);
    let before = crate::support::revision_of(kv, &k).await;
    ok("put 3", kv.put(&k, "3".into(), PutOptions::default()).await);
    let now = crate::support::revision_of(kv, &k).await;
    if !cx.caps().compact {
        err_kind(
            "compact without the capability",
            kv.compact(now).await,
            ErrorKind::Unsupported,
        );
        return;
    }
    let mut live = ok("watch", kv.watch(Target::Key(k.clone()), Start::Now).await);
    settle().await;
    ok("compact", kv.compact(now).await);
    ok("compact again is a no-op", kv.compact(now).await);
    ok("compact below is a no-op", kv.compact(before).await);
    let got = ok("get after compact", kv.get(&k).await);
    assert_eq!(
        got.map(|p| p.value),
        Some(Bytes::from("3")),
        "data survives compaction"
    );
    // A watch that needs an event older than the compacted revision (put 2):
    // Compacted, at once or as its first item.
    match kv.watch(Target::Key(k.clone()), Start::After(first)).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Compacted, "{e}"),
        Ok(mut w) => {
            match tokio::time::timeout(crate::support::EVENT_WAIT, futures::StreamExt::next(&mut w))
                .await
            {
                Ok(Some(Err(e))) => assert_eq!(e.kind(), ErrorKind::Compacted, "{e}"),
                other => {
                    panic!("a watch from a compacted revision: expected Compacted, got {other:?}")
                }
            }
        }
    }
    // A watch from the compacted revision itself replays what follows.
    let mut from_now = ok(
        "watch from the compacted revision",
        kv.watch(Target::Key(k.clone()), Start::After(now)).await,
    );
    ok("put 4", kv.put(&k, "4".into(), PutOptions::default()).await);
    let ev = next_event("running watch after compact", &mut live).await;
    assert_eq!(crate::support::put_value(&ev), Some(&b"4"[..]));
    let ev = next_event("watch from the compacted revision", &mut from_now).await;
    assert_eq!(crate::support::put_value(&ev), Some(&b"4"[..]));
}

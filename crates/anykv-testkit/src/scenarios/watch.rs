//! Watches: order, prev values, directory scope, replay, resume points,
//! cancellation and error delivery.
//!
//! Writes wait for the previous event before the next one, so that backends
//! whose watch converges (rather than replaying history) see every step too.

use std::{collections::BTreeSet, time::Duration};

use anykv_core::{
    Bytes, Condition, ErrorKind, Event, Prefix, PutOptions, Start, Store, Target, WatchHistory,
};
use futures::StreamExt;

use crate::support::{
    Ctx, EVENT_WAIT, key, next_event, no_event, ok, prefix, put_value, revision_of, settle,
};

pub async fn watch_key_in_order_with_prev(cx: Ctx) {
    let kv = &cx.kv;
    let k = key("wk/key");
    let mut w = ok("watch", kv.watch(Target::Key(k.clone()), Start::Now).await);
    settle().await;
    ok("put 1", kv.put(&k, "1".into(), PutOptions::default()).await);
    let e1 = next_event("first put", &mut w).await;
    assert_eq!((e1.key(), put_value(&e1)), (&k, Some(&b"1"[..])));
    ok(
        "put sibling",
        kv.put(&key("wk/other"), "o".into(), PutOptions::default())
            .await,
    );
    ok("put 2", kv.put(&k, "2".into(), PutOptions::default()).await);
    let e2 = next_event("second put", &mut w).await;
    assert_eq!(
        (e2.key(), put_value(&e2)),
        (&k, Some(&b"2"[..])),
        "other keys are not delivered"
    );
    if let Event::Put {
        prev: Some(prev), ..
    } = &e2
    {
        assert_eq!(&prev.value[..], b"1", "prev is the value before the put");
    }
    assert!(e2.revision() > e1.revision(), "revisions grow");
    ok("delete", kv.delete(&k, Condition::Always).await);
    let e3 = next_event("delete", &mut w).await;
    assert!(
        matches!(&e3, Event::Delete { key, .. } if *key == k),
        "expected a delete of {k}, got {e3:?}"
    );
    assert!(e3.revision() > e2.revision());
}

pub async fn watch_prefix_is_directory_scoped(cx: Ctx) {
    let kv = &cx.kv;
    let mut w = ok(
        "watch",
        kv.watch(Target::Prefix(prefix("wp")), Start::Now).await,
    );
    settle().await;
    for k in ["wpx", "wp", "wpx/y"] {
        ok(
            "put outside",
            kv.put(&key(k), "no".into(), PutOptions::default()).await,
        );
    }
    ok(
        "put inside",
        kv.put(&key("wp/a"), "yes".into(), PutOptions::default())
            .await,
    );
    let e = next_event("inside put", &mut w).await;
    assert_eq!(
        e.key().as_str(),
        "wp/a",
        "keys outside wp/ are not delivered"
    );
    ok(
        "put deep",
        kv.put(&key("wp/b/c"), "deep".into(), PutOptions::default())
            .await,
    );
    let e = next_event("deep put", &mut w).await;
    assert_eq!(
        (e.key().as_str(), put_value(&e)),
        ("wp/b/c", Some(&b"deep"[..]))
    );
}

pub async fn replay_from_past_revision(cx: Ctx) {
    let kv = &cx.kv;
    let (a, b, c) = (key("wr/a"), key("wr/b"), key("wr/c"));
    ok("put a", kv.put(&a, "1".into(), PutOptions::default()).await);
    let r1 = revision_of(kv, &a).await;
    ok("put b", kv.put(&b, "2".into(), PutOptions::default()).await);
    ok("put c", kv.put(&c, "3".into(), PutOptions::default()).await);
    ok("delete a", kv.delete(&a, Condition::Always).await);
    let mut w = ok(
        "watch from r1",
        kv.watch(Target::Prefix(prefix("wr")), Start::After(r1))
            .await,
    );
    match cx.caps().watch_history {
        WatchHistory::Full => {
            let got: Vec<Event> = collect(&mut w, 3).await;
            assert_eq!(got[0].key(), &b);
            assert_eq!(put_value(&got[0]), Some(&b"2"[..]));
            assert_eq!(got[1].key(), &c);
            assert!(
                matches!(&got[2], Event::Delete { key, .. } if *key == a),
                "then the delete of a: {:?}",
                got[2]
            );
            assert!(
                got.iter().all(|e| e.revision() > r1),
                "replay holds only revisions after r1"
            );
            assert!(
                got.windows(2).all(|p| p[0].revision() < p[1].revision()),
                "in revision order"
            );
        }
        WatchHistory::Converge => {
            // No history: the driver emits the current keys changed after r1.
            let mut seen = BTreeSet::new();
            while seen.len() < 2 {
                let e = next_event("converging replay", &mut w).await;
                assert!(e.revision() > r1, "replay event at or before r1: {e:?}");
                if let Event::Put { kv: p, .. } = &e {
                    assert_ne!(p.key, a, "a was deleted; its put must not be replayed");
                    let want: &[u8] = if p.key == b { b"2" } else { b"3" };
                    assert_eq!(&p.value[..], want);
                    seen.insert(p.key.clone());
                }
            }
        }
    }
    settle().await;
    ok(
        "put d",
        kv.put(&key("wr/d"), "4".into(), PutOptions::default())
            .await,
    );
    loop {
        let e = next_event("live event after replay", &mut w).await;
        if e.key().as_str() == "wr/d" {
            break;
        }
        assert!(
            cx.caps().watch_history == WatchHistory::Converge,
            "unexpected extra event {e:?}"
        );
    }
}

pub async fn start_after_skips_older(cx: Ctx) {
    let kv = &cx.kv;
    let x = key("ws/x");
    for v in ["1", "2"] {
        ok(
            "put",
            kv.put(&x, Bytes::from(v), PutOptions::default()).await,
        );
    }
    let r = revision_of(kv, &x).await;
    for v in ["3", "4"] {
        ok(
            "put",
            kv.put(&x, Bytes::from(v), PutOptions::default()).await,
        );
    }
    let mut w = ok(
        "watch after r",
        kv.watch(Target::Key(x.clone()), Start::After(r)).await,
    );
    let first = next_event("first event after r", &mut w).await;
    assert!(
        first.revision() > r,
        "event at or before r delivered: {first:?}"
    );
    match cx.caps().watch_history {
        WatchHistory::Full => {
            assert_eq!(put_value(&first), Some(&b"3"[..]));
            let second = next_event("second event", &mut w).await;
            assert_eq!(put_value(&second), Some(&b"4"[..]));
        }
        WatchHistory::Converge => assert_eq!(
            put_value(&first),
            Some(&b"4"[..]),
            "converges to the latest value"
        ),
    }
    no_event("nothing more", &mut w, Duration::from_millis(700)).await;
    // Start::Now replays nothing.
    let mut now = ok(
        "watch now",
        kv.watch(Target::Key(x.clone()), Start::Now).await,
    );
    no_event(
        "Start::Now replays nothing",
        &mut now,
        Duration::from_millis(700),
    )
    .await;
}

pub async fn dropped_watches_release(cx: Ctx) {
    let kv = &cx.kv;
    for i in 0..32 {
        let w = ok(
            "watch",
            kv.watch(Target::Prefix(prefix(&format!("wd/{i}"))), Start::Now)
                .await,
        );
        drop(w);
    }
    let mut w = ok(
        "watch after drops",
        kv.watch(Target::Prefix(prefix("wd")), Start::Now).await,
    );
    settle().await;
    ok(
        "put",
        kv.put(&key("wd/live"), "v".into(), PutOptions::default())
            .await,
    );
    let e = next_event("event after 32 dropped watches", &mut w).await;
    assert_eq!(e.key().as_str(), "wd/live");
    ok("probe", kv.probe().await);
}

pub async fn closed_handle_ends_watch_with_error(cx: Ctx) {
    let handle = cx.other_handle();
    let mut w = ok(
        "watch",
        handle
            .watch(Target::Prefix(Prefix::root()), Start::Now)
            .await,
    );
    settle().await;
    ok("close handle", handle.close().await);
    match tokio::time::timeout(EVENT_WAIT, w.next()).await {
        Err(_) => panic!("closing the handle did not end its watch"),
        Ok(None) => panic!("watch ended silently instead of yielding an error"),
        Ok(Some(Ok(e))) => panic!("expected an error item, got event {e:?}"),
        Ok(Some(Err(e))) => assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}"),
    }
    assert!(
        matches!(tokio::time::timeout(EVENT_WAIT, w.next()).await, Ok(None)),
        "the stream ends after its error"
    );
    ok(
        "other handles keep working",
        cx.kv
            .put(&key("wc/after"), "v".into(), PutOptions::default())
            .await,
    );
}

pub async fn delete_prefix_emits_deletes(cx: Ctx) {
    let kv = &cx.kv;
    let mut w = ok(
        "watch",
        kv.watch(Target::Prefix(prefix("wdp")), Start::Now).await,
    );
    settle().await;
    for k in ["wdp/a", "wdp/b/c"] {
        ok(
            "put",
            kv.put(&key(k), "v".into(), PutOptions::default()).await,
        );
        next_event("put", &mut w).await;
    }
    ok("delete_prefix", kv.delete_prefix(&prefix("wdp")).await);
    let mut deleted = BTreeSet::new();
    while deleted.len() < 2 {
        match next_event("delete from delete_prefix", &mut w).await {
            Event::Delete { key, .. } => {
                deleted.insert(key.to_string());
            }
            other => panic!("expected deletes, got {other:?}"),
        }
    }
    assert_eq!(
        deleted.into_iter().collect::<Vec<_>>(),
        ["wdp/a", "wdp/b/c"]
    );
}

/// 500 watches on one handle (key watches, and prefix watches over groups
/// of keys), one write per key: every watch gets exactly its events, in
/// order, whatever the driver shares between them.
pub async fn many_watches_each_get_their_events(cx: Ctx) {
    const KEYS: usize = 450;
    const GROUPS: usize = 50;
    let kv = &cx.kv;
    let name = |i: usize| format!("wm/g{}/k{i}", i % GROUPS);
    // Half the keys exist before the watches, half do not yet.
    for i in (0..KEYS).step_by(2) {
        ok(
            "put before",
            kv.put(&key(&name(i)), "0".into(), PutOptions::default())
                .await,
        );
    }
    let mut key_watches = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        key_watches.push(ok(
            "key watch",
            kv.watch(Target::Key(key(&name(i))), Start::Now).await,
        ));
    }
    let mut group_watches = Vec::with_capacity(GROUPS);
    for g in 0..GROUPS {
        group_watches.push(ok(
            "prefix watch",
            kv.watch(Target::Prefix(prefix(&format!("wm/g{g}"))), Start::Now)
                .await,
        ));
    }
    settle().await;
    // Puts first, then deletes: a Converge backend may skip a state that
    // lasts no longer than the next write of the same key.
    let writer = cx.other_handle();
    let writes = tokio::spawn(async move {
        for i in 0..KEYS {
            let v = Bytes::from(format!("v{i}"));
            ok(
                "put",
                writer.put(&key(&name(i)), v, PutOptions::default()).await,
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in (0..KEYS).step_by(3) {
            ok(
                "delete",
                writer.delete(&key(&name(i)), Condition::Always).await,
            );
        }
    });
    // Each key watch: its put, then its delete for every third key.
    let checks = key_watches
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| async move {
            let e = next_event("key watch put", &mut w).await;
            assert_eq!(
                (e.key().as_str(), put_value(&e)),
                (name(i).as_str(), Some(format!("v{i}").as_bytes()))
            );
            if i % 3 == 0 {
                let d = next_event("key watch delete", &mut w).await;
                assert!(
                    matches!(&d, Event::Delete { key, .. } if key.as_str() == name(i)),
                    "{d:?}"
                );
                assert!(d.revision() > e.revision());
            }
            no_event(
                "nothing else on a key watch",
                &mut w,
                Duration::from_millis(200),
            )
            .await;
        });
    futures::future::join_all(checks).await;
    // Each group watch: exactly its keys' events, in revision order.
    let groups = group_watches
        .into_iter()
        .enumerate()
        .map(|(g, mut w)| async move {
            let mine: Vec<usize> = (0..KEYS).filter(|i| i % GROUPS == g).collect();
            let want = mine.len() + mine.iter().filter(|i| *i % 3 == 0).count();
            let mut last = 0;
            for _ in 0..want {
                let e = next_event("group watch", &mut w).await;
                assert!(
                    e.key().as_str().starts_with(&format!("wm/g{g}/")),
                    "{e:?} on group {g}"
                );
                assert!(e.revision() > last, "group {g} out of order");
                last = e.revision();
            }
            no_event(
                "nothing else on a group watch",
                &mut w,
                Duration::from_millis(200),
            )
            .await;
        });
    futures::future::join_all(groups).await;
    ok(
        "writer",
        writes.await.map_err(|e| anykv_core::Error::Cancelled {
            backend: "testkit",
            message: e.to_string(),
        }),
    );
}

async fn collect(w: &mut anykv_core::WatchStream, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(next_event("replayed event", w).await);
    }
    out
}

//! Mirrors: a local copy of a prefix that follows every change, waits for
//! one's own writes, and reports undecodable typed values per key.

use std::time::Duration;

use anykv_core::{
    Bytes, Condition, ErrorKind, Event, JsonChange, Kv, Mirror, PutOptions, Store, StoreExt,
};
use futures::StreamExt;

use crate::support::{Ctx, EVENT_WAIT, err_kind, eventually, key, ok, prefix};

/// The mirror, or `None` after checking that a backend without snapshots
/// refuses it with `Unsupported`.
async fn mirror_or_unsupported(cx: &Ctx, p: &str) -> Option<Mirror> {
    let got = cx.kv.mirror(&prefix(p)).await;
    if cx.caps().snapshot.is_none() {
        err_kind("mirror without snapshots", got, ErrorKind::Unsupported);
        return None;
    }
    Some(ok("mirror", got))
}

/// The mirror's pairs equal a `list` of the prefix.
async fn assert_matches_store(what: &str, kv: &Kv, m: &Mirror, p: &str) {
    let want = ok("list", kv.list(&prefix(p)).await);
    let mut last = Vec::new();
    eventually(what, EVENT_WAIT, || {
        last = m.list(&anykv_core::Prefix::root());
        let same = last == want;
        async move { same }
    })
    .await;
}

pub async fn mirror_follows_every_change(cx: Ctx) {
    let kv = &cx.kv;
    ok(
        "before",
        kv.put(&key("mf/old"), "o".into(), PutOptions::default())
            .await,
    );
    ok(
        "before",
        kv.put(&key("mf/gone"), "g".into(), PutOptions::default())
            .await,
    );
    ok(
        "outside",
        kv.put(&key("mfx/a"), "no".into(), PutOptions::default())
            .await,
    );
    let Some(m) = mirror_or_unsupported(&cx, "mf").await else {
        return;
    };
    assert!(m.is_synced());
    assert_eq!(
        m.len(),
        2,
        "the snapshot: {:?}",
        m.list(&anykv_core::Prefix::root())
    );
    let mut changes = m.changes();

    let v = ok(
        "put",
        kv.put(&key("mf/a/b"), "1".into(), PutOptions::default())
            .await,
    );
    // What makes `wait_for(version.get())` read-your-writes.
    assert_eq!(
        v.get(),
        crate::support::revision_of(kv, &key("mf/a/b")).await,
        "a write's version is its revision"
    );
    ok("wait_for own put", m.wait_for(v.get()).await);
    assert_eq!(
        m.value(&key("mf/a/b")).as_deref(),
        Some(&b"1"[..]),
        "read-your-writes"
    );
    assert!(m.revision() >= v.get());
    let ev = next_change(&mut changes).await;
    assert!(
        matches!(&ev, Event::Put { kv, .. } if kv.key.as_str() == "mf/a/b"),
        "{ev:?}"
    );

    ok(
        "delete",
        kv.delete(&key("mf/gone"), Condition::Always).await,
    );
    let ev = next_change(&mut changes).await;
    assert!(
        matches!(&ev, Event::Delete { key, .. } if key.as_str() == "mf/gone"),
        "{ev:?}"
    );
    assert!(m.get(&key("mf/gone")).is_none());

    for k in ["mf/d/1", "mf/d/2", "mf/d/3/x"] {
        ok(
            "put",
            kv.put(&key(k), "d".into(), PutOptions::default()).await,
        );
    }
    ok("delete_prefix", kv.delete_prefix(&prefix("mf/d")).await);
    let ttl_key = key("mf/ttl");
    if cx.caps().ttl.is_some() {
        ok(
            "put with ttl",
            kv.put(
                &ttl_key,
                "t".into(),
                PutOptions::default().with_ttl(Duration::from_secs(1)),
            )
            .await,
        );
    }
    let v = ok(
        "last",
        kv.put(&key("mf/last"), "z".into(), PutOptions::default())
            .await,
    );
    ok("wait_for last", m.wait_for(v.get()).await);
    if let Some(granularity) = cx.caps().ttl {
        let limit = Duration::from_secs(1) + granularity + EVENT_WAIT;
        eventually("ttl expiry reaches the mirror", limit, || {
            let gone = m.get(&ttl_key).is_none();
            async move { gone }
        })
        .await;
    }
    assert_matches_store("mirror equals the store", kv, &m, "mf").await;
    assert_eq!(m.keys(&prefix("mf")), ["a", "last", "old"]);
    assert_eq!(m.keys(&anykv_core::Prefix::root()), ["mf"]);
    assert_eq!(m.list(&prefix("mf/a")).len(), 1, "a sub-prefix");
    assert!(m.get(&key("mfx/a")).is_none(), "nothing outside the prefix");

    // A revision no event of the prefix reaches (a write elsewhere) still
    // completes, by a snapshot.
    let elsewhere = ok(
        "write elsewhere",
        kv.put(&key("mfx/b"), "e".into(), PutOptions::default())
            .await,
    );
    let waited = tokio::time::timeout(EVENT_WAIT, m.wait_for(elsewhere.get())).await;
    assert!(
        matches!(waited, Ok(Ok(()))),
        "wait_for a revision outside the prefix: {waited:?}"
    );
    drop(m);
}

async fn next_change(
    changes: &mut futures::stream::BoxStream<'static, anykv_core::Result<Event>>,
) -> Event {
    match tokio::time::timeout(EVENT_WAIT, changes.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("expected a mirror change, got {other:?}"),
    }
}

/// Two writers and a mirror on another handle: once writes stop, the
/// mirror equals the store, and its changes came in revision order.
pub async fn mirror_converges_under_writers(cx: Ctx) {
    let writer_kv = cx.other_handle();
    let Some(m) = mirror_or_unsupported(&cx, "mw").await else {
        return;
    };
    let mut changes = m.changes();
    let mut last = None;
    for round in 0..30u32 {
        let k = key(&format!("mw/k{}", round % 7));
        if round % 5 == 4 {
            ok("delete", writer_kv.delete(&k, Condition::Always).await);
        } else {
            last = Some(ok(
                "put",
                writer_kv
                    .put(&k, Bytes::from(round.to_string()), PutOptions::default())
                    .await,
            ));
        }
    }
    if let Some(v) = last {
        ok("wait_for", m.wait_for(v.get()).await);
    }
    assert_matches_store("mirror equals the store after writers", &cx.kv, &m, "mw").await;
    // The changes seen so far are in revision order and name only keys of
    // the prefix.
    let mut prev = 0;
    while let Ok(Some(item)) =
        tokio::time::timeout(Duration::from_millis(300), changes.next()).await
    {
        let ev = ok("mirror change", item);
        assert!(ev.key().as_str().starts_with("mw/"), "{ev:?}");
        assert!(
            ev.revision() >= prev,
            "changes out of order: {ev:?} after revision {prev}"
        );
        prev = ev.revision();
    }
}

#[derive(serde::Deserialize, Debug, PartialEq)]
struct Limits {
    max: u32,
}

pub async fn typed_mirror_reports_undecodable_values(cx: Ctx) {
    let kv = &cx.kv;
    ok(
        "good",
        kv.put_json("mt/a", &serde_json::json!({ "max": 1 })).await,
    );
    ok(
        "bad",
        kv.put(&key("mt/bad"), "not json".into(), PutOptions::default())
            .await,
    );
    let got = kv.mirror_json::<Limits>(&prefix("mt")).await;
    if cx.caps().snapshot.is_none() {
        err_kind(
            "typed mirror without snapshots",
            got,
            ErrorKind::Unsupported,
        );
        return;
    }
    let m = ok("typed mirror", got);
    assert_eq!(ok("get a", m.get(&key("mt/a"))), Some(Limits { max: 1 }));
    err_kind("get bad", m.get(&key("mt/bad")), ErrorKind::Codec);
    assert_eq!(ok("get absent", m.get(&key("mt/none"))), None);
    let listed = m.list(&anykv_core::Prefix::root());
    assert_eq!(listed.len(), 2);
    assert!(listed[0].1.is_ok() && listed[1].1.is_err(), "{listed:?}");

    let mut changes = m.changes();
    ok(
        "bad again",
        kv.put(&key("mt/bad"), "{".into(), PutOptions::default())
            .await,
    );
    let v = ok(
        "good b",
        kv.put_json("mt/b", &serde_json::json!({ "max": 2 })).await,
    );
    ok("wait_for", m.wait_for(v.get()).await);
    let first = tokio::time::timeout(EVENT_WAIT, changes.next()).await;
    match first {
        Ok(Some(Err(e))) => assert_eq!(e.kind(), ErrorKind::Codec, "{e}"),
        other => panic!("an undecodable value is an error item: {other:?}"),
    }
    match tokio::time::timeout(EVENT_WAIT, changes.next()).await {
        Ok(Some(Ok(JsonChange::Put { key: k, value, .. }))) => {
            assert_eq!(
                (k.as_str(), value),
                ("mt/b", Limits { max: 2 }),
                "the stream goes on"
            );
        }
        other => panic!("the next key's update is delivered: {other:?}"),
    }
    assert_eq!(ok("get b", m.get(&key("mt/b"))), Some(Limits { max: 2 }));
}

//! In-process sessions: expiry when renewal stops, TTL clamp.

use std::time::Duration;

use anykv_core::{Condition, Event, Key, Prefix, SessionOptions, Start, Store, Target};
use anykv_memory::MemoryStore;
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).expect("key")
}

#[tokio::test]
async fn session_expires_when_its_renewal_stops() {
    let store = MemoryStore::new(1000);
    let ttl = Duration::from_millis(600);
    let s = store
        .session(SessionOptions::with_ttl(ttl))
        .await
        .expect("session");
    assert_eq!(s.ttl(), ttl);
    s.put(&key("svc/a"), "1".into(), Condition::Always)
        .await
        .expect("put a");
    s.put(&key("svc/b"), "2".into(), Condition::IfAbsent)
        .await
        .expect("put b");
    let mut w = store
        .watch(
            Target::Prefix(Prefix::new("svc").expect("prefix")),
            Start::Now,
        )
        .await
        .expect("watch");
    // Renewed while it runs: alive well past its TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(!s.is_lost());
    assert!(store.get(&key("svc/a")).await.expect("get").is_some());

    store.pause_session_renewals(true);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(ttl * 3, s.lost())
        .await
        .expect("lost() once the session expired");
    let waited = started.elapsed();
    assert!(
        waited >= ttl / 2,
        "lost only after the TTL ran out: {waited:?}"
    );
    let mut deleted = Vec::new();
    let mut revs = Vec::new();
    while deleted.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(2), w.next()).await {
            Ok(Some(Ok(Event::Delete { key, revision }))) => {
                deleted.push(key.to_string());
                revs.push(revision);
            }
            other => panic!("expected delete events, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["svc/a", "svc/b"]);
    assert_eq!(revs[0], revs[1], "one revision for the whole session");
    assert!(
        store
            .list(&Prefix::new("svc").expect("prefix"))
            .await
            .expect("list")
            .is_empty()
    );
    let err = s
        .put(&key("svc/c"), "3".into(), Condition::Always)
        .await
        .expect_err("put on an expired session");
    assert_eq!(err.kind(), anykv_core::ErrorKind::LockLost);
}

#[tokio::test]
async fn short_ttl_is_raised_and_overwritten_keys_stay() {
    let store = MemoryStore::new(1000);
    let s = store
        .session(SessionOptions::with_ttl(Duration::from_millis(10)))
        .await
        .expect("session");
    assert_eq!(s.ttl(), Duration::from_millis(500));
    s.put(&key("o/k"), "e".into(), Condition::Always)
        .await
        .expect("put");
    // An ordinary put takes the key over: it no longer ends with the session.
    store
        .put(&key("o/k"), "plain".into(), Default::default())
        .await
        .expect("plain put");
    s.close().await.expect("close");
    let kv = store.get(&key("o/k")).await.expect("get").expect("kept");
    assert_eq!(kv.value, anykv_core::Bytes::from("plain"));
}

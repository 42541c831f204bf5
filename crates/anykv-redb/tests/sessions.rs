//! In-process sessions on a redb file: expiry when renewal stops, and the
//! keys of sessions left in the file (a crashed or closed process) deleted
//! when the file is reopened.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use anykv_core::{
    Condition, ErrorKind, Event, Key, Prefix, PutOptions, SessionOptions, Start, Store, Target,
};
use anykv_redb::{RedbStore, Settings};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn prefix(s: &str) -> Prefix {
    Prefix::new(s).unwrap()
}

/// The next `n` events, all deletes: (keys sorted, their revisions).
async fn deletes(w: &mut anykv_core::WatchStream, n: usize) -> (Vec<String>, Vec<u64>) {
    let (mut keys, mut revs) = (Vec::new(), Vec::new());
    while keys.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(Event::Delete { key, revision }))) => {
                keys.push(key.to_string());
                revs.push(revision);
            }
            other => panic!("expected a delete event, got {other:?}"),
        }
    }
    keys.sort();
    (keys, revs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expires_when_its_renewal_stops() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path().join("expire.redb"), Settings::default())
        .await
        .unwrap();
    let ttl = Duration::from_millis(600);
    let s = store.session(SessionOptions::with_ttl(ttl)).await.unwrap();
    assert_eq!(s.ttl(), ttl);
    let v = s
        .put(&key("svc/a"), "1".into(), Condition::IfAbsent)
        .await
        .unwrap();
    assert_eq!(
        store
            .get(&key("svc/a"))
            .await
            .unwrap()
            .unwrap()
            .mod_revision,
        v.get(),
        "a session put's version is its revision"
    );
    s.put(&key("svc/b"), "2".into(), Condition::Always)
        .await
        .unwrap();
    assert_eq!(
        s.put(&key("svc/a"), "x".into(), Condition::IfAbsent)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::AlreadyExists
    );
    let mut w = store
        .watch(Target::Prefix(prefix("svc")), Start::Now)
        .await
        .unwrap();
    // Renewed while it runs: alive well past its TTL.
    tokio::time::sleep(ttl * 2).await;
    assert!(!s.is_lost());
    assert!(store.get(&key("svc/a")).await.unwrap().is_some());

    store.pause_session_renewals(true);
    let started = tokio::time::Instant::now();
    tokio::time::timeout(ttl * 3, s.lost())
        .await
        .expect("lost() once the session expired");
    assert!(
        started.elapsed() >= ttl / 2,
        "lost only once the TTL ran out"
    );
    let (keys, revs) = deletes(&mut w, 2).await;
    assert_eq!(keys, ["svc/a", "svc/b"]);
    assert_eq!(revs[0], revs[1], "one revision for the whole session");
    assert!(store.list(&prefix("svc")).await.unwrap().is_empty());
    assert_eq!(
        s.put(&key("svc/c"), "3".into(), Condition::Always)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::LockLost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_in_the_file_are_purged_at_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("purge.redb");
    let before;
    {
        let store = RedbStore::open(&path, Settings::default()).await.unwrap();
        let s = store
            .session(SessionOptions::with_ttl(Duration::from_secs(60)))
            .await
            .unwrap();
        s.put(&key("eph/a"), "1".into(), Condition::Always)
            .await
            .unwrap();
        s.put(&key("eph/b"), "2".into(), Condition::Always)
            .await
            .unwrap();
        store
            .put(&key("eph/plain"), "p".into(), PutOptions::default())
            .await
            .unwrap();
        before = store
            .get(&key("eph/plain"))
            .await
            .unwrap()
            .unwrap()
            .mod_revision;
        // A crash: the session is never closed, the store goes away.
        std::mem::forget(s);
        drop(store);
    }
    let store = RedbStore::open(&path, Settings::default()).await.unwrap();
    assert_eq!(store.get(&key("eph/a")).await.unwrap(), None);
    assert_eq!(store.get(&key("eph/b")).await.unwrap(), None);
    assert!(store.get(&key("eph/plain")).await.unwrap().is_some());
    // The purge is in the log: watchers from before it see the deletes.
    let mut w = store
        .watch(Target::Prefix(prefix("eph")), Start::After(before))
        .await
        .unwrap();
    let (keys, revs) = deletes(&mut w, 2).await;
    assert_eq!(keys, ["eph/a", "eph/b"]);
    assert_eq!(revs[0], revs[1]);
    // A new session after the purge works as usual.
    let s = store.session(SessionOptions::default()).await.unwrap();
    s.put(&key("eph/a"), "again".into(), Condition::IfAbsent)
        .await
        .unwrap();
    s.close().await.unwrap();
    assert_eq!(store.get(&key("eph/a")).await.unwrap(), None);
}

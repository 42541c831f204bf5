//! Consul-specific behaviour the shared suite cannot see: shared blocking
//! loops, the plain-PUT path of very large values, TTL sessions, lock
//! sessions lost from outside, and the URL options.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{sync::Arc, time::Duration};

use anykv_consul::{ConsulStore, MAX_VALUE_SIZE};
use anykv_core::{
    Condition, Config, ErrorKind, Event, Key, LockOptions, Prefix, PutOptions, Start, Store, Target,
};
use bytes::Bytes;
use futures::StreamExt;
use reqwest::Method;
use tokio::time::timeout;

fn bare(url: &str) -> Arc<ConsulStore> {
    ConsulStore::connect(&Config::parse(url).expect("url")).expect("connect")
}

async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_prefix_share_one_loop_that_ends_with_them() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let store = bare(&url);
    let ns = common::unique("coalesce");
    let p = Prefix::new(format!("{ns}/p")).unwrap();
    let mut a = store
        .watch(Target::Prefix(p.clone()), Start::Now)
        .await
        .unwrap();
    let mut b = store
        .watch(Target::Prefix(p.clone()), Start::Now)
        .await
        .unwrap();
    assert_eq!(
        store.watch_loops(),
        1,
        "two watchers of one prefix, one loop"
    );
    let other = store
        .watch(
            Target::Key(Key::new(format!("{ns}/p")).unwrap()),
            Start::Now,
        )
        .await
        .unwrap();
    assert_eq!(store.watch_loops(), 2, "a key is not the prefix below it");

    let k = Key::new(format!("{ns}/p/x")).unwrap();
    let v = store
        .put(&k, "1".into(), PutOptions::default())
        .await
        .unwrap();
    for w in [&mut a, &mut b] {
        match timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(Ok(Event::Put { kv, .. }))) => {
                assert_eq!((kv.key.clone(), kv.version), (k.clone(), v));
            }
            other => panic!("expected the put on both streams, got {other:?}"),
        }
    }
    drop(a);
    assert_eq!(store.watch_loops(), 2, "one stream left on the prefix");
    drop((b, other));
    // Dropping the last stream ends the loop and its in-flight query.
    eventually(
        "loops end after the streams are dropped",
        Duration::from_secs(5),
        || async { store.watch_loops() == 0 },
    )
    .await;
    store
        .delete_prefix(&Prefix::new(ns).unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_watcher_on_a_running_loop_replays_nothing_old() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let store = bare(&url);
    let ns = common::unique("late");
    let p = Prefix::new(ns.clone()).unwrap();
    let _first = store
        .watch(Target::Prefix(p.clone()), Start::Now)
        .await
        .unwrap();
    let old = Key::new(format!("{ns}/old")).unwrap();
    store
        .put(&old, "o".into(), PutOptions::default())
        .await
        .unwrap();
    let mut late = store
        .watch(Target::Prefix(p.clone()), Start::Now)
        .await
        .unwrap();
    let new = Key::new(format!("{ns}/new")).unwrap();
    store
        .put(&new, "n".into(), PutOptions::default())
        .await
        .unwrap();
    let ev = timeout(Duration::from_secs(15), late.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.key(), &new, "the write before the watch is not replayed");
    store.delete_prefix(&p).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_too_big_for_a_transaction_take_the_plain_put_path() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("large");
    let kv = common::open(&url, &ns, "").await;
    let k = Key::new("big").unwrap();
    let big = Bytes::from(vec![7u8; MAX_VALUE_SIZE]);
    let v1 = kv
        .put(&k, big.clone(), PutOptions::default())
        .await
        .expect("put 512 KiB");
    let got = kv.get(&k).await.unwrap().expect("present");
    assert_eq!((got.value.len(), got.version), (MAX_VALUE_SIZE, v1));

    let e = kv
        .put(&k, big.clone(), PutOptions::if_absent())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let v2 = kv
        .put(&k, big.clone(), PutOptions::if_version(v1))
        .await
        .expect("CAS");
    assert_ne!(
        v2, v1,
        "an identical large rewrite still changes the version"
    );
    let e = kv
        .put(&k, big.clone(), PutOptions::if_version(v1))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);

    // With a TTL the key is held by a session; a put without TTL frees it.
    kv.put(
        &k,
        big.clone(),
        PutOptions::default().with_ttl(Duration::from_secs(60)),
    )
    .await
    .expect("put with ttl");
    let raw = common::raw_entry(&url, &format!("{ns}/big"), None)
        .await
        .unwrap();
    assert!(
        raw["Session"].as_str().is_some_and(|s| !s.is_empty()),
        "{raw}"
    );
    kv.put(&k, big.clone(), PutOptions::default())
        .await
        .expect("put without ttl");
    let raw = common::raw_entry(&url, &format!("{ns}/big"), None)
        .await
        .unwrap();
    assert!(
        raw.get("Session").is_none_or(|s| s.is_null() || s == ""),
        "{raw}"
    );

    let e = kv
        .put(
            &k,
            Bytes::from(vec![0u8; MAX_VALUE_SIZE + 1]),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    assert!(kv.delete(&k, Condition::Always).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_sessions_are_replaced_and_cleaned_up() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("ttl-sessions");
    let kv = common::open(&url, &ns, "").await;
    let k = Key::new("t").unwrap();
    let path = format!("{ns}/t");
    let session_of = |url: String, path: String| async move {
        common::raw_entry(&url, &path, None)
            .await
            .and_then(|e| e["Session"].as_str().map(str::to_owned))
    };
    let ttl = PutOptions::default().with_ttl(Duration::from_secs(40));
    kv.put(&k, "1".into(), ttl).await.unwrap();
    let s1 = session_of(url.clone(), path.clone())
        .await
        .expect("held by a session");
    let (_, info) =
        common::http(Method::GET, &url, &format!("session/info/{s1}"), None, None).await;
    assert!(
        info.contains("\"TTL\": \"20s\""),
        "a 40 s TTL is a 20 s session (2 × TTL): {info}"
    );
    assert!(info.contains("\"Behavior\": \"delete\""), "{info}");

    kv.put(&k, "2".into(), ttl).await.unwrap();
    let s2 = session_of(url.clone(), path.clone())
        .await
        .expect("held by a session");
    assert_ne!(s1, s2, "a new TTL moves the key to a new session");
    let gone = |id: String| {
        let url = url.clone();
        async move {
            let (status, body) =
                common::http(Method::GET, &url, &format!("session/info/{id}"), None, None).await;
            status == 404 || body.trim() == "null" || body.trim() == "[]"
        }
    };
    eventually(
        "the replaced session is destroyed",
        Duration::from_secs(5),
        || gone(s1.clone()),
    )
    .await;
    assert_eq!(&kv.get(&k).await.unwrap().unwrap().value[..], b"2");

    assert!(kv.delete(&k, Condition::Always).await.unwrap());
    eventually(
        "the deleted key's session is destroyed",
        Duration::from_secs(5),
        || gone(s2.clone()),
    )
    .await;

    let deep = Key::new("dir/t").unwrap();
    kv.put(&deep, "3".into(), ttl).await.unwrap();
    let s3 = session_of(url.clone(), format!("{ns}/dir/t"))
        .await
        .expect("held by a session");
    assert_eq!(
        kv.delete_prefix(&Prefix::new("dir").unwrap())
            .await
            .unwrap(),
        1
    );
    eventually(
        "delete_prefix destroys the sessions of the keys it deleted",
        Duration::from_secs(5),
        || gone(s3.clone()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_whose_session_is_destroyed_is_lost() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("lock-lost");
    let kv = common::open(&url, &ns, "").await;
    let k = Key::new("job").unwrap();
    let opts = LockOptions {
        owner: Some("worker-1".into()),
        ..LockOptions::default()
    };
    let g = kv.lock(&k, opts.clone()).await.expect("lock");
    let record = format!("__anykv/locks/{ns}/job");
    let raw = common::raw_entry(&url, &record, None)
        .await
        .expect("lock record");
    assert_eq!(
        raw["ModifyIndex"].as_u64(),
        Some(g.fencing_token()),
        "token = ModifyIndex at acquire"
    );
    let session = raw["Session"].as_str().expect("held").to_owned();
    let holder = kv.lock_holder(&k).await.unwrap().expect("holder");
    assert_eq!(holder.owner.as_deref(), Some("worker-1"));

    // Someone (an operator, a partition) invalidates the session.
    let (status, body) = common::http(
        Method::PUT,
        &url,
        &format!("session/destroy/{session}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    timeout(Duration::from_secs(10), g.lost())
        .await
        .expect("lost() fires when the session is invalidated");
    assert!(g.is_lost());
    assert_eq!(
        kv.lock_holder(&k).await.unwrap(),
        None,
        "Behavior=delete removed the record"
    );
    let g2 = kv
        .try_lock(&k, opts)
        .await
        .unwrap()
        .expect("free again (lock-delay 0 by default)");
    assert!(g2.fencing_token() > g.fencing_token());
    g.release().await.expect("releasing a lost lock is a no-op");
    assert!(
        kv.lock_holder(&k).await.unwrap().is_some(),
        "the old guard did not free the new holder"
    );
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_wakes_on_release_not_on_a_poll() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("lock-wait");
    let kv = common::open(&url, &ns, "").await;
    let k = Key::new("l").unwrap();
    let g = kv.lock(&k, LockOptions::default()).await.unwrap();
    let waiter = {
        let (kv, k) = (kv.clone(), k.clone());
        tokio::spawn(async move {
            kv.lock(
                &k,
                LockOptions {
                    wait: Some(Duration::from_secs(60)),
                    ..LockOptions::default()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );
    let released = tokio::time::Instant::now();
    g.release().await.unwrap();
    let g2 = timeout(Duration::from_secs(8), waiter)
        .await
        .expect("the waiter is woken by the release (blocking query), well before a poll")
        .unwrap()
        .unwrap();
    eprintln!(
        "waiter took the lock {:?} after the release",
        released.elapsed()
    );
    g2.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_options() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("opts");
    // The -dev agent's datacenter is dc1.
    let kv = common::open(&url, &ns, "consistency=consistent&dc=dc1&lock_delay=1s").await;
    let k = Key::new("a").unwrap();
    kv.put(&k, "1".into(), PutOptions::default()).await.unwrap();
    // Every read mode answers (the weaker ones may lag, not here: one agent).
    for mode in ["consistent", "default", "stale"] {
        let kv = common::open(&url, &ns, &format!("consistency={mode}")).await;
        assert!(kv.get(&k).await.unwrap().is_some(), "{mode}");
        assert_eq!(kv.list(&Prefix::root()).await.unwrap().len(), 1, "{mode}");
        assert_eq!(kv.keys(&Prefix::root()).await.unwrap(), ["a"], "{mode}");
        assert_eq!(kv.lock_holder(&k).await.unwrap(), None, "{mode}");
    }
    let g = kv
        .try_lock(&k, LockOptions::default())
        .await
        .unwrap()
        .expect("lock");
    g.release().await.unwrap();
    kv.delete_prefix(&Prefix::root()).await.unwrap();

    let elsewhere = common::open(&url, &ns, "dc=nowhere&retries=0").await;
    assert!(
        elsewhere.get(&k).await.is_err(),
        "an unknown datacenter is an error"
    );

    for bad in ["consistency=linearizable", "tls=1", "lock_delay=soon"] {
        let e = anykv_core::open(&common::with_query(&url, bad))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUrl, "{bad}: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_do_not_panic() {
    // No agent needed: a refused port answers at once.
    let url = format!(
        "consul://127.0.0.1:{}/x?timeout=1000000000years",
        common::closed_port()
    );
    let store = bare(&url);
    let k = Key::new("k").unwrap();
    let e = store.get(&k).await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    let forever = LockOptions {
        wait: Some(Duration::MAX),
        ..LockOptions::default()
    };
    let e = store.lock(&k, forever).await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    let e = store
        .watch(Target::Key(k.clone()), Start::Now)
        .await
        .err()
        .expect("no agent");
    assert!(e.indicates_unreachable(), "{e}");
    let e = store
        .put(
            &k,
            "v".into(),
            PutOptions::default().with_ttl(Duration::MAX),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

/// Several agents in the URL: a dead one (refused) and a hung one (accepts,
/// never answers) before the live one cost a failed attempt each, then
/// every operation — reads, writes, watches, locks — goes to the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_hung_agents_are_skipped() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let live = common::addr(&url);
    let hung = anykv_testkit::server::silent_port().await;
    let dead = common::closed_port();
    let agents = format!("consul://127.0.0.1:{dead},127.0.0.1:{hung},{live}");
    let ns = common::unique("failover");
    let kv = common::open(&agents, &ns, "timeout=1s&retries=2").await;
    let k = Key::new("a").unwrap();
    let t = tokio::time::Instant::now();
    // A write whose first attempt is refused was never sent: retried on
    // the next agent; the hung one times out once, then the live one answers.
    let mut v = None;
    for _ in 0..3 {
        match kv.put(&k, "1".into(), PutOptions::default()).await {
            Ok(version) => {
                v = Some(version);
                break;
            }
            Err(e) => assert!(e.indicates_unreachable(), "{e}"),
        }
    }
    let v = v.expect("a write reaches the live agent");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let t = tokio::time::Instant::now();
    assert_eq!(kv.get(&k).await.unwrap().unwrap().version, v);
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    let v2 = kv.put(&k, "2".into(), PutOptions::default()).await.unwrap();
    match timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(Event::Put { kv, .. }))) => assert_eq!(kv.version, v2),
        other => panic!("expected the put, got {other:?}"),
    }
    let g = kv
        .try_lock(&k, LockOptions::default())
        .await
        .unwrap()
        .expect("lock");
    g.release().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "no more failed attempts once on the live agent: {:?}",
        t.elapsed()
    );
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

//! Driver-specific behaviour on a real ZooKeeper: the znode encoding seen by
//! other clients, foreign znodes, TTL znodes, ACLs, URL options, and session
//! expiry (locks lost, watches and operations recovering).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use anykv_core::{
    Bytes, Condition, ErrorKind, Event, Key, LockOptions, Prefix, PutOptions, Start, Store, Target,
};
use futures::StreamExt;
use zookeeper_client::{Acls, CreateMode};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn next_event(w: &mut anykv_core::WatchStream) -> Event {
    match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        Ok(Some(Ok(e))) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_raw_znode_data_and_parents_hold_a_marker() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("encoding");
    let kv = common::open(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    kv.put(&key("a/b/c"), "plain".into(), PutOptions::default())
        .await
        .unwrap();
    kv.put(&key("empty"), Bytes::new(), PutOptions::default())
        .await
        .unwrap();
    let tricky = Bytes::from_static(b"\0anykv\0d");
    kv.put(&key("tricky"), tricky.clone(), PutOptions::default())
        .await
        .unwrap();

    let (data, stat) = raw.get_data(&format!("/{ns}/a/b/c")).await.unwrap();
    assert_eq!(data, b"plain", "values are stored byte for byte");
    let v = kv.get(&key("a/b/c")).await.unwrap().unwrap();
    assert_eq!(v.version.get(), stat.mzxid as u64, "version is the mzxid");
    assert_eq!(v.create_revision, stat.czxid as u64);
    let (parent, _) = raw.get_data(&format!("/{ns}/a/b")).await.unwrap();
    assert_eq!(parent, b"\0anykv\0d", "an implicit parent holds the marker");
    assert_eq!(raw.get_data(&format!("/{ns}/empty")).await.unwrap().0, b"");
    assert_eq!(
        raw.get_data(&format!("/{ns}/tricky")).await.unwrap().0,
        b"\0anykv\0v\0anykv\0d",
        "a value that looks like the marker is escaped"
    );
    assert_eq!(kv.get(&key("tricky")).await.unwrap().unwrap().value, tricky);
    assert_eq!(kv.get(&key("a/b")).await.unwrap(), None);

    // Deleting the only key removes the markers that were there for it.
    assert!(kv.delete(&key("a/b/c"), Condition::Always).await.unwrap());
    assert_eq!(
        raw.check_stat(&format!("/{ns}/a")).await.unwrap(),
        None,
        "empty implicit parents are removed"
    );
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn znodes_written_by_other_clients_are_keys() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("foreign");
    let kv = common::open(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    let opts = CreateMode::Persistent.with_acls(Acls::anyone_all());
    raw.mkdir(&format!("/{ns}/dir"), &opts).await.unwrap();
    raw.create(&format!("/{ns}/dir/x"), b"from-raw", &opts)
        .await
        .unwrap();
    // Parents made by another client are empty znodes: keys with an empty value.
    assert_eq!(
        kv.get(&key("dir")).await.unwrap().unwrap().value,
        Bytes::new()
    );
    let listed = common::key_names(&kv, &Prefix::root()).await;
    assert_eq!(listed, ["dir", "dir/x"]);
    // anykv's writes are visible to the raw client and the other way round.
    kv.put(&key("dir/x"), "from-anykv".into(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        raw.get_data(&format!("/{ns}/dir/x")).await.unwrap().0,
        b"from-anykv"
    );
    // The root's delete_prefix deletes the top-level key `dir` too.
    assert_eq!(kv.delete_prefix(&Prefix::root()).await.unwrap(), 2);
    assert!(kv.list(&Prefix::root()).await.unwrap().is_empty());
    // The namespace znode itself was made by the raw client: an empty key of
    // the parent namespace; remove it.
    raw.delete(&format!("/{ns}"), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_keys_are_ttl_znodes_hidden_once_expired() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("ttl");
    let kv = common::open(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    let k = key("t");
    kv.put(
        &k,
        "v".into(),
        PutOptions::default().with_ttl(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let (data, _) = raw.get_data(&format!("/{ns}/t")).await.unwrap();
    assert!(data.starts_with(b"\0anykv\0t"), "TTL header: {data:?}");
    assert!(data.ends_with(b"v"));
    // Other clients cannot rewrite a TTL znode by accident (no WRITE).
    assert_eq!(
        raw.set_data(&format!("/{ns}/t"), b"x", None)
            .await
            .unwrap_err(),
        zookeeper_client::Error::NoAuth
    );
    // A conditional put keeps the TTL; an unconditional one drops it.
    let v = kv.get(&k).await.unwrap().unwrap().version;
    kv.put(
        &k,
        "w".into(),
        PutOptions::if_version(v).with_ttl(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(
        kv.get(&k).await.unwrap(),
        None,
        "hidden once the TTL is over"
    );
    assert!(!kv.exists(&k).await.unwrap());
    assert!(kv.list(&Prefix::root()).await.unwrap().is_empty());
    // The server removes it at its next container check.
    let mut gone = false;
    for _ in 0..50 {
        if raw.check_stat(&format!("/{ns}/t")).await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the server removed the expired TTL znode");
    // Create-only over an expired-but-present TTL key succeeds.
    kv.put(
        &k,
        "1".into(),
        PutOptions::default().with_ttl(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kv.put(&k, "2".into(), PutOptions::if_absent())
        .await
        .unwrap();
    assert_eq!(&kv.get(&k).await.unwrap().unwrap().value[..], b"2");
    // A TTL on a key that has children is refused, not ignored.
    kv.put(&key("p/child"), "c".into(), PutOptions::default())
        .await
        .unwrap();
    let e = kv
        .put(
            &key("p"),
            "x".into(),
            PutOptions::default().with_ttl(Duration::from_secs(5)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // Deleting a TTL key that has children keeps the children.
    kv.put(
        &key("q"),
        "q".into(),
        PutOptions::default().with_ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    kv.put(&key("q/child"), "c".into(), PutOptions::default())
        .await
        .unwrap();
    assert!(kv.delete(&key("q"), Condition::Always).await.unwrap());
    assert_eq!(kv.get(&key("q")).await.unwrap(), None);
    assert!(kv.exists(&key("q/child")).await.unwrap());
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_acl_denies_other_clients_and_never_shows_the_password() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    // A top-level namespace: the implicit parents an authenticated store
    // creates are its user's only, and must not be shared with other tests.
    let ns = common::unique("acl").replace('/', "-");
    let authed_base = url.replacen("zk://", "zk://alice:s3cr3t-pw@", 1);
    let alice = common::open(&authed_base, &ns, "").await;
    alice
        .put(&key("private"), "mine".into(), PutOptions::default())
        .await
        .unwrap();
    assert!(!format!("{alice:?}").contains("s3cr3t-pw"));
    let anonymous = common::open(&url, &ns, "").await;
    let e = anonymous.get(&key("private")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.indicates_unreachable());
    assert!(
        anonymous.liveness().is_alive(),
        "a refusal proves the server answered"
    );
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("s3cr3t-pw"), "{shown}");
    // The same credentials in another store read it.
    let again = common::open(&authed_base, &ns, "").await;
    assert_eq!(
        &again.get(&key("private")).await.unwrap().unwrap().value[..],
        b"mine"
    );
    alice.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_options_are_checked() {
    for (url, what) in [
        ("zk://127.0.0.1:1/x?sesion_timeout=1s", "sesion_timeout"),
        ("zk://127.0.0.1:1/x?session_timeout=soon", "session_timeout"),
        ("zk://127.0.0.1:1/x?session_timeout=0s", "session_timeout"),
        (
            "zk://127.0.0.1:1/x?ttl_check_interval=0s",
            "ttl_check_interval",
        ),
        ("zk://bob@127.0.0.1:1/x", "user:password"),
        ("zk:///x", "no ZooKeeper server"),
        ("zk://127.0.0.1:1/x?tls=true", "tls"),
        ("zk://127.0.0.1:1/x?consistency=strong", "consistency"),
    ] {
        let e = anykv_core::open(url).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidUrl, "{url}: {e}");
        assert!(e.to_string().contains(what), "{url}: {e}");
    }
    let kv = anykv_core::open("zookeeper://127.0.0.1:1/x?ttl_check_interval=2s&session_timeout=5s")
        .await
        .unwrap();
    assert_eq!(kv.capabilities().ttl, Some(Duration::from_secs(3)));
    let e = anykv_core::open("zk://u:hunter22@127.0.0.1:1/x?nope=1")
        .await
        .unwrap_err();
    assert!(!e.to_string().contains("hunter22"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_sync_first_also_on_missing_paths() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("linearizable");
    let kv = common::open(&url, &ns, "consistency=linearizable").await;
    // `sync` on a path that does not exist is fine: reads of nothing.
    assert!(kv.get(&key("none/here")).await.unwrap().is_none());
    assert!(!kv.exists(&key("none")).await.unwrap());
    assert!(
        kv.list(&Prefix::new("none").unwrap())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(kv.lock_holder(&key("no-lock")).await.unwrap().is_none());
    let v = kv
        .put(&key("a/b"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    let got = kv.get(&key("a/b")).await.unwrap().unwrap();
    assert_eq!((&got.value[..], got.version), (&b"1"[..], v));
    assert_eq!(common::key_names(&kv, &Prefix::root()).await, ["a/b"]);
    let held = kv.try_lock(&key("l"), Default::default()).await.unwrap();
    let info = kv.lock_holder(&key("l")).await.unwrap().unwrap();
    assert!(info.fencing_token > 0);
    held.unwrap().release().await.unwrap();
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_loses_locks_and_everything_recovers() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("expiry");
    let (store, kv) = common::open_driver(&url, &ns, "session_timeout=4s").await;
    let other = common::open(&url, &ns, "").await;
    let lock = key("the-lock");
    let guard = kv.lock(&lock, LockOptions::default()).await.unwrap();
    let token = guard.fencing_token();
    let mut w = kv
        .watch(Target::Prefix(Prefix::new("w").unwrap()), Start::Now)
        .await
        .unwrap();
    kv.put(&key("w/a"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(next_event(&mut w).await.key().as_str(), "w/a");

    common::expire_session(&store, &url).await;
    tokio::time::timeout(Duration::from_secs(15), guard.lost())
        .await
        .expect("lost() fires when the session expires");
    assert!(guard.is_lost());

    // Another store takes the lock: the ephemeral znode went with the session.
    let g2 = other
        .lock(
            &lock,
            LockOptions {
                wait: Some(Duration::from_secs(15)),
                ..LockOptions::default()
            },
        )
        .await
        .unwrap();
    assert!(g2.fencing_token() > token);
    g2.release().await.unwrap();

    // Writes made meanwhile reach the watch, which set itself up again.
    other
        .put(&key("w/b"), "2".into(), PutOptions::default())
        .await
        .unwrap();
    let e = next_event(&mut w).await;
    assert_eq!(e.key().as_str(), "w/b", "{e:?}");
    // The store opened a new session by itself.
    let mut ok = false;
    for _ in 0..20 {
        if kv.get(&key("w/a")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "operations work again after the session expired");
    kv.put(&key("w/c"), "3".into(), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(next_event(&mut w).await.key().as_str(), "w/c");
    drop(guard);
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_removes_the_server_watch() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("watches");
    let endpoint = common::endpoints(&url).remove(0);
    let kv = common::open(&url, &ns, "").await;
    let path = format!("/{ns}/dropme");
    let watching = |out: &str| out.contains(&path);
    let w = kv
        .watch(Target::Prefix(Prefix::new("dropme").unwrap()), Start::Now)
        .await
        .unwrap();
    assert!(
        watching(&common::four_letter(&endpoint, "wchp").await),
        "watch registered"
    );
    drop(w);
    let mut removed = false;
    for _ in 0..50 {
        if !watching(&common::four_letter(&endpoint, "wchp").await) {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(removed, "dropping the stream removed the server-side watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_values_and_request_limits() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("sizes");
    let kv = common::open(&url, &ns, "").await;
    let max = kv.capabilities().max_value_size;
    let big = Bytes::from(vec![b'x'; max]);
    kv.put(&key("big"), big.clone(), PutOptions::default())
        .await
        .unwrap();
    kv.put(
        &key("big-ttl"),
        big.clone(),
        PutOptions::default().with_ttl(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    assert_eq!(kv.get(&key("big")).await.unwrap().unwrap().value.len(), max);
    let listed = kv.list(&Prefix::root()).await.unwrap();
    assert_eq!(listed.len(), 2);
    // Two maximal values do not fit one ZooKeeper request: refused up front,
    // without touching the connection.
    let e = kv
        .atomic(
            vec![],
            vec![
                anykv_core::Op::Put(key("a1"), big.clone()),
                anykv_core::Op::Put(key("a2"), big),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(kv.liveness().is_alive());
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_under_concurrent_writers_is_ordered_and_converges() {
    use std::collections::BTreeMap;
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("churn");
    let kv = common::open(&url, &ns, "").await;
    let mut w = kv
        .watch(Target::Prefix(Prefix::new("c").unwrap()), Start::Now)
        .await
        .unwrap();
    let mut writers = Vec::new();
    for t in 0..4u32 {
        let kv = kv.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..60u32 {
                let k = key(&format!("c/k{}", (t * 7 + i) % 12));
                if i % 5 == 4 {
                    kv.delete(&k, Condition::Always).await.unwrap();
                } else {
                    kv.put(&k, Bytes::from(format!("{t}-{i}")), PutOptions::default())
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for wr in writers {
        wr.await.unwrap();
    }
    kv.put(&key("c/zz-done"), "end".into(), PutOptions::default())
        .await
        .unwrap();
    let mut view: BTreeMap<String, (Bytes, u64)> = BTreeMap::new();
    let mut last = 0;
    loop {
        let e = next_event(&mut w).await;
        assert!(
            e.revision() >= last,
            "event {e:?} goes back from revision {last}"
        );
        last = e.revision();
        match e {
            Event::Put { kv: p, .. } => {
                let done = p.key.as_str() == "c/zz-done";
                view.insert(p.key.to_string(), (p.value, p.mod_revision));
                if done {
                    break;
                }
            }
            Event::Delete { key, .. } => {
                assert!(
                    view.remove(key.as_str()).is_some(),
                    "delete of {key}, never put"
                );
            }
        }
    }
    let now: BTreeMap<String, (Bytes, u64)> = kv
        .list(&Prefix::new("c").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key.to_string(), (p.value, p.mod_revision)))
        .collect();
    assert_eq!(view, now, "the watch's view converges to the store");
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_znodes_follow_the_recipe_and_deleting_the_holder_loses_the_lock() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("lockrecipe");
    let kv = common::open(&url, &ns, "").await;
    let other = common::open(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    let opts = LockOptions {
        owner: Some("first".into()),
        ..LockOptions::default()
    };
    let guard = kv.lock(&key("job"), opts).await.unwrap();
    let dir = format!("/__anykv/locks/{ns}/job");
    let children = raw.list_children(&dir).await.unwrap();
    assert_eq!(children.len(), 1, "{children:?}");
    let name = &children[0];
    assert!(
        name.starts_with("lock-") && name.len() == 5 + 32 + 1 + 10,
        "{name}"
    );
    let (data, stat) = raw.get_data(&format!("{dir}/{name}")).await.unwrap();
    assert_eq!(data, b"first", "the owner is the znode's data");
    assert_ne!(stat.ephemeral_owner, 0, "an ephemeral znode");
    assert_eq!(
        guard.fencing_token(),
        stat.czxid as u64,
        "the token is the czxid"
    );
    // A waiter queues behind the holder.
    let waiter = tokio::spawn(async move {
        other
            .lock(
                &key("job"),
                LockOptions {
                    wait: Some(Duration::from_secs(20)),
                    ..LockOptions::default()
                },
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(raw.list_children(&dir).await.unwrap().len(), 2);
    // Someone deletes the holder's znode: the holder learns it lost the
    // lock, the waiter gets it.
    raw.delete(&format!("{dir}/{name}"), None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost() fires when the holder znode is deleted");
    let g2 = waiter.await.unwrap().unwrap();
    assert!(g2.fencing_token() > guard.fencing_token());
    g2.release().await.unwrap();
    drop(guard);
    // Released and empty: the lock directory is gone again.
    let mut gone = false;
    for _ in 0..20 {
        if raw.check_stat(&dir).await.unwrap().is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "an unused lock directory is removed");
}

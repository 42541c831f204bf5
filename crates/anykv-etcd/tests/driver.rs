//! etcd-specific behaviour beyond the conformance suite: how versions,
//! ranges, leases and lock records map onto etcd, checked with a raw
//! etcd-client next to the driver.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use anykv_core::{
    Condition, Error, ErrorKind, Event, Key, LockOptions, Prefix, PutOptions, SessionOptions,
    Start, Store, Target, Version,
};
use anykv_etcd as _;
use anykv_testkit::proxy::{Mode, Proxy};
use etcd_client::{GetOptions, PutOptions as RawPut};
use futures::StreamExt;
use tokio::time::{Instant, timeout};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn setup(name: &str) -> Option<(String, anykv_core::Kv, etcd_client::Client)> {
    let url = common::url("ANYKV_TEST_ETCD")?;
    let ns = common::unique(name);
    let kv = common::open(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    Some((ns, kv, raw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_is_mod_revision_and_never_reused_after_recreate() {
    let Some((ns, kv, mut raw)) = setup("version").await else {
        return;
    };
    let k = key("k");
    let v1 = kv.put(&k, "a".into(), PutOptions::default()).await.unwrap();
    let raw_kv = raw.get(format!("{ns}/k"), None).await.unwrap();
    assert_eq!(v1.get(), raw_kv.kvs()[0].mod_revision() as u64);
    kv.delete(&k, Condition::Always).await.unwrap();
    let v2 = kv.put(&k, "a".into(), PutOptions::default()).await.unwrap();
    // etcd's own per-key version is back to 1: anykv's must not repeat.
    let raw_kv = raw.get(format!("{ns}/k"), None).await.unwrap();
    assert_eq!(raw_kv.kvs()[0].version(), 1);
    assert_ne!(v1, v2);
    let e = kv
        .put(&k, "b".into(), PutOptions::if_version(v1))
        .await
        .unwrap_err();
    match e {
        Error::Conflict {
            expected, actual, ..
        } => {
            assert_eq!(expected, Some(v1));
            assert_eq!(actual, Some(v2), "the conflict reports the current version");
        }
        e => panic!("{e}"),
    }
    let pair = kv.get(&k).await.unwrap().unwrap();
    assert_eq!(pair.create_revision, pair.mod_revision);
    assert_eq!(pair.version, v2);
    // Version 0 never matches, absent or not.
    let e = kv
        .put(
            &key("absent"),
            "x".into(),
            PutOptions::if_version(Version::new(0)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_spans_many_pages_in_order_and_keys_dedups() {
    let Some((ns, kv, mut raw)) = setup("pages").await else {
        return;
    };
    // 600 keys: three pages of 256. Written raw in one transaction-free burst.
    for i in 0..600 {
        raw.put(format!("{ns}/d/{i:04}/leaf"), format!("{i}"), None)
            .await
            .unwrap();
    }
    raw.put(format!("{ns}/d0"), "sibling sorting after d/", None)
        .await
        .unwrap();
    let listed = kv.list(&Prefix::new("d").unwrap()).await.unwrap();
    assert_eq!(listed.len(), 600);
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(listed[599].key.as_str(), "d/0599/leaf");
    let names = kv.keys(&Prefix::new("d").unwrap()).await.unwrap();
    assert_eq!(names.len(), 600);
    assert_eq!(names[0], "0000");
    assert_eq!(kv.keys(&Prefix::root()).await.unwrap(), ["d", "d0"]);
    assert_eq!(
        kv.delete_prefix(&Prefix::new("d").unwrap()).await.unwrap(),
        600
    );
    assert!(
        kv.get(&key("d0")).await.unwrap().is_some(),
        "d0 is not below d/"
    );
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_are_skipped_not_errors() {
    let Some((ns, kv, mut raw)) = setup("foreign").await else {
        return;
    };
    raw.put(format!("{ns}/ok"), "1", None).await.unwrap();
    raw.put(format!("{ns}/bad//name"), "x", None).await.unwrap();
    raw.put(format!("{ns}/trailing/"), "x", None).await.unwrap();
    raw.put(format!("{ns}/ctl\u{1}"), "x", None).await.unwrap();
    let listed: Vec<String> = kv
        .list(&Prefix::root())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key.into_string())
        .collect();
    assert_eq!(listed, ["ok"]);
    raw.delete(
        format!("{ns}/"),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_puts_get_their_own_lease_and_expire_with_a_delete_event() {
    let Some((ns, kv, mut raw)) = setup("ttl").await else {
        return;
    };
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    // Below etcd's minimum lease TTL: the worst case for lateness.
    let short = Duration::from_millis(100);
    let ttl = PutOptions::default().with_ttl(short);
    let put_at = Instant::now();
    kv.put(&key("a"), "1".into(), ttl).await.unwrap();
    kv.put(
        &key("b"),
        "2".into(),
        PutOptions::if_absent().with_ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let a = raw.get(format!("{ns}/a"), None).await.unwrap().kvs()[0].lease();
    let b = raw.get(format!("{ns}/b"), None).await.unwrap().kvs()[0].lease();
    assert!(a != 0 && b != 0 && a != b, "one lease per put: {a} {b}");
    let granted = raw.lease_time_to_live(b, None).await.unwrap().granted_ttl();
    assert_eq!(granted, 30);
    // A failed conditional TTL put leaves no key and no extra attached lease.
    let e = kv
        .put(
            &key("b"),
            "3".into(),
            PutOptions::if_absent().with_ttl(Duration::from_secs(30)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    // "a" expires: etcd deletes it (within the declared granularity) and the
    // watch sees the delete.
    let granularity = kv.capabilities().ttl.unwrap();
    let limit = short + granularity + Duration::from_secs(1);
    loop {
        match timeout(limit, w.next()).await {
            Ok(Some(Ok(Event::Delete { key, .. }))) if key.as_str() == "a" => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("no delete of the expired key: {other:?}"),
        }
    }
    let took = put_at.elapsed();
    assert!(took >= short, "expired early: {took:?}");
    eprintln!("a {short:?} TTL key went after {took:?} (declared granularity {granularity:?})");
    assert!(took <= limit, "expired after {took:?}");
    assert!(kv.get(&key("a")).await.unwrap().is_none());
    assert!(kv.get(&key("b")).await.unwrap().is_some());
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_carries_prev_values_and_resumes_from_any_revision() {
    let Some((_ns, kv, _raw)) = setup("watchprev").await else {
        return;
    };
    let v1 = kv
        .put(&key("w"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    kv.put(&key("w"), "2".into(), PutOptions::default())
        .await
        .unwrap();
    kv.delete(&key("w"), Condition::Always).await.unwrap();
    let mut w = kv
        .watch(Target::Key(key("w")), Start::After(v1.get()))
        .await
        .unwrap();
    match timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Ok(Event::Put { kv: now, prev }))) => {
            assert_eq!(&now.value[..], b"2");
            assert_eq!(prev.map(|p| p.value), Some("1".into()));
        }
        other => panic!("{other:?}"),
    }
    match timeout(Duration::from_secs(5), w.next()).await {
        Ok(Some(Ok(Event::Delete { key, revision }))) => {
            assert_eq!(key.as_str(), "w");
            assert!(revision > v1.get());
        }
        other => panic!("{other:?}"),
    }
}

/// A watch started now gives puts their previous values itself (from a read
/// of its range when it started, then from its own events) while its range
/// holds few keys, and etcd's once it holds more: either way the values
/// etcd sends a watch that asks for them, across deletes and re-creates,
/// with a writer running while the watch starts. The prefix's writer
/// writes 3 keys, then 24, so its watch passes from one source to the
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_started_now_gives_the_prev_values_etcd_would() {
    let Some((_ns, kv, _raw)) = setup("watchprevnow").await else {
        return;
    };
    for (target, keys) in [
        (Target::Key(key("w")), 1),
        (Target::Prefix(Prefix::new("p").unwrap()), 24),
    ] {
        let name = |i: u32| match &target {
            Target::Key(k) => k.clone(),
            // Three keys first (kept by the watch), then up to `keys`.
            Target::Prefix(p) => key(&format!(
                "{}/{}",
                p.as_str(),
                if i < 60 { i % 3 } else { i % keys }
            )),
        };
        for i in 0..3 {
            kv.put(&name(i), "0".into(), PutOptions::default())
                .await
                .unwrap();
        }
        let writer = {
            let kv = kv.clone();
            let keys: Vec<Key> = (1..=120).map(name).collect();
            tokio::spawn(async move {
                for (i, k) in keys.iter().enumerate() {
                    if i % 10 == 9 {
                        kv.delete(k, Condition::Always).await.unwrap();
                    } else {
                        kv.put(k, i.to_string().into(), PutOptions::default())
                            .await
                            .unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        let mut now = kv.watch(target.clone(), Start::Now).await.unwrap();
        writer.await.unwrap();
        let end = kv
            .put(&name(0), "end".into(), PutOptions::default())
            .await
            .unwrap();
        let summary = |e: Event| match e {
            Event::Put { kv, prev } => (
                kv.key,
                kv.mod_revision,
                Some(kv.value),
                prev.map(|p| p.value),
            ),
            Event::Delete { key, revision } => (key, revision, None, None),
        };
        let mut got = Vec::new();
        while got
            .last()
            .is_none_or(|e: &(Key, u64, _, _)| e.1 < end.get())
        {
            match timeout(Duration::from_secs(5), now.next()).await {
                Ok(Some(Ok(e))) => got.push(summary(e)),
                other => panic!("{target:?} after {got:?}: {other:?}"),
            }
        }
        let with_prev = got.iter().filter(|e| e.3.is_some()).count();
        assert!(
            got.len() >= 20 && with_prev >= 10,
            "the watch started while the writer wrote: {got:?}"
        );
        // The same events from a watch that asks etcd for previous values.
        let mut from_etcd = kv
            .watch(target.clone(), Start::After(got[0].1 - 1))
            .await
            .unwrap();
        for want in &got {
            match timeout(Duration::from_secs(5), from_etcd.next()).await {
                Ok(Some(Ok(e))) => assert_eq!(&summary(e), want, "{target:?}"),
                other => panic!("{other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_is_one_revision_and_names_the_failed_check() {
    let Some((_ns, kv, _raw)) = setup("atomic").await else {
        return;
    };
    use anykv_core::{Check, Op};
    let v = kv
        .put(&key("x"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    let rev = kv
        .atomic(
            vec![Check::Version(key("x"), v), Check::Absent(key("y"))],
            vec![Op::Put(key("y"), "2".into()), Op::Delete(key("x"))],
        )
        .await
        .unwrap();
    let y = kv.get(&key("y")).await.unwrap().unwrap();
    assert_eq!(
        y.mod_revision, rev,
        "every op of one atomic shares its revision"
    );
    let e = kv
        .atomic(
            vec![
                Check::Exists(key("y")),
                Check::Value(key("y"), "nope".into()),
            ],
            vec![Op::Delete(key("y"))],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(e.key(), Some("y"));
    assert!(
        kv.get(&key("y")).await.unwrap().is_some(),
        "nothing applied"
    );
    // etcd caps a transaction at 128 operations; the layer says so up front.
    let ops: Vec<Op> = (0..129)
        .map(|i| Op::Delete(key(&format!("n{i}"))))
        .collect();
    let e = kv.atomic(vec![], ops).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_value_round_trips() {
    let Some((_ns, kv, _raw)) = setup("big").await else {
        return;
    };
    let max = kv.capabilities().max_value_size;
    let big = vec![7u8; max];
    kv.put(&key("big"), big.clone().into(), PutOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        kv.put(
            &key(&format!("many/{i}")),
            big.clone().into(),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    assert_eq!(kv.get(&key("big")).await.unwrap().unwrap().value.len(), max);
    // Five 1 MiB values in one listing (over gRPC's default 4 MiB message).
    assert_eq!(
        kv.list(&Prefix::new("many").unwrap()).await.unwrap().len(),
        5
    );
    let e = kv
        .put(
            &key("big"),
            vec![0u8; max + 1].into(),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ValueTooLarge);
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// The lock record's etcd key and lease, read raw.
async fn lock_record(raw: &mut etcd_client::Client, ns: &str, name: &str) -> (String, i64, i64) {
    let dir = format!("__anykv/locks/{ns}/{name}/");
    let resp = raw
        .get(dir.clone(), Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let kv = &resp.kvs()[0];
    (
        kv.key_str().unwrap().to_owned(),
        kv.lease(),
        kv.create_revision(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_record_layout_and_lost_when_the_lease_is_revoked() {
    let Some((ns, kv, mut raw)) = setup("locklost").await else {
        return;
    };
    let opts = LockOptions {
        ttl: Duration::from_secs(3),
        owner: Some("worker-1".into()),
        ..LockOptions::default()
    };
    let guard = kv.lock(&key("job"), opts).await.unwrap();
    let (record, lease, created) = lock_record(&mut raw, &ns, "job").await;
    assert_eq!(record, format!("__anykv/locks/{ns}/job/{lease:x}"));
    assert_eq!(guard.fencing_token(), created as u64);
    let holder = kv.lock_holder(&key("job")).await.unwrap().unwrap();
    assert_eq!(holder.fencing_token, guard.fencing_token());
    assert_eq!(holder.owner.as_deref(), Some("worker-1"));
    // The guard renews: still held after two TTLs.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!guard.is_lost());
    assert!(kv.lock_holder(&key("job")).await.unwrap().is_some());
    // Someone revokes the lease (an operator, or expiry while partitioned).
    raw.lease_revoke(lease).await.unwrap();
    timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("lost() did not fire after the lease was revoked");
    assert!(kv.lock_holder(&key("job")).await.unwrap().is_none());
    // Releasing a lost lock is fine.
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_frees_the_lock_when_its_lease_expires() {
    let Some((ns, kv, mut raw)) = setup("lockcrash").await else {
        return;
    };
    // A holder that died: its record on a lease nobody renews.
    let lease = raw.lease_grant(2, None).await.unwrap().id();
    let dead = format!("__anykv/locks/{ns}/job/{lease:x}");
    let put = raw
        .put(dead, "", Some(RawPut::new().with_lease(lease)))
        .await
        .unwrap();
    let dead_rev = put.header().unwrap().revision() as u64;
    assert!(
        kv.try_lock(&key("job"), LockOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    let t = Instant::now();
    let opts = LockOptions {
        wait: Some(Duration::from_secs(10)),
        ..LockOptions::default()
    };
    let guard = kv.lock(&key("job"), opts).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        t.elapsed()
    );
    assert!(guard.fencing_token() > dead_rev);
    guard.release().await.unwrap();
    assert!(kv.lock_holder(&key("job")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_lock_names_are_independent() {
    let Some((_ns, kv, _raw)) = setup("locknest").await else {
        return;
    };
    let outer = kv.lock(&key("a"), LockOptions::default()).await.unwrap();
    let inner = kv
        .try_lock(&key("a/b"), LockOptions::default())
        .await
        .unwrap()
        .expect("a/b is another lock than a");
    assert!(
        kv.try_lock(&key("a"), LockOptions::default())
            .await
            .unwrap()
            .is_none()
    );
    let holder = kv.lock_holder(&key("a")).await.unwrap().unwrap();
    assert_eq!(holder.fencing_token, outer.fencing_token());
    outer.release().await.unwrap();
    // "a" is free although a record of "a/b" still sits below it.
    let again = kv
        .try_lock(&key("a"), LockOptions::default())
        .await
        .unwrap()
        .expect("a is free");
    assert!(again.fencing_token() > inner.fencing_token());
    again.release().await.unwrap();
    inner.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_wait_timeout_leaves_no_record_behind() {
    let Some((ns, kv, mut raw)) = setup("locktimeout").await else {
        return;
    };
    let held = kv.lock(&key("j"), LockOptions::default()).await.unwrap();
    let opts = LockOptions {
        wait: Some(Duration::from_millis(500)),
        ..LockOptions::default()
    };
    let e = kv.lock(&key("j"), opts).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let records = raw
        .get(
            format!("__anykv/locks/{ns}/j/"),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(records, 1, "the waiter's record must be gone");
    held.release().await.unwrap();
}

#[tokio::test]
async fn unknown_option_and_tls_option_on_plain_scheme_are_url_errors() {
    use anykv_etcd as _;
    let e = anykv_core::open("etcd://127.0.0.1:1/x?tiemout=1s")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidUrl);
    assert!(
        e.to_string().contains("tiemout") && e.to_string().contains("ca"),
        "{e}"
    );
    let e = anykv_core::open("etcd://127.0.0.1:1/x?ca=/tmp/ca.pem")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidUrl, "{e}");
    let e = anykv_core::open("etcd://u:hunter2@127.0.0.1:1/x?tiemout=1")
        .await
        .unwrap_err();
    assert!(!format!("{e} {e:?}").contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_pages_and_import_batches_transactions() {
    use anykv_core::KvPair;
    let Some((_ns, kv, _raw)) = setup("transfer").await else {
        return;
    };
    let src = kv.scoped(&Prefix::new("src").unwrap());
    let dst = kv.scoped(&Prefix::new("dst").unwrap());
    // 300 small pairs (three transactions of at most 128) and two 1 MiB values
    // (one transaction each under the request limit), one key twice.
    let mut pairs: Vec<KvPair> = Vec::new();
    let pair = |k: String, v: Vec<u8>| KvPair {
        key: key(&k),
        value: v.into(),
        version: Version::new(0),
        create_revision: 0,
        mod_revision: 0,
    };
    for i in 0..300 {
        pairs.push(pair(format!("p/{i:03}"), format!("{i}").into_bytes()));
    }
    pairs.push(pair("big/a".into(), vec![1; 1 << 20]));
    pairs.push(pair("big/b".into(), vec![2; 1 << 20]));
    pairs.push(pair("p/000".into(), b"last wins".to_vec()));
    let n = src
        .import(futures::stream::iter(pairs.into_iter().map(Ok)).boxed())
        .await
        .unwrap();
    assert_eq!(n, 303);
    assert_eq!(
        &src.get(&key("p/000")).await.unwrap().unwrap().value[..],
        b"last wins"
    );
    // Export (paged) into another namespace, then compare.
    let exported = src.export(&Prefix::root()).await.unwrap();
    assert_eq!(dst.import(exported).await.unwrap(), 302);
    let a = src.list(&Prefix::root()).await.unwrap();
    let b = dst.list(&Prefix::root()).await.unwrap();
    assert_eq!(a.len(), 302);
    assert!(
        a.iter()
            .zip(&b)
            .all(|(x, y)| x.key == y.key && x.value == y.value)
    );
    // An error in the stream stops the import after what came before it.
    let broken = futures::stream::iter(vec![
        Ok(pair("e/1".into(), b"1".to_vec())),
        Err(Error::Backend {
            backend: "test",
            message: "source failed".into(),
            source: None,
        }),
        Ok(pair("e/2".into(), b"2".to_vec())),
    ])
    .boxed();
    assert!(dst.import(broken).await.is_err());
    assert!(dst.get(&key("e/1")).await.unwrap().is_some());
    assert!(dst.get(&key("e/2")).await.unwrap().is_none());
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_timeout_is_accepted_without_overflow() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let kv = common::open(&url, &common::unique("huge"), "timeout=100000years").await;
    kv.put(&key("k"), "v".into(), PutOptions::default())
        .await
        .unwrap();
    let mut w = kv
        .watch(Target::Key(key("k")), Start::After(0))
        .await
        .unwrap();
    assert!(timeout(Duration::from_secs(5), w.next()).await.is_ok());
    let g = kv.lock(&key("l"), LockOptions::default()).await.unwrap();
    g.release().await.unwrap();
    kv.probe().await.unwrap();
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_over_the_request_limit_arrives_whole_and_once() {
    let Some((_ns, kv, _raw)) = setup("fragments").await else {
        return;
    };
    // 24 × 100 KiB: the delete's events with their previous values exceed
    // etcd's 1.5 MiB message limit, so etcd sends the revision in fragments.
    for i in 0..24 {
        kv.put(
            &key(&format!("big/{i:02}")),
            vec![b'x'; 100 << 10].into(),
            PutOptions::default(),
        )
        .await
        .unwrap();
    }
    let mut w = kv
        .watch(Target::Prefix(Prefix::new("big").unwrap()), Start::Now)
        .await
        .unwrap();
    assert_eq!(
        kv.delete_prefix(&Prefix::new("big").unwrap())
            .await
            .unwrap(),
        24
    );
    let mut revisions = Vec::new();
    for _ in 0..24 {
        match timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(Event::Delete { revision, .. }))) => revisions.push(revision),
            other => panic!("after {} deletes: {other:?}", revisions.len()),
        }
    }
    assert!(revisions.iter().all(|r| *r == revisions[0]), "one revision");
    kv.put(&key("big/after"), "1".into(), PutOptions::default())
        .await
        .unwrap();
    match timeout(Duration::from_secs(10), w.next()).await {
        Ok(Some(Ok(Event::Put { kv: p, .. }))) => assert_eq!(p.key.as_str(), "big/after"),
        other => panic!("no duplicate delete expected: {other:?}"),
    }
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_is_a_lease_and_lost_when_it_is_revoked_from_outside() {
    let Some((ns, kv, mut raw)) = setup("session").await else {
        return;
    };
    // Below etcd's minimum: the session reports the TTL etcd granted.
    let s = kv
        .session(SessionOptions::with_ttl(Duration::from_millis(100)))
        .await
        .unwrap();
    assert_eq!(s.ttl(), Duration::from_secs(2), "etcd's minimum lease TTL");
    let v = s
        .put(&key("eph"), "here".into(), Condition::IfAbsent)
        .await
        .unwrap();
    let e = s
        .put(&key("eph"), "again".into(), Condition::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let got = raw.get(format!("{ns}/eph"), None).await.unwrap();
    let pair = &got.kvs()[0];
    assert_eq!(
        v.get(),
        pair.mod_revision() as u64,
        "version = mod_revision"
    );
    let lease = pair.lease();
    assert_eq!(
        s.id(),
        format!("{lease:x}"),
        "the key is on the session's lease"
    );
    // Renewed: still there after twice the TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!s.is_lost());
    assert!(kv.get(&key("eph")).await.unwrap().is_some());
    // An operator revokes the lease: lost() fires at the next renewal (a
    // third of the TTL) and the key went with the lease.
    raw.lease_revoke(lease).await.unwrap();
    timeout(Duration::from_secs(3), s.lost())
        .await
        .expect("lost() did not fire after the lease was revoked");
    assert!(kv.get(&key("eph")).await.unwrap().is_none());
    let e = s
        .put(&key("eph2"), "late".into(), Condition::Always)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost);
    assert!(kv.get(&key("eph2")).await.unwrap().is_none());
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_a_lease_etcd_no_longer_has_is_lock_lost() {
    let Some((ns, kv, mut raw)) = setup("sessionrace").await else {
        return;
    };
    let s = kv
        .session(SessionOptions::with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // Revoked behind the renewal task's back, before it notices: etcd
    // refuses the put itself, for every condition.
    raw.lease_revoke(i64::from_str_radix(s.id(), 16).unwrap())
        .await
        .unwrap();
    let e = s
        .put(&key("k"), "v".into(), Condition::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    // The failed put marked the session lost at once (the next renewal is
    // ten seconds away).
    assert!(s.is_lost(), "lost() fires with the first LockLost put");
    let e = s
        .put(&key("k"), "v".into(), Condition::Always)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(
        raw.get(format!("{ns}/k"), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    s.close().await.unwrap();
}

/// How late etcd deletes the keys of a lease nobody renews (a session whose
/// process was killed): the declared session granularity must cover it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_expire_after_a_kill_figures() {
    let Some((ns, kv, mut raw)) = setup("sessionkill").await else {
        return;
    };
    let declared = kv.capabilities().sessions.expect("sessions declared");
    let mut late = Vec::new();
    for (i, ttl) in [2i64, 3, 2].into_iter().enumerate() {
        let name = format!("dead{i}");
        let mut w = kv.watch(Target::Key(key(&name)), Start::Now).await.unwrap();
        // A session whose process died right after a renewal: the lease
        // runs its full TTL from the grant.
        let sent = Instant::now();
        let lease = raw.lease_grant(ttl, None).await.unwrap().id();
        raw.put(
            format!("{ns}/{name}"),
            "x",
            Some(RawPut::new().with_lease(lease)),
        )
        .await
        .unwrap();
        let ttl = Duration::from_secs(ttl as u64);
        loop {
            match timeout(ttl + declared + Duration::from_secs(2), w.next()).await {
                Ok(Some(Ok(Event::Delete { .. }))) => break,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no delete within TTL + granularity: {other:?}"),
            }
        }
        let past = sent.elapsed().saturating_sub(ttl);
        assert!(past <= declared, "deleted {past:?} past the TTL");
        late.push(past);
    }
    println!("FIGURES etcd session keys deleted past the TTL: {late:?} (declared {declared:?})");
}

/// A partition shorter than the TTL is no loss (renewals fail, then resume);
/// one longer than the TTL is: the client gives the session up once the
/// lease would have run out on the server, and etcd deletes its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_a_short_partition_and_is_lost_in_a_long_one() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let server = &common::endpoints(&url)[0];
    let upstream = tokio::net::lookup_host(server)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let ns = common::unique("sessionpart");
    let via = common::open(&format!("etcd://{}", proxy.local_addr()), &ns, "timeout=2s").await;
    let direct = common::open(&url, &ns, "").await;
    let s = via
        .session(SessionOptions::with_ttl(Duration::from_secs(3)))
        .await
        .unwrap();
    s.put(&key("eph"), "x".into(), Condition::Always)
        .await
        .unwrap();

    // Short: two renewal periods missed, well within the TTL.
    proxy.set_mode(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    proxy.set_mode(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!s.is_lost(), "a partition shorter than the TTL is no loss");
    assert!(direct.get(&key("eph")).await.unwrap().is_some());

    // Long: the client notices within the TTL (it counts from the last
    // renewal it sent) and etcd deletes the key within TTL + granularity.
    let granularity = direct.capabilities().sessions.unwrap();
    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    timeout(Duration::from_secs(3) + Duration::from_secs(1), s.lost())
        .await
        .expect("lost() within the TTL of the partition");
    let noticed = cut.elapsed();
    let mut gone = None;
    while cut.elapsed() < Duration::from_secs(3) + granularity + Duration::from_secs(2) {
        if direct.get(&key("eph")).await.unwrap().is_none() {
            gone = Some(cut.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = gone.expect("the key outlived TTL + granularity");
    assert!(
        noticed <= gone + Duration::from_millis(100),
        "lost() before etcd deleted: {noticed:?} vs {gone:?}"
    );
    proxy.set_mode(Mode::Pass);
    let e = s
        .put(&key("eph"), "y".into(), Condition::Always)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost);
    println!(
        "FIGURES etcd session partition: lost() after {noticed:?}, key deleted after {gone:?} (ttl 3s)"
    );
    s.close().await.unwrap();
    proxy.stop().await;
}

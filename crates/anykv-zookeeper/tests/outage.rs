//! An outage of one store's connection (a proxy in front of the shared
//! server is cut, the server keeps running): operations fail fast instead
//! of queueing, a write refused meanwhile never lands later, and a watch
//! resumes by itself with its events in revision order.
//!
//! The cut is [`Mode::Reset`]: every connection closed, each reconnect
//! attempt refused at once, until the proxy is back to [`Mode::Pass`].

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anykv_core::{Condition, ErrorKind, Event, Key, Kv, Prefix, PutOptions, Start, Store, Target};
use anykv_testkit::proxy::{Mode, Proxy};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// The store's options: the session outlives every outage here.
const QUERY: &str = "timeout=2s&session_timeout=20s";

/// A store reaching the shared server through a proxy, and one reaching it
/// directly, on one fresh namespace.
async fn stores(url: &str, name: &str) -> (Proxy, Kv, Kv) {
    let server = &common::endpoints(url)[0];
    let upstream = tokio::net::lookup_host(server)
        .await
        .unwrap()
        .next()
        .unwrap_or_else(|| panic!("{server} resolves to no address"));
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let ns = common::unique(name);
    let via = common::open(&format!("zk://{}", proxy.local_addr()), &ns, QUERY).await;
    let direct = common::open(url, &ns, "").await;
    (proxy, via, direct)
}

/// Under writes: cuts `kv`'s connection for 2 s, then waits until it
/// answers again and lets the writers go on for 500 ms. Returns how long
/// `kv` took to answer once the connection was back.
async fn outage_under_writes(proxy: &Proxy, kv: &Kv) -> Duration {
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_mode(Mode::Reset);
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_mode(Mode::Pass);
    let back = until_back(kv).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    back
}

/// Waits until `kv` answers again after an outage.
async fn until_back(kv: &Kv) -> Duration {
    let started = Instant::now();
    while let Err(e) = kv.get(&key("probe")).await {
        assert!(e.indicates_unreachable(), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no reconnect: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_fail_fast_while_disconnected_and_a_refused_write_never_lands() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let (proxy, kv, direct) = stores(&url, "failfast").await;
    let k = key("k");
    kv.put(&k, "before".into(), PutOptions::default())
        .await
        .unwrap();
    proxy.set_mode(Mode::Reset);
    // Once the client has noticed (a read fails), every operation fails at
    // once: three attempts, 50 + 100 ms of backoff, no 2 s timeout.
    let noticed = Instant::now();
    while kv.get(&k).await.is_ok() {
        assert!(noticed.elapsed() < Duration::from_secs(10), "never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        let started = Instant::now();
        let e = kv
            .put(&k, "during".into(), PutOptions::default())
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(took < Duration::from_secs(1), "put took {took:?}: {e}");
        let started = Instant::now();
        let e = kv.get(&k).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(started.elapsed() < Duration::from_secs(1), "get: {e}");
    }
    proxy.set_mode(Mode::Pass);
    let back = until_back(&kv).await;
    eprintln!("answering again {back:?} after the proxy was restored");
    // A request queued while disconnected would have been sent before this
    // read on the same session: none was.
    let got = kv.get(&k).await.unwrap().unwrap();
    assert_eq!(&got.value[..], b"before", "a refused write landed later");
    assert_eq!(&direct.get(&k).await.unwrap().unwrap().value[..], b"before");
    direct.delete_prefix(&Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_across_an_outage_resumes_in_revision_order_and_converges() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let (proxy, kv, direct) = stores(&url, "watch-outage").await;
    let prefix = Prefix::new("w").unwrap();
    let mut w = kv
        .watch(Target::Prefix(prefix.clone()), Start::Now)
        .await
        .unwrap();
    // Writers on the direct store keep writing through the outage.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..4u32 {
        let (direct, stop) = (direct.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let k = key(&format!("w/k{}", (t * 7 + i) % 16));
                if i.is_multiple_of(7) {
                    direct.delete(&k, Condition::Always).await.unwrap();
                } else {
                    let v = format!("{t}-{i}");
                    direct
                        .put(&k, v.into(), PutOptions::default())
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let back = outage_under_writes(&proxy, &kv).await;
    eprintln!("watch store answering {back:?} after the restore");
    stop.store(true, Ordering::SeqCst);
    for wr in writers {
        wr.await.unwrap();
    }
    direct
        .put(&key("w/zz-done"), "end".into(), PutOptions::default())
        .await
        .unwrap();

    let mut view: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
    let (mut last, mut last_put) = (0, 0);
    let mut puts = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let item = tokio::time::timeout(left, w.next())
            .await
            .expect("the watch resumed and reached the marker")
            .expect("the watch stays open");
        let e = match item {
            Ok(e) => e,
            // The outage may be reported on the stream; it goes on.
            Err(e) if e.indicates_unreachable() => continue,
            Err(e) => panic!("watch error {e}"),
        };
        let rev = e.revision();
        assert!(rev >= last, "{e:?} goes back from revision {last}");
        last = rev;
        match e {
            Event::Put { kv: p, .. } => {
                // Single-key writes never share a zxid.
                assert!(rev > last_put, "put {p:?} after a put at {last_put}");
                last_put = rev;
                assert!(puts.insert((p.key.to_string(), rev)), "duplicate {p:?}");
                let done = p.key.as_str() == "w/zz-done";
                view.insert(p.key.to_string(), (p.value.to_vec(), rev));
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
    let now: BTreeMap<String, (Vec<u8>, u64)> = direct
        .list(&prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key.to_string(), (p.value.to_vec(), p.mod_revision)))
        .collect();
    assert_eq!(view, now, "the watch's view converges to the store");
    direct.delete_prefix(&Prefix::root()).await.unwrap();
}

/// 100 key watches sharing their parent's recursive server watch, across
/// an outage with writers on their keys and on unwatched siblings: the
/// shared watch is registered again, and every watch resumes by itself, in
/// revision order, without duplicates, and ends on its key's last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_sharing_a_parent_watch_resume_after_an_outage() {
    const KEYS: u32 = 100;
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let (proxy, kv, direct) = stores(&url, "shared-outage").await;
    let opened = futures::future::join_all(
        (0..KEYS).map(|i| kv.watch(Target::Key(key(&format!("d/k{i}"))), Start::Now)),
    )
    .await;
    let mut watches: Vec<_> = opened.into_iter().map(Result::unwrap).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..4u32 {
        let (direct, stop) = (direct.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let n = (t * 37 + i * 13) % (KEYS + 20);
                // Keys past KEYS are unwatched siblings.
                let k = if n < KEYS {
                    key(&format!("d/k{n}"))
                } else {
                    key(&format!("d/other{n}"))
                };
                if i.is_multiple_of(9) {
                    direct.delete(&k, Condition::Always).await.unwrap();
                } else {
                    direct
                        .put(&k, format!("{t}-{i}").into(), PutOptions::default())
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    outage_under_writes(&proxy, &kv).await;
    stop.store(true, Ordering::SeqCst);
    for wr in writers {
        wr.await.unwrap();
    }
    for i in 0..KEYS {
        direct
            .put(
                &key(&format!("d/k{i}")),
                format!("end-{i}").into(),
                PutOptions::default(),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let checks = watches.iter_mut().enumerate().map(|(i, w)| async move {
        let (mut last, mut puts) = (0, HashSet::new());
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let item = tokio::time::timeout(left, w.next())
                .await
                .unwrap_or_else(|_| panic!("watch {i} never reached its last value"))
                .expect("the watch stays open");
            let e = match item {
                Ok(e) => e,
                Err(e) if e.indicates_unreachable() => continue,
                Err(e) => panic!("watch {i}: {e}"),
            };
            assert_eq!(e.key().as_str(), format!("d/k{i}"), "{e:?}");
            assert!(e.revision() >= last, "{e:?} goes back from {last}");
            last = e.revision();
            if let Event::Put { kv: p, .. } = e {
                assert!(puts.insert(p.mod_revision), "duplicate {p:?}");
                if p.value[..] == *format!("end-{i}").as_bytes() {
                    return p.mod_revision;
                }
            }
        }
    });
    let ends = futures::future::join_all(checks).await;
    for (i, end) in ends.into_iter().enumerate() {
        let now = direct.get(&key(&format!("d/k{i}"))).await.unwrap().unwrap();
        assert_eq!(now.mod_revision, end, "key {i}");
    }
    direct.delete_prefix(&Prefix::root()).await.unwrap();
}

//! Watches at scale on one handle: many watches sharing the hub and its
//! server watches, each getting exactly its events in order; a consumer
//! that does not read never delays the others; dropped watches are gone
//! from the server.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_core::{Condition, Event, Key, Prefix, PutOptions, Start, Store, Target, WatchStream};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// Puts `v` at `k`, which must succeed.
async fn put(kv: &impl Store, k: impl AsRef<str>, v: impl Into<bytes::Bytes>) {
    kv.put(&key(k.as_ref()), v.into(), PutOptions::default())
        .await
        .unwrap();
}

fn shown(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Put { kv, .. } => format!("put {}@{}", kv.key, kv.mod_revision),
            Event::Delete { key, revision } => format!("del {key}@{revision}"),
        })
        .collect()
}

async fn take(w: &mut WatchStream, n: usize, within: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(Ok(e))) => out.push(e),
            other => panic!(
                "after {:?}: expected {n} events, got {other:?}",
                shown(&out)
            ),
        }
    }
    out
}

/// Checks key watch `i` on `name`: the put of `v{i}`, then, for every
/// third key, its delete at a higher revision, and nothing more. Returns
/// the events.
async fn put_then_delete(w: &mut WatchStream, i: usize, name: &str) -> Vec<Event> {
    let want = if i.is_multiple_of(3) { 2 } else { 1 };
    let got = take(w, want, Duration::from_secs(10)).await;
    match &got[0] {
        Event::Put { kv, .. } => {
            assert_eq!(kv.key.as_str(), name);
            assert_eq!(&kv.value[..], format!("v{i}").as_bytes());
        }
        other => panic!("key {i}: {other:?}"),
    }
    if i.is_multiple_of(3) {
        assert!(
            matches!(&got[1], Event::Delete { key, .. } if key.as_str() == name),
            "{:?}",
            shown(&got)
        );
        assert!(got[1].revision() > got[0].revision(), "{:?}", shown(&got));
    }
    quiet(w, "key watch").await;
    got
}

async fn quiet(w: &mut WatchStream, what: &str) {
    if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("{what}: unexpected {e:?}");
    }
}

/// 1,200 key watches and 40 prefix watches over the same keys on one
/// handle; every key written once, then every third deleted: each key
/// watch gets its put (and delete), each prefix watch exactly its keys'
/// events in strictly increasing revision order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_watches_on_one_handle_each_get_exactly_their_events() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    const KEYS: usize = 1200;
    const GROUPS: usize = 40;
    let ns = common::unique("scale");
    let kv = common::open(&url, &ns, "").await;
    let writer = common::open(&url, &ns, "").await;
    let name = |i: usize| format!("g{}/k{i}", i % GROUPS);
    for i in (0..KEYS).step_by(2) {
        kv.put(&key(&name(i)), "0".into(), PutOptions::default())
            .await
            .unwrap();
    }
    let started = Instant::now();
    let keys = futures::future::join_all(
        (0..KEYS).map(|i| kv.watch(Target::Key(key(&name(i))), Start::Now)),
    )
    .await;
    let groups = futures::future::join_all((0..GROUPS).map(|g| {
        kv.watch(
            Target::Prefix(Prefix::new(format!("g{g}")).unwrap()),
            Start::Now,
        )
    }))
    .await;
    eprintln!(
        "{} watches set up in {:?}",
        KEYS + GROUPS,
        started.elapsed()
    );
    let mut keys: Vec<WatchStream> = keys.into_iter().map(Result::unwrap).collect();
    let mut groups: Vec<WatchStream> = groups.into_iter().map(Result::unwrap).collect();
    // Every key written once, then every third deleted (a put and a
    // delete of one key in a row can merge into the delete: ZooKeeper
    // notifications carry no data, and a read after both finds nothing).
    let writes = tokio::spawn(async move {
        for i in 0..KEYS {
            let k = key(&name(i));
            writer
                .put(&k, format!("v{i}").into(), PutOptions::default())
                .await
                .unwrap();
        }
        for i in (0..KEYS).step_by(3) {
            writer
                .delete(&key(&name(i)), Condition::Always)
                .await
                .unwrap();
        }
    });
    let checks = keys.iter_mut().enumerate().map(|(i, w)| async move {
        put_then_delete(w, i, &name(i)).await;
    });
    futures::future::join_all(checks).await;
    let checks = groups.iter_mut().enumerate().map(|(g, w)| async move {
        let mine: Vec<usize> = (0..KEYS).filter(|i| i % GROUPS == g).collect();
        let want = mine.len() + mine.iter().filter(|i| *i % 3 == 0).count();
        let got = take(w, want, Duration::from_secs(60)).await;
        for pair in got.windows(2) {
            assert!(
                pair[0].revision() < pair[1].revision(),
                "group {g} out of order: {:?}",
                shown(&got)
            );
        }
        for e in &got {
            assert!(e.key().as_str().starts_with(&format!("g{g}/")), "{e:?}");
        }
        quiet(w, "group watch").await;
    });
    futures::future::join_all(checks).await;
    writes.await.unwrap();
    drop((keys, groups));
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

/// A watch whose consumer does not read is detached once its queue is
/// full; another watch on the same handle keeps getting its events
/// promptly meanwhile, and the unread watch, once read, converges on the
/// store's state in revision order (re-synced).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_that_is_not_read_does_not_delay_another() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("slow");
    let kv = common::open(&url, &ns, "").await;
    let writer = common::open(&url, &ns, "").await;
    let mut slow = kv
        .watch(Target::Prefix(Prefix::new("slow").unwrap()), Start::Now)
        .await
        .unwrap();
    let mut fast = kv
        .watch(Target::Key(key("fast")), Start::Now)
        .await
        .unwrap();
    // Far more changes than a queue holds, to keys the slow watch covers.
    const N: usize = 1500;
    let flood = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let puts = futures::stream::iter(0..N).for_each_concurrent(16, |i| {
                let writer = writer.clone();
                async move {
                    put(&writer, format!("slow/k{}", i % 300), format!("{i}")).await;
                }
            });
            puts.await;
        })
    };
    // Meanwhile the other watch sees each of its writes within a bound.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        put(&writer, "fast", format!("{i}")).await;
        let got = take(&mut fast, 1, Duration::from_secs(5)).await;
        worst = worst.max(t.elapsed());
        match &got[0] {
            Event::Put { kv, .. } => assert_eq!(&kv.value[..], format!("{i}").as_bytes()),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flood.await.unwrap();
    eprintln!("the read watch's worst delay under the flood: {worst:?}");
    assert!(
        worst < Duration::from_secs(2),
        "delayed by the unread watch: {worst:?}"
    );
    // Now read the slow watch: bounded backlog, then convergence.
    let want: std::collections::BTreeMap<String, Vec<u8>> = kv
        .list(&Prefix::new("slow").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|kv| (kv.key.to_string(), kv.value.to_vec()))
        .collect();
    let mut state = std::collections::BTreeMap::new();
    let mut last = 0;
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while state != want {
        let e = match tokio::time::timeout_at(deadline, slow.next()).await {
            Ok(Some(Ok(e))) => e,
            other => panic!(
                "after {received} events: {other:?}; state has {} keys",
                state.len()
            ),
        };
        received += 1;
        assert!(e.revision() >= last, "out of order at {e:?}");
        last = e.revision();
        match e {
            Event::Put { kv, .. } => {
                state.insert(kv.key.to_string(), kv.value.to_vec());
            }
            Event::Delete { key, .. } => {
                state.remove(key.as_str());
            }
        }
    }
    eprintln!("the unread watch converged after {received} events ({N} writes)");
    assert!(
        received < N,
        "detached and re-synced, not buffered: {received} events"
    );
    quiet(&mut slow, "converged watch").await;
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

/// Dropping watches frees their share at once: a key watch's own server
/// watch goes away, a recursive one stays while a watch uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_are_removed_from_the_server() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("drops");
    let endpoint = common::endpoints(&url).remove(0);
    let kv = common::open(&url, &ns, "").await;
    let watched = || async { common::four_letter(&endpoint, "wchp").await };
    let key_path = |i: usize| format!("/{ns}/solo/k{i}\n");
    let mut solos = Vec::new();
    for i in 0..50 {
        solos.push(
            kv.watch(Target::Key(key(&format!("solo/k{i}"))), Start::Now)
                .await
                .unwrap(),
        );
    }
    let group = kv
        .watch(Target::Prefix(Prefix::new("group").unwrap()), Start::Now)
        .await
        .unwrap();
    // Under the group's recursive watch: shares it, no watch of its own.
    let inner = kv
        .watch(Target::Key(key("group/x")), Start::Now)
        .await
        .unwrap();
    let out = watched().await;
    assert!((0..50).all(|i| out.contains(&key_path(i))), "{out}");
    assert!(out.contains(&format!("/{ns}/group\n")));
    assert!(
        !out.contains(&format!("/{ns}/group/x\n")),
        "shared, not registered"
    );
    // Drop half the key watches and the group: their server watches go.
    let kept = solos.split_off(25);
    drop(solos);
    drop(group);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = watched().await;
        let gone = (0..25).all(|i| !out.contains(&key_path(i)));
        if gone {
            assert!(
                (25..50).all(|i| out.contains(&key_path(i))),
                "kept ones stay"
            );
            assert!(
                out.contains(&format!("/{ns}/group\n")),
                "still used by group/x"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not removed: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(inner);
    drop(kept);
    let deadline = Instant::now() + Duration::from_secs(5);
    while watched().await.contains(&format!("/{ns}/")) {
        assert!(Instant::now() < deadline, "server watches left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches crowded under one parent znode (100 keys and 70 prefixes) share
/// one recursive server watch on it each: every watch gets exactly its
/// events, with the previous value, and none of the unwatched siblings'
/// (which the server now notifies too); the shared watch stays while any
/// watch uses it and goes with the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_under_one_parent_share_its_recursive_watch() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    const KEYS: usize = 100;
    const BASES: usize = 70;
    let ns = common::unique("crowd");
    let endpoint = common::endpoints(&url).remove(0);
    let kv = common::open(&url, &ns, "").await;
    let writer = common::open(&url, &ns, "").await;
    let watched = || async { common::four_letter(&endpoint, "wchp").await };
    for i in (0..KEYS).step_by(2) {
        put(&writer, format!("dev/d{i}"), "0").await;
    }
    let keys = futures::future::join_all(
        (0..KEYS).map(|i| kv.watch(Target::Key(key(&format!("dev/d{i}"))), Start::Now)),
    )
    .await;
    let mut keys: Vec<WatchStream> = keys.into_iter().map(Result::unwrap).collect();
    let mut bases = Vec::new();
    for b in 0..BASES {
        // One after another: the first ones register their own watch,
        // merged into the parent's once the parent is crowded.
        let p = Prefix::new(format!("grp/b{b}")).unwrap();
        bases.push(kv.watch(Target::Prefix(p), Start::Now).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = watched().await;
        let shared = out.contains(&format!("/{ns}/dev\n")) && out.contains(&format!("/{ns}/grp\n"));
        let own = out.contains(&format!("/{ns}/dev/d")) || out.contains(&format!("/{ns}/grp/b"));
        if shared && !own {
            break;
        }
        assert!(Instant::now() < deadline, "not shared: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Watched and unwatched siblings written, every third watched key
    // deleted.
    for i in 0..KEYS {
        put(&writer, format!("dev/d{i}"), format!("v{i}")).await;
        put(&writer, format!("dev/other{i}"), "x").await;
    }
    for b in 0..BASES {
        put(&writer, format!("grp/b{b}/k"), format!("g{b}")).await;
        put(&writer, format!("grp/c{b}/k"), "x").await;
    }
    for i in (0..KEYS).step_by(3) {
        writer
            .delete(&key(&format!("dev/d{i}")), Condition::Always)
            .await
            .unwrap();
    }
    let checks = keys.iter_mut().enumerate().map(|(i, w)| async move {
        let got = put_then_delete(w, i, &format!("dev/d{i}")).await;
        let Event::Put { prev, .. } = &got[0] else {
            unreachable!("checked")
        };
        assert_eq!(prev.is_some(), i % 2 == 0, "key {i}: {prev:?}");
    });
    futures::future::join_all(checks).await;
    let checks = bases.iter_mut().enumerate().map(|(b, w)| async move {
        let got = take(w, 1, Duration::from_secs(10)).await;
        assert_eq!(got[0].key().as_str(), format!("grp/b{b}/k"));
        quiet(w, "prefix watch").await;
    });
    futures::future::join_all(checks).await;
    // All but one dropped: the shared watch stays for the last one.
    let last = keys.pop().unwrap();
    drop(keys);
    drop(bases);
    let deadline = Instant::now() + Duration::from_secs(5);
    while watched().await.contains(&format!("/{ns}/grp\n")) {
        assert!(Instant::now() < deadline, "unused shared watch left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        watched().await.contains(&format!("/{ns}/dev\n")),
        "still used"
    );
    drop(last);
    let deadline = Instant::now() + Duration::from_secs(5);
    while watched().await.contains(&format!("/{ns}/")) {
        assert!(Instant::now() < deadline, "server watches left behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.delete_prefix(&Prefix::root()).await.unwrap();
}

//! The contract under faults (issue 9), against a private Consul *server*
//! with its data on disk, killed with SIGKILL and restarted on the same data
//! dir and ports, or frozen with SIGSTOP:
//!
//! - a prefix watch open across a restart neither invents, duplicates nor
//!   reorders events, and converges on the server's state;
//! - reads (default URL) never miss an acknowledged write;
//! - a lock held across a restart is not reported lost;
//! - a release that fails during an outage is retried, so another
//!   contender gets the lock soon after the server is back (not after the
//!   session expires);
//! - a watch resumes by itself after a freeze;
//! - watches on missing keys merged into one query resume after a restart,
//!   and the keys created then reach them exactly once.
//!
//! The server comes from the Consul package `cargo xtask` caches (through
//! `anykv_servers`). Skipped (with a reason) without `ANYKV_CONSUL_BIN` (set
//! when `cargo xtask` has provisioned Consul), unless
//! `ANYKV_REQUIRE_SERVERS=1`. Each test stops every process it starts, also
//! when it fails (`PersistentServer` kills on drop).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anykv_consul as _; // links the driver so `open` finds it
use anykv_core::{Event, Key, Kv, LockOptions, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;
use tokio::time::{Instant, sleep, timeout};

use common::PersistentServer;

/// Whether Consul is provisioned (`ANYKV_CONSUL_BIN` set); false (skip)
/// otherwise.
fn consul_provisioned() -> bool {
    anykv_testkit::server_url("ANYKV_CONSUL_BIN").is_some()
}

async fn open(server: &PersistentServer, ns: &str, extra: &str) -> Kv {
    common::open(&server.url, ns, &format!("timeout=2s{extra}")).await
}

/// What one kill + restart run under load saw.
#[derive(Debug, Default)]
struct Report {
    acked: usize,
    events: usize,
    invented: usize,
    duplicates: usize,
    out_of_order: usize,
    converged: bool,
    reads: usize,
    absent_reads: usize,
    lost: bool,
    /// From the restart until the server names a leader.
    recovery: Duration,
}

/// The checks of a Converge watch against the writes made: no delete (the
/// workload deletes nothing), no put of a key never written, no put seen
/// twice, revisions never going down.
fn check_events(events: &[Event], written: &HashSet<String>, r: &mut Report) {
    let mut seen = HashSet::new();
    let mut last = 0;
    for e in events {
        match e {
            Event::Delete { .. } => r.invented += 1,
            Event::Put { kv, .. } => {
                if !written.contains(kv.key.as_str()) {
                    r.invented += 1;
                }
                if !seen.insert((kv.key.clone(), kv.mod_revision)) {
                    r.duplicates += 1;
                }
            }
        }
        if e.revision() < last {
            r.out_of_order += 1;
        }
        last = last.max(e.revision());
    }
}

/// Fills the Raft log with `n` keys outside the watched range (64 per
/// transaction), so that a restarted server replays for longer: that
/// replay is the window in which stale answers showed up.
async fn fill_log(server: &PersistentServer, n: usize) {
    for chunk in 0..n.div_ceil(64) {
        let ops: Vec<serde_json::Value> = (0..64)
            .map(|i| {
                serde_json::json!({"KV": {"Verb": "set", "Key": format!("filler/{chunk}/{i}"), "Value": "eA=="}})
            })
            .collect();
        let (status, body) = common::http(
            reqwest::Method::PUT,
            &server.url,
            "txn",
            None,
            Some(serde_json::Value::Array(ops)),
        )
        .await;
        assert_eq!(status, 200, "filler txn: {body}");
    }
}

/// Collects the events of one watch stream until aborted.
fn collect(
    mut watch: anykv_core::WatchStream,
) -> (Arc<Mutex<Vec<Event>>>, tokio::task::JoinHandle<()>) {
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let task = {
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(item) = watch.next().await {
                if let Ok(e) = item {
                    events.lock().unwrap().push(e);
                }
            }
        })
    };
    (events, task)
}

/// The key → `mod_revision` view a consumer builds from `events`.
fn view_of(events: &[Event]) -> BTreeMap<Key, u64> {
    let mut view = BTreeMap::new();
    for e in events {
        match e {
            Event::Put { kv, .. } => {
                view.insert(kv.key.clone(), kv.mod_revision);
            }
            Event::Delete { key, .. } => {
                view.remove(key);
            }
        }
    }
    view
}

/// 4 writers of fresh keys, 4 readers of acknowledged keys, prefix
/// watches (on `w` and on each writer's `w/<i>`, from two handles: six
/// blocking loops, each resuming on its own schedule) and one held lock,
/// across `kill -9` + restart of the server.
async fn restart_under_load(name: &str, url_extra: &str) -> Report {
    let mut server = PersistentServer::start(name).await;
    fill_log(&server, 4096).await;
    let kv = open(&server, "load", url_extra).await;
    let other = open(&server, "load", url_extra).await;
    let mut watches = Vec::new();
    for (handle, p) in [
        (&kv, "w"),
        (&other, "w"),
        (&kv, "w/0"),
        (&kv, "w/1"),
        (&other, "w/2"),
        (&other, "w/3"),
    ] {
        let prefix = Prefix::new(p).unwrap();
        let w = handle
            .watch(Target::Prefix(prefix.clone()), Start::Now)
            .await
            .expect("watch");
        let (events, task) = collect(w);
        watches.push((prefix, events, task));
    }
    let lock = kv
        .lock(
            &Key::new("held").unwrap(),
            LockOptions {
                ttl: Duration::from_secs(20),
                ..Default::default()
            },
        )
        .await
        .expect("lock");

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Key>>> = Arc::default();
    let written: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (kv, stop, acked, written) = (kv.clone(), stop.clone(), acked.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = Key::new(format!("w/{w}/{n}")).unwrap();
                written.lock().unwrap().insert(key.to_string());
                match kv
                    .put(&key, format!("{w}-{n}").into(), PutOptions::default())
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push(key),
                    Err(_) => sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    let reads = Arc::new(AtomicUsize::new(0));
    let absent = Arc::new(AtomicUsize::new(0));
    for r in 0..4usize {
        let (kv, stop, acked, reads, absent) = (
            kv.clone(),
            stop.clone(),
            acked.clone(),
            reads.clone(),
            absent.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = {
                    let a = acked.lock().unwrap();
                    if a.is_empty() {
                        None
                    } else {
                        Some(a[n.wrapping_mul(7919) % a.len()].clone())
                    }
                };
                let Some(key) = key else {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match kv.get(&key).await {
                    Ok(Some(_)) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                        absent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }

    sleep(Duration::from_millis(1500)).await;
    server.kill9();
    sleep(Duration::from_millis(300)).await;
    let restarted = Instant::now();
    server.restart();
    server.wait_leader().await;
    let recovery = restarted.elapsed();
    sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = timeout(Duration::from_secs(10), t).await;
    }

    // Every watch's view must converge on the server's state.
    let mut report = Report {
        recovery,
        converged: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    for (prefix, events, _) in &watches {
        loop {
            let truth: BTreeMap<Key, u64> = kv
                .list(prefix)
                .await
                .map(|l| l.into_iter().map(|p| (p.key, p.mod_revision)).collect())
                .unwrap_or_default();
            let view = view_of(&events.lock().unwrap());
            if !truth.is_empty() && view == truth {
                break;
            }
            if Instant::now() > deadline {
                report.converged = false;
                break;
            }
            sleep(Duration::from_millis(200)).await;
        }
    }
    report.lost = lock.is_lost();
    let holder = kv.lock_holder(lock.key()).await.expect("lock_holder");
    assert_eq!(
        holder.map(|h| h.fencing_token),
        Some(lock.fencing_token()),
        "the lock record still names the holder"
    );
    let _ = lock.release().await;
    report.acked = acked.lock().unwrap().len();
    report.reads = reads.load(Ordering::Relaxed);
    report.absent_reads = absent.load(Ordering::Relaxed);
    let written = written.lock().unwrap();
    for (_, events, task) in &watches {
        task.abort();
        let events = events.lock().unwrap();
        report.events += events.len();
        check_events(&events, &written, &mut report);
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_reads_and_lock_keep_the_contract_across_a_restart() {
    if !consul_provisioned() {
        return;
    }
    let r = restart_under_load("faults-load", "").await;
    eprintln!(
        "restart under load: {r:?}; leader back {:?} after the restart",
        r.recovery
    );
    assert!(r.acked > 100, "too little load to mean anything: {r:?}");
    assert_eq!(
        (r.invented, r.duplicates, r.out_of_order),
        (0, 0, 0),
        "{r:?}"
    );
    assert!(r.converged, "the watch did not converge: {r:?}");
    assert_eq!(r.absent_reads, 0, "reads missed acknowledged writes: {r:?}");
    assert!(!r.lost, "lost() fired for a lock still held: {r:?}");
}

/// With the weaker read modes a user may opt into, reads may miss
/// acknowledged writes for a moment after a restart (documented), but the
/// watch still invents nothing: its answers older than the last one are
/// confirmed by a `consistent` read before anything is diffed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_watch_keeps_the_contract_with_stale_reads() {
    if !consul_provisioned() {
        return;
    }
    let r = restart_under_load("faults-stale", "&consistency=stale").await;
    eprintln!("restart under load, consistency=stale: {r:?}");
    assert!(r.acked > 100, "too little load to mean anything: {r:?}");
    assert_eq!(
        (r.invented, r.duplicates, r.out_of_order),
        (0, 0, 0),
        "{r:?}"
    );
    assert!(r.converged, "the watch did not converge: {r:?}");
    assert!(!r.lost, "lost() fired for a lock still held: {r:?}");
}

/// A release during an outage fails within the timeout, keeps trying in
/// the background, and the waiting contender gets the lock soon after the
/// server is back (not when the holder's session expires, 20 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_during_an_outage_hands_over_when_the_server_returns() {
    if !consul_provisioned() {
        return;
    }
    let (release_took, handover) = release_during_outage().await;
    eprintln!("release during outage took {release_took:?}; handover {handover:?}");
    assert!(
        release_took < Duration::from_secs(3),
        "release() took {release_took:?} with timeout=2s"
    );
    assert!(
        handover < Duration::from_secs(6),
        "the contender got the lock {handover:?} after the server was back"
    );
}

/// Returns how long `release()` took and how long after the server named a
/// leader again the contender held the lock.
async fn release_during_outage() -> (Duration, Duration) {
    let mut server = PersistentServer::start("faults-handover").await;
    let a = open(&server, "handover", "").await;
    let b = open(&server, "handover", "").await;
    let key = Key::new("l").unwrap();
    let opts = LockOptions {
        ttl: Duration::from_secs(20),
        ..Default::default()
    };
    let held = a.lock(&key, opts.clone()).await.expect("lock");
    let acquired: Arc<Mutex<Option<Instant>>> = Arc::default();
    let contender = {
        let (b, key, acquired) = (b.clone(), key.clone(), acquired.clone());
        let opts = LockOptions {
            wait: Some(Duration::from_secs(5)),
            ..opts
        };
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                match b.lock(&key, opts.clone()).await {
                    Ok(g) => {
                        *acquired.lock().unwrap() = Some(Instant::now());
                        return Some(g);
                    }
                    Err(_) => sleep(Duration::from_millis(100)).await,
                }
            }
            None
        })
    };
    sleep(Duration::from_millis(500)).await;
    server.kill9();
    let t = Instant::now();
    let released = held.release().await;
    let release_took = t.elapsed();
    assert!(
        released.is_err(),
        "release cannot succeed with the server down"
    );
    sleep(Duration::from_secs(1)).await;
    server.restart();
    server.wait_leader().await;
    let back = Instant::now();
    let guard = timeout(Duration::from_secs(45), contender)
        .await
        .expect("contender bounded")
        .expect("contender task");
    let at = acquired
        .lock()
        .unwrap()
        .expect("the contender got the lock");
    assert!(guard.is_some());
    (release_took, at.saturating_duration_since(back))
}

/// A frozen server (SIGSTOP) thawed after 3 s: the watch resumes by itself
/// and sees later writes, the lock is not reported lost, and a lock
/// released during the freeze is free soon after the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_and_lock_survive_a_freeze() {
    if !consul_provisioned() {
        return;
    }
    let server = PersistentServer::start("faults-freeze").await;
    let kv = open(&server, "freeze", "").await;
    let mut watch = kv
        .watch(Target::Prefix(Prefix::new("f").unwrap()), Start::Now)
        .await
        .expect("watch");
    let lock = kv
        .lock(
            &Key::new("held").unwrap(),
            LockOptions {
                ttl: Duration::from_secs(20),
                ..Default::default()
            },
        )
        .await
        .expect("lock");
    let given_back = kv
        .lock(&Key::new("given-back").unwrap(), LockOptions::default())
        .await
        .expect("second lock");
    server.freeze();
    // A release while the agent is frozen ends within the timeout (2 s)…
    let t = Instant::now();
    let released = given_back.release().await;
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "release took {:?}",
        t.elapsed()
    );
    assert!(released.is_err(), "nothing can confirm a frozen release");
    sleep(Duration::from_secs(3).saturating_sub(t.elapsed())).await;
    server.thaw();
    let thawed = Instant::now();
    // …and is retried: the lock is free soon after the thaw, not when its
    // session expires (20 s later).
    loop {
        let free = kv.lock_holder(&Key::new("given-back").unwrap()).await;
        if matches!(free, Ok(None)) {
            break;
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(8),
            "still held {:?} after the thaw: {free:?}",
            thawed.elapsed()
        );
        sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "released during a freeze: free {:?} after the thaw",
        thawed.elapsed()
    );
    let k = Key::new("f/after").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        match kv.put(&k, "1".into(), PutOptions::default()).await {
            Ok(v) => break v,
            Err(e) => {
                assert!(Instant::now() < deadline, "no write after the thaw: {e}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, watch.next()).await {
            Ok(Some(Ok(Event::Put { kv, .. }))) => {
                assert_eq!((&kv.key, kv.version), (&k, v));
                break;
            }
            Ok(Some(Ok(other))) => panic!("unexpected event {other:?}"),
            Ok(Some(Err(e))) => assert!(e.indicates_unreachable(), "{e}"),
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("the watch did not resume after the thaw"),
        }
    }
    assert!(!lock.is_lost(), "lost() fired after a 3 s freeze");
    lock.release().await.expect("release");
}

/// Watches on keys that do not exist yet, merged into one query (see
/// `coalesce.rs`), across `kill -9` + restart of the server: the merged
/// query resumes by itself, the keys created afterwards reach their
/// watches exactly once (errors for the outage allowed, no other event),
/// and the first of them splits the query again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merged_queries_on_missing_keys_survive_a_restart() {
    if !consul_provisioned() {
        return;
    }
    let mut server = PersistentServer::start("faults-merge").await;
    let watcher = anykv_consul::ConsulStore::connect(
        &anykv_core::Config::parse(&format!("{}?timeout=2s", server.url)).unwrap(),
    )
    .unwrap();
    let writer = open(&server, "merge", "").await;
    // 8 letters x 10 keys: 8 queries, then one once all are empty.
    let name = |i: usize| format!("m/{}{}", char::from(b'a' + (i % 8) as u8), i / 8);
    let mut watches = Vec::new();
    for i in 0..80 {
        let key = Key::new(format!("merge/{}", name(i))).unwrap();
        watches.push(watcher.watch(Target::Key(key), Start::Now).await.unwrap());
    }
    let other = |i: usize| Key::new(format!("other/{i}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while watcher.watch_loops() > 1 {
        assert!(Instant::now() < deadline, "the queries never merged");
        writer
            .put(&other(i), "v".into(), PutOptions::default())
            .await
            .unwrap();
        i += 1;
        sleep(Duration::from_millis(20)).await;
    }

    server.kill9();
    sleep(Duration::from_millis(300)).await;
    server.restart();
    server.wait_leader().await;
    // Writes of other keys again, then the creations.
    let put = |key: Key| {
        let writer = writer.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match writer.put(&key, "v".into(), PutOptions::default()).await {
                    Ok(v) => break v,
                    Err(e) => {
                        assert!(Instant::now() < deadline, "no write after the restart: {e}");
                        sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    for j in 0..20 {
        put(other(i + j)).await;
    }
    for c in [13, 6, 21] {
        let v = put(Key::new(name(c)).unwrap()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, watches[c].next()).await {
                Ok(Some(Ok(Event::Put { kv, .. }))) => {
                    assert_eq!(
                        (kv.key.as_str(), kv.version),
                        (&*format!("merge/{}", name(c)), v)
                    );
                    break;
                }
                Ok(Some(Ok(other))) => panic!("unexpected event {other:?}"),
                Ok(Some(Err(e))) => assert!(e.indicates_unreachable(), "{e}"),
                Ok(None) => panic!("the watch ended"),
                Err(_) => panic!("the creation of {} never arrived", name(c)),
            }
        }
    }
    assert!(watcher.watch_loops() > 1, "the merged query did not split");
    // No other event anywhere: errors for the outage only.
    sleep(Duration::from_millis(500)).await;
    for (c, w) in watches.iter_mut().enumerate() {
        while let Some(item) = futures::FutureExt::now_or_never(w.next()) {
            match item {
                Some(Err(e)) => assert!(e.indicates_unreachable(), "{e}"),
                other => panic!("watch of {} got {other:?}", name(c)),
            }
        }
    }
}

//! Watches multiplexed on shared gRPC watch streams: many watches of one
//! handle each get exactly their own events, in order; a consumer that stops
//! reading holds up no other watch; a broken connection resumes every watch
//! from its own revision.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use anykv_core::{Event, Key, Op, Prefix, PutOptions, Start, Store, Target, WatchStream};
use anykv_etcd as _;
use anykv_testkit::proxy::{Mode, Proxy};
use futures::StreamExt;
use tokio::time::{Instant, timeout};

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// The next event of `w` within `limit`, panicking on an error or the end.
async fn next(w: &mut WatchStream, limit: Duration, what: &str) -> Event {
    match timeout(limit, w.next()).await {
        Ok(Some(Ok(e))) => e,
        other => panic!("{what}: expected an event, got {other:?}"),
    }
}

fn value(e: &Event) -> String {
    match e {
        Event::Put { kv, .. } => String::from_utf8_lossy(&kv.value).into_owned(),
        Event::Delete { .. } => "<deleted>".into(),
    }
}

/// Puts `value` to every key in one transaction per 100 keys.
async fn put_all(kv: &anykv_core::Kv, keys: &[Key], value: &str) {
    for chunk in keys.chunks(100) {
        let ops = chunk
            .iter()
            .map(|k| Op::Put(k.clone(), value.to_owned().into()))
            .collect();
        kv.atomic(Vec::new(), ops).await.unwrap();
    }
}

/// 1,200 watches on one handle (two shared streams at the default bound of
/// 1,000) plus one prefix watch over all their keys: each gets exactly the
/// three writes of its own key, in order, and the prefix watch every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_hundred_watches_on_one_handle_each_get_exactly_their_events_in_order() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let kv = common::open(&url, &common::unique("many"), "").await;
    const N: usize = 1200;
    let keys: Vec<Key> = (0..N).map(|i| key(&format!("m/k{i:04}"))).collect();
    let started = Instant::now();
    let mut watches = Vec::with_capacity(N);
    for k in &keys {
        watches.push(kv.watch(Target::Key(k.clone()), Start::Now).await.unwrap());
    }
    let mut all = kv
        .watch(Target::Prefix(Prefix::new("m").unwrap()), Start::Now)
        .await
        .unwrap();
    println!("{N} watches set up in {:?}", started.elapsed());
    for round in ["a", "b", "c"] {
        put_all(&kv, &keys, round).await;
    }
    let mut last_all = 0;
    for i in 0..3 * N {
        let e = next(&mut all, Duration::from_secs(10), "prefix watch").await;
        assert!(e.revision() >= last_all, "prefix watch in order at {i}");
        last_all = e.revision();
    }
    for (i, w) in watches.iter_mut().enumerate() {
        let mut last = 0;
        for round in ["a", "b", "c"] {
            let e = next(w, Duration::from_secs(10), "key watch").await;
            assert_eq!(e.key(), &keys[i], "watch {i} gets only its key");
            assert_eq!(value(&e), round, "watch {i} in order");
            assert!(e.revision() > last);
            last = e.revision();
        }
    }
    // Nothing more: no duplicate, no other key's event.
    for (i, w) in watches.iter_mut().enumerate().step_by(97) {
        assert!(
            timeout(Duration::from_millis(20), w.next()).await.is_err(),
            "watch {i} has an extra item"
        );
    }
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// A watch whose consumer does not read fills its buffer and is detached;
/// another watch on the same shared stream keeps getting its events at once.
/// Read again, the slow watch resumes from its own revision and delivers
/// every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_is_not_read_does_not_delay_another_and_resumes_later() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let kv = common::open(&url, &common::unique("slow"), "").await;
    let mut slow = kv
        .watch(Target::Prefix(Prefix::new("slow").unwrap()), Start::Now)
        .await
        .unwrap();
    let mut fast = kv
        .watch(Target::Key(key("fast")), Start::Now)
        .await
        .unwrap();
    // Far more events than a watch buffers (1,024), in big transactions.
    const SLOW: usize = 5000;
    let slow_keys: Vec<Key> = (0..SLOW).map(|i| key(&format!("slow/k{i:05}"))).collect();
    let mut worst = Duration::ZERO;
    for (n, chunk) in slow_keys.chunks(500).enumerate() {
        put_all(&kv, chunk, "s").await;
        let sent = Instant::now();
        let v = kv
            .put(&key("fast"), n.to_string().into(), PutOptions::default())
            .await
            .unwrap();
        let e = next(&mut fast, Duration::from_secs(5), "fast watch").await;
        assert_eq!(e.revision(), v.get());
        worst = worst.max(sent.elapsed());
    }
    println!("fast watch: worst delay {worst:?} while the slow one was not read");
    assert!(
        worst < Duration::from_secs(1),
        "fast watch delayed {worst:?}"
    );
    // Now read the slow one: every event once, in order.
    let mut seen = 0;
    let mut last = 0;
    while seen < SLOW {
        let e = next(&mut slow, Duration::from_secs(10), "slow watch").await;
        assert_eq!(e.key(), &slow_keys[seen], "slow watch in order, no gap");
        assert!(e.revision() >= last);
        last = e.revision();
        seen += 1;
    }
    assert!(
        timeout(Duration::from_millis(200), slow.next())
            .await
            .is_err(),
        "no duplicate after the resume"
    );
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

/// The connection of a handle with 300 watches is reset while writes go on
/// through another handle: every watch resumes from its own last revision
/// (each saw a different number of events before) with no gap and no
/// duplicate, and all of them on one new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_resumes_every_watch_from_its_own_revision() {
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
    let ns = common::unique("broken");
    let via = common::open(&format!("etcd://{}", proxy.local_addr()), &ns, "timeout=2s").await;
    let direct = common::open(&url, &ns, "").await;
    const N: usize = 300;
    let keys: Vec<Key> = (0..N).map(|i| key(&format!("b/k{i:03}"))).collect();
    let mut watches = Vec::new();
    for k in &keys {
        watches.push(via.watch(Target::Key(k.clone()), Start::Now).await.unwrap());
    }
    // Watch i sees i % 3 events before the break.
    for round in 0..2 {
        let some: Vec<Key> = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 > round)
            .map(|(_, k)| k.clone())
            .collect();
        put_all(&direct, &some, &format!("v{round}")).await;
    }
    for (i, w) in watches.iter_mut().enumerate() {
        for round in 0..i % 3 {
            let e = next(w, Duration::from_secs(10), "before the break").await;
            assert_eq!(value(&e), format!("v{round}"));
        }
    }
    let before = proxy.stats();
    proxy.set_mode(Mode::Reset);
    // Written while the connection is down.
    put_all(&direct, &keys, "during").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_mode(Mode::Pass);
    put_all(&direct, &keys, "after").await;
    for (i, w) in watches.iter_mut().enumerate() {
        // Outage reports (`Unavailable` items) may come first.
        let mut got = Vec::new();
        while got.len() < 2 {
            match timeout(Duration::from_secs(15), w.next()).await {
                Ok(Some(Ok(e))) => got.push(value(&e)),
                Ok(Some(Err(e))) if e.indicates_unreachable() => {}
                other => panic!("watch {i} after the break: {other:?}"),
            }
        }
        assert_eq!(got, ["during", "after"], "watch {i}: no gap, no duplicate");
    }
    for (i, w) in watches.iter_mut().enumerate().step_by(29) {
        assert!(
            timeout(Duration::from_millis(50), w.next()).await.is_err(),
            "watch {i} has an extra item"
        );
    }
    // Connections made through the proxy since (those it reset at once
    // while in `Reset` do not count).
    let after = proxy.stats();
    let reconnects = (after.accepted - after.refused) - (before.accepted - before.refused);
    println!(
        "connections after the break: {reconnects} ({} reset at once)",
        after.refused - before.refused
    );
    assert!(
        reconnects <= 3,
        "one reconnect for all, not per watch: {reconnects}"
    );
    let _ = direct.delete_prefix(&Prefix::root()).await;
}

/// What the shared streams' liveness check relies on, checked on the real
/// server: on a stream carrying several watches, one progress request gets
/// one response for the whole stream (watch id -1, no events, the store
/// revision in its header), and a client-chosen watch id is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_request_on_a_shared_stream_gets_one_stream_wide_answer() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let ns = common::unique("progress");
    let mut raw = common::raw(&url).await;
    let opts = |id| etcd_client::WatchOptions::new().with_watch_id(id);
    let mut stream = raw.watch(format!("{ns}/a"), Some(opts(7))).await.unwrap();
    stream
        .watch(format!("{ns}/b"), Some(opts(9)))
        .await
        .unwrap();
    let mut created = Vec::new();
    for _ in 0..2 {
        let r = timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.created());
        created.push(r.watch_id());
    }
    assert_eq!(created, [7, 9], "client watch ids, confirmed in order");
    let rev = raw.put(format!("{ns}/other"), "x", None).await.unwrap();
    let rev = rev.header().unwrap().revision();
    stream.request_progress().await.unwrap();
    let r = timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.watch_id(), -1, "{r:?}");
    assert!(r.events().is_empty() && !r.created() && !r.canceled());
    assert!(r.header().unwrap().revision() >= rev);
    assert!(
        timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "one answer for the stream, not one per watch"
    );
}

/// Resident memory of this process, in bytes (`/proc/self/statm`).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// CPU time (user + system) of a process so far (`/proc/<pid>/stat`).
fn cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Figures for 10,000 watches on one handle (run by hand:
/// `cargo test -p anykv-etcd --test shared_watch ten_thousand -- --ignored
/// --nocapture`, optionally with `ANYKV_ETCD_PID` for the server's CPU):
/// setup time (100 `watch` calls in flight), client memory per watch, and
/// CPU per second of both sides while they are idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn ten_thousand_idle_watches_figures() {
    let Some(url) = common::url("ANYKV_TEST_ETCD") else {
        return;
    };
    let kv = common::open(&url, &common::unique("tenk"), "").await;
    kv.put(&key("warm"), "x".into(), PutOptions::default())
        .await
        .unwrap();
    const N: usize = 10_000;
    let before = rss();
    let started = Instant::now();
    let watches: Vec<WatchStream> = futures::stream::iter(0..N)
        .map(|i| {
            let kv = kv.clone();
            async move {
                kv.watch(Target::Key(key(&format!("t/k{i:05}"))), Start::Now)
                    .await
                    .unwrap()
            }
        })
        .buffered(100)
        .collect()
        .await;
    let setup = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_watch = rss().saturating_sub(before) / N as u64;
    println!("{N} watches: setup {setup:?}, {per_watch} B per watch (RSS)");
    let me = std::process::id().to_string();
    let server = std::env::var("ANYKV_ETCD_PID").ok();
    let idle = Duration::from_secs(30);
    let (c0, s0) = (cpu(&me), server.as_deref().map(cpu));
    tokio::time::sleep(idle).await;
    let (c1, s1) = (cpu(&me), server.as_deref().map(cpu));
    let client_ms = (c1 - c0).as_millis() as f64 / idle.as_secs_f64();
    println!("idle {idle:?}: client {client_ms:.1} ms CPU/s");
    if let (Some(s0), Some(s1)) = (s0, s1) {
        let server_ms = (s1 - s0).as_millis() as f64 / idle.as_secs_f64();
        println!("idle {idle:?}: etcd {server_ms:.1} ms CPU/s");
    }
    // Every watch still works after the idle period.
    let v = kv
        .put(&key("t/k09999"), "x".into(), PutOptions::default())
        .await
        .unwrap();
    let mut watches = watches;
    let e = next(&mut watches[N - 1], Duration::from_secs(5), "last watch").await;
    assert_eq!(e.revision(), v.get());
    assert!(per_watch < 4096, "{per_watch} B per watch");
}

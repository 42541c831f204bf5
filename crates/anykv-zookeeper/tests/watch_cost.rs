//! Issue 13's watch-scale measurement on ZooKeeper (ignored by default; run
//! in release mode, one case per invocation, see the shared harness on RSS):
//! `cargo test --release -p anykv-zookeeper --test watch_cost -- --ignored --nocapture --exact bare_driver`
//! 10,000 watches (half keys, half prefixes, created one after another) on
//! one store, 500 puts/s, each put matching one watch; prints setup time,
//! RSS per watch, CPU and the delay from put issue to event (p50/p99/max),
//! and a control with 1,000 watches (the shared harness's 2-watch control
//! writes each key every 4 ms, which a Converge backend may merge: a key
//! changed twice before it is read yields one event).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

#[path = "../../anykv-memory/tests/common/watch_scale.rs"]
mod scale;

use std::{sync::Arc, time::Duration};

use anykv_core::{Prefix, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release mode with --ignored --nocapture"]
async fn bare_driver() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("watch-cost");
    let (store, _) = common::open_driver(&url, &ns, "").await;
    let store: Arc<dyn Store> = Arc::new(store);
    let f = scale::measure(store.clone(), 10_000, 500, Duration::from_secs(10)).await;
    println!("zookeeper, bare driver: {f:?}");
    // The bare driver's keys are not namespaced (the layer does that).
    store
        .delete_prefix(&Prefix::new("ws").unwrap())
        .await
        .unwrap();
    assert!(f.rss_per_watch < 2048.0, "{f:?}");
    assert!(f.p99 < Duration::from_millis(10), "{f:?}");
}

/// The control: the same puts over 1,000 watches (each key every 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release mode with --ignored --nocapture"]
async fn control_thousand_watches() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("watch-cost-control");
    let (store, _) = common::open_driver(&url, &ns, "").await;
    let f = scale::measure(Arc::new(store.clone()), 1_000, 500, Duration::from_secs(10)).await;
    println!("zookeeper, control with 1,000 watches: {f:?}");
    store
        .delete_prefix(&Prefix::new("ws").unwrap())
        .await
        .unwrap();
}

/// 10,000 key watches (`WATCHES=n` to change) set up concurrently
/// (pipelined), then 500 puts/s
/// from another handle: put latency, and the delay from a put's
/// acknowledgement to its event (what the driver adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run in release mode with --ignored --nocapture"]
async fn concurrent_setup_and_delay_after_the_ack() {
    use std::{collections::HashMap, sync::Mutex, time::Instant};

    use anykv_core::{Event, Key, PutOptions, Start, Target};
    use futures::StreamExt;

    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let count: usize = std::env::var("WATCHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // One put per key, at most 5,000.
    let puts_n = count.min(5_000);
    let ns = common::unique("watch-cost-ack");
    // Bare drivers (keys not namespaced: under a top-level znode of its own).
    let (store, _) = common::open_driver(&url, &ns, "").await;
    let (writer, _) = common::open_driver(&url, &ns, "").await;
    let top = ns.replace('/', "-");
    let keys: Vec<Key> = (0..count)
        .map(|i| Key::new(format!("{top}/k{:02}/{i}", i % 50)).unwrap())
        .collect();
    let started = Instant::now();
    let watches = futures::future::join_all(
        keys.iter()
            .map(|k| store.watch(Target::Key(k.clone()), Start::Now)),
    )
    .await;
    let setup = started.elapsed();
    let watches: Vec<_> = watches.into_iter().map(Result::unwrap).collect();
    let acked: Arc<Mutex<HashMap<Key, Instant>>> = Arc::default();
    let consumer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut all = futures::stream::select_all(watches);
            let mut delays = Vec::with_capacity(puts_n);
            while delays.len() < puts_n {
                let e = match tokio::time::timeout(Duration::from_secs(30), all.next()).await {
                    Ok(Some(Ok(e))) => e,
                    other => panic!("after {} events: {other:?}", delays.len()),
                };
                let Event::Put { kv, .. } = e else {
                    panic!("unexpected {e:?}")
                };
                let now = Instant::now();
                let at = acked.lock().unwrap().get(&kv.key).copied();
                delays.push(at.map_or(Duration::ZERO, |at| now.saturating_duration_since(at)));
            }
            delays
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1) / 500);
    let mut puts = Vec::with_capacity(puts_n);
    for k in keys.iter().take(puts_n) {
        tick.tick().await;
        let (writer, acked, k) = (writer.clone(), acked.clone(), k.clone());
        puts.push(tokio::spawn(async move {
            let t = Instant::now();
            writer
                .put(&k, "x".into(), PutOptions::default())
                .await
                .unwrap();
            acked.lock().unwrap().insert(k, Instant::now());
            t.elapsed()
        }));
    }
    let mut put_latency = Vec::with_capacity(puts_n);
    for p in puts {
        put_latency.push(p.await.unwrap());
    }
    let mut delays = consumer.await.unwrap();
    delays.sort();
    put_latency.sort();
    let q = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "zookeeper, {count} key watches set up concurrently in {setup:?}; put latency p50 {:?} p99 {:?}; \
         ack → event p50 {:?} p99 {:?} max {:?}",
        q(&put_latency, 0.5),
        q(&put_latency, 0.99),
        q(&delays, 0.5),
        q(&delays, 0.99),
        delays[delays.len() - 1]
    );
    store
        .delete_prefix(&Prefix::new(top).unwrap())
        .await
        .unwrap();
}

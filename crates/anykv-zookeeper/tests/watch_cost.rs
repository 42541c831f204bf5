//! Issue 13's watch-scale measurement on ZooKeeper (ignored by default; run
//! in release mode, one case per invocation, see the shared harness on RSS):
//! `cargo test --release -p anykv-zookeeper --test watch_cost -- --ignored --nocapture --exact bare_driver`
//! 10,000 watches (half keys, half prefixes, created one after another) on
//! one store, 500 puts/s, each put matching one watch; prints setup time,
//! RSS per watch, CPU and the delay from put issue to event (p50/p99/max),
//! with a 2-watch control run.

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
    let (store, kv) = common::open_driver(&url, &ns, "").await;
    let store: Arc<dyn Store> = Arc::new(store);
    let f = scale::measure(store.clone(), 10_000, 500, Duration::from_secs(10)).await;
    println!("zookeeper, bare driver: {f:?}");
    let control = scale::measure(store, 2, 500, Duration::from_secs(10)).await;
    println!("zookeeper, control with 2 watches: {control:?}");
    kv.delete_prefix(&Prefix::root()).await.unwrap();
    assert!(f.rss_per_watch < 2048.0, "{f:?}");
    assert!(f.p99 < Duration::from_millis(10), "{f:?}");
}

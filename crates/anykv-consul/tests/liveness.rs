//! The voltha `db.Backend` liveness tests (shared in `anykv_testkit::liveness`)
//! against a real Consul agent, a refused port and a hung port (accepts, never
//! answers), plus a private agent that the test freezes (SIGSTOP) and restarts.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_consul as _;
use anykv_core::{ErrorKind, Key, LockOptions, Prefix, PutOptions, Start, Store, Target};
use anykv_testkit::{
    liveness::{self as voltha, SLACK},
    server::silent_port,
};
use futures::StreamExt;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_server_is_alive() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    voltha::live_server_is_alive(&url, &common::unique("live")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_is_not_alive_within_the_timeout() {
    voltha::refused_port_is_not_alive("consul").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_is_not_alive_within_the_timeout() {
    voltha::hung_server_is_not_alive("consul").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_prober_moves_liveness_without_traffic() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    voltha::prober_makes_alive(&url, &common::unique("prober")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_keeps_not_alive_under_the_prober() {
    voltha::prober_keeps_dead_not_alive("consul").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_shows_in_errors_or_debug() {
    let port = silent_port().await;
    let url = format!("consul://127.0.0.1:{port}/auth?token=sup3rsecret&timeout=1s&retries=0");
    voltha::secret_never_shown(&url, "sup3rsecret").await;
    let bad = anykv_core::open("consul://127.0.0.1:1/x?token=sup3rsecret&bogus=1")
        .await
        .unwrap_err();
    assert!(!format!("{bad} {bad:?}").contains("sup3rsecret"), "{bad}");
}

/// A lock without a wait is not bounded by the layers: the driver's own
/// per-request deadline must end it against a hung agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_without_wait_is_bounded_against_a_hung_agent() {
    let port = silent_port().await;
    let url = format!("consul://127.0.0.1:{port}/hung?timeout=1s&retries=0");
    let (kv, _) = voltha::open_timed(&url).await;
    let t = Instant::now();
    let outcome = timeout(
        Duration::from_secs(5),
        kv.lock(&Key::new("k").unwrap(), LockOptions::default()),
    )
    .await;
    match outcome {
        Err(_) => panic!("lock without wait hung past 5s"),
        Ok(Ok(_)) => panic!("lock succeeded against a hung agent"),
        Ok(Err(e)) => assert!(e.indicates_unreachable(), "{e}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1) + SLACK * 2,
        "took {:?}",
        t.elapsed()
    );
}

/// A real agent frozen and thawed: liveness follows, operations time out
/// within the deadline while frozen, and everything works again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_flips_liveness_and_recovers() {
    if common::url("ANYKV_TEST_CONSUL").is_none() {
        return;
    }
    let bin = common::companion("ANYKV_CONSUL_BIN");
    let agent = common::PrivateAgent::start(&bin).await;
    let kv = common::open(
        &agent.url,
        "frozen",
        "timeout=1s&retries=0&probe_interval=300ms",
    )
    .await;
    let k = Key::new("k").unwrap();
    kv.put(&k, "v".into(), PutOptions::default())
        .await
        .expect("put");
    assert!(kv.liveness().is_alive());
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(true));

    agent.signal("STOP");
    let t = Instant::now();
    let e = kv.get(&k).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(1) + SLACK,
        "get took {:?}",
        t.elapsed()
    );
    assert_eq!(
        timeout(Duration::from_secs(3), states.next())
            .await
            .ok()
            .flatten(),
        Some(false),
        "not alive while the agent is frozen"
    );

    agent.signal("CONT");
    assert_eq!(
        timeout(Duration::from_secs(10), states.next())
            .await
            .ok()
            .flatten(),
        Some(true),
        "the prober brings it back once the agent answers"
    );
    assert_eq!(
        &kv.get(&k)
            .await
            .expect("get after thaw")
            .expect("kept")
            .value[..],
        b"v"
    );
}

/// A watch whose agent dies yields an `Unavailable` item (never a silent
/// end), keeps going, and converges on the restarted agent's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_a_dead_agent_and_converges_after_restart() {
    if common::url("ANYKV_TEST_CONSUL").is_none() {
        return;
    }
    let bin = common::companion("ANYKV_CONSUL_BIN");
    let mut agent = common::PrivateAgent::start(&bin).await;
    let kv = common::open(&agent.url, "restart", "timeout=2s").await;
    let p = Prefix::new("w").unwrap();
    let a = Key::new("w/a").unwrap();
    kv.put(&a, "1".into(), PutOptions::default())
        .await
        .expect("put");
    let mut w = kv
        .watch(Target::Prefix(p), Start::Now)
        .await
        .expect("watch");

    agent.restart().await; // -dev keeps nothing: `w/a` is gone afterwards
    let mut saw_error = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, w.next()).await {
            Err(_) => panic!("no delete of w/a within 30s (error seen: {saw_error})"),
            Ok(None) => panic!("the watch ended silently"),
            Ok(Some(Err(e))) => {
                assert!(e.indicates_unreachable(), "{e}");
                saw_error = true;
            }
            Ok(Some(Ok(anykv_core::Event::Delete { key, .. }))) => {
                assert_eq!(key, a);
                break;
            }
            Ok(Some(Ok(other))) => panic!("unexpected event {other:?}"),
        }
    }
    assert!(saw_error, "the outage was not reported on the stream");
    // Live again: new writes arrive.
    kv.put(&a, "2".into(), PutOptions::default())
        .await
        .expect("put after restart");
    let ev = timeout(Duration::from_secs(15), w.next())
        .await
        .expect("event")
        .expect("item");
    assert_eq!(ev.expect("event").key(), &a);
}

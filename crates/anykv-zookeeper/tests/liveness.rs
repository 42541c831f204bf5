//! The voltha `db.Backend` liveness tests, against a real ZooKeeper and
//! against dead endpoints: a refused port, and a port that accepts
//! connections but never answers (a hung server).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_core::{Condition, Key, Kv, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;
use tokio::time::timeout;

/// Slack on top of a deadline for scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A 127.0.0.1 port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A port that accepts TCP connections and never answers, like a hung
/// (SIGSTOPped) server.
async fn silent_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    port
}

async fn open_timed(url: &str) -> (Kv, Duration) {
    let t = Instant::now();
    let kv = anykv_core::open(url)
        .await
        .unwrap_or_else(|e| panic!("open {url} should not fail: {e}"));
    (kv, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_against_live_server_is_alive() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let kv = common::open(&url, &common::unique("live"), "timeout=2s").await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false), "not alive until proven");
    kv.probe().await.expect("probe");
    assert!(kv.liveness().is_alive());
    assert_eq!(
        timeout(Duration::from_secs(1), states.next())
            .await
            .ok()
            .flatten(),
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn benign_errors_keep_it_alive() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let kv = common::open(&url, &common::unique("benign"), "").await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    let k = Key::new("k").unwrap();
    kv.put(&k, "v".into(), PutOptions::default())
        .await
        .expect("put");
    assert_eq!(
        timeout(Duration::from_secs(1), states.next())
            .await
            .ok()
            .flatten(),
        Some(true)
    );
    for e in [
        kv.put(&k, "v".into(), PutOptions::if_absent())
            .await
            .unwrap_err(),
        kv.delete(&Key::new("absent").unwrap(), Condition::IfPresent)
            .await
            .unwrap_err(),
    ] {
        assert!(!e.indicates_unreachable(), "{e}");
    }
    assert!(kv.liveness().is_alive());
    kv.delete_prefix(&Prefix::root()).await.unwrap();
}

/// Every operation kind against `kv` fails as unreachable within `bound`,
/// and the store stays not-alive.
async fn every_operation_fails_unreachable(kv: &Kv, bound: Duration) {
    let k = Key::new("k").unwrap();
    let p = Prefix::new("p").unwrap();
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    macro_rules! dead {
        ($what:literal, $op:expr) => {{
            let t = Instant::now();
            let r = timeout(bound + SLACK, $op).await;
            let took = t.elapsed();
            match r {
                Err(_) => panic!("{} hung past {:?}", $what, bound + SLACK),
                Ok(Ok(_)) => panic!("{} succeeded against a dead endpoint", $what),
                Ok(Err(e)) => {
                    assert!(e.indicates_unreachable(), "{}: {e}", $what);
                    assert!(took <= bound + SLACK, "{} took {took:?}", $what);
                }
            }
            assert!(!kv.liveness().is_alive(), "{} left the store alive", $what);
        }};
    }
    dead!("probe", kv.probe());
    dead!("put", kv.put(&k, "v".into(), PutOptions::default()));
    dead!("get", kv.get(&k));
    dead!("delete", kv.delete(&k, Condition::Always));
    dead!("list", kv.list(&p));
    dead!("keys", kv.keys(&p));
    dead!("delete_prefix", kv.delete_prefix(&p));
    dead!("watch", kv.watch(Target::Key(k.clone()), Start::Now));
    dead!("try_lock", kv.try_lock(&k, Default::default()));
    dead!(
        "atomic",
        kv.atomic(vec![], vec![anykv_core::Op::Delete(k.clone())])
    );
    assert!(
        timeout(Duration::from_millis(200), states.next())
            .await
            .is_err()
            || !kv.liveness().is_alive(),
        "liveness must not turn true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_port_is_not_alive_within_the_timeout() {
    let url = format!("zk://127.0.0.1:{}/dead?timeout=1s", closed_port());
    let (kv, took) = open_timed(&url).await;
    assert!(took < Duration::from_secs(1), "open waited {took:?}");
    // The layers try idempotent operations 3 times; refused connections fail fast.
    every_operation_fails_unreachable(&kv, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_server_is_not_alive_within_the_timeout() {
    let url = format!(
        "zk://127.0.0.1:{}/hung?timeout=1s&retries=0",
        silent_port().await
    );
    let (kv, took) = open_timed(&url).await;
    assert!(took < Duration::from_secs(1), "open waited {took:?}");
    let t = Instant::now();
    let e = kv.probe().await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(1) + SLACK,
        "probe took {:?}",
        t.elapsed()
    );
    every_operation_fails_unreachable(&kv, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_against_a_dead_endpoint_are_bounded_and_redacted() {
    let url = format!(
        "zk://alice:sup3rsecret@127.0.0.1:{}/auth?timeout=1s&retries=0",
        silent_port().await
    );
    let (kv, took) = open_timed(&url).await;
    assert!(
        took < Duration::from_secs(1) + SLACK,
        "open waited {took:?}"
    );
    let e = kv.get(&Key::new("k").unwrap()).await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    let shown = format!("{e} {e:?} {kv:?}");
    assert!(!shown.contains("sup3rsecret"), "secret leaked: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_prober_moves_liveness_without_traffic() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let kv = common::open(&url, &common::unique("prober"), "probe_interval=200ms").await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    assert_eq!(
        timeout(Duration::from_secs(5), states.next())
            .await
            .ok()
            .flatten(),
        Some(true),
        "the prober did not make the store alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_keeps_not_alive_under_the_prober() {
    let url = format!(
        "zk://127.0.0.1:{}/dead?timeout=500ms&probe_interval=200ms",
        closed_port()
    );
    let kv = anykv_core::open(&url).await.unwrap();
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    // Several probe rounds later it is still not alive, and never was.
    let seen_alive = timeout(Duration::from_secs(2), async {
        while let Some(s) = states.next().await {
            if s {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(!seen_alive, "a dead endpoint turned alive");
    assert!(!kv.liveness().is_alive());
}

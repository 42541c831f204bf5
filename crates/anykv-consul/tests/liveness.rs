//! The voltha `db.Backend` liveness tests, against a real Consul agent, a
//! refused port, a port that accepts connections but never answers (a hung
//! agent), and a private agent that the test freezes (SIGSTOP) and kills.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_consul as _;
use anykv_core::{Condition, ErrorKind, Key, Kv, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;
use tokio::time::timeout;

/// Slack on top of a deadline for scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A port that accepts TCP connections and never answers, like a hung agent.
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
        .unwrap_or_else(|e| panic!("open should not fail: {e}"));
    (kv, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_against_live_agent_is_alive() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
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
async fn subscribe_before_any_operation_sees_false_then_true_after_a_put() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let kv = common::open(&url, &common::unique("sub"), "").await;
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
    // Errors that prove the agent answered keep it alive.
    let e = kv
        .put(&k, "v".into(), PutOptions::if_absent())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    let e = kv
        .delete(&Key::new("absent").unwrap(), Condition::IfPresent)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(kv.liveness().is_alive());
    let _ = kv.delete_prefix(&Prefix::root()).await;
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
    dead!(
        "atomic",
        kv.atomic(vec![], vec![anykv_core::Op::Delete(k.clone())])
    );
    dead!("watch", kv.watch(Target::Key(k.clone()), Start::Now));
    dead!("lock_holder", kv.lock_holder(&k));
    // A lock without a wait is not bounded by the layers: the driver's own
    // per-request deadline must end it.
    dead!("lock", kv.lock(&k, anykv_core::LockOptions::default()));
    dead!(
        "try_lock",
        kv.try_lock(&k, anykv_core::LockOptions::default())
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
    let url = format!(
        "consul://127.0.0.1:{}/dead?timeout=1s",
        common::closed_port()
    );
    let (kv, took) = open_timed(&url).await;
    assert!(took < Duration::from_secs(1), "open waited {took:?}");
    // The layers try idempotent operations 3 times; refused connections fail fast.
    every_operation_fails_unreachable(&kv, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_agent_is_not_alive_within_the_timeout() {
    let url = format!(
        "consul://127.0.0.1:{}/hung?timeout=1s&retries=0",
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
async fn the_token_never_shows_in_errors_or_debug() {
    let url = format!(
        "consul://127.0.0.1:{}/auth?token=sup3rsecret&timeout=1s&retries=0",
        silent_port().await
    );
    let (kv, _) = open_timed(&url).await;
    let e = kv.get(&Key::new("k").unwrap()).await.unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
    let shown = format!("{e} {e:?} {kv:?}");
    assert!(!shown.contains("sup3rsecret"), "secret leaked: {shown}");
    let bad = anykv_core::open("consul://127.0.0.1:1/x?token=sup3rsecret&bogus=1")
        .await
        .unwrap_err();
    assert!(!format!("{bad} {bad:?}").contains("sup3rsecret"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_prober_moves_liveness_without_traffic() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
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

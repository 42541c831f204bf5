//! anykv sessions on Consul: the Consul session behind them, ephemeral keys
//! as acquired keys, a session destroyed from outside, and no false "lost"
//! across a freeze or a `kill -9` + restart of the server shorter than the
//! TTL; a partition past the TTL is a loss, and the session is destroyed
//! when the path heals.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::Duration;

use anykv_consul as _; // links the driver so `open` finds it
use anykv_core::{Condition, ErrorKind, Key, PutOptions, SessionOptions, Store, Version};
use bytes::Bytes;
use reqwest::Method;
use tokio::time::{Instant, sleep, timeout};

use common::PersistentServer;

/// The Consul record of a session, `None` once it is gone.
async fn session_info(url: &str, id: &str) -> Option<serde_json::Value> {
    let (status, body) =
        common::http(Method::GET, url, &format!("session/info/{id}"), None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v.get(0).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_destroyed_from_outside_is_lost_and_its_keys_are_gone() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("sess-destroy");
    let kv = common::open(&url, &ns, "").await;
    // Below Consul's minimum: clamped, and reported.
    let s = kv
        .session(SessionOptions::with_ttl(Duration::from_secs(2)))
        .await
        .expect("session");
    assert_eq!(s.ttl(), Duration::from_secs(10));
    let info = session_info(&url, s.id()).await.expect("session exists");
    assert_eq!(info["TTL"], "10s");
    assert_eq!(info["Behavior"], "delete");
    assert_eq!(info["LockDelay"].as_u64(), Some(0));
    assert_eq!(info["Name"], "anykv-session");

    let (small, large) = (Key::new("inst/a").unwrap(), Key::new("inst/big").unwrap());
    let big = Bytes::from(vec![b'x'; 450 * 1024]); // over a transaction's body
    let v1 = s
        .put(&small, "a".into(), Condition::IfAbsent)
        .await
        .unwrap();
    let v2 = s.put(&large, big.clone(), Condition::Always).await.unwrap();
    for (k, v) in [(&small, v1), (&large, v2)] {
        let got = kv.get(k).await.unwrap().expect("ephemeral key");
        assert_eq!(got.version, v, "put's version is the key's version");
        assert_eq!(got.mod_revision, v.get(), "… and its mod revision");
        let raw = common::raw_entry(&url, &format!("{ns}/{k}"), None)
            .await
            .expect("raw");
        assert_eq!(
            raw["Session"].as_str(),
            Some(s.id()),
            "{k} held by the session"
        );
    }
    assert_eq!(kv.get(&large).await.unwrap().unwrap().value, big);

    let (status, body) = common::http(
        Method::PUT,
        &url,
        &format!("session/destroy/{}", s.id()),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let destroyed = Instant::now();
    timeout(Duration::from_secs(10), s.lost())
        .await
        .expect("lost() fires when the session is destroyed from outside");
    eprintln!("lost() {:?} after the destroy", destroyed.elapsed());
    assert!(kv.get(&small).await.unwrap().is_none(), "Behavior=delete");
    assert!(kv.get(&large).await.unwrap().is_none(), "Behavior=delete");
    let after = s.put(&small, "b".into(), Condition::Always).await;
    assert_eq!(after.unwrap_err().kind(), ErrorKind::LockLost);
    s.close().await.expect("closing a lost session is a no-op");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_on_a_session_consul_dropped_is_lock_lost() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("sess-gone");
    let kv = common::open(&url, &ns, "").await;
    let s = kv.session(SessionOptions::default()).await.unwrap();
    let (status, _) = common::http(
        Method::PUT,
        &url,
        &format!("session/destroy/{}", s.id()),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    // Right away, before the keeper's next renewal could notice: the put
    // itself finds out, and fires lost().
    let k = Key::new("k").unwrap();
    let got = s.put(&k, "v".into(), Condition::Always).await;
    assert_eq!(got.unwrap_err().kind(), ErrorKind::LockLost);
    assert!(kv.get(&k).await.unwrap().is_none(), "nothing written");
    timeout(Duration::from_secs(1), s.lost())
        .await
        .expect("lost() after the put found the session gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_puts_answer_conditions_exactly_and_take_over_held_keys() {
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let ns = common::unique("sess-cond");
    let kv = common::open(&url, &ns, "").await;
    let s = kv.session(SessionOptions::default()).await.unwrap();
    let k = Key::new("owner").unwrap();
    let kind = |r: anykv_core::Result<Version>| r.unwrap_err().kind();
    assert_eq!(
        kind(s.put(&k, "x".into(), Condition::IfPresent).await),
        ErrorKind::NotFound
    );
    let v = s.put(&k, "a".into(), Condition::IfAbsent).await.unwrap();
    assert_eq!(
        kind(s.put(&k, "b".into(), Condition::IfAbsent).await),
        ErrorKind::AlreadyExists
    );
    let stale = Version::new(v.get() - 1);
    assert_eq!(
        kind(s.put(&k, "b".into(), Condition::IfVersion(stale)).await),
        ErrorKind::Conflict
    );
    let v2 = s
        .put(&k, "b".into(), Condition::IfVersion(v))
        .await
        .unwrap();
    assert!(v2 > v);
    let v3 = s.put(&k, "c".into(), Condition::IfPresent).await.unwrap();
    assert!(v3 > v2);

    // A key held by a TTL key's session moves to this session.
    let t = Key::new("ttl-key").unwrap();
    kv.put(
        &t,
        "t".into(),
        PutOptions::default().with_ttl(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    s.put(&t, "mine".into(), Condition::IfPresent)
        .await
        .unwrap();
    let raw = common::raw_entry(&url, &format!("{ns}/ttl-key"), None)
        .await
        .unwrap();
    assert_eq!(raw["Session"].as_str(), Some(s.id()));

    // Another session's key too (an Always put overwrites, as `put` does);
    // closing the first session then leaves it alone.
    let other = kv.session(SessionOptions::default()).await.unwrap();
    other.put(&k, "o".into(), Condition::Always).await.unwrap();
    s.close().await.unwrap();
    assert!(
        kv.get(&t).await.unwrap().is_none(),
        "closed: its keys are gone"
    );
    assert_eq!(kv.get(&k).await.unwrap().unwrap().value, Bytes::from("o"));
    assert!(!other.is_lost());
    other.close().await.unwrap();
    assert!(kv.get(&k).await.unwrap().is_none());

    assert_eq!(
        kv.session(SessionOptions::with_ttl(Duration::from_secs(86_401)))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument,
        "longer than Consul's 24 h"
    );
}

/// A freeze of the server and a `kill -9` + restart, each shorter than the
/// TTL, are no loss: the session and its key survive, `lost()` stays quiet
/// (the restarted server answers "unknown session" while it replays its
/// log; a `consistent` read of the session must confirm it first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_false_lost_across_a_short_freeze_or_restart() {
    if anykv_testkit::server_url("ANYKV_CONSUL_BIN").is_none() {
        return;
    }
    let mut server = PersistentServer::start("sessions").await;
    let ns = common::unique("sess-fault");
    let kv = common::open(&server.url, &ns, "timeout=2s").await;
    let s = kv.session(SessionOptions::default()).await.unwrap();
    let k = Key::new("inst/1").unwrap();
    s.put(&k, "up".into(), Condition::Always).await.unwrap();

    server.freeze();
    sleep(Duration::from_secs(5)).await;
    server.thaw();
    sleep(Duration::from_secs(4)).await; // a few renewals after the thaw
    assert!(!s.is_lost(), "a 5 s freeze (TTL 10 s) is no loss");

    server.kill9();
    server.restart();
    server.wait_leader().await;
    sleep(Duration::from_secs(4)).await;
    assert!(
        !s.is_lost(),
        "a kill -9 + restart within the TTL is no loss"
    );
    assert_eq!(kv.get(&k).await.unwrap().unwrap().value, Bytes::from("up"));
    let v = s.put(&k, "still".into(), Condition::IfPresent).await;
    assert!(v.is_ok(), "the session still writes: {v:?}");

    let lost = s.lost();
    s.close().await.unwrap();
    timeout(Duration::from_secs(1), lost)
        .await
        .expect("lost() on close");
    assert!(kv.get(&k).await.unwrap().is_none());
}

/// A client cut off from its agent for longer than the TTL: `lost()` fires
/// after a TTL without renewal (not sooner), puts fail with `LockLost`, and
/// once the path heals the driver destroys the session, so its key goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_past_the_ttl_is_lost_and_the_session_destroyed_on_heal() {
    use anykv_testkit::proxy::Mode;
    let Some(url) = anykv_testkit::server_url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let (proxy, via) = common::proxy_to(&url).await;
    let ns = common::unique("sess-cut");
    let kv = common::open(&via, &ns, "timeout=1s").await;
    let direct = common::open(&url, &ns, "").await;
    let s = kv.session(SessionOptions::default()).await.unwrap();
    let k = Key::new("inst/1").unwrap();
    s.put(&k, "up".into(), Condition::Always).await.unwrap();

    proxy.set_mode(Mode::Blackhole);
    let cut = Instant::now();
    let lost = s.lost();
    assert!(
        timeout(Duration::from_secs(5), s.lost()).await.is_err(),
        "5 s without renewal (TTL 10 s) is no loss"
    );
    timeout(Duration::from_secs(12), lost)
        .await
        .expect("lost() after a TTL without renewal");
    eprintln!("lost() {:?} after the cut", cut.elapsed());
    assert_eq!(
        s.put(&k, "x".into(), Condition::Always)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::LockLost
    );
    proxy.set_mode(Mode::Pass);
    let healed = Instant::now();
    while direct.get(&k).await.unwrap().is_some() {
        assert!(
            healed.elapsed() < Duration::from_secs(8),
            "the session's key outlived the heal by 8 s"
        );
        sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "key gone {:?} after the heal, {:?} after the cut",
        healed.elapsed(),
        cut.elapsed()
    );
    proxy.stop().await;
}

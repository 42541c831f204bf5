//! Sessions on a real ZooKeeper: the session shape (own ZooKeeper session,
//! negotiated timeout, EPHEMERAL znodes owned by it), conditions and
//! versions of session puts, the parent rule, expiry from outside, a freeze
//! shorter than the timeout (no false loss) and one past it (keys gone
//! within TTL + granularity: the measured figures).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_core::{
    Condition, ErrorKind, Event, Key, Kv, Prefix, PutOptions, SessionOptions, Start, Store, Target,
};
use anykv_testkit::proxy::{Mode, Proxy};
use futures::StreamExt;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// The test server's tickTime is 2 s: sessions last 4 s to 40 s.
const MIN_TTL: Duration = Duration::from_secs(4);

async fn wait_lost(s: &anykv_core::Session, limit: Duration) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(limit, s.lost())
        .await
        .unwrap_or_else(|_| panic!("lost() did not fire within {limit:?}"));
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_are_ephemeral_znodes_of_their_own_session() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("session-shape");
    let (store, kv) = common::open_driver(&url, &ns, "").await;
    let raw = common::raw(&url).await;
    // Below the server's minimum (2 ticks): clamped, and reported.
    let short = kv
        .session(SessionOptions::with_ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(short.ttl(), MIN_TTL, "the negotiated timeout is the TTL");
    let s = kv
        .session(SessionOptions::with_ttl(Duration::from_secs(6)))
        .await
        .unwrap();
    assert_eq!(s.ttl(), Duration::from_secs(6));
    // Not the store's shared session.
    kv.get(&key("warm")).await.unwrap();
    assert_ne!(s.id(), format!("{:x}", store.session_id()));

    // An ephemeral znode owned by the session, data = the value, version = mzxid.
    let v = s
        .put(&key("a/b"), "1".into(), Condition::IfAbsent)
        .await
        .unwrap();
    let (data, stat) = raw.get_data(&format!("/{ns}/a/b")).await.unwrap();
    assert_eq!(data, b"1");
    assert_eq!(format!("{:x}", stat.ephemeral_owner), s.id());
    assert_eq!(v.get(), stat.mzxid as u64);
    let got = kv.get(&key("a/b")).await.unwrap().unwrap();
    assert_eq!(got.version, v);
    assert_eq!(got.mod_revision, v.get());
    // The implicit parent is an ordinary (persistent) marker.
    let (_, parent) = raw.get_data(&format!("/{ns}/a")).await.unwrap();
    assert_eq!(parent.ephemeral_owner, 0);

    // Exact conditions.
    let e = s
        .put(&key("a/b"), "x".into(), Condition::IfAbsent)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let e = s
        .put(&key("none"), "x".into(), Condition::IfPresent)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    let e = s
        .put(
            &key("a/b"),
            "x".into(),
            Condition::IfVersion(anykv_core::Version::new(v.get() - 1)),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let v2 = s
        .put(&key("a/b"), "2".into(), Condition::IfVersion(v))
        .await
        .unwrap();
    assert!(v2 > v);

    // A plain key taken over by a session put becomes ephemeral: it goes
    // with the session. One of another session moves to this one.
    kv.put(&key("plain"), "p".into(), PutOptions::default())
        .await
        .unwrap();
    let vp = s
        .put(&key("plain"), "q".into(), Condition::Always)
        .await
        .unwrap();
    let (_, stat) = raw.get_data(&format!("/{ns}/plain")).await.unwrap();
    assert_eq!(format!("{:x}", stat.ephemeral_owner), s.id());
    assert_eq!(vp.get(), stat.mzxid as u64);
    short
        .put(&key("moved"), "short".into(), Condition::Always)
        .await
        .unwrap();
    s.put(&key("moved"), "s".into(), Condition::Always)
        .await
        .unwrap();
    short.close().await.unwrap();
    assert_eq!(
        kv.get(&key("moved")).await.unwrap().unwrap().value,
        "s",
        "the key moved to the other session"
    );

    // A put without session makes a session key permanent (as on etcd and
    // Consul), plain or conditional.
    for (k, opts) in [
        ("detach1", PutOptions::default()),
        ("detach2", PutOptions::if_present()),
    ] {
        s.put(&key(k), "eph".into(), Condition::Always)
            .await
            .unwrap();
        let v = kv.put(&key(k), "kept".into(), opts).await.unwrap();
        let (_, stat) = raw.get_data(&format!("/{ns}/{k}")).await.unwrap();
        assert_eq!(stat.ephemeral_owner, 0, "{k} is persistent");
        assert_eq!(v.get(), stat.mzxid as u64);
    }

    // close: the server deletes the ephemerals at once (no wait needed).
    let lost = s.lost_signal();
    s.close().await.unwrap();
    assert!(lost.is_lost());
    for k in ["a/b", "plain", "moved"] {
        assert!(kv.get(&key(k)).await.unwrap().is_none(), "{k} after close");
    }
    let left: Vec<String> = kv
        .list(&Prefix::root())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key.to_string())
        .collect();
    assert_eq!(left, ["detach1", "detach2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_cannot_have_keys_below_it() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("session-parents");
    let kv = common::open(&url, &ns, "").await;
    let s = kv.session(SessionOptions::with_ttl(MIN_TTL)).await.unwrap();
    s.put(&key("p"), "eph".into(), Condition::Always)
        .await
        .unwrap();
    for e in [
        kv.put(&key("p/c"), "x".into(), PutOptions::default())
            .await
            .unwrap_err(),
        s.put(&key("p/c"), "x".into(), Condition::Always)
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("below a session key"), "{e}");
    }
    // Above existing keys (an implicit parent, or a key with children).
    s.put(&key("q/c"), "eph".into(), Condition::Always)
        .await
        .unwrap();
    kv.put(&key("r"), "r".into(), PutOptions::default())
        .await
        .unwrap();
    kv.put(&key("r/c"), "rc".into(), PutOptions::default())
        .await
        .unwrap();
    for k in ["q", "r"] {
        let e = s
            .put(&key(k), "x".into(), Condition::Always)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{k}: {e}");
        assert!(e.to_string().contains("session key"), "{e}");
    }
    assert_eq!(kv.get(&key("r")).await.unwrap().unwrap().value, "r");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expired_from_outside_is_lost_and_its_keys_gone() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("session-expire");
    let (store, kv) = common::open_driver(&url, &ns, "").await;
    let s = kv
        .session(SessionOptions::with_ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    s.put(&key("k"), "v".into(), Condition::Always)
        .await
        .unwrap();
    let info = store.session_info_of(s.id()).expect("an open session");
    // Another client takes the session over and closes it: the server
    // expires it for its owner, which learns it on its next reconnect.
    // The owner's client may take the session back before the close lands
    // (as in `common::expire_session`): repeat until it is lost.
    let started = Instant::now();
    for attempt in 1..=10 {
        let thief = zookeeper_client::Client::connector()
            .with_session(info.clone())
            .with_session_timeout(Duration::from_secs(10))
            .connect(&common::endpoints(&url).join(","))
            .await;
        match thief {
            Ok(thief) => drop(thief), // closes the session on the server
            Err(e) => eprintln!("taking the session over failed ({e}), again"),
        }
        if tokio::time::timeout(Duration::from_secs(2), s.lost())
            .await
            .is_ok()
        {
            break;
        }
        eprintln!("session {} still alive after attempt {attempt}", s.id());
    }
    wait_lost(&s, Duration::from_secs(20)).await;
    eprintln!("lost() {:?} after the first takeover", started.elapsed());
    assert!(kv.get(&key("k")).await.unwrap().is_none(), "keys are gone");
    let e = s
        .put(&key("k2"), "v".into(), Condition::Always)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(store.session_info_of(s.id()).is_none());
    // The store itself is unaffected.
    kv.put(&key("plain"), "p".into(), PutOptions::default())
        .await
        .unwrap();
}

/// A store reaching the server through a proxy, and one reaching it directly.
async fn via_proxy(url: &str, ns: &str) -> (Proxy, Kv, Kv) {
    let server = &common::endpoints(url)[0];
    let upstream = tokio::net::lookup_host(server)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let via = common::open(&format!("zk://{}", proxy.local_addr()), ns, "timeout=2s").await;
    let direct = common::open(url, ns, "").await;
    (proxy, via, direct)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_freeze_is_no_loss_and_a_long_one_ends_the_session_figures() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let ns = common::unique("session-freeze");
    let (proxy, via, direct) = via_proxy(&url, &ns).await;
    let ttl = MIN_TTL;
    let s = via.session(SessionOptions::with_ttl(ttl)).await.unwrap();
    assert_eq!(s.ttl(), ttl);
    s.put(&key("k"), "v".into(), Condition::Always)
        .await
        .unwrap();

    // A freeze of half the timeout: the client reconnects to the same
    // session, which kept its keys.
    proxy.set_mode(Mode::Blackhole);
    tokio::time::sleep(ttl / 2).await;
    assert!(direct.get(&key("k")).await.unwrap().is_some());
    proxy.set_mode(Mode::Pass);
    let back = Instant::now();
    loop {
        match s.put(&key("k"), "again".into(), Condition::Always).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                assert!(
                    back.elapsed() < Duration::from_secs(10),
                    "no reconnect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        !s.is_lost(),
        "a disconnect within the timeout is not a loss"
    );
    assert_eq!(direct.get(&key("k")).await.unwrap().unwrap().value, "again");

    // A freeze past the timeout: the server expires the session and
    // deletes its keys; the client declares it lost on its own.
    let mut w = direct
        .watch(Target::Key(key("k")), Start::Now)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let caps = direct.capabilities().sessions.expect("sessions declared");
    let frozen = Instant::now();
    proxy.set_mode(Mode::Blackhole);
    let limit = ttl + caps + Duration::from_secs(5);
    let gone = match tokio::time::timeout(limit, w.next()).await {
        Ok(Some(Ok(Event::Delete { .. }))) => frozen.elapsed(),
        other => panic!("expected the delete within {limit:?}, got {other:?}"),
    };
    let lost = wait_lost(&s, Duration::from_secs(30)).await + gone;
    eprintln!(
        "FIGURES zookeeper session: ttl {ttl:?}, keys gone {gone:.2?} after the freeze \
         ({:.2?} past the TTL), lost() on the frozen side after {lost:.2?}",
        gone.saturating_sub(ttl)
    );
    // The server counts the timeout from the last packet it received (a
    // ping up to a fraction of a second before the freeze).
    assert!(
        gone >= ttl - Duration::from_secs(1),
        "gone before the TTL: {gone:?}"
    );
    assert!(
        gone <= ttl + caps + Duration::from_secs(1),
        "granularity exceeded: {gone:?}"
    );
    proxy.set_mode(Mode::Pass);
    let e = s
        .put(&key("k"), "late".into(), Condition::Always)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LockLost, "{e}");
    assert!(direct.get(&key("k")).await.unwrap().is_none());
}

//! The voltha `db.Backend` liveness tests, for any driver: against a live
//! server, a refused port and a hung port. A network driver's
//! `tests/liveness.rs` calls these with its server URL or scheme.
//!
//! ```no_run
//! # async fn demo() {
//! // use my_driver as _;
//! anykv_testkit::liveness::refused_port_is_not_alive("mystore").await;
//! anykv_testkit::liveness::hung_server_is_not_alive("mystore").await;
//! # }
//! ```

use std::time::{Duration, Instant};

use anykv_core::{Condition, Key, Kv, LockOptions, Op, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;
use tokio::time::timeout;

use crate::server::{closed_port, open_ns, silent_port};

/// Slack on top of a deadline for scheduling on a busy machine.
pub const SLACK: Duration = Duration::from_millis(1500);

fn key(s: &str) -> Key {
    crate::support::key(s)
}

/// Opens `url`, which must succeed (opening never waits for a dead server),
/// and says how long it took.
pub async fn open_timed(url: &str) -> (Kv, Duration) {
    let t = Instant::now();
    match anykv_core::open(url).await {
        Ok(kv) => (kv, t.elapsed()),
        Err(e) => panic!(
            "open {} should not fail: {e}",
            anykv_core::config::redact(url)
        ),
    }
}

async fn next_state(
    kv: &Kv,
    states: &mut (impl futures::Stream<Item = bool> + Unpin),
) -> Option<bool> {
    let _ = kv;
    timeout(Duration::from_secs(5), states.next())
        .await
        .ok()
        .flatten()
}

/// Live server: not alive until proven; a probe makes it alive; a put does
/// too; errors that prove the server answered (failed conditions) keep it alive.
pub async fn live_server_is_alive(base: &str, ns: &str) {
    let kv = open_ns(base, ns, "timeout=2s").await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false), "not alive until proven");
    if let Err(e) = kv.probe().await {
        panic!("probe against a live server: {e}");
    }
    assert!(kv.liveness().is_alive());
    assert_eq!(next_state(&kv, &mut states).await, Some(true));

    let fresh = open_ns(base, ns, "").await;
    let mut states = fresh.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    let k = key("k");
    if let Err(e) = fresh.put(&k, "v".into(), PutOptions::default()).await {
        panic!("put: {e}");
    }
    assert_eq!(
        next_state(&fresh, &mut states).await,
        Some(true),
        "alive after a put"
    );
    for outcome in [
        fresh
            .put(&k, "v".into(), PutOptions::if_absent())
            .await
            .map(|_| ()),
        fresh
            .delete(&key("absent"), Condition::IfPresent)
            .await
            .map(|_| ()),
    ] {
        match outcome {
            Ok(()) => panic!("the condition should have failed"),
            Err(e) => assert!(!e.indicates_unreachable(), "{e}"),
        }
    }
    assert!(
        fresh.liveness().is_alive(),
        "failed conditions keep the backend alive"
    );
    let _ = fresh.delete_prefix(&Prefix::root()).await;
}

/// Every operation kind against `kv` fails as unreachable within `bound`
/// (plus [`SLACK`]), and the store never turns alive.
pub async fn every_operation_fails_unreachable(kv: &Kv, bound: Duration) {
    let k = key("k");
    let p = crate::support::prefix("p");
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    let limit = bound + SLACK;
    let waiting = LockOptions {
        wait: Some(bound),
        ..LockOptions::default()
    };
    macro_rules! dead {
        ($what:literal, $op:expr) => {{
            let t = Instant::now();
            match timeout(limit, $op).await {
                Err(_) => panic!("{} hung past {limit:?}", $what),
                Ok(Ok(_)) => panic!("{} succeeded against a dead endpoint", $what),
                Ok(Err(e)) => {
                    assert!(e.indicates_unreachable(), "{}: {e}", $what);
                    assert!(t.elapsed() <= limit, "{} took {:?}", $what, t.elapsed());
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
    dead!("atomic", kv.atomic(vec![], vec![Op::Delete(k.clone())]));
    dead!("watch", kv.watch(Target::Key(k.clone()), Start::Now));
    dead!("lock_holder", kv.lock_holder(&k));
    dead!("try_lock", kv.try_lock(&k, LockOptions::default()));
    dead!("lock", kv.lock(&k, waiting.clone()));
    let turned = timeout(Duration::from_millis(200), states.next()).await;
    assert!(
        !matches!(turned, Ok(Some(true))),
        "liveness turned true against a dead endpoint"
    );
}

/// A refused port: opening returns at once, every operation fails as
/// unreachable within the retries, and the store stays not alive.
pub async fn refused_port_is_not_alive(scheme: &str) {
    let url = format!("{scheme}://127.0.0.1:{}/dead?timeout=1s", closed_port());
    let (kv, took) = open_timed(&url).await;
    assert!(took < Duration::from_secs(1), "open waited {took:?}");
    // Idempotent operations are tried 3 times; refused connections fail fast.
    every_operation_fails_unreachable(&kv, Duration::from_secs(3)).await;
}

/// A hung server (accepts, never answers): the probe gives up within the
/// timeout, and so does every operation.
pub async fn hung_server_is_not_alive(scheme: &str) {
    let url = format!(
        "{scheme}://127.0.0.1:{}/hung?timeout=1s&retries=0",
        silent_port().await
    );
    let (kv, took) = open_timed(&url).await;
    assert!(took < Duration::from_secs(1), "open waited {took:?}");
    let t = Instant::now();
    match kv.probe().await {
        Ok(()) => panic!("probe of a hung server succeeded"),
        Err(e) => assert!(e.indicates_unreachable(), "{e}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1) + SLACK,
        "probe took {:?}",
        t.elapsed()
    );
    every_operation_fails_unreachable(&kv, Duration::from_secs(1)).await;
}

/// Credentials (in `url`, pointing at a hung server) never show in errors
/// or `Debug`, and opening stays bounded.
pub async fn secret_never_shown(url: &str, secret: &str) {
    let (kv, took) = open_timed(url).await;
    assert!(
        took < Duration::from_secs(1) + SLACK,
        "open waited {took:?}"
    );
    let e = match kv.get(&key("k")).await {
        Ok(v) => panic!("get against a hung server returned {v:?}"),
        Err(e) => e,
    };
    assert!(e.indicates_unreachable(), "{e}");
    let shown = format!("{e} {e:?} {kv:?}");
    assert!(!shown.contains(secret), "secret leaked: {shown}");
}

/// The background prober makes a store on a live server alive without traffic.
pub async fn prober_makes_alive(base: &str, ns: &str) {
    let kv = open_ns(base, ns, "probe_interval=200ms").await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    assert_eq!(
        next_state(&kv, &mut states).await,
        Some(true),
        "the prober did not make the store alive"
    );
}

/// The background prober against a refused port never makes it alive.
pub async fn prober_keeps_dead_not_alive(scheme: &str) {
    let url = format!(
        "{scheme}://127.0.0.1:{}/dead?timeout=500ms&probe_interval=200ms",
        closed_port()
    );
    let (kv, _) = open_timed(&url).await;
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
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
}

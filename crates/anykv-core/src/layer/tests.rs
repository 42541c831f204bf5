//! The default stack end to end, on a scripted driver: retry around the
//! per-attempt timeout, liveness, checks before any I/O, close, and the
//! watch guarantees.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    key::{Key, Prefix},
    layer::{Kv, LayerConfig},
    lock::LockGuard,
    store::{Store, WatchStream},
    types::{Condition, KvPair, LockOptions, PutOptions, Start, Target, Version},
};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::time::Instant;

use crate::types::Event;

use crate::ErrorKind;

use futures::StreamExt;

/// How the fake answers: `hang` attempts hang, then `fail` attempts are
/// Unavailable, then it succeeds.
#[derive(Default)]
struct Fake {
    hang: AtomicU32,
    fail: AtomicU32,
    calls: AtomicU32,
    caps: Option<Capabilities>,
    /// What `watch` streams, then the stream ends.
    watch_items: Mutex<Vec<Result<Event>>>,
    /// When set, `watch` streams from this channel instead (stays open).
    watch_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Result<Event>>>>,
    /// Failures that provably never reached the server.
    refuse: AtomicU32,
    /// The targets `watch` was asked for.
    watched: Mutex<Vec<Target>>,
    /// Lock releases started, and whether they hang.
    releases: Arc<AtomicU32>,
    hang_release: bool,
}

/// A fake driver's lock release: counts, and hangs if asked to.
struct FakeRelease {
    releases: Arc<AtomicU32>,
    hang: bool,
}

#[async_trait]
impl crate::lock::LockRelease for FakeRelease {
    async fn release(self: Box<Self>) -> Result<()> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        if self.hang {
            futures::future::pending::<()>().await;
        }
        Ok(())
    }
}

impl Fake {
    async fn answer(&self) -> Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.hang.load(Ordering::SeqCst) > 0 {
            self.hang.fetch_sub(1, Ordering::SeqCst);
            futures::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) > 0 {
            self.fail.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::unavailable("fake", "down", "connection refused"));
        }
        if self.refuse.load(Ordering::SeqCst) > 0 {
            self.refuse.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::not_sent("fake", "down", "connection refused"));
        }
        Ok(())
    }
}

const FAKE_CAPS: Capabilities = Capabilities::full(8)
    .with_ttl(None)
    .with_locks(false, false);

#[async_trait]
impl Store for Fake {
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn capabilities(&self) -> &Capabilities {
        self.caps.as_ref().unwrap_or(&FAKE_CAPS)
    }
    async fn get(&self, _: &Key) -> Result<Option<KvPair>> {
        self.answer().await.map(|()| None)
    }
    async fn put(&self, _: &Key, _: Bytes, _: PutOptions) -> Result<Version> {
        self.answer().await.map(|()| Version::new(1))
    }
    async fn delete(&self, _: &Key, _: Condition) -> Result<bool> {
        self.answer().await.map(|()| false)
    }
    async fn list(&self, _: &Prefix) -> Result<Vec<KvPair>> {
        self.answer().await.map(|()| Vec::new())
    }
    async fn delete_prefix(&self, _: &Prefix) -> Result<u64> {
        self.answer().await.map(|()| 0)
    }
    async fn probe(&self) -> Result<()> {
        self.answer().await
    }
    async fn watch(&self, target: Target, _: Start) -> Result<WatchStream> {
        self.watched.lock().unwrap().push(target);
        self.answer().await?;
        if let Some(rx) = self.watch_rx.lock().unwrap().take() {
            return Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed());
        }
        let items = std::mem::take(&mut *self.watch_items.lock().unwrap());
        Ok(futures::stream::iter(items).boxed())
    }
    async fn lock(&self, key: &Key, _: LockOptions) -> Result<LockGuard> {
        self.answer().await?;
        let (notifier, lost) = crate::lock::lost_pair();
        std::mem::forget(notifier); // held "forever" by the fake's lease
        let release = FakeRelease {
            releases: self.releases.clone(),
            hang: self.hang_release,
        };
        Ok(LockGuard::new(key.clone(), 1, lost, Box::new(release)))
    }
    async fn try_lock(&self, key: &Key, opts: LockOptions) -> Result<Option<LockGuard>> {
        self.lock(key, opts).await.map(Some)
    }
}

const LOCK_CAPS: Capabilities = Capabilities::full(8).with_ttl(None);

fn layered(fake: Arc<Fake>) -> Kv {
    let cfg = LayerConfig {
        timeout: Duration::from_secs(1),
        ..LayerConfig::default()
    };
    Kv::new(fake, cfg)
}

fn k() -> Key {
    Key::new("k").unwrap()
}

#[tokio::test(start_paused = true)]
async fn timeout_applies_to_each_attempt_inside_retry() {
    let fake = Arc::new(Fake::default());
    fake.hang.store(2, Ordering::SeqCst);
    let kv = layered(fake.clone());
    let started = Instant::now();
    assert_eq!(kv.get(&k()).await.unwrap(), None, "third attempt succeeds");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    // Two 1 s attempt timeouts plus 50 ms + 100 ms of backoff.
    assert_eq!(started.elapsed(), Duration::from_millis(2150));
    assert!(kv.liveness().is_alive());
}

/// The default stack's layers composed one over the other (a replaced
/// layer splits the fused run, so no operation takes the fast path): the
/// same behaviour as the fast path's.
fn composed(fake: Arc<Fake>) -> Kv {
    let cfg = LayerConfig {
        timeout: Duration::from_secs(1),
        ..LayerConfig::default()
    };
    Kv::builder_for(fake)
        .config(cfg)
        .replace(
            crate::StandardLayer::Tracing,
            crate::layers::trace::TracingLayer,
        )
        .build()
}

#[tokio::test(start_paused = true)]
async fn the_composed_layers_answer_as_the_fast_path() {
    for (path, kv_of) in [
        ("fast", layered as fn(Arc<Fake>) -> Kv),
        ("composed", composed),
    ] {
        let fake = Arc::new(Fake::default());
        fake.hang.store(2, Ordering::SeqCst);
        let kv = kv_of(fake.clone());
        let started = Instant::now();
        assert_eq!(kv.get(&k()).await.unwrap(), None, "{path}");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "{path}");
        assert_eq!(started.elapsed(), Duration::from_millis(2150), "{path}");
        fake.fail.store(10, Ordering::SeqCst);
        let e = kv.put(&k(), "v".into(), PutOptions::if_absent()).await;
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Unavailable, "{path}");
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            4,
            "{path}: put tried once"
        );
        assert!(!kv.liveness().is_alive(), "{path}");
        let big = Bytes::from(vec![0u8; 9]);
        let e = kv.put(&k(), big, PutOptions::default()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueTooLarge, "{path}");
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            4,
            "{path}: checked first"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retries_give_up_with_the_last_error() {
    let fake = Arc::new(Fake::default());
    fake.fail.store(10, Ordering::SeqCst);
    let kv = layered(fake.clone());
    let e = kv.get(&k()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "max_attempts");
    assert!(!kv.liveness().is_alive());
}

#[tokio::test(start_paused = true)]
async fn non_idempotent_writes_are_not_retried() {
    let fake = Arc::new(Fake::default());
    fake.fail.store(10, Ordering::SeqCst);
    let kv = layered(fake.clone());
    let e = kv
        .put(&k(), "v".into(), PutOptions::if_absent())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "a conditional put is tried once"
    );
    kv.delete(&k(), Condition::Always).await.unwrap_err();
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        2,
        "a delete is tried once"
    );
}

#[tokio::test(start_paused = true)]
async fn probe_is_bounded_by_the_timeout() {
    let fake = Arc::new(Fake::default());
    fake.hang.store(1, Ordering::SeqCst);
    let kv = layered(fake.clone());
    let started = Instant::now();
    let e = kv.probe().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1),
        "probe is not retried"
    );
    assert!(!kv.liveness().is_alive());
    kv.probe().await.unwrap();
    assert!(kv.liveness().is_alive());
}

#[tokio::test(start_paused = true)]
async fn background_prober_moves_liveness_without_traffic() {
    let fake = Arc::new(Fake::default());
    let cfg = LayerConfig {
        timeout: Duration::from_secs(1),
        probe_interval: Some(Duration::from_secs(5)),
        ..LayerConfig::default()
    };
    let kv = Kv::new(fake.clone(), cfg);
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false));
    assert_eq!(
        states.next().await,
        Some(true),
        "first probe makes it alive"
    );
    fake.fail.store(1, Ordering::SeqCst);
    assert_eq!(
        states.next().await,
        Some(false),
        "a failed probe makes it not alive"
    );
    assert_eq!(
        states.next().await,
        Some(true),
        "and the next one alive again"
    );
    kv.close().await.unwrap();
    let calls = fake.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls,
        "close stops the prober"
    );
}

#[tokio::test(start_paused = true)]
async fn rejected_arguments_never_reach_the_driver_nor_liveness() {
    let fake = Arc::new(Fake::default());
    let kv = layered(fake.clone());
    let ttl = PutOptions::default().with_ttl(Duration::from_secs(1));
    assert_eq!(
        kv.put(&k(), "v".into(), ttl).await.unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let big = Bytes::from(vec![0u8; 9]);
    assert_eq!(
        kv.put(&k(), big, PutOptions::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::ValueTooLarge
    );
    let lock = kv.lock(&k(), LockOptions::default()).await.unwrap_err();
    assert_eq!(lock.kind(), ErrorKind::Unsupported);
    assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
    let mut states = kv.liveness().subscribe();
    assert_eq!(states.next().await, Some(false), "liveness untouched");
}

#[tokio::test(start_paused = true)]
async fn a_write_is_retried_only_when_it_never_reached_the_server() {
    let fake = Arc::new(Fake::default());
    fake.fail.store(1, Ordering::SeqCst);
    let kv = layered(fake.clone());
    let e = kv.put(&k(), "v".into(), PutOptions::default()).await;
    assert_eq!(e.unwrap_err().kind(), ErrorKind::Unavailable);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "an unconditional put that may have been applied is not retried"
    );
    fake.refuse.store(2, Ordering::SeqCst);
    kv.put(&k(), "v".into(), PutOptions::if_absent())
        .await
        .expect("refused twice, then applied");
    assert_eq!(fake.calls.load(Ordering::SeqCst), 4);
}

fn lock_fake(hang_release: bool) -> Arc<Fake> {
    Arc::new(Fake {
        caps: Some(LOCK_CAPS),
        hang_release,
        ..Fake::default()
    })
}

#[tokio::test(start_paused = true)]
async fn release_ends_within_the_timeout_on_a_hung_backend() {
    let fake = lock_fake(true);
    let kv = layered(fake.clone());
    let guard = kv.lock(&k(), LockOptions::default()).await.unwrap();
    let lost = guard.lost();
    let started = Instant::now();
    let e = guard.release().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_secs(1), "one timeout");
    assert_eq!(fake.releases.load(Ordering::SeqCst), 1);
    tokio::time::timeout(Duration::from_millis(1), lost)
        .await
        .expect("a released guard reports lost");
}

#[tokio::test(start_paused = true)]
async fn close_releases_held_locks_and_refuses_operations() {
    let fake = lock_fake(false);
    let kv = layered(fake.clone());
    let guard = kv.lock(&k(), LockOptions::default()).await.unwrap();
    let kept = kv.try_lock(&k(), LockOptions::default()).await.unwrap();
    assert!(!guard.is_lost());
    kv.close().await.unwrap();
    assert_eq!(fake.releases.load(Ordering::SeqCst), 2, "both released");
    tokio::time::timeout(Duration::from_millis(1), guard.lost())
        .await
        .expect("close fires lost()");
    assert!(kept.expect("taken").is_lost());
    guard.release().await.expect("releasing again is a no-op");
    assert_eq!(fake.releases.load(Ordering::SeqCst), 2, "not twice");
    let calls = fake.calls.load(Ordering::SeqCst);
    for e in [
        kv.get(&k()).await.map(drop).unwrap_err(),
        kv.lock(&k(), LockOptions::default())
            .await
            .map(drop)
            .unwrap_err(),
        kv.watch(Target::Key(k()), Start::Now)
            .await
            .map(drop)
            .unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    }
    assert_eq!(fake.calls.load(Ordering::SeqCst), calls, "driver untouched");
}

#[tokio::test(start_paused = true)]
async fn a_watch_reports_an_outage_within_two_timeouts_then_goes_on() {
    let fake = Arc::new(Fake::default());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    *fake.watch_rx.lock().unwrap() = Some(rx);
    let kv = layered(fake.clone());
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    tx.send(delete_event("a")).unwrap();
    assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
    // The backend freezes: every probe hangs from now on.
    fake.hang.store(u32::MAX, Ordering::SeqCst);
    let started = Instant::now();
    let e = w.next().await.expect("an item").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(
        started.elapsed() <= Duration::from_secs(2),
        "within 2 × timeout, took {:?}",
        started.elapsed()
    );
    // Once reported, no second item for the same outage; events go on.
    fake.hang.store(0, Ordering::SeqCst);
    tx.send(delete_event("b")).unwrap();
    assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
    drop(w);
    let calls = fake.calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        fake.calls.load(Ordering::SeqCst) <= calls + 1,
        "the last watch dropped stops the probes"
    );
}

/// A watch takes the fast path (see `fast_path`) with the layers'
/// behaviour: its target in the namespace, its events back out of it (none
/// from outside it or under the reserved root, in the root namespace too),
/// a failed attempt retried, liveness fed.
#[tokio::test(start_paused = true)]
async fn the_composed_layers_watch_as_the_fast_path() {
    for replace in [false, true] {
        for (ns, expected) in [("app", &["x"][..]), ("", &["app/x", "other/y", "x"][..])] {
            let case = format!("composed: {replace}, namespace {ns:?}");
            let fake = Arc::new(Fake::default());
            fake.fail.store(1, Ordering::SeqCst);
            let reserved = Key::from_backend("__anykv/locks/app/z").unwrap();
            *fake.watch_items.lock().unwrap() = vec![
                delete_event("app/x"),
                delete_event("other/y"),
                Ok(Event::Delete {
                    key: reserved,
                    revision: 7,
                }),
                delete_event("x"),
            ];
            let namespace = if ns.is_empty() {
                Prefix::root()
            } else {
                Prefix::new(ns).unwrap()
            };
            let cfg = LayerConfig {
                timeout: Duration::from_secs(1),
                namespace: namespace.clone(),
                ..LayerConfig::default()
            };
            let mut builder = Kv::builder_for(fake.clone()).config(cfg);
            if replace {
                builder = builder.replace(
                    crate::StandardLayer::Tracing,
                    crate::layers::trace::TracingLayer,
                );
            }
            let kv = builder.build();
            let w = kv
                .watch(Target::Prefix(Prefix::root()), Start::Now)
                .await
                .unwrap();
            assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "{case}: retried");
            assert!(kv.liveness().is_alive(), "{case}");
            assert_eq!(
                *fake.watched.lock().unwrap(),
                vec![Target::Prefix(namespace.clone()); 2],
                "{case}"
            );
            let items: Vec<Result<Event>> = w.collect().await;
            let keys: Vec<&str> = items
                .iter()
                .filter_map(|i| i.as_ref().ok().map(|e| e.key().as_str()))
                .collect();
            assert_eq!(keys, expected, "{case}");
            let end = items.last().unwrap().as_ref().unwrap_err();
            assert_eq!(end.kind(), ErrorKind::Unavailable, "{case}: {end}");
        }
    }
}

fn delete_event(k: &str) -> Result<Event> {
    Ok(Event::Delete {
        key: Key::new(k).unwrap(),
        revision: 7,
    })
}

#[tokio::test]
async fn a_watch_never_ends_silently() {
    let fake = Arc::new(Fake::default());
    *fake.watch_items.lock().unwrap() = vec![delete_event("a")];
    let kv = layered(fake.clone());
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    assert!(matches!(w.next().await, Some(Ok(Event::Delete { .. }))));
    let end = w.next().await.expect("an error item, not a silent end");
    assert_eq!(end.unwrap_err().kind(), ErrorKind::Unavailable);
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn a_watch_that_ends_after_its_error_ends_cleanly() {
    let fake = Arc::new(Fake::default());
    let compacted = Err(Error::Compacted {
        backend: "fake",
        revision: 1,
        oldest: 5,
    });
    *fake.watch_items.lock().unwrap() = vec![delete_event("a"), compacted];
    let kv = layered(fake.clone());
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::After(1))
        .await
        .unwrap();
    assert!(matches!(w.next().await, Some(Ok(_))));
    assert_eq!(
        w.next().await.unwrap().unwrap_err().kind(),
        ErrorKind::Compacted
    );
    assert!(
        w.next().await.is_none(),
        "no extra error after the driver's own"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_liveness_subscriber_never_slows_operations() {
    let fake = Arc::new(Fake::default());
    let kv = layered(fake.clone());
    let _never_polled = kv.liveness().subscribe();
    let started = Instant::now();
    for _ in 0..1000 {
        kv.get(&k()).await.unwrap();
    }
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no operation waited on the subscriber"
    );
}

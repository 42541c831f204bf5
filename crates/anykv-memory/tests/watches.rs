//! Watch routing, snapshot and compact on the memory driver (the checks
//! themselves are shared with anykv-redb: `anykv_testkit::embedded`).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::sync::Arc;

use anykv_core::Store;
use anykv_memory::MemoryStore;
use anykv_testkit::embedded as cases;

fn store() -> (Arc<dyn Store>, cases::Count) {
    let s = MemoryStore::new(100_000);
    let counted = s.clone();
    (s, Arc::new(move || counted.watch_count()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_is_the_state_at_its_revision() {
    cases::snapshot_is_the_state_at_its_revision(store().0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_then_watch_from_below_is_compacted() {
    cases::compact_then_watch_from_below(store().0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_watch_past_compaction_is_compacted() {
    cases::detached_watch_past_compaction_is_compacted(store().0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watches_each_get_exactly_their_events() {
    cases::many_watches_each_get_exactly_their_events(store().0, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_watch_delays_nobody() {
    let (s, count) = store();
    cases::slow_watch_delays_nobody(s, count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watch_removes_it() {
    let (s, count) = store();
    cases::dropping_a_watch_removes_it(s, count).await;
}

/// A short history: a slow watch whose events fell out of the log ends
/// with `Compacted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_watch_beyond_the_log_is_compacted() {
    let s: Arc<dyn Store> = MemoryStore::new(50);
    let mut w = s
        .watch(
            anykv_core::Target::Prefix(cases::prefix("x")),
            anykv_core::Start::Now,
        )
        .await
        .unwrap();
    for i in 0..300 {
        s.put(
            &cases::key(&format!("x/{i}")),
            "v".into(),
            Default::default(),
        )
        .await
        .unwrap();
    }
    use futures::StreamExt;
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap();
    let err = first.expect_err("the log lost the detached part");
    assert_eq!(err.kind(), anykv_core::ErrorKind::Compacted, "{err}");
}

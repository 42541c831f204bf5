//! Watch routing, snapshot and compact on the redb driver (the checks are
//! shared with anykv-memory: `anykv_testkit::embedded`), plus the compacted point surviving a reopen.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{path::Path, sync::Arc};

use anykv_core::{ErrorKind, Start, Store, Target};
use anykv_redb::{RedbStore, Settings};
use anykv_testkit::embedded as cases;

async fn open(path: &Path) -> Arc<RedbStore> {
    let settings = Settings {
        history: 100_000,
        ..Settings::default()
    };
    Arc::new(RedbStore::open(path, settings).await.unwrap())
}

async fn store(dir: &tempfile::TempDir) -> (Arc<dyn Store>, cases::Count) {
    let s = open(&dir.path().join("w.redb")).await;
    let counted = s.clone();
    (s, Arc::new(move || counted.watch_count()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_is_the_state_at_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    cases::snapshot_is_the_state_at_its_revision(store(&dir).await.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_then_watch_from_below_is_compacted_and_stays_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.redb");
    let at = {
        let s = open(&path).await;
        let at = cases::compact_then_watch_from_below(s.clone()).await;
        s.close().await.unwrap();
        at
    };
    let s = open(&path).await;
    let err = s
        .watch(Target::Key(cases::key("cp/k")), Start::After(at - 1))
        .await
        .err()
        .expect("the compacted point survives a reopen");
    assert_eq!(err.kind(), ErrorKind::Compacted, "{err}");
    s.compact(at).await.unwrap();
    let _resumes = s
        .watch(Target::Key(cases::key("cp/k")), Start::After(at))
        .await
        .unwrap();
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_watch_past_compaction_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    cases::detached_watch_past_compaction_is_compacted(store(&dir).await.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watches_each_get_exactly_their_events() {
    let dir = tempfile::tempdir().unwrap();
    cases::many_watches_each_get_exactly_their_events(store(&dir).await.0, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_watch_delays_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let (s, count) = store(&dir).await;
    cases::slow_watch_delays_nobody(s, count).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watch_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (s, count) = store(&dir).await;
    cases::dropping_a_watch_removes_it(s, count).await;
}

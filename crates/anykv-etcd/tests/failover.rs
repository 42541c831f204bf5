//! Failover on the three-member cluster started by `cargo xtask test`: the
//! member serving our watch is killed (SIGKILL) in the middle of a stream of
//! writes; writes go on through the other two members and the watch resumes
//! by itself without gap or duplicate, as a replay of the history proves.
//!
//! The killed member stays down for the rest of the run (the cluster keeps
//! its quorum with two), so this binary holds this one test only.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{collections::HashSet, time::Duration};

use anykv_core::{Event, Key, Prefix, PutOptions, Start, Store, Target, Version};
use anykv_etcd as _;
use futures::StreamExt;
use tokio::time::{Instant, timeout};

const WRITES: usize = 60;
const KILL_AT: usize = 20;
const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_watch_survive_killing_the_watch_member() {
    let Some(url) = common::url("ANYKV_TEST_ETCD_CLUSTER") else {
        return;
    };
    let pids: Vec<String> = common::companion("ANYKV_TEST_ETCD_CLUSTER_PIDS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let endpoints = common::endpoints(&url);
    assert_eq!(pids.len(), endpoints.len(), "one PID per endpoint");
    assert!(
        pids.iter().all(|p| alive(p)),
        "every cluster member must be up before the failover test (it kills one; rerun `cargo xtask test`)"
    );

    let ns = common::unique("failover");
    // Short attempts, more retries: an election may take a few seconds.
    let kv = common::open(&url, &ns, "timeout=2s&retries=8").await;
    let r0 = kv
        .put(
            &Key::new("start").unwrap(),
            "0".into(),
            PutOptions::default(),
        )
        .await
        .expect("first put")
        .get();

    let mut before = Vec::new();
    for e in &endpoints {
        before.push(common::metric(e, WATCHERS).await.unwrap_or(0.0));
    }
    let mut watch = kv
        .watch(Target::Prefix(Prefix::root()), Start::After(r0))
        .await
        .expect("watch");
    // The member that gained a watcher serves our stream.
    let mut victim = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while victim.is_none() && Instant::now() < deadline {
        for (i, e) in endpoints.iter().enumerate() {
            if common::metric(e, WATCHERS).await.unwrap_or(0.0) > before[i] {
                victim = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let victim = victim.expect("no member reports our watcher");
    eprintln!(
        "failover: watch served by {} (pid {}); killing it after {KILL_AT} writes",
        endpoints[victim], pids[victim]
    );

    let writer = {
        let kv = kv.clone();
        let pid = pids[victim].clone();
        tokio::spawn(async move {
            let mut written: Vec<(String, Version)> = Vec::new();
            let mut failed_attempts = 0;
            for i in 0..WRITES {
                if i == KILL_AT {
                    let status = std::process::Command::new("kill")
                        .args(["-KILL", &pid])
                        .status()
                        .expect("kill");
                    assert!(status.success(), "kill -KILL {pid}");
                }
                let key = Key::new(format!("k/{i:03}")).unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                let version = loop {
                    match kv
                        .put(&key, format!("v{i}").into(), PutOptions::default())
                        .await
                    {
                        Ok(v) => break v,
                        Err(e) if Instant::now() < deadline => {
                            failed_attempts += 1;
                            eprintln!("failover: put {key} failed ({e}); retrying");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("put {key} did not succeed within 30 s: {e}"),
                    }
                };
                written.push((key.to_string(), version));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (written, failed_attempts)
        })
    };

    // Read the watch until the last write shows up.
    let mut seen: Vec<(String, u64)> = Vec::new();
    let last_key = format!("k/{:03}", WRITES - 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.last().map(|(k, _)| k.as_str()) != Some(last_key.as_str()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, watch.next()).await {
            Err(_) => panic!("watch stalled; saw {} events", seen.len()),
            Ok(None) => panic!("watch ended after {} events", seen.len()),
            // An outage longer than the timeout is reported, and the stream goes on.
            Ok(Some(Err(e))) => eprintln!("failover: watch reported {e}"),
            Ok(Some(Ok(Event::Put { kv, .. }))) => seen.push((kv.key.to_string(), kv.mod_revision)),
            Ok(Some(Ok(ev))) => panic!("unexpected event {ev:?}"),
        }
    }
    let (written, failed_attempts) = writer.await.expect("writer");
    eprintln!(
        "failover: {} writes, {failed_attempts} failed attempts, {} events",
        written.len(),
        seen.len()
    );

    // No duplicate, in order.
    for pair in seen.windows(2) {
        assert!(
            pair[0].1 < pair[1].1,
            "events out of order or duplicated: {pair:?}"
        );
    }
    // Every acknowledged write was seen at its version (= mod revision).
    let seen_set: HashSet<(String, u64)> = seen.iter().cloned().collect();
    for (k, v) in &written {
        assert!(
            seen_set.contains(&(k.clone(), v.get())),
            "write {k}@{v} missing from the watch"
        );
    }
    // No gap: a replay of the same history from the surviving members is
    // exactly what the watch delivered across the failover.
    let mut replay = kv
        .watch(Target::Prefix(Prefix::root()), Start::After(r0))
        .await
        .expect("replay watch");
    let mut history = Vec::new();
    while history.len() < seen.len() {
        match timeout(Duration::from_secs(15), replay.next()).await {
            Ok(Some(Ok(Event::Put { kv, .. }))) => {
                history.push((kv.key.to_string(), kv.mod_revision))
            }
            other => panic!("replay: {other:?}"),
        }
    }
    assert_eq!(seen, history, "the failover watch differs from the history");

    // The store still answers through the two survivors.
    kv.probe().await.expect("probe after failover");
    let listed = kv.list(&Prefix::new("k").unwrap()).await.expect("list");
    assert_eq!(listed.len(), WRITES);
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

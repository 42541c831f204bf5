//! Failover on the three-member cluster started by `cargo xtask test`.
//!
//! Twice, the member serving our watch fails in the middle of a stream of
//! writes: first it hangs (SIGSTOP, found by HTTP/2 pings; SIGCONT after),
//! then it dies (SIGKILL). Each time the writes go on through the other
//! members and the watch resumes by itself without gap or duplicate, as a
//! replay of the history proves.
//!
//! The killed member stays down for the rest of the run (the cluster keeps
//! its quorum with two), so this binary holds this one test only.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{collections::HashSet, time::Duration};

use anykv_core::{Event, Key, Kv, Prefix, PutOptions, Start, Store, Target, Version};
use anykv_etcd as _;
use futures::StreamExt;
use tokio::time::{Instant, timeout};

const WRITES: usize = 60;
const FAIL_AT: usize = 20;
const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn signal(pid: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_owned()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

struct Cluster {
    url: String,
    endpoints: Vec<String>,
    pids: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_watch_survive_a_hung_then_a_killed_member() {
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
    let cluster = Cluster {
        url,
        endpoints,
        pids,
    };
    // Hung: the member's connections stay open and silent.
    let hung = phase(&cluster, "STOP").await;
    signal(&cluster.pids[hung], "CONT");
    // Let it catch up before the next phase needs a quorum without another member.
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::metric(&cluster.endpoints[hung], WATCHERS)
        .await
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the resumed member does not answer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Dead: connections refused from now on.
    phase(&cluster, "KILL").await;
}

/// Writes while the member serving a watch gets `sig`; checks that the
/// writes and the watch went on. Returns the member's index.
async fn phase(cluster: &Cluster, sig: &str) -> usize {
    let ns = common::unique(&format!("failover-{}", sig.to_lowercase()));
    // Short attempts, more retries: an election may take a few seconds.
    let kv = common::open(&cluster.url, &ns, "timeout=2s&retries=8").await;
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
    for e in &cluster.endpoints {
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
        for (i, e) in cluster.endpoints.iter().enumerate() {
            if common::metric(e, WATCHERS).await.unwrap_or(0.0) > before[i] {
                victim = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let victim = victim.expect("no member reports our watcher");
    eprintln!(
        "failover[{sig}]: watch served by {} (pid {}); signalled after {FAIL_AT} writes",
        cluster.endpoints[victim], cluster.pids[victim]
    );

    let writer = tokio::spawn(write_all(
        kv.clone(),
        cluster.pids[victim].clone(),
        sig.to_owned(),
    ));

    // Read the watch until the last write shows up.
    let started = Instant::now();
    let mut seen: Vec<(String, u64)> = Vec::new();
    let last_key = format!("k/{:03}", WRITES - 1);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.last().map(|(k, _)| k.as_str()) != Some(last_key.as_str()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, watch.next()).await {
            Err(_) => panic!("watch stalled; saw {} events", seen.len()),
            Ok(None) => panic!("watch ended after {} events", seen.len()),
            // An outage longer than the timeout is reported, and the stream goes on.
            Ok(Some(Err(e))) => eprintln!("failover[{sig}]: watch reported {e}"),
            Ok(Some(Ok(Event::Put { kv, .. }))) => seen.push((kv.key.to_string(), kv.mod_revision)),
            Ok(Some(Ok(ev))) => panic!("unexpected event {ev:?}"),
        }
    }
    let (written, failed_attempts) = writer.await.expect("writer");
    eprintln!(
        "failover[{sig}]: {} writes, {failed_attempts} failed attempts, {} events in {:?}",
        written.len(),
        seen.len(),
        started.elapsed()
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

    // The store still answers through the survivors.
    kv.probe().await.expect("probe after failover");
    let listed = kv.list(&Prefix::new("k").unwrap()).await.expect("list");
    assert_eq!(listed.len(), WRITES);
    let _ = kv.delete_prefix(&Prefix::root()).await;
    victim
}

/// Writes `WRITES` keys one after the other, each retried until it succeeds
/// (30 s at most), sending `sig` to `pid` before write `FAIL_AT`.
async fn write_all(kv: Kv, pid: String, sig: String) -> (Vec<(String, Version)>, usize) {
    let mut written = Vec::new();
    let mut failed_attempts = 0;
    for i in 0..WRITES {
        if i == FAIL_AT {
            signal(&pid, &sig);
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
                    eprintln!("failover[{sig}]: put {key} failed ({e}); retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("put {key} did not succeed within 30 s: {e}"),
            }
        };
        written.push((key.to_string(), version));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (written, failed_attempts)
}

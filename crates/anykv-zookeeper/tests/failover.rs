//! Failover on the three-server ensemble (`ANYKV_TEST_ZK_ENSEMBLE`): the
//! server the store's session is connected to is stopped (SIGSTOP, resumed
//! at the end); operations and an open watch continue through the others.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::time::{Duration, Instant};

use anykv_core::{Event, Key, Prefix, PutOptions, Start, Store, Target};
use futures::StreamExt;

/// Resumes a stopped server when dropped, also when the test fails.
struct Resume(String);

impl Drop for Resume {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(&self.0)
            .status();
    }
}

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn event_for(w: &mut anykv_core::WatchStream, k: &str, within: Duration) -> Event {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, w.next()).await {
            Ok(Some(Ok(e))) if e.key().as_str() == k => return e,
            Ok(Some(Ok(_))) => continue,
            other => panic!("waiting for an event on {k}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_connected_server_keeps_operations_and_watches_going() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(url) = common::url("ANYKV_TEST_ZK_ENSEMBLE") else {
        return;
    };
    let pids: Vec<String> = common::companion("ANYKV_TEST_ZK_ENSEMBLE_PIDS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let endpoints = common::endpoints(&url);
    assert_eq!(pids.len(), endpoints.len());
    let ns = common::unique("failover");
    let (store, kv) = common::open_driver(&url, &ns, "session_timeout=6s&timeout=3s").await;
    kv.put(&key("f/before"), "0".into(), PutOptions::default())
        .await
        .unwrap();
    let mut w = kv
        .watch(Target::Prefix(Prefix::new("f").unwrap()), Start::Now)
        .await
        .unwrap();

    // Which server holds our session?
    let sid = format!("sid=0x{:x}", store.session_id());
    let mut member = None;
    for (i, ep) in endpoints.iter().enumerate() {
        if common::four_letter(ep, "cons").await.contains(&sid) {
            member = Some(i);
        }
    }
    let member = member.unwrap_or_else(|| panic!("no ensemble server lists {sid}"));
    eprintln!(
        "stopping {} (pid {}), which serves {sid}",
        endpoints[member], pids[member]
    );
    common::signal(&pids[member], "STOP");
    let resume = Resume(pids[member].clone());

    // Writes go through once the client has moved to another server (and,
    // if the stopped server led, once the others elected a new leader).
    let started = Instant::now();
    loop {
        match kv
            .put(&key("f/after"), "1".into(), PutOptions::default())
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    e.indicates_unreachable(),
                    "only unreachable errors meanwhile: {e}"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no write went through: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!("write went through after {:?}", started.elapsed());
    let e = event_for(&mut w, "f/after", Duration::from_secs(60)).await;
    assert!(matches!(e, Event::Put { .. }), "{e:?}");
    assert_eq!(
        &kv.get(&key("f/before")).await.unwrap().unwrap().value[..],
        b"0",
        "data written before the failover is there"
    );
    kv.put(&key("f/later"), "2".into(), PutOptions::default())
        .await
        .unwrap();
    let e = event_for(&mut w, "f/later", Duration::from_secs(30)).await;
    assert!(matches!(e, Event::Put { .. }), "{e:?}");
    assert!(
        kv.delete(&key("f/before"), anykv_core::Condition::Always)
            .await
            .unwrap()
    );
    let e = event_for(&mut w, "f/before", Duration::from_secs(30)).await;
    assert!(matches!(e, Event::Delete { .. }), "{e:?}");
    let listed = common::key_names(&kv, &Prefix::root()).await;
    assert_eq!(listed, ["f/after", "f/later"]);
    let holder = kv
        .try_lock(&key("l"), Default::default())
        .await
        .unwrap()
        .expect("locks work after the failover");
    holder.release().await.unwrap();

    kv.delete_prefix(&Prefix::root()).await.unwrap();

    // Once the server is back, the ensemble and the store keep serving
    // (connections may move again while it rejoins).
    drop(resume);
    let back = Instant::now();
    while let Err(e) = kv.probe().await {
        assert!(e.indicates_unreachable(), "{e}");
        assert!(back.elapsed() < Duration::from_secs(60), "no recovery: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

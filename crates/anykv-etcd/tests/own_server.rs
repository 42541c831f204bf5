//! Tests that stop and restart a server: they run an etcd of their own
//! (ANYKV_ETCD_BIN, exported by `cargo xtask test`) so the shared servers
//! stay up for everything else.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anykv_core::{Event, Key, LockOptions, Prefix, PutOptions, Start, Store, Target};
use anykv_etcd as _;
use futures::StreamExt;
use tokio::time::{Instant, timeout};

/// A single-member etcd on fixed ports and data dir, so it can be restarted
/// with its data. Killed when dropped.
struct Etcd {
    bin: String,
    data: tempfile::TempDir,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl Etcd {
    async fn start(bin: String) -> Etcd {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let mut e = Etcd {
            bin,
            data: tempfile::tempdir().unwrap(),
            client: port(),
            peer: port(),
            child: None,
        };
        e.restart().await;
        e
    }

    fn url(&self, ns: &str, query: &str) -> String {
        format!("etcd://127.0.0.1:{}/{ns}?{query}", self.client)
    }

    async fn restart(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let data: &Path = self.data.path();
        let child = Command::new(&self.bin)
            .arg("--name=own")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=own={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let endpoint = format!("127.0.0.1:{}", self.client);
        let deadline = Instant::now() + Duration::from_secs(30);
        while common::metric(&endpoint, "etcd_server_has_leader").await != Some(1.0) {
            assert!(Instant::now() < deadline, "own etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bin() -> Option<String> {
    common::url("ANYKV_TEST_ETCD")?;
    Some(common::companion("ANYKV_ETCD_BIN"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_without_gap_after_the_server_restarts() {
    let Some(bin) = bin() else { return };
    let mut etcd = Etcd::start(bin).await;
    let kv = anykv_core::open(&etcd.url("w", "timeout=1s"))
        .await
        .unwrap();
    let mut w = kv
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        let k = Key::new(format!("k{i}")).unwrap();
        written.push(
            kv.put(&k, "before".into(), PutOptions::default())
                .await
                .unwrap()
                .get(),
        );
    }
    // Read the first two, then lose the server for longer than the timeout.
    let mut seen = Vec::new();
    for _ in 0..2 {
        match timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(e))) => seen.push(e.revision()),
            other => panic!("{other:?}"),
        }
    }
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart().await;
    for i in 5..10 {
        let k = Key::new(format!("k{i}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let v = loop {
            match kv.put(&k, "after".into(), PutOptions::default()).await {
                Ok(v) => break v,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("put after restart: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        written.push(v.get());
    }
    let mut reported = 0;
    while seen.len() < written.len() {
        match timeout(Duration::from_secs(20), w.next()).await {
            Ok(Some(Ok(Event::Put { kv, .. }))) => seen.push(kv.mod_revision),
            // The outage (longer than the timeout) is reported once; the stream goes on.
            Ok(Some(Err(e))) => {
                assert!(e.indicates_unreachable(), "{e}");
                reported += 1;
            }
            other => panic!("after {seen:?}: {other:?}"),
        }
    }
    assert_eq!(seen, written, "gap or duplicate across the restart");
    assert!(reported <= 1, "the outage was reported {reported} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_is_lost_when_its_lease_cannot_be_renewed() {
    let Some(bin) = bin() else { return };
    let mut etcd = Etcd::start(bin).await;
    let kv = anykv_core::open(&etcd.url("l", "timeout=1s"))
        .await
        .unwrap();
    let opts = LockOptions {
        ttl: Duration::from_secs(3),
        ..LockOptions::default()
    };
    let guard = kv.lock(&Key::new("job").unwrap(), opts).await.unwrap();
    let lost = guard.lost();
    etcd.kill();
    let t = Instant::now();
    timeout(Duration::from_secs(6), lost)
        .await
        .expect("lost() did not fire although the lease could not be renewed");
    // By the time the lease runs out on the server (3 s), give or take a renewal.
    assert!(t.elapsed() <= Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(guard.is_lost());
    // Releasing needs the server; it fails as unreachable, without hanging.
    let e = timeout(Duration::from_secs(5), guard.release())
        .await
        .expect("release hung")
        .unwrap_err();
    assert!(e.indicates_unreachable(), "{e}");
}

//! Each example, run end to end against `memory://` (and migrate against a
//! redb file), through the same `run` function its `main` calls, bounded in
//! time so that a hang fails instead of stalling CI.

use std::time::Duration;

use anykv::{Prefix, Store};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

// The examples are binaries; including their files as modules runs their
// code itself (their `main` is unused here).
#[allow(dead_code)]
#[path = "../chaos_test.rs"]
mod chaos_test;
#[allow(dead_code)]
#[path = "../config_watcher.rs"]
mod config_watcher;
#[allow(dead_code)]
#[path = "../leader_worker.rs"]
mod leader_worker;
#[allow(dead_code)]
#[path = "../metrics.rs"]
mod metrics;
#[allow(dead_code)]
#[path = "../migrate.rs"]
mod migrate;
#[allow(dead_code)]
#[path = "../service_registry.rs"]
mod service_registry;

#[tokio::test]
async fn config_watcher_applies_changes_and_rejects_a_bad_document() {
    let out = timeout(
        Duration::from_secs(30),
        config_watcher::run("memory://test-config-watcher", true),
    )
    .await
    .expect("bounded")
    .expect("runs");
    // web updated, worker fixed, worker deleted; the broken one rejected.
    assert_eq!(out.reloads, 3, "{out:?}");
    assert_eq!(out.rejected, 1, "{out:?}");
    let web = out.current.get("web").expect("web configured");
    assert_eq!(web.max_connections, 128);
    assert_eq!(web.features, vec!["http2".to_owned()]);
    assert!(!out.current.contains_key("worker"), "{out:?}");
}

#[tokio::test]
async fn leader_worker_does_all_the_work_under_increasing_tokens() {
    let url = "memory://test-leader-worker";
    let sessions = anykv::open(url)
        .await
        .expect("opens")
        .capabilities()
        .sessions
        .is_some();
    let settings = leader_worker::Settings {
        workers: 3,
        units: 10,
        per_term: 3,
    };
    let out = timeout(Duration::from_secs(60), leader_worker::run(url, settings))
        .await
        .expect("bounded")
        .expect("runs");
    let expected = if sessions {
        leader_worker::Mode::Election
    } else {
        leader_worker::Mode::Lock
    };
    assert_eq!(out.mode, expected);
    assert_eq!(out.done, 10);
    // 10 units at 3 per leadership: at least 4 leaderships, each with a
    // strictly greater token than the one before.
    assert!(out.tokens.len() >= 4, "{out:?}");
    assert!(out.tokens.windows(2).all(|w| w[0] < w[1]), "{out:?}");
}

/// A store without sessions: another store's operations, with sessions
/// left out of its capabilities, for the examples' fallback modes (a
/// backend whose driver has no sessions yet).
struct NoSessions {
    inner: anykv::Kv,
    caps: anykv::Capabilities,
}

impl NoSessions {
    async fn open(url: &str) -> anykv::Kv {
        let inner = anykv::open(url).await.expect("opens");
        let caps = inner.capabilities().clone().with_sessions(None, false);
        anykv::Kv::builder_for(std::sync::Arc::new(NoSessions { inner, caps })).build()
    }
}

#[anykv::async_trait]
impl Store for NoSessions {
    fn backend(&self) -> &'static str {
        "no-sessions"
    }
    fn capabilities(&self) -> &anykv::Capabilities {
        &self.caps
    }
    async fn get(&self, key: &anykv::Key) -> anykv::Result<Option<anykv::KvPair>> {
        self.inner.get(key).await
    }
    async fn put(
        &self,
        key: &anykv::Key,
        value: anykv::Bytes,
        opts: anykv::PutOptions,
    ) -> anykv::Result<anykv::Version> {
        self.inner.put(key, value, opts).await
    }
    async fn delete(&self, key: &anykv::Key, condition: anykv::Condition) -> anykv::Result<bool> {
        self.inner.delete(key, condition).await
    }
    async fn list(&self, prefix: &Prefix) -> anykv::Result<Vec<anykv::KvPair>> {
        self.inner.list(prefix).await
    }
    async fn delete_prefix(&self, prefix: &Prefix) -> anykv::Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn watch(
        &self,
        target: anykv::Target,
        start: anykv::Start,
    ) -> anykv::Result<anykv::WatchStream> {
        self.inner.watch(target, start).await
    }
    async fn lock(
        &self,
        key: &anykv::Key,
        opts: anykv::LockOptions,
    ) -> anykv::Result<anykv::LockGuard> {
        self.inner.lock(key, opts).await
    }
    async fn snapshot(&self, prefixes: &[Prefix]) -> anykv::Result<anykv::Snapshot> {
        self.inner.snapshot(prefixes).await
    }
    async fn probe(&self) -> anykv::Result<()> {
        self.inner.probe().await
    }
}

#[tokio::test]
async fn leader_worker_falls_back_to_a_fenced_lock_without_sessions() {
    let kv = NoSessions::open("memory://test-leader-worker-lock").await;
    let settings = leader_worker::Settings {
        workers: 3,
        units: 7,
        per_term: 2,
    };
    let out = timeout(Duration::from_secs(60), leader_worker::run_on(kv, settings))
        .await
        .expect("bounded")
        .expect("runs");
    assert_eq!(out.mode, leader_worker::Mode::Lock);
    assert_eq!(out.done, 7);
    assert!(out.tokens.len() >= 4, "{out:?}");
    assert!(out.tokens.windows(2).all(|w| w[0] < w[1]), "{out:?}");
}

#[tokio::test]
async fn service_registry_falls_back_to_ttl_keys_without_sessions() {
    let kv = NoSessions::open("memory://test-service-registry-ttl").await;
    let out = timeout(
        Duration::from_secs(30),
        service_registry::run_on(kv, 3, Duration::from_millis(600)),
    )
    .await
    .expect("bounded")
    .expect("runs");
    assert_eq!(out.mode, service_registry::Mode::Ttl);
    assert_eq!(out.most, 3, "{out:?}");
    assert_eq!(out.remaining, vec!["web-2".to_owned()], "{out:?}");
}

#[tokio::test]
async fn service_registry_sees_instances_join_leave_and_crash() {
    let out = timeout(
        Duration::from_secs(30),
        service_registry::run(
            "memory://test-service-registry",
            3,
            Duration::from_millis(600),
        ),
    )
    .await
    .expect("bounded")
    .expect("runs");
    assert_eq!(out.most, 3, "{out:?}");
    assert_eq!(out.remaining, vec!["web-2".to_owned()], "{out:?}");
}

#[tokio::test]
async fn migrate_copies_a_prefix_to_memory_and_to_redb() {
    let prefix = Prefix::new("demo").expect("prefix");
    // Named memory stores live while a handle does: hold both ends.
    let src = anykv::open("memory://test-migrate-src")
        .await
        .expect("opens");
    migrate::seed(&src, &prefix, 300).await.expect("seeds");
    anykv::StoreExt::set(&src, "elsewhere/x", "not copied")
        .await
        .expect("writes");
    let dst = anykv::open("memory://test-migrate-dst")
        .await
        .expect("opens");

    let out = timeout(
        Duration::from_secs(60),
        migrate::run(
            "memory://test-migrate-src",
            "memory://test-migrate-dst",
            &prefix,
            indicatif::ProgressBar::hidden(),
        ),
    )
    .await
    .expect("bounded")
    .expect("copies");
    assert_eq!(out.copied, 300);
    assert!(out.snapshot_revision.is_some(), "memory declares snapshot");
    let copied = dst.list(&prefix).await.expect("lists");
    assert_eq!(
        copied,
        src.list(&prefix)
            .await
            .expect("lists")
            .into_iter()
            .map(|mut p| {
                // Versions and revisions are the destination's own.
                let d = copied.iter().find(|c| c.key == p.key).expect("copied");
                p.version = d.version;
                p.create_revision = d.create_revision;
                p.mod_revision = d.mod_revision;
                p
            })
            .collect::<Vec<_>>()
    );
    assert!(
        dst.list(&Prefix::new("elsewhere").expect("prefix"))
            .await
            .expect("lists")
            .is_empty()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("copy.redb");
    let url = format!("redb://{}", file.display());
    let out = timeout(
        Duration::from_secs(60),
        migrate::run(
            "memory://test-migrate-src",
            &url,
            &prefix,
            indicatif::ProgressBar::hidden(),
        ),
    )
    .await
    .expect("bounded")
    .expect("copies");
    assert_eq!(out.copied, 300);
    let redb = anykv::open(&url).await.expect("reopens");
    assert_eq!(redb.list(&prefix).await.expect("lists").len(), 300);
}

#[tokio::test]
async fn chaos_test_places_every_order_once_through_faults_and_an_outage() {
    let out = timeout(
        Duration::from_secs(60),
        chaos_test::run("memory://test-chaos", 0.2, 100, 7),
    )
    .await
    .expect("bounded")
    .expect("the application survives the faults");
    assert_eq!(out.stored, 100, "{out:?}");
    assert_eq!(out.placed, 101, "{out:?}");
    assert!(out.injected > 0, "{out:?}");
    assert!(
        out.app_retries > 0,
        "writes failed and were retried: {out:?}"
    );
    assert_eq!(out.outage_error, Some(anykv::ErrorKind::Unavailable));
    // Alive, then not while unreachable, then alive again.
    let falls = out.liveness.iter().position(|a| !a).expect("went false");
    assert!(out.liveness[falls..].contains(&true), "{out:?}");
}

/// One HTTP/1.1 GET; returns the status line and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).await.expect("connects");
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .expect("sends");
    let mut response = String::new();
    conn.read_to_string(&mut response).await.expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn metrics_serves_prometheus_text_on_slash_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("addr");
    let until = metrics::Until {
        scrapes: Some(2),
        duration: Some(Duration::from_secs(30)),
    };
    let server = tokio::spawn(metrics::run("memory://test-metrics", listener, until));

    // Let the workload run a few rounds first.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _) = timeout(Duration::from_secs(10), get(addr, "/"))
        .await
        .expect("bounded");
    assert!(status.contains("404"), "{status}");
    let (status, _) = timeout(Duration::from_secs(10), get(addr, "/metrics"))
        .await
        .expect("bounded");
    assert!(status.contains("200"), "{status}");
    let (_, body) = timeout(Duration::from_secs(10), get(addr, "/metrics"))
        .await
        .expect("bounded");
    for needle in [
        r#"anykv_operations_total{backend="memory",operation="put",outcome="ok"}"#,
        r#"anykv_operations_total{backend="memory",operation="delete",outcome="not_found"}"#,
        r#"anykv_operation_duration_seconds_bucket{backend="memory",operation="get""#,
        r#"anykv_alive{backend="memory"} 1"#,
        r#"anykv_open_watches{backend="memory"} 1"#,
        r#"anykv_held_locks{backend="memory"} 1"#,
    ] {
        assert!(body.contains(needle), "{needle} missing from:\n{body}");
    }
    let scrapes = timeout(Duration::from_secs(10), server)
        .await
        .expect("stops after two scrapes")
        .expect("joins")
        .expect("serves");
    assert_eq!(scrapes, 2);
}

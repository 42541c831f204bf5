//! Mirrors across a server restart and across a partition during which the
//! prefix changes (and, on etcd, its history is compacted), on each real
//! server backend. Each test starts a server of its own (anykv-servers, the
//! binaries `cargo xtask test` provisions) so the shared servers stay up.
//!
//! Without provisioned binaries the tests skip, unless `ANYKV_REQUIRE_SERVERS=1`
//! (`cargo xtask test`), which makes a missing server a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{net::SocketAddr, time::Duration};

use anykv::{Condition, Key, Kv, Mirror, Prefix, PutOptions, Store, StoreExt};
use anykv_servers::{Cluster, Ctx};
use anykv_testkit::proxy::{Mode, Proxy};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(60);

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

async fn server(backend: &str, name: &str) -> Option<(Cluster, Ctx)> {
    tokio::task::block_in_place(|| anykv_tests::single_node(backend, &format!("mirror-{name}")))
}

async fn open(url: &str) -> Kv {
    anykv::open(url).await.unwrap()
}

/// Polls until the mirror equals a fresh `list` of its prefix (and is
/// synced), or panics after `LIMIT`.
async fn converges(what: &str, kv: &Kv, m: &Mirror) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let want = kv.list(m.prefix()).await.ok();
        if m.is_synced() && want.as_ref() == Some(&m.list(&Prefix::root())) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: mirror {:?} != store {want:?}",
            m.list(&Prefix::root())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn put(kv: &Kv, k: &str, v: &str) -> u64 {
    kv.put(&key(k), v.to_owned().into(), PutOptions::default())
        .await
        .unwrap()
        .get()
}

/// Kill the server under a running mirror, restart it on its data, write:
/// the mirror reports the outage (not synced), then converges.
async fn survives_a_restart(backend: &str) {
    let Some((mut cluster, _ctx)) = server(backend, &format!("{backend}-restart")).await else {
        return;
    };
    let url = cluster.url("timeout=1s");
    let (kv, writer) = (open(&url).await, open(&url).await);
    put(&writer, "m/a", "1").await;
    put(&writer, "m/b", "1").await;
    let m = kv.mirror(&Prefix::new("m").unwrap()).await.unwrap();
    assert_eq!(m.len(), 2);

    tokio::task::block_in_place(|| cluster.kill(0)).unwrap();
    let deadline = Instant::now() + LIMIT;
    while m.is_synced() {
        assert!(
            Instant::now() < deadline,
            "the mirror never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        m.len(),
        2,
        "reads answer from the last state during the outage"
    );
    tokio::task::block_in_place(|| {
        cluster.restart(0)?;
        cluster.wait_all_ready(LIMIT)
    })
    .unwrap();
    // Retry: the writer's connection may still be coming back.
    let deadline = Instant::now() + LIMIT;
    let last = loop {
        match writer
            .put(&key("m/c"), "1".into(), PutOptions::default())
            .await
        {
            Ok(v) => break v.get(),
            Err(e) => {
                assert!(Instant::now() < deadline, "writer never came back: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    writer.delete(&key("m/a"), Condition::Always).await.unwrap();
    tokio::time::timeout(LIMIT, m.wait_for(last))
        .await
        .expect("wait_for after the restart")
        .unwrap();
    converges("after a restart", &writer, &m).await;
    assert!(m.get(&key("m/a")).is_none() && m.get(&key("m/c")).is_some());
}

/// Cut the mirror's connection (a proxy in front of the server), change the
/// prefix from another handle — deletes included, and on etcd compact the
/// history the mirror would resume from — then heal: the mirror converges,
/// and its changes report the differences.
async fn survives_a_partition_and_compaction(backend: &str) {
    let Some((cluster, _ctx)) = server(backend, &format!("{backend}-partition")).await else {
        return;
    };
    let direct = cluster.url("timeout=1s");
    let upstream: SocketAddr = format!("127.0.0.1:{}", cluster.members[0].client.listen)
        .parse()
        .unwrap();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    let proxied = direct.replace(
        &format!("127.0.0.1:{}", cluster.members[0].client.listen),
        &proxy.local_addr().to_string(),
    );
    let (kv, writer) = (open(&proxied).await, open(&direct).await);
    for k in ["p/a", "p/b", "p/c"] {
        put(&writer, k, "1").await;
    }
    let m = kv.mirror(&Prefix::new("p").unwrap()).await.unwrap();
    let mut changes = m.changes();

    proxy.set_mode(Mode::Reset);
    writer.delete(&key("p/a"), Condition::Always).await.unwrap();
    put(&writer, "p/b", "2").await;
    let last = put(&writer, "p/d", "1").await;
    if writer.capabilities().compact {
        writer.compact(last).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_mode(Mode::Pass);

    tokio::time::timeout(LIMIT, m.wait_for(last))
        .await
        .expect("wait_for after the partition")
        .unwrap();
    converges("after a partition", &writer, &m).await;
    // The differences came out as changes (an outage item may come first).
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + LIMIT;
    while seen.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, futures::StreamExt::next(&mut changes)).await {
            Ok(Some(Ok(ev))) => {
                seen.insert(ev.key().to_string());
            }
            Ok(Some(Err(_))) => {}
            other => panic!("changes after the partition: {other:?}, seen {seen:?}"),
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["p/a", "p/b", "p/d"],
        "the changes name exactly the keys that changed"
    );
    proxy.stop().await;
}

macro_rules! backend_tests {
    ($($backend:ident),*) => {$(
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mirror_survives_a_server_restart() {
                super::survives_a_restart(stringify!($backend)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mirror_survives_a_partition_and_compaction() {
                super::survives_a_partition_and_compaction(stringify!($backend)).await;
            }
        }
    )*};
}

backend_tests!(etcd, consul, zookeeper);

//! anykv-zookeeper against the raw zookeeper-client, same server, one process.
//!
//! Run with `cargo xtask bench zookeeper` (starts ZooKeeper and sets
//! ANYKV_TEST_ZK).
//!
//! The raw side sends what anykv sends for these operations: `getData` for a
//! get and `setData` (no expected version) for a put of an existing key, on
//! the same znodes. A third side runs the driver alone, without the layers
//! (namespace, timeout, retry, liveness, tracing), to show where overhead
//! lies. The harness is `anykv_testkit::bench`: for each cell (get / put ×
//! concurrency 1 / 64) the sides take turns, round after round (the order
//! rotating), each round a fixed number of operations on 8-byte keys over
//! 1,000 names with 256-byte values, so noise on a shared machine hits every
//! side alike. Prints a markdown table of ops/s, p50/p99 latency and the
//! throughput ratios to raw.
//!
//! A second table measures linearizable reads: anykv with
//! `consistency=linearizable` (a `sync` on the path, then `getData`) against
//! the raw client doing the same two requests, beside the default
//! (sequential) anykv get and the raw `getData`; `lin/seq` is what the
//! option costs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark binary: fail loudly

use std::sync::Arc;

use anykv_core::{Bytes, Prefix, Store};
use anykv_testkit::{
    bench::{self, BoxFuture, Cell, Op, Side, StoreSide},
    server,
};
use anykv_zookeeper::ZkStore;

/// The anykv namespace; raw paths carry it too, so every side touches the
/// same znodes.
const NS: &str = "bench-zk";

/// zookeeper-client, on the znodes anykv writes.
struct Raw {
    client: zookeeper_client::Client,
    paths: Vec<String>,
    value: Bytes,
    /// `sync` on the path before a get, as `consistency=linearizable` does.
    sync: bool,
}

impl Side for Raw {
    fn run(&self, op: Op, i: usize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let path = &self.paths[i];
            if op == Op::Get {
                if self.sync {
                    self.client.sync(path).await.unwrap();
                }
                let (data, _stat) = self.client.get_data(path).await.unwrap();
                assert_eq!(data.len(), bench::VALUE_LEN, "bench key");
            } else {
                self.client.set_data(path, &self.value, None).await.unwrap();
            }
        })
    }
}

fn main() {
    bench::main("ANYKV_TEST_ZK", run);
}

async fn run(url: String) {
    let kv = bench::open(&url, NS).await;
    // The bare driver and the raw client see keys with the namespace.
    let ns_slash = format!("{NS}/");
    let scoped = server::with_query(&url, &format!("prefix={NS}"));
    let (_, config, _) = anykv_core::registry::prepare(&scoped).unwrap();
    let driver = StoreSide::new(ZkStore::open(config).await.unwrap(), &ns_slash);
    let hosts = server::endpoints(&url).join(",");
    let keys = bench::keys(&ns_slash);
    let client = zookeeper_client::Client::connect(&hosts).await.unwrap();
    let raw = |sync| Raw {
        client: client.clone(),
        paths: keys.iter().map(|k| format!("/{k}")).collect(),
        value: bench::value(),
        sync,
    };
    let anykv: Arc<dyn Side> = Arc::new(StoreSide::new(kv.clone(), ""));
    let raw_get: Arc<dyn Side> = Arc::new(raw(false));
    let sides: [(&str, Arc<dyn Side>); 3] = [
        ("anykv", anykv.clone()),
        ("driver", Arc::new(driver)),
        ("raw", raw_get.clone()),
    ];
    let title = format!(
        "anykv-zookeeper vs zookeeper-client 0.11, {}",
        anykv_core::config::redact(&url)
    );
    let cells = bench::get_put([2_000, 8_000], [1_000, 8_000]); // ops per round: under a second
    bench::compare(&title, &sides, &[(0, 2), (1, 2)], &cells, 4).await;

    let linearizable = server::with_query(&url, &format!("prefix={NS}&consistency=linearizable"));
    let lin = anykv_core::open(&linearizable).await.unwrap();
    let sides: [(&str, Arc<dyn Side>); 4] = [
        ("lin", Arc::new(StoreSide::new(lin, ""))),
        ("raw sync+get", Arc::new(raw(true))),
        ("seq", anykv),
        ("raw get", raw_get),
    ];
    let title = "get with sync: anykv consistency=linearizable vs zookeeper-client sync + getData";
    let cells = [Cell::new(Op::Get, 1, 2_000), Cell::new(Op::Get, 64, 8_000)];
    bench::compare(title, &sides, &[(0, 1), (0, 2)], &cells, 4).await;
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

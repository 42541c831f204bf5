//! Cross-crate tests (registry, facade, third-party drivers, mirrors and
//! coordination under faults) and what they share.

use std::{path::Path, time::Duration};

use anykv_servers::{Cluster, Ctx};

/// How long a test waits for a server to start.
pub const SERVER_START: Duration = Duration::from_secs(60);

/// A single-node server of `backend` (`etcd`, `zookeeper`, `consul`) of the
/// test's own, from the binaries `cargo xtask test` provisions; `None` (the
/// test skips) when they are missing, unless `ANYKV_REQUIRE_SERVERS=1`, which
/// makes that a failure. Stopped when the returned values are dropped.
///
/// # Panics
/// When the server cannot start and servers are required.
pub fn single_node(backend: &str, name: &str) -> Option<(Cluster, Ctx)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let required = std::env::var(anykv_testkit::REQUIRE_SERVERS).is_ok_and(|v| v == "1");
    let started = (|| {
        let ctx = Ctx::new(root)?;
        let mut cluster = match backend {
            "etcd" => anykv_servers::etcd::cluster(&ctx, name, 1, false)?,
            "zookeeper" => anykv_servers::zookeeper::cluster(&ctx, name, 1, false)?,
            "consul" => anykv_servers::consul::cluster(&ctx, name, 1, false)?,
            other => anyhow::bail!("no server for {other}"),
        };
        cluster.wait_all_ready(SERVER_START)?;
        anyhow::Ok((cluster, ctx))
    })();
    match started {
        Ok(s) => Some(s),
        Err(e) if !required => {
            eprintln!("skipping: cannot start {backend}: {e:#}");
            None
        }
        Err(e) => panic!("cannot start {backend}: {e:#}"),
    }
}

//! Helpers shared by the ZooKeeper integration tests.
#![allow(dead_code, unused_imports)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{process::Command, sync::Arc, time::Duration};

use anykv_core::{Kv, registry};
use anykv_testkit::server;
pub use anykv_testkit::{
    server::{companion, endpoints, key_names, open_ns as open, with_query},
    server_url as url,
};
use anykv_zookeeper::ZkStore;

/// A namespace no other test or run uses.
pub fn unique(name: &str) -> String {
    server::unique("zk-tests", name)
}

/// The full URL of namespace `ns` on `base` with extra options.
pub fn scoped_url(base: &str, ns: &str, query: &str) -> String {
    let q = if query.is_empty() {
        format!("prefix={ns}")
    } else {
        format!("prefix={ns}&{query}")
    };
    with_query(base, &q)
}

/// Opens the driver itself (to reach its session) and the layered store on it.
pub async fn open_driver(base: &str, ns: &str, query: &str) -> (ZkStore, Kv) {
    let url = scoped_url(base, ns, query);
    let (_, config, layers) = registry::prepare(&url).unwrap();
    let store = ZkStore::open(config).await.unwrap();
    let kv = Kv::new(Arc::new(store.clone()), layers);
    (store, kv)
}

/// A raw zookeeper-client session on the endpoints of `url`.
pub async fn raw(url: &str) -> zookeeper_client::Client {
    zookeeper_client::Client::connect(&endpoints(url).join(","))
        .await
        .expect("raw zookeeper client")
}

/// Sends a four-letter command to `host:port` and returns the reply.
pub async fn four_letter(endpoint: &str, cmd: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(endpoint),
    )
    .await
    else {
        return String::new();
    };
    if s.write_all(cmd.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
    out
}

/// Expires the store's current session the way Curator's tests do: another
/// client takes the session over and closes it. The store's own client
/// reconnects when the server moves its session away, which can take it
/// back before the close lands: repeat until the session is really gone.
pub async fn expire_session(store: &ZkStore, url: &str) {
    let info = store.session_info().expect("the store has a session");
    let old = info.id().0;
    for attempt in 1..=10 {
        let thief = zookeeper_client::Client::connector()
            .with_session(info.clone())
            .with_session_timeout(Duration::from_secs(4))
            .connect(&endpoints(url).join(","))
            .await;
        match thief {
            Ok(thief) => drop(thief), // closes the session on the server
            Err(e) => eprintln!("taking the session over failed ({e}), again"),
        }
        for _ in 0..20 {
            if store.session_id() != old {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("session {old:#x} still alive after attempt {attempt}");
    }
    panic!("could not expire session {old:#x}");
}

/// Signals a process (`STOP`, `CONT`, `KILL`).
pub fn signal(pid: &str, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid)
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

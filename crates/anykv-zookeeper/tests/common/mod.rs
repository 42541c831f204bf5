//! Helpers shared by the ZooKeeper integration tests.
#![allow(dead_code)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anykv_core::{Kv, registry};
use anykv_zookeeper::ZkStore;

/// The URL of a test server (`None`: skip, unless `cargo xtask test` requires it).
pub fn url(var: &str) -> Option<String> {
    anykv_testkit::server_url(var)
}

/// A required companion env var of a server URL.
pub fn companion(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set although the server URL is (run `cargo xtask test`)"),
    }
}

/// A namespace no other test or run uses.
pub fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "zk-tests/{name}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `base` with extra query options (`k=v&…`).
pub fn with_query(base: &str, query: &str) -> String {
    if query.is_empty() {
        return base.to_owned();
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

/// The full URL of namespace `ns` on `base` with extra options.
pub fn scoped_url(base: &str, ns: &str, query: &str) -> String {
    let mut q = format!("prefix={ns}");
    if !query.is_empty() {
        q = format!("{q}&{query}");
    }
    with_query(base, &q)
}

/// Opens `base` scoped to namespace `ns` with extra options.
pub async fn open(base: &str, ns: &str, query: &str) -> Kv {
    let url = scoped_url(base, ns, query);
    anykv_core::open(&url)
        .await
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Opens the driver itself (to reach its session) and the layered store on it.
pub async fn open_driver(base: &str, ns: &str, query: &str) -> (ZkStore, Kv) {
    let url = scoped_url(base, ns, query);
    let (_, config, layers) = registry::prepare(&url).unwrap();
    let store = ZkStore::open(config).await.unwrap();
    let kv = Kv::new(Arc::new(store.clone()), layers);
    (store, kv)
}

/// `host:port` endpoints of a `zk://a,b,c/…` URL.
pub fn endpoints(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit('@')
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
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

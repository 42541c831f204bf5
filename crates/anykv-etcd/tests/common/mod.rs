//! Helpers shared by the etcd integration tests.
#![allow(dead_code)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anykv_core::Kv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The URL of a test server (`None`: skip, unless `cargo xtask test` requires it).
pub fn url(var: &str) -> Option<String> {
    anykv_testkit::server_url(var)
}

/// A required companion env var of a server URL (panics when missing: the
/// server is there, so xtask must have exported it too).
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
        "etcd-tests/{name}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `base` with extra query options (`k=v&…`).
pub fn with_query(base: &str, query: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

/// Opens `base` scoped to namespace `ns` with extra options.
pub async fn open(base: &str, ns: &str, query: &str) -> Kv {
    let mut q = format!("prefix={ns}");
    if !query.is_empty() {
        q = format!("{q}&{query}");
    }
    anykv_core::open(&with_query(base, &q))
        .await
        .unwrap_or_else(|e| panic!("open {base}: {e}"))
}

/// `host:port` endpoints of an `etcd://a,b,c` URL.
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

/// A raw etcd-client connection to the endpoints of `url`.
pub async fn raw(url: &str) -> etcd_client::Client {
    etcd_client::Client::connect(endpoints(url), None)
        .await
        .expect("raw etcd client")
}

/// A gauge or counter from a member's `/metrics` (plain HTTP on the client port).
pub async fn metric(endpoint: &str, name: &str) -> Option<f64> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(endpoint),
    )
    .await
    .ok()?
    .ok()?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    body.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

/// Runs etcdctl (v3 API) against `endpoints`; returns stdout, panicking on failure.
pub fn etcdctl(etcdctl: &str, endpoints: &[String], args: &[&str]) -> String {
    let out = std::process::Command::new(etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {etcdctl}: {e}"));
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! Helpers shared by the etcd integration tests.
#![allow(dead_code)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use anykv_core::Kv;
use anykv_testkit::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The URL of a test server (`None`: skip, unless `cargo xtask test` requires it).
pub fn url(var: &str) -> Option<String> {
    anykv_testkit::server_url(var)
}

/// A required companion env var of a server URL.
pub fn companion(var: &str) -> String {
    server::companion(var)
}

/// A namespace no other test or run uses.
pub fn unique(name: &str) -> String {
    server::unique("etcd-tests", name)
}

/// `base` with extra query options (`k=v&…`).
pub fn with_query(base: &str, query: &str) -> String {
    server::with_query(base, query)
}

/// Opens `base` scoped to namespace `ns` with extra options.
pub async fn open(base: &str, ns: &str, query: &str) -> Kv {
    server::open_ns(base, ns, query).await
}

/// `host:port` endpoints of a URL.
pub fn endpoints(url: &str) -> Vec<String> {
    server::endpoints(url)
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

//! Helpers shared by the etcd integration tests.
#![allow(dead_code, unused_imports)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::time::Duration;

use anykv_testkit::server;
pub use anykv_testkit::{
    server::{companion, endpoints, key_names, open_ns as open, with_query},
    server_url as url,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A namespace no other test or run uses.
pub fn unique(name: &str) -> String {
    server::unique("etcd-tests", name)
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

//! Helpers for a driver's own integration tests against a real server:
//! URLs from the environment, unique namespaces, dead endpoints.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anykv_core::{Kv, Prefix, Store};

/// A required companion of a server URL (a binary path, PIDs…): panics when
/// missing, since the server is there and `cargo xtask test` exports both.
pub fn companion(var: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{var} is not set although the server URL is (run `cargo xtask test`)"),
    }
}

/// A namespace `<suite>/<name>-<pid>-<nanos>-<n>` no other test or run uses.
pub fn unique(suite: &str, name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{suite}/{name}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `base` with extra query options (`k=v&…`), whether or not it has a query.
pub fn with_query(base: &str, query: &str) -> String {
    if query.is_empty() {
        return base.to_owned();
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

/// Opens `base` scoped to namespace `ns`, with extra options; panics on failure.
pub async fn open_ns(base: &str, ns: &str, query: &str) -> Kv {
    let q = if query.is_empty() {
        format!("prefix={ns}")
    } else {
        format!("prefix={ns}&{query}")
    };
    match anykv_core::open(&with_query(base, &q)).await {
        Ok(kv) => kv,
        Err(e) => panic!("open {}: {e}", anykv_core::config::redact(base)),
    }
}

/// The `host:port` entries of a URL's authority (`etcd://u:p@a:1,b:2/x` → `a:1`, `b:2`).
pub fn endpoints(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
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

/// A 127.0.0.1 port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("no free loopback port: {e}"),
    }
}

/// A 127.0.0.1 port that accepts connections and never answers, like a hung
/// (SIGSTOPped) server. Lives as long as the test's runtime.
pub async fn silent_port() -> u16 {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("no free loopback port: {e}"),
    };
    let port = match listener.local_addr() {
        Ok(a) => a.port(),
        Err(e) => panic!("silent port: {e}"),
    };
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    port
}

/// The keys `list(prefix)` returns, as strings; panics on error.
pub async fn key_names(kv: &Kv, prefix: &Prefix) -> Vec<String> {
    match kv.list(prefix).await {
        Ok(pairs) => pairs.into_iter().map(|p| p.key.into_string()).collect(),
        Err(e) => panic!("list {prefix:?}: {e}"),
    }
}

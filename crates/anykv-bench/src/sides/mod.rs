//! The clients under test: anykv, and the raw etcd and ZooKeeper clients.

pub mod anykv;
pub mod etcd;
pub mod zk;

/// `host:port` endpoints of a `scheme://h:p[,h:p…][/path][?query]` URL.
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

//! `anykv dump` / `anykv restore` against real etcd, Consul and ZooKeeper
//! servers (URLs from `ANYKV_TEST_ETCD`, `ANYKV_TEST_CONSUL`,
//! `ANYKV_TEST_ZK`; skipped when unset, required under `cargo xtask test`).
//!
//! Each test fills a redb file with binary, empty and text values, one
//! value of exactly the backend's `max_value_size`, and more small keys
//! than one atomic batch takes; dumps it; restores the dump into the server
//! under a fresh prefix; dumps that prefix back and requires the same pair
//! lines (so every byte survived). A value one byte over the backend's
//! limit is refused with its line number, and nothing is written.

#![cfg(all(
    feature = "redb",
    any(feature = "etcd", feature = "consul", feature = "zookeeper")
))]

mod common;

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use common::{anykv, anykv_stdin, redb_url};

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

/// Small keys written besides the values: more than etcd's 128 and
/// Consul's 64 operations per transaction.
const MANY: usize = 300;

/// A driver's capabilities from `anykv drivers --json`.
fn caps(name: &str) -> serde_json::Value {
    let all = json(&anykv("memory://", &["drivers", "--json"]).ok());
    all.as_array()
        .expect("array")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no driver {name}"))["capabilities"]
        .clone()
}

/// A prefix no other run uses.
fn fresh(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("cli-dump/{tag}-{}-{nanos}", std::process::id())
}

fn put_file(dir: &Path, url: &str, key: &str, value: &[u8]) {
    let file = dir.join("value");
    std::fs::write(&file, value).expect("write value");
    anykv(url, &["put", key, "--file", file.to_str().expect("utf-8")]).ok();
}

/// The lines after the header.
fn pair_lines(dump: &[u8]) -> Vec<&[u8]> {
    dump.split(|b| *b == b'\n').skip(1).collect()
}

fn round_trip(var: &str, backend: &str) {
    let Some(server) = anykv_testkit::server_url(var) else {
        return;
    };
    let caps = caps(backend);
    let max = caps["max_value_size"].as_u64().expect("max_value_size") as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = redb_url(dir.path(), "src.redb");

    // The source: a batch's worth of small keys via one restore, then the
    // special values with put.
    let mut seed = String::from(
        r#"{"format":"anykv-dump","version":1,"backend":"test","revision":null,"consistent":false,"prefix":"app","created":"2026-11-30T00:00:00Z"}"#,
    );
    seed.push('\n');
    for i in 0..MANY {
        seed.push_str(&format!("{{\"key\":\"many/{i:04}\",\"value\":\"v{i}\"}}\n"));
    }
    seed.push_str(&format!("{{\"end\":true,\"count\":{MANY}}}\n"));
    assert_eq!(
        anykv_stdin(&src, &["restore"], seed.as_bytes()).ok(),
        format!("{MANY}\n")
    );
    let at_limit: Vec<u8> = (0..max).map(|i| (i % 251) as u8 | 0x80).collect();
    put_file(dir.path(), &src, "app/at-limit", &at_limit);
    put_file(
        dir.path(),
        &src,
        "app/bin",
        &(0..=255u8).collect::<Vec<_>>(),
    );
    put_file(dir.path(), &src, "app/empty", b"");
    put_file(
        dir.path(),
        &src,
        "app/text/deep",
        "é \"q\"\n\t\\".as_bytes(),
    );
    let total = MANY + 4;

    let dump = anykv(&src, &["dump", "--prefix", "app"]);
    assert_eq!(dump.code, Some(0), "{}", dump.stderr);
    let file = dir.path().join("app.jsonl");
    std::fs::write(&file, &dump.stdout).expect("write dump");
    let file = file.to_str().expect("utf-8");

    // Into the server, under a fresh prefix.
    let prefix = fresh(backend);
    let restored = anykv(&server, &["restore", "--file", file, "--prefix", &prefix]);
    assert_eq!(restored.ok(), format!("{total}\n"));
    assert_eq!(
        anykv(&server, &["get", &format!("{prefix}/empty")]).ok(),
        ""
    );

    // And back out: the same pairs, a header that says how it was read.
    let back = anykv(&server, &["dump", "--prefix", &prefix]);
    assert_eq!(back.code, Some(0), "{}", back.stderr);
    let header: serde_json::Value =
        serde_json::from_slice(back.stdout.split(|b| *b == b'\n').next().expect("header"))
            .expect("header JSON");
    assert_eq!(header["backend"], backend, "{header}");
    assert_eq!(header["prefix"], prefix.as_str(), "{header}");
    let consistent = !caps["snapshot"].is_null();
    assert_eq!(header["consistent"], consistent, "{header}");
    assert_eq!(header["revision"].is_u64(), consistent, "{header}");
    assert!(
        pair_lines(&back.stdout) == pair_lines(&dump.stdout),
        "the pairs read back differ from the pairs restored"
    );

    // A value one byte over the limit: refused with its line, nothing written.
    put_file(dir.path(), &src, "big/a", b"small");
    put_file(dir.path(), &src, "big/b", &vec![b'x'; max + 1]);
    let too_big = anykv(&src, &["dump", "--prefix", "big"]);
    assert_eq!(too_big.code, Some(0), "{}", too_big.stderr);
    let refused_prefix = fresh(&format!("{backend}-refused"));
    let out = anykv_stdin(
        &server,
        &["restore", "--prefix", &refused_prefix],
        &too_big.stdout,
    );
    out.fails(2, "line 3: the value of \"b\" is");
    assert!(out.stderr.contains("nothing was restored"), "{out:?}");
    assert_eq!(anykv(&server, &["list", &refused_prefix]).ok(), "");

    // Clean up what this test wrote.
    assert_eq!(
        anykv(&server, &["del", "--prefix", &prefix]).ok(),
        format!("{total}\n")
    );
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_round_trip() {
    round_trip("ANYKV_TEST_ETCD", "etcd");
}

#[cfg(feature = "consul")]
#[test]
fn consul_round_trip() {
    round_trip("ANYKV_TEST_CONSUL", "consul");
}

#[cfg(feature = "zookeeper")]
#[test]
fn zookeeper_round_trip() {
    round_trip("ANYKV_TEST_ZK", "zookeeper");
}

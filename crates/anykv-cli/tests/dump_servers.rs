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

use common::{anykv, anykv_stdin, patient, redb_url};

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
    let server = patient(&server);
    let caps = caps(backend);
    let max = caps["max_value_size"].as_u64().expect("max_value_size") as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = patient(&redb_url(dir.path(), "src.redb"));

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

/// A dump taken while another client keeps rewriting two keys in one
/// transaction (`a` and `z`, with filler keys between them so that the
/// read spans pages) always shows the two equal, on backends that declare
/// snapshot; the writer must have made progress across the dumps. A
/// verified snapshot may instead refuse (exit 4) while writes go on.
fn consistent_under_writes(var: &str, backend: &str) {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };

    use anykv::{Key, Op, Store};

    let Some(server) = anykv_testkit::server_url(var) else {
        return;
    };
    let server = patient(&server);
    let mode = caps(backend)["snapshot"].clone();
    if mode.is_null() {
        eprintln!("{backend} declares no snapshot: its dumps are not consistent, nothing to check");
        return;
    }
    // A verified snapshot (ZooKeeper) reads twice and gives up when every
    // attempt saw a change: its writer pauses so that some dumps can land.
    let verified = mode == "verified";
    let pause = std::time::Duration::from_millis(if verified { 1000 } else { 0 });
    let prefix = fresh(&format!("{backend}-writes"));
    let mut seed = format!(
        "{{\"format\":\"anykv-dump\",\"version\":1,\"prefix\":\"{prefix}\"}}\n{{\"key\":\"a\",\"value\":\"0\"}}\n"
    );
    for i in 0..600 {
        seed.push_str(&format!("{{\"key\":\"m/{i:04}\",\"value\":\"filler\"}}\n"));
    }
    seed.push_str("{\"key\":\"z\",\"value\":\"0\"}\n{\"end\":true,\"count\":602}\n");
    assert_eq!(
        anykv_stdin(&server, &["restore"], seed.as_bytes()).ok(),
        "602\n"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, rounds, server) = (stop.clone(), rounds.clone(), server.clone());
        let (a, z) = (
            Key::new(format!("{prefix}/a")).expect("key"),
            Key::new(format!("{prefix}/z")).expect("key"),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let kv = anykv::open(&server).await.expect("open");
                let started = std::time::Instant::now();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) && started.elapsed().as_secs() < 120 {
                    n += 1;
                    let v = bytes::Bytes::from(n.to_string());
                    kv.atomic(
                        Vec::new(),
                        vec![Op::Put(a.clone(), v.clone()), Op::Put(z.clone(), v)],
                    )
                    .await
                    .expect("atomic");
                    rounds.store(n, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                }
                let _ = kv.close().await;
            });
        })
    };
    let wait_for = |n: u64| {
        let started = std::time::Instant::now();
        while rounds.load(Ordering::SeqCst) < n {
            assert!(started.elapsed().as_secs() < 30, "the writer is stuck");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for(1);
    let first = rounds.load(Ordering::SeqCst);
    let mut landed = 0;
    let mut dumps = 0;
    let started = std::time::Instant::now();
    // At least five dumps, and on until the writer has committed three more
    // transactions, so that writes provably ran between and during them.
    while dumps < 5 || rounds.load(Ordering::SeqCst) < first + 3 {
        assert!(started.elapsed().as_secs() < 60, "the writer is stuck");
        dumps += 1;
        let out = anykv(&server, &["dump", "--prefix", &prefix]);
        if verified && out.code == Some(4) {
            // Refused, not wrong: the documented outcome under writes.
            assert!(out.stderr.contains("changed during"), "{out:?}");
            continue;
        }
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        landed += 1;
        let text = out.text();
        let value_of = |key: &str| {
            text.lines()
                .map(json)
                .find(|l| l["key"] == key)
                .unwrap_or_else(|| panic!("no {key} in the dump"))["value"]
                .clone()
        };
        assert_eq!(value_of("a"), value_of("z"), "a dump mixed two revisions");
        assert!(
            text.contains("\"count\":602}"),
            "{}",
            &text[text.len() - 40..]
        );
    }
    assert!(landed >= 1, "no dump of {backend} succeeded under writes");
    let last = rounds.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert!(
        last > first,
        "no write ran during the dumps ({first} → {last})"
    );
    assert_eq!(anykv(&server, &["del", "--prefix", &prefix]).ok(), "602\n");
}

#[cfg(feature = "etcd")]
#[test]
fn etcd_dump_is_consistent_under_writes() {
    consistent_under_writes("ANYKV_TEST_ETCD", "etcd");
}

#[cfg(feature = "consul")]
#[test]
fn consul_dump_is_consistent_under_writes() {
    consistent_under_writes("ANYKV_TEST_CONSUL", "consul");
}

#[cfg(feature = "zookeeper")]
#[test]
fn zookeeper_dump_is_consistent_under_writes() {
    consistent_under_writes("ANYKV_TEST_ZK", "zookeeper");
}

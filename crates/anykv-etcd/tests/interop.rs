//! Interop with `etcdctl` (Debian's etcd-client, exported as ANYKV_ETCDCTL):
//! the same keys and values both ways, and locks that exclude each other
//! (anykv uses etcd's `concurrency.Mutex` layout).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use anykv_core::{Key, LockOptions, Prefix, PutOptions, Store};
use anykv_etcd as _;

struct Env {
    url: String,
    etcdctl: String,
    endpoints: Vec<String>,
}

fn env() -> Option<Env> {
    let url = common::url("ANYKV_TEST_ETCD")?;
    Some(Env {
        endpoints: common::endpoints(&url),
        etcdctl: common::companion("ANYKV_ETCDCTL"),
        url,
    })
}

fn b64(s: &str) -> Vec<u8> {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ABC.iter().position(|x| *x == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// `etcdctl get --prefix <dir> -w json` as key → (value, mod_revision).
fn etcdctl_dump(env: &Env, dir: &str) -> BTreeMap<String, (Vec<u8>, u64)> {
    let out = common::etcdctl(
        &env.etcdctl,
        &env.endpoints,
        &["get", "--prefix", dir, "-w", "json"],
    );
    let json: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    let mut map = BTreeMap::new();
    for kv in json["kvs"].as_array().cloned().unwrap_or_default() {
        let key = String::from_utf8(b64(kv["key"].as_str().unwrap())).unwrap();
        let value = b64(kv["value"].as_str().unwrap_or(""));
        map.insert(key, (value, kv["mod_revision"].as_u64().unwrap()));
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_anykv_writes_etcdctl_reads() {
    let Some(env) = env() else { return };
    let ns = common::unique("interop-w");
    let kv = common::open(&env.url, &ns, "").await;
    let entries: [(&str, &[u8]); 4] = [
        ("a", b"1"),
        ("dir/b", "ünïcødé value".as_bytes()),
        ("dir/sub/c", b"line1\nline2"),
        ("empty", b""),
    ];
    let mut versions = BTreeMap::new();
    for (k, v) in entries {
        let ver = kv
            .put(
                &Key::new(k).unwrap(),
                v.to_vec().into(),
                PutOptions::default(),
            )
            .await
            .unwrap();
        versions.insert(format!("{ns}/{k}"), ver.get());
    }
    let dump = etcdctl_dump(&env, &format!("{ns}/"));
    let expected: BTreeMap<String, (Vec<u8>, u64)> = entries
        .iter()
        .map(|(k, v)| {
            let full = format!("{ns}/{k}");
            let ver = versions[&full];
            (full, (v.to_vec(), ver))
        })
        .collect();
    assert_eq!(
        dump, expected,
        "etcdctl sees other keys, values or revisions"
    );
    let _ = kv.delete_prefix(&Prefix::root()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_etcdctl_writes_anykv_reads() {
    let Some(env) = env() else { return };
    let ns = common::unique("interop-r");
    let kv = common::open(&env.url, &ns, "").await;
    common::etcdctl(
        &env.etcdctl,
        &env.endpoints,
        &["put", &format!("{ns}/x/y"), "from etcdctl"],
    );
    common::etcdctl(
        &env.etcdctl,
        &env.endpoints,
        &["put", &format!("{ns}/z"), "2"],
    );
    // Names no anykv client could write are skipped, not errors.
    common::etcdctl(
        &env.etcdctl,
        &env.endpoints,
        &["put", &format!("{ns}/bad//name"), "x"],
    );
    let got = kv
        .get(&Key::new("x/y").unwrap())
        .await
        .unwrap()
        .expect("x/y");
    assert_eq!(&got.value[..], b"from etcdctl");
    let dump = etcdctl_dump(&env, &format!("{ns}/x/y"));
    assert_eq!(
        got.version.get(),
        dump[&format!("{ns}/x/y")].1,
        "version = mod_revision"
    );
    let listed = common::key_names(&kv, &Prefix::root()).await;
    assert_eq!(listed, ["x/y", "z"]);
    assert_eq!(kv.keys(&Prefix::root()).await.unwrap(), ["x", "z"]);
    // etcdctl deletes, anykv sees it gone.
    common::etcdctl(
        &env.etcdctl,
        &env.endpoints,
        &["del", "--prefix", &format!("{ns}/")],
    );
    assert!(kv.get(&Key::new("x/y").unwrap()).await.unwrap().is_none());
}

/// The etcd key anykv keeps lock `name` of namespace `ns` under.
fn lock_key(ns: &str, name: &str) -> String {
    format!("__anykv/locks/{ns}/{name}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_and_anykv_lock_exclude_each_other() {
    let Some(env) = env() else { return };
    let ns = common::unique("interop-lock");
    let kv = common::open(&env.url, &ns, "").await;
    let name = Key::new("job").unwrap();
    let etcd_name = lock_key(&ns, "job");

    // etcdctl holds the lock for 3 s (the time its command runs).
    let mut held = Command::new(&env.etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", env.endpoints.join(",")))
        .args(["lock", &etcd_name, "sleep", "3"])
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl lock");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let holder = loop {
        if let Some(h) = kv.lock_holder(&name).await.unwrap() {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "etcdctl never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        kv.try_lock(&name, LockOptions::default())
            .await
            .unwrap()
            .is_none(),
        "anykv took a lock etcdctl holds"
    );
    let opts = LockOptions {
        wait: Some(Duration::from_secs(15)),
        ..LockOptions::default()
    };
    let guard = kv
        .lock(&name, opts)
        .await
        .expect("anykv gets the lock after etcdctl");
    assert!(held.wait().unwrap().success());
    assert!(guard.fencing_token() > holder.fencing_token);

    // Now anykv holds it: etcdctl waits until anykv releases.
    let mut waiting = Command::new(&env.etcdctl)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", env.endpoints.join(",")))
        .args(["lock", &etcd_name, "echo", "acquired"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("etcdctl lock");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "etcdctl took a lock anykv holds"
    );
    guard.release().await.unwrap();
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "acquired");
}

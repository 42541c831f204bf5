//! Interop with the `consul` CLI (the same binary as the agent,
//! `ANYKV_CONSUL_BIN`): what anykv writes, `consul kv get` reads, and the
//! other way round, including keys that need percent-encoding, TTL sessions
//! and watches.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::{process::Command, time::Duration};

use anykv_consul as _;
use anykv_core::{Event, Key, PutOptions, Start, Store, Target};
use futures::StreamExt;

struct Cli {
    bin: String,
    addr: String,
}

impl Cli {
    fn new(url: &str) -> Cli {
        Cli {
            bin: common::companion("ANYKV_CONSUL_BIN"),
            addr: common::addr(url),
        }
    }

    /// `consul kv <verb> -http-addr=… <rest…>` (flags go before arguments).
    fn run(&self, args: &[&str]) -> (bool, Vec<u8>) {
        let (verb, rest) = args.split_at(2.min(args.len()));
        let out = Command::new(&self.bin)
            .args(verb)
            .arg(format!("-http-addr=http://{}", self.addr))
            .args(rest)
            .env_remove("CONSUL_HTTP_TOKEN")
            .output()
            .expect("running consul");
        if !out.status.success() {
            eprintln!("consul {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        (out.status.success(), out.stdout)
    }

    /// `consul kv get KEY` (the raw value; `None` if absent).
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = Command::new(&self.bin)
            .args([
                "kv",
                "get",
                &format!("-http-addr=http://{}", self.addr),
                key,
            ])
            .output()
            .expect("running consul");
        out.status.success().then(|| {
            let mut v = out.stdout;
            if v.last() == Some(&b'\n') {
                v.pop(); // `consul kv get` ends the value with a newline
            }
            v
        })
    }

    /// `consul kv get -detailed KEY` as name → value lines.
    fn detailed(&self, key: &str) -> Vec<(String, String)> {
        let (ok, out) = self.run(&["kv", "get", "-detailed", key]);
        // (`-detailed` after `-http-addr` is fine: both are flags.)
        assert!(ok, "consul kv get -detailed {key}");
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(2, char::is_whitespace);
                Some((parts.next()?.to_owned(), parts.next()?.trim().to_owned()))
            })
            .collect()
    }

    fn field(&self, key: &str, name: &str) -> String {
        self.detailed(key)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_cli_reads_what_anykv_wrote() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let cli = Cli::new(&url);
    let ns = common::unique("interop-w");
    let kv = common::open(&url, &ns, "").await;
    for (k, v) in [
        ("plain", "hello"),
        ("deep/er/key", "x"),
        ("ünïcødé/ключ", "u"),
        ("with space/and%percent?q#h", "odd"),
    ] {
        let key = Key::new(k).unwrap();
        let version = kv
            .put(&key, v.into(), PutOptions::default())
            .await
            .expect("put");
        let full = format!("{ns}/{k}");
        assert_eq!(
            cli.get(&full).as_deref(),
            Some(v.as_bytes()),
            "consul kv get {full}"
        );
        assert_eq!(
            cli.field(&full, "ModifyIndex"),
            version.to_string(),
            "the version is the ModifyIndex"
        );
    }
    // An empty value is a key for Consul too.
    kv.put(
        &Key::new("empty").unwrap(),
        "".into(),
        PutOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(cli.get(&format!("{ns}/empty")).as_deref(), Some(&b""[..]));
    // A TTL is a session holding the key.
    let t = Key::new("ttl").unwrap();
    kv.put(
        &t,
        "t".into(),
        PutOptions::default().with_ttl(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let session = cli.field(&format!("{ns}/ttl"), "Session");
    assert!(
        !session.is_empty() && session != "-",
        "TTL key has a session: {session:?}"
    );
    kv.delete_prefix(&anykv_core::Prefix::root()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anykv_reads_what_consul_cli_wrote() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let cli = Cli::new(&url);
    let ns = common::unique("interop-r");
    let kv = common::open(&url, &ns, "").await;
    let mut w = kv
        .watch(Target::Prefix(anykv_core::Prefix::root()), Start::Now)
        .await
        .expect("watch");
    let full = format!("{ns}/cfg/ünï");
    assert!(cli.run(&["kv", "put", &full, "from-cli"]).0);
    let key = Key::new("cfg/ünï").unwrap();
    let got = kv.get(&key).await.unwrap().expect("written by the CLI");
    assert_eq!(&got.value[..], b"from-cli");
    assert_eq!(got.version.to_string(), cli.field(&full, "ModifyIndex"));
    match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
        Ok(Some(Ok(Event::Put { kv: p, .. }))) => {
            assert_eq!(p.key, key);
            assert_eq!(&p.value[..], b"from-cli");
        }
        other => panic!("expected the CLI's put on the watch, got {other:?}"),
    }
    assert_eq!(
        kv.list(&anykv_core::Prefix::new("cfg").unwrap())
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(kv.keys(&anykv_core::Prefix::root()).await.unwrap(), ["cfg"]);

    // CAS with the version anykv read, against a CLI write in between.
    assert!(cli.run(&["kv", "put", &full, "cli-again"]).0);
    let e = kv
        .put(&key, "stale".into(), PutOptions::if_version(got.version))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), anykv_core::ErrorKind::Conflict, "{e}");
    assert_eq!(cli.get(&full).as_deref(), Some(&b"cli-again"[..]));

    assert!(cli.run(&["kv", "delete", &full]).0);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), w.next()).await {
            Ok(Some(Ok(Event::Delete { key: k, .. }))) => {
                assert_eq!(k, key);
                break;
            }
            Ok(Some(Ok(Event::Put { .. }))) => continue, // the second CLI put
            other => panic!("expected the CLI's delete on the watch, got {other:?}"),
        }
    }
    assert_eq!(kv.get(&key).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_that_anykv_cannot_name_are_skipped() {
    let Some(url) = common::url("ANYKV_TEST_CONSUL") else {
        return;
    };
    let cli = Cli::new(&url);
    let ns = common::unique("interop-odd");
    let kv = common::open(&url, &ns, "").await;
    assert!(cli.run(&["kv", "put", &format!("{ns}/ok"), "1"]).0);
    // (The CLI cannot write `a//b`: Go's HTTP mux cleans such paths; a
    // transaction can.)
    let (status, body) = common::http(
        reqwest::Method::PUT,
        &url,
        "txn",
        None,
        Some(serde_json::json!([{ "KV": { "Verb": "set", "Key": format!("{ns}/bad//name"), "Value": "Mg==" } }])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(cli.run(&["kv", "put", &format!("{ns}/dir/"), "3"]).0);
    let listed: Vec<String> = kv
        .list(&anykv_core::Prefix::root())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key.to_string())
        .collect();
    assert_eq!(listed, ["ok"], "names no anykv key can have are skipped");
    assert_eq!(
        kv.delete_prefix(&anykv_core::Prefix::root()).await.unwrap(),
        3
    );
}

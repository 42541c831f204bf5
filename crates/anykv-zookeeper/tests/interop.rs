//! Interop with `zkCli.sh` from Debian's zookeeper package (`ANYKV_ZKCLI`):
//! the CLI reads what anykv wrote, and anykv reads what the CLI wrote.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::process::Command;

use anykv_core::{Key, Prefix, PutOptions, Store};

/// Runs `zkCli.sh -server <endpoint> <args…>` and returns its stdout lines
/// after the connection banner.
fn zkcli(cli: &str, endpoint: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new(cli)
        .arg("-server")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run zkCli");
    assert!(
        out.status.success(),
        "zkCli {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The banner ends with the session's first watch event.
    let body = stdout
        .split_once("type:None path:null")
        .map(|(_, rest)| rest)
        .unwrap_or(&stdout);
    body.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zkcli_and_anykv_read_each_other() {
    let Some(url) = common::url("ANYKV_TEST_ZK") else {
        return;
    };
    let cli = common::companion("ANYKV_ZKCLI");
    let endpoint = common::endpoints(&url).remove(0);
    let ns = common::unique("interop");
    let kv = common::open(&url, &ns, "").await;

    // anykv → zkCli
    kv.put(
        &Key::new("conf/greeting").unwrap(),
        "hello from anykv".into(),
        PutOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        zkcli(&cli, &endpoint, &["get", &format!("/{ns}/conf/greeting")]),
        ["hello from anykv"]
    );
    assert_eq!(
        zkcli(&cli, &endpoint, &["ls", &format!("/{ns}/conf")]),
        ["[greeting]"]
    );

    // zkCli → anykv
    zkcli(
        &cli,
        &endpoint,
        &[
            "create",
            &format!("/{ns}/conf/from-cli"),
            "written by zkCli",
        ],
    );
    let got = kv
        .get(&Key::new("conf/from-cli").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.value[..], b"written by zkCli");
    zkcli(
        &cli,
        &endpoint,
        &["set", &format!("/{ns}/conf/greeting"), "changed by zkCli"],
    );
    assert_eq!(
        &kv.get(&Key::new("conf/greeting").unwrap())
            .await
            .unwrap()
            .unwrap()
            .value[..],
        b"changed by zkCli"
    );
    let listed: Vec<String> = kv
        .list(&Prefix::new("conf").unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.key.to_string())
        .collect();
    assert_eq!(listed, ["conf/from-cli", "conf/greeting"]);

    // zkCli deletes; anykv no longer sees it.
    zkcli(
        &cli,
        &endpoint,
        &["delete", &format!("/{ns}/conf/from-cli")],
    );
    assert_eq!(
        kv.get(&Key::new("conf/from-cli").unwrap()).await.unwrap(),
        None
    );
    kv.delete_prefix(&Prefix::root()).await.unwrap();
    assert!(kv.list(&Prefix::root()).await.unwrap().is_empty());
}

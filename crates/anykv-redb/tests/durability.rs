//! Crash durability: a child process streams acknowledged writes and atomic
//! commits; the parent kills it with SIGKILL mid-stream, reopens the file
//! and checks that every acknowledged write is there and that no atomic
//! commit is partly applied. Three rounds on the same file, so recovery of
//! a file that was itself recovered is covered too.
//!
//! The child is this test binary re-executed with `crash_child` selected and
//! the file path in an env var; without that variable `crash_child` does
//! nothing.

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anykv_core::{Bytes, Check, ErrorKind, Key, Op, Prefix, PutOptions, Store};
use anykv_redb as _; // links the driver so the registry sees it

const CHILD_ENV: &str = "ANYKV_REDB_CRASH_CHILD";
const ROUND_ENV: &str = "ANYKV_REDB_CRASH_ROUND";
const WRITERS: usize = 16;

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

/// The child: writes until killed, printing one line per acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return; // not the child
    };
    let round = std::env::var(ROUND_ENV).unwrap_or_default();
    let kv = anykv_core::open(&format!("redb://{path}")).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let kv = kv.clone();
        let round = round.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let id = format!("{round}-{t}-{i}");
                let line = if i % 4 == 0 {
                    // Three keys in one commit, guarded by a check.
                    let ops = ["a", "b", "c"]
                        .iter()
                        .map(|part| {
                            Op::Put(key(&format!("atomic/{id}/{part}")), Bytes::from(id.clone()))
                        })
                        .collect();
                    kv.atomic(vec![Check::Absent(key(&format!("atomic/{id}/a")))], ops)
                        .await
                        .unwrap();
                    format!("ack atomic {id}\n")
                } else {
                    let value = format!("{id}-{}", "x".repeat((i % 7) as usize * 40));
                    kv.put(
                        &key(&format!("put/{id}")),
                        Bytes::from(value.clone()),
                        PutOptions::default(),
                    )
                    .await
                    .unwrap();
                    format!("ack put {id} {value}\n")
                };
                // Printed only after the write resolved, i.e. is durable.
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes()).unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[derive(Default)]
struct Acks {
    puts: BTreeMap<String, String>,
    atomics: BTreeSet<String>,
}

impl Acks {
    fn record(&mut self, line: &str) {
        let mut parts = line.splitn(4, ' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ack"), Some("put"), Some(id), Some(value)) => {
                self.puts.insert(id.to_owned(), value.to_owned());
            }
            (Some("ack"), Some("atomic"), Some(id), None) => {
                self.atomics.insert(id.to_owned());
            }
            _ => {}
        }
    }

    fn len(&self) -> usize {
        self.puts.len() + self.atomics.len()
    }
}

/// Runs one child until it acknowledged about `target` writes, checks that
/// a second process is refused the file, then kills the child.
fn run_child(path: &str, round: usize, target: usize) -> Acks {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .env(ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acks = Acks::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acks.len() < target {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => acks.record(&line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "child stopped or stalled after {} acknowledged writes",
                    acks.len()
                );
            }
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child is still writing"
    );
    // A second process (this one) may not open the file the child holds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(anykv_core::open(&format!("redb://{path}")));
    match refused {
        Ok(_) => panic!("a second process opened a file in use"),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert!(e.to_string().contains("in use"), "{e}");
        }
    }
    // SIGKILL, mid-stream.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed, not finished: {status}");
    // Lines printed before the kill were acknowledged writes too.
    reader.join().unwrap();
    while let Ok(line) = rx.try_recv() {
        acks.record(&line);
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write_and_no_atomic_is_partial() {
    if std::env::var(CHILD_ENV).is_ok() {
        return; // this binary is running as the child
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb").display().to_string();
    let mut all = Acks::default();
    for (round, target) in [(1, 1500), (2, 2500), (3, 800)] {
        let p = path.clone();
        let acks = tokio::task::spawn_blocking(move || run_child(&p, round, target))
            .await
            .unwrap();
        assert!(
            acks.atomics.len() > 10 && acks.puts.len() > 10,
            "both kinds were written"
        );
        all.puts.extend(acks.puts);
        all.atomics.extend(acks.atomics);

        let kv = anykv_core::open(&format!("redb://{path}")).await.unwrap();
        for (id, value) in &all.puts {
            let got = kv.get(&key(&format!("put/{id}"))).await.unwrap();
            let got = got.unwrap_or_else(|| panic!("round {round}: acknowledged put/{id} lost"));
            assert_eq!(
                got.value,
                Bytes::from(value.clone()),
                "round {round}: put/{id}"
            );
        }
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for pair in kv.list(&Prefix::new("atomic").unwrap()).await.unwrap() {
            let mut parts = pair.key.as_str().splitn(3, '/');
            let (_, id, part) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            assert_eq!(pair.value, Bytes::from(id.to_owned()));
            groups
                .entry(id.to_owned())
                .or_default()
                .push(part.to_owned());
        }
        for (id, parts) in &groups {
            assert_eq!(
                parts,
                &["a", "b", "c"],
                "round {round}: atomic {id} is partial"
            );
        }
        for id in &all.atomics {
            assert!(
                groups.contains_key(id),
                "round {round}: acknowledged atomic {id} lost"
            );
        }
        eprintln!(
            "round {round}: {} puts and {} atomics acknowledged so far, all present; {} atomic groups, none partial",
            all.puts.len(),
            all.atomics.len(),
            groups.len()
        );
        kv.close().await.unwrap();
    }
}

//! Sessions and elections across processes on each real server backend:
//! candidates are child processes (`anykv-candidate`) that the test kills
//! with SIGKILL or freezes with SIGSTOP. Each test starts a server of its own.
//! The figures (failover after a kill and after a freeze, handover after a
//! resign, ephemeral key removal after a process dies) are printed as one
//! `FIGURES` line per backend; the README reports them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{process::Stdio, time::Duration};

use anykv::{CampaignOptions, Key, Kv, Prefix, Store, StoreExt};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
    time::Instant,
};

/// Slack on top of TTL + the backend's granularity: a loaded 2-core machine
/// and the observing handle's own polling.
const SLACK: Duration = Duration::from_secs(5);

/// A child candidate and its stdout lines.
struct Candidate {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Candidate {
    fn spawn(args: &[&str]) -> Candidate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_anykv-candidate"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn anykv-candidate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = r.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Candidate { child, lines }
    }

    /// The rest of the next line starting with `word`, failing on an
    /// `ERROR` line or after `limit`.
    async fn expect(&mut self, word: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(line)) if line.starts_with(word) => {
                    return line[word.len()..].trim().to_owned();
                }
                Ok(Some(line)) if line.starts_with("ERROR") => panic!("candidate: {line}"),
                Ok(Some(_)) => {}
                Ok(None) => panic!("candidate exited before {word}"),
                Err(_) => panic!("no {word} within {limit:?}"),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running child");
        let ok = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

fn term(s: &str) -> u64 {
    s.parse().expect("term")
}

/// Waits until the election has `n` candidates.
async fn queued(kv: &Kv, name: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    let p = Prefix::new(name).unwrap();
    while kv.list(&p).await.map(|l| l.len()).unwrap_or(0) != n {
        assert!(
            Instant::now() < deadline,
            "{name}: not {n} candidates within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn coordination_across_processes(backend: &str, ttl: Duration) {
    let Some((cluster, _ctx)) = tokio::task::block_in_place(|| {
        anykv_tests::single_node(backend, &format!("coord-{backend}"))
    }) else {
        return;
    };
    let url = cluster.url("timeout=1s");
    let kv = anykv::open(&url).await.unwrap();
    let granularity = kv
        .capabilities()
        .sessions
        .unwrap_or_else(|| panic!("{backend} declares no sessions"));
    assert!(kv.capabilities().cross_process_sessions);
    let bound = ttl + granularity + SLACK;
    let ttl_ms = ttl.as_millis().to_string();
    let name = "leaders/job";
    let spawn = |value: &str| Candidate::spawn(&["elect", &url, name, value, &ttl_ms]);

    // Resign → the next candidate (another process) leads.
    let first = kv
        .election(&Key::new(name).unwrap())
        .campaign("test".into(), CampaignOptions::default().with_ttl(ttl))
        .await
        .unwrap();
    let mut a = spawn("a");
    queued(&kv, name, 2, bound).await;
    let resigned = Instant::now();
    first.resign().await.unwrap();
    let term_a = term(&a.expect("LEADER", bound).await);
    let handover = resigned.elapsed();
    assert!(term_a > 0);

    // SIGKILL of the leader → the next leads within TTL + granularity.
    let mut b = spawn("b");
    queued(&kv, name, 2, bound).await;
    let mut c = spawn("c");
    queued(&kv, name, 3, bound).await;
    a.signal("-KILL");
    let killed = Instant::now();
    let term_b = term(&b.expect("LEADER", bound).await);
    let kill_failover = killed.elapsed();
    assert!(term_b > term_a, "terms increase: {term_b} after {term_a}");

    // SIGSTOP of the leader past its TTL → the next leads; on SIGCONT the
    // old leader learns it lost, and its proclaim is refused.
    b.signal("-STOP");
    let stopped = Instant::now();
    let term_c = term(&c.expect("LEADER", bound).await);
    let stop_failover = stopped.elapsed();
    assert!(term_c > term_b, "terms increase: {term_c} after {term_b}");
    b.signal("-CONT");
    b.expect("LOST", bound).await;
    let after = b.expect("PROCLAIM-AFTER-LOSS", bound).await;
    assert_eq!(
        after, "LockLost",
        "a frozen leader's proclaim after its loss"
    );
    let leader = kv
        .election(&Key::new(name).unwrap())
        .leader()
        .await
        .unwrap()
        .expect("c leads");
    assert_eq!((leader.value.as_ref(), leader.term), (&b"c"[..], term_c));
    c.signal("-KILL");

    // An ephemeral key of a process killed with SIGKILL disappears.
    let mut r = Candidate::spawn(&["register", &url, "instances/r1", &ttl_ms]);
    r.expect("REGISTERED", bound).await;
    let k = Key::new("instances/r1").unwrap();
    assert!(kv.get(&k).await.unwrap().is_some());
    r.signal("-KILL");
    let died = Instant::now();
    while kv.get(&k).await.unwrap().is_some() {
        assert!(
            died.elapsed() < bound,
            "ephemeral key outlived its process by {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let removal = died.elapsed();
    eprintln!(
        "FIGURES {backend}: ttl {ttl:?}, failover after SIGKILL {kill_failover:.1?}, after SIGSTOP \
         {stop_failover:.1?}, resign handover {handover:.2?}, ephemeral key removed {removal:.1?} \
         after SIGKILL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_coordination_across_processes() {
    coordination_across_processes("etcd", Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_coordination_across_processes() {
    coordination_across_processes("zookeeper", Duration::from_secs(4)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_coordination_across_processes() {
    coordination_across_processes("consul", Duration::from_secs(10)).await;
}

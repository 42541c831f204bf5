//! Scenarios: one backend, one topology, one fault, every workload at once.
//!
//! A run starts the servers, opens anykv on them, starts the writers, the
//! shared-key clients, a prefix watch, a liveness recorder and two lock
//! worker processes; after a warm-up it injects the fault, holds it, heals
//! it, lets the workloads go on, then settles and checks everything (see
//! [`crate::report::Row`] for what is measured and what is a violation).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anykv::{Key, Kv, Prefix, Store};
use anykv_servers::{Cluster, Ctx};
use anykv_testkit::proxy::{Mode, Proxy};

use crate::{
    history::WriteLog,
    linearizability::{self, Verdict},
    locks::{self, Counter, Worker},
    report::Row,
    workload::{self, Timing, Watched},
};

/// A backend with servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// etcd 3.4.
    Etcd,
    /// ZooKeeper 3.8.
    Zookeeper,
    /// Consul 1.8.
    Consul,
}

impl Backend {
    /// Its name in tables and URLs.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Zookeeper => "zookeeper",
            Backend::Consul => "consul",
        }
    }

    fn cluster(self, ctx: &Ctx, name: &str, n: usize, proxied: bool) -> anyhow::Result<Cluster> {
        match self {
            Backend::Etcd => anykv_servers::etcd::cluster(ctx, name, n, proxied),
            Backend::Zookeeper => anykv_servers::zookeeper::cluster(ctx, name, n, proxied),
            Backend::Consul => anykv_servers::consul::cluster(ctx, name, n, proxied),
        }
    }
}

/// What goes wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// `kill -9` of a server (the first member), restarted on the same data
    /// dir and ports after the hold.
    Kill,
    /// SIGSTOP of a server (the first member), SIGCONT after the hold.
    Freeze,
    /// The leader cut off from its peers and clients (proxies black-hole its
    /// traffic both ways), healed after the hold. Clusters only.
    Partition,
    /// `kill -9` of the leader, restarted after the hold. Clusters only.
    LeaderKill,
    /// `kill -9` of the lock worker holding the lock: how long until the
    /// other takes it (its lease has to run out).
    HolderKill,
    /// SIGSTOP of the lock worker holding the lock for longer than its TTL:
    /// the other takes it, and the frozen one, thawed, is fenced off.
    HolderFreeze,
}

impl Fault {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill+restart",
            Fault::Freeze => "freeze",
            Fault::Partition => "partition",
            Fault::LeaderKill => "leader kill",
            Fault::HolderKill => "holder kill",
            Fault::HolderFreeze => "holder freeze",
        }
    }

    /// The backend is unreachable for the client while the fault holds.
    fn cuts_client_off(self, members: usize) -> bool {
        members == 1 && matches!(self, Fault::Kill | Fault::Freeze)
    }
}

/// One scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// The backend.
    pub backend: Backend,
    /// 1 (single node) or 3.
    pub members: usize,
    /// The fault.
    pub fault: Fault,
}

impl Scenario {
    /// "etcd×3 partition".
    pub fn name(&self) -> String {
        format!(
            "{}×{} {}",
            self.backend.name(),
            self.members,
            self.fault.name()
        )
    }
}

/// The subset `cargo xtask test` runs: kill + restart and freeze of each
/// single server, one partition of a three-member etcd.
pub fn ci_subset() -> Vec<Scenario> {
    let mut all = Vec::new();
    for backend in [Backend::Etcd, Backend::Zookeeper, Backend::Consul] {
        for fault in [Fault::Kill, Fault::Freeze] {
            all.push(Scenario {
                backend,
                members: 1,
                fault,
            });
        }
    }
    all.push(Scenario {
        backend: Backend::Etcd,
        members: 3,
        fault: Fault::Partition,
    });
    all
}

/// Every scenario of `cargo xtask chaos`.
pub fn full_suite() -> Vec<Scenario> {
    let mut all = Vec::new();
    for backend in [Backend::Etcd, Backend::Zookeeper, Backend::Consul] {
        for fault in [
            Fault::Kill,
            Fault::Freeze,
            Fault::HolderKill,
            Fault::HolderFreeze,
        ] {
            all.push(Scenario {
                backend,
                members: 1,
                fault,
            });
        }
        for fault in [
            Fault::Kill,
            Fault::Freeze,
            Fault::LeaderKill,
            Fault::Partition,
        ] {
            if backend == Backend::Consul && fault == Fault::Partition {
                continue; // Consul's peer ports cannot be proxied (see README)
            }
            all.push(Scenario {
                backend,
                members: 3,
                fault,
            });
        }
    }
    all
}

/// Durations and sizes of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Before the fault.
    pub warmup: Duration,
    /// How long the fault holds.
    pub hold: Duration,
    /// After the fault heals, before the workloads stop.
    pub after: Duration,
    /// anykv's per-attempt timeout (`?timeout=`).
    pub timeout: Duration,
    /// Writer tasks.
    pub writers: usize,
    /// Shared-key clients and keys.
    pub clients: usize,
    /// Shared keys.
    pub keys: usize,
    /// The lock workers' TTL.
    pub lock_ttl: Duration,
    /// How long a lock holder's fault lasts at least: longer than any
    /// backend's lease or session takes to run out for `lock_ttl`.
    pub handover_wait: Duration,
    /// Extra URL options (`key=value&…`) for every handle.
    pub url_options: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            warmup: Duration::from_secs(3),
            hold: Duration::from_secs(5),
            after: Duration::from_secs(8),
            timeout: Duration::from_secs(1),
            writers: 4,
            clients: 4,
            keys: 4,
            lock_ttl: Duration::from_secs(3),
            handover_wait: Duration::from_secs(24),
            url_options: String::new(),
        }
    }
}

impl Settings {
    /// The longest an operation may take: every attempt's timeout, the
    /// backoffs between them, and a second of slack for a loaded machine.
    fn op_bound(&self) -> Duration {
        let retry = anykv::RetryPolicy::default();
        let backoffs: Duration = (1..retry.max_attempts)
            .map(|a| (retry.initial_backoff * 2u32.pow(a - 1)).min(retry.max_backoff))
            .sum();
        self.timeout * retry.max_attempts + backoffs + Duration::from_secs(1)
    }
}

/// The per-attempt timeout of the handle that reads the results.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one scenario to its row of the table.
pub async fn run(ctx: &Ctx, exe: &Path, sc: Scenario, set: &Settings) -> anyhow::Result<Row> {
    let tag = format!(
        "chaos-{}-{}-{}",
        sc.backend.name(),
        sc.members,
        sc.fault.name().replace([' ', '+'], "-")
    );
    let proxied = sc.fault == Fault::Partition;
    let mut cluster =
        tokio::task::block_in_place(|| sc.backend.cluster(ctx, &tag, sc.members, proxied))?;
    let proxies = start_proxies(&cluster).await?;
    tokio::task::block_in_place(|| cluster.wait_all_ready(Duration::from_secs(90)))?;
    let options = |timeout: Duration| {
        let mut o = format!("timeout={}ms&prefix={tag}", timeout.as_millis());
        if !set.url_options.is_empty() {
            o = format!("{o}&{}", set.url_options);
        }
        o
    };
    let url = cluster.url(&options(set.timeout));
    let kv = open_when_ready(&url, Duration::from_secs(30)).await?;
    let mut row = Row::new(&sc);

    // A lock holder's lease or session has to run out before the handover
    // (Consul's session TTL is at least 10 s and runs out within 2 × TTL).
    let (hold, after) = match sc.fault {
        Fault::HolderKill => (Duration::ZERO, set.handover_wait),
        Fault::HolderFreeze => (set.handover_wait, set.after),
        _ => (set.hold, set.after),
    };
    let epoch = Instant::now();
    let until = epoch + set.warmup + hold + after;
    let bound = set.op_bound();
    let liveness = Arc::new(Mutex::new(Vec::new()));
    let liveness_task = workload::record_liveness(&kv, liveness.clone());
    let watched = Arc::new(Mutex::new(Watched::default()));
    let watch_task = workload::watch_writes(kv.clone(), watched.clone()).await?;
    let writers = tokio::spawn(workload::writers(kv.clone(), set.writers, until, bound));
    let shared = tokio::spawn(workload::shared_clients(
        kv.clone(),
        set.clients,
        set.keys,
        until,
        epoch,
        bound,
    ));
    let run_for = until.saturating_duration_since(Instant::now());
    let workers = [
        Worker::spawn(exe, &url, "worker-a", run_for, set.lock_ttl)?,
        Worker::spawn(exe, &url, "worker-b", run_for, set.lock_ttl)?,
    ];

    tokio::time::sleep(set.warmup).await;
    let fault_at = Instant::now();
    let fault_ms = locks::wall_ms();
    let mut victim_worker = None;
    let heal_at = match sc.fault {
        Fault::Kill | Fault::LeaderKill => {
            let i = target(&cluster, sc.fault)?;
            cluster.kill(i)?;
            tokio::time::sleep(set.hold).await;
            cluster.restart(i)?;
            Instant::now()
        }
        Fault::Freeze => {
            cluster.freeze(0)?;
            tokio::time::sleep(set.hold).await;
            cluster.thaw(0)?;
            Instant::now()
        }
        Fault::Partition => {
            let i = target(&cluster, sc.fault)?;
            partition(&proxies, &cluster, i, true)?;
            tokio::time::sleep(set.hold).await;
            partition(&proxies, &cluster, i, false)?;
            Instant::now()
        }
        Fault::HolderKill | Fault::HolderFreeze => {
            let holder = current_holder(&kv).await?;
            let (owner, token) = holder
                .map(|h| (h.owner.unwrap_or_default(), h.fencing_token))
                .unwrap_or_default();
            let w = workers.iter().find(|w| w.name == owner);
            match (w, sc.fault) {
                (Some(w), Fault::HolderKill) => {
                    signal(w.pid(), "KILL");
                    victim_worker = Some((owner, token));
                }
                (Some(w), _) => {
                    signal(w.pid(), "STOP");
                    tokio::time::sleep(hold).await;
                    signal(w.pid(), "CONT");
                    victim_worker = Some((owner, token));
                }
                (None, _) => row.violation("no worker held the lock at the fault"),
            }
            Instant::now()
        }
    };

    let (log, write_timing) = writers.await??;
    let (history, shared_timing) = shared.await??;
    let mut steps = Vec::new();
    for w in workers {
        let name = w.name.clone();
        let s = tokio::task::block_in_place(|| w.finish(Duration::from_secs(60)))?;
        steps.push((name, s));
    }

    // The checks read through a handle of their own: reading tens of
    // thousands of keys is no operation the faults' deadlines are about.
    let checker = open_when_ready(&cluster.url(&options(CHECK_TIMEOUT)), CHECK_TIMEOUT).await?;
    // Settle: the watch delivers what the store holds, within a bound.
    let store = settle(&checker, &watched, Duration::from_secs(20)).await?;
    watch_task.abort();
    liveness_task.abort();

    check_writes(&mut row, &log, &store, &watched);
    check_timing(&mut row, &[&write_timing, &shared_timing], heal_at);
    let verdict =
        tokio::task::block_in_place(|| linearizability::check(&history, Duration::from_secs(30)));
    row.shared_ops = history.len();
    match &verdict {
        Verdict::Linearizable => {}
        v => row.violation(format!("shared keys: {v}")),
    }
    row.linearizable = Some(matches!(verdict, Verdict::Linearizable));
    check_locks(&mut row, &checker, &steps, victim_worker.as_ref(), fault_ms).await?;
    if sc.fault.cuts_client_off(sc.members) {
        check_outage_signals(&mut row, &watched, &liveness, fault_at, set.timeout);
    }
    if let Some(ended) = &watched.lock().unwrap_or_else(|p| p.into_inner()).ended {
        row.violation(format!("watch: {ended}"));
    }

    let _ = checker.delete_prefix(&Prefix::root()).await;
    kv.close().await?;
    checker.close().await?;
    drop(proxies);
    drop(cluster);
    Ok(row)
}

/// The member a fault hits: the leader for leader faults and partitions,
/// else the first member.
fn target(cluster: &Cluster, fault: Fault) -> anyhow::Result<usize> {
    match fault {
        Fault::LeaderKill | Fault::Partition if cluster.members.len() > 1 => {
            tokio::task::block_in_place(|| cluster.leader(Duration::from_secs(20)))
        }
        _ => Ok(0),
    }
}

/// Proxies in front of every proxied port: (member, proxy).
async fn start_proxies(cluster: &Cluster) -> anyhow::Result<Vec<(usize, Proxy)>> {
    let mut out = Vec::new();
    for (i, m) in cluster.members.iter().enumerate() {
        for port in std::iter::once(&m.client).chain(m.peers.iter()) {
            if port.is_proxied() {
                let listen = SocketAddr::from(([127, 0, 0, 1], port.reach));
                let upstream = SocketAddr::from(([127, 0, 0, 1], port.listen));
                out.push((i, Proxy::start(listen, upstream).await?));
            }
        }
    }
    Ok(out)
}

/// Cuts member `i` off (or heals it): its own proxies go silent, and the
/// others' proxies drop what its process sends.
fn partition(
    proxies: &[(usize, Proxy)],
    cluster: &Cluster,
    i: usize,
    cut: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(!proxies.is_empty(), "partition needs a proxied cluster");
    let pid = cluster.pid(i)?;
    for (m, p) in proxies {
        match (*m == i, cut) {
            (true, true) => p.set_mode(Mode::Blackhole),
            (true, false) => p.set_mode(Mode::Pass),
            (false, true) => p.block_origin(pid),
            (false, false) => p.unblock_origin(pid),
        }
    }
    Ok(())
}

/// Who holds the workers' lock, waiting (up to 10 s) for a moment when one
/// does: the workers hand it over back to back, and a query can fall
/// between a release and the next acquisition.
async fn current_holder(kv: &Kv) -> anyhow::Result<Option<anykv::LockInfo>> {
    let lock = Key::new(locks::LOCK)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holder = kv.lock_holder(&lock).await?;
        if holder.is_some() || Instant::now() >= deadline {
            return Ok(holder);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signals one process through `kill` (the workspace forbids `unsafe`).
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Opens the store, retrying until a probe succeeds or `limit` passes.
async fn open_when_ready(url: &str, limit: Duration) -> anyhow::Result<Kv> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match anykv::open(url).await {
            Ok(kv) => match kv.probe().await {
                Ok(()) => return Ok(kv),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            anyhow::bail!("{url} not ready after {limit:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the watch has delivered every key the store holds under the
/// writers' prefix (or `limit` passes); returns the store's pairs.
async fn settle(
    kv: &Kv,
    watched: &Arc<Mutex<Watched>>,
    limit: Duration,
) -> anyhow::Result<Vec<anykv::KvPair>> {
    let deadline = Instant::now() + limit;
    let prefix = Prefix::new(workload::WRITES)?;
    loop {
        let store = match kv.list(&prefix).await {
            Ok(s) => s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "settle: list failed, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let delivered = {
            let w = watched.lock().unwrap_or_else(|p| p.into_inner());
            let keys: std::collections::HashSet<&str> = w
                .events
                .iter()
                .filter_map(|e| match e {
                    anykv::Event::Put { kv, .. } => Some(kv.key.as_str()),
                    anykv::Event::Delete { .. } => None,
                })
                .collect();
            store.iter().all(|p| keys.contains(p.key.as_str()))
        };
        if delivered || Instant::now() >= deadline {
            // A last moment for stragglers (duplicates) to show up.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(store);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check_writes(
    row: &mut Row,
    log: &WriteLog,
    store: &[anykv::KvPair],
    watched: &Arc<Mutex<Watched>>,
) {
    row.acked = log.acked();
    row.unknown = log.unknown();
    let s = log.check_store(store);
    row.lost = s.lost.len();
    if !s.lost.is_empty() {
        row.violation(format!(
            "{} acknowledged writes lost, e.g. {}",
            s.lost.len(),
            s.lost[0]
        ));
    }
    if !s.phantom.is_empty() {
        row.violation(format!(
            "{} writes that never happened, e.g. {}",
            s.phantom.len(),
            s.phantom[0]
        ));
    }
    let w = watched.lock().unwrap_or_else(|p| p.into_inner());
    let e = log.check_events(&w.events, store);
    row.events = w.events.len();
    row.invented = e.invented.len();
    row.duplicates = e.duplicates.len();
    row.out_of_order = e.out_of_order;
    row.missing = e.missing.len();
    if !e.is_clean() {
        row.violation(format!(
            "watch: {} invented (e.g. {:?}), {} duplicated, {} out of order, {} never delivered",
            e.invented.len(),
            e.invented.first(),
            e.duplicates.len(),
            e.out_of_order,
            e.missing.len()
        ));
    }
}

fn check_timing(row: &mut Row, timings: &[&Timing], heal_at: Instant) {
    for t in timings {
        row.max_latency = row.max_latency.max(t.max_latency);
        row.over_bound += t.over_bound;
    }
    if row.over_bound > 0 {
        row.violation(format!(
            "{} operations outlived their deadline (longest {:?})",
            row.over_bound, row.max_latency
        ));
    }
    row.recovery = timings
        .iter()
        .filter_map(|t| t.recovery_after(heal_at))
        .min();
    if row.recovery.is_none() {
        row.violation("no successful write after the fault healed");
    }
}

async fn check_locks(
    row: &mut Row,
    kv: &Kv,
    steps: &[(String, Vec<locks::Step>)],
    victim: Option<&(String, u64)>,
    fault_ms: u64,
) -> anyhow::Result<()> {
    let counter = match kv.get(&Key::new(locks::COUNTER)?).await? {
        Some(p) => serde_json::from_slice(&p.value)?,
        None => Counter::default(),
    };
    let all: Vec<Vec<locks::Step>> = steps.iter().map(|(_, s)| s.clone()).collect();
    let c = locks::check(&all, counter);
    row.lock_increments = c.increments;
    row.lock_fenced = c.fenced;
    for v in c.violations {
        row.violation(format!("lock: {v}"));
    }
    if c.increments == 0 {
        row.violation("lock: no increment at all");
    }
    if let Some((victim, token)) = victim {
        if !locks::was_holding(steps, victim, *token, fault_ms) {
            row.violation(format!(
                "lock: {victim} had released token {token} before the fault"
            ));
        }
        row.handover = locks::handover(steps, victim, fault_ms);
        if row.handover.is_none() {
            row.violation(format!("lock: never handed over after {victim} stopped"));
        }
    }
    Ok(())
}

/// A single server killed or frozen: the watch must say so within
/// 2 × timeout (plus a second of slack for this loaded machine), and
/// liveness must turn not-alive, then alive again.
fn check_outage_signals(
    row: &mut Row,
    watched: &Arc<Mutex<Watched>>,
    liveness: &Arc<Mutex<Vec<(Instant, bool)>>>,
    fault_at: Instant,
    timeout: Duration,
) {
    let w = watched.lock().unwrap_or_else(|p| p.into_inner());
    row.watch_signal = w
        .errors
        .iter()
        .filter(|(at, _)| *at >= fault_at)
        .map(|(at, _)| at.duration_since(fault_at))
        .min();
    match row.watch_signal {
        Some(d) if d <= timeout * 2 + Duration::from_secs(1) => {}
        Some(d) => row.violation(format!("watch noticed the outage only after {d:?}")),
        None => row.violation("watch never reported the outage"),
    }
    let l = liveness.lock().unwrap_or_else(|p| p.into_inner());
    let down = l.iter().find(|(at, alive)| *at >= fault_at && !alive);
    let up = down.and_then(|(d, _)| l.iter().find(|(at, alive)| at > d && *alive));
    match (down, up) {
        (Some(_), Some(_)) => {}
        (None, _) => row.violation("liveness never turned not-alive"),
        (Some(_), None) => row.violation("liveness never came back"),
    }
}

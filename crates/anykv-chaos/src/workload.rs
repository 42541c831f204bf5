//! The workloads that run through a fault: writers logging every write's
//! fate, clients of a few shared keys recording a history for the
//! linearizability check, a prefix watch, and a liveness recorder.
//!
//! Everything stops at a shared deadline; every operation is timed, since
//! "every operation ends within its deadline" is part of the contract.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anykv::{
    Condition, Error, ErrorKind, Event, Key, Kv, Prefix, PutOptions, Start, Store, Target,
};
use futures::StreamExt;
use rand::Rng;

use crate::{
    history::{Fate, WriteLog},
    linearizability::{self as lin, Call, Operation, Outcome},
};

/// Where the workloads write (below the scenario's namespace).
pub const WRITES: &str = "w";
/// The shared keys of the linearizability clients.
pub const SHARED: &str = "lin";
/// The pause between two operations of one shared-key client.
const PACE: Duration = Duration::from_millis(20);

/// What a run's operations measured.
#[derive(Default, Debug)]
pub struct Timing {
    /// Completion instants of successful writes, for recovery times.
    pub ok_at: Vec<Instant>,
    /// The longest operation.
    pub max_latency: Duration,
    /// Operations that took longer than the bound.
    pub over_bound: usize,
}

impl Timing {
    fn record(&mut self, took: Duration, bound: Duration, ok: bool) {
        self.max_latency = self.max_latency.max(took);
        if took > bound {
            self.over_bound += 1;
        }
        if ok {
            self.ok_at.push(Instant::now());
        }
    }

    /// The first successful write at or after `t`, as a delay from `t`.
    pub fn recovery_after(&self, t: Instant) -> Option<Duration> {
        self.ok_at
            .iter()
            .filter(|at| **at >= t)
            .min()
            .map(|at| at.duration_since(t))
    }
}

/// The fate of a write from its result: a failure that provably never
/// reached the server was not applied; a timeout or a lost connection may
/// have been.
pub fn fate<T>(r: &Result<T, Error>) -> Option<Fate> {
    match r {
        Ok(_) => Some(Fate::Acked),
        Err(e) if e.never_reached_server() => Some(Fate::NotApplied),
        Err(e) if e.indicates_unreachable() => Some(Fate::Unknown),
        Err(e) if e.kind() == ErrorKind::Cancelled => Some(Fate::Unknown),
        Err(_) => None,
    }
}

/// Writers: each puts keys `w/<writer>/<seq>` once, with a unique value,
/// until `until`; returns every attempt's fate and the timing.
pub async fn writers(
    kv: Kv,
    n: usize,
    until: Instant,
    bound: Duration,
) -> anyhow::Result<(WriteLog, Timing)> {
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let timing = Arc::new(Mutex::new(Timing::default()));
    let mut tasks = Vec::new();
    for w in 0..n {
        let (kv, log, timing) = (kv.clone(), log.clone(), timing.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            while Instant::now() < until {
                let key = format!("{WRITES}/{w}/{seq}");
                let value = format!("{w}-{seq}").into_bytes();
                let k = Key::new(&key)?;
                let started = Instant::now();
                let r = kv
                    .put(&k, value.clone().into(), PutOptions::default())
                    .await;
                let took = started.elapsed();
                timing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(took, bound, r.is_ok());
                let Some(f) = fate(&r) else {
                    anyhow::bail!(
                        "writer {w}: unexpected error: {}",
                        r.err().map(|e| e.to_string()).unwrap_or_default()
                    );
                };
                let failed = f != Fate::Acked;
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(key, value, f);
                seq += 1;
                if failed {
                    // Do not spin on a dead backend.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    let timing = std::mem::take(&mut *timing.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((log, timing))
}

/// Clients of `keys` shared keys doing random gets, puts, conditional puts
/// and deletes until `until`; returns the history for the checker.
pub async fn shared_clients(
    kv: Kv,
    clients: usize,
    keys: usize,
    until: Instant,
    epoch: Instant,
    bound: Duration,
) -> anyhow::Result<(Vec<Operation>, Timing)> {
    let history = Arc::new(Mutex::new(Vec::new()));
    let timing = Arc::new(Mutex::new(Timing::default()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (kv, history, timing) = (kv.clone(), history.clone(), timing.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut versions = vec![0u64; keys];
            while Instant::now() < until {
                // Paced: the checker's search grows with the history per key.
                tokio::time::sleep(PACE).await;
                seq += 1;
                let ki = rand::rng().random_range(0..keys);
                let key = format!("{SHARED}/{ki}");
                let k = Key::new(&key)?;
                let value = ((c as u64) << 32) | seq;
                let roll = rand::rng().random_range(0..10);
                let invoke = nanos(epoch);
                let started = Instant::now();
                let (call, outcome) = match roll {
                    0..=3 => {
                        let r = kv.get(&k).await;
                        if let Ok(Some(p)) = &r {
                            versions[ki] = p.version.get();
                        }
                        let outcome = match &r {
                            Ok(found) => Some(Outcome::Got(match found {
                                Some(p) => Some((parse_value(&p.value)?, p.version.get())),
                                None => None,
                            })),
                            Err(_) => None, // a failed read says nothing
                        };
                        (Call::Get, outcome)
                    }
                    4..=7 => {
                        let condition = match roll {
                            4 | 5 => Condition::Always,
                            6 => Condition::IfVersion(anykv::Version::new(versions[ki])),
                            _ => Condition::IfAbsent,
                        };
                        let opts = PutOptions {
                            condition,
                            ..PutOptions::default()
                        };
                        let r = kv.put(&k, value.to_string().into(), opts).await;
                        if let Ok(v) = &r {
                            versions[ki] = v.get();
                        }
                        let outcome = write_outcome(&r, |v| Outcome::Written(v.get()));
                        (
                            Call::Put {
                                value,
                                condition: lin_condition(condition),
                            },
                            outcome,
                        )
                    }
                    _ => {
                        let condition = if roll == 8 {
                            Condition::Always
                        } else {
                            Condition::IfVersion(anykv::Version::new(versions[ki]))
                        };
                        let r = kv.delete(&k, condition).await;
                        let outcome = write_outcome(&r, |existed| Outcome::Deleted(*existed));
                        (
                            Call::Delete {
                                condition: lin_condition(condition),
                            },
                            outcome,
                        )
                    }
                };
                let took = started.elapsed();
                let ok = matches!(
                    outcome,
                    Some(Outcome::Got(_) | Outcome::Written(_) | Outcome::Deleted(_))
                );
                timing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(took, bound, ok);
                let Some(outcome) = outcome else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let unknown = matches!(outcome, Outcome::Unknown);
                let ret = (!unknown).then(|| nanos(epoch));
                if unknown {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Operation {
                        key,
                        client: c,
                        invoke,
                        ret,
                        call,
                        outcome,
                    });
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let history = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    let timing = std::mem::take(&mut *timing.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((history, timing))
}

/// A write's outcome for the checker: `None` when it provably did not
/// happen (left out of the history), `Unknown` when it may have.
fn write_outcome<T>(r: &Result<T, Error>, ok: impl Fn(&T) -> Outcome) -> Option<Outcome> {
    match r {
        Ok(v) => Some(ok(v)),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::AlreadyExists | ErrorKind::NotFound | ErrorKind::Conflict
            ) =>
        {
            Some(Outcome::ConditionFailed)
        }
        Err(e) if e.never_reached_server() => None,
        Err(_) => Some(Outcome::Unknown),
    }
}

fn lin_condition(c: Condition) -> lin::Condition {
    match c {
        Condition::Always => lin::Condition::Always,
        Condition::IfAbsent => lin::Condition::IfAbsent,
        Condition::IfPresent => lin::Condition::IfPresent,
        Condition::IfVersion(v) => lin::Condition::IfVersion(v.get()),
    }
}

fn parse_value(v: &[u8]) -> anyhow::Result<u64> {
    std::str::from_utf8(v)?
        .parse()
        .map_err(|e| anyhow::anyhow!("a shared key holds a value no client wrote: {e}"))
}

fn nanos(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What a watch delivered.
#[derive(Default, Debug)]
pub struct Watched {
    /// Events, in delivery order.
    pub events: Vec<Event>,
    /// Error items: when, and what.
    pub errors: Vec<(Instant, ErrorKind)>,
    /// The stream ended (a watch must never end on its own).
    pub ended: Option<String>,
}

/// A prefix watch on the writers' keys, recording into `out` until dropped.
pub async fn watch_writes(
    kv: Kv,
    out: Arc<Mutex<Watched>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = kv
        .watch(Target::Prefix(Prefix::new(WRITES)?), Start::Now)
        .await?;
    Ok(tokio::spawn(async move {
        while let Some(item) = stream.next().await {
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            match item {
                Ok(ev) => w.events.push(ev),
                Err(e) => w.errors.push((Instant::now(), e.kind())),
            }
        }
        out.lock().unwrap_or_else(|p| p.into_inner()).ended = Some("the stream ended".into());
    }))
}

/// Liveness transitions of a handle, recorded until dropped.
pub fn record_liveness(
    kv: &Kv,
    out: Arc<Mutex<Vec<(Instant, bool)>>>,
) -> tokio::task::JoinHandle<()> {
    let mut states = kv.liveness().subscribe();
    tokio::spawn(async move {
        let mut last = None;
        while let Some(alive) = states.next().await {
            if last != Some(alive) {
                out.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), alive));
                last = Some(alive);
            }
        }
    })
}

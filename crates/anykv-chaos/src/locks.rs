//! Fenced lock counters across processes.
//!
//! Each worker is a child process (`anykv-chaos lock-worker`) with its own
//! connection: it takes the lock, reads the counter, checks that the stored
//! fencing token is below its own, writes `n + 1` with its token as a
//! compare-and-swap on the counter's version, and releases. It reports every
//! step as a JSON line; the parent checks the counter against them:
//! increments are neither lost nor doubled, and the tokens of successive
//! increments strictly increase (a stale holder is fenced off).

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anykv::{ErrorKind, Key, LockOptions, PutOptions, Store, Version};
use serde::{Deserialize, Serialize};

/// The lock and the counter it guards (below the scenario's namespace).
pub const LOCK: &str = "fence/lock";
/// The counter.
pub const COUNTER: &str = "fence/counter";

/// One step of a worker. Fields: `t`, wall-clock milliseconds
/// ([`wall_ms`]); `token`, the worker's fencing token; `n`, the counter
/// written; `stored`, the token found in the counter.
#[allow(missing_docs)]
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Step {
    /// Took the lock.
    Acquired { t: u64, token: u64 },
    /// Wrote `n` under `token`.
    Incremented { t: u64, token: u64, n: u64 },
    /// The stored token was not below ours: we were no longer the holder.
    Stale { t: u64, token: u64, stored: u64 },
    /// The compare-and-swap failed: someone wrote since we read.
    Fenced { t: u64, token: u64 },
    /// The write's outcome is unknown (timeout, lost connection).
    Unknown { t: u64, token: u64 },
    /// The guard reported the lock lost.
    Lost { t: u64, token: u64 },
    /// Released the lock.
    Released { t: u64, token: u64 },
    /// An operation failed.
    Failed { t: u64, what: String },
}

/// How long a worker keeps the lock after writing: a critical section long
/// enough that a holder killed or frozen by the suite is caught holding it.
const CRITICAL_SECTION: Duration = Duration::from_millis(300);

/// The stored counter.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct Counter {
    /// Increments so far.
    pub n: u64,
    /// The fencing token of the last writer.
    pub token: u64,
}

/// Milliseconds since the Unix epoch: comparable across processes.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn emit(step: &Step) {
    if let Ok(line) = serde_json::to_string(step) {
        println!("{line}");
    }
}

/// The worker's loop (the child process's `main`): lock, read, fence-check,
/// compare-and-swap, release, until `run_for` has passed.
pub async fn worker(url: &str, name: &str, run_for: Duration, ttl: Duration) -> anyhow::Result<()> {
    let kv = anykv::open(url).await?;
    let (lock, counter) = (Key::new(LOCK)?, Key::new(COUNTER)?);
    let until = Instant::now() + run_for;
    while Instant::now() < until {
        let opts = LockOptions {
            ttl,
            wait: Some(until.saturating_duration_since(Instant::now())),
            owner: Some(name.to_owned()),
            ..LockOptions::default()
        };
        let guard = match kv.lock(&lock, opts).await {
            Ok(g) => g,
            Err(e) => {
                emit(&Step::Failed {
                    t: wall_ms(),
                    what: format!("lock: {e}"),
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let token = guard.fencing_token();
        emit(&Step::Acquired {
            t: wall_ms(),
            token,
        });
        match kv.get(&counter).await {
            Err(e) => emit(&Step::Failed {
                t: wall_ms(),
                what: format!("get: {e}"),
            }),
            Ok(found) => {
                let (current, version) = match &found {
                    Some(p) => (
                        serde_json::from_slice::<Counter>(&p.value)?,
                        Some(p.version),
                    ),
                    None => (Counter::default(), None),
                };
                if guard.is_lost() {
                    emit(&Step::Lost {
                        t: wall_ms(),
                        token,
                    });
                } else if current.token >= token && version.is_some() {
                    emit(&Step::Stale {
                        t: wall_ms(),
                        token,
                        stored: current.token,
                    });
                } else {
                    increment(&kv, &counter, current, version, token).await?;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CRITICAL_SECTION) => {}
            _ = guard.lost() => emit(&Step::Lost { t: wall_ms(), token }),
        }
        match guard.release().await {
            Ok(()) => emit(&Step::Released {
                t: wall_ms(),
                token,
            }),
            Err(e) => emit(&Step::Failed {
                t: wall_ms(),
                what: format!("release: {e}"),
            }),
        }
    }
    kv.close().await?;
    Ok(())
}

async fn increment(
    kv: &anykv::Kv,
    counter: &Key,
    current: Counter,
    version: Option<Version>,
    token: u64,
) -> anyhow::Result<()> {
    let next = Counter {
        n: current.n + 1,
        token,
    };
    let opts = match version {
        Some(v) => PutOptions::if_version(v),
        None => PutOptions::if_absent(),
    };
    let r = kv
        .put(counter, serde_json::to_vec(&next)?.into(), opts)
        .await;
    let t = wall_ms();
    match r {
        Ok(_) => emit(&Step::Incremented {
            t,
            token,
            n: next.n,
        }),
        Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {
            emit(&Step::Fenced { t, token })
        }
        Err(e) if e.never_reached_server() => emit(&Step::Failed {
            t,
            what: format!("put (not applied): {e}"),
        }),
        Err(_) => emit(&Step::Unknown { t, token }),
    }
    Ok(())
}

/// A running worker process.
pub struct Worker {
    /// Its name (the lock's owner).
    pub name: String,
    child: Child,
}

impl Worker {
    /// Starts `exe lock-worker` against `url` for `run_for`.
    pub fn spawn(
        exe: &Path,
        url: &str,
        name: &str,
        run_for: Duration,
        ttl: Duration,
    ) -> anyhow::Result<Worker> {
        let child = Command::new(exe)
            .args(["lock-worker", "--url", url, "--name", name])
            .arg("--seconds")
            .arg(run_for.as_secs_f64().to_string())
            .arg("--ttl")
            .arg(ttl.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Worker {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the worker (killing it past `limit`) and parses its steps.
    pub fn finish(mut self, limit: Duration) -> anyhow::Result<Vec<Step>> {
        let deadline = Instant::now() + limit;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        let out = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("worker {} has no stdout", self.name))?;
        let mut steps = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line?;
            if let Ok(step) = serde_json::from_str(&line) {
                steps.push(step);
            }
        }
        Ok(steps)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The verdict on a fenced counter.
#[derive(Debug, Default)]
pub struct LockCheck {
    /// Acknowledged increments.
    pub increments: u64,
    /// Increments whose outcome is unknown.
    pub unknown: u64,
    /// The counter's final value.
    pub counter: u64,
    /// Stale or fenced-off attempts (the fence working, not a violation).
    pub fenced: u64,
    /// What broke the contract.
    pub violations: Vec<String>,
}

/// Checks the workers' steps against the final counter.
pub fn check(steps: &[Vec<Step>], final_counter: Counter) -> LockCheck {
    let mut c = LockCheck {
        counter: final_counter.n,
        ..LockCheck::default()
    };
    let mut writes: Vec<(u64, u64)> = Vec::new();
    // A worker whose last step is `Acquired` was killed holding the lock
    // before it reported its write: that write may have been applied (a
    // kill -9 between the server's answer and the report), so its outcome
    // is unknown, like a timed-out one.
    c.unknown += steps
        .iter()
        .filter(|s| matches!(s.last(), Some(Step::Acquired { .. })))
        .count() as u64;
    for s in steps.iter().flatten() {
        match s {
            Step::Incremented { token, n, .. } => {
                c.increments += 1;
                writes.push((*n, *token));
            }
            Step::Unknown { .. } => c.unknown += 1,
            Step::Stale { .. } | Step::Fenced { .. } => c.fenced += 1,
            _ => {}
        }
    }
    if c.counter < c.increments || c.counter > c.increments + c.unknown {
        c.violations.push(format!(
            "counter is {} after {} acknowledged and {} unknown increments",
            c.counter, c.increments, c.unknown
        ));
    }
    writes.sort();
    for pair in writes.windows(2) {
        let ((n1, t1), (n2, t2)) = (pair[0], pair[1]);
        if n1 == n2 {
            c.violations
                .push(format!("increment {n1} acknowledged twice"));
        } else if t2 <= t1 {
            c.violations.push(format!(
                "increment {n2} under token {t2} after increment {n1} under token {t1}"
            ));
        }
    }
    c
}

/// True when `victim` held the lock under `token` at `at_ms`: it acquired it
/// and had not released it by then.
pub fn was_holding(steps: &[(String, Vec<Step>)], victim: &str, token: u64, at_ms: u64) -> bool {
    let Some((_, s)) = steps.iter().find(|(name, _)| name == victim) else {
        return false;
    };
    let acquired = s
        .iter()
        .any(|st| matches!(st, Step::Acquired { token: t, .. } if *t == token));
    let released_before = s
        .iter()
        .any(|st| matches!(st, Step::Released { t, token: tk } if *tk == token && *t < at_ms));
    acquired && !released_before
}

/// The delay from `after_ms` to the first acquisition by a worker other
/// than `except`, from the workers' steps.
pub fn handover(steps: &[(String, Vec<Step>)], except: &str, after_ms: u64) -> Option<Duration> {
    steps
        .iter()
        .filter(|(name, _)| name != except)
        .flat_map(|(_, s)| s.iter())
        .filter_map(|s| match s {
            Step::Acquired { t, .. } if *t >= after_ms => Some(*t),
            _ => None,
        })
        .min()
        .map(|t| Duration::from_millis(t - after_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(n: u64, token: u64) -> Step {
        Step::Incremented { t: 0, token, n }
    }

    #[test]
    fn a_clean_counter_passes_and_each_violation_is_caught() {
        let steps = vec![vec![inc(1, 10), inc(3, 30)], vec![inc(2, 20)]];
        let ok = check(&steps, Counter { n: 3, token: 30 });
        assert!(ok.violations.is_empty(), "{:?}", ok.violations);
        let lost = check(&steps, Counter { n: 2, token: 30 });
        assert_eq!(lost.violations.len(), 1, "an increment lost");
        let stale = vec![vec![inc(1, 10), inc(2, 5)]];
        assert_eq!(
            check(&stale, Counter { n: 2, token: 5 }).violations.len(),
            1
        );
        let twice = vec![vec![inc(1, 10)], vec![inc(1, 11)]];
        assert!(
            !check(&twice, Counter { n: 1, token: 11 })
                .violations
                .is_empty()
        );
        let unknown = vec![vec![inc(1, 10), Step::Unknown { t: 0, token: 11 }]];
        assert!(
            check(&unknown, Counter { n: 2, token: 11 })
                .violations
                .is_empty()
        );
        // Killed after taking the lock, before reporting its write: the
        // write may or may not have landed; two would be one too many.
        let killed = vec![
            vec![inc(1, 10), Step::Acquired { t: 0, token: 11 }],
            vec![inc(3, 12)],
        ];
        for n in [2, 3] {
            let c = check(&killed, Counter { n, token: 12 });
            assert!(c.violations.is_empty(), "{n}: {:?}", c.violations);
        }
        assert!(
            !check(&killed, Counter { n: 4, token: 12 })
                .violations
                .is_empty()
        );
    }
}

//! Only the leader does the work, fenced by its term.
//!
//! Several workers compete for one job. The one that wins does units of work
//! on a shared resource (here the key `work/progress`) and tags every write
//! with its fencing token; the resource refuses a write tagged with an older
//! token than the last one it accepted, so a leader that lost its
//! leadership without noticing (a long GC pause, a partition) cannot corrupt
//! it. A leader stops as soon as `lost()` fires.
//!
//! Two modes, chosen at run time from the backend's capabilities:
//! - **election** (the backend declares sessions): `election(..).campaign(..)`,
//!   the token is `Leadership::term()`;
//! - **lock** (no sessions yet): `lock(..)`, the token is
//!   `LockGuard::fencing_token()`.
//!
//! ```text
//! cargo run --example leader_worker                       # memory://, 3 workers in this process
//! cargo run --example leader_worker -- etcd://127.0.0.1:2379/app --workers 1 --units 20
//! ```
//!
//! Each leader hands over after `--per-term` units (default 3) so that the
//! demo shows several terms; the example exits once `--units` units (default
//! 10) are done. Run it in several terminals with `--workers 1` against a
//! server to see leadership move between processes.

use std::time::Duration;

use anyhow::{Context, bail};
use anykv::{
    CampaignOptions, Condition, Error, ErrorKind, Key, Kv, LockOptions, PutOptions, Store, StoreExt,
};
use serde::{Deserialize, Serialize};

/// How leadership is obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The election API (needs sessions).
    Election,
    /// A lock with a fencing token (backends without sessions).
    Lock,
}

/// The protected resource's state: the work done and the newest token that
/// wrote it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Progress {
    done: u64,
    token: u64,
}

/// What the run did, for the example's test.
#[derive(Debug)]
pub struct Outcome {
    /// How leadership was obtained.
    pub mode: Mode,
    /// The fencing token of each leadership that did work, in order.
    pub tokens: Vec<u64>,
    /// Units done in all.
    pub done: u64,
}

/// Settings of a run.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Workers started by this process.
    pub workers: usize,
    /// Units of work to do in all.
    pub units: u64,
    /// Units one leader does before it hands over.
    pub per_term: u64,
}

const ELECTION: &str = "leaders/worker";
const PROGRESS: &str = "work/progress";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&["workers", "units", "per-term"])?;
    let url = args.positional(0, "memory://leader-demo");
    let settings = Settings {
        workers: args.value("workers", 3)?,
        units: args.value("units", 10)?,
        per_term: args.value("per-term", 3)?,
    };
    let outcome = run(&url, settings).await?;
    println!(
        "done: {} units in {:?} mode, tokens {:?}",
        outcome.done, outcome.mode, outcome.tokens
    );
    Ok(())
}

/// Runs `settings.workers` workers against `url` until the work is done.
pub async fn run(url: &str, settings: Settings) -> anyhow::Result<Outcome> {
    let kv = anykv::open(url)
        .await
        .with_context(|| format!("opening {url}"))?;
    run_on(kv, settings).await
}

/// [`run`] on an open store.
pub async fn run_on(kv: Kv, settings: Settings) -> anyhow::Result<Outcome> {
    let caps = kv.capabilities();
    let mode = if caps.sessions.is_some() {
        Mode::Election
    } else if caps.locks {
        Mode::Lock
    } else {
        bail!("{} has neither sessions nor locks", kv.backend());
    };
    println!("{}: leadership by {mode:?}", kv.backend());
    // A finished job from an earlier run: start a new one. (Only when it is
    // complete, so that workers in other processes joining late are safe.)
    if let (progress, Some(version)) = read_progress(&kv).await?
        && progress.done >= settings.units
    {
        let _ = kv
            .delete(&Key::new(PROGRESS)?, Condition::IfVersion(version))
            .await;
    }

    let workers: Vec<_> = (0..settings.workers)
        .map(|i| tokio::spawn(worker(kv.clone(), format!("worker-{i}"), mode, settings)))
        .collect();
    let mut tokens = Vec::new();
    for w in workers {
        tokens.extend(w.await??);
    }
    tokens.sort_unstable();
    let done = read_progress(&kv).await?.0.done;
    Ok(Outcome { mode, tokens, done })
}

/// One worker: waits for leadership, works while it leads, hands over,
/// until the work is done. Returns the tokens under which it worked.
async fn worker(kv: Kv, name: String, mode: Mode, settings: Settings) -> anyhow::Result<Vec<u64>> {
    let mut tokens = Vec::new();
    // Bounded: a worker that never gets to lead gives up instead of hanging.
    let wait = Duration::from_secs(30);
    loop {
        if read_progress(&kv).await?.0.done >= settings.units {
            return Ok(tokens);
        }
        match mode {
            Mode::Election => {
                let election = kv.election(&Key::new(ELECTION)?);
                let opts = CampaignOptions::default().with_wait(wait);
                let leadership = election.campaign(name.clone().into(), opts).await?;
                let token = leadership.term();
                println!("{name} leads, term {token}");
                let lost = leadership.lost();
                let worked = lead(&kv, &name, token, lost, settings).await?;
                if worked {
                    tokens.push(token);
                }
                // Resigning deletes the candidate key: the next in line leads.
                leadership.resign().await?;
            }
            Mode::Lock => {
                let opts = LockOptions {
                    wait: Some(wait),
                    owner: Some(name.clone()),
                    ..LockOptions::default()
                };
                let guard = kv.lock(&Key::new(ELECTION)?, opts).await?;
                let token = guard.fencing_token();
                println!("{name} holds the lock, fencing token {token}");
                let worked = lead(&kv, &name, token, guard.lost(), settings).await?;
                if worked {
                    tokens.push(token);
                }
                guard.release().await?;
            }
        }
        // Let another worker take a turn (the demo's handover).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The leader's work: up to `per_term` units, stopping at once if
/// leadership is lost or a newer token has written the resource.
/// Returns whether it did any unit.
async fn lead(
    kv: &Kv,
    name: &str,
    token: u64,
    lost: impl std::future::Future<Output = ()>,
    settings: Settings,
) -> anyhow::Result<bool> {
    tokio::pin!(lost);
    let mut worked = false;
    for _ in 0..settings.per_term {
        tokio::select! {
            () = &mut lost => {
                println!("{name}: leadership lost, stopping");
                return Ok(worked);
            }
            unit = do_unit(kv, token, settings.units) => match unit? {
                Some(done) => {
                    println!("{name} (token {token}): unit {done} done");
                    worked = true;
                }
                None => return Ok(worked),
            },
        }
    }
    Ok(worked)
}

/// One unit of work, written to the resource only if no newer token has
/// written it (the fencing check) and nobody wrote it since it was read
/// (compare-and-swap). `None` when the work is complete.
async fn do_unit(kv: &Kv, token: u64, units: u64) -> anyhow::Result<Option<u64>> {
    loop {
        let (progress, version) = read_progress(kv).await?;
        if progress.done >= units {
            return Ok(None);
        }
        if progress.token > token {
            bail!("fenced out: token {token} is older than {}", progress.token);
        }
        // The work itself would happen here.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let next = Progress {
            done: progress.done + 1,
            token,
        };
        let condition = match version {
            Some(v) => Condition::IfVersion(v),
            None => Condition::IfAbsent,
        };
        let value = serde_json::to_vec(&next)?;
        let opts = PutOptions {
            condition,
            ..PutOptions::default()
        };
        match kv.put(&Key::new(PROGRESS)?, value.into(), opts).await {
            Ok(_) => return Ok(Some(next.done)),
            // Someone wrote in between: read again, and let the fencing
            // check decide whether we may still write.
            Err(e) if matches!(e.kind(), ErrorKind::Conflict | ErrorKind::AlreadyExists) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The resource's state and version (`None`: never written).
async fn read_progress(kv: &Kv) -> anyhow::Result<(Progress, Option<anykv::Version>)> {
    match kv.get(&Key::new(PROGRESS)?).await? {
        None => Ok((Progress::default(), None)),
        Some(pair) => {
            let progress = serde_json::from_slice(&pair.value).map_err(|e| Error::Codec {
                key: PROGRESS.into(),
                source: Box::new(e),
            })?;
            Ok((progress, Some(pair.version)))
        }
    }
}

//! `anykv lock KEY -- COMMAND…`: take a lock, run the command while it is
//! held, and give it back.
//!
//! The command sees the fencing token in `ANYKV_FENCING_TOKEN`. The lock's
//! lease is renewed by the driver for as long as the guard lives; if the
//! driver reports the lock lost, the command is killed at once (it may no
//! longer assume exclusive access) and the tool exits 5. Otherwise the tool
//! releases the lock after the command exits and exits with its code.
//!
//! Running and killing the command: [`crate::child`].

use std::time::Duration;

use anykv::{Error, Key, Kv, LockGuard, LockOptions, Store};

use crate::{
    child::{self, CommandLine, Ran},
    cli::LockArgs,
    exit::{self, Failure},
    signals::Signals,
};

/// Environment variable carrying the fencing token to the command.
pub const TOKEN_ENV: &str = "ANYKV_FENCING_TOKEN";

/// A checked `lock` command.
#[derive(Debug)]
pub struct LockPlan {
    key: Key,
    ttl: Duration,
    wait: Option<Duration>,
    owner: String,
    command: CommandLine,
}

impl LockPlan {
    /// From the parsed arguments (clap guarantees a non-empty command).
    pub fn new(key: Key, a: LockArgs) -> Self {
        LockPlan {
            key,
            ttl: a.ttl,
            wait: a.wait,
            owner: a
                .owner
                .unwrap_or_else(|| format!("anykv pid {}", std::process::id())),
            command: CommandLine::new(a.child.command),
        }
    }
}

/// Runs the plan; the exit code is the command's.
pub async fn run(kv: &Kv, plan: LockPlan) -> Result<u8, Failure> {
    if plan.ttl.is_zero() {
        return Err(Failure::usage("--ttl must be positive"));
    }
    // Installed before waiting, so Ctrl-C while queued for the lock ends the
    // wait cleanly (the driver withdraws the request when the future drops).
    let mut signals = Signals::new();
    let guard = tokio::select! {
        g = acquire(kv, &plan) => g?,
        s = signals.next() => {
            return Err(Failure::new(
                128 + child::signal_number(s),
                format!("interrupted while waiting for lock {}", plan.key),
            ));
        }
    };

    let env = [(TOKEN_ENV, guard.fencing_token().to_string())];
    let ran = child::run_while(&plan.command, &env, guard.lost(), &mut signals).await;
    match ran {
        Ok(Ran::Exited(code)) => {
            release(guard).await;
            Ok(code)
        }
        Ok(Ran::Lost) => {
            let _ = guard.release().await;
            Err(Failure::new(
                exit::LOCK,
                format!("lock lost: {}; the command was killed", plan.key),
            ))
        }
        Err(f) => {
            release(guard).await;
            Err(f)
        }
    }
}

async fn acquire(kv: &Kv, plan: &LockPlan) -> Result<LockGuard, Failure> {
    let opts = LockOptions {
        ttl: plan.ttl,
        wait: plan.wait,
        owner: Some(plan.owner.clone()),
        // The command decides how long it holds the lock: no max_hold.
        ..LockOptions::default()
    };
    if plan.wait == Some(Duration::ZERO) {
        return match kv.try_lock(&plan.key, opts).await? {
            Some(g) => Ok(g),
            None => Err(busy(kv, &plan.key, "").await),
        };
    }
    match kv.lock(&plan.key, opts).await {
        Ok(g) => Ok(g),
        Err(Error::Timeout { .. }) => {
            let after = plan
                .wait
                .map(|w| format!(" after {}", humantime::format_duration(w)))
                .unwrap_or_default();
            Err(busy(kv, &plan.key, &after).await)
        }
        Err(e) => Err(e.into()),
    }
}

/// "lock busy" with the holder, when the backend can say who it is.
async fn busy(kv: &Kv, key: &Key, after: &str) -> Failure {
    let holder = match kv.lock_holder(key).await {
        Ok(Some(info)) => match info.owner {
            Some(owner) => format!(" (held by {owner}, fencing token {})", info.fencing_token),
            None => format!(" (fencing token {})", info.fencing_token),
        },
        _ => String::new(),
    };
    Failure::new(
        exit::LOCK,
        format!("lock busy: {key} is held{holder}; not acquired{after}"),
    )
}

/// Releases after the command; a failure leaves the lease to run out.
async fn release(guard: LockGuard) {
    let key = guard.key().clone();
    if let Err(e) = guard.release().await {
        eprintln!(
            "warning: releasing lock {key} failed ({}); it frees itself when its lease runs out",
            Failure::from(e)
        );
    }
}

//! `anykv lock KEY -- COMMAND…`: take a lock, run the command while it is
//! held, and give it back.
//!
//! The command sees the fencing token in `ANYKV_FENCING_TOKEN`. The lock's
//! lease is renewed by the driver for as long as the guard lives; if the
//! driver reports the lock lost, the command is killed at once (it may no
//! longer assume exclusive access) and the tool exits 5. Otherwise the tool
//! releases the lock after the command exits and exits with its code.
//!
//! Process groups (Unix): when stdin is not a terminal (scripts, cron,
//! systemd), the command runs in a process group of its own, so that losing
//! the lock kills the command *and everything it started*, and Ctrl-C or
//! SIGTERM sent to anykv is forwarded to that group. When stdin is a
//! terminal, the command stays in the terminal's foreground group so that
//! it can read the terminal and receives Ctrl-C directly; then only the
//! command process itself is killed on loss (the same trade-off as GNU
//! `timeout --foreground`).

use std::{ffi::OsString, future::Future, io::IsTerminal, process::ExitStatus, time::Duration};

use anykv::{Error, Key, Kv, LockGuard, LockOptions, Store};
use tokio::process::{Child, Command};

use crate::{
    cli::LockArgs,
    exit::{self, Failure},
    signals::{Signals, Stop},
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
    program: OsString,
    args: Vec<OsString>,
}

impl LockPlan {
    /// From the parsed arguments (clap guarantees a non-empty command).
    pub fn new(key: Key, a: LockArgs) -> Self {
        let mut command = a.command.into_iter();
        LockPlan {
            key,
            ttl: a.ttl,
            wait: a.wait,
            owner: a
                .owner
                .unwrap_or_else(|| format!("anykv pid {}", std::process::id())),
            program: command.next().unwrap_or_default(),
            args: command.collect(),
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
                128 + signal_number(s),
                format!("interrupted while waiting for lock {}", plan.key),
            ));
        }
    };

    let own_group = cfg!(unix) && !std::io::stdin().is_terminal();
    let mut command = Command::new(&plan.program);
    command
        .args(&plan.args)
        .env(TOKEN_ENV, guard.fencing_token().to_string())
        .kill_on_drop(true);
    #[cfg(unix)]
    if own_group {
        command.process_group(0);
    }
    let spawned = command.spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            release(guard).await;
            return Err(spawn_failure(&plan.program, &e));
        }
    };
    let outcome = supervise(&mut child, own_group, guard.lost(), &mut signals).await;
    match outcome {
        Ok(Supervised::Exited(status)) => {
            release(guard).await;
            Ok(exit_code(status))
        }
        Ok(Supervised::LockLost) => {
            let _ = guard.release().await;
            Err(Failure::new(
                exit::LOCK,
                format!("lock lost: {}; the command was killed", plan.key),
            ))
        }
        Err(e) => {
            let _ = child.start_kill();
            release(guard).await;
            Err(Failure::new(
                exit::FAILURE,
                format!("cannot wait for the command: {e}"),
            ))
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

/// How supervision ended.
#[derive(Debug)]
enum Supervised {
    /// The command exited (the lock is still held).
    Exited(ExitStatus),
    /// The lock was lost; the command has been killed and reaped.
    LockLost,
}

/// Waits for the command, killing it (its whole group when `own_group`)
/// if `lost` resolves first. SIGTERM is forwarded; so is Ctrl-C when the
/// command has its own group (otherwise the terminal already delivers it to
/// the command, which shares anykv's foreground group). The lock stays held
/// until the command has exited.
async fn supervise(
    child: &mut Child,
    own_group: bool,
    lost: impl Future<Output = ()>,
    signals: &mut Signals,
) -> std::io::Result<Supervised> {
    let mut lost = std::pin::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => return status.map(Supervised::Exited),
            () = &mut lost => {
                send(child, own_group, Send::Kill);
                // Fallback for a child that is already gone or on non-Unix.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Ok(Supervised::LockLost);
            }
            s = signals.next() => match s {
                Stop::Terminate => send(child, own_group, Send::Terminate),
                Stop::Interrupt if own_group => send(child, own_group, Send::Interrupt),
                Stop::Interrupt => {}
            },
        }
    }
}

/// A signal for the command.
#[derive(Clone, Copy, Debug)]
enum Send {
    Interrupt,
    Terminate,
    Kill,
}

#[cfg(unix)]
fn send(child: &mut Child, own_group: bool, what: Send) {
    use nix::{
        sys::signal::{Signal, kill, killpg},
        unistd::Pid,
    };
    let signal = match what {
        Send::Interrupt => Signal::SIGINT,
        Send::Terminate => Signal::SIGTERM,
        Send::Kill => Signal::SIGKILL,
    };
    // `id()` is None once the child has been reaped: nothing to signal.
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return;
    };
    // With process_group(0) the child leads a group whose id is its pid.
    let _ = if own_group {
        killpg(Pid::from_raw(pid), signal)
    } else {
        kill(Pid::from_raw(pid), signal)
    };
}

#[cfg(not(unix))]
fn send(child: &mut Child, _own_group: bool, what: Send) {
    if matches!(what, Send::Terminate | Send::Kill) {
        let _ = child.start_kill();
    }
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

fn spawn_failure(program: &OsString, e: &std::io::Error) -> Failure {
    let name = program.to_string_lossy();
    match e.kind() {
        std::io::ErrorKind::NotFound => Failure::new(
            exit::COMMAND_NOT_FOUND,
            format!("command not found: {name}"),
        ),
        _ => Failure::new(exit::CANNOT_EXECUTE, format!("cannot execute {name}: {e}")),
    }
}

/// The command's exit code, or 128+N if signal N killed it (shell convention).
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        // Exit codes are 0..=255 on Unix; Windows codes are wider.
        return u8::try_from(code).unwrap_or(exit::FAILURE);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return u8::try_from(128 + sig).unwrap_or(exit::FAILURE);
        }
    }
    exit::FAILURE
}

fn signal_number(s: Stop) -> u8 {
    match s {
        Stop::Interrupt => 2,
        Stop::Terminate => 15,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn losing_the_lock_kills_the_command_and_its_children() {
        use tokio::io::AsyncBufReadExt;
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let grandchild: u32 = lines.next_line().await.unwrap().unwrap().parse().unwrap();
        let started = Instant::now();
        let lost = tokio::time::sleep(Duration::from_millis(200));
        let outcome = supervise(&mut child, true, lost, &mut Signals::new())
            .await
            .unwrap();
        assert!(matches!(outcome, Supervised::LockLost), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(child.try_wait().unwrap().is_some(), "the command is reaped");
        // The grandchild died with its group (it may linger as a zombie
        // until init reaps it, but it no longer runs).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            if matches!(state, None | Some("Z" | "X")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grandchild still running: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_command_exit_code_passes_through() {
        let mut child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let outcome = supervise(
            &mut child,
            false,
            std::future::pending(),
            &mut Signals::new(),
        )
        .await
        .unwrap();
        let Supervised::Exited(status) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(exit_code(status), 7);
    }

    #[tokio::test]
    async fn a_signal_death_is_128_plus_n() {
        let mut child = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(exit_code(status), 137);
    }

    #[test]
    fn spawn_failures_use_shell_codes() {
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(spawn_failure(&"nope".into(), &missing).code, 127);
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(spawn_failure(&"x".into(), &denied).code, 126);
    }
}

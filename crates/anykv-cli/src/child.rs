//! Running a command while something is held — a lock (`anykv lock`),
//! leadership (`anykv elect`), a session (`anykv register`) — and killing it
//! the moment that is lost.
//!
//! Process groups (Unix): when stdin is not a terminal (scripts, cron,
//! systemd), the command runs in a process group of its own, so that a loss
//! kills the command *and everything it started*, and Ctrl-C or SIGTERM sent
//! to anykv is forwarded to that group. When stdin is a terminal, the
//! command stays in the terminal's foreground group so that it can read the
//! terminal and receives Ctrl-C directly; then only the command process
//! itself is killed on loss (the same trade-off as GNU `timeout
//! --foreground`).

use std::{ffi::OsString, future::Future, io::IsTerminal, process::ExitStatus};

use tokio::process::{Child, Command};

use crate::{
    exit::{self, Failure},
    signals::{Signals, Stop},
};

/// A command to run: the program and its arguments (from after `--`).
#[derive(Debug)]
pub struct CommandLine {
    /// The program.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl CommandLine {
    /// From clap's non-empty `COMMAND [ARGS…]` list.
    pub fn new(words: Vec<OsString>) -> Self {
        let mut words = words.into_iter();
        CommandLine {
            program: words.next().unwrap_or_default(),
            args: words.collect(),
        }
    }
}

/// How a supervised command ended.
#[derive(Debug)]
pub enum Ran {
    /// It exited with this code (128+N if signal N killed it); what was
    /// held is still held.
    Exited(u8),
    /// What was held was lost first; the command has been killed and reaped.
    Lost,
}

/// Runs `command` with `env` added, until it exits or `lost` resolves
/// (then it is killed). `signals` should have been created before waiting
/// for what is held, so that no signal is missed. On `Err` (the command
/// could not be started or waited for) nothing is left running.
pub async fn run_while(
    command: &CommandLine,
    env: &[(&str, String)],
    lost: impl Future<Output = ()>,
    signals: &mut Signals,
) -> Result<Ran, Failure> {
    let own_group = cfg!(unix) && !std::io::stdin().is_terminal();
    let mut cmd = Command::new(&command.program);
    cmd.args(&command.args).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    #[cfg(unix)]
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| spawn_failure(&command.program, &e))?;
    match supervise(&mut child, own_group, lost, signals).await {
        Ok(Supervised::Exited(status)) => Ok(Ran::Exited(exit_code(status))),
        Ok(Supervised::Lost) => Ok(Ran::Lost),
        Err(e) => {
            let _ = child.start_kill();
            Err(Failure::new(
                exit::FAILURE,
                format!("cannot wait for the command: {e}"),
            ))
        }
    }
}

/// How supervision ended.
#[derive(Debug)]
enum Supervised {
    /// The command exited (what was held is still held).
    Exited(ExitStatus),
    /// What was held was lost; the command has been killed and reaped.
    Lost,
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
                return Ok(Supervised::Lost);
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

/// A command that cannot be started: 127 if not found, 126 otherwise (shell convention).
pub fn spawn_failure(program: &OsString, e: &std::io::Error) -> Failure {
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
pub fn exit_code(status: ExitStatus) -> u8 {
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

/// The number of a stop signal, for 128+N exit codes.
pub fn signal_number(s: Stop) -> u8 {
    match s {
        Stop::Interrupt => 2,
        Stop::Terminate => 15,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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
        assert!(matches!(outcome, Supervised::Lost), "{outcome:?}");
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

//! Runs the built `anykv` binary (cargo's `CARGO_BIN_EXE_anykv`) with
//! std::process, with a deadline so that a hung binary fails the test
//! instead of hanging it. std::process is enough here: assert_cmd would add
//! a dependency tree for what a dozen lines do.

#![allow(dead_code)] // each test file uses a different part

use std::{
    io::{Read, Write},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// Longest a single invocation may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anykv"));
    // Tests choose their store explicitly; the caller's environment must not leak in.
    cmd.env_remove("ANYKV_URL").env_remove("ANYKV_LOG");
    cmd
}

/// `anykv --url URL ARGS…`
pub fn anykv(url: &str, args: &[&str]) -> Out {
    let mut cmd = bin();
    cmd.arg("--url").arg(url).args(args);
    run(cmd, None)
}

/// `anykv --url URL ARGS…` with `stdin` piped in.
pub fn anykv_stdin(url: &str, args: &[&str], stdin: &[u8]) -> Out {
    let mut cmd = bin();
    cmd.arg("--url").arg(url).args(args);
    run(cmd, Some(stdin))
}

/// What an invocation produced.
#[derive(Debug)]
pub struct Out {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Raw stdout.
    pub stdout: Vec<u8>,
    /// Stderr as text.
    pub stderr: String,
}

impl Out {
    /// Stdout as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts exit 0 and returns stdout as text.
    pub fn ok(&self) -> String {
        assert_eq!(self.code, Some(0), "expected success: {self:?}");
        self.text()
    }

    /// Asserts a failure with `code` whose stderr is exactly one line
    /// containing `needle` (and no panic or debug dump).
    pub fn fails(&self, code: i32, needle: &str) {
        assert_eq!(self.code, Some(code), "exit code: {self:?}");
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:?}"
        );
        assert!(!self.stderr.contains("panicked"), "panic: {self:?}");
        assert_eq!(
            self.stderr.trim_end_matches('\n').lines().count(),
            1,
            "not one line: {self:?}"
        );
    }
}

/// Runs to completion (within [`DEADLINE`]), feeding `stdin` if given.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>) -> Out {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn anykv");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        let bytes = bytes.to_vec();
        thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        });
    }
    let stdout = reader(child.stdout.take().expect("stdout"));
    let stderr = reader(child.stderr.take().expect("stderr"));
    let code = wait(&mut child, DEADLINE);
    Out {
        code,
        stdout: stdout.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` up to `limit`, killing it (and failing) past that.
pub fn wait(child: &mut Child, limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("anykv did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `redb:///abs/path` for a file in `dir`.
pub fn redb_url(dir: &Path, name: &str) -> String {
    format!("redb://{}", dir.join(name).display())
}

/// Sends SIGTERM with the system's `kill` (the tests use no unsafe code).
pub fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// `url` with a 60 s operation timeout: a 16 MiB write in a debug build on
/// a loaded machine can outlast the default 5 s.
pub fn patient(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}timeout=60s")
}

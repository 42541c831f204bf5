//! Real servers for anykv's test, bench and fault runs: provisioning from
//! Debian packages (cached under `target/xtask`), start on free loopback
//! ports in temp dirs, readiness waits, and stop on drop — also when tests
//! fail.
//!
//! Each server lives in its own module with `pub fn start(ctx: &Ctx) -> Result<Started>`
//! (what `cargo xtask test` starts; adding a backend means adding a module
//! and a line in [`ALL`]) and `pub fn cluster(…) -> Result<Cluster>` (a
//! single node or a three-member cluster the fault suite kills, freezes,
//! restarts on the same data dir and ports, and partitions through proxies
//! in front of the ports in [`Port::reach`]).

use std::{
    fs,
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub mod cluster;
pub mod consul;
pub mod etcd;
pub mod zookeeper;

pub use cluster::{Cluster, Member, Port};

/// A server definition: name and starter.
pub type Starter = fn(&Ctx) -> Result<Started>;

/// Every server `cargo xtask test` starts.
pub const ALL: &[(&str, Starter)] = &[
    ("etcd", etcd::start),
    ("zookeeper", zookeeper::start),
    ("consul", consul::start),
];

/// What a started server hands to the tests.
#[derive(Default)]
pub struct Started {
    /// Environment for the test processes (URLs, binaries, PIDs).
    pub env: Vec<(String, String)>,
    /// Running processes; dropping them stops them.
    pub procs: Vec<Proc>,
}

/// Shared context: paths and temp dirs of this run.
pub struct Ctx {
    /// `target/xtask`: caches, logs.
    pub work: PathBuf,
    /// `$TMPDIR/anykv-run-<pid>-…`: every server data dir of this run lives
    /// under it, so one removal frees them all, and a later run can sweep the
    /// remains of a run that was killed before it could clean up.
    run: tempfile::TempDir,
}

/// Name prefix of a run's temp root; the owning process id follows.
const RUN_PREFIX: &str = "anykv-run-";

impl Ctx {
    /// A context rooted at the workspace.
    pub fn new(root: PathBuf) -> Result<Ctx> {
        let work = root.join("target").join("xtask");
        fs::create_dir_all(work.join("logs"))?;
        sweep_dead_runs(&std::env::temp_dir());
        let run = tempfile::Builder::new()
            .prefix(&format!("{RUN_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        Ok(Ctx { work, run })
    }

    /// A fresh temp dir, removed when the context is dropped.
    pub fn tempdir(&self, name: &str) -> Result<PathBuf> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("anykv-{name}-"))
            .tempdir_in(self.run.path())?;
        // Owned by `run` from here on: dropping the context removes it.
        Ok(dir.keep())
    }

    /// Log file path for a process.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.work.join("logs").join(format!("{name}.log"))
    }

    /// Downloads a Debian package with apt-get (without touching the
    /// machine's apt state) and extracts it with `dpkg -x`; returns the
    /// extracted root. Cached: a second run does no network I/O.
    ///
    /// `suite` None is the machine's own release; `Some("bullseye")` another
    /// suite of the same mirror. The mirror URI is read from the machine's
    /// apt configuration, never written into the repo.
    pub fn apt_package(&self, pkg: &str, suite: Option<&str>) -> Result<PathBuf> {
        let suite = match suite {
            Some(s) => s.to_owned(),
            None => machine_suite()?,
        };
        let root = self.work.join("pkgs").join(&suite).join(pkg);
        let done = root.join(".extracted");
        if done.exists() {
            return Ok(root);
        }
        let apt = self.work.join("apt").join(&suite);
        let lists = apt.join("lists");
        fs::create_dir_all(lists.join("partial"))?;
        let archives = apt.join("archives");
        fs::create_dir_all(archives.join("partial"))?;
        let sources = apt.join("sources.list");
        if !sources.exists() {
            let uri = mirror_uri()?;
            fs::write(
                &sources,
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
                ),
            )?;
        }
        let apt_opts = |cmd: &mut Command| {
            cmd.arg("-o")
                .arg(format!("Dir::Etc::SourceList={}", sources.display()))
                .arg("-o")
                .arg("Dir::Etc::SourceParts=/nonexistent")
                .arg("-o")
                .arg(format!("Dir::State::Lists={}", lists.display()))
                .arg("-o")
                .arg(format!("Dir::Cache::Archives={}", archives.display()))
                .arg("-o")
                .arg("Debug::NoLocking=1")
                .arg("-q");
        };
        let has_lists = fs::read_dir(&lists)?.filter_map(|e| e.ok()).any(|e| {
            e.file_name().to_string_lossy().ends_with("Packages")
                || e.file_name().to_string_lossy().contains("Packages")
        });
        if !has_lists {
            let mut update = Command::new("apt-get");
            apt_opts(&mut update);
            update.arg("update");
            run(&mut update).with_context(|| format!("apt-get update for suite {suite}"))?;
        }
        let dl = apt.join("debs").join(pkg);
        fs::create_dir_all(&dl)?;
        let mut download = Command::new("apt-get");
        apt_opts(&mut download);
        download.arg("download").arg(pkg).current_dir(&dl);
        run(&mut download).with_context(|| format!("apt-get download {pkg} ({suite})"))?;
        let deb = fs::read_dir(&dl)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("no .deb downloaded for {pkg}"))?;
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        fs::write(&done, "")?;
        Ok(root)
    }

    /// Installs Debian packages system-wide with apt-get when they are missing
    /// (for packages whose dependencies are too many to extract by hand).
    pub fn apt_install(&self, pkgs: &[&str]) -> Result<()> {
        let missing: Vec<&str> = pkgs
            .iter()
            .copied()
            .filter(|p| {
                !Command::new("dpkg-query")
                    .args(["-W", "-f=${Status}", p])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                    .unwrap_or(false)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        let stamp = self.work.join("apt-updated");
        if !stamp.exists() {
            run(Command::new("apt-get").args(["-q", "update"]))?;
            fs::write(&stamp, "")?;
        }
        run(Command::new("apt-get")
            .args(["-q", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}

/// The machine's Debian release codename (e.g. `bookworm`).
fn machine_suite() -> Result<String> {
    let os = fs::read_to_string("/etc/os-release")?;
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// The first Debian mirror URI configured on the machine.
fn mirror_uri() -> Result<String> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if let Ok(text) = fs::read_to_string(deb822) {
        for line in text.lines() {
            if let Some(u) = line.strip_prefix("URIs:")
                && let Some(u) = u.split_whitespace().find(|u| !u.contains("security"))
            {
                return Ok(u.to_owned());
            }
        }
    }
    let legacy = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for line in legacy.lines() {
        let mut parts = line.split_whitespace().filter(|p| !p.starts_with('['));
        if parts.next() == Some("deb")
            && let Some(u) = parts.next()
            && !u.contains("security")
        {
            return Ok(u.to_owned());
        }
    }
    bail!("no Debian mirror found in the machine's apt sources")
}

/// Runs a command to completion, failing with its output on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound, then released for the server).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `ready` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{what}: not ready after {timeout:?}")
}

/// Sends a ZooKeeper-style four-letter command and returns the reply.
pub fn four_letter(port: u16, cmd: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(cmd.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A server process in its own process group, logging to a file, stopped on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// How it was started, to start it again the same way.
    cmd: Command,
}

impl Proc {
    /// Spawns `cmd` with stdout/stderr to `target/xtask/logs/<name>.log`.
    pub fn spawn(ctx: &Ctx, name: &str, cmd: Command) -> Result<Proc> {
        let log = ctx.log_path(name);
        fs::File::create(&log)?;
        let child = Self::launch(name, &log, &cmd)?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            cmd,
        })
    }

    /// Starts `template` again as a new process (appending to its log).
    fn launch(name: &str, log: &Path, template: &Command) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(template.get_program());
        cmd.args(template.get_args());
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(dir) = template.get_current_dir() {
            cmd.current_dir(dir);
        }
        let out = fs::OpenOptions::new().append(true).create(true).open(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        running_groups().push(child.id() as i32);
        Ok(child)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9` of the process (group), waiting until it is gone. Its data
    /// dir and ports stay for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        let pgid = self.child.id() as i32;
        signal_group(pgid, "KILL");
        let _ = self.child.wait();
        running_groups().retain(|g| *g != pgid);
    }

    /// Starts the same command again after [`kill`](Self::kill) (kills
    /// first if still running): same data dir, same ports, same log.
    pub fn restart(&mut self) -> Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
        self.child = Self::launch(&self.name, &self.log, &self.cmd)?;
        Ok(())
    }

    /// Freezes the process (SIGSTOP): it holds its sockets and answers nothing.
    pub fn freeze(&self) {
        signal_group(self.child.id() as i32, "STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&self) {
        signal_group(self.child.id() as i32, "CONT");
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

/// Process groups of the servers still running, for [`stop_all_on_signal`].
fn running_groups() -> std::sync::MutexGuard<'static, Vec<i32>> {
    static GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
    GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes Ctrl-C / SIGTERM of xtask stop every server it started: servers run
/// in process groups of their own (so a test can stop one), which the
/// terminal's signal does not reach, and a signal ends xtask without `Drop`.
pub fn stop_all_on_signal() -> Result<()> {
    ctrlc::set_handler(|| {
        let groups: Vec<i32> = running_groups().clone();
        for pgid in groups {
            signal_group(pgid, "CONT");
            signal_group(pgid, "KILL");
        }
        eprintln!("xtask: interrupted; servers stopped");
        std::process::exit(130);
    })
    .context("installing the signal handler")
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        running_groups().retain(|g| *g != pgid);
        // SIGCONT first: a test may have left the server stopped (SIGSTOP).
        for sig in ["CONT", "TERM"] {
            signal_group(pgid, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        signal_group(pgid, "KILL");
        let _ = self.child.wait();
    }
}

/// Signals a process group through the `kill` command (the workspace forbids
/// `unsafe`, and `libc::kill` is unsafe).
pub fn signal_group(pgid: i32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes the temp roots of runs whose process is gone. A run killed with
/// SIGKILL (or a CI timeout) leaves its servers' data dirs behind — an etcd
/// data dir alone is 120 MB of preallocated WAL — and enough of them fill the
/// disk. Best effort: a root that cannot be read or removed is left alone.
fn sweep_dead_runs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUN_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_the_roots_of_dead_runs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Above Linux's pid_max (2^22): never a live process.
        let dead = tmp.path().join(format!("{RUN_PREFIX}4294000000-abc"));
        let live = tmp
            .path()
            .join(format!("{RUN_PREFIX}{}-def", std::process::id()));
        let other = tmp.path().join("anykv-etcd-xyz");
        for dir in [&dead, &live, &other] {
            fs::create_dir_all(dir.join("data")).expect("mkdir");
        }
        sweep_dead_runs(tmp.path());
        assert!(!dead.exists(), "a dead run's root is swept");
        assert!(live.exists(), "a live run's root stays");
        assert!(other.exists(), "what is not a run root stays");
    }
}

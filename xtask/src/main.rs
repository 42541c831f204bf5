//! `cargo xtask`: the project's automation.
//!
//! - `cargo xtask test`: fmt, clippy, cargo-deny, then every test of the
//!   workspace with real etcd, ZooKeeper and Consul servers started here.
//! - `cargo xtask bench [BACKEND…]`: anykv vs the raw client, same server, one run.
//! - `cargo xtask bench watch [BACKEND…] [-- OPTIONS]`: how watches scale
//!   (`anykv-bench`: 100 / 1,000 / 10,000 watches on one handle, delivery,
//!   delay, memory, sockets, idle CPU, against the raw clients).
//! - `cargo xtask bench layers [memory|redb] [-- OPTIONS]`: what each layer
//!   costs per operation (`anykv-bench layers`: ns, CPU ns, allocations).
//! - `cargo xtask servers`: start the servers and print their env, for development.
//! - `cargo xtask chaos [BACKEND…]`: the fault suite (`anykv-chaos`): servers
//!   killed, frozen, restarted and partitioned under checked workloads.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use anykv_servers::{self as servers, Ctx, Started};

#[derive(Parser)]
#[command(about = "anykv project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lint, then run every test against real servers.
    Test {
        /// Skip fmt, clippy and cargo-deny.
        #[arg(long)]
        no_lint: bool,
        /// Start only these servers (default: all).
        #[arg(long = "server", value_name = "NAME")]
        servers: Vec<String>,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Lints only: fmt check, clippy -D warnings, cargo-deny.
    Lint,
    /// Benchmarks anykv against the raw client crates; `bench watch
    /// [BACKEND…]`: the watch-scale bench (anykv-bench); `bench layers`: the
    /// cost of each layer per operation.
    Bench {
        /// Backends to bench (default: all): redb, etcd, zookeeper, consul;
        /// or `watch` followed by backends (memory, redb, etcd, zookeeper, consul).
        backends: Vec<String>,
        /// Options for `anykv-bench watch` (after `--`), e.g. `--sizes 100,1000`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The fault suite: every scenario (or `--ci`: the subset `test` runs).
    Chaos {
        /// Backends (default: all): etcd, zookeeper, consul.
        backends: Vec<String>,
        /// Arguments for `anykv-chaos run` (e.g. `--runs 3`, `--fault kill`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Starts the servers, prints their environment and waits for Ctrl-C.
    Servers {
        /// Start only these servers (default: all).
        names: Vec<String>,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    env::set_current_dir(&root)?;
    set_protoc()?;
    servers::stop_all_on_signal()?;
    let ctx = Ctx::new(root.clone())?;
    match cli.cmd {
        Cmd::Lint => lint(),
        Cmd::Test {
            no_lint,
            servers,
            cargo_args,
        } => {
            warn_if_low_disk(&[root.join("target"), env::temp_dir()]);
            if !no_lint {
                lint()?;
            }
            let started = start_servers(&ctx, &servers)?;
            let reports = ctx.work.join("conformance");
            let _ = std::fs::remove_dir_all(&reports);
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--all-features"])
                .args(&cargo_args)
                .env("ANYKV_REQUIRE_SERVERS", "1")
                .env("ANYKV_CONFORMANCE_DIR", &reports);
            apply_env(&mut cmd, &started);
            let status = cmd.status().context("running cargo test")?;
            drop(started);
            if !status.success() {
                bail!("tests failed ({status}); server logs are in target/xtask/logs");
            }
            if cargo_args.is_empty() && servers.is_empty() {
                check_conformance(&reports)?;
                install_check()?;
                chaos(&[], &["--ci".to_owned()])?;
            }
            println!("xtask: all tests passed against real servers");
            Ok(())
        }
        Cmd::Chaos { backends, args } => chaos(&backends, &args),
        Cmd::Bench { backends, args } => match backends.split_first() {
            Some((first, rest)) if first == "watch" || first == "mirror" => {
                bench_scale(&ctx, first, rest, &args)
            }
            Some((first, rest)) if first == "layers" => bench_layers(rest, &args),
            _ if !args.is_empty() => {
                bail!("options after `--` are for `bench watch|mirror|layers` only")
            }
            _ => bench(&ctx, &backends),
        },
        Cmd::Servers { names } => {
            let started = start_servers(&ctx, &names)?;
            for (k, v) in started.iter().flat_map(|s| s.env.iter()) {
                println!("export {k}={v}");
            }
            println!("# servers running; Ctrl-C to stop");
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            // Wait for stdin EOF or the process being interrupted.
            std::thread::spawn(move || {
                let mut s = String::new();
                while std::io::stdin()
                    .read_line(&mut s)
                    .map(|n| n > 0)
                    .unwrap_or(false)
                {}
                let _ = tx.send(());
            });
            let _ = rx.recv();
            Ok(())
        }
    }
}

/// The workspace root: the parent of this crate's manifest dir.
fn workspace_root() -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_owned)
        .context("xtask has no parent directory")
}

/// etcd-client compiles its protos at build time; use the vendored protoc so
/// no manual install is needed.
fn set_protoc() -> Result<()> {
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()
            .map_err(|e| anyhow::anyhow!("vendored protoc unavailable: {e}"))?;
        child_env("PROTOC", &protoc);
    }
    Ok(())
}

/// `env::set_var` is `unsafe` in edition 2024 and the workspace forbids
/// unsafe code, so children get the variable through `Command::env` instead:
/// remember it here.
fn child_env(key: &str, value: &Path) {
    EXTRA_ENV.with(|e| {
        e.borrow_mut()
            .push((key.to_owned(), value.display().to_string()))
    });
}

thread_local! {
    static EXTRA_ENV: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A `cargo` command carrying the xtask environment (PROTOC).
fn cargo() -> Command {
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    EXTRA_ENV.with(|e| {
        for (k, v) in e.borrow().iter() {
            cmd.env(k, v);
        }
    });
    cmd
}

fn apply_env(cmd: &mut Command, started: &[Started]) {
    for (k, v) in started.iter().flat_map(|s| s.env.iter()) {
        cmd.env(k, v);
    }
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    println!("xtask: {name}");
    let status = cmd.status().with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn lint() -> Result<()> {
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    ensure_cargo_deny()?;
    step(
        "cargo deny",
        cargo().args([
            "deny",
            "--all-features",
            "check",
            "licenses",
            "bans",
            "sources",
        ]),
    )?;
    step(
        "cargo doc",
        cargo()
            .args(["doc", "--no-deps", "--workspace", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )
}

/// Installs cargo-deny from crates.io if this machine lacks it.
fn ensure_cargo_deny() -> Result<()> {
    let present = cargo()
        .args(["deny", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        step(
            "cargo install cargo-deny",
            cargo().args(["install", "--locked", "cargo-deny"]),
        )?;
    }
    Ok(())
}

/// Every backend must have run the whole conformance suite: a driver whose
/// suite silently did not run (not linked, skipped) fails the run.
fn check_conformance(dir: &Path) -> Result<()> {
    const BACKENDS: &[&str] = &["memory", "redb", "etcd", "zookeeper", "consul"];
    let mut missing = Vec::new();
    let (mut passed_all, mut failed_all) = (0, 0);
    println!("xtask: conformance suite per backend");
    for b in BACKENDS {
        let text = std::fs::read_to_string(dir.join(format!("{b}.txt"))).unwrap_or_default();
        let n: Vec<usize> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match n[..] {
            [executed, passed, failed] if executed > 0 && failed == 0 && passed == executed => {
                println!("xtask:   {b:<10} {executed} scenarios executed, {passed} passed");
                passed_all += passed;
            }
            [executed, passed, failed] => {
                println!("xtask:   {b:<10} {executed} executed, {passed} passed, {failed} failed");
                failed_all += failed.max(1);
                missing.push(*b);
            }
            _ => {
                println!("xtask:   {b:<10} NOT RUN");
                missing.push(*b);
            }
        }
    }
    println!("conformance: {passed_all} passed, {failed_all} failed");
    if !missing.is_empty() {
        bail!("conformance suite incomplete for: {}", missing.join(", "));
    }
    Ok(())
}

fn start_servers(ctx: &Ctx, only: &[String]) -> Result<Vec<Started>> {
    let mut all = Vec::new();
    for (name, start) in servers::ALL {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        println!("xtask: starting {name}");
        let started = start(ctx).with_context(|| format!("starting {name}"))?;
        for (k, v) in &started.env {
            println!("xtask:   {k}={v}");
        }
        all.push(started);
    }
    Ok(all)
}

/// Runs the fault suite; it starts (and stops) servers of its own.
fn chaos(backends: &[String], args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "-q", "-p", "anykv-chaos", "--", "run"]);
    for b in backends {
        cmd.args(["--backend", b]);
    }
    cmd.args(args);
    step("fault suite (anykv-chaos)", &mut cmd)
}

fn bench(ctx: &Ctx, backends: &[String]) -> Result<()> {
    const ALL: &[(&str, Option<&str>)] = &[
        ("redb", None),
        ("etcd", Some("etcd")),
        ("zookeeper", Some("zookeeper")),
        ("consul", Some("consul")),
    ];
    for (backend, server) in ALL {
        if !backends.is_empty() && !backends.iter().any(|b| b == backend) {
            continue;
        }
        let started = match server {
            Some(s) => start_servers(ctx, &[s.to_string()])?,
            None => Vec::new(),
        };
        let mut cmd = cargo();
        cmd.args([
            "bench",
            "-p",
            &format!("anykv-{backend}"),
            "--bench",
            "raw_vs_anykv",
        ]);
        apply_env(&mut cmd, &started);
        step(&format!("bench {backend}"), &mut cmd)?;
    }
    Ok(())
}

/// `cargo xtask bench watch`: one server per backend (a single etcd member,
/// a standalone ZooKeeper, Consul's dev agent), then the release-mode
/// `anykv-bench watch` with their URLs, process ids (for the server CPU
/// figures) and a note of their non-default settings. `ANYKV_BENCH_BIN`
/// runs a prebuilt `anykv-bench` instead (e.g. one built from an older
/// commit, to compare drivers on the same kind of servers).
/// `bench layers`: what each layer costs per operation, on memory and redb
/// (no server to start).
fn bench_layers(backends: &[String], args: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-q",
        "-p",
        "anykv-bench",
        "--",
        "layers",
    ])
    .args(backends)
    .args(args);
    let status = cmd.status().context("running anykv-bench layers")?;
    if !status.success() {
        bail!("anykv-bench layers failed ({status})");
    }
    Ok(())
}

fn bench_scale(ctx: &Ctx, which: &str, backends: &[String], args: &[String]) -> Result<()> {
    use std::time::Duration;
    let wanted = |b: &str| backends.is_empty() || backends.iter().any(|x| x == b);
    let mut cmd = match env::var_os("ANYKV_BENCH_BIN") {
        Some(bin) => Command::new(bin),
        None => {
            let mut cmd = cargo();
            cmd.args(["run", "--release", "-q", "-p", "anykv-bench", "--"]);
            cmd
        }
    };
    cmd.arg(which).args(backends).args(args);
    // Kept until the bench ends: dropping them stops the servers.
    let mut clusters = Vec::new();
    let mut started = Vec::new();
    for (backend, var, note) in [
        (
            "etcd",
            "ETCD",
            "etcd (Debian package) single member as anykv-servers starts it: default settings \
             (only name, data dir, URLs and cluster token set)",
        ),
        (
            "zookeeper",
            "ZOOKEEPER",
            "ZooKeeper 3.8 standalone as anykv-servers starts it; non-default: maxClientCnxns=0 \
             (unlimited; default 60), extendedTypesEnabled=true, admin server off, \
             znode.container.checkIntervalMs=1000, -Xmx256m",
        ),
    ] {
        if !wanted(backend) {
            continue;
        }
        println!("xtask: starting {backend}");
        let mut cluster = if backend == "etcd" {
            servers::etcd::cluster(ctx, "bench-watch-etcd", 1, false)?
        } else {
            servers::zookeeper::cluster(ctx, "bench-watch-zookeeper", 1, false)?
        };
        cluster.wait_all_ready(Duration::from_secs(60))?;
        let url_var = if backend == "etcd" {
            "ANYKV_TEST_ETCD"
        } else {
            "ANYKV_TEST_ZK"
        };
        cmd.env(url_var, cluster.url(""))
            .env(
                format!("ANYKV_BENCH_{var}_PID"),
                cluster.pid(0)?.to_string(),
            )
            .env(format!("ANYKV_BENCH_{var}_NOTE"), note);
        clusters.push(cluster);
    }
    if wanted("consul") {
        println!("xtask: starting consul");
        // Consul's default limits (200 HTTP connections per client
        // address), and no ACL agent: what an application meets.
        let consul = servers::consul::Agents::new()
            .default_limits()
            .without_acl()
            .start(ctx)
            .context("starting consul")?;
        for (k, v) in consul.env.iter().filter(|(k, _)| k == "ANYKV_TEST_CONSUL") {
            cmd.env(k, v);
        }
        if let Some(agent) = consul.procs.first() {
            cmd.env("ANYKV_BENCH_CONSUL_PID", agent.pid().to_string());
        }
        cmd.env(
            "ANYKV_BENCH_CONSUL_NOTE",
            "Consul 1.8.7 dev agent (-dev, data in memory) as anykv-servers starts it with \
             default limits (http_max_conns_per_client = 200 per client address); only DNS and \
             gRPC ports off",
        );
        started.push(consul);
    }
    let out = step(&format!("bench {which}"), &mut cmd);
    drop(clusters);
    drop(started);
    out
}

/// Issue 12's clean-clone check: `cargo install --path crates/anykv-cli`
/// from a fresh clone of HEAD, with no PROTOC and no `protoc` on PATH,
/// yields an `anykv` whose `drivers` lists all five. The clone sits at a
/// fixed path under target/install-check and builds there, so registry
/// crates are reused from one run to the next (only the workspace's own
/// crates rebuild) and the main target dir is untouched.
fn install_check() -> Result<()> {
    let work = workspace_root()?.join("target/install-check");
    // Both beside cargo's own directories in the check's target dir.
    let clone = work.join("clone");
    let root = work.join("root");
    for dir in [&clone, &root] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    step(
        "install check: git clone HEAD",
        Command::new("git")
            .args(["clone", "--quiet"])
            .arg(workspace_root()?)
            .arg(&clone),
    )?;
    let started = std::time::Instant::now();
    step(
        "install check: cargo install --path crates/anykv-cli (no protoc)",
        Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "--locked",
                "--path",
                "crates/anykv-cli",
                "--root",
            ])
            .arg(&root)
            .current_dir(&clone)
            // `cargo xtask` itself runs with PROTOC (from .cargo/config.toml
            // or set_protoc): the check must not inherit it.
            .env_remove("PROTOC")
            .env("PATH", path_without_protoc(&work.join("path"))?)
            .env("CARGO_TARGET_DIR", &work),
    )?;
    let out = Command::new(root.join("bin/anykv"))
        .arg("drivers")
        .output()
        .context("running the installed anykv")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        // Driver lines start with the name; capability lines are indented.
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&str> = ["memory", "redb", "etcd", "consul", "zookeeper"]
        .into_iter()
        .filter(|n| !names.contains(n))
        .collect();
    if !out.status.success() || !missing.is_empty() {
        bail!("installed anykv lacks drivers {missing:?}: {text}");
    }
    println!(
        "xtask: install check: all five drivers, built in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

/// PATH with no `protoc` on it: unchanged when none of its directories
/// has one, otherwise a directory of links to everything on PATH but protoc
/// (dropping a whole directory such as /usr/bin would drop the linker too).
fn path_without_protoc(farm: &Path) -> Result<std::ffi::OsString> {
    let path = env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if !dirs.iter().any(|d| d.join("protoc").exists()) {
        return Ok(path);
    }
    #[cfg(unix)]
    {
        if farm.exists() {
            std::fs::remove_dir_all(farm)?;
        }
        std::fs::create_dir_all(farm)?;
        for dir in &dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let link = farm.join(&name);
                if name.to_string_lossy().starts_with("protoc") || link.symlink_metadata().is_ok() {
                    continue;
                }
                std::os::unix::fs::symlink(entry.path(), link)?;
            }
        }
        Ok(farm.as_os_str().to_owned())
    }
    #[cfg(not(unix))]
    bail!(
        "a protoc is on PATH ({}); the install check needs it hidden",
        farm.display()
    )
}

/// Says so up front when a full run may not fit on the disk: a clean clone
/// builds ~7 GB under `target/`, and each server's data dir (an etcd one
/// preallocates 120 MB of WAL) lives in the temp dir. A run that fills the
/// disk fails far from the cause (a CI run once died unpacking Consul).
/// Only a warning: `df` may be missing, and the estimate is rough.
fn warn_if_low_disk(paths: &[std::path::PathBuf]) {
    const NEEDED_KIB: u64 = 10 * 1024 * 1024;
    for path in paths {
        let Ok(out) = Command::new("df").arg("-Pk").arg(path).output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // Second line: filesystem, size, used, available, …
        let available = text
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(kib) = available
            && kib < NEEDED_KIB
        {
            eprintln!(
                "xtask: warning: {:.1} GiB free under {}; a full run needs about 10 GiB",
                kib as f64 / 1024.0 / 1024.0,
                path.display()
            );
        }
    }
}

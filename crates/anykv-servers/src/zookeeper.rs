//! ZooKeeper for the tests: Debian bookworm's `zookeeper` 3.8 (the jars of
//! `libzookeeper-java` and the few libraries the server and `zkCli` load),
//! extracted under `target/xtask/pkgs`, run with the machine's Java on free
//! 127.0.0.1 ports in temp dirs, with a `zoo.cfg` written here.
//!
//! Starts one standalone server (conformance, liveness, interop) and one
//! three-server ensemble (failover). Both run with `extendedTypesEnabled=true`
//! (TTL znodes), the admin server off, every four-letter command allowed, and
//! `-Dznode.container.checkIntervalMs=1000` so expired TTL znodes go within a
//! second (the URLs say so with `ttl_check_interval`). Exports:
//!
//! - `ANYKV_TEST_ZK=zk://127.0.0.1:P?ttl_check_interval=1s`
//! - `ANYKV_TEST_ZK_ENSEMBLE=zk://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3?ttl_check_interval=1s`
//! - `ANYKV_TEST_ZK_ENSEMBLE_PIDS=pid1,pid2,pid3` (endpoint order)
//! - `ANYKV_ZKCLI`: a `zkCli.sh` equivalent (`$ANYKV_ZKCLI -server h:p get /x`).
//!   The package's own `zkCli.sh` sources `/etc/zookeeper/conf/environment`
//!   through an absolute symlink, so it cannot run from the extracted tree.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    Ctx, Proc, Started,
    cluster::{Cluster, Member, Port, Probes},
    four_letter, wait_until,
};

/// Debian packages holding the jars below (the server and `zkCli`).
const PACKAGES: &[&str] = &[
    "zookeeper",
    "libzookeeper-java",
    "libnetty-java",
    "libslf4j-java",
    "libdropwizard-metrics-java",
    "libcommons-cli-java",
    "libsnappy-java",
];

/// The jars on the class path (`usr/share/java/<name>` in those packages).
/// slf4j-simple logs to stderr, which lands in the process log.
const JARS: &[&str] = &[
    "zookeeper.jar",
    "zookeeper-jute.jar",
    "netty-handler.jar",
    "netty-common.jar",
    "netty-buffer.jar",
    "netty-transport.jar",
    "netty-codec.jar",
    "netty-resolver.jar",
    "netty-transport-native-epoll.jar",
    "netty-transport-native-unix-common.jar",
    "slf4j-api.jar",
    "slf4j-simple.jar",
    "metrics-core.jar",
    "commons-cli.jar",
    // Named in snapshot handling even when snapshots are not compressed.
    "snappy-java.jar",
];

/// The server's container/TTL check interval, and what the URLs state.
const CHECK_INTERVAL_MS: u64 = 1000;

/// How long a server may take to answer `ruok` / join the quorum.
const READY: Duration = Duration::from_secs(60);

/// Starts the standalone server and the ensemble.
pub fn start(ctx: &Ctx) -> Result<Started> {
    let java = java(ctx)?;
    let classpath = classpath(ctx)?;
    let query = format!("ttl_check_interval={CHECK_INTERVAL_MS}ms");
    let mut started = Started::default();

    let single = Server::new(0, false)?;
    let mut proc = single.spawn(ctx, &java, &classpath, "zookeeper", &[])?;
    wait_serving(&mut proc, single.client.listen, &["standalone"])?;
    started.env.push((
        "ANYKV_TEST_ZK".into(),
        format!("zk://127.0.0.1:{}?{query}", single.client.listen),
    ));
    started.procs.push(proc);

    let ensemble = [
        Server::new(1, false)?,
        Server::new(2, false)?,
        Server::new(3, false)?,
    ];
    let mut procs = Vec::new();
    for s in &ensemble {
        let name = format!("zookeeper-ensemble-{}", s.id);
        procs.push(s.spawn(ctx, &java, &classpath, &name, &ensemble)?);
    }
    for (s, p) in ensemble.iter().zip(procs.iter_mut()) {
        wait_serving(p, s.client.listen, &["leader", "follower"])?;
    }
    let hosts: Vec<String> = ensemble
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.client.listen))
        .collect();
    let pids: Vec<String> = procs.iter().map(|p| p.pid().to_string()).collect();
    started.env.push((
        "ANYKV_TEST_ZK_ENSEMBLE".into(),
        format!("zk://{}?{query}", hosts.join(",")),
    ));
    started
        .env
        .push(("ANYKV_TEST_ZK_ENSEMBLE_PIDS".into(), pids.join(",")));
    started.procs.extend(procs);

    let cli = zkcli(ctx, &java, &classpath)?;
    started
        .env
        .push(("ANYKV_ZKCLI".into(), cli.display().to_string()));
    Ok(started)
}

/// Starts a standalone server (`n` = 1) or an ensemble of `n` for the fault
/// suite, without waiting: with `proxied`, every client, quorum and
/// election port has a proxy port in front (start the proxies, then
/// [`Cluster::wait_all_ready`]).
pub fn cluster(ctx: &Ctx, name: &str, n: usize, proxied: bool) -> Result<Cluster> {
    let java = java(ctx)?;
    let classpath = classpath(ctx)?;
    let servers: Vec<Server> = if n == 1 {
        vec![Server::new(0, proxied)?]
    } else {
        (1..=n)
            .map(|i| Server::new(i as u32, proxied))
            .collect::<Result<_>>()?
    };
    let ensemble: &[Server] = if n == 1 { &[] } else { &servers };
    let mut members = Vec::new();
    for s in &servers {
        let log = format!("{name}-{}", s.id);
        members.push(Member {
            proc: s.spawn(ctx, &java, &classpath, &log, ensemble)?,
            name: log,
            client: s.client,
            peers: vec![s.quorum, s.election],
        });
    }
    let probes = Probes {
        ready: |m| {
            four_letter(m.client.listen, "srvr").is_some_and(|r| {
                ["standalone", "leader", "follower"]
                    .iter()
                    .any(|mode| r.contains(&format!("Mode: {mode}")))
            })
        },
        is_leader: |m| {
            four_letter(m.client.listen, "srvr")
                .is_some_and(|r| r.contains("Mode: leader") || r.contains("Mode: standalone"))
        },
    };
    let query = format!("ttl_check_interval={CHECK_INTERVAL_MS}ms");
    Ok(Cluster::new("zookeeper", "zk", query, members, probes))
}

/// The `java` launcher: the machine's, or Debian's headless JRE installed.
fn java(ctx: &Ctx) -> Result<PathBuf> {
    let works = |j: &str| {
        Command::new(j)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works("java") {
        ctx.apt_install(&["default-jre-headless"])?;
        anyhow::ensure!(
            works("java"),
            "java still not runnable after installing default-jre-headless"
        );
    }
    Ok(PathBuf::from("java"))
}

/// The class path: every jar of [`JARS`], found in the extracted packages.
fn classpath(ctx: &Ctx) -> Result<String> {
    let mut dirs = Vec::new();
    for pkg in PACKAGES {
        let root = ctx.apt_package(pkg, None)?;
        dirs.push(root.join("usr").join("share").join("java"));
    }
    let mut jars = Vec::new();
    for jar in JARS {
        let found = dirs
            .iter()
            .map(|d| d.join(jar))
            .find(|p| p.exists())
            .with_context(|| format!("{jar} is in none of the packages {PACKAGES:?}"))?;
        jars.push(found.display().to_string());
    }
    Ok(jars.join(":"))
}

/// One server's id (0: standalone) and ports.
struct Server {
    id: u32,
    client: Port,
    quorum: Port,
    election: Port,
}

impl Server {
    fn new(id: u32, proxied: bool) -> Result<Server> {
        Ok(Server {
            id,
            client: Port::new(proxied)?,
            quorum: Port::new(proxied)?,
            election: Port::new(proxied)?,
        })
    }

    /// Writes its `zoo.cfg` (and `myid` in an ensemble) and starts it.
    fn spawn(
        &self,
        ctx: &Ctx,
        java: &Path,
        classpath: &str,
        log_name: &str,
        ensemble: &[Server],
    ) -> Result<Proc> {
        let dir = ctx.tempdir(log_name)?;
        let data = dir.join("data");
        fs::create_dir_all(&data)?;
        let mut cfg = format!(
            "tickTime=2000\n\
             initLimit=10\n\
             syncLimit=5\n\
             dataDir={}\n\
             clientPort={}\n\
             clientPortAddress=127.0.0.1\n\
             maxClientCnxns=0\n\
             admin.enableServer=false\n\
             extendedTypesEnabled=true\n\
             4lw.commands.whitelist=*\n",
            data.display(),
            self.client.listen
        );
        // Each server binds the ports of its own line and reaches the
        // others at theirs: through proxies, when they are proxied.
        for s in ensemble {
            let (quorum, election) = if s.id == self.id {
                (s.quorum.listen, s.election.listen)
            } else {
                (s.quorum.reach, s.election.reach)
            };
            cfg.push_str(&format!("server.{}=127.0.0.1:{quorum}:{election}\n", s.id));
        }
        if !ensemble.is_empty() {
            fs::write(data.join("myid"), format!("{}\n", self.id))?;
        }
        let cfg_path = dir.join("zoo.cfg");
        fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(java);
        cmd.arg("-Xmx256m")
            .arg(format!(
                "-Dznode.container.checkIntervalMs={CHECK_INTERVAL_MS}"
            ))
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-cp")
            .arg(classpath)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg_path)
            .current_dir(&dir);
        Proc::spawn(ctx, log_name, cmd)
    }
}

/// Waits for `imok`, then for `srvr` to report one of `modes` (a member is
/// only serving once it has joined a quorum).
fn wait_serving(proc: &mut Proc, port: u16, modes: &[&str]) -> Result<()> {
    let name = proc.name().to_owned();
    let mut exited = None;
    let ready = wait_until(&format!("{name} serving on {port}"), READY, || {
        if let Err(e) = proc.check_running() {
            exited = Some(e);
            return true;
        }
        four_letter(port, "ruok").is_some_and(|r| r.trim() == "imok")
            && four_letter(port, "srvr")
                .is_some_and(|r| modes.iter().any(|m| r.contains(&format!("Mode: {m}"))))
    });
    if let Some(e) = exited {
        return Err(e);
    }
    ready
}

/// Writes the `zkCli.sh` stand-in: the package's `ZooKeeperMain` on the same
/// class path, quiet logging.
fn zkcli(ctx: &Ctx, java: &Path, classpath: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = ctx.tempdir("zkcli")?;
    let path = dir.join("zkCli.sh");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             # zkCli.sh from Debian's zookeeper package, run from the extracted jars.\n\
             exec {} -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp '{classpath}' \
             org.apache.zookeeper.ZooKeeperMain \"$@\"\n",
            java.display()
        ),
    )?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

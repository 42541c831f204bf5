//! etcd for the tests: Debian bookworm's `etcd-server` (and `etcd-client` for
//! `etcdctl`), extracted under `target/xtask/pkgs`, run on free 127.0.0.1
//! ports in temp dirs.
//!
//! Starts one single-member server (the conformance, liveness and interop
//! tests) and one three-member cluster (the failover test, which kills a
//! member). Exports:
//!
//! - `ANYKV_TEST_ETCD=etcd://127.0.0.1:P`
//! - `ANYKV_TEST_ETCD_CLUSTER=etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`
//! - `ANYKV_TEST_ETCD_CLUSTER_PIDS=pid1,pid2,pid3` (endpoint order)
//! - `ANYKV_ETCDCTL` (etcdctl) and `ANYKV_ETCD_BIN` (etcd, for tests that
//!   start a server of their own, e.g. with TLS and authentication).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{Ctx, Proc, Started, free_port, wait_until};

/// How long a member may take to answer `/health`.
const READY: Duration = Duration::from_secs(60);

/// Starts the single server and the cluster.
pub fn start(ctx: &Ctx) -> Result<Started> {
    let etcd = binary(ctx, "etcd-server", "etcd")?;
    let etcdctl = binary(ctx, "etcd-client", "etcdctl")?;
    let mut started = Started::default();

    let single = Member::new("default")?;
    let mut proc = single.spawn(ctx, &etcd, "etcd", &[&single], "anykv-single")?;
    single.wait_ready(&mut proc)?;
    started.env.push((
        "ANYKV_TEST_ETCD".into(),
        format!("etcd://{}", single.client()),
    ));
    started.procs.push(proc);

    let members = [Member::new("m1")?, Member::new("m2")?, Member::new("m3")?];
    let all: Vec<&Member> = members.iter().collect();
    let token = format!("anykv-cluster-{}", std::process::id());
    let mut procs = Vec::new();
    for m in &members {
        let name = format!("etcd-cluster-{}", m.name);
        procs.push(m.spawn(ctx, &etcd, &name, &all, &token)?);
    }
    for (m, p) in members.iter().zip(procs.iter_mut()) {
        m.wait_ready(p)?;
    }
    let endpoints: Vec<String> = members.iter().map(Member::client).collect();
    let pids: Vec<String> = procs.iter().map(|p| p.pid().to_string()).collect();
    started.env.push((
        "ANYKV_TEST_ETCD_CLUSTER".into(),
        format!("etcd://{}", endpoints.join(",")),
    ));
    started
        .env
        .push(("ANYKV_TEST_ETCD_CLUSTER_PIDS".into(), pids.join(",")));
    started.procs.extend(procs);

    started
        .env
        .push(("ANYKV_ETCDCTL".into(), etcdctl.display().to_string()));
    started
        .env
        .push(("ANYKV_ETCD_BIN".into(), etcd.display().to_string()));
    Ok(started)
}

/// `/usr/bin/<bin>` of a Debian package, extracted (and cached) by apt.
fn binary(ctx: &Ctx, pkg: &str, bin: &str) -> Result<PathBuf> {
    let root = ctx.apt_package(pkg, None)?;
    let path = root.join("usr").join("bin").join(bin);
    anyhow::ensure!(path.exists(), "{pkg} has no usr/bin/{bin}");
    Ok(path)
}

/// One member's name, ports and data dir.
struct Member {
    name: String,
    client: u16,
    peer: u16,
}

impl Member {
    fn new(name: &str) -> Result<Member> {
        Ok(Member {
            name: name.to_owned(),
            client: free_port()?,
            peer: free_port()?,
        })
    }

    fn client(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }

    /// Starts this member of the cluster made of `cluster`.
    fn spawn(
        &self,
        ctx: &Ctx,
        etcd: &Path,
        log_name: &str,
        cluster: &[&Member],
        token: &str,
    ) -> Result<Proc> {
        let data = ctx.tempdir(log_name)?;
        let initial: Vec<String> = cluster
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let client_url = format!("http://{}", self.client());
        let mut cmd = Command::new(etcd);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(token)
            .arg("--initial-cluster-state")
            .arg("new");
        Proc::spawn(ctx, log_name, cmd)
    }

    /// Waits until the member reports itself healthy (it has a leader).
    fn wait_ready(&self, proc: &mut Proc) -> Result<()> {
        let name = proc.name().to_owned();
        let mut exited = None;
        let ready = wait_until(&format!("{name} /health"), READY, || {
            if let Err(e) = proc.check_running() {
                exited = Some(e);
                return true;
            }
            healthy(self.client)
        });
        if let Some(e) = exited {
            return Err(e);
        }
        ready.with_context(|| format!("{name} on {}", self.client()))
    }
}

/// True if `GET /health` on the client port says `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

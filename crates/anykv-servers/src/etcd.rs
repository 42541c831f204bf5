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

use crate::{
    Ctx, Proc, Started,
    cluster::{Cluster, Member as ClusterMember, Port, Probes},
    wait_until,
};

/// How long a member may take to answer `/health`.
const READY: Duration = Duration::from_secs(60);

/// Starts the single server and the cluster.
pub fn start(ctx: &Ctx) -> Result<Started> {
    let etcd = binary(ctx, "etcd-server", "etcd")?;
    let etcdctl = binary(ctx, "etcd-client", "etcdctl")?;
    let mut started = Started::default();

    let single = Member::new("default", false)?;
    let mut proc = single.spawn(ctx, &etcd, "etcd", &[&single], "anykv-single")?;
    single.wait_ready(&mut proc)?;
    started.env.push((
        "ANYKV_TEST_ETCD".into(),
        format!("etcd://{}", single.client()),
    ));
    started.procs.push(proc);

    let members = [
        Member::new("m1", false)?,
        Member::new("m2", false)?,
        Member::new("m3", false)?,
    ];
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

/// Starts `n` members named `<name>-m<i>` for the fault suite, without
/// waiting: with `proxied`, every client and peer port has a proxy port in
/// front (start the proxies, then [`Cluster::wait_all_ready`]).
pub fn cluster(ctx: &Ctx, name: &str, n: usize, proxied: bool) -> Result<Cluster> {
    let etcd = binary(ctx, "etcd-server", "etcd")?;
    let members: Vec<Member> = (1..=n)
        .map(|i| Member::new(&format!("m{i}"), proxied))
        .collect::<Result<_>>()?;
    let all: Vec<&Member> = members.iter().collect();
    let token = format!("anykv-{name}-{}", std::process::id());
    let mut out = Vec::new();
    for m in &members {
        let log = format!("{name}-{}", m.name);
        out.push(ClusterMember {
            proc: m.spawn(ctx, &etcd, &log, &all, &token)?,
            name: log,
            client: m.client,
            peers: vec![m.peer],
        });
    }
    let probes = Probes {
        ready: |m| healthy(m.client.listen),
        is_leader: |m| {
            http_get(m.client.listen, "/metrics")
                .is_some_and(|body| body.lines().any(|l| l == "etcd_server_is_leader 1"))
        },
    };
    Ok(Cluster::new("etcd", "etcd", "", out, probes))
}

/// `/usr/bin/<bin>` of a Debian package, extracted (and cached) by apt.
fn binary(ctx: &Ctx, pkg: &str, bin: &str) -> Result<PathBuf> {
    let root = ctx.apt_package(pkg, None)?;
    let path = root.join("usr").join("bin").join(bin);
    anyhow::ensure!(path.exists(), "{pkg} has no usr/bin/{bin}");
    Ok(path)
}

/// One member's name and ports.
struct Member {
    name: String,
    client: Port,
    peer: Port,
}

impl Member {
    fn new(name: &str, proxied: bool) -> Result<Member> {
        Ok(Member {
            name: name.to_owned(),
            client: Port::new(proxied)?,
            peer: Port::new(proxied)?,
        })
    }

    /// Where clients reach it.
    fn client(&self) -> String {
        format!("127.0.0.1:{}", self.client.reach)
    }

    /// Where peers reach it.
    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer.reach)
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
        let mut cmd = Command::new(etcd);
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", self.client.listen))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", self.client()))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer.listen))
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
            healthy(self.client.listen)
        });
        if let Some(e) = exited {
            return Err(e);
        }
        ready.with_context(|| format!("{name} on {}", self.client()))
    }
}

/// True if `GET /health` on the client port says `"health":"true"`.
fn healthy(port: u16) -> bool {
    http_get(port, "/health").is_some_and(|out| out.contains("\"health\":\"true\""))
}

/// A minimal HTTP/1.0 GET on 127.0.0.1: the whole reply.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

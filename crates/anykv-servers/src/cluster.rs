//! A single node or a three-member cluster that the fault suite controls:
//! kill -9 and restart on the same data dir and ports, freeze (SIGSTOP) and
//! thaw, find the leader.
//!
//! Every member port is a [`Port`]: where the process listens, and where
//! clients and peers reach it. They differ when a fault proxy sits in front
//! of the member (the proxy listens on `reach` and forwards to `listen`), so
//! that the suite can cut, delay or black-hole one member's traffic.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{Proc, free_port, wait_until};

/// One listening port of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    /// The port the server process binds.
    pub listen: u16,
    /// The port clients and peers are told to use.
    pub reach: u16,
}

impl Port {
    /// A free port, reached directly.
    pub fn direct() -> Result<Port> {
        let p = free_port()?;
        Ok(Port {
            listen: p,
            reach: p,
        })
    }

    /// Two free ports: the server's, and one for a proxy in front of it.
    pub fn proxied() -> Result<Port> {
        Ok(Port {
            listen: free_port()?,
            reach: free_port()?,
        })
    }

    /// [`proxied`](Self::proxied) or [`direct`](Self::direct).
    pub fn new(proxied: bool) -> Result<Port> {
        if proxied {
            Port::proxied()
        } else {
            Port::direct()
        }
    }

    /// True when a proxy is meant to sit in front of the server.
    pub fn is_proxied(&self) -> bool {
        self.listen != self.reach
    }
}

/// How the suite asks a member of one backend about its state.
#[derive(Clone, Copy)]
pub struct Probes {
    /// True once the member serves clients (as part of a quorum).
    pub ready: fn(&Member) -> bool,
    /// True if the member is the leader right now.
    pub is_leader: fn(&Member) -> bool,
}

/// One server process of a cluster.
pub struct Member {
    /// Member name (also its log file's name).
    pub name: String,
    /// The running process.
    pub proc: Proc,
    /// The client port.
    pub client: Port,
    /// Peer ports (etcd: peer; ZooKeeper: quorum, election; Consul: server
    /// RPC, serf LAN, then the HTTP port used for readiness stays `client`).
    pub peers: Vec<Port>,
}

/// A single node or a cluster of one backend.
pub struct Cluster {
    /// Backend name (`etcd`, `zookeeper`, `consul`).
    pub backend: &'static str,
    /// The members, in URL order.
    pub members: Vec<Member>,
    scheme: &'static str,
    query: String,
    probes: Probes,
    /// Where clients connect instead of the members (Consul: a client
    /// agent that forwards to the servers), and the processes behind it.
    gateway: Option<(u16, Vec<Proc>)>,
}

impl Cluster {
    /// Assembles a cluster (used by the backend modules).
    pub(crate) fn new(
        backend: &'static str,
        scheme: &'static str,
        query: impl Into<String>,
        members: Vec<Member>,
        probes: Probes,
    ) -> Cluster {
        Cluster {
            backend,
            members,
            scheme,
            query: query.into(),
            probes,
            gateway: None,
        }
    }

    /// Clients connect to `port` (served by `procs`) instead of the
    /// members: the suite can then fault any member without cutting the
    /// client off.
    pub(crate) fn with_gateway(mut self, port: u16, procs: Vec<Proc>) -> Cluster {
        self.gateway = Some((port, procs));
        self
    }

    /// The anykv URL reaching every member (through proxies where proxied),
    /// with `extra` query options (`timeout=1s&…`, may be empty).
    pub fn url(&self, extra: &str) -> String {
        let hosts: Vec<String> = match &self.gateway {
            Some((port, _)) => vec![format!("127.0.0.1:{port}")],
            None => self
                .members
                .iter()
                .map(|m| format!("127.0.0.1:{}", m.client.reach))
                .collect(),
        };
        let mut query = self.query.clone();
        if !extra.is_empty() {
            if !query.is_empty() {
                query.push('&');
            }
            query.push_str(extra);
        }
        let sep = if query.is_empty() { "" } else { "?" };
        format!("{}://{}{sep}{query}", self.scheme, hosts.join(","))
    }

    /// Waits until member `i` serves clients; fails early if it exited.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let ready = self.probes.ready;
        let member = self.member_mut(i)?;
        let name = member.name.clone();
        let mut exited = None;
        let waited = wait_until(&format!("{name} ready"), timeout, || {
            if let Err(e) = member.proc.check_running() {
                exited = Some(e);
                return true;
            }
            ready(member)
        });
        if let Some(e) = exited {
            return Err(e);
        }
        waited
    }

    /// Waits until every member serves clients.
    pub fn wait_all_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_ready(i, left.max(Duration::from_millis(100)))?;
        }
        Ok(())
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.member_mut(i)?.proc.kill();
        Ok(())
    }

    /// Starts member `i` again on its data dir and ports (without waiting).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.member_mut(i)?.proc.restart()
    }

    /// Freezes member `i` (SIGSTOP).
    pub fn freeze(&self, i: usize) -> Result<()> {
        self.member(i)?.proc.freeze();
        Ok(())
    }

    /// Lets member `i` go on (SIGCONT).
    pub fn thaw(&self, i: usize) -> Result<()> {
        self.member(i)?.proc.thaw();
        Ok(())
    }

    /// The process id of member `i`.
    pub fn pid(&self, i: usize) -> Result<u32> {
        Ok(self.member(i)?.proc.pid())
    }

    /// The index of the current leader, waiting up to `timeout` for one.
    pub fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.members.iter().position(self.probes.is_leader) {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                bail!("{}: no leader after {timeout:?}", self.backend);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn member(&self, i: usize) -> Result<&Member> {
        self.members
            .get(i)
            .with_context(|| format!("{} has no member {i}", self.backend))
    }

    fn member_mut(&mut self, i: usize) -> Result<&mut Member> {
        let backend = self.backend;
        self.members
            .get_mut(i)
            .with_context(|| format!("{backend} has no member {i}"))
    }
}

//! Consul for the tests: Consul 1.8.7 from Debian bullseye (the only Debian
//! release that ships it), extracted under `target/xtask`, run as two `-dev`
//! agents on free loopback ports:
//!
//! - a plain agent for the conformance, liveness and interop tests
//!   (`ANYKV_TEST_CONSUL`);
//! - an agent with ACLs enabled, default policy `deny` and a known management
//!   token, for the permission tests (`ANYKV_TEST_CONSUL_ACL`,
//!   `ANYKV_TEST_CONSUL_ACL_TOKEN`).
//!
//! `ANYKV_CONSUL_BIN` points at the same binary, for the `consul kv` interop
//! test. DNS and gRPC are off; `-dev` keeps all data in memory.
//!
//! Both raise `limits.http_max_conns_per_client` from Consul's default of
//! 200 to 4096, because every test process connects from 127.0.0.1.
//! [`Agents`] starts them otherwise: with Consul's default limits (as the
//! watch bench wants: what an application meets on a default agent), and
//! without the ACL agent.

use std::{
    collections::hash_map::RandomState,
    fs,
    hash::{BuildHasher, Hasher},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    Ctx, Proc, Started,
    cluster::{Cluster, Member, Port, Probes},
    free_port, wait_until,
};

/// How long an agent may take to elect itself leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts both agents and exports their URLs, the ACL token and the binary.
pub fn start(ctx: &Ctx) -> Result<Started> {
    Agents::new().start(ctx)
}

/// Which `-dev` agents to start, and how: [`start`] is `Agents::new()`.
#[derive(Clone, Debug)]
pub struct Agents {
    default_limits: bool,
    acl: bool,
}

impl Default for Agents {
    fn default() -> Agents {
        Agents::new()
    }
}

impl Agents {
    /// The plain agent and the ACL agent, with
    /// `limits.http_max_conns_per_client = 4096`.
    pub fn new() -> Agents {
        Agents {
            default_limits: false,
            acl: true,
        }
    }

    /// Keep Consul's default limits (`http_max_conns_per_client = 200` per
    /// client address): nothing under `limits` is configured.
    pub fn default_limits(mut self) -> Agents {
        self.default_limits = true;
        self
    }

    /// Only the plain agent (`ANYKV_TEST_CONSUL` and `ANYKV_CONSUL_BIN`).
    pub fn without_acl(mut self) -> Agents {
        self.acl = false;
        self
    }

    /// Starts the agents and exports their URLs (and the ACL token and the
    /// binary); the plain agent is the first process.
    pub fn start(&self, ctx: &Ctx) -> Result<Started> {
        start_agents(ctx, self)
    }
}

fn start_agents(ctx: &Ctx, opts: &Agents) -> Result<Started> {
    let bin = binary(ctx)?;

    let mut started = Started::default();

    let plain = spawn_agent(ctx, &bin, "consul", None, opts.default_limits)?;
    started.env.push((
        "ANYKV_TEST_CONSUL".into(),
        format!("consul://127.0.0.1:{}", plain.http_port),
    ));
    started.procs.push(plain.proc);

    if opts.acl {
        let token = uuid_like();
        let acl = spawn_agent(ctx, &bin, "consul-acl", Some(&token), opts.default_limits)?;
        started.env.push((
            "ANYKV_TEST_CONSUL_ACL".into(),
            format!("consul://127.0.0.1:{}", acl.http_port),
        ));
        started
            .env
            .push(("ANYKV_TEST_CONSUL_ACL_TOKEN".into(), token));
        started.procs.push(acl.proc);
    }

    started
        .env
        .push(("ANYKV_CONSUL_BIN".into(), bin.display().to_string()));
    Ok(started)
}

/// `usr/bin/consul` of bullseye's package, extracted (and cached) by apt.
fn binary(ctx: &Ctx) -> Result<PathBuf> {
    let root = ctx.apt_package("consul", Some("bullseye"))?;
    let bin = root.join("usr/bin/consul");
    if !bin.exists() {
        bail!(
            "the consul package has no usr/bin/consul under {}",
            root.display()
        );
    }
    Ok(bin)
}

/// Starts `n` Consul servers (not `-dev`: data dirs on disk, so a killed
/// server restarts with its data) for the fault suite, without waiting.
/// `raft_multiplier = 1` lets a restarted server elect itself in 1–2 s
/// instead of ~10 s. With `proxied`, each HTTP (client) port has a proxy
/// port in front; the peer ports (server RPC, serf) are always direct.
///
/// With `n > 1`, applications talk to a client agent (as in production:
/// anykv's Consul driver talks to one agent), which forwards to the
/// servers; the cluster's URL names that agent, so any server can fail.
pub fn cluster(ctx: &Ctx, name: &str, n: usize, proxied: bool) -> Result<Cluster> {
    let bin = binary(ctx)?;
    struct Ports {
        http: Port,
        server: Port,
        serf_lan: Port,
        serf_wan: u16,
    }
    let ports: Vec<Ports> = (0..n)
        .map(|_| {
            Ok(Ports {
                http: Port::new(proxied)?,
                server: Port::direct()?,
                serf_lan: Port::direct()?,
                serf_wan: free_port()?,
            })
        })
        .collect::<Result<_>>()?;
    let mut members = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let node = format!("{name}-{}", i + 1);
        let dir = ctx.tempdir(&node)?;
        let config = dir.join("server.hcl");
        fs::write(
            &config,
            format!(
                "performance {{ raft_multiplier = 1 }}\n\
                 limits {{ http_max_conns_per_client = 4096 }}\n\
                 ports {{ dns = -1, grpc = -1, http = {}, server = {}, serf_lan = {}, serf_wan = {} }}\n",
                p.http.listen, p.server.listen, p.serf_lan.listen, p.serf_wan
            ),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.args([
            "agent",
            "-server",
            "-client",
            "127.0.0.1",
            "-bind",
            "127.0.0.1",
        ])
        .args(["-node", &node])
        .args(["-bootstrap-expect", &n.to_string()])
        .arg("-data-dir")
        .arg(dir.join("data"))
        .arg("-config-file")
        .arg(&config)
        .env("HOME", &dir)
        .current_dir(&dir);
        for (j, other) in ports.iter().enumerate() {
            if j != i {
                cmd.arg("-retry-join")
                    .arg(format!("127.0.0.1:{}", other.serf_lan.listen));
            }
        }
        members.push(Member {
            proc: Proc::spawn(ctx, &node, cmd)?,
            name: node,
            client: p.http,
            peers: vec![p.server, p.serf_lan],
        });
    }
    let joins: Vec<u16> = ports.iter().map(|p| p.serf_lan.listen).collect();
    let gateway = if n > 1 {
        Some(client_agent(ctx, &bin, &format!("{name}-agent"), &joins)?)
    } else {
        None
    };
    let probes = Probes {
        ready: |m| has_leader(m.client.listen),
        is_leader: |m| {
            let me = format!("127.0.0.1:{}", m.peers[0].listen);
            http_get(m.client.listen, "/v1/status/leader", None)
                .is_some_and(|(status, body)| status == 200 && body.trim().trim_matches('"') == me)
        },
    };
    let cluster = Cluster::new("consul", "consul", "", members, probes);
    Ok(match gateway {
        Some((port, proc)) => cluster.with_gateway(port, vec![proc]),
        None => cluster,
    })
}

/// A client (non-server) agent joined to the servers at `joins`: its HTTP
/// port and process.
fn client_agent(ctx: &Ctx, bin: &Path, node: &str, joins: &[u16]) -> Result<(u16, Proc)> {
    let dir = ctx.tempdir(node)?;
    let http = free_port()?;
    let config = dir.join("agent.hcl");
    fs::write(
        &config,
        format!(
            "limits {{ http_max_conns_per_client = 4096 }}\n\
             ports {{ dns = -1, grpc = -1, http = {http}, serf_lan = {}, serf_wan = -1, server = {} }}\n",
            free_port()?,
            free_port()?
        ),
    )?;
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "-client", "127.0.0.1", "-bind", "127.0.0.1"])
        .args(["-node", node])
        .arg("-data-dir")
        .arg(dir.join("data"))
        .arg("-config-file")
        .arg(&config)
        .env("HOME", &dir)
        .current_dir(&dir);
    for port in joins {
        cmd.arg("-retry-join").arg(format!("127.0.0.1:{port}"));
    }
    Ok((http, Proc::spawn(ctx, node, cmd)?))
}

struct Agent {
    proc: Proc,
    http_port: u16,
}

/// Starts one `-dev` agent; with `acl_token`, ACLs are on (default deny) and
/// the token is the management ("master") token; with `default_limits`,
/// `limits` keeps Consul's defaults.
fn spawn_agent(
    ctx: &Ctx,
    bin: &Path,
    name: &str,
    acl_token: Option<&str>,
    default_limits: bool,
) -> Result<Agent> {
    let dir = ctx.tempdir(name)?;
    let http_port = free_port()?;
    let serf_lan = free_port()?;
    let serf_wan = free_port()?;
    let server = free_port()?;

    let mut cmd = Command::new(bin);
    cmd.args([
        "agent",
        "-dev",
        "-client",
        "127.0.0.1",
        "-bind",
        "127.0.0.1",
    ])
    .args(["-node", name])
    .args(["-http-port", &http_port.to_string()])
    .args(["-dns-port", "-1", "-grpc-port", "-1"])
    .args(["-serf-lan-port", &serf_lan.to_string()])
    .args(["-serf-wan-port", &serf_wan.to_string()])
    .args(["-server-port", &server.to_string()])
    .env("HOME", &dir)
    .current_dir(&dir);
    if !default_limits {
        // Every test process connects from 127.0.0.1; Consul's default of
        // 200 HTTP connections per client IP would reset some of them when
        // several test binaries run at once.
        cmd.args(["-hcl", "limits { http_max_conns_per_client = 4096 }"]);
    }
    if let Some(token) = acl_token {
        let config = write_acl_config(&dir, token)?;
        cmd.arg("-config-file").arg(config);
    }
    let mut proc = Proc::spawn(ctx, name, cmd)?;

    let ready = wait_until(&format!("{name} leader"), READY_TIMEOUT, || {
        if proc.check_running().is_err() {
            return true; // reported below
        }
        match acl_token {
            // A leader, and the ACL system bootstrapped with our token.
            Some(token) => {
                has_leader(http_port)
                    && http_get(http_port, "/v1/acl/token/self", Some(token))
                        .is_some_and(|(status, _)| status == 200)
            }
            None => has_leader(http_port),
        }
    });
    proc.check_running()?;
    ready?;
    Ok(Agent { proc, http_port })
}

/// The ACL configuration of the auth agent. `master` is the 1.8 name of the
/// bootstrap (initial management) token; the agent uses it too, so that its
/// own catalog updates are allowed under `default_policy = "deny"`.
fn write_acl_config(dir: &Path, token: &str) -> Result<PathBuf> {
    let path = dir.join("acl.hcl");
    fs::write(
        &path,
        format!(
            r#"acl {{
  enabled = true
  default_policy = "deny"
  down_policy = "extend-cache"
  enable_token_persistence = false
  tokens {{
    master = "{token}"
    agent = "{token}"
  }}
}}
"#
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// True once `/v1/status/leader` names a leader.
fn has_leader(port: u16) -> bool {
    http_get(port, "/v1/status/leader", None)
        .is_some_and(|(status, body)| status == 200 && body.trim().trim_matches('"').contains(':'))
}

/// A minimal HTTP/1.0 GET on 127.0.0.1 (xtask carries no HTTP client):
/// status code and body.
fn http_get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let auth = token
        .map(|t| format!("X-Consul-Token: {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A random token in UUID shape (Consul wants its secrets to look like UUIDs);
/// std's per-process random hasher keys are the entropy source, which is
/// plenty for a throw-away test token.
fn uuid_like() -> String {
    let mut words = [0u64; 2];
    for (i, w) in words.iter_mut().enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        *w = h.finish();
    }
    let hex = format!("{:016x}{:016x}", words[0], words[1]);
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

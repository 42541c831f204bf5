//! Helpers shared by the Consul integration tests.
#![allow(dead_code, unused_imports)] // each test binary uses a part
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::{path::Path, time::Duration};

use anykv_servers::{Cluster, Ctx};

use anykv_testkit::server;
pub use anykv_testkit::{
    server::{closed_port, companion, open_ns as open, with_query},
    server_url as url,
};

/// A namespace no other test or run uses.
pub fn unique(name: &str) -> String {
    server::unique("consul-tests", name)
}

/// `host:port` of a `consul://host:port/…` URL.
pub fn addr(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?']).next().unwrap_or("").to_owned()
}

/// A TCP proxy to the agent of `url`, and a `consul://` URL through it (for
/// faults on one handle's path, or counting its traffic).
pub async fn proxy_to(url: &str) -> (anykv_testkit::proxy::Proxy, String) {
    let upstream = addr(url).parse().expect("agent address");
    let proxy = anykv_testkit::proxy::Proxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .expect("proxy");
    let via = format!("consul://{}", proxy.local_addr());
    (proxy, via)
}

/// A raw HTTP call to the agent (for setup the driver does not do: ACL
/// tokens, session inspection). Returns status and body.
pub async fn http(
    method: reqwest::Method,
    url: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method, format!("http://{}/v1/{path}", addr(url)))
        .timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.header("X-Consul-Token", t);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.expect("raw http call");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

/// The raw entry of a key (`None` if absent), as Consul's JSON.
pub async fn raw_entry(url: &str, key: &str, token: Option<&str>) -> Option<serde_json::Value> {
    let (status, body) = http(reqwest::Method::GET, url, &format!("kv/{key}"), token, None).await;
    match status {
        404 => None,
        200 => {
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            v.get(0).cloned()
        }
        other => panic!("GET kv/{key}: {other} {body}"),
    }
}

/// A free 127.0.0.1 port (bound, then released for the agent).
pub fn free_port() -> u16 {
    closed_port()
}

/// A private `consul agent -dev` that a test may stop, freeze or kill
/// without disturbing the shared agents. Killed when dropped.
pub struct PrivateAgent {
    child: std::process::Child,
    /// `consul://127.0.0.1:<http port>`.
    pub url: String,
    args: Vec<String>,
    bin: String,
}

impl PrivateAgent {
    /// Starts an agent from `ANYKV_CONSUL_BIN` on free ports and waits for
    /// it to elect itself leader.
    pub async fn start(bin: &str) -> PrivateAgent {
        Self::start_with(bin, &[]).await
    }

    /// Like [`start`](Self::start), with extra agent arguments (`-hcl …`).
    pub async fn start_with(bin: &str, extra: &[String]) -> PrivateAgent {
        let http = free_port();
        let mut args: Vec<String> = vec![
            "agent".into(),
            "-dev".into(),
            "-client".into(),
            "127.0.0.1".into(),
            "-bind".into(),
            "127.0.0.1".into(),
            "-node".into(),
            format!("private-{http}"),
            "-http-port".into(),
            http.to_string(),
            "-dns-port".into(),
            "-1".into(),
            "-grpc-port".into(),
            "-1".into(),
            "-serf-lan-port".into(),
            free_port().to_string(),
            "-serf-wan-port".into(),
            free_port().to_string(),
            "-server-port".into(),
            free_port().to_string(),
        ];
        args.extend_from_slice(extra);
        let child = spawn(bin, &args);
        let agent = PrivateAgent {
            child,
            url: format!("consul://127.0.0.1:{http}"),
            args,
            bin: bin.to_owned(),
        };
        agent.wait_leader().await;
        agent
    }

    /// Waits until the agent names a leader.
    pub async fn wait_leader(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let client = reqwest::Client::new();
            let r = client
                .get(format!("http://{}/v1/status/leader", addr(&self.url)))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if let Ok(r) = r
                && let Ok(body) = r.text().await
                && body.contains(':')
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "private consul agent did not elect a leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Kills the agent and starts a fresh one on the same ports (an empty
    /// store: `-dev` keeps nothing).
    pub async fn restart(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.bin, &self.args);
        self.wait_leader().await;
    }

    /// Kills the agent for good.
    pub fn kill(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, args: &[String]) -> std::process::Child {
    std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {bin}: {e}"))
}

impl Drop for PrivateAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private single Consul *server* with its data on disk (not `-dev`), so
/// that a test can `kill -9` it and restart it on the same data dir and
/// ports, as a crash would: `anykv_servers::consul::cluster` with one member
/// (`raft_multiplier = 1`, so the restarted server elects itself within a
/// second or two), from the Consul package `cargo xtask` cached under
/// `target/xtask`. Killed, and its directory removed, when dropped (also when
/// the test panics).
///
/// `anykv_servers` is synchronous (std sleeps while it waits), so every call
/// that waits runs in `block_in_place`: the tests use the multi-thread runtime.
pub struct PersistentServer {
    /// Declared before `_ctx`: the process is stopped before its data dir
    /// is removed.
    cluster: Cluster,
    /// Owns the data dir (removed when dropped).
    _ctx: Ctx,
    /// `consul://127.0.0.1:<http port>`.
    pub url: String,
}

impl PersistentServer {
    /// Starts a server on free ports in a fresh temp dir and waits for it to
    /// elect itself leader. `name` names its node and log file
    /// (`target/xtask/logs/consul-<name>-1.log`).
    pub async fn start(name: &str) -> PersistentServer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let name = format!("consul-{name}");
        tokio::task::block_in_place(|| {
            let ctx = Ctx::new(root).expect("anykv-servers context");
            let cluster = anykv_servers::consul::cluster(&ctx, &name, 1, false)
                .unwrap_or_else(|e| panic!("starting consul server {name}: {e:#}"));
            let url = cluster.url("");
            let mut server = PersistentServer {
                cluster,
                _ctx: ctx,
                url,
            };
            server.wait_for_leader();
            server
        })
    }

    /// Waits (at most 60 s) until the server names a leader.
    pub async fn wait_leader(&mut self) {
        tokio::task::block_in_place(|| self.wait_for_leader());
    }

    fn wait_for_leader(&mut self) {
        if let Err(e) = self.cluster.wait_ready(0, LEADER_TIMEOUT) {
            panic!("private consul server did not elect a leader: {e:#}");
        }
    }

    /// Freezes the server (SIGSTOP): it holds its sockets and answers nothing.
    pub fn freeze(&self) {
        self.cluster.freeze(0).expect("one member");
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) {
        self.cluster.thaw(0).expect("one member");
    }

    /// `kill -9`: the server dies without a chance to flush or hand over.
    pub fn kill9(&mut self) {
        tokio::task::block_in_place(|| self.cluster.kill(0)).expect("one member");
    }

    /// Starts the server again on the same data dir and ports (after
    /// [`kill9`](Self::kill9)); does not wait for a leader.
    pub fn restart(&mut self) {
        tokio::task::block_in_place(|| self.cluster.restart(0))
            .unwrap_or_else(|e| panic!("restarting the consul server: {e:#}"));
    }
}

/// How long a (re)started private server may take to elect itself.
const LEADER_TIMEOUT: Duration = Duration::from_secs(60);

impl Drop for PersistentServer {
    fn drop(&mut self) {
        // A crash, as before: dropping the member alone would SIGTERM it and
        // wait up to 5 s for a graceful exit.
        let _ = self.cluster.kill(0);
    }
}

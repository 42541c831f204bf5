//! Service discovery: instances register ephemeral keys, a client lists and
//! watches them.
//!
//! Each instance of service `web` writes `services/web/<id>` = its address.
//! The key must disappear when the instance does, so it is tied to the
//! instance's liveness:
//! - **session** mode (the backend declares sessions): `Store::session` and
//!   `Session::put`; the key goes when the session is closed, dropped, or
//!   when the process dies (after the session TTL);
//! - **ttl** mode (no sessions yet): a key written with a TTL and refreshed
//!   at a third of it; the key goes when it is deleted on shutdown, or when
//!   the refreshes stop (a crash) and the TTL runs out.
//!
//! The client keeps a [`Mirror`](anykv::Mirror) of `services/web/`: its
//! list is local and current, and its `changes()` report joins and leaves.
//!
//! ```text
//! cargo run --example service_registry                     # memory://
//! cargo run --example service_registry -- redb://reg.redb
//! cargo run --example service_registry -- consul://127.0.0.1:8500 --ttl 10
//! ```
//!
//! The demo registers `--instances` instances (default 3), then one leaves
//! cleanly and one crashes (stops renewing); it exits once the client has
//! seen both go. `--ttl` (seconds, default 2) bounds how long a crashed
//! instance stays listed; Consul sessions need at least 10.

use std::time::Duration;

use anyhow::{Context, bail};
use anykv::{
    Condition, Event, Key, Kv, Prefix, PutOptions, Session, SessionOptions, Store, StoreExt,
};
use futures::StreamExt;
use tokio::task::JoinHandle;

/// How an instance's key is tied to its liveness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An ephemeral key under a session.
    Session,
    /// A TTL key refreshed in the background.
    Ttl,
}

/// What the client saw, for the example's test.
#[derive(Debug)]
pub struct Outcome {
    /// How instances registered.
    pub mode: Mode,
    /// The most instances listed at once.
    pub most: usize,
    /// The instances listed at the end.
    pub remaining: Vec<String>,
}

const SERVICE: &str = "services/web";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = anykv_examples::Args::parse(&["instances", "ttl"])?;
    let url = args.positional(0, "memory://registry-demo");
    let instances = args.value("instances", 3)?;
    let ttl = args.seconds("ttl", Duration::from_secs(2))?;
    let outcome = run(&url, instances, ttl).await?;
    println!(
        "done ({:?} mode): at most {} instances, remaining {:?}",
        outcome.mode, outcome.most, outcome.remaining
    );
    Ok(())
}

/// One registered instance.
enum Registration {
    /// Holds the session: its keys live as long as it does.
    Session(Session),
    /// The refresher task and the key it refreshes.
    Ttl { key: Key, refresher: JoinHandle<()> },
}

impl Registration {
    /// Registers `id` at `addr`.
    async fn register(
        kv: &Kv,
        mode: Mode,
        id: &str,
        addr: &str,
        ttl: Duration,
    ) -> anyhow::Result<Self> {
        let key = Key::new(format!("{SERVICE}/{id}"))?;
        match mode {
            Mode::Session => {
                let session = kv.session(SessionOptions::with_ttl(ttl)).await?;
                // IfAbsent: two instances configured with the same id must
                // not silently replace each other.
                session
                    .put(&key, addr.to_owned().into(), Condition::IfAbsent)
                    .await?;
                // A real instance would also watch `session.lost()` (its
                // lease expired during a partition) and stop serving or
                // register again; the key is gone for clients by then.
                Ok(Registration::Session(session))
            }
            Mode::Ttl => {
                let opts = PutOptions::if_absent().with_ttl(ttl);
                kv.put(&key, addr.to_owned().into(), opts).await?;
                let refresher =
                    tokio::spawn(refresh(kv.clone(), key.clone(), addr.to_owned(), ttl));
                Ok(Registration::Ttl { key, refresher })
            }
        }
    }

    /// A clean shutdown: the key goes at once.
    async fn leave(self, kv: &Kv) -> anyhow::Result<()> {
        match self {
            Registration::Session(session) => session.close().await?,
            Registration::Ttl { key, refresher } => {
                refresher.abort();
                kv.delete(&key, Condition::Always).await?;
            }
        }
        Ok(())
    }

    /// A crash: renewal stops, nothing is cleaned up.
    fn crash(self) {
        match self {
            // In-process we cannot freeze the session's keep-alive without
            // ending it: dropping it ends the session, as a process exit
            // would end it once its TTL runs out.
            Registration::Session(session) => drop(session),
            Registration::Ttl { refresher, .. } => refresher.abort(),
        }
    }
}

/// Re-writes a TTL key at a third of its TTL, so that one or two missed
/// refreshes (a slow network) do not drop a live instance.
async fn refresh(kv: Kv, key: Key, addr: String, ttl: Duration) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        let opts = PutOptions::default().with_ttl(ttl);
        if let Err(e) = kv.put(&key, addr.clone().into(), opts).await {
            // Keep trying: the key lives on until its TTL runs out.
            eprintln!("refreshing {key}: {e}");
        }
    }
}

/// Registers `instances` instances at `url`, removes two, and returns what
/// the client saw.
pub async fn run(url: &str, instances: usize, ttl: Duration) -> anyhow::Result<Outcome> {
    let kv = anykv::open(url)
        .await
        .with_context(|| format!("opening {url}"))?;
    run_on(kv, instances, ttl).await
}

/// [`run`] on an open store.
pub async fn run_on(kv: Kv, instances: usize, ttl: Duration) -> anyhow::Result<Outcome> {
    if instances < 2 {
        bail!("the demo needs at least 2 instances");
    }
    let caps = kv.capabilities();
    let mode = if caps.sessions.is_some() {
        Mode::Session
    } else if caps.ttl.is_some() {
        Mode::Ttl
    } else {
        bail!("{} has neither sessions nor TTLs", kv.backend());
    };
    println!("{}: instances register by {mode:?}", kv.backend());

    // The client: a mirror of the service's prefix and its change stream.
    let service = Prefix::new(SERVICE)?;
    let members = kv.mirror(&service).await?;
    let mut changes = members.changes();

    let mut registrations = Vec::new();
    for i in 0..instances {
        let addr = format!("10.0.0.{}:8080", i + 1);
        registrations
            .push(Registration::register(&kv, mode, &format!("web-{i}"), &addr, ttl).await?);
    }

    // Bounded: a crashed instance is gone within its TTL plus the backend's
    // granularity; allow generously more before calling it a failure.
    let deadline = tokio::time::Instant::now() + ttl * 3 + Duration::from_secs(10);
    let mut most = 0;
    let mut removed = false;
    loop {
        let now = members.keys(&service);
        most = most.max(now.len());
        if !removed && now.len() >= instances {
            println!("all {instances} registered: {now:?}");
            // One instance shuts down cleanly, one crashes.
            let mut regs = registrations.drain(..2);
            if let (Some(leaving), Some(crashing)) = (regs.next(), regs.next()) {
                drop(regs);
                leaving.leave(&kv).await?;
                println!("web-0 left");
                crashing.crash();
                match mode {
                    Mode::Session => println!("web-1 crashed; its session ends, its key goes"),
                    Mode::Ttl => println!("web-1 crashed; listed until its {ttl:?} TTL runs out"),
                }
            }
            removed = true;
        }
        if removed && now.len() <= instances - 2 {
            for r in registrations {
                r.leave(&kv).await?;
            }
            return Ok(Outcome {
                mode,
                most,
                remaining: now,
            });
        }
        let change = tokio::time::timeout_at(deadline, changes.next())
            .await
            .context("the client did not see the instances come and go in time")?;
        match change {
            Some(Ok(Event::Put { kv, .. })) if kv.create_revision == kv.mod_revision => {
                println!(
                    "joined: {} at {}",
                    kv.key.name(),
                    String::from_utf8_lossy(&kv.value)
                );
            }
            // A refresh of a TTL key: not a membership change.
            Some(Ok(Event::Put { .. })) => {}
            Some(Ok(Event::Delete { key, .. })) => println!("left: {}", key.name()),
            // The mirror resyncs by itself; its list stays the truth.
            Some(Err(e)) => println!("watch: {e}"),
            None => bail!("the mirror stopped"),
        }
    }
}

//! Coordination commands over sessions and elections:
//!
//! - `anykv elect NAME -- COMMAND…`: campaign, run the command while this
//!   process leads, resign when it exits;
//! - `anykv leader NAME [--watch]`: who leads (value and term), or follow it;
//! - `anykv register KEY VALUE -- COMMAND…`: an ephemeral key kept while the
//!   command runs.
//!
//! The command is run and killed on loss by [`crate::child`], exactly as
//! `anykv lock` does. A backend without sessions (`anykv drivers` shows
//! `sessions` per driver) refuses `elect` and `register` with its
//! `Unsupported` error (exit 2).

use std::time::Duration;

use anykv::{CampaignOptions, Condition, Error, Key, Kv, Leader, SessionOptions, Store, StoreExt};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use crate::{
    child::{self, CommandLine, Ran},
    exit::{self, Failure},
    output,
    signals::Signals,
};

/// Environment variable carrying the leader's term to the command.
pub const TERM_ENV: &str = "ANYKV_TERM";
/// Environment variable carrying the leader's candidate key to the command.
pub const LEADER_KEY_ENV: &str = "ANYKV_LEADER_KEY";
/// Environment variable carrying the session id to a registered command.
pub const SESSION_ENV: &str = "ANYKV_SESSION_ID";

/// A checked `elect` command.
#[derive(Debug)]
pub struct ElectPlan {
    /// The election's name.
    pub name: Key,
    /// The value this candidate leads with.
    pub value: Bytes,
    /// Session TTL.
    pub ttl: Duration,
    /// How long to wait for leadership; `None`: forever.
    pub wait: Option<Duration>,
    /// What runs while leading.
    pub command: CommandLine,
}

/// A checked `register` command.
#[derive(Debug)]
pub struct RegisterPlan {
    /// The ephemeral key.
    pub key: Key,
    /// Its value.
    pub value: Bytes,
    /// Session TTL.
    pub ttl: Duration,
    /// Fail (exit 3) if the key exists.
    pub if_absent: bool,
    /// What runs while registered.
    pub command: CommandLine,
}

/// `elect`: campaign, run the command while leading, resign after it.
pub async fn elect(kv: &Kv, plan: ElectPlan) -> Result<u8, Failure> {
    // Installed before the campaign so that Ctrl-C while waiting ends it
    // cleanly (dropping the campaign withdraws the candidate).
    let mut signals = Signals::new();
    let election = kv.election(&plan.name);
    let mut opts = CampaignOptions::default().with_ttl(plan.ttl);
    if let Some(wait) = plan.wait {
        opts = opts.with_wait(wait);
    }
    let campaign = election.campaign(plan.value.clone(), opts);
    let leadership = tokio::select! {
        l = campaign => match l {
            Ok(l) => l,
            Err(Error::Timeout { .. }) => {
                let after = plan
                    .wait
                    .map(|w| format!(" within {}", humantime::format_duration(w)))
                    .unwrap_or_default();
                return Err(Failure::new(
                    exit::LOCK,
                    format!("not elected: {}{after}{}", plan.name, leader_note(&election.leader().await)),
                ));
            }
            // The candidate's key or session went away before it led (a
            // delete from outside, an expired session): never elected.
            Err(e @ Error::LockLost { .. }) => {
                return Err(Failure::new(
                    exit::LOCK,
                    format!("candidacy lost while campaigning in {}: {e}; the command was not run", plan.name),
                ));
            }
            Err(e) => return Err(e.into()),
        },
        s = signals.next() => {
            return Err(Failure::new(
                128 + child::signal_number(s),
                format!("interrupted while campaigning in {}", plan.name),
            ));
        }
    };
    let env = [
        (TERM_ENV, leadership.term().to_string()),
        (LEADER_KEY_ENV, leadership.key().to_string()),
    ];
    let ran = child::run_while(&plan.command, &env, leadership.lost(), &mut signals).await;
    match ran {
        Ok(Ran::Lost) => {
            // Dropping resigns what may be left (nothing, usually).
            drop(leadership);
            Err(Failure::new(
                exit::LOCK,
                format!("leadership lost: {}; the command was killed", plan.name),
            ))
        }
        other => {
            if let Err(e) = leadership.resign().await {
                eprintln!(
                    "warning: resigning from {} failed ({}); the candidacy ends when its session's TTL runs out",
                    plan.name,
                    Failure::from(e)
                );
            }
            match other {
                Ok(Ran::Exited(code)) => Ok(code),
                Ok(Ran::Lost) => Ok(exit::LOCK),
                Err(f) => Err(f),
            }
        }
    }
}

/// " (leader: VALUE, term N)" for a refusal message, when known.
fn leader_note(leader: &anykv::Result<Option<Leader>>) -> String {
    match leader {
        Ok(Some(l)) => format!(
            " (leader: {}, term {})",
            output::preview(&l.value, output::PREVIEW_CHARS),
            l.term
        ),
        _ => String::new(),
    }
}

/// `leader`: print the leader now, or (`watch`) every change until Ctrl-C.
pub async fn leader(kv: &Kv, name: &Key, watch: bool, json: bool) -> Result<u8, Failure> {
    let election = kv.election(name);
    if !watch {
        return match election.leader().await? {
            Some(l) => {
                output::println(&leader_line(Some(&l), json))?;
                Ok(exit::OK)
            }
            None if json => {
                output::println(&leader_line(None, true))?;
                Err(Failure::quiet(exit::FAILURE))
            }
            None => Err(Failure::new(exit::FAILURE, format!("no leader: {name}"))),
        };
    }
    let mut signals = Signals::new();
    let mut changes = election.observe();
    loop {
        tokio::select! {
            _ = signals.next() => return Ok(exit::OK),
            item = changes.next() => match item {
                Some(Ok(l)) => output::println(&leader_line(l.as_ref(), json))?,
                // The stream goes on after an error (it re-subscribes);
                // say so on stderr without ending the watch.
                Some(Err(e)) => eprintln!("warning: {}", Failure::from(e)),
                None => return Ok(exit::OK),
            },
        }
    }
}

/// A leader in JSON (`leader --json`).
#[derive(Serialize)]
struct JsonLeader<'a> {
    term: u64,
    key: &'a str,
    #[serde(flatten)]
    value: output::JsonValue,
}

/// One output line: `VALUE<TAB>TERM` (value escaped as in `list`, not
/// cut) or `no leader`; with `json`, an object or `null`.
pub fn leader_line(leader: Option<&Leader>, json: bool) -> String {
    match (leader, json) {
        (Some(l), false) => format!("{}\t{}", output::escape(&l.value), l.term),
        (None, false) => "no leader".to_owned(),
        (Some(l), true) => output::to_json(&JsonLeader {
            term: l.term,
            key: l.key.as_str(),
            value: output::JsonValue::new(&l.value),
        }),
        (None, true) => "null".to_owned(),
    }
}

/// `register`: open a session, write the ephemeral key, run the command,
/// close the session (the key goes with it).
pub async fn register(kv: &Kv, plan: RegisterPlan) -> Result<u8, Failure> {
    let mut signals = Signals::new();
    let session = kv.session(SessionOptions::with_ttl(plan.ttl)).await?;
    let condition = if plan.if_absent {
        Condition::IfAbsent
    } else {
        Condition::Always
    };
    if let Err(e) = session.put(&plan.key, plan.value.clone(), condition).await {
        let _ = session.close().await;
        return Err(e.into());
    }
    let env = [(SESSION_ENV, session.id().to_owned())];
    let ran = child::run_while(&plan.command, &env, session.lost(), &mut signals).await;
    let closed = session.close().await;
    match ran {
        Ok(Ran::Lost) => Err(Failure::new(
            exit::LOCK,
            format!("session lost: {}; the command was killed", plan.key),
        )),
        Ok(Ran::Exited(code)) => {
            if let Err(e) = closed {
                eprintln!(
                    "warning: closing the session of {} failed ({}); the key goes when its TTL runs out",
                    plan.key,
                    Failure::from(e)
                );
            }
            Ok(code)
        }
        Err(f) => Err(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_lines() {
        let l = Leader {
            value: Bytes::from_static(b"node-1\n"),
            term: 42,
            key: Key::new("leaders/x/abc").unwrap(),
        };
        assert_eq!(leader_line(Some(&l), false), "node-1\\n\t42");
        assert_eq!(leader_line(None, false), "no leader");
        assert_eq!(
            leader_line(Some(&l), true),
            r#"{"term":42,"key":"leaders/x/abc","value":"node-1\n"}"#
        );
        assert_eq!(leader_line(None, true), "null");
    }
}

/// The commands end to end on an in-process store: a memory store with
/// sessions supplied by a test layer (ephemeral keys written through a
/// second handle on the same named store, deleted on close), so `elect`
/// and `register` run whether or not a driver has sessions yet.
#[cfg(all(test, unix, feature = "memory"))]
mod in_process {
    use std::sync::{Arc, Mutex};

    use anykv::{
        LostNotifier, Next, Request, Response, Session, SessionBackend, async_trait, lost_pair,
    };

    use super::*;

    /// Sessions for a memory store; `lose_all` ends them as an expired
    /// lease would.
    #[derive(Default)]
    struct TestSessions {
        store: Mutex<Option<Kv>>,
        live: Arc<Mutex<Vec<LostNotifier>>>,
    }

    struct TestSession {
        store: Kv,
        id: String,
        keys: Mutex<Vec<Key>>,
        notifier: LostNotifier,
    }

    #[async_trait]
    impl SessionBackend for TestSession {
        fn id(&self) -> String {
            self.id.clone()
        }

        async fn put(
            &self,
            key: &Key,
            value: Bytes,
            condition: Condition,
        ) -> anykv::Result<Version> {
            let v = self
                .store
                .put(
                    key,
                    value,
                    anykv::PutOptions {
                        condition,
                        ttl: None,
                    },
                )
                .await?;
            self.keys.lock().expect("poisoned").push(key.clone());
            Ok(v)
        }

        async fn close(&self) -> anykv::Result<()> {
            let keys = std::mem::take(&mut *self.keys.lock().expect("poisoned"));
            for key in keys {
                self.store.delete(&key, Condition::Always).await?;
            }
            self.notifier.notify();
            Ok(())
        }
    }

    #[async_trait]
    impl anykv::Layer for TestSessions {
        async fn call(&self, req: Request, next: Next<'_>) -> anykv::Result<Response> {
            let Request::Session { opts } = req else {
                return next.run(req).await;
            };
            let store = self.store.lock().expect("poisoned").clone().expect("store");
            let (notifier, lost) = lost_pair();
            self.live.lock().expect("poisoned").push(notifier.clone());
            let backend = TestSession {
                store,
                id: format!("test-{}", self.live.lock().expect("poisoned").len()),
                keys: Mutex::new(Vec::new()),
                notifier,
            };
            Ok(Response::Session(Session::new(
                Arc::new(backend),
                lost,
                opts.ttl,
            )))
        }
    }

    use anykv::Version;

    /// A Kv with sessions, and the notifiers of its sessions.
    async fn store(name: &str) -> (Kv, Arc<Mutex<Vec<LostNotifier>>>) {
        let url = format!("memory://{name}");
        let layer = TestSessions::default();
        *layer.store.lock().expect("poisoned") = Some(anykv::open(&url).await.expect("open"));
        let live = layer.live.clone();
        let kv = anykv::builder(&url)
            .layer(layer)
            .open()
            .await
            .expect("open");
        (kv, live)
    }

    fn sh(script: &str) -> CommandLine {
        CommandLine::new(vec!["sh".into(), "-c".into(), script.into()])
    }

    async fn until<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !f().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition never met"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn elect_runs_the_command_as_leader_and_resigns() {
        let (kv, _) = store("cli-elect-1").await;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let name = Key::new("leaders/a").unwrap();
        let plan = ElectPlan {
            name: name.clone(),
            value: Bytes::from_static(b"me"),
            ttl: Duration::from_secs(5),
            wait: None,
            command: sh(&format!(
                r#"echo "$ANYKV_TERM $ANYKV_LEADER_KEY" > {}; exit 7"#,
                out.display()
            )),
        };
        assert_eq!(elect(&kv, plan).await.unwrap(), 7);
        let text = std::fs::read_to_string(&out).unwrap();
        let (term, key) = text.trim().split_once(' ').unwrap();
        assert!(term.parse::<u64>().unwrap() > 0, "{text}");
        assert!(key.starts_with("leaders/a/"), "{text}");
        // Resigned: no leader, no candidate key left.
        assert_eq!(kv.election(&name).leader().await.unwrap(), None);
        assert!(kv.list(&name.as_prefix()).await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn elect_kills_the_command_when_leadership_is_lost() {
        let (kv, _) = store("cli-elect-2").await;
        let name = Key::new("leaders/b").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("started");
        let plan = ElectPlan {
            name: name.clone(),
            value: Bytes::from_static(b"me"),
            ttl: Duration::from_secs(5),
            wait: None,
            command: sh(&format!("touch {}; exec sleep 60", started.display())),
        };
        let task = tokio::spawn({
            let kv = kv.clone();
            async move { elect(&kv, plan).await }
        });
        let election = kv.election(&name);
        // The command runs only once the campaign has returned: the key is
        // then this process's leadership, not a candidacy still settling.
        until(|| async { started.exists() }).await;
        let leader = election.leader().await.unwrap().unwrap();
        assert_eq!(&leader.value[..], b"me");
        let started = std::time::Instant::now();
        kv.delete(&leader.key, Condition::Always).await.unwrap();
        let failure = task.await.unwrap().unwrap_err();
        assert_eq!(failure.code, exit::LOCK, "{failure}");
        assert!(failure.to_string().contains("leadership lost"), "{failure}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_candidate_waits_and_wait_runs_out() {
        let (kv, _) = store("cli-elect-3").await;
        let name = Key::new("leaders/c").unwrap();
        let election = kv.election(&name);
        let first = election
            .campaign(Bytes::from_static(b"first"), CampaignOptions::default())
            .await
            .unwrap();
        let plan = ElectPlan {
            name: name.clone(),
            value: Bytes::from_static(b"second"),
            ttl: Duration::from_secs(5),
            wait: Some(Duration::from_millis(300)),
            command: sh("exit 0"),
        };
        let failure = elect(&kv, plan).await.unwrap_err();
        assert_eq!(failure.code, exit::LOCK, "{failure}");
        assert!(failure.to_string().contains("leader: first"), "{failure}");
        first.resign().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn register_keeps_the_key_while_the_command_runs() {
        let (kv, live) = store("cli-register").await;
        let key = Key::new("instances/a").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let plan = RegisterPlan {
            key: key.clone(),
            value: Bytes::from_static(b"10.0.0.7:80"),
            ttl: Duration::from_secs(5),
            if_absent: true,
            command: sh(&format!(
                r#"test -n "$ANYKV_SESSION_ID" || exit 9; while [ ! -e {} ]; do sleep 0.05; done; exit 3"#,
                go.display()
            )),
        };
        let task = tokio::spawn({
            let kv = kv.clone();
            async move { register(&kv, plan).await }
        });
        until(|| async { kv.get(&key).await.unwrap().is_some() }).await;
        assert_eq!(
            &kv.get(&key).await.unwrap().unwrap().value[..],
            b"10.0.0.7:80"
        );
        std::fs::write(&go, b"").unwrap();
        assert_eq!(task.await.unwrap().unwrap(), 3);
        assert_eq!(kv.get(&key).await.unwrap(), None, "closed with the session");

        // Session lost while the command runs: killed, exit 5.
        let plan = RegisterPlan {
            key: key.clone(),
            value: Bytes::from_static(b"x"),
            ttl: Duration::from_secs(5),
            if_absent: false,
            command: sh("exec sleep 60"),
        };
        let task = tokio::spawn({
            let kv = kv.clone();
            async move { register(&kv, plan).await }
        });
        until(|| async { kv.get(&key).await.unwrap().is_some() }).await;
        for n in live.lock().expect("poisoned").iter() {
            n.notify();
        }
        let failure = task.await.unwrap().unwrap_err();
        assert_eq!(failure.code, exit::LOCK, "{failure}");
        assert!(failure.to_string().contains("session lost"), "{failure}");

        // --if-absent on an existing key: exit 3, nothing run.
        kv.put(
            &key,
            Bytes::from_static(b"taken"),
            anykv::PutOptions::default(),
        )
        .await
        .unwrap();
        let plan = RegisterPlan {
            key: key.clone(),
            value: Bytes::from_static(b"mine"),
            ttl: Duration::from_secs(5),
            if_absent: true,
            command: sh("exit 0"),
        };
        assert_eq!(register(&kv, plan).await.unwrap_err().code, exit::CONDITION);
        assert_eq!(&kv.get(&key).await.unwrap().unwrap().value[..], b"taken");
    }
}

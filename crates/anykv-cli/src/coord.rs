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

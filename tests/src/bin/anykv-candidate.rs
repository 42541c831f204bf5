//! A child process for the cross-process coordination tests
//! (`tests/tests/coordination_faults.rs`): it campaigns in an election, or
//! holds an ephemeral key, and reports on stdout, one line per step, so the
//! test can kill it with SIGKILL or freeze it with SIGSTOP at any point.
//!
//! ```text
//! anykv-candidate elect URL NAME VALUE TTL_MS     # LEADER <term>, LOST, PROCLAIM-AFTER-LOSS <kind>
//! anykv-candidate register URL KEY TTL_MS         # REGISTERED <session id>
//! ```

use std::{io::Write, time::Duration};

use anykv::{CampaignOptions, Condition, Key, SessionOptions, Store, StoreExt};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    say(&format!("ERROR {what}: {e}"));
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| fail("usage", "missing argument"))
    };
    let ttl = |i: usize| Duration::from_millis(arg(i).parse().unwrap_or_else(|e| fail("ttl", e)));
    let kv = anykv::open(&arg(1))
        .await
        .unwrap_or_else(|e| fail("open", e));
    match arg(0).as_str() {
        "elect" => {
            let name = Key::new(arg(2)).unwrap_or_else(|e| fail("name", e));
            let opts = CampaignOptions::default().with_ttl(ttl(4));
            let leadership = kv
                .election(&name)
                .campaign(arg(3).into(), opts)
                .await
                .unwrap_or_else(|e| fail("campaign", e));
            say(&format!("LEADER {}", leadership.term()));
            leadership.lost().await;
            say("LOST");
            let after = leadership.proclaim("after-loss".into()).await;
            match after {
                Ok(()) => say("PROCLAIM-AFTER-LOSS Ok"),
                Err(e) => say(&format!("PROCLAIM-AFTER-LOSS {:?}", e.kind())),
            }
        }
        "register" => {
            let key = Key::new(arg(2)).unwrap_or_else(|e| fail("key", e));
            let session = kv
                .session(SessionOptions::with_ttl(ttl(3)))
                .await
                .unwrap_or_else(|e| fail("session", e));
            session
                .put(&key, "alive".into(), Condition::Always)
                .await
                .unwrap_or_else(|e| fail("put", e));
            say(&format!("REGISTERED {}", session.id()));
            session.lost().await;
            say("LOST");
        }
        other => fail("usage", format!("unknown mode {other}")),
    }
}

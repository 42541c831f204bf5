//! Sessions, ephemeral keys and leader election.

use std::time::Duration;

use anykv_core::{
    Bytes, CampaignOptions, Condition, ErrorKind, Event, Kv, Leader, PutOptions, Session,
    SessionOptions, Start, Store, StoreExt, Target,
};
use futures::StreamExt;

use crate::support::{Ctx, EVENT_WAIT, err_kind, eventually, key, next_event, ok, prefix, settle};

/// The shortest TTL every backend accepts (Consul's minimum is 10 s).
const TTL: Duration = Duration::from_secs(10);

/// A session, or `None` after checking that an undeclared one is refused.
async fn session_or_unsupported(cx: &Ctx, kv: &Kv) -> Option<Session> {
    let got = kv.session(SessionOptions::with_ttl(TTL)).await;
    if cx.caps().sessions.is_none() {
        err_kind(
            "session without the capability",
            got,
            ErrorKind::Unsupported,
        );
        return None;
    }
    Some(ok("session", got))
}

pub async fn ephemeral_keys_end_with_their_session(cx: Ctx) {
    let kv = &cx.kv;
    let Some(s) = session_or_unsupported(&cx, kv).await else {
        return;
    };
    assert!(!s.id().is_empty() && !s.is_lost());
    let (a, b) = (key("eph/a"), key("eph/b"));
    let mut w = ok(
        "watch",
        kv.watch(Target::Prefix(prefix("eph")), Start::Now).await,
    );
    settle().await;
    let v = ok(
        "ephemeral put",
        s.put(&a, "1".into(), Condition::IfAbsent).await,
    );
    err_kind(
        "IfAbsent on an existing key",
        s.put(&a, "2".into(), Condition::IfAbsent).await,
        ErrorKind::AlreadyExists,
    );
    ok(
        "update",
        s.put(&a, "2".into(), Condition::IfVersion(v)).await,
    );
    ok("second key", s.put(&b, "b".into(), Condition::Always).await);
    // An ordinary key for everyone else.
    let seen = ok("get by another handle", cx.other_handle().get(&a).await);
    assert_eq!(seen.map(|p| p.value), Some(Bytes::from("2")));
    assert_eq!(ok("list", kv.list(&prefix("eph")).await).len(), 2);
    for _ in 0..3 {
        next_event("put events", &mut w).await;
    }
    let lost = s.lost();
    ok("close", s.close().await);
    tokio::time::timeout(EVENT_WAIT, lost)
        .await
        .expect("lost() after close");
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next_event("deletes after close", &mut w).await {
            Event::Delete { key, .. } => deleted.push(key.to_string()),
            other => panic!("expected deletes, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["eph/a", "eph/b"]);
    assert!(ok("list after close", kv.list(&prefix("eph")).await).is_empty());
}

pub async fn dropped_session_removes_its_keys(cx: Ctx) {
    let kv = &cx.kv;
    let Some(s) = session_or_unsupported(&cx, kv).await else {
        return;
    };
    let k = key("ephd/k");
    ok(
        "ephemeral put",
        s.put(&k, "v".into(), Condition::Always).await,
    );
    // A plain key beside it stays.
    ok(
        "plain put",
        kv.put(&key("ephd/plain"), "p".into(), PutOptions::default())
            .await,
    );
    drop(s);
    eventually("the dropped session's key is gone", EVENT_WAIT, || {
        let kv = kv.clone();
        let k = k.clone();
        async move { matches!(kv.get(&k).await, Ok(None)) }
    })
    .await;
    assert!(ok("plain", kv.get(&key("ephd/plain")).await).is_some());
}

/// Five candidates: one leader at a time, first come first served, terms
/// strictly increasing, `observe` sees every change in order, and a
/// resigned leader's `proclaim` fails.
pub async fn election_five_candidates(cx: Ctx) {
    let kv = cx.kv.clone();
    let name = key("elect/e5");
    let election = kv.election(&name);
    if cx.caps().sessions.is_none() {
        err_kind(
            "campaign without sessions",
            election
                .campaign("x".into(), CampaignOptions::default())
                .await,
            ErrorKind::Unsupported,
        );
        return;
    }
    assert_eq!(ok("no leader yet", election.leader().await), None);
    let mut observed = election.observe();
    match tokio::time::timeout(EVENT_WAIT, observed.next()).await {
        Ok(Some(Ok(None))) => {}
        other => panic!("observe starts with the current (no) leader: {other:?}"),
    }
    let opts = CampaignOptions::default().with_ttl(TTL);
    let first = ok("first campaign", election.campaign("c0".into(), opts).await);
    // Four more queue up in order.
    let mut waiting = Vec::new();
    for i in 1..5 {
        let e = kv.election(&name);
        waiting.push(tokio::spawn(async move {
            e.campaign(Bytes::from(format!("c{i}")), opts).await
        }));
        // Queue order is creation order: give each its turn to enqueue.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut terms = vec![first.term()];
    let leader = ok("leader", election.leader().await).expect("a leader");
    assert_eq!(
        (leader.value.clone(), leader.term),
        (Bytes::from("c0"), first.term())
    );
    ok("proclaim", first.proclaim("c0'".into()).await);
    assert_eq!(
        ok("leader after proclaim", election.leader().await).map(|l| l.value),
        Some(Bytes::from("c0'"))
    );
    let mut current = first;
    for (i, task) in waiting.into_iter().enumerate() {
        assert!(
            !task.is_finished(),
            "candidate {} leads while c{} does",
            i + 1,
            i
        );
        let resigned = current.lost();
        let old = current;
        let stale = kv.election(&name);
        ok("resign", old.resign().await);
        tokio::time::timeout(EVENT_WAIT, resigned)
            .await
            .expect("lost() after resign");
        let next = tokio::time::timeout(EVENT_WAIT * 2, task)
            .await
            .expect("the next candidate leads after a resign")
            .expect("campaign task");
        let next = ok("campaign", next);
        let leader = ok("leader", stale.leader().await).expect("a leader");
        assert_eq!(leader.value, Bytes::from(format!("c{}", i + 1)), "FIFO");
        assert!(next.term() > *terms.last().unwrap_or(&0), "terms increase");
        terms.push(next.term());
        current = next;
    }
    // A resigned leader's proclaim fails (fenced).
    let last_term = current.term();
    let dropped = kv.election(&name);
    let resign_check = kv.election(&name);
    let waiter = tokio::spawn(async move {
        dropped
            .campaign("late".into(), CampaignOptions::default().with_ttl(TTL))
            .await
    });
    settle().await;
    let old = current;
    let lost = old.lost();
    drop(old); // dropping resigns
    tokio::time::timeout(EVENT_WAIT, lost)
        .await
        .expect("lost() after drop");
    let late = ok(
        "late campaign",
        tokio::time::timeout(EVENT_WAIT * 2, waiter)
            .await
            .expect("the late candidate leads after a drop")
            .expect("task"),
    );
    assert!(late.term() > last_term);
    terms.push(late.term());
    let leader = ok("leader", resign_check.leader().await).expect("leader");
    assert_eq!(leader.value, Bytes::from("late"));
    ok("resign late", late.resign().await);
    // observe: every leader in term order, ending with none.
    let mut seen: Vec<Option<Leader>> = Vec::new();
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    while seen.last().is_none_or(|l| l.is_some()) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, observed.next()).await {
            Ok(Some(Ok(l))) => seen.push(l),
            Ok(Some(Err(e))) if e.kind() == ErrorKind::Unavailable => {}
            other => panic!("observe: {other:?} after {seen:?}"),
        }
    }
    let seen_terms: Vec<u64> = seen.iter().flatten().map(|l| l.term).collect();
    assert!(
        seen_terms.windows(2).all(|w| w[0] <= w[1]),
        "observe in term order: {seen_terms:?}"
    );
    let mut distinct = seen_terms.clone();
    distinct.dedup();
    assert_eq!(distinct, terms, "observe saw every leader");
    assert!(
        seen.iter().flatten().any(|l| l.value == "c0'"),
        "observe saw the proclaimed value"
    );
}

/// A campaign that waits longer than 3 × TTL still leads with a live
/// session (the lease is renewed while it waits), and a proclaim after its
/// loss fails.
pub async fn long_campaign_keeps_its_lease(cx: Ctx) {
    let kv = cx.kv.clone();
    if cx.caps().sessions.is_none() {
        return; // refusal checked by election_five_candidates
    }
    // The shortest TTL this backend takes, so the wait stays bounded.
    let ttl = match cx.caps().sessions {
        Some(g) if g >= Duration::from_secs(10) => TTL,
        _ => Duration::from_secs(2),
    };
    let name = key("elect/long");
    let opts = CampaignOptions::default().with_ttl(ttl);
    let leader = ok(
        "leader",
        kv.election(&name).campaign("a".into(), opts).await,
    );
    let e = kv.election(&name);
    let waiter = tokio::spawn(async move { e.campaign("b".into(), opts).await });
    tokio::time::sleep(ttl * 3 + Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "b leads while a does");
    ok("resign a", leader.resign().await);
    let b = ok(
        "b",
        tokio::time::timeout(EVENT_WAIT, waiter)
            .await
            .expect("b leads after a resigns")
            .expect("task"),
    );
    assert!(!b.is_lost(), "b leads with a live session");
    ok("b proclaims", b.proclaim("b2".into()).await);
    tokio::time::sleep(ttl + Duration::from_millis(500)).await;
    assert!(!b.is_lost(), "b's session is renewed while it leads");
    assert_eq!(
        ok("leader", kv.election(&name).leader().await).map(|l| l.value),
        Some(Bytes::from("b2"))
    );
    // Leadership lost from outside (its key deleted): lost() fires and a
    // proclaim fails.
    ok(
        "delete b's key",
        kv.delete(b.key(), Condition::Always).await,
    );
    tokio::time::timeout(EVENT_WAIT, b.lost())
        .await
        .expect("lost() after the candidate key was deleted");
    err_kind(
        "proclaim after loss",
        b.proclaim("b3".into()).await,
        ErrorKind::LockLost,
    );
    // A campaign whose wait runs out leaves nothing behind.
    let holder = ok(
        "holder",
        kv.election(&name).campaign("h".into(), opts).await,
    );
    let short = CampaignOptions::default()
        .with_ttl(ttl)
        .with_wait(Duration::from_millis(500));
    err_kind(
        "campaign past its wait",
        kv.election(&name).campaign("w".into(), short).await,
        ErrorKind::Timeout,
    );
    eventually("the timed-out candidate left nothing", EVENT_WAIT, || {
        let kv = kv.clone();
        async move { matches!(kv.list(&prefix("elect/long")).await, Ok(l) if l.len() == 1) }
    })
    .await;
    ok("resign holder", holder.resign().await);
}

/// Closing a handle ends the sessions started through it: a closed handle
/// holds nothing.
pub async fn closed_handle_ends_its_sessions(cx: Ctx) {
    let handle = cx.other_handle();
    let Some(s) = session_or_unsupported(&cx, &handle).await else {
        return;
    };
    let k = key("ephc/k");
    ok(
        "ephemeral put",
        s.put(&k, "v".into(), Condition::Always).await,
    );
    ok("close the handle", handle.close().await);
    tokio::time::timeout(EVENT_WAIT, s.lost())
        .await
        .expect("the session's lost() fires when its handle closes");
    assert_eq!(ok("get", cx.kv.get(&k).await), None, "its key is gone");
}

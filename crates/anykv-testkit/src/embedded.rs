//! Watch, snapshot and compact checks for drivers built on
//! `anykv_core::embedded` (memory, redb), beyond the conformance suite:
//! they look inside the driver (how many watches its hub holds). Each takes
//! the bare driver and a way to count its registered watches.

// A failed unwrap here is a failed check, reported with its location.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anykv_core::{
    Bytes, Condition, ErrorKind, Event, Op, Prefix, PutOptions, Revision, Start, Store, Target,
    WatchStream,
};
use futures::{FutureExt, StreamExt};

/// How many watches a store has registered.
pub type Count = Arc<dyn Fn() -> usize + Send + Sync>;

pub use crate::support::{key, prefix};

async fn next(w: &mut WatchStream) -> Event {
    crate::support::next_event("watch", w).await
}

async fn put(s: &Arc<dyn Store>, k: &str, v: impl Into<Bytes>) -> Revision {
    s.put(&key(k), v.into(), PutOptions::default())
        .await
        .unwrap()
        .get()
}

/// (value, mod_revision) per key.
type Model = BTreeMap<String, (Bytes, Revision)>;

fn apply(model: &mut Model, ev: &Event) {
    match ev {
        Event::Put { kv, .. } => {
            model.insert(kv.key.to_string(), (kv.value.clone(), kv.mod_revision));
        }
        Event::Delete { key, .. } => {
            model.remove(key.as_str());
        }
    }
}

/// Snapshots of two prefixes taken under concurrent writers: each one plus
/// the events a watch from its revision replays gives exactly the final
/// state, every pair is at or below the revision and every replayed event
/// above it.
pub async fn snapshot_is_the_state_at_its_revision(store: Arc<dyn Store>) {
    const WRITERS: usize = 4;
    const OPS: usize = 150;
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..OPS {
                let n = i % 10;
                if i % 3 == 0 {
                    // Memory writes never wait: spread them out over time.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                put(&s, &format!("sa/{t}/{n}"), format!("{t}.{i}")).await;
                put(&s, &format!("sb/{t}/{n}"), format!("{t}.{i}")).await;
                put(&s, &format!("sc/{t}/{n}"), "outside").await;
                if i % 3 == 0 {
                    s.delete(&key(&format!("sa/{t}/{}", (n + 3) % 10)), Condition::Always)
                        .await
                        .unwrap();
                }
                if i % 5 == 0 {
                    s.atomic(
                        Vec::new(),
                        vec![
                            Op::Put(key(&format!("sa/{t}/x")), format!("{i}").into()),
                            Op::Delete(key(&format!("sb/{t}/{}", (n + 1) % 10))),
                        ],
                    )
                    .await
                    .unwrap();
                }
            }
        }));
    }
    let wanted = [prefix("sa"), prefix("sb")];
    let mut taken = Vec::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let snap = store.snapshot(&wanted).await.unwrap();
        let replay = store
            .watch(Target::Prefix(Prefix::root()), Start::After(snap.revision))
            .await
            .unwrap();
        taken.push((snap, replay));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let end = put(&store, "end", "x").await;
    let mut fin = Model::new();
    for p in &wanted {
        for kv in store.list(p).await.unwrap() {
            fin.insert(kv.key.to_string(), (kv.value, kv.mod_revision));
        }
    }
    let mut revisions = Vec::new();
    for (snap, mut replay) in taken {
        revisions.push(snap.revision);
        let mut model = Model::new();
        for kv in &snap.pairs {
            assert!(
                kv.mod_revision <= snap.revision,
                "{kv:?} is newer than the snapshot's revision {}",
                snap.revision
            );
            assert!(
                wanted.iter().any(|p| p.contains(kv.key.as_str())),
                "{kv:?} is outside the prefixes"
            );
            let dup = model.insert(kv.key.to_string(), (kv.value.clone(), kv.mod_revision));
            assert!(dup.is_none(), "{kv:?} twice");
        }
        loop {
            let ev = next(&mut replay).await;
            assert!(ev.revision() > snap.revision, "{ev:?} replayed");
            if ev.revision() >= end {
                break;
            }
            if wanted.iter().any(|p| p.contains(ev.key().as_str())) {
                apply(&mut model, &ev);
            }
        }
        assert_eq!(
            model, fin,
            "snapshot at {} plus the later events is the final state",
            snap.revision
        );
    }
    assert!(
        revisions.windows(2).any(|w| w[0] < w[1]),
        "the snapshots were taken while the writers ran: {revisions:?}"
    );
}

/// `compact` drops history: a watch from below fails with `Compacted`, one
/// from the compacted revision replays the rest; compacting lower again is
/// a no-op and beyond the current revision is `InvalidArgument`. Returns
/// the compacted revision.
pub async fn compact_then_watch_from_below(store: Arc<dyn Store>) -> Revision {
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(put(&store, "cp/k", format!("{i}")).await);
    }
    let at = revs[5];
    store.compact(at).await.unwrap();
    let err = store
        .watch(Target::Key(key("cp/k")), Start::After(at - 1))
        .await
        .err()
        .expect("a watch from below the compacted revision fails");
    assert_eq!(err.kind(), ErrorKind::Compacted, "{err}");
    let mut w = store
        .watch(Target::Key(key("cp/k")), Start::After(at))
        .await
        .unwrap();
    for want in &revs[6..] {
        assert_eq!(next(&mut w).await.revision(), *want);
    }
    store.compact(revs[2]).await.unwrap();
    store.compact(at).await.unwrap();
    let current = revs[9];
    let err = store
        .compact(current + 1)
        .await
        .expect_err("beyond the current revision");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    // Compacting at the current revision: only later events remain.
    store.compact(current).await.unwrap();
    let err = store
        .watch(Target::Key(key("cp/k")), Start::After(current - 1))
        .await
        .err()
        .expect("compacted");
    assert_eq!(err.kind(), ErrorKind::Compacted, "{err}");
    let mut w = store
        .watch(Target::Key(key("cp/k")), Start::After(current))
        .await
        .unwrap();
    let later = put(&store, "cp/k", "later").await;
    assert_eq!(next(&mut w).await.revision(), later);
    current
}

/// A watch detached as a slow consumer whose history was compacted away
/// meanwhile ends with `Compacted` when it reads again.
pub async fn detached_watch_past_compaction_is_compacted(store: Arc<dyn Store>) {
    let mut slow = store
        .watch(Target::Prefix(prefix("dc")), Start::Now)
        .await
        .unwrap();
    let mut last = 0;
    for i in 0..400 {
        last = put(&store, &format!("dc/{}", i % 7), "v").await;
    }
    store.compact(last).await.unwrap();
    let mut got = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("in time")
            .expect("an error before the end")
        {
            Ok(_) => got += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::Compacted, "{err}");
    assert!(got < 400, "the overflowing part was not buffered: {got}");
    let end = tokio::time::timeout(Duration::from_secs(10), slow.next())
        .await
        .expect("in time");
    assert!(end.is_none(), "ends after the error");
}

/// `n` watches (half on keys, half on prefixes) each get exactly the events
/// of their target, in order, and nothing else.
pub async fn many_watches_each_get_exactly_their_events(store: Arc<dyn Store>, n: usize) {
    let half = n / 2;
    let mut watches = Vec::new();
    for i in 0..half {
        watches.push((
            format!("mk/{i}"),
            store
                .watch(Target::Key(key(&format!("mk/{i}"))), Start::Now)
                .await
                .unwrap(),
        ));
        watches.push((
            format!("mp/{i}/"),
            store
                .watch(Target::Prefix(prefix(&format!("mp/{i}"))), Start::Now)
                .await
                .unwrap(),
        ));
    }
    // What each watch must see: (key, revision) in order.
    let mut expect: HashMap<String, Vec<(String, Revision)>> = HashMap::new();
    let mut record = |k: &str, rev: Revision| {
        for w in [
            k.to_owned(),
            format!("mp/{}/", k.split('/').nth(1).unwrap_or("")),
        ] {
            let hit = if w.ends_with('/') {
                k.starts_with(&w)
            } else {
                w == k
            };
            if hit {
                expect.entry(w).or_default().push((k.to_owned(), rev));
            }
        }
    };
    for i in 0..half {
        for k in [
            format!("mk/{i}"),
            format!("mk/{i}/below"), // not the key watch's
            format!("mp/{i}/a"),
            format!("mp/{i}/a/b"),
            format!("mp/{i}x"), // a sibling name, not below the prefix
            format!("mp/{i}"),  // the prefix itself, not below it
        ] {
            let rev = put(&store, &k, format!("{i}")).await;
            record(&k, rev);
        }
        if i % 4 == 0 {
            let rev = store
                .atomic(
                    Vec::new(),
                    vec![
                        Op::Delete(key(&format!("mk/{i}"))),
                        Op::Put(key(&format!("mp/{i}/z")), "z".into()),
                        Op::Put(key(&format!("mp/{}/z", (i + 1) % half)), "z".into()),
                    ],
                )
                .await
                .unwrap();
            record(&format!("mk/{i}"), rev);
            record(&format!("mp/{i}/z"), rev);
            record(&format!("mp/{}/z", (i + 1) % half), rev);
        }
    }
    for (name, mut w) in watches {
        let want = expect.remove(&name).unwrap_or_default();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let ev = next(&mut w).await;
            got.push((ev.key().to_string(), ev.revision()));
        }
        // Events are routed when committed: anything extra is already queued.
        let extra = w.next().now_or_never();
        assert!(extra.is_none(), "{name}: unexpected {extra:?}");
        let mut sorted = got.clone();
        sorted.sort_by_key(|(_, r)| *r);
        assert_eq!(got, sorted, "{name}: in revision order");
        let (mut a, mut b) = (got, want);
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: exactly its events");
    }
}

/// A watch that is never read holds up neither the writes nor another
/// watch; read afterwards, it resumes from the log with every event.
pub async fn slow_watch_delays_nobody(store: Arc<dyn Store>, count: Count) {
    const PUTS: usize = 1600; // a multiple of the 8 writers
    let base = count();
    let mut slow = store
        .watch(Target::Prefix(prefix("sl")), Start::Now)
        .await
        .unwrap();
    let mut fast = store
        .watch(Target::Prefix(prefix("sl")), Start::Now)
        .await
        .unwrap();
    let t0 = Instant::now();
    let reader = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut last = 0;
        for _ in 0..PUTS {
            let ev = next(&mut fast).await;
            let Event::Put { kv, .. } = &ev else {
                panic!("{ev:?}")
            };
            let sent: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
            let delay = t0.elapsed().saturating_sub(Duration::from_micros(sent));
            worst = worst.max(delay);
            assert!(ev.revision() > last, "in order");
            last = ev.revision();
        }
        worst
    });
    let mut slowest_put = Duration::ZERO;
    let mut first = 0;
    // Eight writers: the redb writer group-commits them.
    let mut writers = Vec::new();
    for t in 0..8 {
        let s = store.clone();
        writers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut revs = Vec::new();
            for i in 0..PUTS / 8 {
                let began = Instant::now();
                let sent = t0.elapsed().as_micros().to_string();
                revs.push(put(&s, &format!("sl/{t}/{i}"), sent).await);
                slowest = slowest.max(began.elapsed());
            }
            (slowest, revs)
        }));
    }
    let mut revs = Vec::new();
    for w in writers {
        let (s, r) = w.await.unwrap();
        slowest_put = slowest_put.max(s);
        revs.extend(r);
    }
    revs.sort_unstable();
    if let Some(r) = revs.first() {
        first = *r;
    }
    let worst = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the fast watch keeps up")
        .unwrap();
    println!(
        "slow-watch check: {PUTS} puts in {:?}, slowest put {slowest_put:?}, fast watch worst delay {worst:?}",
        t0.elapsed()
    );
    assert!(slowest_put < Duration::from_secs(3), "{slowest_put:?}");
    assert!(worst < Duration::from_secs(3), "{worst:?}");
    assert_eq!(count(), base + 1, "the fast watch's stream is dropped");
    // The unread watch overflowed its buffer long ago: it now resumes from
    // the log, every event once and in order.
    let mut got = Vec::new();
    while got.len() < PUTS {
        got.push(next(&mut slow).await.revision());
    }
    assert_eq!(got, revs, "the slow watch got every event once, in order");
    assert_eq!(got[0], first);
    let after = put(&store, "sl/after", "0").await;
    assert_eq!(next(&mut slow).await.revision(), after, "and is live again");
    drop(slow);
    assert_eq!(count(), base);
}

/// Dropping a watch's stream removes it from the index at once.
pub async fn dropping_a_watch_removes_it(store: Arc<dyn Store>, count: Count) {
    let base = count();
    let a = store
        .watch(Target::Key(key("dw/a")), Start::Now)
        .await
        .unwrap();
    let b = store
        .watch(Target::Prefix(prefix("dw")), Start::After(0))
        .await
        .unwrap();
    let c = store
        .watch(Target::Prefix(Prefix::root()), Start::Now)
        .await
        .unwrap();
    assert_eq!(count(), base + 3);
    drop(a);
    assert_eq!(count(), base + 2);
    drop(b);
    drop(c);
    assert_eq!(count(), base);
    put(&store, "dw/a", "after").await;
    assert_eq!(count(), base);
}

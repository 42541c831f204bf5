//! `snapshot`: several prefixes as of one instant, by a verified double read.
//!
//! ZooKeeper has no read at a chosen zxid, and its multi-read is not
//! documented as atomic, so each attempt reads every known znode of the
//! prefixes twice **in the same pipelined sequence of multi-reads** (one
//! request while the ranges are small, at most 128 znodes): first data,
//! stat and children of each, then the stat of each again. A session's
//! requests are served in order, so every first read ends before any second
//! read begins. The attempt is accepted when each znode has the same
//! `czxid`, `mzxid` (no write in between) and `pzxid` (no child created or
//! deleted in between) both times, and every child listed is a znode the
//! attempt read: each value then stayed current from its first read to its
//! second, so all of them were current together at the instant between the
//! halves, and no key is missing. A prefix whose base znode is missing is
//! checked through the `pzxid` of its ancestors (all read too).
//!
//! An attempt that finds children it did not read yet reads again with
//! them (one attempt per depth level the first time); one that finds a
//! change tries again at once, then backing off. The revision is the
//! largest `mzxid`/`pzxid` seen: at or below the instant's zxid and at or
//! above every change to the ranges before it, so
//! `watch(Start::After(revision))` reports exactly the later changes.

use std::{collections::BTreeSet, time::Duration};

use anykv_core::{Error, Prefix, Result, Snapshot};
use futures::future::join_all;
use zookeeper_client::{self as zk, MultiReadResult, Stat};

use crate::{
    Inner,
    codec::{self, Node},
    error::BACKEND,
    tree,
};

/// Attempts that found a change before giving up (writes that never pause).
const CHANGED_ATTEMPTS: u32 = 30;

/// Attempts in all (growing the known tree included).
const ATTEMPTS: u32 = 200;

/// Znodes read in one request (each read three times); more go in several
/// pipelined requests.
const ONE_REQUEST: usize = 128;

/// The stat fields the second read must find unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Seen {
    czxid: i64,
    mzxid: i64,
    pzxid: i64,
}

impl From<&Stat> for Seen {
    fn from(s: &Stat) -> Seen {
        Seen {
            czxid: s.czxid,
            mzxid: s.mzxid,
            pzxid: s.pzxid,
        }
    }
}

/// One znode's first read.
enum First {
    Missing,
    Found {
        data: Vec<u8>,
        stat: Stat,
        children: Vec<String>,
    },
}

/// What an attempt found.
enum Outcome {
    /// Consistent and complete.
    Done(Snapshot),
    /// Consistent, but with children not read yet: read again with these.
    Grow(BTreeSet<String>),
    /// Something changed between the two reads.
    Changed(BTreeSet<String>),
}

/// Reads `prefixes` (disjoint, as the layer hands them) as of one instant.
pub(crate) async fn snapshot(inner: &Inner, prefixes: &[Prefix]) -> Result<Snapshot> {
    let shown = prefixes
        .iter()
        .map(Prefix::as_str)
        .collect::<Vec<_>>()
        .join(",");
    let bases: Vec<String> = prefixes
        .iter()
        .map(|p| codec::prefix_path(p.as_str()))
        .collect();
    // The ancestors of every base: a missing base stays missing while their
    // `pzxid`s stay the same.
    let mut anchors: BTreeSet<String> = BTreeSet::new();
    for b in &bases {
        if b != "/" {
            anchors.insert("/".to_owned());
            anchors.extend(codec::ancestors(b).into_iter().map(str::to_owned));
        }
    }
    for b in &bases {
        anchors.remove(b);
    }
    let s = inner.session().await?;
    let client = &s.client;
    let fail = |e| inner.fail(&s, e, "snapshot", &shown);
    if let Some(first) = bases.first() {
        inner.sync_for_read(&s, first).await.map_err(fail)?;
    }
    let mut known: BTreeSet<String> = bases.iter().cloned().collect();
    let mut changed = 0;
    let mut delay = Duration::from_millis(1);
    for _ in 0..ATTEMPTS {
        match attempt(client, &bases, &known, &anchors)
            .await
            .map_err(fail)?
        {
            Outcome::Done(snap) => return Ok(snap),
            Outcome::Grow(more) => known = more,
            Outcome::Changed(more) => {
                known = more;
                changed += 1;
                if changed >= CHANGED_ATTEMPTS {
                    break;
                }
                if changed > 3 {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
            }
        }
    }
    Err(Error::Unavailable {
        backend: BACKEND,
        message: format!(
            "snapshot {shown}: the prefixes changed during each of {changed} verified reads \
             (ZooKeeper has no multi-key snapshot; retry when writes pause)"
        ),
        source: None,
    })
}

/// One attempt over the `known` znodes of the ranges (see the module docs).
async fn attempt(
    client: &zk::Client,
    bases: &[String],
    known: &BTreeSet<String>,
    anchors: &BTreeSet<String>,
) -> Result<Outcome, zk::Error> {
    let nodes: Vec<&String> = known.iter().collect();
    let anchors: Vec<&String> = anchors.iter().collect();
    let total = nodes.len() + anchors.len();
    // Requests in order: first reads (nodes with children, then anchors),
    // then second reads of all. Committed in this order, so sent and
    // served in it.
    let mut requests = Vec::new();
    let per = if total <= ONE_REQUEST {
        total.max(1)
    } else {
        tree::READ_CHUNK
    };
    let mut first_ops = Vec::new();
    for p in &nodes {
        first_ops.push((p.as_str(), true));
    }
    for a in &anchors {
        first_ops.push((a.as_str(), false));
    }
    let all: Vec<&str> = first_ops.iter().map(|(p, _)| *p).collect();
    if total <= ONE_REQUEST {
        let mut r = client.new_multi_reader();
        for (p, children) in &first_ops {
            r.add_get_data(p)?;
            if *children {
                r.add_get_children(p)?;
            }
        }
        for p in &all {
            r.add_get_data(p)?;
        }
        requests.push(r.commit());
    } else {
        for chunk in first_ops.chunks(per) {
            let mut r = client.new_multi_reader();
            for (p, children) in chunk {
                r.add_get_data(p)?;
                if *children {
                    r.add_get_children(p)?;
                }
            }
            requests.push(r.commit());
        }
        for chunk in all.chunks(per) {
            let mut r = client.new_multi_reader();
            for p in chunk {
                r.add_get_data(p)?;
            }
            requests.push(r.commit());
        }
    }
    let mut results = Vec::with_capacity(3 * total);
    for r in join_all(requests).await {
        results.extend(r?);
    }
    let mut results = results.into_iter();
    let mut firsts: Vec<(&str, bool, First)> = Vec::with_capacity(total);
    for (p, children) in &first_ops {
        let data = results.next();
        let kids = if *children { results.next() } else { None };
        let first = match (data, kids) {
            (
                Some(MultiReadResult::Data { data, stat }),
                Some(MultiReadResult::Children { children }),
            ) => First::Found {
                data,
                stat,
                children,
            },
            (Some(MultiReadResult::Data { data, stat }), None) if !*children => First::Found {
                data,
                stat,
                children: Vec::new(),
            },
            (Some(MultiReadResult::Error { err }), _)
            | (_, Some(MultiReadResult::Error { err }))
                if err != zk::Error::NoNode =>
            {
                return Err(err);
            }
            _ => First::Missing,
        };
        firsts.push((p, *children, first));
    }
    let mut same = true;
    for (_, _, first) in &firsts {
        let again = match results.next() {
            Some(MultiReadResult::Data { stat, .. }) => Some(Seen::from(&stat)),
            Some(MultiReadResult::Error { err }) if err != zk::Error::NoNode => return Err(err),
            _ => None,
        };
        let before = match first {
            First::Found { stat, .. } => Some(Seen::from(stat)),
            First::Missing => None,
        };
        same &= before == again;
    }
    // The znodes of the ranges as the first reads show them.
    let mut next: BTreeSet<String> = bases.iter().cloned().collect();
    for (p, in_range, first) in &firsts {
        if let (true, First::Found { children, .. }) = (in_range, first) {
            for c in children {
                let child = codec::child_path(p, c);
                if !codec::is_system(&child) {
                    next.insert(child);
                }
            }
        }
    }
    if !same {
        return Ok(Outcome::Changed(next));
    }
    if !next.is_subset(known) {
        return Ok(Outcome::Grow(next));
    }
    let now = codec::now_millis();
    let mut revision = 0;
    let mut pairs = Vec::new();
    let base_set: BTreeSet<&str> = bases.iter().map(String::as_str).collect();
    for (p, _, first) in firsts {
        let First::Found { data, stat, .. } = first else {
            continue;
        };
        revision = revision.max(stat.mzxid.max(stat.pzxid).max(0) as u64);
        if !next.contains(p) || base_set.contains(p) {
            continue; // an anchor, a base, or no longer listed
        }
        if let (Some(key), Node::Key(value)) = (codec::key_of(p), codec::classify(data, &stat, now))
        {
            pairs.push(codec::pair(key, value, &stat));
        }
    }
    Ok(Outcome::Done(Snapshot { revision, pairs }))
}

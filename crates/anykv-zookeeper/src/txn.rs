//! `atomic()`: one ZooKeeper multi with check ops.
//!
//! The checked and written znodes are read first; the checks are evaluated
//! on what was read (a failed one is `Conflict` at once), then one multi
//! commits the writes guarded by the znode versions read: `check` ops for
//! checked znodes, expected versions on `setData`/`delete`, and `create`
//! (which fails if the znode appeared) for missing ones. A key that must be
//! absent and has no znode is guarded by creating and deleting that znode
//! inside the multi. If anything changed between the read and the commit,
//! the multi fails as a whole and the whole call is evaluated again.

use std::collections::{BTreeMap, BTreeSet};

use anykv_core::{Check, Op, Result, Revision, store::condition};
use zookeeper_client::{self as zk, MultiWriteResult, Stat};

use crate::{
    Inner,
    codec::{self, DIR},
    error::BACKEND,
    tree::{self, RACE_ATTEMPTS},
    write::contention,
};

/// What the read found at one path.
struct Read {
    stat: Stat,
    /// The value if the znode is a key.
    value: Option<anykv_core::Bytes>,
    /// Written with a TTL (write-protected, replaced on write).
    ttl: bool,
}

/// A marker znode whose data a multi without any other `setData` rewrites
/// (with the same marker), to learn the commit's zxid from its stat.
const TXN_CLOCK: &str = "/__anykv/txn";

/// Largest multi request sent: ZooKeeper's `jute.maxbuffer` default is
/// 1 MiB, and a larger request makes the server drop the connection.
const MAX_REQUEST: usize = 1_000_000;

pub(crate) async fn atomic(inner: &Inner, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
    // Per op: path, header and version; per put: the value (escaped).
    let size: usize = checks
        .iter()
        .map(|c| c.key().as_str().len() + 32)
        .chain(ops.iter().map(|o| {
            o.key().as_str().len()
                + 64
                + match o {
                    Op::Put(_, v) => v.len() + codec::MAGIC.len() + 1,
                    Op::Delete(_) => 0,
                }
        }))
        .sum();
    if size > MAX_REQUEST {
        return Err(anykv_core::Error::InvalidArgument {
            backend: BACKEND,
            message: format!(
                "atomic of about {size} bytes is over ZooKeeper's request limit of {MAX_REQUEST} (jute.maxbuffer)"
            ),
        });
    }
    let session = inner.session().await?;
    let client = &session.client;
    let fail = |e: zk::Error| inner.fail(&session, e, "atomic", "");
    let paths: Vec<String> = checks
        .iter()
        .map(|c| c.key())
        .chain(ops.iter().map(|o| o.key()))
        .map(|k| codec::path_of(k.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for _ in 0..RACE_ATTEMPTS {
        let read = tree::read_many(client, &paths).await.map_err(fail)?;
        let now = codec::now_millis();
        let state: BTreeMap<&str, Read> = paths
            .iter()
            .zip(read)
            .filter_map(|(p, r)| {
                let (data, stat) = r?;
                let ttl = codec::ttl_of(&data).is_some();
                let value = match codec::classify(data, &stat, now) {
                    codec::Node::Key(v) => Some(v),
                    codec::Node::NotKey => None,
                };
                Some((p.as_str(), Read { stat, value, ttl }))
            })
            .collect();
        let lookup = |k: &anykv_core::Key| state.get(codec::path_of(k.as_str()).as_str());
        for c in &checks {
            let current = lookup(c.key()).and_then(|r| {
                r.value
                    .as_ref()
                    .map(|v| (v, crate::write::version(&r.stat)))
            });
            if !c.holds(current) {
                return Err(condition::failed_check(BACKEND, c));
            }
        }

        let written: BTreeSet<String> = ops
            .iter()
            .filter(|o| matches!(o, Op::Put(..)))
            .map(|o| codec::path_of(o.key().as_str()))
            .collect();
        let mut writer = client.new_multi_writer();
        let mut scratch_parents = Vec::new();
        for c in &checks {
            let path = codec::path_of(c.key().as_str());
            match lookup(c.key()) {
                Some(r) => writer
                    .add_check_version(&path, r.stat.version)
                    .map_err(fail)?,
                // Absent with no znode: guard it unless a put creates it anyway.
                None if !written.contains(&path) => {
                    scratch_parents.push(path.clone());
                    writer
                        .add_create(&path, DIR, &inner.dir_options())
                        .map_err(fail)?;
                    writer.add_delete(&path, None).map_err(fail)?;
                }
                None => {}
            }
        }
        let mut has_stat = false;
        let mut deleted = Vec::new();
        for op in &ops {
            let path = codec::path_of(op.key().as_str());
            let current = lookup(op.key());
            match op {
                Op::Put(_, value) => {
                    let data = codec::encode(value, None);
                    match current {
                        None => {
                            scratch_parents.push(path.clone());
                            writer
                                .add_create(&path, &data, &inner.node_options())
                                .map_err(fail)?;
                        }
                        Some(r) if r.ttl => {
                            // No TTL inside transactions: the key becomes permanent.
                            writer
                                .add_delete(&path, Some(r.stat.version))
                                .map_err(fail)?;
                            writer
                                .add_create(&path, &data, &inner.node_options())
                                .map_err(fail)?;
                        }
                        Some(r) => {
                            has_stat = true;
                            writer
                                .add_set_data(&path, &data, Some(r.stat.version))
                                .map_err(fail)?;
                        }
                    }
                }
                Op::Delete(_) => match current {
                    Some(r) if r.value.is_some() && r.stat.num_children > 0 => {
                        has_stat = true;
                        writer
                            .add_set_data(&path, DIR, Some(r.stat.version))
                            .map_err(fail)?;
                    }
                    Some(r) if r.value.is_some() => {
                        writer
                            .add_delete(&path, Some(r.stat.version))
                            .map_err(fail)?;
                        deleted.push(path);
                    }
                    // Absent keys are fine.
                    _ => {}
                },
            }
        }
        // A multi without setData reports no zxid (ZooKeeper 3.8 leaves the
        // stats of creates inside a multi empty): rewrite the clock marker.
        if !has_stat {
            match tree::create(
                client,
                TXN_CLOCK,
                DIR,
                &inner.dir_options(),
                &inner.dir_options(),
            )
            .await
            {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(fail(e)),
            }
            writer.add_set_data(TXN_CLOCK, DIR, None).map_err(fail)?;
        }
        // Creates inside a multi need their parents (markers, made outside).
        for p in &scratch_parents {
            tree::ensure_parents(client, p, &inner.dir_options())
                .await
                .map_err(fail)?;
        }
        match writer.commit().await {
            Ok(results) => {
                for p in &deleted {
                    tree::prune(client, p).await;
                }
                return revision(client, &results, &ops).await.map_err(fail);
            }
            Err(zk::MultiWriteError::OperationFailed { source, index }) => match source {
                zk::Error::BadVersion
                | zk::Error::NoNode
                | zk::Error::NodeExists
                | zk::Error::NotEmpty => {
                    tracing::trace!(index, error = %source, "zookeeper: atomic raced, evaluating again");
                    continue;
                }
                e => return Err(fail(e)),
            },
            Err(zk::MultiWriteError::RequestFailed { source }) => return Err(fail(source)),
        }
    }
    Err(match checks.first() {
        Some(c) => condition::failed_check(BACKEND, c),
        None => contention(ops.first().map(|o| o.key().as_str()).unwrap_or("")),
    })
}

/// The zxid of a committed multi: every op of a multi shares it.
async fn revision(
    client: &zk::Client,
    results: &[MultiWriteResult],
    ops: &[Op],
) -> Result<Revision, zk::Error> {
    let from_stats = results
        .iter()
        .filter_map(|r| match r {
            MultiWriteResult::SetData { stat } | MultiWriteResult::Create { stat, .. } => {
                (stat.mzxid > 0).then_some(stat.mzxid as u64)
            }
            _ => None,
        })
        .max();
    if let Some(rev) = from_stats {
        return Ok(rev);
    }
    // Some servers leave create stats inside a multi empty (ZOOKEEPER-4026):
    // read a put key back.
    for op in ops {
        if let Op::Put(k, _) = op
            && let Some(stat) = client.check_stat(&codec::path_of(k.as_str())).await?
        {
            return Ok(stat.mzxid as u64);
        }
    }
    Err(zk::Error::UnexpectedError(
        "multi committed but reported no zxid".to_owned(),
    ))
}

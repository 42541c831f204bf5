//! `snapshot()`: several prefixes read at one Consul index.
//!
//! Consul's `/v1/txn` evaluates a *read-only* transaction against one state
//! (one memdb read transaction, so its `get-tree` results are consistent
//! with each other, and `?consistent`/`?stale` apply), but it returns no
//! index: no `X-Consul-Index` header and no `Index` in the body (verified on
//! 1.8.7). The index of the read cannot be recovered afterwards: the highest
//! `ModifyIndex` among the pairs misses deletes, and the KV index read
//! before or after may have moved in between.
//!
//! So the snapshot is a *write* transaction: `set` of a marker key
//! (`__anykv/snapshots/<first segment>`, with a fresh write nonce, so that
//! Consul never skips it as identical) followed by one `get-tree` per
//! prefix. Consul applies the whole transaction at one Raft index `W`, the
//! marker's new `ModifyIndex`, and evaluates the `get-tree`s in the same
//! state: the pairs are exactly the state at `W`, and every later change
//! gets an index above `W`, so `watch(.., Start::After(W))` reports it.
//! Hence [`SnapshotMode::Atomic`](anykv_core::SnapshotMode::Atomic).
//!
//! Costs of that choice: each snapshot is one Raft write (a round trip to
//! the leader and a quorum, whatever `consistency=` says; no snapshot
//! without a leader), the token needs write access to the marker key
//! (under the reserved root, like lock records), and the write bumps the KV
//! index. At most [`MAX_PREFIXES`] prefixes (Consul's 64 operations per
//! transaction, one taken by the marker); more is `InvalidArgument` rather
//! than several transactions, which would not be at one index.

use anykv_core::{Error, KvPair, Prefix, RESERVED_ROOT, Result, Snapshot};

use crate::{
    Inner, MAX_ATOMIC_OPS,
    error::BACKEND,
    http::{TxnOp, TxnOutcome},
    kv::entry,
};

use crate::MAX_SNAPSHOT_PREFIXES as MAX_PREFIXES;

/// The marker key a snapshot of `prefixes` writes: one per top-level name
/// (usually the namespace), so that a token confined to one namespace's
/// reserved keys can take snapshots, and the markers stay few.
fn marker(prefixes: &[Prefix]) -> String {
    let first = prefixes
        .first()
        .map(|p| p.as_str().split('/').next().unwrap_or(""))
        .unwrap_or("");
    if first.is_empty() {
        format!("{RESERVED_ROOT}/snapshots")
    } else {
        format!("{RESERVED_ROOT}/snapshots/{first}")
    }
}

impl Inner {
    pub(crate) async fn snapshot(&self, prefixes: &[Prefix]) -> Result<Snapshot> {
        if prefixes.len() > MAX_PREFIXES {
            return Err(Error::InvalidArgument {
                backend: BACKEND,
                message: format!(
                    "snapshot of {} prefixes: Consul reads at most {MAX_PREFIXES} in one \
                     transaction (its limit of {MAX_ATOMIC_OPS} operations, one for the index \
                     marker); read fewer, or a common parent prefix",
                    prefixes.len()
                ),
            });
        }
        let marker = marker(prefixes);
        let mut ops = Vec::with_capacity(prefixes.len() + 1);
        ops.push(TxnOp::new("set", &marker).value(b""));
        ops.extend(prefixes.iter().map(|p| TxnOp::new("get-tree", &p.dir())));
        let results = match self.http.txn(&ops).await? {
            TxnOutcome::Committed(r) => r.results.unwrap_or_default(),
            TxnOutcome::RolledBack(errs) => {
                return Err(Error::Backend {
                    backend: BACKEND,
                    message: format!(
                        "snapshot: {}",
                        errs.first().map_or("rolled back", |e| e.what.as_str())
                    ),
                    source: None,
                });
            }
        };
        let mut kvs = results.into_iter().filter_map(|r| r.kv);
        // Results come in operation order: the marker's entry first.
        let revision = match kvs.next() {
            Some(kv) if kv.key == marker => kv.modify_index,
            _ => {
                return Err(Error::Backend {
                    backend: BACKEND,
                    message: "snapshot: consul committed the transaction but did not return \
                              the marker's index"
                        .into(),
                    source: None,
                });
            }
        };
        let mut pairs: Vec<KvPair> = Vec::new();
        for kv in kvs {
            if let Some(e) = entry(kv)?
                && e.pair.key.as_str() != marker
                && prefixes.iter().any(|p| p.contains(e.pair.key.as_str()))
            {
                pairs.push(e.pair);
            }
        }
        Ok(Snapshot { revision, pairs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_marker_per_top_level_name() {
        let p = |s: &str| Prefix::new(s).unwrap();
        assert_eq!(marker(&[p("app/a"), p("b")]), "__anykv/snapshots/app");
        assert_eq!(marker(&[Prefix::root()]), "__anykv/snapshots");
        assert_eq!(MAX_PREFIXES, 63);
    }
}

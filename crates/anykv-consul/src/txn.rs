//! `atomic()` as one `/v1/txn`.
//!
//! | anykv                | Consul verb                                              |
//! |----------------------|----------------------------------------------------------|
//! | `Check::Exists`      | `get` (fails on an absent key)                           |
//! | `Check::Absent`      | `check-not-exists`                                       |
//! | `Check::Version(v)`  | `check-index` with `v`                                   |
//! | `Check::Value(b)`    | consistent read; if it holds, `check-index` on its index |
//! | `Op::Put`            | `set`                                                    |
//! | `Op::Delete`         | `delete`                                                 |
//!
//! A value check pins the index it read; if that index moved before the
//! commit, the transaction is re-evaluated (a few times) rather than
//! reported as a conflict, since the value may still be the same.

use anykv_core::{Check, Error, Op, Result, Revision, store::condition};

use crate::{
    Inner,
    error::BACKEND,
    http::{TxnOp, TxnOutcome},
    kv::ReadMode,
};

/// Where a transaction operation came from, to name a failed check.
#[derive(Clone, Copy, Debug)]
enum Origin {
    Check(usize),
    /// A `check-index` standing in for a value check.
    ValueCheck(usize),
    Write,
}

/// Re-evaluations of value checks whose key moved under the transaction.
const ATTEMPTS: usize = 5;

impl Inner {
    pub(crate) async fn atomic(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
        let mut last_failure = None;
        for _ in 0..ATTEMPTS {
            let mut txn = Vec::with_capacity(checks.len() + ops.len());
            let mut origin = Vec::with_capacity(checks.len() + ops.len());
            for (i, check) in checks.iter().enumerate() {
                let k = check.key().as_str();
                match check {
                    Check::Exists(_) => {
                        txn.push(TxnOp::new("get", k));
                        origin.push(Origin::Check(i));
                    }
                    Check::Absent(_) => {
                        txn.push(TxnOp::new("check-not-exists", k));
                        origin.push(Origin::Check(i));
                    }
                    Check::Version(_, v) => {
                        txn.push(TxnOp::new("check-index", k).index(v.get()));
                        origin.push(Origin::Check(i));
                    }
                    Check::Value(..) => {
                        let cur = self.read_entry(k, ReadMode::CONSISTENT).await?;
                        let state = cur.as_ref().map(|e| (&e.pair.value, e.pair.version));
                        if !check.holds(state) {
                            return Err(condition::failed_check(BACKEND, check));
                        }
                        let index = cur.map_or(0, |e| e.pair.mod_revision);
                        txn.push(TxnOp::new("check-index", k).index(index));
                        origin.push(Origin::ValueCheck(i));
                    }
                }
            }
            for op in &ops {
                txn.push(match op {
                    Op::Put(k, v) => TxnOp::new("set", k.as_str()).value(v),
                    Op::Delete(k) => TxnOp::new("delete", k.as_str()),
                });
                origin.push(Origin::Write);
            }
            if txn.is_empty() {
                return self.kv_index().await;
            }
            let errors = match self.http.txn(&txn).await? {
                TxnOutcome::Committed(r) => {
                    // Every write of one transaction gets the same Raft index;
                    // the entries of `get` checks carry older ones.
                    let written = ops.iter().any(|o| matches!(o, Op::Put(..)));
                    let max = r
                        .results
                        .as_ref()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.kv.as_ref())
                        .map(|kv| kv.modify_index)
                        .max();
                    return match (written, max, r.index) {
                        (true, Some(i), _) => Ok(i),
                        // Read-only: Consul evaluated it at this index.
                        (false, _, Some(i)) if ops.is_empty() && i > 0 => Ok(i),
                        // Only deletes: no entry comes back; the KV index
                        // right after is the commit's (or a later one).
                        _ => self.kv_index().await,
                    };
                }
                TxnOutcome::RolledBack(errors) => errors,
            };
            let mut failed_value_check = false;
            for e in &errors {
                match origin.get(e.op_index) {
                    Some(Origin::Check(i)) => {
                        return Err(condition::failed_check(BACKEND, &checks[*i]));
                    }
                    Some(Origin::ValueCheck(i)) => {
                        failed_value_check = true;
                        last_failure = Some(*i);
                    }
                    Some(Origin::Write) | None => {
                        return Err(Error::Backend {
                            backend: BACKEND,
                            message: format!("atomic: {}", e.what),
                            source: None,
                        });
                    }
                }
            }
            if !failed_value_check {
                return Err(Error::Backend {
                    backend: BACKEND,
                    message: "atomic: rolled back without a reason".into(),
                    source: None,
                });
            }
        }
        let i = last_failure.unwrap_or(0);
        Err(match checks.get(i) {
            Some(c) => condition::failed_check(BACKEND, c),
            None => Error::Backend {
                backend: BACKEND,
                message: "atomic: value checks kept moving".into(),
                source: None,
            },
        })
    }

    /// The current index of the KV store: a single-key read answers with
    /// the index of the whole KV table (tombstones included).
    pub(crate) async fn kv_index(&self) -> Result<Revision> {
        let probe = format!("{}/index", anykv_core::RESERVED_ROOT);
        let (_, index) = self.read_raw(&probe, false, ReadMode::CONSISTENT).await?;
        Ok(index.max(1))
    }
}

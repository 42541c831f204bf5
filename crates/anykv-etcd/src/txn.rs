//! Conditional writes and `atomic` as etcd transactions.
//!
//! Each condition becomes a `Compare` evaluated by the server in the same
//! raft entry as the write, so there is no read-then-write race. The `else`
//! branch reads the keys involved, so a failed condition is reported from
//! the state the server compared against (no second round trip, and the
//! error shape comes from `anykv_core::store::condition`).

use anykv_core::{
    Bytes, Check, Condition, Error, Key, Op, Result, Revision, Version,
    store::condition::{check, failed_check},
};
use etcd_client::{
    Compare, CompareOp, PutOptions as EtcdPutOptions, Txn, TxnOp, TxnResponse,
    proto::PbTxnOpResponse,
};

use crate::{
    conn::Conn,
    error::{BACKEND, Ctx},
    range::{rev, version_rev},
};

/// The compares that make `condition` hold for `key`.
fn compares(key: &Key, condition: Condition) -> Vec<Compare> {
    let k = key.as_str();
    match condition {
        Condition::Always => Vec::new(),
        // create_revision is 0 exactly when the key does not exist.
        Condition::IfAbsent => vec![Compare::create_revision(k, CompareOp::Equal, 0)],
        Condition::IfPresent => vec![Compare::create_revision(k, CompareOp::Greater, 0)],
        // The existence compare keeps `IfVersion(0)` from matching an absent
        // key, whose mod_revision etcd reports as 0.
        Condition::IfVersion(v) => vec![
            Compare::create_revision(k, CompareOp::Greater, 0),
            Compare::mod_revision(k, CompareOp::Equal, version_rev(v)),
        ],
    }
}

/// The header revision of a response (the store revision after it).
pub(crate) fn header_rev(resp: &TxnResponse) -> Revision {
    resp.header().map(|h| rev(h.revision())).unwrap_or(0)
}

/// The pairs read by the `i`-th operation of the branch that ran, as
/// (value, version) of the first key read.
fn read_at(resp: &TxnResponse, i: usize) -> Option<(Bytes, Version)> {
    let op = resp.0.responses.get(i)?;
    match op.response.as_ref()? {
        PbTxnOpResponse::ResponseRange(r) => r.kvs.first().map(|kv| {
            (
                Bytes::copy_from_slice(&kv.value),
                Version::new(rev(kv.mod_revision)),
            )
        }),
        _ => None,
    }
}

/// The error for a condition that the server found false, from the state it
/// read in the `else` branch.
fn condition_failed(key: &Key, condition: Condition, current: Option<Version>) -> Error {
    match check(BACKEND, key, condition, current) {
        Err(e) => e,
        // The compare failed yet the read says it holds: cannot happen in one
        // transaction; report a conflict rather than pretend success.
        Ok(()) => Error::Conflict {
            backend: BACKEND,
            key: key.to_string(),
            expected: match condition {
                Condition::IfVersion(v) => Some(v),
                _ => None,
            },
            actual: current,
        },
    }
}

/// A put under a condition (and optionally a lease). Returns the new version.
pub(crate) async fn put(
    conn: &Conn,
    key: &Key,
    value: Bytes,
    condition: Condition,
    lease: Option<i64>,
) -> Result<Version> {
    let ctx = Ctx::new("put", Some(key.as_str()), conn.timeout());
    let value: Vec<u8> = value.into();
    let opts = lease.map(|id| EtcdPutOptions::new().with_lease(id));
    let txn = Txn::new()
        .when(compares(key, condition))
        .and_then(vec![TxnOp::put(key.as_str(), value, opts)])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = exec(conn, ctx, &txn).await?;
    if resp.succeeded() {
        // The put is the transaction's only write: its revision is the
        // header's, and that is the key's new mod_revision.
        Ok(Version::new(header_rev(&resp)))
    } else {
        Err(condition_failed(
            key,
            condition,
            read_at(&resp, 0).map(|(_, v)| v),
        ))
    }
}

/// Sends one transaction (re-sent by `Conn::call` only if it never left).
pub(crate) async fn exec(conn: &Conn, ctx: Ctx<'_>, txn: &Txn) -> Result<TxnResponse> {
    conn.call(ctx, |c| {
        let mut kv = c.kv.clone();
        let txn = txn.clone();
        async move { kv.txn(txn).await }
    })
    .await
}

/// A delete under `IfPresent` or `IfVersion`; `true` when it happened.
pub(crate) async fn delete(conn: &Conn, key: &Key, condition: Condition) -> Result<bool> {
    let ctx = Ctx::new("delete", Some(key.as_str()), conn.timeout());
    let txn = Txn::new()
        .when(compares(key, condition))
        .and_then(vec![TxnOp::delete(key.as_str(), None)])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let resp = exec(conn, ctx, &txn).await?;
    if resp.succeeded() {
        Ok(true)
    } else {
        Err(condition_failed(
            key,
            condition,
            read_at(&resp, 0).map(|(_, v)| v),
        ))
    }
}

/// The compare for one `atomic` check.
fn check_compares(c: &Check) -> Vec<Compare> {
    match c {
        Check::Exists(k) => vec![Compare::create_revision(k.as_str(), CompareOp::Greater, 0)],
        Check::Absent(k) => vec![Compare::create_revision(k.as_str(), CompareOp::Equal, 0)],
        Check::Version(k, v) => vec![
            Compare::create_revision(k.as_str(), CompareOp::Greater, 0),
            Compare::mod_revision(k.as_str(), CompareOp::Equal, version_rev(*v)),
        ],
        // etcd fails a value compare on an absent key, as anykv wants.
        Check::Value(k, v) => vec![Compare::value(k.as_str(), CompareOp::Equal, v.to_vec())],
    }
}

/// `atomic`: every check as compares, every op in the `then` branch, and a
/// read of each checked key in the `else` branch to name a failed check.
pub(crate) async fn atomic(conn: &Conn, checks: Vec<Check>, ops: Vec<Op>) -> Result<Revision> {
    let ctx = Ctx::new("atomic", None, conn.timeout());
    let when: Vec<Compare> = checks.iter().flat_map(check_compares).collect();
    let then: Vec<TxnOp> = ops
        .into_iter()
        .map(|op| match op {
            Op::Put(k, v) => TxnOp::put(k.into_string(), Vec::<u8>::from(v), None),
            Op::Delete(k) => TxnOp::delete(k.into_string(), None),
        })
        .collect();
    let reads: Vec<TxnOp> = checks
        .iter()
        .map(|c| TxnOp::get(c.key().as_str(), None))
        .collect();
    let txn = Txn::new().when(when).and_then(then).or_else(reads);
    let resp = exec(conn, ctx, &txn).await?;
    if resp.succeeded() {
        return Ok(header_rev(&resp));
    }
    for (i, c) in checks.iter().enumerate() {
        let current = read_at(&resp, i);
        if !c.holds(current.as_ref().map(|(v, ver)| (v, *ver))) {
            return Err(failed_check(BACKEND, c));
        }
    }
    // Cannot happen within one transaction; still a conflict, never success.
    Err(match checks.first() {
        Some(c) => failed_check(BACKEND, c),
        None => Error::backend(BACKEND, "atomic: empty transaction refused", "no checks"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_version_zero_never_matches_an_absent_key() {
        let k = Key::new("a").unwrap();
        let c = compares(&k, Condition::IfVersion(Version::new(0)));
        assert_eq!(
            c.len(),
            2,
            "existence compare must guard the version compare"
        );
        assert!(compares(&k, Condition::Always).is_empty());
    }

    #[test]
    fn failed_condition_shapes() {
        let k = Key::new("a").unwrap();
        assert!(matches!(
            condition_failed(&k, Condition::IfAbsent, Some(Version::new(3))),
            Error::AlreadyExists { .. }
        ));
        assert!(matches!(
            condition_failed(&k, Condition::IfVersion(Version::new(3)), None),
            Error::NotFound { .. }
        ));
        match condition_failed(
            &k,
            Condition::IfVersion(Version::new(3)),
            Some(Version::new(5)),
        ) {
            Error::Conflict {
                expected, actual, ..
            } => {
                assert_eq!(expected, Some(Version::new(3)));
                assert_eq!(actual, Some(Version::new(5)));
            }
            e => panic!("{e}"),
        }
    }
}

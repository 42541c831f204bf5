//! Single-key and range operations: reads through consulrs' `ReadKeyRequest`
//! / `ReadKeysRequest`, writes through `/v1/txn` (so that `put` learns the
//! new `ModifyIndex`), very large values through consulrs' `SetKeyRequest`.

use std::time::Duration;

use anykv_core::{
    Condition, Error, Key, KvPair, Prefix, PutOptions, Result, Version, store::condition,
};
use bytes::Bytes;
use consulrs::api::{
    features::{Blocking, ConsistencyMode, Features},
    kv::{
        common::KVPair,
        requests::{ReadKeyRequest, ReadKeysRequest, SetKeyRequest},
    },
};

use crate::{
    Inner,
    error::{self, BACKEND},
    http::{Lane, TXN_MAX_BODY, TxnOp, TxnOutcome, TxnResults, write_nonce},
    session::{self, SessionKind},
    settings::Consistency,
};

/// A key as read from Consul, with what the driver needs besides the pair.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub pair: KvPair,
    /// The session holding the key (TTL or lock), if any.
    pub session: Option<String>,
    /// `Flags`: the write nonce of the last anykv write.
    pub flags: u64,
}

/// How a read is served: its consistency mode, and whether it blocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReadMode {
    /// `None`: the store's `consistency` option.
    consistency: Option<Consistency>,
    /// A blocking query: from this index, waiting at most this long.
    block: Option<(u64, Duration)>,
    /// A watch hub's read: in the watches' share of connections.
    watch: bool,
}

impl ReadMode {
    /// A read a user asked for: the store's `consistency` option.
    pub(crate) const PLAIN: ReadMode = ReadMode {
        consistency: None,
        block: None,
        watch: false,
    };
    /// `?consistent`: for reads that feed a decision.
    pub(crate) const CONSISTENT: ReadMode = ReadMode {
        consistency: Some(Consistency::Consistent),
        block: None,
        watch: false,
    };

    /// A blocking query from `index`, waiting at most `wait`, in the
    /// store's `consistency` mode.
    pub(crate) fn blocking(index: u64, wait: Duration) -> ReadMode {
        ReadMode {
            consistency: None,
            block: Some((index, wait)),
            watch: false,
        }
    }

    /// The same read, made by a watch hub: in the watches' share of
    /// connections (see [`Lane`]).
    pub(crate) fn for_watch(self) -> ReadMode {
        ReadMode {
            watch: true,
            ..self
        }
    }

    /// The connection share of this read.
    fn lane(self) -> Lane {
        match (self.watch, self.block) {
            (true, _) => Lane::Watch,
            (false, Some(_)) => Lane::Lock,
            (false, None) => Lane::Ops,
        }
    }

    /// The same read, `?consistent`.
    pub(crate) fn consistent(self) -> ReadMode {
        ReadMode {
            consistency: Some(Consistency::Consistent),
            ..self
        }
    }
}

/// Converts Consul's entry; `None` for names no anykv client could write
/// (skipped, as the contract says).
pub(crate) fn entry(kv: KVPair) -> Result<Option<Entry>> {
    let Some(key) = Key::from_backend(&kv.key) else {
        return Ok(None);
    };
    let value: Vec<u8> = match kv.value {
        None => Vec::new(),
        Some(b64) => b64.try_into().map_err(|e: consulrs::error::ClientError| {
            error::internal(format!("value of {key} is not base64"), e)
        })?,
    };
    Ok(Some(Entry {
        pair: KvPair {
            key,
            value: Bytes::from(value),
            version: Version::new(kv.modify_index),
            create_revision: kv.create_index,
            mod_revision: kv.modify_index,
        },
        session: kv.session.filter(|s| !s.is_empty()),
        flags: kv.flags,
    }))
}

/// Whether a value travels in a transaction without hitting Consul's
/// 512 KiB body limit (base64 grows it by 4/3; the rest is the key, JSON
/// escaping and the other fields of at most a few operations).
pub(crate) fn fits_txn(key: &str, value_len: usize) -> bool {
    value_len.div_ceil(3) * 4 + 2 * key.len() + 1024 <= TXN_MAX_BODY
}

fn build_err(what: &str, e: impl std::fmt::Display) -> Error {
    error::internal(format!("{what}: building the request"), e.to_string())
}

/// The ops that make a write conditional, placed before the write itself.
fn condition_ops(key: &str, cond: Condition) -> Vec<TxnOp> {
    match cond {
        Condition::Always => vec![],
        Condition::IfAbsent => vec![TxnOp::new("check-not-exists", key)],
        // `get` fails the transaction when the key does not exist.
        Condition::IfPresent => vec![TxnOp::new("get", key)],
        Condition::IfVersion(v) => vec![TxnOp::new("check-index", key).index(v.get())],
    }
}

/// The `ModifyIndex` of the last entry of a committed transaction.
fn last_index(results: &TxnResults) -> Option<(u64, Option<String>)> {
    results
        .results
        .as_ref()?
        .iter()
        .rev()
        .find_map(|r| r.kv.as_ref())
        .map(|kv| {
            (
                kv.modify_index,
                kv.session.clone().filter(|s| !s.is_empty()),
            )
        })
}

fn no_entry(what: &str) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: format!("{what}: consul committed the transaction but returned no entry"),
        source: None,
    }
}

/// Writes that race with another writer are retried this often before the
/// driver gives up with `Unavailable` (a contention storm, not a conflict).
const WRITE_ATTEMPTS: usize = 8;

impl Inner {
    /// The query flag for a read in `wanted` mode (`None`: the store's
    /// `consistency` option); Consul's default mode has none.
    pub(crate) fn consistency_mode(&self, wanted: Option<Consistency>) -> Option<ConsistencyMode> {
        match wanted.unwrap_or(self.http.settings().consistency) {
            Consistency::Consistent => Some(ConsistencyMode::CONSISTENT),
            Consistency::Default => None,
            Consistency::Stale => Some(ConsistencyMode::STALE),
        }
    }

    /// Whether reads in mode `mode` are `?consistent`.
    pub(crate) fn is_consistent(&self, mode: ReadMode) -> bool {
        mode.consistency.unwrap_or(self.http.settings().consistency) == Consistency::Consistent
    }

    /// Reads a key, or every key below `path` with `recurse`; returns the
    /// entries and `X-Consul-Index`. 404 is an empty answer.
    pub(crate) async fn read_raw(
        &self,
        path: &str,
        recurse: bool,
        mode: ReadMode,
    ) -> Result<(Vec<KVPair>, u64)> {
        let (body, index) = self.read_body(path, recurse, mode).await?;
        let kvs = match body {
            None => Vec::new(),
            Some(body) => serde_json::from_slice(&body)
                .map_err(|e| error::internal("get: unexpected reply from consul", e))?,
        };
        Ok((kvs, index))
    }

    /// [`read_raw`](Self::read_raw) without decoding: the JSON body (`None`
    /// for 404) and `X-Consul-Index`.
    pub(crate) async fn read_body(
        &self,
        path: &str,
        recurse: bool,
        mode: ReadMode,
    ) -> Result<(Option<Bytes>, u64)> {
        let mut features = Features {
            mode: self.consistency_mode(mode.consistency),
            ..Features::default()
        };
        if let Some((index, wait)) = mode.block {
            features.blocking = Some(Blocking {
                index,
                wait: Some(format!("{}ms", wait.as_millis().max(1))),
            });
        }
        let mut req = ReadKeyRequest::builder();
        req.key(path).features(features);
        if recurse {
            req.recurse(true);
        }
        let req = req.build().map_err(|e| build_err("get", e))?;
        let reply = match mode.block {
            Some((_, wait)) => {
                // Consul adds up to wait/16 of jitter before answering.
                let deadline = blocking_deadline(wait, self.http.settings().timeout);
                self.http
                    .call_blocking("get", &req, deadline, mode.lane())
                    .await?
            }
            None => {
                self.http
                    .call_within("get", &req, self.http.settings().timeout, mode.lane())
                    .await?
            }
        };
        let index = reply.index.unwrap_or(0);
        match reply.status {
            200 => Ok((Some(reply.body), index)),
            404 => Ok((None, index)),
            _ => Err(reply.error("get")),
        }
    }

    /// One key with its session.
    pub(crate) async fn read_entry(&self, key: &str, mode: ReadMode) -> Result<Option<Entry>> {
        let (kvs, _) = self.read_raw(key, false, mode).await?;
        for kv in kvs {
            if kv.key == key {
                return entry(kv);
            }
        }
        Ok(None)
    }

    pub(crate) async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        Ok(self
            .read_entry(key.as_str(), ReadMode::PLAIN)
            .await?
            .map(|e| e.pair))
    }

    pub(crate) async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        let (kvs, _) = self.read_raw(&prefix.dir(), true, ReadMode::PLAIN).await?;
        let mut pairs = Vec::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(e) = entry(kv)?
                && prefix.contains(e.pair.key.as_str())
            {
                pairs.push(e.pair);
            }
        }
        pairs.sort_by(|a, b| a.key.as_str().as_bytes().cmp(b.key.as_str().as_bytes()));
        Ok(pairs)
    }

    pub(crate) async fn keys(&self, prefix: &Prefix) -> Result<Vec<String>> {
        let dir = prefix.dir();
        let features = Features {
            mode: self.consistency_mode(None),
            ..Features::default()
        };
        let req = ReadKeysRequest::builder()
            .key(dir.as_str())
            .separator("/")
            .features(features)
            .build()
            .map_err(|e| build_err("keys", e))?;
        let reply = self.http.call("keys", &req).await?;
        let raw: Vec<String> = match reply.status {
            200 => reply.json("keys")?,
            404 => Vec::new(),
            _ => return Err(reply.error("keys")),
        };
        let mut names: Vec<String> = raw
            .iter()
            .filter_map(|k| k.strip_prefix(&dir))
            .map(|rest| rest.split('/').next().unwrap_or(rest))
            // One valid segment (the reserved root included: the layer hides it).
            .filter(|name| Key::from_backend(name).is_some())
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(crate) async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        if let Condition::IfVersion(v) = opts.condition
            && v.get() == 0
        {
            // Index 0 means "create" to Consul's cas; no anykv version is 0.
            return Err(self.condition_error(key, opts.condition).await);
        }
        if let Some(ttl) = opts.ttl {
            session::check_ttl(ttl)?;
        }
        if !fits_txn(key.as_str(), value.len()) {
            return self.put_large(key, value, opts).await;
        }
        match opts.ttl {
            None => self.put_plain(key, &value, opts.condition).await,
            Some(ttl) => self.put_ttl(key, &value, opts.condition, ttl).await,
        }
    }

    /// `[condition…, set]`; if the key turns out to be held by a session (a
    /// TTL from an earlier put), it is detached so that it stays.
    async fn put_plain(&self, key: &Key, value: &[u8], cond: Condition) -> Result<Version> {
        let k = key.as_str();
        let mut ops = condition_ops(k, cond);
        ops.push(TxnOp::new("set", k).value(value));
        let results = match self.http.txn(&ops).await? {
            TxnOutcome::Committed(r) => r,
            TxnOutcome::RolledBack(_) => return Err(self.condition_error(key, cond).await),
        };
        let (index, held_by) = last_index(&results).ok_or_else(|| no_entry("put"))?;
        let Some(session) = held_by else {
            if self.watches.active() {
                // This handle's watches learn the write even if their shared
                // query only sees a later state (see watch.rs).
                let create = results
                    .results
                    .as_ref()
                    .and_then(|r| r.iter().rev().find_map(|r| r.kv.as_ref()))
                    .map_or(index, |kv| kv.create_index);
                self.watches.local_put(KvPair {
                    key: key.clone(),
                    value: Bytes::copy_from_slice(value),
                    version: Version::new(index),
                    create_revision: create,
                    mod_revision: index,
                });
            }
            return Ok(Version::new(index));
        };
        // Detach from the session only if nobody wrote since (else the
        // newer write decides), in one step that keeps the value.
        let detach = [
            TxnOp::new("check-index", k).index(index),
            TxnOp::new("unlock", k).value(value).session(&session),
        ];
        let version = match self.http.txn(&detach).await? {
            TxnOutcome::Committed(r) => last_index(&r).map_or(index, |(i, _)| i),
            TxnOutcome::RolledBack(_) => index,
        };
        self.forget_ttl_session(session);
        Ok(Version::new(version))
    }

    /// `[condition…, lock]` with a fresh TTL session; a key held by another
    /// session moves to the new one in one transaction.
    async fn put_ttl(
        &self,
        key: &Key,
        value: &[u8],
        cond: Condition,
        ttl: Duration,
    ) -> Result<Version> {
        let guard = self.create_session(SessionKind::Ttl, ttl).await?;
        let version = self.put_held(key, value, cond, guard.id()).await?;
        guard.keep();
        Ok(version)
    }

    /// A put of an anykv session's ephemeral key (`session` is its id).
    /// `LockLost` once the session is gone.
    pub(crate) async fn put_in_session(
        &self,
        key: &Key,
        value: Bytes,
        cond: Condition,
        session: &str,
    ) -> Result<Version> {
        if let Condition::IfVersion(v) = cond
            && v.get() == 0
        {
            return Err(self.condition_error(key, cond).await);
        }
        if fits_txn(key.as_str(), value.len()) {
            self.put_held(key, &value, cond, session).await
        } else {
            self.put_large_held(key, value, cond, Some(session)).await
        }
    }

    /// `[condition…, lock]` with `sid`; a key held by another session
    /// moves to `sid` in one transaction. A `lock` refused on a free key
    /// (no lock-delay runs for anykv's sessions) means `sid` is gone:
    /// confirmed by a `consistent` read of the session, it is `LockLost`.
    async fn put_held(
        &self,
        key: &Key,
        value: &[u8],
        cond: Condition,
        sid: &str,
    ) -> Result<Version> {
        let k = key.as_str();
        for _ in 0..WRITE_ATTEMPTS {
            let cond_ops = condition_ops(k, cond);
            let n_cond = cond_ops.len();
            let mut ops = cond_ops;
            ops.push(TxnOp::new("lock", k).value(value).session(sid));
            let errors = match self.http.txn(&ops).await? {
                TxnOutcome::Committed(r) => {
                    let (index, _) = last_index(&r).ok_or_else(|| no_entry("put"))?;
                    return Ok(Version::new(index));
                }
                TxnOutcome::RolledBack(errors) => errors,
            };
            if errors.iter().any(|e| e.op_index < n_cond) {
                return Err(self.condition_error(key, cond).await);
            }
            // The lock op failed: the key is held by another session, a
            // lock-delay is running, or our session is gone. Look, and
            // move it over.
            let cur = self.read_entry(k, ReadMode::CONSISTENT).await?;
            let held_by = cur.as_ref().and_then(|c| c.session.clone());
            if held_by.is_none() && session::info(&self.http, sid).await?.is_none() {
                return Err(Error::LockLost {
                    backend: BACKEND,
                    key: key.to_string(),
                });
            }
            let Some(cur) = cur else {
                continue; // gone meanwhile: try again from the start
            };
            condition::check(BACKEND, key, cond, Some(cur.pair.version))?;
            let Some(old) = held_by else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let swap = [
                TxnOp::new("check-index", k).index(cur.pair.mod_revision),
                TxnOp::new("unlock", k).session(&old),
                TxnOp::new("lock", k).value(value).session(sid),
            ];
            if let TxnOutcome::Committed(r) = self.http.txn(&swap).await? {
                let (index, _) = last_index(&r).ok_or_else(|| no_entry("put"))?;
                self.forget_ttl_session(old);
                return Ok(Version::new(index));
            }
        }
        Err(contended(k))
    }

    /// Values too large for `/v1/txn`: a plain `PUT` (`?cas=` for
    /// conditions, `?acquire=` for a TTL), then a consistent read for the
    /// version.
    async fn put_large(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        let Some(ttl) = opts.ttl else {
            return self.put_large_held(key, value, opts.condition, None).await;
        };
        let guard = self.create_session(SessionKind::Ttl, ttl).await?;
        let version = self
            .put_large_held(key, value, opts.condition, Some(guard.id()))
            .await?;
        guard.keep();
        Ok(version)
    }

    /// [`put_large`](Self::put_large), the key acquired by `session` if any.
    async fn put_large_held(
        &self,
        key: &Key,
        value: Bytes,
        cond: Condition,
        session: Option<&str>,
    ) -> Result<Version> {
        let k = key.as_str();
        for _ in 0..WRITE_ATTEMPTS {
            let cur = self.read_entry(k, ReadMode::CONSISTENT).await?;
            condition::check(BACKEND, key, cond, cur.as_ref().map(|e| e.pair.version))?;
            let held_by = cur.as_ref().and_then(|e| e.session.clone());
            // A key held by a session is released first (`?release=` also
            // writes the value), so that the key no longer expires with it.
            let nonce = write_nonce();
            if let Some(old) = &held_by
                && Some(old.as_str()) != session
                && !self
                    .set_raw(k, &value, nonce, SetMode::Release(old))
                    .await?
            {
                continue;
            }
            let written = match session {
                Some(s) => {
                    let ok = self.set_raw(k, &value, nonce, SetMode::Acquire(s)).await?;
                    if !ok && session::info(&self.http, s).await?.is_none() {
                        return Err(Error::LockLost {
                            backend: BACKEND,
                            key: key.to_string(),
                        });
                    }
                    ok
                }
                None if held_by.is_some() => true, // the release wrote it
                None => {
                    let cas = cur.as_ref().map_or(0, |e| e.pair.mod_revision);
                    self.set_raw(k, &value, nonce, SetMode::Cas(cas)).await?
                }
            };
            if !written {
                continue;
            }
            if let Some(old) = held_by
                && Some(old.as_str()) != session
            {
                self.forget_ttl_session(old);
            }
            let after = self.read_entry(k, ReadMode::CONSISTENT).await?;
            return Ok(match after {
                // Our nonce: this entry is our write.
                Some(e) if e.flags == nonce => e.pair.version,
                // Overwritten (or deleted) right after our write: our write's
                // index is unknown; hand back a token no write ever has, so
                // that a CAS on it fails rather than clobbering the newer value.
                _ => Version::new(u64::MAX),
            });
        }
        Err(contended(k))
    }

    /// consulrs' `SetKeyRequest`: a plain `PUT` with the raw value.
    async fn set_raw(
        &self,
        key: &str,
        value: &Bytes,
        nonce: u64,
        mode: SetMode<'_>,
    ) -> Result<bool> {
        let mut req = SetKeyRequest::builder();
        req.key(key).value(value.to_vec()).flags(nonce);
        match mode {
            SetMode::Cas(i) => req.cas(i),
            SetMode::Acquire(s) => req.acquire(s),
            SetMode::Release(s) => req.release(s),
        };
        let req = req.build().map_err(|e| build_err("put", e))?;
        let reply = self.http.call("put", &req).await?;
        if !reply.ok() {
            return Err(reply.error("put"));
        }
        reply.json::<bool>("put")
    }

    pub(crate) async fn delete(&self, key: &Key, cond: Condition) -> Result<bool> {
        let k = key.as_str();
        let ops = match cond {
            // `get` fails the transaction on an absent key: that tells
            // whether the key existed, atomically with the delete.
            Condition::Always | Condition::IfPresent => {
                vec![TxnOp::new("get", k), TxnOp::new("delete", k)]
            }
            Condition::IfVersion(v) => vec![
                TxnOp::new("check-index", k).index(v.get()),
                TxnOp::new("delete", k),
            ],
            Condition::IfAbsent => {
                return Err(Error::InvalidArgument {
                    backend: BACKEND,
                    message: "delete cannot be conditional on absence".into(),
                });
            }
        };
        match self.http.txn(&ops).await? {
            TxnOutcome::Committed(r) => {
                if let Some((_, Some(session))) = last_index(&r) {
                    self.forget_ttl_session(session);
                }
                Ok(true)
            }
            TxnOutcome::RolledBack(_) if cond == Condition::Always => Ok(false),
            TxnOutcome::RolledBack(_) => Err(self.condition_error(key, cond).await),
        }
    }

    pub(crate) async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let dir = prefix.dir();
        let ops = [
            TxnOp::new("get-tree", &dir),
            TxnOp::new("delete-tree", &dir),
        ];
        match self.http.txn(&ops).await? {
            TxnOutcome::Committed(r) => {
                let entries: Vec<_> = r
                    .results
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|r| r.kv)
                    .collect();
                let mut sessions: Vec<String> = entries
                    .iter()
                    .filter_map(|kv| kv.session.clone())
                    .filter(|s| !s.is_empty())
                    .collect();
                sessions.sort();
                sessions.dedup();
                for s in sessions {
                    self.forget_ttl_session(s);
                }
                Ok(entries.len() as u64)
            }
            TxnOutcome::RolledBack(errs) => Err(Error::Backend {
                backend: BACKEND,
                message: format!(
                    "delete_prefix: {}",
                    errs.first().map_or("rolled back", |e| e.what.as_str())
                ),
                source: None,
            }),
        }
    }

    /// The error for a condition that failed inside a transaction, from a
    /// consistent read of the key's state now.
    pub(crate) async fn condition_error(&self, key: &Key, cond: Condition) -> Error {
        let current = match self.read_entry(key.as_str(), ReadMode::CONSISTENT).await {
            Ok(cur) => cur.map(|e| e.pair.version),
            Err(e) => return e,
        };
        match condition::check(BACKEND, key, cond, current) {
            Err(e) => e,
            // The key changed back between the failed write and the read:
            // report what the write saw.
            Ok(()) => match cond {
                Condition::IfAbsent => Error::AlreadyExists {
                    backend: BACKEND,
                    key: key.to_string(),
                },
                Condition::IfPresent => Error::NotFound {
                    backend: BACKEND,
                    key: key.to_string(),
                },
                Condition::IfVersion(v) => Error::Conflict {
                    backend: BACKEND,
                    key: key.to_string(),
                    expected: Some(v),
                    actual: current,
                },
                Condition::Always => Error::Backend {
                    backend: BACKEND,
                    message: format!("write of {key} rolled back without a condition"),
                    source: None,
                },
            },
        }
    }

    /// `GET /v1/status/leader` within the timeout.
    pub(crate) async fn probe(&self) -> Result<()> {
        let timeout = self.http.settings().timeout;
        let leader = tokio::time::timeout(timeout, self.http.leader())
            .await
            .map_err(|_| Error::Timeout {
                backend: BACKEND,
                operation: "probe",
                after: timeout,
            })??;
        if leader.is_empty() {
            return Err(Error::Unavailable {
                backend: BACKEND,
                message: "probe: the cluster has no leader".into(),
                source: None,
            });
        }
        Ok(())
    }
}

/// How long a blocking query may take: the wait, Consul's jitter of up to
/// wait/16, and the request timeout (saturating: `?timeout=` is the user's).
pub(crate) fn blocking_deadline(wait: Duration, timeout: Duration) -> Duration {
    wait.saturating_add(wait / 16).saturating_add(timeout)
}

/// How a plain `PUT` writes.
enum SetMode<'a> {
    Cas(u64),
    Acquire(&'a str),
    Release(&'a str),
}

fn contended(key: &str) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: format!("put {key}: the key kept changing under {WRITE_ATTEMPTS} attempts"),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_size_budget() {
        assert!(fits_txn("k", 300 * 1024));
        assert!(!fits_txn("k", 400 * 1024));
        assert!(!fits_txn("k", crate::MAX_VALUE_SIZE));
    }

    #[test]
    fn entries_skip_foreign_names_and_decode_values() {
        let raw: KVPair = serde_json::from_str(
            r#"{"Key":"a/b","Value":"aGk=","CreateIndex":3,"ModifyIndex":7,"LockIndex":0,"Flags":0,"Session":"s1"}"#,
        )
        .unwrap();
        let e = entry(raw).unwrap().unwrap();
        assert_eq!(&e.pair.value[..], b"hi");
        assert_eq!(e.pair.version, Version::new(7));
        assert_eq!(e.pair.create_revision, 3);
        assert_eq!(e.session.as_deref(), Some("s1"));
        let empty: KVPair = serde_json::from_str(
            r#"{"Key":"a","Value":null,"CreateIndex":1,"ModifyIndex":1,"LockIndex":0,"Flags":0}"#,
        )
        .unwrap();
        assert!(entry(empty).unwrap().unwrap().pair.value.is_empty());
        let foreign: KVPair = serde_json::from_str(
            r#"{"Key":"a//b","CreateIndex":1,"ModifyIndex":1,"LockIndex":0,"Flags":0}"#,
        )
        .unwrap();
        assert!(entry(foreign).unwrap().is_none());
    }
}

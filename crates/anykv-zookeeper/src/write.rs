//! Writes of one key: put (plain, conditional, with TTL) and delete.
//!
//! A plain put is one `setData` round trip (`create` with implicit parents
//! when the znode is missing). Conditional writes read the znode first and
//! then write with ZooKeeper's expected-version check, so a concurrent
//! change makes the write fail and the loop re-evaluates the condition.

use std::sync::Arc;

use anykv_core::{Condition, Error, Key, Result, Version, store::condition};
use zookeeper_client::{self as zk, CreateOptions, MultiWriteResult, Stat};

use crate::{
    Inner,
    codec::{self, DIR},
    conn::Session,
    error::BACKEND,
    tree::{self, RACE_ATTEMPTS},
};

/// Error context of one operation on one key.
pub(crate) struct Cx<'a> {
    pub(crate) inner: &'a Inner,
    pub(crate) session: &'a Arc<Session>,
    pub(crate) operation: &'static str,
    pub(crate) key: &'a str,
}

impl Cx<'_> {
    /// Maps a client error, dropping the session if it is gone.
    pub(crate) fn err(&self, e: zk::Error) -> Error {
        self.inner.fail(self.session, e, self.operation, self.key)
    }

    pub(crate) fn client(&self) -> &zk::Client {
        &self.session.client
    }
}

/// The version of a znode: its `mzxid`.
pub(crate) fn version(stat: &Stat) -> Version {
    Version::new(stat.mzxid as u64)
}

/// The error when a write keeps racing with other writers.
pub(crate) fn contention(key: &str) -> Error {
    Error::Conflict {
        backend: BACKEND,
        key: key.to_owned(),
        expected: None,
        actual: None,
    }
}

/// Unconditional put without TTL: `setData`, or `create` when missing.
///
/// A session's key (an EPHEMERAL znode) is made permanent: `setData`
/// reports the owner, and the znode is then replaced by a persistent one.
///
/// TTL znodes are created without WRITE permission, so this one round trip
/// fails with NoAuth on them; the key is then made permanent by replacing
/// the TTL znode with a persistent one in one multi.
pub(crate) async fn put_always(cx: &Cx<'_>, path: &str, data: &[u8]) -> Result<Version> {
    let client = cx.client();
    for _ in 0..RACE_ATTEMPTS {
        match client.set_data(path, data, None).await {
            Ok(stat) if stat.ephemeral_owner == 0 => return Ok(version(&stat)),
            // A session's key: a put without session makes it permanent,
            // as on the other backends (the znode is replaced).
            Ok(stat) => match replace(cx, path, &stat, data, &cx.inner.node_options()).await? {
                Replaced::Done(v) => return Ok(v),
                Replaced::Raced => continue,
            },
            Err(zk::Error::NoNode) => {
                match tree::create(
                    client,
                    path,
                    data,
                    &cx.inner.node_options(),
                    &cx.inner.dir_options(),
                )
                .await
                {
                    Ok(stat) => return Ok(version(&stat)),
                    Err(zk::Error::NodeExists) => continue,
                    Err(e) => return Err(cx.err(e)),
                }
            }
            Err(zk::Error::NoAuth) => {
                let (old, stat) = match client.get_data(path).await {
                    Ok(found) => found,
                    Err(zk::Error::NoNode) => continue,
                    Err(e) => return Err(cx.err(e)),
                };
                if codec::ttl_of(&old).is_none() {
                    // Really not writable for us.
                    return Err(cx.err(zk::Error::NoAuth));
                }
                match replace(cx, path, &stat, data, &cx.inner.node_options()).await? {
                    Replaced::Done(v) => return Ok(v),
                    Replaced::Raced => continue,
                }
            }
            Err(e) => return Err(cx.err(e)),
        }
    }
    Err(contention(cx.key))
}

/// The type of znode a checked put writes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// A persistent znode: an ordinary key.
    Persistent,
    /// A persistent-with-TTL znode.
    Ttl(std::time::Duration),
    /// An EPHEMERAL znode of the session with this id (a session key).
    Ephemeral(i64),
}

impl Kind {
    /// True when the existing znode is not of this kind, so the put must
    /// replace it (ZooKeeper never changes a znode's type or owner).
    fn must_replace(self, old: &[u8], stat: &Stat) -> bool {
        match self {
            Kind::Persistent => codec::ttl_of(old).is_some() || stat.ephemeral_owner != 0,
            Kind::Ttl(_) => true,
            Kind::Ephemeral(owner) => stat.ephemeral_owner != owner || codec::ttl_of(old).is_some(),
        }
    }
}

/// Put under a condition, with a TTL, or bound to a session.
pub(crate) async fn put_checked(
    cx: &Cx<'_>,
    key: &Key,
    path: &str,
    data: &[u8],
    cond: Condition,
    kind: Kind,
) -> Result<Version> {
    let client = cx.client();
    let options = match kind {
        Kind::Ttl(ttl) => cx.inner.ttl_options(ttl),
        Kind::Persistent => cx.inner.node_options(),
        Kind::Ephemeral(_) => cx.inner.ephemeral_options(),
    };
    for _ in 0..RACE_ATTEMPTS {
        let current = match client.get_data(path).await {
            Ok((d, stat)) => Some((d, stat)),
            Err(zk::Error::NoNode) => None,
            Err(e) => return Err(cx.err(e)),
        };
        let now = codec::now_millis();
        let current_version = current
            .as_ref()
            .and_then(|(d, stat)| codec::is_key(d, stat, now).then(|| version(stat)));
        condition::check(BACKEND, key, cond, current_version)?;
        match current {
            None => {
                match tree::create(client, path, data, &options, &cx.inner.dir_options()).await {
                    Ok(stat) => return Ok(version(&stat)),
                    Err(zk::Error::NodeExists) => continue,
                    Err(e) => return Err(cx.err(e)),
                }
            }
            // The znode's type (or ephemeral owner) changes: replace it.
            Some((old, stat)) if kind.must_replace(&old, &stat) => {
                if matches!(kind, Kind::Ephemeral(_)) && stat.num_children > 0 {
                    return Err(Error::InvalidArgument {
                        backend: BACKEND,
                        message: format!(
                            "{}: a session key cannot have keys below it \
                             (ZooKeeper ephemeral znodes have no children)",
                            cx.key
                        ),
                    });
                }
                match replace(cx, path, &stat, data, &options).await? {
                    Replaced::Done(v) => return Ok(v),
                    Replaced::Raced => continue,
                }
            }
            Some((_, stat)) => match client.set_data(path, data, Some(stat.version)).await {
                Ok(stat) => return Ok(version(&stat)),
                Err(zk::Error::BadVersion | zk::Error::NoNode) => continue,
                Err(e) => return Err(cx.err(e)),
            },
        }
    }
    Err(contention(cx.key))
}

/// Outcome of [`replace`].
pub(crate) enum Replaced {
    Done(Version),
    /// The znode changed or went meanwhile: read again.
    Raced,
}

/// Replaces a znode by a new one of another type (TTL ↔ persistent) in one
/// multi: delete at the version read, create. ZooKeeper cannot change the
/// type of a znode that has children: that is an `InvalidArgument`.
pub(crate) async fn replace(
    cx: &Cx<'_>,
    path: &str,
    old: &Stat,
    data: &[u8],
    options: &CreateOptions<'_>,
) -> Result<Replaced> {
    if old.num_children > 0 {
        return Err(Error::InvalidArgument {
            backend: BACKEND,
            message: format!(
                "{}: ZooKeeper cannot add or remove the TTL of a znode that has children",
                cx.key
            ),
        });
    }
    let client = cx.client();
    let mut writer = client.new_multi_writer();
    writer
        .add_delete(path, Some(old.version))
        .map_err(|e| cx.err(e))?;
    writer
        .add_create(path, data, options)
        .map_err(|e| cx.err(e))?;
    match writer.commit().await {
        Ok(results) => {
            let created = results.into_iter().find_map(|r| match r {
                MultiWriteResult::Create { stat, .. } => Some(stat),
                _ => None,
            });
            match created {
                Some(stat) if stat.mzxid > 0 => Ok(Replaced::Done(version(&stat))),
                // ZooKeeper 3.8 leaves the stat of a create inside a multi
                // empty (ZOOKEEPER-4026): read it back.
                _ => match client.check_stat(path).await {
                    Ok(Some(stat)) => Ok(Replaced::Done(version(&stat))),
                    Ok(None) => Ok(Replaced::Raced),
                    Err(e) => Err(cx.err(e)),
                },
            }
        }
        Err(zk::MultiWriteError::OperationFailed { source, .. }) => match source {
            zk::Error::BadVersion
            | zk::Error::NoNode
            | zk::Error::NodeExists
            | zk::Error::NotEmpty => Ok(Replaced::Raced),
            e => Err(cx.err(e)),
        },
        Err(zk::MultiWriteError::RequestFailed { source }) => Err(cx.err(source)),
    }
}

/// Turns a key with children back into an implicit parent. A TTL key is
/// write-protected (see [`put_always`]): it is given WRITE permission first.
async fn unkey(cx: &Cx<'_>, path: &str, data: &[u8], stat: &Stat) -> Result<bool, zk::Error> {
    let client = cx.client();
    if codec::ttl_of(data).is_some() {
        match client
            .set_acl(path, &cx.inner.acls, Some(stat.aversion))
            .await
        {
            Ok(_) => {}
            Err(zk::Error::BadVersion | zk::Error::NoNode) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    match client.set_data(path, DIR, Some(stat.version)).await {
        Ok(_) => Ok(true),
        Err(zk::Error::BadVersion | zk::Error::NoNode) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Delete under a condition. A key with children stops being a key (its
/// data becomes the implicit-parent marker) and its children stay; a key
/// without children goes, and so do the markers above it that were only
/// there for it.
pub(crate) async fn delete(cx: &Cx<'_>, key: &Key, path: &str, cond: Condition) -> Result<bool> {
    let client = cx.client();
    for _ in 0..RACE_ATTEMPTS {
        let (data, stat) = match client.get_data(path).await {
            Ok(found) => found,
            Err(zk::Error::NoNode) => {
                condition::check(BACKEND, key, cond, None)?;
                return Ok(false);
            }
            Err(e) => return Err(cx.err(e)),
        };
        let is_key = codec::is_key(&data, &stat, codec::now_millis());
        let current = is_key.then(|| version(&stat));
        condition::check(BACKEND, key, cond, current)?;
        if !is_key {
            // Not a key: nothing to delete, but an empty marker or an
            // expired TTL znode left behind can go.
            if stat.num_children == 0 && client.delete(path, Some(stat.version)).await.is_ok() {
                tree::prune(client, path).await;
            }
            return Ok(false);
        }
        if stat.num_children > 0 {
            match unkey(cx, path, &data, &stat).await {
                Ok(true) => return Ok(true),
                Ok(false) => continue,
                Err(e) => return Err(cx.err(e)),
            }
        }
        match client.delete(path, Some(stat.version)).await {
            Ok(()) => {
                tree::prune(client, path).await;
                return Ok(true);
            }
            Err(zk::Error::BadVersion | zk::Error::NoNode | zk::Error::NotEmpty) => continue,
            Err(e) => return Err(cx.err(e)),
        }
    }
    Err(contention(cx.key))
}

//! Locks: ZooKeeper's ephemeral-sequential recipe.
//!
//! The lock key (`__anykv/locks/<ns>/<key>`) is a directory znode; each
//! contender creates `lock-<guid>-<seq>` in it, EPHEMERAL_SEQUENTIAL, with
//! the owner's name as data. The lowest sequence holds the lock; every other
//! contender watches only its predecessor (no herd effect). The GUID lets a
//! contender find its znode again when the reply to its create was lost with
//! the connection. The fencing token is the holder znode's `czxid`: later
//! contenders create later znodes, so tokens strictly increase across
//! holders, even if the directory is removed and created again.
//!
//! The znode lives as long as the store's session: the lock is kept alive by
//! the session's heartbeats and frees when the session ends (release, drop,
//! process death + `session_timeout`). `lost()` fires on session expiry or
//! if the holder znode is deleted by someone else.

use std::{panic::AssertUnwindSafe, sync::Arc, time::Duration};

use anykv_core::{
    Error, Key, LockGuard, LockInfo, LockOptions, LockRelease, LostNotifier, Result, async_trait,
    lost_pair,
};
use futures::FutureExt;
use tokio::{sync::oneshot, time::Instant};
use zookeeper_client::{self as zk, EventType, Stat};

use crate::{
    Inner, codec,
    conn::Session,
    error::{self, BACKEND},
    tree::{self, RACE_ATTEMPTS},
};

/// Name prefix of a contender's znode.
const NODE_PREFIX: &str = "lock-";

/// A contender znode's name parsed: `lock-<guid>-<seq>`.
struct Contender<'a> {
    name: &'a str,
    guid: &'a str,
    seq: i64,
}

fn parse(name: &str) -> Option<Contender<'_>> {
    let rest = name.strip_prefix(NODE_PREFIX)?;
    let (guid, seq) = rest.rsplit_once('-')?;
    Some(Contender {
        name,
        guid,
        seq: seq.parse().ok()?,
    })
}

/// The contenders in a lock directory, lowest sequence first.
fn contenders(children: &[String]) -> Vec<Contender<'_>> {
    let mut all: Vec<Contender<'_>> = children.iter().filter_map(|c| parse(c)).collect();
    all.sort_by_key(|c| c.seq);
    all
}

/// Takes the lock. `try_only`: give up at once if it is held (`Ok(None)`);
/// otherwise wait up to `wait` (forever if `None`), then `Error::Timeout`.
pub(crate) async fn acquire(
    inner: &Arc<Inner>,
    key: &Key,
    opts: &LockOptions,
    wait: Option<Duration>,
    try_only: bool,
) -> Result<Option<LockGuard>> {
    let dir = codec::path_of(key.as_str());
    let session = inner.session().await?;
    let fail = |e: zk::Error| inner.fail(&session, e, "lock", key.as_str());
    let client = &session.client;
    let guid = uuid::Uuid::new_v4().simple().to_string();
    let owner = opts.owner.clone().unwrap_or_default();
    let (path, stat) = create_contender(inner, client, &dir, &guid, owner.as_bytes())
        .await
        .map_err(fail)?;
    // If this future is dropped before the lock is handed over (the caller
    // gave up), the znode is deleted in the background.
    let mut pending = Pending {
        session: Some(session.clone()),
        path: path.clone(),
    };
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let children = client.list_children(&dir).await.map_err(fail)?;
        let all = contenders(&children);
        let Some(pos) = all.iter().position(|c| c.guid == guid) else {
            // Our znode is gone: the session expired under us.
            pending.disarm();
            return Err(Error::LockLost {
                backend: BACKEND,
                key: key.to_string(),
            });
        };
        if pos == 0 {
            break;
        }
        if try_only {
            pending.give_up().await;
            return Ok(None);
        }
        let predecessor = codec::child_path(&dir, all[pos - 1].name);
        let (exists, watcher) = client
            .check_and_watch_stat(&predecessor)
            .await
            .map_err(fail)?;
        if exists.is_none() {
            continue;
        }
        let changed = AssertUnwindSafe(watcher.changed()).catch_unwind();
        match deadline {
            None => {
                let _ = changed.await;
            }
            Some(deadline) => {
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        pending.give_up().await;
                        return Err(Error::Timeout {
                            backend: BACKEND,
                            operation: "lock",
                            after: wait.unwrap_or_default(),
                        });
                    }
                }
            }
        }
        if !session.usable() {
            pending.disarm();
            return Err(Error::Unavailable {
                backend: BACKEND,
                message: format!("session ended while waiting for lock {key}"),
                source: None,
            });
        }
    }
    pending.disarm();
    let (notifier, signal) = lost_pair();
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(monitor(session.clone(), path.clone(), notifier, stopped));
    Ok(Some(LockGuard::new(
        key.clone(),
        stat.czxid as u64,
        signal,
        Box::new(Release {
            session,
            path,
            key: key.to_string(),
            _stop: stop,
        }),
    )))
}

/// Creates this contender's znode (and the lock directory if needed),
/// finding it again by its GUID if the reply was lost.
async fn create_contender(
    inner: &Inner,
    client: &zk::Client,
    dir: &str,
    guid: &str,
    data: &[u8],
) -> Result<(String, Stat), zk::Error> {
    let prefix = format!("{dir}/{NODE_PREFIX}{guid}-");
    let options = inner.lock_options();
    for _ in 0..RACE_ATTEMPTS {
        match client.create(&prefix, data, &options).await {
            Ok((stat, seq)) => return Ok((format!("{prefix}{seq}"), stat)),
            Err(zk::Error::NoNode) => {
                tree::ensure_parents(client, &prefix, &inner.dir_options()).await?
            }
            Err(zk::Error::ConnectionLoss) => {
                // The create may have been applied: look for our GUID.
                let children = match client.list_children(dir).await {
                    Ok(c) => c,
                    Err(zk::Error::ConnectionLoss) => continue,
                    Err(e) => return Err(e),
                };
                if let Some(c) = contenders(&children).into_iter().find(|c| c.guid == guid) {
                    let path = codec::child_path(dir, c.name);
                    if let Some(stat) = client.check_stat(&path).await? {
                        return Ok((path, stat));
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(zk::Error::ConnectionLoss)
}

/// A contender znode not handed over yet: deleted if the attempt ends early.
struct Pending {
    session: Option<Arc<Session>>,
    path: String,
}

impl Pending {
    fn disarm(&mut self) {
        self.session = None;
    }

    /// Deletes the znode now (giving up the attempt).
    async fn give_up(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.client.delete(&self.path, None).await {
                tracing::debug!(error = %e, path = %self.path, "zookeeper: could not delete lock contender");
            }
            tree::prune(&session.client, &self.path).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        let path = std::mem::take(&mut self.path);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = session.client.delete(&path, None).await;
            });
        }
    }
}

/// Fires the lost signal when the session ends or the holder znode goes;
/// ends (dropping the notifier, which fires it too) on release.
async fn monitor(
    session: Arc<Session>,
    path: String,
    notifier: LostNotifier,
    stopped: oneshot::Receiver<()>,
) {
    let mut states = session.client.state_watcher();
    if !session.usable() {
        notifier.notify();
        return;
    }
    let expired = crate::conn::ended(&mut states);
    let node_gone = async {
        loop {
            match session.client.check_and_watch_stat(&path).await {
                Ok((None, _)) => return,
                Ok((Some(_), watcher)) => {
                    match AssertUnwindSafe(watcher.changed()).catch_unwind().await {
                        Ok(ev) if ev.event_type == EventType::NodeDataChanged => continue,
                        _ => return,
                    }
                }
                Err(e) if error::session_gone(&e) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    };
    tokio::select! {
        _ = stopped => {}
        _ = expired => notifier.notify(),
        _ = node_gone => notifier.notify(),
    }
}

/// Gives a held lock back.
struct Release {
    session: Arc<Session>,
    path: String,
    key: String,
    /// Dropped on release: ends the monitor, which drops the notifier.
    _stop: oneshot::Sender<()>,
}

#[async_trait]
impl LockRelease for Release {
    async fn release(self: Box<Self>) -> Result<()> {
        let Release {
            session,
            path,
            key,
            _stop,
        } = *self;
        drop(_stop);
        match session.client.delete(&path, None).await {
            // Gone already, or its session is: either way the lock is free.
            Ok(())
            | Err(zk::Error::NoNode | zk::Error::SessionExpired | zk::Error::ClientClosed) => {
                tree::prune(&session.client, &path).await;
                Ok(())
            }
            Err(e) => Err(error::map(e, "unlock", &key)),
        }
    }
}

/// The current holder: the lowest contender.
pub(crate) async fn holder(inner: &Inner, key: &Key) -> Result<Option<LockInfo>> {
    let dir = codec::path_of(key.as_str());
    let session = inner.session().await?;
    let fail = |e: zk::Error| inner.fail(&session, e, "lock_holder", key.as_str());
    inner.sync_for_read(&session, &dir).await.map_err(fail)?;
    for _ in 0..RACE_ATTEMPTS {
        let children = match session.client.list_children(&dir).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(fail(e)),
        };
        let Some(first) = contenders(&children)
            .into_iter()
            .next()
            .map(|c| c.name.to_owned())
        else {
            return Ok(None);
        };
        match session
            .client
            .get_data(&codec::child_path(&dir, &first))
            .await
        {
            Ok((data, stat)) => {
                return Ok(Some(LockInfo {
                    fencing_token: stat.czxid as u64,
                    owner: (!data.is_empty()).then(|| String::from_utf8_lossy(&data).into_owned()),
                }));
            }
            // Released meanwhile: look again.
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Err(crate::write::contention(key.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contenders_sorted_by_sequence() {
        let names: Vec<String> = [
            "lock-bbb-0000000012",
            "x",
            "lock-aaa-0000000003",
            "lock-c-x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let all = contenders(&names);
        assert_eq!(
            all.iter().map(|c| c.guid).collect::<Vec<_>>(),
            ["aaa", "bbb"]
        );
        assert_eq!(all[0].seq, 3);
    }
}

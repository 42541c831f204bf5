//! Raw zookeeper-client baseline: one session, N native watches — one-shot
//! data watches on key targets (`get_and_watch_data` on existing znodes,
//! `check_and_watch_stat` on missing ones), persistent recursive watches
//! (`addWatch`) on prefix targets. The writer is a second session.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use zookeeper_client::{
    Acls, AddWatchMode, Client as Zk, CreateMode, CreateOptions, Error as ZkError, WatchedEvent,
};

use crate::{
    case::{AbortOnDrop, Client, Holder, Names, Seen},
    measure,
    spec::{CaseSpec, Kind},
};

/// Concurrency of znode creation and removal.
const CONCURRENCY: usize = 32;

/// The watching session and the writer of one case.
pub struct ZkRaw {
    watcher: Arc<Zk>,
    writer: Arc<Zk>,
    root: String,
    names: Arc<Names>,
    n: usize,
    base_keys: usize,
    existing: bool,
    setup_concurrency: usize,
}

fn persistent() -> CreateOptions<'static> {
    CreateMode::Persistent.with_acls(Acls::anyone_all())
}

/// Creates `path` with `data`; an existing znode is fine.
async fn ensure(zk: &Zk, path: &str, data: &[u8]) -> Result<()> {
    match zk.create(path, data, &persistent()).await {
        Ok(_) | Err(ZkError::NodeExists) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("create {path}")),
    }
}

impl ZkRaw {
    /// Opens both sessions.
    pub async fn connect(spec: &CaseSpec) -> Result<ZkRaw> {
        let hosts = super::endpoints(&spec.url).join(",");
        let watcher = Zk::connect(&hosts).await.context("zookeeper connect")?;
        let writer = Zk::connect(&hosts).await.context("zookeeper connect")?;
        Ok(ZkRaw {
            watcher: Arc::new(watcher),
            writer: Arc::new(writer),
            root: format!("/{}", spec.ns),
            names: Arc::new(Names { kind: spec.kind }),
            n: spec.n,
            base_keys: spec.base_keys(),
            existing: spec.existing,
            setup_concurrency: spec.setup_concurrency,
        })
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    async fn watch(&self, i: usize) -> Result<BoxStream<'static, WatchedEvent>> {
        let target = self.path(&self.names.target(i));
        Ok(match (self.names.kind, self.existing) {
            (Kind::Key, true) => {
                let (_, _, w) = self.watcher.get_and_watch_data(&target).await?;
                futures::stream::once(w.changed()).boxed()
            }
            (Kind::Key, false) => {
                let (_, w) = self.watcher.check_and_watch_stat(&target).await?;
                futures::stream::once(w.changed()).boxed()
            }
            (Kind::Prefix, _) => {
                let w = self
                    .watcher
                    .watch(&target, AddWatchMode::PersistentRecursive)
                    .await?;
                futures::stream::unfold(w, |mut w| async move { Some((w.changed().await, w)) })
                    .boxed()
            }
        })
    }
}

impl Client for ZkRaw {
    fn prepare(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let zk = &self.writer;
            ensure(zk, &self.root, b"").await?;
            ensure(zk, &self.path("k"), b"").await?;
            ensure(zk, &self.path("p"), b"").await?;
            for dir in ["base", "base/k", "base/p"] {
                ensure(zk, &self.path(dir), b"").await?;
            }
            if self.names.kind == Kind::Prefix {
                // The prefix's own znode exists; "missing" is the key below it.
                measure::for_each_concurrent(self.n, CONCURRENCY, |i| async move {
                    ensure(zk, &self.path(&self.names.target(i)), b"").await
                })
                .await?;
                measure::for_each_concurrent(self.base_keys, CONCURRENCY, |i| async move {
                    ensure(zk, &self.path(&self.names.base_target(i)), b"").await
                })
                .await?;
            }
            if self.existing {
                measure::for_each_concurrent(
                    self.n + self.base_keys,
                    CONCURRENCY,
                    |i| async move {
                        ensure(zk, &self.path(&self.names.case_key(i, self.n)), b"v0").await
                    },
                )
                .await?;
            }
            Ok(())
        })
    }

    fn put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        let (zk, path, existing) = (
            self.writer.clone(),
            self.path(&self.names.put_key(i)),
            self.existing,
        );
        Box::pin(async move {
            if existing {
                zk.set_data(&path, b"v1", None).await?;
            } else {
                zk.create(&path, b"v1", &persistent()).await?;
            }
            Ok(())
        })
    }

    fn base_put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        let (zk, path, existing) = (
            self.writer.clone(),
            self.path(&self.names.base_key(i)),
            self.existing,
        );
        Box::pin(async move {
            // The same operation as `put`'s.
            if existing {
                zk.set_data(&path, b"b", None).await?;
            } else {
                zk.create(&path, b"b", &persistent()).await?;
            }
            Ok(())
        })
    }

    fn setup(&self, seen: Arc<Seen>) -> BoxFuture<'_, Result<Holder>> {
        Box::pin(async move {
            let opened: Vec<(usize, BoxStream<'static, WatchedEvent>)> = futures::stream::iter(
                (0..self.n).map(|i| async move { anyhow::Ok((i, self.watch(i).await?)) }),
            )
            .buffer_unordered(self.setup_concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
            let mut all = futures::stream::select_all(
                opened.into_iter().map(|(i, s)| s.map(move |e| (i, e))),
            );
            let (names, root) = (self.names.clone(), self.root.clone());
            let consumer = tokio::spawn(async move {
                while let Some((i, event)) = all.next().await {
                    if event.path.is_empty() {
                        seen.error(format!("session event {:?}", event.session_state));
                    } else {
                        seen.event(i, event.path == format!("{root}/{}", names.put_key(i)));
                    }
                }
            });
            Ok(Box::new(AbortOnDrop(consumer)) as Holder)
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let zk = &self.writer;
            let delete = |path: String| async move {
                let _ = zk.delete(&path, None).await;
                anyhow::Ok(())
            };
            let n = self.n;
            let _ = measure::for_each_concurrent(n, CONCURRENCY, |i| {
                delete(self.path(&self.names.put_key(i)))
            })
            .await;
            let _ = measure::for_each_concurrent(self.base_keys, CONCURRENCY, |i| {
                delete(self.path(&self.names.base_key(i)))
            })
            .await;
            if self.names.kind == Kind::Prefix {
                let _ = measure::for_each_concurrent(n, CONCURRENCY, |i| {
                    delete(self.path(&self.names.target(i)))
                })
                .await;
                let _ = measure::for_each_concurrent(self.base_keys, CONCURRENCY, |i| {
                    delete(self.path(&self.names.base_target(i)))
                })
                .await;
            }
            for dir in ["k", "p", "base/k", "base/p", "base"] {
                let _ = delete(self.path(dir)).await;
            }
            let _ = delete(self.root.clone()).await;
        })
    }
}

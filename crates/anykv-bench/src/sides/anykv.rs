//! anykv as applications use it: `anykv::open` (the driver inside the
//! standard layers); all N watches on ONE handle, the writer on a second
//! handle to the same store.

use std::sync::Arc;

use anyhow::{Context, Result};
use anykv::{Condition, Key, Kv, Prefix, Start, Store, StoreExt, Target, WatchStream};
use futures::{StreamExt, future::BoxFuture};

use crate::{
    case::{AbortOnDrop, Client, Holder, Names, Seen},
    measure,
    spec::{CaseSpec, Kind},
};

/// Concurrency of key pre-creation.
const PREPARE_CONCURRENCY: usize = 32;
/// Concurrency of the deletes after a case (see [`Names::case_key`]).
const CLEANUP_CONCURRENCY: usize = 32;

/// The watching handle and the writing handle of one case.
pub struct AnykvClient {
    watcher: Kv,
    writer: Kv,
    names: Arc<Names>,
    n: usize,
    existing: bool,
    base_keys: usize,
    setup_concurrency: usize,
}

impl AnykvClient {
    /// Opens both handles on the case's namespace.
    pub async fn connect(spec: &CaseSpec) -> Result<AnykvClient> {
        let sep = if spec.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}prefix={}", spec.url, spec.ns);
        let watcher = anykv::open(&url)
            .await
            .with_context(|| format!("opening {}", spec.url))?;
        let writer = anykv::open(&url)
            .await
            .with_context(|| format!("opening {} (writer)", spec.url))?;
        // Connected before the memory baseline: the connection is the
        // handle's, not a cost of its watches (network drivers connect on
        // first use).
        watcher
            .probe()
            .await
            .context("first request of the watcher")?;
        Ok(AnykvClient {
            watcher,
            writer,
            names: Arc::new(Names { kind: spec.kind }),
            n: spec.n,
            existing: spec.existing,
            base_keys: spec.base_keys(),
            setup_concurrency: spec.setup_concurrency,
        })
    }

    fn target(&self, i: usize) -> Result<Target> {
        let name = self.names.target(i);
        Ok(match self.names.kind {
            Kind::Key => Target::Key(Key::new(name)?),
            Kind::Prefix => Target::Prefix(Prefix::new(name)?),
        })
    }

    fn write(&self, key: String, value: &'static str) -> BoxFuture<'static, Result<()>> {
        let writer = self.writer.clone();
        Box::pin(async move {
            writer.set(&key, value).await?;
            Ok(())
        })
    }
}

impl Client for AnykvClient {
    fn prepare(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.existing {
                return Ok(());
            }
            measure::for_each_concurrent(self.n + self.base_keys, PREPARE_CONCURRENCY, |i| {
                self.write(self.names.case_key(i, self.n), "v0")
            })
            .await
        })
    }

    fn put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        self.write(self.names.put_key(i), "v1")
    }

    fn base_put(&self, i: usize) -> BoxFuture<'static, Result<()>> {
        self.write(self.names.base_key(i), "b")
    }

    fn setup(&self, seen: Arc<Seen>) -> BoxFuture<'_, Result<Holder>> {
        Box::pin(async move {
            let opened: Vec<(usize, WatchStream)> =
                futures::stream::iter((0..self.n).map(|i| async move {
                    let target = self.target(i)?;
                    let stream = self.watcher.watch(target, Start::Now).await?;
                    anyhow::Ok((i, stream))
                }))
                .buffer_unordered(self.setup_concurrency.max(1))
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_>>()?;
            let names = self.names.clone();
            let mut all = futures::stream::select_all(
                opened.into_iter().map(|(i, s)| s.map(move |e| (i, e))),
            );
            let consumer = tokio::spawn(async move {
                while let Some((i, item)) = all.next().await {
                    match item {
                        Ok(event) => seen.event(i, event.key().as_str() == names.put_key(i)),
                        Err(e) => seen.error(e.to_string()),
                    }
                }
            });
            Ok(Box::new(AbortOnDrop(consumer)) as Holder)
        })
    }

    fn cleanup(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ =
                measure::for_each_concurrent(self.n + self.base_keys, CLEANUP_CONCURRENCY, |i| {
                    let key = self.names.case_key(i, self.n);
                    let writer = self.writer.clone();
                    async move {
                        writer.delete(&Key::new(key)?, Condition::Always).await?;
                        Ok(())
                    }
                })
                .await;
            let _ = self.watcher.close().await;
            let _ = self.writer.close().await;
        })
    }
}

//! A small in-memory store for the layers' unit tests.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use crate::{
    capability::Capabilities,
    error::Result,
    key::{Key, Prefix},
    lock::{LockGuard, LockRelease, lost_pair},
    store::{Store, WatchStream},
    types::{Condition, Event, KvPair, LockOptions, PutOptions, Start, Target, Version},
};

/// Counts the calls that reach it.
#[derive(Default)]
pub(crate) struct TestStore {
    pub(crate) calls: AtomicU32,
    data: Mutex<BTreeMap<String, Bytes>>,
    /// Feeds the watches opened so far.
    pub(crate) events: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Result<Event>>>>,
}

const CAPS: Capabilities = Capabilities::full(1 << 20).with_ttl(None);

impl TestStore {
    pub(crate) fn new() -> Arc<TestStore> {
        Arc::default()
    }

    fn hit(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

struct NoopRelease;

#[async_trait]
impl LockRelease for NoopRelease {
    async fn release(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl Store for TestStore {
    fn backend(&self) -> &'static str {
        "test"
    }
    fn capabilities(&self) -> &Capabilities {
        &CAPS
    }
    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        self.hit();
        let data = self.data.lock().unwrap();
        Ok(data.get(key.as_str()).map(|v| KvPair {
            key: key.clone(),
            value: v.clone(),
            version: Version::new(1),
            create_revision: 1,
            mod_revision: 1,
        }))
    }
    async fn put(&self, key: &Key, value: Bytes, _: PutOptions) -> Result<Version> {
        self.hit();
        self.data
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned(), value);
        Ok(Version::new(1))
    }
    async fn delete(&self, key: &Key, _: Condition) -> Result<bool> {
        self.hit();
        Ok(self.data.lock().unwrap().remove(key.as_str()).is_some())
    }
    async fn list(&self, _: &Prefix) -> Result<Vec<KvPair>> {
        self.hit();
        Ok(Vec::new())
    }
    async fn delete_prefix(&self, _: &Prefix) -> Result<u64> {
        self.hit();
        Ok(0)
    }
    async fn watch(&self, _: Target, _: Start) -> Result<WatchStream> {
        self.hit();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.events.lock().unwrap().push(tx);
        Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed())
    }
    async fn lock(&self, key: &Key, _: LockOptions) -> Result<LockGuard> {
        self.hit();
        let (notifier, lost) = lost_pair();
        std::mem::forget(notifier);
        Ok(LockGuard::new(key.clone(), 1, lost, Box::new(NoopRelease)))
    }
    async fn probe(&self) -> Result<()> {
        self.hit();
        Ok(())
    }
}

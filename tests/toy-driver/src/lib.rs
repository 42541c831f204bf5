//! A deliberately small third-party driver: `toy://` keeps keys in a
//! `BTreeMap` and implements only the required part of `Store`. It knows
//! nothing of anykv's built-in drivers; being linked is enough for
//! `anykv::open("toy://…")` to find it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use anykv_core::{
    Capabilities, Condition, Key, KvPair, Prefix, PutOptions, Result, Store, Version, async_trait,
    registry::Driver, store::condition,
};
use bytes::Bytes;

const CAPS: Capabilities = Capabilities::full(1024)
    .with_ttl(None)
    .with_locks(false, false);

anykv_core::inventory::submit! {
    Driver {
        name: "toy",
        schemes: &["toy"],
        description: "toy third-party driver (tests only)",
        params: &["flavour"],
        path_is_namespace: true,
        capabilities: || CAPS,
        open: |_config| Box::pin(async { Ok(Arc::new(Toy::default()) as Arc<dyn Store>) }),
    }
}

/// The toy store.
#[derive(Default)]
pub struct Toy {
    data: Mutex<(u64, BTreeMap<Key, KvPair>)>,
}

#[async_trait]
impl Store for Toy {
    fn backend(&self) -> &'static str {
        "toy"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPS
    }

    async fn get(&self, key: &Key) -> Result<Option<KvPair>> {
        Ok(self
            .data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .get(key)
            .cloned())
    }

    async fn put(&self, key: &Key, value: Bytes, opts: PutOptions) -> Result<Version> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        condition::check("toy", key, opts.condition, d.1.get(key).map(|p| p.version))?;
        d.0 += 1;
        let rev = d.0;
        let create = d.1.get(key).map_or(rev, |p| p.create_revision);
        d.1.insert(
            key.clone(),
            KvPair {
                key: key.clone(),
                value,
                version: Version::new(rev),
                create_revision: create,
                mod_revision: rev,
            },
        );
        Ok(Version::new(rev))
    }

    async fn delete(&self, key: &Key, cond: Condition) -> Result<bool> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        condition::check("toy", key, cond, d.1.get(key).map(|p| p.version))?;
        Ok(d.1.remove(key).is_some())
    }

    async fn list(&self, prefix: &Prefix) -> Result<Vec<KvPair>> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        Ok(d.1
            .values()
            .filter(|p| prefix.contains(p.key.as_str()))
            .cloned()
            .collect())
    }

    async fn delete_prefix(&self, prefix: &Prefix) -> Result<u64> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let before = d.1.len();
        d.1.retain(|k, _| !prefix.contains(k.as_str()));
        Ok((before - d.1.len()) as u64)
    }

    async fn probe(&self) -> Result<()> {
        Ok(())
    }
}

//! The driver of a URL builder that was built without connecting.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    capability::Capabilities,
    error::{Error, Result},
    key::{Key, Prefix},
    store::Store,
    types::{Condition, KvPair, PutOptions, Version},
};

/// Refuses everything: `KvBuilder::build` on a URL builder, which needs
/// `open().await` to connect.
pub(crate) struct Unopened(pub(crate) String);

const NONE: Capabilities = Capabilities::full(0);

impl Unopened {
    fn refuse<T>(&self) -> Result<T> {
        Err(Error::InvalidArgument {
            backend: "unopened",
            message: format!(
                "{}: a URL builder connects with open().await, not build()",
                self.0
            ),
        })
    }
}

#[async_trait]
impl Store for Unopened {
    fn backend(&self) -> &'static str {
        "unopened"
    }
    fn capabilities(&self) -> &Capabilities {
        &NONE
    }
    async fn get(&self, _: &Key) -> Result<Option<KvPair>> {
        self.refuse()
    }
    async fn put(&self, _: &Key, _: Bytes, _: PutOptions) -> Result<Version> {
        self.refuse()
    }
    async fn delete(&self, _: &Key, _: Condition) -> Result<bool> {
        self.refuse()
    }
    async fn list(&self, _: &Prefix) -> Result<Vec<KvPair>> {
        self.refuse()
    }
    async fn delete_prefix(&self, _: &Prefix) -> Result<u64> {
        self.refuse()
    }
    async fn probe(&self) -> Result<()> {
        self.refuse()
    }
}
